//! The flow table: which connections are using the tunnel, in which state,
//! how much they carried; when the last one has ended, the old address is
//! drained. Time is passed in (milliseconds on any monotonic clock).
//!
//! Connections that were open before the switch are first seen mid-stream:
//! any TCP packet without SYN opens the flow as established. A flow ends on
//! RST, or after FINs from both sides (then a short linger for the last
//! ACKs and retransmissions), or when idle past its protocol's timeout.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::packet::{Inner, TcpFlags, Transport};

/// Both directions of a connection map to one key: the lower endpoint first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct FlowKey {
    pub proto: u8,
    pub lo: (IpAddr, u16),
    pub hi: (IpAddr, u16),
}

impl FlowKey {
    /// The key and whether the packet goes lo → hi.
    pub fn of(p: &Inner<'_>) -> (Self, bool) {
        Self::of_ends(p.proto, ends(p))
    }

    /// The key of a flow of `proto` with a packet going `from` → `to`, and
    /// whether that is lo → hi.
    pub fn between(proto: u8, from: (IpAddr, u16), to: (IpAddr, u16)) -> (Self, bool) {
        Self::of_ends(proto, (from, to))
    }

    fn of_ends(proto: u8, (a, b): Ends) -> (Self, bool) {
        if a <= b {
            (
                Self {
                    proto,
                    lo: a,
                    hi: b,
                },
                true,
            )
        } else {
            (
                Self {
                    proto,
                    lo: b,
                    hi: a,
                },
                false,
            )
        }
    }
}

/// Source and destination (address, port) of a packet, as it goes.
type Ends = ((IpAddr, u16), (IpAddr, u16));

fn ends(p: &Inner<'_>) -> Ends {
    let (sp, dp) = match p.transport {
        Transport::Tcp { sport, dport, .. } | Transport::Udp { sport, dport } => (sport, dport),
        Transport::Echo { id } => (id, id),
        Transport::Other => (0, 0),
    };
    ((p.src, sp), (p.dst, dp))
}

fn tcp_flags(p: &Inner<'_>) -> Option<TcpFlags> {
    match p.transport {
        Transport::Tcp { flags, .. } => Some(flags),
        _ => None,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TcpState {
    /// SYN seen, no reply yet.
    Opening,
    Established,
    /// FIN from one side.
    HalfClosed,
    /// FIN from both sides, or RST: lingering before removal.
    Closed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flow {
    /// TCP only.
    pub tcp: Option<TcpState>,
    fin_lo: bool,
    fin_hi: bool,
    pub first_ms: u64,
    pub last_ms: u64,
    /// lo → hi, hi → lo.
    pub packets: [u64; 2],
    pub bytes: [u64; 2],
}

impl Flow {
    /// A flow first seen at `now_ms`, nothing counted yet.
    fn new(tcp: Option<TcpState>, now_ms: u64) -> Self {
        Self {
            tcp,
            fin_lo: false,
            fin_hi: false,
            first_ms: now_ms,
            last_ms: now_ms,
            packets: [0; 2],
            bytes: [0; 2],
        }
    }
}

/// Idle timeouts, milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timeouts {
    pub tcp_established_ms: u64,
    /// Opening and half-closed TCP.
    pub tcp_transitory_ms: u64,
    /// After both FINs or a RST.
    pub tcp_linger_ms: u64,
    pub udp_ms: u64,
    pub icmp_ms: u64,
    pub other_ms: u64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            tcp_established_ms: 2 * 3600 * 1000,
            tcp_transitory_ms: 120 * 1000,
            tcp_linger_ms: 10 * 1000,
            udp_ms: 60 * 1000,
            icmp_ms: 30 * 1000,
            other_ms: 60 * 1000,
        }
    }
}

/// What the table did with a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    pub key: FlowKey,
    /// The packet started a flow the table did not know.
    pub new: bool,
    /// A TCP SYN without ACK: a connection being opened now.
    pub opening: bool,
}

#[derive(Debug, Default, Clone)]
pub struct FlowTable {
    /// aHash: fast (a lookup per packet) and randomly keyed per table, so
    /// outside senders cannot aim for collisions.
    flows: HashMap<FlowKey, Flow, ahash::RandomState>,
    pub timeouts: Timeouts,
}

impl FlowTable {
    pub fn new(timeouts: Timeouts) -> Self {
        Self {
            flows: HashMap::default(),
            timeouts,
        }
    }

