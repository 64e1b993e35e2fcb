//! The equivalences the framework stands on: a routed layer at capacity 1 is the dense layer,
//! cached decoding is the full forward, a task's tokens answer only to its own router, and a
//! checkpoint round-trip changes nothing.

use tch::{Device, Kind, Tensor, nn::VarStore};
use unimod_model::generate::GuidanceSchedule;
use unimod_model::{
    ForwardOptions, KvCache, ModelConfig, UnifiedTransformer, checkpoint, flops, generate,
};
use unimod_router::{Capacities, LayerPlan, Routers, RoutingMode, Schedule};
use unimod_tok::{Batch, Flavour, FormatConfig, Segment, Sequence, Task, VocabLayout};

const VOCAB: VocabLayout = VocabLayout {
    n_text: 40,
    n_codes: 16,
};

fn config(flavour: Flavour, schedule: Schedule) -> ModelConfig {
    let mut c = ModelConfig {
        flavour,
        vocab: VOCAB,
        d_model: 32,
        n_layers: 3,
        n_heads: 4,
        n_kv_heads: 2,
        d_ffn: 64,
        ..Default::default()
    };
    c.routing.schedule = schedule;
    c
}

fn routed_everywhere(capacity: Capacities, n: usize) -> Schedule {
    Schedule::Explicit {
        layers: vec![
            LayerPlan::Routed {
                capacity,
                routers: Routers::PerTask
            };
            n
        ],
    }
}

/// A model initialised under `seed`. Two builds under one seed need not be equal when tests run
/// on several threads (libtorch's generator is shared): tests that compare models copy weights
/// across ([`align`]) instead.
fn build(cfg: &ModelConfig, seed: i64) -> (VarStore, UnifiedTransformer) {
    tch::manual_seed(seed);
    let vs = VarStore::new(Device::Cpu);
    let m = UnifiedTransformer::new(&vs.root(), cfg).unwrap();
    (vs, m)
}

fn format(flavour: Flavour) -> FormatConfig {
    FormatConfig {
        flavour,
        text_len: 8,
        image_side: 2,
        cond_dropout: 0.0,
        mmu_turns: 1,
    }
}

/// A T2I and an MMU sequence; with `full_text`, no padding anywhere.
fn sequences(flavour: Flavour, full_text: bool) -> Vec<Sequence> {
    let f = format(flavour);
    let prompt: Vec<i64> = if full_text {
        vec![11, 12, 13, 14, 15, 16]
    } else {
        vec![11, 12]
    };
    let (question, answer): (Vec<i64>, Vec<i64>) = if full_text {
        (vec![20, 21, 22, 23], vec![24, 25])
    } else {
        (vec![20, 21], vec![24])
    };
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(3);
    vec![
        f.t2i(&VOCAB, &prompt, Some(&[1, 5, 9, 2]), Some(&mut rng))
            .unwrap(),
        f.mmu(&VOCAB, &[3, 4, 7, 8], &question, Some(&answer))
            .unwrap(),
    ]
}

fn batch(seqs: &[Sequence]) -> Batch {
    Batch::from_sequences(seqs, Device::Cpu).unwrap()
}

/// Copies the weights `dense` shares with `routed` into it and makes every router weight
/// sigmoid(30) = 1.0 in f32, so the routed layer's output is the dense layer's.
fn align(dense: &VarStore, routed: &mut VarStore) {
    let d = dense.variables();
    tch::no_grad(|| {
        for (name, mut v) in routed.variables() {
            match d.get(&name) {
                Some(src) => {
                    v.copy_(src);
                }
                None if name.contains("router") && name.ends_with("proj.bias") => {
                    let _ = v.fill_(30.0);
                }
                None => {}
            }
        }
    });
}

#[test]
fn capacity_one_equals_dense_exactly() {
    for flavour in [Flavour::Showo, Flavour::Emu3] {
        let dense_cfg = config(flavour, Schedule::Dense);
        let mut routed_cfg = config(flavour, routed_everywhere(Capacities::all(1.0), 3));
        routed_cfg.routing.aux_loss = 0.0;
        routed_cfg.routing.causal_predictor = false;
        routed_cfg.routing.causal_mode = RoutingMode::ThresholdRouter;
        let (vs_d, dense) = build(&dense_cfg, 0);
        let (mut vs_r, routed) = build(&routed_cfg, 1);
        align(&vs_d, &mut vs_r);
        let b = batch(&sequences(flavour, true));
        let opts = ForwardOptions::default();
        let (od, or) = (
            dense.forward(&b, &opts).unwrap(),
            routed.forward(&b, &opts).unwrap(),
        );
        assert!(od.logits.equal(&or.logits), "{flavour:?}: logits differ");
        dense.losses(&b, &od).total.backward();
        routed.losses(&b, &or).total.backward();
        let rv = vs_r.variables();
        for (name, v) in vs_d.variables() {
            let (gd, gr) = (v.grad(), rv[&name].grad());
            assert!(
                gd.allclose(&gr, 1e-6, 1e-7, false),
                "{flavour:?}: gradient of {name} differs"
            );
        }
    }
}

#[test]
fn capacity_one_equals_dense_on_padded_batches() {
    let dense_cfg = config(Flavour::Showo, Schedule::Dense);
    let routed_cfg = config(Flavour::Showo, routed_everywhere(Capacities::all(1.0), 3));
    let (vs_d, dense) = build(&dense_cfg, 0);
    let (mut vs_r, routed) = build(&routed_cfg, 1);
    align(&vs_d, &mut vs_r);
    let b = batch(&sequences(Flavour::Showo, false));
    let opts = ForwardOptions::default();
    let valid = b.valid().unsqueeze(-1);
    let (ld, lr) = (
        dense.forward(&b, &opts).unwrap().logits * &valid,
        routed.forward(&b, &opts).unwrap().logits * &valid,
    );
    assert!(
        ld.allclose(&lr, 1e-5, 1e-5, false),
        "max diff {}",
        (ld - lr).abs().max().double_value(&[])
    );
}

/// Prefill `prefix` tokens, then decode the rest one token at a time; compare with the full
/// forward at every decoded position.
fn check_cached(model: &UnifiedTransformer, seqs: &[Sequence], prefix: usize, mode: RoutingMode) {
    let opts = ForwardOptions {
        mode,
        ..Default::default()
    };
    let full = model.forward(&batch(seqs), &opts).unwrap().logits;
    let mut cache = KvCache::default();
    let first: Vec<Sequence> = seqs.iter().map(|s| s.slice(0..prefix)).collect();
    let b = batch(&first);
    let mut end = b.end.clone();
    let out = model.forward_cached(&b, &opts, &mut cache).unwrap();
    let mut pieces = vec![out.logits];
    for i in prefix..seqs[0].len() {
        let step: Vec<Sequence> = seqs.iter().map(|s| s.slice(i..i + 1)).collect();
        let b = Batch::continuing(&step, Some(&end), Device::Cpu).unwrap();
        end = b.end.clone();
        pieces.push(model.forward_cached(&b, &opts, &mut cache).unwrap().logits);
    }
    let cached = Tensor::cat(&pieces, 1);
    let valid = batch(seqs).valid().unsqueeze(-1);
    let (a, b) = (
        (full * &valid).narrow(1, prefix as i64, (seqs[0].len() - prefix) as i64),
        (cached * &valid).narrow(1, prefix as i64, (seqs[0].len() - prefix) as i64),
    );
    assert!(
        a.allclose(&b, 1e-4, 1e-5, false),
        "cached decoding differs: {}",
        (a - b).abs().max().double_value(&[])
    );
}

