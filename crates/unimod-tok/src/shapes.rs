//! `shapes`: a procedural compositional world, embedded and unbounded. Each image is a black
//! canvas with 1–3 objects (a shape of a colour and a size) in distinct cells of a 3×3 grid;
//! each comes with its structured spec, captions in several phrasings, each caption with the
//! facts it asserts (what the T2I judge checks), and question/answer pairs.
//!
//! Sample `i` of a split is a pure function of (seed, split, i): reproducible and parallel.

use crate::check::{self, InvalidValue};
use crate::dataset::{Example, Image, Qa, QaKind, Split};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// An object's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[allow(missing_docs)] // each variant is the word it names
pub enum Shape {
    Circle,
    Square,
    Triangle,
}

impl Shape {
    /// Every shape.
    pub const ALL: [Shape; 3] = [Shape::Circle, Shape::Square, Shape::Triangle];
    /// The word captions and answers use.
    pub fn name(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
        }
    }
}

/// An object's colour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[allow(missing_docs)] // each variant is the word it names
pub enum Color {
    Red,
    Green,
    Blue,
    Yellow,
    Magenta,
    Cyan,
    White,
    Orange,
}

impl Color {
    /// Every colour.
    pub const ALL: [Color; 8] = [
        Color::Red,
        Color::Green,
        Color::Blue,
        Color::Yellow,
        Color::Magenta,
        Color::Cyan,
        Color::White,
        Color::Orange,
    ];
    /// The word captions and answers use.
    pub fn name(self) -> &'static str {
        match self {
            Color::Red => "red",
            Color::Green => "green",
            Color::Blue => "blue",
            Color::Yellow => "yellow",
            Color::Magenta => "magenta",
            Color::Cyan => "cyan",
            Color::White => "white",
            Color::Orange => "orange",
        }
    }
    /// The colour it is drawn in (the judge classifies pixels against these).
    pub fn rgb(self) -> [u8; 3] {
        match self {
            Color::Red => [230, 30, 30],
            Color::Green => [30, 200, 40],
            Color::Blue => [40, 70, 240],
            Color::Yellow => [240, 230, 40],
            Color::Magenta => [220, 40, 220],
            Color::Cyan => [40, 220, 230],
            Color::White => [245, 245, 245],
            Color::Orange => [250, 140, 20],
        }
    }
}

/// An object's size: a small one fills about half its cell, a large one most of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[allow(missing_docs)] // each variant is the word it names
pub enum Size {
    Small,
    Large,
}

/// A cell of the 3×3 grid, row-major 0..9.
pub type Cell = u8;

/// The words for each [`Cell`], in cell order.
pub const POSITIONS: [&str; 9] = [
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
];

/// One object of a scene.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Object {
    /// Its shape.
    pub shape: Shape,
    /// Its colour.
    pub color: Color,
    /// Its size.
    pub size: Size,
    /// The grid cell it sits in (one object per cell).
    pub cell: Cell,
}

/// What a caption asserts about the image; the T2I judge checks each.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "fact", rename_all = "snake_case")]
#[allow(missing_docs)] // each variant's fields are named in its description
pub enum Fact {
    /// An object of this shape exists (GenEval "single object" / "two objects").
    Shape { shape: Shape },
    /// An object of this shape has this colour (colour attribution).
    Color { shape: Shape, color: Color },
    /// Exactly `n` objects of this colour and shape.
    Count { shape: Shape, color: Color, n: u8 },
    /// The object of this colour and shape sits in this cell.
    Position {
        shape: Shape,
        color: Color,
        cell: Cell,
    },
    /// The first object is left of the second.
    LeftOf {
        a: (Shape, Color),
        b: (Shape, Color),
    },
    /// The image shows this handwritten digit (MNIST).
    Digit { digit: u8 },
}

impl Fact {
    /// The GenEval-style category the fact scores under.
    pub fn category(&self) -> &'static str {
        match self {
            Fact::Shape { .. } => "object",
            Fact::Color { .. } => "color",
            Fact::Count { .. } => "counting",
            Fact::Position { .. } => "position",
            Fact::LeftOf { .. } => "relation",
            Fact::Digit { .. } => "digit",
        }
    }
}

/// A caption and the facts it asserts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Caption {
    /// The caption's words.
    pub text: String,
    /// What it asserts.
    pub facts: Vec<Fact>,
}

/// The sizes objects are drawn at. Captions and questions never name a size, so with `mixed`
/// a generator must choose one and draw every token of the object at it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Sizes {
    /// Small or large at random.
    #[default]
    Mixed,
    /// Every object small.
    Small,
    /// Every object large.
    Large,
}

/// `[data]` options of the shapes world.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShapesConfig {
    /// Canvas side in pixels: 32 (default) or 64.
    pub image_size: usize,
    /// Objects per scene are drawn uniformly from 1 to this.
    pub max_objects: usize,
    /// The sizes objects are drawn at.
    pub sizes: Sizes,
    /// The world's seed: scene `i` of a split is the same for every run with this seed.
    pub seed: u64,
}

