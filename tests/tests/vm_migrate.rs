//! Groundwork for the VM migration issue: a running guest moves from one
//! QEMU to another (two namespaces), driven by our QMP client with
//! `pause-before-switchover`, its memory over QEMU's own stream for now and
//! its disk file shared. The guest keeps running: its heartbeat continues
//! from the destination process, the source QEMU is gone, and the writer's
//! log has no gap and no duplicate, and the disk checks clean after the
//! guest shuts down at the destination.

use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use migrator::qmp::Qmp;
use tests::guest;
use tests::netns::{available, in_netns, unique, veth, Netns};
use tests::proc::ChildGuard;

/// Console lines, when they came, and from which QEMU.
type Console = Arc<Mutex<Vec<(Instant, &'static str, String)>>>;

/// Starts QEMU in `ns`, console lines into `console` (prefixed with `tag`).
fn qemu(
    ns: &Netns,
    k: &guest::GuestKernel,
    disk: &Path,
    qmp: &Path,
    extra: &[&str],
    tag: &'static str,
    console: Console,
) -> ChildGuard {
    let plain = guest::qemu_command(k, disk, "guest_beats=1000");
    let mut cmd = ns.command("qemu-system-x86_64");
    // the disk file is shared by both ends here: no image locking
    let args: Vec<String> = plain
        .get_args()
        .map(|a| {
            a.to_string_lossy()
                .replace(",format=raw", ",format=raw,file.locking=off")
        })
        .collect();
    cmd.args(&args)
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .stdin(Stdio::null());
    let mut child = ChildGuard::spawn(&mut cmd).expect("qemu");
    let out = child
        .0
        .as_mut()
        .and_then(|c| c.stdout.take())
        .expect("console");
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            console
                .lock()
                .expect("lock")
                .push((Instant::now(), tag, line));
        }
    });
    child
}

async fn connect(path: &Path) -> Qmp {
    let t = Instant::now();
    loop {
        match Qmp::connect(path).await {
            Ok(q) => return q,
            Err(e) if t.elapsed() < Duration::from_secs(20) => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("cannot connect to {}: {e}", path.display()),
        }
    }
}

/// The guest's kernel, a fresh root disk, and two namespaces joined by a
/// veth (192.0.2.1 ↔ 192.0.2.2) for the two QEMUs.
struct Bed {
    k: guest::GuestKernel,
    dir: tempfile::TempDir,
    disk: std::path::PathBuf,
    a: Netns,
    b: Netns,
}

fn bed() -> Bed {
    assert!(available(), "needs root (network namespaces)");
    let k = guest::kernel(&guest::cache_dir()).expect("guest kernel");
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = dir.path().join("root.img");
    guest::rootfs(&disk, 64, &[]).expect("rootfs");
    let (a, b) = (
        Netns::new(unique("qa")).expect("ns"),
        Netns::new(unique("qb")).expect("ns"),
    );
    veth(&a, "192.0.2.1/24", &b, "192.0.2.2/24").expect("veth");
    Bed { k, dir, disk, a, b }
}

