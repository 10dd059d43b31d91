//! Receive-side coalescing (GRO) for writes into a TUN device with offloads:
//! consecutive segments of a TCP flow become one super-packet (a virtio
//! GSO header, the first segment's headers, every segment's payload), so
//! the kernel takes a 64 KiB write through its stack once instead of
//! forty-five 1.4 KB ones. Sans-I/O: [`Coalescer::finish`] hands out each
//! packet to write as the slices of one `writev`, the payloads still where
//! they were received (no copy).
//!
//! The rules are the kernel's GRO rules: same addresses, ports, TOS/TTL
//! (traffic class/hop limit), DF, TCP header bytes other than the sequence
//! number and checksum (ACK, window, flags, options), in-sequence, a
//! payload size that only the last segment may fall short of; only ACK or
//! ACK+PSH segments with data, and PSH ends a super-packet. Every segment
//! merged has its TCP checksum verified first: one that fails is written
//! alone, for the kernel to drop (merging would hide the corruption under
//! a fresh checksum). Packets of a flow leave in the order they came.

use std::io::IoSlice;

use tun_rs::{checksum, checksum_no_fold, VirtioNetHdr, VIRTIO_NET_HDR_LEN};

const ZERO_HDR: [u8; VIRTIO_NET_HDR_LEN] = [0; VIRTIO_NET_HDR_LEN];
/// How far back a segment looks for its flow's super-packet.
const SEARCH: usize = 16;
const MAX_LEN: usize = 65_535;
const TCP_ACK: u8 = 0x10;
const TCP_PSH: u8 = 0x08;

/// A TCP segment that may be merged: where its parts are.
#[derive(Debug, Clone, Copy)]
struct Seg {
    v6: bool,
    /// IP header length, TCP header length.
    iph: usize,
    tcph: usize,
    seq: u32,
    psh: bool,
    /// May join a super-packet (ACK or ACK+PSH with data).
    mergeable: bool,
}

/// The TCP/UDP pseudo-header's sum, unfolded (for [`checksum`]).
fn pseudo_header_checksum_no_fold(proto: u8, src: &[u8], dst: &[u8], len: u16) -> u64 {
    let sum = checksum_no_fold(dst, checksum_no_fold(src, 0));
    let l = len.to_be_bytes();
    checksum_no_fold(&[0, proto, l[0], l[1]], sum)
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// The TCP segment in `p`, if it is one this module understands (IPv4
/// without options or fragments, IPv6 with TCP as the next header).
fn tcp_segment(p: &[u8]) -> Option<Seg> {
    let (v6, iph) = match p.first()? >> 4 {
        4 if p.len() >= 40
            && p[0] == 0x45
            && p[9] == 6
            && usize::from(u16::from_be_bytes([p[2], p[3]])) == p.len()
            && p[6] & 0x3f == 0
            && p[7] == 0 =>
        {
            (false, 20)
        }
        6 if p.len() >= 60
            && p[6] == 6
            && usize::from(u16::from_be_bytes([p[4], p[5]])) == p.len() - 40 =>
        {
            (true, 40)
        }
        _ => return None,
    };
    let tcph = usize::from(p[iph + 12] >> 4) * 4;
    if tcph < 20 || p.len() < iph + tcph {
        return None;
    }
    let flags = p[iph + 13];
    Some(Seg {
        v6,
        iph,
        tcph,
        seq: be32(&p[iph + 4..]),
        psh: flags & TCP_PSH != 0,
        mergeable: (flags == TCP_ACK || flags == TCP_ACK | TCP_PSH) && p.len() > iph + tcph,
    })
}

/// Could be TCP: IPv4 protocol 6, or any IPv6 (extension headers may
/// precede TCP).
fn maybe_tcp(p: &[u8]) -> bool {
    match p.first().map(|b| b >> 4) {
        Some(4) => p.get(9) == Some(&6),
        Some(6) => true,
        _ => false,
    }
}

/// Addresses and ports: the bytes that name a flow (and its direction).
fn flow_bytes<'p>(p: &'p [u8], s: &Seg) -> (&'p [u8], &'p [u8]) {
    let addrs = if s.v6 { &p[8..40] } else { &p[12..20] };
    (addrs, &p[s.iph..s.iph + 4])
}

