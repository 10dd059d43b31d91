//! What the data plane knows about each VM this site takes part in, and the
//! decision for each packet: pure (no device, no socket, time passed in),
//! so the tests below drive it with built packets. [`crate::plane`] is the
//! I/O shell around it.
//!
//! A site *forwards* a VM that ran here before ([`Side::Forward`], keyed by
//! the address its clients used here: the VM's own at its home, this
//! site's public address for it elsewhere):
//! - TUN → packets to that address (host route → TUN): into the tunnel to
//!   the serving site.
//! - tunnel → packets from that address (the serving site translated them
//!   back): into the TUN device, the kernel routes them to the client.
//!
//! The site the VM runs at *serves* it ([`Side::Serve`], keyed by the VM's
//! address), with a public address P here unless this is its home:
//! - tunnel → packets from an origin (a forwarding site) to the address
//!   clients used there: to the VM (translated to its address when that is
//!   not its own); the connection is remembered with its origin.
//! - TUN → packets from the VM (policy rule `from G iif LAN`): a
//!   connection that came through an origin goes back through it (its
//!   source translated back to the address it came to); a TCP segment of a
//!   connection nobody knows that is not opening one is from before the
//!   first move and goes home; the rest leave translated to P (or as they
//!   are, at home).
//! - TUN → packets to P (host route P/32 → TUN): translated to the VM.
//!
//! One tunnel hop from any forwarding site to the serving one, whatever
//! the number of moves: a move hands the serving site's origins and
//! connections over to the next ([`Tables::handover`], [`Tables::serve`]).

use std::collections::HashMap;
use std::net::IpAddr;

use tunnel::flow::{FlowKey, FlowTable, TcpState, Timeouts};
use tunnel::packet::{DropReason, Inner, Transport};

/// A site that forwards a served VM's connections to here.
#[derive(Debug)]
pub struct Origin {
    /// Its gateway (outer address).
    pub peer: IpAddr,
    /// The address clients reached the VM at there.
    pub address: IpAddr,
    /// The connections that came through it (in the VM's terms).
    pub flows: FlowTable,
}

/// One VM as the data plane sees it.
#[derive(Debug)]
pub enum Side {
    Forward {
        peer: IpAddr,
        flows: FlowTable,
        /// Last packet in either direction (for the quiet-period drain rule).
        last_ms: u64,
    },
    Serve(Serve),
}

#[derive(Debug)]
pub struct Serve {
    /// The VM's address here (translated ↔ its own); none at its home.
    pub public: Option<IpAddr>,
    pub origins: Vec<Origin>,
    /// Connections to `public`, and those the VM opened here.
    pub translated: FlowTable,
}

impl Serve {
    /// The origin a connection from before the first move came through:
    /// the VM's home, forwarding its own address.
    fn home(&self, guest: IpAddr) -> Option<usize> {
        self.origins.iter().position(|o| o.address == guest)
    }
}

/// The TCP flow a served VM sends as `from` → `to` is translated: the
/// kernel fast path must leave it to the plane.
pub type Translated = ((IpAddr, u16), (IpAddr, u16));

/// What to do with a packet read from the TUN device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Out {
    Tunnel(IpAddr),
    /// Rewritten (or, at home, as it was): write it back into the TUN device.
    Back,
    Drop(DropReason),
}

/// What to do with a packet out of the tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum In {
    Deliver,
    /// Deliver with this destination (the VM's own address).
    DeliverTo(IpAddr),
    Drop,
}

/// A connection handed over by the site the VM left: the address its
/// client used, and the connection in the VM's terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Handed {
    pub origin: IpAddr,
    pub key: FlowKey,
    pub tcp: Option<TcpState>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub flows: usize,
    pub live_flows: usize,
    pub packets: u64,
    pub bytes: u64,
    pub translated_flows: usize,
}

#[derive(Default)]
pub struct Tables {
    /// Forwarded addresses and served VMs' own addresses.
    sides: HashMap<IpAddr, Side>,
    /// A served VM's other addresses (its public one, its origins') → the VM.
    aliases: HashMap<IpAddr, IpAddr>,
}

