//! The whole system over the emulated WAN: `migrator migrate` (disk, memory,
//! gateways, DNS) against QEMU's native storage + memory migration, on the
//! demo's bed and workload (a client downloading from the guest, paced, and
//! an echo session). Writes bench/results/system.md and the timelines.
//!
//! `sudo target/release/bench-system [--rate-mbit 100 --rtt-ms 50]`

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::Parser;

use tests::bed::{cpu_model, require_root};
use tests::interrupt;
use tests::sysbed::{random_file, Seen, SysBed, SysOpts, WanArgs};
use tests::vmbed::Guest;

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    wan: WanArgs,
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    /// Give up on QEMU's native path after this long.
    #[arg(long, default_value_t = 300)]
    native_timeout_s: u64,
    /// Only these paths (ours, native, return: A→B→A between nodes).
    #[arg(long, value_delimiter = ',', default_value = "ours,native,return")]
    paths: Vec<String>,
    /// Only these links (wan, unlimited).
    #[arg(long, value_delimiter = ',', default_value = "wan,unlimited")]
    links: Vec<String>,
}

struct Row {
    path: &'static str,
    link: String,
    total_s: f64,
    guest_gap_ms: f64,
    download: String,
    session: String,
    wire_mib: f64,
    /// Disk data + memory stream, MiB.
    to_move_mib: f64,
    rate: Option<f64>,
}

const MIB: f64 = 1024.0 * 1024.0;

fn main() {
    interrupt::install();
    if let Err(e) = run(Args::parse()) {
        eprintln!("bench-system failed: {e:#}");
        std::process::exit(1);
    }
}

fn opts(a: &Args, file: &[u8], rate: Option<u32>) -> SysOpts {
    SysOpts {
        rate_mbit: rate,
        delay: if rate.is_some() {
            Duration::from_millis(a.wan.rtt_ms / 2)
        } else {
            Duration::ZERO
        },
        guest: Guest {
            beats: 30000,
            disk_mib: 96,
            www: vec![("big.bin".into(), file.to_vec())],
            net: None,
        },
    }
}

fn bed(a: &Args, file: &[u8], rate: Option<u32>) -> Result<SysBed> {
    SysBed::new(opts(a, file, rate))
}

/// One leg of a return trip.
struct Leg {
    link: String,
    leg: &'static str,
    total_s: f64,
    wire_mib: f64,
    data_mib: f64,
    resumed_mib: f64,
    memory_mib: f64,
}

/// A→B then B→A with `migrator migrate` between nodes (the ring bed's
/// sites A and B): the way back sends what changed since the way there.
/// Returns the section of system.md.
fn return_trip(a: &Args, file: &Arc<Vec<u8>>) -> Result<String> {
    let mut legs = Vec::new();
    for rate in [Some(a.wan.rate_mbit), None] {
        let wanted = if rate.is_some() { "wan" } else { "unlimited" };
        if !a.links.iter().any(|l| l == wanted) {
            continue;
        }
        let link = match rate {
            Some(r) => format!("{r} Mbit/s, {} ms RTT", a.wan.rtt_ms),
            None => "unlimited, no delay".into(),
        };
        eprintln!("== return trip over {link}");
        let mut bed = SysBed::ring(opts(a, file, rate))?;
        bed.start_gateways()?;
        let _nodes = bed.start_nodes()?;
        bed.vm.wait_beats("A", 20, Duration::from_secs(180))?;
        for (leg, to) in [("A→B", "siteB"), ("B→A", "siteA")] {
            let tx = |bed: &SysBed| {
                if to == "siteB" {
                    bed.vm.sites.a_tx_bytes()
                } else {
                    bed.vm.sites.b_tx_bytes()
                }
            };
            let tx0 = tx(&bed)?;
            let t = Instant::now();
            let events = bed.ring_migrate(to)?;
            let total_s = t.elapsed().as_secs_f64();
            let wire = tx(&bed)? - tx0;
            let report = events
                .iter()
                .find(|e| e["event"] == "report")
                .map(|e| e["report"]["migration"].clone())
                .unwrap_or_default();
            let mib = |v: &serde_json::Value| v.as_f64().unwrap_or(0.0) / MIB;
            legs.push(Leg {
                link: link.clone(),
                leg,
                total_s,
                wire_mib: wire as f64 / MIB,
                data_mib: mib(&report["data_bytes"]),
                resumed_mib: mib(&report["resumed_bytes"]),
                memory_mib: mib(&report["vm"]["memory_wire_bytes"]),
            });
        }
    }
    let mut md = String::from(
        "\n## Return trip\n\n\
        `migrator migrate web1 --to siteB`, then `--to siteA`, between nodes (`migrator node run` at each site; the ring bed of `tests/tests/system.rs`, its sites' WAN links checksumming in software), \
        the same guest, disk and client-free workload. The way back finds the image site A kept: only blocks whose hash differs travel. \
        Wire: the sending site's tx counter during the leg. Disk: data sent (compressed before the wire), and what the receiver already held. Memory: QEMU's stream on the wire.\n\n\
        | link | leg | total s | wire MiB | disk data MiB | disk already there MiB | memory MiB | wire ÷ way there |\n|---|---|---|---|---|---|---|---|\n",
    );
    let mut there = 0.0;
    for l in &legs {
        if l.leg == "A→B" {
            there = l.wire_mib;
        }
        md += &format!(
            "| {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2} |\n",
            l.link,
            l.leg,
            l.total_s,
            l.wire_mib,
            l.data_mib,
            l.resumed_mib,
            l.memory_mib,
            if there > 0.0 { l.wire_mib / there } else { 0.0 }
        );
    }
    Ok(md)
}