/// Guided greedy decoding with the KV cache picks, at every step, the argmax of
/// (1 + w)·cond − w·uncond computed by full forwards of the sequences decoded so far.
#[test]
fn guided_decoding_equals_guided_full_forward() {
    let (_vs, model) = build(&config(Flavour::Emu3, Schedule::Dense), 4);
    let f = format(Flavour::Emu3);
    let cond: Vec<Sequence> = [vec![11, 12, 13], vec![14]]
        .iter()
        .map(|p| f.t2i_prefix(&VOCAB, p).unwrap())
        .collect();
    let uncond: Vec<Sequence> = cond
        .iter()
        .map(|_| f.t2i_prefix(&VOCAB, &[]).unwrap())
        .collect();
    let grammar = generate::image_grammar(&VOCAB, 2);
    let w = 2.0;
    let mut unguided_differs = false;
    for schedule in [
        GuidanceSchedule::Constant,
        GuidanceSchedule::Increasing,
        GuidanceSchedule::Decreasing,
    ] {
        let decoded = generate::autoregressive(
            &model,
            &cond,
            &generate::Decoding {
                max_new: 6,
                segment: Segment::Image,
                allowed: &grammar,
                stop: None,
                temperature: 0.0,
                mode: RoutingMode::TopK,
                cache: true,
                guidance: Some((&uncond, w)),
                guidance_schedule: schedule,
            },
            Device::Cpu,
        )
        .unwrap();
        let extend = |s: &Sequence, toks: &[i64]| {
            let mut s = s.clone();
            for t in toks {
                s.attn_upto.push(s.tokens.len() as i64);
                s.tokens.push(*t);
                s.labels.push(unimod_tok::IGNORE);
                s.segments.push(Segment::Image);
            }
            s
        };
        for (i, toks) in decoded.iter().enumerate() {
            assert_eq!(toks.len(), 6);
            for k in 0..toks.len() {
                let rows = [extend(&cond[i], &toks[..k]), extend(&uncond[i], &toks[..k])];
                let logits = tch::no_grad(|| {
                    model
                        .forward(&batch(&rows), &Default::default())
                        .unwrap()
                        .logits
                });
                let at = |r: i64| logits.get(r).get(rows[0].len() as i64 - 1);
                let allowed = grammar(k);
                let pick = |l: Tensor| {
                    l.masked_fill(&allowed.logical_not(), f64::NEG_INFINITY)
                        .argmax(-1, false)
                        .int64_value(&[])
                };
                // Position k is guided at the schedule's weight for step k of 6.
                let wk = schedule.weight(w, k, 6);
                assert_eq!(
                    toks[k],
                    pick(at(0) * (1.0 + wk) - at(1) * wk),
                    "{schedule:?}: row {i}, token {k}"
                );
                unguided_differs |= toks[k] != pick(at(0));
            }
        }
    }
    assert!(
        unguided_differs,
        "guidance never changed a token: the test cannot tell it apart"
    );
}

#[test]
fn cached_decoding_equals_full_forward_emu3() {
    let (_vs, model) = build(&config(Flavour::Emu3, Schedule::Dense), 0);
    check_cached(
        &model,
        &sequences(Flavour::Emu3, true),
        3,
        RoutingMode::TopK,
    );
}

/// The learned image grid continues across cache steps: row and column of a decoded image token
/// come from the tokens before it in the cache. Zero-initialised, it changes nothing.
#[test]
fn image_grid_embedding_starts_at_zero_and_decodes_cached() {
    let mut cfg = config(Flavour::Emu3, Schedule::Dense);
    let seqs = sequences(Flavour::Emu3, true);
    let b = batch(&seqs);
    let (rope_vs, rope_only) = build(&cfg, 0);
    cfg.image_positions = unimod_model::ImagePositions::Learned2d;
    cfg.image_side = 2;
    let (mut vs, model) = build(&cfg, 1);
    align(&rope_vs, &mut vs);
    let opts = ForwardOptions::default();
    let (a, g) = (
        rope_only.forward(&b, &opts).unwrap().logits,
        model.forward(&b, &opts).unwrap().logits,
    );
    assert!(a.allclose(&g, 1e-6, 1e-6, false));
    tch::no_grad(|| {
        for (name, mut v) in vs.variables() {
            if name.contains("image_grid") {
                v.copy_(&Tensor::randn(v.size(), tch::kind::FLOAT_CPU));
            }
        }
    });
    let moved = model.forward(&b, &opts).unwrap().logits;
    assert!(
        !moved.allclose(&g, 1e-3, 1e-3, false),
        "the grid rows do nothing"
    );
    check_cached(&model, &seqs, 3, RoutingMode::TopK);
    // Too small a grid for the format is refused by the config, not clamped quietly.
    cfg.image_side = 0;
    assert!(format!("{}", cfg.validate().unwrap_err()).contains("image_side"));
}

#[test]
fn cached_decoding_equals_full_forward_showo_mmu() {
    let (_vs, model) = build(&config(Flavour::Showo, Schedule::Dense), 0);
    let mmu = vec![sequences(Flavour::Showo, true).remove(1)];
    // The prefix (task token, image, question) is bidirectional up to <|eoi|>: prefill it.
    let after_question = mmu[0]
        .segments
        .iter()
        .rposition(|g| *g == unimod_tok::Segment::Question)
        .unwrap()
        + 1;
    check_cached(&model, &mmu, after_question, RoutingMode::TopK);
}

/// Routed everywhere at capacity 0.5, with random router and predictor weights so that the
/// causal decisions are mixed.
fn routed_mixed(flavour: Flavour) -> (VarStore, UnifiedTransformer) {
    let cfg = config(flavour, routed_everywhere(Capacities::all(0.5), 3));
    let (vs, model) = build(&cfg, 0);
    tch::no_grad(|| {
        for (name, mut v) in vs.variables() {
            if name.contains("router") || name.contains("predictor") {
                v.copy_(&(Tensor::randn(v.size(), tch::kind::FLOAT_CPU) * 0.5));
            }
        }
    });
    (vs, model)
}

#[test]
fn cached_decoding_equals_full_forward_with_causal_routing() {
    let (_vs, model) = routed_mixed(Flavour::Emu3);
    for mode in [
        RoutingMode::ThresholdRouter,
        RoutingMode::ThresholdPredictor,
    ] {
        check_cached(&model, &sequences(Flavour::Emu3, true), 2, mode);
    }
}

