//! # unimod-router
//!
//! Which tokens each layer of a unified transformer processes. This crate owns the routers
//! (a score per token, one router per task for UniMoD), the batched top-k selection and the
//! gather/scatter around it, the causal decision used in autoregressive decoding, and the
//! schedules that make each layer dense, skipped, or a T2I-MoD, MMU-MoD, Shared-MoD or generic
//! MoD layer (UniMoD's layer switch and the baselines: plain MoD, γ-MoD, early exit,
//! interleaved skipping, and the paper's ablations).
//!
//! It never sees a block: [`depths::MixtureOfDepths`] wraps any block given as a closure, so
//! MoD or UniMoD routing goes into a transformer written anywhere with tch
//! (`examples/mod_in_your_model.rs`); `unimod-model`'s layers build on the same
//! [`select`] pieces.

#![deny(missing_docs)]

pub mod depths;
pub mod router;
pub mod schedule;
pub mod select;

pub use depths::{MixtureOfDepths, Routed};
pub use router::{CausalPredictor, Router, RouterArch, router_evals_per_token};
pub use schedule::{
    Capacities, LayerPlan, Routers, Schedule, ScheduleError, ScheduleFile, tokens_kept,
};
pub use select::Selection;

use serde::{Deserialize, Serialize};
use unimod_vocab::Segment;

/// How routed layers decide, chosen per forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum RoutingMode {
    /// Top-k over the sequence: training, and parallel decoding (Show-o's MaskGIT T2I), where
    /// every token of the sequence is known.
    #[default]
    TopK,
    /// The causal decision (sigmoid of the router ≥ 0.5): autoregressive decoding.
    ThresholdRouter,
    /// The causal decision of the auxiliary predictor: autoregressive decoding.
    ThresholdPredictor,
}

/// `[routing]` of a model config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RoutingConfig {
    /// Which layers route which tasks' tokens, at which capacities.
    pub schedule: Schedule,
    /// The routers' architecture.
    pub router: RouterArch,
    /// Segments whose tokens routers may prune; the others (special tokens always) are
    /// processed by every layer. Drop `question` to protect questions as γ-MoD's masked
    /// routing does.
    pub routable: Vec<Segment>,
    /// Coefficient of the BCE loss pulling router logits towards top-k membership.
    pub aux_loss: f64,
    /// Train the stop-gradient auxiliary predictor of top-k membership.
    pub causal_predictor: bool,
    /// The mode autoregressive decoding uses.
    pub causal_mode: RoutingMode,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        RoutingConfig {
            schedule: Schedule::Dense,
            router: RouterArch::Linear,
            routable: vec![
                Segment::Prompt,
                Segment::Image,
                Segment::Question,
                Segment::Answer,
                Segment::Text,
            ],
            aux_loss: 0.01,
            causal_predictor: true,
            causal_mode: RoutingMode::ThresholdPredictor,
        }
    }
}
