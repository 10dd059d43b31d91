//! The kernel fast path's programs on generated packets (needs root).
//!
//! - Decapsulation, a parser of packets from outside, run in the kernel
//!   on frames (`BPF_PROG_TEST_RUN`): it strips the outer header of
//!   exactly the packets it may carry (a TCP segment without SYN/FIN/RST,
//!   from the peer, to the FOU port or protocol 4, for an allowed
//!   destination) and leaves every other frame untouched for the
//!   userspace plane, whatever its bytes.
//! - Encapsulation of a lone segment too big for the tunnel, attached to
//!   a TUN device in a namespace of its own, segments sent into it through
//!   a packet socket: it is cut in two segments that fit, as TSO would
//!   cut it (sequence numbers, flags, IP IDs, checksums), or left whole to
//!   userspace; a segment whose checksum was wrong gives two whose
//!   checksums are wrong.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use etherparse::PacketBuilder;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use tests::netns::{in_netns, unique, veth, Netns};
use tunnel::fastpath::{FastPath, Loaded, Settings};

const PASS: i32 = -1; // TC_ACT_UNSPEC: not the fast path's
const REDIRECT: i32 = 7; // TC_ACT_REDIRECT: decapsulated, into the TUN device
const LOCAL: [u8; 4] = [192, 0, 2, 1];
const PEER: [u8; 4] = [192, 0, 2, 2];
const PORT: u16 = 5555;
const ETH: usize = 14;
/// The allowed IPv6 destinations, fd00:9::/64.
const DELIVER6: [u8; 16] = [0xfd, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];

fn settings(fou: bool) -> Settings {
    Settings {
        tun: "unused".into(),
        local: IpAddr::from(LOCAL),
        peer: IpAddr::from(PEER),
        extra_peers: vec![],
        fou_port: fou.then_some(PORT),
        max_plain: 1472,
        deliver: vec![
            (IpAddr::from([10, 9, 0, 0]), 24),
            (IpAddr::from(DELIVER6), 64),
        ],
        gateway: false,
        signal_pmtu: false,
    }
}

fn load(fou: bool) -> Loaded {
    assert!(
        tests::netns::available(),
        "these tests need root (BPF programs)"
    );
    Loaded::new(&settings(fou), 1, 1).expect("load the fast path")
}

thread_local! {
    /// The programs for FOU and for IP-in-IP, loaded once for the cases.
    static LOADED: std::cell::RefCell<[Option<Loaded>; 2]> = const { std::cell::RefCell::new([None, None]) };
}

/// Runs `decap` on `f`, with the programs loaded once per thread.
fn decap(fou: bool, f: &[u8]) -> (i32, Vec<u8>) {
    LOADED.with(|l| {
        let mut l = l.borrow_mut();
        let fp = l[usize::from(fou)].get_or_insert_with(|| load(fou));
        fp.test_run("decap", f)
            .unwrap_or_else(|e| panic!("test run of {} bytes: {e:#}", f.len()))
    })
}

/// A TCP segment from the client to the server behind the far gateway.
fn inner(flags: u8, payload: &[u8], dst: [u8; 4]) -> Vec<u8> {
    let b = PacketBuilder::ipv4([10, 0, 1, 2], dst, 63).tcp(40000, 80, 1000, 500);
    write_with_flags(b, flags, payload)
}

/// The same over IPv6, from fd00:1::2 to `dst`.
fn inner6(flags: u8, payload: &[u8], dst: [u8; 16]) -> Vec<u8> {
    let mut src = [0u8; 16];
    src[..4].copy_from_slice(&[0xfd, 0, 0, 1]);
    src[15] = 2;
    let b = PacketBuilder::ipv6(src, dst, 63).tcp(40000, 80, 1000, 500);
    write_with_flags(b, flags, payload)
}

