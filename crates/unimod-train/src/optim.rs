//! AdamW with weight decay only on matrices, its learning-rate schedule (linear warm-up, then
//! cosine decay to `min_lr`), and gradient clipping. Its own rather than tch's so that its state
//! (moments, step) is saved in checkpoints and a resumed run continues exactly. The update is
//! written out below ([`AdamW::step`] with [`Update::WrittenOut`]) and runs by default as
//! libtorch's fused AdamW, the same arithmetic in one pass per parameter (tested equal).

use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use tch::{Kind, Tensor, nn::VarStore};
use unimod_kernels::adamw;

/// How [`AdamW::step`] updates (`train.adamw`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Update {
    /// libtorch's fused AdamW (`torch.optim.AdamW(fused=True)`): one pass per parameter
    /// instead of about sixteen kernels (with clipping, 5.4× faster on a CPU at d 128 and 13×
    /// at d 512, docs/benchmarks.md; a few multi-tensor launches on a GPU).
    #[default]
    Fused,
    /// The update as written in [`AdamW::step`]: the readable reference.
    WrittenOut,
}

/// AdamW (decoupled weight decay) over a VarStore's trainable variables, decaying matrices
/// only, with f32 moments whatever the compute precision.
pub struct AdamW {
    params: Vec<(String, Tensor)>,
    /// Mixed precision: the low-precision copies the forward and backward ran on, in the order
    /// of `params`; their gradients, in f32, update the f32 master weights.
    compute: Option<Vec<Tensor>>,
    /// The global-norm clipping factor of this step's gradients (1: none).
    clip_scale: f64,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    decay: Vec<bool>,
    /// Updates taken (bias correction reads it; checkpoints save it).
    pub step: i64,
    /// How the update runs.
    pub update: Update,
    /// The fused update's f32 scalars on the parameters' device: the step count and the
    /// gradient divisor (clipping), refilled each step rather than copied from the host, which
    /// would synchronise a GPU.
    step_count: Tensor,
    grad_divisor: Tensor,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
}

impl AdamW {
    /// Zero moments for every trainable variable of `vs`.
    pub fn new(vs: &VarStore, weight_decay: f64) -> AdamW {
        let mut params: Vec<(String, Tensor)> = vs
            .variables()
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .collect();
        params.sort_by(|a, b| a.0.cmp(&b.0));
        let m = params.iter().map(|(_, p)| p.zeros_like()).collect();
        let v = params.iter().map(|(_, p)| p.zeros_like()).collect();
        // Matrices (and embeddings) decay; biases, norms and vectors do not.
        let decay = params.iter().map(|(_, p)| p.dim() >= 2).collect();
        let device = params.first().map_or(tch::Device::Cpu, |(_, p)| p.device());
        AdamW {
            step_count: Tensor::zeros([], (Kind::Float, device)),
            grad_divisor: Tensor::ones([], (Kind::Float, device)),
            params,
            compute: None,
            clip_scale: 1.0,
            m,
            v,
            decay,
            step: 0,
            update: Update::default(),
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay,
        }
    }

    /// Mixed precision: gradients come from `compute`'s variables (the same names as the
    /// master weights', another kind) and are applied to the master weights in their kind.
    pub fn gradients_from(&mut self, compute: &VarStore) {
        let vars = compute.variables();
        self.compute = Some(
            self.params
                .iter()
                .map(|(name, _)| vars[name].shallow_clone())
                .collect(),
        );
    }

    /// The variables whose gradients the backward pass fills (the compute copies under mixed
    /// precision, else the master weights), in a fixed order: data-parallel ranks sum them.
    pub fn trainable(&self) -> Vec<Tensor> {
        match &self.compute {
            Some(c) => c.iter().map(Tensor::shallow_clone).collect(),
            None => self.params.iter().map(|(_, p)| p.shallow_clone()).collect(),
        }
    }

    /// Parameter `i`'s gradient in its master weight's kind (undefined when it has none).
    fn grad(&self, i: usize) -> Tensor {
        let p = &self.params[i].1;
        match &self.compute {
            None => p.grad(),
            Some(c) => {
                let g = c[i].grad();
                if g.defined() { g.to_kind(p.kind()) } else { g }
            }
        }
    }

    /// Clears the gradients (of the compute copies too).
    pub fn zero_grad(&mut self) {
        for (_, p) in &mut self.params {
            p.zero_grad();
        }
        for c in self.compute.iter_mut().flatten() {
            c.zero_grad();
        }
    }

