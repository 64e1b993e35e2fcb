//! `unimod reproduce` at its quick scale end to end on a miniature model: every table and
//! figure gets its rows, the analytic ones reproduce the paper, and a second run reuses the
//! finished runs. Structure, not quality: the quick scale trains for seconds.

use std::path::Path;
use unimod_train::RunConfig;
use unimod_train::reproduce::{self, Item, Request, Scale};

#[test]
fn quick_reproduction_writes_every_table_with_verdicts() {
    let root = std::env::temp_dir().join(format!("unimod-reproduce-{}", std::process::id()));
    let installed = unimod_tok::cache::data_dir();
    std::fs::create_dir_all(root.join("cache")).unwrap();
    std::os::unix::fs::symlink(&installed, root.join("cache/data")).unwrap();
    // SAFETY: set before any thread of this test binary reads the environment.
    unsafe { std::env::set_var("UNIMOD_CACHE", root.join("cache")) };
    let configs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
    let mut sets = Scale::Quick.overrides();
    sets.extend(
        [
            "model.d_model=32",
            "model.n_layers=6",
            "train.steps=8",
            "train.warmup=2",
            "model.n_heads=2",
            "model.n_kv_heads=2",
            "model.d_ffn=64",
            "data.train_pool=64",
            "data.val_pool=32",
            "tokenizer.text_examples=1000",
            "tokenizer.image={ downsample = 3, steps = 20, channels = 8, codebook_size = 32, batch_size = 8, restart_every = 10 }",
            "train.device=\"cpu\"",
            "eval.sampling={ steps = 2 }",
        ]
        .map(String::from),
    );
    let cfg = RunConfig::load(Some(&configs.join("reproduce.toml")), &sets).unwrap();
    let out = root.join("reproduce");
    let req = Request {
        cfg: &cfg,
        configs: &configs,
        items: Item::ALL.to_vec(),
        scale: Scale::Quick,
        seeds: 1,
        out: &out,
        device: tch::Device::Cpu,
        command: "reproduce --scale quick".into(),
        reuse: unimod_train::experiment::Reuse::Finished,
    };
    let rows = reproduce::run(&req).unwrap();
    let report = std::fs::read_to_string(out.join("REPORT.md")).unwrap();
    assert!(
        report.contains("UTC from commit") && report.contains("by `reproduce --scale quick`"),
        "{report}"
    );
    for item in Item::ALL {
        assert!(
            rows.iter().any(|r| r.item == item),
            "no rows for {}:\n{report}",
            item.name()
        );
    }
    // The analytic rows reproduce the paper's FLOPs savings at full size (docs/flops.md).
    let t3: Vec<_> = rows.iter().filter(|r| r.item == Item::Table3).collect();
    assert_eq!(t3[0].verdict, "reproduced", "{:?}", t3[0]);
    assert_eq!(t3[1].verdict, "reproduced", "{:?}", t3[1]);
    // Every trained row compares with dense and says so; one seed cannot give a tolerance.
    let t5: Vec<_> = rows.iter().filter(|r| r.item == Item::Table5).collect();
    assert_eq!(t5.len(), 7, "six variants and the headline");
    assert!(
        t5[1..6].iter().all(|r| r.verdict.contains("inconclusive")),
        "{t5:?}"
    );
    assert!(report.contains("Headline: UniMoD vs basic MoD"), "{report}");
    assert!(out.join("runs/report.md").exists() && out.join("analysis/report.md").exists());

    // Again: every run is reused (its metrics untouched), the report rewritten.
    let stamp = std::fs::metadata(out.join("runs/unimod-seed0/metrics.jsonl"))
        .unwrap()
        .modified()
        .unwrap();
    let again = reproduce::run(&Request {
        items: vec![Item::Table5],
        ..req
    })
    .unwrap();
    assert_eq!(again.len(), 7);
    let now = std::fs::metadata(out.join("runs/unimod-seed0/metrics.jsonl"))
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(now, stamp, "a finished run was trained again");
    assert!(
        Item::parse("table9")
            .unwrap_err()
            .to_string()
            .contains("table5")
    );
    let _ = std::fs::remove_dir_all(&root);
}
