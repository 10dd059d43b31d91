//! TLS 1.3 with pinned keys: each side has a self-signed certificate, and each
//! accepts exactly the peer certificates whose SHA-256 fingerprints it was given.
//! No CA is involved; a peer without a pinned key fails the handshake before any
//! frame is read.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use sha2::{Digest, Sha256};
use thiserror::Error;

pub const CERT_FILE: &str = "cert.der";
pub const KEY_FILE: &str = "key.der";

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("cannot read identity {path}: {source} (create one with `migrator keygen --dir DIR`)")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write identity {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot generate a key: {0}")]
    Keygen(String),
    #[error("fingerprint {0:?} is not 64 hex digits (it is printed by `migrator keygen`)")]
    BadFingerprint(String),
    #[error("TLS configuration rejected: {0}")]
    Config(#[from] rustls::Error),
}

pub type Fingerprint = [u8; 32];

pub fn fingerprint(cert: &[u8]) -> Fingerprint {
    Sha256::digest(cert).into()
}

pub fn parse_fingerprint(s: &str) -> Result<Fingerprint, TlsError> {
    let clean: String = s.chars().filter(|c| *c != ':').collect();
    let v = hex::decode(&clean).map_err(|_| TlsError::BadFingerprint(s.to_string()))?;
    v.try_into()
        .map_err(|_| TlsError::BadFingerprint(s.to_string()))
}

/// This host's certificate and key.
#[derive(Clone)]
pub struct Identity {
    pub cert: CertificateDer<'static>,
    key: Arc<PrivatePkcs8KeyDer<'static>>,
}

impl Identity {
    pub fn generate() -> Result<Self, TlsError> {
        let ck = rcgen::generate_simple_self_signed(vec!["migrator.invalid".to_string()])
            .map_err(|e| TlsError::Keygen(e.to_string()))?;
        Ok(Self {
            cert: ck.cert.der().clone(),
            key: Arc::new(PrivatePkcs8KeyDer::from(ck.key_pair.serialize_der())),
        })
    }

    pub fn fingerprint(&self) -> Fingerprint {
        fingerprint(&self.cert)
    }

    pub fn fingerprint_hex(&self) -> String {
        hex::encode(self.fingerprint())
    }

    pub fn save(&self, dir: &Path) -> Result<(), TlsError> {
        let w = |name: &str, data: &[u8]| {
            let path = dir.join(name);
            std::fs::create_dir_all(dir)
                .and_then(|_| std::fs::write(&path, data))
                .map_err(|source| TlsError::Write { path, source })
        };
        w(CERT_FILE, &self.cert)?;
        w(KEY_FILE, self.key.secret_pkcs8_der())?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let path = dir.join(KEY_FILE);
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                .map_err(|source| TlsError::Write { path, source })?;
        }
        Ok(())
    }

    pub fn load(dir: &Path) -> Result<Self, TlsError> {
        let r = |name: &str| {
            let path = dir.join(name);
            std::fs::read(&path).map_err(|source| TlsError::Read { path, source })
        };
        Ok(Self {
            cert: CertificateDer::from(r(CERT_FILE)?),
            key: Arc::new(PrivatePkcs8KeyDer::from(r(KEY_FILE)?)),
        })
    }

    fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.clone_key())
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

#[derive(Debug)]
struct Pinned {
    allowed: Vec<Fingerprint>,
    provider: Arc<CryptoProvider>,
}

impl Pinned {
    fn check(&self, cert: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        let fp = fingerprint(cert);
        if self.allowed.contains(&fp) {
            Ok(())
        } else {
            Err(rustls::Error::General(format!(
                "peer key {} is not pinned (pass its fingerprint with --peer)",
                hex::encode(fp)
            )))
        }
    }

    fn tls13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity)
            .map(|_| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not allowed".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes()
    }
}

impl ClientCertVerifier for Pinned {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity)
            .map(|_| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not allowed".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes()
    }
}

pub fn server_config(
    id: &Identity,
    peers: Vec<Fingerprint>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let p = provider();
    let verifier = Arc::new(Pinned {
        allowed: peers,
        provider: p.clone(),
    });
    let cfg = rustls::ServerConfig::builder_with_provider(p)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![id.cert.clone()], id.key())?;
    Ok(Arc::new(cfg))
}

pub fn client_config(
    id: &Identity,
    peers: Vec<Fingerprint>,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let p = provider();
    let verifier = Arc::new(Pinned {
        allowed: peers,
        provider: p.clone(),
    });
    let cfg = rustls::ClientConfig::builder_with_provider(p)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(vec![id.cert.clone()], id.key())?;
    Ok(Arc::new(cfg))
}

/// The name we present in SNI; verification ignores it (keys are pinned).
pub fn server_name() -> ServerName<'static> {
    ServerName::try_from("migrator.invalid").expect("static DNS name is valid")
}
