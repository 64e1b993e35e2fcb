//! A layer of the unified transformer: dense, skipped, or routed (Mixture-of-Depths with one
//! router per task, UniMoD's T2I-MoD / MMU-MoD / Shared-MoD layers, and the generic MoD and
//! γ-MoD layers of the baselines). The schedule in `[routing]` picks each layer's kind.
//!
//! A routed layer, in top-k mode: per sample, among the tokens routable for its task, keep the
//! top k = max(1, ceil(capacity × n_routable)) by router score plus every non-routable token;
//! gather them in their original order, run the block among them only (attention mask sliced on
//! both axes, RoPE from original positions), multiply each routed token's update by
//! sigmoid(score) and add it to the residual; the other tokens pass unchanged.

use crate::block::{AttentionMaps, Block, Dispatch, LayerCache, Rope, Tokens};
use crate::moma::ExpertTargets;
use std::cell::{OnceCell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;
use tch::{Kind, Tensor, nn};
use unimod_router::select;
use unimod_router::{
    Capacities, CausalPredictor, LayerPlan, Router, Routers, RoutingConfig, RoutingMode,
    router_evals_per_token, tokens_kept,
};
use unimod_tok::{Batch, Segment, Task};

/// Everything a layer reads about the batch besides the hidden states, built once per forward.
#[derive(Debug)]
pub struct LayerInput<'a> {
    /// The batch: its tasks, segments and padding.
    pub batch: &'a Batch,
    /// The model's tasks (`model.tasks`): the tasks a layer's capacities may name.
    pub tasks: &'a [Task],
    /// `[B, S]` token index in the sequence (with a cache: the new tokens' indices).
    pub index: Tensor,
    /// `[B, S]` not padding.
    pub valid: Tensor,
    /// `[B, S]` segment may be routed (before the task filter of each layer).
    pub routable_segment: Tensor,
    /// Host copy of the routable segments (gather widths are counted from it).
    pub routable_segments: Vec<Segment>,
    /// How routed layers decide in this pass.
    pub mode: RoutingMode,
    /// Keep attention probabilities (the slow path; analyses only).
    pub capture_attention: bool,
    /// Each modality's tokens of the batch (Mixture-of-Transformers), computed once for every
    /// layer that processes the whole frame.
    pub dispatch: Option<Dispatch>,
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
    /// `[B]` f64 each sample's capacity (0 for unrouted tasks), on the device, so that k is
    /// computed there: copying per-step counts from the host would sync the GPU.
    capacity: Tensor,
    top_k: OnceCell<TopK>,
}

/// The samples of one task (a batch holds each task's samples together, as Show-o concatenates
/// per-task sub-batches). A routed layer processes each group at its own gather width, so a
/// task kept at capacity 0.2 is not padded to the width of one kept at 0.8 or not routed at
/// all: the compute saved is each task's own. A task the layer does not route keeps all its
/// valid tokens (they are all forced), so padding is skipped alike.
#[derive(Debug)]
struct Group {
    rows: Rows,
    budget: select::Budget,
}

/// Which rows of the batch a group holds.
#[derive(Debug)]
enum Rows {
    /// `len` consecutive rows from `start`: a view, no copy.
    Run { start: i64, len: i64 },
    /// `[n]` i64 row indices on the device: a task whose samples are interleaved with
    /// another's, gathered so that the layer still runs one group per task, not one per run.
    Picked(Tensor),
}

impl Rows {
    /// These rows of a `[B, ..]` tensor.
    fn of(&self, t: &Tensor) -> Tensor {
        match self {
            Rows::Run { start: 0, len } if *len == t.size()[0] => t.shallow_clone(),
            Rows::Run { start, len } => t.narrow(0, *start, *len),
            Rows::Picked(index) => t.index_select(0, index),
        }
    }
}

impl Group {
    /// The group's rows of a `[B, ..]` tensor.
    fn rows(&self, t: &Tensor) -> Tensor {
        self.rows.of(t)
    }
}

/// Each task's rows of `b`, tasks in order of first appearance.
fn rows_per_task(b: &Batch) -> Vec<(Task, Vec<usize>)> {
    let mut tasks: Vec<(Task, Vec<usize>)> = Vec::new();
    for (i, task) in b.tasks.iter().enumerate() {
        match tasks.iter_mut().find(|(t, _)| t == task) {
            Some((_, rows)) => rows.push(i),
            None => tasks.push((*task, vec![i])),
        }
    }
    tasks
}

