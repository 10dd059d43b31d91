//! Destination agent (`migrator receive`): accepts migrations over TLS, writes
//! each disk to `DIR/NAME.img`, and from the commit point serves it over NBD on
//! `DIR/NAME.sock` while the last blocks are still arriving.
//!
//! A VM migration (`VmStart`) also starts the destination QEMU from
//! `DIR/NAME.qemu` (see [`crate::vm::DestVm`]). Its disk is the NBD export,
//! listening from the start so QEMU can open it, but holding writes until
//! the commit point; the memory stream arrives as `Mem` frames on the same
//! link. At `Commit` the disk opens and the VM is resumed. A VM that moved
//! here runs as the agent's child and stops with it.
//!
//! Per-disk state lives in `DIR/NAME.state` (JSON, replaced atomically):
//! `partial` (resumable: the next migration of NAME compares block hashes),
//! `committed` (this copy is the authority, final blocks arriving), `complete`.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::disk::Disk;
use crate::image::Image;
use crate::memrelay;
use crate::nbd::server::serve_unix;
use crate::transport::frame::{block_hash, BlockHash, VERSION};
use crate::transport::tls::{self, Fingerprint, Identity};
use crate::transport::{read_frame, unpack, write_frame, Frame, LinkError};
use crate::vm::DestVm;

