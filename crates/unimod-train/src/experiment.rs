//! The main job: the same data, steps and seed for several routing variants (dense, plain MoD,
//! UniMoD, …), each trained and evaluated, compared in one table — training FLOPs and
//! wall-clock (and both as savings vs the first variant), T2I judge score, MMU accuracy,
//! validation losses — written with plots to `runs/<experiment>/report.md`.

use crate::analyze::Analyzer;
use crate::data::TaskMix;
use crate::eval::{self, EvalReport};
use crate::rundir::Start;
use crate::train::{self, RunContext, TrainSummary};
use crate::{RunConfig, plots};
use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use unimod_analysis::stats::{self, Estimate};
use unimod_model::bench;
use unimod_router::Schedule;
use unimod_tok::Segment;

/// One compared variant: a name, and what replaces the config's routing schedule and task mix.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Variant {
    /// Its name in reports and its run directory (`<name>-seed<N>`).
    pub name: String,
    /// The routing schedule; exactly one of `schedule` and `arank_of` is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<Schedule>,
    /// Derive the schedule from the checkpoint of this earlier (dense) variant, same seed, by
    /// `[analysis.schedule]`'s ARank rule — the paper's analysis-then-prune recipe in one run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arank_of: Option<String>,
    /// Samples per task in a batch (default `train.mix`): the paper's Table 2 trains T2I-only,
    /// MMU-only and joint models on one budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mix: Option<TaskMix>,
    /// Segments this variant's routers may prune (default `model.routing.routable`): γ-MoD's
    /// masked routing leaves questions out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routable: Option<Vec<Segment>>,
    /// Any other setting of this variant, as `--set` overrides of the run config (for example
    /// `["model.mot=true"]` for Mixture-of-Transformers); not `experiment.*`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub set: Vec<String>,
    /// Train for as many steps as spend the counted training FLOPs of this earlier variant
    /// (same seed) instead of `train.steps`: the equal-compute control (dense at UniMoD's
    /// FLOPs: is routing better than training a dense model for fewer steps?). The learning-rate
    /// schedule spans the steps the variant takes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flops_of: Option<String>,
}

impl Variant {
    /// `cfg` with this variant's schedule, task mix, routable segments and overrides.
    fn apply(&self, cfg: &RunConfig, schedule: Schedule) -> Result<RunConfig> {
        let mut c = cfg.with_overrides(&self.set)?;
        c.model.routing.schedule = schedule;
        c.train.mix = self.mix.unwrap_or(cfg.train.mix);
        if let Some(r) = &self.routable {
            c.model.routing.routable = r.clone();
        }
        Ok(c)
    }
}

/// Every variant names a schedule or an earlier variant to derive one from, and names are unique.
fn check_variants(variants: &[Variant]) -> Result<()> {
    if variants.is_empty() {
        bail!("experiment.variants is empty: name at least one variant (a name and a schedule)");
    }
    for (i, v) in variants.iter().enumerate() {
        let earlier = &variants[..i];
        if earlier.iter().any(|e| e.name == v.name) {
            bail!("experiment.variants: the name {:?} is used twice", v.name);
        }
        if let Some(o) = v
            .set
            .iter()
            .find(|o| o.trim_start().starts_with("experiment"))
        {
            bail!(
                "experiment.variants.{}: set = {o:?}: a variant cannot change the experiment itself",
                v.name
            );
        }
        if let Some(base) = &v.flops_of
            && !earlier.iter().any(|e| &e.name == base)
        {
            bail!(
                "experiment.variants.{}: flops_of = {base:?} names no earlier variant",
                v.name
            );
        }
        match (&v.schedule, &v.arank_of) {
            (Some(_), None) => {}
            (None, Some(base)) if earlier.iter().any(|e| &e.name == base) => {}
            (None, Some(base)) => bail!(
                "experiment.variants.{}: arank_of = {base:?} names no earlier variant",
                v.name
            ),
            _ => bail!(
                "experiment.variants.{}: give exactly one of `schedule` and `arank_of`",
                v.name
            ),
        }
    }
    Ok(())
}

fn run_dir(dir: &Path, variant: &str, seed: u64) -> PathBuf {
    dir.join(format!("{variant}-seed{seed}"))
}

/// The ARank schedule of `base_dir`'s checkpoint (trained in this experiment's context),
/// written with its analysis into `out`.
fn arank_schedule(ctx: &RunContext, base_dir: &Path, out: &Path) -> Result<Schedule> {
    let (base_cfg, vs, model) = crate::load::run_from_checkpoint(base_dir, ctx)?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let a = Analyzer {
        ctx,
        cfg: &base_cfg,
        model: &model,
        vs: &vs,
        out: out.to_path_buf(),
    };
    let section = a.importance()?.1;
    crate::write(out.join("schedule.md"), a.schedule(&section)?)?;
    Ok(Schedule::File {
        path: out.join("schedule.json"),
    })
}

/// The training FLOPs that step `step` of `cfg` (resolved) spends, predicted on its own batches
/// (all its micro-batches): the analytic count the trainer makes of the tokens each layer
/// processes ([`crate::flops_report::over_batches`]), so a run counts the same.
pub fn step_flops(ctx: &RunContext, cfg: &RunConfig, step: usize) -> Result<f64> {
    let acc = cfg.train.accumulation.max(1);
    let batches = (0..acc)
        .map(|micro| {
            let at = (step * acc + micro) as u64;
            ctx.batch(cfg, unimod_tok::dataset::Split::Train, at, true)
        })
        .collect::<Result<Vec<_>>>()?;
    let forward = crate::flops_report::over_batches(cfg, &cfg.model.routing.schedule, &batches)?;
    Ok(forward.routed.total() * unimod_model::flops::TRAIN_MULTIPLIER)
}

/// The number of steps of `cfg` (resolved) whose predicted training FLOPs ([`step_flops`]) come
/// nearest to `target`, with those FLOPs.
pub fn steps_for_flops(ctx: &RunContext, cfg: &RunConfig, target: f64) -> Result<(usize, f64)> {
    // Far beyond any budget an equal-compute control needs: a target this far off is a mistake.
    let limit = 100 * cfg.train.steps.max(1);
    let mut spent = 0.0;
    for step in 0..limit {
        let f = step_flops(ctx, cfg, step)?;
        // Stop at the step count nearer the target: this one, or the one that adds `step`.
        if spent + f / 2.0 > target {
            return Ok((step, spent));
        }
        spent += f;
    }
    bail!(
        "spending {target:.3e} training FLOPs would take more than {limit} steps of this variant \
         (100 × train.steps)"
    )
}

/// `[experiment]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ExperimentConfig {
    /// The experiment's directory name under `out_dir`.
    pub name: String,
    /// Where experiments write.
    pub out_dir: PathBuf,
    /// The first variant is the baseline savings are measured against.
    pub variants: Vec<Variant>,
}

impl Default for ExperimentConfig {
    fn default() -> Self {
        ExperimentConfig {
            name: "experiment".into(),
            out_dir: "runs".into(),
            variants: Vec::new(),
        }
    }
}

/// One variant's outcome for one seed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Outcome {
    /// The variant's name.
    pub variant: String,
    /// The seed.
    pub seed: u64,
    /// What training did.
    pub train: TrainSummary,
    /// What evaluation measured.
    pub eval: EvalReport,
    /// What produced the scores: the training's digest with the `[eval]` settings, the program
    /// and the machine that evaluated it.
    #[serde(default)]
    pub digest: String,
    /// What trained the model: the digest of its resolved config without `[eval]`, the program
    /// and the machine; empty in runs made before it was recorded (their `digest` then stands
    /// for the training too).
    #[serde(default)]
    pub train_digest: String,
    /// The machine it was trained on ([`crate::device::machine`]); empty in runs made before
    /// it was recorded.
    #[serde(default)]
    pub machine: String,
}

impl Outcome {
    /// The training this outcome's model came from.
    fn trained_by(&self) -> &str {
        if self.train_digest.is_empty() {
            &self.digest
        } else {
            &self.train_digest
        }
    }
}

/// Whether a variant whose run directory already holds a finished run of the same config, by
/// the same program, is trained again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reuse {
    /// Reuse it (training is deterministic on one machine: the result would be the same). A
    /// model whose training is unchanged but whose `[eval]` settings are not is evaluated
    /// again, not trained again.
    Finished,
    /// Reuse a finished run of the same resolved config even when another build of the program
    /// or another machine made it: for adding seeds after a change that leaves training and
    /// evaluation alone, where retraining the seeds already run would cost hours. Another
    /// machine rounds otherwise, so its run is not the one this machine would make (moving
    /// scores as much as another seed does: docs/results.md): the report lists every such run
    /// with the machine that made it.
    SameConfig,
    /// Train every variant again.
    Never,
}

