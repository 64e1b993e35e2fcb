//! The image tokenizer: a VQ-VAE (conv encoder, codebook, conv decoder) trained in tch with the
//! straight-through estimator and a commitment loss. The codebook is initialised from encoder
//! outputs (k-means++-style sampling) and dead codes are restarted from the current batch, which
//! keeps it from collapsing. 32×32 → 8×8 = 64 tokens by default (4× downsampling per side);
//! 64×64 → 16×16 = 256 tokens as in Show-o at 256 px.

use crate::check::{self, InvalidValue};
use crate::dataset::Image;
use crate::tensorfile::{CheckpointError, load_tensors, save_tensors};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor, nn, nn::Module, nn::OptimizerConfig};

/// `[tokenizer.image]`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VqConfig {
    /// Codes in the codebook.
    pub codebook_size: i64,
    /// Dimensions of a code.
    pub code_dim: i64,
    /// Channels of the conv stacks.
    pub channels: i64,
    /// Downsampling stages of ×2 (2: 32 px → 8×8 tokens).
    pub downsample: usize,
    /// Weight of the commitment loss (VQ-VAE's β).
    pub commitment: f64,
    /// Training steps.
    pub steps: usize,
    /// Images per step.
    pub batch_size: usize,
    /// Adam's learning rate.
    pub lr: f64,
    /// Restart codes unused over this many steps.
    pub restart_every: usize,
    /// Seed of its initialisation and batches.
    pub seed: i64,
}

impl Default for VqConfig {
    fn default() -> Self {
        VqConfig {
            codebook_size: 512,
            code_dim: 32,
            channels: 48,
            downsample: 2,
            commitment: 0.25,
            // 2026-11-22, quickstart `shapes` world on the 2-core CPU: 800 steps (79 s) gave
            // PSNR 24.6 dB and 90.0 % judge agreement on reconstructions, 1400 (140 s)
            // 27.6 dB and 97.5 %, 2000 (210 s) 29.5 dB and 99.2 %.
            steps: 1400,
            batch_size: 32,
            lr: 2e-3,
            restart_every: 100,
            seed: 0,
        }
    }
}

impl VqConfig {
    /// `[tokenizer.image]` values in range for images of side `image_size`: the downsampling
    /// must divide the image into at least one token per side.
    pub fn validate(&self, image_size: usize) -> Result<(), InvalidValue> {
        let f = |name: &str| format!("tokenizer.image.{name}");
        check::int_in(
            &f("codebook_size"),
            self.codebook_size.max(0) as usize,
            2,
            65536,
        )?;
        check::int_in(&f("code_dim"), self.code_dim.max(0) as usize, 1, 1024)?;
        check::int_in(&f("channels"), self.channels.max(0) as usize, 1, 1024)?;
        check::int_in(&f("downsample"), self.downsample, 1, 6)?;
        let factor = 1usize << self.downsample;
        if !image_size.is_multiple_of(factor) {
            return Err(InvalidValue::new(
                &f("downsample"),
                self.downsample,
                format!("2^downsample must divide the image side {image_size}"),
            ));
        }
        check::float_in(&f("commitment"), self.commitment, 0.0, 100.0)?;
        check::int_in(&f("steps"), self.steps, 1, 1_000_000)?;
        check::int_in(&f("batch_size"), self.batch_size, 1, 4096)?;
        check::float_above(&f("lr"), self.lr, 0.0, 1.0)?;
        check::int_in(&f("restart_every"), self.restart_every, 1, 1_000_000)
    }
}

/// Encoder, codebook and decoder.
#[derive(Debug)]
pub struct VqVae {
    /// Its configuration.
    pub cfg: VqConfig,
    encoder: nn::Sequential,
    decoder: nn::Sequential,
    /// `[K, code_dim]`.
    pub codebook: Tensor,
}

/// One training step's numbers.
#[derive(Debug, Clone, Copy)]
pub struct VqStep {
    /// Reconstruction plus commitment loss.
    pub loss: f64,
    /// Reconstruction loss (mean squared error).
    pub recon: f64,
}

