//! Which layers route tokens, for which tasks, at which capacity, with which routers: the layer
//! switch of UniMoD and the schedules of its baselines, all resolved to one [`LayerPlan`] per
//! layer.
//!
//! Capacity means one thing everywhere: the fraction of a sample's *routable* tokens that a
//! layer processes (k = max(1, ceil(capacity × n_routable))); tokens that are not routable
//! (special tokens, protected segments) are always processed.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use unimod_vocab::Task;

/// Which router scores a task's tokens in a routed layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Routers {
    /// One router per task in this layer (UniMoD).
    #[default]
    PerTask,
    /// One router in this layer for every task (plain MoD, "w/o task-aware router").
    Shared,
    /// One router for every task and every routed layer (γ-MoD).
    Global,
}

/// Per-task capacities of one layer; a task without one has its tokens all processed.
///
/// Written as a table of task names, `{ t2i = 0.8, mmu = 0.2 }`; the key `"*"` gives every task
/// not named (what a router shared by all tasks uses: `{ "*" = 0.125 }`).
///
/// ```
/// use unimod_router::Capacities;
/// use unimod_vocab::Task;
///
/// let video = Task::named("video").unwrap();
/// let c: Capacities = toml::from_str("t2i = 0.8\nvideo = 0.3").unwrap();
/// assert_eq!(c.get(Task::T2I), Some(0.8));
/// assert_eq!(c.get(Task::MMU), None); // processed whole
/// assert_eq!(c.routed_tasks(&[Task::T2I, Task::MMU, video]), [Task::T2I, video]);
/// assert_eq!(Capacities::all(0.5).get(video), Some(0.5));
/// ```
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(try_from = "BTreeMap<String, f64>", into = "BTreeMap<String, f64>")]
pub struct Capacities {
    per_task: BTreeMap<Task, f64>,
    /// The capacity of every task not in `per_task`.
    others: Option<f64>,
}

/// The key of [`Capacities`] that names every task not named.
const OTHERS: &str = "*";

impl TryFrom<BTreeMap<String, f64>> for Capacities {
    type Error = unimod_vocab::BadTaskName;
    fn try_from(map: BTreeMap<String, f64>) -> Result<Capacities, Self::Error> {
        let mut c = Capacities::default();
        for (name, value) in map {
            if name == OTHERS {
                c.others = Some(value);
            } else {
                c.per_task.insert(Task::named(&name)?, value);
            }
        }
        Ok(c)
    }
}

impl From<Capacities> for BTreeMap<String, f64> {
    fn from(c: Capacities) -> Self {
        let mut map: BTreeMap<String, f64> = c
            .per_task
            .iter()
            .map(|(t, v)| (t.to_string(), *v))
            .collect();
        if let Some(v) = c.others {
            map.insert(OTHERS.into(), v);
        }
        map
    }
}

impl Capacities {
    /// Every task at capacity `c`.
    pub fn all(c: f64) -> Self {
        Capacities {
            per_task: BTreeMap::new(),
            others: Some(c),
        }
    }

    /// The named tasks at their capacities, the others processed whole.
    pub fn of(tasks: impl IntoIterator<Item = (Task, f64)>) -> Self {
        Capacities {
            per_task: tasks.into_iter().collect(),
            others: None,
        }
    }

    /// The task's capacity, `None` when its tokens are all processed.
    pub fn get(&self, task: Task) -> Option<f64> {
        self.per_task.get(&task).copied().or(self.others)
    }

    /// The tasks named one by one (not those `"*"` covers).
    pub fn named_tasks(&self) -> impl Iterator<Item = Task> + '_ {
        self.per_task.keys().copied()
    }

    /// The tasks of `tasks` that have a capacity, in task order: the order of a layer's router
    /// columns.
    pub fn routed_tasks(&self, tasks: &[Task]) -> Vec<Task> {
        let mut routed: Vec<Task> = tasks
            .iter()
            .copied()
            .filter(|t| self.get(*t).is_some())
            .collect();
        routed.sort();
        routed
    }

    /// Every value given, with the task it is for (`None`: the `"*"` entry).
    fn values(&self) -> impl Iterator<Item = (Option<Task>, f64)> + '_ {
        self.per_task
            .iter()
            .map(|(t, v)| (Some(*t), *v))
            .chain(self.others.map(|v| (None, v)))
    }
}

