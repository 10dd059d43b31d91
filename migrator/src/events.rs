//! Progress events of a migration: rendered as progress bars on a terminal, as
//! JSON lines with `--json`, and carried over the disk server's control socket.

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    Phase {
        phase: Phase,
    },
    Progress {
        phase: Phase,
        round: u32,
        /// Bytes the link carried so far (frames included).
        wire_bytes: u64,
        /// Blocks the bulk pass still has to visit.
        bulk_remaining_blocks: u64,
        dirty_blocks: u64,
        block_size: u32,
        rate_bytes_per_s: Option<f64>,
        eta_s: Option<f64>,
    },
    /// QEMU's memory pre-copy (`query-migrate`), every half second.
    Memory {
        /// RAM bytes QEMU has sent so far / still to send in this pass.
        transferred_bytes: u64,
        remaining_bytes: u64,
        /// Guest pages dirtied per second (QEMU's estimate).
        dirty_pages_rate: u64,
        passes: u64,
        /// Memory-stream frame bytes our link carried.
        wire_bytes: u64,
    },
    Summary(Summary),
    /// Something worth telling the operator (a retry, a DNS change).
    Note {
        message: String,
    },
    Error {
        message: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// `migrator migrate`: gateways and DNS get ready.
    Prepare,
    Connect,
    Bulk,
    Dirty,
    /// A VM's memory pre-copy; the disk follows the guest's writes meanwhile.
    Memory,
    Switchover,
    Committed,
    /// `migrator migrate`: gateways and DNS switch to the new site.
    Network,
    /// `migrator migrate`: the old site's tunnel drains.
    Drain,
    Done,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            Phase::Prepare => "prepare",
            Phase::Connect => "connect",
            Phase::Bulk => "bulk copy",
            Phase::Dirty => "dirty rounds",
            Phase::Memory => "memory",
            Phase::Switchover => "switchover",
            Phase::Committed => "final blocks",
            Phase::Network => "network switch",
            Phase::Drain => "drain",
            Phase::Done => "done",
        };
        f.write_str(s)
    }
}

/// The end-of-migration report.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub disk: String,
    pub destination: String,
    pub size_bytes: u64,
    pub total_s: f64,
    /// Time writes were held at the source: freeze → commit.
    pub frozen_ms: f64,
    /// Commit → destination acknowledged the last block.
    pub final_ms: f64,
    /// Every byte written to the TLS stream (frames and headers; not TLS overhead).
    pub wire_bytes: u64,
    /// Block bytes sent as data (before compression).
    pub data_bytes: u64,
    /// Bytes sent as zero extents (no payload).
    pub zero_bytes: u64,
    /// Bytes not sent because the destination already held them (resume).
    pub resumed_bytes: u64,
    pub compressed_saved_bytes: u64,
    pub bulk_blocks: u64,
    pub resent_blocks: u64,
    pub rounds: u32,
    pub round_dirty_blocks: Vec<u64>,
    pub final_blocks: u64,
    pub fetched_blocks: u64,
    /// Deltas mode: writes forwarded as they happened.
    pub deltas: u64,
    pub writes: u64,
    pub writes_delayed: u64,
    pub write_delay_total_ms: f64,
    /// A VM migration: memory and the pause.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<Box<VmSummary>>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VmSummary {
    /// QEMU's migration stream, both directions, before compression.
    pub memory_stream_bytes: u64,
    /// The stream's frame bytes on our link.
    pub memory_wire_bytes: u64,
    /// Memory passes QEMU made (dirty syncs).
    pub passes: u64,
    /// The guest's pause as we see it: QEMU paused it at the source →
    /// the destination said it runs.
    pub paused_ms: Option<f64>,
    /// QEMU's own downtime figure at the source.
    pub qemu_downtime_ms: Option<u64>,
    pub postcopy: bool,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        writeln!(
            f,
            "migrated {} ({:.1} MiB) to {}",
            self.disk,
            mib(self.size_bytes),
            self.destination
        )?;
        writeln!(f, "  total time        {:.2} s", self.total_s)?;
        writeln!(
            f,
            "  writes held       {:.1} ms (freeze → commit)",
            self.frozen_ms
        )?;
        writeln!(
            f,
            "  final blocks      {} in {:.1} ms after commit ({} fetched on demand)",
            self.final_blocks, self.final_ms, self.fetched_blocks
        )?;
        writeln!(f, "  on the wire       {:.1} MiB (data {:.1} MiB, zero extents {:.1} MiB, zstd saved {:.1} MiB, resumed {:.1} MiB)",
            mib(self.wire_bytes), mib(self.data_bytes), mib(self.zero_bytes), mib(self.compressed_saved_bytes), mib(self.resumed_bytes))?;
        writeln!(
            f,
            "  blocks            {} bulk, {} resent in {} dirty rounds {:?}",
            self.bulk_blocks, self.resent_blocks, self.rounds, self.round_dirty_blocks
        )?;
        write!(
            f,
            "  throttling        {} of {} writes delayed, {:.1} ms in total",
            self.writes_delayed, self.writes, self.write_delay_total_ms
        )?;
        if let Some(vm) = &self.vm {
            write!(
                f,
                "\n  VM paused         {} ms (QEMU says {} ms){}\n  memory            {:.1} MiB stream as {:.1} MiB on the wire, {} passes",
                vm.paused_ms.map(|p| format!("{p:.1}")).unwrap_or_else(|| "?".into()),
                vm.qemu_downtime_ms.map(|d| d.to_string()).unwrap_or_else(|| "?".into()),
                if vm.postcopy { ", post-copy" } else { "" },
                mib(vm.memory_stream_bytes),
                mib(vm.memory_wire_bytes),
                vm.passes
            )?;
        }
        Ok(())
    }
}

/// Where events go; sending never blocks and never fails the migration.
#[derive(Clone, Debug)]
pub struct EventSink(Option<mpsc::UnboundedSender<Event>>);

impl EventSink {
    pub fn new(tx: mpsc::UnboundedSender<Event>) -> Self {
        Self(Some(tx))
    }

    pub fn none() -> Self {
        Self(None)
    }

    pub fn send(&self, e: Event) {
        if let Some(tx) = &self.0 {
            let _ = tx.send(e);
        }
    }
}
