//! Source side of a disk migration: the tokio shell around [`precopy::Engine`].
//!
//! Ownership makes rollback the default: until the commit point a
//! [`RollbackGuard`] owns the disk's tracking state, and dropping it (any error,
//! a cancelled task, Ctrl-C of the CLI) returns the disk to plain serving with
//! held writes released. Nothing at the source is modified by a migration, so
//! nothing else needs undoing.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use thiserror::Error;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::disk::Disk;
use crate::events::{Event, EventSink, Phase, Summary, VmSummary};
use crate::failpoint;
use crate::image::is_zero;
use crate::memrelay;
use crate::precopy::{self, Delta, Engine, Transmit};
use crate::transport::frame::MAX_BLOCK;
use crate::transport::frame::{block_hash, BlockHash, LinkState, VERSION};
use crate::transport::tls::{self, Fingerprint, Identity};
use crate::transport::{read_frame, write_frame, Compressor, Frame, LinkError, SharedWriter};
use crate::vm::{SourceVm, VmOptions};

#[derive(Debug, Error)]
pub enum MigrateError {
    #[error("cannot reach destination {addr}: {source} (is `migrator receive` running there, and the port open?)")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS handshake with {addr} failed: {source} (do both sides pin each other's key with --peer?)")]
    Handshake {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("destination refused the migration: {0}")]
    Refused(String),
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error("the destination closed the link before the commit point (is its agent still running?); the source still serves the disk (and runs the VM): re-run to resume")]
    LinkClosed,
    #[error("timed out waiting for the destination's {0}")]
    Timeout(&'static str),
    #[error("did not converge after {rounds} rounds ({dirty_mib:.1} MiB still dirty): enable write throttling, raise --max-rounds or --downtime")]
    NotConverged { rounds: u32, dirty_mib: f64 },
    #[error("{0}")]
    Disk(String),
    #[error("committed: the destination is the authority, but sending the final blocks failed: {0}; its reads of those blocks wait until this source sends them (a node retries by itself; after `disk serve`, run `migrator disk resolve`)")]
    AfterCommit(String),
    #[error("VM: {0}")]
    Vm(String),
    #[error("cannot record the migration's state before the commit: {source}; rolled back, the source keeps serving (check the disk holding the image)")]
    Record {
        #[source]
        source: std::io::Error,
    },
    #[error("the link to {to} was lost after asking it to commit, and it cannot be asked what it decided: {source}. The VM stays paused and the disk's writes held here until it answers: a node keeps asking by itself; after `disk serve`, stop it and run `migrator disk resolve` once {to} is reachable")]
    InDoubt {
        to: String,
        #[source]
        source: Box<MigrateError>,
    },
    #[error("the link was lost before the destination committed ({0}); it says it did not, so the source keeps serving (and runs the VM): re-run to resume")]
    NotCommitted(Box<MigrateError>),
}

#[derive(Clone)]
pub struct MigrateOptions {
    /// `host:port` of `migrator receive`.
    pub to: String,
    pub identity: Identity,
    pub peers: Vec<Fingerprint>,
    pub precopy: precopy::Config,
    pub compress: bool,
    /// Cap on the link's use, bytes per second (`None`: as fast as it drains).
    pub max_rate: Option<u64>,
    /// What `migrator set` changes while the migration runs; starts from
    /// `max_rate` when the migration does.
    pub live: Arc<Live>,
    /// Where the source records, durably, that it is in doubt (asked the
    /// destination to commit) and then that it moved, so a restarted server
    /// never serves a stale copy. `None`: nothing survives a crash here.
    pub ledger: Option<Arc<dyn Ledger>>,
    /// Migrate the VM using this disk too (its memory through QEMU).
    pub vm: Option<VmOptions>,
    /// The VM's QMP connection when this process holds it already (a node
    /// owns its VMs); otherwise `vm.qmp` is connected to.
    pub qmp_connection: Option<Arc<crate::qmp::Qmp>>,
    /// After a link break at or after the commit, keep trying to reach the
    /// destination this long (to learn what it decided, to finish the final
    /// blocks) before giving up and reporting.
    pub reconnect_for: Duration,
}

/// The knobs of a running migration.
#[derive(Debug, Default)]
pub struct Live {
    /// The link's cap, bytes per second; 0: none.
    pub max_rate: AtomicU64,
}

/// Paces the link to `Live::max_rate`, re-anchored whenever the cap changes,
/// so a new cap applies from the moment it is set.
struct Pace {
    live: Arc<Live>,
    rate: u64,
    since_bytes: u64,
    since: Instant,
}

impl Pace {
    fn new(live: Arc<Live>) -> Self {
        Self {
            live,
            rate: 0,
            since_bytes: 0,
            since: Instant::now(),
        }
    }

    /// How long to wait after `sent` bytes in all, to stay under the cap.
    fn ahead(&mut self, sent: u64, now: Instant) -> Duration {
        let rate = self.live.max_rate.load(Ordering::Relaxed);
        if rate != self.rate {
            (self.rate, self.since_bytes, self.since) = (rate, sent, now);
        }
        if rate == 0 {
            return Duration::ZERO;
        }
        let due = Duration::from_secs_f64((sent - self.since_bytes) as f64 / rate as f64);
        due.saturating_sub(now - self.since)
    }
}

/// How long the source waits for `CommitAck` on a live link.
const COMMIT_WAIT: Duration = Duration::from_secs(30);

type LinkRead = tokio::io::ReadHalf<tokio_rustls::client::TlsStream<TcpStream>>;
type LinkWrite = tokio::io::WriteHalf<tokio_rustls::client::TlsStream<TcpStream>>;

/// A TLS link to the destination (pinned keys both ways).
async fn connect(opts: &MigrateOptions) -> Result<(LinkRead, LinkWrite), MigrateError> {
    let tcp = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(&opts.to))
        .await
        .map_err(|_| MigrateError::Connect {
            addr: opts.to.clone(),
            source: std::io::ErrorKind::TimedOut.into(),
        })?
        .map_err(|source| MigrateError::Connect {
            addr: opts.to.clone(),
            source,
        })?;
    let _ = tcp.set_nodelay(true);
    limit_unsent(&tcp);
    crate::transport::detect_silence(&tcp);
    let cfg = tls::client_config(&opts.identity, opts.peers.clone())
        .map_err(|e| MigrateError::Refused(e.to_string()))?;
    let stream = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_rustls::TlsConnector::from(cfg).connect(tls::server_name(), tcp),
    )
    .await
    .map_err(|_| MigrateError::Handshake {
        addr: opts.to.clone(),
        source: std::io::ErrorKind::TimedOut.into(),
    })?
    .map_err(|source| MigrateError::Handshake {
        addr: opts.to.clone(),
        source,
    })?;
    Ok(tokio::io::split(stream))
}

