//! The authoritative server: hickory-server's catalog answers queries and
//! zone transfers; UPDATE goes through [`DynZone`], which authenticates
//! (auth.rs), plans (zone.rs), journals (journal.rs) and only then makes the
//! change visible and acknowledges it.
//!
//! Update path, serialised per zone by one async mutex:
//!
//! ```text
//! TSIG check ─▶ zone::plan(prereqs, updates) ─▶ journal.append + fdatasync
//!            ─▶ swap RRsets into the served zone ─▶ NOERROR ─▶ NOTIFY secondaries
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use hickory_proto::op::{Header, HeaderCounts, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{
    DNSClass, LowerName, Name, Record, RecordType, RrKey, TSigResponseContext,
};
use hickory_proto::serialize::txt::Parser;
use hickory_server::dnssec::NxProofKind;
use hickory_server::net::runtime::Time;
use hickory_server::server::{
    Request, RequestHandler, RequestInfo, ResponseHandler, ResponseInfo, Server,
};
use hickory_server::store::in_memory::InMemoryZoneHandler;
use hickory_server::zone_handler::{
    AuthLookup, AxfrPolicy, Catalog, LookupControlFlow, LookupError, LookupOptions,
    MessageResponseBuilder, Nsec3QueryInfo, UpdateRequest, ZoneHandler, ZoneTransfer, ZoneType,
};
use serde::Serialize;
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::{mpsc, Mutex};

use crate::auth::{Authenticator, Refusal};
use crate::client::unix_now;
use crate::config::{Config, Transfer, ZoneConfig};
use crate::journal::{self, Journal};
use crate::udp::AnswerCache;
use crate::zone::{self, Records};
use hickory_proto::serialize::binary::BinEncoder;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("zone {origin}: cannot read zone file {path}: {why}")]
    ZoneFile {
        origin: String,
        path: PathBuf,
        why: String,
    },
    #[error("zone {origin}: {why}")]
    Zone { origin: String, why: String },
    #[error("zone {0}: {1}")]
    Journal(String, journal::JournalError),
    #[error("cannot listen on {addr} ({proto}): {source} (is another DNS server using the port? ports below 1024 need root)")]
    Listen {
        addr: SocketAddr,
        proto: &'static str,
        source: std::io::Error,
    },
    #[error(transparent)]
    Key(#[from] crate::key::KeyError),
}