/// What one layer does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum LayerPlan {
    /// Every token is processed.
    Dense,
    /// No token is processed (early exit, interleaved layer skipping).
    Skip,
    /// Tokens of the tasks with a capacity are routed (T2I-MoD, MMU-MoD or Shared-MoD layer).
    Routed {
        /// Per-task capacities (a task without one is processed whole).
        capacity: Capacities,
        /// Which router scores each task.
        routers: Routers,
    },
}

impl LayerPlan {
    /// The paper's name for the layer type: `t2i-MoD` (one task routed, named after it),
    /// `shared-MoD` (several tasks, each by its own router), `generic-MoD` (one router for all).
    pub fn label(&self) -> String {
        match self {
            LayerPlan::Dense => "dense".into(),
            LayerPlan::Skip => "skip".into(),
            LayerPlan::Routed {
                routers: Routers::Shared | Routers::Global,
                ..
            } => "generic-MoD".into(),
            LayerPlan::Routed { capacity, .. } => {
                let named: Vec<Task> = capacity.named_tasks().collect();
                match (named.as_slice(), capacity.others) {
                    ([one], None) => format!("{one}-MoD"),
                    _ => "shared-MoD".into(),
                }
            }
        }
    }
}

/// A linear ramp of capacity across the routed layers, `[first, last]`; one value is constant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Ramp {
    /// One capacity for every routed layer.
    Constant(f64),
    /// `[first, last]`, interpolated linearly over the routed layers.
    Linear([f64; 2]),
}

impl Ramp {
    fn at(&self, i: usize, n: usize) -> f64 {
        match self {
            Ramp::Constant(c) => *c,
            Ramp::Linear([a, b]) if n > 1 => a + (b - a) * i as f64 / (n - 1) as f64,
            Ramp::Linear([a, _]) => *a,
        }
    }
}

/// Which layers a rule-based schedule routes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", untagged)]
pub enum LayerSet {
    /// `"last_half"`, `"interleaved"` (every other layer, starting with layer 1),
    /// `"all_but_ends"` (every layer but the first three and the last).
    Named(NamedLayers),
    /// Explicit layer indices.
    List(Vec<usize>),
}

/// The layer sets a schedule can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NamedLayers {
    /// Layers `L/2..L`: the paper's choice for UniMoD.
    LastHalf,
    /// Layers 1, 3, 5, …: MoD's choice (Raposo et al.).
    Interleaved,
    /// γ-MoD's deployed choice (`arank_mod` in its code): its ARank analysis left the first three
    /// layers and the last with high rank, so those stay dense and every other layer routes.
    AllButEnds,
}

impl LayerSet {
    fn resolve(&self, n_layers: usize) -> Vec<usize> {
        match self {
            LayerSet::Named(NamedLayers::LastHalf) => (n_layers / 2..n_layers).collect(),
            LayerSet::Named(NamedLayers::Interleaved) => (1..n_layers).step_by(2).collect(),
            LayerSet::Named(NamedLayers::AllButEnds) => (3..n_layers.saturating_sub(1)).collect(),
            LayerSet::List(v) => v.clone(),
        }
    }
}

