//! Routers: a score per token from its hidden state. The score's sigmoid weights the block's
//! output for the token (which puts the router on the gradient path), and its top-k over a
//! sample's routable tokens decides which tokens the layer processes.

use serde::{Deserialize, Serialize};
use tch::{Tensor, nn, nn::Module};

/// The shape of a router.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum RouterArch {
    /// `d → 1` (Raposo et al.).
    #[default]
    Linear,
    /// `d → d/4 → 1` with GELU.
    Mlp,
}

/// Scores tokens: `[.., D] → [..]` logits.
#[derive(Debug)]
pub struct Router {
    layers: Vec<nn::Linear>,
}

impl Router {
    pub fn new(p: nn::Path, d_model: i64, arch: RouterArch) -> Router {
        // Zero-initialised output: every token starts at weight sigmoid(0) = 0.5 and the order
        // among tokens is learned from there.
        let zero = nn::LinearConfig {
            ws_init: nn::Init::Const(0.0),
            ..Default::default()
        };
        let layers = match arch {
            RouterArch::Linear => vec![nn::linear(&p / "proj", d_model, 1, zero)],
            RouterArch::Mlp => vec![
                nn::linear(
                    &p / "hidden",
                    d_model,
                    (d_model / 4).max(1),
                    Default::default(),
                ),
                nn::linear(&p / "proj", (d_model / 4).max(1), 1, zero),
            ],
        };
        Router { layers }
    }

    /// # Shapes
    /// `x: [B, S, D]` → `[B, S]` logits.
    pub fn score(&self, x: &Tensor) -> Tensor {
        let mut h = self.layers[0].forward(x);
        for l in &self.layers[1..] {
            h = l.forward(&h.gelu("none"));
        }
        h.squeeze_dim(-1)
    }

    /// A handle on the same parameters (γ-MoD shares one router across layers).
    pub fn share(&self) -> Router {
        Router {
            layers: self
                .layers
                .iter()
                .map(|l| nn::Linear {
                    ws: l.ws.shallow_clone(),
                    bs: l.bs.as_ref().map(Tensor::shallow_clone),
                })
                .collect(),
        }
    }
}

/// The MoD paper's second fix for causal sampling: a small MLP that sees the layer input under
/// a stop-gradient and predicts top-k membership, trained without touching the model's loss.
#[derive(Debug)]
pub struct CausalPredictor {
    hidden: nn::Linear,
    out: nn::Linear,
}

impl CausalPredictor {
    fn hidden(d_model: i64) -> i64 {
        (d_model / 4).max(8)
    }

    /// Multiply-accumulates of one evaluation in units of a `d → 1` router's (`d`), for the
    /// FLOPs count: `(d·h + h) / d`.
    pub fn cost_in_router_evals(d_model: i64) -> f64 {
        let h = Self::hidden(d_model) as f64;
        h * (d_model as f64 + 1.0) / d_model as f64
    }

    pub fn new(p: nn::Path, d_model: i64) -> CausalPredictor {
        let h = Self::hidden(d_model);
        CausalPredictor {
            hidden: nn::linear(&p / "hidden", d_model, h, Default::default()),
            out: nn::linear(&p / "out", h, 1, Default::default()),
        }
    }

    /// # Shapes
    /// `x: [B, S, D]` → `[B, S]` logits of "in the top-k"; the input is detached.
    pub fn logits(&self, x: &Tensor) -> Tensor {
        self.out
            .forward(&self.hidden.forward(&x.detach()).gelu("none"))
            .squeeze_dim(-1)
    }
}
