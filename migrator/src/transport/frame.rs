//! Transport frames: `u32 payload length | u8 type | payload`, big-endian.
//!
//! `Frame::check` says whether a whole frame is buffered (`Ok(None)` is not an
//! error); `Frame::parse` decodes one. Every length is bounded before allocation.

use thiserror::Error;

pub const VERSION: u16 = 3;
pub const HEADER_LEN: usize = 5;
/// Largest payload: a 16 MiB hash batch or data block plus its small header.
pub const MAX_PAYLOAD: u32 = 16 * 1024 * 1024 + 64;
/// Largest block we accept in a Data frame once decompressed.
pub const MAX_BLOCK: u32 = 16 * 1024 * 1024;
pub const HASH_LEN: usize = 16;

pub type BlockHash = [u8; HASH_LEN];

/// The hash both ends compare to decide whether a block must travel (resume).
pub fn block_hash(data: &[u8]) -> BlockHash {
    let mut h = [0u8; HASH_LEN];
    h.copy_from_slice(&blake3::hash(data).as_bytes()[..HASH_LEN]);
    h
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Source → destination, first frame.
    Hello {
        version: u16,
        name: String,
        size: u64,
        block_size: u32,
    },
    /// Destination → source: hashes of blocks the destination already holds.
    Hashes(Vec<(u64, BlockHash)>),
    /// Destination → source: ready to receive (after all `Hashes`).
    Welcome,
    /// Block content at `offset`; `payload` is zstd when `compressed`.
    Data {
        offset: u64,
        compressed: bool,
        raw_len: u32,
        payload: Vec<u8>,
    },
    /// `[offset, offset+len)` is all zeros.
    Zero {
        offset: u64,
        len: u64,
    },
    /// Source is frozen; these blocks will follow after commit.
    Prepare {
        blocks: Vec<u64>,
    },
    /// Destination has everything but `Prepare`'s blocks on stable storage.
    Ready,
    /// Source → destination: commit, please. The destination decides: it
    /// records the commit durably, answers `CommitAck`, then takes over.
    Commit,
    /// Destination → source: the commit is on stable storage here; the
    /// destination is the authority.
    CommitAck,
    /// First frame of a link that asks what the destination holds of `name`
    /// (a source in doubt, or one resuming the final blocks).
    Query {
        version: u16,
        name: String,
    },
    /// Destination → source, the answer to `Query`: the disk's durable state
    /// here and, when committed, the blocks still pending. After a
    /// `Committed` answer the link goes on as after `Commit` (Data, Done).
    State {
        state: LinkState,
        pending: Vec<u64>,
    },
    /// Source → destination: every pending block has been sent.
    Done,
    DoneAck,
    /// Destination → source: send this block next (a read is waiting for it).
    Fetch {
        block: u64,
    },
    /// Either side: a fatal error, said once before closing.
    Error {
        message: String,
    },
    /// Bytes of the hypervisor's migration stream, in the sender's direction;
    /// `payload` is zstd when `compressed`.
    Mem {
        compressed: bool,
        raw_len: u32,
        payload: Vec<u8>,
    },
    /// The migration stream ended in the sender's direction.
    MemEnd,
    /// Source → destination: start the destination VM, paused and waiting
    /// for the migration stream (`postcopy`: with post-copy enabled).
    VmStart {
        postcopy: bool,
    },
    /// Destination → source: its VM waits for the migration stream.
    VmReady,
    /// Destination → source: its VM holds the whole state, still paused.
    VmLoaded,
    /// Destination → source: after `Commit`, its VM runs.
    VmResumed,
}

/// What a destination holds of a disk, as `State` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    /// Nothing, or a copy that never committed: the source is the authority.
    None,
    /// Committed here; the listed blocks are still to come.
    Committed,
    /// Committed and every block landed.
    Complete,
}

impl LinkState {
    fn code(self) -> u8 {
        match self {
            LinkState::None => 0,
            LinkState::Committed => 1,
            LinkState::Complete => 2,
        }
    }

