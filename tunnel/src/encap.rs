//! Encapsulations and the checks on the way out of the tunnel.
//!
//! IP-in-IP carries the inner packet right after an outer IP header whose
//! protocol says what is inside: 4 for IPv4 (RFC 2003; note etherparse's
//! `IpNumber::IPIP` is 94, the obsolete IP-within-IP) and 41 for IPv6. The
//! outer header is IPv4 or IPv6, so this covers IPIP, 6in4 (SIT), 4in6 and
//! 6in6. FOU carries the inner packet directly as a UDP payload, as Linux's
//! `ip fou add port P ipproto 4|41` expects.

use std::net::IpAddr;

use etherparse::{IpNumber, Ipv4Header, Ipv4Slice, Ipv6FlowLabel, Ipv6Header, PacketBuilder};
use serde::{Deserialize, Serialize};

use crate::packet::{DropReason, Inner};

/// IP protocol of an IPv4 inner packet (RFC 2003).
pub const PROTO_IPV4: u8 = 4;
/// IP protocol of an IPv6 inner packet (RFC 4213).
pub const PROTO_IPV6: u8 = 41;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "kind")]
pub enum Kind {
    /// IP-in-IP over raw sockets: protocol 4 or 41 by the inner version.
    Ipip,
    /// Foo-over-UDP to this port.
    Fou { port: u16 },
}

/// How a payload arrived at the decapsulating gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// A raw socket for this IP protocol (4 or 41).
    IpProto(u8),
    /// A FOU UDP socket; `ipproto` as configured on the port, if any.
    Fou { ipproto: Option<u8> },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EncapError {
    #[error("outer addresses {0} and {1} are of different families")]
    Family(IpAddr, IpAddr),
    #[error("inner packet of {0} bytes does not fit an outer IP packet")]
    TooBig(usize),
}

/// The IP protocol that carries `inner` in IP-in-IP.
pub fn ip_proto_for(inner: &Inner<'_>) -> u8 {
    if inner.is_v4() {
        PROTO_IPV4
    } else {
        PROTO_IPV6
    }
}

/// A complete outer packet (outer IP header, UDP for FOU, then `inner`).
/// The outer IPv4 header never sets DF: an oversize outer packet may be
/// fragmented on the way and reassembled by the far gateway's kernel.
pub fn encapsulate(
    inner: &Inner<'_>,
    outer_src: IpAddr,
    outer_dst: IpAddr,
    kind: Kind,
    ttl: u8,
) -> Result<Vec<u8>, EncapError> {
    let too_big = |_| EncapError::TooBig(inner.bytes.len());
    let mut out = Vec::with_capacity(inner.bytes.len() + 48);
    match (kind, outer_src, outer_dst) {
        (Kind::Ipip, IpAddr::V4(s), IpAddr::V4(d)) => {
            let len = u16::try_from(inner.bytes.len()).map_err(too_big)?;
            let mut h = Ipv4Header::new(
                len,
                ttl,
                IpNumber(ip_proto_for(inner)),
                s.octets(),
                d.octets(),
            )
            .map_err(|_| EncapError::TooBig(inner.bytes.len()))?;
            h.dont_fragment = false;
            h.header_checksum = h.calc_header_checksum();
            h.write(&mut out)
                .map_err(|_| EncapError::TooBig(inner.bytes.len()))?;
        }
        (Kind::Ipip, IpAddr::V6(s), IpAddr::V6(d)) => {
            let h = Ipv6Header {
                traffic_class: 0,
                flow_label: Ipv6FlowLabel::ZERO,
                payload_length: u16::try_from(inner.bytes.len()).map_err(too_big)?,
                next_header: IpNumber(ip_proto_for(inner)),
                hop_limit: ttl,
                source: s.octets(),
                destination: d.octets(),
            };
            h.write(&mut out)
                .map_err(|_| EncapError::TooBig(inner.bytes.len()))?;
        }
        (Kind::Fou { port }, IpAddr::V4(s), IpAddr::V4(d)) => {
            PacketBuilder::ipv4(s.octets(), d.octets(), ttl)
                .udp(port, port)
                .write(&mut out, inner.bytes)
                .map_err(|_| EncapError::TooBig(inner.bytes.len()))?;
            return Ok(out);
        }
        (Kind::Fou { port }, IpAddr::V6(s), IpAddr::V6(d)) => {
            PacketBuilder::ipv6(s.octets(), d.octets(), ttl)
                .udp(port, port)
                .write(&mut out, inner.bytes)
                .map_err(|_| EncapError::TooBig(inner.bytes.len()))?;
            return Ok(out);
        }
        (_, s, d) => return Err(EncapError::Family(s, d)),
    }
    out.extend_from_slice(inner.bytes);
    Ok(out)
}

