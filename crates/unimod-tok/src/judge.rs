//! The `shapes` T2I judge: detects the objects in an image (per grid cell: dominant palette
//! colour, then the shape from the geometry of that colour's pixels) and checks a caption's
//! facts against them, GenEval-style (accuracy per category and overall).
//!
//! It is a fixed rule set, calibrated only on the renderer's geometry: it never sees model
//! outputs. Its agreement with the ground truth is measured by `unimod tokenizer train` on clean
//! renders and on renders passed through the image tokenizer (crate docs list the numbers).

use crate::dataset::Image;
use crate::shapes::{Caption, Cell, Color, Fact, Shape};
use std::collections::BTreeMap;

/// A detected object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Detection {
    pub cell: Cell,
    pub color: Color,
    pub shape: Shape,
}

/// Pixels darker than this in every channel are background.
const INK: u8 = 70;
/// Fewer matching pixels than this in a cell is no object (a small triangle has ~18).
const MIN_PIXELS: usize = 7;
/// RGB distance within which a pixel belongs to the object's body.
const BODY_DISTANCE: f64 = 110.0;

fn nearest_color(p: [u8; 3]) -> (Color, f64) {
    Color::ALL
        .iter()
        .map(|c| {
            let q = c.rgb();
            let d: f64 = (0..3).map(|i| (p[i] as f64 - q[i] as f64).powi(2)).sum();
            (*c, d.sqrt())
        })
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .expect("palette is not empty")
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
        let color = nearest_color([(sum[0] / n) as u8, (sum[1] / n) as u8, (sum[2] / n) as u8]).0;
        // The shape is read from the pixels close to that colour: the dark fringe that
        // reconstructions blur around an object would round a square and square a circle.
        let target = color.rgb();
        let body: Vec<(usize, usize)> = pixels
            .into_iter()
            .filter(|&(x, y)| {
                let p = img.get(x, y);
                (0..3)
                    .map(|i| (p[i] as f64 - target[i] as f64).powi(2))
                    .sum::<f64>()
                    .sqrt()
                    < BODY_DISTANCE
            })
            .collect();
        if body.len() < MIN_PIXELS {
            continue;
        }
        out.push(Detection {
            cell: c,
            color,
            shape: classify(&body),
        });
    }
    out
}

/// Triangle: most of its mass in the lower half (apex up). Square vs circle: how much of the
/// bounding box *outside its inscribed ellipse* is filled — all of it for a square, almost
/// none for a circle — which survives the blur and speckle of reconstructions.
fn classify(pixels: &[(usize, usize)]) -> Shape {
    let min_max = |f: fn(&(usize, usize)) -> usize| {
        let v = pixels.iter().map(f);
        (v.clone().min().unwrap_or(0), v.max().unwrap_or(0))
    };
    let ((xmin, xmax), (ymin, ymax)) = (min_max(|p| p.0), min_max(|p| p.1));
    let mid2 = ymin + ymax; // twice the vertical midpoint
    let upper = pixels.iter().filter(|p| 2 * p.1 < mid2).count() as f64;
    let lower = pixels.iter().filter(|p| 2 * p.1 > mid2).count() as f64;
    if upper < 0.6 * lower {
        return Shape::Triangle;
    }
    let (cx, cy) = ((xmin + xmax) as f64 / 2.0, (ymin + ymax) as f64 / 2.0);
    let (rx, ry) = (
        (xmax - xmin + 1) as f64 / 2.0,
        (ymax - ymin + 1) as f64 / 2.0,
    );
    let outside =
        |x: usize, y: usize| ((x as f64 - cx) / rx).powi(2) + ((y as f64 - cy) / ry).powi(2) > 1.0;
    let corner_cells = (ymin..=ymax)
        .flat_map(|y| (xmin..=xmax).map(move |x| (x, y)))
        .filter(|&(x, y)| outside(x, y))
        .count();
    let corner_ink = pixels.iter().filter(|&&(x, y)| outside(x, y)).count();
    if corner_cells > 0 && corner_ink as f64 >= 0.5 * corner_cells as f64 {
        Shape::Square
    } else {
        Shape::Circle
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
    }
}

/// Accuracy per category and overall, GenEval-style: a caption counts as correct when every
/// fact it asserts holds; a category's accuracy is over the captions containing a fact of it.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct JudgeReport {
    pub per_category: BTreeMap<String, (usize, usize)>,
    pub captions_correct: usize,
    pub captions: usize,
}

impl JudgeReport {
    pub fn add(&mut self, caption: &Caption, img: &Image) {
        let found = detect(img);
        let mut all = true;
        for f in &caption.facts {
            let ok = holds(f, &found);
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
    fn true_captions_pass_and_swapped_captions_mostly_fail() {
        let c = ShapesConfig::default();
        let (mut own, mut swapped) = (JudgeReport::default(), JudgeReport::default());
        for i in 0..200 {
            let (e, f) = (c.example(Split::Val, i), c.example(Split::Val, i + 1000));
            own.add(&e.captions[0], &e.image);
            swapped.add(&f.captions[0], &e.image);
        }
        assert!(own.overall() >= 0.99, "{own:?}");
        assert!(swapped.overall() <= 0.05, "{swapped:?}");
    }
}
