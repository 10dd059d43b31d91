//! Client of a site gateway's control API (HTTP/JSON with a bearer token,
//! over TCP or a unix socket).

use std::path::PathBuf;
use std::time::Duration;

use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper::{header, Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;

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

    /// One request; the parsed JSON answer of a 2xx.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, GatewayError> {
        tokio::time::timeout(self.timeout, self.call_inner(method, path, body))
            .await
            .map_err(|_| self.unreachable(format!("no answer within {:?}", self.timeout)))?
    }

    async fn call_inner(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, GatewayError> {
        let what = format!("{method} {path}");
        let (status, bytes) = match &self.endpoint {
            Endpoint::Tcp(addr) => {
                let s = tokio::net::TcpStream::connect(addr)
                    .await
                    .map_err(|e| self.unreachable(e))?;
                self.exchange(s, method, path, body).await?
            }
            Endpoint::Unix(p) => {
                let s = tokio::net::UnixStream::connect(p)
                    .await
                    .map_err(|e| self.unreachable(e))?;
                self.exchange(s, method, path, body).await?
            }
        };
        let value: Value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        if status == StatusCode::UNAUTHORIZED {
            return Err(GatewayError::Unauthorized {
                site: self.site.clone(),
            });
        }
        if !status.is_success() {
            let message = value["error"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| value.to_string());
            return Err(GatewayError::Refused {
                site: self.site.clone(),
                what,
                status: status.as_u16(),
                message,
            });
        }
        Ok(value)
    }

    async fn exchange<S>(
        &self,
        stream: S,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<(StatusCode, Bytes), GatewayError>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| self.unreachable(e))?;
        let conn = tokio::spawn(conn);
        let body = body.map(|b| b.to_string()).unwrap_or_default();
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

    pub async fn status(&self) -> Result<Value, GatewayError> {
        self.call(Method::GET, "/v1/status", None).await
    }

    pub async fn register(
        &self,
        name: &str,
        address: &str,
        site: &str,
    ) -> Result<Value, GatewayError> {
        self.call(
            Method::POST,
            "/v1/services",
            Some(serde_json::json!({"name": name, "address": address, "site": site})),
        )
        .await
    }

    pub async fn action(
        &self,
        service: &str,
        action: &str,
        body: Value,
    ) -> Result<Value, GatewayError> {
        self.call(
            Method::POST,
            &format!("/v1/migrations/{service}/{action}"),
            Some(body),
        )
        .await
    }

    /// The phase of `service`'s migration here, if any.
    pub async fn phase(&self, service: &str) -> Result<Option<String>, GatewayError> {
        let st = self.status().await?;
        Ok(st["migrations"].as_array().and_then(|ms| {
            ms.iter()
                .find(|m| m["service"] == service)
                .and_then(|m| m["phase"].as_str().map(str::to_string))
        }))
    }

    /// Flows and bytes this gateway tunnelled for `service`.
    pub async fn traffic(&self, service: &str) -> Result<Value, GatewayError> {
        let st = self.status().await?;
        Ok(st["migrations"]
            .as_array()
            .and_then(|ms| ms.iter().find(|m| m["service"] == service))
            .map(|m| m["traffic"].clone())
            .unwrap_or(Value::Null))
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