/// The link's read side, sorted: `Fetch` requests, the memory stream
/// (QEMU's return path) and everything else.
struct Reader {
    fetch: mpsc::UnboundedReceiver<u64>,
    inbound: mpsc::UnboundedReceiver<Inbound>,
    mem: Option<mpsc::Receiver<Frame>>,
    _task: AbortOnDrop,
}

fn spawn_reader(mut rd: LinkRead) -> Reader {
    let (fetch_tx, fetch) = mpsc::unbounded_channel::<u64>();
    let (in_tx, inbound) = mpsc::unbounded_channel::<Inbound>();
    let (mem_in_tx, mem) = mpsc::channel::<Frame>(16);
    let task = tokio::spawn(async move {
        loop {
            let msg = match read_frame(&mut rd).await {
                Ok(Some(Frame::Fetch { block })) => {
                    let _ = fetch_tx.send(block);
                    continue;
                }
                Ok(Some(f @ (Frame::Mem { .. } | Frame::MemEnd))) => {
                    // closed: QEMU's end is gone, its status says why
                    let _ = mem_in_tx.send(f).await;
                    continue;
                }
                Ok(Some(Frame::Ready)) => Inbound::Ready,
                Ok(Some(Frame::CommitAck)) => Inbound::CommitAck,
                Ok(Some(Frame::DoneAck)) => Inbound::DoneAck,
                Ok(Some(Frame::VmLoaded)) => Inbound::VmLoaded,
                Ok(Some(Frame::VmResumed)) => Inbound::VmResumed,
                Ok(Some(Frame::Error { message })) => Inbound::Refused(message),
                Ok(Some(other)) => Inbound::Refused(format!("unexpected frame {other:?}")),
                Ok(None) => Inbound::Closed(None),
                Err(e) => Inbound::Closed(Some(e)),
            };
            let stop = matches!(msg, Inbound::Refused(_) | Inbound::Closed(_));
            if in_tx.send(msg).is_err() || stop {
                return;
            }
        }
    });
    Reader {
        fetch,
        inbound,
        mem: Some(mem),
        _task: AbortOnDrop(task),
    }
}

/// The destination's answer to `Query`, with the link it came on (after
/// `Committed` that link carries the final blocks).
pub struct Answer {
    pub state: LinkState,
    pub pending: Vec<u64>,
    rd: LinkRead,
    wr: LinkWrite,
}

/// Asks the destination what it holds of `name`.
pub async fn ask(opts: &MigrateOptions, name: &str) -> Result<Answer, MigrateError> {
    let (mut rd, mut wr) = connect(opts).await?;
    write_frame(
        &mut wr,
        &Frame::Query {
            version: VERSION,
            name: name.to_string(),
        },
    )
    .await?;
    wr.flush().await.map_err(LinkError::Io)?;
    match tokio::time::timeout(Duration::from_secs(30), read_frame(&mut rd)).await {
        Ok(Ok(Some(Frame::State { state, pending }))) => Ok(Answer {
            state,
            pending,
            rd,
            wr,
        }),
        Ok(Ok(Some(Frame::Error { message }))) => Err(MigrateError::Refused(message)),
        Ok(Ok(Some(other))) => Err(MigrateError::Refused(format!(
            "unexpected {other:?} instead of State"
        ))),
        Ok(Ok(None)) => Err(MigrateError::LinkClosed),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Err(MigrateError::Timeout("State")),
    }
}

/// [`ask`] again every second while the destination cannot be reached, for
/// at most `opts.reconnect_for`. A refusal is an answer: it is not retried.
async fn ask_until(opts: &MigrateOptions, name: &str) -> Result<Answer, MigrateError> {
    let deadline = Instant::now() + opts.reconnect_for;
    loop {
        match ask(opts, name).await {
            Err(e) if !matches!(e, MigrateError::Refused(_)) && Instant::now() < deadline => {
                warn!(to = %opts.to, "cannot ask the destination yet: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            r => return r,
        }
    }
}

/// After the commit: the final blocks (those the destination fetches
/// first), `Done`, and its `DoneAck`. A block leaves `remaining` once written
/// to the link, so a retry on a new link resends only what may be missing
/// (the destination's `State` says exactly which).
async fn send_final<W: AsyncWrite + Unpin>(
    s: &mut Sender<W>,
    remaining: &mut BTreeSet<u64>,
    rx: &mut Reader,
    resumed_at: &mut Option<Instant>,
) -> Result<(), MigrateError> {
    failpoint::hit("source.final_blocks");
    while let Some(&first) = remaining.first() {
        let next = match rx.fetch.try_recv() {
            Ok(b) if remaining.contains(&b) => {
                s.summary.fetched_blocks += 1;
                b
            }
            _ => first,
        };
        s.send_blocks(next, 1).await?;
        remaining.remove(&next);
        if remaining.is_empty() || rx.fetch.is_empty() {
            s.wr.flush().await?;
        }
    }
    s.send(&Frame::Done).await?;
    s.wr.flush().await?;
    loop {
        match tokio::time::timeout(Duration::from_secs(60), rx.inbound.recv()).await {
            Ok(Some(Inbound::DoneAck)) => return Ok(()),
            Ok(Some(Inbound::VmResumed)) => *resumed_at = Some(Instant::now()),
            Ok(Some(Inbound::VmLoaded | Inbound::CommitAck)) => {}
            Ok(Some(other)) => return Err(inbound_error(other)),
            Ok(None) => return Err(MigrateError::LinkClosed),
            Err(_) => return Err(MigrateError::Timeout("DoneAck")),
        }
    }
}

/// Marker path for an image.
pub fn marker_path(image: &Path) -> PathBuf {
    let mut s = image.as_os_str().to_owned();
    s.push(".moved");
    PathBuf::from(s)
}

/// The source's durable record of its side of the commit. The destination
/// decides (its `Committed` record is the commit); the source records only
/// that it asked, so that after a crash it asks again instead of serving.
pub trait Ledger: Send + Sync {
    /// About to send `Commit` to `to`: until the destination answers, this
    /// copy must neither take writes nor run the VM; once it committed, until
    /// its last block landed, a restart must finish sending.
    fn in_doubt(&self, to: &str) -> std::io::Result<()>;
    /// The destination committed and holds every block: this copy is stale
    /// for good.
    fn moved(&self, to: &str) -> std::io::Result<()>;
    /// The destination did not commit: this copy is the authority again.
    fn rolled_back(&self) -> std::io::Result<()>;
}

/// What a source's record says, as `<image>.moved` holds it (JSON; a plain
/// address, as older versions wrote, means `Moved`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Record {
    InDoubt { to: String },
    Moved { to: String },
}

impl Record {
    pub fn parse(text: &str) -> Record {
        serde_json::from_str(text).unwrap_or_else(|_| Record::Moved {
            to: text.trim().to_string(),
        })
    }
}

/// Cancel and commit exclude each other: once a source has recorded that it
/// asks for the commit, a cancel is refused (the destination may already
/// have committed); once cancelled, it never asks.
#[derive(Debug, Default)]
pub struct CommitGate {
    state: Mutex<(bool, bool)>,
}

impl CommitGate {
    /// Records (with `record`) that the source asks for the commit, unless
    /// it was cancelled.
    pub fn begin_commit(
        &self,
        record: impl FnOnce() -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.1 {
            return Err(std::io::Error::other("cancelled"));
        }
        record()?;
        st.0 = true;
        Ok(())
    }

    /// The destination did not commit: cancelling is possible again.
    pub fn reopen(&self) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).0 = false;
    }

    /// Cancels, unless the commit was asked for already.
    pub fn try_cancel(&self) -> bool {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.0 {
            return false;
        }
        st.1 = true;
        true
    }
}

