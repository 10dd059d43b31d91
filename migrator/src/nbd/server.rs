//! NBD server: fixed newstyle negotiation, then the transmission phase with
//! requests handled concurrently and replies serialised by one writer task.
//!
//! ```text
//!  server: NBDMAGIC IHAVEOPT flags      client: flags
//!  client: IHAVEOPT opt len data  ──▶  server: option reply(s) … ACK / ERR_*
//!          (repeat; GO or EXPORT_NAME ends negotiation, ABORT closes)
//!  client: request [payload]      ──▶  server: simple or structured reply
//! ```

use std::sync::Arc;

use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use super::wire::*;
use crate::disk::{Disk, DiskError};

/// Requests of one connection handled at once.
const MAX_IN_FLIGHT: usize = 64;

#[derive(Debug, Error)]
pub enum NbdError {
    #[error("client I/O failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("malformed {what}: {source}")]
    Wire {
        what: &'static str,
        #[source]
        source: WireError,
    },
    #[error("client does not speak fixed newstyle negotiation (flags {0:#x})")]
    NotFixedNewstyle(u32),
    #[error("client asked for unknown export {0:?}")]
    UnknownExport(String),
}

fn wire(what: &'static str) -> impl FnOnce(WireError) -> NbdError {
    move |source| NbdError::Wire { what, source }
}

impl DiskError {
    fn nbd_code(&self, is_write: bool) -> ErrorCode {
        match self {
            DiskError::OutOfRange { .. } if is_write => ErrorCode::NoSpc,
            DiskError::OutOfRange { .. } => ErrorCode::Inval,
            DiskError::Moved { .. } => ErrorCode::Perm,
            DiskError::Image(_) | DiskError::Worker(_) => ErrorCode::Io,
        }
    }
}

