//! `tunnel-pipe`: a userspace IP-in-IP (or FOU) tunnel endpoint between a
//! TUN device and a peer gateway, the way the gateway's data plane runs it.
//! An operator's tool for checking a path, and the tests' tunnel.
//!
//! ```text
//! tunnel-pipe --tun tun0 --local 192.0.2.1 --peer 192.0.2.2 [--kind fou --fou-port 5555]
//!             [--path-mtu 1500] [--clamp-mss] [--signal-pmtu] [--deliver 10.9.0.0/24]
//!             [--stats FILE] [--spin-us 2000] [--fast-path]
//! ```
//! Route what should enter the tunnel into the TUN device (`ip route add
//! 10.9.0.0/24 dev tun0`). Prints `ready` once the device and sockets exist;
//! with `--stats` rewrites FILE with JSON counters every 200 ms.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::Parser;
use tunnel::encap::Kind;
use tunnel::io::{Pipe, PipeConfig};

#[derive(Parser)]
#[command(
    name = "tunnel-pipe",
    about = "Userspace IP-in-IP / FOU tunnel endpoint on a TUN device"
)]
struct Args {
    #[arg(long)]
    tun: String,
    #[arg(long)]
    local: IpAddr,
    #[arg(long)]
    peer: IpAddr,
    /// ipip (protocols 4 and 41) or fou (UDP).
    #[arg(long, default_value = "ipip")]
    kind: String,
    #[arg(long, default_value_t = 5555)]
    fou_port: u16,
    #[arg(long, default_value_t = 1500)]
    path_mtu: u16,
    #[arg(long)]
    clamp_mss: bool,
    #[arg(long)]
    signal_pmtu: bool,
    /// Inner destinations allowed out of the tunnel, CIDR; repeatable.
    #[arg(long)]
    deliver: Vec<String>,
    #[arg(long)]
    stats: Option<PathBuf>,
    /// Microseconds to keep polling after the last packet before sleeping
    /// (lower latency for some CPU); 0: sleep at once.
    #[arg(long, default_value_t = tunnel::poll::DEFAULT_SPIN.as_micros() as u64)]
    spin_us: u64,
    /// Carry bulk TCP inside the kernel (tc-BPF programs on the TUN device
    /// and the WAN interface); SYN/FIN/RST, other protocols and anything
    /// unusual still come through this process. IPv4 tunnels only.
    #[arg(long)]
    fast_path: bool,
}

fn cidr(s: &str) -> anyhow::Result<(IpAddr, u8)> {
    let (a, l) = s
        .split_once('/')
        .unwrap_or((s, if s.contains(':') { "128" } else { "32" }));
    let addr: IpAddr = a.parse().with_context(|| format!("bad address in {s:?}"))?;
    let len: u8 = l
        .parse()
        .with_context(|| format!("bad prefix length in {s:?}"))?;
    if len > if addr.is_ipv4() { 32 } else { 128 } {
        bail!("prefix length {len} too long in {s:?}");
    }
    Ok((addr, len))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let kind = match args.kind.as_str() {
        "ipip" => Kind::Ipip,
        "fou" => Kind::Fou {
            port: args.fou_port,
        },
        k => bail!("unknown --kind {k:?}: use ipip or fou"),
    };
    let deliver = args
        .deliver
        .iter()
        .map(|s| cidr(s))
        .collect::<anyhow::Result<_>>()?;
    let pipe = Pipe::open(PipeConfig {
        tun: args.tun,
        local: args.local,
        peer: args.peer,
        extra_peers: vec![],
        kind,
        path_mtu: args.path_mtu,
        clamp_mss: args.clamp_mss,
        signal_pmtu: args.signal_pmtu,
        deliver,
        spin: Duration::from_micros(args.spin_us),
        fast_path: args.fast_path,
    })?;
    let pipe = std::sync::Arc::new(pipe);
    // the data plane has a thread of its own; this one waits for signals
    let (done_tx, done) = tokio::sync::oneshot::channel();
    let p = pipe.clone();
    std::thread::Builder::new()
        .name("data-plane".into())
        .spawn(move || {
            let _ = done_tx.send(p.run());
        })
        .context("cannot start the data-plane thread")?;
    println!("ready");
    let stats = async {
        let Some(path) = &args.stats else {
            return std::future::pending::<anyhow::Result<()>>().await;
        };
        // a file that cannot be written is reported, once per streak of
        // failures, and never stops the tunnel
        let tmp = path.with_extension(format!("{}.tmp", std::process::id()));
        let mut failing = false;
        loop {
            let written = serde_json::to_string(&pipe.snapshot())
                .map_err(std::io::Error::other)
                .and_then(|json| std::fs::write(&tmp, json))
                .and_then(|()| std::fs::rename(&tmp, path));
            match written {
                Err(e) if !failing => {
                    tracing::warn!(
                        "cannot write the counters to {}: {e} (the tunnel goes on; check the directory's permissions and space)",
                        path.display()
                    );
                    failing = true;
                }
                Err(_) => {}
                Ok(()) => failing = false,
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = done => match r {
            Ok(r) => r.context("tunnel I/O failed")?,
            Err(_) => bail!("the data-plane thread ended"),
        },
        r = stats => r?,
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    eprintln!("{}", serde_json::to_string(&pipe.snapshot())?);
    Ok(())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
