//! The I/O shell around the data plane: a TUN device on the inside, raw
//! sockets (IP protocols 4 and 41) or a FOU UDP socket on the outside.
//! Everything decided per packet is in the sans-I/O modules; this file only
//! moves bytes and counts.
//!
//! Outer sockets have path-MTU discovery off (`IP_PMTUDISC_DONT`): an outer
//! packet larger than the path is fragmented by the kernel and reassembled
//! by the far kernel before our raw/UDP socket sees it. So full-size segments
//! of connections opened before the switch cross the tunnel whole, with no
//! ICMP needed (RFC 4459 §3.1). Outer addresses may be IPv4 or IPv6.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::coalesce::Coalescer;
use crate::encap::{self, Kind, Via};
use crate::fastpath::{self, FastPath};
use crate::flow::{FlowTable, Observer};
use crate::packet::{DropReason, Inner};
use crate::poll::{wait_for, Idle};
use crate::tundev::{self, RecvBatch, Tun};
use crate::{icmp, mmsg, mss};

/// Outer header bytes: the outer IP header (IPv4 or IPv6, as the outer
/// address `local` is), and a UDP header for FOU.
pub fn overhead(kind: Kind, local: IpAddr) -> u16 {
    let ip = if local.is_ipv6() { 40 } else { 20 };
    match kind {
        Kind::Ipip => ip,
        Kind::Fou { .. } => ip + 8,
    }
}

#[derive(Debug, Clone)]
pub struct PipeConfig {
    /// TUN device to create (its MTU is `path_mtu`).
    pub tun: String,
    pub local: IpAddr,
    /// Where encapsulated packets go.
    pub peer: IpAddr,
    /// Outer sources accepted (the peer is always accepted).
    pub extra_peers: Vec<IpAddr>,
    pub kind: Kind,
    /// MTU of the path between the gateways.
    pub path_mtu: u16,
    /// Lower the MSS of SYNs entering the tunnel to fit it.
    pub clamp_mss: bool,
    /// For DF packets that do not fit: send ICMP "fragmentation needed"
    /// instead of relying on outer fragmentation.
    pub signal_pmtu: bool,
    /// Inner destinations allowed out of the tunnel (address, prefix);
    /// empty: any.
    pub deliver: Vec<(IpAddr, u8)>,
    /// How long the data-plane thread keeps polling after the last packet
    /// before it sleeps ([`crate::poll`]); zero: sleep at once.
    pub spin: Duration,
    /// Carry bulk TCP in the kernel ([`crate::fastpath`]); the rest still
    /// comes through here.
    pub fast_path: bool,
}

/// Counters, readable while the pipe runs.
#[derive(Default)]
pub struct Counters {
    pub encapsulated_packets: AtomicU64,
    pub encapsulated_bytes: AtomicU64,
    pub decapsulated_packets: AtomicU64,
    pub decapsulated_bytes: AtomicU64,
    pub mss_clamped: AtomicU64,
    pub icmp_too_big: AtomicU64,
    /// TCP super-packets from the TUN device cut into smaller segments
    /// than their sender's, to fit the tunnel.
    pub resegmented: AtomicU64,
    /// The largest inner packet sent into the tunnel.
    pub largest_encapsulated: AtomicU64,
    drops: [AtomicU64; DropReason::ALL.len()],
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct CountersSnapshot {
    pub encapsulated_packets: u64,
    pub encapsulated_bytes: u64,
    pub decapsulated_packets: u64,
    pub decapsulated_bytes: u64,
    pub mss_clamped: u64,
    pub icmp_too_big: u64,
    pub resegmented: u64,
    pub largest_encapsulated: u64,
    pub drops: std::collections::BTreeMap<&'static str, u64>,
    pub flows: usize,
    pub live_flows: usize,
    /// What the kernel fast path carried (already in the packet and byte
    /// totals above); None when it is off. The flow counts only know the
    /// packets that came through userspace.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fast_path: Option<fastpath::Stats>,
}

impl CountersSnapshot {
    /// Adds what the kernel fast path carried to the totals, and reports
    /// it apart too.
    pub fn add_fast_path(&mut self, k: fastpath::Stats) {
        self.encapsulated_packets += k.encap_packets;
        self.encapsulated_bytes += k.encap_bytes;
        self.decapsulated_packets += k.decap_packets;
        self.decapsulated_bytes += k.decap_bytes;
        self.fast_path = Some(k);
    }
}

impl Counters {
    /// One inner packet of `len` bytes sent into the tunnel.
    pub fn encapsulated(&self, len: usize) {
        self.encapsulated_packets.fetch_add(1, Ordering::Relaxed);
        self.encapsulated_bytes
            .fetch_add(len as u64, Ordering::Relaxed);
        self.largest_encapsulated
            .fetch_max(len as u64, Ordering::Relaxed);
    }

