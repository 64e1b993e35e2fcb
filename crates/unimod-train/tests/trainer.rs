//! The trainer end to end on a miniature world: tokenizers, training, exact resume, bad
//! configs, evaluation. One test binary, so the cache it points at stays its own.

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use unimod_train::RunConfig;
use unimod_train::experiment::Reuse;
use unimod_train::rundir::{self, Start};
use unimod_train::train::{self, RunContext};

fn config(dir: &std::path::Path, extra: &[&str]) -> RunConfig {
    let mut set: Vec<String> = common::MINIATURE
        .iter()
        .chain(&[
            "train.mix={ t2i = 2, mmu = 2, lm = 1 }",
            "eval={ val_batches = 1, t2i_samples = 4, mmu_samples = 4, sampling = { steps = 2 } }",
            "model.routing.schedule={ kind = 'unimod', layers = [1], t2i = 0.5, mmu = 0.5 }",
        ])
        .map(|s| s.to_string())
        .collect();
    set.extend(extra.iter().map(|s| s.to_string()));
    let _ = dir;
    RunConfig::load(None, &set).unwrap()
}

fn losses(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            format!("{} {} {}", v["step"], v["loss"], v["grad_norm"])
        })
        .collect()
}

#[test]
fn trains_resumes_exactly_refuses_bad_configs_and_evaluates() {
    let root = std::env::temp_dir().join(format!("unimod-trainer-{}", std::process::id()));
    // MNIST and its judge come from the user's cache (`cargo xtask setup`), everything this
    // test trains goes into its own.
    let installed = unimod_tok::cache::data_dir();
    std::fs::create_dir_all(root.join("cache")).unwrap();
    std::os::unix::fs::symlink(&installed, root.join("cache/data")).unwrap();
    // SAFETY: set before any thread of this test binary reads the environment.
    unsafe { std::env::set_var("UNIMOD_CACHE", root.join("cache")) };
    let cfg = config(&root, &[]);
    let ctx = RunContext::new(&cfg, tch::Device::Cpu).unwrap();
    let cfg = ctx.resolve(&cfg).unwrap();
    let no_stop = || Arc::new(AtomicBool::new(false));

    let straight: PathBuf = root.join("straight");
    let s = train::train(&ctx, &cfg, &straight, Start::Fresh, no_stop(), None).unwrap();
    assert_eq!(s.steps, 6);
    assert!(s.train_flops > 0.0);

    let resumed = root.join("resumed");
    let first = train::train(&ctx, &cfg, &resumed, Start::Fresh, no_stop(), Some(3)).unwrap();
    assert!(first.interrupted && first.steps == 3);
    let second = train::train(&ctx, &cfg, &resumed, Start::Resume, no_stop(), None).unwrap();
    assert_eq!(second.steps, 6);
    assert_eq!(
        losses(&straight),
        losses(&resumed),
        "resumed run diverges from the uninterrupted one"
    );
    assert!(resumed.join("config.toml").exists());

    // Mixed precision (bf16 forward and backward, f32 master weights and moments): the losses
    // follow f32's within 5 % at every step, checkpoints keep f32 weights, and a resumed run
    // continues exactly.
    let mut bf16 = cfg.clone();
    bf16.train.precision = train::Precision::Bf16;
    let (bf_straight, bf_resumed) = (root.join("bf16"), root.join("bf16-resumed"));
    train::train(&ctx, &bf16, &bf_straight, Start::Fresh, no_stop(), None).unwrap();
    train::train(&ctx, &bf16, &bf_resumed, Start::Fresh, no_stop(), Some(3)).unwrap();
    train::train(&ctx, &bf16, &bf_resumed, Start::Resume, no_stop(), None).unwrap();
    assert_eq!(
        losses(&bf_straight),
        losses(&bf_resumed),
        "bf16 resume diverges"
    );
    let loss_of = |line: &String| line.split(' ').nth(1).unwrap().parse::<f64>().unwrap();
    for (f, b) in losses(&straight).iter().zip(&losses(&bf_straight)) {
        let (f, b) = (loss_of(f), loss_of(b));
        assert!((f - b).abs() < 0.05 * f, "f32 loss {f} vs bf16 {b}");
    }
    assert_ne!(
        losses(&straight),
        losses(&bf_straight),
        "bf16 computed in f32"
    );
    let ck = rundir::latest_checkpoint(&bf_straight).unwrap();
    let saved = unimod_model::checkpoint::load_tensors(&ck.join("model.safetensors")).unwrap();
    assert!(saved.tensors.values().all(|t| t.kind() == tch::Kind::Float));

    faults(&ctx, &cfg, &root, &straight);

    // Warm starts from `straight`: the same model, and Mixture-of-Transformers with each
    // modality's copy from its weights, compute the same first loss (tied copies are the
    // model); a model of another shape is refused, naming a parameter.
    let first_loss = |mot: bool, d_ffn: i64, name: &str| {
        let mut c = cfg.clone();
        c.model.mot = mot;
        c.model.d_ffn = d_ffn;
        c.train.init_from = Some(straight.clone());
        c.train.steps = 1;
        let dir = root.join(name);
        train::train(&ctx, &c, &dir, Start::Fresh, no_stop(), None).map(|_| {
            let line = losses(&dir).remove(0);
            line.split(' ').nth(1).unwrap().parse::<f64>().unwrap()
        })
    };
    let (same, untied) = (
        first_loss(false, 64, "warm").unwrap(),
        first_loss(true, 64, "warm-mot").unwrap(),
    );
    assert!((same - untied).abs() < 1e-4 * same, "{same} vs {untied}");
    let e = first_loss(false, 96, "warm-other").unwrap_err();
    assert!(
        format!("{e:#}").contains("no weights of this shape"),
        "{e:#}"
    );

    // A checkpoint of another config is refused, naming the difference.
    let mut other = cfg.clone();
    other.model.d_ffn = 128;
    let e = train::train(&ctx, &other, &resumed, Start::Resume, no_stop(), None).unwrap_err();
    assert!(format!("{e:#}").contains("d_ffn"), "{e:#}");

    // A truncated checkpoint is refused.
    let good = rundir::latest_checkpoint(&straight).unwrap();
    let ck = good.join("model.safetensors");
    let bytes = std::fs::read(&ck).unwrap();
    let broken = root.join("broken");
    std::fs::create_dir_all(broken.join("checkpoints/step-6")).unwrap();
    std::fs::write(broken.join("checkpoints/latest"), "step-6").unwrap();
    std::fs::write(
        broken.join("checkpoints/step-6/model.safetensors"),
        &bytes[..bytes.len() / 3],
    )
    .unwrap();
    std::fs::copy(
        good.join(rundir::TOKENIZERS_FILE),
        broken
            .join("checkpoints/step-6")
            .join(rundir::TOKENIZERS_FILE),
    )
    .unwrap();
    let e = train::train(&ctx, &cfg, &broken, Start::Resume, no_stop(), None).unwrap_err();
    assert!(format!("{e:#}").contains("truncated or corrupt"), "{e:#}");

    // A checkpoint trained with other tokenizers is refused, for resuming and for loading.
    let ck = rundir::latest_checkpoint(&resumed).unwrap();
    std::fs::write(ck.join(rundir::TOKENIZERS_FILE), "0123456789abcdef").unwrap();
    for e in [
        train::train(&ctx, &cfg, &resumed, Start::Resume, no_stop(), None).unwrap_err(),
        unimod_train::load::model_from_run(&resumed, &ctx)
            .err()
            .unwrap(),
    ] {
        assert!(
            format!("{e:#}").contains("trained with tokenizers 0123456789abcdef"),
            "{e:#}"
        );
    }

    // Bad configs name the field.
    let e = RunConfig::load(None, &["train.stepz=3".into()]).unwrap_err();
    assert!(format!("{e:#}").contains("stepz"), "{e:#}");
    let zero_mmu = config(&root, &["train.mix={ t2i = 2, mmu = 0, lm = 0 }"]);
    let e = ctx.resolve(&zero_mmu).unwrap_err();
    assert!(format!("{e:#}").contains("train.mix.mmu = 0"), "{e:#}");

    // Evaluation runs every metric and writes samples.
    let (_vs, model) = unimod_train::load::model_from_run(&straight, &ctx).unwrap();
    let r = unimod_train::eval::evaluate(&ctx, &cfg, &model, &straight).unwrap();
    assert!(r.val_loss.contains_key("t2i") && r.val_loss.contains_key("mmu"));
    assert!((0.0..=1.0).contains(&r.t2i_overall) && (0.0..=1.0).contains(&r.mmu_accuracy));
    assert!(r.predictor_agreement.is_some());
    assert!(straight.join("t2i-samples.png").exists());

    // The experiment's variants benchmark side by side: a dense reference first, routed
    // variants doing less work, variants that need a checkpoint or their own mix named.
    let exp = config(
        &root,
        &[
            "experiment.variants=[{ name = 'unimod', schedule = { kind = 'unimod', layers = [1], t2i = 0.25, mmu = 0.25 }, routable = ['prompt', 'image', 'answer'] }, \
             { name = 'from-arank', arank_of = 'unimod' }, \
             { name = 't2i-only', schedule = { kind = 'dense' }, mix = { t2i = 2, mmu = 0, lm = 0 } }, \
             { name = 'dense-equal', schedule = { kind = 'dense' }, flops_of = 'unimod' }]",
        ],
    );
    let (_, vs, skipped) = unimod_train::experiment::bench_variants(&ctx, &exp).unwrap();
    let names: Vec<&str> = vs.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(names, ["dense", "unimod"]);
    assert!(vs[1].train_flops < vs[0].train_flops);
    assert_eq!(skipped, ["from-arank", "t2i-only", "dense-equal"]);

    // The FLOPs predicted over real (padded, mixed) batches are the FLOPs a forward counts.
    let (_vs, routed) = train::build_model(&cfg, tch::Device::Cpu).unwrap();
    let batches: Vec<_> = (0..3)
        .map(|s| {
            ctx.batch(&cfg, unimod_tok::dataset::Split::Train, s, true)
                .unwrap()
        })
        .collect();
    // Each batch's FLOPs as counted, and the tokens its layers computed (its step's shapes).
    let (mut counted, mut shapes) = (0.0, std::collections::HashSet::new());
    for b in &batches {
        let out = routed
            .forward(b, &unimod_model::ForwardOptions::default())
            .unwrap();
        let n = (b.size() as i64 * b.seq_len()) as f64;
        counted += unimod_model::flops::forward(&cfg.model, &out.work, n).total();
        shapes.insert(out.work.iter().map(|w| w.tokens as u64).collect::<Vec<_>>());
    }
    let predicted =
        unimod_train::flops_report::over_batches(&cfg, &cfg.model.routing.schedule, &batches)
            .unwrap();
    assert!(predicted.padding > 0.0, "the test batches have no padding");
    assert!(
        (predicted.routed.total() - counted).abs() <= 1e-9 * counted,
        "predicted {} vs counted {counted}",
        predicted.routed.total()
    );
    // The tokens computed follow from the gather widths, so there are no more shapes than
    // width signatures; a dense model's step has one shape.
    assert!(
        (1..=batches.len()).contains(&predicted.width_signatures)
            && predicted.width_signatures >= shapes.len(),
        "{} signatures, {} shapes",
        predicted.width_signatures,
        shapes.len()
    );
    let dense =
        unimod_train::flops_report::over_batches(&cfg, &unimod_router::Schedule::Dense, &batches)
            .unwrap();
    assert_eq!(dense.width_signatures, 1);

    let t = train::data_throughput(&ctx, &cfg, 3, 1).unwrap();
    assert!(t.batches_per_s > 0.0 && t.steps_per_s > 0.0);
    assert!((t.headroom - t.batches_per_s / t.steps_per_s).abs() < 1e-9 * t.headroom.max(1.0));

    // Every analysis runs on a dense checkpoint, the competition probe on a shared router, and
    // the ARank schedule file drives a model.
    let trained = |schedule: &str, name: &str| {
        let c = config(
            &root,
            &[
                &format!("model.routing.schedule={schedule}"),
                "train.steps=2",
                "model.n_layers=3",
                "analysis={ samples = 4, fractions = [1.0, 0.5], per_head = true }",
            ],
        );
        let c = ctx.resolve(&c).unwrap();
        let dir = root.join(name);
        train::train(&ctx, &c, &dir, Start::Fresh, no_stop(), None).unwrap();
        let (vs, model) = unimod_train::load::model_from_run(&dir, &ctx).unwrap();
        (c, dir, vs, model)
    };
    let (dense_cfg, dense_dir, dense_vs, dense) = trained("{ kind = 'dense' }", "dense");
    let (probe_cfg, _, _probe_vs, probe) = trained("{ kind = 'mod', capacity = 0.5 }", "mod");
    let out = dense_dir.join("analysis");
    std::fs::create_dir_all(&out).unwrap();
    let a = unimod_train::analyze::Analyzer {
        ctx: &ctx,
        cfg: &dense_cfg,
        model: &dense,
        vs: &dense_vs,
        out: out.clone(),
    };
    let (report, found) =
        unimod_train::analyze::all(&a, Some((&probe, &ctx, &probe_cfg)), &dense_dir).unwrap();
    let text = std::fs::read_to_string(report).unwrap();
    // Every finding has a verdict, the attention one included.
    assert!(found.iter().all(|f| !f.verdict.is_empty()));
    assert!(
        found
            .iter()
            .any(|f| f.source == unimod_train::analyze::Source::Attention)
    );
    for needle in [
        "## Findings",
        "Task-dependent attention",
        "Later layers more redundant",
        "Task-dependent redundancy, by loss",
        "Later layers more redundant, mmu, by loss",
        "| head |",
        "it keeps",
        "## ARank schedule",
    ] {
        assert!(text.contains(needle), "report lacks {needle}");
    }
    for f in [
        "attention.json",
        "importance.json",
        "redundancy.json",
        "competition.json",
        "arank.png",
    ] {
        assert!(out.join(f).exists(), "{f} missing");
    }
    // The arrays beside the JSON hold the same numbers, in the documented axes
    // (docs/analysis.md).
    let npy = |f: &str| -> ndarray::ArrayD<f64> { ndarray_npy::read_npy(out.join(f)).unwrap() };
    let imp: Vec<unimod_analysis::importance::Importance> =
        serde_json::from_str(&std::fs::read_to_string(out.join("importance.json")).unwrap())
            .unwrap();
    let arank = npy("arank.npy");
    assert_eq!(arank.shape(), [2, 3]);
    for (t, i) in imp.iter().enumerate() {
        for (l, layer) in i.layers.iter().enumerate() {
            // serde_json parses floats to within an ulp, not always exactly.
            let close = |a: f64, b: f64| (a - b).abs() <= 1e-12 * b.abs().max(1.0);
            assert!(close(arank[[t, l]], layer.arank.unwrap().mean));
            assert!(close(
                npy("skip-loss.npy")[[t, l]],
                layer.skip_loss - i.loss
            ));
        }
    }
    for (f, shape) in [
        ("attention-share.npy", vec![2, 3, 3]),
        ("attention-share-heads.npy", vec![2, 3, 2, 3]),
        ("redundancy.npy", vec![2, 2, 3, 2]),
        ("gradient-cosine.npy", vec![3]),
        ("competition.npy", vec![1, 2, 2]),
    ] {
        assert_eq!(npy(f).shape(), shape.as_slice(), "{f}");
    }
    let share = npy("attention-share.npy");
    for t in 0..2 {
        let total: f64 = (0..3).map(|m| share[[t, 0, m]]).sum();
        assert!(
            (total - 1.0).abs() < 1e-4,
            "attention shares sum to {total}"
        );
    }
    let schedule = format!(
        "{{ kind = 'file', path = '{}' }}",
        out.join("schedule.json").display()
    );
    let (_, _, _, from_file) = trained(&schedule, "arank");
    assert!(
        from_file
            .plans
            .iter()
            .any(|p| matches!(p, unimod_router::LayerPlan::Routed { .. }))
    );
    // The attention analyses refuse a routed checkpoint.
    let routed = unimod_train::analyze::Analyzer {
        model: &probe,
        cfg: &probe_cfg,
        ..a
    };
    assert!(format!("{:#}", routed.attention().unwrap_err()).contains("is routed"));

    // An experiment with a task-only variant (Table 2) and a schedule derived from the dense
    // variant's ARank; variants that name no schedule or a later base are refused up front.
    let variants = |v: &str| {
        config(
            &root,
            &[
                "train.steps=2",
                "analysis={ samples = 4, fractions = [1.0, 0.5] }",
                &format!(
                    "experiment={{ name = 'exp', out_dir = '{}', variants = [{v}] }}",
                    root.display()
                ),
            ],
        )
    };
    let exp = variants(
        "{ name = 'dense', schedule = { kind = 'dense' } }, \
         { name = 't2i-only', schedule = { kind = 'dense' }, mix = { t2i = 4, mmu = 0, lm = 0 } }, \
         { name = 'arank', arank_of = 'dense' }, \
         { name = 'mot', schedule = { kind = 'dense' }, set = ['model.mot=true'] }, \
         { name = 'mod', schedule = { kind = 'mod', capacity = 0.25 }, flops_of = 'dense' }",
    );
    let outcomes = unimod_train::experiment::run(&exp, 1, tch::Device::Cpu, Reuse::Never).unwrap();
    assert_eq!(outcomes.len(), 5);
    // The equal-compute variant takes more steps than train.steps, as many as spend dense's
    // counted FLOPs: the prediction is what the trainer counts, and no other step count comes
    // nearer to dense's.
    let (dense, routed) = (&outcomes[0], &outcomes[4]);
    assert!(routed.train.steps > 2, "{:?}", routed.train);
    let routed_cfg = RunConfig::load(Some(&root.join("exp/mod-seed0/config.toml")), &[]).unwrap();
    let exp_ctx = RunContext::new(&routed_cfg, tch::Device::Cpu).unwrap();
    let spend = |cfg: &RunConfig, flops: f64| {
        unimod_train::experiment::steps_for_flops(&exp_ctx, cfg, flops).unwrap()
    };
    let (steps, predicted) = spend(&routed_cfg, dense.train.train_flops);
    assert_eq!(steps, routed.train.steps);
    assert!(
        (predicted / routed.train.train_flops - 1.0).abs() < 1e-9,
        "predicted {predicted:e} vs counted {:e}",
        routed.train.train_flops
    );
    let miss = |n: usize| {
        let f: f64 = (0..n)
            .map(|s| unimod_train::experiment::step_flops(&exp_ctx, &routed_cfg, s).unwrap())
            .sum();
        (f - dense.train.train_flops).abs()
    };
    assert!(miss(steps) <= miss(steps - 1) && miss(steps) <= miss(steps + 1));
    let dense_cfg = RunConfig::load(Some(&root.join("exp/dense-seed0/config.toml")), &[]).unwrap();
    let (dense_steps, dense_predicted) = spend(&dense_cfg, dense.train.train_flops);
    assert_eq!(dense_steps, 2);
    assert!((dense_predicted / dense.train.train_flops - 1.0).abs() < 1e-9);
    let mot = std::fs::read_to_string(root.join("exp/mot-seed0/config.toml")).unwrap();
    assert!(mot.contains("mot = true"), "{mot}");
    let exp_dir = root.join("exp");
    let t2i_only = std::fs::read_to_string(exp_dir.join("t2i-only-seed0/config.toml")).unwrap();
    assert!(t2i_only.contains("mmu = 0"), "{t2i_only}");
    assert!(exp_dir.join("arank-seed0/arank/schedule.json").exists());
    let arank_cfg = std::fs::read_to_string(exp_dir.join("arank-seed0/config.toml")).unwrap();
    assert!(arank_cfg.contains("kind = \"file\""), "{arank_cfg}");
    let report = std::fs::read_to_string(exp_dir.join("report.md")).unwrap();
    assert!(report.contains("t2i-only: batch t2i 4 : mmu 0"), "{report}");
    // Run again: finished runs of the same config and program are reused, not retrained; a
    // changed config trains again.
    let stamp = |v: &str| {
        std::fs::metadata(exp_dir.join(format!("{v}-seed0/metrics.jsonl")))
            .unwrap()
            .modified()
            .unwrap()
    };
    let before = stamp("dense");
    let again = unimod_train::experiment::run(&exp, 1, tch::Device::Cpu, Reuse::Finished).unwrap();
    assert_eq!(stamp("dense"), before, "a finished run was trained again");
    let accuracies = |o: &[unimod_train::experiment::Outcome]| {
        o.iter().map(|o| o.eval.mmu_accuracy).collect::<Vec<_>>()
    };
    assert_eq!(accuracies(&again), accuracies(&outcomes));
    // Other [eval] settings evaluate the same models again, beside their own evaluation (kept),
    // without training them again; a second run with those settings reuses that evaluation,
    // and the original settings find the run's own again.
    let modified = |p: PathBuf| std::fs::metadata(p).unwrap().modified().unwrap();
    let own_eval = exp_dir.join("dense-seed0/eval.json");
    let own_stamp = modified(own_eval.clone());
    let mut rescored = exp.clone();
    rescored.eval.mmu_samples += 8;
    let re =
        unimod_train::experiment::run(&rescored, 1, tch::Device::Cpu, Reuse::Finished).unwrap();
    assert_eq!(
        stamp("dense"),
        before,
        "a model was trained again for new [eval] settings"
    );
    assert_eq!(
        modified(own_eval.clone()),
        own_stamp,
        "the run's own evaluation was replaced"
    );
    let evals: Vec<PathBuf> = std::fs::read_dir(exp_dir.join("dense-seed0/evals"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(evals.len(), 1, "{evals:?}");
    let settings = std::fs::read_to_string(evals[0].join("eval.toml")).unwrap();
    assert!(
        settings.contains(&format!("mmu_samples = {}", rescored.eval.mmu_samples)),
        "{settings}"
    );
    let saved: unimod_train::experiment::Outcome =
        serde_json::from_str(&std::fs::read_to_string(evals[0].join("outcome.json")).unwrap())
            .unwrap();
    assert_eq!(saved.eval.mmu_accuracy, re[0].eval.mmu_accuracy);
    assert_eq!(saved.train.steps, outcomes[0].train.steps);
    assert_ne!(saved.digest, outcomes[0].digest);
    let rescore_stamp = modified(evals[0].join("eval.json"));
    unimod_train::experiment::run(&rescored, 1, tch::Device::Cpu, Reuse::Finished).unwrap();
    assert_eq!(
        modified(evals[0].join("eval.json")),
        rescore_stamp,
        "evaluated again"
    );
    let back = unimod_train::experiment::run(&exp, 1, tch::Device::Cpu, Reuse::Finished).unwrap();
    assert_eq!(accuracies(&back), accuracies(&outcomes));
    assert_eq!(modified(own_eval), own_stamp);
    // A run another build of the program made (its digest differs) is reused only when asked,
    // and the report names it.
    let outcome_path = exp_dir.join("dense-seed0/outcome.json");
    let mut o: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&outcome_path).unwrap()).unwrap();
    o["digest"] = "made-by-another-build".into();
    o["train_digest"] = "made-by-another-build".into();
    o["machine"] = "a machine elsewhere".into();
    // Copied in from an experiment where the variant had another name: it counts as this one.
    o["variant"] = "named-otherwise".into();
    std::fs::write(&outcome_path, o.to_string()).unwrap();
    let copied =
        unimod_train::experiment::run(&exp, 1, tch::Device::Cpu, Reuse::SameConfig).unwrap();
    assert_eq!(copied[0].variant, "dense");
    assert_eq!(
        stamp("dense"),
        before,
        "a run of the same config was trained again"
    );
    let report = std::fs::read_to_string(exp_dir.join("report.md")).unwrap();
    let reused = report
        .lines()
        .find(|l| l.starts_with("Reused from another build of the program"))
        .unwrap_or_else(|| panic!("{report}"));
    assert!(
        reused.ends_with(": dense (seed 0, made on a machine elsewhere)."),
        "{reused}"
    );
    let here = unimod_train::device::machine(tch::Device::Cpu);
    assert!(report.contains(&format!("Computed on {here};")), "{report}");
    // Its model under new [eval] settings is evaluated again, not the evaluation left in
    // evals/ by the model it replaced (another training), and the report still names it.
    let stale = modified(evals[0].join("eval.json"));
    unimod_train::experiment::run(&rescored, 1, tch::Device::Cpu, Reuse::SameConfig).unwrap();
    assert_eq!(
        stamp("dense"),
        before,
        "a model was trained again for new [eval] settings"
    );
    assert_ne!(
        modified(evals[0].join("eval.json")),
        stale,
        "another model's evaluation reused"
    );
    let report = std::fs::read_to_string(exp_dir.join("report.md")).unwrap();
    assert!(
        report.contains("dense (seed 0, made on a machine elsewhere)"),
        "{report}"
    );
    let mut changed = exp.clone();
    changed.train.lr *= 0.5;
    unimod_train::experiment::run(&changed, 1, tch::Device::Cpu, Reuse::SameConfig).unwrap();
    assert_ne!(stamp("dense"), before, "a run of another config was reused");
    assert!(
        report.contains("- **arank**: ")
            && report.contains("MMU accuracy")
            && report.contains("tolerance"),
        "{report}"
    );
    for (bad, needle) in [
        (
            "{ name = 'a', arank_of = 'b' }, { name = 'b', schedule = { kind = 'dense' } }",
            "names no earlier variant",
        ),
        ("{ name = 'a' }", "exactly one of"),
        (
            "{ name = 'a', schedule = { kind = 'dense' }, set = ['experiment.name=\"b\"'] }",
            "cannot change the experiment",
        ),
        (
            "{ name = 'a', schedule = { kind = 'dense' } }, { name = 'a', schedule = { kind = 'dense' } }",
            "used twice",
        ),
        (
            "{ name = 'a', schedule = { kind = 'dense' }, flops_of = 'b' }, { name = 'b', schedule = { kind = 'dense' } }",
            "flops_of = \"b\" names no earlier variant",
        ),
    ] {
        let e = unimod_train::experiment::run(&variants(bad), 1, tch::Device::Cpu, Reuse::Never)
            .unwrap_err();
        assert!(format!("{e:#}").contains(needle), "{e:#}");
    }

    // MNIST end to end: its own tokenizers, judged by the ccexam CNN, Fréchet distance reported.
    let mnist = config(&root, &["data.dataset=\"mnist\"", "train.steps=2"]);
    let mnist_ctx = RunContext::new(&mnist, tch::Device::Cpu).unwrap();
    assert!(
        mnist_ctx.tokenizers.report.judge_clean >= 0.98,
        "{:?}",
        mnist_ctx.tokenizers.report
    );
    let mnist = mnist_ctx.resolve(&mnist).unwrap();
    let mnist_dir = root.join("mnist");
    train::train(
        &mnist_ctx,
        &mnist,
        &mnist_dir,
        Start::Fresh,
        no_stop(),
        None,
    )
    .unwrap();
    let (_vs, model) = unimod_train::load::model_from_run(&mnist_dir, &mnist_ctx).unwrap();
    let r = unimod_train::eval::evaluate(&mnist_ctx, &mnist, &model, &mnist_dir).unwrap();
    assert!(r.t2i_frechet.is_some_and(f64::is_finite), "{r:?}");
    assert!(r.t2i_per_category.contains_key("digit"), "{r:?}");
    assert!(r.mmu_per_kind.contains_key("digit"), "{r:?}");
    std::fs::remove_dir_all(root).unwrap();
}