impl VqVae {
    /// Encoder, codebook and decoder under `p`.
    pub fn new(p: &nn::Path, cfg: VqConfig) -> VqVae {
        let c = cfg.channels;
        let mut encoder = nn::seq().add(nn::conv2d(
            p / "enc_in",
            3,
            c,
            3,
            nn::ConvConfig {
                padding: 1,
                ..Default::default()
            },
        ));
        for i in 0..cfg.downsample {
            encoder = encoder.add_fn(|x| x.relu()).add(nn::conv2d(
                p / format!("enc_down{i}"),
                c,
                c,
                4,
                nn::ConvConfig {
                    stride: 2,
                    padding: 1,
                    ..Default::default()
                },
            ));
        }
        encoder = encoder.add_fn(|x| x.relu()).add(nn::conv2d(
            p / "enc_out",
            c,
            cfg.code_dim,
            1,
            Default::default(),
        ));
        let mut decoder = nn::seq().add(nn::conv2d(
            p / "dec_in",
            cfg.code_dim,
            c,
            3,
            nn::ConvConfig {
                padding: 1,
                ..Default::default()
            },
        ));
        for i in 0..cfg.downsample {
            decoder = decoder.add_fn(|x| x.relu()).add(nn::conv_transpose2d(
                p / format!("dec_up{i}"),
                c,
                c,
                4,
                nn::ConvTransposeConfig {
                    stride: 2,
                    padding: 1,
                    ..Default::default()
                },
            ));
        }
        decoder = decoder.add_fn(|x| x.relu()).add(nn::conv2d(
            p / "dec_out",
            c,
            3,
            3,
            nn::ConvConfig {
                padding: 1,
                ..Default::default()
            },
        ));
        // A linear output (no sigmoid): on mostly black canvases a sigmoid saturates at 0 and
        // the decoder stops learning the objects.
        let codebook = p.var(
            "codebook",
            &[cfg.codebook_size, cfg.code_dim],
            nn::Init::Uniform { lo: -0.1, up: 0.1 },
        );
        VqVae {
            cfg,
            encoder,
            decoder,
            codebook,
        }
    }

    /// `[N, 3, H, W]` → continuous latents `[N, h, w, D]`.
    fn latents(&self, x: &Tensor) -> Tensor {
        self.encoder.forward(&(x * 2.0 - 1.0)).permute([0, 2, 3, 1])
    }

    /// Nearest code of each latent: `[.., D]` → `[..]` i64.
    fn nearest(&self, z: &Tensor) -> Tensor {
        let flat = z.reshape([-1, self.cfg.code_dim]);
        let d = flat
            .pow_tensor_scalar(2)
            .sum_dim_intlist(1, true, Kind::Float)
            - flat.matmul(&self.codebook.tr()) * 2.0
            + self
                .codebook
                .pow_tensor_scalar(2)
                .sum_dim_intlist(1, false, Kind::Float)
                .unsqueeze(0);
        let mut shape = z.size();
        shape.pop();
        d.argmin(1, false).view(shape.as_slice())
    }

    /// Images → codes, `[N, h·w]` row-major.
    pub fn encode(&self, images: &Tensor) -> Tensor {
        tch::no_grad(|| {
            let codes = self.nearest(&self.latents(images));
            codes.flatten(1, -1)
        })
    }

    /// Codes `[N, h·w]` → images `[N, 3, H, W]` in [0, 1].
    pub fn decode(&self, codes: &Tensor) -> Tensor {
        tch::no_grad(|| {
            let (n, t) = codes.size2().expect("[N, T]");
            let side = (t as f64).sqrt() as i64;
            let z = self.codebook.index_select(0, &codes.flatten(0, -1)).view([
                n,
                side,
                side,
                self.cfg.code_dim,
            ]);
            self.decoder
                .forward(&z.permute([0, 3, 1, 2]))
                .clamp(0.0, 1.0)
        })
    }

    /// Trains on images drawn by `batch(step)`, with `on_step` reporting progress.
    pub fn train(
        &self,
        vs: &nn::VarStore,
        mut batch: impl FnMut(usize) -> Tensor,
        mut on_step: impl FnMut(usize, VqStep),
    ) -> Result<(), tch::TchError> {
        let mut opt = nn::Adam::default().build(vs, self.cfg.lr)?;
        let k = self.cfg.codebook_size;
        let mut usage = Tensor::zeros([k], (Kind::Float, vs.device()));
        for step in 0..self.cfg.steps {
            let x = batch(step);
            let z = self.latents(&x);
            if step == 0 {
                self.reseed(&z, &Tensor::ones([k], (Kind::Bool, vs.device())));
            }
            let codes = self.nearest(&z.detach());
            let q = self
                .codebook
                .index_select(0, &codes.flatten(0, -1))
                .view(z.size().as_slice());
            // Straight-through: the decoder sees q, the gradient flows to z.
            let st = &z + (&q - &z).detach();
            let recon = self.decoder.forward(&st.permute([0, 3, 1, 2]));
            let rec = recon.mse_loss(&x, tch::Reduction::Mean);
            let codebook_loss = q.mse_loss(&z.detach(), tch::Reduction::Mean);
            let commit = z.mse_loss(&q.detach(), tch::Reduction::Mean);
            let loss = &rec + codebook_loss + commit * self.cfg.commitment;
            opt.backward_step(&loss);
            let _ = usage.index_add_(
                0,
                &codes.flatten(0, -1),
                &Tensor::ones([codes.numel() as i64], (Kind::Float, vs.device())),
            );
            if (step + 1) % self.cfg.restart_every == 0 {
                self.reseed(&z.detach(), &usage.eq(0.0));
                let _ = usage.zero_();
            }
            on_step(
                step,
                VqStep {
                    loss: loss.double_value(&[]),
                    recon: rec.double_value(&[]),
                },
            );
        }
        Ok(())
    }

