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
//! `committed` (this copy is the authority, final blocks arriving), `complete`
//! (the authority: the disk runs here). A node that sends a disk on records
//! `in_doubt` before its `Commit` and `moved` once the destination holds
//! every block; a moved copy stays as the base for the disk's return, when
//! only blocks whose hashes differ travel.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::disk::{Disk, Journal};
use crate::failpoint;
use crate::image::Image;
use crate::memrelay;
use crate::nbd::server::serve_unix;
use crate::transport::frame::{block_hash, BlockHash, LinkState, VERSION};
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
    /// Sent on; asked `to` to commit and has not heard what it decided.
    InDoubt,
    /// Sent on to `to`, which is the authority.
    Moved,
}

impl std::fmt::Display for DiskState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DiskState::Partial => "partial",
            DiskState::Committed => "committed",
            DiskState::Complete => "complete",
            DiskState::InDoubt => "in doubt",
            DiskState::Moved => "moved",
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StateFile {
    pub state: DiskState,
    pub size: u64,
    pub block_size: u32,
    /// With `in_doubt` and `moved`: the destination.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// With `committed`: the blocks still to come at the commit (those in
    /// `NAME.landed` have come since).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<Vec<u64>>,
}

pub struct AgentOptions {
    pub dir: PathBuf,
    pub identity: Identity,
    pub peers: Vec<Fingerprint>,
}

/// The agent: sessions in progress and the disks it serves.
pub struct Agent {
    opts: AgentOptions,
    /// The link that currently speaks for each disk. A newer link for the
    /// same disk (a retry, a source asking what was decided) fences the
    /// older one: from then on it can no longer commit.
    active: Mutex<HashMap<String, Slot>>,
    served: Mutex<HashMap<String, Arc<Disk>>>,
    /// VMs that migrated here and run (their QEMU dies with the agent).
    vms: Mutex<HashMap<String, DestVm>>,
    /// The NBD listener of each served disk.
    nbd: Mutex<HashMap<String, tokio::task::JoinHandle<()>>>,
    /// Told the name of each disk a resumed link completed while no VM of
    /// it runs here (its QEMU died with this process after the commit).
    resumed: Mutex<Option<mpsc::UnboundedSender<String>>>,
}

