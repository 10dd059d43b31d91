//! Storage migration benchmark: a sparse image over a `tc tbf`-limited link
//! between two namespaces, ours (with and without a writer) next to nbdcopy into
//! qemu-nbd over the same link. Writes bench/results/storage.md.
//!
//! `sudo target/release/bench-storage [--size-mib 1024 --data-mib 300 --rate-mbit 100 --writer-mbps 5]`

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;
use tests::bed::*;
use tests::proc::ChildGuard;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    #[arg(long, default_value_t = 300)]
    data_mib: u64,
    #[arg(long, default_value_t = 100)]
    rate_mbit: u32,
    /// Writer rate in MB/s (10^6 bytes) for the second run.
    #[arg(long, default_value_t = 5.0)]
    writer_mbps: f64,
    #[arg(long, default_value = "bench/results/storage.md")]
    out: PathBuf,
}

struct Row {
    name: String,
    total_s: f64,
    wire: u64,
    to_move: u64,
    rounds: String,
    throttled: String,
    verified: bool,
}

const MIB: u64 = 1 << 20;

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    require_root()?;
    let tmp = tempfile::tempdir_in(std::env::temp_dir())?;
    let k = keys(tmp.path())?;
    let base = tmp.path().join("base.img");
    make_image(&base, args.size_mib * MIB, args.data_mib * MIB, 30, 1)?;
    let link = args.rate_mbit as f64 * 1e6 / 8.0;
    let mut rows = Vec::new();

    for (with_writer, deltas) in [(false, false), (true, false), (true, true)] {
        let name = match (with_writer, deltas) {
            (false, _) => "migrator, idle disk".to_string(),
            (true, false) => format!("migrator, writer {} MB/s", args.writer_mbps),
            (true, true) => format!("migrator --mode deltas, writer {} MB/s", args.writer_mbps),
        };
        eprintln!("== {name}");
        let sites = Sites::new(Some(args.rate_mbit))?;
        let run_dir = tmp.path().join(format!("run-{with_writer}-{deltas}"));
        std::fs::create_dir_all(&run_dir)?;
        let img = run_dir.join("vm.img");
        let st = std::process::Command::new("cp")
            .args(["--sparse=always"])
            .arg(&base)
            .arg(&img)
            .status()?;
        if !st.success() {
            bail!("cp failed");
        }
        let (sock, ctl) = (run_dir.join("vm.sock"), run_dir.join("vm.ctl"));
        let _src = start_source(&sites, &img, &sock, &ctl)?;
        let (_agent, addr) = start_agent(&sites, &run_dir.join("dst"), &k)?;
        let stop = Arc::new(AtomicBool::new(false));
        let w = with_writer.then(|| {
            tokio::spawn(writer(
                sock.clone(),
                (args.writer_mbps * 1e6) as u64,
                args.size_mib * MIB,
                7,
                stop.clone(),
            ))
        });
        let tx0 = sites.a_tx_bytes()?;
        let t = Instant::now();
        let summary = tokio::task::spawn_blocking({
            let (ctl, addr) = (ctl.clone(), addr.clone());
            let k = k.clone();
            move || {
                migrate(
                    &ctl,
                    &addr,
                    &k,
                    true,
                    if deltas { &["--mode", "deltas"] } else { &[] },
                )
            }
        })
        .await??
        .context("summary")?;
        let total = t.elapsed().as_secs_f64();
        let wire = sites.a_tx_bytes()? - tx0;
        let written = match w {
            Some(w) => w.await??,
            None => 0,
        };
        let verified = hash_file(&img)? == hash_file(&run_dir.join("dst/vm.img"))?;
        // Deltas travel as written; blocks as whole 64 KiB blocks.
        let to_move = args.data_mib * MIB
            + summary["resent_blocks"].as_u64().unwrap_or(0) * 65536
            + summary["final_blocks"].as_u64().unwrap_or(0) * 65536
            + if deltas {
                summary["data_bytes"]
                    .as_u64()
                    .unwrap_or(0)
                    .saturating_sub(args.data_mib * MIB)
            } else {
                0
            };
        eprintln!(
            "   {total:.1} s, {:.1} MiB on the wire, writer wrote {:.1} MiB, verified {verified}",
            wire as f64 / MIB as f64,
            written as f64 / MIB as f64
        );
        rows.push(Row {
            name,
            total_s: total,
            wire,
            to_move,
            rounds: summary["rounds"].to_string(),
            throttled: format!(
                "{} ({:.0} ms)",
                summary["writes_delayed"],
                summary["write_delay_total_ms"].as_f64().unwrap_or(0.0)
            ),
            verified,
        });
    }

    // The peer: nbdcopy (sparse-aware, multi-conn) into qemu-nbd at site B.
    {
        eprintln!("== nbdcopy → qemu-nbd");
        let sites = Sites::new(Some(args.rate_mbit))?;
        let dst = tmp.path().join("peer.img");
        std::fs::File::create(&dst)?.set_len(args.size_mib * MIB)?;
        let mut c = sites.b.command("qemu-nbd");
        c.args([
            "-f", "raw", "-x", "", "-b", B_IP, "-p", "10809", "-t", "-e", "8",
        ])
        .arg(&dst)
        .stderr(Stdio::null());
        let _q = ChildGuard::spawn(&mut c)?;
        std::thread::sleep(std::time::Duration::from_millis(500));
        let tx0 = sites.a_tx_bytes()?;
        let t = Instant::now();
        let st = sites
            .a
            .command("nbdcopy")
            .arg(&base)
            .arg(format!("nbd://{B_IP}:10809"))
            .status()?;
        if !st.success() {
            bail!("nbdcopy failed");
        }
        let total = t.elapsed().as_secs_f64();
        let wire = sites.a_tx_bytes()? - tx0;
        let verified = hash_file(&base)? == hash_file(&dst)?;
        rows.push(Row {
            name: "nbdcopy → qemu-nbd (peer)".into(),
            total_s: total,
            wire,
            to_move: args.data_mib * MIB,
            rounds: "-".into(),
            throttled: "-".into(),
            verified,
        });
    }

    let host = cpu_model();
    let mut md = format!(
        "# Storage migration benchmark\n\nImage {} MiB with {} MiB of random data in 30 extents (rest holes), link {} Mbit/s (`tc tbf` on a veth pair between two namespaces, both directions), no added delay. \
        Machine: {} cores, {host}. Command: `sudo target/release/bench-storage --size-mib {} --data-mib {} --rate-mbit {} --writer-mbps {}`.\n\n\
        Wire bytes are the site-A interface's tx counter (TCP/IP, TLS and framing included). \"To move\" is the allocated data plus every block the run resent (dirty rounds and final set).\n\n\
        | run | total s | wire MiB | to move MiB | wire / to move | time / (to move ÷ link) | dirty rounds | throttled writes | destination = source |\n|---|---|---|---|---|---|---|---|---|\n",
        args.size_mib, args.data_mib, args.rate_mbit, std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0), args.size_mib, args.data_mib, args.rate_mbit, args.writer_mbps
    );
    for r in &rows {
        md += &format!(
            "| {} | {:.1} | {:.1} | {:.1} | {:.3} | {:.3} | {} | {} | {} |\n",
            r.name,
            r.total_s,
            r.wire as f64 / MIB as f64,
            r.to_move as f64 / MIB as f64,
            r.wire as f64 / r.to_move as f64,
            r.total_s / (r.to_move as f64 / link),
            r.rounds,
            r.throttled,
            if r.verified { "yes" } else { "NO" }
        );
    }
    if let Some(d) = args.out.parent() {
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(&args.out, &md)?;
    println!("{md}");
    if rows.iter().any(|r| !r.verified) {
        bail!("a copy differs from its source");
    }
    Ok(())
}
