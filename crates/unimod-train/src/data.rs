//! From the dataset to batches: the tokenizers (trained once, cached by a hash of their
//! configuration, reused by every run), the tokenised image pools (encoded once, cached next to
//! the tokenizers, so training never re-encodes an image), and the deterministic mixed-task
//! stream whose batch `s` is a pure function of (seed, s): resuming needs no data state.

use crate::progress;
use anyhow::{Context, Result, bail};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tch::{Device, Kind, Tensor, nn};
use unimod_tok::dataset::{Dataset, Example, Image, Split};
use unimod_tok::judge::{ShapesJudge, T2iJudge};
use unimod_tok::mnist::{Mnist, MnistConfig, MnistJudge};
use unimod_tok::shapes::ShapesConfig;
use unimod_tok::text::TextTokenizer;
use unimod_tok::vq::{self, VqConfig, VqVae};
use unimod_tok::{FormatConfig, Sequence, Task, VocabLayout, cache, tensorfile};

/// `[data]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    /// `shapes` (the embedded procedural world) or `mnist` (real digits; `cargo xtask setup`
    /// installs them).
    pub dataset: String,
    /// `[data.shapes]`: the procedural world.
    pub shapes: ShapesConfig,
    /// `[data.mnist]`: the digits.
    pub mnist: MnistConfig,
    /// Distinct training images (encoded once and cycled).
    pub train_pool: usize,
    /// Validation images for losses and generation metrics.
    pub val_pool: usize,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            dataset: "shapes".into(),
            shapes: ShapesConfig::default(),
            mnist: MnistConfig::default(),
            train_pool: 4096,
            val_pool: 256,
        }
    }
}

/// `[tokenizer]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TokenizerConfig {
    /// Target size of the text BPE, specials included.
    pub text_vocab: usize,
    /// Examples whose texts train the BPE.
    pub text_examples: u64,
    /// `[tokenizer.image]`: the VQ tokenizer.
    pub image: VqConfig,
}

impl Default for TokenizerConfig {
    fn default() -> Self {
        TokenizerConfig {
            text_vocab: 512,
            text_examples: 4000,
            image: VqConfig::default(),
        }
    }
}

/// What the tokenizer training measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenizerReport {
    /// Text tokens, specials included.
    pub text_vocab: usize,
    /// Reconstruction PSNR of test images through the VQ, in dB.
    pub psnr_db: f64,
    /// Perplexity of the codes used on test images.
    pub perplexity: f64,
    /// Codes never used on test images.
    pub dead_codes: i64,
    /// Share of test images the T2I judge reads as their ground truth (the scene, the digit),
    /// clean and through the VQ tokenizer.
    pub judge_clean: f64,
    /// The same through the VQ.
    pub judge_reconstructed: f64,
    /// Test images measured.
    pub images: usize,
    /// Time spent training both tokenizers.
    pub train_seconds: f64,
}

/// Trained tokenizers and the vocabulary layout they imply.
pub struct Tokenizers {
    /// Where they are cached.
    pub dir: PathBuf,
    /// Hash of the saved tokenizer files: checkpoints record it, so a model is never decoded
    /// with tokenizers retrained since.
    pub digest: String,
    /// The text BPE.
    pub text: TextTokenizer,
    /// The VQ's weights.
    pub vq_vs: nn::VarStore,
    /// The VQ tokenizer.
    pub vq: VqVae,
    /// What their training measured.
    pub report: TokenizerReport,
}

impl Tokenizers {
    /// Text ids first, then the codebook.
    pub fn layout(&self) -> VocabLayout {
        VocabLayout {
            n_text: self.text.vocab_size(),
            n_codes: self.vq.cfg.codebook_size as usize,
        }
    }
}

