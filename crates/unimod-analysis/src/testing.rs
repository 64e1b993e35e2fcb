//! Tiny models and batches for the analyses' tests.

use tch::{Device, nn::VarStore};
use unimod_model::{ModelConfig, UnifiedTransformer};
use unimod_router::Schedule;
use unimod_tok::{Batch, FormatConfig, Sequence, Task};

fn format() -> FormatConfig {
    FormatConfig {
        text_len: 12,
        image_side: 4,
        ..Default::default()
    }
}

pub fn tiny_model(schedule: Schedule) -> (VarStore, UnifiedTransformer) {
    tch::manual_seed(0);
    let mut cfg = ModelConfig {
        d_model: 32,
        n_layers: 3,
        n_heads: 2,
        n_kv_heads: 2,
        d_ffn: 64,
        ..Default::default()
    };
    cfg.routing.schedule = schedule;
    let vs = VarStore::new(Device::Cpu);
    let model = UnifiedTransformer::new(&vs.root(), &cfg).unwrap();
    (vs, model)
}

fn sequences(model: &UnifiedTransformer, task: Task, n: usize) -> Vec<Sequence> {
    let f = format();
    let v = &model.cfg.vocab;
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(1);
    (0..n)
        .map(|i| {
            let codes: Vec<u32> = (0..16u32)
                .map(|j| (j * 5 + i as u32 * 3) % v.n_codes as u32)
                .collect();
            let text: Vec<i64> = (0..(4 + i % 3) as i64).map(|j| 20 + j + i as i64).collect();
            match task {
                Task::MMU => f.mmu(v, &codes, &text, Some(&[30, 31])).unwrap(),
                _ => f.t2i(v, &text, Some(&codes), Some(&mut rng)).unwrap(),
            }
        })
        .collect()
}

/// `n` samples of one task, of different lengths (so padding is exercised).
pub fn batch_of(model: &UnifiedTransformer, task: Task, n: usize) -> Batch {
    Batch::from_sequences(&sequences(model, task, n), Device::Cpu).unwrap()
}

/// `n` T2I samples followed by `n` MMU samples.
pub fn mixed_batch(model: &UnifiedTransformer, n: usize) -> Batch {
    let mut s = sequences(model, Task::T2I, n);
    s.extend(sequences(model, Task::MMU, n));
    Batch::from_sequences(&s, Device::Cpu).unwrap()
}