fn ends(i: &Inner<'_>) -> Option<Translated> {
    match i.transport {
        Transport::Tcp { sport, dport, .. } => Some(((i.src, sport), (i.dst, dport))),
        _ => None,
    }
}

fn rewrite(
    pkt: &mut [u8],
    f: fn(&mut [u8], IpAddr) -> Result<(), tunnel::nat::NatError>,
    to: IpAddr,
) -> Out {
    match f(pkt, to) {
        Ok(()) => Out::Back,
        Err(_) => Out::Drop(DropReason::InnerMalformed),
    }
}

impl Tables {
    pub fn get(&self, key: &IpAddr) -> Option<&Side> {
        self.sides.get(key)
    }

    /// Forward `address` to `peer`; an existing forward keeps its flows
    /// and drain clock (re-pointed when the VM moved on).
    pub fn forward(&mut self, address: IpAddr, peer: IpAddr, timeouts: Timeouts, now_ms: u64) {
        if let Some(Side::Forward { peer: p, .. }) = self.sides.get_mut(&address) {
            *p = peer;
            return;
        }
        self.remove(address);
        self.sides.insert(
            address,
            Side::Forward {
                peer,
                flows: FlowTable::new(timeouts),
                last_ms: now_ms,
            },
        );
    }

    /// Serve `guest` here: `public` (none at home), `origins` (peer,
    /// address), and the connections the site it left knew.
    pub fn serve(
        &mut self,
        guest: IpAddr,
        public: Option<IpAddr>,
        origins: &[(IpAddr, IpAddr)],
        handed: &[Handed],
        timeouts: Timeouts,
        now_ms: u64,
    ) {
        self.remove(guest);
        if let Some(p) = public {
            self.remove(p);
        }
        let mut s = Serve {
            public,
            origins: origins
                .iter()
                .map(|&(peer, address)| Origin {
                    peer,
                    address,
                    flows: FlowTable::new(timeouts),
                })
                .collect(),
            translated: FlowTable::new(timeouts),
        };
        for h in handed {
            if Some(h.origin) == public {
                s.translated.adopt(h.key, h.tcp, now_ms);
            } else if let Some(o) = s.origins.iter_mut().find(|o| o.address == h.origin) {
                o.flows.adopt(h.key, h.tcp, now_ms);
            }
            // else: to this site's own home address (native here now) or
            // from a site no longer forwarding
        }
        for a in s.public.iter().chain(s.origins.iter().map(|o| &o.address)) {
            if *a != guest {
                self.aliases.insert(*a, guest);
            }
        }
        self.sides.insert(guest, Side::Serve(s));
    }

    /// Forgets `key` (a forwarded address or a served VM) and its aliases.
    pub fn remove(&mut self, key: IpAddr) -> Option<Side> {
        let side = self.sides.remove(&key);
        if matches!(side, Some(Side::Serve(_))) {
            self.aliases.retain(|_, g| *g != key);
        }
        side
    }

    /// The connections a served VM has, for the site it moves to.
    pub fn handover(&self, guest: IpAddr) -> Vec<Handed> {
        let Some(Side::Serve(s)) = self.sides.get(&guest) else {
            return Vec::new();
        };
        let live = |t: &FlowTable, origin: IpAddr| {
            t.iter()
                .filter(|(_, f)| f.tcp != Some(TcpState::Closed))
                .map(move |(k, f)| Handed {
                    origin,
                    key: *k,
                    tcp: f.tcp,
                })
                .collect::<Vec<_>>()
        };
        let mut out: Vec<Handed> = s
            .origins
            .iter()
            .flat_map(|o| live(&o.flows, o.address))
            .collect();
        if let Some(p) = s.public {
            out.extend(live(&s.translated, p));
        }
        out
    }

    /// The kernel fast path's part for a side: (peer, role), or none when
    /// the plane must see every packet (a served VM with origins other
    /// than its home, or at its home: replies choose their way per flow).
    pub fn fast_role(&self, key: IpAddr) -> Option<(IpAddr, tunnel::fastpath::Role)> {
        match self.sides.get(&key)? {
            Side::Forward { peer, .. } => Some((*peer, tunnel::fastpath::Role::Old)),
            Side::Serve(s) => match (&s.public, &s.origins[..]) {
                (Some(_), [o]) if o.address == key => Some((o.peer, tunnel::fastpath::Role::New)),
                _ => None,
            },
        }
    }

