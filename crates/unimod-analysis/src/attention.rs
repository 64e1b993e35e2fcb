//! Attention patterns per layer: where a query's attention mass goes (text, image or special
//! keys), whether a modality gets more than its share of the visible keys, and how concentrated
//! attention is (entropy).

use crate::AnalysisError;
use crate::probe::{self, full_maps, masked_mean};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};
use unimod_model::UnifiedTransformer;
use unimod_tok::Batch;

/// Where one layer's queries put their attention (the paper's Fig. 2).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerAttention {
    /// The layer.
    pub layer: usize,
    /// Mean share of a query's attention mass on text, image and special keys.
    pub share: [f64; 3],
    /// `share` ÷ the modality's share of the keys the query may see: above 1, the modality is
    /// attended more than its count alone would give.
    pub per_token: [f64; 3],
    /// Mean attention entropy per query and head, in nats.
    pub entropy: f64,
    /// The same per head (`share` and `entropy` are their means).
    pub heads: Vec<HeadAttention>,
}

/// One head's attention statistics.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HeadAttention {
    /// Mean share of a query's attention mass on text, image and special keys.
    pub share: [f64; 3],
    /// Mean attention entropy per query, in nats.
    pub entropy: f64,
}

/// Attention statistics of every non-skipped layer over the valid queries of `batch`.
pub fn patterns(
    model: &UnifiedTransformer,
    batch: &Batch,
) -> Result<Vec<LayerAttention>, AnalysisError> {
    let out = probe::full_forward(model, batch)?;
    let maps = full_maps(&out, batch)?;
    let modality = probe::modality(batch);
    let queries = batch.valid();
    Ok(maps
        .iter()
        .enumerate()
        .filter_map(|(layer, m)| m.map(|m| (layer, m)))
        .map(|(layer, m)| {
            let p = m.probs.to_kind(Kind::Float);
            let share = p.matmul(&modality.unsqueeze(1));
            let entropy = -(&p * p.clamp_min(1e-30).log()).sum_dim_intlist(-1, false, Kind::Float);
            let heads: Vec<HeadAttention> = (0..p.size()[1])
                .map(|h| HeadAttention {
                    share: std::array::from_fn(|i| {
                        masked_mean(&share.select(1, h).select(-1, i as i64), &queries)
                    }),
                    entropy: masked_mean(&entropy.select(1, h), &queries),
                })
                .collect();
            let over_heads = |f: &dyn Fn(&HeadAttention) -> f64| {
                heads.iter().map(f).sum::<f64>() / heads.len() as f64
            };
            let s: [f64; 3] = std::array::from_fn(|i| over_heads(&|h| h.share[i]));
            let visible = m.scores.select(1, 0).isfinite().to_kind(Kind::Float);
            let visible_share =
                visible.matmul(&modality) / visible.sum_dim_intlist(-1, true, Kind::Float);
            let v: [f64; 3] =
                std::array::from_fn(|i| masked_mean(&visible_share.select(-1, i as i64), &queries));
            LayerAttention {
                layer,
                share: s,
                per_token: std::array::from_fn(|i| if v[i] > 0.0 { s[i] / v[i] } else { 0.0 }),
                entropy: over_heads(&|h| h.entropy),
                heads,
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
    let out = probe::full_forward(model, batch)?;
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
        let b = batch_of(&model, Task::T2I, 3);
        let p = patterns(&model, &b).unwrap();
        assert_eq!(p.len(), model.cfg.n_layers);
        for l in &p {
            let total: f64 = l.share.iter().sum();
            assert!((total - 1.0).abs() < 1e-4, "layer {}: {total}", l.layer);
            assert!(l.entropy >= 0.0 && l.entropy <= (b.seq_len() as f64).ln() + 1e-6);
            assert_eq!(l.heads.len(), model.cfg.n_heads as usize);
            for h in &l.heads {
                assert!((h.share.iter().sum::<f64>() - 1.0).abs() < 1e-4);
            }
            let heads_differ = l
                .heads
                .iter()
                .any(|h| (h.entropy - l.heads[0].entropy).abs() > 1e-6);
            assert!(
                heads_differ,
                "layer {}: every head reports the same entropy",
                l.layer
            );
        }
        let m = map(&model, &b, 0, 1).unwrap();
        let rows = m.sum_dim_intlist(-1, false, Kind::Float);
        assert!(rows.allclose(&rows.ones_like(), 1e-4, 1e-4, false));
    }
}
