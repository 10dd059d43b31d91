//! The storage test bed: two sites (network namespaces) joined by a veth link
//! rate-limited with `tc tbf`, a source disk server in site A, a destination
//! agent in site B, and a guest-like writer over NBD. Used by the demo and the
//! benchmark; everything is torn down by Drop guards.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

use crate::netns::{run, unique, veth, Netns};
use crate::proc::ChildGuard;

pub const A_IP: &str = "10.77.0.1";
pub const B_IP: &str = "10.77.0.2";

pub struct Sites {
    pub a: Netns,
    pub b: Netns,
    /// Each site's interface towards the other (its tx counter is the link's use).
    pub a_dev: String,
    pub b_dev: String,
    /// Site B's address that site A reaches (the agent listens there).
    pub b_ip: String,
}

impl Sites {
    /// Two namespaces with a veth pair; `rate_mbit` shapes both directions.
    pub fn new(rate_mbit: Option<u32>) -> Result<Self> {
        let a = Netns::new(unique("sa"))?;
        let b = Netns::new(unique("sb"))?;
        let (a_dev, b_dev) = veth(&a, &format!("{A_IP}/24"), &b, &format!("{B_IP}/24"))?;
        if let Some(r) = rate_mbit {
            for (ns, dev) in [(&a, &a_dev), (&b, &b_dev)] {
                tbf(ns, dev, r, 50)?;
            }
        }
        Ok(Self {
            a,
            b,
            a_dev,
            b_dev,
            b_ip: B_IP.to_string(),
        })
    }

    /// Bytes sent from site A into the link (everything: TCP, TLS, frames).
    pub fn a_tx_bytes(&self) -> Result<u64> {
        tx_bytes(&self.a, &self.a_dev)
    }

    /// Site B's interface towards A: what B sent.
    pub fn b_tx_bytes(&self) -> Result<u64> {
        tx_bytes(&self.b, &self.b_dev)
    }
}

fn tx_bytes(ns: &Netns, dev: &str) -> Result<u64> {
    let out = ns
        .command("cat")
        .arg(format!("/sys/class/net/{dev}/statistics/tx_bytes"))
        .output()?;
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .context("tx_bytes")
}

/// A sparse image with `data` bytes of random content in `pieces` extents spread
/// over the disk; the rest are holes.
pub fn make_image(path: &Path, size: u64, data: u64, pieces: u64, seed: u64) -> Result<()> {
    let f = std::fs::File::create(path).with_context(|| format!("create {}", path.display()))?;
    f.set_len(size)?;
    let mut rng = StdRng::seed_from_u64(seed);
    let piece = data / pieces;
    let stride = size / pieces;
    let mut buf = vec![0u8; 1 << 20];
    use std::os::unix::fs::FileExt;
    for i in 0..pieces {
        let mut off = i * stride;
        let end = off + piece;
        while off < end {
            let n = ((end - off) as usize).min(buf.len());
            rng.fill_bytes(&mut buf[..n]);
            f.write_all_at(&buf[..n], off)?;
            off += n as u64;
        }
    }
    f.sync_all()?;
    Ok(())
}

pub fn hash_file(path: &Path) -> Result<String> {
    let mut h = blake3::Hasher::new();
    h.update_mmap(path)
        .with_context(|| format!("hash {}", path.display()))?;
    Ok(h.finalize().to_hex().to_string())
}

pub fn migrator_bin() -> PathBuf {
    workspace_bin("migrator")
}

/// A binary of the workspace, in target/<profile>/ as cargo builds it: next
/// to a bench binary, one up from a test binary (in deps/).
pub fn workspace_bin(name: &str) -> PathBuf {
    let me = std::env::current_exe().unwrap_or_default();
    let mut dir = me.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir.join(name)
}

#[derive(Clone)]
pub struct Keys {
    pub src_dir: PathBuf,
    pub dst_dir: PathBuf,
    pub src_fp: String,
    pub dst_fp: String,
}

