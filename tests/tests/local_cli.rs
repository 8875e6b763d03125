//! boxctl on the local target with real processes: plan formats and exit
//! codes, interrupting a deploy (Ctrl-C), the deploy lock between two
//! processes, and a deploy killed outright.

mod common;

use std::process::{Child, Stdio};
use std::time::Duration;

use common::{Stage, stderr, stdout};

/// A control plane and one service that becomes healthy only after ~3 s, so
/// a deploy stays in flight long enough to interrupt or contend with.
fn slow_stage() -> Stage {
    let port = testkit::free_port();
    Stage::new(
        0,
        &format!(
            "[[stages.dev.services]]\nname = \"slow\"\nport = {port}\nhealth_path = \"/\"\n\
             command = [\"sh\", \"-c\", \"sleep 3; exec python3 -m http.server {port} --bind 127.0.0.1\"]\n"
        ),
    )
}

/// Start `boxctl deploy` and wait until the slow service's step has started.
fn deploy_in_flight(stage: &Stage) -> Child {
    let child = stage
        .cmd(&["deploy", "--stage", "dev"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = stage.stage_dir().join("logs/service-slow.log");
    assert!(
        testkit::wait_until(Duration::from_secs(60), || log.exists()),
        "the service never started"
    );
    child
}

fn signal(child: &Child, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), sig).unwrap();
}

fn status_json(stage: &Stage) -> serde_json::Value {
    serde_json::from_str(&stage.ok(&["status", "--stage", "dev", "-o", "json"])).unwrap()
}

/// Processes serving the slow service (by its marker).
fn slow_services(stage: &Stage) -> usize {
    // The marker ends in `@<digest of the stage directory>`.
    let needle = format!("BOXCTL_RESOURCE={}/dev/service/slow@", stage.stack);
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("environ")).ok())
        .filter(|env| {
            env.split(|b| *b == 0)
                .any(|v| v.starts_with(needle.as_bytes()))
        })
        .count()
}

#[test]
fn diff_renders_text_and_json_and_exit_codes_say_whether_anything_changes() {
    let stage = Stage::new(0, "");
    let out = stage.boxctl(&["diff", "--stage", "dev", "--exit-code"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "changes pending: {}",
        stderr(&out)
    );
    let text = stdout(&out);
    assert!(text.contains("+ process/control-plane"), "{text}");
    assert!(
        text.contains("+listen = \"127.0.0.1:"),
        "file contents as added lines: {text}"
    );
    assert!(
        text.contains("Plan: 4 to create, 0 to update, 0 to replace, 0 to delete; 0 unchanged."),
        "{text}"
    );

    let json: serde_json::Value = serde_json::from_slice(
        &stage
            .boxctl(&["diff", "--stage", "dev", "-o", "json"])
            .stdout,
    )
    .unwrap();
    assert_eq!(json["summary"]["create"], 4);
    let changes = json["changes"].as_array().unwrap();
    let cp = changes
        .iter()
        .find(|c| c["id"] == "process/control-plane")
        .unwrap();
    assert_eq!(cp["kind"], "local.process");
    assert_eq!(cp["action"], "create");
    assert!(
        cp["fields"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["name"] == "health")
    );
    assert!(
        stage.boxctl(&["diff", "--stage", "dev"]).status.success(),
        "diff without --exit-code exits 0"
    );

    stage.ok(&["deploy", "--stage", "dev"]);
    assert_eq!(
        stage
            .boxctl(&["diff", "--stage", "dev", "--exit-code"])
            .status
            .code(),
        Some(0)
    );
    let json: serde_json::Value = serde_json::from_slice(
        &stage
            .boxctl(&["diff", "--stage", "dev", "-o", "json"])
            .stdout,
    )
    .unwrap();
    assert_eq!(json["changes"].as_array().unwrap().len(), 0);
    assert_eq!(json["summary"]["unchanged"], 4);
    // The graph is canonical: the same stack gives the same bytes.
    assert_eq!(
        stage.ok(&["graph", "--stage", "dev"]),
        stage.ok(&["graph", "--stage", "dev"])
    );
}

#[test]
fn ctrl_c_lets_the_step_in_flight_finish_records_it_and_releases_the_lock() {
    let stage = slow_stage();
    let child = deploy_in_flight(&stage);
    signal(&child, nix::sys::signal::Signal::SIGINT);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("interrupted: finishing the steps in flight"),
        "{err}"
    );
    assert!(
        err.contains("done  create service/slow"),
        "the step in flight finished: {err}"
    );
    assert!(err.contains("Apply interrupted"), "{err}");
    let status = status_json(&stage);
    assert_eq!(status["last_deploy"]["status"], "interrupted");
    assert!(status["lock"].is_null(), "the lock was released: {status}");
    // Running it again converges, with one service process, not two.
    stage.ok(&["deploy", "--stage", "dev"]);
    assert_eq!(slow_services(&stage), 1);
    assert!(
        stage
            .ok(&["deploy", "--stage", "dev"])
            .contains("No changes")
    );
}

#[test]
fn a_second_deploy_is_refused_naming_the_holder_or_waits_for_the_lock() {
    let stage = slow_stage();
    let first = deploy_in_flight(&stage);
    let refused = stage.boxctl(&["deploy", "--stage", "dev"]);
    assert_eq!(refused.status.code(), Some(1));
    let err = stderr(&refused);
    assert!(err.contains("is locked by"), "{err}");
    assert!(
        err.contains(&format!(
            "(pid {}, `boxctl deploy --stage dev`)",
            first.id()
        )),
        "names the holder: {err}"
    );
    // With --lock-timeout the second deploy waits for the first, then finds nothing to do.
    let waited = stage.boxctl(&["deploy", "--stage", "dev", "--lock-timeout", "120s"]);
    assert!(waited.status.success(), "{}", stderr(&waited));
    assert!(
        stderr(&waited).contains("waiting for the deploy lock, held by"),
        "{}",
        stderr(&waited)
    );
    assert!(
        stdout(&waited).contains("No changes"),
        "{}",
        stdout(&waited)
    );
    assert!(first.wait_with_output().unwrap().status.success());
}

#[test]
fn a_deploy_killed_outright_leaves_a_lock_that_expires_and_a_rerun_converges() {
    let stage = slow_stage();
    let child = deploy_in_flight(&stage);
    signal(&child, nix::sys::signal::Signal::SIGKILL);
    let _ = child.wait_with_output();
    // The lock is still there: its holder never released it.
    assert!(stage.stage_dir().join(".boxctl/state/lock.json").exists());
    let status = status_json(&stage);
    assert_eq!(
        status["last_deploy"]["status"],
        "interrupted (the process died before finishing)"
    );
    // Its holder is gone from this host, so the lock is stale at once.
    let out = stage.boxctl(&["deploy", "--stage", "dev"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("ended without finishing"),
        "the rerun says what was in flight: {}",
        stderr(&out)
    );
    assert_eq!(
        slow_services(&stage),
        1,
        "one service process, not a second one"
    );
    assert!(
        stage
            .ok(&["deploy", "--stage", "dev"])
            .contains("No changes")
    );
}

#[test]
fn destructive_changes_need_confirmation() {
    let stage = Stage::new(0, "");
    stage.ok(&["deploy", "--stage", "dev"]);
    let out = stage.boxctl(&["destroy", "--stage", "dev"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("rerun with --yes"),
        "{}",
        stderr(&out)
    );
    assert!(stage.stage_dir().exists(), "nothing was removed");
    stage.ok(&["destroy", "--stage", "dev", "--yes"]);
    assert!(!stage.stage_dir().exists());
    assert!(stage.processes().is_empty());
}
