//! Data-parallel training on the CPU: `unimod train --nproc 2` (two ranks summing through the
//! rendezvous store) against one process with the same global batch, and a two-rank resume.
//! The NCCL path is the same trainer with another backend; it needs a GPU (docs/distributed.md).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use tch::Tensor;

/// `model.d_model` of `common::MINIATURE`.
const D_MODEL: i64 = 32;
/// The miniature run, dense, with a global batch of 6 sequences.
const SETTINGS: &[&str] = &["train.mix={ t2i = 3, mmu = 3, lm = 0 }"];

fn train(cache: &Path, out: &Path, extra: &[&str], ok: bool) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_unimod"));
    cmd.arg("train").arg("--out").arg(out);
    for s in common::MINIATURE.iter().chain(SETTINGS) {
        cmd.args(["--set", s]);
    }
    cmd.args(extra).env("UNIMOD_CACHE", cache);
    for v in [
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "MASTER_ADDR",
        "MASTER_PORT",
    ] {
        cmd.env_remove(v);
    }
    let o = cmd.output().unwrap();
    assert!(
        o.status.success() == ok,
        "unimod train {extra:?}: {}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// `(step, loss, t2i, mmu, grad_norm)` of every step.
fn metrics(dir: &Path) -> Vec<[f64; 5]> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            ["step", "loss", "t2i", "mmu", "grad_norm"].map(|k| v[k].as_f64().unwrap())
        })
        .collect()
}

/// Every step's losses and gradient norm agree within 1e-4 (relative).
fn close(m1: &[[f64; 5]], m2: &[[f64; 5]]) {
    assert_eq!(m1.len(), m2.len());
    for (a, b) in m1.iter().zip(m2) {
        assert_eq!(a[0], b[0]);
        for k in 1..5 {
            let rel = (a[k] - b[k]).abs() / a[k].abs().max(1e-6);
            assert!(
                rel < 1e-4,
                "step {}: quantity {k} {} vs {} (rel {rel:.2e})",
                a[0],
                a[k],
                b[k]
            );
        }
    }
}

fn weights(dir: &Path) -> Vec<(String, Tensor)> {
    let ck = unimod_train::rundir::latest_checkpoint(dir).unwrap();
    let mut w = Tensor::read_safetensors(ck.join("model.safetensors")).unwrap();
    w.sort_by(|a, b| a.0.cmp(&b.0));
    w
}

/// The largest difference of any weight, relative to the largest weight of its tensor.
fn weight_gap(a: &Path, b: &Path) -> f64 {
    let (a, b) = (weights(a), weights(b));
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(&b)
        .map(|((na, ta), (nb, tb))| {
            assert_eq!(na, nb);
            let scale = ta.abs().max().double_value(&[]).max(1e-6);
            let d = (ta - tb).abs();
            if na.ends_with("attn.qkv.bias") {
                // The key bias gets no gradient (softmax ignores what it adds to every score
                // alike): Adam scales its rounding noise up to full steps, differently for any
                // order of additions, so it is left out.
                let _ = d.narrow(0, D_MODEL, D_MODEL).fill_(0.0);
            }
            d.max().double_value(&[]) / scale
        })
        .fold(0.0, f64::max)
}

#[test]
fn two_ranks_equal_one_process_and_resume() {
    let root = std::env::temp_dir().join(format!("unimod-dist-{}", std::process::id()));
    let cache = root.join("cache");
    std::fs::create_dir_all(&cache).unwrap();
    std::os::unix::fs::symlink(unimod_tok::cache::data_dir(), cache.join("data")).unwrap();

    let one: PathBuf = root.join("one");
    train(&cache, &one, &[], true);
    let two = root.join("two");
    let o = train(&cache, &two, &["--nproc", "2"], true);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("6 steps"),
        "rank 0 reports the run"
    );

    // Only rank 0 writes: one metrics line per step, and the losses of the global batch.
    let (m1, m2) = (metrics(&one), metrics(&two));
    assert_eq!(m1.len(), 6);
    close(&m1, &m2);
    // The sums differ from one process's only in the order of float additions.
    let gap = weight_gap(&one, &two);
    assert!(
        gap < 1e-3,
        "two ranks' weights differ from one process's by {gap:.2e}"
    );

    // Resuming with the same world size: stopped at step 3 (a run of 3 steps) and resumed to
    // 6, two ranks end where one process resumed the same way does.
    let resumed = |name: &str, ranks: &[&str]| {
        let dir = root.join(name);
        let first: Vec<&str> = ranks
            .iter()
            .copied()
            .chain(["--set", "train.steps=3"])
            .collect();
        train(&cache, &dir, &first, true);
        let second: Vec<&str> = ranks.iter().copied().chain(["--resume"]).collect();
        train(&cache, &dir, &second, true);
        dir
    };
    let (one_r, two_r) = (
        resumed("one-resumed", &[]),
        resumed("two-resumed", &["--nproc", "2"]),
    );
    assert_eq!(metrics(&two_r).len(), 6);
    close(&metrics(&one_r), &metrics(&two_r));
    let gap = weight_gap(&one_r, &two_r);
    assert!(
        gap < 1e-3,
        "resumed: two ranks' weights differ from one process's by {gap:.2e}"
    );

    // More ranks than sequences per step is refused, naming the setting.
    let o = train(&cache, &root.join("too-many"), &["--nproc", "8"], false);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("train.mix"), "{err}");
    let _ = std::fs::remove_dir_all(&root);
}