    pub fn len(&self) -> usize {
        self.flows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    pub fn get(&self, key: &FlowKey) -> Option<&Flow> {
        self.flows.get(key)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&FlowKey, &Flow)> {
        self.flows.iter()
    }

    /// Whether `p` belongs to a known flow (without recording it).
    pub fn knows(&self, p: &Inner<'_>) -> bool {
        self.flows.contains_key(&FlowKey::of(p).0)
    }

    /// Records a packet.
    pub fn observe(&mut self, p: &Inner<'_>, now_ms: u64) -> Seen {
        let (key, forward) = FlowKey::of(p);
        self.record(key, forward, tcp_flags(p), 1, p.bytes.len() as u64, now_ms)
    }

    /// Segments of a TCP flow that did not pass through here (the kernel
    /// fast path carried them; it never carries SYN, FIN or RST): `packets`
    /// ACK segments in the `forward` (lo → hi) direction. The flow is
    /// created (established) if it is new, its idle clock restarts, and a
    /// handshake completes.
    pub fn touch(
        &mut self,
        key: FlowKey,
        forward: bool,
        packets: u64,
        bytes: u64,
        now_ms: u64,
    ) -> Seen {
        let ack = TcpFlags {
            ack: true,
            ..TcpFlags::default()
        };
        self.record(key, forward, Some(ack), packets, bytes, now_ms)
    }

    /// A flow another table knew (another gateway's, handed over when the
    /// VM moved on), in `tcp` state, its idle clock starting now. A flow
    /// this table knows already is left as it is.
    pub fn adopt(&mut self, key: FlowKey, tcp: Option<TcpState>, now_ms: u64) {
        let tcp = (key.proto == 6).then(|| tcp.unwrap_or(TcpState::Established));
        self.flows.entry(key).or_insert(Flow::new(tcp, now_ms));
    }

    /// Records `packets` packets of `bytes` in all, each with `flags`.
    fn record(
        &mut self,
        key: FlowKey,
        forward: bool,
        flags: Option<TcpFlags>,
        packets: u64,
        bytes: u64,
        now_ms: u64,
    ) -> Seen {
        let dir = usize::from(!forward);
        let opening = flags.is_some_and(|f| f.syn && !f.ack);
        let entry = self.flows.entry(key);
        let new = matches!(entry, Entry::Vacant(_));
        let flow = entry.or_insert_with(|| {
            let tcp = flags.map(|f| {
                if f.syn && !f.ack {
                    TcpState::Opening
                } else {
                    TcpState::Established
                }
            });
            Flow::new(tcp, now_ms)
        });
        flow.last_ms = now_ms;
        flow.packets[dir] += packets;
        flow.bytes[dir] += bytes;
        if let (Some(f), Some(state)) = (flags, flow.tcp) {
            let next = if f.rst {
                TcpState::Closed
            } else {
                if f.fin {
                    if forward {
                        flow.fin_lo = true;
                    } else {
                        flow.fin_hi = true;
                    }
                }
                match state {
                    TcpState::Closed if f.syn && !f.ack => TcpState::Opening, // port reused
                    TcpState::Closed => TcpState::Closed,
                    _ if flow.fin_lo && flow.fin_hi => TcpState::Closed,
                    _ if flow.fin_lo || flow.fin_hi => TcpState::HalfClosed,
                    TcpState::Opening if f.ack => TcpState::Established,
                    s => s,
                }
            };
            if next == TcpState::Opening {
                flow.fin_lo = false;
                flow.fin_hi = false;
            }
            flow.tcp = Some(next);
        }
        Seen { key, new, opening }
    }

    fn timeout(&self, key: &FlowKey, flow: &Flow) -> u64 {
        let t = &self.timeouts;
        match flow.tcp {
            Some(TcpState::Established) => t.tcp_established_ms,
            Some(TcpState::Opening | TcpState::HalfClosed) => t.tcp_transitory_ms,
            Some(TcpState::Closed) => t.tcp_linger_ms,
            None if key.proto == 17 => t.udp_ms,
            None if key.proto == 1 || key.proto == 58 => t.icmp_ms,
            None => t.other_ms,
        }
    }

    /// Removes flows that ended or idled out; returns them.
    pub fn expire(&mut self, now_ms: u64) -> Vec<(FlowKey, Flow)> {
        let dead: Vec<FlowKey> = self
            .flows
            .iter()
            .filter(|(k, f)| now_ms.saturating_sub(f.last_ms) >= self.timeout(k, f))
            .map(|(k, _)| *k)
            .collect();
        dead.into_iter()
            .filter_map(|k| self.flows.remove(&k).map(|f| (k, f)))
            .collect()
    }

    /// Flows still carrying traffic: everything not yet closed.
    pub fn live(&self) -> usize {
        self.flows
            .values()
            .filter(|f| f.tcp != Some(TcpState::Closed))
            .count()
    }
}

/// Records the packets of a batch in a [`FlowTable`], consecutive packets
/// of a flow that change no state (no SYN, FIN or RST, the same ACK bit,
/// the same direction) as one update: a bulk transfer's 45 segments per
/// super-packet cost one lookup. The table is up to date after
/// [`Observer::flush`]: call it at the end of each batch, whose packets
/// share one clock reading.
#[derive(Debug, Default)]
pub struct Observer {
    run: Option<Run>,
}

#[derive(Debug)]
struct Run {
    proto: u8,
    ends: Ends,
    flags: Option<TcpFlags>,
    packets: u64,
    bytes: u64,
}

impl Observer {
    pub fn observe(&mut self, t: &mut FlowTable, p: &Inner<'_>, now_ms: u64) {
        let flags = tcp_flags(p);
        let plain = flags.is_none_or(|f| !f.syn && !f.fin && !f.rst);
        let e = ends(p);
        if let Some(r) = &mut self.run {
            if plain && r.proto == p.proto && r.ends == e && r.flags == flags {
                r.packets += 1;
                r.bytes += p.bytes.len() as u64;
                return;
            }
        }
        self.flush(t, now_ms);
        if plain {
            self.run = Some(Run {
                proto: p.proto,
                ends: e,
                flags,
                packets: 1,
                bytes: p.bytes.len() as u64,
            });
        } else {
            t.observe(p, now_ms);
        }
    }

