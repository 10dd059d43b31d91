//! Many datagrams per system call: `sendmmsg(2)` and `recvmmsg(2)` on a raw
//! or UDP socket, without waiting (the tokio shell waits for readiness).
//! A tunnel moves small packets at a high rate; one system call per packet
//! was its bottleneck.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::Range;
use std::os::fd::RawFd;

use socket2::SockAddr;

/// The most datagrams one call moves.
pub const BATCH: usize = 64;

/// `setsockopt(SOL_UDP, …)` and control-message types (not in libc for glibc).
pub const UDP_SEGMENT: libc::c_int = 103;
pub const UDP_GRO: libc::c_int = 104;

/// Sends `pkts` (bytes, destination) in order, one datagram each. Returns
/// how many were dealt with (at least one): sent, or refused by the kernel
/// for themselves (no route, too big), whose positions go to `refused` with
/// the error. Fails with `WouldBlock` only when not one could be sent.
pub fn send(
    fd: RawFd,
    pkts: &[(&[u8], SockAddr)],
    refused: &mut Vec<(usize, io::Error)>,
) -> io::Result<usize> {
    let singles: Vec<Range<usize>> = (0..pkts.len()).map(|i| i..i + 1).collect();
    send_groups(fd, pkts, &singles, refused)
}

/// As [`send`], a message per range of `groups` (consecutive, covering
/// `pkts` in order, all to the first packet's destination). A range of
/// more than one packet is a UDP GSO message (`UDP_SEGMENT`): the kernel
/// cuts it into datagrams of the first packet's size, so all but the last
/// must be that size and the last no larger. Counts and positions are of
/// groups.
pub fn send_groups(
    fd: RawFd,
    pkts: &[(&[u8], SockAddr)],
    groups: &[Range<usize>],
    refused: &mut Vec<(usize, io::Error)>,
) -> io::Result<usize> {
    let mut iov: Vec<libc::iovec> = pkts
        .iter()
        .map(|(b, _)| libc::iovec {
            iov_base: b.as_ptr() as *mut libc::c_void,
            iov_len: b.len(),
        })
        .collect();
    // SAFETY: CMSG_SPACE/CMSG_LEN are pure size computations.
    let (space, cmsg_len) = unsafe {
        (
            libc::CMSG_SPACE(std::mem::size_of::<u16>() as u32) as usize,
            libc::CMSG_LEN(std::mem::size_of::<u16>() as u32) as usize,
        )
    };
    let stride = space.div_ceil(8);
    let mut control: Vec<u64> = vec![0; groups.len() * stride];
    let mut msgs: Vec<libc::mmsghdr> = Vec::with_capacity(groups.len());
    for (k, g) in groups.iter().enumerate() {
        let to = &pkts[g.start].1;
        // SAFETY: an all-zero msghdr is a valid empty one.
        let mut h: libc::msghdr = unsafe { std::mem::zeroed() };
        h.msg_name = to.as_ptr() as *mut libc::c_void;
        h.msg_namelen = to.len();
        // SAFETY: g.start < iov.len() (groups cover pkts).
        h.msg_iov = unsafe { iov.as_mut_ptr().add(g.start) };
        h.msg_iovlen = g.len();
        if g.len() > 1 {
            // SAFETY: stride u64s at k*stride are inside `control`.
            h.msg_control = unsafe { control.as_mut_ptr().add(k * stride) }.cast();
            h.msg_controllen = space;
            // SAFETY: the control buffer holds one cmsg of `space` bytes,
            // aligned (u64 storage); CMSG_FIRSTHDR points into it.
            unsafe {
                let c = libc::CMSG_FIRSTHDR(&h);
                (*c).cmsg_level = libc::SOL_UDP;
                (*c).cmsg_type = UDP_SEGMENT;
                (*c).cmsg_len = cmsg_len;
                let size = pkts[g.start].0.len() as u16;
                std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), size);
            }
        }
        msgs.push(libc::mmsghdr {
            msg_hdr: h,
            msg_len: 0,
        });
    }
    let mut done = 0;
    while done < msgs.len() {
        let rest = &mut msgs[done..];
        // SAFETY: `rest` points to initialised mmsghdrs whose names, iovecs
        // and control buffers point into `pkts`, `iov` and `control`, which
        // outlive the call.
        let rc = unsafe {
            libc::sendmmsg(
                fd,
                rest.as_mut_ptr(),
                rest.len().min(u32::MAX as usize) as libc::c_uint,
                libc::MSG_DONTWAIT,
            )
        };
        if rc >= 0 {
            done += rc as usize;
            continue;
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::Interrupted => continue,
            io::ErrorKind::WouldBlock if done == 0 => return Err(e),
            io::ErrorKind::WouldBlock => break,
            // this message was refused; the rest may go
            _ => {
                refused.push((done, e));
                done += 1;
            }
        }
    }
    Ok(done)
}

