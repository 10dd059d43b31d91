//! The demo: a running VM — a real guest under QEMU, its web server and a
//! writer fsyncing a log every 10 ms — moves with its disk from site A to
//! site B over an emulated 100 Mbit/s link, through one authenticated link,
//! with one short pause; then shows that it runs on at site B exactly where
//! it stopped, and that its disk there is whole.
//!
//! Run through `sudo bash tests/demo.sh` (installs what it needs first).

use std::time::Duration;

use anyhow::{bail, Result};
use clap::Parser;
use tests::bed::{require_root, start_agent};
use tests::vmbed::{wait_exit, VmBed};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 100)]
    rate_mbit: u32,
    /// The guest halts after this many heartbeats (20 ms apart), so its
    /// disk can be checked.
    #[arg(long, default_value_t = 1500)]
    beats: u64,
}

fn main() -> Result<()> {
    let args = Args::parse();
    require_root()?;
    println!(
        "1. two sites (network namespaces) joined by a {} Mbit/s link (tc tbf); the guest \
         (Debian's cloud kernel, a busybox initramfs, an ext4 root disk) built from packages",
        args.rate_mbit
    );
    let bed = VmBed::new(args.beats, Some(args.rate_mbit))?;
    println!(
        "   pinned keys: source {}…, destination {}…",
        &bed.keys.src_fp[..16],
        &bed.keys.dst_fp[..16]
    );
    println!("2. site A: `migrator disk serve` exports the disk over NBD; QEMU (TCG) boots the guest on it");
    let (_server, mut src) = bed.start_vm()?;
    bed.wait_beats("src", 50, Duration::from_secs(120))?;
    println!(
        "   the guest runs: heartbeat {} (every 20 ms), its writer appends and fsyncs every 10 ms",
        bed.last_beat("src")
    );
    println!("3. site B: `migrator receive` with the guest's launch file (root.qemu)");
    let (_agent, addr) = start_agent(&bed.sites, &bed.agent_dir, &bed.keys)?;
    bed.tail_destination();
    println!("4. migrate: disk bulk copy, memory pre-copy in the same TLS link, one switchover");
    let st = bed.migrate_command(&addr, &[]).status()?;
    if !st.success() {
        bail!("the migration failed\n{}", bed.logs());
    }
    println!("5. checks");
    if !wait_exit(&mut src, Duration::from_secs(30))?.success() {
        bail!("the source QEMU did not quit cleanly");
    }
    println!("   the source QEMU has quit; site A's copy is marked moved");
    let gap = bed.continuity()?;
    println!(
        "   the guest runs on at site B from heartbeat {} on: none lost, none repeated; \
         largest gap between heartbeats {:.0} ms",
        bed.last_beat("src"),
        gap.as_secs_f64() * 1e3
    );
    println!(
        "   waiting for the guest to finish its {} heartbeats and halt…",
        args.beats
    );
    let lines = bed.check_disk_after_halt(&bed.agent_dir.join("root.img"))?;
    println!(
        "   site B's disk: the writer's log has all {lines} lines in order, e2fsck -fn finds nothing"
    );
    println!(
        "demo complete: the VM moved with its memory and disk, paused {:.0} ms as it saw it",
        gap.as_secs_f64() * 1e3
    );
    Ok(())
}
