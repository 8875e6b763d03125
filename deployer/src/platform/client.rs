//! A thin client of the control plane's API, for the commands that operate a
//! deployed stage (`box`, `runner upgrade`, `decommission`) and for the local
//! target's runner registrations and post-deploy checks.

use std::fmt;
use std::time::Duration;

use protocol::{
    ApiError, BoxInfo, BoxPage, ControlPlaneHealth, CreateBoxRequest, ExecRequest, ExecResponse,
    MoveBoxRequest, RegisterRunnerRequest, RegisterRunnerResponse, RunnerInfo,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use uuid::Uuid;

/// A failed API call.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The control plane could not be reached (or the connection broke).
    #[error("cannot reach the control plane at {url}: {source}")]
    Unreachable {
        /// Base URL.
        url: String,
        /// Cause.
        source: reqwest::Error,
    },
    /// The control plane answered with an error.
    #[error("{method} {path}: {status}: {message} ({code})")]
    Api {
        /// Method.
        method: String,
        /// Path.
        path: String,
        /// HTTP status.
        status: u16,
        /// `code` of the error body.
        code: String,
        /// `message` of the error body.
        message: String,
    },
    /// The answer was not what the API documents.
    #[error("{method} {path}: malformed answer: {detail}")]
    Malformed {
        /// Method.
        method: String,
        /// Path.
        path: String,
        /// What was wrong.
        detail: String,
    },
}

impl ClientError {
    /// The API error code, when the control plane answered with one.
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Api { code, .. } => Some(code),
            _ => None,
        }
    }

    /// The HTTP status, when the control plane answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// True when the control plane was not reachable at all.
    pub fn is_unreachable(&self) -> bool {
        matches!(self, ClientError::Unreachable { .. })
    }
}

/// An API key, kept out of `Debug` output and logs.
#[derive(Clone)]
pub struct ApiKey(String);

impl ApiKey {
    /// Wrap a key.
    pub fn new(key: impl Into<String>) -> Self {
        ApiKey(key.into().trim().to_string())
    }

    /// The key itself, for the Authorization header.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(…)")
    }
}

/// A client of one control plane.
#[derive(Clone, Debug)]
pub struct Client {
    base: String,
    key: ApiKey,
    http: reqwest::Client,
}

