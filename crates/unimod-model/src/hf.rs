//! Hugging Face checkpoints as backbones: a Phi checkpoint (Show-o starts from Phi-1.5) or a
//! Llama-family one (Emu3's decoder) on disk as `config.json` + `*.safetensors`, loaded into the
//! unified transformer, and a trained model exported back in the same layout.
//!
//! The vocabulary grows around the checkpoint's: the project's special tokens keep the first
//! ids ([`unimod_tok::Special`]), the checkpoint's text ids follow at [`TEXT_OFFSET`], then the
//! image codes. The new rows of the embedding and of the head (specials and codes) start as the
//! mean of the checkpoint's rows (a bias-free average token: every new token starts with the
//! same, typical logit), which `train.image_init = "codebook"` may then overwrite for the codes.
//!
//! Anything the unified transformer cannot compute exactly is refused with the field that says
//! so (an activation, RoPE scaling, QK norms, a head size other than hidden / heads).

use crate::UnifiedTransformer;
use crate::config::{BlockStyle, FfnKind, Flavour, ImagePositions, ModelConfig, NormKind};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor, nn::VarStore};
use unimod_tok::tensorfile::{CheckpointError, load_tensors, save_tensors};
use unimod_tok::{Special, VocabLayout};

/// Where the checkpoint's text id 0 lands in the unified vocabulary.
pub const TEXT_OFFSET: i64 = Special::ALL.len() as i64;

/// Why a Hugging Face checkpoint cannot be loaded or exported.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)] // the fields are named in each variant's message
pub enum HfError {
    /// A file that cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A `config.json` that does not parse.
    #[error("{path}: not a JSON object: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    /// A configuration this code does not compute.
    #[error("config.json `{field}` = {value}: {why}")]
    Unsupported {
        field: &'static str,
        value: String,
        why: &'static str,
    },
    /// A tensor the model needs that the checkpoint lacks.
    #[error("{path}: the checkpoint has no tensor `{name}`")]
    Missing { path: PathBuf, name: String },
    /// A tensor of the wrong shape.
    #[error("`{name}` is {found:?} in the checkpoint, the model expects {expected:?}")]
    Shape {
        name: String,
        expected: Vec<i64>,
        found: Vec<i64>,
    },
    /// Shapes that make no valid model.
    #[error("the checkpoint's shapes make no valid model: {0}")]
    Model(crate::ConfigError),
    /// A model the export format cannot hold.
    #[error("cannot export: {0}")]
    Export(String),
    /// The safetensors files could not be read or written.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
}

/// The decoder families supported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HfArch {
    /// `PhiForCausalLM`: parallel block, LayerNorm, GELU (tanh) MLP, biases, partial RoPE.
    Phi,
    /// `LlamaForCausalLM`: sequential block, RMSNorm, SwiGLU, grouped-query attention.
    Llama,
}

/// A checkpoint's `config.json`, mapped.
#[derive(Debug, Clone)]
pub struct HfConfig {
    /// The decoder family.
    pub arch: HfArch,
    /// The unified transformer that computes what the checkpoint computes, its vocabulary grown
    /// by the specials and `n_codes` image codes.
    pub model: ModelConfig,
    /// The checkpoint's own vocabulary size.
    pub vocab: usize,
    /// The head is the embedding (`tie_word_embeddings`); loaded as an untied copy.
    pub tied: bool,
}

fn unsupported(field: &'static str, value: &Value, why: &'static str) -> HfError {
    HfError::Unsupported {
        field,
        value: value.to_string(),
        why,
    }
}

