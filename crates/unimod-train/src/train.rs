//! The mixed-task trainer. Every run directory holds the resolved config (`config.toml`), the
//! per-step metrics (`metrics.jsonl`), the checkpoints and, after evaluation, the report.
//!
//! Checkpoints are saved so that a crash at any instant leaves a complete one (`rundir`), and
//! only with finite weights. Batch `s` is a pure function of (seed, s), so `--resume`
//! continues bit-identically on CPU.

use crate::data::{self, Pool, TaskMix, Tokenizers};
use crate::optim::{AdamW, Update, learning_rate};
use crate::rundir::{self, Part, RunLock, Start, TOKENIZERS_FILE};
use crate::{RunConfig, progress};
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;
use tch::{Device, Kind, Tensor, nn::VarStore};
use unimod_model::{ForwardOptions, UnifiedTransformer, checkpoint, flops, hf};
use unimod_tok::dataset::{Dataset, Split};
use unimod_tok::judge::T2iJudge;
use unimod_tok::{Batch, Task};

/// `[train]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Optimizer steps.
    pub steps: usize,
    /// Samples of each task per batch.
    pub mix: TaskMix,
    /// Peak learning rate.
    pub lr: f64,
    /// Learning rate at the end of the cosine decay.
    pub min_lr: f64,
    /// Linear warm-up steps.
    pub warmup: usize,
    /// AdamW's decoupled weight decay (matrices only).
    pub weight_decay: f64,
    /// Global gradient-norm clip (0: none).
    pub grad_clip: f64,
    /// `"fused"` (libtorch's fused AdamW, one pass per parameter) or `"written_out"` (the
    /// readable update of `optim.rs`): the same arithmetic, different rounding.
    pub adamw: Update,
    /// CUDA graphs of the forward and backward, one per step shape, at most this many kept (0:
    /// none). CUDA only; not for Mixture-of-Transformers or MoMa (`graphs.rs`).
    pub cuda_graphs: usize,
    /// Micro-batches per optimizer step; the step's loss is each task's mean over the labelled
    /// positions of all of them (as one batch of them all would give).
    pub accumulation: usize,
    /// Seed of the initialisation and the data order.
    pub seed: u64,
    /// `auto`, `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// Steps between progress lines (every step goes to `metrics.jsonl`).
    pub log_every: usize,
    /// Checkpoint every N steps (0: only at the end and on Ctrl-C).
    pub checkpoint_every: usize,
    /// How the image codes' embedding and output rows start.
    pub image_init: ImageInit,
    /// TF32 for f32 matmuls and convolutions on CUDA (Ampere and newer; PyTorch's
    /// `allow_tf32`): about 8× the f32 tensor rate at a 10-bit mantissa. No effect on the CPU or
    /// under bf16.
    pub tf32: bool,
    /// `"f32"`, or `"bf16"`: forward and backward on a bfloat16 copy of the weights, the
    /// update on f32 master weights and moments (which checkpoints keep); `"auto"`: bf16 on
    /// CUDA, f32 on CPU.
    pub precision: Precision,
    /// Start from the weights of this run directory's (or checkpoint folder's) latest
    /// checkpoint instead of random ones: the same model, a dense one for a routed model (new
    /// routers start as initialised), or a dense one for Mixture-of-Transformers (each
    /// modality's copy from the dense weights: the warm start of Liang et al.).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_from: Option<PathBuf>,
    /// Start from a pretrained decoder in Hugging Face format: a directory with `config.json`,
    /// `*.safetensors` and `tokenizer.json` (Phi, Show-o's backbone, or a Llama-family model,
    /// Emu3's). Its architecture replaces `[model]`'s shape fields, its tokenizer the BPE trained
    /// here, and its weights the random ones; image-code rows start as `image_init` says (from
    /// the mean of its text rows, then the VQ codebook by default), routers as initialised.
    /// Evaluating the run reads the directory again for its config and tokenizer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backbone: Option<PathBuf>,
}

/// `train.precision`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    /// bf16 on CUDA, f32 on the CPU.
    #[default]
    Auto,
    /// Everything in f32.
    F32,
    /// bf16 forward and backward, f32 master weights and moments.
    Bf16,
}

impl Precision {
    /// The kind the forward and backward compute in on `device`.
    pub fn kind(self, device: Device) -> Kind {
        match (self, device.is_cuda()) {
            (Precision::Bf16, _) | (Precision::Auto, true) => Kind::BFloat16,
            _ => Kind::Float,
        }
    }
}

