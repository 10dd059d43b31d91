//! The gateway's data plane: one TUN device and the raw IP-in-IP sockets,
//! and the per-packet decisions for every migration this site takes part in.
//!
//! Old site (the VM was here), for guest address G:
//! - TUN → packets to G (host route G/32 → TUN): tunnel to the new site.
//! - tunnel → packets from G (the new site's reverse tunnel): into the TUN,
//!   the kernel routes them to the client.
//!
//! New site (the VM is here), guest G, public address P:
//! - tunnel → packets to G from the old site: into the TUN (the kernel
//!   delivers to the VM); their flow is remembered as tunnelled.
//! - TUN → packets from G (policy rule `from G iif LAN`): replies of a
//!   tunnelled flow go back through the tunnel (the routers filter source
//!   addresses: G is not routed here), and so does any TCP segment of a
//!   connection from before the move (not a SYN, in neither table); the rest
//!   leave translated to P.
//! - TUN → packets to P (host route P/32 → TUN): translated to G.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tunnel::flow::FlowTable;
use tunnel::io::{Counters, Outer};
use tunnel::packet::{DropReason, Inner, Transport};
use tunnel::{mss, nat};

/// One migration as the data plane sees it.
#[derive(Debug)]
pub enum Side {
    Old {
        peer: IpAddr,
        flows: FlowTable,
        /// Last packet in either direction (for the quiet-period drain rule).
        last_ms: u64,
    },
    New {
        peer: IpAddr,
        public: IpAddr,
        tunnelled: FlowTable,
        translated: FlowTable,
    },
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct SideStats {
    pub flows: usize,
    pub live_flows: usize,
    pub packets: u64,
    pub bytes: u64,
    pub translated_flows: usize,
}

#[derive(Default)]
pub struct Tables {
    /// Keyed by guest address (IPv4 or IPv6).
    pub sides: HashMap<IpAddr, Side>,
}

impl Tables {
    fn public_to_guest(&self, public: IpAddr) -> Option<IpAddr> {
        self.sides.iter().find_map(|(g, s)| match s {
            Side::New { public: p, .. } if *p == public => Some(*g),
            _ => None,
        })
    }

    /// Segments the kernel fast path carried for a guest's TCP flow: its
    /// flow table learns of them as if they had come through the plane
    /// (the flow stays live, and so does an old site's drain clock).
    pub fn carried(&mut self, c: &tunnel::fastpath::Carried, now_ms: u64) {
        let (from, to) = (c.from, c.to);
        let (key, forward) = tunnel::flow::FlowKey::between(6, from, to);
        for guest in [to.0, from.0] {
            match self.sides.get_mut(&guest) {
                Some(Side::Old { flows, last_ms, .. }) => {
                    flows.touch(key, forward, c.packets, c.bytes, now_ms);
                    *last_ms = now_ms;
                    return;
                }
                Some(Side::New { tunnelled, .. }) => {
                    tunnelled.touch(key, forward, c.packets, c.bytes, now_ms);
                    return;
                }
                None => {}
            }
        }
    }

