//! A layer of the unified transformer: dense, skipped, or routed (Mixture-of-Depths with one
//! router per task, UniMoD's T2I-MoD / MMU-MoD / Shared-MoD layers, and the generic MoD and
//! γ-MoD layers of the baselines). The schedule in `[routing]` picks each layer's kind.
//!
//! A routed layer, in top-k mode: per sample, among the tokens routable for its task, keep the
//! top k = max(1, ceil(capacity × n_routable)) by router score plus every non-routable token;
//! gather them in their original order, run the block among them only (attention mask sliced on
//! both axes, RoPE from original positions), multiply each routed token's update by
//! sigmoid(score) and add it to the residual; the other tokens pass unchanged.

use crate::block::{AttentionMaps, Block, LayerCache, Rope, Tokens};
use std::cell::{OnceCell, RefCell};
use std::rc::Rc;
use tch::{Kind, Tensor, nn};
use unimod_router::select::{self, gather_tokens, scatter_add_tokens};
use unimod_router::{
    Capacities, CausalPredictor, LayerPlan, Router, Routers, RoutingConfig, RoutingMode,
    tokens_kept,
};
use unimod_tok::{Batch, Segment, Task};

/// Everything a layer reads about the batch besides the hidden states, built once per forward.
#[derive(Debug)]
pub struct LayerInput<'a> {
    pub batch: &'a Batch,
    /// `[B, S]` token index in the sequence (with a cache: the new tokens' indices).
    pub index: Tensor,
    /// `[B, S]` not padding.
    pub valid: Tensor,
    /// `[B, S]` segment may be routed (before the task filter of each layer).
    pub routable_segment: Tensor,
    /// Host copy of the routable segments (gather widths are counted from it).
    pub routable_segments: Vec<Segment>,
    pub mode: RoutingMode,
    pub capture_attention: bool,
    /// What layers that route alike share, built by the first of them (see [`Shared`]).
    pub shared: RefCell<Vec<(Capacities, Rc<Shared>)>>,
}

/// What one forward pass's routed layers with the same capacities share: their routable and
/// always-processed tokens and their top-k budget. A few dozen small ops per layer otherwise;
/// on a CPU at small widths each costs tens of microseconds, which adds up to a visible share
/// of the time a routed layer saves.
#[derive(Debug)]
pub struct Shared {
    /// `[B, S]` valid tokens of routed tasks in routable segments.
    routable: Tensor,
    /// `[B, S]` valid tokens that must be processed.
    forced: Tensor,
    /// `[B, S, 1]` i64: each sample's column among per-task routers and predictors (its task's
    /// place in `routed_tasks()`; 0 for unrouted tasks).
    column: Tensor,
    top_k: OnceCell<(select::Budget, [Option<usize>; Task::COUNT])>,
}

impl LayerInput<'_> {
    fn shared(&self, capacity: &Capacities) -> Rc<Shared> {
        if let Some((_, s)) = self.shared.borrow().iter().find(|(c, _)| c == capacity) {
            return s.clone();
        }
        let task = &self.batch.task;
        let mut task_routed = task.zeros_like().to_kind(Kind::Bool);
        let mut column = task.zeros_like();
        for (i, t) in capacity.routed_tasks().into_iter().enumerate() {
            let is_t = task.eq(t as i64);
            task_routed = task_routed.logical_or(&is_t);
            if i > 0 {
                column += is_t * i as i64;
            }
        }
        let (b, s) = (self.batch.size() as i64, self.batch.seq_len());
        let routable = self
            .routable_segment
            .logical_and(&task_routed.unsqueeze(1))
            .logical_and(&self.valid);
        let shared = Rc::new(Shared {
            forced: self.valid.logical_and(&routable.logical_not()),
            routable,
            column: column.view([b, 1, 1]).expand([b, s, 1], false),
            top_k: OnceCell::new(),
        });
        self.shared.borrow_mut().push((*capacity, shared.clone()));
        shared
    }
}

