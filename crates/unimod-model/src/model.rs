//! The unified transformer: token embedding, a stack of [`Layer`]s, final norm and LM head, and
//! the per-task losses of its flavour.

use crate::block::{AttentionMaps, Dispatch, LayerCache, Norm, PerModality, Rope};
use crate::config::{ConfigError, Flavour, ImagePositions, ModelConfig};
use crate::layer::{AuxTargets, Layer, LayerInput, RoutingStats, Work};
use crate::moma::{self, ExpertTargets};
use std::collections::BTreeMap;
use tch::{Kind, Tensor, nn, nn::Module};
use unimod_router::{LayerPlan, Router, Routers, RoutingMode, select};
use unimod_tok::{Batch, IGNORE, Segment, Task};

/// What a forward pass computes besides logits; everything off by default.
#[derive(Debug, Clone, Default)]
pub struct ForwardOptions {
    /// How routed layers decide: top-k (training), or a causal mode (decoding).
    pub mode: RoutingMode,
    /// Keep the residual stream after the embedding and after every layer.
    pub hidden_states: bool,
    /// Keep every layer's attention probabilities and scores (slow path, no fused kernel).
    pub attention: bool,
    /// Layers to bypass entirely (layer-importance analysis).
    pub skip_layers: Vec<usize>,
    /// In one dense layer, process only the chosen tokens (token-redundancy analysis).
    pub keep_tokens: Option<KeepTokens>,
}

/// Layer `layer` processes only the tokens where `mask: [B, S]` is true: they attend among
/// themselves and the others pass through unchanged, as in a routed layer without router weight.
#[derive(Debug)]
pub struct KeepTokens {
    /// The layer.
    pub layer: usize,
    /// `[B, S]` bool: the tokens it processes.
    pub mask: Tensor,
}

impl Clone for KeepTokens {
    fn clone(&self) -> Self {
        KeepTokens {
            layer: self.layer,
            mask: self.mask.shallow_clone(),
        }
    }
}

/// Per-task losses of one batch.
#[derive(Debug)]
pub struct Losses {
    /// Mean cross-entropy per task of the batch over its loss positions.
    pub per_task: BTreeMap<Task, Tensor>,
    /// `[B]` mean cross-entropy of each sample over its own loss positions (detached; the unit
    /// of the analyses' standard errors).
    pub per_sample: Tensor,
    /// Router auxiliary losses (BCE towards top-k, causal predictor), summed over layers.
    pub aux: Tensor,
    /// Σ weight_t · loss_t + aux.
    pub total: Tensor,
}

/// The output of [`UnifiedTransformer::forward`].
#[derive(Debug)]
pub struct ModelOutput {
    /// `[B, S, V]` logits.
    pub logits: Tensor,
    /// `[L + 1]` × `[B, S, D]` when requested.
    pub hidden_states: Vec<Tensor>,
    /// Per layer, when requested (`None` for skipped layers).
    pub attentions: Vec<Option<AttentionMaps>>,
    /// One entry per routed layer.
    pub routing: Vec<RoutingStats>,
    /// Summed router and predictor losses of the routed layers, and MoMa's auxiliary-router
    /// losses.
    pub aux_loss: Option<Tensor>,
    /// MoMa's expert choices and auxiliary-router logits, per layer (expert-choice mode; empty
    /// without MoMa).
    pub experts: Vec<Vec<ExpertTargets>>,
    /// Work per layer, for the FLOPs model.
    pub work: Vec<Work>,
}

