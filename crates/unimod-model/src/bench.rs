//! The training-step benchmark: dense and UniMoD steps (forward + backward) of one config side by
//! side, on any device, and the table that turns their times into wall-clock saving ÷ FLOPs
//! saving. The criterion bench (`benches/step.rs`, CPU) and `unimod bench` (any device, GPU
//! included) both measure through this module, so their figures are comparable.

use crate::{ConfigError, ForwardOptions, KvCache, ModelConfig, UnifiedTransformer, flops};
use std::time::Instant;
use tch::{Device, Kind, Tensor, nn::VarStore};
use unimod_router::Schedule;
use unimod_router::schedule::{LayerSet, Ramp, Routers};
use unimod_tok::{Batch, Flavour, FormatConfig, Segment, Sequence};

/// The shape of one benchmarked model: width, depth and the mixed batch it steps on.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// Width of the residual stream.
    pub d_model: i64,
    /// Number of blocks.
    pub n_layers: usize,
    /// Sequences per task: the batch holds this many T2I and as many MMU sequences.
    pub per_task: usize,
    /// Image side in tokens (8 → 64 image codes, 32 → 1024 as Show-o at 512 px).
    pub image_side: usize,
}

impl Shape {
    /// The criterion benches' shape at width `d_model`: 8 layers, 4 T2I + 4 MMU sequences of
    /// 64 image codes (`unimod bench`'s defaults).
    pub fn at_width(d_model: i64) -> Shape {
        Shape {
            d_model,
            n_layers: 8,
            per_task: 4,
            image_side: 8,
        }
    }
}

/// One benchmarked model: dense or a schedule, with its weights.
pub struct Variant {
    /// Its name in the table.
    pub name: String,
    /// The model.
    pub model: UnifiedTransformer,
    /// Its weights.
    pub vs: VarStore,
    /// Analytic training FLOPs of one step, from the work each layer really did.
    pub train_flops: f64,
}

/// Dense config of a shape: heads of 32 (or 64 from d 1024 on) dims, FFN 4×d.
pub fn config(shape: Shape, schedule: Schedule) -> ModelConfig {
    let head_dim = if shape.d_model >= 1024 { 64 } else { 32 };
    let mut c = ModelConfig {
        d_model: shape.d_model,
        n_layers: shape.n_layers,
        n_heads: shape.d_model / head_dim,
        n_kv_heads: shape.d_model / head_dim,
        d_ffn: 4 * shape.d_model,
        max_seq_len: 64 + (shape.image_side * shape.image_side) as i64,
        ..Default::default()
    };
    c.routing.schedule = schedule;
    c
}

/// UniMoD with per-task routers on every layer but the first, at one capacity for both tasks.
pub fn unimod_schedule(n_layers: usize, capacity: f64) -> Schedule {
    Schedule::Unimod {
        layers: LayerSet::List((1..n_layers).collect()),
        t2i: Some(Ramp::Constant(capacity)),
        mmu: Some(Ramp::Constant(capacity)),
        lm: None,
        tasks: Default::default(),
        routers: Routers::PerTask,
    }
}

/// A mixed batch in the config's flavour: `per_task` T2I sequences (24 text tokens), then as
/// many MMU sequences.
pub fn batch(cfg: &ModelConfig, shape: Shape, device: Device) -> Batch {
    Batch::from_sequences(&sequences(cfg, shape), device).expect("benchmark batch is well formed")
}

