//! Per-site gateway daemon: tunnels a migrated VM's old address to its new site,
//! translates its new address, and exposes an authenticated control API.
//!
//! - [`config`]: the file `gateway.toml`
//! - [`control`]: services and migrations, their roles and phases, drain;
//!   persisted by [`state`]; routes and rules through [`netlink`]
//! - [`tables`]: the per-packet decisions (forward, serve, NAT), pure;
//!   [`plane`] runs them on one TUN device and the outer sockets
//! - [`api`]: the bearer-token HTTP/JSON API and Prometheus metrics
//! - the embedded DNS server (`[dns]`, the `dyndns` crate)

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;

pub mod api;
pub mod config;
pub mod control;
pub mod netlink;
pub mod plane;
pub mod state;
pub mod tables;

pub use config::{ApiConfig, Config, ConfigError, PeerConfig, TunnelConfig};

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
