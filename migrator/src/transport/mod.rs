//! The migration link: one TLS 1.3 connection (pinned keys) carrying frames.
//!
//! ```text
//!  source                                   destination
//!  Hello{version,name,size,block_size} ──▶  open/create DIR/name.img, check room
//!                                      ◀──  Hashes{(block,hash)…}*  Welcome
//!  Data / Zero (bulk, then dirty rounds) ─▶ written in place (before commit the
//!                                           destination serves nothing)
//!  [writes frozen] Prepare{final blocks} ─▶ fsync image, record pending set
//!                                      ◀──  Ready
//!  [source records `in doubt`]
//!  Commit                              ──▶  records `committed` (fsync): THE decision
//!                                      ◀──  CommitAck
//!  [source: moved, refuses writes]          authority: serves NBD now; reads of
//!                                           pending blocks wait / send Fetch
//!  Data (final blocks, Fetch first)    ──▶  applied unless a guest write replaced them
//!                                      ◀──  Fetch{block}  (any time after Commit)
//!  Done                                ──▶  all landed ─▶ DoneAck
//! ```
//!
//! A VM migration adds, on the same link:
//!
//! ```text
//!  VmStart{postcopy} (after Welcome)   ──▶  start QEMU -S -incoming, disk = the
//!                                      ◀──  VmReady        export, writes held
//!  [disk converged: it follows each write while QEMU pre-copies memory]
//!  Mem{…}* MemEnd  (QEMU's stream)     ◀─▶  Mem{…}* MemEnd (its return path)
//!  [QEMU paused at pre-switchover] Prepare, migrate-continue
//!                                      ◀──  Ready, VmLoaded (state loaded, paused)
//!  Commit                              ──▶  disk opens, `cont` ─▶ VmResumed
//! ```
//! With post-copy, `Commit` comes before `migrate-continue` (the source can
//! no longer resume once the destination may run) and `Mem` frames go on
//! after `Done` until the last page has moved.
//!
//! Receiver states (destination): `Handshake → Receiving → Prepared → Committed →
//! Complete`. A link break before `Commit` leaves the source authoritative and the
//! destination's partial image in place; the next `Hello` for the same name
//! answers with block hashes so only differing blocks travel again.
//!
//! **The destination decides.** Its durable `committed` record is the commit.
//! A source that loses the link between `Commit` and `CommitAck` is in doubt:
//! its VM stays paused and its writes held while it asks, on a new link:
//!
//! ```text
//!  Query{version,name}                 ──▶  fences every older link for `name`
//!                                           (it can no longer commit), then
//!                                      ◀──  State{none | committed{pending} | complete}
//!  none: the source resumes (rolls back); committed: the link goes on as after
//!  CommitAck, with exactly the blocks still pending; complete: nothing to send.
//! ```
//! The same `Query` resumes the final blocks after a break past the commit.
//! A newer `Hello` for a disk likewise fences and ends an older, silent link.
//! Links detect silence with TCP keepalive and `TCP_USER_TIMEOUT`
//! ([`detect_silence`]).

pub mod frame;
pub mod tls;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub use frame::{Frame, FrameError};

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("link I/O failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("peer sent a malformed frame: {0}")]
    Frame(#[from] FrameError),
    #[error("link closed in the middle of a frame")]
    Truncated,
    #[error("cannot decompress block at offset {offset}: {reason}")]
    Decompress { offset: u64, reason: String },
}

/// A link whose peer has gone silent (a black hole, a dead host) is
/// released in about 20 s instead of hanging: keepalive probes after 5 s of
/// silence, and unacknowledged data for 20 s closes the connection.
pub fn detect_silence(tcp: &tokio::net::TcpStream) {
    use std::os::fd::AsRawFd as _;
    let fd = tcp.as_raw_fd();
    let set = |level: libc::c_int, opt: libc::c_int, v: libc::c_int| {
        // SAFETY: a valid socket and a properly sized option value.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                level,
                opt,
                (&v as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            tracing::debug!(opt, "setsockopt: {}", std::io::Error::last_os_error());
        }
    };
    set(libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1);
    set(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 5);
    set(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 2);
    set(libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 5);
    set(libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, 20_000);
}

/// Read one frame; `Ok(None)` on a clean end of stream between frames.
pub async fn read_frame<R: AsyncRead + Unpin>(rd: &mut R) -> Result<Option<Frame>, LinkError> {
    let mut h = [0u8; frame::HEADER_LEN];
    let mut got = 0;
    while got < h.len() {
        let n = rd.read(&mut h[got..]).await?;
        if n == 0 {
            return if got == 0 {
                Ok(None)
            } else {
                Err(LinkError::Truncated)
            };
        }
        got += n;
    }
    let (kind, len) = Frame::header(&h)?;
    let mut payload = vec![0u8; len as usize];
    rd.read_exact(&mut payload)
        .await
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => LinkError::Truncated,
            _ => LinkError::Io(e),
        })?;
    Ok(Some(Frame::parse(kind, &payload)?))
}

pub async fn write_frame<W: AsyncWrite + Unpin>(wr: &mut W, f: &Frame) -> Result<usize, LinkError> {
    let b = f.emit();
    wr.write_all(&b).await?;
    Ok(b.len())
}

/// A link's write half shared by several producers (disk blocks, the memory
/// stream): whole frames interleave, in the order the lock is granted (FIFO).
pub struct SharedWriter<W> {
    inner: tokio::sync::Mutex<W>,
}

impl<W: AsyncWrite + Unpin> SharedWriter<W> {
    pub fn new(w: W) -> Self {
        Self {
            inner: tokio::sync::Mutex::new(w),
        }
    }

    /// Writes one frame; its length on the link.
    pub async fn send(&self, f: &Frame) -> Result<usize, LinkError> {
        write_frame(&mut *self.inner.lock().await, f).await
    }

    pub async fn flush(&self) -> Result<(), LinkError> {
        Ok(self.inner.lock().await.flush().await?)
    }

    pub async fn shutdown(&self) {
        let _ = self.inner.lock().await.shutdown().await;
    }
}

/// Adaptive zstd: compress when it pays, and after a run of incompressible blocks
/// stop trying for a while (random data costs CPU and saves nothing).
#[derive(Debug, Default)]
pub struct Compressor {
    skip: u32,
    misses: u32,
    pub saved: u64,
}

impl Compressor {
    /// Returns `(compressed?, payload)`.
    pub fn pack(&mut self, data: Vec<u8>) -> (bool, Vec<u8>) {
        if self.skip > 0 {
            self.skip -= 1;
            return (false, data);
        }
        match zstd::bulk::compress(&data, 1) {
            Ok(c) if c.len() + c.len() / 16 < data.len() => {
                self.misses = 0;
                self.saved += (data.len() - c.len()) as u64;
                (true, c)
            }
            _ => {
                self.misses += 1;
                if self.misses >= 4 {
                    self.skip = 64;
                    self.misses = 0;
                }
                (false, data)
            }
        }
    }
}

/// Decode a Data frame's payload to the block's bytes.
pub fn unpack(
    offset: u64,
    compressed: bool,
    raw_len: u32,
    payload: Vec<u8>,
) -> Result<Vec<u8>, LinkError> {
    if !compressed {
        return Ok(payload);
    }
    let out =
        zstd::bulk::decompress(&payload, raw_len as usize).map_err(|e| LinkError::Decompress {
            offset,
            reason: e.to_string(),
        })?;
    if out.len() != raw_len as usize {
        return Err(LinkError::Decompress {
            offset,
            reason: format!("{} bytes instead of {raw_len}", out.len()),
        });
    }
    Ok(out)
}
