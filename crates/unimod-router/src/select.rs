//! Token selection, batched: per sample, the top-k routable tokens by score plus every token
//! that must be processed, gathered in their original order. No host loops over tokens and no
//! reads from the device: the gather width comes from counts the batch carries on the host.

use tch::{Kind, Tensor};

/// The tokens one routed layer processes.
#[derive(Debug)]
pub struct Selection {
    /// `[B, G]` sequence indices, ascending within each sample (causal order survives).
    pub index: Tensor,
    /// `[B, G]` true where the slot holds a selected token; samples that keep fewer than G
    /// tokens fill the rest with inactive slots, which see nothing and change nothing.
    pub active: Tensor,
    /// `[B, G]` what the block's output is multiplied by: sigmoid(score) for routed tokens,
    /// 1 for always-processed ones, 0 for inactive slots.
    pub weight: Tensor,
    /// `[B, S]` true for routable tokens in the top-k (the target of the causal fixes).
    pub in_topk: Tensor,
    /// `[B, S]` true for every processed token.
    pub processed: Tensor,
}

/// What top-k selection needs besides the scores: which tokens compete, which are always kept,
/// and how many each sample keeps. It depends only on the batch and on the layer's tasks and
/// capacities, so a forward pass builds it once for all layers that route alike.
#[derive(Debug)]
pub struct Budget {
    /// `[B, S]` added to the scores to rank tokens: 0 for routable tokens, +∞ for tokens that
    /// must be processed, −∞ for the rest (never chosen).
    key_offset: Tensor,
    /// `[B, S]` true for routable tokens.
    routable: Tensor,
    /// `[B, G]` true for the ranks each sample keeps (rank < its k).
    kept_ranks: Tensor,
}

impl Budget {
    /// Sample b keeps its `n_keep[b]` highest-keyed tokens: always-processed (`forced`) tokens
    /// first, then routable ones by score.
    ///
    /// # Shapes
    /// `routable`, `forced`: `[B, S]` bool; `n_keep`: `[B]` (i64, ≤ `width`); `width` = G.
    pub fn new(routable: &Tensor, forced: &Tensor, n_keep: &Tensor, width: i64) -> Budget {
        let device = routable.device();
        let key_offset = Tensor::zeros(routable.size(), (Kind::Float, device))
            .masked_fill(&routable.logical_not(), f64::NEG_INFINITY)
            .masked_fill(forced, f64::INFINITY);
        let rank = Tensor::arange(width, (Kind::Int64, device)).unsqueeze(0);
        Budget {
            key_offset,
            routable: routable.shallow_clone(),
            kept_ranks: rank.lt_tensor(&n_keep.unsqueeze(1)),
        }
    }

    /// Each sample keeps every `forced` token and `k = max(1, ⌈capacity · n⌉)` of its `n`
    /// routable ones (none when it has none), with `capacity: [B]` f64 per sample (a task's
    /// capacity for its samples under UniMoD). The width is the most any sample keeps: one read
    /// from the device.
    pub fn from_capacity(routable: &Tensor, forced: &Tensor, capacity: &Tensor) -> Budget {
        let n_keep = keep_per_sample(routable, forced, capacity);
        let width = n_keep.max().int64_value(&[]).max(1);
        Budget::new(routable, forced, &n_keep, width)
    }

    /// The gather width G.
    pub fn width(&self) -> i64 {
        self.kept_ranks.size()[1]
    }
}

/// `[B]` i64 tokens each sample keeps: its forced ones plus `max(1, ⌈capacity · n_routable⌉)`
/// (at most `n_routable`, 0 without routable tokens), the same f64 arithmetic as
/// [`crate::tokens_kept`].
pub fn keep_per_sample(routable: &Tensor, forced: &Tensor, capacity: &Tensor) -> Tensor {
    let n = routable.sum_dim_intlist(1, false, Kind::Double);
    let kept = (capacity.to_kind(Kind::Double) * &n)
        .ceil()
        .clamp_min(1.0)
        .minimum(&n);
    (forced.sum_dim_intlist(1, false, Kind::Double) + kept).to_kind(Kind::Int64)
}

