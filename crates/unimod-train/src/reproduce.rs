//! `unimod reproduce`: the paper's tables and figures regenerated here, each row beside the
//! paper's number with its tolerance and an honest verdict, into `<out>/REPORT.md`.
//!
//! The trained rows come from one experiment (`configs/reproduce.toml`: the variants the
//! requested tables need, dense first), whose finished runs are reused while their config and
//! the program are unchanged; the analyses read its dense checkpoint; Table 3 is analytic at the
//! paper's full sizes; Table 4 times training steps side by side.

use crate::analyze::{self, Analyzer, Finding, Source};
use crate::experiment::{self, Against, Outcome, Reuse, Within};
use crate::train::RunContext;
use crate::{RunConfig, flops_report};
use anyhow::{Context as _, Result, bail};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use unimod_analysis::stats::{Estimate, t_975};
use unimod_model::bench::{self, Shape};
use unimod_router::Schedule;
use unimod_tok::{Flavour, Task};

/// A table or figure of the paper.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Item {
    /// Task interaction: each task alone vs both.
    Table2,
    /// FLOPs of the paper's recipes at Show-o and Emu3 size.
    Table3,
    /// Time per iteration, dense vs UniMoD.
    Table4,
    /// The main comparison: dense, MoD, the ablations, UniMoD and γ-MoD over seeds.
    Table5,
    /// ARank and layer importance per task.
    Fig3,
    /// Which task's tokens a shared router keeps.
    Fig4,
    /// Attention per task and layer (Fig. 2).
    Attention,
    /// Token redundancy per layer.
    Redundancy,
}

impl Item {
    /// Every item, in the order they run.
    pub const ALL: [Item; 8] = [
        Item::Table3,
        Item::Table4,
        Item::Table5,
        Item::Table2,
        Item::Fig3,
        Item::Fig4,
        Item::Attention,
        Item::Redundancy,
    ];

    /// The name `--only` takes.
    pub fn name(self) -> &'static str {
        match self {
            Item::Table2 => "table2",
            Item::Table3 => "table3",
            Item::Table4 => "table4",
            Item::Table5 => "table5",
            Item::Fig3 => "fig3",
            Item::Fig4 => "fig4",
            Item::Attention => "attention",
            Item::Redundancy => "redundancy",
        }
    }

    /// The item named `s`, or an error listing the names.
    pub fn parse(s: &str) -> Result<Item> {
        Item::ALL
            .into_iter()
            .find(|i| i.name() == s)
            .with_context(|| {
                let names: Vec<_> = Item::ALL.iter().map(|i| i.name()).collect();
                format!(
                    "{s:?} is not a table or figure: one of {}",
                    names.join(", ")
                )
            })
    }

    fn title(self) -> &'static str {
        match self {
            Item::Table2 => "Table 2: task interaction (joint vs one task)",
            Item::Table3 => "Table 3: training FLOPs, dense vs UniMoD",
            Item::Table4 => "Table 4: training time per iteration",
            Item::Table5 => "Table 5: ablations at equal budget",
            Item::Fig3 => "Fig. 3: ARank per layer and task",
            Item::Fig4 => "Fig. 4: tokens a shared router keeps per task",
            Item::Attention => "Fig. 2: attention by modality",
            Item::Redundancy => {
                "Token redundancy: loss when layers keep their most-attended tokens"
            }
        }
    }

    /// The variants of `configs/reproduce.toml` this item's rows come from.
    fn variants(self) -> &'static [&'static str] {
        match self {
            Item::Table2 => &["dense", "t2i-only", "mmu-only"],
            Item::Table3 => &["dense", "unimod"],
            Item::Table4 => &[],
            Item::Table5 => &[
                "dense",
                "basic-mod",
                "no-layer-switch",
                "no-task-router",
                "unimod",
                "gamma-mod",
            ],
            Item::Fig3 | Item::Attention | Item::Redundancy => &["dense"],
            Item::Fig4 => &["dense", "basic-mod"],
        }
    }
}

/// How much compute the reproduction spends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scale {
    /// Minutes: tiny budgets that check the command end to end, not quality.
    Quick,
    /// The main job's model and budget on this CPU (about an hour with three seeds).
    Cpu,
    /// Longer training and the Show-o shape for Table 4, on a CUDA device.
    Gpu,
}

