//! Generation: Show-o's MaskGIT decoding of images (parallel, so routed layers may use top-k),
//! and autoregressive decoding with a KV cache (answers in both flavours, Emu3 images), where
//! routed layers use the causal decision of `[routing].causal_mode`.

use crate::model::{ForwardOptions, KvCache, UnifiedTransformer};
use tch::{Device, Kind, Tensor};
use unimod_router::RoutingMode;
use unimod_tok::{Batch, Continuation, Segment, Sequence, Special, Task, VocabLayout};

/// Why generation stopped.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    /// The prompts could not be batched.
    #[error(transparent)]
    Batch(#[from] unimod_tok::batch::BatchError),
    /// libtorch failed.
    #[error(transparent)]
    Tch(#[from] tch::TchError),
    /// The model cannot decode in the requested way.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
}

/// Sampling settings (Show-o uses 12 MaskGIT steps and guidance 1.5 at 256 tokens).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SamplingConfig {
    /// MaskGIT unmasking steps (Show-o); Emu3 decodes one token per step whatever this is.
    pub steps: usize,
    /// Sampling temperature of image codes (0: greedy).
    pub temperature: f64,
    /// Classifier-free guidance: logits = (1 + w)·cond − w·uncond.
    pub guidance: f64,
    /// How `guidance` is spread over the decoding steps.
    pub guidance_schedule: GuidanceSchedule,
    /// MaskGIT's randomised unmasking: Gumbel noise of this scale, annealed to 0 over the
    /// steps, is added to the confidence that picks which tokens stay masked. Without it the
    /// most confident code (plain background) wins everywhere and images come out empty.
    pub choice_temperature: f64,
    /// Seed of the sampling noise (reproducible samples).
    pub seed: i64,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        SamplingConfig {
            steps: 8,
            temperature: 1.0,
            guidance: 1.5,
            guidance_schedule: GuidanceSchedule::Constant,
            choice_temperature: 4.5,
            seed: 0,
        }
    }
}

/// The weight of classifier-free guidance at each decoding step (MaskGIT's unmasking steps,
/// or the generated positions of autoregressive decoding), for a configured weight `w`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GuidanceSchedule {
    /// `w` at every step.
    #[default]
    Constant,
    /// From `w / n` at the first of `n` steps up to `w` at the last (Muse's schedule): the
    /// first steps, which fix the layout, are guided least.
    Increasing,
    /// From `w` at the first step down to `w / n` at the last: the layout is guided most.
    Decreasing,
}

impl GuidanceSchedule {
    /// The guidance weight at step `step` (from 0) of `steps`, for a configured weight `w`.
    ///
    /// ```
    /// use unimod_model::generate::GuidanceSchedule;
    /// assert_eq!(GuidanceSchedule::Constant.weight(2.0, 0, 4), 2.0);
    /// assert_eq!(GuidanceSchedule::Increasing.weight(2.0, 0, 4), 0.5);
    /// assert_eq!(GuidanceSchedule::Increasing.weight(2.0, 3, 4), 2.0);
    /// assert_eq!(GuidanceSchedule::Decreasing.weight(2.0, 0, 4), 2.0);
    /// assert_eq!(GuidanceSchedule::Decreasing.weight(2.0, 3, 4), 0.5);
    /// ```
    pub fn weight(self, w: f64, step: usize, steps: usize) -> f64 {
        let n = steps.max(1) as f64;
        match self {
            GuidanceSchedule::Constant => w,
            GuidanceSchedule::Increasing => w * (step + 1) as f64 / n,
            GuidanceSchedule::Decreasing => w * (n - step as f64) / n,
        }
    }
}

fn sample(logits: &Tensor, temperature: f64) -> Tensor {
    if temperature <= 0.0 {
        return logits.argmax(-1, false);
    }
    let probs = (logits / temperature).softmax(-1, Kind::Float);
    let shape = probs.size();
    let v = shape[shape.len() - 1];
    let mut out_shape = shape.clone();
    out_shape.pop();
    probs
        .reshape([-1, v])
        .multinomial(1, true)
        .view(out_shape.as_slice())
}

