//! # unimod-vocab
//!
//! Tasks and token segments: the per-sample and per-token labels that routers, masks and losses
//! read. They live in this crate of their own, with serde as its only dependency, so that the
//! router crate can name them without pulling in the tokenizers and image codecs of
//! `unimod-tok` (which defines the sequence formats that produce them and re-exports them).

#![deny(missing_docs)]

use serde::{Deserialize, Serialize};

/// What a training sample teaches, by name: an open set. The paper's tasks are built in
/// ([`Task::T2I`], [`Task::MMU`], [`Task::LM`]); any other name (`"video"`, `"caption"`) is a
/// task too, declared in a model's configuration (`model.tasks`), with its own router column,
/// capacity and loss weight. Show-o concatenates one sub-batch per task along the batch.
///
/// A task is its name, interned, so it is `Copy` and compares by name. Tasks order the built-in
/// ones first (t2i, mmu, lm) and the others by name: the order of a layer's router columns,
/// whatever order configurations name them in.
///
/// ```
/// use unimod_vocab::Task;
///
/// let video = Task::named("video").unwrap();
/// assert_eq!(video, Task::named("video").unwrap());
/// assert_eq!(video.to_string(), "video");
/// let mut tasks = vec![video, Task::MMU, Task::T2I];
/// tasks.sort();
/// assert_eq!(tasks, [Task::T2I, Task::MMU, video]);
/// // Names are lower-case identifiers: what a config key and a file name can both hold.
/// assert!(Task::named("Video Task").is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Task(&'static str);

/// A task name that is not a lower-case identifier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadTaskName(pub String);

impl std::fmt::Display for BadTaskName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "task name {:?} is not accepted: 1 to 32 characters of a–z, 0–9 and _, starting with a letter",
            self.0
        )
    }
}

impl std::error::Error for BadTaskName {}

impl Task {
    /// Text-to-image generation.
    pub const T2I: Task = Task("t2i");
    /// Multimodal understanding: image + question → answer.
    pub const MMU: Task = Task("mmu");
    /// Plain language modelling.
    pub const LM: Task = Task("lm");
    /// The built-in tasks, in their order. The trainer has a sequence format and data for each.
    pub const BUILT_IN: [Task; 3] = [Task::T2I, Task::MMU, Task::LM];

    /// The task of this name (interned once per process: a handful of names, never freed).
    pub fn named(name: &str) -> Result<Task, BadTaskName> {
        let ok = (1..=32).contains(&name.len())
            && name.starts_with(|c: char| c.is_ascii_lowercase())
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !ok {
            return Err(BadTaskName(name.to_string()));
        }
        if let Some(t) = Task::BUILT_IN.into_iter().find(|t| t.0 == name) {
            return Ok(t);
        }
        static NAMES: std::sync::Mutex<Vec<&'static str>> = std::sync::Mutex::new(Vec::new());
        let mut names = NAMES.lock().unwrap_or_else(|e| e.into_inner());
        let interned = match names.iter().find(|n| **n == name) {
            Some(n) => n,
            None => {
                names.push(Box::leak(name.to_string().into_boxed_str()));
                names.last().expect("just pushed")
            }
        };
        Ok(Task(interned))
    }

    /// The name configs, metrics and reports use (`"t2i"`, `"mmu"`, `"lm"`, …).
    pub fn name(self) -> &'static str {
        self.0
    }

    /// Whether it is one of [`Task::BUILT_IN`].
    pub fn is_built_in(self) -> bool {
        Task::BUILT_IN.contains(&self)
    }

    fn rank(self) -> (usize, &'static str) {
        let built_in = Task::BUILT_IN.iter().position(|t| *t == self);
        (built_in.unwrap_or(Task::BUILT_IN.len()), self.0)
    }
}

impl PartialOrd for Task {
    fn partial_cmp(&self, other: &Task) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Task {
    fn cmp(&self, other: &Task) -> std::cmp::Ordering {
        self.rank().cmp(&other.rank())
    }
}

impl std::fmt::Display for Task {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

impl std::str::FromStr for Task {
    type Err = BadTaskName;
    fn from_str(s: &str) -> Result<Task, BadTaskName> {
        Task::named(s)
    }
}

impl Serialize for Task {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.0)
    }
}

impl<'de> Deserialize<'de> for Task {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Task, D::Error> {
        let name = std::borrow::Cow::<'de, str>::deserialize(d)?;
        Task::named(&name).map_err(serde::de::Error::custom)
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