/// The data-loss faults: an existing run is never replaced by accident, a run that diverges
/// never saves non-finite weights over good ones, and a resume refuses a checkpoint that
/// disagrees with itself or a config that would make it another run.
fn faults(ctx: &RunContext, cfg: &RunConfig, root: &std::path::Path, finished: &std::path::Path) {
    let no_stop = || Arc::new(AtomicBool::new(false));
    let snapshot = |d: &std::path::Path| {
        (
            std::fs::read(d.join("metrics.jsonl")).unwrap(),
            std::fs::read(d.join("config.toml")).unwrap(),
            rundir::latest_checkpoint(d).unwrap(),
        )
    };
    let before = snapshot(finished);
    let e = train::train(ctx, cfg, finished, Start::Fresh, no_stop(), None).unwrap_err();
    assert!(format!("{e:#}").contains("--resume"), "{e:#}");
    // A refused resume (another seed) writes nothing either.
    let mut other_seed = cfg.clone();
    other_seed.train.seed += 1;
    let e = train::train(ctx, &other_seed, finished, Start::Resume, no_stop(), None).unwrap_err();
    assert!(format!("{e:#}").contains("train.seed: 0 → 1"), "{e:#}");
    let mut fewer = cfg.clone();
    fewer.train.steps = 3;
    let e = train::train(ctx, &fewer, finished, Start::Resume, no_stop(), None).unwrap_err();
    assert!(
        format!("{e:#}").contains("below the checkpoint's step 6"),
        "{e:#}"
    );
    assert_eq!(
        snapshot(finished),
        before,
        "a refused start changed the run"
    );
    // Resuming a finished run with a new learning rate is accepted and saves nothing new.
    let mut new_lr = cfg.clone();
    new_lr.train.lr *= 0.5;
    train::train(ctx, &new_lr, finished, Start::Resume, no_stop(), None).unwrap();
    assert_eq!(rundir::latest_checkpoint(finished).unwrap(), before.2);

    // Divergence: weights that an update turns non-finite are never saved over good ones. The
    // optimizer's first moments of a 3-step checkpoint are set near f32's largest value, so the
    // next update overflows.
    let diverged = root.join("diverged");
    let mut every = cfg.clone();
    every.train.checkpoint_every = 1;
    train::train(ctx, &every, &diverged, Start::Fresh, no_stop(), Some(3)).unwrap();
    let opt_path = rundir::latest_checkpoint(&diverged)
        .unwrap()
        .join("optimizer.safetensors");
    let loaded = unimod_model::checkpoint::load_tensors(&opt_path).unwrap();
    let poisoned: Vec<(String, tch::Tensor)> = loaded
        .tensors
        .iter()
        .map(|(k, t)| {
            let t = if k.starts_with("m.") {
                t.ones_like() * 3e38
            } else {
                t.zeros_like()
            };
            (k.clone(), t)
        })
        .collect();
    unimod_model::checkpoint::save_tensors(&opt_path, &poisoned, Default::default()).unwrap();
    let e = train::train(ctx, &every, &diverged, Start::Resume, no_stop(), None).unwrap_err();
    let msg = format!("{e:#}");
    assert!(
        msg.contains("non-finite") && msg.contains("step 3"),
        "{msg}"
    );
    let kept = rundir::latest_checkpoint(&diverged).unwrap();
    assert!(kept.ends_with("step-3"), "{}", kept.display());
    unimod_train::load::model_from_run(&diverged, ctx)
        .unwrap_or_else(|e| panic!("the kept checkpoint does not load: {e:#}"));

    // A checkpoint whose state disagrees with its folder, or without its tokenizer record.
    let copy = root.join("inconsistent");
    let ck = rundir::latest_checkpoint(finished).unwrap();
    let name = ck.file_name().unwrap();
    std::fs::create_dir_all(copy.join("checkpoints")).unwrap();
    std::fs::write(copy.join("checkpoints/latest"), name.as_encoded_bytes()).unwrap();
    let dst = copy.join("checkpoints").join(name);
    std::fs::create_dir_all(&dst).unwrap();
    for f in std::fs::read_dir(&ck).unwrap().flatten() {
        std::fs::copy(f.path(), dst.join(f.file_name())).unwrap();
    }
    let state = std::fs::read_to_string(dst.join("state.json")).unwrap();
    std::fs::write(
        dst.join("state.json"),
        state.replace("\"step\":6", "\"step\":5"),
    )
    .unwrap();
    let e = train::train(ctx, cfg, &copy, Start::Resume, no_stop(), None).unwrap_err();
    assert!(format!("{e:#}").contains("disagrees with itself"), "{e:#}");
    std::fs::write(dst.join("state.json"), state).unwrap();
    std::fs::remove_file(dst.join(rundir::TOKENIZERS_FILE)).unwrap();
    let e = train::train(ctx, cfg, &copy, Start::Resume, no_stop(), None).unwrap_err();
    assert!(format!("{e:#}").contains("tokenizers.txt"), "{e:#}");
}
