//! Stage resolution: deterministic graphs, defaults merged under stages, and
//! the local target's resources with their policies.

use stack::{ResourceId, Value, kinds};

const STACK: &str = r#"
name = "boxlite"

[defaults]
runners = 2

[defaults.runner]
instance_type = "c7i.large"
root_volume_gb = 80

[[defaults.services]]
name = "docs"
command = ["python3", "-m", "http.server", "9000"]
port = 9000

[[defaults.services]]
name = "metrics"
command = ["sleep", "1000"]
port = 9100

[stages.dev]
target = "local"
runners = 3

[stages.dev.runner]
root_volume_gb = 40

[stages.dev.local]
api_port = 8070
runner_port_base = 8100

[[stages.dev.services]]
name = "docs"
command = ["python3", "-m", "http.server", "9001"]
port = 9001
health_path = "/"
"#;

/// The same stack with tables and keys in another order.
const REORDERED: &str = r#"
[stages.dev.local]
runner_port_base = 8100
api_port = 8070

[[stages.dev.services]]
port = 9001
health_path = "/"
name = "docs"
command = ["python3", "-m", "http.server", "9001"]

[stages.dev.runner]
root_volume_gb = 40

[stages.dev]
runners = 3
target = "local"

[defaults.runner]
root_volume_gb = 80
instance_type = "c7i.large"

[defaults]
runners = 2

[[defaults.services]]
name = "docs"
command = ["python3", "-m", "http.server", "9000"]
port = 9000

[[defaults.services]]
name = "metrics"
port = 9100
command = ["sleep", "1000"]

name = "boxlite"
"#;

#[test]
fn the_same_stack_gives_the_same_graph_byte_for_byte() {
    let a = stack::load(STACK)
        .unwrap()
        .stack
        .resolve("dev")
        .unwrap()
        .to_canonical_json();
    let b = stack::load(STACK)
        .unwrap()
        .stack
        .resolve("dev")
        .unwrap()
        .to_canonical_json();
    assert_eq!(a, b);
}

#[test]
fn table_and_key_order_do_not_change_the_graph() {
    // `name` after a table belongs to that table in TOML, so REORDERED keeps it at the top.
    let reordered = format!(
        "name = \"boxlite\"\n{}",
        REORDERED.replace("\nname = \"boxlite\"\n", "\n")
    );
    let a = stack::load(STACK)
        .unwrap()
        .stack
        .resolve("dev")
        .unwrap()
        .to_canonical_json();
    let b = stack::load(&reordered)
        .unwrap()
        .stack
        .resolve("dev")
        .unwrap()
        .to_canonical_json();
    assert_eq!(a, b);
}

#[test]
fn stage_settings_override_defaults_key_by_key_and_services_by_name() {
    let loaded = stack::load(STACK).unwrap();
    let dev = loaded.stack.stage("dev").unwrap();
    assert_eq!(dev.runners, 3);
    assert_eq!(
        dev.runner.instance_type, "c7i.large",
        "from [defaults.runner]"
    );
    assert_eq!(
        dev.runner.root_volume_gb, 40,
        "overridden by [stages.dev.runner]"
    );
    let names: Vec<(&str, u16)> = dev
        .services
        .iter()
        .map(|s| (s.name.as_str(), s.port))
        .collect();
    assert_eq!(
        names,
        [("docs", 9001), ("metrics", 9100)],
        "docs replaced by the stage's entry, metrics inherited"
    );
}

#[test]
fn the_local_graph_has_the_platform_as_supervised_processes() {
    let g = stack::load(STACK).unwrap().stack.resolve("dev").unwrap();
    let ids: Vec<&str> = g.resources.keys().map(ResourceId::as_str).collect();
    assert_eq!(
        ids,
        [
            "config/control-plane",
            "config/runner-1",
            "config/runner-2",
            "config/runner-3",
            "dir/data",
            "process/control-plane",
            "registration/runner-1",
            "registration/runner-2",
            "registration/runner-3",
            "runner/runner-1",
            "runner/runner-2",
            "runner/runner-3",
            "secret/admin-api-key",
            "secret/runner-1-token",
            "secret/runner-2-token",
            "secret/runner-3-token",
            "service/docs",
            "service/metrics",
        ]
    );
    let runner = &g.resources[&ResourceId::from("runner/runner-2")];
    assert_eq!(runner.kind, kinds::LOCAL_PROCESS);
    assert!(runner.policy.protect, "runners are protected");
    assert!(
        runner.policy.ignore_changes.contains("program_sha256"),
        "runner binaries roll by `runner upgrade`"
    );
    assert_eq!(
        runner.props["health"],
        Value::str("http://127.0.0.1:8102/api/health")
    );
    assert!(
        runner
            .deps
            .contains(&ResourceId::from("registration/runner-2")),
        "registered before it starts"
    );
    assert_eq!(
        runner.props["on_delete"],
        Value::strs(["--config", "config/runner-2.toml", "purge"])
    );
    let reg = &g.resources[&ResourceId::from("registration/runner-2")];
    assert_eq!(
        reg.props["token_sha256"],
        Value::reference("secret/runner-2-token", "sha256")
    );
    assert_eq!(
        reg.all_deps().len(),
        2,
        "the control plane and the token: {:?}",
        reg.all_deps()
    );

    let config = g.resources[&ResourceId::from("config/runner-2")].props["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(config.contains("listen = \"127.0.0.1:8102\""), "{config}");
    assert!(
        config.contains("control_plane_url = \"http://127.0.0.1:8070\""),
        "{config}"
    );
    assert_eq!(
        runner.props["config_sha256"],
        Value::str(stack::sha256_hex(&config)),
        "a config change restarts the runner"
    );

    let docs = &g.resources[&ResourceId::from("service/docs")];
    assert_eq!(docs.props["program"], Value::str("python3"));
    assert_eq!(docs.props["health"], Value::str("http://127.0.0.1:9001/"));
    let metrics = &g.resources[&ResourceId::from("service/metrics")];
    assert_eq!(metrics.props["health"], Value::str("tcp://127.0.0.1:9100"));
    assert_eq!(g.outputs["api_url"], Value::str("http://127.0.0.1:8070"));
}

#[test]
fn local_processes_cannot_share_a_port() {
    let text = r#"
name = "boxlite"
[stages.dev]
runners = 2
[stages.dev.local]
api_port = 7000
runner_port_base = 7000
[[stages.dev.services]]
name = "web"
command = ["web"]
port = 7000
"#;
    let diags = stack::load(text).unwrap_err();
    let messages: Vec<&str> = diags.iter().map(|d| d.message.as_str()).collect();
    assert_eq!(
        messages,
        ["port 7000 of service \"web\" is already used by the control plane (local.api_port)"]
    );
    assert_eq!((diags[0].line, diags[0].column), (11, 8));
}
