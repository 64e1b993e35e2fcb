//! Mixture-of-Depths (Raposo et al.) and UniMoD's task-aware routing around **any** block, for
//! a transformer written anywhere with tch: the router(s), per-sample capacities, top-k in
//! original order, the weighted scatter, the causal decisions for decoding, and the auxiliary
//! losses. The block is a closure from the kept tokens' states, their sequence indices and
//! their active slots to an update.
//!
//! UniMoD is this with one router column per task and each sample routed by its task's column
//! at its task's capacity; plain MoD is one column for everyone. The unified transformer of
//! `unimod-model` builds on the same pieces ([`crate::select`]).

use crate::RoutingMode;
use crate::router::{CausalPredictor, Router, RouterArch};
use crate::select::{self, Budget, Selection};
use tch::{Kind, Tensor, nn};

/// The routers of one routed layer.
///
/// ```
/// use tch::{Device, Kind, Tensor, nn};
/// use unimod_router::{MixtureOfDepths, RouterArch, RoutingMode};
/// let vs = nn::VarStore::new(Device::Cpu);
/// // UniMoD: two tasks, T2I keeps 60 %, MMU 20 % of their routable tokens.
/// let layer = MixtureOfDepths::new(vs.root(), 16, &[0.6, 0.2], RouterArch::Linear, false);
/// let x = Tensor::randn([2, 10, 16], (Kind::Float, Device::Cpu));
/// let routable = Tensor::ones([2, 10], (Kind::Bool, Device::Cpu));
/// let forced = routable.zeros_like();
/// let task = Tensor::from_slice(&[0i64, 1]); // sample 0 is T2I, sample 1 MMU
/// let mlp = nn::linear(vs.root() / "mlp", 16, 16, Default::default());
/// let out = layer.forward(&x, &routable, &forced, Some(&task), RoutingMode::TopK, |x, _index, _active| {
///     nn::Module::forward(&mlp, x) // your block: here a linear layer
/// });
/// let kept: Vec<i64> = out.selection.processed.sum_dim_intlist(1, false, Kind::Int64).try_into().unwrap();
/// assert_eq!(kept, [6, 2]);
/// out.aux_loss.unwrap().backward(); // the router's BCE towards its top-k
/// ```
#[derive(Debug)]
pub struct MixtureOfDepths {
    router: Router,
    predictor: Option<CausalPredictor>,
    /// `[n]` capacity of each router column.
    capacity: Tensor,
    /// Weight of the router's BCE towards top-k membership.
    pub aux_weight: f64,
}

/// What a routed layer returns.
#[derive(Debug)]
pub struct Routed {
    /// `[B, S, D]` the new residual stream.
    pub hidden: Tensor,
    /// The auxiliary losses (top-k mode): the router's BCE towards top-k membership × the
    /// weight, plus the causal predictor's.
    pub aux_loss: Option<Tensor>,
    /// The tokens processed: their positions, gate weights and counts.
    pub selection: Selection,
}

impl MixtureOfDepths {
    /// One router column per entry of `capacities` (one entry: plain MoD; one per task:
    /// UniMoD), each keeping that share of a sample's routable tokens; with `causal_predictor`,
    /// the stop-gradient predictors decoding can decide by.
    pub fn new(
        p: nn::Path,
        d_model: i64,
        capacities: &[f64],
        arch: RouterArch,
        causal_predictor: bool,
    ) -> MixtureOfDepths {
        let n = capacities.len() as i64;
        MixtureOfDepths {
            router: Router::new(&p / "router", d_model, arch, n),
            predictor: causal_predictor.then(|| CausalPredictor::new(&p / "predictor", d_model, n)),
            capacity: Tensor::from_slice(capacities).to_device(p.device()),
            aux_weight: 0.01,
        }
    }

