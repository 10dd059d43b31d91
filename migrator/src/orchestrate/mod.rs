//! `migrator migrate`: one command that moves a VM to another site with its
//! disk, its open connections and its DNS name, from wherever it runs now.
//!
//! ```text
//!  locate    with nodes: ask each site's node where the VM runs (already
//!            at the destination, but no gateway serves it there: only the
//!            network switch is left, from the site that serves it)
//!  prepare   both gateways answer (token checked), register + prepare the
//!            service; DNS: lower the name's TTL
//!  move      the source site's node sends the VM to the destination's (or:
//!            the disk server migrates disk + memory to the destination
//!            agent, `control::request`); the receiver checks its room
//!  ── commit point (inside `move`) ─────────────────────────────────────────
//!  network   the new site serves the VM with what the old one hands over,
//!            the old site forwards to it, every other site still
//!            forwarding is re-pointed to it (one tunnel hop, never
//!            chained); DNS points the name at the VM's address there
//!            (each retried; a failure is reported, never ignored)
//!  drain     the old site drains (flows end or the deadline passes); TTL back
//! ```
//! A failure before the commit point leaves the VM where it was, its routes
//! as they were, and the name's TTL restored.

pub mod gateway;
pub mod report;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tracing::warn;

use crate::args::{Keys, MigrateArgs};
use crate::events::{Event, Phase, Summary};
use gateway::{Endpoint, Gateway};
use gateway_api::{Drain, Service, Switch};

/// `migrator.toml`: the sites, their gateways and nodes (or agents), and
/// the VMs.
///
/// ```toml
/// identity = "/etc/migrator/key"        # this host's key (`migrator keygen`)
///
/// [dns]                                 # optional
/// server = "10.0.0.1:53"                # default: the source site's `dns`
/// key = "hmac-sha256:mig-key:BASE64"    # or key_file = "mig-key.conf" (BIND format)
/// ttl = 5                               # the name's TTL while it moves
///
/// [site.siteA]
/// gateway = "10.0.0.1:7300"             # its API: host:port or unix:/path
/// token_file = "/etc/migrator/siteA.token"   # or token = "..."
/// lan = "br0"                           # the VMs' LAN (proxy ARP once they left)
/// dns = "10.0.0.1:53"                   # its gateway's embedded DNS
///
/// node = "/run/migrator/node.sock"     # its node's control socket (the
///                                       # nodes name their peers after sites)
///
/// [site.siteB]
/// gateway = "10.0.0.2:7300"
/// token_file = "/etc/migrator/siteB.token"
/// node = "/run/migrator/siteB.sock"     # e.g. forwarded: ssh -L /run/migrator/siteB.sock:/run/migrator/node.sock siteB
///
/// [vm.web1]
/// site = "siteA"                        # its home: where its address is routed
/// address = "10.1.0.10"                 # its own address
/// name = "web1.example.test."           # its DNS name
/// public = { siteB = "10.2.0.100" }     # its public address at each other site
/// lan = { siteB = "tap-web1" }          # its link at each other site
/// ```
///
/// Without nodes, a site names the `migrator receive` agent that takes a
/// VM there (`agent`, `agent_fingerprint`) and a VM its disk server's
/// control socket and QMP socket at home (`control`, `qmp`): such a VM
/// moves once, from its home.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub identity: PathBuf,
    #[serde(default)]
    pub dns: DnsConfig,
    #[serde(default)]
    pub site: BTreeMap<String, SiteConfig>,
    #[serde(default)]
    pub vm: BTreeMap<String, VmConfig>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsConfig {
    pub server: Option<SocketAddr>,
    pub key: Option<String>,
    pub key_file: Option<PathBuf>,
    pub ttl: Option<u32>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteConfig {
    pub gateway: String,
    pub token: Option<String>,
    pub token_file: Option<PathBuf>,
    pub lan: Option<String>,
    pub agent: Option<String>,
    pub agent_fingerprint: Option<String>,
    pub dns: Option<SocketAddr>,
    /// The site's node's control socket.
    pub node: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Its home: the site its address is routed to.
    pub site: String,
    /// Without nodes: its disk server's control socket, its QMP socket.
    #[serde(default)]
    pub control: Option<PathBuf>,
    #[serde(default)]
    pub qmp: Option<PathBuf>,
    /// The guest's address (IPv4 or IPv6).
    pub address: IpAddr,
    pub name: Option<String>,
    /// Its public address at each site it may move to (same family).
    #[serde(default)]
    pub public: BTreeMap<String, IpAddr>,
    #[serde(default)]
    pub lan: BTreeMap<String, String>,
}

impl Config {
    pub fn vm(&self, service: &str) -> Result<&VmConfig> {
        self.vm
            .get(service)
            .with_context(|| format!("no [vm.{service}] in the config"))
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| {
            format!(
                "cannot read {} (write one: see `migrator migrate --help`)",
                path.display()
            )
        })?;
        let mut c: Config = toml::from_str(&text)
            .with_context(|| format!("{} is not a valid migrator.toml", path.display()))?;
        // relative paths are relative to the file
        let base = path.parent().unwrap_or(Path::new("."));
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut c.identity);
        if let Some(k) = &mut c.dns.key_file {
            fix(k);
        }
        for s in c.site.values_mut() {
            if let Some(t) = &mut s.token_file {
                fix(t);
            }
            if let Some(n) = &mut s.node {
                fix(n);
            }
        }
        Ok(c)
    }
}

