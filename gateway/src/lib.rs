//! Per-site gateway daemon: tunnels a migrated VM's old address to its new site,
//! translates its new address, and exposes an authenticated control API.
//!
//! - [`control`]: services and migrations, their phases, drain; persisted
//!   by [`state`]; routes and rules through [`netlink`]
//! - [`plane`]: the per-packet decisions (tunnel, reverse tunnel, NAT) on
//!   one TUN device and the raw IP-in-IP sockets
//! - [`api`]: the bearer-token HTTP/JSON API and Prometheus metrics
//! - the embedded DNS server (`[dns]`, the `dyndns` crate)

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::Deserialize;

pub mod api;
pub mod control;
pub mod netlink;
pub mod plane;
pub mod state;
pub mod tables;

/// `gateway.toml`.
///
/// ```toml
/// site = "siteA"
/// wan = "198.51.100.2"        # this gateway's address towards the other sites (v4 or v6)
/// state_dir = "/var/lib/gateway"
///
/// [api]
/// unix = "/run/gateway.sock"  # or: listen = "127.0.0.1:7300"
/// token_file = "/etc/gateway/token"   # or: token = "..."
///
/// [tunnel]
/// device = "gwtun0"           # TUN device name
/// kind = "ipip"               # or "fou" (UDP, fou_port = 5555)
/// signal_pmtu = false         # true: ICMP too-big instead of outer fragments
/// path_mtu = 1500
/// clamp_mss = true
/// spin_us = 2000              # poll this long after a packet before sleeping (latency for CPU); 0: off
/// fast_path = true            # bulk IPv4 TCP in the kernel (tc-BPF), the rest through the plane; if it cannot start, the plane carries all (logged)
/// drain_deadline_s = 3600
/// udp_idle_s = 60             # a UDP flow has ended after this much silence
/// tcp_idle_s = 7200
///
/// [[peer]]
/// site = "siteB"
/// address = "203.0.113.2"
///
/// [dns]                       # optional: the embedded authoritative DNS server
/// listen = ["192.0.2.1:53"]
/// [[dns.key]]
/// name = "mig-key"
/// secret = "base64..."
/// [[dns.zone]]
/// origin = "example.test."
/// file = "example.test.zone"  # relative to this file's directory
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This site's name, as the migrator and the other gateways call it.
    pub site: String,
    /// This gateway's outer (tunnel) address. Without it, no tunnel.
    #[serde(default)]
    pub wan: Option<IpAddr>,
    /// Where the state file lives; without it nothing survives a restart.
    #[serde(default)]
    pub state_dir: Option<PathBuf>,
    #[serde(default)]
    pub api: Option<ApiConfig>,
    #[serde(default)]
    pub tunnel: TunnelConfig,
    #[serde(default, rename = "peer")]
    pub peers: Vec<PeerConfig>,
    /// The embedded DNS server; same keys as `dyndns.toml`.
    #[serde(default)]
    pub dns: Option<dyndns::Config>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    #[serde(default)]
    pub listen: Option<SocketAddr>,
    #[serde(default)]
    pub unix: Option<PathBuf>,
    #[serde(default)]
    pub token: Option<String>,
    #[serde(default)]
    pub token_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TunnelConfig {
    pub device: String,
    /// `ipip` (raw IP protocols 4/41) or `fou` (UDP, `fou_port`).
    pub kind: String,
    pub fou_port: u16,
    /// Answer DF packets that do not fit the tunnel with ICMP "fragmentation
    /// needed"/"packet too big" instead of fragmenting the outer packet.
    pub signal_pmtu: bool,
    pub path_mtu: u16,
    pub clamp_mss: bool,
    /// Microseconds the data plane keeps polling after the last packet
    /// before it sleeps ([`tunnel::poll`]): a sleeping thread's wake-up can
    /// cost tens of microseconds per hop; 0 sleeps at once.
    pub spin_us: u64,
    /// Carry the guests' bulk IPv4 TCP in the kernel ([`tunnel::fastpath`]:
    /// tc-BPF on the TUN device and the WAN interface); SYN/FIN/RST, UDP,
    /// ICMP, IPv6 and translated flows still come through the data plane.
    /// When it cannot start (a build without clang, a kernel that refuses
    /// it) the gateway logs why and the data plane carries everything.
    pub fast_path: bool,
    /// Drain at the latest this long after it starts.
    pub drain_deadline_s: u64,
    /// Drained once no flow is live and nothing crossed for this long.
    pub drain_quiet_ms: u64,
    /// A UDP or ICMP flow ends after this long without a packet.
    pub udp_idle_s: u64,
    /// An established TCP flow ends after this long without a packet.
    pub tcp_idle_s: u64,
}

