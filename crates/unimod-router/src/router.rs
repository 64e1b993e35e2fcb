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
    /// `d → d/4 → 1` with ReLU.
    Mlp,
}

impl RouterArch {
    /// Multiply-accumulates of one score column in units of a `d → 1` linear router's (`d`),
    /// for the FLOPs count: 1, or `(d·h + h) / d` with a hidden layer of `h = d/4`.
    pub fn cost_in_router_evals(self, d_model: i64) -> f64 {
        match self {
            RouterArch::Linear => 1.0,
            RouterArch::Mlp => {
                let h = (d_model / 4).max(1) as f64;
                h * (d_model as f64 + 1.0) / d_model as f64
            }
        }
    }
}

/// Router and predictor evaluations per token of one routed layer, in units of a `d → 1`
/// router's: its score columns (one per routed task, or one shared) at the router's cost, plus
/// one causal predictor per routed task. One function for the FLOPs counted in a forward pass
/// and the analytic count, so the two cannot drift apart.
pub fn router_evals_per_token(
    cfg: &crate::RoutingConfig,
    d_model: i64,
    routers: crate::Routers,
    routed_tasks: usize,
) -> f64 {
    let columns = match routers {
        crate::Routers::PerTask => routed_tasks,
        crate::Routers::Shared | crate::Routers::Global => 1,
    } as f64;
    let predictors = if cfg.causal_predictor {
        routed_tasks as f64 * CausalPredictor::cost_in_router_evals(d_model)
    } else {
        0.0
    };
    columns * cfg.router.cost_in_router_evals(d_model) + predictors
}

/// `n` scoring heads over the same input, one per task, evaluated together (`[.., D] → [.., n]`
/// logits): a `d → n` projection, or with a hidden layer of `h` per head, one `d → n·h` matmul,
/// ReLU, and each head's own `h → 1` output. One matmul for all heads instead of one per task
/// matters on a CPU at small widths, where every op costs tens of microseconds; so does ReLU:
/// GELU's erf, forward and backward, costs as much as these heads' matmuls there.
#[derive(Debug)]
struct Heads {
    hidden: Option<(nn::Linear, i64)>,
    /// Weight `[n, in]`, bias `[n]`.
    out: nn::Linear,
    n: i64,
}

impl Heads {
    fn new(
        p: &nn::Path,
        d_model: i64,
        n: i64,
        hidden: Option<i64>,
        out: nn::LinearConfig,
    ) -> Heads {
        let hidden = hidden.map(|h| {
            let l = nn::linear(p / "hidden", d_model, n * h, Default::default());
            (l, h)
        });
        let fan_in = hidden.as_ref().map_or(d_model, |(_, h)| *h);
        Heads {
            out: nn::linear(p / "proj", fan_in, n, out),
            hidden,
            n,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        match &self.hidden {
            None => self.out.forward(x),
            Some((l, h)) => {
                let y = l.forward(x).relu();
                let mut per_head = y.size();
                per_head.pop();
                per_head.extend([self.n, *h]);
                let bias = self.out.bs.as_ref().expect("heads have a bias");
                (y.view(per_head.as_slice()) * &self.out.ws).sum_dim_intlist(-1, false, y.kind())
                    + bias
            }
        }
    }

    fn share(&self) -> Heads {
        let linear = |l: &nn::Linear| nn::Linear {
            ws: l.ws.shallow_clone(),
            bs: l.bs.as_ref().map(Tensor::shallow_clone),
        };
        Heads {
            hidden: self.hidden.as_ref().map(|(l, h)| (linear(l), *h)),
            out: linear(&self.out),
            n: self.n,
        }
    }
}

/// Scores tokens, one column per task it routes: `[.., D] → [.., n]` logits.
///
/// ```
/// use tch::{Device, Kind, Tensor, nn};
/// use unimod_router::{Router, RouterArch};
///
/// let vs = nn::VarStore::new(Device::Cpu);
/// // Two columns: UniMoD's T2I and MMU routers of one layer.
/// let router = Router::new(vs.root() / "router", 16, RouterArch::Linear, 2);
/// let x = Tensor::randn([3, 10, 16], (Kind::Float, Device::Cpu));
/// let logits = router.score(&x);
/// assert_eq!(logits.size(), [3, 10, 2]);
/// // Zero-initialised weights: within a column, every token starts at the same score.
/// let spread = &logits - logits.narrow(1, 0, 1);
/// assert_eq!(spread.abs().max().double_value(&[]), 0.0);
/// ```
#[derive(Debug)]
pub struct Router {
    heads: Heads,
}

impl Router {
    /// `n` routers (one per task; 1 for a router shared by tasks). Column `i` has the
    /// parameters `proj.weight[i]`, `proj.bias[i]` (and `hidden` rows `i·h..(i+1)·h`).
    pub fn new(p: nn::Path, d_model: i64, arch: RouterArch, n: i64) -> Router {
        // Zero-initialised output: every token starts at weight sigmoid(0) = 0.5 and the order
        // among tokens is learned from there.
        let zero = nn::LinearConfig {
            ws_init: nn::Init::Const(0.0),
            ..Default::default()
        };
        let hidden = (arch == RouterArch::Mlp).then(|| (d_model / 4).max(1));
        Router {
            heads: Heads::new(&p, d_model, n, hidden, zero),
        }
    }

    /// # Shapes
    /// `x: [B, S, D]` → `[B, S, n]` logits.
    pub fn score(&self, x: &Tensor) -> Tensor {
        self.heads.forward(x)
    }

    /// Number of score columns.
    pub fn columns(&self) -> i64 {
        self.heads.n
    }

    /// A handle on the same parameters (γ-MoD shares one router across layers).
    pub fn share(&self) -> Router {
        Router {
            heads: self.heads.share(),
        }
    }
}

/// The MoD paper's second fix for causal sampling: a small MLP per task that sees the layer
/// input under a stop-gradient and predicts top-k membership, trained without touching the
/// model's loss.
///
/// ```
/// use tch::{Device, Kind, Tensor, nn};
/// use unimod_router::CausalPredictor;
///
/// let vs = nn::VarStore::new(Device::Cpu);
/// let predictor = CausalPredictor::new(vs.root() / "predictor", 16, 2);
/// let x = Tensor::randn([3, 10, 16], (Kind::Float, Device::Cpu)).set_requires_grad(true);
/// let logits = predictor.logits(&x);
/// assert_eq!(logits.size(), [3, 10, 2]);
/// // Its input is detached: its training never reaches the model.
/// logits.sum(Kind::Float).backward();
/// assert!(!x.grad().defined());
/// ```
#[derive(Debug)]
pub struct CausalPredictor {
    heads: Heads,
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

    /// `n` predictors, one per task.
    pub fn new(p: nn::Path, d_model: i64, n: i64) -> CausalPredictor {
        CausalPredictor {
            heads: Heads::new(
                &p,
                d_model,
                n,
                Some(Self::hidden(d_model)),
                Default::default(),
            ),
        }
    }

    /// Number of predictors (logit columns).
    pub fn columns(&self) -> i64 {
        self.heads.n
    }

    /// # Shapes
    /// `x: [B, S, D]` → `[B, S, n]` logits of "in the top-k"; the input is detached.
    pub fn logits(&self, x: &Tensor) -> Tensor {
        self.heads.forward(&x.detach())
    }
}
