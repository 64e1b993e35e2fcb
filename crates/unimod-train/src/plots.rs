//! PNG plots of experiments: loss against training FLOPs and against wall-clock per task, and
//! the share of each task's tokens every layer processed.

use crate::experiment::Outcome;
use crate::train::StepMetrics;
use anyhow::{Context, Result, anyhow};
use plotters::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::Once;
use unimod_tok::dataset::Image;

const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
const COLORS: [RGBColor; 6] = [BLACK, RED, BLUE, GREEN, MAGENTA, CYAN];

pub(crate) fn register_font() -> Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = std::fs::read(FONT)
            .map_err(|e| {
                anyhow!("plots need {FONT} (Debian: apt-get install fonts-dejavu-core): {e}")
            })
            .and_then(|bytes| {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
                    .map_err(|_| anyhow!("{FONT} is not a usable font"))
            });
    });
    result
}

fn metrics(run: &Path) -> Result<Vec<StepMetrics>> {
    let path = run.join("metrics.jsonl");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .map(|l| serde_json::from_str(l).with_context(|| format!("bad line in {}", path.display())))
        .collect()
}

/// Exponential moving average: MaskGIT losses are noisy (the mask ratio is drawn per image).
fn smooth(v: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let mut s = None;
    v.iter()
        .map(|(x, y)| {
            let m = s.map_or(*y, |p: f64| 0.9 * p + 0.1 * y);
            s = Some(m);
            (*x, m)
        })
        .collect()
}

