//! # unimod-model
//!
//! The unified multimodal transformer the routers prune: one decoder over text and image
//! tokens, in the Show-o flavour (omni-attention, masked image-token prediction for T2I) or the
//! Emu3 flavour (pure next-token prediction), with every layer pluggable as dense, skipped or
//! routed (MoD, UniMoD's task-aware layers), with modality-untied blocks (Mixture-of-Transformers)
//! or modality-aware experts in the FFN (MoMa) as options. It owns the forward pass and its named output
//! (logits, per-task losses, attention maps, hidden states, routing statistics), KV-cached
//! decoding, safetensors checkpoints that carry their config, and the analytic FLOPs model.

#![deny(missing_docs)]

pub mod bench;
pub mod block;
pub mod checkpoint;
pub mod config;
pub mod flops;
pub mod generate;
pub mod hf;
pub mod layer;
pub mod model;
pub mod moma;

pub use config::{
    BlockStyle, ConfigError, FfnKind, Flavour, ImagePositions, LossWeights, ModelConfig, NormKind,
};
pub use model::{
    ForwardOptions, KeepTokens, KvCache, Losses, ModelOutput, RoutingCounts, UnifiedTransformer,
};
pub use moma::MomaConfig;