    /// Scales this step's gradients so their global norm is at most `max_norm` (applied in
    /// [`AdamW::step`]); returns the norm before (a fused update reads it by one multi-tensor
    /// norm).
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> Result<f64, adamw::AdamwError> {
        self.clip_scale = 1.0;
        let grads: Vec<Tensor> = (0..self.params.len())
            .map(|i| self.grad(i))
            .filter(Tensor::defined)
            .collect();
        if grads.is_empty() {
            return Ok(0.0);
        }
        let total = match self.update {
            Update::WrittenOut => {
                let squares: Vec<Tensor> = grads
                    .iter()
                    .map(|g| g.pow_tensor_scalar(2).sum(Kind::Float))
                    .collect();
                Tensor::stack(&squares, 0).sum(Kind::Float).sqrt()
            }
            Update::Fused => adamw::global_norm(&grads.iter().collect::<Vec<_>>())?,
        }
        .double_value(&[]);
        if max_norm > 0.0 && total > max_norm {
            self.clip_scale = max_norm / (total + 1e-6);
        }
        Ok(total)
    }

    /// One update at learning rate `lr`, with this step's clipping applied. Errors only when
    /// libtorch refuses the fused update (then nothing was changed but the step count).
    pub fn step(&mut self, lr: f64) -> Result<(), adamw::AdamwError> {
        self.step += 1;
        match self.update {
            Update::Fused => return self.fused_step(lr),
            Update::WrittenOut => {}
        }
        let (b1, b2) = (self.beta1, self.beta2);
        let (c1, c2) = (
            1.0 - b1.powi(self.step as i32),
            1.0 - b2.powi(self.step as i32),
        );
        tch::no_grad(|| {
            for i in 0..self.params.len() {
                // Clipping scales the gradient in place (a copy under mixed precision).
                let mut g = self.grad(i);
                if !g.defined() {
                    continue;
                }
                if self.clip_scale != 1.0 {
                    g *= self.clip_scale;
                }
                let p = &mut self.params[i].1;
                let _ = self.m[i].g_mul_scalar_(b1).g_add_(&(&g * (1.0 - b1)));
                let _ = self.v[i]
                    .g_mul_scalar_(b2)
                    .g_add_(&(g.pow_tensor_scalar(2) * (1.0 - b2)));
                if self.decay[i] && self.weight_decay > 0.0 {
                    let _ = p.g_mul_scalar_(1.0 - lr * self.weight_decay);
                }
                let update = (&self.m[i] / c1) / ((&self.v[i] / c2).sqrt() + self.eps) * lr;
                let _ = p.g_sub_(&update);
            }
        });
        Ok(())
    }

    /// [`AdamW::step`]'s update by libtorch's fused AdamW: one call for the decayed parameters,
    /// one for the rest, clipping as a gradient divisor.
    fn fused_step(&mut self, lr: f64) -> Result<(), adamw::AdamwError> {
        let grads: Vec<Tensor> = (0..self.params.len()).map(|i| self.grad(i)).collect();
        let _ = self.step_count.fill_(self.step as f64);
        let clipped = self.clip_scale != 1.0;
        if clipped {
            let _ = self.grad_divisor.fill_(1.0 / self.clip_scale);
        }
        for decay in [true, false] {
            let at: Vec<usize> = (0..self.params.len())
                .filter(|&i| self.decay[i] == decay && grads[i].defined())
                .collect();
            let params: Vec<&Tensor> = at.iter().map(|&i| &self.params[i].1).collect();
            let grads: Vec<&Tensor> = at.iter().map(|&i| &grads[i]).collect();
            let m: Vec<&Tensor> = at.iter().map(|&i| &self.m[i]).collect();
            let v: Vec<&Tensor> = at.iter().map(|&i| &self.v[i]).collect();
            let hyper = adamw::Hyper {
                lr,
                beta1: self.beta1,
                beta2: self.beta2,
                weight_decay: if decay { self.weight_decay } else { 0.0 },
                eps: self.eps,
            };
            let divisor = clipped.then_some(&self.grad_divisor);
            adamw::step(&params, &grads, &m, &v, &self.step_count, hyper, divisor)?;
        }
        Ok(())
    }

    /// Moments as named tensors, for a checkpoint.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(2 * self.params.len());
        for (i, (name, _)) in self.params.iter().enumerate() {
            out.push((format!("m.{name}"), self.m[i].shallow_clone()));
            out.push((format!("v.{name}"), self.v[i].shallow_clone()));
        }
        out
    }

    /// Restores moments saved by [`AdamW::state`]; names every missing or mis-shaped entry.
    pub fn load_state(
        &mut self,
        tensors: &HashMap<String, Tensor>,
        step: i64,
    ) -> Result<(), String> {
        tch::no_grad(|| {
            for (i, (name, _)) in self.params.iter().enumerate() {
                for (prefix, dst) in [("m", &mut self.m[i]), ("v", &mut self.v[i])] {
                    let key = format!("{prefix}.{name}");
                    let src = tensors
                        .get(&key)
                        .ok_or_else(|| format!("optimizer state lacks {key}"))?;
                    if src.size() != dst.size() {
                        return Err(format!(
                            "optimizer state {key} has shape {:?}, expected {:?}",
                            src.size(),
                            dst.size()
                        ));
                    }
                    dst.copy_(&src.to_device(dst.device()));
                }
            }
            Ok(())
        })?;
        self.step = step;
        Ok(())
    }
}