/// The ledger of `disk serve`: `<image>.moved`, replaced atomically.
pub struct MarkerFile {
    pub path: PathBuf,
    pub gate: CommitGate,
}

impl MarkerFile {
    pub fn for_image(image: &Path) -> Arc<MarkerFile> {
        Arc::new(MarkerFile {
            path: marker_path(image),
            gate: CommitGate::default(),
        })
    }

    pub fn read(&self) -> Option<Record> {
        std::fs::read_to_string(&self.path)
            .ok()
            .map(|t| Record::parse(&t))
    }
}

impl Ledger for MarkerFile {
    fn in_doubt(&self, to: &str) -> std::io::Result<()> {
        self.gate
            .begin_commit(|| write_durably(&self.path, &Record::InDoubt { to: to.into() }))
    }
    fn moved(&self, to: &str) -> std::io::Result<()> {
        write_durably(&self.path, &Record::Moved { to: to.into() })
    }
    fn rolled_back(&self) -> std::io::Result<()> {
        match std::fs::remove_file(&self.path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        self.gate.reopen();
        sync_parent(&self.path)
    }
}

struct RollbackGuard<'a> {
    disk: &'a Disk,
    armed: bool,
}

impl Drop for RollbackGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            warn!(
                disk = self.disk.name(),
                "migration rolled back; the source keeps serving"
            );
            self.disk.stop_tracking();
        }
    }
}

/// Sender-side state shared by the pre- and post-commit loops.
struct Sender<W> {
    wr: Arc<SharedWriter<W>>,
    disk: Arc<Disk>,
    engine: Arc<Mutex<Engine>>,
    bs: u64,
    peer_hashes: HashMap<u64, BlockHash>,
    comp: Option<Compressor>,
    summary: Summary,
    pace: Pace,
    /// Progress events, at most every 200 ms, from every frame sent (a
    /// slow link shows its progress within a range, not after it).
    progress: Option<Progress>,
}

struct Progress {
    events: EventSink,
    phase: Phase,
    last: Instant,
}

impl<W: AsyncWrite + Unpin> Sender<W> {
    fn engine(&self) -> std::sync::MutexGuard<'_, Engine> {
        self.engine.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn send(&mut self, f: &Frame) -> Result<(), LinkError> {
        let n = self.wr.send(f).await? as u64;
        self.summary.wire_bytes += n;
        // Pace to the cap: never ahead of rate × elapsed.
        let ahead = self.pace.ahead(self.summary.wire_bytes, Instant::now());
        if ahead > Duration::from_millis(2) {
            self.wr.flush().await?;
            tokio::time::sleep(ahead).await;
        }
        let now = Instant::now();
        self.engine().handle_sent(n, now);
        let due = self.progress.as_ref().is_some_and(|p| {
            p.phase != Phase::Memory && now - p.last >= Duration::from_millis(200)
        });
        if due {
            let e = {
                let engine = self.engine.lock().unwrap_or_else(|p| p.into_inner());
                self.progress.as_ref().map(|p| progress(&engine, p.phase))
            };
            if let (Some(p), Some(e)) = (&mut self.progress, e) {
                p.last = now;
                p.events.send(e);
            }
        }
        Ok(())
    }

    fn set_phase(&mut self, phase: Phase) {
        if let Some(p) = &mut self.progress {
            p.phase = phase;
        }
    }

