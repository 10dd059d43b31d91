//! VM migration benchmark: the same guest (TCG, 256 MiB, its writer
//! fsyncing every 10 ms) moved between two namespaces by `migrator disk
//! migrate --qmp` and by QEMU's native path (NBD export at the destination,
//! `drive-mirror`, `migrate`, `pause-before-switchover` to finish the
//! mirror), over an unlimited link and over a `tc tbf` limit. Writes
//! bench/results/vm.md.
//!
//! `sudo target/release/bench-vm [--rate-mbit 100]`

use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::Parser;

use tests::bed::{cpu_model, require_root, start_agent};
use tests::vmbed::{summary, wait_exit, VmBed};

#[derive(Parser)]
struct Args {
    /// The limited link's rate (the other run is unlimited).
    #[arg(long, default_value_t = 100)]
    rate_mbit: u32,
    /// QEMU's downtime limit, both paths.
    #[arg(long, default_value_t = 300)]
    downtime_ms: u64,
    /// Runs per path and link; the table shows medians.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    #[arg(long, default_value = "bench/results/vm.md")]
    out: PathBuf,
}

struct Row {
    path: &'static str,
    link: String,
    total_s: f64,
    qemu_downtime_ms: Option<u64>,
    guest_gap_ms: f64,
    disk_mib: f64,
    memory_mib: f64,
    wire_mib: f64,
}

const MIB: f64 = 1024.0 * 1024.0;
const TO: Duration = Duration::from_secs(60);

