//! # unimod-train
//!
//! What a researcher runs: run configuration, device selection, the mixed-task trainer,
//! evaluation with the judges, and the `unimod` CLI (`src/main.rs`) whose subcommands
//! (`flops`, `doctor`, …) drive the library crates.

pub mod config;
pub mod data;
pub mod device;
pub mod flops_report;
pub mod progress;

pub use config::RunConfig;
