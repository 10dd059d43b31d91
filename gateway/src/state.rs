//! What a gateway must remember across a restart: registered services and
//! migrations in progress (so a restarted old-site gateway keeps tunnelling
//! while it drains). One JSON file, replaced atomically on every change.
//! Beside it, `flows.json`: the connections of each VM served here and the
//! site each came in at ([`Flows`], written every few seconds when they
//! changed), so that after a restart the VM's replies still leave the way
//! their connection came in.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

pub use gateway_api::{HandedFlow, Migration, Phase, Role, Service};

/// The connections of the VMs served here, by service.
pub type Flows = BTreeMap<String, Vec<HandedFlow>>;

/// Reads `flows.json`; missing or unreadable, none (the connections are
/// then learned again from their next packet in).
pub fn load_flows(path: &Path) -> Flows {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b).unwrap_or_else(|e| {
            tracing::warn!(error = %e, path = %path.display(), "cannot read the served connections; starting without them");
            Flows::new()
        }),
        Err(_) => Flows::new(),
    }
}

/// Write to a temporary file, fsync, rename over, fsync the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp: PathBuf = path.with_extension("tmp");
    let mut f =
        std::fs::File::create(&tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot replace {}", path.display()))?;
    if let Some(dir) = path.parent() {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub services: BTreeMap<String, Service>,
    pub migrations: BTreeMap<String, Migration>,
}

impl State {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        match std::fs::read_to_string(path) {
            Ok(text) => serde_json::from_str(&text).with_context(|| {
                format!(
                    "state file {} is not valid (move it aside to start empty)",
                    path.display()
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(e).with_context(|| format!("cannot read state file {}", path.display())),
        }
    }

    /// Replaces the file atomically ([`write_atomic`]).
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        write_atomic(path, &serde_json::to_vec_pretty(self)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    #[test]
    fn round_trips_through_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("state.json");
        assert_eq!(State::load(&p).expect("empty"), State::default());
        let mut s = State::default();
        s.services.insert(
            "web1".into(),
            Service {
                name: "web1".into(),
                address: IpAddr::from([10, 1, 0, 10]),
                site: "siteA".into(),
            },
        );
        s.migrations.insert(
            "web1".into(),
            Migration {
                service: "web1".into(),
                address: IpAddr::from([10, 1, 0, 10]),
                role: Some(Role::Old {
                    peer: "siteB".into(),
                    lan: Some("br0".into()),
                    address: None,
                }),
                phase: Phase::Draining { deadline_unix: 99 },
            },
        );
        s.save(&p).expect("save");
        assert_eq!(State::load(&p).expect("load"), s);
        std::fs::write(&p, "{").expect("corrupt");
        assert!(State::load(&p).is_err());
    }

    #[test]
    fn served_connections_round_trip_and_a_bad_file_is_none() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("flows.json");
        assert!(load_flows(&p).is_empty());
        let mut f = Flows::new();
        f.insert(
            "web1".into(),
            vec![HandedFlow {
                origin: IpAddr::from([10, 2, 0, 100]),
                proto: 6,
                lo: "10.0.0.2:40000".parse().expect("addr"),
                hi: "10.1.0.10:7002".parse().expect("addr"),
                tcp: Some(gateway_api::FlowState::Established),
            }],
        );
        write_atomic(&p, &serde_json::to_vec(&f).expect("json")).expect("write");
        assert_eq!(load_flows(&p), f);
        std::fs::write(&p, "[1,").expect("corrupt");
        assert!(load_flows(&p).is_empty());
    }
}
