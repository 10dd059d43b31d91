//! A QMP client (QEMU Machine Protocol: JSON over a unix socket).
//!
//! One reader task routes each answer to the command that asked (by `id`)
//! and each asynchronous event to [`Qmp::events`] subscribers. Commands may
//! be issued concurrently. Errors say which command QEMU refused and why.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::sync::{broadcast, oneshot};

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("cannot connect to QMP socket {path}: {source} (is QEMU running with -qmp unix:{path},server?)")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("QEMU refused `{command}`: {desc} ({class})")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    #[error("QMP connection lost: {0}")]
    Closed(String),
    #[error("QMP protocol error: {0}")]
    Protocol(String),
    #[error("no answer to `{command}` within {timeout:?}")]
    Timeout { command: String, timeout: Duration },
}

/// `query-migrate`'s answer, the fields this crate reads (QEMU omits what
/// does not apply yet: no `status` before any migration, no `ram` before
/// it started).
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationInfo {
    #[serde(default)]
    pub status: Option<String>,
    #[serde(default)]
    pub ram: RamInfo,
    /// The pause, ms, once completed.
    #[serde(default)]
    pub downtime: Option<u64>,
    #[serde(default)]
    pub error_desc: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct RamInfo {
    #[serde(default)]
    pub transferred: u64,
    #[serde(default)]
    pub remaining: u64,
    /// Memory passes so far.
    #[serde(default)]
    pub dirty_sync_count: u64,
    #[serde(default)]
    pub dirty_pages_rate: u64,
}

/// `query-status`'s answer.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
pub struct RunStatus {
    /// `running`, `paused`, `inmigrate`, `postmigrate`, `finish-migrate`…
    pub status: String,
}

/// The event a subscriber sees when the QMP connection has closed (QEMU
/// exited); [`Qmp::wait_event`] turns it into [`QmpError::Closed`].
pub const CLOSED: &str = "QMP_CONNECTION_CLOSED";

/// An asynchronous QMP event.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub name: String,
    pub data: Value,
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<Value, (String, String)>>>>>;

pub struct Qmp {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    pending: Pending,
    closed: Arc<std::sync::atomic::AtomicBool>,
    next_id: AtomicU64,
    events: broadcast::Sender<Event>,
    /// QEMU's version, from the greeting.
    pub version: String,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Qmp {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Qmp {
    /// Connects, reads the greeting and leaves capabilities-negotiation mode.
    pub async fn connect(path: &Path) -> Result<Self, QmpError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| QmpError::Connect {
                path: path.display().to_string(),
                source,
            })?;
        let (read, write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        let greeting = lines
            .next_line()
            .await
            .map_err(|e| QmpError::Closed(e.to_string()))?
            .ok_or_else(|| QmpError::Closed("no greeting".into()))?;
        let greeting: Value = serde_json::from_str(&greeting)
            .map_err(|e| QmpError::Protocol(format!("bad greeting: {e}")))?;
        let v = &greeting["QMP"]["version"]["qemu"];
        let version = format!("{}.{}.{}", v["major"], v["minor"], v["micro"]);
        let pending: Pending = Arc::new(Mutex::new(HashMap::new()));
        let (events, _) = broadcast::channel(1024);
        let closed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (p, ev, c) = (pending.clone(), events.clone(), closed.clone());
        let reader = tokio::spawn(async move {
            loop {
                let line = match lines.next_line().await {
                    Ok(Some(l)) => l,
                    _ => break,
                };
                let Ok(msg) = serde_json::from_str::<Value>(&line) else {
                    tracing::warn!(%line, "unparsable QMP message");
                    continue;
                };
                if let Some(name) = msg["event"].as_str() {
                    let _ = ev.send(Event {
                        name: name.to_string(),
                        data: msg["data"].clone(),
                    });
                    continue;
                }
                let Some(id) = msg["id"].as_u64() else {
                    continue;
                };
                let waiter = p.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
                if let Some(tx) = waiter {
                    let result = match msg.get("return") {
                        Some(r) => Ok(r.clone()),
                        None => Err((
                            msg["error"]["class"]
                                .as_str()
                                .unwrap_or("GenericError")
                                .to_string(),
                            msg["error"]["desc"]
                                .as_str()
                                .unwrap_or("(no description)")
                                .to_string(),
                        )),
                    };
                    let _ = tx.send(result);
                }
            }
            // the socket closed: everyone waiting, and every later command, learns it
            let mut waiting = p.lock().unwrap_or_else(|e| e.into_inner());
            c.store(true, Ordering::SeqCst);
            waiting.clear();
            // and so do those waiting for events
            let _ = ev.send(Event {
                name: CLOSED.to_string(),
                data: Value::Null,
            });
        });
        let qmp = Self {
            writer: tokio::sync::Mutex::new(write),
            pending,
            closed,
            next_id: AtomicU64::new(1),
            events,
            version,
            reader,
        };
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    /// Subscribes to events from now on.
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Runs `command` with `arguments`; its `return` value.
    pub async fn execute(
        &self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut waiting = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            if self.closed.load(Ordering::SeqCst) {
                return Err(QmpError::Closed(format!(
                    "QEMU is gone; `{command}` not sent"
                )));
            }
            waiting.insert(id, tx);
        }
        let mut msg = json!({"execute": command, "id": id});
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let mut line = msg.to_string();
        line.push('\n');
        {
            let mut w = self.writer.lock().await;
            if let Err(e) = w.write_all(line.as_bytes()).await {
                self.pending
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&id);
                return Err(QmpError::Closed(e.to_string()));
            }
        }
        match rx.await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err((class, desc))) => Err(QmpError::Command {
                command: command.to_string(),
                class,
                desc,
            }),
            Err(_) => Err(QmpError::Closed(format!(
                "QEMU went away during `{command}`"
            ))),
        }
    }

    /// As [`Qmp::execute`], bounded in time.
    pub async fn execute_timeout(
        &self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        tokio::time::timeout(timeout, self.execute(command, arguments))
            .await
            .map_err(|_| QmpError::Timeout {
                command: command.to_string(),
                timeout,
            })?
    }

    /// A query without arguments, its answer read as `T`; bounded in time.
    pub async fn query<T: serde::de::DeserializeOwned>(
        &self,
        command: &str,
        timeout: Duration,
    ) -> Result<T, QmpError> {
        let v = self.execute_timeout(command, None, timeout).await?;
        serde_json::from_value(v).map_err(|e| {
            QmpError::Protocol(format!(
                "`{command}` answered in a form this client does not know: {e}"
            ))
        })
    }

    /// Waits for the next event called `name`.
    pub async fn wait_event(
        rx: &mut broadcast::Receiver<Event>,
        name: &str,
        timeout: Duration,
    ) -> Result<Event, QmpError> {
        let wait = async {
            loop {
                match rx.recv().await {
                    Ok(e) if e.name == name => return Ok(e),
                    Ok(e) if e.name == CLOSED => {
                        return Err(QmpError::Closed(format!(
                            "QEMU went away while we waited for {name}"
                        )))
                    }
                    Ok(_) => continue,
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => {
                        return Err(QmpError::Closed(format!("while waiting for {name}")))
                    }
                }
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .map_err(|_| QmpError::Timeout {
                command: format!("event {name}"),
                timeout,
            })?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_answers_read_as_types() {
        // QEMU 7.2's answer mid-migration (abridged), and before any
        let v = json!({"status": "active", "ram": {"transferred": 123, "remaining": 456,
            "total": 268443648, "dirty-sync-count": 3, "dirty-pages-rate": 789,
            "mbps": 100.5}, "total-time": 1200, "setup-time": 2});
        let m: MigrationInfo = serde_json::from_value(v).expect("query-migrate");
        assert_eq!(m.status.as_deref(), Some("active"));
        assert_eq!(
            (
                m.ram.transferred,
                m.ram.remaining,
                m.ram.dirty_sync_count,
                m.ram.dirty_pages_rate
            ),
            (123, 456, 3, 789)
        );
        let none: MigrationInfo = serde_json::from_value(json!({})).expect("empty");
        assert_eq!(none, MigrationInfo::default());
        let failed: MigrationInfo =
            serde_json::from_value(json!({"status": "failed", "error-desc": "Unable to write"}))
                .expect("failed");
        assert_eq!(failed.error_desc.as_deref(), Some("Unable to write"));
        let r: RunStatus = serde_json::from_value(
            json!({"status": "running", "singlestep": false, "running": true}),
        )
        .expect("query-status");
        assert_eq!(r.status, "running");
        assert!(serde_json::from_value::<RunStatus>(json!({"running": true})).is_err());
    }

    /// A QMP server that greets, accepts the capabilities, and on the next
    /// command sends one event and exits without answering.
    async fn short_lived_qemu(path: std::path::PathBuf) {
        let l = tokio::net::UnixListener::bind(&path).expect("bind");
        let (s, _) = l.accept().await.expect("accept");
        let (r, mut w) = s.into_split();
        let mut lines = BufReader::new(r).lines();
        w.write_all(b"{\"QMP\": {\"version\": {\"qemu\": {\"major\": 7, \"minor\": 2, \"micro\": 0}}, \"capabilities\": []}}\n")
            .await
            .expect("greeting");
        let l = lines.next_line().await.expect("read").expect("a command");
        let id: Value = serde_json::from_str(&l).expect("json");
        w.write_all(format!("{{\"return\": {{}}, \"id\": {}}}\n", id["id"]).as_bytes())
            .await
            .expect("answer");
        lines.next_line().await.expect("read").expect("a command");
        w.write_all(b"{\"event\": \"STOP\", \"data\": {}}\n")
            .await
            .expect("event");
    }

    #[tokio::test]
    async fn waiting_for_an_event_ends_when_qemu_exits() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("q.qmp");
        let server = tokio::spawn(short_lived_qemu(path.clone()));
        while !path.exists() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let q = Arc::new(Qmp::connect(&path).await.expect("connect"));
        let mut rx = q.events();
        let q2 = q.clone();
        let unanswered = tokio::spawn(async move { q2.execute("query-status", None).await });
        server.await.expect("server");
        let e = Qmp::wait_event(&mut rx, "STOP", Duration::from_secs(5))
            .await
            .expect("the event before the exit");
        assert_eq!(e.name, "STOP");
        let r = Qmp::wait_event(&mut rx, "MIGRATION", Duration::from_secs(60)).await;
        assert!(matches!(r, Err(QmpError::Closed(_))), "{r:?}");
        assert!(unanswered.await.expect("join").is_err());
        assert!(q.execute("query-status", None).await.is_err());
    }
}
