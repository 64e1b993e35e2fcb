//! One interface for every dataset: deterministic examples by (split, index), each an RGB image
//! with captions (and the facts they assert), question/answer pairs, and an optional class.

use crate::shapes::{Caption, ShapesConfig};
use serde::{Deserialize, Serialize};
use std::path::Path;
use tch::{Kind, Tensor};

/// A dataset's split: training, validation (losses during training) and test (evaluation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    /// Training examples.
    Train = 0,
    /// Validation examples.
    Val = 1,
    /// Test examples (evaluation and the judge's calibration).
    Test = 2,
}

/// An 8-bit RGB image, row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// Pixels per row.
    pub width: usize,
    /// Rows.
    pub height: usize,
    /// `width × height × 3` bytes.
    pub rgb: Vec<u8>,
}

impl Image {
    /// An all-black image.
    pub fn black(width: usize, height: usize) -> Image {
        Image {
            width,
            height,
            rgb: vec![0; width * height * 3],
        }
    }

    /// The pixel at column `x`, row `y`.
    pub fn get(&self, x: usize, y: usize) -> [u8; 3] {
        let i = (y * self.width + x) * 3;
        [self.rgb[i], self.rgb[i + 1], self.rgb[i + 2]]
    }

    /// Sets the pixel at column `x`, row `y`.
    pub fn set(&mut self, x: usize, y: usize, c: [u8; 3]) {
        let i = (y * self.width + x) * 3;
        self.rgb[i..i + 3].copy_from_slice(&c);
    }

    /// `[N, 3, H, W]` floats in [0, 1].
    pub fn batch_to_tensor(images: &[Image]) -> Tensor {
        let (h, w) = (images[0].height as i64, images[0].width as i64);
        let bytes: Vec<u8> = images.iter().flat_map(|i| i.rgb.iter().copied()).collect();
        Tensor::from_slice(&bytes)
            .view([images.len() as i64, h, w, 3])
            .permute([0, 3, 1, 2])
            .to_kind(Kind::Float)
            / 255.0
    }

    /// Inverse of [`Image::batch_to_tensor`] (values clamped to [0, 1]).
    pub fn batch_from_tensor(t: &Tensor) -> Vec<Image> {
        let (n, _, h, w) = t.size4().expect("[N, 3, H, W]");
        let bytes = (t.clamp(0.0, 1.0) * 255.0)
            .round()
            .to_kind(Kind::Uint8)
            .permute([0, 2, 3, 1])
            .contiguous()
            .to_device(tch::Device::Cpu);
        let flat = Vec::<u8>::try_from(bytes.view([-1])).expect("uint8 tensor");
        let per = (h * w * 3) as usize;
        (0..n as usize)
            .map(|i| Image {
                width: w as usize,
                height: h as usize,
                rgb: flat[i * per..(i + 1) * per].to_vec(),
            })
            .collect()
    }

    /// Writes images as a PNG grid with `cols` columns and a 2-pixel gap, upscaled `scale`×.
    pub fn save_grid(
        images: &[Image],
        cols: usize,
        scale: usize,
        path: &Path,
    ) -> Result<(), image::ImageError> {
        let Some(first) = images.first().filter(|_| cols > 0 && scale > 0) else {
            return Err(image::ImageError::Parameter(
                image::error::ParameterError::from_kind(image::error::ParameterErrorKind::Generic(
                    "a grid needs at least one image, one column and a scale of 1 or more".into(),
                )),
            ));
        };
        let (w, h) = (first.width * scale, first.height * scale);
        let rows = images.len().div_ceil(cols);
        let gap = 2;
        let mut out = image::RgbImage::from_pixel(
            (cols * (w + gap) + gap) as u32,
            (rows * (h + gap) + gap) as u32,
            image::Rgb([64, 64, 64]),
        );
        for (k, img) in images.iter().enumerate() {
            let (ox, oy) = (gap + (k % cols) * (w + gap), gap + (k / cols) * (h + gap));
            for y in 0..h {
                for x in 0..w {
                    out.put_pixel(
                        (ox + x) as u32,
                        (oy + y) as u32,
                        image::Rgb(img.get(x / scale, y / scale)),
                    );
                }
            }
        }
        out.save(path)
    }
}

/// The kind of an MMU question; accuracy is reported per kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QaKind {
    /// "What colour is the circle?"
    Color,
    /// "What shape is the red object?"
    Shape,
    /// "How many red circles are there?"
    Count,
    /// "Is there a blue square?" (yes / no)
    Exists,
    /// "Where is the red circle?"
    Position,
    /// "Which digit is this?" (MNIST)
    Digit,
}

/// One MMU question about an image, with its answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Qa {
    /// What the question asks about.
    pub kind: QaKind,
    /// The question's words.
    pub question: String,
    /// The one right answer.
    pub answer: String,
}

/// One sample of a dataset.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// The image.
    pub image: Image,
    /// Captions of the image (the first asserts most).
    pub captions: Vec<Caption>,
    /// Questions about the image.
    pub qa: Vec<Qa>,
    /// Class label where the dataset has one (MNIST digit).
    pub label: Option<u8>,
    /// The scene's objects where the dataset is procedural (`shapes`).
    pub objects: Vec<crate::shapes::Object>,
}

/// A dataset: deterministic, indexable examples per split.
pub trait Dataset: Send + Sync {
    /// The name configs use (`"shapes"`, `"mnist"`).
    fn name(&self) -> &str;
    /// Number of examples in a split; `None` for an unbounded (procedural) dataset.
    fn len(&self, split: Split) -> Option<usize>;
    /// Example `index` of a split (the same every time it is asked for).
    fn example(&self, split: Split, index: u64) -> Example;
    /// Canvas side in pixels.
    fn image_size(&self) -> usize;
    /// The dataset's identity and configuration: what cached tokenizers and pools are keyed by.
    fn fingerprint(&self) -> serde_json::Value;
}

impl Dataset for ShapesConfig {
    fn name(&self) -> &str {
        "shapes"
    }
    fn len(&self, _split: Split) -> Option<usize> {
        None
    }
    fn example(&self, split: Split, index: u64) -> Example {
        ShapesConfig::example(self, split, index)
    }
    fn image_size(&self) -> usize {
        self.image_size
    }
    fn fingerprint(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("a config serialises")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensor_round_trip_is_lossless() {
        let c = ShapesConfig::default();
        let imgs: Vec<Image> = (0..3).map(|i| c.example(Split::Val, i).image).collect();
        let t = Image::batch_to_tensor(&imgs);
        assert_eq!(t.size(), [3, 3, 32, 32]);
        assert_eq!(Image::batch_from_tensor(&t), imgs);
    }
}