/// The unified transformer of Show-o or Emu3 shape: embeddings, blocks under their layer plans
/// (dense, skipped or routed), a final norm and the LM head over text and image codes.
///
/// A small Show-o model under the paper's UniMoD recipe, one T2I and one MMU sequence, their
/// losses and the FLOPs of the work done:
///
/// ```
/// use tch::{Device, nn::VarStore};
/// use unimod_model::{ForwardOptions, ModelConfig, UnifiedTransformer, flops};
/// use unimod_router::Schedule;
/// use unimod_tok::{Batch, FormatConfig, Task, VocabLayout};
///
/// let vocab = VocabLayout { n_text: 40, n_codes: 16 };
/// let mut cfg = ModelConfig { vocab, d_model: 32, n_layers: 4, n_heads: 4, n_kv_heads: 4,
///                             d_ffn: 64, ..Default::default() };
/// cfg.routing.schedule = toml::from_str(r#"kind = "unimod"
///                                          t2i = 0.8
///                                          mmu = [1.0, 0.2]"#).unwrap();
/// let vs = VarStore::new(Device::Cpu);
/// let model = UnifiedTransformer::new(&vs.root(), &cfg)?;
///
/// // Sequences as the trainer builds them: text ids, image codes 0..16 (2×2 per image).
/// let format = FormatConfig { text_len: 8, image_side: 2, ..Default::default() };
/// let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(0);
/// let seqs = [
///     format.t2i(&vocab, &[11, 12, 13], Some(&[1, 5, 9, 2]), Some(&mut rng))?,
///     format.mmu(&vocab, &[3, 4, 7, 8], &[20, 21], Some(&[24]))?,
/// ];
/// let batch = Batch::from_sequences(&seqs, Device::Cpu)?;
/// let out = model.forward(&batch, &ForwardOptions::default())?;
/// assert_eq!(out.logits.size(), [2, batch.seq_len(), vocab.size() as i64]);
///
/// let losses = model.losses(&batch, &out);
/// losses.total.backward();
/// assert!(losses.per_task.contains_key(&Task::T2I) && losses.per_task.contains_key(&Task::MMU));
/// // Layers 2 and 3 route: each task keeps its capacity of its routable tokens there.
/// assert_eq!(out.routing.len(), 2);
/// let tokens = (batch.size() as i64 * batch.seq_len()) as f64;
/// let f = flops::forward(&cfg, &out.work, tokens);
/// assert!(f.total() > 0.0 && f.router > 0.0);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct UnifiedTransformer {
    /// The configuration it was built from.
    pub cfg: ModelConfig,
    /// Each layer's plan, resolved from `cfg.routing.schedule`.
    pub plans: Vec<LayerPlan>,
    embed: nn::Embedding,
    grid: Option<GridEmbedding>,
    layers: Vec<Layer>,
    norm: PerModality<Norm>,
    head: nn::Linear,
    rope: Rope,
}

/// One routed layer's host counts on a batch ([`UnifiedTransformer::routing_counts`]).
#[derive(Debug, Clone, PartialEq)]
pub struct RoutingCounts {
    /// The layer's index.
    pub layer: usize,
    /// Tokens it processes per task.
    pub processed: BTreeMap<Task, usize>,
    /// Valid tokens per task.
    pub total: BTreeMap<Task, usize>,
}

/// Key/value caches of every layer for incremental decoding.
#[derive(Debug, Default)]
pub struct KvCache {
    layers: Vec<LayerCache>,
    /// `[B]` image tokens already decoded per sample: where the grid embedding continues.
    image_tokens: Option<Tensor>,
}

/// Learned row and column embeddings added to the image tokens' inputs
/// (`model.image_positions = "learned_2d"`).
#[derive(Debug)]
struct GridEmbedding {
    rows: nn::Embedding,
    cols: nn::Embedding,
    side: i64,
    /// Tokens per image row: the side, plus Emu3's row end.
    row_len: i64,
}

impl GridEmbedding {
    fn new(p: &nn::Path, cfg: &ModelConfig) -> GridEmbedding {
        let side = cfg.image_side;
        let row_len = side + i64::from(cfg.flavour == Flavour::Emu3);
        // Zero at the start: the model begins as the RoPE-only one, and unit-variance rows
        // (the token embedding's init) would drown the codes' codebook-initialised likeness.
        let zero = nn::EmbeddingConfig {
            ws_init: nn::Init::Const(0.0),
            ..Default::default()
        };
        let emb = |name, n| nn::embedding(p / name, n, cfg.d_model, zero);
        GridEmbedding {
            rows: emb("rows", side),
            cols: emb("cols", row_len),
            side,
            row_len,
        }
    }

    /// Image tokens are numbered in order of appearance, continuing from `before` (the tokens
    /// of each sample already in a KV cache), which gives each its row and column.
    ///
    /// # Shapes
    /// `segment: [B, T]`, `before: [B]` → (`[B, T, D]` zero off the image, `[B]` image tokens
    /// seen after these).
    fn forward(&self, segment: &Tensor, before: &Tensor) -> (Tensor, Tensor) {
        let image = segment.eq(Segment::Image as i64);
        let count = image.cumsum(1, Kind::Int64);
        let index = (&count - 1 + before.unsqueeze(1)).clamp_min(0);
        let row = index
            .divide_scalar_mode(self.row_len, "floor")
            .clamp_max(self.side - 1);
        let col = index.remainder(self.row_len);
        let add = (self.rows.forward(&row) + self.cols.forward(&col))
            * image.unsqueeze(-1).to_kind(Kind::Float);
        (add, before + count.select(1, -1))
    }
}

