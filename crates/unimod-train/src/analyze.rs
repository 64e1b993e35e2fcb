//! `unimod analyze`: the analyses of `unimod-analysis` run on a checkpoint's validation data,
//! each writing JSON, PNG plots and a markdown section into the output folder; `all` writes
//! `report.md` with every section and one line per finding of the paper, saying whether this
//! model shows it.

use crate::plots::{heatmap, line_chart};
use crate::train::RunContext;
use crate::{RunConfig, data};
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use tch::nn::VarStore;
use unimod_analysis::arank::{ArankDefinition, RANK_RTOL};
use unimod_analysis::attention::{self, LayerAttention};
use unimod_analysis::importance::{self, Importance};
use unimod_analysis::interaction::{self, Competition};
use unimod_analysis::probe::MODALITIES;
use unimod_analysis::redundancy::{self, Ranking, Redundancy};
use unimod_analysis::schedule::{ArankRule, TaskArank};
use unimod_analysis::stats::Estimate;
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
    /// Which matrix ARank takes the rank of: `"bilinear"` (the paper's Eq. 3) or `"gamma_mod"`
    /// (γ-MoD's code).
    pub arank: ArankDefinition,
    /// How `unimod analyze schedule` turns ARank into a UniMoD schedule.
    pub schedule: ArankRule,
}

impl Default for AnalysisConfig {
    fn default() -> Self {
        AnalysisConfig {
            samples: 48,
            fractions: vec![1.0, 0.8, 0.6, 0.4, 0.2, 0.1],
            competition_capacity: 0.5,
            per_head: false,
            arank: ArankDefinition::Bilinear,
            schedule: ArankRule::default(),
        }
    }
}

const TASKS: [Task; 2] = [Task::T2I, Task::MMU];

