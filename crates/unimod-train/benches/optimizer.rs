//! The AdamW update of a dense benchmark model (every parameter with a gradient, clipping on),
//! fused and written out, side by side at d 128 and d 512 × 8 layers.
//!
//! `cargo bench -p unimod-train --bench optimizer` (docs/benchmarks.md records the figures).

use criterion::{Criterion, criterion_group};
use tch::Device;
use unimod_model::bench::{self, Shape};
use unimod_train::optim::{AdamW, Update};

fn run(c: &mut Criterion) {
    for d in [128, 512] {
        let shape = Shape::at_width(d);
        let (b, vs) = bench::variants(shape, &[], Device::Cpu).expect("benchmark shapes are valid");
        let dense = &vs[0];
        bench::step(dense, &b);
        let n: i64 = dense
            .vs
            .trainable_variables()
            .iter()
            .map(|t| t.numel() as i64)
            .sum();
        let mut g = c.benchmark_group(format!("adamw-d{d}-{:.1}M-params", n as f64 / 1e6));
        g.sample_size(20);
        for update in [Update::Fused, Update::WrittenOut] {
            let mut opt = AdamW::new(&dense.vs, 0.01);
            opt.update = update;
            g.bench_function(format!("{update:?}"), |it| {
                it.iter(|| {
                    // A clipping factor below 1, as most steps of a run have.
                    opt.clip_grad_norm(1e-3)
                        .expect("the norm takes these tensors");
                    opt.step(1e-4)
                        .expect("the fused update takes these tensors");
                })
            });
        }
        g.finish();
    }
}

criterion_group!(benches, run);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
}