/// Waits until the guest has printed more than `n` heartbeats.
async fn wait_beats(console: &Console, n: u64) {
    let t = Instant::now();
    while !console
        .lock()
        .expect("lock")
        .iter()
        .any(|(_, _, l)| beat(l).is_some_and(|b| b > n))
    {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the guest did not start"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits for the MIGRATION event with `status`; a failure is a panic.
async fn wait_migration(
    events: &mut tokio::sync::broadcast::Receiver<migrator::qmp::Event>,
    status: &str,
) {
    loop {
        let e = Qmp::wait_event(events, "MIGRATION", Duration::from_secs(120))
            .await
            .expect("migration events");
        match e.data["status"].as_str() {
            Some(s) if s == status => return,
            Some("failed") | Some("cancelled") => panic!("migration {}", e.data),
            _ => {}
        }
    }
}

/// From the paused pre-switchover state to completed.
async fn switch_over(
    src: &Qmp,
    events: &mut tokio::sync::broadcast::Receiver<migrator::qmp::Event>,
) {
    wait_migration(events, "pre-switchover").await;
    // (here the disk's final set will go)
    src.execute_timeout(
        "migrate-continue",
        Some(serde_json::json!({"state": "pre-switchover"})),
        Duration::from_secs(30),
    )
    .await
    .expect("migrate-continue");
    wait_migration(events, "completed").await;
}

fn beat(line: &str) -> Option<u64> {
    line.rsplit_once("heartbeat ")
        .and_then(|(_, n)| n.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_guest_moves_to_another_qemu_and_keeps_running() {
    migrate_guest(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memory_stream_travels_inside_our_authenticated_link() {
    migrate_guest(true).await;
}

/// Sets up our pinned-key TLS link between the namespaces and a relay at
/// each end: QEMU at the source migrates to `src_sock`; the destination
/// relay feeds the destination QEMU listening on `dst_sock`.
async fn link_relays(
    a: &Netns,
    b: &Netns,
    src_sock: &Path,
    dst_sock: &Path,
) -> (
    tokio::task::JoinHandle<Result<migrator::memrelay::RelayStats, String>>,
    tokio::task::JoinHandle<Result<migrator::memrelay::RelayStats, String>>,
) {
    use migrator::transport::tls;
    let (ida, idb) = (
        tls::Identity::generate().expect("key"),
        tls::Identity::generate().expect("key"),
    );
    let server = tls::server_config(&idb, vec![ida.fingerprint()]).expect("server config");
    let client = tls::client_config(&ida, vec![idb.fingerprint()]).expect("client config");
    let listener = in_netns(&b.name, || std::net::TcpListener::bind("192.0.2.2:0"))
        .expect("netns")
        .expect("bind");
    let at = listener.local_addr().expect("addr");
    listener.set_nonblocking(true).expect("nonblocking");
    let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
    let dst_sock = dst_sock.to_path_buf();
    let dst = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.expect("accept");
        let tls = tokio_rustls::TlsAcceptor::from(server)
            .accept(tcp)
            .await
            .expect("TLS accept");
        let qemu = tokio::net::UnixStream::connect(&dst_sock)
            .await
            .expect("destination QEMU's incoming socket");
        migrator::memrelay::relay(qemu, tls, true)
            .await
            .map_err(|e| e.to_string())
    });
    let unix = tokio::net::UnixListener::bind(src_sock).expect("source socket");
    let a_name = a.name.clone();
    let src = tokio::spawn(async move {
        let tcp = in_netns(&a_name, move || std::net::TcpStream::connect(at))
            .expect("netns")
            .expect("connect");
        tcp.set_nonblocking(true).expect("nonblocking");
        let tcp = tokio::net::TcpStream::from_std(tcp).expect("tcp");
        let tls = tokio_rustls::TlsConnector::from(client)
            .connect(tls::server_name(), tcp)
            .await
            .expect("TLS connect");
        let (qemu, _) = unix.accept().await.expect("source QEMU connects");
        migrator::memrelay::relay(qemu, tls, true)
            .await
            .map_err(|e| e.to_string())
    });
    (src, dst)
}

async fn migrate_guest(via_link: bool) {
    let Bed { k, dir, disk, a, b } = bed();
    let console = Arc::new(Mutex::new(Vec::new()));
    let (qa, qb) = (dir.path().join("a.qmp"), dir.path().join("b.qmp"));

    let mut src = qemu(&a, &k, &disk, &qa, &[], "src", console.clone());
    let src_qmp = connect(&qa).await;
    // wait until the guest runs its loops
    wait_beats(&console, 20).await;

    let _dst = qemu(
        &b,
        &k,
        &disk,
        &qb,
        &["-incoming", "defer"],
        "dst",
        console.clone(),
    );
    let dst_qmp = connect(&qb).await;
    let to = Duration::from_secs(30);
    for q in [&src_qmp, &dst_qmp] {
        q.execute_timeout(
            "migrate-set-capabilities",
            Some(serde_json::json!({"capabilities": [
                {"capability": "pause-before-switchover", "state": true},
                {"capability": "events", "state": true}
            ]})),
            to,
        )
        .await
        .expect("capabilities");
    }
    let (src_sock, dst_sock) = (
        dir.path().join("src-mig.sock"),
        dir.path().join("dst-mig.sock"),
    );
    let (in_uri, out_uri) = if via_link {
        (
            format!("unix:{}", dst_sock.display()),
            format!("unix:{}", src_sock.display()),
        )
    } else {
        (
            "tcp:192.0.2.2:4444".to_string(),
            "tcp:192.0.2.2:4444".to_string(),
        )
    };
    dst_qmp
        .execute_timeout(
            "migrate-incoming",
            Some(serde_json::json!({ "uri": in_uri })),
            to,
        )
        .await
        .expect("migrate-incoming");
    let relays = if via_link {
        Some(link_relays(&a, &b, &src_sock, &dst_sock).await)
    } else {
        None
    };
    src_qmp
        .execute_timeout(
            "migrate-set-parameters",
            Some(serde_json::json!({"downtime-limit": 300})),
            to,
        )
        .await
        .expect("parameters");
    let mut events = src_qmp.events();
    src_qmp
        .execute_timeout("migrate", Some(serde_json::json!({ "uri": out_uri })), to)
        .await
        .expect("migrate");
    // QEMU pauses before the switchover, then completes
    switch_over(&src_qmp, &mut events).await;
    let info = src_qmp
        .execute_timeout("query-migrate", None, to)
        .await
        .expect("query-migrate");
    let _ = src_qmp.execute_timeout("quit", None, to).await;
    if let Some((s, d)) = relays {
        let (s, d) = (
            s.await.expect("join").expect("source relay"),
            d.await.expect("join").expect("destination relay"),
        );
        // every byte QEMU sent went through our link
        assert_eq!(s.sent, d.received, "memory stream bytes lost in the relay");
        assert!(
            s.sent >= info["ram"]["transferred"].as_u64().unwrap_or(0) / 2,
            "{s:?} vs {info}"
        );
        eprintln!(
            "relayed: {} stream bytes as {} link bytes",
            s.sent, s.wire_sent
        );
    }
    let _ = src.0.as_mut().map(|c| c.wait());

    // the guest goes on at the destination
    let t = Instant::now();
    let last_beat = |tag: &str| {
        console
            .lock()
            .expect("lock")
            .iter()
            .filter(|(_, t, _)| *t == tag)
            .filter_map(|(_, _, l)| beat(l))
            .max()
            .unwrap_or(0)
    };
    let last_src = loop {
        let (last_src, dst_beats) = (last_beat("src"), last_beat("dst"));
        if dst_beats > last_src + 50 {
            break last_src;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "no heartbeat from the destination"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // the first heartbeat printed by the destination follows the last one
    // of the source: nothing replayed, nothing skipped
    let c = console.lock().expect("lock").clone();
    let first_dst = c
        .iter()
        .filter(|(_, tag, _)| *tag == "dst")
        .find_map(|(_, _, l)| beat(l))
        .expect("dst beats");
    assert!(
        first_dst <= last_src + 1 && first_dst + 1 >= last_src,
        "src ended at {last_src}, dst began at {first_dst}"
    );
    // guest-visible pause: the largest gap between consecutive heartbeats
    let beats: Vec<(Instant, u64)> = c
        .iter()
        .filter_map(|(t, _, l)| beat(l).map(|n| (*t, n)))
        .collect();
    let gap = beats
        .windows(2)
        .map(|w| w[1].0.duration_since(w[0].0))
        .max()
        .unwrap_or_default();
    eprintln!(
        "migrated: downtime (QEMU) {} ms, total {} ms, RAM transferred {} bytes; largest heartbeat gap {:?}",
        info["downtime"], info["total-time"], info["ram"]["transferred"], gap
    );
    assert!(gap < Duration::from_secs(5), "the guest paused {gap:?}");

    // the guest shuts itself down after its last heartbeat, at the destination
    let t = Instant::now();
    while !console
        .lock()
        .expect("lock")
        .iter()
        .any(|(_, tag, l)| *tag == "dst" && l.ends_with("guest halted"))
    {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "the guest did not halt"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // the writer's log: consecutive from 1, across the move; a clean disk
    let lines = guest::check_writer_log(&disk).expect("writer log");
    assert!(lines > 100, "only {lines} log lines");
    guest::fsck_clean(&disk).expect("e2fsck");
}

/// The failure case: the destination end dies in the middle of the
/// memory phase. The source VM keeps running, never paused, and a second
/// migration completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_destination_mid_memory_leaves_the_source_running() {
    let Bed { k, dir, disk, a, b } = bed();
    let console: Console = Arc::new(Mutex::new(Vec::new()));
    let qa = dir.path().join("a.qmp");
    let _src = qemu(&a, &k, &disk, &qa, &[], "src", console.clone());
    let src_qmp = connect(&qa).await;
    wait_beats(&console, 20).await;
    let to = Duration::from_secs(30);
    let caps = serde_json::json!({"capabilities": [
        {"capability": "pause-before-switchover", "state": true},
        {"capability": "events", "state": true}
    ]});
    src_qmp
        .execute_timeout("migrate-set-capabilities", Some(caps.clone()), to)
        .await
        .expect("capabilities");
    // slow enough that the memory phase lasts a few seconds
    src_qmp
        .execute_timeout(
            "migrate-set-parameters",
            Some(serde_json::json!({"max-bandwidth": 16_000_000})),
            to,
        )
        .await
        .expect("parameters");

    for attempt in 0..2 {
        let qb = dir.path().join(format!("b{attempt}.qmp"));
        let _dst = qemu(
            &b,
            &k,
            &disk,
            &qb,
            &["-incoming", "defer"],
            "dst",
            console.clone(),
        );
        let dst_qmp = connect(&qb).await;
        dst_qmp
            .execute_timeout("migrate-set-capabilities", Some(caps.clone()), to)
            .await
            .expect("capabilities");
        let src_sock = dir.path().join(format!("src{attempt}.sock"));
        let dst_sock = dir.path().join(format!("dst{attempt}.sock"));
        dst_qmp
            .execute_timeout(
                "migrate-incoming",
                Some(serde_json::json!({"uri": format!("unix:{}", dst_sock.display())})),
                to,
            )
            .await
            .expect("migrate-incoming");
        let (src_relay, dst_relay) = link_relays(&a, &b, &src_sock, &dst_sock).await;
        let mut events = src_qmp.events();
        src_qmp
            .execute_timeout(
                "migrate",
                Some(serde_json::json!({"uri": format!("unix:{}", src_sock.display())})),
                to,
            )
            .await
            .expect("migrate");
        if attempt == 0 {
            // the destination end dies during the memory phase
            tokio::time::sleep(Duration::from_secs(1)).await;
            let info = src_qmp
                .execute_timeout("query-migrate", None, to)
                .await
                .expect("query");
            assert_eq!(
                info["status"], "active",
                "still in the memory phase: {info}"
            );
            dst_relay.abort();
            drop(dst_qmp);
            loop {
                let e = Qmp::wait_event(&mut events, "MIGRATION", Duration::from_secs(60))
                    .await
                    .expect("events");
                match e.data["status"].as_str() {
                    Some("failed") | Some("cancelled") => break,
                    Some("completed") | Some("pre-switchover") => {
                        panic!("the migration went on: {}", e.data)
                    }
                    _ => {}
                }
            }
            let _ = src_relay.await;
            let status = src_qmp
                .execute_timeout("query-status", None, to)
                .await
                .expect("status");
            assert_eq!(
                status["status"], "running",
                "the source must keep running: {status}"
            );
            // and the guest really runs: heartbeats still come from the source
            let before = console.lock().expect("lock").len();
            let t = Instant::now();
            loop {
                let newer = console.lock().expect("lock")[before..]
                    .iter()
                    .any(|(_, tag, l)| *tag == "src" && beat(l).is_some());
                if newer {
                    break;
                }
                assert!(
                    t.elapsed() < Duration::from_secs(10),
                    "no heartbeat from the source after the failure"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            continue;
        }
        // the second attempt completes
        src_qmp
            .execute_timeout(
                "migrate-set-parameters",
                Some(serde_json::json!({"max-bandwidth": 1_000_000_000})),
                to,
            )
            .await
            .expect("parameters");
        switch_over(&src_qmp, &mut events).await;
        // the destination finishes loading, then runs
        let t = Instant::now();
        loop {
            let status = dst_qmp
                .execute_timeout("query-status", None, to)
                .await
                .expect("status");
            if status["status"] == "running" {
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(20), "{status}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let _ = src_relay.await;
        let _ = dst_relay.await;
    }
}