/// A checkpoint and its context, analysed into `out`.
pub struct Analyzer<'a> {
    /// The run's tokenizers and data.
    pub ctx: &'a RunContext,
    /// The run's configuration.
    pub cfg: &'a RunConfig,
    /// The checkpoint's model.
    pub model: &'a UnifiedTransformer,
    /// Its weights.
    pub vs: &'a VarStore,
    /// Where reports, JSON and `.npy` files go.
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
            Task::T2I => c.train.mix.t2i = self.cfg.analysis.samples,
            Task::MMU => c.train.mix.mmu = self.cfg.analysis.samples,
            Task::LM => c.train.mix.lm = self.cfg.analysis.samples,
            other => bail!("the analyses read built-in tasks only, not `{other}`"),
        }
        self.ctx.batch(&c, Split::Val, 2_000_000, true)
    }

    fn write_json(&self, name: &str, value: &impl Serialize) -> Result<()> {
        let path = self.out.join(name);
        std::fs::write(&path, serde_json::to_string_pretty(value)?)
            .with_context(|| format!("writing {}", path.display()))
    }

    /// `name` (a `.npy` file numpy reads) beside the JSON: the f64 array of `shape` from
    /// row-major `values`, NaN where a value does not exist (a skipped layer's ARank).
    fn write_npy(&self, name: &str, shape: &[usize], values: Vec<f64>) -> Result<()> {
        let path = self.out.join(name);
        let a = ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(shape), values)
            .with_context(|| format!("{name}: values do not fill the shape {shape:?}"))?;
        ndarray_npy::write_npy(&path, &a).with_context(|| format!("writing {}", path.display()))
    }

    fn figure(&self, md: &mut String, file: &str, title: &str) {
        let _ = writeln!(md, "\n![{title}]({file})\n");
    }

    /// Attention mass per modality, per task and layer.
    pub fn attention(&self) -> Result<(String, Patterns)> {
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
                let n = rows.len();
                self.write_npy(
                    &file.replace(".png", ".npy"),
                    &[n, n],
                    rows.iter().flatten().map(|v| f64::from(*v)).collect(),
                )?;
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
        let layers = self.model.cfg.n_layers;
        // [task, layer, text / image / special] and [task, layer, head, text / image / special]
        let (mut shares, mut heads, mut entropy) = (Vec::new(), Vec::new(), Vec::new());
        for (_, p) in &all {
            for l in p {
                shares.extend(l.share);
                entropy.push(l.entropy);
                heads.extend(l.heads.iter().flat_map(|h| h.share));
            }
        }
        let n_heads = heads.len() / (3 * layers * all.len()).max(1);
        self.write_npy("attention-share.npy", &[all.len(), layers, 3], shares)?;
        self.write_npy(
            "attention-share-heads.npy",
            &[all.len(), layers, n_heads, 3],
            heads,
        )?;
        self.write_npy("attention-entropy.npy", &[all.len(), layers], entropy)?;
        Ok((md, all))
    }

    /// Layer importance per task (skip-one loss, cosine, ARank): markdown and the numbers.
    pub fn importance(&self) -> Result<(String, Vec<Importance>)> {
        let mut all = Vec::new();
        for task in TASKS {
            all.push(importance::importance(
                self.model,
                &self.batch(task)?,
                task,
                self.cfg.analysis.arank,
            )?);
        }
        let definition = match self.cfg.analysis.arank {
            ArankDefinition::Bilinear => format!(
                "the paper's Eq. 3: mean over heads and samples of the numerical rank (relative tolerance {RANK_RTOL:e}) of (x W_Q)(x W_K)ᵀ over each sample's valid tokens, before RoPE and with no attention mask; at most min(tokens, head dim)"
            ),
            ArankDefinition::GammaMod => "γ-MoD's code: rank of the post-softmax map times the causal mask with the diagonal zeroed, float32, torch's default tolerance; at most tokens − 1".into(),
        };
        let mut md = format!(
            "## Layer importance\n\nLoss increase when one layer is skipped at inference (the paper's Table 1); ARank ({definition}), ± its standard error over samples, and divided by the mean sequence length; cos(input, output) of the layer's residual stream.\n\n| task | layer | Δloss when skipped | ARank | bound | ARank / tokens | cos(in, out) |\n|---|---|---|---|---|---|---|\n",
        );
        for imp in &all {
            for l in &imp.layers {
                let (r, cell, bound) = match l.arank {
                    Some(a) => (
                        a.mean,
                        format!("{:.2} ± {:.2}", a.mean, a.se),
                        format!("{:.1}", a.bound),
                    ),
                    None => (f64::NAN, "-".into(), "-".into()),
                };
                let _ = writeln!(
                    md,
                    "| {} | {} | {:+.3} | {cell} | {bound} | {:.3} | {:.3} |",
                    imp.task,
                    l.layer,
                    l.skip_loss - imp.loss,
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
                l.arank.map_or(f64::NAN, |a| a.mean) / i.mean_tokens
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
        // [task, layer] each
        let layers = self.model.cfg.n_layers;
        let per_layer = |f: &dyn Fn(&Importance, &importance::LayerImportance) -> f64| {
            all.iter()
                .flat_map(|i| i.layers.iter().map(move |l| (i, l)))
                .map(|(i, l)| f(i, l))
                .collect::<Vec<_>>()
        };
        let shape = [all.len(), layers];
        self.write_npy(
            "arank.npy",
            &shape,
            per_layer(&|_, l| l.arank.map_or(f64::NAN, |a| a.mean)),
        )?;
        self.write_npy(
            "arank-se.npy",
            &shape,
            per_layer(&|_, l| l.arank.map_or(f64::NAN, |a| a.se)),
        )?;
        self.write_npy(
            "skip-loss.npy",
            &shape,
            per_layer(&|i, l| l.skip_loss - i.loss),
        )?;
        self.write_npy("cosine.npy", &shape, per_layer(&|_, l| l.cosine))?;
        Ok((md, all))
    }

    /// Token redundancy per task and layer, by attention and at random: markdown and numbers.
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
        // [task, ranking (attention, random), layer, fraction]: Δloss against the dense loss
        let layers = all.first().map_or(0, |r| r.losses.len());
        let deltas = all
            .iter()
            .flat_map(|r| r.losses.iter().flatten().map(move |l| l - r.dense_loss))
            .collect();
        self.write_npy(
            "redundancy.npy",
            &[TASKS.len(), 2, layers, fr.len()],
            deltas,
        )?;
        self.write_npy("redundancy-fractions.npy", &[fr.len()], fr.clone())?;
        Ok((md, all))
    }

    /// Gradient cosine on this checkpoint; the competition probe on `probe` (a checkpoint with
    /// a router shared by both tasks), when given.
    pub fn interaction(
        &self,
        probe: Option<(&UnifiedTransformer, &RunContext, &RunConfig)>,
    ) -> Result<(String, Option<Vec<Competition>>)> {
        let (t, m) = (self.batch(Task::T2I)?, self.batch(Task::MMU)?);
        let cos =
            interaction::gradient_cosine(self.model, self.vs, (&t, Task::T2I), (&m, Task::MMU))?;
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
                // [routed layer of the probe (competition.json names them), task (T2I, MMU),
                // kept / routable]
                let counts = rows
                    .iter()
                    .flat_map(|r| (0..2).flat_map(|i| [r.kept[i] as f64, r.routable[i] as f64]))
                    .collect();
                self.write_npy("competition.npy", &[rows.len(), 2, 2], counts)?;
                Some(rows)
            }
        };
        self.write_json("gradient-cosine.json", &cos)?;
        self.write_npy("gradient-cosine.npy", &[cos.len()], cos.clone())?;
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
                    .map(|l| l.arank.map_or(f64::INFINITY, |a| a.mean))
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

/// How a finding's difference reads in its verdict, in the units its text uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// A share of a bound, as a plain fraction (ARank / its bound).
    Share,
    /// A relative change, in per cent (loss increases).
    Percent,
    /// A difference of two percentages, in points.
    Points,
}