/// Reads `dir/config.json` and maps it to the unified transformer with `n_codes` image codes.
///
/// ```no_run
/// use unimod_model::{UnifiedTransformer, hf};
/// let dir = std::path::Path::new("phi-1_5"); // config.json + *.safetensors
/// let c = hf::config(dir, 8192)?;
/// let vs = tch::nn::VarStore::new(tch::Device::Cpu);
/// let model = UnifiedTransformer::new(&vs.root(), &c.model)?;
/// let not_in_checkpoint = hf::load(dir, &c, &vs)?; // routers, predictors: initialised
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn config(dir: &Path, n_codes: usize) -> Result<HfConfig, HfError> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|source| HfError::Read {
        path: path.clone(),
        source,
    })?;
    let c: Value = serde_json::from_str(&text).map_err(|source| HfError::Json {
        path: path.clone(),
        source,
    })?;
    let get = |f: &'static str| c.get(f).unwrap_or(&Value::Null);
    let int = |f: &'static str| {
        get(f)
            .as_i64()
            .filter(|v| *v > 0)
            .ok_or_else(|| unsupported(f, get(f), "must be a positive integer"))
    };
    let float = |f: &'static str, default: f64| match get(f) {
        Value::Null => Ok(default),
        v => v
            .as_f64()
            .ok_or_else(|| unsupported(f, v, "must be a number")),
    };
    let arch = match get("model_type").as_str() {
        Some("phi") => HfArch::Phi,
        Some("llama") => HfArch::Llama,
        _ => {
            return Err(unsupported(
                "model_type",
                get("model_type"),
                "supported: \"phi\" (Phi-1.5, Show-o's backbone) and \"llama\" (Emu3's)",
            ));
        }
    };
    if !get("rope_scaling").is_null() {
        return Err(unsupported(
            "rope_scaling",
            get("rope_scaling"),
            "RoPE scaling is not implemented; only plain RoPE (null)",
        ));
    }
    let (d, heads) = (int("hidden_size")?, int("num_attention_heads")?);
    let kv = match get("num_key_value_heads") {
        Value::Null => heads,
        _ => int("num_key_value_heads")?,
    };
    if d % heads != 0 {
        return Err(unsupported(
            "hidden_size",
            get("hidden_size"),
            "must be a multiple of num_attention_heads",
        ));
    }
    if !matches!(get("head_dim"), Value::Null) && get("head_dim").as_i64() != Some(d / heads) {
        return Err(unsupported(
            "head_dim",
            get("head_dim"),
            "must be hidden_size / num_attention_heads",
        ));
    }
    let act = get("hidden_act").as_str().unwrap_or("");
    let vocab = int("vocab_size")? as usize;
    let mut m = ModelConfig {
        vocab: VocabLayout {
            n_text: TEXT_OFFSET as usize + vocab,
            n_codes,
        },
        d_model: d,
        n_layers: int("num_hidden_layers")? as usize,
        n_heads: heads,
        n_kv_heads: kv,
        d_ffn: int("intermediate_size")?,
        rope_theta: float("rope_theta", 10_000.0)?,
        max_seq_len: int("max_position_embeddings")?,
        image_positions: ImagePositions::Rope,
        ..Default::default()
    };
    match arch {
        HfArch::Phi => {
            if !matches!(act, "gelu_new" | "gelu_pytorch_tanh") {
                return Err(unsupported(
                    "hidden_act",
                    get("hidden_act"),
                    "Phi's MLP must use the tanh GELU (\"gelu_new\")",
                ));
            }
            if get("qk_layernorm").as_bool() == Some(true) {
                return Err(unsupported(
                    "qk_layernorm",
                    get("qk_layernorm"),
                    "QK LayerNorms are not implemented",
                ));
            }
            m.flavour = Flavour::Showo;
            m.ffn = FfnKind::Gelu;
            m.norm = NormKind::Layernorm;
            m.norm_eps = Some(float("layer_norm_eps", 1e-5)?);
            m.block = BlockStyle::Parallel;
            m.bias = true;
            m.head_bias = true;
            m.rotary_fraction = float("partial_rotary_factor", 0.5)?;
        }
        HfArch::Llama => {
            if act != "silu" {
                return Err(unsupported(
                    "hidden_act",
                    get("hidden_act"),
                    "Llama's MLP must be SwiGLU (\"silu\")",
                ));
            }
            let flag = |f| get(f).as_bool().unwrap_or(false);
            if flag("attention_bias") != flag("mlp_bias") {
                return Err(unsupported(
                    "attention_bias",
                    get("attention_bias"),
                    "biases must be on both the attention and the MLP projections, or on neither (mlp_bias)",
                ));
            }
            m.flavour = Flavour::Emu3;
            m.ffn = FfnKind::Swiglu;
            m.norm = NormKind::Rmsnorm;
            m.norm_eps = Some(float("rms_norm_eps", 1e-6)?);
            m.block = BlockStyle::Sequential;
            m.bias = flag("attention_bias");
            m.head_bias = false;
            m.rotary_fraction = 1.0;
        }
    }
    m.validate().map_err(HfError::Model)?;
    Ok(HfConfig {
        arch,
        model: m,
        vocab,
        tied: get("tie_word_embeddings").as_bool().unwrap_or(false),
    })
}

