//! `migrator migrate`: one command that moves a VM to another site with its
//! disk, its open connections and its DNS name.
//!
//! ```text
//!  prepare   both gateways answer (token checked), register + prepare the
//!            service; DNS: lower the name's TTL
//!  move      the disk server migrates disk + memory to the destination agent
//!            (`control::request`); the agent checks its room at Hello
//!  ── commit point (inside `move`) ─────────────────────────────────────────
//!  network   gateway B delivers and translates, gateway A tunnels the old
//!            address to B, DNS points the name at B's public address
//!            (each retried; a failure is reported, never ignored)
//!  drain     gateway A drains (flows end or the deadline passes); TTL back
//! ```
//! A failure before the commit point leaves the VM at A, its routes as they
//! were, and the name's TTL restored.

pub mod gateway;
pub mod report;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::mpsc;
use tracing::warn;

use crate::args::{Keys, MigrateArgs};
use crate::events::{Event, Phase, Summary};
use gateway::{Endpoint, Gateway};

/// `migrator.toml`: the sites, their gateways and agents, and the VMs.
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
/// [site.siteB]
/// gateway = "10.0.0.2:7300"
/// token_file = "/etc/migrator/siteB.token"
/// agent = "10.0.0.2:7800"               # `migrator receive` there
/// agent_fingerprint = "ab12…"           # its key, pinned
///
/// [vm.web1]
/// site = "siteA"                        # where it runs now
/// control = "/run/migrator/web1.ctl"    # its disk server's control socket
/// qmp = "/run/qemu/web1.qmp"
/// address = "10.1.0.10"                 # its (old) address
/// name = "web1.example.test."           # its DNS name
/// public = { siteB = "10.2.0.100" }     # its new public address per site
/// lan = { siteB = "tap-web1" }          # its link at each destination
/// ```
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
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    pub site: String,
    pub control: PathBuf,
    pub qmp: PathBuf,
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
        }
        Ok(c)
    }
}

