//! The model's configuration: shapes, flavour, losses and routing. Presets live in `configs/`
//! as TOML; `Default` is the tiny CPU model.

use crate::moma::MomaConfig;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use unimod_router::RoutingConfig;
use unimod_router::RoutingMode;
pub use unimod_tok::Flavour;
use unimod_tok::{Task, VocabLayout};

/// The FFN's form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum FfnKind {
    /// Two matrices with GELU (Phi-1.5).
    #[default]
    Gelu,
    /// Three matrices, SiLU-gated (Llama, Emu3).
    Swiglu,
}

/// The normalisation of every norm in the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum NormKind {
    /// LayerNorm with a bias (Phi-1.5, Show-o).
    #[default]
    Layernorm,
    /// RMSNorm (Llama, Emu3).
    Rmsnorm,
}

/// How attention and the FFN combine in a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum BlockStyle {
    /// `x + attn(ln(x)) + mlp(ln(x))` (Phi-1.5).
    #[default]
    Parallel,
    /// `h = x + attn(ln1(x)); h + mlp(ln2(h))` (Llama).
    Sequential,
}

/// Where an image token's place in the image grid enters the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ImagePositions {
    /// Only the sequence's 1D RoPE (Show-o, Emu3): the model must learn a token's row and
    /// column (index mod side) from rotations, which small models learn slowly.
    #[default]
    Rope,
    /// RoPE plus learned row and column embeddings added to every image token's input (as
    /// MaskGIT-style generators use), so its cell in the grid is given.
    #[serde(rename = "learned_2d")]
    Learned2d,
}

/// Weights of the per-task losses in the total.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LossWeights {
    /// Weight of the image-token loss of T2I samples.
    pub t2i: f64,
    /// Weight of the text loss of LM samples.
    pub lm: f64,
    /// Weight of the answer loss of MMU samples.
    pub mmu: f64,
    /// Any other task's weight, by name (`{ video = 0.5 }`); a declared task without one
    /// weighs 1.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub tasks: BTreeMap<Task, f64>,
}

impl Default for LossWeights {
    /// Show-o's coefficients.
    fn default() -> Self {
        LossWeights {
            t2i: 1.0,
            lm: 0.1,
            mmu: 1.0,
            tasks: BTreeMap::new(),
        }
    }
}

impl LossWeights {
    /// The task's weight.
    pub fn get(&self, task: Task) -> f64 {
        match task {
            Task::T2I => self.t2i,
            Task::MMU => self.mmu,
            Task::LM => self.lm,
            other => self.tasks.get(&other).copied().unwrap_or(1.0),
        }
    }
}

