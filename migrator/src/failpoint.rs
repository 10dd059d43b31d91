//! Named points where a test makes a process fail, to show that a crash or a
//! broken link at that exact moment resolves to one running copy.
//!
//! A point does nothing unless armed: by `MIGRATOR_FAILPOINTS=name:kill,…` in
//! the environment (the process kills itself with SIGKILL, as `kill -9`
//! would), or in-process by [`set`] with a callback (a test cutting a proxy).
//! Points are named `side.moment`; the ones in use:
//!
//! | point | moment |
//! |---|---|
//! | `source.blocks` | the source reads blocks to send (bulk, rounds, final) |
//! | `dest.data` | the destination received a block |
//! | `source.before_commit` | the source recorded that it is in doubt, `Commit` not sent |
//! | `source.final_blocks` | the destination committed; the final blocks are about to go |
//! | `dest.after_commit_record` | the destination recorded the commit, `CommitAck` not sent |

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// What an armed point does.
#[derive(Clone)]
pub enum Action {
    /// SIGKILL this process.
    Kill,
    /// Run a callback (once per hit).
    Call(Arc<dyn Fn() + Send + Sync>),
}

fn points() -> &'static Mutex<HashMap<String, Action>> {
    static P: OnceLock<Mutex<HashMap<String, Action>>> = OnceLock::new();
    P.get_or_init(|| {
        let mut m = HashMap::new();
        if let Ok(v) = std::env::var("MIGRATOR_FAILPOINTS") {
            for item in v.split(',').filter(|s| !s.is_empty()) {
                match item.split_once(':') {
                    Some((name, "kill")) => {
                        m.insert(name.to_string(), Action::Kill);
                    }
                    _ => tracing::warn!("MIGRATOR_FAILPOINTS: ignoring {item:?} (want NAME:kill)"),
                }
            }
        }
        Mutex::new(m)
    })
}

/// Arms `name` in this process.
pub fn set(name: &str, action: Action) {
    points()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(name.to_string(), action);
}

/// Disarms `name`.
pub fn clear(name: &str) {
    points()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(name);
}

/// The point `name` is reached.
pub fn hit(name: &str) {
    let action = points()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(name)
        .cloned();
    match action {
        None => {}
        Some(Action::Kill) => {
            tracing::warn!(point = name, "failpoint: killing this process");
            // SAFETY: signalling our own pid.
            unsafe {
                libc::kill(libc::getpid(), libc::SIGKILL);
            }
        }
        Some(Action::Call(f)) => {
            tracing::warn!(point = name, "failpoint");
            f()
        }
    }
}