/// The dataset `[data]` names.
pub fn dataset(cfg: &DataConfig) -> Result<Arc<dyn Dataset>> {
    Ok(match cfg.dataset.as_str() {
        "shapes" => Arc::new(cfg.shapes),
        "mnist" => Arc::new(Mnist::load(&cache::mnist_pickle(), cfg.mnist)?),
        other => bail!("data.dataset = {other:?}: expected \"shapes\" or \"mnist\""),
    })
}

/// The T2I judge of the dataset `[data]` names.
pub fn judge(cfg: &DataConfig, device: Device) -> Result<Box<dyn T2iJudge>> {
    Ok(match cfg.dataset.as_str() {
        "shapes" => Box::new(ShapesJudge),
        "mnist" => Box::new(MnistJudge::load(&cache::mnist_judge_weights(), device)?),
        other => bail!("data.dataset = {other:?}: expected \"shapes\" or \"mnist\""),
    })
}

/// Bumped whenever tokenizer training changes, so cached artifacts of older code are not reused.
const ARTIFACT_VERSION: u32 = 2;

fn key(parts: &impl Serialize) -> String {
    let json = serde_json::to_string(&(ARTIFACT_VERSION, parts)).expect("configs serialise");
    short_hash([json.as_bytes()])
}

/// The first 8 bytes of the SHA-256 of `parts`, in hex.
pub fn short_hash<B: AsRef<[u8]>>(parts: impl IntoIterator<Item = B>) -> String {
    let mut hasher = Sha256::new();
    for p in parts {
        hasher.update(p);
    }
    hasher
        .finalize()
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The tokenizers for `data` + `tok`: loaded from the cache when trained before with the same
/// configuration, trained (and cached) otherwise. With `pretrained = (backbone directory, its
/// vocab_size)`, the text tokenizer is the backbone's `tokenizer.json` (copied into the cache
/// entry, whose key includes its hash) instead of a BPE trained here.
pub fn tokenizers(
    world: &dyn Dataset,
    judge: &dyn T2iJudge,
    tok: &TokenizerConfig,
    pretrained: Option<(&Path, usize)>,
    device: Device,
) -> Result<Tokenizers> {
    let backbone = match pretrained {
        Some((dir, vocab)) => {
            let path = dir.join("tokenizer.json");
            let bytes = std::fs::read(&path)
                .with_context(|| format!("train.backbone: cannot read {}", path.display()))?;
            Some((path, short_hash([bytes]), vocab))
        }
        None => None,
    };
    let key = match &backbone {
        None => key(&(world.fingerprint(), tok)),
        Some((_, hash, vocab)) => key(&(world.fingerprint(), tok, hash, vocab)),
    };
    let dir = cache::artifacts_dir().join("tokenizers").join(key);
    let text_of = |path: &Path| -> Result<TextTokenizer> {
        Ok(match &backbone {
            Some((_, _, vocab)) => TextTokenizer::pretrained(path, *vocab)?,
            None => TextTokenizer::load(path)?,
        })
    };
    let (text_path, vq_path, report_path) = (
        dir.join("tokenizer.json"),
        dir.join("vq.safetensors"),
        dir.join("report.json"),
    );
    let (text, vq_vs, vq, train_seconds) = if report_path.exists() {
        let text = text_of(&text_path)
            .with_context(|| format!("cached tokenizer in {}", dir.display()))?;
        let (vq_vs, vq) = VqVae::load(&vq_path, device)
            .with_context(|| format!("cached tokenizer in {}", dir.display()))?;
        let cached: TokenizerReport = serde_json::from_str(&std::fs::read_to_string(&report_path)?)
            .with_context(|| {
                format!("{} is corrupt: delete it to retrain", report_path.display())
            })?;
        (text, vq_vs, vq, cached.train_seconds)
    } else {
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let start = std::time::Instant::now();
        let text = match &backbone {
            Some((path, _, _)) => {
                std::fs::copy(path, &text_path).with_context(|| {
                    format!("copying {} to {}", path.display(), text_path.display())
                })?;
                text_of(&text_path)?
            }
            None => {
                let texts: Vec<String> = (0..tok.text_examples)
                    .into_par_iter()
                    .flat_map_iter(|i| texts_of(&world.example(Split::Train, i)))
                    .collect();
                TextTokenizer::train(texts.into_iter(), tok.text_vocab)?
            }
        };
        tch::manual_seed(tok.image.seed);
        let vq_vs = nn::VarStore::new(device);
        let vq = VqVae::new(&vq_vs.root(), tok.image);
        let bar = progress::bar(tok.image.steps as u64, "image tokenizer");
        let bs = tok.image.batch_size as u64;
        vq.train(
            &vq_vs,
            |step| images_tensor(world, Split::Train, step as u64 * bs, bs, device),
            |step, s| {
                bar.set_position(step as u64 + 1);
                bar.set_message(format!("mse {:.4}", s.recon));
            },
        )?;
        bar.finish_and_clear();
        if backbone.is_none() {
            text.save(&text_path)?;
        }
        vq.save(&vq_vs, &vq_path)?;
        (text, vq_vs, vq, start.elapsed().as_secs_f64())
    };
    // Measured on every load too (a second or two), so the judge figures are this code's.
    let report = TokenizerReport {
        train_seconds,
        ..measure(
            world,
            judge,
            &text,
            &vq,
            device,
            &dir.join("reconstructions.png"),
        )?
    };
    // Written last, and atomically (other runs may be reading it): its presence marks a
    // complete cache entry.
    let partial = dir.join(format!("report.json.{}.partial", std::process::id()));
    crate::write(&partial, serde_json::to_string_pretty(&report)?)?;
    std::fs::rename(&partial, &report_path).with_context(|| {
        format!(
            "renaming {} to {}",
            partial.display(),
            report_path.display()
        )
    })?;
    let files = [&text_path, &vq_path]
        .map(|path| std::fs::read(path).with_context(|| format!("reading {}", path.display())));
    let digest = short_hash(files.into_iter().collect::<Result<Vec<_>>>()?);
    Ok(Tokenizers {
        dir,
        digest,
        text,
        vq_vs,
        vq,
        report,
    })
}

/// Every text of an example: captions, questions, answers.
fn texts_of(e: &Example) -> Vec<String> {
    let mut v: Vec<String> = e.captions.iter().map(|c| c.text.clone()).collect();
    for q in &e.qa {
        v.push(q.question.clone());
        v.push(q.answer.clone());
    }
    v
}

fn images_tensor(world: &dyn Dataset, split: Split, from: u64, n: u64, device: Device) -> Tensor {
    let imgs: Vec<Image> = (from..from + n)
        .into_par_iter()
        .map(|i| world.example(split, i).image)
        .collect();
    vq::to_device(&imgs, device)
}

/// Measures the tokenizers on test images and writes 8 of them above their reconstructions.
fn measure(
    world: &dyn Dataset,
    judge: &dyn T2iJudge,
    text: &TextTokenizer,
    vq: &VqVae,
    device: Device,
    grid: &std::path::Path,
) -> Result<TokenizerReport> {
    let n = 512u64;
    let examples: Vec<Example> = (0..n)
        .into_par_iter()
        .map(|i| world.example(Split::Test, i))
        .collect();
    let imgs: Vec<Image> = examples.iter().map(|e| e.image.clone()).collect();
    let x = vq::to_device(&imgs, device);
    let codes = vq.encode(&x);
    let recon = vq.decode(&codes);
    let (perplexity, dead_codes) = vq::codebook_usage(&codes, vq.cfg.codebook_size);
    let back = Image::batch_from_tensor(&recon);
    let shown: Vec<Image> = imgs[..8].iter().chain(&back[..8]).cloned().collect();
    Image::save_grid(&shown, 8, 4, grid).with_context(|| format!("writing {}", grid.display()))?;
    Ok(TokenizerReport {
        text_vocab: text.vocab_size(),
        psnr_db: vq::psnr(&x, &recon),
        perplexity,
        dead_codes,
        judge_clean: judge.agreement(&examples, &imgs),
        judge_reconstructed: judge.agreement(&examples, &back),
        images: n as usize,
        train_seconds: 0.0,
    })
}

/// Tokenised images of one split: codes `[N, T]`, encoded once and cached.
pub struct Pool {
    /// The split its images come from.
    pub split: Split,
    /// Image `i`'s codes, row-major.
    pub codes: Vec<Vec<u32>>,
}

/// The first `n` images of `split`, encoded by the VQ (read from the cache when encoded before
/// by the same tokenizers).
pub fn pool(
    tk: &Tokenizers,
    world: &dyn Dataset,
    split: Split,
    n: usize,
    device: Device,
) -> Result<Pool> {
    let path = tk
        .dir
        .join(format!("pool-{split:?}-{n}.safetensors").to_lowercase());
    let codes = if path.exists() {
        let loaded = tensorfile::load_tensors(&path)?;
        loaded
            .tensors
            .get("codes")
            .map(|t| t.shallow_clone())
            .with_context(|| format!("{} has no codes", path.display()))?
    } else {
        let chunks: Vec<Tensor> = (0..n as u64)
            .step_by(256)
            .map(|from| {
                tk.vq
                    .encode(&images_tensor(
                        world,
                        split,
                        from,
                        256.min(n as u64 - from),
                        device,
                    ))
                    .to_device(Device::Cpu)
            })
            .collect();
        let codes = Tensor::cat(&chunks, 0);
        tensorfile::save_tensors(
            &path,
            &[("codes".into(), codes.shallow_clone())],
            Default::default(),
        )?;
        codes
    };
    // A cached pool is checked as any file read back: its shape and every code in range.
    let k = tk.vq.cfg.codebook_size;
    let size = codes.size();
    if size.len() != 2 || size[0] as usize != n || size[1] <= 0 {
        bail!(
            "{} holds codes of shape {size:?}, expected [{n}, tokens per image]; delete it to re-encode",
            path.display()
        );
    }
    let t = size[1] as usize;
    let flat = Vec::<i64>::try_from(codes.to_kind(Kind::Int64).flatten(0, -1))?;
    if let Some(bad) = flat.iter().find(|&&c| !(0..k).contains(&c)) {
        bail!(
            "{} holds code {bad}, outside the codebook's [0, {}]; delete it to re-encode",
            path.display(),
            k - 1
        );
    }
    Ok(Pool {
        split,
        codes: flat
            .chunks(t)
            .map(|c| c.iter().map(|&v| v as u32).collect())
            .collect(),
    })
}

/// Samples per task in one batch (Show-o: t2i 15 : lm 4 : mmu 10).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TaskMix {
    /// T2I samples per batch.
    pub t2i: usize,
    /// MMU samples per batch.
    pub mmu: usize,
    /// LM samples per batch.
    pub lm: usize,
}

