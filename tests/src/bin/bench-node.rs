//! Return-trip benchmark on nodes: the VM bed's guest booted by node A,
//! moved to node B and back home (`migrator node migrate`), over an
//! unlimited link and over a `tc tbf` limit. The way home should cost only
//! what changed since the guest left: node A kept its copy, and only blocks
//! whose hashes differ travel. Writes bench/results/node.md.
//!
//! `sudo target/release/bench-node [--rate-mbit 100] [--runs 3]`

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;

use tests::bed::{cpu_model, require_root};
use tests::vmbed::VmBed;

#[derive(Parser)]
struct Args {
    /// The limited link's rate (the other run is unlimited).
    #[arg(long, default_value_t = 100)]
    rate_mbit: u32,
    /// The pause budget (`--downtime-ms` of the migration).
    #[arg(long, default_value_t = 300)]
    downtime_ms: u64,
    /// Round trips per link; the table shows medians.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    #[arg(long, default_value = "bench/results/node.md")]
    out: PathBuf,
}

/// One leg of a round trip.
#[derive(Clone)]
struct Leg {
    total_s: f64,
    pause_ms: f64,
    /// Disk frames on the link (the summary's wire bytes).
    disk_mib: f64,
    /// Of the disk, what the destination already held (hash-matched).
    resumed_mib: f64,
    memory_mib: f64,
    /// The sending site's interface tx counter (TCP/IP and TLS included).
    wire_mib: f64,
}

const MIB: f64 = 1024.0 * 1024.0;

fn main() -> Result<()> {
    let args = Args::parse();
    require_root()?;
    let mut rows = Vec::new();
    for rate in [None, Some(args.rate_mbit)] {
        let link = rate
            .map(|r| format!("{r} Mbit/s"))
            .unwrap_or_else(|| "unlimited".into());
        let (mut there, mut home) = (Vec::new(), Vec::new());
        for run in 1..=args.runs {
            eprintln!("== round trip, {link}, run {run}");
            let (t, h) = round_trip(rate, args.downtime_ms)?;
            there.push(t);
            home.push(h);
        }
        rows.push((link.clone(), "A → B (first move)", median(&there)));
        rows.push((link, "B → A (home again)", median(&home)));
    }
    let mut md = format!(
        "# Return trip between nodes\n\n\
        The VM bed's guest (QEMU TCG, 256 MiB RAM, 64 MiB ext4 root disk; its writer appends a line and fsyncs every 10 ms, a heartbeat on the console every 20 ms), booted by node A from its launch file, moves to node B and back (`migrator node migrate root --to …`), between two namespaces joined by a veth pair, `tc tbf` on both ends for the limited runs, no added delay. \
        Machine: {} cores, {}. Pause budget {} ms. Each row is the median of {} round trips. Command: `sudo target/release/bench-node --rate-mbit {} --runs {}`.\n\n\
        Total: the migration command's run. Pause: the guest's last heartbeat at the old site to its first at the new one. Disk: the disk frames on the link; resumed: the disk the destination already held (hashes matched, nothing sent). Memory: QEMU's stream on the link (zstd). Wire: the sending site's interface tx counter (TCP/IP and TLS included).\n\n\
        | link | leg | total s | pause ms | disk MiB | resumed MiB | memory MiB | wire MiB |\n|---|---|---|---|---|---|---|---|\n",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        cpu_model(),
        args.downtime_ms,
        args.runs,
        args.rate_mbit,
        args.runs
    );
    for (link, leg, r) in &rows {
        md += &format!(
            "| {link} | {leg} | {:.2} | {:.0} | {:.2} | {:.1} | {:.1} | {:.1} |\n",
            r.total_s, r.pause_ms, r.disk_mib, r.resumed_mib, r.memory_mib, r.wire_mib
        );
    }
    md += "\nThe way home ÷ the first move, same run's medians:\n\n| link | disk bytes | wire bytes | total |\n|---|---|---|---|\n";
    for pair in rows.chunks(2) {
        if let [(link, _, t), (_, _, h)] = pair {
            md += &format!(
                "| {link} | {:.3} | {:.2} | {:.2} |\n",
                h.disk_mib / t.disk_mib,
                h.wire_mib / t.wire_mib,
                h.total_s / t.total_s
            );
        }
    }
    if let Some(d) = args.out.parent() {
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(&args.out, &md)?;
    println!("{md}");
    Ok(())
}

fn median(legs: &[Leg]) -> Leg {
    let col = |f: fn(&Leg) -> f64| tests::load::median(legs.iter().map(f).collect());
    Leg {
        total_s: col(|l| l.total_s),
        pause_ms: col(|l| l.pause_ms),
        disk_mib: col(|l| l.disk_mib),
        resumed_mib: col(|l| l.resumed_mib),
        memory_mib: col(|l| l.memory_mib),
        wire_mib: col(|l| l.wire_mib),
    }
}

/// A → B, then B → A; both legs measured.
fn round_trip(rate: Option<u32>, downtime_ms: u64) -> Result<(Leg, Leg)> {
    let bed = VmBed::new(4000, rate)?;
    let _nodes = bed.start_nodes()?;
    bed.wait_beats("A", 50, Duration::from_secs(120))?;
    let d = downtime_ms.to_string();
    let leg = |from: &str, to: &str| -> Result<(f64, u64, serde_json::Value)> {
        let tx = |s: &str| {
            if s == "A" {
                bed.sites.a_tx_bytes()
            } else {
                bed.sites.b_tx_bytes()
            }
        };
        let tx0 = tx(from)?;
        let t = Instant::now();
        let events = bed.node_migrate(from, to, &["--downtime-ms", &d])?;
        let total = t.elapsed().as_secs_f64();
        let wire = tx(from)? - tx0;
        let sum = events
            .iter()
            .find(|e| e["event"] == "summary")
            .cloned()
            .context("no summary")?;
        bed.wait_beats(to, bed.last_beat(from) + 20, Duration::from_secs(60))?;
        Ok((total, wire, sum))
    };
    let there = leg("A", "B")?;
    // the guest runs a while at B, its writer changing the disk
    std::thread::sleep(Duration::from_secs(5));
    let home = leg("B", "A")?;
    let (pauses, _) = bed.continuity_across()?;
    if pauses.len() != 2 {
        bail!("expected two switches, saw {}", pauses.len());
    }
    let to_leg = |(total_s, wire, s): (f64, u64, serde_json::Value), pause: Duration| Leg {
        total_s,
        pause_ms: pause.as_secs_f64() * 1e3,
        disk_mib: s["wire_bytes"].as_f64().unwrap_or(0.0) / MIB,
        resumed_mib: s["resumed_bytes"].as_f64().unwrap_or(0.0) / MIB,
        memory_mib: s["vm"]["memory_wire_bytes"].as_f64().unwrap_or(0.0) / MIB,
        wire_mib: wire as f64 / MIB,
    };
    Ok((to_leg(there, pauses[0]), to_leg(home, pauses[1])))
}
