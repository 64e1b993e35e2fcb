//! Data-parallel training: the ranks of a run find each other through libtorch's c10d
//! `TCPStore` (torchrun's rendezvous: `MASTER_ADDR`, `MASTER_PORT`, `RANK`, `WORLD_SIZE`,
//! `LOCAL_RANK`), and sum gradients with NCCL on CUDA, the engine PyTorch's DDP uses: the
//! `libnccl.so.2` that libtorch's CUDA build links, reached through a small C++ shim
//! (`csrc/c10d.cpp`) compiled against the same libtorch as tch.
//!
//! On the CPU the sum goes through the store itself ([`Backend::Store`]): every rank writes its
//! tensor and reads the others', adding them in rank order, so every rank gets the same bits.
//! It is slow (a TCP round trip of every gradient) and exists so that the launcher, the
//! sharding and the equality with one process are tested where there is no GPU; the wheel's
//! Gloo backend cannot be reached from C++ (its headers are not shipped).
//!
//! ```no_run
//! use unimod_dist::{Backend, Env, Group};
//! let env = Env::from_env()?.expect("launched with WORLD_SIZE set");
//! let group = Group::join(&env, Backend::Store, std::time::Duration::from_secs(60))?;
//! let g = tch::Tensor::ones([4], (tch::Kind::Float, tch::Device::Cpu));
//! group.all_reduce_sum(&g)?; // every element now equals the world size
//! # Ok::<(), unimod_dist::DistError>(())
//! ```
#![deny(missing_docs)]

use std::cell::Cell;
use std::ffi::{CString, c_char, c_void};
use std::time::Duration;
use tch::{Device, Kind, Tensor};

/// What can go wrong joining a group or in a collective.
#[derive(Debug, thiserror::Error)]
pub enum DistError {
    /// A torchrun variable is missing or malformed.
    #[error("environment variable {name}={value:?}: {why}")]
    Env {
        /// The variable.
        name: &'static str,
        /// Its value ("" when unset).
        value: String,
        /// What is accepted.
        why: String,
    },
    /// libtorch raised an error (the rendezvous timed out, a peer died, NCCL failed).
    #[error("{op}: {message}")]
    Torch {
        /// The operation.
        op: &'static str,
        /// libtorch's message.
        message: String,
    },
    /// A tensor a collective cannot take.
    #[error("{0}")]
    Tensor(String),
}

/// The place of this process in a data-parallel run, as torchrun describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Env {
    /// This process's rank, 0-based.
    pub rank: usize,
    /// Ranks in the run.
    pub world_size: usize,
    /// This process's rank on its machine (the GPU it drives).
    pub local_rank: usize,
    /// Host of rank 0's store.
    pub master_addr: String,
    /// Port of rank 0's store.
    pub master_port: u16,
}

impl Env {
    /// The torchrun variables of this process: `None` when `WORLD_SIZE` is unset (a plain
    /// single-process run); an error naming the variable when one is missing or out of range.
    pub fn from_env() -> Result<Option<Env>, DistError> {
        Env::from_vars(|k| std::env::var(k).ok())
    }

    /// [`Env::from_env`] over any variable lookup (tests).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<Env>, DistError> {
        let Some(world) = var("WORLD_SIZE") else {
            return Ok(None);
        };
        let num = |name: &'static str, value: Option<String>, hi: usize| {
            let value = value.unwrap_or_default();
            match value.trim().parse::<usize>() {
                Ok(v) if v < hi => Ok(v),
                _ => Err(DistError::Env {
                    name,
                    value,
                    why: format!("an integer in [0, {hi})"),
                }),
            }
        };
        let world_size = num("WORLD_SIZE", Some(world), 1 << 20)?;
        if world_size == 0 {
            return Err(DistError::Env {
                name: "WORLD_SIZE",
                value: "0".into(),
                why: "at least 1".into(),
            });
        }
        let rank = num("RANK", var("RANK"), world_size)?;
        let local_rank = match var("LOCAL_RANK") {
            Some(v) => num("LOCAL_RANK", Some(v), world_size)?,
            None => rank,
        };
        let master_port = match var("MASTER_PORT") {
            Some(v) => num("MASTER_PORT", Some(v), 65536)? as u16,
            None => 29500,
        };
        Ok(Some(Env {
            rank,
            world_size,
            local_rank,
            master_addr: var("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into()),
            master_port,
        }))
    }

    /// The variables that place rank `rank` of `world_size` on this machine (the launcher
    /// sets them on the processes it spawns).
    pub fn vars(&self) -> Vec<(&'static str, String)> {
        vec![
            ("RANK", self.rank.to_string()),
            ("WORLD_SIZE", self.world_size.to_string()),
            ("LOCAL_RANK", self.local_rank.to_string()),
            ("MASTER_ADDR", self.master_addr.clone()),
            ("MASTER_PORT", self.master_port.to_string()),
        ]
    }
}

