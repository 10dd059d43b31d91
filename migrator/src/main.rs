//! `migrator`: disk server, destination agent and migration CLI.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::mpsc;
use tracing::info;

use clap::Args;
use migrator::agent::{Agent, AgentOptions};
use migrator::args::{Keys, MigrateArgs, Tuning};
use migrator::control;
use migrator::disk::Disk;
use migrator::events::{Event, EventSink, Phase};
use migrator::image::Image;
use migrator::nbd::server::{serve_tcp, serve_unix};
use migrator::node::api::{self, Reply, Request};
use migrator::node::{Node, NodeConfig};
use migrator::orchestrate;
use migrator::source::{self, marker_path, MarkerFile, Record};
use migrator::transport::tls::{parse_fingerprint, Identity};

#[derive(Parser)]
#[command(
    name = "migrator",
    version,
    about = "Live wide-area migration of a VM's local disk"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create this host's key pair for the migration link and print its fingerprint.
    Keygen {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Disk server commands (source side).
    #[command(subcommand)]
    Disk(DiskCmd),
    /// Move a VM to another site with its disk, its connections and its DNS
    /// name: prepare (gateways, DNS TTL) → disk and memory → one switchover →
    /// network switch (tunnel at the old site, translation at the new one,
    /// DNS) → drain. The sites, gateways and VMs come from the config file.
    Migrate(OrchestrateArgs),
    /// The node daemon and moves between nodes.
    #[command(subcommand)]
    Node(NodeCmd),
    /// A node's VMs and its migrations in flight (phase, bytes, rate, ETA), as
    /// `virsh domjobinfo` shows them; with `--config`, every site's.
    Status {
        #[command(flatten)]
        node: Nodes,
        /// Only this VM.
        vm: Option<String>,
        /// The node's answer as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Abort a VM's migration before its commit point; it keeps running where it was.
    Cancel {
        vm: String,
        #[command(flatten)]
        node: Nodes,
    },
    /// Change a VM's migration while it runs.
    Set {
        vm: String,
        #[command(flatten)]
        node: Nodes,
        /// Cap the link (and QEMU's memory stream) at this many Mbit/s.
        #[arg(long)]
        max_rate_mbit: Option<f64>,
        /// The pause budget: the disk's switchover and QEMU's downtime limit.
        #[arg(long)]
        downtime_ms: Option<u64>,
    },
    /// Destination agent: receive migrations into DIR and serve them over NBD.
    Receive {
        /// Address for the migration link, e.g. 0.0.0.0:7800.
        #[arg(long)]
        listen: String,
        /// Where images (NAME.img), state and NBD sockets (NAME.sock) live,
        /// and for VMs the launch file NAME.qemu (the destination QEMU's
        /// command line, one argument per line, `{disk}` for the NBD socket),
        /// QMP socket NAME.qmp and console log NAME.log.
        #[arg(long)]
        dir: PathBuf,
        #[command(flatten)]
        keys: Keys,
    },
}

#[derive(Args)]
struct NodeSocket {
    /// The node's control socket (the `control` of its node.toml).
    #[arg(
        long = "node",
        env = "MIGRATOR_NODE",
        default_value = "/run/migrator/node.sock"
    )]
    socket: PathBuf,
}

/// One node, or every site's.
#[derive(Args)]
struct Nodes {
    #[command(flatten)]
    one: NodeSocket,
    /// Every site's node instead, as this `migrator.toml` names them (the
    /// `node` of each `[site.NAME]`).
    #[arg(long)]
    config: Option<PathBuf>,
}