impl Unit {
    fn show(self, v: f64) -> String {
        match self {
            Unit::Share => format!("{v:.3}"),
            Unit::Percent => format!("{:.1} %", 100.0 * v),
            Unit::Points => format!("{:.1} points", 100.0 * v),
        }
    }
}

/// The verdict on a claim that the estimated difference is > 0: shown only outside its 95 %
/// interval (Student's t at the estimate's degrees of freedom), and said so when the data point
/// the other way.
pub fn verdict(e: Estimate, unit: Unit) -> String {
    let half = e.half_width();
    if !(e.mean.is_finite() && half.is_finite()) {
        "inconclusive (no estimate)".into()
    } else if e.mean > half {
        "shown".into()
    } else if e.mean < -half {
        "not shown (the opposite holds beyond its 95 % interval)".into()
    } else {
        let sign = if e.mean < 0.0 { "−" } else { "+" };
        format!(
            "inconclusive (difference {sign}{} within its 95 % interval ±{}, t = {:.2}; more samples, `analysis.samples`, would narrow it)",
            unit.show(e.mean.abs()),
            unit.show(half),
            e.critical()
        )
    }
}

/// `e` as a claim that its difference is nonzero, either way.
fn absolute(e: Estimate) -> Estimate {
    Estimate {
        mean: e.mean.abs(),
        ..e
    }
}

/// Which of the paper's analyses a finding checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// ARank per layer and task (the paper's Fig. 3).
    Arank,
    /// Loss when layers keep only their most-attended tokens.
    Redundancy,
    /// Tokens a router shared by the tasks keeps (the paper's Fig. 4).
    Competition,
    /// Attention mass by modality (the paper's Fig. 2).
    Attention,
}

/// Attention per layer, of each task.
pub type Patterns = Vec<(Task, Vec<LayerAttention>)>;

/// The paper's Fig. 2 claim: T2I and MMU queries split their attention between text and image
/// keys differently. Per layer, the difference of the image keys' share of attention; its
/// mean over layers with the standard error over layers (the layers as samples).
pub fn attention_finding(patterns: &Patterns) -> Option<Finding> {
    let of = |task| patterns.iter().find(|(t, _)| *t == task).map(|(_, p)| p);
    let (t2i, mmu) = (of(Task::T2I)?, of(Task::MMU)?);
    let diff: Vec<f64> = t2i
        .iter()
        .zip(mmu)
        .map(|(a, b)| a.share[1] - b.share[1])
        .collect();
    let mean = |p: &[LayerAttention]| p.iter().map(|l| l.share[1]).sum::<f64>() / p.len() as f64;
    let d = Estimate::mean_of(&diff);
    Some(Finding {
        source: Source::Attention,
        claim: "Task-dependent attention (paper's Fig. 2: Show-o's T2I and MMU queries attend to text and image differently)".into(),
        ours: format!(
            "image keys receive {:.1} % of T2I queries' attention and {:.1} % of MMU queries' (difference {:+.1} ± {:.1} points, standard error over the {} layers)",
            100.0 * mean(t2i),
            100.0 * mean(mmu),
            100.0 * d.mean,
            100.0 * d.se,
            diff.len()
        ),
        verdict: verdict(absolute(d), Unit::Points),
    })
}

