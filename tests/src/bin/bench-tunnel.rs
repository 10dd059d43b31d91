//! Tunnel benchmark: throughput and round-trip latency through the
//! userspace IP-in-IP and FOU tunnels (`tunnel-pipe`, the gateways' data plane code)
//! versus the direct routed path between the same four namespaces, in the
//! same run. Writes bench/results/tunnel.md.
//!
//! ```text
//!  client 10.0.1.2 ── [gwA] ══ 192.0.2.0/24, MTU 1500 ══ [gwB] ── 10.9.0.2 server
//! ```
//! `sudo target/release/bench-tunnel [--seconds 5]` (build first:
//! `cargo build --release -p tunnel -p tests`).

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use tests::netns::{in_netns, unique, veth, Netns};
use tests::proc::ChildGuard;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    #[arg(long, default_value_t = 2000)]
    pings: usize,
    #[arg(long, default_value = "bench/results/tunnel.md")]
    out: PathBuf,
    /// Only the rows whose name contains this text, besides the direct
    /// path (for profiling one configuration).
    #[arg(long)]
    only: Option<String>,
    /// Extra arguments for every tunnel-pipe (e.g. "--spin-us 0").
    #[arg(long, allow_hyphen_values = true)]
    pipe_args: Option<String>,
}

struct Topo {
    c: Netns,
    a: Netns,
    b: Netns,
    s: Netns,
}

fn topo() -> Result<Topo> {
    let (c, a, b, s) = (
        Netns::new(unique("bc"))?,
        Netns::new(unique("ba"))?,
        Netns::new(unique("bb"))?,
        Netns::new(unique("bs"))?,
    );
    veth(&c, "10.0.1.2/24", &a, "10.0.1.1/24")?;
    veth(&a, "192.0.2.1/24", &b, "192.0.2.2/24")?;
    veth(&b, "10.9.0.1/24", &s, "10.9.0.2/24")?;
    c.exec(&["ip", "route", "add", "default", "via", "10.0.1.1"])?;
    s.exec(&["ip", "route", "add", "default", "via", "10.9.0.1"])?;
    for g in [&a, &b] {
        g.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
    }
    Ok(Topo { c, a, b, s })
}

fn direct_routes(t: &Topo) -> Result<()> {
    t.a.exec(&["ip", "route", "add", "10.9.0.0/24", "via", "192.0.2.2"])?;
    t.b.exec(&["ip", "route", "add", "10.0.1.0/24", "via", "192.0.2.1"])?;
    Ok(())
}

fn tunnel_routes(t: &Topo, extra: &[&str], more: &[&str]) -> Result<Vec<ChildGuard>> {
    let bin = std::env::current_exe()?.with_file_name("tunnel-pipe");
    if !bin.exists() {
        bail!(
            "{} not found: cargo build --release -p tunnel -p tests",
            bin.display()
        );
    }
    let mut kids = Vec::new();
    for (ns, local, peer, net) in [
        (&t.a, "192.0.2.1", "192.0.2.2", "10.9.0.0/24"),
        (&t.b, "192.0.2.2", "192.0.2.1", "10.0.1.0/24"),
    ] {
        let tun = unique("bt");
        let mut cmd = ns.command(bin.to_str().context("path")?);
        cmd.args(["--tun", &tun, "--local", local, "--peer", peer])
            .args(extra)
            .args(more)
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child = ChildGuard::spawn(&mut cmd)?;
        let out = child
            .0
            .as_mut()
            .and_then(|c| c.stdout.take())
            .context("stdout")?;
        let mut line = String::new();
        BufReader::new(out).read_line(&mut line)?;
        if line.trim() != "ready" {
            bail!("tunnel-pipe did not start");
        }
        ns.exec(&["ip", "route", "replace", net, "dev", &tun])?;
        kids.push(child);
    }
    Ok(kids)
}

/// Busy and total CPU time of the whole machine so far (`/proc/stat`,
/// clock ticks): busy is everything but idle and I/O wait.
fn cpu_ticks() -> Result<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().context("empty /proc/stat")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    Ok((total - idle, total))
}