impl Nodes {
    /// The nodes to ask: (site, control socket); the one socket without
    /// `--config` (its site unnamed).
    fn targets(&self) -> Result<Vec<(String, PathBuf)>> {
        let Some(c) = &self.config else {
            return Ok(vec![(String::new(), self.one.socket.clone())]);
        };
        let cfg = orchestrate::Config::load(c)?;
        let nodes: Vec<(String, PathBuf)> = cfg
            .site
            .into_iter()
            .filter_map(|(site, s)| s.node.map(|n| (site, n)))
            .collect();
        if nodes.is_empty() {
            bail!(
                "{} names no node (`node = \"SOCKET\"` in a [site.NAME])",
                c.display()
            );
        }
        Ok(nodes)
    }

    /// The node where `vm` has a migration in flight.
    async fn migrating(&self, vm: &str) -> Result<PathBuf> {
        let targets = self.targets()?;
        if let [(_, one)] = targets.as_slice() {
            return Ok(one.clone());
        }
        let mut said = Vec::new();
        for (site, sock) in targets {
            match api::status(&sock).await {
                Ok(st) if st.vms.iter().any(|v| v.name == vm && v.migration.is_some()) => {
                    return Ok(sock)
                }
                Ok(_) => said.push(format!("{site}: none")),
                Err(e) => said.push(format!("{site}: {e}")),
            }
        }
        bail!(
            "no migration of {vm} in flight at any site ({})",
            said.join("; ")
        )
    }
}

#[derive(Subcommand)]
enum NodeCmd {
    /// Run this host's node: serve the VMs that run here, receive VMs from
    /// its peers, send them on when asked.
    Run {
        /// The node's config (see `migrator::node::NodeConfig`).
        #[arg(
            long,
            default_value = "/etc/migrator/node.toml",
            env = "MIGRATOR_NODE_CONFIG"
        )]
        config: PathBuf,
    },
    /// Send a VM from this node to one of its peers (by the peer's name).
    Migrate {
        vm: String,
        /// The peer node (a `[peer.NAME]` of this node's config).
        #[arg(long)]
        to: String,
        #[command(flatten)]
        node: NodeSocket,
        /// JSON lines on stdout instead of progress bars.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        tuning: Tuning,
    },
}

#[derive(Args)]
struct OrchestrateArgs {
    /// The VM (a `[vm.NAME]` of the config).
    service: String,
    /// The site to move it to (a `[site.NAME]`).
    #[arg(long)]
    to: String,
    /// Sites, gateways, agents and VMs (see `migrator::orchestrate::Config`).
    #[arg(
        long,
        default_value = "/etc/migrator/migrator.toml",
        env = "MIGRATOR_CONFIG"
    )]
    config: PathBuf,
    /// JSON lines on stdout instead of progress bars.
    #[arg(long)]
    json: bool,
    /// Draw the timeline (link throughput, dirty rate, phases) into this SVG.
    #[arg(long)]
    report: Option<PathBuf>,
    /// The old site tunnels old connections at most this long.
    #[arg(long, default_value_t = 3600)]
    drain_deadline_s: u64,
    /// Wait here this long for the drain (0: return after the switch).
    #[arg(long, default_value_t = 600)]
    drain_wait_s: u64,
    #[command(flatten)]
    tuning: Tuning,
}

