//! Attention patterns per layer: where a query's attention mass goes (text, image or special
//! keys), whether a modality gets more than its share of the visible keys, and how concentrated
//! attention is (entropy).

use crate::AnalysisError;
use crate::probe::{self, full_maps, masked_mean};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};
use unimod_model::UnifiedTransformer;
use unimod_tok::Batch;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerAttention {
    pub layer: usize,
    /// Mean share of a query's attention mass on text, image and special keys.
    pub share: [f64; 3],
    /// `share` ÷ the modality's share of the keys the query may see: above 1, the modality is
    /// attended more than its count alone would give.
    pub per_token: [f64; 3],
    /// Mean attention entropy per query and head, in nats.
    pub entropy: f64,
}

/// Attention statistics of every non-skipped layer over the valid queries of `batch`.
pub fn patterns(
    model: &UnifiedTransformer,
    batch: &Batch,
) -> Result<Vec<LayerAttention>, AnalysisError> {
    let out = probe::full_forward(model, batch);
    let maps = full_maps(&out, batch)?;
    let modality = probe::modality(batch);
    let queries = batch.valid();
    Ok(maps
        .iter()
        .enumerate()
        .filter_map(|(layer, m)| m.map(|m| (layer, m)))
        .map(|(layer, m)| {
            let mean_probs = m.probs.to_kind(Kind::Float).mean_dim(1, false, Kind::Float);
            let share = mean_probs.matmul(&modality);
            let visible = m.scores.select(1, 0).isfinite().to_kind(Kind::Float);
            let visible_share =
                visible.matmul(&modality) / visible.sum_dim_intlist(-1, true, Kind::Float);
            let per_modality = |t: &Tensor, i: i64| masked_mean(&t.select(-1, i), &queries);
            let s: [f64; 3] = std::array::from_fn(|i| per_modality(&share, i as i64));
            let v: [f64; 3] = std::array::from_fn(|i| per_modality(&visible_share, i as i64));
            let p = m.probs.to_kind(Kind::Float);
            let entropy = -(&p * p.clamp_min(1e-30).log()).sum_dim_intlist(-1, false, Kind::Float);
            LayerAttention {
                layer,
                share: s,
                per_token: std::array::from_fn(|i| if v[i] > 0.0 { s[i] / v[i] } else { 0.0 }),
                entropy: masked_mean(&entropy.mean_dim(1, false, Kind::Float), &queries),
            }
        })
        .collect())
}

/// `[S, S]` attention of one sample in one layer, averaged over heads (for heat maps).
pub fn map(
    model: &UnifiedTransformer,
    batch: &Batch,
    sample: i64,
    layer: usize,
) -> Result<Tensor, AnalysisError> {
    let out = probe::full_forward(model, batch);
    let maps = full_maps(&out, batch)?;
    Ok(maps.get(layer).copied().flatten().map_or_else(
        || Tensor::zeros([batch.seq_len(), batch.seq_len()], tch::kind::FLOAT_CPU),
        |m| {
            m.probs
                .get(sample)
                .mean_dim(0, false, Kind::Float)
                .to_device(tch::Device::Cpu)
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{batch_of, tiny_model};
    use unimod_tok::Task;

    #[test]
    fn shares_are_distributions_and_entropy_is_bounded() {
        let (_vs, model) = tiny_model(unimod_router::Schedule::Dense);
        let b = batch_of(&model, Task::T2i, 3);
        let p = patterns(&model, &b).unwrap();
        assert_eq!(p.len(), model.cfg.n_layers);
        for l in &p {
            let total: f64 = l.share.iter().sum();
            assert!((total - 1.0).abs() < 1e-4, "layer {}: {total}", l.layer);
            assert!(l.entropy >= 0.0 && l.entropy <= (b.seq_len() as f64).ln() + 1e-6);
        }
        let m = map(&model, &b, 0, 1).unwrap();
        let rows = m.sum_dim_intlist(-1, false, Kind::Float);
        assert!(rows.allclose(&rows.ones_like(), 1e-4, 1e-4, false));
    }
}