    /// A packet read from the TUN device (rewritten in place when
    /// translated); the TCP flow to keep off the fast path, if one starts.
    pub fn outbound(&mut self, pkt: &mut [u8], now: u64) -> (Out, Option<Translated>) {
        let i = match Inner::parse(pkt) {
            Ok(i) if !i.forwardable() => return (Out::Drop(DropReason::LinkLocal), None),
            Ok(i) => i,
            Err(why) => return (Out::Drop(why), None),
        };
        let (src, dst) = (i.src, i.dst);
        // a forwarded address: to the serving site
        if let Some(Side::Forward {
            peer,
            flows,
            last_ms,
        }) = self.sides.get_mut(&dst)
        {
            flows.observe(&i, now);
            *last_ms = now;
            return (Out::Tunnel(*peer), None);
        }
        // from a VM served here
        if let Some(Side::Serve(s)) = self.sides.get_mut(&src) {
            let via = s.origins.iter().position(|o| o.flows.knows(&i));
            let via = via.or_else(|| {
                let before_move = !s.translated.knows(&i)
                    && matches!(i.transport, Transport::Tcp { flags, .. } if !flags.syn || flags.ack);
                before_move.then(|| s.home(src)).flatten()
            });
            if let Some(k) = via {
                let o = &mut s.origins[k];
                o.flows.observe(&i, now);
                let (peer, address) = (o.peer, o.address);
                if address != src {
                    if let Out::Drop(why) = rewrite(pkt, tunnel::nat::rewrite_src, address) {
                        return (Out::Drop(why), None);
                    }
                }
                return (Out::Tunnel(peer), None);
            }
            let Some(public) = s.public else {
                // at home: as it is, the kernel routes it
                return (Out::Back, None);
            };
            let seen = s.translated.observe(&i, now);
            let keep = ends(&i).filter(|_| seen.new);
            return (rewrite(pkt, tunnel::nat::rewrite_src, public), keep);
        }
        // to a served VM's public address here
        if let Some(&guest) = self.aliases.get(&dst) {
            if let Some(Side::Serve(s)) = self.sides.get_mut(&guest) {
                if s.public == Some(dst) {
                    let seen = s.translated.observe(&Inner { dst: guest, ..i }, now);
                    // the VM answers as dst → src
                    let keep = ends(&i)
                        .filter(|_| seen.new)
                        .map(|(from, to)| (to_guest(to, guest), from));
                    return (rewrite(pkt, tunnel::nat::rewrite_dst, guest), keep);
                }
            }
        }
        (Out::Drop(DropReason::UnregisteredDestination), None)
    }

    /// A packet out of the tunnel: for a VM served here from one of its
    /// origins, or a forwarded address's reply. Its flow is counted.
    pub fn inbound(&mut self, i: &Inner<'_>, now: u64) -> In {
        let guest = match self.sides.get(&i.dst) {
            Some(Side::Serve(_)) => Some(i.dst),
            _ => self.aliases.get(&i.dst).copied(),
        };
        if let Some(guest) = guest {
            if let Some(Side::Serve(s)) = self.sides.get_mut(&guest) {
                return match s.origins.iter_mut().find(|o| o.address == i.dst) {
                    Some(o) => {
                        o.flows.observe(&Inner { dst: guest, ..*i }, now);
                        if i.dst == guest {
                            In::Deliver
                        } else {
                            In::DeliverTo(guest)
                        }
                    }
                    None => In::Drop,
                };
            }
        }
        match self.sides.get_mut(&i.src) {
            Some(Side::Forward { flows, last_ms, .. }) => {
                flows.observe(i, now);
                *last_ms = now;
                In::Deliver
            }
            _ => In::Drop,
        }
    }

