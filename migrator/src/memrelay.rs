//! Carries a hypervisor's migration stream over our framed, authenticated
//! link instead of a port of its own: QEMU migrates to a unix socket at the
//! source (`migrate unix:PATH`), the destination QEMU listens on one
//! (`migrate-incoming unix:PATH`). At each end [`outbound`] turns what QEMU
//! writes into `Mem` frames (zstd where it pays) for the link's writer, and
//! [`inbound`] writes the peer's `Mem` frames into QEMU, in both directions
//! (QEMU's return path). `MemEnd` ends a direction.
//!
//! The frames share the link with the disk's: the shell that owns the link
//! routes `Mem`/`MemEnd` to [`inbound`]'s channel and writes what
//! [`outbound`] produces between its own frames.

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::sync::mpsc;

use crate::transport::{unpack, Compressor, Frame, LinkError};

/// Up to this many stream bytes per frame.
const CHUNK: usize = 64 * 1024;

/// Reads the hypervisor's stream until it ends and sends it as frames,
/// `MemEnd` last. Returns the stream bytes read. Stops early (error) when the
/// link's writer has gone.
pub async fn outbound<R>(
    mut hypervisor: R,
    link: mpsc::Sender<Frame>,
    compress: bool,
) -> Result<u64, LinkError>
where
    R: AsyncRead + Unpin,
{
    let gone = || LinkError::Io(std::io::Error::other("the migration link closed"));
    let mut comp = Compressor::default();
    let mut sent = 0u64;
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = hypervisor.read(&mut buf).await?;
        if n == 0 {
            link.send(Frame::MemEnd).await.map_err(|_| gone())?;
            return Ok(sent);
        }
        let (compressed, payload) = if compress {
            comp.pack(buf[..n].to_vec())
        } else {
            (false, buf[..n].to_vec())
        };
        let f = Frame::Mem {
            compressed,
            raw_len: n as u32,
            payload,
        };
        link.send(f).await.map_err(|_| gone())?;
        sent += n as u64;
    }
}

/// Writes the peer's `Mem` frames into the hypervisor until `MemEnd` (then
/// shuts the write side) or until the channel closes (the link is gone: an
/// error). Returns the stream bytes written.
pub async fn inbound<W>(
    mut frames: mpsc::Receiver<Frame>,
    mut hypervisor: W,
) -> Result<u64, LinkError>
where
    W: AsyncWrite + Unpin,
{
    let mut received = 0u64;
    loop {
        match frames.recv().await {
            Some(Frame::Mem {
                compressed,
                raw_len,
                payload,
            }) => {
                let data = unpack(received, compressed, raw_len, payload)?;
                hypervisor.write_all(&data).await?;
                received += data.len() as u64;
            }
            Some(Frame::MemEnd) => {
                hypervisor.shutdown().await?;
                return Ok(received);
            }
            Some(other) => {
                return Err(LinkError::Io(std::io::Error::other(format!(
                    "unexpected {other:?} on the migration stream"
                ))))
            }
            None => {
                return Err(LinkError::Io(std::io::Error::other(
                    "the migration link closed in the middle of the memory stream",
                )))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both ends as the shells wire them: outbound's frames go through a
    /// channel (the link) into the other end's inbound.
    #[tokio::test]
    async fn both_directions_arrive_whole_and_in_order() {
        let (q1, r1) = tokio::io::duplex(1 << 16); // source QEMU ↔ source end
        let (q2, r2) = tokio::io::duplex(1 << 16); // destination end ↔ destination QEMU
        let (r1r, r1w) = tokio::io::split(r1);
        let (r2r, r2w) = tokio::io::split(r2);
        let (ab_tx, ab_rx) = mpsc::channel(4);
        let (ba_tx, ba_rx) = mpsc::channel(4);
        let a_out = tokio::spawn(outbound(r1r, ab_tx, true));
        let b_in = tokio::spawn(inbound(ab_rx, r2w));
        let b_out = tokio::spawn(outbound(r2r, ba_tx, true));
        let a_in = tokio::spawn(inbound(ba_rx, r1w));
        let stream: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let back = b"return path".to_vec();
        let (mut q1r, mut q1w) = tokio::io::split(q1);
        let (mut q2r, mut q2w) = tokio::io::split(q2);
        let s = stream.clone();
        let send = tokio::spawn(async move {
            q1w.write_all(&s).await.expect("write");
            q1w.shutdown().await.expect("shutdown");
        });
        let bk = back.clone();
        let reply = tokio::spawn(async move {
            q2w.write_all(&bk).await.expect("write");
            q2w.shutdown().await.expect("shutdown");
        });
        let mut got = Vec::new();
        q2r.read_to_end(&mut got).await.expect("read");
        let mut got_back = Vec::new();
        q1r.read_to_end(&mut got_back).await.expect("read");
        send.await.expect("send");
        reply.await.expect("reply");
        assert_eq!(got, stream);
        assert_eq!(got_back, back);
        assert_eq!(
            a_out.await.expect("join").expect("a out"),
            stream.len() as u64
        );
        assert_eq!(
            b_in.await.expect("join").expect("b in"),
            stream.len() as u64
        );
        assert_eq!(
            b_out.await.expect("join").expect("b out"),
            back.len() as u64
        );
        assert_eq!(a_in.await.expect("join").expect("a in"), back.len() as u64);
    }

    #[tokio::test]
    async fn a_link_that_closes_mid_stream_is_an_error() {
        let (tx, rx) = mpsc::channel(1);
        let (_q, h) = tokio::io::duplex(1024);
        tx.send(Frame::Mem {
            compressed: false,
            raw_len: 3,
            payload: vec![1, 2, 3],
        })
        .await
        .expect("send");
        drop(tx);
        assert!(inbound(rx, h).await.is_err());
    }
}
