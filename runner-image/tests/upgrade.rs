//! `boxlite-runner upgrade` on the local target (re-exec, same pid): verified
//! before anything changes, rolled back when the new release is unhealthy,
//! and boxes survive every path.
//!
//! New releases are the binary under test with bytes appended (still a valid
//! executable, but a different SHA-256, so the agent's reported identity
//! changes). The "bad" release is made unhealthy with the agent's test hook
//! `BOXLITE_RUNNER_UNHEALTHY_IF_SHA256` (set on the running agent, inherited
//! across the re-exec, matched against the new binary's checksum), or is a
//! script that answers `version` but dies when started as the agent.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{Options, Runner, Ws};
use protocol::{BoxState, ExecStart};
use sha2::{Digest, Sha256};

/// A `.tar.gz` holding `content` as `boxlite-runner`; returns (path, sha256 of the archive).
fn artifact(dir: &Path, name: &str, content: &[u8]) -> (PathBuf, String) {
    let p = dir.join(name);
    let gz = flate2::write::GzEncoder::new(
        std::fs::File::create(&p).unwrap(),
        flate2::Compression::none(),
    );
    let mut b = tar::Builder::new(gz);
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o755);
    h.set_size(content.len() as u64);
    b.append_data(&mut h, "boxlite-runner", content).unwrap();
    b.into_inner().unwrap().finish().unwrap();
    let sha = hex::encode(Sha256::digest(std::fs::read(&p).unwrap()));
    (p, sha)
}

/// The binary under test plus `tag`: a different release of the same code.
fn padded_binary(tag: &str) -> Vec<u8> {
    let mut b = std::fs::read(common::bin()).unwrap();
    b.extend_from_slice(format!("\0boxlite-test-release:{tag}\0").as_bytes());
    b
}

