//! "Your packet is too big": ICMP fragmentation needed (IPv4, type 3 code 4,
//! RFC 1191) and ICMPv6 packet too big (type 2, RFC 8201), sent back to the
//! sender of a packet that does not fit the tunnel and may not be
//! fragmented, so its path-MTU discovery converges instead of stalling.

use std::net::IpAddr;

use etherparse::icmpv4::DestUnreachableHeader;
use etherparse::{Icmpv4Type, Icmpv6Type, PacketBuilder};

use crate::packet::{Inner, Transport};

/// The ICMP error for `packet`, from `from` (the gateway's address on the
/// sender's side), announcing `mtu`. `None` when none may be sent: an IPv4
/// packet without DF (it can be fragmented instead), a non-first fragment,
/// an ICMP error itself (RFC 1122 §3.2.2), or a family mismatch.
pub fn too_big(packet: &Inner<'_>, mtu: u16, from: IpAddr) -> Option<Vec<u8>> {
    if is_icmp_error(packet) {
        return None;
    }
    let mut out = Vec::new();
    match (from, packet.src) {
        (IpAddr::V4(f), IpAddr::V4(to)) => {
            if !packet.dont_fragment {
                return None;
            }
            // RFC 1812 §4.3.2.3: as much of the original as fits in 576 bytes
            let quote = &packet.bytes[..packet.bytes.len().min(576 - 28)];
            PacketBuilder::ipv4(f.octets(), to.octets(), 64)
                .icmpv4(Icmpv4Type::DestinationUnreachable(
                    DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: mtu },
                ))
                .write(&mut out, quote)
                .ok()?;
        }
        (IpAddr::V6(f), IpAddr::V6(to)) => {
            // RFC 4443 §2.4: the error must fit the minimum MTU, 1280
            let quote = &packet.bytes[..packet.bytes.len().min(1280 - 48)];
            PacketBuilder::ipv6(f.octets(), to.octets(), 64)
                .icmpv6(Icmpv6Type::PacketTooBig {
                    mtu: u32::from(mtu.max(1280)),
                })
                .write(&mut out, quote)
                .ok()?;
        }
        _ => return None,
    }
    Some(out)
}

fn is_icmp_error(p: &Inner<'_>) -> bool {
    if matches!(p.transport, Transport::Echo { .. }) {
        return false;
    }
    matches!(p.proto, 1 | 58)
}

#[cfg(test)]
mod tests {
    use etherparse::{Icmpv4Slice, Icmpv6Slice, IpSlice};

    use super::*;
    use crate::checksum;
    use crate::packet::tests::{tcp_v4, udp_v6};

    #[test]
    fn builds_valid_errors_that_quote_the_packet() {
        let mut big = tcp_v4([10, 0, 0, 1], [10, 0, 0, 2], 40000, 80, false, &[1u8; 1460]);
        big[6] |= 0x40; // DF
        big[10..12].copy_from_slice(&[0, 0]);
        let ck = checksum::finish(checksum::sum(&big[..20], 0));
        big[10..12].copy_from_slice(&ck.to_be_bytes());
        let inner = Inner::parse(&big).expect("parse");
        let gw = IpAddr::from([192, 0, 2, 1]);
        let icmp = too_big(&inner, 1480, gw).expect("an error is due");
        let ip = IpSlice::from_slice(&icmp).expect("ip");
        assert_eq!(ip.payload().ip_number.0, 1);
        let m = Icmpv4Slice::from_slice(ip.payload().payload).expect("icmp");
        assert_eq!(m.type_u8(), 3);
        assert_eq!(m.code_u8(), 4);
        assert_eq!(
            u16::from_be_bytes([m.bytes5to8()[2], m.bytes5to8()[3]]),
            1480
        );
        assert_eq!(
            checksum::finish(checksum::sum(ip.payload().payload, 0)),
            0,
            "ICMP checksum"
        );
        assert_eq!(
            &m.payload()[..28],
            &big[..28],
            "quotes the header and the ports"
        );
        assert!(icmp.len() <= 576);

        let v6 = udp_v6([0xfd; 16], [0xfe; 16], 1, 2, &[0u8; 1400]);
        let inner = Inner::parse(&v6).expect("parse");
        let gw6 = IpAddr::from([0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        let icmp = too_big(&inner, 1400, gw6).expect("an error is due");
        assert!(icmp.len() <= 1280);
        let ip = IpSlice::from_slice(&icmp).expect("ip");
        let m = Icmpv6Slice::from_slice(ip.payload().payload).expect("icmpv6");
        assert_eq!(m.type_u8(), 2);
        assert_eq!(u32::from_be_bytes(m.bytes5to8()), 1400);
    }

    #[test]
    fn no_error_without_df_or_about_an_error() {
        let p = tcp_v4([10, 0, 0, 1], [10, 0, 0, 2], 1, 2, false, &[0u8; 100]);
        let mut no_df = p.clone();
        no_df[6] &= !0x40;
        no_df[10..12].copy_from_slice(&[0, 0]);
        let ck = checksum::finish(checksum::sum(&no_df[..20], 0));
        no_df[10..12].copy_from_slice(&ck.to_be_bytes());
        let gw = IpAddr::from([192, 0, 2, 1]);
        assert!(too_big(&Inner::parse(&no_df).expect("p"), 576, gw).is_none());
        let first = too_big(&Inner::parse(&p).expect("p"), 576, gw);
        if let Some(err) = first {
            let again = Inner::parse(&err).expect("the error parses");
            assert!(
                too_big(&again, 100, gw).is_none(),
                "never an error about an error"
            );
        }
    }
}
