//! CUDA graphs of the training step (`train.cuda_graphs = N`): each micro-batch's forward,
//! losses and backward captured once per step shape ([`UnifiedTransformer::step_shape`]: the
//! batch's size, length, row tasks and every routed layer's gather widths) and replayed with
//! the batch's tensors copied in. A shape is first run eagerly (the warm-up capture needs), then
//! captured the second time it comes; up to N graphs are kept, and a shape beyond them runs
//! eagerly. Gradients accumulate into the parameters' gradient tensors, which the optimizer
//! reads as after an eager step.
//!
//! What a replay reads from the host was fixed at capture: the widths (the shape) and the host
//! counts of the batch captured on. The step's metrics are those of the current batch all the
//! same: its work follows from the shape, its routing counts are recounted
//! ([`UnifiedTransformer::routing_counts`]). Without a GPU the same bookkeeping runs with the
//! static batch recomputed eagerly instead of replayed ([`StepGraphs::without_capture`]): what
//! the tests check against plain eager steps.

use crate::train::Micro;
use anyhow::{Context, Result};
use std::collections::{HashMap, HashSet};
use tch::{Device, Tensor};
use unimod_kernels::graph::{Graph, on_side_stream};
use unimod_model::layer::RoutingStats;
use unimod_model::{ModelConfig, UnifiedTransformer};
use unimod_tok::Batch;

/// The graphs of one run.
pub struct StepGraphs {
    max: usize,
    /// `Some(cuda device)`: capture and replay; `None`: recompute the static batch eagerly.
    device: Option<Device>,
    /// Shapes run once (eagerly): the next one is captured.
    warmed: HashSet<Vec<i64>>,
    entries: HashMap<Vec<i64>, Entry>,
    /// Micro-batches run by replay, by capture, and eagerly.
    pub counts: GraphCounts,
}

/// How a run's micro-batches ran.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GraphCounts {
    /// Replays of a captured graph.
    pub replayed: usize,
    /// Captures (each followed by its first replay).
    pub captured: usize,
    /// Eager runs: a shape's first, or one beyond the graphs kept.
    pub eager: usize,
}

/// One captured shape: its static inputs (the batch captured on, whose tensors each replay
/// overwrites) and its static outputs.
struct Entry {
    batch: Batch,
    label_counts: Tensor,
    out: Micro,
    graph: Option<Graph>,
}

impl StepGraphs {
    /// Graphs on the CUDA `device` for a model of config `model`, at most `max` kept.
    pub fn new(max: usize, device: Device, model: &ModelConfig) -> Result<StepGraphs> {
        anyhow::ensure!(
            device.is_cuda(),
            "train.cuda_graphs = {max} needs a CUDA device (train.device is {device:?}); set it to 0"
        );
        anyhow::ensure!(
            !model.mot && model.moma.is_none(),
            "train.cuda_graphs = {max}: Mixture-of-Transformers and MoMa size their dispatch \
             from the device, so their steps have no fixed shape to capture; set it to 0"
        );
        Ok(StepGraphs {
            device: Some(device),
            ..StepGraphs::without_capture(max)
        })
    }

    /// The same bookkeeping without CUDA: a shape's static batch is recomputed eagerly where a
    /// graph would be replayed. For tests on machines without a GPU.
    pub fn without_capture(max: usize) -> StepGraphs {
        StepGraphs {
            max,
            device: None,
            warmed: HashSet::new(),
            entries: HashMap::new(),
            counts: GraphCounts::default(),
        }
    }

