//! docs/extending.md stays true: every line of its Rust blocks is in the schedule source, in
//! order, and the config it names defines the schedule it describes.

use std::path::Path;

fn root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

#[test]
fn the_walkthrough_quotes_the_source() {
    let doc = std::fs::read_to_string(root().join("docs/extending.md")).unwrap();
    let source =
        std::fs::read_to_string(root().join("crates/unimod-router/src/schedule.rs")).unwrap();
    let mut blocks = 0;
    for block in doc.split("```rust\n").skip(1) {
        let code = block.split("```").next().unwrap();
        // Each quoted line in the source, after the previous one.
        let mut from = 0;
        for line in code.lines().filter(|l| !l.trim().is_empty()) {
            let at = source[from..].find(line).unwrap_or_else(|| {
                panic!("docs/extending.md quotes a line not in schedule.rs: {line}")
            });
            from += at + line.len();
        }
        blocks += 1;
    }
    assert_eq!(blocks, 3, "the walkthrough's three code blocks");
}

#[test]
fn the_named_config_uses_the_schedule() {
    let text = std::fs::read_to_string(root().join("configs/p-mod.toml")).unwrap();
    let config: toml::Value = toml::from_str(&text).unwrap();
    let variants = config["experiment"]["variants"].as_array().unwrap();
    let p_mod = variants
        .iter()
        .find(|v| v["schedule"]["kind"].as_str() == Some("p_mod"))
        .expect("a p_mod variant");
    assert_eq!(
        p_mod["routable"].as_array().unwrap()[0].as_str(),
        Some("image")
    );
    let schedule: unimod_router::Schedule = p_mod["schedule"].clone().try_into().unwrap();
    let routed = schedule
        .resolve(8)
        .unwrap()
        .iter()
        .filter(|p| matches!(p, unimod_router::LayerPlan::Routed { .. }))
        .count();
    assert_eq!(routed, 5, "docs/extending.md: layers 3–7 route");
}
