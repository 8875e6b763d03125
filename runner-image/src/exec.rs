//! Exec in a running box: one-shot over HTTP, interactive over WebSocket.
//!
//! Both talk to the box's shim (see [`crate::ipc`]). A one-shot exec is not
//! detachable: if the caller goes away or the timeout passes, its process
//! group is killed. A WebSocket session is detachable: when the socket drops,
//! the process keeps running in the shim, its output is buffered, and
//! `ExecStart { attach: Some(session) }` streams it again — also after the
//! agent itself was restarted.
//!
//! A one-shot exec keeps at most [`ExecLimits::max_output_bytes`] of each
//! output stream (less when the request asks), and all one-shot execs of the
//! runner together hold at most [`ExecLimits::output_budget_bytes`] of output
//! until their answers are sent. Output past either limit is read and
//! dropped: the process is never blocked on a full pipe, it runs to its end
//! (or its timeout) and the answer says `*_truncated`. A stream that lost
//! bytes keeps nothing after them, so what is kept is always exactly the
//! first bytes the process wrote.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, anyhow, bail};
use axum::body::Body;
use axum::extract::ws::{Message, Utf8Bytes, WebSocket};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use protocol::{CapturedOutput, ExecControl, ExecEvent, ExecRequest, ExecResponse, ExecStart};
use serde::Deserialize;
use tokio::sync::Semaphore;

use crate::boxes::BoxError;
use crate::ipc::{self, ExecSpec, Frame, ShimMessage, ShimRequest, StreamControl};

/// Longest timeout a one-shot exec may ask for.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// Ping interval on exec WebSockets (keeps load balancers from closing idle sockets).
pub const PING_INTERVAL: Duration = Duration::from_secs(30);
/// Default of [`ExecLimits::output_budget_bytes`].
pub const DEFAULT_OUTPUT_BUDGET_BYTES: u64 = 128 << 20;
/// Largest [`ExecLimits::max_output_bytes`] accepted.
pub const MAX_OUTPUT_BYTES_LIMIT: u64 = 256 << 20;

/// Output limits of one-shot execs: the `[exec]` table of `runner.toml`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ExecLimits {
    /// Bytes of each of stdout and stderr one exec keeps.
    pub max_output_bytes: u64,
    /// Bytes of output all one-shot execs of this runner hold at once.
    pub output_budget_bytes: u64,
}

impl Default for ExecLimits {
    fn default() -> Self {
        ExecLimits {
            max_output_bytes: protocol::DEFAULT_MAX_OUTPUT_BYTES,
            output_budget_bytes: DEFAULT_OUTPUT_BUDGET_BYTES,
        }
    }
}

impl ExecLimits {
    /// The limits, when they make sense.
    pub fn checked(self) -> Result<Self> {
        if self.max_output_bytes == 0 || self.max_output_bytes > MAX_OUTPUT_BYTES_LIMIT {
            bail!("`exec.max_output_bytes` must be 1 to {MAX_OUTPUT_BYTES_LIMIT}");
        }
        if self.output_budget_bytes < self.max_output_bytes
            || self.output_budget_bytes > Semaphore::MAX_PERMITS as u64
        {
            bail!(
                "`exec.output_budget_bytes` must be between `exec.max_output_bytes` and {}",
                Semaphore::MAX_PERMITS
            );
        }
        Ok(self)
    }
}

/// What one-shot execs may keep: the per-stream limit and the runner-wide
/// budget (a semaphore of bytes shared by every one-shot exec).
#[derive(Clone, Debug)]
pub struct Capture {
    max_output_bytes: usize,
    budget: Arc<Semaphore>,
}

impl Capture {
    /// A fresh budget for `limits`.
    pub fn new(limits: ExecLimits) -> Capture {
        Capture {
            max_output_bytes: usize::try_from(limits.max_output_bytes).unwrap_or(usize::MAX),
            budget: Arc::new(Semaphore::new(
                usize::try_from(limits.output_budget_bytes)
                    .unwrap_or(Semaphore::MAX_PERMITS)
                    .min(Semaphore::MAX_PERMITS),
            )),
        }
    }