/// Serve `disk` on a bound unix socket until `shutdown` resolves.
pub async fn serve_unix(
    listener: UnixListener,
    disk: Arc<Disk>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            r = listener.accept() => match r {
                Ok((s, _)) => spawn_conn(s, disk.clone()),
                Err(e) => {
                    warn!("accept on NBD socket failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }
}

/// Serve `disk` on a bound TCP listener until `shutdown` resolves.
pub async fn serve_tcp(
    listener: TcpListener,
    disk: Arc<Disk>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            r = listener.accept() => match r {
                Ok((s, peer)) => {
                    let _ = s.set_nodelay(true);
                    debug!(%peer, "NBD client connected");
                    spawn_conn(s, disk.clone())
                }
                Err(e) => {
                    warn!("accept on NBD port failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }
}

fn spawn_conn<S>(s: S, disk: Arc<Disk>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        match handle_connection(s, disk).await {
            Ok(()) => debug!("NBD client disconnected"),
            Err(e) => info!("NBD connection closed: {e}"),
        }
    });
}

struct Negotiated {
    structured: bool,
    base_allocation: bool,
}

/// Run one client connection to completion.
pub async fn handle_connection<S>(stream: S, disk: Arc<Disk>) -> Result<(), NbdError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    let Some(neg) = negotiate(&mut rd, &mut wr, &disk).await? else {
        return Ok(());
    };
    transmission(rd, wr, disk, neg).await
}

fn export_flags(disk: &Disk, structured: bool) -> u16 {
    let mut f = TF_HAS_FLAGS
        | TF_SEND_FLUSH
        | TF_SEND_FUA
        | TF_SEND_TRIM
        | TF_SEND_WRITE_ZEROES
        | TF_CAN_MULTI_CONN;
    if structured {
        f |= TF_SEND_DF;
    }
    if disk.is_read_only() {
        f |= TF_READ_ONLY;
    }
    f
}

fn name_matches(disk: &Disk, name: &str) -> bool {
    name.is_empty() || name == disk.name()
}

async fn negotiate<R, W>(
    rd: &mut R,
    wr: &mut W,
    disk: &Disk,
) -> Result<Option<Negotiated>, NbdError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    wr.write_all(&hello).await?;
    let cflags = rd.read_u32().await?;
    if cflags & FLAG_C_FIXED_NEWSTYLE == 0
        || cflags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0
    {
        return Err(NbdError::NotFixedNewstyle(cflags));
    }
    let no_zeroes = cflags & FLAG_C_NO_ZEROES != 0;
    let mut neg = Negotiated {
        structured: false,
        base_allocation: false,
    };
    loop {
        let mut h = [0u8; OPTION_HEADER_LEN];
        rd.read_exact(&mut h).await?;
        let hdr = OptionHeader::parse(&h).map_err(wire("option header"))?;
        let mut data = vec![0u8; hdr.len as usize];
        rd.read_exact(&mut data).await?;
        let opt = hdr.option;
        let reply = |kind: u32, d: &[u8]| option_reply(opt, kind, d);
        let err = |kind: u32, msg: &str| option_reply(opt, kind, msg.as_bytes());
        match opt {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data).into_owned();
                if !name_matches(disk, &name) {
                    return Err(NbdError::UnknownExport(name));
                }
                let mut v = disk.size().to_be_bytes().to_vec();
                // Structured replies negotiated before EXPORT_NAME stay in effect.
                v.extend_from_slice(&export_flags(disk, neg.structured).to_be_bytes());
                if !no_zeroes {
                    v.extend_from_slice(&[0u8; 124]);
                }
                wr.write_all(&v).await?;
                return Ok(Some(neg));
            }
            OPT_ABORT => {
                let _ = wr.write_all(&reply(REP_ACK, &[])).await;
                return Ok(None);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    wr.write_all(&err(REP_ERR_INVALID, "NBD_OPT_LIST takes no data"))
                        .await?;
                    continue;
                }
                let mut v = (disk.name().len() as u32).to_be_bytes().to_vec();
                v.extend_from_slice(disk.name().as_bytes());
                wr.write_all(&reply(REP_SERVER, &v)).await?;
                wr.write_all(&reply(REP_ACK, &[])).await?;
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    wr.write_all(&err(
                        REP_ERR_INVALID,
                        "NBD_OPT_STRUCTURED_REPLY takes no data",
                    ))
                    .await?;
                    continue;
                }
                neg.structured = true;
                wr.write_all(&reply(REP_ACK, &[])).await?;
            }
            OPT_INFO | OPT_GO => {
                let req = match InfoRequest::parse(&data) {
                    Ok(r) => r,
                    Err(e) => {
                        wr.write_all(&err(REP_ERR_INVALID, &e.to_string())).await?;
                        continue;
                    }
                };
                if !name_matches(disk, &req.name) {
                    let msg = format!(
                        "no export named {:?}; this server has {:?}",
                        req.name,
                        disk.name()
                    );
                    wr.write_all(&err(REP_ERR_UNKNOWN, &msg)).await?;
                    continue;
                }
                let mut out = reply(
                    REP_INFO,
                    &info_export(disk.size(), export_flags(disk, neg.structured)),
                );
                if req.requests.contains(&INFO_NAME) {
                    out.extend(reply(REP_INFO, &info_name(disk.name())));
                }
                if req.requests.contains(&INFO_BLOCK_SIZE) {
                    out.extend(reply(REP_INFO, &info_block_size(1, 4096, MAX_PAYLOAD)));
                }
                out.extend(reply(REP_ACK, &[]));
                wr.write_all(&out).await?;
                if opt == OPT_GO {
                    return Ok(Some(neg));
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                if !neg.structured {
                    wr.write_all(&err(REP_ERR_INVALID, "negotiate structured replies first"))
                        .await?;
                    continue;
                }
                let req = match MetaContextRequest::parse(&data) {
                    Ok(r) => r,
                    Err(e) => {
                        wr.write_all(&err(REP_ERR_INVALID, &e.to_string())).await?;
                        continue;
                    }
                };
                if !name_matches(disk, &req.name) {
                    wr.write_all(&err(REP_ERR_UNKNOWN, "unknown export"))
                        .await?;
                    continue;
                }
                let listing = opt == OPT_LIST_META_CONTEXT;
                let matched =
                    req.queries.iter().any(|q| {
                        q == BASE_ALLOCATION || (listing && (q == "base:" || q.is_empty()))
                    }) || (listing && req.queries.is_empty());
                let mut out = Vec::new();
                if matched {
                    let mut v = BASE_ALLOCATION_ID.to_be_bytes().to_vec();
                    v.extend_from_slice(BASE_ALLOCATION.as_bytes());
                    out.extend(reply(REP_META_CONTEXT, &v));
                }
                if !listing {
                    neg.base_allocation = matched;
                }
                out.extend(reply(REP_ACK, &[]));
                wr.write_all(&out).await?;
            }
            OPT_STARTTLS => {
                wr.write_all(&err(
                    REP_ERR_UNSUP,
                    "TLS is not offered on the NBD socket; keep it local",
                ))
                .await?;
            }
            _ => {
                wr.write_all(&err(REP_ERR_UNSUP, "option not supported"))
                    .await?;
            }
        }
    }
}