/// Mixture-of-Depths around any block: the `selection`'s tokens of `x: [B, S, D]` are gathered
/// in their original order and given to `block` with their sequence indices `[B, G]` and
/// active slots `[B, G]`; its update `[B, G, D]` is weighted by the selection's weights (the
/// router's sigmoid) and added back at the tokens' places. Every other token leaves unchanged,
/// bit for bit.
///
/// ```
/// use tch::{Device, Kind, Tensor};
/// use unimod_router::select::{Budget, apply, top_k};
/// let x = Tensor::randn([2, 6, 4], (Kind::Float, Device::Cpu));
/// let scores = Tensor::randn([2, 6], (Kind::Float, Device::Cpu));
/// let routable = Tensor::ones([2, 6], (Kind::Bool, Device::Cpu));
/// let forced = routable.zeros_like();
/// let budget = Budget::from_capacity(&routable, &forced, &Tensor::from_slice(&[0.5, 0.5]));
/// let sel = top_k(&scores, &budget);
/// // Any block: here a doubling of the kept tokens' states.
/// let y = apply(&x, &sel, |x_sel, _index, _active| x_sel * 2.0);
/// assert_eq!(sel.index.size(), [2, 3]);
/// let skipped = sel.processed.logical_not().unsqueeze(-1);
/// assert!((&y * &skipped).equal(&(&x * &skipped)));
/// ```
pub fn apply(
    x: &Tensor,
    selection: &Selection,
    block: impl FnOnce(&Tensor, &Tensor, &Tensor) -> Tensor,
) -> Tensor {
    let x_sel = gather_tokens(x, &selection.index);
    let delta = block(&x_sel, &selection.index, &selection.active);
    scatter_add_tokens(
        x,
        &selection.index,
        &(delta * selection.weight.unsqueeze(-1)),
    )
}

/// Selects each sample's tokens within `budget`, ranking routable tokens by `score: [B, S]`.
///
/// ```
/// use tch::Tensor;
/// use unimod_router::select::{Budget, top_k};
///
/// // One sample of five tokens: token 0 is special (always processed), 1–4 compete.
/// let routable = Tensor::from_slice(&[false, true, true, true, true]).view([1, 5]);
/// let forced = Tensor::from_slice(&[true, false, false, false, false]).view([1, 5]);
/// let budget = Budget::from_capacity(&routable, &forced, &Tensor::from_slice(&[0.5f64]));
/// let score = Tensor::from_slice(&[0.0f32, 0.1, 2.0, -1.0, 1.0]).view([1, 5]);
/// let sel = top_k(&score, &budget);
/// // The special token and the best half of the rest (tokens 2 and 4), in sequence order.
/// assert_eq!(Vec::<i64>::try_from(sel.index.view([-1])).unwrap(), [0, 2, 4]);
/// ```
pub fn top_k(score: &Tensor, budget: &Budget) -> Selection {
    let device = score.device();
    let key = score.detach().to_kind(Kind::Float) + &budget.key_offset;
    let (_, by_key) = key.topk(budget.width(), 1, true, true);
    let (index, order) = by_key.sort(1, false);
    let active = budget.kept_ranks.gather(1, &order, false);
    let routed = budget
        .routable
        .gather(1, &index, false)
        .logical_and(&active);
    let weight = score
        .gather(1, &index, false)
        .sigmoid()
        .where_self(&routed, &active.to_kind(score.kind()));
    let processed = Tensor::zeros(score.size(), (Kind::Bool, device)).scatter(1, &index, &active);
    Selection {
        in_topk: processed.logical_and(&budget.routable),
        index,
        active,
        weight,
        processed,
    }
}

