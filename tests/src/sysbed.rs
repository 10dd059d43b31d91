//! The whole system's test bed (the demo's scenario): namespaces `client`,
//! `wan` (a router with ingress filtering, a `tc tbf` rate limit and a delay
//! line), `siteA` and `siteB` with a gateway each (site A's serves the zone
//! `example.test.`), the guest at site A on a tap in its LAN bridge, the
//! destination agent at site B with a tap ready for it, and the
//! `migrator.toml` that `migrator migrate web1 --to siteB` reads.
//!
//! ```text
//!  client 10.0.0.2 ── wan ──┬── 198.51.100.2 siteA: br0 10.1.0.1/24 ── tapa ── guest 10.1.0.10
//!                           └── 203.0.113.2  siteB: tapb 10.1.0.1/24 (for the guest after the move)
//!  the guest's public address at site B: 10.2.0.100
//! ```

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::bed::{log_file, tbf, workspace_bin, Sites};
use crate::delay::{self, DelayLine};
use crate::guest;
use crate::netns::{block_on_in, in_netns, unique, veth, Netns};
use crate::proc::ChildGuard;
use crate::vmbed::{Guest, GuestNet, VmBed};

pub const TOKEN: &str = "bed-token-0123456789abcdef";
pub const GUEST_IP: &str = "10.1.0.10";
pub const PUBLIC_IP: &str = "10.2.0.100";
pub const A_WAN: &str = "198.51.100.2";
pub const B_WAN: &str = "203.0.113.2";
/// The third site of a ring bed ([`SysBed::ring`]), and the guest's
/// public address there.
pub const C_WAN: &str = "192.0.2.2";
pub const PUBLIC_C: &str = "10.3.0.100";
pub const NAME: &str = "web1.example.test.";
/// The MAC address of the guest's gateway at either site.
pub const GATEWAY_MAC: &str = "02:00:0a:01:00:01";
const DNS_KEY: &str = "hmac-sha256:mig-key:c2VjcmV0LWtleS1mb3ItdGhlLXRlc3QtYmVkLTAxMjM0NTY3";

// The emulated WAN and the client's file, as the demo and the system
// benchmark take them on their command lines (a plain comment: clap would
// show a doc comment as the programs' description).
#[derive(clap::Args, Debug, Clone)]
pub struct WanArgs {
    /// The WAN's rate, Mbit/s.
    #[arg(long, default_value_t = 100)]
    pub rate_mbit: u32,
    /// The WAN's round-trip time, ms.
    #[arg(long, default_value_t = 50)]
    pub rtt_ms: u64,
    /// The file the client downloads, MiB.
    #[arg(long, default_value_t = 24)]
    pub file_mib: usize,
}

pub struct SysOpts {
    /// The WAN's rate (`None`: unlimited).
    pub rate_mbit: Option<u32>,
    /// One-way delay through the WAN router (RTT = 2×).
    pub delay: Duration,
    pub guest: Guest,
}

pub struct SysBed {
    pub client: Netns,
    pub wan: Netns,
    /// The guest, the two sites (`vm.sites.a`, `vm.sites.b`), the keys.
    pub vm: VmBed,
    /// A ring bed's third site, siteC.
    pub c: Option<Netns>,
    pub gateways: Vec<ChildGuard>,
    /// `migrator.toml` for `migrator migrate`.
    pub config: PathBuf,
    _delay: Option<DelayLine>,
}

fn sysctl(ns: &Netns, kv: &str) -> Result<()> {
    ns.exec(&["sysctl", "-qw", kv])
}

impl SysBed {
    pub fn new(o: SysOpts) -> Result<Self> {
        Self::build(o, false)
    }

