//! Client of a site gateway's control API (HTTP/JSON with a bearer token,
//! over TCP or a unix socket); the bodies and replies are `gateway-api`'s
//! types, the ones the gateway serves.

use std::path::PathBuf;
use std::time::Duration;

use gateway_api::{
    Action, Drain, ErrorReply, Handover, Migration, MigrationStatus, Prepare, Service, Status,
    Switch,
};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper::{header, Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("cannot reach gateway {site} at {endpoint}: {reason} (is `gateway run` up there, its API reachable from here?)")]
    Unreachable {
        site: String,
        endpoint: String,
        reason: String,
    },
    #[error("gateway {site} refused our token (401): check the site's token or token_file")]
    Unauthorized { site: String },
    #[error("gateway {site} sent a reply this client does not understand to {what}: {reason} (are both the same version?)")]
    Garbled {
        site: String,
        what: String,
        reason: String,
    },
    #[error("gateway {site} answered {status} to {what}: {message}")]
    Refused {
        site: String,
        what: String,
        status: u16,
        message: String,
    },
}

/// Where a gateway's API listens: `host:port` or `unix:/path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Tcp(String),
    Unix(PathBuf),
}

impl Endpoint {
    pub fn parse(s: &str) -> Self {
        match s.strip_prefix("unix:") {
            Some(p) => Endpoint::Unix(PathBuf::from(p)),
            None => Endpoint::Tcp(
                s.trim_start_matches("http://")
                    .trim_end_matches('/')
                    .to_string(),
            ),
        }
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Tcp(a) => write!(f, "http://{a}"),
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Gateway {
    pub site: String,
    pub endpoint: Endpoint,
    token: String,
    timeout: Duration,
}

impl Gateway {
    pub fn new(site: &str, endpoint: Endpoint, token: String) -> Self {
        Self {
            site: site.to_string(),
            endpoint,
            token,
            timeout: Duration::from_secs(10),
        }
    }

    fn unreachable(&self, reason: impl std::fmt::Display) -> GatewayError {
        GatewayError::Unreachable {
            site: self.site.clone(),
            endpoint: self.endpoint.to_string(),
            reason: reason.to_string(),
        }
    }

    /// One request; the answer of a 2xx as `R`.
    async fn call<R: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<R, GatewayError> {
        let what = format!("{method} {path}");
        let body = match body {
            Some(b) => serde_json::to_vec(b).map_err(|e| self.unreachable(e))?,
            None => Vec::new(),
        };
        let (status, bytes) = tokio::time::timeout(self.timeout, self.send(method, path, body))
            .await
            .map_err(|_| self.unreachable(format!("no answer within {:?}", self.timeout)))??;
        if status == StatusCode::UNAUTHORIZED {
            return Err(GatewayError::Unauthorized {
                site: self.site.clone(),
            });
        }
        if !status.is_success() {
            let message = serde_json::from_slice::<ErrorReply>(&bytes)
                .map(|e| e.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
            return Err(GatewayError::Refused {
                site: self.site.clone(),
                what,
                status: status.as_u16(),
                message,
            });
        }
        serde_json::from_slice(&bytes).map_err(|e| GatewayError::Garbled {
            site: self.site.clone(),
            what,
            reason: e.to_string(),
        })
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Vec<u8>,
    ) -> Result<(StatusCode, Bytes), GatewayError> {
        match &self.endpoint {
            Endpoint::Tcp(addr) => {
                let s = tokio::net::TcpStream::connect(addr)
                    .await
                    .map_err(|e| self.unreachable(e))?;
                self.exchange(s, method, path, body).await
            }
            Endpoint::Unix(p) => {
                let s = tokio::net::UnixStream::connect(p)
                    .await
                    .map_err(|e| self.unreachable(e))?;
                self.exchange(s, method, path, body).await
            }
        }
    }

    async fn exchange<S>(
        &self,
        stream: S,
        method: Method,
        path: &str,
        body: Vec<u8>,
    ) -> Result<(StatusCode, Bytes), GatewayError>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| self.unreachable(e))?;
        let conn = tokio::spawn(conn);
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, "gateway")
            .header(header::AUTHORIZATION, format!("Bearer {}", self.token))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| self.unreachable(e))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| self.unreachable(e))?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| self.unreachable(e))?
            .to_bytes();
        conn.abort();
        Ok((status, bytes))
    }

    pub async fn status(&self) -> Result<Status, GatewayError> {
        self.call(Method::GET, "/v1/status", None::<&()>).await
    }

    pub async fn register(&self, service: &Service) -> Result<Service, GatewayError> {
        self.call(Method::POST, "/v1/services", Some(service)).await
    }

    pub async fn prepare(&self, service: &str, to: &str) -> Result<Migration, GatewayError> {
        let body = Prepare { to: to.into() };
        self.call(Method::POST, &Action::Prepare.path(service), Some(&body))
            .await
    }

    pub async fn switch(&self, service: &str, switch: &Switch) -> Result<Migration, GatewayError> {
        self.call(Method::POST, &Action::Switch.path(service), Some(switch))
            .await
    }

    pub async fn drain(&self, service: &str, drain: &Drain) -> Result<Migration, GatewayError> {
        self.call(Method::POST, &Action::Drain.path(service), Some(drain))
            .await
    }

    /// What this site knows of a VM that runs there, for the next site.
    pub async fn handover(&self, service: &str) -> Result<Handover, GatewayError> {
        self.call(Method::GET, &Action::Handover.path(service), None::<&()>)
            .await
    }

    /// This site's part in `service`'s moves, with its traffic, if any.
    pub async fn part(&self, service: &str) -> Result<Option<MigrationStatus>, GatewayError> {
        Ok(self.status().await?.migration(service).cloned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        assert_eq!(
            Endpoint::parse("unix:/run/g.sock"),
            Endpoint::Unix("/run/g.sock".into())
        );
        assert_eq!(
            Endpoint::parse("http://10.0.0.1:7300/"),
            Endpoint::Tcp("10.0.0.1:7300".into())
        );
        assert_eq!(
            Endpoint::parse("10.0.0.1:7300"),
            Endpoint::Tcp("10.0.0.1:7300".into())
        );
    }
}
