//! Mixture-of-Depths routing in a transformer written from scratch with tch (nothing of
//! `unimod-model`): every other block processes only a quarter of the tokens, chosen by its
//! router. It learns a toy next-token task for a few steps and prints the loss and the share of
//! tokens the routed blocks processed. `cargo run --release -p unimod-router --example
//! mod_in_your_model`
use tch::{Device, Kind, Tensor, nn, nn::Module, nn::OptimizerConfig};
use unimod_router::{MixtureOfDepths, RouterArch, RoutingMode};

const D: i64 = 64;
const VOCAB: i64 = 32;

/// A pre-norm block that returns its update. It attends causally among the tokens it is given,
/// by their original sequence indices (a routed block sees a subset, in order).
struct Block {
    norm: nn::LayerNorm,
    qkv: nn::Linear,
    out: nn::Linear,
    mlp: nn::Sequential,
}

impl Block {
    fn new(p: nn::Path) -> Block {
        Block {
            norm: nn::layer_norm(&p / "norm", vec![D], Default::default()),
            qkv: nn::linear(&p / "qkv", D, 3 * D, Default::default()),
            out: nn::linear(&p / "out", D, D, Default::default()),
            mlp: nn::seq()
                .add(nn::linear(&p / "up", D, 4 * D, Default::default()))
                .add_fn(|x| x.gelu("none"))
                .add(nn::linear(&p / "down", 4 * D, D, Default::default())),
        }
    }

    /// `x: [B, T, D]`, `index: [B, T]` positions in the sequence, `active: [B, T]` → `[B, T, D]`.
    fn update(&self, x: &Tensor, index: &Tensor, active: &Tensor) -> Tensor {
        let (b, t, _) = x.size3().unwrap();
        let h = self.norm.forward(x);
        let qkv = self
            .qkv
            .forward(&h)
            .view([b, t, 3, 4, D / 4])
            .permute([2, 0, 3, 1, 4]);
        let causal = index.unsqueeze(2).ge_tensor(&index.unsqueeze(1));
        let mask = causal.logical_and(&active.unsqueeze(1)).unsqueeze(1);
        let a = Tensor::scaled_dot_product_attention(
            &qkv.get(0),
            &qkv.get(1),
            &qkv.get(2),
            Some(&mask),
            0.0,
            false,
            None,
            false,
        );
        let a = self.out.forward(&a.transpose(1, 2).reshape([b, t, D]));
        a + self.mlp.forward(&h)
    }
}

/// The share of true entries of a bool tensor.
fn share(t: &Tensor) -> f64 {
    t.to_kind(Kind::Float).mean(Kind::Float).double_value(&[])
}

fn main() {
    tch::manual_seed(0);
    let vs = nn::VarStore::new(Device::Cpu);
    let root = vs.root();
    let embed = nn::embedding(&root / "embed", VOCAB, D, Default::default());
    let head = nn::linear(&root / "head", D, VOCAB, Default::default());
    let blocks: Vec<Block> = (0..4).map(|i| Block::new(&root / "block" / i)).collect();
    // Blocks 1 and 3 route: one router each, keeping 25 % of every sequence's tokens.
    let routers: Vec<Option<MixtureOfDepths>> = (0..4)
        .map(|i| {
            (i % 2 == 1).then(|| {
                MixtureOfDepths::new(&root / "mod" / i, D, &[0.25], RouterArch::Linear, false)
            })
        })
        .collect();
    let mut opt = nn::AdamW::default().build(&vs, 3e-3).unwrap();
    for step in 0..60 {
        // Toy task: each token is the one two places back plus 1 (mod VOCAB), from two random
        // starts, so predicting it needs attention.
        let start = Tensor::randint(VOCAB, [16, 2], (Kind::Int64, Device::Cpu)).repeat([1, 17]);
        let step_up = Tensor::arange(34, (Kind::Int64, Device::Cpu)).divide_scalar_mode(2, "floor");
        let seq = (start + step_up).narrow(1, 0, 33).remainder(VOCAB);
        let (input, target) = (seq.narrow(1, 0, 32), seq.narrow(1, 1, 32));
        let index = Tensor::arange(32, (Kind::Int64, Device::Cpu)).expand([16, 32], false);
        let (everyone, nobody) = (index.ge(0), index.lt(0));
        let (mut x, mut aux, mut kept) = (embed.forward(&input), Tensor::from(0f32), 0.0);
        for (block, router) in blocks.iter().zip(&routers) {
            x = match router {
                None => &x + block.update(&x, &index, &everyone),
                Some(r) => {
                    let update = |x: &Tensor, i: &Tensor, a: &Tensor| block.update(x, i, a);
                    let routed = r.forward(&x, &everyone, &nobody, None, RoutingMode::TopK, update);
                    aux += routed.aux_loss.unwrap();
                    kept += share(&routed.selection.processed) / 2.0;
                    routed.hidden
                }
            };
        }
        let loss = head
            .forward(&x)
            .view([-1, VOCAB])
            .cross_entropy_for_logits(&target.reshape([-1]));
        opt.backward_step(&(&loss + aux));
        if step % 10 == 0 || step == 59 {
            println!(
                "step {step:2}: loss {:.3}, routed blocks processed {:.0} % of tokens",
                loss.double_value(&[]),
                100.0 * kept
            );
        }
    }
}
