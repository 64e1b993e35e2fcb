//! MoMa (Lin et al., arXiv 2407.21770): modality-aware mixture of experts in the FFN.
//!
//! Every block's FFN becomes two groups of experts, one for text tokens and one for image
//! tokens (level 1, deterministic). Within its group, each expert *chooses* its tokens
//! (level 2, learned): per sequence, expert `e` takes the top `k = max(1, ⌈c_e · N⌉)` of the
//! sequence's `N` tokens of its modality by sigmoid score `σ(w_e · x)`, and a token's output is
//! the sum of `σ(score) · FFN_e(x)` over the experts that took it; a token no expert took adds
//! nothing (it rides the residual). `c_e = 1/E` by default: every expert sees its share and the
//! load is balanced by construction. Attention stays shared.
//!
//! Expert choice is taken within each sequence, never across the samples of a batch, so a
//! sample's output never depends on the others. It looks ahead, so decoding with a KV cache
//! (and any causal mode) decides by an **auxiliary router** per group instead: a small MLP on
//! the stop-gradient input, trained with BCE to predict each expert's choice (the paper's
//! §2.4); the model reports its agreement and the loss with it against expert choice.
//!
//! A group of one expert at capacity 1 routes nothing: every token of the modality is taken at
//! weight 1, which is Mixture-of-Transformers' FFN untying (the paper's 1t1i baseline).
//!
//! Experts are packed (`[E, D, H]` weights): each group runs as one batched matmul over the
//! tokens its experts took, with no host loop over experts.

use crate::config::{FfnKind, ModelConfig};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor, nn, nn::Module};

/// `[model.moma]`: MoMa's modality-aware experts in every block's FFN.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MomaConfig {
    /// Experts of the text group, each the shape of the dense FFN.
    pub text_experts: i64,
    /// Experts of the image group.
    pub image_experts: i64,
    /// `c_e`, the fraction of a sequence's tokens of its modality each expert takes; absent:
    /// `1/E` of the expert's group (the paper's default).
    pub capacity: Option<f64>,
}

impl Default for MomaConfig {
    /// The paper's MoMa 1.4B: four text and four image experts.
    fn default() -> Self {
        MomaConfig {
            text_experts: 4,
            image_experts: 4,
            capacity: None,
        }
    }
}

impl MomaConfig {
    /// `(experts, capacity)` of the text (0) and image (1) groups.
    pub fn groups(&self) -> [(i64, f64); 2] {
        [self.text_experts, self.image_experts]
            .map(|e| (e, self.capacity.unwrap_or(1.0 / e.max(1) as f64)))
    }

    /// `Err((field, why))` when out of range.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        for (field, e) in [
            ("moma.text_experts", self.text_experts),
            ("moma.image_experts", self.image_experts),
        ] {
            if !(1..=64).contains(&e) {
                return Err((field, format!("{e}: must be in [1, 64]")));
            }
        }
        match self.capacity {
            Some(c) if !(c > 0.0 && c <= 1.0) => Err((
                "moma.capacity",
                format!("{c}: must be in (0, 1], or left out for 1/experts"),
            )),
            _ => Ok(()),
        }
    }

    /// Gate columns: the experts of the groups that route.
    fn columns(&self) -> i64 {
        self.groups()
            .iter()
            .filter(|(e, c)| routes(*e, *c))
            .map(|(e, _)| e)
            .sum()
    }

    /// Router evaluations per token (units of a `d → 1` router's `d` multiply-accumulates):
    /// the gates of the groups that route, and the auxiliary router. Both are computed for
    /// every token of the frame whatever its modality (one matmul for both groups).
    pub fn router_evals_per_token(&self, d_model: i64) -> f64 {
        let n = self.columns();
        if n == 0 {
            return 0.0;
        }
        let h = AuxRouter::hidden(d_model);
        n as f64 + (d_model * h + h * n) as f64 / d_model as f64
    }

    /// Expert token-slots computed per sequence with `n` tokens of each modality (text, image):
    /// every expert of a group takes `max(1, ⌈c · n⌉)` of its modality's tokens (all of them
    /// in a group that does not route).
    pub fn slots(&self, n: [usize; 2]) -> f64 {
        self.groups()
            .iter()
            .zip(n)
            .map(|((e, c), n)| *e as f64 * unimod_router::tokens_kept(*c, n) as f64)
            .sum()
    }
}

