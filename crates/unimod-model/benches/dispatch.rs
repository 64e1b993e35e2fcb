//! Mixture-of-Transformers dispatch, two ways (issue #18): the library's index path
//! (`index_select` per modality, put back with `index_copy`) against sorting the frame by
//! modality once (one permutation, contiguous slices, the inverse permutation), each with a
//! per-modality MLP, forward and backward, at the main job's frame (24 sequences × 80 tokens,
//! 45 % image) and widths 128 and 512. `cargo bench -p unimod-model --bench dispatch`.

use criterion::{Criterion, criterion_group, criterion_main};
use std::time::Duration;
use tch::{Device, Kind, Tensor, nn, nn::Module};
use unimod_model::ModelConfig;
use unimod_model::block::{Dispatch, Mlp, PerModality};

/// The sorted alternative, its permutations computed once per frame as the index path's are.
struct Sorted {
    order: Tensor,
    inverse: Tensor,
    n_text: i64,
}

impl Sorted {
    fn new(image: &Tensor) -> Sorted {
        let key = image.reshape([-1]).to_kind(Kind::Int64);
        let (_, order) = key.sort(0, false);
        Sorted {
            inverse: order.argsort(0, false),
            n_text: key.size()[0] - key.sum(Kind::Int64).int64_value(&[]),
            order,
        }
    }

    /// One gather into modality order, each copy on its contiguous run, one gather back.
    fn apply(&self, x: &Tensor, mlps: &[Mlp; 2]) -> Tensor {
        let (b, t, d) = x.size3().unwrap();
        let xs = x.reshape([b * t, d]).index_select(0, &self.order);
        let y = Tensor::cat(
            &[
                mlps[0].forward(&xs.narrow(0, 0, self.n_text)),
                mlps[1].forward(&xs.narrow(0, self.n_text, b * t - self.n_text)),
            ],
            0,
        );
        y.index_select(0, &self.inverse).view([b, t, -1])
    }
}

fn run(c: &mut Criterion) {
    for d in [128i64, 512] {
        let cfg = ModelConfig {
            d_model: d,
            d_ffn: 4 * d,
            mot: true,
            ..Default::default()
        };
        let vs = nn::VarStore::new(Device::Cpu);
        let root = vs.root();
        let untied = PerModality::new(&(&root / "mlp"), &cfg, |p| Mlp::new(p, &cfg));
        let copies = [
            Mlp::new(&root / "text", &cfg),
            Mlp::new(&root / "image", &cfg),
        ];
        // The same weights both ways, so that the two paths can be checked equal first.
        let vars = vs.variables();
        tch::no_grad(|| {
            for (name, mut v) in vs.variables() {
                if let Some(src) = vars.get(&format!("mlp.{name}")) {
                    v.copy_(src);
                }
            }
        });
        tch::manual_seed(0);
        let x = Tensor::randn([24, 80, d], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let image = Tensor::rand([24, 80], (Kind::Float, Device::Cpu)).lt(0.45);
        let (dispatch, sorted) = (Dispatch::new(&image), Sorted::new(&image));
        let (a, b) = (
            untied.forward(&x, Some(&dispatch)),
            sorted.apply(&x, &copies),
        );
        assert!(
            a.allclose(&b, 1e-6, 1e-6, false),
            "the two dispatches differ"
        );
        let mut g = c.benchmark_group(format!("mot-dispatch-d{d}"));
        g.sample_size(20).measurement_time(Duration::from_secs(5));
        g.bench_function("index", |it| {
            it.iter(|| {
                untied
                    .forward(&x, Some(&dispatch))
                    .sum(Kind::Float)
                    .backward()
            })
        });
        g.bench_function("sort", |it| {
            it.iter(|| sorted.apply(&x, &copies).sum(Kind::Float).backward())
        });
        g.finish();
    }
}

criterion_group!(benches, run);
criterion_main!(benches);