/// `train.image_init`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageInit {
    /// Independent random rows, as for text tokens.
    #[default]
    Random,
    /// From the image tokenizer's codebook, projected (`UnifiedTransformer::init_image_rows`).
    Codebook,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            steps: 600,
            mix: TaskMix::default(),
            lr: 2e-3,
            min_lr: 2e-4,
            warmup: 50,
            weight_decay: 0.01,
            grad_clip: 1.0,
            adamw: Update::Fused,
            cuda_graphs: 0,
            accumulation: 1,
            tf32: true,
            seed: 0,
            device: "auto".into(),
            log_every: 10,
            checkpoint_every: 0,
            image_init: ImageInit::Random,
            precision: Precision::Auto,
            init_from: None,
            backbone: None,
        }
    }
}

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepMetrics {
    /// The step (1-based).
    pub step: usize,
    /// The weighted total loss.
    pub loss: f64,
    /// T2I's loss, when the batch held T2I samples.
    pub t2i: Option<f64>,
    /// MMU's loss, when the batch held MMU samples.
    pub mmu: Option<f64>,
    /// LM's loss, when the batch held LM samples.
    pub lm: Option<f64>,
    /// Routers' and predictors' auxiliary losses.
    pub aux: f64,
    /// The learning rate of the step.
    pub lr: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Tokens (padding included) per second of the step.
    pub tokens_per_s: f64,
    /// Seconds of the step.
    pub step_s: f64,
    /// Training FLOPs of this step, from the tokens each layer processed (3 × forward).
    pub flops: f64,
    /// Training FLOPs so far.
    pub flops_total: f64,
    /// Seconds of training so far.
    pub wall_s: f64,
    /// Achieved FLOP/s over the measured matmul rate of the device.
    pub mfu: f64,
    /// Per routed layer: share of each task's valid tokens processed (t2i, mmu, lm).
    pub kept: Vec<(usize, [Option<f64>; 3])>,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
struct State {
    step: usize,
    flops_total: f64,
    wall_s: f64,
}

/// What a finished run reports.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TrainSummary {
    /// Steps taken.
    pub steps: usize,
    /// Training FLOPs counted.
    pub train_flops: f64,
    /// Seconds of training.
    pub wall_s: f64,
    /// Stopped by Ctrl-C (the checkpoint holds the last step).
    pub interrupted: bool,
}

/// The run's tokenizers, with its backbone's configuration where `train.backbone` names one
/// (whose tokenizer is then the text tokenizer).
pub fn tokenizers(
    cfg: &RunConfig,
    world: &dyn Dataset,
    judge: &dyn T2iJudge,
    device: Device,
) -> Result<(Tokenizers, Option<hf::HfConfig>)> {
    let backbone = match &cfg.train.backbone {
        Some(dir) => Some(
            hf::config(dir, cfg.tokenizer.image.codebook_size as usize)
                .with_context(|| format!("train.backbone = {}", dir.display()))?,
        ),
        None => None,
    };
    let pretrained = cfg
        .train
        .backbone
        .as_deref()
        .zip(backbone.as_ref().map(|b| b.vocab));
    let tk = data::tokenizers(world, judge, &cfg.tokenizer, pretrained, device)?;
    Ok((tk, backbone))
}

/// Everything a run needs besides its config: tokenizers and pools, shared by the runs of an
/// experiment.
pub struct RunContext {
    /// The dataset.
    pub world: Arc<dyn Dataset>,
    /// The T2I judge of its images.
    pub judge: Box<dyn T2iJudge>,
    /// The text and image tokenizers.
    pub tokenizers: Tokenizers,
    /// The encoded training images.
    pub train: Pool,
    /// The encoded validation images.
    pub val: Pool,
    /// Where batches are put.
    pub device: Device,
    /// `train.backbone`'s configuration, mapped.
    pub backbone: Option<hf::HfConfig>,
    /// The data-parallel ranks this process trains with (`None`: one process).
    pub group: Option<unimod_dist::Group>,
}