/// A schedule as written in a config file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Schedule {
    /// Every layer dense.
    #[default]
    Dense,
    /// Layers `exit_after..` are skipped entirely.
    EarlyExit {
        /// The number of layers kept.
        exit_after: usize,
    },
    /// Every other layer (1, 3, 5, …) is skipped entirely.
    InterleavedSkip,
    /// Raposo et al.: one router per layer shared by all tasks, every other layer.
    Mod {
        /// Capacity of every routed layer (MoD's 12.5 % by default).
        #[serde(default = "default_mod_capacity")]
        capacity: f64,
        /// The routed layers (every other layer by default).
        #[serde(default = "interleaved")]
        layers: LayerSet,
    },
    /// UniMoD: per-task routers and capacities on chosen layers. The paper's Show-o recipe is
    /// `layers = "last_half"`, `t2i = 0.8`, `mmu = [1.0, 0.2]`; its Emu3 recipe
    /// `layers = "last_half"`, `t2i = 0.2`, `mmu = 0.2`.
    Unimod {
        /// The routed layers (the last half by default).
        #[serde(default = "last_half")]
        layers: LayerSet,
        /// T2I's capacity over the routed layers; absent: T2I tokens all processed.
        t2i: Option<Ramp>,
        /// MMU's capacity over the routed layers; absent: MMU tokens all processed.
        mmu: Option<Ramp>,
        /// LM's capacity over the routed layers; absent: LM tokens all processed.
        #[serde(default)]
        lm: Option<Ramp>,
        /// Any other task's capacity over the routed layers, by name (`{ video = 0.3 }`); the
        /// task must be declared in `model.tasks`.
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        tasks: BTreeMap<Task, Ramp>,
        /// Per-task routers (UniMoD) by default; `shared` is the paper's "w/o task-aware
        /// router" ablation.
        #[serde(default)]
        routers: Routers,
    },
    /// γ-MoD (Luo et al.): one router shared across layers and tasks (`Routers::Global`), on
    /// every layer but the first three and the last by default. Its router is a two-class
    /// softmax over (skip, keep) trained with cross-entropy against top-k membership; the
    /// softmax's keep probability is the sigmoid of the difference of the two logits, which is a
    /// `d → 1` linear router, so the linear router and its BCE auxiliary loss
    /// (`routing.aux_loss`, γ-MoD's 0.01) are that router. Its masked routing (questions never
    /// pruned) is `routing.routable` without `"question"`; configs/gamma-mod.toml sets both.
    GammaMod {
        /// Capacity of every routed layer (0.5 by default).
        #[serde(default = "default_gamma_capacity")]
        capacity: f64,
        /// The routed layers (all but the first three and the last by default).
        #[serde(default = "all_but_ends")]
        layers: LayerSet,
    },
    /// p-MoD's progressive ratio decay (Zhang et al., arXiv 2412.04449): layer `l` of `L`
    /// would keep `r(l) = cos(π·l / (L − 1)) / 2 + average` of the routable tokens; layers with
    /// `r(l) ≤ max` route with one shared router at capacity `max(r(l), min)`, the earlier ones
    /// stay dense. p-MoD routes vision tokens only: `routing.routable = ["image"]`
    /// (configs/p-mod.toml).
    PMod {
        /// The decay's mean ratio (0.5 by default).
        #[serde(default = "default_pmod_average")]
        average: f64,
        /// Layers whose ratio exceeds it stay dense (0.75 by default).
        #[serde(default = "default_pmod_max")]
        max: f64,
        /// The lowest capacity a layer gets (0.25 by default).
        #[serde(default = "default_pmod_min")]
        min: f64,
    },
    /// One plan per layer, spelled out (what `unimod analyze schedule` writes).
    Explicit {
        /// One plan per layer of the model.
        layers: Vec<LayerPlan>,
    },
    /// An explicit schedule read from a TOML or JSON file.
    File {
        /// The [`ScheduleFile`] to read.
        path: PathBuf,
    },
}

fn default_mod_capacity() -> f64 {
    0.125
}
fn default_gamma_capacity() -> f64 {
    0.5
}
// p-MoD's released recipe: `shiftedcos_decay_0.75_0.25` with router factor 0.5.
fn default_pmod_average() -> f64 {
    0.5
}
fn default_pmod_max() -> f64 {
    0.75
}
fn default_pmod_min() -> f64 {
    0.25
}
fn interleaved() -> LayerSet {
    LayerSet::Named(NamedLayers::Interleaved)
}
fn all_but_ends() -> LayerSet {
    LayerSet::Named(NamedLayers::AllButEnds)
}
fn last_half() -> LayerSet {
    LayerSet::Named(NamedLayers::LastHalf)
}

