//! The userspace tunnel between real namespaces (needs root):
//!
//! ```text
//!  client 10.0.1.2 ── 10.0.1.1 [gwA] 192.0.2.1 ══ 192.0.2.2 [gwB] 10.9.0.1 ── 10.9.0.2 server
//!                       route 10.9.0.0/24 → tunA    (MTU 1500)   route 10.0.1.0/24 → tunB
//! ```
//! The gateways have no route between the two sides except the tunnel.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use tests::netns::{available, in_netns, unique, veth, Netns};
use tests::proc::ChildGuard;

struct Bed {
    c: Netns,
    a: Netns,
    b: Netns,
    s: Netns,
    _pipes: Vec<ChildGuard>,
    stats_a: PathBuf,
    stats_b: PathBuf,
    _dir: tempfile::TempDir,
}

fn pipe(
    ns: &Netns,
    tun: &str,
    local: &str,
    peer: &str,
    stats: &Path,
    extra: &[&str],
) -> ChildGuard {
    let mut cmd = ns.command(env!("CARGO_BIN_EXE_tunnel-pipe"));
    cmd.args(["--tun", tun, "--local", local, "--peer", peer, "--stats"])
        .arg(stats)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = ChildGuard::spawn(&mut cmd).expect("spawn tunnel-pipe");
    let out = child
        .0
        .as_mut()
        .and_then(|c| c.stdout.take())
        .expect("stdout");
    let mut line = String::new();
    BufReader::new(out).read_line(&mut line).expect("read");
    assert_eq!(line.trim(), "ready", "tunnel-pipe did not start");
    child
}

fn bed(extra: &[&str]) -> Bed {
    bed_with(extra, false, false)
}

