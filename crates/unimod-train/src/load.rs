//! Loading what a run wrote: its latest checkpoint's full config and model.

use crate::RunConfig;
use crate::train::latest_checkpoint;
use anyhow::{Context, Result};
use std::path::Path;
use tch::{Device, nn::VarStore};
use unimod_model::{UnifiedTransformer, checkpoint};

/// The run config and model of a run directory or checkpoint folder. The model config in the
/// weights' metadata must equal the run config's, else the checkpoint is refused.
pub fn model_from_run(path: &Path, device: Device) -> Result<(VarStore, UnifiedTransformer)> {
    let (_, vs, model) = run_from_checkpoint(path, device)?;
    Ok((vs, model))
}

pub fn run_from_checkpoint(
    path: &Path,
    device: Device,
) -> Result<(RunConfig, VarStore, UnifiedTransformer)> {
    let ck = latest_checkpoint(path)?;
    let run_toml = ck.join("run.toml");
    let cfg = RunConfig::load(Some(&run_toml), &[])
        .with_context(|| format!("checkpoint {}", ck.display()))?;
    let weights = ck.join("model.safetensors");
    let loaded = checkpoint::load_tensors(&weights)?;
    let saved = checkpoint::read_config(&loaded, &weights)?;
    let expected = toml::to_string(&cfg.model)?;
    if saved != expected {
        anyhow::bail!(
            "{}: {}",
            weights.display(),
            checkpoint::describe_difference(&expected, &saved)
        );
    }
    let mut vs = VarStore::new(device);
    let model = UnifiedTransformer::new(&vs.root(), &cfg.model)?;
    checkpoint::load_into(&mut vs, &loaded, &weights)?;
    Ok((cfg, vs, model))
}