/// Receive buffers for [`recv`]: up to [`BATCH`] datagrams of up to 64 KiB.
pub struct RecvBufs {
    pub bufs: Vec<Vec<u8>>,
    pub lens: Vec<usize>,
    /// The sender of each datagram (for a raw IPv4 socket, also in the
    /// packet's own header).
    pub from: Vec<Option<IpAddr>>,
    /// Datagrams cut short by a too-small buffer (cannot happen with 64 KiB
    /// buffers and IP's 64 KiB limit; counted rather than trusted).
    pub truncated: Vec<bool>,
    /// On a UDP socket with `UDP_GRO`: the size of the datagrams the kernel
    /// coalesced into this buffer (all but the last), 0 for one datagram.
    pub gro: Vec<usize>,
    /// Where the kernel writes each sender's address and control messages
    /// (kept here: a receive is on the hot path and need not allocate).
    names: Vec<libc::sockaddr_storage>,
    control: Vec<u64>,
    /// The headers handed to the kernel, pointing into the vectors above
    /// (their heap storage never moves: none of them is resized), built
    /// once: a data plane that polls calls [`recv`] very often.
    iovs: Vec<libc::iovec>,
    msgs: Vec<libc::mmsghdr>,
}

/// `u64`s of control buffer per datagram: room for one int cmsg.
const CONTROL: usize = 8;

impl Default for RecvBufs {
    fn default() -> Self {
        let mut r = Self {
            bufs: vec![vec![0u8; 65_536]; BATCH],
            lens: vec![0; BATCH],
            from: vec![None; BATCH],
            truncated: vec![false; BATCH],
            gro: vec![0; BATCH],
            // SAFETY: all-zero sockaddr_storage is a valid (unspecified) address.
            names: vec![unsafe { std::mem::zeroed() }; BATCH],
            control: vec![0; BATCH * CONTROL],
            iovs: Vec::with_capacity(BATCH),
            msgs: Vec::with_capacity(BATCH),
        };
        r.iovs.extend(r.bufs.iter_mut().map(|b| libc::iovec {
            iov_base: b.as_mut_ptr() as *mut libc::c_void,
            iov_len: b.len(),
        }));
        let iovs = r.iovs.as_mut_ptr();
        for (i, (name, control)) in r
            .names
            .iter_mut()
            .zip(r.control.chunks_mut(CONTROL))
            .enumerate()
        {
            // SAFETY: an all-zero msghdr is a valid empty one.
            let mut h: libc::msghdr = unsafe { std::mem::zeroed() };
            h.msg_name = (name as *mut libc::sockaddr_storage).cast();
            // SAFETY: i < BATCH = iovs.len()
            h.msg_iov = unsafe { iovs.add(i) };
            h.msg_iovlen = 1;
            h.msg_control = control.as_mut_ptr().cast();
            r.msgs.push(libc::mmsghdr {
                msg_hdr: h,
                msg_len: 0,
            });
        }
        r
    }
}

/// Receives what is waiting, up to [`BATCH`] datagrams, into `r`; returns
/// how many. Fails with `WouldBlock` when nothing is.
pub fn recv(fd: RawFd, r: &mut RecvBufs) -> io::Result<usize> {
    // the kernel shortened these in the last call
    for m in &mut r.msgs {
        m.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        m.msg_hdr.msg_controllen = CONTROL * 8;
        m.msg_hdr.msg_flags = 0;
    }
    let msgs = &mut r.msgs;
    let n = loop {
        // SAFETY: `msgs` points to initialised mmsghdrs whose names, iovecs
        // and control buffers point into `r`, which outlives the call.
        let rc = unsafe {
            libc::recvmmsg(
                fd,
                msgs.as_mut_ptr(),
                msgs.len() as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if rc >= 0 {
            break rc as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    for (i, m) in msgs.iter().take(n).enumerate() {
        r.lens[i] = m.msg_len as usize;
        r.truncated[i] = m.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
        r.from[i] = ip_of(&r.names[i], m.msg_hdr.msg_namelen);
        r.gro[i] = gro_size(&m.msg_hdr);
    }
    if n == 0 {
        return Err(io::ErrorKind::WouldBlock.into());
    }
    Ok(n)
}

/// The `UDP_GRO` control message's segment size, 0 without one.
fn gro_size(h: &libc::msghdr) -> usize {
    // SAFETY: the kernel filled the control buffer and set msg_controllen;
    // the CMSG_* walk stays within it.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(h);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_UDP && (*c).cmsg_type == UDP_GRO {
                let v = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>());
                return usize::try_from(v).unwrap_or(0);
            }
            c = libc::CMSG_NXTHDR(h, c);
        }
    }
    0
}

/// Turns on `UDP_GRO` (coalesced receive; see [`RecvBufs::gro`]). False
/// where the kernel has no such option.
pub fn enable_gro(fd: RawFd) -> bool {
    set_int(fd, libc::SOL_UDP, UDP_GRO, 1)
}

/// Whether the kernel accepts UDP GSO on this socket (probes `UDP_SEGMENT`
/// with 0, which leaves it off).
pub fn gso_supported(fd: RawFd) -> bool {
    set_int(fd, libc::SOL_UDP, UDP_SEGMENT, 0)
}

fn set_int(fd: RawFd, level: libc::c_int, name: libc::c_int, v: libc::c_int) -> bool {
    // SAFETY: a socket fd, a pointer to a live c_int and its size.
    unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        ) == 0
    }
}