/// The gather width of each of `tasks` (each task's rows): the most tokens one of its samples
/// keeps (`n_keep`, per sample), at least 1.
fn widths_per_task(tasks: &[(Task, Vec<usize>)], n_keep: &[usize]) -> Vec<i64> {
    let widest = |rows: &[usize]| rows.iter().map(|&i| n_keep[i]).max().unwrap_or(1).max(1);
    tasks.iter().map(|(_, rows)| widest(rows) as i64).collect()
}

/// The tokens kept per task of `b`, given each sample's (`n_keep`).
fn processed_per_task(b: &Batch, n_keep: &[usize]) -> BTreeMap<Task, usize> {
    let mut processed = BTreeMap::new();
    for (task, keep) in b.tasks.iter().zip(n_keep) {
        *processed.entry(*task).or_insert(0) += keep;
    }
    processed
}

/// Valid (non-padding) tokens per task of `b` (what [`RoutingStats::total`] holds).
pub(crate) fn valid_per_task(b: &Batch) -> BTreeMap<Task, usize> {
    let mut total = BTreeMap::new();
    for i in 0..b.size() {
        *total.entry(b.tasks[i]).or_insert(0) += b.seq_len() as usize - b.count(i, &[Segment::Pad]);
    }
    total
}

/// How a routed layer's top-k runs on a batch (built once per forward for all layers with the
/// same capacities): its groups, the tokens it processes per task (host counts), and, when the
/// groups are not in batch order, `[B]` the rows of the groups' concatenation that restore it.
#[derive(Debug)]
struct TopK {
    groups: Vec<Group>,
    processed: BTreeMap<Task, usize>,
    restore: Option<Tensor>,
}

impl LayerInput<'_> {
    /// The whole frame's tokens; `uncached`: no KV cache, so a top-k mode may look ahead.
    fn tokens(&self, uncached: bool) -> Tokens<'_> {
        let b = self.batch;
        Tokens {
            positions: &b.positions,
            index: &self.index,
            upto: &b.attn_upto,
            valid: &self.valid,
            dispatch: self.dispatch.as_ref(),
            lookahead: uncached && self.mode == RoutingMode::TopK,
        }
    }

    fn shared(&self, capacity: &Capacities) -> Rc<Shared> {
        if let Some((_, s)) = self.shared.borrow().iter().find(|(c, _)| c == capacity) {
            return s.clone();
        }
        // Per sample, on the device from the batch's task index: routed or not, its router
        // column and its capacity (one scalar op per task of the batch, no host copy).
        let routed = capacity.routed_tasks(self.tasks);
        let task = &self.batch.task;
        let mut task_routed = task.zeros_like().to_kind(Kind::Bool);
        let mut column = task.zeros_like();
        let mut per_sample = task.zeros_like().to_kind(Kind::Double);
        for (j, t) in self.batch.task_set.iter().enumerate() {
            let (Some(i), Some(c)) = (routed.iter().position(|r| r == t), capacity.get(*t)) else {
                continue;
            };
            let is_t = task.eq(j as i64);
            task_routed = task_routed.logical_or(&is_t);
            column += &is_t * i as i64;
            per_sample += is_t.to_kind(Kind::Double) * c;
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
            capacity: per_sample,
            top_k: OnceCell::new(),
        });
        self.shared
            .borrow_mut()
            .push((capacity.clone(), shared.clone()));
        shared
    }
}

/// Routing statistics of one routed layer, as tensors (read them when logging, not per step).
#[derive(Debug)]
pub struct RoutingStats {
    /// The layer's index in the model.
    pub layer: usize,
    /// Tokens processed per task of the batch (exact host counts in top-k mode; `None` in
    /// threshold mode).
    pub processed: Option<BTreeMap<Task, usize>>,
    /// Valid tokens per task of the batch.
    pub total: BTreeMap<Task, usize>,
    /// `[B, S]` router logits (detached).
    pub scores: Tensor,
    /// `[B, S]` true for tokens the layer processed.
    pub processed_mask: Tensor,
    /// `[B, S]` true for routable tokens.
    pub routable: Tensor,
    /// `[B, S]` the causal predictor's logits, if trained.
    pub predictor_logits: Option<Tensor>,
}