#[derive(Subcommand)]
enum DiskCmd {
    /// Serve a raw image over NBD; every write passes through dirty tracking.
    Serve {
        #[arg(long)]
        image: PathBuf,
        /// Unix socket for NBD clients.
        #[arg(long, conflicts_with = "listen", required_unless_present = "listen")]
        socket: Option<PathBuf>,
        /// TCP address for NBD clients.
        #[arg(long)]
        listen: Option<String>,
        /// Export name (default: the image's file stem).
        #[arg(long)]
        name: Option<String>,
        /// Control socket accepting `migrator disk migrate --control`.
        #[arg(long)]
        control: Option<PathBuf>,
    },
    /// Migrate a disk to a destination agent.
    Migrate(MigrateArgs),
    /// Settle a migration left in doubt (its image's marker says so): ask
    /// the destination whether it committed; send it what it lacks if so,
    /// or make the image servable again if not.
    Resolve {
        /// The image whose `.moved` marker says `in_doubt`.
        #[arg(long)]
        image: PathBuf,
        /// The destination agent, host:port (the marker names it).
        #[arg(long)]
        to: String,
        #[command(flatten)]
        keys: Keys,
    },
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let rt = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    rt.block_on(async move {
        match cli.cmd {
            Cmd::Keygen { dir } => {
                let id = Identity::generate()?;
                id.save(&dir)?;
                println!("{}", id.fingerprint_hex());
                Ok(())
            }
            Cmd::Receive { listen, dir, keys } => receive(listen, dir, keys).await,
            Cmd::Disk(DiskCmd::Serve {
                image,
                socket,
                listen,
                name,
                control,
            }) => serve(image, socket, listen, name, control).await,
            Cmd::Disk(DiskCmd::Migrate(args)) => migrate_cli(args).await,
            Cmd::Disk(DiskCmd::Resolve { image, to, keys }) => resolve_cli(image, to, keys).await,
            Cmd::Migrate(args) => orchestrate_cli(args).await,
            Cmd::Node(NodeCmd::Run { config }) => node_run(config).await,
            Cmd::Node(NodeCmd::Migrate {
                vm,
                to,
                node,
                json,
                tuning,
            }) => node_migrate(node.socket, vm, to, json, tuning).await,
            Cmd::Status { node, vm, json } => status_cli(&node, vm, json).await,
            Cmd::Cancel { vm, node } => {
                let socket = node.migrating(&vm).await?;
                let msg = node_call(&socket, Request::Cancel { vm }).await?;
                println!("{msg}");
                Ok(())
            }
            Cmd::Set {
                vm,
                node,
                max_rate_mbit,
                downtime_ms,
            } => {
                let socket = node.migrating(&vm).await?;
                let msg = node_call(
                    &socket,
                    Request::Set {
                        vm,
                        max_rate_mbit,
                        downtime_ms,
                    },
                )
                .await?;
                println!("{msg}");
                Ok(())
            }
        }
    })
}

fn export_name(image: &Path, name: Option<String>) -> String {
    name.unwrap_or_else(|| {
        image
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "disk".into())
    })
}

fn open_source(image: &Path, name: Option<String>) -> Result<Arc<Disk>> {
    let marker = marker_path(image);
    match (MarkerFile {
        path: marker.clone(),
        gate: Default::default(),
    })
    .read()
    {
        None => {}
        Some(Record::Moved { to }) => bail!(
            "image {} was migrated to {to} (marker {}); the destination is the authority now. Remove the marker only if that copy is gone",
            image.display(),
            marker.display()
        ),
        Some(Record::InDoubt { to }) => bail!(
            "image {} was being committed to {to} when the link or this process was lost (marker {}); \
             whether {to} took over is known only there: run `migrator disk resolve --image {} --to {to} --identity … --peer …` to ask it",
            image.display(),
            marker.display(),
            image.display()
        ),
    }
    let img = Image::open(image, true)?;
    Ok(Arc::new(Disk::new(img, export_name(image, name))))
}

async fn ctrl_c() {
    let _ = tokio::signal::ctrl_c().await;
}