fn main() -> Result<()> {
    let args = Args::parse();
    require_root()?;
    let rt = tokio::runtime::Runtime::new()?;
    let mut rows = Vec::new();
    for rate in [None, Some(args.rate_mbit)] {
        let link = rate
            .map(|r| format!("{r} Mbit/s"))
            .unwrap_or_else(|| "unlimited".into());
        let (mut o, mut n) = (Vec::new(), Vec::new());
        for run in 1..=args.runs {
            eprintln!("== ours, {link}, run {run}");
            o.push(ours(rate, &link, args.downtime_ms)?);
            eprintln!("== QEMU native, {link}, run {run}");
            n.push(rt.block_on(native(rate, &link, args.downtime_ms))?);
        }
        rows.push(median(o));
        rows.push(median(n));
    }

    let mut md = format!(
        "# VM migration benchmark\n\n\
        The test bed's guest (QEMU TCG, 256 MiB RAM, 64 MiB ext4 root disk; its writer appends a line and fsyncs every 10 ms, a heartbeat on the console every 20 ms) moves between two namespaces joined by a veth pair, `tc tbf` on both ends for the limited runs, no added delay. \
        Machine: {} cores, {}. QEMU {}. Downtime limit {} ms on both paths. Each row is the median of {} runs. Command: `sudo target/release/bench-vm --rate-mbit {} --runs {}`.\n\n\
        - **ours**: `migrator disk migrate --qmp`: disk pre-copy through our NBD server, then QEMU's memory stream carried in our TLS link (zstd), `pause-before-switchover`, final disk set, commit, resume at the destination.\n\
        - **QEMU native**: the destination QEMU exports its (empty) disk with `nbd-server-add`, the source runs `drive-mirror` (sync full) to it, then `migrate` over TCP with `pause-before-switchover`; at the pause the mirror job is completed (`block-job-cancel` on a synced job), then `migrate-continue`. Unencrypted, uncompressed.\n\n\
        Total: from the start of the migration to the guest running at the destination. QEMU downtime: `query-migrate` at the source. Guest-visible: the largest gap between consecutive heartbeats on the two consoles (±10 ms: the destination's console is polled). Disk and memory bytes: ours from its summary (frame bytes on the link); native from `query-migrate` (RAM) and the mirror job's length (zero ranges included: they travel as NBD write-zeroes, so compare the wire column); wire: the site-A interface's tx counter (TCP/IP and TLS included).\n\n\
        | path | link | total s | QEMU downtime ms | guest-visible pause ms | disk MiB | memory MiB | wire MiB |\n|---|---|---|---|---|---|---|---|\n",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        cpu_model(),
        qemu_version(),
        args.downtime_ms,
        args.runs,
        args.rate_mbit,
        args.runs
    );
    for r in &rows {
        md += &format!(
            "| {} | {} | {:.2} | {} | {:.0} | {:.1} | {:.1} | {:.1} |\n",
            r.path,
            r.link,
            r.total_s,
            r.qemu_downtime_ms
                .map(|d| d.to_string())
                .unwrap_or_else(|| "?".into()),
            r.guest_gap_ms,
            r.disk_mib,
            r.memory_mib,
            r.wire_mib
        );
    }
    md += "\nRatios of the medians, ours ÷ native, same link, runs interleaved:\n\n| link | total | guest-visible pause | wire bytes |\n|---|---|---|---|\n";
    for pair in rows.chunks(2) {
        if let [o, n] = pair {
            md += &format!(
                "| {} | {:.2} | {:.2} | {:.2} |\n",
                o.link,
                o.total_s / n.total_s,
                o.guest_gap_ms / n.guest_gap_ms,
                o.wire_mib / n.wire_mib
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

/// Each column's median over the runs.
fn median(runs: Vec<Row>) -> Row {
    fn med(mut v: Vec<f64>) -> f64 {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    }
    let col = |f: fn(&Row) -> f64| med(runs.iter().map(f).collect());
    let downtimes: Vec<f64> = runs
        .iter()
        .filter_map(|r| r.qemu_downtime_ms.map(|d| d as f64))
        .collect();
    Row {
        path: runs.first().map(|r| r.path).unwrap_or(""),
        link: runs.first().map(|r| r.link.clone()).unwrap_or_default(),
        total_s: col(|r| r.total_s),
        qemu_downtime_ms: (!downtimes.is_empty()).then(|| med(downtimes) as u64),
        guest_gap_ms: col(|r| r.guest_gap_ms),
        disk_mib: col(|r| r.disk_mib),
        memory_mib: col(|r| r.memory_mib),
        wire_mib: col(|r| r.wire_mib),
    }
}

fn qemu_version() -> String {
    Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(|l| l.trim_start_matches("QEMU emulator version ").to_string())
        })
        .unwrap_or_else(|| "?".into())
}

fn ours(rate: Option<u32>, link: &str, downtime_ms: u64) -> Result<Row> {
    let bed = VmBed::new(3000, rate)?;
    let (_server, _src) = bed.start_vm()?;
    bed.wait_beats("src", 50, TO)?;
    let (_agent, addr) = start_agent(&bed.sites, &bed.agent_dir, &bed.keys)?;
    bed.tail_destination();
    let events = Arc::new(Mutex::new(Vec::new()));
    let tx0 = bed.sites.a_tx_bytes()?;
    let t = Instant::now();
    let mut m = bed.migrate(
        &addr,
        &["--downtime-ms", &downtime_ms.to_string()],
        events.clone(),
    )?;
    if !wait_exit(&mut m, Duration::from_secs(600))?.success() {
        bail!("migration failed\n{}", bed.logs());
    }
    let total_s = t.elapsed().as_secs_f64();
    let wire = bed.sites.a_tx_bytes()? - tx0;
    let sum = summary(&events)?;
    let gap = bed.continuity()?;
    let vm = &sum["vm"];
    Ok(Row {
        path: "ours",
        link: link.into(),
        total_s,
        qemu_downtime_ms: vm["qemu_downtime_ms"].as_u64(),
        guest_gap_ms: gap.as_secs_f64() * 1e3,
        disk_mib: sum["wire_bytes"].as_f64().unwrap_or(0.0) / MIB,
        memory_mib: vm["memory_wire_bytes"].as_f64().unwrap_or(0.0) / MIB,
        wire_mib: wire as f64 / MIB,
    })
}

async fn native(rate: Option<u32>, link: &str, downtime_ms: u64) -> Result<Row> {
    let bed = VmBed::new(3000, rate)?;
    let n = tests::native::migrate(&bed, downtime_ms).await?;
    Ok(Row {
        path: "QEMU native",
        link: link.into(),
        total_s: n.total_s,
        qemu_downtime_ms: n.qemu_downtime_ms,
        guest_gap_ms: n.guest_gap.as_secs_f64() * 1e3,
        disk_mib: n.disk_bytes as f64 / MIB,
        memory_mib: n.memory_bytes as f64 / MIB,
        wire_mib: n.wire_bytes as f64 / MIB,
    })
}
