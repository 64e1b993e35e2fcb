//! Where the `shapes` judge goes wrong on tokenizer reconstructions: per-object errors by kind,
//! and the spread of its two shape statistics per true shape, clean and reconstructed — the
//! figures docs/data.md quotes.
//!
//! `cargo run --release -p unimod-train --example judge_errors [-- configs/quickstart.toml]`

use anyhow::Result;
use std::collections::BTreeMap;
use std::path::PathBuf;
use unimod_tok::dataset::{Example, Image, Split};
use unimod_tok::judge::{self, ShapesJudge, T2iJudge};
use unimod_train::{RunConfig, data};

fn main() -> Result<()> {
    let config = std::env::args()
        .nth(1)
        .unwrap_or("configs/quickstart.toml".into());
    let cfg = RunConfig::load(Some(&PathBuf::from(config)), &[])?;
    anyhow::ensure!(
        cfg.data.dataset == "shapes",
        "the shapes judge needs data.dataset = \"shapes\""
    );
    let device = tch::Device::Cpu;
    let world = data::dataset(&cfg.data)?;
    let tk = data::tokenizers(world.as_ref(), &ShapesJudge, &cfg.tokenizer, None, device)?;
    let examples: Vec<Example> = (0..512).map(|i| world.example(Split::Test, i)).collect();
    let clean: Vec<Image> = examples.iter().map(|e| e.image.clone()).collect();
    let x = unimod_tok::vq::to_device(&clean, device);
    let reconstructed = Image::batch_from_tensor(&tk.vq.decode(&tk.vq.encode(&x)));
    for (name, images) in [("clean", &clean), ("reconstructed", &reconstructed)] {
        let mut errors: BTreeMap<String, usize> = BTreeMap::new();
        let mut stats: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
        let (mut objects, mut right) = (0, 0);
        for (e, img) in examples.iter().zip(images.iter()) {
            let found = judge::detect(img);
            let cell = img.width as f64 / 3.0;
            for o in &e.objects {
                objects += 1;
                let kind = match found.iter().find(|d| d.cell == o.cell) {
                    None => "missed".to_string(),
                    Some(d) if d.color != o.color => format!("{:?} read as {:?}", o.color, d.color),
                    Some(d) if d.shape != o.shape => format!("{:?} read as {:?}", o.shape, d.shape),
                    Some(_) => {
                        right += 1;
                        String::new()
                    }
                };
                if !kind.is_empty() {
                    *errors.entry(kind).or_default() += 1;
                }
                let (r, c) = ((o.cell / 3) as f64 * cell, (o.cell % 3) as f64 * cell);
                let span = |a: f64, max: usize| {
                    (a.round() as usize, ((a + cell).round() as usize).min(max))
                };
                let m = judge::shape_moments(
                    img,
                    span(c, img.width),
                    span(r, img.height),
                    o.color.rgb(),
                );
                stats
                    .entry(format!("{:?}", o.shape))
                    .or_default()
                    .push((m.skew, m.corner_anisotropy));
            }
        }
        println!(
            "{name}: scenes {:.1} %, objects {right}/{objects} ({:.1} %)",
            100.0 * ShapesJudge.agreement(&examples, images),
            100.0 * right as f64 / objects as f64
        );
        for (kind, n) in &errors {
            println!("  {kind}: {n}");
        }
        for (shape, v) in &stats {
            let pct = |f: fn(&(f64, f64)) -> f64, q: f64| {
                let mut s: Vec<f64> = v.iter().map(f).collect();
                s.sort_by(f64::total_cmp);
                s[((s.len() - 1) as f64 * q).round() as usize]
            };
            println!(
                "  {shape}: skew {:.2} … {:.2}, corner anisotropy {:.2} … {:.2} (5th–95th percentile)",
                pct(|p| p.0, 0.05),
                pct(|p| p.0, 0.95),
                pct(|p| p.1, 0.05),
                pct(|p| p.1, 0.95)
            );
        }
    }
    Ok(())
}