/// Linear warm-up to `lr` over `warmup` steps, then cosine decay to `min_lr` at `total`.
pub fn learning_rate(step: usize, total: usize, warmup: usize, lr: f64, min_lr: f64) -> f64 {
    if step < warmup {
        return lr * (step + 1) as f64 / warmup as f64;
    }
    let progress = (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
    min_lr + 0.5 * (lr - min_lr) * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, nn};

    #[test]
    fn schedule_warms_up_then_decays() {
        assert!((learning_rate(0, 100, 10, 1.0, 0.1) - 0.1).abs() < 1e-12);
        assert!((learning_rate(9, 100, 10, 1.0, 0.1) - 1.0).abs() < 1e-12);
        assert!((learning_rate(100, 100, 10, 1.0, 0.1) - 0.1).abs() < 1e-12);
    }

    #[test]
    fn minimises_a_quadratic_and_decays_only_matrices() {
        for update in [Update::Fused, Update::WrittenOut] {
            let vs = nn::VarStore::new(Device::Cpu);
            let w = vs.root().var("w", &[2, 2], nn::Init::Const(1.0));
            let b = vs.root().var("b", &[2], nn::Init::Const(1.0));
            let mut opt = AdamW::new(&vs, 0.5);
            opt.update = update;
            for _ in 0..200 {
                opt.zero_grad();
                let loss = (&w - 3.0).pow_tensor_scalar(2).sum(Kind::Float)
                    + (&b - 3.0).pow_tensor_scalar(2).sum(Kind::Float);
                loss.backward();
                opt.step(0.05).unwrap();
            }
            let (wv, bv) = (
                w.mean(Kind::Float).double_value(&[]),
                b.mean(Kind::Float).double_value(&[]),
            );
            assert!((bv - 3.0).abs() < 0.05, "{update:?}: bias {bv}");
            assert!(
                wv < bv - 0.1,
                "{update:?}: weight decay pulls the matrix below the bias: {wv} vs {bv}"
            );
        }
    }

    /// Twenty clipped, decayed updates of parameters of several shapes (one of them without a
    /// gradient), fused and written out, from the same start on the same gradients.
    #[test]
    fn the_fused_update_is_the_written_out_one() {
        // Drawn once and copied into both runs: libtorch's generator is shared with tests on
        // other threads, so reseeding it would not make two runs' draws equal.
        let start = [[16, 8], [1, 8], [3, 3]].map(|s| Tensor::randn(s, tch::kind::FLOAT_CPU));
        let inputs: Vec<Tensor> = (0..20)
            .map(|_| Tensor::randn([4, 16], tch::kind::FLOAT_CPU))
            .collect();
        let run = |update| {
            let vs = nn::VarStore::new(Device::Cpu);
            let root = vs.root();
            let w = root.var_copy("w", &start[0]);
            let b = root.var_copy("b", &start[1].view([8]));
            let _unused = root.var_copy("unused", &start[2]);
            let mut opt = AdamW::new(&vs, 0.1);
            opt.update = update;
            let mut norms = Vec::new();
            for (step, x) in inputs.iter().enumerate() {
                opt.zero_grad();
                let loss = (x.matmul(&w) + &b).tanh().square().sum(Kind::Float);
                loss.backward();
                norms.push(opt.clip_grad_norm(0.5).unwrap());
                opt.step(learning_rate(step, 20, 5, 0.05, 0.005)).unwrap();
            }
            let params = vs.variables();
            let m = opt.state();
            (params, m, norms)
        };
        let (fused, fused_m, fused_norms) = run(Update::Fused);
        let (written, written_m, written_norms) = run(Update::WrittenOut);
        assert!(
            fused_norms.iter().all(|&n| n > 0.5),
            "clipping was exercised"
        );
        for (name, p) in &written {
            let diff = (p - &fused[name]).abs().max().double_value(&[]);
            assert!(
                diff < 1e-5,
                "{name}: fused and written-out differ by {diff}"
            );
        }
        assert_eq!(
            fused["unused"], written["unused"],
            "a parameter without a gradient is left alone"
        );
        for ((k, a), (_, b)) in fused_m.iter().zip(&written_m) {
            let diff = (a - b).abs().max().double_value(&[]);
            assert!(diff < 1e-5, "moment {k} differs by {diff}");
        }
        for (a, b) in fused_norms.iter().zip(&written_norms) {
            assert!((a - b).abs() < 1e-4 * a, "gradient norms {a} vs {b}");
        }
    }
}
