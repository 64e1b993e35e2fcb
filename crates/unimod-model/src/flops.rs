//! Analytic FLOPs, as one function of the work each layer really did.
//!
//! Conventions (2 FLOPs per multiply-accumulate; backward = 2 × forward, so training = 3 ×):
//! - **linear**: per processed token and layer, the attention projections
//!   `2·d·(2·d + 2·d_kv)` plus the MLP `2·d·d_ffn·m` (m = 2 for GELU, 3 for SwiGLU);
//! - **attention**: per (query, key) pair the kernel computes, `4·d` (scores and weighted sum).
//!   Masks do not skip work in dense kernels, so a routed layer over G gathered tokens costs
//!   G² pairs and a dense layer S²;
//! - **router**: `2·d` per token and `d → 1` router; an MLP router or a causal predictor
//!   counts its real multiply-accumulates in those units
//!   ([`unimod_router::router_evals_per_token`], shared by the counted and analytic paths: a
//!   router shared by tasks counts once, every per-task router and predictor once each);
//! - **head**: `2·d·V` per token.
//!
//! The UniMoD paper's ratios (Show-o 15.3 %, Emu3 39.9 %) are reproduced by the **linear-only**
//! convention ([`Flops::linear`]): FLOPs ∝ tokens processed × layers, attention's quadratic term
//! and the LM head left out (docs/flops.md).

use crate::config::{FfnKind, ModelConfig};
use crate::layer::Work;
use unimod_router::{LayerPlan, router_evals_per_token, tokens_kept};
use unimod_tok::{Segment, Task};

/// Training FLOPs per forward FLOP.
pub const TRAIN_MULTIPLIER: f64 = 3.0;

/// FLOPs by part.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Flops {
    /// The blocks' projections (attention and FFN) on the tokens they processed.
    pub linear: f64,
    /// Attention's quadratic term: scores and weighted values over the pairs computed.
    pub attention: f64,
    /// Routers, causal predictors, MoMa's gates and auxiliary routers.
    pub router: f64,
    /// The LM head.
    pub head: f64,
}

impl Flops {
    /// Every part summed.
    pub fn total(&self) -> f64 {
        self.linear + self.attention + self.router + self.head
    }

    /// Every part times `f`.
    pub fn scaled(&self, f: f64) -> Flops {
        Flops {
            linear: self.linear * f,
            attention: self.attention * f,
            router: self.router * f,
            head: self.head * f,
        }
    }
}

impl std::ops::Add for Flops {
    type Output = Flops;
    fn add(self, o: Flops) -> Flops {
        Flops {
            linear: self.linear + o.linear,
            attention: self.attention + o.attention,
            router: self.router + o.router,
            head: self.head + o.head,
        }
    }
}

/// Linear FLOPs of one token through one block's attention projections.
pub fn attention_linear_per_token(cfg: &ModelConfig) -> f64 {
    let d = cfg.d_model as f64;
    let kv = (cfg.n_kv_heads * cfg.head_dim()) as f64;
    2.0 * d * (2.0 * d + 2.0 * kv)
}

/// FLOPs of one token through one FFN (an MLP, or one MoMa expert).
pub fn ffn_per_token(cfg: &ModelConfig) -> f64 {
    let mlp_mats = match cfg.ffn {
        FfnKind::Gelu => 2.0,
        FfnKind::Swiglu => 3.0,
    };
    2.0 * cfg.d_model as f64 * cfg.d_ffn as f64 * mlp_mats
}

/// Linear FLOPs of one token through one dense block.
pub fn linear_per_token(cfg: &ModelConfig) -> f64 {
    attention_linear_per_token(cfg) + ffn_per_token(cfg)
}

/// Parameters of the model (blocks, embedding and head; norms, biases and routers are
/// negligible), for memory estimates: every expert and modality copy counted.
pub fn parameters(cfg: &ModelConfig) -> f64 {
    // Mixture-of-Transformers keeps one copy of every block per modality.
    let copies = if cfg.mot { 2.0 } else { 1.0 };
    let ffns = match &cfg.moma {
        None => copies,
        Some(m) => (m.text_experts + m.image_experts) as f64,
    };
    cfg.n_layers as f64 * (copies * attention_linear_per_token(cfg) + ffns * ffn_per_token(cfg))
        / 2.0
        + 2.0 * cfg.vocab.size() as f64 * cfg.d_model as f64
}

