//! `unimod analyze`: the analyses of `unimod-analysis` run on a checkpoint's validation data,
//! each writing JSON, PNG plots and a markdown section into the output folder; `all` writes
//! `report.md` with every section and one line per finding of the paper, saying whether this
//! model shows it.

use crate::plots::{heatmap, line_chart};
use crate::train::RunContext;
use crate::{RunConfig, data};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use tch::nn::VarStore;
use unimod_analysis::attention::{self, LayerAttention};
use unimod_analysis::importance::{self, Importance};
use unimod_analysis::interaction::{self, Competition};
use unimod_analysis::probe::MODALITIES;
use unimod_analysis::redundancy::{self, Ranking, Redundancy};
use unimod_analysis::schedule::{ArankRule, TaskArank};
use unimod_model::UnifiedTransformer;
use unimod_tok::dataset::Split;
use unimod_tok::{Batch, Task};

/// `[analysis]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AnalysisConfig {
    /// Validation samples per task (the paper computes ARank on about 50).
    pub samples: usize,
    /// Token fractions of the redundancy curves.
    pub fractions: Vec<f64>,
    /// Capacity of the shared router in the competition probe (the paper: 0.5).
    pub competition_capacity: f64,
    /// Add a per-head table to the attention section (the JSON always has the heads).
    pub per_head: bool,
    pub schedule: ArankRule,
}

impl Default for AnalysisConfig {
    fn default() -> Self {
        AnalysisConfig {
            samples: 48,
            fractions: vec![1.0, 0.8, 0.6, 0.4, 0.2, 0.1],
            competition_capacity: 0.5,
            per_head: false,
            schedule: ArankRule::default(),
        }
    }
}

const TASKS: [Task; 2] = [Task::T2i, Task::Mmu];

/// A checkpoint and its context, analysed into `out`.
pub struct Analyzer<'a> {
    pub ctx: &'a RunContext,
    pub cfg: &'a RunConfig,
    pub model: &'a UnifiedTransformer,
    pub vs: &'a VarStore,
    pub out: PathBuf,
}

