//! The transformer block and its parts. A block computes the *update* it adds to the residual
//! stream (`delta`), never the new stream itself, so that a routed layer can weight the update
//! of the tokens it processed and leave the others untouched.
//!
//! Mixture-of-Transformers (Liang et al., `model.mot = true`): every norm and projection of a
//! block has one copy per modality (text, image), each applied to its modality's tokens only;
//! attention stays one global call over the whole sequence.
//!
//! MoMa (`[model.moma]`): the FFN is a text and an image group of experts (crate::moma).

use crate::config::{BlockStyle, FfnKind, ModelConfig, NormKind};
use crate::moma::{ExpertTargets, MomaFfn};
use tch::{Kind, Tensor, nn, nn::Module};
use unimod_tok::batch::attention_mask;

/// A norm of the kind `model.norm` names.
#[derive(Debug)]
pub enum Norm {
    /// LayerNorm with weight and bias.
    Layer(nn::LayerNorm),
    /// RMSNorm: `x / rms(x) · w` (tch has no module for it).
    Rms {
        /// `[D]` scale.
        weight: Tensor,
        /// Added to the mean square.
        eps: f64,
    },
}

impl Norm {
    /// The norm `cfg.norm` names, at `cfg.norm_eps()`.
    pub fn new(p: nn::Path, cfg: &ModelConfig) -> Norm {
        match cfg.norm {
            NormKind::Layernorm => Norm::Layer(nn::layer_norm(
                p,
                vec![cfg.d_model],
                nn::LayerNormConfig {
                    eps: cfg.norm_eps(),
                    ..Default::default()
                },
            )),
            NormKind::Rmsnorm => Norm::Rms {
                weight: p.ones("weight", &[cfg.d_model]),
                eps: cfg.norm_eps(),
            },
        }
    }
}

impl Module for Norm {
    fn forward(&self, x: &Tensor) -> Tensor {
        match self {
            Norm::Layer(n) => n.forward(x),
            Norm::Rms { weight, eps } => {
                let ms = x.pow_tensor_scalar(2).mean_dim(-1, true, x.kind());
                x * (ms + *eps).rsqrt() * weight
            }
        }
    }
}

/// Each modality's tokens of a `[B, T]` frame (Mixture-of-Transformers): flat indices into
/// `B·T`, computed once per frame and reused by every untied module applied to it.
#[derive(Debug)]
pub struct Dispatch {
    /// `[B, T]` bool: the token is image modality (image codes, mask placeholders, row ends).
    pub image: Tensor,
    /// Flat indices of the text and of the image tokens.
    index: [Tensor; 2],
}

impl Dispatch {
    /// `image: [B, T]` bool. One host sync (`nonzero`) per frame.
    pub fn new(image: &Tensor) -> Dispatch {
        let flat = image.reshape([-1]);
        let of = |m: &Tensor| m.nonzero().squeeze_dim(1);
        Dispatch {
            image: image.shallow_clone(),
            index: [of(&flat.logical_not()), of(&flat)],
        }
    }

    /// The same frame's rows or columns picked by `pick` (a routed layer's gathered tokens).
    pub fn picked(&self, pick: impl Fn(&Tensor) -> Tensor) -> Dispatch {
        Dispatch::new(&pick(&self.image))
    }

    /// `f(m, x_m)` on each modality `m`'s tokens, put back in place.
    ///
    /// # Shapes
    /// `x: [B, T, D]` → `[B, T, D']`.
    pub fn apply(&self, x: &Tensor, f: impl Fn(usize, &Tensor) -> Tensor) -> Tensor {
        let (b, t, d) = x.size3().expect("x is [B, T, D]");
        let flat = x.reshape([b * t, d]);
        let mut out: Option<Tensor> = None;
        for (m, index) in self.index.iter().enumerate() {
            if index.numel() == 0 {
                continue;
            }
            let y = f(m, &flat.index_select(0, index));
            let o = out
                .take()
                .unwrap_or_else(|| Tensor::zeros([b * t, y.size()[1]], (y.kind(), y.device())));
            // Out of place, so that autograd sees every copy.
            out = Some(o.index_copy(0, index, &y));
        }
        let out = out.unwrap_or_else(|| f(0, &flat));
        out.view([b, t, -1])
    }
}

