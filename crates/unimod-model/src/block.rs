//! The transformer block and its parts. A block computes the *update* it adds to the residual
//! stream (`delta`), never the new stream itself, so that a routed layer can weight the update
//! of the tokens it processed and leave the others untouched.

use crate::config::{BlockStyle, FfnKind, ModelConfig, NormKind};
use tch::{Kind, Tensor, nn, nn::Module};
use unimod_tok::batch::attention_mask;

#[derive(Debug)]
pub enum Norm {
    Layer(nn::LayerNorm),
    /// RMSNorm: `x / rms(x) · w` (tch has no module for it).
    Rms {
        weight: Tensor,
    },
}

impl Norm {
    pub fn new(p: nn::Path, cfg: &ModelConfig) -> Norm {
        match cfg.norm {
            NormKind::Layernorm => {
                Norm::Layer(nn::layer_norm(p, vec![cfg.d_model], Default::default()))
            }
            NormKind::Rmsnorm => Norm::Rms {
                weight: p.ones("weight", &[cfg.d_model]),
            },
        }
    }
}

impl Module for Norm {
    fn forward(&self, x: &Tensor) -> Tensor {
        match self {
            Norm::Layer(n) => n.forward(x),
            Norm::Rms { weight } => {
                let ms = x.pow_tensor_scalar(2).mean_dim(-1, true, x.kind());
                x * (ms + 1e-6).rsqrt() * weight
            }
        }
    }
}

#[derive(Debug)]
pub struct Mlp {
    up: nn::Linear,
    gate: Option<nn::Linear>,
    down: nn::Linear,
}

impl Mlp {
    pub fn new(p: nn::Path, cfg: &ModelConfig) -> Mlp {
        let c = nn::LinearConfig {
            bias: cfg.bias,
            ..Default::default()
        };
        Mlp {
            up: nn::linear(&p / "up", cfg.d_model, cfg.d_ffn, c),
            gate: (cfg.ffn == FfnKind::Swiglu)
                .then(|| nn::linear(&p / "gate", cfg.d_model, cfg.d_ffn, c)),
            down: nn::linear(&p / "down", cfg.d_ffn, cfg.d_model, c),
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
    pub maps: Option<AttentionMaps>,
    /// Keys each query attended over (cached ones included).
    pub keys: i64,
}

#[derive(Debug)]
pub struct Attention {
    /// Queries, keys and values in one projection (`d → (H + 2·H_kv)·hd`): one matmul instead
    /// of three, forward and backward.
    qkv: nn::Linear,
    o: nn::Linear,
    n_heads: i64,
    n_kv_heads: i64,
    head_dim: i64,
}

impl Attention {
    pub fn new(p: nn::Path, cfg: &ModelConfig) -> Attention {
        let c = nn::LinearConfig {
            bias: cfg.bias,
            ..Default::default()
        };
        let qkv = (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim();
        Attention {
            qkv: nn::linear(&p / "qkv", cfg.d_model, qkv, c),
            o: nn::linear(&p / "o", cfg.d_model, cfg.d_model, c),
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
            .forward(x)
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
            out: self.o.forward(&out),
            maps,
            keys,
        }
    }
}

/// One transformer block: attention and MLP with pre-norms, parallel or sequential.
#[derive(Debug)]
pub struct Block {
    norm1: Norm,
    norm2: Option<Norm>,
    attn: Attention,
    mlp: Mlp,
}

/// What a block adds to the residual stream, and what it saw.
#[derive(Debug)]
pub struct BlockDelta {
    /// `[B, T, D]` residual update.
    pub delta: Tensor,
    pub attention: Option<AttentionMaps>,
    /// Keys each query attended over (cached ones included), for the FLOPs count.
    pub keys: i64,
}

impl Block {
    pub fn new(p: nn::Path, cfg: &ModelConfig) -> Block {
        Block {
            norm1: Norm::new(&p / "norm1", cfg),
            norm2: (cfg.block == BlockStyle::Sequential).then(|| Norm::new(&p / "norm2", cfg)),
            attn: Attention::new(&p / "attn", cfg),
            mlp: Mlp::new(&p / "mlp", cfg),
        }
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
        let h = self.norm1.forward(x);
        let AttentionOutput {
            out: a,
            maps: attention,
            keys,
        } = self.attn.forward(&h, tokens, rope, cache, capture);
        let delta = match &self.norm2 {
            None => a + self.mlp.forward(&h),
            Some(n2) => {
                let m = self.mlp.forward(&n2.forward(&(x + &a)));
                a + m
            }
        };
        BlockDelta {
            delta,
            attention,
            keys,
        }
    }
}
