// libtorch's rpath and CUDA link (as every tch crate), then the shim (fused AdamW, CUDA graphs)
// compiled against the same libtorch with the flags torch-sys compiles its own wrapper with. Its
// CUDA-graph half needs the CUDA runtime headers with nvcc's crt/ and CCCL's nv/ beside them:
// those of $CUDA_HOME, else the ones `cargo xtask setup` puts next to the torch wheel's
// (nvidia/cu13/include). Without them it compiles to entry points that say so.
mod link {
    include!("../link-libtorch.rs");
}

use std::path::{Path, PathBuf};

/// The first CUDA include folder that holds everything CUDAGraph.h pulls in.
fn cuda_include(libtorch: &Path) -> Option<PathBuf> {
    let toolkit = std::env::var_os("CUDA_HOME").map(|h| PathBuf::from(h).join("include"));
    // The wheel's libtorch is site-packages/torch; its CUDA headers are site-packages/nvidia/cu13.
    let wheel = libtorch
        .parent()
        .map(|site| site.join("nvidia/cu13/include"));
    [toolkit, wheel].into_iter().flatten().find(|dir| {
        ["cuda_runtime_api.h", "crt/host_config.h"]
            .iter()
            .all(|h| dir.join(h).exists())
            && (dir.join("nv/target").exists() || dir.join("cccl/nv/target").exists())
    })
}

fn main() {
    link::main();
    println!("cargo:rerun-if-changed=csrc/graph.cpp");
    println!("cargo:rerun-if-changed=csrc/adamw.cpp");
    println!("cargo:rerun-if-changed=csrc/ops.cpp");
    println!("cargo:rerun-if-changed=csrc/guarded.h");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    let Ok(libtorch) = std::env::var("LIBTORCH").map(PathBuf::from) else {
        return;
    };
    let libtorch = std::fs::canonicalize(&libtorch).unwrap_or(libtorch);
    let include = libtorch.join("include");
    // A CUDA build of libtorch is expected to give CUDA graphs (the tests check it).
    if libtorch.join("lib/libtorch_cuda.so").exists() {
        println!("cargo:rustc-env=UNIMOD_KERNELS_CUDA_LIBTORCH=1");
    }
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .file("csrc/graph.cpp")
        .file("csrc/adamw.cpp")
        .file("csrc/ops.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .warnings(false);
    match cuda_include(&libtorch) {
        Some(cuda) if include.join("ATen/cuda/CUDAGraph.h").exists() => {
            println!("cargo:rerun-if-changed={}", cuda.display());
            build.include(&cuda).define("UNIMOD_CUDA_GRAPHS", None);
            if cuda.join("cccl").exists() {
                build.include(cuda.join("cccl"));
            }
            build.compile("unimod_kernels");
            // After the shim on the link line: the libraries that define what it calls.
            println!(
                "cargo:rustc-link-search=native={}",
                libtorch.join("lib").display()
            );
            println!("cargo:rustc-link-lib=dylib=torch_cuda");
            println!("cargo:rustc-link-lib=dylib=c10_cuda");
            return;
        }
        _ => println!(
            "cargo:warning=unimod-kernels: no CUDA headers with crt/ and nv/ found; CUDA graphs are \
             off in this build (run `cargo xtask setup`)"
        ),
    }
    build.compile("unimod_kernels");
}
