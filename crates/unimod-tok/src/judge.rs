//! The `shapes` T2I judge: detects the objects in an image (per grid cell: the palette colour
//! of the nearest hue, then the shape from blur-robust moments of that colour's pixels) and
//! checks a caption's facts against them, GenEval-style (accuracy per category and overall).
//!
//! It is a fixed rule set, its thresholds set from renders and from tokenizer reconstructions
//! of renders: it never sees model outputs. Its agreement with the ground truth is measured by `unimod tokenizer train` on clean
//! renders and on renders passed through the image tokenizer (crate docs list the numbers).

use crate::dataset::{Example, Image};
use crate::shapes::{Caption, Cell, Color, Fact, Shape};
use std::collections::BTreeMap;

/// A detected object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Detection {
    /// The grid cell it was found in.
    pub cell: Cell,
    /// Its colour (nearest palette colour of its pixels).
    pub color: Color,
    /// Its shape (from [`ShapeMoments`]).
    pub shape: Shape,
}

/// Pixels darker than this in every channel are background.
const INK: u8 = 70;
/// Fewer matching pixels than this in a cell is no object (a small triangle has ~18).
const MIN_PIXELS: usize = 7;
/// RGB distance within which a pixel belongs to the object's body.
const BODY_DISTANCE: f64 = 110.0;

/// The palette colour whose direction in RGB space is closest to `p`'s: the dark fringe that
/// blur mixes into an object scales its mean colour down (a darkened yellow is nearer orange
/// than yellow in plain RGB distance) but keeps its hue.
fn nearest_color(p: [u8; 3]) -> Color {
    let unit = |c: [u8; 3]| {
        let v = c.map(f64::from);
        let n = v.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-9);
        v.map(|x| x / n)
    };
    let u = unit(p);
    Color::ALL
        .iter()
        .map(|c| {
            let q = unit(c.rgb());
            (*c, (0..3).map(|i| u[i] * q[i]).sum::<f64>())
        })
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .expect("palette is not empty")
        .0
}

/// Objects in the image, at most one per cell: the cell's ink pixels give the shape, their mean
/// colour (robust to the speckle of reconstructed or generated images) the nearest palette colour.
pub fn detect(img: &Image) -> Vec<Detection> {
    let cell = img.width as f64 / 3.0;
    let mut out = Vec::new();
    for c in 0..9u8 {
        let (r0, c0) = ((c / 3) as f64 * cell, (c % 3) as f64 * cell);
        let (y0, y1) = (
            r0.round() as usize,
            ((r0 + cell).round() as usize).min(img.height),
        );
        let (x0, x1) = (
            c0.round() as usize,
            ((c0 + cell).round() as usize).min(img.width),
        );
        let mut pixels = Vec::new();
        let mut sum = [0f64; 3];
        for y in y0..y1 {
            for x in x0..x1 {
                let p = img.get(x, y);
                if p.iter().any(|v| *v >= INK) {
                    pixels.push((x, y));
                    for i in 0..3 {
                        sum[i] += p[i] as f64;
                    }
                }
            }
        }
        if pixels.len() < MIN_PIXELS {
            continue;
        }
        let n = pixels.len() as f64;
        let color = nearest_color([(sum[0] / n) as u8, (sum[1] / n) as u8, (sum[2] / n) as u8]);
        // An object needs enough pixels close to its colour, not just a dark smudge of ink.
        let target = color.rgb();
        let body = pixels
            .iter()
            .filter(|&&(x, y)| {
                let p = img.get(x, y);
                (0..3)
                    .map(|i| (p[i] as f64 - target[i] as f64).powi(2))
                    .sum::<f64>()
                    .sqrt()
                    < BODY_DISTANCE
            })
            .count();
        if body < MIN_PIXELS {
            continue;
        }
        let m = shape_moments(img, (x0, x1), (y0, y1), target);
        let shape = if m.skew < TRIANGLE_SKEW {
            Shape::Triangle
        } else if m.corner_anisotropy > SQUARE_ANISOTROPY {
            Shape::Square
        } else {
            Shape::Circle
        };
        out.push(Detection {
            cell: c,
            color,
            shape,
        });
    }
    out
}