/// Counters for one zone, exported by the gateway's /metrics.
#[derive(Default)]
pub struct ZoneStats {
    pub applied: AtomicU64,
    pub unchanged: AtomicU64,
    pub rejected: AtomicU64,
    pub refused_unsigned: AtomicU64,
    pub refused_badkey: AtomicU64,
    pub refused_badsig: AtomicU64,
    pub refused_badtime: AtomicU64,
    pub refused_replay: AtomicU64,
    pub refused_not_allowed: AtomicU64,
    pub notify_sent: AtomicU64,
    pub notify_failed: AtomicU64,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ZoneStatsSnapshot {
    pub zone: String,
    pub serial: u32,
    pub applied: u64,
    pub unchanged: u64,
    /// Authenticated updates answered with an error (prerequisite, NOTZONE, FORMERR...).
    pub rejected: u64,
    pub refused: BTreeMap<&'static str, u64>,
    pub notify_sent: u64,
    pub notify_failed: u64,
}

impl ZoneStats {
    fn refused(&self, why: Refusal) {
        let c = match why {
            Refusal::Unsigned => &self.refused_unsigned,
            Refusal::BadKey => &self.refused_badkey,
            Refusal::BadSig => &self.refused_badsig,
            Refusal::BadTime => &self.refused_badtime,
            Refusal::Replay => &self.refused_replay,
            Refusal::NotAllowed => &self.refused_not_allowed,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// How a zone is served, besides its data.
pub struct ZoneOptions {
    pub auth: Arc<Authenticator>,
    /// Keys that may update it (`None`: every configured key).
    pub update_keys: Option<Vec<Name>>,
    pub transfer: Transfer,
    /// Secondaries to NOTIFY after each change.
    pub notify: Vec<SocketAddr>,
    /// The UDP answer cache to empty on each change.
    pub cache: Arc<AnswerCache>,
}

/// One authoritative, dynamically updatable zone.
pub struct DynZone {
    origin: LowerName,
    mem: InMemoryZoneHandler,
    auth: Arc<Authenticator>,
    update_keys: Option<Vec<Name>>,
    transfer: Transfer,
    /// Serialises updates (and transfers against updates); owns the journal.
    journal: Mutex<Arc<StdMutex<Journal>>>,
    notify: Option<mpsc::Sender<()>>,
    /// Cached UDP answers; emptied on every change, before it is acknowledged.
    cache: Arc<AnswerCache>,
    /// No wildcards, delegations, ANAME or DNAME: negative answers can be
    /// decided from the ordered record map alone (see `negative`).
    plain: std::sync::atomic::AtomicBool,
    stats: Arc<ZoneStats>,
}

/// A zone whose negative answers need no wildcard, referral or alias logic.
fn is_plain(origin: &LowerName, records: &Records) -> bool {
    let special = |k: &RrKey| {
        k.name.is_wildcard()
            || matches!(k.record_type, RecordType::ANAME | RecordType::DNAME)
            || (k.record_type == RecordType::NS && &k.name != origin)
    };
    !records.keys().any(special)
}

impl DynZone {
    /// Loads `file`, then replays `journal_path` on top of it.
    pub fn load(
        origin: &str,
        file: &Path,
        journal_path: &Path,
        opts: ZoneOptions,
    ) -> Result<Self, ServeError> {
        let ZoneOptions {
            auth,
            update_keys,
            transfer,
            notify,
            cache,
        } = opts;
        let zone_err = |why: String| ServeError::Zone {
            origin: origin.to_string(),
            why,
        };
        let mut name =
            Name::from_ascii(origin).map_err(|e| zone_err(format!("bad origin: {e}")))?;
        name.set_fqdn(true);
        let lower = LowerName::new(&name);
        let text = std::fs::read_to_string(file).map_err(|e| ServeError::ZoneFile {
            origin: origin.to_string(),
            path: file.to_path_buf(),
            why: e.to_string(),
        })?;
        let (_, parsed) = Parser::new(text, Some(file.to_path_buf()), Some(name.clone()))
            .parse()
            .map_err(|e| ServeError::ZoneFile {
                origin: origin.to_string(),
                path: file.to_path_buf(),
                why: e.to_string(),
            })?;
        let mut records: Records = parsed.into_iter().map(|(k, v)| (k, Arc::new(v))).collect();
        let file_serial = zone::soa_of(&records, &lower)
            .map(|(_, soa)| soa.serial)
            .ok_or_else(|| {
                zone_err(format!("zone file {} has no SOA at {name}", file.display()))
            })?;
        if let Some((_, other)) = records.iter().find(|(k, _)| !lower.zone_of(&k.name)) {
            return Err(zone_err(format!(
                "zone file has {} {}, outside the zone",
                other.name(),
                other.record_type()
            )));
        }

        let opened =
            Journal::open(journal_path).map_err(|e| ServeError::Journal(origin.to_string(), e))?;
        let mut journal = opened.journal;
        let journal_serial = opened.entries.last().map(|e| e.change.serial);
        match journal_serial {
            Some(js) if zone::serial_gt(file_serial, js) => {
                // The operator edited the zone file and raised its serial: it wins.
                let aside = journal_path.with_extension("jnl.old");
                tracing::warn!(
                    zone = %name, file_serial, journal_serial = js, moved_to = %aside.display(),
                    "zone file is newer than the journal; starting a new journal from the zone file"
                );
                drop(journal);
                std::fs::rename(journal_path, &aside).map_err(|e| {
                    zone_err(format!(
                        "cannot move the old journal {} aside: {e}",
                        journal_path.display()
                    ))
                })?;
                journal = Journal::open(journal_path)
                    .map_err(|e| ServeError::Journal(origin.to_string(), e))?
                    .journal;
            }
            _ => journal::replay(&mut records, &opened.entries),
        }
        tracing::info!(
            zone = %name,
            records = records.len(),
            journal_entries = journal.entries(),
            serial = zone::soa_of(&records, &lower).map(|(_, s)| s.serial),
            "zone loaded"
        );

        let plain = is_plain(&lower, &records);
        let mut mem =
            InMemoryZoneHandler::empty(name, ZoneType::Primary, AxfrPolicy::AllowAll, None);
        *mem.records_get_mut() = records;
        let stats = Arc::new(ZoneStats::default());
        let notify =
            (!notify.is_empty()).then(|| spawn_notifier(lower.clone(), notify, stats.clone()));
        Ok(Self {
            origin: lower,
            mem,
            auth,
            update_keys,
            transfer,
            journal: Mutex::new(Arc::new(StdMutex::new(journal))),
            notify,
            cache,
            plain: std::sync::atomic::AtomicBool::new(plain),
            stats,
        })
    }

    pub fn origin(&self) -> &LowerName {
        &self.origin
    }

    pub async fn serial(&self) -> u32 {
        self.mem.serial().await
    }

    /// The records of one RRset, as served now.
    pub async fn rrset(&self, name: &Name, rtype: RecordType) -> Vec<Record> {
        self.mem
            .records()
            .await
            .get(&RrKey::new(LowerName::new(name), rtype))
            .map(|s| s.records_without_rrsigs().cloned().collect())
            .unwrap_or_default()
    }

    pub async fn stats(&self) -> ZoneStatsSnapshot {
        let s = &self.stats;
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let refused = [
            (Refusal::Unsigned, &s.refused_unsigned),
            (Refusal::BadKey, &s.refused_badkey),
            (Refusal::BadSig, &s.refused_badsig),
            (Refusal::BadTime, &s.refused_badtime),
            (Refusal::Replay, &s.refused_replay),
            (Refusal::NotAllowed, &s.refused_not_allowed),
        ]
        .into_iter()
        .map(|(r, c)| (r.as_str(), get(c)))
        .collect();
        ZoneStatsSnapshot {
            zone: self.origin.to_string(),
            serial: self.serial().await,
            applied: get(&s.applied),
            unchanged: get(&s.unchanged),
            rejected: get(&s.rejected),
            refused,
            notify_sent: get(&s.notify_sent),
            notify_failed: get(&s.notify_failed),
        }
    }

    /// NXDOMAIN or NODATA decided in O(log n) for a plain zone; `None`:
    /// answer through the full lookup. (hickory's in-memory store decides
    /// these with a scan of every key, which made a 1000-record zone answer
    /// distinct missing names 8 times slower than BIND.)
    async fn negative(
        &self,
        name: &LowerName,
        qtype: RecordType,
    ) -> Option<LookupControlFlow<AuthLookup>> {
        if matches!(qtype, RecordType::ANY | RecordType::AXFR | RecordType::IXFR)
            || !self.plain.load(Ordering::SeqCst)
            || !self.origin.zone_of(name)
        {
            return None;
        }
        let records = self.mem.records().await;
        let first = RrKey::new(name.clone(), RecordType::Unknown(u16::MIN));
        // one descent: the name's own keys, then (canonical order puts a
        // name's descendants right after it) the first key beyond them,
        // which tells an empty non-terminal from a name that does not exist
        let mut exists = false;
        let mut below = false;
        for (key, _) in records.range(&first..) {
            if &key.name == name {
                if key.record_type == qtype || key.record_type == RecordType::CNAME {
                    return None; // an answer (or an alias to follow): the full lookup
                }
                exists = true;
            } else {
                below = name.zone_of(&key.name);
                break;
            }
        }
        let error = if exists || below {
            LookupError::NameExists
        } else {
            LookupError::from(ResponseCode::NXDomain)
        };
        Some(LookupControlFlow::Continue(Err(error)))
    }

    async fn search_unsigned(
        &self,
        request: &Request,
        lookup_options: LookupOptions,
    ) -> LookupControlFlow<AuthLookup> {
        if let Ok(info) = request.request_info() {
            if let Some(flow) = self
                .negative(info.query.name(), info.query.query_type())
                .await
            {
                return flow;
            }
        }
        self.mem.search(request, lookup_options).await.0
    }

    /// Plans, journals and applies an authenticated update.
    async fn apply_update(
        &self,
        prerequisites: &[Record],
        updates: &[Record],
    ) -> Result<bool, ResponseCode> {
        let journal = self.journal.lock().await;
        let planned = {
            let records = self.mem.records().await;
            zone::plan(&self.origin, &records, prerequisites, updates)
        };
        let change = match planned {
            Err(code) => {
                self.stats.rejected.fetch_add(1, Ordering::Relaxed);
                tracing::info!(zone = %self.origin, rcode = %code, "update rejected");
                return Err(code);
            }
            Ok(None) => {
                self.stats.unchanged.fetch_add(1, Ordering::Relaxed);
                return Ok(false);
            }
            Ok(Some(change)) => change,
        };

        // Durable before visible, visible before acknowledged.
        let j = journal.clone();
        let c = change.clone();
        let written = tokio::task::spawn_blocking(move || {
            let mut j = j.lock().unwrap_or_else(|p| p.into_inner());
            j.append(&c)
        })
        .await;
        match written {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::error!(zone = %self.origin, error = %e, "update not journaled; answering SERVFAIL");
                return Err(ResponseCode::ServFail);
            }
            Err(e) => {
                tracing::error!(zone = %self.origin, error = %e, "journal task failed; answering SERVFAIL");
                return Err(ResponseCode::ServFail);
            }
        }
        let snapshot = {
            let mut records = self.mem.records_mut().await;
            journal::apply(&mut records, &change);
            self.plain
                .store(is_plain(&self.origin, &records), Ordering::SeqCst);
            records.clone()
        };
        self.cache.invalidate();
        self.stats.applied.fetch_add(1, Ordering::Relaxed);
        tracing::info!(zone = %self.origin, serial = change.serial, rrsets = change.rrsets.len(), "update applied");

        let needs_compaction = journal
            .lock()
            .map(|j| j.entries() > Journal::COMPACT_AFTER)
            .unwrap_or(false);
        if needs_compaction {
            let j = journal.clone();
            let serial = change.serial;
            let done = tokio::task::spawn_blocking(move || {
                let mut j = j.lock().unwrap_or_else(|p| p.into_inner());
                j.compact(serial, &snapshot)
            })
            .await;
            if let Ok(Err(e)) | Err(e) =
                done.map_err(|e| journal::JournalError::Encode(e.to_string()))
            {
                // The deltas are still intact; compaction is retried next time.
                tracing::warn!(zone = %self.origin, error = %e, "journal compaction failed");
            }
        }
        if let Some(n) = &self.notify {
            let _ = n.try_send(()); // a pending notification already covers this change
        }
        Ok(true)
    }
}

#[async_trait::async_trait]
impl ZoneHandler for DynZone {
    fn zone_type(&self) -> ZoneType {
        ZoneType::Primary
    }

    fn axfr_policy(&self) -> AxfrPolicy {
        match self.transfer {
            Transfer::Deny => AxfrPolicy::Deny,
            Transfer::Any => AxfrPolicy::AllowAll,
            Transfer::Signed => AxfrPolicy::AllowSigned,
        }
    }

    async fn update(
        &self,
        request: &Request,
        now: u64,
    ) -> (Result<bool, ResponseCode>, Option<TSigResponseContext>) {
        let outcome = self.auth.check(
            request.metadata.id,
            request.as_slice(),
            request.signature.as_deref(),
            now,
            self.update_keys.as_deref(),
            true,
        );
        let key = match outcome.result {
            Ok(key) => key,
            Err((why, code)) => {
                self.stats.refused(why);
                tracing::warn!(zone = %self.origin, src = %request.src(), reason = why.as_str(), "update refused");
                return (Err(code), outcome.response);
            }
        };
        // RFC 2136 §3.1.2: the zone section must name a zone we are primary for.
        match UpdateRequest::zone(&**request) {
            Ok(z) if z.name() == &self.origin && z.query_class() == DNSClass::IN => {}
            _ => return (Err(ResponseCode::NotAuth), outcome.response),
        }
        tracing::debug!(zone = %self.origin, key = %key, "authenticated update");
        let result = self
            .apply_update(request.prerequisites(), request.updates())
            .await;
        (result, outcome.response)
    }

    fn origin(&self) -> &LowerName {
        &self.origin
    }

    async fn lookup(
        &self,
        name: &LowerName,
        rtype: RecordType,
        request_info: Option<&RequestInfo<'_>>,
        lookup_options: LookupOptions,
    ) -> LookupControlFlow<AuthLookup> {
        self.mem
            .lookup(name, rtype, request_info, lookup_options)
            .await
    }

    async fn search(
        &self,
        request: &Request,
        lookup_options: LookupOptions,
    ) -> (LookupControlFlow<AuthLookup>, Option<TSigResponseContext>) {
        // A signed query (a secondary's SOA check, say) gets a signed answer.
        let Some(tsig) = request.signature.as_deref() else {
            return (self.search_unsigned(request, lookup_options).await, None);
        };
        let o = self.auth.check(
            request.metadata.id,
            request.as_slice(),
            Some(tsig),
            unix_now(),
            None,
            false,
        );
        if let Err((why, code)) = o.result {
            tracing::warn!(zone = %self.origin, src = %request.src(), reason = why.as_str(), "signed query refused");
            return (
                LookupControlFlow::Break(Err(LookupError::from(code))),
                o.response,
            );
        }
        (
            self.search_unsigned(request, lookup_options).await,
            o.response,
        )
    }

    async fn nsec_records(
        &self,
        name: &LowerName,
        lookup_options: LookupOptions,
    ) -> LookupControlFlow<AuthLookup> {
        self.mem.nsec_records(name, lookup_options).await
    }

    async fn nsec3_records(
        &self,
        info: Nsec3QueryInfo<'_>,
        lookup_options: LookupOptions,
    ) -> LookupControlFlow<AuthLookup> {
        self.mem.nsec3_records(info, lookup_options).await
    }

    async fn zone_transfer(
        &self,
        request: &Request,
        lookup_options: LookupOptions,
        now: u64,
    ) -> Option<(
        Result<ZoneTransfer, LookupError>,
        Option<TSigResponseContext>,
    )> {
        let signer = match self.transfer {
            Transfer::Deny => return Some((Err(LookupError::from(ResponseCode::Refused)), None)),
            Transfer::Any => None,
            Transfer::Signed => {
                let o = self.auth.check(
                    request.metadata.id,
                    request.as_slice(),
                    request.signature.as_deref(),
                    now,
                    None,
                    false,
                );
                if let Err((why, code)) = o.result {
                    tracing::warn!(zone = %self.origin, src = %request.src(), reason = why.as_str(), "zone transfer refused");
                    return Some((Err(LookupError::from(code)), o.response));
                }
                o.response
            }
        };
        // No update may land between the transfer's SOA and its records.
        let _serialised = self.journal.lock().await;
        let (result, _) = self.mem.zone_transfer(request, lookup_options, now).await?;
        Some((result, signer))
    }

    fn nx_proof_kind(&self) -> Option<&NxProofKind> {
        None
    }
}

/// Sends NOTIFY (RFC 1996) to the secondaries after changes, coalescing bursts.
fn spawn_notifier(
    origin: LowerName,
    targets: Vec<SocketAddr>,
    stats: Arc<ZoneStats>,
) -> mpsc::Sender<()> {
    let (tx, mut rx) = mpsc::channel::<()>(1);
    tokio::spawn(async move {
        while rx.recv().await.is_some() {
            for target in &targets {
                match send_notify(&origin, *target).await {
                    Ok(()) => stats.notify_sent.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        tracing::warn!(zone = %origin, %target, error = %e, "NOTIFY not acknowledged");
                        stats.notify_failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        }
    });
    tx
}

async fn send_notify(origin: &LowerName, target: SocketAddr) -> std::io::Result<()> {
    let bind: SocketAddr = if target.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    }
    .parse()
    .map_err(|e| std::io::Error::other(format!("{e}")))?;
    let sock = UdpSocket::bind(bind).await?;
    let id: u16 = rand::random();
    let mut msg = Message::new(id, MessageType::Query, OpCode::Notify);
    msg.metadata.authoritative = true;
    let mut q = Query::query(Name::from(origin), RecordType::SOA);
    q.set_query_class(DNSClass::IN);
    msg.add_query(q);
    let bytes = msg.to_vec().map_err(std::io::Error::other)?;
    let mut buf = [0u8; 512];
    for _attempt in 0..3 {
        sock.send_to(&bytes, target).await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while let Ok(got) = tokio::time::timeout_at(deadline, sock.recv_from(&mut buf)).await {
            let (n, from) = got?;
            if from == target && n >= 2 && u16::from_be_bytes([buf[0], buf[1]]) == id {
                tracing::debug!(zone = %origin, %target, "NOTIFY acknowledged");
                return Ok(());
            }
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "no answer after 3 tries",
    ))
}

/// Routes requests: UPDATE for a zone we do not serve is NOTAUTH (RFC 2136
/// §3.1.2); everything else goes to the catalog.
pub struct Handler {
    catalog: Catalog,
    zones: Vec<Arc<DynZone>>,
    auth: Arc<Authenticator>,
}

impl Handler {
    /// An error answer with no records; signed when the request's TSIG
    /// verifies, so the client can trust it.
    async fn error_answer<R: ResponseHandler>(
        &self,
        request: &Request,
        rcode: ResponseCode,
        mut response_handle: R,
    ) -> ResponseInfo {
        let o = self.auth.check(
            request.metadata.id,
            request.as_slice(),
            request.signature.as_deref(),
            unix_now(),
            None,
            false,
        );
        let build = || {
            MessageResponseBuilder::new(&request.queries, None).error_msg(&request.metadata, rcode)
        };
        let mut response = build();
        if let Some(ctx) = o.response {
            let mut tbs = Vec::with_capacity(512);
            let signed = build()
                .destructive_emit(&mut BinEncoder::new(&mut tbs))
                .map_err(|e| e.to_string())
                .and_then(|_| ctx.sign(&tbs).map_err(|e| e.to_string()));
            match signed {
                Ok(sig) => response.set_signature(sig),
                Err(e) => {
                    tracing::warn!(error = %e, %rcode, "cannot sign the answer; sending it unsigned")
                }
            }
        }
        match response_handle.send_response(response).await {
            Ok(info) => info,
            Err(e) => {
                tracing::warn!(error = %e, %rcode, "cannot send the answer");
                let mut metadata = request.metadata;
                metadata.message_type = MessageType::Response;
                metadata.response_code = ResponseCode::ServFail;
                ResponseInfo::from(Header {
                    metadata,
                    counts: HeaderCounts::default(),
                })
            }
        }
    }
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        response_handle: R,
    ) -> ResponseInfo {
        if request.metadata.op_code == OpCode::Update
            && request.metadata.message_type == MessageType::Query
        {
            if let Ok(info) = request.request_info() {
                let zone = info.query.name();
                if !self.zones.iter().any(|z| z.origin() == zone) {
                    tracing::info!(%zone, src = %request.src(), "update for a zone not served here: NOTAUTH");
                    return self
                        .error_answer(request, ResponseCode::NotAuth, response_handle)
                        .await;
                }
            }
        }
        // IXFR: we keep no history, so say so (RFC 1995 allows NOTIMP); a
        // secondary then falls back to AXFR. (hickory's lookup would answer
        // a lone SOA, which reads as "you are up to date".)
        if request.metadata.op_code == OpCode::Query
            && request
                .request_info()
                .is_ok_and(|i| i.query.query_type() == RecordType::IXFR)
        {
            return self
                .error_answer(request, ResponseCode::NotImp, response_handle)
                .await;
        }
        self.catalog
            .handle_request::<R, T>(request, response_handle)
            .await
    }
}

/// Lets hickory's TCP server and our UDP loops share one handler.
struct Shared(Arc<Handler>);

#[async_trait::async_trait]
impl RequestHandler for Shared {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        response_handle: R,
    ) -> ResponseInfo {
        self.0
            .handle_request::<R, T>(request, response_handle)
            .await
    }
}

/// A started server.
pub struct Running {
    /// The addresses actually bound (port 0 resolved), UDP and TCP alike.
    pub addrs: Vec<SocketAddr>,
    pub zones: Vec<Arc<DynZone>>,
    pub cache: Arc<AnswerCache>,
    server: Server<Shared>,
    udp: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        for t in &self.udp {
            t.abort();
        }
    }
}

impl Running {
    pub fn zone(&self, origin: &str) -> Option<&Arc<DynZone>> {
        let mut name = Name::from_ascii(origin).ok()?;
        name.set_fqdn(true);
        let lower = LowerName::new(&name);
        self.zones.iter().find(|z| z.origin() == &lower)
    }

