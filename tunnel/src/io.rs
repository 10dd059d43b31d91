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

use std::io::Read as _;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::unix::AsyncFd;
use tokio::net::UdpSocket;

use crate::encap::{self, Kind, Via};
use crate::flow::FlowTable;
use crate::packet::{DropReason, Inner};
use crate::{icmp, mss};

/// Outer IPv4 + IP-in-IP header bytes; FOU adds a UDP header.
pub fn overhead(kind: Kind) -> u16 {
    match kind {
        Kind::Ipip => 20,
        Kind::Fou { .. } => 28,
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
    pub largest_encapsulated: u64,
    pub drops: std::collections::BTreeMap<&'static str, u64>,
    pub flows: usize,
    pub live_flows: usize,
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

fn raw_socket(proto: u8, local: IpAddr) -> std::io::Result<AsyncFd<Socket>> {
    let domain = if local.is_ipv6() {
        Domain::IPV6
    } else {
        Domain::IPV4
    };
    let s = Socket::new(domain, Type::RAW, Some(Protocol::from(i32::from(proto))))?;
    s.bind(&SocketAddr::new(local, 0).into())?;
    allow_fragmentation(&s, local.is_ipv6())?;
    s.set_nonblocking(true)?;
    // SAFETY: the socket owns its fd, which stays open and the same until the
    // AsyncFd (which owns the socket) is dropped.
    unsafe { AsyncFd::register(s) }.map_err(|e| std::io::Error::other(e.to_string()))
}

/// Creates TUN device `name` (IP packets, no packet-information header)
/// with `mtu`, brings it up and sets loose reverse-path filtering on it
/// (packets written to it come from anywhere; strict filtering would drop
/// what we deliver). Needs CAP_NET_ADMIN.
pub fn open_tun(name: &str, mtu: u16) -> anyhow::Result<tun::AsyncDevice> {
    use anyhow::Context as _;
    let mut tc = tun::Configuration::default();
    tc.tun_name(name).mtu(mtu).up();
    let tun = tun::create_as_async(&tc).with_context(|| {
        format!("cannot create TUN device {name} (run as root; is /dev/net/tun there?)")
    })?;
    let rp = format!("/proc/sys/net/ipv4/conf/{name}/rp_filter");
    std::fs::write(&rp, "2").with_context(|| format!("cannot write {rp}"))?;
    Ok(tun)
}

/// Raw IP-in-IP sockets: protocol 4 (IPv4 inside) and 41 (IPv6 inside),
/// over an IPv4 or IPv6 outer address, fragmentation allowed.
pub struct RawTunnel {
    v4: AsyncFd<Socket>,
    v6: AsyncFd<Socket>,
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

    /// Sends `inner` to `peer`; the kernel adds the outer header.
    pub async fn send(&self, inner: &Inner<'_>, peer: IpAddr) -> std::io::Result<()> {
        let sock = if inner.is_v4() { &self.v4 } else { &self.v6 };
        send_raw(sock, inner.bytes, SocketAddr::new(peer, 0)).await
    }

    /// The next packet out of the tunnel, checked ([`encap::decapsulate`]).
    /// An IPv4 raw socket delivers the outer header, an IPv6 one only the
    /// payload (and the source as the sender's address).
    pub async fn recv<'b>(
        &self,
        buf: &'b mut [u8],
        peers: &[IpAddr],
    ) -> std::io::Result<Result<Inner<'b>, DropReason>> {
        loop {
            let (mut guard, proto) = tokio::select! {
                g = self.v4.readable() => (g?, encap::PROTO_IPV4),
                g = self.v6.readable() => (g?, encap::PROTO_IPV6),
            };
            if !self.outer_v6 {
                match guard.try_io(|s| s.get_ref().read(buf)) {
                    Ok(r) => {
                        let n = r?;
                        return Ok(encap::decapsulate_ipv4_packet(peers, &buf[..n]));
                    }
                    Err(_would_block) => continue,
                }
            }
            // SAFETY: initialised bytes viewed as MaybeUninit<u8>: same
            // layout, and recv_from only writes into them.
            let uninit = unsafe { &mut *(buf as *mut [u8] as *mut [std::mem::MaybeUninit<u8>]) };
            match guard.try_io(|s| s.get_ref().recv_from(uninit)) {
                Ok(r) => {
                    let (n, from) = r?;
                    let Some(src) = from.as_socket().map(|a| a.ip()) else {
                        return Ok(Err(DropReason::OuterMalformed));
                    };
                    return Ok(encap::decapsulate(
                        peers,
                        src,
                        Via::IpProto(proto),
                        &buf[..n],
                    ));
                }
                Err(_would_block) => continue,
            }
        }
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

/// The outside of a tunnel: raw IP-in-IP sockets, or a FOU UDP socket.
pub enum Outer {
    Raw(RawTunnel),
    Fou { sock: UdpSocket, port: u16 },
}

impl Outer {
    /// Opens the sockets for `kind` on `local`.
    pub fn open(kind: Kind, local: IpAddr) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        Ok(match kind {
            Kind::Ipip => Outer::Raw(RawTunnel::open(local)?),
            Kind::Fou { port } => {
                let std = std::net::UdpSocket::bind(SocketAddr::new(local, port))
                    .with_context(|| format!("cannot bind FOU port {local}:{port}"))?;
                allow_fragmentation(&std, local.is_ipv6())?;
                std.set_nonblocking(true)?;
                Outer::Fou {
                    sock: UdpSocket::from_std(std)?,
                    port,
                }
            }
        })
    }

    /// Sends `inner` to `peer`.
    pub async fn send(&self, inner: &Inner<'_>, peer: IpAddr) -> std::io::Result<()> {
        match self {
            Outer::Raw(raw) => raw.send(inner, peer).await,
            Outer::Fou { sock, port } => sock
                .send_to(inner.bytes, SocketAddr::new(peer, *port))
                .await
                .map(|_| ()),
        }
    }

    /// The next packet out of the tunnel, checked against `peers`.
    pub async fn recv<'b>(
        &self,
        buf: &'b mut [u8],
        peers: &[IpAddr],
    ) -> std::io::Result<Result<Inner<'b>, DropReason>> {
        match self {
            Outer::Raw(raw) => raw.recv(buf, peers).await,
            Outer::Fou { sock, .. } => {
                let (n, from) = sock.recv_from(buf).await?;
                Ok(encap::decapsulate(
                    peers,
                    from.ip(),
                    Via::Fou { ipproto: None },
                    &buf[..n],
                ))
            }
        }
    }
}

