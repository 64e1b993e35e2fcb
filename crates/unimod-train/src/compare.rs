//! `unimod compare`: evaluations of several settings over the same seeds, side by side, each
//! against a baseline, with differences paired by seed and read against their 95 % intervals
//! (docs/conventions.md, "Verdicts") — the tables a sweep of `unimod eval --set …` over a few
//! seeds' checkpoints calls for.
//!
//! An evaluation folder holds `eval.json` and the config it ran under (`eval.toml`, or a run's
//! `config.toml`); its seed is that config's `train.seed`, and a folder name ending in
//! `-seed<N>` joins the group of its name without the suffix (`w0.5-increasing-seed2` is seed 2
//! of `w0.5-increasing`), as experiment runs are named. An experiment's re-evaluation of a run,
//! `<run>/evals/<settings digest>/`, joins the run's group with the digest appended
//! (`dense-seed1/evals/7d9c…` is seed 1 of `dense@7d9c…`), so that the same variants rescored
//! under the same settings group as their runs do, and one run scored under two settings does
//! not fall into one group twice.

use crate::RunConfig;
use crate::eval::EvalReport;
use crate::experiment::paired_difference;
use anyhow::{Context as _, Result, bail};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use unimod_analysis::stats::Estimate;

/// One evaluation of one seed.
#[derive(Debug, Clone)]
pub struct Evaluation {
    /// The setting it belongs to: the folder's name without a trailing `-seed<N>`.
    pub group: String,
    /// The checkpoint's training seed.
    pub seed: u64,
    /// Where it was read from.
    pub dir: PathBuf,
    /// What it measured.
    pub report: EvalReport,
    /// T2I prompts scored (`eval.t2i_samples`).
    pub t2i_samples: usize,
    /// MMU questions scored (`eval.mmu_samples`).
    pub mmu_samples: usize,
}

impl Evaluation {
    /// The evaluation in `dir`.
    pub fn load(dir: &Path) -> Result<Evaluation> {
        let json = dir.join("eval.json");
        let text = std::fs::read_to_string(&json).with_context(|| {
            format!(
                "reading {} (an evaluation folder of `unimod eval` or an experiment's run)",
                json.display()
            )
        })?;
        let report: EvalReport =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", json.display()))?;
        let config = ["eval.toml", "config.toml"]
            .iter()
            .map(|f| dir.join(f))
            .find(|p| p.exists())
            .with_context(|| {
                format!(
                    "{} holds neither eval.toml nor config.toml: its seed is unknown",
                    dir.display()
                )
            })?;
        let cfg = RunConfig::load(Some(&config), &[])?;
        Ok(Evaluation {
            group: group_of_dir(dir)?,
            seed: cfg.train.seed,
            dir: dir.to_path_buf(),
            report,
            t2i_samples: cfg.eval.t2i_samples,
            mmu_samples: cfg.eval.mmu_samples,
        })
    }
}

/// The group of the evaluation folder `dir` (see the module's documentation).
fn group_of_dir(dir: &Path) -> Result<String> {
    // Through the absolute path, so that `.` (run from inside an evals folder) is named too.
    let full = std::path::absolute(dir)
        .with_context(|| format!("resolving {}", dir.display()))?
        .components()
        .collect::<PathBuf>();
    let name = |p: &Path| p.file_name().map(|n| n.to_string_lossy().into_owned());
    let Some(own) = name(&full) else {
        bail!("{} has no folder name", dir.display());
    };
    let parent = full.parent();
    if let (Some("evals"), Some(run)) = (
        parent.and_then(name).as_deref(),
        parent.and_then(Path::parent).and_then(name),
    ) {
        return Ok(format!("{}@{own}", group_of(&run)));
    }
    Ok(group_of(&own).to_string())
}

/// `name` without a trailing `-seed<N>`.
fn group_of(name: &str) -> &str {
    match name.rsplit_once("-seed") {
        Some((group, n)) if !n.is_empty() && n.bytes().all(|c| c.is_ascii_digit()) => group,
        _ => name,
    }
}