/// The bed; with `v6_outer` the gateways talk IPv6 (fd00:2::1 ↔ fd00:2::2);
/// with either, both ends also have IPv6 addresses (fd00:1::2, fd00:9::2)
/// routed through the tunnel.
fn bed_with(extra: &[&str], v6_outer: bool, v6_inside: bool) -> Bed {
    let v6_ends = v6_outer || v6_inside;
    assert!(
        available(),
        "these tests need root and iproute2 (network namespaces)"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let (c, a, b, s) = (
        Netns::new(unique("c")).expect("ns"),
        Netns::new(unique("a")).expect("ns"),
        Netns::new(unique("b")).expect("ns"),
        Netns::new(unique("s")).expect("ns"),
    );
    let (ca, ac) = veth(&c, "10.0.1.2/24", &a, "10.0.1.1/24").expect("veth");
    let (ab, ba) = veth(&a, "192.0.2.1/24", &b, "192.0.2.2/24").expect("veth");
    let (bs, sb) = veth(&b, "10.9.0.1/24", &s, "10.9.0.2/24").expect("veth");
    c.exec(&["ip", "route", "add", "default", "via", "10.0.1.1"])
        .expect("route");
    s.exec(&["ip", "route", "add", "default", "via", "10.9.0.1"])
        .expect("route");
    for g in [&a, &b] {
        g.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])
            .expect("forwarding");
        g.exec(&["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])
            .expect("forwarding");
    }
    let v6 = |ns: &Netns, addr: &str, dev: &str| {
        ns.exec(&["ip", "-6", "addr", "add", addr, "dev", dev, "nodad"])
            .expect("v6 address");
    };
    if v6_outer {
        v6(&a, "fd00:2::1/64", &ab);
        v6(&b, "fd00:2::2/64", &ba);
    }
    if v6_ends {
        v6(&c, "fd00:1::2/64", &ca);
        v6(&a, "fd00:1::1/64", &ac);
        v6(&b, "fd00:9::1/64", &bs);
        v6(&s, "fd00:9::2/64", &sb);
        c.exec(&["ip", "-6", "route", "add", "default", "via", "fd00:1::1"])
            .expect("route");
        s.exec(&["ip", "-6", "route", "add", "default", "via", "fd00:9::1"])
            .expect("route");
    }
    let (la, lb) = if v6_outer {
        ("fd00:2::1", "fd00:2::2")
    } else {
        ("192.0.2.1", "192.0.2.2")
    };
    let (stats_a, stats_b) = (dir.path().join("a.json"), dir.path().join("b.json"));
    let tun_a = unique("ta");
    let tun_b = unique("tb");
    let pa = pipe(&a, &tun_a, la, lb, &stats_a, extra);
    let deliver: &[&str] = if v6_ends {
        &["--deliver", "10.9.0.0/24", "--deliver", "fd00:9::/64"]
    } else {
        &["--deliver", "10.9.0.0/24"]
    };
    let pb = pipe(&b, &tun_b, lb, la, &stats_b, &[extra, deliver].concat());
    a.exec(&["ip", "route", "add", "10.9.0.0/24", "dev", &tun_a])
        .expect("route");
    b.exec(&["ip", "route", "add", "10.0.1.0/24", "dev", &tun_b])
        .expect("route");
    if v6_ends {
        a.exec(&["ip", "-6", "route", "add", "fd00:9::/64", "dev", &tun_a])
            .expect("route");
        b.exec(&["ip", "-6", "route", "add", "fd00:1::/64", "dev", &tun_b])
            .expect("route");
    }
    Bed {
        c,
        a,
        b,
        s,
        _pipes: vec![pa, pb],
        stats_a,
        stats_b,
        _dir: dir,
    }
}

fn stats(path: &Path) -> serde_json::Value {
    // the pipe rewrites the file every 200 ms
    std::thread::sleep(Duration::from_millis(450));
    let text = std::fs::read_to_string(path).expect("stats file");
    serde_json::from_str(&text).expect("stats JSON")
}

/// Deterministic bytes for position `i` of stream `k`.
fn byte(k: u64, i: u64) -> u8 {
    let x = (i ^ (k << 40)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (x >> 56) as u8
}

/// `n` streams of `len` bytes from the client, spread over `servers`,
/// each checked byte for byte ([`echo_stream`]); returns when all are.
fn echo_streams(bed: &Bed, servers: &[SocketAddr], n: u64, len: u64) {
    let conns: Vec<_> = (0..n)
        .map(|k| {
            let (c, server) = (bed.c.name.clone(), servers[k as usize % servers.len()]);
            std::thread::spawn(move || echo_stream(&c, server, k, len))
        })
        .collect();
    for t in conns {
        t.join().expect("stream");
    }
}

/// Sends `len` bytes through an echo server and checks every byte back.
fn echo_stream(ns: &str, to: SocketAddr, k: u64, len: u64) {
    let stream = in_netns(ns, move || {
        TcpStream::connect_timeout(&to, Duration::from_secs(5))
    })
    .expect("netns")
    .expect("connect through the tunnel");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut writer = stream.try_clone().expect("clone");
    let w = std::thread::spawn(move || {
        let mut i = 0u64;
        while i < len {
            let n = (len - i).min(65_536);
            let chunk: Vec<u8> = (i..i + n).map(|j| byte(k, j)).collect();
            writer.write_all(&chunk).expect("write");
            i += n;
        }
        writer
            .shutdown(std::net::Shutdown::Write)
            .expect("shutdown");
    });
    let mut reader = stream;
    let mut got = 0u64;
    let mut buf = vec![0u8; 65_536];
    loop {
        let n = reader.read(&mut buf).expect("read the echo");
        if n == 0 {
            break;
        }
        for (o, b) in buf[..n].iter().enumerate() {
            assert_eq!(
                *b,
                byte(k, got + o as u64),
                "stream {k}: byte {} corrupted",
                got + o as u64
            );
        }
        got += n as u64;
    }
    w.join().expect("writer");
    assert_eq!(got, len, "stream {k}: bytes missing");
}

fn udp_echo_server(ns: &Netns, at: SocketAddr) {
    let srv = in_netns(&ns.name, move || UdpSocket::bind(at))
        .expect("netns")
        .expect("bind");
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = srv.recv_from(&mut buf) {
            let _ = srv.send_to(&buf[..n], from);
        }
    });
}