impl RunContext {
    /// Loads or trains the tokenizers and encodes the pools the config asks for.
    pub fn new(cfg: &RunConfig, device: Device) -> Result<RunContext> {
        let world = data::dataset(&cfg.data)?;
        let judge = data::judge(&cfg.data, device)?;
        let (tokenizers, backbone) = tokenizers(cfg, world.as_ref(), judge.as_ref(), device)?;
        let train = data::pool(
            &tokenizers,
            world.as_ref(),
            Split::Train,
            cfg.data.train_pool,
            device,
        )?;
        let val = data::pool(
            &tokenizers,
            world.as_ref(),
            Split::Val,
            cfg.data.val_pool,
            device,
        )?;
        Ok(RunContext {
            world,
            judge,
            tokenizers,
            train,
            val,
            device,
            backbone,
            group: None,
        })
    }

    /// The part of each training batch this process builds.
    pub fn shard(&self) -> data::Shard {
        self.group
            .as_ref()
            .map_or(data::Shard::WHOLE, |g| data::Shard {
                rank: g.rank(),
                world: g.world_size(),
            })
    }

    /// Whether this process writes the run (rank 0, or the only process).
    pub fn leader(&self) -> bool {
        self.group.as_ref().is_none_or(|g| g.rank() == 0)
    }

    /// The config with the vocabulary layout of the trained tokenizers.
    pub fn resolve(&self, cfg: &RunConfig) -> Result<RunConfig> {
        let mut c = cfg.clone();
        c.model = c.model_for_format();
        if let Some(b) = &self.backbone {
            c.model = b.architecture_of(&c.model);
        }
        c.model.vocab = self.tokenizers.layout();
        if c.format.seq_len() as i64 > c.model.max_seq_len {
            bail!(
                "model.max_seq_len = {} is below the format's sequence length {} \
                 (format.text_len {} + image tokens + specials); raise it",
                c.model.max_seq_len,
                c.format.seq_len(),
                c.format.text_len
            );
        }
        c.model.validate()?;
        let sequences =
            c.train.mix.get(Task::T2I) + c.train.mix.get(Task::MMU) + c.train.mix.get(Task::LM);
        if sequences == 0 {
            bail!("train.mix: every task has ratio 0");
        }
        crate::device::check_memory(
            flops::training_bytes(&c.model, sequences, c.format.seq_len()),
            self.device,
            &format!(
                "training this model ({:.3e} parameters) on batches of {sequences} sequences",
                flops::parameters(&c.model)
            ),
        )?;
        for (layer, plan) in c
            .model
            .routing
            .schedule
            .resolve(c.model.n_layers)?
            .iter()
            .enumerate()
        {
            if let unimod_router::LayerPlan::Routed { capacity, .. } = plan {
                for t in capacity.routed_tasks(&c.model.tasks) {
                    if c.train.mix.get(t) == 0 && t != Task::LM {
                        bail!(
                            "train.mix.{t} = 0, but the schedule routes {t} tokens in layer {layer}"
                        );
                    }
                }
            }
        }
        c.model.validate()?;
        Ok(c)
    }

    /// The batch of `step` from `split` (the same for every run with this config and seed);
    /// of a training batch, this rank's part.
    pub fn batch(&self, cfg: &RunConfig, split: Split, step: u64, training: bool) -> Result<Batch> {
        let pool = if split == Split::Train {
            &self.train
        } else {
            &self.val
        };
        let seqs = data::batch_sequences(
            &self.tokenizers.text,
            &self.tokenizers.layout(),
            &cfg.format,
            self.world.as_ref(),
            pool,
            &cfg.train.mix,
            cfg.train.seed,
            step,
            training,
            if training && split == Split::Train {
                self.shard()
            } else {
                data::Shard::WHOLE
            },
        )?;
        Ok(Batch::from_sequences(&seqs, self.device)?)
    }
}

/// Batch-building rate vs training-step rate of a run config: the data path must never be what
/// a step waits for.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct DataThroughput {
    /// Batches built per second.
    pub batches_per_s: f64,
    /// Sequences built per second.
    pub sequences_per_s: f64,
    /// Dense training steps (forward, backward) of the config's model, per second.
    pub steps_per_s: f64,
    /// `batches_per_s / steps_per_s`.
    pub headroom: f64,
}