/// A line per series; registers the font first.
pub(crate) fn line_chart(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[(String, Vec<(f64, f64)>)],
) -> Result<()> {
    let (xs, ys): (Vec<f64>, Vec<f64>) = series
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .filter(|(_, y)| y.is_finite())
        .unzip();
    if xs.is_empty() {
        return Ok(());
    }
    register_font()?;
    let (x0, x1) = (
        xs.iter().cloned().fold(f64::INFINITY, f64::min),
        xs.iter().cloned().fold(f64::NEG_INFINITY, f64::max),
    );
    let (y0, y1) = (
        ys.iter().cloned().fold(f64::INFINITY, f64::min),
        ys.iter().cloned().fold(f64::NEG_INFINITY, f64::max),
    );
    let root = BitMapBackend::new(path, (720, 440)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(56)
        .build_cartesian_2d(x0..x1.max(x0 + 1e-9), y0..y1.max(y0 + 1e-9))
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    for (i, (name, v)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(v.iter().copied(), color.stroke_width(2)))
            .map_err(|e| anyhow!("{e}"))?
            .label(name.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

/// A grid of generated images, each beside the real image of its caption and above the caption
/// (wrapped to three lines): what a reader needs to judge a T2I sample by eye.
pub fn captioned_samples(
    path: &Path,
    samples: &[(&Image, &Image, &str)],
    cols: usize,
) -> Result<()> {
    let Some((first, _, _)) = samples.first() else {
        return Ok(());
    };
    register_font()?;
    let scale = (144 / first.width.max(1)).max(1);
    let (w, h) = (first.width * scale, first.height * scale);
    let (gap, text_h) = (6, 42);
    let line_chars = (2 * w + gap) / 6;
    let (tile_w, tile_h) = (2 * w + 3 * gap, h + text_h + gap);
    let rows = samples.len().div_ceil(cols);
    let (width, height) = (cols * tile_w + gap, rows * tile_h + gap);
    let mut buf = vec![255u8; width * height * 3];
    for (k, (generated, real, _)) in samples.iter().enumerate() {
        let (ox, oy) = (gap + (k % cols) * tile_w, gap + (k / cols) * tile_h);
        for (dx, img) in [(0, generated), (w + gap, real)] {
            for y in 0..h {
                for x in 0..w {
                    let at = ((oy + y) * width + ox + dx + x) * 3;
                    buf[at..at + 3].copy_from_slice(&img.get(x / scale, y / scale));
                }
            }
        }
    }
    {
        let root =
            BitMapBackend::with_buffer(&mut buf, (width as u32, height as u32)).into_drawing_area();
        for (k, (_, _, caption)) in samples.iter().enumerate() {
            let (ox, oy) = (gap + (k % cols) * tile_w, gap + (k / cols) * tile_h + h + 2);
            let mut lines = vec![String::new()];
            for word in caption.split_whitespace() {
                let last = lines.last_mut().expect("one line at least");
                if !last.is_empty() && last.len() + 1 + word.len() > line_chars {
                    lines.push(word.to_string());
                } else {
                    if !last.is_empty() {
                        last.push(' ');
                    }
                    last.push_str(word);
                }
            }
            for (i, line) in lines.iter().take(3).enumerate() {
                root.draw_text(
                    line,
                    &("sans-serif", 12).into_font().color(&BLACK),
                    (ox as i32, (oy + 13 * i) as i32),
                )
                .map_err(|e| anyhow!("{e}"))?;
            }
        }
        root.present().map_err(|e| anyhow!("{e}"))?;
    }
    image::RgbImage::from_raw(width as u32, height as u32, buf)
        .context("sample grid buffer")?
        .save(path)
        .with_context(|| format!("writing {}", path.display()))
}

/// Writes the experiment's figures into `dir`; returns (title, path) pairs.
pub fn experiment(dir: &Path, outcomes: &[Outcome]) -> Result<Vec<(String, PathBuf)>> {
    register_font()?;
    let first_seed = outcomes.first().map_or(0, |o| o.seed);
    let runs: Vec<(&Outcome, Vec<StepMetrics>)> = outcomes
        .iter()
        .filter(|o| o.seed == first_seed)
        .map(|o| {
            Ok((
                o,
                metrics(&dir.join(format!("{}-seed{}", o.variant, o.seed)))?,
            ))
        })
        .collect::<Result<_>>()?;
    let mut figures = Vec::new();
    type Axis = fn(&StepMetrics) -> f64;
    let axes: [(&str, &str, Axis); 2] = [
        ("flops", "training TFLOPs", |m| m.flops_total / 1e12),
        ("wall", "wall-clock s", |m| m.wall_s),
    ];
    for task in ["t2i", "mmu"] {
        for (tag, label, x) in axes {
            let series: Vec<(String, Vec<(f64, f64)>)> = runs
                .iter()
                .map(|(o, ms)| {
                    let pts: Vec<(f64, f64)> = ms
                        .iter()
                        .filter_map(|m| {
                            if task == "t2i" { m.t2i } else { m.mmu }.map(|y| (x(m), y))
                        })
                        .collect();
                    (o.variant.clone(), smooth(&pts))
                })
                .collect();
            let path = dir.join(format!("loss-{task}-vs-{tag}.png"));
            let title = format!("{task} training loss vs {label}");
            line_chart(&path, &title, label, "loss (EMA 0.9)", &series)?;
            figures.push((title, path));
        }
    }
    // Share of each task's tokens processed per layer, in the last logged step.
    let mut series = Vec::new();
    for (o, ms) in &runs {
        let Some(last) = ms.last() else { continue };
        for (ti, tname) in ["t2i", "mmu"].iter().enumerate() {
            let pts: Vec<(f64, f64)> = last
                .kept
                .iter()
                .filter_map(|(l, k)| k[ti].map(|v| (*l as f64, v)))
                .collect();
            if !pts.is_empty() {
                series.push((format!("{} {tname}", o.variant), pts));
            }
        }
    }
    if !series.is_empty() {
        let path = dir.join("tokens-kept-per-layer.png");
        let title = "share of each task's tokens processed, per routed layer".to_string();
        line_chart(&path, &title, "layer", "share processed", &series)?;
        figures.push((title, path));
    }
    Ok(figures)
}

/// A heat map of `rows` (values in [0, max]), `cell` pixels per entry, dark = 0, bright = max.
pub(crate) fn heatmap(path: &Path, rows: &[Vec<f32>], cell: u32) -> Result<()> {
    let n = rows.len() as u32;
    let m = rows.first().map_or(0, |r| r.len()) as u32;
    let max = rows.iter().flatten().cloned().fold(1e-12f32, f32::max);
    let img = image::RgbImage::from_fn(m * cell, n * cell, |x, y| {
        let v = (rows[(y / cell) as usize][(x / cell) as usize] / max).clamp(0.0, 1.0);
        // black → red → yellow → white, so that small weights stay visible
        let c = |lo: f32| ((v * 3.0 - lo).clamp(0.0, 1.0) * 255.0) as u8;
        image::Rgb([c(0.0), c(1.0), c(2.0)])
    });
    img.save(path)
        .with_context(|| format!("writing {}", path.display()))
}
