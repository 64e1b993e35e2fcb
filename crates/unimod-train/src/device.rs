//! Device selection: `auto | cpu | cuda[:N]`. Asking for CUDA where there is none is an error,
//! never a silent fallback to the CPU.

use anyhow::{Result, bail};
use tch::{Cuda, Device};

/// `auto` (CUDA when available), `cpu`, `cuda` or `cuda:N`; a CUDA device that is absent is
/// refused, not replaced by the CPU.
pub fn parse(spec: &str) -> Result<Device> {
    let spec = spec.trim();
    match spec {
        "auto" => Ok(if Cuda::is_available() {
            Device::Cuda(0)
        } else {
            Device::Cpu
        }),
        "cpu" => Ok(Device::Cpu),
        _ => {
            let Some(rest) = spec.strip_prefix("cuda") else {
                bail!("device `{spec}`: expected auto, cpu, cuda or cuda:N");
            };
            let index = match rest.strip_prefix(':') {
                None if rest.is_empty() => 0,
                Some(n) => n
                    .parse::<usize>()
                    .map_err(|_| anyhow::anyhow!("device `{spec}`: `{n}` is not a GPU index"))?,
                None => bail!("device `{spec}`: expected auto, cpu, cuda or cuda:N"),
            };
            if !Cuda::is_available() {
                bail!(
                    "device `{spec}` requested, but CUDA is not available (no GPU, or libtorch_cuda not linked: see docs/libtorch.md)"
                );
            }
            let n = Cuda::device_count() as usize;
            if index >= n {
                bail!("device `{spec}` requested, but only {n} CUDA device(s) exist");
            }
            Ok(Device::Cuda(index))
        }
    }
}

/// Refuses work that needs more memory than the device has, before it is allocated (an
/// allocation failure inside libtorch aborts instead of returning an error). CPU: compared with
/// `MemAvailable` of /proc/meminfo; CUDA: with the GPU's total memory as PyTorch reports it
/// is not reachable through tch, so only the CPU is checked there.
pub fn check_memory(bytes: f64, device: Device, what: &str) -> Result<()> {
    if device != Device::Cpu {
        return Ok(());
    }
    let Some(available) = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map(|kb| kb * 1024.0)
    else {
        return Ok(());
    };
    if !bytes.is_finite() || bytes > available {
        bail!(
            "{what} needs about {:.1} GiB of memory, but {:.1} GiB are available: lower the \
             sizes (model dimensions, batch mix, samples)",
            bytes / f64::from(1u32 << 30),
            available / f64::from(1u32 << 30)
        );
    }
    Ok(())
}

/// The machine a run computes on, as far as it decides the run's rounding: training is
/// deterministic on one machine, but libtorch's CPU kernels (MKL, oneDNN) choose their code by
/// the instruction sets the CPU has and split reductions by thread count, so the same config
/// and seed give other numbers elsewhere (docs/conventions.md, "Determinism"). On CUDA the GPU
/// is named by index only: tch does not expose its model.
pub fn machine(device: Device) -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    cpu_description(&cpuinfo, tch::get_num_threads(), device)
}

/// [`machine`] from the text of /proc/cpuinfo (empty where there is none).
fn cpu_description(cpuinfo: &str, threads: i32, device: Device) -> String {
    let field = |name: &str| {
        cpuinfo
            .lines()
            .find(|l| l.split(':').next().map(str::trim) == Some(name))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim())
    };
    let model = field("model name").unwrap_or("an unknown CPU");
    let flags: Vec<&str> = field("flags").unwrap_or("").split_whitespace().collect();
    let isa = if flags.contains(&"avx512f") {
        "AVX-512"
    } else if flags.contains(&"avx2") {
        "AVX2"
    } else if flags.is_empty() {
        "instruction sets unknown"
    } else {
        "no AVX2"
    };
    let cpu = format!("{model}, {isa}, {threads} threads");
    match device {
        Device::Cpu => cpu,
        Device::Cuda(i) => format!("cuda:{i} (host {cpu})"),
        other => format!("{other:?} (host {cpu})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_refuses_clearly() {
        assert_eq!(parse("cpu").unwrap(), Device::Cpu);
        assert!(
            parse("gpu")
                .unwrap_err()
                .to_string()
                .contains("expected auto")
        );
        assert!(
            parse("cuda:x")
                .unwrap_err()
                .to_string()
                .contains("not a GPU index")
        );
        if !Cuda::is_available() {
            assert!(
                parse("cuda")
                    .unwrap_err()
                    .to_string()
                    .contains("CUDA is not available")
            );
            assert_eq!(parse("auto").unwrap(), Device::Cpu);
        }
    }

    #[test]
    fn machines_are_told_apart_by_what_steers_their_kernels() {
        let info = |flags: &str| {
            format!(
                "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Processor\nflags\t\t: {flags}\n"
            )
        };
        let avx512 = cpu_description(&info("fpu sse avx2 avx512f avx512bw"), 2, Device::Cpu);
        assert_eq!(avx512, "Intel(R) Xeon(R) Processor, AVX-512, 2 threads");
        let avx2 = cpu_description(&info("fpu sse avx2"), 2, Device::Cpu);
        assert_eq!(avx2, "Intel(R) Xeon(R) Processor, AVX2, 2 threads");
        assert_ne!(cpu_description(&info("fpu sse avx2"), 4, Device::Cpu), avx2);
        assert_eq!(
            cpu_description("", 1, Device::Cuda(1)),
            "cuda:1 (host an unknown CPU, instruction sets unknown, 1 threads)"
        );
        assert!(machine(Device::Cpu).contains("threads"));
    }
}
