//! Box lifecycle, persistence, and boxes outliving the agent.

mod common;

use std::time::Duration;

use common::{FakeCp, Options, Runner, Ws};
use protocol::{BoxState, ExecControl, ExecStart, RunnerAction};
use runner_image::admin::AdminRequest;

/// SIGKILL the agent while boxes run and an interactive session is open;
/// start it again: every box is still running and re-adopted, exec works,
/// and the session can be attached again with its output intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_sigkill_keeps_boxes_and_sessions() {
    let mut r = Runner::start(Options::default()).await;
    let ids = [
        r.create_box(128, false).await,
        r.create_box(128, false).await,
        r.create_box(128, false).await,
    ];
    for id in &ids {
        r.sh(*id, &format!("echo {id} > /root/marker")).await;
    }
    // An interactive shell with a terminal, left open.
    let (mut ws, session) = Ws::open(
        &r,
        ids[0],
        &ExecStart {
            tty: true,
            rows: Some(30),
            cols: Some(100),
            ..Default::default()
        },
    )
    .await;
    ws.stdin(b"echo before-$((40+2))\n").await;
    assert!(ws.read_until("before-42", Duration::from_secs(10)).await);
    // Something the session prints while nobody is attached must not be lost.
    ws.stdin(b"sleep 1; echo while-detached-$((6*7))\n").await;
    ws.disconnect().await;
    let shims_before: Vec<u32> = r
        .status()
        .await
        .boxes
        .iter()
        .map(|b| b.shim_pid.unwrap())
        .collect();

    r.kill9();
    // Boxes keep running without the agent.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for pid in &shims_before {
        assert!(
            runner_image::sys::process_alive(*pid, None),
            "shim {pid} died with the agent"
        );
    }
    r.spawn().await;

    let h = r.health().await.unwrap().1;
    assert_eq!(h.health.boxes_adopted, 3, "{h:?}");
    assert_eq!(h.health.boxes_running, 3);
    let st = r.status().await;
    assert!(
        st.boxes.iter().all(|b| b.state == BoxState::Running),
        "{st:?}"
    );
    for id in &ids {
        let (out, code) = r.sh(*id, "cat /root/marker").await;
        assert_eq!((out.trim(), code), (id.to_string().as_str(), 0));
    }
    // Attach again: the buffered output is there and the shell still answers.
    let (mut ws, again) = Ws::open(
        &r,
        ids[0],
        &ExecStart {
            attach: Some(session.clone()),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(again, session);
    assert!(
        ws.read_until("while-detached-42", Duration::from_secs(10))
            .await,
        "{}",
        String::from_utf8_lossy(&ws.stdout)
    );
    ws.control(&ExecControl::Resize { rows: 33, cols: 77 })
        .await;
    ws.stdin(b"stty size; exit 7\n").await;
    assert_eq!(ws.exit_code(Duration::from_secs(10)).await, Some(7));
    assert!(String::from_utf8_lossy(&ws.stdout).contains("33 77"));
    // A finished session cannot be attached any more.
    let failed = tokio::spawn({
        let port = r.port;
        async move {
            use tokio_tungstenite::tungstenite::client::IntoClientRequest;
            let mut req = format!("ws://127.0.0.1:{port}/api/boxes/{}/exec/ws", ids[0])
                .into_client_request()
                .unwrap();
            req.headers_mut().insert(
                "authorization",
                format!("Bearer {}", common::KEY).parse().unwrap(),
            );
            let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
            use futures::{SinkExt, StreamExt};
            ws.send(tokio_tungstenite::tungstenite::Message::Text(
                format!(r#"{{"attach":"{session}"}}"#).into(),
            ))
            .await
            .unwrap();
            let m = ws.next().await.unwrap().unwrap();
            m.into_text().unwrap().to_string()
        }
    })
    .await
    .unwrap();
    assert!(failed.contains("\"error\""), "{failed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_start_and_delete_keep_state_until_deleted() {
    let r = Runner::start(Options::default()).await;
    // The same create arriving twice at once (a retried action) builds one box.
    let id = uuid::Uuid::new_v4();
    let create = AdminRequest::Create {
        spec: common::spec(id, 128, false),
    };
    let sock = r.admin_socket();
    let (a, b) = tokio::join!(
        runner_image::admin::call(&sock, &create),
        runner_image::admin::call(&sock, &create)
    );
    a.unwrap();
    b.unwrap();
    assert_eq!(r.status().await.boxes.len(), 1);
    // A different spec under the same id is a conflict.
    let mut other = common::spec(id, 256, false);
    other.network = protocol::NetworkMode::Egress;
    let e = runner_image::admin::call(&r.admin_socket(), &AdminRequest::Create { spec: other })
        .await
        .unwrap_err();
    assert!(format!("{e:#}").contains("different spec"), "{e:#}");
    r.sh(id, "echo kept > /root/data; rm /etc/os-release").await;
    r.admin(AdminRequest::Stop { id }).await;
    let st = r.status().await;
    assert_eq!(st.boxes[0].state, BoxState::Stopped);
    assert!(!r.memory_cgroup(&id).exists(), "cgroup removed on stop");
    // Idempotent.
    r.admin(AdminRequest::Stop { id }).await;
    r.admin(AdminRequest::Start { id }).await;
    r.admin(AdminRequest::Start { id }).await;
    let (out, _) = r.sh(id, "cat /root/data; ls /etc/os-release 2>&1").await;
    assert!(out.contains("kept"), "{out}");
    assert!(
        out.contains("No such file"),
        "deletion of an image file persists: {out}"
    );
    // The box's own environment (spec env) reaches every process.
    let (out, _) = r.sh(id, "echo $BOX_GREETING").await;
    assert_eq!(out.trim(), "hello");
    r.admin(AdminRequest::Delete { id }).await;
    assert!(!r.box_dir(&id).exists());
    assert!(!r.memory_cgroup(&id).exists());
    assert!(r.status().await.boxes.is_empty());
    // Deleting again is fine (level-triggered control plane).
    r.admin(AdminRequest::Delete { id }).await;
}

/// The healthcheck loop against a fake control plane: token, capacity,
/// usage from the boxes' cgroups, actions applied, API key persisted and
/// required by the API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthcheck_reports_and_applies_actions() {
    let cp = FakeCp::start("bxr_secret-token", "cp-issued-key").await;
    let mut r = Runner::start(Options {
        control_plane: Some(cp.url.clone()),
        token: Some("bxr_secret-token".into()),
        no_key: true,
        ..Default::default()
    })
    .await;
    // Before the first healthcheck answer there is no key: the API refuses.
    let id = uuid::Uuid::new_v4();
    let first = cp.wait_for(Duration::from_secs(15), |_| true).await;
    assert_eq!(first.address, r.url());
    assert_eq!(first.version, runner_image::VERSION);
    assert!(first.capacity.cpu_millicores >= 1000);
    assert!(first.capacity.memory_mib > 0 && first.capacity.disk_mib > 0);
    // The runner stores the key once it has the answer, just after the
    // control plane saw the request.
    let key_file = r.state.join("api_key");
    assert!(
        testkit::wait_until(Duration::from_secs(10), || key_file.exists()),
        "the runner never stored its API key"
    );
    assert_eq!(std::fs::read_to_string(&key_file).unwrap(), "cp-issued-key");
    cp.set_actions(vec![RunnerAction::Create {
        spec: common::spec(id, 96, false),
    }]);
    let rep = cp
        .wait_for(Duration::from_secs(30), |h| {
            h.boxes
                .iter()
                .any(|b| b.id == id && b.state == BoxState::Running)
        })
        .await;
    assert_eq!(rep.boxes.len(), 1);
    // Usage comes from the box's cgroup: make it use memory and see it reported.
    let client = reqwest::Client::new();
    let unauth = client
        .post(format!("{}/api/boxes/{id}/exec", r.url()))
        .json(&serde_json::json!({"command": ["true"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(unauth.status(), 401);
    let wrong = client
        .post(format!("{}/api/boxes/{id}/exec", r.url()))
        .bearer_auth("nope")
        .json(&serde_json::json!({"command": ["true"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let body: serde_json::Value = wrong.json().await.unwrap();
    assert_eq!(body["code"], "unauthorized");
    // The control plane's "check in now" needs its key too.
    let sync = |key: Option<&str>| {
        let mut req = client.post(format!("{}/api/sync", r.url()));
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        req.send()
    };
    assert_eq!(sync(None).await.unwrap().status(), 401);
    assert_eq!(sync(Some("cp-issued-key")).await.unwrap().status(), 202);
    let hold = client
        .post(format!("{}/api/boxes/{id}/exec", r.url()))
        .bearer_auth("cp-issued-key")
        .json(&serde_json::json!({
            "command": ["sh", "-c", "head -c 40000000 /dev/zero > /tmp/blob; sleep 3"],
        }))
        .send();
    let watch = cp.wait_for(Duration::from_secs(20), |h| h.usage.memory_mib >= 30);
    let (resp, rep) = tokio::join!(hold, watch);
    assert!(resp.unwrap().status().is_success());
    assert_eq!(rep.usage.memory_mib, rep.boxes[0].usage.memory_mib);
    // Usage is the boxes', not the host's.
    assert!(rep.usage.memory_mib < 96, "{:?}", rep.usage);
    // Stop, then delete, level-triggered.
    cp.set_actions(vec![RunnerAction::Stop { id }]);
    cp.wait_for(Duration::from_secs(20), |h| {
        h.boxes
            .iter()
            .any(|b| b.id == id && b.state == BoxState::Stopped)
    })
    .await;
    cp.set_actions(vec![RunnerAction::Delete { id }]);
    cp.wait_for(Duration::from_secs(20), |h| h.boxes.is_empty())
        .await;
    cp.set_actions(vec![]);
    assert!(!r.box_dir(&id).exists());
    // The key survives a restart; a wrong token is refused by the control plane.
    r.kill9();
    std::fs::write(r.dir.path().join("token"), "bxr_wrong").unwrap();
    r.spawn().await;
    let refused_before = cp.state.lock().unwrap().refused;
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while cp.state.lock().unwrap().refused == refused_before {
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let still = client
        .post(format!("{}/api/boxes/{id}/exec", r.url()))
        .bearer_auth("cp-issued-key")
        .json(&serde_json::json!({"command": ["true"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(still.status(), 404, "authenticated, box gone");
}

/// `boxlite-runner purge` deletes every box (processes gone) and the agent
/// takes no new ones, even while the control plane keeps asking for them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_deletes_every_box_and_takes_no_new_ones() {
    let cp = FakeCp::start("bxr_purge-token", "cp-key").await;
    let r = Runner::start(Options {
        control_plane: Some(cp.url.clone()),
        token: Some("bxr_purge-token".into()),
        ..Default::default()
    })
    .await;
    let id = uuid::Uuid::new_v4();
    // The control plane wants this box on the runner, now and after the purge.
    cp.set_actions(vec![RunnerAction::Create {
        spec: common::spec(id, 96, false),
    }]);
    cp.wait_for(Duration::from_secs(30), |h| {
        h.boxes
            .iter()
            .any(|b| b.id == id && b.state == BoxState::Running)
    })
    .await;
    let local = r.create_box(96, false).await;
    let shims: Vec<u32> = r
        .status()
        .await
        .boxes
        .iter()
        .filter_map(|b| b.shim_pid)
        .collect();
    assert_eq!(shims.len(), 2);

    let out = std::process::Command::new(common::bin())
        .args(["--config"])
        .arg(&r.config)
        .arg("purge")
        .current_dir(r.dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "deleted 2 box(es); the runner takes no new ones"
    );
    assert!(r.status().await.boxes.is_empty());
    for pid in shims {
        assert!(
            testkit::wait_until(Duration::from_secs(10), || !std::path::Path::new(&format!(
                "/proc/{pid}"
            ))
            .exists()),
            "shim {pid} still runs"
        );
    }
    assert!(!r.box_dir(&id).exists() && !r.box_dir(&local).exists());
    // The runner's own cgroup directories go too.
    let memory_parent = r.memory_cgroup(&id).parent().unwrap().to_path_buf();
    assert!(
        !memory_parent.exists(),
        "{} left behind",
        memory_parent.display()
    );
    // Several healthchecks later, the box the control plane still asks for is not back.
    let seen = cp.state.lock().unwrap().requests.len();
    cp.wait_for(Duration::from_secs(30), |_| {
        cp.state.lock().unwrap().requests.len() >= seen + 3
    })
    .await;
    assert!(r.status().await.boxes.is_empty());
    assert!(cp.last().unwrap().boxes.is_empty());
}

/// Issue 12, finding 9: `GET /api/health` tells a caller without the
/// runner's key only that it is alive — no name, version, box counts, binary
/// checksum or pid. The key holder gets it all. (A degraded runner answers
/// 503 `{"status":"degraded"}`: the upgrade tests' unhealthy release.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_tells_strangers_only_that_the_runner_is_alive() {
    let r = Runner::start(Options::default()).await;
    let id = r.create_box(96, false).await;
    for key in [None, Some("wrong-key"), Some("")] {
        let (s, body) = r.public_health(key).await.unwrap();
        assert_eq!(s, 200);
        assert_eq!(body, serde_json::json!({ "status": "ok" }), "key {key:?}");
    }
    // The control plane's key (and the local tools that read it) see everything.
    let (s, full) = r.public_health(Some(common::KEY)).await.unwrap();
    assert_eq!(s, 200);
    assert_eq!(full["name"], r.name.as_str(), "{full}");
    assert_eq!(full["version"], runner_image::VERSION);
    assert_eq!(full["boxes_running"], 1);
    assert_eq!(full["pid"].as_u64(), Some(u64::from(r.pid())));
    assert!(r.status().await.boxes.iter().any(|b| b.id == id));
    assert!(full["binary_sha256"].is_string() || full["binary_sha256"].is_null());
    assert!(full["boxes_adopted"].is_u64() && full["uptime_secs"].is_u64());
}

/// Issue 12: a key captured by whoever answered on the runner's port while
/// the agent was down is useless once the agent is back. Every agent process
/// (a restart, a re-exec) reports a new `agent_instance`, the control plane
/// hands out a new key, and the runner accepts only that one — also for a
/// request that arrives before the new process's first check-in finished.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_captured_key_is_useless_once_the_agent_restarts() {
    let cp = FakeCp::start_rotating("bxr_rotate-token", "cp-key").await;
    let mut r = Runner::start(Options {
        control_plane: Some(cp.url.clone()),
        token: Some("bxr_rotate-token".into()),
        no_key: true,
        ..Default::default()
    })
    .await;
    let key_file = r.state.join("api_key");
    let holds = |k: &str| std::fs::read_to_string(&key_file).is_ok_and(|f| f == k);
    assert!(
        testkit::wait_until(Duration::from_secs(15), || holds("cp-key-1")),
        "first key never arrived: {:?}",
        cp.state.lock().unwrap().keys
    );
    let client = reqwest::Client::new();
    let url = format!("{}/api/sync", r.url());
    let sync = |key: &str| {
        let req = client.post(&url).bearer_auth(key).send();
        async move { req.await.unwrap().status().as_u16() }
    };
    assert_eq!(sync("cp-key-1").await, 202);
    // Check-ins of one process keep its key.
    let first = cp
        .last()
        .unwrap()
        .agent_instance
        .expect("agent_instance sent");
    cp.wait_for(Duration::from_secs(15), |_| true).await;
    while cp.state.lock().unwrap().requests.len() < 3 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(cp.state.lock().unwrap().keys, vec!["cp-key-1"]);

    // `cp-key-1` is captured; the agent restarts.
    r.kill9();
    r.spawn().await;
    // Straight away, while its first check-in may still be under way: refused.
    assert_eq!(sync("cp-key-1").await, 401);
    assert_eq!(cp.key(), "cp-key-2");
    assert_eq!(sync("cp-key-2").await, 202);
    assert_ne!(cp.last().unwrap().agent_instance.unwrap(), first);
    assert!(holds("cp-key-2"));
    // The full health body is for the current key only.
    assert_eq!(
        r.public_health(Some("cp-key-1")).await.unwrap().1,
        serde_json::json!({ "status": "ok" })
    );

    // A re-exec (how an upgrade restarts the agent without a service manager)
    // is a new process too.
    r.admin(AdminRequest::Reexec).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while cp.state.lock().unwrap().keys.len() < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "no new key after re-exec"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    r.wait_healthy(Duration::from_secs(30)).await;
    assert_eq!(sync("cp-key-2").await, 401);
    assert_eq!(sync("cp-key-3").await, 202);
}

/// The inode of the socket listening on `port` that process `pid` holds.
fn listening_inode(pid: u32, port: u16) -> Option<u64> {
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let want = format!(":{port:04X}");
    let inode = table.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(1)?.ends_with(&want) && f.get(3)? == &"0A").then(|| f.get(9)?.parse::<u64>().ok())?
    })?;
    let held = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()?
        .flatten()
        .any(|e| {
            std::fs::read_link(e.path())
                .is_ok_and(|t| t.to_string_lossy() == format!("socket:[{inode}]"))
        });
    held.then_some(inode)
}

/// Issue 12: the runner's API port is never closed while the agent
/// re-executes (how it restarts without a service manager): the new image
/// serves on the very socket the old one listened on, so no connection is
/// refused meanwhile and no other process can take the port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_socket_survives_a_reexec() {
    let mut r = Runner::start(Options::default()).await;
    let pid = r.pid();
    let before = listening_inode(pid, r.port).expect("the agent holds its listening socket");
    let port = r.port;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let hammer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut ok, mut refused) = (0u32, 0u32);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match std::net::TcpStream::connect(("127.0.0.1", port)) {
                    Ok(_) => ok += 1,
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => refused += 1,
                    Err(_) => {}
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            (ok, refused)
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    r.admin(AdminRequest::Reexec).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !r
        .log_text()
        .contains("serving on the API socket from the previous image")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no re-exec:\n{}",
            r.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    r.wait_healthy(Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, refused) = hammer.join().unwrap();
    assert_eq!(r.pid(), pid);
    assert_eq!(
        listening_inode(pid, r.port),
        Some(before),
        "the same socket"
    );
    assert!(ok > 50, "{ok} connections");
    assert_eq!(refused, 0, "connections refused during the re-exec");
}
