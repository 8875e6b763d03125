//! The local admin surface: a unix socket in the state directory
//! (`<state>/admin.sock`, mode 0600, peers checked to be root or the agent's
//! own uid). One JSON request per line, one JSON answer per line.
//!
//! Used by `boxlite-runner upgrade` (status, re-exec), `boxlite-runner
//! status`, and by tests and the benchmark to drive boxes without a control
//! plane.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use protocol::BoxSpec;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use uuid::Uuid;

use crate::agent::Agent;
use crate::boxes::BoxSummary;

/// Requests.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum AdminRequest {
    /// Describe the agent and its boxes.
    Status,
    /// Re-execute the binary `<state>/current` points to (same pid, same arguments).
    Reexec,
    /// Create and start a box.
    Create {
        /// The box.
        spec: BoxSpec,
    },
    /// Start a box.
    Start {
        /// Id.
        id: Uuid,
    },
    /// Stop a box.
    Stop {
        /// Id.
        id: Uuid,
    },
    /// Delete a box.
    Delete {
        /// Id.
        id: Uuid,
    },
    /// Retire the runner: stop taking boxes from the control plane and delete
    /// every box (processes, layers, cgroups). The agent keeps running.
    Purge,
}

/// How the agent is supervised.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Supervisor {
    /// A systemd service: restart with `systemctl restart UNIT`.
    Systemd {
        /// Unit name.
        unit: String,
    },
    /// Anything else (boxctl's local target): restart by re-exec.
    Local,
}

/// Answer to `status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminStatus {
    /// Runner name.
    pub name: String,
    /// Binary version.
    pub version: String,
    /// SHA-256 of the running binary (absent while still being computed).
    pub binary_sha256: Option<String>,
    /// Path of the running binary.
    pub exe: PathBuf,
    /// Agent pid.
    pub pid: u32,
    /// Agent start time (clock ticks since boot).
    pub start_time: u64,
    /// HTTP listen address.
    pub listen: String,
    /// Supervision.
    pub supervisor: Supervisor,
    /// cgroup layout.
    pub cgroups: String,
    /// Boxes.
    pub boxes: Vec<BoxSummary>,
}

/// Answer envelope.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AdminResponse {
    /// Success.
    pub ok: bool,
    /// Failure explanation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Status (for `status`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<AdminStatus>,
}

impl AdminResponse {
    fn ok() -> Self {
        AdminResponse {
            ok: true,
            error: None,
            status: None,
        }
    }
    fn err(e: &anyhow::Error) -> Self {
        AdminResponse {
            ok: false,
            error: Some(format!("{e:#}")),
            status: None,
        }
    }
}

/// Serve the admin socket until the process exits.
pub async fn serve(agent: Arc<Agent>, path: PathBuf) -> Result<()> {
    let _ = std::fs::remove_file(&path);
    let (_dir, addr) = crate::sys::socket_addr_path(&path)?;
    let listener =
        UnixListener::bind(&addr).with_context(|| format!("binding {}", path.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    let me = nix::unistd::geteuid().as_raw();
    loop {
        let (conn, _) = listener.accept().await?;
        let allowed = conn
            .peer_cred()
            .map(|c| c.uid() == 0 || c.uid() == me)
            .unwrap_or(false);
        if !allowed {
            continue;
        }
        let agent = agent.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(agent, conn).await {
                tracing::debug!("admin connection: {e:#}");
            }
        });
    }
}

