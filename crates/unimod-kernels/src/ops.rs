//! How many operators a piece of tch code dispatches, as a proxy for the kernels it launches on
//! a GPU, where a small model's step is bound by the host's time to launch them (a few
//! microseconds each) rather than by the GPU's time to run them. The count comes from libtorch's
//! RecordFunction observers, which see every operator, the backward pass's included.
//!
//! `kernels` counts the operators that compute: those that are not views or bare allocations
//! and call no other operator but those. Each costs the host a dispatch, and on a GPU about one
//! launch (some launch several: sort, attention; arithmetic with a number, `&t * 2.0`, adds the
//! host-side copy that makes the number a tensor).
//! `UNIMOD_OPS_TRACE=1` prints each counted operator to stderr. The count covers every thread of
//! the process: count one thing at a time.
//!
//! ```
//! use tch::{Kind, Tensor};
//! let a = Tensor::ones([4, 4], (Kind::Float, tch::Device::Cpu));
//! let (_, n) = unimod_kernels::ops::count(|| (&a + &a).view([16]).relu()).unwrap();
//! assert_eq!(n.kernels, 2); // the add and the relu; the view launches nothing
//! ```

use std::ffi::c_char;
use std::sync::Mutex;

/// Operators dispatched by some work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OpCount {
    /// Operators that compute (leaves of the dispatch, not views or allocations).
    pub kernels: i64,
    /// Every operator dispatched, composite ones and views included.
    pub ops: i64,
}

/// Why the count could not start.
#[derive(Debug, thiserror::Error)]
#[error("counting operators: {0}")]
pub struct OpsError(String);

/// Counts are process-wide: one at a time.
static COUNTING: Mutex<()> = Mutex::new(());

/// Runs `work` and counts the operators it (and every other thread meanwhile) dispatched.
pub fn count<R>(work: impl FnOnce() -> R) -> Result<(R, OpCount), OpsError> {
    let _one_at_a_time = COUNTING.lock().unwrap_or_else(|e| e.into_inner());
    let mut err = [0 as c_char; 1024];
    if unsafe { unimod_ops_begin(err.as_mut_ptr(), err.len()) } != 0 {
        return Err(OpsError(crate::graph::message(&err)));
    }
    // Ends the count also when `work` panics, so that no observer is left behind.
    struct End<'a>(&'a mut OpCount);
    impl Drop for End<'_> {
        fn drop(&mut self) {
            unsafe { unimod_ops_end(&mut self.0.kernels, &mut self.0.ops) }
        }
    }
    let mut counted = OpCount::default();
    let out = {
        let _end = End(&mut counted);
        work()
    };
    Ok((out, counted))
}

unsafe extern "C" {
    fn unimod_ops_begin(err: *mut c_char, err_len: usize) -> i32;
    fn unimod_ops_end(kernels: *mut i64, ops: *mut i64);
}
