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
//! Datagrams are received and answered in batches (recvmmsg/sendmmsg), and
//! an answer is cached on its question's second miss (a flood of distinct
//! names does not churn the cache).
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
    /// Questions missed once: an answer is cached on its second miss, so a
    /// flood of never-repeated names does not churn the cache.
    doorkeeper: Mutex<std::collections::HashSet<u64>>,
    hasher: std::collections::hash_map::RandomState,
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

    /// Whether an answer for `key` should be cached: true on its second miss.
    fn admit(&self, key: &[u8]) -> bool {
        use std::hash::BuildHasher as _;
        let h = self.hasher.hash_one(key);
        let mut seen = self.doorkeeper.lock().unwrap_or_else(|p| p.into_inner());
        if seen.remove(&h) {
            return true;
        }
        if seen.len() >= MAX_ENTRIES {
            seen.clear();
        }
        seen.insert(h);
        false
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
    packet: &[u8],
    src: SocketAddr,
) -> (Option<Vec<u8>>, bool) {
    let request = match Request::from_bytes(packet.to_vec(), src, Protocol::Udp) {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(%src, error = %e, "malformed request: FORMERR");
            return (Some(formerr(packet)), false);
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
    use std::os::fd::AsRawFd as _;
    use tokio::io::Interest;
    let fd = socket.as_raw_fd();
    let mut batch = batch::Batch::new();
    let mut replies: Vec<(Vec<u8>, SocketAddr)> = Vec::with_capacity(batch::N);
    loop {
        if socket.readable().await.is_err() {
            continue;
        }
        let n = match socket.try_io(Interest::READABLE, || batch.recv(fd)) {
            Ok(n) => n,
            Err(e) => {
                // WouldBlock (another wake-up took it), or an ICMP error from
                // an earlier send: keep serving
                if e.kind() != std::io::ErrorKind::WouldBlock {
                    tracing::debug!(error = %e, "UDP receive error");
                }
                continue;
            }
        };
        replies.clear();
        for i in 0..n {
            let Some((packet, src)) = batch.get(i) else {
                continue;
            };
            // too short to be DNS, or a response (never answer those: reflection)
            if packet.len() < 12 || packet[2] & 0x80 != 0 {
                continue;
            }
            let cacheable = cacheable_request(packet);
            if cacheable {
                if let Some(hit) = cache.get(&packet[2..]) {
                    cache.hits.fetch_add(1, Ordering::Relaxed);
                    let mut out = hit.to_vec();
                    out[..2].copy_from_slice(&packet[..2]);
                    replies.push((out, src));
                    continue;
                }
                cache.misses.fetch_add(1, Ordering::Relaxed);
            }
            let generation = cache.generation();
            if (packet[2] >> 3) & 0x0f != 0 {
                // updates and notifies wait on disk: do not hold up this loop
                let (socket, handler) = (socket.clone(), handler.clone());
                let packet = packet.to_vec();
                tokio::spawn(async move {
                    if let (Some(out), _) = answer(&*handler, &packet, src).await {
                        let _ = socket.send_to(&out, src).await;
                    }
                });
                continue;
            }
            let (Some(out), signed) = answer(&*handler, packet, src).await else {
                continue;
            };
            // signed queries get signed (per-request) answers: never cached
            if cacheable && !signed && cacheable_answer(&out) && cache.admit(&packet[2..]) {
                cache.insert(generation, &packet[2..], &out);
            }
            replies.push((out, src));
        }
        let mut sent = 0;
        while sent < replies.len() {
            match socket.try_io(Interest::WRITABLE, || batch::send(fd, &replies[sent..])) {
                Ok(0) => break,
                Ok(k) => sent += k,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    // the send buffer is full: wait for room
                    let (out, to) = &replies[sent];
                    let _ = socket.send_to(out, *to).await;
                    sent += 1;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "UDP send error");
                    sent += 1; // drop that one answer, as a lost datagram
                }
            }
        }
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

/// recvmmsg/sendmmsg: up to [`batch::N`] datagrams per system call. Under
/// load most of a DNS server's time is the kernel's per-call cost; this is
/// how it is shared.
mod batch {
    use std::io;
    use std::net::SocketAddr;
    use std::os::fd::RawFd;

    pub const N: usize = 32;
    const SIZE: usize = 4096;

    /// Buffers only (no raw pointers kept), so a loop holding one stays `Send`.
    pub struct Batch {
        bufs: Vec<[u8; SIZE]>,
        addrs: Vec<libc::sockaddr_storage>,
        /// (length, flags, address length) of each datagram received.
        meta: Vec<(usize, libc::c_int, libc::socklen_t)>,
    }

    impl Batch {
        pub fn new() -> Self {
            // SAFETY: all-zero is a valid sockaddr_storage.
            let zero_addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
            Self {
                bufs: vec![[0u8; SIZE]; N],
                addrs: vec![zero_addr; N],
                meta: vec![(0, 0, 0); N],
            }
        }

        /// Receives what is waiting (non-blocking); the number of datagrams.
        pub fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
            let mut iovs: Vec<libc::iovec> = self
                .bufs
                .iter_mut()
                .map(|b| libc::iovec {
                    iov_base: b.as_mut_ptr().cast(),
                    iov_len: SIZE,
                })
                .collect();
            let mut hdrs: Vec<libc::mmsghdr> = iovs
                .iter_mut()
                .zip(self.addrs.iter_mut())
                .map(|(iov, addr)| {
                    // SAFETY: all-zero is a valid mmsghdr; fields set below.
                    let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
                    h.msg_hdr.msg_name = (addr as *mut libc::sockaddr_storage).cast();
                    h.msg_hdr.msg_namelen =
                        std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
                    h.msg_hdr.msg_iov = iov;
                    h.msg_hdr.msg_iovlen = 1;
                    h
                })
                .collect();
            // SAFETY: every header points at buffers and addresses owned by
            // self (and iovs) that outlive the call; N entries are valid.
            let n = unsafe {
                libc::recvmmsg(
                    fd,
                    hdrs.as_mut_ptr(),
                    N as libc::c_uint,
                    libc::MSG_DONTWAIT,
                    std::ptr::null_mut(),
                )
            };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let n = n as usize;
            for (m, h) in self.meta.iter_mut().zip(&hdrs).take(n) {
                *m = (
                    h.msg_len as usize,
                    h.msg_hdr.msg_flags,
                    h.msg_hdr.msg_namelen,
                );
            }
            Ok(n)
        }

        /// Datagram `i` of the last receive: its bytes and sender, or `None`
        /// when it was truncated (larger than a request can be) or the
        /// address is not IP.
        pub fn get(&self, i: usize) -> Option<(&[u8], SocketAddr)> {
            let (len, flags, namelen) = *self.meta.get(i)?;
            if flags & libc::MSG_TRUNC != 0 {
                return None;
            }
            // SAFETY: the kernel filled addrs[i], namelen bytes of it.
            let addr = unsafe { socket2::SockAddr::new(self.addrs[i], namelen) };
            Some((&self.bufs[i][..len.min(SIZE)], addr.as_socket()?))
        }
    }

    /// Sends as many of `out` as the socket takes now (non-blocking);
    /// returns how many went.
    pub fn send(fd: RawFd, out: &[(Vec<u8>, SocketAddr)]) -> io::Result<usize> {
        let addrs: Vec<socket2::SockAddr> = out
            .iter()
            .map(|(_, a)| socket2::SockAddr::from(*a))
            .collect();
        let mut iovs: Vec<libc::iovec> = out
            .iter()
            .map(|(b, _)| libc::iovec {
                iov_base: b.as_ptr() as *mut libc::c_void,
                iov_len: b.len(),
            })
            .collect();
        let mut hdrs: Vec<libc::mmsghdr> = (0..out.len())
            .map(|i| {
                // SAFETY: all-zero is a valid mmsghdr; fields set below.
                let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
                h.msg_hdr.msg_name = addrs[i].as_ptr() as *mut libc::c_void;
                h.msg_hdr.msg_namelen = addrs[i].len();
                h.msg_hdr.msg_iov = &mut iovs[i];
                h.msg_hdr.msg_iovlen = 1;
                h
            })
            .collect();
        // SAFETY: headers point at addrs/iovs/out, all alive for the call;
        // the kernel only reads the buffers.
        let n = unsafe {
            libc::sendmmsg(
                fd,
                hdrs.as_mut_ptr(),
                hdrs.len() as libc::c_uint,
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}
