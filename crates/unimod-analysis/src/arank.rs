//! ARank: the rank of a layer's attention score matrices, averaged over heads and samples
//! (UniMoD Eq. 3, after γ-MoD). A low ARank means the layer's tokens carry few independent
//! directions, so the layer can be pruned harder.
//!
//! Two definitions, chosen by `analysis.arank`:
//! - [`ArankDefinition::Bilinear`] (default, the paper's Eq. 3): per head
//!   `A_h = (x W_Q,h)(x W_K,h)ᵀ` over the sample's valid tokens, before RoPE and with no attention
//!   mask, so `rank(A_h) ≤ min(T, head_dim)`. A causal mask must not be applied: a triangular
//!   matrix with a non-zero diagonal has full rank whatever the tokens hold, so a masked "ARank"
//!   measures the mask.
//! - [`ArankDefinition::GammaMod`] (γ-MoD's code, `compute_attention_rank`): the post-softmax
//!   attention map times the causal mask with the diagonal zeroed, rank in float32 with
//!   torch's default tolerance. Not bounded by the head dimension.
//!
//! Padding is removed in both: its rows and columns are zeroed, which leaves the rank of the
//! valid block unchanged.

use crate::stats::Estimate;
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// Relative tolerance of the bilinear definition's numerical rank: singular values below
/// `RANK_RTOL · σ_max` of each matrix count as zero. The matrices are products of float32
/// activations formed in float64, so rounding puts spurious singular values near 1e-7 · σ_max;
/// 1e-4 sits well above that and also ignores directions too weak (four orders of magnitude
/// below the strongest) to move a softmax.
pub const RANK_RTOL: f64 = 1e-4;

/// Which matrix ARank takes the rank of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ArankDefinition {
    /// The paper's Eq. 3: pre-softmax, pre-RoPE `Q Kᵀ` per head, unmasked.
    #[default]
    Bilinear,
    /// γ-MoD's code: post-softmax map × strictly-lower-triangular mask.
    GammaMod,
}

/// ARank of one layer over a set of samples.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Arank {
    /// Mean over samples of the mean over heads.
    pub mean: f64,
    /// Standard error of `mean` over samples (0 for one sample).
    pub se: f64,
    /// Mean over samples of the largest rank the definition allows: `min(T, head_dim)` for
    /// the bilinear definition, `T − 1` for γ-MoD's (its diagonal and first row are zero).
    pub bound: f64,
    /// How many samples `mean` and `se` are over (0 in files written before it was recorded).
    #[serde(default)]
    pub samples: usize,
}

impl Arank {
    /// The mean with its standard error on `samples − 1` degrees of freedom.
    pub fn estimate(&self) -> Estimate {
        Estimate {
            mean: self.mean,
            se: self.se,
            df: self.samples as f64 - 1.0,
        }
    }
}

/// Numerical rank of every `[.., T, T]` matrix of `m` (float64), `[..]`.
fn ranks(m: &Tensor, rtol: Option<f64>) -> Tensor {
    m.linalg_matrix_rank_atol_rtol_float(None, rtol, false)
        .to_kind(Kind::Double)
}

/// Mean and standard error over samples of `per_sample: [B]`.
fn summary(per_sample: &Tensor, bound: &Tensor) -> Arank {
    let v = Vec::<f64>::try_from(per_sample).expect("per-sample ranks are f64");
    let e = Estimate::mean_of(&v);
    Arank {
        mean: e.mean,
        se: if v.len() < 2 { 0.0 } else { e.se },
        samples: v.len(),
        bound: bound
            .to_kind(Kind::Double)
            .mean(Kind::Double)
            .double_value(&[]),
    }
}

/// The paper's ARank from a layer's pre-RoPE queries and keys.
///
/// # Shapes
/// `query`, `key`: `[B, H, T, hd]`; `valid`: `[B, T]` bool.
///
/// ```
/// use tch::{Device, Kind, Tensor};
/// use unimod_analysis::arank;
///
/// // 20 tokens, head dimension 8: the attention matrix q·kᵀ has rank at most 8.
/// let q = Tensor::randn([1, 2, 20, 8], (Kind::Float, Device::Cpu));
/// let k = Tensor::randn([1, 2, 20, 8], (Kind::Float, Device::Cpu));
/// let valid = Tensor::ones([1, 20], (Kind::Bool, Device::Cpu));
/// let r = arank::bilinear(&q, &k, &valid);
/// assert_eq!((r.mean, r.bound), (8.0, 8.0));
/// // Keys that span one direction give rank 1.
/// let k1 = Tensor::randn([1, 2, 20, 1], (Kind::Float, Device::Cpu)) * Tensor::ones([8], (Kind::Float, Device::Cpu));
/// assert_eq!(arank::bilinear(&q, &k1, &valid).mean, 1.0);
/// ```
pub fn bilinear(query: &Tensor, key: &Tensor, valid: &Tensor) -> Arank {
    let keep = valid.unsqueeze(1).unsqueeze(-1).to_kind(Kind::Double);
    let (q, k) = (
        query.to_kind(Kind::Double) * &keep,
        key.to_kind(Kind::Double) * &keep,
    );
    let a = q.matmul(&k.transpose(-2, -1));
    let per_sample = ranks(&a, Some(RANK_RTOL)).mean_dim(-1, false, Kind::Double);
    let hd = query.size()[3];
    let bound = valid.sum_dim_intlist(-1, false, Kind::Int64).clamp_max(hd);
    summary(&per_sample, &bound)
}

