//! `dyndns.toml`: where to listen, which zones, which keys.
//!
//! ```toml
//! listen = ["127.0.0.1:5353", "[::1]:5353"]   # UDP and TCP on each
//!
//! [[key]]
//! name = "mig-key"
//! algorithm = "hmac-sha256"                  # default
//! secret = "base64..."                       # or: file = "mig-key.conf" (tsig-keygen output)
//!
//! [[zone]]
//! origin = "example.test."
//! file = "example.test.zone"                 # RFC 1035 master file
//! journal = "example.test.jnl"               # default: FILE + ".jnl"
//! update_keys = ["mig-key"]                  # default: every key above
//! transfer = "signed"                        # deny (default) | signed | any
//! notify = ["127.0.0.1:5354"]                # secondaries told of each change
//! ```
//!
//! Relative paths are relative to the config file's directory. The gateway
//! embeds the same structure as its `[dns]` table.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::key::{Algorithm, KeyError, TsigKey, DEFAULT_FUDGE};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub listen: Vec<SocketAddr>,
    #[serde(default, rename = "key")]
    pub keys: Vec<KeyConfig>,
    #[serde(default, rename = "zone")]
    pub zones: Vec<ZoneConfig>,
    /// Allowed clock difference for TSIG, seconds.
    #[serde(default = "default_fudge")]
    pub fudge: u16,
    /// Directory that relative paths are resolved against.
    #[serde(skip)]
    pub base: PathBuf,
}

fn default_fudge() -> u16 {
    DEFAULT_FUDGE
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    pub name: String,
    #[serde(default)]
    pub algorithm: Option<String>,
    #[serde(default)]
    pub secret: Option<String>,
    #[serde(default)]
    pub file: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Transfer {
    #[default]
    Deny,
    Signed,
    Any,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZoneConfig {
    pub origin: String,
    pub file: PathBuf,
    #[serde(default)]
    pub journal: Option<PathBuf>,
    #[serde(default)]
    pub update_keys: Option<Vec<String>>,
    #[serde(default)]
    pub transfer: Transfer,
    #[serde(default)]
    pub notify: Vec<SocketAddr>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {0}: {1}")]
    Read(String, String),
    #[error("config {0}: {1}")]
    Parse(String, String),
    #[error("config: key {0:?}: {1}")]
    Key(String, KeyError),
    #[error("config: key {0:?} needs exactly one of `secret` or `file`")]
    KeySource(String),
    #[error("config: zone {0:?} allows update key {1:?}, which no [[key]] defines")]
    UnknownKey(String, String),
    #[error("config: no `listen` address")]
    NoListen,
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::Read(shown.clone(), e.to_string()))?;
        let mut config = Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse(_, why) => ConfigError::Parse(shown, why),
            other => other,
        })?;
        config.base = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        Ok(config)
    }

    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let config: Config =
            toml::from_str(text).map_err(|e| ConfigError::Parse("<text>".into(), e.to_string()))?;
        if config.listen.is_empty() {
            return Err(ConfigError::NoListen);
        }
        for zone in &config.zones {
            for k in zone.update_keys.iter().flatten() {
                if !config
                    .keys
                    .iter()
                    .any(|c| c.name.trim_end_matches('.') == k.trim_end_matches('.'))
                {
                    return Err(ConfigError::UnknownKey(zone.origin.clone(), k.clone()));
                }
            }
        }
        Ok(config)
    }

    pub fn path(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base.join(p)
        }
    }

    pub fn tsig_keys(&self) -> Result<Vec<TsigKey>, ConfigError> {
        self.keys
            .iter()
            .map(|k| {
                let key = match (&k.secret, &k.file) {
                    (Some(secret), None) => {
                        let alg = k.algorithm.as_deref().unwrap_or("hmac-sha256");
                        TsigKey::parse_spec(&format!("{alg}:{}:{secret}", k.name))
                    }
                    (None, Some(file)) => TsigKey::from_bind_file(&self.path(file)),
                    _ => return Err(ConfigError::KeySource(k.name.clone())),
                };
                let key = key.map_err(|e| ConfigError::Key(k.name.clone(), e))?;
                if let Some(alg) = &k.algorithm {
                    let want =
                        Algorithm::parse(alg).map_err(|e| ConfigError::Key(k.name.clone(), e))?;
                    if want != key.algorithm() {
                        return Err(ConfigError::Key(
                            k.name.clone(),
                            KeyError::Algorithm(format!(
                                "{alg} (the key file says {})",
                                key.algorithm().as_str()
                            )),
                        ));
                    }
                }
                Ok(key)
            })
            .collect()
    }

    pub fn journal_path(&self, zone: &ZoneConfig) -> PathBuf {
        match &zone.journal {
            Some(j) => self.path(j),
            None => {
                let mut p = self.path(&zone.file).into_os_string();
                p.push(".jnl");
                PathBuf::from(p)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_full_config_and_rejects_unknown_fields_and_keys() {
        let text = r#"
            listen = ["127.0.0.1:5353"]
            [[key]]
            name = "mig-key"
            secret = "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0"
            [[zone]]
            origin = "example.test."
            file = "example.test.zone"
            update_keys = ["mig-key"]
            transfer = "signed"
            notify = ["127.0.0.1:5354"]
        "#;
        let c = Config::parse(text).expect("parse");
        assert_eq!(c.zones[0].transfer, Transfer::Signed);
        assert_eq!(c.tsig_keys().expect("keys")[0].display_name(), "mig-key");
        assert_eq!(c.fudge, 300);

        let typo = text.replace("transfer =", "transfr =");
        assert!(matches!(Config::parse(&typo), Err(ConfigError::Parse(..))));
        let bad_key = text.replace(r#"update_keys = ["mig-key"]"#, r#"update_keys = ["other"]"#);
        assert!(matches!(
            Config::parse(&bad_key),
            Err(ConfigError::UnknownKey(..))
        ));
    }
}