/// How a column reads its score off a report (`None`: the report has none).
type Read = Box<dyn Fn(&EvalReport) -> Option<f64>>;

/// One column of the tables.
struct Column {
    label: String,
    score: Read,
    /// Items scored, for an accuracy whose binomial error floors the interval.
    samples: fn(&Evaluation) -> Option<usize>,
    /// 100 for accuracies (in points), 1 for losses.
    scale: f64,
}

fn accuracy(
    label: impl Into<String>,
    score: impl Fn(&EvalReport) -> Option<f64> + 'static,
    samples: fn(&Evaluation) -> Option<usize>,
) -> Column {
    Column {
        label: label.into(),
        score: Box::new(score),
        samples,
        scale: 100.0,
    }
}

/// The headline columns: whole captions, facts, MMU accuracy and each validation loss.
fn headline(evals: &[Evaluation]) -> Vec<Column> {
    let mut columns = vec![
        accuracy(
            "T2I whole %",
            |r| Some(r.t2i_overall),
            |e| Some(e.t2i_samples),
        ),
        // At least one fact per caption: the caption count makes the binomial error conservative.
        accuracy(
            "T2I facts %",
            |r| Some(r.t2i_facts),
            |e| Some(e.t2i_samples),
        ),
        accuracy("MMU %", |r| Some(r.mmu_accuracy), |e| Some(e.mmu_samples)),
    ];
    for task in keys(evals, |r| r.val_loss.keys()) {
        let t = task.clone();
        columns.push(Column {
            label: format!("val {task}"),
            score: Box::new(move |r| r.val_loss.get(&t).copied()),
            samples: |_| None,
            scale: 1.0,
        });
    }
    columns
}

/// One column per T2I fact category and MMU question kind. Their item counts are not recorded,
/// so their intervals have no binomial floor.
fn breakdown(evals: &[Evaluation]) -> Vec<Column> {
    type Rates = fn(&EvalReport) -> &std::collections::BTreeMap<String, f64>;
    let kinds: [(&str, Rates); 2] = [
        ("T2I", |r| &r.t2i_per_category),
        ("MMU", |r| &r.mmu_per_kind),
    ];
    let mut columns = Vec::new();
    for (task, rates) in kinds {
        for c in keys(evals, |r| rates(r).keys()) {
            let k = c.clone();
            columns.push(accuracy(
                format!("{task} {c} %"),
                move |r| rates(r).get(&k).copied(),
                |_| None,
            ));
        }
    }
    columns
}

/// MMU teacher-forced, by routing decision (`mmu_teacher_forced`, for models that route):
/// overall, then per question kind.
fn teacher_forced(evals: &[Evaluation]) -> Vec<Column> {
    use crate::eval::TeacherForced;
    fn of(r: &EvalReport, i: usize) -> Option<crate::eval::Scores<'_>> {
        r.mmu_teacher_forced.as_ref().map(|t| t.decisions()[i].1)
    }
    let names = TeacherForced::default().decisions().map(|(name, _)| name);
    let mut columns: Vec<Column> = (0..names.len())
        .map(|i| {
            accuracy(
                format!("TF {} %", names[i]),
                move |r| of(r, i).map(|(all, _)| all),
                |e| Some(e.mmu_samples),
            )
        })
        .collect();
    for (i, name) in names.iter().enumerate() {
        for k in keys(evals, |r| {
            of(r, i).into_iter().flat_map(|(_, kinds)| kinds.keys())
        }) {
            columns.push(accuracy(
                format!("TF {name} {k} %"),
                move |r| of(r, i).and_then(|(_, kinds)| kinds.get(&k).copied()),
                |_| None,
            ));
        }
    }
    columns
}

