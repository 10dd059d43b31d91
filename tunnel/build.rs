//! Builds the kernel fast path (`bpf/fastpath.bpf.c`) with clang for the
//! BPF target. Without clang (or libbpf-dev's headers) the crate still
//! builds, with a warning: the fast path then reports itself unavailable
//! and the userspace data plane carries everything; its tests fail, so
//! CI (`tests/install-deps.sh` installs both) cannot miss it.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let src = "bpf/fastpath.bpf.c";
    println!("cargo:rerun-if-changed={src}");
    println!("cargo:rerun-if-env-changed=CLANG");
    let out =
        PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("fastpath.bpf.o");
    let clang = std::env::var("CLANG").unwrap_or_else(|_| "clang".into());
    let arch_include = format!(
        "-I/usr/include/{}-linux-gnu",
        std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default()
    );
    let built = Command::new(&clang)
        .args(["-O2", "-g", "-target", "bpf", "-Wall", "-Werror"])
        .arg(&arch_include)
        .args(["-c", src, "-o"])
        .arg(&out)
        .output();
    let why = match built {
        Ok(o) if o.status.success() => return,
        Ok(o) => format!(
            "{clang} failed ({}): {}",
            o.status,
            String::from_utf8_lossy(&o.stderr).replace('\n', " ")
        ),
        Err(e) => format!("cannot run {clang} ({e})"),
    };
    println!(
        "cargo:warning=no kernel fast path: {why}; install clang and libbpf-dev, then rebuild"
    );
    std::fs::write(&out, []).expect("write an empty object");
}