    pub fn stats(&self, guest: IpAddr) -> Option<SideStats> {
        let sum = |t: &FlowTable| {
            t.iter().fold((0u64, 0u64), |(p, b), (_, f)| {
                (p + f.packets[0] + f.packets[1], b + f.bytes[0] + f.bytes[1])
            })
        };
        Some(match self.sides.get(&guest)? {
            Side::Old { flows, .. } => {
                let (packets, bytes) = sum(flows);
                SideStats {
                    flows: flows.len(),
                    live_flows: flows.live(),
                    packets,
                    bytes,
                    translated_flows: 0,
                }
            }
            Side::New {
                tunnelled,
                translated,
                ..
            } => {
                let (packets, bytes) = sum(tunnelled);
                SideStats {
                    flows: tunnelled.len(),
                    live_flows: tunnelled.live(),
                    packets,
                    bytes,
                    translated_flows: translated.len(),
                }
            }
        })
    }
}

pub struct Plane {
    /// The configured peer gateways: the only outer sources accepted.
    pub peers: Vec<IpAddr>,
    /// The kernel fast path, when on: it carries the guests' bulk TCP and
    /// is told about guests and translated flows ([`Plane::fast`]).
    pub fast: Option<Mutex<tunnel::fastpath::FastPath>>,
    pub tun: tunnel::tundev::Tun,
    pub outer: Outer,
    /// Send ICMP too-big for DF packets that do not fit, from this address.
    pub signal_pmtu: Option<IpAddr>,
    pub icmp: Option<tunnel::io::IcmpSender>,
    /// Outer header bytes (20 IPv4, 40 IPv6, + 8 for FOU).
    pub overhead: u16,
    pub tables: Arc<Mutex<Tables>>,
    pub counters: Arc<Counters>,
    pub path_mtu: u16,
    pub clamp_mss: bool,
    /// Polling after the last packet before sleeping ([`tunnel::poll`]).
    pub spin: Duration,
    pub started: Instant,
}

/// What to do with a packet read from the TUN device.
enum Out {
    Tunnel(IpAddr),
    /// Rewritten; write it back into the TUN device.
    Back,
    Drop(DropReason),
}

impl Plane {
    pub fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Moves packets until an I/O error, on the calling thread: a batch
    /// from each side per pass; after the last packet it keeps polling for
    /// `spin`, then sleeps until a socket has input.
    pub fn run(&self) -> std::io::Result<()> {
        let (mut keep, mut refused) = (Vec::new(), Vec::new());
        tunnel::io::drive(
            &self.tun,
            &self.outer,
            self.spin,
            &self.counters,
            |rx| self.tun_to_tunnel(rx, &mut keep, &mut refused),
            |rx| self.tunnel_to_tun(rx),
        )
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Tables> {
        self.tables.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the kernel fast path, if it is on. (Lock order: the
    /// tables first, then the fast path.)
    pub fn fast<T>(&self, f: impl FnOnce(&mut tunnel::fastpath::FastPath) -> T) -> Option<T> {
        self.fast
            .as_ref()
            .map(|m| f(&mut m.lock().unwrap_or_else(|p| p.into_inner())))
    }

    /// A translated TCP flow that the guest sends as `from` → `to`: its
    /// packets must reach this plane (the NAT), not the fast path.
    fn keep_translated(&self, from: (IpAddr, u16), to: (IpAddr, u16)) {
        if let Some(Err(e)) = self.fast(|f| f.set_translated(from, to, true)) {
            tracing::warn!(error = %e, "a translated flow may take the kernel fast path");
        }
    }

    /// The counters, the kernel fast path's included.
    pub fn snapshot(&self) -> tunnel::io::CountersSnapshot {
        let mut s = tunnel::io::snapshot(&self.counters, None);
        if let Some(k) = self.fast(|f| f.stats()) {
            s.add_fast_path(k);
        }
        s
    }

    /// TUN → tunnel (or back into the TUN device, translated), a batch.
    fn tun_to_tunnel(
        &self,
        rx: &mut tunnel::tundev::RecvBatch,
        keep: &mut Vec<(usize, IpAddr)>,
        refused: &mut Vec<usize>,
    ) -> std::io::Result<()> {
        keep.clear();
        let mut back = Vec::new();
        let now = self.now_ms();
        let mut t = self.lock(); // once per batch
        for i in 0..rx.len() {
            let pkt = rx.packet_mut(i);
            match self.decide_out(&mut t, pkt, now) {
                Out::Drop(why) => self.counters.dropped(why),
                Out::Back => back.push(i),
                Out::Tunnel(peer) => {
                    if self.prepare_for_tunnel(pkt) {
                        keep.push((i, peer));
                    }
                }
            }
        }
        drop(t);
        if !back.is_empty() {
            let mut c = tunnel::coalesce::Coalescer::new();
            for &i in &back {
                c.push(rx.packet(i));
            }
            for _ in 0..self.tun.write(&c)? {
                self.counters.dropped(DropReason::Refused);
            }
        }
        let pkts: Vec<(&[u8], IpAddr)> =
            keep.iter().map(|&(i, peer)| (rx.packet(i), peer)).collect();
        refused.clear();
        self.outer.send(&pkts, refused)?;
        self.counters.sent(&pkts, refused);
        Ok(())
    }

    /// MSS clamping, and ICMP "too big" instead of the packet when so
    /// configured: true when the packet goes into the tunnel.
    fn prepare_for_tunnel(&self, pkt: &mut [u8]) -> bool {
        let tunnel_mtu = self.path_mtu.saturating_sub(self.overhead);
        let ipv6 = pkt.first().is_some_and(|b| b >> 4 == 6);
        if self.clamp_mss && mss::clamp(pkt, mss::mss_for(tunnel_mtu, ipv6)).is_some() {
            self.counters.mss_clamped.fetch_add(1, Ordering::Relaxed);
        }
        let Ok(inner) = Inner::parse(pkt) else {
            self.counters.dropped(DropReason::InnerMalformed);
            return false;
        };
        if let Some(from) = self
            .signal_pmtu
            .filter(|_| inner.bytes.len() > usize::from(tunnel_mtu))
        {
            if let (Some(err), Some(sender)) =
                (tunnel::icmp::too_big(&inner, tunnel_mtu, from), &self.icmp)
            {
                self.counters.icmp_too_big.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = sender.send(&err) {
                    tracing::debug!(error = %e, "cannot send ICMP too-big");
                }
                return false;
            }
        }
        true
    }

    fn decide_out(&self, t: &mut Tables, pkt: &mut [u8], now: u64) -> Out {
        let (src, dst) = match Inner::parse(pkt) {
            Ok(i) if !i.forwardable() => return Out::Drop(DropReason::LinkLocal),
            Ok(i) => (i.src, i.dst),
            Err(why) => return Out::Drop(why),
        };
        // old site: traffic for the moved guest
        if let Some(Side::Old {
            peer,
            flows,
            last_ms,
        }) = t.sides.get_mut(&dst)
        {
            if let Ok(i) = Inner::parse(pkt) {
                flows.observe(&i, now);
            }
            *last_ms = now;
            return Out::Tunnel(*peer);
        }
        // new site: traffic from the guest
        if let Some(Side::New {
            peer,
            public,
            tunnelled,
            translated,
        }) = t.sides.get_mut(&src)
        {
            let Ok(i) = Inner::parse(pkt) else {
                return Out::Drop(DropReason::InnerMalformed);
            };
            if from_guest_via_tunnel(tunnelled.knows(&i), translated.knows(&i), &i.transport) {
                tunnelled.observe(&i, now);
                return Out::Tunnel(*peer);
            }
            let seen = translated.observe(&i, now);
            if let (true, Transport::Tcp { sport, dport, .. }) = (seen.new, i.transport) {
                self.keep_translated((i.src, sport), (i.dst, dport));
            }
            let public = *public;
            return match nat::rewrite_src(pkt, public) {
                Ok(()) => Out::Back,
                Err(_) => Out::Drop(DropReason::InnerMalformed),
            };
        }
        // new site: traffic to the guest's public address
        if let Some(guest) = t.public_to_guest(dst) {
            if nat::rewrite_dst(pkt, guest).is_err() {
                return Out::Drop(DropReason::InnerMalformed);
            }
            if let (Ok(i), Some(Side::New { translated, .. })) =
                (Inner::parse(pkt), t.sides.get_mut(&guest))
            {
                let seen = translated.observe(&i, now);
                if let (true, Transport::Tcp { sport, dport, .. }) = (seen.new, i.transport) {
                    // the guest answers as dst → src
                    self.keep_translated((i.dst, dport), (i.src, sport));
                }
            }
            return Out::Back;
        }
        Out::Drop(DropReason::UnregisteredDestination)
    }

    /// Tunnel → TUN, a batch.
    fn tunnel_to_tun(&self, rx: &tunnel::io::OuterBatch) -> std::io::Result<()> {
        let mut tx = tunnel::coalesce::Coalescer::new();
        let now = self.now_ms();
        let mut t = self.lock(); // once per batch
        for i in 0..rx.len() {
            let Some(inner) = self.counters.admit(rx.decapsulate(i, &self.peers)) else {
                continue;
            };
            if !self.accept_from_tunnel(&mut t, &inner, now) {
                self.counters.dropped(DropReason::UnregisteredDestination);
                continue;
            }
            tx.push(inner.bytes);
            self.counters.decapsulated(inner.bytes.len());
        }
        drop(t);
        for _ in 0..self.tun.write(&tx)? {
            self.counters.dropped(DropReason::Refused);
        }
        Ok(())
    }

    /// Is a packet out of the tunnel for us to deliver? New site: for the
    /// guest; old site: the guest's reverse-tunnelled replies. Its flow is
    /// counted.
    fn accept_from_tunnel(&self, t: &mut Tables, inner: &Inner<'_>, now: u64) -> bool {
        match (
            t.sides.get_mut(&inner.dst).map(|s| (inner.dst, s)),
            inner.src,
        ) {
            // new site: from the old site, to the guest
            (Some((_, Side::New { tunnelled, .. })), _) => {
                tunnelled.observe(inner, now);
                true
            }
            _ => match t.sides.get_mut(&inner.src) {
                // old site: the guest's replies, reverse-tunnelled
                Some(Side::Old { flows, last_ms, .. }) => {
                    flows.observe(inner, now);
                    *last_ms = now;
                    true
                }
                _ => false,
            },
        }
    }
}

/// New site: does a packet from the guest go back through the tunnel (or out
/// translated)? Through the tunnel when its flow came through it, and for a
/// TCP segment of a connection neither table knows that is not opening one:
/// that connection is from before the move (the guest may speak first after
/// resuming, before any packet of it came through the tunnel), and
/// translated, the client would reset it.
fn from_guest_via_tunnel(tunnelled: bool, translated: bool, t: &Transport) -> bool {
    let established_before =
        !translated && matches!(t, Transport::Tcp { flags, .. } if !flags.syn || flags.ack);
    tunnelled || established_before
}

#[cfg(test)]
mod tests {
    use super::*;
    use tunnel::packet::TcpFlags;

    fn tcp(syn: bool, ack: bool) -> Transport {
        Transport::Tcp {
            sport: 7,
            dport: 40000,
            flags: TcpFlags {
                syn,
                ack,
                ..TcpFlags::default()
            },
        }
    }

    #[test]
    fn guest_packets_choose_tunnel_or_translation() {
        let udp = Transport::Udp {
            sport: 53,
            dport: 5353,
        };
        // flows that came through the tunnel go back through it
        assert!(from_guest_via_tunnel(true, false, &udp));
        assert!(from_guest_via_tunnel(true, true, &tcp(true, false)));
        // a new connection of the guest's, or new UDP: translated
        assert!(!from_guest_via_tunnel(false, false, &tcp(true, false)));
        assert!(!from_guest_via_tunnel(false, false, &udp));
        // translated flows stay translated
        assert!(!from_guest_via_tunnel(false, true, &tcp(false, true)));
        // a segment of a connection from before the move, the guest speaking
        // first after it resumed: back through the tunnel, not translated
        assert!(from_guest_via_tunnel(false, false, &tcp(false, true)));
        assert!(from_guest_via_tunnel(false, false, &tcp(true, true)));
    }
}
