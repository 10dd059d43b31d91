//! The whole system, as the demo runs it: `migrator migrate web1 --to
//! siteB` moves the running guest across the emulated WAN while a client
//! downloads a file from it and holds an interactive session open; the
//! gateways keep both alive through the tunnel, DNS moves the name, a new
//! connection reaches the guest at its new address, the tunnel drains.

use std::io::{Read as _, Write as _};
use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tests::netns::available;
use tests::proc::ChildGuard;
use tests::sysbed::{random_file, SysBed, SysOpts, GUEST_IP, PUBLIC_C, PUBLIC_IP};
use tests::vmbed::{read_events, wait_event, wait_exit, Guest};

const MIB: usize = 1 << 20;

fn bed(file: &[u8], rate_mbit: Option<u32>, delay_ms: u64) -> SysBed {
    assert!(available(), "needs root (network namespaces)");
    SysBed::new(SysOpts {
        rate_mbit,
        delay: Duration::from_millis(delay_ms),
        guest: Guest {
            beats: 4000,
            disk_mib: 96,
            www: vec![("big.bin".into(), file.to_vec())],
            net: None,
        },
    })
    .expect("system test bed")
}

/// Runs `migrator migrate … --json`, its events into the returned list.
fn migrate(bed: &SysBed, extra: &[&str]) -> (ChildGuard, Arc<Mutex<Vec<serde_json::Value>>>) {
    let mut c = bed.migrate_command(extra);
    c.arg("--json")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut g = ChildGuard::spawn(&mut c).expect("migrator migrate");
    let out = g.0.as_mut().and_then(|c| c.stdout.take()).expect("stdout");
    let events = Arc::new(Mutex::new(Vec::new()));
    let e = events.clone();
    std::thread::spawn(move || read_events(out, &e));
    (g, events)
}

fn saw_phase(events: &Mutex<Vec<serde_json::Value>>, phase: &str) -> bool {
    events
        .lock()
        .expect("lock")
        .iter()
        .any(|e| e["event"] == "phase" && e["phase"] == phase)
}

