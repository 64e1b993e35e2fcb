//! Model checkpoints: safetensors whose metadata say what they are (the model config as TOML,
//! which carries the vocabulary layout), so a checkpoint alone rebuilds its model.

use std::collections::HashMap;
use std::path::Path;
use tch::{Tensor, nn::VarStore};
pub use unimod_tok::tensorfile::{CheckpointError, Loaded, load_into, load_tensors, save_tensors};

/// Metadata key of the model config (TOML).
pub const CONFIG_KEY: &str = "unimod.model_config";

/// Saves every variable of `vs` with `config` (TOML) in the metadata, plus `extra` entries.
pub fn save_model(
    path: &Path,
    vs: &VarStore,
    config_toml: &str,
    extra: HashMap<String, String>,
) -> Result<(), CheckpointError> {
    let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let mut meta = extra;
    meta.insert(CONFIG_KEY.into(), config_toml.into());
    save_tensors(path, &vars, meta)
}

/// The config TOML a checkpoint carries.
pub fn read_config(loaded: &Loaded, path: &Path) -> Result<String, CheckpointError> {
    loaded
        .metadata
        .get(CONFIG_KEY)
        .cloned()
        .ok_or_else(|| CheckpointError::NoConfig { path: path.into() })
}

/// `Err(why)` unless the config a checkpoint carries (`saved`, TOML) is `model`'s. Compared as
/// configs, not as text, so that a checkpoint written before a field with a default existed
/// still loads (its TOML lacks the field, which then takes the default).
pub fn check_config(saved: &str, model: &crate::ModelConfig) -> Result<(), String> {
    let parsed: crate::ModelConfig =
        toml::from_str(saved).map_err(|e| format!("its model config does not parse: {e}"))?;
    if &parsed == model {
        return Ok(());
    }
    let text = |c: &crate::ModelConfig| toml::to_string(c).unwrap_or_default();
    Err(describe_difference(&text(model), &text(&parsed)))
}

/// Names the first differing line between two configs, for a refusal message.
pub fn describe_difference(expected: &str, found: &str) -> String {
    let (e, f): (Vec<&str>, Vec<&str>) = (expected.lines().collect(), found.lines().collect());
    for i in 0..e.len().max(f.len()) {
        let (a, b) = (
            e.get(i).copied().unwrap_or("<none>"),
            f.get(i).copied().unwrap_or("<none>"),
        );
        if a != b {
            return format!("checkpoint has `{b}` where the model has `{a}`");
        }
    }
    "configs are equal".into()
}
