//! Parity with the reference implementation nobody here wrote: tiny random Phi and Llama
//! checkpoints made by `transformers` (scripts/hf_fixtures.py), loaded into the unified
//! transformer, give the logits and hidden states `transformers` computed, within 1e-4 in f32;
//! an export loads back unchanged; unsupported checkpoints are refused by field.

use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor, nn::VarStore};
use unimod_model::hf::{self, HfArch, TEXT_OFFSET};
use unimod_model::{ForwardOptions, UnifiedTransformer};
use unimod_router::Schedule;
use unimod_tok::tensorfile::load_tensors;
use unimod_tok::{Batch, IGNORE, Segment, Sequence, Task};

const CODES: usize = 16;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hf")
        .join(name)
}

fn loaded(dir: &Path, schedule: Schedule) -> (VarStore, UnifiedTransformer, hf::HfConfig) {
    let mut c = hf::config(dir, CODES).unwrap();
    c.model.routing.schedule = schedule;
    let vs = VarStore::new(Device::Cpu);
    let model = UnifiedTransformer::new(&vs.root(), &c.model).unwrap();
    let missing = hf::load(dir, &c, &vs).unwrap();
    assert!(
        missing
            .iter()
            .all(|n| n.contains("router") || n.contains("predictor")),
        "not loaded: {missing:?}"
    );
    (vs, model, c)
}

/// The checkpoint's text ids as causal text sequences of the unified vocabulary.
fn batch(ids: &Tensor) -> Batch {
    let rows: Vec<Vec<i64>> = Vec::<Vec<i64>>::try_from(ids).unwrap();
    let seqs: Vec<Sequence> = rows
        .iter()
        .map(|r| Sequence {
            task: Task::LM,
            tokens: r.iter().map(|t| t + TEXT_OFFSET).collect(),
            labels: vec![IGNORE; r.len()],
            segments: vec![Segment::Text; r.len()],
            attn_upto: (0..r.len() as i64).collect(),
        })
        .collect();
    Batch::from_sequences(&seqs, Device::Cpu).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

#[test]
fn phi_and_llama_match_transformers() {
    for (name, arch) in [("phi", HfArch::Phi), ("llama", HfArch::Llama)] {
        let dir = fixture(name);
        let (vs, model, c) = loaded(&dir, Schedule::Dense);
        assert_eq!(c.arch, arch);
        let expected = load_tensors(&dir.join("expected.safetensors"))
            .unwrap()
            .tensors;
        let b = batch(&expected["input_ids"]);
        let opts = ForwardOptions {
            hidden_states: true,
            ..Default::default()
        };
        let out = model.forward(&b, &opts).unwrap();
        let v = c.vocab as i64;
        let logits = out.logits.narrow(2, TEXT_OFFSET, v);
        let d = max_diff(&logits, &expected["logits"]);
        assert!(d < 1e-4, "{name}: logits differ by {d}");
        let hidden = &expected["hidden_states"];
        for l in 0..hidden.size()[0] {
            let d = max_diff(&out.hidden_states[l as usize], &hidden.get(l));
            assert!(d < 1e-4, "{name}: hidden state {l} differs by {d}");
        }
        // The new rows (specials, image codes) start as the mean of the checkpoint's rows.
        let embed = &vs.variables()["embed.weight"];
        let mean = embed
            .narrow(0, TEXT_OFFSET, v)
            .mean_dim(0, false, Kind::Float);
        for row in [
            0,
            TEXT_OFFSET - 1,
            TEXT_OFFSET + v,
            TEXT_OFFSET + v + CODES as i64 - 1,
        ] {
            assert!(
                embed.get(row).allclose(&mean, 1e-6, 1e-6, false),
                "{name}: row {row}"
            );
        }
    }
}

/// A loaded backbone trains under any schedule: routed layers at capacity 1 compute what the
/// backbone computes.
#[test]
fn a_backbone_takes_routing_schedules() {
    let dir = fixture("llama");
    let (_, dense, _) = loaded(&dir, Schedule::Dense);
    let every_layer: Schedule =
        toml::from_str("kind = 'mod'\ncapacity = 1.0\nlayers = 'interleaved'").unwrap();
    let (vs, routed, _) = loaded(&dir, every_layer);
    // Routers at sigmoid(30) = 1.0 in f32: capacity 1 with unit weights is dense.
    tch::no_grad(|| {
        for (name, mut v) in vs.variables() {
            if name.contains("router") && name.ends_with("proj.bias") {
                let _ = v.fill_(30.0);
            }
        }
    });
    let expected = load_tensors(&dir.join("expected.safetensors"))
        .unwrap()
        .tensors;
    let b = batch(&expected["input_ids"]);
    let opts = ForwardOptions::default();
    let (a, r) = (
        dense.forward(&b, &opts).unwrap().logits,
        routed.forward(&b, &opts).unwrap().logits,
    );
    assert!(max_diff(&a, &r) < 1e-5);
}

#[test]
fn exports_load_back_unchanged() {
    for name in ["phi", "llama"] {
        let (vs, model, c) = loaded(&fixture(name), Schedule::Dense);
        // Kept under target/ so that `python scripts/hf_fixtures.py --check-export` can load
        // them in transformers.
        let out = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join("hf-export")
            .join(name);
        hf::export(&out, &model, &vs).unwrap();
        let back = hf::config(&out, CODES).unwrap();
        assert_eq!(back.arch, c.arch);
        assert_eq!(back.vocab, c.model.vocab.size());
        // The export's vocabulary is the whole unified one, so its text starts at 0 there:
        // its own import shifts it once more, and the logits of the same ids agree.
        let vs2 = VarStore::new(Device::Cpu);
        let again = UnifiedTransformer::new(&vs2.root(), &back.model).unwrap();
        hf::load(&out, &back, &vs2).unwrap();
        let expected = load_tensors(&fixture(name).join("expected.safetensors"))
            .unwrap()
            .tensors;
        let b = batch(&expected["input_ids"]);
        let shifted = batch(&(&expected["input_ids"] + TEXT_OFFSET));
        let opts = ForwardOptions::default();
        let a = model.forward(&b, &opts).unwrap().logits;
        let z = again.forward(&shifted, &opts).unwrap().logits;
        let n = c.model.vocab.size() as i64;
        assert!(max_diff(&a, &z.narrow(2, TEXT_OFFSET, n)) < 1e-5, "{name}");
    }
}

#[test]
fn unsupported_checkpoints_are_refused_by_field() {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR")).join("hf-refused");
    let cases = [
        ("phi", "hidden_act", serde_json::json!("relu")),
        ("phi", "qk_layernorm", serde_json::json!(true)),
        (
            "llama",
            "rope_scaling",
            serde_json::json!({"type": "linear", "factor": 2.0}),
        ),
        ("llama", "head_dim", serde_json::json!(4)),
        ("llama", "model_type", serde_json::json!("mistral")),
        ("llama", "attention_bias", serde_json::json!(true)),
    ];
    for (name, field, value) in cases {
        let text = std::fs::read_to_string(fixture(name).join("config.json")).unwrap();
        let mut c: serde_json::Value = serde_json::from_str(&text).unwrap();
        c[field] = value;
        let dir = tmp.join(format!("{name}-{field}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("config.json"), c.to_string()).unwrap();
        let e = hf::config(&dir, CODES).unwrap_err().to_string();
        assert!(e.contains(field), "{field}: {e}");
    }
    let e = hf::config(&tmp.join("nowhere"), CODES)
        .unwrap_err()
        .to_string();
    assert!(e.contains("config.json"), "{e}");
}