    /// `block` on the tokens this layer keeps, its update added back weighted by the router.
    ///
    /// # Shapes
    /// `x: [B, S, D]`; `routable`: `[B, S]` bool, tokens the router may skip; `forced`: `[B, S]`
    /// bool, tokens always processed (padding in neither); `column`: `[B]` i64, each sample's
    /// router column (its task), or `None` for column 0. `block(x_sel: [B, G, D], index:
    /// [B, G], active: [B, G]) → [B, G, D]`.
    ///
    /// In [`RoutingMode::TopK`] each sample keeps its forced tokens and the top ⌈c·n⌉ of its n
    /// routable ones (this looks ahead: training and parallel decoding); in the threshold
    /// modes, the routable tokens whose router (or predictor) logit is positive (causal).
    pub fn forward(
        &self,
        x: &Tensor,
        routable: &Tensor,
        forced: &Tensor,
        column: Option<&Tensor>,
        mode: RoutingMode,
        block: impl FnOnce(&Tensor, &Tensor, &Tensor) -> Tensor,
    ) -> Routed {
        let (b, s, _) = x.size3().expect("x is [B, S, D]");
        let column = column.map_or_else(
            || Tensor::zeros([b], (Kind::Int64, x.device())),
            Tensor::shallow_clone,
        );
        let own = |logits: &Tensor| {
            logits
                .gather(2, &column.view([b, 1, 1]).expand([b, s, 1], false), false)
                .squeeze_dim(-1)
        };
        let score = own(&self.router.score(x));
        let predicted = self.predictor.as_ref().map(|p| own(&p.logits(x)));
        let (selection, aux_loss) = match mode {
            RoutingMode::TopK => {
                let capacity = self.capacity.index_select(0, &column);
                let sel =
                    select::top_k(&score, &Budget::from_capacity(routable, forced, &capacity));
                let bce = |l: &Tensor| {
                    select::membership_bce(l, &sel.in_topk, routable).mean(Kind::Float)
                };
                let mut aux = bce(&score) * self.aux_weight;
                if let Some(p) = &predicted {
                    aux += bce(p);
                }
                (sel, Some(aux))
            }
            mode => {
                let decision = match (mode, &predicted) {
                    (RoutingMode::ThresholdPredictor, Some(p)) => p,
                    _ => &score,
                };
                let processed = select::threshold(decision, routable, forced);
                let n_keep = processed.sum_dim_intlist(1, false, Kind::Int64);
                let width = n_keep.max().int64_value(&[]).max(1);
                let budget = Budget::new(&processed.logical_and(routable), forced, &n_keep, width);
                (select::top_k(&score, &budget), None)
            }
        };
        Routed {
            hidden: select::apply(x, &selection, block),
            aux_loss,
            selection,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// Capacity 1 with a router saturated at weight 1 is the block applied to every token; at
    /// capacity 0.5 each sample keeps half its routable tokens by its own task's column, and
    /// the others leave untouched.
    #[test]
    fn keeps_each_tasks_share_and_leaves_the_rest() {
        let vs = nn::VarStore::new(Device::Cpu);
        let mod_ = MixtureOfDepths::new(vs.root(), 8, &[1.0, 0.5], RouterArch::Linear, true);
        tch::manual_seed(0);
        let x = Tensor::randn([2, 6, 8], tch::kind::FLOAT_CPU);
        let routable = Tensor::ones([2, 6], (Kind::Bool, Device::Cpu));
        let forced = routable.zeros_like();
        let column = Tensor::from_slice(&[0i64, 1]);
        tch::no_grad(|| {
            for (name, mut v) in vs.variables() {
                if name.contains("router") && name.ends_with("bias") {
                    let _ = v.fill_(30.0);
                }
            }
        });
        let r = mod_.forward(
            &x,
            &routable,
            &forced,
            Some(&column),
            RoutingMode::TopK,
            |x, _, _| x * 2.0,
        );
        let kept =
            Vec::<i64>::try_from(r.selection.processed.sum_dim_intlist(1, false, Kind::Int64))
                .unwrap();
        assert_eq!(kept, [6, 3]);
        assert!(
            r.hidden
                .get(0)
                .allclose(&(x.get(0) * 3.0), 1e-6, 1e-6, false)
        );
        let skipped = r.selection.processed.get(1).logical_not().unsqueeze(-1);
        assert!((r.hidden.get(1) * &skipped).equal(&(x.get(1) * &skipped)));
        assert!(r.aux_loss.is_some());
        // Causal: every routable token with a positive logit (all of them here).
        let c = mod_.forward(
            &x,
            &routable,
            &forced,
            Some(&column),
            RoutingMode::ThresholdRouter,
            |x, _, _| x * 2.0,
        );
        assert_eq!(c.selection.processed.sum(Kind::Int64).int64_value(&[]), 12);
    }
}