    /// One micro-batch `b` with the step's label counts: `run(batch, label_counts)` is its
    /// forward, losses and backward, eagerly. Replayed, captured or run eagerly as its shape
    /// says; the outputs are `b`'s either way.
    pub fn step(
        &mut self,
        model: &UnifiedTransformer,
        b: &Batch,
        label_counts: &Tensor,
        run: impl Fn(&Batch, &Tensor) -> Result<Micro>,
    ) -> Result<Micro> {
        let Some(shape) = model.step_shape(b) else {
            anyhow::bail!(
                "train.cuda_graphs: Mixture-of-Transformers and MoMa size their dispatch from the \
                 device, so their steps have no fixed shape to capture; set it to 0"
            );
        };
        if let Some(e) = self.entries.get_mut(&shape) {
            tch::no_grad(|| copy_inputs(&e.batch, b, &e.label_counts, label_counts));
            match &e.graph {
                Some(g) => g
                    .replay()
                    .context("replaying a training step's CUDA graph")?,
                None => e.out = run(&e.batch, &e.label_counts)?,
            }
            self.counts.replayed += 1;
            return Ok(e.out.for_batch(model, b));
        }
        let full = self.entries.len() >= self.max;
        if full || !self.warmed.contains(&shape) {
            self.counts.eager += 1;
            if full {
                return run(b, label_counts);
            }
            self.warmed.insert(shape);
            return match self.device {
                // Capture needs the lazy initialisations (cuBLAS, autograd's streams) done on a
                // side stream first, as torch.cuda.graph does.
                Some(d) => on_side_stream(d, || run(b, label_counts))?,
                None => run(b, label_counts),
            };
        }
        // Static inputs: a copy of this batch, which each replay overwrites with its own.
        let batch = tch::no_grad(|| Batch {
            tokens: b.tokens.copy(),
            labels: b.labels.copy(),
            segment: b.segment.copy(),
            attn_upto: b.attn_upto.copy(),
            positions: b.positions.copy(),
            task: b.task.copy(),
            tasks: b.tasks.clone(),
            task_set: b.task_set.clone(),
            segment_counts: b.segment_counts.clone(),
            end: b.end.clone(),
        });
        let static_counts = label_counts.copy();
        let (out, graph) = match self.device {
            Some(d) => {
                let mut out = None;
                let graph = Graph::capture(d, || out = Some(run(&batch, &static_counts)))
                    .context("capturing a training step in a CUDA graph")?;
                let out = out.expect("the captured work ran")?;
                // Capture records without computing: the first replay is this step.
                graph
                    .replay()
                    .context("replaying a training step's CUDA graph")?;
                (out, Some(graph))
            }
            None => (run(&batch, &static_counts)?, None),
        };
        self.counts.captured += 1;
        let mine = out.for_batch(model, b);
        self.entries.insert(
            shape,
            Entry {
                batch,
                label_counts: static_counts,
                out,
                graph,
            },
        );
        Ok(mine)
    }
}

/// Overwrites the static inputs with `b`'s tensors and `counts`.
fn copy_inputs(to: &Batch, b: &Batch, to_counts: &Tensor, counts: &Tensor) {
    for (dst, src) in [
        (&to.tokens, &b.tokens),
        (&to.labels, &b.labels),
        (&to.segment, &b.segment),
        (&to.attn_upto, &b.attn_upto),
        (&to.positions, &b.positions),
        (&to.task, &b.task),
        (to_counts, counts),
    ] {
        dst.shallow_clone().copy_(src);
    }
}

