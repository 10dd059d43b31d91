//! Network namespaces as test hosts, removed (with their processes) on drop.

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{bail, Context, Result};

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A unique prefix for this process's namespaces and links.
pub fn unique(tag: &str) -> String {
    format!(
        "m{}{}{}",
        tag,
        std::process::id() % 100_000,
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

pub fn run(args: &[&str]) -> Result<()> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {}", args[0]))?;
    if !out.status.success() {
        bail!(
            "{} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: String) -> Result<Self> {
        run(&["ip", "netns", "add", &name])?;
        let ns = Self { name };
        ns.exec(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Run a command inside the namespace and wait for it.
    pub fn exec(&self, args: &[&str]) -> Result<()> {
        let mut v = vec!["ip", "netns", "exec", &self.name];
        v.extend_from_slice(args);
        run(&v)
    }

    /// A `Command` that runs `program` inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Kill whatever still runs inside, then delete the namespace.
        if let Ok(out) = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
        {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-9", pid]).status();
            }
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Connect two namespaces with a veth pair and addresses `a_addr`/`b_addr` (CIDR).
pub fn veth(a: &Netns, a_addr: &str, b: &Netns, b_addr: &str) -> Result<(String, String)> {
    let base = unique("v");
    let (ea, eb) = (format!("{base}a"), format!("{base}b"));
    run(&[
        "ip", "link", "add", &ea, "netns", &a.name, "type", "veth", "peer", "name", &eb, "netns",
        &b.name,
    ])?;
    a.exec(&["ip", "addr", "add", a_addr, "dev", &ea])?;
    b.exec(&["ip", "addr", "add", b_addr, "dev", &eb])?;
    a.exec(&["ip", "link", "set", &ea, "up"])?;
    b.exec(&["ip", "link", "set", &eb, "up"])?;
    Ok((ea, eb))
}

/// True when this process may create namespaces (root with iproute2).
pub fn available() -> bool {
    let name = unique("probe");
    match Netns::new(name) {
        Ok(_ns) => true,
        Err(_) => false,
    }
}

/// Runs `f` on a thread that has entered namespace `ns`: the sockets it
/// creates belong to that namespace, also when used from other threads.
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    use std::os::fd::AsRawFd as _;
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || -> Result<T> {
        let file = std::fs::File::open(&path).with_context(|| format!("cannot open {path}"))?;
        // SAFETY: a valid fd of a network namespace; setns changes only this thread.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        if rc != 0 {
            bail!("setns({path}) failed: {}", std::io::Error::last_os_error());
        }
        Ok(f())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("thread in namespace {ns} panicked"))?
}

/// Runs the future `f` makes to completion on a single-threaded runtime in
/// namespace `ns` (sockets it opens live there).
pub fn block_on_in<F, Fut>(ns: &str, f: F) -> Result<Fut::Output>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future,
    Fut::Output: Send + 'static,
{
    in_netns(ns, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(rt.block_on(f()))
    })?
}