/// What `migrator migrate SERVICE --to SITE` does, resolved from the config
/// (and, with nodes, from where the VM runs now).
#[derive(Debug, Clone)]
pub struct Plan {
    pub service: String,
    pub from: String,
    pub to: String,
    /// The VM's home (its address is routed there).
    pub home: String,
    pub address: IpAddr,
    /// Its address at `to`; none when `to` is its home.
    pub public: Option<IpAddr>,
    /// `from`'s LAN when that is its home (the gateway answers ARP there).
    pub old_lan: Option<String>,
    pub new_lan: String,
    pub gw_from: Gateway,
    pub gw_to: Gateway,
    /// Every other site's gateway: those forwarding the VM are re-pointed.
    pub gw_others: Vec<Gateway>,
    pub dns: Option<DnsPlan>,
    pub mover: Mover,
    /// How long the old site may keep tunnelling.
    pub drain_deadline: Duration,
    /// How long to wait here for the drain (zero: do not wait).
    pub drain_wait: Duration,
}

/// Who moves the VM.
#[derive(Debug, Clone)]
pub enum Mover {
    /// The source site's node sends it to the destination site's node.
    Node {
        socket: PathBuf,
        tuning: crate::args::Tuning,
    },
    /// The disk server at its home migrates it to the destination's agent
    /// (`args`: as the disk server's control socket takes them).
    Agent { control: PathBuf, args: MigrateArgs },
    /// Nothing: the nodes say it runs at the destination already, but the
    /// network did not follow (a `migrate` that stopped after the move, or
    /// a `migrator node migrate`): only the network switch is left.
    Moved,
}

#[derive(Debug, Clone)]
pub struct DnsPlan {
    pub server: SocketAddr,
    pub key: dyndns::TsigKey,
    pub name: String,
    pub ttl: u32,
}

fn token(site: &str, s: &SiteConfig) -> Result<String> {
    match (&s.token, &s.token_file) {
        (Some(t), _) => Ok(t.trim().to_string()),
        (None, Some(f)) => Ok(std::fs::read_to_string(f)
            .with_context(|| format!("cannot read site {site}'s token_file {}", f.display()))?
            .trim()
            .to_string()),
        (None, None) => bail!("site {site} has no token or token_file for its gateway"),
    }
}