impl Default for TaskMix {
    fn default() -> Self {
        TaskMix {
            t2i: 12,
            mmu: 12,
            lm: 0,
        }
    }
}

impl TaskMix {
    /// Samples of task `t` per batch (0 for a task without a format here).
    pub fn get(&self, t: Task) -> usize {
        match t {
            Task::T2I => self.t2i,
            Task::MMU => self.mmu,
            Task::LM => self.lm,
            _ => 0,
        }
    }
}

/// Builds the sequence of one sample of `task` from example `index` of `pool`.
#[allow(clippy::too_many_arguments)]
pub fn sequence(
    text: &TextTokenizer,
    layout: &VocabLayout,
    format: &FormatConfig,
    world: &dyn Dataset,
    pool: &Pool,
    task: Task,
    index: usize,
    rng: &mut ChaCha8Rng,
    training: bool,
) -> Result<Sequence> {
    let e = world.example(pool.split, index as u64);
    let codes = &pool.codes[index];
    Ok(match task {
        Task::T2I => {
            let fitting = fitting_captions(text, format, &e)?;
            let Some(choice) = (!fitting.is_empty()).then(|| rng.gen_range(0..fitting.len()))
            else {
                bail!(
                    "no caption of {:?} example {index} fits format.text_len = {}",
                    pool.split,
                    format.text_len
                );
            };
            format.t2i(
                layout,
                &fitting[choice].1,
                Some(codes),
                training.then_some(rng as &mut dyn rand::RngCore),
            )?
        }
        Task::MMU => {
            let mut encoded = Vec::new();
            for qa in e.qa.choose_multiple(rng, format.mmu_turns.min(e.qa.len())) {
                encoded.push((text.encode(&qa.question)?, text.encode(&qa.answer)?));
            }
            format.mmu_turns(layout, codes, &format.fitting_turns(&encoded))?
        }
        Task::LM => {
            let qa = &e.qa[rng.gen_range(0..e.qa.len())];
            let line = format!("{} . {} {}", e.captions[0].text, qa.question, qa.answer);
            let mut ids = text.encode(&line)?;
            ids.truncate(format.seq_len() - 3);
            format.lm(&ids)?
        }
        // `TaskMix` gives other tasks no samples, and the config check refuses them.
        other => bail!("the trainer has no sequence format for task `{other}`"),
    })
}

