//! The runner's HTTP API, called by the control plane.
//!
//! - `GET /api/health`: without the bearer key, [`protocol::RunnerLiveness`]
//!   only (`{"status":"ok"}`, or `degraded` with 503), so a prober learns
//!   that the runner is alive and nothing else; with it, [`HealthBody`]:
//!   [`protocol::RunnerHealth`] plus the binary's SHA-256 and the pid.
//! - `POST /api/boxes/{id}/exec`: [`protocol::ExecRequest`] → [`protocol::ExecResponse`].
//! - `GET /api/boxes/{id}/exec/ws`: the exec WebSocket (see [`crate::exec`]).
//! - `GET /api/boxes/{id}/export`: the box archive; SHA-256 in `x-boxlite-sha256`.
//! - `POST /api/boxes/{id}/import`: archive body, `x-boxlite-sha256` and the
//!   one-time `x-boxlite-import-token` the control plane announced for this
//!   box required (see [`crate::imports`]); refused with 409 for a box this
//!   runner has, 400 `import_token_required`, 403 `import_not_announced`,
//!   `import_token_invalid`, `import_token_expired` or `import_token_used`,
//!   before anything is written.
//!
//! Everything else needs `Authorization: Bearer <api_key>`, the key the
//! control plane handed out in its last healthcheck answer. Errors are
//! [`protocol::ApiError`] bodies.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Path, Request, State, WebSocketUpgrade};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use protocol::{
    ApiError, ExecRequest, HealthStatus, IMPORT_TOKEN_HEADER, RunnerHealth, RunnerLiveness,
};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::agent::Agent;
use crate::boxes::BoxError;
use crate::imports::ImportRefused;

/// Header carrying an archive's SHA-256.
pub const SHA256_HEADER: &str = "x-boxlite-sha256";

/// `GET /api/health` body: the protocol type plus runner-local details
/// (extra keys are ignored by readers of [`RunnerHealth`]).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HealthBody {
    /// The protocol's fields.
    #[serde(flatten)]
    pub health: RunnerHealth,
    /// SHA-256 of the running binary, once known.
    #[serde(default)]
    pub binary_sha256: Option<String>,
    /// Pid of the agent.
    #[serde(default)]
    pub pid: u32,
}

/// An API error response.
pub struct Failure(StatusCode, ApiError);

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        (self.0, Json(self.1)).into_response()
    }
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Failure {
        if let Some(b) = e.downcast_ref::<BoxError>() {
            let status = match b.code {
                "not_found" => StatusCode::NOT_FOUND,
                "conflict" => StatusCode::CONFLICT,
                "bad_request" | "checksum_mismatch" => StatusCode::BAD_REQUEST,
                "unavailable" => StatusCode::SERVICE_UNAVAILABLE,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            };
            return Failure(status, ApiError::new(b.code, b.message.clone()));
        }
        tracing::warn!("request failed: {e:#}");
        Failure(
            StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::new("internal", format!("{e:#}")),
        )
    }
}

fn fail(status: StatusCode, code: &str, msg: impl Into<String>) -> Failure {
    Failure(status, ApiError::new(code, msg))
}

fn refused(e: &ImportRefused) -> Failure {
    let status = match e {
        ImportRefused::TokenRequired => StatusCode::BAD_REQUEST,
        _ => StatusCode::FORBIDDEN,
    };
    fail(status, e.code(), e.to_string())
}

/// The router.
pub fn router(agent: Arc<Agent>) -> axum::Router {
    let boxes = axum::Router::new()
        .route("/api/boxes/{id}/exec", post(exec))
        .route("/api/boxes/{id}/exec/ws", get(exec_ws))
        .route("/api/boxes/{id}/export", get(export))
        .route("/api/boxes/{id}/import", post(import))
        .route("/api/sync", post(sync))
        .layer(middleware::from_fn_with_state(agent.clone(), auth))
        .layer(DefaultBodyLimit::max(32 << 20));
    axum::Router::new()
        .route("/api/health", get(health))
        .merge(boxes)
        .fallback(|| async { fail(StatusCode::NOT_FOUND, "not_found", "no such endpoint") })
        .with_state(agent)
}