async fn handle(agent: Arc<Agent>, conn: UnixStream) -> Result<()> {
    let (rd, mut wr) = conn.into_split();
    let mut lines = BufReader::new(rd.take(1 << 20)).lines();
    while let Some(line) = lines.next_line().await? {
        let resp = match serde_json::from_str::<AdminRequest>(&line) {
            Err(e) => AdminResponse::err(&anyhow!("malformed request: {e}")),
            Ok(AdminRequest::Status) => AdminResponse {
                ok: true,
                error: None,
                status: Some(agent.status()),
            },
            Ok(AdminRequest::Reexec) => {
                // Answer first; the exec replaces this process a moment later.
                match agent.check_reexec() {
                    Ok(path) => {
                        let body = serde_json::to_string(&AdminResponse::ok())? + "\n";
                        wr.write_all(body.as_bytes()).await?;
                        wr.flush().await?;
                        agent.reexec(path);
                        continue;
                    }
                    Err(e) => AdminResponse::err(&e),
                }
            }
            Ok(AdminRequest::Create { spec }) => match agent.boxes.create(spec).await {
                Ok(()) => AdminResponse::ok(),
                Err(e) => AdminResponse::err(&e),
            },
            Ok(AdminRequest::Start { id }) => match agent.boxes.start(&id).await {
                Ok(()) => AdminResponse::ok(),
                Err(e) => AdminResponse::err(&e),
            },
            Ok(AdminRequest::Stop { id }) => match agent.boxes.stop(&id).await {
                Ok(()) => AdminResponse::ok(),
                Err(e) => AdminResponse::err(&e),
            },
            Ok(AdminRequest::Delete { id }) => match agent.boxes.delete(&id).await {
                Ok(()) => AdminResponse::ok(),
                Err(e) => AdminResponse::err(&e),
            },
            Ok(AdminRequest::Purge) => match agent.purge().await {
                Ok(n) => {
                    tracing::info!("purged: {n} box(es) deleted; no new boxes will be taken");
                    AdminResponse::ok()
                }
                Err(e) => AdminResponse::err(&e),
            },
        };
        let body = serde_json::to_string(&resp)? + "\n";
        wr.write_all(body.as_bytes()).await?;
    }
    Ok(())
}

use tokio::io::AsyncReadExt;

/// A client of the admin socket.
pub struct AdminClient {
    lines: tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
    wr: tokio::net::unix::OwnedWriteHalf,
}

impl AdminClient {
    /// Connect to the socket at `path`.
    pub async fn connect(path: &Path) -> Result<AdminClient> {
        let (_dir, addr) = crate::sys::socket_addr_path(path)?;
        let s = tokio::time::timeout(Duration::from_secs(2), UnixStream::connect(&addr))
            .await
            .map_err(|_| anyhow!("timed out connecting to {}", path.display()))?
            .with_context(|| format!("connecting to {} (is the agent running?)", path.display()))?;
        let (rd, wr) = s.into_split();
        Ok(AdminClient {
            lines: BufReader::new(rd).lines(),
            wr,
        })
    }

    /// Send a request and read its answer (with a timeout long enough for box operations).
    pub async fn call(&mut self, req: &AdminRequest) -> Result<AdminResponse> {
        let body = serde_json::to_string(req)? + "\n";
        self.wr.write_all(body.as_bytes()).await?;
        let line = tokio::time::timeout(Duration::from_secs(120), self.lines.next_line())
            .await
            .map_err(|_| anyhow!("the agent did not answer within 120 s"))??
            .ok_or_else(|| anyhow!("the agent closed the admin connection"))?;
        serde_json::from_str(&line).context("malformed admin answer")
    }

    /// `call`, turning `ok: false` into an error.
    pub async fn call_ok(&mut self, req: &AdminRequest) -> Result<AdminResponse> {
        let r = self.call(req).await?;
        if !r.ok {
            bail!("{}", r.error.unwrap_or_else(|| "failed".into()));
        }
        Ok(r)
    }

    /// The agent's status.
    pub async fn status(&mut self) -> Result<AdminStatus> {
        self.call_ok(&AdminRequest::Status)
            .await?
            .status
            .ok_or_else(|| anyhow!("status missing from the answer"))
    }
}

/// One-shot helper: connect and call.
pub async fn call(path: &Path, req: &AdminRequest) -> Result<AdminResponse> {
    AdminClient::connect(path).await?.call_ok(req).await
}