impl Scale {
    /// The scale `--scale` names.
    pub fn parse(s: &str) -> Result<Scale> {
        match s {
            "quick" => Ok(Scale::Quick),
            "cpu" => Ok(Scale::Cpu),
            "gpu" => Ok(Scale::Gpu),
            _ => bail!("--scale {s:?} is not accepted: quick, cpu or gpu"),
        }
    }

    /// Its name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Scale::Quick => "quick",
            Scale::Cpu => "cpu",
            Scale::Gpu => "gpu",
        }
    }

    /// `--set` overrides of the reproduce config at this scale (the user's own come after).
    pub fn overrides(self) -> Vec<String> {
        let v: &[&str] = match self {
            Scale::Quick => &[
                "train.steps=30",
                "train.warmup=3",
                "eval.t2i_samples=8",
                "eval.mmu_samples=16",
                "eval.val_batches=1",
                "analysis.samples=8",
            ],
            Scale::Cpu => &[],
            Scale::Gpu => &[
                "train.steps=4000",
                "train.warmup=200",
                "train.device=\"cuda\"",
                "eval.t2i_samples=256",
                "eval.mmu_samples=512",
                "analysis.samples=64",
            ],
        };
        v.iter().map(|s| s.to_string()).collect()
    }

    /// Table 4's shape, the largest this scale's machine steps in reasonable time, and its
    /// timed rounds.
    fn bench_shape(self) -> (Shape, usize) {
        let (d_model, n_layers, image_side, rounds) = match self {
            Scale::Quick => (64, 2, 4, 6),
            Scale::Cpu => (512, 8, 16, 30),
            Scale::Gpu => (2048, 24, 32, 40),
        };
        let shape = Shape {
            d_model,
            n_layers,
            per_task: 4,
            image_side,
        };
        (shape, rounds)
    }
}

/// One row of a reproduced table.
#[derive(Debug, Clone)]
pub struct Row {
    /// The table or figure.
    pub item: Item,
    /// The quantity compared.
    pub what: String,
    /// The paper's figure.
    pub paper: String,
    /// This code's.
    pub ours: String,
    /// How far apart they may be.
    pub tolerance: String,
    /// Reproduced, not reproduced or inconclusive.
    pub verdict: String,
}

/// What to reproduce and where.
pub struct Request<'a> {
    /// `configs/reproduce.toml` with the scale's and the user's overrides.
    pub cfg: &'a RunConfig,
    /// Where `showo-1.3b.toml` and `emu3-8b.toml` are (Table 3).
    pub configs: &'a Path,
    /// The tables and figures asked for.
    pub items: Vec<Item>,
    /// How large the runs are.
    pub scale: Scale,
    /// Seeds of Table 5.
    pub seeds: u32,
    /// Where the report goes.
    pub out: &'a Path,
    /// Where the runs run.
    pub device: tch::Device,
    /// The command line that asked for it, for the report's provenance line.
    pub command: String,
    /// Which finished runs are reused ([`Reuse::Finished`] unless the user vouches for runs
    /// of another build).
    pub reuse: Reuse,
}

/// Runs what `req.items` need and writes `<out>/REPORT.md`; returns its rows.
pub fn run(req: &Request) -> Result<Vec<Row>> {
    let started = std::time::Instant::now();
    let mut items = req.items.clone();
    items.sort();
    items.dedup();
    std::fs::create_dir_all(req.out).with_context(|| format!("creating {}", req.out.display()))?;
    let outcomes = train_variants(req, &items)?;
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    for &item in &items {
        match item {
            Item::Table3 => rows.extend(table3(req, &outcomes)?),
            Item::Table4 => rows.extend(table4(req)?),
            Item::Table5 => rows.extend(table5(req.cfg, &outcomes)),
            Item::Table2 => rows.extend(table2(req.cfg, &outcomes)),
            _ => {}
        }
    }
    let analysed: Vec<Item> = items
        .iter()
        .copied()
        .filter(|i| {
            matches!(
                i,
                Item::Fig3 | Item::Fig4 | Item::Attention | Item::Redundancy
            )
        })
        .collect();
    if !analysed.is_empty() {
        let (report, found) = analyses(req, analysed.contains(&Item::Fig4))?;
        let rel = report.strip_prefix(req.out).unwrap_or(&report).display();
        notes.push(format!(
            "Analyses of the dense model (seed {}), with every figure: [`{rel}`]({rel})",
            req.cfg.train.seed
        ));
        for f in found {
            let item = match f.source {
                Source::Arank => Item::Fig3,
                Source::Competition => Item::Fig4,
                Source::Attention => Item::Attention,
                Source::Redundancy => Item::Redundancy,
            };
            if analysed.contains(&item) {
                rows.push(finding_row(item, f));
            }
        }
    }
    notes.insert(0, provenance(req, started.elapsed().as_secs_f64()));
    write_report(req, &items, &rows, &notes)?;
    Ok(rows)
}