/// The segment `b` with `flags` (ACK, PSH, SYN, FIN, RST as in the TCP
/// header's flag byte) and `payload`.
fn write_with_flags(
    mut b: etherparse::PacketBuilderStep<etherparse::TcpHeader>,
    flags: u8,
    payload: &[u8],
) -> Vec<u8> {
    if flags & 0x10 != 0 {
        b = b.ack(7);
    }
    if flags & 0x08 != 0 {
        b = b.psh();
    }
    if flags & 0x02 != 0 {
        b = b.syn();
    }
    if flags & 0x01 != 0 {
        b = b.fin();
    }
    if flags & 0x04 != 0 {
        b = b.rst();
    }
    let mut v = Vec::new();
    b.write(&mut v, payload).expect("inner packet");
    v
}

/// fd00:9::`host`, an allowed destination.
fn server6(host: u8) -> [u8; 16] {
    let mut a = DELIVER6;
    a[15] = host;
    a
}

/// The inner packet in FOU (or IP-in-IP: protocol 4, or 41 for IPv6
/// inside) from `src`, in an Ethernet frame.
fn frame(fou: bool, src: [u8; 4], inner: &[u8]) -> Vec<u8> {
    let eth = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 2], [2, 0, 0, 0, 0, 1]);
    let mut v = Vec::new();
    if fou {
        eth.ipv4(src, LOCAL, 64)
            .udp(50000, PORT)
            .write(&mut v, inner)
            .expect("frame");
    } else {
        // protocol 4: etherparse's IpNumber::IPIP is 94, so build the
        // outer header by hand
        let proto = if inner.first().is_some_and(|b| b >> 4 == 6) {
            41
        } else {
            4
        };
        let mut ip = etherparse::Ipv4Header::new(inner.len() as u16, 64, proto.into(), src, LOCAL)
            .expect("outer header");
        ip.header_checksum = ip.calc_header_checksum();
        v.extend_from_slice(&[2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 8, 0]);
        ip.write(&mut v).expect("outer header");
        v.extend_from_slice(inner);
    }
    v
}

/// What a frame may become: untouched, or exactly its inner packet behind
/// the same Ethernet header, and only when every rule holds.
fn check(fou: bool, input: &[u8], verdict: i32, out: &[u8]) -> Result<(), TestCaseError> {
    if verdict == PASS {
        prop_assert_eq!(out, input, "passed on, but changed");
        return Ok(());
    }
    prop_assert_eq!(verdict, REDIRECT, "an unexpected verdict");
    let hlen = if fou { 28 } else { 20 };
    prop_assert!(
        input.len() >= ETH + hlen + 40,
        "shorter than a bare TCP segment"
    );
    let (outer, inner) = (&input[ETH..], &input[ETH + hlen..]);
    prop_assert_eq!(&out[..ETH], &input[..ETH]);
    prop_assert_eq!(&out[ETH..], inner, "not exactly the inner packet");
    prop_assert_eq!(outer[0], 0x45);
    prop_assert_eq!(&outer[12..16], &PEER[..], "not from the peer");
    prop_assert_eq!(&outer[16..20], &LOCAL[..]);
    prop_assert!(outer[6] & 0x3f == 0 && outer[7] == 0, "an outer fragment");
    let v6 = inner[0] >> 4 == 6;
    if fou {
        prop_assert_eq!(outer[9], 17);
        prop_assert_eq!(u16::from_be_bytes([outer[22], outer[23]]), PORT);
    } else {
        prop_assert_eq!(
            outer[9],
            if v6 { 41 } else { 4 },
            "protocol and inner version disagree"
        );
    }
    if v6 {
        prop_assert!(inner.len() >= 60, "shorter than a bare TCP segment");
        prop_assert_eq!(inner[6], 6, "inner TCP without extension headers");
        prop_assert_eq!(
            &inner[24..32],
            &DELIVER6[..8],
            "an inner destination not allowed"
        );
        prop_assert_eq!(
            usize::from(u16::from_be_bytes([inner[4], inner[5]])) + 40,
            inner.len(),
            "not a whole inner packet"
        );
        prop_assert_eq!(inner[53] & 0x07, 0, "SYN, FIN or RST");
        return Ok(());
    }
    prop_assert_eq!(inner[0], 0x45, "inner IPv4 without options");
    prop_assert_eq!(inner[9], 6, "inner TCP");
    prop_assert_eq!(
        &inner[16..19],
        &[10, 9, 0][..],
        "an inner destination not allowed"
    );
    prop_assert_eq!(
        usize::from(u16::from_be_bytes([inner[2], inner[3]])),
        inner.len(),
        "not a whole inner packet"
    );
    prop_assert_eq!(inner[33] & 0x07, 0, "SYN, FIN or RST");
    Ok(())
}