/// Times `batches` training batches (after one warm-up) and `steps` dense training steps.
pub fn data_throughput(
    ctx: &RunContext,
    cfg: &RunConfig,
    batches: usize,
    steps: usize,
) -> Result<DataThroughput> {
    let first = ctx.batch(cfg, Split::Train, 0, true)?;
    let start = Instant::now();
    for step in 1..=batches.max(1) {
        ctx.batch(cfg, Split::Train, step as u64, true)?;
    }
    let batches_per_s = batches.max(1) as f64 / start.elapsed().as_secs_f64();
    let mut dense = cfg.model.clone();
    dense.routing.schedule = unimod_router::Schedule::Dense;
    let v = unimod_model::bench::variant("dense".into(), &dense, &first, ctx.device)?;
    let step_s =
        unimod_model::bench::time_steps(&[v], &first, ctx.device, 1, steps.max(1)).medians()[0];
    Ok(DataThroughput {
        batches_per_s,
        sequences_per_s: batches_per_s * first.size() as f64,
        steps_per_s: 1.0 / step_s,
        headroom: batches_per_s * step_s,
    })
}

/// A model of the run's config, on the context's device, seeded.
pub fn build_model(cfg: &RunConfig, device: Device) -> Result<(VarStore, UnifiedTransformer)> {
    tch::manual_seed(cfg.train.seed as i64);
    let vs = VarStore::new(device);
    let model = UnifiedTransformer::new(&vs.root(), &cfg.model)?;
    Ok((vs, model))
}