/// What training reads of a resolved run config: all of it but `[eval]` (read only by the
/// evaluation), `[analysis]` and `[experiment]` (the other variants).
fn train_text(cfg: &RunConfig) -> String {
    let mut cfg = cfg.clone();
    cfg.eval = Default::default();
    cfg.experiment = Default::default();
    cfg.analysis = Default::default();
    cfg.to_toml()
}

/// The running program: a digest of its binary.
fn program() -> Result<&'static str> {
    static PROGRAM: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    if let Some(p) = PROGRAM.get() {
        return Ok(p);
    }
    let exe = std::env::current_exe().context("locating the running program")?;
    let bytes = std::fs::read(&exe).with_context(|| format!("reading {}", exe.display()))?;
    Ok(PROGRAM.get_or_init(|| crate::data::short_hash([bytes])))
}

/// The digest of a run's training: its config as training reads it, the program and the
/// machine. A model trained with all three unchanged is the model this run would train.
fn train_digest(cfg: &RunConfig, machine: &str) -> Result<String> {
    Ok(crate::data::short_hash([
        train_text(cfg).as_bytes(),
        program()?.as_bytes(),
        machine.as_bytes(),
    ]))
}

/// The digest of an outcome: the training that made its model (`trained_by`) evaluated under
/// `cfg`'s `[eval]` by this program on this machine.
fn outcome_digest(trained_by: &str, cfg: &RunConfig, machine: &str) -> Result<String> {
    Ok(crate::data::short_hash([
        trained_by.as_bytes(),
        toml::to_string(&cfg.eval)?.as_bytes(),
        program()?.as_bytes(),
        machine.as_bytes(),
    ]))
}

/// Where a run's evaluation under `cfg`'s `[eval]` settings other than its own goes: beside
/// the run's own (which is kept), in a folder named by the settings.
fn eval_dir(run_dir: &Path, cfg: &RunConfig) -> Result<PathBuf> {
    let settings = toml::to_string(&cfg.eval)?;
    Ok(run_dir
        .join("evals")
        .join(crate::data::short_hash([settings])))
}

/// What an experiment can take from a variant's run directory; the flag is true when another
/// build of the program or another machine made it.
enum Prior {
    /// Nothing: train and evaluate.
    Nothing,
    /// This outcome, as it is.
    Outcome(Outcome, bool),
    /// The model of this outcome, whose training is the one asked for but whose evaluation
    /// is not: evaluate it again.
    Model(Outcome, bool),
}

/// What `reuse` lets a run of `cfg` on `machine` take from `run_dir`.
fn prior(run_dir: &Path, cfg: &RunConfig, machine: &str, reuse: Reuse) -> Result<Prior> {
    let read = |p: PathBuf| -> Option<Outcome> {
        serde_json::from_str(&std::fs::read_to_string(p).ok()?).ok()
    };
    // A saved config is read back through the current schema, so a field added since (with
    // its default) does not count as a difference; one the run set otherwise does.
    let saved = |p: PathBuf| RunConfig::load(Some(&p), &[]).ok();
    let run = match (reuse, read(run_dir.join("outcome.json"))) {
        (Reuse::Never, _) | (_, None) => return Ok(Prior::Nothing),
        (_, Some(run)) => run,
    };
    let other = run.train_digest != train_digest(cfg, machine)?;
    if other
        && !(reuse == Reuse::SameConfig
            && saved(run_dir.join("config.toml"))
                .is_some_and(|s| train_text(&s) == train_text(cfg)))
    {
        return Ok(Prior::Nothing);
    }
    let want = outcome_digest(run.trained_by(), cfg, machine)?;
    let elsewhere = eval_dir(run_dir, cfg)?;
    let evaluations = [
        (Some(run.clone()), run_dir.join("config.toml")),
        (
            read(elsewhere.join("outcome.json")),
            elsewhere.join("eval.toml"),
        ),
    ];
    for (o, settings) in evaluations {
        let Some(o) = o.filter(|o| o.trained_by() == run.trained_by()) else {
            continue;
        };
        if o.digest == want {
            return Ok(Prior::Outcome(o, other));
        }
        if reuse == Reuse::SameConfig && saved(settings).is_some_and(|s| s.eval == cfg.eval) {
            return Ok(Prior::Outcome(o, true));
        }
    }
    Ok(Prior::Model(run, other))
}

/// Trains and evaluates every variant for every seed (reusing outcomes of the same config and
/// program where `reuse` allows, and evaluating again a reused model whose `[eval]` settings
/// changed), then writes the report, its plots and `outcomes.json`.
pub fn run(cfg: &RunConfig, seeds: u32, device: tch::Device, reuse: Reuse) -> Result<Vec<Outcome>> {
    let exp = &cfg.experiment;
    check_variants(&exp.variants)?;
    let dir = exp.out_dir.join(&exp.name);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    crate::write(dir.join("config.toml"), cfg.to_toml())?;
    let ctx = RunContext::new(cfg, device)?;
    let stop = train::ctrl_c_flag();
    let mut outcomes = Vec::new();
    let mut other_builds = Vec::new();
    let machine = crate::device::machine(device);
    for s in 0..seeds as u64 {
        for v in &exp.variants {
            let seed = cfg.train.seed + s;
            let run_dir = run_dir(&dir, &v.name, seed);
            let schedule = match &v.arank_of {
                Some(base) => arank_schedule(
                    &ctx,
                    &self::run_dir(&dir, base, seed),
                    &run_dir.join("arank"),
                )
                .with_context(|| format!("variant {}: ARank schedule of {base}", v.name))?,
                None => v.schedule.clone().unwrap_or_default(),
            };
            let mut c = v
                .apply(cfg, schedule)
                .with_context(|| format!("variant {}: its `set`", v.name))?;
            c.train.seed = seed;
            let mut c = ctx
                .resolve(&c)
                .with_context(|| format!("variant {}", v.name))?;
            if let Some(base) = &v.flops_of {
                let target = outcomes
                    .iter()
                    .find(|o: &&Outcome| &o.variant == base && o.seed == seed)
                    .map(|o| o.train.train_flops)
                    .with_context(|| {
                        format!("variant {}: no run of {base} (seed {seed})", v.name)
                    })?;
                let (steps, _) = steps_for_flops(&ctx, &c, target)
                    .with_context(|| format!("variant {}: flops_of = {base:?}", v.name))?;
                if steps == 0 {
                    bail!(
                        "variant {}: {base}'s {target:.3e} training FLOPs are less than one step of it",
                        v.name
                    );
                }
                c.train.steps = steps;
            }
            let prior = prior(&run_dir, &c, &machine, reuse)?;
            let by = match &prior {
                Prior::Outcome(o, true) | Prior::Model(o, true) => {
                    let elsewhere = match o.machine.as_str() {
                        m if m == machine => String::new(),
                        "" => ", machine not recorded".into(),
                        m => format!(", made on {m}"),
                    };
                    other_builds.push((v.name.clone(), seed, elsewhere));
                    "another build of the program or another machine"
                }
                _ => "program",
            };
            let (train, trained_by, made_on, out) = match prior {
                Prior::Outcome(o, _) => {
                    eprintln!(
                        "== {} (seed {seed}): reusing {} (same config and {by})",
                        v.name,
                        run_dir.display()
                    );
                    // The folder is this variant's: a run copied in from an experiment that
                    // named the variant otherwise (the same training, checked above) counts
                    // under this experiment's name.
                    outcomes.push(Outcome {
                        variant: v.name.clone(),
                        ..o
                    });
                    continue;
                }
                Prior::Model(o, _) => {
                    let out = eval_dir(&run_dir, &c)?;
                    eprintln!(
                        "== {} (seed {seed}): reusing the model of {} (same training and {by}), \
                         evaluating it under this [eval] into {}",
                        v.name,
                        run_dir.display(),
                        out.display()
                    );
                    std::fs::create_dir_all(&out)
                        .with_context(|| format!("creating {}", out.display()))?;
                    crate::write(out.join("eval.toml"), c.to_toml())?;
                    let trained_by = o.trained_by().to_string();
                    (o.train, trained_by, o.machine, out)
                }
                Prior::Nothing => {
                    eprintln!("== {} (seed {seed}): {}", v.name, run_dir.display());
                    let summary =
                        train::train(&ctx, &c, &run_dir, Start::Overwrite, stop.clone(), None)?;
                    if summary.interrupted {
                        bail!(
                            "interrupted: {} checkpointed at step {}",
                            run_dir.display(),
                            summary.steps
                        );
                    }
                    let trained_by = train_digest(&c, &machine)?;
                    (summary, trained_by, machine.clone(), run_dir.clone())
                }
            };
            let (_vs, model) = crate::load::model_from_run(&run_dir, &ctx)?;
            let report = eval::evaluate(&ctx, &c, &model, &out)?;
            crate::write(
                out.join("eval.json"),
                serde_json::to_string_pretty(&report)?,
            )?;
            let outcome = Outcome {
                variant: v.name.clone(),
                seed,
                train,
                eval: report,
                digest: outcome_digest(&trained_by, &c, &machine)?,
                train_digest: trained_by,
                machine: made_on,
            };
            crate::write(
                out.join("outcome.json"),
                serde_json::to_string_pretty(&outcome)?,
            )?;
            outcomes.push(outcome);
        }
    }
    crate::write(
        dir.join("outcomes.json"),
        serde_json::to_string_pretty(&outcomes)?,
    )?;
    let table = table(&outcomes, &exp.variants);
    println!("{table}");
    let figures = plots::experiment(&dir, &outcomes)?;
    write_report(&dir, cfg, &ctx, &table, &figures, &outcomes, &other_builds)?;
    println!("report: {}", dir.join("report.md").display());
    Ok(outcomes)
}

