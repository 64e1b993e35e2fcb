//! `unimod flops`: analytic FLOPs of a config under its schedule (or another), per task and in
//! a task mix, against the same model dense, in both conventions of `unimod_model::flops`.

use crate::RunConfig;
use anyhow::{Context, Result, bail};
use std::fmt::Write;
use unimod_model::flops::{self, Composition, Flops};
use unimod_model::layer::Work;
use unimod_router::Schedule;
use unimod_router::schedule::{LayerPlan, LayerSet, NamedLayers, Ramp, Routers};
use unimod_tok::{Batch, Task};

/// The schedules of the UniMoD paper (§5.1), by name.
pub fn paper_schedule(name: &str) -> Option<Schedule> {
    let unimod = |t2i, mmu| Schedule::Unimod {
        layers: LayerSet::Named(NamedLayers::LastHalf),
        t2i: Some(t2i),
        mmu: Some(mmu),
        lm: None,
        tasks: Default::default(),
        routers: Routers::PerTask,
    };
    match name {
        // Show-o: last 12 of 24 layers, T2I keeps 80 %, MMU capacity 1.0 → 0.2.
        "showo-paper" => Some(unimod(Ramp::Constant(0.8), Ramp::Linear([1.0, 0.2]))),
        // Emu3: last 16 of 32 layers prune 80 % of both tasks' tokens.
        "emu3-paper" => Some(unimod(Ramp::Constant(0.2), Ramp::Constant(0.2))),
        _ => None,
    }
}

/// `--schedule` is a paper recipe name or a schedule file.
pub fn parse_schedule(arg: &str) -> Result<Schedule> {
    if let Some(s) = paper_schedule(arg) {
        return Ok(s);
    }
    let path = std::path::Path::new(arg);
    if !path.exists() {
        bail!("--schedule {arg}: neither a paper recipe (showo-paper, emu3-paper) nor a file");
    }
    Ok(Schedule::File {
        path: path.to_path_buf(),
    })
}

/// `t2i=1,mmu=1` → task weights.
pub fn parse_mix(arg: &str) -> Result<Vec<(Task, f64)>> {
    arg.split(',')
        .map(|part| {
            let (k, v) = part
                .split_once('=')
                .with_context(|| format!("--mix {arg}: expected task=weight"))?;
            let task = Task::BUILT_IN
                .into_iter()
                .find(|t| t.name() == k.trim())
                .with_context(|| format!("--mix: unknown task `{k}` (t2i, mmu, lm)"))?;
            let w: f64 = v
                .trim()
                .parse()
                .with_context(|| format!("--mix: weight `{v}` is not a number"))?;
            if !(w.is_finite() && w >= 0.0) {
                bail!("--mix: weight {k}={v} is not accepted: a finite number ≥ 0");
            }
            Ok((task, w))
        })
        .collect::<Result<Vec<_>>>()
        .and_then(|m| {
            if m.iter().map(|(_, w)| w).sum::<f64>() > 0.0 {
                Ok(m)
            } else {
                bail!("--mix {arg}: the weights sum to 0; give at least one task a positive weight")
            }
        })
}

/// Forward FLOPs of one sequence of each task, dense and under `schedule`.
pub struct FlopsReport {
    /// Per task: dense and routed forward FLOPs of one sequence.
    pub rows: Vec<(Task, Flops, Flops)>,
    /// The markdown table `unimod flops` prints.
    pub table: String,
}