impl Analyzer<'_> {
    /// `samples` validation sequences of one task, the same for every checkpoint.
    fn batch(&self, task: Task) -> Result<Batch> {
        let mut c = self.cfg.clone();
        c.train.mix = data::TaskMix {
            t2i: 0,
            mmu: 0,
            lm: 0,
        };
        match task {
            Task::T2i => c.train.mix.t2i = self.cfg.analysis.samples,
            Task::Mmu => c.train.mix.mmu = self.cfg.analysis.samples,
            Task::Lm => c.train.mix.lm = self.cfg.analysis.samples,
        }
        self.ctx.batch(&c, Split::Val, 2_000_000, true)
    }

    fn write_json(&self, name: &str, value: &impl Serialize) -> Result<()> {
        let path = self.out.join(name);
        std::fs::write(&path, serde_json::to_string_pretty(value)?)
            .with_context(|| format!("writing {}", path.display()))
    }

    fn figure(&self, md: &mut String, file: &str, title: &str) {
        let _ = writeln!(md, "\n![{title}]({file})\n");
    }

    pub fn attention(&self) -> Result<String> {
        let mut md = String::from(
            "## Attention patterns\n\nShare of each query's attention mass on text / image / special keys (and that share ÷ the modality's share of the visible keys), and mean attention entropy, per layer, over the valid queries of validation samples.\n\n| task | layer | text | image | special | text ×count | image ×count | entropy (nats) |\n|---|---|---|---|---|---|---|---|\n",
        );
        let mut all = Vec::new();
        for task in TASKS {
            let b = self.batch(task)?;
            let p = attention::patterns(self.model, &b)?;
            for l in &p {
                let _ = writeln!(
                    md,
                    "| {task} | {} | {:.3} | {:.3} | {:.3} | {:.2} | {:.2} | {:.2} |",
                    l.layer,
                    l.share[0],
                    l.share[1],
                    l.share[2],
                    l.per_token[0],
                    l.per_token[1],
                    l.entropy
                );
            }
            let last = self.model.cfg.n_layers - 1;
            for layer in [0, last] {
                let m = attention::map(self.model, &b, 0, layer)?;
                let rows: Vec<Vec<f32>> = Vec::<Vec<f32>>::try_from(&m)?;
                let file = format!("attention-map-{task}-layer{layer}.png");
                heatmap(&self.out.join(&file), &rows, 6)?;
                self.figure(
                    &mut md,
                    &file,
                    &format!(
                        "{task} sample 0, layer {layer}, mean over heads (query rows, key columns)"
                    ),
                );
            }
            all.push((task, p));
        }
        if self.cfg.analysis.per_head {
            md.push_str("\nPer head: share of attention on text / image / special keys, entropy (nats).\n\n| task | layer | head | text | image | special | entropy |\n|---|---|---|---|---|---|---|\n");
            for (task, p) in &all {
                for l in p {
                    for (h, a) in l.heads.iter().enumerate() {
                        let _ = writeln!(
                            md,
                            "| {task} | {} | {h} | {:.3} | {:.3} | {:.3} | {:.2} |",
                            l.layer, a.share[0], a.share[1], a.share[2], a.entropy
                        );
                    }
                }
            }
        }
        let series: Vec<(String, Vec<(f64, f64)>)> = all
            .iter()
            .flat_map(|(task, p)| {
                (0..2).map(move |m| {
                    let pts = p
                        .iter()
                        .map(|l: &LayerAttention| (l.layer as f64, l.share[m]))
                        .collect();
                    (format!("{task} → {}", MODALITIES[m]), pts)
                })
            })
            .collect();
        line_chart(
            &self.out.join("attention-share.png"),
            "attention mass on text and image keys",
            "layer",
            "share of attention",
            &series,
        )?;
        self.figure(&mut md, "attention-share.png", "attention share per layer");
        self.write_json("attention.json", &all)?;
        Ok(md)
    }

    pub fn importance(&self) -> Result<(String, Vec<Importance>)> {
        let mut all = Vec::new();
        for task in TASKS {
            all.push(importance::importance(
                self.model,
                &self.batch(task)?,
                task,
            )?);
        }
        let mut md = String::from(
            "## Layer importance\n\nLoss increase when one layer is skipped at inference (the paper's Table 1), ARank (mean numerical rank of the heads' pre-softmax score matrices, relative tolerance 1e-4, padding masked; the paper's Eq. 3) divided by the mean sequence length, and cos(input, output) of the layer's residual stream.\n\n| task | layer | Δloss when skipped | ARank | ARank / tokens | cos(in, out) |\n|---|---|---|---|---|---|\n",
        );
        for imp in &all {
            for l in &imp.layers {
                let r = l.arank.unwrap_or(f64::NAN);
                let _ = writeln!(
                    md,
                    "| {} | {} | {:+.3} | {:.1} | {:.3} | {:.3} |",
                    imp.task,
                    l.layer,
                    l.skip_loss - imp.loss,
                    r,
                    r / imp.mean_tokens,
                    l.cosine
                );
            }
        }
        type Of = fn(&Importance, &importance::LayerImportance) -> f64;
        let plots: [(&str, &str, Of); 3] = [
            (
                "skip-loss.png",
                "loss increase when the layer is skipped",
                |i, l| l.skip_loss - i.loss,
            ),
            ("arank.png", "ARank / sequence length", |i, l| {
                l.arank.unwrap_or(f64::NAN) / i.mean_tokens
            }),
            ("cosine.png", "cos(layer input, layer output)", |_, l| {
                l.cosine
            }),
        ];
        for (file, title, of) in plots {
            let series = all
                .iter()
                .map(|i| {
                    (
                        i.task.to_string(),
                        i.layers
                            .iter()
                            .map(|l| (l.layer as f64, of(i, l)))
                            .collect(),
                    )
                })
                .collect::<Vec<_>>();
            line_chart(&self.out.join(file), title, "layer", title, &series)?;
            self.figure(&mut md, file, title);
        }
        self.write_json("importance.json", &all)?;
        Ok((md, all))
    }

    pub fn redundancy(&self) -> Result<(String, Vec<Redundancy>)> {
        let mut md = String::from(
            "## Token redundancy\n\nLoss when one layer processes only a fraction of the tokens (ranked by attention received in that layer; random ranking as the control; special tokens always processed), the others passing unchanged.\n\n",
        );
        let fr = &self.cfg.analysis.fractions;
        let mut all: Vec<Redundancy> = Vec::new();
        for task in TASKS {
            let b = self.batch(task)?;
            for ranking in [Ranking::Attention, Ranking::Random] {
                all.push(redundancy::redundancy(self.model, &b, task, fr, ranking)?);
            }
        }
        let _ = writeln!(
            md,
            "| task | ranking | layer | {} |\n|---|---|---|{}",
            fr.iter()
                .map(|f| format!("Δloss @ {f}"))
                .collect::<Vec<_>>()
                .join(" | "),
            "---|".repeat(fr.len())
        );
        for r in &all {
            for (layer, losses) in r.losses.iter().enumerate() {
                let cells: Vec<String> = losses
                    .iter()
                    .map(|l| format!("{:+.3}", l - r.dense_loss))
                    .collect();
                let _ = writeln!(
                    md,
                    "| {} | {:?} | {layer} | {} |",
                    r.task,
                    r.ranking,
                    cells.join(" | ")
                );
            }
            if r.ranking == Ranking::Attention {
                let series: Vec<(String, Vec<(f64, f64)>)> = r
                    .losses
                    .iter()
                    .enumerate()
                    .map(|(layer, l)| {
                        (
                            format!("layer {layer}"),
                            fr.iter()
                                .zip(l)
                                .map(|(f, v)| (*f, v - r.dense_loss))
                                .collect(),
                        )
                    })
                    .collect();
                let file = format!("redundancy-{}.png", r.task);
                let title = format!("{}: loss increase vs share of tokens a layer keeps", r.task);
                line_chart(
                    &self.out.join(&file),
                    &title,
                    "share of tokens processed",
                    "Δloss",
                    &series,
                )?;
                self.figure(&mut md, &file, &title);
            }
        }
        self.write_json("redundancy.json", &all)?;
        Ok((md, all))
    }

    /// Gradient cosine on this checkpoint; the competition probe on `probe` (a checkpoint with
    /// a router shared by both tasks), when given.
    pub fn interaction(
        &self,
        probe: Option<(&UnifiedTransformer, &RunContext, &RunConfig)>,
    ) -> Result<(String, Option<Vec<Competition>>)> {
        let (t, m) = (self.batch(Task::T2i)?, self.batch(Task::Mmu)?);
        let cos =
            interaction::gradient_cosine(self.model, self.vs, (&t, Task::T2i), (&m, Task::Mmu))?;
        let mut md = String::from(
            "## Task interaction\n\nCosine similarity of the T2I and MMU loss gradients with respect to each layer's block weights (negative: the tasks pull the layer apart).\n\n| layer | gradient cosine |\n|---|---|\n",
        );
        for (l, c) in cos.iter().enumerate() {
            let _ = writeln!(md, "| {l} | {c:+.3} |");
        }
        line_chart(
            &self.out.join("gradient-cosine.png"),
            "cos(∇ T2I loss, ∇ MMU loss) per layer",
            "layer",
            "cosine",
            &[(
                "T2I vs MMU".into(),
                cos.iter()
                    .enumerate()
                    .map(|(l, c)| (l as f64, *c))
                    .collect(),
            )],
        )?;
        self.figure(&mut md, "gradient-cosine.png", "gradient cosine");
        let competition = match probe {
            None => {
                md.push_str("\nCompetition probe: not run (pass `--probe <run>` with a checkpoint whose router is shared by both tasks, e.g. the `mod` variant of the quickstart).\n");
                None
            }
            Some((model, ctx, cfg)) => {
                let mut c = cfg.clone();
                c.train.mix = data::TaskMix {
                    t2i: self.cfg.analysis.samples / 2,
                    mmu: self.cfg.analysis.samples / 2,
                    lm: 0,
                };
                let b = ctx.batch(&c, Split::Val, 2_000_000, true)?;
                let cap = self.cfg.analysis.competition_capacity;
                let rows = interaction::competition(model, &b, cap)?;
                let _ = writeln!(
                    md,
                    "\nCompetition probe (the paper's Fig. 4): the probe checkpoint's shared router keeps {cap} of the union of both tasks' routable tokens in the batch.\n\n| layer | T2I kept / routable | MMU kept / routable | T2I share kept | MMU share kept |\n|---|---|---|---|---|"
                );
                for r in &rows {
                    let share = |i: usize| r.kept[i] as f64 / r.routable[i].max(1) as f64;
                    let _ = writeln!(
                        md,
                        "| {} | {} / {} | {} / {} | {:.2} | {:.2} |",
                        r.layer,
                        r.kept[0],
                        r.routable[0],
                        r.kept[1],
                        r.routable[1],
                        share(0),
                        share(1)
                    );
                }
                let series: Vec<(String, Vec<(f64, f64)>)> = (0..2)
                    .map(|i| {
                        (
                            ["T2I", "MMU"][i].to_string(),
                            rows.iter()
                                .map(|r| {
                                    (
                                        r.layer as f64,
                                        r.kept[i] as f64 / r.routable[i].max(1) as f64,
                                    )
                                })
                                .collect(),
                        )
                    })
                    .collect();
                line_chart(
                    &self.out.join("competition.png"),
                    "share of each task's tokens a shared router keeps",
                    "layer",
                    "share kept",
                    &series,
                )?;
                self.figure(&mut md, "competition.png", "competition probe");
                self.write_json("competition.json", &rows)?;
                Some(rows)
            }
        };
        self.write_json("gradient-cosine.json", &cos)?;
        Ok((md, competition))
    }

    /// The ARank schedule file (`schedule.json`) from `importance`'s ARank.
    pub fn schedule(&self, importance: &[Importance]) -> Result<String> {
        let tasks: Vec<TaskArank> = importance
            .iter()
            .map(|i| TaskArank {
                task: i.task,
                arank: i
                    .layers
                    .iter()
                    .map(|l| l.arank.unwrap_or(f64::INFINITY))
                    .collect(),
                mean_tokens: i.mean_tokens,
            })
            .collect();
        let file = self
            .cfg
            .analysis
            .schedule
            .schedule(&tasks, self.model.cfg.n_layers)?;
        let path = self.out.join("schedule.json");
        file.write(&path)
            .with_context(|| format!("writing {}", path.display()))?;
        let mut md = format!(
            "## ARank schedule\n\n{}\n\nWritten to `schedule.json`; train with it by `--set 'model.routing.schedule={{ kind = \"file\", path = \"{}\" }}'`.\n\n| layer | plan |\n|---|---|\n",
            file.note,
            path.display()
        );
        for (l, p) in file.layers.iter().enumerate() {
            let _ = writeln!(md, "| {l} | {} |", serde_json::to_string(p)?);
        }
        Ok(md)
    }
}

