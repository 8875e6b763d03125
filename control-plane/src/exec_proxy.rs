//! Exec, proxied to the box's runner: one-shot over HTTP, interactive over a
//! WebSocket relayed frame by frame. The control plane authenticates to the
//! runner with that runner's API key.
//!
//! What a one-shot exec may cost the control plane is bounded: it holds one
//! of its organization's exec slots ([`crate::exec_slots`]) while it runs,
//! asks the runner for at most `exec_max_output_bytes` per stream, and reads
//! the runner's answer only up to [`ExecResponse::max_json_len`] of that, so
//! an organization's execs hold at most `exec_max_concurrent_per_org` such
//! answers at once. No database connection is held while the runner works:
//! the box and runner lookups and the slot are short statements before and
//! after. A session relayed over WebSocket buffers at most one message
//! ([`protocol::MAX_WS_MESSAGE_BYTES`]) per direction.

use std::time::Duration;

use axum::extract::ws::{self, WebSocket};
use axum::http::StatusCode;
use futures::{SinkExt, StreamExt};
use protocol::{ApiError, BoxState, ExecRequest, ExecResponse};
use sqlx::Row;
use tokio_tungstenite::tungstenite::Message as TMessage;
use tokio_tungstenite::tungstenite::protocol::{
    CloseFrame as TCloseFrame, frame::coding::CloseCode,
};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::auth::Member;
use crate::boxes::parse_state;
use crate::config::Secret;
use crate::error::{Error, Result};
use crate::exec_slots;
use crate::state::AppState;

/// Pings on both legs of a relayed session this often (load balancers drop idle sockets).
pub const WS_PING_EVERY: Duration = Duration::from_secs(25);
/// Longest `timeout_secs` an exec may ask for.
pub const MAX_EXEC_TIMEOUT_SECS: u64 = 24 * 3600;
/// Exec timeout when the request names none.
pub const DEFAULT_EXEC_TIMEOUT_SECS: u64 = 3600;
/// Most bytes of a runner's error body read.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// Where a box's runner API is, and the key to call it with.
#[derive(Clone, Debug)]
pub struct RunnerEndpoint {
    /// Runner name.
    pub name: String,
    /// Base URL (no trailing slash).
    pub address: String,
    /// Bearer key.
    pub api_key: Secret,
}

impl RunnerEndpoint {
    /// `address` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.address)
    }
}

/// The runner endpoint of runner `runner_id`, if it is responsive.
pub async fn endpoint(state: &AppState, runner_id: &str) -> Result<RunnerEndpoint> {
    let row = sqlx::query(
        "SELECT name, address, api_key, last_seen_at, decommissioned_at FROM runners WHERE id = $1",
    )
    .bind(runner_id)
    .fetch_optional(state.db.pool())
    .await?
    .ok_or_else(|| Error::internal(anyhow::anyhow!("box pinned to missing runner {runner_id}")))?;
    let name: String = row.try_get("name")?;
    let address: Option<String> = row.try_get("address")?;
    let last_seen: Option<i64> = row.try_get("last_seen_at")?;
    let decommissioned: Option<i64> = row.try_get("decommissioned_at")?;
    let cutoff = state.responsive_cutoff(state.clock.now_ms());
    match (address, last_seen) {
        (Some(address), Some(seen)) if seen >= cutoff && decommissioned.is_none() => {
            Ok(RunnerEndpoint {
                name,
                address,
                api_key: Secret::new(row.try_get::<String, _>("api_key")?),
            })
        }
        _ => Err(Error::unavailable(
            "runner_unavailable",
            format!("runner {name} is not responding; retry later"),
        )),
    }
}

