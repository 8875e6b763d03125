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
        runner_image::network::teardown(&self.state);
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

/// A stand-in for the internet: a network namespace of the test's own,
/// routed from the host through a veth pair, holding a public-looking
/// address (TEST-NET-2) and a private one (10.199.x.1), with an HTTP server
/// on port 8080 of every address (it answers with the address it was
/// reached at) and a UDP echo on port 53 (standing in for a resolver).
pub struct Internet {
    name: String,
    /// The namespace's public address.
    pub addr: std::net::Ipv4Addr,
    /// The host's end of the link.
    pub host_addr: std::net::Ipv4Addr,
    /// A private (RFC 1918) address of the namespace, routed from the host.
    pub private_addr: std::net::Ipv4Addr,
    stop: Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

fn ip(args: &str) {
    let st = Command::new("ip")
        .args(args.split_whitespace())
        .status()
        .unwrap();
    assert!(st.success(), "ip {args}");
}

impl Internet {
    /// Create the namespace, its link and routes, and start the servers.
    pub fn start() -> Internet {
        let _lock =
            runner_image::sys::lock_wait(Path::new("/tmp/boxlite-test-internet.lock")).unwrap();
        let routes = String::from_utf8(
            Command::new("ip")
                .args(["-4", "route", "show", "table", "all"])
                .output()
                .unwrap()
                .stdout,
        )
        .unwrap();
        let k = (0..64u8)
            .find(|k| {
                !routes.contains(&format!("198.51.100.{} ", k * 4 + 2))
                    && !routes.contains(&format!("198.51.100.{}/30", k * 4))
            })
            .expect("a free /30 in 198.51.100.0/24");
        let name = format!("bxt-inet-{}-{k}", std::process::id());
        let host_if = format!("bxti{}x{k}", std::process::id() % 100_000);
        let host_addr = std::net::Ipv4Addr::new(198, 51, 100, k * 4 + 1);
        let addr = std::net::Ipv4Addr::new(198, 51, 100, k * 4 + 2);
        let private_addr = std::net::Ipv4Addr::new(10, 199, k, 1);
        ip(&format!("netns add {name}"));
        ip(&format!(
            "link add {host_if} type veth peer name eth0 netns {name}"
        ));
        ip(&format!("addr add {host_addr}/30 dev {host_if}"));
        ip(&format!("link set {host_if} up"));
        ip(&format!("-n {name} addr add {addr}/30 dev eth0"));
        ip(&format!("-n {name} addr add {private_addr}/32 dev eth0"));
        ip(&format!("-n {name} link set eth0 up"));
        ip(&format!("-n {name} link set lo up"));
        ip(&format!("-n {name} route add default via {host_addr}"));
        ip(&format!("route add {private_addr}/32 via {addr}"));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut threads = Vec::new();
        for udp in [false, true] {
            let (stop, ns) = (stop.clone(), format!("/run/netns/{name}"));
            threads.push(std::thread::spawn(move || {
                use std::os::fd::AsRawFd;
                let f = std::fs::File::open(&ns).unwrap();
                assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
                if udp {
                    let s = std::net::UdpSocket::bind("0.0.0.0:53").unwrap();
                    s.set_read_timeout(Some(Duration::from_millis(100)))
                        .unwrap();
                    let mut buf = [0u8; 512];
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        if let Ok((n, from)) = s.recv_from(&mut buf) {
                            let mut reply = b"dns-echo:".to_vec();
                            reply.extend_from_slice(&buf[..n]);
                            let _ = s.send_to(&reply, from);
                        }
                    }
                } else {
                    let l = std::net::TcpListener::bind("0.0.0.0:8080").unwrap();
                    l.set_nonblocking(true).unwrap();
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        match l.accept() {
                            Ok((mut c, _)) => {
                                use std::io::{Read, Write};
                                c.set_nonblocking(false).unwrap();
                                c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                                let mut buf = [0u8; 1024];
                                let _ = c.read(&mut buf);
                                let body = format!("internet:{}", c.local_addr().unwrap().ip());
                                let _ = c.write_all(
                                    format!(
                                        "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                                        body.len()
                                    )
                                    .as_bytes(),
                                );
                            }
                            Err(_) => std::thread::sleep(Duration::from_millis(10)),
                        }
                    }
                }
            }));
        }
        Internet {
            name,
            addr,
            host_addr,
            private_addr,
            stop,
            threads,
        }
    }
}

