//! QEMU's side of a VM migration, driven over QMP.
//!
//! [`SourceVm`] is the running VM: memory pre-copy with
//! `pause-before-switchover`, so that QEMU stops the guest and waits while the
//! disk's final set goes, then finishes on `migrate-continue`; or rolls back
//! (cancel, and the guest runs on). [`DestVm`] is the destination QEMU the
//! agent starts from the operator's launch file, paused (`-S`) and waiting
//! for the stream (`-incoming defer`), its disk the agent's NBD export.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::json;
use thiserror::Error;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{broadcast, mpsc};
use tracing::{info, warn};

use crate::qmp::{MigrationInfo, Qmp, QmpError, RunStatus};

#[derive(Debug, Error)]
pub enum VmError {
    #[error(transparent)]
    Qmp(#[from] QmpError),
    #[error("the VM is {0}, not running: migrate a running VM")]
    NotRunning(String),
    #[error("a migration of this VM is already {0} (see `query-migrate`)")]
    Busy(String),
    #[error("QEMU's migration {status}: {detail}")]
    Failed { status: String, detail: String },
    #[error("no launch file {0} for the destination QEMU: write its command line there, one argument per line, with {{disk}} where the disk's NBD socket goes")]
    NoLaunchFile(PathBuf),
    #[error("cannot start the destination QEMU ({program}): {detail}")]
    Launch { program: String, detail: String },
    #[error("{0}")]
    Io(String),
}

/// How QEMU migrates memory.
#[derive(Debug, Clone, PartialEq)]
pub struct VmOptions {
    /// QMP socket of the running source QEMU.
    pub qmp: PathBuf,
    /// QEMU's `downtime-limit`.
    pub downtime: Duration,
    /// QEMU's `max-bandwidth`, bytes per second (`None`: unlimited).
    pub max_bandwidth: Option<u64>,
    /// Throttle the guest's vCPUs when memory does not converge.
    pub auto_converge: bool,
    /// Switch to post-copy after this many memory passes without converging.
    pub postcopy_after_passes: Option<u64>,
}

const QMP_TIMEOUT: Duration = Duration::from_secs(30);

/// The running source VM.
pub struct SourceVm {
    qmp: std::sync::Arc<Qmp>,
    opts: VmOptions,
    sock: PathBuf,
}

impl SourceVm {
    /// Connects to the source QEMU and checks it can be migrated.
    pub async fn attach(opts: VmOptions) -> Result<Self, VmError> {
        let qmp = Qmp::connect(&opts.qmp).await?;
        Self::attach_to(std::sync::Arc::new(qmp), opts).await
    }

