//! A delay line for the emulated WAN (this kernel has no netem): packets
//! routed into a TUN device come back out of it `delay` later, in order, and
//! the kernel forwards them on.

use std::os::fd::AsRawFd as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::netns::{in_netns, Netns};

/// Stops the relay's threads when dropped.
pub struct DelayLine {
    stop: Arc<AtomicBool>,
}

impl Drop for DelayLine {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Creates TUN device `dev` in `ns` and delays every packet through it.
pub fn start(ns: &Netns, dev: &str, delay: Duration) -> Result<DelayLine> {
    let name = dev.to_string();
    let device = in_netns(&ns.name, move || {
        tun_rs::DeviceBuilder::new()
            .name(name)
            .mtu(1500)
            .build_sync()
    })?
    .with_context(|| format!("cannot create TUN device {dev}"))?;
    let device = Arc::new(device);
    let out = device.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    let s = stop.clone();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        while !s.load(Ordering::Relaxed) {
            let mut pfd = libc::pollfd {
                fd: device.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let n = unsafe { libc::poll(&mut pfd, 1, 100) };
            if n <= 0 {
                continue;
            }
            match device.recv(&mut buf) {
                Ok(n) if n > 0 => {
                    if tx
                        .send((Instant::now() + delay, buf[..n].to_vec()))
                        .is_err()
                    {
                        return;
                    }
                }
                _ => return,
            }
        }
    });
    let s = stop.clone();
    std::thread::spawn(move || {
        while !s.load(Ordering::Relaxed) {
            let Ok((due, pkt)) = rx.recv_timeout(Duration::from_millis(100)) else {
                continue;
            };
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            if out.send(&pkt).is_err() {
                return;
            }
        }
    });
    Ok(DelayLine { stop })
}
