//! Exec: one-shot over HTTP and interactive over WebSocket.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{Options, Runner, Ws};
use protocol::{ExecControl, ExecRequest, ExecResponse, ExecStart, OutputEncoding};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_shot_exec_streams_codes_stdin_env_cwd_and_timeout() {
    let r = Runner::start(Options::default()).await;
    let id = r.create_box(128, false).await;
    let res = r
        .exec_req(
            id,
            ExecRequest {
                command: vec![
                    "sh".into(),
                    "-c".into(),
                    "pwd; echo $FOO; cat; echo oops >&2; exit 42".into(),
                ],
                env: BTreeMap::from([("FOO".into(), "bar baz".into())]),
                cwd: Some("/tmp".into()),
                stdin: Some("from-stdin\n".into()),
                timeout_secs: None,
                max_output_bytes: None,
            },
        )
        .await;
    assert_eq!(res.exit_code, 42);
    assert_eq!(res.stdout, "/tmp\nbar baz\nfrom-stdin\n");
    assert_eq!(res.stderr, "oops\n");
    assert!(!res.timed_out);
    // Default working directory is $HOME; the environment is the box's, not the host's.
    let (out, _) = r.sh(id, "pwd; echo $HOME; env | sort").await;
    assert!(out.starts_with("/root\n/root\n"), "{out}");
    assert!(!out.contains("CARGO") && !out.contains("RUST_LOG"), "{out}");
    // Not through a shell; missing programs answer like a shell would.
    let res = r.exec(id, &["no-such-program", "x"]).await;
    assert_eq!(res.exit_code, 127, "{res:?}");
    assert!(res.stderr.contains("not found"), "{res:?}");
    let res = r.exec(id, &["/etc/passwd"]).await;
    assert_eq!(res.exit_code, 126, "{res:?}");
    // The timeout kills the process (and its children) and says so.
    let t0 = std::time::Instant::now();
    let res = r
        .exec_req(
            id,
            ExecRequest {
                command: vec!["sh".into(), "-c".into(), "sleep 100 & sleep 100".into()],
                timeout_secs: Some(1),
                ..Default::default()
            },
        )
        .await;
    assert!(res.timed_out && res.exit_code == 137, "{res:?}");
    assert!(t0.elapsed() < Duration::from_secs(10));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (ps, _) = r.sh(id, "ps -o args | grep -c '^sleep 100'").await;
    assert_eq!(ps.trim(), "0", "children of a timed-out exec are killed");
    // Large output within the limit (1 MiB by default) arrives whole.
    let res = r
        .exec(id, &["sh", "-c", "head -c 1000000 /dev/zero | tr '\\0' a"])
        .await;
    assert_eq!(res.stdout.len(), 1_000_000);
    assert!(!res.stdout_truncated);
    // Hostile input is refused cleanly.
    let client = reqwest::Client::new();
    for body in [
        serde_json::json!({"command": []}),
        serde_json::json!({"command": ["a\u{0}b"]}),
        serde_json::json!({"command": ["true"], "env": {"A=B": "x"}}),
        serde_json::json!({"nope": 1}),
    ] {
        let resp = client
            .post(format!("{}/api/boxes/{id}/exec", r.url()))
            .bearer_auth(common::KEY)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400, "{body}");
        let e: protocol::ApiError = resp.json().await.unwrap();
        assert_eq!(e.code, "bad_request");
    }
    let resp = client
        .post(format!("{}/api/boxes/not-a-uuid/exec", r.url()))
        .bearer_auth(common::KEY)
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let resp = client
        .post(format!(
            "{}/api/boxes/{}/exec",
            r.url(),
            uuid::Uuid::new_v4()
        ))
        .bearer_auth(common::KEY)
        .json(&serde_json::json!({"command": ["true"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
}

const MIB: usize = 1 << 20;

/// The bytes the pattern file holds: 0, 1, …, 255, 0, 1, …
fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 256) as u8).collect()
}

/// Write `/root/p`: 1 MiB of [`pattern`] (binary: NULs, control bytes, invalid UTF-8).
async fn make_pattern_file(r: &Runner, id: uuid::Uuid) {
    let (out, code) = r
        .sh(
            id,
            r#"i=0; f=''; while [ $i -lt 256 ]; do f="$f$(printf '\\%03o' $i)"; i=$((i+1)); done
               printf "$f" > /root/p
               for k in 1 2 3 4 5 6 7 8 9 10 11 12; do cat /root/p /root/p > /root/q && mv /root/q /root/p; done
               wc -c < /root/p"#,
        )
        .await;
    assert_eq!((out.trim(), code), ("1048576", 0));
}