/// The bearer key presented, if any.
fn presented_key(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

/// True when `headers` carry this runner's current bearer key.
fn authenticated(agent: &Agent, headers: &HeaderMap) -> bool {
    match (agent.api_key(), presented_key(headers)) {
        (Some(k), Some(p)) => crate::sys::ct_eq(k.as_bytes(), p.as_bytes()),
        _ => false,
    }
}

async fn auth(State(agent): State<Arc<Agent>>, req: Request, next: Next) -> Response {
    // A new agent process gets a new key at its first check-in: never judge a
    // request against the previous process's key while that is under way.
    agent
        .wait_first_check(crate::health::FIRST_CHECK_WAIT)
        .await;
    let presented = presented_key(req.headers()).map(str::to_string);
    let key = agent.api_key();
    match (key, presented) {
        (None, _) => fail(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_registered",
            "this runner has no API key yet (no successful healthcheck)",
        )
        .into_response(),
        (Some(k), Some(p)) if crate::sys::ct_eq(k.as_bytes(), p.as_bytes()) => next.run(req).await,
        _ => fail(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or wrong bearer key",
        )
        .into_response(),
    }
}

/// `POST /api/sync`: the control plane has work for this runner; check in now
/// instead of at the next interval.
async fn sync(State(agent): State<Arc<Agent>>) -> StatusCode {
    agent.wake_healthcheck();
    StatusCode::ACCEPTED
}

async fn health(State(agent): State<Arc<Agent>>, headers: HeaderMap) -> Response {
    let healthy = agent.healthy();
    let code = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let status = if healthy {
        HealthStatus::Ok
    } else {
        HealthStatus::Degraded
    };
    if !authenticated(&agent, &headers) {
        return (code, Json(RunnerLiveness { status })).into_response();
    }
    let body = HealthBody {
        health: RunnerHealth {
            status,
            name: agent.config.name.clone(),
            version: crate::VERSION.to_string(),
            uptime_secs: agent.started.elapsed().as_secs(),
            boxes_running: agent.boxes.running(),
            boxes_adopted: agent.boxes.adopted(),
        },
        binary_sha256: agent.binary_sha256(),
        pid: std::process::id(),
    };
    (code, Json(body)).into_response()
}

fn box_id(raw: &str) -> Result<Uuid, Failure> {
    raw.parse().map_err(|_| {
        fail(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "box id is not a UUID",
        )
    })
}

async fn exec(
    State(agent): State<Arc<Agent>>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, Failure> {
    let id = box_id(&id)?;
    let req: ExecRequest = serde_json::from_slice(&body).map_err(|e| {
        fail(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("malformed ExecRequest: {e}"),
        )
    })?;
    let sock = agent.boxes.shim_socket(&id)?;
    let outcome = crate::exec::exec_once(&sock, req, &agent.exec_capture).await?;
    Ok(outcome.into_response())
}

async fn exec_ws(
    State(agent): State<Arc<Agent>>,
    Path(id): Path<String>,
    ws: WebSocketUpgrade,
) -> Result<Response, Failure> {
    let id = box_id(&id)?;
    let sock = agent.boxes.shim_socket(&id)?;
    Ok(ws
        .max_message_size(protocol::MAX_WS_MESSAGE_BYTES)
        .on_upgrade(move |socket| crate::exec::serve_ws(socket, sock)))
}

async fn export(
    State(agent): State<Arc<Agent>>,
    Path(id): Path<String>,
) -> Result<Response, Failure> {
    let id = box_id(&id)?;
    let ex = crate::export::export(&agent.boxes, &id).await?;
    let f = tokio::fs::File::open(&ex.path)
        .await
        .map_err(anyhow::Error::from)?;
    let size = ex.size;
    let sha = ex.sha256.clone();
    // The temporary file is removed when the body is done with it (the open
    // descriptor keeps the content readable after the unlink).
    drop(ex);
    let stream = tokio_util::io::ReaderStream::new(f);
    let mut resp = Response::new(Body::from_stream(stream));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/gzip"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
    h.insert(
        SHA256_HEADER,
        HeaderValue::from_str(&sha).map_err(anyhow::Error::from)?,
    );
    Ok(resp)
}

async fn import(
    State(agent): State<Arc<Agent>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Failure> {
    let id = box_id(&id)?;
    let sha = headers
        .get(SHA256_HEADER)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| {
            fail(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("the {SHA256_HEADER} header is required"),
            )
        })?
        .to_string();
    // Cheap refusals first, so a malformed request does not spend the token.
    if !crate::sys::is_sha256_hex(sha.trim()) {
        return Err(fail(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("{SHA256_HEADER} must be 64 hex digits"),
        ));
    }
    if agent.boxes.exists(&id) {
        return Err(fail(
            StatusCode::CONFLICT,
            "conflict",
            format!("box {id} already exists on this runner; delete it first"),
        ));
    }
    // Only an import the control plane announced (issue 12): the token it
    // issued, for this box, once, before it expires.
    let token = headers
        .get(IMPORT_TOKEN_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| refused(&ImportRefused::TokenRequired))?;
    agent
        .imports
        .claim_fresh(
            id,
            token,
            || agent.wake_healthcheck(),
            crate::imports::ANNOUNCE_WAIT,
        )
        .await
        .map_err(|e| {
            tracing::warn!(r#box = %id, code = e.code(), "import refused: {e}");
            refused(&e)
        })?;
    let stream = body.into_data_stream();
    let report = crate::export::import(&agent.boxes, &id, &sha, stream).await?;
    agent.wake_healthcheck();
    Ok((StatusCode::CREATED, Json(report)).into_response())
}
