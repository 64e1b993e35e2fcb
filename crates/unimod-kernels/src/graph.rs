//! CUDA graphs for tch code: the CUDA work a closure queues (a whole training step: forward,
//! backward, optimiser) is captured once and replayed with one launch, so that a small model's
//! step costs the GPU's time instead of the host's time to launch hundreds of kernels.
//!
//! This is libtorch's own `at::cuda::CUDAGraph` (what `torch.cuda.graph` wraps), reached through
//! a small C++ shim compiled against the libtorch tch links. The rules are PyTorch's:
//!
//! - **Warm up first**, on a side stream ([`on_side_stream`]): a few eager runs of the work, so
//!   that cuBLAS handles, autograd's streams and the allocator's blocks exist before capture.
//! - **Static memory**: a replay reads and writes the very tensors the capture used. Inputs go
//!   into tensors allocated before capture (`copy_` new data into them between replays); outputs
//!   are the tensors the captured work created, refreshed by each replay.
//! - **No host round trips and no shapes from data** inside the work: a read of a device value
//!   (`double_value`, `nonzero`) fails the capture with an error, and the device stays
//!   usable.
//!
//! ```no_run
//! use tch::{Device, Kind, Tensor};
//! let device = Device::Cuda(0);
//! let mut x = Tensor::zeros([64, 64], (Kind::Float, device)); // the static input
//! let w = Tensor::randn([64, 64], (Kind::Float, device));
//! unimod_kernels::graph::on_side_stream(device, || { let _ = x.matmul(&w).relu(); })?;
//! let mut y = None;
//! let graph = unimod_kernels::graph::Graph::capture(device, || y = Some(x.matmul(&w).relu()))?;
//! let y = y.unwrap(); // the static output
//! x.copy_(&Tensor::randn([64, 64], (Kind::Float, device)));
//! graph.replay()?; // y now holds relu(x·w) of the new x
//! # Ok::<(), unimod_kernels::graph::CudaError>(())
//! ```

use std::any::Any;
use std::ffi::{c_char, c_int, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::ptr::NonNull;
use tch::Device;

/// Why a CUDA-graph call did not happen.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// CUDA graphs are a CUDA feature.
    #[error("CUDA graphs need a CUDA device, not {0:?}")]
    NotCuda(Device),
    /// The shim was compiled without the CUDA headers that CUDA graphs need.
    #[error(
        "this build has no CUDA graphs: unimod-kernels was compiled without the CUDA headers \
         (crt/, nv/) they need; run `cargo xtask setup` (or set CUDA_HOME to a CUDA 13 \
         toolkit) and rebuild"
    )]
    NotBuilt,
    /// libtorch or the CUDA runtime refused the capture or replay (a host sync inside the captured
    /// work reads as "operation not permitted when stream is capturing").
    #[error("CUDA graph capture failed: {0}")]
    Capture(String),
    /// The captured work itself panicked; the capture was ended and dropped.
    #[error("the work run under capture panicked: {0}")]
    Work(String),
}

/// Whether this build has CUDA graphs (the shim found the CUDA headers when it was compiled).
pub fn graphs_built() -> bool {
    unsafe { ffi::unimod_cuda_graphs_built() != 0 }
}

/// A captured CUDA graph: [`Graph::replay`] reruns the captured kernels on the same memory.
#[derive(Debug)]
pub struct Graph {
    raw: NonNull<c_void>,
}

impl Graph {
    /// Captures the CUDA work `work` queues on `device` (on a capture stream made current for
    /// it). Errors: `device` is not CUDA, the build has no CUDA graphs, the work panicked, or
    /// CUDA refused something it did (the message says what); in every case the capture has
    /// ended and no graph exists.
    pub fn capture(device: Device, work: impl FnOnce()) -> Result<Graph, CudaError> {
        let index = cuda_index(device)?;
        let mut raw = std::ptr::null_mut();
        run_with(work, |callback, ctx, status, err| unsafe {
            ffi::unimod_cuda_graph_capture(
                index,
                callback,
                ctx,
                status,
                &mut raw,
                err.as_mut_ptr(),
                err.len(),
            )
        })?;
        NonNull::new(raw)
            .map(|raw| Graph { raw })
            .ok_or_else(|| CudaError::Capture("no graph was returned".into()))
    }

