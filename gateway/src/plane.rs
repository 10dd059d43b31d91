//! The gateway's data plane, the I/O shell: one TUN device and the outer
//! sockets, a thread that moves packets between them, and for each packet
//! the decision of [`crate::tables`] (which VM it belongs to, tunnel or
//! translate), under one lock per batch.

use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tunnel::io::{Counters, Outer};
use tunnel::mss;
use tunnel::packet::{DropReason, Inner};

use crate::tables::{In, Out, Tables};

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

    /// The tables (a thread that panicked holding them does not stop the
    /// data plane).
    pub fn lock(&self) -> std::sync::MutexGuard<'_, Tables> {
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
            let (out, keep_translated) = t.outbound(pkt, now);
            if let Some((from, to)) = keep_translated {
                self.keep_translated(from, to);
            }
            match out {
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

    /// Tunnel → TUN, a batch. Packets delivered as they came are written
    /// from the receive buffers. Those whose destination is translated (a
    /// connection that came through a site where the VM had another
    /// address) and TCP packets longer than the path MTU (a peer's kernel
    /// fast path or GRO here carried a super-packet whole) are copied,
    /// rewritten or cut into segments that fit the tunnel, and written after
    /// them.
    fn tunnel_to_tun(&self, rx: &tunnel::io::OuterBatch) -> std::io::Result<()> {
        let mut tx = tunnel::coalesce::Coalescer::new();
        let mut copied: Vec<Vec<u8>> = Vec::new();
        let max = self.path_mtu.saturating_sub(self.overhead);
        let now = self.now_ms();
        let mut t = self.lock(); // once per batch
        for i in 0..rx.len() {
            let Some(inner) = self.counters.admit(rx.decapsulate(i, &self.peers)) else {
                continue;
            };
            let to = match t.inbound(&inner, now) {
                In::Drop => {
                    self.counters.dropped(DropReason::UnregisteredDestination);
                    continue;
                }
                In::Deliver => None,
                In::DeliverTo(guest) => Some(guest),
            };
            self.counters.decapsulated(inner.bytes.len());
            // more than the TUN device (and the VM's link) takes: never a
            // packet as sent, so its checksum is no sender's to keep
            let oversize = inner.bytes.len() > usize::from(self.path_mtu);
            if to.is_none() && !oversize {
                tx.push(inner.bytes);
                continue;
            }
            let mut p = inner.bytes.to_vec();
            if let Some(guest) = to {
                if tunnel::nat::rewrite_dst(&mut p, guest).is_err() {
                    self.counters.dropped(DropReason::InnerMalformed);
                    continue;
                }
            }
            if !oversize {
                copied.push(p);
                continue;
            }
            let n = p.len().div_ceil(usize::from(max).saturating_sub(80).max(1)) + 1;
            let (mut segs, mut sizes) = (vec![vec![0u8; usize::from(max)]; n], vec![0; n]);
            match tunnel::tundev::cut(&mut p, max, &mut segs, &mut sizes) {
                Ok(k) => copied.extend(segs.into_iter().zip(sizes).take(k).map(|(mut s, l)| {
                    s.truncate(l);
                    s
                })),
                // not TCP: as it is, the kernel fragments it or answers
                // too-big
                Err(_) => copied.push(p),
            }
        }
        drop(t);
        for _ in 0..self.tun.write(&tx)? {
            self.counters.dropped(DropReason::Refused);
        }
        if !copied.is_empty() {
            let mut tx = tunnel::coalesce::Coalescer::new();
            for p in &copied {
                tx.push(p);
            }
            for _ in 0..self.tun.write(&tx)? {
                self.counters.dropped(DropReason::Refused);
            }
        }
        Ok(())
    }
}
