//! `gateway.toml`: the site, its tunnel, its peers, its API and the
//! embedded DNS server; paths relative to the file.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::Deserialize;

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