    pub async fn shutdown(mut self) {
        for t in &self.udp {
            t.abort();
        }
        let _ = self.server.shutdown_gracefully().await;
    }

    /// Runs until the server stops (it does not on its own).
    pub async fn wait(&mut self) -> Result<(), String> {
        self.server
            .block_until_done()
            .await
            .map_err(|e| e.to_string())
    }
}

pub fn load_zones(
    config: &Config,
    auth: &Arc<Authenticator>,
    cache: &Arc<AnswerCache>,
) -> Result<Vec<Arc<DynZone>>, ServeError> {
    let keys = config.tsig_keys()?;
    config
        .zones
        .iter()
        .map(|z: &ZoneConfig| {
            let update_keys = z.update_keys.as_ref().map(|names| {
                names
                    .iter()
                    .filter_map(|n| {
                        keys.iter()
                            .find(|k| k.display_name() == n.trim_end_matches('.'))
                    })
                    .map(|k| k.name().clone())
                    .collect()
            });
            DynZone::load(
                &z.origin,
                &config.path(&z.file),
                &config.journal_path(z),
                ZoneOptions {
                    auth: auth.clone(),
                    update_keys,
                    transfer: z.transfer,
                    notify: z.notify.clone(),
                    cache: cache.clone(),
                },
            )
            .map(Arc::new)
        })
        .collect()
}

/// Loads every zone and listens on every address (UDP and TCP).
pub async fn start(config: &Config) -> Result<Running, ServeError> {
    let auth = Arc::new(Authenticator::new(&config.tsig_keys()?, config.fudge)?);
    let cache = Arc::new(AnswerCache::default());
    let zones = load_zones(config, &auth, &cache)?;
    let mut catalog = Catalog::new();
    for z in &zones {
        catalog.upsert(z.origin().clone(), vec![z.clone() as Arc<dyn ZoneHandler>]);
    }
    let handler = Arc::new(Handler {
        catalog,
        zones: zones.clone(),
        auth,
    });
    let mut server = Server::new(Shared(handler.clone()));
    let loops = 2 * std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    let mut udp_tasks = Vec::new();
    let mut addrs = Vec::new();
    for addr in &config.listen {
        let (udp, bound) =
            crate::udp::bind_group(*addr, loops).map_err(|source| ServeError::Listen {
                addr: *addr,
                proto: "udp",
                source,
            })?;
        let tcp = TcpListener::bind(bound)
            .await
            .map_err(|source| ServeError::Listen {
                addr: bound,
                proto: "tcp",
                source,
            })?;
        udp_tasks.extend(crate::udp::spawn(udp, handler.clone(), cache.clone()));
        server.register_listener(tcp, Duration::from_secs(10), 64);
        tracing::info!(%bound, "serving DNS on UDP and TCP");
        addrs.push(bound);
    }
    Ok(Running {
        addrs,
        zones,
        cache,
        server,
        udp: udp_tasks,
    })
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use proptest::prelude::*;

    use super::*;

    /// A zone with the given owner names (each with an A record), loaded the
    /// way `serve` loads it.
    fn zone_with(names: &[String], wildcard: bool) -> (tempfile::TempDir, DynZone) {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut text = String::from(
            "$ORIGIN example.test.\n$TTL 300\n@ IN SOA ns1 hostmaster ( 1 3600 600 86400 60 )\n  IN NS ns1\nns1 IN A 127.0.0.1\n",
        );
        for n in names {
            text.push_str(&format!("{n} IN A 10.0.0.1\n"));
        }
        if wildcard {
            text.push_str("*.w IN TXT \"wild\"\n");
        }
        let file = dir.path().join("z.zone");
        std::fs::write(&file, text).expect("write");
        let auth = Arc::new(Authenticator::new(&[], 300).expect("auth"));
        let zone = DynZone::load(
            "example.test.",
            &file,
            &dir.path().join("z.jnl"),
            ZoneOptions {
                auth,
                update_keys: None,
                transfer: Transfer::Deny,
                notify: vec![],
                cache: Arc::new(AnswerCache::default()),
            },
        )
        .expect("load");
        (dir, zone)
    }

    fn kind(flow: &LookupControlFlow<AuthLookup>) -> &'static str {
        match flow {
            LookupControlFlow::Continue(Ok(_)) | LookupControlFlow::Break(Ok(_)) => "answer",
            LookupControlFlow::Continue(Err(LookupError::NameExists)) => "nodata",
            LookupControlFlow::Continue(Err(e)) if e.is_nx_domain() => "nxdomain",
            _ => "other",
        }
    }