impl Default for ShapesConfig {
    fn default() -> Self {
        ShapesConfig {
            image_size: 32,
            max_objects: 3,
            sizes: Sizes::Mixed,
            seed: 0,
        }
    }
}

/// The objects of one image.
#[derive(Debug, Clone, PartialEq)]
pub struct Scene {
    /// At most one per cell.
    pub objects: Vec<Object>,
}

impl ShapesConfig {
    /// `[data.shapes]` values in range: `image_size` in [12, 512] (a 3×3 grid of cells of at
    /// least 4 pixels), `max_objects` in [1, 9].
    pub fn validate(&self) -> Result<(), InvalidValue> {
        check::int_in("data.shapes.image_size", self.image_size, 12, 512)?;
        check::int_in("data.shapes.max_objects", self.max_objects, 1, 9)
    }

    fn rng(&self, split: Split, index: u64) -> ChaCha8Rng {
        let mut seed = [0u8; 32];
        seed[..8].copy_from_slice(&self.seed.to_le_bytes());
        seed[8] = split as u8;
        seed[16..24].copy_from_slice(&index.to_le_bytes());
        ChaCha8Rng::from_seed(seed)
    }

    /// A random scene: 1 to `max_objects` objects in distinct cells.
    pub fn scene(&self, rng: &mut impl Rng) -> Scene {
        let n = rng.gen_range(1..=self.max_objects.clamp(1, 9));
        let mut cells: Vec<Cell> = (0..9).collect();
        cells.shuffle(rng);
        let objects = cells[..n]
            .iter()
            .map(|&cell| Object {
                shape: *Shape::ALL.choose(rng).expect("non-empty"),
                color: *Color::ALL.choose(rng).expect("non-empty"),
                // Drawn whatever `sizes` says, so that one size changes nothing else of a scene.
                size: match (rng.gen_bool(0.5), self.sizes) {
                    (_, Sizes::Small) | (true, Sizes::Mixed) => Size::Small,
                    (_, Sizes::Large) | (false, Sizes::Mixed) => Size::Large,
                },
                cell,
            })
            .collect();
        Scene { objects }
    }

    /// Example `index` of `split`: image, captions with facts, questions and answers.
    pub fn example(&self, split: Split, index: u64) -> Example {
        let mut rng = self.rng(split, index);
        let scene = self.scene(&mut rng);
        let image = self.render(&scene);
        let (captions, qa) = (captions(&scene, &mut rng), questions(&scene, &mut rng));
        Example {
            image,
            captions,
            qa,
            label: None,
            objects: scene.objects,
        }
    }

    /// Rasterises a scene: each pixel centre is tested against the object's geometry.
    pub fn render(&self, scene: &Scene) -> Image {
        let s = self.image_size;
        let mut img = Image::black(s, s);
        let cell = s as f64 / 3.0;
        for o in &scene.objects {
            let (row, col) = ((o.cell / 3) as f64, (o.cell % 3) as f64);
            let (cx, cy) = ((col + 0.5) * cell, (row + 0.5) * cell);
            let r = cell * if o.size == Size::Large { 0.47 } else { 0.37 };
            for y in 0..s {
                for x in 0..s {
                    let (px, py) = (x as f64 + 0.5 - cx, y as f64 + 0.5 - cy);
                    let inside = match o.shape {
                        Shape::Circle => px * px + py * py <= r * r,
                        Shape::Square => px.abs() <= r * 0.8 && py.abs() <= r * 0.8,
                        // Apex up, base at the bottom: |x| ≤ (y + r) / 2 for y in [-r, r].
                        Shape::Triangle => py >= -r && py <= r && px.abs() <= (py + r) / 2.0,
                    };
                    if inside {
                        img.set(x, y, o.color.rgb());
                    }
                }
            }
        }
        img
    }
}

fn describe(o: &Object) -> String {
    format!("a {} {}", o.color.name(), o.shape.name())
}

fn number(n: usize) -> &'static str {
    [
        "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
    ][n.min(9)]
}