/// The experiment of every variant the items need, dense first; finished runs are reused.
fn train_variants(req: &Request, items: &[Item]) -> Result<Vec<Outcome>> {
    let mut names: Vec<&str> = Vec::new();
    for i in items {
        for v in i.variants() {
            if !names.contains(v) {
                names.push(v);
            }
        }
    }
    if names.is_empty() {
        return Ok(Vec::new());
    }
    let mut cfg = req.cfg.clone();
    let all = std::mem::take(&mut cfg.experiment.variants);
    for name in &names {
        let v = all.iter().find(|v| v.name == *name).with_context(|| {
            format!("the reproduce config has no variant named {name:?} (configs/reproduce.toml names them)")
        })?;
        cfg.experiment.variants.push(v.clone());
    }
    if cfg.experiment.variants[0].name != "dense" {
        bail!("the reproduce config's variants must start with \"dense\", every table's reference");
    }
    cfg.experiment.out_dir = req.out.to_path_buf();
    cfg.experiment.name = "runs".into();
    experiment::run(&cfg, req.seeds, req.device, req.reuse)
}

fn pct(x: f64) -> String {
    format!("{:.1} %", 100.0 * x)
}

/// Ours as "mean ± spread (n seeds)" of one score of a variant.
fn mean_of(outcomes: &[Outcome], name: &str, f: experiment::Score) -> String {
    format!(
        "{} %",
        experiment::cell(&experiment::scores(outcomes, name, f), 100.0, 1)
    )
}

/// The paper's saving of its Show-o and Emu3 recipes against the linear-FLOPs saving this
/// framework counts at their full shapes, and the saving counted in the scaled-down runs.
fn table3(req: &Request, outcomes: &[Outcome]) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for (file, recipe, paper, label) in [
        (
            "showo-1.3b.toml",
            "showo-paper",
            0.153,
            "Show-o 1.3B: 51.1 → 43.3 TFLOPs",
        ),
        (
            "emu3-8b.toml",
            "emu3-paper",
            0.399,
            "Emu3 8B: 89.0 → 53.5 TFLOPs",
        ),
    ] {
        let path = req.configs.join(file);
        let cfg = RunConfig::load(Some(&path), &[])?;
        let schedule = flops_report::paper_schedule(recipe).expect("a paper recipe");
        let mix = [(Task::T2I, 1.0), (Task::MMU, 1.0)];
        let r = flops_report::report(&cfg, &schedule, &mix)?;
        let linear = |routed: bool| {
            r.rows
                .iter()
                .map(|(_, d, x)| if routed { x.linear } else { d.linear })
                .sum::<f64>()
        };
        let ours = 1.0 - linear(true) / linear(false);
        // The paper rounds to 0.1 TFLOPs and does not give its MMU ramp's shape or which tokens
        // it routes: one point either way.
        let tol = 0.01;
        rows.push(Row {
            item: Item::Table3,
            what: format!(
                "{label}, saving ({recipe}, `unimod flops --config {}`)",
                path.display()
            ),
            paper: pct(paper),
            ours: format!("{} (linear FLOPs)", pct(ours)),
            tolerance: "± 1.0 points".into(),
            verdict: if (ours - paper).abs() <= tol {
                "reproduced".into()
            } else {
                "not reproduced".into()
            },
        });
    }
    if outcomes.iter().any(|o| o.variant == "unimod") {
        rows.push(Row {
            item: Item::Table3,
            what: "Scaled-down runs: training FLOPs UniMoD saves, counted step by step".into(),
            paper: "15.3 % (Show-o recipe, full size)".into(),
            ours: format!(
                "{} (T2I 0.6, MMU 0.8 → 0.2 on the last half; padded batches)",
                pct(experiment::flops_saved(outcomes, "dense", "unimod"))
            ),
            tolerance: "–".into(),
            verdict: "not comparable: another recipe and sequence shape; the absolute TFLOPs of the paper cannot be reproduced (its unit is not given, docs/flops.md)".into(),
        });
    }
    Ok(rows)
}