    pub fn flush(&mut self, t: &mut FlowTable, now_ms: u64) {
        if let Some(r) = self.run.take() {
            let (key, forward) = FlowKey::of_ends(r.proto, r.ends);
            t.record(key, forward, r.flags, r.packets, r.bytes, now_ms);
        }
    }
}

#[cfg(test)]
mod tests {
    use etherparse::PacketBuilder;
    use proptest::prelude::*;

    use super::*;
    use crate::packet::tests::tcp_v4;

    const C: [u8; 4] = [203, 0, 113, 9];
    const S: [u8; 4] = [10, 1, 0, 10];

    fn tcp(from_client: bool, flags: &str, len: usize) -> Vec<u8> {
        let (src, dst, sp, dp) = if from_client {
            (C, S, 40000, 80)
        } else {
            (S, C, 80, 40000)
        };
        let mut b = PacketBuilder::ipv4(src, dst, 64).tcp(sp, dp, 1, 65535);
        for f in flags.chars() {
            b = match f {
                'S' => b.syn(),
                'A' => b.ack(1),
                'F' => b.fin(),
                'R' => b.rst(),
                _ => b,
            };
        }
        let mut out = Vec::new();
        b.write(&mut out, &vec![0u8; len]).expect("build");
        out
    }

    fn feed(t: &mut FlowTable, pkt: &[u8], now: u64) -> Seen {
        t.observe(&Inner::parse(pkt).expect("parse"), now)
    }

    #[test]
    fn both_directions_are_one_flow_with_counters() {
        let mut t = FlowTable::default();
        let a = feed(&mut t, &tcp(true, "S", 0), 0);
        assert!(a.new && a.opening);
        let b = feed(&mut t, &tcp(false, "SA", 0), 1);
        assert!(!b.new && !b.opening);
        assert_eq!(a.key, b.key);
        feed(&mut t, &tcp(true, "A", 100), 2);
        let f = t.get(&a.key).expect("flow");
        assert_eq!(f.tcp, Some(TcpState::Established));
        assert_eq!(f.packets.iter().sum::<u64>(), 3);
        assert_eq!(f.bytes.iter().sum::<u64>(), 40 + 40 + 140);
    }

    #[test]
    fn a_mid_stream_connection_is_established_and_fins_close_it() {
        let mut t = FlowTable::default();
        let s = feed(&mut t, &tcp(true, "A", 1000), 0);
        assert!(
            s.new && !s.opening,
            "connections open before the switch arrive mid-stream"
        );
        assert_eq!(
            t.get(&s.key).expect("flow").tcp,
            Some(TcpState::Established)
        );
        feed(&mut t, &tcp(true, "FA", 0), 10);
        assert_eq!(t.get(&s.key).expect("flow").tcp, Some(TcpState::HalfClosed));
        assert_eq!(t.live(), 1);
        feed(&mut t, &tcp(false, "FA", 0), 20);
        assert_eq!(t.get(&s.key).expect("flow").tcp, Some(TcpState::Closed));
        assert_eq!(t.live(), 0);
        // lingers for late ACKs, then goes
        assert!(t.expire(20 + 5_000).is_empty());
        assert_eq!(t.expire(20 + 10_000).len(), 1);
        assert!(t.is_empty());
    }