    /// Three sites with a node each (`migrator node run`, named after its
    /// site; node siteA boots the guest), siteC at [`C_WAN`] with the
    /// public prefix 10.3.0.0/24 and the guest's tap `tapc`; `config` is a
    /// `migrator.toml` with nodes. Start them with [`SysBed::start_nodes`].
    ///
    /// A veth hands its peer packets whose checksum the sender left to
    /// "the hardware" (and super-packets whole), which a real link never
    /// carries: once a site's userspace data plane receives what another's
    /// kernel fast path sent (a VM that moved twice), that shows. So here
    /// the sites' WAN links checksum and segment in software.
    pub fn ring(o: SysOpts) -> Result<Self> {
        Self::build(o, true)
    }

    fn build(o: SysOpts, ring: bool) -> Result<Self> {
        let mk = |t: &str| Netns::new(unique(t));
        let (client, wan, a, b) = (mk("cl")?, mk("wan")?, mk("sa")?, mk("sb")?);
        let (cw, wc) = veth(&client, "10.0.0.2/24", &wan, "10.0.0.1/24")?;
        let (aw, wa) = veth(&a, &format!("{A_WAN}/30"), &wan, "198.51.100.1/30")?;
        let (bw, wb) = veth(&b, &format!("{B_WAN}/30"), &wan, "203.0.113.1/30")?;
        // site A's LAN: a bridge with the guest's tap
        // The guest's gateway 10.1.0.1 has the same MAC address at both
        // sites (an anycast gateway): the guest keeps its ARP entry across
        // the move, and its frames to that MAC must be accepted at site B.
        a.exec(&[
            "ip",
            "link",
            "add",
            "br0",
            "address",
            GATEWAY_MAC,
            "type",
            "bridge",
        ])?;
        a.exec(&["ip", "addr", "add", "10.1.0.1/24", "dev", "br0"])?;
        a.exec(&["ip", "link", "set", "br0", "up"])?;
        a.exec(&["ip", "tuntap", "add", "dev", "tapa", "mode", "tap"])?;
        a.exec(&["ip", "link", "set", "tapa", "master", "br0"])?;
        a.exec(&["ip", "link", "set", "tapa", "up"])?;
        // site B: the tap the guest will use there, same gateway address
        b.exec(&["ip", "tuntap", "add", "dev", "tapb", "mode", "tap"])?;
        b.exec(&["ip", "link", "set", "tapb", "address", GATEWAY_MAC])?;
        b.exec(&["ip", "addr", "add", "10.1.0.1/24", "dev", "tapb"])?;
        b.exec(&["ip", "link", "set", "tapb", "up"])?;
        client.exec(&["ip", "route", "add", "default", "via", "10.0.0.1"])?;
        a.exec(&["ip", "route", "add", "default", "via", "198.51.100.1"])?;
        b.exec(&["ip", "route", "add", "default", "via", "203.0.113.1"])?;
        wan.exec(&["ip", "route", "add", "10.1.0.0/24", "via", A_WAN])?;
        wan.exec(&["ip", "route", "add", "10.2.0.0/24", "via", B_WAN])?;
        for ns in [&wan, &a, &b] {
            sysctl(ns, "net.ipv4.ip_forward=1")?;
        }
        let c = if ring {
            let c = mk("sc")?;
            let (cw, wcc) = veth(&c, &format!("{C_WAN}/30"), &wan, "192.0.2.1/30")?;
            c.exec(&["ip", "tuntap", "add", "dev", "tapc", "mode", "tap"])?;
            c.exec(&["ip", "link", "set", "tapc", "address", GATEWAY_MAC])?;
            c.exec(&["ip", "addr", "add", "10.1.0.1/24", "dev", "tapc"])?;
            c.exec(&["ip", "link", "set", "tapc", "up"])?;
            c.exec(&["ip", "route", "add", "default", "via", "192.0.2.1"])?;
            wan.exec(&["ip", "route", "add", "10.3.0.0/24", "via", C_WAN])?;
            sysctl(&c, "net.ipv4.ip_forward=1")?;
            for (ns, dev) in [(&a, &aw), (&b, &bw), (&c, &cw)] {
                ns.exec(&[
                    "ethtool", "-K", dev, "tx", "off", "tso", "off", "gso", "off",
                ])
                .context("ethtool (tests/install-deps.sh installs it)")?;
            }
            Some((c, cw, wcc))
        } else {
            None
        };
        let wan_devs: Vec<&String> = [&wc, &wa, &wb]
            .into_iter()
            .chain(c.as_ref().map(|c| &c.2))
            .collect();
        // ingress filtering at the wan router: strict reverse-path checks on
        // its real interfaces (not on the delay line's, where they re-enter)
        for dev in &wan_devs {
            sysctl(&wan, &format!("net.ipv4.conf.{dev}.rp_filter=1"))?;
        }
        if let Some(r) = o.rate_mbit {
            let mut shaped = vec![
                (&wan, &wc),
                (&wan, &wa),
                (&wan, &wb),
                (&client, &cw),
                (&a, &aw),
                (&b, &bw),
            ];
            if let Some((c, cw, wcc)) = &c {
                shaped.push((&wan, wcc));
                shaped.push((c, cw));
            }
            for (ns, dev) in shaped {
                tbf(ns, dev, r, 100)?;
            }
        }
        let delay_line = if o.delay.is_zero() {
            None
        } else {
            let line = delay::start(&wan, "dly0", o.delay)?;
            sysctl(&wan, "net.ipv4.conf.dly0.rp_filter=0")?;
            wan.exec(&[
                "ip", "route", "add", "default", "dev", "dly0", "table", "100",
            ])?;
            for dev in &wan_devs {
                wan.exec(&["ip", "rule", "add", "iif", dev, "lookup", "100"])?;
            }
            Some(line)
        };
        let sites = Sites {
            a,
            b,
            a_dev: aw,
            b_dev: bw,
            b_ip: B_WAN.to_string(),
        };
        let mut guest = o.guest;
        guest.net = Some(GuestNet {
            ip: format!("{GUEST_IP}/24"),
            gw: "10.1.0.1".into(),
            tap_a: "tapa".into(),
            tap_b: "tapb".into(),
        });
        let vm = VmBed::build(sites, &guest)?;
        let config = vm.path("migrator.toml");
        let bed = SysBed {
            client,
            wan,
            vm,
            c: c.map(|c| c.0),
            gateways: Vec::new(),
            config,
            _delay: delay_line,
        };
        if ring {
            bed.write_ring_configs()?;
        } else {
            bed.write_configs()?;
        }
        Ok(bed)
    }

