//! `boxctl validate` on broken and clean stacks: every problem reported at
//! once, each at its exact line and column.

use std::path::Path;
use std::process::{Command, Output};

fn boxctl(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_boxctl"))
        .args(args)
        .current_dir(dir)
        .env("BOXCTL_STATE_DIR", dir.join("state"))
        .env("NO_COLOR", "1")
        .output()
        .expect("run boxctl")
}

fn write(dir: &Path, text: &str) {
    std::fs::write(dir.join("stack.toml"), text).unwrap();
}

/// Lines of stderr that are diagnostics.
fn diagnostics(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| l.starts_with("stack.toml:") || l.contains("/stack.toml:"))
        .map(|l| {
            l.rsplit_once("stack.toml:")
                .map(|(_, r)| format!("stack.toml:{r}"))
                .unwrap()
        })
        .filter(|l| l.contains(": error:") || l.contains(": warning:"))
        .collect()
}

const BROKEN: &str = r#"name = "boxlite"
colour = "blue"

[defaults]
runners = "three"

[stages.dev]
target = "local"
[stages.dev.local]
api_port = 70000

[stages.prod]
target = "aws"
region = "ap-southeast-1"
domain = "not a hostname"
runners = 101
[stages.prod.runner]
instance_tpye = "c7i.large"
[stages.prod.control_plane]
image = "ghcr.io/boxlite/cp:1"
[stages.prod.oidc]
issuer = "https://auth.example.com"
audience = "api"
[[stages.prod.services]]
name = "docs"
image = "ghcr.io/boxlite/docs:1"
port = 8080
[[stages.prod.services]]
name = "docs"
image = "ghcr.io/boxlite/docs:2"
port = 0
"#;

#[test]
fn every_problem_is_reported_at_once_with_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), BROKEN);
    let out = boxctl(dir.path(), &["validate"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = diagnostics(&out);
    let expected = [
        "stack.toml:2:1: error: unknown key `colour` at the top level",
        "stack.toml:5:11: error: `defaults.runners` must be an integer, found a string",
        "stack.toml:10:12: error: port 70000 is out of range",
        "stack.toml:15:10: error: domain \"not a hostname\" is not a hostname",
        "stack.toml:16:11: error: `runners` is 101, above the limit of 100",
        "stack.toml:18:1: error: unknown key `instance_tpye` in `stages.prod.runner`",
        "stack.toml:22:10: warning: issuer \"https://auth.example.com\" has no trailing slash",
        "stack.toml:29:8: error: duplicate service name \"docs\"",
        "stack.toml:31:8: error: port 0 is out of range",
    ];
    assert_eq!(
        got,
        expected,
        "full stderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("hint: did you mean `instance_type`?"),
        "{stderr}"
    );
    assert!(
        stderr.contains("hint: tokens are accepted only when `iss` matches exactly"),
        "{stderr}"
    );
    assert!(stderr.contains("8 error(s), 1 warning(s)"), "{stderr}");
}

#[test]
fn json_output_lists_the_same_diagnostics() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), BROKEN);
    let out = boxctl(dir.path(), &["validate", "--output", "json"]);
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["valid"], false);
    let diags = v["diagnostics"].as_array().unwrap();
    assert_eq!(diags.len(), 9);
    assert_eq!(diags[0]["line"], 2);
    assert_eq!(diags[0]["column"], 1);
    assert_eq!(diags[0]["key"], "colour");
    assert_eq!(diags[0]["severity"], "error");
}

#[test]
fn syntax_errors_point_at_the_offending_line() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "name = \"boxlite\"\n[stages.dev\ntarget = \"local\"\n",
    );
    let out = boxctl(dir.path(), &["validate"]);
    assert_eq!(out.status.code(), Some(1));
    let got = diagnostics(&out);
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(got[0].starts_with("stack.toml:2:"), "{got:?}");
    assert!(got[0].contains("invalid TOML"), "{got:?}");
}

#[test]
fn a_clean_stack_exits_zero_and_warnings_do_not_fail() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "name = \"boxlite\"\n[stages.dev]\ntarget = \"local\"\n[stages.dev.oidc]\nissuer = \"https://id.example.com\"\naudience = \"a\"\n",
    );
    let out = boxctl(dir.path(), &["validate"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        diagnostics(&out),
        ["stack.toml:5:10: warning: issuer \"https://id.example.com\" has no trailing slash"]
    );
}

#[test]
fn a_stage_that_does_not_exist_is_an_error_naming_the_stages() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "name = \"boxlite\"\n[stages.dev]\n[stages.prod]\ntarget = \"local\"\n",
    );
    let out = boxctl(dir.path(), &["validate", "--stage", "prd"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(r#"stage "prd" does not exist in stack "boxlite" (stages: dev, prod); did you mean "prod"?"#),
        "{stderr}"
    );
    let out = boxctl(dir.path(), &["diff", "--stage", "staging"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains(r#"stage "staging" does not exist"#));
}

#[test]
fn aws_stages_name_their_missing_keys() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "name = \"boxlite\"\n\n[stages.prod]\ntarget = \"aws\"\n",
    );
    let out = boxctl(dir.path(), &["validate"]);
    assert_eq!(out.status.code(), Some(1));
    let got = diagnostics(&out);
    assert_eq!(
        got,
        [
            "stack.toml:3:9: error: stage \"prod\" targets aws but sets no `control_plane.image`",
            "stack.toml:3:9: error: stage \"prod\" targets aws but sets no `domain`",
            "stack.toml:3:9: error: stage \"prod\" targets aws but sets no `region`",
        ]
    );
}

#[test]
fn the_project_stack_is_valid() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let out = boxctl(root, &["validate"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn no_stack_file_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = boxctl(dir.path(), &["validate"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no stack.toml in"));
}