/// The runner of box `box_id` of `org_id`, when the box is running there.
pub async fn resolve(state: &AppState, org_id: Uuid, box_id: Uuid) -> Result<RunnerEndpoint> {
    let row =
        sqlx::query("SELECT state, runner_id FROM boxes WHERE id = $1 AND organization_id = $2")
            .bind(box_id.to_string())
            .bind(org_id.to_string())
            .fetch_optional(state.db.pool())
            .await?
            .ok_or_else(|| Error::not_found("box"))?;
    let st: String = row.try_get("state")?;
    if parse_state(&st) != Some(BoxState::Running) {
        return Err(Error::conflict(
            "box_not_running",
            format!("the box is {st}; exec needs a running box"),
        ));
    }
    let runner_id: String = row.try_get("runner_id")?;
    endpoint(state, &runner_id).await
}

/// Check an exec request.
pub fn validate(req: &ExecRequest) -> Result<()> {
    if req.command.is_empty() || req.command[0].is_empty() {
        return Err(Error::bad_request(
            "invalid_command",
            "command must name a program",
        ));
    }
    if req.command.len() > 4096 || req.command.iter().any(|a| a.contains('\0')) {
        return Err(Error::bad_request(
            "invalid_command",
            "command has more than 4096 arguments or a NUL byte",
        ));
    }
    if req
        .timeout_secs
        .is_some_and(|t| t == 0 || t > MAX_EXEC_TIMEOUT_SECS)
    {
        return Err(Error::bad_request(
            "invalid_timeout",
            format!("timeout_secs is between 1 and {MAX_EXEC_TIMEOUT_SECS}"),
        ));
    }
    if req.max_output_bytes == Some(0) {
        return Err(Error::bad_request(
            "invalid_max_output_bytes",
            "max_output_bytes is at least 1",
        ));
    }
    Ok(())
}

/// Turn a failed reqwest call into an error.
pub fn unreachable(runner: &str, e: reqwest::Error) -> Error {
    if e.is_timeout() {
        Error::new(
            StatusCode::GATEWAY_TIMEOUT,
            "runner_timeout",
            format!("runner {runner} did not answer in time"),
        )
    } else {
        Error::bad_gateway(
            "runner_unreachable",
            format!("cannot reach runner {runner}"),
        )
        .with_source(e)
    }
}

/// Turn a runner's non-success answer into an error: its 4xx pass through
/// (with its code when it sent one); its 5xx become 502 `runner_error`.
pub async fn runner_error(runner: &str, resp: reqwest::Response) -> Error {
    let status = resp.status();
    let mut body = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(Ok(chunk)) = stream.next().await {
        body.extend_from_slice(&chunk);
        if body.len() > MAX_ERROR_BODY {
            break;
        }
    }
    runner_error_text(runner, status, &String::from_utf8_lossy(&body))
}

/// The error to answer with for a runner's failure status and body.
pub fn runner_error_text(runner: &str, status: reqwest::StatusCode, body: &str) -> Error {
    let parsed: Option<ApiError> = serde_json::from_str(body).ok();
    let message = parsed
        .as_ref()
        .map(|e| e.message.clone())
        .unwrap_or_else(|| {
            body.chars()
                .take(500)
                .collect::<String>()
                .trim()
                .to_string()
        });
    if status.is_client_error() {
        let code = parsed
            .map(|e| e.code)
            .unwrap_or_else(|| "runner_rejected".to_string());
        let status = StatusCode::from_u16(status.as_u16()).unwrap_or(StatusCode::BAD_REQUEST);
        Error::new(status, code, format!("runner {runner}: {message}"))
    } else {
        Error::bad_gateway(
            "runner_error",
            format!("runner {runner} failed ({status}): {message}"),
        )
    }
}

/// `POST /api/boxes/{id}/exec` for `member`: check the request, find the
/// box's runner, take one of the organization's exec slots, run it there.
pub async fn run(
    state: &AppState,
    member: &Member,
    box_id: Uuid,
    req: &ExecRequest,
) -> Result<ExecResponse> {
    validate(req)?;
    let ep = resolve(state, member.organization_id, box_id).await?;
    let slot =
        exec_slots::acquire(state, member.organization_id, &member.organization_name).await?;
    let answer = exec(state, &ep, box_id, req).await;
    slot.release().await;
    answer
}

