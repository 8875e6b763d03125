//! The agent ↔ shim protocol, over the shim's unix socket `<box>/shim.sock`.
//!
//! Framing: `u32` big-endian length (of what follows), one kind byte, then
//! the payload. Kind [`JSON`] carries a JSON message; [`STDOUT`], [`STDERR`]
//! and [`STDIN`] carry raw bytes. Each connection begins with one
//! [`ShimRequest`]. `exec` and `attach` then turn the connection into a
//! stream: the shim sends output frames and finally [`ShimMessage::Exit`];
//! the agent sends stdin frames and [`StreamControl`] messages. Closing the
//! connection detaches (a detachable session keeps running and buffering
//! output until someone attaches again; a one-shot exec is killed).
//!
//! The protocol is versioned ([`PROTOCOL_VERSION`]) and only ever extended
//! additively, because shims started by an older agent outlive upgrades.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixStream;

/// Version of this protocol a shim speaks.
pub const PROTOCOL_VERSION: u32 = 1;
/// Frame kind: JSON message.
pub const JSON: u8 = 0;
/// Frame kind: standard output bytes (the API's stream tag).
pub const STDOUT: u8 = protocol::STDOUT;
/// Frame kind: standard error bytes (the API's stream tag).
pub const STDERR: u8 = protocol::STDERR;
/// Frame kind: standard input bytes.
pub const STDIN: u8 = 3;
/// Largest payload of one frame.
pub const MAX_FRAME: usize = 1 << 20;

/// What to run in a box.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecSpec {
    /// Program and arguments; the box's login shell when empty.
    #[serde(default)]
    pub command: Vec<String>,
    /// Extra environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory; `$HOME` when absent.
    #[serde(default)]
    pub cwd: Option<String>,
    /// Allocate a pseudo-terminal.
    #[serde(default)]
    pub tty: bool,
    /// Terminal rows.
    #[serde(default)]
    pub rows: Option<u16>,
    /// Terminal columns.
    #[serde(default)]
    pub cols: Option<u16>,
}

/// First message of every connection to a shim.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ShimRequest {
    /// Describe the box and its sessions.
    Hello,
    /// Start a process and stream it.
    Exec {
        /// What to run.
        spec: ExecSpec,
        /// Keep it running when the connection drops (interactive sessions).
        detachable: bool,
    },
    /// Stream an existing session again.
    Attach {
        /// Session id.
        session: String,
    },
    /// Stop the box: SIGTERM its processes, SIGKILL after the grace period; the shim then exits.
    Stop {
        /// Grace period, milliseconds.
        grace_ms: u64,
    },
}

/// One session as [`ShimInfo`] lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionInfo {
    /// Session id.
    pub id: String,
    /// Host pid of its process.
    pub pid: u32,
    /// Has a terminal.
    pub tty: bool,
    /// Exit code once it ended.
    pub exit_code: Option<i32>,
}

/// What a shim says about itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShimInfo {
    /// Protocol version.
    pub protocol: u32,
    /// Version of the binary the shim runs.
    pub version: String,
    /// Box id.
    pub box_id: uuid::Uuid,
    /// Shim pid.
    pub shim_pid: u32,
    /// Shim start time (clock ticks since boot).
    pub shim_start_time: u64,
    /// Host pid of bubblewrap's outer process.
    pub bwrap_pid: u32,
    /// Host pid of the box's PID 1.
    pub pid1: u32,
    /// Start time of PID 1 (clock ticks since boot; 0 from shims that predate it).
    #[serde(default)]
    pub pid1_start_time: u64,
    /// cgroup v2 subtree of the box when the shim resolved it (systemd scopes).
    #[serde(default)]
    pub cgroup_dir: Option<PathBuf>,
    /// Sessions.
    #[serde(default)]
    pub sessions: Vec<SessionInfo>,
}

/// Messages from the shim.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ShimMessage {
    /// Answer to `hello`.
    Info {
        /// The description.
        info: ShimInfo,
    },
    /// The session is streaming.
    Started {
        /// Session id.
        session: String,
        /// Host pid.
        pid: u32,
    },
    /// The session's process ended (all its output was sent before this).
    Exit {
        /// Exit code; 128 + signal when killed.
        code: i32,
    },
    /// Something failed.
    Error {
        /// What.
        message: String,
    },
    /// The box is stopped; the shim exits.
    Stopped,
}

/// Control messages from the agent while streaming.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "ctl", rename_all = "snake_case")]
pub enum StreamControl {
    /// Terminal size.
    Resize {
        /// Rows.
        rows: u16,
        /// Columns.
        cols: u16,
    },
    /// Deliver a signal to the session's process group (the terminal's
    /// foreground group with a TTY).
    Signal {
        /// Number.
        signal: i32,
    },
    /// No more input.
    StdinEof,
}

/// One frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// A JSON message (raw).
    Json(Vec<u8>),
    /// Bytes of a stream ([`STDOUT`], [`STDERR`], [`STDIN`]).
    Data(u8, Vec<u8>),
}

