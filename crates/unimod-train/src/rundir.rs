//! A run directory and its checkpoints, made so that nothing saved is lost: one writer at a
//! time (a lock naming its holder), an existing run never replaced unless asked, and a
//! checkpoint swap during which `checkpoints/latest` always names a complete checkpoint.
//!
//! Layout: `config.toml`, `metrics.jsonl`, `checkpoints/step-N/` (model, optimizer moments,
//! `state.json`, `run.toml`, `tokenizers.txt`) and `checkpoints/latest` (the name of the
//! current one). A save writes `<name>.partial/`, renames it to a name not yet taken, then
//! replaces `latest` by rename, and only then removes older checkpoints: a crash at any point
//! leaves `latest` naming a complete checkpoint, the new one or the previous one.

use anyhow::{Context, Result, bail};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The digest of the tokenizers a checkpoint was trained with.
pub const TOKENIZERS_FILE: &str = "tokenizers.txt";
const LOCK_FILE: &str = "lock";

/// What `train` does with a run directory that already holds a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// Refuse it (the default: nothing saved is replaced by accident).
    Fresh,
    /// Continue from its latest checkpoint.
    Resume,
    /// Delete its metrics, checkpoints and evaluation, then start anew.
    Overwrite,
}

/// An exclusive claim on a run directory, released on drop. The lock file names the holder
/// (pid and host); a lock left by a process of this host that no longer runs (a kill -9) is
/// taken over, one held by a live process or another host is refused with the holder named.
#[derive(Debug)]
pub struct RunLock {
    path: PathBuf,
}

impl RunLock {
    /// Takes the run directory's lock, refusing a live holder (named) and taking over the
    /// lock of a dead process on this host.
    pub fn acquire(dir: &Path) -> Result<RunLock> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating run directory {}", dir.display()))?;
        let path = dir.join(LOCK_FILE);
        let me = format!("pid {} on {}", std::process::id(), hostname());
        for _ in 0..2 {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut f) => {
                    f.write_all(me.as_bytes())
                        .with_context(|| format!("writing {}", path.display()))?;
                    return Ok(RunLock { path });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let holder = std::fs::read_to_string(&path).unwrap_or_default();
                    let holder = holder.trim();
                    if !holder_is_gone(holder) {
                        bail!(
                            "{} is in use by another run ({holder}); wait for it to finish, or \
                             delete {} if that process is gone",
                            dir.display(),
                            path.display()
                        );
                    }
                    eprintln!(
                        "note: {} was locked by {holder}, which no longer runs; taking it over",
                        dir.display()
                    );
                    std::fs::remove_file(&path)
                        .with_context(|| format!("removing stale lock {}", path.display()))?;
                }
                Err(e) => return Err(e).with_context(|| format!("creating {}", path.display())),
            }
        }
        bail!("{}: another run took the lock first", dir.display())
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "this host".into())
}

/// True only when the holder is a process of this host that no longer exists.
fn holder_is_gone(holder: &str) -> bool {
    let Some((pid, host)) = holder
        .strip_prefix("pid ")
        .and_then(|r| r.split_once(" on "))
    else {
        return false;
    };
    host == hostname()
        && Path::new("/proc/self").exists()
        && pid
            .parse::<u32>()
            .is_ok_and(|p| !Path::new(&format!("/proc/{p}")).exists())
}

/// Whether `dir` holds a run (a config, metrics or checkpoints written by `train`).
pub fn holds_run(dir: &Path) -> bool {
    ["config.toml", "metrics.jsonl", "checkpoints"]
        .iter()
        .any(|f| dir.join(f).exists())
}

/// Applies `start` to `dir` (locked by the caller): refuses an existing run for `Fresh`,
/// clears it for `Overwrite`, requires one for `Resume`.
pub fn prepare(dir: &Path, start: Start) -> Result<()> {
    match start {
        Start::Fresh if holds_run(dir) => bail!(
            "{} already holds a run ({}); pass --resume to continue it or --overwrite to replace it",
            dir.display(),
            on_disk(dir)
        ),
        Start::Overwrite => {
            // Evaluations and an experiment's outcome describe the model being replaced: left
            // behind, an interrupted retraining would pass them off as its own.
            for f in ["metrics.jsonl", "eval.json", "outcome.json", "config.toml"] {
                let p = dir.join(f);
                if p.exists() {
                    std::fs::remove_file(&p)
                        .with_context(|| format!("removing {}", p.display()))?;
                }
            }
            for d in ["checkpoints", "evals"] {
                let p = dir.join(d);
                if p.exists() {
                    std::fs::remove_dir_all(&p)
                        .with_context(|| format!("removing {}", p.display()))?;
                }
            }
            Ok(())
        }
        Start::Resume => latest_checkpoint(dir).map(|_| ()),
        Start::Fresh => Ok(()),
    }
}

