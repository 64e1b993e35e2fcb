//! Training step (forward + backward) of dense and routed models side by side, on the tiny and
//! the medium (d 512) config over a range of capacities. After criterion's measurements it prints
//! tokens/s, achieved FLOP/s against the machine's measured matmul rate (MFU), and for each
//! routed variant the wall-clock saving divided by the FLOPs saving (target ≥ 0.8).
//!
//! `cargo bench -p unimod-model --bench step` (docs/benchmarks.md records the figures; `unimod
//! bench` measures the same steps on any device, GPUs included).

use criterion::{Criterion, criterion_group};
use std::path::PathBuf;
use std::time::Duration;
use tch::Device;
use unimod_model::bench::{self, Shape};

const CAPACITIES: [f64; 4] = [0.75, 0.5, 0.25, 0.125];

fn median_seconds(id: &str) -> Option<f64> {
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("../criterion")
        .join(id)
        .join("new/estimates.json");
    let text = std::fs::read_to_string(path).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    Some(v["median"]["point_estimate"].as_f64()? / 1e9)
}

fn run(c: &mut Criterion) {
    let mut all = Vec::new();
    for d in [128, 512] {
        let shape = Shape::at_width(d);
        let (b, vs) =
            bench::variants(shape, &CAPACITIES, Device::Cpu).expect("benchmark shapes are valid");
        let mut g = c.benchmark_group(format!("step-d{d}"));
        g.sample_size(10)
            .measurement_time(Duration::from_secs(if d == 128 { 4 } else { 10 }));
        for v in &vs {
            g.bench_function(&v.name, |it| it.iter(|| bench::step(v, &b)));
        }
        g.finish();
        all.push((d, b, vs));
    }
    let peak = bench::matmul_rate(Device::Cpu);
    println!("\nmeasured f32 matmul rate: {:.1} GFLOP/s", peak / 1e9);
    println!("{}", bench::TABLE_HEADER);
    for (d, b, vs) in &all {
        let secs: Option<Vec<f64>> = vs
            .iter()
            .map(|v| median_seconds(&format!("step-d{d}/{}", v.name)))
            .collect();
        if let Some(secs) = secs {
            // Criterion's medians, one per variant: a single "round", so no interval.
            let timings = bench::Timings {
                seconds: secs.iter().map(|s| vec![*s]).collect(),
            };
            for row in bench::table_rows(&format!("d{d}"), b, vs, &timings, peak) {
                println!("{row}");
            }
        }
    }
}

criterion_group!(benches, run);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
}