    /// Launches the captured work on the current stream (asynchronously, as any CUDA work).
    pub fn replay(&self) -> Result<(), CudaError> {
        let mut err = [0 as c_char; ERR_LEN];
        let rc = unsafe {
            ffi::unimod_cuda_graph_replay(self.raw.as_ptr(), err.as_mut_ptr(), err.len())
        };
        match rc {
            0 => Ok(()),
            _ => Err(CudaError::Capture(message(&err))),
        }
    }
}

impl Drop for Graph {
    fn drop(&mut self) {
        unsafe { ffi::unimod_cuda_graph_free(self.raw.as_ptr()) }
    }
}

/// Runs `work` with a side stream of `device` current, ordered after what was queued before and
/// before what is queued after: the warm-up PyTorch asks for before a capture.
pub fn on_side_stream<R>(device: Device, work: impl FnOnce() -> R) -> Result<R, CudaError> {
    let index = cuda_index(device)?;
    let mut result = None;
    run_with(
        || result = Some(work()),
        |callback, ctx, status, err| unsafe {
            ffi::unimod_cuda_on_side_stream(
                index,
                callback,
                ctx,
                status,
                err.as_mut_ptr(),
                err.len(),
            )
        },
    )?;
    result.ok_or_else(|| CudaError::Work("the work did not run".into()))
}

const ERR_LEN: usize = 2048;

fn cuda_index(device: Device) -> Result<c_int, CudaError> {
    match device {
        Device::Cuda(i) if graphs_built() => Ok(i as c_int),
        Device::Cuda(_) => Err(CudaError::NotBuilt),
        other => Err(CudaError::NotCuda(other)),
    }
}

/// The closure's state while C++ runs it: the work, then the panic it raised, if any.
struct Call<F> {
    work: Option<F>,
    panic: Option<Box<dyn Any + Send>>,
}

extern "C" fn trampoline<F: FnOnce()>(ctx: *mut c_void) -> c_int {
    // Safety: `ctx` is the `Call<F>` that `run_with` passed along, alive for this call.
    let call = unsafe { &mut *(ctx as *mut Call<F>) };
    let Some(work) = call.work.take() else {
        return 1;
    };
    // A panic must not unwind through C++: it is kept and reported once the capture has ended.
    match catch_unwind(AssertUnwindSafe(work)) {
        Ok(()) => 0,
        Err(p) => {
            call.panic = Some(p);
            1
        }
    }
}

/// Runs `work` through `enter(callback, ctx, status, err)`, a shim entry point that calls
/// `callback(ctx)` once, and turns its outcome into a `Result`.
fn run_with<F: FnOnce()>(
    work: F,
    enter: impl FnOnce(ffi::Work, *mut c_void, *mut c_int, &mut [c_char]) -> c_int,
) -> Result<(), CudaError> {
    let mut call = Call {
        work: Some(work),
        panic: None,
    };
    let mut status: c_int = 0;
    let mut err = [0 as c_char; ERR_LEN];
    let rc = enter(
        trampoline::<F>,
        &mut call as *mut Call<F> as *mut c_void,
        &mut status,
        &mut err,
    );
    if let Some(p) = call.panic {
        let text = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "a panic without a message".into());
        return Err(CudaError::Work(text));
    }
    match (rc, status) {
        (0, 0) => Ok(()),
        (0, _) => Err(CudaError::Work("the work did not complete".into())),
        _ => Err(CudaError::Capture(message(&err))),
    }
}

pub(crate) fn message(err: &[c_char]) -> String {
    let bytes: Vec<u8> = err
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

mod ffi {
    use std::ffi::{c_char, c_int, c_void};

    pub type Work = extern "C" fn(*mut c_void) -> c_int;

    unsafe extern "C" {
        pub fn unimod_cuda_graphs_built() -> c_int;
        pub fn unimod_cuda_on_side_stream(
            device: c_int,
            work: Work,
            ctx: *mut c_void,
            work_status: *mut c_int,
            err: *mut c_char,
            err_len: usize,
        ) -> c_int;
        pub fn unimod_cuda_graph_capture(
            device: c_int,
            work: Work,
            ctx: *mut c_void,
            work_status: *mut c_int,
            out: *mut *mut c_void,
            err: *mut c_char,
            err_len: usize,
        ) -> c_int;
        pub fn unimod_cuda_graph_replay(
            graph: *mut c_void,
            err: *mut c_char,
            err_len: usize,
        ) -> c_int;
        pub fn unimod_cuda_graph_free(graph: *mut c_void);
    }
}