/// Predicts, per token and expert, whether the expert would take the token: `d → h → E` with
/// ReLU, one hidden layer shared by every expert (a hidden layer per expert, as MoD's causal
/// predictor has per task, would cost a quarter of an FFN at eight experts), on the detached
/// input so that it never changes what it imitates.
#[derive(Debug)]
struct AuxRouter {
    hidden: nn::Linear,
    out: nn::Linear,
}

impl AuxRouter {
    fn hidden(d_model: i64) -> i64 {
        (d_model / 4).max(8)
    }

    fn new(p: nn::Path, d_model: i64, n: i64) -> AuxRouter {
        let h = Self::hidden(d_model);
        AuxRouter {
            hidden: nn::linear(&p / "hidden", d_model, h, Default::default()),
            out: nn::linear(&p / "out", h, n, Default::default()),
        }
    }

    /// `x: [B, T, D]` → `[B, T, n]` logits of "the expert takes the token".
    fn logits(&self, x: &Tensor) -> Tensor {
        self.out.forward(&self.hidden.forward(&x.detach()).relu())
    }
}

/// A group routes unless it is one expert that takes everything.
fn routes(experts: i64, capacity: f64) -> bool {
    experts > 1 || capacity < 1.0
}

/// One modality's experts, packed.
#[derive(Debug)]
struct Experts {
    /// `[E, D, H]`, `[E, 1, H]` (bias), SwiGLU's gate likewise, `[E, H, D]`, `[E, 1, D]`.
    up: Tensor,
    up_bias: Option<Tensor>,
    gate: Option<Tensor>,
    gate_bias: Option<Tensor>,
    down: Tensor,
    down_bias: Option<Tensor>,
    n: i64,
    capacity: f64,
}

impl Experts {
    fn new(p: nn::Path, cfg: &ModelConfig, n: i64, capacity: f64) -> Experts {
        let (d, h) = (cfg.d_model, cfg.d_ffn);
        // nn::linear's default initialisation, per expert: U(±√(6/fan_in)) weights and
        // U(±1/√fan_in) biases.
        // `model.zero_out_proj` zeroes the down projections as it does the dense FFN's.
        let init = |name: &str, b: f64| match name {
            "down" | "down_bias" if cfg.zero_out_proj => nn::Init::Const(0.0),
            _ => nn::Init::Uniform { lo: -b, up: b },
        };
        let weight = |name: &str, fan_in: i64, fan_out: i64| {
            let b = (6.0 / fan_in as f64).sqrt();
            p.var(name, &[n, fan_in, fan_out], init(name, b))
        };
        let bias = |name: &str, fan_in: i64, fan_out: i64| {
            let b = 1.0 / (fan_in as f64).sqrt();
            cfg.bias
                .then(|| p.var(name, &[n, 1, fan_out], init(name, b)))
        };
        let swiglu = cfg.ffn == FfnKind::Swiglu;
        Experts {
            up: weight("up", d, h),
            up_bias: bias("up_bias", d, h),
            gate: swiglu.then(|| weight("gate", d, h)),
            gate_bias: if swiglu {
                bias("gate_bias", d, h)
            } else {
                None
            },
            down: weight("down", h, d),
            down_bias: bias("down_bias", h, d),
            n,
            capacity,
        }
    }

    /// Every expert on its own tokens: `x: [E, N, D]` → `[E, N, D]`, one batched matmul per
    /// projection. The same function as [`crate::block::Mlp`] per expert.
    fn forward(&self, x: &Tensor) -> Tensor {
        let affine = |w: &Tensor, b: &Option<Tensor>| {
            let y = x.bmm(w);
            match b {
                Some(b) => y + b,
                None => y,
            }
        };
        let h = match &self.gate {
            None => affine(&self.up, &self.up_bias).gelu("tanh"),
            Some(g) => affine(g, &self.gate_bias).silu() * affine(&self.up, &self.up_bias),
        };
        let y = h.bmm(&self.down);
        match &self.down_bias {
            Some(b) => y + b,
            None => y,
        }
    }
}

