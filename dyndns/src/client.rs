//! A DNS client for RFC 2136 UPDATE signed with TSIG, and plain queries.
//!
//! Works against any RFC 2136 server: ours, BIND 9, Knot, PowerDNS. Built on
//! hickory-proto's messages and TSIG signer; it does its own UDP/TCP exchange
//! because hickory's client verifies the answer's TSIG inside the stream, and
//! a server's BADKEY/BADSIG answer (RFC 8945: deliberately unsigned) then
//! surfaces as a verification failure. Here every refusal is reported as what
//! it is: BADKEY, BADSIG, BADTIME, REFUSED, NOTAUTH, NOTZONE, or a failed
//! prerequisite.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::tsig::TsigError;
use hickory_proto::rr::{DNSClass, Name, RecordType, TSigner};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpStream, UdpSocket};

use crate::key::{TsigKey, DEFAULT_FUDGE};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{server} refused the update: BADKEY (it has no key {key:?} with this algorithm; configure the same key on both sides)")]
    BadKey { server: SocketAddr, key: String },
    #[error("{server} refused the update: BADSIG (key {key:?} is known there but the signature does not verify: the secrets differ)")]
    BadSig { server: SocketAddr, key: String },
    #[error(
        "{server} refused the update: BADTIME (the signature's time is not acceptable: the clocks differ by more than the fudge, or the message was replayed)"
    )]
    BadTime { server: SocketAddr },
    #[error("{server} refused the update (REFUSED): it accepts no updates from this key for zone {zone}, or the update was unsigned")]
    Refused { server: SocketAddr, zone: String },
    #[error("{server} is not authoritative for zone {zone} (NOTAUTH): check --zone and that the server is the zone's primary")]
    NotAuth { server: SocketAddr, zone: String },
    #[error("a name in the update is outside zone {zone} (NOTZONE)")]
    NotZone { zone: String },
    #[error("prerequisite failed ({rcode}): the records were not what the update expected")]
    Prerequisite { rcode: ResponseCode },
    #[error("{server} answered {rcode}")]
    Rcode {
        server: SocketAddr,
        rcode: ResponseCode,
    },
    #[error("the answer from {server} failed TSIG verification ({why}); it may be forged, nothing is assumed changed")]
    Unauthentic { server: SocketAddr, why: String },
    #[error("no answer from {server} within {timeout:?} over {proto} (is the server running and reachable?)")]
    Timeout {
        server: SocketAddr,
        timeout: Duration,
        proto: &'static str,
    },
    #[error("cannot talk to {server}: {source}")]
    Io {
        server: SocketAddr,
        source: std::io::Error,
    },
    #[error("malformed answer from {server}: {why}")]
    Malformed { server: SocketAddr, why: String },
    #[error("cannot build the request: {0}")]
    Build(String),
}

impl ClientError {
    /// True when the server refused because of credentials or time.
    pub fn is_auth_refusal(&self) -> bool {
        matches!(
            self,
            Self::BadKey { .. } | Self::BadSig { .. } | Self::BadTime { .. } | Self::Refused { .. }
        )
    }
}

#[derive(Clone)]
pub struct Client {
    server: SocketAddr,
    signer: Option<TSigner>,
    key_name: String,
    timeout: Duration,
}