/// Show-o T2I: starts from prompts whose image is all `<|mask|>` (`FormatConfig::t2i` with no
/// codes) and unmasks the most confident tokens over `steps` steps on a cosine schedule.
/// `uncond` holds the same prompts with the caption dropped (guidance), or `None`.
/// Returns the codes `[B, N]`.
pub fn maskgit(
    model: &UnifiedTransformer,
    cond: &[Sequence],
    uncond: Option<&[Sequence]>,
    layout: &VocabLayout,
    cfg: &SamplingConfig,
    device: Device,
) -> Result<Tensor, GenerateError> {
    tch::manual_seed(cfg.seed);
    let image: Vec<i64> = cond[0]
        .segments
        .iter()
        .enumerate()
        .filter(|(_, g)| **g == Segment::Image)
        .map(|(i, _)| i as i64)
        .collect();
    let n = image.len() as i64;
    let b = cond.len() as i64;
    let all: Vec<Sequence> = cond.iter().chain(uncond.unwrap_or(&[])).cloned().collect();
    let mut batch = Batch::from_sequences(&all, device)?;
    let positions = Tensor::from_slice(&image).to_device(device);
    let (lo, hi) = (layout.image_offset(), layout.size() as i64);
    let mask_id = Special::Mask.id();
    tch::no_grad(|| {
        for step in 0..cfg.steps {
            let logits = model
                .forward(
                    &batch,
                    &ForwardOptions {
                        mode: RoutingMode::TopK,
                        ..Default::default()
                    },
                )?
                .logits
                .index_select(1, &positions)
                .narrow(-1, lo, hi - lo);
            let logits = match uncond {
                Some(_) => {
                    let w = cfg.guidance_schedule.weight(cfg.guidance, step, cfg.steps);
                    logits.narrow(0, 0, b) * (1.0 + w) - logits.narrow(0, b, b) * w
                }
                None => logits,
            };
            let current = batch.tokens.narrow(0, 0, b).index_select(1, &positions);
            let unknown = current.eq(mask_id);
            let drawn = sample(&logits, cfg.temperature);
            let progress = (step + 1) as f64 / cfg.steps as f64;
            let log_p = logits
                .log_softmax(-1, Kind::Float)
                .gather(-1, &drawn.unsqueeze(-1), false)
                .squeeze_dim(-1);
            let gumbel = -(-log_p.rand_like().clamp(1e-20, 1.0).log()).log();
            let confidence = (log_p + gumbel * (cfg.choice_temperature * (1.0 - progress)))
                .masked_fill(&unknown.logical_not(), f64::INFINITY);
            let mut next = (drawn + lo).where_self(&unknown, &current);
            let ratio = (std::f64::consts::FRAC_PI_2 * (step + 1) as f64 / cfg.steps as f64).cos();
            let keep_masked = ((n as f64) * ratio).floor() as i64;
            if keep_masked > 0 {
                let (_, idx) = confidence.topk(keep_masked, -1, false, false);
                next = next.scatter_value(1, &idx, mask_id as f64);
            }
            // The unconditional rows (if any) carry the same image as their conditional ones.
            let rows = next.repeat([batch.size() as i64 / b, 1]);
            let mut tokens = batch.tokens.shallow_clone();
            let _ = tokens.index_copy_(1, &positions, &rows);
            batch.tokens = tokens;
        }
        Ok::<_, GenerateError>(batch.tokens.narrow(0, 0, b).index_select(1, &positions) - lo)
    })
}