impl TunnelConfig {
    pub fn timeouts(&self) -> tunnel::flow::Timeouts {
        tunnel::flow::Timeouts {
            tcp_established_ms: self.tcp_idle_s.saturating_mul(1000),
            udp_ms: self.udp_idle_s.saturating_mul(1000),
            icmp_ms: self.udp_idle_s.saturating_mul(1000),
            other_ms: self.udp_idle_s.saturating_mul(1000),
            ..Default::default()
        }
    }
}

impl Default for TunnelConfig {
    fn default() -> Self {
        Self {
            device: "gwtun0".into(),
            kind: "ipip".into(),
            fou_port: 5555,
            signal_pmtu: false,
            path_mtu: 1500,
            clamp_mss: true,
            spin_us: tunnel::poll::DEFAULT_SPIN.as_micros() as u64,
            fast_path: true,
            drain_deadline_s: 3600,
            drain_quiet_ms: 2000,
            udp_idle_s: 60,
            tcp_idle_s: 7200,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    pub site: String,
    pub address: IpAddr,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read gateway config {0}: {1}")]
    Read(String, String),
    #[error("gateway config {0}: {1}")]
    Parse(String, String),
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::Read(shown.clone(), e.to_string()))?;
        let mut config: Config =
            toml::from_str(&text).map_err(|e| ConfigError::Parse(shown.clone(), e.to_string()))?;
        let base = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let rel = |p: &Path| {
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                base.join(p)
            }
        };
        if let Some(dns) = &mut config.dns {
            if dns.listen.is_empty() {
                return Err(ConfigError::Parse(
                    shown,
                    "[dns] needs a `listen` address".into(),
                ));
            }
            dns.base = base.clone();
        }
        if let Some(api) = &mut config.api {
            if api.listen.is_none() == api.unix.is_none() {
                return Err(ConfigError::Parse(
                    shown,
                    "[api] needs exactly one of `listen` or `unix`".into(),
                ));
            }
            if api.token.is_none() == api.token_file.is_none() {
                return Err(ConfigError::Parse(
                    shown,
                    "[api] needs exactly one of `token` or `token_file`".into(),
                ));
            }
            api.unix = api.unix.as_deref().map(rel);
            api.token_file = api.token_file.as_deref().map(rel);
        }
        config.state_dir = config.state_dir.as_deref().map(rel);
        if !matches!(config.tunnel.kind.as_str(), "ipip" | "fou") {
            return Err(ConfigError::Parse(
                shown,
                format!(
                    "[tunnel] kind must be ipip or fou, not {:?}",
                    config.tunnel.kind
                ),
            ));
        }
        if config.tunnel.device.is_empty() || config.tunnel.device.len() > 15 {
            return Err(ConfigError::Parse(
                shown,
                "[tunnel] device must be 1 to 15 characters".into(),
            ));
        }
        Ok(config)
    }
}

/// Opens the TUN device and the outer sockets and runs the data plane on a
/// thread of its own ([`plane::Plane::run`]: it polls its sockets for a
/// while after each packet, then sleeps in `poll(2)`); each packet is
/// handled where it is read, with no hop between threads. The control plane
/// reaches it through `tables` and `counters` only.
fn start_plane(config: &Config, wan: std::net::IpAddr) -> anyhow::Result<Arc<plane::Plane>> {
    let plane = Arc::new(open_plane(config, wan)?);
    let p = plane.clone();
    std::thread::Builder::new()
        .name("data-plane".into())
        .spawn(move || {
            if let Err(e) = p.run() {
                // a gateway without its data plane would keep answering its
                // API while no packet moves: stop, so that the supervisor
                // restarts it (the state on disk brings the tunnels back)
                tracing::error!(error = %e, "the data plane failed: stopping the gateway");
                std::process::exit(70);
            }
        })
        .context("cannot start the data-plane thread")?;
    Ok(plane)
}

fn open_plane(config: &Config, wan: std::net::IpAddr) -> anyhow::Result<plane::Plane> {
    let t = &config.tunnel;
    let mut tun = tunnel::tundev::open(&t.device, t.path_mtu)?;
    let kind = if t.kind == "fou" {
        tunnel::encap::Kind::Fou { port: t.fou_port }
    } else {
        tunnel::encap::Kind::Ipip
    };
    let outer = tunnel::io::Outer::open(kind, wan, t.path_mtu)?;
    let overhead = tunnel::io::overhead(kind, wan);
    if !t.signal_pmtu {
        // segments of connections from before the move are cut to fit the
        // tunnel where they come as super-packets; only the rest fragment
        tun.resegment(Some(t.path_mtu.saturating_sub(overhead)));
    }
    let icmp = if t.signal_pmtu {
        Some(tunnel::io::IcmpSender::open().context("cannot open raw ICMP sockets")?)
    } else {
        None
    };
    let peers: Vec<std::net::IpAddr> = config.peers.iter().map(|p| p.address).collect();
    let fast = if t.fast_path {
        let attached = tunnel::fastpath::FastPath::attach(&tunnel::fastpath::Settings {
            tun: t.device.clone(),
            local: wan,
            peer: wan, // unused: each guest names its peer
            extra_peers: peers.clone(),
            fou_port: match kind {
                tunnel::encap::Kind::Fou { port } => Some(port),
                tunnel::encap::Kind::Ipip => None,
            },
            max_plain: t.path_mtu.saturating_sub(overhead),
            deliver: Vec::new(),
            gateway: true,
            signal_pmtu: t.signal_pmtu,
        });
        match attached {
            Ok(f) => Some(std::sync::Mutex::new(f)),
            // an optimisation that cannot start does not stop the gateway
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "the kernel fast path is off: the data plane carries everything");
                None
            }
        }
    } else {
        None
    };
    Ok(plane::Plane {
        peers,
        fast,
        tun,
        outer,
        signal_pmtu: t.signal_pmtu.then_some(wan),
        icmp,
        overhead,
        tables: Default::default(),
        counters: Default::default(),
        path_mtu: t.path_mtu,
        clamp_mss: t.clamp_mss,
        spin: std::time::Duration::from_micros(t.spin_us),
        started: Instant::now(),
    })
}

