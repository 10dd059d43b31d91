//! DNS benchmark: our authoritative server next to BIND 9 on the same zone,
//! same machine, same load generator (dnsperf). Query throughput for two
//! workloads, and update-to-visible latency. Writes bench/results/dns.md.
//!
//! `target/release/bench-dns [--seconds 8 --rounds 3 --updates 300]`
//! (needs bind9 and dnsperf: `sudo bash tests/install-deps.sh`; build the
//! `dyndns` binary first: `cargo build --release -p dyndns -p tests`)

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use dyndns::client::Client;
use dyndns::TsigKey;
use hickory_proto::op::UpdateMessage as _;
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use tests::proc::ChildGuard;

#[derive(Parser)]
struct Args {
    /// Seconds per dnsperf run.
    #[arg(long, default_value_t = 8)]
    seconds: u32,
    /// dnsperf runs per server and workload (alternating); the median is reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Updates timed per server.
    #[arg(long, default_value_t = 300)]
    updates: usize,
    #[arg(long, default_value = "bench/results/dns.md")]
    out: PathBuf,
}

const HOSTS: usize = 1000;

fn zone_text() -> String {
    let mut z = String::from(
        "$ORIGIN example.test.\n$TTL 300\n@ IN SOA ns1.example.test. hostmaster.example.test. ( 1 3600 600 86400 60 )\n  IN NS ns1.example.test.\nns1 IN A 127.0.0.1\nweb IN A 10.1.0.10\n    IN AAAA fd00:1::10\n",
    );
    for i in 0..HOSTS {
        z.push_str(&format!("h{i} IN A 10.8.{}.{}\n", i / 250, i % 250 + 1));
    }
    z
}

