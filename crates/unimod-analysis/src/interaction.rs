//! Task interaction: the competition probe (one router shared by T2I and MMU keeps a fraction
//! of the union of both tasks' tokens; the paper's Fig. 4 finds it keeps generation tokens) and
//! the cosine similarity of the two tasks' gradients in every layer.

use crate::AnalysisError;
use crate::importance::cosine;
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor, nn::VarStore};
use unimod_model::{ForwardOptions, UnifiedTransformer};
use unimod_router::{LayerPlan, Routers};
use unimod_tok::{Batch, Task};

/// Which task's tokens a router shared by both tasks keeps (the paper's Fig. 4).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Competition {
    /// The routed layer.
    pub layer: usize,
    /// Routable tokens of each task (T2I, MMU) the shared router keeps from the union.
    pub kept: [usize; 2],
    /// Routable tokens of each task in the batch.
    pub routable: [usize; 2],
    /// Per sample of each task (T2I, MMU), the share of its routable tokens kept: the unit
    /// over which the finding's uncertainty is computed (tokens of one sample are not
    /// independent draws).
    pub sample_share: [Vec<f64>; 2],
}

/// Per routed layer of a shared-router model, how many T2I and MMU tokens survive when the
/// router keeps `capacity` of the pooled routable tokens of the whole batch.
pub fn competition(
    model: &UnifiedTransformer,
    batch: &Batch,
    capacity: f64,
) -> Result<Vec<Competition>, AnalysisError> {
    if !(capacity > 0.0 && capacity <= 1.0) {
        return Err(AnalysisError::OutOfRange {
            what: "competition capacity",
            value: capacity,
            range: "(0, 1]",
        });
    }
    let shared = model.plans.iter().any(|p| {
        matches!(
            p,
            LayerPlan::Routed {
                routers: Routers::Shared | Routers::Global,
                ..
            }
        )
    });
    if !shared {
        return Err(AnalysisError::NoSharedRouter {
            found: format!("{:?}", model.cfg.routing.schedule),
        });
    }
    for task in [Task::T2I, Task::MMU] {
        if !batch.tasks.contains(&task) {
            return Err(AnalysisError::MissingTask { task });
        }
    }
    let out = tch::no_grad(|| model.forward(batch, &ForwardOptions::default()))?;
    // `[B·S]` true for the tokens of samples of task `t` (in the batch: checked above).
    let tokens_of = |t: Task| {
        let j = batch.task_set.iter().position(|x| *x == t).unwrap_or(0) as i64;
        batch
            .task
            .eq(j)
            .unsqueeze(1)
            .expand([batch.size() as i64, batch.seq_len()], false)
            .flatten(0, 1)
    };
    Ok(out
        .routing
        .iter()
        .map(|s| {
            let routable = s.routable.flatten(0, 1);
            let n = routable.sum(Kind::Int64).int64_value(&[]);
            let k = ((capacity * n as f64).ceil() as i64).clamp(1, n.max(1));
            let key = s
                .scores
                .flatten(0, 1)
                .to_kind(Kind::Float)
                .masked_fill(&routable.logical_not(), f64::NEG_INFINITY);
            let (_, idx) = key.topk(k, 0, true, false);
            let kept = routable
                .zeros_like()
                .index_fill(0, &idx, 1)
                .logical_and(&routable);
            let count = |m: &Tensor, t: Task| {
                m.logical_and(&tokens_of(t))
                    .sum(Kind::Int64)
                    .int64_value(&[]) as usize
            };
            let per_sample = |m: &Tensor| {
                Vec::<f64>::try_from(m.view([batch.size() as i64, -1]).sum_dim_intlist(
                    1,
                    false,
                    Kind::Double,
                ))
                .expect("counts are f64")
            };
            let (kept_i, routable_i) = (per_sample(&kept), per_sample(&routable));
            let share = |t: Task| {
                (0..batch.size())
                    .filter(|&i| batch.tasks[i] == t && routable_i[i] > 0.0)
                    .map(|i| kept_i[i] / routable_i[i])
                    .collect()
            };
            Competition {
                layer: s.layer,
                kept: [count(&kept, Task::T2I), count(&kept, Task::MMU)],
                routable: [count(&routable, Task::T2I), count(&routable, Task::MMU)],
                sample_share: [share(Task::T2I), share(Task::MMU)],
            }
        })
        .collect())
}

