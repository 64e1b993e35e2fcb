//! Run configuration: one TOML file (`--config`), dotted `--set key=value` overrides on top, every
//! field defaulted (`serde(default)`) and unknown fields refused, so a typo is an error that
//! names the field. A file may start from another with `extends = "base.toml"` (a path relative
//! to the file): its tables are merged key by key over the base's, any other value (arrays
//! included) replaces the base's. Every run writes the fully resolved config next to its outputs.

use crate::analyze::AnalysisConfig;
use crate::data::{DataConfig, TokenizerConfig};
use crate::eval::EvalConfig;
use crate::experiment::ExperimentConfig;
use crate::train::TrainConfig;
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::path::Path;
use unimod_model::ModelConfig;
use unimod_tok::FormatConfig;

/// A whole config file: every section, each with its defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct RunConfig {
    /// `[model]`: the transformer and its routing.
    pub model: ModelConfig,
    /// `[format]`: the sequence layout.
    pub format: FormatConfig,
    /// `[data]`: the dataset.
    pub data: DataConfig,
    /// `[tokenizer]`: the text BPE and the image VQ.
    pub tokenizer: TokenizerConfig,
    /// `[train]`: steps, batch, optimiser, device, precision.
    pub train: TrainConfig,
    /// `[eval]`: what `unimod eval` scores.
    pub eval: EvalConfig,
    /// `[experiment]`: variants and seeds of `unimod experiment`.
    pub experiment: ExperimentConfig,
    /// `[analysis]`: what `unimod analyze` computes.
    pub analysis: AnalysisConfig,
}

impl RunConfig {
    /// Reads `path` (or the defaults when `None`), applies `overrides`, validates.
    pub fn load(path: Option<&Path>, overrides: &[String]) -> Result<RunConfig> {
        let value = match path {
            Some(p) => read_table(p, &mut Vec::new())?,
            None => toml::Table::new(),
        };
        let mut where_ = path.map_or("the defaults".to_string(), |p| p.display().to_string());
        if !overrides.is_empty() {
            where_.push_str(" with its --set overrides");
        }
        Self::from_table(value, overrides, &format!("invalid config in {where_}"))
    }

    /// `value` with `overrides` applied, as a validated config; errors say `context`.
    fn from_table(
        mut value: toml::Table,
        overrides: &[String],
        context: &str,
    ) -> Result<RunConfig> {
        for o in overrides {
            apply_override(&mut value, o)?;
        }
        let cfg: RunConfig = toml::Value::Table(value)
            .try_into()
            .with_context(|| context.to_string())?;
        cfg.validate().with_context(|| context.to_string())?;
        Ok(cfg)
    }

    /// `[model]` with what the format decides for it: the flavour and the image grid's side.
    pub fn model_for_format(&self) -> ModelConfig {
        let mut m = self.model.clone();
        m.flavour = self.format.flavour;
        m.image_side = self.format.image_side as i64;
        m
    }

