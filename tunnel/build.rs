//! Builds the kernel fast path (`bpf/fastpath.bpf.c`) with clang for the
//! BPF target. Without clang the crate still builds: the fast path then
//! reports itself unavailable and the userspace data plane carries
//! everything (`tests/install-deps.sh` installs clang and libbpf-dev).

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
        .status();
    match built {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("{clang} failed to build {src} ({s})"),
        Err(e) => {
            println!(
                "cargo:warning=no kernel fast path: cannot run {clang} ({e}); install clang and libbpf-dev"
            );
            std::fs::write(&out, []).expect("write an empty object");
        }
    }
}