/// Which tokens each expert of a group took, and at what weight.
///
/// # Shapes
/// `index, weight: [B, E, K]` with `K` the most tokens any expert took in any sample; slots
/// past a sample's own count have weight 0.
#[derive(Debug)]
pub struct ExpertSelection {
    /// Sequence positions each expert took, ascending.
    pub index: Tensor,
    /// Each taken token's sigmoid router score (0 in unused slots).
    pub weight: Tensor,
    /// `[B, E, K]` the slot holds a token the expert took.
    pub taken: Tensor,
}

/// Per sample and expert, the `k: [B, E]` best of the `eligible: [B, T, E]` tokens by
/// `logits: [B, T, E]`, in one top-k over the sequence (never across samples). `weighted`:
/// weights are `σ(logit)`, else 1.
pub fn choose(logits: &Tensor, eligible: &Tensor, k: &Tensor, weighted: bool) -> ExpertSelection {
    let (b, _, e) = logits.size3().expect("logits are [B, T, E]");
    let width = k.max().int64_value(&[]);
    let masked = logits
        .masked_fill(&eligible.logical_not(), f64::NEG_INFINITY)
        .permute([0, 2, 1]);
    let (score, index) = masked.topk(width, -1, true, true);
    let rank = Tensor::arange(width, (Kind::Int64, logits.device())).view([1, 1, width]);
    let taken = rank.lt_tensor(&k.unsqueeze(-1));
    let taken_f = taken.to_kind(logits.kind());
    let weight = if weighted {
        // Masked scores are −∞ only in slots not taken; zero them before σ so that no NaN
        // reaches the gradient.
        score.masked_fill(&taken.logical_not(), 0.0).sigmoid() * &taken_f
    } else {
        taken_f
    };
    debug_assert_eq!(index.size(), [b, e, width]);
    ExpertSelection {
        index,
        weight,
        taken,
    }
}

/// What an auxiliary router learns from, for one group of one layer (expert-choice mode).
#[derive(Debug)]
pub struct ExpertTargets {
    /// `[B, T, E]` auxiliary-router logits (with their graph).
    pub aux_logits: Tensor,
    /// `[B, T, E]` the expert took the token.
    pub taken: Tensor,
    /// `[B, T, E]` the token is of the group's modality (and not padding).
    pub member: Tensor,
}

/// What the MoMa FFN returns.
#[derive(Debug)]
pub struct MomaOutput {
    /// `[B, T, D]` the FFN's output.
    pub out: Tensor,
    /// Expert token-slots computed (padding slots of the batched matmul included).
    pub slots: f64,
    /// Router evaluations (units of a `d → 1` router's).
    pub router_tokens: f64,
    /// One entry per routing group, in expert-choice mode only.
    pub targets: Vec<ExpertTargets>,
}

/// The FFN of a MoMa block: a text and an image group of experts.
#[derive(Debug)]
pub struct MomaFfn {
    groups: [Experts; 2],
    /// `d → Σ E` sigmoid gates of the groups that route (text columns first).
    gate: Option<nn::Linear>,
    /// The auxiliary router of the same columns.
    aux: Option<AuxRouter>,
    cfg: MomaConfig,
    d_model: i64,
}

impl MomaFfn {
    /// A text and an image group of experts, each expert the dense FFN's shape, with their
    /// gates and auxiliary routers.
    pub fn new(p: nn::Path, cfg: &ModelConfig, moma: &MomaConfig) -> MomaFfn {
        let [(et, ct), (ei, ci)] = moma.groups();
        let columns = moma.columns();
        let gate_cfg = nn::LinearConfig {
            bias: false,
            ..Default::default()
        };
        MomaFfn {
            groups: [
                Experts::new(&p / "text", cfg, et, ct),
                Experts::new(&p / "image", cfg, ei, ci),
            ],
            gate: (columns > 0).then(|| nn::linear(&p / "gate", cfg.d_model, columns, gate_cfg)),
            aux: (columns > 0).then(|| AuxRouter::new(&p / "aux_router", cfg.d_model, columns)),
            cfg: *moma,
            d_model: cfg.d_model,
        }
    }