/// Trains `cfg` (already resolved) into `dir`, which `start` says how to treat when it already
/// holds a run. The run stops early, checkpointed and resumable, when `stop` is raised (Ctrl-C)
/// or at step `until`. Nothing is written before every check has passed, and the directory is
/// locked against a second writer while the run lasts.
pub fn train(
    ctx: &RunContext,
    cfg: &RunConfig,
    dir: &Path,
    start: Start,
    stop: Arc<AtomicBool>,
    until: Option<usize>,
) -> Result<TrainSummary> {
    // Refused before anything is written.
    let mut graphs = match cfg.train.cuda_graphs {
        0 => None,
        n => Some(crate::graphs::StepGraphs::new(n, ctx.device, &cfg.model)?),
    };
    // Data-parallel: rank 0 owns the directory (lock, config, metrics, checkpoints); the others
    // read it (a resumed checkpoint) once rank 0 has prepared it.
    let leader = ctx.leader();
    let _lock = leader.then(|| RunLock::acquire(dir)).transpose()?;
    unimod_dist::set_tf32(cfg.train.tf32);
    if leader {
        rundir::prepare(dir, start)?;
    }
    if let Some(g) = &ctx.group {
        g.barrier()?;
    }
    let (mut vs, model) = build_model(cfg, ctx.device)?;
    let mut opt = AdamW::new(&vs, cfg.train.weight_decay);
    opt.update = cfg.train.adamw;
    let mut state = State::default();
    if start == Start::Resume {
        state = load_checkpoint(ctx, dir, cfg, &mut vs, &mut opt)?;
    } else if let Some(from) = &cfg.train.init_from {
        let (_, source, _) = crate::load::run_from_checkpoint(from, ctx)
            .with_context(|| format!("train.init_from = {}", from.display()))?;
        let missing: Vec<String> = model
            .init_from_dense(&vs, &source)
            .into_iter()
            .filter(|n| !(n.contains("router") || n.contains("predictor")))
            .collect();
        if !missing.is_empty() {
            bail!(
                "train.init_from = {}: its model has no weights of this shape for {} (first: {}); \
                 it must be this model, or its dense counterpart",
                from.display(),
                missing.len(),
                missing[0]
            );
        }
    } else {
        if let (Some(dir), Some(b)) = (&cfg.train.backbone, &ctx.backbone) {
            hf::load(dir, b, &vs).with_context(|| format!("train.backbone = {}", dir.display()))?;
        }
        if cfg.train.image_init == ImageInit::Codebook {
            model.init_image_rows(&ctx.tokenizers.vq.codebook)?;
        }
    }
    if leader {
        std::fs::write(dir.join("config.toml"), cfg.to_toml())
            .with_context(|| format!("writing {}", dir.join("config.toml").display()))?;
    }
    if let Some(g) = &ctx.group {
        // Every rank starts from rank 0's weights (they are equal already when seeded alike).
        let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        for (_, t) in &vars {
            g.broadcast(t, 0)?;
        }
    }
    // Mixed precision: the steps run on a low-precision copy of the master weights.
    let kind = cfg.train.precision.kind(ctx.device);
    let compute = match kind {
        Kind::Float => None,
        _ => {
            let (mut cvs, cmodel) = build_model(cfg, ctx.device)?;
            cvs.set_kind(kind);
            opt.gradients_from(&cvs);
            Some((cvs, cmodel))
        }
    };
    let model = compute.as_ref().map_or(&model, |(_, m)| m);
    let mut saved = (start == Start::Resume).then_some(state.step);
    let mut metrics = match leader {
        true => {
            truncate_metrics(&dir.join("metrics.jsonl"), state.step)?;
            Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(dir.join("metrics.jsonl"))
                    .with_context(|| format!("opening {}", dir.join("metrics.jsonl").display()))?,
            )
        }
        false => None,
    };
    let world = ctx.shard().world;
    let peak = unimod_model::bench::matmul_rate_of(ctx.device, kind) * world as f64;
    let bar = progress::bar(
        cfg.train.steps as u64,
        &dir.file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default(),
    );
    if !leader {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar.set_position(state.step as u64);
    let mut interrupted = false;
    while state.step < cfg.train.steps {
        let stopping = stop.load(Ordering::SeqCst) || until.is_some_and(|u| state.step >= u);
        // Ranks stop together (Ctrl-C reaches them at different steps).
        if any_rank(ctx, stopping)? {
            interrupted = true;
            break;
        }
        let t0 = Instant::now();
        let step = state.step;
        let lr = learning_rate(
            step,
            cfg.train.steps,
            cfg.train.warmup,
            cfg.train.lr,
            cfg.train.min_lr,
        );
        opt.zero_grad();
        if let Some((cvs, _)) = &compute {
            copy_weights(&vs, cvs);
        }
        let mut m = StepMetrics {
            step,
            loss: 0.0,
            t2i: None,
            mmu: None,
            lm: None,
            aux: 0.0,
            lr,
            grad_norm: 0.0,
            tokens_per_s: 0.0,
            step_s: 0.0,
            flops: 0.0,
            flops_total: 0.0,
            wall_s: 0.0,
            mfu: 0.0,
            kept: Vec::new(),
        };
        // The step's loss is the mean over its whole batch, whatever its split into
        // micro-batches and ranks: each part's per-task sums are divided by the step's counts,
        // and the parts' gradients add up.
        let acc = cfg.train.accumulation.max(1);
        let batches = (0..acc)
            .map(|micro| ctx.batch(cfg, Split::Train, (step * acc + micro) as u64, true))
            .collect::<Result<Vec<Batch>>>()?;
        let counts = batches
            .iter()
            .map(|b| model.label_counts(b))
            .reduce(|a, b| a + b)
            .expect("accumulation ≥ 1");
        if let Some(g) = &ctx.group {
            g.all_reduce_sum(&counts)?;
        }
        let parts = (acc * world) as f64;
        // loss, aux, t2i, mmu, lm, tokens, FLOPs of this rank, summed over the ranks below.
        let mut sums = [0.0f64; 7];
        let mut trouble = None;
        for (micro, b) in batches.iter().enumerate() {
            let run = |b: &Batch, counts: &Tensor| micro_step(model, b, counts, parts);
            let out = match graphs.as_mut() {
                Some(g) => g.step(model, b, &counts, run)?,
                None => run(b, &counts)?,
            };
            let (losses, objective) = (&out.losses, &out.objective);
            let n = (b.size() as i64 * b.seq_len()) as f64;
            let total = objective.double_value(&[]);
            if !total.is_finite() && trouble.is_none() {
                trouble = Some(non_finite_detail(&out));
            }
            sums[0] += total;
            sums[1] += losses.aux.double_value(&[]) / parts;
            for (t, l) in &losses.per_task {
                let slot = match *t {
                    Task::T2I => 2,
                    Task::MMU => 3,
                    _ => 4,
                };
                sums[slot] += l.double_value(&[]);
            }
            sums[5] += n;
            sums[6] += flops::forward(&cfg.model, &out.work, n).total() * flops::TRAIN_MULTIPLIER;
            if micro == 0 {
                m.kept = out
                    .routing
                    .iter()
                    .map(|s| {
                        (
                            s.layer,
                            Task::BUILT_IN.map(|t| {
                                let processed = s.processed.as_ref()?.get(&t)?;
                                Some(*processed as f64 / s.total[&t].max(1) as f64)
                            }),
                        )
                    })
                    .collect();
            }
        }
        if let Some(g) = &ctx.group {
            let t = Tensor::from_slice(&sums).to_device(ctx.device);
            g.all_reduce_sum(&t)?;
            sums = Vec::<f64>::try_from(t.to_device(Device::Cpu))?
                .try_into()
                .expect("7 sums");
            g.all_reduce_gradients(&opt.trainable(), GRADIENT_BUCKET_BYTES)?;
        }
        if !sums[0].is_finite() {
            bail!(
                "non-finite loss at step {step} ({}); no update was applied and {}",
                trouble.unwrap_or_else(|| "on another rank".into()),
                rundir::on_disk(dir)
            );
        }
        // One copy of the step's label counts to the host (a sync on a GPU), not one per task.
        let counts = Vec::<f64>::try_from(counts.to_kind(Kind::Double).to_device(Device::Cpu))?;
        let present = |task: Task| {
            let at = cfg.model.task_index(task)?;
            (counts[at] > 0.0).then_some(())
        };
        m.loss = sums[0];
        m.aux = sums[1];
        m.t2i = present(Task::T2I).map(|_| sums[2]);
        m.mmu = present(Task::MMU).map(|_| sums[3]);
        m.lm = present(Task::LM).map(|_| sums[4]);
        let tokens = sums[5];
        m.flops = sums[6];
        m.grad_norm = opt
            .clip_grad_norm(cfg.train.grad_clip)
            .with_context(|| format!("step {step}: train.adamw = {:?}", cfg.train.adamw))?;
        if !m.grad_norm.is_finite() {
            bail!(
                "non-finite gradient norm at step {step} (loss {:.4e}); no update was applied and {}; \
                 a lower train.lr (now {}) or train.grad_clip usually avoids it",
                m.loss,
                rundir::on_disk(dir),
                cfg.train.lr
            );
        }
        opt.step(lr)
            .with_context(|| format!("step {step}: train.adamw = {:?}", cfg.train.adamw))?;
        m.step_s = t0.elapsed().as_secs_f64();
        state.step += 1;
        state.flops_total += m.flops;
        state.wall_s += m.step_s;
        m.tokens_per_s = tokens / m.step_s;
        m.flops_total = state.flops_total;
        m.wall_s = state.wall_s;
        m.mfu = m.flops / m.step_s / peak;
        if let Some(f) = metrics.as_mut() {
            writeln!(f, "{}", serde_json::to_string(&m)?)?;
        }
        bar.set_position(state.step as u64);
        if step % cfg.train.log_every.max(1) == 0 {
            bar.set_message(format!(
                "loss {:.3} t2i {:.3} mmu {:.3}",
                m.loss,
                m.t2i.unwrap_or(f64::NAN),
                m.mmu.unwrap_or(f64::NAN)
            ));
        }
        if leader && cfg.train.checkpoint_every > 0 && state.step % cfg.train.checkpoint_every == 0
        {
            save_checkpoint(dir, &ctx.tokenizers.digest, cfg, &vs, &opt, &state)?;
            saved = Some(state.step);
        }
    }
    bar.finish_and_clear();
    if let Some(g) = &graphs {
        let c = g.counts;
        eprintln!(
            "CUDA graphs: {} micro-batches replayed, {} captured, {} eager (first of their shape or beyond train.cuda_graphs)",
            c.replayed, c.captured, c.eager
        );
    }
    if leader && saved != Some(state.step) {
        save_checkpoint(dir, &ctx.tokenizers.digest, cfg, &vs, &opt, &state)?;
    }
    Ok(TrainSummary {
        steps: state.step,
        train_flops: state.flops_total,
        wall_s: state.wall_s,
        interrupted,
    })
}