/// γ-MoD's ARank from a layer's post-softmax attention probabilities.
///
/// # Shapes
/// `probs`: `[B, H, T, T]`; `valid`: `[B, T]` bool.
pub fn gamma_mod(probs: &Tensor, valid: &Tensor) -> Arank {
    let t = probs.size()[2];
    let pair = valid
        .unsqueeze(2)
        .logical_and(&valid.unsqueeze(1))
        .unsqueeze(1);
    let strictly_lower = Tensor::ones([t, t], (Kind::Bool, probs.device())).tril(-1);
    let m = probs.to_kind(Kind::Float) * pair.logical_and(&strictly_lower).to_kind(Kind::Float);
    // float32 with torch's default tolerance (max(T) · eps · σ_max), as γ-MoD computes it.
    let per_sample = ranks(&m, None).mean_dim(-1, false, Kind::Double);
    let bound = (valid.sum_dim_intlist(-1, false, Kind::Int64) - 1).clamp_min(0);
    summary(&per_sample, &bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    use rand::{Rng, SeedableRng, rngs::StdRng};

    /// Uniform noise in [−1, 1) from the test's own generator: libtorch's global one is shared
    /// with the tests running beside it on other threads, so a seed there does not fix the draws.
    fn noise(shape: &[i64], rng: &mut StdRng) -> Tensor {
        let n = shape.iter().product::<i64>() as usize;
        let v: Vec<f32> = (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect();
        Tensor::from_slice(&v).view(shape)
    }

    /// `x: [B, T, D]` projected by two random `[D, H·hd]` maps into `[B, H, T, hd]`.
    fn project(x: &Tensor, heads: i64, hd: i64, rng: &mut StdRng) -> (Tensor, Tensor) {
        let (b, t, d) = x.size3().unwrap();
        let proj = |w: &Tensor| x.matmul(w).view([b, t, heads, hd]).transpose(1, 2);
        let (wq, wk) = (noise(&[d, heads * hd], rng), noise(&[d, heads * hd], rng));
        (proj(&wq), proj(&wk))
    }

    #[test]
    fn identical_tokens_have_rank_one() {
        let rng = &mut StdRng::seed_from_u64(0);
        let x = noise(&[2, 1, 64], rng).expand([2, 40, 64], false);
        let (q, k) = project(&x, 4, 16, rng);
        let r = bilinear(
            &q,
            &k,
            &Tensor::ones([2, 40], (Kind::Bool, tch::Device::Cpu)),
        );
        assert_eq!(r.mean, 1.0);
        assert_eq!(r.se, 0.0);
    }

    #[test]
    fn random_tokens_reach_min_of_length_and_head_dim() {
        let rng = &mut StdRng::seed_from_u64(1);
        for (t, hd) in [(40i64, 16i64), (10, 16)] {
            let x = noise(&[3, t, 64], rng);
            let (q, k) = project(&x, 2, hd, rng);
            let valid = Tensor::ones([3, t], (Kind::Bool, tch::Device::Cpu));
            let r = bilinear(&q, &k, &valid);
            assert_eq!(r.mean, t.min(hd) as f64, "T {t}, hd {hd}");
            assert_eq!(r.bound, t.min(hd) as f64);
        }
    }

    #[test]
    fn padding_is_removed() {
        let rng = &mut StdRng::seed_from_u64(2);
        // 12 valid random tokens of 30, head_dim 16: rank 12 whatever the padding holds.
        let x = noise(&[1, 30, 64], rng);
        let (q, k) = project(&x, 2, 16, rng);
        let valid = Tensor::arange(30, (Kind::Int64, tch::Device::Cpu))
            .lt(12)
            .unsqueeze(0);
        let r = bilinear(&q, &k, &valid);
        assert_eq!(r.mean, 12.0);
        assert_eq!(r.bound, 12.0);
    }

    #[test]
    fn definitions_differ_on_a_causal_toy() {
        let rng = &mut StdRng::seed_from_u64(3);
        // 24 tokens that are copies of 2 distinct vectors: the bilinear rank is 2, but the
        // causally masked softmax map is (nearly) triangular, of rank about T − 1.
        let base = noise(&[1, 2, 64], rng);
        let pick = Tensor::from_slice(&(0..24).map(|i| i % 2).collect::<Vec<i64>>());
        let x = base.index_select(1, &pick);
        let (q, k) = project(&(x * 0.1), 2, 16, rng);
        let valid = Tensor::ones([1, 24], (Kind::Bool, tch::Device::Cpu));
        let causal = Tensor::ones([24, 24], (Kind::Bool, tch::Device::Cpu)).tril(0);
        let probs = q
            .matmul(&k.transpose(-2, -1))
            .masked_fill(&causal.logical_not(), f64::NEG_INFINITY)
            .softmax(-1, Kind::Float);
        let (b, g) = (bilinear(&q, &k, &valid), gamma_mod(&probs, &valid));
        assert_eq!(b.mean, 2.0);
        assert!(g.mean > 10.0, "γ-MoD ARank {}", g.mean);
        assert_eq!(g.bound, 23.0);
    }
}