/// A running gateway.
pub struct Gateway {
    pub control: Arc<control::Control>,
    pub dns: Option<dyndns::server::Running>,
    /// Where the API listens (TCP), if it does.
    pub api_addr: Option<SocketAddr>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Gateway {
    pub async fn start(config: Config) -> anyhow::Result<Self> {
        let dns = match &config.dns {
            Some(dns) => Some(dyndns::server::start(dns).await?),
            None => None,
        };
        let state_path = match &config.state_dir {
            Some(d) => {
                std::fs::create_dir_all(d)
                    .with_context(|| format!("cannot create state_dir {}", d.display()))?;
                Some(d.join("state.json"))
            }
            None => None,
        };
        let state = match &state_path {
            Some(p) => state::State::load(p)?,
            None => state::State::default(),
        };
        let mut tasks = Vec::new();
        let (plane, net) = match config.wan {
            Some(wan) => {
                let plane = start_plane(&config, wan)?;
                (Some(plane), Some(netlink::Net::connect()?))
            }
            None => (None, None),
        };
        let control = Arc::new(control::Control::new(
            config.clone(),
            state,
            state_path,
            plane,
            net,
        ));
        control.restore().await?;
        let c = control.clone();
        tasks.push(tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_millis(250));
            loop {
                every.tick().await;
                if let Err(e) = c.tick().await {
                    tracing::warn!(error = %e, "drain check failed; retrying");
                }
            }
        }));
        let mut api_addr = None;
        if let Some(a) = &config.api {
            let token: String = match (&a.token, &a.token_file) {
                (Some(t), _) => t.clone(),
                (None, Some(f)) => std::fs::read_to_string(f)
                    .with_context(|| format!("cannot read token_file {}", f.display()))?
                    .trim()
                    .to_string(),
                _ => anyhow::bail!("[api] needs a token"),
            };
            if token.len() < 16 {
                anyhow::bail!(
                    "the API token is too short ({} characters; use at least 16)",
                    token.len()
                );
            }
            let router = api::router(api::Api {
                control: control.clone(),
                token: token.into(),
                dns: dns.as_ref().map(|d| Arc::new(d.zones.clone())),
            });
            if let Some(addr) = a.listen {
                let l = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen on {addr}"))?;
                api_addr = Some(l.local_addr()?);
                tasks.push(tokio::spawn(async move {
                    let _ = axum::serve(l, router).await;
                }));
            } else if let Some(path) = &a.unix {
                let _ = std::fs::remove_file(path); // a stale socket from a previous run
                let l = tokio::net::UnixListener::bind(path)
                    .with_context(|| format!("cannot listen on {}", path.display()))?;
                tasks.push(tokio::spawn(async move {
                    let _ = axum::serve(l, router).await;
                }));
            }
        }
        Ok(Self {
            control,
            dns,
            api_addr,
            tasks,
        })
    }

    pub async fn shutdown(self) {
        for t in &self.tasks {
            t.abort();
        }
        if let Some(dns) = self.dns {
            dns.shutdown().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_with_and_without_dns() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("gateway.toml");
        std::fs::write(&p, "site = \"siteA\"\n").expect("write");
        let c = Config::load(&p).expect("load");
        assert!(c.dns.is_none());
        std::fs::write(
            &p,
            "site = \"siteA\"\n[dns]\nlisten = [\"127.0.0.1:0\"]\n[[dns.zone]]\norigin = \"example.test.\"\nfile = \"z.zone\"\n",
        )
        .expect("write");
        let c = Config::load(&p).expect("load");
        let dns = c.dns.expect("dns");
        assert_eq!(dns.path(Path::new("z.zone")), dir.path().join("z.zone"));
        std::fs::write(&p, "site = \"siteA\"\n[dnss]\n").expect("write");
        assert!(matches!(Config::load(&p), Err(ConfigError::Parse(..))));
    }
}