    /// Read blocks `[start, start+count)` and send them: skipped when the
    /// destination already holds the same content, zero extents for zeros.
    async fn send_blocks(&mut self, start: u64, count: u64) -> Result<(), MigrateError> {
        failpoint::hit("source.blocks");
        let size = self.disk.size();
        let off = start * self.bs;
        let len = (count * self.bs).min(size - off);
        let img = self.disk.image().clone();
        let buf = tokio::task::spawn_blocking(move || {
            let mut b = vec![0u8; len as usize];
            img.read_at(&mut b, off).map(|_| b)
        })
        .await
        .map_err(|e| MigrateError::Disk(e.to_string()))?
        .map_err(|e| MigrateError::Disk(e.to_string()))?;
        let mut zero_run: Option<(u64, u64)> = None;
        for (i, chunk) in buf.chunks(self.bs as usize).enumerate() {
            let b = start + i as u64;
            let boff = b * self.bs;
            if let Some(h) = self.peer_hashes.remove(&b) {
                if h == block_hash(chunk) {
                    self.summary.resumed_bytes += chunk.len() as u64;
                    continue;
                }
            }
            if is_zero(chunk) {
                zero_run = match zero_run {
                    Some((o, l)) if o + l == boff => Some((o, l + chunk.len() as u64)),
                    Some((o, l)) => {
                        self.send_zero(o, l).await?;
                        Some((boff, chunk.len() as u64))
                    }
                    None => Some((boff, chunk.len() as u64)),
                };
                continue;
            }
            let raw_len = chunk.len() as u32;
            self.summary.data_bytes += raw_len as u64;
            let (compressed, payload) = match &mut self.comp {
                Some(c) => c.pack(chunk.to_vec()),
                None => (false, chunk.to_vec()),
            };
            self.send(&Frame::Data {
                offset: boff,
                compressed,
                raw_len,
                payload,
            })
            .await?;
        }
        if let Some((o, l)) = zero_run {
            self.send_zero(o, l).await?;
        }
        Ok(())
    }

    /// Send one forwarded write (deltas mode), split to the frame limit.
    async fn send_delta(&mut self, d: Delta) -> Result<(), LinkError> {
        match d {
            Delta::Zero { offset, len } => self.send_zero(offset, len).await,
            Delta::Data { offset, data } => {
                for (i, chunk) in data.chunks(MAX_BLOCK as usize).enumerate() {
                    let (compressed, payload) = match &mut self.comp {
                        Some(c) => c.pack(chunk.to_vec()),
                        None => (false, chunk.to_vec()),
                    };
                    self.summary.data_bytes += chunk.len() as u64;
                    self.send(&Frame::Data {
                        offset: offset + (i * MAX_BLOCK as usize) as u64,
                        compressed,
                        raw_len: chunk.len() as u32,
                        payload,
                    })
                    .await?;
                }
                Ok(())
            }
        }
    }

    async fn send_zero(&mut self, offset: u64, len: u64) -> Result<(), LinkError> {
        self.summary.zero_bytes += len;
        self.send(&Frame::Zero { offset, len }).await
    }
}

/// Block ranges `(start, count)` covering the byte extents, merged and sorted.
fn block_ranges(
    bs: u64,
    extents: impl IntoIterator<Item = (u64, u64)>,
    extra: impl IntoIterator<Item = u64>,
) -> Vec<(u64, u64)> {
    let mut v: Vec<(u64, u64)> = extents
        .into_iter()
        .filter(|e| e.1 > 0)
        .map(|(o, l)| (o / bs, (o + l).div_ceil(bs) - o / bs))
        .chain(extra.into_iter().map(|b| (b, 1)))
        .collect();
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(v.len());
    for (s, c) in v {
        match out.last_mut() {
            Some(last) if s <= last.0 + last.1 => last.1 = last.1.max(s + c - last.0),
            _ => out.push((s, c)),
        }
    }
    out
}

/// Messages from the destination that the sending loop acts on.
enum Inbound {
    Ready,
    CommitAck,
    DoneAck,
    VmLoaded,
    VmResumed,
    Refused(String),
    Closed(Option<LinkError>),
}

/// Returns a VM to running at the source unless disarmed at the commit
/// point: awaited on an error, spawned when the migration task is dropped.
struct VmGuard {
    vm: Option<Arc<SourceVm>>,
}

impl VmGuard {
    async fn rollback(&mut self) {
        if let Some(vm) = self.vm.take() {
            if let Err(e) = vm.rollback().await {
                warn!("cannot resume the source VM: {e} (check it with `query-status`)");
            }
        }
    }
}

impl Drop for VmGuard {
    fn drop(&mut self) {
        if let Some(vm) = self.vm.take() {
            if let Ok(h) = tokio::runtime::Handle::try_current() {
                h.spawn(async move {
                    if let Err(e) = vm.rollback().await {
                        warn!("cannot resume the source VM: {e}");
                    }
                });
            }
        }
    }
}

/// Migrate `disk` — and with `opts.vm`, the VM using it — to the destination
/// agent. On success the source has moved (refuses writes) and the
/// destination serves the disk (and runs the VM). Before the commit point any
/// failure leaves the disk serving and the VM running here.
pub async fn migrate(
    disk: Arc<Disk>,
    opts: MigrateOptions,
    events: EventSink,
) -> Result<Summary, MigrateError> {
    let vm = match (&opts.vm, &opts.qmp_connection) {
        (Some(o), Some(q)) => Some(SourceVm::attach_to(q.clone(), o.clone()).await),
        (Some(o), None) => Some(SourceVm::attach(o.clone()).await),
        (None, _) => None,
    };
    let vm = match vm {
        Some(v) => Some(Arc::new(v.map_err(|e| MigrateError::Vm(e.to_string()))?)),
        None => None,
    };
    let mut guard = VmGuard { vm: vm.clone() };
    match transfer(disk, opts, events, vm, &mut guard).await {
        Err(e)
            if !matches!(
                e,
                MigrateError::AfterCommit(_) | MigrateError::InDoubt { .. }
            ) =>
        {
            guard.rollback().await;
            Err(e)
        }
        r => r,
    }
}

/// How an in-doubt move ended, once the destination answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// The destination never committed: this copy is the authority.
    StayedHere,
    /// The destination committed (and now holds every block).
    MovedThere,
}

