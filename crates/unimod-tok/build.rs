include!("../link-libtorch.rs");
