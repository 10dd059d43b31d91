//! The site gateway's control API as types: the gateway serves them
//! (`gateway/src/api.rs`) and `migrator migrate` sends and reads them, so a
//! renamed field breaks at compile time, not at run time.
//!
//! | method | path | body → reply |
//! |---|---|---|
//! | POST | /v1/services | [`Service`] → [`Service`] (201) |
//! | POST | /v1/migrations/{service}/prepare | [`Prepare`] → [`Migration`] |
//! | POST | /v1/migrations/{service}/switch | [`Switch`] → [`Migration`] |
//! | POST | /v1/migrations/{service}/drain | [`Drain`] → [`Migration`] |
//! | GET | /v1/migrations/{service}/handover | → [`Handover`] |
//! | GET | /v1/status | → [`Status`] |
//! | GET | /metrics | → Prometheus text |
//!
//! Every route needs `Authorization: Bearer TOKEN`; an error is a non-2xx
//! status with an [`ErrorReply`].
//!
//! A VM may move any number of times. Its *home* is the site its own
//! address is routed to ([`Service::site`]); anywhere else it is reached at
//! that site's public address for it, translated to its own. The site it
//! runs at *serves* it ([`Role::New`]); every site it ran at before
//! *forwards* the address clients used there ([`Role::Old`]) straight to
//! the serving site, so a connection crosses one tunnel hop whatever the
//! number of moves.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

/// A VM the gateways know: its own (guest) address and its home site.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    pub name: String,
    /// The VM's own (guest) address.
    pub address: IpAddr,
    /// Its home: the site its address is routed to.
    pub site: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Prepare {
    /// The site the VM is about to move to.
    pub to: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Drain {
    /// Tear down at the latest this long from now (default: the gateway's
    /// `drain_deadline_s`).
    #[serde(default)]
    pub deadline_s: Option<u64>,
}

/// A site that forwards a VM's connections, and the address its clients
/// use there (the VM's own at its home, that site's public address
/// elsewhere).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Origin {
    pub site: String,
    pub address: IpAddr,
}

/// What a site does for a VM after a move.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "role", rename_all = "snake_case", deny_unknown_fields)]
pub enum Switch {
    /// The VM left this site (or, when this site already forwards it, moved
    /// on): forward its address here to `peer`, where it runs now. `lan`:
    /// its LAN here, where the gateway then answers ARP/NDP for its home
    /// address (hosts there still reach it).
    Old {
        peer: String,
        #[serde(default)]
        lan: Option<String>,
    },
    /// The VM arrived here from `peer`. `public`: its address here (none at
    /// its home site); `lan`: the interface it is reached through;
    /// `handover`: what the site it left knew (`GET …/handover` there),
    /// without which only the home site is taken to forward.
    New {
        peer: String,
        #[serde(default)]
        public: Option<IpAddr>,
        lan: String,
        #[serde(default)]
        handover: Option<Handover>,
    },
}

/// What the serving site knows, handed to the next one: the sites that
/// forward to it and which of them each connection came through, so that
/// replies leave the way their connection came in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Handover {
    /// The site that served the VM.
    pub site: String,
    /// Its address for the VM there.
    pub address: IpAddr,
    /// The sites forwarding to it.
    pub origins: Vec<Origin>,
    pub flows: Vec<HandedFlow>,
}

/// One connection, in the VM's terms (its own address), and the address
/// its client reached it at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandedFlow {
    pub origin: IpAddr,
    pub proto: u8,
    pub lo: SocketAddr,
    pub hi: SocketAddr,
    #[serde(default)]
    pub tcp: Option<FlowState>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FlowState {
    Opening,
    Established,
    HalfClosed,
}

/// What this site does for a VM (as applied and persisted).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "role")]
pub enum Role {
    /// The VM runs elsewhere: `address` (the VM's own when absent, this
    /// site's public address for it otherwise) is tunnelled to `peer`.
    Old {
        peer: String,
        #[serde(default)]
        lan: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        address: Option<IpAddr>,
    },
    /// The VM runs here: deliver what `origins` forward, send each
    /// connection's replies back the way it came, translate `public` ↔ the
    /// VM's address for the rest (none at its home site). `peer`: the site
    /// it came from.
    New {
        peer: String,
        #[serde(default)]
        public: Option<IpAddr>,
        lan: String,
        #[serde(default)]
        origins: Vec<Origin>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "phase")]
pub enum Phase {
    Prepared {
        to: String,
    },
    Switched,
    /// Old site: tear down once no flow is left or at the deadline.
    Draining {
        deadline_unix: u64,
    },
    Drained {
        at_unix: u64,
    },
}

