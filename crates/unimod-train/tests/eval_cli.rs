//! `unimod eval` never replaces a run's own evaluation with one under other settings: with
//! `--set` it writes to `<run>/evals/<digest>/` (with the resolved config), or to `--out`;
//! `unimod compare` reads such folders.

mod common;

use std::path::Path;
use std::process::Command;

fn unimod(cache: &Path, args: &[&str]) -> String {
    let o = Command::new(env!("CARGO_BIN_EXE_unimod"))
        .args(args)
        .env("UNIMOD_CACHE", cache)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(
        o.status.success(),
        "unimod {args:?}: {}\n{stderr}",
        o.status
    );
    stderr
}

#[test]
fn evaluations_under_other_settings_keep_the_runs_own() {
    let root = std::env::temp_dir().join(format!("unimod-eval-cli-{}", std::process::id()));
    let (cache, run) = (root.join("cache"), root.join("run"));
    let run_s = run.to_str().unwrap();
    let mut train = vec!["train", "--out", run_s];
    for s in common::MINIATURE {
        train.extend(["--set", s]);
    }
    unimod(&cache, &train);
    // The run's own evaluation (what an experiment's report reads).
    let own = b"{ \"the run's own\": true }";
    std::fs::write(run.join("eval.json"), own).unwrap();
    let small = ["--set", "eval.t2i_samples=2", "--set", "eval.mmu_samples=2"];
    unimod(
        &cache,
        &[&["eval", "--checkpoint", run_s][..], &small].concat(),
    );
    // Other settings: a folder of their own, named by them, with the config they resolve to.
    let other = [
        &small[..],
        &[
            "--set",
            "eval.sampling={ guidance = 0.5, guidance_schedule = \"increasing\" }",
        ],
    ]
    .concat();
    let said = unimod(
        &cache,
        &[&["eval", "--checkpoint", run_s][..], &other].concat(),
    );
    let kept = std::fs::read(run.join("eval.json")).unwrap();
    assert_eq!(kept, own, "the run's own evaluation is kept");
    let evals: Vec<_> = std::fs::read_dir(run.join("evals"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(evals.len(), 2, "{evals:?}"); // the small one and the guided one
    let guided = evals
        .iter()
        .find(|d| {
            std::fs::read_to_string(d.join("eval.toml"))
                .unwrap()
                .contains("guidance_schedule = \"increasing\"")
        })
        .expect("the guided evaluation's resolved config");
    assert!(guided.join("eval.json").exists());
    assert!(said.contains(guided.to_str().unwrap()), "{said}");
    // --out: where the user says.
    let eval_to = |out: &Path, settings: &[&str]| {
        let at = [
            "eval",
            "--checkpoint",
            run_s,
            "--out",
            out.to_str().unwrap(),
        ];
        unimod(&cache, &[&at[..], settings].concat());
    };
    let out = root.join("guided-seed0");
    eval_to(&out, &other);
    assert!(out.join("eval.json").exists());
    // `unimod compare` reads evaluation folders as written: the guided one against the run's
    // own settings (seed 0 of the miniature's config), one seed each.
    let plain = root.join("plain-seed0");
    eval_to(&plain, &small);
    // Answers routed by top-k over the prefix, recomputed at every token: on this dense model
    // the same answers as cached decoding, and the setting is kept with the evaluation.
    let top_k = root.join("top-k-prefix");
    eval_to(
        &top_k,
        &[
            &small[..],
            &["--set", "eval.decode_routing=\"top_k_prefix\""],
        ]
        .concat(),
    );
    let json = |d: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(d.join("eval.json")).unwrap()).unwrap()
    };
    for key in ["mmu_accuracy", "mmu_per_kind"] {
        assert_eq!(json(&plain)[key], json(&top_k)[key], "{key}");
    }
    assert!(
        std::fs::read_to_string(top_k.join("eval.toml"))
            .unwrap()
            .contains("decode_routing = \"top_k_prefix\"")
    );
    let refused = Command::new(env!("CARGO_BIN_EXE_unimod"))
        .args([
            "eval",
            "--checkpoint",
            run_s,
            "--set",
            "eval.decode_routing=\"top_k\"",
        ])
        .env("UNIMOD_CACHE", &cache)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && said.contains("top_k_prefix"),
        "{said}"
    );
    let table = root.join("compare.md");
    let args = [plain.to_str().unwrap(), out.to_str().unwrap()];
    unimod(
        &cache,
        &[&["compare"][..], &args, &["--out", table.to_str().unwrap()]].concat(),
    );
    let md = std::fs::read_to_string(&table).unwrap();
    assert!(
        md.contains("Baseline `plain`") && md.contains("| guided | "),
        "{md}"
    );
    std::fs::remove_dir_all(&root).unwrap();
}