impl Client {
    pub fn new(server: SocketAddr, key: Option<&TsigKey>) -> Result<Self, ClientError> {
        let signer = key
            .map(|k| k.signer(DEFAULT_FUDGE))
            .transpose()
            .map_err(|e| ClientError::Build(e.to_string()))?;
        Ok(Self {
            server,
            signer,
            key_name: key.map(|k| k.display_name()).unwrap_or_default(),
            timeout: Duration::from_secs(3),
        })
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn server(&self) -> SocketAddr {
        self.server
    }

    /// A new UPDATE message for `zone` (zone section filled in).
    pub fn update_message(zone: &Name) -> Message {
        let mut msg = Message::new(0, MessageType::Query, OpCode::Update);
        let mut q = Query::query(zone.clone(), RecordType::SOA);
        q.set_query_class(DNSClass::IN);
        msg.add_query(q);
        msg
    }

    /// Sends a signed UPDATE; `Ok` only for NOERROR with a verified answer.
    pub async fn update(&self, msg: Message) -> Result<(), ClientError> {
        let zone = msg
            .queries
            .first()
            .map(|q| q.name().to_string())
            .unwrap_or_default();
        let answer = self.exchange(msg, true).await?;
        let rcode = answer.metadata.response_code;
        match rcode {
            ResponseCode::NoError => Ok(()),
            ResponseCode::Refused => Err(ClientError::Refused {
                server: self.server,
                zone,
            }),
            ResponseCode::NotAuth => Err(ClientError::NotAuth {
                server: self.server,
                zone,
            }),
            ResponseCode::NotZone => Err(ClientError::NotZone { zone }),
            ResponseCode::NXRRSet
            | ResponseCode::YXRRSet
            | ResponseCode::NXDomain
            | ResponseCode::YXDomain => Err(ClientError::Prerequisite { rcode }),
            rcode => Err(ClientError::Rcode {
                server: self.server,
                rcode,
            }),
        }
    }

    /// A plain (unsigned) query; the answer is returned whatever its RCODE.
    pub async fn query(&self, name: &Name, rtype: RecordType) -> Result<Message, ClientError> {
        let mut msg = Message::new(0, MessageType::Query, OpCode::Query);
        let mut q = Query::query(name.clone(), rtype);
        q.set_query_class(DNSClass::IN);
        msg.add_query(q);
        self.exchange(msg, false).await
    }

    /// Sends `msg` (signed when `sign` and a key is set), over UDP, or TCP
    /// when it is large or the answer is truncated.
    pub async fn exchange(&self, msg: Message, sign: bool) -> Result<Message, ClientError> {
        let signer = if sign { self.signer.as_ref() } else { None };
        let (bytes, mut verifier) = self.encode(&msg, signer)?;
        let raw = if bytes.len() > 512 {
            self.tcp(&bytes).await?
        } else {
            let raw = self.udp(&bytes).await?;
            if raw.len() > 2 && raw[2] & 0x02 != 0 {
                // truncated: ask again over TCP, freshly signed (a server
                // that remembers MACs would take the same bytes for a replay)
                let (bytes, v) = self.encode(&msg, signer)?;
                verifier = v;
                self.tcp(&bytes).await?
            } else {
                raw
            }
        };
        let answer = Message::from_vec(&raw).map_err(|e| ClientError::Malformed {
            server: self.server,
            why: e.to_string(),
        })?;
        if answer.metadata.message_type != MessageType::Response {
            return Err(ClientError::Malformed {
                server: self.server,
                why: "not a response".into(),
            });
        }
        let Some(verifier) = verifier.as_mut() else {
            return Ok(answer);
        };
        let rcode = answer.metadata.response_code;
        let Some(tsig) = answer.signature.as_ref() else {
            if rcode == ResponseCode::NoError {
                return Err(ClientError::Unauthentic {
                    server: self.server,
                    why: "NOERROR without a TSIG".into(),
                });
            }
            // An unsigned failure cannot make us believe something changed:
            // report it by its RCODE (some servers do not sign refusals).
            tracing::debug!(server = %self.server, %rcode, "unsigned error answer to a signed request");
            return Ok(answer);
        };
        match tsig.data.error {
            Some(TsigError::BadKey) => {
                return Err(ClientError::BadKey {
                    server: self.server,
                    key: self.key_name.clone(),
                })
            }
            Some(TsigError::BadSig) => {
                return Err(ClientError::BadSig {
                    server: self.server,
                    key: self.key_name.clone(),
                })
            }
            Some(TsigError::BadTime) => {
                return Err(ClientError::BadTime {
                    server: self.server,
                })
            }
            _ => {}
        }
        verifier
            .verify(&raw)
            .map_err(|e| ClientError::Unauthentic {
                server: self.server,
                why: e.to_string(),
            })?;
        Ok(answer)
    }

    fn encode(
        &self,
        msg: &Message,
        signer: Option<&TSigner>,
    ) -> Result<(Vec<u8>, Option<hickory_proto::rr::TSigVerifier>), ClientError> {
        let mut msg = msg.clone();
        msg.metadata.id = rand::random();
        let verifier = match signer {
            Some(s) => msg
                .finalize(s, unix_now())
                .map_err(|e| ClientError::Build(e.to_string()))?,
            None => None,
        };
        let bytes = msg
            .to_vec()
            .map_err(|e| ClientError::Build(e.to_string()))?;
        Ok((bytes, verifier))
    }

    async fn udp(&self, bytes: &[u8]) -> Result<Vec<u8>, ClientError> {
        let io = |source| ClientError::Io {
            server: self.server,
            source,
        };
        let bind: SocketAddr = if self.server.is_ipv4() {
            SocketAddr::from(([0, 0, 0, 0], 0))
        } else {
            SocketAddr::from(([0u16; 8], 0))
        };
        let sock = UdpSocket::bind(bind).await.map_err(io)?;
        sock.connect(self.server).await.map_err(io)?;
        let id = [bytes[0], bytes[1]];
        let mut buf = vec![0u8; 65535];
        // one resend halfway through the timeout: UDP may lose either packet
        for attempt in 0..2 {
            sock.send(bytes).await.map_err(io)?;
            let deadline = tokio::time::Instant::now() + self.timeout / 2;
            loop {
                match tokio::time::timeout_at(deadline, sock.recv(&mut buf)).await {
                    Err(_) => break,
                    Ok(Err(e))
                        if attempt == 0 && e.kind() == std::io::ErrorKind::ConnectionRefused =>
                    {
                        break
                    }
                    Ok(Err(e)) => return Err(io(e)),
                    Ok(Ok(n)) if n >= 12 && buf[..2] == id => return Ok(buf[..n].to_vec()),
                    Ok(Ok(_)) => continue, // not ours: late answer to an earlier try, or spoofed
                }
            }
        }
        Err(ClientError::Timeout {
            server: self.server,
            timeout: self.timeout,
            proto: "UDP",
        })
    }

    async fn tcp(&self, bytes: &[u8]) -> Result<Vec<u8>, ClientError> {
        let io = |source| ClientError::Io {
            server: self.server,
            source,
        };
        let work = async {
            let mut s = TcpStream::connect(self.server).await.map_err(io)?;
            let len = u16::try_from(bytes.len())
                .map_err(|_| ClientError::Build("message over 64 KiB".into()))?;
            let mut framed = len.to_be_bytes().to_vec();
            framed.extend_from_slice(bytes);
            s.write_all(&framed).await.map_err(io)?;
            let mut len = [0u8; 2];
            s.read_exact(&mut len).await.map_err(io)?;
            let mut buf = vec![0u8; u16::from_be_bytes(len) as usize];
            s.read_exact(&mut buf).await.map_err(io)?;
            Ok(buf)
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| ClientError::Timeout {
                server: self.server,
                timeout: self.timeout,
                proto: "TCP",
            })?
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