/// Dense and UniMoD (each paper recipe) training steps timed side by side, round by round:
/// wall-clock saved ÷ FLOPs saved, against the paper's Table 4. The saving is the median of each
/// round's own saving with its distribution-free 95 % interval, as `unimod bench` reports it.
fn table4(req: &Request) -> Result<Vec<Row>> {
    let (shape, rounds) = req.scale.bench_shape();
    let mut rows = Vec::new();
    for (recipe, flavour, paper_time, paper_flops, label) in [
        ("showo-paper", Flavour::Showo, (1.30, 1.26), 0.153, "Show-o"),
        ("emu3-paper", Flavour::Emu3, (3.56, 2.80), 0.399, "Emu3"),
    ] {
        let schedule = flops_report::paper_schedule(recipe).expect("a paper recipe");
        let mut dense_cfg = bench::config(shape, Schedule::Dense);
        dense_cfg.flavour = flavour;
        let mut routed_cfg = bench::config(shape, schedule);
        routed_cfg.flavour = flavour;
        let b = bench::batch(&dense_cfg, shape, req.device);
        let vs = vec![
            bench::variant("dense".into(), &dense_cfg, &b, req.device)?,
            bench::variant("unimod".into(), &routed_cfg, &b, req.device)?,
        ];
        let flops_saved = 1.0 - vs[1].train_flops / vs[0].train_flops;
        let time_saved = bench::time_steps(&vs, &b, req.device, 2, rounds).saved(1);
        let paper_saved = 1.0 - paper_time.1 / paper_time.0;
        let (interval, verdict) = speed_verdict(&time_saved, rounds);
        rows.push(Row {
            item: Item::Table4,
            what: format!(
                "{label} recipe, d {} × {} layers, {} image tokens, {:?}: time saved ÷ FLOPs saved",
                shape.d_model,
                shape.n_layers,
                shape.image_side * shape.image_side,
                req.device
            ),
            paper: format!(
                "{:.2} → {:.2} s/iter: {} of time for {} of FLOPs (ratio {:.2})",
                paper_time.0,
                paper_time.1,
                pct(paper_saved),
                pct(paper_flops),
                paper_saved / paper_flops
            ),
            ours: format!(
                "{}{interval} of time for {} of FLOPs (ratio {:.2})",
                pct(time_saved.median),
                pct(flops_saved),
                time_saved.median / flops_saved
            ),
            tolerance: format!("median of {rounds} rounds' savings, 95 % order-statistic interval"),
            verdict,
        });
    }
    Ok(rows)
}

/// Table 4's interval text and verdict from the per-round time saved: a finding only when the
/// whole interval lies on one side of 0.
fn speed_verdict(saved: &bench::Median, rounds: usize) -> (String, String) {
    match saved.interval {
        Some((lo, hi)) => (
            format!(" ({} to {})", pct(lo), pct(hi)),
            if lo > 0.0 {
                "shown: UniMoD steps are faster".to_string()
            } else if hi < 0.0 {
                "refuted here: UniMoD steps are slower".to_string()
            } else {
                "inconclusive: 0 is within the saving's 95 % interval; more rounds on a quieter machine would settle it".to_string()
            },
        ),
        None => (
            String::new(),
            format!("inconclusive: {rounds} rounds give no 95 % interval (at least 6 do)"),
        ),
    }
}

