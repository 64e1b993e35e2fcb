//! # unimod-tok
//!
//! Everything between raw data and the token sequences a unified transformer learns from, and
//! the judges that score what it generates: the datasets (the procedural `shapes` world, MNIST),
//! the text BPE and image VQ tokenizers, the vocabulary layout, the Show-o and Emu3 sequence
//! formats with their per-token metadata (task, segment, attention reach, loss positions), and
//! batches of them as tensors.

#![deny(missing_docs)]

pub mod batch;
pub mod cache;
pub mod check;
pub mod dataset;
pub mod format;
pub mod judge;
pub mod mnist;
pub mod shapes;
pub mod tensorfile;
pub mod text;
pub mod vocab;
pub mod vq;

pub use batch::{Batch, Continuation, IGNORE, Sequence};
pub use format::{Flavour, FormatConfig, FormatError};
/// Tasks and segments are defined in `unimod-vocab` (so that routers can name them without
/// this crate's dependencies); `unimod_tok::task` keeps working.
pub use unimod_vocab as task;
pub use unimod_vocab::{Segment, Task};
pub use vocab::{Special, VocabLayout};