/// Mean loss increase, relative to the dense loss, over `layers` and every fraction below 1 of
/// the attention-ranked redundancy curve of `task`: how much the task's loss depends on those
/// layers processing all tokens (scale-free, so T2I and MMU compare).
fn sensitivity(redundancy: &[Redundancy], task: Task, layers: std::ops::Range<usize>) -> f64 {
    let Some(r) = redundancy
        .iter()
        .find(|r| r.task == task && r.ranking == Ranking::Attention)
    else {
        return f64::NAN;
    };
    let v: Vec<f64> = r.losses[layers.start.min(r.losses.len())..layers.end.min(r.losses.len())]
        .iter()
        .flat_map(|l| {
            l.iter()
                .zip(&r.fractions)
                .filter(|(_, f)| **f < 1.0)
                .map(|(loss, _)| (loss - r.dense_loss) / r.dense_loss.abs().max(1e-12))
        })
        .collect();
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// One line per finding of the paper: does this model show it? Layers before `first_routable`
/// (never routed by the schedule rule) are left out of the redundancy-curve findings.
pub fn findings(
    importance: &[Importance],
    redundancy: &[Redundancy],
    competition: Option<&[Competition]>,
    first_routable: usize,
) -> String {
    let norm = |i: &Importance, layers: &[importance::LayerImportance]| {
        let v: Vec<f64> = layers
            .iter()
            .filter_map(|l| l.arank)
            .map(|r| r / i.mean_tokens)
            .collect();
        v.iter().sum::<f64>() / v.len().max(1) as f64
    };
    let mut md = String::from("## Findings\n\n");
    if let [t2i, mmu] = importance {
        let (a, b) = (norm(t2i, &t2i.layers), norm(mmu, &mmu.layers));
        let rel = (a - b).abs() / a.max(b).max(1e-12);
        let _ = writeln!(
            md,
            "- Task-dependent redundancy (paper: Show-o's T2I and MMU differ): mean ARank / tokens T2I {a:.3}, MMU {b:.3}, relative difference {:.0} % → **{}** (threshold 10 %).",
            100.0 * rel,
            if rel > 0.10 { "shown" } else { "not shown" }
        );
    }
    if !redundancy.is_empty() {
        let n = redundancy[0].losses.len();
        let routable = first_routable.min(n)..n;
        let (t, m) = (
            sensitivity(redundancy, Task::T2i, routable.clone()),
            sensitivity(redundancy, Task::Mmu, routable.clone()),
        );
        let ratio = t.max(m) / t.min(m).max(1e-12);
        let _ = writeln!(
            md,
            "- Task-dependent redundancy, by loss (layers {}–{}): dropping tokens raises the T2I loss by {:.1} % and the MMU loss by {:.1} % on average (relative), ratio {ratio:.1} → **{}** (threshold 1.5×).",
            routable.start,
            n.saturating_sub(1),
            100.0 * t,
            100.0 * m,
            if ratio > 1.5 { "shown" } else { "not shown" }
        );
        for task in TASKS.into_iter().filter(|_| routable.len() >= 2) {
            let mid = routable.start + routable.len() / 2;
            let (early, late) = (
                sensitivity(redundancy, task, routable.start..mid),
                sensitivity(redundancy, task, mid..n),
            );
            let _ = writeln!(
                md,
                "- Later layers more redundant, {task}, by loss: relative loss increase when layers {}–{} drop tokens {:.1} %, layers {}–{} {:.1} % → **{}**.",
                routable.start,
                mid.saturating_sub(1),
                100.0 * early,
                mid,
                n.saturating_sub(1),
                100.0 * late,
                if late < early { "shown" } else { "not shown" }
            );
        }
    }
    for i in importance {
        let half = i.layers.len() / 2;
        let (early, late) = (norm(i, &i.layers[..half]), norm(i, &i.layers[half..]));
        let _ = writeln!(
            md,
            "- Later layers more redundant, {} (paper: ARank falls with depth): ARank / tokens first half {early:.3}, second half {late:.3} → **{}**.",
            i.task,
            if late < early { "shown" } else { "not shown" }
        );
    }
    match competition {
        Some(rows) if !rows.is_empty() => {
            let share = |i: usize| {
                rows.iter().map(|r| r.kept[i]).sum::<usize>() as f64
                    / rows.iter().map(|r| r.routable[i]).sum::<usize>().max(1) as f64
            };
            let (t, m) = (share(0), share(1));
            let _ = writeln!(
                md,
                "- A shared router favours T2I tokens (paper's Fig. 4): it keeps {:.0} % of T2I vs {:.0} % of MMU routable tokens → **{}**.",
                100.0 * t,
                100.0 * m,
                if t > m { "shown" } else { "not shown" }
            );
        }
        _ => md.push_str(
            "- A shared router favours T2I tokens: not tested (no `--probe` checkpoint).\n",
        ),
    }
    md
}

/// Every analysis into `out/report.md`.
pub fn all(
    a: &Analyzer,
    probe: Option<(&UnifiedTransformer, &RunContext, &RunConfig)>,
    source: &Path,
) -> Result<PathBuf> {
    let (imp_section, imp) = a.importance()?;
    let (redundancy_section, redundancy) = a.redundancy()?;
    let (interaction, competition) = a.interaction(probe)?;
    let sections = [
        a.attention()?,
        imp_section,
        redundancy_section,
        interaction,
        a.schedule(&imp)?,
    ];
    let mut md = format!(
        "# Analysis of `{}`\n\n{} validation samples per task.\n\n",
        source.display(),
        a.cfg.analysis.samples
    );
    md.push_str(&findings(
        &imp,
        &redundancy,
        competition.as_deref(),
        a.cfg.analysis.schedule.protect_first,
    ));
    for s in sections {
        md.push('\n');
        md.push_str(&s);
    }
    let path = a.out.join("report.md");
    std::fs::write(&path, md).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}
