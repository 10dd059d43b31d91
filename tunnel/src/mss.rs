//! TCP MSS clamping: a SYN crossing the tunnel may announce at most what
//! fits the tunnel's MTU, so connections opened through it never send
//! segments too big for it.

use crate::checksum;

/// The largest MSS for a path MTU: MTU minus IP and TCP headers.
pub fn mss_for(mtu: u16, ipv6: bool) -> u16 {
    mtu.saturating_sub(if ipv6 { 60 } else { 40 })
}

/// If `packet` is a TCP SYN announcing an MSS above `max`, lowers it to
/// `max` in place (checksum updated incrementally). Returns the old MSS.
pub fn clamp(packet: &mut [u8], max: u16) -> Option<u16> {
    let (off, proto, _, _) = checksum::transport(packet)?;
    if proto != 6 || packet.len() < off + 20 {
        return None;
    }
    let flags = packet[off + 13];
    if flags & 0x02 == 0 {
        return None; // not a SYN
    }
    let data_off = usize::from(packet[off + 12] >> 4) * 4;
    if data_off < 20 || packet.len() < off + data_off {
        return None;
    }
    let mut i = off + 20;
    let end = off + data_off;
    while i < end {
        match packet[i] {
            0 => break,
            1 => i += 1,
            kind => {
                let len = usize::from(*packet.get(i + 1)?);
                if len < 2 || i + len > end {
                    return None; // malformed options: leave the packet alone
                }
                if kind == 2 && len == 4 {
                    let old = u16::from_be_bytes([packet[i + 2], packet[i + 3]]);
                    if old <= max {
                        return None;
                    }
                    packet[i + 2..i + 4].copy_from_slice(&max.to_be_bytes());
                    let c = u16::from_be_bytes([packet[off + 16], packet[off + 17]]);
                    // at an odd offset the word straddles two summed words:
                    // its bytes count swapped (RFC 1071 byte-order independence)
                    let c = if (i + 2 - off) % 2 == 0 {
                        checksum::update(c, old, max)
                    } else {
                        checksum::update(c, old.swap_bytes(), max.swap_bytes())
                    };
                    packet[off + 16..off + 18].copy_from_slice(&c.to_be_bytes());
                    return Some(old);
                }
                i += len;
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use etherparse::{PacketBuilder, TcpOptionElement};
    use proptest::prelude::*;

    use super::*;

    fn syn(mss: u16, v6: bool) -> Vec<u8> {
        let opts = [
            TcpOptionElement::Noop,
            TcpOptionElement::MaximumSegmentSize(mss),
            TcpOptionElement::WindowScale(7),
        ];
        let mut out = Vec::new();
        if v6 {
            PacketBuilder::ipv6([0xfd; 16], [0xfe; 16], 64)
                .tcp(40000, 80, 1, 65535)
                .syn()
                .options(&opts)
                .expect("options")
                .write(&mut out, b"")
                .expect("build");
        } else {
            PacketBuilder::ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
                .tcp(40000, 80, 1, 65535)
                .syn()
                .options(&opts)
                .expect("options")
                .write(&mut out, b"")
                .expect("build");
        }
        out
    }

    fn mss_of(p: &[u8]) -> Option<u16> {
        let ip = etherparse::SlicedPacket::from_ip(p).ok()?;
        let Some(etherparse::TransportSlice::Tcp(t)) = ip.transport else {
            return None;
        };
        t.options_iterator().find_map(|o| match o {
            Ok(TcpOptionElement::MaximumSegmentSize(m)) => Some(m),
            _ => None,
        })
    }

    #[test]
    fn lowers_a_large_mss_and_keeps_the_checksum_right() {
        for v6 in [false, true] {
            let mut p = syn(1460, v6);
            let max = mss_for(1480, v6);
            assert_eq!(clamp(&mut p, max), Some(1460));
            assert_eq!(mss_of(&p), Some(max));
            assert!(checksum::valid(&p));
            // a small MSS, or a non-SYN, is left alone
            assert_eq!(clamp(&mut p, max), None);
            let mut data =
                crate::packet::tests::tcp_v4([10, 0, 0, 1], [10, 0, 0, 2], 1, 2, false, b"x");
            let before = data.clone();
            assert_eq!(clamp(&mut data, 500), None);
            assert_eq!(data, before);
        }
    }

    proptest! {
        #[test]
        fn clamp_never_panics_and_never_breaks_a_checksum(mut bytes in prop::collection::vec(any::<u8>(), 0..100), max in any::<u16>()) {
            let was_valid = checksum::valid(&bytes);
            let _ = clamp(&mut bytes, max);
            if was_valid {
                prop_assert!(checksum::valid(&bytes));
            }
        }
    }
}