#[derive(Debug, Error)]
pub enum AgentError {
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error("{0}")]
    Refused(String),
    #[error("disk I/O at the destination failed: {0}")]
    Io(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiskState {
    Partial,
    Committed,
    Complete,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StateFile {
    state: DiskState,
    size: u64,
    block_size: u32,
}

pub struct AgentOptions {
    pub dir: PathBuf,
    pub identity: Identity,
    pub peers: Vec<Fingerprint>,
}

/// The agent: sessions in progress and the disks it serves.
pub struct Agent {
    opts: AgentOptions,
    active: Mutex<HashSet<String>>,
    served: Mutex<HashMap<String, Arc<Disk>>>,
    /// VMs that migrated here and run (their QEMU dies with the agent).
    vms: Mutex<HashMap<String, DestVm>>,
}

/// A VM migration in progress at the destination.
struct IncomingVm {
    /// Taken when the VM stays (committed); dropped, QEMU is killed.
    dest: Option<DestVm>,
    disk: Arc<Disk>,
    /// The NBD listener for `disk` (stopped if the migration fails).
    nbd: Option<tokio::task::JoinHandle<()>>,
    /// Whether the peer's `MemEnd` arrived.
    mem_ended: bool,
    /// `Mem`/`MemEnd` frames for the destination QEMU.
    mem: mpsc::Sender<Frame>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl IncomingVm {
    /// Committed: the VM, its export and its stream stay.
    fn keep(mut self) -> Option<DestVm> {
        self.nbd.take();
        self.tasks.clear();
        self.dest.take()
    }
}

impl Drop for IncomingVm {
    fn drop(&mut self) {
        if let Some(nbd) = &self.nbd {
            nbd.abort();
        }
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Agent {
    pub fn new(opts: AgentOptions) -> Arc<Self> {
        Arc::new(Self {
            opts,
            active: Mutex::new(HashSet::new()),
            served: Mutex::new(HashMap::new()),
            vms: Mutex::new(HashMap::new()),
        })
    }

    pub fn socket_path(&self, name: &str) -> PathBuf {
        self.opts.dir.join(format!("{name}.sock"))
    }

    pub fn image_path(&self, name: &str) -> PathBuf {
        self.opts.dir.join(format!("{name}.img"))
    }

    fn state_path(&self, name: &str) -> PathBuf {
        self.opts.dir.join(format!("{name}.state"))
    }

    /// A disk this agent serves (after its commit point).
    pub fn served(&self, name: &str) -> Option<Arc<Disk>> {
        self.served
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    fn read_state(&self, name: &str) -> Option<StateFile> {
        let b = std::fs::read(self.state_path(name)).ok()?;
        serde_json::from_slice(&b).ok()
    }

    fn write_state(&self, name: &str, st: &StateFile) -> Result<(), AgentError> {
        let path = self.state_path(name);
        let tmp = path.with_extension("state.tmp");
        let io = |e: std::io::Error| AgentError::Io(format!("{}: {e}", path.display()));
        let body = serde_json::to_vec(st).map_err(|e| AgentError::Io(e.to_string()))?;
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp).map_err(io)?;
            f.write_all(&body).map_err(io)?;
            f.sync_all().map_err(io)?;
        }
        std::fs::rename(&tmp, &path).map_err(io)?;
        if let Ok(d) = std::fs::File::open(&self.opts.dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    /// Serve disks that completed before a restart.
    pub fn serve_completed(self: &Arc<Self>) -> std::io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&self.opts.dir)? {
            let p = entry?.path();
            let Some(name) = p
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".state"))
            else {
                continue;
            };
            match self.read_state(name) {
                Some(st) if st.state == DiskState::Complete => {
                    let img =
                        Image::open(&self.image_path(name), true).map_err(std::io::Error::other)?;
                    self.start_serving(Arc::new(Disk::new(img, name)))?;
                    names.push(name.to_string());
                }
                Some(st) if st.state == DiskState::Committed => {
                    warn!(disk = name, "committed here but final blocks never arrived; re-run the migration from the source to finish it");
                }
                _ => {}
            }
        }
        Ok(names)
    }

    fn start_serving(&self, disk: Arc<Disk>) -> std::io::Result<()> {
        self.listen(disk.clone())?;
        self.mark_served(disk);
        Ok(())
    }

    fn mark_served(&self, disk: Arc<Disk>) {
        self.served
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(disk.name().to_string(), disk);
    }

    /// Serves `disk` over NBD on `DIR/NAME.sock`.
    fn listen(&self, disk: Arc<Disk>) -> std::io::Result<tokio::task::JoinHandle<()>> {
        let path = self.socket_path(disk.name());
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path)?;
        info!(disk = disk.name(), socket = %path.display(), "serving disk over NBD");
        Ok(tokio::spawn(serve_unix(
            listener,
            disk,
            std::future::pending(),
        )))
    }

    /// `VmStart`: the disk's export (held until commit), the destination
    /// QEMU waiting for the stream, and the tasks that carry it.
    async fn start_vm(
        &self,
        name: &str,
        postcopy: bool,
        out: &mpsc::UnboundedSender<Frame>,
    ) -> Result<IncomingVm, String> {
        let img = Image::open(&self.image_path(name), true).map_err(|e| e.to_string())?;
        let disk = Arc::new(Disk::incoming(img, name));
        let nbd = self
            .listen(disk.clone())
            .map_err(|e| format!("cannot serve {name} over NBD: {e}"))?;
        let mut vm = IncomingVm {
            dest: None,
            disk,
            nbd: Some(nbd),
            mem_ended: false,
            mem: mpsc::channel(1).0,
            tasks: Vec::new(),
        };
        let dest = DestVm::launch(&self.opts.dir, name, &self.socket_path(name), postcopy)
            .await
            .map_err(|e| e.to_string())?;
        let qemu = dest.connect_incoming().await.map_err(|e| e.to_string())?;
        let loaded = dest.loaded();
        vm.dest = Some(dest);
        let (q_rd, q_wr) = qemu.into_split();
        let (mem_tx, mem_rx) = mpsc::channel::<Frame>(16);
        vm.mem = mem_tx;
        let (back_tx, mut back_rx) = mpsc::channel::<Frame>(16);
        let o = out.clone();
        let vm_name = name.to_string();
        vm.tasks.push(tokio::spawn(async move {
            if let Err(e) = memrelay::inbound(mem_rx, q_wr).await {
                warn!(vm = vm_name, "memory stream into QEMU: {e}");
            }
        }));
        vm.tasks.push(tokio::spawn(async move {
            let _ = memrelay::outbound(q_rd, back_tx, false).await;
        }));
        vm.tasks.push(tokio::spawn(async move {
            while let Some(f) = back_rx.recv().await {
                if o.send(f).is_err() {
                    return;
                }
            }
        }));
        let o = out.clone();
        vm.tasks.push(tokio::spawn(async move {
            let _ = o.send(match loaded.await {
                Ok(()) => Frame::VmLoaded,
                Err(e) => Frame::Error {
                    message: format!("the destination VM did not load: {e}"),
                },
            });
        }));
        Ok(vm)
    }

    /// Accept migrations until `shutdown` resolves.
    pub async fn run(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), tls::TlsError> {
        let acceptor = tokio_rustls::TlsAcceptor::from(tls::server_config(
            &self.opts.identity,
            self.opts.peers.clone(),
        )?);
        tokio::pin!(shutdown);
        loop {
            let (tcp, peer) = tokio::select! {
                _ = &mut shutdown => return Ok(()),
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        warn!("accept failed: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            let (agent, acceptor) = (self.clone(), acceptor.clone());
            tokio::spawn(async move {
                let stream = match acceptor.accept(tcp).await {
                    Ok(s) => s,
                    Err(e) => {
                        warn!(%peer, "rejected connection: TLS handshake failed: {e}");
                        return;
                    }
                };
                match agent.session(stream).await {
                    Ok(Some(name)) => info!(%peer, disk = name, "migration complete"),
                    Ok(None) => {
                        info!(%peer, "peer closed the link before the commit point; partial copy kept for resume")
                    }
                    Err(e) => warn!(%peer, "migration session failed: {e}"),
                }
            });
        }
    }

    /// One migration session. Returns the disk name when it completed.
    pub async fn session<S>(self: &Arc<Self>, stream: S) -> Result<Option<String>, AgentError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (mut rd, mut wr) = tokio::io::split(stream);
        let hello = read_frame(&mut rd).await?;
        let (name, size, bs) = match self.check_hello(hello) {
            Ok(x) => x,
            Err(msg) => {
                let _ = write_frame(
                    &mut wr,
                    &Frame::Error {
                        message: msg.clone(),
                    },
                )
                .await;
                let _ = wr.shutdown().await;
                return Err(AgentError::Refused(msg));
            }
        };
        // One session per disk name at a time.
        if !self
            .active
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.clone())
        {
            let msg = format!("a migration of {name} is already in progress here");
            let _ = write_frame(
                &mut wr,
                &Frame::Error {
                    message: msg.clone(),
                },
            )
            .await;
            return Err(AgentError::Refused(msg));
        }
        let _active = ActiveGuard(self.clone(), name.clone());
        let result = self.receive(&mut rd, wr, &name, size, bs).await;
        result.map(|done| done.then_some(name))
    }

    fn check_hello(&self, hello: Option<Frame>) -> Result<(String, u64, u32), String> {
        let Some(Frame::Hello {
            version,
            name,
            size,
            block_size,
        }) = hello
        else {
            return Err("expected Hello".into());
        };
        if version != VERSION {
            return Err(format!("protocol version {version} not supported (this agent speaks {VERSION}); run the same migrator version on both sides"));
        }
        let valid_name = !name.is_empty()
            && name.len() <= 64
            && !name.starts_with('.')
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
        if !valid_name {
            return Err(format!(
                "disk name {name:?} is not allowed (use 1-64 of A-Z a-z 0-9 . _ -)"
            ));
        }
        if !block_size.is_power_of_two()
            || !(4096..=crate::transport::frame::MAX_BLOCK).contains(&block_size)
        {
            return Err(format!(
                "block size {block_size} must be a power of two between 4 KiB and 16 MiB"
            ));
        }
        if let Some(st) = self.read_state(&name) {
            if st.state != DiskState::Partial {
                return Err(format!(
                    "disk {name} has already been migrated here ({}); remove it there to migrate it again",
                    self.image_path(&name).display()
                ));
            }
        }
        let have = self
            .image_path(&name)
            .metadata()
            .map(|m| m.len())
            .unwrap_or(0);
        if let Some(free) = free_bytes(&self.opts.dir) {
            if size.saturating_sub(have) > free {
                return Err(format!(
                    "not enough room in {}: the disk needs {size} bytes, {free} are free",
                    self.opts.dir.display()
                ));
            }
        }
        Ok((name, size, block_size))
    }

    async fn receive<R, W>(
        self: &Arc<Self>,
        rd: &mut R,
        wr: W,
        name: &str,
        size: u64,
        block_size: u32,
    ) -> Result<bool, AgentError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let bs = block_size as u64;
        let path = self.image_path(name);
        let resumable = matches!(self.read_state(name), Some(st) if st.state == DiskState::Partial && st.size == size && st.block_size == block_size);
        if !resumable {
            let _ = std::fs::remove_file(&path);
        }
        let io = |e: crate::image::ImageError| AgentError::Io(e.to_string());
        let image = Arc::new(Image::create(&path, size).map_err(io)?);
        self.write_state(
            name,
            &StateFile {
                state: DiskState::Partial,
                size,
                block_size,
            },
        )?;

        // Outgoing frames go through one writer task (replies and Fetch requests).
        let (out_tx, mut out_rx) = mpsc::unbounded_channel::<Frame>();
        let writer = tokio::spawn(async move {
            let mut wr = wr;
            while let Some(f) = out_rx.recv().await {
                if write_frame(&mut wr, &f).await.is_err() {
                    return;
                }
                if out_rx.is_empty() && wr.flush().await.is_err() {
                    return;
                }
            }
            let _ = wr.shutdown().await;
        });

        if resumable {
            let img = image.clone();
            let hashes = tokio::task::spawn_blocking(move || block_hashes(&img, bs))
                .await
                .map_err(|e| AgentError::Io(e.to_string()))?
                .map_err(io)?;
            info!(
                disk = name,
                blocks = hashes.len(),
                "resuming from a partial copy"
            );
            for batch in hashes.chunks(500_000) {
                let _ = out_tx.send(Frame::Hashes(batch.to_vec()));
            }
        }
        let _ = out_tx.send(Frame::Welcome);

        let mut disk: Option<Arc<Disk>> = None;
        let mut prepared: Option<HashSet<u64>> = None;
        let mut vm: Option<IncomingVm> = None;
        let mut flusher = Flusher::default();
        // Done handled; a VM's memory stream may still be running (post-copy).
        let mut complete = false;
        let result = loop {
            let frame = match read_frame(rd).await {
                Ok(Some(f)) => f,
                Ok(None) if complete => break Ok(true),
                Ok(None) => match &disk {
                    None => break Ok(false),
                    Some(d) => {
                        break Err(AgentError::Refused(format!(
                            "link closed after the commit point with {} blocks still pending; \
                             reads of them wait until the migration is re-run from the source",
                            d.pending_blocks()
                        )))
                    }
                },
                Err(e) => break Err(AgentError::Link(e)),
            };
            match frame {
                Frame::Data {
                    offset,
                    compressed,
                    raw_len,
                    payload,
                } => {
                    if offset.checked_add(raw_len as u64).is_none_or(|e| e > size) {
                        break Err(self.refuse(
                            &out_tx,
                            format!(
                                "block at {offset} (+{raw_len}) is beyond the {size}-byte disk"
                            ),
                        ));
                    }
                    let data = match unpack(offset, compressed, raw_len, payload) {
                        Ok(d) => d,
                        Err(e) => break Err(self.refuse(&out_tx, e.to_string())),
                    };
                    if let Err(e) =
                        land(&image, disk.as_deref(), bs, offset, Landing::Data(data)).await
                    {
                        break Err(e);
                    }
                    flusher.landed(&image, raw_len as u64);
                }
                Frame::Zero { offset, len } => {
                    if offset.checked_add(len).is_none_or(|e| e > size) {
                        break Err(self.refuse(
                            &out_tx,
                            format!("zero extent at {offset} (+{len}) is beyond the disk"),
                        ));
                    }
                    if let Err(e) =
                        land(&image, disk.as_deref(), bs, offset, Landing::Zero(len)).await
                    {
                        break Err(e);
                    }
                }
                Frame::VmStart { postcopy } if vm.is_none() && disk.is_none() => {
                    match self.start_vm(name, postcopy, &out_tx).await {
                        Ok(v) => {
                            vm = Some(v);
                            let _ = out_tx.send(Frame::VmReady);
                        }
                        Err(e) => break Err(self.refuse(&out_tx, e)),
                    }
                }
                f @ (Frame::Mem { .. } | Frame::MemEnd) => {
                    let Some(v) = &mut vm else {
                        break Err(self.refuse(&out_tx, "memory stream without VmStart".into()));
                    };
                    let end = matches!(f, Frame::MemEnd);
                    // a closed channel: QEMU's end has gone, its load task reports why
                    let _ = v.mem.send(f).await;
                    if end {
                        v.mem_ended = true;
                        if complete {
                            break Ok(true);
                        }
                    }
                }
                Frame::Prepare { blocks } if disk.is_none() => {
                    let nblocks = size.div_ceil(bs);
                    if let Some(b) = blocks.iter().find(|&&b| b >= nblocks) {
                        break Err(self
                            .refuse(&out_tx, format!("prepare names block {b} beyond the disk")));
                    }
                    let img = image.clone();
                    if let Err(e) = tokio::task::spawn_blocking(move || img.sync())
                        .await
                        .map_err(|e| AgentError::Io(e.to_string()))
                        .and_then(|r| r.map_err(io))
                    {
                        break Err(e);
                    }
                    prepared = Some(blocks.into_iter().collect());
                    let _ = out_tx.send(Frame::Ready);
                }
                Frame::Commit => {
                    let Some(pending) = prepared.take() else {
                        break Err(self.refuse(&out_tx, "commit before prepare".into()));
                    };
                    if let Err(e) = self.write_state(
                        name,
                        &StateFile {
                            state: DiskState::Committed,
                            size,
                            block_size,
                        },
                    ) {
                        break Err(e);
                    }
                    // The commit point at the destination: serve from now on.
                    let (fetch_tx, mut fetch_rx) = mpsc::unbounded_channel::<u64>();
                    let d = match &vm {
                        Some(v) => {
                            v.disk.open_receiving(block_size, pending, fetch_tx);
                            self.mark_served(v.disk.clone());
                            // Not awaited here: during post-copy the VM's state
                            // still arrives through this loop.
                            if let Some((resume, stopped)) =
                                v.dest.as_ref().map(|d| (d.resume(), d.stopped()))
                            {
                                let (out, vm_name) = (out_tx.clone(), name.to_string());
                                tokio::spawn(async move {
                                    match resume.await {
                                        Ok(()) => {
                                            info!(vm = vm_name, "VM resumed at the destination");
                                            let _ = out.send(Frame::VmResumed);
                                            // the guest is ours now: say when it stops
                                            let (alarm, what) = stopped.await;
                                            if alarm {
                                                warn!(
                                                    vm = vm_name,
                                                    "the VM stopped at the destination: {what}"
                                                );
                                            } else {
                                                info!(
                                                    vm = vm_name,
                                                    "the VM stopped at the destination: {what}"
                                                );
                                            }
                                        }
                                        // committed: the disk is served here; say so loudly
                                        Err(e) => warn!(
                                            vm = vm_name,
                                            "cannot resume the VM after commit: {e}"
                                        ),
                                    }
                                });
                            }
                            v.disk.clone()
                        }
                        None => {
                            let img = match Image::open(&path, true) {
                                Ok(i) => i,
                                Err(e) => break Err(io(e)),
                            };
                            let d =
                                Arc::new(Disk::receiving(img, name, block_size, pending, fetch_tx));
                            if let Err(e) = self.start_serving(d.clone()) {
                                break Err(AgentError::Io(format!(
                                    "cannot serve {name} over NBD: {e}"
                                )));
                            }
                            d
                        }
                    };
                    let out = out_tx.clone();
                    tokio::spawn(async move {
                        while let Some(block) = fetch_rx.recv().await {
                            if out.send(Frame::Fetch { block }).is_err() {
                                return;
                            }
                        }
                    });
                    disk = Some(d);
                }
                Frame::Done if disk.is_some() && !complete => {
                    if let Some(d) = disk.clone() {
                        if d.pending_blocks() != 0 {
                            break Err(self.refuse(
                                &out_tx,
                                format!("Done with {} blocks still pending", d.pending_blocks()),
                            ));
                        }
                        d.finish_receiving();
                    }
                    let img = image.clone();
                    let _ = tokio::task::spawn_blocking(move || img.sync()).await;
                    if let Err(e) = self.write_state(
                        name,
                        &StateFile {
                            state: DiskState::Complete,
                            size,
                            block_size,
                        },
                    ) {
                        break Err(e);
                    }
                    let _ = out_tx.send(Frame::DoneAck);
                    complete = true;
                    if vm.as_ref().is_none_or(|v| v.mem_ended) {
                        break Ok(true);
                    }
                }
                Frame::Error { message } => {
                    break Err(AgentError::Refused(format!("source aborted: {message}")))
                }
                other => break Err(self.refuse(&out_tx, format!("unexpected frame {other:?}"))),
            }
        };
        drop(out_tx);
        if let Some(v) = vm {
            if disk.is_some() {
                // committed: the VM lives here now, whatever happens to the link
                if let Some(dest) = v.keep() {
                    self.vms
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(name.to_string(), dest);
                }
            } else {
                warn!(
                    vm = name,
                    "migration ended before the commit point: stopping the destination VM"
                );
                drop(v);
                let _ = std::fs::remove_file(self.socket_path(name));
            }
        }
        if result.is_err() || matches!(result, Ok(false)) {
            writer.abort();
        } else {
            let _ = writer.await;
        }
        result
    }

    fn refuse(&self, out: &mpsc::UnboundedSender<Frame>, message: String) -> AgentError {
        let _ = out.send(Frame::Error {
            message: message.clone(),
        });
        AgentError::Refused(message)
    }
}

