//! Crashes, races, forgeries and garbage.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::str::FromStr;
use std::time::Duration;

use dyndns::client::{unix_now, Client, ClientError};
use dyndns::ops::{self, OpsError};
use dyndns::TsigKey;
use hickory_proto::op::{Message, ResponseCode, UpdateMessage as _};
use hickory_proto::rr::rdata::tsig::TsigError;
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use proptest::prelude::*;

use crate::common::*;

fn name(s: &str) -> Name {
    Name::from_str(s).expect("name")
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

const WEB: &[&str] = &["10.1.0.10", "fd00:1::10"];

fn web_ips() -> Vec<IpAddr> {
    WEB.iter().map(|s| ip(s)).collect()
}

#[tokio::test]
async fn an_acknowledged_update_survives_kill_9() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = key();
    let ours = Ours::start(dir.path(), &key, "");
    let client = Client::new(ours.addr, Some(&key)).expect("client");
    let zone = name(ZONE);
    let web = name("web.example.test.");
    let to = vec![ip("10.2.0.20"), ip("fd00:2::20")];
    // one update touching two RRsets (A and AAAA); acknowledged, then kill -9 at once
    ops::switch(&client, &zone, &web, &web_ips(), &to, 5)
        .await
        .expect("switch");
    ours.kill9();

    let ours = Ours::restart(dir.path());
    let a = ours.addr;
    tokio::task::spawn_blocking(move || {
        assert_eq!(dig_short(a, "web.example.test.", "A"), vec!["10.2.0.20"]);
        assert_eq!(
            dig_short(a, "web.example.test.", "AAAA"),
            vec!["fd00:2::20"]
        );
        assert_eq!(dig_ttl(a, "web.example.test.", "A"), Some(5));
        assert_eq!(serial(a), 2);
    })
    .await
    .expect("checks");

    // and it goes on from there
    let client = Client::new(a, Some(&key)).expect("client");
    ops::switch(&client, &zone, &web, &to, &web_ips(), 5)
        .await
        .expect("switch back");
    drop(ours);

    // an operator who edits the zone file and raises its serial wins over the journal
    std::fs::write(
        dir.path().join("example.test.zone"),
        zone_text(100).replace("10.1.0.10", "10.7.0.7"),
    )
    .expect("edit zone");
    let ours = Ours::restart(dir.path());
    let a = ours.addr;
    tokio::task::spawn_blocking(move || {
        assert_eq!(dig_short(a, "web.example.test.", "A"), vec!["10.7.0.7"]);
        assert_eq!(serial(a), 100);
    })
    .await
    .expect("checks");
    assert!(dir.path().join("example.test.zone.jnl.old").exists());
}

#[tokio::test]
async fn of_concurrent_switches_exactly_one_wins() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = key();
    let ours = Ours::start(dir.path(), &key, "");
    concurrent_switches(ours.addr, &key).await;
}

