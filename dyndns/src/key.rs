//! TSIG keys: the shared secrets that authenticate UPDATE messages.
//!
//! Keys are written the way the standard tools write them, so one key works
//! everywhere: `hmac-sha256:NAME:BASE64` is `nsupdate -y`'s form, and
//! [`TsigKey::bind_clause`] / [`TsigKey::from_bind_file`] speak `named.conf`'s
//! `key "NAME" { algorithm ...; secret "..."; };` (what `tsig-keygen` prints).

use std::fmt;
use std::path::Path;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use hickory_proto::rr::rdata::tsig::TsigAlgorithm;
use hickory_proto::rr::{Name, TSigner};
use rand::RngCore as _;

/// RFC 8945 recommends 300 s.
pub const DEFAULT_FUDGE: u16 = 300;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error(
        "bad key {0:?}: expected ALGORITHM:NAME:BASE64SECRET, e.g. hmac-sha256:mig-key:c2VjcmV0 (the form nsupdate -y takes)"
    )]
    Spec(String),
    #[error("unknown TSIG algorithm {0:?} (use hmac-sha256, hmac-sha384 or hmac-sha512)")]
    Algorithm(String),
    #[error("bad key name {0:?}: {1}")]
    Name(String, String),
    #[error("secret of key {0:?} is not valid base64: {1}")]
    Secret(String, String),
    #[error("secret of key {0:?} is too short ({1} bytes; use at least 16, tsig-keygen makes 32)")]
    Short(String, usize),
    #[error("cannot read key file {0}: {1}")]
    Read(String, String),
    #[error("key file {0} has no {1} (expected tsig-keygen's format)")]
    BindFile(String, &'static str),
    #[error("cannot build a TSIG signer for key {0:?}: {1}")]
    Signer(String, String),
}

/// A named HMAC secret.
#[derive(Clone, PartialEq, Eq)]
pub struct TsigKey {
    name: Name,
    algorithm: Algorithm,
    secret: Vec<u8>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algorithm {
    HmacSha256,
    HmacSha384,
    HmacSha512,
}

impl Algorithm {
    pub fn parse(s: &str) -> Result<Self, KeyError> {
        match s.trim_end_matches('.').to_ascii_lowercase().as_str() {
            "hmac-sha256" => Ok(Self::HmacSha256),
            "hmac-sha384" => Ok(Self::HmacSha384),
            "hmac-sha512" => Ok(Self::HmacSha512),
            _ => Err(KeyError::Algorithm(s.to_string())),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::HmacSha256 => "hmac-sha256",
            Self::HmacSha384 => "hmac-sha384",
            Self::HmacSha512 => "hmac-sha512",
        }
    }

    fn tsig(self) -> TsigAlgorithm {
        match self {
            Self::HmacSha256 => TsigAlgorithm::HmacSha256,
            Self::HmacSha384 => TsigAlgorithm::HmacSha384,
            Self::HmacSha512 => TsigAlgorithm::HmacSha512,
        }
    }
}

impl TsigKey {
    pub fn new(name: &str, algorithm: Algorithm, secret: Vec<u8>) -> Result<Self, KeyError> {
        let parsed =
            Name::from_ascii(name).map_err(|e| KeyError::Name(name.to_string(), e.to_string()))?;
        let mut parsed = parsed.to_lowercase();
        parsed.set_fqdn(true);
        if secret.len() < 16 {
            return Err(KeyError::Short(name.to_string(), secret.len()));
        }
        Ok(Self {
            name: parsed,
            algorithm,
            secret,
        })
    }

    /// A fresh 256-bit secret, as `tsig-keygen` makes.
    pub fn generate(name: &str) -> Result<Self, KeyError> {
        let mut secret = vec![0u8; 32];
        rand::thread_rng().fill_bytes(&mut secret);
        Self::new(name, Algorithm::HmacSha256, secret)
    }

    /// `ALGORITHM:NAME:BASE64` (nsupdate -y). `NAME:BASE64` means hmac-sha256.
    pub fn parse_spec(spec: &str) -> Result<Self, KeyError> {
        let parts: Vec<&str> = spec.trim().split(':').collect();
        let (alg, name, secret) = match parts.as_slice() {
            [alg, name, secret] => (Algorithm::parse(alg)?, *name, *secret),
            [name, secret] => (Algorithm::HmacSha256, *name, *secret),
            _ => return Err(KeyError::Spec(redact(spec))),
        };
        if name.is_empty() {
            return Err(KeyError::Spec(redact(spec)));
        }
        Self::new(name, alg, decode_secret(name, secret)?)
    }