/// How [`autoregressive`] continues its prompts.
pub struct Decoding<'a> {
    /// The most tokens generated per prompt.
    pub max_new: usize,
    /// Segment of the generated tokens (their attention rule).
    pub segment: Segment,
    /// Tokens allowed at the `k`-th generated position: `[V]` bool.
    pub allowed: &'a dyn Fn(usize) -> Tensor,
    /// A token that ends a prompt's continuation (kept in the output).
    pub stop: Option<i64>,
    /// 0: greedy.
    pub temperature: f64,
    /// Decisions of routed layers: a causal mode with the cache, any mode without it.
    pub mode: RoutingMode,
    /// Decode with a KV cache (each step runs only the new token, so routed layers need a
    /// causal `mode`). Without it every step runs the whole sequence so far, quadratic in its
    /// length, and `RoutingMode::TopK` chooses over the prompt and the tokens decoded so far:
    /// routing that looks back as training's top-k does, but never ahead, which measures what
    /// the causal decision costs.
    pub cache: bool,
    /// Classifier-free guidance: the prompts without their condition (row `i` pairs with
    /// prompt `i`) and `w`; logits = (1 + w)·cond − w·uncond, and both rows continue with
    /// the token drawn from the guided logits.
    pub guidance: Option<(&'a [Sequence], f64)>,
    /// How `w` is spread over the `max_new` generated positions.
    pub guidance_schedule: GuidanceSchedule,
}

/// Autoregressive continuation of `prompts` (unpadded, possibly of different lengths) with a
/// KV cache. Returns each prompt's generated tokens (up to and including `stop`).
///
/// Answering an MMU question greedily, text tokens only, with the causal routing decoding uses
/// (an untrained model here, so the answer is arbitrary but well-formed):
///
/// ```
/// use tch::{Device, nn::VarStore};
/// use unimod_model::{ModelConfig, UnifiedTransformer, generate};
/// use unimod_tok::{FormatConfig, Segment, Special, Task, VocabLayout};
///
/// let vocab = VocabLayout { n_text: 40, n_codes: 16 };
/// let mut cfg = ModelConfig { vocab, d_model: 32, n_layers: 2, n_heads: 4, n_kv_heads: 4,
///                             d_ffn: 64, ..Default::default() };
/// cfg.routing.schedule = toml::from_str("kind = 'mod'\ncapacity = 0.5").unwrap();
/// let vs = VarStore::new(Device::Cpu);
/// let model = UnifiedTransformer::new(&vs.root(), &cfg)?;
/// let format = FormatConfig { text_len: 8, image_side: 2, ..Default::default() };
/// let prompt = format.mmu(&vocab, &[3, 4, 7, 8], &[20, 21], None)?; // image + question
/// let text = generate::text_only(&vocab);
/// let answer = generate::autoregressive(
///     &model,
///     &[prompt],
///     &generate::Decoding {
///         max_new: 4,
///         segment: Segment::Answer,
///         allowed: &|_| text.shallow_clone(),
///         stop: Some(Special::Eos.id()),
///         temperature: 0.0,
///         mode: generate::mode_for(&model, Task::MMU),
///         cache: true,
///         guidance: None,
///         guidance_schedule: Default::default(),
///     },
///     Device::Cpu,
/// )?;
/// assert!(!answer[0].is_empty() && answer[0].len() <= 4);
/// assert!(answer[0].iter().all(|&t| t < vocab.n_text as i64));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn autoregressive(
    model: &UnifiedTransformer,
    prompts: &[Sequence],
    d: &Decoding,
    device: Device,
) -> Result<Vec<Vec<i64>>, GenerateError> {
    let n = prompts.len();
    let rows: Vec<&Sequence> = prompts
        .iter()
        .chain(d.guidance.map_or(&[][..], |(u, _)| u))
        .collect();
    let longest = rows.iter().map(|p| p.len()).max().unwrap_or(0);
    // Pad prompts at the end: pads are invisible keys and do not advance RoPE positions.
    let padded: Vec<Sequence> = rows
        .iter()
        .map(|p| {
            let mut p = (*p).clone();
            for _ in p.len()..longest {
                p.push_decoded(Special::Pad.id(), Segment::Pad);
            }
            p
        })
        .collect();
    let last: Vec<i64> = rows.iter().map(|p| p.len() as i64 - 1).collect();
    let opts = ForwardOptions {
        mode: d.mode,
        ..Default::default()
    };
    // The logits of generated position `k`, guided.
    let guided = |logits: Tensor, k: usize| match d.guidance {
        Some((_, w)) => {
            let w = d.guidance_schedule.weight(w, k, d.max_new);
            logits.narrow(0, 0, n as i64) * (1.0 + w) - logits.narrow(0, n as i64, n as i64) * w
        }
        None => logits,
    };
    let mut cache = KvCache::default();
    let batch = Batch::from_sequences(&padded, device)?;
    let mut end: Continuation = batch.end.clone();
    // Each row as decoded so far: the cache runs its last token, recomputation all of it.
    let mut seqs = padded;
    tch::no_grad(|| {
        let logits = if d.cache {
            model.forward_cached(&batch, &opts, &mut cache)?.logits
        } else {
            model.forward(&batch, &opts)?.logits
        };
        let idx = Tensor::from_slice(&last)
            .to_device(device)
            .view([-1, 1, 1])
            .expand([-1, 1, logits.size()[2]], false);
        let mut next_logits = guided(logits.gather(1, &idx, false).squeeze_dim(1), 0);
        let mut out = vec![Vec::new(); n];
        let mut done = vec![false; n];
        for k in 0..d.max_new {
            let masked = next_logits.masked_fill(
                &(d.allowed)(k).logical_not().to_device(device),
                f64::NEG_INFINITY,
            );
            let toks = Vec::<i64>::try_from(&sample(&masked, d.temperature))?;
            for (i, t) in toks.iter().enumerate() {
                if !done[i] {
                    out[i].push(*t);
                    done[i] = Some(*t) == d.stop;
                }
            }
            if done.iter().all(|d| *d) || k + 1 == d.max_new {
                break;
            }
            for (r, s) in seqs.iter_mut().enumerate() {
                s.push_decoded(toks[r % n], d.segment);
            }
            let logits = if d.cache {
                let step: Vec<Sequence> =
                    seqs.iter().map(|s| s.slice(s.len() - 1..s.len())).collect();
                let b = Batch::continuing(&step, Some(&end), device)?;
                end = b.end.clone();
                model.forward_cached(&b, &opts, &mut cache)?.logits
            } else {
                model
                    .forward(&Batch::from_sequences(&seqs, device)?, &opts)?
                    .logits
            };
            next_logits = guided(logits.select(1, -1), k + 1);
        }
        Ok::<_, GenerateError>(out)
    })
}