    /// The same over a QMP connection this process already holds (a node
    /// owns its VMs' QMP; QEMU takes one client at a time).
    pub async fn attach_to(qmp: std::sync::Arc<Qmp>, opts: VmOptions) -> Result<Self, VmError> {
        let run: RunStatus = qmp.query("query-status", QMP_TIMEOUT).await?;
        if run.status != "running" {
            return Err(VmError::NotRunning(run.status));
        }
        let mig: MigrationInfo = qmp.query("query-migrate", QMP_TIMEOUT).await?;
        if let Some(s) = mig.status {
            if !matches!(s.as_str(), "none" | "completed" | "failed" | "cancelled") {
                return Err(VmError::Busy(s));
            }
        }
        // unique per migration: one disk server may move several VMs at once
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let sock = std::env::temp_dir().join(format!(
            "migrator-{}-{}.mig",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        Ok(Self { qmp, opts, sock })
    }

    /// Sets capabilities and parameters, starts the migration to a unix
    /// socket of ours and returns QEMU's connection to it, and the migration
    /// statuses QEMU reports from now on.
    pub async fn start(&self) -> Result<(UnixStream, mpsc::UnboundedReceiver<String>), VmError> {
        let o = &self.opts;
        let postcopy = o.postcopy_after_passes.is_some();
        let caps = json!({"capabilities": [
            {"capability": "events", "state": true},
            {"capability": "pause-before-switchover", "state": true},
            {"capability": "auto-converge", "state": o.auto_converge},
            {"capability": "postcopy-ram", "state": postcopy},
            {"capability": "return-path", "state": postcopy},
        ]});
        self.qmp
            .execute_timeout("migrate-set-capabilities", Some(caps), QMP_TIMEOUT)
            .await?;
        let mut params = json!({"downtime-limit": o.downtime.as_millis() as u64});
        // 0 would mean QEMU's default (128 MiB/s); "unlimited" is a large number.
        params["max-bandwidth"] = json!(o.max_bandwidth.unwrap_or(1 << 40));
        self.qmp
            .execute_timeout("migrate-set-parameters", Some(params), QMP_TIMEOUT)
            .await?;
        let _ = std::fs::remove_file(&self.sock);
        let listener = UnixListener::bind(&self.sock)
            .map_err(|e| VmError::Io(format!("cannot bind {}: {e}", self.sock.display())))?;
        let mut events = self.qmp.events();
        let (tx, statuses) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                match events.recv().await {
                    Ok(e) if e.name == "MIGRATION" => {
                        let s = e.data["status"].as_str().unwrap_or("").to_string();
                        if tx.send(s).is_err() {
                            return;
                        }
                    }
                    // QEMU is gone: the channel closes, the reader says so
                    Ok(e) if e.name == crate::qmp::CLOSED => return,
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        self.qmp
            .execute_timeout(
                "migrate",
                Some(json!({"uri": format!("unix:{}", self.sock.display())})),
                QMP_TIMEOUT,
            )
            .await?;
        let accepted = tokio::time::timeout(Duration::from_secs(10), listener.accept()).await;
        let _ = std::fs::remove_file(&self.sock);
        match accepted {
            Ok(Ok((s, _))) => Ok((s, statuses)),
            Ok(Err(e)) => Err(VmError::Io(format!("QEMU's migration connection: {e}"))),
            Err(_) => Err(VmError::Io(
                "QEMU did not connect to the migration socket within 10 s".into(),
            )),
        }
    }

    /// What went wrong, after QEMU reported `status` (failed, cancelled).
    pub async fn failure(&self, status: String) -> VmError {
        let detail = match self.info().await {
            Ok(i) => i
                .error_desc
                .unwrap_or_else(|| "no reason given".to_string()),
            Err(e) => e.to_string(),
        };
        VmError::Failed { status, detail }
    }

    /// `query-migrate`.
    pub async fn info(&self) -> Result<MigrationInfo, VmError> {
        Ok(self.qmp.query("query-migrate", QMP_TIMEOUT).await?)
    }

    /// Memory passes QEMU has made (its dirty-sync count).
    pub async fn passes(&self) -> Result<u64, VmError> {
        Ok(self.info().await?.ram.dirty_sync_count)
    }

    pub fn postcopy_after_passes(&self) -> Option<u64> {
        self.opts.postcopy_after_passes
    }

    pub async fn start_postcopy(&self) -> Result<(), VmError> {
        self.qmp
            .execute_timeout("migrate-start-postcopy", None, QMP_TIMEOUT)
            .await?;
        Ok(())
    }

    /// From the pre-switchover pause: send the rest.
    pub async fn continue_switchover(&self) -> Result<(), VmError> {
        self.qmp
            .execute_timeout(
                "migrate-continue",
                Some(json!({"state": "pre-switchover"})),
                QMP_TIMEOUT,
            )
            .await?;
        Ok(())
    }

    /// Before the commit point: stop the migration and make sure the guest
    /// runs here. Safe to call in any state.
    pub async fn rollback(&self) -> Result<(), VmError> {
        let status = self.info().await?.status.unwrap_or_else(|| "none".into());
        if matches!(
            status.as_str(),
            "setup" | "active" | "pre-switchover" | "device" | "wait-unplug"
        ) {
            let _ = self
                .qmp
                .execute_timeout("migrate_cancel", None, QMP_TIMEOUT)
                .await;
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(30) {
                let s = self.info().await?.status.unwrap_or_else(|| "none".into());
                if matches!(s.as_str(), "cancelled" | "failed" | "completed" | "none") {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let run: RunStatus = self.qmp.query("query-status", QMP_TIMEOUT).await?;
        if run.status != "running" {
            info!(status = %run.status, "resuming the source VM");
            self.qmp.execute_timeout("cont", None, QMP_TIMEOUT).await?;
        }
        Ok(())
    }

    /// After the commit point: the source QEMU ends.
    pub async fn quit(&self) {
        if let Err(e) = self.qmp.execute_timeout("quit", None, QMP_TIMEOUT).await {
            warn!("source QEMU did not quit: {e}");
        }
    }
}

impl Drop for SourceVm {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.sock);
    }
}

/// The destination QEMU, started by the agent.
pub struct DestVm {
    child: tokio::process::Child,
    qmp: std::sync::Arc<Qmp>,
    incoming: PathBuf,
    log: PathBuf,
}

/// The launch file's arguments with `{disk}`, `{name}` and `{dir}` filled in:
/// one argument per line, `#` comments and blank lines ignored.
pub fn launch_args(text: &str, disk: &Path, name: &str, dir: &Path) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            l.replace("{disk}", &disk.display().to_string())
                .replace("{name}", name)
                .replace("{dir}", &dir.display().to_string())
        })
        .collect()
}

impl DestVm {
    /// Starts QEMU from `DIR/NAME.qemu` with `-S -incoming defer`, its QMP
    /// on `DIR/NAME.qmp`, its console and messages appended to `DIR/NAME.log`,
    /// and makes it listen for the stream on `DIR/NAME.mig`.
    pub async fn launch(
        dir: &Path,
        name: &str,
        disk: &Path,
        postcopy: bool,
    ) -> Result<Self, VmError> {
        Self::start(dir, name, disk, Some(postcopy)).await
    }