/// A source that crashed or lost its link while in doubt: ask the
/// destination (for up to `opts.reconnect_for`) what it decided, send it the
/// blocks it still lacks if it committed, and record the outcome in
/// `opts.ledger`. `disk` must not be served meanwhile; it only gives the
/// blocks to send.
pub async fn settle(disk: Arc<Disk>, opts: MigrateOptions) -> Result<Settled, MigrateError> {
    let a = ask_until(&opts, disk.name()).await?;
    let record = |r: std::io::Result<()>| r.map_err(|source| MigrateError::Record { source });
    let ledger = opts.ledger.clone();
    let settled = match a.state {
        LinkState::None => {
            if let Some(l) = &ledger {
                record(l.rolled_back())?;
            }
            return Ok(Settled::StayedHere);
        }
        LinkState::Complete => Settled::MovedThere,
        LinkState::Committed => {
            let bs = opts.precopy.block_size as u64;
            let engine = Engine::new(opts.precopy.clone(), disk.size(), Vec::new());
            let mut s = Sender {
                wr: Arc::new(SharedWriter::new(a.wr)),
                disk: disk.clone(),
                engine: Arc::new(Mutex::new(engine)),
                bs,
                peer_hashes: HashMap::new(),
                comp: opts.compress.then(Compressor::default),
                summary: Summary::default(),
                pace: Pace::new(Arc::default()),
                progress: None,
            };
            let mut rx = spawn_reader(a.rd);
            let mut remaining: BTreeSet<u64> = a.pending.into_iter().collect();
            info!(
                disk = disk.name(),
                blocks = remaining.len(),
                "the destination committed: sending the blocks it lacks"
            );
            send_final(&mut s, &mut remaining, &mut rx, &mut None).await?;
            s.wr.shutdown().await;
            Settled::MovedThere
        }
    };
    disk.commit_moved(opts.to.clone());
    if let Some(l) = &ledger {
        record(l.moved(&opts.to))?;
    }
    Ok(settled)
}

/// QEMU's memory migration in progress: its statuses and the tasks that
/// carry its stream.
struct MemoryRun {
    statuses: mpsc::UnboundedReceiver<String>,
    tasks: Vec<tokio::task::JoinHandle<Result<u64, LinkError>>>,
    stream_bytes: Arc<AtomicU64>,
    wire_bytes: Arc<AtomicU64>,
    postcopy: bool,
    last_poll: Instant,
}

impl Drop for MemoryRun {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// What a migration status means for the sending loop.
enum MemStep {
    Go,
    Paused,
}

async fn on_status(vm: &SourceVm, status: Option<String>) -> Result<MemStep, MigrateError> {
    match status.as_deref() {
        Some("pre-switchover") => Ok(MemStep::Paused),
        Some(s @ ("failed" | "cancelled")) => Err(MigrateError::Vm(
            vm.failure(s.to_string()).await.to_string(),
        )),
        Some(_) => Ok(MemStep::Go),
        None => Err(MigrateError::Vm("lost QEMU's migration events".into())),
    }
}

async fn transfer(
    disk: Arc<Disk>,
    opts: MigrateOptions,
    events: EventSink,
    vm: Option<Arc<SourceVm>>,
    vm_guard: &mut VmGuard,
) -> Result<Summary, MigrateError> {
    let t0 = Instant::now();
    opts.live
        .max_rate
        .store(opts.max_rate.unwrap_or(0), Ordering::Relaxed);
    events.send(Event::Phase {
        phase: Phase::Connect,
    });
    let (mut rd, mut wr) = connect(&opts).await?;
    let bs = opts.precopy.block_size as u64;
    write_frame(
        &mut wr,
        &Frame::Hello {
            version: VERSION,
            name: disk.name().to_string(),
            size: disk.size(),
            block_size: opts.precopy.block_size,
        },
    )
    .await?;
    wr.flush().await.map_err(LinkError::Io)?;
    let mut peer_hashes = HashMap::new();
    loop {
        match read_frame(&mut rd).await? {
            Some(Frame::Hashes(v)) => peer_hashes.extend(v),
            Some(Frame::Welcome) => break,
            Some(Frame::Error { message }) => return Err(MigrateError::Refused(message)),
            Some(other) => {
                return Err(MigrateError::Refused(format!(
                    "unexpected {other:?} during handshake"
                )))
            }
            None => return Err(MigrateError::LinkClosed),
        }
    }
    let postcopy = opts
        .vm
        .as_ref()
        .is_some_and(|v| v.postcopy_after_passes.is_some());
    if vm.is_some() {
        // The destination VM starts first: a launch that fails costs nothing.
        write_frame(&mut wr, &Frame::VmStart { postcopy }).await?;
        wr.flush().await.map_err(LinkError::Io)?;
        match tokio::time::timeout(Duration::from_secs(60), read_frame(&mut rd)).await {
            Ok(Ok(Some(Frame::VmReady))) => {}
            Ok(Ok(Some(Frame::Error { message }))) => return Err(MigrateError::Refused(message)),
            Ok(Ok(Some(other))) => {
                return Err(MigrateError::Refused(format!(
                    "unexpected {other:?} instead of VmReady"
                )))
            }
            Ok(Ok(None)) => return Err(MigrateError::LinkClosed),
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => return Err(MigrateError::Timeout("VmReady")),
        }
    }
    info!(disk = disk.name(), to = %opts.to, resumable_blocks = peer_hashes.len(), vm = vm.is_some(), "migration connected");

    // Bulk ranges: allocated data here, plus what the destination holds (it may
    // need zeroing where this copy has a hole now).
    let size = disk.size();
    let (cfg, dest_blocks): (_, Vec<u64>) =
        (opts.precopy.clone(), peer_hashes.keys().copied().collect());
    let engine = disk
        .start_tracking(move |img| {
            let extents = img.extents(0, size).map_err(|e| e.to_string())?;
            let ranges = block_ranges(
                bs,
                extents
                    .iter()
                    .filter(|e| !e.hole)
                    .map(|e| (e.offset, e.len)),
                dest_blocks,
            );
            Ok(Engine::new(cfg, size, ranges))
        })
        .await
        .map_err(MigrateError::Disk)?;
    let mut guard = RollbackGuard {
        disk: &disk,
        armed: true,
    };

    let mut rx = spawn_reader(rd);
    let mut mem_in_rx = rx.mem.take();

    let wr = Arc::new(SharedWriter::new(wr));
    let mut s = Sender {
        wr: wr.clone(),
        disk: disk.clone(),
        engine: engine.clone(),
        bs,
        peer_hashes,
        comp: opts.compress.then(Compressor::default),
        pace: Pace::new(opts.live.clone()),
        progress: Some(Progress {
            events: events.clone(),
            phase: Phase::Bulk,
            last: Instant::now(),
        }),
        summary: Summary {
            disk: disk.name().to_string(),
            destination: opts.to.clone(),
            size_bytes: size,
            ..Summary::default()
        },
    };
    events.send(Event::Phase { phase: Phase::Bulk });
    let mut phase = Phase::Bulk;
    let mut mem: Option<MemoryRun> = None;
    loop {
        if let Ok(msg) = rx.inbound.try_recv() {
            return Err(inbound_error(msg));
        }
        if let (Some(m), Some(vm)) = (&mut mem, &vm) {
            match m.statuses.try_recv() {
                Ok(st) => {
                    if let MemStep::Paused = on_status(vm, Some(st)).await? {
                        break;
                    }
                }
                Err(mpsc::error::TryRecvError::Empty) => {}
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    on_status(vm, None).await?;
                }
            }
            if m.last_poll.elapsed() >= Duration::from_millis(500) {
                m.last_poll = Instant::now();
                let info = vm
                    .info()
                    .await
                    .map_err(|e| MigrateError::Vm(e.to_string()))?;
                let passes = info.ram.dirty_sync_count;
                events.send(Event::Memory {
                    transferred_bytes: info.ram.transferred,
                    remaining_bytes: info.ram.remaining,
                    dirty_pages_rate: info.ram.dirty_pages_rate,
                    passes,
                    wire_bytes: m.wire_bytes.load(Ordering::Relaxed),
                });
                if let Some(after) = vm.postcopy_after_passes() {
                    if !m.postcopy && passes >= after {
                        info!(passes, "memory does not converge: switching to post-copy");
                        vm.start_postcopy()
                            .await
                            .map_err(|e| MigrateError::Vm(e.to_string()))?;
                        m.postcopy = true;
                    }
                }
            }
        }
        let t = s.engine().poll_transmit(Instant::now());
        match t {
            Some(Transmit::Blocks { start, count }) => {
                s.send_blocks(start, count).await?;
            }
            Some(Transmit::Delta) => {
                let d = s.engine().pop_delta();
                if let Some(d) = d {
                    s.send_delta(d).await?;
                }
            }
            Some(Transmit::Switchover) => {
                let Some(vm) = &vm else { break };
                // The disk has converged: it follows the guest's writes while
                // QEMU moves the memory, and both switch over together.
                s.engine().follow();
                let (qemu, statuses) = vm
                    .start()
                    .await
                    .map_err(|e| MigrateError::Vm(e.to_string()))?;
                mem = Some(start_memory(
                    qemu,
                    statuses,
                    mem_in_rx.take(),
                    wr.clone(),
                    opts.compress,
                ));
                phase = Phase::Memory;
                s.set_phase(phase);
                events.send(Event::Phase { phase });
            }
            Some(Transmit::Idle) => {
                s.wr.flush().await?;
                let (Some(m), Some(vm)) = (&mut mem, &vm) else {
                    return Err(MigrateError::Disk(
                        "pre-copy engine idle without a VM".into(),
                    ));
                };
                tokio::select! {
                    st = m.statuses.recv() => {
                        if let MemStep::Paused = on_status(vm, st).await? {
                            break;
                        }
                    }
                    _ = tokio::time::sleep(Duration::from_millis(5)) => {}
                }
            }
            Some(Transmit::NotConverged {
                rounds,
                dirty_blocks,
            }) => {
                return Err(MigrateError::NotConverged {
                    rounds,
                    dirty_mib: (dirty_blocks * bs) as f64 / (1024.0 * 1024.0),
                })
            }
            None => return Err(MigrateError::Disk("pre-copy engine stopped early".into())),
        }
        if phase == Phase::Bulk && !s.engine().is_bulk() {
            phase = Phase::Dirty;
            s.set_phase(phase);
            events.send(Event::Phase { phase });
        }
    }

