//! Virtual-time tests of the pre-copy engine: a simulated guest writer and a
//! rate-limited link, stepped 1 ms at a time. Reads of blocks handed out by
//! `poll_transmit` happen one step later, so writes race with them.

use super::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const BS: u64 = DEFAULT_BLOCK_SIZE as u64;

struct Sim {
    source: Vec<u64>,
    dest: Vec<u64>,
    engine: Engine,
}

#[derive(Debug)]
struct Outcome {
    converged: bool,
    stats: Stats,
    final_dirty: u64,
}

/// `writer_blocks_per_s` random single-block writes per second over the first `hot`
/// blocks; the link drains `link_blocks_per_s`.
fn run(
    seed: u64,
    cfg: Config,
    blocks: u64,
    hot: u64,
    writer_blocks_per_s: f64,
    link_blocks_per_s: f64,
) -> (Sim, Outcome) {
    let mut rng = StdRng::seed_from_u64(seed);
    let source: Vec<u64> = (0..blocks).map(|b| b + 1).collect();
    let deltas = cfg.mode == Mode::Deltas;
    let engine = Engine::new(cfg, blocks * BS, vec![(0, blocks)]);
    let mut sim = Sim {
        source,
        dest: vec![0; blocks as usize],
        engine,
    };
    let t0 = Instant::now();
    let dt = Duration::from_millis(1);
    let mut now = t0;
    let mut version = blocks + 1;
    let mut writer_next = t0;
    let interval = Duration::from_secs_f64(1.0 / writer_blocks_per_s.max(1e-9));
    let mut credit = 0.0f64;
    let mut reads: Vec<(u64, u64)> = Vec::new();
    loop {
        now += dt;
        // Reads handed out last step happen now, after any write in between.
        for (start, count) in reads.drain(..) {
            for b in start..start + count {
                sim.dest[b as usize] = sim.source[b as usize];
            }
        }
        if writer_blocks_per_s > 0.0 {
            while writer_next <= now {
                let b = rng.gen_range(0..hot);
                version += 1;
                sim.source[b as usize] = version;
                let delay = if deltas {
                    let data = Arc::new(version.to_le_bytes().to_vec());
                    sim.engine.handle_delta(
                        Delta::Data {
                            offset: b * BS,
                            data,
                        },
                        now,
                    )
                } else {
                    sim.engine.handle_write(b * BS + 512, 4096, now)
                };
                writer_next += interval + delay;
            }
        }
        credit += link_blocks_per_s * dt.as_secs_f64();
        while credit >= 1.0 {
            match sim.engine.poll_transmit(now) {
                Some(Transmit::Blocks { start, count }) => {
                    reads.push((start, count));
                    credit -= count as f64;
                    sim.engine.handle_sent(count * BS, now);
                }
                Some(Transmit::Delta) => {
                    apply_delta(&mut sim);
                    credit -= 1.0;
                }
                Some(Transmit::Switchover) => {
                    for (start, count) in reads.drain(..) {
                        for b in start..start + count {
                            sim.dest[b as usize] = sim.source[b as usize];
                        }
                    }
                    let last = sim.engine.handle_frozen();
                    while apply_delta(&mut sim) {}
                    let final_dirty = last.len() as u64;
                    for b in last {
                        sim.dest[b as usize] = sim.source[b as usize];
                    }
                    let stats = sim.engine.stats().clone();
                    return (
                        sim,
                        Outcome {
                            converged: true,
                            stats,
                            final_dirty,
                        },
                    );
                }
                Some(Transmit::NotConverged { dirty_blocks, .. }) => {
                    let stats = sim.engine.stats().clone();
                    return (
                        sim,
                        Outcome {
                            converged: false,
                            stats,
                            final_dirty: dirty_blocks,
                        },
                    );
                }
                None | Some(Transmit::Idle) => unreachable!("engine idle before switchover"),
            }
        }
    }
}

/// Pop one delta and apply it at the destination; false when none is queued.
fn apply_delta(sim: &mut Sim) -> bool {
    match sim.engine.pop_delta() {
        Some(Delta::Data { offset, data }) => {
            let mut v = [0u8; 8];
            v.copy_from_slice(&data[..8]);
            sim.dest[(offset / BS) as usize] = u64::from_le_bytes(v);
            true
        }
        Some(Delta::Zero { .. }) => unreachable!("the simulated writer writes data"),
        None => false,
    }
}