/// The experiment's variants as benchmark variants stepping side by side on one real training
/// batch (the config's task mix): sequential training runs on a shared machine compare wall
/// times badly, interleaved steps do not. A dense reference comes first (the first variant when
/// it is dense); variants that derive their schedule from a checkpoint (`arank_of`) or change the
/// task mix are left out, named in the second value.
pub fn bench_variants(
    ctx: &RunContext,
    cfg: &RunConfig,
) -> Result<(unimod_tok::Batch, Vec<bench::Variant>, Vec<String>)> {
    let exp = &cfg.experiment;
    check_variants(&exp.variants)?;
    let mut dense = cfg.clone();
    dense.model.routing.schedule = Schedule::Dense;
    let dense = ctx.resolve(&dense)?;
    let b = ctx.batch(&dense, unimod_tok::dataset::Split::Train, 0, true)?;
    let mut variants = Vec::new();
    let mut skipped = Vec::new();
    if !matches!(exp.variants[0].schedule, Some(Schedule::Dense)) {
        variants.push(bench::variant(
            "dense".into(),
            &dense.model,
            &b,
            ctx.device,
        )?);
    }
    for v in &exp.variants {
        // A variant at another's FLOPs steps as its schedule does: timing it again says nothing.
        match (&v.schedule, v.mix) {
            (Some(s), None) if v.flops_of.is_none() => {
                let c = ctx
                    .resolve(&v.apply(cfg, s.clone())?)
                    .with_context(|| format!("variant {}", v.name))?;
                variants.push(bench::variant(v.name.clone(), &c.model, &b, ctx.device)?);
            }
            _ => skipped.push(v.name.clone()),
        }
    }
    Ok((b, variants, skipped))
}

