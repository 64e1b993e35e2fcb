//! Layer importance, three ways: the loss when one layer is skipped at inference (the paper's
//! Table 1), ARank per layer (Eq. 3; the paper's Fig. 3), and the cosine similarity between a
//! layer's input and output residual streams (a layer that barely changes its input is
//! redundant).

use crate::AnalysisError;
use crate::arank::{self, Arank, ArankDefinition};
use crate::probe::{self, full_maps, masked_mean};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};
use unimod_model::{ForwardOptions, UnifiedTransformer};
use unimod_tok::{Batch, Task};

/// How much one layer matters to a task (the paper's Table 1 and Fig. 3).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerImportance {
    /// The layer.
    pub layer: usize,
    /// The task's loss with this layer skipped (the model's loss with none skipped is
    /// [`Importance::loss`]).
    pub skip_loss: f64,
    /// Mean over valid tokens of cos(input, output) of the layer.
    pub cosine: f64,
    /// ARank by the chosen definition (see [`arank`]); `None` for a skipped layer.
    pub arank: Option<Arank>,
}

/// Every layer's importance for one task.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Importance {
    /// The task whose samples were scored.
    pub task: Task,
    /// The task's loss with every layer in place.
    pub loss: f64,
    /// Mean number of valid tokens per sample: the scale ARank is read against.
    pub mean_tokens: f64,
    /// Which ARank was computed.
    pub arank_definition: ArankDefinition,
    /// One entry per layer.
    pub layers: Vec<LayerImportance>,
}

/// Importance of every layer for the one task whose samples `batch` holds.
pub fn importance(
    model: &UnifiedTransformer,
    batch: &Batch,
    task: Task,
    definition: ArankDefinition,
) -> Result<Importance, AnalysisError> {
    let out = probe::full_forward(model, batch)?;
    let loss = probe::loss_of(model, batch, &out, task)?;
    let maps = full_maps(&out, batch)?;
    let valid = batch.valid();
    let layers = (0..model.cfg.n_layers)
        .map(|layer| {
            let (x, y) = (&out.hidden_states[layer], &out.hidden_states[layer + 1]);
            let cos = Tensor::cosine_similarity(x, y, -1, 1e-8);
            let arank = maps[layer].map(|m| match definition {
                ArankDefinition::Bilinear => arank::bilinear(&m.query, &m.key, &valid),
                ArankDefinition::GammaMod => arank::gamma_mod(&m.probs, &valid),
            });
            Ok(LayerImportance {
                layer,
                skip_loss: probe::task_loss(
                    model,
                    batch,
                    task,
                    &ForwardOptions {
                        skip_layers: vec![layer],
                        ..Default::default()
                    },
                )?,
                cosine: masked_mean(&cos, &valid),
                arank,
            })
        })
        .collect::<Result<_, AnalysisError>>()?;
    let mean_tokens = valid
        .to_kind(Kind::Double)
        .sum(Kind::Double)
        .double_value(&[])
        / batch.size() as f64;
    Ok(Importance {
        task,
        loss,
        mean_tokens,
        arank_definition: definition,
        layers,
    })
}

/// Cosine similarity of two flattened tensors.
pub fn cosine(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (a.to_kind(Kind::Double), b.to_kind(Kind::Double));
    let den = (a.norm() * b.norm()).double_value(&[]);
    if den == 0.0 {
        0.0
    } else {
        a.dot(&b).double_value(&[]) / den
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{batch_of, tiny_model};
    use unimod_router::{LayerPlan, Schedule};

    #[test]
    fn skipping_a_layer_equals_a_model_built_without_it() {
        let (vs, model) = tiny_model(Schedule::Dense);
        let b = batch_of(&model, Task::MMU, 3);
        let imp = importance(&model, &b, Task::MMU, ArankDefinition::Bilinear).unwrap();
        let mut plans = vec![LayerPlan::Dense; model.cfg.n_layers];
        plans[1] = LayerPlan::Skip;
        let (skip_vs, skipped) = tiny_model(Schedule::Explicit { layers: plans });
        let mut skip_vs = skip_vs;
        skip_vs.copy(&vs).unwrap();
        let without = probe::task_loss(&skipped, &b, Task::MMU, &Default::default()).unwrap();
        assert_eq!(imp.layers[1].skip_loss, without);
        assert_ne!(imp.layers[1].skip_loss, imp.loss);
        let head_dim = model.cfg.head_dim() as f64;
        for l in &imp.layers {
            // A rank of (x W_Q)(x W_K)ᵀ cannot exceed the head dimension nor the tokens.
            let r = l.arank.unwrap();
            assert!(
                r.mean >= 1.0 && r.mean <= head_dim.min(imp.mean_tokens) && r.mean <= r.bound,
                "layer {}: {r:?}",
                l.layer
            );
            assert!(l.cosine > -1.0 && l.cosine <= 1.0 + 1e-9);
        }
        assert_eq!(imp.layers.len(), model.cfg.n_layers);
    }
}
