//! A running guest moves from one QEMU to another — memory, CPU state and
//! disk — between two network namespaces, through `migrator disk migrate
//! --qmp`: the source disk server drives the source QEMU, the destination
//! agent starts the destination QEMU from its launch file, and the memory
//! stream and the disk blocks share our one TLS link.

use std::io::{BufRead as _, BufReader, Read as _, Seek as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use migrator::qmp::Qmp;
use tests::bed::{keys, migrator_bin, start_agent, start_source, Keys, Sites};
use tests::guest;
use tests::netns::available;
use tests::proc::ChildGuard;

/// Console lines, when they came, and from which QEMU.
type Console = Arc<Mutex<Vec<(Instant, &'static str, String)>>>;

struct Bed {
    sites: Sites,
    dir: tempfile::TempDir,
    k: guest::GuestKernel,
    keys: Keys,
    image: PathBuf,
    agent_dir: PathBuf,
    console: Console,
    /// Stops the console tail threads.
    stop: Arc<AtomicBool>,
}

impl Drop for Bed {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl Bed {
    fn new(beats: u64) -> Bed {
        assert!(available(), "needs root (network namespaces)");
        let k = guest::kernel(&guest::cache_dir()).expect("guest kernel");
        let dir = tempfile::tempdir().expect("tempdir");
        let image = dir.path().join("root.img");
        guest::rootfs(&image, 64, &[]).expect("rootfs");
        let keys = keys(dir.path()).expect("keys");
        let agent_dir = dir.path().join("agent");
        std::fs::create_dir_all(&agent_dir).expect("agent dir");
        // the destination QEMU: the same machine, its disk the agent's export
        let launch = guest::qemu_nbd_command(&k, "{disk}", "root", &format!("guest_beats={beats}"));
        std::fs::write(agent_dir.join("root.qemu"), guest::launch_file(&launch))
            .expect("launch file");
        Bed {
            sites: Sites::new(None).expect("sites"),
            dir,
            k,
            keys,
            image,
            agent_dir,
            console: Arc::new(Mutex::new(Vec::new())),
            stop: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The agent's, the disk server's and the destination QEMU's messages.
    fn logs(&self) -> String {
        [
            self.agent_dir.join("agent.log"),
            self.path("ctl.log"),
            self.agent_dir.join("root.log"),
        ]
        .iter()
        .map(|p| {
            let text = std::fs::read_to_string(p).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(30).collect();
            format!(
                "--- {}\n{}\n",
                p.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            )
        })
        .collect()
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The disk server and the source QEMU (its disk the server's export),
    /// at site A, running until the guest prints `beats` heartbeats.
    fn start_vm(&self, beats: u64) -> (ChildGuard, ChildGuard) {
        let (sock, ctl) = (self.path("root.sock"), self.path("ctl.sock"));
        let server = start_source(&self.sites, &self.image, &sock, &ctl).expect("disk server");
        let plain = guest::qemu_nbd_command(
            &self.k,
            &sock.display().to_string(),
            "root",
            &format!("guest_beats={beats}"),
        );
        let mut cmd = self.sites.a.command("qemu-system-x86_64");
        cmd.args(plain.get_args())
            .arg("-qmp")
            .arg(format!(
                "unix:{},server=on,wait=off",
                self.path("a.qmp").display()
            ))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .stdin(Stdio::null());
        let mut qemu = ChildGuard::spawn(&mut cmd).expect("qemu");
        let out = qemu
            .0
            .as_mut()
            .and_then(|c| c.stdout.take())
            .expect("console");
        let console = self.console.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                console
                    .lock()
                    .expect("lock")
                    .push((Instant::now(), "src", line));
            }
        });
        (server, qemu)
    }

    /// Follows the destination QEMU's console (its log file at the agent).
    fn tail_destination(&self) {
        let (path, console, stop) = (
            self.agent_dir.join("root.log"),
            self.console.clone(),
            self.stop.clone(),
        );
        std::thread::spawn(move || {
            let mut pos = 0u64;
            let mut partial = String::new();
            while !stop.load(Ordering::Relaxed) {
                if let Ok(mut f) = std::fs::File::open(&path) {
                    let mut buf = String::new();
                    if f.seek(std::io::SeekFrom::Start(pos)).is_ok() {
                        if let Ok(n) = f.read_to_string(&mut buf) {
                            pos += n as u64;
                        }
                    }
                    partial.push_str(&buf);
                    while let Some(i) = partial.find('\n') {
                        let line: String = partial.drain(..=i).collect();
                        console.lock().expect("lock").push((
                            Instant::now(),
                            "dst",
                            line.trim_end().to_string(),
                        ));
                    }
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
    }

    /// `migrator disk migrate --qmp … --json`; its events arrive in `events`.
    fn migrate(
        &self,
        addr: &str,
        extra: &[&str],
        events: Arc<Mutex<Vec<serde_json::Value>>>,
    ) -> ChildGuard {
        let mut c = Command::new(migrator_bin());
        c.args(["disk", "migrate", "--control"])
            .arg(self.path("ctl.sock"))
            .args(["--to", addr, "--identity"])
            .arg(&self.keys.src_dir)
            .args(["--peer", &self.keys.dst_fp, "--qmp"])
            .arg(self.path("a.qmp"))
            .arg("--json")
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut g = ChildGuard::spawn(&mut c).expect("migrate");
        let out = g.0.as_mut().and_then(|c| c.stdout.take()).expect("stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if let Ok(v) = serde_json::from_str(&line) {
                    events.lock().expect("lock").push(v);
                }
            }
        });
        g
    }

    fn last_beat(&self, tag: &str) -> u64 {
        self.console
            .lock()
            .expect("lock")
            .iter()
            .filter(|(_, t, _)| *t == tag)
            .filter_map(|(_, _, l)| beat(l))
            .max()
            .unwrap_or(0)
    }

    /// Waits until the guest at `tag` has printed more than `n` heartbeats.
    fn wait_beats(&self, tag: &str, n: u64, within: Duration) {
        let t = Instant::now();
        while self.last_beat(tag) <= n {
            assert!(
                t.elapsed() < within,
                "{tag}: no heartbeat {n} within {within:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn wait_line(&self, tag: &str, suffix: &str, within: Duration) {
        let t = Instant::now();
        while !self
            .console
            .lock()
            .expect("lock")
            .iter()
            .any(|(_, t, l)| *t == tag && l.ends_with(suffix))
        {
            assert!(t.elapsed() < within, "{tag} never printed {suffix:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The guest continued at the destination exactly where the source
    /// stopped; returns the largest gap between consecutive heartbeats.
    fn check_continuity(&self) -> Duration {
        let last_src = self.last_beat("src");
        self.wait_beats("dst", last_src + 50, Duration::from_secs(60));
        let c = self.console.lock().expect("lock").clone();
        let first_dst = c
            .iter()
            .filter(|(_, tag, _)| *tag == "dst")
            .find_map(|(_, _, l)| beat(l))
            .expect("dst beats");
        assert!(
            first_dst <= last_src + 1 && first_dst + 1 >= last_src,
            "src ended at {last_src}, dst began at {first_dst}"
        );
        let beats: Vec<(Instant, u64)> = c
            .iter()
            .filter_map(|(t, _, l)| beat(l).map(|n| (*t, n)))
            .collect();
        beats
            .windows(2)
            .map(|w| w[1].0.duration_since(w[0].0))
            .max()
            .unwrap_or_default()
    }

    /// After the guest halted at the destination: its log is whole and its
    /// filesystem clean, on the destination's copy of the disk.
    fn check_destination_disk(&self) {
        self.wait_line("dst", "guest halted", Duration::from_secs(180));
        std::thread::sleep(Duration::from_millis(500));
        let img = self.agent_dir.join("root.img");
        let lines = guest::check_writer_log(&img).expect("writer log");
        assert!(lines > 100, "only {lines} log lines");
        guest::fsck_clean(&img).expect("e2fsck");
    }
}

fn beat(line: &str) -> Option<u64> {
    line.rsplit_once("heartbeat ")
        .and_then(|(_, n)| n.trim().parse().ok())
}

fn wait_exit(g: &mut ChildGuard, within: Duration) -> std::process::ExitStatus {
    let t = Instant::now();
    loop {
        if let Some(st) = g.0.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
            return st;
        }
        assert!(
            t.elapsed() < within,
            "process still running after {within:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn summary(events: &Mutex<Vec<serde_json::Value>>) -> serde_json::Value {
    events
        .lock()
        .expect("lock")
        .iter()
        .find(|e| e["event"] == "summary")
        .cloned()
        .unwrap_or_else(|| panic!("no summary in {:?}", events.lock().expect("lock")))
}

#[test]
fn a_running_guest_moves_with_its_disk_through_our_link() {
    let bed = Bed::new(1500);
    let (_server, mut src) = bed.start_vm(1500);
    bed.wait_beats("src", 20, Duration::from_secs(60));
    let (_agent, addr) = start_agent(&bed.sites, &bed.agent_dir, &bed.keys).expect("agent");
    bed.tail_destination();

    let events = Arc::new(Mutex::new(Vec::new()));
    let mut m = bed.migrate(&addr, &[], events.clone());
    assert!(
        wait_exit(&mut m, Duration::from_secs(300)).success(),
        "migration failed\n{}",
        bed.logs()
    );
    let sum = summary(&events);
    eprintln!("summary: {sum}");
    let vm = &sum["vm"];
    assert!(
        vm["memory_wire_bytes"].as_u64().unwrap_or(0) > 1 << 20,
        "{sum}"
    );
    assert!(
        vm["memory_wire_bytes"].as_u64() < vm["memory_stream_bytes"].as_u64(),
        "{sum}"
    );

    // the source QEMU is gone, the guest goes on at the destination
    assert!(wait_exit(&mut src, Duration::from_secs(30)).success());
    let gap = bed.check_continuity();
    eprintln!(
        "guest-visible pause (largest heartbeat gap): {gap:?}; ours: {} ms, QEMU's: {} ms",
        vm["paused_ms"], vm["qemu_downtime_ms"]
    );
    assert!(gap < Duration::from_secs(5), "the guest paused {gap:?}");
    // the source copy refuses to serve again
    assert!(bed.path("root.img.moved").exists());
    bed.check_destination_disk();
}

/// The destination agent dies in the middle of the memory phase: the source
/// VM runs on, never paused, and a second migration completes.
#[test]
fn killing_the_agent_mid_memory_leaves_the_guest_running_at_the_source() {
    let bed = Bed::new(3000);
    let (_server, _src) = bed.start_vm(3000);
    bed.wait_beats("src", 20, Duration::from_secs(60));
    let (mut agent, addr) = start_agent(&bed.sites, &bed.agent_dir, &bed.keys).expect("agent");

    // slow enough that the memory phase lasts a few seconds
    let events = Arc::new(Mutex::new(Vec::new()));
    let mut m = bed.migrate(&addr, &["--max-rate-mbit", "100"], events.clone());
    let t = Instant::now();
    while !events
        .lock()
        .expect("lock")
        .iter()
        .any(|e| e["event"] == "memory")
    {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "no memory phase: {:?}",
            events.lock().expect("lock")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = agent.pid().expect("agent pid");
    // the agent's children (QEMU), from any of its threads
    let children: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("agent tasks")
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("children")).ok())
        .flat_map(|s| s.split_whitespace().map(str::to_string).collect::<Vec<_>>())
        .collect();
    assert_eq!(
        children.len(),
        1,
        "the agent runs the destination QEMU: {children:?}"
    );
    agent.kill();
    assert!(
        !wait_exit(&mut m, Duration::from_secs(60)).success(),
        "the migration cannot succeed"
    );
    assert!(
        events
            .lock()
            .expect("lock")
            .iter()
            .any(|e| e["event"] == "error"),
        "the failure is reported"
    );
    // the agent's QEMU died with it
    for p in &children {
        let t = Instant::now();
        while Path::new(&format!("/proc/{p}")).exists() {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "destination QEMU {p} outlived its agent"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    // the source runs, not paused, and its guest keeps printing
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let status = rt.block_on(async {
        let q = Qmp::connect(&bed.path("a.qmp")).await.expect("qmp");
        q.execute_timeout("query-status", None, Duration::from_secs(10))
            .await
            .expect("status")
    });
    assert_eq!(status["status"], "running", "{status}");
    let before = bed.last_beat("src");
    bed.wait_beats("src", before + 10, Duration::from_secs(20));
    assert!(!bed.path("root.img.moved").exists());

    // a second attempt (with a fresh agent, resuming its partial disk) completes
    let (_agent, addr) = start_agent(&bed.sites, &bed.agent_dir, &bed.keys).expect("agent");
    bed.tail_destination();
    let events = Arc::new(Mutex::new(Vec::new()));
    let mut m = bed.migrate(&addr, &[], events.clone());
    assert!(
        wait_exit(&mut m, Duration::from_secs(300)).success(),
        "second migration failed\n{}",
        bed.logs()
    );
    eprintln!("summary: {}", summary(&events));
    let gap = bed.check_continuity();
    assert!(gap < Duration::from_secs(5), "the guest paused {gap:?}");
    bed.check_destination_disk();
}

/// Post-copy: the guest runs at the destination while its memory is still
/// arriving, fetched on demand through our link.
#[test]
fn post_copy_moves_the_guest_too() {
    let bed = Bed::new(1500);
    let (_server, mut src) = bed.start_vm(1500);
    bed.wait_beats("src", 20, Duration::from_secs(60));
    let (_agent, addr) = start_agent(&bed.sites, &bed.agent_dir, &bed.keys).expect("agent");
    bed.tail_destination();
    let events = Arc::new(Mutex::new(Vec::new()));
    // slow memory, and post-copy from the first pass on
    let mut m = bed.migrate(
        &addr,
        &["--postcopy-after", "1", "--max-rate-mbit", "200"],
        events.clone(),
    );
    assert!(
        wait_exit(&mut m, Duration::from_secs(300)).success(),
        "migration failed\n{}",
        bed.logs()
    );
    let sum = summary(&events);
    eprintln!("summary: {sum}");
    assert_eq!(sum["vm"]["postcopy"], true, "{sum}");
    assert!(wait_exit(&mut src, Duration::from_secs(30)).success());
    let gap = bed.check_continuity();
    eprintln!("guest-visible pause with post-copy: {gap:?}");
    assert!(gap < Duration::from_secs(5), "the guest paused {gap:?}");
    bed.check_destination_disk();
}