fn sequences(cfg: &ModelConfig, shape: Shape) -> Vec<Sequence> {
    let f = FormatConfig {
        flavour: cfg.flavour,
        image_side: shape.image_side,
        ..FormatConfig::default()
    };
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(0);
    let codes: Vec<u32> = (0..f.image_tokens() as u32)
        .map(|i| (i * 7) % cfg.vocab.n_codes as u32)
        .collect();
    let text: Vec<i64> = (0..12).map(|i| 20 + i).collect();
    // Each task's sequences together, as the trainer batches them (Show-o's per-task
    // sub-batches): a routed layer then runs one group per task, not one per sample.
    let t2i = (0..shape.per_task).map(|_| {
        f.t2i(&cfg.vocab, &text, Some(&codes), Some(&mut rng))
            .expect("benchmark T2I sequence fits its format")
    });
    let mut seqs: Vec<Sequence> = t2i.collect();
    seqs.extend((0..shape.per_task).map(|_| {
        f.mmu(&cfg.vocab, &codes, &text[..8], Some(&text[8..]))
            .expect("benchmark MMU sequence fits its format")
    }));
    seqs
}

/// Builds a variant on `b` and counts its training FLOPs from one forward pass's work.
pub fn variant(
    name: String,
    cfg: &ModelConfig,
    b: &Batch,
    device: Device,
) -> Result<Variant, ConfigError> {
    tch::manual_seed(0);
    let vs = VarStore::new(device);
    let model = UnifiedTransformer::new(&vs.root(), cfg)?;
    let out = model.forward(b, &ForwardOptions::default())?;
    let tokens = (b.size() as i64 * b.seq_len()) as f64;
    let train_flops = flops::forward(cfg, &out.work, tokens).total() * flops::TRAIN_MULTIPLIER;
    Ok(Variant {
        name,
        model,
        vs,
        train_flops,
    })
}

/// Dense first, then UniMoD at each capacity, all stepping on the same batch.
pub fn variants(
    shape: Shape,
    capacities: &[f64],
    device: Device,
) -> Result<(Batch, Vec<Variant>), ConfigError> {
    let dense_cfg = config(shape, Schedule::Dense);
    dense_cfg.validate()?;
    let b = batch(&dense_cfg, shape, device);
    let mut vs = vec![variant("dense".into(), &dense_cfg, &b, device)?];
    for &c in capacities {
        let cfg = config(shape, unimod_schedule(shape.n_layers, c));
        vs.push(variant(format!("unimod-c{c}"), &cfg, &b, device)?);
    }
    Ok((b, vs))
}

/// One training step's work: gradients cleared (in place, so that they stay where a CUDA graph
/// captured them), forward, losses, backward.
pub fn step(v: &Variant, b: &Batch) {
    for mut t in v.vs.trainable_variables() {
        t.zero_grad();
    }
    // Top-k without a cache is every model's own mode: nothing to refuse.
    let out = v
        .model
        .forward(b, &ForwardOptions::default())
        .expect("top-k forward is always allowed");
    v.model.losses(b, &out).total.backward();
}

/// Waits for queued GPU work, so that a host timer measures it.
pub fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

/// Every variant's training step timed in interleaved rounds (see [`Timings`]), after `warmup`
/// untimed steps each.
pub fn time_steps(
    vs: &[Variant],
    b: &Batch,
    device: Device,
    warmup: usize,
    rounds: usize,
) -> Timings {
    for v in vs {
        for _ in 0..warmup {
            step(v, b);
        }
    }
    let mut steps: Vec<_> = vs
        .iter()
        .map(|v| {
            move || {
                step(v, b);
                Ok::<(), std::convert::Infallible>(())
            }
        })
        .collect();
    let Ok(seconds) = interleaved(&mut steps, device, rounds);
    seconds
}