    /// Boots the VM from `DIR/NAME.qemu` on `disk` (a node starting a VM that
    /// runs on it): the same command line, QMP and log as [`DestVm::launch`],
    /// without waiting for a migration stream.
    pub async fn boot(dir: &Path, name: &str, disk: &Path) -> Result<Self, VmError> {
        Self::start(dir, name, disk, None).await
    }

    /// Whether `DIR/NAME.qemu` exists: the VM has a launch file here.
    pub fn has_launch_file(dir: &Path, name: &str) -> bool {
        dir.join(format!("{name}.qemu")).exists()
    }

    /// `incoming`: wait for a migration stream (with post-copy or not);
    /// `None`: boot.
    async fn start(
        dir: &Path,
        name: &str,
        disk: &Path,
        incoming: Option<bool>,
    ) -> Result<Self, VmError> {
        let file = dir.join(format!("{name}.qemu"));
        let text = match std::fs::read_to_string(&file) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(VmError::NoLaunchFile(file))
            }
            Err(e) => return Err(VmError::Io(format!("cannot read {}: {e}", file.display()))),
        };
        let args = launch_args(&text, disk, name, dir);
        let Some((program, rest)) = args.split_first() else {
            return Err(VmError::Launch {
                program: file.display().to_string(),
                detail: "the launch file is empty".into(),
            });
        };
        let qmp_path = dir.join(format!("{name}.qmp"));
        let log = dir.join(format!("{name}.log"));
        let _ = std::fs::remove_file(&qmp_path);
        let _ = std::fs::remove_file(dir.join(format!("{name}.mig")));
        let open_log = || {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)
                .map_err(|e| VmError::Io(format!("cannot open {}: {e}", log.display())))
        };
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(rest);
        if incoming.is_some() {
            cmd.args(["-S", "-incoming", "defer"]);
        }
        cmd.arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp_path.display()))
            .stdin(std::process::Stdio::null())
            .stdout(open_log()?)
            .stderr(open_log()?)
            .kill_on_drop(true);
        // SAFETY: prctl is async-signal-safe; the closure allocates nothing.
        unsafe {
            cmd.pre_exec(|| {
                // The VM dies with the agent that owns its disk.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|e| VmError::Launch {
            program: program.clone(),
            detail: e.to_string(),
        })?;
        let t = Instant::now();
        let qmp = loop {
            if let Ok(Some(st)) = child.try_wait() {
                return Err(VmError::Launch {
                    program: program.clone(),
                    detail: format!("it exited ({st}): {}", log_tail(&log)),
                });
            }
            match Qmp::connect(&qmp_path).await {
                Ok(q) => break q,
                Err(_) if t.elapsed() < Duration::from_secs(30) => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Err(e) => {
                    return Err(VmError::Launch {
                        program: program.clone(),
                        detail: format!("{e}; {}", log_tail(&log)),
                    })
                }
            }
        };
        let stream = dir.join(format!("{name}.mig"));
        match incoming {
            Some(postcopy) => {
                let caps = json!({"capabilities": [
                    {"capability": "events", "state": true},
                    {"capability": "postcopy-ram", "state": postcopy},
                ]});
                qmp.execute_timeout("migrate-set-capabilities", Some(caps), QMP_TIMEOUT)
                    .await?;
                qmp.execute_timeout(
                    "migrate-incoming",
                    Some(json!({"uri": format!("unix:{}", stream.display())})),
                    QMP_TIMEOUT,
                )
                .await?;
                info!(
                    vm = name,
                    pid = child.id(),
                    "destination QEMU waits for the migration stream"
                );
            }
            None => info!(vm = name, pid = child.id(), "VM booted"),
        }
        Ok(Self {
            child,
            qmp: std::sync::Arc::new(qmp),
            incoming: stream,
            log,
        })
    }

    /// Connects to QEMU's incoming migration socket.
    pub async fn connect_incoming(&self) -> Result<UnixStream, VmError> {
        UnixStream::connect(&self.incoming).await.map_err(|e| {
            VmError::Io(format!(
                "cannot connect to the destination QEMU's {}: {e}",
                self.incoming.display()
            ))
        })
    }

    /// Resolves once QEMU has loaded the whole state (pre-copy: `completed`;
    /// it stays paused); call it before the stream starts.
    pub fn loaded(
        &self,
    ) -> impl std::future::Future<Output = Result<(), VmError>> + Send + 'static {
        let mut events = self.qmp.events();
        let log = self.log.clone();
        async move {
            loop {
                let e = Qmp::wait_event(&mut events, "MIGRATION", Duration::from_secs(24 * 3600))
                    .await?;
                match e.data["status"].as_str() {
                    Some("completed") => return Ok(()),
                    Some(s @ ("failed" | "cancelled")) => {
                        return Err(VmError::Failed {
                            status: s.to_string(),
                            detail: log_tail(&log),
                        })
                    }
                    _ => {}
                }
            }
        }
    }

    /// After the commit point: run, and return once the guest does (during
    /// a post-copy load, that is when QEMU has the device state).
    pub fn resume(
        &self,
    ) -> impl std::future::Future<Output = Result<(), VmError>> + Send + 'static {
        let qmp = self.qmp.clone();
        async move {
            let mut events = qmp.events();
            qmp.execute_timeout("cont", None, QMP_TIMEOUT).await?;
            let status: RunStatus = qmp.query("query-status", QMP_TIMEOUT).await?;
            if status.status != "running" {
                Qmp::wait_event(&mut events, "RESUME", QMP_TIMEOUT).await?;
            }
            Ok(())
        }
    }

    /// Resolves when the guest stops for good (shut down, reset under
    /// `-no-reboot`, or QEMU gone): whether an operator should hear about
    /// it (anything but a clean guest or host shutdown), and what happened
    /// with the end of the console. Subscribe before resuming.
    pub fn stopped(&self) -> impl std::future::Future<Output = (bool, String)> + Send + 'static {
        let mut events = self.qmp.events();
        let log = self.log.clone();
        async move {
            let (alarm, why) = loop {
                match events.recv().await {
                    Ok(e) if e.name == "SHUTDOWN" => {
                        let reason = e.data["reason"].as_str().unwrap_or("no reason given");
                        let clean =
                            matches!(reason, "guest-shutdown" | "host-qmp-quit" | "host-signal");
                        break (!clean, format!("it shut down ({reason})"));
                    }
                    Ok(e) if e.name == crate::qmp::CLOSED => {
                        break (true, "its QEMU exited".to_string())
                    }
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => {
                        break (true, "its QEMU exited".to_string())
                    }
                }
            };
            (alarm, format!("{why}; {}", log_tail(&log)))
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Waits for QEMU to exit (it was told to quit), killing it after 10 s.
    pub async fn reap(mut self) {
        if tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .is_err()
        {
            warn!(
                pid = self.child.id(),
                "QEMU did not quit in 10 s: killing it"
            );
            let _ = self.child.kill().await;
        }
    }

    /// Its QMP connection (QEMU takes one client at a time on its socket).
    pub fn qmp(&self) -> std::sync::Arc<Qmp> {
        self.qmp.clone()
    }
}

/// The last lines of QEMU's log, for error messages.
fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(5).collect();
    if lines.is_empty() {
        format!("nothing in {}", log.display())
    } else {
        format!(
            "{} says: {}",
            log.display(),
            lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn launch_file_placeholders_and_comments() {
        let text = "# web1 at site B\nqemu-system-x86_64\n\n -drive\nfile=nbd+unix:///{name}?socket={disk},format=raw,if=virtio\n-D\n{dir}/q.log\n";
        let args = launch_args(text, Path::new("/d/web1.sock"), "web1", Path::new("/d"));
        assert_eq!(
            args,
            vec![
                "qemu-system-x86_64",
                "-drive",
                "file=nbd+unix:///web1?socket=/d/web1.sock,format=raw,if=virtio",
                "-D",
                "/d/q.log"
            ]
        );
    }
}
