//! Network continuity across a move, with real namespaces (needs root).
//!
//! ```text
//!                      ┌─ 198.51.100.2 siteA (gateway A) br0 10.1.0.1 ┬─ vm 10.1.0.10
//!                      │                                              └─ neighbour 10.1.0.20
//!  client 10.0.0.2 ── wan
//!                      └─ 203.0.113.2  siteB (gateway B)
//! ```
//! `wan` routes 10.1.0.0/24 to siteA and 10.2.0.0/24 to siteB and drops
//! packets whose source is not routed via the side they arrive from (strict
//! rp_filter). The same in IPv6 beside it: client fd00::2, siteA's LAN
//! fd00:1::/64 (the VM fd00:1::10), siteB's public prefix fd00:2::/64. The "VM" is a namespace with an echo server; moving its link
//! from siteA to siteB keeps its sockets and changes only the path.

mod bed;

use std::time::Duration;

use bed::*;
use gateway_api::{Action, Drain, Handover, Prepare, Role, Switch};

/// `n` checksummed TCP streams and a UDP flow from the client to the VM,
/// then the move: every stream keeps going through the tunnel, the UDP
/// flow is echoed again, and a connection opened now, to the new address,
/// lands on the same server.
fn streams_across_the_move(bed: &Bed, n: u64) -> (Gw, Gw, Streams, UdpFlow) {
    let (ga, gb) = (bed.gateway_a(), bed.gateway_b());
    bed.register_and_prepare(&ga, &gb);
    let streams = Streams::start(bed, n);
    let udp = UdpFlow::start(bed);
    streams.wait_progress(Duration::from_secs(10));
    let before = streams.verified();
    bed.move_vm_and_switch(&ga, &gb);
    streams.wait_progress_beyond(&before, Duration::from_secs(20));
    udp.wait_echoes_after_switch(Duration::from_secs(10));
    bed.echo_once("10.2.0.100:7000", b"hello via the new address");
    (ga, gb, streams, udp)
}