/// Gradients are summed over the ranks in buffers of this size (DDP's default bucket).
const GRADIENT_BUCKET_BYTES: usize = 25 << 20;

/// Whether `mine` holds on any rank (on the only one without a group).
fn any_rank(ctx: &RunContext, mine: bool) -> Result<bool> {
    let Some(g) = &ctx.group else {
        return Ok(mine);
    };
    let t = Tensor::from_slice(&[mine as i32 as f32]).to_device(ctx.device);
    g.all_reduce_sum(&t)?;
    Ok(t.double_value(&[0]) > 0.0)
}

/// What a non-finite loss looked like: the per-task losses and the routers' largest scores.
fn non_finite_detail(out: &Micro) -> String {
    let per_task: Vec<String> = out
        .losses
        .per_task
        .iter()
        .map(|(t, l)| format!("{t} {:.4}", l.double_value(&[])))
        .collect();
    let scores: Vec<String> = out
        .routing
        .iter()
        .map(|s| {
            format!(
                "layer {} router |score| max {:.3e}",
                s.layer,
                s.scores.abs().max().double_value(&[])
            )
        })
        .collect();
    format!("losses: {}; {}", per_task.join(", "), scores.join("; "))
}

/// What the step reads of one micro-batch's forward, losses and backward.
pub struct Micro {
    /// The loss whose gradients were taken: the batch part's losses, router losses averaged
    /// over the parts.
    pub objective: Tensor,
    /// The losses.
    pub losses: unimod_model::Losses,
    /// Each layer's work (tokens, attention pairs) for the FLOPs count.
    pub work: Vec<unimod_model::layer::Work>,
    /// The routed layers' statistics.
    pub routing: Vec<unimod_model::layer::RoutingStats>,
}

