//! The control plane: services, migrations and their phases; applies them to
//! the routing tables and the data plane; persists them; drains.
//!
//! A VM's part here is one [`Role`]: it runs here (`new`: serve) or ran
//! here (`old`: forward the address clients used here to where it runs).
//! A switch changes the part whatever it was (a VM may come back, or move
//! on from here), routes first; asked again for the part it already has,
//! it changes nothing (a client retrying a lost answer succeeds).

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use gateway_api::{FlowState, HandedFlow, Handover, MigrationStatus, Origin, Switch, Traffic};
use tokio::sync::Mutex;

use crate::config::Config;
use crate::netlink::{Net, REVERSE_TABLE};
use crate::plane::Plane;
use crate::state::{Migration, Phase, Role, Service, State};
use crate::tables::Handed;

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

pub struct Control {
    pub config: Config,
    state: Mutex<State>,
    state_path: Option<PathBuf>,
    pub plane: Option<Arc<Plane>>,
    net: Option<Net>,
    /// What `flows.json` holds now (written again only when it changes).
    flows_written: std::sync::Mutex<Option<Vec<u8>>>,
    ticks: std::sync::atomic::AtomicU64,
}

/// Served VMs' connections are persisted every this many ticks (2 s).
const FLOWS_EVERY_TICKS: u64 = 8;

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
            flows_written: std::sync::Mutex::new(None),
            ticks: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn flows_path(&self) -> Option<PathBuf> {
        self.state_path
            .as_ref()
            .map(|p| p.with_file_name("flows.json"))
    }

    /// The connections of a VM served here, as the next site (or this
    /// gateway after a restart) takes them.
    fn served_flows(&self, guest: IpAddr) -> Vec<HandedFlow> {
        let Some(p) = &self.plane else {
            return Vec::new();
        };
        let flows = p.lock().handover(guest);
        flows
            .into_iter()
            .map(|h| HandedFlow {
                origin: h.origin,
                proto: h.key.proto,
                lo: h.key.lo.into(),
                hi: h.key.hi.into(),
                tcp: h.tcp.and_then(|t| match t {
                    tunnel::flow::TcpState::Opening => Some(FlowState::Opening),
                    tunnel::flow::TcpState::Established => Some(FlowState::Established),
                    tunnel::flow::TcpState::HalfClosed => Some(FlowState::HalfClosed),
                    tunnel::flow::TcpState::Closed => None,
                }),
            })
            .collect()
    }

    /// Writes `flows.json` when what the served VMs' connections are has
    /// changed since the last write.
    async fn persist_flows(&self, st: &State) -> anyhow::Result<()> {
        let Some(path) = self.flows_path() else {
            return Ok(());
        };
        let flows: crate::state::Flows = st
            .migrations
            .values()
            .filter(|m| m.serves())
            .map(|m| (m.service.clone(), self.served_flows(m.address)))
            .collect();
        let bytes = serde_json::to_vec(&flows)?;
        {
            let last = self.flows_written.lock().unwrap_or_else(|p| p.into_inner());
            if last.as_deref() == Some(bytes.as_slice()) {
                return Ok(());
            }
        }
        let b = bytes.clone();
        tokio::task::spawn_blocking(move || crate::state::write_atomic(&path, &b))
            .await
            .map_err(|e| anyhow::anyhow!("the flows writer failed: {e}"))??;
        *self.flows_written.lock().unwrap_or_else(|p| p.into_inner()) = Some(bytes);
        Ok(())
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
            if m.role.is_some() && matches!(m.phase, Phase::Switched | Phase::Draining { .. }) {
                if let (true, Some(Role::Old { lan: Some(lan), .. })) = (
                    to == self.config.site && svc.site == self.config.site,
                    &m.role,
                ) {
                    self.hold_at_home(m.address, lan).await?;
                }
                // it runs here or is forwarded from here: that goes on
                // until the next switch says otherwise
                return Ok(m.clone());
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

    /// The VM is coming home: from the moment it runs here until this site
    /// serves it, its packets go to the data plane (which drops them, a
    /// lost segment TCP sends again), not out as they are. Its replies to
    /// connections opened at other sites would leave with its own address,
    /// and their clients would reset them.
    async fn hold_at_home(&self, guest: IpAddr, lan: &str) -> Result<(), ControlError> {
        let (_, net) = self.parts()?;
        let dev = &self.config.tunnel.device;
        net.add_default_route(dev, REVERSE_TABLE, guest.is_ipv6())
            .await?;
        if guest.is_ipv4() {
            net.add_unnumbered(dev).await?;
        }
        net.add_rule_from(guest, lan, REVERSE_TABLE).await?;
        Ok(())
    }

    /// The address clients reach `m`'s VM at on this site: its public one
    /// here, or its own.
    fn address_here(m: &Migration) -> IpAddr {
        match &m.role {
            Some(Role::New {
                public: Some(p), ..
            }) => *p,
            Some(Role::Old {
                address: Some(a), ..
            }) => *a,
            _ => m.address,
        }
    }

    /// Installs a role's routes and data-plane entries. Routes first: a
    /// failure leaves no half-registered address in the data plane, and
    /// every step is idempotent, so a retry completes it.
    async fn apply(
        &self,
        m: &Migration,
        role: &Role,
        handed: &[Handed],
    ) -> Result<(), ControlError> {
        let (plane, net) = self.parts()?;
        let dev = self.config.tunnel.device.clone();
        let timeouts = self.config.tunnel.timeouts();
        let guest = m.address;
        let key = match role {
            Role::Old { peer, lan, address } => {
                let peer = self.peer_address(peer)?;
                let address = address.unwrap_or(guest);
                net.add_host_route(address, &dev, None).await?;
                if let (Some(lan), true) = (lan, address == guest) {
                    if address.is_ipv6() {
                        // proxy NDP answers only for entries, and only with this on
                        write_knob(&format!("/proc/sys/net/ipv6/conf/{lan}/proxy_ndp"))?;
                    }
                    net.add_proxy_neighbour(address, lan).await?;
                }
                let mut t = plane.lock();
                t.forward(address, peer, timeouts, plane.now_ms());
                address
            }
            Role::New {
                public,
                lan,
                origins,
                ..
            } => {
                let origins = origins
                    .iter()
                    .map(|o| Ok((self.peer_address(&o.site)?, o.address)))
                    .collect::<Result<Vec<_>, ControlError>>()?;
                if let Some(p) = public {
                    net.add_host_route(*p, &dev, None).await?;
                }
                net.add_default_route(&dev, REVERSE_TABLE, guest.is_ipv6())
                    .await?;
                net.add_rule_from(guest, lan, REVERSE_TABLE).await?;
                if guest.is_ipv4() && public.is_none() {
                    // at home its own packets come back out of the TUN
                    // device with its own address
                    net.add_unnumbered(&dev).await?;
                }
                if guest.is_ipv4() && public.is_some() {
                    // the VM still believes its old LAN is on-link: answer its
                    // ARP for those hosts too (its packets then follow the rule
                    // above into the tunnel, back to the old LAN). IPv6 has no
                    // such switch (proxy NDP answers for listed addresses
                    // only): an IPv6 guest reaches its old LAN's hosts through
                    // its router, as it does any other host.
                    write_knob(&format!("/proc/sys/net/ipv4/conf/{lan}/proxy_arp"))?;
                }
                let mut t = plane.lock();
                t.serve(guest, *public, &origins, handed, timeouts, plane.now_ms());
                guest
            }
        };
        let fast = plane.lock().fast_role(key);
        let result = plane.fast(|f| match fast {
            Some((peer, role)) => f.set_guest(key, peer, role).map(|_| ()),
            None => {
                // every packet of it through the plane (replies choose
                // their way per connection)
                f.remove_guest(key);
                Ok(())
            }
        });
        if let Some(Err(e)) = result {
            // the data plane still carries everything
            tracing::warn!(error = %e, address = %key, "the kernel fast path will not carry this guest");
        }
        Ok(())
    }

    /// Removes what [`Self::apply`] installed for `m`'s current role (a
    /// drained forward has nothing left).
    async fn unapply(&self, m: &Migration) -> Result<(), ControlError> {
        let (plane, net) = self.parts()?;
        let dev = &self.config.tunnel.device;
        let key = match (&m.role, &m.phase) {
            (Some(Role::Old { .. }), Phase::Switched | Phase::Draining { .. }) => {
                let address = Self::address_here(m);
                net.del_host_route(address, dev, None).await?;
                if let Some(Role::Old { lan: Some(lan), .. }) = &m.role {
                    if address == m.address {
                        net.del_proxy_neighbour(address, lan).await?;
                    }
                }
                address
            }
            (Some(Role::New { public, lan, .. }), _) => {
                net.del_rule_from(m.address, lan, REVERSE_TABLE).await?;
                if let Some(p) = public {
                    net.del_host_route(*p, dev, None).await?;
                }
                m.address
            }
            _ => return Ok(()),
        };
        plane.lock().remove(key);
        plane.fast(|f| f.remove_guest(key));
        Ok(())
    }

    /// The role a switch request asks of this site, checked against what
    /// this site knows.
    fn role_for(&self, svc: &Service, m: &Migration, req: &Switch) -> Result<Role, ControlError> {
        let lan_ok = |l: &str| !l.is_empty() && l.len() < 16;
        let service = &svc.name;
        match req {
            Switch::Old { peer, lan } => {
                if lan.as_deref().is_some_and(|l| !lan_ok(l)) {
                    return Err(ControlError::BadRequest(
                        "`lan` must be an interface name".into(),
                    ));
                }
                self.peer_address(peer)?;
                let address = match &m.role {
                    Some(Role::New { public, .. }) => *public,
                    Some(Role::Old { address, .. }) => *address,
                    None if svc.site == self.config.site => None,
                    None => {
                        return Err(ControlError::Conflict(format!(
                            "{service} never ran at {}: there is nothing to forward here",
                            self.config.site
                        )))
                    }
                };
                Ok(Role::Old {
                    peer: peer.clone(),
                    lan: lan.clone(),
                    address,
                })
            }
            Switch::New {
                peer,
                public,
                lan,
                handover,
            } => {
                if !lan_ok(lan) {
                    return Err(ControlError::BadRequest(
                        "`lan` must be an interface name".into(),
                    ));
                }
                let home = svc.site == self.config.site;
                let public = match public {
                    Some(p) if p.is_ipv4() != m.address.is_ipv4() => {
                        return Err(ControlError::BadRequest(format!(
                            "public address {p} and the service's address {} are of different families",
                            m.address
                        )))
                    }
                    Some(p) if home && *p != m.address => {
                        return Err(ControlError::BadRequest(format!(
                            "{} is {service}'s home: it is reached at its own address {} here, not at {p}",
                            self.config.site, m.address
                        )))
                    }
                    Some(p) if !home => Some(*p),
                    None if !home => {
                        return Err(ControlError::BadRequest(format!(
                            "role new needs `public` ({} is not {service}'s home)",
                            self.config.site
                        )))
                    }
                    _ => None,
                };
                let mut origins = match handover {
                    Some(h) => {
                        if h.site != *peer {
                            return Err(ControlError::BadRequest(format!(
                                "the handover is from {}, not from {peer}",
                                h.site
                            )));
                        }
                        let mut o = h.origins.clone();
                        o.push(Origin {
                            site: h.site.clone(),
                            address: h.address,
                        });
                        o
                    }
                    None if *peer == svc.site => vec![Origin {
                        site: peer.clone(),
                        address: m.address,
                    }],
                    None => {
                        return Err(ControlError::BadRequest(format!(
                            "{service} comes from {peer}, not from its home {}: pass the handover from {peer} (GET /v1/migrations/{service}/handover there)",
                            svc.site
                        )))
                    }
                };
                origins.retain(|o| o.site != self.config.site);
                origins.sort();
                origins.dedup();
                for o in &origins {
                    self.peer_address(&o.site)?;
                    if o.address.is_ipv4() != m.address.is_ipv4() {
                        return Err(ControlError::BadRequest(format!(
                            "origin {} has an address of another family ({})",
                            o.site, o.address
                        )));
                    }
                }
                Ok(Role::New {
                    peer: peer.clone(),
                    public,
                    lan: lan.clone(),
                    origins,
                })
            }
        }
    }

    pub async fn switch(&self, service: &str, req: Switch) -> Result<Migration, ControlError> {
        let mut st = self.state.lock().await;
        let m = st.migrations.get(service).cloned().ok_or_else(|| {
            ControlError::NotFound(format!("no migration of {service:?}: prepare it first"))
        })?;
        let svc = st
            .services
            .get(service)
            .cloned()
            .ok_or_else(|| ControlError::NotFound(format!("no service {service:?}")))?;
        let role = self.role_for(&svc, &m, &req)?;
        let phase = match (&role, &m.phase) {
            // a forward re-pointed keeps draining; a drained one is gone
            (Role::Old { .. }, p @ (Phase::Draining { .. } | Phase::Drained { .. }))
                if matches!(m.role, Some(Role::Old { .. })) =>
            {
                p.clone()
            }
            _ => Phase::Switched,
        };
        if m.role.as_ref() == Some(&role) && m.phase == phase {
            return Ok(m); // asked again
        }
        if matches!(phase, Phase::Drained { .. }) {
            return Ok(m); // nothing forwarded any more
        }
        let handed: Vec<Handed> = match &req {
            Switch::New {
                handover: Some(h), ..
            } => h.flows.iter().map(handed).collect(),
            _ => Vec::new(),
        };
        let same_kind = matches!((&m.role, &role), (Some(Role::Old { .. }), Role::Old { .. }));
        if !same_kind {
            self.unapply(&m).await?;
        }
        self.apply(&m, &role, &handed).await?;
        let m = Migration {
            role: Some(role),
            phase,
            ..m
        };
        st.migrations.insert(service.into(), m.clone());
        self.save(&st).await?;
        tracing::info!(%service, address = %m.address, role = ?m.role, "switched");
        Ok(m)
    }

    /// What this site knows of a VM that runs here, for the site it moves
    /// to next.
    pub async fn handover(&self, service: &str) -> Result<Handover, ControlError> {
        let st = self.state.lock().await;
        let m = st
            .migrations
            .get(service)
            .ok_or_else(|| ControlError::NotFound(format!("no migration of {service:?}")))?;
        let home = st
            .services
            .get(service)
            .is_some_and(|s| s.site == self.config.site);
        let origins = match &m.role {
            Some(Role::New { origins, .. }) => origins.clone(),
            // at home before its first move: nothing forwards to it
            None if home => Vec::new(),
            _ => {
                return Err(ControlError::Conflict(format!(
                    "{service} does not run at {}: ask the site it runs at",
                    self.config.site
                )))
            }
        };
        Ok(Handover {
            site: self.config.site.clone(),
            address: Self::address_here(m),
            origins,
            flows: self.served_flows(m.address),
        })
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
        match (&m.role, &m.phase) {
            (Some(Role::Old { .. }), Phase::Draining { .. } | Phase::Drained { .. }) => {
                return Ok(m.clone()); // asked again
            }
            (Some(Role::Old { .. }), Phase::Switched) => {}
            _ => {
                return Err(ControlError::Conflict(format!(
                    "{service}: only a switched migration at its old site drains"
                )))
            }
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
                traffic: self.plane.as_ref().and_then(|p| {
                    let key = match m.role {
                        Some(Role::New { .. }) => m.address,
                        _ => Self::address_here(m),
                    };
                    p.lock().stats(key).map(|s| Traffic {
                        flows: s.flows,
                        live_flows: s.live_flows,
                        packets: s.packets,
                        bytes: s.bytes,
                        translated_flows: s.translated_flows,
                    })
                }),
            })
            .collect();
        (st, migrations)
    }

    /// Re-installs switched and draining migrations (after a restart).
    pub async fn restore(&self) -> anyhow::Result<()> {
        let saved = self
            .flows_path()
            .map(|p| crate::state::load_flows(&p))
            .unwrap_or_default();
        let mut st = self.state.lock().await;
        let mut changed = false;
        for m in st.migrations.values_mut() {
            if let Some(Role::New { peer, origins, .. }) = &mut m.role {
                if origins.is_empty() {
                    // written by a gateway that knew one move only
                    origins.push(Origin {
                        site: peer.clone(),
                        address: m.address,
                    });
                    changed = true;
                }
            }
            if let (Some(role), Phase::Switched | Phase::Draining { .. }) = (&m.role, &m.phase) {
                // a VM served here: its connections and the sites they came in at
                let handed: Vec<Handed> = saved
                    .get(&m.service)
                    .filter(|_| m.serves())
                    .map(|f| f.iter().map(handed).collect())
                    .unwrap_or_default();
                self.apply(m, role, &handed)
                    .await
                    .map_err(|e| anyhow::anyhow!("cannot restore {}: {e}", m.service))?;
                tracing::info!(service = %m.service, "restored after restart");
            }
        }
        if changed {
            self.save(&st).await.map_err(|e| anyhow::anyhow!("{e}"))?;
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
        let n = self
            .ticks
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if n.is_multiple_of(FLOWS_EVERY_TICKS) {
            if let Err(e) = self.persist_flows(&st).await {
                tracing::warn!(error = %format!("{e:#}"), "cannot save the served connections; retrying");
            }
        }
        let mut done = Vec::new();
        {
            let mut t = plane.lock();
            // what the kernel carried keeps its flows live, as if it had
            // come through the data plane
            for c in &carried {
                t.carried(c, now_ms);
            }
            for k in t.expire(now_ms).iter().filter(|k| k.proto == 6) {
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
                if t.idle(Self::address_here(m), now_ms, quiet_ms) || unix_now() >= deadline_unix {
                    done.push(m.service.clone());
                }
            }
        }
        if done.is_empty() {
            return Ok(());
        }
        for s in &done {
            if let Some(m) = st.migrations.get(s).cloned() {
                self.unapply(&m).await.map_err(|e| anyhow::anyhow!("{e}"))?;
                if let Some(m) = st.migrations.get_mut(s) {
                    m.phase = Phase::Drained {
                        at_unix: unix_now(),
                    };
                }
                tracing::info!(service = %s, address = %Self::address_here(&m), "drained: route and tunnel removed");
            }
        }
        self.save(&st).await.map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(())
    }
}

/// A handed-over flow as the data plane keeps it.
fn handed(f: &HandedFlow) -> Handed {
    let (key, _) =
        tunnel::flow::FlowKey::between(f.proto, (f.lo.ip(), f.lo.port()), (f.hi.ip(), f.hi.port()));
    Handed {
        origin: f.origin,
        key,
        tcp: f.tcp.map(|t| match t {
            FlowState::Opening => tunnel::flow::TcpState::Opening,
            FlowState::Established => tunnel::flow::TcpState::Established,
            FlowState::HalfClosed => tunnel::flow::TcpState::HalfClosed,
        }),
    }
}