/// Routing statistics of one routed layer, as tensors (read them when logging, not per step).
#[derive(Debug)]
pub struct RoutingStats {
    pub layer: usize,
    /// Tokens processed per task (exact host counts in top-k mode; `None` in threshold mode).
    pub processed: [Option<usize>; Task::COUNT],
    /// Valid tokens per task in the batch.
    pub total: [usize; Task::COUNT],
    /// `[B, S]` router logits (detached).
    pub scores: Tensor,
    /// `[B, S]` true for tokens the layer processed.
    pub processed_mask: Tensor,
    /// `[B, S]` true for routable tokens.
    pub routable: Tensor,
    /// `[B, S]` the causal predictor's logits, if trained.
    pub predictor_logits: Option<Tensor>,
}

impl RoutingStats {
    /// `([tasks, 2], [tasks, 2])`: processed and valid tokens by task and modality (text,
    /// image), on the device. Computed on demand, so training steps that do not log skip it.
    pub fn by_modality(&self, b: &Batch) -> (Tensor, Tensor) {
        // one-hot task [B, T] contracted with modality [B, S, 2]: [T, 2] counts in one op.
        let task_1h = b.task.one_hot(Task::COUNT as i64).to_kind(Kind::Float);
        let image = b.is_image();
        let modality = Tensor::stack(&[image.logical_not(), image], -1).to_kind(Kind::Float);
        let valid = b.valid().to_kind(Kind::Float).unsqueeze(-1);
        let count =
            |m: &Tensor| Tensor::einsum("bt,bsm->tm", &[&task_1h, &(&modality * m)], None::<i64>);
        let kept = count(&(self.processed_mask.to_kind(Kind::Float).unsqueeze(-1) * &valid));
        (kept, count(&valid))
    }
}

/// What a layer returns.
#[derive(Debug)]
pub struct LayerOutput {
    /// `[B, S, D]` new residual stream.
    pub hidden: Tensor,
    pub attention: Option<AttentionMaps>,
    pub routing: Option<RoutingStats>,
    /// What the router's and the causal predictor's auxiliary losses need (top-k mode only).
    pub aux_targets: Option<AuxTargets>,
    /// Tokens the block processed, summed over the batch (host count; attention pairs too).
    pub work: Work,
}

/// One routed layer's logits (with their graphs) and top-k membership. The model turns the
/// targets of all its layers into the auxiliary losses in one batched computation: per layer it
/// would be a dozen small ops, forward and backward, which on a CPU cost more than the block's
/// routing itself at small widths.
#[derive(Debug)]
pub struct AuxTargets {
    /// `[B, S]` router logits.
    pub router: Tensor,
    /// `[B, S]` causal-predictor logits, if trained.
    pub predictor: Option<Tensor>,
    /// `[B, S]` routable tokens in the top-k.
    pub in_topk: Tensor,
    /// `[B, S]` routable tokens.
    pub routable: Tensor,
}

/// Tokens processed and attention pairs computed, for the FLOPs model.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Work {
    pub tokens: f64,
    pub attention_pairs: f64,
    /// Router (and predictor) token evaluations.
    pub router_tokens: f64,
}

/// One routed layer's routers: one per task (UniMoD), or one shared by its tasks, or a handle on
/// the model's global router (γ-MoD).
#[derive(Debug)]
pub struct RoutedLayer {
    capacity: Capacities,
    /// `[tasks]` f64 capacity per task id (0 for unrouted tasks), on the model's device, so that
    /// k is computed on the device: copying per-step counts from the host would sync the GPU.
    capacity_by_task: Tensor,
    /// `[B, S, n]` scores: one column per routed task in the order of
    /// `capacity.routed_tasks()`, or one shared column.
    router: Router,
    /// One predictor per routed task, in the same order.
    predictor: Option<CausalPredictor>,
}

#[derive(Debug)]
pub enum LayerKind {
    Dense,
    Skip,
    Routed(RoutedLayer),
}

#[derive(Debug)]
pub struct Layer {
    pub index: usize,
    pub block: Block,
    pub kind: LayerKind,
}

