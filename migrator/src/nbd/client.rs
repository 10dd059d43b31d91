//! A small NBD client: fixed newstyle with NBD_OPT_GO, simple replies, one request
//! at a time. Used by tests and benchmark writers; the hypervisor uses its own.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::wire::*;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("NBD server I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("NBD negotiation failed: {0}")]
    Negotiation(String),
    #[error("NBD server returned error {code} for {what}")]
    Server { code: u32, what: &'static str },
}

pub struct Client<S> {
    s: S,
    size: u64,
    flags: u16,
    cookie: u64,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    pub async fn connect(mut s: S, export: &str) -> Result<Self, ClientError> {
        let magic = s.read_u64().await?;
        let opt = s.read_u64().await?;
        if magic != NBDMAGIC || opt != IHAVEOPT {
            return Err(ClientError::Negotiation("not a newstyle NBD server".into()));
        }
        let _hflags = s.read_u16().await?;
        s.write_u32(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
            .await?;
        let mut data = (export.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        s.write_u64(IHAVEOPT).await?;
        s.write_u32(OPT_GO).await?;
        s.write_u32(data.len() as u32).await?;
        s.write_all(&data).await?;
        let (mut size, mut flags) = (None, 0);
        loop {
            let magic = s.read_u64().await?;
            let _opt = s.read_u32().await?;
            let kind = s.read_u32().await?;
            let len = s.read_u32().await?;
            if magic != OPT_REPLY_MAGIC || len > MAX_OPTION_LEN {
                return Err(ClientError::Negotiation("bad option reply".into()));
            }
            let mut d = vec![0u8; len as usize];
            s.read_exact(&mut d).await?;
            match kind {
                REP_ACK => break,
                REP_INFO if d.len() >= 12 && be_u16(&d) == INFO_EXPORT => {
                    size = Some(be_u64(&d[2..]));
                    flags = be_u16(&d[10..]);
                }
                REP_INFO => {}
                k if k & (1 << 31) != 0 => {
                    return Err(ClientError::Negotiation(format!(
                        "server refused export {export:?}: {}",
                        String::from_utf8_lossy(&d)
                    )))
                }
                _ => {}
            }
        }
        let size = size.ok_or_else(|| ClientError::Negotiation("no export info".into()))?;
        Ok(Self {
            s,
            size,
            flags,
            cookie: 0,
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn read_only(&self) -> bool {
        self.flags & TF_READ_ONLY != 0
    }

    async fn request(
        &mut self,
        kind: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
        what: &'static str,
    ) -> Result<(), ClientError> {
        self.cookie += 1;
        let r = Request {
            flags,
            kind,
            cookie: self.cookie,
            offset,
            len,
        };
        let mut buf = r.emit().to_vec();
        buf.extend_from_slice(payload);
        self.s.write_all(&buf).await?;
        let magic = self.s.read_u32().await?;
        let err = self.s.read_u32().await?;
        let cookie = self.s.read_u64().await?;
        if magic != SIMPLE_REPLY_MAGIC || cookie != self.cookie {
            return Err(ClientError::Negotiation("unexpected reply".into()));
        }
        if err != 0 {
            return Err(ClientError::Server { code: err, what });
        }
        Ok(())
    }

    pub async fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), ClientError> {
        self.request(CMD_READ, 0, offset, buf.len() as u32, &[], "read")
            .await?;
        self.s.read_exact(buf).await?;
        Ok(())
    }

    pub async fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> Result<(), ClientError> {
        let flags = if fua { CMD_FLAG_FUA } else { 0 };
        self.request(CMD_WRITE, flags, offset, data.len() as u32, data, "write")
            .await
    }

    pub async fn write_zeroes(&mut self, offset: u64, len: u32) -> Result<(), ClientError> {
        self.request(CMD_WRITE_ZEROES, 0, offset, len, &[], "write zeroes")
            .await
    }

    pub async fn flush(&mut self) -> Result<(), ClientError> {
        self.request(CMD_FLUSH, 0, 0, 0, &[], "flush").await
    }

    pub async fn disconnect(mut self) -> Result<(), ClientError> {
        self.cookie += 1;
        let r = Request {
            flags: 0,
            kind: CMD_DISC,
            cookie: self.cookie,
            offset: 0,
            len: 0,
        };
        self.s.write_all(&r.emit()).await?;
        self.s.shutdown().await?;
        Ok(())
    }
}
