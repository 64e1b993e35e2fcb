//! `cargo xtask`: the project's own set-up and orchestration. It installs what UniMoD-rs needs
//! (libtorch 2.11.0, the MNIST and judge packages) and drives the `unimod` CLI and cargo; the
//! machine learning itself lives in the library crates and the CLI, never here.
//!
//! This crate must build on a machine without libtorch, so it depends on no crate that links tch.

#[path = "../../crates/unimod-tok/src/cache.rs"]
mod cache;
mod setup;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "Set-up, tests and experiments of UniMoD-rs"
)]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install libtorch 2.11.0 and the data packages into the per-user cache (idempotent).
    Setup,
    /// Set up if needed, then run the whole test suite (unit, integration and doc tests).
    Test {
        /// Extra arguments for `cargo test`, after `--`.
        #[arg(last = true)]
        cargo_args: Vec<String>,
    },
    /// Print libtorch's path and version, CUDA availability, threads and cache locations.
    Doctor,
    /// The main job: train dense, MoD and UniMoD on the same data and compare them.
    Experiment {
        /// Experiment configuration.
        #[arg(default_value = "configs/quickstart.toml")]
        config: PathBuf,
        /// Repeat with this many seeds and report mean ± spread.
        #[arg(long, default_value_t = 1)]
        seeds: u32,
        /// `key=value` overrides of the config (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// Train every variant again instead of reusing finished runs (a run whose training is
        /// unchanged but whose `[eval]` is not is evaluated again, not trained again).
        #[arg(long)]
        fresh: bool,
        /// Reuse finished runs of the same config made by another build of the program.
        #[arg(long, conflicts_with = "fresh")]
        reuse_other_builds: bool,
    },
    /// The paper's tables and figures regenerated beside the paper's numbers, with verdicts,
    /// into `runs/reproduce/REPORT.md` (finished runs of the same config and program reused).
    Reproduce {
        /// table2, table3, table4, table5, fig3, fig4, attention, redundancy (default: all).
        what: Vec<String>,
        /// quick (minutes, checks the command), cpu (about an hour) or gpu.
        #[arg(long, default_value = "cpu")]
        scale: String,
        /// The runs' config (configs/reproduce-long.toml: the longer budget whose dense model
        /// meets issue #15's goal; docs/main-job.md).
        #[arg(long, default_value = "configs/reproduce.toml")]
        config: PathBuf,
        #[arg(long, default_value_t = 3)]
        seeds: u32,
        /// `key=value` overrides of configs/reproduce.toml (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// Reuse finished runs of the same config made by another build of the program.
        #[arg(long)]
        reuse_other_builds: bool,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    match cli.command {
        Task::Setup => {
            setup::run(&root)?;
        }
        Task::Test { cargo_args } => {
            setup::run(&root)?;
            let mut cargo = cargo_cmd(&root);
            cargo.args(["test", "--workspace"]).args(&cargo_args);
            run("cargo test", &mut cargo)?;
        }
        Task::Doctor => {
            let libtorch = setup::libtorch_dir(&root);
            println!("libtorch         {}", libtorch.display());
            match setup::torch_version(&libtorch) {
                Ok(v) => println!("libtorch version {v}"),
                // Building the CLI without libtorch ends in a wall of C++ errors: say it here.
                Err(e) => bail!(
                    "libtorch is not installed at {} ({e:#}): `cargo xtask setup` installs it",
                    libtorch.display()
                ),
            }
            println!("cache            {}", cache::cache_root().display());
            println!("data             {}", cache::data_dir().display());
            println!("artifacts        {}", cache::artifacts_dir().display());
            unimod(&root, &["doctor"])?;
        }
        Task::Experiment {
            config,
            seeds,
            overrides,
            fresh,
            reuse_other_builds,
        } => {
            setup::run(&root)?;
            let mut args = vec![
                "experiment".to_string(),
                "--config".into(),
                config.display().to_string(),
            ];
            args.extend(["--seeds".to_string(), seeds.to_string()]);
            if fresh {
                args.push("--fresh".into());
            }
            if reuse_other_builds {
                args.push("--reuse-other-builds".into());
            }
            unimod_with(&root, args, overrides)?;
        }
        Task::Reproduce {
            what,
            scale,
            config,
            seeds,
            overrides,
            reuse_other_builds,
        } => {
            setup::run(&root)?;
            let mut args = vec!["reproduce".to_string()];
            if reuse_other_builds {
                args.push("--reuse-other-builds".into());
            }
            args.extend(what);
            // Each config reproduces into its own folder, so the runs of one are never reused
            // for, or replaced by, another's.
            let stem = config
                .file_stem()
                .map_or("reproduce".into(), |s| s.to_string_lossy());
            args.extend(["--config".into(), config.display().to_string()]);
            args.extend(["--out".into(), format!("runs/{stem}")]);
            args.extend(["--scale".into(), scale, "--seeds".into(), seeds.to_string()]);
            unimod_with(&root, args, overrides)?;
        }
    }
    Ok(())
}

/// `unimod ARGS --set O…`.
fn unimod_with(root: &Path, mut args: Vec<String>, overrides: Vec<String>) -> Result<()> {
    for o in overrides {
        args.extend(["--set".to_string(), o]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    unimod(root, &args)
}

/// Runs the `unimod` CLI through cargo (release build), so xtask never duplicates its logic.
fn unimod(root: &Path, args: &[&str]) -> Result<()> {
    let mut cargo = cargo_cmd(root);
    cargo
        .args([
            "run",
            "--release",
            "-p",
            "unimod-train",
            "--bin",
            "unimod",
            "--",
        ])
        .args(args);
    run("unimod", &mut cargo)
}

fn cargo_cmd(root: &Path) -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root);
    cmd
}

fn run(what: &str, cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("could not start {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}