/// The steps of [`time_steps`], each captured once in a CUDA graph and timed as one replay
/// (after `warmup` eager steps on a side stream, at least 2); and the largest gradient
/// difference between a replay and an eager step of any variant, relative to that gradient's
/// largest entry (0 when the graph computes what eager launches compute).
pub fn time_graphed_steps(
    vs: &[Variant],
    b: &Batch,
    device: Device,
    warmup: usize,
    rounds: usize,
) -> Result<(Timings, f64), unimod_kernels::CudaError> {
    let mut graphs = Vec::with_capacity(vs.len());
    let mut worst: f64 = 0.0;
    for v in vs {
        unimod_kernels::on_side_stream(device, || {
            for _ in 0..warmup.max(2) {
                step(v, b);
            }
        })?;
        let graph = unimod_kernels::Graph::capture(device, || step(v, b))?;
        graph.replay()?;
        let replayed: Vec<Tensor> =
            v.vs.trainable_variables()
                .iter()
                .map(|t| t.grad().copy())
                .collect();
        step(v, b);
        for (r, t) in replayed.iter().zip(v.vs.trainable_variables()) {
            let e = t.grad();
            let scale = e.abs().max().double_value(&[]).max(f64::MIN_POSITIVE);
            worst = worst.max((r - &e).abs().max().double_value(&[]) / scale);
        }
        graphs.push(graph);
    }
    let mut replays: Vec<_> = graphs.iter().map(|g| move || g.replay()).collect();
    Ok((interleaved(&mut replays, device, rounds)?, worst))
}

/// Operators one step of each variant dispatches (counted over one step, after a warm-up
/// step that creates the gradients).
pub fn op_counts(
    vs: &[Variant],
    b: &Batch,
) -> Result<Vec<unimod_kernels::ops::OpCount>, unimod_kernels::ops::OpsError> {
    vs.iter()
        .map(|v| {
            step(v, b);
            Ok(unimod_kernels::ops::count(|| step(v, b))?.1)
        })
        .collect()
}

/// The header of [`op_rows`]' table.
pub const OPS_HEADER: &str = "| config | variant | operators/step | computing (≈ GPU launches) | vs dense |\n|---|---|---|---|---|";

/// Rows of operator counts per step; `counts[i]` belongs to `vs[i]`, the first is dense.
pub fn op_rows(
    label: &str,
    vs: &[Variant],
    counts: &[unimod_kernels::ops::OpCount],
) -> Vec<String> {
    vs.iter()
        .zip(counts)
        .map(|(v, c)| {
            format!(
                "| {label} | {} | {} | {} | {:.2}× |",
                v.name,
                c.ops,
                c.kernels,
                c.kernels as f64 / counts[0].kernels.max(1) as f64
            )
        })
        .collect()
}

/// Each of `steps` timed over `rounds` interleaved rounds; the first error ends it.
fn interleaved<E>(
    steps: &mut [impl FnMut() -> Result<(), E>],
    device: Device,
    rounds: usize,
) -> Result<Timings, E> {
    sync(device);
    let mut seconds = vec![Vec::with_capacity(rounds); steps.len()];
    for _ in 0..rounds {
        for (step, t) in steps.iter_mut().zip(&mut seconds) {
            let start = Instant::now();
            step()?;
            sync(device);
            t.push(start.elapsed().as_secs_f64());
        }
    }
    Ok(Timings { seconds })
}

/// Step times measured in interleaved rounds (one step of every variant per round), so that
/// drifts of a shared machine hit all variants alike.
#[derive(Debug, Clone)]
pub struct Timings {
    /// `seconds[v][r]`: variant v's step in round r.
    pub seconds: Vec<Vec<f64>>,
}

/// A median with its distribution-free 95 % interval.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Median {
    /// The median.
    pub median: f64,
    /// The order statistics that cover the median with at least 95 % probability; `None`
    /// below six values, where no pair of them does.
    pub interval: Option<(f64, f64)>,
}

