//! Nodes on loopback: a disk moves around a ring of three nodes and back
//! home with a writer running, and a move whose link breaks at the commit
//! resolves to exactly one copy that serves, with every acknowledged write.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use migrator::agent::DiskState;
use migrator::args::Tuning;
use migrator::events::Summary;
use migrator::failpoint;
use migrator::nbd::client::ClientError;
use migrator::node::api::{self, Request};
use migrator::node::{bind_control, Node, NodeConfig, PeerConfig};
use migrator::transport::tls::Identity;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, Mutex};

use crate::common::*;

struct TestNode {
    name: String,
    dir: PathBuf,
    control: PathBuf,
    node: Arc<Node>,
    _stop: oneshot::Sender<()>,
}

impl TestNode {
    fn sock(&self, vm: &str) -> PathBuf {
        self.dir.join(format!("{vm}.sock"))
    }

    fn state(&self, vm: &str) -> DiskState {
        self.node
            .agent()
            .read_state(vm)
            .unwrap_or_else(|| panic!("{} has no state for {vm}", self.name))
            .state
    }
}

/// Nodes named `names` under `root`, each the peer of every other; `route`
/// gives the address one node uses to reach another (a proxy, or direct).
/// `prepare` runs on each node's directory before it starts (to put images).
async fn nodes(
    root: &Path,
    names: &[&str],
    route: impl Fn(&str, &str, &str) -> String,
    prepare: impl Fn(&str, &Path),
) -> Vec<TestNode> {
    let mut keys = BTreeMap::new();
    let mut links = BTreeMap::new();
    for n in names {
        let kd = root.join(format!("{n}-key"));
        let id = Identity::generate().expect("keygen");
        id.save(&kd).expect("save key");
        keys.insert(n.to_string(), (kd, id.fingerprint_hex()));
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind link");
        links.insert(n.to_string(), l);
    }
    let addrs: BTreeMap<String, String> = links
        .iter()
        .map(|(n, l)| (n.clone(), l.local_addr().expect("addr").to_string()))
        .collect();
    let mut out = Vec::new();
    for n in names {
        let dir = root.join(n);
        std::fs::create_dir_all(&dir).expect("mkdir");
        prepare(n, &dir);
        let peer = names
            .iter()
            .filter(|p| *p != n)
            .map(|p| {
                (
                    p.to_string(),
                    PeerConfig {
                        addr: route(n, p, &addrs[*p]),
                        fingerprint: keys[*p].1.clone(),
                    },
                )
            })
            .collect();
        let cfg = NodeConfig {
            name: n.to_string(),
            dir: dir.clone(),
            listen: addrs[*n].clone(),
            identity: keys[*n].0.clone(),
            control: Some(root.join(format!("{n}.ctl"))),
            reconnect_s: 10,
            peer,
        };
        let control = cfg.control_path();
        let node = Node::start(cfg).await.expect("node starts");
        let ctl = bind_control(&control).expect("bind control");
        let (tx, rx) = oneshot::channel();
        let link = links.remove(*n).expect("listener");
        tokio::spawn(node.clone().run(link, ctl, async {
            let _ = rx.await;
        }));
        out.push(TestNode {
            name: n.to_string(),
            dir,
            control,
            node,
            _stop: tx,
        });
    }
    out
}

fn direct(_from: &str, _to: &str, addr: &str) -> String {
    addr.to_string()
}

/// `migrator node migrate` through the control socket.
async fn migrate(from: &TestNode, vm: &str, to: &str) -> Result<Summary, api::ClientError> {
    let tuning = Tuning {
        max_rate_mbit: Some(400.0),
        ..Tuning::default()
    };
    let (tx, _rx) = mpsc::unbounded_channel();
    api::migrate(&from.control, vm, to, tuning, tx).await
}

/// Writes through `sock` until it refuses (moved) or `stop`; returns the task.
fn start_writer(
    sock: PathBuf,
    model: Arc<Mutex<Vec<u8>>>,
    seed: u64,
) -> (tokio::task::JoinHandle<u64>, Arc<AtomicBool>) {
    let stop = Arc::new(AtomicBool::new(false));
    (tokio::spawn(writer(sock, model, seed, stop.clone())), stop)
}

