//! The TUN device with offloads (`IFF_VNET_HDR`, TSO/checksum): the kernel
//! hands us TCP super-packets of up to 64 KiB in one read, which
//! [`Tun::recv`] splits into MTU-sized packets with complete checksums; and
//! [`Tun::send`] coalesces consecutive segments of a TCP flow back into one
//! super-packet per write (GRO). Per 64 KiB of a bulk flow that is one
//! system call instead of forty-five, each way; on the wire between the
//! gateways nothing changes (the packets are the ones a plain TUN device
//! would carry).

use std::io;

use tun_rs::{AsyncDevice, DeviceBuilder, GROTable, IDEAL_BATCH_SIZE, VIRTIO_NET_HDR_LEN};

/// Room in front of each packet for the virtio header the kernel expects.
const HEADROOM: usize = VIRTIO_NET_HDR_LEN;

pub struct Tun {
    dev: AsyncDevice,
}

/// Creates TUN device `name` (IP packets, offloads on) with `mtu`, brings
/// it up and sets loose reverse-path filtering on it (packets written to it
/// come from anywhere; strict filtering would drop what we deliver). Needs
/// CAP_NET_ADMIN.
pub fn open(name: &str, mtu: u16) -> anyhow::Result<Tun> {
    use anyhow::Context as _;
    let dev = DeviceBuilder::new()
        .name(name)
        .mtu(mtu)
        .offload(true)
        .build_async()
        .with_context(|| {
            format!("cannot create TUN device {name} (run as root; is /dev/net/tun there?)")
        })?;
    let rp = format!("/proc/sys/net/ipv4/conf/{name}/rp_filter");
    std::fs::write(&rp, "2").with_context(|| format!("cannot write {rp}"))?;
    Ok(Tun { dev })
}

/// Packets read in one go (a split super-packet, or one plain packet).
pub struct RecvBatch {
    original: Vec<u8>,
    bufs: Vec<Vec<u8>>,
    sizes: Vec<usize>,
    n: usize,
}

impl Default for RecvBatch {
    fn default() -> Self {
        Self {
            original: vec![0; VIRTIO_NET_HDR_LEN + 65_535],
            bufs: vec![vec![0; HEADROOM + 65_535]; IDEAL_BATCH_SIZE],
            sizes: vec![0; IDEAL_BATCH_SIZE],
            n: 0,
        }
    }
}

impl RecvBatch {
    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    pub fn packet(&self, i: usize) -> &[u8] {
        &self.bufs[i][HEADROOM..HEADROOM + self.sizes[i]]
    }

    pub fn packet_mut(&mut self, i: usize) -> &mut [u8] {
        &mut self.bufs[i][HEADROOM..HEADROOM + self.sizes[i]]
    }
}

/// Packets to write, coalesced where they can be.
#[derive(Default)]
pub struct SendBatch {
    bufs: Vec<Vec<u8>>,
    n: usize,
    gro: GROTable,
}

impl SendBatch {
    pub fn push(&mut self, pkt: &[u8]) {
        if self.n == self.bufs.len() {
            self.bufs.push(Vec::with_capacity(HEADROOM + 1500));
        }
        let b = &mut self.bufs[self.n];
        b.clear();
        b.resize(HEADROOM, 0);
        b.extend_from_slice(pkt);
        self.n += 1;
    }

    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }
}

impl Tun {
    /// The next packets from the kernel (at least one).
    pub async fn recv(&self, b: &mut RecvBatch) -> io::Result<()> {
        loop {
            match self
                .dev
                .recv_multiple(&mut b.original, &mut b.bufs, &mut b.sizes, HEADROOM)
                .await
            {
                Ok(0) => continue,
                Ok(n) => {
                    b.n = n;
                    return Ok(());
                }
                // a malformed super-packet from the kernel is not worth
                // stopping for; the kernel's own packets are the only input
                Err(e) if e.kind() == io::ErrorKind::Other => {
                    tracing::debug!(error = %e, "cannot split a packet from the TUN device");
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Writes the batch (coalescing TCP and UDP segments of a flow) and
    /// empties it. `Ok(false)`: the kernel refused some of it (a packet the
    /// device's MTU does not allow, say); a router drops those too, the
    /// caller counts it.
    pub async fn send(&self, b: &mut SendBatch) -> io::Result<bool> {
        if b.n == 0 {
            return Ok(true);
        }
        let r = self
            .dev
            .send_multiple(&mut b.gro, &mut b.bufs[..b.n], HEADROOM)
            .await;
        b.n = 0;
        match r {
            Ok(_) => Ok(true),
            Err(e) if e.raw_os_error() != Some(libc::EBADFD) => {
                tracing::debug!(error = %e, "the TUN device refused a packet");
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }
}
