//! `unimod`: the command line of UniMoD-rs.

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use unimod_train::{RunConfig, flops_report};

#[derive(Parser)]
#[command(
    name = "unimod",
    version,
    about = "Efficient unified multimodal transformers: dense, MoD and UniMoD"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// `--config FILE` plus `--set key=value` overrides, shared by every subcommand that reads a config.
#[derive(Args)]
struct ConfigArgs {
    /// TOML config (defaults when omitted).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override a config field, e.g. `--set model.d_model=256` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
}

impl ConfigArgs {
    fn load(&self) -> Result<RunConfig> {
        RunConfig::load(self.config.as_deref(), &self.overrides)
    }
}

#[derive(Subcommand)]
enum Command {
    /// Print libtorch's version, CUDA availability and device count, and the thread count.
    Doctor,
    /// Analytic forward FLOPs per sequence, dense vs the config's (or another) schedule.
    Flops {
        #[command(flatten)]
        config: ConfigArgs,
        /// A paper recipe (`showo-paper`, `emu3-paper`) or a schedule file; default: the config's.
        #[arg(long)]
        schedule: Option<String>,
        /// Task mix the total is averaged over.
        #[arg(long, default_value = "t2i=1,mmu=1")]
        mix: String,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Doctor => {
            println!("tch / libtorch    {}", unimod_tok::cache::TORCH_VERSION);
            println!("CUDA available    {}", tch::Cuda::is_available());
            println!("CUDA devices      {}", tch::Cuda::device_count());
            println!("cuDNN available   {}", tch::Cuda::cudnn_is_available());
            println!("CPU threads       {}", tch::get_num_threads());
        }
        Command::Flops {
            config,
            schedule,
            mix,
        } => {
            let cfg = config.load()?;
            let schedule = match schedule {
                Some(s) => flops_report::parse_schedule(&s)?,
                None => cfg.model.routing.schedule.clone(),
            };
            let r = flops_report::report(&cfg, &schedule, &flops_report::parse_mix(&mix)?)?;
            print!("{}", r.table);
        }
    }
    Ok(())
}
