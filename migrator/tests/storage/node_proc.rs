//! kill -9 of either node at each phase of a move: `migrator node run`
//! processes on loopback, one of them killed by a failpoint (SIGKILL at the
//! named moment) and started again. Afterwards exactly one node says the
//! disk runs there, and it serves every write the writer was told was done.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use migrator::agent::DiskState;
use migrator::args::Tuning;
use migrator::nbd::client::ClientError;
use migrator::node::api;
use migrator::transport::tls::Identity;
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use tokio::sync::{mpsc, Mutex};

use crate::common::*;

/// A node process, killed when dropped.
struct Proc {
    child: Option<Child>,
    name: &'static str,
    config: PathBuf,
}

impl Proc {
    /// Starts `migrator node run --config CONFIG` (with `failpoint` armed)
    /// and returns it with the address it listens on.
    fn start(name: &'static str, config: &Path, failpoint: Option<&str>) -> (Proc, String) {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_migrator"));
        cmd.args(["node", "run", "--config"])
            .arg(config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(f) = failpoint {
            cmd.env("MIGRATOR_FAILPOINTS", format!("{f}:kill"));
        }
        let mut child = cmd.spawn().expect("spawn migrator node run");
        let out = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(out).read_line(&mut line).expect("read");
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("node {name} did not start: {line:?}"))
            .to_string();
        (
            Proc {
                child: Some(child),
                name,
                config: config.to_path_buf(),
            },
            addr,
        )
    }

