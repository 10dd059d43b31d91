//! Our client against a real BIND 9, and BIND 9 as our secondary.

use std::net::IpAddr;
use std::str::FromStr;
use std::time::Duration;

use dyndns::client::Client;
use dyndns::ops;
use hickory_proto::rr::Name;

use crate::common::*;
use crate::robust::{concurrent_switches, refusals_are_reported};

fn name(s: &str) -> Name {
    Name::from_str(s).expect("name")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_client_drives_a_migration_on_bind9() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = key();
    let zones = Named::primary_zone(dir.path(), &key);
    let named = Named::start(dir.path(), &key, &zones);
    let a = named.addr;
    let client = Client::new(a, Some(&key)).expect("client");
    let web = name("web.example.test.");
    let zone = ops::find_zone(&client, &web)
        .await
        .expect("zone found via SOA");
    assert_eq!(zone, name(ZONE));

    let p = ops::prepare(&client, &zone, &web, 5)
        .await
        .expect("prepare on BIND");
    assert_eq!((p.original_ttl, p.lowered_ttl), (300, 5));
    let check =
        move |f: fn(std::net::SocketAddr) -> bool| tokio::task::spawn_blocking(move || f(a));
    assert!(check(|a| dig_ttl(a, "web.example.test.", "A") == Some(5))
        .await
        .expect("dig"));

    let to: Vec<IpAddr> = vec![
        "10.2.0.10".parse().expect("ip"),
        "fd00:2::10".parse().expect("ip"),
    ];
    ops::switch(&client, &zone, &web, &p.addrs, &to, p.lowered_ttl)
        .await
        .expect("switch on BIND");
    assert!(
        check(|a| dig_short(a, "web.example.test.", "A") == vec!["10.2.0.10"])
            .await
            .expect("dig")
    );
    assert!(
        check(|a| dig_short(a, "web.example.test.", "AAAA") == vec!["fd00:2::10"])
            .await
            .expect("dig")
    );

    ops::finish(&client, &zone, &web, p.original_ttl)
        .await
        .expect("finish on BIND");
    assert!(check(|a| dig_ttl(a, "web.example.test.", "A") == Some(300))
        .await
        .expect("dig"));
    assert!(check(|a| serial(a) > 1).await.expect("dig"));

    // BIND's refusals come back as what they are, too
    let back: Vec<IpAddr> = vec![
        "10.1.0.10".parse().expect("ip"),
        "fd00:1::10".parse().expect("ip"),
    ];
    ops::switch(&client, &zone, &web, &to, &back, 300)
        .await
        .expect("switch back");
    refusals_are_reported(a, &key).await;
    concurrent_switches(a, &key).await;
}

#[test]
fn bind9_follows_our_zone_as_a_secondary_through_notify_and_signed_axfr() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ours_dir = dir.path().join("ours");
    let bind_dir = dir.path().join("bind");
    std::fs::create_dir_all(&ours_dir).expect("mkdir");
    std::fs::create_dir_all(&bind_dir).expect("mkdir");
    let key = key();
    let bind_port = free_port();
    let ours = Ours::start(
        &ours_dir,
        &key,
        &format!("transfer = \"signed\"\nnotify = [\"127.0.0.1:{bind_port}\"]"),
    );
    let zones = format!(
        "zone \"example.test\" {{ type secondary; file \"{}\"; primaries port {} {{ 127.0.0.1 key \"{}\"; }}; }};",
        bind_dir.join("example.test.sec").display(),
        ours.addr.port(),
        key.display_name()
    );
    let named = Named::start_on(&bind_dir, &key, &zones, bind_port);
    assert_eq!(
        dig_short(named.addr, "web.example.test.", "A"),
        vec!["10.1.0.10"]
    );

    let (ok, err) = nsupdate(
        ours.addr,
        Some(&key.spec()),
        "update delete web.example.test. A\nupdate add web.example.test. 5 A 10.2.0.10",
    );
    assert!(ok, "{err}");
    // the zone refreshes every 3600 s: only NOTIFY can make this quick
    let followed = eventually(Duration::from_secs(10), || {
        dig_short(named.addr, "web.example.test.", "A") == vec!["10.2.0.10"]
    });
    let log = std::fs::read_to_string(bind_dir.join("named.log")).unwrap_or_default();
    assert!(followed, "BIND did not pick up the change; its log:\n{log}");
    assert_eq!(serial(named.addr), 2);

    // a second change: BIND now asks for IXFR, is told NOTIMP, and falls back to AXFR
    let (ok, err) = nsupdate(
        ours.addr,
        Some(&key.spec()),
        "update add new.example.test. 5 A 10.2.0.11",
    );
    assert!(ok, "{err}");
    let followed = eventually(Duration::from_secs(10), || {
        dig_short(named.addr, "new.example.test.", "A") == vec!["10.2.0.11"]
    });
    let log = std::fs::read_to_string(bind_dir.join("named.log")).unwrap_or_default();
    assert!(
        followed,
        "BIND did not pick up the second change; its log:\n{log}"
    );
    assert_eq!(serial(named.addr), 3);
}