impl Micro {
    /// These static outputs as `b`'s: the same tensors, with `b`'s own routing counts.
    fn for_batch(&self, model: &UnifiedTransformer, b: &Batch) -> Micro {
        let counts = model.routing_counts(b);
        Micro {
            objective: self.objective.shallow_clone(),
            losses: unimod_model::Losses {
                per_task: self
                    .losses
                    .per_task
                    .iter()
                    .map(|(t, l)| (*t, l.shallow_clone()))
                    .collect(),
                per_sample: self.losses.per_sample.shallow_clone(),
                aux: self.losses.aux.shallow_clone(),
                total: self.losses.total.shallow_clone(),
            },
            work: self.work.clone(),
            routing: self
                .routing
                .iter()
                .zip(counts)
                .map(|(s, c)| RoutingStats {
                    layer: s.layer,
                    processed: Some(c.processed),
                    total: c.total,
                    scores: s.scores.shallow_clone(),
                    processed_mask: s.processed_mask.shallow_clone(),
                    routable: s.routable.shallow_clone(),
                    predictor_logits: s.predictor_logits.as_ref().map(Tensor::shallow_clone),
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::micro_step;
    use tch::nn::VarStore;
    use unimod_router::{Capacities, LayerPlan, Routers, Schedule};
    use unimod_tok::{Flavour, FormatConfig, Sequence, Task, VocabLayout};

    const VOCAB: VocabLayout = VocabLayout {
        n_text: 40,
        n_codes: 16,
    };

    fn model() -> (VarStore, UnifiedTransformer) {
        let at = |t2i: f64, mmu: f64| LayerPlan::Routed {
            capacity: Capacities::of([(Task::T2I, t2i), (Task::MMU, mmu)]),
            routers: Routers::PerTask,
        };
        let shape = unimod_model::bench::Shape {
            d_model: 32,
            n_layers: 3,
            per_task: 2,
            image_side: 2,
        };
        let layers = vec![LayerPlan::Dense, at(0.5, 0.25), at(0.75, 0.5)];
        let mut cfg = unimod_model::bench::config(shape, Schedule::Explicit { layers });
        cfg.vocab = VOCAB;
        tch::manual_seed(0);
        let vs = VarStore::new(Device::Cpu);
        let m = UnifiedTransformer::new(&vs.root(), &cfg).unwrap();
        (vs, m)
    }

    /// Two T2I and two MMU sequences; the longest prompt of each task fixes the step's shape.
    fn batch(prompts: [&[i64]; 2], questions: [&[i64]; 2], seed: u64) -> Batch {
        let f = FormatConfig {
            flavour: Flavour::Showo,
            text_len: 8,
            image_side: 2,
            cond_dropout: 0.0,
            mmu_turns: 1,
        };
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed);
        let code = |i: u64| ((seed + i) % 16) as u32;
        let image = [code(1), code(2), code(3), code(4)];
        let seqs: Vec<Sequence> = prompts
            .iter()
            .map(|p| f.t2i(&VOCAB, p, Some(&image), Some(&mut rng)).unwrap())
            .chain(questions.iter().map(|q| {
                let answer = [20 + (seed % 5) as i64];
                f.mmu(&VOCAB, &image, q, Some(&answer)).unwrap()
            }))
            .collect();
        Batch::from_sequences(&seqs, Device::Cpu).unwrap()
    }

    /// A stream of micro-batches through the graphs' bookkeeping (static inputs recomputed
    /// where a graph would replay) gives each batch's eager losses, work, routing counts and
    /// gradients bit for bit: the shape key fixes all that a replay cannot recompute. With room
    /// for one graph, the shapes beyond it run eagerly.
    #[test]
    fn graphed_steps_are_eager_steps() {
        let long: &[i64] = &[11, 12, 13, 14, 15, 16];
        let q: &[i64] = &[30, 31, 32];
        // Shapes (the longest prompt and question of each task): x, x, y, x, y, z, x.
        let stream = [
            batch([long, &[11]], [q, &[30]], 1),
            batch([long, &[12, 13]], [q, &[31, 32]], 2),
            batch([&[11, 12], &[13]], [&[30], &[31]], 3),
            batch([&[14], long], [&[33], q], 4),
            batch([&[12, 11], &[14]], [&[32], &[30]], 5),
            batch([&[13], &[12, 14]], [&[31, 30], &[33]], 6),
            batch([long, long], [q, q], 7),
        ];
        let counts_with = |max: usize| {
            let ((eager_vs, eager), (mut graph_vs, graphed)) = (model(), model());
            // Copied, not reseeded: libtorch's generator is shared with tests on other threads.
            graph_vs.copy(&eager_vs).unwrap();
            let mut graphs = StepGraphs::without_capture(max);
            for (i, b) in stream.iter().enumerate() {
                for vs in [&eager_vs, &graph_vs] {
                    for mut t in vs.trainable_variables() {
                        t.zero_grad();
                    }
                }
                let counts = eager.label_counts(b);
                let want = micro_step(&eager, b, &counts, 1.0).unwrap();
                let got = graphs
                    .step(&graphed, b, &counts, |b, c| micro_step(&graphed, b, c, 1.0))
                    .unwrap();
                assert!(want.objective.equal(&got.objective), "batch {i}: objective");
                for (t, l) in &want.losses.per_task {
                    assert!(l.equal(&got.losses.per_task[t]), "batch {i}: {t} loss");
                }
                assert_eq!(want.work, got.work, "batch {i}: work");
                for (w, g) in want.routing.iter().zip(&got.routing) {
                    assert_eq!(
                        (&w.processed, &w.total),
                        (&g.processed, &g.total),
                        "batch {i}"
                    );
                }
                let grads = graph_vs.variables();
                for (name, p) in eager_vs.variables() {
                    if p.requires_grad() {
                        assert!(p.grad().equal(&grads[&name].grad()), "batch {i}: {name}");
                    }
                }
            }
            let c = graphs.counts;
            (c.eager, c.captured, c.replayed)
        };
        // x: eager, captured, replayed twice; y: eager, captured; z: eager.
        assert_eq!(counts_with(8), (3, 2, 2));
        // Room for one graph (x's): y and z run eagerly every time.
        assert_eq!(counts_with(1), (4, 1, 2));
    }

    #[test]
    fn graphs_need_a_cuda_device_and_a_fixed_shape() {
        let cfg = ModelConfig::default();
        let err = StepGraphs::new(4, Device::Cpu, &cfg).err().unwrap();
        assert!(err.to_string().contains("needs a CUDA device"), "{err}");
    }
}