/// A schedule that cannot be applied to the model.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)] // the fields are named in each variant's message
pub enum ScheduleError {
    /// A layer index past the model's depth.
    #[error("routing.schedule: layer {layer} does not exist (the model has {n_layers} layers)")]
    NoSuchLayer { layer: usize, n_layers: usize },
    /// A capacity outside (0, 1].
    #[error("routing.schedule: capacity {value} for {task} in layer {layer} is outside (0, 1]")]
    Capacity {
        layer: usize,
        task: String,
        value: f64,
    },
    /// A built-in task given both by its own key and in `tasks`.
    #[error("routing.schedule: {task}'s capacity is given twice (as `{task}` and in `tasks`)")]
    Twice { task: Task },
    /// An explicit schedule whose length is not the model's depth.
    #[error("routing.schedule: explicit schedule has {got} layers, the model has {n_layers}")]
    LayerCount { got: usize, n_layers: usize },
    /// An early exit that keeps no layer.
    #[error("routing.schedule: exit_after = {0} leaves no layer")]
    NoLayers(usize),
    /// A layer set that is empty at this depth.
    #[error(
        "routing.schedule: its layer set routes no layer of a {n_layers}-layer model (the model would be dense)"
    )]
    NothingRouted { n_layers: usize },
    /// A schedule file that cannot be read.
    #[error("routing.schedule: cannot read schedule file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A schedule file that does not parse.
    #[error("routing.schedule: schedule file {path} is invalid: {message}")]
    Parse { path: PathBuf, message: String },
}

/// The file format `unimod analyze schedule` writes and [`Schedule::File`] reads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleFile {
    /// How the schedule was derived, for the reader.
    #[serde(default)]
    pub note: String,
    /// One plan per layer.
    pub layers: Vec<LayerPlan>,
}

impl ScheduleFile {
    /// Reads a `.json` file as JSON, anything else as TOML.
    pub fn read(path: &Path) -> Result<ScheduleFile, ScheduleError> {
        let text = std::fs::read_to_string(path).map_err(|source| ScheduleError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let parsed = if path.extension().is_some_and(|e| e == "json") {
            serde_json::from_str(&text).map_err(|e| e.to_string())
        } else {
            toml::from_str(&text).map_err(|e| e.to_string())
        };
        parsed.map_err(|message| ScheduleError::Parse {
            path: path.to_path_buf(),
            message,
        })
    }

    /// Writes the schedule as pretty-printed JSON.
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let text = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
        std::fs::write(path, text)
    }
}