/// The paper's Table 5 rows: TFLOPs, GenEval, MME.
const TABLE5: [(&str, &str, &str); 6] = [
    (
        "dense",
        "Show-o full",
        "51.1 TFLOPs, GenEval 0.62, MME 1056.0",
    ),
    (
        "basic-mod",
        "Basic MoD",
        "40.8 TFLOPs, GenEval 0.15, MME 960.6",
    ),
    (
        "no-layer-switch",
        "w/o layer switch",
        "43.3 TFLOPs, GenEval 0.50, MME 920.3",
    ),
    (
        "no-task-router",
        "w/o task-aware router",
        "40.8 TFLOPs, GenEval 0.50, MME 1052.0",
    ),
    ("unimod", "UniMoD", "43.3 TFLOPs, GenEval 0.61, MME 1093.7"),
    ("gamma-mod", "γ-MoD (not in the paper's table)", "–"),
];

/// A comparison's tolerance and verdict, in the words of the claim it tests.
fn against_text(a: &Option<Against>, within: &str, outside: &str) -> (String, String) {
    match a {
        None => ("–".into(), "no scores".into()),
        Some(a) => (
            format!("{:.1} points", a.scale * a.tolerance()),
            match &a.verdict {
                Within::Within => within.into(),
                Within::Outside => outside.into(),
                Within::Inconclusive(why) => format!("inconclusive: {why}"),
            },
        ),
    }
}

fn table5(cfg: &RunConfig, outcomes: &[Outcome]) -> Vec<Row> {
    let metrics = experiment::metrics(cfg);
    let (judge, mmu) = (&metrics[0], &metrics[2]);
    // Each variant against dense on both scores (none for dense itself).
    let compared: Vec<_> = TABLE5
        .into_iter()
        .filter(|(name, ..)| outcomes.iter().any(|o| o.variant == *name))
        .map(|(name, label, paper)| {
            let against = (name != "dense").then(|| {
                [judge, mmu].map(|m| experiment::against(outcomes, "dense", name, m, cfg))
            });
            (name, label, paper, against)
        })
        .collect();
    // A verdict beyond its interval says whether it survives Holm's correction for all of the
    // table's comparisons.
    let p_values: Vec<f64> = compared
        .iter()
        .flat_map(|(.., against)| against.iter().flatten())
        .map(|a| a.as_ref().map_or(f64::NAN, |a| a.difference.p_value()))
        .collect();
    let (family, mut holds) = experiment::corrected(&p_values);
    let mut rows = Vec::new();
    for (name, label, paper, against) in compared {
        let ours = format!(
            "{} FLOPs saved; T2I whole captions {} (scrambled prompts {}); MMU {} (image-blind {})",
            pct(experiment::flops_saved(outcomes, "dense", name)),
            mean_of(outcomes, name, |o| o.eval.t2i_overall),
            mean_of(outcomes, name, |o| o
                .eval
                .t2i_overall_scrambled
                .unwrap_or(0.0)),
            mean_of(outcomes, name, |o| o.eval.mmu_accuracy),
            mean_of(outcomes, name, |o| o.eval.mmu_blind.unwrap_or(0.0)),
        );
        let (tolerance, verdict) = match against {
            None => ("–".into(), "reference".into()),
            Some([j, m]) => {
                let mut text = |a: &Option<Against>| {
                    let worse = format!(
                        "worse than dense beyond tolerance{}",
                        experiment::holm_note(family, holds.next().unwrap_or(false))
                    );
                    against_text(a, "within dense", &worse)
                };
                let (tj, vj) = text(&j);
                let (tm, vm) = text(&m);
                (
                    format!("T2I {tj}, MMU {tm}"),
                    format!("T2I: {vj}; MMU: {vm}"),
                )
            }
        };
        rows.push(Row {
            item: Item::Table5,
            what: label.into(),
            paper: paper.into(),
            ours,
            tolerance,
            verdict,
        });
    }
    // The headline: at equal FLOPs, task-aware routing keeps T2I quality basic MoD loses.
    if ["basic-mod", "unimod"]
        .iter()
        .all(|n| outcomes.iter().any(|o| o.variant == *n))
    {
        let d = experiment::difference(outcomes, "basic-mod", "unimod", judge);
        let mean =
            |name| experiment::mean_spread(&experiment::scores(outcomes, name, judge.score)).0;
        let (a, b) = (mean("basic-mod"), mean("unimod"));
        let seeds = experiment::seeds_in_common(outcomes, "basic-mod", "unimod");
        let gap = experiment::flops_saved(outcomes, "dense", "unimod")
            - experiment::flops_saved(outcomes, "dense", "basic-mod");
        let verdict = if gap.abs() >= 0.02 {
            format!(
                "inconclusive: the two are not at equal FLOPs ({:+.1} points of saving apart); set basic MoD's capacity to UniMoD's budget (`unimod flops --batches 50`)",
                100.0 * gap
            )
        } else if d.shown() && seeds < 2 {
            "cannot tell: one seed leaves the spread between training runs unmeasured; `--seeds 3` would settle it".into()
        } else if d.shown() && d.mean > 0.0 {
            "shown: UniMoD keeps more T2I quality than basic MoD at equal FLOPs".into()
        } else if d.shown() {
            "refuted here: basic MoD generates better than UniMoD at equal FLOPs".into()
        } else if d.mean == 0.0 {
            "cannot tell: no difference at all (both at the same score); a dense model that learns T2I comes first".into()
        } else {
            format!(
                "cannot tell: the difference is within its 95 % interval; about {:.0} seeds would resolve a difference of this size",
                seeds_needed(&d, seeds)
            )
        };
        rows.push(Row {
            item: Item::Table5,
            what: "Headline: UniMoD vs basic MoD on T2I at equal FLOPs".into(),
            paper: "GenEval 0.61 vs 0.15".into(),
            ours: format!(
                "whole captions {:.1} vs {:.1} % (Δ {:+.1} ± {:.1} points)",
                100.0 * b,
                100.0 * a,
                100.0 * d.mean,
                100.0 * d.half_width()
            ),
            tolerance: "95 % interval, paired over seeds".into(),
            verdict,
        });
    }
    rows
}

