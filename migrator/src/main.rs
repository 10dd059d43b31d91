//! `migrator`: disk server, destination agent and migration CLI.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, UnixListener, UnixStream};
use tokio::sync::mpsc;
use tracing::{info, warn};

use migrator::agent::{Agent, AgentOptions};
use migrator::disk::Disk;
use migrator::events::{Event, EventSink, Phase};
use migrator::image::Image;
use migrator::nbd::server::{serve_tcp, serve_unix};
use migrator::precopy::{self, throttle::ThrottleConfig};
use migrator::source::{self, marker_path, MigrateOptions};
use migrator::transport::tls::{parse_fingerprint, Identity};
use migrator::vm::VmOptions;

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

#[derive(Args, Clone, Serialize, Deserialize)]
struct Keys {
    /// Directory holding this host's cert.der and key.der (from `migrator keygen`).
    #[arg(long)]
    identity: PathBuf,
    /// SHA-256 fingerprint of a peer's key to accept (repeatable).
    #[arg(long = "peer", required = true)]
    peers: Vec<String>,
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
}

#[derive(Args, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct MigrateArgs {
    /// Control socket of a running `migrator disk serve` (live migration).
    #[arg(long, conflicts_with = "image", required_unless_present = "image")]
    control: Option<PathBuf>,
    /// An image nobody is writing to (offline migration).
    #[arg(long)]
    image: Option<PathBuf>,
    /// Destination agent, host:port.
    #[arg(long)]
    to: String,
    #[command(flatten)]
    keys: Keys,
    /// How writes during the migration travel: `dirty` (resend dirty blocks in
    /// rounds) or `deltas` (forward every write, as the research prototype did).
    #[arg(long, value_enum, default_value = "dirty")]
    #[serde(default)]
    mode: ModeArg,
    /// Disable write throttling.
    #[arg(long)]
    no_throttle: bool,
    /// Guest's share of the link for newly dirtied data while throttling.
    #[arg(long, default_value_t = 0.5)]
    throttle_ratio: f64,
    /// Most delay added to one write, in milliseconds.
    #[arg(long, default_value_t = 100)]
    max_delay_ms: u64,
    /// Roll back if the dirty set is still too large after this many rounds.
    #[arg(long, default_value_t = 30)]
    max_rounds: u32,
    /// Switch over when the dirty set drains in this many milliseconds.
    #[arg(long, default_value_t = 300)]
    downtime_ms: u64,
    /// Cap the migration link at this many megabits per second.
    #[arg(long)]
    #[serde(default)]
    max_rate_mbit: Option<f64>,
    /// Send blocks uncompressed.
    #[arg(long)]
    no_compress: bool,
    /// Migrate the VM using this disk too: the source QEMU's QMP socket (as
    /// the disk server sees it). The destination agent starts the VM from its
    /// `DIR/NAME.qemu`. `--downtime-ms` and `--max-rate-mbit` apply to its
    /// memory as well.
    #[arg(long, requires = "control")]
    #[serde(default)]
    qmp: Option<PathBuf>,
    /// Do not slow the guest's vCPUs when its memory does not converge.
    #[arg(long, requires = "qmp")]
    #[serde(default)]
    no_auto_converge: bool,
    /// Switch to post-copy after this many memory passes without converging.
    #[arg(long, requires = "qmp")]
    #[serde(default)]
    postcopy_after: Option<u64>,
    /// JSON lines on stdout instead of progress bars.
    #[arg(long)]
    #[serde(default)]
    json: bool,
}

#[derive(Clone, Copy, Default, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum ModeArg {
    #[default]
    Dirty,
    Deltas,
}

