//! Operator counts against facts: views launch nothing, a composite operator counts its leaves
//! only, the backward pass is seen, and a panic inside the work leaves no observer behind. One
//! test, alone in its process: counts see every thread.

use tch::{Device, Kind, Tensor};
use unimod_kernels::ops::count;

#[test]
fn counts_the_operators_that_compute() {
    let a = Tensor::ones([8, 8], (Kind::Float, Device::Cpu));
    // Views and reshapes of a contiguous tensor only: no kernel.
    let (_, n) = count(|| a.view([64]).unsqueeze(0).transpose(0, 1).narrow(0, 0, 4)).unwrap();
    assert_eq!(n.kernels, 0, "{n:?}");
    assert!(n.ops >= 4, "{n:?}");
    // Two elementwise operators, and the host-side copy that makes the scalar 2.0 a tensor.
    let (_, n) = count(|| (&a * 2.0).exp()).unwrap();
    assert_eq!(n.kernels, 3, "{n:?}");
    let (_, n) = count(|| (&a * &a).exp()).unwrap();
    assert_eq!(n.kernels, 2, "{n:?}");
    // `linear` is composite: only what it calls computes.
    let w = Tensor::ones([4, 8], (Kind::Float, Device::Cpu));
    let (_, n) = count(|| a.linear::<Tensor>(&w, None)).unwrap();
    assert!(n.kernels >= 1 && n.kernels < n.ops, "{n:?}");
    // The backward pass is counted too: more operators than the forward alone.
    let x = Tensor::ones([8, 8], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let (_, forward) = count(|| (&x * 3.0).tanh().sum(Kind::Float)).unwrap();
    let (_, both) = count(|| (&x * 3.0).tanh().sum(Kind::Float).backward()).unwrap();
    assert!(both.kernels > forward.kernels, "{forward:?} {both:?}");
    // A panicking count ends, and the next one starts from zero.
    let panicked = std::panic::catch_unwind(|| count(|| panic!("inside")));
    assert!(panicked.is_err());
    let (_, n) = count(|| a.exp()).unwrap();
    assert_eq!(n.kernels, 1, "{n:?}");
    let (_, n) = count(|| ()).unwrap();
    assert_eq!(n, Default::default());
}