#[test]
fn decap_takes_exactly_the_segments_it_may_carry() {
    for fou in [true, false] {
        let run = |f: &[u8]| decap(fou, f);
        let data = inner(0x18, b"data", [10, 9, 0, 2]);
        let good = frame(fou, PEER, &data);
        let (verdict, out) = run(&good);
        assert_eq!(verdict, REDIRECT, "fou {fou}");
        assert_eq!(&out[ETH..], &data[..], "fou {fou}");
        // a bare ACK (40 bytes inside) is a whole segment too
        let ack = inner(0x10, b"", [10, 9, 0, 2]);
        let bare = frame(fou, PEER, &ack);
        let (verdict, out) = run(&bare);
        assert_eq!(verdict, REDIRECT, "bare ACK, fou {fou}");
        assert_eq!(&out[ETH..], &ack[..], "bare ACK, fou {fou}");
        check(fou, &bare, verdict, &out).unwrap_or_else(|e| panic!("bare ACK, fou {fou}: {e}"));
        let data6 = inner6(0x18, b"data", server6(2));
        let good6 = frame(fou, PEER, &data6);
        let (verdict, out) = run(&good6);
        assert_eq!(verdict, REDIRECT, "IPv6, fou {fou}");
        assert_eq!(&out[ETH..], &data6[..], "IPv6, fou {fou}");
        check(fou, &good6, verdict, &out).unwrap_or_else(|e| panic!("IPv6, fou {fou}: {e}"));
        let mut not_here = server6(2);
        not_here[3] = 8; // fd00:8::2
                         // IP-in-IP: the outer protocol, not the inner version, says what
                         // is inside
        let mismatched: Vec<(&str, Vec<u8>)> = if fou {
            vec![]
        } else {
            let mut v6_as_4 = good6.clone();
            v6_as_4[ETH + 9] = 4;
            let mut v4_as_41 = good.clone();
            v4_as_41[ETH + 9] = 41;
            vec![
                ("IPv6 in protocol 4", v6_as_4),
                ("IPv4 in protocol 41", v4_as_41),
            ]
        };
        for (why, f) in mismatched.into_iter().chain([
            ("not the peer", frame(fou, [192, 0, 2, 3], &data)),
            ("IPv6 SYN", frame(fou, PEER, &inner6(0x02, b"", server6(2)))),
            (
                "IPv6, not delivered here",
                frame(fou, PEER, &inner6(0x10, b"x", not_here)),
            ),
            ("IPv6, cut short", good6[..good6.len() - 2].to_vec()),
            ("SYN", frame(fou, PEER, &inner(0x02, b"", [10, 9, 0, 2]))),
            ("FIN", frame(fou, PEER, &inner(0x11, b"", [10, 9, 0, 2]))),
            ("RST", frame(fou, PEER, &inner(0x04, b"", [10, 9, 0, 2]))),
            (
                "not delivered here",
                frame(fou, PEER, &inner(0x10, b"x", [10, 8, 0, 2])),
            ),
            ("cut short", good[..good.len() - 2].to_vec()),
            ("outer header only", good[..ETH + 24].to_vec()),
        ]) {
            let (verdict, out) = run(&f);
            assert_eq!(verdict, PASS, "{why} (fou {fou})");
            assert_eq!(out, f, "{why} (fou {fou})");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    // (the kernel's test runner refuses a frame shorter than an IPv4 header)
    fn decap_never_takes_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), ETH + 20..300), fou in any::<bool>()) {
        let (verdict, out) = decap(fou, &bytes);
        check(fou, &bytes, verdict, &out)?;
    }

    #[test]
    fn decap_of_mutated_frames_is_exact_or_untouched(
        fou in any::<bool>(),
        v6 in any::<bool>(),
        flags in prop::sample::select(vec![0x10u8, 0x18, 0x02, 0x11, 0x14, 0x12]),
        payload in prop::collection::vec(any::<u8>(), 0..200),
        at in any::<prop::sample::Index>(),
        value in any::<u8>(),
    ) {
        let packet = if v6 {
            inner6(flags, &payload, server6(2))
        } else {
            inner(flags, &payload, [10, 9, 0, 2])
        };
        let mut f = frame(fou, PEER, &packet);
        let at = at.index(f.len());
        f[at] = value;
        let (verdict, out) = decap(fou, &f);
        check(fou, &f, verdict, &out)?;
    }
}