/// A routed Show-o model with mixed decisions ([`routed_mixed`]), and three MMU generation
/// prompts of different lengths.
fn routed_mmu_prompts() -> (VarStore, UnifiedTransformer, Vec<Sequence>) {
    let (vs, model) = routed_mixed(Flavour::Showo);
    let f = format(Flavour::Showo);
    let prompts = [vec![20, 21, 22, 23], vec![24], vec![25, 26]]
        .iter()
        .enumerate()
        .map(|(i, q)| f.mmu(&VOCAB, &[3, i as u32, 7, 8], q, None).unwrap())
        .collect();
    (vs, model, prompts)
}

fn decode(
    model: &UnifiedTransformer,
    prompts: &[Sequence],
    mode: RoutingMode,
    cache: bool,
) -> Vec<Vec<i64>> {
    let text = generate::text_only(&VOCAB);
    generate::autoregressive(
        model,
        prompts,
        &generate::Decoding {
            max_new: 6,
            segment: Segment::Answer,
            allowed: &|_| text.shallow_clone(),
            stop: None,
            temperature: 0.0,
            mode,
            cache,
            guidance: None,
            guidance_schedule: GuidanceSchedule::Constant,
        },
        Device::Cpu,
    )
    .unwrap()
}

/// Decoding without the cache recomputes every step from the whole sequence: under a causal
/// decision, or on a dense model, it is the cached decoding, prompts of different lengths
/// and their padding included.
#[test]
fn recomputed_decoding_equals_cached_decoding() {
    let (_vs, model, prompts) = routed_mmu_prompts();
    for mode in [
        RoutingMode::ThresholdRouter,
        RoutingMode::ThresholdPredictor,
    ] {
        let cached = decode(&model, &prompts, mode, true);
        assert_eq!(cached, decode(&model, &prompts, mode, false), "{mode:?}");
    }
    let (_vs, dense) = build(&config(Flavour::Showo, Schedule::Dense), 1);
    let cached = decode(&dense, &prompts, RoutingMode::TopK, true);
    assert_eq!(cached, decode(&dense, &prompts, RoutingMode::TopK, false));
}

/// Top-k over the prefix: every decoded token is the argmax of the full top-k forward of the
/// prompts (padded to one length, as decoding batches them) and the tokens decoded before it,
/// and the answers are not the causal decision's. (Against each prompt alone the answers can
/// differ where router scores tie, as repeated tokens' do in the first layer: top-k breaks ties
/// by position, and the padding moves positions.)
#[test]
fn top_k_prefix_decoding_routes_over_what_is_decoded() {
    let (_vs, model, prompts) = routed_mmu_prompts();
    let decoded = decode(&model, &prompts, RoutingMode::TopK, false);
    let text = generate::text_only(&VOCAB);
    let longest = prompts.iter().map(Sequence::len).max().unwrap();
    let mut rows: Vec<Sequence> = prompts
        .iter()
        .map(|p| {
            let mut p = p.clone();
            while p.len() < longest {
                p.push_decoded(unimod_tok::Special::Pad.id(), Segment::Pad);
            }
            p
        })
        .collect();
    // Step k reads every row's k-th token, so it indexes rather than iterates.
    #[allow(clippy::needless_range_loop)]
    for k in 0..decoded[0].len() {
        let logits = tch::no_grad(|| {
            model
                .forward(&batch(&rows), &Default::default())
                .unwrap()
                .logits
        });
        let picks = logits
            .masked_fill(&text.logical_not(), f64::NEG_INFINITY)
            .argmax(-1, false);
        for (i, row) in rows.iter_mut().enumerate() {
            // The first token follows the prompt's own end, the rest the last decoded token.
            let at = if k == 0 { prompts[i].len() } else { row.len() } as i64 - 1;
            assert_eq!(
                decoded[i][k],
                picks.int64_value(&[i as i64, at]),
                "row {i}, token {k}"
            );
            row.push_decoded(decoded[i][k], Segment::Answer);
        }
    }
    assert_ne!(
        decoded,
        decode(&model, &prompts, RoutingMode::ThresholdRouter, true),
        "top-k and the threshold decode alike: the test cannot tell them apart"
    );
    // With the cache, top-k is refused rather than decided causally in secret.
    let text = generate::text_only(&VOCAB);
    let refused = generate::autoregressive(
        &model,
        &prompts,
        &generate::Decoding {
            max_new: 2,
            segment: Segment::Answer,
            allowed: &|_| text.shallow_clone(),
            stop: None,
            temperature: 0.0,
            mode: RoutingMode::TopK,
            cache: true,
            guidance: None,
            guidance_schedule: GuidanceSchedule::Constant,
        },
        Device::Cpu,
    );
    assert!(format!("{}", refused.unwrap_err()).contains("causal_mode"));
}

#[test]
fn each_task_is_routed_by_its_own_router_only() {
    let cap = Capacities::of([(Task::T2I, 0.5), (Task::MMU, 0.5)]);
    let cfg = config(Flavour::Showo, routed_everywhere(cap, 3));
    let (vs, model) = build(&cfg, 0);
    let b = batch(&sequences(Flavour::Showo, true));
    let before = model.forward(&b, &ForwardOptions::default()).unwrap();
    // Per-task routers are the columns of one projection, in task order: row 1 is MMU's.
    tch::no_grad(|| {
        for (name, v) in vs.variables() {
            if name.contains("router.proj") {
                let mut mmu = v.narrow(0, 1, 1);
                mmu.copy_(&(Tensor::randn(mmu.size(), tch::kind::FLOAT_CPU) * 3.0));
            }
        }
    });
    let after = model.forward(&b, &ForwardOptions::default()).unwrap();
    let t2i = |o: &unimod_model::ModelOutput| o.logits.get(0);
    let mmu = |o: &unimod_model::ModelOutput| o.logits.get(1);
    assert!(
        t2i(&before).equal(&t2i(&after)),
        "the MMU router changed a T2I sample"
    );
    assert!(
        !mmu(&before).equal(&mmu(&after)),
        "the MMU router did not change the MMU sample"
    );
    // Exactly k routable tokens per sample were processed in every routed layer.
    for s in &after.routing {
        let kept = s
            .processed_mask
            .logical_and(&s.routable)
            .sum_dim_intlist(1, false, Kind::Int64);
        let routable = s.routable.sum_dim_intlist(1, false, Kind::Int64);
        let expected = (routable.to_kind(Kind::Double) * 0.5)
            .ceil()
            .to_kind(Kind::Int64);
        assert!(
            kept.equal(&expected),
            "layer {}: kept {kept:?}, expected {expected:?}",
            s.layer
        );
    }
}