/// What `migrator migrate SERVICE --to SITE` does, resolved from the config.
#[derive(Debug, Clone)]
pub struct Plan {
    pub service: String,
    pub from: String,
    pub to: String,
    pub address: IpAddr,
    pub public: IpAddr,
    pub old_lan: Option<String>,
    pub new_lan: String,
    pub gw_from: Gateway,
    pub gw_to: Gateway,
    pub dns: Option<DnsPlan>,
    /// The VM migration, as the disk server's control socket takes it.
    pub args: MigrateArgs,
    pub control: PathBuf,
    /// How long the old site may keep tunnelling.
    pub drain_deadline: Duration,
    /// How long to wait here for the drain (zero: do not wait).
    pub drain_wait: Duration,
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

impl Plan {
    /// Resolves `service` → `to` from the config; `base` carries the
    /// migration knobs from the command line.
    pub fn new(cfg: &Config, service: &str, to: &str, base: &MigrateArgs) -> Result<Self> {
        let vm = cfg
            .vm
            .get(service)
            .with_context(|| format!("no [vm.{service}] in the config"))?;
        if vm.site == to {
            bail!("{service} already runs at {to}");
        }
        let site = |n: &str| {
            cfg.site
                .get(n)
                .with_context(|| format!("no [site.{n}] in the config"))
        };
        let (from_cfg, to_cfg) = (site(&vm.site)?, site(to)?);
        let agent = to_cfg
            .agent
            .clone()
            .with_context(|| format!("site {to} has no agent (the `migrator receive` address)"))?;
        let fp = to_cfg.agent_fingerprint.clone().with_context(|| {
            format!("site {to} has no agent_fingerprint (its `migrator keygen` output)")
        })?;
        let public = *vm.public.get(to).with_context(|| {
            format!("[vm.{service}] has no public address for {to} (public = {{ {to} = \"…\" }})")
        })?;
        if public.is_ipv4() != vm.address.is_ipv4() {
            bail!(
                "[vm.{service}]: its public address at {to} ({public}) and its address ({}) are of different families",
                vm.address
            );
        }
        let new_lan = vm.lan.get(to).cloned().with_context(|| {
            format!("[vm.{service}] has no link at {to} (lan = {{ {to} = \"…\" }})")
        })?;
        let dns = match &vm.name {
            None => None,
            Some(name) => {
                let server = cfg.dns.server.or(from_cfg.dns).with_context(|| {
                    format!("{service} has a DNS name but no DNS server is configured ([dns] server, or the site's dns)")
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
        let mut args = base.clone();
        args.control = Some(vm.control.clone());
        args.image = None;
        args.qmp = Some(vm.qmp.clone());
        args.to = agent;
        args.keys = Keys {
            identity: cfg.identity.clone(),
            peers: vec![fp],
        };
        args.json = false;
        Ok(Plan {
            service: service.to_string(),
            from: vm.site.clone(),
            to: to.to_string(),
            address: vm.address,
            public,
            old_lan: from_cfg.lan.clone(),
            new_lan,
            gw_from: Gateway::new(
                &vm.site,
                Endpoint::parse(&from_cfg.gateway),
                token(&vm.site, from_cfg)?,
            ),
            gw_to: Gateway::new(to, Endpoint::parse(&to_cfg.gateway), token(to, to_cfg)?),
            dns,
            control: vm.control.clone(),
            args,
            drain_deadline: Duration::from_secs(3600),
            drain_wait: Duration::from_secs(600),
        })
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
    let addr = plan.address.to_string();
    for g in [&plan.gw_from, &plan.gw_to] {
        match g.register(&plan.service, &addr, &plan.from).await {
            Ok(_) => {}
            // registered before (an earlier attempt): prepare decides
            Err(gateway::GatewayError::Refused { status: 409, .. }) => {}
            Err(e) => return Err(e.into()),
        }
        g.action(&plan.service, "prepare", json!({"to": plan.to}))
            .await?;
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
    let moved = crate::control::request(&plan.control, &plan.args, tx).await;
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
    report.migration = Some(summary);

    // ---- network: B delivers, A tunnels, DNS points to B ----
    phase(&mut report, Phase::Network);
    retry(&format!("switching gateway {}", plan.to), &events, || async {
        plan.gw_to
            .action(
                &plan.service,
                "switch",
                json!({"role": "new", "peer": plan.from, "public": plan.public, "lan": plan.new_lan}),
            )
            .await
            .map_err(Into::into)
    })
    .await?;
    retry(
        &format!("switching gateway {}", plan.from),
        &events,
        || async {
            let mut body = json!({"role": "old", "peer": plan.to});
            if let Some(l) = &plan.old_lan {
                body["lan"] = json!(l);
            }
            plan.gw_from
                .action(&plan.service, "switch", body)
                .await
                .map_err(Into::into)
        },
    )
    .await?;
    let t_switch = Instant::now();
    if let (Some((c, zone, name, p)), Some(d)) = (&dns, &plan.dns) {
        let to = [plan.public];
        let sw = retry(
            &format!("pointing {name} to {}", plan.public),
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
    let mut last_traffic = plan
        .gw_from
        .traffic(&plan.service)
        .await
        .unwrap_or(serde_json::Value::Null);
    let mut max_flows = last_traffic["flows"].as_u64().unwrap_or(0);

    // ---- drain: old flows finish through the tunnel ----
    phase(&mut report, Phase::Drain);
    retry(&format!("draining at {}", plan.from), &events, || async {
        plan.gw_from
            .action(
                &plan.service,
                "drain",
                json!({"deadline_s": plan.drain_deadline.as_secs()}),
            )
            .await
            .map_err(Into::into)
    })
    .await?;
    let wait_until = Instant::now() + plan.drain_wait;
    loop {
        if let Ok(t) = plan.gw_from.traffic(&plan.service).await {
            if !t.is_null() {
                max_flows = max_flows.max(t["flows"].as_u64().unwrap_or(0));
                last_traffic = t;
            }
        }
        if plan
            .gw_from
            .phase(&plan.service)
            .await
            .ok()
            .flatten()
            .as_deref()
            == Some("drained")
        {
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
    report.tunnelled_bytes = last_traffic["bytes"]
        .as_u64()
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