/// One module shared by every token, or one per modality (text, image) under
/// Mixture-of-Transformers, named `<path>/text` and `<path>/image`.
#[derive(Debug)]
pub struct PerModality<M> {
    parts: Vec<M>,
}

impl<M> PerModality<M> {
    /// One `make(p)` module, or under `cfg.mot` one per modality at `p/text` and `p/image`.
    pub fn new(p: &nn::Path, cfg: &ModelConfig, make: impl Fn(nn::Path) -> M) -> PerModality<M> {
        let parts = if cfg.mot {
            vec![make(p / "text"), make(p / "image")]
        } else {
            vec![make(p.clone())]
        };
        PerModality { parts }
    }

    /// `f` of each token's own copy; untied copies need the frame's `dispatch`.
    pub fn apply(
        &self,
        x: &Tensor,
        dispatch: Option<&Dispatch>,
        f: impl Fn(&M, &Tensor) -> Tensor,
    ) -> Tensor {
        match (self.parts.as_slice(), dispatch) {
            ([one], _) => f(one, x),
            (parts, Some(d)) => d.apply(x, |m, xm| f(&parts[m], xm)),
            (_, None) => panic!("an untied (model.mot) module was applied without a dispatch"),
        }
    }
}

impl<M: Module> PerModality<M> {
    /// Each token through its modality's module (`x: [B, T, D]`; `dispatch` from the frame
    /// under MoT, `None` without it).
    pub fn forward(&self, x: &Tensor, dispatch: Option<&Dispatch>) -> Tensor {
        self.apply(x, dispatch, |m, x| m.forward(x))
    }
}

/// A block's output projection: the default initialisation, or zeros under
/// `model.zero_out_proj` (the block then starts as the identity on the residual stream).
fn out_proj(cfg: &ModelConfig) -> nn::LinearConfig {
    let zero = cfg.zero_out_proj.then_some(nn::Init::Const(0.0));
    nn::LinearConfig {
        bias: cfg.bias,
        ws_init: zero.unwrap_or(nn::LinearConfig::default().ws_init),
        bs_init: zero,
    }
}

/// The dense FFN: GELU (Phi) or SwiGLU (Llama).
#[derive(Debug)]
pub struct Mlp {
    up: nn::Linear,
    gate: Option<nn::Linear>,
    down: nn::Linear,
}

impl Mlp {
    /// `up` (and `gate`) `d → d_ffn`, `down` `d_ffn → d`.
    pub fn new(p: nn::Path, cfg: &ModelConfig) -> Mlp {
        let c = nn::LinearConfig {
            bias: cfg.bias,
            ..Default::default()
        };
        Mlp {
            up: nn::linear(&p / "up", cfg.d_model, cfg.d_ffn, c),
            gate: (cfg.ffn == FfnKind::Swiglu)
                .then(|| nn::linear(&p / "gate", cfg.d_model, cfg.d_ffn, c)),
            down: nn::linear(&p / "down", cfg.d_ffn, cfg.d_model, out_proj(cfg)),
        }
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> Tensor {
        let h = match &self.gate {
            None => self.up.forward(x).gelu("tanh"),
            Some(g) => g.forward(x).silu() * self.up.forward(x),
        };
        self.down.forward(&h)
    }
}

/// Rotary position embedding over the first `rotary_dim` dimensions of each head
/// (GPT-NeoX half-split, as Phi and Llama use), from each token's *original* position.
#[derive(Debug)]
pub struct Rope {
    inv_freq: Tensor,
    rotary_dim: i64,
}

impl Rope {
    /// The inverse frequencies of `cfg.rotary_dim()` dimensions at base `cfg.rope_theta`.
    pub fn new(cfg: &ModelConfig, device: tch::Device) -> Rope {
        let rd = cfg.rotary_dim();
        let inv: Vec<f32> = (0..rd / 2)
            .map(|i| (1.0 / cfg.rope_theta.powf(2.0 * i as f64 / rd as f64)) as f32)
            .collect();
        Rope {
            inv_freq: Tensor::from_slice(&inv).to_device(device),
            rotary_dim: rd,
        }
    }

