//! NBD wire format (sans-I/O): constants, handshake options, requests, replies.
//!
//! Follows the NBD protocol document (`doc/proto.md` in the NBD project): fixed
//! newstyle negotiation, simple and structured replies. Parsing never panics: every
//! length is checked before use and every failure names its reason.

use thiserror::Error;

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Transmission flags.
pub const TF_HAS_FLAGS: u16 = 1 << 0;
pub const TF_READ_ONLY: u16 = 1 << 1;
pub const TF_SEND_FLUSH: u16 = 1 << 2;
pub const TF_SEND_FUA: u16 = 1 << 3;
pub const TF_SEND_TRIM: u16 = 1 << 5;
pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TF_SEND_DF: u16 = 1 << 7;
pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TF_SEND_FAST_ZERO: u16 = 1 << 11;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

// NBD_OPT_INFO / NBD_OPT_GO information types.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Commands and command flags.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// Structured reply chunk types and flags.
pub const REPLY_FLAG_DONE: u16 = 1;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

// base:allocation state flags.
pub const STATE_HOLE: u32 = 1;
pub const STATE_ZERO: u32 = 2;

/// The only metadata context we offer.
pub const BASE_ALLOCATION: &str = "base:allocation";
pub const BASE_ALLOCATION_ID: u32 = 1;

/// Largest payload we accept in one request (matches QEMU's and nbdkit's limit).
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;
/// Largest option payload we accept during negotiation.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;

/// NBD error numbers (the protocol's, not the host's errno).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum ErrorCode {
    Perm = 1,
    Io = 5,
    NoMem = 12,
    Inval = 22,
    NoSpc = 28,
    Overflow = 75,
    NotSup = 95,
    Shutdown = 108,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum WireError {
    #[error("bad magic {0:#x}")]
    BadMagic(u64),
    #[error("option payload of {0} bytes exceeds the limit")]
    OptionTooLong(u32),
    #[error("truncated {0}")]
    Truncated(&'static str),
    #[error("{0} is not valid UTF-8")]
    NotUtf8(&'static str),
    #[error("request payload of {0} bytes exceeds the limit")]
    PayloadTooLong(u32),
}

/// A client option header (after `IHAVEOPT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub len: u32,
}

pub const OPTION_HEADER_LEN: usize = 16;

impl OptionHeader {
    pub fn parse(b: &[u8; OPTION_HEADER_LEN]) -> Result<Self, WireError> {
        let magic = be_u64(&b[0..8]);
        if magic != IHAVEOPT {
            return Err(WireError::BadMagic(magic));
        }
        let option = be_u32(&b[8..12]);
        let len = be_u32(&b[12..16]);
        if len > MAX_OPTION_LEN {
            return Err(WireError::OptionTooLong(len));
        }
        Ok(Self { option, len })
    }
}

/// Body of NBD_OPT_INFO and NBD_OPT_GO.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    pub requests: Vec<u16>,
}

impl InfoRequest {
    pub fn parse(b: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader(b);
        let nlen = r.u32("export name length")? as usize;
        let name = r.string(nlen, "export name")?;
        let count = r.u16("info request count")? as usize;
        let mut requests = Vec::with_capacity(count.min(16));
        for _ in 0..count {
            requests.push(r.u16("info request")?);
        }
        r.end("info request")?;
        Ok(Self { name, requests })
    }
}

/// Body of NBD_OPT_SET_META_CONTEXT and NBD_OPT_LIST_META_CONTEXT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    pub name: String,
    pub queries: Vec<String>,
}

impl MetaContextRequest {
    pub fn parse(b: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader(b);
        let nlen = r.u32("export name length")? as usize;
        let name = r.string(nlen, "export name")?;
        let count = r.u32("query count")? as usize;
        let mut queries = Vec::with_capacity(count.min(16));
        for _ in 0..count {
            let qlen = r.u32("query length")? as usize;
            queries.push(r.string(qlen, "query")?);
        }
        r.end("meta context request")?;
        Ok(Self { name, queries })
    }
}

/// A transmission-phase request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub len: u32,
}

pub const REQUEST_LEN: usize = 28;

impl Request {
    pub fn parse(b: &[u8; REQUEST_LEN]) -> Result<Self, WireError> {
        let magic = be_u32(&b[0..4]);
        if magic != REQUEST_MAGIC {
            return Err(WireError::BadMagic(magic as u64));
        }
        let req = Self {
            flags: be_u16(&b[4..6]),
            kind: be_u16(&b[6..8]),
            cookie: be_u64(&b[8..16]),
            offset: be_u64(&b[16..24]),
            len: be_u32(&b[24..28]),
        };
        if req.kind == CMD_WRITE && req.len > MAX_PAYLOAD {
            return Err(WireError::PayloadTooLong(req.len));
        }
        Ok(req)
    }

    pub fn emit(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.len.to_be_bytes());
        b
    }
}