    /// Parses `tsig-keygen` output / a `named.conf` key clause.
    pub fn from_bind_file(path: &Path) -> Result<Self, KeyError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|e| KeyError::Read(shown.clone(), e.to_string()))?;
        Self::from_bind_text(&text).map_err(|e| match e {
            KeyError::BindFile(_, what) => KeyError::BindFile(shown, what),
            other => other,
        })
    }

    pub fn from_bind_text(text: &str) -> Result<Self, KeyError> {
        let quoted_after = |word: &str| -> Option<String> {
            let at = text.find(word)? + word.len();
            let rest = &text[at..];
            let start = rest.find('"')? + 1;
            let end = rest[start..].find('"')? + start;
            Some(rest[start..end].to_string())
        };
        let name = quoted_after("key").ok_or(KeyError::BindFile(String::new(), "key \"NAME\""))?;
        let secret =
            quoted_after("secret").ok_or(KeyError::BindFile(String::new(), "secret \"...\";"))?;
        let alg = text
            .find("algorithm")
            .and_then(|at| {
                let rest = text[at + "algorithm".len()..].trim_start();
                rest.split(|c: char| c == ';' || c.is_whitespace()).next()
            })
            .ok_or(KeyError::BindFile(String::new(), "algorithm ...;"))?;
        Self::new(
            &name,
            Algorithm::parse(alg)?,
            decode_secret(&name, &secret)?,
        )
    }

    pub fn name(&self) -> &Name {
        &self.name
    }

    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The name without the trailing dot, as the standard tools print it.
    pub fn display_name(&self) -> String {
        self.name.to_string().trim_end_matches('.').to_string()
    }

    pub fn secret_base64(&self) -> String {
        B64.encode(&self.secret)
    }

    /// `nsupdate -y` form.
    pub fn spec(&self) -> String {
        format!(
            "{}:{}:{}",
            self.algorithm.as_str(),
            self.display_name(),
            self.secret_base64()
        )
    }

    /// A `named.conf` key clause.
    pub fn bind_clause(&self) -> String {
        format!(
            "key \"{}\" {{\n\talgorithm {};\n\tsecret \"{}\";\n}};\n",
            self.display_name(),
            self.algorithm.as_str(),
            self.secret_base64()
        )
    }

    pub fn signer(&self, fudge: u16) -> Result<TSigner, KeyError> {
        TSigner::new(
            self.secret.clone(),
            self.algorithm.tsig(),
            self.name.clone(),
            fudge,
        )
        .map_err(|e| KeyError::Signer(self.display_name(), e.to_string()))
    }
}

impl fmt::Debug for TsigKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TsigKey")
            .field("name", &self.name)
            .field("algorithm", &self.algorithm)
            .field("secret", &"<redacted>")
            .finish()
    }
}

fn decode_secret(name: &str, secret: &str) -> Result<Vec<u8>, KeyError> {
    B64.decode(secret.trim())
        .map_err(|e| KeyError::Secret(name.to_string(), e.to_string()))
}

/// Never echo a secret back in an error message.
fn redact(spec: &str) -> String {
    match spec.rsplit_once(':') {
        Some((head, _)) => format!("{head}:<secret>"),
        None => "<secret>".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_round_trips_and_bind_clause_parses_back() {
        let key = TsigKey::generate("mig-key").expect("generate");
        let again = TsigKey::parse_spec(&key.spec()).expect("parse spec");
        assert_eq!(key, again);
        let from_bind = TsigKey::from_bind_text(&key.bind_clause()).expect("parse bind");
        assert_eq!(key, from_bind);
        assert_eq!(key.display_name(), "mig-key");
    }

    #[test]
    fn bad_specs_are_clear_errors_and_do_not_leak_the_secret() {
        let err = TsigKey::parse_spec("hmac-md5:k:c2VjcmV0c2VjcmV0c2VjcmV0")
            .expect_err("must be refused");
        assert!(matches!(err, KeyError::Algorithm(_)), "{err}");
        let err = TsigKey::parse_spec("nocolons").expect_err("must be refused");
        assert!(matches!(err, KeyError::Spec(_)));
        let err = TsigKey::parse_spec("a:b:c:TOPSECRET").expect_err("must be refused");
        assert!(!err.to_string().contains("TOPSECRET"), "{err}");
        let err = TsigKey::parse_spec("hmac-sha256:k:!!!").expect_err("must be refused");
        assert!(matches!(err, KeyError::Secret(..)));
        let err = TsigKey::parse_spec("hmac-sha256:k:c2hvcnQ=").expect_err("must be refused");
        assert!(matches!(err, KeyError::Short(..)));
    }
}
