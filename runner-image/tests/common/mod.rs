//! Test harness: a real `boxlite-runner` process on a free port with its
//! state in a temporary directory, a fake control plane (a test double of
//! the other team's component), and exec clients. Everything a test starts
//! — agent, shims, boxes, cgroups, files — is removed when the guard drops,
//! also when the test fails.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use protocol::{
    BoxSpec, ExecControl, ExecEvent, ExecRequest, ExecResponse, ExecStart, HealthcheckRequest,
    HealthcheckResponse, ImportGrant, Resources, RunnerAction, RunnerState,
};
use runner_image::admin::{AdminClient, AdminRequest, AdminStatus};
use runner_image::api::HealthBody;
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

/// The binary under test.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_boxlite-runner"))
}

/// API key seeded into runners that do not talk to a control plane.
pub const KEY: &str = "test-api-key-0123456789";

/// Options for [`Runner::start`].
#[derive(Clone, Default)]
pub struct Options {
    /// Control plane URL (default: nothing listens there).
    pub control_plane: Option<String>,
    /// Runner token written to the token file.
    pub token: Option<String>,
    /// Extra config lines.
    pub extra: String,
    /// Do not seed an API key (the control plane must provide one).
    pub no_key: bool,
    /// Extra environment for the agent.
    pub env: Vec<(String, String)>,
}

/// A running agent with its own stage directory.
pub struct Runner {
    pub dir: tempfile::TempDir,
    pub name: String,
    pub port: u16,
    pub config: PathBuf,
    pub state: PathBuf,
    pub log: PathBuf,
    opts: Options,
    child: Option<Child>,
}

impl Runner {
    /// Start an agent and wait until it serves.
    pub async fn start(opts: Options) -> Runner {
        let dir = tempfile::Builder::new()
            .prefix("boxlite-runner-test-")
            .tempdir()
            .unwrap();
        let name = format!("t-{:08x}", rand::random::<u32>());
        let port = testkit::free_port();
        let state = dir.path().join("state");
        std::fs::write(
            dir.path().join("token"),
            opts.token.clone().unwrap_or_else(|| "bxr_test".into()),
        )
        .unwrap();
        let cp = opts
            .control_plane
            .clone()
            .unwrap_or_else(|| format!("http://127.0.0.1:{}", testkit::free_port()));
        let config = dir.path().join("runner.toml");
        std::fs::write(
            &config,
            format!(
                "name = \"{name}\"\nlisten = \"127.0.0.1:{port}\"\nadvertise_url = \"http://127.0.0.1:{port}\"\n\
                 control_plane_url = \"{cp}\"\ntoken_file = \"token\"\nstate_dir = \"state\"\n{}\n",
                opts.extra
            ),
        )
        .unwrap();
        if !opts.no_key {
            std::fs::create_dir_all(&state).unwrap();
            std::fs::write(state.join("api_key"), KEY).unwrap();
        }
        let log = dir.path().join("agent.log");
        let mut r = Runner {
            dir,
            name,
            port,
            config,
            state,
            log,
            opts,
            child: None,
        };
        r.spawn().await;
        r
    }