/// Below this [`ShapeMoments::skew`] an object is a triangle: clean triangles ≈ −0.57, and
/// through the quickstart VQ tokenizer −0.63 … −0.43 (5th–95th percentile) against −0.13 … 0.05
/// for discs and squares (`cargo run --release -p unimod-train --example judge_errors`).
const TRIANGLE_SKEW: f64 = -0.25;
/// Above this [`ShapeMoments::corner_anisotropy`] a symmetric object is a square: clean
/// squares 1, clean discs 0; through the quickstart VQ tokenizer discs spread over 0.13–0.66 and
/// squares over 0.56–1.23 (5th–95th percentile): the threshold sits where the tails cross.
const SQUARE_ANISOTROPY: f64 = 0.6;

/// Blur-robust shape statistics of one cell: the moments of its pixels, each weighted by how
/// much of the object's `target` colour it holds. Cumulants add under convolution and a
/// Gaussian's third and fourth are zero, so both statistics survive the blur of reconstructed
/// and generated images, which the outline of a thresholded mask does not.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ShapeMoments {
    /// Vertical skewness: a triangle standing on its base has its mass low and its tail up
    /// (clean ≈ −0.57); discs and squares are symmetric (0).
    pub skew: f64,
    /// How much more the fourth cumulant reaches along the diagonals than along the axes,
    /// ÷ the squared area (blur keeps both), scaled so a clean square gives 1: a square's
    /// corners lie on the diagonals, a disc is isotropic (0).
    pub corner_anisotropy: f64,
}

/// The [`ShapeMoments`] of the pixels of `img` in columns `x0..x1` and rows `y0..y1`, weighted
/// by their closeness to `target`.
pub fn shape_moments(
    img: &Image,
    (x0, x1): (usize, usize),
    (y0, y1): (usize, usize),
    target: [u8; 3],
) -> ShapeMoments {
    let t: [f64; 3] = target.map(f64::from);
    let tt: f64 = t.iter().map(|v| v * v).sum();
    let mut pts = Vec::new();
    for y in y0..y1 {
        for x in x0..x1 {
            let p = img.get(x, y);
            let w = ((0..3).map(|i| p[i] as f64 * t[i]).sum::<f64>() / tt).clamp(0.0, 1.0);
            if w > 0.0 {
                pts.push((x as f64, y as f64, w));
            }
        }
    }
    let total: f64 = pts.iter().map(|p| p.2).sum();
    if total <= 0.0 {
        return ShapeMoments {
            skew: 0.0,
            corner_anisotropy: 0.0,
        };
    }
    let cx = pts.iter().map(|p| p.0 * p.2).sum::<f64>() / total;
    let cy = pts.iter().map(|p| p.1 * p.2).sum::<f64>() / total;
    let moment = |f: &dyn Fn(f64, f64) -> f64| {
        pts.iter()
            .map(|&(x, y, w)| w * f(x - cx, y - cy))
            .sum::<f64>()
            / total
    };
    let kurt = |proj: &dyn Fn(f64, f64) -> f64| {
        moment(&|x, y| proj(x, y).powi(4)) - 3.0 * moment(&|x, y| proj(x, y).powi(2)).powi(2)
    };
    let h = std::f64::consts::FRAC_1_SQRT_2;
    let axes = (kurt(&|x, _| x) + kurt(&|_, y| y)) / 2.0;
    let diagonals = (kurt(&|x, y| (x + y) * h) + kurt(&|x, y| (x - y) * h)) / 2.0;
    let var_y = moment(&|_, y| y * y).max(1e-12);
    ShapeMoments {
        skew: moment(&|_, y| y.powi(3)) / var_y.powf(1.5),
        // A square of area A has diagonals − axes = A² / 240.
        corner_anisotropy: 240.0 * (diagonals - axes) / (total * total),
    }
}

/// What a perfect detector finds in a scene.
pub fn truth(objects: &[crate::shapes::Object]) -> Vec<Detection> {
    objects
        .iter()
        .map(|o| Detection {
            cell: o.cell,
            color: o.color,
            shape: o.shape,
        })
        .collect()
}