impl KvCache {
    /// Positions cached.
    pub fn len(&self) -> i64 {
        self.layers.first().map_or(0, LayerCache::len)
    }

    /// Nothing cached yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl UnifiedTransformer {
    /// Builds the model under `p` (its parameter names are the checkpoint's keys), refusing an
    /// invalid configuration with the field named.
    pub fn new(p: &nn::Path, cfg: &ModelConfig) -> Result<UnifiedTransformer, ConfigError> {
        cfg.validate()?;
        let plans = cfg.routing.schedule.resolve(cfg.n_layers)?;
        let needs_global = plans.iter().any(|pl| {
            matches!(
                pl,
                LayerPlan::Routed {
                    routers: Routers::Global,
                    ..
                }
            )
        });
        let global = needs_global
            .then(|| Router::new(p / "global_router", cfg.d_model, cfg.routing.router, 1));
        let layers = plans
            .iter()
            .enumerate()
            .map(|(i, plan)| Layer::new(p / "layers" / i, i, cfg, plan, global.as_ref()))
            .collect();
        let v = cfg.vocab.size() as i64;
        Ok(UnifiedTransformer {
            cfg: cfg.clone(),
            plans,
            embed: nn::embedding(p / "embed", v, cfg.d_model, Default::default()),
            grid: (cfg.image_positions == ImagePositions::Learned2d)
                .then(|| GridEmbedding::new(&(p / "image_grid"), cfg)),
            layers,
            norm: PerModality::new(&(p / "norm"), cfg, |p| Norm::new(p, cfg)),
            head: nn::linear(
                p / "head",
                cfg.d_model,
                v,
                nn::LinearConfig {
                    bias: cfg.head_bias,
                    ..Default::default()
                },
            ),
            rope: Rope::new(cfg, p.device()),
        })
    }

    /// Sets the image codes' rows of the embedding and of the output head from the image
    /// tokenizer's codebook `[n_codes, code_dim]`, through one fixed random projection, so codes
    /// that look alike (one colour, one part of a shape) start alike instead of as unrelated
    /// random vectors. Each row keeps the norm the default initialisation gives it.
    pub fn init_image_rows(&self, codebook: &Tensor) -> Result<(), ConfigError> {
        let n = self.cfg.vocab.n_codes as i64;
        if codebook.dim() != 2 || codebook.size()[0] != n {
            return Err(ConfigError::Invalid {
                field: "vocab.n_codes",
                value: format!("{n} (codebook {:?})", codebook.size()),
                why: "the codebook must have one row per image code",
            });
        }
        let start = self.cfg.vocab.n_text as i64;
        tch::no_grad(|| {
            let cb = codebook
                .to_kind(Kind::Float)
                .to_device(self.embed.ws.device());
            let cb = (&cb - cb.mean_dim(0, true, Kind::Float)) / (cb.std_dim(0, true, true) + 1e-6);
            let proj = Tensor::randn([cb.size()[1], self.cfg.d_model], (Kind::Float, cb.device()));
            let rows = cb.matmul(&proj);
            let unit = &rows / rows.norm_scalaropt_dim(2, [1], true).clamp_min(1e-6);
            for w in [&self.embed.ws, &self.head.ws] {
                let mut target = w.narrow(0, start, n);
                let norm = target.norm_scalaropt_dim(2, [1], true).mean(Kind::Float);
                target.copy_(&(&unit * norm));
            }
        });
        Ok(())
    }

    /// Mixture-of-Transformers warm start: each modality's copy of a parameter from the dense
    /// model's `dense` parameter of the same name (the path without its `text` / `image`
    /// component), shared parameters copied as they are. `vs` holds this model's variables.
    /// Returns the names of this model's variables that `dense` has no match for (left as
    /// initialised; a dense model of the same shape has a match for every one).
    pub fn init_from_dense(&self, vs: &nn::VarStore, dense: &nn::VarStore) -> Vec<String> {
        let source = dense.variables();
        let mut missing = Vec::new();
        tch::no_grad(|| {
            for (name, mut v) in vs.variables() {
                let dense_name = name
                    .split('.')
                    .filter(|part| !matches!(*part, "text" | "image"))
                    .collect::<Vec<_>>()
                    .join(".");
                match source.get(&dense_name) {
                    Some(src) if src.size() == v.size() => {
                        v.copy_(src);
                    }
                    _ => missing.push(name),
                }
            }
        });
        missing.sort();
        missing
    }