/// Parameters one token passes through in a dense layer: its modality's copy of a block, and
/// under MoMa `E · c_e` experts of its group on average (the larger group's, to be safe).
pub fn active_parameters(cfg: &ModelConfig) -> f64 {
    let ffns = cfg.moma.map_or(1.0, |m| {
        m.groups()
            .iter()
            .map(|(e, c)| *e as f64 * c)
            .fold(0.0, f64::max)
    });
    cfg.n_layers as f64 * (attention_linear_per_token(cfg) + ffns * ffn_per_token(cfg)) / 2.0
        + 2.0 * cfg.vocab.size() as f64 * cfg.d_model as f64
}

/// Bytes a training step needs at least: f32 weights, gradients and two AdamW moments, and the
/// activations kept for the backward pass of `sequences` sequences of `seq_len` tokens (per
/// layer and token: the block's inputs and projections, the MLP's hidden units, one attention
/// row per head; plus logits and their gradient).
pub fn training_bytes(cfg: &ModelConfig, sequences: usize, seq_len: usize) -> f64 {
    let tokens = sequences as f64 * seq_len as f64;
    let per_layer = 12.0 * cfg.d_model as f64
        + 4.0 * cfg.d_ffn as f64
        + 3.0 * cfg.n_heads as f64 * seq_len as f64;
    4.0 * (4.0 * parameters(cfg)
        + tokens * (cfg.n_layers as f64 * per_layer + 3.0 * cfg.vocab.size() as f64))
}

/// Forward FLOPs of one layer's work.
pub fn layer(cfg: &ModelConfig, w: &Work) -> Flops {
    let d = cfg.d_model as f64;
    Flops {
        linear: w.tokens * attention_linear_per_token(cfg) + w.ffn_tokens * ffn_per_token(cfg),
        attention: w.attention_pairs * 4.0 * d,
        router: w.router_tokens * 2.0 * d,
        head: 0.0,
    }
}

/// Forward FLOPs of a pass: every layer's work plus the head over `head_tokens`.
pub fn forward(cfg: &ModelConfig, work: &[Work], head_tokens: f64) -> Flops {
    let head = Flops {
        head: head_tokens * 2.0 * cfg.d_model as f64 * cfg.vocab.size() as f64,
        ..Default::default()
    };
    work.iter().map(|w| layer(cfg, w)).fold(head, |a, b| a + b)
}

/// The token make-up of one sequence of a task: tokens per [`Segment`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Composition {
    /// The sequence's task.
    pub task: Task,
    /// Tokens of each segment, indexed by [`Segment::index`].
    pub segments: [usize; Segment::COUNT],
}

impl Composition {
    /// Tokens in the sequence.
    pub fn len(&self) -> usize {
        self.segments.iter().sum()
    }

    /// No tokens at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn count(&self, of: &[Segment]) -> usize {
        of.iter().map(|g| self.segments[g.index()]).sum()
    }
}

