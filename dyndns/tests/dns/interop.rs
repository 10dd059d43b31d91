//! Our server, driven by Debian's standard tools.

use std::process::Command;

use crate::common::*;

#[test]
fn dig_answers_queries_over_udp_and_tcp() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = key();
    let ours = Ours::start(dir.path(), &key, "");
    let a = ours.addr;
    assert_eq!(dig_short(a, "web.example.test.", "A"), vec!["10.1.0.10"]);
    assert_eq!(
        dig_short(a, "web.example.test.", "AAAA"),
        vec!["fd00:1::10"]
    );
    assert_eq!(
        dig_short(a, "example.test.", "NS"),
        vec!["ns1.example.test."]
    );
    assert_eq!(serial(a), 1);
    assert_eq!(
        dig(a, &["web.example.test.", "A", "+tcp", "+short"]).trim(),
        "10.1.0.10"
    );
    assert_eq!(dig_status(a, "nope.example.test.", "A"), "NXDOMAIN");
    // a name that exists, a type it lacks: NOERROR with no answer (NODATA), SOA in authority
    assert_eq!(dig_status(a, "web.example.test.", "MX"), "NOERROR");
    assert!(dig_short(a, "web.example.test.", "MX").is_empty());
    let full = dig(a, &["web.example.test.", "A"]);
    assert!(
        full.contains("flags: qr aa"),
        "authoritative answer expected:\n{full}"
    );
    // not our zone: refused, not answered
    assert_eq!(dig_status(a, "www.other.test.", "A"), "REFUSED");
}

#[test]
fn nsupdate_with_tsig_changes_the_zone_and_every_refusal_changes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = key();
    let spec = key.spec();
    let ours = Ours::start(dir.path(), &key, "transfer = \"signed\"");
    let a = ours.addr;

    let (ok, err) = nsupdate(
        a,
        Some(&spec),
        "update delete web.example.test. A\nupdate add web.example.test. 60 A 10.2.0.10",
    );
    assert!(ok, "nsupdate failed: {err}");
    assert_eq!(dig_short(a, "web.example.test.", "A"), vec!["10.2.0.10"]);
    assert_eq!(dig_ttl(a, "web.example.test.", "A"), Some(60));
    assert_eq!(serial(a), 2);

    // several records in one update: all visible together
    let (ok, err) = nsupdate(
        a,
        Some(&spec),
        "update add m.example.test. 30 A 10.5.0.1\nupdate add m.example.test. 30 A 10.5.0.2\nupdate add m.example.test. 30 TXT \"hello\"",
    );
    assert!(ok, "{err}");
    assert_eq!(
        dig_short(a, "m.example.test.", "A"),
        vec!["10.5.0.1", "10.5.0.2"]
    );
    assert_eq!(dig_short(a, "m.example.test.", "TXT"), vec!["\"hello\""]);
    assert_eq!(serial(a), 3);

    // refusals, each with what nsupdate reports
    let add_x = "update add x.example.test. 60 A 10.9.0.1";
    let wrong_secret = format!("hmac-sha256:mig-key:{}", other_secret());
    let unknown_key = format!("hmac-sha256:nobody:{}", other_secret());
    let cases: Vec<(Option<&str>, &str, String, &str)> = vec![
        (None, ZONE, add_x.to_string(), "REFUSED"),
        (Some(&wrong_secret), ZONE, add_x.to_string(), "BADSIG"),
        (Some(&unknown_key), ZONE, add_x.to_string(), "BADKEY"),
        (
            Some(&spec),
            "other.test.",
            "update add x.other.test. 60 A 10.9.0.1".into(),
            "NOTAUTH",
        ),
        (
            Some(&spec),
            ZONE,
            "update add x.other.test. 60 A 10.9.0.1".into(),
            "NOTZONE",
        ),
        (
            Some(&spec),
            ZONE,
            format!("prereq yxrrset web.example.test. A 10.1.0.10\n{add_x}"),
            "NXRRSET",
        ),
        (
            Some(&spec),
            ZONE,
            format!("prereq nxdomain web.example.test.\n{add_x}"),
            "YXDOMAIN",
        ),
    ];
    for (k, zone, script, want) in cases {
        let (ok, err) = nsupdate_zone(a, k, zone, &script);
        assert!(!ok, "{want}: nsupdate succeeded");
        assert!(err.contains(want), "{want} expected, nsupdate said: {err}");
    }
    assert_eq!(dig_status(a, "x.example.test.", "A"), "NXDOMAIN");
    assert_eq!(serial(a), 3, "a refused update moved the serial");

    // zone transfer: signed works, unsigned is refused
    let axfr = dig(a, &["example.test.", "AXFR", "-y", &spec]);
    assert!(
        axfr.contains("10.2.0.10") && axfr.contains("10.5.0.2"),
        "{axfr}"
    );
    let axfr = dig(a, &["example.test.", "AXFR"]);
    assert!(axfr.contains("Transfer failed"), "{axfr}");
}