/// Server's option reply header followed by `data`.
pub fn option_reply(option: u32, kind: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(20 + data.len());
    v.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&kind.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

pub fn simple_reply(error: u32, cookie: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// Header of one structured reply chunk; the caller appends `len` payload bytes.
pub fn structured_header(flags: u16, kind: u16, cookie: u64, len: u32) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&kind.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..20].copy_from_slice(&len.to_be_bytes());
    b
}

/// A structured error chunk (NBD_REPLY_TYPE_ERROR) with a human-readable message.
pub fn structured_error(cookie: u64, code: ErrorCode, msg: &str) -> Vec<u8> {
    let msg = &msg.as_bytes()[..msg.len().min(4096)];
    let len = 4 + 2 + msg.len() as u32;
    let mut v = structured_header(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, cookie, len).to_vec();
    v.extend_from_slice(&(code as u32).to_be_bytes());
    v.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    v.extend_from_slice(msg);
    v
}

/// `NBD_INFO_EXPORT` payload: size and transmission flags.
pub fn info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut v = Vec::with_capacity(12);
    v.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    v.extend_from_slice(&size.to_be_bytes());
    v.extend_from_slice(&flags.to_be_bytes());
    v
}

pub fn info_block_size(min: u32, preferred: u32, max: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(14);
    v.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    v.extend_from_slice(&min.to_be_bytes());
    v.extend_from_slice(&preferred.to_be_bytes());
    v.extend_from_slice(&max.to_be_bytes());
    v
}

pub fn info_name(name: &str) -> Vec<u8> {
    let mut v = INFO_NAME.to_be_bytes().to_vec();
    v.extend_from_slice(name.as_bytes());
    v
}

/// Small bounds-checked big-endian reader.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], WireError> {
        if self.0.len() < n {
            return Err(WireError::Truncated(what));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u16(&mut self, what: &'static str) -> Result<u16, WireError> {
        Ok(be_u16(self.take(2, what)?))
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, WireError> {
        Ok(be_u32(self.take(4, what)?))
    }
    fn string(&mut self, n: usize, what: &'static str) -> Result<String, WireError> {
        let b = self.take(n, what)?;
        String::from_utf8(b.to_vec()).map_err(|_| WireError::NotUtf8(what))
    }
    fn end(&self, what: &'static str) -> Result<(), WireError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(WireError::Truncated(what))
        }
    }
}

pub fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
pub fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
pub fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn request_roundtrip_fixture() {
        // NBD_CMD_READ, cookie 7, offset 4096, 512 bytes.
        let bytes: [u8; REQUEST_LEN] = [
            0x25, 0x60, 0x95, 0x13, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0x10, 0,
            0, 0, 2, 0,
        ];
        let r = Request::parse(&bytes).expect("valid request");
        assert_eq!(r.kind, CMD_READ);
        assert_eq!(r.cookie, 7);
        assert_eq!(r.offset, 4096);
        assert_eq!(r.len, 512);
        assert_eq!(r.emit(), bytes);
    }

    #[test]
    fn oversized_write_is_rejected() {
        let r = Request {
            flags: 0,
            kind: CMD_WRITE,
            cookie: 1,
            offset: 0,
            len: MAX_PAYLOAD + 1,
        };
        assert_eq!(
            Request::parse(&r.emit()),
            Err(WireError::PayloadTooLong(MAX_PAYLOAD + 1))
        );
    }

    #[test]
    fn info_request_with_impossible_length() {
        // Name length says 1000 but only 3 bytes follow.
        let mut b = 1000u32.to_be_bytes().to_vec();
        b.extend_from_slice(b"abc");
        assert_eq!(
            InfoRequest::parse(&b),
            Err(WireError::Truncated("export name"))
        );
    }

    #[test]
    fn meta_context_parse() {
        let mut b = 0u32.to_be_bytes().to_vec();
        b.extend_from_slice(&1u32.to_be_bytes());
        b.extend_from_slice(&(BASE_ALLOCATION.len() as u32).to_be_bytes());
        b.extend_from_slice(BASE_ALLOCATION.as_bytes());
        let m = MetaContextRequest::parse(&b).expect("valid");
        assert_eq!(m.name, "");
        assert_eq!(m.queries, vec![BASE_ALLOCATION.to_string()]);
    }

    proptest! {
        #[test]
        fn request_parse_never_panics(b in proptest::array::uniform28(any::<u8>())) {
            let _ = Request::parse(&b);
        }

        #[test]
        fn request_parse_emit_parse(flags: u16, kind in 0u16..8, cookie: u64, offset: u64, len in 0u32..MAX_PAYLOAD) {
            let r = Request { flags, kind, cookie, offset, len };
            prop_assert_eq!(Request::parse(&r.emit()), Ok(r));
        }

        #[test]
        fn option_bodies_never_panic(b in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = InfoRequest::parse(&b);
            let _ = MetaContextRequest::parse(&b);
        }

        #[test]
        fn option_header_never_panics(b in proptest::array::uniform16(any::<u8>())) {
            let _ = OptionHeader::parse(&b);
        }
    }
}