    /// The layers, in order.
    pub fn layers(&self) -> &[Layer] {
        &self.layers
    }

    /// The segments routers may route (never padding).
    fn routable_segments(&self) -> Vec<Segment> {
        let routable = self.cfg.routing.routable.iter().copied();
        routable.filter(|g| *g != Segment::Pad).collect()
    }

    /// What fixes the shapes of a top-k forward and backward on `batch`: its size, length and
    /// each row's task, and every routed layer's gather widths. Two batches of one shape run
    /// the same kernels on tensors of the same sizes, so a CUDA graph captured on one replays
    /// the other with its tensors copied in (Mixture-of-Transformers and MoMa size their
    /// dispatch from the device, so they have no such shape: `None`).
    pub fn step_shape(&self, batch: &Batch) -> Option<Vec<i64>> {
        if self.cfg.mot || self.cfg.moma.is_some() {
            return None;
        }
        let mut shape = vec![batch.size() as i64, batch.seq_len()];
        let tasks = batch.tasks.iter();
        shape.extend(tasks.map(|t| self.cfg.task_index(*t).map_or(-1, |i| i as i64)));
        let segments = self.routable_segments();
        for layer in &self.layers {
            if let crate::layer::LayerKind::Routed(r) = &layer.kind {
                shape.push(-1); // a separator: the widths of the next routed layer follow
                shape.extend(r.widths(batch, &segments));
            }
        }
        Some(shape)
    }

    /// Per routed layer: its index, the tokens it processes per task of `batch` in top-k mode
    /// and the valid tokens per task, counted on the host (what a forward's
    /// [`RoutingStats::processed`] and [`RoutingStats::total`] hold).
    pub fn routing_counts(&self, batch: &Batch) -> Vec<RoutingCounts> {
        let segments = self.routable_segments();
        let total = crate::layer::valid_per_task(batch);
        self.layers
            .iter()
            .filter_map(|layer| match &layer.kind {
                crate::layer::LayerKind::Routed(r) => Some(RoutingCounts {
                    layer: layer.index,
                    processed: r.processed(batch, &segments),
                    total: total.clone(),
                }),
                _ => None,
            })
            .collect()
    }

    fn layer_input<'a>(&'a self, batch: &'a Batch, opts: &ForwardOptions) -> LayerInput<'a> {
        let routable = &self.cfg.routing.routable;
        let mut routable_segment = batch.segment.zeros_like().to_kind(Kind::Bool);
        for g in routable {
            routable_segment = routable_segment.logical_or(&batch.segment.eq(*g as i64));
        }
        LayerInput {
            batch,
            tasks: &self.cfg.tasks,
            index: batch.positions_index(),
            valid: batch.valid(),
            routable_segment,
            routable_segments: self.routable_segments(),
            mode: opts.mode,
            capture_attention: opts.attention,
            dispatch: (self.cfg.mot || self.cfg.moma.is_some())
                .then(|| Dispatch::new(&batch.segment.eq(Segment::Image as i64))),
            shared: Default::default(),
        }
    }

    /// # Shapes
    /// `batch.tokens: [B, S]` → `logits: [B, S, V]`.
    ///
    /// # Errors
    /// `opts.mode` is the causal predictor's on a routed model trained without one, or the
    /// batch is longer than `max_seq_len`.
    pub fn forward(
        &self,
        batch: &Batch,
        opts: &ForwardOptions,
    ) -> Result<ModelOutput, ConfigError> {
        self.check_mode(opts.mode, false)?;
        self.check_batch(batch)?;
        Ok(self.run(batch, opts, None))
    }

    /// Refuses a batch longer than `max_seq_len` or holding a task the model does not know.
    fn check_batch(&self, batch: &Batch) -> Result<(), ConfigError> {
        self.check_length(batch.seq_len())?;
        match batch
            .tasks
            .iter()
            .find(|t| self.cfg.task_index(**t).is_none())
        {
            Some(task) => Err(ConfigError::BatchTask {
                task: *task,
                declared: self.cfg.tasks_list(),
            }),
            None => Ok(()),
        }
    }

    fn check_length(&self, len: i64) -> Result<(), ConfigError> {
        if len > self.cfg.max_seq_len {
            return Err(ConfigError::Invalid {
                field: "max_seq_len",
                value: format!("{} (a sequence of {len} tokens)", self.cfg.max_seq_len),
                why: "sequences longer than max_seq_len are refused",
            });
        }
        Ok(())
    }