impl HfConfig {
    /// `cfg` with the backbone's architecture: vocabulary, width, depth, heads, FFN, norms,
    /// block style, biases and RoPE. What a checkpoint does not fix stays `cfg`'s: the flavour
    /// (the sequence format decides it), routing, loss weights, tasks, image positions and
    /// `max_seq_len` (RoPE has no learned length).
    pub fn architecture_of(&self, cfg: &ModelConfig) -> ModelConfig {
        let b = &self.model;
        ModelConfig {
            vocab: b.vocab,
            d_model: b.d_model,
            n_layers: b.n_layers,
            n_heads: b.n_heads,
            n_kv_heads: b.n_kv_heads,
            ffn: b.ffn,
            d_ffn: b.d_ffn,
            norm: b.norm,
            norm_eps: b.norm_eps,
            block: b.block,
            bias: b.bias,
            head_bias: b.head_bias,
            rotary_fraction: b.rotary_fraction,
            rope_theta: b.rope_theta,
            ..cfg.clone()
        }
    }
}

/// Where one of our variables comes from in the checkpoint.
enum Source {
    One(String),
    /// Rows concatenated (q, k, v into one projection).
    Rows(Vec<String>),
    /// Vocabulary rows: the checkpoint's at [`TEXT_OFFSET`], the new ones their mean.
    Vocab(String),
}

/// Our variable names and their sources (for a model without routers).
fn mapping(hf: &HfConfig) -> Vec<(String, Source)> {
    let mut out = Vec::new();
    let one = |s: &str| Source::One(s.to_string());
    out.push((
        "embed.weight".into(),
        Source::Vocab("model.embed_tokens.weight".into()),
    ));
    let head = if hf.tied {
        "model.embed_tokens.weight"
    } else {
        "lm_head.weight"
    };
    out.push(("head.weight".into(), Source::Vocab(head.into())));
    let params: &[&str] = if hf.model.bias {
        &["weight", "bias"]
    } else {
        &["weight"]
    };
    let norm_params: &[&str] = match hf.arch {
        HfArch::Phi => &["weight", "bias"],
        HfArch::Llama => &["weight"],
    };
    let final_norm = match hf.arch {
        HfArch::Phi => "model.final_layernorm",
        HfArch::Llama => "model.norm",
    };
    for p in norm_params {
        out.push((format!("norm.{p}"), one(&format!("{final_norm}.{p}"))));
    }
    if hf.arch == HfArch::Phi {
        out.push(("head.bias".into(), Source::Vocab("lm_head.bias".into())));
    }
    for l in 0..hf.model.n_layers {
        let ours = format!("layers.{l}.block");
        let theirs = format!("model.layers.{l}");
        let mut norms = vec![("norm1", "input_layernorm")];
        let mut linears = vec![("attn.o", "self_attn.o_proj")];
        match hf.arch {
            HfArch::Phi => {
                linears = vec![
                    ("attn.o", "self_attn.dense"),
                    ("mlp.up", "mlp.fc1"),
                    ("mlp.down", "mlp.fc2"),
                ];
            }
            HfArch::Llama => {
                norms.push(("norm2", "post_attention_layernorm"));
                linears.extend([
                    ("mlp.gate", "mlp.gate_proj"),
                    ("mlp.up", "mlp.up_proj"),
                    ("mlp.down", "mlp.down_proj"),
                ]);
            }
        }
        for (o, t) in norms {
            for p in norm_params {
                out.push((format!("{ours}.{o}.{p}"), one(&format!("{theirs}.{t}.{p}"))));
            }
        }
        for (o, t) in linears {
            for p in params {
                out.push((format!("{ours}.{o}.{p}"), one(&format!("{theirs}.{t}.{p}"))));
            }
        }
        for p in params {
            let qkv = ["q_proj", "k_proj", "v_proj"]
                .map(|x| format!("{theirs}.self_attn.{x}.{p}"))
                .to_vec();
            out.push((format!("{ours}.attn.qkv.{p}"), Source::Rows(qkv)));
        }
    }
    out
}

