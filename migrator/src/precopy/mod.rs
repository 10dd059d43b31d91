//! Disk pre-copy as a sans-I/O state machine.
//!
//! ```text
//!   Bulk ──(ranges done)──▶ Round 1 ──▶ Round 2 ──▶ … ──(dirty ≤ budget)──▶ Switchover
//!                                              └──(round == max_rounds)──▶ NotConverged
//! ```
//!
//! Inputs: [`Engine::handle_write`] (after a guest write reached the image, before it
//! is acknowledged), [`Engine::handle_sent`] (bytes the link drained). Output:
//! [`Engine::poll_transmit`] says which blocks to read and send next. The dirty bit of
//! a block is cleared *before* the shell reads it, and set *after* a write completes,
//! so a write racing with a read always leaves the block dirty for the next round:
//! no acknowledged write can be missed. The caller passes `now`; nothing here reads a
//! clock or touches a file.

pub mod dirty;
pub mod throttle;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dirty::Bitmap;
use throttle::{RateMeter, Throttle, ThrottleConfig};

/// Tracking granularity (QEMU's drive-mirror uses the same default).
pub const DEFAULT_BLOCK_SIZE: u32 = 64 * 1024;

/// How writes during the migration reach the destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Mark blocks dirty and resend them in rounds (default).
    #[default]
    Dirty,
    /// Forward every write as a delta, in order, as the research prototype did.
    Deltas,
}

/// One forwarded write (deltas mode).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delta {
    Data { offset: u64, data: Arc<Vec<u8>> },
    Zero { offset: u64, len: u64 },
}

impl Delta {
    pub fn len(&self) -> u64 {
        match self {
            Delta::Data { data, .. } => data.len() as u64,
            Delta::Zero { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn offset(&self) -> u64 {
        match self {
            Delta::Data { offset, .. } | Delta::Zero { offset, .. } => *offset,
        }
    }
}

/// Queued deltas beyond this mean the guest outruns the link: give up.
pub const MAX_DELTA_BYTES: u64 = 1 << 30;

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub mode: Mode,
    pub block_size: u32,
    /// Give up (and roll back) after this many iterative rounds without converging.
    pub max_rounds: u32,
    /// The final dirty set may hold what the link drains in this time.
    pub downtime_target: Duration,
    /// The final dirty set may always hold this many blocks.
    pub min_final_blocks: u64,
    /// `None` disables throttling.
    pub throttle: Option<ThrottleConfig>,
    /// Most contiguous blocks handed out by one `poll_transmit`.
    pub max_run: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            mode: Mode::Dirty,
            block_size: DEFAULT_BLOCK_SIZE,
            max_rounds: 30,
            downtime_target: Duration::from_millis(300),
            min_final_blocks: 16,
            throttle: Some(ThrottleConfig::default()),
            max_run: 16,
        }
    }
}

/// What the shell should do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transmit {
    /// Read and send blocks `[start, start + count)`; their dirty bits are cleared.
    Blocks { start: u64, count: u64 },
    /// Deltas mode: send [`Engine::pop_delta`] next.
    Delta,
    /// The dirty set fits the downtime budget: hold new writes, wait for writes in
    /// flight, then call [`Engine::handle_frozen`].
    Switchover,
    /// `max_rounds` passed and the dirty set still exceeds the budget.
    NotConverged { rounds: u32, dirty_blocks: u64 },
    /// Following ([`Engine::follow`]): nothing is dirty now; ask again after
    /// the next write.
    Idle,
}