    /// Refuses a routing mode the model cannot honour, instead of quietly deciding another way.
    fn check_mode(&self, mode: RoutingMode, cached: bool) -> Result<(), ConfigError> {
        if !self
            .plans
            .iter()
            .any(|p| matches!(p, LayerPlan::Routed { .. }))
        {
            return Ok(());
        }
        let why = match mode {
            RoutingMode::TopK if cached => {
                "top-k over a sequence looks ahead, so decoding with a KV cache needs a threshold mode (model.routing.causal_mode = \"threshold_router\" or \"threshold_predictor\")"
            }
            RoutingMode::ThresholdPredictor if !self.cfg.routing.causal_predictor => {
                "the causal predictor's mode needs a trained predictor, but model.routing.causal_predictor = false (use \"threshold_router\")"
            }
            _ => return Ok(()),
        };
        Err(ConfigError::Mode { mode, why })
    }

    /// Incremental forward: `batch` holds the new tokens only (built with
    /// [`Batch::continuing`] from the batch before), and attends to the keys in `cache`, to
    /// which it appends its own. Routed layers decide by `opts.mode`, which must be a threshold
    /// mode for autoregressive decoding (top-k over a sequence is not causal; refused), and
    /// process only the tokens they keep.
    ///
    /// # Shapes
    /// `batch.tokens: [B, T]` → `logits: [B, T, V]`.
    pub fn forward_cached(
        &self,
        batch: &Batch,
        opts: &ForwardOptions,
        cache: &mut KvCache,
    ) -> Result<ModelOutput, ConfigError> {
        self.check_mode(opts.mode, true)?;
        self.check_batch(batch)?;
        self.check_length(cache.len() + batch.seq_len())?;
        if cache.layers.is_empty() {
            cache.layers = (0..self.layers.len())
                .map(|_| LayerCache::default())
                .collect();
        }
        Ok(self.run(batch, opts, Some(cache)))
    }

    fn run(
        &self,
        batch: &Batch,
        opts: &ForwardOptions,
        mut cache: Option<&mut KvCache>,
    ) -> ModelOutput {
        let input = self.layer_input(batch, opts);
        let mut aux_targets = Vec::new();
        let mut x = self.embed.forward(&batch.tokens);
        if let Some(grid) = &self.grid {
            let before = cache
                .as_deref()
                .and_then(|c| c.image_tokens.as_ref())
                .map_or_else(
                    || Tensor::zeros([batch.tasks.len() as i64], (Kind::Int64, x.device())),
                    Tensor::shallow_clone,
                );
            let (add, seen) = grid.forward(&batch.segment, &before);
            let kind = x.kind();
            x += add.to_kind(kind);
            if let Some(c) = cache.as_deref_mut() {
                c.image_tokens = Some(seen);
            }
        }
        let mut out = ModelOutput {
            logits: Tensor::new(),
            hidden_states: Vec::new(),
            attentions: Vec::new(),
            routing: Vec::new(),
            aux_loss: None,
            experts: Vec::new(),
            work: Vec::new(),
        };
        if opts.hidden_states {
            out.hidden_states.push(x.shallow_clone());
        }
        for (i, layer) in self.layers.iter().enumerate() {
            let layer_cache = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            if opts.skip_layers.contains(&i) {
                out.attentions.push(None);
                out.work.push(Work::default());
                if opts.hidden_states {
                    out.hidden_states.push(x.shallow_clone());
                }
                continue;
            }
            let o = match &opts.keep_tokens {
                Some(k) if k.layer == i => layer.forward_keeping(&x, &input, &self.rope, &k.mask),
                _ => layer.forward(&x, &input, &self.rope, layer_cache),
            };
            x = o.hidden;
            out.attentions.push(o.attention);
            out.work.push(o.work);
            out.routing.extend(o.routing);
            aux_targets.extend(o.aux_targets);
            if !o.experts.is_empty() {
                out.experts.push(o.experts);
            }
            if opts.hidden_states {
                out.hidden_states.push(x.shallow_clone());
            }
        }
        out.logits = self
            .head
            .forward(&self.norm.forward(&x, input.dispatch.as_ref()));
        let experts = out
            .experts
            .iter()
            .filter_map(|l| moma::aux_router_bce(&l.iter().collect::<Vec<_>>()))
            .reduce(|a, b| a + b);
        out.aux_loss = match (self.aux_loss(&aux_targets), experts) {
            (Some(a), Some(e)) => Some(a + e),
            (a, e) => a.or(e),
        };
        out
    }