    /// The zone file and a gateway config per site (site A's serves the
    /// zone), each gateway peered with every other site.
    fn write_gateway_configs(&self, sites: &[(&str, &str)]) -> Result<()> {
        let d = self.vm.dir.path();
        let secret = DNS_KEY.rsplit(':').next().unwrap_or_default();
        std::fs::write(
            d.join("example.test.zone"),
            format!(
                "$ORIGIN example.test.\n$TTL 300\n@ IN SOA ns1 hostmaster 1 3600 600 86400 60\n@ IN NS ns1\nns1 IN A {A_WAN}\nweb1 IN A {GUEST_IP}\n"
            ),
        )?;
        for (site, wan) in sites {
            let mut t = format!(
                "site = \"{site}\"\nwan = \"{wan}\"\nstate_dir = \"{site}-state\"\n\
                 [api]\nlisten = \"{wan}:7300\"\ntoken = \"{TOKEN}\"\n\
                 [tunnel]\ndevice = \"{}\"\ndrain_quiet_ms = 1000\nudp_idle_s = 2\n",
                unique("gt")
            );
            for (peer, peer_wan) in sites.iter().filter(|(p, _)| p != site) {
                t += &format!("[[peer]]\nsite = \"{peer}\"\naddress = \"{peer_wan}\"\n");
            }
            if *site == "siteA" {
                t += &format!(
                    "[dns]\nlisten = [\"{wan}:53\"]\n[[dns.key]]\nname = \"mig-key\"\nsecret = \"{secret}\"\n\
                     [[dns.zone]]\norigin = \"example.test.\"\nfile = \"example.test.zone\"\n"
                );
            }
            std::fs::write(d.join(format!("{site}.toml")), t)?;
        }
        Ok(())
    }

