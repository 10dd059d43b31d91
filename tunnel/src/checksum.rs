//! Internet checksums (RFC 1071) over IP packets: completing the transport
//! checksum of packets read from an interface with checksum offload (they
//! may carry only the pseudo-header sum), and incremental updates (RFC 1624).

use std::net::IpAddr;

/// One's-complement sum of 16-bit words, not yet folded.
pub fn sum(data: &[u8], mut acc: u32) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc = acc.wrapping_add(u32::from(u16::from_be_bytes([c[0], c[1]])));
    }
    if let [last] = chunks.remainder() {
        acc = acc.wrapping_add(u32::from(*last) << 8);
    }
    acc
}

/// Folds a sum to 16 bits and complements it.
pub fn finish(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

fn pseudo(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> u32 {
    let mut acc = 0;
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            acc = sum(&s.octets(), acc);
            acc = sum(&d.octets(), acc);
        }
        (s, d) => {
            let s6 = match s {
                IpAddr::V6(v) => v.octets(),
                IpAddr::V4(v) => v.to_ipv6_mapped().octets(),
            };
            let d6 = match d {
                IpAddr::V6(v) => v.octets(),
                IpAddr::V4(v) => v.to_ipv6_mapped().octets(),
            };
            acc = sum(&s6, acc);
            acc = sum(&d6, acc);
        }
    }
    acc.wrapping_add(u32::from(proto)).wrapping_add(len as u32)
}

/// Where the TCP/UDP header of an unfragmented packet starts, and its
/// protocol and addresses. IPv6 extension headers are not walked (such
/// packets are left as they are).
pub fn transport(packet: &[u8]) -> Option<(usize, u8, IpAddr, IpAddr)> {
    let version = packet.first()? >> 4;
    if version == 4 && packet.len() >= 20 {
        let ihl = usize::from(packet[0] & 0x0f) * 4;
        let frag = u16::from_be_bytes([packet[6], packet[7]]);
        if frag & 0x3fff != 0 || ihl < 20 || packet.len() < ihl {
            return None; // a fragment: no whole segment to sum
        }
        let src = IpAddr::from([packet[12], packet[13], packet[14], packet[15]]);
        let dst = IpAddr::from([packet[16], packet[17], packet[18], packet[19]]);
        Some((ihl, packet[9], src, dst))
    } else if version == 6 && packet.len() >= 40 {
        let mut s = [0u8; 16];
        let mut d = [0u8; 16];
        s.copy_from_slice(&packet[8..24]);
        d.copy_from_slice(&packet[24..40]);
        Some((40, packet[6], IpAddr::from(s), IpAddr::from(d)))
    } else {
        None
    }
}

fn checksum_field(proto: u8) -> Option<usize> {
    match proto {
        6 => Some(16),
        17 => Some(6),
        _ => None,
    }
}

/// Recomputes the TCP or UDP checksum in place. False when there is none
/// to compute (other protocols, fragments, truncated headers).
pub fn complete(packet: &mut [u8]) -> bool {
    let Some((off, proto, src, dst)) = transport(packet) else {
        return false;
    };
    let Some(field) = checksum_field(proto) else {
        return false;
    };
    if packet.len() < off + field + 2 {
        return false;
    }
    let seg_len = packet.len() - off;
    packet[off + field] = 0;
    packet[off + field + 1] = 0;
    let mut c = finish(sum(&packet[off..], pseudo(src, dst, proto, seg_len)));
    if proto == 17 && c == 0 {
        c = 0xffff; // RFC 768: zero means "no checksum"
    }
    packet[off + field..off + field + 2].copy_from_slice(&c.to_be_bytes());
    true
}

/// Whether the TCP/UDP checksum of an unfragmented packet is right.
pub fn valid(packet: &[u8]) -> bool {
    let Some((off, proto, src, dst)) = transport(packet) else {
        return false;
    };
    if checksum_field(proto).is_none() || packet.len() < off + 8 {
        return false;
    }
    finish(sum(
        &packet[off..],
        pseudo(src, dst, proto, packet.len() - off),
    )) == 0
}

/// RFC 1624: the checksum after one 16-bit word changed from `old` to `new`.
pub fn update(checksum: u16, old: u16, new: u16) -> u16 {
    let acc = u32::from(!checksum) + u32::from(!old) + u32::from(new);
    finish(acc)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::packet::tests::{tcp_v4, udp_v6};

    #[test]
    fn completes_an_offloaded_partial_checksum() {
        for mut p in [
            tcp_v4([10, 0, 0, 1], [10, 0, 0, 2], 1, 2, false, b"hello world"),
            udp_v6([0xfd; 16], [0xfe; 16], 3, 4, b"odd"),
        ] {
            assert!(valid(&p));
            let (off, proto, _, _) = transport(&p).expect("transport");
            let f = off + checksum_field(proto).expect("field");
            // what a NIC-offloaded packet carries: a placeholder, not the sum
            p[f] = 0x12;
            p[f + 1] = 0x34;
            assert!(!valid(&p));
            assert!(complete(&mut p));
            assert!(valid(&p));
        }
    }

    proptest! {
        #[test]
        fn incremental_update_equals_recomputation(payload in prop::collection::vec(any::<u8>(), 0..64), word in 0usize..10, new in any::<u16>()) {
            let mut p = tcp_v4([10, 0, 0, 1], [10, 0, 0, 2], 1, 2, false, &payload);
            let off = 20 + 2 * word.min(1); // source or destination port
            let old = u16::from_be_bytes([p[off], p[off + 1]]);
            let c = u16::from_be_bytes([p[36], p[37]]);
            p[off..off + 2].copy_from_slice(&new.to_be_bytes());
            p[36..38].copy_from_slice(&update(c, old, new).to_be_bytes());
            prop_assert!(valid(&p));
        }

        #[test]
        fn complete_never_panics(mut bytes in prop::collection::vec(any::<u8>(), 0..120)) {
            let _ = complete(&mut bytes);
        }
    }
}
