// Every crate that links tch includes this file as its build script (`include!`), because
// `cargo:rustc-link-arg` from torch-sys does not reach downstream binaries and test executables.
// It gives them an rpath to libtorch (no LD_LIBRARY_PATH needed) and force-links libtorch_cuda,
// which the linker would otherwise drop, leaving `tch::Cuda::is_available()` false on a GPU
// machine (docs/libtorch.md).
pub fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    let Ok(libtorch) = std::env::var("LIBTORCH") else {
        return; // torch-sys explains a missing libtorch itself.
    };
    let Ok(root) = std::fs::canonicalize(&libtorch) else {
        panic!("libtorch not found at {libtorch}: run `cargo xtask setup` (docs/libtorch.md)");
    };
    let lib = root.join("lib");
    println!("cargo:rerun-if-changed={}", lib.display());
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-L{}", lib.display());
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}
