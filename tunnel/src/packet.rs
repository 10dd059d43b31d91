//! An inner IP packet, parsed and validated once: addresses, protocol, ports
//! and the facts the data plane decides on. Every malformed packet is a
//! [`DropReason`] with a reason (counted by the gateway), never a panic.

use std::net::IpAddr;

use etherparse::{IpNumber, IpSlice, TcpHeaderSlice, UdpHeaderSlice};
use serde::{Deserialize, Serialize};

/// Why a packet was not forwarded. Each reason is a counter.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    thiserror::Error,
)]
pub enum DropReason {
    #[error("outer source is not a configured peer gateway")]
    UnknownPeer,
    #[error("outer packet malformed or truncated")]
    OuterMalformed,
    #[error("inner packet malformed or truncated")]
    InnerMalformed,
    #[error("inner IP version does not match the encapsulation")]
    ProtocolMismatch,
    #[error("inner destination is not a registered address")]
    UnregisteredDestination,
    #[error("new connection to a drained address")]
    Drained,
    #[error("inner TTL or hop limit exhausted")]
    TtlExpired,
    #[error("link-local inner packet (routers do not forward it)")]
    LinkLocal,
    #[error("the kernel refused the packet (no route, too big for the device)")]
    Refused,
}

impl DropReason {
    pub const ALL: [DropReason; 9] = [
        DropReason::UnknownPeer,
        DropReason::OuterMalformed,
        DropReason::InnerMalformed,
        DropReason::ProtocolMismatch,
        DropReason::UnregisteredDestination,
        DropReason::Drained,
        DropReason::TtlExpired,
        DropReason::LinkLocal,
        DropReason::Refused,
    ];

    /// The metrics label.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::UnknownPeer => "unknown_peer",
            DropReason::OuterMalformed => "outer_malformed",
            DropReason::InnerMalformed => "inner_malformed",
            DropReason::ProtocolMismatch => "protocol_mismatch",
            DropReason::UnregisteredDestination => "unregistered_destination",
            DropReason::Drained => "drained",
            DropReason::TtlExpired => "ttl_expired",
            DropReason::LinkLocal => "link_local",
            DropReason::Refused => "refused",
        }
    }
}

/// TCP flags the flow table needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TcpFlags {
    pub syn: bool,
    pub ack: bool,
    pub fin: bool,
    pub rst: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Tcp {
        sport: u16,
        dport: u16,
        flags: TcpFlags,
    },
    Udp {
        sport: u16,
        dport: u16,
    },
    /// ICMP/ICMPv6 echo: the identifier plays the port.
    Echo {
        id: u16,
    },
    /// Other ICMP, other protocols, and non-first fragments (no ports).
    Other,
}

/// A validated inner packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Inner<'a> {
    /// Exactly the packet (trailing bytes beyond its length excluded).
    pub bytes: &'a [u8],
    pub src: IpAddr,
    pub dst: IpAddr,
    /// IP protocol / IPv6 upper-layer next header.
    pub proto: u8,
    pub transport: Transport,
    /// IPv4 DF (IPv6 packets are never fragmented on the way: always true).
    pub dont_fragment: bool,
    pub ttl: u8,
}

impl<'a> Inner<'a> {
    pub fn is_v4(&self) -> bool {
        self.src.is_ipv4()
    }

    /// Whether a router may forward it: not link-local in either address,
    /// not to link-scoped multicast or broadcast. (Kernels send router
    /// solicitations and the like on any interface, the TUN device included.)
    pub fn forwardable(&self) -> bool {
        let link_local = |a: IpAddr| match a {
            IpAddr::V4(v4) => {
                v4.is_link_local() || v4.is_broadcast() || (v4.octets()[..3] == [224, 0, 0])
            }
            IpAddr::V6(v6) => {
                let s = v6.segments()[0];
                (s & 0xffc0) == 0xfe80 || (s & 0xff00 == 0xff00 && (s & 0x000f) <= 2)
            }
        };
        !link_local(self.src) && !link_local(self.dst)
    }