/// What a layer returns.
#[derive(Debug)]
pub struct LayerOutput {
    /// `[B, S, D]` new residual stream.
    pub hidden: Tensor,
    /// Attention maps, when asked for.
    pub attention: Option<AttentionMaps>,
    /// Routing statistics (routed layers only).
    pub routing: Option<RoutingStats>,
    /// What the router's and the causal predictor's auxiliary losses need (top-k mode only).
    pub aux_targets: Option<AuxTargets>,
    /// MoMa's auxiliary-router targets, one per expert group (expert-choice mode).
    pub experts: Vec<ExpertTargets>,
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
    /// Tokens through the attention projections.
    pub tokens: f64,
    /// Token-slots through one FFN's weights: `tokens` for an MLP, the experts' taken tokens
    /// (padding slots of their batched matmul included) under MoMa.
    pub ffn_tokens: f64,
    /// Query–key pairs attention scored.
    pub attention_pairs: f64,
    /// Router (and predictor) token evaluations.
    pub router_tokens: f64,
}

/// One routed layer's routers: one per task (UniMoD), or one shared by its tasks, or a handle on
/// the model's global router (γ-MoD).
#[derive(Debug)]
pub struct RoutedLayer {
    capacity: Capacities,
    /// `[B, S, n]` scores: one column per routed task in the order of
    /// `capacity.routed_tasks()`, or one shared column.
    router: Router,
    /// One predictor per routed task, in the same order.
    predictor: Option<CausalPredictor>,
    /// Router and predictor evaluations per token, for the FLOPs count.
    evals_per_token: f64,
}

/// What a layer does with the tokens it is given (its [`unimod_router::LayerPlan`], built).
#[derive(Debug)]
pub enum LayerKind {
    /// Processes every token.
    Dense,
    /// Passes every token on unchanged.
    Skip,
    /// Processes the tokens its routers choose.
    Routed(RoutedLayer),
}