/// Whether one fact holds among the detections.
pub fn holds(fact: &Fact, found: &[Detection]) -> bool {
    let at = |s: Shape, c: Color| found.iter().filter(move |d| d.shape == s && d.color == c);
    match fact {
        Fact::Shape { shape } => found.iter().any(|d| d.shape == *shape),
        Fact::Color { shape, color } => at(*shape, *color).next().is_some(),
        Fact::Count { shape, color, n } => at(*shape, *color).count() == *n as usize,
        Fact::Position { shape, color, cell } => at(*shape, *color).any(|d| d.cell == *cell),
        Fact::LeftOf { a, b } => {
            at(a.0, a.1).any(|da| at(b.0, b.1).any(|db| da.cell % 3 < db.cell % 3))
        }
        Fact::Digit { .. } => false,
    }
}

/// What scores generated images against their captions: a judge of the dataset's own world,
/// never trained on model outputs.
pub trait T2iJudge {
    /// For each (caption, image) pair, whether each of the caption's facts holds.
    fn facts(&self, captions: &[&Caption], images: &[Image]) -> Vec<Vec<bool>>;
    /// Share of images the judge reads exactly as their example's ground truth (validation on
    /// clean and on reconstructed images).
    fn agreement(&self, examples: &[Example], images: &[Image]) -> f64;
    /// Fréchet distance between the judge's features of two image sets, where it has features.
    fn frechet(&self, _a: &[Image], _b: &[Image]) -> Option<f64> {
        None
    }
}

/// The rule-based judge of the `shapes` world.
pub struct ShapesJudge;

impl T2iJudge for ShapesJudge {
    fn facts(&self, captions: &[&Caption], images: &[Image]) -> Vec<Vec<bool>> {
        captions
            .iter()
            .zip(images)
            .map(|(c, img)| {
                let found = detect(img);
                c.facts.iter().map(|f| holds(f, &found)).collect()
            })
            .collect()
    }

    fn agreement(&self, examples: &[Example], images: &[Image]) -> f64 {
        let pairs: Vec<_> = examples
            .iter()
            .zip(images)
            .map(|(e, img)| (truth(&e.objects), detect(img)))
            .collect();
        scene_agreement(&pairs)
    }
}

/// Accuracy per category and overall, GenEval-style: a caption counts as correct when every
/// fact it asserts holds; a category's accuracy is over the captions containing a fact of it.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct JudgeReport {
    /// Per category: (captions with a fact of it whose facts of it all hold, captions with a
    /// fact of it).
    pub per_category: BTreeMap<String, (usize, usize)>,
    /// Captions whose every fact holds.
    pub captions_correct: usize,
    /// Captions scored.
    pub captions: usize,
}

impl JudgeReport {
    /// Scores every (caption, image) pair with `judge`.
    pub fn add(&mut self, judge: &dyn T2iJudge, captions: &[&Caption], images: &[Image]) {
        for (caption, holds) in captions.iter().zip(judge.facts(captions, images)) {
            self.add_one(caption, &holds);
        }
    }

    fn add_one(&mut self, caption: &Caption, holds: &[bool]) {
        let mut all = true;
        for (f, &ok) in caption.facts.iter().zip(holds) {
            let e = self
                .per_category
                .entry(f.category().to_string())
                .or_default();
            e.0 += ok as usize;
            e.1 += 1;
            all &= ok;
        }
        self.captions_correct += all as usize;
        self.captions += 1;
    }

    /// Share of captions whose facts all hold.
    pub fn overall(&self) -> f64 {
        self.captions_correct as f64 / self.captions.max(1) as f64
    }

    /// Share of all asserted facts that hold: off the floor long before whole captions are.
    pub fn facts(&self) -> f64 {
        let (ok, n) = self
            .per_category
            .values()
            .fold((0, 0), |(a, b), (ok, n)| (a + ok, b + n));
        ok as f64 / n.max(1) as f64
    }

    /// The images scored with their prompts scrambled: each image against the next caption
    /// (the last against the first). On real images it is a perfect generator that ignores its
    /// prompt (the prompt-blind reference); on generated images, the same generator with its
    /// prompts ignored (the prompt-scrambled control, the fair floor of a generated set).
    /// `None` with fewer than two images.
    pub fn scrambled(
        judge: &dyn T2iJudge,
        captions: &[&Caption],
        images: &[Image],
    ) -> Option<JudgeReport> {
        if images.len() < 2 {
            return None;
        }
        let next: Vec<Image> = images[1..].iter().chain(&images[..1]).cloned().collect();
        let mut r = JudgeReport::default();
        r.add(judge, captions, &next);
        Some(r)
    }

