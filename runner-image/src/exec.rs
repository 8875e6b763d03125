//! Exec in a running box: one-shot over HTTP, interactive over WebSocket.
//!
//! Both talk to the box's shim (see [`crate::ipc`]). A one-shot exec is not
//! detachable: if the caller goes away or the timeout passes, its process
//! group is killed. A WebSocket session is detachable: when the socket drops,
//! the process keeps running in the shim, its output is buffered, and
//! `ExecStart { attach: Some(session) }` streams it again — also after the
//! agent itself was restarted.

use std::path::Path;
use std::time::Duration;

use anyhow::{Result, anyhow, bail};
use axum::extract::ws::{Message, Utf8Bytes, WebSocket};
use futures::StreamExt;
use protocol::{ExecControl, ExecEvent, ExecRequest, ExecResponse, ExecStart};

use crate::boxes::BoxError;
use crate::ipc::{self, ExecSpec, Frame, ShimMessage, ShimRequest, StreamControl};

/// Most output kept per stream of a one-shot exec; the rest is read and dropped.
pub const MAX_CAPTURE: usize = 16 << 20;
/// Longest timeout a one-shot exec may ask for.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// Ping interval on exec WebSockets (keeps load balancers from closing idle sockets).
pub const PING_INTERVAL: Duration = Duration::from_secs(30);

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

/// Run a command to completion (`POST /api/boxes/{id}/exec`).
pub async fn exec_once(sock: &Path, req: ExecRequest) -> Result<ExecResponse> {
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
    let mut out = Vec::new();
    let mut err = Vec::new();
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
            Some(Frame::Data(ipc::STDOUT, d)) => {
                if out.len() < MAX_CAPTURE {
                    out.extend_from_slice(&d[..d.len().min(MAX_CAPTURE - out.len())]);
                }
            }
            Some(Frame::Data(ipc::STDERR, d)) => {
                if err.len() < MAX_CAPTURE {
                    err.extend_from_slice(&d[..d.len().min(MAX_CAPTURE - err.len())]);
                }
            }
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
    Ok(ExecResponse {
        exit_code: code,
        stdout: String::from_utf8_lossy(&out).into_owned(),
        stderr: String::from_utf8_lossy(&err).into_owned(),
        timed_out,
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

    #[test]
    fn signal_names() {
        assert_eq!(signal_number("INT"), Some(libc::SIGINT));
        assert_eq!(signal_number("SIGTERM"), Some(libc::SIGTERM));
        assert_eq!(signal_number("USR2"), Some(libc::SIGUSR2));
        assert_eq!(signal_number("BOGUS"), None);
    }
}