    /// # Shapes
    /// `x: [B, H, T, hd]`, `positions: [B, T]` → `[B, H, T, hd]`.
    pub fn apply(&self, x: &Tensor, positions: &Tensor) -> Tensor {
        if self.rotary_dim == 0 {
            return x.shallow_clone();
        }
        let half = self.rotary_dim / 2;
        let angles =
            positions.to_kind(Kind::Float).unsqueeze(-1) * self.inv_freq.unsqueeze(0).unsqueeze(0);
        let (cos, sin) = (
            angles.cos().unsqueeze(1).to_kind(x.kind()),
            angles.sin().unsqueeze(1).to_kind(x.kind()),
        );
        let x1 = x.narrow(-1, 0, half);
        let x2 = x.narrow(-1, half, half);
        let rest = x.narrow(-1, self.rotary_dim, x.size()[3] - self.rotary_dim);
        Tensor::cat(
            &[&x1 * &cos - &x2 * &sin, &x2 * &cos + &x1 * &sin, rest],
            -1,
        )
    }
}

/// The tokens entering a block and what each may see.
#[derive(Debug)]
pub struct Tokens<'a> {
    /// `[B, T]` RoPE positions.
    pub positions: &'a Tensor,
    /// `[B, T]` index of each token in the full sequence.
    pub index: &'a Tensor,
    /// `[B, T]` last sequence index each token may attend to.
    pub upto: &'a Tensor,
    /// `[B, T]` false for tokens other tokens must not see (padding, tokens a layer skips).
    pub valid: &'a Tensor,
    /// Each modality's tokens, for the untied modules of Mixture-of-Transformers and MoMa's
    /// expert groups (`None` otherwise).
    pub dispatch: Option<&'a Dispatch>,
    /// The whole sequence is present and may be looked at (training, MaskGIT): MoMa's experts
    /// choose their tokens. False when decoding causally: its auxiliary routers decide.
    pub lookahead: bool,
}

/// Keys and values of earlier tokens for incremental decoding, one per layer.
#[derive(Debug, Default)]
pub struct LayerCache {
    k: Option<Tensor>,
    v: Option<Tensor>,
    index: Option<Tensor>,
    valid: Option<Tensor>,
}

impl LayerCache {
    fn append(slot: &mut Option<Tensor>, new: Tensor, dim: i64) -> Tensor {
        let all = match slot.take() {
            None => new,
            Some(old) => Tensor::cat(&[old, new], dim),
        };
        *slot = Some(all.shallow_clone());
        all
    }

    /// Number of cached positions.
    pub fn len(&self) -> i64 {
        self.index.as_ref().map_or(0, |i| i.size()[1])
    }

