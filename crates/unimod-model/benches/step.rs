//! Training step (forward + backward) of dense and routed models side by side, on the tiny and
//! the medium (d 512) config over a range of capacities. After criterion's measurements it prints
//! tokens/s, achieved FLOP/s against the machine's measured matmul rate (MFU), and for each
//! routed variant the wall-clock saving divided by the FLOPs saving (target ≥ 0.8).
//!
//! `cargo bench -p unimod-model --bench step` (docs/benchmarks.md records the figures).

use criterion::{Criterion, criterion_group};
use std::path::PathBuf;
use std::time::Duration;
use tch::{Device, Kind, Tensor, nn::VarStore};
use unimod_model::{ForwardOptions, ModelConfig, UnifiedTransformer, flops};
use unimod_router::Schedule;
use unimod_router::schedule::{LayerSet, Ramp, Routers};
use unimod_tok::{Batch, FormatConfig, Sequence};

struct Variant {
    id: String,
    model: UnifiedTransformer,
    vs: VarStore,
    train_flops: f64,
}

fn config(d: i64, schedule: Schedule) -> ModelConfig {
    let mut c = ModelConfig {
        d_model: d,
        n_heads: d / 32,
        n_kv_heads: d / 32,
        d_ffn: 4 * d,
        ..Default::default()
    };
    c.routing.schedule = schedule;
    c
}

fn batch(cfg: &ModelConfig, n: usize) -> Batch {
    let f = FormatConfig::default();
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(0);
    let codes: Vec<u32> = (0..f.image_tokens() as u32)
        .map(|i| (i * 7) % cfg.vocab.n_codes as u32)
        .collect();
    let text: Vec<i64> = (0..12).map(|i| 20 + i).collect();
    let seqs: Vec<Sequence> = (0..n)
        .flat_map(|_| {
            [
                f.t2i(&cfg.vocab, &text, Some(&codes), Some(&mut rng))
                    .unwrap(),
                f.mmu(&cfg.vocab, &codes, &text[..8], Some(&text[8..]))
                    .unwrap(),
            ]
        })
        .collect();
    Batch::from_sequences(&seqs, Device::Cpu).unwrap()
}

fn variant(id: String, cfg: &ModelConfig, b: &Batch) -> Variant {
    tch::manual_seed(0);
    let vs = VarStore::new(Device::Cpu);
    let model = UnifiedTransformer::new(&vs.root(), cfg).unwrap();
    let out = model.forward(b, &ForwardOptions::default());
    let tokens = (b.size() as i64 * b.seq_len()) as f64;
    let train_flops = flops::forward(cfg, &out.work, tokens).total() * flops::TRAIN_MULTIPLIER;
    Variant {
        id,
        model,
        vs,
        train_flops,
    }
}

fn step(v: &Variant, b: &Batch) {
    let out = v.model.forward(b, &ForwardOptions::default());
    v.model.losses(b, &out).total.backward();
    for mut t in v.vs.trainable_variables() {
        t.zero_grad();
    }
}

fn variants(d: i64, b_of: &dyn Fn(&ModelConfig) -> Batch) -> (Batch, Vec<Variant>) {
    let dense_cfg = config(d, Schedule::Dense);
    let b = b_of(&dense_cfg);
    let mut vs = vec![variant(format!("d{d}/dense"), &dense_cfg, &b)];
    for c in [0.75, 0.5, 0.25, 0.125] {
        let s = Schedule::Unimod {
            layers: LayerSet::List((1..8).collect()),
            t2i: Some(Ramp::Constant(c)),
            mmu: Some(Ramp::Constant(c)),
            lm: None,
            routers: Routers::PerTask,
        };
        vs.push(variant(format!("d{d}/unimod-c{c}"), &config(d, s), &b));
    }
    (b, vs)
}

/// Measured f32 matmul rate of this machine, FLOP/s.
fn matmul_rate() -> f64 {
    let a = Tensor::randn([512, 512], (Kind::Float, Device::Cpu));
    let start = std::time::Instant::now();
    let n = 50;
    for _ in 0..n {
        let _ = a.matmul(&a);
    }
    n as f64 * 2.0 * 512f64.powi(3) / start.elapsed().as_secs_f64()
}

fn median_seconds(id: &str) -> Option<f64> {
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("../criterion")
        .join(id)
        .join("new/estimates.json");
    let text = std::fs::read_to_string(path).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    Some(v["median"]["point_estimate"].as_f64()? / 1e9)
}

fn bench(c: &mut Criterion) {
    let mut all = Vec::new();
    for d in [128, 512] {
        let (b, vs) = variants(d, &|cfg| batch(cfg, 4));
        let mut g = c.benchmark_group(format!("step-d{d}"));
        g.sample_size(10)
            .measurement_time(Duration::from_secs(if d == 128 { 4 } else { 10 }));
        for v in &vs {
            g.bench_function(v.id.split('/').nth(1).unwrap(), |bench| {
                bench.iter(|| step(v, &b))
            });
        }
        g.finish();
        all.push((d, b, vs));
    }
    let peak = matmul_rate();
    println!("\nmeasured f32 matmul rate: {:.1} GFLOP/s", peak / 1e9);
    println!(
        "| config | variant | train GFLOPs/step | ms/step | tokens/s | MFU | FLOPs saved | time saved | time/FLOPs ratio |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for (d, b, vs) in &all {
        let secs: Vec<Option<f64>> = vs
            .iter()
            .map(|v| median_seconds(&format!("step-d{d}/{}", v.id.split('/').nth(1).unwrap())))
            .collect();
        let (Some(dense_s), dense_f) = (secs[0], vs[0].train_flops) else {
            continue;
        };
        for (v, s) in vs.iter().zip(&secs) {
            let Some(s) = s else { continue };
            let tokens = (b.size() as i64 * b.seq_len()) as f64;
            let (fs, ts) = (1.0 - v.train_flops / dense_f, 1.0 - s / dense_s);
            let ratio = if fs > 0.0 {
                format!("{:.2}", ts / fs)
            } else {
                "-".into()
            };
            println!(
                "| d{d} | {} | {:.2} | {:.1} | {:.0} | {:.1} % | {:.1} % | {:.1} % | {ratio} |",
                v.id.split('/').nth(1).unwrap(),
                v.train_flops / 1e9,
                s * 1e3,
                tokens / s,
                100.0 * v.train_flops / s / peak,
                100.0 * fs,
                100.0 * ts
            );
        }
    }
}

criterion_group!(benches, bench);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
}