/// Where `service` runs, as the sites' nodes say: the one that holds it
/// `complete`. An error names what each node said when none or several do.
pub async fn locate(cfg: &Config, service: &str) -> Result<String> {
    let mut here = Vec::new();
    let mut said = Vec::new();
    for (site, s) in &cfg.site {
        let Some(sock) = &s.node else { continue };
        match crate::node::api::status(sock).await {
            Ok(st) => match st.vms.iter().find(|v| v.name == service) {
                Some(v) => {
                    if v.state == crate::agent::DiskState::Complete {
                        here.push(site.clone());
                    }
                    said.push(format!("{site}: {}", v.state));
                }
                None => said.push(format!("{site}: not there")),
            },
            Err(e) => said.push(format!("{site}: {e}")),
        }
    }
    match here.as_slice() {
        [one] => Ok(one.clone()),
        [] => bail!(
            "no node runs {service} ({}); a move in doubt resolves when its nodes reconnect (`migrator status --node SOCKET` shows it)",
            said.join("; ")
        ),
        _ => bail!("{service} runs at several sites ({}): stop and ask an operator", said.join("; ")),
    }
}

/// The site whose gateway serves `service` (switched in as its new site),
/// if any does.
async fn served_at(cfg: &Config, service: &str) -> Result<Option<String>> {
    for (site, s) in &cfg.site {
        let g = Gateway::new(site, Endpoint::parse(&s.gateway), token(site, s)?);
        if g.part(service).await?.is_some_and(|p| p.migration.serves()) {
            return Ok(Some(site.clone()));
        }
    }
    Ok(None)
}

impl Plan {
    /// Resolves `service` → `to`: where it runs now (with nodes, asked;
    /// without, its home), then [`Plan::build`].
    pub async fn resolve(
        cfg: &Config,
        service: &str,
        to: &str,
        base: &MigrateArgs,
    ) -> Result<Self> {
        let nodes = cfg.site.values().any(|s| s.node.is_some());
        let from = if nodes {
            locate(cfg, service).await?
        } else {
            cfg.vm(service)?.site.clone()
        };
        if from != to {
            return Self::build(cfg, service, &from, to, base);
        }
        // it runs there: does the network agree?
        let serving = served_at(cfg, service).await?;
        let home = &cfg.vm(service)?.site;
        let previous = match serving.as_deref() {
            Some(s) if s == to => bail!("{service} already runs at {to}"),
            Some(s) => s.to_string(),
            None if home == to => bail!("{service} already runs at {to}"),
            None => home.clone(),
        };
        let mut plan = Self::build(cfg, service, &previous, to, base)?;
        plan.mover = Mover::Moved;
        Ok(plan)
    }