    /// Parses an IPv4 or IPv6 packet; the transport header is checked when
    /// present (first fragment or unfragmented).
    pub fn parse(bytes: &'a [u8]) -> Result<Self, DropReason> {
        let ip = IpSlice::from_slice(bytes).map_err(|_| DropReason::InnerMalformed)?;
        let (src, dst, dont_fragment, ttl, total, first_fragment) = match &ip {
            IpSlice::Ipv4(v4) => {
                let h = v4.header();
                let offset = h.fragments_offset().value();
                (
                    IpAddr::V4(h.source_addr()),
                    IpAddr::V4(h.destination_addr()),
                    h.dont_fragment(),
                    h.ttl(),
                    usize::from(h.total_len()),
                    offset == 0,
                )
            }
            IpSlice::Ipv6(v6) => {
                let h = v6.header();
                let first = fragment_offset_zero_v6(v6);
                (
                    IpAddr::V6(h.source_addr()),
                    IpAddr::V6(h.destination_addr()),
                    true,
                    h.hop_limit(),
                    40 + usize::from(h.payload_length()),
                    first,
                )
            }
        };
        if total > bytes.len() {
            return Err(DropReason::InnerMalformed);
        }
        let payload = ip.payload();
        let proto = payload.ip_number.0;
        let transport = if !first_fragment {
            Transport::Other
        } else {
            transport_of(payload.ip_number, payload.payload, payload.fragmented)?
        };
        Ok(Inner {
            bytes: &bytes[..total],
            src,
            dst,
            proto,
            transport,
            dont_fragment,
            ttl,
        })
    }
}

fn fragment_offset_zero_v6(v6: &etherparse::Ipv6Slice<'_>) -> bool {
    use etherparse::Ipv6ExtensionSlice;
    v6.extensions().clone().into_iter().all(|e| match e {
        Ipv6ExtensionSlice::Fragment(f) => f.fragment_offset().value() == 0,
        _ => true,
    })
}