impl Schedule {
    /// One plan per layer, validated against the model's depth.
    ///
    /// ```
    /// use unimod_router::{LayerPlan, Schedule};
    /// use unimod_vocab::Task;
    ///
    /// // The paper's Show-o recipe on an 8-layer model: the last half routes, T2I keeps 80 %,
    /// // MMU falls from 100 % to 20 % across those layers.
    /// let recipe: Schedule = toml::from_str(
    ///     r#"kind = "unimod"
    ///        t2i = 0.8
    ///        mmu = [1.0, 0.2]"#,
    /// )
    /// .unwrap();
    /// let plans = recipe.resolve(8).unwrap();
    /// assert_eq!(plans[3], LayerPlan::Dense);
    /// assert_eq!(plans[4].label(), "shared-MoD");
    /// let LayerPlan::Routed { capacity, .. } = &plans[7] else { unreachable!() };
    /// assert_eq!(capacity.get(Task::T2I), Some(0.8));
    /// assert!((capacity.get(Task::MMU).unwrap() - 0.2).abs() < 1e-12);
    /// // A layer the model does not have is refused, not ignored.
    /// let bad: Schedule = toml::from_str(r#"kind = "mod"
    ///                                       layers = [9]"#).unwrap();
    /// assert!(bad.resolve(8).unwrap_err().to_string().contains("layer 9 does not exist"));
    /// ```
    pub fn resolve(&self, n_layers: usize) -> Result<Vec<LayerPlan>, ScheduleError> {
        let mut plans = vec![LayerPlan::Dense; n_layers];
        let mut route = |layers: &[usize], cap: &dyn Fn(usize, usize) -> Capacities, routers| {
            if layers.is_empty() {
                return Err(ScheduleError::NothingRouted { n_layers });
            }
            for (i, &l) in layers.iter().enumerate() {
                if l >= n_layers {
                    return Err(ScheduleError::NoSuchLayer { layer: l, n_layers });
                }
                plans[l] = LayerPlan::Routed {
                    capacity: cap(i, layers.len()),
                    routers,
                };
            }
            Ok(())
        };
        match self {
            Schedule::Dense => {}
            Schedule::EarlyExit { exit_after } => {
                if *exit_after == 0 {
                    return Err(ScheduleError::NoLayers(0));
                }
                for p in plans.iter_mut().skip(*exit_after) {
                    *p = LayerPlan::Skip;
                }
            }
            Schedule::InterleavedSkip => {
                for p in plans.iter_mut().skip(1).step_by(2) {
                    *p = LayerPlan::Skip;
                }
            }
            Schedule::Mod { capacity, layers } => route(
                &layers.resolve(n_layers),
                &|_, _| Capacities::all(*capacity),
                Routers::Shared,
            )?,
            Schedule::GammaMod { capacity, layers } => route(
                &layers.resolve(n_layers),
                &|_, _| Capacities::all(*capacity),
                Routers::Global,
            )?,
            Schedule::Unimod {
                layers,
                t2i,
                mmu,
                lm,
                tasks,
                routers,
            } => {
                let built_in = [(Task::T2I, t2i), (Task::MMU, mmu), (Task::LM, lm)];
                if let Some(task) = built_in
                    .iter()
                    .find(|(t, r)| r.is_some() && tasks.contains_key(t))
                    .map(|(t, _)| *t)
                {
                    return Err(ScheduleError::Twice { task });
                }
                let ramps: Vec<(Task, &Ramp)> = built_in
                    .iter()
                    .filter_map(|(t, r)| r.as_ref().map(|r| (*t, r)))
                    .chain(tasks.iter().map(|(t, r)| (*t, r)))
                    .collect();
                route(
                    &layers.resolve(n_layers),
                    &|i, n| Capacities::of(ramps.iter().map(|(t, r)| (*t, r.at(i, n)))),
                    *routers,
                )?
            }
            Schedule::PMod { average, max, min } => {
                let r = |l: usize| {
                    let x = l as f64 / (n_layers.max(2) - 1) as f64;
                    (std::f64::consts::PI * x).cos() / 2.0 + average
                };
                let routed: Vec<usize> = (0..n_layers).filter(|&l| r(l) <= *max).collect();
                route(
                    &routed,
                    &|i, _| Capacities::all(r(routed[i]).max(*min)),
                    Routers::Shared,
                )?
            }
            Schedule::Explicit { layers } => {
                if layers.len() != n_layers {
                    return Err(ScheduleError::LayerCount {
                        got: layers.len(),
                        n_layers,
                    });
                }
                plans = layers.clone();
            }
            Schedule::File { path } => {
                return Schedule::Explicit {
                    layers: ScheduleFile::read(path)?.layers,
                }
                .resolve(n_layers);
            }
        }
        validate(&plans)?;
        Ok(plans)
    }
}

fn validate(plans: &[LayerPlan]) -> Result<(), ScheduleError> {
    for (layer, p) in plans.iter().enumerate() {
        if let LayerPlan::Routed { capacity, .. } = p {
            for (task, value) in capacity.values() {
                if !(value > 0.0 && value <= 1.0) {
                    let task = task.map_or_else(|| OTHERS.to_string(), |t| t.to_string());
                    return Err(ScheduleError::Capacity { layer, task, value });
                }
            }
        }
    }
    Ok(())
}