    /// The plan of moving `service` from `from` to `to`; `base` carries the
    /// migration knobs from the command line.
    pub fn build(
        cfg: &Config,
        service: &str,
        from: &str,
        to: &str,
        base: &MigrateArgs,
    ) -> Result<Self> {
        let vm = cfg.vm(service)?;
        if from == to {
            bail!("{service} already runs at {to}");
        }
        let site = |n: &str| {
            cfg.site
                .get(n)
                .with_context(|| format!("no [site.{n}] in the config"))
        };
        let (from_cfg, to_cfg, home_cfg) = (site(from)?, site(to)?, site(&vm.site)?);
        let mover = match (&from_cfg.node, &to_cfg.node) {
            (Some(socket), Some(_)) => Mover::Node {
                socket: socket.clone(),
                tuning: base.tuning.clone(),
            },
            (Some(_), None) | (None, Some(_)) => bail!(
                "{from} and {to} must both have a node (`node = \"…\"` in [site.{from}] and [site.{to}]), or neither"
            ),
            (None, None) => {
                if from != vm.site {
                    bail!("without nodes {service} moves only from its home {}", vm.site);
                }
                let agent = to_cfg.agent.clone().with_context(|| {
                    format!("site {to} has no node and no agent (the `migrator receive` address)")
                })?;
                let fp = to_cfg.agent_fingerprint.clone().with_context(|| {
                    format!("site {to} has no agent_fingerprint (its `migrator keygen` output)")
                })?;
                let control = vm.control.clone().with_context(|| {
                    format!("[vm.{service}] needs `control` (its disk server's control socket) without nodes")
                })?;
                let mut args = base.clone();
                args.control = Some(control.clone());
                args.image = None;
                args.qmp = Some(vm.qmp.clone().with_context(|| {
                    format!("[vm.{service}] needs `qmp` (its QEMU's QMP socket) without nodes")
                })?);
                args.to = agent;
                args.keys = Keys {
                    identity: cfg.identity.clone(),
                    peers: vec![fp],
                };
                args.json = false;
                Mover::Agent { control, args }
            }
        };
        let at_home = to == vm.site;
        let public = if at_home {
            None
        } else {
            let p = *vm.public.get(to).with_context(|| {
                format!(
                    "[vm.{service}] has no public address for {to} (public = {{ {to} = \"…\" }})"
                )
            })?;
            if p.is_ipv4() != vm.address.is_ipv4() {
                bail!(
                    "[vm.{service}]: its public address at {to} ({p}) and its address ({}) are of different families",
                    vm.address
                );
            }
            Some(p)
        };
        let new_lan = match (at_home, vm.lan.get(to), &to_cfg.lan) {
            (false, Some(l), _) | (true, Some(l), _) | (true, None, Some(l)) => l.clone(),
            _ => bail!("[vm.{service}] has no link at {to} (lan = {{ {to} = \"…\" }})"),
        };
        let dns = match &vm.name {
            None => None,
            Some(name) => {
                let server = cfg.dns.server.or(home_cfg.dns).with_context(|| {
                    format!("{service} has a DNS name but no DNS server is configured ([dns] server, or its home site's dns)")
                })?;
                let key = match (&cfg.dns.key, &cfg.dns.key_file) {
                    (Some(k), _) => dyndns::TsigKey::parse_spec(k)?,
                    (None, Some(f)) => dyndns::TsigKey::from_bind_file(f)?,
                    (None, None) => bail!("[dns] needs key or key_file to sign its updates"),
                };
                Some(DnsPlan {
                    server,
                    key,
                    name: name.clone(),
                    ttl: cfg.dns.ttl.unwrap_or(5),
                })
            }
        };
        let gateway = |name: &str, s: &SiteConfig| -> Result<Gateway> {
            Ok(Gateway::new(
                name,
                Endpoint::parse(&s.gateway),
                token(name, s)?,
            ))
        };
        let gw_others = cfg
            .site
            .iter()
            .filter(|(n, _)| n.as_str() != from && n.as_str() != to)
            .map(|(n, s)| gateway(n, s))
            .collect::<Result<Vec<_>>>()?;
        Ok(Plan {
            service: service.to_string(),
            from: from.to_string(),
            to: to.to_string(),
            home: vm.site.clone(),
            address: vm.address,
            public,
            old_lan: home_cfg.lan.clone(),
            new_lan,
            gw_from: gateway(from, from_cfg)?,
            gw_to: gateway(to, to_cfg)?,
            gw_others,
            dns,
            mover,
            drain_deadline: Duration::from_secs(3600),
            drain_wait: Duration::from_secs(600),
        })
    }

    /// The VM's address at `to`, the one DNS points at after the move.
    pub fn address_at_destination(&self) -> IpAddr {
        self.public.unwrap_or(self.address)
    }

    /// The switch that makes `site` forward to the destination (the VM's
    /// home LAN answers ARP for it there).
    fn forward(&self, site: &str) -> Switch {
        Switch::Old {
            peer: self.to.clone(),
            lan: self.old_lan.clone().filter(|_| site == self.home),
        }
    }
}

