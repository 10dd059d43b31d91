//! Per-site gateway daemon: tunnels a migrated VM's old address to its new site,
//! translates its new address, and exposes an authenticated control API.
//!
//! Built so far: the daemon, its config file and the embedded authoritative
//! DNS server (the `[dns]` table, served by the `dyndns` crate). The tunnel,
//! NAT and control API are the network-continuity issue's. See ARCHITECTURE.md.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// `gateway.toml`.
///
/// ```toml
/// site = "siteA"
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
    /// The embedded DNS server; same keys as `dyndns.toml`.
    #[serde(default)]
    pub dns: Option<dyndns::Config>,
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
        if let Some(dns) = &mut config.dns {
            if dns.listen.is_empty() {
                return Err(ConfigError::Parse(
                    shown,
                    "[dns] needs a `listen` address".into(),
                ));
            }
            dns.base = base;
        }
        Ok(config)
    }
}

/// A running gateway.
pub struct Gateway {
    pub config: Config,
    pub dns: Option<dyndns::server::Running>,
}

impl Gateway {
    pub async fn start(config: Config) -> anyhow::Result<Self> {
        let dns = match &config.dns {
            Some(dns) => Some(dyndns::server::start(dns).await?),
            None => None,
        };
        Ok(Self { config, dns })
    }

    pub async fn shutdown(self) {
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
