//! Shared test harness: the control plane in-process on a real socket over a
//! real database (SQLite file or a database on the shared PostgreSQL server),
//! a manual clock, and a fake runner that speaks the runner API and the
//! healthcheck loop (a test double for the runner team's component).

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use control_plane::clock::Clock;
use control_plane::config::Config;
use control_plane::server::Server;
use control_plane::state::AppState;
use protocol::*;
use reqwest::Method;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use testkit::postgres::PostgresServer;
use time::macros::datetime;
use tokio::task::JoinHandle;
use uuid::Uuid;

/// Which database a test runs against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// A SQLite file in a temporary directory.
    Sqlite,
    /// A fresh database on the process-wide PostgreSQL server.
    Postgres,
}

/// Run each listed `async fn name(Backend)` once per backend.
#[macro_export]
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::Backend::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::Backend::Postgres).await
                }
            )*
        }
    };
}

/// Install the TLS provider and quiet logging once.
pub fn init() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .with_test_writer()
        .try_init();
}

/// A fresh database URL for `backend` (the tempdir keeps a SQLite file alive).
pub fn database(backend: Backend) -> (String, Option<tempfile::TempDir>) {
    match backend {
        Backend::Sqlite => {
            let dir = tempfile::tempdir().expect("tempdir");
            let url = format!("sqlite://{}/cp.db?mode=rwc", dir.path().display());
            (url, Some(dir))
        }
        Backend::Postgres => {
            let url = PostgresServer::shared()
                .create_unique_database("cp")
                .expect("create a PostgreSQL database");
            (url, None)
        }
    }
}

/// A new admin key.
pub fn new_admin_key() -> String {
    control_plane::tokens::generate(API_KEY_PREFIX)
}

/// The control plane, serving on 127.0.0.1.
pub struct TestApp {
    /// `http://127.0.0.1:port`.
    pub url: String,
    /// The configured admin key.
    pub admin_key: String,
    /// The server's clock.
    pub clock: Clock,
    /// Shared state (database access for assertions).
    pub state: AppState,
    /// Database URL.
    pub database_url: String,
    /// Which backend.
    pub backend: Backend,
    /// HTTP client.
    pub http: reqwest::Client,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    dir: Option<tempfile::TempDir>,
}

/// The manual clock's start.
pub fn epoch() -> time::OffsetDateTime {
    datetime!(2030-01-01 00:00 UTC)
}

impl TestApp {
    /// Start on a fresh database.
    pub async fn start(backend: Backend) -> TestApp {
        Self::start_with(backend, |_| {}).await
    }

    /// Start on a fresh database, adjusting the configuration first.
    pub async fn start_with(backend: Backend, tweak: impl FnOnce(&mut Config)) -> TestApp {
        init();
        let (url, dir) = database(backend);
        let mut config = Config::new(url.clone(), new_admin_key());
        tweak(&mut config);
        let clock = Clock::manual(epoch());
        let server = Server::new(config.clone(), clock.clone())
            .await
            .expect("start the control plane");
        Self::serve(
            server,
            backend,
            url,
            config.admin_key.expose().to_string(),
            clock,
            dir,
        )
        .await
    }