    /// Start the agent process again (after a kill).
    pub async fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut cmd = Command::new(bin());
        cmd.arg("--config")
            .arg(&self.config)
            .current_dir(self.dir.path())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        for (k, v) in &self.opts.env {
            cmd.env(k, v);
        }
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        self.child = Some(cmd.spawn().unwrap());
        self.wait_healthy(Duration::from_secs(60)).await;
    }

    /// Wait until `GET /api/health` answers 200 (no key needed for that).
    pub async fn wait_healthy(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok((s, _)) = self.public_health(None).await
                && s.is_success()
            {
                return;
            }
            if let Some(c) = &mut self.child
                && let Ok(Some(st)) = c.try_wait()
            {
                panic!("agent exited ({st}):\n{}", self.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "agent not healthy:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The agent log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Base URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The bearer key the agent holds: the one in its state directory (the
    /// seeded [`KEY`], or what the control plane handed out).
    pub fn key(&self) -> String {
        std::fs::read_to_string(self.state.join("api_key"))
            .map(|k| k.trim().to_string())
            .unwrap_or_else(|_| KEY.to_string())
    }

    /// `GET /api/health` with the agent's key: the full body.
    pub async fn health(&self) -> anyhow::Result<(reqwest::StatusCode, HealthBody)> {
        let r = reqwest::Client::new()
            .get(format!("{}/api/health", self.url()))
            .bearer_auth(self.key())
            .timeout(Duration::from_secs(3))
            .send()
            .await?;
        let s = r.status();
        Ok((s, r.json().await?))
    }

    /// `GET /api/health` with `key` (or none): the raw body.
    pub async fn public_health(
        &self,
        key: Option<&str>,
    ) -> anyhow::Result<(reqwest::StatusCode, serde_json::Value)> {
        let mut req = reqwest::Client::new()
            .get(format!("{}/api/health", self.url()))
            .timeout(Duration::from_secs(3));
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        let r = req.send().await?;
        let s = r.status();
        Ok((s, r.json().await?))
    }

    /// Pid of the agent process.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// SIGKILL the agent.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The admin socket.
    pub fn admin_socket(&self) -> PathBuf {
        self.state.join("admin.sock")
    }

    /// Admin status.
    pub async fn status(&self) -> AdminStatus {
        AdminClient::connect(&self.admin_socket())
            .await
            .unwrap()
            .status()
            .await
            .unwrap()
    }

    /// An admin request that must succeed.
    pub async fn admin(&self, req: AdminRequest) {
        runner_image::admin::call(&self.admin_socket(), &req)
            .await
            .unwrap_or_else(|e| panic!("{req:?}: {e:#}\n{}", self.log_text()));
    }

    /// Create (and start) a box with the default image.
    pub async fn create_box(&self, memory_mib: u64, network: bool) -> Uuid {
        let id = Uuid::new_v4();
        self.admin(AdminRequest::Create {
            spec: spec(id, memory_mib, network),
        })
        .await;
        id
    }

    /// One-shot exec; panics on HTTP failure.
    pub async fn exec(&self, id: Uuid, cmd: &[&str]) -> ExecResponse {
        self.exec_req(
            id,
            ExecRequest {
                command: cmd.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            },
        )
        .await
    }

    /// One-shot exec with a full request.
    pub async fn exec_req(&self, id: Uuid, req: ExecRequest) -> ExecResponse {
        let r = reqwest::Client::new()
            .post(format!("{}/api/boxes/{id}/exec", self.url()))
            .bearer_auth(KEY)
            .json(&req)
            .timeout(Duration::from_secs(120))
            .send()
            .await
            .unwrap();
        let status = r.status();
        let body = r.text().await.unwrap();
        assert!(status.is_success(), "exec {req:?}: {status} {body}");
        serde_json::from_str(&body).unwrap()
    }

    /// Shell command in a box; returns (stdout, exit code).
    pub async fn sh(&self, id: Uuid, script: &str) -> (String, i32) {
        let r = self.exec(id, &["sh", "-c", script]).await;
        (r.stdout, r.exit_code)
    }

    /// Directory of one box.
    pub fn box_dir(&self, id: &Uuid) -> PathBuf {
        self.state.join("boxes").join(id.to_string())
    }

    /// cgroup v1 directories of this runner (memory hierarchy).
    pub fn memory_cgroup(&self, id: &Uuid) -> PathBuf {
        PathBuf::from(format!("/sys/fs/cgroup/memory/boxlite/{}/{id}", self.name))
    }
}

impl Drop for Runner {
    fn drop(&mut self) {
        self.kill9();
        cleanup_processes(&self.state);
        cleanup_cgroups(&self.name);
    }
}

/// SIGKILL every process started from this state directory (agent after re-exec, shims).
pub fn cleanup_processes(state: &Path) {
    let marker = state.to_string_lossy().into_owned();
    for _ in 0..50 {
        let mut found = false;
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                continue;
            };
            if String::from_utf8_lossy(&cmd).contains(&marker) {
                unsafe { libc::kill(pid, libc::SIGKILL) };
                found = true;
            }
        }
        if !found {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Remove the runner's cgroups in every v1 hierarchy.
pub fn cleanup_cgroups(name: &str) {
    for ctrl in ["memory", "cpu", "cpuacct", "pids", "freezer"] {
        let base = PathBuf::from(format!("/sys/fs/cgroup/{ctrl}/boxlite/{name}"));
        if let Ok(rd) = std::fs::read_dir(&base) {
            for e in rd.flatten() {
                if e.path().is_dir() {
                    for _ in 0..100 {
                        if std::fs::remove_dir(e.path()).is_ok() || !e.path().exists() {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
            }
        }
        let _ = std::fs::remove_dir(&base);
    }
}

/// A box spec with the default image.
pub fn spec(id: Uuid, memory_mib: u64, network: bool) -> BoxSpec {
    BoxSpec {
        id,
        image: "default".into(),
        resources: Resources {
            cpu_millicores: 1000,
            memory_mib,
            disk_mib: 1024,
        },
        env: BTreeMap::from([("BOX_GREETING".to_string(), "hello".to_string())]),
        network,
    }
}

/// An exec WebSocket client.
pub struct Ws {
    ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl Ws {
    /// Connect and send `start`; returns the client and the session id.
    pub async fn open(runner: &Runner, id: Uuid, start: &ExecStart) -> (Ws, String) {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let mut req = format!("ws://127.0.0.1:{}/api/boxes/{id}/exec/ws", runner.port)
            .into_client_request()
            .unwrap();
        req.headers_mut()
            .insert("authorization", format!("Bearer {KEY}").parse().unwrap());
        let (ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
        let mut c = Ws {
            ws,
            stdout: vec![],
            stderr: vec![],
        };
        c.ws.send(Message::Text(serde_json::to_string(start).unwrap().into()))
            .await
            .unwrap();
        match c.next_event(Duration::from_secs(10)).await {
            Some(ExecEvent::Started { session }) => (c, session),
            other => panic!("expected Started, got {other:?}"),
        }
    }

    /// Read frames (collecting output) until a text event arrives.
    pub async fn next_event(&mut self, timeout: Duration) -> Option<ExecEvent> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let m = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .ok()??;
            match m.ok()? {
                Message::Text(t) => return serde_json::from_str(t.as_str()).ok(),
                Message::Binary(b) if !b.is_empty() => match b[0] {
                    1 => self.stdout.extend_from_slice(&b[1..]),
                    2 => self.stderr.extend_from_slice(&b[1..]),
                    _ => {}
                },
                Message::Close(_) => return None,
                _ => {}
            }
        }
    }

    /// Read until stdout contains `needle`.
    pub async fn read_until(&mut self, needle: &str, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while !String::from_utf8_lossy(&self.stdout).contains(needle) {
            let Ok(Some(Ok(m))) = tokio::time::timeout_at(deadline, self.ws.next()).await else {
                return false;
            };
            if let Message::Binary(b) = m
                && !b.is_empty()
            {
                match b[0] {
                    1 => self.stdout.extend_from_slice(&b[1..]),
                    2 => self.stderr.extend_from_slice(&b[1..]),
                    _ => {}
                }
            }
        }
        true
    }

    /// Send stdin bytes.
    pub async fn stdin(&mut self, data: &[u8]) {
        self.ws
            .send(Message::Binary(data.to_vec().into()))
            .await
            .unwrap();
    }

    /// Send a control message.
    pub async fn control(&mut self, c: &ExecControl) {
        self.ws
            .send(Message::Text(serde_json::to_string(c).unwrap().into()))
            .await
            .unwrap();
    }

    /// Send stdin bytes then EOF, ignoring a connection the server already
    /// closed (the process may have exited first).
    pub async fn try_stdin_then_eof(&mut self, data: &[u8]) {
        let _ = self.ws.send(Message::Binary(data.to_vec().into())).await;
        let eof = serde_json::to_string(&ExecControl::StdinEof).unwrap();
        let _ = self.ws.send(Message::Text(eof.into())).await;
    }

    /// Wait for the exit code.
    pub async fn exit_code(&mut self, timeout: Duration) -> Option<i32> {
        match self.next_event(timeout).await {
            Some(ExecEvent::Exit { code }) => Some(code),
            _ => None,
        }
    }

    /// Drop the connection without closing the session.
    pub async fn disconnect(mut self) {
        let _ = self.ws.close(None).await;
    }
}

/// What the fake control plane saw and will answer.
#[derive(Default)]
pub struct CpState {
    /// Healthcheck bodies received (authenticated ones).
    pub requests: Vec<HealthcheckRequest>,
    /// Requests refused for a wrong token.
    pub refused: u32,
    /// Actions sent with every answer (level-triggered, like the real one).
    pub actions: Vec<RunnerAction>,
    /// The key handed out.
    pub api_key: String,
    /// Like the real control plane: a new key whenever another agent process
    /// (`agent_instance`) checks in.
    pub rotate: bool,
    /// The last `agent_instance` seen.
    pub instance: Option<String>,
    /// Keys handed out so far, oldest first.
    pub keys: Vec<String>,
    /// Imports announced with every answer.
    pub imports: Vec<ImportGrant>,
}

/// A fake control plane on 127.0.0.1: answers healthchecks.
pub struct FakeCp {
    pub url: String,
    pub token: String,
    pub api_key: String,
    pub state: Arc<Mutex<CpState>>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeCp {
    /// Start it, handing out `api_key` for good.
    pub async fn start(token: &str, api_key: &str) -> FakeCp {
        Self::start_with(token, api_key, false).await
    }

    /// Start it, handing out `{api_key}-N`, a new N for every new agent process.
    pub async fn start_rotating(token: &str, api_key: &str) -> FakeCp {
        Self::start_with(token, api_key, true).await
    }

    async fn start_with(token: &str, api_key: &str, rotate: bool) -> FakeCp {
        let state = Arc::new(Mutex::new(CpState {
            api_key: api_key.to_string(),
            rotate,
            ..Default::default()
        }));
        let (st, tok, base) = (state.clone(), token.to_string(), api_key.to_string());
        let app = axum::Router::new().route(
            "/api/runners/healthcheck",
            axum::routing::post(
                move |headers: axum::http::HeaderMap, body: axum::Json<HealthcheckRequest>| {
                    let st = st.clone();
                    let tok = tok.clone();
                    let base = base.clone();
                    async move {
                        let ok = headers.get("authorization").and_then(|v| v.to_str().ok())
                            == Some(format!("Bearer {tok}").as_str());
                        let mut s = st.lock().unwrap();
                        if !ok {
                            s.refused += 1;
                            return Err(axum::http::StatusCode::UNAUTHORIZED);
                        }
                        if s.rotate
                            && body.agent_instance.is_some()
                            && body.agent_instance != s.instance
                        {
                            s.instance = body.agent_instance.clone();
                            s.api_key = format!("{base}-{}", s.keys.len() + 1);
                            let k = s.api_key.clone();
                            s.keys.push(k);
                        }
                        s.requests.push(body.0);
                        Ok(axum::Json(HealthcheckResponse {
                            state: RunnerState::Ready,
                            actions: s.actions.clone(),
                            api_key: s.api_key.clone(),
                            interval_secs: 1,
                            imports: s.imports.clone(),
                        }))
                    }
                },
            ),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeCp {
            url,
            token: token.into(),
            api_key: api_key.into(),
            state,
            task,
        }
    }

    /// The key it hands out now.
    pub fn key(&self) -> String {
        self.state.lock().unwrap().api_key.clone()
    }

    /// Announce an import of `box_id` with a fresh one-time token valid for
    /// `ttl` (negative: already expired), replacing any earlier one for the box;
    /// the token.
    pub fn announce_import(&self, box_id: Uuid, ttl: time::Duration) -> String {
        use sha2::Digest;
        let token = format!("bxi_test-{:032x}", rand::random::<u128>());
        let mut s = self.state.lock().unwrap();
        s.imports.retain(|g| g.box_id != box_id);
        s.imports.push(ImportGrant {
            box_id,
            token_sha256: hex::encode(sha2::Sha256::digest(token.as_bytes())),
            expires_at: time::OffsetDateTime::now_utc() + ttl,
        });
        token
    }

    /// Replace the standing actions.
    pub fn set_actions(&self, a: Vec<RunnerAction>) {
        self.state.lock().unwrap().actions = a;
    }

    /// The latest healthcheck body.
    pub fn last(&self) -> Option<HealthcheckRequest> {
        self.state.lock().unwrap().requests.last().cloned()
    }

    /// Wait until a healthcheck satisfies `pred`.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        pred: impl Fn(&HealthcheckRequest) -> bool,
    ) -> HealthcheckRequest {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(r) = self.last()
                && pred(&r)
            {
                return r;
            }
            assert!(
                Instant::now() < deadline,
                "no matching healthcheck; last: {:?}",
                self.last()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for FakeCp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Build a static probe program from C source (the default image has no compiler).
pub fn build_static(dir: &Path, name: &str, source: &str) -> PathBuf {
    let src = dir.join(format!("{name}.c"));
    let out = dir.join(name);
    std::fs::write(&src, source).unwrap();
    let st = Command::new("gcc")
        .args(["-static", "-O1", "-o"])
        .arg(&out)
        .arg(&src)
        .status()
        .expect("gcc is needed to build the static probe used by this test");
    assert!(st.success(), "compiling {name}");
    out
}