/// The ring's writer: its writes stay in the disk's first `SPAN` bytes, so
/// the way home has a known bound on what changed.
const SPAN: u64 = 4 * MIB;

const SIZE: u64 = 24 * MIB;

fn image_at_a(seed: u64) -> impl Fn(&str, &Path) -> Vec<u8> {
    move |n, dir| {
        if n == "A" {
            let regions: Vec<(u64, u64)> =
                (0..8).map(|i| (i * 3 * MIB + 4096, MIB + 777)).collect();
            make_image(&dir.join("web1.img"), SIZE, &regions, seed)
        } else {
            Vec::new()
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ring_a_b_c_a_moves_a_disk_with_a_writer_and_returns_only_what_changed() {
    let root = tempfile::tempdir().expect("tmp");
    let model = Arc::new(Mutex::new(Vec::new()));
    let m = model.clone();
    let make = image_at_a(7);
    let ns = nodes(root.path(), &["A", "B", "C"], direct, move |n, d| {
        let content = make(n, d);
        if !content.is_empty() {
            *m.try_lock().expect("model") = content;
        }
    })
    .await;
    let [a, b, c] = [&ns[0], &ns[1], &ns[2]];
    assert_eq!(a.state("web1"), DiskState::Complete, "A adopted its image");

    let mut legs = Vec::new();
    for (i, (from, to)) in [(a, b), (b, c), (c, a)].into_iter().enumerate() {
        let stop = Arc::new(AtomicBool::new(false));
        let w = tokio::spawn(writer_within(
            from.sock("web1"),
            model.clone(),
            100 + i as u64,
            stop.clone(),
            Some(SPAN),
        ));
        tokio::time::sleep(Duration::from_millis(100)).await;
        let s = migrate(from, "web1", &to.name)
            .await
            .unwrap_or_else(|e| panic!("{} -> {}: {e}", from.name, to.name));
        let acked = w.await.expect("writer");
        assert!(
            acked > 0,
            "the writer ran during {} -> {}",
            from.name,
            to.name
        );
        // the destination serves exactly what the writer was told was written
        let want = hash(&model.lock().await);
        assert_eq!(
            hash(&read_all(&to.sock("web1")).await),
            want,
            "{} -> {}: {s:?}",
            from.name,
            to.name
        );
        assert_eq!(to.state("web1"), DiskState::Complete);
        assert_eq!(from.state("web1"), DiskState::Moved);
        // the old copy refuses writes, and the old node will not send it again
        let mut cl = client(&from.sock("web1")).await.ok();
        if let Some(cl) = cl.as_mut() {
            assert!(matches!(
                cl.write(0, &[1], false).await,
                Err(ClientError::Server { code: 1, .. })
            ));
        }
        let again = migrate(from, "web1", &to.name).await;
        let err = again.expect_err("a node that no longer has the VM refuses to send it");
        assert!(err.to_string().contains("runs there"), "{err}");
        legs.push(s);
    }
    // Coming home, A compares against the copy it kept: only what changed
    // (within SPAN) travels, and blocks rewritten during the move again.
    let (first, home) = (&legs[0], &legs[2]);
    assert!(home.resumed_bytes > 0, "{home:?}");
    assert!(
        home.data_bytes < 2 * SPAN && home.data_bytes * 2 < first.data_bytes,
        "the return sent {} data bytes, the first leg {}",
        home.data_bytes,
        first.data_bytes
    );
    // Status from the control socket, as `migrator status` shows it.
    let st = api::status(&a.control).await.expect("status");
    assert_eq!(st.node, "A");
    assert_eq!(st.vms.len(), 1);
    assert_eq!(st.vms[0].state, DiskState::Complete);
    let st = api::status(&b.control).await.expect("status");
    assert_eq!(
        (st.vms[0].state, st.vms[0].to.as_deref()),
        (DiskState::Moved, Some("C"))
    );
    let _ = c;
}

/// A client that may fail to connect (a node that no longer serves a disk
/// removes its socket).
async fn client(sock: &Path) -> Result<migrator::nbd::client::Client<tokio::net::UnixStream>, ()> {
    let s = tokio::net::UnixStream::connect(sock)
        .await
        .map_err(|_| ())?;
    migrator::nbd::client::Client::connect(s, "")
        .await
        .map_err(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refused_requests_change_nothing() {
    let root = tempfile::tempdir().expect("tmp");
    let make = image_at_a(3);
    let ns = nodes(root.path(), &["A", "B"], direct, move |n, d| {
        make(n, d);
    })
    .await;
    let (a, b) = (&ns[0], &ns[1]);
    for (from, vm, to, says) in [
        (a, "web1", "nowhere", "no peer named nowhere"),
        (a, "web1", "A", "runs here"),
        (a, "db9", "B", "no VM named db9"),
        (b, "web1", "A", "no VM named web1"),
    ] {
        let e = migrate(from, vm, to).await.expect_err("refused");
        assert!(e.to_string().contains(says), "{e}");
    }
    let e = api::call(&a.control, &Request::Cancel { vm: "web1".into() }, |_| {})
        .await
        .expect_err("nothing to cancel");
    assert!(e.to_string().contains("no migration of web1"), "{e}");
    // a request with a field the node does not know
    let raw = r#"{"request":"migrate","vm":"web1","to":"B","peer":"ffff"}"#;
    let out = raw_request(&a.control, raw).await;
    assert!(out.contains("bad request"), "{out}");
    assert_eq!(a.state("web1"), DiskState::Complete);
    assert!(
        b.node.agent().read_state("web1").is_none(),
        "nothing reached B"
    );
}

async fn raw_request(sock: &Path, line: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::UnixStream::connect(sock)
        .await
        .expect("connect");
    s.write_all(format!("{line}\n").as_bytes())
        .await
        .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    out
}

/// One node sends web1 to the other through a proxy that `fault` breaks at
/// the failpoint `point`; returns the nodes, the proxy and the outcome.
async fn move_with_fault(
    root: &Path,
    point: &str,
    fault: fn(&Proxy),
) -> (
    Vec<TestNode>,
    Arc<Proxy>,
    Arc<Mutex<Vec<u8>>>,
    Result<Summary, api::ClientError>,
) {
    let model = Arc::new(Mutex::new(Vec::new()));
    let m = model.clone();
    let make = image_at_a(11);
    // A reaches B through the proxy; its address is known once B listens.
    let proxy_slot: Arc<std::sync::Mutex<Option<Arc<Proxy>>>> = Arc::default();
    let ps = proxy_slot.clone();
    let ns = nodes(
        root,
        &["A", "B"],
        move |from, to, addr| {
            if (from, to) == ("A", "B") {
                let p = block_on_here(Proxy::start(addr.to_string()));
                let a = p.addr.clone();
                *ps.lock().expect("slot") = Some(Arc::new(p));
                a
            } else {
                addr.to_string()
            }
        },
        move |n, d| {
            let content = make(n, d);
            if !content.is_empty() {
                *m.try_lock().expect("model") = content;
            }
        },
    )
    .await;
    let proxy = proxy_slot.lock().expect("slot").clone().expect("proxy");
    let handle = proxy.clone();
    let fired = Arc::new(AtomicBool::new(false));
    let f = fired.clone();
    failpoint::set(
        point,
        failpoint::Action::Call(Arc::new(move || {
            if !f.swap(true, std::sync::atomic::Ordering::SeqCst) {
                fault(&handle);
                // let the break reach both ends before the next step
                std::thread::sleep(Duration::from_millis(100));
            }
        })),
    );
    let (w, stop) = start_writer(ns[0].sock("web1"), model.clone(), 5);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let r = migrate(&ns[0], "web1", "B").await;
    failpoint::clear(point);
    // moved, the writer stops on its own; rolled back, it would go on
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(
        fired.load(std::sync::atomic::Ordering::SeqCst),
        "the fault at {point} fired"
    );
    let acked = w.await.expect("writer");
    assert!(acked > 0);
    (ns, proxy, model, r)
}

/// Runs a future to completion from a synchronous closure inside the runtime.
fn block_on_here<F: std::future::Future>(f: F) -> F::Output {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f))
}

/// web1 runs at `b` only, and serves every acknowledged write.
async fn assert_moved(a: &TestNode, b: &TestNode, model: &Mutex<Vec<u8>>, how: &str) {
    assert_eq!(b.state("web1"), DiskState::Complete, "{how}");
    assert_eq!(a.state("web1"), DiskState::Moved, "{how}");
    assert_eq!(
        hash(&read_all(&b.sock("web1")).await),
        hash(&model.lock().await),
        "{how}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn recover_link_cut_after_commit_before_ack_finishes_at_the_destination() {
    let root = tempfile::tempdir().expect("tmp");
    let (ns, _proxy, model, r) =
        move_with_fault(root.path(), "dest.after_commit_record", |p| p.cut()).await;
    let (a, b) = (&ns[0], &ns[1]);
    let s = r.expect("the source asks, hears `committed`, and sends the rest");
    assert_moved(a, b, &model, &format!("{s:?}")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn recover_link_cut_before_commit_keeps_the_vm_at_the_source_and_a_rerun_moves_it() {
    let root = tempfile::tempdir().expect("tmp");
    let (ns, _proxy, model, r) =
        move_with_fault(root.path(), "source.before_commit", |p| p.cut()).await;
    let (a, b) = (&ns[0], &ns[1]);
    let e = r.expect_err("the destination never committed");
    assert!(e.to_string().contains("did not"), "{e}");
    assert_eq!(
        a.state("web1"),
        DiskState::Complete,
        "the source serves again"
    );
    assert_ne!(b.state("web1"), DiskState::Complete);
    assert_ne!(b.state("web1"), DiskState::Committed);
    assert_eq!(
        hash(&read_all(&a.sock("web1")).await),
        hash(&model.lock().await)
    );
    // writes go on at the source, then a re-run moves them all
    let (w, _stop) = start_writer(a.sock("web1"), model.clone(), 6);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let s = migrate(a, "web1", "B").await.expect("re-run");
    assert!(w.await.expect("writer") > 0);
    assert!(
        s.resumed_bytes > 0,
        "the partial copy at B was reused: {s:?}"
    );
    assert_moved(a, b, &model, "re-run").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn recover_black_holed_link_at_the_commit_resolves_by_asking() {
    let root = tempfile::tempdir().expect("tmp");
    let (ns, proxy, model, r) =
        move_with_fault(root.path(), "source.before_commit", |p| p.black_hole()).await;
    let (a, b) = (&ns[0], &ns[1]);
    // Commit vanished into the hole: the destination, asked on a new link,
    // fences the silent one and answers that it never committed.
    let e = r.expect_err("not committed");
    assert!(e.to_string().contains("did not"), "{e}");
    assert_eq!(a.state("web1"), DiskState::Complete);
    // The hole gives the Commit back, late: it must not commit anything now
    // that the source runs the VM again.
    proxy.release();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !matches!(
            b.node.agent().read_state("web1").map(|s| s.state),
            Some(DiskState::Committed | DiskState::Complete)
        ),
        "a late Commit made a second copy authoritative"
    );
    assert_eq!(
        hash(&read_all(&a.sock("web1")).await),
        hash(&model.lock().await)
    );
    // the silent session no longer blocks a new move
    let s = migrate(a, "web1", "B")
        .await
        .expect("re-run after the black hole");
    assert_moved(a, b, &model, &format!("{s:?}")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn recover_link_cut_while_final_blocks_flow_resumes_them() {
    let root = tempfile::tempdir().expect("tmp");
    let (ns, _proxy, model, r) =
        move_with_fault(root.path(), "source.final_blocks", |p| p.cut()).await;
    let (a, b) = (&ns[0], &ns[1]);
    let s = r.expect("the final blocks resume on a new link");
    assert_moved(a, b, &model, &format!("{s:?}")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancel_mid_bulk_keeps_the_vm_at_the_source_and_set_changes_the_rate() {
    let root = tempfile::tempdir().expect("tmp");
    let model = Arc::new(Mutex::new(Vec::new()));
    let m = model.clone();
    let make = image_at_a(21);
    let ns = nodes(root.path(), &["A", "B"], direct, move |n, d| {
        let content = make(n, d);
        if !content.is_empty() {
            *m.try_lock().expect("model") = content;
        }
    })
    .await;
    let (a, b) = (&ns[0], &ns[1]);
    let (w, stop) = start_writer(a.sock("web1"), model.clone(), 9);
    // slow enough to be caught mid-bulk: 8 MiB of data at 8 Mbit/s
    let tuning = Tuning {
        max_rate_mbit: Some(8.0),
        ..Tuning::default()
    };
    let (tx, _rx) = mpsc::unbounded_channel();
    let ctl = a.control.clone();
    let job = tokio::spawn(async move { api::migrate(&ctl, "web1", "B", tuning, tx).await });
    // wait for bulk, then raise the cap from another connection and watch the rate follow
    let mut rate_at_8 = 0.0;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let st = api::status(&a.control).await.expect("status");
        if let Some(j) = &st.vms[0].migration {
            if j.wire_bytes > MIB && j.rate_bytes_per_s.is_some() {
                rate_at_8 = j.rate_bytes_per_s.unwrap_or(0.0);
                break;
            }
        }
    }
    assert!(rate_at_8 > 0.0, "the migration reached bulk");
    let said = api::call(
        &a.control,
        &Request::Set {
            vm: "web1".into(),
            max_rate_mbit: Some(2.0),
            downtime_ms: Some(50),
        },
        |_| {},
    )
    .await;
    said.expect("set");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let st = api::status(&a.control).await.expect("status");
    let j = st.vms[0].migration.clone().expect("still migrating");
    let rate_at_2 = j.rate_bytes_per_s.unwrap_or(f64::MAX);
    assert_eq!(j.max_rate_mbit, Some(2.0));
    assert!(
        rate_at_2 < rate_at_8 * 0.7,
        "the rate followed the new cap: {rate_at_8:.0} B/s at 8 Mbit/s, {rate_at_2:.0} B/s at 2"
    );
    // from any shell, knowing only the sites: the CLI finds the node that
    // runs the migration
    let cfg = root.path().join("migrator.toml");
    std::fs::write(
        &cfg,
        format!(
            "identity = \"keys\"\n[site.A]\ngateway = \"unix:/nonexistent\"\ntoken = \"t\"\nnode = \"{}\"\n\
             [site.B]\ngateway = \"unix:/nonexistent\"\ntoken = \"t\"\nnode = \"{}\"\n",
            a.control.display(),
            b.control.display()
        ),
    )
    .expect("migrator.toml");
    let cli = |args: &[&str]| {
        let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_migrator"));
        c.args(args).arg("--config").arg(&cfg);
        c.output()
    };
    let st = cli(&["status", "web1", "--json"]).await.expect("status");
    let all: Vec<serde_json::Value> =
        serde_json::from_slice(&st.stdout).expect("every site's status as JSON");
    assert_eq!(all.len(), 2, "{all:?}");
    let out = cli(&["cancel", "web1"]).await.expect("cancel");
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.contains("keeps running at A"), "{said}");
    let out = cli(&["cancel", "web1"]).await.expect("cancel");
    assert!(!out.status.success(), "nothing left to cancel");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no migration of web1 in flight"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = job.await.expect("job");
    assert!(r.is_err(), "the cancelled migration reports it");
    // the writer never saw an error; A still takes writes and holds them all
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(w.await.expect("writer") > 0);
    assert_eq!(a.state("web1"), DiskState::Complete);
    assert_ne!(b.state("web1"), DiskState::Complete);
    assert_eq!(
        hash(&read_all(&a.sock("web1")).await),
        hash(&model.lock().await)
    );
    let st = api::status(&a.control).await.expect("status");
    assert!(st.vms[0].migration.is_none());
}