/// One layer of the model: a block and what decides which tokens it processes.
#[derive(Debug)]
pub struct Layer {
    /// Its place in the model.
    pub index: usize,
    /// The transformer block.
    pub block: Block,
    /// Dense, skipped or routed.
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
                capacity.clone(),
                *routers,
                &cfg.routing,
                &cfg.tasks,
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
        let tokens = input.tokens(cache.is_none());
        match &self.kind {
            LayerKind::Skip => LayerOutput {
                hidden: x.shallow_clone(),
                attention: None,
                routing: None,
                aux_targets: None,
                experts: Vec::new(),
                work: Work::default(),
            },
            LayerKind::Dense => {
                let d = self
                    .block
                    .delta(x, &tokens, rope, cache, input.capture_attention);
                let (work, experts) = Work::of_block(x, d.keys, d.ffn);
                LayerOutput {
                    hidden: x + d.delta,
                    attention: d.attention,
                    routing: None,
                    aux_targets: None,
                    experts,
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
/// invisible as keys, and the caller zeroes or weights their update. Every token is computed
/// (masked attention), so this is the analyses' readable path, not a saving.
fn delta_among(
    block: &Block,
    x: &Tensor,
    tokens: &Tokens,
    processed: &Tensor,
    rope: &Rope,
    capture: bool,
) -> crate::block::BlockDelta {
    let valid = processed.logical_and(tokens.valid);
    let t = Tokens {
        valid: &valid,
        ..*tokens
    };
    block.delta(x, &t, rope, None, capture)
}

/// What running the block on a selection gives.
struct Applied {
    hidden: Tensor,
    attention: Option<AttentionMaps>,
    experts: Vec<ExpertTargets>,
    work: Work,
}

/// The block run on the selected tokens only (`sel.index` into the `[B, S]` frame of `tokens`),
/// its update weighted by `sel.weight` and added back at the tokens' places; every other token
/// leaves the layer bit-identical. Training (top-k) and causal decoding (threshold) share it.
fn apply_selection(
    block: &Block,
    x: &Tensor,
    tokens: &Tokens,
    sel: &select::Selection,
    rope: &Rope,
    cache: Option<&mut LayerCache>,
    capture: bool,
) -> Applied {
    let gather = |t: &Tensor| t.gather(1, &sel.index, false);
    let (positions, index, upto) = (
        gather(tokens.positions),
        gather(tokens.index),
        gather(tokens.upto),
    );
    let dispatch = tokens.dispatch.map(|d| d.picked(gather));
    let picked = Tokens {
        positions: &positions,
        index: &index,
        upto: &upto,
        valid: &sel.active,
        dispatch: dispatch.as_ref(),
        lookahead: tokens.lookahead,
    };
    let mut ran = None;
    let hidden = select::apply(x, sel, |x_sel, _, _| {
        let d = block.delta(x_sel, &picked, rope, cache, capture);
        let (work, experts) = Work::of_block(x_sel, d.keys, d.ffn);
        ran = Some((d.attention, experts, work));
        d.delta
    });
    let (attention, experts, work) = ran.expect("apply runs the block");
    Applied {
        hidden,
        attention,
        experts,
        work,
    }
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
        let tokens = input.tokens(true);
        let d = delta_among(&self.block, x, &tokens, keep, rope, input.capture_attention);
        let kept = keep
            .logical_and(&input.valid)
            .sum(Kind::Float)
            .double_value(&[]);
        // Every token is computed, but only the kept ones count: the analysis asks what the
        // layer costs when it processes them alone (MoMa's experts take among them only).
        let ffn_tokens = match self.block.has_experts() {
            true => d.ffn.tokens,
            false => kept,
        };
        LayerOutput {
            hidden: x + d.delta * keep.to_kind(x.kind()).unsqueeze(-1),
            attention: d.attention,
            routing: None,
            aux_targets: None,
            experts: d.ffn.targets,
            work: Work {
                tokens: kept,
                ffn_tokens,
                attention_pairs: kept * d.keys as f64,
                router_tokens: d.ffn.router_tokens,
            },
        }
    }
}

impl Work {
    fn plus(self, o: Work) -> Work {
        Work {
            tokens: self.tokens + o.tokens,
            ffn_tokens: self.ffn_tokens + o.ffn_tokens,
            attention_pairs: self.attention_pairs + o.attention_pairs,
            router_tokens: self.router_tokens + o.router_tokens,
        }
    }

    /// The same work plus `router_tokens` more router evaluations.
    fn with_router(self, router_tokens: f64) -> Work {
        Work {
            router_tokens: self.router_tokens + router_tokens,
            ..self
        }
    }

    /// Work of a block over `x: [B, T, D]` attending to `keys` keys per query, and what its
    /// FFN did; and the FFN's auxiliary-router targets.
    fn of_block(x: &Tensor, keys: i64, ffn: crate::block::FfnWork) -> (Work, Vec<ExpertTargets>) {
        let (b, t, _) = x.size3().expect("x is [B, T, D]");
        let tokens = (b * t) as f64;
        let work = Work {
            tokens,
            ffn_tokens: ffn.tokens,
            attention_pairs: tokens * keys as f64,
            router_tokens: ffn.router_tokens,
        };
        (work, ffn.targets)
    }
}

impl RoutedLayer {
    fn new(
        p: &nn::Path,
        d_model: i64,
        capacity: Capacities,
        sharing: Routers,
        cfg: &RoutingConfig,
        tasks: &[Task],
        global_router: Option<&Router>,
    ) -> RoutedLayer {
        let tasks = capacity.routed_tasks(tasks);
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
        RoutedLayer {
            capacity,
            router,
            predictor,
            evals_per_token: router_evals_per_token(cfg, d_model, sharing, tasks.len()),
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
        let n_router_evals = self.evals_per_token * (b.size() as f64 * b.seq_len() as f64);
        match input.mode {
            RoutingMode::TopK if cache.is_none() => self.top_k(
                layer,
                block,
                x,
                input,
                tokens,
                &score,
                &shared,
                predictor_logits,
                rope,
                n_router_evals,
            ),
            mode => {
                // The model refuses top-k with a cache and the predictor's mode without one
                // before any layer runs, so the router decides only in its own mode.
                let decision = match (mode, &predictor_logits) {
                    (RoutingMode::ThresholdPredictor, Some(p)) => p.shallow_clone(),
                    _ => score.shallow_clone(),
                };
                let processed = select::threshold(&decision, routable, forced);
                // The gather width is the most tokens any sample processes: one device read
                // per routed layer, which decoding (a host round trip per token) can afford.
                let n_keep = processed.sum_dim_intlist(1, false, Kind::Int64);
                let width = n_keep.max().int64_value(&[]);
                let budget =
                    select::Budget::new(&processed.logical_and(routable), forced, &n_keep, width);
                let sel = select::top_k(&score, &budget);
                let stats = self.stats(
                    layer,
                    b,
                    &score,
                    &sel.processed,
                    routable,
                    predictor_logits,
                    None,
                );
                let applied = if width == 0 {
                    Applied {
                        hidden: x.shallow_clone(),
                        attention: None,
                        experts: Vec::new(),
                        work: Work::default(),
                    }
                } else {
                    apply_selection(block, x, tokens, &sel, rope, cache, input.capture_attention)
                };
                LayerOutput {
                    hidden: applied.hidden,
                    attention: applied.attention,
                    routing: Some(stats),
                    aux_targets: None,
                    experts: applied.experts,
                    work: applied.work.with_router(n_router_evals),
                }
            }
        }
    }

    /// Top-k routing, each task group at its own width. Attention maps are returned only when
    /// the batch is one group (the analyses read them from single-task batches).
    #[allow(clippy::too_many_arguments)]
    fn top_k(
        &self,
        layer: usize,
        block: &Block,
        x: &Tensor,
        input: &LayerInput,
        tokens: &Tokens,
        score: &Tensor,
        shared: &Shared,
        predictor_logits: Option<Tensor>,
        rope: &Rope,
        n_router_evals: f64,
    ) -> LayerOutput {
        let b = input.batch;
        let TopK {
            groups,
            processed,
            restore,
        } = shared.top_k.get_or_init(|| self.budget(input, shared));
        let capture = input.capture_attention && groups.len() == 1;
        let (mut hidden, mut in_topk, mut kept) = (Vec::new(), Vec::new(), Vec::new());
        let (mut attention, mut work, mut experts) = (None, Work::default(), Vec::new());
        for g in groups {
            let (positions, index, upto, valid) = (
                g.rows(tokens.positions),
                g.rows(tokens.index),
                g.rows(tokens.upto),
                g.rows(tokens.valid),
            );
            let dispatch = tokens.dispatch.map(|d| d.picked(|t| g.rows(t)));
            let t = Tokens {
                positions: &positions,
                index: &index,
                upto: &upto,
                valid: &valid,
                dispatch: dispatch.as_ref(),
                lookahead: tokens.lookahead,
            };
            let sel = select::top_k(&g.rows(score), &g.budget);
            let applied = apply_selection(block, &g.rows(x), &t, &sel, rope, None, capture);
            in_topk.push(sel.in_topk);
            kept.push(sel.processed);
            hidden.push(applied.hidden);
            attention = applied.attention;
            experts.extend(applied.experts);
            work = work.plus(applied.work);
        }
        let cat = |v: Vec<Tensor>| {
            let all = match v.len() {
                1 => v.into_iter().next().expect("one group"),
                _ => Tensor::cat(&v, 0),
            };
            match restore {
                Some(rows) => all.index_select(0, rows),
                None => all,
            }
        };
        let (hidden, in_topk, processed_mask) = (cat(hidden), cat(in_topk), cat(kept));
        let aux_targets = AuxTargets {
            router: score.shallow_clone(),
            predictor: predictor_logits.as_ref().map(Tensor::shallow_clone),
            in_topk,
            routable: shared.routable.shallow_clone(),
        };
        let stats = self.stats(
            layer,
            b,
            score,
            &processed_mask,
            &shared.routable,
            predictor_logits,
            Some(processed.clone()),
        );
        LayerOutput {
            hidden,
            attention,
            routing: Some(stats),
            aux_targets: Some(aux_targets),
            experts,
            work: work.with_router(n_router_evals),
        }
    }

    /// Each sample keeps its non-routable tokens and k = max(1, ceil(capacity × n_routable)) of
    /// its routable ones, within its task group's gather width; also the tokens processed per
    /// task, counted on the host.
    fn budget(&self, input: &LayerInput, shared: &Shared) -> TopK {
        let b = input.batch;
        let n_keep = self.kept_per_sample(b, &input.routable_segments);
        let processed = processed_per_task(b, &n_keep);
        // The same k as the host counts `n_keep` (same f64 arithmetic as `tokens_kept`),
        // computed from device tensors; the host counts give only the gather widths and the
        // statistics.
        let n_keep_t = select::keep_per_sample(&shared.routable, &shared.forced, &shared.capacity);
        let tasks = rows_per_task(b);
        let group = |rows: Rows, width: i64| Group {
            budget: select::Budget::new(
                &rows.of(&shared.routable),
                &rows.of(&shared.forced),
                &rows.of(&n_keep_t),
                width,
            ),
            rows,
        };
        let widths = widths_per_task(&tasks, &n_keep);
        // Splitting saves nothing when every task has the same width (capacity 1, one task):
        // then the whole batch is one group, which keeps those cases bit-identical to dense.
        if widths.iter().all(|w| *w == widths[0]) {
            let all = Rows::Run {
                start: 0,
                len: b.size() as i64,
            };
            return TopK {
                groups: vec![group(all, widths[0])],
                processed,
                restore: None,
            };
        }
        let device = shared.routable.device();
        let order: Vec<i64> = tasks
            .iter()
            .flat_map(|(_, rows)| rows.iter().map(|&i| i as i64))
            .collect();
        let groups = tasks
            .iter()
            .zip(widths)
            .map(|((_, rows), width)| {
                let rows = match rows.windows(2).all(|p| p[1] == p[0] + 1) {
                    true => Rows::Run {
                        start: rows[0] as i64,
                        len: rows.len() as i64,
                    },
                    false => {
                        let index: Vec<i64> = rows.iter().map(|&i| i as i64).collect();
                        Rows::Picked(Tensor::from_slice(&index).to_device(device))
                    }
                };
                group(rows, width)
            })
            .collect();
        // Row `order[j]` of the batch is row j of the groups' concatenation.
        let in_order = order.iter().enumerate().all(|(j, &i)| i == j as i64);
        let restore = (!in_order).then(|| {
            let mut inverse = vec![0i64; order.len()];
            for (j, &i) in order.iter().enumerate() {
                inverse[i as usize] = j as i64;
            }
            Tensor::from_slice(&inverse).to_device(device)
        });
        TopK {
            groups,
            processed,
            restore,
        }
    }

    /// Each sample's kept tokens in top-k mode, counted on the host: its valid tokens, of
    /// which `tokens_kept(capacity, n)` of its `n` routable ones for a routed task.
    fn kept_per_sample(&self, b: &Batch, routable_segments: &[Segment]) -> Vec<usize> {
        (0..b.size())
            .map(|i| {
                let valid = b.seq_len() as usize - b.count(i, &[Segment::Pad]);
                match self.capacity.get(b.tasks[i]) {
                    None => valid,
                    Some(c) => {
                        let n_routable = b.count(i, routable_segments);
                        valid - n_routable + tokens_kept(c, n_routable)
                    }
                }
            })
            .collect()
    }

    /// The gather width of each task group of `b` in top-k mode (tasks in order of first
    /// appearance): with the batch's rows, what fixes the shapes this layer's step runs on.
    pub(crate) fn widths(&self, b: &Batch, routable_segments: &[Segment]) -> Vec<i64> {
        widths_per_task(
            &rows_per_task(b),
            &self.kept_per_sample(b, routable_segments),
        )
    }

    /// Tokens processed per task of `b` in top-k mode (what [`RoutingStats::processed`]
    /// holds), counted on the host.
    pub(crate) fn processed(
        &self,
        b: &Batch,
        routable_segments: &[Segment],
    ) -> BTreeMap<Task, usize> {
        processed_per_task(b, &self.kept_per_sample(b, routable_segments))
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
        processed: Option<BTreeMap<Task, usize>>,
    ) -> RoutingStats {
        RoutingStats {
            layer,
            processed,
            total: valid_per_task(b),
            scores: score.detach(),
            processed_mask: processed_mask.shallow_clone(),
            routable: routable.shallow_clone(),
            predictor_logits: predictor_logits.map(|p| p.detach()),
        }
    }
}