impl Median {
    /// The median of `v` (NaN when empty) and its interval: the j-th smallest and j-th largest
    /// value, j the largest rank with P(Binomial(n, ½) < j) ≤ 2.5 %. No assumption about the
    /// distribution, so a few slow steps of a busy machine widen it without moving it.
    pub fn of(v: &[f64]) -> Median {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        if n == 0 {
            return Median {
                median: f64::NAN,
                interval: None,
            };
        }
        let median = match n % 2 {
            1 => v[n / 2],
            _ => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        };
        // P(X ≤ i) for X ~ Binomial(n, ½), accumulated term by term.
        let (mut term, mut below) = (0.5f64.powi(n as i32), 0.0);
        let mut j = 0;
        for i in 0..n {
            below += term;
            if below > 0.025 {
                break;
            }
            j = i + 1;
            term *= (n - i) as f64 / (i + 1) as f64;
        }
        Median {
            median,
            interval: (j >= 1).then(|| (v[j - 1], v[n - j])),
        }
    }
}

impl Timings {
    /// Each variant's median step time.
    pub fn medians(&self) -> Vec<f64> {
        self.seconds.iter().map(|t| Median::of(t).median).collect()
    }

    /// Variant `v`'s share of time saved against variant 0, round by round (1 − t_v / t_0
    /// within each round, two steps that saw the same machine), as a median with its interval.
    pub fn saved(&self, v: usize) -> Median {
        let per_round: Vec<f64> = self.seconds[v]
            .iter()
            .zip(&self.seconds[0])
            .map(|(t, t0)| 1.0 - t / t0)
            .collect();
        Median::of(&per_round)
    }
}

/// Measured f32 matmul rate of the device, FLOP/s (the denominator of MFU).
pub fn matmul_rate(device: Device) -> f64 {
    matmul_rate_of(device, Kind::Float)
}

/// [`matmul_rate`] in `kind` (bf16 on a GPU: the peak MFU of bf16 training is read against).
pub fn matmul_rate_of(device: Device, kind: Kind) -> f64 {
    let n = if device.is_cuda() { 4096 } else { 512 };
    let a = Tensor::randn([n, n], (kind, device));
    let _ = a.matmul(&a);
    sync(device);
    let reps = 20;
    let start = Instant::now();
    for _ in 0..reps {
        let _ = a.matmul(&a);
    }
    sync(device);
    reps as f64 * 2.0 * (n as f64).powi(3) / start.elapsed().as_secs_f64()
}

/// The markdown table rows of one shape: GFLOPs, median ms, tokens/s, MFU, savings and their
/// ratio. `timings.seconds[i]` belongs to `vs[i]`; the first variant is the dense reference.
/// Time saved is the median of the rounds' own savings, with its 95 % interval in brackets.
pub fn table_rows(
    label: &str,
    b: &Batch,
    vs: &[Variant],
    timings: &Timings,
    peak: f64,
) -> Vec<String> {
    let dense_f = vs[0].train_flops;
    let tokens = (b.size() as i64 * b.seq_len()) as f64;
    vs.iter()
        .zip(timings.medians())
        .enumerate()
        .map(|(i, (v, s))| {
            let saved = timings.saved(i);
            let (fs, ts) = (1.0 - v.train_flops / dense_f, saved.median);
            let interval = match saved.interval {
                Some((lo, hi)) if i > 0 => format!(" ({:.1} to {:.1})", 100.0 * lo, 100.0 * hi),
                _ => String::new(),
            };
            // Below 1 % saved the ratio divides timing noise by almost nothing (MoMa saves 0.1 %:
            // its experts take no padding, which dense's FFN runs on, offsetting its routers).
            let ratio = if fs >= 0.01 {
                format!("{:.2}", ts / fs)
            } else {
                "-".into()
            };
            format!(
                "| {label} | {} | {:.2} | {:.2} | {:.0} | {:.1} % | {:.1} % | {:.1} %{interval} | {ratio} |",
                v.name,
                v.train_flops / 1e9,
                s * 1e3,
                tokens / s,
                100.0 * v.train_flops / s / peak,
                100.0 * fs,
                100.0 * ts
            )
        })
        .collect()
}

/// The header of [`decode_rows`]' table.
pub const DECODE_HEADER: &str = "| config | variant | decoding | tokens/s | ms/step | routable decoded tokens processed | time saved |\n|---|---|---|---|---|---|---|";

