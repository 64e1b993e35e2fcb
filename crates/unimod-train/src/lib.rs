//! # unimod-train
//!
//! What a researcher runs: run configuration, device selection, the mixed-task trainer,
//! evaluation with the judges, and the `unimod` CLI (`src/main.rs`) whose subcommands
//! (`flops`, `doctor`, …) drive the library crates.

#![deny(missing_docs)]

pub mod analyze;
pub mod compare;
pub mod config;
pub mod data;
pub mod device;
pub mod distributed;
pub mod eval;
pub mod experiment;
pub mod flops_report;
pub mod graphs;
pub mod load;
pub mod optim;
pub mod plots;
pub mod progress;
pub mod reproduce;
pub mod rundir;
pub mod train;

pub use config::RunConfig;

/// `std::fs::write` whose error names the file.
pub fn write(path: impl AsRef<std::path::Path>, contents: impl AsRef<[u8]>) -> anyhow::Result<()> {
    let path = path.as_ref();
    std::fs::write(path, contents)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))
}