/// Ones' complement sum of `data` as 16-bit big-endian words, onto `s`.
fn sum16(data: &[u8], mut s: u64) -> u64 {
    for c in data.chunks(2) {
        s += u64::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)]));
    }
    s
}

fn folds_to_ones(mut s: u64) -> bool {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s == 0xffff
}

/// Whether IPv4 packet `p`'s header checksum holds.
fn ip_check_holds(p: &[u8]) -> bool {
    folds_to_ones(sum16(&p[..20], 0))
}

/// Whether the TCP checksum of IP packet `p` (IPv4 without options, or
/// IPv6 without extension headers) holds.
fn tcp_check_holds(p: &[u8]) -> bool {
    let (l3, addrs) = if p[0] >> 4 == 6 {
        (40, 8..40)
    } else {
        (20, 12..20)
    };
    let seg = &p[l3..];
    folds_to_ones(sum16(seg, sum16(&p[addrs], 6 + seg.len() as u64)))
}

/// A TCP segment as `encap` finds it on the TUN device, checksums right:
/// IPv4 with `id` and `df`, or IPv6 (fd00:1::2 → fd00:9::2) with `v6`.
fn segment(
    v6: bool,
    seq: u32,
    flags: u8,
    options: &[u8],
    id: u16,
    df: bool,
    payload: &[u8],
) -> Vec<u8> {
    let mut tcp = etherparse::TcpHeader::new(40000, 80, seq, 500);
    tcp.acknowledgment_number = 7;
    tcp.ack = flags & 0x10 != 0;
    tcp.psh = flags & 0x08 != 0;
    tcp.urg = flags & 0x20 != 0;
    tcp.ece = flags & 0x40 != 0;
    tcp.cwr = flags & 0x80 != 0;
    tcp.set_options_raw(options).expect("options");
    let len = tcp.header_len() + payload.len();
    if v6 {
        let mut src = server6(2);
        src[3] = 1; // fd00:1::2
        let ip = etherparse::Ipv6Header {
            payload_length: len as u16,
            next_header: etherparse::IpNumber::TCP,
            hop_limit: 63,
            source: src,
            destination: server6(2),
            ..Default::default()
        };
        tcp.checksum = tcp.calc_checksum_ipv6(&ip, payload).expect("checksum");
        let mut v = Vec::new();
        ip.write(&mut v).expect("ip");
        tcp.write(&mut v).expect("tcp");
        v.extend_from_slice(payload);
        return v;
    }
    let mut ip = etherparse::Ipv4Header::new(
        len as u16,
        63,
        etherparse::IpNumber::TCP,
        [10, 0, 1, 2],
        [10, 9, 0, 2],
    )
    .expect("ip header");
    ip.identification = id;
    ip.dont_fragment = df;
    ip.header_checksum = ip.calc_header_checksum();
    tcp.checksum = tcp.calc_checksum_ipv4(&ip, payload).expect("checksum");
    let mut v = Vec::new();
    ip.write(&mut v).expect("ip");
    tcp.write(&mut v).expect("tcp");
    v.extend_from_slice(payload);
    v
}

