//! TSIG checks for incoming UPDATE and zone-transfer requests (RFC 8945 §5.2).
//!
//! | request                          | RCODE    | TSIG error | response TSIG |
//! |----------------------------------|----------|------------|---------------|
//! | unsigned                         | REFUSED  | -          | none          |
//! | unknown key name or algorithm    | NOTAUTH  | BADKEY     | unsigned      |
//! | MAC does not verify              | NOTAUTH  | BADSIG     | unsigned      |
//! | time outside time signed ± fudge | NOTAUTH  | BADTIME    | signed        |
//! | replay of a MAC already accepted | NOTAUTH  | BADTIME    | signed        |
//! | good key, not allowed this zone  | REFUSED  | -          | signed        |
//!
//! Replays: RFC 8945 bounds them by the time window only. We also remember
//! every MAC accepted within its window, so the exact same signed message is
//! never applied twice (answered as BADTIME: the request's time is not
//! acceptable any more). The cache lives in memory: after a restart a replay
//! is bounded by the fudge window alone, as with BIND.

use std::collections::HashMap;
use std::sync::Mutex;

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::rdata::tsig::{TsigError, TSIG};
use hickory_proto::rr::{Name, Record, TSigResponseContext, TSigner};

use crate::key::TsigKey;

/// Why a request was refused, for counters and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    Unsigned,
    BadKey,
    BadSig,
    BadTime,
    Replay,
    NotAllowed,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unsigned => "unsigned",
            Self::BadKey => "badkey",
            Self::BadSig => "badsig",
            Self::BadTime => "badtime",
            Self::Replay => "replay",
            Self::NotAllowed => "not_allowed",
        }
    }
}

pub struct Outcome {
    /// The authenticated key, or the refusal and the RCODE to answer with.
    pub result: Result<Name, (Refusal, ResponseCode)>,
    /// How to sign (or mark) the response.
    pub response: Option<TSigResponseContext>,
}

pub struct Authenticator {
    keys: Vec<(TsigKey, TSigner)>,
    /// MAC → end of its validity window.
    seen: Mutex<HashMap<Vec<u8>, u64>>,
}

impl Authenticator {
    pub fn new(keys: &[TsigKey], fudge: u16) -> Result<Self, crate::key::KeyError> {
        let keys = keys
            .iter()
            .map(|k| Ok((k.clone(), k.signer(fudge)?)))
            .collect::<Result<_, crate::key::KeyError>>()?;
        Ok(Self {
            keys,
            seen: Mutex::new(HashMap::new()),
        })
    }

    /// Checks the TSIG of `raw` (the request exactly as received).
    /// `allowed`: key names that may act on this zone (`None`: any known key).
    /// `refuse_replays`: for requests that change state; a resolver's
    /// retransmitted signed query is legitimately the same bytes.
    pub fn check(
        &self,
        id: u16,
        raw: &[u8],
        tsig: Option<&Record<TSIG>>,
        now: u64,
        allowed: Option<&[Name]>,
        refuse_replays: bool,
    ) -> Outcome {
        let Some(tsig) = tsig else {
            return refuse(Refusal::Unsigned, ResponseCode::Refused, None);
        };
        let key_name = tsig.name.to_lowercase();
        let Some((key, signer)) = self
            .keys
            .iter()
            .find(|(k, s)| k.name() == &key_name && s.algorithm() == &tsig.data.algorithm)
        else {
            return refuse(
                Refusal::BadKey,
                ResponseCode::NotAuth,
                Some(TSigResponseContext::unknown_key(id, now, tsig.name.clone())),
            );
        };
        let Ok((mac, _time, window)) = signer.verify_message_byte(raw, None, true) else {
            return refuse(
                Refusal::BadSig,
                ResponseCode::NotAuth,
                Some(TSigResponseContext::bad_signature(id, now, signer.clone())),
            );
        };
        let signed = |error| TSigResponseContext::new(id, now, signer.clone(), mac.clone(), error);
        if !window.contains(&now) {
            return refuse(
                Refusal::BadTime,
                ResponseCode::NotAuth,
                Some(signed(Some(TsigError::BadTime))),
            );
        }
        if refuse_replays {
            let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
            seen.retain(|_, until| *until >= now);
            if seen.contains_key(&mac) {
                return refuse(
                    Refusal::Replay,
                    ResponseCode::NotAuth,
                    Some(signed(Some(TsigError::BadTime))),
                );
            }
            seen.insert(mac.clone(), window.end);
        }
        if let Some(allowed) = allowed {
            if !allowed.iter().any(|n| n == key.name()) {
                return refuse(
                    Refusal::NotAllowed,
                    ResponseCode::Refused,
                    Some(signed(None)),
                );
            }
        }
        Outcome {
            result: Ok(key.name().clone()),
            response: Some(signed(None)),
        }
    }
}

fn refuse(why: Refusal, code: ResponseCode, response: Option<TSigResponseContext>) -> Outcome {
    Outcome {
        result: Err((why, code)),
        response,
    }
}
