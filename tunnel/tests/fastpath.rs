//! The kernel fast path's decapsulation, a parser of packets from outside,
//! run in the kernel on generated frames (`BPF_PROG_TEST_RUN`; needs
//! root): it strips the outer header of exactly the packets it may carry
//! (a TCP segment without SYN/FIN/RST, from the peer, to the FOU port or
//! protocol 4, for an allowed destination) and leaves every other frame
//! untouched for the userspace plane, whatever its bytes.

use std::net::IpAddr;

use etherparse::PacketBuilder;
use proptest::prelude::*;
use tunnel::fastpath::{Loaded, Settings};

const PASS: i32 = -1; // TC_ACT_UNSPEC: not the fast path's
const REDIRECT: i32 = 7; // TC_ACT_REDIRECT: decapsulated, into the TUN device
const LOCAL: [u8; 4] = [192, 0, 2, 1];
const PEER: [u8; 4] = [192, 0, 2, 2];
const PORT: u16 = 5555;
const ETH: usize = 14;

fn settings(fou: bool) -> Settings {
    Settings {
        tun: "unused".into(),
        local: IpAddr::from(LOCAL),
        peer: IpAddr::from(PEER),
        extra_peers: vec![],
        fou_port: fou.then_some(PORT),
        max_plain: 1472,
        deliver: vec![(IpAddr::from([10, 9, 0, 0]), 24)],
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
    let mut b = PacketBuilder::ipv4([10, 0, 1, 2], dst, 63).tcp(40000, 80, 1000, 500);
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

/// The inner packet in FOU (or IP-in-IP) from `src`, in an Ethernet frame.
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
        let mut ip = etherparse::Ipv4Header::new(inner.len() as u16, 64, 4.into(), src, LOCAL)
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
    if fou {
        prop_assert_eq!(outer[9], 17);
        prop_assert_eq!(u16::from_be_bytes([outer[22], outer[23]]), PORT);
    } else {
        prop_assert_eq!(outer[9], 4);
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
        for (why, f) in [
            ("not the peer", frame(fou, [192, 0, 2, 3], &data)),
            ("SYN", frame(fou, PEER, &inner(0x02, b"", [10, 9, 0, 2]))),
            ("FIN", frame(fou, PEER, &inner(0x11, b"", [10, 9, 0, 2]))),
            ("RST", frame(fou, PEER, &inner(0x04, b"", [10, 9, 0, 2]))),
            (
                "not delivered here",
                frame(fou, PEER, &inner(0x10, b"x", [10, 8, 0, 2])),
            ),
            ("cut short", good[..good.len() - 2].to_vec()),
            ("outer header only", good[..ETH + 24].to_vec()),
        ] {
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
        flags in prop::sample::select(vec![0x10u8, 0x18, 0x02, 0x11, 0x14, 0x12]),
        payload in prop::collection::vec(any::<u8>(), 0..200),
        at in any::<prop::sample::Index>(),
        value in any::<u8>(),
    ) {
        let mut f = frame(fou, PEER, &inner(flags, &payload, [10, 9, 0, 2]));
        let at = at.index(f.len());
        f[at] = value;
        let (verdict, out) = decap(fou, &f);
        check(fou, &f, verdict, &out)?;
    }
}