/// Seeds per variant at which a difference of `d`'s size, over `n` seeds now, would lie outside
/// its 95 % interval, each seed's spread unchanged.
fn seeds_needed(d: &Estimate, n: usize) -> f64 {
    let per_seed = d.se * (n.max(1) as f64).sqrt();
    (n + 1..=10_000)
        .find(|&k| t_975(k as f64 - 1.0) * per_seed / (k as f64).sqrt() < d.mean.abs())
        .map_or(f64::INFINITY, |k| k as f64)
}

/// Joint training against the same budget spent on one task.
fn table2(cfg: &RunConfig, outcomes: &[Outcome]) -> Vec<Row> {
    let metrics = experiment::metrics(cfg);
    let mut rows = Vec::new();
    // Sequences of `task` per step, and in all, of the variant named (the base mix without one).
    let share = |name: &str, task: Task| {
        let mix = cfg
            .experiment
            .variants
            .iter()
            .find(|v| v.name == name)
            .and_then(|v| v.mix)
            .unwrap_or(cfg.train.mix);
        let all: usize = Task::BUILT_IN.iter().map(|t| mix.get(*t)).sum();
        format!("{} of {all} sequences per step", mix.get(task))
    };
    for (single, metric, task, t) in [
        ("t2i-only", &metrics[0], "T2I whole captions", Task::T2I),
        ("mmu-only", &metrics[2], "MMU accuracy", Task::MMU),
    ] {
        if !outcomes.iter().any(|o| o.variant == single) {
            continue;
        }
        let (tolerance, verdict) = against_text(
            &experiment::against(outcomes, single, "dense", metric, cfg),
            "shown: joint within the one-task model",
            "not shown: joint training costs this task quality",
        );
        rows.push(Row {
            item: Item::Table2,
            what: format!(
                "{task}: joint ({}) vs {single} ({}), same steps",
                share("dense", t),
                share(single, t)
            ),
            paper: "the tasks interfere little (Show-o* joint: GenEval 0.63, MME 1032.0; one-task rows not given)".into(),
            ours: format!(
                "joint {} vs {single} {}",
                mean_of(outcomes, "dense", metric.score),
                mean_of(outcomes, single, metric.score)
            ),
            tolerance,
            verdict,
        });
    }
    rows
}