fn echo_server(ns: &Netns, at: SocketAddr) {
    let listener = in_netns(&ns.name, move || TcpListener::bind(at))
        .expect("netns")
        .expect("bind");
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { break };
            std::thread::spawn(move || {
                let mut back = match conn.try_clone() {
                    Ok(b) => b,
                    Err(_) => return,
                };
                let _ = std::io::copy(&mut conn, &mut back);
                let _ = back.shutdown(std::net::Shutdown::Write);
            });
        }
    });
}

#[test]
fn tcp_and_udp_cross_the_userspace_tunnel_with_full_size_segments() {
    let bed = bed(&[]);
    let server: SocketAddr = "10.9.0.2:7000".parse().expect("addr");
    echo_server(&bed.s, server);
    // three connections, 4 MiB each way, segments as large as the client's 1500-byte link allows
    echo_streams(&bed, &[server], 3, 4 << 20);

    // UDP: 200 full-size datagrams (1500-byte packets), echoed
    let udp_at: SocketAddr = "10.9.0.2:7001".parse().expect("addr");
    udp_echo_server(&bed.s, udp_at);
    let cli = in_netns(&bed.c.name, || UdpSocket::bind("10.0.1.2:0"))
        .expect("netns")
        .expect("bind");
    cli.set_read_timeout(Some(Duration::from_millis(500)))
        .expect("timeout");
    let mut echoed = 0;
    for i in 0..200u64 {
        let d: Vec<u8> = (0..1472).map(|j| byte(100 + i, j)).collect();
        cli.send_to(&d, udp_at).expect("send");
        let mut buf = [0u8; 2048];
        if let Ok((n, _)) = cli.recv_from(&mut buf) {
            assert_eq!(&buf[..n], &d[..], "datagram {i} corrupted");
            echoed += 1;
        }
    }
    assert!(echoed >= 195, "only {echoed}/200 datagrams came back");

    let a = stats(&bed.stats_a);
    let b = stats(&bed.stats_b);
    assert!(a["encapsulated_packets"].as_u64() > Some(1000), "{a}");
    assert!(b["decapsulated_packets"].as_u64() > Some(1000), "{b}");
    // full-size packets: 1500-byte inner packets in 1520-byte outer packets
    // on a 1500-byte path, fragmented and reassembled by the kernels; TCP
    // super-packets are cut to fit instead (every byte checked above)
    assert_eq!(a["largest_encapsulated"].as_u64(), Some(1500), "{a}");
    assert!(a["resegmented"].as_u64() >= Some(1), "{a}");
    assert!(a["flows"].as_u64() >= Some(4), "{a}");
    let drops = b["drops"].as_object().expect("drops");
    let bad: u64 = drops
        .iter()
        .filter(|(k, _)| k.as_str() != "link_local") // the kernels' router solicitations
        .filter_map(|(_, v)| v.as_u64())
        .sum();
    assert_eq!(bad, 0, "{b}");
    let _ = (&bed.a, &bed.b);
}

#[test]
fn mss_is_clamped_for_new_connections() {
    let bed = bed(&["--clamp-mss"]);
    let server: SocketAddr = "10.9.0.2:7000".parse().expect("addr");
    echo_server(&bed.s, server);
    echo_stream(&bed.c.name, server, 7, 1 << 20);
    let a = stats(&bed.stats_a);
    assert!(a["mss_clamped"].as_u64() >= Some(1), "{a}");
    // MSS 1460 → 1440: no inner packet above the tunnel MTU of 1480
    assert!(a["largest_encapsulated"].as_u64() <= Some(1480), "{a}");
}

#[test]
fn foreign_and_malformed_tunnel_packets_are_counted_and_not_delivered() {
    foreign_and_malformed(&[]);
}

/// The same with the kernel fast path on: it leaves every such packet to
/// the userspace plane.
#[test]
fn foreign_and_malformed_tunnel_packets_are_counted_with_the_fast_path_on() {
    foreign_and_malformed(&["--fast-path"]);
}

