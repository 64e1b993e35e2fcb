//! Hostile and careless input: every case must end in a clear error that names what is wrong,
//! never a panic, an abort, a backtrace or an exit 0 with a wrong result. The CLI cases need
//! no training (they are refused while the config is read); the checkpoint-level faults are in
//! `trainer.rs`, which trains.

mod common;

use std::process::Command;
use unimod_train::RunConfig;

/// Runs the CLI with `RUST_BACKTRACE=1` (which must not turn refusals into backtraces) and
/// returns (exit code, stderr).
fn cli(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_unimod"))
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .env(
            "UNIMOD_CACHE",
            std::env::temp_dir().join("unimod-hostile-cache"),
        )
        .output()
        .expect("the CLI starts");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn hostile_config_values_are_refused_by_name() {
    // (override, what the error must name)
    let cases = [
        ("data.train_pool=0", "data.train_pool"),
        ("data.val_pool=0", "data.val_pool"),
        ("format.cond_dropout=nan", "format.cond_dropout"),
        ("format.cond_dropout=1.5", "format.cond_dropout"),
        ("format.mmu_turns=0", "format.mmu_turns"),
        ("format.mmu_turns=1000", "format.mmu_turns"),
        ("model.image_positions=\"learned\"", "model.image_positions"),
        ("data.shapes.sizes=\"huge\"", "data.shapes.sizes"),
        ("eval.sampling.steps=0", "eval.sampling.steps"),
        ("eval.sampling.temperature=nan", "eval.sampling.temperature"),
        ("eval.sampling.guidance=-1", "eval.sampling.guidance"),
        (
            "eval.sampling.guidance_schedule=\"wavy\"",
            "guidance_schedule",
        ),
        ("eval.t2i_samples=0", "eval.t2i_samples"),
        ("eval.mmu_samples=0", "eval.mmu_samples"),
        ("eval.max_answer_tokens=100000", "eval.max_answer_tokens"),
        ("tokenizer.image.batch_size=0", "tokenizer.image.batch_size"),
        (
            "tokenizer.image.codebook_size=0",
            "tokenizer.image.codebook_size",
        ),
        ("tokenizer.image.code_dim=0", "tokenizer.image.code_dim"),
        ("tokenizer.image.downsample=9", "tokenizer.image.downsample"),
        ("tokenizer.image.steps=0", "tokenizer.image.steps"),
        (
            "tokenizer.image.restart_every=0",
            "tokenizer.image.restart_every",
        ),
        ("tokenizer.image.lr=nan", "tokenizer.image.lr"),
        ("tokenizer.text_vocab=0", "tokenizer.text_vocab"),
        ("tokenizer.text_examples=0", "tokenizer.text_examples"),
        ("model.d_model=10000000", "d_model"),
        ("model.d_ffn=9223372036854775000", "d_ffn"),
        ("model.n_layers=100000", "n_layers"),
        ("model.max_seq_len=-1", "max_seq_len"),
        ("model.rope_theta=nan", "rope_theta"),
        ("train.mix.mmu=100000", "train.mix.mmu"),
        ("train.lr=-1", "train.lr"),
        ("train.lr=nan", "train.lr"),
        ("train.lr=inf", "train.lr"),
        ("train.min_lr=1", "train.min_lr"),
        ("train.weight_decay=-1", "train.weight_decay"),
        ("train.grad_clip=nan", "train.grad_clip"),
        ("train.accumulation=0", "train.accumulation"),
        ("train.accumulation=1000000", "train.accumulation"),
        ("train.steps=0", "train.steps"),
        ("train.warmup=1000000000", "train.warmup"),
        ("analysis.samples=100000", "analysis.samples"),
        ("analysis.fractions=[0.5, nan]", "analysis.fractions"),
        ("format.image_side=5", "format.image_side"),
        ("format.text_len=0", "format.text_len"),
        ("data.shapes.image_size=0", "data.shapes.image_size"),
        ("data.shapes.max_objects=0", "data.shapes.max_objects"),
        ("data.dataset=\"imagenet\"", "data.dataset"),
        ("experiment.name=\"../../escape\"", "experiment.name"),
        (
            "experiment.variants=[{ name = '../x', schedule = { kind = 'dense' } }]",
            "experiment.variants.name",
        ),
    ];
    for (set, field) in cases {
        let e = RunConfig::load(None, &[set.to_string()])
            .err()
            .unwrap_or_else(|| panic!("--set {set} was accepted"));
        let msg = format!("{e:#}");
        assert!(msg.contains(field), "--set {set}: {msg}");
    }
    // The same refusals through the CLI: exit 1, one line naming the field, no backtrace.
    for (set, field) in &cases[..4] {
        let (code, err) = cli(&["flops", "--set", set]);
        assert_eq!(code, Some(1), "--set {set}: {err}");
        assert!(err.contains(field), "--set {set}: {err}");
        assert!(
            !err.contains("backtrace") && !err.contains("panicked"),
            "--set {set}: {err}"
        );
    }
}

#[test]
fn hostile_arguments_are_refused() {
    for args in [
        &["data", "show", "-n", "0"][..],
        &["data", "show", "-n", "100000"],
        &["experiment", "--seeds", "0"],
        &["flops", "--mix", "t2i=0,mmu=0"],
        &["flops", "--mix", "t2i=nan"],
        &["flops", "--mix", "t2i=-1,mmu=2"],
        &["bench", "--rounds", "0"],
        &["bench", "--per-task", "0"],
        &["bench", "--image-side", "0"],
        &["bench", "--device", "cpu", "--graph"],
        &["generate", "--checkpoint", "/nonexistent/run"],
        &["eval", "--checkpoint", "/nonexistent/run"],
        &["train", "--out", "/tmp/x", "--resume", "--overwrite"],
    ] {
        let (code, err) = cli(args);
        assert!(
            matches!(code, Some(1) | Some(2)),
            "{args:?} exited with {code:?}: {err}"
        );
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert!(!err.trim().is_empty(), "{args:?}: no message");
    }
}

/// Random values for every numeric field of the config: loading either accepts the value or
/// refuses it; a value it accepts gives finite FLOPs and memory estimates. Nothing panics.
#[test]
fn any_numeric_config_value_is_accepted_or_refused_without_panic() {
    let keys: Vec<(String, bool)> = unimod_train::config::leaves(&RunConfig::default())
        .into_iter()
        .filter_map(|(k, v)| match v {
            toml::Value::Integer(_) => Some((k, true)),
            toml::Value::Float(_) => Some((k, false)),
            _ => None,
        })
        .collect();
    assert!(keys.len() > 40, "only {} numeric fields found", keys.len());
    let ints = ["0", "-1", "1", "3", "1000000", "9223372036854775807"];
    let floats = ["0.0", "-1.0", "nan", "inf", "-inf", "1e300", "0.5", "2.0"];
    for (key, int) in &keys {
        for v in if *int { &ints[..] } else { &floats[..] } {
            let set = format!("{key}={v}");
            let r = std::panic::catch_unwind(|| {
                if let Ok(c) = RunConfig::load(None, std::slice::from_ref(&set)) {
                    let bytes = unimod_model::flops::training_bytes(&c.model, 24, 128);
                    assert!(bytes.is_finite() && bytes > 0.0, "{set}: {bytes}");
                }
            });
            assert!(r.is_ok(), "--set {set} panicked");
        }
    }
}

/// Random corruptions of a checkpoint's bytes (header and data) are refused or read, never a
/// panic.
#[test]
fn corrupted_checkpoint_bytes_never_panic() {
    let dir = std::env::temp_dir().join(format!("unimod-hostile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("ok.safetensors");
    let t = tch::Tensor::arange(12, (tch::Kind::Float, tch::Device::Cpu)).reshape([3, 4]);
    unimod_model::checkpoint::save_tensors(&path, &[("w".into(), t)], Default::default()).unwrap();
    let good = std::fs::read(&path).unwrap();
    let bad = dir.join("bad.safetensors");
    let mut state = 0x9e3779b97f4a7c15u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for round in 0..300 {
        let mut bytes = good.clone();
        match round % 3 {
            0 => {
                let i = next() as usize % bytes.len();
                bytes[i] = next() as u8;
            }
            1 => bytes.truncate(next() as usize % bytes.len()),
            _ => {
                // The header length and the header itself are the likeliest targets.
                let i = next() as usize % 64.min(bytes.len());
                bytes[i] = next() as u8;
            }
        }
        std::fs::write(&bad, &bytes).unwrap();
        let r = std::panic::catch_unwind(|| {
            let _ = unimod_model::checkpoint::load_tensors(&bad);
        });
        assert!(
            r.is_ok(),
            "round {round}: loading a corrupted checkpoint panicked"
        );
    }
}

/// CUDA graphs on a CPU are refused by name, before the run directory is written.
#[test]
fn cuda_graphs_without_a_gpu_are_refused_before_anything_is_written() {
    let out = std::env::temp_dir().join(format!("unimod-hostile-graphs-{}", std::process::id()));
    let out_s = out.to_str().unwrap();
    let mut args = vec!["train", "--out", out_s, "--set", "train.cuda_graphs=4"];
    for s in common::MINIATURE {
        args.extend(["--set", s]);
    }
    let (code, err) = cli(&args);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("train.cuda_graphs = 4 needs a CUDA device"),
        "{err}"
    );
    assert!(!out.exists(), "nothing is written");
}