/// Forward, losses and backward of micro-batch `b`, one of `parts` that the step's loss is
/// spread over, its per-task sums divided by the step's label counts `counts`.
pub(crate) fn micro_step(
    model: &UnifiedTransformer,
    b: &Batch,
    counts: &Tensor,
    parts: f64,
) -> Result<Micro> {
    let out = model.forward(b, &ForwardOptions::default())?;
    let losses = model.losses_over(b, &out, counts);
    // Router losses are means over a part's tokens: their mean over the parts.
    let objective = match parts > 1.0 {
        true => &losses.total - &losses.aux * (1.0 - 1.0 / parts),
        false => losses.total.shallow_clone(),
    };
    objective.backward();
    Ok(Micro {
        objective,
        losses,
        work: out.work,
        routing: out.routing,
    })
}

/// `to`'s variables set from `from`'s of the same names, cast to their kind.
fn copy_weights(from: &VarStore, to: &VarStore) {
    let src = from.variables();
    tch::no_grad(|| {
        for (name, mut v) in to.variables() {
            v.copy_(&src[&name]);
        }
    });
}

fn truncate_metrics(path: &Path, step: usize) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<StepMetrics>(l)
                .map(|m| m.step < step)
                .unwrap_or(false)
        })
        .collect();
    let mut out = kept.join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    crate::write(path, out)?;
    Ok(())
}

/// Saves the model, optimizer and state as a checkpoint of `dir`, refusing weights that are
/// not finite: a poisoned checkpoint must never replace a good one.
fn save_checkpoint(
    dir: &Path,
    tokenizers: &str,
    cfg: &RunConfig,
    vs: &VarStore,
    opt: &AdamW,
    state: &State,
) -> Result<()> {
    if let Some(name) = first_non_finite(vs) {
        bail!(
            "the weights became non-finite at step {} ({name} first); they were not saved and {}; \
             a lower train.lr (now {}) usually avoids it",
            state.step,
            rundir::on_disk(dir),
            cfg.train.lr
        );
    }
    let model_toml = toml::to_string(&cfg.model)?;
    let parts: Vec<Part> = vec![
        (
            "model.safetensors",
            Box::new(|p: &Path| {
                Ok(checkpoint::save_model(
                    p,
                    vs,
                    &model_toml,
                    Default::default(),
                )?)
            }),
        ),
        (
            "optimizer.safetensors",
            Box::new(|p: &Path| {
                Ok(checkpoint::save_tensors(
                    p,
                    &opt.state(),
                    Default::default(),
                )?)
            }),
        ),
        (
            "state.json",
            Box::new(|p: &Path| crate::write(p, serde_json::to_string(state)?)),
        ),
        (
            "run.toml",
            Box::new(|p: &Path| crate::write(p, cfg.to_toml())),
        ),
        (
            TOKENIZERS_FILE,
            Box::new(|p: &Path| crate::write(p, tokenizers)),
        ),
    ];
    rundir::save_checkpoint(dir, state.step, &parts, &mut |_| Ok(()))?;
    Ok(())
}

