//! # unimod-analysis
//!
//! The analyses UniMoD is designed from, runnable on any checkpoint of this project: attention
//! patterns per task and layer, layer importance (skip-one-layer, ARank, input/output cosine
//! similarity), token redundancy, and task interaction (competition probe, gradient cosine);
//! and the ARank-derived UniMoD schedule (which layers become T2I-MoD / MMU-MoD / Shared-MoD,
//! at which capacity) that the routers read. `unimod analyze` runs them and writes the report.

#![deny(missing_docs)]

pub mod arank;
pub mod attention;
mod error;
pub mod importance;
pub mod interaction;
pub mod probe;
pub mod redundancy;
pub mod schedule;
pub mod stats;
#[cfg(test)]
mod testing;

pub use error::AnalysisError;
