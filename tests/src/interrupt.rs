//! Ctrl-C for the demo and the benchmarks: the signal only sets a flag, and
//! the bed's waits turn it into an error, so every guard still runs
//! (namespaces removed, processes killed) on the way out.

use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{bail, Result};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Catches SIGINT and SIGTERM from now on.
pub fn install() {
    let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: the handler only stores to an atomic (async-signal-safe).
    unsafe {
        libc::signal(libc::SIGINT, handler);
        libc::signal(libc::SIGTERM, handler);
    }
}

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// An error once interrupted.
pub fn check() -> Result<()> {
    if interrupted() {
        bail!("interrupted: cleaning up (namespaces, QEMU, gateways)");
    }
    Ok(())
}