/// The analyses of the dense seed-0 checkpoint (with basic MoD's shared router as the Fig. 4
/// probe), into `<out>/analysis`.
fn analyses(req: &Request, probe: bool) -> Result<(PathBuf, Vec<Finding>)> {
    let cfg = req.cfg;
    let runs = req.out.join("runs");
    let dense = runs.join(format!("dense-seed{}", cfg.train.seed));
    let ctx = RunContext::new(cfg, req.device)?;
    let run_cfg = |dir: &Path| -> Result<RunConfig> {
        let toml = crate::rundir::latest_checkpoint(dir)?.join("run.toml");
        RunConfig::load(Some(&toml), &[])
    };
    let dense_cfg = run_cfg(&dense)?;
    let (vs, model) = crate::load::model_from_run(&dense, &ctx)?;
    let probe_run = if probe {
        let dir = runs.join(format!("basic-mod-seed{}", cfg.train.seed));
        let c = run_cfg(&dir)?;
        let (pvs, m) = crate::load::model_from_run(&dir, &ctx)?;
        Some((c, m, pvs))
    } else {
        None
    };
    let out = req.out.join("analysis");
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let a = Analyzer {
        ctx: &ctx,
        cfg: &dense_cfg,
        model: &model,
        vs: &vs,
        out,
    };
    analyze::all(&a, probe_run.as_ref().map(|(c, m, _)| (m, &ctx, c)), &dense)
}

fn finding_row(item: Item, f: Finding) -> Row {
    Row {
        item,
        what: f.claim,
        paper: match f.source {
            Source::Arank => "ARank falls in later layers; T2I and MMU differ on Show-o".into(),
            Source::Competition => "~220 T2I vs ~20–80 MMU tokens kept".into(),
            Source::Attention => "task-dependent on Show-o, JanusFlow, Emu3".into(),
            Source::Redundancy => "later layers and MMU tokens more redundant".into(),
        },
        ours: f.ours,
        tolerance: "95 % interval (Student's t)".into(),
        verdict: f.verdict,
    }
}

/// When, from which commit, on what machine and by which command the report was made.
fn provenance(req: &Request, seconds: f64) -> String {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let commit = match (
        git(&["rev-parse", "--short", "HEAD"]),
        git(&["status", "--porcelain", "--untracked-files=no"]),
    ) {
        (Some(c), Some(changes)) if changes.is_empty() => c,
        (Some(c), Some(_)) => format!("{c} with uncommitted changes"),
        _ => "unknown (not a git checkout)".into(),
    };
    let machine = crate::device::machine(req.device);
    format!(
        "Made {} UTC from commit {commit} on {machine} by `{}`, in {:.0} minutes (finished runs reused count nothing).",
        utc_now(),
        req.command,
        seconds / 60.0
    )
}

fn utc_now() -> String {
    utc(std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64)
}

/// `secs` after the Unix epoch as `YYYY-MM-DD HH:MM` UTC (civil from days, H. Hinnant's
/// algorithm).
fn utc(secs: i64) -> String {
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60
    )
}