/// `migrator keygen --dir DIR`: a key pair there; its fingerprint.
pub fn keygen(d: &Path) -> Result<String> {
    let out = Command::new(migrator_bin())
        .args(["keygen", "--dir"])
        .arg(d)
        .output()?;
    if !out.status.success() {
        bail!("keygen failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

pub fn keys(dir: &Path) -> Result<Keys> {
    let gen = keygen;
    let (src_dir, dst_dir) = (dir.join("keys-src"), dir.join("keys-dst"));
    Ok(Keys {
        src_fp: gen(&src_dir)?,
        dst_fp: gen(&dst_dir)?,
        src_dir,
        dst_dir,
    })
}

/// `migrator receive` in site B; returns once it listens.
pub fn start_agent(sites: &Sites, dir: &Path, k: &Keys) -> Result<(ChildGuard, String)> {
    std::fs::create_dir_all(dir)?;
    let mut c = sites
        .b
        .command(migrator_bin().to_str().unwrap_or("migrator"));
    c.args([
        "receive",
        "--listen",
        &format!("{}:7800", sites.b_ip),
        "--dir",
    ])
    .arg(dir)
    .arg("--identity")
    .arg(&k.dst_dir)
    .args(["--peer", &k.src_fp])
    .stdout(Stdio::piped())
    .stderr(log_file(&dir.join("agent.log")));
    spawn_listening(&mut c, "the agent")
}

/// Spawns `c` (a `migrator` that prints `listening on ADDR` first, its
/// stdout piped) and returns it with that address, once it listens.
pub fn spawn_listening(c: &mut Command, what: &str) -> Result<(ChildGuard, String)> {
    let mut g = ChildGuard::spawn(c)?;
    let out =
        g.0.as_mut()
            .and_then(|c| c.stdout.take())
            .with_context(|| format!("{what}'s stdout"))?;
    let mut line = String::new();
    BufReader::new(out).read_line(&mut line)?;
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .with_context(|| format!("{what} did not start"))?
        .to_string();
    Ok((g, addr))
}

/// `migrator disk serve` in site A with NBD and control sockets.
pub fn start_source(sites: &Sites, image: &Path, sock: &Path, ctl: &Path) -> Result<ChildGuard> {
    let mut c = sites
        .a
        .command(migrator_bin().to_str().unwrap_or("migrator"));
    c.args(["disk", "serve", "--image"])
        .arg(image)
        .arg("--socket")
        .arg(sock)
        .arg("--control")
        .arg(ctl)
        .stderr(log_file(&ctl.with_extension("log")));
    let g = ChildGuard::spawn(&mut c)?;
    let t = Instant::now();
    while !(sock.exists() && ctl.exists()) {
        if t.elapsed() > Duration::from_secs(10) {
            bail!("disk server did not start");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(g)
}

/// A guest-like writer: 64 KiB random writes at `bytes_per_s` into the first
/// `span` bytes, until the source refuses writes (moved) or `stop` is set.
/// Returns the bytes written.
pub async fn writer(
    sock: PathBuf,
    bytes_per_s: u64,
    span: u64,
    seed: u64,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Result<u64> {
    use migrator::nbd::client::{Client, ClientError};
    let s = tokio::net::UnixStream::connect(&sock).await?;
    let mut c = Client::connect(s, "").await?;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut data = vec![0u8; 64 * 1024];
    let interval = Duration::from_secs_f64(data.len() as f64 / bytes_per_s as f64);
    let mut next = tokio::time::Instant::now();
    let mut written = 0;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        rng.fill_bytes(&mut data);
        let off = rng.gen_range(0..span / 4096 - 16) * 4096;
        match c.write(off, &data, false).await {
            Ok(()) => written += data.len() as u64,
            Err(ClientError::Server { code: 1, .. }) => break,
            Err(e) => return Err(e.into()),
        }
        next += interval;
        tokio::time::sleep_until(next).await;
    }
    Ok(written)
}

/// Run `migrator disk migrate --control` and return its summary (JSON).
pub fn migrate(
    ctl: &Path,
    addr: &str,
    k: &Keys,
    json: bool,
    extra: &[&str],
) -> Result<Option<serde_json::Value>> {
    let mut c = Command::new(migrator_bin());
    c.args(["disk", "migrate", "--control"])
        .arg(ctl)
        .args(["--to", addr, "--identity"])
        .arg(&k.src_dir)
        .args(["--peer", &k.dst_fp])
        .args(extra);
    if !json {
        let st = c.status()?;
        if !st.success() {
            bail!("migration failed");
        }
        return Ok(None);
    }
    let out = c.arg("--json").stderr(Stdio::inherit()).output()?;
    if !out.status.success() {
        bail!("migration failed: {}", String::from_utf8_lossy(&out.stdout));
    }
    for l in String::from_utf8_lossy(&out.stdout).lines() {
        let v: serde_json::Value = serde_json::from_str(l)?;
        if v["event"] == "summary" {
            return Ok(Some(v));
        }
    }
    bail!("no summary in the migration's output")
}

/// Appends a process's messages to `path` (nowhere if it cannot be opened).
pub fn log_file(path: &Path) -> Stdio {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map(Stdio::from)
        .unwrap_or_else(|_| Stdio::null())
}

/// Shapes `dev`'s egress in `ns` to `mbit` with `tc tbf` (64 KiB burst,
/// `latency_ms` of queue).
pub fn tbf(ns: &Netns, dev: &str, mbit: u32, latency_ms: u32) -> Result<()> {
    ns.exec(&[
        "tc",
        "qdisc",
        "add",
        "dev",
        dev,
        "root",
        "tbf",
        "rate",
        &format!("{mbit}mbit"),
        "burst",
        "64kb",
        "latency",
        &format!("{latency_ms}ms"),
    ])
}

pub fn require_root() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("this needs root (network namespaces and tc): run it with sudo");
    }
    run(&["ip", "netns", "list"]).context("iproute2 is missing: apt-get install iproute2")
}

/// This machine's CPU model, for benchmark reports.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default()
}