/// One case of the cutting property.
#[derive(Debug, Clone)]
struct Cut {
    v6: bool,
    options: Vec<u8>,
    flags: u8,
    seq: u32,
    id: u16,
    df: bool,
    /// Payload bytes beyond the most that fits the tunnel in one segment.
    extra: usize,
    seed: u64,
    /// A payload byte (index into the payload) flipped after the
    /// checksum was made.
    corrupt: Option<(prop::sample::Index, u8)>,
}

fn cuts() -> impl Strategy<Value = Cut> {
    (
        any::<bool>(),
        (0usize..=10).prop_flat_map(|w| prop::collection::vec(any::<u8>(), 4 * w)),
        // ACK with PSH, CWR, ECE as they come; URG now and then
        prop::sample::select(vec![0x10u8, 0x18, 0x90, 0x58, 0xd8, 0x50, 0x30, 0x38]),
        any::<u32>(),
        any::<u16>(),
        any::<bool>(),
        1usize..=400,
        any::<u64>(),
        prop::option::weighted(0.3, (any::<prop::sample::Index>(), 1u8..=255)),
    )
        .prop_map(
            |(v6, options, flags, seq, id, df, extra, seed, corrupt)| Cut {
                v6,
                options,
                flags,
                seq,
                id,
                df,
                extra,
                seed,
                corrupt,
            },
        )
}

/// The TUN device with `encap` on its egress, and where its output lands.
struct CutBed {
    fou: bool,
    max_plain: usize,
    tun: tunnel::tundev::Tun,
    /// A packet socket on the TUN device: what it sends goes through the
    /// device's egress, as routed packets do.
    inject: socket2::Socket,
    ifindex: i32,
    /// The far end's FOU socket, or its raw sockets for protocols 4 and 41
    /// (IP-in-IP and 6in4).
    far: Vec<socket2::Socket>,
    _fast: FastPath,
}

impl CutBed {
    fn send(&self, packet: &[u8]) -> Result<(), TestCaseError> {
        let proto = if packet[0] >> 4 == 6 {
            libc::ETH_P_IPV6
        } else {
            libc::ETH_P_IP
        };
        // SAFETY: sockaddr_ll is plain data; zeroes are a valid value.
        let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        to.sll_family = libc::AF_PACKET as u16;
        to.sll_protocol = (proto as u16).to_be();
        to.sll_ifindex = self.ifindex;
        use std::os::fd::AsRawFd as _;
        // SAFETY: a live buffer and a sockaddr_ll of the size given.
        let n = unsafe {
            libc::sendto(
                self.inject.as_raw_fd(),
                packet.as_ptr().cast(),
                packet.len(),
                0,
                (&to as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if n != packet.len() as isize {
            let e = std::io::Error::last_os_error();
            return Err(TestCaseError::fail(format!("send: {e}")));
        }
        Ok(())
    }

    /// The inner packets (IPv6 with `v6`) that reached the far end within
    /// `wait`.
    fn far_packets(&self, v6: bool, wait: Duration) -> Vec<Vec<u8>> {
        let mut got = Vec::new();
        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 2048];
        let far = &self.far[if self.fou { 0 } else { usize::from(v6) }];
        far.set_read_timeout(Some(wait)).expect("timeout");
        while let Ok(n) = far.recv(&mut buf) {
            // SAFETY: recv initialised the first n bytes.
            let b: Vec<u8> = buf[..n]
                .iter()
                .map(|x| unsafe { x.assume_init() })
                .collect();
            // FOU: the datagram is the inner packet; IP-in-IP: behind the
            // outer header
            got.push(if self.fou { b } else { b[20..].to_vec() });
            // the program runs as the packet is sent: the rest is there
            far.set_read_timeout(Some(Duration::from_millis(10)))
                .expect("timeout");
        }
        got
    }

    /// The IPv4 TCP packets that came to userspace through the TUN device.
    fn to_userspace(&self) -> Vec<Vec<u8>> {
        let mut got = Vec::new();
        let mut batch = self.tun.recv_batch();
        while self.tun.try_recv(&mut batch).expect("read the TUN device") {
            for i in 0..batch.len() {
                let p = batch.packet(i);
                let tcp = (p.len() > 20 && p[0] == 0x45 && p[9] == 6)
                    || (p.len() > 40 && p[0] >> 4 == 6 && p[6] == 6);
                if tcp {
                    got.push(p.to_vec());
                }
            }
        }
        got
    }
}

/// A TUN device in `near` with the fast path on it, its WAN a veth to
/// `far`, which listens for the tunnel's packets.
fn cut_bed(near: &Netns, far: &Netns, fou: bool) -> CutBed {
    let far_socket = in_netns(&far.name, move || {
        use socket2::{Domain, Protocol, Socket, Type};
        if fou {
            let s = Socket::new(Domain::IPV4, Type::DGRAM, None).expect("socket");
            let at: SocketAddr = format!("192.0.2.2:{PORT}").parse().expect("addr");
            s.bind(&at.into()).expect("bind");
            vec![s]
        } else {
            [4, 41]
                .map(|p| {
                    Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::from(p)))
                        .expect("raw socket")
                })
                .into()
        }
    })
    .expect("namespace");
    in_netns(&near.name, move || {
        let name = "fpcut";
        // room for the cases that are too big to cut in two
        let tun = tunnel::tundev::open(name, 2000).expect("TUN device");
        let max_plain = if fou { 1472 } else { 1480 };
        let fast = FastPath::attach(&Settings {
            tun: name.into(),
            local: IpAddr::from(LOCAL),
            peer: IpAddr::from(PEER),
            max_plain: max_plain as u16,
            ..settings(fou)
        })
        .expect("attach the fast path");
        let c = std::ffi::CString::new(name).expect("name");
        // SAFETY: a NUL-terminated string.
        let ifindex = unsafe { libc::if_nametoindex(c.as_ptr()) } as i32;
        let inject = socket2::Socket::new(
            socket2::Domain::PACKET,
            socket2::Type::DGRAM,
            Some(socket2::Protocol::from(i32::from(
                (libc::ETH_P_IP as u16).to_be(),
            ))),
        )
        .expect("packet socket");
        CutBed {
            fou,
            max_plain,
            tun,
            inject,
            ifindex,
            far: far_socket,
            _fast: fast,
        }
    })
    .expect("namespace")
}

