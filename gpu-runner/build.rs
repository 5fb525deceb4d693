//! Compiles the accelerator shim (csrc/accel_shim.cpp) against the same libtorch that
//! torch-sys links, and bakes libtorch's lib directory into the rpath of this crate's
//! binaries and tests so they run without LD_LIBRARY_PATH.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-changed=csrc/accel_shim.cpp");
    let libtorch = match std::env::var_os("LIBTORCH") {
        Some(dir) => PathBuf::from(dir),
        None => panic!(
            "LIBTORCH is not set. Run `eval \"$(gpu-runner/scripts/setup-torch.sh)\"` \
             (installs torch 2.11 into ~/.cache/framelane and prints LIBTORCH)"
        ),
    };
    let include = libtorch.join("include");
    let lib = libtorch.join("lib");
    assert!(
        include.join("ATen/DeviceAccelerator.h").exists(),
        "{} has no ATen/DeviceAccelerator.h: LIBTORCH must point at torch 2.11 \
         (the `torch` folder of the PyPI wheel)",
        include.display()
    );

    cc::Build::new()
        .cpp(true)
        .file("csrc/accel_shim.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .flag_if_supported("-Wno-unused-parameter")
        .warnings(false)
        .compile("framelane_accel_shim");

    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
}