fn foreign_and_malformed(extra: &[&str]) {
    let bed = bed(extra);
    impostor_address(&bed);
    let inner_to_client = {
        let mut v = Vec::new();
        etherparse::PacketBuilder::ipv4([10, 9, 0, 2], [10, 0, 1, 2], 64)
            .udp(9, 9)
            .write(&mut v, b"spoofed")
            .expect("build");
        v
    };
    // a listener at the client must receive none of it
    let cli = in_netns(&bed.c.name, || UdpSocket::bind("10.0.1.2:9"))
        .expect("netns")
        .expect("bind");
    cli.set_read_timeout(Some(Duration::from_millis(700)))
        .expect("timeout");
    let send = |from: &'static str, payload: Vec<u8>| {
        in_netns(&bed.b.name, move || {
            use socket2::{Domain, Protocol, Socket, Type};
            let s = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::from(4))).expect("raw");
            let bind: SocketAddr = format!("{from}:0").parse().expect("addr");
            s.bind(&bind.into()).expect("bind");
            let to: SocketAddr = "192.0.2.1:0".parse().expect("addr");
            s.send_to(&payload, &to.into()).expect("send");
        })
        .expect("netns");
    };
    send("192.0.2.3", inner_to_client.clone()); // not the configured peer
    send("192.0.2.2", inner_to_client[..15].to_vec()); // truncated inner
    let mut six = inner_to_client.clone();
    six[0] = 0x65; // claims IPv6 inside protocol 4
    send("192.0.2.2", six);
    let mut buf = [0u8; 64];
    assert!(
        cli.recv_from(&mut buf).is_err(),
        "a bad tunnel packet was delivered"
    );
    let a = stats(&bed.stats_a);
    assert_eq!(a["drops"]["unknown_peer"].as_u64(), Some(1), "{a}");
    assert_eq!(a["drops"]["inner_malformed"].as_u64(), Some(2), "{a}");
    assert_eq!(a["decapsulated_packets"].as_u64(), Some(0), "{a}");

    // and the same packet from the real peer is delivered
    send("192.0.2.2", inner_to_client);
    let (n, _) = cli.recv_from(&mut buf).expect("delivered from the peer");
    assert_eq!(&buf[..n], b"spoofed");
}

/// Gives gateway B a second outer address, 192.0.2.3: a host on the path
/// that is not A's configured peer.
fn impostor_address(bed: &Bed) {
    bed.b
        .exec(&[
            "ip",
            "addr",
            "add",
            "192.0.2.3/24",
            "dev",
            &veth_of(&bed.b, "192.0.2.2"),
        ])
        .expect("addr");
}

/// The name of the interface holding `addr` in `ns`.
fn veth_of(ns: &Netns, addr: &str) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.name, "ip", "-o", "-4", "addr", "show"])
        .output()
        .expect("ip addr");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.contains(&format!("{addr}/")))
        .and_then(|l| l.split_whitespace().nth(1))
        .map(|s| s.to_string())
        .expect("interface")
}