/// Mean and sample standard deviation (0 for one value).
pub(crate) fn mean_spread(v: &[f64]) -> (f64, f64) {
    let n = v.len().max(1) as f64;
    let m = v.iter().sum::<f64>() / n;
    let spread = if v.len() > 1 {
        (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
    } else {
        0.0
    };
    (m, spread)
}

/// Mean (± spread over seeds); "-" where the metric does not exist (a task the variant never
/// trained has no validation loss).
pub(crate) fn cell(v: &[f64], scale: f64, digits: usize) -> String {
    let (m, s) = mean_spread(v);
    if m.is_nan() {
        "-".into()
    } else if v.len() > 1 {
        format!("{:.*} ± {:.*}", digits, m * scale, digits, s * scale)
    } else {
        format!("{:.*}", digits, m * scale)
    }
}

/// The comparison table (mean ± sample standard deviation over seeds).
pub fn table(outcomes: &[Outcome], variants: &[Variant]) -> String {
    let of = |name: &str| {
        outcomes
            .iter()
            .filter(|o| o.variant == name)
            .collect::<Vec<_>>()
    };
    let base = of(&variants[0].name);
    let base_flops = mean_spread(&base.iter().map(|o| o.train.train_flops).collect::<Vec<_>>()).0;
    let base_wall = mean_spread(&base.iter().map(|o| o.train.wall_s).collect::<Vec<_>>()).0;
    let frechet = outcomes.iter().any(|o| o.eval.t2i_frechet.is_some());
    let mut t = String::new();
    let _ = writeln!(
        t,
        "| variant | train TFLOPs | FLOPs saved | wall s | time saved | T2I judge % |{} MMU acc % | val t2i | val mmu |",
        if frechet { " T2I Fréchet |" } else { "" }
    );
    let _ = writeln!(
        t,
        "|---|---|---|---|---|---|{}---|---|---|",
        if frechet { "---|" } else { "" }
    );
    for v in variants {
        let o = of(&v.name);
        let get = |f: &dyn Fn(&Outcome) -> f64| o.iter().map(|x| f(x)).collect::<Vec<f64>>();
        let flops = get(&|x| x.train.train_flops);
        let wall = get(&|x| x.train.wall_s);
        let frechet_cell = if frechet {
            format!(
                " {} |",
                cell(&get(&|x| x.eval.t2i_frechet.unwrap_or(f64::NAN)), 1.0, 1)
            )
        } else {
            String::new()
        };
        let _ = writeln!(
            t,
            "| {} | {} | {:.1} % | {} | {:.1} % | {} |{frechet_cell} {} | {} | {} |",
            v.name,
            cell(&flops, 1e-12, 2),
            100.0 * (1.0 - mean_spread(&flops).0 / base_flops),
            cell(&wall, 1.0, 0),
            100.0 * (1.0 - mean_spread(&wall).0 / base_wall),
            cell(&get(&|x| x.eval.t2i_overall), 100.0, 1),
            cell(&get(&|x| x.eval.mmu_accuracy), 100.0, 1),
            cell(&get(&|x| val_loss(x, "t2i")), 1.0, 3),
            cell(&get(&|x| val_loss(x, "mmu")), 1.0, 3),
        );
    }
    t
}

/// Per T2I category and MMU question kind, each variant's accuracy (mean over seeds) and, in
/// the last rows, the controls a model that learned nothing reaches: the prompt-scrambled
/// generations of the baseline for T2I, the image-blind answerer for MMU.
pub fn breakdown(outcomes: &[Outcome], variants: &[Variant]) -> String {
    let keys = |f: &dyn Fn(&Outcome) -> Vec<String>| {
        let mut k: Vec<String> = outcomes.iter().flat_map(f).collect();
        k.sort();
        k.dedup();
        k
    };
    let t2i = keys(&|o| o.eval.t2i_per_category.keys().cloned().collect());
    let mmu = keys(&|o| o.eval.mmu_per_kind.keys().cloned().collect());
    let mut t = String::new();
    let head: Vec<String> = t2i
        .iter()
        .map(|k| format!("T2I {k}"))
        .chain(mmu.iter().map(|k| format!("MMU {k}")))
        .collect();
    let _ = writeln!(t, "| variant | {} |", head.join(" | "));
    let _ = writeln!(t, "|---|{}", "---|".repeat(head.len()));
    let row = |name: &str, of: &[&Outcome], t2i_map: Score2, mmu_map: Score2| {
        let mean = |k: &String, f: Score2| {
            let v: Vec<f64> = of.iter().filter_map(|o| f(o).get(k).copied()).collect();
            cell(if v.is_empty() { &[f64::NAN] } else { &v }, 100.0, 0)
        };
        let cells: Vec<String> = t2i
            .iter()
            .map(|k| mean(k, t2i_map))
            .chain(mmu.iter().map(|k| mean(k, mmu_map)))
            .collect();
        format!("| {name} | {} |\n", cells.join(" | "))
    };
    for v in variants {
        let of: Vec<&Outcome> = outcomes.iter().filter(|o| o.variant == v.name).collect();
        t.push_str(&row(
            &v.name,
            &of,
            |o| &o.eval.t2i_per_category,
            |o| &o.eval.mmu_per_kind,
        ));
    }
    let base: Vec<&Outcome> = outcomes
        .iter()
        .filter(|o| variants.first().is_some_and(|v| v.name == o.variant))
        .collect();
    t.push_str(&row(
        &format!(
            "*control: {} under scrambled prompts; image-blind answers*",
            variants.first().map_or("", |v| v.name.as_str())
        ),
        &base,
        |o| &o.eval.t2i_per_category_scrambled,
        |o| &o.eval.mmu_blind_per_kind,
    ));
    t
}

/// A per-key table of one outcome.
type Score2 = fn(&Outcome) -> &std::collections::BTreeMap<String, f64>;

/// NaN for a task the variant has no validation loss of (it never trained on it).
fn val_loss(o: &Outcome, task: &str) -> f64 {
    o.eval.val_loss.get(task).copied().unwrap_or(f64::NAN)
}

/// Reads one number off an outcome.
pub type Score = fn(&Outcome) -> f64;

/// A quality metric of the verdicts.
#[derive(Clone, Copy)]
pub struct Metric {
    /// Its name in the report.
    pub label: &'static str,
    /// How it is read off an outcome.
    pub score: Score,
    /// The level of a model that learned nothing (`None`: the uniform loss).
    floor: Option<Score>,
    floor_name: &'static str,
    /// Samples behind an accuracy; `None` for a loss (lower is better).
    samples: Option<usize>,
}

impl Metric {
    /// The factor to the report's units: accuracies in points, losses as they are.
    fn scale(&self) -> f64 {
        if self.samples.is_some() { 100.0 } else { 1.0 }
    }
}

/// The quality metrics every comparison reports: T2I whole captions and facts, MMU accuracy
/// (each with its control), and the validation losses.
pub fn metrics(cfg: &RunConfig) -> [Metric; 5] {
    [
        Metric {
            label: "T2I judge",
            score: |o| o.eval.t2i_overall,
            floor: Some(|o| o.eval.t2i_overall_scrambled.unwrap_or(0.0)),
            floor_name: "the same generations under scrambled prompts",
            samples: Some(cfg.eval.t2i_samples),
        },
        // At least one fact per caption: the caption count makes the binomial error conservative.
        Metric {
            label: "T2I facts",
            score: |o| o.eval.t2i_facts,
            floor: Some(|o| o.eval.t2i_facts_scrambled.unwrap_or(0.0)),
            floor_name: "the same generations under scrambled prompts",
            samples: Some(cfg.eval.t2i_samples),
        },
        Metric {
            label: "MMU accuracy",
            score: |o| o.eval.mmu_accuracy,
            floor: Some(|o| o.eval.mmu_blind.unwrap_or(0.0)),
            floor_name: "an image-blind answerer",
            samples: Some(cfg.eval.mmu_samples),
        },
        Metric {
            label: "val t2i loss",
            score: |o| val_loss(o, "t2i"),
            floor: None,
            floor_name: "a uniform prediction",
            samples: None,
        },
        Metric {
            label: "val mmu loss",
            score: |o| val_loss(o, "mmu"),
            floor: None,
            floor_name: "a uniform prediction",
            samples: None,
        },
    ]
}

/// Is a variant within its baseline on one metric?
#[derive(Debug, Clone, PartialEq)]
pub enum Within {
    /// At most the tolerance worse than the baseline.
    Within,
    /// Worse than the baseline by more than the tolerance.
    Outside,
    /// The comparison cannot tell, and what would settle it.
    Inconclusive(String),
}

/// A variant's mean on one metric against the baseline's (see the report's "How to read it").
#[derive(Debug, Clone)]
pub struct Against {
    /// The baseline's mean.
    pub base: f64,
    /// The variant's mean.
    pub ours: f64,
    /// The variant minus the baseline, paired over seeds (see [`difference`]): what the verdict
    /// reads, and what a correction for many comparisons reads.
    pub difference: Estimate,
    /// The verdict.
    pub verdict: Within,
    /// Whether the variant is *better* than the baseline beyond the tolerance (a verdict of
    /// within says only that it is not worse).
    pub better: bool,
    /// 100 for accuracies (reported in points), 1 for losses.
    pub scale: f64,
}

impl Against {
    /// The largest loss still "within": the half-width of the difference's 95 % interval.
    pub fn tolerance(&self) -> f64 {
        self.difference.half_width()
    }
}

/// Variant `name` against `base` on metric `m`, over the seeds both ran; `None` when either has
/// no score (a task it never trained).
pub fn against(
    outcomes: &[Outcome],
    base: &str,
    name: &str,
    m: &Metric,
    cfg: &RunConfig,
) -> Option<Against> {
    let (b, x) = (
        scores(outcomes, base, m.score),
        scores(outcomes, name, m.score),
    );
    let ((mb, _), (mx, _)) = (mean_spread(&b), mean_spread(&x));
    if mb.is_nan() || mx.is_nan() || b.is_empty() || x.is_empty() {
        return None;
    }
    let d = difference(outcomes, base, name, m);
    let tolerance = d.half_width();
    // The baseline's margin over the level of a model that learned nothing of what the metric
    // measures: the same generations with scrambled prompts, an image-blind answerer (each
    // paired with the baseline's own seed); for losses a uniform prediction over the vocabulary.
    let margin = match m.floor {
        Some(floor) => {
            let (fl, sc) = by_seed(
                &seeded(outcomes, base, floor),
                &seeded(outcomes, base, m.score),
            );
            Estimate::paired(&fl, &sc).at_least(binomial(m.samples, mb, 1, fl.len()))
        }
        None => {
            let e = Estimate::mean_of(&b);
            Estimate {
                mean: (cfg.model.vocab.size() as f64).ln() - e.mean,
                ..e
            }
        }
    };
    let floor_level = if m.samples.is_some() {
        mb - margin.mean
    } else {
        mb + margin.mean
    };
    // Worse is lower for an accuracy, higher for a loss.
    let worse_by = if m.samples.is_some() {
        mb - mx
    } else {
        mx - mb
    };
    let scale = m.scale();
    let verdict = if tolerance.is_nan() {
        Within::Inconclusive("no tolerance from one seed: run `--seeds 3`".into())
    } else if !margin.shown() || margin.mean <= 0.0 {
        // Above its floor on average but not by its interval, the baseline may have learned
        // and be measured too noisily (64 prompts made the main job's dense so on one machine:
        // docs/results.md); at or below it, it has not learned.
        let settle = if margin.mean > 0.0 {
            "more seeds (`--seeds`) or samples (`eval.*_samples`), or more training steps \
             (`train.steps`), would settle it"
                .to_string()
        } else {
            format!(
                "more training steps (`train.steps`) until {base} learns the task would settle it"
            )
        };
        Within::Inconclusive(format!(
            "{base} is not above the level of {} ({:.3}) beyond its 95 % interval (±{:.3}), so there is nothing to lose; {settle}",
            m.floor_name,
            scale * floor_level,
            scale * margin.half_width()
        ))
    } else if tolerance >= margin.mean {
        Within::Inconclusive(format!(
            "the tolerance is as wide as {base}'s margin over {} ({:.3}), so a variant that learned nothing would pass; more seeds (`--seeds`) or samples (`eval.*_samples`) would settle it",
            m.floor_name,
            scale * margin.mean
        ))
    } else if worse_by <= tolerance {
        Within::Within
    } else {
        Within::Outside
    };
    Some(Against {
        base: mb,
        ours: mx,
        difference: d,
        better: verdict == Within::Within && -worse_by > tolerance,
        verdict,
        scale,
    })
}

impl std::fmt::Display for Within {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Within::Within => write!(f, "**within**"),
            Within::Outside => write!(f, "**outside**"),
            Within::Inconclusive(why) => write!(f, "**inconclusive**: {why}"),
        }
    }
}