    /// # Shapes
    /// `x: [B, T, D]`, `image, valid: [B, T]` bool → `out: [B, T, D]`. `lookahead`: the whole
    /// sequence is present (training, MaskGIT), so experts choose; otherwise each token is
    /// decided on its own by the auxiliary routers.
    pub fn forward(
        &self,
        x: &Tensor,
        image: &Tensor,
        valid: &Tensor,
        lookahead: bool,
    ) -> MomaOutput {
        let (b, t, d) = x.size3().expect("x is [B, T, D]");
        let gate = self.gate.as_ref().map(|g| g.forward(x));
        let aux = self.aux.as_ref().map(|a| a.logits(x));
        let mut out = x.zeros_like();
        let (mut slots, mut targets, mut column) = (0.0, Vec::new(), 0);
        for (m, experts) in self.groups.iter().enumerate() {
            let of_m = if m == 1 {
                image.shallow_clone()
            } else {
                image.logical_not()
            };
            let member = of_m
                .logical_and(valid)
                .unsqueeze(-1)
                .expand([b, t, experts.n], false);
            let routed = routes(experts.n, experts.capacity);
            let cols = |l: &Option<Tensor>| {
                l.as_ref()
                    .filter(|_| routed)
                    .map(|l| l.narrow(-1, column, experts.n))
            };
            let (logits, aux_logits) = (cols(&gate), cols(&aux));
            if routed {
                column += experts.n;
            }
            let logits =
                logits.unwrap_or_else(|| Tensor::zeros([b, t, experts.n], (x.kind(), x.device())));
            let (eligible, k) = match (&aux_logits, lookahead) {
                (Some(a), false) => {
                    let e = member.logical_and(&a.gt(0.0));
                    let k = e.sum_dim_intlist(1, false, Kind::Int64);
                    (e, k)
                }
                _ => {
                    let n = member.select(2, 0).sum_dim_intlist(1, false, Kind::Double);
                    let k = (&n * experts.capacity).ceil().clamp_min(1.0).minimum(&n);
                    let k = k
                        .to_kind(Kind::Int64)
                        .unsqueeze(1)
                        .expand([b, experts.n], false);
                    (member.shallow_clone(), k)
                }
            };
            let sel = choose(&logits, &eligible, &k, routed);
            let width = sel.index.size()[2];
            if width == 0 {
                continue;
            }
            // [B, E, K] → [E, B·K, D]: each expert's tokens, one batched matmul for all.
            let flat = sel.index.reshape([b, -1]);
            let x_sel = x
                .gather(
                    1,
                    &flat.unsqueeze(-1).expand([b, experts.n * width, d], false),
                    false,
                )
                .view([b, experts.n, width, d])
                .permute([1, 0, 2, 3])
                .reshape([experts.n, b * width, d]);
            let y = experts
                .forward(&x_sel)
                .view([experts.n, b, width, d])
                .permute([1, 0, 2, 3])
                * sel.weight.unsqueeze(-1);
            out = out.scatter_add(
                1,
                &flat.unsqueeze(-1).expand([b, experts.n * width, d], false),
                &y.reshape([b, experts.n * width, d]),
            );
            slots += (b * experts.n * width) as f64;
            if let (Some(a), true, true) = (aux_logits, lookahead, routed) {
                let taken = Tensor::zeros([b, experts.n, t], (Kind::Bool, x.device()))
                    .scatter(2, &sel.index, &sel.taken)
                    .permute([0, 2, 1]);
                targets.push(ExpertTargets {
                    aux_logits: a,
                    taken,
                    member,
                });
            }
        }
        MomaOutput {
            out,
            slots,
            router_tokens: (b * t) as f64 * self.cfg.router_evals_per_token(self.d_model),
            targets,
        }
    }
}