impl Layer {
    /// `global_router` is the γ-MoD router every `Routers::Global` layer shares.
    pub fn new(
        p: nn::Path,
        index: usize,
        cfg: &crate::ModelConfig,
        plan: &LayerPlan,
        global_router: Option<&Router>,
    ) -> Layer {
        let block = Block::new(&p / "block", cfg);
        let kind = match plan {
            LayerPlan::Dense => LayerKind::Dense,
            LayerPlan::Skip => LayerKind::Skip,
            LayerPlan::Routed { capacity, routers } => LayerKind::Routed(RoutedLayer::new(
                &p,
                cfg.d_model,
                *capacity,
                *routers,
                &cfg.routing,
                global_router,
            )),
        };
        Layer { index, block, kind }
    }

    /// # Shapes
    /// `x: [B, S, D]` → `hidden: [B, S, D]`.
    pub fn forward(
        &self,
        x: &Tensor,
        input: &LayerInput,
        rope: &Rope,
        cache: Option<&mut LayerCache>,
    ) -> LayerOutput {
        let b = input.batch;
        let tokens = Tokens {
            positions: &b.positions,
            index: &input.index,
            upto: &b.attn_upto,
            valid: &input.valid,
        };
        match &self.kind {
            LayerKind::Skip => LayerOutput {
                hidden: x.shallow_clone(),
                attention: None,
                routing: None,
                aux_targets: None,
                work: Work::default(),
            },
            LayerKind::Dense => {
                let d = self
                    .block
                    .delta(x, &tokens, rope, cache, input.capture_attention);
                let work = Work::of_block(x, d.keys, 0.0);
                LayerOutput {
                    hidden: x + d.delta,
                    attention: d.attention,
                    routing: None,
                    aux_targets: None,
                    work,
                }
            }
            LayerKind::Routed(r) => {
                r.forward(self.index, &self.block, x, input, &tokens, rope, cache)
            }
        }
    }
}

/// The block's update computed among the `processed` tokens only (`[B, S]` bool): the others are
/// invisible as keys, and the caller zeroes or weights their update.
fn delta_among(
    block: &Block,
    x: &Tensor,
    tokens: &Tokens,
    processed: &Tensor,
    rope: &Rope,
    cache: Option<&mut LayerCache>,
    capture: bool,
) -> crate::block::BlockDelta {
    let valid = processed.logical_and(tokens.valid);
    let t = Tokens {
        positions: tokens.positions,
        index: tokens.index,
        upto: tokens.upto,
        valid: &valid,
    };
    block.delta(x, &t, rope, cache, capture)
}

impl Layer {
    /// The block applied to the tokens where `keep: [B, S]` is true, whatever the layer's kind
    /// (routers are not consulted); the other tokens pass through unchanged.
    pub fn forward_keeping(
        &self,
        x: &Tensor,
        input: &LayerInput,
        rope: &Rope,
        keep: &Tensor,
    ) -> LayerOutput {
        let b = input.batch;
        let tokens = Tokens {
            positions: &b.positions,
            index: &input.index,
            upto: &b.attn_upto,
            valid: &input.valid,
        };
        let d = delta_among(
            &self.block,
            x,
            &tokens,
            keep,
            rope,
            None,
            input.capture_attention,
        );
        let kept = keep
            .logical_and(&input.valid)
            .sum(Kind::Float)
            .double_value(&[]);
        LayerOutput {
            hidden: x + d.delta * keep.to_kind(x.kind()).unsqueeze(-1),
            attention: d.attention,
            routing: None,
            aux_targets: None,
            work: Work {
                tokens: kept,
                attention_pairs: kept * d.keys as f64,
                router_tokens: 0.0,
            },
        }
    }
}

impl Work {
    /// Work of a block over `x: [B, T, D]` attending to `keys` keys per query.
    fn of_block(x: &Tensor, keys: i64, router_tokens: f64) -> Work {
        let (b, t, _) = x.size3().expect("x is [B, T, D]");
        let tokens = (b * t) as f64;
        Work {
            tokens,
            attention_pairs: tokens * keys as f64,
            router_tokens,
        }
    }
}