    /// Waits until the failpoint has killed it.
    fn wait_killed(&mut self, within: Duration) {
        let t = Instant::now();
        let child = self.child.as_mut().expect("running");
        loop {
            if let Some(st) = child.try_wait().expect("wait") {
                use std::os::unix::process::ExitStatusExt;
                assert_eq!(st.signal(), Some(9), "node {} ended by SIGKILL", self.name);
                self.child = None;
                return;
            }
            assert!(
                t.elapsed() < within,
                "node {} was not killed in time",
                self.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

struct Site {
    name: &'static str,
    dir: PathBuf,
    control: PathBuf,
    config: PathBuf,
    fingerprint: String,
}

impl Site {
    fn new(root: &Path, name: &'static str) -> Site {
        let key = root.join(format!("{name}-key"));
        let id = Identity::generate().expect("keygen");
        id.save(&key).expect("save key");
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).expect("mkdir");
        Site {
            name,
            control: root.join(format!("{name}.ctl")),
            config: root.join(format!("{name}.toml")),
            dir,
            fingerprint: id.fingerprint_hex(),
        }
    }

    /// Writes its node.toml: listening on `listen`, knowing `peer` at `peer_addr`.
    fn configure(&self, listen: &str, peer: &Site, peer_addr: &str) {
        let text = format!(
            "name = \"{}\"\ndir = \"{}\"\nlisten = \"{listen}\"\nidentity = \"{}-key\"\ncontrol = \"{}\"\nreconnect_s = 30\n\n[peer.{}]\naddr = \"{peer_addr}\"\nfingerprint = \"{}\"\n",
            self.name,
            self.dir.display(),
            self.name,
            self.control.display(),
            peer.name,
            peer.fingerprint,
        );
        std::fs::write(&self.config, text).expect("write config");
    }

    fn state(&self, vm: &str) -> Option<DiskState> {
        let b = std::fs::read(self.dir.join(format!("{vm}.state"))).ok()?;
        let st: migrator::agent::StateFile = serde_json::from_slice(&b).expect("state file");
        Some(st.state)
    }

    fn sock(&self, vm: &str) -> PathBuf {
        self.dir.join(format!("{vm}.sock"))
    }
}

/// Writes until any error (the node died, or the disk moved): the acked
/// writes are in `model`; the last write, if unanswered, is returned (it may
/// or may not have reached the disk).
async fn tolerant_writer(
    sock: PathBuf,
    model: Arc<Mutex<Vec<u8>>>,
    seed: u64,
) -> (u64, Option<(u64, Vec<u8>)>) {
    let mut c = client(&sock).await;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut acked = 0;
    loop {
        let (off, len, _) = random_write(&mut rng, 4 * MIB);
        let mut data = vec![0u8; len];
        rng.fill_bytes(&mut data);
        match c.write(off, &data, false).await {
            Ok(()) => {
                model.lock().await[off as usize..off as usize + len].copy_from_slice(&data);
                acked += 1;
            }
            Err(ClientError::Server { code: 1, .. }) => return (acked, None),
            Err(_) => return (acked, Some((off, data))),
        }
        tokio::time::sleep(Duration::from_micros(300)).await;
    }
}

/// The disk as `site` serves it equals the acked writes (or those plus the
/// one left unanswered when its node died).
async fn assert_whole(site: &Site, model: &[u8], unanswered: &Option<(u64, Vec<u8>)>) {
    let got = read_all(&site.sock("web1")).await;
    if hash(&got) == hash(model) {
        return;
    }
    if let Some((off, data)) = unanswered {
        let mut m = model.to_vec();
        m[*off as usize..*off as usize + data.len()].copy_from_slice(data);
        if hash(&got) == hash(&m) {
            return;
        }
    }
    let first = got.iter().zip(model).position(|(a, b)| a != b);
    panic!(
        "{} serves a disk that differs from the acknowledged writes (first at byte {first:?})",
        site.name
    );
}

/// Waits for a node's control socket to answer and `vm` to be settled there.
async fn settled(site: &Site, vm: &str) -> DiskState {
    let t = Instant::now();
    loop {
        if let Ok(st) = api::status(&site.control).await {
            if let Some(v) = st.vms.iter().find(|v| v.name == vm) {
                if !matches!(v.state, DiskState::InDoubt | DiskState::Committed) {
                    return v.state;
                }
            }
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "{vm} never settled at {}",
            site.name
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Victim {
    Source,
    Destination,
}

/// A moves web1 to B; `victim` is killed at `point`, started again, and
/// the move is re-run if it did not finish. Returns where it ended.
async fn kill_at(victim: Victim, point: &str) {
    let root = tempfile::tempdir().expect("tmp");
    let (a, b) = (Site::new(root.path(), "A"), Site::new(root.path(), "B"));
    let regions: Vec<(u64, u64)> = (0..6).map(|i| (i * 2 * MIB + 512, MIB)).collect();
    let model = Arc::new(Mutex::new(make_image(
        &a.dir.join("web1.img"),
        12 * MIB,
        &regions,
        1,
    )));
    // B first, so A knows its address; B never sends in this test.
    b.configure("127.0.0.1:0", &a, "127.0.0.1:9");
    let fp = |v| (victim == v).then_some(point);
    let (mut pb, b_addr) = Proc::start("B", &b.config, fp(Victim::Destination));
    b.configure(&b_addr, &a, "127.0.0.1:9"); // a restart listens on the same port
    a.configure("127.0.0.1:0", &b, &b_addr);
    let (mut pa, _) = Proc::start("A", &a.config, fp(Victim::Source));

    let w = tokio::spawn(tolerant_writer(a.sock("web1"), model.clone(), 2));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let tuning = Tuning {
        max_rate_mbit: Some(200.0),
        ..Tuning::default()
    };
    let (tx, _rx) = mpsc::unbounded_channel();
    let ctl = a.control.clone();
    let job = tokio::spawn(async move { api::migrate(&ctl, "web1", "B", tuning, tx).await });

    // the failpoint fires; the victim comes back
    let dead = match victim {
        Victim::Source => &mut pa,
        Victim::Destination => &mut pb,
    };
    tokio::task::block_in_place(|| dead.wait_killed(Duration::from_secs(30)));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (back, _) = Proc::start(dead.name, &dead.config.clone(), None);
    *dead = back;

    let moved = job.await.expect("job");
    let (sa, sb) = (settled(&a, "web1").await, settled(&b, "web1").await);
    // Exactly one copy runs.
    assert!(
        matches!(
            (sa, sb),
            (DiskState::Complete, DiskState::Partial) | (DiskState::Moved, DiskState::Complete)
        ),
        "{point}, {victim:?} killed: A is {sa:?}, B is {sb:?} (the move said {moved:?})"
    );
    if sa == DiskState::Complete {
        // The VM stayed home (its writer may still be writing there): a
        // re-run moves it.
        let (tx, _rx) = mpsc::unbounded_channel();
        api::migrate(&a.control, "web1", "B", Tuning::default(), tx)
            .await
            .unwrap_or_else(|e| panic!("{point}: re-run after {victim:?} was killed: {e}"));
        assert_eq!(b.state("web1"), Some(DiskState::Complete));
        assert_eq!(a.state("web1"), Some(DiskState::Moved));
    }
    let (acked, unanswered) = w.await.expect("writer");
    assert!(acked > 0, "the writer ran");
    let model = model.lock().await.clone();
    assert_whole(&b, &model, &unanswered).await;
    drop((pa, pb));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn recover_kill_9_of_source_node_mid_bulk() {
    kill_at(Victim::Source, "source.blocks").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn recover_kill_9_of_destination_node_mid_bulk() {
    kill_at(Victim::Destination, "dest.data").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn recover_kill_9_of_source_node_in_doubt_before_commit() {
    kill_at(Victim::Source, "source.before_commit").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn recover_kill_9_of_destination_node_right_after_its_commit_record() {
    kill_at(Victim::Destination, "dest.after_commit_record").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn recover_kill_9_of_source_node_after_commit_with_blocks_pending() {
    kill_at(Victim::Source, "source.final_blocks").await;
}