    /// Serve an already built server.
    pub async fn serve(
        server: Server,
        backend: Backend,
        database_url: String,
        admin_key: String,
        clock: Clock,
        dir: Option<tempfile::TempDir>,
    ) -> TestApp {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = server.state().clone();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            server
                .serve(listener, async move {
                    let _ = rx.await;
                })
                .await
                .expect("serve");
        });
        TestApp {
            url,
            admin_key,
            clock,
            state,
            database_url,
            backend,
            http: reqwest::Client::new(),
            shutdown: Some(tx),
            task: Some(task),
            dir,
        }
    }

    /// Stop serving (graceful) and wait for it.
    pub async fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }

    /// Keep the SQLite directory alive beyond this app (for a restart on the same file).
    pub fn take_dir(&mut self) -> Option<tempfile::TempDir> {
        self.dir.take()
    }

    /// Call `method path` with `key` (if any) and a JSON `body` (if any).
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        key: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut rb = self.http.request(method, format!("{}{path}", self.url));
        if let Some(k) = key {
            rb = rb.bearer_auth(k);
        }
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        let resp = rb.send().await.expect("request");
        let status = StatusCode::from_u16(resp.status().as_u16()).unwrap();
        let text = resp.text().await.unwrap();
        let v = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        (status, v)
    }

    /// Call as the admin.
    pub async fn admin(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        self.call(method, path, Some(&self.admin_key.clone()), body)
            .await
    }

    /// Create an organization; returns (id, its first API key).
    pub async fn org(&self, name: &str) -> (Uuid, String) {
        let (s, v) = self
            .admin(
                Method::POST,
                "/api/admin/organizations",
                Some(json!({ "name": name })),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        let r: CreateOrganizationResponse = serde_json::from_value(v).unwrap();
        (r.organization.id, r.api_key.key)
    }

    /// Create a box with `key`; panics unless it is created.
    pub async fn create_box(&self, key: &str, body: Value) -> BoxInfo {
        let (s, v) = self
            .call(Method::POST, "/api/boxes", Some(key), Some(body))
            .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        serde_json::from_value(v).unwrap()
    }

    /// Get a box with `key`.
    pub async fn get_box(&self, key: &str, id: Uuid) -> BoxInfo {
        let (s, v) = self
            .call(Method::GET, &format!("/api/boxes/{id}"), Some(key), None)
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        serde_json::from_value(v).unwrap()
    }

    /// A runner by name (admin view).
    pub async fn runner(&self, name: &str) -> RunnerInfo {
        let (s, v) = self
            .admin(Method::GET, &format!("/api/admin/runners/{name}"), None)
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        serde_json::from_value(v).unwrap()
    }

    /// Move the manual clock.
    pub fn advance(&self, secs: u64) {
        self.clock.advance(Duration::from_secs(secs));
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// One box on the fake runner.
#[derive(Clone, Debug)]
pub struct FakeBox {
    /// What it was created from.
    pub spec: BoxSpec,
    /// Its state.
    pub state: BoxState,
    /// Its "files".
    pub data: Vec<u8>,
}

/// What the fake runner has and has seen.
#[derive(Debug, Default)]
pub struct FakeState {
    /// Boxes by id.
    pub boxes: BTreeMap<Uuid, FakeBox>,
    /// Key the control plane must present.
    pub api_key: Option<String>,
    /// Requests to its API, as `METHOD path`.
    pub calls: Vec<String>,
    /// Requests refused for a bad key.
    pub refused: u32,
    /// Make export fail with 500.
    pub fail_export: bool,
    /// Corrupt the export (announce a wrong checksum).
    pub lie_about_checksum: bool,
    /// Delay before answering an exec.
    pub exec_delay: Duration,
    /// Imports announced in the last healthcheck answer.
    pub imports: Vec<ImportGrant>,
    /// Token hashes of imports accepted (each once).
    pub used_imports: Vec<String>,
    /// Import tokens presented, with the grant they matched.
    pub presented: Vec<(String, ImportGrant)>,
    /// The last exec request received.
    pub last_exec: Option<ExecRequest>,
}

/// What a fake runner is and knows, shared with its API handlers (which check
/// in by themselves when an import they do not know of yet arrives, like the
/// real runner).
pub struct Fake {
    state: Mutex<FakeState>,
    /// Name.
    pub name: String,
    /// Its token.
    pub token: String,
    /// Base URL of its API.
    pub address: String,
    /// Capacity it reports.
    pub capacity: Resources,
    /// SHA-256 of the binary it reports.
    pub binary_sha256: String,
    /// The agent process id it reports (`restart` picks a new one).
    pub instance: Mutex<String>,
    cp: String,
    http: reqwest::Client,
}

impl Fake {
    /// Its state.
    pub fn lock(&self) -> std::sync::LockResult<std::sync::MutexGuard<'_, FakeState>> {
        self.state.lock()
    }
}

/// A fake runner: its API on a real socket, and `sync` for one healthcheck.
pub struct FakeRunner {
    /// Name.
    pub name: String,
    /// Its token.
    pub token: String,
    /// Base URL of its API.
    pub address: String,
    /// Capacity it reports.
    pub capacity: Resources,
    /// SHA-256 of the binary it reports.
    pub binary_sha256: String,
    /// Shared state.
    pub state: Arc<Fake>,
    task: JoinHandle<()>,
}

impl Drop for FakeRunner {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Resources literal.
pub fn res(cpu: u64, mem: u64, disk: u64) -> Resources {
    Resources {
        cpu_millicores: cpu,
        memory_mib: mem,
        disk_mib: disk,
    }
}

/// `n` bytes of 0, 1, …, 255, 0, 1, … (binary: NULs, control bytes, invalid UTF-8).
pub fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 256) as u8).collect()
}