    /// Bytes of the budget not held by any exec now.
    pub fn available(&self) -> usize {
        self.budget.available_permits()
    }
}

/// Bytes of the budget one exec holds; given back when dropped (after its
/// answer was sent, or when it failed).
#[derive(Debug)]
struct Held {
    budget: Arc<Semaphore>,
    bytes: usize,
}

impl Held {
    /// Take up to `want` bytes of the budget, without waiting; how many were granted.
    fn take(&mut self, want: usize) -> usize {
        let grant = want.min(self.budget.available_permits());
        let Ok(n) = u32::try_from(grant) else {
            return 0;
        };
        match self.budget.try_acquire_many(n) {
            Ok(p) => {
                p.forget();
                self.bytes += grant;
                grant
            }
            Err(_) => 0,
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.budget.add_permits(self.bytes);
    }
}

/// One stream of a one-shot exec as it is captured.
#[derive(Debug, Default)]
struct Sink {
    kept: CapturedOutput,
    limit: usize,
}

impl Sink {
    /// Keep what fits of `data`; once anything was dropped, keep nothing more.
    /// True when the runner-wide budget (not this stream's limit) ran out.
    fn push(&mut self, data: &[u8], held: &mut Held) -> bool {
        if self.kept.truncated {
            return false;
        }
        let room = self.limit - self.kept.bytes.len();
        let want = data.len().min(room);
        let granted = if want == 0 { 0 } else { held.take(want) };
        self.kept.bytes.extend_from_slice(&data[..granted]);
        if granted < data.len() {
            self.kept.truncated = true;
        }
        granted < want
    }
}

/// A finished one-shot exec: its answer and the budget its output holds
/// until the answer has been sent.
#[derive(Debug)]
pub struct ExecOutcome {
    /// The answer.
    pub response: ExecResponse,
    held: Held,
}

impl IntoResponse for ExecOutcome {
    fn into_response(self) -> Response {
        let json = match serde_json::to_vec(&self.response) {
            Ok(j) => j,
            Err(e) => {
                return crate::api::Failure::from(anyhow!("encoding the exec answer: {e}"))
                    .into_response();
            }
        };
        drop(self.response);
        // The body owns the budget: it is given back once hyper drops the body,
        // that is after the last byte was written (or the client went away).
        let held = self.held;
        let body =
            futures::stream::iter([Ok::<_, std::convert::Infallible>(bytes::Bytes::from(json))])
                .map(move |chunk| {
                    let _ = &held;
                    chunk
                });
        (
            [(header::CONTENT_TYPE, "application/json")],
            Body::from_stream(body),
        )
            .into_response()
    }
}

fn bad(m: impl Into<String>) -> anyhow::Error {
    BoxError::new("bad_request", m).into()
}

/// Signal number of a protocol signal name.
pub fn signal_number(name: &str) -> Option<i32> {
    Some(match name.trim_start_matches("SIG") {
        "INT" => libc::SIGINT,
        "TERM" => libc::SIGTERM,
        "KILL" => libc::SIGKILL,
        "HUP" => libc::SIGHUP,
        "QUIT" => libc::SIGQUIT,
        "USR1" => libc::SIGUSR1,
        "USR2" => libc::SIGUSR2,
        "WINCH" => libc::SIGWINCH,
        "CONT" => libc::SIGCONT,
        "STOP" => libc::SIGSTOP,
        "TSTP" => libc::SIGTSTP,
        _ => return None,
    })
}

fn check_env(env: &std::collections::BTreeMap<String, String>) -> Result<()> {
    for (k, v) in env {
        if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
            return Err(bad(format!("invalid environment variable {k:?}")));
        }
    }
    Ok(())
}