    /// Every value in its accepted range (the ranges are in the errors and in
    /// docs/conventions.md), and the sections consistent with each other. One place per
    /// section: the model's, format's and tokenizer's own `validate`, the rest here.
    pub fn validate(&self) -> Result<()> {
        use unimod_tok::check::{float_above, float_in, int_in, plain_name};
        self.model_for_format().validate()?;
        if let Some(t) = self.model.tasks.iter().find(|t| !t.is_built_in()) {
            bail!(
                "model.tasks names `{t}`: the model routes any declared task, but this trainer \
                 builds sequences for t2i, mmu and lm only (a new task's data and format are code: \
                 docs/extending.md)"
            );
        }
        if self.train.backbone.is_some() {
            if self.train.init_from.is_some() {
                bail!(
                    "train.backbone and train.init_from both name starting weights: give one \
                     (init_from continues a run of this project, backbone starts from a \
                     Hugging Face checkpoint)"
                );
            }
            if self.model.mot || self.model.moma.is_some() {
                bail!(
                    "train.backbone loads a dense decoder; model.mot and model.moma cannot \
                     start from it yet (train a dense run from it, then train.init_from that run)"
                );
            }
        }
        self.format.validate()?;
        let d = &self.data;
        let image_size = match d.dataset.as_str() {
            "shapes" => {
                d.shapes.validate()?;
                d.shapes.image_size
            }
            "mnist" => d.mnist.image_size,
            other => bail!("data.dataset = {other:?} is not accepted: \"shapes\" or \"mnist\""),
        };
        int_in("data.train_pool", d.train_pool, 1, 1 << 20)?;
        int_in("data.val_pool", d.val_pool, 1, 1 << 20)?;
        let t = &self.tokenizer;
        int_in(
            "tokenizer.text_vocab",
            t.text_vocab,
            unimod_tok::Special::ALL.len() + 1,
            65_536,
        )?;
        int_in(
            "tokenizer.text_examples",
            t.text_examples as usize,
            1,
            1_000_000,
        )?;
        t.image.validate(image_size)?;
        let side = image_size >> t.image.downsample;
        if self.format.image_side != side {
            bail!(
                "format.image_side = {} is not accepted: images of {image_size} px downsampled \
                 2^{} times by the tokenizer give {side} tokens per side",
                self.format.image_side,
                t.image.downsample
            );
        }
        let tr = &self.train;
        int_in("train.steps", tr.steps, 1, 100_000_000)?;
        float_above("train.lr", tr.lr, 0.0, 10.0)?;
        float_in("train.min_lr", tr.min_lr, 0.0, tr.lr)?;
        int_in("train.warmup", tr.warmup, 0, 100_000_000)?;
        float_in("train.weight_decay", tr.weight_decay, 0.0, 10.0)?;
        float_in("train.grad_clip (0: off)", tr.grad_clip, 0.0, 1e6)?;
        int_in("train.accumulation", tr.accumulation, 1, 1024)?;
        int_in("train.cuda_graphs", tr.cuda_graphs, 0, 1024)?;
        int_in("train.log_every", tr.log_every, 1, 1_000_000)?;
        for (task, n) in [("t2i", tr.mix.t2i), ("mmu", tr.mix.mmu), ("lm", tr.mix.lm)] {
            int_in(&format!("train.mix.{task}"), n, 0, 65_536)?;
        }
        let e = &self.eval;
        int_in("eval.val_batches", e.val_batches, 1, 100_000)?;
        int_in("eval.t2i_samples", e.t2i_samples, 1, 100_000)?;
        int_in("eval.mmu_samples", e.mmu_samples, 1, 100_000)?;
        int_in(
            "eval.max_answer_tokens",
            e.max_answer_tokens,
            1,
            self.format.text_len,
        )?;
        let sm = &e.sampling;
        int_in("eval.sampling.steps", sm.steps, 1, 1024)?;
        float_in(
            "eval.sampling.temperature (0: greedy)",
            sm.temperature,
            0.0,
            100.0,
        )?;
        float_in("eval.sampling.guidance", sm.guidance, 0.0, 100.0)?;
        float_in(
            "eval.sampling.choice_temperature",
            sm.choice_temperature,
            0.0,
            100.0,
        )?;
        let a = &self.analysis;
        int_in("analysis.samples", a.samples, 1, 4096)?;
        for f in &a.fractions {
            float_above("analysis.fractions", *f, 0.0, 1.0)?;
        }
        float_above(
            "analysis.competition_capacity",
            a.competition_capacity,
            0.0,
            1.0,
        )?;
        plain_name("experiment.name", &self.experiment.name)?;
        for v in &self.experiment.variants {
            plain_name("experiment.variants.name", &v.name)?;
        }
        Ok(())
    }

    /// This config with `--set`-style `overrides` applied, validated.
    pub fn with_overrides(&self, overrides: &[String]) -> Result<RunConfig> {
        let value: toml::Table = toml::from_str(&self.to_toml())?;
        Self::from_table(
            value,
            overrides,
            &format!("invalid overrides {overrides:?}"),
        )
    }

    /// The resolved config as TOML (what every run writes to `config.toml`).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a config always serialises")
    }
}

/// Every leaf value of a config under its dotted key (`train.lr`, `model.routing.schedule.kind`),
/// in key order; arrays are leaves.
pub fn leaves(c: &RunConfig) -> std::collections::BTreeMap<String, toml::Value> {
    fn walk(
        prefix: &str,
        v: toml::Value,
        out: &mut std::collections::BTreeMap<String, toml::Value>,
    ) {
        match v {
            toml::Value::Table(t) => {
                for (k, v) in t {
                    let key = if prefix.is_empty() {
                        k
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&key, v, out);
                }
            }
            v => {
                out.insert(prefix.to_string(), v);
            }
        }
    }
    let mut out = std::collections::BTreeMap::new();
    walk(
        "",
        toml::Value::try_from(c).expect("a config always serialises"),
        &mut out,
    );
    out
}

/// The fields where two configs differ, as (dotted key, value in `a`, value in `b`), in key
/// order; arrays and inline values compare whole.
pub fn differences(a: &RunConfig, b: &RunConfig) -> Vec<(String, String, String)> {
    let (ta, tb) = (leaves(a), leaves(b));
    let show = |v: Option<&toml::Value>| v.map_or("(none)".to_string(), ToString::to_string);
    let mut keys: Vec<&String> = ta.keys().chain(tb.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| ta.get(*k) != tb.get(*k))
        .map(|k| (k.clone(), show(ta.get(k)), show(tb.get(k))))
        .collect()
}