#[derive(Debug, Clone)]
enum Phase {
    Bulk {
        ranges: Vec<(u64, u64)>,
        idx: usize,
        next: u64,
    },
    Round {
        queue: Vec<u64>,
        pos: usize,
    },
    Switchover,
    /// Converged, but the switchover waits for something else (a VM's memory):
    /// each block is sent as soon as it is dirtied.
    Following,
    Frozen,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Stats {
    pub rounds: u32,
    pub bulk_blocks: u64,
    pub resent_blocks: u64,
    pub bytes_sent: u64,
    /// Dirty blocks at the start of each iterative round.
    pub round_dirty: Vec<u64>,
    pub writes: u64,
    pub writes_delayed: u64,
    pub delay_total: Duration,
    pub final_blocks: u64,
    pub deltas: u64,
    pub delta_bytes: u64,
}

#[derive(Debug)]
pub struct Engine {
    cfg: Config,
    blocks: u64,
    dirty: Bitmap,
    phase: Phase,
    drain: RateMeter,
    dirtying: RateMeter,
    throttle: Option<Throttle>,
    stats: Stats,
    deltas: VecDeque<Delta>,
    queued_bytes: u64,
}

impl Engine {
    /// `size` bytes of disk; `ranges` are the block ranges `(start, count)` the bulk
    /// pass must visit (allocated data at the source, plus whatever the destination
    /// holds that may need overwriting), sorted and non-overlapping.
    pub fn new(cfg: Config, size: u64, mut ranges: Vec<(u64, u64)>) -> Self {
        let blocks = size.div_ceil(cfg.block_size as u64);
        ranges.retain(|r| r.1 > 0);
        let next = ranges.first().map(|r| r.0).unwrap_or(0);
        Self {
            throttle: cfg.throttle.map(Throttle::new),
            blocks,
            dirty: Bitmap::new(blocks),
            phase: Phase::Bulk {
                ranges,
                idx: 0,
                next,
            },
            drain: RateMeter::new(Duration::from_millis(250)),
            dirtying: RateMeter::new(Duration::from_millis(250)),
            stats: Stats::default(),
            deltas: VecDeque::new(),
            queued_bytes: 0,
            cfg,
        }
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// A new pause budget for the switchover, from the next check on.
    pub fn set_downtime_target(&mut self, d: Duration) {
        self.cfg.downtime_target = d;
    }

    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    pub fn dirty_blocks(&self) -> u64 {
        self.dirty.count()
    }

    pub fn is_bulk(&self) -> bool {
        matches!(self.phase, Phase::Bulk { .. })
    }

    /// Blocks the bulk pass still has to visit.
    pub fn bulk_remaining(&self) -> u64 {
        match &self.phase {
            Phase::Bulk { ranges, idx, next } => match ranges.get(*idx) {
                None => 0,
                Some(r) => r.0 + r.1 - next + ranges[idx + 1..].iter().map(|r| r.1).sum::<u64>(),
            },
            _ => 0,
        }
    }

    /// Link drain rate in bytes per second, once measured.
    pub fn drain_rate(&self) -> Option<f64> {
        self.drain.rate()
    }

    /// Rate at which the guest dirties new blocks, bytes per second.
    pub fn dirty_rate(&self) -> Option<f64> {
        self.dirtying.rate()
    }

    fn ahead_of_bulk(&self, b: u64) -> bool {
        let Phase::Bulk { ranges, idx, next } = &self.phase else {
            return false;
        };
        let i = ranges.partition_point(|r| r.0 + r.1 <= b);
        match ranges.get(i) {
            Some(r) if r.0 <= b => i > *idx || (i == *idx && b >= *next),
            _ => false,
        }
    }

    /// A guest write to `[offset, offset+len)` has reached the image. Returns how
    /// long to delay its acknowledgement (zero without throttling).
    pub fn handle_write(&mut self, offset: u64, len: u64, now: Instant) -> Duration {
        self.stats.writes += 1;
        if len == 0 {
            return Duration::ZERO;
        }
        let bs = self.cfg.block_size as u64;
        let first = offset / bs;
        let last = (offset + len - 1) / bs;
        let mut fresh = 0u64;
        for b in first..=last.min(self.blocks.saturating_sub(1)) {
            if self.ahead_of_bulk(b) {
                continue; // the bulk pass will read it later anyway
            }
            fresh += self.dirty.set(b) as u64;
        }
        self.charge(fresh * bs, now)
    }

    /// Record `new_bytes` of new work from the guest and return the throttle
    /// delay for the write that caused it (none once switchover is decided).
    fn charge(&mut self, new_bytes: u64, now: Instant) -> Duration {
        self.dirtying.record(new_bytes, now);
        let delay = match (&mut self.throttle, &self.phase) {
            // Following: the link carries the memory now, so the disk's drain
            // rate says nothing; QEMU's auto-converge slows a guest that
            // outruns the link.
            (Some(t), Phase::Bulk { .. } | Phase::Round { .. }) => {
                t.charge(new_bytes, self.drain.rate(), now)
            }
            _ => Duration::ZERO,
        };
        if !delay.is_zero() {
            self.stats.writes_delayed += 1;
            self.stats.delay_total += delay;
        }
        delay
    }

    /// Deltas mode: a write reached the image; queue it for the destination
    /// unless the bulk pass will read its range later anyway. Returns the delay.
    pub fn handle_delta(&mut self, delta: Delta, now: Instant) -> Duration {
        self.stats.writes += 1;
        if delta.is_empty() {
            return Duration::ZERO;
        }
        let bs = self.cfg.block_size as u64;
        let (first, last) = (delta.offset() / bs, (delta.offset() + delta.len() - 1) / bs);
        if (first..=last).all(|b| self.ahead_of_bulk(b)) {
            return Duration::ZERO;
        }
        let n = delta.len();
        self.queued_bytes += n;
        self.deltas.push_back(delta);
        self.charge(n, now)
    }

    /// The next queued delta (deltas mode), in write order.
    pub fn pop_delta(&mut self) -> Option<Delta> {
        let d = self.deltas.pop_front()?;
        self.queued_bytes -= d.len();
        self.stats.deltas += 1;
        self.stats.delta_bytes += d.len();
        Some(d)
    }

    /// The link drained `bytes` (payload and framing) at `now`.
    pub fn handle_sent(&mut self, bytes: u64, now: Instant) {
        self.stats.bytes_sent += bytes;
        self.drain.record(bytes, now);
    }

    fn budget_blocks(&self) -> u64 {
        let by_rate = self
            .drain
            .rate()
            .map(|r| {
                (r * self.cfg.downtime_target.as_secs_f64()) as u64 / self.cfg.block_size as u64
            })
            .unwrap_or(0);
        by_rate.max(self.cfg.min_final_blocks)
    }

    /// The next thing to send.
    pub fn poll_transmit(&mut self, _now: Instant) -> Option<Transmit> {
        if matches!(self.phase, Phase::Bulk { .. } | Phase::Round { .. }) {
            if self.queued_bytes > MAX_DELTA_BYTES {
                return Some(Transmit::NotConverged {
                    rounds: 0,
                    dirty_blocks: self.queued_bytes / self.cfg.block_size as u64,
                });
            }
            if !self.deltas.is_empty() {
                return Some(Transmit::Delta);
            }
        }
        loop {
            match &mut self.phase {
                Phase::Bulk { ranges, idx, next } => {
                    if let Some(&(start, count)) = ranges.get(*idx) {
                        let end = start + count;
                        let from = (*next).max(start);
                        let n = (end - from).min(self.cfg.max_run);
                        *next = from + n;
                        if *next >= end {
                            *idx += 1;
                            *next = ranges.get(*idx).map(|r| r.0).unwrap_or(0);
                        }
                        for b in from..from + n {
                            self.dirty.clear(b);
                        }
                        self.stats.bulk_blocks += n;
                        return Some(Transmit::Blocks {
                            start: from,
                            count: n,
                        });
                    }
                    if let Some(t) = self.end_of_round() {
                        return Some(t);
                    }
                }
                Phase::Round { queue, pos } => {
                    // Next queued block that is still dirty, extended over its
                    // dirty successors.
                    while let Some(&b) = queue.get(*pos) {
                        *pos += 1;
                        if !self.dirty.clear(b) {
                            continue; // already sent since it was queued
                        }
                        let mut n = 1;
                        while n < self.cfg.max_run
                            && queue.get(*pos) == Some(&(b + n))
                            && self.dirty.clear(b + n)
                        {
                            *pos += 1;
                            n += 1;
                        }
                        self.stats.resent_blocks += n;
                        return Some(Transmit::Blocks { start: b, count: n });
                    }
                    if let Some(t) = self.end_of_round() {
                        return Some(t);
                    }
                }
                Phase::Switchover => return Some(Transmit::Switchover),
                Phase::Following => {
                    if !self.deltas.is_empty() {
                        return Some(Transmit::Delta);
                    }
                    let Some(b) = self.dirty.first_set() else {
                        return Some(Transmit::Idle);
                    };
                    let mut n = 0;
                    while n < self.cfg.max_run && self.dirty.clear(b + n) {
                        n += 1;
                    }
                    self.stats.resent_blocks += n;
                    return Some(Transmit::Blocks { start: b, count: n });
                }
                Phase::Frozen => return None,
            }
        }
    }

    /// Decide at a round boundary: switch over, give up, or start another round.
    fn end_of_round(&mut self) -> Option<Transmit> {
        let dirty = self.dirty.count();
        if dirty <= self.budget_blocks() {
            self.phase = Phase::Switchover;
            return Some(Transmit::Switchover);
        }
        if self.stats.rounds >= self.cfg.max_rounds {
            return Some(Transmit::NotConverged {
                rounds: self.stats.rounds,
                dirty_blocks: dirty,
            });
        }
        self.stats.rounds += 1;
        self.stats.round_dirty.push(dirty);
        self.phase = Phase::Round {
            queue: self.dirty.ones(),
            pos: 0,
        };
        None
    }

    /// After [`Transmit::Switchover`]: keep the destination current, block by
    /// block, until the shell freezes. Used while a VM's memory pre-copy runs,
    /// so the final disk set stays as small as the guest's last few writes.
    pub fn follow(&mut self) {
        if matches!(self.phase, Phase::Switchover) {
            self.phase = Phase::Following;
        }
    }

    /// Writes are held and none is in flight: returns the final dirty set (and
    /// clears it). Nothing is dirtied after this point.
    pub fn handle_frozen(&mut self) -> Vec<u64> {
        let last = self.dirty.ones();
        for &b in &last {
            self.dirty.clear(b);
        }
        self.stats.final_blocks = last.len() as u64;
        self.phase = Phase::Frozen;
        last
    }
}

#[cfg(test)]
mod tests;