/// The checkpoint's tensors from every `*.safetensors` file of `dir` (sharded ones included).
fn read_tensors(dir: &Path) -> Result<HashMap<String, Tensor>, HfError> {
    let entries = std::fs::read_dir(dir).map_err(|source| HfError::Read {
        path: dir.into(),
        source,
    })?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    let mut all = HashMap::new();
    for f in files {
        all.extend(load_tensors(&f)?.tensors);
    }
    Ok(all)
}

/// Copies the checkpoint in `dir` into `vs`, the variables of a [`UnifiedTransformer`] built
/// from `hf.model` (any routing schedule: routers and predictors keep their initialisation).
/// Returns the names of the variables the checkpoint does not provide.
pub fn load(dir: &Path, hf: &HfConfig, vs: &VarStore) -> Result<Vec<String>, HfError> {
    let tensors = read_tensors(dir)?;
    let get = |name: &str| {
        tensors.get(name).ok_or_else(|| HfError::Missing {
            path: dir.into(),
            name: name.into(),
        })
    };
    let vars = vs.variables();
    let mut provided = std::collections::HashSet::new();
    for (ours, source) in mapping(hf) {
        let Some(var) = vars.get(&ours) else {
            continue;
        };
        let value = match &source {
            Source::One(n) => get(n)?.shallow_clone(),
            Source::Rows(ns) => {
                let parts = ns.iter().map(|n| get(n)).collect::<Result<Vec<_>, _>>()?;
                Tensor::cat(&parts, 0)
            }
            Source::Vocab(n) => {
                let rows = get(n)?.to_kind(Kind::Float);
                let mean = rows.mean_dim(0, true, Kind::Float);
                let size = var.size();
                let mut shape = size.clone();
                shape[0] = 1;
                let new = |n: i64| {
                    mean.expand(&shape, false)
                        .repeat_interleave_self_int(n, 0, None)
                };
                let after = size[0] - TEXT_OFFSET - rows.size()[0];
                if after < 0 {
                    return Err(HfError::Shape {
                        name: n.clone(),
                        expected: size,
                        found: rows.size(),
                    });
                }
                Tensor::cat(&[new(TEXT_OFFSET), rows, new(after)], 0)
            }
        };
        if value.size() != var.size() {
            return Err(HfError::Shape {
                name: ours,
                expected: var.size(),
                found: value.size(),
            });
        }
        tch::no_grad(|| var.shallow_clone().copy_(&value.to_kind(var.kind())));
        provided.insert(ours);
    }
    let mut missing: Vec<String> = vars.into_keys().filter(|k| !provided.contains(k)).collect();
    missing.sort();
    Ok(missing)
}

