//! Kernels tch does not reach, for training steps that launch fewer of them:
//!
//! - [`adamw`]: libtorch's fused AdamW (`torch.optim.AdamW(fused=True)`), one pass per
//!   parameter instead of about sixteen kernels, on a CPU and on a GPU;
//! - [`graph`]: CUDA graphs, a whole step captured once and replayed with one launch;
//! - [`ops`]: how many operators (≈ GPU kernel launches) some work dispatches.
//!
//! Both go through a small C++ shim compiled against the libtorch tch links (as torch-sys
//! compiles its own wrapper).
#![deny(missing_docs)]

pub mod adamw;
pub mod graph;
pub mod ops;

pub use graph::{CudaError, Graph, graphs_built, on_side_stream};