/// Every key any report has, sorted.
fn keys<'a, I: Iterator<Item = &'a String>>(
    evals: &'a [Evaluation],
    of: impl Fn(&'a EvalReport) -> I,
) -> Vec<String> {
    let mut all: Vec<String> = evals.iter().flat_map(|e| of(&e.report)).cloned().collect();
    all.sort();
    all.dedup();
    all
}

/// The groups in order of first appearance, `base` first.
fn groups(evals: &[Evaluation], base: &str) -> Vec<String> {
    let mut names = vec![base.to_string()];
    for e in evals {
        if !names.contains(&e.group) {
            names.push(e.group.clone());
        }
    }
    names
}

/// The comparison as markdown: a headline table, a per-category table and, for models that
/// route, a table of MMU teacher-forced by routing decision, each group's row
/// giving its mean and, beside it, its paired difference to `base` ± the half-width of its
/// 95 % interval (in bold where the difference lies outside it). `base` defaults to the first
/// group.
pub fn tables(evals: &[Evaluation], base: Option<&str>) -> Result<String> {
    let Some(first) = evals.first() else {
        bail!("no evaluations to compare");
    };
    let base = base.unwrap_or(&first.group);
    let names = groups(evals, base);
    if !evals.iter().any(|e| e.group == base) {
        bail!(
            "no evaluation of the baseline `{base}`; the groups are: {}",
            names[1..].join(", ")
        );
    }
    for (i, a) in evals.iter().enumerate() {
        if let Some(b) = evals[i + 1..]
            .iter()
            .find(|b| b.group == a.group && b.seed == a.seed)
        {
            bail!(
                "{} and {} are both seed {} of `{}`: a comparison pairs one evaluation per seed",
                a.dir.display(),
                b.dir.display(),
                a.seed,
                a.group
            );
        }
    }
    let mut md = String::new();
    let seeds = |g: &str| {
        let mut s: Vec<u64> = evals
            .iter()
            .filter(|e| e.group == g)
            .map(|e| e.seed)
            .collect();
        s.sort();
        s
    };
    let base_seeds = seeds(base);
    writeln!(
        md,
        "Baseline `{base}` (seeds {}). Each row: its mean over seeds, and in brackets its difference to the baseline paired by seed over the seeds both have, ± the half-width of its 95 % interval (Student's t at their degrees of freedom; for whole captions, facts and MMU at least the binomial error of the items scored). **Bold**: the difference lies outside its interval. An evaluation set that every seed shares is not resampled, so its own sampling error is in these intervals only through that floor; the per-category columns have none.\n",
        join(&base_seeds)
    )?;
    // Every difference tested, for the correction across all of them below.
    let mut tested: Vec<(String, String, Estimate)> = Vec::new();
    for columns in [headline(evals), breakdown(evals), teacher_forced(evals)] {
        let columns: Vec<Column> = columns
            .into_iter()
            .filter(|c| evals.iter().any(|e| (c.score)(&e.report).is_some()))
            .collect();
        if columns.is_empty() {
            continue;
        }
        write!(md, "| setting | seeds |")?;
        for c in &columns {
            write!(md, " {} |", c.label)?;
        }
        writeln!(md)?;
        writeln!(md, "|---|---|{}", "---|".repeat(columns.len()))?;
        for name in &names {
            write!(md, "| {name} | {} |", join(&seeds(name)))?;
            for c in &columns {
                let (text, d) = cell(evals, base, name, c);
                write!(md, " {text} |")?;
                if let Some(d) = d {
                    tested.push((name.clone(), c.label.clone(), d));
                }
            }
            writeln!(md)?;
        }
        writeln!(md)?;
    }
    md.push_str(&correction(&tested));
    Ok(md)
}

/// What of the bold differences survives Holm's correction for every difference the tables
/// test: a sweep of a few settings over a dozen columns makes dozens of comparisons, and read
/// one at a time one true null in twenty is bold.
fn correction(tested: &[(String, String, Estimate)]) -> String {
    let p: Vec<f64> = tested.iter().map(|(.., d)| d.p_value()).collect();
    let (family, holds) = crate::experiment::corrected(&p);
    let bold = tested.iter().filter(|(.., d)| d.shown()).count();
    if family < 2 || bold == 0 {
        return String::new();
    }
    let holds: Vec<String> = tested
        .iter()
        .zip(holds)
        .filter(|((.., d), h)| *h && d.shown())
        .map(|((name, label, _), _)| format!("`{name}` on {label}"))
        .collect();
    format!(
        "{bold} of the {family} differences tested are bold, about {:.1} of them expected by chance alone were every difference zero; under Holm's correction for all {family}, {}.\n",
        0.05 * family as f64,
        match holds.len() {
            0 => "none holds".to_string(),
            n => format!("{n} hold: {}", holds.join(", ")),
        }
    )
}

fn join(seeds: &[u64]) -> String {
    seeds
        .iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Group `name`'s mean on column `c`, with its standard error over seeds for the baseline and
/// its paired difference to the baseline otherwise (returned too, where there is one).
fn cell(evals: &[Evaluation], base: &str, name: &str, c: &Column) -> (String, Option<Estimate>) {
    let seeded = |g: &str| -> Vec<(u64, f64)> {
        evals
            .iter()
            .filter(|e| e.group == g)
            .filter_map(|e| Some((e.seed, (c.score)(&e.report)?)))
            .collect()
    };
    let ours = seeded(name);
    if ours.is_empty() {
        return ("–".into(), None);
    }
    let digits = if c.scale == 1.0 { 3 } else { 1 };
    let values: Vec<f64> = ours.iter().map(|(_, x)| *x).collect();
    let own = Estimate::mean_of(&values);
    let mean = format!("{:.digits$}", c.scale * own.mean);
    let base_scores = seeded(base);
    // A column the baseline lacks (teacher-forced answers of routed models, against dense):
    // each row stands alone, with its own spread.
    if name == base || base_scores.is_empty() {
        let text = match own.se.is_nan() {
            true => mean,
            false => format!("{mean} ± {:.digits$}", c.scale * own.se),
        };
        return (text, None);
    }
    // The floor uses the items this group scored: the fewest of its evaluations'.
    let samples = evals
        .iter()
        .filter(|e| e.group == name)
        .filter_map(c.samples)
        .min();
    let d = paired_difference(&base_scores, &ours, samples);
    if d.mean.is_nan() {
        return (format!("{mean} (no seed in common)"), None);
    }
    let half = d.half_width();
    let text = match half.is_nan() {
        true => format!("{mean} ({:+.digits$}, one seed)", c.scale * d.mean),
        false => format!(
            "{mean} ({:+.digits$} ± {:.digits$})",
            c.scale * d.mean,
            c.scale * half
        ),
    };
    match d.shown() {
        true => (format!("**{text}**"), Some(d)),
        false => (text, Some(d)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eval(group: &str, seed: u64, whole: f64, relation: f64) -> Evaluation {
        let mut report = EvalReport {
            t2i_overall: whole,
            t2i_facts: whole,
            mmu_accuracy: 0.5,
            ..EvalReport::default()
        };
        report.t2i_per_category.insert("relation".into(), relation);
        report.val_loss.insert("t2i".into(), 1.0 + whole);
        Evaluation {
            group: group.into(),
            seed,
            dir: PathBuf::from(format!("{group}-seed{seed}")),
            report,
            t2i_samples: 256,
            mmu_samples: 128,
        }
    }

    fn row<'a>(md: &'a str, group: &str) -> Vec<&'a str> {
        md.lines()
            .filter(|l| l.starts_with(&format!("| {group} |")))
            .collect()
    }

    #[test]
    fn folder_names_give_groups() {
        assert_eq!(group_of("w0.5-increasing-seed2"), "w0.5-increasing");
        assert_eq!(group_of("dense-seed10"), "dense");
        assert_eq!(group_of("dense-seedling"), "dense-seedling");
        assert_eq!(group_of("dense-seed"), "dense-seed");
        assert_eq!(group_of("g0"), "g0");
    }

    #[test]
    fn re_evaluations_join_their_runs_group_under_their_settings() {
        let g = |p: &str| group_of_dir(Path::new(p)).unwrap();
        assert_eq!(g("runs/q/dense-seed1/evals/7d9c"), "dense@7d9c");
        assert_eq!(g("runs/q/unimod-seed0/evals/7d9c"), "unimod@7d9c");
        assert_eq!(g("runs/q/dense-seed1/evals/7d9c/"), "dense@7d9c");
        assert_eq!(g("runs/q/dense-seed1/evals/7d9c/."), "dense@7d9c");
        // Only a folder inside `evals` takes its run's name.
        assert_eq!(g("runs/q/dense-seed1"), "dense");
        assert_eq!(g("evals"), "evals");
    }

    #[test]
    fn differences_are_paired_by_seed() {
        // Seeds 20 points apart; `up` is 5 points of relation above the baseline in every seed,
        // `noisy` 5 points on average but not in every seed. Listed out of seed order.
        let evals = vec![
            eval("none", 2, 0.60, 0.40),
            eval("none", 0, 0.40, 0.20),
            eval("none", 1, 0.50, 0.30),
            eval("up", 1, 0.50, 0.35),
            eval("up", 0, 0.40, 0.25),
            eval("up", 2, 0.60, 0.45),
            eval("noisy", 0, 0.40, 0.35),
            eval("noisy", 1, 0.50, 0.25),
            eval("noisy", 2, 0.60, 0.45),
        ];
        let md = tables(&evals, None).unwrap();
        assert!(md.contains("Baseline `none` (seeds 0, 1, 2)"), "{md}");
        let up = row(&md, "up");
        assert_eq!(up.len(), 2, "{md}");
        assert!(up[1].contains("**35.0 (+5.0 ± 0.0)**"), "{}", up[1]);
        assert!(up[0].contains("50.0 (+0.0 ± "), "{}", up[0]);
        let noisy = row(&md, "noisy")[1];
        assert!(noisy.contains("35.0 (+5.0 ± 24.8)"), "{noisy}");
        assert!(!noisy.contains("**"), "{noisy}");
        // The baseline's own row: mean ± its standard error over seeds.
        assert!(row(&md, "none")[1].contains("30.0 ± 5.8"), "{md}");
        // Another baseline, named.
        let md = tables(&evals, Some("up")).unwrap();
        assert!(md.lines().nth(4).unwrap().starts_with("| up |"), "{md}");
    }

    #[test]
    fn bold_differences_are_read_against_their_number() {
        // `up` is 5 points of relation above the baseline in every seed (p = 0); `edge` 3, 4, 5
        // points (t 6.9 on 2 degrees of freedom, p 0.02): bold alone, chance among many.
        let evals: Vec<Evaluation> = (0..3)
            .flat_map(|s| {
                let x = 0.4 + 0.1 * s as f64;
                [
                    eval("none", s, x, x),
                    eval("up", s, x, x + 0.05),
                    eval("edge", s, x, x + 0.03 + 0.01 * s as f64),
                ]
            })
            .collect();
        let md = tables(&evals, None).unwrap();
        assert!(row(&md, "edge")[1].contains("**"), "{md}");
        let last = md.lines().last().unwrap();
        assert!(
            last.starts_with("2 of the ") && last.ends_with("1 hold: `up` on T2I relation %."),
            "{md}"
        );
        // Nothing bold, nothing to correct.
        let none: Vec<Evaluation> = evals.into_iter().filter(|e| e.group != "edge").collect();
        assert!(tables(&none, None).unwrap().contains("Holm"));
        let same: Vec<Evaluation> = none
            .into_iter()
            .filter(|e| e.group == "none")
            .flat_map(|e| {
                [
                    Evaluation {
                        group: "same".into(),
                        ..e.clone()
                    },
                    e,
                ]
            })
            .collect();
        assert!(!tables(&same, None).unwrap().contains("Holm"));
    }

    /// Routed models' teacher-forced MMU gets a third table, per decision and question kind.
    #[test]
    fn teacher_forced_answers_get_their_own_table() {
        let with = |group: &str, seed: u64, count: f64| {
            let mut e = eval(group, seed, 0.4, 0.3);
            let mut t = crate::eval::TeacherForced {
                top_k: 0.7,
                causal: 0.8,
                top_k_followed: 0.9,
                ..Default::default()
            };
            t.top_k_per_kind.insert("count".into(), count);
            e.report.mmu_teacher_forced = Some(t);
            e
        };
        let evals: Vec<Evaluation> = (0..3)
            .flat_map(|s| {
                [
                    with("a", s, 0.5 + 0.1 * s as f64),
                    with("b", s, 0.6 + 0.1 * s as f64),
                ]
            })
            .collect();
        let md = tables(&evals, None).unwrap();
        let b = row(&md, "b");
        assert_eq!(b.len(), 3, "{md}");
        assert!(
            md.contains("| TF top-k % | TF causal % | TF top-k followed % | TF top-k filled % | TF top-k count % |"),
            "{md}"
        );
        assert!(b[2].contains("**70.0 (+10.0 ± 0.0)**"), "{}", b[2]);
        // Against a dense baseline, which has none, each routed row gives its own mean ± se.
        let mut with_dense = evals;
        with_dense.extend((0..3).map(|s| eval("dense", s, 0.4, 0.3)));
        let md = tables(&with_dense, Some("dense")).unwrap();
        let b = row(&md, "b");
        assert!(b[2].contains("| 70.0 ± 5.8 |"), "{}", b[2]);
        assert!(!md.contains("no seed in common"), "{md}");
    }

    #[test]
    fn whole_captions_keep_their_binomial_floor() {
        // Every seed one point up: with 256 prompts per seed that is inside the binomial error.
        let evals: Vec<Evaluation> = (0..3)
            .flat_map(|s| {
                let x = 0.4 + 0.1 * s as f64;
                [eval("a", s, x, 0.3), eval("b", s, x + 0.01, 0.3)]
            })
            .collect();
        let md = tables(&evals, None).unwrap();
        let whole = row(&md, "b")[0]
            .split('|')
            .nth(3)
            .unwrap()
            .trim()
            .to_string();
        assert_eq!(whole, "51.0 (+1.0 ± 5.0)");
        // The loss has no floor: one hundredth up in every seed is shown.
        assert!(
            row(&md, "b")[0].contains("**1.510 (+0.010 ± 0.000)**"),
            "{md}"
        );
    }

    #[test]
    fn bad_sets_are_refused_by_name() {
        let evals = vec![eval("a", 0, 0.5, 0.5), eval("a", 0, 0.4, 0.5)];
        let e = tables(&evals, None).unwrap_err().to_string();
        assert!(e.contains("a-seed0") && e.contains("both seed 0"), "{e}");
        let e = tables(&[eval("a", 0, 0.5, 0.5)], Some("z"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("`z`") && e.contains("a"), "{e}");
        assert!(tables(&[], None).is_err());
        // A group without a seed the baseline has says so.
        let md = tables(&[eval("a", 0, 0.5, 0.5), eval("b", 1, 0.5, 0.5)], None).unwrap();
        assert!(md.contains("no seed in common"), "{md}");
        let dir = std::env::temp_dir().join(format!("unimod-compare-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let e = Evaluation::load(&dir).unwrap_err().to_string();
        assert!(e.contains("eval.json"), "{e}");
        std::fs::write(
            dir.join("eval.json"),
            serde_json::to_string(&EvalReport::default()).unwrap(),
        )
        .unwrap();
        let e = format!("{:#}", Evaluation::load(&dir).unwrap_err());
        assert!(e.contains("neither eval.toml nor config.toml"), "{e}");
        std::fs::write(dir.join("eval.toml"), "[train]\nseed = 7\n").unwrap();
        let loaded = Evaluation::load(&dir).unwrap();
        assert_eq!(loaded.seed, 7);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