/// `[model]` of a config file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    /// Show-o (discrete diffusion over image tokens, bidirectional within the image) or Emu3
    /// (next-token prediction throughout).
    pub flavour: Flavour,
    /// Where specials, text and image codes sit in the embedding table.
    pub vocab: VocabLayout,
    /// The tasks the model is trained on (default: t2i, mmu, lm). Any other name is a task too
    /// (`["t2i", "mmu", "video"]`): routed by its own router column at the capacity the schedule
    /// gives it, weighted by `loss.tasks`. Batches of a task not declared here are refused.
    pub tasks: Vec<Task>,
    /// Width of the residual stream.
    pub d_model: i64,
    /// Number of transformer blocks.
    pub n_layers: usize,
    /// Query heads per attention.
    pub n_heads: i64,
    /// Key/value heads (grouped-query attention when fewer than `n_heads`).
    pub n_kv_heads: i64,
    /// The FFN's form.
    pub ffn: FfnKind,
    /// The FFN's hidden width.
    pub d_ffn: i64,
    /// The norms' form.
    pub norm: NormKind,
    /// The norms' epsilon; absent: 1e-5 for LayerNorm, 1e-6 for RMSNorm.
    pub norm_eps: Option<f64>,
    /// Parallel (Phi) or sequential (Llama) blocks.
    pub block: BlockStyle,
    /// Biases on the attention and MLP projections (Phi-1.5 has them, Llama not).
    pub bias: bool,
    /// A bias on the LM head (Phi-1.5 has one).
    pub head_bias: bool,
    /// Fraction of each head's dimensions that RoPE rotates (Phi-1.5: 0.5).
    pub rotary_fraction: f64,
    /// RoPE's base.
    pub rope_theta: f64,
    /// The longest sequence the model accepts (`forward` refuses longer batches).
    pub max_seq_len: i64,
    /// How an image token's grid cell enters the model.
    pub image_positions: ImagePositions,
    /// Mixture-of-Transformers (Liang et al.): every norm, attention projection and FFN of
    /// every block (and the final norm) has one copy per modality, text and image, each
    /// applied to its modality's tokens; attention is one global call; embeddings, head and
    /// RoPE stay shared. Same FLOPs per token as dense, twice the block parameters.
    pub mot: bool,
    /// MoMa (Lin et al., `[model.moma]`): every block's FFN becomes a text and an image group
    /// of experts that choose their tokens (crate::moma). Absent: one FFN.
    pub moma: Option<MomaConfig>,
    /// Zero-initialise every block's output projections (attention's `o`, the FFN's `down`,
    /// MoMa's experts' `down`, with their biases), so that a fresh block starts as the
    /// identity on its residual stream: the option MoT's reference code offers for untied
    /// copies. Ignored where weights are loaded (`train.init_from`, a Hugging Face backbone).
    pub zero_out_proj: bool,
    /// Image tokens per side (set from `format.image_side` by the trainer); the grid of
    /// `image_positions = "learned_2d"`. Emu3 rows have one more token, the row end.
    pub image_side: i64,
    /// Weights of the per-task losses.
    pub loss: LossWeights,
    /// `[model.routing]`: the schedule, routers and causal modes.
    pub routing: RoutingConfig,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            flavour: Flavour::Showo,
            vocab: VocabLayout::default(),
            tasks: Task::BUILT_IN.to_vec(),
            d_model: 128,
            n_layers: 8,
            n_heads: 4,
            n_kv_heads: 4,
            ffn: FfnKind::Gelu,
            d_ffn: 512,
            norm: NormKind::Layernorm,
            norm_eps: None,
            block: BlockStyle::Parallel,
            bias: true,
            head_bias: false,
            rotary_fraction: 0.5,
            rope_theta: 10_000.0,
            max_seq_len: 256,
            image_positions: ImagePositions::Rope,
            mot: false,
            moma: None,
            zero_out_proj: false,
            image_side: 0,
            loss: LossWeights::default(),
            routing: RoutingConfig::default(),
        }
    }
}

