//! The real `boxlite-control-plane` binary: the config file boxctl renders,
//! environment overrides (the ECS way), SIGTERM, and no secrets in its logs.

use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;
use testkit::postgres::PostgresServer;

const BIN: &str = env!("CARGO_BIN_EXE_boxlite-control-plane");

struct Proc {
    child: Option<Child>,
    dir: std::path::PathBuf,
    name: String,
}

impl Proc {
    /// Start the binary in `dir` with `args` and `env`; output goes to files in `dir`.
    fn start(dir: &Path, name: &str, args: &[&str], env: &[(&str, String)]) -> Proc {
        let out = std::fs::File::create(dir.join(format!("{name}.out"))).unwrap();
        let err = std::fs::File::create(dir.join(format!("{name}.err"))).unwrap();
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        for (k, _) in std::env::vars() {
            if k.starts_with("BOXLITE_") {
                cmd.env_remove(k);
            }
        }
        cmd.env("RUST_LOG", "info");
        for (k, v) in env {
            cmd.env(k, v);
        }
        Proc {
            child: Some(cmd.spawn().expect("spawn boxlite-control-plane")),
            dir: dir.to_path_buf(),
            name: name.to_string(),
        }
    }

    fn logs(&self) -> String {
        let out = std::fs::read_to_string(self.dir.join(format!("{}.out", self.name)))
            .unwrap_or_default();
        let err = std::fs::read_to_string(self.dir.join(format!("{}.err", self.name)))
            .unwrap_or_default();
        format!("{out}{err}")
    }

    fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut().unwrap();
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                self.child = None;
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "did not exit in {timeout:?}:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, then the exit status.
    fn terminate(&mut self) -> ExitStatus {
        let pid = self.child.as_ref().unwrap().id();
        kill(Pid::from_raw(pid as i32), Signal::SIGTERM).unwrap();
        self.wait(Duration::from_secs(20))
    }

    fn wait_ready(&mut self, port: u16) {
        let ok = testkit::wait_until(Duration::from_secs(30), || {
            if let Some(s) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("exited early ({s}):\n{}", self.logs());
            }
            testkit::wait_for_port(port, Duration::from_millis(100))
        });
        assert!(ok, "not listening on {port}:\n{}", self.logs());
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn get(url: &str, key: Option<&str>) -> (u16, Value) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut rb = reqwest::Client::new().get(url);
        if let Some(k) = key {
            rb = rb.bearer_auth(k);
        }
        let r = rb.send().await.unwrap();
        let s = r.status().as_u16();
        (s, r.json().await.unwrap_or(Value::Null))
    })
}

fn render_config(port: u16) -> String {
    // What boxctl renders from templates/local/control-plane.toml for the local target.
    let template = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../templates/local/control-plane.toml"),
    )
    .unwrap();
    template
        .replace("{{stage}}", "test")
        .replace("{{api_port}}", &port.to_string())
        .replace(
            "{{database_url}}",
            "sqlite://data/control-plane.db?mode=rwc",
        )
        .replace("{{admin_key_file}}", "secrets/admin.key")
        .replace("{{oidc}}", "")
}

#[test]
fn serves_from_the_rendered_config_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let key = control_plane::tokens::generate(protocol::API_KEY_PREFIX);
    std::fs::create_dir(dir.path().join("secrets")).unwrap();
    std::fs::write(dir.path().join("secrets/admin.key"), format!("{key}\n")).unwrap();
    let port = testkit::free_port();
    std::fs::write(dir.path().join("control-plane.toml"), render_config(port)).unwrap();
    let base = format!("http://127.0.0.1:{port}");

    let mut p = Proc::start(
        dir.path(),
        "first",
        &["--config", "control-plane.toml"],
        &[],
    );
    p.wait_ready(port);
    let (s, v) = get(&format!("{base}/api/health"), None);
    assert_eq!((s, v["database"].as_bool()), (200, Some(true)), "{v}");
    let (s, v) = get(&format!("{base}/api/me"), Some(&key));
    assert_eq!((s, v["admin"].as_bool()), (200, Some(true)), "{v}");
    assert!(
        dir.path().join("data/control-plane.db").is_file(),
        "relative database path"
    );
    assert!(p.terminate().success());
    let logs = p.logs();
    assert!(
        logs.contains("SIGTERM received") && logs.contains("stopped"),
        "{logs}"
    );
    assert!(
        !logs.contains(&key[4..]),
        "the admin key must not be logged:\n{logs}"
    );

    // Same key again: nothing added.
    let mut p = Proc::start(
        dir.path(),
        "second",
        &["--config", "control-plane.toml"],
        &[],
    );
    p.wait_ready(port);
    let (_, keys) = get(&format!("{base}/api/keys"), Some(&key));
    assert_eq!(keys.as_array().unwrap().len(), 1);
    assert!(p.terminate().success());

    // Environment wins over the file: another port, another admin key (added).
    let port2 = testkit::free_port();
    let key2 = control_plane::tokens::generate(protocol::API_KEY_PREFIX);
    let env = [
        ("BOXLITE_LISTEN", format!("127.0.0.1:{port2}")),
        ("BOXLITE_ADMIN_KEY", key2.clone()),
    ];
    let mut p = Proc::start(
        dir.path(),
        "third",
        &["--config", "control-plane.toml"],
        &env,
    );
    p.wait_ready(port2);
    let (s, keys) = get(&format!("http://127.0.0.1:{port2}/api/keys"), Some(&key2));
    assert_eq!(s, 200);
    assert_eq!(keys.as_array().unwrap().len(), 2);
    let (s, _) = get(&format!("http://127.0.0.1:{port2}/api/me"), Some(&key));
    assert_eq!(s, 200, "the earlier key keeps working until revoked");
    assert!(p.terminate().success());
    assert!(!p.logs().contains(&key2[4..]));
}