/// Per layer, the cosine similarity between the gradients of two tasks' losses (each on its
/// batch; T2I and MMU in the analysis) with respect to that layer's block weights. Negative:
/// the tasks pull the layer apart.
pub fn gradient_cosine(
    model: &UnifiedTransformer,
    vs: &VarStore,
    a: (&Batch, Task),
    b: (&Batch, Task),
) -> Result<Vec<f64>, AnalysisError> {
    let grads = |batch: &Batch, task: Task| -> Result<Vec<Tensor>, AnalysisError> {
        for mut v in vs.trainable_variables() {
            v.zero_grad();
        }
        let out = model.forward(batch, &ForwardOptions::default())?;
        let loss = model
            .losses(batch, &out)
            .per_task
            .remove(&task)
            .ok_or(AnalysisError::MissingTask { task })?;
        loss.backward();
        Ok(layer_gradients(vs, model.cfg.n_layers))
    };
    let a = grads(a.0, a.1)?;
    let b = grads(b.0, b.1)?;
    Ok(a.iter().zip(&b).map(|(x, y)| cosine(x, y)).collect())
}

/// Each layer's block gradients, flattened and concatenated in name order (routers excluded:
/// they are not shared weights).
fn layer_gradients(vs: &VarStore, n_layers: usize) -> Vec<Tensor> {
    let vars = vs.variables();
    (0..n_layers)
        .map(|l| {
            let prefix = format!("layers.{l}.block.");
            let mut names: Vec<&String> = vars.keys().filter(|n| n.starts_with(&prefix)).collect();
            names.sort();
            let parts: Vec<Tensor> = names
                .iter()
                .map(|n| {
                    let g = vars[*n].grad();
                    if g.defined() {
                        g.flatten(0, -1).copy()
                    } else {
                        vars[*n].zeros_like().flatten(0, -1)
                    }
                })
                .collect();
            Tensor::cat(&parts, 0)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{batch_of, mixed_batch, tiny_model};
    use unimod_router::Schedule;

    #[test]
    fn competition_keeps_the_capacity_of_the_union() {
        let (_vs, model) = tiny_model(Schedule::Mod {
            capacity: 0.5,
            layers: unimod_router::schedule::LayerSet::List(vec![1, 2]),
        });
        let b = mixed_batch(&model, 2);
        let c = competition(&model, &b, 0.5).unwrap();
        assert!(!c.is_empty());
        for row in &c {
            let n = row.routable[0] + row.routable[1];
            assert_eq!(row.kept[0] + row.kept[1], n.div_ceil(2));
            assert!(row.kept[0] <= row.routable[0] && row.kept[1] <= row.routable[1]);
        }
        let (_vs, per_task) = tiny_model(Schedule::Dense);
        assert!(matches!(
            competition(&per_task, &b, 0.5),
            Err(AnalysisError::NoSharedRouter { .. })
        ));
    }

    #[test]
    fn gradient_cosine_of_a_task_with_itself_is_one() {
        let (vs, model) = tiny_model(Schedule::Dense);
        let t = batch_of(&model, Task::T2I, 2);
        let m = batch_of(&model, Task::MMU, 2);
        let same = gradient_cosine(&model, &vs, (&t, Task::T2I), (&t, Task::T2I)).unwrap();
        assert!(same.iter().all(|c| (c - 1.0).abs() < 1e-6), "{same:?}");
        let cross = gradient_cosine(&model, &vs, (&t, Task::T2I), (&m, Task::MMU)).unwrap();
        assert_eq!(cross.len(), model.cfg.n_layers);
        assert!(cross.iter().all(|c| c.abs() < 1.0 - 1e-6));
    }
}
