//! Safetensors files of named tensors with string metadata, written atomically (a crash
//! mid-write leaves the previous file intact) and read with clear refusals of truncated,
//! corrupt or mismatched files. Model checkpoints, optimizer state and the image tokenizer all
//! use it; Python's `safetensors` reads every file it writes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor, nn::VarStore};

/// Why a safetensors file cannot be read, written or loaded into a model.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)] // the fields are named in each variant's message
pub enum CheckpointError {
    /// The file cannot be read.
    #[error("cannot read checkpoint {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file cannot be written.
    #[error("cannot write checkpoint {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Not a safetensors file.
    #[error("{path} is not a valid safetensors checkpoint (truncated or corrupt?): {message}")]
    Corrupt { path: PathBuf, message: String },
    /// No config in the metadata.
    #[error("{path} carries no model config in its metadata: not a UniMoD-rs checkpoint")]
    NoConfig { path: PathBuf },
    /// Written by another model config.
    #[error("{path} was written by another model config: {difference}")]
    Mismatch { path: PathBuf, difference: String },
    /// A tensor the model needs is absent.
    #[error("{path} lacks tensor {name}")]
    Missing { path: PathBuf, name: String },
    /// A tensor of the wrong shape.
    #[error("{path}: tensor {name} has shape {found:?}, the model expects {expected:?}")]
    Shape {
        path: PathBuf,
        name: String,
        found: Vec<i64>,
        expected: Vec<i64>,
    },
    /// A dtype safetensors files here do not hold.
    #[error("unsupported tensor kind {0:?}")]
    Kind(Kind),
}

fn dtype(kind: Kind) -> Result<safetensors::Dtype, CheckpointError> {
    Ok(match kind {
        Kind::Float => safetensors::Dtype::F32,
        Kind::Double => safetensors::Dtype::F64,
        Kind::Int64 => safetensors::Dtype::I64,
        Kind::BFloat16 => safetensors::Dtype::BF16,
        Kind::Half => safetensors::Dtype::F16,
        k => return Err(CheckpointError::Kind(k)),
    })
}

fn kind(dtype: safetensors::Dtype) -> Option<Kind> {
    Some(match dtype {
        safetensors::Dtype::F32 => Kind::Float,
        safetensors::Dtype::F64 => Kind::Double,
        safetensors::Dtype::I64 => Kind::Int64,
        safetensors::Dtype::BF16 => Kind::BFloat16,
        safetensors::Dtype::F16 => Kind::Half,
        _ => return None,
    })
}

fn tensor_bytes(t: &Tensor) -> Vec<u8> {
    let t = t.to_device(tch::Device::Cpu).contiguous();
    let n = t.numel() * t.kind().elt_size_in_bytes();
    let mut bytes = vec![0u8; n];
    t.copy_data_u8(&mut bytes, t.numel());
    bytes
}

/// Writes named tensors with metadata, atomically (temp file, then rename).
pub fn save_tensors(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: HashMap<String, String>,
) -> Result<(), CheckpointError> {
    let data: Vec<(String, Vec<u8>, Kind, Vec<usize>)> = tensors
        .iter()
        .map(|(n, t)| {
            (
                n.clone(),
                tensor_bytes(t),
                t.kind(),
                t.size().iter().map(|d| *d as usize).collect(),
            )
        })
        .collect();
    let mut views = Vec::with_capacity(data.len());
    for (name, bytes, k, shape) in &data {
        let view = safetensors::tensor::TensorView::new(dtype(*k)?, shape.clone(), bytes).map_err(
            |e| CheckpointError::Corrupt {
                path: path.into(),
                message: e.to_string(),
            },
        )?;
        views.push((name.clone(), view));
    }
    let tmp = path.with_extension("safetensors.partial");
    safetensors::serialize_to_file(views, Some(metadata), &tmp).map_err(|e| {
        CheckpointError::Write {
            path: tmp.clone(),
            source: std::io::Error::other(e),
        }
    })?;
    std::fs::rename(&tmp, path).map_err(|source| CheckpointError::Write {
        path: path.into(),
        source,
    })
}

/// Named tensors and metadata of a safetensors file.
pub struct Loaded {
    /// The tensors by name, on the CPU.
    pub tensors: HashMap<String, Tensor>,
    /// The file's `__metadata__` (a checkpoint's config lives here).
    pub metadata: HashMap<String, String>,
}

/// Reads a safetensors file, refusing a corrupt one with its path named.
pub fn load_tensors(path: &Path) -> Result<Loaded, CheckpointError> {
    let bytes = std::fs::read(path).map_err(|source| CheckpointError::Read {
        path: path.into(),
        source,
    })?;
    let corrupt = |e: safetensors::SafeTensorError| CheckpointError::Corrupt {
        path: path.into(),
        message: e.to_string(),
    };
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).map_err(corrupt)?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(corrupt)?;
    let mut tensors = HashMap::new();
    for (name, view) in st.tensors() {
        let k = kind(view.dtype()).ok_or_else(|| CheckpointError::Corrupt {
            path: path.into(),
            message: format!("tensor {name} has unsupported dtype {:?}", view.dtype()),
        })?;
        let shape: Vec<i64> = view.shape().iter().map(|d| *d as i64).collect();
        tensors.insert(name, Tensor::from_data_size(view.data(), &shape, k));
    }
    Ok(Loaded {
        tensors,
        metadata: meta.metadata().clone().unwrap_or_default(),
    })
}

/// Copies a checkpoint's tensors into `vs`, refusing a missing tensor or a shape mismatch.
pub fn load_into(vs: &mut VarStore, loaded: &Loaded, path: &Path) -> Result<(), CheckpointError> {
    tch::no_grad(|| {
        for (name, mut var) in vs.variables() {
            let src = loaded
                .tensors
                .get(&name)
                .ok_or_else(|| CheckpointError::Missing {
                    path: path.into(),
                    name: name.clone(),
                })?;
            if src.size() != var.size() {
                return Err(CheckpointError::Shape {
                    path: path.into(),
                    name,
                    found: src.size(),
                    expected: var.size(),
                });
            }
            var.copy_(&src.to_kind(var.kind()).to_device(var.device()));
        }
        Ok(())
    })
}