/// Per variant: FLOPs saved and, for each quality metric, the difference to the baseline
/// against its tolerance (see the report's "How to read it"). A difference beyond its tolerance
/// also says whether it survives Holm's correction for all of the section's comparisons.
fn verdicts(outcomes: &[Outcome], variants: &[Variant], cfg: &RunConfig) -> String {
    let metrics = metrics(cfg);
    let base = &variants[0].name;
    // Per variant, each metric it has a verdict on.
    let rows: Vec<(&Variant, Vec<_>)> = variants[1..]
        .iter()
        .map(|v| {
            let against = metrics
                .iter()
                .filter_map(|m| Some((m, against(outcomes, base, &v.name, m, cfg)?)))
                .collect();
            (v, against)
        })
        .collect();
    let p_values: Vec<f64> = rows
        .iter()
        .flat_map(|(_, r)| r.iter().map(|(_, a)| a.difference.p_value()))
        .collect();
    let (family, mut holds) = corrected(&p_values);
    let mut md = family_size(family);
    for (v, against) in rows {
        let _ = writeln!(
            md,
            "- **{}**: {:.1} % of {base}'s training FLOPs saved",
            v.name,
            100.0 * flops_saved(outcomes, base, &v.name)
        );
        for (m, a) in against {
            let holds = holds.next().unwrap_or(false);
            let unit = if m.samples.is_some() { " points" } else { "" };
            let beyond = a.verdict == Within::Outside || a.better;
            let better = if a.better {
                ", and better beyond it"
            } else {
                ""
            };
            let _ = writeln!(
                md,
                "  - {}: {:.3} vs {:.3} (Δ {:+.3}{unit}, tolerance {:.3}{}) → {}{better}{}",
                m.label,
                a.scale * a.ours,
                a.scale * a.base,
                a.scale * (a.ours - a.base),
                a.scale * a.tolerance(),
                per_seed(outcomes, base, &v.name, m, 3),
                a.verdict,
                if beyond {
                    holm_note(family, holds)
                } else {
                    String::new()
                }
            );
        }
    }
    md.push_str(&equal_flops(outcomes, variants, &metrics));
    md.push('\n');
    md
}

/// How many of `p_values` are comparisons (not NaN), and for each whether it survives Holm's
/// correction for all of them.
pub(crate) fn corrected(p_values: &[f64]) -> (usize, std::vec::IntoIter<bool>) {
    let family = p_values.iter().filter(|p| !p.is_nan()).count();
    (family, stats::holm(p_values).into_iter())
}

/// The line opening a section of `family` comparisons read at 95 % each.
fn family_size(family: usize) -> String {
    if family < 2 {
        return String::new();
    }
    format!(
        "{family} comparisons below; read one at a time, about {:.1} of them would be shown by chance alone were every difference zero, so each one beyond its interval says whether it holds under Holm's correction for all {family}.\n\n",
        0.05 * family as f64
    )
}

/// What a difference beyond its interval adds about Holm's correction for its section's
/// `family` comparisons (nothing for a section of one).
pub(crate) fn holm_note(family: usize, holds: bool) -> String {
    match (family > 1, holds) {
        (false, _) => String::new(),
        (true, true) => format!(", and under Holm's correction for the {family}"),
        (true, false) => {
            format!(", but not under Holm's correction for the {family}: it may be chance")
        }
    }
}

/// `", per seed +x, +y, …"`: `b − a` on metric `m` for each seed both ran, in the report's units
/// (points for accuracies), so a reader sees whether a mean difference is every seed's or one
/// seed's; empty for fewer than two seeds, where the mean is that seed's.
fn per_seed(outcomes: &[Outcome], a: &str, b: &str, m: &Metric, digits: usize) -> String {
    let (xa, xb) = by_seed(&seeded(outcomes, a, m.score), &seeded(outcomes, b, m.score));
    if xa.len() < 2 {
        return String::new();
    }
    let scale = m.scale();
    let each: Vec<String> = xa
        .iter()
        .zip(&xb)
        .map(|(x, y)| format!("{:+.digits$}", scale * (y - x)))
        .collect();
    format!(", per seed {}", each.join(", "))
}

/// Share of `base`'s mean training FLOPs that variant `name` saves (NaN without outcomes).
pub fn flops_saved(outcomes: &[Outcome], base: &str, name: &str) -> f64 {
    let flops = |n: &str| mean_spread(&scores(outcomes, n, |o| o.train.train_flops)).0;
    1.0 - flops(name) / flops(base)
}

/// `b − a` on metric `m`, paired over the seeds both ran (see [`paired_difference`]).
pub fn difference(outcomes: &[Outcome], a: &str, b: &str, m: &Metric) -> Estimate {
    paired_difference(
        &seeded(outcomes, a, m.score),
        &seeded(outcomes, b, m.score),
        m.samples,
    )
}

/// `b − a` over the seeds both have (each score a `(seed, score)`): a seed gives both the same
/// data order and evaluation set, so what it shares cancels. For an accuracy over `samples`
/// scored items, its standard error is at least their binomial error. NaN error for a loss
/// of one seed.
pub fn paired_difference(a: &[(u64, f64)], b: &[(u64, f64)], samples: Option<usize>) -> Estimate {
    let (xa, xb) = by_seed(a, b);
    let p = (mean_spread(&xa).0 + mean_spread(&xb).0) / 2.0;
    Estimate::paired(&xa, &xb).at_least(binomial(samples, p, 2, xa.len()))
}

/// The binomial standard error of a sum of `terms` independent accuracies near `p`, each over
/// `samples` scored items and averaged over `seeds` seeds; 0 for a loss (`samples` `None`).
/// `p` is taken as Agresti and Coull's (x + 2) / (n + 4), so a score of 0 or 1 keeps an error:
/// 0 of 64 right does not make a rate known exactly.
fn binomial(samples: Option<usize>, p: f64, terms: usize, seeds: usize) -> f64 {
    samples.map_or(0.0, |n| {
        let scored = (n.max(1) * seeds.max(1)) as f64;
        let p = (p.clamp(0.0, 1.0) * scored + 2.0) / (scored + 4.0);
        (terms as f64 * p * (1.0 - p) / scored).sqrt()
    })
}

/// Score `f` of every outcome (seed) of variant `name`, with its seed.
pub(crate) fn seeded(outcomes: &[Outcome], name: &str, f: Score) -> Vec<(u64, f64)> {
    outcomes
        .iter()
        .filter(|o| o.variant == name)
        .map(|o| (o.seed, f(o)))
        .collect()
}

/// The scores of `a` and `b` matched by seed, over the seeds both have.
pub(crate) fn by_seed(a: &[(u64, f64)], b: &[(u64, f64)]) -> (Vec<f64>, Vec<f64>) {
    a.iter()
        .filter_map(|(seed, x)| Some((*x, b.iter().find(|(s, _)| s == seed)?.1)))
        .unzip()
}

/// How many seeds both variants ran: the pairs a paired difference between them rests on.
pub(crate) fn seeds_in_common(outcomes: &[Outcome], a: &str, b: &str) -> usize {
    let seed = |o: &Outcome| o.seed as f64;
    by_seed(&seeded(outcomes, a, seed), &seeded(outcomes, b, seed))
        .0
        .len()
}

/// One score of every outcome (seed) of variant `name`.
pub(crate) fn scores(outcomes: &[Outcome], name: &str, f: Score) -> Vec<f64> {
    outcomes
        .iter()
        .filter(|o| o.variant == name)
        .map(f)
        .collect()
}