    /// The O(log n) negative answer agrees with hickory's full lookup.
    fn check(names: &[String], queries: &[String], wildcard: bool) -> Result<(), TestCaseError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("rt");
        let (_dir, zone) = zone_with(names, wildcard);
        rt.block_on(async {
            for q in queries {
                let name =
                    LowerName::from(Name::from_str(&format!("{q}.example.test.")).expect("name"));
                for t in [RecordType::A, RecordType::AAAA, RecordType::TXT] {
                    let full = zone
                        .mem
                        .lookup(&name, t, None, LookupOptions::default())
                        .await;
                    if let Some(fast) = zone.negative(&name, t).await {
                        prop_assert_eq!(kind(&fast), kind(&full), "{} {}", q, t);
                    } else {
                        prop_assert!(
                            wildcard || kind(&full) == "answer",
                            "{} {}: fast path declined a plain negative",
                            q,
                            t
                        );
                    }
                }
            }
            Ok(())
        })
    }

    fn label() -> impl Strategy<Value = String> {
        prop::sample::select(vec!["a", "b", "ba", "c", "a-b", "z"]).prop_map(str::to_string)
    }

    fn owner() -> impl Strategy<Value = String> {
        prop::collection::vec(label(), 1..4).prop_map(|l| l.join("."))
    }

    #[test]
    fn negative_answers_match_the_full_lookup_on_a_fixed_zone() {
        let names: Vec<String> = ["a", "b.c", "x.y.z", "ba"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let queries: Vec<String> = [
            "a", "b", "c", "b.c", "y.z", "z", "x.y.z", "q.x.y.z", "ba", "bb", "a.a", "ns1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        check(&names, &queries, false).expect("agree");
        // wildcards switch the fast path off
        let (_d, zone) = zone_with(&names, true);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("rt");
        let name = LowerName::from(Name::from_str("q.w.example.test.").expect("name"));
        assert!(rt.block_on(zone.negative(&name, RecordType::TXT)).is_none());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn negative_answers_match_the_full_lookup(
            names in prop::collection::vec(owner(), 0..12),
            queries in prop::collection::vec(owner(), 1..12),
        ) {
            check(&names, &queries, false)?;
        }
    }
}