/// Read one frame; `Ok(None)` on a clean end of stream.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Frame>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len == 0 || len > MAX_FRAME + 1 {
        bail!("bad frame length {len}");
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).await.context("truncated frame")?;
    let kind = buf[0];
    buf.remove(0);
    Ok(Some(match kind {
        JSON => Frame::Json(buf),
        STDOUT | STDERR | STDIN => Frame::Data(kind, buf),
        k => bail!("unknown frame kind {k}"),
    }))
}

/// Write one data frame.
pub async fn write_data<W: AsyncWrite + Unpin>(w: &mut W, kind: u8, data: &[u8]) -> Result<()> {
    for chunk in data.chunks(MAX_FRAME) {
        let mut hdr = [0u8; 5];
        hdr[..4].copy_from_slice(&((chunk.len() + 1) as u32).to_be_bytes());
        hdr[4] = kind;
        w.write_all(&hdr).await?;
        w.write_all(chunk).await?;
    }
    Ok(())
}

/// Write one JSON message.
pub async fn write_json<W: AsyncWrite + Unpin, T: Serialize>(w: &mut W, msg: &T) -> Result<()> {
    let body = serde_json::to_vec(msg)?;
    if body.len() > MAX_FRAME {
        bail!("message too large");
    }
    let mut hdr = [0u8; 5];
    hdr[..4].copy_from_slice(&((body.len() + 1) as u32).to_be_bytes());
    hdr[4] = JSON;
    w.write_all(&hdr).await?;
    w.write_all(&body).await?;
    w.flush().await?;
    Ok(())
}

/// Parse a JSON frame as `T`.
pub fn parse<T: for<'de> Deserialize<'de>>(raw: &[u8]) -> Result<T> {
    serde_json::from_slice(raw).context("malformed message")
}

/// Connect to a shim's socket.
pub async fn connect(sock: &Path) -> Result<UnixStream> {
    let (_dir, addr) = crate::sys::socket_addr_path(sock)?;
    tokio::time::timeout(Duration::from_secs(2), UnixStream::connect(&addr))
        .await
        .map_err(|_| anyhow!("timed out connecting to {}", sock.display()))?
        .with_context(|| format!("connecting to {}", sock.display()))
}

/// Ask a shim to describe itself.
pub async fn hello(sock: &Path) -> Result<ShimInfo> {
    let mut s = connect(sock).await?;
    write_json(&mut s, &ShimRequest::Hello).await?;
    let f = tokio::time::timeout(Duration::from_secs(5), read_frame(&mut s))
        .await
        .map_err(|_| anyhow!("shim did not answer"))??;
    match f {
        Some(Frame::Json(j)) => match parse::<ShimMessage>(&j)? {
            ShimMessage::Info { info } => Ok(info),
            ShimMessage::Error { message } => bail!("shim: {message}"),
            m => bail!("unexpected shim answer {m:?}"),
        },
        _ => bail!("shim closed the connection"),
    }
}

/// Ask a shim to stop its box and wait for it to confirm.
pub async fn stop(sock: &Path, grace: Duration) -> Result<()> {
    let mut s = connect(sock).await?;
    write_json(
        &mut s,
        &ShimRequest::Stop {
            grace_ms: grace.as_millis() as u64,
        },
    )
    .await?;
    let f = tokio::time::timeout(grace + Duration::from_secs(10), read_frame(&mut s))
        .await
        .map_err(|_| anyhow!("shim did not confirm the stop"))??;
    match f {
        Some(Frame::Json(j)) => match parse::<ShimMessage>(&j)? {
            ShimMessage::Stopped => Ok(()),
            ShimMessage::Error { message } => bail!("shim: {message}"),
            m => bail!("unexpected shim answer {m:?}"),
        },
        // The shim exits right after stopping; a closed socket is fine too.
        None => Ok(()),
        _ => bail!("unexpected frame"),
    }
}

/// Open a stream: send `req` (exec or attach) and wait for `Started`.
pub async fn open_stream(sock: &Path, req: &ShimRequest) -> Result<(UnixStream, String, u32)> {
    let mut s = connect(sock).await?;
    write_json(&mut s, req).await?;
    let f = tokio::time::timeout(Duration::from_secs(10), read_frame(&mut s))
        .await
        .map_err(|_| anyhow!("shim did not start the process"))??;
    match f {
        Some(Frame::Json(j)) => match parse::<ShimMessage>(&j)? {
            ShimMessage::Started { session, pid } => Ok((s, session, pid)),
            ShimMessage::Error { message } => bail!("{message}"),
            m => bail!("unexpected shim answer {m:?}"),
        },
        _ => bail!("shim closed the connection"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip_and_bad_lengths_are_refused() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        write_json(&mut a, &ShimRequest::Hello).await.unwrap();
        write_data(&mut a, STDOUT, b"hello").await.unwrap();
        drop(a);
        match read_frame(&mut b).await.unwrap().unwrap() {
            Frame::Json(j) => assert_eq!(parse::<ShimRequest>(&j).unwrap(), ShimRequest::Hello),
            f => panic!("{f:?}"),
        }
        assert_eq!(
            read_frame(&mut b).await.unwrap().unwrap(),
            Frame::Data(STDOUT, b"hello".to_vec())
        );
        assert!(read_frame(&mut b).await.unwrap().is_none());

        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
        assert!(read_frame(&mut b).await.is_err());
    }
}