/// Whether `p`'s TCP checksum is right.
fn checksum_ok(p: &[u8], s: &Seg) -> bool {
    let (src, dst) = if s.v6 {
        (&p[8..24], &p[24..40])
    } else {
        (&p[12..16], &p[16..20])
    };
    let tcp = &p[s.iph..];
    let Ok(len) = u16::try_from(tcp.len()) else {
        return false;
    };
    checksum(tcp, pseudo_header_checksum_no_fold(6, src, dst, len)) == 0xffff
}

/// One packet to write: a segment alone, or a super-packet.
#[derive(Debug)]
struct Item<'a> {
    first: &'a [u8],
    seg: Option<Seg>,
    /// Payloads of the segments merged after the first.
    more: Vec<&'a [u8]>,
    /// Bytes of the whole packet.
    len: usize,
    next_seq: u32,
    /// More may be appended.
    open: bool,
    psh: bool,
    first_checked: bool,
}

impl Item<'_> {
    fn gso_size(&self) -> usize {
        self.seg.map_or(0, |s| self.first.len() - s.iph - s.tcph)
    }
}

/// The packets of one batch, coalesced as they are pushed.
#[derive(Debug, Default)]
pub struct Coalescer<'a> {
    items: Vec<Item<'a>>,
    pushed: usize,
}