/// The causal decision used in autoregressive decoding: a routable token is processed when its
/// decision logit is positive (probability ≥ 0.5), an always-processed token always.
///
/// # Shapes
/// all `[B, S]` → `[B, S]` bool.
pub fn threshold(decision_logit: &Tensor, routable: &Tensor, forced: &Tensor) -> Tensor {
    decision_logit
        .gt(0.0)
        .logical_and(routable)
        .logical_or(forced)
}

/// `x: [B, S, D]`, `index: [B, G]` → `[B, G, D]`.
pub fn gather_tokens(x: &Tensor, index: &Tensor) -> Tensor {
    let d = x.size()[2];
    let (b, g) = index.size2().expect("index is [B, G]");
    x.gather(1, &index.unsqueeze(2).expand([b, g, d], false), false)
}

/// Adds `delta: [B, G, D]` into `x: [B, S, D]` at `index: [B, G]` (indices unique per sample).
pub fn scatter_add_tokens(x: &Tensor, index: &Tensor, delta: &Tensor) -> Tensor {
    let d = x.size()[2];
    let (b, g) = index.size2().expect("index is [B, G]");
    x.scatter_add(1, &index.unsqueeze(2).expand([b, g, d], false), delta)
}

/// Binary cross-entropy of router logits against top-k membership, averaged over routable
/// tokens: the MoD paper's auxiliary loss, which centres sigmoid(score) on 0.5 so that a 0.5
/// threshold reproduces top-k in causal decoding.
///
/// # Shapes
/// all `[.., B, S]` → `[..]`: one mean per leading index (per layer, when layers are stacked).
pub fn membership_bce(logits: &Tensor, in_topk: &Tensor, routable: &Tensor) -> Tensor {
    let w = routable.to_kind(Kind::Float);
    let per_token = logits
        .to_kind(Kind::Float)
        .binary_cross_entropy_with_logits::<Tensor>(
            &in_topk.to_kind(Kind::Float),
            None,
            None,
            tch::Reduction::None,
        );
    let per_sequence = [-2i64, -1];
    (per_token * &w).sum_dim_intlist(&per_sequence[..], false, Kind::Float)
        / w.sum_dim_intlist(&per_sequence[..], false, Kind::Float)
            .clamp_min(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn t(v: &[f32], b: i64) -> Tensor {
        Tensor::from_slice(v).view([b, -1])
    }
    fn mask(v: &[bool], b: i64) -> Tensor {
        Tensor::from_slice(v).view([b, -1])
    }
    fn vec_i64(x: &Tensor) -> Vec<i64> {
        Vec::<i64>::try_from(x.flatten(0, -1)).unwrap()
    }
    fn vec_bool(x: &Tensor) -> Vec<bool> {
        Vec::<bool>::try_from(x.flatten(0, -1)).unwrap()
    }

    #[test]
    fn keeps_forced_then_best_routable_in_order() {
        // token 0 forced, tokens 1..5 routable, token 5 padding.
        let score = t(&[0.0, 0.3, -1.0, 2.0, 0.1, 9.0], 1);
        let routable = mask(&[false, true, true, true, true, false], 1);
        let forced = mask(&[true, false, false, false, false, false], 1);
        let budget = Budget::new(&routable, &forced, &Tensor::from_slice(&[3i64]), 3);
        let sel = top_k(&score, &budget);
        assert_eq!(vec_i64(&sel.index), [0, 1, 3]);
        assert_eq!(vec_bool(&sel.active), [true, true, true]);
        assert_eq!(
            vec_bool(&sel.in_topk),
            [false, true, false, true, false, false]
        );
        let w = Vec::<f32>::try_from(sel.weight.flatten(0, -1)).unwrap();
        assert_eq!(w[0], 1.0);
        assert!((w[2] - 1.0 / (1.0 + (-2.0f32).exp())).abs() < 1e-6);
    }

    #[test]
    fn samples_keeping_fewer_tokens_get_inactive_slots() {
        let score = t(&[1.0, 2.0, 3.0, 4.0, 1.0, 2.0, 3.0, 4.0], 2);
        let routable = mask(&[true; 8], 2);
        let forced = mask(&[false; 8], 2);
        let budget = Budget::new(&routable, &forced, &Tensor::from_slice(&[3i64, 1]), 3);
        let sel = top_k(&score, &budget);
        assert_eq!(vec_bool(&sel.active).iter().filter(|a| **a).count(), 4);
        assert_eq!(
            vec_bool(&sel.processed),
            [false, true, true, true, false, false, false, true]
        );
        let w = Vec::<f32>::try_from(sel.weight.flatten(0, -1)).unwrap();
        assert_eq!(w.iter().filter(|x| **x == 0.0).count(), 2);
    }

    #[test]
    fn threshold_keeps_forced_and_confident_tokens() {
        let logits = t(&[-1.0, 0.5, -0.2, 3.0], 1);
        let routable = mask(&[false, true, true, true], 1);
        let forced = mask(&[true, false, false, false], 1);
        assert_eq!(
            vec_bool(&threshold(&logits, &routable, &forced)),
            [true, true, false, true]
        );
    }

    #[test]
    fn bce_is_zero_mean_over_routable_only() {
        let logits = t(&[20.0, -20.0, 0.0], 1);
        let in_topk = mask(&[true, false, true], 1);
        let routable = mask(&[true, true, false], 1);
        let l = f64::try_from(membership_bce(&logits, &in_topk, &routable)).unwrap();
        assert!(l < 1e-6, "{l}");
    }

    #[test]
    fn stacked_bce_is_the_per_layer_bce() {
        tch::manual_seed(0);
        let logits = Tensor::randn([3, 2, 5], tch::kind::FLOAT_CPU);
        let in_topk = Tensor::randn([3, 2, 5], tch::kind::FLOAT_CPU).gt(0.0);
        let routable = Tensor::randn([3, 2, 5], tch::kind::FLOAT_CPU).gt(-0.5);
        let stacked = membership_bce(&logits, &in_topk, &routable);
        assert_eq!(stacked.size(), [3]);
        for l in 0..3 {
            let one = membership_bce(&logits.get(l), &in_topk.get(l), &routable.get(l));
            assert!(
                one.allclose(&stacked.get(l), 1e-6, 1e-7, false),
                "layer {l}"
            );
        }
    }

    proptest! {
        #[test]
        fn gather_scatter_round_trip(b in 1i64..4, s in 2i64..12, d in 1i64..5, seed in 0i64..1000) {
            tch::manual_seed(seed);
            let x = Tensor::randn([b, s, d], tch::kind::FLOAT_CPU);
            let score = Tensor::randn([b, s], tch::kind::FLOAT_CPU);
            let g = (s / 2).max(1);
            let budget = Budget::new(&Tensor::ones([b, s], (Kind::Bool, tch::Device::Cpu)),
                &Tensor::zeros([b, s], (Kind::Bool, tch::Device::Cpu)), &Tensor::full([b], g, (Kind::Int64, tch::Device::Cpu)), g);
            let sel = top_k(&score, &budget);
            // indices ascending and unique
            let idx = Vec::<i64>::try_from(sel.index.flatten(0, -1)).unwrap();
            for row in idx.chunks(g as usize) {
                prop_assert!(row.windows(2).all(|w| w[0] < w[1]));
            }
            let picked = gather_tokens(&x, &sel.index);
            // scattering the gathered tokens' negation back zeroes exactly the selected rows
            let back = scatter_add_tokens(&x, &sel.index, &(-&picked));
            let zeroed = back.abs().sum_dim_intlist(-1, false, Kind::Float).eq(0.0);
            prop_assert!(zeroed.eq_tensor(&sel.processed).all().int64_value(&[]) == 1);
        }
    }
}
