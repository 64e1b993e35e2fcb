//! `unimod`: the command line of UniMoD-rs.

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use unimod_tok::dataset::{Image, Split};
use unimod_train::rundir::Start;
use unimod_train::{RunConfig, data, eval, experiment, flops_report, optim, train};

#[derive(Parser)]
#[command(
    name = "unimod",
    version,
    about = "Efficient unified multimodal transformers: dense, MoD and UniMoD"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// `--config FILE` plus `--set key=value` overrides, shared by every subcommand that reads a config.
#[derive(Args)]
struct ConfigArgs {
    /// TOML config (defaults when omitted).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override a config field, e.g. `--set model.d_model=256` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
}

impl ConfigArgs {
    fn load(&self) -> Result<RunConfig> {
        RunConfig::load(self.config.as_deref(), &self.overrides)
    }
}

#[derive(Subcommand)]
enum TokenizerCommand {
    /// Train (or reuse, when config and hash match) the text BPE and the image VQ tokenizer.
    Train {
        #[command(flatten)]
        config: ConfigArgs,
        /// auto, cpu, cuda or cuda:N.
        #[arg(long, default_value = "auto")]
        device: String,
    },
}

#[derive(Subcommand)]
enum DataCommand {
    /// Write a PNG grid of examples and a markdown file with their captions and QA.
    Show {
        #[command(flatten)]
        config: ConfigArgs,
        #[arg(short = 'n', long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=1024))]
        count: u64,
        #[arg(long, default_value = "runs/data-show")]
        out: PathBuf,
    },
    /// Batches built per second against dense training steps per second of the config.
    Throughput {
        #[command(flatten)]
        config: ConfigArgs,
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=100_000))]
        batches: u32,
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        steps: u32,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Analysis {
    /// Attention mass on text / image / special keys, entropy, heat maps.
    Attention,
    /// Skip-one-layer loss, ARank, input/output cosine per layer.
    Importance,
    /// Loss when one layer keeps only a fraction of the tokens.
    Redundancy,
    /// Gradient cosine of the two tasks; the competition probe with `--probe`.
    Interaction,
    /// ARank-derived UniMoD schedule file.
    Schedule,
    /// Everything, into report.md with the paper's findings checked.
    All,
}

