//! Data-parallel `unimod train`: `--nproc N` spawns N ranks of itself on this machine; a
//! process started by torchrun (or anything that sets `RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
//! `MASTER_ADDR`, `MASTER_PORT`) joins its run. docs/distributed.md tells how to launch across
//! machines and what has been verified where.

use crate::RunConfig;
use crate::train::RunContext;
use anyhow::{Context, Result, bail};
use std::process::{Child, Command};
use std::time::Duration;
use tch::Device;
use unimod_dist::{Backend, Env, Group};
use unimod_tok::Task;

/// How long ranks wait for each other: the rendezvous, and every collective after it (a rank
/// that dies leaves the others to time out with this message rather than hang).
const TIMEOUT: Duration = Duration::from_secs(600);

/// Runs `args` (this program's own, without `--nproc`) as `nproc` ranks on this machine and
/// waits for them; when one fails, the others are stopped and the failure is named.
pub fn launch(nproc: usize, args: &[String]) -> Result<()> {
    if Env::from_env()?.is_some() {
        bail!(
            "--nproc {nproc} inside a launched rank (WORLD_SIZE is set): launch one way, not both"
        );
    }
    let exe = std::env::current_exe().context("locating the unimod executable")?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .context("finding a free port for the rendezvous")?
        .port();
    // Ctrl-C at a terminal reaches every rank (they share the launcher's process group) and
    // they stop together at a step boundary, checkpointed; the launcher waits for that.
    ctrlc::set_handler(|| {}).context("installing the Ctrl-C handler")?;
    let mut children: Vec<Child> = Vec::new();
    for rank in 0..nproc {
        let env = Env {
            rank,
            world_size: nproc,
            local_rank: rank,
            master_addr: "127.0.0.1".into(),
            master_port: port,
        };
        let child = Command::new(&exe)
            .args(args)
            .envs(env.vars())
            .spawn()
            .with_context(|| format!("starting rank {rank} of {nproc}"))?;
        children.push(child);
    }
    let mut done = vec![false; nproc];
    while done.iter().any(|d| !d) {
        for (rank, child) in children.iter_mut().enumerate() {
            if done[rank] {
                continue;
            }
            if let Some(status) = child.try_wait()? {
                done[rank] = true;
                if !status.success() {
                    for (r, other) in children.iter_mut().enumerate() {
                        if r != rank {
                            let _ = other.kill();
                            let _ = other.wait();
                        }
                    }
                    bail!("rank {rank} of {nproc} failed ({status}); the other ranks were stopped");
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// The run context of this process: joined to its data-parallel run when the torchrun
/// variables say it is a rank of one (on CUDA, device `cuda:LOCAL_RANK` and NCCL), plain
/// otherwise. Rank 0 loads or trains the tokenizers before the others read them.
pub fn context(cfg: &RunConfig, device: Device) -> Result<RunContext> {
    let Some(env) = Env::from_env()? else {
        return RunContext::new(cfg, device);
    };
    let per_step: usize = Task::BUILT_IN.iter().map(|t| cfg.train.mix.get(*t)).sum();
    if per_step < env.world_size {
        bail!(
            "train.mix has {per_step} sequences per step, fewer than the {} ranks (WORLD_SIZE): \
             every rank needs at least one",
            env.world_size
        );
    }
    let device = match device {
        Device::Cuda(_) => {
            let n = tch::Cuda::device_count() as usize;
            if env.local_rank >= n {
                bail!(
                    "LOCAL_RANK {} but this machine has {n} CUDA device(s)",
                    env.local_rank
                );
            }
            Device::Cuda(env.local_rank)
        }
        d => d,
    };
    let group = Group::join(&env, Backend::for_device(device), TIMEOUT)
        .with_context(|| format!("joining the run as rank {} of {}", env.rank, env.world_size))?;
    if env.rank != 0 {
        group.barrier()?;
    }
    let mut ctx = RunContext::new(cfg, device)?;
    if env.rank == 0 {
        group.barrier()?;
    }
    ctx.group = Some(group);
    Ok(ctx)
}

/// Refuses `command` in a launched rank: only `unimod train` splits its work across ranks, and
/// every rank running the whole command would write the same directories at once.
pub fn single_process(command: &str) -> Result<()> {
    if let Some(env) = Env::from_env()? {
        bail!(
            "`unimod {command}` runs in one process, but WORLD_SIZE={} is set: data-parallel \
             training is `unimod train` (docs/distributed.md)",
            env.world_size
        );
    }
    Ok(())
}
