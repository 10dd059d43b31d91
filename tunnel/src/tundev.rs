//! The TUN device with offloads (`IFF_VNET_HDR`, TSO/checksum): the kernel
//! hands us TCP super-packets of up to 64 KiB in one read, which
//! [`Tun::try_recv`] cuts into packets with complete checksums (tun-rs's
//! `gso_split`; segments re-cut to fit the tunnel, see [`Tun::resegment`]);
//! and [`Tun::write`] writes consecutive segments of a TCP flow as one
//! super-packet ([`crate::coalesce`], GRO). Per 64 KiB of a bulk flow that
//! is one system call instead of forty-five, each way; on the wire between
//! the gateways the packets are the ones a plain TUN device would carry.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use tun_rs::{
    checksum, gso_split, DeviceBuilder, SyncDevice, VirtioNetHdr, IDEAL_BATCH_SIZE,
    VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6, VIRTIO_NET_HDR_LEN,
};

use crate::coalesce::Coalescer;

const GSO_NONE: u8 = 0;
const GSO_TCPV4: u8 = VIRTIO_NET_HDR_GSO_TCPV4;
const GSO_TCPV6: u8 = VIRTIO_NET_HDR_GSO_TCPV6;
const GSO_ECN: u8 = 0x80;
/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`: the transport checksum is partial.
const NEEDS_CSUM: u8 = 1;

/// Room in front of each packet for the virtio header the kernel expects.
const HEADROOM: usize = VIRTIO_NET_HDR_LEN;

/// Non-blocking: reads return at once (see [`crate::poll`] for waiting).
pub struct Tun {
    dev: SyncDevice,
    mtu: u16,
    /// See [`Tun::resegment`].
    resegment: Option<u16>,
}

/// Creates TUN device `name` (IP packets, offloads on) with `mtu`, brings
/// it up and sets loose reverse-path filtering on it (packets written to it
/// come from anywhere; strict filtering would drop what we deliver). Needs
/// CAP_NET_ADMIN.
pub fn open(name: &str, mtu: u16) -> anyhow::Result<Tun> {
    use anyhow::Context as _;
    let dev = DeviceBuilder::new()
        .name(name)
        .mtu(mtu)
        .offload(true)
        .build_sync()
        .with_context(|| {
            format!("cannot create TUN device {name} (run as root; is /dev/net/tun there?)")
        })?;
    dev.set_nonblocking(true)
        .with_context(|| format!("cannot make TUN device {name} non-blocking"))?;
    let rp = format!("/proc/sys/net/ipv4/conf/{name}/rp_filter");
    std::fs::write(&rp, "2").with_context(|| format!("cannot write {rp}"))?;
    Ok(Tun {
        dev,
        mtu,
        resegment: None,
    })
}

/// Packets read in one go (a split super-packet, or one plain packet).
pub struct RecvBatch {
    original: Vec<u8>,
    bufs: Vec<Vec<u8>>,
    sizes: Vec<usize>,
    n: usize,
    /// The last read was a TCP super-packet cut finer than its sender's
    /// segments ([`Tun::resegment`]).
    pub resegmented: bool,
    /// The last read could not be made into packets (the caller counts
    /// the drop).
    pub malformed: bool,
}

impl RecvBatch {
    /// Buffers for a device of this MTU: no segment is larger.
    pub fn new(mtu: u16) -> Self {
        Self {
            original: vec![0; VIRTIO_NET_HDR_LEN + 65_535],
            bufs: vec![vec![0; HEADROOM + usize::from(mtu)]; IDEAL_BATCH_SIZE],
            sizes: vec![0; IDEAL_BATCH_SIZE],
            n: 0,
            resegmented: false,
            malformed: false,
        }
    }

    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Bytes of all the packets.
    pub fn bytes(&self) -> usize {
        self.sizes[..self.n].iter().sum()
    }

    pub fn packet(&self, i: usize) -> &[u8] {
        &self.bufs[i][HEADROOM..HEADROOM + self.sizes[i]]
    }

    pub fn packet_mut(&mut self, i: usize) -> &mut [u8] {
        &mut self.bufs[i][HEADROOM..HEADROOM + self.sizes[i]]
    }
}

impl Tun {
    /// Buffers for [`Tun::try_recv`].
    pub fn recv_batch(&self) -> RecvBatch {
        RecvBatch::new(self.mtu)
    }

    pub fn fd(&self) -> RawFd {
        self.dev.as_raw_fd()
    }

    /// Re-cut TCP super-packets whose segments would make packets larger
    /// than `max_packet` bytes into smaller segments (None: keep the
    /// sender's size). A connection opened before the move chose its
    /// segment size without the tunnel's overhead; TCP is a byte stream, so
    /// cutting its data finer changes nothing for the endpoints and saves
    /// every segment from outer fragmentation.
    pub fn resegment(&mut self, max_packet: Option<u16>) {
        self.resegment = max_packet;
    }

    /// The packets the kernel has for us, into `b`: false when it has none.
    /// A read that cannot be made into packets sets `b.malformed` (and no
    /// packets).
    pub fn try_recv(&self, b: &mut RecvBatch) -> io::Result<bool> {
        b.n = 0;
        b.resegmented = false;
        b.malformed = false;
        // SAFETY: reads at most original.len() bytes into the live buffer.
        let n = unsafe {
            libc::read(
                self.dev.as_raw_fd(),
                b.original.as_mut_ptr().cast(),
                b.original.len(),
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(false),
                _ => Err(e),
            };
        }
        match split(b, n as usize, self.resegment) {
            Ok(k) => {
                b.n = k;
                Ok(true)
            }
            // not worth stopping for: dropped and counted
            Err(e) => {
                tracing::debug!(error = %e, "cannot split a packet from the TUN device");
                b.malformed = true;
                Ok(true)
            }
        }
    }
}

/// The `len` bytes read into `b.original` (virtio header, packet) as
/// packets in `b.bufs`, TCP segments re-cut to at most `resegment` bytes
/// a packet; how many.
fn split(b: &mut RecvBatch, len: usize, resegment: Option<u16>) -> io::Result<usize> {
    let bad = |why: String| io::Error::new(io::ErrorKind::InvalidData, why);
    if len <= VIRTIO_NET_HDR_LEN {
        return Err(bad(format!("a read of {len} bytes")));
    }
    let mut hdr = VirtioNetHdr::decode(&b.original[..VIRTIO_NET_HDR_LEN])?;
    let pkt = &mut b.original[VIRTIO_NET_HDR_LEN..len];
    let plen = pkt.len();
    if hdr.gso_type == GSO_NONE {
        let out = &mut b.bufs[0][HEADROOM..];
        if out.len() < plen {
            return Err(bad(format!("a {plen}-byte packet above the MTU")));
        }
        out[..plen].copy_from_slice(pkt);
        if hdr.flags & NEEDS_CSUM != 0 {
            // the field holds the pseudo-header's sum; the rest is ours
            let (start, at) = (
                usize::from(hdr.csum_start),
                usize::from(hdr.csum_start) + usize::from(hdr.csum_offset),
            );
            if at + 2 > plen {
                return Err(bad(format!("checksum field beyond the packet {hdr:?}")));
            }
            let out = &mut out[..plen];
            let partial = u16::from_be_bytes([out[at], out[at + 1]]);
            out[at..at + 2].fill(0);
            let mut sum = !checksum(&out[start..], u64::from(partial));
            if sum == 0 && hdr.csum_offset == 6 {
                sum = 0xffff; // UDP: zero would mean "no checksum"
            }
            out[at..at + 2].copy_from_slice(&sum.to_be_bytes());
        }
        b.sizes[0] = plen;
        return Ok(1);
    }
    let is_v6 = match pkt[0] >> 4 {
        4 => false,
        6 => true,
        v => return Err(bad(format!("IP version {v}"))),
    };
    let start = usize::from(hdr.csum_start);
    // (gso_split checks the type further)
    let tcp = matches!(hdr.gso_type & !GSO_ECN, GSO_TCPV4 | GSO_TCPV6);
    // the kernel's hdr_len can be the whole first packet on a forwarding
    // path: recompute it from the transport header
    let transport_len = if tcp {
        match pkt.get(start + 12) {
            Some(b) => usize::from(b >> 4) * 4,
            None => return Err(bad("a TCP header cut short".into())),
        }
    } else {
        8
    };
    let hdr_len = start + transport_len;
    if (tcp && !(20..=60).contains(&transport_len))
        || hdr_len > plen
        || start + usize::from(hdr.csum_offset) + 2 > plen
        || hdr.gso_size == 0
    {
        return Err(bad(format!("inconsistent GSO header {hdr:?}")));
    }
    hdr.hdr_len = hdr_len as u16;
    if let Some(max) = resegment.map(usize::from).filter(|_| tcp) {
        let seg = max.saturating_sub(hdr_len);
        let segments = (plen - hdr_len).div_ceil(seg.max(1));
        if hdr_len + usize::from(hdr.gso_size) > max && seg > 0 && segments <= b.bufs.len() {
            hdr.gso_size = seg as u16;
            b.resegmented = true;
        }
    }
    gso_split(pkt, hdr, &mut b.bufs, &mut b.sizes, HEADROOM, is_v6)
}

/// An inner TCP packet out of the tunnel longer than `max` bytes (a
/// peer's GSO, or GRO on this host, carried a super-packet whole; its
/// checksum may hold only the pseudo-header's sum): cut into segments of at
/// most `max` bytes with complete checksums, written into `out` (each
/// `max` bytes long at least). How many; an error for a packet that is not
/// a TCP packet without IP options or extension headers, or does not fit.
pub fn cut(
    pkt: &mut [u8],
    max: u16,
    out: &mut [Vec<u8>],
    sizes: &mut [usize],
) -> io::Result<usize> {
    let bad = |why: &str| io::Error::new(io::ErrorKind::InvalidData, why.to_string());
    let (is_v6, start, addrs) = match pkt.first().map(|b| b >> 4) {
        Some(4) if pkt.len() >= 40 && pkt[0] == 0x45 && pkt[9] == 6 => (false, 20, 12..20),
        Some(6) if pkt.len() >= 60 && pkt[6] == 6 => (true, 40, 8..40),
        _ => return Err(bad("not a TCP packet this can cut")),
    };
    let tcp_len = pkt.len() - start;
    let hdr_len = start + usize::from(pkt[start + 12] >> 4) * 4;
    if hdr_len < start + 20 || hdr_len >= pkt.len() || hdr_len >= usize::from(max) {
        return Err(bad("a TCP header that does not fit"));
    }
    // what the kernel hands over with NEEDS_CSUM: the pseudo-header's sum
    let partial = !crate::checksum::finish(crate::checksum::sum(&pkt[addrs], 6 + tcp_len as u32));
    pkt[start + 16..start + 18].copy_from_slice(&partial.to_be_bytes());
    let hdr = VirtioNetHdr {
        flags: NEEDS_CSUM,
        gso_type: if is_v6 { GSO_TCPV6 } else { GSO_TCPV4 },
        hdr_len: hdr_len as u16,
        gso_size: max - hdr_len as u16,
        csum_start: start as u16,
        csum_offset: 16,
    };
    gso_split(pkt, hdr, out, sizes, 0, is_v6)
}

impl Tun {
    /// Writes the packets of `c` (TCP segments of a flow coalesced, see
    /// [`Coalescer`]), one `writev` each. Returns how many the kernel
    /// refused (a packet the device's MTU does not allow, a full queue);
    /// a router drops those too, the caller counts them. Errors: the
    /// device is gone.
    pub fn write(&self, c: &Coalescer<'_>) -> io::Result<usize> {
        let fd = self.dev.as_raw_fd();
        let (mut refused, mut gone) = (0, None);
        c.finish(|iov| {
            if gone.is_some() {
                return;
            }
            // SAFETY: `iov` is a live array of IoSlice, which is
            // ABI-compatible with iovec; fd is the open TUN device.
            let n = unsafe { libc::writev(fd, iov.as_ptr().cast(), iov.len() as libc::c_int) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EBADFD) {
                    gone = Some(e);
                } else {
                    tracing::debug!(error = %e, "the TUN device refused a packet");
                    refused += 1;
                }
            }
        });
        match gone {
            Some(e) => Err(e),
            None => Ok(refused),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checksum as csum;
    use etherparse::PacketBuilder;

    /// A read as the kernel hands it over: virtio header, then an IPv4 TCP
    /// super-packet of `data` with the sender's segment size `mss` and only
    /// the pseudo-header sum in the checksum field.
    fn super_packet(data: &[u8], mss: u16) -> Vec<u8> {
        let mut p = Vec::new();
        PacketBuilder::ipv4([10, 0, 1, 2], [10, 9, 0, 2], 64)
            .tcp(40000, 80, 1000, 500)
            .ack(7)
            .psh()
            .write(&mut p, data)
            .expect("build");
        // the kernel's partial checksum: the pseudo-header's sum, folded
        let partial = !csum::finish(csum::sum(&p[12..20], 6 + (p.len() - 20) as u32));
        p[36..38].copy_from_slice(&partial.to_be_bytes());
        let hdr = VirtioNetHdr {
            flags: NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            hdr_len: 40,
            gso_size: mss,
            csum_start: 20,
            csum_offset: 16,
        };
        let mut out = vec![0u8; VIRTIO_NET_HDR_LEN];
        hdr.encode(&mut out).expect("encode");
        out.extend_from_slice(&p);
        out
    }

    fn read(b: &mut RecvBatch, bytes: &[u8]) -> usize {
        b.original[..bytes.len()].copy_from_slice(bytes);
        bytes.len()
    }

    #[test]
    fn a_super_packet_is_cut_to_fit_the_tunnel_with_every_byte_and_checksum() {
        let data: Vec<u8> = (0..20_000u32).map(|i| (i * 13 % 251) as u8).collect();
        for (resegment, payload) in [(None, 1460), (Some(1480u16), 1440), (Some(1472), 1432)] {
            let mut b = RecvBatch::new(1500);
            let len = read(&mut b, &super_packet(&data, 1460));
            let n = split(&mut b, len, resegment).expect("split");
            b.n = n;
            assert_eq!(b.resegmented, resegment.is_some());
            assert_eq!(n, data.len().div_ceil(payload));
            let mut got = Vec::new();
            for i in 0..n {
                let p = b.packet(i);
                assert!(p.len() <= 40 + payload);
                assert!(csum::valid(p), "segment {i}: TCP checksum");
                let seq = u32::from_be_bytes([p[24], p[25], p[26], p[27]]);
                assert_eq!(seq, 1000 + got.len() as u32, "segment {i}: in sequence");
                assert_eq!(p[33] & 0x08 != 0, i == n - 1, "PSH on the last only");
                got.extend_from_slice(&p[40..]);
            }
            assert_eq!(got, data);
        }
    }

    #[test]
    fn an_oversize_packet_out_of_the_tunnel_is_cut_with_every_byte_and_checksum() {
        let data: Vec<u8> = (0..4000u32).map(|i| (i * 7) as u8).collect();
        let mut p = Vec::new();
        PacketBuilder::ipv4([10, 0, 1, 2], [10, 9, 0, 2], 64)
            .tcp(40000, 80, 1000, 500)
            .ack(7)
            .write(&mut p, &data)
            .expect("build");
        // as a sender's TSO leaves it: only the pseudo-header's sum
        p[36..38].fill(0);
        let mut out = vec![vec![0u8; 1480]; 8];
        let mut sizes = vec![0; 8];
        let n = cut(&mut p, 1480, &mut out, &mut sizes).expect("cut");
        assert_eq!(n, 3);
        let mut got = Vec::new();
        for (i, b) in out.iter().take(n).enumerate() {
            let seg = &b[..sizes[i]];
            assert!(seg.len() <= 1480);
            let ip = etherparse::Ipv4HeaderSlice::from_slice(seg).expect("ip");
            let tcp = etherparse::TcpHeaderSlice::from_slice(&seg[20..]).expect("tcp");
            let payload = &seg[20 + tcp.slice().len()..];
            let want = tcp
                .to_header()
                .calc_checksum_ipv4_raw(ip.source(), ip.destination(), payload)
                .expect("checksum");
            assert_eq!(tcp.checksum(), want, "segment {i}");
            assert_eq!(tcp.sequence_number(), 1000 + got.len() as u32);
            got.extend_from_slice(payload);
        }
        assert_eq!(got, data);
        let mut udp = Vec::new();
        PacketBuilder::ipv4([10, 0, 1, 2], [10, 9, 0, 2], 64)
            .udp(1, 2)
            .write(&mut udp, &data)
            .expect("build");
        assert!(cut(&mut udp, 1480, &mut out, &mut sizes).is_err());
    }

    #[test]
    fn a_single_packet_gets_its_checksum_completed() {
        let mut p = Vec::new();
        PacketBuilder::ipv4([10, 0, 1, 2], [10, 9, 0, 2], 64)
            .udp(5000, 53)
            .write(&mut p, b"hello")
            .expect("build");
        let good = p.clone();
        let partial = !csum::finish(csum::sum(&p[12..20], 17 + (p.len() - 20) as u32));
        p[26..28].copy_from_slice(&partial.to_be_bytes());
        let hdr = VirtioNetHdr {
            flags: NEEDS_CSUM,
            gso_type: GSO_NONE,
            hdr_len: 0,
            gso_size: 0,
            csum_start: 20,
            csum_offset: 6,
        };
        let mut bytes = vec![0u8; VIRTIO_NET_HDR_LEN];
        hdr.encode(&mut bytes).expect("encode");
        bytes.extend_from_slice(&p);
        let mut b = RecvBatch::new(1500);
        let len = read(&mut b, &bytes);
        b.n = split(&mut b, len, Some(1480)).expect("split");
        assert_eq!(b.n, 1);
        assert_eq!(b.packet(0), &good[..]);
    }

    #[test]
    fn inconsistent_reads_are_errors_not_panics() {
        let data = vec![1u8; 5000];
        let sp = super_packet(&data, 1460);
        let mut cases: Vec<Vec<u8>> =
            vec![sp[..5].to_vec(), sp[..VIRTIO_NET_HDR_LEN + 30].to_vec()];
        let mut big = vec![0u8; VIRTIO_NET_HDR_LEN];
        big.extend(vec![0x45u8; 3000]); // no GSO, above the MTU
        cases.push(big);
        for (at, v) in [
            (0, 0x07u8),
            (1, 0x09),
            (4, 0),
            (6, 0xff),
            (VIRTIO_NET_HDR_LEN, 0x75),
        ] {
            let mut c = sp.clone();
            c[at] = v;
            cases.push(c);
        }
        for c in cases {
            let mut b = RecvBatch::new(1500);
            let len = read(&mut b, &c);
            // an error, or packets: never a panic
            let _ = split(&mut b, len, Some(1480));
        }
        let mut b = RecvBatch::new(1500);
        let len = read(&mut b, &sp[..5]);
        assert!(split(&mut b, len, None).is_err());
    }
}