fn write_report(req: &Request, items: &[Item], rows: &[Row], notes: &[String]) -> Result<()> {
    let c = req.cfg;
    let mut md = String::new();
    writeln!(md, "# Reproduction of the UniMoD paper's tables\n")?;
    writeln!(
        md,
        "Written by `unimod reproduce` at scale **{}** with {} seed(s) on {:?}: d_model {}, {} layers, {} training steps per run, batch t2i {} : mmu {}, {} T2I prompts and {} MMU questions scored per run. \
         Trained rows: mean ± standard deviation over seeds; verdicts at 95 % intervals, Student's t at the degrees of freedom of each error, trained rows paired over seeds (docs/conventions.md). \
         The experiment behind the trained rows, with its per-category breakdown and plots: [`runs/report.md`](runs/report.md).\n",
        req.scale.name(),
        req.seeds,
        req.device,
        c.model.d_model,
        c.model.n_layers,
        c.train.steps,
        c.train.mix.t2i,
        c.train.mix.mmu,
        c.eval.t2i_samples,
        c.eval.mmu_samples,
    )?;
    for n in notes {
        writeln!(md, "{n}\n")?;
    }
    for &item in items {
        writeln!(md, "## {}\n", item.title())?;
        writeln!(
            md,
            "| row | paper | ours | tolerance | verdict |\n|---|---|---|---|---|"
        )?;
        for r in rows.iter().filter(|r| r.item == item) {
            let cell = |s: &str| s.replace('|', "\\|");
            writeln!(
                md,
                "| {} | {} | {} | {} | {} |",
                cell(&r.what),
                cell(&r.paper),
                cell(&r.ours),
                cell(&r.tolerance),
                cell(&r.verdict)
            )?;
        }
        writeln!(md)?;
    }
    let path = req.out.join("REPORT.md");
    crate::write(&path, md)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::EvalReport;

    #[test]
    fn table5_corrects_its_verdicts_for_their_number() {
        // Per seed: γ-MoD 15 points of captions below dense in every seed (holds); basic MoD's
        // MMU 2, 3, 4 points below (p 0.035 on two degrees of freedom: beyond its interval
        // alone, chance among several); γ-MoD's MMU 1 point either side.
        let mut outcomes = Vec::new();
        for s in 0..3usize {
            let (t2i, mmu) = ([0.20, 0.25, 0.30][s], [0.70, 0.80, 0.90][s]);
            for (name, t2i, mmu) in [
                ("dense", t2i, mmu),
                ("basic-mod", t2i, mmu - [0.02, 0.03, 0.04][s]),
                ("gamma-mod", t2i - 0.15, mmu + [0.01, -0.01, 0.0][s]),
            ] {
                outcomes.push(Outcome {
                    variant: name.into(),
                    seed: s as u64,
                    train: Default::default(),
                    eval: EvalReport {
                        t2i_overall: t2i,
                        t2i_overall_scrambled: Some(0.02),
                        mmu_accuracy: mmu,
                        mmu_blind: Some(0.3),
                        ..Default::default()
                    },
                    digest: String::new(),
                    train_digest: String::new(),
                    machine: String::new(),
                });
            }
        }
        let mut cfg = RunConfig::default();
        cfg.eval.mmu_samples = 1_000_000;
        let rows = table5(&cfg, &outcomes);
        let verdict = |label: &str| {
            rows.iter()
                .find(|r| r.what.starts_with(label))
                .unwrap()
                .verdict
                .clone()
        };
        // Four comparisons: basic MoD's captions equal dense's, under their binomial error.
        assert_eq!(
            verdict("Basic MoD"),
            "T2I: within dense; MMU: worse than dense beyond tolerance, but not under Holm's correction for the 4: it may be chance"
        );
        assert_eq!(
            verdict("γ-MoD"),
            "T2I: worse than dense beyond tolerance, and under Holm's correction for the 4; MMU: within dense"
        );
    }

    #[test]
    fn utc_dates_are_civil_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00");
        assert_eq!(utc(951_782_400 + 3_660), "2000-02-29 01:01");
        assert_eq!(utc(1_795_464_714), "2026-11-23 20:11");
    }

    #[test]
    fn table4_finds_only_outside_the_interval() {
        let saved = |v: &[f64]| bench::Median::of(v);
        let faster = saved(&[0.10, 0.12, 0.11, 0.13, 0.09, 0.12, 0.11, 0.10]);
        assert!(speed_verdict(&faster, 8).1.starts_with("shown"));
        let slower = saved(&[-0.10, -0.12, -0.11, -0.13, -0.09, -0.12, -0.11, -0.10]);
        assert!(speed_verdict(&slower, 8).1.starts_with("refuted"));
        // A median of +4 % whose rounds straddle 0 finds nothing.
        let noisy = saved(&[0.04, -0.05, 0.10, 0.04, -0.02, 0.08, 0.05, 0.03]);
        assert!(noisy.median > 0.0);
        assert!(speed_verdict(&noisy, 8).1.starts_with("inconclusive"));
        let (text, verdict) = speed_verdict(&saved(&[0.1, 0.2, 0.3]), 3);
        assert_eq!(text, "");
        assert!(verdict.contains("3 rounds give no 95 % interval"));
    }
}