    /// Re-initialises the codes in `dead` from random latents of the batch.
    fn reseed(&self, z: &Tensor, dead: &Tensor) {
        tch::no_grad(|| {
            let flat = z.reshape([-1, self.cfg.code_dim]);
            let n = flat.size()[0];
            let pick = Tensor::randint(n, [self.cfg.codebook_size], (Kind::Int64, z.device()));
            let fresh = flat.index_select(0, &pick) + Tensor::randn_like(&self.codebook) * 0.01;
            let mut cb = self.codebook.shallow_clone();
            cb.copy_(&fresh.where_self(&dead.unsqueeze(1), &cb));
        });
    }
}

/// Metadata key of the tokenizer config (JSON).
const VQ_CONFIG_KEY: &str = "unimod.vq_config";

impl VqVae {
    /// Saves the weights with the config in the metadata.
    pub fn save(&self, vs: &nn::VarStore, path: &std::path::Path) -> Result<(), CheckpointError> {
        let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let meta = [(
            VQ_CONFIG_KEY.to_string(),
            serde_json::to_string(&self.cfg).expect("config serialises"),
        )]
        .into();
        save_tensors(path, &vars, meta)
    }

    /// Loads a tokenizer written by [`VqVae::save`].
    pub fn load(
        path: &std::path::Path,
        device: Device,
    ) -> Result<(nn::VarStore, VqVae), CheckpointError> {
        let loaded = load_tensors(path)?;
        let cfg: VqConfig = loaded
            .metadata
            .get(VQ_CONFIG_KEY)
            .and_then(|c| serde_json::from_str(c).ok())
            .ok_or_else(|| CheckpointError::NoConfig { path: path.into() })?;
        let mut vs = nn::VarStore::new(device);
        let vq = VqVae::new(&vs.root(), cfg);
        crate::tensorfile::load_into(&mut vs, &loaded, path)?;
        Ok((vs, vq))
    }
}

/// Codebook usage over a set of codes: perplexity of the code distribution and dead codes.
pub fn codebook_usage(codes: &Tensor, codebook_size: i64) -> (f64, i64) {
    let counts = codes
        .flatten(0, -1)
        .bincount::<Tensor>(None, codebook_size)
        .to_kind(Kind::Double);
    let p = &counts / counts.sum(Kind::Double);
    let entropy = -(&p * (&p + 1e-12).log()).sum(Kind::Double);
    (
        entropy.exp().double_value(&[]),
        counts.eq(0.0).sum(Kind::Int64).int64_value(&[]),
    )
}

/// Peak signal-to-noise ratio of reconstructions in [0, 1].
pub fn psnr(a: &Tensor, b: &Tensor) -> f64 {
    let mse = (a - b)
        .pow_tensor_scalar(2)
        .mean(Kind::Double)
        .double_value(&[]);
    10.0 * (1.0 / mse.max(1e-12)).log10()
}

/// Images as a `[N, 3, H, W]` tensor on `device`.
pub fn to_device(images: &[Image], device: Device) -> Tensor {
    Image::batch_to_tensor(images).to_device(device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::Split;
    use crate::shapes::ShapesConfig;

    #[test]
    fn trains_and_round_trips_shapes() {
        tch::manual_seed(0);
        let vs = nn::VarStore::new(Device::Cpu);
        let cfg = VqConfig {
            steps: 60,
            codebook_size: 64,
            channels: 16,
            restart_every: 20,
            batch_size: 16,
            ..Default::default()
        };
        let vq = VqVae::new(&vs.root(), cfg);
        let world = ShapesConfig::default();
        let images = |from: u64| -> Tensor {
            let imgs: Vec<Image> = (from..from + 16)
                .map(|i| world.example(Split::Train, i).image)
                .collect();
            to_device(&imgs, Device::Cpu)
        };
        let mut losses = Vec::new();
        vq.train(
            &vs,
            |s| images(s as u64 * 16),
            |_, st| losses.push(st.recon),
        )
        .unwrap();
        assert!(
            losses[59] < losses[0] * 0.5,
            "reconstruction loss {} -> {}",
            losses[0],
            losses[59]
        );
        let x = images(100_000);
        let codes = vq.encode(&x);
        assert_eq!(codes.size(), [16, 64]);
        assert!(codes.max().int64_value(&[]) < 64 && codes.min().int64_value(&[]) >= 0);
        let back = vq.decode(&codes);
        assert_eq!(back.size(), x.size());
        // Encoding the decoded image again lands on (mostly) the same codes.
        let again = vq.encode(&back);
        let same = codes
            .eq_tensor(&again)
            .to_kind(Kind::Float)
            .mean(Kind::Float)
            .double_value(&[]);
        assert!(same > 0.3, "code stability {same} (chance: 1/64)");
        let (perplexity, dead) = codebook_usage(&codes, 64);
        assert!(perplexity > 1.0 && dead < 64);
    }
}
