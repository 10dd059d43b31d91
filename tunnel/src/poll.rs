//! How a data-plane thread waits: it keeps trying its sources for a short
//! while after the last packet (busy polling), then sleeps in `poll(2)`.
//!
//! A thread asleep when a packet arrives is woken by the kernel, often on
//! another, idle core; on virtual machines that wake-up is slow (measured
//! here: about 55 µs per hop, four hops per round trip through two
//! gateways), while a thread still polling picks the packet up at once.
//! The spin bounds the cost: an idle gateway sleeps after `spin`.

use std::io;
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

/// The default spin: a gateway that sees a packet at least every 2 ms
/// keeps polling (about one core, yielding it to any other thread that
/// wants it), one quieter than that sleeps and uses no CPU. Measured on
/// the benchmark's bed (requests 1 ms apart): 2 ms keeps the added round
/// trip at 20–35 µs, 1 ms at 50–90 µs (the next request often comes just
/// after the spin ended), none at 130–140 µs.
pub const DEFAULT_SPIN: Duration = Duration::from_millis(2);

/// A pass that moved this many bytes is part of a bulk transfer: no
/// polling after it (a quarter of a super-packet).
pub const BULK: usize = 16 << 10;

/// Waits for input on a data-plane thread's descriptors: polls them
/// without sleeping for `spin` after the last packet, then sleeps.
#[derive(Debug)]
pub struct Idle {
    spin: Duration,
    pfds: Vec<libc::pollfd>,
}

impl Idle {
    pub fn new(spin: Duration, fds: &[RawFd]) -> Self {
        let pfds = fds
            .iter()
            .map(|&fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        Self { spin, pfds }
    }

    /// Returns once one of the descriptors has input (or a signal came);
    /// [`Idle::ready`] then says which. It looks once and, finding nothing,
    /// keeps looking for `spin` (yielding the core to any thread that wants
    /// it in between) before it sleeps; not after a pass that moved
    /// [`BULK`] bytes or more (`moved`): a bulk transfer does not need the
    /// microseconds polling saves, and polling between its batches takes
    /// CPU from the endpoints (in the benchmark, about a quarter of the
    /// machine's cycles went to it).
    pub fn wait(&mut self, moved: usize) -> io::Result<()> {
        let spin = if moved >= BULK {
            Duration::ZERO
        } else {
            self.spin
        };
        let start = Instant::now();
        loop {
            if self.poll(0)? {
                return Ok(());
            }
            if start.elapsed() >= spin {
                break;
            }
            // let a thread waiting for this core run (on a busy machine a
            // spinning thread would otherwise delay the very processes it
            // waits for)
            std::thread::yield_now();
        }
        self.poll(-1).map(|_| ())
    }

    /// Whether descriptor `i` had input (or an error) at the last wait.
    pub fn ready(&self, i: usize) -> bool {
        self.pfds.get(i).is_some_and(|p| p.revents != 0)
    }

    fn poll(&mut self, timeout_ms: i32) -> io::Result<bool> {
        for p in &mut self.pfds {
            p.revents = 0;
        }
        poll(&mut self.pfds, timeout_ms)
    }
}

/// `poll(2)`: true when a descriptor is ready, false on timeout or when a
/// signal ended the wait.
fn poll(pfds: &mut [libc::pollfd], timeout_ms: i32) -> io::Result<bool> {
    // SAFETY: `pfds` is a live array of pfds.len() pollfd structures.
    let rc = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, timeout_ms) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(false);
        }
        return Err(e);
    }
    Ok(rc > 0)
}

/// Blocks until one of `fds` has `events` (or `timeout_ms` passes, -1:
/// never); true when one has. A signal ends the wait early (false).
pub fn wait_for(fds: &[RawFd], events: libc::c_short, timeout_ms: i32) -> io::Result<bool> {
    let mut p: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events,
            revents: 0,
        })
        .collect();
    poll(&mut p, timeout_ms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn spins_then_sleeps_until_input_and_says_where() {
        let (a, b) = std::os::unix::net::UnixDatagram::pair().expect("socket pair");
        let (c, d) = std::os::unix::net::UnixDatagram::pair().expect("socket pair");
        let mut idle = Idle::new(Duration::from_millis(20), &[b.as_raw_fd(), d.as_raw_fd()]);
        // input waiting: at once, and only that descriptor is ready
        c.send(b"x").expect("send");
        idle.wait(0).expect("wait");
        assert!(!idle.ready(0) && idle.ready(1) && !idle.ready(2));
        let mut buf = [0u8; 4];
        assert_eq!(d.recv(&mut buf).expect("recv"), 1);
        // none: spins, then sleeps until a datagram arrives
        let sender = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            a.send(b"y").expect("send");
        });
        let t0 = Instant::now();
        idle.wait(0).expect("wait");
        assert!(t0.elapsed() >= Duration::from_millis(50), "it waited");
        assert!(idle.ready(0) && !idle.ready(1));
        sender.join().expect("sender");
        assert_eq!(b.recv(&mut buf).expect("recv"), 1);
    }

    #[test]
    fn wait_for_times_out_without_input() {
        let (_a, b) = std::os::unix::net::UnixDatagram::pair().expect("socket pair");
        assert!(!wait_for(&[b.as_raw_fd()], libc::POLLIN, 10).expect("poll"));
        assert!(wait_for(&[b.as_raw_fd()], libc::POLLOUT, 10).expect("poll"));
    }
}
