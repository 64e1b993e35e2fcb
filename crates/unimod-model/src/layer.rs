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
    /// Router BCE (weighted) plus causal-predictor BCE; zero-sized when not routed.
    pub aux_loss: Option<Tensor>,
    /// Tokens the block processed, summed over the batch (host count; attention pairs too).
    pub work: Work,
}

/// Tokens processed and attention pairs computed, for the FLOPs model.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Work {
    pub tokens: f64,
    pub attention_pairs: f64,
    /// Router (and predictor) token evaluations.
    pub router_tokens: f64,
}

/// One routed layer's routers: one per task (UniMoD), or one handle on a shared router.
#[derive(Debug)]
pub struct RoutedLayer {
    capacity: Capacities,
    /// `[tasks]` f64 capacity per task id (0 for unrouted tasks), on the model's device, so that
    /// k is computed on the device: copying per-step counts from the host would sync the GPU.
    capacity_by_task: Tensor,
    routers: Vec<(Task, Router)>,
    predictors: Vec<(Task, CausalPredictor)>,
    aux_coef: f64,
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
                aux_loss: None,
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
                    aux_loss: None,
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
            aux_loss: None,
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
        let routers: Vec<(Task, Router)> = match sharing {
            Routers::PerTask => tasks
                .iter()
                .map(|t| {
                    (
                        *t,
                        Router::new(p / "router" / t.name(), d_model, cfg.router),
                    )
                })
                .collect(),
            Routers::Shared => {
                let r = Router::new(p / "router" / "shared", d_model, cfg.router);
                tasks.iter().map(|t| (*t, r.share())).collect()
            }
            Routers::Global => {
                let g =
                    global_router.expect("the model creates the global router for Routers::Global");
                tasks.iter().map(|t| (*t, g.share())).collect()
            }
        };
        // Predictors are per task whatever the router sharing: they only imitate decisions.
        let predictors = match cfg.causal_predictor {
            true => tasks
                .iter()
                .map(|t| {
                    (
                        *t,
                        CausalPredictor::new(p / "predictor" / t.name(), d_model),
                    )
                })
                .collect(),
            false => Vec::new(),
        };
        let by_task: Vec<f64> = Task::ALL
            .iter()
            .map(|t| capacity.get(*t).unwrap_or(0.0))
            .collect();
        RoutedLayer {
            capacity,
            capacity_by_task: Tensor::from_slice(&by_task).to_device(p.device()),
            routers,
            predictors,
            aux_coef: cfg.aux_loss,
        }
    }

    /// Per-sample value of a per-task tensor: `[B, S]` where each sample takes its task's entry.
    fn per_task(&self, items: &[(Task, Tensor)], task: &Tensor) -> Tensor {
        let (first, rest) = items
            .split_first()
            .expect("a routed layer routes at least one task");
        let mut out = first.1.shallow_clone();
        for (t, v) in rest {
            out = v.where_self(&task.eq(*t as i64).unsqueeze(1), &out);
        }
        out
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
        let task_routed = self.routed_mask(&b.task);
        let routable = input
            .routable_segment
            .logical_and(&task_routed.unsqueeze(1))
            .logical_and(&input.valid);
        let forced = input.valid.logical_and(&routable.logical_not());
        let scores: Vec<(Task, Tensor)> =
            self.routers.iter().map(|(t, r)| (*t, r.score(x))).collect();
        let score = self.per_task(&scores, &b.task);
        let predictor_logits = (!self.predictors.is_empty()).then(|| {
            let p: Vec<(Task, Tensor)> = self
                .predictors
                .iter()
                .map(|(t, p)| (*t, p.logits(x)))
                .collect();
            self.per_task(&p, &b.task)
        });
        let per_token = self.routers.len() as f64
            + self.predictors.len() as f64 * CausalPredictor::cost_in_router_evals(x.size()[2]);
        let n_router_evals = per_token * (b.size() as f64 * b.seq_len() as f64);
        match input.mode {
            RoutingMode::TopK if cache.is_none() => self.top_k(
                layer,
                block,
                x,
                input,
                &score,
                &routable,
                &forced,
                predictor_logits,
                rope,
                n_router_evals,
            ),
            mode => {
                let decision = match (mode, &predictor_logits) {
                    (RoutingMode::ThresholdPredictor, Some(p)) => p.shallow_clone(),
                    _ => score.shallow_clone(),
                };
                let processed = select::threshold(&decision, &routable, &forced);
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
                    .where_self(&routable, &Tensor::ones([], (score.kind(), score.device())))
                    * processed.to_kind(score.kind());
                let stats = self.stats(
                    layer,
                    b,
                    &score,
                    &processed,
                    &routable,
                    predictor_logits,
                    None,
                );
                LayerOutput {
                    hidden: x + d.delta * weight.unsqueeze(-1),
                    attention: d.attention,
                    routing: Some(stats),
                    aux_loss: None,
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
        routable: &Tensor,
        forced: &Tensor,
        predictor_logits: Option<Tensor>,
        rope: &Rope,
        n_router_evals: f64,
    ) -> LayerOutput {
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
        let n_routable = routable.sum_dim_intlist(1, false, Kind::Double);
        let kept = (self.capacity_by_task.index_select(0, &b.task) * &n_routable)
            .ceil()
            .clamp_min(1.0)
            .minimum(&n_routable);
        let n_keep_t = (input.valid.sum_dim_intlist(1, false, Kind::Double) - n_routable + kept)
            .to_kind(Kind::Int64);
        let sel = select::top_k(score, routable, forced, &n_keep_t, width);
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
        let mut aux = select::membership_bce(score, &sel.in_topk, routable) * self.aux_coef;
        if let Some(p) = &predictor_logits {
            aux += select::membership_bce(p, &sel.in_topk, routable);
        }
        let stats = self.stats(
            layer,
            b,
            score,
            &sel.processed,
            routable,
            predictor_logits,
            Some(processed),
        );
        LayerOutput {
            hidden,
            attention: d.attention,
            routing: Some(stats),
            aux_loss: Some(aux),
            work: Work::of_block(&x_sel, d.keys, n_router_evals),
        }
    }

    fn routed_mask(&self, task: &Tensor) -> Tensor {
        let mut m = task.zeros_like().to_kind(Kind::Bool);
        for t in self.capacity.routed_tasks() {
            m = m.logical_or(&task.eq(t as i64));
        }
        m
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