    /// The sites, their gateways' WAN addresses and namespaces.
    fn sites(&self) -> Vec<(&'static str, &'static str, &Netns)> {
        let mut v = vec![
            ("siteA", A_WAN, &self.vm.sites.a),
            ("siteB", B_WAN, &self.vm.sites.b),
        ];
        if let Some(c) = &self.c {
            v.push(("siteC", C_WAN, c));
        }
        v
    }

    /// Gateways, nodes (keys, launch files, configs) and the node-mode
    /// `migrator.toml` of a ring bed.
    fn write_ring_configs(&self) -> Result<()> {
        self.write_gateway_configs(&[("siteA", A_WAN), ("siteB", B_WAN), ("siteC", C_WAN)])?;
        let v = &self.vm;
        let c_keys = v.path("keys-c");
        let c_fp = crate::bed::keygen(&c_keys)?;
        let nodes = [
            ("siteA", A_WAN, &v.keys.src_dir, &v.keys.src_fp, "tapa"),
            ("siteB", B_WAN, &v.keys.dst_dir, &v.keys.dst_fp, "tapb"),
            ("siteC", C_WAN, &c_keys, &c_fp, "tapc"),
        ];
        for (name, wan, key, _, tap) in &nodes {
            let dir = v.path(&format!("node-{name}"));
            std::fs::create_dir_all(&dir)?;
            // the VM is `web1` on the nodes too: its files web1.img, web1.qemu
            let mut launch = guest::qemu_nbd_command(&v.k, "{disk}", "{name}", &v.append);
            guest::add_tap(&mut launch, tap);
            launch.args(["-monitor", "unix:{dir}/{name}.hmp,server=on,wait=off"]);
            std::fs::write(dir.join("web1.qemu"), guest::launch_file(&launch))?;
            if *name == "siteA" {
                std::fs::copy(&v.image, dir.join("web1.img"))?;
            }
            let mut t = format!(
                "name = \"{name}\"\ndir = \"{}\"\nlisten = \"{wan}:7800\"\nidentity = \"{}\"\ncontrol = \"{}\"\n",
                dir.display(),
                key.display(),
                v.path(&format!("{name}.ctl")).display(),
            );
            for (peer, peer_wan, _, fp, _) in nodes.iter().filter(|n| n.0 != *name) {
                t += &format!(
                    "\n[peer.{peer}]\naddr = \"{peer_wan}:7800\"\nfingerprint = \"{fp}\"\n"
                );
            }
            std::fs::write(v.path(&format!("node-{name}.toml")), t)?;
        }
        let mut m = format!(
            "identity = \"{}\"\n[dns]\nkey = \"{DNS_KEY}\"\nttl = 5\n",
            v.keys.src_dir.display()
        );
        for (site, wan, _) in self.sites() {
            m += &format!(
                "[site.{site}]\ngateway = \"{wan}:7300\"\ntoken = \"{TOKEN}\"\nnode = \"{}\"\n",
                v.path(&format!("{site}.ctl")).display()
            );
            if site == "siteA" {
                m += &format!("lan = \"br0\"\ndns = \"{A_WAN}:53\"\n");
            }
        }
        m += &format!(
            "[vm.web1]\nsite = \"siteA\"\naddress = \"{GUEST_IP}\"\nname = \"{NAME}\"\n\
             public = {{ siteB = \"{PUBLIC_IP}\", siteC = \"{PUBLIC_C}\" }}\nlan = {{ siteB = \"tapb\", siteC = \"tapc\" }}\n"
        );
        std::fs::write(&self.config, m)?;
        Ok(())
    }