async fn serve(
    image: PathBuf,
    socket: Option<PathBuf>,
    listen: Option<String>,
    name: Option<String>,
    control: Option<PathBuf>,
) -> Result<()> {
    let disk = open_source(&image, name)?;
    if let Some(ctl) = control {
        let _ = std::fs::remove_file(&ctl);
        let l = UnixListener::bind(&ctl)
            .with_context(|| format!("cannot bind control socket {}", ctl.display()))?;
        tokio::spawn(control::serve(l, disk.clone(), image.clone()));
    }
    if let Some(sock) = socket {
        let _ = std::fs::remove_file(&sock);
        let l = UnixListener::bind(&sock)
            .with_context(|| format!("cannot bind NBD socket {}", sock.display()))?;
        info!(image = %image.display(), socket = %sock.display(), export = disk.name(), "serving");
        serve_unix(l, disk, ctrl_c()).await;
        let _ = std::fs::remove_file(&sock);
    } else if let Some(addr) = listen {
        let l = TcpListener::bind(&addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        info!(image = %image.display(), %addr, export = disk.name(), "serving");
        serve_tcp(l, disk, ctrl_c()).await;
    }
    Ok(())
}

async fn resolve_cli(image: PathBuf, to: String, keys: Keys) -> Result<()> {
    let marker = MarkerFile::for_image(&image);
    match marker.read() {
        Some(Record::InDoubt { to: recorded }) if recorded != to => bail!(
            "{} was being committed to {recorded}, not {to}: ask that one",
            image.display()
        ),
        Some(Record::InDoubt { .. }) => {}
        Some(Record::Moved { to }) => bail!(
            "{} has moved to {to} already; nothing is in doubt",
            image.display()
        ),
        None => bail!(
            "{} is not in doubt (no marker): it is served here",
            image.display()
        ),
    }
    let args = MigrateArgs {
        control: None,
        image: Some(image.clone()),
        to,
        keys,
        qmp: None,
        tuning: Tuning::default(),
        json: false,
    };
    let opts = args.options(Some(MarkerFile::for_image(&image)))?;
    let disk = Arc::new(Disk::new(
        Image::open(&image, true)?,
        export_name(&image, None),
    ));
    match source::settle(disk, opts).await? {
        source::Settled::StayedHere => println!(
            "the destination never committed: {} is the authority again (serve it)",
            image.display()
        ),
        source::Settled::MovedThere => println!(
            "the destination committed and now holds every block: {} is a stale copy",
            image.display()
        ),
    }
    Ok(())
}

async fn migrate_cli(args: MigrateArgs) -> Result<()> {
    let (tx, rx) = mpsc::unbounded_channel();
    let render = tokio::spawn(render(rx, args.json));
    let result: Result<()> = if let Some(ctl) = &args.control {
        control::request(ctl, &args, tx.clone()).await.map(|_| ())
    } else {
        let image = args
            .image
            .clone()
            .context("--image or --control is required")?;
        let disk = open_source(&image, None)?;
        let opts = args.options(Some(MarkerFile::for_image(&image)))?;
        let mut job = tokio::spawn(source::migrate(
            disk.clone(),
            opts,
            EventSink::new(tx.clone()),
        ));
        loop {
            tokio::select! {
                r = &mut job => break r.context("migration task failed")?.map(|_| ()).map_err(Into::into),
                _ = tokio::signal::ctrl_c() => {
                    if disk.is_read_only() {
                        eprintln!("interrupted after the commit point: finishing the final blocks first");
                        continue;
                    }
                    job.abort();
                    let _ = job.await; // the rollback guard has run once this returns
                    break Err(anyhow::anyhow!("interrupted: migration rolled back, the source keeps serving"));
                }
            }
        }
    };
    drop(tx);
    let _ = render.await;
    result
}

async fn orchestrate_cli(a: OrchestrateArgs) -> Result<()> {
    let cfg = orchestrate::Config::load(&a.config)?;
    let base = MigrateArgs {
        control: None,
        image: None,
        to: String::new(),
        keys: Keys {
            identity: cfg.identity.clone(),
            peers: Vec::new(),
        },
        qmp: None,
        tuning: a.tuning.clone(),
        json: false,
    };
    let mut plan = orchestrate::Plan::resolve(&cfg, &a.service, &a.to, &base).await?;
    plan.drain_deadline = Duration::from_secs(a.drain_deadline_s);
    plan.drain_wait = Duration::from_secs(a.drain_wait_s);
    let (tx, rx) = mpsc::unbounded_channel();
    let render = tokio::spawn(render(rx, a.json));
    let result = orchestrate::run(plan, tx.clone()).await;
    let out = match result {
        Ok(report) => {
            if a.json {
                if let Ok(s) = serde_json::to_string(
                    &serde_json::json!({"event": "report", "report": &report}),
                ) {
                    println!("{s}");
                }
            } else {
                println!("{report}");
            }
            if let Some(svg) = &a.report {
                orchestrate::report::write_svg(&report, svg)?;
                if !a.json {
                    println!("timeline: {}", svg.display());
                }
            }
            Ok(())
        }
        Err(e) => {
            let _ = tx.send(Event::Error {
                message: format!("{e:#}"),
            });
            Err(e)
        }
    };
    drop(tx);
    let _ = render.await;
    out
}

/// Progress bars on a terminal, JSON lines with `--json`, plain lines otherwise.
async fn render(mut rx: mpsc::UnboundedReceiver<Event>, json: bool) {
    use indicatif::{ProgressBar, ProgressStyle};
    let tty = std::io::stderr().is_terminal() && !json;
    let bar = tty.then(|| {
        let b = ProgressBar::new(0);
        b.set_style(
            ProgressStyle::with_template("{spinner} {prefix:>12} [{bar:30}] {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        b.enable_steady_tick(Duration::from_millis(120));
        b
    });
    let mib = |b: f64| b / (1024.0 * 1024.0);
    while let Some(e) = rx.recv().await {
        if json {
            if let Ok(s) = serde_json::to_string(&e) {
                println!("{s}");
            }
            continue;
        }
        match (&e, &bar) {
            (Event::Phase { phase }, Some(b)) => b.set_prefix(phase.to_string()),
            (Event::Phase { phase }, None) => eprintln!("phase: {phase}"),
            (
                Event::Progress {
                    phase,
                    round,
                    wire_bytes,
                    bulk_remaining_blocks,
                    dirty_blocks,
                    block_size,
                    rate_bytes_per_s,
                    eta_s,
                },
                Some(b),
            ) => {
                let left = (bulk_remaining_blocks + dirty_blocks) * *block_size as u64;
                b.set_length(wire_bytes + left);
                b.set_position(*wire_bytes);
                b.set_prefix(if *phase == Phase::Dirty {
                    format!("round {round}")
                } else {
                    phase.to_string()
                });
                b.set_message(format!(
                    "{:.1} MiB sent, {} dirty blocks, {:.1} MiB/s, ETA {}",
                    mib(*wire_bytes as f64),
                    dirty_blocks,
                    mib(rate_bytes_per_s.unwrap_or(0.0)),
                    eta_s
                        .map(|s| format!("{s:.0} s"))
                        .unwrap_or_else(|| "?".into())
                ));
            }
            (Event::Progress { .. }, None) => {}
            (
                Event::Memory {
                    transferred_bytes,
                    remaining_bytes,
                    passes,
                    wire_bytes,
                    ..
                },
                Some(b),
            ) => {
                b.set_length(transferred_bytes + remaining_bytes);
                b.set_position(*transferred_bytes);
                b.set_prefix(format!("memory {passes}"));
                b.set_message(format!(
                    "{:.1} MiB sent ({:.1} MiB on the wire), {:.1} MiB left in this pass",
                    mib(*transferred_bytes as f64),
                    mib(*wire_bytes as f64),
                    mib(*remaining_bytes as f64)
                ));
            }
            (Event::Memory { .. }, None) => {}
            (Event::Note { message }, Some(b)) => b.println(format!("  {message}")),
            (Event::Note { message }, None) => eprintln!("  {message}"),
            (Event::Summary(s), b) => {
                if let Some(b) = b {
                    b.finish_and_clear();
                }
                println!("{s}");
            }
            (Event::Error { message }, b) => {
                if let Some(b) = b {
                    b.abandon();
                }
                eprintln!("error: {message}");
            }
        }
    }
}

async fn node_run(config: PathBuf) -> Result<()> {
    let cfg = NodeConfig::load(&config)?;
    let control = cfg.control_path();
    let node = Node::start(cfg.clone()).await?;
    let link = TcpListener::bind(&cfg.listen)
        .await
        .with_context(|| format!("cannot listen on {} (the node's `listen`)", cfg.listen))?;
    let ctl = migrator::node::bind_control(&control)
        .with_context(|| format!("cannot bind the control socket {}", control.display()))?;
    // The bound address on stdout, so `listen = "127.0.0.1:0"` can be used by scripts.
    println!("listening on {}", link.local_addr()?);
    info!(node = node.name(), addr = %link.local_addr()?, control = %control.display(), "node ready");
    node.run(link, ctl, ctrl_c()).await?;
    let _ = std::fs::remove_file(&control);
    Ok(())
}

async fn node_migrate(
    socket: PathBuf,
    vm: String,
    to: String,
    json: bool,
    tuning: Tuning,
) -> Result<()> {
    let (tx, rx) = mpsc::unbounded_channel();
    let render = tokio::spawn(render(rx, json));
    let run = api::migrate(&socket, &vm, &to, tuning, tx.clone());
    let result = tokio::select! {
        r = run => r.map(|_| ()).map_err(anyhow::Error::from),
        _ = tokio::signal::ctrl_c() => {
            // as `virsh migrate`: Ctrl-C aborts the job (refused past its commit point)
            match node_call(&socket, Request::Cancel { vm: vm.clone() }).await {
                Ok(m) => Err(anyhow::anyhow!("interrupted: {m}")),
                Err(e) => Err(anyhow::anyhow!("interrupted, but the migration goes on: {e:#}")),
            }
        }
    };
    drop(tx);
    let _ = render.await;
    result
}

/// One request whose answer is a sentence.
async fn node_call(socket: &Path, req: Request) -> Result<String> {
    let mut said = String::new();
    api::call(socket, &req, |r| {
        if let Reply::Done { message } = r {
            said = message
        }
    })
    .await?;
    Ok(said)
}

/// `migrator status`: one node's VMs, or with `--config` every site's.
async fn status_cli(node: &Nodes, vm: Option<String>, json: bool) -> Result<()> {
    let mut all = Vec::new();
    for (site, socket) in node.targets()? {
        let st = match api::status(&socket).await {
            Ok(st) => st,
            // one site down does not hide the others
            Err(e) if node.config.is_some() => {
                eprintln!("{site}: {e}");
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        all.push(st);
    }
    if let Some(vm) = &vm {
        for st in &mut all {
            st.vms.retain(|v| &v.name == vm);
        }
        if all.iter().all(|st| st.vms.is_empty()) {
            let nodes: Vec<&str> = all.iter().map(|s| s.node.as_str()).collect();
            bail!("no VM named {vm} at node {}", nodes.join(", "));
        }
    }
    if json {
        match all.as_slice() {
            [one] if node.config.is_none() => println!("{}", serde_json::to_string_pretty(one)?),
            _ => println!("{}", serde_json::to_string_pretty(&all)?),
        }
        return Ok(());
    }
    for st in &all {
        print!("{}", migrator::node::format_status(st));
    }
    Ok(())
}

async fn receive(listen: String, dir: PathBuf, keys: Keys) -> Result<()> {
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let identity = Identity::load(&keys.identity)?;
    let peers = keys
        .peers
        .iter()
        .map(|p| parse_fingerprint(p))
        .collect::<Result<Vec<_>, _>>()?;
    let agent = Agent::new(AgentOptions {
        dir,
        identity,
        peers,
    });
    for name in agent.serve_completed()? {
        info!(disk = name, "serving a disk migrated earlier");
    }
    let l = TcpListener::bind(&listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    // The bound address on stdout, so `--listen 127.0.0.1:0` can be used by scripts.
    println!("listening on {}", l.local_addr()?);
    info!(addr = %l.local_addr()?, "waiting for migrations");
    agent.run(l, ctrl_c()).await?;
    Ok(())
}