impl MigrateArgs {
    fn options(&self, marker: Option<PathBuf>) -> Result<MigrateOptions> {
        let identity = Identity::load(&self.keys.identity)?;
        let peers = self
            .keys
            .peers
            .iter()
            .map(|p| parse_fingerprint(p))
            .collect::<Result<Vec<_>, _>>()?;
        if !(self.throttle_ratio > 0.0 && self.throttle_ratio <= 1.0) {
            bail!(
                "--throttle-ratio must be in (0, 1], got {}",
                self.throttle_ratio
            );
        }
        Ok(MigrateOptions {
            to: self.to.clone(),
            identity,
            peers,
            precopy: precopy::Config {
                mode: match self.mode {
                    ModeArg::Dirty => precopy::Mode::Dirty,
                    ModeArg::Deltas => precopy::Mode::Deltas,
                },
                max_rounds: self.max_rounds,
                downtime_target: Duration::from_millis(self.downtime_ms),
                throttle: (!self.no_throttle).then_some(ThrottleConfig {
                    ratio: self.throttle_ratio,
                    max_delay: Duration::from_millis(self.max_delay_ms),
                }),
                ..precopy::Config::default()
            },
            compress: !self.no_compress,
            max_rate: self.max_rate_mbit.map(|m| (m * 1e6 / 8.0) as u64),
            marker,
            vm: self.qmp.as_ref().map(|qmp| VmOptions {
                qmp: qmp.clone(),
                downtime: Duration::from_millis(self.downtime_ms),
                max_bandwidth: self.max_rate_mbit.map(|m| (m * 1e6 / 8.0) as u64),
                auto_converge: !self.no_auto_converge,
                postcopy_after_passes: self.postcopy_after,
            }),
        })
    }
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
    if let Ok(to) = std::fs::read_to_string(&marker) {
        bail!(
            "image {} was migrated to {} (marker {}); the destination is the authority now. Remove the marker only if that copy is gone",
            image.display(),
            to.trim(),
            marker.display()
        );
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
        tokio::spawn(control_loop(l, disk.clone(), image.clone()));
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

/// Control socket: one JSON `MigrateArgs` line in, event JSON lines out. The
/// migration is cancelled (rolled back) if the client goes away before commit.
async fn control_loop(l: UnixListener, disk: Arc<Disk>, image: PathBuf) {
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
            let opts = req.and_then(|a| {
                a.options(Some(marker_path(&image)))
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
                    if !disk.is_read_only() {
                        // Before the commit point: cancel, the guard rolls back.
                        warn!("migration client went away; rolling back");
                        job.abort();
                        return;
                    }
                    // After it, the final blocks must still reach the destination.
                    warn!("migration client went away after the commit point; finishing");
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

async fn migrate_cli(args: MigrateArgs) -> Result<()> {
    let (tx, rx) = mpsc::unbounded_channel();
    let render = tokio::spawn(render(rx, args.json));
    let result: Result<()> = if let Some(ctl) = &args.control {
        let s = UnixStream::connect(ctl)
            .await
            .with_context(|| format!("cannot reach disk server control socket {} (is `migrator disk serve --control` running?)", ctl.display()))?;
        let (rd, mut wr) = s.into_split();
        let mut line = serde_json::to_string(&args)?;
        line.push('\n');
        wr.write_all(line.as_bytes()).await?;
        let mut lines = BufReader::new(rd).lines();
        let mut failed = None;
        let mut done = false;
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => { failed = Some("interrupted: migration rolled back, the source keeps serving".to_string()); break; }
                l = lines.next_line() => match l? {
                    Some(l) => {
                        let e: Event = serde_json::from_str(&l).context("bad event from the disk server")?;
                        if let Event::Error { message } = &e { failed = Some(message.clone()); }
                        done |= matches!(e, Event::Summary(_));
                        let _ = tx.send(e);
                    }
                    None => break,
                }
            }
        }
        drop(wr);
        match failed {
            Some(m) => Err(anyhow::anyhow!(m)),
            None if done => Ok(()),
            None => Err(anyhow::anyhow!(
                "disk server closed the control connection without a result"
            )),
        }
    } else {
        let image = args
            .image
            .clone()
            .context("--image or --control is required")?;
        let disk = open_source(&image, None)?;
        let opts = args.options(Some(marker_path(&image)))?;
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
