//! Sequences on the host and batches of them as tensors, with the per-token metadata that
//! masks, losses and routers read. The attention mask is not stored: it follows from each
//! token's `attn_upto` (the last key index it may see) and is built on the device when needed.

use crate::task::{Segment, Task};
use tch::{Device, Kind, Tensor};

/// Label value of positions that carry no loss.
pub const IGNORE: i64 = -100;

/// One sequence, as a format builds it.
#[derive(Debug, Clone, PartialEq)]
pub struct Sequence {
    /// What the sequence teaches.
    pub task: Task,
    /// Token ids in the unified vocabulary.
    pub tokens: Vec<i64>,
    /// Target of the logits at each position (already shifted for next-token prediction),
    /// or [`IGNORE`].
    pub labels: Vec<i64>,
    /// Each token's role.
    pub segments: Vec<Segment>,
    /// The last key position each token may attend to: `i` for a causal token, the end of its
    /// bidirectional block otherwise (Show-o's omni-attention, see `format`).
    pub attn_upto: Vec<i64>,
}

impl Sequence {
    /// Tokens in the sequence.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// The tokens `r` of the sequence, with their labels, segments and attention bounds (a
    /// prompt to prefill, or one decoding step).
    pub fn slice(&self, r: std::ops::Range<usize>) -> Sequence {
        Sequence {
            task: self.task,
            tokens: self.tokens[r.clone()].to_vec(),
            labels: self.labels[r.clone()].to_vec(),
            segments: self.segments[r.clone()].to_vec(),
            attn_upto: self.attn_upto[r].to_vec(),
        }
    }

    /// Appends a decoded token: causal (it sees itself and everything before), without label.
    pub fn push_decoded(&mut self, token: i64, segment: Segment) {
        self.attn_upto.push(self.tokens.len() as i64);
        self.tokens.push(token);
        self.labels.push(IGNORE);
        self.segments.push(segment);
    }

    /// No tokens.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
}

/// Sequences of one length stacked along the batch, sub-batches of one task next to each other.
#[derive(Debug)]
pub struct Batch {
    /// `[B, S]` token ids.
    pub tokens: Tensor,
    /// `[B, S]` targets or [`IGNORE`].
    pub labels: Tensor,
    /// `[B, S]` [`Segment`] of each token as i64.
    pub segment: Tensor,
    /// `[B, S]` last key index each token may attend to.
    pub attn_upto: Tensor,
    /// `[B, S]` position ids for RoPE.
    pub positions: Tensor,
    /// Each sample's task (a model maps them to its own task ids).
    pub tasks: Vec<Task>,
    /// The distinct tasks of the batch, in task order.
    pub task_set: Vec<Task>,
    /// `[B]` i64 each sample's task as its place in `task_set`, on the batch's device, so that
    /// per-task masks inside a forward pass need no copy from the host (a GPU sync).
    pub task: Tensor,
    /// Host count of tokens per segment in each sample: routers size their gathers from it
    /// without reading the device.
    pub segment_counts: Vec<[usize; Segment::COUNT]>,
    /// Where a batch continuing these sequences (incremental decoding) starts.
    pub end: Continuation,
}

/// The sequence index and the RoPE position of the token that follows a batch, per sample.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Continuation {
    /// Sequence index of the next token (the cache's length).
    pub offset: i64,
    /// Per sample, the RoPE position of its next token.
    pub next_position: Vec<i64>,
}

/// Why sequences could not be batched.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)] // the fields are named in each variant's message
pub enum BatchError {
    /// No sequences given.
    #[error("cannot batch zero sequences")]
    Empty,
    /// Sequences of different lengths.
    #[error(
        "sequence {index} has length {len}, the batch has {expected}: formats must pad to one length"
    )]
    Length {
        index: usize,
        len: usize,
        expected: usize,
    },
    /// A sequence whose per-token vectors disagree in length.
    #[error("sequence {index} is inconsistent: {what}")]
    Inconsistent { index: usize, what: &'static str },
}

impl Batch {
    /// Stacks sequences of one length (a fresh batch, positions from 0).
    pub fn from_sequences(seqs: &[Sequence], device: Device) -> Result<Batch, BatchError> {
        Batch::continuing(seqs, None, device)
    }

