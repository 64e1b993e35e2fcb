use tch::Device;
use unimod_model::bench::{self, Shape};
fn main() {
    let layers: usize = std::env::args().nth(2).unwrap().parse().unwrap();
    let shape = Shape { d_model: 64, n_layers: layers, per_task: 2, image_side: 4 };
    let (b, vs) = bench::variants(shape, &[0.5], Device::Cpu).unwrap();
    let which: usize = std::env::args().nth(1).unwrap().parse().unwrap();
    bench::step(&vs[which], &b);
    let (_, n) = unimod_kernels::ops::count(|| bench::step(&vs[which], &b)).unwrap();
    eprintln!("{n:?}");
}