fn free_port() -> Result<u16> {
    for _ in 0..50 {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0")?;
        let port = udp.local_addr()?.port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free port on 127.0.0.1")
}

fn start_ours(dir: &Path, key: &TsigKey) -> Result<(ChildGuard, SocketAddr)> {
    let exe = std::env::current_exe()?;
    let bin = exe.with_file_name("dyndns");
    if !bin.exists() {
        bail!(
            "{} not found: build it first (cargo build --release -p dyndns)",
            bin.display()
        );
    }
    std::fs::write(dir.join("example.test.zone"), zone_text())?;
    std::fs::write(
        dir.join("dyndns.toml"),
        format!(
            "listen = [\"127.0.0.1:0\"]\n[[key]]\nname = \"{}\"\nsecret = \"{}\"\n[[zone]]\norigin = \"example.test.\"\nfile = \"example.test.zone\"\n",
            key.display_name(),
            key.secret_base64()
        ),
    )?;
    let mut child = Command::new(&bin)
        .args(["serve", "--config"])
        .arg(dir.join("dyndns.toml"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    let stdout = child.stdout.take().context("stdout")?;
    let guard = ChildGuard(Some(child));
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .with_context(|| format!("dyndns did not start: {line:?}"))?
        .parse()?;
    Ok((guard, addr))
}

fn start_named(dir: &Path, key: &TsigKey) -> Result<(ChildGuard, SocketAddr)> {
    std::fs::write(dir.join("example.test.zone"), zone_text())?;
    let port = free_port()?;
    let conf = format!(
        "options {{ directory \"{d}\"; pid-file none; session-keyfile none; listen-on port {port} {{ 127.0.0.1; }}; listen-on-v6 {{ none; }}; recursion no; dnssec-validation no; notify no; minimal-responses yes; }};\ncontrols {{ }};\n{k}\nzone \"example.test\" {{ type primary; file \"{d}/example.test.zone\"; allow-update {{ key \"{n}\"; }}; }};\n",
        d = dir.display(),
        k = key.bind_clause(),
        n = key.display_name()
    );
    std::fs::write(dir.join("named.conf"), conf)?;
    let log = std::fs::File::create(dir.join("named.log"))?;
    let child = Command::new("named")
        .args(["-g", "-4", "-c"])
        .arg(dir.join("named.conf"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("cannot start named (install bind9: sudo bash tests/install-deps.sh)")?;
    let guard = ChildGuard(Some(child));
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let out = Command::new("dig")
            .args([
                "@127.0.0.1",
                "-p",
                &port.to_string(),
                "example.test.",
                "SOA",
                "+short",
                "+time=1",
            ])
            .output()?;
        if String::from_utf8_lossy(&out.stdout).contains("hostmaster") {
            return Ok((guard, addr));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!(
        "named did not start; see {}",
        dir.join("named.log").display()
    )
}

/// (queries per second, lost fraction)
fn dnsperf(addr: SocketAddr, file: &Path, seconds: u32) -> Result<(f64, f64)> {
    let out = Command::new("dnsperf")
        .args(["-s", &addr.ip().to_string(), "-p", &addr.port().to_string()])
        .arg("-d")
        .arg(file)
        .args(["-l", &seconds.to_string(), "-c", "4", "-q", "200"])
        .output()
        .context("cannot run dnsperf (install it: sudo bash tests/install-deps.sh)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |label: &str| -> Option<f64> {
        text.lines()
            .find(|l| l.trim_start().starts_with(label))?
            .split(':')
            .nth(1)?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    let qps = field("Queries per second")
        .with_context(|| format!("dnsperf output without a rate:\n{text}"))?;
    let sent = field("Queries sent").unwrap_or(0.0);
    let lost = field("Queries lost").unwrap_or(0.0);
    Ok((qps, if sent > 0.0 { lost / sent } else { 0.0 }))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn percentile(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v.get(i).copied().unwrap_or(0.0)
}

struct Latency {
    ack_ms: Vec<f64>,
    visible_ms: Vec<f64>,
    next_query_saw_it: usize,
}

/// Alternates web's A record; times the update until NOERROR, and until a
/// query (sent right after the NOERROR) returns the new address.
async fn update_latency(addr: SocketAddr, key: &TsigKey, n: usize) -> Result<Latency> {
    let client = Client::new(addr, Some(key))?;
    let zone = Name::from_ascii("example.test.")?;
    let web = Name::from_ascii("web.example.test.")?;
    let mut lat = Latency {
        ack_ms: Vec::new(),
        visible_ms: Vec::new(),
        next_query_saw_it: 0,
    };
    for i in 0..n {
        let ip = std::net::Ipv4Addr::new(10, 2, (i / 250) as u8, (i % 250) as u8 + 1);
        let mut msg = Client::update_message(&zone);
        let mut del = Record::update0(web.clone(), 0, RecordType::A).into_record_of_rdata();
        del.dns_class = DNSClass::ANY;
        msg.add_update(del);
        msg.add_update(Record::from_rdata(web.clone(), 5, RData::A(A(ip))));
        let t0 = Instant::now();
        client.update(msg).await?;
        lat.ack_ms.push(t0.elapsed().as_secs_f64() * 1e3);
        let mut first = true;
        loop {
            let answer = client.query(&web, RecordType::A).await?;
            let seen = answer.answers.iter().any(|r| r.data == RData::A(A(ip)));
            if seen {
                lat.visible_ms.push(t0.elapsed().as_secs_f64() * 1e3);
                if first {
                    lat.next_query_saw_it += 1;
                }
                break;
            }
            first = false;
            if t0.elapsed() > Duration::from_secs(10) {
                bail!("update {i} not visible after 10 s at {addr}");
            }
        }
    }
    Ok(lat)
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let tmp = tempfile::tempdir()?;
    let key = TsigKey::generate("bench-key")?;
    let ours_dir = tmp.path().join("ours");
    let bind_dir = tmp.path().join("bind");
    std::fs::create_dir_all(&ours_dir)?;
    std::fs::create_dir_all(&bind_dir)?;
    let (_ours, ours) = start_ours(&ours_dir, &key)?;
    let (_named, named) = start_named(&bind_dir, &key)?;
    let servers = [("dyndns (ours)", ours), ("BIND 9", named)];

    // workloads
    let repeated = tmp.path().join("repeated.txt");
    std::fs::write(
        &repeated,
        "web.example.test A\nweb.example.test AAAA\nnope.example.test A\nexample.test SOA\nh7.example.test A\n",
    )?;
    let distinct = tmp.path().join("distinct.txt");
    let mut text = String::new();
    for i in 0..400_000 {
        text.push_str(&format!("h{i}.example.test A\n"));
    }
    std::fs::write(&distinct, text)?;
    let workloads = [
        (
            "repeated questions (5 names, the service-lookup case)",
            &repeated,
        ),
        (
            "all-distinct names (400k, 0.25% exist: defeats any answer cache)",
            &distinct,
        ),
    ];

    let mut qps_rows = Vec::new();
    for (wname, file) in workloads {
        let mut per: Vec<(Vec<f64>, Vec<f64>)> = vec![(Vec::new(), Vec::new()); servers.len()];
        for round in 0..args.rounds {
            for (i, (sname, addr)) in servers.iter().enumerate() {
                let (qps, lost) = dnsperf(*addr, file, args.seconds)?;
                eprintln!(
                    "{wname} / {sname} round {round}: {qps:.0} q/s, lost {:.4}%",
                    lost * 100.0
                );
                per[i].0.push(qps);
                per[i].1.push(lost);
            }
        }
        qps_rows.push((wname, per));
    }

    let mut lat_rows = Vec::new();
    for (sname, addr) in &servers {
        let l = update_latency(*addr, &key, args.updates).await?;
        eprintln!(
            "{sname}: update ack median {:.2} ms, visible median {:.2} ms, next query saw it {}/{}",
            percentile(&l.ack_ms, 0.5),
            percentile(&l.visible_ms, 0.5),
            l.next_query_saw_it,
            args.updates
        );
        lat_rows.push((sname, l));
    }

    let host = tests::bed::cpu_model();
    let bind_version = Command::new("named")
        .arg("-v")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mut md = format!(
        "# DNS benchmark\n\nOur server (`dyndns serve`, release build) and {bind_version} (`named -g`, default threads, `minimal-responses yes`, which makes its answers smaller: in BIND's favour) serve the same zone ({} records) on 127.0.0.1, one after the other, on the same machine: {cores} cores, {host}. \
The load generator (dnsperf, 4 clients, 200 outstanding queries, {} s per run) runs on the same cores, so absolute rates are a floor; the ratio is the measure. \
Each cell is the median of {} runs, alternating servers. Command: `target/release/bench-dns --seconds {} --rounds {} --updates {}`.\n\n\
## Query throughput\n\n| workload | ours q/s | BIND q/s | ours / BIND | lost (ours / BIND) |\n|---|---|---|---|---|\n",
        HOSTS + 5,
        args.seconds,
        args.rounds,
        args.seconds,
        args.rounds,
        args.updates
    );
    for (wname, per) in &qps_rows {
        let o = median(per[0].0.clone());
        let b = median(per[1].0.clone());
        md.push_str(&format!(
            "| {wname} | {o:.0} | {b:.0} | {:.2} | {:.4}% / {:.4}% |\n",
            o / b,
            median(per[0].1.clone()) * 100.0,
            median(per[1].1.clone()) * 100.0
        ));
    }
    md.push_str(
        "\n## Update to visible\n\nEach update replaces web.example.test's A record (TSIG-signed, one UPDATE), sent by our client; right after its NOERROR the same client queries the name. \
\"ack\" is send → NOERROR; \"visible\" is send → first answer with the new address. Ours makes each update durable (journal append + fdatasync) before answering.\n\n\
| server | ack median ms | ack p99 ms | visible median ms | visible p99 ms | next query saw the update |\n|---|---|---|---|---|---|\n",
    );
    for (sname, l) in &lat_rows {
        md.push_str(&format!(
            "| {sname} | {:.2} | {:.2} | {:.2} | {:.2} | {}/{} |\n",
            percentile(&l.ack_ms, 0.5),
            percentile(&l.ack_ms, 0.99),
            percentile(&l.visible_ms, 0.5),
            percentile(&l.visible_ms, 0.99),
            l.next_query_saw_it,
            l.visible_ms.len()
        ));
    }
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, &md)?;
    println!("{md}");
    eprintln!("wrote {}", args.out.display());
    Ok(())
}