    /// A ring bed's nodes, one per site (node siteA boots the guest);
    /// their QEMUs' consoles are followed as `A`, `B`, `C`.
    pub fn start_nodes(&self) -> Result<Vec<ChildGuard>> {
        let mut out = Vec::new();
        for ((site, _, ns), tag) in self.sites().into_iter().zip(["A", "B", "C"]) {
            let log = self.vm.path(&format!("node-{site}.log"));
            let mut c = ns.command(workspace_bin("migrator").to_str().unwrap_or("migrator"));
            c.args(["node", "run", "--config"])
                .arg(self.vm.path(&format!("node-{site}.toml")))
                .stdout(Stdio::piped())
                .stderr(log_file(&log));
            let (g, _) = crate::bed::spawn_listening(&mut c, &format!("node {site}"))
                .with_context(|| std::fs::read_to_string(&log).unwrap_or_default())?;
            out.push(g);
            self.vm
                .tail_file(self.vm.path(&format!("node-{site}")).join("web1.log"), tag);
        }
        Ok(out)
    }

    /// `migrator migrate web1 --to SITE --json --drain-wait-s 0` with the
    /// ring bed's config, from site A's namespace; its JSON events once it
    /// exited.
    pub fn ring_migrate(&self, to: &str) -> Result<Vec<serde_json::Value>> {
        let mut c = self
            .vm
            .sites
            .a
            .command(workspace_bin("migrator").to_str().unwrap_or("migrator"));
        c.args([
            "migrate",
            "web1",
            "--to",
            to,
            "--json",
            "--drain-wait-s",
            "0",
            "--config",
        ])
        .arg(&self.config)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let out = c.output().context("cannot run migrator migrate")?;
        let events: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        if !out.status.success() {
            bail!(
                "migrate --to {to} failed: {}\n{events:?}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(events)
    }

    fn write_configs(&self) -> Result<()> {
        self.write_gateway_configs(&[("siteA", A_WAN), ("siteB", B_WAN)])?;
        let v = &self.vm;
        std::fs::write(
            &self.config,
            format!(
                "identity = \"{}\"\n\
                 [dns]\nkey = \"{DNS_KEY}\"\nttl = 5\n\
                 [site.siteA]\ngateway = \"{A_WAN}:7300\"\ntoken = \"{TOKEN}\"\nlan = \"br0\"\ndns = \"{A_WAN}:53\"\n\
                 [site.siteB]\ngateway = \"{B_WAN}:7300\"\ntoken = \"{TOKEN}\"\nagent = \"{B_WAN}:7800\"\nagent_fingerprint = \"{}\"\n\
                 [vm.web1]\nsite = \"siteA\"\ncontrol = \"{}\"\nqmp = \"{}\"\naddress = \"{GUEST_IP}\"\nname = \"{NAME}\"\n\
                 public = {{ siteB = \"{PUBLIC_IP}\" }}\nlan = {{ siteB = \"tapb\" }}\n",
                v.keys.src_dir.display(),
                v.keys.dst_fp,
                v.path("ctl.sock").display(),
                v.path("a.qmp").display(),
            ),
        )?;
        Ok(())
    }

    /// Starts every site's gateway (site A's with the DNS zone).
    pub fn start_gateways(&mut self) -> Result<()> {
        let sites: Vec<(&str, Command)> = self
            .sites()
            .into_iter()
            .map(|(s, _, ns)| {
                (
                    s,
                    ns.command(workspace_bin("gateway").to_str().unwrap_or("gateway")),
                )
            })
            .collect();
        for (site, mut cmd) in sites {
            let d = self.vm.dir.path();
            cmd.args(["run", "--config"])
                .arg(d.join(format!("{site}.toml")))
                .env("NO_COLOR", "1")
                .stdout(Stdio::piped())
                .stderr(log_file(&d.join(format!("gateway-{site}.log"))));
            let mut child = ChildGuard::spawn(&mut cmd).context("cannot start the gateway")?;
            let out = child
                .0
                .as_mut()
                .and_then(|c| c.stdout.take())
                .context("gateway stdout")?;
            let mut lines = BufReader::new(out).lines();
            loop {
                match lines.next() {
                    Some(Ok(l)) if l.starts_with("gateway ") && l.ends_with(" running") => break,
                    Some(Ok(_)) => continue,
                    _ => bail!(
                        "gateway {site} did not start:\n{}",
                        std::fs::read_to_string(d.join(format!("gateway-{site}.log")))
                            .unwrap_or_default()
                    ),
                }
            }
            self.gateways.push(child);
        }
        Ok(())
    }

    /// `migrator migrate web1 --to siteB` at site A, with `extra` options.
    pub fn migrate_command(&self, extra: &[&str]) -> Command {
        self.migrate_command_with(&self.config, extra)
    }

    /// A copy of `migrator.toml` with `from` replaced by `to`.
    pub fn config_variant(&self, name: &str, from: &str, to: &str) -> Result<PathBuf> {
        let text = std::fs::read_to_string(&self.config)?;
        if !text.contains(from) {
            bail!("{from:?} is not in {}", self.config.display());
        }
        let p = self.vm.path(name);
        std::fs::write(&p, text.replace(from, to))?;
        Ok(p)
    }

    /// [`SysBed::migrate_command`] with another config file.
    pub fn migrate_command_with(&self, config: &Path, extra: &[&str]) -> Command {
        let mut c = self
            .vm
            .sites
            .a
            .command(workspace_bin("migrator").to_str().unwrap_or("migrator"));
        c.args(["migrate", "web1", "--to", "siteB", "--config"])
            .arg(config)
            .args(extra);
        c
    }

    /// `dig +short NAME` from the client, against site A's gateway.
    pub fn dig(&self) -> Result<String> {
        let out = self
            .client
            .command("dig")
            .args(["+short", "+time=2", "+tries=2", &format!("@{A_WAN}"), NAME])
            .output()
            .context("cannot run dig (install bind9-dnsutils)")?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// The name's answer as the client sees it: (TTL, address).
    pub fn dig_record(&self) -> Result<(u32, String)> {
        let out = self
            .client
            .command("dig")
            .args(["+noall", "+answer", "+time=2", &format!("@{A_WAN}"), NAME])
            .output()
            .context("cannot run dig (install bind9-dnsutils)")?;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let f: Vec<&str> = text.split_whitespace().collect();
        match f.as_slice() {
            [_, ttl, "IN", "A", addr, ..] => Ok((ttl.parse()?, addr.to_string())),
            _ => bail!("unexpected dig answer {text:?}"),
        }
    }

    /// A gateway's `/v1/status`, asked from inside its site.
    pub fn gateway_status(&self, site: &str) -> Result<serde_json::Value> {
        let (ns, addr) = self
            .sites()
            .into_iter()
            .find(|(s, _, _)| *s == site)
            .map(|(_, addr, ns)| (ns.name.clone(), addr))
            .with_context(|| format!("no site {site} in this bed"))?;
        let gw = migrator::orchestrate::gateway::Gateway::new(
            site,
            migrator::orchestrate::gateway::Endpoint::Tcp(format!("{addr}:7300")),
            TOKEN.into(),
        );
        let st = block_on_in(&ns, move || async move { gw.status().await })??;
        Ok(serde_json::to_value(st)?)
    }

    /// The gateways' and the migration's logs, for failure messages.
    pub fn logs(&self) -> String {
        let d = self.vm.dir.path();
        let mut s = self.vm.logs();
        let logs = self
            .sites()
            .into_iter()
            .flat_map(|(site, _, _)| [format!("gateway-{site}.log"), format!("node-{site}.log")]);
        for name in logs {
            let p = d.join(name);
            if !p.exists() {
                continue;
            }
            let text = std::fs::read_to_string(&p).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(20).collect();
            s += &format!(
                "--- {}\n{}\n",
                p.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        s
    }

    /// Addresses, links, neighbours and routes of the sites, for failure messages.
    pub fn diag(&self) -> String {
        let mut out = String::new();
        if let Ok(o) = Command::new("sh")
            .args(["-c", "ps -eo pid,args | grep [q]emu-system"])
            .output()
        {
            out += &String::from_utf8_lossy(&o.stdout);
        }
        for (ns, cmds) in [
            (
                &self.vm.sites.a,
                &[
                    &["ip", "-br", "addr"][..],
                    &["ip", "-br", "link"],
                    &["ip", "neigh"],
                    &["ip", "route"],
                    &["bridge", "link"],
                ][..],
            ),
            (
                &self.vm.sites.b,
                &[
                    &["ip", "-br", "addr"][..],
                    &["ip", "neigh"],
                    &["ip", "route"],
                    &["ip", "rule"],
                ][..],
            ),
            (&self.wan, &[&["ip", "route"][..], &["ip", "rule"]][..]),
        ] {
            for c in cmds {
                if let Ok(o) = ns.command(c[0]).args(&c[1..]).output() {
                    out += &format!(
                        "[{}] {}\n{}{}",
                        ns.name,
                        c.join(" "),
                        String::from_utf8_lossy(&o.stdout),
                        String::from_utf8_lossy(&o.stderr)
                    );
                }
            }
        }
        out
    }

    /// A TCP connection from the client namespace.
    pub fn connect(&self, to: &str) -> Result<TcpStream> {
        let to: SocketAddr = to.parse()?;
        let s = in_netns(&self.client.name, move || {
            TcpStream::connect_timeout(&to, Duration::from_secs(5))
        })??;
        Ok(s)
    }
}

/// The client's two connections to the guest: a paced download and an
/// echo session.
pub struct Clients {
    pub download: Arc<Mutex<Seen>>,
    pub session: Arc<Mutex<Seen>>,
    /// Lines the session has had echoed.
    pub lines: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl SysBed {
    /// Starts the download of `/big.bin` (`file`) at `rate` bytes per second
    /// and the echo session (a line every 50 ms), then lets them run a second.
    pub fn start_clients(&self, file: Arc<Vec<u8>>, rate: u64) -> Result<Clients> {
        self.start_clients_at(GUEST_IP, file, rate)
    }

    /// [`SysBed::start_clients`] to the guest at `addr`.
    pub fn start_clients_at(&self, addr: &str, file: Arc<Vec<u8>>, rate: u64) -> Result<Clients> {
        let download = download(self.connect(&format!("{addr}:80"))?, "/big.bin", file, rate);
        let stop = Arc::new(AtomicBool::new(false));
        let (session, lines) = session(
            self.connect(&format!("{addr}:7"))?,
            Duration::from_millis(50),
            stop.clone(),
        );
        std::thread::sleep(Duration::from_secs(1));
        Ok(Clients {
            download,
            session,
            lines,
            stop,
        })
    }
}

impl Clients {
    pub fn download_seen(&self) -> Seen {
        self.download.lock().map(|d| d.clone()).unwrap_or_default()
    }

    pub fn session_seen(&self) -> Seen {
        self.session.lock().map(|d| d.clone()).unwrap_or_default()
    }

    /// Waits until the download ended, or made no progress for `idle`.
    pub fn settle_download(&self, idle: Duration) -> Result<Seen> {
        let mut last = (0u64, Instant::now());
        loop {
            crate::interrupt::check()?;
            let d = self.download_seen();
            if d.done || d.error.is_some() {
                return Ok(d);
            }
            if d.bytes != last.0 {
                last = (d.bytes, Instant::now());
            } else if last.1.elapsed() > idle {
                return Ok(d);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Ends the session (after the line in flight) and returns what it saw.
    pub fn stop_session(&self) -> Seen {
        self.stop.store(true, Ordering::Relaxed);
        let t = Instant::now();
        loop {
            let s = self.session_seen();
            if s.done || s.error.is_some() || t.elapsed() > Duration::from_secs(40) {
                return s;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// What a client connection saw.
#[derive(Debug, Default, Clone)]
pub struct Seen {
    pub bytes: u64,
    /// Longest time without progress.
    pub stall: Duration,
    pub error: Option<String>,
    pub done: bool,
}

/// Downloads `path` over HTTP from `conn`, reading at most `rate` bytes per
/// second (so the download spans the migration); compares the body with
/// `expect`.
pub fn download(
    mut conn: TcpStream,
    path: &str,
    expect: Arc<Vec<u8>>,
    rate: u64,
) -> Arc<Mutex<Seen>> {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let s = seen.clone();
    let path = path.to_string();
    std::thread::spawn(move || {
        let fail = |e: String| {
            if let Ok(mut g) = s.lock() {
                g.error = Some(e);
            }
        };
        if let Err(e) = write!(conn, "GET {path} HTTP/1.0\r\nHost: web1\r\n\r\n") {
            return fail(format!("request: {e}"));
        }
        let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
        let mut got = Vec::with_capacity(expect.len() + 1024);
        let mut buf = vec![0u8; 16384];
        let t0 = Instant::now();
        let mut last = Instant::now();
        loop {
            match conn.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    got.extend_from_slice(&buf[..n]);
                    let now = Instant::now();
                    if let Ok(mut g) = s.lock() {
                        g.stall = g.stall.max(now - last);
                        g.bytes = got.len() as u64;
                    }
                    last = now;
                    // pace the reads
                    let due = Duration::from_secs_f64(got.len() as f64 / rate as f64);
                    if let Some(w) = due.checked_sub(t0.elapsed()) {
                        std::thread::sleep(w);
                    }
                }
                Err(e) => return fail(format!("after {} bytes: {e}", got.len())),
            }
        }
        let Some(body_at) = got.windows(4).position(|w| w == b"\r\n\r\n") else {
            return fail("no HTTP header".into());
        };
        let body = &got[body_at + 4..];
        if body != expect.as_slice() {
            return fail(format!(
                "the body differs: {} bytes received, {} expected",
                body.len(),
                expect.len()
            ));
        }
        if let Ok(mut g) = s.lock() {
            g.done = true;
        }
    });
    seen
}

/// An interactive session: a numbered line every `every`, each echoed back
/// whole, until `stop`.
pub fn session(
    conn: TcpStream,
    every: Duration,
    stop: Arc<AtomicBool>,
) -> (Arc<Mutex<Seen>>, Arc<AtomicU64>) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let lines = Arc::new(AtomicU64::new(0));
    let (s, n) = (seen.clone(), lines.clone());
    std::thread::spawn(move || {
        let fail = |e: String| {
            if let Ok(mut g) = s.lock() {
                g.error = Some(e);
            }
        };
        let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
        let Ok(mut w) = conn.try_clone() else {
            return fail("clone".into());
        };
        let mut r = BufReader::new(conn);
        let mut i = 0u64;
        let mut last = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            i += 1;
            let line = format!("line {i} {}\n", "x".repeat(64));
            if let Err(e) = w.write_all(line.as_bytes()) {
                return fail(format!("write of line {i}: {e}"));
            }
            let mut back = String::new();
            match r.read_line(&mut back) {
                Ok(0) => return fail(format!("closed before the echo of line {i}")),
                Ok(_) if back == line => {}
                Ok(_) => return fail(format!("line {i} came back as {back:?}")),
                Err(e) => return fail(format!("echo of line {i}: {e}")),
            }
            let now = Instant::now();
            if let Ok(mut g) = s.lock() {
                g.stall = g.stall.max(now - last);
                g.bytes += line.len() as u64;
            }
            last = now;
            n.store(i, Ordering::Relaxed);
            std::thread::sleep(every);
        }
        let _ = w.shutdown(std::net::Shutdown::Both);
        if let Ok(mut g) = s.lock() {
            g.done = true;
        }
    });
    (seen, lines)
}

/// Random bytes for the big file.
pub fn random_file(len: usize, seed: u64) -> Vec<u8> {
    use rand::{RngCore as _, SeedableRng as _};
    let mut v = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

/// Waits until `path` exists (a socket appearing).
pub fn wait_path(path: &Path, within: Duration) -> Result<()> {
    let t = Instant::now();
    while !path.exists() {
        if t.elapsed() > within {
            bail!("{} did not appear", path.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}