#[test]
fn ipv4_and_ipv6_cross_a_tunnel_over_ipv6() {
    let bed = bed_with(&[], true, false);
    // 4in6: TCP with full-size segments
    let server: SocketAddr = "10.9.0.2:7000".parse().expect("addr");
    echo_server(&bed.s, server);
    echo_stream(&bed.c.name, server, 3, 2 << 20);
    // 6in6: UDP; datagrams carry their number, so an echo that arrives late
    // (the first ones wait for neighbour discovery) still matches
    let at: SocketAddr = "[fd00:9::2]:7001".parse().expect("addr");
    udp_echo_server(&bed.s, at);
    let cli = in_netns(&bed.c.name, || UdpSocket::bind("[fd00:1::2]:0"))
        .expect("netns")
        .expect("bind");
    cli.set_read_timeout(Some(Duration::from_millis(500)))
        .expect("timeout");
    let datagram = |i: u64| -> Vec<u8> {
        let mut d = i.to_be_bytes().to_vec();
        d.extend((0..1200).map(|j| byte(500 + i, j)));
        d
    };
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..50u64 {
        cli.send_to(&datagram(i), at).expect("send");
        let mut buf = [0u8; 2048];
        while let Ok((n, _)) = cli.recv_from(&mut buf) {
            let mut seq = [0u8; 8];
            seq.copy_from_slice(&buf[..8]);
            let seq = u64::from_be_bytes(seq);
            assert_eq!(&buf[..n], &datagram(seq)[..], "datagram {} corrupted", seq);
            seen.insert(seq);
            if seq == i {
                break;
            }
        }
    }
    assert!(
        seen.len() >= 48,
        "only {}/50 IPv6 datagrams came back",
        seen.len()
    );
    // 4in6: a full-size UDP datagram, fragmented outside
    let at4: SocketAddr = "10.9.0.2:7002".parse().expect("addr");
    udp_echo_server(&bed.s, at4);
    let cli4 = in_netns(&bed.c.name, || UdpSocket::bind("10.0.1.2:0"))
        .expect("netns")
        .expect("bind");
    cli4.set_read_timeout(Some(Duration::from_millis(500)))
        .expect("timeout");
    let full: Vec<u8> = (0..1472).map(|j| byte(900, j)).collect();
    let mut back = false;
    for _ in 0..5 {
        cli4.send_to(&full, at4).expect("send");
        let mut buf = [0u8; 2048];
        if let Ok((n, _)) = cli4.recv_from(&mut buf) {
            assert_eq!(&buf[..n], &full[..], "full-size datagram corrupted");
            back = true;
            break;
        }
    }
    assert!(back, "the full-size datagram never came back");
    let a = stats(&bed.stats_a);
    assert_eq!(a["largest_encapsulated"].as_u64(), Some(1500), "{a}");
    assert!(a["resegmented"].as_u64() >= Some(1), "{a}");
    let _ = (&bed.a, &bed.b);
}

#[test]
fn with_pmtu_signalling_full_size_segments_shrink_instead_of_fragmenting() {
    let bed = bed(&["--signal-pmtu"]);
    let server: SocketAddr = "10.9.0.2:7000".parse().expect("addr");
    echo_server(&bed.s, server);
    echo_stream(&bed.c.name, server, 9, 1 << 20);
    let a = stats(&bed.stats_a);
    assert!(a["icmp_too_big"].as_u64() >= Some(1), "{a}");
    assert!(a["largest_encapsulated"].as_u64() <= Some(1480), "{a}");
    let _ = (&bed.a, &bed.b);
}

/// The kernel fast path (`--fast-path`) carries the bulk of TCP streams
/// both ways, IPv4 and IPv6 inside, every byte checked, in both kinds of
/// tunnel; the handshakes still come through the userspace plane, and
/// nothing is dropped.
#[test]
fn the_kernel_fast_path_carries_tcp_streams_whole() {
    for kind in [&["--kind", "fou"][..], &[][..]] {
        let bed = bed_with(&[kind, &["--fast-path"]].concat(), false, true);
        let servers: Vec<SocketAddr> = ["10.9.0.2:7000", "[fd00:9::2]:7000"]
            .iter()
            .map(|a| a.parse().expect("addr"))
            .collect();
        for s in &servers {
            echo_server(&bed.s, *s);
        }
        echo_streams(&bed, &servers, 6, 8 << 20);
        let (a, b) = (stats(&bed.stats_a), stats(&bed.stats_b));
        let n = |v: &serde_json::Value, k: &str| v[k].as_u64().unwrap_or(0);
        for (side, s, out, into) in [("A", &a, "encap", "decap"), ("B", &b, "decap", "encap")] {
            let fast = &s["fast_path"];
            assert_eq!(n(fast, "errors"), 0, "{side}: {s}");
            // 24 MiB each way in each family: nearly all of it in the kernel
            assert!(n(fast, &format!("{out}_bytes")) > 44 << 20, "{side}: {s}");
            assert!(n(fast, &format!("{into}_bytes")) > 44 << 20, "{side}: {s}");
            // the handshakes went through userspace (clamped or counted as flows)
            assert!(n(s, "flows") >= 6, "{side}: {s}");
            let drops = s["drops"].as_object().expect("drops");
            let bad: u64 = drops
                .iter()
                .filter(|(k, _)| k.as_str() != "link_local")
                .filter_map(|(_, v)| v.as_u64())
                .sum();
            assert_eq!(bad, 0, "{side}: {s}");
        }
        // the totals include what the kernel carried
        assert!(
            n(&a, "encapsulated_bytes") >= n(&a["fast_path"], "encap_bytes"),
            "{a}"
        );
    }
}