/// Variants of (nearly) equal training FLOPs compared with each other, not only with the
/// baseline: the comparison the paper's claims are about (UniMoD vs plain MoD at one budget).
/// Pairs whose mean FLOPs differ by less than 2 % of the baseline's; a difference is **shown**
/// when it lies outside its 95 % interval ([`difference`]). Read one at a time, one in twenty
/// true nulls would be shown, and a report of several routed variants makes dozens of these
/// comparisons; so each shown difference also says whether it survives Holm's correction for
/// all of the section's comparisons (a 5 % chance that any of them is chance).
fn equal_flops(outcomes: &[Outcome], variants: &[Variant], metrics: &[Metric]) -> String {
    let base = &variants[0].name;
    let mut pairs = Vec::new();
    for (i, a) in variants.iter().enumerate().skip(1) {
        for b in &variants[i + 1..] {
            let (sa, sb) = (
                flops_saved(outcomes, base, &a.name),
                flops_saved(outcomes, base, &b.name),
            );
            // NaN FLOPs (a variant without outcomes) never pair.
            if (sa - sb).abs().is_nan() || (sa - sb).abs() >= 0.02 {
                continue;
            }
            // A score one of them lacks (a task it did not train) has no difference.
            let differences: Vec<(&Metric, Estimate)> = metrics
                .iter()
                .map(|m| (m, difference(outcomes, &a.name, &b.name, m)))
                .filter(|(_, d)| !d.mean.is_nan())
                .collect();
            pairs.push((a, b, sa, sb, differences));
        }
    }
    let p_values: Vec<f64> = pairs
        .iter()
        .flat_map(|(.., ds)| ds.iter().map(|(_, d)| d.p_value()))
        .collect();
    let (family, mut holds) = corrected(&p_values);
    let mut md = family_size(family);
    for (a, b, sa, sb, differences) in pairs {
        let _ = writeln!(
            md,
            "- **{} vs {}** at equal FLOPs ({:.1} vs {:.1} % saved):",
            b.name,
            a.name,
            100.0 * sb,
            100.0 * sa
        );
        let seeds = seeds_in_common(outcomes, &a.name, &b.name);
        for (m, d) in differences {
            let corrected = holm_note(family, holds.next().unwrap_or(false));
            let direction = if d.mean > 0.0 { "higher" } else { "lower" };
            let verdict = if d.half_width().is_nan() {
                "**inconclusive**: one seed gives a loss no spread; `--seeds 3` would settle it"
                    .into()
            } else if d.shown() && seeds < 2 {
                format!(
                    "**shown on this seed's evaluation only**: {} {direction}{corrected}; with one seed the spread between training runs is unmeasured, `--seeds 3` would settle it",
                    b.name,
                )
            } else if d.shown() {
                format!("**shown**: {} {direction}{corrected}", b.name)
            } else {
                "**not shown** (within its 95 % interval); more seeds would settle it".into()
            };
            let scale = m.scale();
            let (digits, unit) = match m.samples {
                Some(_) => (1, " points"),
                None => (3, ""),
            };
            let _ = writeln!(
                md,
                "  - {}: {:.digits$} vs {:.digits$} (Δ {:+.digits$} ± {:.digits$}{unit}, 95 % interval{}) → {verdict}",
                m.label,
                scale * mean_spread(&scores(outcomes, &b.name, m.score)).0,
                scale * mean_spread(&scores(outcomes, &a.name, m.score)).0,
                scale * d.mean,
                scale * d.half_width(),
                per_seed(outcomes, &a.name, &b.name, m, digits)
            );
        }
    }
    md
}

/// The reused runs (variant, seed, where they were made) as a list the report reads: each
/// variant's seeds made in one place together, in order of first appearance.
fn reused_runs(runs: &[(String, u64, String)]) -> String {
    let mut groups: Vec<(&str, &str, Vec<u64>)> = Vec::new();
    for (variant, seed, made) in runs {
        match groups
            .iter_mut()
            .find(|(v, m, _)| v == variant && m == made)
        {
            Some((_, _, seeds)) => seeds.push(*seed),
            None => groups.push((variant, made, vec![*seed])),
        }
    }
    let list: Vec<String> = groups
        .iter()
        .map(|(variant, made, seeds)| {
            let numbers: Vec<String> = seeds.iter().map(u64::to_string).collect();
            let plural = if seeds.len() > 1 { "s" } else { "" };
            format!("{variant} (seed{plural} {}{made})", numbers.join(", "))
        })
        .collect();
    list.join(", ")
}