/// FLOPs per sequence of each task and their `mix`-weighted mean, dense and under `schedule`.
pub fn report(cfg: &RunConfig, schedule: &Schedule, mix: &[(Task, f64)]) -> Result<FlopsReport> {
    let m = &cfg.model;
    let plans = schedule.resolve(m.n_layers)?;
    let dense_plans = Schedule::Dense.resolve(m.n_layers)?;
    let mut rows = Vec::new();
    let mut table = String::new();
    writeln!(
        table,
        "model d={} layers={} heads={}/{} ffn={} ({:?}) vocab={} | format {:?}, text {} tokens, image {}×{}",
        m.d_model,
        m.n_layers,
        m.n_heads,
        m.n_kv_heads,
        m.d_ffn,
        m.ffn,
        m.vocab.size(),
        cfg.format.flavour,
        cfg.format.text_len,
        cfg.format.image_side,
        cfg.format.image_side
    )?;
    writeln!(
        table,
        "layers: {}",
        plans
            .iter()
            .map(|p| p.label())
            .collect::<Vec<_>>()
            .join(" ")
    )?;
    writeln!(table)?;
    writeln!(
        table,
        "| task | seq | dense linear GFLOPs | routed linear GFLOPs | saved (linear only, paper) | dense total GFLOPs | routed total GFLOPs | saved (total) |"
    )?;
    writeln!(table, "|---|---|---|---|---|---|---|---|")?;
    for &(task, _) in mix {
        let seq = composition(cfg, task)?;
        let n = seq.len() as f64;
        let dense = flops::forward(m, &flops::analytic_work(m, &dense_plans, &seq), n);
        let routed = flops::forward(m, &flops::analytic_work(m, &plans, &seq), n);
        writeln!(
            table,
            "| {task} | {} | {:.1} | {:.1} | {:.1} % | {:.1} | {:.1} | {:.1} % |",
            seq.len(),
            dense.linear / 1e9,
            routed.linear / 1e9,
            saving(dense.linear, routed.linear),
            dense.total() / 1e9,
            routed.total() / 1e9,
            saving(dense.total(), routed.total())
        )?;
        rows.push((task, dense, routed));
    }
    let wsum: f64 = mix.iter().map(|(_, w)| w).sum();
    let mixed = |f: &dyn Fn(&Flops) -> f64, dense: bool| -> f64 {
        rows.iter()
            .zip(mix)
            .map(|((_, d, r), (_, w))| w / wsum * f(if dense { d } else { r }))
            .sum()
    };
    let (dl, rl) = (mixed(&|f| f.linear, true), mixed(&|f| f.linear, false));
    let (dt, rt) = (mixed(&|f| f.total(), true), mixed(&|f| f.total(), false));
    writeln!(
        table,
        "| mix | | {:.1} | {:.1} | **{:.1} %** | {:.1} | {:.1} | {:.1} % |",
        dl / 1e9,
        rl / 1e9,
        saving(dl, rl),
        dt / 1e9,
        rt / 1e9,
        saving(dt, rt)
    )?;
    writeln!(table)?;
    writeln!(
        table,
        "Forward FLOPs per sequence; training = {}× forward. 'linear only' counts the block projections \
        per processed token (the convention that reproduces the paper's ratios); 'total' adds attention's quadratic term, \
        routers and the LM head (docs/flops.md).",
        flops::TRAIN_MULTIPLIER
    )?;
    if m.mot || m.moma.is_some() {
        writeln!(table)?;
        writeln!(table, "{}", family(cfg, &plans, mix)?)?;
    }
    Ok(FlopsReport { rows, table })
}

/// Parameters and FLOPs of Mixture-of-Transformers or MoMa against the same shape with one
/// set of block weights (the table above compares schedules of the same family).
fn family(
    cfg: &RunConfig,
    plans: &[unimod_router::LayerPlan],
    mix: &[(Task, f64)],
) -> Result<String> {
    let m = &cfg.model;
    let plain = unimod_model::ModelConfig {
        mot: false,
        moma: None,
        ..m.clone()
    };
    let wsum: f64 = mix.iter().map(|(_, w)| w).sum();
    let per_sequence = |c: &unimod_model::ModelConfig| -> Result<f64> {
        mix.iter()
            .map(|&(task, w)| {
                let seq = composition(cfg, task)?;
                let work = flops::analytic_work(c, plans, &seq);
                Ok(w / wsum * flops::forward(c, &work, seq.len() as f64).total())
            })
            .sum()
    };
    let name = match (&m.moma, m.mot) {
        (Some(x), mot) => {
            let [(et, ct), (ei, ci)] = x.groups();
            format!(
                "MoMa{} with {et} text experts (c_e {ct:.3}) and {ei} image experts (c_e {ci:.3})",
                if mot { " on MoT blocks" } else { "" }
            )
        }
        (None, _) => "Mixture-of-Transformers".to_string(),
    };
    let (f, f0) = (per_sequence(m)?, per_sequence(&plain)?);
    Ok(format!(
        "{name}: {:.3e} parameters, {:.3e} active per token (one set of block weights: {:.3e}); \
         forward FLOPs per sequence of the mix {:.1} GFLOPs total under this schedule, {:.1} with one \
         FFN per block ({:+.1} %).",
        flops::parameters(m),
        flops::active_parameters(m),
        flops::parameters(&plain),
        f / 1e9,
        f0 / 1e9,
        100.0 * (f / f0 - 1.0)
    ))
}

/// A full-length sequence of a built-in task, as the analytic count assumes it.
fn composition(cfg: &RunConfig, task: Task) -> Result<Composition> {
    let segments = cfg
        .format
        .composition(task)
        .with_context(|| format!("task `{task}` has no sequence format to count FLOPs on"))?;
    Ok(Composition { task, segments })
}