/// A session's hold on a disk name.
#[derive(Clone, Default)]
struct Slot {
    id: u64,
    fenced: Arc<std::sync::atomic::AtomicBool>,
    cancel: Arc<tokio::sync::Notify>,
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
    fn keep(mut self, agent: &Agent) -> Option<DestVm> {
        if let Some(h) = self.nbd.take() {
            agent.keep_listener(self.disk.name(), h);
        }
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
            active: Mutex::new(HashMap::new()),
            served: Mutex::new(HashMap::new()),
            vms: Mutex::new(HashMap::new()),
            nbd: Mutex::new(HashMap::new()),
            resumed: Mutex::new(None),
        })
    }

    pub fn socket_path(&self, name: &str) -> PathBuf {
        self.opts.dir.join(format!("{name}.sock"))
    }

    pub fn image_path(&self, name: &str) -> PathBuf {
        self.opts.dir.join(format!("{name}.img"))
    }

    fn journal_path(&self, name: &str) -> PathBuf {
        self.opts.dir.join(format!("{name}.landed"))
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

    /// The durable state of `name` here, if any.
    pub fn read_state(&self, name: &str) -> Option<StateFile> {
        let b = std::fs::read(self.state_path(name)).ok()?;
        serde_json::from_slice(&b).ok()
    }

    /// Replaces the state of `name`, durably (fsync of file and directory).
    pub fn write_state(&self, name: &str, st: &StateFile) -> Result<(), AgentError> {
        let path = self.state_path(name);
        crate::source::write_durably(&path, st)
            .map_err(|e| AgentError::Io(format!("{}: {e}", path.display())))
    }

    /// Every disk this directory knows, with its state, sorted by name.
    pub fn states(&self) -> Vec<(String, StateFile)> {
        self.try_states().unwrap_or_default()
    }

    fn try_states(&self) -> std::io::Result<Vec<(String, StateFile)>> {
        Ok(names_with_suffix(&self.opts.dir, ".state")?
            .into_iter()
            .filter_map(|n| self.read_state(&n).map(|st| (n, st)))
            .collect())
    }

    /// The directory this agent keeps its disks in.
    pub fn dir(&self) -> &Path {
        &self.opts.dir
    }

    /// A VM that runs here (arrived by migration, or started here).
    pub fn vm(&self, name: &str) -> Option<std::sync::Arc<crate::qmp::Qmp>> {
        self.vms
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .map(|v| v.qmp())
    }

    /// Where to say that a resumed link completed a disk whose VM does not
    /// run here (so its owner can start it).
    pub fn on_resumed_without_vm(&self, tx: mpsc::UnboundedSender<String>) {
        *self.resumed.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
    }

    /// Registers a VM started here, so it can be moved on.
    pub fn adopt_vm(&self, name: &str, vm: DestVm) {
        self.vms
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string(), vm);
    }

    /// The disk left: no longer served here, and its VM (whose QEMU has
    /// quit) is forgotten.
    pub fn forget(&self, name: &str) {
        self.served
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        if let Some(h) = self
            .nbd
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name)
        {
            h.abort();
        }
        let _ = std::fs::remove_file(self.socket_path(name));
        let vm = self
            .vms
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        if let Some(vm) = vm {
            // its QEMU has quit (or is told to): reap it, leave no zombie
            tokio::spawn(vm.reap());
        }
    }

    /// Serve disks that completed before a restart.
    pub fn serve_completed(self: &Arc<Self>) -> std::io::Result<Vec<String>> {
        let mut names = Vec::new();
        for (name, st) in self.try_states()? {
            match st.state {
                DiskState::Complete => {
                    let img = Image::open(&self.image_path(&name), true)
                        .map_err(std::io::Error::other)?;
                    self.start_serving(Arc::new(Disk::new(img, &name)))?;
                    names.push(name);
                }
                DiskState::Committed => {
                    self.reopen_committed(&name, &st)?;
                    names.push(name);
                }
                _ => {}
            }
        }
        Ok(names)
    }

    /// A disk committed here before a restart, its last blocks not all in:
    /// served again with what is still pending (the commit's set less the
    /// journal), waiting for its source to resume them.
    fn reopen_committed(&self, name: &str, st: &StateFile) -> std::io::Result<()> {
        let img = Image::open(&self.image_path(name), true).map_err(std::io::Error::other)?;
        let (journal, done) = Journal::open(&self.journal_path(name))?;
        let pending: HashSet<u64> = st
            .pending
            .iter()
            .flatten()
            .copied()
            .filter(|b| !done.contains(b))
            .collect();
        warn!(
            disk = name,
            pending = pending.len(),
            "committed here before a restart: serving it; reads of blocks still pending wait for its source to resume"
        );
        let disk = Arc::new(Disk::new(img, name));
        // no link yet: on-demand requests wait for the source's `Query`
        let (fetch, _) = mpsc::unbounded_channel();
        disk.open_receiving(st.block_size, pending, fetch, Some(journal));
        self.start_serving(disk)
    }

    pub fn start_serving(&self, disk: Arc<Disk>) -> std::io::Result<()> {
        let h = self.listen(disk.clone())?;
        self.keep_listener(disk.name(), h);
        self.mark_served(disk);
        Ok(())
    }

    fn keep_listener(&self, name: &str, h: tokio::task::JoinHandle<()>) {
        if let Some(old) = self
            .nbd
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string(), h)
        {
            old.abort();
        }
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
            crate::transport::detect_silence(&tcp);
            let (agent, acceptor) = (self.clone(), acceptor.clone());
            tokio::spawn(async move {
                let accepted =
                    tokio::time::timeout(std::time::Duration::from_secs(10), acceptor.accept(tcp))
                        .await;
                let stream = match accepted {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        warn!(%peer, "rejected connection: TLS handshake failed: {e}");
                        return;
                    }
                    Err(_) => {
                        warn!(%peer, "rejected connection: no TLS handshake within 10 s");
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
        let first =
            match tokio::time::timeout(std::time::Duration::from_secs(30), read_frame(&mut rd))
                .await
            {
                Ok(r) => r?,
                Err(_) => return Err(AgentError::Refused("no Hello within 30 s".into())),
            };
        if let Some(Frame::Query { version, name }) = first {
            return self.answer_query(rd, wr, version, name).await;
        }
        let (name, size, bs) = match self.check_hello(first) {
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
        // A newer link for the disk supersedes an older one (a source that
        // retries after a silent link).
        let (slot, _active) = self.take_slot(&name).await;
        let result = self
            .receive(&mut rd, wr, &name, Begin::Hello { size, bs }, &slot)
            .await;
        result.map(|done| done.then_some(name))
    }

    /// Fences and cancels any session of `name`, waits for it to end, and
    /// takes its place.
    async fn take_slot(self: &Arc<Self>, name: &str) -> (Slot, ActiveGuard) {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            {
                let mut active = self.active.lock().unwrap_or_else(|p| p.into_inner());
                match active.get(name) {
                    Some(old) if tokio::time::Instant::now() < deadline => {
                        old.fenced.store(true, std::sync::atomic::Ordering::SeqCst);
                        old.cancel.notify_one();
                    }
                    _ => {
                        static NEXT: std::sync::atomic::AtomicU64 =
                            std::sync::atomic::AtomicU64::new(1);
                        let slot = Slot {
                            id: NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                            ..Slot::default()
                        };
                        if let Some(old) = active.insert(name.to_string(), slot.clone()) {
                            warn!(disk = name, "an older session did not end in 10 s; it is fenced and can no longer commit");
                            old.fenced.store(true, std::sync::atomic::Ordering::SeqCst);
                        }
                        return (
                            slot.clone(),
                            ActiveGuard(self.clone(), name.to_string(), slot.id),
                        );
                    }
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// `Query`: a source asks what this destination decided about `name`.
    /// Any session of `name` is fenced first, so the answer stays true: a
    /// link that was only silent can no longer commit after it.
    async fn answer_query<R, W>(
        self: &Arc<Self>,
        mut rd: R,
        mut wr: W,
        version: u16,
        name: String,
    ) -> Result<Option<String>, AgentError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let check = if version != VERSION {
            Err(format!("protocol version {version} not supported (this agent speaks {VERSION}); run the same migrator version on both sides"))
        } else {
            check_name(&name)
        };
        if let Err(msg) = check {
            say_and_close(
                &mut wr,
                Frame::Error {
                    message: msg.clone(),
                },
            )
            .await;
            return Err(AgentError::Refused(msg));
        }
        let (slot, _active) = self.take_slot(&name).await;
        let state = self.read_state(&name).map(|s| s.state);
        let answer = |state| Frame::State {
            state,
            pending: Vec::new(),
        };
        match (state, self.served(&name)) {
            (Some(DiskState::Committed), Some(d)) => {
                info!(
                    disk = name,
                    pending = d.pending_blocks(),
                    "a source resumes the final blocks"
                );
                let r = self
                    .receive(&mut rd, wr, &name, Begin::Resume(d), &slot)
                    .await;
                if matches!(r, Ok(true)) && self.vm(&name).is_none() {
                    if let Some(tx) = &*self.resumed.lock().unwrap_or_else(|p| p.into_inner()) {
                        let _ = tx.send(name.clone());
                    }
                }
                r.map(|done| done.then_some(name))
            }
            (Some(DiskState::Committed), None) => {
                let msg = format!(
                    "{name} was committed here, but this agent restarted before its last blocks arrived; \
                     its copy is not served (finishing it after a restart is not supported yet)"
                );
                say_and_close(
                    &mut wr,
                    Frame::Error {
                        message: msg.clone(),
                    },
                )
                .await;
                Err(AgentError::Refused(msg))
            }
            (Some(DiskState::Complete), _) => {
                say_and_close(&mut wr, answer(LinkState::Complete)).await;
                Ok(None)
            }
            _ => {
                say_and_close(&mut wr, answer(LinkState::None)).await;
                Ok(None)
            }
        }
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
        check_name(&name)?;
        if !block_size.is_power_of_two()
            || !(4096..=crate::transport::frame::MAX_BLOCK).contains(&block_size)
        {
            return Err(format!(
                "block size {block_size} must be a power of two between 4 KiB and 16 MiB"
            ));
        }
        match self.read_state(&name).map(|s| s.state) {
            None | Some(DiskState::Partial | DiskState::Moved) => {}
            Some(DiskState::Committed | DiskState::Complete) => {
                return Err(format!(
                    "{name} runs here already ({}); nothing to migrate",
                    self.image_path(&name).display()
                ))
            }
            Some(DiskState::InDoubt) => {
                return Err(format!(
                    "{name} was being sent on from here and it is not yet known whether its destination took over; \
                     it cannot come back before that is settled"
                ))
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
        begin: Begin,
        slot: &Slot,
    ) -> Result<bool, AgentError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let path = self.image_path(name);
        let io = |e: crate::image::ImageError| AgentError::Io(e.to_string());

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

        let mut disk: Option<Arc<Disk>> = None;
        let (size, block_size, image) = match begin {
            Begin::Hello {
                size,
                bs: block_size,
            } => {
                let bs = block_size as u64;
                // a partial copy, or this disk's copy from before it left
                let resumable = matches!(self.read_state(name), Some(st) if matches!(st.state, DiskState::Partial | DiskState::Moved) && st.size == size && st.block_size == block_size);
                if !resumable {
                    let _ = std::fs::remove_file(&path);
                }
                let image = Arc::new(Image::create(&path, size).map_err(io)?);
                self.write_state(
                    name,
                    &StateFile {
                        state: DiskState::Partial,
                        size,
                        block_size,
                        to: None,
                        pending: None,
                    },
                )?;
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
                (size, block_size, image)
            }
            Begin::Resume(d) => {
                let st = self
                    .read_state(name)
                    .ok_or_else(|| AgentError::Io(format!("the state of {name} vanished")))?;
                let _ = out_tx.send(Frame::State {
                    state: LinkState::Committed,
                    pending: d.pending_list(),
                });
                let (fetch_tx, fetch_rx) = mpsc::unbounded_channel::<u64>();
                for block in d.reattach_fetch(fetch_tx) {
                    let _ = out_tx.send(Frame::Fetch { block });
                }
                forward_fetches(fetch_rx, out_tx.clone());
                let image = d.image().clone();
                disk = Some(d);
                (st.size, st.block_size, image)
            }
        };
        let bs = block_size as u64;

        let mut prepared: Option<HashSet<u64>> = None;
        let mut vm: Option<IncomingVm> = None;
        let mut flusher = Flusher::default();
        // Done handled; a VM's memory stream may still be running (post-copy).
        let mut complete = false;
        let result = loop {
            let read = tokio::select! {
                r = read_frame(rd) => r,
                _ = slot.cancel.notified() => {
                    break Err(AgentError::Refused("superseded by a newer link for this disk".into()));
                }
            };
            let frame = match read {
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
                    failpoint::hit("dest.data");
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
                        land(&image, disk.as_ref(), bs, offset, Landing::Data(data)).await
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
                        land(&image, disk.as_ref(), bs, offset, Landing::Zero(len)).await
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
                    // Blocks stop being pending into this journal from now on.
                    let journal = match Journal::create(&self.journal_path(name)) {
                        Ok(j) => j,
                        Err(e) => {
                            break Err(AgentError::Io(format!(
                                "cannot create {}: {e}",
                                self.journal_path(name).display()
                            )))
                        }
                    };
                    let mut listed: Vec<u64> = pending.iter().copied().collect();
                    listed.sort_unstable();
                    // The decision: recorded durably unless a newer link has
                    // fenced this one (it may have answered "not committed").
                    let recorded = {
                        let _active = self.active.lock().unwrap_or_else(|p| p.into_inner());
                        if slot.fenced.load(std::sync::atomic::Ordering::SeqCst) {
                            Err(AgentError::Refused(
                                "a newer link for this disk fenced this one before its commit"
                                    .into(),
                            ))
                        } else {
                            self.write_state(
                                name,
                                &StateFile {
                                    state: DiskState::Committed,
                                    size,
                                    block_size,
                                    to: None,
                                    pending: Some(listed),
                                },
                            )
                        }
                    };
                    if let Err(e) = recorded {
                        break Err(e);
                    }
                    failpoint::hit("dest.after_commit_record");
                    let _ = out_tx.send(Frame::CommitAck);
                    // The commit point at the destination: serve from now on.
                    let (fetch_tx, fetch_rx) = mpsc::unbounded_channel::<u64>();
                    let d = match &vm {
                        Some(v) => {
                            v.disk
                                .open_receiving(block_size, pending, fetch_tx, Some(journal));
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
                            let d = Arc::new(Disk::new(img, name));
                            d.open_receiving(block_size, pending, fetch_tx, Some(journal));
                            if let Err(e) = self.start_serving(d.clone()) {
                                break Err(AgentError::Io(format!(
                                    "cannot serve {name} over NBD: {e}"
                                )));
                            }
                            d
                        }
                    };
                    forward_fetches(fetch_rx, out_tx.clone());
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
                            to: None,
                            pending: None,
                        },
                    ) {
                        break Err(e);
                    }
                    let _ = std::fs::remove_file(self.journal_path(name));
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
                if let Some(dest) = v.keep(self) {
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

/// The names of the files in `dir` ending in `suffix`, without it, sorted.
pub fn names_with_suffix(dir: &Path, suffix: &str) -> std::io::Result<Vec<String>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let p = entry?.path();
        if let Some(n) = p
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(suffix))
        {
            out.push(n.to_string());
        }
    }
    out.sort();
    Ok(out)
}

/// Writes one last frame and closes the link.
async fn say_and_close<W: AsyncWrite + Unpin>(wr: &mut W, f: Frame) {
    let _ = write_frame(wr, &f).await;
    let _ = wr.shutdown().await;
}

/// Sends the disk's on-demand requests as `Fetch` frames.
fn forward_fetches(mut fetch_rx: mpsc::UnboundedReceiver<u64>, out: mpsc::UnboundedSender<Frame>) {
    tokio::spawn(async move {
        while let Some(block) = fetch_rx.recv().await {
            if out.send(Frame::Fetch { block }).is_err() {
                return;
            }
        }
    });
}

/// Frees a session's slot (unless a newer session took it meanwhile).
struct ActiveGuard(Arc<Agent>, String, u64);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        let mut active = self.0.active.lock().unwrap_or_else(|p| p.into_inner());
        if active.get(&self.1).is_some_and(|s| s.id == self.2) {
            active.remove(&self.1);
        }
    }
}

/// How a session starts: a new migration (`Hello`), or a source resuming
/// the final blocks of a disk committed here (`Query`).
enum Begin {
    Hello { size: u64, bs: u32 },
    Resume(Arc<Disk>),
}

/// Disk names become file names: 1-64 of `A-Z a-z 0-9 . _ -`, not starting with a dot.
pub fn check_name(name: &str) -> Result<(), String> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if valid {
        Ok(())
    } else {
        Err(format!(
            "disk name {name:?} is not allowed (use 1-64 of A-Z a-z 0-9 . _ -)"
        ))
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
    disk: Option<&Arc<Disk>>,
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
        let d = disk.clone();
        let part = match &what {
            Landing::Data(d) => Some(d[(from - offset) as usize..(to - offset) as usize].to_vec()),
            Landing::Zero(_) => None,
        };
        // written and journaled durably before a guest write may touch it
        let r = tokio::task::spawn_blocking(move || {
            match part {
                Some(p) => d.image().write_at(&p, from),
                None => d.image().zero(from, to - from, true),
            }
            .map_err(|e| e.to_string())?;
            d.record_landed(&[b]).map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r);
        match r {
            Ok(()) => disk.end_landing(b),
            Err(e) => {
                disk.abort_landing(b);
                return Err(io(e));
            }
        }
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