    /// A batch of tokens that follow `after` (the `end` of the batch before, whose keys sit in a
    /// KV cache): indices and `attn_upto` are absolute, RoPE positions continue per sample.
    ///
    /// RoPE positions count only non-pad tokens, so padding inside a sequence (a batch of
    /// generation prompts of different lengths) does not shift the positions after it.
    pub fn continuing(
        seqs: &[Sequence],
        after: Option<&Continuation>,
        device: Device,
    ) -> Result<Batch, BatchError> {
        let first = seqs.first().ok_or(BatchError::Empty)?;
        let s = first.len();
        let offset = after.map_or(0, |c| c.offset);
        for (index, q) in seqs.iter().enumerate() {
            if q.len() != s {
                return Err(BatchError::Length {
                    index,
                    len: q.len(),
                    expected: s,
                });
            }
            if after.is_some_and(|c| c.next_position.len() != seqs.len()) {
                return Err(BatchError::Inconsistent {
                    index,
                    what: "continuation has another batch size",
                });
            }
            if q.labels.len() != s || q.segments.len() != s || q.attn_upto.len() != s {
                return Err(BatchError::Inconsistent {
                    index,
                    what: "field lengths differ",
                });
            }
            if q.attn_upto
                .iter()
                .any(|&u| u < offset || u >= offset + s as i64)
            {
                return Err(BatchError::Inconsistent {
                    index,
                    what: "attn_upto out of range",
                });
            }
        }
        let b = seqs.len() as i64;
        let flat = |f: &dyn Fn(&Sequence) -> Vec<i64>| -> Tensor {
            let v: Vec<i64> = seqs.iter().flat_map(f).collect();
            Tensor::from_slice(&v).view([b, s as i64]).to_device(device)
        };
        let tokens = flat(&|q| q.tokens.clone());
        let labels = flat(&|q| q.labels.clone());
        let segment = flat(&|q| q.segments.iter().map(|g| *g as i64).collect());
        let attn_upto = flat(&|q| q.attn_upto.clone());
        let tasks: Vec<Task> = seqs.iter().map(|q| q.task).collect();
        let task_set: Vec<Task> = tasks
            .iter()
            .copied()
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let task_ids: Vec<i64> = tasks
            .iter()
            .map(|t| task_set.iter().position(|x| x == t).unwrap_or(0) as i64)
            .collect();
        let mut next_position = Vec::with_capacity(seqs.len());
        let mut pos = Vec::with_capacity(seqs.len() * s);
        for (i, q) in seqs.iter().enumerate() {
            let mut p = after.map_or(0, |c| c.next_position[i]);
            for g in &q.segments {
                pos.push(p);
                p += (*g != Segment::Pad) as i64;
            }
            next_position.push(p);
        }
        let positions = Tensor::from_slice(&pos)
            .view([b, s as i64])
            .to_device(device);
        let segment_counts = seqs
            .iter()
            .map(|q| {
                let mut c = [0usize; Segment::COUNT];
                for g in &q.segments {
                    c[g.index()] += 1;
                }
                c
            })
            .collect();
        Ok(Batch {
            tokens,
            labels,
            segment,
            attn_upto,
            positions,
            tasks,
            task_set,
            task: Tensor::from_slice(&task_ids).to_device(device),
            segment_counts,
            end: Continuation {
                offset: offset + s as i64,
                next_position,
            },
        })
    }

    /// Samples in the batch (B).
    pub fn size(&self) -> usize {
        self.tasks.len()
    }

    /// Tokens per sample (S).
    pub fn seq_len(&self) -> i64 {
        self.tokens.size()[1]
    }

    /// Where its tensors live.
    pub fn device(&self) -> Device {
        self.tokens.device()
    }

    /// `[B, S]` true for every token that is not padding.
    pub fn valid(&self) -> Tensor {
        self.segment.ne(Segment::Pad as i64)
    }

    /// `[B, S]` true for image tokens.
    pub fn is_image(&self) -> Tensor {
        self.segment.eq(Segment::Image as i64)
    }

    /// `[B, S, S]` boolean attention mask (true = may attend) of the whole sequence.
    pub fn attention_mask(&self) -> Tensor {
        let index = self.positions_index();
        attention_mask(&index, &self.attn_upto, &index, &self.valid())
    }

    /// `[B, S]` absolute sequence index of each token (not the RoPE position).
    pub fn positions_index(&self) -> Tensor {
        let (b, s) = (self.size() as i64, self.seq_len());
        let start = self.end.offset - s;
        Tensor::arange_start(start, start + s, (Kind::Int64, self.device()))
            .unsqueeze(0)
            .expand([b, s], false)
    }

    /// The samples of one task, in batch order.
    pub fn samples_of(&self, task: Task) -> Vec<usize> {
        (0..self.size())
            .filter(|&i| self.tasks[i] == task)
            .collect()
    }

    /// Number of tokens in one sample that belong to any of `segments`.
    pub fn count(&self, sample: usize, segments: &[Segment]) -> usize {
        segments
            .iter()
            .map(|g| self.segment_counts[sample][g.index()])
            .sum()
    }
}

/// The attention mask of queries at sequence indices `q_index` (`[B, Q]`, each seeing keys up to
/// `q_upto`) over keys at `k_index` (`[B, K]`, `k_valid` false for keys that must not be seen).
/// Every query sees itself, so no row is empty (padding rows would otherwise give NaN).
///
/// One function serves the full sequence, the tokens a routed layer gathered (both axes sliced
/// by the same indices) and KV-cached decoding.
pub fn attention_mask(
    q_index: &Tensor,
    q_upto: &Tensor,
    k_index: &Tensor,
    k_valid: &Tensor,
) -> Tensor {
    let k = k_index.unsqueeze(1);
    let visible = k
        .le_tensor(&q_upto.unsqueeze(2))
        .logical_and(&k_valid.unsqueeze(1));
    visible.logical_or(&k.eq_tensor(&q_index.unsqueeze(2)))
}
