//! Disk migration over loopback TLS: integrity under a concurrent writer, kill -9
//! of the destination and resume, key pinning, rollback, and the CLI path.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use migrator::events::EventSink;
use migrator::nbd::client::ClientError;
use migrator::precopy;
use migrator::source::{self, MigrateError, MigrateOptions};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::Mutex;

use crate::common::*;

fn opts(k: &Keys, to: &str, max_rate: Option<u64>) -> MigrateOptions {
    MigrateOptions {
        to: to.to_string(),
        identity: k.src.clone(),
        peers: vec![k.dst.fingerprint()],
        precopy: precopy::Config::default(),
        compress: true,
        max_rate,
        live: Default::default(),
        ledger: None,
        vm: None,
        qmp_connection: None,
        reconnect_for: Duration::from_secs(5),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_acknowledged_write_is_lost_across_migration_many_seeds() {
    integrity(0..6, precopy::Mode::Dirty).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_acknowledged_write_is_lost_in_deltas_mode() {
    integrity(100..104, precopy::Mode::Deltas).await;
}

async fn integrity(seeds: std::ops::Range<u64>, mode: precopy::Mode) {
    for seed in seeds {
        let dir = tempfile::tempdir().expect("tmp");
        let src = dir.path().join("vm.img");
        let mut rng = StdRng::seed_from_u64(seed);
        let regions: Vec<(u64, u64)> = (0..6)
            .map(|i| (i * 2 * MIB + rng.gen_range(0..MIB), rng.gen_range(1..MIB)))
            .collect();
        let model = Arc::new(Mutex::new(make_image(&src, 16 * MIB, &regions, seed)));
        let served = serve(&src, "vm", dir.path().join("vm.sock")).await;
        let k = keys();
        let dst_dir = dir.path().join("dst");
        std::fs::create_dir_all(&dst_dir).expect("mkdir");
        let a = agent(&dst_dir, k.dst.clone(), vec![k.src.fingerprint()]).await;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let before = hash(&model.lock().await);
        let w = tokio::spawn(writer(
            served.sock.clone(),
            model.clone(),
            seed,
            stop.clone(),
        ));
        // the move starts once the writer is writing (a loaded machine may
        // take a while to get its first write through)
        let t = std::time::Instant::now();
        while hash(&model.lock().await) == before && t.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut o = opts(&k, &a.addr, Some(20 * MIB));
        o.precopy.mode = mode;
        let summary = source::migrate(served.disk.clone(), o, EventSink::none())
            .await
            .unwrap_or_else(|e| panic!("seed {seed}: migrate failed: {e}"));
        let acked = w.await.expect("writer");
        assert!(
            acked > 0,
            "seed {seed}: writer must have run during the migration ({acked} writes)"
        );
        assert!(
            summary.writes > 0,
            "seed {seed}: the migration saw no writes"
        );
        if mode == precopy::Mode::Deltas {
            assert!(
                summary.deltas > 0 && summary.rounds == 0,
                "seed {seed}: {summary:?}"
            );
        }
        let want = hash(&model.lock().await);
        let dest = read_all(&a.agent.socket_path("vm")).await;
        assert_eq!(
            hash(&dest),
            want,
            "seed {seed}: destination differs from the writer's view; {summary:?}"
        );
        assert_eq!(
            hash(&std::fs::read(a.agent.image_path("vm")).expect("img")),
            want,
            "seed {seed}"
        );
        // The source refuses writes after the commit point.
        let mut c = client(&served.sock).await;
        assert!(matches!(
            c.write(0, &[1], false).await,
            Err(ClientError::Server { code: 1, .. })
        ));
    }
}

fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}

struct AgentProc {
    child: tests_guard::Child,
    addr: String,
}

mod tests_guard {
    /// Kills the child on drop.
    pub struct Child(pub std::process::Child);
    impl Drop for Child {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn spawn_agent(dir: &Path, keydir: &Path, peer: &str) -> AgentProc {
    let mut child = Command::new(env!("CARGO_BIN_EXE_migrator"))
        .args(["receive", "--listen", "127.0.0.1:0", "--dir"])
        .arg(dir)
        .arg("--identity")
        .arg(keydir)
        .args(["--peer", peer])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn migrator receive");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read addr");
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .expect("address line")
        .to_string();
    AgentProc {
        child: tests_guard::Child(child),
        addr,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_of_destination_halfway_leaves_source_intact_and_rerun_resumes() {
    let dir = tempfile::tempdir().expect("tmp");
    let src = dir.path().join("disk1.img");
    let model = Arc::new(Mutex::new(make_image(&src, 32 * MIB, &[(0, 24 * MIB)], 11)));
    let served = serve(&src, "disk1", dir.path().join("s.sock")).await;
    let k = keys();
    let (ks, kd) = (dir.path().join("ks"), dir.path().join("kd"));
    k.src.save(&ks).expect("save");
    k.dst.save(&kd).expect("save");
    let dst_dir = dir.path().join("dst");
    std::fs::create_dir_all(&dst_dir).expect("mkdir");
    let mut a = spawn_agent(&dst_dir, &kd, &k.src.fingerprint_hex());
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let w = tokio::spawn(writer(served.sock.clone(), model.clone(), 11, stop.clone()));
    // 24 MiB of random data at 8 MiB/s: kill the destination once a quarter landed.
    let m = tokio::spawn(source::migrate(
        served.disk.clone(),
        opts(&k, &a.addr, Some(8 * MIB)),
        EventSink::none(),
    ));
    let img = dst_dir.join("disk1.img");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while allocated(&img) < 6 * MIB {
        assert!(
            std::time::Instant::now() < deadline,
            "destination never received data"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let partial = allocated(&img);
    a.child.0.kill().expect("kill -9");
    let err = m
        .await
        .expect("join")
        .expect_err("migration must fail when the destination dies");
    assert!(!matches!(err, MigrateError::AfterCommit(_)), "{err}");
    // The source still serves, writes included, and holds every acked write.
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let acked = w.await.expect("writer");
    assert!(acked > 0);
    let mut c = client(&served.sock).await;
    c.write(5 * MIB, &[0x5a; 4096], true)
        .await
        .expect("source accepts writes after the failed migration");
    model.lock().await[5 * MIB as usize..5 * MIB as usize + 4096].fill(0x5a);
    assert_eq!(
        hash(&read_all(&served.sock).await),
        hash(&model.lock().await)
    );

    // Re-run against a restarted agent: it resumes from the partial copy.
    let a2 = spawn_agent(&dst_dir, &kd, &k.src.fingerprint_hex());
    let summary = source::migrate(
        served.disk.clone(),
        opts(&k, &a2.addr, None),
        EventSink::none(),
    )
    .await
    .expect("second migration");
    assert!(
        summary.resumed_bytes >= partial / 2,
        "resumed only {} of {partial} bytes: {summary:?}",
        summary.resumed_bytes
    );
    assert!(summary.data_bytes + summary.resumed_bytes >= 24 * MIB);
    assert!(
        summary.data_bytes < 24 * MIB,
        "a resume must not resend everything: {summary:?}"
    );
    let dest = read_all(&dst_dir.join("disk1.sock")).await;
    assert_eq!(hash(&dest), hash(&model.lock().await));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_peer_without_the_pinned_key_cannot_move_a_block() {
    let dir = tempfile::tempdir().expect("tmp");
    let src = dir.path().join("p.img");
    make_image(&src, 4 * MIB, &[(0, MIB)], 12);
    let served = serve(&src, "p", dir.path().join("p.sock")).await;
    let k = keys();
    let stranger = keys();
    let dst_dir = dir.path().join("dst");
    std::fs::create_dir_all(&dst_dir).expect("mkdir");
    // The agent pins someone else's key.
    let a = agent(&dst_dir, k.dst.clone(), vec![stranger.src.fingerprint()]).await;
    let err = source::migrate(
        served.disk.clone(),
        opts(&k, &a.addr, None),
        EventSink::none(),
    )
    .await
    .expect_err("must be refused");
    assert!(
        matches!(
            err,
            MigrateError::Handshake { .. } | MigrateError::LinkClosed | MigrateError::Link(_)
        ),
        "{err}"
    );
    assert!(
        !dst_dir.join("p.img").exists(),
        "no block may reach the destination"
    );
    // And the source pins the destination's key: a rogue destination is refused.
    let rogue = agent(&dst_dir, stranger.dst.clone(), vec![k.src.fingerprint()]).await;
    let err = source::migrate(
        served.disk.clone(),
        opts(&k, &rogue.addr, None),
        EventSink::none(),
    )
    .await
    .expect_err("rogue destination");
    assert!(matches!(err, MigrateError::Handshake { .. }), "{err}");
    let mut c = client(&served.sock).await;
    c.write(0, &[1; 512], false)
        .await
        .expect("source still writable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_migration_that_cannot_converge_rolls_back() {
    let dir = tempfile::tempdir().expect("tmp");
    let src = dir.path().join("h.img");
    let model = Arc::new(Mutex::new(make_image(&src, 8 * MIB, &[(0, MIB)], 13)));
    let served = serve(&src, "h", dir.path().join("h.sock")).await;
    let k = keys();
    let dst_dir = dir.path().join("dst");
    std::fs::create_dir_all(&dst_dir).expect("mkdir");
    let a = agent(&dst_dir, k.dst.clone(), vec![k.src.fingerprint()]).await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let w = tokio::spawn(writer(served.sock.clone(), model.clone(), 13, stop.clone()));
    let mut o = opts(&k, &a.addr, Some(MIB));
    o.compress = false;
    o.precopy.throttle = None;
    o.precopy.max_rounds = 2;
    o.precopy.min_final_blocks = 1;
    o.precopy.downtime_target = Duration::from_millis(1);
    let err = source::migrate(served.disk.clone(), o, EventSink::none())
        .await
        .expect_err("cannot converge");
    assert!(
        matches!(err, MigrateError::NotConverged { rounds: 2, .. }),
        "{err}"
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    w.await.expect("writer");
    let mut c = client(&served.sock).await;
    c.write(0, &[3; 512], false)
        .await
        .expect("rolled back: source writable");
    model.lock().await[..512].fill(3);
    assert_eq!(
        hash(&read_all(&served.sock).await),
        hash(&model.lock().await)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn cli_serve_receive_migrate_with_json_events() {
    let bin = env!("CARGO_BIN_EXE_migrator");
    let dir = tempfile::tempdir().expect("tmp");
    let src = dir.path().join("web1.img");
    let model = make_image(&src, 8 * MIB, &[(MIB, 3 * MIB)], 14);
    let (ks, kd) = (dir.path().join("ks"), dir.path().join("kd"));
    let fp_s = run(Command::new(bin).args(["keygen", "--dir"]).arg(&ks))
        .trim()
        .to_string();
    let fp_d = run(Command::new(bin).args(["keygen", "--dir"]).arg(&kd))
        .trim()
        .to_string();
    let (sock, ctl) = (dir.path().join("web1.sock"), dir.path().join("web1.ctl"));
    let _server = tests_guard::Child(
        Command::new(bin)
            .args(["disk", "serve", "--image"])
            .arg(&src)
            .arg("--socket")
            .arg(&sock)
            .arg("--control")
            .arg(&ctl)
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn serve"),
    );
    let dst_dir = dir.path().join("dst");
    let a = spawn_agent(&dst_dir, &kd, &fp_s);
    for _ in 0..100 {
        if ctl.exists() && sock.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let out = tokio::task::spawn_blocking({
        let (ctl, ks, addr) = (ctl.clone(), ks.clone(), a.addr.clone());
        move || {
            run(Command::new(bin)
                .args(["disk", "migrate", "--json", "--control"])
                .arg(&ctl)
                .args(["--to", &addr, "--identity"])
                .arg(&ks)
                .args(["--peer", &fp_d]))
        }
    })
    .await
    .expect("join");
    let events: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    let summary = events
        .iter()
        .find(|e| e["event"] == "summary")
        .expect("summary event");
    assert_eq!(summary["size_bytes"], 8 * MIB);
    assert!(events
        .iter()
        .any(|e| e["event"] == "phase" && e["phase"] == "bulk"));
    // Holes stay holes: far fewer bytes on the wire than the disk's size.
    assert!(
        summary["wire_bytes"].as_u64().expect("wire") < 4 * MIB,
        "{summary}"
    );
    assert_eq!(
        hash(&std::fs::read(dst_dir.join("web1.img")).expect("dest")),
        hash(&model)
    );
    // The moved image is not served writable again.
    let out = Command::new(bin)
        .args(["disk", "serve", "--image"])
        .arg(&src)
        .arg("--socket")
        .arg(dir.path().join("x.sock"))
        .output()
        .expect("spawn");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("was migrated to"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