    fn from_code(c: u8) -> Result<Self, FrameError> {
        Ok(match c {
            0 => LinkState::None,
            1 => LinkState::Committed,
            2 => LinkState::Complete,
            other => return Err(FrameError::UnknownState(other)),
        })
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame payload of {0} bytes exceeds the limit")]
    TooLong(u32),
    #[error("unknown frame type {0}")]
    UnknownType(u8),
    #[error("truncated {0} frame")]
    Truncated(&'static str),
    #[error("{0} frame has trailing bytes")]
    Trailing(&'static str),
    #[error("{0} frame holds invalid UTF-8")]
    NotUtf8(&'static str),
    #[error("data frame claims {0} bytes uncompressed, over the limit")]
    BlockTooLarge(u32),
    #[error("unknown disk state {0} in a state frame")]
    UnknownState(u8),
}

mod t {
    pub const HELLO: u8 = 1;
    pub const HASHES: u8 = 2;
    pub const WELCOME: u8 = 3;
    pub const DATA: u8 = 4;
    pub const ZERO: u8 = 5;
    pub const PREPARE: u8 = 6;
    pub const READY: u8 = 7;
    pub const COMMIT: u8 = 8;
    pub const DONE: u8 = 9;
    pub const DONE_ACK: u8 = 10;
    pub const FETCH: u8 = 11;
    pub const ERROR: u8 = 12;
    pub const MEM: u8 = 13;
    pub const MEM_END: u8 = 14;
    pub const VM_START: u8 = 15;
    pub const VM_READY: u8 = 16;
    pub const VM_LOADED: u8 = 17;
    pub const VM_RESUMED: u8 = 18;
    pub const COMMIT_ACK: u8 = 19;
    pub const QUERY: u8 = 20;
    pub const STATE: u8 = 21;
}

struct Rd<'a> {
    b: &'a [u8],
    what: &'static str,
}

impl<'a> Rd<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FrameError> {
        if self.b.len() < n {
            return Err(FrameError::Truncated(self.what));
        }
        let (a, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, FrameError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, FrameError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, FrameError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, FrameError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_be_bytes(a))
    }
    fn string(&mut self, n: usize) -> Result<String, FrameError> {
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| FrameError::NotUtf8(self.what))
    }
    /// `compressed:u8 raw_len:u32 payload…` (the rest of the frame), as
    /// `Data` and `Mem` carry their bytes.
    fn packed(&mut self) -> Result<(bool, u32, Vec<u8>), FrameError> {
        let compressed = self.u8()? != 0;
        let raw_len = self.u32()?;
        if raw_len > MAX_BLOCK {
            return Err(FrameError::BlockTooLarge(raw_len));
        }
        let payload = self.take(self.b.len())?.to_vec();
        if !compressed && payload.len() != raw_len as usize {
            return Err(FrameError::Truncated(self.what));
        }
        Ok((compressed, raw_len, payload))
    }

    /// `count:u32 block:u64…`, the count checked against what is there.
    fn blocks(&mut self) -> Result<Vec<u64>, FrameError> {
        let n = self.u32()? as usize;
        if n > self.b.len() / 8 {
            return Err(FrameError::Truncated(self.what));
        }
        (0..n).map(|_| self.u64()).collect()
    }

    fn end(self) -> Result<(), FrameError> {
        if self.b.is_empty() {
            Ok(())
        } else {
            Err(FrameError::Trailing(self.what))
        }
    }
}

impl Frame {
    /// Parse a frame header: `(type, payload length)`.
    pub fn header(h: &[u8; HEADER_LEN]) -> Result<(u8, u32), FrameError> {
        let len = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
        if len > MAX_PAYLOAD {
            return Err(FrameError::TooLong(len));
        }
        Ok((h[4], len))
    }

    /// Is a whole frame at the start of `buf`? Returns its total length.
    pub fn check(buf: &[u8]) -> Result<Option<usize>, FrameError> {
        let Some(h) = buf.get(..HEADER_LEN) else {
            return Ok(None);
        };
        let mut hh = [0u8; HEADER_LEN];
        hh.copy_from_slice(h);
        let (_, len) = Self::header(&hh)?;
        let total = HEADER_LEN + len as usize;
        Ok((buf.len() >= total).then_some(total))
    }

