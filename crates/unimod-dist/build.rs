// libtorch's rpath and CUDA link (as every tch crate), then the c10d shim compiled against the
// same libtorch, with the flags torch-sys compiles its own wrapper with.
mod link {
    include!("../link-libtorch.rs");
}

use std::path::PathBuf;

fn main() {
    link::main();
    println!("cargo:rerun-if-changed=csrc/c10d.cpp");
    // The error convention every shim shares lives beside unimod-kernels' shims.
    let shared = std::path::Path::new("../unimod-kernels/csrc");
    println!(
        "cargo:rerun-if-changed={}",
        shared.join("guarded.h").display()
    );
    let Ok(libtorch) = std::env::var("LIBTORCH").map(PathBuf::from) else {
        return;
    };
    let include = std::fs::canonicalize(&libtorch)
        .unwrap_or(libtorch)
        .join("include");
    cc::Build::new()
        .cpp(true)
        .file("csrc/c10d.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .include(shared)
        .flag("-std=c++17")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .warnings(false)
        .compile("unimod_c10d");
}