#[test]
fn runs_on_postgres_from_the_environment_alone_with_json_logs() {
    let pg = PostgresServer::shared();
    let url = pg.create_unique_database("cpbin").unwrap();
    // Trust authentication ignores the password; it is here to prove it is never logged.
    let url = url.replace(
        "postgres://postgres@",
        "postgres://postgres:s3cretPassw0rd@",
    );
    let dir = tempfile::tempdir().unwrap();
    let key = control_plane::tokens::generate(protocol::API_KEY_PREFIX);
    let port = testkit::free_port();
    let env = [
        ("BOXLITE_DATABASE_URL", url),
        ("BOXLITE_ADMIN_KEY", key.clone()),
        ("BOXLITE_LISTEN", format!("127.0.0.1:{port}")),
        ("BOXLITE_LOG_FORMAT", "json".to_string()),
        ("BOXLITE_RUNNER_UNRESPONSIVE_AFTER_SECS", "30".to_string()),
    ];
    let mut p = Proc::start(dir.path(), "pg", &[], &env);
    p.wait_ready(port);
    let (s, v) = get(&format!("http://127.0.0.1:{port}/api/health"), None);
    assert_eq!((s, v["database"].as_bool()), (200, Some(true)));
    let (s, _) = get(
        &format!("http://127.0.0.1:{port}/api/admin/runners"),
        Some(&key),
    );
    assert_eq!(s, 200);
    assert!(p.terminate().success());
    let logs = p.logs();
    assert!(
        !logs.contains("s3cretPassw0rd"),
        "database password logged:\n{logs}"
    );
    assert!(!logs.contains(&key[4..]), "admin key logged:\n{logs}");
    let lines: Vec<&str> = logs.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() >= 3, "{logs}");
    for l in lines {
        let v: Value =
            serde_json::from_str(l).unwrap_or_else(|_| panic!("not a JSON log line: {l}"));
        assert!(v["level"].is_string() && v["timestamp"].is_string(), "{l}");
    }
    assert!(
        logs.contains("request_id"),
        "request logs carry the request id:\n{logs}"
    );
}

#[test]
fn refuses_bad_configuration_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    // (config file, text expected in the output, environment)
    type Case<'a> = (&'a str, &'a str, Vec<(&'a str, String)>);
    let cases: Vec<Case> = vec![
        (
            "database_url = \"sqlite://x.db\"\nadmin_key_file = \"k\"\nlisten_addr = \"x\"\n",
            "listen_addr",
            vec![],
        ),
        (
            "database_url = \"sqlite://x.db\"\nadmin_key_file = \"missing.key\"\n",
            "missing.key",
            vec![],
        ),
        ("database_url = \"sqlite://x.db\"\n", "no admin key", vec![]),
        (
            "database_url = \"sqlite://x.db\"\n",
            "BOXLITE_RUNNER_UNRESPONSIVE_AFTER_SECS",
            vec![
                (
                    "BOXLITE_ADMIN_KEY",
                    "bxk_0123456789abcdefghijklmn".to_string(),
                ),
                ("BOXLITE_RUNNER_UNRESPONSIVE_AFTER_SECS", "soon".to_string()),
            ],
        ),
    ];
    for (i, (toml, expect, env)) in cases.into_iter().enumerate() {
        std::fs::write(dir.path().join("cp.toml"), toml).unwrap();
        let mut p = Proc::start(
            dir.path(),
            &format!("bad{i}"),
            &["--config", "cp.toml"],
            &env,
        );
        let status = p.wait(Duration::from_secs(10));
        assert_eq!(status.code(), Some(2), "{}", p.logs());
        assert!(
            p.logs().contains(expect),
            "expected {expect:?} in:\n{}",
            p.logs()
        );
    }
    // A database it cannot reach: a clear failure, not a hang or a panic.
    let env = [
        (
            "BOXLITE_DATABASE_URL",
            format!(
                "postgres://postgres:pw@127.0.0.1:{}/x",
                testkit::free_port()
            ),
        ),
        (
            "BOXLITE_ADMIN_KEY",
            "bxk_0123456789abcdefghijklmn".to_string(),
        ),
    ];
    let mut p = Proc::start(dir.path(), "nodb", &[], &env);
    let status = p.wait(Duration::from_secs(30));
    assert_eq!(status.code(), Some(1), "{}", p.logs());
    assert!(p.logs().contains("connect to the database"), "{}", p.logs());
    assert!(!p.logs().contains("pw@"), "{}", p.logs());
}