/// The step a checkpoint folder name records (`step-12`, or `step-12.1` for a second save of
/// step 12).
pub fn step_of(name: &str) -> Option<usize> {
    let rest = name.strip_prefix("step-")?;
    rest.split('.').next()?.parse().ok()
}

/// The latest checkpoint folder of a run (or the folder itself if it is one).
pub fn latest_checkpoint(path: &Path) -> Result<PathBuf> {
    if path.join("model.safetensors").exists() {
        return Ok(path.to_path_buf());
    }
    let root = if path.join("checkpoints").exists() {
        path.join("checkpoints")
    } else {
        path.to_path_buf()
    };
    let name = std::fs::read_to_string(root.join("latest")).with_context(|| {
        format!(
            "no checkpoint in {} (expected checkpoints/latest)",
            path.display()
        )
    })?;
    let ck = root.join(name.trim());
    if !ck.join("model.safetensors").exists() {
        bail!(
            "{} names checkpoint {}, which is missing or incomplete",
            root.join("latest").display(),
            ck.display()
        );
    }
    Ok(ck)
}

/// What a run directory holds, in words, for messages after a failure.
pub fn on_disk(dir: &Path) -> String {
    match latest_checkpoint(dir) {
        Ok(ck) => {
            let name = ck.file_name().unwrap_or_default().to_string_lossy();
            match step_of(&name) {
                Some(s) => format!("its last checkpoint, step {s}, is kept in {}", ck.display()),
                None => format!("its last checkpoint is kept in {}", ck.display()),
            }
        }
        Err(_) => format!("no checkpoint has been saved in {}", dir.display()),
    }
}

/// One file of a checkpoint: its name in the folder and how to write it there.
pub type Part<'a> = (&'a str, Box<dyn Fn(&Path) -> Result<()> + 'a>);