/// Several phrasings, each with the facts it asserts.
fn captions(scene: &Scene, rng: &mut impl Rng) -> Vec<Caption> {
    let objs = &scene.objects;
    let mut out = Vec::new();
    // 1. Every object with its position.
    let text = objs
        .iter()
        .map(|o| format!("{} at the {}", describe(o), POSITIONS[o.cell as usize]))
        .collect::<Vec<_>>()
        .join(" and ");
    let mut facts = Vec::new();
    for o in objs {
        facts.push(Fact::Shape { shape: o.shape });
        facts.push(Fact::Color {
            shape: o.shape,
            color: o.color,
        });
        facts.push(Fact::Position {
            shape: o.shape,
            color: o.color,
            cell: o.cell,
        });
    }
    out.push(Caption { text, facts });
    // 2. Counting of the most frequent (colour, shape).
    let o = objs[rng.gen_range(0..objs.len())];
    let n = objs
        .iter()
        .filter(|p| p.shape == o.shape && p.color == o.color)
        .count();
    let text = if n == 1 {
        describe(&o)
    } else {
        format!("{} {} {}s", number(n), o.color.name(), o.shape.name())
    };
    out.push(Caption {
        text,
        facts: vec![Fact::Count {
            shape: o.shape,
            color: o.color,
            n: n as u8,
        }],
    });
    // 3. A relation between two objects, when there are two.
    if objs.len() >= 2 {
        let (a, b) = (objs[0], objs[1]);
        let (l, r) = if a.cell % 3 < b.cell % 3 {
            (a, b)
        } else {
            (b, a)
        };
        if l.cell % 3 != r.cell % 3 {
            out.push(Caption {
                text: format!("{} left of {}", describe(&l), describe(&r)),
                facts: vec![
                    Fact::Color {
                        shape: l.shape,
                        color: l.color,
                    },
                    Fact::Color {
                        shape: r.shape,
                        color: r.color,
                    },
                    Fact::LeftOf {
                        a: (l.shape, l.color),
                        b: (r.shape, r.color),
                    },
                ],
            });
        }
    }
    out
}

fn questions(scene: &Scene, rng: &mut impl Rng) -> Vec<Qa> {
    let objs = &scene.objects;
    let o = objs[rng.gen_range(0..objs.len())];
    let mut qa = vec![
        Qa {
            kind: QaKind::Count,
            question: "how many objects are there?".into(),
            answer: number(objs.len()).into(),
        },
        Qa {
            kind: QaKind::Position,
            question: format!("where is the {} {}?", o.color.name(), o.shape.name()),
            answer: POSITIONS[o.cell as usize].into(),
        },
    ];
    if objs.iter().filter(|p| p.shape == o.shape).count() == 1 {
        qa.push(Qa {
            kind: QaKind::Color,
            question: format!("what color is the {}?", o.shape.name()),
            answer: o.color.name().into(),
        });
    }
    if objs.iter().filter(|p| p.color == o.color).count() == 1 {
        qa.push(Qa {
            kind: QaKind::Shape,
            question: format!("what shape is the {} object?", o.color.name()),
            answer: o.shape.name().into(),
        });
    }
    // Existence: half the time about a present object, half about an absent one.
    let (shape, color) = if rng.gen_bool(0.5) {
        (o.shape, o.color)
    } else {
        (
            *Shape::ALL.choose(rng).expect("non-empty"),
            *Color::ALL.choose(rng).expect("non-empty"),
        )
    };
    let present = objs.iter().any(|p| p.shape == shape && p.color == color);
    qa.push(Qa {
        kind: QaKind::Exists,
        question: format!("is there a {} {}?", color.name(), shape.name()),
        answer: if present { "yes" } else { "no" }.into(),
    });
    qa
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn examples_are_deterministic_and_split_dependent() {
        let c = ShapesConfig::default();
        assert_eq!(c.example(Split::Train, 5), c.example(Split::Train, 5));
        assert_ne!(c.example(Split::Train, 5), c.example(Split::Test, 5));
        assert_ne!(c.example(Split::Train, 5), c.example(Split::Train, 6));
    }

    #[test]
    fn one_size_changes_only_the_sizes() {
        let mixed = ShapesConfig::default();
        let large = ShapesConfig {
            sizes: Sizes::Large,
            ..mixed
        };
        let (mut sizes, mut n) = (std::collections::HashSet::new(), 0);
        for i in 0..50 {
            let (a, b) = (
                mixed.example(Split::Train, i),
                large.example(Split::Train, i),
            );
            assert_eq!(a.captions, b.captions);
            assert_eq!(a.qa, b.qa);
            for (x, y) in a.objects.iter().zip(&b.objects) {
                assert_eq!((x.shape, x.color, x.cell), (y.shape, y.color, y.cell));
                assert_eq!(y.size, Size::Large);
                sizes.insert(x.size);
                n += 1;
            }
        }
        assert!(n > 50 && sizes.len() == 2, "mixed draws both sizes");
    }

    #[test]
    fn render_places_colour_in_the_objects_cell() {
        let c = ShapesConfig::default();
        let scene = Scene {
            objects: vec![Object {
                shape: Shape::Square,
                color: Color::Red,
                size: Size::Large,
                cell: 4,
            }],
        };
        let img = c.render(&scene);
        assert_eq!(img.get(16, 16), Color::Red.rgb());
        assert_eq!(img.get(2, 2), [0, 0, 0]);
    }

    #[test]
    fn captions_and_answers_agree_with_the_scene() {
        let c = ShapesConfig::default();
        for i in 0..50 {
            let e = c.example(Split::Train, i);
            assert!(!e.captions.is_empty() && !e.qa.is_empty());
            let count = e.qa.iter().find(|q| q.kind == QaKind::Count).unwrap();
            assert!(["one", "two", "three"].contains(&count.answer.as_str()));
        }
    }
}