#[test]
fn open_connections_survive_the_move_new_ones_reach_the_new_address_and_the_tunnel_drains() {
    let bed = Bed::new();
    let (ga, _gb, streams, udp) = streams_across_the_move(&bed, 20);
    // a host on the VM's old LAN still reaches it: gateway A answers ARP for
    // the old address there (proxy ARP) and tunnels
    bed.echo_from(
        &bed.neighbour.name,
        "10.1.0.10:7000",
        b"hello from the old LAN",
    );

    // new connections the VM opens leave with its new address
    bed.vm_connects_out();

    let status = ga.api("GET", "/v1/status", "");
    assert!(
        status.1["migrations"][0]["traffic"]["live_flows"].as_u64() >= Some(20),
        "{}",
        status.1
    );

    // close everything cleanly; then gateway A drains and tears down
    streams.finish();
    udp.stop();
    let (code, body) = ga.api("POST", "/v1/migrations/web1/drain", r#"{"deadline_s": 60}"#);
    assert_eq!(code, 200, "{body}");
    assert!(
        ga.wait_phase("web1", "drained", Duration::from_secs(20)),
        "gateway A never drained"
    );
    // after the drain, the old address is not tunnelled any more
    assert!(
        bed.connect_fails("10.1.0.10:7000"),
        "a new connection to the old address was tunnelled after the drain"
    );
    // but the new address still works
    bed.echo_once("10.2.0.100:7000", b"still here");
    bed.assert_no_gateway_errors();
}

#[test]
fn an_ipv6_guest_keeps_its_connections_and_gets_a_new_ipv6_address() {
    // flows idle for 2 s end: those only the kernel fast path carries stay
    // live only if what it carried reaches the flow tables
    let bed = Bed::with_tunnel("tcp_idle_s = 2");
    let (ga, gb) = (bed.gateway_a(), bed.gateway_b());
    bed.register_and_prepare_service(&ga, &gb, "web6", "fd00:1::10");
    let streams = Streams::start_to(&bed, 5, "[fd00:1::10]:7000");
    streams.wait_progress(Duration::from_secs(10));
    let before = streams.verified();

    bed.move_vm();
    bed.switch(&ga, &gb, "web6", "fd00:2::100");
    // through the tunnel, replies back through it (the wan drops siteA's
    // prefix arriving from siteB)
    streams.wait_progress_beyond(&before, Duration::from_secs(30));
    bed.echo_once("[fd00:2::100]:7000", b"hello via the new IPv6 address");
    bed.vm_connects_out_to("[fd00::2]:7100", "fd00:2::100");
    for _ in 0..2 {
        let before = streams.verified();
        streams.wait_progress_beyond(&before, Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(1500));
    }

    let (_, st) = ga.api("GET", "/v1/status", "");
    let m = &st["migrations"][0];
    assert_eq!(m["address"], "fd00:1::10", "{st}");
    assert!(m["traffic"]["live_flows"].as_u64() >= Some(5), "{st}");
    // the kernel carried the bulk, both ways, at both gateways
    let (_, sb) = gb.api("GET", "/v1/status", "");
    for s in [&st, &sb] {
        let fast = &s["data_plane"]["fast_path"];
        for way in ["encap_bytes", "decap_bytes"] {
            assert!(fast[way].as_u64() > Some(1 << 20), "{s}");
        }
        assert_eq!(fast["errors"].as_u64(), Some(0), "{s}");
    }
    // a public address of the other family is refused
    let (code, body) = gb.api(
        "POST",
        "/v1/services",
        r#"{"name":"web7","address":"fd00:1::11","site":"siteA"}"#,
    );
    assert_eq!(code, 201, "{body}");
    let (code, body) = gb.api("POST", "/v1/migrations/web7/prepare", r#"{"to":"siteB"}"#);
    assert_eq!(code, 200, "{body}");
    let (code, body) = gb.api(
        "POST",
        "/v1/migrations/web7/switch",
        &format!(
            r#"{{"role":"new","peer":"siteA","public":"10.2.0.107","lan":"{}"}}"#,
            bed.vm_link
        ),
    );
    assert_eq!(code, 400, "{body}");
    streams.finish();
    bed.assert_no_gateway_errors();
}

#[test]
fn gateway_a_restarted_with_kill_9_mid_drain_keeps_the_connections() {
    let bed = Bed::new();
    let (mut ga, gb) = (bed.gateway_a(), bed.gateway_b());
    bed.register_and_prepare(&ga, &gb);
    let streams = Streams::start(&bed, 5);
    streams.wait_progress(Duration::from_secs(10));
    bed.move_vm_and_switch(&ga, &gb);
    let (code, body) = ga.api(
        "POST",
        "/v1/migrations/web1/drain",
        r#"{"deadline_s": 120}"#,
    );
    assert_eq!(code, 200, "{body}");
    let before = streams.verified();
    streams.wait_progress_beyond(&before, Duration::from_secs(20));

    ga.kill9();
    ga = bed.restart_gateway_a(ga);
    let (_, st) = ga.api("GET", "/v1/status", "");
    assert_eq!(st["migrations"][0]["phase"], "draining", "{st}");
    let before = streams.verified();
    streams.wait_progress_beyond(&before, Duration::from_secs(20));

    streams.finish();
    assert!(
        ga.wait_phase("web1", "drained", Duration::from_secs(20)),
        "gateway A never drained"
    );
}

#[test]
fn the_api_refuses_requests_without_the_token_and_changes_nothing() {
    let bed = Bed::new();
    let ga = bed.gateway_a();
    let bad = [None, Some("wrong-token-wrong-token")];
    for token in bad {
        let (code, body) = ga.api_with(
            token,
            "POST",
            "/v1/services",
            r#"{"name":"web1","address":"10.1.0.10","site":"siteA"}"#,
        );
        assert_eq!(code, 401, "{body}");
        let (code, _) = ga.api_with(token, "GET", "/v1/status", "");
        assert_eq!(code, 401);
        let (code, _) = ga.api_with(token, "GET", "/metrics", "");
        assert_eq!(code, 401);
    }
    let (code, st) = ga.api("GET", "/v1/status", "");
    assert_eq!(code, 200);
    assert_eq!(
        st["services"],
        serde_json::json!({}),
        "an unauthorised call changed the state"
    );
    // malformed bodies are 400s, not crashes
    for body in [
        "{",
        "[]",
        r#"{"name":"x","address":"not-an-ip","site":"a"}"#,
        r#"{"name":"x","address":"10.0.0.1","site":"a","extra":1}"#,
    ] {
        let (code, b) = ga.api("POST", "/v1/services", body);
        assert_eq!(code, 400, "{body} → {b}");
    }
    let (code, _) = ga.api(
        "POST",
        "/v1/migrations/nope/switch",
        r#"{"role":"old","peer":"siteB"}"#,
    );
    assert_eq!(code, 404);
    let (code, m) = ga.api("GET", "/metrics", "");
    assert_eq!(code, 200);
    assert!(
        m.as_str()
            .is_some_and(|t| t.contains("gateway_drops_total")),
        "{m}"
    );
}

#[test]
fn packets_from_unknown_peers_or_to_unregistered_addresses_are_dropped_and_counted() {
    let bed = Bed::new();
    let (ga, gb) = (bed.gateway_a(), bed.gateway_b());
    bed.register_and_prepare(&ga, &gb);
    bed.move_vm_and_switch(&ga, &gb);
    // from the client (not a peer): an IPIP packet aimed at gateway B
    bed.send_ipip_from_client("203.0.113.2", [10, 1, 0, 10]);
    // from gateway A's address (a peer) but for an address nobody registered
    bed.send_ipip_from_site_a("203.0.113.2", [10, 1, 0, 99]);
    std::thread::sleep(Duration::from_millis(300));
    let (_, st) = gb.api("GET", "/v1/status", "");
    let drops = &st["data_plane"]["drops"];
    assert_eq!(drops["unknown_peer"].as_u64(), Some(1), "{st}");
    assert_eq!(drops["unregistered_destination"].as_u64(), Some(1), "{st}");
}

#[test]
fn a_fou_tunnel_that_signals_the_path_mtu_keeps_the_connections() {
    let bed = Bed::with_tunnel("kind = \"fou\"\nsignal_pmtu = true");
    let (ga, gb) = (bed.gateway_a(), bed.gateway_b());
    bed.register_and_prepare(&ga, &gb);
    let streams = Streams::start(&bed, 5);
    streams.wait_progress(Duration::from_secs(10));
    let before = streams.verified();
    bed.move_vm_and_switch(&ga, &gb);
    // full-size segments no longer fit (1500 > 1472 inside UDP): the
    // endpoints are told so and shrink their segments
    streams.wait_progress_beyond(&before, Duration::from_secs(30));
    bed.echo_once("10.2.0.100:7000", b"new address over FOU");
    let (_, st) = ga.api("GET", "/v1/status", "");
    assert!(st["data_plane"]["icmp_too_big"].as_u64() >= Some(1), "{st}");
    assert!(
        st["data_plane"]["largest_encapsulated"].as_u64() <= Some(1472),
        "{st}"
    );
    streams.finish();
}

/// The move with the kernel fast path on (FOU): the streams' bulk crosses
/// in the kernel, every byte still checked; new connections to the new
/// address and the VM's own still leave translated; and the drain waits
/// for connections that only the kernel carries (with `tcp_idle_s = 2`,
/// their flows would idle out of gateway A's table within 2 s, and the
/// drain would cut them, if what the kernel carried were not fed back).
#[test]
fn with_the_kernel_fast_path_connections_survive_and_the_drain_waits_for_them() {
    let bed = Bed::with_tunnel("kind = \"fou\"\nfast_path = true\ntcp_idle_s = 2");
    let (ga, gb, streams, udp) = streams_across_the_move(&bed, 10);
    bed.vm_connects_out();

    // a drain asked for while the streams run does not end them
    let (code, body) = ga.api("POST", "/v1/migrations/web1/drain", r#"{"deadline_s": 60}"#);
    assert_eq!(code, 200, "{body}");
    for _ in 0..3 {
        let before = streams.verified();
        streams.wait_progress_beyond(&before, Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(1500));
    }
    let (_, st) = ga.api("GET", "/v1/status", "");
    assert_eq!(st["migrations"][0]["phase"], "draining", "{st}");
    assert!(
        st["migrations"][0]["traffic"]["live_flows"].as_u64() >= Some(10),
        "{st}"
    );
    // the kernel carried the bulk, both ways, at both gateways
    let (_, sb) = gb.api("GET", "/v1/status", "");
    for (s, out, into) in [
        (&st, "encap_bytes", "decap_bytes"),
        (&sb, "decap_bytes", "encap_bytes"),
    ] {
        let fast = &s["data_plane"]["fast_path"];
        assert!(fast[out].as_u64() > Some(1 << 20), "{s}");
        assert!(fast[into].as_u64() > Some(1 << 20), "{s}");
        assert_eq!(fast["errors"].as_u64(), Some(0), "{s}");
    }
    // and says so in the metrics
    let (code, m) = ga.api("GET", "/metrics", "");
    assert_eq!(code, 200);
    let encap = m.as_str().and_then(|t| {
        t.lines()
            .find(|l| {
                l.starts_with("gateway_fast_path_packets_total{") && l.contains("way=\"encap\"")
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|n| n.parse::<u64>().ok())
    });
    assert!(encap > Some(1000), "{m}");

    streams.finish();
    udp.stop();
    assert!(
        ga.wait_phase("web1", "drained", Duration::from_secs(20)),
        "gateway A never drained"
    );
    assert!(
        bed.connect_fails("10.1.0.10:7000"),
        "a new connection to the old address was tunnelled after the drain"
    );
    bed.echo_once("10.2.0.100:7000", b"still here");
    bed.assert_no_gateway_errors();
}

/// Where `g` sends `service`: its role's peer (and that it is an old site).
fn forwards_to(g: &Gw, service: &str) -> String {
    match g.part(service).role {
        Some(Role::Old { peer, .. }) => peer,
        other => panic!("{service} is not forwarded here: {other:?}"),
    }
}

/// One move of the VM's link and the gateways' switch, as `migrator
/// migrate` does it: the site the VM left hands over what it knew, the new
/// site serves with it, the old one forwards to it, every other forwarding
/// site is re-pointed to it, the old one drains.
fn move_around(
    bed: &Bed,
    (from, g_from): (&tests::netns::Netns, &Gw),
    (to, g_to): (&tests::netns::Netns, &Gw),
    others: &[&Gw],
    site_from: &str,
    site_to: &str,
    public: Option<&str>,
) {
    let web1 = |a: Action| a.path("web1");
    for g in [g_from, g_to] {
        g.post(&web1(Action::Prepare), &Prepare { to: site_to.into() });
    }
    let (code, h) = g_from.api("GET", &web1(Action::Handover), "");
    assert_eq!(code, 200, "{h}");
    let handover: Handover = serde_json::from_value(h).expect("a handover");
    bed.move_vm_between(from, to);
    let lan = if to.name == bed.a.name {
        "br0".to_string()
    } else {
        bed.vm_link.clone()
    };
    g_to.post(
        &web1(Action::Switch),
        &Switch::New {
            peer: site_from.into(),
            public: public.map(|p| p.parse().expect("addr")),
            lan,
            handover: Some(handover),
        },
    );
    let old = |g: &Gw| {
        g.post(
            &web1(Action::Switch),
            &Switch::Old {
                peer: site_to.into(),
                lan: Some("br0".into()).filter(|_| g.ns == bed.a.name),
            },
        );
    };
    old(g_from);
    for g in others {
        if g.try_part("web1").is_some_and(|m| m.forwards()) {
            old(g);
        }
    }
    g_from.post(&web1(Action::Drain), &Drain::default());
}

/// A→B→C→A: connections opened at every site (to the VM's own address
/// before the first move, to B's and C's public addresses after) all stay
/// alive to the end, byte for byte, both those where the client speaks
/// first and those where the VM does, also across a kill -9 of the serving
/// site's gateway; each old site forwards straight to where the VM runs
/// (never through another site), and drains on its own once its
/// connections end.
#[test]
fn ring_of_three_sites_keeps_every_connection_and_never_chains_a_tunnel() {
    let bed = Bed::ring();
    let c = bed.c.as_ref().expect("siteC");
    let (ga, gb, gc) = (bed.gateway_a(), bed.gateway_b(), bed.gateway_c());
    for g in [&ga, &gb, &gc] {
        let (code, body) = g.api(
            "POST",
            "/v1/services",
            r#"{"name":"web1","address":"10.1.0.10","site":"siteA"}"#,
        );
        assert_eq!(code, 201, "{body}");
    }
    // at home, before any move
    let s1 = Streams::start(&bed, 3);
    let d1 = Downloads::start(&bed, 0..2, "10.1.0.10:7002");
    let all_progress = |s: &[&Streams], d: &[&Downloads]| {
        let (sb, db): (Vec<_>, Vec<_>) = (
            s.iter().map(|x| x.verified()).collect(),
            d.iter().map(|x| x.verified()).collect(),
        );
        for (x, b) in s.iter().zip(&sb) {
            x.wait_progress_beyond(b, Duration::from_secs(20));
        }
        for (x, b) in d.iter().zip(&db) {
            x.wait_progress_beyond(b, Duration::from_secs(20));
        }
    };
    all_progress(&[&s1], &[&d1]);

    // A → B
    move_around(
        &bed,
        (&bed.a, &ga),
        (&bed.b, &gb),
        &[&gc],
        "siteA",
        "siteB",
        Some("10.2.0.100"),
    );
    all_progress(&[&s1], &[&d1]);
    assert_eq!(forwards_to(&ga, "web1"), "siteB");
    bed.echo_once("10.2.0.100:7000", b"hello at siteB");
    let s2 = Streams::start_to(&bed, 3, "10.2.0.100:7000");
    let d2 = Downloads::start(&bed, 10..12, "10.2.0.100:7002");
    all_progress(&[&s1, &s2], &[&d1, &d2]);

    // B → C: A re-pointed to C, B forwards its own public address to C
    move_around(
        &bed,
        (&bed.b, &gb),
        (c, &gc),
        &[&ga],
        "siteB",
        "siteC",
        Some("10.3.0.100"),
    );
    all_progress(&[&s1, &s2], &[&d1, &d2]);
    assert_eq!(forwards_to(&ga, "web1"), "siteC", "A chains through B");
    assert_eq!(forwards_to(&gb, "web1"), "siteC");
    assert!(gc.part("web1").serves());
    let (ra, rb, rc) = (bed.routes(&bed.a), bed.routes(&bed.b), bed.routes(c));
    let into = |g: &Gw, addr: &str| format!("{addr} dev {} ", g.tun());
    assert!(
        ra.contains(&into(&ga, "10.1.0.10")),
        "A captures the VM's address:\n{ra}"
    );
    assert!(
        rb.contains(&into(&gb, "10.2.0.100")) && !rb.contains("10.1.0.10"),
        "B forwards only its own public address:\n{rb}"
    );
    assert!(
        rc.contains(&into(&gc, "10.3.0.100")) && rc.contains("from 10.1.0.10 iif"),
        "C serves:\n{rc}"
    );
    // B carries only the connections opened to it: A's go straight to C
    let b_flows = gb.part_traffic("web1").flows;
    assert!(
        b_flows <= 5,
        "B carried {b_flows} flows (5 were opened to it)"
    );
    bed.echo_once("10.3.0.100:7000", b"hello at siteC");
    let s3 = Streams::start_to(&bed, 3, "10.3.0.100:7000");
    let d3 = Downloads::start(&bed, 20..22, "10.3.0.100:7002");
    all_progress(&[&s1, &s2, &s3], &[&d1, &d2, &d3]);
    // C's gateway killed and restarted: it knows again which site each
    // connection came in at (the VM speaks first on the downloads, before
    // any client packet could teach it)
    std::thread::sleep(Duration::from_millis(2500));
    let mut gc = gc;
    gc.kill9();
    let gc = bed.restart_gateway_c(gc);
    all_progress(&[&s1, &s2, &s3], &[&d1, &d2, &d3]);

    // C → A: home again; B and C forward to A
    move_around(
        &bed,
        (c, &gc),
        (&bed.a, &ga),
        &[&gb],
        "siteC",
        "siteA",
        None,
    );
    all_progress(&[&s1, &s2, &s3], &[&d1, &d2, &d3]);
    assert!(ga.part("web1").serves());
    assert_eq!(forwards_to(&gb, "web1"), "siteA");
    assert_eq!(forwards_to(&gc, "web1"), "siteA");
    let ra = bed.routes(&bed.a);
    assert!(
        !ra.contains(&into(&ga, "10.1.0.10")),
        "at home the VM's address is on its LAN again:\n{ra}"
    );
    bed.echo_once("10.1.0.10:7000", b"hello at home");
    bed.echo_from(&bed.neighbour.name, "10.1.0.10:7000", b"hello neighbour");

    // everything ends; each old site drains on its own
    for s in [s1, s2, s3] {
        s.finish();
    }
    for d in [d1, d2, d3] {
        d.finish();
    }
    for (g, name) in [(&gb, "B"), (&gc, "C")] {
        assert!(
            g.wait_phase("web1", "drained", Duration::from_secs(30)),
            "{name} never drained: {:?}",
            g.part("web1")
        );
    }
    assert!(bed.connect_fails("10.2.0.100:7000"), "B still forwards");
    bed.echo_once("10.1.0.10:7000", b"still at home");
    bed.assert_no_gateway_errors();
}