impl Phase {
    /// As the status reports it (`prepared`, `switched`, `draining`, `drained`).
    pub fn name(&self) -> &'static str {
        match self {
            Phase::Prepared { .. } => "prepared",
            Phase::Switched => "switched",
            Phase::Draining { .. } => "draining",
            Phase::Drained { .. } => "drained",
        }
    }
}

/// A VM's migrations as this site takes part in them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Migration {
    pub service: String,
    pub address: IpAddr,
    pub role: Option<Role>,
    #[serde(flatten)]
    pub phase: Phase,
}

impl Migration {
    /// The VM runs here (switched in as the serving site).
    pub fn serves(&self) -> bool {
        matches!(self.role, Some(Role::New { .. }))
    }

    /// This site tunnels the VM's connections on (switched or draining as
    /// an old site).
    pub fn forwards(&self) -> bool {
        matches!(self.role, Some(Role::Old { .. }))
            && matches!(self.phase, Phase::Switched | Phase::Draining { .. })
    }
}

/// What the data plane carried for a migration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Traffic {
    pub flows: usize,
    pub live_flows: usize,
    pub packets: u64,
    pub bytes: u64,
    /// The serving site: connections to its own public address.
    pub translated_flows: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationStatus {
    #[serde(flatten)]
    pub migration: Migration,
    pub traffic: Option<Traffic>,
}

/// `GET /v1/status`. `D`: the data plane's counters (the gateway's own
/// type; clients that do not read them take the default).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status<D = serde_json::Value> {
    pub site: String,
    pub services: BTreeMap<String, Service>,
    pub migrations: Vec<MigrationStatus>,
    pub data_plane: Option<D>,
}

impl<D> Status<D> {
    pub fn migration(&self, service: &str) -> Option<&MigrationStatus> {
        self.migrations
            .iter()
            .find(|m| m.migration.service == service)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    pub error: String,
}

/// The actions on a migration (`/v1/migrations/{service}/{action}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Prepare,
    Switch,
    Drain,
    Handover,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Prepare => "prepare",
            Action::Switch => "switch",
            Action::Drain => "drain",
            Action::Handover => "handover",
        }
    }

    pub fn path(self, service: &str) -> String {
        format!("/v1/migrations/{service}/{}", self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn switch_requests_read_as_before_and_refuse_what_they_do_not_know() {
        let old: Switch =
            serde_json::from_str(r#"{"role":"old","peer":"siteB","lan":"br0"}"#).expect("old");
        assert_eq!(
            old,
            Switch::Old {
                peer: "siteB".into(),
                lan: Some("br0".into())
            }
        );
        let new: Switch = serde_json::from_str(
            r#"{"role":"new","peer":"siteA","public":"10.2.0.100","lan":"tap0"}"#,
        )
        .expect("new");
        assert!(matches!(
            new,
            Switch::New {
                public: Some(_),
                handover: None,
                ..
            }
        ));
        for bad in [
            r#"{"role":"sideways","peer":"siteB"}"#,
            r#"{"role":"new","peer":"siteA","public":"10.2.0.100"}"#,
            r#"{"role":"old","peer":"siteB","extra":1}"#,
            r#"{"peer":"siteB"}"#,
        ] {
            assert!(serde_json::from_str::<Switch>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_handover_round_trips() {
        let h = Handover {
            site: "siteB".into(),
            address: IpAddr::from([10, 2, 0, 100]),
            origins: vec![Origin {
                site: "siteA".into(),
                address: IpAddr::from([10, 1, 0, 10]),
            }],
            flows: vec![HandedFlow {
                origin: IpAddr::from([10, 1, 0, 10]),
                proto: 6,
                lo: "10.0.0.2:40000".parse().expect("addr"),
                hi: "10.1.0.10:7000".parse().expect("addr"),
                tcp: Some(FlowState::Established),
            }],
        };
        let s = Switch::New {
            peer: "siteB".into(),
            public: Some(IpAddr::from([10, 3, 0, 100])),
            lan: "tap0".into(),
            handover: Some(h),
        };
        let text = serde_json::to_string(&s).expect("json");
        assert_eq!(serde_json::from_str::<Switch>(&text).expect("back"), s);
    }

    #[test]
    fn state_files_of_single_hop_gateways_still_load() {
        let m: Migration = serde_json::from_str(
            r#"{"service":"web1","address":"10.1.0.10","role":{"role":"new","peer":"siteA","public":"10.2.0.100","lan":"tap0"},"phase":"switched"}"#,
        )
        .expect("migration");
        assert!(m.serves());
        assert!(matches!(m.role, Some(Role::New { ref origins, .. }) if origins.is_empty()));
        let m: Migration = serde_json::from_str(
            r#"{"service":"web1","address":"10.1.0.10","role":{"role":"old","peer":"siteB","lan":"br0"},"phase":"draining","deadline_unix":9}"#,
        )
        .expect("migration");
        assert!(m.forwards());
    }
}
