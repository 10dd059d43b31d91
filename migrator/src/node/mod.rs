//! The node (`migrator node run`): one daemon per host that owns its VMs in
//! every role. It serves their disks, receives VMs from its peers and sends
//! them on, any number of times, in any direction.
//!
//! ```text
//!   migrator status / cancel / set / node migrate
//!        │ control socket (api.rs: one JSON request, JSON replies)
//!        ▼
//!   Node ── Agent (agent.rs): the link's listener; receives a disk (and its
//!    │        VM) into DIR/NAME.img; serves every disk that runs here on
//!    │        DIR/NAME.sock; keeps the QEMU of every VM that arrived
//!    └── source::migrate: sends a disk (and its VM) to a [peer.NAME]
//!
//!   DIR/NAME.state: complete (runs here) · moved{to} · partial · committed ·
//!                   in_doubt{to}: where each VM runs is this, durably
//! ```
//!
//! At start the node adopts every `DIR/NAME.img` without a state (it runs
//! here from now on), serves the disks that run here, and settles each disk
//! that was in doubt when it stopped: it asks the peer it was sent to what
//! that peer decided, and serves the disk again only if the peer never
//! committed. A moved copy stays as the base for the VM's return, so coming
//! back moves only the blocks that changed meanwhile.
//!
//! The commit belongs to the destination (see `transport`): the source
//! records `in_doubt` before it asks, and a cancel is refused from then on.

pub mod api;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Deserialize;
use thiserror::Error;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, UnixListener, UnixStream};
use tokio::sync::{mpsc, Notify};
use tracing::{info, warn};

use crate::agent::{check_name, names_with_suffix, Agent, AgentOptions, DiskState, StateFile};
use crate::args::{check_rate, mbit_to_bytes, Tuning, TuningError};
use crate::disk::Disk;
use crate::events::{Event, EventSink, Summary};
use crate::image::Image;
use crate::precopy;
use crate::source::{self, CommitGate, Ledger, Live, MigrateError, Settled};
use crate::transport::tls::{parse_fingerprint, Fingerprint, Identity, TlsError};
use crate::vm::DestVm;
use api::{JobStatus, NodeStatus, Reply, Request, VmStatus};

/// `node.toml`.
///
/// ```toml
/// name = "siteA"                      # this node, as its peers call it
/// dir = "/var/lib/migrator"           # images, their state, NBD sockets, launch files
/// listen = "0.0.0.0:7800"             # the migration link
/// identity = "/etc/migrator/key"      # `migrator keygen --dir`
/// control = "/run/migrator/node.sock" # default: DIR/node.sock
/// reconnect_s = 60                    # after a break at the commit, keep asking this long
///
/// [peer.siteB]                        # nodes this one sends to and receives from
/// addr = "10.0.0.2:7800"
/// fingerprint = "ab12…"               # its key, pinned
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    pub name: String,
    pub dir: PathBuf,
    pub listen: String,
    pub identity: PathBuf,
    #[serde(default)]
    pub control: Option<PathBuf>,
    #[serde(default = "default_reconnect_s")]
    pub reconnect_s: u64,
    #[serde(default)]
    pub peer: BTreeMap<String, PeerConfig>,
}

fn default_reconnect_s() -> u64 {
    60
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    pub addr: String,
    pub fingerprint: String,
}

