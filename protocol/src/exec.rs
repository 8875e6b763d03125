//! Running processes in a box: one-shot over HTTP, interactive over WebSocket.
//!
//! WebSocket protocol (`GET .../exec/ws`), the same on the control plane and
//! on the runner:
//! 1. the client's first message is a text frame holding [`ExecStart`];
//! 2. the server answers with a text frame [`ExecEvent::Started`];
//! 3. then the client sends stdin as binary frames and [`ExecControl`] as text
//!    frames; the server sends output as binary frames whose first byte is the
//!    stream ([`STDOUT`] or [`STDERR`]) followed by the bytes, and ends with
//!    [`ExecEvent::Exit`] (or [`ExecEvent::Error`]) before closing.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Stream tag of output frames: standard output.
pub const STDOUT: u8 = 1;
/// Stream tag of output frames: standard error.
pub const STDERR: u8 = 2;

/// `POST /api/boxes/{id}/exec` body.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    /// Program and arguments (not through a shell).
    pub command: Vec<String>,
    /// Extra environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory inside the box; `$HOME` when absent.
    #[serde(default)]
    pub cwd: Option<String>,
    /// Kill the process after this many seconds.
    #[serde(default)]
    pub timeout_secs: Option<u64>,
    /// Bytes fed to stdin, then EOF.
    #[serde(default)]
    pub stdin: Option<String>,
}

/// `POST /api/boxes/{id}/exec` answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecResponse {
    /// Exit code; 128 + signal number when killed by a signal.
    pub exit_code: i32,
    /// Standard output (lossy UTF-8).
    pub stdout: String,
    /// Standard error (lossy UTF-8).
    pub stderr: String,
    /// True when the timeout killed it.
    #[serde(default)]
    pub timed_out: bool,
}

/// First client message of an interactive session.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecStart {
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
    /// Terminal rows (with `tty`).
    #[serde(default)]
    pub rows: Option<u16>,
    /// Terminal columns (with `tty`).
    #[serde(default)]
    pub cols: Option<u16>,
    /// Re-attach to a running session by id instead of starting a process.
    #[serde(default)]
    pub attach: Option<String>,
}

/// Client control messages after the start.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ExecControl {
    /// The terminal changed size.
    Resize {
        /// Rows.
        rows: u16,
        /// Columns.
        cols: u16,
    },
    /// Deliver a signal (`INT`, `TERM`, `KILL`, `HUP`, `QUIT`, `USR1`, `USR2`).
    Signal {
        /// Signal name without `SIG`.
        signal: String,
    },
    /// No more stdin.
    StdinEof,
}

/// Server messages.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ExecEvent {
    /// The process started; `session` can be used to attach again.
    Started {
        /// Session id.
        session: String,
    },
    /// The process ended.
    Exit {
        /// Exit code; 128 + signal when killed.
        code: i32,
    },
    /// The session failed.
    Error {
        /// What went wrong.
        message: String,
    },
}