    /// A batch handed to [`Outer::send`]: all but the `refused` positions
    /// went into the tunnel.
    pub fn sent(&self, pkts: &[(&[u8], IpAddr)], refused: &[usize]) {
        for (i, (p, _)) in pkts.iter().enumerate() {
            if refused.contains(&i) {
                self.dropped(DropReason::Refused);
            } else {
                self.encapsulated(p.len());
            }
        }
    }

    /// One inner packet of `len` bytes delivered out of the tunnel.
    pub fn decapsulated(&self, len: usize) {
        self.decapsulated_packets.fetch_add(1, Ordering::Relaxed);
        self.decapsulated_bytes
            .fetch_add(len as u64, Ordering::Relaxed);
    }

    /// The packet, if it may be forwarded; otherwise its drop is counted
    /// (malformed, foreign, or link-local traffic no router forwards).
    pub fn admit<'a>(&self, res: Result<Inner<'a>, DropReason>) -> Option<Inner<'a>> {
        match res {
            Ok(i) if i.forwardable() => Some(i),
            Ok(_) => {
                self.dropped(DropReason::LinkLocal);
                None
            }
            Err(why) => {
                self.dropped(why);
                None
            }
        }
    }

    pub fn dropped(&self, why: DropReason) {
        if let Some(i) = DropReason::ALL.iter().position(|d| *d == why) {
            self.drops[i].fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn in_prefix(addr: IpAddr, (net, len): (IpAddr, u8)) -> bool {
    match (addr, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let len = u32::from(len.min(32));
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let len = u32::from(len.min(128));
            let mask = if len == 0 {
                0
            } else {
                u128::MAX << (128 - len)
            };
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

/// Path-MTU discovery off (`IP_PMTUDISC_DONT` / `IPV6_PMTUDISC_DONT`): the
/// kernel may fragment what we send.
fn allow_fragmentation(fd: &impl AsRawFd, ipv6: bool) -> std::io::Result<()> {
    let (level, name, value) = if ipv6 {
        (
            libc::IPPROTO_IPV6,
            libc::IPV6_MTU_DISCOVER,
            libc::IPV6_PMTUDISC_DONT,
        )
    } else {
        (
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            libc::IP_PMTUDISC_DONT,
        )
    };
    let value: libc::c_int = value;
    // SAFETY: a valid socket fd, a pointer to a live c_int and its size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Socket buffers that absorb a burst (a 64 KiB super-packet is 45
/// packets; the default 208 KiB receive buffer overflows while the reader
/// is busy writing into the TUN device, and every drop costs a TCP flow a
/// retransmission). The kernel caps the size at `net.core.rmem_max` /
/// `wmem_max`; a smaller buffer still works.
fn deep_buffers(s: &Socket) {
    const SIZE: usize = 4 << 20;
    if let Err(e) = s.set_recv_buffer_size(SIZE) {
        tracing::debug!(error = %e, "cannot enlarge the receive buffer");
    }
    if let Err(e) = s.set_send_buffer_size(SIZE) {
        tracing::debug!(error = %e, "cannot enlarge the send buffer");
    }
}

fn raw_socket(proto: u8, local: IpAddr) -> std::io::Result<Socket> {
    let domain = if local.is_ipv6() {
        Domain::IPV6
    } else {
        Domain::IPV4
    };
    let s = Socket::new(domain, Type::RAW, Some(Protocol::from(i32::from(proto))))?;
    s.bind(&SocketAddr::new(local, 0).into())?;
    allow_fragmentation(&s, local.is_ipv6())?;
    deep_buffers(&s);
    s.set_nonblocking(true)?;
    Ok(s)
}

/// Raw IP-in-IP sockets: protocol 4 (IPv4 inside) and 41 (IPv6 inside),
/// over an IPv4 or IPv6 outer address, fragmentation allowed.
pub struct RawTunnel {
    v4: Socket,
    v6: Socket,
    outer_v6: bool,
}

impl RawTunnel {
    pub fn open(local: IpAddr) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        Ok(Self {
            v4: raw_socket(encap::PROTO_IPV4, local)
                .context("cannot open a raw socket for protocol 4 (needs CAP_NET_RAW)")?,
            v6: raw_socket(encap::PROTO_IPV6, local)
                .context("cannot open a raw socket for protocol 41 (needs CAP_NET_RAW)")?,
            outer_v6: local.is_ipv6(),
        })
    }
}

/// Sends the ICMP errors built by [`icmp::too_big`] as locally originated
/// packets. (Written into the TUN device they would be dropped: their
/// source is one of this host's addresses, a "martian" on input.)
pub struct IcmpSender {
    v4: Socket,
    v6: Socket,
}

impl IcmpSender {
    pub fn open() -> std::io::Result<Self> {
        // IPPROTO_RAW: the packet carries its own IPv4 header
        let v4 = Socket::new(
            Domain::IPV4,
            Type::RAW,
            Some(Protocol::from(libc::IPPROTO_RAW)),
        )?;
        // ICMPv6: the kernel adds the IPv6 header and the checksum
        let v6 = Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6))?;
        v4.set_nonblocking(true)?;
        v6.set_nonblocking(true)?;
        Ok(Self { v4, v6 })
    }

    /// Sends a complete ICMP or ICMPv6 error packet (IP header included).
    /// A full send buffer drops it: ICMP errors are best effort.
    pub fn send(&self, packet: &[u8]) -> std::io::Result<()> {
        let Ok(p) = Inner::parse(packet) else {
            return Err(std::io::Error::other("not an IP packet"));
        };
        let to = SocketAddr::new(p.dst, 0);
        let sent = if p.is_v4() {
            self.v4.send_to(packet, &to.into())
        } else {
            self.v6.send_to(&packet[40..], &to.into())
        };
        match sent {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
            r => r.map(|_| ()),
        }
    }
}

/// The outside of a tunnel: raw IP-in-IP sockets, or a FOU UDP socket,
/// non-blocking. Packets go and come in batches (`sendmmsg`, `recvmmsg`).
pub enum Outer {
    Raw(RawTunnel),
    Fou {
        sock: std::net::UdpSocket,
        port: u16,
        /// Packets up to this size go out as UDP GSO trains (one message
        /// per run of equal-size packets; the kernel cuts it into the same
        /// datagrams it would send one by one); 0: off.
        gso_max: usize,
    },
}

/// Encapsulated packets received in one go, for [`Outer::recv`].
#[derive(Default)]
pub struct OuterBatch {
    bufs: mmsg::RecvBufs,
    /// The packets: (buffer, offset, length); a UDP GRO buffer holds several.
    segs: Vec<(usize, usize, usize)>,
    /// How they were received (which decapsulation applies).
    via: Received,
}

#[derive(Default, Clone, Copy)]
enum Received {
    /// A raw IPv4 socket: the outer header is in the buffer.
    #[default]
    RawV4,
    /// A raw IPv6 socket of this protocol: only the payload is.
    RawV6(u8),
    Fou,
}

impl OuterBatch {
    pub fn len(&self) -> usize {
        self.segs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.segs.is_empty()
    }

    /// Bytes of all the packets.
    pub fn bytes(&self) -> usize {
        self.segs.iter().map(|s| s.2).sum()
    }

    /// Lists the packets of the `n` buffers just received.
    fn split(&mut self, n: usize) {
        self.segs.clear();
        let b = &self.bufs;
        for i in 0..n {
            let (len, gro) = (b.lens[i], b.gro[i]);
            if gro == 0 || gro >= len {
                self.segs.push((i, 0, len));
                continue;
            }
            let mut off = 0;
            while off < len {
                let l = gro.min(len - off);
                self.segs.push((i, off, l));
                off += l;
            }
        }
    }

    /// Packet `i` out of the tunnel, checked ([`encap::decapsulate`]): its
    /// outer source must be one of `peers`.
    pub fn decapsulate(&self, i: usize, peers: &[IpAddr]) -> Result<Inner<'_>, DropReason> {
        let b = &self.bufs;
        let (i, off, len) = self.segs[i];
        if b.truncated[i] {
            return Err(DropReason::OuterMalformed);
        }
        let bytes = &b.bufs[i][off..off + len];
        match (self.via, b.from[i]) {
            (Received::RawV4, _) => encap::decapsulate_ipv4_packet(peers, bytes),
            (Received::RawV6(proto), Some(src)) => {
                encap::decapsulate(peers, src, Via::IpProto(proto), bytes)
            }
            (Received::Fou, Some(src)) => {
                encap::decapsulate(peers, src, Via::Fou { ipproto: None }, bytes)
            }
            (_, None) => Err(DropReason::OuterMalformed),
        }
    }
}

impl Outer {
    /// Opens the sockets for `kind` on `local`; `path_mtu` is the MTU of
    /// the path to the peers (FOU sends trains of packets that fit it whole).
    pub fn open(kind: Kind, local: IpAddr, path_mtu: u16) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        Ok(match kind {
            Kind::Ipip => Outer::Raw(RawTunnel::open(local)?),
            Kind::Fou { port } => {
                let std = std::net::UdpSocket::bind(SocketAddr::new(local, port))
                    .with_context(|| format!("cannot bind FOU port {local}:{port}"))?;
                allow_fragmentation(&std, local.is_ipv6())?;
                let std: std::net::UdpSocket = {
                    let s = Socket::from(std);
                    deep_buffers(&s);
                    s.into()
                };
                std.set_nonblocking(true)?;
                let outer_header = if local.is_ipv6() { 40 } else { 20 } + 8;
                let gso_max = if mmsg::gso_supported(std.as_raw_fd()) {
                    usize::from(path_mtu).saturating_sub(outer_header)
                } else {
                    0
                };
                if !mmsg::enable_gro(std.as_raw_fd()) {
                    tracing::debug!("no UDP GRO on this kernel: one datagram per read");
                }
                Outer::Fou {
                    sock: std,
                    port,
                    gso_max,
                }
            }
        })
    }

    /// The sockets' descriptors, to wait on.
    pub fn fds(&self) -> Vec<RawFd> {
        match self {
            Outer::Raw(raw) => vec![raw.v4.as_raw_fd(), raw.v6.as_raw_fd()],
            Outer::Fou { sock, .. } => vec![sock.as_raw_fd()],
        }
    }

    /// Sends each inner packet to its peer gateway, waiting while the send
    /// buffer is full. The positions of those the kernel refused (no route,
    /// say) go to `refused`; a router loses such a packet too, so that is
    /// not an error. Errors: the sockets failed.
    pub fn send(&self, pkts: &[(&[u8], IpAddr)], refused: &mut Vec<usize>) -> std::io::Result<()> {
        match self {
            Outer::Raw(raw) => {
                // IPv4 inside goes through the protocol-4 socket, IPv6 the 41 one
                for (sock, v4) in [(&raw.v4, true), (&raw.v6, false)] {
                    let (idx, group): (Vec<usize>, Vec<(&[u8], SockAddr)>) = pkts
                        .iter()
                        .enumerate()
                        .filter(|(_, (b, _))| (b.first().map(|x| x >> 4) == Some(4)) == v4)
                        .map(|(i, (b, peer))| (i, (*b, mmsg::to(*peer, 0))))
                        .unzip();
                    let singles: Vec<std::ops::Range<usize>> =
                        (0..group.len()).map(|i| i..i + 1).collect();
                    send_all(sock.as_raw_fd(), &group, &singles, |at| {
                        refused.push(idx[at]);
                    })?;
                }
                Ok(())
            }
            Outer::Fou {
                sock,
                port,
                gso_max,
            } => {
                let group: Vec<(&[u8], SockAddr)> = pkts
                    .iter()
                    .map(|(b, peer)| (*b, mmsg::to(*peer, *port)))
                    .collect();
                let trains = trains(pkts, *gso_max);
                send_all(sock.as_raw_fd(), &group, &trains, |at| {
                    refused.extend(trains[at].clone());
                })
            }
        }
    }

    /// The encapsulated packets waiting, into `b`: false when there are
    /// none.
    pub fn try_recv(&self, b: &mut OuterBatch) -> std::io::Result<bool> {
        let attempt = |fd: RawFd, b: &mut OuterBatch| match mmsg::recv(fd, &mut b.bufs) {
            Ok(n) => {
                b.split(n);
                Ok(n > 0)
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                ) =>
            {
                Ok(false)
            }
            Err(e) => Err(e),
        };
        match self {
            Outer::Raw(raw) => {
                for (sock, proto) in [(&raw.v4, encap::PROTO_IPV4), (&raw.v6, encap::PROTO_IPV6)] {
                    b.via = if raw.outer_v6 {
                        Received::RawV6(proto)
                    } else {
                        Received::RawV4
                    };
                    if attempt(sock.as_raw_fd(), b)? {
                        return Ok(true);
                    }
                }
                Ok(false)
            }
            Outer::Fou { sock, .. } => {
                b.via = Received::Fou;
                attempt(sock.as_raw_fd(), b)
            }
        }
    }
}

