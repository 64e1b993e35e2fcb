//! # unimod-analysis
//!
//! The analyses UniMoD is designed from, runnable on any checkpoint of this project: attention
//! patterns per task and layer, layer importance (skip-one-layer, ARank, input/output cosine
//! similarity), token redundancy, and task interaction; and the ARank-derived UniMoD schedule
//! (which layers become T2I-MoD / MMU-MoD / Shared-MoD, at which capacity) that the routers read.

pub mod arank;