/// Mean BCE of the auxiliary routers towards the experts' choices over the member tokens of
/// one layer's groups; `None` without targets.
pub fn aux_router_bce(targets: &[&ExpertTargets]) -> Option<Tensor> {
    if targets.is_empty() {
        return None;
    }
    let cat = |f: fn(&ExpertTargets) -> &Tensor| {
        Tensor::cat(
            &targets
                .iter()
                .map(|t| f(t).reshape([-1]))
                .collect::<Vec<_>>(),
            0,
        )
    };
    let (logits, taken, member) = (
        cat(|t| &t.aux_logits),
        cat(|t| &t.taken),
        cat(|t| &t.member),
    );
    Some(
        unimod_router::select::membership_bce(
            &logits.unsqueeze(0),
            &taken.unsqueeze(0),
            &member.unsqueeze(0),
        )
        .squeeze(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::{Dispatch, Mlp, PerModality};
    use tch::{Device, nn::OptimizerConfig};

    fn cfg(ffn: FfnKind) -> ModelConfig {
        ModelConfig {
            d_model: 16,
            d_ffn: 24,
            ffn,
            ..Default::default()
        }
    }

    fn moma(text_experts: i64, image_experts: i64, capacity: Option<f64>) -> MomaConfig {
        MomaConfig {
            text_experts,
            image_experts,
            capacity,
        }
    }

    /// `[3, 10]` frames: image tokens in the middle of each, padding at the end of the last.
    fn frame() -> (Tensor, Tensor, Tensor) {
        tch::manual_seed(7);
        let x = Tensor::randn([3, 10, 16], tch::kind::FLOAT_CPU);
        let image = Tensor::from_slice(&[
            false, false, true, true, true, true, true, false, false, false,
        ])
        .view([1, 10])
        .repeat([3, 1]);
        let valid = Tensor::ones([3, 10], (Kind::Bool, Device::Cpu));
        let _ = valid.narrow(1, 8, 2).narrow(0, 2, 1).fill_(0);
        (x, image, valid)
    }

    /// The packed path written as the paper's equation, one sample, group and expert at a
    /// time: a token's output is Σ over the experts that took it of σ(score) · FFN_e(x). An
    /// expert takes its top k by score, or with `causal`, the tokens its auxiliary router picks.
    fn readable(ffn: &MomaFfn, x: &Tensor, image: &Tensor, valid: &Tensor, causal: bool) -> Tensor {
        let (b, t, _) = x.size3().unwrap();
        let gate = ffn.gate.as_ref().unwrap().forward(x);
        let aux = ffn.aux.as_ref().unwrap().logits(x);
        let out = x.zeros_like();
        let mut column = 0;
        for (m, experts) in ffn.groups.iter().enumerate() {
            for s in 0..b {
                let members: Vec<i64> = (0..t)
                    .filter(|&i| {
                        bool::try_from(valid.get(s).get(i)).unwrap()
                            && bool::try_from(image.get(s).get(i)).unwrap() == (m == 1)
                    })
                    .collect();
                let k = unimod_router::tokens_kept(experts.capacity, members.len());
                for e in 0..experts.n {
                    let score = |i: i64| f64::try_from(gate.get(s).get(i).get(column + e)).unwrap();
                    let mut ranked = members.clone();
                    ranked.sort_by(|a, b| score(*b).total_cmp(&score(*a)));
                    if causal {
                        let picks = |i: &i64| {
                            f64::try_from(aux.get(s).get(*i).get(column + e)).unwrap() > 0.0
                        };
                        ranked.retain(picks);
                    }
                    let k = if causal { ranked.len() } else { k };
                    let one = |w: &Tensor| w.narrow(0, e, 1);
                    let single = Experts {
                        up: one(&experts.up),
                        up_bias: experts.up_bias.as_ref().map(one),
                        gate: experts.gate.as_ref().map(one),
                        gate_bias: experts.gate_bias.as_ref().map(one),
                        down: one(&experts.down),
                        down_bias: experts.down_bias.as_ref().map(one),
                        n: 1,
                        capacity: 1.0,
                    };
                    for &i in &ranked[..k] {
                        let xi = x.get(s).get(i).view([1, 1, -1]);
                        let w = 1.0 / (1.0 + (-score(i)).exp());
                        let mut row = out.get(s).get(i);
                        row += single.forward(&xi).view([-1]) * w;
                    }
                }
            }
            column += experts.n;
        }
        out
    }

    #[test]
    fn every_taken_token_gets_exactly_its_weighted_sum_of_experts() {
        for ffn_kind in [FfnKind::Gelu, FfnKind::Swiglu] {
            let c = cfg(ffn_kind);
            let vs = nn::VarStore::new(Device::Cpu);
            let ffn = MomaFfn::new(vs.root(), &c, &moma(3, 2, Some(0.4)));
            // Random auxiliary routers, so that the causal picks are mixed.
            tch::no_grad(|| {
                for (name, mut v) in vs.variables() {
                    if name.contains("aux_router") {
                        v.copy_(&Tensor::randn(v.size(), tch::kind::FLOAT_CPU));
                    }
                }
            });
            let (x, image, valid) = frame();
            for causal in [false, true] {
                let o = ffn.forward(&x, &image, &valid, !causal);
                let want = tch::no_grad(|| readable(&ffn, &x, &image, &valid, causal));
                assert!(
                    o.out.allclose(&want, 1e-5, 1e-6, false),
                    "{ffn_kind:?}, causal {causal}: max diff {}",
                    (&o.out - &want).abs().max().double_value(&[])
                );
            }
        }
    }

    #[test]
    fn each_expert_takes_its_share_of_each_sequence_and_never_padding() {
        let c = cfg(FfnKind::Gelu);
        let vs = nn::VarStore::new(Device::Cpu);
        let ffn = MomaFfn::new(vs.root(), &c, &moma(4, 2, None));
        let (x, image, valid) = frame();
        let o = ffn.forward(&x, &image, &valid, true);
        // text: 5, 5 and 3 valid tokens at c = 1/4 → 2, 2, 1 each; image: 5 at 1/2 → 3.
        let per_sample = |t: &ExpertTargets| {
            Vec::<i64>::try_from(t.taken.sum_dim_intlist(1, false, Kind::Int64).reshape([-1]))
                .unwrap()
        };
        assert_eq!(
            per_sample(&o.targets[0]),
            [2, 2, 2, 2, 2, 2, 2, 2, 1, 1, 1, 1]
        );
        assert_eq!(per_sample(&o.targets[1]), [3, 3, 3, 3, 3, 3]);
        for t in &o.targets {
            assert!(
                t.taken
                    .logical_and(&t.member.logical_not())
                    .sum(Kind::Int64)
                    .int64_value(&[])
                    == 0
            );
        }
        let padding = valid.logical_not().unsqueeze(-1).to_kind(Kind::Float);
        assert_eq!(
            (&o.out * padding).abs().sum(Kind::Float).double_value(&[]),
            0.0
        );
    }

    #[test]
    fn expert_choice_never_crosses_samples() {
        let c = cfg(FfnKind::Gelu);
        let vs = nn::VarStore::new(Device::Cpu);
        let ffn = MomaFfn::new(vs.root(), &c, &moma(2, 2, None));
        let (x, image, valid) = frame();
        let before = ffn.forward(&x, &image, &valid, true).out;
        // A far larger sample 1 would win every expert's choice if samples competed.
        let y = x.copy();
        let _ = y.get(1).g_mul_scalar_(100.0);
        let after = ffn.forward(&y, &image, &valid, true).out;
        for s in [0, 2] {
            assert!(before.get(s).equal(&after.get(s)), "sample {s} changed");
        }
    }

    #[test]
    fn one_expert_at_capacity_one_is_mot_ffn_untying() {
        for ffn_kind in [FfnKind::Gelu, FfnKind::Swiglu] {
            let c = cfg(ffn_kind);
            let untied_cfg = ModelConfig {
                mot: true,
                ..c.clone()
            };
            let vs = nn::VarStore::new(Device::Cpu);
            let mlps = PerModality::new(&(vs.root() / "mlp"), &untied_cfg, |p| Mlp::new(p, &c));
            let ffn = MomaFfn::new(vs.root() / "moma", &c, &moma(1, 1, Some(1.0)));
            assert!(ffn.gate.is_none() && ffn.aux.is_none());
            let vars = vs.variables();
            tch::no_grad(|| {
                for m in ["text", "image"] {
                    for (mat, packed) in [("up", "up"), ("gate", "gate"), ("down", "down")] {
                        let Some(w) = vars.get(&format!("mlp.{m}.{mat}.weight")) else {
                            continue;
                        };
                        let mut dst = vars[&format!("moma.{m}.{packed}")].shallow_clone();
                        dst.copy_(&w.tr().unsqueeze(0));
                        let b = &vars[&format!("mlp.{m}.{mat}.bias")];
                        let mut dst = vars[&format!("moma.{m}.{packed}_bias")].shallow_clone();
                        dst.copy_(&b.view([1, 1, -1]));
                    }
                }
            });
            let (x, image, valid) = frame();
            let x = x.set_requires_grad(true);
            let want = mlps.forward(&x, Some(&Dispatch::new(&image))) * valid.unsqueeze(-1);
            let got = ffn.forward(&x, &image, &valid, true).out;
            assert!(got.allclose(&want, 1e-6, 1e-6, false), "{ffn_kind:?}");
            let gw = Tensor::run_backward(&[want.sum(Kind::Float)], &[&x], true, false);
            let gg = Tensor::run_backward(&[got.sum(Kind::Float)], &[&x], false, false);
            assert!(
                gw[0].allclose(&gg[0], 1e-6, 1e-6, false),
                "{ffn_kind:?}: gradients"
            );
        }
    }

    /// Decoding decides by the auxiliary routers: trained on the experts' choices (BCE, their
    /// input detached), they come to agree with them.
    #[test]
    fn auxiliary_routers_learn_the_experts_choices() {
        let c = cfg(FfnKind::Gelu);
        let vs = nn::VarStore::new(Device::Cpu);
        let ffn = MomaFfn::new(vs.root(), &c, &moma(2, 2, None));
        let mut opt = nn::Adam::default().build(&vs, 1e-2).unwrap();
        tch::manual_seed(1);
        let x = Tensor::randn([16, 10, 16], tch::kind::FLOAT_CPU);
        let (_, image, _) = frame();
        let image = image.narrow(0, 0, 1).repeat([16, 1]);
        let valid = Tensor::ones([16, 10], (Kind::Bool, Device::Cpu));
        let agreement = |o: &MomaOutput| {
            let (mut hit, mut all) = (0, 0);
            for t in &o.targets {
                let pred = t.aux_logits.gt(0.0);
                hit += pred
                    .eq_tensor(&t.taken)
                    .logical_and(&t.member)
                    .sum(Kind::Int64)
                    .int64_value(&[]);
                all += t.member.sum(Kind::Int64).int64_value(&[]);
            }
            hit as f64 / all as f64
        };
        let untrained = agreement(&tch::no_grad(|| ffn.forward(&x, &image, &valid, true)));
        for _ in 0..300 {
            let o = ffn.forward(&x, &image, &valid, true);
            let refs: Vec<&ExpertTargets> = o.targets.iter().collect();
            let loss = aux_router_bce(&refs).unwrap();
            // The loss reaches the auxiliary routers only (their input is detached, the choices
            // are booleans), so the experts' choices stay the target.
            opt.backward_step(&loss);
        }
        let a = agreement(&tch::no_grad(|| ffn.forward(&x, &image, &valid, true)));
        assert!(
            a > 0.9 && a > untrained + 0.2,
            "agreement {untrained} → {a}"
        );
    }

    #[test]
    fn bad_values_are_refused_by_name() {
        assert!(moma(0, 4, None).check().unwrap_err().0 == "moma.text_experts");
        assert!(moma(4, 65, None).check().unwrap_err().0 == "moma.image_experts");
        assert!(moma(4, 4, Some(0.0)).check().unwrap_err().0 == "moma.capacity");
        assert!(moma(4, 4, Some(1.5)).check().is_err());
        assert!(moma(4, 4, Some(0.25)).check().is_ok());
        assert_eq!(moma(4, 2, None).groups(), [(4, 0.25), (2, 0.5)]);
        // 10 text tokens at 1/4 → 3 each; 6 image tokens at 1/2 → 3 each.
        assert_eq!(moma(4, 2, None).slots([10, 6]), 4.0 * 3.0 + 2.0 * 3.0);
    }
}
