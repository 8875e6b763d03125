//! Running processes in a box: one-shot over HTTP, interactive over WebSocket.
//!
//! WebSocket protocol (`GET .../exec/ws`), the same on the control plane and
//! on the runner:
//! 1. the client's first message is a text frame holding [`ExecStart`];
//! 2. the server answers with a text frame [`ExecEvent::Started`];
//! 3. then the client sends stdin as binary frames and [`ExecControl`] as text
//!    frames; the server sends output as binary frames whose first byte is the
//!    stream ([`STDOUT`] or [`STDERR`]) followed by the bytes, and ends with
//!    [`ExecEvent::Exit`] (or [`ExecEvent::Error`]) before closing. No
//!    message in either direction is larger than [`MAX_WS_MESSAGE_BYTES`].
//!
//! One-shot exec (`POST .../exec`) captures at most a bounded prefix of each
//! output stream (the server's limit, or [`ExecRequest::max_output_bytes`]
//! when smaller); the rest is read and dropped, and `*_truncated` says so.
//! Output is carried without loss or blow-up: a stream is sent as its text
//! when it is UTF-8 whose JSON form is at most [`TEXT_SLACK`] longer than
//! base64's, and as base64 otherwise ([`OutputEncoding`]); [`ExecResponse::stdout_bytes`] and
//! [`ExecResponse::stderr_bytes`] give back the exact bytes either way, and
//! [`ExecResponse::max_json_len`] bounds the size of the answer.

use std::collections::BTreeMap;

use base64::Engine;
use serde::{Deserialize, Serialize};

/// Stream tag of output frames: standard output.
pub const STDOUT: u8 = 1;
/// Stream tag of output frames: standard error.
pub const STDERR: u8 = 2;
/// Largest WebSocket message of an exec session, in either direction (output
/// frames carry at most 1 MiB plus the stream tag).
pub const MAX_WS_MESSAGE_BYTES: usize = 2 << 20;
/// Output a one-shot exec keeps per stream unless configured otherwise.
pub const DEFAULT_MAX_OUTPUT_BYTES: u64 = 1 << 20;

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
    /// Keep at most this many bytes of each of stdout and stderr; the
    /// server's own limit applies when absent or larger.
    #[serde(default)]
    pub max_output_bytes: Option<u64>,
}

/// How an output stream's bytes are carried in a JSON string.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputEncoding {
    /// The string is the bytes (they are UTF-8). The default, so answers of
    /// servers that predate the field read as before.
    #[default]
    Utf8,
    /// The string is the standard base64 (with padding) of the bytes.
    Base64,
}

/// `POST /api/boxes/{id}/exec` answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecResponse {
    /// Exit code; 128 + signal number when killed by a signal.
    pub exit_code: i32,
    /// Standard output, encoded as `stdout_encoding` says.
    pub stdout: String,
    /// How `stdout` is encoded.
    #[serde(default)]
    pub stdout_encoding: OutputEncoding,
    /// True when the process wrote more to stdout than was kept.
    #[serde(default)]
    pub stdout_truncated: bool,
    /// Standard error, encoded as `stderr_encoding` says.
    pub stderr: String,
    /// How `stderr` is encoded.
    #[serde(default)]
    pub stderr_encoding: OutputEncoding,
    /// True when the process wrote more to stderr than was kept.
    #[serde(default)]
    pub stderr_truncated: bool,
    /// True when the timeout killed it.
    #[serde(default)]
    pub timed_out: bool,
}

/// One output stream as captured: the bytes kept, and whether more were dropped.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CapturedOutput {
    /// The first bytes the process wrote, exactly.
    pub bytes: Vec<u8>,
    /// The process wrote more than `bytes`.
    pub truncated: bool,
}

/// An output string that does not decode as its encoding says.
#[derive(Debug, thiserror::Error)]
#[error("{stream} is marked base64 but is not valid base64: {source}")]
pub struct OutputDecodeError {
    /// `stdout` or `stderr`.
    pub stream: &'static str,
    /// What the decoder said.
    #[source]
    pub source: base64::DecodeError,
}

/// Bytes of the JSON members of an [`ExecResponse`] besides the two output
/// strings' contents, rounded up generously (names, quotes, the exit code,
/// encodings and flags come to under 200).
const RESPONSE_OVERHEAD: u64 = 1024;