    /// Decode one frame's payload.
    pub fn parse(kind: u8, payload: &[u8]) -> Result<Frame, FrameError> {
        let what = match kind {
            t::HELLO => "hello",
            t::HASHES => "hashes",
            t::WELCOME => "welcome",
            t::DATA => "data",
            t::ZERO => "zero",
            t::PREPARE => "prepare",
            t::READY => "ready",
            t::COMMIT => "commit",
            t::DONE => "done",
            t::DONE_ACK => "done-ack",
            t::FETCH => "fetch",
            t::ERROR => "error",
            t::MEM => "mem",
            t::MEM_END => "mem-end",
            t::VM_START => "vm-start",
            t::VM_READY => "vm-ready",
            t::VM_LOADED => "vm-loaded",
            t::VM_RESUMED => "vm-resumed",
            t::COMMIT_ACK => "commit-ack",
            t::QUERY => "query",
            t::STATE => "state",
            other => return Err(FrameError::UnknownType(other)),
        };
        let mut r = Rd { b: payload, what };
        let f = match kind {
            t::HELLO => {
                let version = r.u16()?;
                let size = r.u64()?;
                let block_size = r.u32()?;
                let n = r.u16()? as usize;
                let name = r.string(n)?;
                Frame::Hello {
                    version,
                    name,
                    size,
                    block_size,
                }
            }
            t::HASHES => {
                let n = r.u32()? as usize;
                if n > r.b.len() / (8 + HASH_LEN) {
                    return Err(FrameError::Truncated(what));
                }
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    let b = r.u64()?;
                    let mut h = [0u8; HASH_LEN];
                    h.copy_from_slice(r.take(HASH_LEN)?);
                    v.push((b, h));
                }
                Frame::Hashes(v)
            }
            t::WELCOME => Frame::Welcome,
            t::DATA => {
                let offset = r.u64()?;
                let (compressed, raw_len, payload) = r.packed()?;
                Frame::Data {
                    offset,
                    compressed,
                    raw_len,
                    payload,
                }
            }
            t::ZERO => Frame::Zero {
                offset: r.u64()?,
                len: r.u64()?,
            },
            t::PREPARE => Frame::Prepare {
                blocks: r.blocks()?,
            },
            t::READY => Frame::Ready,
            t::COMMIT => Frame::Commit,
            t::DONE => Frame::Done,
            t::DONE_ACK => Frame::DoneAck,
            t::FETCH => Frame::Fetch { block: r.u64()? },
            t::ERROR => {
                let n = r.u16()? as usize;
                Frame::Error {
                    message: r.string(n)?,
                }
            }
            t::MEM => {
                let (compressed, raw_len, payload) = r.packed()?;
                Frame::Mem {
                    compressed,
                    raw_len,
                    payload,
                }
            }
            t::MEM_END => Frame::MemEnd,
            t::VM_START => Frame::VmStart {
                postcopy: r.u8()? != 0,
            },
            t::VM_READY => Frame::VmReady,
            t::VM_LOADED => Frame::VmLoaded,
            t::VM_RESUMED => Frame::VmResumed,
            t::COMMIT_ACK => Frame::CommitAck,
            t::QUERY => {
                let version = r.u16()?;
                let n = r.u16()? as usize;
                Frame::Query {
                    version,
                    name: r.string(n)?,
                }
            }
            t::STATE => {
                let state = LinkState::from_code(r.u8()?)?;
                let blocks = r.blocks()?;
                Frame::State {
                    state,
                    pending: blocks,
                }
            }
            _ => unreachable!("type checked above"),
        };
        r.end()?;
        Ok(f)
    }

    /// Encode header and payload.
    pub fn emit(&self) -> Vec<u8> {
        let mut p = Vec::new();
        let kind = match self {
            Frame::Hello {
                version,
                name,
                size,
                block_size,
            } => {
                p.extend_from_slice(&version.to_be_bytes());
                p.extend_from_slice(&size.to_be_bytes());
                p.extend_from_slice(&block_size.to_be_bytes());
                let n = &name.as_bytes()[..name.len().min(u16::MAX as usize)];
                p.extend_from_slice(&(n.len() as u16).to_be_bytes());
                p.extend_from_slice(n);
                t::HELLO
            }
            Frame::Hashes(v) => {
                p.extend_from_slice(&(v.len() as u32).to_be_bytes());
                for (b, h) in v {
                    p.extend_from_slice(&b.to_be_bytes());
                    p.extend_from_slice(h);
                }
                t::HASHES
            }
            Frame::Welcome => t::WELCOME,
            Frame::Data {
                offset,
                compressed,
                raw_len,
                payload,
            } => {
                p.reserve(13 + payload.len());
                p.extend_from_slice(&offset.to_be_bytes());
                p.push(*compressed as u8);
                p.extend_from_slice(&raw_len.to_be_bytes());
                p.extend_from_slice(payload);
                t::DATA
            }
            Frame::Zero { offset, len } => {
                p.extend_from_slice(&offset.to_be_bytes());
                p.extend_from_slice(&len.to_be_bytes());
                t::ZERO
            }
            Frame::Prepare { blocks } => {
                emit_blocks(&mut p, blocks);
                t::PREPARE
            }
            Frame::Ready => t::READY,
            Frame::Commit => t::COMMIT,
            Frame::Done => t::DONE,
            Frame::DoneAck => t::DONE_ACK,
            Frame::Fetch { block } => {
                p.extend_from_slice(&block.to_be_bytes());
                t::FETCH
            }
            Frame::Error { message } => {
                let m = &message.as_bytes()[..message.len().min(4096)];
                let m = match std::str::from_utf8(m) {
                    Ok(s) => s.as_bytes(),
                    Err(e) => &m[..e.valid_up_to()],
                };
                p.extend_from_slice(&(m.len() as u16).to_be_bytes());
                p.extend_from_slice(m);
                t::ERROR
            }
            Frame::Mem {
                compressed,
                raw_len,
                payload,
            } => {
                p.reserve(5 + payload.len());
                p.push(*compressed as u8);
                p.extend_from_slice(&raw_len.to_be_bytes());
                p.extend_from_slice(payload);
                t::MEM
            }
            Frame::MemEnd => t::MEM_END,
            Frame::VmStart { postcopy } => {
                p.push(*postcopy as u8);
                t::VM_START
            }
            Frame::VmReady => t::VM_READY,
            Frame::VmLoaded => t::VM_LOADED,
            Frame::VmResumed => t::VM_RESUMED,
            Frame::CommitAck => t::COMMIT_ACK,
            Frame::Query { version, name } => {
                p.extend_from_slice(&version.to_be_bytes());
                let n = &name.as_bytes()[..name.len().min(u16::MAX as usize)];
                p.extend_from_slice(&(n.len() as u16).to_be_bytes());
                p.extend_from_slice(n);
                t::QUERY
            }
            Frame::State { state, pending } => {
                p.push(state.code());
                emit_blocks(&mut p, pending);
                t::STATE
            }
        };
        let mut out = Vec::with_capacity(HEADER_LEN + p.len());
        out.extend_from_slice(&(p.len() as u32).to_be_bytes());
        out.push(kind);
        out.extend_from_slice(&p);
        out
    }
}

