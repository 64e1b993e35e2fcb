//! What every analysis reads off one forward pass: per-token modality and the loss of the
//! batch's tasks, and the full attention maps of every layer.

use crate::AnalysisError;
use tch::{Kind, Tensor};
use unimod_model::block::AttentionMaps;
use unimod_model::{ForwardOptions, ModelOutput, UnifiedTransformer};
use unimod_tok::{Batch, Segment, Task};

/// Names of the modality axis of [`modality`].
pub const MODALITIES: [&str; 3] = ["text", "image", "special"];

/// `[B, S, 3]` one-hot modality (text, image, special) of every token; padding is all zero.
pub fn modality(batch: &Batch) -> Tensor {
    let valid = batch.valid();
    let image = batch.is_image().logical_and(&valid);
    let special = batch
        .segment
        .eq(Segment::Special as i64)
        .logical_and(&valid);
    let text = valid
        .logical_and(&image.logical_not())
        .logical_and(&special.logical_not());
    Tensor::stack(&[text, image, special], -1).to_kind(Kind::Float)
}

/// Mean of `per_token: [B, S]` over the tokens where `mask: [B, S]` holds.
pub fn masked_mean(per_token: &Tensor, mask: &Tensor) -> f64 {
    let w = mask.to_kind(Kind::Double);
    let total = (per_token.to_kind(Kind::Double) * &w).sum(Kind::Double);
    (total / w.sum(Kind::Double).clamp_min(1.0)).double_value(&[])
}

/// The loss of `task` on `batch`, under `opts`.
pub fn task_loss(
    model: &UnifiedTransformer,
    batch: &Batch,
    task: Task,
    opts: &ForwardOptions,
) -> Result<f64, AnalysisError> {
    let out = tch::no_grad(|| model.forward(batch, opts))?;
    loss_of(model, batch, &out, task)
}

/// Each sample's own mean loss in `out`.
pub fn per_sample(model: &UnifiedTransformer, batch: &Batch, out: &ModelOutput) -> Vec<f64> {
    let l = model.losses(batch, out).per_sample;
    Vec::<f64>::try_from(l.to_kind(Kind::Double)).expect("per-sample losses are [B]")
}

/// The task's mean loss in `out`, refused when the batch holds none of its samples.
pub fn loss_of(
    model: &UnifiedTransformer,
    batch: &Batch,
    out: &ModelOutput,
    task: Task,
) -> Result<f64, AnalysisError> {
    model
        .losses(batch, out)
        .per_task
        .get(&task)
        .map(|l| l.double_value(&[]))
        .ok_or(AnalysisError::MissingTask { task })
}

/// A forward pass keeping every layer's attention maps and hidden states.
pub fn full_forward(
    model: &UnifiedTransformer,
    batch: &Batch,
) -> Result<ModelOutput, AnalysisError> {
    let opts = ForwardOptions {
        attention: true,
        hidden_states: true,
        ..Default::default()
    };
    Ok(tch::no_grad(|| model.forward(batch, &opts))?)
}

/// Every layer's full `[B, H, S, S]` attention maps; an error if a layer saw fewer tokens
/// (routed) than the sequence holds. Skipped layers give `None`.
pub fn full_maps<'a>(
    out: &'a ModelOutput,
    batch: &Batch,
) -> Result<Vec<Option<&'a AttentionMaps>>, AnalysisError> {
    out.attentions
        .iter()
        .enumerate()
        .map(|(layer, m)| match m {
            Some(m) if m.probs.size()[2] != batch.seq_len() => {
                Err(AnalysisError::RoutedLayer { layer })
            }
            m => Ok(m.as_ref()),
        })
        .collect()
}
