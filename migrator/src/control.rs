//! The disk server's control socket: one JSON [`MigrateArgs`] line in,
//! event JSON lines out; [`request`] is its client.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tracing::warn;

use crate::args::MigrateArgs;
use crate::disk::Disk;
use crate::events::{Event, EventSink, Summary};
use crate::source::{self, MarkerFile};

/// Control socket: one JSON `MigrateArgs` line in, event JSON lines out. The
/// migration is cancelled (rolled back) if the client goes away before commit.
pub async fn serve(l: UnixListener, disk: Arc<Disk>, image: PathBuf) {
    loop {
        let Ok((s, _)) = l.accept().await else {
            continue;
        };
        let (disk, image) = (disk.clone(), image.clone());
        tokio::spawn(async move {
            let (rd, mut wr) = s.into_split();
            let mut lines = BufReader::new(rd).lines();
            let send = |e: &Event| {
                serde_json::to_string(e).map(|mut s| {
                    s.push('\n');
                    s
                })
            };
            let req = match lines.next_line().await {
                Ok(Some(l)) => {
                    serde_json::from_str::<MigrateArgs>(&l).map_err(|e| format!("bad request: {e}"))
                }
                _ => return,
            };
            let marker = MarkerFile::for_image(&image);
            let opts = req.and_then(|a| {
                a.options(Some(marker.clone()))
                    .map_err(|e| format!("{e:#}"))
            });
            let opts = match opts {
                Ok(o) => o,
                Err(message) => {
                    if let Ok(s) = send(&Event::Error { message }) {
                        let _ = wr.write_all(s.as_bytes()).await;
                    }
                    return;
                }
            };
            let (tx, mut rx) = mpsc::unbounded_channel();
            let mut job = tokio::spawn(source::migrate(disk.clone(), opts, EventSink::new(tx)));
            let mut client_gone = false;
            let result = loop {
                tokio::select! {
                    r = &mut job => break r.map_err(|e| source::MigrateError::Disk(format!("migration task failed: {e}"))).and_then(|r| r),
                    Some(e) = rx.recv(), if !client_gone => {
                        if let Ok(s) = send(&e) {
                            client_gone |= wr.write_all(s.as_bytes()).await.is_err();
                        }
                    }
                    l = lines.next_line(), if !client_gone => {
                        client_gone = !matches!(l, Ok(Some(_)));
                    }
                }
                if client_gone {
                    if !disk.is_read_only() && marker.gate.try_cancel() {
                        // Before the commit was asked for: cancel, the guard rolls back.
                        warn!("migration client went away; rolling back");
                        job.abort();
                        return;
                    }
                    // Asked for, or past, the commit: the destination may be the
                    // authority; the migration finishes (or settles) on its own.
                    warn!("migration client went away at or after the commit; finishing");
                }
            };
            if client_gone {
                if let Err(e) = result {
                    warn!("migration failed after the commit point: {e}");
                }
                return;
            }
            while let Ok(e) = rx.try_recv() {
                if let Ok(s) = send(&e) {
                    let _ = wr.write_all(s.as_bytes()).await;
                }
            }
            if let Err(e) = result {
                if let Ok(s) = send(&Event::Error {
                    message: e.to_string(),
                }) {
                    let _ = wr.write_all(s.as_bytes()).await;
                }
            }
        });
    }
}

/// Asks the disk server at `ctl` to run the migration `args`; its events go
/// to `tx` as they come. Returns the summary, or the error it reported.
pub async fn request(
    ctl: &Path,
    args: &MigrateArgs,
    tx: mpsc::UnboundedSender<Event>,
) -> Result<Summary> {
    let s = UnixStream::connect(ctl).await.with_context(|| {
        format!(
            "cannot reach disk server control socket {} (is `migrator disk serve --control` running?)",
            ctl.display()
        )
    })?;
    let (rd, mut wr) = s.into_split();
    let mut line = serde_json::to_string(&args)?;
    line.push('\n');
    wr.write_all(line.as_bytes()).await?;
    let mut lines = BufReader::new(rd).lines();
    let mut failed = None;
    let mut summary = None;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {
                // closing the connection before the commit point rolls back
                failed = Some("interrupted: migration rolled back, the source keeps serving".to_string());
                break;
            }
            l = lines.next_line() => match l? {
                Some(l) => {
                    let e: Event = serde_json::from_str(&l).context("bad event from the disk server")?;
                    match &e {
                        Event::Error { message } => failed = Some(message.clone()),
                        Event::Summary(s) => summary = Some(s.clone()),
                        _ => {}
                    }
                    let _ = tx.send(e);
                }
                None => break,
            }
        }
    }
    drop(wr);
    match (failed, summary) {
        (Some(m), _) => Err(anyhow::anyhow!(m)),
        (None, Some(s)) => Ok(s),
        (None, None) => Err(anyhow::anyhow!(
            "disk server closed the control connection without a result"
        )),
    }
}