    /// Nothing cached yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Attention maps of one layer, captured for analysis.
#[derive(Debug)]
pub struct AttentionMaps {
    /// `[B, H, T, K]` softmax probabilities.
    pub probs: Tensor,
    /// `[B, H, T, K]` pre-softmax scores `q·k/√d` (masked entries −inf).
    pub scores: Tensor,
    /// `[B, H, T, hd]` queries `x W_Q` of the block's tokens before RoPE (the `x W_Q,h` of the
    /// paper's ARank, Eq. 3).
    pub query: Tensor,
    /// `[B, H, T, hd]` keys `x W_K` of the block's tokens before RoPE, repeated per query head
    /// under grouped-query attention.
    pub key: Tensor,
}

/// What attention returns.
#[derive(Debug)]
pub struct AttentionOutput {
    /// `[B, T, D]` after the output projection.
    pub out: Tensor,
    /// The maps, when asked for.
    pub maps: Option<AttentionMaps>,
    /// Keys each query attended over (cached ones included).
    pub keys: i64,
}

/// Multi-head (or grouped-query) self-attention with RoPE, per-modality projections under MoT.
#[derive(Debug)]
pub struct Attention {
    /// Queries, keys and values in one projection (`d → (H + 2·H_kv)·hd`): one matmul instead
    /// of three, forward and backward.
    qkv: PerModality<nn::Linear>,
    o: PerModality<nn::Linear>,
    n_heads: i64,
    n_kv_heads: i64,
    head_dim: i64,
}

impl Attention {
    /// `qkv` `d → (H + 2·H_kv)·hd` and `o` `d → d`.
    pub fn new(p: nn::Path, cfg: &ModelConfig) -> Attention {
        let c = nn::LinearConfig {
            bias: cfg.bias,
            ..Default::default()
        };
        let qkv = (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim();
        Attention {
            qkv: PerModality::new(&(&p / "qkv"), cfg, |p| nn::linear(p, cfg.d_model, qkv, c)),
            o: PerModality::new(&(&p / "o"), cfg, |p| {
                nn::linear(p, cfg.d_model, cfg.d_model, out_proj(cfg))
            }),
            n_heads: cfg.n_heads,
            n_kv_heads: cfg.n_kv_heads,
            head_dim: cfg.head_dim(),
        }
    }

    /// # Shapes
    /// `x: [B, T, D]` → `[B, T, D]`; with a cache, the tokens attend to the cached keys too and
    /// are appended to it.
    pub fn forward(
        &self,
        x: &Tensor,
        tokens: &Tokens,
        rope: &Rope,
        cache: Option<&mut LayerCache>,
        capture: bool,
    ) -> AttentionOutput {
        let (b, t, _) = x.size3().expect("x is [B, T, D]");
        let (h, h_kv) = (self.n_heads, self.n_kv_heads);
        let qkv = self
            .qkv
            .forward(x, tokens.dispatch)
            .view([b, t, h + 2 * h_kv, self.head_dim])
            .transpose(1, 2);
        // Queries and keys rotate together: one RoPE instead of two.
        let qk = rope.apply(&qkv.narrow(1, 0, h + h_kv), tokens.positions);
        let q = qk.narrow(1, 0, h);
        let mut k = qk.narrow(1, h, h_kv);
        let mut v = qkv.narrow(1, h + h_kv, h_kv);
        let (mut k_index, mut k_valid) =
            (tokens.index.shallow_clone(), tokens.valid.shallow_clone());
        if let Some(c) = cache {
            k = LayerCache::append(&mut c.k, k, 2);
            v = LayerCache::append(&mut c.v, v, 2);
            k_index = LayerCache::append(&mut c.index, k_index, 1);
            k_valid = LayerCache::append(&mut c.valid, k_valid, 1);
        }
        let mask = attention_mask(tokens.index, tokens.upto, &k_index, &k_valid).unsqueeze(1);
        let groups = self.n_heads / self.n_kv_heads;
        let (out, maps) = if capture {
            let repeat = |t: &Tensor| t.repeat_interleave_self_int(groups, 1, None);
            let (query, key) = (qkv.narrow(1, 0, h), repeat(&qkv.narrow(1, h, h_kv)));
            let (k, v) = (repeat(&k), repeat(&v));
            let scores = (q.matmul(&k.transpose(-2, -1)) / (self.head_dim as f64).sqrt())
                .masked_fill(&mask.logical_not(), f64::NEG_INFINITY);
            let probs = scores.softmax(-1, scores.kind());
            (
                probs.matmul(&v),
                Some(AttentionMaps {
                    probs,
                    scores,
                    query,
                    key,
                }),
            )
        } else {
            let out = Tensor::scaled_dot_product_attention(
                &q,
                &k,
                &v,
                Some(&mask),
                0.0,
                false,
                None,
                groups > 1,
            );
            (out, None)
        };
        let keys = k.size()[2];
        let out = out
            .transpose(1, 2)
            .contiguous()
            .view([b, t, self.n_heads * self.head_dim]);
        AttentionOutput {
            out: self.o.forward(&out, tokens.dispatch),
            maps,
            keys,
        }
    }
}

/// One transformer block: attention and MLP with pre-norms, parallel or sequential.
#[derive(Debug)]
pub struct Block {
    norm1: PerModality<Norm>,
    norm2: Option<PerModality<Norm>>,
    attn: Attention,
    ffn: Ffn,
}

/// A block's feed-forward part.
#[derive(Debug)]
pub enum Ffn {
    /// One MLP for every token, or one per modality under Mixture-of-Transformers.
    Mlp(PerModality<Mlp>),
    /// MoMa's modality-aware experts.
    Moma(Box<MomaFfn>),
}

/// What the feed-forward part did, for the FLOPs count and MoMa's auxiliary routers.
#[derive(Debug, Default)]
pub struct FfnWork {
    /// Token-slots through one FFN's worth of weights (each token once for an MLP; each expert's
    /// taken tokens under MoMa).
    pub tokens: f64,
    /// Router evaluations (units of a `d → 1` router's).
    pub router_tokens: f64,
    /// MoMa's expert choices, the targets of its auxiliary routers.
    pub targets: Vec<ExpertTargets>,
}

impl Ffn {
    /// # Shapes
    /// `h: [B, T, D]` → `[B, T, D]`.
    fn forward(&self, h: &Tensor, tokens: &Tokens) -> (Tensor, FfnWork) {
        match self {
            Ffn::Mlp(m) => {
                let (b, t, _) = h.size3().expect("h is [B, T, D]");
                let work = FfnWork {
                    tokens: (b * t) as f64,
                    ..Default::default()
                };
                (m.forward(h, tokens.dispatch), work)
            }
            Ffn::Moma(m) => {
                let d = tokens
                    .dispatch
                    .expect("the model dispatches modalities when model.moma is set");
                let o = m.forward(h, &d.image, tokens.valid, tokens.lookahead);
                let work = FfnWork {
                    tokens: o.slots,
                    router_tokens: o.router_tokens,
                    targets: o.targets,
                };
                (o.out, work)
            }
        }
    }
}

/// What a block adds to the residual stream, and what it saw.
#[derive(Debug)]
pub struct BlockDelta {
    /// `[B, T, D]` residual update.
    pub delta: Tensor,
    /// Attention maps, when asked for.
    pub attention: Option<AttentionMaps>,
    /// Keys each query attended over (cached ones included), for the FLOPs count.
    pub keys: i64,
    /// What the FFN did.
    pub ffn: FfnWork,
}

impl Block {
    /// Norms, attention and FFN under `p`, per `cfg` (MoT copies, MoMa experts).
    pub fn new(p: nn::Path, cfg: &ModelConfig) -> Block {
        let norm = |name| PerModality::new(&(&p / name), cfg, |p| Norm::new(p, cfg));
        Block {
            norm1: norm("norm1"),
            norm2: (cfg.block == BlockStyle::Sequential).then(|| norm("norm2")),
            attn: Attention::new(&p / "attn", cfg),
            ffn: match &cfg.moma {
                None => Ffn::Mlp(PerModality::new(&(&p / "mlp"), cfg, |p| Mlp::new(p, cfg))),
                Some(m) => Ffn::Moma(Box::new(MomaFfn::new(&p / "moma", cfg, m))),
            },
        }
    }

    /// MoMa experts in the FFN.
    pub fn has_experts(&self) -> bool {
        matches!(self.ffn, Ffn::Moma(_))
    }

    /// # Shapes
    /// `x: [B, T, D]` → delta `[B, T, D]`.
    pub fn delta(
        &self,
        x: &Tensor,
        tokens: &Tokens,
        rope: &Rope,
        cache: Option<&mut LayerCache>,
        capture: bool,
    ) -> BlockDelta {
        let d = tokens.dispatch;
        let h = self.norm1.forward(x, d);
        let AttentionOutput {
            out: a,
            maps: attention,
            keys,
        } = self.attn.forward(&h, tokens, rope, cache, capture);
        let (m, ffn) = match &self.norm2 {
            None => self.ffn.forward(&h, tokens),
            Some(n2) => self.ffn.forward(&n2.forward(&(x + &a), d), tokens),
        };
        BlockDelta {
            delta: a + m,
            attention,
            keys,
            ffn,
        }
    }
}