struct ActiveGuard(Arc<Agent>, String);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0
            .active
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.1);
    }
}

/// Writes the image back in the background as blocks land, so the fsync
/// at `Prepare` (inside the switchover's pause) finds little left to do.
#[derive(Default)]
struct Flusher {
    unsynced: u64,
    in_flight: Option<tokio::task::JoinHandle<()>>,
}

impl Flusher {
    const EVERY: u64 = 32 << 20;

    fn landed(&mut self, image: &Arc<Image>, bytes: u64) {
        self.unsynced += bytes;
        if self.unsynced < Self::EVERY || self.in_flight.as_ref().is_some_and(|t| !t.is_finished())
        {
            return;
        }
        self.unsynced = 0;
        let img = image.clone();
        self.in_flight = Some(tokio::task::spawn_blocking(move || {
            if let Err(e) = img.sync() {
                warn!("background flush of the image failed: {e} (the fsync at Prepare will report it)");
            }
        }));
    }
}

enum Landing {
    Data(Vec<u8>),
    Zero(u64),
}

/// Apply a Data or Zero frame. After commit (`disk` is set) only blocks still
/// pending are written: a guest write may have replaced a block since.
async fn land(
    image: &Arc<Image>,
    disk: Option<&Disk>,
    bs: u64,
    offset: u64,
    what: Landing,
) -> Result<(), AgentError> {
    let io = |e: String| AgentError::Io(e);
    let len = match &what {
        Landing::Data(d) => d.len() as u64,
        Landing::Zero(l) => *l,
    };
    let Some(disk) = disk else {
        let img = image.clone();
        return tokio::task::spawn_blocking(move || match what {
            Landing::Data(d) => img.write_at(&d, offset),
            Landing::Zero(l) => img.zero(offset, l, true),
        })
        .await
        .map_err(|e| io(e.to_string()))?
        .map_err(|e| io(e.to_string()));
    };
    if len == 0 {
        return Ok(());
    }
    for b in offset / bs..=(offset + len - 1) / bs {
        if !disk.begin_landing(b) {
            continue;
        }
        let from = (b * bs).max(offset);
        let to = ((b + 1) * bs).min(offset + len);
        let img = disk.image().clone();
        let part = match &what {
            Landing::Data(d) => Some(d[(from - offset) as usize..(to - offset) as usize].to_vec()),
            Landing::Zero(_) => None,
        };
        let r = tokio::task::spawn_blocking(move || match part {
            Some(p) => img.write_at(&p, from),
            None => img.zero(from, to - from, true),
        })
        .await;
        disk.end_landing(b);
        r.map_err(|e| io(e.to_string()))?
            .map_err(|e| io(e.to_string()))?;
    }
    Ok(())
}

/// Hashes of the allocated blocks of a partial copy.
fn block_hashes(img: &Image, bs: u64) -> Result<Vec<(u64, BlockHash)>, crate::image::ImageError> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; bs as usize];
    let mut last = None;
    for e in img.extents(0, img.size())?.into_iter().filter(|e| !e.hole) {
        for b in e.offset / bs..(e.offset + e.len).div_ceil(bs) {
            if last == Some(b) {
                continue;
            }
            last = Some(b);
            let off = b * bs;
            let n = bs.min(img.size() - off) as usize;
            img.read_at(&mut buf[..n], off)?;
            out.push((b, block_hash(&buf[..n])));
        }
    }
    Ok(out)
}

fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid NUL-terminated path and a properly sized out-struct.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    (rc == 0).then(|| st.f_bavail as u64 * st.f_frsize as u64)
}
