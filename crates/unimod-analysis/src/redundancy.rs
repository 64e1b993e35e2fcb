//! Token redundancy: how a task's loss changes when one layer processes only a fraction of the
//! tokens, the others passing through unchanged. Tokens are ranked by the attention they
//! receive in that layer (the paper's signal of importance) or at random (the control); special
//! tokens are always processed.

use crate::AnalysisError;
use crate::probe::{self, full_maps};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};
use unimod_model::{ForwardOptions, KeepTokens, UnifiedTransformer};
use unimod_router::{select, tokens_kept};
use unimod_tok::{Batch, Segment, Task};

/// How tokens are ranked before the lowest are dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Ranking {
    /// Attention received, summed over valid queries and averaged over heads.
    Attention,
    /// Uniformly random (seeded): what any ranking must beat.
    Random,
}

/// `losses[layer][i]`: the task's loss when `layer` keeps `fractions[i]` of its tokens.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Redundancy {
    /// The task whose samples were scored.
    pub task: Task,
    /// How tokens were ranked.
    pub ranking: Ranking,
    /// The fractions of tokens kept.
    pub fractions: Vec<f64>,
    /// The task's loss with every token processed.
    pub dense_loss: f64,
    /// `[layer][fraction]` the loss with only that fraction processed in that layer.
    pub losses: Vec<Vec<f64>>,
    /// Each sample's own dense loss.
    pub sample_dense: Vec<f64>,
    /// `sample_losses[layer][i][sample]`: each sample's own loss in the cell of `losses`.
    pub sample_losses: Vec<Vec<Vec<f64>>>,
}

impl Redundancy {
    /// Per sample, the mean over `layers` and every fraction below 1 of its loss increase
    /// relative to the batch's dense loss: how much the sample depends on those layers
    /// processing all tokens (scale-free, so T2I and MMU compare).
    pub fn sensitivity(&self, layers: std::ops::Range<usize>) -> Vec<f64> {
        let n = self.sample_losses.len();
        let layers = layers.start.min(n)..layers.end.min(n);
        let scale = self.dense_loss.abs().max(1e-12);
        let cells: Vec<&Vec<f64>> = self.sample_losses[layers]
            .iter()
            .flat_map(|per_f| {
                per_f
                    .iter()
                    .zip(&self.fractions)
                    .filter(|(_, f)| **f < 1.0)
                    .map(|(s, _)| s)
            })
            .collect();
        (0..self.sample_dense.len())
            .map(|i| {
                cells
                    .iter()
                    .map(|c| (c[i] - self.sample_dense[i]) / scale)
                    .sum::<f64>()
                    / cells.len().max(1) as f64
            })
            .collect()
    }
}

/// Token redundancy per layer (the paper's Fig. 3c): each layer in turn processes only the
/// `fractions` of each sample's non-special tokens ranked highest (the rest pass through
/// unchanged), and the task's loss is measured; fractions outside (0, 1] are refused.
pub fn redundancy(
    model: &UnifiedTransformer,
    batch: &Batch,
    task: Task,
    fractions: &[f64],
    ranking: Ranking,
) -> Result<Redundancy, AnalysisError> {
    if let Some(&f) = fractions.iter().find(|f| !(**f > 0.0 && **f <= 1.0)) {
        return Err(AnalysisError::OutOfRange {
            what: "token fraction",
            value: f,
            range: "(0, 1]",
        });
    }
    let out = probe::full_forward(model, batch)?;
    let dense_loss = probe::loss_of(model, batch, &out, task)?;
    let sample_dense = probe::per_sample(model, batch, &out);
    let maps = full_maps(&out, batch)?;
    let valid = batch.valid();
    let forced = batch
        .segment
        .eq(Segment::Special as i64)
        .logical_and(&valid);
    let candidates = valid.logical_and(&forced.logical_not());
    let n_candidates: Vec<usize> = (0..batch.size())
        .map(|i| batch.seq_len() as usize - batch.count(i, &[Segment::Pad, Segment::Special]))
        .collect();
    let n_valid: Vec<usize> = (0..batch.size())
        .map(|i| batch.seq_len() as usize - batch.count(i, &[Segment::Pad]))
        .collect();
    tch::manual_seed(0);
    let cells: Vec<Vec<(f64, Vec<f64>)>> = maps
        .iter()
        .enumerate()
        .map(|(layer, m)| {
            let score = match (ranking, m) {
                (Ranking::Attention, Some(m)) => {
                    let q = valid.to_kind(Kind::Float).unsqueeze(1).unsqueeze(-1);
                    (m.probs.to_kind(Kind::Float) * q)
                        .sum_dim_intlist(2, false, Kind::Float)
                        .mean_dim(1, false, Kind::Float)
                }
                _ => Tensor::rand(
                    [batch.size() as i64, batch.seq_len()],
                    (Kind::Float, valid.device()),
                ),
            };
            fractions
                .iter()
                .map(|&f| {
                    let n_keep: Vec<i64> = n_valid
                        .iter()
                        .zip(&n_candidates)
                        .map(|(v, c)| (v - c + tokens_kept(f, *c)) as i64)
                        .collect();
                    let width = n_keep.iter().copied().max().unwrap_or(1).max(1);
                    let n_keep = Tensor::from_slice(&n_keep).to_device(valid.device());
                    let budget = select::Budget::new(&candidates, &forced, &n_keep, width);
                    let sel = select::top_k(&score, &budget);
                    let opts = ForwardOptions {
                        keep_tokens: Some(KeepTokens {
                            layer,
                            mask: sel.processed,
                        }),
                        ..Default::default()
                    };
                    let out = tch::no_grad(|| model.forward(batch, &opts))?;
                    Ok((
                        probe::loss_of(model, batch, &out, task)?,
                        probe::per_sample(model, batch, &out),
                    ))
                })
                .collect::<Result<Vec<_>, AnalysisError>>()
        })
        .collect::<Result<_, _>>()?;
    let (losses, sample_losses) = cells
        .into_iter()
        .map(|per_f| per_f.into_iter().unzip())
        .unzip();
    Ok(Redundancy {
        task,
        ranking,
        fractions: fractions.to_vec(),
        dense_loss,
        losses,
        sample_dense,
        sample_losses,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{batch_of, tiny_model};

    #[test]
    fn keeping_every_token_is_the_dense_loss_and_fewer_change_it() {
        let (_vs, model) = tiny_model(unimod_router::Schedule::Dense);
        let b = batch_of(&model, Task::T2I, 3);
        let r = redundancy(&model, &b, Task::T2I, &[1.0, 0.3], Ranking::Attention).unwrap();
        for (per_layer, samples) in r.losses.iter().zip(&r.sample_losses) {
            assert!((per_layer[0] - r.dense_loss).abs() < 1e-5);
            assert_ne!(per_layer[1], r.dense_loss);
            for (a, b) in samples[0].iter().zip(&r.sample_dense) {
                assert!((a - b).abs() < 1e-5);
            }
        }
        let s = r.sensitivity(0..3);
        assert_eq!(s.len(), 3);
        assert!(s.iter().all(|x| x.is_finite() && *x != 0.0));
        assert!(redundancy(&model, &b, Task::T2I, &[0.0], Ranking::Random).is_err());
    }
}