/// A connection's fate, once the download had time to finish.
fn fate(s: &Seen, broken_after: Duration) -> String {
    match (&s.error, s.done) {
        (Some(e), _) => format!("broken ({e})"),
        (None, true) => format!("ok, largest gap {:.0} ms", s.stall.as_secs_f64() * 1e3),
        (None, false) => format!(
            "stalled (no progress for {:.0} s)",
            broken_after.as_secs_f64()
        ),
    }
}

fn run(a: Args) -> Result<()> {
    require_root()?;
    let file = Arc::new(random_file(a.wan.file_mib << 20, 7));
    let rt = tokio::runtime::Runtime::new()?;
    let idle = Duration::from_secs(15);
    let mut rows = Vec::new();
    let mut failed: Vec<String> = Vec::new();
    for rate in [Some(a.wan.rate_mbit), None] {
        if !a
            .links
            .iter()
            .any(|l| l == if rate.is_some() { "wan" } else { "unlimited" })
        {
            continue;
        }
        let link = match rate {
            Some(r) => format!("{r} Mbit/s, {} ms RTT", a.wan.rtt_ms),
            None => "unlimited, no delay".into(),
        };
        for native in [false, true] {
            if !a
                .paths
                .iter()
                .any(|p| p == if native { "native" } else { "ours" })
            {
                continue;
            }
            eprintln!(
                "== {} over {link}",
                if native { "QEMU native" } else { "ours" }
            );
            let mut bed = bed(&a, &file, rate)?;
            let row = if native {
                // no gateways: the guest's old address stays routed to site A
                let tx0 = bed.vm.sites.a_tx_bytes()?;
                let t_native = Instant::now();
                let run = rt.block_on(async {
                    tokio::time::timeout(
                        Duration::from_secs(a.native_timeout_s),
                        tests::native::migrate_with(&bed.vm, 300, || {
                            bed.start_clients(file.clone(), 800_000)
                        }),
                    )
                    .await
                });
                let (n, clients) = match run {
                    Ok(Ok(x)) => x,
                    Ok(Err(e)) => {
                        eprintln!("   QEMU native failed: {e:#}");
                        failed.push(format!("QEMU native over {link}: {e:#}"));
                        continue;
                    }
                    Err(_) => {
                        let sent = bed.vm.sites.a_tx_bytes()? - tx0;
                        let secs = t_native.elapsed().as_secs_f64();
                        let msg = format!(
                            "QEMU native over {link}: not done after {:.0} s; site A had sent {:.1} MiB ({:.2} MB/s) and QEMU's mirror job was still not ready: \
                             its throughput over this RTT stays near the rate at which the guest's writer rewrites blocks, so it does not converge",
                            secs,
                            sent as f64 / MIB,
                            sent as f64 / secs / 1e6
                        );
                        eprintln!("   {msg}");
                        failed.push(msg);
                        continue;
                    }
                };
                let wire = bed.vm.sites.a_tx_bytes()? - tx0;
                let (d, s) = (clients.settle_download(idle)?, clients.stop_session());
                Row {
                    path: "QEMU native",
                    link: link.clone(),
                    total_s: n.total_s,
                    guest_gap_ms: n.guest_gap.as_secs_f64() * 1e3,
                    download: fate(&d, idle),
                    session: fate(&s, idle),
                    wire_mib: wire as f64 / MIB,
                    to_move_mib: (n.disk_bytes + n.memory_bytes) as f64 / MIB,
                    rate: rate.map(|r| r as f64 * 1e6 / 8.0),
                }
            } else {
                let _run = bed.vm.start_all()?;
                bed.start_gateways()?;
                let clients = bed.start_clients(file.clone(), 800_000)?;
                let svg = a.out.join(format!(
                    "system-{}.svg",
                    if rate.is_some() { "wan" } else { "unlimited" }
                ));
                let report_path = std::env::current_dir()?.join(&svg);
                let tx0 = bed.vm.sites.a_tx_bytes()?;
                let t = Instant::now();
                let out = bed
                    .migrate_command(&[
                        "--json",
                        "--report",
                        &report_path.display().to_string(),
                        "--drain-wait-s",
                        "0",
                    ])
                    .output()?;
                let total_s = t.elapsed().as_secs_f64();
                let wire = bed.vm.sites.a_tx_bytes()? - tx0;
                if !out.status.success() {
                    bail!(
                        "migrate failed: {}\n{}",
                        String::from_utf8_lossy(&out.stderr),
                        bed.logs()
                    );
                }
                let report = String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                    .find(|v| v["event"] == "report")
                    .map(|v| v["report"].clone())
                    .unwrap_or_default();
                let m = &report["migration"];
                let gap = bed.vm.continuity()?;
                let (d, s) = (clients.settle_download(idle)?, clients.stop_session());
                Row {
                    path: "ours",
                    link: link.clone(),
                    total_s,
                    guest_gap_ms: gap.as_secs_f64() * 1e3,
                    download: fate(&d, idle),
                    session: fate(&s, idle),
                    wire_mib: wire as f64 / MIB,
                    to_move_mib: (m["data_bytes"].as_f64().unwrap_or(0.0)
                        + m["vm"]["memory_stream_bytes"].as_f64().unwrap_or(0.0))
                        / MIB,
                    rate: rate.map(|r| r as f64 * 1e6 / 8.0),
                }
            };
            rows.push(row);
        }
    }
    let mut md = format!(
        "# Whole-system benchmark\n\n\
        The demo's bed: namespaces client, wan, siteA, siteB; the guest (QEMU TCG, 256 MiB RAM, 96 MiB ext4 disk holding a {} MiB random file; its writer fsyncs every 10 ms) on a tap at site A; \
        a client downloads the file from the guest at 800 kB/s (so the download spans the move) and keeps an echo session (a line every 50 ms). \
        WAN: `tc tbf` at {} Mbit/s on every link plus {} ms RTT through a userspace delay line, ingress filtering at the router; or unlimited with no delay. \
        Machine: {} cores, {}. One run per row. Command: `sudo target/release/bench-system --rate-mbit {} --rtt-ms {}`.\n\n\
        - **ours**: `migrator migrate web1 --to siteB`: prepare (gateways, DNS TTL), disk pre-copy and memory through one TLS link, one switchover, network switch (tunnel at site A, translation at site B, DNS). Timelines: `system-wan.svg`, `system-unlimited.svg`.\n\
        - **QEMU native**: `drive-mirror` to the destination's NBD export + `migrate` (see bench/results/vm.md). It has no network continuity: the guest's old address stays routed to site A, so the client's connections cannot follow the guest.\n\n\
        Total: the migration command (ours: prepare to network switch; native: mirror start to the destination running). Guest-visible pause: the largest gap between the guest's heartbeats. \
        Client: the download's and the session's fate and largest gap. Wire: site A's tx counter during the migration (the client's download leaving site A is in it too). To move: disk data + the memory stream, before compression; time ÷ (to move ÷ link rate) is the issue's 1.2 target.\n\n\
        | path | link | total s | guest-visible pause ms | download | session | wire MiB | to move MiB | time ÷ (to move ÷ rate) |\n|---|---|---|---|---|---|---|---|---|\n",
        a.wan.file_mib,
        a.wan.rate_mbit,
        a.wan.rtt_ms,
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        cpu_model(),
        a.wan.rate_mbit,
        a.wan.rtt_ms
    );
    for r in &rows {
        md += &format!(
            "| {} | {} | {:.1} | {:.0} | {} | {} | {:.1} | {:.1} | {} |\n",
            r.path,
            r.link,
            r.total_s,
            r.guest_gap_ms,
            r.download,
            r.session,
            r.wire_mib,
            r.to_move_mib,
            r.rate
                .map(|rate| format!("{:.2}", r.total_s / (r.to_move_mib * MIB / rate)))
                .unwrap_or_else(|| "-".into())
        );
    }
    for f in &failed {
        md += &format!("\nNo result: {f}\n");
    }
    if a.paths.iter().any(|p| p == "return") {
        md += &return_trip(&a, &file)?;
    }
    std::fs::create_dir_all(&a.out)?;
    std::fs::write(a.out.join("system.md"), &md)?;
    println!("{md}");
    Ok(())
}
