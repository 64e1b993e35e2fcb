//! `train.backbone`: `unimod train` starting from a Hugging Face checkpoint — the tiny Phi
//! fixture made by `transformers` (crates/unimod-model/tests/fixtures/hf), given a word-level
//! `tokenizer.json` of the shapes world's words. Its own test binary, so its cache is its own.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use tch::Tensor;
use unimod_tok::dataset::Split;
use unimod_train::RunConfig;
use unimod_train::rundir::{self, Start};
use unimod_train::train::{self, RunContext};

/// The Phi fixture plus a word-level tokenizer of at most its 96 tokens: the most frequent
/// words of the world's captions, questions and answers, and `[UNK]`.
fn backbone(dir: &Path) {
    let fixture =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../unimod-model/tests/fixtures/hf/phi");
    std::fs::create_dir_all(dir).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture.join(f), dir.join(f)).unwrap();
    }
    let world = unimod_tok::shapes::ShapesConfig::default();
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..200 {
        let e = world.example(Split::Train, i);
        let texts = e.captions.iter().map(|c| c.text.clone()).chain(
            e.qa.iter()
                .flat_map(|q| [q.question.clone(), q.answer.clone()]),
        );
        for t in texts {
            let spaced: String = t
                .chars()
                .flat_map(|c| match c.is_alphanumeric() || c == ' ' {
                    true => vec![c],
                    false => vec![' ', c, ' '],
                })
                .collect();
            for w in spaced.split_whitespace() {
                *counts.entry(w.to_string()).or_default() += 1;
            }
        }
    }
    let mut words: Vec<(usize, String)> = counts.into_iter().map(|(w, n)| (n, w)).collect();
    words.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    let mut vocab = serde_json::Map::new();
    vocab.insert("[UNK]".into(), 0.into());
    for (i, (_, w)) in words.into_iter().take(95).enumerate() {
        vocab.insert(w, (i + 1).into());
    }
    let tokenizer = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": { "type": "Whitespace" },
        "post_processor": null, "decoder": null,
        "model": { "type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]" }
    });
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).unwrap();
}

fn config(backbone: &Path, extra: &[&str]) -> anyhow::Result<RunConfig> {
    let mut set: Vec<String> = [
        "format.text_len=16",
        "format.image_side=4",
        "data.train_pool=32",
        "data.val_pool=16",
        "tokenizer.image={ downsample = 3, steps = 10, channels = 8, codebook_size = 16, batch_size = 8, restart_every = 10 }",
        "train.steps=3",
        "train.warmup=1",
        "train.lr=1e-9",
        "train.min_lr=0.0",
        "train.weight_decay=0.0",
        "train.mix={ t2i = 2, mmu = 2, lm = 0 }",
        "eval={ val_batches = 1, t2i_samples = 2, mmu_samples = 4, sampling = { steps = 2 } }",
        "train.device=\"cpu\"",
        "model.routing.schedule={ kind = 'unimod', layers = [1], t2i = 0.5, mmu = 0.5 }",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    set.push(format!(
        "train.backbone={:?}",
        backbone.display().to_string()
    ));
    set.extend(extra.iter().map(|s| s.to_string()));
    RunConfig::load(None, &set)
}

#[test]
fn trains_from_a_hugging_face_backbone() {
    let root = std::env::temp_dir().join(format!("unimod-backbone-{}", std::process::id()));
    std::fs::create_dir_all(root.join("cache")).unwrap();
    // SAFETY: set before any thread of this test binary reads the environment.
    unsafe { std::env::set_var("UNIMOD_CACHE", root.join("cache")) };
    let dir: PathBuf = root.join("phi");
    backbone(&dir);

    let cfg = config(&dir, &[]).unwrap();
    let ctx = RunContext::new(&cfg, tch::Device::Cpu).unwrap();
    let cfg = ctx.resolve(&cfg).unwrap();
    // The backbone's architecture (d 32, 2 layers, Phi's block) with this config's routing,
    // and its 96 text rows after the 10 specials.
    let m = &cfg.model;
    assert_eq!((m.d_model, m.n_layers, m.d_ffn, m.n_heads), (32, 2, 80, 4));
    assert_eq!(m.block, unimod_model::BlockStyle::Parallel);
    assert_eq!((m.vocab.n_text, m.vocab.n_codes), (10 + 96, 16));
    assert!(matches!(
        m.routing.schedule,
        unimod_router::Schedule::Unimod { .. }
    ));
    // Its tokenizer, ids after the specials, round trip.
    let text = &ctx.tokenizers.text;
    let ids = text.encode("a red circle").unwrap();
    assert!(ids.iter().all(|&i| (10..106).contains(&i)), "{ids:?}");
    assert_eq!(text.decode(&ids).unwrap(), "a red circle");

    let run = root.join("run");
    let s = train::train(
        &ctx,
        &cfg,
        &run,
        Start::Fresh,
        Arc::new(AtomicBool::new(false)),
        None,
    )
    .unwrap();
    assert_eq!(s.steps, 3);
    // At a learning rate of 1e-9 the text rows are still the checkpoint's: the trainer loaded
    // them (row 10 + i is its row i).
    let ck = rundir::latest_checkpoint(&run).unwrap();
    let ours = unimod_model::checkpoint::load_tensors(&ck.join("model.safetensors")).unwrap();
    let theirs = unimod_model::checkpoint::load_tensors(&dir.join("model.safetensors")).unwrap();
    let (ours, theirs): (&Tensor, &Tensor) = (
        &ours.tensors["embed.weight"],
        &theirs.tensors["model.embed_tokens.weight"],
    );
    let diff = (ours.narrow(0, 10, 96) - theirs)
        .abs()
        .max()
        .double_value(&[]);
    assert!(diff < 1e-5, "text rows moved by {diff}");
    // The run reloads as any other (its config names the backbone, whose tokenizer it checks),
    // and answers a question through the backbone's tokenizer.
    let (saved, _, model) = unimod_train::load::run_from_checkpoint(&run, &ctx).unwrap();
    assert_eq!(saved.train.backbone.as_deref(), Some(dir.as_path()));
    let report = unimod_train::eval::evaluate(&ctx, &saved, &model, &run).unwrap();
    assert!(report.mmu_accuracy.is_finite() && report.val_loss.contains_key("mmu"));

    // Refusals: both starting points; Mixture-of-Transformers; a directory that is not one.
    let e = config(&dir, &["train.init_from=\"runs/x\""]).unwrap_err();
    assert!(format!("{e:#}").contains("train.init_from"), "{e:#}");
    let e = config(&dir, &["model.mot=true"]).unwrap_err();
    assert!(format!("{e:#}").contains("model.mot"), "{e:#}");
    let missing = config(&root.join("nowhere"), &[]).unwrap();
    let e = RunContext::new(&missing, tch::Device::Cpu).err().unwrap();
    assert!(format!("{e:#}").contains("train.backbone"), "{e:#}");
    std::fs::remove_dir_all(&root).ok();
}
