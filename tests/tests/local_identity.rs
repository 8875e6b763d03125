//! Which processes are a local stage's own, with the real platform: two
//! stages of the same stack and stage names in two state directories deploy
//! and destroy side by side untouched, and a box's process carrying a
//! runner's marker never stands in for the runner.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{Stage, session_leader, stderr, stdout};

fn processes(stage: &Stage) -> BTreeSet<u32> {
    stage.processes().into_iter().collect()
}

fn up_to_date(stage: &Stage) {
    let out = stage.boxctl(&["diff", "--stage", "dev", "--exit-code"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\n{}",
        stdout(&out),
        stderr(&out)
    );
}

#[test]
fn two_stages_of_the_same_names_in_two_state_dirs_deploy_and_destroy_side_by_side() {
    let a = Stage::new(1, "");
    let b = Stage::named(&a.stack, 1, "");
    a.ok(&["deploy", "--stage", "dev"]);
    let before = processes(&a);
    assert!(a.marked("process/control-plane").is_some() && a.marked("runner/runner-1").is_some());

    // B starts from nothing: A's processes are not B's to adopt, restart or stop.
    let out = b.ok(&["deploy", "--stage", "dev"]);
    assert!(
        out.contains(" to create, 0 to update, 0 to replace, 0 to delete"),
        "B creates everything of its own: {out}"
    );
    assert_eq!(processes(&a), before, "B's deploy touched A's processes");
    let theirs = processes(&b);
    assert!(!theirs.is_empty() && theirs.is_disjoint(&before));
    for s in [&a, &b] {
        up_to_date(s);
        assert_eq!(s.api("/api/admin/runners/runner-1")["state"], "ready");
    }

    // Destroying B leaves A running, unchanged.
    b.ok(&["destroy", "--stage", "dev", "--yes"]);
    assert!(b.processes().is_empty(), "{:?}", b.processes());
    assert_eq!(processes(&a), before, "B's destroy touched A's processes");
    up_to_date(&a);
    assert_eq!(a.api("/api/admin/runners/runner-1")["state"], "ready");
}

/// Processes anywhere on the host whose environment holds `var` exactly.
fn carrying(var: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let pid = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let env = std::fs::read(e.path().join("environ")).ok()?;
            env.split(|b| *b == 0)
                .any(|v| v == var.as_bytes())
                .then_some(pid)
        })
        .collect()
}

#[test]
fn a_box_process_carrying_a_runners_marker_does_not_stand_in_for_the_dead_runner() {
    let stage = Stage::new(1, "");
    stage.ok(&["deploy", "--stage", "dev"]);
    let (runner, marker) = stage.marked("runner/runner-1").expect("the runner runs");

    // A tenant leaves a daemon in its box with the runner's exact marker.
    let id = stage
        .ok(&["box", "create", "--stage", "dev"])
        .trim()
        .to_string();
    let var = format!("BOXCTL_RESOURCE={marker}");
    let out = stage.boxctl(&[
        "box",
        "exec",
        "--stage",
        "dev",
        "-e",
        &var,
        &id,
        "--",
        "sh",
        "-c",
        "setsid sleep 600 </dev/null >/dev/null 2>&1 &",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let mut forged = Vec::new();
    assert!(
        testkit::wait_until(Duration::from_secs(10), || {
            forged = carrying(&var)
                .into_iter()
                .filter(|p| *p != runner)
                .collect();
            !forged.is_empty()
        }),
        "the box's daemon never showed up"
    );
    // It looks like what boxctl starts: a session leader with the marker.
    assert!(forged.iter().all(|p| session_leader(*p)), "{forged:?}");

    // The runner dies; the box and its daemon live on.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(runner as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert!(testkit::wait_until(Duration::from_secs(10), || {
        !std::path::Path::new(&format!("/proc/{runner}")).exists()
            || std::fs::read_to_string(format!("/proc/{runner}/stat"))
                .is_ok_and(|s| s.contains(") Z "))
    }));

    let out = stage.boxctl(&["diff", "--stage", "dev", "--exit-code", "-o", "json"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "the dead runner is drift: {}",
        stdout(&out)
    );
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let change = plan["changes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == "runner/runner-1")
        .unwrap_or_else(|| panic!("runner/runner-1 not in the plan: {plan}"));
    assert_eq!(change["action"], "update", "{change}");
    assert!(
        change["fields"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["name"] == "running" && f["old"] == false && f["new"] == true),
        "{change}"
    );

    // Deploy brings the runner back and leaves the tenant's process alone.
    let out = stage.boxctl(&["deploy", "--stage", "dev"]);
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    let (again, _) = stage
        .marked("runner/runner-1")
        .expect("the runner runs again");
    assert!(!forged.contains(&again));
    for p in &forged {
        assert!(
            std::path::Path::new(&format!("/proc/{p}")).exists(),
            "deploy stopped the box's process {p}"
        );
    }
    up_to_date(&stage);
}
