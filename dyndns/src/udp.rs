//! The UDP front end: receive loops that answer repeated questions from an
//! answer cache, and hand everything else to the request handler (the
//! hickory-server catalog and our update path).
//!
//! An answer is a pure function of the zone contents and the request bytes
//! after the ID, so a cached answer, its ID patched, is the answer the
//! catalog would give. Only plain queries are cached (opcode QUERY, one
//! question, at most an OPT record, no TSIG) and only whole answers
//! (NOERROR/NXDOMAIN, not truncated).
//!
//! Freshness: a change (update applied to the served zone) bumps the cache
//! generation and empties it *before* the update is acknowledged; an answer
//! computed before the bump is never inserted after it (insert checks the
//! generation it started with). So the first query after an acknowledged
//! update sees the update.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use hickory_proto::serialize::binary::BinEncoder;
use hickory_server::net::runtime::TokioTime;
use hickory_server::net::xfer::Protocol;
use hickory_server::net::NetError;
use hickory_server::proto::rr::Record;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponse;
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

/// Entries beyond this empty the cache (a flood of distinct questions must
/// not grow memory without bound).
const MAX_ENTRIES: usize = 65_536;

/// Request bytes after the ID → encoded answer.
type Answers = HashMap<Box<[u8]>, Arc<[u8]>>;

#[derive(Default)]
pub struct AnswerCache {
    generation: AtomicU64,
    map: RwLock<Answers>,
    pub hits: AtomicU64,
    pub misses: AtomicU64,
}

impl AnswerCache {
    /// Forget every answer; call after a change is visible, before it is acknowledged.
    pub fn invalidate(&self) {
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
        self.generation.fetch_add(1, Ordering::SeqCst);
        map.clear();
    }

    fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    fn get(&self, key: &[u8]) -> Option<Arc<[u8]>> {
        let map = self.map.read().unwrap_or_else(|p| p.into_inner());
        map.get(key).cloned()
    }

    fn insert(&self, generation: u64, key: &[u8], answer: &[u8]) {
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
        if self.generation.load(Ordering::SeqCst) != generation {
            return; // computed from a zone that has changed since
        }
        if map.len() >= MAX_ENTRIES {
            map.clear();
        }
        map.insert(key.into(), answer.into());
    }
}

/// A plain query whose answer depends only on its bytes after the ID.
fn cacheable_request(p: &[u8]) -> bool {
    let count = |i: usize| u16::from_be_bytes([p[i], p[i + 1]]);
    p.len() >= 12
        && p[2] & 0x80 == 0 // a query
        && (p[2] >> 3) & 0x0f == 0 // opcode QUERY
        && count(4) == 1
        && count(6) == 0
        && count(8) == 0
        && count(10) <= 1
}

/// A whole answer: not truncated, NOERROR or NXDOMAIN.
fn cacheable_answer(a: &[u8]) -> bool {
    a.len() >= 12 && a[2] & 0x02 == 0 && matches!(a[3] & 0x0f, 0 | 3)
}

/// Header-only FORMERR for a request we cannot parse (RFC 1035 §4.1.1).
fn formerr(p: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; 12];
    out[0] = p[0];
    out[1] = p[1];
    out[2] = 0x80 | (p[2] & 0x78); // QR, same opcode
    out[3] = 1; // FORMERR
    out
}

/// Collects the encoded answer instead of sending it.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Option<Vec<u8>>>>);

#[async_trait::async_trait]
impl ResponseHandler for Capture {
    async fn send_response<'a>(
        &mut self,
        response: MessageResponse<
            '_,
            'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
        >,
    ) -> Result<ResponseInfo, NetError> {
        // RFC 1035 §4.2.1: 512 bytes unless EDNS says more; the encoder truncates (TC).
        let max = response
            .edns()
            .map(|e| e.max_payload().max(512))
            .unwrap_or(512);
        let mut buf = Vec::with_capacity(512);
        let mut encoder = BinEncoder::new(&mut buf);
        encoder.set_max_size(max);
        let info = response.destructive_emit(&mut encoder)?;
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(buf);
        Ok(info)
    }
}

/// Runs one request through the handler: the encoded answer, if any, and
/// whether the request was signed (its answer is then per-request).
async fn answer<H: RequestHandler>(
    handler: &H,
    packet: Vec<u8>,
    src: SocketAddr,
) -> (Option<Vec<u8>>, bool) {
    let request = match Request::from_bytes(packet.clone(), src, Protocol::Udp) {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(%src, error = %e, "malformed request: FORMERR");
            return (Some(formerr(&packet)), false);
        }
    };
    let signed = request.signature.is_some();
    let capture = Capture::default();
    handler
        .handle_request::<Capture, TokioTime>(&request, capture.clone())
        .await;
    let out = capture.0.lock().unwrap_or_else(|p| p.into_inner()).take();
    (out, signed)
}