fn upgrade(r: &Runner, artifact: &str, sha: &str, timeout: u64) -> (i32, String) {
    let out = std::process::Command::new(common::bin())
        .arg("upgrade")
        .arg("--config")
        .arg(&r.config)
        .args(["--artifact", artifact, "--sha256", sha])
        .args(["--timeout", &timeout.to_string()])
        .current_dir(r.dir.path())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

struct Snapshot {
    current: PathBuf,
    installed: String,
    releases: Vec<String>,
    pid: u32,
    sha: Option<String>,
}

async fn snapshot(r: &Runner) -> Snapshot {
    let mut releases: Vec<String> = std::fs::read_dir(r.state.join("releases"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    releases.sort();
    let h = r.health().await.unwrap().1;
    Snapshot {
        current: std::fs::read_link(r.state.join("current")).unwrap(),
        installed: std::fs::read_to_string(r.state.join("installed.json")).unwrap(),
        releases,
        pid: h.pid,
        sha: h.binary_sha256,
    }
}

async fn boxes_all_work(r: &Runner, ids: &[uuid::Uuid]) {
    let st = r.status().await;
    for id in ids {
        assert!(
            st.boxes
                .iter()
                .any(|b| b.id == *id && b.state == BoxState::Running),
            "{id} not running: {st:?}"
        );
        let (out, code) = r.sh(*id, "cat /root/marker").await;
        assert_eq!((out.trim(), code), (id.to_string().as_str(), 0));
    }
}

async fn wait_sha(r: &mut Runner) -> String {
    for _ in 0..200 {
        if let Ok((_, h)) = r.health().await
            && let Some(s) = h.binary_sha256
        {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no binary checksum reported");
}

async fn runner_with_boxes(opts: Options, n: usize) -> (Runner, Vec<uuid::Uuid>) {
    let mut r = Runner::start(opts).await;
    wait_sha(&mut r).await;
    let mut ids = vec![];
    for _ in 0..n {
        let id = r.create_box(96, false).await;
        r.sh(id, &format!("echo {id} > /root/marker")).await;
        ids.push(id);
    }
    (r, ids)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_artifact_changes_nothing() {
    let (r, ids) = runner_with_boxes(Options::default(), 2).await;
    let work = tempfile::tempdir().unwrap();
    let (path, sha) = artifact(work.path(), "next.tar.gz", &padded_binary("next"));
    // Corrupt the downloaded bytes after the checksum was published.
    let mut bytes = std::fs::read(&path).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 0x55;
    std::fs::write(&path, bytes).unwrap();
    let before = snapshot(&r).await;
    let (code, out) = upgrade(&r, path.to_str().unwrap(), &sha, 30);
    assert_eq!(code, 4, "{out}");
    assert!(out.contains("checksum mismatch"), "{out}");
    let after = snapshot(&r).await;
    assert_eq!(after.current, before.current);
    assert_eq!(after.installed, before.installed);
    assert_eq!(
        after.releases, before.releases,
        "no release installed, no leftovers"
    );
    assert_eq!(after.pid, before.pid, "the old agent kept serving");
    assert_eq!(after.sha, before.sha);
    assert!(!r.state.join("upgrade.json").exists());
    boxes_all_work(&r, &ids).await;
    // A malformed --sha256 and a missing artifact are refused the same way.
    let (code, _) = upgrade(&r, path.to_str().unwrap(), "xyz", 30);
    assert_eq!(code, 2);
    let (code, out) = upgrade(&r, "/nonexistent/runner.tar.gz", &sha, 30);
    assert_eq!(code, 3, "{out}");
    assert_eq!(snapshot(&r).await.current, before.current);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unhealthy_release_is_rolled_back_and_boxes_survive() {
    let work = tempfile::tempdir().unwrap();
    let bad = padded_binary("bad");
    let bad_sha = hex::encode(Sha256::digest(&bad));
    let (art, art_sha) = artifact(work.path(), "bad.tar.gz", &bad);
    let (r, ids) = runner_with_boxes(
        Options {
            env: vec![(
                runner_image::agent::UNHEALTHY_IF_SHA256_ENV.into(),
                bad_sha.clone(),
            )],
            ..Default::default()
        },
        2,
    )
    .await;
    // An interactive session left open across the upgrade.
    let (mut ws, session) = Ws::open(
        &r,
        ids[0],
        &ExecStart {
            tty: true,
            ..Default::default()
        },
    )
    .await;
    ws.stdin(b"echo ready\n").await;
    assert!(ws.read_until("ready", Duration::from_secs(10)).await);
    ws.disconnect().await;
    let before = snapshot(&r).await;
    let (code, out) = upgrade(&r, art.to_str().unwrap(), &art_sha, 8);
    assert_eq!(code, 7, "{out}");
    assert!(out.contains("rolled back"), "{out}");
    let after = snapshot(&r).await;
    assert_eq!(
        after.current, before.current,
        "current points back to the old release"
    );
    assert_eq!(
        after.installed, before.installed,
        "installed state untouched"
    );
    assert_eq!(after.sha, before.sha, "the old binary serves again");
    assert_eq!(
        after.pid, before.pid,
        "same process (re-exec), so its supervisor is undisturbed"
    );
    assert!(!r.state.join("upgrade.json").exists());
    let h = r.health().await.unwrap();
    assert!(h.0.is_success());
    assert_eq!(h.1.health.boxes_adopted, 2);
    boxes_all_work(&r, &ids).await;
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
    ws.stdin(b"exit 4\n").await;
    assert_eq!(ws.exit_code(Duration::from_secs(10)).await, Some(4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn good_upgrade_over_http_switches_and_keeps_boxes() {
    let work = tempfile::tempdir().unwrap();
    let next = padded_binary("good");
    let next_sha = hex::encode(Sha256::digest(&next));
    let (art, art_sha) = artifact(work.path(), "good.tar.gz", &next);
    // Publish it over HTTP.
    let bytes = std::fs::read(&art).unwrap();
    let app = axum::Router::new().route(
        "/runner.tar.gz",
        axum::routing::get(move || {
            let b = bytes.clone();
            async move { b }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/runner.tar.gz", listener.local_addr().unwrap());
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let (r, ids) = runner_with_boxes(Options::default(), 2).await;
    let before = snapshot(&r).await;
    let (code, out) = upgrade(&r, &url, &art_sha, 60);
    assert_eq!(code, 0, "{out}");
    let after = snapshot(&r).await;
    assert_eq!(
        after.sha.as_deref(),
        Some(next_sha.as_str()),
        "health reports the new binary"
    );
    assert_eq!(after.pid, before.pid);
    assert_ne!(after.current, before.current);
    let inst: runner_image::upgrade::Installed = serde_json::from_str(&after.installed).unwrap();
    assert_eq!(inst.binary_sha256, next_sha);
    assert_eq!(inst.artifact_sha256.as_deref(), Some(art_sha.as_str()));
    assert_eq!(
        Some(inst.previous.unwrap()),
        before
            .current
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
    );
    assert!(!r.state.join("upgrade.json").exists());
    assert_eq!(r.health().await.unwrap().1.health.boxes_adopted, 2);
    boxes_all_work(&r, &ids).await;
    // New boxes start from the new binary's shims.
    let id = r.create_box(96, false).await;
    let (out, _) = r.sh(id, "echo new-box").await;
    assert_eq!(out.trim(), "new-box");
    // Upgrading to the same artifact again is a no-op.
    let (code, out) = upgrade(&r, &url, &art_sha, 60);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("already installed"), "{out}");
    assert_eq!(snapshot(&r).await.pid, before.pid);
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_binary_that_dies_is_rolled_back_by_restarting_the_old_agent() {
    let work = tempfile::tempdir().unwrap();
    let real = common::bin();
    // Answers `version` (so it installs) but dies when started as the agent.
    let script = format!(
        "#!/bin/sh\n# boxlite-test-release:dies\ncase \"$1\" in version) exec {} \"$@\";; esac\necho dying >&2\nexit 1\n",
        real.display()
    );
    let (art, art_sha) = artifact(work.path(), "dies.tar.gz", script.as_bytes());
    let (r, ids) = runner_with_boxes(Options::default(), 1).await;
    let before = snapshot(&r).await;
    let (code, out) = upgrade(&r, art.to_str().unwrap(), &art_sha, 8);
    assert_eq!(code, 7, "{out}");
    let after = snapshot(&r).await;
    assert_eq!(after.current, before.current);
    assert_eq!(after.installed, before.installed);
    assert_eq!(after.sha, before.sha);
    assert_ne!(after.pid, before.pid, "the old agent was started again");
    boxes_all_work(&r, &ids).await;
    // The agent it started runs from the old release with the old working directory.
    let cwd = std::fs::read_link(format!("/proc/{}/cwd", after.pid)).unwrap();
    assert_eq!(cwd, r.dir.path());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_binary_that_does_not_run_is_never_switched_to() {
    let work = tempfile::tempdir().unwrap();
    let (art, art_sha) = artifact(work.path(), "broken.tar.gz", b"#!/bin/sh\nexit 3\n");
    let (r, ids) = runner_with_boxes(Options::default(), 1).await;
    let before = snapshot(&r).await;
    let (code, out) = upgrade(&r, art.to_str().unwrap(), &art_sha, 8);
    assert_eq!(code, 6, "{out}");
    let after = snapshot(&r).await;
    assert_eq!(after.current, before.current);
    assert_eq!(after.releases, before.releases);
    assert_eq!(after.pid, before.pid);
    boxes_all_work(&r, &ids).await;
}