/// A task beyond t2i / mmu / lm is configuration: declared in `model.tasks`, it gets its own
/// router column (after the built-in ones), its own capacity and its own loss; a batch or a
/// schedule naming an undeclared task is refused with the task named.
#[test]
fn a_task_named_in_config_is_routed_by_its_own_column_at_its_capacity() {
    let video = Task::named("video").unwrap();
    let cap = Capacities::of([(Task::T2I, 0.5), (video, 0.25)]);
    let mut cfg = config(Flavour::Showo, routed_everywhere(cap, 3));
    cfg.tasks = vec![Task::T2I, Task::MMU, video];
    let (vs, model) = build(&cfg, 4);
    // A "video" sample laid out as a T2I one: the model sees only its task label.
    let t2i = sequences(Flavour::Showo, true).remove(0);
    let clip = Sequence {
        task: video,
        ..t2i.clone()
    };
    let b = batch(&[t2i, clip]);
    let opts = ForwardOptions::default();
    let before = model.forward(&b, &opts).unwrap();
    for s in &before.routing {
        let routable = |i: i64| s.routable.get(i).sum(Kind::Int64).int64_value(&[]) as usize;
        let kept = |i: i64| {
            s.processed_mask
                .get(i)
                .logical_and(&s.routable.get(i))
                .sum(Kind::Int64)
                .int64_value(&[]) as usize
        };
        assert_eq!(kept(0), unimod_router::tokens_kept(0.5, routable(0)));
        assert_eq!(kept(1), unimod_router::tokens_kept(0.25, routable(1)));
        assert!(s.processed.as_ref().unwrap().contains_key(&video));
    }
    let losses = model.losses(&b, &before);
    assert_eq!(
        losses.per_task.keys().copied().collect::<Vec<_>>(),
        [Task::T2I, video]
    );
    // Column 1 of every router is video's: changing it leaves the T2I sample alone.
    tch::no_grad(|| {
        for (name, v) in vs.variables() {
            if name.contains("router.proj") {
                assert_eq!(v.size()[0], 2, "{name}: one column per routed task");
                let mut col = v.narrow(0, 1, 1);
                col.copy_(&(Tensor::randn(col.size(), tch::kind::FLOAT_CPU) * 3.0));
            }
        }
    });
    let after = model.forward(&b, &opts).unwrap();
    assert!(before.logits.get(0).equal(&after.logits.get(0)));
    assert!(!before.logits.get(1).equal(&after.logits.get(1)));
    // Refusals name the task.
    let audio = Sequence {
        task: Task::named("audio").unwrap(),
        ..sequences(Flavour::Showo, true).remove(0)
    };
    let e = model
        .forward(&batch(&[audio]), &opts)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("`audio`") && e.contains("t2i, mmu, video"),
        "{e}"
    );
    cfg.tasks = Task::BUILT_IN.to_vec();
    let e = cfg.validate().unwrap_err().to_string();
    assert!(
        e.contains("`video`") && e.contains("does not declare"),
        "{e}"
    );
}

/// docs/extending.md's "Adding a task" config is a valid model config that routes the task.
#[test]
fn the_documented_task_config_routes_its_task() {
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../docs/extending.md"
    ))
    .unwrap();
    let section = doc.split("## Adding a task").nth(1).expect("the section");
    let toml_block = section.split("```toml\n").nth(1).unwrap();
    let toml_block = toml_block.split("```").next().unwrap();
    #[derive(serde::Deserialize)]
    struct File {
        model: ModelConfig,
    }
    let cfg = toml::from_str::<File>(toml_block).unwrap().model;
    cfg.validate().unwrap();
    let video = Task::named("video").unwrap();
    assert_eq!(cfg.loss.get(video), 0.5);
    let plans = cfg.routing.schedule.resolve(cfg.n_layers).unwrap();
    let LayerPlan::Routed { capacity, .. } = plans.last().unwrap() else {
        panic!("the last layer routes")
    };
    assert_eq!(capacity.get(video), Some(0.3));
}

/// Layers share what they can within a forward pass (masks, budgets); layers routing other tasks
/// or at other capacities must still keep exactly their own k.
#[test]
fn each_layer_keeps_its_own_capacity() {
    let at = |t2i: Option<f64>, mmu: Option<f64>| LayerPlan::Routed {
        capacity: Capacities::of(
            [(Task::T2I, t2i), (Task::MMU, mmu)]
                .into_iter()
                .filter_map(|(t, c)| c.map(|c| (t, c))),
        ),
        routers: Routers::PerTask,
    };
    let plans = [
        at(Some(0.5), Some(0.5)),
        at(None, Some(0.25)),
        at(Some(0.5), Some(0.5)),
        at(Some(0.75), None),
    ];
    let mut cfg = config(
        Flavour::Showo,
        Schedule::Explicit {
            layers: plans.to_vec(),
        },
    );
    cfg.n_layers = plans.len();
    let (_, model) = build(&cfg, 0);
    let b = batch(&sequences(Flavour::Showo, true));
    let out = model.forward(&b, &ForwardOptions::default()).unwrap();
    assert_eq!(out.routing.len(), plans.len());
    for (s, plan) in out.routing.iter().zip(&plans) {
        let LayerPlan::Routed { capacity, .. } = plan else {
            unreachable!()
        };
        for (i, task) in b.tasks.iter().enumerate() {
            let routable = s.routable.get(i as i64).sum(Kind::Int64).int64_value(&[]);
            let kept = s
                .processed_mask
                .get(i as i64)
                .logical_and(&s.routable.get(i as i64))
                .sum(Kind::Int64)
                .int64_value(&[]);
            let expected = match capacity.get(*task) {
                Some(c) => (c * routable as f64).ceil() as i64,
                None => 0,
            };
            assert_eq!(kept, expected, "layer {} sample {i} ({task:?})", s.layer);
            if capacity.get(*task).is_none() {
                let valid = b.valid().get(i as i64);
                assert!(
                    s.processed_mask.get(i as i64).equal(&valid),
                    "layer {}: an unrouted task's tokens are all processed",
                    s.layer
                );
            }
        }
    }
}

#[test]
fn gradients_reach_every_parameter() {
    let cap = Capacities::of([(Task::T2I, 0.5), (Task::MMU, 0.75)]);
    let cfg = config(Flavour::Showo, routed_everywhere(cap, 3));
    let (vs, model) = build(&cfg, 0);
    let b = batch(&sequences(Flavour::Showo, false));
    let out = model.forward(&b, &ForwardOptions::default()).unwrap();
    model.losses(&b, &out).total.backward();
    for (name, v) in vs.variables() {
        let g = v.grad();
        assert!(
            g.defined() && g.abs().sum(Kind::Float).double_value(&[]) > 0.0,
            "no gradient reaches {name}"
        );
    }
}

#[test]
fn losses_sit_on_labelled_positions_and_are_deterministic() {
    let cfg = config(Flavour::Showo, Schedule::Dense);
    let b = batch(&sequences(Flavour::Showo, false));
    let (_vs, m) = build(&cfg, 7);
    let run = || {
        let out = m.forward(&b, &ForwardOptions::default()).unwrap();
        let l = m.losses(&b, &out);
        (l.total.double_value(&[]), out.logits)
    };
    let ((a, logits), (c, _)) = (run(), run());
    assert_eq!(a, c, "same weights and batch, different loss");
    // Changing logits where there is no label leaves the loss unchanged.
    let unlabelled = b.labels.eq(unimod_tok::IGNORE).unsqueeze(-1);
    let mut out = m.forward(&b, &ForwardOptions::default()).unwrap();
    out.logits = logits.masked_fill(&unlabelled, 5.0);
    assert_eq!(m.losses(&b, &out).total.double_value(&[]), a);
}

