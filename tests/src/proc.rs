//! Child processes that die with their guard.

use std::process::{Child, Command};

/// Kills (SIGKILL) and reaps the child when dropped.
pub struct ChildGuard(pub Option<Child>);

impl ChildGuard {
    pub fn spawn(cmd: &mut Command) -> std::io::Result<Self> {
        Ok(Self(Some(cmd.spawn()?)))
    }

    pub fn pid(&self) -> Option<u32> {
        self.0.as_ref().map(|c| c.id())
    }

    /// SIGKILL now (the `kill -9` of a test), and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}