async fn transmission<R, W>(
    mut rd: R,
    wr: W,
    disk: Arc<Disk>,
    neg: Negotiated,
) -> Result<(), NbdError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (tx, rx) = mpsc::channel::<Vec<u8>>(MAX_IN_FLIGHT);
    let writer = tokio::spawn(reply_writer(wr, rx));
    let limit = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let neg = Arc::new(neg);
    let mut tasks = JoinSet::new();
    let result = loop {
        let mut h = [0u8; REQUEST_LEN];
        match rd.read_exact(&mut h).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break Ok(()),
            Err(e) => break Err(e.into()),
        }
        let req = match Request::parse(&h) {
            Ok(r) => r,
            Err(e) => {
                break Err(NbdError::Wire {
                    what: "request",
                    source: e,
                })
            }
        };
        let payload = if req.kind == CMD_WRITE {
            let mut p = vec![0u8; req.len as usize];
            if let Err(e) = rd.read_exact(&mut p).await {
                break Err(e.into());
            }
            Some(p)
        } else {
            None
        };
        if req.kind == CMD_DISC {
            break Ok(());
        }
        let permit = match limit.clone().acquire_owned().await {
            Ok(p) => p,
            Err(_) => break Ok(()),
        };
        let (disk, tx, neg) = (disk.clone(), tx.clone(), neg.clone());
        tasks.spawn(async move {
            let reply = execute(&disk, &neg, req, payload).await;
            let _ = tx.send(reply).await;
            drop(permit);
        });
        // Reap finished tasks so the set does not grow without bound.
        while tasks.try_join_next().is_some() {}
    };
    // Finish requests in flight (DISC or EOF), then let the writer drain.
    while tasks.join_next().await.is_some() {}
    drop(tx);
    let _ = writer.await;
    result
}

async fn reply_writer<W: AsyncWrite + Unpin>(mut wr: W, mut rx: mpsc::Receiver<Vec<u8>>) {
    while let Some(buf) = rx.recv().await {
        if wr.write_all(&buf).await.is_err() {
            return;
        }
        // Coalesce replies that are already queued before flushing.
        while let Ok(more) = rx.try_recv() {
            if wr.write_all(&more).await.is_err() {
                return;
            }
        }
        if wr.flush().await.is_err() {
            return;
        }
    }
    let _ = wr.shutdown().await;
}

fn error_reply(neg: &Negotiated, cookie: u64, code: ErrorCode, msg: &str) -> Vec<u8> {
    if neg.structured {
        structured_error(cookie, code, msg)
    } else {
        simple_reply(code as u32, cookie).to_vec()
    }
}

fn ok_reply(cookie: u64) -> Vec<u8> {
    simple_reply(0, cookie).to_vec()
}

