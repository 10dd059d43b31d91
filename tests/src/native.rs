//! QEMU's native storage + memory migration, the benchmarks' peer: the
//! destination QEMU exports its (empty) disk over NBD (`nbd-server-add`),
//! the source mirrors its disk there (`drive-mirror`, sync full), then
//! `migrate`s over TCP with `pause-before-switchover`; at the pause the
//! synced mirror completes (`block-job-cancel`), then `migrate-continue`.
//! Unencrypted, uncompressed, and no network continuity: the guest's old
//! address stays routed to the old site.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;

use migrator::qmp::Qmp;

use crate::guest;
use crate::proc::ChildGuard;
use crate::vmbed::VmBed;

const TO: Duration = Duration::from_secs(60);

/// What the native migration did.
pub struct Native {
    pub total_s: f64,
    pub qemu_downtime_ms: Option<u64>,
    /// The largest gap between heartbeats across the move.
    pub guest_gap: Duration,
    /// The mirror job's length (zero ranges included).
    pub disk_bytes: u64,
    pub memory_bytes: u64,
    /// Site A's tx counter.
    pub wire_bytes: u64,
    /// The QEMUs, still running (the destination runs the guest).
    pub qemus: (ChildGuard, ChildGuard),
}

pub async fn connect(path: &std::path::Path) -> Result<Qmp> {
    let t = Instant::now();
    loop {
        match Qmp::connect(path).await {
            Ok(q) => return Ok(q),
            Err(_) if t.elapsed() < Duration::from_secs(30) => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Waits for event `name` whose `data[key] == value`.
pub async fn wait_for(
    rx: &mut tokio::sync::broadcast::Receiver<migrator::qmp::Event>,
    name: &str,
    key: &str,
    value: &str,
) -> Result<serde_json::Value> {
    loop {
        let e = Qmp::wait_event(rx, name, Duration::from_secs(600)).await?;
        if e.data[key] == value {
            return Ok(e.data);
        }
        if e.data["status"] == "failed" {
            bail!("{name}: {}", e.data);
        }
    }
}

/// Runs the native migration of `bed`'s guest (booted here, at site A).
pub async fn migrate(bed: &VmBed, downtime_ms: u64) -> Result<Native> {
    Ok(migrate_with(bed, downtime_ms, || Ok(())).await?.0)
}

/// As [`migrate`], calling `before` once the guest runs, before the
/// migration starts (clients connect there).
pub async fn migrate_with<T>(
    bed: &VmBed,
    downtime_ms: u64,
    before: impl FnOnce() -> Result<T>,
) -> Result<(Native, T)> {
    let mut src_cmd = guest::qemu_command(&bed.k, &bed.image, &bed.append);
    if let Some(n) = &bed.net {
        guest::add_tap(&mut src_cmd, &n.tap_a);
    }
    let (qa, qb) = (bed.path("a.qmp"), bed.path("b.qmp"));
    let src_q = bed.spawn_qemu(&bed.sites.a, &src_cmd, &qa, &[], "src")?;
    let src = connect(&qa).await?;
    tokio::task::block_in_place(|| bed.wait_beats("src", 50, TO))?;
    let extra = tokio::task::block_in_place(before)?;
    let dst_img = bed.path("dst.img");
    std::fs::File::create(&dst_img)?.set_len(std::fs::metadata(&bed.image)?.len())?;
    let mut dst_cmd = guest::qemu_command(&bed.k, &dst_img, &bed.append);
    if let Some(n) = &bed.net {
        guest::add_tap(&mut dst_cmd, &n.tap_b);
    }
    let dst_q = bed.spawn_qemu(&bed.sites.b, &dst_cmd, &qb, &["-incoming", "defer"], "dst")?;
    let b_ip = bed.sites.b_ip.clone();
    let dst = connect(&qb).await?;
    dst.execute_timeout(
        "nbd-server-start",
        Some(json!({"addr": {"type": "inet", "data": {"host": &b_ip, "port": "10809"}}})),
        TO,
    )
    .await?;
    dst.execute_timeout(
        "nbd-server-add",
        Some(json!({"device": "virtio0", "writable": true})),
        TO,
    )
    .await?;
    let caps = |pause: bool| {
        json!({"capabilities": [
            {"capability": "events", "state": true},
            {"capability": "pause-before-switchover", "state": pause},
        ]})
    };
    dst.execute_timeout("migrate-set-capabilities", Some(caps(false)), TO)
        .await?;
    dst.execute_timeout(
        "migrate-incoming",
        Some(json!({"uri": format!("tcp:{b_ip}:4444")})),
        TO,
    )
    .await?;
    src.execute_timeout("migrate-set-capabilities", Some(caps(true)), TO)
        .await?;
    src.execute_timeout(
        "migrate-set-parameters",
        Some(json!({"downtime-limit": downtime_ms, "max-bandwidth": 1u64 << 40})),
        TO,
    )
    .await?;
    let mut ev = src.events();
    let tx0 = bed.sites.a_tx_bytes()?;
    let t = Instant::now();
    src.execute_timeout(
        "drive-mirror",
        Some(json!({
            "device": "virtio0",
            "target": format!("nbd:{b_ip}:10809:exportname=virtio0"),
            "format": "raw",
            "sync": "full",
            "mode": "existing",
        })),
        TO,
    )
    .await?;
    let ready = wait_for(&mut ev, "BLOCK_JOB_READY", "device", "virtio0").await?;
    src.execute_timeout(
        "migrate",
        Some(json!({"uri": format!("tcp:{b_ip}:4444")})),
        TO,
    )
    .await?;
    wait_for(&mut ev, "MIGRATION", "status", "pre-switchover").await?;
    // the guest is paused: the synced mirror completes, then the memory
    let jobs = src.execute_timeout("query-block-jobs", None, TO).await?;
    src.execute_timeout("block-job-cancel", Some(json!({"device": "virtio0"})), TO)
        .await?;
    wait_for(&mut ev, "BLOCK_JOB_COMPLETED", "device", "virtio0").await?;
    src.execute_timeout(
        "migrate-continue",
        Some(json!({"state": "pre-switchover"})),
        TO,
    )
    .await?;
    wait_for(&mut ev, "MIGRATION", "status", "completed").await?;
    let info = src.execute_timeout("query-migrate", None, TO).await?;
    // the destination runs on its own disk
    let t_run = Instant::now();
    loop {
        let s = dst.execute_timeout("query-status", None, TO).await?;
        if s["status"] == "running" {
            break;
        }
        if t_run.elapsed() > TO {
            bail!("the destination did not run: {s}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let total_s = t.elapsed().as_secs_f64();
    dst.execute_timeout("nbd-server-stop", None, TO).await?;
    let wire = bed.sites.a_tx_bytes()? - tx0;
    let _ = src.execute_timeout("quit", None, TO).await;
    let gap = tokio::task::block_in_place(|| bed.continuity())?;
    let disk = jobs[0]["offset"]
        .as_f64()
        .or_else(|| ready["offset"].as_f64())
        .context("mirror job length")?;
    Ok((
        Native {
            total_s,
            qemu_downtime_ms: info["downtime"].as_u64(),
            guest_gap: gap,
            disk_bytes: disk as u64,
            memory_bytes: info["ram"]["transferred"].as_u64().unwrap_or(0),
            wire_bytes: wire,
            qemus: (src_q, dst_q),
        },
        extra,
    ))
}