    /// A category's accuracy, `None` when no caption asserted a fact of it.
    pub fn category(&self, name: &str) -> Option<f64> {
        self.per_category
            .get(name)
            .map(|(ok, n)| *ok as f64 / (*n).max(1) as f64)
    }
}

/// Share of images whose detected object set equals the scene's (cell, colour, shape) set.
pub fn scene_agreement(pairs: &[(Vec<Detection>, Vec<Detection>)]) -> f64 {
    let ok = pairs
        .iter()
        .filter(|(truth, found)| {
            let (mut a, mut b) = (truth.clone(), found.clone());
            a.sort();
            b.sort();
            a == b
        })
        .count();
    ok as f64 / pairs.len().max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::Split;
    use crate::shapes::ShapesConfig;

    #[test]
    fn agrees_with_clean_renders() {
        for size in [32, 64] {
            let c = ShapesConfig {
                image_size: size,
                ..Default::default()
            };
            let pairs: Vec<_> = (0..300)
                .map(|i| {
                    let e = c.example(Split::Test, i);
                    (truth(&e.objects), detect(&e.image))
                })
                .collect();
            let a = scene_agreement(&pairs);
            assert!(a >= 0.99, "size {size}: agreement {a}");
        }
    }

    #[test]
    fn prompt_blind_reference_is_far_below_the_real_images() {
        let c = ShapesConfig::default();
        let examples: Vec<_> = (0..100).map(|i| c.example(Split::Test, i)).collect();
        let captions: Vec<&Caption> = examples.iter().map(|e| &e.captions[0]).collect();
        let images: Vec<Image> = examples.iter().map(|e| e.image.clone()).collect();
        let mut own = JudgeReport::default();
        own.add(&ShapesJudge, &captions, &images);
        let blind = JudgeReport::scrambled(&ShapesJudge, &captions, &images)
            .unwrap()
            .facts();
        assert!(own.facts() > 0.99, "own captions: {}", own.facts());
        assert!(blind < 0.3, "prompt-blind: {blind}");
        assert!(JudgeReport::scrambled(&ShapesJudge, &captions[..1], &images[..1]).is_none());
    }

    /// A box blur applied twice (close to a Gaussian of σ ≈ 1.2 px).
    fn blurred(img: &Image) -> Image {
        let mut out = img.clone();
        for _ in 0..2 {
            let src = out.clone();
            for y in 0..img.height {
                for x in 0..img.width {
                    let mut acc = [0u32; 3];
                    let mut n = 0;
                    for (dx, dy) in (-1i64..=1).flat_map(|dx| (-1i64..=1).map(move |dy| (dx, dy))) {
                        let (sx, sy) = (x as i64 + dx, y as i64 + dy);
                        if sx >= 0
                            && sy >= 0
                            && (sx as usize) < img.width
                            && (sy as usize) < img.height
                        {
                            let p = src.get(sx as usize, sy as usize);
                            (0..3).for_each(|i| acc[i] += p[i] as u32);
                            n += 1;
                        }
                    }
                    out.set(x, y, acc.map(|v| (v / n) as u8));
                }
            }
        }
        out
    }

    #[test]
    fn blurred_renders_keep_their_shapes() {
        let c = ShapesConfig {
            image_size: 64,
            ..Default::default()
        };
        let pairs: Vec<_> = (0..100)
            .map(|i| {
                let e = c.example(Split::Test, i);
                (truth(&e.objects), detect(&blurred(&e.image)))
            })
            .collect();
        let a = scene_agreement(&pairs);
        assert!(a >= 0.97, "agreement on blurred renders {a}");
    }

    #[test]
    fn true_captions_pass_and_swapped_captions_mostly_fail() {
        let c = ShapesConfig::default();
        let (mut own, mut swapped) = (JudgeReport::default(), JudgeReport::default());
        for i in 0..200 {
            let (e, f) = (c.example(Split::Val, i), c.example(Split::Val, i + 1000));
            let image = std::slice::from_ref(&e.image);
            own.add(&ShapesJudge, &[&e.captions[0]], image);
            swapped.add(&ShapesJudge, &[&f.captions[0]], image);
        }
        assert!(
            own.overall() >= 0.99 && own.facts() >= own.overall(),
            "{own:?}"
        );
        assert!(swapped.overall() <= 0.05, "{swapped:?}");
    }
}
