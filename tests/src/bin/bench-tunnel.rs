//! Tunnel benchmark: throughput and round-trip latency through the
//! userspace IP-in-IP and FOU tunnels (`tunnel-pipe`, the gateways' data plane code)
//! and through their kernel fast path (`tunnel-pipe --fast-path`), versus
//! the direct routed path between the same four namespaces, in the same
//! run. Writes bench/results/tunnel.md.
//!
//! ```text
//!  client 10.0.1.2 ── [gwA] ══ 192.0.2.0/24, MTU 1500 ══ [gwB] ── 10.9.0.2 server
//! ```
//! `sudo target/release/bench-tunnel [--seconds 5] [--rounds 3]` (build first:
//! `cargo build --release -p tunnel -p tests`).

use std::io::{BufRead as _, BufReader};
use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use tests::load::{median, throughput};
use tests::netns::{in_netns, unique, veth, Netns};
use tests::proc::ChildGuard;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    #[arg(long, default_value_t = 2000)]
    pings: usize,
    /// Rounds: every path is measured once per round; the table gives
    /// medians.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
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
    let (ca, ac) = veth(&c, "10.0.1.2/24", &a, "10.0.1.1/24")?;
    let (ab, ba) = veth(&a, "192.0.2.1/24", &b, "192.0.2.2/24")?;
    let (bs, sb) = veth(&b, "10.9.0.1/24", &s, "10.9.0.2/24")?;
    // IPv6 beside IPv4 at the ends and between the gateways (for the
    // direct path; the tunnels' outer addresses stay IPv4)
    for (ns, addr, dev) in [
        (&c, "fd00:1::2/64", &ca),
        (&a, "fd00:1::1/64", &ac),
        (&a, "fd00:2::1/64", &ab),
        (&b, "fd00:2::2/64", &ba),
        (&b, "fd00:9::1/64", &bs),
        (&s, "fd00:9::2/64", &sb),
    ] {
        ns.exec(&["ip", "-6", "addr", "add", addr, "dev", dev, "nodad"])?;
    }
    c.exec(&["ip", "route", "add", "default", "via", "10.0.1.1"])?;
    s.exec(&["ip", "route", "add", "default", "via", "10.9.0.1"])?;
    c.exec(&["ip", "-6", "route", "add", "default", "via", "fd00:1::1"])?;
    s.exec(&["ip", "-6", "route", "add", "default", "via", "fd00:9::1"])?;
    for g in [&a, &b] {
        g.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        g.exec(&["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])?;
    }
    Ok(Topo { c, a, b, s })
}

fn direct_routes(t: &Topo) -> Result<()> {
    t.a.exec(&["ip", "route", "add", "10.9.0.0/24", "via", "192.0.2.2"])?;
    t.b.exec(&["ip", "route", "add", "10.0.1.0/24", "via", "192.0.2.1"])?;
    t.a.exec(&[
        "ip",
        "-6",
        "route",
        "add",
        "fd00:9::/64",
        "via",
        "fd00:2::2",
    ])?;
    t.b.exec(&[
        "ip",
        "-6",
        "route",
        "add",
        "fd00:1::/64",
        "via",
        "fd00:2::1",
    ])?;
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
    for (ns, local, peer, net, net6) in [
        (&t.a, "192.0.2.1", "192.0.2.2", "10.9.0.0/24", "fd00:9::/64"),
        (&t.b, "192.0.2.2", "192.0.2.1", "10.0.1.0/24", "fd00:1::/64"),
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
        ns.exec(&["ip", "-6", "route", "replace", net6, "dev", &tun])?;
        kids.push(child);
    }
    Ok(kids)
}

/// Median and p99 UDP round trip, microseconds, at low load.
fn latency(t: &Topo, v6: bool, n: usize, port: u16) -> Result<(f64, f64)> {
    let at = server(v6, port)?;
    let srv = in_netns(&t.s.name, move || UdpSocket::bind(at))??;
    std::thread::spawn(move || {
        let mut buf = [0u8; 256];
        while let Ok((n, from)) = srv.recv_from(&mut buf) {
            let _ = srv.send_to(&buf[..n], from);
        }
    });
    let from = if v6 { "[fd00:1::2]:0" } else { "10.0.1.2:0" };
    let cli = in_netns(&t.c.name, move || UdpSocket::bind(from))??;
    cli.set_read_timeout(Some(Duration::from_secs(1)))?;
    let mut rtts = Vec::with_capacity(n);
    let mut buf = [0u8; 256];
    for i in 0..n + 100 {
        tests::interrupt::check()?;
        let t0 = Instant::now();
        let sent = (i as u64).to_be_bytes();
        cli.send_to(&sent, at)?;
        // this round trip's echo: a late one of an earlier datagram is
        // skipped, not timed
        let echoed = loop {
            match cli.recv_from(&mut buf) {
                Ok((8, _)) if buf[..8] == sent => break true,
                Ok(_) => {}
                // the first hundred warm the path up (IPv6 neighbour
                // discovery may take a second on a fresh bed)
                Err(_) if i < 100 => break false,
                Err(e) => return Err(e).context("no echo within a second"),
            }
        };
        if echoed && i >= 100 {
            rtts.push(t0.elapsed().as_secs_f64() * 1e6);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    rtts.sort_by(|a, b| a.total_cmp(b));
    let p = |q: f64| rtts[((rtts.len() - 1) as f64 * q) as usize];
    Ok((p(0.5), p(0.99)))
}

/// One path's figures in one round.
#[derive(Clone, Copy)]
struct Sample {
    one: f64,
    /// Cores busy during the 1-flow run.
    busy: f64,
    sixteen: f64,
    busy16: f64,
    rtt_med: f64,
    rtt_p99: f64,
}

/// The server's address and `port`, IPv6 or IPv4.
fn server(v6: bool, port: u16) -> Result<SocketAddr> {
    Ok(if v6 {
        format!("[fd00:9::2]:{port}")
    } else {
        format!("10.9.0.2:{port}")
    }
    .parse()?)
}

/// The paths measured: name, tunnelled, tunnel-pipe arguments (an IPv6
/// path's name says so; it is compared with the direct IPv6 path).
const PATHS: [(&str, bool, &[&str]); 13] = [
    ("direct (kernel routing)", false, &[]),
    (
        "IP-in-IP, full-size segments (re-cut to fit, the rest fragmented)",
        true,
        &[],
    ),
    ("IP-in-IP, MSS clamped", true, &["--clamp-mss"]),
    (
        "FOU, full-size segments (re-cut to fit, the rest fragmented)",
        true,
        &["--kind", "fou"],
    ),
    ("FOU, MSS clamped", true, &["--kind", "fou", "--clamp-mss"]),
    (
        "FOU, MSS clamped, no polling (--spin-us 0)",
        true,
        &["--kind", "fou", "--clamp-mss", "--spin-us", "0"],
    ),
    (
        "IP-in-IP, kernel fast path (--fast-path), full-size segments",
        true,
        &["--fast-path"],
    ),
    (
        "FOU, kernel fast path (--fast-path), full-size segments",
        true,
        &["--kind", "fou", "--fast-path"],
    ),
    (
        "FOU, kernel fast path (--fast-path), MSS clamped",
        true,
        &["--kind", "fou", "--fast-path", "--clamp-mss"],
    ),
    ("IPv6: direct (kernel routing)", false, &[]),
    (
        "IPv6: FOU, MSS clamped",
        true,
        &["--kind", "fou", "--clamp-mss"],
    ),
    (
        "IPv6: 6in4 (IP-in-IP), kernel fast path (--fast-path), full-size segments",
        true,
        &["--fast-path"],
    ),
    (
        "IPv6: FOU, kernel fast path (--fast-path), full-size segments",
        true,
        &["--kind", "fou", "--fast-path"],
    ),
];

/// Whether path `name` carries IPv6 inside.
fn is_v6(name: &str) -> bool {
    name.starts_with("IPv6")
}

/// Builds the bed for one path and measures it.
fn measure(args: &Args, v6: bool, tunnelled: bool, extra: &[&str]) -> Result<Sample> {
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
    let (rtt_med, rtt_p99) = latency(&t, v6, args.pings, 7001)?;
    let (c, srv) = (&t.c.name, &t.s.name);
    let (one, busy) = throughput(c, srv, server(v6, 7002)?, 1, args.seconds)?;
    let (sixteen, busy16) = throughput(c, srv, server(v6, 7003)?, 16, args.seconds)?;
    Ok(Sample {
        one,
        busy,
        sixteen,
        busy16,
        rtt_med,
        rtt_p99,
    })
}

fn main() -> Result<()> {
    let args = Args::parse();
    // Ctrl-C or a TERM: the guards still remove the namespaces
    tests::interrupt::install();
    if !tests::netns::available() {
        bail!("needs root (network namespaces)");
    }
    if args.rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    let paths: Vec<(&str, bool, &[&str])> = PATHS
        .iter()
        .copied()
        .filter(|(path, _, _)| {
            // the direct paths always: the ratios need them
            path.contains("direct") || args.only.as_ref().is_none_or(|o| path.contains(o.as_str()))
        })
        .collect();
    // samples[path][round]; each round measures every path once, so a
    // ratio compares figures taken minutes apart at most
    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); paths.len()];
    for round in 1..=args.rounds {
        for (i, (path, tunnelled, extra)) in paths.iter().enumerate() {
            eprintln!("== round {round}/{}: {path}", args.rounds);
            let s = measure(&args, is_v6(path), *tunnelled, extra)?;
            eprintln!(
                "{path}: 1 flow {:.0} Mbit/s, 16 flows {:.0} Mbit/s, rtt {:.0} µs",
                s.one * 8e-6,
                s.sixteen * 8e-6,
                s.rtt_med
            );
            samples[i].push(s);
        }
    }
    let host = tests::bed::cpu_model();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    // the direct path of each family
    let direct_of = |v6: bool| {
        paths
            .iter()
            .position(|(p, t, _)| !t && is_v6(p) == v6)
            .map(|i| &samples[i])
    };
    let mut md = format!(
        "# Tunnel benchmark\n\nFour namespaces (client, gateway A, gateway B, server) joined by veth pairs, MTU 1500 everywhere; the same topology \
routed directly by the kernels, then through the userspace tunnel (`tunnel-pipe`, the gateways' data-plane code), IP-in-IP (raw sockets) and FOU (UDP), \
and through its kernel fast path; IPv4 inside, and IPv6 in the rows that say so (compared with the direct path for IPv6; the \
tunnels' outer addresses are IPv4 throughout). \
Client and server are TCP/UDP sockets in the end namespaces; everything shares the machine's {cores} cores ({host}), \
so ratios are the measure. Throughput: bulk TCP for {} s after a 0.5 s ramp. Latency: {} UDP round trips of 8 bytes, one at a time (1 ms apart). \
{} rounds, each measuring every path once in turn; each figure is the median over the rounds, each ratio the median of the rounds' ratios \
(a path against the direct path of the same round: this machine's speed drifts by a quarter between minutes). \
Command: `sudo target/release/bench-tunnel --seconds {} --pings {} --rounds {}`.\n\n\
| path | 1 flow Mbit/s | 16 flows Mbit/s | RTT median µs | RTT p99 µs | ÷ direct, 1 flow (min–max) | ÷ direct, 16 flows (min–max) | added RTT µs | cores busy, 1 / 16 flows | CPU s per GB, 1 / 16 flows |\n|---|---|---|---|---|---|---|---|---|---|\n",
        args.seconds, args.pings, args.rounds, args.seconds, args.pings, args.rounds
    );
    for ((path, _, _), s) in paths.iter().zip(&samples) {
        let direct = direct_of(is_v6(path)).context("no direct path measured")?;
        let m = |f: fn(&Sample) -> f64| median(s.iter().map(f).collect());
        let ratios = |f: fn(&Sample) -> f64| -> (f64, f64, f64) {
            let r: Vec<f64> = s.iter().zip(direct).map(|(x, d)| f(x) / f(d)).collect();
            let lo = r.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = r.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            (median(r), lo, hi)
        };
        let (r1, r1lo, r1hi) = ratios(|x| x.one);
        let (r16, r16lo, r16hi) = ratios(|x| x.sixteen);
        let added = median(
            s.iter()
                .zip(direct)
                .map(|(x, d)| x.rtt_med - d.rtt_med)
                .collect(),
        );
        md.push_str(&format!(
            "| {path} | {:.0} | {:.0} | {:.0} | {:.0} | {r1:.2} ({r1lo:.2}–{r1hi:.2}) | {r16:.2} ({r16lo:.2}–{r16hi:.2}) | {added:.0} | {:.2} / {:.2} | {:.2} / {:.2} |\n",
            m(|x| x.one) * 8e-6,
            m(|x| x.sixteen) * 8e-6,
            m(|x| x.rtt_med),
            m(|x| x.rtt_p99),
            m(|x| x.busy),
            m(|x| x.busy16),
            m(|x| x.busy / (x.one * 1e-9)),
            m(|x| x.busy16 / (x.sixteen * 1e-9)),
        ));
    }
    md.push_str(&format!(
        "\nTargets: ≥ 0.70 of the direct path's throughput, < 100 µs added round trip. \
Full-size segments are those of connections opened before the switch (MSS 1460: 1500-byte packets, too big for the tunnel); \
MSS-clamped ones are those of connections opened through the tunnel. \
Cores busy: the whole machine's CPU use during a throughput run (`/proc/stat`, out of {cores}); CPU s per GB: that divided by the rate.\n\n\
How packets move: the TUN device has offloads on, so a gateway reads 64 KiB TCP super-packets and cuts them into segments that fit \
the tunnel (finer than the sender's when needed: only packets that come alone and too big are fragmented outside), and writes \
consecutive segments of a flow as one super-packet again, straight from the receive buffers (`writev`). The outer sockets move \
batches (`sendmmsg`/`recvmmsg`); FOU hands the kernel a train of equal-size datagrams as one message (UDP GSO) and reads them \
coalesced (UDP GRO), so between the gateways a super-packet stays one buffer. IP-in-IP on a raw socket has no such path and pays \
the kernel's per-packet cost. Each gateway's data plane is one thread that keeps polling for 2 ms after a packet (`--spin-us`, \
default 2000) before it sleeps: on this virtual machine a sleeping thread's wake-up costs about 55 µs per hop, four hops per round \
trip.\n\n\
Why the userspace tunnel stays far below 0.70 with 16 flows here: the direct path moves 64 KiB super-packets through the veths \
and copies each byte twice (into the sender's socket, out of the receiver's); with 16 flows it fills both cores. The userspace \
tunnel copies each byte four more times (out of and into a TUN device, into and out of a UDP socket), checksums it twice and \
crosses the kernel's stack twice more, on the same 2 cores: with 16 flows the machine is just as full (see cores busy), so the \
ratio is the ratio of CPU per GB, whatever the threading.\n\n\
The kernel fast path (`tunnel-pipe --fast-path`, `tunnel/bpf/fastpath.bpf.c`) removes those copies: a tc-BPF program on the TUN \
device's egress adds the outer header to the super-packet and sends it out of the WAN interface, another on the WAN interface's \
ingress strips it at the far end and hands the packet to the TUN device's ingress; the kernel cuts the super-packet to fit the \
path, and the program cuts a lone segment too big for the tunnel (the 1500-byte packets of a connection from before the move, \
sent one at a time when its window opens by one segment) in two that fit, as TSO would: so full-size segments need no fragments \
and no trip to userspace. (Before it did, those lone segments, under 1 % of the packets with 16 flows, went to userspace to be \
fragmented and held 16 flows to 0.64 of the direct path: each woke the data-plane thread, which then polled for 2 ms.) \
It carries IPv6 inside as well (6in4, protocol 41, in the IP-in-IP tunnel). Handshakes (SYN, FIN, RST), other protocols, \
IP options, IPv6 extension headers and anything unusual still go through the userspace plane, so the latency column (UDP) is \
the userspace plane's. The gateway daemon runs the same programs with per-guest rules (`fast_path`, on by default): \
`bench/results/gateway.md`.\n",
        ));
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, &md)?;
    println!("{md}");
    Ok(())
}
