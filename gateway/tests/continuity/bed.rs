//! The five-namespace test bed, the gateways as processes, and the traffic.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tests::netns::{available, in_netns, unique, veth, Netns};
use tests::proc::ChildGuard;

pub const TOKEN: &str = "test-token-0123456789abcdef";

pub struct Bed {
    pub client: Netns,
    pub wan: Netns,
    pub a: Netns,
    pub b: Netns,
    /// A third site, when the bed has one ([`Bed::ring`]).
    pub c: Option<Netns>,
    pub vm: Netns,
    /// Another host on siteA's LAN (a bridge), which stays there.
    pub neighbour: Netns,
    /// siteA's end of the VM's link (the one that moves).
    pub vm_link: String,
    pub dir: tempfile::TempDir,
    /// Extra lines for the gateways' [tunnel] table.
    pub tunnel_extra: String,
}

pub struct Gw {
    pub child: ChildGuard,
    pub sock: PathBuf,
    pub config: PathBuf,
    pub ns: String,
    pub log: PathBuf,
}

/// A veth from `host` into siteA's bridge; returns siteA's end and the
/// host's.
fn lan_link(a: &Netns, host: &Netns, host_addr: &str) -> (String, String) {
    let base = unique("l");
    let (ea, eb) = (format!("{base}a"), format!("{base}b"));
    tests::netns::run(&[
        "ip", "link", "add", &ea, "netns", &a.name, "type", "veth", "peer", "name", &eb, "netns",
        &host.name,
    ])
    .expect("veth");
    a.exec(&["ip", "link", "set", &ea, "master", "br0"])
        .expect("bridge port");
    a.exec(&["ip", "link", "set", &ea, "up"]).expect("up");
    host.exec(&["ip", "addr", "add", host_addr, "dev", &eb])
        .expect("addr");
    host.exec(&["ip", "link", "set", &eb, "up"]).expect("up");
    (ea, eb)
}

fn sysctl(ns: &Netns, kv: &str) {
    ns.exec(&["sysctl", "-qw", kv]).expect("sysctl");
}

impl Bed {
    pub fn new() -> Self {
        Self::with_tunnel("")
    }

    pub fn with_tunnel(tunnel_extra: &str) -> Self {
        Self::build(tunnel_extra, false)
    }

    /// Three sites: siteC at 192.0.2.2 with the public prefix 10.3.0.0/24
    /// (fd00:3::/64), every gateway peered with both others.
    pub fn ring() -> Self {
        Self::build("", true)
    }