    /// The routers' BCE towards top-k membership (weighted by `routing.aux_loss`) plus the causal
    /// predictors' BCE, each a mean over a layer's routable tokens, summed over layers; computed
    /// for all routed layers at once.
    fn aux_loss(&self, targets: &[AuxTargets]) -> Option<Tensor> {
        if targets.is_empty() {
            return None;
        }
        let stack = |f: fn(&AuxTargets) -> &Tensor| {
            Tensor::stack(&targets.iter().map(f).collect::<Vec<_>>(), 0)
        };
        let (in_topk, routable) = (stack(|t| &t.in_topk), stack(|t| &t.routable));
        let bce =
            |logits: &Tensor| select::membership_bce(logits, &in_topk, &routable).sum(Kind::Float);
        let mut aux = bce(&stack(|t| &t.router)) * self.cfg.routing.aux_loss;
        let predictors: Option<Vec<&Tensor>> =
            targets.iter().map(|t| t.predictor.as_ref()).collect();
        if let Some(p) = predictors {
            aux += bce(&Tensor::stack(&p, 0));
        }
        Some(aux)
    }

    /// Labelled positions of each of the model's tasks in `batch`: `[T]` f32 in `model.tasks`
    /// order (data-parallel training sums them over the ranks for [`Self::losses_over`]).
    pub fn label_counts(&self, batch: &Batch) -> Tensor {
        let labelled = batch.labels.ne(IGNORE).to_kind(Kind::Float);
        let per_sample = labelled.sum_dim_intlist(1, false, Kind::Float);
        let counts: Vec<Tensor> =
            self.cfg
                .tasks
                .iter()
                .map(|t| match batch.task_set.iter().position(|s| s == t) {
                    Some(j) => (&per_sample * batch.task.eq(j as i64).to_kind(Kind::Float))
                        .sum(Kind::Float),
                    None => Tensor::zeros([], (Kind::Float, per_sample.device())),
                })
                .collect();
        Tensor::stack(&counts, 0)
    }

    /// Cross-entropy per task over the positions with a label, weighted into the total.
    pub fn losses(&self, batch: &Batch, out: &ModelOutput) -> Losses {
        self.losses_over(batch, out, &self.label_counts(batch))
    }

    /// [`Self::losses`] with each task's cross-entropy summed over this batch and divided by
    /// `counts` (`[T]`, [`Self::label_counts`] of a larger batch this one is a part of): the
    /// parts' losses then add up to the whole batch's, as data-parallel ranks and
    /// accumulation micro-batches need.
    pub fn losses_over(&self, batch: &Batch, out: &ModelOutput, counts: &Tensor) -> Losses {
        let (b, s, v) = out.logits.size3().expect("logits are [B, S, V]");
        let per_token = out
            .logits
            .view([b * s, v])
            .to_kind(Kind::Float)
            .cross_entropy_loss::<Tensor>(
                &batch.labels.view([b * s]),
                None,
                tch::Reduction::None,
                IGNORE,
                0.0,
            )
            .view([b, s]);
        let labelled = batch.labels.ne(IGNORE).to_kind(Kind::Float);
        let per_sample = (&per_token * &labelled)
            .detach()
            .sum_dim_intlist(1, false, Kind::Float)
            / labelled
                .sum_dim_intlist(1, false, Kind::Float)
                .clamp_min(1.0);
        let device = out.logits.device();
        let mut total = Tensor::zeros([], (Kind::Float, device));
        let mut per_task = BTreeMap::new();
        for (j, &task) in batch.task_set.iter().enumerate() {
            let w = batch.task.eq(j as i64).to_kind(Kind::Float).unsqueeze(1) * &labelled;
            // A task the model does not declare cannot pass `forward`; its own count keeps
            // `losses` total without a panic all the same.
            let denominator = match self.cfg.task_index(task) {
                Some(at) => counts.get(at as i64),
                None => w.sum(Kind::Float),
            };
            let loss = (&per_token * &w).sum(Kind::Float) / denominator.clamp_min(1.0);
            total += &loss * self.cfg.loss.get(task);
            per_task.insert(task, loss);
        }
        let aux = out.aux_loss.as_ref().map_or_else(
            || Tensor::zeros([], (Kind::Float, device)),
            |a| a.shallow_clone(),
        );
        Losses {
            per_task,
            per_sample,
            total: total + &aux,
            aux,
        }
    }
}