    /// Segments the kernel fast path carried for a guest's TCP flow: its
    /// flow table learns of them as if they had come through the plane
    /// (the flow stays live, and so does a forward's drain clock).
    pub fn carried(&mut self, c: &tunnel::fastpath::Carried, now_ms: u64) {
        let (key, forward) = FlowKey::between(6, c.from, c.to);
        for guest in [c.to.0, c.from.0] {
            match self.sides.get_mut(&guest) {
                Some(Side::Forward { flows, last_ms, .. }) => {
                    flows.touch(key, forward, c.packets, c.bytes, now_ms);
                    *last_ms = now_ms;
                    return;
                }
                Some(Side::Serve(s)) => {
                    // the origin that knows the flow; one the kernel saw
                    // first belongs to the home site when that is the one
                    // origin (the only shape the fast path carries). What
                    // it carried for this address in an earlier role is
                    // no connection of any other origin's.
                    let only_home = matches!(&s.origins[..], [o] if o.address == guest);
                    if let Some(o) = s
                        .origins
                        .iter_mut()
                        .find(|o| o.flows.get(&key).is_some() || only_home)
                    {
                        o.flows.touch(key, forward, c.packets, c.bytes, now_ms);
                    }
                    return;
                }
                None => {}
            }
        }
    }

    /// Expires idle and ended flows everywhere; returns the translated TCP
    /// flows that ended (for the fast path to forget).
    pub fn expire(&mut self, now_ms: u64) -> Vec<FlowKey> {
        let mut ended = Vec::new();
        for side in self.sides.values_mut() {
            match side {
                Side::Forward { flows, .. } => {
                    flows.expire(now_ms);
                }
                Side::Serve(s) => {
                    for o in &mut s.origins {
                        o.flows.expire(now_ms);
                    }
                    ended.extend(s.translated.expire(now_ms).into_iter().map(|(k, _)| k));
                }
            }
        }
        ended
    }

    /// A forward with no live flow and no packet for `quiet_ms`.
    pub fn idle(&self, address: IpAddr, now_ms: u64, quiet_ms: u64) -> bool {
        match self.sides.get(&address) {
            Some(Side::Forward { flows, last_ms, .. }) => {
                flows.live() == 0 && now_ms.saturating_sub(*last_ms) >= quiet_ms
            }
            _ => true,
        }
    }

    pub fn stats(&self, key: IpAddr) -> Option<Stats> {
        let sum = |t: &FlowTable| {
            t.iter().fold((0u64, 0u64), |(p, b), (_, f)| {
                (p + f.packets[0] + f.packets[1], b + f.bytes[0] + f.bytes[1])
            })
        };
        Some(match self.sides.get(&key)? {
            Side::Forward { flows, .. } => {
                let (packets, bytes) = sum(flows);
                Stats {
                    flows: flows.len(),
                    live_flows: flows.live(),
                    packets,
                    bytes,
                    translated_flows: 0,
                }
            }
            Side::Serve(s) => s.origins.iter().fold(
                Stats {
                    translated_flows: s.translated.len(),
                    ..Stats::default()
                },
                |mut st, o| {
                    let (p, b) = sum(&o.flows);
                    st.flows += o.flows.len();
                    st.live_flows += o.flows.live();
                    st.packets += p;
                    st.bytes += b;
                    st
                },
            ),
        })
    }
}