/// Run a command to completion (`POST /api/boxes/{id}/exec`), keeping what
/// `capture` allows of its output.
pub async fn exec_once(sock: &Path, req: ExecRequest, capture: &Capture) -> Result<ExecOutcome> {
    if req.command.is_empty() || req.command[0].is_empty() {
        return Err(bad("command must name a program"));
    }
    if req.command.iter().any(|a| a.contains('\0')) {
        return Err(bad("command contains a NUL byte"));
    }
    check_env(&req.env)?;
    let timeout = req
        .timeout_secs
        .map(Duration::from_secs)
        .unwrap_or(MAX_TIMEOUT)
        .min(MAX_TIMEOUT);
    let limit = req.max_output_bytes.map_or(capture.max_output_bytes, |m| {
        usize::try_from(m)
            .unwrap_or(usize::MAX)
            .min(capture.max_output_bytes)
    });
    let spec = ExecSpec {
        command: req.command,
        env: req.env,
        cwd: req.cwd,
        tty: false,
        rows: None,
        cols: None,
    };
    let (stream, _session, _pid) = ipc::open_stream(
        sock,
        &ShimRequest::Exec {
            spec,
            detachable: false,
        },
    )
    .await
    .map_err(|e| bad(format!("{e:#}")))?;
    let (mut rd, mut wr) = stream.into_split();
    // Stdin is written concurrently so a process that writes before it reads cannot deadlock us.
    let stdin = req.stdin.unwrap_or_default().into_bytes();
    let (ctl_tx, mut ctl_rx) = tokio::sync::mpsc::channel::<StreamControl>(4);
    let writer = tokio::spawn(async move {
        if !stdin.is_empty() {
            ipc::write_data(&mut wr, ipc::STDIN, &stdin).await?;
        }
        ipc::write_json(&mut wr, &StreamControl::StdinEof).await?;
        while let Some(c) = ctl_rx.recv().await {
            ipc::write_json(&mut wr, &c).await?;
        }
        anyhow::Ok(())
    });
    let mut held = Held {
        budget: capture.budget.clone(),
        bytes: 0,
    };
    let mut out = Sink {
        limit,
        ..Sink::default()
    };
    let mut err = Sink {
        limit,
        ..Sink::default()
    };
    let mut budget_ran_out = false;
    let mut timed_out = false;
    let deadline = tokio::time::Instant::now() + timeout;
    let code = loop {
        let frame = if timed_out {
            // After the kill, the exit comes promptly; do not wait forever.
            match tokio::time::timeout(Duration::from_secs(10), ipc::read_frame(&mut rd)).await {
                Ok(f) => f,
                Err(_) => break 137,
            }
        } else {
            match tokio::time::timeout_at(deadline, ipc::read_frame(&mut rd)).await {
                Ok(f) => f,
                Err(_) => {
                    timed_out = true;
                    let _ = ctl_tx
                        .send(StreamControl::Signal {
                            signal: libc::SIGKILL,
                        })
                        .await;
                    continue;
                }
            }
        };
        match frame? {
            Some(Frame::Data(ipc::STDOUT, d)) => budget_ran_out |= out.push(&d, &mut held),
            Some(Frame::Data(ipc::STDERR, d)) => budget_ran_out |= err.push(&d, &mut held),
            Some(Frame::Data(..)) => {}
            Some(Frame::Json(j)) => match ipc::parse::<ShimMessage>(&j)? {
                ShimMessage::Exit { code } => break code,
                ShimMessage::Error { message } => bail!("exec failed: {message}"),
                _ => {}
            },
            None => bail!("the box's shim closed the session (did the box stop?)"),
        }
    };
    drop(ctl_tx);
    writer.abort();
    if budget_ran_out {
        tracing::warn!(
            held = held.bytes,
            available = capture.available(),
            "the runner's exec output budget ran out: output of a one-shot exec was dropped"
        );
    }
    Ok(ExecOutcome {
        response: ExecResponse::from_output(code, out.kept, err.kept, timed_out),
        held,
    })
}

async fn send_event(ws: &mut WebSocket, ev: &ExecEvent) -> Result<()> {
    let text = serde_json::to_string(ev)?;
    ws.send(Message::Text(Utf8Bytes::from(text)))
        .await
        .map_err(|e| anyhow!("websocket: {e}"))
}