/// One of the paper's findings checked on this model.
#[derive(Debug, Clone)]
pub struct Finding {
    /// Where in the paper the claim is made.
    pub source: Source,
    /// The claim, with what the paper reports.
    pub claim: String,
    /// What this model gives, with its uncertainty.
    pub ours: String,
    /// Shown, not shown or inconclusive, and why.
    pub verdict: String,
}

/// The findings as markdown, one line each.
pub fn render_findings(findings: &[Finding]) -> String {
    let mut md = String::from(
        "## Findings\n\nShown = the difference lies outside its 95 % interval (Student's t at the degrees of freedom of its standard error, stated); otherwise inconclusive or not shown.\n\n",
    );
    for f in findings {
        let _ = writeln!(md, "- {}: {} → **{}**.", f.claim, f.ours, f.verdict);
    }
    md
}

/// The paper's findings on this model. A finding is shown only when its difference lies
/// outside its 95 % interval. Layers before `first_routable` (never routed by the
/// schedule rule) are left out of the redundancy-curve findings.
pub fn findings(
    importance: &[Importance],
    redundancy: &[Redundancy],
    competition: Option<&[Competition]>,
    first_routable: usize,
) -> Vec<Finding> {
    // ARank as a share of its bound, averaged over `layers`; its standard error treats the
    // layers' sample means as independent, on the fewest degrees of freedom among them.
    let norm = |layers: &[importance::LayerImportance]| {
        let a: Vec<_> = layers.iter().filter_map(|l| l.arank).collect();
        let n = a.len().max(1) as f64;
        let mean = a.iter().map(|r| r.mean / r.bound.max(1.0)).sum::<f64>() / n;
        let se = a
            .iter()
            .map(|r| (r.se / r.bound.max(1.0)).powi(2))
            .sum::<f64>()
            .sqrt()
            / n;
        let df = a
            .iter()
            .map(|r| r.estimate().df)
            .fold(f64::INFINITY, f64::min);
        Estimate { mean, se, df }
    };
    let mut out = Vec::new();
    let mut add = |source, claim: String, ours: String, verdict: String| {
        out.push(Finding {
            source,
            claim,
            ours,
            verdict,
        })
    };
    if let [t2i, mmu] = importance {
        let (a, b) = (norm(&t2i.layers), norm(&mmu.layers));
        add(
            Source::Arank,
            "Task-dependent redundancy by ARank (paper: Show-o's T2I and MMU differ)".into(),
            format!(
                "mean ARank / its bound T2I {:.3} ± {:.3}, MMU {:.3} ± {:.3}",
                a.mean, a.se, b.mean, b.se
            ),
            verdict(absolute(a.minus(b)), Unit::Share),
        );
    }
    let curve = |task| {
        redundancy
            .iter()
            .find(|r| r.task == task && r.ranking == Ranking::Attention)
    };
    if let (Some(t), Some(m)) = (curve(Task::T2I), curve(Task::MMU)) {
        let n = t.losses.len();
        let routable = first_routable.min(n)..n;
        let (a, b) = (
            Estimate::mean_of(&t.sensitivity(routable.clone())),
            Estimate::mean_of(&m.sensitivity(routable.clone())),
        );
        add(
            Source::Redundancy,
            format!(
                "Task-dependent redundancy, by loss (layers {}–{})",
                routable.start,
                n.saturating_sub(1)
            ),
            format!(
                "dropping tokens raises the T2I loss by {:.1} ± {:.1} % and the MMU loss by {:.1} ± {:.1} % on average (relative, per sample)",
                100.0 * a.mean,
                100.0 * a.se,
                100.0 * b.mean,
                100.0 * b.se
            ),
            verdict(absolute(a.minus(b)), Unit::Percent),
        );
        for r in [t, m].into_iter().filter(|_| routable.len() >= 2) {
            let mid = routable.start + routable.len() / 2;
            let (early, late) = (r.sensitivity(routable.start..mid), r.sensitivity(mid..n));
            let (e, l) = (
                Estimate::mean_of(&early).mean,
                Estimate::mean_of(&late).mean,
            );
            let d = Estimate::paired(&late, &early);
            add(
                Source::Redundancy,
                format!("Later layers more redundant, {}, by loss", r.task),
                format!(
                    "relative loss increase when layers {}–{} drop tokens {:.1} %, layers {}–{} {:.1} % (paired difference {:.1} ± {:.1} %)",
                    routable.start,
                    mid.saturating_sub(1),
                    100.0 * e,
                    mid,
                    n.saturating_sub(1),
                    100.0 * l,
                    100.0 * d.mean,
                    100.0 * d.se
                ),
                verdict(d, Unit::Percent),
            );
        }
    }
    for i in importance {
        let half = i.layers.len() / 2;
        let (early, late) = (norm(&i.layers[..half]), norm(&i.layers[half..]));
        add(
            Source::Arank,
            format!(
                "Later layers more redundant, {} (paper: ARank falls with depth)",
                i.task
            ),
            format!(
                "ARank / its bound first half {:.3} ± {:.3}, second half {:.3} ± {:.3}",
                early.mean, early.se, late.mean, late.se
            ),
            verdict(early.minus(late), Unit::Share),
        );
    }
    match competition {
        Some(rows) if !rows.is_empty() => {
            // Per sample, its share kept averaged over the layers.
            let share = |t: usize| {
                let per_sample: Vec<f64> = (0..rows[0].sample_share[t].len())
                    .map(|i| {
                        rows.iter().map(|r| r.sample_share[t][i]).sum::<f64>() / rows.len() as f64
                    })
                    .collect();
                Estimate::mean_of(&per_sample)
            };
            let (t, m) = (share(0), share(1));
            add(
                Source::Competition,
                "A shared router favours T2I tokens (paper's Fig. 4: ~220 T2I vs ~20–80 MMU tokens kept), by a post-hoc probe (the `--probe` checkpoint's shared router, trained with per-sample top-k, re-applied as one top-k over the pooled tokens of a mixed batch; the paper trains the router that way)".into(),
                format!(
                    "it keeps {:.1} ± {:.1} % of T2I vs {:.1} ± {:.1} % of MMU routable tokens per sample",
                    100.0 * t.mean,
                    100.0 * t.se,
                    100.0 * m.mean,
                    100.0 * m.se
                ),
                verdict(t.minus(m), Unit::Points),
            );
        }
        _ => add(
            Source::Competition,
            "A shared router favours T2I tokens".into(),
            "not tested (no `--probe` checkpoint)".into(),
            "inconclusive (no probe)".into(),
        ),
    }
    out
}