/// The work of each layer for one sequence of the given make-up under a schedule, without
/// running the model: what `unimod flops` prints for full-size configs. Under MoMa + MoD, a
/// routed layer's kept routable tokens are split between the modalities in the proportion of
/// the routable ones (the router's real split is known only when it runs).
pub fn analytic_work(cfg: &ModelConfig, plans: &[LayerPlan], seq: &Composition) -> Vec<Work> {
    let valid = seq.len() - seq.segments[Segment::Pad.index()];
    let routable = seq.count(&cfg.routing.routable);
    let image = seq.segments[Segment::Image.index()];
    let routable_image = if cfg.routing.routable.contains(&Segment::Image) {
        image
    } else {
        0
    };
    // FFN token-slots and MoMa router evaluations of a block over `n` tokens (`valid` of them
    // not padding, `image` of those image tokens): an MLP computes every token, MoMa's experts
    // take among the valid ones, its gates score every token.
    let ffn = |n: usize, valid: usize, image: f64| match &cfg.moma {
        None => (n as f64, 0.0),
        Some(m) => {
            let image = image.round() as usize;
            let slots = m.slots([valid.saturating_sub(image), image]);
            (slots, n as f64 * m.router_evals_per_token(cfg.d_model))
        }
    };
    plans
        .iter()
        .map(|plan| match plan {
            LayerPlan::Skip => Work::default(),
            LayerPlan::Dense => {
                let (ffn_tokens, router_tokens) = ffn(seq.len(), valid, image as f64);
                let n = seq.len() as f64;
                Work {
                    tokens: n,
                    ffn_tokens,
                    attention_pairs: n * n,
                    router_tokens,
                }
            }
            LayerPlan::Routed { capacity, routers } => {
                let evals = router_evals_per_token(
                    &cfg.routing,
                    cfg.d_model,
                    *routers,
                    capacity.routed_tasks(&cfg.tasks).len(),
                );
                let (n, image_kept) = match capacity.get(seq.task) {
                    None => (valid, image as f64),
                    Some(c) => {
                        let kept = tokens_kept(c, routable);
                        let share = kept as f64 / routable.max(1) as f64;
                        let image_kept =
                            (image - routable_image) as f64 + routable_image as f64 * share;
                        (valid - routable + kept, image_kept)
                    }
                };
                let (ffn_tokens, ffn_router) = ffn(n, n, image_kept);
                let n = n as f64;
                Work {
                    tokens: n,
                    ffn_tokens,
                    attention_pairs: n * n,
                    // the routers score every position of the batch, padding included
                    router_tokens: seq.len() as f64 * evals + ffn_router,
                }
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use unimod_router::Schedule;

    fn showo_like() -> ModelConfig {
        ModelConfig {
            d_model: 2048,
            n_layers: 24,
            n_heads: 32,
            n_kv_heads: 32,
            d_ffn: 8192,
            ..Default::default()
        }
    }

    #[test]
    fn phi_linear_flops_match_the_paper_reference() {
        // paper-unimod.md §4.5: 2·(4d² + 2·d·ffn) ≈ 100.7 MFLOPs per token and layer.
        let f = linear_per_token(&showo_like());
        assert!((f - 100.66e6).abs() < 0.01e6, "{f}");
    }

    #[test]
    fn half_the_layers_at_twenty_percent_saves_forty_percent_of_linear_flops() {
        let mut cfg = showo_like();
        cfg.n_layers = 32;
        let seq = Composition {
            task: Task::T2I,
            segments: [0, 100, 4000, 0, 0, 0, 0],
        };
        let dense = analytic_work(&cfg, &Schedule::Dense.resolve(32).unwrap(), &seq);
        let s = Schedule::Unimod {
            layers: unimod_router::schedule::LayerSet::Named(
                unimod_router::schedule::NamedLayers::LastHalf,
            ),
            t2i: Some(unimod_router::schedule::Ramp::Constant(0.2)),
            mmu: Some(unimod_router::schedule::Ramp::Constant(0.2)),
            lm: None,
            tasks: Default::default(),
            routers: Default::default(),
        };
        let routed = analytic_work(&cfg, &s.resolve(32).unwrap(), &seq);
        let lin = |w: &[Work]| forward(&cfg, w, 0.0).linear;
        let saving = 1.0 - lin(&routed) / lin(&dense);
        assert!((saving - 0.4).abs() < 1e-9, "{saving}");
    }

    #[test]
    fn routers_cost_what_they_compute() {
        use unimod_router::{Capacities, RouterArch, Routers};
        let mut cfg = showo_like();
        let seq = Composition {
            task: Task::T2I,
            segments: [0, 100, 0, 0, 0, 0, 0],
        };
        let both = Capacities::of([(Task::T2I, 0.5), (Task::MMU, 0.5)]);
        let evals = |cfg: &ModelConfig, routers| {
            let plan = LayerPlan::Routed {
                capacity: both.clone(),
                routers,
            };
            analytic_work(cfg, &[plan], &seq)[0].router_tokens / 100.0
        };
        let p = unimod_router::CausalPredictor::cost_in_router_evals(cfg.d_model);
        // two per-task routers and two predictors; one shared router and the same predictors
        assert_eq!(evals(&cfg, Routers::PerTask), 2.0 + 2.0 * p);
        assert_eq!(evals(&cfg, Routers::Shared), 1.0 + 2.0 * p);
        cfg.routing.causal_predictor = false;
        assert_eq!(evals(&cfg, Routers::Shared), 1.0);
        // an MLP router d → d/4 → 1 costs (d·d/4 + d/4) / d linear-router evaluations
        cfg.routing.router = RouterArch::Mlp;
        assert_eq!(evals(&cfg, Routers::Shared), 512.0 * 2049.0 / 2048.0);
    }
}