impl<'a> Coalescer<'a> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Packets pushed.
    pub fn len(&self) -> usize {
        self.pushed
    }

    pub fn is_empty(&self) -> bool {
        self.pushed == 0
    }

    /// Packets to write (super-packets count once).
    pub fn writes(&self) -> usize {
        self.items.len()
    }

    pub fn push(&mut self, p: &'a [u8]) {
        self.pushed += 1;
        let seg = tcp_segment(p);
        if seg.is_none() && maybe_tcp(p) {
            // TCP this module does not parse (IP options, extension
            // headers): nothing of before it may be appended to after it
            for it in self.items.iter_mut().rev().take(SEARCH) {
                it.open = false;
            }
        }
        if let Some(s) = seg {
            // the flow's latest packet in this batch, if it is near
            let fb = flow_bytes(p, &s);
            let latest = self
                .items
                .iter_mut()
                .rev()
                .take(SEARCH)
                .find(|it| it.seg.is_some_and(|is| flow_bytes(it.first, &is) == fb));
            if let Some(it) = latest {
                if Self::append(it, p, &s) {
                    return;
                }
                it.open = false;
            }
        }
        self.items.push(Item {
            first: p,
            seg,
            more: Vec::new(),
            len: p.len(),
            next_seq: seg.map_or(0, |s| s.seq.wrapping_add((p.len() - s.iph - s.tcph) as u32)),
            open: seg.is_some_and(|s| s.mergeable && !s.psh),
            psh: seg.is_some_and(|s| s.psh),
            first_checked: false,
        });
    }

    /// Appends segment `p` to `it` if the rules allow.
    fn append(it: &mut Item<'a>, p: &'a [u8], s: &Seg) -> bool {
        let Some(is) = it.seg else { return false };
        let payload = p.len() - s.iph - s.tcph;
        let f = it.first;
        let same_ip = if s.v6 {
            is.v6 && f[..4] == p[..4] && f[7] == p[7]
        } else {
            !is.v6 && f[1] == p[1] && f[6] & 0xe0 == p[6] & 0xe0 && f[8] == p[8]
        };
        let (fi, pi) = (is.iph, s.iph);
        let same_tcp = is.tcph == s.tcph
            && f[fi + 8..fi + 13] == p[pi + 8..pi + 13]
            && f[fi + 13] | TCP_PSH == p[pi + 13] | TCP_PSH
            && f[fi + 14..fi + 16] == p[pi + 14..pi + 16]
            && f[fi + 20..fi + is.tcph] == p[pi + 20..pi + s.tcph];
        if !(it.open
            && s.mergeable
            && same_ip
            && same_tcp
            && s.seq == it.next_seq
            && payload <= it.gso_size()
            && it.len + payload <= MAX_LEN)
        {
            return false;
        }
        if !checksum_ok(p, s) {
            return false;
        }
        if !it.first_checked {
            if !checksum_ok(f, &is) {
                return false;
            }
            it.first_checked = true;
        }
        it.more.push(&p[s.iph + s.tcph..]);
        it.len += payload;
        it.next_seq = it.next_seq.wrapping_add(payload as u32);
        if s.psh || payload < it.gso_size() {
            it.psh |= s.psh;
            it.open = false;
        }
        true
    }

    /// Each packet to write, in order, as the slices of one write (virtio
    /// header first).
    pub fn finish(&self, mut write: impl FnMut(&[IoSlice<'_>])) {
        for it in &self.items {
            let Some(s) = it.seg.filter(|_| !it.more.is_empty()) else {
                write(&[IoSlice::new(&ZERO_HDR), IoSlice::new(it.first)]);
                continue;
            };
            let hl = s.iph + s.tcph;
            // virtio header, IP header (≤ 40), TCP header (≤ 60)
            let mut buf = [0u8; VIRTIO_NET_HDR_LEN + 100];
            let head = &mut buf[..VIRTIO_NET_HDR_LEN + hl];
            head[VIRTIO_NET_HDR_LEN..].copy_from_slice(&it.first[..hl]);
            let pkt = &mut head[VIRTIO_NET_HDR_LEN..];
            let tcp_len = (it.len - s.iph) as u16;
            if s.v6 {
                pkt[4..6].copy_from_slice(&tcp_len.to_be_bytes());
            } else {
                pkt[2..4].copy_from_slice(&(it.len as u16).to_be_bytes());
                pkt[10..12].fill(0);
                let c = !checksum(&pkt[..20], 0);
                pkt[10..12].copy_from_slice(&c.to_be_bytes());
            }
            if it.psh {
                pkt[s.iph + 13] |= TCP_PSH;
            }
            // the kernel completes the checksum from the pseudo-header sum
            let (src, dst) = if s.v6 {
                (&it.first[8..24], &it.first[24..40])
            } else {
                (&it.first[12..16], &it.first[16..20])
            };
            let partial = checksum(&[], pseudo_header_checksum_no_fold(6, src, dst, tcp_len));
            pkt[s.iph + 16..s.iph + 18].copy_from_slice(&partial.to_be_bytes());
            let hdr = VirtioNetHdr {
                flags: 1, // VIRTIO_NET_HDR_F_NEEDS_CSUM
                gso_type: if s.v6 {
                    tun_rs::VIRTIO_NET_HDR_GSO_TCPV6
                } else {
                    tun_rs::VIRTIO_NET_HDR_GSO_TCPV4
                },
                hdr_len: hl as u16,
                gso_size: it.gso_size() as u16,
                csum_start: s.iph as u16,
                csum_offset: 16,
            };
            if hdr.encode(&mut head[..VIRTIO_NET_HDR_LEN]).is_err() {
                continue; // cannot happen: the buffer has the room
            }
            let mut iov = Vec::with_capacity(2 + it.more.len());
            iov.push(IoSlice::new(head));
            iov.push(IoSlice::new(&it.first[hl..]));
            iov.extend(it.more.iter().map(|m| IoSlice::new(m)));
            write(&iov);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::PacketBuilder;

    /// A TCP segment of flow `port` with sequence `seq` and `data`.
    fn seg(port: u16, seq: u32, data: &[u8], psh: bool, v6: bool) -> Vec<u8> {
        let b = if v6 {
            PacketBuilder::ipv6([1; 16], [2; 16], 64)
        } else {
            PacketBuilder::ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
        };
        let mut t = b.tcp(port, 80, seq, 1000).ack(7);
        if psh {
            t = t.psh();
        }
        let mut out = Vec::new();
        t.write(&mut out, data).expect("build");
        out
    }

    struct Written {
        hdr: Vec<u8>,
        pkt: Vec<u8>,
    }

    fn written(c: &Coalescer<'_>) -> Vec<Written> {
        let mut out = Vec::new();
        c.finish(|iov| {
            let all: Vec<u8> = iov.iter().flat_map(|s| s.iter().copied()).collect();
            out.push(Written {
                hdr: all[..VIRTIO_NET_HDR_LEN].to_vec(),
                pkt: all[VIRTIO_NET_HDR_LEN..].to_vec(),
            });
        });
        out
    }

    fn gso(hdr: &[u8]) -> (u8, u8, u16, u16) {
        let u = |i: usize| u16::from_ne_bytes([hdr[i], hdr[i + 1]]);
        (hdr[0], hdr[1], u(2), u(4))
    }

    #[test]
    fn a_run_of_segments_becomes_one_super_packet_with_every_byte() {
        for v6 in [false, true] {
            let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
            let segs: Vec<Vec<u8>> = data
                .chunks(1400)
                .enumerate()
                .map(|(i, c)| seg(5000, 100 + 1400 * i as u32, c, i == 7, v6))
                .collect();
            let mut c = Coalescer::new();
            for s in &segs {
                c.push(s);
            }
            let w = written(&c);
            assert_eq!(w.len(), 1, "v6 {v6}");
            let (flags, gso_type, hdr_len, gso_size) = gso(&w[0].hdr);
            assert_eq!(flags, 1);
            let iph = if v6 { 40 } else { 20 };
            assert_eq!(
                gso_type,
                if v6 {
                    tun_rs::VIRTIO_NET_HDR_GSO_TCPV6
                } else {
                    tun_rs::VIRTIO_NET_HDR_GSO_TCPV4
                }
            );
            assert_eq!((hdr_len, gso_size), (iph as u16 + 20, 1400));
            let p = &w[0].pkt;
            assert_eq!(&p[iph + 20..], &data[..], "payload whole and in order");
            assert_eq!(
                p[iph + 13] & TCP_PSH,
                TCP_PSH,
                "the last segment's PSH kept"
            );
            let len = if v6 {
                usize::from(u16::from_be_bytes([p[4], p[5]])) + 40
            } else {
                usize::from(u16::from_be_bytes([p[2], p[3]]))
            };
            assert_eq!(len, p.len());
            if !v6 {
                assert_eq!(checksum(&p[..20], 0), 0xffff, "IPv4 header checksum");
            }
        }
    }

    #[test]
    fn what_may_not_merge_is_written_alone_and_in_order() {
        let a = seg(5000, 0, &[1; 1000], false, false);
        let gap = seg(5000, 2000, &[2; 1000], false, false); // not in sequence
        let other = seg(6000, 0, &[3; 1000], false, false);
        let bigger = seg(5000, 3000, &[4; 1200], false, false); // larger than the first
        let mut corrupt = seg(6000, 1000, &[5; 1000], false, false);
        let last = corrupt.len() - 1;
        corrupt[last] ^= 0xff;
        let syn = {
            let mut out = Vec::new();
            PacketBuilder::ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
                .tcp(7000, 80, 0, 1000)
                .syn()
                .write(&mut out, &[])
                .expect("build");
            out
        };
        let udp = {
            let mut out = Vec::new();
            PacketBuilder::ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
                .udp(1, 2)
                .write(&mut out, &[9; 100])
                .expect("build");
            out
        };
        let pkts = [&a, &gap, &other, &bigger, &corrupt, &syn, &udp];
        let mut c = Coalescer::new();
        for p in pkts {
            c.push(p);
        }
        let w = written(&c);
        assert_eq!(w.len(), pkts.len(), "nothing merged");
        for (w, p) in w.iter().zip(pkts) {
            assert_eq!(&w.pkt, p, "written as received");
            assert_eq!(w.hdr, ZERO_HDR);
        }
    }

    #[test]
    fn interleaved_flows_each_coalesce_and_a_different_ack_splits() {
        let mut pkts = Vec::new();
        for i in 0..4u32 {
            pkts.push(seg(5000, i * 100, &[1; 100], false, false));
            pkts.push(seg(6000, i * 100, &[2; 100], false, false));
        }
        let mut acked = seg(5000, 400, &[1; 100], false, false);
        // a newer acknowledgement number (and so checksum) from here on
        let tcp = 20;
        acked[tcp + 11] = 8;
        let sum = {
            acked[tcp + 16..tcp + 18].fill(0);
            !checksum(
                &acked[tcp..],
                pseudo_header_checksum_no_fold(6, &acked[12..16], &acked[16..20], 120),
            )
        };
        acked[tcp + 16..tcp + 18].copy_from_slice(&sum.to_be_bytes());
        pkts.push(acked);
        let mut c = Coalescer::new();
        for p in &pkts {
            c.push(p);
        }
        let w = written(&c);
        assert_eq!(w.len(), 3);
        assert_eq!(w[0].pkt.len(), 40 + 400);
        assert_eq!(w[1].pkt.len(), 40 + 400);
        assert_eq!(w[2].pkt, pkts[8]);
        assert_eq!(c.len(), 9);
    }

    #[test]
    fn never_longer_than_an_ip_packet_can_be() {
        let segs: Vec<Vec<u8>> = (0..60u32)
            .map(|i| seg(5000, i * 1400, &[0; 1400], false, false))
            .collect();
        let mut c = Coalescer::new();
        for s in &segs {
            c.push(s);
        }
        let w = written(&c);
        assert!(w.len() >= 2);
        assert!(w.iter().all(|w| w.pkt.len() <= MAX_LEN));
        let payload: usize = w.iter().map(|w| w.pkt.len() - 40).sum();
        assert_eq!(payload, 60 * 1400);
    }

    /// The payload bytes each written packet carries, per flow (source
    /// port), as the kernel would deliver them (virtio GSO header honoured).
    fn delivered(c: &Coalescer<'_>) -> std::collections::BTreeMap<u16, Vec<u8>> {
        let mut out: std::collections::BTreeMap<u16, Vec<u8>> = Default::default();
        for w in written(c) {
            let p = &w.pkt;
            let iph = if p[0] >> 4 == 6 { 40 } else { 20 };
            let tcph = usize::from(p[iph + 12] >> 4) * 4;
            let port = u16::from_be_bytes([p[iph], p[iph + 1]]);
            out.entry(port)
                .or_default()
                .extend_from_slice(&p[iph + tcph..]);
        }
        out
    }

    proptest::proptest! {
        /// Whatever the segments (two interleaved flows, any sizes, PSH
        /// anywhere, some corrupted), every flow's bytes come out in order
        /// and complete, merged packets obey the size rules, and a
        /// corrupted segment is never merged.
        #[test]
        fn every_flow_comes_out_whole_and_in_order(
            segs in proptest::collection::vec(
                (proptest::bool::ANY, 1usize..1500, proptest::bool::ANY, proptest::bool::weighted(0.05)),
                1..120,
            )
        ) {
            let mut seq = [0u32; 2];
            let mut sent: std::collections::BTreeMap<u16, Vec<u8>> = Default::default();
            let mut pkts = Vec::new();
            let mut corrupted = Vec::new();
            for (n, (second, len, psh, corrupt)) in segs.iter().enumerate() {
                let f = usize::from(*second);
                let port = 5000 + f as u16;
                let data: Vec<u8> = (0..*len).map(|i| (i * 31 + n * 7) as u8).collect();
                let mut p = seg(port, seq[f], &data, *psh, false);
                seq[f] = seq[f].wrapping_add(*len as u32);
                if *corrupt {
                    // the last payload byte: the TCP checksum no longer holds
                    let last = p.len() - 1;
                    p[last] ^= 0xff;
                    corrupted.push(p.clone());
                }
                sent.entry(port).or_default().extend_from_slice(&p[40..]);
                pkts.push(p);
            }
            let mut c = Coalescer::new();
            for p in &pkts {
                c.push(p);
            }
            proptest::prop_assert_eq!(c.len(), pkts.len());
            proptest::prop_assert_eq!(delivered(&c), sent);
            let out = written(&c);
            for w in &out {
                proptest::prop_assert!(w.pkt.len() <= MAX_LEN);
                let (flags, _, _, gso_size) = gso(&w.hdr);
                if flags != 0 {
                    // more than one segment of gso_size (the last may be short)
                    proptest::prop_assert!(w.pkt.len() - 40 > usize::from(gso_size));
                }
            }
            for bad in &corrupted {
                proptest::prop_assert!(
                    out.iter().any(|w| w.hdr == ZERO_HDR && &w.pkt == bad),
                    "a corrupted segment was merged"
                );
            }
        }

        #[test]
        fn arbitrary_bytes_do_not_panic(
            pkts in proptest::collection::vec(proptest::collection::vec(proptest::num::u8::ANY, 0..200), 0..40),
            mutate in proptest::collection::vec((0usize..100, proptest::num::u8::ANY), 0..8),
        ) {
            // well-formed segments with a few bytes changed, and raw bytes
            let mut bufs: Vec<Vec<u8>> = (0..20u32)
                .map(|i| seg(5000 + (i % 3) as u16, i * 10, &[7; 10], i % 4 == 0, i % 2 == 0))
                .collect();
            for (at, v) in &mutate {
                let b = &mut bufs[at % 20];
                let l = b.len();
                b[at % l] = *v;
            }
            bufs.extend(pkts);
            let mut c = Coalescer::new();
            for b in &bufs {
                c.push(b);
            }
            let mut total = 0;
            c.finish(|iov| total += iov.len());
            proptest::prop_assert!(total >= c.writes());
        }
    }
}