/// Run a command to completion on the box's runner.
pub async fn exec(
    state: &AppState,
    ep: &RunnerEndpoint,
    box_id: Uuid,
    req: &ExecRequest,
) -> Result<ExecResponse> {
    validate(req)?;
    let cap = state.config.exec_max_output_bytes;
    let asked = ExecRequest {
        max_output_bytes: Some(req.max_output_bytes.map_or(cap, |m| m.min(cap))),
        ..req.clone()
    };
    let limit = ExecResponse::max_json_len(asked.max_output_bytes.unwrap_or(cap));
    let wait = req.timeout_secs.unwrap_or(DEFAULT_EXEC_TIMEOUT_SECS) + 30;
    let resp = state
        .http
        .post(ep.url(&format!("/api/boxes/{box_id}/exec")))
        .bearer_auth(ep.api_key.expose())
        .json(&asked)
        .timeout(Duration::from_secs(wait))
        .send()
        .await
        .map_err(|e| unreachable(&ep.name, e))?;
    if !resp.status().is_success() {
        return Err(runner_error(&ep.name, resp).await);
    }
    let body = read_limited(&ep.name, resp, limit).await?;
    serde_json::from_slice::<ExecResponse>(&body).map_err(|e| {
        Error::bad_gateway(
            "runner_error",
            format!("runner {} sent a malformed exec answer", ep.name),
        )
        .with_source(e)
    })
}