/// Tokens a routed layer keeps of `n_routable`: max(1, ceil(capacity × n)), never more than n.
pub fn tokens_kept(capacity: f64, n_routable: usize) -> usize {
    if n_routable == 0 {
        return 0;
    }
    ((capacity * n_routable as f64).ceil() as usize).clamp(1, n_routable)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Schedule {
        #[derive(Deserialize)]
        struct W {
            schedule: Schedule,
        }
        toml::from_str::<W>(s).unwrap().schedule
    }

    #[test]
    fn paper_showo_recipe() {
        let s = parse("schedule = { kind = 'unimod', t2i = 0.8, mmu = [1.0, 0.2] }");
        let plans = s.resolve(24).unwrap();
        assert!(plans[..12].iter().all(|p| *p == LayerPlan::Dense));
        let caps: Vec<Capacities> = plans[12..]
            .iter()
            .map(|p| match p {
                LayerPlan::Routed {
                    capacity,
                    routers: Routers::PerTask,
                } => capacity.clone(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(caps[0].get(Task::MMU), Some(1.0));
        assert!((caps[11].get(Task::MMU).unwrap() - 0.2).abs() < 1e-12);
        assert!(
            caps.iter()
                .all(|c| c.get(Task::T2I) == Some(0.8) && c.get(Task::LM).is_none())
        );
        assert_eq!(plans[12].label(), "shared-MoD");
    }

    #[test]
    fn gamma_mod_routes_all_but_the_first_three_and_the_last_with_one_router() {
        let plans = parse("schedule = { kind = 'gamma_mod' }")
            .resolve(8)
            .unwrap();
        for (l, p) in plans.iter().enumerate() {
            match p {
                LayerPlan::Routed {
                    routers: Routers::Global,
                    capacity,
                } => {
                    assert!((3..7).contains(&l), "layer {l} routed");
                    assert_eq!(capacity.get(Task::T2I), Some(0.5));
                }
                LayerPlan::Dense => assert!(!(3..7).contains(&l), "layer {l} dense"),
                other => panic!("{other:?}"),
            }
        }
        let e = parse("schedule = { kind = 'gamma_mod' }")
            .resolve(4)
            .unwrap_err();
        assert!(e.to_string().contains("routes no layer"), "{e}");
    }

    /// A task beyond the built-in ones is configuration: its capacity by name, its own label
    /// when it is the only task of a layer, refusals for a bad name or a capacity given twice.
    #[test]
    fn unimod_routes_any_named_task() {
        let video = Task::named("video").unwrap();
        let plans =
            parse("schedule = { kind = 'unimod', t2i = 0.8, tasks = { video = [0.6, 0.2] } }")
                .resolve(4)
                .unwrap();
        let LayerPlan::Routed { capacity, .. } = &plans[3] else {
            panic!("{:?}", plans[3])
        };
        assert_eq!(capacity.get(Task::T2I), Some(0.8));
        assert!((capacity.get(video).unwrap() - 0.2).abs() < 1e-12);
        assert_eq!(capacity.get(Task::MMU), None);
        let only_video = parse("schedule = { kind = 'unimod', tasks = { video = 0.5 } }");
        assert_eq!(only_video.resolve(4).unwrap()[2].label(), "video-MoD");
        let twice = parse("schedule = { kind = 'unimod', t2i = 0.5, tasks = { t2i = 0.4 } }");
        assert!(
            twice
                .resolve(4)
                .unwrap_err()
                .to_string()
                .contains("given twice")
        );
        #[derive(Debug, Deserialize)]
        #[allow(dead_code)]
        struct W {
            schedule: Schedule,
        }
        let bad = toml::from_str::<W>("schedule = { kind = 'unimod', tasks = { 'Vid eo' = 0.5 } }");
        assert!(bad.unwrap_err().to_string().contains("is not accepted"));
    }

    #[test]
    fn plain_mod_routes_every_other_layer() {
        let plans = parse("schedule = { kind = 'mod' }").resolve(6).unwrap();
        let labels: Vec<String> = plans.iter().map(LayerPlan::label).collect();
        assert_eq!(
            labels,
            [
                "dense",
                "generic-MoD",
                "dense",
                "generic-MoD",
                "dense",
                "generic-MoD"
            ]
        );
    }

    /// p-MoD's 32-layer recipe, against its released code's formula (`shifted_cos_with_ratio`):
    /// layers 11–31 route, capacity 0.75 → 0.25, layers 21–31 at the floor.
    #[test]
    fn p_mod_decays_like_the_reference() {
        let plans = parse("schedule = { kind = 'p_mod' }").resolve(32).unwrap();
        let reference = |l: f64| (l * std::f64::consts::PI / 31.0).cos() / 2.0 + 0.5;
        for (l, plan) in plans.iter().enumerate() {
            let r = reference(l as f64);
            match plan {
                LayerPlan::Dense => assert!(r > 0.75, "layer {l}: {r}"),
                LayerPlan::Routed { capacity, routers } => {
                    assert_eq!(*routers, Routers::Shared);
                    assert!((capacity.get(Task::MMU).unwrap() - r.max(0.25)).abs() < 1e-12);
                }
                LayerPlan::Skip => panic!("layer {l} skipped"),
            }
        }
        let routed = plans
            .iter()
            .filter(|p| matches!(p, LayerPlan::Routed { .. }))
            .count();
        assert_eq!(routed, 21);
    }

    #[test]
    fn early_exit_and_interleaved_skip() {
        let ee = Schedule::EarlyExit { exit_after: 2 }.resolve(4).unwrap();
        assert_eq!(
            ee,
            [
                LayerPlan::Dense,
                LayerPlan::Dense,
                LayerPlan::Skip,
                LayerPlan::Skip
            ]
        );
        let il = Schedule::InterleavedSkip.resolve(4).unwrap();
        assert_eq!(
            il,
            [
                LayerPlan::Dense,
                LayerPlan::Skip,
                LayerPlan::Dense,
                LayerPlan::Skip
            ]
        );
    }

    #[test]
    fn bad_schedules_name_the_problem() {
        let e = parse("schedule = { kind = 'unimod', layers = [7], t2i = 0.5 }")
            .resolve(4)
            .unwrap_err();
        assert!(e.to_string().contains("layer 7 does not exist"), "{e}");
        let e = parse("schedule = { kind = 'unimod', t2i = 1.5 }")
            .resolve(4)
            .unwrap_err();
        assert!(e.to_string().contains("capacity 1.5 for t2i"), "{e}");
        let e = parse("schedule = { kind = 'mod', capacity = 0.0 }")
            .resolve(4)
            .unwrap_err();
        assert!(e.to_string().contains("outside (0, 1]"), "{e}");
    }

    #[test]
    fn schedule_file_round_trips() {
        let plans = parse("schedule = { kind = 'unimod', t2i = 0.8, mmu = [1.0, 0.5] }")
            .resolve(4)
            .unwrap();
        let path =
            std::env::temp_dir().join(format!("unimod-schedule-{}.json", std::process::id()));
        ScheduleFile {
            note: "test".into(),
            layers: plans.clone(),
        }
        .write(&path)
        .unwrap();
        let back = Schedule::File { path: path.clone() }.resolve(4).unwrap();
        assert_eq!(back, plans);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn kept_tokens_rule() {
        assert_eq!(tokens_kept(0.125, 64), 8);
        assert_eq!(tokens_kept(0.01, 64), 1);
        assert_eq!(tokens_kept(1.0, 64), 64);
        assert_eq!(tokens_kept(0.8, 10), 8);
        assert_eq!(tokens_kept(0.5, 0), 0);
    }
}