/// A configuration the model cannot be built from.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)] // the fields are named in each variant's message
pub enum ConfigError {
    /// A field outside its accepted range.
    #[error("model.{field} = {value}: {why}")]
    Invalid {
        field: &'static str,
        value: String,
        why: &'static str,
    },
    /// A `[model.moma]` value MoMa cannot use.
    #[error("model.{field} = {why}")]
    Moma { field: &'static str, why: String },
    /// A schedule the model's depth cannot take.
    #[error(transparent)]
    Schedule(#[from] unimod_router::ScheduleError),
    /// A task named where `model.tasks` does not declare it.
    #[error("model.{place} names task `{task}`, which model.tasks does not declare ({declared})")]
    UnknownTask {
        place: &'static str,
        task: Task,
        declared: String,
    },
    /// A batch holding samples of a task the model was not built for.
    #[error("the batch holds `{task}` samples, which model.tasks does not declare ({declared})")]
    BatchTask { task: Task, declared: String },
    /// A routing mode the configuration cannot serve.
    #[error("routing mode {mode:?}: {why}")]
    Mode {
        mode: unimod_router::RoutingMode,
        why: &'static str,
    },
}

impl ModelConfig {
    /// Dimensions per attention head.
    pub fn head_dim(&self) -> i64 {
        self.d_model / self.n_heads
    }

    /// The norms' epsilon.
    pub fn norm_eps(&self) -> f64 {
        self.norm_eps.unwrap_or(match self.norm {
            NormKind::Layernorm => 1e-5,
            NormKind::Rmsnorm => 1e-6,
        })
    }

    /// Dimensions RoPE rotates per head (even).
    pub fn rotary_dim(&self) -> i64 {
        ((self.head_dim() as f64 * self.rotary_fraction) as i64 / 2) * 2
    }

    /// Checks every field, naming the first one out of range.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |field, value: String, why| Err(ConfigError::Invalid { field, value, why });
        if self.d_model <= 0 || self.n_heads <= 0 || self.d_model % self.n_heads != 0 {
            return bad(
                "d_model",
                self.d_model.to_string(),
                "must be a positive multiple of n_heads",
            );
        }
        if self.n_kv_heads <= 0 || self.n_heads % self.n_kv_heads != 0 {
            return bad(
                "n_kv_heads",
                self.n_kv_heads.to_string(),
                "must divide n_heads",
            );
        }
        if self.d_model > 65_536 || self.n_heads > 1024 {
            return bad(
                "d_model",
                format!("{} with {} heads", self.d_model, self.n_heads),
                "d_model must be at most 65536 and n_heads at most 1024",
            );
        }
        if self.n_layers == 0 || self.n_layers > 1024 {
            return bad(
                "n_layers",
                self.n_layers.to_string(),
                "must be in [1, 1024]",
            );
        }
        if self.d_ffn <= 0 || self.d_ffn > 1 << 20 {
            return bad("d_ffn", self.d_ffn.to_string(), "must be in [1, 1048576]");
        }
        if self.max_seq_len <= 0 || self.max_seq_len > 1 << 20 {
            return bad(
                "max_seq_len",
                self.max_seq_len.to_string(),
                "must be in [1, 1048576]; sequences longer than it are refused",
            );
        }
        if self.image_positions == ImagePositions::Learned2d
            && !(1..=4096).contains(&self.image_side)
        {
            return bad(
                "image_side",
                self.image_side.to_string(),
                "image_positions = \"learned_2d\" needs the image grid's side, in [1, 4096]",
            );
        }
        if !matches!(self.norm_eps, None | Some(1e-12..=1e-2)) {
            return bad(
                "norm_eps",
                format!("{:?}", self.norm_eps),
                "must be in [1e-12, 1e-2], or left out for the norm's default",
            );
        }
        if let Some(Err((field, why))) = self.moma.as_ref().map(MomaConfig::check) {
            return Err(ConfigError::Moma { field, why });
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 1.0) {
            return bad(
                "rope_theta",
                self.rope_theta.to_string(),
                "must be a finite number above 1",
            );
        }
        if !(0.0..=1.0).contains(&self.rotary_fraction) {
            return bad(
                "rotary_fraction",
                self.rotary_fraction.to_string(),
                "must be in [0, 1]",
            );
        }
        if self.vocab.n_text < unimod_tok::Special::ALL.len()
            || self.vocab.n_codes == 0
            || self.vocab.size() > 1 << 24
        {
            return bad(
                "vocab",
                format!("{:?}", self.vocab),
                "needs the special tokens and at least one code, and at most 16777216 tokens",
            );
        }
        match self.routing.causal_mode {
            RoutingMode::TopK => {
                return bad(
                    "routing.causal_mode",
                    "\"top_k\"".into(),
                    "top-k looks ahead and cannot decode causally; use \"threshold_router\" or \"threshold_predictor\"",
                );
            }
            RoutingMode::ThresholdPredictor if !self.routing.causal_predictor => {
                return bad(
                    "routing.causal_mode",
                    "\"threshold_predictor\"".into(),
                    "needs routing.causal_predictor = true (it is false); use \"threshold_router\"",
                );
            }
            _ => {}
        }
        let mut seen = Vec::new();
        for t in &self.tasks {
            if seen.contains(t) {
                return bad("tasks", format!("{:?}", self.tasks), "names a task twice");
            }
            seen.push(*t);
        }
        if self.tasks.is_empty() {
            return bad("tasks", "[]".into(), "needs at least one task");
        }
        let plans = self.routing.schedule.resolve(self.n_layers)?;
        let named = plans
            .iter()
            .filter_map(|p| match p {
                unimod_router::LayerPlan::Routed { capacity, .. } => Some(capacity),
                _ => None,
            })
            .flat_map(|c| c.named_tasks().map(|t| ("routing.schedule", t)))
            .chain(self.loss.tasks.keys().map(|t| ("loss.tasks", *t)));
        for (place, task) in named {
            self.task_index(task)
                .ok_or_else(|| ConfigError::UnknownTask {
                    place,
                    task,
                    declared: self.tasks_list(),
                })?;
        }
        Ok(())
    }

    /// The task's place in `tasks` (its id in the model), `None` when it is not declared.
    pub fn task_index(&self, task: Task) -> Option<usize> {
        self.tasks.iter().position(|t| *t == task)
    }

    /// `tasks` as a comma-separated list, for messages.
    pub fn tasks_list(&self) -> String {
        let names: Vec<&str> = self.tasks.iter().map(|t| t.name()).collect();
        names.join(", ")
    }
}