/// Writes `model` (its variables in `vs`) to `dir` as a Hugging Face checkpoint of the family
/// its shape belongs to (Show-o shapes: Phi; Emu3 shapes: Llama), over the whole unified
/// vocabulary (our ids; the checkpoint's text ids moved by [`TEXT_OFFSET`]). Routers and
/// predictors are left out: the export is the backbone, computing what the model computes with
/// every layer dense. Refuses what the family cannot express (MoT, MoMa, learned 2D image
/// positions, a Llama head bias).
pub fn export(dir: &Path, model: &UnifiedTransformer, vs: &VarStore) -> Result<(), HfError> {
    let m = &model.cfg;
    let refuse = |why: &str| Err(HfError::Export(why.into()));
    if m.mot || m.moma.is_some() || m.image_positions != ImagePositions::Rope {
        return refuse(
            "Mixture-of-Transformers, MoMa and learned 2D image positions have no Hugging Face Phi or Llama layout",
        );
    }
    let arch = match (m.block, m.norm, m.ffn) {
        (BlockStyle::Parallel, NormKind::Layernorm, FfnKind::Gelu) => HfArch::Phi,
        (BlockStyle::Sequential, NormKind::Rmsnorm, FfnKind::Swiglu) => HfArch::Llama,
        _ => {
            return refuse(
                "only Phi shapes (parallel, LayerNorm, GELU) and Llama shapes (sequential, RMSNorm, SwiGLU) export",
            );
        }
    };
    if arch == HfArch::Llama && (m.head_bias || m.rotary_fraction != 1.0) {
        return refuse("a Llama checkpoint has no head bias and rotates whole heads");
    }
    let vocab = m.vocab.size() as i64;
    let common = json!({
        "vocab_size": vocab,
        "hidden_size": m.d_model,
        "intermediate_size": m.d_ffn,
        "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads,
        "num_key_value_heads": m.n_kv_heads,
        "max_position_embeddings": m.max_seq_len,
        "rope_theta": m.rope_theta,
        "rope_scaling": null,
        "tie_word_embeddings": false,
        "torch_dtype": "float32",
        "unimod": { "text_offset": TEXT_OFFSET, "n_text": m.vocab.n_text, "n_codes": m.vocab.n_codes },
    });
    let mut config = common.as_object().expect("an object").clone();
    let specific = match arch {
        HfArch::Phi => json!({
            "architectures": ["PhiForCausalLM"], "model_type": "phi", "hidden_act": "gelu_new",
            "layer_norm_eps": m.norm_eps(), "partial_rotary_factor": m.rotary_fraction,
            "qk_layernorm": false, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attention_dropout": 0.0,
        }),
        HfArch::Llama => json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "rms_norm_eps": m.norm_eps(), "attention_bias": m.bias, "mlp_bias": m.bias,
            "attention_dropout": 0.0,
        }),
    };
    config.extend(specific.as_object().expect("an object").clone());
    let hf = HfConfig {
        arch,
        // Phi always has biases: a model without them exports zeros, which computes the same.
        model: ModelConfig {
            bias: arch == HfArch::Phi || m.bias,
            ..m.clone()
        },
        vocab: (vocab - TEXT_OFFSET) as usize,
        tied: false,
    };
    let vars = vs.variables();
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for (ours, source) in mapping(&hf) {
        let value = match vars.get(&ours) {
            Some(v) => v.detach().to_kind(Kind::Float).to_device(tch::Device::Cpu),
            // A bias the model does not have (Phi without biases, the head's).
            None if ours.ends_with(".bias") => {
                let out = match ours.as_str() {
                    "head.bias" => vocab,
                    _ => vars[&ours.replace(".bias", ".weight")].size()[0],
                };
                Tensor::zeros([out], (Kind::Float, tch::Device::Cpu))
            }
            None => return refuse("the model lacks a variable of its own layout"),
        };
        match source {
            Source::One(n) | Source::Vocab(n) => tensors.push((n, value)),
            Source::Rows(ns) => {
                let hd = m.head_dim();
                let sizes = [m.n_heads * hd, m.n_kv_heads * hd, m.n_kv_heads * hd];
                for (n, part) in ns.into_iter().zip(value.split_with_sizes(sizes, 0)) {
                    tensors.push((n, part.contiguous()));
                }
            }
        }
    }
    std::fs::create_dir_all(dir).map_err(|source| HfError::Read {
        path: dir.into(),
        source,
    })?;
    let path = dir.join("config.json");
    let text = serde_json::to_string_pretty(&Value::Object(config)).expect("JSON");
    std::fs::write(&path, text).map_err(|source| HfError::Read { path, source })?;
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    save_tensors(&dir.join("model.safetensors"), &tensors, meta)?;
    Ok(())
}