/// The TOML table of `path` with its `extends` chain resolved; `seen` guards against cycles.
fn read_table(path: &Path, seen: &mut Vec<std::path::PathBuf>) -> Result<toml::Table> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config {}", path.display()))?;
    let mut table = text
        .parse::<toml::Table>()
        .with_context(|| format!("{} is not valid TOML", path.display()))?;
    let Some(base) = table.remove("extends") else {
        return Ok(table);
    };
    let Some(base) = base.as_str() else {
        bail!("{}: `extends` must be a file name", path.display());
    };
    let base = path.parent().unwrap_or(Path::new(".")).join(base);
    let canonical = base.canonicalize().unwrap_or_else(|_| base.clone());
    if seen.contains(&canonical) {
        bail!(
            "{}: `extends` chain loops back to {}",
            path.display(),
            base.display()
        );
    }
    seen.push(canonical);
    let mut merged = read_table(&base, seen)
        .with_context(|| format!("{} extends {}", path.display(), base.display()))?;
    merge(&mut merged, table);
    Ok(merged)
}

fn merge(into: &mut toml::Table, over: toml::Table) {
    for (key, value) in over {
        match (into.get_mut(&key), value) {
            (Some(toml::Value::Table(a)), toml::Value::Table(b)) => merge(a, b),
            (_, value) => {
                into.insert(key, value);
            }
        }
    }
}

/// `a.b.c=value`: the value is read as TOML (`0.5`, `true`, `[1, 2]`, `{ kind = "dense" }`),
/// or as a string when it is not valid TOML.
fn apply_override(root: &mut toml::Table, item: &str) -> Result<()> {
    let Some((key, raw)) = item.split_once('=') else {
        bail!("--set {item}: expected key=value");
    };
    let value = format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let parts: Vec<&str> = key.trim().split('.').collect();
    let (last, parents) = parts.split_last().context("empty --set key")?;
    let mut table = root;
    for p in parents {
        table = table
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(Default::default()))
            .as_table_mut()
            .with_context(|| format!("--set {key}: {p} is not a table"))?;
    }
    table.insert(last.to_string(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_and_unknown_fields() {
        let c = RunConfig::load(
            None,
            &[
                "model.d_model=64".into(),
                "model.routing.schedule={ kind = 'mod' }".into(),
            ],
        )
        .unwrap();
        assert_eq!(c.model.d_model, 64);
        let e = RunConfig::load(None, &["model.d_modle=64".into()]).unwrap_err();
        assert!(format!("{e:#}").contains("d_modle"), "{e:#}");
        let e = RunConfig::load(
            None,
            &["model.routing.schedule={ kind = 'mod', capacity = 1.5 }".into()],
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("capacity 1.5"), "{e:#}");
    }

    /// Every config the repository ships loads and validates (a typo in one would otherwise
    /// surface only when someone runs it).
    #[test]
    fn every_shipped_config_loads() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "toml") {
                RunConfig::load(Some(&p), &[]).unwrap_or_else(|e| panic!("{}: {e:#}", p.display()));
                n += 1;
            }
        }
        assert!(n >= 10, "only {n} configs found in {}", dir.display());
    }

    #[test]
    fn extends_merges_tables_and_refuses_loops() {
        let dir = std::env::temp_dir().join(format!("unimod-extends-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let write = |name: &str, text: &str| std::fs::write(dir.join(name), text).unwrap();
        write(
            "base.toml",
            "[model]\nd_model = 64\nn_layers = 3\n[train]\nsteps = 7\n",
        );
        write(
            "child.toml",
            "extends = \"base.toml\"\n[model]\nn_layers = 5\n",
        );
        let c = RunConfig::load(Some(&dir.join("child.toml")), &[]).unwrap();
        assert_eq!(
            (c.model.d_model, c.model.n_layers, c.train.steps),
            (64, 5, 7)
        );
        write("loop.toml", "extends = \"loop.toml\"\n");
        let e = RunConfig::load(Some(&dir.join("loop.toml")), &[]).unwrap_err();
        assert!(format!("{e:#}").contains("loops back"), "{e:#}");
        write("missing.toml", "extends = \"nowhere.toml\"\n");
        let e = RunConfig::load(Some(&dir.join("missing.toml")), &[]).unwrap_err();
        assert!(format!("{e:#}").contains("nowhere.toml"), "{e:#}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn resolved_config_round_trips() {
        let c = RunConfig::load(None, &["model.n_layers=4".into()]).unwrap();
        let back: RunConfig = toml::from_str(&c.to_toml()).unwrap();
        assert_eq!(back, c);
    }
}