    fn build(tunnel_extra: &str, three: bool) -> Self {
        assert!(
            available(),
            "these tests need root and iproute2 (network namespaces)"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let mk = |t: &str| Netns::new(unique(t)).expect("netns");
        let (client, wan, a, b, vm, neighbour) =
            (mk("cl"), mk("wan"), mk("sa"), mk("sb"), mk("vm"), mk("nb"));
        let (cw, wc) = veth(&client, "10.0.0.2/24", &wan, "10.0.0.1/24").expect("veth");
        let (aw, wa) = veth(&a, "198.51.100.2/30", &wan, "198.51.100.1/30").expect("veth");
        let (bw, wb) = veth(&b, "203.0.113.2/30", &wan, "203.0.113.1/30").expect("veth");
        let c = three.then(|| {
            let c = mk("sc");
            let (cw, wcs) = veth(&c, "192.0.2.2/30", &wan, "192.0.2.1/30").expect("veth");
            c.exec(&["ip", "route", "add", "default", "via", "192.0.2.1"])
                .expect("route");
            wan.exec(&["ip", "route", "add", "10.3.0.0/24", "via", "192.0.2.2"])
                .expect("route");
            sysctl(&c, "net.ipv4.ip_forward=1");
            sysctl(&wan, &format!("net.ipv4.conf.{wcs}.rp_filter=1"));
            (c, cw)
        });
        if let Some((c, cw)) = &c {
            // A veth hands its peer packets whose checksum the sender left
            // to "the hardware" (and super-packets whole): a real link
            // carries complete packets. Which matters once a site's
            // userspace plane receives what another's kernel fast path
            // sent (the serving site of a VM that moved twice): the
            // gateways' WAN links checksum and segment in software.
            for (ns, dev) in [(&a, &aw), (&b, &bw), (c, cw)] {
                ns.exec(&[
                    "ethtool", "-K", dev, "tx", "off", "tso", "off", "gso", "off",
                ])
                .expect("ethtool (tests/install-deps.sh installs it)");
            }
        }
        let c = c.map(|(c, _)| c);
        // IPv6 beside IPv4 (no duplicate address detection: usable at once)
        for (ns, addr, dev) in [
            (&client, "fd00::2/64", &cw),
            (&wan, "fd00::1/64", &wc),
            (&a, "fd00:51::2/64", &aw),
            (&wan, "fd00:51::1/64", &wa),
            (&b, "fd00:113::2/64", &bw),
            (&wan, "fd00:113::1/64", &wb),
        ] {
            ns.exec(&["ip", "-6", "addr", "add", addr, "dev", dev, "nodad"])
                .expect("IPv6 address");
        }
        // siteA's LAN: a bridge holding the VM's link and a neighbour's
        a.exec(&["ip", "link", "add", "br0", "type", "bridge"])
            .expect("bridge");
        a.exec(&["ip", "addr", "add", "10.1.0.1/24", "dev", "br0"])
            .expect("addr");
        a.exec(&[
            "ip",
            "-6",
            "addr",
            "add",
            "fd00:1::1/64",
            "dev",
            "br0",
            "nodad",
        ])
        .expect("addr");
        a.exec(&["ip", "link", "set", "br0", "up"]).expect("up");
        let (vm_link, vm_dev) = lan_link(&a, &vm, "10.1.0.10/24");
        vm.exec(&[
            "ip",
            "-6",
            "addr",
            "add",
            "fd00:1::10/64",
            "dev",
            &vm_dev,
            "nodad",
        ])
        .expect("addr");
        lan_link(&a, &neighbour, "10.1.0.20/24");
        neighbour
            .exec(&["ip", "route", "add", "default", "via", "10.1.0.1"])
            .expect("route");
        client
            .exec(&["ip", "route", "add", "default", "via", "10.0.0.1"])
            .expect("route");
        a.exec(&["ip", "route", "add", "default", "via", "198.51.100.1"])
            .expect("route");
        b.exec(&["ip", "route", "add", "default", "via", "203.0.113.1"])
            .expect("route");
        vm.exec(&["ip", "route", "add", "default", "via", "10.1.0.1"])
            .expect("route");
        wan.exec(&["ip", "route", "add", "10.1.0.0/24", "via", "198.51.100.2"])
            .expect("route");
        wan.exec(&["ip", "route", "add", "10.2.0.0/24", "via", "203.0.113.2"])
            .expect("route");
        for (ns, args) in [
            (&client, &["default", "via", "fd00::1"][..]),
            (&a, &["default", "via", "fd00:51::1"][..]),
            (&b, &["default", "via", "fd00:113::1"][..]),
            (&vm, &["default", "via", "fd00:1::1"][..]),
            (&wan, &["fd00:1::/64", "via", "fd00:51::2"][..]),
            (&wan, &["fd00:2::/64", "via", "fd00:113::2"][..]),
        ] {
            let mut cmd = vec!["ip", "-6", "route", "add"];
            cmd.extend(args);
            ns.exec(&cmd).expect("IPv6 route");
        }
        for ns in [&wan, &a, &b] {
            sysctl(ns, "net.ipv4.ip_forward=1");
            sysctl(ns, "net.ipv6.conf.all.forwarding=1");
        }
        // IPv6 has no rp_filter: the same ingress filter as a rule (siteA's
        // prefix may only come from siteA)
        wan.exec(&[
            "ip",
            "-6",
            "rule",
            "add",
            "from",
            "fd00:1::/64",
            "iif",
            &wb,
            "prohibit",
        ])
        .expect("IPv6 ingress filter");
        // ingress filtering at the wan router: strict reverse-path checks
        sysctl(&wan, "net.ipv4.conf.all.rp_filter=1");
        for dev in [wa.as_str(), wb.as_str()] {
            sysctl(&wan, &format!("net.ipv4.conf.{dev}.rp_filter=1"));
        }
        let bed = Self {
            client,
            wan,
            a,
            b,
            c,
            vm,
            neighbour,
            vm_link,
            dir,
            tunnel_extra: tunnel_extra.to_string(),
        };
        bed.echo_servers();
        bed
    }

    fn echo_servers(&self) {
        self.push_server("10.1.0.10:7002");
        self.tcp_echo("10.1.0.10:7000");
        self.tcp_echo("[fd00:1::10]:7000");
        self.udp_echo("10.1.0.10:7001");
    }

    fn tcp_echo(&self, at: &'static str) {
        let l = in_netns(&self.vm.name, move || TcpListener::bind(at))
            .expect("netns")
            .expect("bind");
        std::thread::spawn(move || {
            for conn in l.incoming() {
                let Ok(mut conn) = conn else { break };
                std::thread::spawn(move || {
                    let Ok(mut back) = conn.try_clone() else {
                        return;
                    };
                    let _ = std::io::copy(&mut conn, &mut back);
                    let _ = back.shutdown(std::net::Shutdown::Write);
                });
            }
        });
    }

    /// A server that speaks first and never stops: after the client names
    /// its stream `k` (8 bytes), it sends `byte(k, i)` for ever.
    fn push_server(&self, at: &'static str) {
        let l = in_netns(&self.vm.name, move || TcpListener::bind(at))
            .expect("netns")
            .expect("bind");
        std::thread::spawn(move || {
            for conn in l.incoming() {
                let Ok(mut conn) = conn else { break };
                std::thread::spawn(move || {
                    let mut k = [0u8; 8];
                    if conn.read_exact(&mut k).is_err() {
                        return;
                    }
                    let k = u64::from_be_bytes(k);
                    let mut i = 0u64;
                    loop {
                        let chunk: Vec<u8> = (i..i + 4096).map(|j| byte(k, j)).collect();
                        if conn.write_all(&chunk).is_err() {
                            return;
                        }
                        i += 4096;
                        std::thread::sleep(Duration::from_millis(10));
                    }
                });
            }
        });
    }

    fn udp_echo(&self, at: &'static str) {
        let u = in_netns(&self.vm.name, move || UdpSocket::bind(at))
            .expect("netns")
            .expect("bind");
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while let Ok((n, from)) = u.recv_from(&mut buf) {
                let _ = u.send_to(&buf[..n], from);
            }
        });
    }

    fn write_config(
        &self,
        name: &str,
        site: &str,
        wan: &str,
        peers: &[(&str, &str)],
    ) -> (PathBuf, PathBuf) {
        let sock = self.dir.path().join(format!("{name}.sock"));
        let config = self.dir.path().join(format!("{name}.toml"));
        let dev = unique("gt");
        let text = format!(
            "site = \"{site}\"\nwan = \"{wan}\"\nstate_dir = \"{name}-state\"\n\
             [api]\nunix = \"{name}.sock\"\ntoken = \"{TOKEN}\"\n\
             [tunnel]\ndevice = \"{dev}\"\ndrain_quiet_ms = 1000\nudp_idle_s = 2\n{}\n",
            self.tunnel_extra
        );
        let peers: String = peers
            .iter()
            .map(|(site, addr)| format!("[[peer]]\nsite = \"{site}\"\naddress = \"{addr}\"\n"))
            .collect();
        let text = text + &peers;
        std::fs::write(&config, text).expect("config");
        (config, sock)
    }

    fn start(&self, ns: &Netns, config: &Path, sock: &Path, name: &str) -> Gw {
        let log = self.dir.path().join(format!("{name}.log"));
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("log");
        let mut cmd = ns.command(env!("CARGO_BIN_EXE_gateway"));
        cmd.args(["run", "--config"])
            .arg(config)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(logf);
        let mut child = ChildGuard::spawn(&mut cmd).expect("spawn gateway");
        let out = child
            .0
            .as_mut()
            .and_then(|c| c.stdout.take())
            .expect("stdout");
        let mut lines = BufReader::new(out).lines();
        loop {
            match lines.next() {
                Some(Ok(l)) if l.starts_with("gateway ") && l.ends_with(" running") => break,
                Some(Ok(_)) => continue,
                _ => panic!(
                    "gateway {name} did not start; its log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                ),
            }
        }
        Gw {
            child,
            sock: sock.to_path_buf(),
            config: config.to_path_buf(),
            ns: ns.name.clone(),
            log,
        }
    }

    /// The other sites' (name, gateway address) as `site` sees them.
    fn peers_of(&self, site: &str) -> Vec<(&'static str, &'static str)> {
        let mut all = vec![("siteA", "198.51.100.2"), ("siteB", "203.0.113.2")];
        if self.c.is_some() {
            all.push(("siteC", "192.0.2.2"));
        }
        all.retain(|(s, _)| *s != site);
        all
    }

    pub fn gateway_a(&self) -> Gw {
        let peers = self.peers_of("siteA");
        let (c, s) = self.write_config("a", "siteA", "198.51.100.2", &peers);
        self.start(&self.a, &c, &s, "a")
    }

    pub fn gateway_b(&self) -> Gw {
        let peers = self.peers_of("siteB");
        let (c, s) = self.write_config("b", "siteB", "203.0.113.2", &peers);
        self.start(&self.b, &c, &s, "b")
    }

    pub fn gateway_c(&self) -> Gw {
        let ns = self.c.as_ref().expect("a bed with three sites");
        let peers = self.peers_of("siteC");
        let (c, s) = self.write_config("c", "siteC", "192.0.2.2", &peers);
        self.start(ns, &c, &s, "c")
    }

    pub fn restart_gateway_a(&self, old: Gw) -> Gw {
        let (config, sock) = (old.config.clone(), old.sock.clone());
        drop(old);
        self.start(&self.a, &config, &sock, "a")
    }

    pub fn restart_gateway_c(&self, old: Gw) -> Gw {
        let ns = self.c.as_ref().expect("a bed with three sites");
        let (config, sock) = (old.config.clone(), old.sock.clone());
        drop(old);
        self.start(ns, &config, &sock, "c")
    }

    pub fn register_and_prepare(&self, ga: &Gw, gb: &Gw) {
        self.register_and_prepare_service(ga, gb, "web1", "10.1.0.10");
    }

    pub fn register_and_prepare_service(&self, ga: &Gw, gb: &Gw, name: &str, address: &str) {
        for g in [ga, gb] {
            let body = format!(r#"{{"name":"{name}","address":"{address}","site":"siteA"}}"#);
            let (code, body) = g.api("POST", "/v1/services", &body);
            assert_eq!(code, 201, "{body}");
            let (code, body) = g.api(
                "POST",
                &format!("/v1/migrations/{name}/prepare"),
                r#"{"to":"siteB"}"#,
            );
            assert_eq!(code, 200, "{body}");
        }
    }

    /// The VM's link moves from siteA to siteB (same gateway addresses on
    /// the VM's side), then both gateways switch.
    pub fn move_vm_and_switch(&self, ga: &Gw, gb: &Gw) {
        self.move_vm();
        self.switch(ga, gb, "web1", "10.2.0.100");
    }

    pub fn move_vm(&self) {
        let l = &self.vm_link;
        self.a
            .exec(&["ip", "link", "set", l, "netns", &self.b.name])
            .expect("move");
        self.b
            .exec(&["ip", "addr", "add", "10.1.0.1/24", "dev", l])
            .expect("addr");
        self.b
            .exec(&["ip", "-6", "addr", "add", "fd00:1::1/64", "dev", l, "nodad"])
            .expect("addr");
        self.b.exec(&["ip", "link", "set", l, "up"]).expect("up");
    }

    /// The VM's link moves from one site to another (into siteA's bridge
    /// when it comes home), its gateway addresses the same everywhere.
    pub fn move_vm_between(&self, from: &Netns, to: &Netns) {
        let l = &self.vm_link;
        from.exec(&["ip", "link", "set", l, "netns", &to.name])
            .expect("move");
        if to.name == self.a.name {
            to.exec(&["ip", "link", "set", l, "master", "br0"])
                .expect("bridge port");
        } else {
            to.exec(&["ip", "addr", "add", "10.1.0.1/24", "dev", l])
                .expect("addr");
            to.exec(&["ip", "-6", "addr", "add", "fd00:1::1/64", "dev", l, "nodad"])
                .expect("addr");
        }
        to.exec(&["ip", "link", "set", l, "up"]).expect("up");
    }

    /// `ip route` and `ip rule` of a namespace, for the test's messages.
    pub fn routes(&self, ns: &Netns) -> String {
        let show = |args: &[&str]| {
            let o = std::process::Command::new("ip")
                .args(["-n", &ns.name])
                .args(args)
                .output()
                .expect("ip");
            String::from_utf8_lossy(&o.stdout).into_owned()
        };
        show(&["route", "show"]) + &show(&["rule", "show"])
    }

    /// Both gateways switch `service`: B takes it with `public`, A tunnels.
    pub fn switch(&self, ga: &Gw, gb: &Gw, service: &str, public: &str) {
        let l = &self.vm_link;
        let body = format!(r#"{{"role":"new","peer":"siteA","public":"{public}","lan":"{l}"}}"#);
        let (code, b) = gb.api("POST", &format!("/v1/migrations/{service}/switch"), &body);
        assert_eq!(code, 200, "{b}");
        let (code, b) = ga.api(
            "POST",
            &format!("/v1/migrations/{service}/switch"),
            r#"{"role":"old","peer":"siteB","lan":"br0"}"#,
        );
        assert_eq!(code, 200, "{b}");
    }

    pub fn echo_once(&self, to: &str, msg: &[u8]) {
        self.echo_from(&self.client.name, to, msg);
    }

    pub fn echo_from(&self, ns: &str, to: &str, msg: &[u8]) {
        let to: SocketAddr = to.parse().expect("addr");
        let mut s = in_netns(ns, move || {
            TcpStream::connect_timeout(&to, Duration::from_secs(5))
        })
        .expect("netns")
        .unwrap_or_else(|e| {
            let dbg = |args: &[&str]| {
                let o = std::process::Command::new("ip")
                    .args(["-n", &self.a.name])
                    .args(args)
                    .output()
                    .expect("ip");
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                )
            };
            panic!(
                "cannot connect to {to}: {e}\nsiteA proxy: {}\nroute get: {}\nneigh: {}",
                dbg(&["neigh", "show", "proxy"]),
                dbg(&[
                    "route",
                    "get",
                    "10.1.0.10",
                    "from",
                    "10.1.0.20",
                    "iif",
                    "br0"
                ]),
                dbg(&["neigh"])
            )
        });
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        s.write_all(msg).expect("write");
        s.shutdown(std::net::Shutdown::Write).expect("shutdown");
        let mut back = Vec::new();
        s.read_to_end(&mut back).expect("read");
        assert_eq!(back, msg, "echo through {to}");
    }

    pub fn connect_fails(&self, to: &str) -> bool {
        let to: SocketAddr = to.parse().expect("addr");
        in_netns(&self.client.name, move || {
            TcpStream::connect_timeout(&to, Duration::from_secs(2))
        })
        .expect("netns")
        .is_err()
    }

    /// The VM opens a connection to the client: the client sees the VM's new public address.
    pub fn vm_connects_out(&self) {
        self.vm_connects_out_to("10.0.0.2:7100", "10.2.0.100");
    }

    pub fn vm_connects_out_to(&self, client: &'static str, public: &str) {
        let l = in_netns(&self.client.name, move || TcpListener::bind(client))
            .expect("netns")
            .expect("bind");
        let seen = std::thread::spawn(move || l.accept().map(|(_, peer)| peer));
        let to: SocketAddr = client.parse().expect("addr");
        let s = in_netns(&self.vm.name, move || {
            TcpStream::connect_timeout(&to, Duration::from_secs(5))
        })
        .expect("netns")
        .expect("the VM connects out");
        let peer = seen.join().expect("accept").expect("accepted");
        assert_eq!(
            peer.ip().to_string(),
            public,
            "the VM's outbound connection must leave with its new address"
        );
        drop(s);
    }

    fn send_ipip(&self, ns: &str, bind: &'static str, to: &'static str, inner_dst: [u8; 4]) {
        let mut inner = Vec::new();
        etherparse::PacketBuilder::ipv4([10, 0, 0, 2], inner_dst, 64)
            .udp(9, 9)
            .write(&mut inner, b"forged")
            .expect("build");
        in_netns(ns, move || {
            use socket2::{Domain, Protocol, Socket, Type};
            let s =
                Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::from(4))).expect("raw socket");
            let b: SocketAddr = format!("{bind}:0").parse().expect("addr");
            s.bind(&b.into()).expect("bind");
            let t: SocketAddr = format!("{to}:0").parse().expect("addr");
            s.send_to(&inner, &t.into()).expect("send");
        })
        .expect("netns");
    }

    pub fn send_ipip_from_client(&self, to: &'static str, inner_dst: [u8; 4]) {
        self.send_ipip(&self.client.name, "10.0.0.2", to, inner_dst);
    }

    pub fn send_ipip_from_site_a(&self, to: &'static str, inner_dst: [u8; 4]) {
        self.send_ipip(&self.a.name, "198.51.100.2", to, inner_dst);
    }

    pub fn assert_no_gateway_errors(&self) {
        for name in ["a", "b", "c"] {
            let log = std::fs::read_to_string(self.dir.path().join(format!("{name}.log")))
                .unwrap_or_default();
            assert!(
                !log.contains("ERROR"),
                "gateway {name} logged errors:\n{log}"
            );
        }
        let _ = (&self.wan, &self.b);
    }
}