/// Eight clients switch the same name from the same old address at once.
pub async fn concurrent_switches(server: SocketAddr, key: &TsigKey) {
    let client = Client::new(server, Some(key)).expect("client");
    let zone = name(ZONE);
    let web = name("web.example.test.");
    let mut tasks = Vec::new();
    for i in 0..8u8 {
        let client = client.clone();
        let (zone, web) = (zone.clone(), web.clone());
        tasks.push(tokio::spawn(async move {
            let to = vec![IpAddr::from([10, 3, 0, i + 1])];
            (
                to.clone(),
                ops::switch(&client, &zone, &web, &web_ips(), &to, 5).await,
            )
        }));
    }
    let mut winners = Vec::new();
    let mut losers = 0;
    for t in tasks {
        match t.await.expect("task") {
            (to, Ok(_)) => winners.push(to),
            (_, Err(OpsError::Lost { .. })) => losers += 1,
            (_, Err(e)) => panic!("unexpected error: {e}"),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one switch must win");
    assert_eq!(losers, 7);
    let now = ops::addresses(&client, &web).await.expect("read").ips();
    assert_eq!(
        now, winners[0],
        "the name points to the winner's address, only"
    );
}

#[tokio::test]
async fn our_client_reports_each_refusal_as_what_it_is() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = key();
    let ours = Ours::start(dir.path(), &key, "");
    refusals_are_reported(ours.addr, &key).await;
}

/// Wrong secret, unknown key, no key, foreign zone, name outside the zone.
pub async fn refusals_are_reported(server: SocketAddr, key: &TsigKey) {
    let zone = name(ZONE);
    let web = name("web.example.test.");
    let to = [ip("10.9.9.9")];
    let wrong_secret = TsigKey::parse_spec(&format!(
        "hmac-sha256:{}:{}",
        key.display_name(),
        TsigKey::generate("x").expect("k").secret_base64()
    ))
    .expect("key");
    let unknown = TsigKey::generate("nobody").expect("key");

    let c = Client::new(server, Some(&wrong_secret)).expect("client");
    let e = ops::switch(&c, &zone, &web, &web_ips(), &to, 5)
        .await
        .expect_err("must be refused");
    assert!(
        matches!(e, OpsError::Client(ClientError::BadSig { .. })),
        "{e}"
    );
    let c = Client::new(server, Some(&unknown)).expect("client");
    let e = ops::switch(&c, &zone, &web, &web_ips(), &to, 5)
        .await
        .expect_err("must be refused");
    assert!(
        matches!(e, OpsError::Client(ClientError::BadKey { .. })),
        "{e}"
    );
    let c = Client::new(server, None).expect("client");
    let e = ops::switch(&c, &zone, &web, &web_ips(), &to, 5)
        .await
        .expect_err("must be refused");
    assert!(
        matches!(e, OpsError::Client(ClientError::Refused { .. })),
        "{e}"
    );

    let c = Client::new(server, Some(key)).expect("client");
    let e = ops::switch(
        &c,
        &name("other.test."),
        &name("web.other.test."),
        &[],
        &to,
        5,
    )
    .await
    .expect_err("must be refused");
    assert!(
        matches!(
            e,
            OpsError::Client(ClientError::NotAuth { .. } | ClientError::Refused { .. })
        ),
        "{e}"
    );
    let e = ops::switch(&c, &zone, &name("web.other.test."), &[], &to, 5)
        .await
        .expect_err("must be refused");
    assert!(
        matches!(e, OpsError::Client(ClientError::NotZone { .. })),
        "{e}"
    );

    assert_eq!(
        ops::addresses(&c, &web).await.expect("read").ips(),
        web_ips(),
        "a refusal changed the zone"
    );
}

/// A signed UPDATE that sets web's A record, as raw bytes.
fn signed_update(key: &TsigKey, addr: [u8; 4], time: u64) -> Vec<u8> {
    let mut msg = Client::update_message(&name(ZONE));
    let web = name("web.example.test.");
    let mut del = Record::update0(web.clone(), 0, RecordType::A).into_record_of_rdata();
    del.dns_class = DNSClass::ANY;
    msg.add_update(del);
    msg.add_update(Record::from_rdata(
        web,
        60,
        RData::A(A::from(std::net::Ipv4Addr::from(addr))),
    ));
    msg.metadata.id = rand::random();
    msg.finalize(&key.signer(300).expect("signer"), time)
        .expect("sign");
    msg.to_vec().expect("encode")
}

fn send_raw(server: SocketAddr, bytes: &[u8]) -> Message {
    let sock = UdpSocket::bind("127.0.0.1:0").expect("bind");
    sock.set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    sock.send_to(bytes, server).expect("send");
    let mut buf = vec![0u8; 4096];
    let (n, _) = sock.recv_from(&mut buf).expect("answer");
    Message::from_vec(&buf[..n]).expect("parse answer")
}

fn tsig_error(m: &Message) -> Option<TsigError> {
    m.signature.as_ref().and_then(|s| s.data.error)
}

#[test]
fn replayed_and_stale_updates_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = key();
    let ours = Ours::start(dir.path(), &key, "");
    let a = ours.addr;

    let first = signed_update(&key, [10, 4, 0, 1], unix_now());
    let answer = send_raw(a, &first);
    assert_eq!(answer.metadata.response_code, ResponseCode::NoError);
    let second = signed_update(&key, [10, 4, 0, 2], unix_now());
    assert_eq!(
        send_raw(a, &second).metadata.response_code,
        ResponseCode::NoError
    );
    assert_eq!(dig_short(a, "web.example.test.", "A"), vec!["10.4.0.2"]);

    // replaying the first would put the old address back: refused
    let replay = send_raw(a, &first);
    assert_eq!(replay.metadata.response_code, ResponseCode::NotAuth);
    assert_eq!(tsig_error(&replay), Some(TsigError::BadTime));
    assert_eq!(dig_short(a, "web.example.test.", "A"), vec!["10.4.0.2"]);

    // signed an hour ago (or a clock an hour off): BADTIME
    let stale = signed_update(&key, [10, 4, 0, 3], unix_now() - 3600);
    let answer = send_raw(a, &stale);
    assert_eq!(answer.metadata.response_code, ResponseCode::NotAuth);
    assert_eq!(tsig_error(&answer), Some(TsigError::BadTime));
    assert_eq!(dig_short(a, "web.example.test.", "A"), vec!["10.4.0.2"]);
    assert_eq!(serial(a), 3);
}

/// Garbage and mutated signed updates: the server neither crashes nor changes.
#[test]
fn malformed_packets_never_crash_the_server_or_change_the_zone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = key();
    let ours = Ours::start(dir.path(), &key, "");
    let a = ours.addr;
    let valid = signed_update(&key, [10, 6, 0, 1], unix_now());
    assert_eq!(
        send_raw(a, &valid).metadata.response_code,
        ResponseCode::NoError
    );
    // From here on, nothing may change the zone: a copy with another message
    // ID carries the same valid MAC (RFC 8945 signs the original ID), and is
    // then a replay.
    let sock = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 400,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let strategy = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..600),
        (any::<prop::sample::Index>(), 1..=255u8, 0..4usize).prop_map({
            let valid = valid.clone();
            move |(at, x, extra_cuts)| {
                let mut m = valid.clone();
                let i = at.index(m.len());
                m[i] ^= x; // any change to a signed message breaks its MAC
                m.truncate(m.len() - extra_cuts.min(m.len()));
                m
            }
        }),
    ];
    runner
        .run(&strategy, |bytes| {
            let _ = sock.send_to(&bytes, a);
            Ok(())
        })
        .expect("sending");
    // still alive, still unchanged
    assert_eq!(dig_short(a, "web.example.test.", "A"), vec!["10.6.0.1"]);
    assert_eq!(serial(a), 2);
    // and over TCP, a length prefix that lies
    use std::io::Write as _;
    let mut tcp = std::net::TcpStream::connect(a).expect("tcp");
    let _ = tcp.write_all(&[0xff, 0xff, 1, 2, 3]);
    drop(tcp);
    assert_eq!(
        dig(a, &["web.example.test.", "A", "+tcp", "+short"]).trim(),
        "10.6.0.1"
    );
}