/// The captions of an example (index, token ids) whose tokens fit the format's text segment:
/// long descriptions of crowded scenes may not, and are left out rather than truncated (a
/// truncated caption would assert facts it no longer states).
pub fn fitting_captions(
    text: &TextTokenizer,
    format: &FormatConfig,
    e: &Example,
) -> Result<Vec<(usize, Vec<i64>)>> {
    let mut out = Vec::new();
    for (i, c) in e.captions.iter().enumerate() {
        let ids = text.encode(&c.text)?;
        if ids.len() + 2 <= format.text_len {
            out.push((i, ids));
        }
    }
    Ok(out)
}

/// The part of each batch a data-parallel rank builds: slot `i` of a batch belongs to rank
/// `i mod world`, so the ranks' parts interleave the tasks alike and together are the batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// This rank.
    pub rank: usize,
    /// Ranks in the run.
    pub world: usize,
}

impl Shard {
    /// The whole batch (one process).
    pub const WHOLE: Shard = Shard { rank: 0, world: 1 };
}

/// The sequences of batch `step` that `shard` builds: each task's sub-batch next to each other,
/// in task order.
#[allow(clippy::too_many_arguments)]
pub fn batch_sequences(
    text: &TextTokenizer,
    layout: &VocabLayout,
    format: &FormatConfig,
    world: &dyn Dataset,
    pool: &Pool,
    mix: &TaskMix,
    seed: u64,
    step: u64,
    training: bool,
    shard: Shard,
) -> Result<Vec<Sequence>> {
    let per_batch: usize = Task::BUILT_IN.iter().map(|t| mix.get(*t)).sum();
    let jobs: Vec<(Task, usize)> = Task::BUILT_IN
        .iter()
        .flat_map(|t| std::iter::repeat_n(*t, mix.get(*t)))
        .enumerate()
        .filter(|(slot, _)| slot % shard.world.max(1) == shard.rank)
        .map(|(slot, t)| (t, slot))
        .collect();
    jobs.into_par_iter()
        .map(|(task, slot)| {
            let mut rng = ChaCha8Rng::seed_from_u64(
                seed ^ (step.wrapping_mul(0x9E37_79B9_7F4A_7C15)) ^ ((slot as u64) << 48),
            );
            let index = ((step as usize) * per_batch + slot) % pool.codes.len();
            sequence(
                text, layout, format, world, pool, task, index, &mut rng, training,
            )
        })
        .collect()
}