/// How much longer than base64 a stream's JSON text may be and still be sent
/// as text: short output with a few quotes or newlines stays readable, while
/// output that escaping would blow up (control bytes: six times) goes as base64.
pub const TEXT_SLACK: u64 = 1024;

/// Length of standard base64 (padded) of `n` bytes.
pub fn base64_len(n: u64) -> u64 {
    n.div_ceil(3).saturating_mul(4)
}

/// Length of `s` inside a JSON string as serde_json writes it (without the
/// quotes): `"` and `\` take 2, control characters 2 (`\n`, `\t`, `\r`,
/// `\b`, `\f`) or 6 (`\u0001`), everything else itself.
fn json_string_len(s: &str) -> u64 {
    s.bytes()
        .map(|b| match b {
            b'"' | b'\\' | b'\n' | b'\t' | b'\r' | 0x08 | 0x0c => 2,
            0x00..=0x1f => 6,
            _ => 1,
        })
        .sum()
}

/// The wire form of `bytes`: the text itself when it is UTF-8 and its JSON
/// form is at most [`TEXT_SLACK`] longer than base64's, else base64. Either
/// way the JSON string holding it is at most [`base64_len`] of the length
/// plus [`TEXT_SLACK`] (and the quotes).
pub fn encode_output(bytes: Vec<u8>) -> (String, OutputEncoding) {
    let n = bytes.len() as u64;
    match String::from_utf8(bytes) {
        Ok(text) if json_string_len(&text) <= base64_len(n) + TEXT_SLACK => {
            (text, OutputEncoding::Utf8)
        }
        Ok(text) => (b64(text.as_bytes()), OutputEncoding::Base64),
        Err(e) => (b64(e.as_bytes()), OutputEncoding::Base64),
    }
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The bytes a wire string of `encoding` stands for.
pub fn decode_output(text: &str, encoding: OutputEncoding) -> Result<Vec<u8>, base64::DecodeError> {
    match encoding {
        OutputEncoding::Utf8 => Ok(text.as_bytes().to_vec()),
        OutputEncoding::Base64 => base64::engine::general_purpose::STANDARD.decode(text),
    }
}

impl ExecResponse {
    /// The answer for a process that ended with `exit_code`, with its captured output.
    pub fn from_output(
        exit_code: i32,
        stdout: CapturedOutput,
        stderr: CapturedOutput,
        timed_out: bool,
    ) -> Self {
        let (out, out_enc) = encode_output(stdout.bytes);
        let (err, err_enc) = encode_output(stderr.bytes);
        ExecResponse {
            exit_code,
            stdout: out,
            stdout_encoding: out_enc,
            stdout_truncated: stdout.truncated,
            stderr: err,
            stderr_encoding: err_enc,
            stderr_truncated: stderr.truncated,
            timed_out,
        }
    }

    /// The bytes the process wrote to stdout (as far as they were kept).
    pub fn stdout_bytes(&self) -> Result<Vec<u8>, OutputDecodeError> {
        decode_output(&self.stdout, self.stdout_encoding).map_err(|source| OutputDecodeError {
            stream: "stdout",
            source,
        })
    }

    /// The bytes the process wrote to stderr (as far as they were kept).
    pub fn stderr_bytes(&self) -> Result<Vec<u8>, OutputDecodeError> {
        decode_output(&self.stderr, self.stderr_encoding).map_err(|source| OutputDecodeError {
            stream: "stderr",
            source,
        })
    }

    /// Stdout for people: the text, invalid UTF-8 replaced (never base64).
    pub fn stdout_lossy(&self) -> String {
        lossy(self.stdout_bytes(), &self.stdout)
    }

    /// Stderr for people: the text, invalid UTF-8 replaced (never base64).
    pub fn stderr_lossy(&self) -> String {
        lossy(self.stderr_bytes(), &self.stderr)
    }

    /// Largest JSON form (in bytes) of an answer whose streams hold at most
    /// `max_output_bytes` each: what a reader of the answer needs to accept.
    pub fn max_json_len(max_output_bytes: u64) -> u64 {
        base64_len(max_output_bytes)
            .saturating_add(TEXT_SLACK)
            .saturating_mul(2)
            .saturating_add(RESPONSE_OVERHEAD)
    }
}

fn lossy(bytes: Result<Vec<u8>, OutputDecodeError>, raw: &str) -> String {
    match bytes {
        Ok(b) => String::from_utf8_lossy(&b).into_owned(),
        Err(_) => raw.to_string(),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn response(stdout: &[u8], stderr: &[u8]) -> ExecResponse {
        ExecResponse::from_output(
            0,
            CapturedOutput {
                bytes: stdout.to_vec(),
                truncated: false,
            },
            CapturedOutput {
                bytes: stderr.to_vec(),
                truncated: true,
            },
            false,
        )
    }

    #[test]
    fn text_stays_text_and_the_rest_is_base64_byte_exact() {
        let r = response("héllo\n\t\"q\"".as_bytes(), b"\xff\x00\x01 not utf-8");
        assert_eq!(r.stdout_encoding, OutputEncoding::Utf8);
        assert_eq!(r.stdout, "héllo\n\t\"q\"");
        assert_eq!(r.stderr_encoding, OutputEncoding::Base64);
        assert_eq!(r.stderr_bytes().unwrap(), b"\xff\x00\x01 not utf-8");
        assert!(r.stderr_truncated && !r.stdout_truncated);
        assert_eq!(r.stderr_lossy(), "\u{fffd}\u{0}\u{1} not utf-8");
        // Short text with a few characters JSON escapes stays readable text.
        let r = response(br#"{"X":"y"}"#, b"");
        assert_eq!(
            (r.stdout.as_str(), r.stdout_encoding),
            (r#"{"X":"y"}"#, OutputEncoding::Utf8)
        );
        // Valid UTF-8 that JSON would blow up (control bytes) goes as base64 too.
        let r = response(&[1u8; 300], b"");
        assert_eq!(r.stdout_encoding, OutputEncoding::Base64);
        assert_eq!(r.stdout_bytes().unwrap(), vec![1u8; 300]);
        assert_eq!(
            (r.stderr.as_str(), r.stderr_encoding),
            ("", OutputEncoding::Utf8)
        );
        // The wire form round-trips through JSON.
        let back: ExecResponse = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn answers_of_older_servers_still_read() {
        let r: ExecResponse =
            serde_json::from_str(r#"{"exit_code":3,"stdout":"a","stderr":"b"}"#).unwrap();
        assert_eq!(r.stdout_bytes().unwrap(), b"a");
        assert_eq!(r.stderr_bytes().unwrap(), b"b");
        assert!(!r.stdout_truncated && !r.stderr_truncated && !r.timed_out);
        let bad = ExecResponse {
            stdout: "not base64!".into(),
            stdout_encoding: OutputEncoding::Base64,
            ..r
        };
        assert!(
            bad.stdout_bytes()
                .unwrap_err()
                .to_string()
                .contains("stdout")
        );
        let q: ExecRequest = serde_json::from_str(r#"{"command":["ls"]}"#).unwrap();
        assert_eq!(q.max_output_bytes, None);
    }

    #[test]
    fn the_json_answer_never_exceeds_its_bound() {
        // Every byte value, JSON's worst characters, random bytes, and text.
        let mut inputs: Vec<Vec<u8>> = vec![
            (0..=255u8).cycle().take(10_000).collect(),
            b"\"\\".repeat(5000),
            vec![0u8; 9999],
            "日本語のテキスト\n".repeat(700).into_bytes(),
            Vec::new(),
        ];
        inputs.push((0..10_000).map(|_| rand::random::<u8>()).collect());
        for (i, a) in inputs.iter().enumerate() {
            for b in &inputs {
                let n = a.len().max(b.len()) as u64;
                let r = response(a, b);
                let json = serde_json::to_vec(&r).unwrap();
                assert!(
                    json.len() as u64 <= ExecResponse::max_json_len(n),
                    "input {i}: {} > {}",
                    json.len(),
                    ExecResponse::max_json_len(n)
                );
                assert_eq!(&r.stdout_bytes().unwrap(), a);
                assert_eq!(&r.stderr_bytes().unwrap(), b);
            }
        }
    }

    #[test]
    fn json_length_is_what_serde_json_writes() {
        let all: String = (0u8..=127).map(char::from).collect::<String>() + "é日\u{1F600}";
        for s in [all.as_str(), "", "plain", "\u{7f}\u{1b}[0m"] {
            assert_eq!(
                json_string_len(s),
                serde_json::to_string(s).unwrap().len() as u64 - 2,
                "{s:?}"
            );
        }
    }
}
