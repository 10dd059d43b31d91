//! The demo: `migrator migrate web1 --to siteB` moves a running VM — a real
//! guest under QEMU with its web server, an echo service and a writer
//! fsyncing a log every 10 ms — from site A to site B across an emulated WAN
//! (100 Mbit/s, 50 ms RTT, ingress filtering), while a client downloads a
//! file from it and holds an interactive session open. Then it shows what
//! happened: no connection broke, the client got every byte, DNS answers
//! with site B's address and a new connection lands there, the old site's
//! tunnel drained, and the guest's disk at site B checks clean.
//!
//! Run through `sudo bash tests/demo.sh` (installs what it needs first).
//! Ctrl-C stops it and removes everything it created.

use std::io::{Read as _, Write as _};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use tests::bed::require_root;
use tests::interrupt;
use tests::sysbed::{random_file, SysBed, SysOpts, WanArgs, PUBLIC_IP};
use tests::vmbed::{wait_exit, Guest};

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    wan: WanArgs,
    /// Where the timeline goes.
    #[arg(long, default_value = "demo-timeline.svg")]
    report: PathBuf,
}

fn main() {
    interrupt::install();
    if let Err(e) = run(Args::parse()) {
        eprintln!("demo failed: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<()> {
    require_root()?;
    let file = Arc::new(random_file(args.wan.file_mib << 20, 7));
    println!(
        "1. the test bed: namespaces client, wan, siteA, siteB; the WAN router limits each link to {} Mbit/s (tc tbf), \
         delays packets {} ms each way (a userspace delay line: this kernel has no netem) and drops packets whose \
         source is not routed via the interface they arrive on",
        args.wan.rate_mbit,
        args.wan.rtt_ms / 2
    );
    println!("   the guest: Debian's cloud kernel and a busybox root on ext4, built from packages (cached)");
    let mut bed = SysBed::new(SysOpts {
        rate_mbit: Some(args.wan.rate_mbit),
        delay: Duration::from_millis(args.wan.rtt_ms / 2),
        guest: Guest {
            beats: 3000,
            disk_mib: 96,
            www: vec![("big.bin".into(), file.to_vec())],
            net: None,
        },
    })?;
    println!("2. site A: `migrator disk serve` exports the guest's disk; QEMU (TCG) boots the guest on it, on a tap in site A's LAN");
    println!("   site B: `migrator receive` with the guest's launch file; both sites run `gateway run` (site A's serves example.test.)");
    let mut run = bed.vm.start_all()?;
    bed.start_gateways()?;
    println!("   dig web1.example.test → {}", bed.dig()?);

    println!(
        "3. the client downloads a {} MiB file from the guest (paced to 800 kB/s, so it spans the move) and holds an echo session open (a line every 50 ms)",
        args.wan.file_mib
    );
    let clients = bed.start_clients(file.clone(), 800_000)?;

    println!(
        "4. migrator migrate web1 --to siteB --report {}",
        args.report.display()
    );
    let report = std::env::current_dir()?.join(&args.report);
    let st = bed
        .migrate_command(&[
            "--report",
            report.to_str().context("report path")?,
            "--drain-wait-s",
            "0",
        ])
        .status()?;
    interrupt::check()?;
    if !st.success() {
        bail!("the migration failed\n{}", bed.logs());
    }

    println!("5. what the client and the sites see");
    let answer = bed.dig()?;
    println!("   dig web1.example.test → {answer} (site B's public address: {PUBLIC_IP})");
    if answer != PUBLIC_IP {
        bail!("DNS still answers {answer}");
    }
    let mut fresh = bed.connect(&format!("{PUBLIC_IP}:7"))?;
    fresh.write_all(b"new client\n")?;
    let mut back = [0u8; 11];
    fresh.set_read_timeout(Some(Duration::from_secs(10)))?;
    fresh.read_exact(&mut back)?;
    println!(
        "   a new connection to {PUBLIC_IP}:7 reaches the guest at site B: echo {:?}",
        String::from_utf8_lossy(&back).trim()
    );
    drop(fresh);
    let d = clients.settle_download(Duration::from_secs(30))?;
    let s = clients.stop_session();
    match (&d.error, d.done) {
        (None, true) => println!(
            "   the download finished through the tunnel: {} bytes, identical to the file; longest stall {:.0} ms",
            d.bytes,
            d.stall.as_secs_f64() * 1e3
        ),
        _ => bail!("the download broke: {d:?}"),
    }
    match &s.error {
        None => println!(
            "   the echo session never broke: {} lines, each echoed whole; longest wait {:.0} ms",
            clients.lines.load(Ordering::Relaxed),
            s.stall.as_secs_f64() * 1e3
        ),
        Some(e) => bail!("the session broke: {e}"),
    }
    let t = Instant::now();
    let drained = loop {
        interrupt::check()?;
        let st = bed.gateway_status("siteA")?;
        if st["migrations"][0]["phase"] == "drained" {
            break t.elapsed();
        }
        if t.elapsed() > Duration::from_secs(60) {
            bail!("gateway A has not drained: {st}");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    println!(
        "   gateway A reports drained {:.1} s after the last old connection closed: the old address is no longer tunnelled",
        drained.as_secs_f64()
    );
    if !wait_exit(&mut run.src, Duration::from_secs(30))?.success() {
        bail!("the source QEMU did not quit cleanly");
    }
    let gap = bed.vm.continuity()?;
    println!(
        "   the guest runs on at site B from the heartbeat where it stopped; it saw a pause of {:.0} ms",
        gap.as_secs_f64() * 1e3
    );
    println!("   waiting for the guest to finish its heartbeats and halt, to check its disk…");
    let n = bed
        .vm
        .check_disk_after_halt(&bed.vm.agent_dir.join("root.img"))?;
    println!("   site B's disk: the writer's log has all {n} lines in order; e2fsck -fn finds nothing to fix");
    println!("demo complete; the timeline is in {}", report.display());
    Ok(())
}
