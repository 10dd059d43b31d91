//! One-to-one address translation for a moved VM's new public address:
//! inbound `public → guest` (destination), outbound `guest → public`
//! (source); ports stay as they are, so no state is needed here (the flow
//! table decides which packets take this path and which the tunnel).
//!
//! Checksums are updated incrementally (RFC 1624): the IPv4 header checksum,
//! and the TCP, UDP and ICMPv6 checksums, whose pseudo-header holds the
//! addresses. An IPv4 UDP checksum of zero ("none") stays zero. Not handled:
//! addresses quoted inside ICMP error payloads.

use std::net::IpAddr;

use crate::checksum;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NatError {
    #[error("packet is not a whole IPv4 or IPv6 packet")]
    Malformed,
    #[error("address family of the packet and the new address differ")]
    Family,
}

#[derive(Clone, Copy)]
enum Which {
    Src,
    Dst,
}

/// Replaces the source address (outbound: guest → public).
pub fn rewrite_src(packet: &mut [u8], new: IpAddr) -> Result<(), NatError> {
    rewrite(packet, new, Which::Src)
}

/// Replaces the destination address (inbound: public → guest).
pub fn rewrite_dst(packet: &mut [u8], new: IpAddr) -> Result<(), NatError> {
    rewrite(packet, new, Which::Dst)
}

fn words(b: &[u8]) -> impl Iterator<Item = u16> + '_ {
    b.chunks_exact(2).map(|c| u16::from_be_bytes([c[0], c[1]]))
}

/// Applies the change of every 16-bit word of an address to a checksum.
fn adjust(mut c: u16, old: &[u8], new: &[u8]) -> u16 {
    for (o, n) in words(old).zip(words(new)) {
        c = checksum::update(c, o, n);
    }
    c
}

fn rewrite(packet: &mut [u8], new: IpAddr, which: Which) -> Result<(), NatError> {
    let version = packet.first().ok_or(NatError::Malformed)? >> 4;
    let (addr_at, addr_len, l4_at, proto, whole_l4) = match (version, new) {
        (4, IpAddr::V4(_)) => {
            if packet.len() < 20 {
                return Err(NatError::Malformed);
            }
            let ihl = usize::from(packet[0] & 0x0f) * 4;
            if ihl < 20 || packet.len() < ihl {
                return Err(NatError::Malformed);
            }
            let frag = u16::from_be_bytes([packet[6], packet[7]]);
            let first = frag & 0x1fff == 0;
            let at = match which {
                Which::Src => 12,
                Which::Dst => 16,
            };
            (at, 4, ihl, packet[9], first)
        }
        (6, IpAddr::V6(_)) => {
            if packet.len() < 40 {
                return Err(NatError::Malformed);
            }
            let at = match which {
                Which::Src => 8,
                Which::Dst => 24,
            };
            // extension headers are not walked: the L4 checksum is then left
            (at, 16, 40, packet[6], true)
        }
        (4 | 6, _) => return Err(NatError::Family),
        _ => return Err(NatError::Malformed),
    };
    let old: Vec<u8> = packet[addr_at..addr_at + addr_len].to_vec();
    let new_bytes: Vec<u8> = match new {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    };
    packet[addr_at..addr_at + addr_len].copy_from_slice(&new_bytes);
    if version == 4 {
        let c = u16::from_be_bytes([packet[10], packet[11]]);
        let c = adjust(c, &old, &new_bytes);
        packet[10..12].copy_from_slice(&c.to_be_bytes());
    }
    // the transport checksum covers the addresses through the pseudo-header;
    // only the first fragment carries it
    let field = match proto {
        6 => Some(16),
        17 => Some(6),
        58 if version == 6 => Some(2),
        _ => None,
    };
    if let Some(f) = field.filter(|_| whole_l4) {
        let at = l4_at + f;
        if packet.len() >= at + 2 {
            let c = u16::from_be_bytes([packet[at], packet[at + 1]]);
            if !(proto == 17 && version == 4 && c == 0) {
                let mut c = adjust(c, &old, &new_bytes);
                if proto == 17 && c == 0 {
                    c = 0xffff;
                }
                packet[at..at + 2].copy_from_slice(&c.to_be_bytes());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::packet::tests::{tcp_v4, udp_v6};
    use crate::packet::Inner;

    fn header_ok(p: &[u8]) -> bool {
        checksum::finish(checksum::sum(&p[..20], 0)) == 0
    }

    #[test]
    fn translates_both_ways_with_valid_checksums() {
        let guest = IpAddr::from([10, 1, 0, 10]);
        let public = IpAddr::from([10, 2, 0, 100]);
        let mut p = tcp_v4([10, 1, 0, 10], [10, 0, 0, 2], 80, 40000, false, b"reply");
        rewrite_src(&mut p, public).expect("nat");
        assert_eq!(Inner::parse(&p).expect("parse").src, public);
        assert!(header_ok(&p) && checksum::valid(&p));
        rewrite_src(&mut p, guest).expect("back");
        assert_eq!(
            p,
            tcp_v4([10, 1, 0, 10], [10, 0, 0, 2], 80, 40000, false, b"reply")
        );

        let g6 = IpAddr::from([0xfd, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 10]);
        let mut u = udp_v6(
            [0x20; 16],
            [0xfd, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0],
            5000,
            53,
            b"q",
        );
        rewrite_dst(&mut u, g6).expect("nat");
        assert_eq!(Inner::parse(&u).expect("parse").dst, g6);
        assert!(checksum::valid(&u));
        assert_eq!(rewrite_dst(&mut u, guest), Err(NatError::Family));
        assert_eq!(rewrite_dst(&mut [0x45, 0], guest), Err(NatError::Malformed));
    }

    proptest! {
        #[test]
        fn any_rewrite_keeps_checksums_valid(
            payload in prop::collection::vec(any::<u8>(), 0..200),
            a in any::<[u8; 4]>(),
            dst in any::<bool>(),
        ) {
            let mut p = tcp_v4([10, 1, 0, 10], [10, 0, 0, 2], 80, 40000, false, &payload);
            if dst {
                rewrite_dst(&mut p, IpAddr::from(a)).expect("nat");
            } else {
                rewrite_src(&mut p, IpAddr::from(a)).expect("nat");
            }
            prop_assert!(header_ok(&p));
            prop_assert!(checksum::valid(&p));
        }

        #[test]
        fn rewrite_never_panics(mut bytes in prop::collection::vec(any::<u8>(), 0..80), a in any::<[u8; 4]>()) {
            let _ = rewrite_src(&mut bytes, IpAddr::from(a));
            let _ = rewrite_dst(&mut bytes, IpAddr::from([0u16, 0, 0, 0, 0, 0, 0, 1]));
        }
    }
}