    // Switchover: hold writes (the VM is paused already, if there is one),
    // take the final set, let the destination persist everything else, then
    // commit.
    s.set_phase(Phase::Switchover);
    events.send(Event::Phase {
        phase: Phase::Switchover,
    });
    let t_freeze = Instant::now();
    disk.freeze().await;
    let final_blocks = s.engine().handle_frozen();
    // Deltas queued before the freeze travel before Prepare, in order.
    loop {
        let d = s.engine().pop_delta();
        match d {
            Some(d) => s.send_delta(d).await?,
            None => break,
        }
    }
    s.send(&Frame::Prepare {
        blocks: final_blocks.clone(),
    })
    .await?;
    s.wr.flush().await?;
    let postcopy_run = mem.as_ref().is_some_and(|m| m.postcopy);
    if let (Some(vm), false) = (&vm, postcopy_run) {
        // Pre-copy: QEMU sends the rest while the destination syncs its disk.
        vm.continue_switchover()
            .await
            .map_err(|e| MigrateError::Vm(e.to_string()))?;
    }
    let (mut ready, mut loaded, mut completed) = (
        false,
        vm.is_none() || postcopy_run,
        vm.is_none() || postcopy_run,
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut vm_info = crate::qmp::MigrationInfo::default();
    // where the pause goes, for the operator
    let mut marks: Vec<(&str, Duration)> = vec![("final disk set sent", t_freeze.elapsed())];
    while !(ready && loaded && completed) {
        let status = async {
            match (&mut mem, completed) {
                (Some(m), false) => m.statuses.recv().await,
                _ => std::future::pending().await,
            }
        };
        tokio::select! {
            msg = rx.inbound.recv() => match msg {
                Some(Inbound::Ready) => {
                    ready = true;
                    marks.push(("destination disk ready", t_freeze.elapsed()));
                }
                Some(Inbound::VmLoaded) => {
                    loaded = true;
                    marks.push(("destination VM loaded", t_freeze.elapsed()));
                }
                Some(other) => return Err(inbound_error(other)),
                None => return Err(MigrateError::LinkClosed),
            },
            st = status => {
                if st.as_deref() == Some("completed") {
                    completed = true;
                    marks.push(("source QEMU sent all", t_freeze.elapsed()));
                    // QEMU's own account, before the source QEMU quits
                    if let Some(vm) = &vm {
                        vm_info = vm.info().await.unwrap_or_default();
                    }
                } else if let Some(vm) = &vm {
                    on_status(vm, st).await?;
                }
            }
            _ = tokio::time::sleep_until(deadline) => {
                return Err(MigrateError::Timeout(if !ready { "Ready" } else if !completed { "memory stream's end" } else { "VmLoaded" }))
            }
        }
    }
    if vm.is_some() {
        events.send(Event::Note {
            message: format!(
                "switchover: {}",
                marks
                    .iter()
                    .map(|(what, t)| format!("{what} +{:.0} ms", t.as_secs_f64() * 1e3))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        });
    }
    // ---- the commit: the destination decides; the source records that it asked ----
    if let Some(l) = &opts.ledger {
        l.in_doubt(&opts.to)
            .map_err(|source| MigrateError::Record { source })?;
    }
    failpoint::hit("source.before_commit");
    let asked = async {
        s.send(&Frame::Commit).await?;
        s.wr.flush().await?;
        loop {
            match tokio::time::timeout(COMMIT_WAIT, rx.inbound.recv()).await {
                Ok(Some(Inbound::CommitAck)) => return Ok(()),
                Ok(Some(Inbound::VmLoaded)) => {}
                Ok(Some(other)) => return Err(inbound_error(other)),
                Ok(None) => return Err(MigrateError::LinkClosed),
                Err(_) => return Err(MigrateError::Timeout("CommitAck")),
            }
        }
    }
    .await;
    let mut remaining: BTreeSet<u64> = final_blocks.iter().copied().collect();
    let mut relinked = false;
    // every block already landed (the destination said `complete`)
    let mut landed = false;
    if let Err(lost) = asked {
        warn!(
            disk = disk.name(),
            "no answer to Commit ({lost}); asking the destination what it decided"
        );
        match ask_until(&opts, disk.name()).await {
            Ok(Answer {
                state: LinkState::None,
                ..
            }) => {
                if let Some(l) = &opts.ledger {
                    if let Err(e) = l.rolled_back() {
                        // a restart here asks again and hears the same answer
                        warn!("cannot clear the in-doubt record: {e}");
                    }
                }
                return Err(MigrateError::NotCommitted(Box::new(lost)));
            }
            Ok(a) => {
                info!(disk = disk.name(), pending = a.pending.len(), state = ?a.state, "the destination committed");
                remaining = a.pending.into_iter().collect();
                landed = a.state == LinkState::Complete;
                s.wr = Arc::new(SharedWriter::new(a.wr));
                rx = spawn_reader(a.rd);
                relinked = true;
            }
            Err(e) => {
                // Neither copy may run: the VM stays paused, writes stay held.
                guard.armed = false;
                vm_guard.vm = None;
                return Err(MigrateError::InDoubt {
                    to: opts.to.clone(),
                    source: Box::new(e),
                });
            }
        }
    }
    // ---- commit point: the destination's record decided it ----
    // The record stays `in_doubt` until every final block has landed: a
    // restart before then asks the destination and sends what it lacks.
    disk.commit_moved(opts.to.clone());
    guard.armed = false;
    vm_guard.vm = None;
    let t_commit = Instant::now();
    s.summary.frozen_ms = (t_commit - t_freeze).as_secs_f64() * 1e3;
    s.set_phase(Phase::Committed);
    events.send(Event::Phase {
        phase: Phase::Committed,
    });
    let mut resumed_at = None;
    let after = async {
        if let Some(vm) = &vm {
            if postcopy_run {
                if relinked {
                    return Err(MigrateError::Vm(
                        "the link carrying post-copy memory was lost at the commit".into(),
                    ));
                }
                // Post-copy: the destination runs on, fetching pages from here.
                vm.continue_switchover()
                    .await
                    .map_err(|e| MigrateError::Vm(e.to_string()))?;
            } else {
                vm.quit().await;
            }
        }
        while !landed {
            let sent = send_final(&mut s, &mut remaining, &mut rx, &mut resumed_at).await;
            let Err(e) = sent else { break };
            if postcopy_run {
                return Err(e);
            }
            warn!(
                disk = disk.name(),
                left = remaining.len(),
                "link lost after the commit ({e}); reconnecting"
            );
            let a = ask_until(&opts, disk.name()).await.map_err(|_| e)?;
            match a.state {
                LinkState::Complete => landed = true,
                LinkState::Committed => {
                    remaining = a.pending.into_iter().collect();
                    s.wr = Arc::new(SharedWriter::new(a.wr));
                    rx = spawn_reader(a.rd);
                }
                LinkState::None => {
                    return Err(MigrateError::Refused(format!(
                        "{} has no committed copy of {} although it acknowledged the commit",
                        opts.to,
                        disk.name()
                    )))
                }
            }
        }
        if let (Some(vm), Some(m)) = (&vm, &mut mem) {
            if resumed_at.is_none() {
                // the destination resumes right after Commit: its word follows
                while let Ok(Some(msg)) =
                    tokio::time::timeout(Duration::from_secs(30), rx.inbound.recv()).await
                {
                    if let Inbound::VmResumed = msg {
                        resumed_at = Some(Instant::now());
                        break;
                    }
                }
            }
            if postcopy_run {
                // the pages still at the source go on demand and in the background
                while let Some(st) = m.statuses.recv().await {
                    match st.as_str() {
                        "completed" => break,
                        "failed" | "cancelled" => {
                            return Err(MigrateError::Vm(vm.failure(st).await.to_string()))
                        }
                        _ => {}
                    }
                }
                vm_info = vm.info().await.unwrap_or_default();
                vm.quit().await;
            }
            // the stream's end in both directions
            for t in m.tasks.drain(..) {
                let _ = tokio::time::timeout(Duration::from_secs(30), t).await;
            }
        }
        Ok::<_, MigrateError>(())
    };
    after
        .await
        .map_err(|e| MigrateError::AfterCommit(e.to_string()))?;
    if let Some(l) = &opts.ledger {
        if let Err(e) = l.moved(&opts.to) {
            warn!("cannot record the move ({e}); the record says in doubt, so a restart here asks the destination again");
        }
    }
    s.wr.shutdown().await;
    s.summary.final_ms = t_commit.elapsed().as_secs_f64() * 1e3;
    s.summary.total_s = t0.elapsed().as_secs_f64();
    if let Some(m) = &mem {
        let info = vm_info;
        s.summary.vm = Some(Box::new(VmSummary {
            memory_stream_bytes: m.stream_bytes.load(Ordering::Relaxed),
            memory_wire_bytes: m.wire_bytes.load(Ordering::Relaxed),
            passes: info.ram.dirty_sync_count,
            paused_ms: resumed_at.map(|r| (r - t_freeze).as_secs_f64() * 1e3),
            qemu_downtime_ms: info.downtime,
            postcopy: postcopy_run,
        }));
    }
    let st = s.engine().stats().clone();
    s.summary.bulk_blocks = st.bulk_blocks;
    s.summary.resent_blocks = st.resent_blocks;
    s.summary.rounds = st.rounds;
    s.summary.round_dirty_blocks = st.round_dirty;
    s.summary.final_blocks = st.final_blocks;
    s.summary.deltas = st.deltas;
    s.summary.writes = st.writes;
    s.summary.writes_delayed = st.writes_delayed;
    s.summary.write_delay_total_ms = st.delay_total.as_secs_f64() * 1e3;
    s.summary.compressed_saved_bytes = s.comp.as_ref().map(|c| c.saved).unwrap_or(0);
    events.send(Event::Phase { phase: Phase::Done });
    events.send(Event::Summary(s.summary.clone()));
    Ok(s.summary)
}

/// Wires QEMU's migration connection to the link: its stream out as `Mem`
/// frames between the disk's, the peer's `Mem` frames (QEMU's return path)
/// back in.
fn start_memory<W>(
    qemu: tokio::net::UnixStream,
    statuses: mpsc::UnboundedReceiver<String>,
    from_peer: Option<mpsc::Receiver<Frame>>,
    wr: Arc<SharedWriter<W>>,
    compress: bool,
) -> MemoryRun
where
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (q_rd, q_wr) = qemu.into_split();
    let (tx, mut rx) = mpsc::channel::<Frame>(2);
    let stream_bytes = Arc::new(AtomicU64::new(0));
    let wire_bytes = Arc::new(AtomicU64::new(0));
    let mut tasks = vec![tokio::spawn(memrelay::outbound(q_rd, tx, compress))];
    let wire = wire_bytes.clone();
    let stream = stream_bytes.clone();
    tasks.push(tokio::spawn(async move {
        let mut n = 0u64;
        while let Some(f) = rx.recv().await {
            if let Frame::Mem { raw_len, .. } = &f {
                stream.fetch_add(*raw_len as u64, Ordering::Relaxed);
            }
            let w = wr.send(&f).await? as u64;
            wire.fetch_add(w, Ordering::Relaxed);
            n += w;
            if rx.is_empty() {
                wr.flush().await?;
            }
        }
        Ok(n)
    }));
    if let Some(from_peer) = from_peer {
        let stream = stream_bytes.clone();
        tasks.push(tokio::spawn(async move {
            let n = memrelay::inbound(from_peer, q_wr).await?;
            stream.fetch_add(n, Ordering::Relaxed);
            Ok(n)
        }));
    }
    MemoryRun {
        statuses,
        tasks,
        stream_bytes,
        wire_bytes,
        postcopy: false,
        last_poll: Instant::now(),
    }
}

fn progress(e: &Engine, phase: Phase) -> Event {
    let bs = e.config().block_size;
    let rate = e.drain_rate();
    let left = (e.bulk_remaining() + e.dirty_blocks()) * bs as u64;
    Event::Progress {
        phase,
        round: e.stats().rounds,
        wire_bytes: e.stats().bytes_sent,
        bulk_remaining_blocks: e.bulk_remaining(),
        dirty_blocks: e.dirty_blocks(),
        block_size: bs,
        rate_bytes_per_s: rate,
        eta_s: rate.filter(|r| *r > 0.0).map(|r| left as f64 / r),
    }
}

fn inbound_error(msg: Inbound) -> MigrateError {
    match msg {
        Inbound::Refused(m) => MigrateError::Refused(m),
        Inbound::Closed(Some(LinkError::Io(e)))
            if e.kind() == std::io::ErrorKind::UnexpectedEof =>
        {
            MigrateError::LinkClosed
        }
        Inbound::Closed(Some(e)) => MigrateError::Link(e),
        Inbound::Closed(None) => MigrateError::LinkClosed,
        Inbound::Ready
        | Inbound::CommitAck
        | Inbound::DoneAck
        | Inbound::VmLoaded
        | Inbound::VmResumed => {
            MigrateError::Refused("destination acknowledged out of order".into())
        }
    }
}

/// Replace `path` with `value` as JSON: a temporary file, fsync, rename,
/// fsync of the directory. Any failure is returned: the caller needed it durable.
pub fn write_durably<T: serde::Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    use std::io::Write;
    let body = serde_json::to_vec(value).map_err(std::io::Error::other)?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&body)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    sync_parent(path)
}