/// What happened, for the summary and the SVG.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Report {
    pub service: String,
    pub from: String,
    pub to: String,
    pub total_s: f64,
    /// The VM migration's own summary (disk, memory, pause).
    pub migration: Option<Summary>,
    pub dns: Option<String>,
    /// Commit → both gateways and DNS switched.
    pub network_switch_ms: Option<f64>,
    /// Flows the old site tunnelled, and their bytes.
    pub tunnelled_flows: Option<u64>,
    pub tunnelled_bytes: Option<u64>,
    /// Switch → the old site reported drained.
    pub drained_after_s: Option<f64>,
    /// Seconds since the start at which each phase began.
    pub phases: Vec<(f64, String)>,
    /// (seconds, link bytes so far: disk + memory frames, dirty bytes)
    pub samples: Vec<(f64, u64, u64)>,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "moved {} from {} to {} in {:.2} s",
            self.service, self.from, self.to, self.total_s
        )?;
        if let Some(m) = &self.migration {
            writeln!(f, "{m}")?;
        }
        if let Some(ms) = self.network_switch_ms {
            writeln!(
                f,
                "  network switch    {ms:.1} ms after the commit (gateways, DNS)"
            )?;
        }
        if let Some(d) = &self.dns {
            writeln!(f, "  DNS               {d}")?;
        }
        match (self.tunnelled_flows, self.tunnelled_bytes) {
            (Some(n), Some(b)) => writeln!(
                f,
                "  tunnelled         {n} flows, {b} bytes through the old site"
            )?,
            (Some(n), None) => writeln!(f, "  tunnelled         {n} flows through the old site")?,
            _ => {}
        }
        match self.drained_after_s {
            Some(s) => write!(f, "  drained           {s:.1} s after the switch"),
            None => write!(
                f,
                "  drained           not yet (the old site tunnels until its flows end)"
            ),
        }
    }
}

/// Retries `f` a few times; the last error if all fail.
async fn retry<T, F, Fut>(what: &str, events: &mpsc::UnboundedSender<Event>, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let mut delay = Duration::from_millis(200);
    for attempt in 1.. {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if attempt < 6 => {
                let _ = events.send(Event::Note {
                    message: format!("{what} failed (attempt {attempt}): {e:#}; retrying"),
                });
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(e) => return Err(e.context(format!("{what} failed after {attempt} attempts"))),
        }
    }
    unreachable!("the loop returns")
}

fn dns_client(d: &DnsPlan) -> Result<dyndns::client::Client> {
    Ok(dyndns::client::Client::new(d.server, Some(&d.key))?.with_timeout(Duration::from_secs(3)))
}