/// Execute one request and build its complete reply.
async fn execute(disk: &Disk, neg: &Negotiated, req: Request, payload: Option<Vec<u8>>) -> Vec<u8> {
    let cookie = req.cookie;
    let fua = req.flags & CMD_FLAG_FUA != 0;
    let fail = |e: DiskError, is_write: bool| {
        debug!(cookie, "request failed: {e}");
        error_reply(neg, cookie, e.nbd_code(is_write), &e.to_string())
    };
    match req.kind {
        CMD_READ => {
            if req.len > MAX_PAYLOAD {
                return error_reply(neg, cookie, ErrorCode::Inval, "read larger than 32 MiB");
            }
            match disk.read(req.offset, req.len).await {
                Ok(data) if neg.structured => {
                    let mut v = structured_header(
                        REPLY_FLAG_DONE,
                        REPLY_TYPE_OFFSET_DATA,
                        cookie,
                        8 + data.len() as u32,
                    )
                    .to_vec();
                    v.reserve(8 + data.len());
                    v.extend_from_slice(&req.offset.to_be_bytes());
                    v.extend_from_slice(&data);
                    v
                }
                Ok(data) => {
                    let mut v = simple_reply(0, cookie).to_vec();
                    v.extend_from_slice(&data);
                    v
                }
                Err(e) => fail(e, false),
            }
        }
        CMD_WRITE => {
            let data = payload.unwrap_or_default();
            match disk.write(req.offset, data, fua).await {
                Ok(()) => ok_reply(cookie),
                Err(e) => fail(e, true),
            }
        }
        CMD_FLUSH => match disk.flush().await {
            Ok(()) => ok_reply(cookie),
            Err(e) => fail(e, true),
        },
        CMD_TRIM | CMD_WRITE_ZEROES => {
            let punch = req.kind == CMD_TRIM || req.flags & CMD_FLAG_NO_HOLE == 0;
            if req.kind == CMD_WRITE_ZEROES && req.flags & CMD_FLAG_FAST_ZERO != 0 {
                return error_reply(neg, cookie, ErrorCode::NotSup, "fast zero not offered");
            }
            match disk.zero(req.offset, req.len as u64, punch, fua).await {
                Ok(()) => ok_reply(cookie),
                Err(e) => fail(e, true),
            }
        }
        CMD_BLOCK_STATUS => {
            if !neg.structured || !neg.base_allocation {
                return error_reply(
                    neg,
                    cookie,
                    ErrorCode::Inval,
                    "no metadata context negotiated",
                );
            }
            match disk.extents(req.offset, req.len as u64).await {
                Ok(extents) => {
                    block_status_reply(cookie, &extents, req.flags & CMD_FLAG_REQ_ONE != 0)
                }
                Err(e) => fail(e, false),
            }
        }
        CMD_CACHE => error_reply(neg, cookie, ErrorCode::Inval, "NBD_CMD_CACHE not offered"),
        other => error_reply(
            neg,
            cookie,
            ErrorCode::Inval,
            &format!("unknown command {other}"),
        ),
    }
}

fn block_status_reply(cookie: u64, extents: &[crate::image::Extent], one: bool) -> Vec<u8> {
    // Descriptor lengths are u32: split larger extents at a 512-aligned bound.
    const MAX_DESC: u64 = (u32::MAX as u64) & !511;
    let mut body = BASE_ALLOCATION_ID.to_be_bytes().to_vec();
    'outer: for e in extents {
        let flags = if e.hole { STATE_HOLE | STATE_ZERO } else { 0 };
        let mut left = e.len;
        while left > 0 {
            let n = left.min(MAX_DESC);
            body.extend_from_slice(&(n as u32).to_be_bytes());
            body.extend_from_slice(&flags.to_be_bytes());
            left -= n;
            if one {
                break 'outer;
            }
        }
    }
    let mut v = structured_header(
        REPLY_FLAG_DONE,
        REPLY_TYPE_BLOCK_STATUS,
        cookie,
        body.len() as u32,
    )
    .to_vec();
    v.extend_from_slice(&body);
    v
}