fn to_guest(end: (IpAddr, u16), guest: IpAddr) -> (IpAddr, u16) {
    (guest, end.1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tunnel::fastpath::Role;

    const G: [u8; 4] = [10, 1, 0, 10];
    const CLIENT: [u8; 4] = [10, 0, 0, 2];
    const P_B: [u8; 4] = [10, 2, 0, 100];
    const P_C: [u8; 4] = [10, 3, 0, 100];
    const GW_A: [u8; 4] = [198, 51, 100, 2];
    const GW_B: [u8; 4] = [203, 0, 113, 2];
    const GW_C: [u8; 4] = [192, 0, 2, 2];

    fn ip(a: [u8; 4]) -> IpAddr {
        IpAddr::from(a)
    }

    /// A TCP segment; `syn` without ACK opens a connection.
    fn tcp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, syn: bool) -> Vec<u8> {
        let mut b = etherparse::PacketBuilder::ipv4(src, dst, 64).tcp(sport, dport, 1, 65535);
        b = if syn { b.syn() } else { b.ack(1) };
        let mut out = Vec::new();
        b.write(&mut out, b"data").expect("build");
        out
    }

    fn addrs(p: &[u8]) -> (IpAddr, IpAddr) {
        let i = Inner::parse(p).expect("a valid packet after rewriting");
        (i.src, i.dst)
    }

    fn inbound(t: &mut Tables, p: &[u8]) -> In {
        t.inbound(&Inner::parse(p).expect("packet"), 0)
    }

    fn out(t: &mut Tables, p: &mut [u8]) -> Out {
        t.outbound(p, 0).0
    }

    /// Site B's tables after the first move (from home, site A).
    fn serving_after_the_first_move() -> Tables {
        let mut t = Tables::default();
        let home = [(ip(GW_A), ip(G))];
        t.serve(ip(G), Some(ip(P_B)), &home, &[], Timeouts::default(), 0);
        t
    }

    #[test]
    fn the_first_move_tunnels_old_connections_home_and_translates_new_ones() {
        let mut t = serving_after_the_first_move();
        assert_eq!(t.fast_role(ip(G)), Some((ip(GW_A), Role::New)));
        // a client's connection forwarded by the home site: delivered, and
        // the VM's replies go back there untranslated
        assert_eq!(
            inbound(&mut t, &tcp(CLIENT, 40000, G, 7000, false)),
            In::Deliver
        );
        let mut reply = tcp(G, 7000, CLIENT, 40000, false);
        assert_eq!(out(&mut t, &mut reply), Out::Tunnel(ip(GW_A)));
        assert_eq!(addrs(&reply), (ip(G), ip(CLIENT)));
        // a connection from before the move, the VM speaking first: home
        let mut first = tcp(G, 7000, CLIENT, 40001, false);
        assert_eq!(out(&mut t, &mut first), Out::Tunnel(ip(GW_A)));
        // the VM opens one: translated to its public address here, and
        // kept off the fast path
        let mut syn = tcp(G, 50000, CLIENT, 80, true);
        let (o, keep) = t.outbound(&mut syn, 0);
        assert_eq!(o, Out::Back);
        assert_eq!(keep, Some(((ip(G), 50000), (ip(CLIENT), 80))));
        assert_eq!(addrs(&syn), (ip(P_B), ip(CLIENT)));
        let mut more = tcp(G, 50000, CLIENT, 80, false);
        assert_eq!(out(&mut t, &mut more), Out::Back);
        assert_eq!(addrs(&more), (ip(P_B), ip(CLIENT)));
        // a client reaches the public address: translated to the VM
        let mut to_p = tcp(CLIENT, 40002, P_B, 7000, true);
        let (o, keep) = t.outbound(&mut to_p, 0);
        assert_eq!(
            (o, keep),
            (Out::Back, Some(((ip(G), 7000), (ip(CLIENT), 40002))))
        );
        assert_eq!(addrs(&to_p), (ip(CLIENT), ip(G)));
        // an address nobody serves here
        let mut stray = tcp(CLIENT, 1, [10, 2, 0, 99], 2, true);
        assert_eq!(
            out(&mut t, &mut stray),
            Out::Drop(DropReason::UnregisteredDestination)
        );
        let s = t.stats(ip(G)).expect("stats");
        assert_eq!((s.flows, s.translated_flows), (2, 2));
    }

    /// A→B→C: at C, the connections that came to A (the VM's own address)
    /// and those that came to B (B's public address) each go back the way
    /// they came, translated back to the address the client used.
    #[test]
    fn a_second_move_sends_each_connection_back_through_the_site_it_came_to() {
        let mut b = serving_after_the_first_move();
        assert_eq!(
            inbound(&mut b, &tcp(CLIENT, 40000, G, 7000, false)),
            In::Deliver
        );
        let mut to_p = tcp(CLIENT, 40002, P_B, 7000, true);
        assert_eq!(out(&mut b, &mut to_p), Out::Back);
        let handed = b.handover(ip(G));
        assert_eq!(handed.len(), 2, "{handed:?}");

        let mut c = Tables::default();
        c.serve(
            ip(G),
            Some(ip(P_C)),
            &[(ip(GW_A), ip(G)), (ip(GW_B), ip(P_B))],
            &handed,
            Timeouts::default(),
            0,
        );
        assert_eq!(
            c.fast_role(ip(G)),
            None,
            "replies choose their way per flow"
        );
        // the connection opened to B: back to B, as from B's public address
        let mut r = tcp(G, 7000, CLIENT, 40002, false);
        assert_eq!(out(&mut c, &mut r), Out::Tunnel(ip(GW_B)));
        assert_eq!(addrs(&r), (ip(P_B), ip(CLIENT)));
        // the one opened to A: back to A as it is
        let mut r = tcp(G, 7000, CLIENT, 40000, false);
        assert_eq!(out(&mut c, &mut r), Out::Tunnel(ip(GW_A)));
        assert_eq!(addrs(&r), (ip(G), ip(CLIENT)));
        // B forwards a packet to its public address: delivered to the VM
        assert_eq!(
            inbound(&mut c, &tcp(CLIENT, 40003, P_B, 7000, true)),
            In::DeliverTo(ip(G))
        );
        // and its reply goes back to B (learnt from the packet in)
        let mut r = tcp(G, 7000, CLIENT, 40003, true);
        assert_eq!(out(&mut c, &mut r), Out::Tunnel(ip(GW_B)));
        assert_eq!(addrs(&r), (ip(P_B), ip(CLIENT)));
        // a connection nobody knows, not opening: from before the first
        // move, home
        let mut r = tcp(G, 7000, CLIENT, 40099, false);
        assert_eq!(out(&mut c, &mut r), Out::Tunnel(ip(GW_A)));
        // to C's own public address: translated here
        let mut p = tcp(CLIENT, 40004, P_C, 7000, true);
        assert_eq!(out(&mut c, &mut p), Out::Back);
        assert_eq!(addrs(&p), (ip(CLIENT), ip(G)));
        // the origins' addresses are not C's to translate outbound
        let mut p = tcp(CLIENT, 40005, P_B, 7000, true);
        assert_eq!(
            out(&mut c, &mut p),
            Out::Drop(DropReason::UnregisteredDestination)
        );
        // and a tunnelled packet to C's own public address is no origin's
        assert_eq!(inbound(&mut c, &tcp(CLIENT, 1, P_C, 7000, true)), In::Drop);
    }

    /// …→C→A: at home the VM speaks as itself; only the connections that
    /// came to B or C go back through them.
    #[test]
    fn at_home_again_only_connections_from_other_sites_are_tunnelled() {
        let mut a = Tables::default();
        let flow = |port: u16| FlowKey::between(6, (ip(CLIENT), port), (ip(G), 7000)).0;
        let handed = [
            Handed {
                origin: ip(P_B),
                key: flow(1),
                tcp: Some(TcpState::Established),
            },
            Handed {
                origin: ip(P_C),
                key: flow(2),
                tcp: Some(TcpState::Established),
            },
            Handed {
                origin: ip(G),
                key: flow(3),
                tcp: Some(TcpState::Established),
            },
        ];
        a.serve(
            ip(G),
            None,
            &[(ip(GW_B), ip(P_B)), (ip(GW_C), ip(P_C))],
            &handed,
            Timeouts::default(),
            0,
        );
        assert_eq!(a.fast_role(ip(G)), None);
        let mut r = tcp(G, 7000, CLIENT, 2, false);
        assert_eq!(out(&mut a, &mut r), Out::Tunnel(ip(GW_C)));
        assert_eq!(addrs(&r), (ip(P_C), ip(CLIENT)));
        let mut r = tcp(G, 7000, CLIENT, 1, false);
        assert_eq!(out(&mut a, &mut r), Out::Tunnel(ip(GW_B)));
        // its own connections, old or new: as they are
        for (port, syn) in [(3, false), (4, false), (5, true)] {
            let mut r = tcp(G, 7000, CLIENT, port, syn);
            let before = r.clone();
            assert_eq!(out(&mut a, &mut r), Out::Back);
            assert_eq!(r, before);
        }
        assert_eq!(a.stats(ip(G)).expect("stats").translated_flows, 0);
    }

    #[test]
    fn a_forward_tunnels_its_address_and_keeps_its_flows_when_re_pointed() {
        let mut t = Tables::default();
        t.forward(ip(P_B), ip(GW_C), Timeouts::default(), 0);
        assert_eq!(t.fast_role(ip(P_B)), Some((ip(GW_C), Role::Old)));
        let mut p = tcp(CLIENT, 40000, P_B, 7000, false);
        assert_eq!(out(&mut t, &mut p), Out::Tunnel(ip(GW_C)));
        assert_eq!(addrs(&p), (ip(CLIENT), ip(P_B)), "forwarded as it came");
        assert_eq!(
            inbound(&mut t, &tcp(P_B, 7000, CLIENT, 40000, false)),
            In::Deliver
        );
        assert_eq!(
            inbound(&mut t, &tcp(G, 7000, CLIENT, 40000, false)),
            In::Drop
        );
        // the VM moved on to A: the same flows, a new peer
        t.forward(ip(P_B), ip(GW_A), Timeouts::default(), 5);
        let mut p = tcp(CLIENT, 40000, P_B, 7000, false);
        assert_eq!(out(&mut t, &mut p), Out::Tunnel(ip(GW_A)));
        assert_eq!(t.stats(ip(P_B)).expect("stats").flows, 1);
        assert!(
            !t.idle(ip(P_B), 10_000, 1000),
            "a live flow holds the drain"
        );
        // serving again here replaces the forward
        t.serve(
            ip(G),
            Some(ip(P_B)),
            &[(ip(GW_A), ip(G))],
            &[],
            Timeouts::default(),
            0,
        );
        assert!(t.get(&ip(P_B)).is_none());
        let mut p = tcp(CLIENT, 40000, P_B, 7000, false);
        assert_eq!(out(&mut t, &mut p), Out::Back);
        // and leaving again removes the VM's aliases with it
        t.remove(ip(G));
        let mut p = tcp(CLIENT, 40000, P_B, 7000, false);
        assert_eq!(
            out(&mut t, &mut p),
            Out::Drop(DropReason::UnregisteredDestination)
        );
    }

    /// What the kernel carried while this site forwarded the VM's address
    /// is reported after it serves the VM again: those connections are no
    /// other origin's (their replies would leave with the wrong address).
    #[test]
    fn carried_flows_are_counted_for_the_origin_they_belong_to_or_none() {
        let mut a = Tables::default();
        a.serve(
            ip(G),
            None,
            &[(ip(GW_B), ip(P_B)), (ip(GW_C), ip(P_C))],
            &[],
            Timeouts::default(),
            0,
        );
        let carried = tunnel::fastpath::Carried {
            from: (ip(CLIENT), 40000),
            to: (ip(G), 7002),
            packets: 10,
            bytes: 14280,
        };
        a.carried(&carried, 0);
        let mut r = tcp(G, 7002, CLIENT, 40000, false);
        assert_eq!(
            out(&mut a, &mut r),
            Out::Back,
            "a connection of its own, at home"
        );
        assert_eq!(addrs(&r), (ip(G), ip(CLIENT)));
        // with the home site as its one origin, the kernel's flows are home's
        let mut b = serving_after_the_first_move();
        b.carried(&carried, 0);
        assert_eq!(b.stats(ip(G)).expect("stats").flows, 1);
    }

    #[test]
    fn link_local_and_malformed_packets_are_dropped_with_their_reason() {
        let mut t = Tables::default();
        let mut ll = tcp([169, 254, 0, 1], 1, CLIENT, 2, true);
        assert_eq!(out(&mut t, &mut ll), Out::Drop(DropReason::LinkLocal));
        let mut junk = vec![0x45, 0, 0];
        assert_eq!(
            out(&mut t, &mut junk),
            Out::Drop(DropReason::InnerMalformed)
        );
    }
}