/// Sends every group of `pkts` on `fd` ([`mmsg::send_groups`]), waiting
/// for room in the send buffer when it is full; `refused(k)` for each group
/// the kernel refused.
fn send_all(
    fd: RawFd,
    pkts: &[(&[u8], SockAddr)],
    groups: &[std::ops::Range<usize>],
    mut refused: impl FnMut(usize),
) -> std::io::Result<()> {
    let mut errs = Vec::new();
    let mut done = 0;
    while done < groups.len() {
        let start = done;
        match mmsg::send_groups(fd, pkts, &groups[start..], &mut errs) {
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                wait_for(&[fd], libc::POLLOUT, -1)?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
        for (at, e) in errs.drain(..) {
            tracing::debug!(error = %e, "cannot send into the tunnel");
            refused(start + at);
        }
    }
    Ok(())
}

/// A data plane's loop, on the calling thread, until an I/O error: a batch
/// from each side per pass, `outbound` for the TUN device's, `inbound` for
/// the tunnel's; between passes it waits ([`Idle`]: polling for `spin`
/// after a light pass, then asleep until a descriptor has input).
pub fn drive(
    tun: &Tun,
    outer: &Outer,
    spin: Duration,
    counters: &Counters,
    mut outbound: impl FnMut(&mut RecvBatch) -> std::io::Result<()>,
    mut inbound: impl FnMut(&OuterBatch) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let mut fds = vec![tun.fd()];
    fds.extend(outer.fds());
    let mut idle = Idle::new(spin, &fds);
    let (mut from_tun, mut from_outer) = (tun.recv_batch(), OuterBatch::default());
    let mut moved = 0;
    loop {
        idle.wait(moved)?;
        moved = 0;
        if idle.ready(0) && tun.try_recv(&mut from_tun)? {
            if from_tun.resegmented {
                counters.resegmented.fetch_add(1, Ordering::Relaxed);
            }
            if from_tun.malformed {
                counters.dropped(DropReason::InnerMalformed);
            }
            moved += from_tun.bytes();
            outbound(&mut from_tun)?;
        }
        if (1..fds.len()).any(|i| idle.ready(i)) && outer.try_recv(&mut from_outer)? {
            moved += from_outer.bytes();
            inbound(&from_outer)?;
        }
    }
}

/// Runs of packets that can go as one UDP GSO message: the same peer, the
/// same size (the last may be shorter), each no larger than `max`, at most
/// 64 and 64 KB in all. With `max` 0, one packet per run.
fn trains(pkts: &[(&[u8], IpAddr)], max: usize) -> Vec<std::ops::Range<usize>> {
    const SEGMENTS: usize = 64;
    const BYTES: usize = 65_000;
    let mut out = Vec::new();
    let mut i = 0;
    while i < pkts.len() {
        let (first, peer) = (pkts[i].0.len(), pkts[i].1);
        let (mut j, mut total) = (i + 1, first);
        if first <= max {
            while j < pkts.len() && j - i < SEGMENTS {
                let (len, p) = (pkts[j].0.len(), pkts[j].1);
                if p != peer || len > first || len == 0 || total + len > BYTES {
                    break;
                }
                total += len;
                j += 1;
                if len < first {
                    break;
                }
            }
        }
        out.push(i..j);
        i = j;
    }
    out
}

/// A running userspace tunnel endpoint.
pub struct Pipe {
    pub config: PipeConfig,
    pub counters: Arc<Counters>,
    pub flows: Arc<Mutex<FlowTable>>,
    tun: Tun,
    outer: Outer,
    icmp: Option<IcmpSender>,
    fast: Option<FastPath>,
    started: Instant,
}

impl Pipe {
    /// Creates the TUN device and the outer sockets (needs CAP_NET_ADMIN and
    /// CAP_NET_RAW). Routes into the TUN device are the caller's.
    pub fn open(config: PipeConfig) -> anyhow::Result<Self> {
        let mut tun = tundev::open(&config.tun, config.path_mtu)?;
        let tunnel_mtu = config
            .path_mtu
            .saturating_sub(overhead(config.kind, config.local));
        if !config.signal_pmtu {
            // fragment only what cannot be cut finer
            tun.resegment(Some(tunnel_mtu));
        }
        let outer = Outer::open(config.kind, config.local, config.path_mtu)?;
        let icmp = if config.signal_pmtu {
            Some(
                IcmpSender::open()
                    .map_err(|e| anyhow::anyhow!("cannot open raw ICMP sockets: {e}"))?,
            )
        } else {
            None
        };
        let fast = if config.fast_path {
            Some(FastPath::attach(&fastpath::Settings {
                tun: config.tun.clone(),
                local: config.local,
                peer: config.peer,
                extra_peers: config.extra_peers.clone(),
                fou_port: match config.kind {
                    Kind::Fou { port } => Some(port),
                    Kind::Ipip => None,
                },
                max_plain: tunnel_mtu,
                deliver: config.deliver.clone(),
                gateway: false,
                signal_pmtu: config.signal_pmtu,
            })?)
        } else {
            None
        };
        Ok(Self {
            config,
            counters: Arc::new(Counters::default()),
            flows: Arc::new(Mutex::new(FlowTable::default())),
            tun,
            outer,
            icmp,
            fast,
            started: Instant::now(),
        })
    }

    /// The counters, the kernel fast path's included.
    pub fn snapshot(&self) -> CountersSnapshot {
        let mut s = snapshot(&self.counters, Some(&self.flows));
        if let Some(f) = &self.fast {
            s.add_fast_path(f.stats());
        }
        s
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Moves packets both ways until an I/O error, on the calling thread
    /// ([`drive`]).
    pub fn run(&self) -> std::io::Result<()> {
        let mut peers: Vec<IpAddr> = vec![self.config.peer];
        peers.extend(self.config.extra_peers.iter().copied());
        let (mut keep, mut refused) = (Vec::new(), Vec::new());
        drive(
            &self.tun,
            &self.outer,
            self.config.spin,
            &self.counters,
            |rx| self.outbound_batch(rx, &mut keep, &mut refused),
            |rx| self.inbound_batch(rx, &peers),
        )
    }

    /// TUN → tunnel.
    fn outbound_batch(
        &self,
        rx: &mut RecvBatch,
        keep: &mut Vec<usize>,
        refused: &mut Vec<usize>,
    ) -> std::io::Result<()> {
        keep.clear();
        let now = self.now_ms();
        let mut flows = self.flows.lock().unwrap_or_else(|p| p.into_inner());
        let mut seen = Observer::default();
        for i in 0..rx.len() {
            if self.outbound(rx.packet_mut(i), &mut flows, &mut seen, now) {
                keep.push(i);
            }
        }
        seen.flush(&mut flows, now);
        drop(flows);
        let pkts: Vec<(&[u8], IpAddr)> = keep
            .iter()
            .map(|&i| (rx.packet(i), self.config.peer))
            .collect();
        refused.clear();
        self.outer.send(&pkts, refused)?;
        self.counters.sent(&pkts, refused);
        Ok(())
    }

    /// Decides about one packet from the TUN device: true to send it into
    /// the tunnel (clamped), false when dropped or answered with ICMP.
    fn outbound(
        &self,
        pkt: &mut [u8],
        flows: &mut FlowTable,
        seen: &mut Observer,
        now: u64,
    ) -> bool {
        let tunnel_mtu = self
            .config
            .path_mtu
            .saturating_sub(overhead(self.config.kind, self.config.local));
        if self.config.clamp_mss {
            let ipv6 = pkt.first().is_some_and(|b| b >> 4 == 6);
            if mss::clamp(pkt, mss::mss_for(tunnel_mtu, ipv6)).is_some() {
                self.counters.mss_clamped.fetch_add(1, Ordering::Relaxed);
            }
        }
        let Some(inner) = self.counters.admit(Inner::parse(pkt)) else {
            return false;
        };
        if self.config.signal_pmtu && inner.bytes.len() > usize::from(tunnel_mtu) {
            if let (Some(err), Some(sender)) = (
                icmp::too_big(&inner, tunnel_mtu, self.config.local),
                &self.icmp,
            ) {
                self.counters.icmp_too_big.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = sender.send(&err) {
                    tracing::debug!(error = %e, "cannot send ICMP too-big");
                }
                return false;
            }
        }
        seen.observe(flows, &inner, now);
        tracing::trace!(src = %inner.src, dst = %inner.dst, proto = inner.proto, len = inner.bytes.len(), "into the tunnel");
        true
    }

    /// Tunnel → TUN.
    fn inbound_batch(&self, rx: &OuterBatch, peers: &[IpAddr]) -> std::io::Result<()> {
        let mut tx = Coalescer::new();
        let now = self.now_ms();
        let mut flows = self.flows.lock().unwrap_or_else(|p| p.into_inner());
        let mut seen = Observer::default();
        for i in 0..rx.len() {
            let Some(inner) = self.counters.admit(rx.decapsulate(i, peers)) else {
                continue;
            };
            if !self.config.deliver.is_empty()
                && !self.config.deliver.iter().any(|p| in_prefix(inner.dst, *p))
            {
                self.counters.dropped(DropReason::UnregisteredDestination);
                continue;
            }
            seen.observe(&mut flows, &inner, now);
            tracing::trace!(src = %inner.src, dst = %inner.dst, proto = inner.proto, len = inner.bytes.len(), "out of the tunnel");
            tx.push(inner.bytes);
            self.counters.decapsulated(inner.bytes.len());
        }
        seen.flush(&mut flows, now);
        drop(flows);
        for _ in 0..self.tun.write(&tx)? {
            self.counters.dropped(DropReason::Refused);
        }
        Ok(())
    }
}

/// The counters, and the flow counts of `flows` when given (the gateway
/// keeps its flows per migration and reports them there).
pub fn snapshot(counters: &Counters, flows: Option<&Mutex<FlowTable>>) -> CountersSnapshot {
    let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let (n, live) = flows
        .and_then(|f| f.lock().ok().map(|f| (f.len(), f.live())))
        .unwrap_or((0, 0));
    CountersSnapshot {
        encapsulated_packets: get(&counters.encapsulated_packets),
        encapsulated_bytes: get(&counters.encapsulated_bytes),
        decapsulated_packets: get(&counters.decapsulated_packets),
        decapsulated_bytes: get(&counters.decapsulated_bytes),
        mss_clamped: get(&counters.mss_clamped),
        icmp_too_big: get(&counters.icmp_too_big),
        resegmented: get(&counters.resegmented),
        largest_encapsulated: get(&counters.largest_encapsulated),
        drops: DropReason::ALL
            .iter()
            .zip(counters.drops.iter())
            .map(|(d, c)| (d.as_str(), get(c)))
            .collect(),
        flows: n,
        live_flows: live,
        fast_path: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trains_are_runs_of_equal_packets_to_one_peer() {
        let (a, b) = (IpAddr::from([192, 0, 2, 1]), IpAddr::from([192, 0, 2, 2]));
        let (big, small, huge) = (vec![0u8; 1400], vec![0u8; 600], vec![0u8; 1600]);
        fn p(v: &[u8], peer: IpAddr) -> (&[u8], IpAddr) {
            (v, peer)
        }
        let pkts = vec![
            p(&big, a),
            p(&big, a),
            p(&small, a), // a shorter one ends the train
            p(&big, a),
            p(&big, b),  // another peer
            p(&huge, b), // too big for a train
            p(&small, b),
            p(&small, b),
        ];
        assert_eq!(trains(&pkts, 1472), vec![0..3, 3..4, 4..5, 5..6, 6..8]);
        assert_eq!(trains(&pkts, 0).len(), pkts.len());
        let many = vec![p(&small, a); 150];
        assert_eq!(trains(&many, 1472), vec![0..64, 64..128, 128..150]);
        let ranges = trains(&pkts, 1472);
        assert_eq!(ranges.iter().map(|r| r.len()).sum::<usize>(), pkts.len());
    }

    #[test]
    fn prefixes() {
        let n = (IpAddr::from([10, 1, 0, 0]), 16);
        assert!(in_prefix(IpAddr::from([10, 1, 200, 3]), n));
        assert!(!in_prefix(IpAddr::from([10, 2, 0, 3]), n));
        assert!(in_prefix(
            IpAddr::from([1, 2, 3, 4]),
            (IpAddr::from([0, 0, 0, 0]), 0)
        ));
        assert!(!in_prefix(IpAddr::from([0u16, 0, 0, 0, 0, 0, 0, 1]), n));
    }
}
