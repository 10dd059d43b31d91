//! The VM test bed: the guest at site A on `migrator disk serve`'s export,
//! the destination agent at site B with the guest's launch file, both QEMUs'
//! consoles merged into one timeline. Used by the VM tests, the VM benchmark
//! and the demo; everything stops with its guard.

use std::io::{BufRead as _, BufReader, Read as _, Seek as _};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::bed::{keys, migrator_bin, start_source, Keys, Sites};
use crate::guest;
use crate::netns::Netns;
use crate::proc::ChildGuard;

/// Console lines, when they came, and from which QEMU (`src`, `dst`).
pub type Console = Arc<Mutex<Vec<(Instant, &'static str, String)>>>;

/// JSON events of a `migrator … --json` run.
pub type Events = Arc<Mutex<Vec<serde_json::Value>>>;

/// Two running nodes (stopped when dropped) and their directories.
pub struct Nodes {
    pub a: ChildGuard,
    pub b: ChildGuard,
    pub a_dir: PathBuf,
    pub b_dir: PathBuf,
}

pub struct VmBed {
    pub sites: Sites,
    /// One VM bed at a time on this machine (see [`qemu_slot`]).
    _slot: std::fs::File,
    pub dir: tempfile::TempDir,
    pub k: guest::GuestKernel,
    pub keys: Keys,
    /// The guest's disk at the source.
    pub image: PathBuf,
    /// The agent's directory (the destination's image, launch file, log).
    pub agent_dir: PathBuf,
    pub console: Console,
    /// The guest's kernel command line extra (its heartbeat count).
    pub append: String,
    pub net: Option<GuestNet>,
    stop: Arc<AtomicBool>,
}

/// The processes of a started bed; they stop when dropped.
pub struct Running {
    /// `migrator disk serve` at site A.
    pub server: ChildGuard,
    /// The source QEMU.
    pub src: ChildGuard,
    /// `migrator receive` at site B, and its address.
    pub agent: ChildGuard,
    pub addr: String,
}

/// What the guest is like.
#[derive(Debug, Clone)]
pub struct Guest {
    /// It halts after this many heartbeats (20 ms apart).
    pub beats: u64,
    pub disk_mib: u64,
    /// Files httpd serves.
    pub www: Vec<(String, Vec<u8>)>,
    pub net: Option<GuestNet>,
}

impl Default for Guest {
    fn default() -> Self {
        Self {
            beats: 1500,
            disk_mib: 64,
            www: Vec::new(),
            net: None,
        }
    }
}

/// The guest's network: its address, its gateway, and the tap device it
/// uses at each site (which must exist in that site's namespace).
#[derive(Debug, Clone)]
pub struct GuestNet {
    pub ip: String,
    pub gw: String,
    pub tap_a: String,
    pub tap_b: String,
}

impl Drop for VmBed {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl VmBed {
    /// A fresh guest disk, keys, the two sites (`rate_mbit` shapes their
    /// link) and the agent's launch file. The guest halts after `beats`
    /// heartbeats (20 ms apart).
    pub fn new(beats: u64, rate_mbit: Option<u32>) -> Result<VmBed> {
        Self::build(
            Sites::new(rate_mbit)?,
            &Guest {
                beats,
                ..Guest::default()
            },
        )
    }

    /// The bed on `sites`, for `guest`.
    pub fn build(sites: Sites, g: &Guest) -> Result<VmBed> {
        let slot = qemu_slot()?;
        let k = guest::kernel(&guest::cache_dir())?;
        let dir = tempfile::tempdir()?;
        let image = dir.path().join("root.img");
        let www: Vec<(&str, &[u8])> = g
            .www
            .iter()
            .map(|(n, b)| (n.as_str(), b.as_slice()))
            .collect();
        guest::rootfs(&image, g.disk_mib, &www)?;
        let keys = keys(dir.path())?;
        let agent_dir = dir.path().join("agent");
        std::fs::create_dir_all(&agent_dir)?;
        let mut append = format!("guest_beats={}", g.beats);
        if let Some(n) = &g.net {
            append += &format!(" guest_ip={} guest_gw={}", n.ip, n.gw);
        }
        // the destination QEMU: the same machine, its disk the agent's export
        let mut launch = guest::qemu_nbd_command(&k, "{disk}", "root", &append);
        if let Some(n) = &g.net {
            guest::add_tap(&mut launch, &n.tap_b);
        }
        // a human monitor too, for the state dump in failure messages
        launch.args(["-monitor", "unix:{dir}/{name}.hmp,server=on,wait=off"]);
        std::fs::write(agent_dir.join("root.qemu"), guest::launch_file(&launch))?;
        Ok(VmBed {
            _slot: slot,
            net: g.net.clone(),
            sites,
            dir,
            k,
            keys,
            image,
            agent_dir,
            console: Arc::new(Mutex::new(Vec::new())),
            append,
            stop: Arc::new(AtomicBool::new(false)),
        })
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The agent's, the disk server's and the destination QEMU's last
    /// messages, and both QEMUs' state as their monitors and threads show it.
    pub fn logs(&self) -> String {
        let mut s: String = [
            self.path("node-A.log"),
            self.path("node-B.log"),
            self.path("node-A/root.log"),
            self.path("node-B/root.log"),
            self.agent_dir.join("agent.log"),
            self.path("ctl.log"),
            self.agent_dir.join("root.log"),
            self.path("qemu-src.log"),
            self.path("qemu-dst.log"),
        ]
        .iter()
        .map(|p| {
            let text = std::fs::read_to_string(p).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(120).collect();
            format!(
                "--- {}\n{}\n",
                p.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            )
        })
        .collect();
        for hmp in [self.path("a.hmp"), self.agent_dir.join("root.hmp")] {
            s += &format!("--- {}\n", hmp.display());
            for cmd in ["info status", "info cpus", "info registers"] {
                s += &match hmp_command(&hmp, cmd) {
                    Ok(out) => out,
                    Err(e) => format!("{cmd}: {e:#}\n"),
                };
            }
        }
        s + &qemu_threads()
    }

    /// Runs `cmd` (a QEMU command line) in `ns` with a QMP socket at `qmp`,
    /// its console into the timeline as `tag`.
    pub fn spawn_qemu(
        &self,
        ns: &Netns,
        cmd: &Command,
        qmp: &Path,
        extra: &[&str],
        tag: &'static str,
    ) -> Result<ChildGuard> {
        let mut c = ns.command("qemu-system-x86_64");
        c.args(cmd.get_args())
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()))
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(crate::bed::log_file(&self.path(&format!("qemu-{tag}.log"))))
            .stdin(Stdio::null());
        let mut qemu = ChildGuard::spawn(&mut c).context("cannot start qemu-system-x86_64")?;
        let out = qemu
            .0
            .as_mut()
            .and_then(|c| c.stdout.take())
            .context("QEMU's console")?;
        let console = self.console.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if let Ok(mut c) = console.lock() {
                    c.push((Instant::now(), tag, line));
                }
            }
        });
        Ok(qemu)
    }

    /// The disk server and the source QEMU (its disk the server's export,
    /// its QMP socket `a.qmp`), at site A.
    pub fn start_vm(&self) -> Result<(ChildGuard, ChildGuard)> {
        let (sock, ctl) = (self.path("root.sock"), self.path("ctl.sock"));
        let server = start_source(&self.sites, &self.image, &sock, &ctl)?;
        let mut cmd =
            guest::qemu_nbd_command(&self.k, &sock.display().to_string(), "root", &self.append);
        if let Some(n) = &self.net {
            guest::add_tap(&mut cmd, &n.tap_a);
        }
        let hmp = format!("unix:{},server=on,wait=off", self.path("a.hmp").display());
        let qemu = self.spawn_qemu(
            &self.sites.a,
            &cmd,
            &self.path("a.qmp"),
            &["-monitor", &hmp],
            "src",
        )?;
        Ok((server, qemu))
    }

    /// The guest running at site A (heartbeats seen), the agent at site B,
    /// the destination's console followed.
    pub fn start_all(&self) -> Result<Running> {
        let (server, src) = self.start_vm()?;
        self.wait_beats("src", 20, Duration::from_secs(120))?;
        let (agent, addr) = crate::bed::start_agent(&self.sites, &self.agent_dir, &self.keys)?;
        self.tail_destination();
        Ok(Running {
            server,
            src,
            agent,
            addr,
        })
    }

    /// Follows the destination QEMU's console (its log file at the agent).
    pub fn tail_destination(&self) {
        self.tail_file(self.agent_dir.join("root.log"), "dst");
    }

    /// Follows a console written to `path` (QEMU started by an agent or a
    /// node), its lines into the timeline as `tag`.
    pub fn tail_file(&self, path: PathBuf, tag: &'static str) {
        let (console, stop) = (self.console.clone(), self.stop.clone());
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
                        if let Ok(mut c) = console.lock() {
                            c.push((Instant::now(), tag, line.trim_end().to_string()));
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
    }

    /// Two nodes (`migrator node run`): `A` in site A with the guest's image
    /// and `B` in site B, each with the guest's launch file, peers of each
    /// other; node A boots the guest. Their QEMUs' consoles are followed as
    /// `A` and `B`.
    pub fn start_nodes(&self) -> Result<Nodes> {
        self.start_nodes_with(None)
    }

    /// [`VmBed::start_nodes`], node B with `fail_b` armed (a failpoint that
    /// kills it: `MIGRATOR_FAILPOINTS`).
    pub fn start_nodes_with(&self, fail_b: Option<&str>) -> Result<Nodes> {
        let launch = std::fs::read_to_string(self.agent_dir.join("root.qemu"))?;
        let ips = [crate::bed::A_IP, crate::bed::B_IP];
        let key_dirs = [&self.keys.src_dir, &self.keys.dst_dir];
        let fps = [&self.keys.src_fp, &self.keys.dst_fp];
        let mut procs = Vec::new();
        for (i, name) in ["A", "B"].into_iter().enumerate() {
            let peer = ["B", "A"][i];
            let dir = self.path(&format!("node-{name}"));
            std::fs::create_dir_all(&dir)?;
            std::fs::write(dir.join("root.qemu"), &launch)?;
            if name == "A" {
                std::fs::copy(&self.image, dir.join("root.img"))?;
            }
            std::fs::write(
                self.path(&format!("node-{name}.toml")),
                format!(
                    "name = \"{name}\"\ndir = \"{}\"\nlisten = \"{}:7800\"\nidentity = \"{}\"\ncontrol = \"{}\"\n\n[peer.{peer}]\naddr = \"{}:7800\"\nfingerprint = \"{}\"\n",
                    dir.display(),
                    ips[i],
                    key_dirs[i].display(),
                    self.path(&format!("{name}.ctl")).display(),
                    ips[1 - i],
                    fps[1 - i],
                ),
            )?;
            procs.push(self.spawn_node(name, if name == "B" { fail_b } else { None })?);
        }
        let (a_dir, b_dir) = (self.path("node-A"), self.path("node-B"));
        self.tail_file(a_dir.join("root.log"), "A");
        self.tail_file(b_dir.join("root.log"), "B");
        let mut it = procs.into_iter();
        let (Some(a), Some(b)) = (it.next(), it.next()) else {
            bail!("two nodes")
        };
        Ok(Nodes { a, b, a_dir, b_dir })
    }

    /// `migrator node run` for node `name` (`A` or `B`) in its site, with
    /// `failpoint` armed; returns once it listens.
    pub fn spawn_node(&self, name: &str, failpoint: Option<&str>) -> Result<ChildGuard> {
        let ns = if name == "A" {
            &self.sites.a
        } else {
            &self.sites.b
        };
        let log = self.path(&format!("node-{name}.log"));
        let mut c = ns.command(migrator_bin().to_str().unwrap_or("migrator"));
        c.args(["node", "run", "--config"])
            .arg(self.path(&format!("node-{name}.toml")))
            .stdout(Stdio::piped())
            .stderr(crate::bed::log_file(&log));
        if let Some(f) = failpoint {
            c.env("MIGRATOR_FAILPOINTS", format!("{f}:kill"));
        }
        crate::bed::spawn_listening(&mut c, &format!("node {name}"))
            .map(|(g, _)| g)
            .with_context(|| std::fs::read_to_string(&log).unwrap_or_default())
    }

    /// `migrator node migrate root --to TO` at node `from`, with `--json`;
    /// returns its events once it exits.
    pub fn node_migrate(
        &self,
        from: &str,
        to: &str,
        extra: &[&str],
    ) -> Result<Vec<serde_json::Value>> {
        let events: Events = Arc::new(Mutex::new(Vec::new()));
        let mut c = Command::new(migrator_bin());
        c.args(["node", "migrate", "root", "--to", to, "--json", "--node"])
            .arg(self.path(&format!("{from}.ctl")))
            .args(extra);
        let (mut g, reader) = spawn_json(c, events.clone())?;
        let st = wait_exit(&mut g, Duration::from_secs(300))?;
        let _ = reader.join();
        let events = events.lock().map(|e| e.clone()).unwrap_or_default();
        if !st.success() {
            bail!("{from} -> {to} failed: {events:?}\n{}", self.logs());
        }
        Ok(events)
    }

    /// Every switch of the guest's console from one QEMU to another (in the
    /// order seen) went on exactly where it stopped: no heartbeat replayed or
    /// skipped (one may be missing, printed but not yet written out when the
    /// old QEMU quit). Returns each switch's pause (last heartbeat there to
    /// first here) and the largest heartbeat gap overall.
    pub fn continuity_across(&self) -> Result<(Vec<Duration>, Duration)> {
        let beats: Vec<(Instant, &'static str, u64)> = self
            .lines()
            .into_iter()
            .filter_map(|(t, tag, l)| beat(&l).map(|b| (t, tag, b)))
            .collect();
        let mut switches = Vec::new();
        for w in beats.windows(2) {
            let ((i0, t0, b0), (i1, t1, b1)) = (w[0], w[1]);
            if t0 != t1 {
                switches.push(i1.duration_since(i0));
                if !(b1 <= b0 + 2 && b1 + 1 >= b0) {
                    bail!("{t0} ended at heartbeat {b0}, {t1} began at {b1}");
                }
            }
        }
        let gap = beats
            .windows(2)
            .map(|w| w[1].0.duration_since(w[0].0))
            .max()
            .unwrap_or_default();
        Ok((switches, gap))
    }

    /// `migrator disk migrate --qmp …` of the guest to the agent at `addr`.
    pub fn migrate_command(&self, addr: &str, extra: &[&str]) -> Command {
        let mut c = Command::new(migrator_bin());
        c.args(["disk", "migrate", "--control"])
            .arg(self.path("ctl.sock"))
            .args(["--to", addr, "--identity"])
            .arg(&self.keys.src_dir)
            .args(["--peer", &self.keys.dst_fp, "--qmp"])
            .arg(self.path("a.qmp"))
            .args(extra);
        c
    }

    /// [`VmBed::migrate_command`] with `--json`; its events arrive in `events`.
    pub fn migrate(&self, addr: &str, extra: &[&str], events: Events) -> Result<ChildGuard> {
        let mut c = self.migrate_command(addr, extra);
        c.arg("--json");
        spawn_json(c, events).map(|(g, _)| g)
    }

    pub fn lines(&self) -> Vec<(Instant, &'static str, String)> {
        self.console.lock().map(|c| c.clone()).unwrap_or_default()
    }

    /// The highest heartbeat `tag` printed.
    pub fn last_beat(&self, tag: &str) -> u64 {
        self.lines()
            .iter()
            .filter(|(_, t, _)| *t == tag)
            .filter_map(|(_, _, l)| beat(l))
            .max()
            .unwrap_or(0)
    }

    /// Waits until the guest at `tag` has printed more than `n` heartbeats.
    pub fn wait_beats(&self, tag: &str, n: u64, within: Duration) -> Result<()> {
        let t = Instant::now();
        while self.last_beat(tag) <= n {
            crate::interrupt::check()?;
            if t.elapsed() > within {
                bail!("{tag}: no heartbeat {n} within {within:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Waits for a console line from `tag` ending in `suffix`.
    pub fn wait_line(&self, tag: &str, suffix: &str, within: Duration) -> Result<()> {
        let t = Instant::now();
        while !self
            .lines()
            .iter()
            .any(|(_, t, l)| *t == tag && l.ends_with(suffix))
        {
            crate::interrupt::check()?;
            if t.elapsed() > within {
                bail!("{tag} never printed {suffix:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// Checks the guest continued at the destination exactly where the
    /// source stopped (no heartbeat replayed or skipped); returns the largest
    /// gap between consecutive heartbeats: the pause as the guest saw it.
    pub fn continuity(&self) -> Result<Duration> {
        let last_src = self.last_beat("src");
        self.wait_beats("dst", last_src + 50, Duration::from_secs(60))?;
        let c = self.lines();
        let first_dst = c
            .iter()
            .filter(|(_, tag, _)| *tag == "dst")
            .find_map(|(_, _, l)| beat(l))
            .context("no heartbeat from the destination")?;
        // The destination goes on from the next heartbeat. One line may be
        // missing from the source's console: printed into QEMU's character
        // device there but not yet written out when that QEMU quit.
        if !(first_dst <= last_src + 2 && first_dst + 1 >= last_src) {
            bail!("src ended at heartbeat {last_src}, dst began at {first_dst}");
        }
        let beats: Vec<Instant> = c
            .iter()
            .filter(|(_, _, l)| beat(l).is_some())
            .map(|(t, _, _)| *t)
            .collect();
        Ok(beats
            .windows(2)
            .map(|w| w[1].duration_since(w[0]))
            .max()
            .unwrap_or_default())
    }

    /// After the guest halts at the destination: the writer's log on `image`
    /// is whole (no gap, no duplicate) and the filesystem clean.
    pub fn check_disk_after_halt(&self, image: &Path) -> Result<usize> {
        self.wait_line("dst", "guest halted", Duration::from_secs(180))?;
        std::thread::sleep(Duration::from_millis(500));
        let lines = guest::check_writer_log(image)?;
        guest::fsck_clean(image)?;
        Ok(lines)
    }
}

/// Waits for the machine's one VM-bed slot (an exclusive `flock`, released
/// when the file closes, also if the process dies). Two TCG guests migrating
/// at once on a 2-core machine starve each other until their kernels report
/// lockups and their timing-based checks fail; the tests run in parallel
/// processes, so the slot is a lock file.
pub fn qemu_slot() -> Result<std::fs::File> {
    use std::os::fd::AsRawFd as _;
    let path = std::env::temp_dir().join("migrator-vm-bed.lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    loop {
        // SAFETY: a valid descriptor; LOCK_NB keeps us able to check Ctrl-C.
        let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 {
            return Ok(f);
        }
        crate::interrupt::check()?;
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// One human-monitor command's output (a few seconds at most: a QEMU whose
/// main loop is stuck does not answer, which is worth knowing too).
fn hmp_command(path: &Path, cmd: &str) -> Result<String> {
    use std::io::Write as _;
    let mut s = std::os::unix::net::UnixStream::connect(path)
        .with_context(|| format!("cannot connect to {}", path.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    s.write_all(format!("{cmd}\n").as_bytes())?;
    let (mut out, mut buf, t) = (Vec::new(), [0u8; 4096], Instant::now());
    // the answer ends with the next prompt after the echoed command
    while t.elapsed() < Duration::from_secs(3) {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) => bail!(
                "{cmd}: no answer ({e}) after {:?}",
                String::from_utf8_lossy(&out)
            ),
        }
        let text = String::from_utf8_lossy(&out);
        if text.matches("(qemu)").count() >= 2 {
            break;
        }
    }
    Ok(String::from_utf8_lossy(&out).replace('\r', ""))
}

/// Every QEMU thread's name, state and kernel wait channel.
fn qemu_threads() -> String {
    let mut out = String::from("--- QEMU threads (pid/tid name state wchan)\n");
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.filter_map(|e| e.ok()) {
        let comm = std::fs::read_to_string(p.path().join("comm")).unwrap_or_default();
        if !comm.starts_with("qemu-system") {
            continue;
        }
        let Ok(tasks) = std::fs::read_dir(p.path().join("task")) else {
            continue;
        };
        for t in tasks.filter_map(|e| e.ok()) {
            let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
            // pid (comm) state ...: the name may hold spaces, so split at ')'
            let (name, rest) = stat.rsplit_once(')').unwrap_or(("", ""));
            let name = name.split_once('(').map(|(_, n)| n).unwrap_or("");
            let state = rest.split_whitespace().next().unwrap_or("?");
            let wchan = std::fs::read_to_string(t.path().join("wchan")).unwrap_or_default();
            out += &format!(
                "{}/{} {name} {state} {wchan}\n",
                p.file_name().to_string_lossy(),
                t.file_name().to_string_lossy()
            );
        }
    }
    out
}

/// The heartbeat number in a console line.
/// Runs a `migrator … --json` command; its events arrive in `events` (the
/// thread reading them ends with its stdout).
fn spawn_json(mut c: Command, events: Events) -> Result<(ChildGuard, std::thread::JoinHandle<()>)> {
    c.stdout(Stdio::piped()).stderr(Stdio::inherit());
    let mut g = ChildGuard::spawn(&mut c)?;
    let out =
        g.0.as_mut()
            .and_then(|c| c.stdout.take())
            .context("migrate's stdout")?;
    Ok((g, std::thread::spawn(move || read_events(out, &events))))
}

pub fn beat(line: &str) -> Option<u64> {
    line.rsplit_once("heartbeat ")
        .and_then(|(_, n)| n.trim().parse().ok())
}

/// Waits for the child to exit.
pub fn wait_exit(g: &mut ChildGuard, within: Duration) -> Result<ExitStatus> {
    let t = Instant::now();
    loop {
        if let Some(st) = g.0.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
            return Ok(st);
        }
        crate::interrupt::check()?;
        if t.elapsed() > within {
            bail!("process still running after {within:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Collects the JSON lines of a `--json` run's stdout into `events`, then
/// an `{"event": "eof"}` of its own once the output has ended.
pub fn read_events(out: impl std::io::Read, events: &Mutex<Vec<serde_json::Value>>) {
    for line in BufReader::new(out).lines() {
        let Ok(line) = line else { break };
        if let (Ok(v), Ok(mut e)) = (serde_json::from_str(&line), events.lock()) {
            e.push(v);
        }
    }
    if let Ok(mut e) = events.lock() {
        e.push(serde_json::json!({"event": "eof"}));
    }
}

/// The first event named `name`, waiting for it: the process may have
/// exited while its last lines are still being read. Fails once the output
/// has ended without one, or after `within`.
pub fn wait_event(
    events: &Mutex<Vec<serde_json::Value>>,
    name: &str,
    within: Duration,
) -> Result<serde_json::Value> {
    let t = Instant::now();
    loop {
        let e = events.lock().map(|e| e.clone()).unwrap_or_default();
        if let Some(v) = e.iter().find(|e| e["event"] == name) {
            return Ok(v.clone());
        }
        if e.iter().any(|e| e["event"] == "eof") || t.elapsed() > within {
            bail!("no {name} in {e:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The `summary` event of a `--json` run.
pub fn summary(events: &Events) -> Result<serde_json::Value> {
    wait_event(events, "summary", Duration::from_secs(30))
}