/// Saves a checkpoint of `step` under `dir/checkpoints` and makes it the latest. `point` is
/// called before each file-system operation with its name; it fails only in tests, to stand
/// for a crash there.
pub fn save_checkpoint(
    dir: &Path,
    step: usize,
    parts: &[Part],
    point: &mut dyn FnMut(&str) -> Result<()>,
) -> Result<PathBuf> {
    let root = dir.join("checkpoints");
    let base = format!("step-{step}");
    // A step saved twice (a resumed run that repeats steps a crash kept from `latest`) gets a
    // fresh name, so the folder `latest` names is never deleted before its successor exists.
    let name = (0..)
        .map(|k| {
            if k == 0 {
                base.clone()
            } else {
                format!("{base}.{k}")
            }
        })
        .find(|n| !root.join(n).exists())
        .expect("an unbounded range has a free name");
    let tmp = root.join(format!("{name}.partial"));
    point("clear partial")?;
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("removing {}", tmp.display()))?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    for (file, write) in parts {
        point(file)?;
        write(&tmp.join(file)).with_context(|| format!("writing {}", tmp.join(file).display()))?;
    }
    let final_dir = root.join(&name);
    point("rename checkpoint")?;
    std::fs::rename(&tmp, &final_dir)
        .with_context(|| format!("renaming {} to {}", tmp.display(), final_dir.display()))?;
    let latest_tmp = root.join("latest.partial");
    point("write latest")?;
    std::fs::write(&latest_tmp, &name)
        .with_context(|| format!("writing {}", latest_tmp.display()))?;
    point("rename latest")?;
    std::fs::rename(&latest_tmp, root.join("latest"))
        .with_context(|| format!("replacing {}", root.join("latest").display()))?;
    // Older checkpoints (and partial folders of crashed saves) go once the new one is latest.
    let entries =
        std::fs::read_dir(&root).with_context(|| format!("listing {}", root.display()))?;
    for e in entries.flatten() {
        let n = e.file_name().to_string_lossy().to_string();
        if n.starts_with("step-") && n != name && e.path().is_dir() {
            point("remove old")?;
            std::fs::remove_dir_all(e.path())
                .with_context(|| format!("removing {}", e.path().display()))?;
        }
    }
    Ok(final_dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(tag: &str) -> Vec<Part<'_>> {
        ["model.safetensors", "state.json"]
            .into_iter()
            .map(|f| -> Part<'_> { (f, Box::new(move |p: &Path| Ok(std::fs::write(p, tag)?))) })
            .collect()
    }

    fn tempdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("unimod-rundir-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    /// A crash injected before every file-system operation of a save, for a new step and for
    /// a step saved twice, always leaves `latest` naming a complete checkpoint: the new one or
    /// the previous one.
    #[test]
    fn a_crash_at_any_point_of_a_save_leaves_a_complete_latest_checkpoint() {
        for (label, second_step) in [("new step", 2), ("same step", 1)] {
            let mut crash_at = 0;
            loop {
                let dir = tempdir("crash");
                save_checkpoint(&dir, 1, &parts("one"), &mut |_| Ok(())).unwrap();
                let mut n = 0;
                let mut crashed = false;
                let r = save_checkpoint(&dir, second_step, &parts("two"), &mut |p| {
                    n += 1;
                    if n > crash_at {
                        crashed = true;
                        bail!("crash before {p}")
                    }
                    Ok(())
                });
                assert_eq!(r.is_err(), crashed, "{label}");
                let ck = latest_checkpoint(&dir).unwrap_or_else(|e| {
                    panic!("{label}, crash point {crash_at}: {e:#}");
                });
                let content = std::fs::read_to_string(ck.join("state.json")).unwrap();
                let model = std::fs::read_to_string(ck.join("model.safetensors")).unwrap();
                assert_eq!(
                    content, model,
                    "{label}, crash point {crash_at}: mixed checkpoint"
                );
                assert!(content == "one" || content == "two");
                if !crashed {
                    assert_eq!(content, "two");
                    // The next save after the crash-free one still works and cleans up.
                    save_checkpoint(&dir, 3, &parts("three"), &mut |_| Ok(())).unwrap();
                    let left: Vec<_> = std::fs::read_dir(dir.join("checkpoints"))
                        .unwrap()
                        .flatten()
                        .map(|e| e.file_name().to_string_lossy().to_string())
                        .collect();
                    assert_eq!(left.len(), 2, "{left:?}");
                    break;
                }
                // Resuming after the crash saves again; that save must succeed too.
                save_checkpoint(&dir, second_step, &parts("two"), &mut |_| Ok(())).unwrap();
                assert_eq!(
                    std::fs::read_to_string(latest_checkpoint(&dir).unwrap().join("state.json"))
                        .unwrap(),
                    "two"
                );
                crash_at += 1;
            }
            assert!(
                crash_at >= 6,
                "{label}: only {crash_at} crash points exercised"
            );
        }
    }

    #[test]
    fn step_names_parse() {
        assert_eq!(step_of("step-12"), Some(12));
        assert_eq!(step_of("step-12.3"), Some(12));
        assert_eq!(step_of("latest"), None);
    }

    #[test]
    fn a_second_writer_is_refused_and_a_dead_ones_lock_is_taken_over() {
        let dir = tempdir("lock");
        let held = RunLock::acquire(&dir).unwrap();
        let e = RunLock::acquire(&dir).unwrap_err();
        assert!(
            format!("{e:#}").contains(&format!("pid {}", std::process::id())),
            "{e:#}"
        );
        drop(held);
        // A pid that cannot exist on Linux (above pid_max's ceiling).
        std::fs::write(
            dir.join(LOCK_FILE),
            format!("pid 99999999 on {}", hostname()),
        )
        .unwrap();
        let _taken = RunLock::acquire(&dir).unwrap();
        // Another host's lock is never taken over.
        drop(_taken);
        std::fs::write(dir.join(LOCK_FILE), "pid 1 on elsewhere").unwrap();
        assert!(RunLock::acquire(&dir).is_err());
    }

    #[test]
    fn an_existing_run_is_refused_unless_resumed_or_overwritten() {
        let dir = tempdir("start");
        prepare(&dir, Start::Fresh).unwrap();
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("metrics.jsonl"), "{}\n").unwrap();
        save_checkpoint(&dir, 4, &parts("x"), &mut |_| Ok(())).unwrap();
        let e = prepare(&dir, Start::Fresh).unwrap_err();
        assert!(format!("{e:#}").contains("step 4"), "{e:#}");
        assert!(
            dir.join("metrics.jsonl").exists(),
            "a refused start deleted metrics"
        );
        prepare(&dir, Start::Resume).unwrap();
        std::fs::write(dir.join("outcome.json"), "{}").unwrap();
        std::fs::create_dir_all(dir.join("evals/a")).unwrap();
        prepare(&dir, Start::Overwrite).unwrap();
        assert!(!holds_run(&dir));
        // What described the replaced model goes with it.
        assert!(!dir.join("outcome.json").exists() && !dir.join("evals").exists());
        assert!(prepare(&dir, Start::Resume).is_err());
    }
}
