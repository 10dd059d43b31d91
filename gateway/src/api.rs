//! The HTTP/JSON control API (TCP or unix socket), every route behind a
//! bearer token: a request without the right token gets 401 and changes
//! nothing. The routes and their bodies are the types of `gateway-api`
//! (shared with the clients).

use std::fmt::Write as _;
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use gateway_api::{Drain, ErrorReply, Prepare, Service, Status, Switch};

use crate::control::{Control, ControlError};

#[derive(Clone)]
pub struct Api {
    pub control: Arc<Control>,
    pub token: Arc<str>,
    pub dns: Option<Arc<Vec<Arc<dyndns::server::DynZone>>>>,
}

impl IntoResponse for ControlError {
    fn into_response(self) -> Response {
        let code = match &self {
            ControlError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ControlError::NotFound(_) => StatusCode::NOT_FOUND,
            ControlError::Conflict(_) => StatusCode::CONFLICT,
            ControlError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        (
            code,
            Json(ErrorReply {
                error: self.to_string(),
            }),
        )
            .into_response()
    }
}

/// Constant-time comparison, so the token cannot be guessed byte by byte.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn authorized(api: &Api, headers: &HeaderMap) -> Result<(), Box<Response>> {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(t) if same(t.as_bytes(), api.token.as_bytes()) => Ok(()),
        _ => Err(Box::new(
            (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                Json(ErrorReply {
                    error: "missing or wrong bearer token".into(),
                }),
            )
                .into_response(),
        )),
    }
}

/// Parses a JSON body; a bad one is a 400 with serde's reason.
fn body<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, Box<Response>> {
    serde_json::from_slice(bytes).map_err(|e| {
        Box::new(
            (
                StatusCode::BAD_REQUEST,
                Json(ErrorReply {
                    error: format!("bad request body: {e}"),
                }),
            )
                .into_response(),
        )
    })
}