#[derive(Subcommand)]
enum Command {
    /// Train one model (tokenizers are trained or reused first).
    Train {
        #[command(flatten)]
        config: ConfigArgs,
        /// Run directory (config, metrics, checkpoints).
        #[arg(long)]
        out: PathBuf,
        /// Continue from the run directory's latest checkpoint.
        #[arg(long, conflicts_with = "overwrite")]
        resume: bool,
        /// Replace the run the directory holds (its metrics, checkpoints and evaluation).
        #[arg(long)]
        overwrite: bool,
        /// Data-parallel ranks on this machine (one per GPU on CUDA, NCCL summing the
        /// gradients); `train.mix` is the global batch, split across them (docs/distributed.md).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1024))]
        nproc: u32,
    },
    /// Evaluate a checkpoint: validation losses, T2I judge score, MMU accuracy, router agreement.
    Eval {
        /// A run directory or checkpoint folder.
        #[arg(long)]
        checkpoint: PathBuf,
        /// Overrides of the run's config (e.g. `eval.t2i_samples=128`).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// Folder for `eval.json`, the sample grid and the resolved config. Default: the run
        /// directory without `--set`; with `--set`, `<run>/evals/<digest of the overrides>`, so
        /// that the run's own evaluation is never replaced by one under other settings.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Evaluations of several settings over the same seeds side by side, each against a
    /// baseline, differences paired by seed with their 95 % intervals (markdown tables).
    Compare {
        /// Evaluation folders (`unimod eval --out`, or experiment runs), each with eval.json and
        /// eval.toml or config.toml; a name ending in `-seed<N>` joins the group of its name
        /// without the suffix.
        #[arg(required = true)]
        dirs: Vec<PathBuf>,
        /// The group the others are compared with (default: the first folder's).
        #[arg(long)]
        base: Option<String>,
        /// Also write the tables to this file.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Generate images from captions (PNG grid) and answers to questions about validation images.
    Generate {
        /// A run directory or checkpoint folder.
        #[arg(long)]
        checkpoint: PathBuf,
        /// A caption to draw (repeatable).
        #[arg(long = "prompt")]
        prompts: Vec<String>,
        /// A question about validation image `--image` (repeatable).
        #[arg(long = "question")]
        questions: Vec<String>,
        /// Index of the validation image the questions are about.
        #[arg(long, default_value_t = 0)]
        image: usize,
        /// Overrides of the run's config (e.g. `eval.sampling.guidance=3.0`).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        #[arg(long, default_value = "runs/generate")]
        out: PathBuf,
    },
    /// Analyses of a trained checkpoint (JSON, PNG plots and markdown into `--out`).
    Analyze {
        what: Analysis,
        /// A run directory or checkpoint folder (a dense model for the attention analyses).
        #[arg(long)]
        checkpoint: PathBuf,
        /// A checkpoint whose router is shared by T2I and MMU, for the competition probe.
        #[arg(long)]
        probe: Option<PathBuf>,
        /// Output folder (default: `<checkpoint>/analysis`).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Overrides of the run's config (e.g. `analysis.samples=32`).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
    },
    /// Train and evaluate every variant of `[experiment]`, compare them in one report.
    Experiment {
        #[command(flatten)]
        config: ConfigArgs,
        /// Repeat with this many seeds and report mean ± spread.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100))]
        seeds: u32,
        /// Train every variant again, even one whose run is finished with the same config,
        /// program and machine (reused by default; when only `[eval]` changed, the finished
        /// model is evaluated again into `<run>/evals/<digest>/`).
        #[arg(long)]
        fresh: bool,
        /// Reuse a finished run of the same resolved config even when another build of the
        /// program or another machine made it (for adding seeds after a change that leaves
        /// training alone; another machine rounds otherwise); the report lists each such run.
        #[arg(long, conflicts_with = "fresh")]
        reuse_other_builds: bool,
    },
    /// The paper's tables and figures beside the paper's numbers, each row with its tolerance
    /// and verdict, into `<out>/REPORT.md`; finished runs of the same config and program are
    /// reused.
    Reproduce {
        /// table2, table3, table4, table5, fig3, fig4, attention, redundancy (default: all).
        what: Vec<String>,
        /// The runs' config; `showo-1.3b.toml` and `emu3-8b.toml` are read beside it.
        #[arg(long, default_value = "configs/reproduce.toml")]
        config: PathBuf,
        /// quick (minutes: checks the command, not quality), cpu (about an hour) or gpu.
        #[arg(long, default_value = "cpu")]
        scale: String,
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
        seeds: u32,
        #[arg(long, default_value = "runs/reproduce")]
        out: PathBuf,
        /// Override a config field after the scale's own (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// Reuse a finished run of the same resolved config even when another build of the
        /// program or another machine made it (to rewrite the report after a change that leaves
        /// training alone); the runs' report lists each such run.
        #[arg(long)]
        reuse_other_builds: bool,
    },
    /// Image and text tokenizers.
    Tokenizer {
        #[command(subcommand)]
        command: TokenizerCommand,
    },
    /// Dataset inspection.
    Data {
        #[command(subcommand)]
        command: DataCommand,
    },
    /// Print libtorch's version, CUDA availability and device count, and the thread count.
    Doctor,
    /// Training steps of dense and UniMoD models side by side on any device: ms/step, MFU and
    /// wall-clock saving ÷ FLOPs saving per capacity (a markdown table).
    Bench {
        /// auto, cpu, cuda or cuda:N.
        #[arg(long, default_value = "auto")]
        device: String,
        /// Model widths to measure (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "128,512")]
        d_model: Vec<i64>,
        #[arg(long, default_value_t = 8)]
        layers: usize,
        /// T2I sequences in the batch (as many MMU sequences join them).
        #[arg(long, default_value_t = 4)]
        per_task: usize,
        /// Image side in tokens (8: 64 codes; 32: 1024 codes as Show-o at 512 px).
        #[arg(long, default_value_t = 8)]
        image_side: usize,
        /// UniMoD capacities (both tasks, every layer but the first).
        #[arg(long, value_delimiter = ',', default_value = "0.75,0.5,0.25,0.125")]
        capacities: Vec<f64>,
        /// Timed rounds (one step of every variant per round; medians reported).
        #[arg(long, default_value_t = 10)]
        rounds: usize,
        /// Instead of the shapes above: the variants of this experiment config, on one of its
        /// training batches (its model, data and task mix).
        #[arg(long, conflicts_with_all = ["d_model", "layers", "per_task", "image_side", "capacities", "decode"])]
        experiment: Option<PathBuf>,
        /// `key=value` overrides of the `--experiment` config (the value is TOML).
        #[arg(long = "set", requires = "experiment")]
        set: Vec<String>,
        /// Time KV-cached decoding instead of training steps (Emu3 flavour, causal routing):
        /// the image tokens after a T2I prompt and the answer after an MMU question.
        #[arg(long)]
        decode: bool,
        /// `f32` or `bf16`: the kind the weights and the step compute in (bf16: what a
        /// `train.precision = "bf16"` step computes, without its f32 master update); MFU is read
        /// against the matmul rate measured in the same kind.
        #[arg(long, default_value = "f32", value_parser = ["f32", "bf16"], conflicts_with = "decode")]
        precision: String,
        /// Also time each step captured in a CUDA graph and replayed (one launch per step), in
        /// rows of their own after the eager ones; CUDA devices only.
        #[arg(long, conflicts_with = "decode")]
        graph: bool,
    },
    /// Analytic forward FLOPs per sequence, dense vs the config's (or another) schedule.
    Flops {
        #[command(flatten)]
        config: ConfigArgs,
        /// A paper recipe (`showo-paper`, `emu3-paper`) or a schedule file; default: the config's.
        #[arg(long)]
        schedule: Option<String>,
        /// Task mix the total is averaged over.
        #[arg(long, default_value = "t2i=1,mmu=1")]
        mix: String,
        /// Also predict over this many of the config's real training batches (their text
        /// lengths and padding; needs its tokenizers): what an experiment counts.
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=1000))]
        batches: u32,
    },
}