/// A one-shot exec of `script`; the answer's size on the wire and the answer.
async fn exec_sized(
    r: &Runner,
    id: uuid::Uuid,
    script: &str,
    max: Option<u64>,
) -> (usize, ExecResponse) {
    let req = ExecRequest {
        command: vec!["sh".into(), "-c".into(), script.into()],
        max_output_bytes: max,
        ..Default::default()
    };
    let resp = reqwest::Client::new()
        .post(format!("{}/api/boxes/{id}/exec", r.url()))
        .bearer_auth(common::KEY)
        .json(&req)
        .timeout(Duration::from_secs(300))
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{}", resp.status());
    let body = resp.bytes().await.unwrap();
    (body.len(), serde_json::from_slice(&body).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_shot_output_is_capped_exact_and_never_blown_up() {
    let r = Runner::start(Options::default()).await;
    let id = r.create_box(128, false).await;
    make_pattern_file(&r, id).await;
    // 50 MiB of binary: the answer holds exactly the first MiB (the default
    // limit), as base64, marked truncated; the rest was read and dropped, so
    // the writer was never blocked and ran to its end.
    let flood = "i=0; while [ $i -lt 50 ]; do cat /root/p; i=$((i+1)); done; echo done >&2";
    let (size, res) = exec_sized(&r, id, flood, None).await;
    assert!(
        size as u64 <= (MIB as u64).div_ceil(3) * 4 + 1024,
        "answer of {size} bytes for 1 MiB of output"
    );
    assert_eq!(res.exit_code, 0, "{}", res.stderr);
    assert_eq!(
        (res.stderr.as_str(), res.stderr_truncated),
        ("done\n", false)
    );
    assert!(res.stdout_truncated);
    assert_eq!(res.stdout_encoding, OutputEncoding::Base64);
    assert!(
        res.stdout_bytes().unwrap() == pattern(MIB),
        "the first MiB, byte-exact"
    );
    // A caller may ask for less.
    let (size, res) = exec_sized(&r, id, "cat /root/p", Some(1000)).await;
    assert!(size < 2000, "{size}");
    assert!(res.stdout_truncated);
    assert_eq!(res.stdout_bytes().unwrap(), pattern(1000));
    // Not more than the runner's limit, though.
    let (_, res) = exec_sized(&r, id, "cat /root/p /root/p", Some(10 * MIB as u64)).await;
    assert_eq!(res.stdout_bytes().unwrap().len(), MIB);
    // Exactly the limit is not truncated.
    let (_, res) = exec_sized(&r, id, "cat /root/p", None).await;
    assert!(!res.stdout_truncated && res.stdout_bytes().unwrap() == pattern(MIB));
    // Text stays text, cut at the limit.
    let (size, res) = exec_sized(&r, id, "head -c 3000000 /dev/zero | tr '\\0' a", None).await;
    assert_eq!(res.stdout_encoding, OutputEncoding::Utf8);
    assert!(res.stdout_truncated && res.stdout == "a".repeat(MIB));
    assert!(size < MIB + 1024, "{size}");
    // UTF-8 that JSON would blow up sixfold (control bytes) goes as base64.
    let (size, res) = exec_sized(&r, id, "head -c 300000 /dev/zero | tr '\\0' '\\1'", None).await;
    assert_eq!(res.stdout_encoding, OutputEncoding::Base64);
    assert_eq!(res.stdout_bytes().unwrap(), vec![1u8; 300_000]);
    assert!(size <= 400_000 + 1024, "{size}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runner_holds_a_bounded_budget_of_exec_output() {
    // Each exec may keep 1 MiB per stream; all together 1.5 MiB.
    let r = Runner::start(Options {
        extra: "[exec]\nmax_output_bytes = 1048576\noutput_budget_bytes = 1572864\n".into(),
        ..Default::default()
    })
    .await;
    let id = r.create_box(128, false).await;
    make_pattern_file(&r, id).await;
    // Two execs that each write 2 MiB and hold it while they sleep.
    let greedy = "cat /root/p /root/p; sleep 3";
    let (a, b) = tokio::join!(
        exec_sized(&r, id, greedy, None),
        exec_sized(&r, id, greedy, None)
    );
    let (a, b) = (a.1, b.1);
    let (ka, kb) = (a.stdout_bytes().unwrap(), b.stdout_bytes().unwrap());
    assert_eq!((a.exit_code, b.exit_code), (0, 0));
    assert!(a.stdout_truncated && b.stdout_truncated);
    assert_eq!(
        ka.len() + kb.len(),
        1_572_864,
        "together they kept exactly the budget ({} + {})",
        ka.len(),
        kb.len()
    );
    assert!(
        ka == pattern(ka.len()) && kb == pattern(kb.len()),
        "each an exact prefix"
    );
    // Once their answers were sent, the budget is whole again.
    let (_, c) = exec_sized(&r, id, "cat /root/p /root/p", None).await;
    assert_eq!(c.stdout_bytes().unwrap(), pattern(MIB));
    assert!(r.log_text().contains("exec output budget ran out"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_sessions_with_and_without_a_terminal() {
    let r = Runner::start(Options::default()).await;
    let id = r.create_box(128, false).await;
    // Default: a login shell in $HOME with a terminal.
    let (mut ws, _) = Ws::open(
        &r,
        id,
        &ExecStart {
            tty: true,
            rows: Some(40),
            cols: Some(120),
            ..Default::default()
        },
    )
    .await;
    ws.stdin(b"echo \"shell=$0 pwd=$(pwd) tty=$(tty)\"; stty size\n")
        .await;
    assert!(ws.read_until("40 120", Duration::from_secs(10)).await);
    let out = String::from_utf8_lossy(&ws.stdout).into_owned();
    assert!(out.contains("shell=-ash pwd=/root tty=/dev/pts/0"), "{out}");
    // Resize reaches the terminal.
    ws.control(&ExecControl::Resize { rows: 10, cols: 20 })
        .await;
    ws.stdin(b"stty size\n").await;
    assert!(ws.read_until("10 20", Duration::from_secs(10)).await);
    // A signal interrupts the foreground program.
    ws.stdin(b"sleep 100\n").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    ws.control(&ExecControl::Signal {
        signal: "INT".into(),
    })
    .await;
    ws.stdin(b"echo after-sleep-$?\n").await;
    assert!(
        ws.read_until("after-sleep-130", Duration::from_secs(10))
            .await,
        "{}",
        String::from_utf8_lossy(&ws.stdout)
    );
    ws.stdin(b"exit 3\n").await;
    assert_eq!(ws.exit_code(Duration::from_secs(10)).await, Some(3));

    // Without a terminal: separate stdout/stderr, stdin EOF passes through.
    let (mut ws, _) = Ws::open(
        &r,
        id,
        &ExecStart {
            command: vec!["sh".into(), "-c".into(), "wc -c; echo err >&2".into()],
            ..Default::default()
        },
    )
    .await;
    ws.stdin(b"12345").await;
    ws.stdin(b"678").await;
    ws.control(&ExecControl::StdinEof).await;
    assert_eq!(ws.exit_code(Duration::from_secs(10)).await, Some(0));
    assert_eq!(String::from_utf8_lossy(&ws.stdout).trim(), "8");
    assert_eq!(String::from_utf8_lossy(&ws.stderr), "err\n");

    // Input arriving as the process exits does not lose its exit code (a
    // client forwarding stdin races a command that does not read it; before
    // the fix about one session in three answered "shim went away").
    for round in 0..20 {
        let (mut ws, _) = Ws::open(
            &r,
            id,
            &ExecStart {
                command: vec!["sh".into(), "-c".into(), "echo quick; exit 7".into()],
                ..Default::default()
            },
        )
        .await;
        ws.try_stdin_then_eof(b"unread input").await;
        assert_eq!(
            ws.exit_code(Duration::from_secs(10)).await,
            Some(7),
            "round {round}"
        );
        assert_eq!(
            String::from_utf8_lossy(&ws.stdout),
            "quick\n",
            "round {round}"
        );
    }

    // TERM ends a program that does not read stdin; the code says which signal.
    let (mut ws, _) = Ws::open(
        &r,
        id,
        &ExecStart {
            command: vec!["sleep".into(), "100".into()],
            ..Default::default()
        },
    )
    .await;
    ws.control(&ExecControl::Signal {
        signal: "TERM".into(),
    })
    .await;
    assert_eq!(ws.exit_code(Duration::from_secs(10)).await, Some(128 + 15));

    // A malformed first message gets an error event, not a hang.
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = format!("ws://127.0.0.1:{}/api/boxes/{id}/exec/ws", r.port)
        .into_client_request()
        .unwrap();
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {}", common::KEY).parse().unwrap(),
    );
    let (mut raw, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    raw.send(tokio_tungstenite::tungstenite::Message::Text(
        "{not json".into(),
    ))
    .await
    .unwrap();
    let m = tokio::time::timeout(Duration::from_secs(5), raw.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(m.into_text().unwrap().contains("\"error\""));
}