/// A TCP segment from a host that is not the peer is not taken by the
/// fast path: it reaches the userspace plane, which drops and counts it.
#[test]
fn the_kernel_fast_path_leaves_foreign_segments_to_be_dropped() {
    let bed = bed(&["--kind", "fou", "--fast-path"]);
    impostor_address(&bed);
    let segment = {
        let mut v = Vec::new();
        etherparse::PacketBuilder::ipv4([10, 9, 0, 2], [10, 0, 1, 2], 64)
            .tcp(80, 40000, 1, 1000)
            .ack(1)
            .write(&mut v, b"not from the peer")
            .expect("build");
        v
    };
    in_netns(&bed.b.name, move || {
        let s = UdpSocket::bind("192.0.2.3:5555").expect("bind");
        s.send_to(&segment, "192.0.2.1:5555").expect("send");
    })
    .expect("netns");
    let a = stats(&bed.stats_a);
    assert_eq!(a["drops"]["unknown_peer"].as_u64(), Some(1), "{a}");
    assert_eq!(a["fast_path"]["decap_packets"].as_u64(), Some(0), "{a}");
    assert_eq!(a["decapsulated_packets"].as_u64(), Some(0), "{a}");
}

/// Lone segments too big for the tunnel (a connection from before the
/// move sends 1500-byte packets) are cut in two by the kernel fast path,
/// as TSO would, instead of going to userspace to be fragmented: every
/// byte arrives, in both kinds of tunnel, whether the client's segments
/// carry a checksum for the hardware to finish (CHECKSUM_PARTIAL, as veth
/// passes them on) or a full one that the server checks (the client's
/// checksum offload off), over IPv4 and IPv6.
#[test]
fn the_kernel_fast_path_cuts_lone_full_size_segments_in_two() {
    for (kind, offloads, at) in [&["--kind", "fou"][..], &[][..]]
        .into_iter()
        .flat_map(|k| {
            [&["gso", "off", "tso", "off"][..], &["tx", "off"][..]]
                .into_iter()
                .map(move |o| (k, o))
        })
        .flat_map(|(k, o)| ["10.9.0.2:7000", "[fd00:9::2]:7000"].map(|a| (k, o, a)))
    {
        let bed = bed_with(&[kind, &["--fast-path"]].concat(), false, true);
        // no super-packets from the client: every segment comes alone
        let dev = veth_of(&bed.c, "10.0.1.2");
        bed.c
            .exec(&[&["ethtool", "-K", &dev][..], offloads].concat())
            .expect("ethtool");
        let server: SocketAddr = at.parse().expect("addr");
        echo_server(&bed.s, server);
        echo_streams(&bed, &[server], 2, 4 << 20);
        let a = stats(&bed.stats_a);
        let fast = &a["fast_path"];
        let n = |v: &serde_json::Value, k: &str| v[k].as_u64().unwrap_or(0);
        let what = format!("{kind:?} {offloads:?} {at}: {a}");
        assert_eq!(n(fast, "errors"), 0, "{what}");
        // 8 MiB in segments of at most 1448 (IPv6: 1428) bytes, about
        // 5800, most of them full, so too big for the tunnel
        assert!(n(fast, "split") > 2000, "{what}");
        let userspace = n(&a, "encapsulated_bytes") - n(fast, "encap_bytes");
        assert!(userspace < 1 << 20, "{what}");
        assert_eq!(n(&a["drops"], "refused"), 0, "{what}");
    }
}