impl RoutedLayer {
    fn new(
        p: &nn::Path,
        d_model: i64,
        capacity: Capacities,
        sharing: Routers,
        cfg: &RoutingConfig,
        global_router: Option<&Router>,
    ) -> RoutedLayer {
        let tasks = capacity.routed_tasks();
        let n_tasks = tasks.len() as i64;
        let router = match sharing {
            Routers::PerTask => Router::new(p / "router", d_model, cfg.router, n_tasks),
            Routers::Shared => Router::new(p / "router", d_model, cfg.router, 1),
            Routers::Global => global_router
                .expect("the model creates the global router for Routers::Global")
                .share(),
        };
        // Predictors are per task whatever the router sharing: they only imitate decisions.
        let predictor = cfg
            .causal_predictor
            .then(|| CausalPredictor::new(p / "predictor", d_model, n_tasks));
        let by_task: Vec<f64> = Task::ALL
            .iter()
            .map(|t| capacity.get(*t).unwrap_or(0.0))
            .collect();
        RoutedLayer {
            capacity,
            capacity_by_task: Tensor::from_slice(&by_task).to_device(p.device()),
            router,
            predictor,
        }
    }

    /// Each sample's own column of `[B, S, n]` per-task logits: `[B, S]`.
    fn own_column(logits: &Tensor, shared: &Shared) -> Tensor {
        match logits.size()[2] {
            1 => logits.squeeze_dim(-1),
            _ => logits.gather(2, &shared.column, false).squeeze_dim(-1),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        layer: usize,
        block: &Block,
        x: &Tensor,
        input: &LayerInput,
        tokens: &Tokens,
        rope: &Rope,
        cache: Option<&mut LayerCache>,
    ) -> LayerOutput {
        let b = input.batch;
        let shared = input.shared(&self.capacity);
        let (routable, forced) = (&shared.routable, &shared.forced);
        let score = Self::own_column(&self.router.score(x), &shared);
        let predictor_logits = self
            .predictor
            .as_ref()
            .map(|p| Self::own_column(&p.logits(x), &shared));
        let predictors = self.predictor.as_ref().map_or(0.0, |p| {
            p.columns() as f64 * CausalPredictor::cost_in_router_evals(x.size()[2])
        });
        let n_router_evals =
            (self.router.columns() as f64 + predictors) * (b.size() as f64 * b.seq_len() as f64);
        match input.mode {
            RoutingMode::TopK if cache.is_none() => self.top_k(
                layer,
                block,
                x,
                input,
                &score,
                &shared,
                predictor_logits,
                rope,
                n_router_evals,
            ),
            mode => {
                let decision = match (mode, &predictor_logits) {
                    (RoutingMode::ThresholdPredictor, Some(p)) => p.shallow_clone(),
                    _ => score.shallow_clone(),
                };
                let processed = select::threshold(&decision, routable, forced);
                let d = delta_among(
                    block,
                    x,
                    tokens,
                    &processed,
                    rope,
                    cache,
                    input.capture_attention,
                );
                let weight = score
                    .sigmoid()
                    .where_self(routable, &Tensor::ones([], (score.kind(), score.device())))
                    * processed.to_kind(score.kind());
                let stats = self.stats(
                    layer,
                    b,
                    &score,
                    &processed,
                    routable,
                    predictor_logits,
                    None,
                );
                LayerOutput {
                    hidden: x + d.delta * weight.unsqueeze(-1),
                    attention: d.attention,
                    routing: Some(stats),
                    aux_targets: None,
                    work: Work::of_block(x, d.keys, n_router_evals),
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn top_k(
        &self,
        layer: usize,
        block: &Block,
        x: &Tensor,
        input: &LayerInput,
        score: &Tensor,
        shared: &Shared,
        predictor_logits: Option<Tensor>,
        rope: &Rope,
        n_router_evals: f64,
    ) -> LayerOutput {
        let b = input.batch;
        let (budget, processed) = shared.top_k.get_or_init(|| self.budget(input, shared));
        let sel = select::top_k(score, budget);
        let gather = |t: &Tensor| t.gather(1, &sel.index, false);
        let (positions, upto) = (gather(&b.positions), gather(&b.attn_upto));
        let tokens = Tokens {
            positions: &positions,
            index: &sel.index,
            upto: &upto,
            valid: &sel.active,
        };
        let x_sel = gather_tokens(x, &sel.index);
        let d = block.delta(&x_sel, &tokens, rope, None, input.capture_attention);
        let hidden = scatter_add_tokens(x, &sel.index, &(d.delta * sel.weight.unsqueeze(-1)));
        let aux_targets = AuxTargets {
            router: score.shallow_clone(),
            predictor: predictor_logits.as_ref().map(Tensor::shallow_clone),
            in_topk: sel.in_topk,
            routable: shared.routable.shallow_clone(),
        };
        let stats = self.stats(
            layer,
            b,
            score,
            &sel.processed,
            &shared.routable,
            predictor_logits,
            Some(*processed),
        );
        LayerOutput {
            hidden,
            attention: d.attention,
            routing: Some(stats),
            aux_targets: Some(aux_targets),
            work: Work::of_block(&x_sel, d.keys, n_router_evals),
        }
    }

    /// Each sample keeps its non-routable tokens and k = max(1, ceil(capacity × n_routable)) of
    /// its routable ones; also the tokens processed per task, counted on the host.
    fn budget(
        &self,
        input: &LayerInput,
        shared: &Shared,
    ) -> (select::Budget, [Option<usize>; Task::COUNT]) {
        let b = input.batch;
        let mut processed = [None; Task::COUNT];
        let n_keep: Vec<usize> = (0..b.size())
            .map(|i| {
                let task = b.tasks[i];
                let valid = b.seq_len() as usize - b.count(i, &[Segment::Pad]);
                let keep = match self.capacity.get(task) {
                    None => valid,
                    Some(c) => {
                        let n_routable = b.count(i, &input.routable_segments);
                        valid - n_routable + tokens_kept(c, n_routable)
                    }
                };
                *processed[task.index()].get_or_insert(0) += keep;
                keep
            })
            .collect();
        let width = n_keep.iter().copied().max().unwrap_or(1).max(1) as i64;
        // The same k as the host counts above (same f64 arithmetic as `tokens_kept`), computed
        // from device tensors; the host counts give only the gather width and the statistics.
        let n_routable = shared.routable.sum_dim_intlist(1, false, Kind::Double);
        let kept = (self.capacity_by_task.index_select(0, &b.task) * &n_routable)
            .ceil()
            .clamp_min(1.0)
            .minimum(&n_routable);
        let n_keep_t = (input.valid.sum_dim_intlist(1, false, Kind::Double) - n_routable + kept)
            .to_kind(Kind::Int64);
        let budget = select::Budget::new(&shared.routable, &shared.forced, &n_keep_t, width);
        (budget, processed)
    }

    #[allow(clippy::too_many_arguments)]
    fn stats(
        &self,
        layer: usize,
        b: &Batch,
        score: &Tensor,
        processed_mask: &Tensor,
        routable: &Tensor,
        predictor_logits: Option<Tensor>,
        processed: Option<[Option<usize>; Task::COUNT]>,
    ) -> RoutingStats {
        let mut total = [0usize; Task::COUNT];
        for i in 0..b.size() {
            total[b.tasks[i].index()] += b.seq_len() as usize - b.count(i, &[Segment::Pad]);
        }
        RoutingStats {
            layer,
            processed: processed.unwrap_or([None; Task::COUNT]),
            total,
            scores: score.detach(),
            processed_mask: processed_mask.shallow_clone(),
            routable: routable.shallow_clone(),
            predictor_logits: predictor_logits.map(|p| p.detach()),
        }
    }
}
