//! CUDA graphs: on a CPU every entry point refuses with a typed error (and runs no work); where
//! a GPU is present, a captured graph replays the eager result on new inputs, and a capture whose
//! work reads a device value fails cleanly and leaves the device usable.

use tch::{Device, Kind, Tensor};
use unimod_kernels::{CudaError, Graph, graphs_built, on_side_stream};

/// Against a CUDA build of libtorch (the setup's), a build without CUDA graphs is a fault to
/// report (the CUDA headers are missing), not a silent CPU-only build.
#[test]
fn a_cuda_libtorch_gives_cuda_graphs() {
    if option_env!("UNIMOD_KERNELS_CUDA_LIBTORCH") == Some("1") {
        assert!(graphs_built(), "{}", CudaError::NotBuilt);
    }
}

/// The GPU, where there is one (elsewhere only the CPU refusals are tested).
fn cuda() -> Option<Device> {
    let there = tch::Cuda::is_available();
    if !there {
        eprintln!("no CUDA device: only the CPU refusals are tested here");
    }
    there.then_some(Device::Cuda(0))
}

#[test]
fn a_cpu_device_is_refused_without_running_the_work() {
    let mut ran = false;
    let err = Graph::capture(Device::Cpu, || ran = true).unwrap_err();
    assert!(matches!(err, CudaError::NotCuda(Device::Cpu)), "{err}");
    let err = on_side_stream(Device::Cpu, || ran = true).unwrap_err();
    assert!(err.to_string().contains("need a CUDA device"), "{err}");
    assert!(!ran);
}

#[test]
fn a_captured_step_replays_the_eager_result_on_new_inputs() {
    let Some(device) = cuda() else {
        return;
    };
    tch::manual_seed(0);
    let w = Tensor::randn([32, 32], (Kind::Float, device)).set_requires_grad(true);
    let x = Tensor::zeros([8, 32], (Kind::Float, device));
    // A training step's shape: forward, backward into a gradient zeroed in place.
    let step = || {
        let mut g = w.grad();
        if g.defined() {
            let _ = g.zero_();
        }
        let loss = x.matmul(&w).tanh().square().sum(Kind::Float);
        loss.backward();
        loss
    };
    on_side_stream(device, || {
        for _ in 0..3 {
            let _ = step();
        }
    })
    .unwrap();
    let mut loss = None;
    let graph = Graph::capture(device, || loss = Some(step())).unwrap();
    let loss = loss.unwrap();
    for seed in 1..4 {
        tch::manual_seed(seed);
        x.shallow_clone()
            .copy_(&Tensor::randn([8, 32], (Kind::Float, device)));
        graph.replay().unwrap();
        let (replayed_loss, replayed_grad) = (loss.copy(), w.grad().copy());
        let eager_loss = step();
        assert_eq!(
            f64::try_from(&replayed_loss).unwrap(),
            f64::try_from(&eager_loss).unwrap()
        );
        assert!(replayed_grad.equal(&w.grad()), "seed {seed}");
    }
}

#[test]
fn a_host_read_under_capture_fails_and_the_device_stays_usable() {
    let Some(device) = cuda() else {
        return;
    };
    let x = Tensor::ones([4], (Kind::Float, device));
    let err = Graph::capture(device, || {
        let _ = (&x * 2.0).sum(Kind::Float).double_value(&[]);
    })
    .unwrap_err();
    assert!(matches!(err, CudaError::Work(_)), "{err}");
    assert_eq!((&x * 2.0).sum(Kind::Float).double_value(&[]), 8.0);
}