/// Sends `c` through the fast path and checks what comes out: two
/// segments at the far end, or the segment whole in userspace.
fn check_cut(bed: &CutBed, c: &Cut) -> Result<(), TestCaseError> {
    let max_plain = bed.max_plain;
    let l3 = if c.v6 { 40 } else { 20 };
    let hdrs = l3 + 20 + c.options.len();
    let n = max_plain - hdrs + c.extra;
    let payload: Vec<u8> = (0..n as u64)
        .map(|i| (i.wrapping_add(c.seed).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8)
        .collect();
    let mut packet = segment(c.v6, c.seq, c.flags, &c.options, c.id, c.df, &payload);
    let mut sent = payload.clone(); // the payload as sent, corrupted or not
    if let Some((at, x)) = &c.corrupt {
        let i = at.index(n);
        packet[hdrs + i] ^= x;
        sent[i] ^= x;
    }
    bed.send(&packet)?;
    let urgent = c.flags & 0x20 != 0;
    let whole = urgent || c.extra > 248;
    let far = bed.far_packets(c.v6, Duration::from_millis(if whole { 30 } else { 2000 }));
    let userspace = bed.to_userspace();
    if far.is_empty() {
        prop_assert!(whole, "left whole, though it could be cut in two");
        prop_assert_eq!(userspace.len(), 1, "not left to userspace");
        prop_assert_eq!(&userspace[0], &packet, "left to userspace, but changed");
        return Ok(());
    }
    prop_assert!(!urgent, "an urgent segment was cut");
    prop_assert!(c.extra <= 256, "cut in two, though too big for two");
    prop_assert!(userspace.is_empty(), "cut, but also left to userspace");
    prop_assert_eq!(far.len(), 2, "not two segments");
    let (one, two) = (&far[0], &far[1]);
    let (p1, p2) = (one.len() - hdrs, two.len() - hdrs);
    prop_assert!(
        one.len() <= max_plain && two.len() <= max_plain,
        "a part does not fit: {} and {}",
        one.len(),
        two.len()
    );
    prop_assert!(p1 > 0 && p2 > 0);
    prop_assert_eq!(p1 + p2, n, "bytes lost or added");
    prop_assert_eq!(&one[hdrs..], &sent[..p1]);
    prop_assert_eq!(&two[hdrs..], &sent[p1..]);
    for (which, seg, id, seq, flags) in [
        ("first", one, c.id, c.seq, c.flags & !0x08),
        (
            "second",
            two,
            c.id.wrapping_add(1),
            c.seq.wrapping_add(p1 as u32),
            c.flags & !0x80,
        ),
    ] {
        let be16 = |at: usize| u16::from_be_bytes([seg[at], seg[at + 1]]);
        if c.v6 {
            prop_assert_eq!(
                usize::from(be16(4)) + 40,
                seg.len(),
                "{} segment: IPv6 payload length",
                which
            );
            prop_assert_eq!(
                &seg[..4],
                &packet[..4],
                "{} segment: version, class, flow",
                which
            );
            prop_assert_eq!(
                &seg[6..40],
                &packet[6..40],
                "{} segment: next header, hop limit, addresses",
                which
            );
        } else {
            prop_assert!(ip_check_holds(seg), "{} segment: IP header checksum", which);
            prop_assert_eq!(
                usize::from(be16(2)),
                seg.len(),
                "{} segment: IP length",
                which
            );
            prop_assert_eq!(be16(4), id, "{} segment: IP ID", which);
            prop_assert_eq!(seg[6] & 0x40 != 0, c.df, "{} segment: DF", which);
            prop_assert_eq!(
                &seg[8..10],
                &packet[8..10],
                "{} segment: TTL, protocol",
                which
            );
            prop_assert_eq!(
                &seg[12..20],
                &packet[12..20],
                "{} segment: addresses",
                which
            );
        }
        let t = l3; // the TCP header
        prop_assert_eq!(
            &seg[t..t + 4],
            &packet[t..t + 4],
            "{} segment: ports",
            which
        );
        prop_assert_eq!(
            u32::from_be_bytes([seg[t + 4], seg[t + 5], seg[t + 6], seg[t + 7]]),
            seq,
            "{} segment: sequence number",
            which
        );
        prop_assert_eq!(
            &seg[t + 8..t + 13],
            &packet[t + 8..t + 13],
            "{} segment: ACK number, data offset",
            which
        );
        prop_assert_eq!(seg[t + 13], flags, "{} segment: flags", which);
        prop_assert_eq!(
            &seg[t + 14..t + 16],
            &packet[t + 14..t + 16],
            "{} segment: window",
            which
        );
        prop_assert_eq!(
            &seg[t + 18..hdrs],
            &packet[t + 18..hdrs],
            "{} segment: urgent pointer, options",
            which
        );
        prop_assert_eq!(
            tcp_check_holds(seg),
            c.corrupt.is_none(),
            "{} segment: TCP checksum",
            which
        );
    }
    Ok(())
}

/// The cutting property, 128 cases for each kind of tunnel.
#[test]
fn encap_cuts_lone_oversize_segments_in_two_as_tso_would() {
    assert!(
        tests::netns::available(),
        "these tests need root (BPF programs, network namespaces)"
    );
    for fou in [true, false] {
        let (near, far) = (
            Netns::new(unique("fn")).expect("namespace"),
            Netns::new(unique("ff")).expect("namespace"),
        );
        veth(&near, "192.0.2.1/24", &far, "192.0.2.2/24").expect("veth");
        let bed = cut_bed(&near, &far, fou);
        let mut runner = TestRunner::new(Config {
            cases: 128,
            ..Config::default()
        });
        runner
            .run(&cuts(), |c| check_cut(&bed, &c))
            .unwrap_or_else(|e| panic!("fou {fou}: {e}"));
    }
}