/// The archive a fake box exports: deterministic bytes, large enough to stream.
pub fn archive_of(b: &FakeBox) -> Vec<u8> {
    let mut out = serde_json::to_vec(&b.spec).unwrap();
    out.extend_from_slice(b"\n");
    out.extend_from_slice(&b.data);
    out
}

impl FakeRunner {
    /// Register `name` (boxctl style: we mint the token, send its hash) and serve its API.
    pub async fn register(app: &TestApp, name: &str, capacity: Resources) -> FakeRunner {
        let token = control_plane::tokens::generate(RUNNER_TOKEN_PREFIX);
        let (s, v) = app
            .admin(
                Method::POST,
                "/api/admin/runners",
                Some(json!({ "name": name, "token_sha256": control_plane::tokens::sha256_hex(&token) })),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        assert!(
            v.get("token").is_none(),
            "no token is returned when the caller sent its hash"
        );
        Self::serve(app, name, token, capacity).await
    }

    /// Serve the runner API for an already registered runner.
    pub async fn serve(
        app: &TestApp,
        name: &str,
        token: String,
        capacity: Resources,
    ) -> FakeRunner {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = format!("http://{}", listener.local_addr().unwrap());
        let binary_sha256 = format!("{:064x}", name.len());
        let state = Arc::new(Fake {
            state: Mutex::new(FakeState::default()),
            name: name.to_string(),
            token: token.clone(),
            address: address.clone(),
            capacity,
            binary_sha256: binary_sha256.clone(),
            instance: Mutex::new(format!("{:032x}", rand::random::<u128>())),
            cp: app.url.clone(),
            http: reqwest::Client::new(),
        });
        let router = Router::new()
            .route("/api/health", get(fake_health))
            .route("/api/boxes/{id}/exec", post(fake_exec))
            .route("/api/boxes/{id}/exec/ws", get(fake_ws))
            .route("/api/boxes/{id}/export", get(fake_export))
            .route("/api/boxes/{id}/import", post(fake_import))
            .layer(axum::extract::DefaultBodyLimit::max(64 * 1024 * 1024))
            .with_state(state.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        FakeRunner {
            name: name.to_string(),
            token,
            address,
            capacity,
            binary_sha256,
            state,
            task,
        }
    }

    /// Pretend the agent process restarted: the next healthcheck reports a new `agent_instance`.
    pub fn restart(&self) {
        *self.state.instance.lock().unwrap() = format!("{:032x}", rand::random::<u128>());
    }

    /// The healthcheck this runner would send now.
    pub fn report(&self) -> HealthcheckRequest {
        self.state.report()
    }

    /// Send a healthcheck with `body`; returns the status and raw answer.
    pub async fn healthcheck_raw(
        &self,
        token: &str,
        body: &HealthcheckRequest,
    ) -> (StatusCode, Value) {
        self.state.healthcheck_raw(token, body).await
    }

    /// One healthcheck round: report, then apply the answered actions.
    pub async fn sync(&self) -> HealthcheckResponse {
        self.state.sync().await
    }

    /// Box states on this runner.
    pub fn boxes(&self) -> BTreeMap<Uuid, BoxState> {
        self.state
            .lock()
            .unwrap()
            .boxes
            .iter()
            .map(|(k, v)| (*k, v.state))
            .collect()
    }
}

impl Fake {
    /// The healthcheck this runner would send now.
    pub fn report(&self) -> HealthcheckRequest {
        let st = self.state.lock().unwrap();
        let mut usage = Resources::default();
        let boxes = st
            .boxes
            .iter()
            .map(|(id, b)| {
                if b.state == BoxState::Running {
                    usage.cpu_millicores += b.spec.resources.cpu_millicores / 10;
                    usage.memory_mib += b.spec.resources.memory_mib / 10;
                }
                usage.disk_mib += b.spec.resources.disk_mib / 10;
                BoxReport {
                    id: *id,
                    state: b.state,
                    usage: Resources::default(),
                    error: None,
                }
            })
            .collect();
        HealthcheckRequest {
            version: "fake-1.0".into(),
            address: self.address.clone(),
            capacity: self.capacity,
            usage,
            binary_sha256: Some(self.binary_sha256.clone()),
            agent_instance: Some(self.instance.lock().unwrap().clone()),
            boxes,
        }
    }

    /// Send a healthcheck with `body`; returns the status and raw answer.
    pub async fn healthcheck_raw(
        &self,
        token: &str,
        body: &HealthcheckRequest,
    ) -> (StatusCode, Value) {
        let resp = self
            .http
            .post(format!("{}/api/runners/healthcheck", self.cp))
            .bearer_auth(token)
            .json(body)
            .send()
            .await
            .unwrap();
        let s = StatusCode::from_u16(resp.status().as_u16()).unwrap();
        (s, resp.json().await.unwrap_or(Value::Null))
    }

    /// One healthcheck round: report, then apply the answered actions.
    pub async fn sync(&self) -> HealthcheckResponse {
        let (s, v) = self.healthcheck_raw(&self.token, &self.report()).await;
        assert_eq!(s, StatusCode::OK, "healthcheck of {}: {v}", self.name);
        let r: HealthcheckResponse = serde_json::from_value(v).unwrap();
        let mut st = self.state.lock().unwrap();
        st.api_key = Some(r.api_key.clone());
        st.imports = r.imports.clone();
        for a in &r.actions {
            match a {
                RunnerAction::Create { spec } => {
                    st.boxes.insert(
                        spec.id,
                        FakeBox {
                            spec: spec.clone(),
                            state: BoxState::Running,
                            data: (0..300_000u32).map(|i| (i % 251) as u8).collect(),
                        },
                    );
                }
                RunnerAction::Start { id } => {
                    if let Some(b) = st.boxes.get_mut(id) {
                        b.state = BoxState::Running;
                    }
                }
                RunnerAction::Stop { id } => {
                    if let Some(b) = st.boxes.get_mut(id) {
                        b.state = BoxState::Stopped;
                    }
                }
                RunnerAction::Delete { id } => {
                    st.boxes.remove(id);
                }
            }
        }
        r
    }
}

type Shared = State<Arc<Fake>>;

/// `Some(refusal)` unless the request carries the runner's API key.
fn refused(st: &Shared, headers: &HeaderMap, what: String) -> Option<Response> {
    let mut s = st.lock().unwrap();
    s.calls.push(what);
    let want = s.api_key.clone().map(|k| format!("Bearer {k}"));
    let got = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    if want.is_none() || want != got {
        s.refused += 1;
        return Some(
            (
                StatusCode::UNAUTHORIZED,
                axum::Json(ApiError::new("unauthorized", "bad key")),
            )
                .into_response(),
        );
    }
    None
}

async fn fake_health() -> &'static str {
    "ok"
}

async fn fake_exec(
    st: Shared,
    Path(id): Path<Uuid>,
    headers: HeaderMap,
    axum::Json(req): axum::Json<ExecRequest>,
) -> Response {
    if let Some(r) = refused(&st, &headers, format!("POST /api/boxes/{id}/exec")) {
        return r;
    }
    let delay = {
        let mut s = st.lock().unwrap();
        s.last_exec = Some(req.clone());
        s.exec_delay
    };
    tokio::time::sleep(delay).await;
    // `sleep SECS` takes that long; `bytes N` writes N bytes of 0, 1, …, 255,
    // 0, … (kept up to `max_output_bytes`, like the runner); `flood N` writes
    // N bytes and ignores `max_output_bytes` (like a runner that predates it).
    let arg = |i: usize| -> u64 { req.command.get(i).and_then(|a| a.parse().ok()).unwrap_or(0) };
    if req.command[0] == "sleep" {
        tokio::time::sleep(Duration::from_secs(arg(1))).await;
    }
    let s = st.lock().unwrap();
    match s.boxes.get(&id) {
        None => (
            StatusCode::NOT_FOUND,
            axum::Json(ApiError::new("no_such_box", "not here")),
        )
            .into_response(),
        Some(b) if b.state != BoxState::Running => (
            StatusCode::CONFLICT,
            axum::Json(ApiError::new("not_running", "stopped")),
        )
            .into_response(),
        Some(_) if req.command[0] == "bytes" => {
            let n = arg(1);
            let kept = n.min(req.max_output_bytes.unwrap_or(u64::MAX));
            axum::Json(ExecResponse::from_output(
                0,
                CapturedOutput {
                    bytes: pattern(kept as usize),
                    truncated: kept < n,
                },
                CapturedOutput::default(),
                false,
            ))
            .into_response()
        }
        Some(_) if req.command[0] == "flood" => axum::Json(ExecResponse::from_output(
            0,
            CapturedOutput {
                bytes: vec![b'a'; arg(1) as usize],
                truncated: false,
            },
            CapturedOutput::default(),
            false,
        ))
        .into_response(),
        Some(_) => axum::Json(ExecResponse::from_output(
            if req.command[0] == "false" { 1 } else { 0 },
            CapturedOutput {
                bytes: format!("{}{}", req.command.join(" "), req.stdin.unwrap_or_default())
                    .into_bytes(),
                truncated: false,
            },
            CapturedOutput {
                bytes: serde_json::to_vec(&req.env).unwrap(),
                truncated: false,
            },
            false,
        ))
        .into_response(),
    }
}

async fn fake_ws(
    st: Shared,
    Path(id): Path<Uuid>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    if let Some(r) = refused(&st, &headers, format!("GET /api/boxes/{id}/exec/ws")) {
        return r;
    }
    if !st.lock().unwrap().boxes.contains_key(&id) {
        return (
            StatusCode::NOT_FOUND,
            axum::Json(ApiError::new("no_such_box", "not here")),
        )
            .into_response();
    }
    ws.on_upgrade(fake_session)
}

/// Echo session: stdin comes back as stdout, resizes are reported on
/// stderr, `stdin_eof` ends with exit code 0 (3 after a TERM signal).
/// Command `flood N` sends one output message of N bytes instead.
async fn fake_session(mut ws: WebSocket) {
    let Some(Ok(Message::Text(first))) = ws.recv().await else {
        return;
    };
    let start: ExecStart = match serde_json::from_str(first.as_str()) {
        Ok(s) => s,
        Err(e) => {
            let ev = ExecEvent::Error {
                message: e.to_string(),
            };
            let _ = ws
                .send(Message::Text(serde_json::to_string(&ev).unwrap().into()))
                .await;
            return;
        }
    };
    let started = ExecEvent::Started {
        session: format!("s-{}", start.command.join("-")),
    };
    let _ = ws
        .send(Message::Text(
            serde_json::to_string(&started).unwrap().into(),
        ))
        .await;
    // `flood N`: one output message of N bytes, then exit 0.
    if let [cmd, n] = start.command.as_slice()
        && cmd == "flood"
    {
        let mut out = vec![STDOUT];
        out.resize(n.parse::<usize>().unwrap_or(0) + 1, b'a');
        let _ = ws.send(Message::Binary(Bytes::from(out))).await;
        let ev = ExecEvent::Exit { code: 0 };
        let _ = ws
            .send(Message::Text(serde_json::to_string(&ev).unwrap().into()))
            .await;
        return;
    }
    let mut code = 0;
    while let Some(Ok(m)) = ws.recv().await {
        match m {
            Message::Binary(b) => {
                let mut out = vec![STDOUT];
                out.extend_from_slice(&b);
                let _ = ws.send(Message::Binary(Bytes::from(out))).await;
            }
            Message::Text(t) => match serde_json::from_str::<ExecControl>(t.as_str()) {
                Ok(ExecControl::Resize { rows, cols }) => {
                    let mut out = vec![STDERR];
                    out.extend_from_slice(format!("resize {rows}x{cols}").as_bytes());
                    let _ = ws.send(Message::Binary(Bytes::from(out))).await;
                }
                Ok(ExecControl::Signal { signal }) => {
                    if signal == "TERM" {
                        code = 3;
                    }
                }
                Ok(ExecControl::StdinEof) => {
                    let ev = ExecEvent::Exit { code };
                    let _ = ws
                        .send(Message::Text(serde_json::to_string(&ev).unwrap().into()))
                        .await;
                    let _ = ws.send(Message::Close(None)).await;
                    return;
                }
                Err(_) => {}
            },
            Message::Close(_) => return,
            _ => {}
        }
    }
}

async fn fake_export(st: Shared, Path(id): Path<Uuid>, headers: HeaderMap) -> Response {
    if let Some(r) = refused(&st, &headers, format!("GET /api/boxes/{id}/export")) {
        return r;
    }
    let s = st.lock().unwrap();
    if s.fail_export {
        return (StatusCode::INTERNAL_SERVER_ERROR, "disk on fire").into_response();
    }
    let Some(b) = s.boxes.get(&id) else {
        return (
            StatusCode::NOT_FOUND,
            axum::Json(ApiError::new("no_such_box", "not here")),
        )
            .into_response();
    };
    let body = archive_of(b);
    let mut sha = hex::encode(Sha256::digest(&body));
    if s.lie_about_checksum {
        sha = hex::encode(Sha256::digest(b"something else"));
    }
    ([(ARCHIVE_SHA256_HEADER, sha)], body).into_response()
}

async fn fake_import(
    st: Shared,
    Path(id): Path<Uuid>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(r) = refused(&st, &headers, format!("POST /api/boxes/{id}/import")) {
        return r;
    }
    // Like the real runner: only with the token announced for this box, once;
    // an import it has not heard of yet makes it check in first.
    let deny = |status: StatusCode, code: &str| {
        (
            status,
            axum::Json(ApiError::new(code, format!("fake runner: {code}"))),
        )
            .into_response()
    };
    let Some(token) = headers
        .get(IMPORT_TOKEN_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
    else {
        return deny(StatusCode::BAD_REQUEST, "import_token_required");
    };
    let hash = hex::encode(Sha256::digest(token.as_bytes()));
    let matching = |st: &Shared| {
        st.lock()
            .unwrap()
            .imports
            .iter()
            .find(|g| g.box_id == id && g.token_sha256 == hash)
            .cloned()
    };
    let grant = match matching(&st) {
        Some(g) => Some(g),
        None => {
            st.sync().await;
            matching(&st)
        }
    };
    let Some(grant) = grant else {
        return deny(StatusCode::FORBIDDEN, "import_not_announced");
    };
    {
        let mut s = st.lock().unwrap();
        if s.used_imports.contains(&hash) {
            return deny(StatusCode::FORBIDDEN, "import_token_used");
        }
        s.used_imports.push(hash);
        s.presented.push((token, grant));
    }
    let want = headers
        .get(ARCHIVE_SHA256_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let got = hex::encode(Sha256::digest(&body));
    if want != got {
        return (
            StatusCode::BAD_REQUEST,
            axum::Json(ApiError::new("checksum_mismatch", "archive corrupt")),
        )
            .into_response();
    }
    let nl = body.iter().position(|b| *b == b'\n').unwrap();
    let spec: BoxSpec = serde_json::from_slice(&body[..nl]).unwrap();
    assert_eq!(spec.id, id);
    st.lock().unwrap().boxes.insert(
        id,
        FakeBox {
            spec,
            state: BoxState::Stopped,
            data: body[nl + 1..].to_vec(),
        },
    );
    StatusCode::NO_CONTENT.into_response()
}