/// A running userspace tunnel endpoint.
pub struct Pipe {
    pub config: PipeConfig,
    pub counters: Arc<Counters>,
    pub flows: Arc<Mutex<FlowTable>>,
    tun: tun::AsyncDevice,
    outer: Outer,
    icmp: Option<IcmpSender>,
    started: Instant,
}

impl Pipe {
    /// Creates the TUN device and the outer sockets (needs CAP_NET_ADMIN and
    /// CAP_NET_RAW). Routes into the TUN device are the caller's.
    pub fn open(config: PipeConfig) -> anyhow::Result<Self> {
        let tun = open_tun(&config.tun, config.path_mtu)?;
        let outer = Outer::open(config.kind, config.local)?;
        let icmp = if config.signal_pmtu {
            Some(
                IcmpSender::open()
                    .map_err(|e| anyhow::anyhow!("cannot open raw ICMP sockets: {e}"))?,
            )
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
            started: Instant::now(),
        })
    }

    pub fn snapshot(&self) -> CountersSnapshot {
        snapshot(&self.counters, Some(&self.flows))
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Moves packets both ways until an I/O error.
    pub async fn run(&self) -> std::io::Result<()> {
        tokio::try_join!(self.inbound_loop(), self.outbound_loop()).map(|_| ())
    }

    /// TUN → tunnel.
    async fn outbound_loop(&self) -> std::io::Result<()> {
        let mut buf = vec![0u8; 65_536];
        let tunnel_mtu = self
            .config
            .path_mtu
            .saturating_sub(overhead(self.config.kind));
        loop {
            let n = self.tun.recv(&mut buf).await?;
            let pkt = &mut buf[..n];
            if self.config.clamp_mss {
                let ipv6 = pkt.first().is_some_and(|b| b >> 4 == 6);
                if mss::clamp(pkt, mss::mss_for(tunnel_mtu, ipv6)).is_some() {
                    self.counters.mss_clamped.fetch_add(1, Ordering::Relaxed);
                }
            }
            let Some(inner) = self.counters.admit(Inner::parse(pkt)) else {
                continue;
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
                    continue;
                }
            }
            if let Ok(mut f) = self.flows.lock() {
                f.observe(&inner, self.now_ms());
            }
            tracing::trace!(src = %inner.src, dst = %inner.dst, proto = inner.proto, len = inner.bytes.len(), "into the tunnel");
            let sent = self.outer.send(&inner, self.config.peer).await;
            match sent {
                Ok(()) => self.counters.encapsulated(inner.bytes.len()),
                // a transient send error (no route yet, buffer full) loses
                // one packet, as a router would; keep the loop alive
                Err(e) => tracing::debug!(error = %e, "cannot send into the tunnel"),
            }
        }
    }

    /// Tunnel → TUN.
    async fn inbound_loop(&self) -> std::io::Result<()> {
        let mut peers: Vec<IpAddr> = vec![self.config.peer];
        peers.extend(self.config.extra_peers.iter().copied());
        let mut buf = vec![0u8; 65_536];
        loop {
            let res = self.outer.recv(&mut buf, &peers).await?;
            self.deliver(res).await?;
        }
    }

    async fn deliver(&self, res: Result<Inner<'_>, DropReason>) -> std::io::Result<()> {
        let Some(inner) = self.counters.admit(res) else {
            return Ok(());
        };
        if !self.config.deliver.is_empty()
            && !self.config.deliver.iter().any(|p| in_prefix(inner.dst, *p))
        {
            self.counters.dropped(DropReason::UnregisteredDestination);
            return Ok(());
        }
        if let Ok(mut f) = self.flows.lock() {
            f.observe(&inner, self.now_ms());
        }
        tracing::trace!(src = %inner.src, dst = %inner.dst, proto = inner.proto, len = inner.bytes.len(), "out of the tunnel");
        self.tun.send(inner.bytes).await?;
        self.counters.decapsulated(inner.bytes.len());
        Ok(())
    }
}

async fn send_raw(sock: &AsyncFd<Socket>, bytes: &[u8], to: SocketAddr) -> std::io::Result<()> {
    let to = socket2::SockAddr::from(to);
    loop {
        let mut guard = sock.writable().await?;
        match guard.try_io(|s| s.get_ref().send_to(bytes, &to)) {
            Ok(r) => return r.map(|_| ()),
            Err(_would_block) => continue,
        }
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
        largest_encapsulated: get(&counters.largest_encapsulated),
        drops: DropReason::ALL
            .iter()
            .zip(counters.drops.iter())
            .map(|(d, c)| (d.as_str(), get(c)))
            .collect(),
        flows: n,
        live_flows: live,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