impl Gw {
    pub fn api(&self, method: &str, path: &str, body: &str) -> (u16, serde_json::Value) {
        self.api_with(Some(TOKEN), method, path, body)
    }

    pub fn api_with(
        &self,
        token: Option<&str>,
        method: &str,
        path: &str,
        body: &str,
    ) -> (u16, serde_json::Value) {
        let mut s = UnixStream::connect(&self.sock).expect("connect to the gateway API");
        let auth = token
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{auth}\r\n{body}",
            body.len()
        )
        .expect("request");
        let mut text = String::new();
        s.read_to_string(&mut text).expect("response");
        let (head, rest) = text.split_once("\r\n\r\n").expect("an HTTP response");
        let code = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .expect("status code");
        let value =
            serde_json::from_str(rest).unwrap_or(serde_json::Value::String(rest.to_string()));
        (code, value)
    }

    /// Its TUN device (as its config names it).
    pub fn tun(&self) -> String {
        let text = std::fs::read_to_string(&self.config).expect("config");
        text.lines()
            .find_map(|l| l.strip_prefix("device = \""))
            .and_then(|r| r.strip_suffix('"'))
            .expect("a device line")
            .to_string()
    }

    /// `POST` a typed body; panics unless the answer is 2xx.
    pub fn post<T: serde::Serialize>(&self, path: &str, body: &T) -> serde_json::Value {
        let text = serde_json::to_string(body).expect("json");
        let (code, reply) = self.api("POST", path, &text);
        assert!((200..300).contains(&code), "{path} {text} → {code} {reply}");
        reply
    }

    /// This site's part for `service`: its role (`old`/`new`), the peer
    /// it names, its phase.
    pub fn part(&self, service: &str) -> gateway_api::Migration {
        self.try_part(service)
            .unwrap_or_else(|| panic!("no migration of {service} here"))
    }

    pub fn try_part(&self, service: &str) -> Option<gateway_api::Migration> {
        let (code, st) = self.api("GET", "/v1/status", "");
        assert_eq!(code, 200, "{st}");
        let st: gateway_api::Status = serde_json::from_value(st).expect("a status");
        st.migration(service).map(|m| m.migration.clone())
    }

    /// What the data plane carried here for `service`.
    pub fn part_traffic(&self, service: &str) -> gateway_api::Traffic {
        let (_, st) = self.api("GET", "/v1/status", "");
        let st: gateway_api::Status = serde_json::from_value(st).expect("a status");
        st.migration(service)
            .and_then(|m| m.traffic.clone())
            .unwrap_or_default()
    }

    pub fn wait_phase(&self, service: &str, phase: &str, timeout: Duration) -> bool {
        let t = Instant::now();
        while t.elapsed() < timeout {
            let (_, st) = self.api("GET", "/v1/status", "");
            let found = st["migrations"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|m| m["service"] == service && m["phase"] == phase);
            if found {
                return true;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        false
    }

    pub fn kill9(&mut self) {
        self.child.kill();
        let _ = (&self.ns, &self.log);
    }
}

fn loads(counters: &[Arc<AtomicU64>]) -> Vec<u64> {
    counters.iter().map(|v| v.load(Ordering::Relaxed)).collect()
}

/// Waits until each of `verified()` is at least 64 KiB beyond `before`;
/// panics on the first error recorded or at `timeout`.
fn wait_beyond(
    what: &str,
    errors: &Mutex<Vec<String>>,
    verified: impl Fn() -> Vec<u64>,
    before: &[u64],
    timeout: Duration,
) {
    let t = Instant::now();
    loop {
        {
            let e = errors.lock().expect("lock");
            assert!(e.is_empty(), "{what}: {e:?}");
        }
        let now = verified();
        if now.iter().zip(before).all(|(n, b)| *n >= b + 65536) {
            return;
        }
        assert!(
            t.elapsed() < timeout,
            "{what} stalled: before {before:?}, now {now:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Deterministic bytes for position `i` of stream `k`.
pub fn byte(k: u64, i: u64) -> u8 {
    let x = (i ^ (k << 40)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (x >> 56) as u8
}

/// Long-lived TCP connections, each a continuous checksummed byte stream
/// echoed by the server and verified byte for byte.
pub struct Streams {
    stop: Arc<AtomicBool>,
    verified: Vec<Arc<AtomicU64>>,
    errors: Arc<Mutex<Vec<String>>>,
    threads: Vec<(JoinHandle<u64>, JoinHandle<u64>)>,
}

impl Streams {
    pub fn start(bed: &Bed, n: u64) -> Self {
        Self::start_to(bed, n, "10.1.0.10:7000")
    }

    pub fn start_to(bed: &Bed, n: u64, to: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let mut verified = Vec::new();
        let mut threads = Vec::new();
        let to: SocketAddr = to.parse().expect("addr");
        for k in 0..n {
            let s = in_netns(&bed.client.name, move || {
                TcpStream::connect_timeout(&to, Duration::from_secs(5))
            })
            .expect("netns")
            .expect("connect to the VM");
            s.set_read_timeout(Some(Duration::from_secs(30)))
                .expect("timeout");
            let mut w = s.try_clone().expect("clone");
            let mut r = s;
            let (stop_w, errs_w) = (stop.clone(), errors.clone());
            let writer = std::thread::spawn(move || {
                let mut i = 0u64;
                while !stop_w.load(Ordering::Relaxed) {
                    let chunk: Vec<u8> = (i..i + 8192).map(|j| byte(k, j)).collect();
                    if let Err(e) = w.write_all(&chunk) {
                        errs_w
                            .lock()
                            .expect("lock")
                            .push(format!("stream {k}: write failed at {i}: {e}"));
                        return i;
                    }
                    i += 8192;
                    std::thread::sleep(Duration::from_millis(20));
                }
                let _ = w.shutdown(std::net::Shutdown::Write);
                i
            });
            let v = Arc::new(AtomicU64::new(0));
            let (v_r, stop_r, errs_r) = (v.clone(), stop.clone(), errors.clone());
            let reader = std::thread::spawn(move || {
                let mut got = 0u64;
                let mut buf = vec![0u8; 65536];
                loop {
                    match r.read(&mut buf) {
                        Ok(0) => {
                            if !stop_r.load(Ordering::Relaxed) {
                                errs_r
                                    .lock()
                                    .expect("lock")
                                    .push(format!("stream {k}: closed early at {got}"));
                            }
                            return got;
                        }
                        Ok(n) => {
                            for (o, b) in buf[..n].iter().enumerate() {
                                if *b != byte(k, got + o as u64) {
                                    errs_r.lock().expect("lock").push(format!(
                                        "stream {k}: byte {} corrupted",
                                        got + o as u64
                                    ));
                                    return got;
                                }
                            }
                            got += n as u64;
                            v_r.store(got, Ordering::Relaxed);
                        }
                        Err(e) => {
                            errs_r
                                .lock()
                                .expect("lock")
                                .push(format!("stream {k}: read failed at {got}: {e}"));
                            return got;
                        }
                    }
                }
            });
            verified.push(v);
            threads.push((writer, reader));
        }
        Self {
            stop,
            verified,
            errors,
            threads,
        }
    }

    pub fn verified(&self) -> Vec<u64> {
        loads(&self.verified)
    }

    pub fn wait_progress(&self, timeout: Duration) {
        let zero = vec![0; self.verified.len()];
        self.wait_progress_beyond(&zero, timeout);
    }

    /// Every stream verified at least 64 KiB more than `before`.
    pub fn wait_progress_beyond(&self, before: &[u64], timeout: Duration) {
        wait_beyond("streams", &self.errors, || self.verified(), before, timeout);
    }

    /// Stops writing, waits for every echo, checks every byte came back.
    pub fn finish(self) {
        self.stop.store(true, Ordering::Relaxed);
        for (k, (w, r)) in self.threads.into_iter().enumerate() {
            let written = w.join().expect("writer");
            let read = r.join().expect("reader");
            assert_eq!(
                read, written,
                "stream {k}: {written} bytes sent, {read} echoed"
            );
        }
        let e = self.errors.lock().expect("lock");
        assert!(e.is_empty(), "stream errors: {e:?}");
    }
}

/// One UDP flow: sequence-numbered datagrams echoed by the server.
pub struct UdpFlow {
    stop: Arc<AtomicBool>,
    echoed: Arc<AtomicU64>,
    corrupted: Arc<AtomicU64>,
}

impl UdpFlow {
    pub fn start(bed: &Bed) -> Self {
        let sock = in_netns(&bed.client.name, || UdpSocket::bind("10.0.0.2:0"))
            .expect("netns")
            .expect("bind");
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        let to: SocketAddr = "10.1.0.10:7001".parse().expect("addr");
        let (stop, echoed, corrupted) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
        );
        let tx = sock.try_clone().expect("clone");
        let stop_t = stop.clone();
        std::thread::spawn(move || {
            let mut seq = 0u64;
            while !stop_t.load(Ordering::Relaxed) {
                let mut d = seq.to_be_bytes().to_vec();
                d.extend((0..200).map(|j| byte(1000 + seq, j)));
                let _ = tx.send_to(&d, to);
                seq += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        let (stop_r, e, c) = (stop.clone(), echoed.clone(), corrupted.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !stop_r.load(Ordering::Relaxed) {
                if let Ok((n, _)) = sock.recv_from(&mut buf) {
                    let ok = n == 208 && {
                        let seq = u64::from_be_bytes(buf[..8].try_into().unwrap_or([0; 8]));
                        buf[8..n]
                            .iter()
                            .enumerate()
                            .all(|(j, b)| *b == byte(1000 + seq, j as u64))
                    };
                    if ok {
                        e.fetch_add(1, Ordering::Relaxed);
                    } else {
                        c.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
        Self {
            stop,
            echoed,
            corrupted,
        }
    }

    pub fn wait_echoes_after_switch(&self, timeout: Duration) {
        let start = self.echoed.load(Ordering::Relaxed);
        let t = Instant::now();
        while self.echoed.load(Ordering::Relaxed) < start + 50 {
            assert!(
                t.elapsed() < timeout,
                "the UDP flow stopped after the switch"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(
            self.corrupted.load(Ordering::Relaxed),
            0,
            "corrupted UDP datagrams"
        );
    }

    pub fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        assert_eq!(
            self.corrupted.load(Ordering::Relaxed),
            0,
            "corrupted UDP datagrams"
        );
    }
}

/// Connections on which the VM speaks first and all the time (the push
/// server): after a move its segments reach the serving gateway before any
/// of the client's, so only what the gateways handed over tells it which way
/// each connection goes back. Every byte is checked.
pub struct Downloads {
    stop: Arc<AtomicBool>,
    verified: Vec<Arc<AtomicU64>>,
    errors: Arc<Mutex<Vec<String>>>,
    threads: Vec<JoinHandle<()>>,
}

impl Downloads {
    /// Streams `ks` from `to` (the push server at whatever address).
    pub fn start(bed: &Bed, ks: std::ops::Range<u64>, to: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let (mut verified, mut threads) = (Vec::new(), Vec::new());
        let to: SocketAddr = to.parse().expect("addr");
        for k in ks {
            let mut s = in_netns(&bed.client.name, move || {
                TcpStream::connect_timeout(&to, Duration::from_secs(5))
            })
            .expect("netns")
            .expect("connect to the VM");
            s.set_read_timeout(Some(Duration::from_secs(30)))
                .expect("timeout");
            s.write_all(&k.to_be_bytes()).expect("name the stream");
            let v = Arc::new(AtomicU64::new(0));
            let (v_r, stop_r, errs) = (v.clone(), stop.clone(), errors.clone());
            threads.push(std::thread::spawn(move || {
                let mut got = 0u64;
                let mut buf = vec![0u8; 65536];
                while !stop_r.load(Ordering::Relaxed) {
                    match s.read(&mut buf) {
                        Ok(0) => {
                            errs.lock()
                                .expect("lock")
                                .push(format!("download {k}: closed at {got}"));
                            return;
                        }
                        Ok(n) => {
                            if let Some(o) = (0..n).find(|&o| buf[o] != byte(k, got + o as u64)) {
                                errs.lock().expect("lock").push(format!(
                                    "download {k}: byte {} corrupted",
                                    got + o as u64
                                ));
                                return;
                            }
                            got += n as u64;
                            v_r.store(got, Ordering::Relaxed);
                        }
                        Err(e) => {
                            errs.lock()
                                .expect("lock")
                                .push(format!("download {k}: read failed at {got}: {e}"));
                            return;
                        }
                    }
                }
            }));
            verified.push(v);
        }
        Self {
            stop,
            verified,
            errors,
            threads,
        }
    }

    pub fn verified(&self) -> Vec<u64> {
        loads(&self.verified)
    }

    /// Every download verified at least 64 KiB more than `before`.
    pub fn wait_progress_beyond(&self, before: &[u64], timeout: Duration) {
        wait_beyond(
            "downloads",
            &self.errors,
            || self.verified(),
            before,
            timeout,
        );
    }

    /// Stops reading (the connections close) and checks nothing went wrong.
    pub fn finish(self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().expect("reader");
        }
        let e = self.errors.lock().expect("lock");
        assert!(e.is_empty(), "download errors: {e:?}");
    }
}