impl Drop for Internet {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let _ = Command::new("ip")
            .args(["route", "del", &format!("{}/32", self.private_addr)])
            .status();
        // The veth pair goes with the namespace.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A file of stopped box `id`'s writable layer (`rel` below `upper/`), read
/// from its disk (mounted privately for the read).
pub fn read_in_disk(r: &Runner, id: &Uuid, rel: &str) -> Option<Vec<u8>> {
    let rel = rel.to_string();
    runner_image::disk::with_mounted(
        &runner_image::disk::image_path(&r.box_dir(id)),
        &r.state.join("tmp"),
        true,
        move |m| Ok(std::fs::read(m.join("upper").join(rel)).ok()),
    )
    .unwrap()
}

impl Runner {
    /// Where running box `id`'s writable layer is (inside its shim's mount namespace).
    pub async fn upper(&self, id: &Uuid) -> PathBuf {
        let st = self.status().await;
        let pid = st
            .boxes
            .iter()
            .find(|b| b.id == *id)
            .and_then(|b| b.shim_pid)
            .expect("the box runs");
        runner_image::disk::running_upper(pid)
    }
}

/// The id range recorded for box `id`.
pub fn box_ids(r: &Runner, id: &Uuid) -> runner_image::ids::IdRange {
    let rec: runner_image::boxes::BoxRecord =
        serde_json::from_slice(&std::fs::read(r.box_dir(id).join("box.json")).unwrap()).unwrap();
    rec.ids.expect("the box has an id range")
}

/// A box spec with the default image (`network`: egress when true, else none).
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
        network: if network {
            protocol::NetworkMode::Egress
        } else {
            protocol::NetworkMode::None
        },
        egress_allow: vec![],
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

/// A static probe for the escape tests, run inside boxes:
/// - `probe abstract NAME`: connect to the abstract unix socket `@NAME`;
/// - `probe socket FAMILY`: create a socket of that family number;
/// - `probe udp ADDR PORT TEXT`: send TEXT, print the answer (2 s timeout);
/// - `probe inotify N`: create up to N inotify instances, print how many worked;
/// - `probe nofile`: open /dev/null until it fails, print how many and why.
pub const PROBE_SOURCE: &str = r#"
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <fcntl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/time.h>
#include <sys/inotify.h>
#include <netinet/in.h>
#include <arpa/inet.h>
int main(int argc, char **argv) {
    if (argc >= 3 && !strcmp(argv[1], "abstract")) {
        int s = socket(AF_UNIX, SOCK_STREAM, 0);
        struct sockaddr_un a; memset(&a, 0, sizeof a); a.sun_family = AF_UNIX;
        size_t n = strlen(argv[2]); memcpy(a.sun_path + 1, argv[2], n);
        if (connect(s, (struct sockaddr *)&a, sizeof(sa_family_t) + 1 + n) == 0) { puts("abstract=connected"); return 0; }
        printf("abstract=refused %s\n", strerror(errno)); return 1;
    }
    if (argc >= 3 && !strcmp(argv[1], "socket")) {
        int types[] = { SOCK_STREAM, SOCK_DGRAM, SOCK_RAW, SOCK_SEQPACKET };
        for (int i = 0; i < 4; i++) {
            int s = socket(atoi(argv[2]), types[i], 0);
            if (s >= 0) { printf("socket=created type %d\n", types[i]); return 0; }
            printf("socket=refused %s\n", strerror(errno));
        }
        return 1;
    }
    if (argc >= 5 && !strcmp(argv[1], "udp")) {
        int s = socket(AF_INET, SOCK_DGRAM, 0);
        struct timeval tv = { 2, 0 }; setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        struct sockaddr_in a; memset(&a, 0, sizeof a); a.sin_family = AF_INET;
        a.sin_port = htons(atoi(argv[3])); inet_pton(AF_INET, argv[2], &a.sin_addr);
        sendto(s, argv[4], strlen(argv[4]), 0, (struct sockaddr *)&a, sizeof a);
        char buf[600]; ssize_t n = recv(s, buf, sizeof buf - 1, 0);
        if (n < 0) { printf("udp=no-answer %s\n", strerror(errno)); return 1; }
        buf[n] = 0; printf("udp=%s\n", buf); return 0;
    }
    if (argc >= 3 && !strcmp(argv[1], "inotify")) {
        int want = atoi(argv[2]), got = 0;
        for (; got < want; got++) if (inotify_init1(IN_CLOEXEC) < 0) break;
        printf("inotify=%d %s\n", got, got < want ? strerror(errno) : "ok");
        fflush(stdout);
        if (argc >= 4) sleep(atoi(argv[3]));
        return 0;
    }
    if (argc >= 2 && !strcmp(argv[1], "nofile")) {
        int n = 0;
        while (open("/dev/null", O_RDONLY) >= 0) n++;
        printf("nofile=%d %s\n", n, strerror(errno));
        return 0;
    }
    fputs("usage: probe abstract|socket|udp|inotify|nofile ...\n", stderr);
    return 2;
}
"#;

/// An OCI layout with busybox (as `/bin/busybox`, `/bin/sh`) and the given
/// extra files (path, bytes, mode), written to `out`.
pub fn busybox_image_with(out: &Path, extra: &[(&str, Vec<u8>, u32)]) {
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |path: &str, data: &[u8], mode: u32| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(mode);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, path, data).unwrap();
    };
    add(
        "bin/busybox",
        &std::fs::read("/bin/busybox").unwrap(),
        0o755,
    );
    for (path, data, mode) in extra {
        add(path, data, *mode);
    }
    for applet in [
        "sh", "wget", "ip", "cat", "echo", "sleep", "timeout", "grep", "ls", "id", "awk", "mkdir",
        "tr", "wc", "ps", "head",
    ] {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        h.set_mode(0o777);
        b.append_link(&mut h, format!("bin/{applet}"), "busybox")
            .unwrap();
    }
    let layer = b.into_inner().unwrap();
    runner_image::images::write_oci_layout(out, &[layer], &["PATH=/bin"]).unwrap();
}

impl Runner {
    /// Import an OCI layout as image `name` (the agent is restarted around it).
    pub async fn import_image(&mut self, name: &str, layout: &Path) {
        self.kill9();
        let st = Command::new(bin())
            .args(["image", "import", name])
            .arg(layout)
            .arg("--config")
            .arg(&self.config)
            .current_dir(self.dir.path())
            .status()
            .unwrap();
        assert!(st.success(), "image import {name}");
        self.spawn().await;
    }

    /// Create (and start) a box from a full spec; the error's text when refused.
    pub async fn try_create(&self, spec: BoxSpec) -> Result<(), String> {
        runner_image::admin::call(&self.admin_socket(), &AdminRequest::Create { spec })
            .await
            .map(|_| ())
            .map_err(|e| format!("{e:#}"))
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