fn emit_blocks(p: &mut Vec<u8>, blocks: &[u64]) {
    p.extend_from_slice(&(blocks.len() as u32).to_be_bytes());
    for b in blocks {
        p.extend_from_slice(&b.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn roundtrip(f: &Frame) -> Frame {
        let b = f.emit();
        let total = Frame::check(&b).expect("check").expect("complete");
        assert_eq!(total, b.len());
        Frame::parse(b[4], &b[HEADER_LEN..]).expect("parse")
    }

    #[test]
    fn fixed_hello_bytes() {
        let f = Frame::Hello {
            version: 1,
            name: "vm".into(),
            size: 4096,
            block_size: 65536,
        };
        let b = f.emit();
        assert_eq!(
            b,
            [0, 0, 0, 18, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 1, 0, 0, 0, 2, b'v', b'm']
        );
        assert_eq!(roundtrip(&f), f);
    }

    #[test]
    fn incomplete_is_not_an_error() {
        let b = Frame::Commit.emit();
        assert_eq!(Frame::check(&b[..3]), Ok(None));
        let d = Frame::Fetch { block: 9 }.emit();
        assert_eq!(Frame::check(&d[..d.len() - 1]), Ok(None));
    }

    #[test]
    fn impossible_lengths_are_rejected() {
        let mut h = [0u8; HEADER_LEN];
        h[..4].copy_from_slice(&(MAX_PAYLOAD + 1).to_be_bytes());
        assert_eq!(Frame::check(&h), Err(FrameError::TooLong(MAX_PAYLOAD + 1)));
        // A hash batch claiming a billion entries in 4 bytes.
        let p = 1_000_000_000u32.to_be_bytes();
        assert_eq!(Frame::parse(2, &p), Err(FrameError::Truncated("hashes")));
        // Uncompressed data whose length disagrees with raw_len.
        let mut p = 0u64.to_be_bytes().to_vec();
        p.push(0);
        p.extend_from_slice(&10u32.to_be_bytes());
        p.extend_from_slice(&[1, 2, 3]);
        assert_eq!(Frame::parse(4, &p), Err(FrameError::Truncated("data")));
        assert_eq!(Frame::parse(99, &[]), Err(FrameError::UnknownType(99)));
        assert_eq!(Frame::parse(8, &[0]), Err(FrameError::Trailing("commit")));
        // A state frame with a state nobody defined, and one whose block list
        // claims more blocks than it carries.
        assert_eq!(
            Frame::parse(21, &[7, 0, 0, 0, 0]),
            Err(FrameError::UnknownState(7))
        );
        assert_eq!(
            Frame::parse(21, &[1, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 1]),
            Err(FrameError::Truncated("state"))
        );
    }

    fn arb_frame() -> impl Strategy<Value = Frame> {
        prop_oneof![
            (
                any::<u16>(),
                "[a-z0-9._-]{0,40}",
                any::<u64>(),
                any::<u32>()
            )
                .prop_map(|(version, name, size, block_size)| Frame::Hello {
                    version,
                    name,
                    size,
                    block_size
                }),
            proptest::collection::vec((any::<u64>(), any::<[u8; 16]>()), 0..20)
                .prop_map(Frame::Hashes),
            Just(Frame::Welcome),
            (any::<u64>(), proptest::collection::vec(any::<u8>(), 0..300)).prop_map(
                |(offset, payload)| {
                    Frame::Data {
                        offset,
                        compressed: false,
                        raw_len: payload.len() as u32,
                        payload,
                    }
                }
            ),
            (any::<u64>(), any::<u64>()).prop_map(|(offset, len)| Frame::Zero { offset, len }),
            proptest::collection::vec(any::<u64>(), 0..50)
                .prop_map(|blocks| Frame::Prepare { blocks }),
            Just(Frame::Ready),
            Just(Frame::Commit),
            Just(Frame::Done),
            Just(Frame::DoneAck),
            any::<u64>().prop_map(|block| Frame::Fetch { block }),
            ".{0,100}".prop_map(|message| Frame::Error { message }),
            prop::collection::vec(any::<u8>(), 0..300).prop_map(|payload| Frame::Mem {
                compressed: false,
                raw_len: payload.len() as u32,
                payload,
            }),
            Just(Frame::MemEnd),
            any::<bool>().prop_map(|postcopy| Frame::VmStart { postcopy }),
            Just(Frame::VmReady),
            Just(Frame::VmLoaded),
            Just(Frame::VmResumed),
            Just(Frame::CommitAck),
            (any::<u16>(), "[a-z0-9._-]{0,40}")
                .prop_map(|(version, name)| Frame::Query { version, name }),
            (
                prop_oneof![
                    Just(LinkState::None),
                    Just(LinkState::Committed),
                    Just(LinkState::Complete)
                ],
                proptest::collection::vec(any::<u64>(), 0..50)
            )
                .prop_map(|(state, pending)| Frame::State { state, pending }),
        ]
    }

    proptest! {
        #[test]
        fn emit_parse_roundtrip(f in arb_frame()) {
            prop_assert_eq!(roundtrip(&f), f);
        }

        #[test]
        fn arbitrary_bytes_never_panic(kind: u8, b in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = Frame::parse(kind, &b);
            let _ = Frame::check(&b);
        }
    }
}
