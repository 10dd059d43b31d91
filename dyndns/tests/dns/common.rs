//! Fixtures: our server as a child process, a real BIND 9 `named`, and the
//! standard tools (dig, nsupdate). All on 127.0.0.1, on ports the OS picks.

use std::io::{BufRead as _, BufReader};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use dyndns::TsigKey;

pub const ZONE: &str = "example.test.";

pub fn zone_text(serial: u32) -> String {
    format!(
        "$ORIGIN example.test.
$TTL 300
@   IN SOA ns1.example.test. hostmaster.example.test. ( {serial} 3600 600 86400 60 )
    IN NS  ns1.example.test.
ns1 IN A   127.0.0.1
web IN A   10.1.0.10
    IN AAAA fd00:1::10
"
    )
}

/// Kills (SIGKILL) and reaps the child when dropped.
pub struct ChildGuard(Option<Child>);

impl ChildGuard {
    pub fn kill(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn require_tool(tool: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
        || Path::new("/usr/sbin").join(tool).is_file();
    assert!(
        found,
        "{tool} is not installed: run `sudo bash tests/install-deps.sh` (Debian packages bind9, bind9-dnsutils, dnsperf)"
    );
}

pub fn key() -> TsigKey {
    TsigKey::generate("mig-key").expect("key")
}

/// A port free for both UDP and TCP on 127.0.0.1 (for named, which cannot
/// be told to pick one and report it).
pub fn free_port() -> u16 {
    for _ in 0..50 {
        let udp = UdpSocket::bind("127.0.0.1:0").expect("bind udp");
        let port = udp.local_addr().expect("addr").port();
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port on 127.0.0.1");
}

/// Our server, `dyndns serve`, as a child process.
pub struct Ours {
    pub addr: SocketAddr,
    child: ChildGuard,
}

impl Ours {
    /// Writes zone + config into `dir` (unless present) and starts the server.
    pub fn start(dir: &Path, key: &TsigKey, extra_zone_config: &str) -> Self {
        let zone_file = dir.join("example.test.zone");
        if !zone_file.exists() {
            std::fs::write(&zone_file, zone_text(1)).expect("write zone");
        }
        let config = format!(
            "listen = [\"127.0.0.1:0\"]\n\
             [[key]]\nname = \"{}\"\nsecret = \"{}\"\n\
             [[zone]]\norigin = \"{ZONE}\"\nfile = \"example.test.zone\"\n{extra_zone_config}\n",
            key.display_name(),
            key.secret_base64()
        );
        std::fs::write(dir.join("dyndns.toml"), config).expect("write config");
        Self::restart(dir)
    }

    /// Starts the server on the config already in `dir`; its log goes to
    /// `dir/server.log` (shown if it does not start).
    pub fn restart(dir: &Path) -> Self {
        let log_path = dir.join("server.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .expect("server log");
        let mut child = Command::new(env!("CARGO_BIN_EXE_dyndns"))
            .args(["serve", "--config"])
            .arg(dir.join("dyndns.toml"))
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info,hickory_server=error".into()),
            )
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn dyndns serve");
        let stdout = child.stdout.take().expect("stdout");
        let guard = ChildGuard(Some(child));
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read stdout");
        let Some(addr) = line.trim().strip_prefix("listening on ") else {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            panic!("dyndns serve did not start (stdout {line:?}); its log:\n{log}");
        };
        Self {
            addr: addr.parse().expect("addr"),
            child: guard,
        }
    }

    /// `kill -9`.
    pub fn kill9(mut self) {
        self.child.kill();
    }
}

/// A real BIND 9 primary for example.test with a dynamic zone and our key.
pub struct Named {
    pub addr: SocketAddr,
    _child: ChildGuard,
}

impl Named {
    pub fn start(dir: &Path, key: &TsigKey, zones: &str) -> Self {
        Self::start_on(dir, key, zones, free_port())
    }

    /// Starts named on `port`; returns once it serves example.test.
    pub fn start_on(dir: &Path, key: &TsigKey, zones: &str, port: u16) -> Self {
        require_tool("named");
        let conf = format!(
            "options {{
  directory \"{dir}\";
  pid-file none;
  session-keyfile none;
  listen-on port {port} {{ 127.0.0.1; }};
  listen-on-v6 {{ none; }};
  recursion no;
  dnssec-validation no;
  notify no;
}};
controls {{ }};
{key}
{zones}
",
            dir = dir.display(),
            key = key.bind_clause(),
        );
        let conf_path = dir.join("named.conf");
        std::fs::write(&conf_path, conf).expect("write named.conf");
        let log = std::fs::File::create(dir.join("named.log")).expect("log");
        let child = Command::new("named")
            .args(["-g", "-4", "-c"])
            .arg(&conf_path)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn named");
        let guard = ChildGuard(Some(child));
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out = dig(addr, &["example.test.", "SOA", "+short"]);
            if out.contains("hostmaster") {
                break;
            }
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(dir.join("named.log")).unwrap_or_default();
                panic!("named did not start serving example.test within 20 s; its log:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Self {
            addr,
            _child: guard,
        }
    }

    /// A primary zone that `key` may update.
    pub fn primary_zone(dir: &Path, key: &TsigKey) -> String {
        std::fs::write(dir.join("example.test.zone"), zone_text(1)).expect("write zone");
        format!(
            "zone \"example.test\" {{ type primary; file \"{}\"; allow-update {{ key \"{}\"; }}; }};",
            dir.join("example.test.zone").display(),
            key.display_name()
        )
    }
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// `dig @addr -p port ARGS +time=2 +tries=2`; returns stdout.
pub fn dig(addr: SocketAddr, args: &[&str]) -> String {
    require_tool("dig");
    let out = run(Command::new("dig")
        .arg(format!("@{}", addr.ip()))
        .args([
            "-p",
            &addr.port().to_string(),
            "+time=2",
            "+tries=2",
            "+norecurse",
        ])
        .args(args));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `dig +short` answers, sorted.
pub fn dig_short(addr: SocketAddr, name: &str, rtype: &str) -> Vec<String> {
    let mut v: Vec<String> = dig(addr, &[name, rtype, "+short"])
        .lines()
        .map(str::to_string)
        .filter(|l| !l.is_empty() && !l.starts_with(';'))
        .collect();
    v.sort();
    v
}

pub fn dig_status(addr: SocketAddr, name: &str, rtype: &str) -> String {
    let out = dig(addr, &[name, rtype]);
    out.split("status: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap_or_else(|| panic!("no status in dig output:\n{out}"))
        .to_string()
}

pub fn dig_ttl(addr: SocketAddr, name: &str, rtype: &str) -> Option<u32> {
    dig(addr, &[name, rtype, "+noall", "+answer"])
        .lines()
        .find_map(|l| l.split_whitespace().nth(1)?.parse().ok())
}

pub fn serial(addr: SocketAddr) -> u32 {
    dig_short(addr, ZONE, "SOA")
        .first()
        .and_then(|l| l.split_whitespace().nth(2)?.parse().ok())
        .expect("SOA serial")
}

/// Runs nsupdate with `script` (server/zone lines are added); returns
/// (success, stderr).
pub fn nsupdate(addr: SocketAddr, key: Option<&str>, script: &str) -> (bool, String) {
    nsupdate_zone(addr, key, ZONE, script)
}

pub fn nsupdate_zone(
    addr: SocketAddr,
    key: Option<&str>,
    zone: &str,
    script: &str,
) -> (bool, String) {
    require_tool("nsupdate");
    let full = format!(
        "server {} {}\nzone {zone}\n{script}\nsend\n",
        addr.ip(),
        addr.port()
    );
    let mut cmd = Command::new("nsupdate");
    cmd.args(["-t", "5"]);
    if let Some(k) = key {
        cmd.args(["-y", k]);
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn nsupdate");
    use std::io::Write as _;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(full.as_bytes())
        .expect("write script");
    let out = child.wait_with_output().expect("nsupdate");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Polls `check` until true or the deadline; returns whether it became true.
pub fn eventually(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if check() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