fn write_report(
    dir: &Path,
    cfg: &RunConfig,
    ctx: &RunContext,
    table: &str,
    figures: &[(String, PathBuf)],
    outcomes: &[Outcome],
    other_builds: &[(String, u64, String)],
) -> Result<()> {
    let mut r = String::new();
    writeln!(r, "# Experiment `{}`\n", cfg.experiment.name)?;
    writeln!(
        r,
        "Written by `unimod experiment` ({} steps per run, batch t2i {} : mmu {} : lm {}, d_model {}, {} layers, {} image tokens per image). \
         Mean ± sample standard deviation over seeds where more than one seed ran.\n",
        cfg.train.steps,
        cfg.train.mix.t2i,
        cfg.train.mix.mmu,
        cfg.train.mix.lm,
        cfg.model.d_model,
        cfg.model.n_layers,
        cfg.format.image_tokens()
    )?;
    let machine = crate::device::machine(ctx.device);
    writeln!(
        r,
        "Computed on {machine}; a run made on another machine would round otherwise, and the \
         same seed can then score as differently as another seed (docs/conventions.md, \"Determinism\").\n"
    )?;
    if !other_builds.is_empty() {
        writeln!(
            r,
            "Reused from another build of the program or another machine (same resolved config, `--reuse-other-builds`): {}.\n",
            reused_runs(other_builds)
        )?;
    }
    writeln!(r, "{table}")?;
    writeln!(
        r,
        "Accuracy % per T2I fact category and MMU question kind (a fact category counts the facts of that kind \
         that hold; MMU kinds are exact match):\n\n{}",
        breakdown(outcomes, &cfg.experiment.variants)
    )?;
    if let Some(blind) = outcomes.first().and_then(|o| o.eval.t2i_facts_prompt_blind) {
        writeln!(
            r,
            "T2I facts of a perfect generator that ignores its prompt (real validation images, each under the next \
             example's caption): {:.1} %. A variant above it follows its prompts.\n",
            100.0 * blind
        )?;
    }
    for v in &cfg.experiment.variants {
        if let Some(m) = v.mix {
            writeln!(
                r,
                "- {}: batch t2i {} : mmu {} : lm {}",
                v.name, m.t2i, m.mmu, m.lm
            )?;
        }
        if let Some(base) = &v.arank_of {
            writeln!(
                r,
                "- {}: schedule from the ARank of {base}'s checkpoint (`{}-seed{}/arank/schedule.md`)",
                v.name, v.name, cfg.train.seed
            )?;
        }
        if let Some(base) = &v.flops_of {
            let steps: Vec<String> = outcomes
                .iter()
                .filter(|o| o.variant == v.name)
                .map(|o| format!("{} (seed {})", o.train.steps, o.seed))
                .collect();
            writeln!(
                r,
                "- {}: trained for the steps that spend {base}'s training FLOPs: {}",
                v.name,
                steps.join(", ")
            )?;
        }
    }
    writeln!(r)?;
    writeln!(
        r,
        "**How to read it.** FLOPs are the analytic training FLOPs of the tokens each layer really processed \
         (attention, routers and head included; docs/flops.md). The T2I judge score is the share of generated images \
         whose caption facts all hold ({} validation captions, {} MMU questions), T2I facts the share of all asserted facts \
         that hold (off the floor long before whole captions are), MMU accuracy the exact-match share of greedy \
         answers decoded {}. `wall s` is each run's own training time, the runs one after another \
         on a machine that may have been doing other work, so its time saved is indicative only: \
         `unimod bench --experiment <config>` times the variants' steps side by side, with intervals \
         (docs/benchmarks.md). Variants are compared seed by seed (a seed gives every variant the same \
         data order and evaluation set), and a difference is read against its 95 % interval: Student's t at the \
         seeds' degrees of freedom (4.30 for three seeds) times the standard error of the paired differences, that \
         error at least the binomial error of the samples scored for an accuracy (then the normal 1.96; so one seed \
         still gets an honest, if wide, tolerance for accuracies; losses need `--seeds`). A variant is **within** the \
         baseline when its mean is worse by at most that half-width (and **better beyond it** when it \
         leads by more). With one seed, a difference between two variants beyond the binomial error is \
         **shown on this seed's evaluation only**: the spread between training runs is then unmeasured. A verdict is **inconclusive** when it cannot \
         discriminate: the baseline is not above the level of a model that learned nothing by its own 95 % interval \
         (T2I: the same generations scored under scrambled prompts; MMU: an image-blind answerer that gives each \
         question's most common training answer; losses: a uniform prediction), or the tolerance is as wide as the \
         baseline's margin over that level. Each section counts the comparisons it makes; read one at a time, one in \
         twenty would be beyond its interval were every difference zero, so each difference beyond its interval also \
         says whether it holds under Holm's step-down correction for all of them (a 5 % chance that any is chance).\n",
        cfg.eval.t2i_samples,
        cfg.eval.mmu_samples,
        match cfg.eval.decode_routing {
            crate::eval::DecodeRouting::Causal => "with the causal routing decoding uses",
            crate::eval::DecodeRouting::TopKPrefix =>
                "by top-k over the prefix, recomputed at every token (`eval.decode_routing`)",
        }
    )?;
    r.push_str(&verdicts(outcomes, &cfg.experiment.variants, cfg));
    let t = &ctx.tokenizers.report;
    writeln!(
        r,
        "Tokenizers: text BPE {} tokens; VQ {} codes, PSNR {:.1} dB, perplexity {:.1}, T2I judge reads {:.1} % of clean test images and {:.1} % of their reconstructions as their ground truth.\n",
        t.text_vocab,
        ctx.tokenizers.vq.cfg.codebook_size,
        t.psnr_db,
        t.perplexity,
        100.0 * t.judge_clean,
        100.0 * t.judge_reconstructed
    )?;
    for o in outcomes {
        if let Some(a) = o.eval.predictor_agreement {
            writeln!(
                r,
                "- {} (seed {}): causal predictor vs top-k precision {:.2}, recall {:.2}; router threshold {}",
                o.variant,
                o.seed,
                a.precision,
                a.recall,
                o.eval.router_agreement.map_or("-".into(), |b| format!(
                    "precision {:.2}, recall {:.2}",
                    b.precision, b.recall
                ))
            )?;
        }
        if let Some(a) = o.eval.expert_agreement {
            writeln!(
                r,
                "- {} (seed {}): MoMa's auxiliary routers vs expert choice precision {:.2}, recall {:.2}",
                o.variant, o.seed, a.precision, a.recall
            )?;
        }
        if let Some(t) = &o.eval.mmu_teacher_forced {
            writeln!(
                r,
                "- {} (seed {}): MMU teacher-forced, deciding by top-k {:.1} %, by the causal decisions {:.1} %, by top-k with the image's other questions after it {:.1} %, with as many filler tokens after it {:.1} %",
                o.variant,
                o.seed,
                100.0 * t.top_k,
                100.0 * t.causal,
                100.0 * t.top_k_followed,
                100.0 * t.top_k_filled
            )?;
        }
        if !o.eval.val_loss_causal.is_empty() {
            let gap =
                |task: &str| match (o.eval.val_loss.get(task), o.eval.val_loss_causal.get(task)) {
                    (Some(a), Some(c)) => format!("{task} {a:.3} → {c:.3}"),
                    _ => format!("{task} -"),
                };
            // Where top-k could read the answer before it is given (eval.rs, `Lookahead`).
            let ahead = o.eval.lookahead.map_or(String::new(), |l| {
                format!(
                    "; the answer read ahead: its first token's log-probability moves {:.4} nats, {:.0} % of {} predictions change",
                    l.log_prob_shift,
                    100.0 * l.moved,
                    l.probed
                )
            });
            writeln!(
                r,
                "- {} (seed {}): validation loss deciding by top-k / expert choice → by the causal decisions decoding uses: {}, {}{ahead}",
                o.variant,
                o.seed,
                gap("t2i"),
                gap("mmu")
            )?;
        }
    }
    writeln!(r)?;
    for (title, path) in figures {
        let rel = path.strip_prefix(dir).unwrap_or(path);
        writeln!(r, "## {title}\n\n![{title}]({})\n", rel.display())?;
    }
    for o in outcomes.iter().filter(|o| o.seed == cfg.train.seed) {
        writeln!(
            r,
            "## Samples: {}\n\n![{}]({}-seed{}/t2i-samples.png)\n",
            o.variant, o.variant, o.variant, o.seed
        )?;
    }
    crate::write(dir.join("report.md"), r)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reused_runs_group_each_variants_seeds_by_machine() {
        let run = |v: &str, s: u64, m: &str| (v.to_string(), s, m.to_string());
        let runs = [
            run("dense", 0, ""),
            run("unimod", 0, ", made on X"),
            run("dense", 1, ""),
            run("dense", 2, ", made on X"),
            run("unimod", 1, ", made on X"),
        ];
        assert_eq!(
            reused_runs(&runs),
            "dense (seeds 0, 1), unimod (seeds 0, 1, made on X), dense (seed 2, made on X)"
        );
    }

    fn outcome(variant: &str, seed: u64, mmu: f64, blind: f64) -> Outcome {
        let mut eval = EvalReport {
            mmu_accuracy: mmu,
            mmu_blind: Some(blind),
            ..Default::default()
        };
        eval.val_loss.insert("mmu".into(), 1.0 + seed as f64 * 0.01);
        Outcome {
            variant: variant.into(),
            seed,
            train: TrainSummary {
                train_flops: 1.0,
                ..Default::default()
            },
            eval,
            digest: String::new(),
            train_digest: String::new(),
            machine: String::new(),
        }
    }

    fn variant(name: &str) -> Variant {
        Variant {
            name: name.into(),
            schedule: Some(Schedule::Dense),
            arank_of: None,
            mix: None,
            routable: None,
            set: Vec::new(),
            flops_of: None,
        }
    }

    fn variants() -> Vec<Variant> {
        ["dense", "mod"].map(variant).to_vec()
    }

    /// The MMU line of the verdicts on `outcomes`.
    fn mmu_line(outcomes: &[Outcome]) -> String {
        let mut cfg = RunConfig::default();
        cfg.eval.mmu_samples = 1000;
        let md = verdicts(outcomes, &variants(), &cfg);
        md.lines()
            .find(|l| l.contains("MMU accuracy"))
            .unwrap()
            .to_string()
    }

    #[test]
    fn variants_at_equal_flops_are_compared_with_each_other() {
        let names = ["dense", "unimod", "mod-equal", "mod"];
        let vs: Vec<Variant> = names.iter().map(|n| variant(n)).collect();
        let mut outcomes = Vec::new();
        for s in 0..3 {
            for (name, flops, mmu) in [
                ("dense", 2.0, 0.8),
                ("unimod", 1.5, 0.78 + 0.01 * s as f64),
                ("mod-equal", 1.51, 0.60 + 0.01 * s as f64),
                ("mod", 1.2, 0.5),
            ] {
                let mut o = outcome(name, s, mmu, 0.3);
                o.train.train_flops = flops;
                outcomes.push(o);
            }
        }
        let mut cfg = RunConfig::default();
        cfg.eval.mmu_samples = 10_000;
        let md = verdicts(&outcomes, &vs, &cfg);
        let pair = md
            .lines()
            .skip_while(|l| !l.contains("mod-equal vs unimod"))
            .collect::<Vec<_>>();
        assert!(!pair.is_empty(), "{md}");
        assert!(!md.contains("vs mod**"), "unequal FLOPs paired: {md}");
        let mmu = pair.iter().find(|l| l.contains("MMU accuracy")).unwrap();
        assert!(mmu.contains("**shown**: mod-equal lower"), "{mmu}");
        // Three comparisons of the pair have an error (the MMU losses are equal in every seed);
        // 18 points in every seed survives the correction for them.
        assert!(
            mmu.ends_with("and under Holm's correction for the 3"),
            "{mmu}"
        );
        // Each seed's own difference, in points, so one seed's outlier is visible.
        assert!(mmu.contains("per seed -18.0, -18.0, -18.0)"), "{mmu}");
        // Losses are paired too, in their own units: the same per-seed loss in both is no
        // difference.
        let loss = pair.iter().find(|l| l.contains("val mmu loss")).unwrap();
        assert!(!md.contains("val t2i loss: NaN"), "{md}");
        assert!(
            loss.contains(
                "1.010 vs 1.010 (Δ +0.000 ± 0.000, 95 % interval, per seed +0.000, +0.000, +0.000) → **not shown**"
            ),
            "{loss}"
        );
        let line = |outcomes: &[Outcome]| {
            verdicts(outcomes, &vs, &cfg)
                .lines()
                .skip_while(|l| !l.contains("mod-equal vs unimod"))
                .find(|l| l.contains("MMU accuracy"))
                .unwrap()
                .to_string()
        };
        // Each seed moves both variants alike (seeds 10 points apart) and mod-equal is one point
        // below unimod in every seed: paired, that is shown; compared as unpaired means it would
        // be within the seeds' spread.
        let set = |outcomes: &mut Vec<Outcome>, name: &str, per_seed: [f64; 3]| {
            for o in outcomes.iter_mut().filter(|o| o.variant == name) {
                o.eval.mmu_accuracy = per_seed[o.seed as usize];
            }
        };
        set(&mut outcomes, "unimod", [0.70, 0.80, 0.90]);
        set(&mut outcomes, "mod-equal", [0.69, 0.79, 0.89]);
        let l = line(&outcomes);
        assert!(l.contains("**shown**: mod-equal lower"), "{l}");
        // One point apart on average but not in every seed: not shown.
        set(&mut outcomes, "mod-equal", [0.72, 0.77, 0.88]);
        let l = line(&outcomes);
        assert!(l.contains("**not shown**"), "{l}");
        assert!(l.contains("per seed +2.0, -3.0, -2.0)"), "{l}");
        // One seed, 20 points apart: beyond the binomial error, but training noise is unmeasured.
        set(&mut outcomes, "mod-equal", [0.50, 0.60, 0.70]);
        let one: Vec<Outcome> = outcomes.into_iter().filter(|o| o.seed == 0).collect();
        let l = line(&one);
        assert!(
            l.contains("**shown on this seed's evaluation only**") && !l.contains("per seed"),
            "{l}"
        );
        let md = verdicts(&one, &vs, &cfg);
        let loss = md
            .lines()
            .skip_while(|l| !l.contains("mod-equal vs unimod"))
            .find(|l| l.contains("val mmu loss"))
            .unwrap();
        assert!(loss.contains("**inconclusive**: one seed"), "{loss}");
    }

    #[test]
    fn a_single_comparison_has_nothing_to_correct_for() {
        assert_eq!(family_size(1), "");
        assert_eq!(holm_note(1, false), "");
        assert!(family_size(2).starts_with("2 comparisons below"));
        assert!(holm_note(2, false).contains("it may be chance"));
    }

    #[test]
    fn many_equal_flops_comparisons_are_corrected_for() {
        let vs: Vec<Variant> = ["dense", "a", "b", "c"].map(variant).to_vec();
        let mut outcomes = Vec::new();
        for s in 0..3usize {
            let a = [0.70, 0.80, 0.90][s];
            // MMU below a per seed, in points: b by 2, 3, 4 (t 5.2 on 2 degrees of freedom, p
            // 0.035: shown alone); c by 10, 10, 11 (p 0.001). T2I scores shuffle among them.
            for (name, flops, mmu, t2i) in [
                ("dense", 2.0, 0.8, 0.5),
                ("a", 1.5, a, [0.20, 0.30, 0.25][s]),
                ("b", 1.5, a - [0.02, 0.03, 0.04][s], [0.25, 0.20, 0.30][s]),
                ("c", 1.5, a - [0.10, 0.10, 0.11][s], [0.30, 0.25, 0.20][s]),
            ] {
                let mut o = outcome(name, s as u64, mmu, 0.3);
                o.train.train_flops = flops;
                o.eval.t2i_overall = t2i;
                outcomes.push(o);
            }
        }
        let mut cfg = RunConfig::default();
        cfg.eval.mmu_samples = 1_000_000;
        let md = verdicts(&outcomes, &vs, &cfg);
        let mmu_of = |pair: &str| {
            md.lines()
                .skip_while(|l| !l.contains(pair))
                .find(|l| l.contains("MMU accuracy"))
                .unwrap_or_else(|| panic!("{pair}: {md}"))
                .to_string()
        };
        // Three pairs × the three scores with an error (whole captions, facts under their
        // binomial floor, MMU); the MMU losses are equal in every seed, which tests nothing.
        assert!(md.contains("9 comparisons below"), "{md}");
        let b = mmu_of("**b vs a**");
        assert!(
            b.contains(
                "**shown**: b lower, but not under Holm's correction for the 9: it may be chance"
            ),
            "{b}"
        );
        let c = mmu_of("**c vs a**");
        assert!(
            c.contains("**shown**: c lower, and under Holm's correction for the 9"),
            "{c}"
        );
        assert!(mmu_of("**c vs b**").contains("and under Holm's"), "{md}");
        // The section against the baseline counts its own comparisons: 25 points of captions
        // below dense in every seed hold; a verdict of within says nothing of Holm.
        let first = md.lines().next().unwrap();
        assert!(
            first.ends_with("under Holm's correction for all 9."),
            "{md}"
        );
        let a = md
            .lines()
            .skip_while(|l| !l.starts_with("- **a**"))
            .collect::<Vec<_>>();
        assert!(
            a[1].contains("T2I judge")
                && a[1].ends_with("**outside**, and under Holm's correction for the 9"),
            "{md}"
        );
        assert!(a[3].contains("MMU") && a[3].ends_with("**within**"), "{md}");
    }

    #[test]
    fn breakdown_shows_every_kind_with_its_control() {
        let mut d = outcome("dense", 0, 0.8, 0.3);
        d.eval.mmu_per_kind.insert("color".into(), 0.9);
        d.eval.mmu_blind_per_kind.insert("color".into(), 0.125);
        d.eval.t2i_per_category.insert("position".into(), 0.5);
        d.eval
            .t2i_per_category_scrambled
            .insert("position".into(), 0.02);
        let mut m = outcome("mod", 0, 0.7, 0.3);
        m.eval.mmu_per_kind.insert("count".into(), 0.6);
        let t = breakdown(&[d, m], &variants());
        let rows: Vec<&str> = t.lines().collect();
        assert_eq!(
            rows[0],
            "| variant | T2I position | MMU color | MMU count |"
        );
        assert_eq!(rows[2], "| dense | 50 | 90 | - |");
        assert_eq!(rows[3], "| mod | - | - | 60 |");
        assert!(
            rows[4].contains("control") && rows[4].ends_with("| 2 | 12 | - |"),
            "{}",
            rows[4]
        );
    }

    #[test]
    fn a_baseline_at_its_floor_gives_no_verdict() {
        // dense at the image-blind level: "within" would be empty, so it is inconclusive
        let at_floor: Vec<_> = (0..3)
            .flat_map(|s| {
                [
                    outcome("dense", s, 0.50, 0.50),
                    outcome("mod", s, 0.49, 0.50),
                ]
            })
            .collect();
        let line = mmu_line(&at_floor);
        assert!(
            line.contains("**inconclusive**") && line.contains("image-blind"),
            "{line}"
        );
        assert!(line.contains("until dense learns the task"), "{line}");
        // Above the floor on average but spread too widely to show it: the measurement, not
        // only the training, may be what falls short.
        let noisy: Vec<_> = [0.55, 0.90, 0.60]
            .into_iter()
            .enumerate()
            .flat_map(|(s, acc)| {
                [
                    outcome("dense", s as u64, acc, 0.50),
                    outcome("mod", s as u64, acc, 0.50),
                ]
            })
            .collect();
        let line = mmu_line(&noisy);
        assert!(
            line.contains("**inconclusive**")
                && line.contains("more seeds (`--seeds`) or samples (`eval.*_samples`)"),
            "{line}"
        );
        // One seed with nothing right: 0 of n still has an error, so the verdict names the
        // floor rather than a missing tolerance.
        let nothing = [outcome("dense", 0, 0.0, 0.0), outcome("mod", 0, 0.0, 0.0)];
        let line = mmu_line(&nothing);
        assert!(
            line.contains("**inconclusive**") && line.contains("image-blind"),
            "{line}"
        );
        // a baseline well above the floor, and a variant close to it: within
        let learned: Vec<_> = (0..3)
            .flat_map(|s| {
                [
                    outcome("dense", s, 0.90, 0.50),
                    outcome("mod", s, 0.89, 0.50),
                ]
            })
            .collect();
        assert!(
            mmu_line(&learned).contains("**within**"),
            "{}",
            mmu_line(&learned)
        );
        // a variant ahead of the baseline in every seed: within, and better beyond it
        let ahead: Vec<_> = (0..3)
            .flat_map(|s| {
                [
                    outcome("dense", s, 0.80 + 0.05 * s as f64, 0.50),
                    outcome("mod", s, 0.90 + 0.05 * s as f64, 0.50),
                ]
            })
            .collect();
        let line = mmu_line(&ahead);
        assert!(line.contains("**within**, and better beyond it"), "{line}");
        assert!(
            line.contains("per seed +10.000, +10.000, +10.000)"),
            "{line}"
        );
        assert!(!mmu_line(&learned).contains("better"));
        // the variant at the floor: outside
        let lost: Vec<_> = (0..3)
            .flat_map(|s| {
                [
                    outcome("dense", s, 0.90, 0.50),
                    outcome("mod", s, 0.50, 0.50),
                ]
            })
            .collect();
        assert!(
            mmu_line(&lost).contains("**outside**"),
            "{}",
            mmu_line(&lost)
        );
    }

    #[test]
    fn a_tolerance_wider_than_the_margin_gives_no_verdict() {
        // dense 22 points above the floor (beyond its own 2 SE, 18 points) with 10 scored
        // samples: the tolerance of a difference (26 points) would let a variant at the floor pass
        let mut cfg = RunConfig::default();
        cfg.eval.mmu_samples = 10;
        let o: Vec<_> = (0..3)
            .flat_map(|s| {
                [
                    outcome("dense", s, 0.52, 0.30),
                    outcome("mod", s, 0.51, 0.30),
                ]
            })
            .collect();
        let md = verdicts(&o, &variants(), &cfg);
        let line = md.lines().find(|l| l.contains("MMU accuracy")).unwrap();
        assert!(line.contains("tolerance is as wide"), "{line}");
    }
}