/// Dense and routed forward FLOPs of real batches: their text lengths and padding, which
/// full-length sequences (`report`) leave out. Dense layers compute padding; a routed layer
/// gathers each task's samples to the widest sample's kept tokens, so on padded batches
/// routing saves more than the full-length prediction. This is the prediction an experiment's
/// counted FLOPs match. Also counts the batches' distinct gather-width signatures: the shapes
/// of the routed step, which a CUDA graph of it would be keyed by.
pub fn over_batches(cfg: &RunConfig, schedule: &Schedule, batches: &[Batch]) -> Result<BatchFlops> {
    let m = &cfg.model;
    let plans = schedule.resolve(m.n_layers)?;
    let dense_plans = Schedule::Dense.resolve(m.n_layers)?;
    let (mut dense, mut routed) = (Flops::default(), Flops::default());
    let (mut tokens, mut pad, mut sequences) = (0usize, 0usize, 0usize);
    let mut signatures = std::collections::HashSet::new();
    for b in batches {
        let mut signature = Vec::new();
        let rows: Vec<Composition> = b
            .tasks
            .iter()
            .zip(&b.segment_counts)
            .map(|(task, segments)| Composition {
                task: *task,
                segments: *segments,
            })
            .collect();
        // Each task's samples: the groups a routed layer gathers at one width.
        let mut groups: Vec<Vec<Composition>> = Vec::new();
        for row in rows {
            match groups.iter_mut().find(|g| g[0].task == row.task) {
                Some(g) => g.push(row),
                None => groups.push(vec![row]),
            }
        }
        for group in &groups {
            let head = group.iter().map(Composition::len).sum::<usize>() as f64;
            for (routing, plans, sum) in [
                (false, &dense_plans, &mut dense),
                (true, &plans, &mut routed),
            ] {
                let per_row: Vec<Vec<Work>> = group
                    .iter()
                    .map(|seq| flops::analytic_work(m, plans, seq))
                    .collect();
                let work: Vec<Work> = (0..m.n_layers)
                    .map(|l| {
                        let widest = |f: fn(&Work) -> f64| {
                            per_row.iter().map(|w| f(&w[l])).fold(0.0, f64::max)
                        };
                        let width = widest(|w| w.tokens);
                        // Only routed layers gather: the others compute the whole frame.
                        if routing && matches!(plans[l], LayerPlan::Routed { .. }) {
                            signature.push(width as i64);
                        }
                        let n = group.len() as f64;
                        // MoMa's experts are padded to the sample that fills them most, as
                        // the routed layer's gather is to its widest sample.
                        Work {
                            tokens: width * n,
                            ffn_tokens: widest(|w| w.ffn_tokens) * n,
                            attention_pairs: width * width * n,
                            router_tokens: per_row.iter().map(|w| w[l].router_tokens).sum(),
                        }
                    })
                    .collect();
                *sum = *sum + flops::forward(m, &work, head);
            }
            tokens += group.iter().map(Composition::len).sum::<usize>();
            pad += group
                .iter()
                .map(|c| c.segments[unimod_tok::Segment::Pad.index()])
                .sum::<usize>();
            sequences += group.len();
        }
        signatures.insert(signature);
    }
    Ok(BatchFlops {
        dense,
        routed,
        batches: batches.len(),
        sequences,
        padding: pad as f64 / tokens.max(1) as f64,
        width_signatures: signatures.len(),
    })
}

/// Forward FLOPs of real batches, dense and routed ([`over_batches`]).
#[derive(Debug, Clone, Copy)]
pub struct BatchFlops {
    /// Dense forward FLOPs of the batches.
    pub dense: Flops,
    /// The same under the schedule.
    pub routed: Flops,
    /// Batches counted.
    pub batches: usize,
    /// Sequences in them.
    pub sequences: usize,
    /// Share of the batches' positions that are padding.
    pub padding: f64,
    /// Distinct signatures of the routed step's gather widths (every layer's width for every
    /// task group) among the batches.
    pub width_signatures: usize,
}

impl std::fmt::Display for BatchFlops {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        writeln!(
            f,
            "Over {} training batches ({} sequences, {:.1} % of their positions padding): \
             forward FLOPs saved {:.1} % linear only, {:.1} % total — what an experiment with \
             this config counts. The routed step takes {} distinct shapes (gather-width \
             signatures) over these batches.",
            self.batches,
            self.sequences,
            100.0 * self.padding,
            saving(self.dense.linear, self.routed.linear),
            saving(self.dense.total(), self.routed.total()),
            self.width_signatures
        )
    }
}

fn saving(dense: f64, routed: f64) -> f64 {
    100.0 * (1.0 - routed / dense)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn preset(name: &str) -> RunConfig {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../configs")
            .join(name);
        RunConfig::load(Some(&path), &[]).unwrap()
    }

    fn mixed_linear_saving(cfg: &RunConfig, schedule: &str) -> f64 {
        let mix = parse_mix("t2i=1,mmu=1").unwrap();
        let r = report(cfg, &paper_schedule(schedule).unwrap(), &mix).unwrap();
        let d: f64 = r.rows.iter().map(|(_, d, _)| d.linear).sum();
        let s: f64 = r.rows.iter().map(|(_, _, s)| s.linear).sum();
        saving(d, s)
    }

    #[test]
    fn reproduces_the_papers_showo_ratio() {
        let s = mixed_linear_saving(&preset("showo-1.3b.toml"), "showo-paper");
        assert!(
            (s - 15.3).abs() < 0.5,
            "Show-o saving {s:.2} %, paper 15.3 %"
        );
    }

    #[test]
    fn reproduces_the_papers_emu3_ratio() {
        let s = mixed_linear_saving(&preset("emu3-8b.toml"), "emu3-paper");
        assert!((s - 39.9).abs() < 0.5, "Emu3 saving {s:.2} %, paper 39.9 %");
    }
}