/// How a group sums tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// libtorch's `ProcessGroupNCCL` (CUDA tensors).
    Nccl,
    /// Through the rendezvous store, in rank order (CPU tensors; for tests, not speed).
    Store,
}

impl Backend {
    /// NCCL for CUDA devices, the store otherwise.
    pub fn for_device(device: Device) -> Backend {
        match device {
            Device::Cuda(_) => Backend::Nccl,
            _ => Backend::Store,
        }
    }
}

/// Whether NCCL is loaded in this process (it comes with a CUDA build of libtorch, as PyPI's
/// wheel is; it can be loaded on a machine without a GPU, where its communicators fail).
pub fn nccl_loaded() -> bool {
    unsafe { ffi::unimod_nccl_loaded() }
}

/// Allows TF32 for f32 matmuls and convolutions on CUDA (Ampere and newer); no effect on the
/// CPU. Process-wide, like `torch.backends.cuda.matmul.allow_tf32`.
pub fn set_tf32(on: bool) {
    unsafe { ffi::unimod_set_tf32(on) }
}

/// Whether TF32 is allowed for f32 matmuls.
pub fn tf32() -> bool {
    unsafe { ffi::unimod_tf32() }
}

/// The ranks of one run, joined.
pub struct Group {
    rank: usize,
    world_size: usize,
    backend: Backend,
    store: *mut c_void,
    nccl: *mut c_void,
    /// Collectives issued so far: names each one's store keys.
    ops: Cell<u64>,
}