/// The address in a `sockaddr_storage` the kernel filled in.
fn ip_of(s: &libc::sockaddr_storage, len: libc::socklen_t) -> Option<IpAddr> {
    let len = len as usize;
    match i32::from(s.ss_family) {
        libc::AF_INET if len >= std::mem::size_of::<libc::sockaddr_in>() => {
            // SAFETY: the family says sockaddr_in, and the length covers it.
            let a = unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr))))
        }
        libc::AF_INET6 if len >= std::mem::size_of::<libc::sockaddr_in6>() => {
            // SAFETY: the family says sockaddr_in6, and the length covers it.
            let a = unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            Some(IpAddr::V6(Ipv6Addr::from(a.sin6_addr.s6_addr)))
        }
        _ => None,
    }
}

/// A destination for [`send`].
pub fn to(addr: IpAddr, port: u16) -> SockAddr {
    SockAddr::from(SocketAddr::new(addr, port))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd as _;

    /// Over loopback UDP: a batch goes out in one call and comes back in
    /// order, with its sender; a refused packet does not stop the rest.
    #[test]
    fn a_batch_goes_and_comes_back_whole() {
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let dst = to(
            rx.local_addr().expect("addr").ip(),
            rx.local_addr().expect("addr").port(),
        );
        let payloads: Vec<Vec<u8>> = (0..40u8).map(|i| vec![i; 100 + usize::from(i)]).collect();
        let too_big = vec![0u8; 70_000];
        let mut pkts: Vec<(&[u8], SockAddr)> = payloads
            .iter()
            .map(|p| (p.as_slice(), dst.clone()))
            .collect();
        pkts.insert(10, (too_big.as_slice(), dst.clone()));
        let mut refused = Vec::new();
        let mut sent = 0;
        while sent < pkts.len() {
            sent += send(tx.as_raw_fd(), &pkts[sent..], &mut refused).expect("send");
        }
        assert_eq!(refused.len(), 1, "{refused:?}");
        assert_eq!(refused[0].0, 10);

        let mut r = RecvBufs::default();
        let mut got = Vec::new();
        let t = std::time::Instant::now();
        while got.len() < payloads.len() && t.elapsed() < std::time::Duration::from_secs(5) {
            match recv(rx.as_raw_fd(), &mut r) {
                Ok(n) => {
                    for i in 0..n {
                        assert!(!r.truncated[i]);
                        assert_eq!(r.from[i], Some(tx.local_addr().expect("addr").ip()));
                        got.push(r.bufs[i][..r.lens[i]].to_vec());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(std::time::Duration::from_millis(5))
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(got, payloads);
        assert_eq!(
            recv(rx.as_raw_fd(), &mut r).map_err(|e| e.kind()).err(),
            Some(io::ErrorKind::WouldBlock)
        );
    }

    /// A UDP GSO train leaves as separate datagrams of the first one's
    /// size; a receiver without GRO reads them one by one, a receiver with
    /// GRO reads them coalesced with their size, and both see the same bytes.
    #[test]
    fn a_gso_train_arrives_as_the_datagrams_it_holds() {
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        if !gso_supported(tx.as_raw_fd()) {
            eprintln!("no UDP GSO on this kernel; nothing to test");
            return;
        }
        let payloads: Vec<Vec<u8>> = (0..10u8)
            .map(|i| vec![i; if i == 9 { 300 } else { 1000 }])
            .collect();
        for gro in [false, true] {
            let rx = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
            if gro {
                assert!(enable_gro(rx.as_raw_fd()));
            }
            let a = rx.local_addr().expect("addr");
            let pkts: Vec<(&[u8], SockAddr)> = payloads
                .iter()
                .map(|p| (p.as_slice(), to(a.ip(), a.port())))
                .collect();
            let mut refused = Vec::new();
            let train = std::iter::once(0..payloads.len()).collect::<Vec<_>>();
            let sent = send_groups(tx.as_raw_fd(), &pkts, &train, &mut refused).expect("send");
            assert_eq!((sent, refused.len()), (1, 0), "{refused:?}");

            let mut r = RecvBufs::default();
            let (mut got, mut reads): (Vec<Vec<u8>>, usize) = (Vec::new(), 0);
            let t = std::time::Instant::now();
            while got.len() < payloads.len() && t.elapsed() < std::time::Duration::from_secs(5) {
                match recv(rx.as_raw_fd(), &mut r) {
                    Ok(n) => {
                        reads += n;
                        for i in 0..n {
                            let buf = &r.bufs[i][..r.lens[i]];
                            let size = if r.gro[i] == 0 { buf.len() } else { r.gro[i] };
                            got.extend(buf.chunks(size).map(|c| c.to_vec()));
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        std::thread::sleep(std::time::Duration::from_millis(5))
                    }
                    Err(e) => panic!("{e}"),
                }
            }
            assert_eq!(got, payloads, "gro {gro}");
            // loopback hands the train over whole to a GRO socket
            assert_eq!(reads, if gro { 1 } else { payloads.len() });
        }
    }
}