/// The body of a runner's answer, refused (502 `runner_output_too_large`)
/// as soon as it is known to exceed `limit` bytes: never buffered beyond it.
async fn read_limited(runner: &str, resp: reqwest::Response, limit: u64) -> Result<Vec<u8>> {
    let too_large = || {
        Error::bad_gateway(
            "runner_output_too_large",
            format!(
                "runner {runner} answered with more than {limit} bytes of exec output \
                 (is it older than the control plane, ignoring max_output_bytes?)"
            ),
        )
    };
    let declared = resp.content_length();
    if declared.is_some_and(|n| n > limit) {
        return Err(too_large());
    }
    let mut body = Vec::with_capacity(declared.unwrap_or(0) as usize);
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| unreachable(runner, e))?;
        if (body.len() + chunk.len()) as u64 > limit {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The runner leg of an interactive session.
pub type RunnerSocket = protocol::ws::ClientSocket;

/// Open the runner's exec WebSocket for box `box_id` (before answering the
/// client's upgrade, so a failure is an ordinary HTTP error).
pub async fn connect_ws(
    state: &AppState,
    ep: &RunnerEndpoint,
    box_id: Uuid,
) -> Result<RunnerSocket> {
    let request = state
        .http
        .get(ep.url(&format!("/api/boxes/{box_id}/exec/ws")))
        .bearer_auth(ep.api_key.expose())
        .timeout(Duration::from_secs(30));
    match protocol::ws::upgrade(request).await {
        Ok(socket) => Ok(socket),
        Err(protocol::ws::UpgradeError::Http(e)) => Err(unreachable(&ep.name, e)),
        Err(protocol::ws::UpgradeError::Refused { status, .. }) if status.is_success() => {
            Err(Error::bad_gateway(
                "runner_error",
                format!("runner {} did not upgrade to WebSocket", ep.name),
            ))
        }
        Err(protocol::ws::UpgradeError::Refused { status, body }) => {
            Err(runner_error_text(&ep.name, status, &body))
        }
        Err(protocol::ws::UpgradeError::BadHandshake) => Err(Error::bad_gateway(
            "runner_error",
            format!(
                "runner {} answered the WebSocket handshake wrongly",
                ep.name
            ),
        )),
    }
}

fn to_runner(m: ws::Message) -> Option<TMessage> {
    Some(match m {
        ws::Message::Text(t) => TMessage::text(t.as_str()),
        ws::Message::Binary(b) => TMessage::Binary(b),
        ws::Message::Close(f) => TMessage::Close(f.map(|f| TCloseFrame {
            code: CloseCode::from(f.code),
            reason: f.reason.as_str().into(),
        })),
        ws::Message::Ping(_) | ws::Message::Pong(_) => return None, // answered per leg
    })
}

fn to_client(m: TMessage) -> Option<ws::Message> {
    Some(match m {
        TMessage::Text(t) => ws::Message::Text(t.as_str().into()),
        TMessage::Binary(b) => ws::Message::Binary(b),
        TMessage::Close(f) => ws::Message::Close(f.map(|f| ws::CloseFrame {
            code: u16::from(f.code),
            reason: f.reason.as_str().into(),
        })),
        TMessage::Ping(_) | TMessage::Pong(_) | TMessage::Frame(_) => return None,
    })
}

/// Relay frames both ways until either side closes or the control plane
/// shuts down (then both get close code 1001).
pub async fn relay(
    client: WebSocket,
    runner: RunnerSocket,
    shutdown: CancellationToken,
    box_id: Uuid,
) {
    let (mut c_tx, mut c_rx) = client.split();
    let (mut r_tx, mut r_rx) = runner.split();
    let mut ping = tokio::time::interval(WS_PING_EVERY);
    ping.tick().await;
    // The runner closes its side once the process exits; input the client
    // sent meanwhile cannot be delivered, but the exit code is still on its
    // way: a failed send only stops forwarding input, and the runner's
    // frames are drained until it closes.
    let mut runner_input_open = true;
    let reason = loop {
        tokio::select! {
            m = c_rx.next() => match m {
                Some(Ok(m)) => {
                    let closing = matches!(m, ws::Message::Close(_));
                    if runner_input_open
                        && let Some(t) = to_runner(m)
                        && r_tx.send(t).await.is_err()
                    {
                        runner_input_open = false;
                    }
                    if closing {
                        break "client closed";
                    }
                }
                _ => {
                    let _ = r_tx.send(TMessage::Close(None)).await;
                    break "client connection lost";
                }
            },
            m = r_rx.next() => match m {
                Some(Ok(m)) => {
                    let closing = matches!(m, TMessage::Close(_));
                    if let Some(c) = to_client(m)
                        && c_tx.send(c).await.is_err() {
                            break "client connection lost";
                        }
                    if closing {
                        break "runner closed";
                    }
                }
                other => {
                    if let Some(Err(e)) = &other {
                        tracing::warn!(r#box = %box_id, error = %e, "exec session: runner connection failed");
                    }
                    let _ = c_tx
                        .send(ws::Message::Close(Some(ws::CloseFrame {
                            code: 1011,
                            reason: "runner connection lost".into(),
                        })))
                        .await;
                    break "runner connection lost";
                }
            },
            _ = ping.tick() => {
                let _ = c_tx.send(ws::Message::Ping(Default::default())).await;
                if runner_input_open {
                    let _ = r_tx.send(TMessage::Ping(Default::default())).await;
                }
            }
            _ = shutdown.cancelled() => {
                let _ = c_tx
                    .send(ws::Message::Close(Some(ws::CloseFrame {
                        code: 1001,
                        reason: "control plane shutting down".into(),
                    })))
                    .await;
                let _ = r_tx
                    .send(TMessage::Close(Some(TCloseFrame {
                        code: CloseCode::Away,
                        reason: "control plane shutting down".into(),
                    })))
                    .await;
                break "shutdown";
            }
        }
    };
    // Close both sides and finish each closing handshake (read until the
    // peer's Close, at most 2 s): a socket closed with unread input is reset,
    // and a reset can destroy frames the peer has not read yet, such as the
    // exit code just forwarded.
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let _ = c_tx.close().await;
        let _ = r_tx.close().await;
        let client = async {
            while let Some(Ok(m)) = c_rx.next().await {
                if matches!(m, ws::Message::Close(_)) {
                    break;
                }
            }
        };
        let runner = async {
            while let Some(Ok(m)) = r_rx.next().await {
                if matches!(m, TMessage::Close(_)) {
                    break;
                }
            }
        };
        tokio::join!(client, runner);
    })
    .await;
    tracing::debug!(r#box = %box_id, reason, "exec session ended");
}