/// Bytes per second from client to server over `flows` TCP connections,
/// and the cores the machine kept busy meanwhile.
fn throughput(t: &Topo, flows: usize, secs: u64, port: u16) -> Result<(f64, f64)> {
    let at: SocketAddr = format!("10.9.0.2:{port}").parse()?;
    let l = in_netns(&t.s.name, move || TcpListener::bind(at))??;
    let received = Arc::new(AtomicU64::new(0));
    let r = received.clone();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut conn) = conn else { break };
            let r = r.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 1 << 16];
                while let Ok(n) = conn.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    r.fetch_add(n as u64, Ordering::Relaxed);
                }
            });
        }
    });
    let stop = Arc::new(AtomicBool::new(false));
    let mut senders = Vec::new();
    for _ in 0..flows {
        let mut s = in_netns(&t.c.name, move || {
            TcpStream::connect_timeout(&at, Duration::from_secs(5))
        })??;
        // a dead path must not hold a sender in write() forever
        s.set_write_timeout(Some(Duration::from_secs(2)))?;
        let stop = stop.clone();
        senders.push(std::thread::spawn(move || {
            let buf = vec![0x5au8; 1 << 16];
            while !stop.load(Ordering::Relaxed) {
                if s.write_all(&buf).is_err() {
                    break;
                }
            }
        }));
    }
    std::thread::sleep(Duration::from_millis(500)); // ramp up
    let start_bytes = received.load(Ordering::Relaxed);
    let cpu0 = cpu_ticks()?;
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(secs) && !tests::interrupt::interrupted() {
        std::thread::sleep(Duration::from_millis(100));
    }
    let bytes = received.load(Ordering::Relaxed) - start_bytes;
    let rate = bytes as f64 / t0.elapsed().as_secs_f64();
    let cpu1 = cpu_ticks()?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let busy = (cpu1.0 - cpu0.0) as f64 / ((cpu1.1 - cpu0.1).max(1) as f64) * cores;
    stop.store(true, Ordering::Relaxed);
    for s in senders {
        let _ = s.join();
    }
    tests::interrupt::check()?;
    Ok((rate, busy))
}

