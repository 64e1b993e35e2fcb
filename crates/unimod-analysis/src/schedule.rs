//! The ARank-derived UniMoD schedule (the paper's layer switch, §4.1): for each task, the layers
//! with the lowest ARank become MoD layers for that task, each with a capacity read off its
//! ARank; a layer chosen by both tasks becomes a Shared-MoD layer (one router per task).
//!
//! The paper says only that the capacity comes from "normalising ARank by the sequence length".
//! The rule here: capacity = clamp(scale · ARank / T, min, max), T the task's mean number of
//! valid tokens per sample. ARank counts the independent directions of a layer's attention
//! scores; if r of T tokens span them, keeping about r tokens keeps what the layer can tell
//! apart, so the kept share is r / T. `scale` > 1 keeps a margin.

use crate::AnalysisError;
use serde::{Deserialize, Serialize};
use unimod_router::schedule::{Capacities, ScheduleFile};
use unimod_router::{LayerPlan, Routers};
use unimod_tok::Task;

/// `[analysis.schedule]`: the parameters of the ARank → schedule rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ArankRule {
    /// Share of the layers each task converts (the paper: half, those of lowest ARank).
    pub fraction: f64,
    /// Multiplies ARank / T before clamping.
    pub scale: f64,
    /// The lowest capacity a routed layer gets.
    pub min_capacity: f64,
    /// The highest capacity a routed layer gets.
    pub max_capacity: f64,
    /// The first layers are never routed (the paper's Table 1: early layers matter most).
    pub protect_first: usize,
}

impl Default for ArankRule {
    fn default() -> Self {
        ArankRule {
            fraction: 0.5,
            scale: 1.0,
            min_capacity: 0.2,
            max_capacity: 1.0,
            protect_first: 1,
        }
    }
}

/// One task's ARank per layer and its mean sequence length.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskArank {
    /// The task.
    pub task: Task,
    /// ARank per layer.
    pub arank: Vec<f64>,
    /// Mean valid tokens per sample (ARank is read against it).
    pub mean_tokens: f64,
}

impl ArankRule {
    /// Checks every field, naming the first one out of range.
    pub fn validate(&self) -> Result<(), AnalysisError> {
        let check = |what, value: f64, ok: bool, range| {
            if ok {
                Ok(())
            } else {
                Err(AnalysisError::OutOfRange { what, value, range })
            }
        };
        check(
            "schedule.fraction",
            self.fraction,
            self.fraction > 0.0 && self.fraction <= 1.0,
            "(0, 1]",
        )?;
        check("schedule.scale", self.scale, self.scale > 0.0, "(0, ∞)")?;
        check(
            "schedule.min_capacity",
            self.min_capacity,
            self.min_capacity > 0.0 && self.min_capacity <= self.max_capacity,
            "(0, max_capacity]",
        )?;
        check(
            "schedule.max_capacity",
            self.max_capacity,
            self.max_capacity <= 1.0,
            "(min_capacity, 1]",
        )
    }

    /// The capacity of a layer of ARank `arank` for sequences of `tokens` tokens.
    pub fn capacity(&self, arank: f64, tokens: f64) -> f64 {
        (self.scale * arank / tokens).clamp(self.min_capacity, self.max_capacity)
    }

    /// The schedule for `tasks` over `n_layers` layers.
    pub fn schedule(
        &self,
        tasks: &[TaskArank],
        n_layers: usize,
    ) -> Result<ScheduleFile, AnalysisError> {
        self.validate()?;
        let mut caps = vec![Vec::new(); n_layers];
        let n_routed = ((self.fraction * n_layers as f64).round() as usize)
            .min(n_layers.saturating_sub(self.protect_first));
        let mut lines = Vec::new();
        for t in tasks {
            let mut order: Vec<usize> = (self.protect_first..n_layers.min(t.arank.len())).collect();
            order.sort_by(|a, b| t.arank[*a].total_cmp(&t.arank[*b]));
            let mut chosen: Vec<usize> = order.into_iter().take(n_routed).collect();
            chosen.sort();
            for &l in &chosen {
                let c = self.capacity(t.arank[l], t.mean_tokens);
                caps[l].push((t.task, c));
            }
            lines.push(format!("{} → layers {chosen:?}", t.task));
        }
        let layers = caps
            .into_iter()
            .map(|capacity: Vec<(Task, f64)>| {
                if capacity.is_empty() {
                    LayerPlan::Dense
                } else {
                    LayerPlan::Routed {
                        capacity: Capacities::of(capacity),
                        routers: Routers::PerTask,
                    }
                }
            })
            .collect();
        Ok(ScheduleFile {
            note: format!(
                "ARank schedule: per task the {n_routed} lowest-ARank layers (first {} protected); capacity = clamp({} · ARank / tokens, {}, {}); {}",
                self.protect_first,
                self.scale,
                self.min_capacity,
                self.max_capacity,
                lines.join("; ")
            ),
            layers,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use unimod_router::Schedule;

    #[test]
    fn lowest_arank_layers_are_routed_and_shared_where_both_tasks_choose_them() {
        let tasks = [
            TaskArank {
                task: Task::T2I,
                arank: vec![50.0, 40.0, 30.0, 20.0],
                mean_tokens: 100.0,
            },
            TaskArank {
                task: Task::MMU,
                arank: vec![50.0, 10.0, 45.0, 5.0],
                mean_tokens: 50.0,
            },
        ];
        let s = ArankRule::default().schedule(&tasks, 4).unwrap();
        let caps = |l: usize| match &s.layers[l] {
            LayerPlan::Routed { capacity, .. } => {
                (capacity.get(Task::T2I), capacity.get(Task::MMU))
            }
            _ => (None, None),
        };
        assert_eq!(s.layers[0], LayerPlan::Dense);
        assert_eq!(caps(1), (None, Some(0.2)));
        assert_eq!(caps(2), (Some(0.3), None));
        assert_eq!(caps(3), (Some(0.2), Some(0.2)));
        // the file round-trips into the routers' schedule
        let dir = std::env::temp_dir().join(format!("arank-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("schedule.json");
        s.write(&path).unwrap();
        assert_eq!(Schedule::File { path }.resolve(4).unwrap(), s.layers);
        let bad = ArankRule {
            fraction: 0.0,
            ..Default::default()
        };
        assert!(bad.schedule(&tasks, 4).is_err());
    }
}