#[test]
fn checkpoint_round_trip_and_refusal() {
    let cfg = config(Flavour::Showo, routed_everywhere(Capacities::all(0.5), 3));
    let (vs, model) = build(&cfg, 0);
    let dir = std::env::temp_dir().join(format!("unimod-ckpt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("model.safetensors");
    let toml = toml::to_string(&cfg).unwrap();
    checkpoint::save_model(&path, &vs, &toml, Default::default()).unwrap();
    let loaded = checkpoint::load_tensors(&path).unwrap();
    assert_eq!(checkpoint::read_config(&loaded, &path).unwrap(), toml);
    let (mut vs2, model2) = build(&cfg, 99);
    checkpoint::load_into(&mut vs2, &loaded, &path).unwrap();
    let b = batch(&sequences(Flavour::Showo, false));
    let o = ForwardOptions::default();
    assert!(
        model
            .forward(&b, &o)
            .unwrap()
            .logits
            .equal(&model2.forward(&b, &o).unwrap().logits)
    );
    // Another config (wider) is refused with the tensor and shapes named.
    let mut other = cfg.clone();
    other.d_model = 64;
    let (mut vs3, _) = build(&other, 0);
    let e = checkpoint::load_into(&mut vs3, &loaded, &path)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("has shape") && e.contains("expects"), "{e}");
    // The config a checkpoint carries is compared as a config: one written before fields with
    // defaults existed (here `head_bias` and `tasks`) still matches; a different value is named.
    assert!(
        toml.contains("\ntasks = [\"t2i\", \"mmu\", \"lm\"]"),
        "{toml}"
    );
    let older: String = toml
        .lines()
        .filter(|l| !l.starts_with("head_bias") && !l.starts_with("tasks"))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_ne!(older, toml);
    checkpoint::check_config(&older, &cfg).unwrap();
    let e = checkpoint::check_config(&older, &other).unwrap_err();
    assert!(
        e.contains("d_model = 64") && e.contains("d_model = 32"),
        "{e}"
    );
    // A truncated file is refused as corrupt.
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let e = checkpoint::load_tensors(&path).err().unwrap().to_string();
    assert!(e.contains("not a valid safetensors checkpoint"), "{e}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn causal_decisions_learn_to_agree_with_top_k() {
    use tch::nn::OptimizerConfig;
    let cap = Capacities::of([(Task::T2I, 0.5), (Task::MMU, 0.5)]);
    let mut cfg = config(Flavour::Emu3, routed_everywhere(cap, 3));
    cfg.routing.aux_loss = 0.1;
    let (vs, model) = build(&cfg, 0);
    let mut opt = tch::nn::Adam::default().build(&vs, 3e-3).unwrap();
    let b = batch(&sequences(Flavour::Emu3, true));
    let agreement = |decision: &dyn Fn(&unimod_model::layer::RoutingStats) -> Tensor| {
        let out = tch::no_grad(|| model.forward(&b, &ForwardOptions::default()).unwrap());
        let (mut hit, mut total) = (0i64, 0i64);
        for s in &out.routing {
            let agree = decision(s)
                .eq_tensor(&s.processed_mask)
                .logical_and(&s.routable);
            hit += agree.sum(Kind::Int64).int64_value(&[]);
            total += s.routable.sum(Kind::Int64).int64_value(&[]);
        }
        hit as f64 / total as f64
    };
    let predictor =
        |s: &unimod_model::layer::RoutingStats| s.predictor_logits.as_ref().unwrap().gt(0.0);
    let router = |s: &unimod_model::layer::RoutingStats| s.scores.gt(0.0);
    let before = agreement(&predictor);
    for _ in 0..150 {
        let out = model.forward(&b, &ForwardOptions::default()).unwrap();
        opt.backward_step(&model.losses(&b, &out).total);
    }
    let (after_predictor, after_router) = (agreement(&predictor), agreement(&router));
    assert!(
        after_predictor >= 0.9,
        "predictor agreement {before:.2} -> {after_predictor:.2}"
    );
    assert!(
        after_router >= 0.9,
        "router threshold agreement {after_router:.2}"
    );
}

/// A mixed batch in T2I-MoD, Shared-MoD and MMU-MoD layers: each task is processed at its own
/// width, so the work counted is the sum of each task's own, and each sample's output is what
/// its task's sub-batch alone gives.
#[test]
fn each_task_is_processed_at_its_own_width() {
    let at = |t2i: Option<f64>, mmu: Option<f64>| LayerPlan::Routed {
        capacity: Capacities::of(
            [(Task::T2I, t2i), (Task::MMU, mmu)]
                .into_iter()
                .filter_map(|(t, c)| c.map(|c| (t, c))),
        ),
        routers: Routers::PerTask,
    };
    let plans = vec![
        at(Some(0.5), None),
        at(Some(0.25), Some(0.75)),
        at(None, Some(0.5)),
    ];
    let cfg = config(Flavour::Showo, Schedule::Explicit { layers: plans });
    let (_, model) = build(&cfg, 0);
    // Without and with padding, which no layer processes.
    for full_text in [true, false] {
        let seqs = sequences(Flavour::Showo, full_text);
        let run = |s: &[Sequence]| {
            tch::no_grad(|| model.forward(&batch(s), &Default::default()).unwrap())
        };
        let mixed = run(&seqs);
        let alone: Vec<_> = seqs.iter().map(|s| run(std::slice::from_ref(s))).collect();
        for l in 0..3 {
            let sum: f64 = alone.iter().map(|o| o.work[l].tokens).sum();
            assert_eq!(mixed.work[l].tokens, sum, "layer {l}: tokens computed");
            let pairs: f64 = alone.iter().map(|o| o.work[l].attention_pairs).sum();
            assert_eq!(
                mixed.work[l].attention_pairs, pairs,
                "layer {l}: attention pairs"
            );
        }
        // The analytic count of `unimod flops` is the work counted, routers included.
        let b = batch(&seqs);
        for l in 0..3 {
            let analytic: Vec<_> = (0..b.size())
                .map(|i| {
                    let seq = flops::Composition {
                        task: b.tasks[i],
                        segments: b.segment_counts[i],
                    };
                    flops::analytic_work(&cfg, &model.plans, &seq)[l]
                })
                .collect();
            let sum =
                |f: fn(&unimod_model::layer::Work) -> f64| analytic.iter().map(f).sum::<f64>();
            assert_eq!(sum(|w| w.tokens), mixed.work[l].tokens, "layer {l}");
            assert_eq!(
                sum(|w| w.router_tokens),
                mixed.work[l].router_tokens,
                "layer {l}"
            );
        }
        for (i, o) in alone.iter().enumerate() {
            let (a, b) = (mixed.logits.get(i as i64), o.logits.get(0));
            assert!(
                a.allclose(&b, 1e-5, 1e-6, false),
                "sample {i}: {}",
                (a - b).abs().max().double_value(&[])
            );
        }
    }
}

/// A Show-o model whose two routed layers keep each task at its own capacity (T2I 0.5 and 0.75,
/// MMU 0.25 and 0.5): each task's samples are gathered at their own width.
fn per_task_widths() -> UnifiedTransformer {
    let at = |t2i: f64, mmu: f64| LayerPlan::Routed {
        capacity: Capacities::of([(Task::T2I, t2i), (Task::MMU, mmu)]),
        routers: Routers::PerTask,
    };
    let plans = vec![LayerPlan::Dense, at(0.5, 0.25), at(0.75, 0.5)];
    build(
        &config(Flavour::Showo, Schedule::Explicit { layers: plans }),
        0,
    )
    .1
}

/// A batch whose tasks alternate is routed as the same sequences with each task's together: one
/// group per task at its own width (the same tokens computed), the same outputs per sequence.
#[test]
fn an_interleaved_batch_is_routed_as_its_grouped_permutation() {
    let model = per_task_widths();
    // T2I and MMU sequences of two lengths of text: each task's samples keep different counts.
    let (full, short) = (
        sequences(Flavour::Showo, true),
        sequences(Flavour::Showo, false),
    );
    let interleaved = [&full[0], &full[1], &short[0], &short[1]].map(Sequence::clone);
    let grouped = [&full[0], &short[0], &full[1], &short[1]].map(Sequence::clone);
    let to_grouped = [0i64, 2, 1, 3];
    let run =
        |s: &[Sequence]| tch::no_grad(|| model.forward(&batch(s), &Default::default()).unwrap());
    let (a, b) = (run(&interleaved), run(&grouped));
    for l in 0..3 {
        assert_eq!(
            a.work[l].tokens, b.work[l].tokens,
            "layer {l}: tokens computed"
        );
        assert_eq!(
            a.work[l].attention_pairs, b.work[l].attention_pairs,
            "layer {l}: attention pairs"
        );
    }
    for (i, &j) in to_grouped.iter().enumerate() {
        let (x, y) = (a.logits.get(i as i64), b.logits.get(j));
        assert!(
            x.allclose(&y, 1e-5, 1e-6, false),
            "sample {i}: {}",
            (x - y).abs().max().double_value(&[])
        );
    }
    // The routing statistics are per sample in batch order too.
    for (ra, rb) in a.routing.iter().zip(&b.routing) {
        let permuted = rb
            .processed_mask
            .index_select(0, &Tensor::from_slice(&to_grouped));
        assert!(ra.processed_mask.equal(&permuted), "layer {}", ra.layer);
    }
}

/// A step's shape fixes its kernels: a forward on one batch's tensors under the host metadata
/// of another batch of the same shape (what a CUDA graph captured on the second computes when
/// replayed with the first's tensors copied in) is the forward on the first, bit for bit; and
/// the host counts of `routing_counts` are the forward's.
#[test]
fn batches_of_one_step_shape_run_the_same_step() {
    let model = per_task_widths();
    let f = format(Flavour::Showo);
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(3);
    let mut seqs = |first_prompt: &[i64], second_prompt: &[i64], question: &[i64]| {
        vec![
            f.t2i(&VOCAB, first_prompt, Some(&[1, 5, 9, 2]), Some(&mut rng))
                .unwrap(),
            f.t2i(&VOCAB, second_prompt, Some(&[3, 3, 7, 2]), Some(&mut rng))
                .unwrap(),
            f.mmu(&VOCAB, &[3, 4, 7, 8], &[20, 21, 22, 23], Some(&[24, 25]))
                .unwrap(),
            f.mmu(&VOCAB, &[1, 4, 6, 8], question, Some(&[24])).unwrap(),
        ]
    };
    // The longest sample of each task is the same: other text lengths, the same widths.
    let long = [11, 12, 13, 14, 15, 16];
    let (a, b) = (
        batch(&seqs(&long, &[11, 12], &[20])),
        batch(&seqs(&long, &[13, 14, 15], &[21, 22])),
    );
    assert_ne!(a.segment_counts, b.segment_counts);
    let shape = model.step_shape(&a);
    assert_eq!(shape, model.step_shape(&b));
    let hybrid = Batch {
        tokens: b.tokens.shallow_clone(),
        labels: b.labels.shallow_clone(),
        segment: b.segment.shallow_clone(),
        attn_upto: b.attn_upto.shallow_clone(),
        positions: b.positions.shallow_clone(),
        task: b.task.shallow_clone(),
        ..a
    };
    let run = |x: &Batch| {
        let out = tch::no_grad(|| model.forward(x, &Default::default()).unwrap());
        let loss = model.losses(x, &out).total;
        (out, loss)
    };
    let ((out, loss), (hyb_out, hyb_loss)) = (run(&b), run(&hybrid));
    assert!(out.logits.equal(&hyb_out.logits), "logits");
    assert!(loss.equal(&hyb_loss), "loss");
    for (w, h) in out.work.iter().zip(&hyb_out.work) {
        assert_eq!(w.tokens, h.tokens);
    }
    // The host counts a forward's statistics carry, without a forward.
    let counts = model.routing_counts(&b);
    assert_eq!(counts.len(), out.routing.len());
    for (c, s) in counts.iter().zip(&out.routing) {
        assert_eq!(
            (c.layer, Some(&c.processed), &c.total),
            (s.layer, s.processed.as_ref(), &s.total)
        );
    }
    // Another longest sample, another shape.
    let c = batch(&seqs(&[11, 12], &[13], &[20]));
    assert_ne!(shape, model.step_shape(&c));
    // Mixture-of-Transformers sizes its dispatch from the device: no shape.
    let mut mot = config(Flavour::Showo, Schedule::Dense);
    mot.mot = true;
    assert_eq!(build(&mot, 0).1.step_shape(&c), None);
}

/// The causal (threshold) path gathers the tokens it keeps, as training does: fed the same
/// selection, both give the same outputs, and a token a layer skips leaves it bit-identical.
#[test]
fn threshold_and_top_k_paths_agree_on_the_same_selection() {
    let mut plans = vec![LayerPlan::Dense; 3];
    plans[0] = LayerPlan::Routed {
        capacity: Capacities::all(0.5),
        routers: Routers::PerTask,
    };
    let cfg = config(Flavour::Emu3, Schedule::Explicit { layers: plans });
    let (vs, model) = build(&cfg, 0);
    let b = batch(&sequences(Flavour::Emu3, true)[..1]);
    let bias = vs
        .variables()
        .into_iter()
        .find(|(n, _)| n.contains("router") && n.ends_with("proj.bias"))
        .unwrap()
        .1;
    tch::no_grad(|| {
        for (name, mut v) in vs.variables() {
            if name.contains("router") && name.ends_with("proj.weight") {
                v.copy_(&Tensor::randn(v.size(), tch::kind::FLOAT_CPU));
            }
        }
    });
    // Shift the router so that exactly the top-k tokens score above 0: the threshold then
    // selects what top-k selects, with the same sigmoid weights.
    let opts = |mode| ForwardOptions {
        mode,
        hidden_states: true,
        ..Default::default()
    };
    let run = |mode| tch::no_grad(|| model.forward(&b, &opts(mode)).unwrap());
    let s = &run(RoutingMode::TopK).routing[0];
    let routable = Vec::<bool>::try_from(s.routable.get(0)).unwrap();
    let mut scores: Vec<f32> = Vec::<f32>::try_from(s.scores.get(0))
        .unwrap()
        .into_iter()
        .zip(&routable)
        .filter(|(_, r)| **r)
        .map(|(x, _)| x)
        .collect();
    scores.sort_by(|a, b| b.total_cmp(a));
    let k = (scores.len() as f64 * 0.5).ceil() as usize;
    let mid = (scores[k - 1] + scores[k]) / 2.0;
    tch::no_grad(|| {
        let mut bias = bias.shallow_clone();
        let _ = bias.g_sub_(&Tensor::from(mid));
    });
    let (top_k, threshold) = (run(RoutingMode::TopK), run(RoutingMode::ThresholdRouter));
    let (a, t) = (&top_k.routing[0], &threshold.routing[0]);
    assert!(
        a.processed_mask.equal(&t.processed_mask),
        "selections differ"
    );
    assert!(
        a.processed_mask.logical_not().any().int64_value(&[]) == 1,
        "the test needs skipped tokens"
    );
    assert!(top_k.logits.equal(&threshold.logits), "outputs differ");
    assert_eq!(top_k.work[0], threshold.work[0]);
    for out in [&top_k, &threshold] {
        let skipped = out.routing[0].processed_mask.logical_not().unsqueeze(-1);
        let (before, after) = (&out.hidden_states[0], &out.hidden_states[1]);
        assert!(
            before
                .masked_select(&skipped)
                .equal(&after.masked_select(&skipped)),
            "a skipped token changed"
        );
    }
}

/// Every baseline schedule trains: a forward and a backward through a model, with gradients
/// reaching the routers where there are any.
#[test]
fn every_baseline_schedule_trains() {
    use unimod_router::schedule::{LayerSet, NamedLayers, Ramp};
    let unimod = |layers, routers| Schedule::Unimod {
        layers,
        t2i: Some(Ramp::Constant(0.8)),
        mmu: Some(Ramp::Linear([1.0, 0.2])),
        lm: None,
        tasks: Default::default(),
        routers,
    };
    let schedules = [
        ("early exit", Schedule::EarlyExit { exit_after: 2 }),
        ("interleaved skip", Schedule::InterleavedSkip),
        (
            "plain MoD",
            Schedule::Mod {
                capacity: 0.5,
                layers: LayerSet::Named(NamedLayers::Interleaved),
            },
        ),
        (
            "γ-MoD",
            Schedule::GammaMod {
                capacity: 0.5,
                layers: LayerSet::Named(NamedLayers::AllButEnds),
            },
        ),
        (
            "p-MoD",
            Schedule::PMod {
                average: 0.5,
                max: 0.75,
                min: 0.25,
            },
        ),
        (
            "UniMoD w/o layer switch",
            unimod(LayerSet::Named(NamedLayers::Interleaved), Routers::PerTask),
        ),
        (
            "UniMoD w/o task router",
            unimod(LayerSet::Named(NamedLayers::LastHalf), Routers::Shared),
        ),
        (
            "UniMoD",
            unimod(LayerSet::Named(NamedLayers::LastHalf), Routers::PerTask),
        ),
    ];
    for (name, schedule) in schedules {
        let gamma = matches!(schedule, Schedule::GammaMod { .. });
        let mut cfg = config(Flavour::Showo, schedule);
        cfg.n_layers = 5;
        if gamma {
            // γ-MoD's masked routing: questions are never pruned.
            cfg.routing.routable.retain(|s| *s != Segment::Question);
        }
        if matches!(cfg.routing.schedule, Schedule::PMod { .. }) {
            // p-MoD routes vision tokens only.
            cfg.routing.routable = vec![Segment::Image];
        }
        let (vs, model) = build(&cfg, 0);
        let b = batch(&sequences(Flavour::Showo, false));
        let out = model.forward(&b, &ForwardOptions::default()).unwrap();
        let loss = model.losses(&b, &out).total;
        assert!(loss.double_value(&[]).is_finite(), "{name}: loss");
        loss.backward();
        for (var, v) in vs.variables() {
            if var.contains("router") {
                let g = v.grad();
                assert!(
                    g.defined() && g.abs().sum(Kind::Float).double_value(&[]) > 0.0,
                    "{name}: no gradient reaches {var}"
                );
            }
        }
    }
}

/// Decoding with a KV cache in top-k mode, or in the predictor's mode without a predictor, is
/// refused with both settings named, not quietly replaced by another decision.
#[test]
fn impossible_routing_modes_are_refused() {
    let mut cfg = config(Flavour::Emu3, routed_everywhere(Capacities::all(0.5), 3));
    let (_, model) = build(&cfg, 0);
    let b = batch(&sequences(Flavour::Emu3, true));
    let topk = ForwardOptions::default();
    let e = model
        .forward_cached(&b, &topk, &mut KvCache::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("TopK") && e.contains("causal_mode"), "{e}");
    cfg.routing.causal_predictor = false;
    cfg.routing.causal_mode = RoutingMode::ThresholdRouter;
    let (_, model) = build(&cfg, 0);
    let predictor = ForwardOptions {
        mode: RoutingMode::ThresholdPredictor,
        ..Default::default()
    };
    let e = model.forward(&b, &predictor).unwrap_err().to_string();
    assert!(e.contains("causal_predictor = false"), "{e}");
    cfg.routing.causal_mode = RoutingMode::ThresholdPredictor;
    let e = cfg.validate().unwrap_err().to_string();
    assert!(
        e.contains("routing.causal_mode") && e.contains("causal_predictor"),
        "{e}"
    );
}

fn mot(cfg: &ModelConfig) -> ModelConfig {
    ModelConfig {
        mot: true,
        ..cfg.clone()
    }
}

/// Mixture-of-Transformers whose modality copies are the dense weights is the dense model:
/// the same logits, and each dense parameter's gradient is the sum of its copies' gradients.
#[test]
fn mot_with_tied_copies_equals_dense() {
    for flavour in [Flavour::Showo, Flavour::Emu3] {
        let dense_cfg = config(flavour, Schedule::Dense);
        let (vs_d, dense) = build(&dense_cfg, 0);
        let (vs_m, untied) = build(&mot(&dense_cfg), 1);
        assert!(untied.init_from_dense(&vs_m, &vs_d).is_empty());
        let n = vs_d.variables().len();
        assert_eq!(
            vs_m.variables().len(),
            2 * (n - 2) + 2,
            "every parameter but the embedding and head has two copies"
        );
        let b = batch(&sequences(flavour, false));
        let opts = ForwardOptions::default();
        let (od, om) = (
            dense.forward(&b, &opts).unwrap(),
            untied.forward(&b, &opts).unwrap(),
        );
        let valid = b.valid().unsqueeze(-1);
        assert!(
            (&od.logits * &valid).allclose(&(&om.logits * &valid), 1e-5, 1e-5, false),
            "{flavour:?}: max diff {}",
            (&od.logits - &om.logits).abs().max().double_value(&[])
        );
        dense.losses(&b, &od).total.backward();
        untied.losses(&b, &om).total.backward();
        // Each dense name's gradient, summed over the MoT copies that map to it.
        let mut summed: std::collections::HashMap<String, Tensor> = Default::default();
        for (name, v) in vs_m.variables() {
            let dense_name = name.replace(".text.", ".").replace(".image.", ".");
            let g = v.grad();
            let total = match summed.remove(&dense_name) {
                Some(s) => s + g,
                None => g,
            };
            summed.insert(dense_name, total);
        }
        for (name, v) in vs_d.variables() {
            let summed = &summed[&name];
            assert!(
                v.grad().allclose(summed, 1e-4, 1e-5, false),
                "{flavour:?} {name}: gradient differs by {}",
                (v.grad() - summed).abs().max().double_value(&[])
            );
        }
    }
}

/// A token is computed by its own modality's weights: changing every image copy leaves the
/// tokens that cannot see an image token (a T2I prompt, causal) exactly as they were, and
/// changes the image tokens. Cached decoding equals the full forward under MoT.
#[test]
fn mot_tokens_use_their_own_modality_and_decode_cached() {
    for flavour in [Flavour::Showo, Flavour::Emu3] {
        let cfg = mot(&config(flavour, Schedule::Dense));
        let (vs, model) = build(&cfg, 2);
        let seqs = sequences(flavour, true);
        let b = batch(&seqs[..1]);
        let opts = ForwardOptions::default();
        let before = model.forward(&b, &opts).unwrap().logits;
        tch::no_grad(|| {
            for (name, mut v) in vs.variables() {
                if name.contains(".image.") {
                    let _ = v.g_add_(&(Tensor::randn(v.size(), tch::kind::FLOAT_CPU) * 0.5));
                }
            }
        });
        let after = model.forward(&b, &opts).unwrap().logits;
        let first_image = seqs[0]
            .segments
            .iter()
            .position(|g| *g == Segment::Image)
            .unwrap() as i64;
        // Up to the prompt's end; `soi` itself sees the image block in Show-o.
        let soi = first_image - 1;
        let (text_b, text_a) = (before.narrow(1, 0, soi), after.narrow(1, 0, soi));
        assert!(text_b.equal(&text_a), "{flavour:?}: a prompt token changed");
        let image = |t: &Tensor| t.narrow(1, first_image, 4);
        assert!(
            !image(&before).allclose(&image(&after), 1e-3, 1e-3, false),
            "{flavour:?}: image tokens ignore the image copies"
        );
    }
    let (_vs, model) = build(&mot(&config(Flavour::Emu3, Schedule::Dense)), 3);
    check_cached(
        &model,
        &sequences(Flavour::Emu3, true),
        3,
        RoutingMode::TopK,
    );
}

fn moma(cfg: &ModelConfig) -> ModelConfig {
    ModelConfig {
        moma: Some(unimod_model::MomaConfig {
            text_experts: 2,
            image_experts: 3,
            capacity: None,
        }),
        ..cfg.clone()
    }
}

/// MoMa alone and under MoD: every parameter learns (the gates through the experts' weights,
/// the auxiliary routers through their BCE), and decoding with a KV cache, where the auxiliary
/// routers decide, equals the full forward in the same causal mode.
#[test]
fn moma_learns_everywhere_and_decodes_cached() {
    let cap = Capacities::of([(Task::T2I, 0.5), (Task::MMU, 0.75)]);
    for schedule in [Schedule::Dense, routed_everywhere(cap, 3)] {
        for flavour in [Flavour::Showo, Flavour::Emu3] {
            let cfg = moma(&config(flavour, schedule.clone()));
            let (vs, model) = build(&cfg, 5);
            let b = batch(&sequences(flavour, false));
            let out = model.forward(&b, &ForwardOptions::default()).unwrap();
            assert_eq!(out.experts.len(), 3, "one entry per layer");
            model.losses(&b, &out).total.backward();
            for (name, v) in vs.variables() {
                let g = v.grad();
                assert!(
                    g.defined() && g.abs().sum(Kind::Float).double_value(&[]) > 0.0,
                    "{flavour:?}: no gradient reaches {name}"
                );
            }
        }
        let (vs, model) = build(&moma(&config(Flavour::Emu3, schedule)), 6);
        // Random auxiliary routers, so that the causal picks are mixed.
        tch::no_grad(|| {
            for (name, mut v) in vs.variables() {
                if name.contains("aux_router") || name.contains("router") {
                    v.copy_(&(Tensor::randn(v.size(), tch::kind::FLOAT_CPU) * 0.5));
                }
            }
        });
        check_cached(
            &model,
            &sequences(Flavour::Emu3, true),
            2,
            RoutingMode::ThresholdRouter,
        );
    }
}

/// `model.zero_out_proj`: with every block's output projections at zero, each block is the
/// identity on the residual stream (every hidden state equals the embeddings exactly), for
/// dense, MoT and MoMa; the output projections are what the first gradient reaches, and no
/// gradient passes them into the blocks' inner weights yet.
#[test]
fn zero_output_projections_start_every_block_as_the_identity() {
    for flavour in [Flavour::Showo, Flavour::Emu3] {
        let dense = ModelConfig {
            zero_out_proj: true,
            ..config(flavour, Schedule::Dense)
        };
        for cfg in [dense.clone(), mot(&dense), moma(&dense)] {
            let (vs, model) = build(&cfg, 6);
            let b = batch(&sequences(flavour, false));
            let opts = ForwardOptions {
                hidden_states: true,
                ..Default::default()
            };
            let out = model.forward(&b, &opts).unwrap();
            for (l, h) in out.hidden_states.iter().enumerate() {
                assert!(
                    h.equal(&out.hidden_states[0]),
                    "{flavour:?} mot={} moma={}: block {l} is not the identity",
                    cfg.mot,
                    cfg.moma.is_some()
                );
            }
            model.losses(&b, &out).total.backward();
            for (name, v) in vs.variables() {
                let reached = v.grad().abs().sum(Kind::Float).double_value(&[]) > 0.0;
                let inner = [".qkv.", ".up", ".gate"].iter().any(|k| name.contains(k))
                    && !name.contains("router");
                let out_proj = name.contains(".o.") || name.contains(".down");
                assert!(
                    !(inner && reached),
                    "{name} has a gradient behind a zero projection"
                );
                assert!(
                    !out_proj || reached,
                    "{name}: no gradient reaches an output projection"
                );
            }
        }
    }
}