/// Binds `n` UDP sockets to one address with SO_REUSEPORT, so the kernel
/// spreads clients over them and each receive loop waits on its own socket
/// (one shared socket wakes every loop for every packet). Port 0 is resolved
/// by the first bind. Returns the sockets and the bound address.
pub fn bind_group(addr: SocketAddr, n: usize) -> std::io::Result<(Vec<UdpSocket>, SocketAddr)> {
    use socket2::{Domain, Protocol as SockProto, Socket, Type};
    let one = |at: SocketAddr| -> std::io::Result<UdpSocket> {
        let s = Socket::new(Domain::for_address(at), Type::DGRAM, Some(SockProto::UDP))?;
        if at.is_ipv6() {
            s.set_only_v6(true)?;
        }
        s.set_reuse_port(true)?;
        s.set_nonblocking(true)?;
        s.bind(&at.into())?;
        UdpSocket::from_std(s.into())
    };
    let first = one(addr)?;
    let bound = first.local_addr()?;
    let mut all = vec![first];
    for _ in 1..n.max(1) {
        all.push(one(bound)?);
    }
    Ok((all, bound))
}

/// Starts one receive loop per socket.
pub fn spawn<H: RequestHandler>(
    sockets: Vec<UdpSocket>,
    handler: Arc<H>,
    cache: Arc<AnswerCache>,
) -> Vec<JoinHandle<()>> {
    sockets
        .into_iter()
        .map(|s| tokio::spawn(receive_loop(Arc::new(s), handler.clone(), cache.clone())))
        .collect()
}

async fn receive_loop<H: RequestHandler>(
    socket: Arc<UdpSocket>,
    handler: Arc<H>,
    cache: Arc<AnswerCache>,
) {
    let mut buf = vec![0u8; 65_535];
    loop {
        let (n, src) = match socket.recv_from(&mut buf).await {
            Ok(got) => got,
            Err(e) => {
                // ICMP errors from earlier sends surface here; keep serving
                tracing::debug!(error = %e, "UDP receive error");
                continue;
            }
        };
        let packet = &buf[..n];
        // too short to be DNS, or a response (never answer those: reflection)
        if n < 12 || packet[2] & 0x80 != 0 {
            continue;
        }
        let cacheable = cacheable_request(packet);
        if cacheable {
            if let Some(hit) = cache.get(&packet[2..]) {
                cache.hits.fetch_add(1, Ordering::Relaxed);
                let mut out = hit.to_vec();
                out[..2].copy_from_slice(&packet[..2]);
                let _ = socket.send_to(&out, src).await;
                continue;
            }
            cache.misses.fetch_add(1, Ordering::Relaxed);
        }
        let generation = cache.generation();
        let packet = packet.to_vec();
        if (packet[2] >> 3) & 0x0f != 0 {
            // updates and notifies wait on disk: do not hold up this loop
            let (socket, handler) = (socket.clone(), handler.clone());
            tokio::spawn(async move {
                if let (Some(out), _) = answer(&*handler, packet, src).await {
                    let _ = socket.send_to(&out, src).await;
                }
            });
            continue;
        }
        let (Some(out), signed) = answer(&*handler, packet.clone(), src).await else {
            continue;
        };
        // signed queries get signed (per-request) answers: never cached
        if cacheable && !signed && cacheable_answer(&out) {
            cache.insert(generation, &packet[2..], &out);
        }
        let _ = socket.send_to(&out, src).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stale_answer_is_never_inserted_after_invalidation() {
        let cache = AnswerCache::default();
        let g = cache.generation();
        cache.invalidate(); // an update lands while the answer is computed
        cache.insert(g, b"key", b"old answer");
        assert!(cache.get(b"key").is_none());
        let g = cache.generation();
        cache.insert(g, b"key", b"new answer");
        assert_eq!(&*cache.get(b"key").expect("cached"), b"new answer");
        cache.invalidate();
        assert!(cache.get(b"key").is_none());
    }

    #[test]
    fn only_plain_queries_and_whole_answers_are_cacheable() {
        let mut q = vec![0u8; 12];
        q[5] = 1; // QDCOUNT 1
        assert!(cacheable_request(&q));
        let mut update = q.clone();
        update[2] = 5 << 3;
        assert!(!cacheable_request(&update));
        let mut two = q.clone();
        two[5] = 2;
        assert!(!cacheable_request(&two));
        let mut a = vec![0u8; 12];
        a[2] = 0x80;
        assert!(cacheable_answer(&a));
        a[2] |= 0x02; // TC
        assert!(!cacheable_answer(&a));
        a[2] = 0x80;
        a[3] = 2; // SERVFAIL
        assert!(!cacheable_answer(&a));
        assert_eq!(formerr(&q)[3], 1);
    }
}