    #[test]
    fn rst_closes_and_idle_flows_time_out_by_protocol() {
        let mut t = FlowTable::default();
        let s = feed(&mut t, &tcp(true, "A", 10), 0);
        feed(&mut t, &tcp(false, "R", 0), 5);
        assert_eq!(t.get(&s.key).expect("flow").tcp, Some(TcpState::Closed));

        let mut t = FlowTable::default();
        let mut udp = Vec::new();
        PacketBuilder::ipv4(C, S, 64)
            .udp(5000, 53)
            .write(&mut udp, b"q")
            .expect("udp");
        feed(&mut t, &udp, 0);
        feed(&mut t, &tcp(true, "A", 10), 0);
        assert_eq!(t.expire(59_999).len(), 0);
        let gone = t.expire(60_000);
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].0.proto, 17);
        assert_eq!(
            t.len(),
            1,
            "an established TCP flow outlives an idle minute"
        );
        assert_eq!(t.expire(2 * 3600 * 1000).len(), 1);
    }

    proptest! {
        /// Any packet sequence: counters add up, keys are direction-free,
        /// and every flow eventually expires.
        #[test]
        fn any_sequence_keeps_counts_and_expires(
            seq in prop::collection::vec((any::<bool>(), prop::sample::select(vec!["S", "SA", "A", "FA", "R", "PA"]), 0usize..300), 1..40)
        ) {
            let mut t = FlowTable::default();
            let mut total = 0u64;
            for (i, (dir, flags, len)) in seq.iter().enumerate() {
                let p = tcp(*dir, flags, *len);
                total += p.len() as u64;
                feed(&mut t, &p, i as u64);
            }
            prop_assert_eq!(t.len(), 1);
            let (_, f) = t.iter().next().expect("one flow");
            prop_assert_eq!(f.bytes[0] + f.bytes[1], total);
            prop_assert_eq!(f.packets[0] + f.packets[1], seq.len() as u64);
            prop_assert_eq!(t.expire(u64::MAX / 2).len(), 1);
        }
    }

    proptest! {
        /// Folding runs changes nothing: the same flows, states and counts
        /// as one update per packet.
        #[test]
        fn an_observer_records_what_observing_each_packet_does(
            seq in prop::collection::vec((any::<bool>(), prop::sample::select(vec!["S", "SA", "A", "FA", "R", "PA", ""]), 0usize..300, any::<bool>()), 1..60)
        ) {
            let (mut each, mut folded) = (FlowTable::default(), FlowTable::default());
            let mut o = Observer::default();
            for (i, (dir, flags, len, udp)) in seq.iter().enumerate() {
                let p = if *udp {
                    let mut out = Vec::new();
                    PacketBuilder::ipv4(C, S, 64).udp(5000, 53).write(&mut out, &vec![0; *len]).expect("udp");
                    out
                } else {
                    tcp(*dir, flags, *len)
                };
                let inner = Inner::parse(&p).expect("parse");
                // a batch of 7 packets shares one clock reading
                let now = (i / 7) as u64;
                each.observe(&inner, now);
                o.observe(&mut folded, &inner, now);
                if i % 7 == 6 {
                    o.flush(&mut folded, now);
                }
            }
            o.flush(&mut folded, ((seq.len() - 1) / 7) as u64);
            prop_assert_eq!(each.len(), folded.len());
            for (k, f) in each.iter() {
                let g = folded.get(k).expect("same flows");
                prop_assert_eq!(f.tcp, g.tcp);
                prop_assert_eq!(f.packets, g.packets);
                prop_assert_eq!(f.bytes, g.bytes);
                prop_assert_eq!(f.first_ms, g.first_ms);
                prop_assert_eq!(f.last_ms, g.last_ms);
            }
        }
    }

    #[test]
    fn keys_ignore_direction_for_any_addresses() {
        let a = tcp_v4([1, 2, 3, 4], [5, 6, 7, 8], 10, 20, false, b"");
        let b = tcp_v4([5, 6, 7, 8], [1, 2, 3, 4], 20, 10, false, b"");
        let (ka, fa) = FlowKey::of(&Inner::parse(&a).expect("a"));
        let (kb, fb) = FlowKey::of(&Inner::parse(&b).expect("b"));
        assert_eq!(ka, kb);
        assert_ne!(fa, fb);
    }
}