#[test]
fn deltas_mode_forwards_writes_in_order_and_converges() {
    for seed in 0..10 {
        let cfg = Config {
            mode: Mode::Deltas,
            ..Config::default()
        };
        let (sim, out) = run(seed, cfg, 800, 400, 60.0, 200.0);
        assert!(out.converged, "seed {seed}: {out:?}");
        assert_eq!(out.stats.rounds, 0, "deltas mode has no dirty rounds");
        assert!(out.stats.deltas > 0);
        assert_eq!(sim.dest, sim.source, "seed {seed}: destination differs");
    }
}

#[test]
fn idle_disk_switches_over_right_after_bulk() {
    let (sim, out) = run(1, Config::default(), 500, 1, 0.0, 200.0);
    assert!(out.converged);
    assert_eq!(out.stats.rounds, 0);
    assert_eq!(out.stats.bulk_blocks, 500);
    assert_eq!(out.final_dirty, 0);
    assert_eq!(sim.dest, sim.source);
}

#[test]
fn slow_writer_converges_and_destination_equals_source() {
    for seed in 0..20 {
        let (sim, out) = run(seed, Config::default(), 800, 400, 60.0, 200.0);
        assert!(out.converged, "seed {seed}: {out:?}");
        assert_eq!(sim.dest, sim.source, "seed {seed}: destination differs");
        assert!(out.stats.rounds >= 1);
    }
}

#[test]
fn fast_writer_does_not_converge_without_throttling() {
    let cfg = Config {
        throttle: None,
        max_rounds: 12,
        ..Config::default()
    };
    let (_, out) = run(7, cfg, 1200, 1024, 400.0, 200.0);
    assert!(!out.converged, "{out:?}");
    assert_eq!(out.stats.rounds, 12);
    // Budget: 200 blocks/s × 0.3 s = 60 blocks. The dirty set never gets near it,
    // and the last rounds are no smaller than the first.
    let rd = &out.stats.round_dirty;
    assert!(rd.iter().all(|&d| d > 300), "round dirty counts {rd:?}");
    assert!(rd[rd.len() - 1] * 2 > rd[1], "round dirty counts {rd:?}");
    assert_eq!(out.stats.writes_delayed, 0);
}

#[test]
fn fast_writer_converges_with_throttling() {
    let cfg = Config {
        max_rounds: 12,
        ..Config::default()
    };
    let (sim, out) = run(7, cfg, 1200, 1024, 400.0, 200.0);
    assert!(out.converged, "{out:?}");
    assert!(out.stats.rounds < 12, "{out:?}");
    assert!(out.stats.writes_delayed > 0);
    assert!(out.final_dirty <= 60, "{out:?}");
    assert_eq!(sim.dest, sim.source);
    // Every write's delay is capped.
    assert!(
        out.stats.delay_total
            <= ThrottleConfig::default().max_delay * out.stats.writes_delayed as u32
    );
}

#[test]
fn writes_ahead_of_the_bulk_cursor_are_not_marked() {
    let mut e = Engine::new(Config::default(), 100 * BS, vec![(0, 100)]);
    let now = Instant::now();
    e.handle_write(50 * BS, BS, now);
    assert_eq!(e.dirty_blocks(), 0);
    assert_eq!(
        e.poll_transmit(now),
        Some(Transmit::Blocks {
            start: 0,
            count: 16
        })
    );
    e.handle_write(3 * BS, 10, now);
    assert_eq!(e.dirty_blocks(), 1);
    // A write to a hole outside the bulk ranges is tracked too.
    let mut e = Engine::new(Config::default(), 100 * BS, vec![(10, 5)]);
    e.handle_write(90 * BS, 1, now);
    assert_eq!(e.dirty_blocks(), 1);
    assert_eq!(e.bulk_remaining(), 5);
}

#[test]
fn following_sends_each_write_until_frozen() {
    let cfg = Config {
        throttle: None,
        ..Config::default()
    };
    let mut e = Engine::new(cfg, 8 * BS, vec![(0, 8)]);
    let now = Instant::now();
    while let Some(t) = e.poll_transmit(now) {
        if t == Transmit::Switchover {
            break;
        }
    }
    e.follow();
    assert_eq!(e.poll_transmit(now), Some(Transmit::Idle));
    e.handle_write(3 * BS + 10, 2 * BS, now);
    assert_eq!(
        e.poll_transmit(now),
        Some(Transmit::Blocks { start: 3, count: 3 })
    );
    assert_eq!(e.poll_transmit(now), Some(Transmit::Idle));
    // a write after the last send is the final set
    e.handle_write(7 * BS, 1, now);
    assert_eq!(e.handle_frozen(), vec![7]);
    assert_eq!(e.poll_transmit(now), None);
}
