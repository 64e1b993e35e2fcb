//! Loading what a run wrote: its latest checkpoint's full config and model.

use crate::RunConfig;
use crate::rundir::{TOKENIZERS_FILE, latest_checkpoint};
use crate::train::RunContext;
use anyhow::{Context, Result};
use std::path::Path;
use tch::nn::VarStore;
use unimod_model::{UnifiedTransformer, checkpoint};

/// The model of a run directory or checkpoint folder, on `ctx`'s device. Refused when the model
/// config in the weights' metadata differs from the run config's, or when `ctx`'s tokenizers are
/// not those the checkpoint was trained with.
pub fn model_from_run(path: &Path, ctx: &RunContext) -> Result<(VarStore, UnifiedTransformer)> {
    let (_, vs, model) = run_from_checkpoint(path, ctx)?;
    Ok((vs, model))
}

/// A run's checkpoint: its resolved config, weights and model, refused when its weights are
/// not finite or its tokenizers changed since.
pub fn run_from_checkpoint(
    path: &Path,
    ctx: &RunContext,
) -> Result<(RunConfig, VarStore, UnifiedTransformer)> {
    let device = ctx.device;
    let ck = latest_checkpoint(path)?;
    check_tokenizers(&ck, ctx)?;
    let run_toml = ck.join("run.toml");
    let cfg = RunConfig::load(Some(&run_toml), &[])
        .with_context(|| format!("checkpoint {}", ck.display()))?;
    let weights = ck.join("model.safetensors");
    let loaded = checkpoint::load_tensors(&weights)?;
    let saved = checkpoint::read_config(&loaded, &weights)?;
    if let Err(why) = checkpoint::check_config(&saved, &cfg.model) {
        anyhow::bail!("{}: {why}", weights.display());
    }
    cfg.model.validate()?;
    crate::device::check_memory(
        4.0 * unimod_model::flops::parameters(&cfg.model),
        device,
        &format!("the model of {}", weights.display()),
    )?;
    let mut vs = VarStore::new(device);
    let model = UnifiedTransformer::new(&vs.root(), &cfg.model)?;
    checkpoint::load_into(&mut vs, &loaded, &weights)?;
    if let Some(name) = crate::train::first_non_finite(&vs) {
        anyhow::bail!(
            "{} holds non-finite weights ({name} first): nothing it generates or scores would mean anything",
            weights.display()
        );
    }
    Ok((cfg, vs, model))
}

/// Refuses checkpoint folder `ck` when it records tokenizers other than `ctx`'s.
pub fn check_tokenizers(ck: &Path, ctx: &RunContext) -> Result<()> {
    let path = ck.join(TOKENIZERS_FILE);
    let trained_with = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "cannot check which tokenizers checkpoint {} was trained with ({} is missing or \
             unreadable)",
            ck.display(),
            path.display()
        )
    })?;
    if trained_with.trim() != ctx.tokenizers.digest {
        anyhow::bail!(
            "{}: trained with tokenizers {}, but those cached for its config ({}) are {}: \
             they were retrained since; use the cache it was trained with (UNIMOD_CACHE) or retrain",
            ck.display(),
            trained_with.trim(),
            ctx.tokenizers.dir.display(),
            ctx.tokenizers.digest
        );
    }
    Ok(())
}