async fn register(State(api): State<Api>, headers: HeaderMap, raw: axum::body::Bytes) -> Response {
    if let Err(r) = authorized(&api, &headers) {
        return *r;
    }
    let r: Service = match body(&raw) {
        Ok(r) => r,
        Err(e) => return *e,
    };
    match api.control.register(r).await {
        Ok(s) => (StatusCode::CREATED, Json(s)).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn migrate(
    State(api): State<Api>,
    Path((service, action)): Path<(String, String)>,
    headers: HeaderMap,
    raw: axum::body::Bytes,
) -> Response {
    if let Err(r) = authorized(&api, &headers) {
        return *r;
    }
    let result = match action.as_str() {
        "prepare" => match body::<Prepare>(&raw) {
            Ok(p) => api.control.prepare(&service, &p.to).await,
            Err(e) => return *e,
        },
        "switch" => match body::<Switch>(&raw) {
            Ok(s) => api.control.switch(&service, s).await,
            Err(e) => return *e,
        },
        "drain" => {
            let d: Drain = if raw.is_empty() {
                Drain::default()
            } else {
                match body(&raw) {
                    Ok(d) => d,
                    Err(e) => return *e,
                }
            };
            api.control.drain(&service, d.deadline_s).await
        }
        other => Err(ControlError::NotFound(format!(
            "no action {other:?}: use prepare, switch or drain (POST), or handover (GET)"
        ))),
    };
    match result {
        Ok(m) => Json(m).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn handover(
    State(api): State<Api>,
    Path((service, action)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = authorized(&api, &headers) {
        return *r;
    }
    if action != "handover" {
        return ControlError::NotFound(format!("no action {action:?} to GET: use handover"))
            .into_response();
    }
    match api.control.handover(&service).await {
        Ok(h) => Json(h).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn status(State(api): State<Api>, headers: HeaderMap) -> Response {
    if let Err(r) = authorized(&api, &headers) {
        return *r;
    }
    let (state, migrations) = api.control.status().await;
    let counters = api.control.plane.as_ref().map(|p| p.snapshot());
    Json(Status {
        site: api.control.config.site.clone(),
        services: state.services,
        migrations,
        data_plane: counters,
    })
    .into_response()
}

async fn metrics(State(api): State<Api>, headers: HeaderMap) -> Response {
    if let Err(r) = authorized(&api, &headers) {
        return *r;
    }
    let mut out = String::new();
    let site = &api.control.config.site;
    let (_, migrations) = api.control.status().await;
    let _ = writeln!(out, "# HELP gateway_flows Flows through the tunnel, by service address.\n# TYPE gateway_flows gauge");
    for m in &migrations {
        if let Some(t) = &m.traffic {
            let _ = writeln!(
                out,
                "gateway_flows{{site=\"{site}\",service=\"{}\",address=\"{}\"}} {}",
                m.migration.service, m.migration.address, t.live_flows
            );
            let _ = writeln!(
                out,
                "gateway_tunnel_bytes{{site=\"{site}\",service=\"{}\",address=\"{}\"}} {}",
                m.migration.service, m.migration.address, t.bytes
            );
        }
    }
    if let Some(p) = &api.control.plane {
        let s = p.snapshot();
        let _ = writeln!(out, "# TYPE gateway_encapsulated_packets_total counter\ngateway_encapsulated_packets_total{{site=\"{site}\"}} {}", s.encapsulated_packets);
        let _ = writeln!(out, "# TYPE gateway_decapsulated_packets_total counter\ngateway_decapsulated_packets_total{{site=\"{site}\"}} {}", s.decapsulated_packets);
        if let Some(k) = &s.fast_path {
            let _ = writeln!(out, "# HELP gateway_fast_path_packets_total Packets the kernel fast path carried (included in the totals above).\n# TYPE gateway_fast_path_packets_total counter");
            for (way, n) in [("encap", k.encap_packets), ("decap", k.decap_packets)] {
                let _ = writeln!(
                    out,
                    "gateway_fast_path_packets_total{{site=\"{site}\",way=\"{way}\"}} {n}"
                );
            }
            let _ = writeln!(out, "# HELP gateway_fast_path_split_total Lone segments too big for the tunnel that the kernel cut in two.\n# TYPE gateway_fast_path_split_total counter\ngateway_fast_path_split_total{{site=\"{site}\"}} {}", k.split);
            let _ = writeln!(out, "# HELP gateway_fast_path_errors_total Packets the kernel fast path lost (should stay 0).\n# TYPE gateway_fast_path_errors_total counter\ngateway_fast_path_errors_total{{site=\"{site}\"}} {}", k.errors);
        }
        let _ = writeln!(out, "# TYPE gateway_drops_total counter");
        for (reason, n) in &s.drops {
            let _ = writeln!(
                out,
                "gateway_drops_total{{site=\"{site}\",reason=\"{reason}\"}} {n}"
            );
        }
    }
    if let Some(zones) = &api.dns {
        let _ = writeln!(out, "# TYPE dns_updates_applied_total counter");
        for z in zones.iter() {
            let st = z.stats().await;
            let _ = writeln!(
                out,
                "dns_updates_applied_total{{zone=\"{}\"}} {}",
                st.zone, st.applied
            );
            for (reason, n) in &st.refused {
                let _ = writeln!(
                    out,
                    "dns_updates_refused_total{{zone=\"{}\",reason=\"{reason}\"}} {n}",
                    st.zone
                );
            }
        }
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

pub fn router(api: Api) -> Router {
    Router::new()
        .route(
            "/v1/migrations/{service}/{action}",
            post(migrate).get(handover),
        )
        // a switch carries the connections of the site the VM left (about
        // 150 bytes each); the other routes keep axum's 2 MB
        .layer(DefaultBodyLimit::max(16 << 20))
        .route("/v1/services", post(register))
        .route("/v1/status", get(status))
        .route("/metrics", get(metrics))
        .with_state(api)
}