impl Group {
    /// Joins the run `env` describes: rank 0 serves the store, the others connect, all wait
    /// (up to `timeout`) until every rank is there.
    pub fn join(env: &Env, backend: Backend, timeout: Duration) -> Result<Group, DistError> {
        let host = CString::new(env.master_addr.clone()).map_err(|_| DistError::Env {
            name: "MASTER_ADDR",
            value: env.master_addr.clone(),
            why: "a host name without NUL bytes".into(),
        })?;
        let mut store = std::ptr::null_mut();
        call("TCPStore rendezvous", |err, len| unsafe {
            ffi::unimod_store_new(
                host.as_ptr(),
                env.master_port,
                env.rank == 0,
                env.world_size as i32,
                timeout.as_millis() as i64,
                &mut store,
                err,
                len,
            )
        })?;
        let mut group = Group {
            rank: env.rank,
            world_size: env.world_size,
            backend,
            store,
            nccl: std::ptr::null_mut(),
            ops: Cell::new(0),
        };
        if backend == Backend::Nccl {
            // Rank 0 draws the communicator's id; the store hands it to the others.
            let mut id = vec![0u8; 128];
            if env.rank == 0 {
                call("ncclGetUniqueId", |err, len| unsafe {
                    ffi::unimod_nccl_unique_id(id.as_mut_ptr(), err, len)
                })?;
                group.set("unimod/nccl-id", &id)?;
            } else {
                id = group.get("unimod/nccl-id")?;
            }
            let mut comm = std::ptr::null_mut();
            call("ncclCommInitRank", |err, len| unsafe {
                ffi::unimod_nccl_init(
                    env.local_rank as i32,
                    env.world_size as i32,
                    id.as_ptr(),
                    env.rank as i32,
                    &mut comm,
                    err,
                    len,
                )
            })?;
            group.nccl = comm;
        }
        Ok(group)
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Ranks in the run.
    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// How this group sums.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Sums `t` over the ranks, in place; every rank ends with the same values. `t` must be
    /// contiguous (the store backend: f32 or f64 on the CPU).
    pub fn all_reduce_sum(&self, t: &Tensor) -> Result<(), DistError> {
        // A world of one through NCCL still calls it (the one-GPU test of the NCCL path).
        if self.world_size == 1 && self.backend == Backend::Store {
            return Ok(());
        }
        if !t.is_contiguous() {
            return Err(DistError::Tensor(
                "all_reduce_sum takes a contiguous tensor".into(),
            ));
        }
        match self.backend {
            Backend::Nccl => call("NCCL all-reduce", |err, len| unsafe {
                ffi::unimod_nccl_all_reduce(self.nccl, t.as_ptr() as *mut c_void, err, len)
            }),
            Backend::Store => {
                let key = self.next_key("sum");
                self.set(&format!("{key}/{}", self.rank), &to_bytes(t)?)?;
                let mut total: Option<Tensor> = None;
                for r in 0..self.world_size {
                    // Added in rank order on every rank, so every rank gets the same bits.
                    let part = match r == self.rank {
                        true => t.shallow_clone(),
                        false => from_bytes(&self.get(&format!("{key}/{r}"))?, t)?,
                    };
                    total = Some(match total {
                        None => part,
                        Some(acc) => acc + part,
                    });
                }
                let total = total.expect("world_size ≥ 1");
                tch::no_grad(|| t.shallow_clone().copy_(&total));
                self.release(&key)
            }
        }
    }

    /// `root`'s `t` copied into every rank's `t`, in place.
    pub fn broadcast(&self, t: &Tensor, root: usize) -> Result<(), DistError> {
        if self.world_size == 1 && self.backend == Backend::Store {
            return Ok(());
        }
        match self.backend {
            Backend::Nccl => call("NCCL broadcast", |err, len| unsafe {
                ffi::unimod_nccl_broadcast(
                    self.nccl,
                    t.as_ptr() as *mut c_void,
                    root as i32,
                    err,
                    len,
                )
            }),
            Backend::Store => {
                let key = self.next_key("bcast");
                if self.rank == root {
                    self.set(&format!("{key}/{root}"), &to_bytes(t)?)?;
                } else {
                    let bytes = self.get(&format!("{key}/{root}"))?;
                    let theirs = from_bytes(&bytes, t)?;
                    tch::no_grad(|| t.shallow_clone().copy_(&theirs));
                }
                self.release(&key)
            }
        }
    }

    /// Returns when every rank has called it.
    pub fn barrier(&self) -> Result<(), DistError> {
        if self.world_size == 1 {
            return Ok(());
        }
        let key = self.next_key("barrier");
        self.add(&format!("{key}/in"), 1)?;
        loop {
            if self.add(&format!("{key}/in"), 0)? >= self.world_size as i64 {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Sums the gradients of `params` over the ranks in buckets of at most `bucket_bytes`
    /// (each flattened into one buffer: one collective per bucket, as DDP does); parameters
    /// without a gradient are skipped, the same on every rank.
    pub fn all_reduce_gradients(
        &self,
        params: &[Tensor],
        bucket_bytes: usize,
    ) -> Result<(), DistError> {
        if self.world_size == 1 {
            return Ok(());
        }
        let grads: Vec<Tensor> = params
            .iter()
            .map(Tensor::grad)
            .filter(Tensor::defined)
            .collect();
        for bucket in buckets(&grads, bucket_bytes) {
            let flat = Tensor::cat(&bucket.iter().map(|g| g.view([-1])).collect::<Vec<_>>(), 0);
            self.all_reduce_sum(&flat)?;
            let mut at = 0;
            for g in bucket {
                let n = g.numel() as i64;
                let mut g = g.shallow_clone();
                g.copy_(&flat.narrow(0, at, n).view_as(&g));
                at += n;
            }
        }
        Ok(())
    }

    fn next_key(&self, what: &str) -> String {
        let n = self.ops.get();
        self.ops.set(n + 1);
        format!("unimod/{what}/{n}")
    }

    fn set(&self, key: &str, bytes: &[u8]) -> Result<(), DistError> {
        let k = CString::new(key).expect("keys have no NUL");
        call("store set", |err, len| unsafe {
            ffi::unimod_store_set(
                self.store,
                k.as_ptr(),
                bytes.as_ptr(),
                bytes.len(),
                err,
                len,
            )
        })
    }

    fn get(&self, key: &str) -> Result<Vec<u8>, DistError> {
        let k = CString::new(key).expect("keys have no NUL");
        let (mut data, mut n) = (std::ptr::null_mut(), 0usize);
        call("store get", |err, len| unsafe {
            ffi::unimod_store_get(self.store, k.as_ptr(), &mut data, &mut n, err, len)
        })?;
        let v = unsafe { std::slice::from_raw_parts(data, n) }.to_vec();
        unsafe { ffi::unimod_bytes_free(data) };
        Ok(v)
    }

    fn add(&self, key: &str, delta: i64) -> Result<i64, DistError> {
        let k = CString::new(key).expect("keys have no NUL");
        let mut out = 0;
        call("store add", |err, len| unsafe {
            ffi::unimod_store_add(self.store, k.as_ptr(), delta, &mut out, err, len)
        })?;
        Ok(out)
    }

    /// Counts this rank done with `key`'s values; the last rank deletes them, so the store
    /// holds at most one collective's tensors.
    fn release(&self, key: &str) -> Result<(), DistError> {
        if self.add(&format!("{key}/done"), 1)? < self.world_size as i64 {
            return Ok(());
        }
        for r in 0..self.world_size {
            let k = CString::new(format!("{key}/{r}")).expect("keys have no NUL");
            // A broadcast wrote one key only: deleting the others is a no-op.
            call("store delete", |err, len| unsafe {
                ffi::unimod_store_delete(self.store, k.as_ptr(), err, len)
            })?;
        }
        Ok(())
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        // Rank 0 serves the store: it stays until every rank has said it is done with it, or a
        // rank still reading a sum or polling a barrier would find the server gone.
        if self.world_size > 1 && self.add("unimod/exit", 1).is_ok() && self.rank == 0 {
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            while std::time::Instant::now() < deadline {
                match self.add("unimod/exit", 0) {
                    Ok(n) if n < self.world_size as i64 => {
                        std::thread::sleep(Duration::from_millis(2))
                    }
                    _ => break,
                }
            }
        }
        unsafe {
            if !self.nccl.is_null() {
                ffi::unimod_nccl_free(self.nccl);
            }
            ffi::unimod_store_free(self.store);
        }
    }
}

/// Consecutive runs of `grads` whose bytes stay within `bucket_bytes` (a gradient larger than
/// that is a bucket of its own).
fn buckets(grads: &[Tensor], bucket_bytes: usize) -> Vec<Vec<&Tensor>> {
    let mut out: Vec<Vec<&Tensor>> = Vec::new();
    let mut bytes = 0;
    for g in grads {
        let b = g.numel() * g.kind().elt_size_in_bytes();
        match out.last_mut() {
            Some(last) if bytes + b <= bucket_bytes => {
                last.push(g);
                bytes += b;
            }
            _ => {
                out.push(vec![g]);
                bytes = b;
            }
        }
    }
    out
}

fn to_bytes(t: &Tensor) -> Result<Vec<u8>, DistError> {
    if t.device() != Device::Cpu || !matches!(t.kind(), Kind::Float | Kind::Double) {
        return Err(DistError::Tensor(format!(
            "the store backend sums f32 or f64 CPU tensors, not {:?} on {:?} (CUDA tensors go through NCCL)",
            t.kind(),
            t.device()
        )));
    }
    let flat = t.contiguous().view([-1]);
    let mut bytes = vec![0u8; flat.numel() * t.kind().elt_size_in_bytes()];
    flat.copy_data_u8(&mut bytes, flat.numel());
    Ok(bytes)
}

fn from_bytes(bytes: &[u8], like: &Tensor) -> Result<Tensor, DistError> {
    let want = like.numel() * like.kind().elt_size_in_bytes();
    if bytes.len() != want {
        return Err(DistError::Tensor(format!(
            "a rank sent {} bytes for a tensor of {want}: the ranks disagree on the model or the step",
            bytes.len()
        )));
    }
    Ok(Tensor::from_data_size(bytes, &like.size(), like.kind()))
}

/// Runs a shim call with an error buffer, turning its failure into [`DistError::Torch`].
fn call(op: &'static str, f: impl FnOnce(*mut c_char, usize) -> i32) -> Result<(), DistError> {
    let mut err = vec![0u8; 2048];
    if f(err.as_mut_ptr() as *mut c_char, err.len()) == 0 {
        return Ok(());
    }
    let end = err.iter().position(|&b| b == 0).unwrap_or(err.len());
    Err(DistError::Torch {
        op,
        message: String::from_utf8_lossy(&err[..end]).into_owned(),
    })
}

mod ffi {
    use std::ffi::{c_char, c_void};
    unsafe extern "C" {
        pub fn unimod_store_new(
            host: *const c_char,
            port: u16,
            is_server: bool,
            world: i32,
            timeout_ms: i64,
            out: *mut *mut c_void,
            err: *mut c_char,
            err_len: usize,
        ) -> i32;
        pub fn unimod_store_free(store: *mut c_void);
        pub fn unimod_store_set(
            store: *mut c_void,
            key: *const c_char,
            data: *const u8,
            len: usize,
            err: *mut c_char,
            err_len: usize,
        ) -> i32;
        pub fn unimod_store_get(
            store: *mut c_void,
            key: *const c_char,
            data: *mut *mut u8,
            len: *mut usize,
            err: *mut c_char,
            err_len: usize,
        ) -> i32;
        pub fn unimod_bytes_free(data: *mut u8);
        pub fn unimod_store_add(
            store: *mut c_void,
            key: *const c_char,
            delta: i64,
            out: *mut i64,
            err: *mut c_char,
            err_len: usize,
        ) -> i32;
        pub fn unimod_store_delete(
            store: *mut c_void,
            key: *const c_char,
            err: *mut c_char,
            err_len: usize,
        ) -> i32;
        pub fn unimod_nccl_loaded() -> bool;
        pub fn unimod_nccl_unique_id(out: *mut u8, err: *mut c_char, err_len: usize) -> i32;
        pub fn unimod_nccl_init(
            device: i32,
            world: i32,
            id: *const u8,
            rank: i32,
            out: *mut *mut c_void,
            err: *mut c_char,
            err_len: usize,
        ) -> i32;
        pub fn unimod_nccl_free(group: *mut c_void);
        pub fn unimod_nccl_all_reduce(
            group: *mut c_void,
            tensor: *mut c_void,
            err: *mut c_char,
            err_len: usize,
        ) -> i32;
        pub fn unimod_nccl_broadcast(
            group: *mut c_void,
            tensor: *mut c_void,
            root: i32,
            err: *mut c_char,
            err_len: usize,
        ) -> i32;
        pub fn unimod_set_tf32(on: bool);
        pub fn unimod_tf32() -> bool;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn torchrun_variables_parse_and_bad_ones_are_named() {
        let vars = |pairs: &[(&str, &str)]| {
            let m: std::collections::HashMap<String, String> = pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            move |k: &str| m.get(k).cloned()
        };
        assert_eq!(Env::from_vars(vars(&[])).unwrap(), None);
        let e = Env::from_vars(vars(&[
            ("WORLD_SIZE", "4"),
            ("RANK", "3"),
            ("MASTER_PORT", "1234"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(
            (e.rank, e.world_size, e.local_rank, e.master_port),
            (3, 4, 3, 1234)
        );
        assert_eq!(e.master_addr, "127.0.0.1");
        let round: std::collections::HashMap<_, _> = e.vars().into_iter().collect();
        let again = Env::from_vars(|k| round.get(k).cloned()).unwrap().unwrap();
        assert_eq!(again, e);
        for (pairs, name) in [
            (&[("WORLD_SIZE", "2")][..], "RANK"),
            (&[("WORLD_SIZE", "2"), ("RANK", "2")][..], "RANK"),
            (&[("WORLD_SIZE", "0"), ("RANK", "0")][..], "WORLD_SIZE"),
            (&[("WORLD_SIZE", "x")][..], "WORLD_SIZE"),
            (
                &[("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_PORT", "70000")][..],
                "MASTER_PORT",
            ),
        ] {
            let err = Env::from_vars(vars(pairs)).unwrap_err().to_string();
            assert!(err.contains(name), "{err}");
        }
    }

    #[test]
    fn buckets_keep_order_and_size() {
        let t = |n: i64| Tensor::zeros([n], (Kind::Float, Device::Cpu));
        let grads = [t(10), t(10), t(30), t(5)];
        let sizes: Vec<Vec<i64>> = buckets(&grads, 80)
            .iter()
            .map(|b| b.iter().map(|g| g.numel() as i64).collect())
            .collect();
        // 40 + 40 bytes fit 80; 120 is a bucket of its own; 20 starts the next.
        assert_eq!(sizes, vec![vec![10, 10], vec![30], vec![5]]);
    }

    #[test]
    fn tf32_switch_round_trips() {
        let before = tf32();
        set_tf32(!before);
        assert_eq!(tf32(), !before);
        set_tf32(before);
        assert_eq!(tf32(), before);
    }

    #[test]
    fn two_ranks_in_threads_sum_broadcast_and_reduce_gradients() {
        let port = free_port();
        let run = move |rank: usize| {
            let env = Env {
                rank,
                world_size: 2,
                local_rank: rank,
                master_addr: "127.0.0.1".into(),
                master_port: port,
            };
            let g = Group::join(&env, Backend::Store, Duration::from_secs(30)).unwrap();
            let t = Tensor::from_slice(&[1.0f32, 2.0, 3.0]) * (rank as f64 + 1.0);
            g.all_reduce_sum(&t).unwrap();
            let summed = Vec::<f32>::try_from(&t).unwrap();
            let b = Tensor::from_slice(&[rank as f32; 2]);
            g.broadcast(&b, 1).unwrap();
            let p = Tensor::from_slice(&[0.0f32, 0.0, 0.0, 0.0]).set_requires_grad(true);
            let q = Tensor::from_slice(&[0.0f32; 3]).set_requires_grad(true);
            ((&p * (rank as f64 + 1.0)).sum(Kind::Float) + (&q * 10.0).sum(Kind::Float)).backward();
            g.all_reduce_gradients(&[p.shallow_clone(), q.shallow_clone()], 8)
                .unwrap();
            g.barrier().unwrap();
            (
                summed,
                Vec::<f32>::try_from(&b).unwrap(),
                Vec::<f32>::try_from(p.grad()).unwrap(),
                Vec::<f32>::try_from(q.grad()).unwrap(),
            )
        };
        let other = std::thread::spawn(move || run(1));
        let mine = run(0);
        let theirs = other.join().unwrap();
        assert_eq!(mine, theirs);
        assert_eq!(mine.0, vec![3.0, 6.0, 9.0]);
        assert_eq!(mine.1, vec![1.0, 1.0]);
        assert_eq!(mine.2, vec![3.0; 4]);
        assert_eq!(mine.3, vec![20.0; 3]);
    }

    #[test]
    fn a_missing_peer_times_out_with_a_message() {
        let env = Env {
            rank: 0,
            world_size: 2,
            local_rank: 0,
            master_addr: "127.0.0.1".into(),
            master_port: free_port(),
        };
        let err = Group::join(&env, Backend::Store, Duration::from_millis(300))
            .err()
            .expect("no second rank: the rendezvous must time out");
        assert!(err.to_string().contains("TCPStore"), "{err}");
    }

    /// A world of one through NCCL: on a GPU a real communicator sums (one rank: the identity)
    /// and broadcasts; without one, joining fails with NCCL's or CUDA's message, not a crash.
    #[test]
    fn nccl_world_of_one() {
        let env = Env {
            rank: 0,
            world_size: 1,
            local_rank: 0,
            master_addr: "127.0.0.1".into(),
            master_port: free_port(),
        };
        let joined = Group::join(&env, Backend::Nccl, Duration::from_secs(30));
        if !tch::Cuda::is_available() {
            let err = joined.err().expect("no GPU: NCCL cannot start").to_string();
            assert!(
                err.contains("NCCL") || err.contains("nccl") || err.contains("cuda"),
                "{err}"
            );
            return;
        }
        assert!(nccl_loaded());
        let g = joined.unwrap();
        let t = Tensor::from_slice(&[1.5f32, -2.0]).to_device(Device::Cuda(0));
        g.all_reduce_sum(&t).unwrap();
        g.broadcast(&t, 0).unwrap();
        assert_eq!(
            Vec::<f32>::try_from(&t.to_device(Device::Cpu)).unwrap(),
            vec![1.5, -2.0]
        );
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }
}
