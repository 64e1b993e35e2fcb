//! libtorch's fused AdamW over lists of parameters: the update of `torch.optim.AdamW(fused=True)`,
//! one kernel pass per parameter (one multi-tensor launch per list on a GPU). The arithmetic is
//! AdamW's (decoupled weight decay, bias-corrected moments); rounding differs from a written-out
//! update in the last bits only.

use std::ffi::{c_char, c_void};
use tch::Tensor;

/// Why the fused update did not happen (nothing was changed).
#[derive(Debug, thiserror::Error)]
pub enum AdamwError {
    /// The lists do not pair up.
    #[error(
        "fused AdamW: {params} parameters but {grads} gradients, {m} first and {v} second moments"
    )]
    Lengths {
        /// Parameters given.
        params: usize,
        /// Gradients given.
        grads: usize,
        /// First moments given.
        m: usize,
        /// Second moments given.
        v: usize,
    },
    /// libtorch refused the update (kinds or devices that do not match, say).
    #[error("fused AdamW: {0}")]
    Torch(String),
}

/// AdamW's hyper-parameters for one update.
#[derive(Debug, Clone, Copy)]
pub struct Hyper {
    /// Learning rate.
    pub lr: f64,
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Decoupled weight decay (the parameter shrinks by `lr · weight_decay` of itself).
    pub weight_decay: f64,
    /// Added to the root of the second moment.
    pub eps: f64,
}

/// One AdamW update of `params` in place (and of their moments `m`, `v`), at the update count
/// `step` (an f32 scalar tensor on their device that already counts this update, as PyTorch's
/// state steps). `grad_scale` (scalar tensor): gradients are divided by it first (a clipping
/// factor's inverse). Parameters, gradients and moments must share a kind and a device.
///
/// ```
/// use tch::{Kind, Tensor};
/// use unimod_kernels::adamw::{Hyper, step};
/// let p = Tensor::ones([3], (Kind::Float, tch::Device::Cpu));
/// let (m, v) = (p.zeros_like(), p.zeros_like());
/// let g = Tensor::from_slice(&[1.0f32, -1.0, 0.0]);
/// let hyper = Hyper { lr: 0.1, beta1: 0.9, beta2: 0.95, weight_decay: 0.0, eps: 1e-8 };
/// step(&[&p], &[&g], &[&m], &[&v], &Tensor::from(1.0f32), hyper, None).unwrap();
/// // The first bias-corrected update moves each weight by lr against its gradient's sign.
/// let p = Vec::<f32>::try_from(&p).unwrap();
/// assert!((p[0] - 0.9).abs() < 1e-6 && (p[1] - 1.1).abs() < 1e-6 && p[2] == 1.0);
/// ```
pub fn step(
    params: &[&Tensor],
    grads: &[&Tensor],
    m: &[&Tensor],
    v: &[&Tensor],
    step: &Tensor,
    hyper: Hyper,
    grad_scale: Option<&Tensor>,
) -> Result<(), AdamwError> {
    let n = params.len();
    if grads.len() != n || m.len() != n || v.len() != n {
        return Err(AdamwError::Lengths {
            params: n,
            grads: grads.len(),
            m: m.len(),
            v: v.len(),
        });
    }
    if n == 0 {
        return Ok(());
    }
    let ptrs = |ts: &[&Tensor]| -> Vec<*mut c_void> {
        ts.iter().map(|t| t.as_ptr() as *mut c_void).collect()
    };
    let (p, g, m, v) = (ptrs(params), ptrs(grads), ptrs(m), ptrs(v));
    let mut err = [0 as c_char; 2048];
    // The update writes parameters that require gradients: it is not part of any graph.
    let rc = tch::no_grad(|| unsafe {
        unimod_fused_adamw(
            p.as_ptr(),
            g.as_ptr(),
            m.as_ptr(),
            v.as_ptr(),
            n,
            step.as_ptr() as *mut c_void,
            hyper.lr,
            hyper.beta1,
            hyper.beta2,
            hyper.weight_decay,
            hyper.eps,
            grad_scale.map_or(std::ptr::null_mut(), |s| s.as_ptr() as *mut c_void),
            err.as_mut_ptr(),
            err.len(),
        )
    });
    match rc {
        0 => Ok(()),
        _ => Err(AdamwError::Torch(crate::graph::message(&err))),
    }
}

/// The global L2 norm of `tensors` (an f32 scalar on their device; 0 for none) by one
/// multi-tensor norm: what gradient clipping reads, in a handful of kernels instead of two per
/// tensor.
///
/// ```
/// use tch::Tensor;
/// let (a, b) = (Tensor::from_slice(&[3.0f32]), Tensor::from_slice(&[4.0f32]));
/// let n = unimod_kernels::adamw::global_norm(&[&a, &b]).unwrap();
/// assert_eq!(n.double_value(&[]), 5.0);
/// ```
pub fn global_norm(tensors: &[&Tensor]) -> Result<Tensor, AdamwError> {
    if tensors.is_empty() {
        return Ok(Tensor::from(0.0f32));
    }
    let ptrs: Vec<*mut c_void> = tensors.iter().map(|t| t.as_ptr() as *mut c_void).collect();
    let mut out = std::ptr::null_mut();
    let mut err = [0 as c_char; 2048];
    let rc = tch::no_grad(|| unsafe {
        unimod_global_norm(
            ptrs.as_ptr(),
            ptrs.len(),
            &mut out,
            err.as_mut_ptr(),
            err.len(),
        )
    });
    match rc {
        // Safety: the shim returned a new at::Tensor for the caller to own, as tch's own do.
        0 => Ok(unsafe { Tensor::from_ptr(out as *mut torch_sys::C_tensor) }),
        _ => Err(AdamwError::Torch(crate::graph::message(&err))),
    }
}

unsafe extern "C" {
    fn unimod_global_norm(
        tensors: *const *mut c_void,
        n: usize,
        out: *mut *mut c_void,
        err: *mut c_char,
        err_len: usize,
    ) -> i32;
    fn unimod_fused_adamw(
        params: *const *mut c_void,
        grads: *const *mut c_void,
        exp_avgs: *const *mut c_void,
        exp_avg_sqs: *const *mut c_void,
        n: usize,
        step: *mut c_void,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
        grad_scale: *mut c_void,
        err: *mut c_char,
        err_len: usize,
    ) -> i32;
}