/// A secret nobody configured.
fn other_secret() -> String {
    dyndns::TsigKey::generate("x").expect("key").secret_base64()
}

#[test]
fn cli_prepare_switch_finish_with_json_and_state_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = key();
    let ours = Ours::start(dir.path(), &key, "");
    let a = ours.addr;
    let state = dir.path().join("web.prepare.json");
    let bin = env!("CARGO_BIN_EXE_dyndns");
    let run = |args: &[&str]| {
        let out = Command::new(bin)
            .args(args)
            .args(["--server", &a.to_string(), "--json"])
            .env("DYNDNS_KEY", key.spec())
            .output()
            .expect("run dyndns");
        assert!(
            out.status.success(),
            "dyndns {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let line = String::from_utf8_lossy(&out.stdout).trim().to_string();
        serde_json::from_str::<serde_json::Value>(&line)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
    };

    let p = run(&[
        "prepare",
        "web.example.test",
        "--ttl",
        "5",
        "--state",
        state.to_str().expect("utf8"),
    ]);
    assert_eq!(p["original_ttl"], 300);
    assert_eq!(p["lowered_ttl"], 5);
    assert_eq!(dig_ttl(a, "web.example.test.", "A"), Some(5));
    assert_eq!(dig_ttl(a, "web.example.test.", "AAAA"), Some(5));

    let s = run(&["switch", "web.example.test", "--to", "10.2.0.10,fd00:2::10"]);
    assert_eq!(s["to"], serde_json::json!(["10.2.0.10", "fd00:2::10"]));
    assert_eq!(dig_short(a, "web.example.test.", "A"), vec!["10.2.0.10"]);
    assert_eq!(
        dig_short(a, "web.example.test.", "AAAA"),
        vec!["fd00:2::10"]
    );
    assert_eq!(dig_ttl(a, "web.example.test.", "A"), Some(5));

    run(&[
        "finish",
        "web.example.test",
        "--state",
        state.to_str().expect("utf8"),
    ]);
    assert_eq!(dig_ttl(a, "web.example.test.", "A"), Some(300));
    assert_eq!(dig_short(a, "web.example.test.", "A"), vec!["10.2.0.10"]);

    // a stale switch (expects the old address) fails clearly and changes nothing
    let out = Command::new(bin)
        .args([
            "switch",
            "web.example.test",
            "--from",
            "10.1.0.10,fd00:1::10",
            "--to",
            "10.3.0.10",
        ])
        .args(["--server", &a.to_string()])
        .env("DYNDNS_KEY", key.spec())
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another change won"), "{err}");
    assert_eq!(dig_short(a, "web.example.test.", "A"), vec!["10.2.0.10"]);

    // no key: refused before sending
    let out = Command::new(bin)
        .args([
            "switch",
            "web.example.test",
            "--to",
            "10.3.0.10",
            "--server",
            &a.to_string(),
        ])
        .env_remove("DYNDNS_KEY")
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("must be signed"));
}