/// This process's arguments without `--nproc N` (what each rank it launches runs).
fn without_nproc() -> Vec<String> {
    let mut out = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--nproc" => {
                args.next();
            }
            _ if a.starts_with("--nproc=") => {}
            _ => out.push(a),
        }
    }
    out
}

/// Errors print as one chain of causes and exit 1: `RUST_BACKTRACE=1` must not dress an
/// ordinary refusal up as a crash.
fn main() -> std::process::ExitCode {
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Doctor => {
            println!("tch / libtorch    {}", unimod_tok::cache::TORCH_VERSION);
            println!("CUDA available    {}", tch::Cuda::is_available());
            println!("CUDA devices      {}", tch::Cuda::device_count());
            println!("cuDNN available   {}", tch::Cuda::cudnn_is_available());
            println!("CPU threads       {}", tch::get_num_threads());
        }
        Command::Train {
            config,
            out,
            resume,
            overwrite,
            nproc,
        } => {
            let cfg = config.load()?;
            if nproc > 1 {
                return unimod_train::distributed::launch(nproc as usize, &without_nproc());
            }
            let device = unimod_train::device::parse(&cfg.train.device)?;
            let ctx = unimod_train::distributed::context(&cfg, device)?;
            let leader = ctx.leader();
            let cfg = ctx.resolve(&cfg)?;
            let start = match (resume, overwrite) {
                (true, _) => Start::Resume,
                (_, true) => Start::Overwrite,
                _ => Start::Fresh,
            };
            let s = train::train(&ctx, &cfg, &out, start, train::ctrl_c_flag(), None)?;
            if !leader {
                return Ok(());
            }
            println!(
                "{} steps, {:.3} training TFLOPs, {:.0} s{}; checkpoints in {}",
                s.steps,
                s.train_flops / 1e12,
                s.wall_s,
                if s.interrupted {
                    " (interrupted, resumable with --resume)"
                } else {
                    ""
                },
                out.join("checkpoints").display()
            );
        }
        Command::Compare { dirs, base, out } => {
            let evals = dirs
                .iter()
                .map(|d| unimod_train::compare::Evaluation::load(d))
                .collect::<Result<Vec<_>>>()?;
            let md = unimod_train::compare::tables(&evals, base.as_deref())?;
            println!("{md}");
            if let Some(path) = out {
                unimod_train::write(&path, &md)?;
            }
        }
        Command::Eval {
            checkpoint,
            overrides,
            out,
        } => {
            let cfg = run_config(&checkpoint, &overrides)?;
            let device = unimod_train::device::parse(&cfg.train.device)?;
            let ctx = train::RunContext::new(&cfg, device)?;
            let (_vs, model) = unimod_train::load::model_from_run(&checkpoint, &ctx)?;
            let run = if checkpoint.join("checkpoints").exists() {
                checkpoint.clone()
            } else {
                checkpoint.join("..").join("..")
            };
            let out = match (out, overrides.is_empty()) {
                (Some(out), _) => out,
                (None, true) => run.clone(),
                (None, false) => run.join("evals").join(eval::overrides_digest(&overrides)),
            };
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            // Away from the run, the evaluation keeps the config it ran under.
            if out != run {
                unimod_train::write(out.join("eval.toml"), &toml::to_string(&cfg)?)?;
            }
            let r = eval::evaluate(&ctx, &cfg, &model, &out)?;
            let json = serde_json::to_string_pretty(&r)?;
            unimod_train::write(out.join("eval.json"), &json)?;
            println!("{json}");
            eprintln!("written to {}", out.display());
        }
        Command::Generate {
            checkpoint,
            prompts,
            questions,
            image,
            overrides,
            out,
        } => {
            if prompts.is_empty() && questions.is_empty() {
                anyhow::bail!("nothing to generate: give at least one --prompt or --question");
            }
            let cfg = run_config(&checkpoint, &overrides)?;
            let device = unimod_train::device::parse(&cfg.train.device)?;
            let ctx = train::RunContext::new(&cfg, device)?;
            let (_vs, model) = unimod_train::load::model_from_run(&checkpoint, &ctx)?;
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            if !prompts.is_empty() {
                let ids: Vec<Vec<i64>> = prompts
                    .iter()
                    .map(|p| ctx.tokenizers.text.encode(p))
                    .collect::<Result<_, _>>()?;
                let imgs = eval::images(&ctx, &cfg, &model, &ids)?;
                let png = out.join("t2i.png");
                Image::save_grid(&imgs, imgs.len().min(8), 4, &png)
                    .with_context(|| format!("writing {}", png.display()))?;
                println!(
                    "{} images (row-major, in prompt order) -> {}",
                    imgs.len(),
                    png.display()
                );
            }
            if !questions.is_empty() {
                let codes = ctx.val.codes.get(image).with_context(|| {
                    format!(
                        "--image {image}: the validation pool has {} images",
                        ctx.val.codes.len()
                    )
                })?;
                let items: Vec<(&[u32], String)> = questions
                    .iter()
                    .map(|q| (codes.as_slice(), q.clone()))
                    .collect();
                let world = data::dataset(&cfg.data)?;
                let img = world.example(Split::Val, image as u64).image;
                Image::save_grid(&[img], 1, 8, &out.join("mmu-image.png"))?;
                for (q, a) in questions
                    .iter()
                    .zip(eval::answers(&ctx, &cfg, &model, &items)?)
                {
                    println!("Q: {q}\nA: {a}");
                }
            }
        }
        Command::Analyze {
            what,
            checkpoint,
            probe,
            out,
            overrides,
        } => {
            use unimod_train::analyze::{self, Analyzer};
            let cfg = run_config(&checkpoint, &overrides)?;
            let device = unimod_train::device::parse(&cfg.train.device)?;
            let ctx = train::RunContext::new(&cfg, device)?;
            let (vs, model) = unimod_train::load::model_from_run(&checkpoint, &ctx)?;
            let out = out.unwrap_or_else(|| checkpoint.join("analysis"));
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            unimod_train::write(out.join("config.toml"), cfg.to_toml())?;
            let probe = match &probe {
                None => None,
                Some(p) => {
                    let pcfg = run_config(p, &[])?;
                    let pctx = train::RunContext::new(&pcfg, device)?;
                    let (_pvs, pmodel) = unimod_train::load::model_from_run(p, &pctx)?;
                    Some((pcfg, pctx, pmodel, _pvs))
                }
            };
            let probe_ref = probe.as_ref().map(|(c, x, m, _)| (m, x, c));
            let a = Analyzer {
                ctx: &ctx,
                cfg: &cfg,
                model: &model,
                vs: &vs,
                out: out.clone(),
            };
            let md = match what {
                Analysis::Attention => a.attention()?.0,
                Analysis::Importance => a.importance()?.0,
                Analysis::Redundancy => a.redundancy()?.0,
                Analysis::Interaction => a.interaction(probe_ref)?.0,
                Analysis::Schedule => a.schedule(&a.importance()?.1)?,
                Analysis::All => {
                    let (path, _) = analyze::all(&a, probe_ref, &checkpoint)?;
                    println!("report: {}", path.display());
                    return Ok(());
                }
            };
            let path = out.join("section.md");
            unimod_train::write(&path, &md)?;
            println!("{md}\n(written to {})", path.display());
        }
        Command::Experiment {
            config,
            seeds,
            fresh,
            reuse_other_builds,
        } => {
            unimod_train::distributed::single_process("experiment")?;
            let cfg = config.load()?;
            let device = unimod_train::device::parse(&cfg.train.device)?;
            let reuse = if fresh {
                experiment::Reuse::Never
            } else if reuse_other_builds {
                experiment::Reuse::SameConfig
            } else {
                experiment::Reuse::Finished
            };
            experiment::run(&cfg, seeds, device, reuse)?;
        }
        Command::Reproduce {
            what,
            config,
            scale,
            seeds,
            out,
            overrides,
            reuse_other_builds,
        } => {
            unimod_train::distributed::single_process("reproduce")?;
            use unimod_train::reproduce::{self, Item, Request, Scale};
            let scale = Scale::parse(&scale)?;
            let items = if what.is_empty() {
                Item::ALL.to_vec()
            } else {
                what.iter()
                    .map(|w| Item::parse(w))
                    .collect::<Result<Vec<_>>>()?
            };
            let mut sets = scale.overrides();
            sets.extend(overrides);
            let cfg = RunConfig::load(Some(&config), &sets)?;
            let device = unimod_train::device::parse(&cfg.train.device)?;
            let configs = config
                .parent()
                .map_or_else(|| PathBuf::from("."), |p| p.to_path_buf());
            let rows = reproduce::run(&Request {
                cfg: &cfg,
                configs: &configs,
                items,
                scale,
                seeds,
                out: &out,
                device,
                command: std::env::args().collect::<Vec<_>>().join(" "),
                reuse: if reuse_other_builds {
                    experiment::Reuse::SameConfig
                } else {
                    experiment::Reuse::Finished
                },
            })?;
            println!("{} rows: {}", rows.len(), out.join("REPORT.md").display());
        }
        Command::Tokenizer {
            command: TokenizerCommand::Train { config, device },
        } => {
            let cfg = config.load()?;
            let device = unimod_train::device::parse(&device)?;
            let world = data::dataset(&cfg.data)?;
            let judge = data::judge(&cfg.data, device)?;
            let (tk, _) =
                unimod_train::train::tokenizers(&cfg, world.as_ref(), judge.as_ref(), device)?;
            let r = &tk.report;
            println!("tokenizers in {}", tk.dir.display());
            println!(
                "| text vocab | image codes | PSNR | perplexity | dead codes | judge (clean) | judge (reconstructed) | train s |"
            );
            println!("|---|---|---|---|---|---|---|---|");
            println!(
                "| {} | {} | {:.1} dB | {:.1} | {} | {:.1} % | {:.1} % | {:.0} |",
                r.text_vocab,
                tk.vq.cfg.codebook_size,
                r.psnr_db,
                r.perplexity,
                r.dead_codes,
                100.0 * r.judge_clean,
                100.0 * r.judge_reconstructed,
                r.train_seconds
            );
        }
        Command::Data {
            command: DataCommand::Show { config, count, out },
        } => {
            let cfg = config.load()?;
            let world = data::dataset(&cfg.data)?;
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            let examples: Vec<_> = (0..count).map(|i| world.example(Split::Train, i)).collect();
            let images: Vec<_> = examples.iter().map(|e| e.image.clone()).collect();
            let png = out.join("examples.png");
            Image::save_grid(&images, 4, 4, &png)
                .with_context(|| format!("writing {}", png.display()))?;
            let mut md = format!(
                "# {} examples (grid row-major, 4 per row)\n\n",
                world.name()
            );
            for (i, e) in examples.iter().enumerate() {
                let caps: Vec<String> = e
                    .captions
                    .iter()
                    .map(|c| format!("\"{}\"", c.text))
                    .collect();
                md.push_str(&format!("{i}. captions: {}\n", caps.join("; ")));
                for q in &e.qa {
                    md.push_str(&format!("   - {} → {}\n", q.question, q.answer));
                }
            }
            unimod_train::write(out.join("examples.md"), md)?;
            println!(
                "wrote {} and {}",
                png.display(),
                out.join("examples.md").display()
            );
        }
        Command::Data {
            command:
                DataCommand::Throughput {
                    config,
                    batches,
                    steps,
                },
        } => {
            let cfg = config.load()?;
            let device = unimod_train::device::parse(&cfg.train.device)?;
            let ctx = train::RunContext::new(&cfg, device)?;
            let cfg = ctx.resolve(&cfg)?;
            let t = train::data_throughput(&ctx, &cfg, batches as usize, steps as usize)?;
            println!(
                "{:.1} batches/s ({:.0} sequences/s) vs {:.2} dense training steps/s on {device:?}: headroom {:.1}×",
                t.batches_per_s, t.sequences_per_s, t.steps_per_s, t.headroom
            );
        }
        Command::Bench {
            device,
            d_model,
            layers,
            per_task,
            image_side,
            capacities,
            rounds,
            experiment,
            set,
            decode,
            precision,
            graph,
        } => {
            use unimod_model::bench::{self, Shape};
            // The rows of one batch's variants: eager, then (--graph) replayed CUDA graphs; and
            // the operators one step of each dispatches (≈ GPU launches).
            let rows = |label: &str, b: &unimod_tok::Batch, vs: &[bench::Variant], device, peak| {
                let timings = bench::time_steps(vs, b, device, 2, rounds);
                let mut rows = bench::table_rows(label, b, vs, &timings, peak);
                if graph {
                    let (secs, diff) = bench::time_graphed_steps(vs, b, device, 2, rounds)
                        .with_context(|| format!("--graph, {label}"))?;
                    rows.extend(bench::table_rows(
                        &format!("{label} graph"),
                        b,
                        vs,
                        &secs,
                        peak,
                    ));
                    rows.push(format!(
                        "\n{label}: a graph replay's gradients differ from an eager step's by at most {diff:.1e} of their largest entry"
                    ));
                }
                let counts = bench::op_counts(vs, b)?;
                rows.push(format!("\n{}", bench::OPS_HEADER));
                rows.extend(bench::op_rows(label, vs, &counts));
                // The update that follows each step, for the dense model.
                let mut updates = Vec::new();
                for update in [optim::Update::WrittenOut, optim::Update::Fused] {
                    let mut opt = optim::AdamW::new(&vs[0].vs, 0.01);
                    opt.update = update;
                    let (done, n) = unimod_kernels::ops::count(|| {
                        opt.clip_grad_norm(1.0)?;
                        opt.step(1e-4)
                    })?;
                    done?;
                    updates.push(format!("{update:?} {} ({})", n.kernels, n.ops));
                }
                rows.push(format!(
                    "\n{label}: operators of dense's AdamW update, computing (all): {}",
                    updates.join(", ")
                ));
                rows.push(String::new());
                anyhow::Ok(rows)
            };
            let kind = match precision.as_str() {
                "bf16" => tch::Kind::BFloat16,
                _ => tch::Kind::Float,
            };
            let in_kind = |vs: &mut Vec<bench::Variant>| {
                for v in vs {
                    v.vs.set_kind(kind);
                }
            };
            if let Some(c) = capacities.iter().find(|c| !(**c > 0.0 && **c <= 1.0)) {
                anyhow::bail!("--capacities: {c} is outside (0, 1]");
            }
            for (flag, value) in [
                ("--per-task", per_task),
                ("--image-side", image_side),
                ("--rounds", rounds),
            ] {
                if value == 0 {
                    anyhow::bail!("{flag}: 0 leaves nothing to measure; give at least 1");
                }
            }
            let device = unimod_train::device::parse(&device)?;
            if graph && !device.is_cuda() {
                anyhow::bail!(
                    "--graph: CUDA graphs need a CUDA device (--device cuda), not {device:?}"
                );
            }
            let peak = bench::matmul_rate_of(device, kind);
            let header = format!(
                "device {device:?}, measured {precision} matmul rate {:.1} GFLOP/s\n\n{}",
                peak / 1e9,
                bench::TABLE_HEADER
            );
            if let Some(path) = experiment {
                let cfg = RunConfig::load(Some(&path), &set)?;
                let ctx = train::RunContext::new(&cfg, device)?;
                let (b, mut vs, skipped) = unimod_train::experiment::bench_variants(&ctx, &cfg)
                    .with_context(|| format!("--experiment {}", path.display()))?;
                in_kind(&mut vs);
                println!("{header}");
                for row in rows(&cfg.experiment.name, &b, &vs, device, peak)? {
                    println!("{row}");
                }
                if !skipped.is_empty() {
                    println!(
                        "\nleft out (schedule from a checkpoint, their own task mix, or another variant's step at fewer steps): {}",
                        skipped.join(", ")
                    );
                }
                return Ok(());
            }
            let shape = |d_model| Shape {
                d_model,
                n_layers: layers,
                per_task,
                image_side,
            };
            if decode {
                println!("device {device:?}\n\n{}", bench::DECODE_HEADER);
                for d in d_model {
                    let rows = bench::decode_rows(shape(d), &capacities, device, rounds)
                        .with_context(|| format!("--d-model {d}"))?;
                    for row in rows {
                        println!("{row}");
                    }
                }
                return Ok(());
            }
            println!("{header}");
            for d in d_model {
                let (b, mut vs) = bench::variants(shape(d), &capacities, device)
                    .with_context(|| format!("--d-model {d}"))?;
                in_kind(&mut vs);
                for row in rows(&format!("d{d}×{layers}"), &b, &vs, device, peak)? {
                    println!("{row}");
                }
            }
        }
        Command::Flops {
            config,
            schedule,
            mix,
            batches,
        } => {
            let cfg = config.load()?;
            let schedule = match schedule {
                Some(s) => flops_report::parse_schedule(&s)?,
                None => cfg.model.routing.schedule.clone(),
            };
            let r = flops_report::report(&cfg, &schedule, &flops_report::parse_mix(&mix)?)?;
            print!("{}", r.table);
            if batches > 0 {
                let ctx = train::RunContext::new(&cfg, tch::Device::Cpu)?;
                let cfg = ctx.resolve(&cfg)?;
                let real = (0..batches as u64)
                    .map(|s| ctx.batch(&cfg, Split::Train, s, true))
                    .collect::<Result<Vec<_>>>()?;
                print!("{}", flops_report::over_batches(&cfg, &schedule, &real)?);
            }
        }
    }
    Ok(())
}

/// The config a run was trained with, with `--set` overrides applied on top. The checkpoint
/// fixes the model, the sequence format and the tokenizers, so overrides of those are refused
/// rather than ignored.
fn run_config(checkpoint: &std::path::Path, overrides: &[String]) -> Result<RunConfig> {
    for o in overrides {
        let key = o.split('=').next().unwrap_or_default().trim();
        if ["model", "format", "tokenizer"]
            .iter()
            .any(|s| key == *s || key.starts_with(&format!("{s}.")))
        {
            anyhow::bail!(
                "--set {o}: the checkpoint fixes the model, format and tokenizer sections; only \
                 data, train.device, eval and analysis settings can be changed here"
            );
        }
    }
    let run_toml = unimod_train::rundir::latest_checkpoint(checkpoint)?.join("run.toml");
    RunConfig::load(Some(&run_toml), overrides)
}