/// Runs the plan; progress on `events`.
pub async fn run(plan: Plan, events: mpsc::UnboundedSender<Event>) -> Result<Report> {
    let t0 = Instant::now();
    let mut report = Report {
        service: plan.service.clone(),
        from: plan.from.clone(),
        to: plan.to.clone(),
        ..Report::default()
    };
    let phase = |report: &mut Report, p: Phase| {
        report
            .phases
            .push((t0.elapsed().as_secs_f64(), p.to_string()));
        let _ = events.send(Event::Phase { phase: p });
    };

    // ---- prepare: everyone answers and agrees, nothing moves yet ----
    phase(&mut report, Phase::Prepare);
    let (sa, sb) = tokio::join!(plan.gw_from.status(), plan.gw_to.status());
    sa?;
    sb?;
    let svc = Service {
        name: plan.service.clone(),
        address: plan.address,
        site: plan.home.clone(),
    };
    for g in [&plan.gw_from, &plan.gw_to] {
        match g.register(&svc).await {
            Ok(_) => {}
            // registered before (an earlier move): prepare decides
            Err(gateway::GatewayError::Refused { status: 409, .. }) => {}
            Err(e) => return Err(e.into()),
        }
        g.prepare(&plan.service, &plan.to).await?;
    }
    let dns = match &plan.dns {
        None => None,
        Some(d) => {
            let c = dns_client(d)?;
            let name = dyndns::ops::parse_name(&d.name)?;
            let zone = dyndns::ops::find_zone(&c, &name).await?;
            let p = dyndns::ops::prepare(&c, &zone, &name, d.ttl).await?;
            let _ = events.send(Event::Note {
                message: format!(
                    "DNS: {} {:?}, TTL {} → {} until the move is done",
                    p.name, p.addrs, p.original_ttl, p.lowered_ttl
                ),
            });
            Some((c, zone, name, p))
        }
    };

    // ---- the VM moves (disk, memory, one switchover) ----
    let (tx, mut rx) = mpsc::unbounded_channel();
    let forward = {
        let events = events.clone();
        tokio::spawn(async move {
            let mut samples = Vec::new();
            let mut phases = Vec::new();
            let (mut disk, mut mem) = (0u64, 0u64);
            while let Some(e) = rx.recv().await {
                let t = t0.elapsed().as_secs_f64();
                match &e {
                    Event::Progress {
                        wire_bytes,
                        dirty_blocks,
                        block_size,
                        ..
                    } => {
                        disk = *wire_bytes;
                        samples.push((t, disk + mem, dirty_blocks * *block_size as u64));
                    }
                    Event::Memory {
                        wire_bytes,
                        dirty_pages_rate,
                        ..
                    } => {
                        mem = *wire_bytes;
                        samples.push((t, disk + mem, dirty_pages_rate * 4096));
                    }
                    Event::Phase { phase } => phases.push((t, phase.to_string())),
                    _ => {}
                }
                let _ = events.send(e);
            }
            (samples, phases)
        })
    };
    let moved = match &plan.mover {
        Mover::Moved => {
            let _ = events.send(Event::Note {
                message: format!(
                    "{} already runs at {} (its nodes say so) but the network stayed with {}: switching it now",
                    plan.service, plan.to, plan.from
                ),
            });
            drop(tx);
            Ok(None)
        }
        Mover::Node { socket, tuning } => {
            crate::node::api::migrate(socket, &plan.service, &plan.to, tuning.clone(), tx)
                .await
                .map(Some)
                .map_err(|e| {
                    anyhow::Error::new(e).context(format!(
                        "node {} failed to send {}",
                        plan.from, plan.service
                    ))
                })
        }
        Mover::Agent { control, args } => {
            crate::control::request(control, args, tx).await.map(Some)
        }
    };
    let (samples, phases) = forward.await.unwrap_or_default();
    report.samples = samples;
    report.phases.extend(phases);
    let summary = match moved {
        Ok(s) => s,
        Err(e) => {
            // before the commit point: the VM runs at the source; undo the TTL
            let mut dns_state = "its DNS answer unchanged".to_string();
            if let Some((c, zone, name, p)) = &dns {
                if let Err(de) = dyndns::ops::finish(c, zone, name, p.original_ttl).await {
                    warn!("cannot restore the TTL of {name}: {de}");
                    let server = plan
                        .dns
                        .as_ref()
                        .map(|d| d.server.to_string())
                        .unwrap_or_default();
                    dns_state = format!(
                        "its DNS address unchanged but its TTL still {} (restore it: `dyndns finish {name} --ttl {} --server {server}` with the key in $DYNDNS_KEY)",
                        p.lowered_ttl, p.original_ttl
                    );
                }
            }
            return Err(e.context(format!(
                "{} did not move: it runs at {} as before, {dns_state}",
                plan.service, plan.from
            )));
        }
    };
    let t_commit = Instant::now();
    report.migration = summary;

    // ---- network: the new site serves, every old one forwards to it ----
    phase(&mut report, Phase::Network);
    let handover = retry(
        &format!("asking {} for its connections", plan.from),
        &events,
        || async {
            plan.gw_from
                .handover(&plan.service)
                .await
                .map_err(Into::into)
        },
    )
    .await?;
    let serve = Switch::New {
        peer: plan.from.clone(),
        public: plan.public,
        lan: plan.new_lan.clone(),
        handover: Some(handover),
    };
    retry(
        &format!("switching gateway {}", plan.to),
        &events,
        || async {
            plan.gw_to
                .switch(&plan.service, &serve)
                .await
                .map_err(Into::into)
        },
    )
    .await?;
    retry(
        &format!("switching gateway {}", plan.from),
        &events,
        || async {
            plan.gw_from
                .switch(&plan.service, &plan.forward(&plan.from))
                .await
                .map_err(Into::into)
        },
    )
    .await?;
    for g in &plan.gw_others {
        // a site that forwards the VM from an earlier move forwards to
        // where it runs now, not to where it ran
        let forwards = match g.part(&plan.service).await {
            Ok(p) => p.is_some_and(|p| p.migration.forwards()),
            Err(e) => {
                let _ = events.send(Event::Note {
                    message: format!(
                        "cannot ask gateway {} whether it forwards {}: {e}; once it answers, re-point it: POST /v1/migrations/{}/switch {{\"role\":\"old\",\"peer\":\"{}\"}} on its API",
                        g.site, plan.service, plan.service, plan.to
                    ),
                });
                false
            }
        };
        if forwards {
            retry(
                &format!("re-pointing gateway {}", g.site),
                &events,
                || async {
                    g.switch(&plan.service, &plan.forward(&g.site))
                        .await
                        .map_err(Into::into)
                },
            )
            .await?;
        }
    }
    let t_switch = Instant::now();
    if let (Some((c, zone, name, p)), Some(d)) = (&dns, &plan.dns) {
        let to = [plan.address_at_destination()];
        let sw = retry(
            &format!("pointing {name} to {}", to[0]),
            &events,
            || async {
                match dyndns::ops::switch(c, zone, name, &p.addrs, &to, d.ttl).await {
                    Ok(s) => Ok(s),
                    // an earlier attempt did it
                    Err(dyndns::ops::OpsError::Lost { current, .. }) if current == to => {
                        Ok(dyndns::ops::Switched {
                            name: name.to_string(),
                            from: p.addrs.clone(),
                            to: to.to_vec(),
                            ttl: d.ttl,
                        })
                    }
                    Err(e) => Err(e.into()),
                }
            },
        )
        .await?;
        report.dns = Some(format!("{} {:?} → {:?}", sw.name, sw.from, sw.to));
    }
    report.network_switch_ms = Some(t_commit.elapsed().as_secs_f64() * 1e3);

    // what the old site tunnels right after the switch
    let traffic = |g: &Gateway| {
        let service = plan.service.clone();
        let g = g.clone();
        async move {
            g.part(&service)
                .await
                .ok()
                .flatten()
                .and_then(|p| p.traffic)
        }
    };
    let mut last_traffic = traffic(&plan.gw_from).await;
    let mut max_flows = last_traffic.as_ref().map_or(0, |t| t.flows as u64);

    // ---- drain: old flows finish through the tunnel ----
    phase(&mut report, Phase::Drain);
    retry(&format!("draining at {}", plan.from), &events, || async {
        plan.gw_from
            .drain(
                &plan.service,
                &Drain {
                    deadline_s: Some(plan.drain_deadline.as_secs()),
                },
            )
            .await
            .map_err(Into::into)
    })
    .await?;
    let wait_until = Instant::now() + plan.drain_wait;
    loop {
        if let Some(t) = traffic(&plan.gw_from).await {
            max_flows = max_flows.max(t.flows as u64);
            last_traffic = Some(t);
        }
        let drained = plan
            .gw_from
            .part(&plan.service)
            .await
            .ok()
            .flatten()
            .is_some_and(|p| matches!(p.migration.phase, gateway_api::Phase::Drained { .. }));
        if drained {
            report.drained_after_s = Some(t_switch.elapsed().as_secs_f64());
            break;
        }
        if Instant::now() >= wait_until {
            let _ = events.send(Event::Note {
                message: format!(
                    "{} tunnels the old connections until they end (at most {} s), then reports drained in its /v1/status",
                    plan.from,
                    plan.drain_deadline.as_secs()
                ),
            });
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    report.tunnelled_flows =
        (max_flows > 0 || report.drained_after_s.is_some()).then_some(max_flows);
    report.tunnelled_bytes = last_traffic
        .map(|t| t.bytes)
        .filter(|_| report.tunnelled_flows.is_some());
    if let (Some((c, zone, name, p)), true) = (&dns, report.drained_after_s.is_some()) {
        // the old answer has expired everywhere: the TTL goes back
        match dyndns::ops::finish(c, zone, name, p.original_ttl).await {
            Ok(_) => {
                let _ = events.send(Event::Note {
                    message: format!("DNS: {name} TTL back to {}", p.original_ttl),
                });
            }
            Err(e) => {
                let _ = events.send(Event::Note {
                    message: format!("DNS: cannot restore {name}'s TTL {}: {e}", p.original_ttl),
                });
            }
        }
    }
    phase(&mut report, Phase::Done);
    report.total_s = t0.elapsed().as_secs_f64();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"
identity = "keys"
[dns]
key = "hmac-sha256:mig-key:c2VjcmV0LWtleS1mb3ItdGhlLXRlc3QtYmVkLTAxMjM0NTY3"
[site.siteA]
gateway = "10.0.0.1:7300"
token = "tok-a-0123456789abcdef"
lan = "br0"
dns = "10.0.0.1:53"
node = "a.sock"
[site.siteB]
gateway = "10.0.0.2:7300"
token = "tok-b-0123456789abcdef"
node = "b.sock"
[site.siteC]
gateway = "unix:/run/c.sock"
token = "tok-c-0123456789abcdef"
node = "c.sock"
[vm.web1]
site = "siteA"
address = "10.1.0.10"
name = "web1.example.test."
public = { siteB = "10.2.0.100", siteC = "10.3.0.100" }
lan = { siteB = "tapb", siteC = "tapc" }
"#;

    fn config() -> Config {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("migrator.toml");
        std::fs::write(&p, CONFIG).expect("write");
        Config::load(&p).expect("config")
    }

    fn base() -> MigrateArgs {
        MigrateArgs {
            control: None,
            image: None,
            to: String::new(),
            keys: Keys {
                identity: "keys".into(),
                peers: Vec::new(),
            },
            qmp: None,
            tuning: crate::args::Tuning::default(),
            json: false,
        }
    }

    #[test]
    fn a_move_between_nodes_is_planned_from_where_it_runs_to_anywhere() {
        let cfg = config();
        // onward from B to C: C's public address and link; A is re-pointed
        let p = Plan::build(&cfg, "web1", "siteB", "siteC", &base()).expect("plan");
        assert_eq!(p.public, Some(IpAddr::from([10, 3, 0, 100])));
        assert_eq!(p.new_lan, "tapc");
        assert!(matches!(&p.mover, Mover::Node { socket, .. } if socket.ends_with("b.sock")));
        let others: Vec<&str> = p.gw_others.iter().map(|g| g.site.as_str()).collect();
        assert_eq!(others, ["siteA"]);
        assert!(matches!(p.forward("siteA"), Switch::Old { lan: Some(ref l), .. } if l == "br0"));
        assert!(matches!(p.forward("siteB"), Switch::Old { lan: None, .. }));
        // home: its own address, its home LAN
        let p = Plan::build(&cfg, "web1", "siteC", "siteA", &base()).expect("plan");
        assert_eq!(p.public, None);
        assert_eq!(p.address_at_destination(), IpAddr::from([10, 1, 0, 10]));
        assert_eq!(p.new_lan, "br0");
        // the DNS server is its home's, wherever it moves from
        assert_eq!(
            p.dns.as_ref().map(|d| d.server),
            Some(SocketAddr::from(([10, 0, 0, 1], 53)))
        );
    }

    #[test]
    fn a_move_to_where_it_runs_or_without_both_nodes_is_refused() {
        let cfg = config();
        let e = Plan::build(&cfg, "web1", "siteB", "siteB", &base()).expect_err("refused");
        assert!(e.to_string().contains("already runs at siteB"), "{e}");
        let mut cfg = config();
        if let Some(s) = cfg.site.get_mut("siteC") {
            s.node = None;
        }
        let e = Plan::build(&cfg, "web1", "siteB", "siteC", &base()).expect_err("refused");
        assert!(e.to_string().contains("must both have a node"), "{e}");
        let e = Plan::build(&cfg, "web9", "siteB", "siteC", &base()).expect_err("refused");
        assert!(e.to_string().contains("no [vm.web9]"), "{e}");
    }
}