fn sync_parent(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => std::fs::File::open(dir)?.sync_all(),
        _ => Ok(()),
    }
}

/// Keeps little unsent data in the link's socket buffer, so the writers
/// (QEMU above all, whose downtime estimate is the rate at which it can write)
/// feel the link's real rate instead of filling megabytes of buffer.
fn limit_unsent(tcp: &TcpStream) {
    use std::os::fd::AsRawFd as _;
    let v: libc::c_int = 128 * 1024;
    // SAFETY: a valid socket and a properly sized option value.
    let rc = unsafe {
        libc::setsockopt(
            tcp.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_NOTSENT_LOWAT,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        tracing::debug!("TCP_NOTSENT_LOWAT: {}", std::io::Error::last_os_error());
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cancel_and_commit_exclude_each_other() {
        let g = CommitGate::default();
        g.begin_commit(|| Ok(())).expect("asks for the commit");
        assert!(!g.try_cancel(), "no cancel once the commit was asked for");
        g.reopen(); // the destination said it did not commit
        assert!(g.try_cancel());
        assert!(
            g.begin_commit(|| Ok(())).is_err(),
            "a cancelled source never asks"
        );
        // a record that fails leaves the gate open
        let g = CommitGate::default();
        assert!(g
            .begin_commit(|| Err(std::io::Error::other("disk full")))
            .is_err());
        assert!(g.try_cancel());
    }

    #[test]
    fn ranges_merge_and_round_to_blocks() {
        let r = block_ranges(10, [(5, 10), (15, 1), (100, 20)], [2, 50]);
        assert_eq!(r, vec![(0, 3), (10, 2), (50, 1)]);
        assert_eq!(block_ranges(10, [], []), vec![]);
    }
}
