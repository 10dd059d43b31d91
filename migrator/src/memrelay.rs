//! Carries a hypervisor's migration stream over our framed, authenticated
//! link instead of a port of its own: QEMU migrates to a unix socket at the
//! source (`migrate unix:PATH`), the destination QEMU listens on one
//! (`migrate-incoming unix:PATH`), and [`relay`] at each end moves the bytes
//! as `Mem` frames (zstd where it pays), in both directions (QEMU's return
//! path), ending each direction with `MemEnd`.

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

use crate::transport::{read_frame, unpack, write_frame, Compressor, Frame, LinkError};

/// Up to this many stream bytes per frame.
const CHUNK: usize = 256 * 1024;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayStats {
    /// Stream bytes sent to the peer / received from it.
    pub sent: u64,
    pub received: u64,
    /// Frame bytes written to the link (compression shows here).
    pub wire_sent: u64,
}

/// Relays between `hypervisor` (a connected stream socket) and `link` until
/// both directions have ended.
pub async fn relay<H, L>(hypervisor: H, link: L, compress: bool) -> Result<RelayStats, LinkError>
where
    H: AsyncRead + AsyncWrite + Unpin,
    L: AsyncRead + AsyncWrite + Unpin,
{
    let (mut h_rd, mut h_wr) = tokio::io::split(hypervisor);
    let (mut l_rd, mut l_wr) = tokio::io::split(link);
    let outbound = async {
        let mut comp = Compressor::default();
        let (mut sent, mut wire) = (0u64, 0u64);
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = h_rd.read(&mut buf).await?;
            if n == 0 {
                wire += write_frame(&mut l_wr, &Frame::MemEnd).await? as u64;
                l_wr.flush().await?;
                return Ok::<_, LinkError>((sent, wire));
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
            wire += write_frame(&mut l_wr, &f).await? as u64;
            sent += n as u64;
        }
    };
    let inbound = async {
        let mut received = 0u64;
        loop {
            match read_frame(&mut l_rd).await? {
                Some(Frame::Mem {
                    compressed,
                    raw_len,
                    payload,
                }) => {
                    let data = unpack(received, compressed, raw_len, payload)?;
                    h_wr.write_all(&data).await?;
                    received += data.len() as u64;
                }
                Some(Frame::MemEnd) | None => {
                    h_wr.shutdown().await?;
                    return Ok::<_, LinkError>(received);
                }
                Some(Frame::Error { message }) => {
                    return Err(LinkError::Io(std::io::Error::other(format!(
                        "the peer gave up the migration stream: {message}"
                    ))))
                }
                Some(other) => {
                    return Err(LinkError::Io(std::io::Error::other(format!(
                        "unexpected {other:?} on the migration stream"
                    ))))
                }
            }
        }
    };
    let ((sent, wire_sent), received) = tokio::try_join!(outbound, inbound)?;
    Ok(RelayStats {
        sent,
        received,
        wire_sent,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn both_directions_arrive_whole_and_in_order() {
        let (q1, r1) = tokio::io::duplex(1 << 16); // source QEMU ↔ source relay
        let (q2, r2) = tokio::io::duplex(1 << 16); // destination relay ↔ destination QEMU
        let (l1, l2) = tokio::io::duplex(1 << 16); // the link
        let a = tokio::spawn(relay(r1, l1, true));
        let b = tokio::spawn(relay(r2, l2, true));
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
        let sa = a.await.expect("join").expect("relay a");
        assert_eq!(
            (sa.sent, sa.received),
            (stream.len() as u64, back.len() as u64)
        );
        assert!(sa.wire_sent < sa.sent, "a repetitive stream compresses");
        b.await.expect("join").expect("relay b");
    }
}