/// The name of the first variable of `vs` holding a NaN or an infinity.
pub fn first_non_finite(vs: &VarStore) -> Option<String> {
    let mut vars: Vec<_> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars.into_iter()
        .find(|(_, t)| !bool::try_from(t.isfinite().all()).unwrap_or(false))
        .map(|(n, _)| n)
}

fn load_checkpoint(
    ctx: &RunContext,
    dir: &Path,
    cfg: &RunConfig,
    vs: &mut VarStore,
    opt: &mut AdamW,
) -> Result<State> {
    let ck = rundir::latest_checkpoint(dir)?;
    crate::load::check_tokenizers(&ck, ctx)?;
    let model_path = ck.join("model.safetensors");
    let loaded = checkpoint::load_tensors(&model_path)?;
    let saved = checkpoint::read_config(&loaded, &model_path)?;
    if let Err(why) = checkpoint::check_config(&saved, &cfg.model) {
        bail!("cannot resume from {}: {why}", model_path.display());
    }
    checkpoint::load_into(vs, &loaded, &model_path)?;
    let state_path = ck.join("state.json");
    let state: State = serde_json::from_str(
        &std::fs::read_to_string(&state_path)
            .with_context(|| format!("reading {}", state_path.display()))?,
    )
    .with_context(|| format!("{} is corrupt", state_path.display()))?;
    let name = ck.file_name().unwrap_or_default().to_string_lossy();
    if rundir::step_of(&name).is_some_and(|s| s != state.step) {
        bail!(
            "{} says step {}, but it sits in checkpoint {name}: the checkpoint disagrees with \
             itself; refusing to resume from it",
            state_path.display(),
            state.step
        );
    }
    let run_path = ck.join("run.toml");
    let before = RunConfig::load(Some(&run_path), &[])
        .with_context(|| format!("checkpoint {}", ck.display()))?;
    resume_changes(&before, cfg, state.step)
        .with_context(|| format!("cannot resume from {}", ck.display()))?;
    let opt_path = ck.join("optimizer.safetensors");
    let o = checkpoint::load_tensors(&opt_path)?;
    opt.load_state(&o.tensors, state.step as i64)
        .map_err(|e| anyhow::anyhow!("{}: {e}", opt_path.display()))?;
    Ok(state)
}

/// Fields a resumed run may change: how long and how fast it goes on, and what it reports.
/// Anything else (model, data, format, tokenizers, the batch stream's seed, mix and
/// accumulation) would make the resumed run a different run, so it is refused.
const RESUMABLE: [&str; 13] = [
    "train.steps",
    "train.lr",
    "train.min_lr",
    "train.warmup",
    "train.weight_decay",
    "train.grad_clip",
    "train.adamw",
    "train.cuda_graphs",
    "train.device",
    "train.log_every",
    "train.checkpoint_every",
    "eval.",
    "analysis.",
];

/// Checks a resume from a checkpoint of config `before` at step `step` under config `after`
/// against the rule of [`RESUMABLE`], and prints the changes it accepts.
fn resume_changes(before: &RunConfig, after: &RunConfig, step: usize) -> Result<()> {
    if after.train.steps < step {
        bail!(
            "train.steps = {} is below the checkpoint's step {step}; raise it to at least {step}",
            after.train.steps
        );
    }
    let changes = crate::config::differences(before, after);
    let (accepted, refused): (Vec<_>, Vec<_>) = changes
        .iter()
        .filter(|(k, _, _)| !k.starts_with("experiment."))
        .partition(|(k, _, _)| {
            RESUMABLE
                .iter()
                .any(|r| k == r || (r.ends_with('.') && k.starts_with(r)))
        });
    let show = |v: &[&(String, String, String)]| {
        v.iter()
            .map(|(k, a, b)| format!("{k}: {a} → {b}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    if !refused.is_empty() {
        bail!(
            "the resumed config changes {}; only train.steps, lr, min_lr, warmup, weight_decay, \
             grad_clip, device, log_every, checkpoint_every and the eval and analysis sections may \
             change on resume (start a new run with --overwrite or another --out instead)",
            show(&refused)
        );
    }
    if !accepted.is_empty() {
        eprintln!("resuming with changes: {}", show(&accepted));
    }
    Ok(())
}

/// A stop flag set by Ctrl-C (the loop checkpoints and returns).
pub fn ctrl_c_flag() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    let f = flag.clone();
    let _ = ctrlc::set_handler(move || f.store(true, Ordering::SeqCst));
    flag
}