/// KV-cached decoding, teacher-forced so that every variant decodes the same tokens: `seqs`
/// prefilled up to `prefix`, then fed one token per step in the model's causal routing mode.
/// Median seconds per step over `rounds` (after one untimed warm-up), and the share of the decoded routable tokens that the
/// routed layers processed (1 for dense).
fn decode_time(
    model: &UnifiedTransformer,
    seqs: &[Sequence],
    prefix: usize,
    device: Device,
    rounds: usize,
) -> Result<(f64, f64), ConfigError> {
    let opts = ForwardOptions {
        mode: model.cfg.routing.causal_mode,
        ..Default::default()
    };
    let len = seqs[0].len();
    let part = |r: std::ops::Range<usize>| -> Vec<Sequence> {
        seqs.iter().map(|s| s.slice(r.clone())).collect()
    };
    let (mut times, mut kept, mut routable) = (Vec::new(), 0i64, 0i64);
    for round in 0..rounds.max(1) + 1 {
        tch::no_grad(|| -> Result<(), ConfigError> {
            let mut cache = KvCache::default();
            let first = Batch::from_sequences(&part(0..prefix), device)
                .expect("benchmark prefix is well formed");
            let mut end = first.end.clone();
            model.forward_cached(&first, &opts, &mut cache)?;
            sync(device);
            let start = Instant::now();
            for i in prefix..len {
                let b = Batch::continuing(&part(i..i + 1), Some(&end), device)
                    .expect("benchmark step is well formed");
                end = b.end.clone();
                let out = model.forward_cached(&b, &opts, &mut cache)?;
                // Counted in the untimed warm-up round: reading them syncs the device.
                if round == 0 {
                    for s in &out.routing {
                        kept += s
                            .processed_mask
                            .logical_and(&s.routable)
                            .sum(Kind::Int64)
                            .int64_value(&[]);
                        routable += s.routable.sum(Kind::Int64).int64_value(&[]);
                    }
                }
            }
            sync(device);
            // round 0 warms up
            if round > 0 {
                times.push(start.elapsed().as_secs_f64() / (len - prefix) as f64);
            }
            Ok(())
        })?;
    }
    times.sort_by(f64::total_cmp);
    let share = if routable > 0 {
        kept as f64 / routable as f64
    } else {
        1.0
    };
    Ok((times[times.len() / 2], share))
}

/// Decoding speed of dense and UniMoD models of a shape (Emu3 flavour, causal routing with each
/// model's `causal_mode`): an image of `image_side²` tokens after its prompt, and an answer
/// after its question, for `per_task` sequences at once. The routers and predictors are
/// untrained, so the share of tokens they process is whatever their initial weights decide:
/// the table states it next to the speed.
pub fn decode_rows(
    shape: Shape,
    capacities: &[f64],
    device: Device,
    rounds: usize,
) -> Result<Vec<String>, ConfigError> {
    let emu3 = |schedule| {
        let mut c = config(shape, schedule);
        c.flavour = Flavour::Emu3;
        c
    };
    let mut cfgs = vec![("dense".to_string(), emu3(Schedule::Dense))];
    for &c in capacities {
        cfgs.push((
            format!("unimod-c{c}"),
            emu3(unimod_schedule(shape.n_layers, c)),
        ));
    }
    let all = sequences(&cfgs[0].1, shape);
    let mut rows = Vec::new();
    for (task, output) in [("image", Segment::Image), ("answer", Segment::Answer)] {
        let seqs: Vec<Sequence> = all
            .iter()
            .filter(|s| {
                s.segments.contains(&output)
                    && (output == Segment::Answer) == (s.task == unimod_tok::Task::MMU)
            })
            .cloned()
            .collect();
        let prefix = seqs[0]
            .segments
            .iter()
            .position(|g| *g == output)
            .expect("the sequence holds its output");
        let mut dense_s = f64::NAN;
        for (name, cfg) in &cfgs {
            tch::manual_seed(0);
            let vs = VarStore::new(device);
            let model = UnifiedTransformer::new(&vs.root(), cfg)?;
            let (s, share) = decode_time(&model, &seqs, prefix, device, rounds)?;
            if name == "dense" {
                dense_s = s;
            }
            rows.push(format!(
                "| d{}×{} | {name} | {} {task} tokens × {} | {:.0} | {:.2} | {:.1} % | {:.1} % |",
                shape.d_model,
                shape.n_layers,
                seqs[0].len() - prefix,
                seqs.len(),
                seqs.len() as f64 / s,
                s * 1e3,
                100.0 * share,
                100.0 * (1.0 - s / dense_s)
            ));
        }
    }
    Ok(rows)
}