impl Client {
    /// A client of the control plane at `base` (e.g. `http://127.0.0.1:7070`).
    pub fn new(base: &str, key: ApiKey) -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .build()
            .expect("an HTTP client with rustls builds");
        Client {
            base: base.trim_end_matches('/').to_string(),
            key,
            http,
        }
    }

    /// The base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Calls that only read or flip state answer quickly; exec and move take
    /// as long as the work they do, so they have no overall deadline.
    const QUICK: Duration = Duration::from_secs(30);

    async fn send<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&impl Serialize>,
        timeout: Option<Duration>,
    ) -> Result<T, ClientError> {
        let mut req = self
            .http
            .request(method.clone(), self.url(path))
            .bearer_auth(self.key.expose());
        if let Some(t) = timeout {
            req = req.timeout(t);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req
            .send()
            .await
            .map_err(|source| ClientError::Unreachable {
                url: self.base.clone(),
                source,
            })?;
        let status = resp.status();
        let bytes = resp
            .bytes()
            .await
            .map_err(|source| ClientError::Unreachable {
                url: self.base.clone(),
                source,
            })?;
        if !status.is_success() {
            let (code, message) = match serde_json::from_slice::<ApiError>(&bytes) {
                Ok(e) => (e.code, e.message),
                Err(_) => (
                    "http_error".to_string(),
                    String::from_utf8_lossy(&bytes[..bytes.len().min(300)])
                        .trim()
                        .to_string(),
                ),
            };
            return Err(ClientError::Api {
                method: method.to_string(),
                path: path.to_string(),
                status: status.as_u16(),
                code,
                message,
            });
        }
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Malformed {
            method: method.to_string(),
            path: path.to_string(),
            detail: e.to_string(),
        })
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.send(reqwest::Method::GET, path, None::<&()>, Some(Self::QUICK))
            .await
    }

    async fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &impl Serialize,
    ) -> Result<T, ClientError> {
        self.send(reqwest::Method::POST, path, Some(body), Some(Self::QUICK))
            .await
    }

    /// `GET /api/health` (no credentials needed).
    pub async fn health(&self) -> Result<ControlPlaneHealth, ClientError> {
        self.get("/api/health").await
    }

    /// Every runner (admin).
    pub async fn runners(&self) -> Result<Vec<RunnerInfo>, ClientError> {
        self.get("/api/admin/runners").await
    }

    /// One runner (admin).
    pub async fn runner(&self, name: &str) -> Result<RunnerInfo, ClientError> {
        self.get(&format!("/api/admin/runners/{name}")).await
    }

    /// Register a runner with the SHA-256 of a token the caller minted (admin).
    pub async fn register_runner(
        &self,
        name: &str,
        token_sha256: &str,
    ) -> Result<RunnerInfo, ClientError> {
        let r: RegisterRunnerResponse = self
            .post(
                "/api/admin/runners",
                &RegisterRunnerRequest {
                    name: name.to_string(),
                    token_sha256: Some(token_sha256.to_string()),
                },
            )
            .await?;
        Ok(r.runner)
    }

    /// Mark a runner draining: it gets no new boxes (admin).
    pub async fn drain(&self, name: &str) -> Result<RunnerInfo, ClientError> {
        self.post(
            &format!("/api/admin/runners/{name}/drain"),
            &serde_json::json!({}),
        )
        .await
    }

    /// Retire a runner; `force` abandons boxes still pinned to it (admin).
    pub async fn decommission(&self, name: &str, force: bool) -> Result<RunnerInfo, ClientError> {
        self.post(
            &format!("/api/admin/runners/{name}/decommission?force={force}"),
            &serde_json::json!({}),
        )
        .await
    }

    /// The boxes pinned to a runner (admin).
    pub async fn runner_boxes(&self, name: &str) -> Result<Vec<BoxInfo>, ClientError> {
        self.get(&format!("/api/admin/runners/{name}/boxes")).await
    }

    /// Move a box to another runner, keeping its id and files (admin).
    pub async fn move_box(&self, id: Uuid, runner: &str) -> Result<BoxInfo, ClientError> {
        let body = MoveBoxRequest {
            runner: runner.to_string(),
        };
        self.send(
            reqwest::Method::POST,
            &format!("/api/admin/boxes/{id}/move"),
            Some(&body),
            None,
        )
        .await
    }

    /// Create a box.
    pub async fn create_box(&self, req: &CreateBoxRequest) -> Result<BoxInfo, ClientError> {
        self.post("/api/boxes", req).await
    }

    /// One page of boxes.
    pub async fn list_boxes(
        &self,
        cursor: Option<&str>,
        limit: u32,
    ) -> Result<BoxPage, ClientError> {
        let mut path = format!("/api/boxes?limit={limit}");
        if let Some(c) = cursor {
            path.push_str("&cursor=");
            path.push_str(&url::form_urlencoded::byte_serialize(c.as_bytes()).collect::<String>());
        }
        self.get(&path).await
    }

    /// One box.
    pub async fn get_box(&self, id: Uuid) -> Result<BoxInfo, ClientError> {
        self.get(&format!("/api/boxes/{id}")).await
    }

    /// Delete a box.
    pub async fn delete_box(&self, id: Uuid) -> Result<BoxInfo, ClientError> {
        self.send(
            reqwest::Method::DELETE,
            &format!("/api/boxes/{id}"),
            None::<&()>,
            Some(Self::QUICK),
        )
        .await
    }

    /// Run a command in a box and wait for it. The answer's streams hold the
    /// first bytes the process wrote, as text or base64: read them with
    /// [`ExecResponse::stdout_bytes`] and [`ExecResponse::stderr_bytes`].
    pub async fn exec(&self, id: Uuid, req: &ExecRequest) -> Result<ExecResponse, ClientError> {
        self.send(
            reqwest::Method::POST,
            &format!("/api/boxes/{id}/exec"),
            Some(req),
            None,
        )
        .await
    }

    /// Open an interactive exec session (the WebSocket protocol of `protocol::exec`).
    pub async fn exec_ws(&self, id: Uuid) -> Result<protocol::ws::ClientSocket, ClientError> {
        let path = format!("/api/boxes/{id}/exec/ws");
        let req = self
            .http
            .get(self.url(&path))
            .bearer_auth(self.key.expose());
        protocol::ws::upgrade(req).await.map_err(|e| match e {
            protocol::ws::UpgradeError::Http(source) => ClientError::Unreachable {
                url: self.base.clone(),
                source,
            },
            protocol::ws::UpgradeError::Refused { status, body } => {
                let (code, message) = serde_json::from_str::<ApiError>(&body)
                    .map(|e| (e.code, e.message))
                    .unwrap_or_else(|_| ("http_error".into(), body.chars().take(300).collect()));
                ClientError::Api {
                    method: "GET".into(),
                    path: path.clone(),
                    status: status.as_u16(),
                    code,
                    message,
                }
            }
            protocol::ws::UpgradeError::BadHandshake => ClientError::Malformed {
                method: "GET".into(),
                path: path.clone(),
                detail: "wrong WebSocket handshake answer".into(),
            },
        })
    }
}
