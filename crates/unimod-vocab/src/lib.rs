//! # unimod-vocab
//!
//! Tasks and token segments: the per-sample and per-token labels that routers, masks and losses
//! read. They live in this crate of their own, with serde as its only dependency, so that the
//! router crate can name them without pulling in the tokenizers and image codecs of
//! `unimod-tok` (which defines the sequence formats that produce them and re-exports them).

#![deny(missing_docs)]

use serde::{Deserialize, Serialize};

/// What a training sample teaches. Show-o concatenates one sub-batch per task along the batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    /// Text-to-image generation.
    T2i = 0,
    /// Multimodal understanding: image + question → answer.
    Mmu = 1,
    /// Plain language modelling.
    Lm = 2,
}

impl Task {
    /// Every task, in index order.
    pub const ALL: [Task; 3] = [Task::T2i, Task::Mmu, Task::Lm];
    /// How many tasks there are: the length of per-task arrays.
    pub const COUNT: usize = 3;

    /// The task's place in [`Task::ALL`] (the id a batch's `task` tensor holds).
    pub fn index(self) -> usize {
        self as usize
    }

    /// The name configs, metrics and reports use (`"t2i"`, `"mmu"`, `"lm"`).
    pub fn name(self) -> &'static str {
        match self {
            Task::T2i => "t2i",
            Task::Mmu => "mmu",
            Task::Lm => "lm",
        }
    }
}

impl std::fmt::Display for Task {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The role of one token in its sequence. Routers decide by segment which tokens may be
/// pruned (γ-MoD's masked routing protects questions, for example).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Segment {
    /// Task, boundary and row tokens (`<|t2i|>`, `<|soi|>`, `<|eol|>`, bos/eos).
    Special = 0,
    /// The caption a T2I sample is generated from.
    Prompt = 1,
    /// Image codes (and `<|mask|>` placeholders for them).
    Image = 2,
    /// The question of an MMU sample.
    Question = 3,
    /// The answer of an MMU sample.
    Answer = 4,
    /// Free text of an LM sample.
    Text = 5,
    /// Padding: never attended to, never routed, never in a loss.
    Pad = 6,
}

impl Segment {
    /// Every segment, in index order.
    pub const ALL: [Segment; 7] = [
        Segment::Special,
        Segment::Prompt,
        Segment::Image,
        Segment::Question,
        Segment::Answer,
        Segment::Text,
        Segment::Pad,
    ];
    /// How many segments there are.
    pub const COUNT: usize = 7;

    /// The segment's place in [`Segment::ALL`] (the id a batch's `segment` tensor holds).
    pub fn index(self) -> usize {
        self as usize
    }

    /// Image tokens count as the image modality; everything else is text.
    pub fn is_image(self) -> bool {
        self == Segment::Image
    }
}
