//! Load for the benchmarks: bulk TCP between namespaces, and the CPU it
//! costs the machine.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};

use crate::netns::in_netns;

/// Busy and total CPU time of the whole machine so far (`/proc/stat`,
/// clock ticks): busy is everything but idle and I/O wait.
pub fn cpu_ticks() -> Result<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().context("empty /proc/stat")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    Ok((total - idle, total))
}

/// Bytes per second from namespace `client` to a sink listening at `at`
/// in namespace `server`, over `flows` TCP connections for `secs`
/// seconds (after a half-second ramp), and the cores the whole machine
/// kept busy meanwhile.
pub fn throughput(
    client: &str,
    server: &str,
    at: SocketAddr,
    flows: usize,
    secs: u64,
) -> Result<(f64, f64)> {
    let l = in_netns(server, move || TcpListener::bind(at))??;
    let received = Arc::new(AtomicU64::new(0));
    let r = received.clone();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut conn) = conn else { break };
            let r = r.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 1 << 16];
                while let Ok(n) = conn.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    r.fetch_add(n as u64, Ordering::Relaxed);
                }
            });
        }
    });
    let stop = Arc::new(AtomicBool::new(false));
    let mut senders = Vec::new();
    for _ in 0..flows {
        let mut s = in_netns(client, move || {
            TcpStream::connect_timeout(&at, Duration::from_secs(5))
        })??;
        // a dead path must not hold a sender in write() forever
        s.set_write_timeout(Some(Duration::from_secs(2)))?;
        let stop = stop.clone();
        senders.push(std::thread::spawn(move || {
            let buf = vec![0x5au8; 1 << 16];
            while !stop.load(Ordering::Relaxed) {
                if s.write_all(&buf).is_err() {
                    break;
                }
            }
        }));
    }
    std::thread::sleep(Duration::from_millis(500)); // ramp up
    let start_bytes = received.load(Ordering::Relaxed);
    let cpu0 = cpu_ticks()?;
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(secs) && !crate::interrupt::interrupted() {
        std::thread::sleep(Duration::from_millis(100));
    }
    let bytes = received.load(Ordering::Relaxed) - start_bytes;
    let rate = bytes as f64 / t0.elapsed().as_secs_f64();
    let cpu1 = cpu_ticks()?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let busy = (cpu1.0 - cpu0.0) as f64 / ((cpu1.1 - cpu0.1).max(1) as f64) * cores;
    stop.store(true, Ordering::Relaxed);
    for s in senders {
        let _ = s.join();
    }
    crate::interrupt::check()?;
    Ok((rate, busy))
}

/// The median of `v` (NaN when empty).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}