#[derive(Debug, Error)]
pub enum NodeError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a valid node.toml: {source}")]
    Config {
        path: PathBuf,
        #[source]
        source: Box<toml::de::Error>,
    },
    #[error("peer {peer}: bad fingerprint: {source}")]
    Fingerprint {
        peer: String,
        #[source]
        source: TlsError,
    },
    #[error("cannot load this node's key from {path}: {source} (create one with `migrator keygen --dir {path}`)")]
    Key {
        path: PathBuf,
        #[source]
        source: TlsError,
    },
    #[error("cannot use {path}: {source}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no peer named {name} in this node's config (known: {known})")]
    UnknownPeer { name: String, known: String },
    #[error("{0}")]
    NotHere(String),
    #[error("{vm} is already being migrated (to {to}); `migrator cancel {vm}` stops it")]
    Busy { vm: String, to: String },
    #[error("no migration of {0} is running here")]
    NoMigration(String),
    #[error("the migration of {0} is past its commit point: it finishes at the destination")]
    PastCommit(String),
    #[error(transparent)]
    Tuning(#[from] TuningError),
    #[error("cancelled before the commit point; the VM keeps running here")]
    Cancelled,
    #[error(transparent)]
    Migrate(#[from] MigrateError),
    #[error("cannot record {vm}'s state: {source}")]
    State {
        vm: String,
        #[source]
        source: crate::agent::AgentError,
    },
    #[error("VM {vm}: {detail}")]
    Qmp { vm: String, detail: String },
}

impl NodeConfig {
    pub fn load(path: &Path) -> Result<Self, NodeError> {
        let text = std::fs::read_to_string(path).map_err(|source| NodeError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut c: NodeConfig = toml::from_str(&text).map_err(|source| NodeError::Config {
            path: path.to_path_buf(),
            source: Box::new(source),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [Some(&mut c.dir), Some(&mut c.identity), c.control.as_mut()]
            .into_iter()
            .flatten()
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        Ok(c)
    }

    pub fn control_path(&self) -> PathBuf {
        self.control
            .clone()
            .unwrap_or_else(|| self.dir.join("node.sock"))
    }
}

/// A migration this node is sending.
struct Job {
    to: String,
    started: Instant,
    live: Arc<Live>,
    disk: Arc<Disk>,
    gate: CommitGate,
    cancel: Notify,
    status: Mutex<JobStatus>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub struct Node {
    cfg: NodeConfig,
    identity: Identity,
    peers: BTreeMap<String, (String, Fingerprint)>,
    agent: Arc<Agent>,
    jobs: Mutex<HashMap<String, Arc<Job>>>,
}

/// The node's record of a disk it sends: its state file.
struct NodeLedger {
    agent: Arc<Agent>,
    vm: String,
    size: u64,
    block_size: u32,
    /// The peer's name (the record outlives its address).
    to: String,
    job: Option<Arc<Job>>,
}

impl NodeLedger {
    fn write(&self, state: DiskState, to: Option<String>) -> std::io::Result<()> {
        self.agent
            .write_state(
                &self.vm,
                &StateFile {
                    state,
                    size: self.size,
                    block_size: self.block_size,
                    to,
                    pending: None,
                },
            )
            .map_err(std::io::Error::other)
    }
}

impl Ledger for NodeLedger {
    fn in_doubt(&self, _addr: &str) -> std::io::Result<()> {
        let record = || self.write(DiskState::InDoubt, Some(self.to.clone()));
        match &self.job {
            Some(j) => j.gate.begin_commit(record),
            None => record(),
        }
    }

    fn moved(&self, _addr: &str) -> std::io::Result<()> {
        self.write(DiskState::Moved, Some(self.to.clone()))
    }

    fn rolled_back(&self) -> std::io::Result<()> {
        self.write(DiskState::Complete, None)?;
        if let Some(j) = &self.job {
            j.gate.reopen();
        }
        Ok(())
    }
}

impl Node {
    /// Loads the key, adopts new images, serves the disks that run here and
    /// starts settling the ones in doubt.
    pub async fn start(cfg: NodeConfig) -> Result<Arc<Self>, NodeError> {
        std::fs::create_dir_all(&cfg.dir).map_err(|source| NodeError::Dir {
            path: cfg.dir.clone(),
            source,
        })?;
        let identity = Identity::load(&cfg.identity).map_err(|source| NodeError::Key {
            path: cfg.identity.clone(),
            source,
        })?;
        let mut peers = BTreeMap::new();
        for (name, p) in &cfg.peer {
            let fp =
                parse_fingerprint(&p.fingerprint).map_err(|source| NodeError::Fingerprint {
                    peer: name.clone(),
                    source,
                })?;
            peers.insert(name.clone(), (p.addr.clone(), fp));
        }
        let agent = Agent::new(AgentOptions {
            dir: cfg.dir.clone(),
            identity: identity.clone(),
            peers: peers.values().map(|p| p.1).collect(),
        });
        let node = Arc::new(Self {
            cfg,
            identity,
            peers,
            agent,
            jobs: Mutex::new(HashMap::new()),
        });
        node.adopt()?;
        // A disk that completes here after a restart mid-move has no VM
        // running (its QEMU died with this node after the commit): the
        // commit made this the only copy, so it boots here, cold.
        let (tx, mut rx) = mpsc::unbounded_channel::<String>();
        node.agent.on_resumed_without_vm(tx);
        let n = node.clone();
        tokio::spawn(async move {
            while let Some(name) = rx.recv().await {
                warn!(vm = name, "its disk completed here after a restart; its memory was lost with the old process: booting it");
                n.boot(&name).await;
            }
        });
        let dir_err = |source| NodeError::Dir {
            path: node.cfg.dir.clone(),
            source,
        };
        for name in node.agent.serve_completed().map_err(dir_err)? {
            info!(vm = name, "runs here: serving its disk");
            if node.agent.read_state(&name).map(|s| s.state) == Some(DiskState::Complete) {
                node.boot(&name).await;
            }
        }
        for (name, st) in node.agent.states() {
            if st.state == DiskState::InDoubt {
                let n = node.clone();
                tokio::spawn(async move { n.settle(name, st, None).await });
            }
        }
        Ok(node)
    }

    /// Every `DIR/NAME.img` without a state runs here from now on.
    fn adopt(&self) -> Result<(), NodeError> {
        let dir = &self.cfg.dir;
        let names = names_with_suffix(dir, ".img").map_err(|source| NodeError::Dir {
            path: dir.clone(),
            source,
        })?;
        for name in &names {
            let name = name.as_str();
            if check_name(name).is_err() || self.agent.read_state(name).is_some() {
                continue;
            }
            let p = self.agent.image_path(name);
            let size = std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
            self.agent
                .write_state(
                    name,
                    &StateFile {
                        state: DiskState::Complete,
                        size,
                        block_size: precopy::Config::default().block_size,
                        to: None,
                        pending: None,
                    },
                )
                .map_err(|source| NodeError::State {
                    vm: name.to_string(),
                    source,
                })?;
            info!(vm = name, size, "adopted {}: it runs here", p.display());
        }
        Ok(())
    }

    /// A disk in doubt (after a restart, or a migration that lost its link
    /// at the commit): ask the peer until it answers, then finish the move or
    /// take the VM back. `held`: the disk as the failed migration left it
    /// (writes held, or refused past the commit).
    async fn settle(self: Arc<Self>, name: String, st: StateFile, held: Option<Arc<Disk>>) {
        let to = st.to.clone().unwrap_or_default();
        let Some((addr, fp)) = self.peers.get(&to).cloned() else {
            warn!(vm = name, peer = to, "in doubt towards a peer this node no longer knows: add it back to [peer] to settle it");
            return;
        };
        let disk = match held {
            Some(d) => d,
            None => match Image::open(&self.agent.image_path(&name), true) {
                Ok(i) => Arc::new(Disk::new(i, name.clone())),
                Err(e) => {
                    warn!(vm = name, "in doubt, and its image cannot be opened: {e}");
                    return;
                }
            },
        };
        loop {
            let opts = Tuning::default().options(
                addr.clone(),
                self.identity.clone(),
                vec![fp],
                None,
                Some(Arc::new(NodeLedger {
                    agent: self.agent.clone(),
                    vm: name.clone(),
                    size: st.size,
                    block_size: st.block_size,
                    to: to.clone(),
                    job: None,
                })),
            );
            let Ok(mut opts) = opts else { return };
            opts.precopy.block_size = st.block_size;
            opts.reconnect_for = Duration::from_secs(self.cfg.reconnect_s);
            match source::settle(disk.clone(), opts).await {
                Ok(Settled::StayedHere) => {
                    info!(
                        vm = name,
                        peer = to,
                        "the peer never committed: it runs here"
                    );
                    if self
                        .agent
                        .served(&name)
                        .is_some_and(|d| Arc::ptr_eq(&d, &disk))
                    {
                        disk.stop_tracking();
                    } else if let Err(e) = self.agent.start_serving(disk) {
                        warn!(vm = name, "cannot serve its disk: {e}");
                    } else {
                        self.boot(&name).await;
                    }
                    if let Some(q) = self.agent.vm(&name) {
                        resume_vm(&q, &name).await;
                    }
                    return;
                }
                Ok(Settled::MovedThere) => {
                    info!(vm = name, peer = to, "the peer committed: it runs there");
                    if let Some(q) = self.agent.vm(&name) {
                        let _ = q
                            .execute_timeout("quit", None, Duration::from_secs(10))
                            .await;
                    }
                    self.agent.forget(&name);
                    return;
                }
                Err(e) => {
                    warn!(vm = name, peer = to, "still in doubt: {e}; asking again");
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
            }
        }
    }

    /// Starts the VM `name` from its launch file `DIR/NAME.qemu`, if it has
    /// one and no QEMU of it runs here; its disk must be served already.
    async fn boot(&self, name: &str) {
        let dir = self.agent.dir();
        if self.agent.vm(name).is_some() || !DestVm::has_launch_file(dir, name) {
            return;
        }
        match DestVm::boot(dir, name, &self.agent.socket_path(name)).await {
            Ok(vm) => {
                let (stopped, vm_name) = (vm.stopped(), name.to_string());
                self.agent.adopt_vm(name, vm);
                tokio::spawn(async move {
                    let (alarm, what) = stopped.await;
                    if alarm {
                        warn!(vm = vm_name, "the VM stopped: {what}");
                    } else {
                        info!(vm = vm_name, "the VM stopped: {what}");
                    }
                });
            }
            Err(e) => warn!(vm = name, "cannot start the VM from its launch file: {e}"),
        }
    }

    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    pub fn agent(&self) -> &Arc<Agent> {
        &self.agent
    }

    /// Runs the link's listener and the control socket until `shutdown`.
    pub async fn run(
        self: Arc<Self>,
        link: TcpListener,
        control: UnixListener,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), NodeError> {
        let agent = self.agent.clone().run(link, std::future::pending());
        let node = self.clone();
        let control = async move {
            loop {
                match control.accept().await {
                    Ok((s, _)) => {
                        let n = node.clone();
                        tokio::spawn(async move { n.control(s).await });
                    }
                    Err(e) => {
                        warn!("control socket: accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        };
        tokio::select! {
            _ = shutdown => Ok(()),
            r = agent => r.map_err(|source| NodeError::Key { path: self.cfg.identity.clone(), source }),
            _ = control => Ok(()),
        }
    }

    /// One control connection: one request, its replies.
    async fn control(self: Arc<Self>, s: UnixStream) {
        let (rd, mut wr) = s.into_split();
        let mut line = String::new();
        let mut rd = BufReader::new(rd.take(api::MAX_REQUEST as u64));
        let read = tokio::time::timeout(Duration::from_secs(10), rd.read_line(&mut line)).await;
        let req = match read {
            Ok(Ok(_)) if line.ends_with('\n') => {
                serde_json::from_str::<Request>(&line).map_err(|e| format!("bad request: {e}"))
            }
            Ok(Ok(_)) => Err(format!(
                "a request is one JSON line of at most {} bytes",
                api::MAX_REQUEST
            )),
            Ok(Err(e)) => Err(format!("cannot read the request: {e}")),
            Err(_) => Err("no request within 10 s".into()),
        };
        let reply = |r: &Reply| {
            let mut s = serde_json::to_string(r).unwrap_or_default();
            s.push('\n');
            s
        };
        let answer = match req {
            Err(message) => Reply::Error { message },
            Ok(Request::Status) => Reply::Status(self.status()),
            Ok(Request::Cancel { vm }) => match self.cancel(&vm) {
                Ok(()) => Reply::Done {
                    message: format!(
                        "cancelled the migration of {vm} before its commit point; it keeps running at {}",
                        self.cfg.name
                    ),
                },
                Err(e) => Reply::Error {
                    message: e.to_string(),
                },
            },
            Ok(Request::Set {
                vm,
                max_rate_mbit,
                downtime_ms,
            }) => match self.set(&vm, max_rate_mbit, downtime_ms).await {
                Ok(message) => Reply::Done { message },
                Err(e) => Reply::Error {
                    message: e.to_string(),
                },
            },
            Ok(Request::Migrate { vm, to, tuning }) => {
                let (tx, mut rx) = mpsc::unbounded_channel();
                match self.migrate(&vm, &to, &tuning, tx) {
                    Err(e) => Reply::Error {
                        message: e.to_string(),
                    },
                    Ok(_) => {
                        // Events until the migration ends; the migration goes
                        // on if this client leaves.
                        while let Some(e) = rx.recv().await {
                            if wr
                                .write_all(reply(&Reply::Event(e)).as_bytes())
                                .await
                                .is_err()
                            {
                                return;
                            }
                        }
                        return;
                    }
                }
            }
        };
        let _ = wr.write_all(reply(&answer).as_bytes()).await;
    }

    pub fn status(&self) -> NodeStatus {
        let jobs = lock(&self.jobs);
        let vms = self
            .agent
            .states()
            .into_iter()
            .map(|(name, st)| {
                let migration = jobs.get(&name).map(|j| {
                    let mut s = lock(&j.status).clone();
                    s.elapsed_s = j.started.elapsed().as_secs_f64();
                    s
                });
                VmStatus {
                    qemu: self.agent.vm(&name).is_some(),
                    name,
                    state: st.state,
                    size_bytes: st.size,
                    to: st.to,
                    migration,
                }
            })
            .collect();
        NodeStatus {
            node: self.cfg.name.clone(),
            vms,
        }
    }

    /// Starts sending `vm` to the peer `to`; its events go to `events`, the
    /// last one its summary or its error. Everything cheap and local is
    /// checked before anything is sent anywhere.
    pub fn migrate(
        self: &Arc<Self>,
        vm: &str,
        to: &str,
        tuning: &Tuning,
        events: mpsc::UnboundedSender<Event>,
    ) -> Result<tokio::task::JoinHandle<Result<Summary, NodeError>>, NodeError> {
        if to == self.cfg.name {
            return Err(NodeError::NotHere(format!("{vm} runs here ({to}) already")));
        }
        let (addr, fp) = self
            .peers
            .get(to)
            .cloned()
            .ok_or_else(|| NodeError::UnknownPeer {
                name: to.to_string(),
                known: self.peers.keys().cloned().collect::<Vec<_>>().join(", "),
            })?;
        let st = self
            .agent
            .read_state(vm)
            .ok_or_else(|| NodeError::NotHere(format!("no VM named {vm} at {}", self.cfg.name)))?;
        match st.state {
            DiskState::Complete => {}
            DiskState::Moved => {
                return Err(NodeError::NotHere(format!(
                    "{vm} left {} for {}; it runs there",
                    self.cfg.name,
                    st.to.unwrap_or_default()
                )))
            }
            DiskState::InDoubt => {
                return Err(NodeError::NotHere(format!(
                    "{vm} was sent to {} and it is not yet known whether it took over; this node keeps asking",
                    st.to.unwrap_or_default()
                )))
            }
            DiskState::Partial => {
                return Err(NodeError::NotHere(format!(
                    "{} holds only a partial copy of {vm} (a move here that never committed)",
                    self.cfg.name
                )))
            }
            DiskState::Committed => {
                return Err(NodeError::NotHere(format!(
                    "{vm} arrived at {} and its last blocks are still coming; try again when they have",
                    self.cfg.name
                )))
            }
        }
        let disk = self.agent.served(vm).ok_or_else(|| {
            NodeError::NotHere(format!("{vm}'s disk is not served at {}", self.cfg.name))
        })?;
        let qmp = self.agent.vm(vm);
        let mut jobs = lock(&self.jobs);
        if let Some(j) = jobs.get(vm) {
            return Err(NodeError::Busy {
                vm: vm.to_string(),
                to: j.to.clone(),
            });
        }
        let job = Arc::new(Job {
            to: to.to_string(),
            started: Instant::now(),
            live: Arc::default(),
            disk: disk.clone(),
            gate: CommitGate::default(),
            cancel: Notify::new(),
            status: Mutex::new(JobStatus {
                to: to.to_string(),
                max_rate_mbit: tuning.max_rate_mbit,
                ..JobStatus::default()
            }),
        });
        let mut opts = tuning.options(
            addr,
            self.identity.clone(),
            vec![fp],
            qmp.as_ref()
                .map(|_| self.agent.dir().join(format!("{vm}.qmp"))),
            Some(Arc::new(NodeLedger {
                agent: self.agent.clone(),
                vm: vm.to_string(),
                size: st.size,
                block_size: st.block_size,
                to: to.to_string(),
                job: Some(job.clone()),
            })),
        )?;
        opts.precopy.block_size = st.block_size;
        opts.qmp_connection = qmp;
        opts.live = job.live.clone();
        jobs.insert(vm.to_string(), job.clone());
        drop(jobs);

        let (tx, mut rx) = mpsc::unbounded_channel::<Event>();
        let j = job.clone();
        let forward = events.clone();
        tokio::spawn(async move {
            while let Some(e) = rx.recv().await {
                j.observe(&e);
                let _ = forward.send(e);
            }
        });
        let node = self.clone();
        let name = vm.to_string();
        info!(vm = name, to, "migration starts");
        Ok(tokio::spawn(async move {
            let run = source::migrate(disk, opts, EventSink::new(tx));
            let r = tokio::select! {
                r = run => r.map_err(NodeError::from),
                _ = job.cancel.notified() => Err(NodeError::Cancelled),
            };
            match &r {
                Ok(_) => {
                    info!(vm = name, to = job.to, "migration complete: it runs there");
                    node.agent.forget(&name);
                }
                Err(e) => {
                    warn!(vm = name, to = job.to, "migration failed: {e}");
                    let _ = events.send(Event::Error {
                        message: e.to_string(),
                    });
                }
            }
            lock(&node.jobs).remove(&name);
            // Left in doubt (or committed with blocks still to send): keep
            // asking in the background until it is settled.
            if r.is_err() {
                if let Some(st) = node.agent.read_state(&name) {
                    if st.state == DiskState::InDoubt {
                        let (n, held) = (node.clone(), job.disk.clone());
                        tokio::spawn(async move { n.settle(name, st, Some(held)).await });
                    }
                }
            }
            r
        }))
    }

    /// Aborts `vm`'s migration unless it is past asking for the commit.
    pub fn cancel(&self, vm: &str) -> Result<(), NodeError> {
        let job = lock(&self.jobs)
            .get(vm)
            .cloned()
            .ok_or_else(|| NodeError::NoMigration(vm.to_string()))?;
        if job.disk.is_read_only() || !job.gate.try_cancel() {
            return Err(NodeError::PastCommit(vm.to_string()));
        }
        job.cancel.notify_one();
        Ok(())
    }

    /// Changes a running migration: the link's cap (and QEMU's bandwidth),
    /// the pause budget (the disk's switchover and QEMU's downtime limit).
    pub async fn set(
        &self,
        vm: &str,
        max_rate_mbit: Option<f64>,
        downtime_ms: Option<u64>,
    ) -> Result<String, NodeError> {
        if let Some(m) = max_rate_mbit {
            check_rate(m)?;
        }
        let job = lock(&self.jobs)
            .get(vm)
            .cloned()
            .ok_or_else(|| NodeError::NoMigration(vm.to_string()))?;
        let mut params = serde_json::Map::new();
        let mut said = Vec::new();
        if let Some(m) = max_rate_mbit {
            params.insert("max-bandwidth".into(), mbit_to_bytes(m).into());
            said.push(format!("link capped at {m} Mbit/s"));
        }
        if let Some(d) = downtime_ms {
            params.insert("downtime-limit".into(), d.into());
            said.push(format!("pause budget {d} ms"));
        }
        if params.is_empty() {
            return Err(NodeError::NotHere(
                "nothing to change: give --max-rate-mbit or --downtime-ms".into(),
            ));
        }
        // QEMU first: if it refuses, nothing has changed.
        if let Some(q) = self.agent.vm(vm) {
            q.execute_timeout(
                "migrate-set-parameters",
                Some(serde_json::Value::Object(params)),
                Duration::from_secs(10),
            )
            .await
            .map_err(|e| NodeError::Qmp {
                vm: vm.to_string(),
                detail: e.to_string(),
            })?;
        }
        if let Some(m) = max_rate_mbit {
            job.live.max_rate.store(mbit_to_bytes(m), Ordering::Relaxed);
            lock(&job.status).max_rate_mbit = Some(m);
        }
        if let (Some(d), Some(e)) = (downtime_ms, job.disk.engine()) {
            lock(&e).set_downtime_target(Duration::from_millis(d));
        }
        Ok(format!("{vm}: {}", said.join(", ")))
    }
}

/// Takes a VM back after a move that did not happen: its migration
/// cancelled, the guest running.
async fn resume_vm(q: &Arc<crate::qmp::Qmp>, name: &str) {
    let t = Duration::from_secs(10);
    let _ = q.execute_timeout("migrate_cancel", None, t).await;
    if let Err(e) = q.execute_timeout("cont", None, t).await {
        warn!(vm = name, "cannot resume the VM: {e}");
    }
}

impl Job {
    fn observe(&self, e: &Event) {
        let mut s = lock(&self.status);
        match e {
            Event::Phase { phase } => s.phase = Some(*phase),
            Event::Progress {
                phase,
                round,
                wire_bytes,
                dirty_blocks,
                rate_bytes_per_s,
                eta_s,
                ..
            } => {
                s.phase = Some(*phase);
                s.round = *round;
                s.wire_bytes = *wire_bytes;
                s.dirty_blocks = *dirty_blocks;
                s.rate_bytes_per_s = *rate_bytes_per_s;
                s.eta_s = *eta_s;
            }
            Event::Memory { passes, .. } => s.memory_passes = Some(*passes),
            _ => {}
        }
    }
}

/// Binds the control socket readable and writable by its owner only,
/// whatever the umask.
pub fn bind_control(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::remove_file(path);
    let l = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

/// `migrator status`, for a person: one line a VM.
pub fn format_status(st: &NodeStatus) -> String {
    use std::fmt::Write as _;
    let mib = |b: f64| b / (1024.0 * 1024.0);
    let mut out = format!("node {}\n", st.node);
    if st.vms.is_empty() {
        out.push_str("  no VMs\n");
    }
    for v in &st.vms {
        let to = v.to.as_deref().unwrap_or("?");
        let state = match v.state {
            DiskState::Complete if v.qemu => "runs here (QEMU up)".to_string(),
            DiskState::Complete => "runs here (disk served)".to_string(),
            DiskState::Moved => format!("moved to {to}"),
            DiskState::InDoubt => format!("in doubt: asking {to} whether it took over"),
            DiskState::Partial => "partial copy (never committed)".to_string(),
            DiskState::Committed => "arrived, last blocks coming".to_string(),
        };
        let _ = write!(
            out,
            "  {:<16} {:>10.1} MiB  {state}",
            v.name,
            mib(v.size_bytes as f64)
        );
        if let Some(m) = &v.migration {
            let phase = m
                .phase
                .map(|p| p.to_string())
                .unwrap_or_else(|| "starting".into());
            let _ = write!(
                out,
                "\n    -> {}: {phase}, round {}, {:.1} MiB sent, {} dirty blocks, {:.1} MiB/s, ETA {}, {:.0} s so far{}",
                m.to,
                m.round,
                mib(m.wire_bytes as f64),
                m.dirty_blocks,
                mib(m.rate_bytes_per_s.unwrap_or(0.0)),
                m.eta_s.map(|s| format!("{s:.0} s")).unwrap_or_else(|| "?".into()),
                m.elapsed_s,
                m.max_rate_mbit.map(|r| format!(", capped at {r} Mbit/s")).unwrap_or_default(),
            );
        }
        out.push('\n');
    }
    out
}