/// Checks a payload that came out of the tunnel: from a configured peer,
/// the inner version what the encapsulation says, the inner packet whole.
pub fn decapsulate<'a>(
    peers: &[IpAddr],
    outer_src: IpAddr,
    via: Via,
    payload: &'a [u8],
) -> Result<Inner<'a>, DropReason> {
    if !peers.contains(&outer_src) {
        return Err(DropReason::UnknownPeer);
    }
    let inner = Inner::parse(payload)?;
    let proto = ip_proto_for(&inner);
    let expected = match via {
        Via::IpProto(p) => Some(p),
        Via::Fou { ipproto } => ipproto,
    };
    if expected.is_some_and(|p| p != proto) {
        return Err(DropReason::ProtocolMismatch);
    }
    if inner.ttl == 0 {
        return Err(DropReason::TtlExpired);
    }
    Ok(inner)
}

/// As [`decapsulate`], for a whole outer IPv4 packet (what an IPv4 raw
/// socket delivers: the header included).
pub fn decapsulate_ipv4_packet<'a>(
    peers: &[IpAddr],
    packet: &'a [u8],
) -> Result<Inner<'a>, DropReason> {
    let outer = Ipv4Slice::from_slice(packet).map_err(|_| DropReason::OuterMalformed)?;
    if outer.is_payload_fragmented() {
        // the kernel reassembles before a raw socket sees it; a fragment here is malformed input
        return Err(DropReason::OuterMalformed);
    }
    let proto = outer.payload().ip_number.0;
    if proto != PROTO_IPV4 && proto != PROTO_IPV6 {
        return Err(DropReason::OuterMalformed);
    }
    let src = IpAddr::V4(outer.header().source_addr());
    decapsulate(peers, src, Via::IpProto(proto), outer.payload().payload)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::packet::tests::{tcp_v4, udp_v6};

    const A4: [u8; 4] = [192, 0, 2, 1];
    const B4: [u8; 4] = [198, 51, 100, 1];
    const A6: [u8; 16] = [0x20, 0x01, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    const B6: [u8; 16] = [0x20, 0x01, 0xd, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

    /// Splits an outer packet into (source, via, payload) as the sockets would.
    fn receive(outer: &[u8], kind: Kind) -> (IpAddr, Via, &[u8]) {
        let ip = etherparse::IpSlice::from_slice(outer).expect("outer parses");
        let (src, proto, payload) = match &ip {
            etherparse::IpSlice::Ipv4(v4) => (
                IpAddr::V4(v4.header().source_addr()),
                ip.payload().ip_number.0,
                ip.payload().payload,
            ),
            etherparse::IpSlice::Ipv6(v6) => (
                IpAddr::V6(v6.header().source_addr()),
                ip.payload().ip_number.0,
                ip.payload().payload,
            ),
        };
        match kind {
            Kind::Ipip => (src, Via::IpProto(proto), payload),
            Kind::Fou { port } => {
                assert_eq!(proto, 17);
                let udp = etherparse::UdpSlice::from_slice(payload).expect("udp");
                assert_eq!(udp.destination_port(), port);
                (src, Via::Fou { ipproto: None }, udp.payload())
            }
        }
    }

    #[test]
    fn every_combination_round_trips_and_uses_protocol_4_or_41() {
        let v4 = tcp_v4([10, 0, 0, 1], [10, 0, 0, 2], 40000, 80, false, &[7u8; 1400]);
        let v6 = udp_v6([0xfd; 16], [0xfe; 16], 5000, 53, &[9u8; 1200]);
        let outers = [
            (IpAddr::from(A4), IpAddr::from(B4)),
            (IpAddr::from(A6), IpAddr::from(B6)),
        ];
        for inner_bytes in [&v4, &v6] {
            let inner = Inner::parse(inner_bytes).expect("inner");
            for (s, d) in outers {
                for kind in [Kind::Ipip, Kind::Fou { port: 5555 }] {
                    let outer = encapsulate(&inner, s, d, kind, 64).expect("encap");
                    let (src, via, payload) = receive(&outer, kind);
                    if kind == Kind::Ipip {
                        let want = if inner.is_v4() { 4 } else { 41 };
                        assert_eq!(via, Via::IpProto(want));
                    }
                    let got = decapsulate(&[s], src, via, payload).expect("decap");
                    assert_eq!(got.bytes, inner.bytes, "{kind:?} {s}");
                    if let (Kind::Ipip, IpAddr::V4(_)) = (kind, s) {
                        let again = decapsulate_ipv4_packet(&[s], &outer).expect("decap v4");
                        assert_eq!(again.bytes, inner.bytes);
                        assert_eq!(outer[6] & 0x40, 0, "outer DF must be clear");
                    }
                }
            }
        }
        let inner = Inner::parse(&v4).expect("inner");
        assert_eq!(
            encapsulate(&inner, A4.into(), B6.into(), Kind::Ipip, 64),
            Err(EncapError::Family(A4.into(), B6.into()))
        );
    }

    #[test]
    fn bad_input_is_dropped_with_its_reason() {
        let v4 = tcp_v4([10, 0, 0, 1], [10, 0, 0, 2], 1, 2, false, b"x");
        let v6 = udp_v6([0xfd; 16], [0xfe; 16], 1, 2, b"x");
        let peer = IpAddr::from(A4);
        assert_eq!(
            decapsulate(&[peer], B4.into(), Via::IpProto(4), &v4).err(),
            Some(DropReason::UnknownPeer)
        );
        assert_eq!(
            decapsulate(&[peer], peer, Via::IpProto(41), &v4).err(),
            Some(DropReason::ProtocolMismatch)
        );
        assert_eq!(
            decapsulate(&[peer], peer, Via::IpProto(4), &v6).err(),
            Some(DropReason::ProtocolMismatch)
        );
        assert_eq!(
            decapsulate(&[peer], peer, Via::Fou { ipproto: Some(4) }, &v6).err(),
            Some(DropReason::ProtocolMismatch)
        );
        assert_eq!(
            decapsulate(&[peer], peer, Via::IpProto(4), &v4[..25]).err(),
            Some(DropReason::InnerMalformed)
        );
        let mut dead = v4.clone();
        dead[8] = 0; // TTL 0
        dead[10..12].copy_from_slice(&[0, 0]);
        assert_eq!(
            decapsulate(&[peer], peer, Via::IpProto(4), &dead).err(),
            Some(DropReason::TtlExpired)
        );
        let inner = Inner::parse(&v4).expect("inner");
        let outer = encapsulate(&inner, peer, B4.into(), Kind::Ipip, 64).expect("encap");
        assert_eq!(
            decapsulate_ipv4_packet(&[peer], &outer[..10]).err(),
            Some(DropReason::OuterMalformed)
        );
    }

    proptest! {
        /// The decapsulation path takes any bytes: a drop or a whole inner packet.
        #[test]
        fn decapsulation_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
            let peer = IpAddr::from(A4);
            let _ = decapsulate_ipv4_packet(&[peer], &bytes);
            for via in [Via::IpProto(4), Via::IpProto(41), Via::Fou { ipproto: None }] {
                if let Ok(i) = decapsulate(&[peer], peer, via, &bytes) {
                    prop_assert!(i.bytes.len() <= bytes.len());
                }
            }
        }

        /// Any inner packet survives encapsulation byte for byte.
        #[test]
        fn any_payload_round_trips(payload in prop::collection::vec(any::<u8>(), 0..1500), fou in any::<bool>()) {
            let v4 = tcp_v4([10, 0, 0, 1], [10, 0, 0, 2], 1, 2, false, &payload);
            let inner = Inner::parse(&v4).expect("inner");
            let kind = if fou { Kind::Fou { port: 5555 } } else { Kind::Ipip };
            let outer = encapsulate(&inner, A4.into(), B4.into(), kind, 64).expect("encap");
            let (src, via, p) = receive(&outer, kind);
            prop_assert_eq!(decapsulate(&[A4.into()], src, via, p).expect("decap").bytes, &v4[..]);
        }
    }
}
