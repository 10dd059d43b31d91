//! The control plane: services, migrations and their phases; applies them to
//! the routing tables and the data plane; persists them; drains.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use crate::netlink::{Net, REVERSE_TABLE};
use crate::plane::{Plane, Side, SideStats};
use crate::state::{Migration, Phase, Role, Service, State};
use crate::Config;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0:#}")]
    Internal(#[from] anyhow::Error),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwitchRequest {
    /// "old": the VM left this site; "new": the VM arrived here.
    pub role: String,
    /// The other site (a configured peer).
    pub peer: String,
    /// New site: the VM's public address here.
    #[serde(default)]
    pub public: Option<IpAddr>,
    /// New site: the interface the VM is reached through (required). Old
    /// site: its old LAN, where we then answer ARP for its address.
    #[serde(default)]
    pub lan: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct MigrationStatus {
    #[serde(flatten)]
    pub migration: Migration,
    pub traffic: Option<SideStats>,
}

pub struct Control {
    pub config: Config,
    state: Mutex<State>,
    state_path: Option<PathBuf>,
    pub plane: Option<Arc<Plane>>,
    net: Option<Net>,
}

/// Turns a `/proc/sys` switch on.
fn write_knob(path: &str) -> Result<(), ControlError> {
    std::fs::write(path, "1")
        .map_err(|e| ControlError::Internal(anyhow::anyhow!("cannot write {path}: {e}")))
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Control {
    pub fn new(
        config: Config,
        state: State,
        state_path: Option<PathBuf>,
        plane: Option<Arc<Plane>>,
        net: Option<Net>,
    ) -> Self {
        Self {
            config,
            state: Mutex::new(state),
            state_path,
            plane,
            net,
        }
    }

    async fn save(&self, state: &State) -> Result<(), ControlError> {
        if let Some(p) = &self.state_path {
            let (p, s) = (p.clone(), state.clone());
            tokio::task::spawn_blocking(move || s.save(&p))
                .await
                .map_err(|e| {
                    ControlError::Internal(anyhow::anyhow!("state writer failed: {e}"))
                })??;
        }
        Ok(())
    }

    fn peer_address(&self, site: &str) -> Result<std::net::IpAddr, ControlError> {
        self.config
            .peers
            .iter()
            .find(|p| p.site == site)
            .map(|p| p.address)
            .ok_or_else(|| {
                ControlError::BadRequest(format!(
                    "unknown peer site {site:?} (not in this gateway's [[peer]] list)"
                ))
            })
    }

    fn parts(&self) -> Result<(&Arc<Plane>, &Net), ControlError> {
        match (&self.plane, &self.net) {
            (Some(p), Some(n)) => Ok((p, n)),
            _ => Err(ControlError::Conflict(
                "this gateway has no tunnel (set `wan` and [tunnel] in its config)".into(),
            )),
        }
    }

    pub async fn register(&self, svc: Service) -> Result<Service, ControlError> {
        if svc.name.is_empty() || svc.name.len() > 253 {
            return Err(ControlError::BadRequest(
                "service name must be 1 to 253 characters".into(),
            ));
        }
        let mut st = self.state.lock().await;
        if st
            .migrations
            .get(&svc.name)
            .is_some_and(|m| !matches!(m.phase, Phase::Drained { .. } | Phase::Prepared { .. }))
        {
            return Err(ControlError::Conflict(format!(
                "service {} is being migrated",
                svc.name
            )));
        }
        st.services.insert(svc.name.clone(), svc.clone());
        self.save(&st).await?;
        Ok(svc)
    }

    pub async fn prepare(&self, service: &str, to: &str) -> Result<Migration, ControlError> {
        if to != self.config.site {
            self.peer_address(to)?;
        }
        let mut st = self.state.lock().await;
        let svc = st.services.get(service).cloned().ok_or_else(|| {
            ControlError::NotFound(format!("no service {service:?}: register it first"))
        })?;
        if let Some(m) = st.migrations.get(service) {
            if matches!(m.phase, Phase::Switched | Phase::Draining { .. }) {
                return Err(ControlError::Conflict(format!(
                    "service {service} is already switched"
                )));
            }
        }
        let m = Migration {
            service: service.into(),
            address: svc.address,
            role: None,
            phase: Phase::Prepared { to: to.into() },
        };
        st.migrations.insert(service.into(), m.clone());
        self.save(&st).await?;
        Ok(m)
    }

    /// Installs the routes and data-plane entries of a switched migration.
    /// Routes first: a failure leaves no half-registered address in the
    /// data plane, and every step is idempotent, so a retry completes it.
    async fn apply(&self, address: IpAddr, role: &Role) -> Result<(), ControlError> {
        let (plane, net) = self.parts()?;
        let dev = self.config.tunnel.device.clone();
        let timeouts = self.config.tunnel.timeouts();
        let side = match role {
            Role::Old { peer, lan } => {
                let peer = self.peer_address(peer)?;
                net.add_host_route(address, &dev, None).await?;
                if let Some(lan) = lan {
                    if address.is_ipv6() {
                        // proxy NDP answers only for entries, and only with this on
                        write_knob(&format!("/proc/sys/net/ipv6/conf/{lan}/proxy_ndp"))?;
                    }
                    net.add_proxy_neighbour(address, lan).await?;
                }
                Side::Old {
                    peer,
                    flows: tunnel::flow::FlowTable::new(timeouts),
                    last_ms: plane.now_ms(),
                }
            }
            Role::New { peer, public, lan } => {
                let peer_addr = self.peer_address(peer)?;
                net.add_host_route(*public, &dev, None).await?;
                net.add_default_route(&dev, REVERSE_TABLE, address.is_ipv6())
                    .await?;
                net.add_rule_from(address, lan, REVERSE_TABLE).await?;
                if address.is_ipv4() {
                    // the VM still believes its old LAN is on-link: answer its
                    // ARP for those hosts too (its packets then follow the rule
                    // above into the tunnel, back to the old LAN). IPv6 has no
                    // such switch (proxy NDP answers for listed addresses
                    // only): an IPv6 guest reaches its old LAN's hosts through
                    // its router, as it does any other host.
                    write_knob(&format!("/proc/sys/net/ipv4/conf/{lan}/proxy_arp"))?;
                }
                Side::New {
                    peer: peer_addr,
                    public: *public,
                    tunnelled: tunnel::flow::FlowTable::new(timeouts),
                    translated: tunnel::flow::FlowTable::new(timeouts),
                }
            }
        };
        let fast = match &side {
            Side::Old { peer, .. } => (*peer, tunnel::fastpath::Role::Old),
            Side::New { peer, .. } => (*peer, tunnel::fastpath::Role::New),
        };
        let mut t = plane.tables.lock().unwrap_or_else(|p| p.into_inner());
        t.sides.insert(address, side);
        if let Some(Err(e)) = plane.fast(|f| f.set_guest(address, fast.0, fast.1)) {
            // the data plane still carries everything
            tracing::warn!(error = %e, %address, "the kernel fast path will not carry this guest");
        }
        Ok(())
    }

    pub async fn switch(
        &self,
        service: &str,
        req: SwitchRequest,
    ) -> Result<Migration, ControlError> {
        let mut st = self.state.lock().await;
        let m = st.migrations.get(service).cloned().ok_or_else(|| {
            ControlError::NotFound(format!("no migration of {service:?}: prepare it first"))
        })?;
        if !matches!(m.phase, Phase::Prepared { .. }) {
            return Err(ControlError::Conflict(format!(
                "{service} is not in the prepared phase"
            )));
        }
        let lan_ok = |l: &String| !l.is_empty() && l.len() < 16;
        if req.lan.as_ref().is_some_and(|l| !lan_ok(l)) {
            return Err(ControlError::BadRequest(
                "`lan` must be an interface name".into(),
            ));
        }
        let role = match req.role.as_str() {
            "old" => Role::Old {
                peer: req.peer,
                lan: req.lan,
            },
            "new" => Role::New {
                peer: req.peer,
                public: match req.public {
                    None => return Err(ControlError::BadRequest("role new needs `public`".into())),
                    Some(p) if p.is_ipv4() != m.address.is_ipv4() => {
                        return Err(ControlError::BadRequest(format!(
                            "public address {p} and the service's address {} are of different families",
                            m.address
                        )))
                    }
                    Some(p) => p,
                },
                lan: req.lan.ok_or_else(|| {
                    ControlError::BadRequest("role new needs `lan` (an interface name)".into())
                })?,
            },
            r => {
                return Err(ControlError::BadRequest(format!(
                    "role must be old or new, not {r:?}"
                )))
            }
        };
        self.apply(m.address, &role).await?;
        let m = Migration {
            role: Some(role),
            phase: Phase::Switched,
            ..m
        };
        st.migrations.insert(service.into(), m.clone());
        self.save(&st).await?;
        tracing::info!(%service, address = %m.address, "switched");
        Ok(m)
    }

    pub async fn drain(
        &self,
        service: &str,
        deadline_s: Option<u64>,
    ) -> Result<Migration, ControlError> {
        let mut st = self.state.lock().await;
        let m = st
            .migrations
            .get_mut(service)
            .ok_or_else(|| ControlError::NotFound(format!("no migration of {service:?}")))?;
        if !matches!(m.role, Some(Role::Old { .. })) || m.phase != Phase::Switched {
            return Err(ControlError::Conflict(format!(
                "{service}: only a switched migration at its old site drains"
            )));
        }
        let deadline = unix_now() + deadline_s.unwrap_or(self.config.tunnel.drain_deadline_s);
        m.phase = Phase::Draining {
            deadline_unix: deadline,
        };
        let m = m.clone();
        self.save(&st).await?;
        Ok(m)
    }

    pub async fn status(&self) -> (State, Vec<MigrationStatus>) {
        let st = self.state.lock().await.clone();
        let migrations = st
            .migrations
            .values()
            .map(|m| MigrationStatus {
                migration: m.clone(),
                traffic: self
                    .plane
                    .as_ref()
                    .and_then(|p| p.tables.lock().ok().and_then(|t| t.stats(m.address))),
            })
            .collect();
        (st, migrations)
    }

    /// Re-installs switched and draining migrations (after a restart).
    pub async fn restore(&self) -> anyhow::Result<()> {
        let st = self.state.lock().await.clone();
        for m in st.migrations.values() {
            if let (Some(role), Phase::Switched | Phase::Draining { .. }) = (&m.role, &m.phase) {
                self.apply(m.address, role)
                    .await
                    .map_err(|e| anyhow::anyhow!("cannot restore {}: {e}", m.service))?;
                tracing::info!(service = %m.service, "restored after restart");
            }
        }
        Ok(())
    }

    /// Expires idle flows and completes drains. Called periodically.
    pub async fn tick(&self) -> anyhow::Result<()> {
        let Some(plane) = &self.plane else {
            return Ok(());
        };
        let now_ms = plane.now_ms();
        let quiet_ms = self.config.tunnel.drain_quiet_ms;
        let carried = plane.fast(|f| f.take_activity()).unwrap_or_default();
        let mut st = self.state.lock().await;
        let mut done = Vec::new();
        {
            let mut t = plane.tables.lock().unwrap_or_else(|p| p.into_inner());
            // what the kernel carried keeps its flows live, as if it had
            // come through the data plane
            for c in &carried {
                t.carried(c, now_ms);
            }
            let mut ended = Vec::new();
            for side in t.sides.values_mut() {
                match side {
                    Side::Old { flows, .. } => {
                        flows.expire(now_ms);
                    }
                    Side::New {
                        tunnelled,
                        translated,
                        ..
                    } => {
                        tunnelled.expire(now_ms);
                        ended.extend(translated.expire(now_ms).into_iter().map(|(k, _)| k));
                    }
                }
            }
            for k in ended.iter().filter(|k| k.proto == 6) {
                // the guest may send as either end
                plane.fast(|f| {
                    let _ = f.set_translated(k.lo, k.hi, false);
                    let _ = f.set_translated(k.hi, k.lo, false);
                });
            }
            for m in st.migrations.values() {
                let Phase::Draining { deadline_unix } = m.phase else {
                    continue;
                };
                let idle = match t.sides.get(&m.address) {
                    Some(Side::Old { flows, last_ms, .. }) => {
                        flows.live() == 0 && now_ms.saturating_sub(*last_ms) >= quiet_ms
                    }
                    _ => true,
                };
                if idle || unix_now() >= deadline_unix {
                    done.push(m.service.clone());
                }
            }
            for s in &done {
                if let Some(m) = st.migrations.get(s) {
                    t.sides.remove(&m.address);
                    plane.fast(|f| f.remove_guest(m.address));
                }
            }
        }
        if done.is_empty() {
            return Ok(());
        }
        for s in &done {
            if let Some(m) = st.migrations.get_mut(s) {
                if let Some(net) = &self.net {
                    net.del_host_route(m.address, &self.config.tunnel.device, None)
                        .await?;
                    if let Some(Role::Old { lan: Some(lan), .. }) = &m.role {
                        net.del_proxy_neighbour(m.address, lan).await?;
                    }
                }
                m.phase = Phase::Drained {
                    at_unix: unix_now(),
                };
                tracing::info!(service = %s, address = %m.address, "drained: route and tunnel removed");
            }
        }
        self.save(&st).await.map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(())
    }
}