/// The header of [`table_rows`]' table.
pub const TABLE_HEADER: &str = "| config | variant | train GFLOPs/step | ms/step | tokens/s | MFU | FLOPs saved | time saved | time/FLOPs ratio |\n|---|---|---|---|---|---|---|---|---|";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_come_with_order_statistic_intervals() {
        let ten: Vec<f64> = (1..=10).rev().map(f64::from).collect();
        // P(X ≤ 1) = 11/1024 ≤ 2.5 % < P(X ≤ 2) = 56/1024: the 2nd and 9th values (97.9 %).
        assert_eq!(
            Median::of(&ten),
            Median {
                median: 5.5,
                interval: Some((2.0, 9.0))
            }
        );
        // Six values: only the extremes cover (1 − 2/64 = 96.9 %); five: nothing does.
        let six = [3.0, 1.0, 2.0, 6.0, 5.0, 4.0];
        assert_eq!(Median::of(&six).interval, Some((1.0, 6.0)));
        assert_eq!(Median::of(&six[..5]).interval, None);
        assert!(Median::of(&[]).median.is_nan());
        // Savings are taken within each round: a machine slowing down 3× over the rounds
        // moves both steps alike and leaves every round's saving at 25 %.
        let base: Vec<f64> = (0..8).map(|r| 1.0 + 0.25 * r as f64).collect();
        let t = Timings {
            seconds: vec![base.clone(), base.iter().map(|x| 0.75 * x).collect()],
        };
        let saved = t.saved(1);
        assert!((saved.median - 0.25).abs() < 1e-12);
        let (lo, hi) = saved.interval.unwrap();
        assert!((hi - lo).abs() < 1e-12, "{saved:?}");
        // The ratio of medians would say the same here, but not what it is sure of.
        assert!((1.0 - t.medians()[1] / t.medians()[0] - 0.25).abs() < 1e-12);
    }

    #[test]
    fn routed_variants_do_less_work_and_step() {
        let shape = Shape {
            d_model: 64,
            n_layers: 3,
            per_task: 1,
            image_side: 4,
        };
        let (b, vs) = variants(shape, &[0.5], Device::Cpu).unwrap();
        assert_eq!(vs.len(), 2);
        assert!(vs[1].train_flops < vs[0].train_flops);
        let timings = time_steps(&vs, &b, Device::Cpu, 0, 1);
        // CUDA graphs are refused on a CPU, before any step runs.
        let err = time_graphed_steps(&vs, &b, Device::Cpu, 1, 1).unwrap_err();
        assert!(err.to_string().contains("need a CUDA device"), "{err}");
        let rows = decode_rows(shape, &[0.5], Device::Cpu, 1).unwrap();
        // dense and one routed variant, for an image and an answer
        assert_eq!(rows.len(), 4, "{rows:?}");
        let rows = table_rows("t", &b, &vs, &timings, matmul_rate(Device::Cpu));
        assert!(rows[0].contains("| dense |") && rows[1].contains("unimod-c0.5"));
    }
}
