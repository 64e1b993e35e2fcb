//! Where a routed layer's extra time goes: training steps of the benchmark's d 128 model with
//! every routed layer at capacity 1 (the same tokens as dense, so any time above dense is routing
//! overhead), with and without the causal predictor and the auxiliary loss.
//!
//! `cargo run --release -p unimod-model --example routing_overhead [d_model] [rounds]`

use tch::Device;
use unimod_model::bench::{self, Shape};
use unimod_router::Schedule;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let d_model = args.get(1).map_or(Ok(128), |s| s.parse())?;
    let rounds = args.get(2).map_or(Ok(20), |s| s.parse())?;
    let shape = Shape {
        d_model,
        n_layers: 8,
        per_task: 4,
        image_side: 8,
    };
    let dense = bench::config(shape, Schedule::Dense);
    let b = bench::batch(&dense, shape, Device::Cpu);
    let routed = |predictor: bool, aux: f64| {
        let mut c = bench::config(shape, bench::unimod_schedule(shape.n_layers, 1.0));
        c.routing.causal_predictor = predictor;
        if !predictor {
            c.routing.causal_mode = unimod_router::RoutingMode::ThresholdRouter;
        }
        c.routing.aux_loss = aux;
        c
    };
    let variants = [
        ("dense", dense.clone()),
        ("routed c1", routed(true, 0.01)),
        ("routed c1, no predictor", routed(false, 0.01)),
        ("routed c1, no predictor, no aux", routed(false, 0.0)),
    ]
    .into_iter()
    .map(|(name, cfg)| bench::variant(name.into(), &cfg, &b, Device::Cpu))
    .collect::<Result<Vec<_>, _>>()?;
    let secs = bench::time_steps(&variants, &b, Device::Cpu, 3, rounds).medians();
    let routed_layers = (shape.n_layers - 1) as f64;
    println!("| variant | ms/step | overhead per routed layer (ms) |\n|---|---|---|");
    for (v, s) in variants.iter().zip(&secs) {
        println!(
            "| {} | {:.1} | {:.2} |",
            v.name,
            s * 1e3,
            (s - secs[0]) * 1e3 / routed_layers
        );
    }
    Ok(())
}