/// Serve one exec WebSocket (`GET /api/boxes/{id}/exec/ws`) against the box's shim at `sock`.
pub async fn serve_ws(mut ws: WebSocket, sock: std::path::PathBuf) {
    if let Err(e) = serve_ws_inner(&mut ws, &sock).await {
        let _ = send_event(
            &mut ws,
            &ExecEvent::Error {
                message: format!("{e:#}"),
            },
        )
        .await;
    }
    let _ = ws.send(Message::Close(None)).await;
    // Finish the closing handshake: read until the peer's Close (or 2 s).
    // Closing a socket with unread input resets the connection, and a reset
    // can destroy the frames just sent, the exit code among them.
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while let Some(Ok(m)) = ws.next().await {
            if matches!(m, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
}

async fn serve_ws_inner(ws: &mut WebSocket, sock: &Path) -> Result<()> {
    // 1. The client's ExecStart.
    let first = tokio::time::timeout(Duration::from_secs(30), ws.next())
        .await
        .map_err(|_| anyhow!("no ExecStart within 30 s"))?;
    let start: ExecStart = match first {
        Some(Ok(Message::Text(t))) => {
            serde_json::from_str(t.as_str()).map_err(|e| anyhow!("malformed ExecStart: {e}"))?
        }
        _ => bail!("the first message must be a text frame holding ExecStart"),
    };
    let req = match &start.attach {
        Some(session) => {
            if session.is_empty() || session.len() > 64 {
                bail!("malformed session id");
            }
            ShimRequest::Attach {
                session: session.clone(),
            }
        }
        None => {
            if start.command.iter().any(|a| a.contains('\0')) {
                bail!("command contains a NUL byte");
            }
            check_env(&start.env)?;
            ShimRequest::Exec {
                spec: ExecSpec {
                    command: start.command.clone(),
                    env: start.env.clone(),
                    cwd: start.cwd.clone(),
                    tty: start.tty,
                    rows: start.rows,
                    cols: start.cols,
                },
                detachable: true,
            }
        }
    };
    let (stream, session, _pid) = ipc::open_stream(sock, &req).await?;
    send_event(ws, &ExecEvent::Started { session }).await?;
    let (mut rd, mut wr) = stream.into_split();
    // Shim → client, on its own task so a slow client never blocks input.
    let (out_tx, mut out_rx) = tokio::sync::mpsc::channel::<Result<Frame>>(64);
    let reader = tokio::spawn(async move {
        loop {
            let f = ipc::read_frame(&mut rd).await;
            let end = !matches!(f, Ok(Some(_)));
            let item = match f {
                Ok(Some(fr)) => Ok(fr),
                Ok(None) => Err(anyhow!("the session's shim went away (did the box stop?)")),
                Err(e) => Err(e),
            };
            if out_tx.send(item).await.is_err() || end {
                break;
            }
        }
    });
    let mut ping = tokio::time::interval(PING_INTERVAL);
    ping.tick().await;
    // Input to a process that already exited cannot be written (its session
    // is closed), but its exit code is still on the way: a failed write only
    // closes the input side, and the output is drained to the end.
    let mut input_open = true;
    let result = loop {
        tokio::select! {
            m = ws.next() => match m {
                Some(Ok(Message::Binary(b))) => {
                    if input_open && ipc::write_data(&mut wr, ipc::STDIN, &b).await.is_err() {
                        input_open = false;
                    }
                }
                Some(Ok(Message::Text(t))) => {
                    let ctl: ExecControl = match serde_json::from_str(t.as_str()) {
                        Ok(c) => c,
                        Err(e) => break Err(anyhow!("malformed control message: {e}")),
                    };
                    let msg = match ctl {
                        ExecControl::Resize { rows, cols } => StreamControl::Resize { rows, cols },
                        ExecControl::StdinEof => StreamControl::StdinEof,
                        ExecControl::Signal { signal } => match signal_number(&signal) {
                            Some(n) => StreamControl::Signal { signal: n },
                            None => break Err(anyhow!("unknown signal {signal:?}")),
                        },
                    };
                    if input_open && ipc::write_json(&mut wr, &msg).await.is_err() {
                        input_open = false;
                    }
                }
                Some(Ok(Message::Ping(_))) | Some(Ok(Message::Pong(_))) => {}
                // The client left: the session stays in the shim for a later attach.
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break Ok(false),
            },
            f = out_rx.recv() => match f {
                Some(Ok(Frame::Data(kind, data))) if kind == ipc::STDOUT || kind == ipc::STDERR => {
                    let mut b = Vec::with_capacity(data.len() + 1);
                    b.push(kind);
                    b.extend_from_slice(&data);
                    if ws.send(Message::Binary(b.into())).await.is_err() {
                        break Ok(false);
                    }
                }
                Some(Ok(Frame::Data(..))) => {}
                Some(Ok(Frame::Json(j))) => match ipc::parse::<ShimMessage>(&j) {
                    Ok(ShimMessage::Exit { code }) => {
                        let _ = send_event(ws, &ExecEvent::Exit { code }).await;
                        break Ok(true);
                    }
                    Ok(ShimMessage::Error { message }) => break Err(anyhow!(message)),
                    _ => {}
                },
                Some(Err(e)) => break Err(e),
                None => break Err(anyhow!("the session's shim went away")),
            },
            _ = ping.tick() => {
                if ws.send(Message::Ping(Vec::new().into())).await.is_err() {
                    break Ok(false);
                }
            }
        }
    };
    reader.abort();
    result.map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn capture(max: u64, budget: u64) -> Capture {
        Capture::new(
            ExecLimits {
                max_output_bytes: max,
                output_budget_bytes: budget,
            }
            .checked()
            .unwrap(),
        )
    }

    #[test]
    fn a_stream_keeps_an_exact_prefix_within_its_limit() {
        let c = capture(10, 100);
        let mut held = Held {
            budget: c.budget.clone(),
            bytes: 0,
        };
        let mut s = Sink {
            limit: 10,
            ..Sink::default()
        };
        assert!(!s.push(b"0123", &mut held));
        assert!(!s.kept.truncated);
        assert!(!s.push(b"456789", &mut held));
        assert!(!s.kept.truncated, "exactly the limit is not truncated");
        assert!(!s.push(b"x", &mut held));
        assert!(s.kept.truncated);
        assert_eq!(s.kept.bytes, b"0123456789");
        assert_eq!(c.available(), 90);
        drop(held);
        assert_eq!(c.available(), 100, "the budget comes back");
    }

    #[test]
    fn the_budget_is_shared_and_a_starved_stream_keeps_nothing_after_a_gap() {
        let c = capture(10, 15);
        let mut a = Held {
            budget: c.budget.clone(),
            bytes: 0,
        };
        let mut b = Held {
            budget: c.budget.clone(),
            bytes: 0,
        };
        let (mut sa, mut sb) = (
            Sink {
                limit: 10,
                ..Sink::default()
            },
            Sink {
                limit: 10,
                ..Sink::default()
            },
        );
        assert!(!sa.push(b"aaaaaaaaaa", &mut a));
        assert!(sb.push(b"bbbbbbbb", &mut b), "the budget ran out");
        assert_eq!(sb.kept.bytes, b"bbbbb");
        assert!(sb.kept.truncated);
        drop(a);
        // Budget is free again, but b lost bytes: it keeps nothing after the gap.
        assert!(!sb.push(b"more", &mut b));
        assert_eq!(sb.kept.bytes, b"bbbbb");
        assert_eq!(c.available(), 10);
    }

    #[test]
    fn limits_are_checked() {
        assert!(ExecLimits::default().checked().is_ok());
        for (max, budget) in [(0, 10), (10, 5), (MAX_OUTPUT_BYTES_LIMIT + 1, u64::MAX)] {
            let l = ExecLimits {
                max_output_bytes: max,
                output_budget_bytes: budget,
            };
            assert!(l.checked().is_err(), "{l:?}");
        }
    }

    #[test]
    fn signal_names() {
        assert_eq!(signal_number("INT"), Some(libc::SIGINT));
        assert_eq!(signal_number("SIGTERM"), Some(libc::SIGTERM));
        assert_eq!(signal_number("USR2"), Some(libc::SIGUSR2));
        assert_eq!(signal_number("BOGUS"), None);
    }
}
