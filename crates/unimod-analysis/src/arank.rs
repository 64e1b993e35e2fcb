//! ARank: the rank of a layer's attention score matrices, averaged over heads (γ-MoD; UniMoD
//! Eq. 3). A low ARank means the layer's tokens carry little independent information, so the
//! layer can be pruned harder.

use tch::{Kind, Tensor};

/// Relative tolerance of the numerical rank: singular values below `RANK_RTOL · σ_max` of each
/// matrix count as zero (torch's default for float32 is max(T) · eps ≈ T · 1.2e-7, which counts
/// noise in softmax outputs as rank; 1e-4 is robust at the sizes analysed here).
pub const RANK_RTOL: f64 = 1e-4;

/// Mean numerical rank over every leading index of `scores: [.., T, T]`, batched in one call.
/// Masked (−inf) entries count as zero, as γ-MoD multiplies by the causal mask before the rank.
pub fn mean_rank(scores: &Tensor) -> f64 {
    let finite = scores.isfinite();
    let m = scores
        .to_kind(Kind::Double)
        .where_self(&finite, &Tensor::zeros([], (Kind::Double, scores.device())));
    let ranks = m.linalg_matrix_rank_atol_rtol_float(None, Some(RANK_RTOL), false);
    ranks
        .to_kind(Kind::Double)
        .mean(Kind::Double)
        .double_value(&[])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_of_matrices_of_known_rank() {
        tch::manual_seed(0);
        // [2 heads, 16, 16] of rank 3 and 5: mean 4.
        let make = |r: i64| {
            let a = Tensor::randn([16, r], tch::kind::DOUBLE_CPU);
            let b = Tensor::randn([r, 16], tch::kind::DOUBLE_CPU);
            a.matmul(&b)
        };
        let x = Tensor::stack(&[make(3), make(5)], 0);
        assert!((mean_rank(&x) - 4.0).abs() < 1e-9);
        let full = Tensor::randn([3, 8, 8], tch::kind::FLOAT_CPU);
        assert!((mean_rank(&full) - 8.0).abs() < 1e-9);
    }

    #[test]
    fn masked_entries_count_as_zero() {
        let mut x = Tensor::ones([4, 4], tch::kind::FLOAT_CPU);
        x = x.triu(1).masked_fill(&x.triu(1).eq(1.0), f64::NEG_INFINITY)
            + Tensor::eye(4, tch::kind::FLOAT_CPU);
        // upper triangle -inf → zero; lower triangle is ones+identity… a lower-triangular
        // matrix with a non-zero diagonal has full rank.
        assert!((mean_rank(&x) - 4.0).abs() < 1e-9);
    }
}