/// Every analysis into `out/report.md`; the paper's findings checked on it.
pub fn all(
    a: &Analyzer,
    probe: Option<(&UnifiedTransformer, &RunContext, &RunConfig)>,
    source: &Path,
) -> Result<(PathBuf, Vec<Finding>)> {
    let (attention, patterns) = a.attention()?;
    let (imp_section, imp) = a.importance()?;
    let (redundancy_section, redundancy) = a.redundancy()?;
    let (interaction, competition) = a.interaction(probe)?;
    let sections = [
        attention,
        imp_section,
        redundancy_section,
        interaction,
        a.schedule(&imp)?,
    ];
    let mut found = findings(
        &imp,
        &redundancy,
        competition.as_deref(),
        a.cfg.analysis.schedule.protect_first,
    );
    found.extend(attention_finding(&patterns));
    let mut md = format!(
        "# Analysis of `{}`\n\n{} validation samples per task.\n\n",
        source.display(),
        a.cfg.analysis.samples
    );
    md.push_str(&render_findings(&found));
    for s in sections {
        md.push('\n');
        md.push_str(&s);
    }
    let path = a.out.join("report.md");
    std::fs::write(&path, md).with_context(|| format!("writing {}", path.display()))?;
    Ok((path, found))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A curve whose samples lose `late[i]` (relative) in the later layers and `early[i]` in
    /// the earlier ones of `layers` (layer 0 protected), at the one fraction below 1.
    fn curve(task: Task, layers: usize, early: &[f64], late: &[f64]) -> Redundancy {
        let n = early.len();
        let sample_losses = (0..layers)
            .map(|l| {
                let rise = if l < 1 + (layers - 1) / 2 {
                    early
                } else {
                    late
                };
                vec![vec![1.0; n], rise.iter().map(|r| 1.0 + r).collect()]
            })
            .collect();
        Redundancy {
            task,
            ranking: Ranking::Attention,
            fractions: vec![1.0, 0.5],
            dense_loss: 1.0,
            losses: vec![vec![1.0, 1.0]; layers],
            sample_dense: vec![1.0; n],
            sample_losses,
        }
    }

    fn verdict_of<'a>(found: &'a [Finding], claim: &str) -> &'a str {
        &found
            .iter()
            .find(|f| f.claim.contains(claim))
            .unwrap_or_else(|| panic!("no finding {claim}: {found:?}"))
            .verdict
    }

    #[test]
    fn verdicts_follow_the_interval_and_speak_the_findings_units() {
        let e = |mean, se| Estimate { mean, se, df: 9.0 };
        // t(9) = 2.262: ±0.226 around a standard error of 0.1.
        assert_eq!(verdict(e(0.3, 0.1), Unit::Share), "shown");
        assert!(verdict(e(-0.3, 0.1), Unit::Share).starts_with("not shown"));
        assert_eq!(
            verdict(e(-0.02, 0.1), Unit::Percent),
            "inconclusive (difference −2.0 % within its 95 % interval ±22.6 %, t = 2.26; more samples, `analysis.samples`, would narrow it)"
        );
        assert!(
            verdict(e(0.1, 0.1), Unit::Points)
                .contains("+10.0 points within its 95 % interval ±22.6 points")
        );
        assert_eq!(
            verdict(e(f64::NAN, 0.1), Unit::Share),
            "inconclusive (no estimate)"
        );
    }

    #[test]
    fn redundancy_findings_pair_layers_by_sample_and_compare_tasks() {
        // T2I: later layers lose 10 points less in every sample, samples 20 points apart.
        let t2i = curve(
            Task::T2I,
            7,
            &[0.30, 0.50, 0.10, 0.40, 0.20, 0.60],
            &[0.20, 0.40, 0.00, 0.30, 0.10, 0.50],
        );
        // MMU: the same spread with no difference between the halves but noise.
        let mmu = curve(
            Task::MMU,
            7,
            &[0.30, 0.50, 0.10, 0.40, 0.20, 0.60],
            &[0.35, 0.45, 0.15, 0.35, 0.25, 0.55],
        );
        let found = findings(&[], &[t2i, mmu], None, 1);
        assert_eq!(
            verdict_of(&found, "Later layers more redundant, t2i"),
            "shown"
        );
        assert!(
            verdict_of(&found, "Later layers more redundant, mmu").starts_with("inconclusive"),
            "{found:?}"
        );
        // Task means 30 vs 35 % with a spread of 19 points between samples: no verdict.
        assert!(
            verdict_of(&found, "Task-dependent redundancy, by loss").starts_with("inconclusive")
        );
        assert_eq!(
            verdict_of(&found, "A shared router favours T2I tokens"),
            "inconclusive (no probe)"
        );
    }

    #[test]
    fn attention_finding_reads_the_layers_as_samples() {
        let layer = |l, image| LayerAttention {
            layer: l,
            share: [1.0 - image, image, 0.0],
            per_token: [1.0; 3],
            entropy: 1.0,
            heads: Vec::new(),
        };
        let pattern = |images: &[f64]| {
            images
                .iter()
                .enumerate()
                .map(|(l, &i)| layer(l, i))
                .collect()
        };
        let apart = vec![
            (Task::T2I, pattern(&[0.40, 0.45, 0.50, 0.42])),
            (Task::MMU, pattern(&[0.70, 0.74, 0.80, 0.71])),
        ];
        assert_eq!(attention_finding(&apart).unwrap().verdict, "shown");
        let crossing = vec![
            (Task::T2I, pattern(&[0.40, 0.80, 0.50, 0.70])),
            (Task::MMU, pattern(&[0.70, 0.50, 0.80, 0.40])),
        ];
        assert!(
            attention_finding(&crossing)
                .unwrap()
                .verdict
                .starts_with("inconclusive")
        );
        assert!(attention_finding(&apart[..1].to_vec()).is_none());
    }
}