/// Median and p99 UDP round trip, microseconds, at low load.
fn latency(t: &Topo, n: usize, port: u16) -> Result<(f64, f64)> {
    let at: SocketAddr = format!("10.9.0.2:{port}").parse()?;
    let srv = in_netns(&t.s.name, move || UdpSocket::bind(at))??;
    std::thread::spawn(move || {
        let mut buf = [0u8; 256];
        while let Ok((n, from)) = srv.recv_from(&mut buf) {
            let _ = srv.send_to(&buf[..n], from);
        }
    });
    let cli = in_netns(&t.c.name, || UdpSocket::bind("10.0.1.2:0"))??;
    cli.set_read_timeout(Some(Duration::from_secs(1)))?;
    let mut rtts = Vec::with_capacity(n);
    let mut buf = [0u8; 256];
    for i in 0..n + 100 {
        tests::interrupt::check()?;
        let t0 = Instant::now();
        cli.send_to(&(i as u64).to_be_bytes(), at)?;
        let (got, _) = cli.recv_from(&mut buf)?;
        if got == 8 && i >= 100 {
            rtts.push(t0.elapsed().as_secs_f64() * 1e6);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    rtts.sort_by(|a, b| a.total_cmp(b));
    let p = |q: f64| rtts[((rtts.len() - 1) as f64 * q) as usize];
    Ok((p(0.5), p(0.99)))
}

struct Row {
    path: &'static str,
    one: f64,
    /// Cores busy during the 1-flow run.
    busy: f64,
    sixteen: f64,
    rtt_med: f64,
    rtt_p99: f64,
}

fn main() -> Result<()> {
    let args = Args::parse();
    // Ctrl-C or a TERM: the guards still remove the namespaces
    tests::interrupt::install();
    if !tests::netns::available() {
        bail!("needs root (network namespaces)");
    }
    let mut rows = Vec::new();
    for (path, tunnelled, extra) in [
        ("direct (kernel routing)", false, &[][..]),
        (
            "IP-in-IP, full-size segments (re-cut to fit, the rest fragmented)",
            true,
            &[][..],
        ),
        ("IP-in-IP, MSS clamped", true, &["--clamp-mss"][..]),
        (
            "FOU, full-size segments (re-cut to fit, the rest fragmented)",
            true,
            &["--kind", "fou"][..],
        ),
        (
            "FOU, MSS clamped",
            true,
            &["--kind", "fou", "--clamp-mss"][..],
        ),
        (
            "FOU, MSS clamped, no polling (--spin-us 0)",
            true,
            &["--kind", "fou", "--clamp-mss", "--spin-us", "0"][..],
        ),
    ] {
        if tunnelled
            && args
                .only
                .as_ref()
                .is_some_and(|o| !path.contains(o.as_str()))
        {
            continue;
        }
        let t = topo()?;
        let _kids = if tunnelled {
            let more: Vec<&str> = args
                .pipe_args
                .as_deref()
                .map(|a| a.split_whitespace().collect())
                .unwrap_or_default();
            tunnel_routes(&t, extra, &more)?
        } else {
            direct_routes(&t)?;
            Vec::new()
        };
        eprintln!("== {path}");
        let (rtt_med, rtt_p99) = latency(&t, args.pings, 7001)?;
        let (one, busy) = throughput(&t, 1, args.seconds, 7002)?;
        let (sixteen, _) = throughput(&t, 16, args.seconds, 7003)?;
        eprintln!(
            "{path}: 1 flow {:.0} Mbit/s, 16 flows {:.0} Mbit/s, rtt {rtt_med:.0} µs",
            one * 8e-6,
            sixteen * 8e-6
        );
        rows.push(Row {
            path,
            one,
            busy,
            sixteen,
            rtt_med,
            rtt_p99,
        });
        let _ = (&t.a, &t.b);
    }
    let host = tests::bed::cpu_model();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let d = &rows[0];
    let mut md = format!(
        "# Tunnel benchmark\n\nFour namespaces (client, gateway A, gateway B, server) joined by veth pairs, MTU 1500 everywhere; the same topology \
routed directly by the kernels, then through the userspace tunnel (`tunnel-pipe`, the gateways' data-plane code), IP-in-IP (raw sockets) and FOU (UDP). \
Client and server are TCP/UDP sockets in the end namespaces; everything shares the machine's {cores} cores ({host}), \
so ratios are the measure. Throughput: bulk TCP for {} s after a 0.5 s ramp. Latency: {} UDP round trips of 8 bytes, one at a time (1 ms apart). \
Command: `sudo target/release/bench-tunnel --seconds {} --pings {}`.\n\n\
| path | 1 flow Mbit/s | 16 flows Mbit/s | RTT median µs | RTT p99 µs | ÷ direct, 1 flow | ÷ direct, 16 flows | added RTT µs | cores busy, 1 flow | CPU s per GB, 1 flow |\n|---|---|---|---|---|---|---|---|---|---|\n",
        args.seconds, args.pings, args.seconds, args.pings
    );
    for r in &rows {
        md.push_str(&format!(
            "| {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.2} | {:.2} | {:.0} | {:.2} | {:.2} |\n",
            r.path,
            r.one * 8e-6,
            r.sixteen * 8e-6,
            r.rtt_med,
            r.rtt_p99,
            r.one / d.one,
            r.sixteen / d.sixteen,
            r.rtt_med - d.rtt_med,
            r.busy,
            r.busy / (r.one * 1e-9)
        ));
    }
    md.push_str(&format!(
        "\nTargets: ≥ 0.70 of the direct path's throughput, < 100 µs added round trip. \
Full-size segments are those of connections opened before the switch (MSS 1460: 1500-byte packets, too big for the tunnel); \
MSS-clamped ones are those of connections opened through the tunnel. \
Cores busy: the whole machine's CPU use during the 1-flow run (`/proc/stat`, out of {cores}); CPU s per GB: that divided by the rate.\n\n\
How packets move: the TUN device has offloads on, so a gateway reads 64 KiB TCP super-packets and cuts them into segments that fit \
the tunnel (finer than the sender's when needed: only packets that come alone and too big are fragmented outside), and writes \
consecutive segments of a flow as one super-packet again, straight from the receive buffers (`writev`). The outer sockets move \
batches (`sendmmsg`/`recvmmsg`); FOU hands the kernel a train of equal-size datagrams as one message (UDP GSO) and reads them \
coalesced (UDP GRO), so between the gateways a super-packet stays one buffer. IP-in-IP on a raw socket has no such path and pays \
the kernel's per-packet cost. Each gateway's data plane is one thread that keeps polling for 2 ms after a packet (`--spin-us`, \
default 2000) before it sleeps: on this virtual machine a sleeping thread's wake-up costs about 55 µs per hop, four hops per round \
trip. With all four parties on 2 cores the tunnel path is CPU-bound (it copies every byte four more times than the direct path, \
which moves 64 KiB super-packets through the veths end to end on one core); 16 flows gain nothing over one for the same reason.\n",
        ));
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, &md)?;
    println!("{md}");
    Ok(())
}