fn transport_of(
    ip_number: IpNumber,
    payload: &[u8],
    fragmented: bool,
) -> Result<Transport, DropReason> {
    Ok(match ip_number {
        IpNumber::TCP => {
            // a first fragment may legally cut the header short; treat as portless
            let Ok(t) = TcpHeaderSlice::from_slice(payload) else {
                return if fragmented {
                    Ok(Transport::Other)
                } else {
                    Err(DropReason::InnerMalformed)
                };
            };
            Transport::Tcp {
                sport: t.source_port(),
                dport: t.destination_port(),
                flags: TcpFlags {
                    syn: t.syn(),
                    ack: t.ack(),
                    fin: t.fin(),
                    rst: t.rst(),
                },
            }
        }
        IpNumber::UDP => {
            let Ok(u) = UdpHeaderSlice::from_slice(payload) else {
                return if fragmented {
                    Ok(Transport::Other)
                } else {
                    Err(DropReason::InnerMalformed)
                };
            };
            Transport::Udp {
                sport: u.source_port(),
                dport: u.destination_port(),
            }
        }
        IpNumber::ICMP if payload.len() >= 8 && matches!(payload[0], 0 | 8) => Transport::Echo {
            id: u16::from_be_bytes([payload[4], payload[5]]),
        },
        IpNumber::IPV6_ICMP if payload.len() >= 8 && matches!(payload[0], 128 | 129) => {
            Transport::Echo {
                id: u16::from_be_bytes([payload[4], payload[5]]),
            }
        }
        _ => Transport::Other,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use etherparse::PacketBuilder;
    use proptest::prelude::*;

    use super::*;

    pub fn tcp_v4(
        src: [u8; 4],
        dst: [u8; 4],
        sport: u16,
        dport: u16,
        syn: bool,
        payload: &[u8],
    ) -> Vec<u8> {
        let mut b = PacketBuilder::ipv4(src, dst, 64).tcp(sport, dport, 1000, 65535);
        if syn {
            b = b.syn();
        } else {
            b = b.ack(1);
        }
        let mut out = Vec::new();
        b.write(&mut out, payload).expect("build");
        out
    }

    pub fn udp_v6(src: [u8; 16], dst: [u8; 16], sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        PacketBuilder::ipv6(src, dst, 64)
            .udp(sport, dport)
            .write(&mut out, payload)
            .expect("build");
        out
    }

    #[test]
    fn parses_tcp_udp_and_echo() {
        let p = tcp_v4([10, 0, 0, 1], [10, 0, 0, 2], 40000, 80, true, b"");
        let i = Inner::parse(&p).expect("parse");
        assert_eq!(i.src, IpAddr::from([10, 0, 0, 1]));
        assert!(
            matches!(i.transport, Transport::Tcp { sport: 40000, dport: 80, flags } if flags.syn)
        );
        let mut u = udp_v6([0xfd; 16], [0xfe; 16], 5000, 53, b"hello");
        u.extend_from_slice(b"trailing junk"); // beyond the IPv6 payload length: excluded
        let i = Inner::parse(&u).expect("parse");
        assert_eq!(i.bytes.len(), 40 + 8 + 5);
        assert!(matches!(
            i.transport,
            Transport::Udp {
                sport: 5000,
                dport: 53
            }
        ));
        let mut ping = Vec::new();
        PacketBuilder::ipv4([1, 1, 1, 1], [2, 2, 2, 2], 9)
            .icmpv4_echo_request(77, 1)
            .write(&mut ping, b"x")
            .expect("build");
        assert!(matches!(
            Inner::parse(&ping).expect("parse").transport,
            Transport::Echo { id: 77 }
        ));
    }

    #[test]
    fn link_local_traffic_is_not_forwardable() {
        let fe80 = [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        let ff02 = [0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
        let global = [0x20, 0x01, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        assert!(!Inner::parse(&udp_v6(fe80, global, 1, 2, b""))
            .expect("p")
            .forwardable());
        assert!(!Inner::parse(&udp_v6(global, ff02, 1, 2, b""))
            .expect("p")
            .forwardable());
        assert!(Inner::parse(&udp_v6(global, global, 1, 2, b""))
            .expect("p")
            .forwardable());
        assert!(
            !Inner::parse(&tcp_v4([169, 254, 1, 1], [10, 0, 0, 1], 1, 2, false, b""))
                .expect("p")
                .forwardable()
        );
        assert!(
            Inner::parse(&tcp_v4([10, 0, 0, 2], [10, 0, 0, 1], 1, 2, false, b""))
                .expect("p")
                .forwardable()
        );
    }

    #[test]
    fn truncated_or_lying_packets_are_drops() {
        let p = tcp_v4([10, 0, 0, 1], [10, 0, 0, 2], 1, 2, false, b"data");
        for cut in 0..p.len() {
            assert_eq!(
                Inner::parse(&p[..cut]),
                Err(DropReason::InnerMalformed),
                "cut {cut}"
            );
        }
        let mut lying = p.clone();
        lying[2..4].copy_from_slice(&2000u16.to_be_bytes()); // total length beyond the data
        assert_eq!(Inner::parse(&lying), Err(DropReason::InnerMalformed));
        assert_eq!(Inner::parse(&[0x45]), Err(DropReason::InnerMalformed));
        assert_eq!(Inner::parse(&[0x70; 40]), Err(DropReason::InnerMalformed)); // version 7
    }

    proptest! {
        #[test]
        fn parse_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(i) = Inner::parse(&bytes) {
                prop_assert!(i.bytes.len() <= bytes.len());
            }
        }

        #[test]
        fn mutated_packets_never_panic(at in any::<prop::sample::Index>(), x in 1..=255u8) {
            let mut p = tcp_v4([10, 0, 0, 1], [10, 0, 0, 2], 1, 2, false, b"payload");
            let i = at.index(p.len());
            p[i] ^= x;
            let _ = Inner::parse(&p);
        }
    }
}