#[test]
fn the_vm_moves_with_its_connections_and_its_name() {
    let file = Arc::new(random_file(24 * MIB, 7));
    let mut bed = bed(&file, Some(100), 25);
    let mut run = bed.vm.start_all().expect("guest and agent");
    bed.start_gateways().expect("gateways");
    assert_eq!(bed.dig().expect("dig"), GUEST_IP);

    // the client: a download paced to span the move, and an interactive session
    let clients = bed
        .start_clients(file.clone(), 600_000)
        .unwrap_or_else(|e| panic!("clients: {e}\n{}\n{}", bed.diag(), bed.logs()));
    assert!(
        clients.lines.load(Ordering::Relaxed) > 5,
        "the session works before the move"
    );

    let svg = bed.vm.path("timeline.svg");
    let (mut m, events) = migrate(
        &bed,
        &[
            "--report",
            svg.to_str().expect("path"),
            "--drain-wait-s",
            "120",
        ],
    );
    let t = Instant::now();
    while !saw_phase(&events, "drain") {
        if let Some(st) = m.0.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
            panic!(
                "migrate exited ({st}) before the drain\n{:?}\n{}",
                events.lock().expect("lock"),
                bed.logs()
            );
        }
        assert!(
            t.elapsed() < Duration::from_secs(300),
            "no network switch\n{}",
            bed.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // both client connections are still open across the move
    let d = clients.download_seen();
    assert!(
        !d.done && d.error.is_none(),
        "the download must span the move: {d:?}"
    );
    // the name points to the new site; a new connection lands there
    assert_eq!(bed.dig().expect("dig"), PUBLIC_IP);
    // (a few tries: a TCG guest on a loaded 2-core machine can be slow to answer)
    let mut fresh = (0..3)
        .find_map(|_| bed.connect(&format!("{PUBLIC_IP}:7")).ok())
        .unwrap_or_else(|| {
            panic!(
                "no new connection to the new address\ngateway B: {:?}\n{}\n{}",
                bed.gateway_status("siteB"),
                bed.diag(),
                bed.logs()
            )
        });
    fresh
        .write_all(b"hello from a new client\n")
        .expect("write");
    let mut back = [0u8; 24];
    fresh
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    fresh
        .read_exact(&mut back)
        .expect("echo through the new address");
    assert_eq!(&back, b"hello from a new client\n");
    drop(fresh);

    // the old connections carried on through the tunnel: the download ends
    // whole, then the session closes, and the old site drains
    let d = clients
        .settle_download(Duration::from_secs(30))
        .expect("download");
    let s = clients.stop_session();
    eprintln!(
        "download: {d:?}\nsession: {s:?} ({} lines)",
        clients.lines.load(Ordering::Relaxed)
    );
    assert!(
        d.done && d.error.is_none(),
        "download: {d:?}\n{}",
        bed.logs()
    );
    assert!(
        d.bytes as usize > file.len(),
        "every byte of the file arrived"
    );
    assert!(
        s.done && s.error.is_none(),
        "session: {s:?}\n{}",
        bed.logs()
    );

    let st = wait_exit(&mut m, Duration::from_secs(180)).expect("migrate exits");
    let report =
        wait_event(&events, "report", Duration::from_secs(30)).map(|e| e["report"].clone());
    let ev = events.lock().expect("lock").clone();
    assert!(st.success(), "migrate failed: {ev:?}\n{}", bed.logs());
    let report = report.expect("a report");
    for e in ev.iter().filter(|e| e["event"] == "note") {
        eprintln!("note: {}", e["message"]);
    }
    eprintln!("report: {report}");
    assert!(
        report["drained_after_s"].as_f64().is_some(),
        "{report}\ngateway A: {:?}\ngateway B: {:?}\n{}",
        bed.gateway_status("siteA"),
        bed.gateway_status("siteB"),
        bed.logs()
    );
    assert!(
        report["tunnelled_flows"].as_u64().unwrap_or(0) >= 1,
        "{report}"
    );
    let gw_a = bed.gateway_status("siteA").expect("gateway A");
    assert_eq!(gw_a["migrations"][0]["phase"], "drained", "{gw_a}");
    let svg_text = std::fs::read_to_string(&svg).expect("timeline");
    assert!(svg_text.contains("<svg") && svg_text.contains("memory"));

    // the VM: moved, running on from where it stopped, its disk whole
    assert!(wait_exit(&mut run.src, Duration::from_secs(30))
        .expect("source QEMU exits")
        .success());
    let gap = bed.vm.continuity().expect("continuity");
    eprintln!(
        "guest-visible pause: {gap:?}; client stalls: download {:?}, session {:?}",
        d.stall, s.stall
    );
    assert!(gap < Duration::from_secs(5), "{gap:?}");
    bed.vm
        .check_disk_after_halt(&bed.vm.agent_dir.join("root.img"))
        .expect("the destination's disk");
}

/// Before the commit point nothing changes for good: a wrong gateway token,
/// a wrong transport key, an unreachable gateway and a destination agent
/// killed in the middle of the bulk copy each leave the VM serving at site A
/// with its old DNS answer (TTL included) and no route switched.
#[test]
fn refused_or_failed_migrations_leave_everything_as_it_was() {
    let file = Arc::new(random_file(24 * MIB, 9));
    let mut bed = bed(&file, Some(50), 0);
    let mut run = bed.vm.start_all().expect("guest and agent");
    bed.start_gateways().expect("gateways");
    let before = bed.dig_record().expect("dig");
    assert_eq!(before, (300, GUEST_IP.to_string()));

    let unchanged = |bed: &SysBed, what: &str| {
        assert_eq!(
            bed.dig_record().expect("dig"),
            before,
            "{what}: the DNS answer changed"
        );
        let beat = bed.vm.last_beat("src");
        bed.vm
            .wait_beats("src", beat + 5, Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("{what}: the guest stopped at site A: {e}"));
        assert!(
            !bed.vm.path("root.img.moved").exists(),
            "{what}: the source disk moved"
        );
        for site in ["siteA", "siteB"] {
            let st = bed.gateway_status(site).expect("gateway status");
            let switched = st["migrations"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|m| m["phase"] != "prepared");
            assert!(!switched, "{what}: {site} switched: {st}");
        }
        // the guest still serves at its old address
        let mut c = bed.connect(&format!("{GUEST_IP}:7")).expect("connect");
        c.write_all(b"still here\n").expect("write");
        let mut b = [0u8; 11];
        c.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        c.read_exact(&mut b).expect("echo");
        assert_eq!(&b, b"still here\n");
    };
    let refused = |config: &std::path::Path| {
        let out = bed
            .migrate_command_with(config, &["--drain-wait-s", "0"])
            .output()
            .expect("migrate");
        assert!(!out.status.success(), "the migration must fail");
        String::from_utf8_lossy(&out.stderr).to_string()
    };

    // a wrong token for gateway B: refused before anything changes
    let c = bed
        .config_variant(
            "bad-token.toml",
            "token = \"bed-token",
            "token = \"wrong-token",
        )
        .expect("config");
    let err = refused(&c);
    assert!(err.contains("401") || err.contains("token"), "{err}");
    unchanged(&bed, "wrong gateway token");

    // a wrong key for the destination agent: the TLS handshake fails
    let fp = bed.vm.keys.dst_fp.clone();
    let other = bed.vm.keys.src_fp.clone();
    let c = bed
        .config_variant("bad-key.toml", &fp, &other)
        .expect("config");
    let err = refused(&c);
    assert!(err.contains("TLS") || err.contains("handshake"), "{err}");
    unchanged(&bed, "wrong transport key");

    // gateway B unreachable at prepare
    let c = bed
        .config_variant("no-gateway.toml", "203.0.113.2:7300", "203.0.113.2:7399")
        .expect("config");
    let err = refused(&c);
    assert!(err.contains("cannot reach gateway"), "{err}");
    unchanged(&bed, "unreachable gateway");

    // the destination agent dies in the middle of the bulk copy
    let (mut m, events) = migrate(&bed, &["--drain-wait-s", "0"]);
    let t = Instant::now();
    while !saw_phase(&events, "bulk") {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "no bulk copy: {:?}",
            events.lock().expect("lock")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(500));
    run.agent.kill();
    let st = wait_exit(&mut m, Duration::from_secs(60)).expect("migrate exits");
    assert!(!st.success(), "the migration must fail");
    unchanged(&bed, "agent killed mid-bulk");
}

/// `migrator migrate` over nodes, round a ring of three sites: the guest
/// goes A→B→C→A (each time the command finds it where it runs now), with a
/// download and an echo session opened before the first move, after the
/// first and after the second, all of which stay alive to the end, every
/// byte checked; DNS follows each move; every old site forwards straight to
/// where the guest runs (never through another) and drains once its
/// connections end; the guest's log is whole and its disk clean at home.
#[test]
fn ring_the_guest_moves_a_b_c_a_with_every_connection_its_name_and_its_disk() {
    assert!(available(), "needs root (network namespaces)");
    // each download lasts about 30 s (the first spans all three moves)
    let file = Arc::new(random_file(3 * MIB / 2, 11));
    let mut bed = SysBed::ring(SysOpts {
        rate_mbit: Some(100),
        delay: Duration::from_millis(10),
        guest: Guest {
            // it halts about 90 s after booting: the moves and the
            // connections are over by then
            beats: 4500,
            disk_mib: 64,
            www: vec![("big.bin".into(), file.to_vec())],
            net: None,
        },
    })
    .expect("ring test bed");
    bed.start_gateways().expect("gateways");
    let _nodes = bed.start_nodes().expect("nodes");
    bed.vm
        .wait_beats("A", 20, Duration::from_secs(180))
        .unwrap_or_else(|e| panic!("node siteA boots the guest: {e:#}\n{}", bed.logs()));
    let open = |addr: &str| {
        // (a few tries: a TCG guest can be slow to answer its first)
        let mut last = None;
        for _ in 0..20 {
            match bed.start_clients_at(addr, file.clone(), 48_000) {
                Ok(c) => return c,
                Err(e) => last = Some(e),
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        panic!("no connection to {addr}: {last:?}\n{}", bed.logs())
    };
    let forwards_to = |site: &str| {
        let st = bed.gateway_status(site).expect("gateway status");
        let m = &st["migrations"][0];
        assert_eq!(m["role"]["role"], "old", "{site}: {st}");
        m["role"]["peer"].as_str().unwrap_or_default().to_string()
    };
    let serves = |site: &str| {
        let st = bed.gateway_status(site).expect("gateway status");
        assert_eq!(st["migrations"][0]["role"]["role"], "new", "{site}: {st}");
    };
    let mut clients = vec![open(GUEST_IP)];
    let progress = |clients: &[tests::sysbed::Clients], what: &str| {
        let before: Vec<u64> = clients
            .iter()
            .map(|c| c.lines.load(Ordering::Relaxed))
            .collect();
        let t = Instant::now();
        while clients
            .iter()
            .zip(&before)
            .any(|(c, b)| c.lines.load(Ordering::Relaxed) < b + 5)
        {
            for c in clients {
                let s = c.session_seen();
                assert!(s.error.is_none(), "{what}: session {s:?}\n{}", bed.logs());
                let d = c.download_seen();
                assert!(d.error.is_none(), "{what}: download {d:?}\n{}", bed.logs());
            }
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "{what}: the sessions stalled\n{}\n{}",
                bed.diag(),
                bed.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    progress(&clients, "before the first move");
    let t0 = Instant::now();

    for (to, address, new) in [
        ("siteB", PUBLIC_IP, true),
        ("siteC", PUBLIC_C, true),
        ("siteA", GUEST_IP, false),
    ] {
        if to == "siteB" {
            // as if a `migrator migrate` had stopped right after the move:
            // the nodes moved the guest, the network stayed behind
            let out = std::process::Command::new(tests::bed::workspace_bin("migrator"))
                .args([
                    "node", "migrate", "web1", "--to", "siteB", "--json", "--node",
                ])
                .arg(bed.vm.path("siteA.ctl"))
                .output()
                .expect("migrator node migrate");
            assert!(
                out.status.success(),
                "{}\n{}",
                String::from_utf8_lossy(&out.stderr),
                bed.logs()
            );
        }
        // (to siteB: the command finds it there already, and only the
        // network switch is left)
        let events = bed
            .ring_migrate(to)
            .unwrap_or_else(|e| panic!("to {to}: {e:#}\n{}", bed.logs()));
        if to == "siteB" {
            assert!(
                events.iter().any(|e| e["event"] == "note"
                    && e["message"]
                        .as_str()
                        .is_some_and(|m| m.contains("switching it now"))),
                "{events:?}"
            );
        }
        let report = events
            .iter()
            .find(|e| e["event"] == "report")
            .unwrap_or_else(|| panic!("to {to}: no report in {events:?}"));
        eprintln!(
            "moved to {to} at {:.1} s (beat {}): {}",
            t0.elapsed().as_secs_f64(),
            bed.vm
                .last_beat(["A", "B", "C"][usize::from(to.as_bytes()[4] - b'A')]),
            report["report"]
        );
        progress(&clients, &format!("after the move to {to}"));
        assert_eq!(
            bed.dig().expect("dig"),
            address,
            "the name after the move to {to}"
        );
        serves(to);
        // every other site forwards straight to where it runs now
        for site in ["siteA", "siteB", "siteC"].into_iter().filter(|s| *s != to) {
            if site == "siteC" && to == "siteB" {
                continue; // it never ran there yet
            }
            assert_eq!(forwards_to(site), to, "{site} after the move to {to}");
        }
        if new {
            clients.push(open(address));
        } else {
            // at home, a new connection to its own address
            let mut c = bed
                .connect(&format!("{GUEST_IP}:7"))
                .expect("connect at home");
            c.set_read_timeout(Some(Duration::from_secs(10)))
                .expect("timeout");
            c.write_all(b"home again\n").expect("write");
            let mut back = [0u8; 11];
            c.read_exact(&mut back).expect("echo at home");
            assert_eq!(&back, b"home again\n");
        }
        progress(&clients, &format!("the connections after the move to {to}"));
    }

    // now that nodes and gateways agree, a move to where it runs is refused
    let again = bed.ring_migrate("siteA").expect_err("it runs there");
    assert!(
        format!("{again:#}").contains("already runs at siteA"),
        "{again:#}"
    );
    // where it runs is what the nodes hold: `migrator status` from any
    // shell lists every site's node
    let out = std::process::Command::new(tests::bed::workspace_bin("migrator"))
        .args(["status", "web1", "--json", "--config"])
        .arg(&bed.config)
        .output()
        .expect("migrator status");
    let all: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    let states: Vec<(String, String)> = all
        .iter()
        .map(|n| {
            let st = n["vms"][0]["state"].as_str().unwrap_or("none").to_string();
            (n["node"].as_str().unwrap_or("?").to_string(), st)
        })
        .collect();
    assert_eq!(
        states,
        [
            ("siteA".to_string(), "complete".to_string()),
            ("siteB".into(), "moved".into()),
            ("siteC".into(), "moved".into())
        ],
        "{all:?}"
    );

    // every download ends whole; every session closes cleanly
    for (i, c) in clients.iter().enumerate() {
        let d = c
            .settle_download(Duration::from_secs(60))
            .expect("download");
        assert!(
            d.done && d.error.is_none() && d.bytes as usize > file.len(),
            "download {i}: {d:?}\n{}",
            bed.logs()
        );
        let s = c.stop_session();
        assert!(
            s.done && s.error.is_none(),
            "session {i}: {s:?}\n{}",
            bed.logs()
        );
    }
    // B and C drain once their connections ended
    for site in ["siteB", "siteC"] {
        let t = Instant::now();
        loop {
            let st = bed.gateway_status(site).expect("gateway status");
            if st["migrations"][0]["phase"] == "drained" {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "{site} never drained: {st}"
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
    // the guest halts at home: its log whole, its filesystem clean
    eprintln!(
        "connections closed at {:.1} s (beat {})",
        t0.elapsed().as_secs_f64(),
        bed.vm.last_beat("A")
    );
    bed.vm
        .wait_line("A", "guest halted", Duration::from_secs(400))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", bed.logs()));
    std::thread::sleep(Duration::from_millis(500));
    let image = bed.vm.path("node-siteA").join("web1.img");
    let lines = tests::guest::check_writer_log(&image).expect("writer's log");
    assert!(lines > 100, "only {lines} log lines");
    tests::guest::fsck_clean(&image).expect("fsck");
}