/// Mask of the text vocabulary (answers): `[V]`.
pub fn text_only(layout: &VocabLayout) -> Tensor {
    let v = layout.size() as i64;
    Tensor::arange(v, (Kind::Int64, Device::Cpu)).lt(layout.n_text as i64)
}

/// Emu3 constrained decoding: image codes inside a row, `<|eol|>` at each row end.
pub fn image_grammar(layout: &VocabLayout, side: usize) -> impl Fn(usize) -> Tensor {
    let v = layout.size() as i64;
    let codes = Tensor::arange(v, (Kind::Int64, Device::Cpu)).ge(layout.image_offset());
    let eol = Tensor::arange(v, (Kind::Int64, Device::Cpu)).eq(Special::Eol.id());
    move |k| {
        if k % (side + 1) == side {
            eol.shallow_clone()
        } else {
            codes.shallow_clone()
        }
    }
}

/// The task's generation-time routing mode: top-k for Show-o's parallel T2I decoding,
/// otherwise the causal mode of the config.
pub fn mode_for(model: &UnifiedTransformer, task: Task) -> RoutingMode {
    match (model.cfg.flavour, task) {
        (unimod_tok::Flavour::Showo, Task::T2I) => RoutingMode::TopK,
        _ => model.cfg.routing.causal_mode,
    }
}
