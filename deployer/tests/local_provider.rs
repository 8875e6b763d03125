//! The local provider against real processes and files: start, supervise,
//! restart on change, recover from crashes, stop on destroy; and which
//! processes are a stage's own: never another state directory's, never one
//! that only carries the marker.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::time::Duration;

use deployer::engine::apply::{ApplyOptions, ApplyReport, Quiet, apply};
use deployer::engine::journal::ApplyStatus;
use deployer::engine::plan::{Action, Mode, Plan, plan};
use deployer::engine::provider::Provider;
use deployer::providers::local::LocalProvider;
use deployer::providers::local::process::{MARKER, ProcId, scan};
use stack::{DesiredGraph, Resource, ResourceId, Target, Value, kinds};
use tokio_util::sync::CancellationToken;

struct Stage {
    dir: tempfile::TempDir,
    stack: String,
    port: u16,
}

impl Stage {
    fn new() -> Stage {
        // Unique per test so the /proc scan of one test never sees another's processes.
        Stage::named(&format!("t{}", uuid::Uuid::new_v4().simple()))
    }

    /// A stage of `stack` in a state directory of its own.
    fn named(stack: &str) -> Stage {
        Stage {
            dir: tempfile::tempdir().unwrap(),
            stack: stack.to_string(),
            port: testkit::free_port(),
        }
    }

    fn provider(&self) -> LocalProvider {
        LocalProvider::new(
            &self.stack,
            "dev",
            self.dir.path().join("stage"),
            self.dir.path().to_path_buf(),
        )
    }

    fn path(&self, rel: &str) -> std::path::PathBuf {
        self.dir.path().join("stage").join(rel)
    }

    /// A directory, a secret, a config file and a web server that depends on them.
    fn graph(&self, config: &str) -> DesiredGraph {
        let mut g = DesiredGraph::new(&self.stack, "dev", Target::Local);
        g.add(
            Resource::new("dir/data", kinds::LOCAL_DIRECTORY)
                .prop("path", "data")
                .prop("mode", "0700"),
        )
        .unwrap();
        g.add(
            Resource::new("secret/key", kinds::LOCAL_SECRET)
                .prop("path", "secrets/key")
                .prop("prefix", "bxk_")
                .prop("bytes", 32u32),
        )
        .unwrap();
        g.add(
            Resource::new("config/web", kinds::LOCAL_FILE)
                .prop("path", "config/web.txt")
                .prop("content", config)
                .prop("mode", "0600"),
        )
        .unwrap();
        g.add(
            Resource::new("process/web", kinds::LOCAL_PROCESS)
                .prop("program", "python3")
                .prop(
                    "args",
                    Value::strs([
                        "-m",
                        "http.server",
                        &self.port.to_string(),
                        "--bind",
                        "127.0.0.1",
                        "--directory",
                        "data",
                    ]),
                )
                .prop("env", Value::str_map([("GREETING", "hello")]))
                .prop("health", format!("http://127.0.0.1:{}/", self.port))
                .prop("log", "logs/web.log")
                .prop("config_sha256", stack::sha256_hex(config))
                .prop("running", true)
                .dep("dir/data")
                .dep("secret/key")
                .dep("config/web"),
        )
        .unwrap();
        g
    }

    async fn plan(
        &self,
        g: &mut DesiredGraph,
        mode: Mode,
    ) -> (deployer::engine::provider::Inventory, Plan) {
        let p = self.provider();
        if mode == Mode::Deploy {
            p.prepare(g).await.unwrap();
        }
        let inv = p.observe().await.unwrap();
        let pl = plan(g, &inv, p.kinds(), mode);
        (inv, pl)
    }

    async fn apply(&self, g: &DesiredGraph, mode: Mode) -> (Plan, ApplyReport) {
        let mut g = g.clone();
        let (inv, pl) = self.plan(&mut g, mode).await;
        let report = apply(
            &self.provider(),
            &g,
            &pl,
            &inv,
            None,
            &ApplyOptions::default(),
            &Quiet,
            &CancellationToken::new(),
        )
        .await;
        (pl, report)
    }

    fn web_pids(&self) -> Vec<ProcId> {
        self.provider()
            .processes(&ResourceId::from("process/web"))
            .unwrap()
    }
}

impl Drop for Stage {
    fn drop(&mut self) {
        for f in scan(&format!("{}/", self.stack)) {
            kill(f.process.pid);
        }
    }
}

fn kill(pid: i32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
}

fn action_of<'a>(pl: &'a Plan, id: &str) -> &'a deployer::engine::plan::Change {
    pl.changes
        .iter()
        .find(|c| c.id.as_str() == id)
        .unwrap_or_else(|| panic!("{id} not in plan"))
}

fn get(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

#[tokio::test(flavor = "multi_thread")]
async fn deploy_starts_everything_and_a_rerun_changes_nothing() {
    let s = Stage::new();
    let g = s.graph("v1\n");
    let (pl, report) = s.apply(&g, Mode::Deploy).await;
    assert_eq!(pl.summary.create, 4);
    assert_eq!(report.status, ApplyStatus::Succeeded, "{:?}", report.failed);
    assert!(get(s.port), "the web server answers");

    // The secret is a 0600 file whose value appears nowhere in the plan.
    let secret = std::fs::read_to_string(s.path("secrets/key")).unwrap();
    assert!(secret.starts_with("bxk_") && secret.len() > 40);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(s.path("secrets/key"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    let json = serde_json::to_string(&deployer::render::plan_json(&pl)).unwrap();
    assert!(!json.contains(&secret[4..20]));

    // The process runs in its own session, with the declared environment only.
    let pids = s.web_pids();
    assert_eq!(pids.len(), 1);
    let pid = nix::unistd::Pid::from_raw(pids[0].pid);
    assert_eq!(
        nix::unistd::getsid(Some(pid)).unwrap(),
        pid,
        "daemonized: its own session"
    );
    let environ = std::fs::read(format!("/proc/{}/environ", pids[0].pid)).unwrap();
    let environ = String::from_utf8_lossy(&environ);
    assert!(environ.contains("GREETING=hello"));
    assert!(environ.contains(MARKER));
    assert!(
        !environ.contains("CARGO_MANIFEST_DIR"),
        "the caller's environment is not inherited"
    );

    let mut g2 = g.clone();
    let (_, again) = s.plan(&mut g2, Mode::Deploy).await;
    assert!(!again.has_changes(), "{:?}", again.summary);
    assert_eq!(again.summary.unchanged, 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crashed_process_is_drift_and_deploy_restarts_it() {
    let s = Stage::new();
    let g = s.graph("v1\n");
    s.apply(&g, Mode::Deploy).await;
    let before = s.web_pids()[0].clone();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(before.pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    testkit::wait_until(Duration::from_secs(5), || !before.is_alive());

    let mut g2 = g.clone();
    let (_, pl) = s.plan(&mut g2, Mode::Deploy).await;
    let c = action_of(&pl, "process/web");
    assert_eq!(c.action, Action::Update);
    assert_eq!(c.fields.len(), 1);
    assert_eq!(
        (c.fields[0].name.as_str(), c.fields[0].old.clone()),
        ("running", Some(Value::Bool(false)))
    );

    let (_, report) = s.apply(&g, Mode::Deploy).await;
    assert_eq!(report.status, ApplyStatus::Succeeded, "{:?}", report.failed);
    let after = s.web_pids();
    assert_eq!(after.len(), 1);
    assert_ne!(after[0], before);
    assert!(get(s.port));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_configuration_change_rewrites_the_file_and_restarts_the_process() {
    let s = Stage::new();
    s.apply(&s.graph("listen 1\nlevel info\n"), Mode::Deploy)
        .await;
    let before = s.web_pids()[0].clone();
    let g = s.graph("listen 1\nlevel debug\n");
    let mut g2 = g.clone();
    let (_, pl) = s.plan(&mut g2, Mode::Deploy).await;
    assert_eq!(action_of(&pl, "config/web").action, Action::Update);
    assert_eq!(action_of(&pl, "process/web").action, Action::Update);
    assert_eq!(
        action_of(&pl, "process/web").fields[0].name,
        "config_sha256"
    );
    let text = deployer::render::plan_text(
        &pl,
        &deployer::render::Style::new(deployer::render::ColorChoice::Never, false),
    );
    assert!(
        text.contains("-level info") && text.contains("+level debug"),
        "unified diff of the file:\n{text}"
    );

    let (_, report) = s.apply(&g, Mode::Deploy).await;
    assert_eq!(report.status, ApplyStatus::Succeeded, "{:?}", report.failed);
    assert_eq!(
        std::fs::read_to_string(s.path("config/web.txt")).unwrap(),
        "listen 1\nlevel debug\n"
    );
    assert!(!before.is_alive(), "the old process was stopped");
    assert_eq!(s.web_pids().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_changed_binary_restarts_the_process() {
    let s = Stage::new();
    let script = s.dir.path().join("serve.sh");
    let write_script = |version: &str| {
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\n# {version}\nexec python3 -m http.server \"$1\" --bind 127.0.0.1\n"
            ),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
    };
    write_script("v1");
    let mut g = DesiredGraph::new(&s.stack, "dev", Target::Local);
    g.add(
        Resource::new("process/web", kinds::LOCAL_PROCESS)
            .prop("program", "serve.sh")
            .prop("args", Value::strs([s.port.to_string()]))
            .prop("env", Value::Map(Default::default()))
            .prop("health", format!("tcp://127.0.0.1:{}", s.port))
            .prop("log", "logs/web.log")
            .prop("running", true),
    )
    .unwrap();
    // A bare name is looked up next to boxctl and on PATH; a path is relative to stack.toml.
    g.resources
        .get_mut(&ResourceId::from("process/web"))
        .unwrap()
        .props
        .insert("program".into(), Value::str("./serve.sh"));
    let (_, r) = s.apply(&g, Mode::Deploy).await;
    assert_eq!(r.status, ApplyStatus::Succeeded, "{:?}", r.failed);
    let before = s.web_pids()[0].clone();

    write_script("v2");
    let mut g2 = g.clone();
    let (_, pl) = s.plan(&mut g2, Mode::Deploy).await;
    let c = action_of(&pl, "process/web");
    assert_eq!(c.action, Action::Update);
    assert_eq!(c.fields[0].name, "program_sha256");
    let (_, r) = s.apply(&g, Mode::Deploy).await;
    assert_eq!(r.status, ApplyStatus::Succeeded, "{:?}", r.failed);
    assert!(!before.is_alive());
    assert_eq!(s.web_pids().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_process_started_by_a_run_that_died_before_recording_it_is_adopted_not_duplicated() {
    let s = Stage::new();
    let g = s.graph("v1\n");
    s.apply(&g, Mode::Deploy).await;
    // Simulate boxctl dying between starting the process and writing its record.
    std::fs::remove_file(s.path(".boxctl/resources/process~web.json")).unwrap();
    let mut g2 = g.clone();
    let (_, pl) = s.plan(&mut g2, Mode::Deploy).await;
    assert_eq!(
        action_of(&pl, "process/web").action,
        Action::Update,
        "found by its marker, so restarted, not created"
    );
    let (_, r) = s.apply(&g, Mode::Deploy).await;
    assert_eq!(r.status, ApplyStatus::Succeeded, "{:?}", r.failed);
    assert_eq!(s.web_pids().len(), 1, "exactly one server runs");
    let mut g3 = g.clone();
    assert!(!s.plan(&mut g3, Mode::Deploy).await.1.has_changes());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_process_that_never_becomes_healthy_fails_with_its_log_and_is_not_left_running() {
    let s = Stage::new();
    let mut g = DesiredGraph::new(&s.stack, "dev", Target::Local);
    g.add(
        Resource::new("process/broken", kinds::LOCAL_PROCESS)
            .prop("program", "python3")
            .prop("args", Value::strs(["-c", "import sys; print('cannot open config: no such file', file=sys.stderr); sys.exit(3)"]))
            .prop("env", Value::Map(Default::default()))
            .prop("health", format!("tcp://127.0.0.1:{}", s.port))
            .prop("log", "logs/broken.log")
            .prop("running", true),
    )
    .unwrap();
    let (_, r) = s.apply(&g, Mode::Deploy).await;
    assert_eq!(r.status, ApplyStatus::Failed);
    let msg = r.failed[0].2.to_string();
    assert!(msg.contains("exited before it became healthy"), "{msg}");
    assert!(
        msg.contains("cannot open config: no such file"),
        "the log tail is in the error: {msg}"
    );
    let marker = format!("{}/dev/process/broken", s.stack);
    assert!(scan(&marker).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_port_taken_by_a_foreign_process_is_a_clear_error() {
    let s = Stage::new();
    let _squatter = std::net::TcpListener::bind(("127.0.0.1", s.port)).unwrap();
    let (_, r) = s.apply(&s.graph("v1\n"), Mode::Deploy).await;
    assert_eq!(r.status, ApplyStatus::Failed);
    let e = &r.failed[0].2;
    assert!(
        e.message
            .contains("already in use by a process this stage does not manage"),
        "{e}"
    );
    assert!(
        e.hint
            .as_deref()
            .unwrap_or("")
            .contains("choose other ports"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn destroy_stops_processes_and_removes_files() {
    let s = Stage::new();
    let g = s.graph("v1\n");
    s.apply(&g, Mode::Deploy).await;
    let pid = s.web_pids()[0].clone();
    let (pl, r) = s.apply(&g, Mode::Destroy).await;
    assert_eq!(pl.summary.delete, 4);
    assert_eq!(r.status, ApplyStatus::Succeeded, "{:?}", r.failed);
    assert!(!pid.is_alive());
    for p in ["data", "secrets/key", "config/web.txt"] {
        assert!(!s.path(p).exists(), "{p} removed");
    }
    let inv = s.provider().observe().await.unwrap();
    assert!(inv.resources.is_empty());
    assert!(!Path::new(&s.path(".boxctl/resources/process~web.json")).exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_services_children_are_not_copies_of_it_and_stop_with_it() {
    let s = Stage::new();
    let mut g = DesiredGraph::new(&s.stack, "dev", Target::Local);
    // A service that forks a worker, as real servers do; the worker inherits the marker.
    let script = format!(
        "sleep 1000 & echo $! > worker.pid; exec python3 -m http.server {} --bind 127.0.0.1",
        s.port
    );
    g.add(
        Resource::new("service/forking", kinds::LOCAL_PROCESS)
            .prop("program", "sh")
            .prop("args", Value::strs(["-c", script.as_str()]))
            .prop("env", Value::Map(Default::default()))
            .prop("health", format!("tcp://127.0.0.1:{}", s.port))
            .prop("log", "logs/forking.log")
            .prop("running", true),
    )
    .unwrap();
    let (_, r) = s.apply(&g, Mode::Deploy).await;
    assert_eq!(r.status, ApplyStatus::Succeeded, "{:?}", r.failed);
    let worker: i32 = std::fs::read_to_string(s.path("worker.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let worker = ProcId::of(worker).expect("the worker runs");
    let inv = s.provider().observe().await.unwrap();
    assert!(
        inv.duplicates.is_empty(),
        "the worker is not a second copy: {:?}",
        inv.duplicates
    );
    let mut g2 = g.clone();
    assert!(!s.plan(&mut g2, Mode::Deploy).await.1.has_changes());
    // Deleting the service stops its group: the worker goes too.
    let (_, r) = s.apply(&g, Mode::Destroy).await;
    assert_eq!(r.status, ApplyStatus::Succeeded, "{:?}", r.failed);
    assert!(
        testkit::wait_until(Duration::from_secs(10), || !worker.is_alive()),
        "the worker was left running"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_services_secret_reaches_its_environment_only_and_a_new_value_restarts_it() {
    use deployer::secrets::{SecretStore, SecretValue, local_file};
    let s = Stage::new();
    let store = SecretStore::File(local_file(&s.dir.path().join("stage")));
    store
        .set("sentry-dsn", &SecretValue::new("dsn-value-one-5e2c"))
        .await
        .unwrap();
    let with_secret = |g: DesiredGraph| {
        let mut g = g;
        let r = g
            .resources
            .get_mut(&ResourceId::from("process/web"))
            .unwrap();
        r.props.insert(
            "secret_env".into(),
            Value::str_map([("SENTRY_DSN", "sentry-dsn")]),
        );
        g
    };
    let g = with_secret(s.graph("v1\n"));
    let (pl, report) = s.apply(&g, Mode::Deploy).await;
    assert_eq!(report.status, ApplyStatus::Succeeded, "{:?}", report.failed);
    let pid = s.web_pids()[0].pid;
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    let environ = String::from_utf8_lossy(&environ);
    assert!(
        environ.contains("SENTRY_DSN=dsn-value-one-5e2c"),
        "the process has its secret"
    );
    // The plan shows the name and a salted digest, never the value.
    let text = deployer::render::plan_text(
        &pl,
        &deployer::render::Style::new(deployer::render::ColorChoice::Never, false),
    );
    assert!(
        text.contains("sentry-dsn") && !text.contains("dsn-value-one"),
        "{text}"
    );
    for f in testkit::files_under(&s.dir.path().join("stage")) {
        if f.ends_with("stage-secrets.json") || f.starts_with(s.path("logs")) {
            continue;
        }
        let content = String::from_utf8_lossy(&std::fs::read(&f).unwrap()).into_owned();
        assert!(
            !content.contains("dsn-value-one"),
            "{} holds the value",
            f.display()
        );
    }

    // A new value restarts the process with it.
    store
        .set("sentry-dsn", &SecretValue::new("dsn-value-two-7a1b"))
        .await
        .unwrap();
    let mut g2 = g.clone();
    let (_, pl) = s.plan(&mut g2, Mode::Deploy).await;
    let change = action_of(&pl, "process/web");
    assert_eq!(change.action, Action::Update);
    assert_eq!(change.fields[0].name, "secrets_sha256");
    let (_, report) = s.apply(&g, Mode::Deploy).await;
    assert_eq!(report.status, ApplyStatus::Succeeded, "{:?}", report.failed);
    let pid = s.web_pids()[0].pid;
    let environ = String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/environ")).unwrap())
        .into_owned();
    assert!(environ.contains("SENTRY_DSN=dsn-value-two-7a1b"));

    // Removed, the process cannot start without it: a precise error.
    store.remove("sentry-dsn").await.unwrap();
    let mut g3 = g.clone();
    let e = s.provider().prepare(&mut g3).await.unwrap_err();
    assert!(
        e.to_string().contains("sentry-dsn") && e.to_string().contains("boxctl secret set"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn two_state_dirs_with_the_same_stack_and_stage_never_touch_each_other() {
    let a = Stage::new();
    let b = Stage::named(&a.stack);
    let (_, r) = a.apply(&a.graph("v1\n"), Mode::Deploy).await;
    assert_eq!(r.status, ApplyStatus::Succeeded, "{:?}", r.failed);
    let web_a = a.web_pids();
    assert_eq!(web_a.len(), 1);

    // B starts from nothing: A's process is not B's to adopt, restart or stop.
    let (pl, r) = b.apply(&b.graph("v1\n"), Mode::Deploy).await;
    assert_eq!(pl.summary.create, 4, "{:?}", pl.changes);
    assert_eq!(r.status, ApplyStatus::Succeeded, "{:?}", r.failed);
    assert!(web_a[0].is_alive(), "B's deploy stopped A's process");
    let web_b = b.web_pids();
    assert_eq!(web_b.len(), 1);
    assert_ne!(web_b, web_a);
    assert_eq!(a.web_pids(), web_a, "A sees only its own");
    for s in [&a, &b] {
        let mut g = s.graph("v1\n");
        let (inv, pl) = s.plan(&mut g, Mode::Deploy).await;
        assert!(!pl.has_changes(), "{:?}", pl.changes);
        assert!(inv.duplicates.is_empty(), "{:?}", inv.duplicates);
    }

    // Destroying B stops B's process only.
    let (_, r) = b.apply(&b.graph("v1\n"), Mode::Destroy).await;
    assert_eq!(r.status, ApplyStatus::Succeeded, "{:?}", r.failed);
    assert!(!web_b[0].is_alive());
    assert!(web_a[0].is_alive(), "B's destroy stopped A's process");
    assert!(get(a.port));
    let mut g = a.graph("v1\n");
    assert!(!a.plan(&mut g, Mode::Deploy).await.1.has_changes());
}

/// A daemon carrying `marker` like one boxctl starts (its own session, a
/// minimal environment), running `program` in `cwd`, as `uid` if given.
fn forge(program: &str, args: &[&str], marker: &str, cwd: &Path, uid: Option<u32>) -> ProcId {
    let mut cmd = std::process::Command::new(program);
    cmd.args(args)
        .current_dir(cwd)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env(MARKER, marker)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // SAFETY: setsid, setgroups, setresgid and setresuid are async-signal-safe
    // system calls; the closure allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            nix::unistd::setsid()?;
            if let Some(uid) = uid {
                let (u, g) = (
                    nix::unistd::Uid::from_raw(uid),
                    nix::unistd::Gid::from_raw(uid),
                );
                nix::unistd::setgroups(&[])?;
                nix::unistd::setresgid(g, g, g)?;
                nix::unistd::setresuid(u, u, u)?;
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    let id = ProcId::of(child.id() as i32).unwrap();
    // Reaped when it is killed, so it never lingers as a zombie.
    std::thread::spawn(move || child.wait());
    // spawn returns during the exec, a moment before the kernel shows the
    // new environment.
    assert!(
        testkit::wait_until(Duration::from_secs(5), || marker_of(id.pid).as_deref()
            == Some(marker)),
        "{program} never showed its marker"
    );
    id
}

/// The value of `MARKER` in a process's environment.
fn marker_of(pid: i32) -> Option<String> {
    let environ = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    let needle = format!("{MARKER}=");
    environ
        .split(|b| *b == 0)
        .find_map(|v| std::str::from_utf8(v).ok()?.strip_prefix(needle.as_str()))
        .map(str::to_string)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_process_carrying_the_marker_is_not_taken_for_the_process_it_names() {
    let s = Stage::new();
    let g = s.graph("v1\n");
    let (_, r) = s.apply(&g, Mode::Deploy).await;
    assert_eq!(r.status, ApplyStatus::Succeeded, "{:?}", r.failed);
    let real = s.web_pids()[0].clone();
    // The exact marker, digest of the stage directory included.
    let marker = marker_of(real.pid).unwrap();
    kill(real.pid);
    testkit::wait_until(Duration::from_secs(5), || !real.is_alive());

    let elsewhere = tempfile::tempdir().unwrap();
    let sleep = ["-c", "import time; time.sleep(600)"];
    let mut forgeries = vec![
        // The program, in the stage directory, but working elsewhere.
        (
            "another working directory",
            forge("python3", &sleep, &marker, elsewhere.path(), None),
        ),
        // As the operator, in the stage directory, but another program.
        (
            "another program",
            forge("sleep", &["600"], &marker, &s.path(""), None),
        ),
    ];
    if nix::unistd::geteuid().is_root() {
        // Everything right but the uid: what a box's process is.
        forgeries.push((
            "another uid",
            forge("python3", &sleep, &marker, &s.path(""), Some(65534)),
        ));
    }
    for (what, forged) in &forgeries {
        assert!(forged.is_alive(), "{what}");
    }

    let mut g2 = g.clone();
    let (inv, pl) = s.plan(&mut g2, Mode::Deploy).await;
    let c = action_of(&pl, "process/web");
    assert_eq!(c.action, Action::Update, "{c:?}");
    assert_eq!(
        (c.fields[0].name.as_str(), c.fields[0].old.clone()),
        ("running", Some(Value::Bool(false))),
        "the dead process is seen dead"
    );
    assert!(inv.duplicates.is_empty(), "{:?}", inv.duplicates);

    // Deploy starts the real one and stops none of the others.
    let (_, r) = s.apply(&g, Mode::Deploy).await;
    assert_eq!(r.status, ApplyStatus::Succeeded, "{:?}", r.failed);
    let now = s.web_pids();
    assert_eq!(now.len(), 1);
    assert!(get(s.port));
    for (what, forged) in &forgeries {
        assert!(forged.is_alive(), "deploy stopped the process with {what}");
        assert_ne!(now[0], *forged);
        kill(forged.pid);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_process_from_an_older_boxctl_is_found_in_its_own_stage_only() {
    let a = Stage::new();
    let g = a.graph("v1\n");
    let (_, r) = a.apply(&g, Mode::Deploy).await;
    assert_eq!(r.status, ApplyStatus::Succeeded, "{:?}", r.failed);
    // What an older boxctl left: the marker without a digest, a record, no launch note.
    let real = a.web_pids()[0].clone();
    let legacy = marker_of(real.pid).unwrap();
    let legacy = legacy.split('@').next().unwrap();
    kill(real.pid);
    testkit::wait_until(Duration::from_secs(5), || !real.is_alive());
    let port = a.port.to_string();
    let old = forge(
        "python3",
        &[
            "-m",
            "http.server",
            &port,
            "--bind",
            "127.0.0.1",
            "--directory",
            "data",
        ],
        legacy,
        &a.path(""),
        None,
    );
    testkit::wait_until(Duration::from_secs(10), || get(a.port));
    let record_path = a.path(".boxctl/resources/process~web.json");
    let mut record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&record_path).unwrap()).unwrap();
    record["process"] = serde_json::to_value(&old).unwrap();
    std::fs::write(&record_path, serde_json::to_vec(&record).unwrap()).unwrap();
    let _ = std::fs::remove_dir_all(a.path(".boxctl/launches"));

    // Its stage finds it: nothing to do, nothing duplicated.
    let mut g2 = g.clone();
    let (inv, pl) = a.plan(&mut g2, Mode::Deploy).await;
    assert!(!pl.has_changes(), "{:?}", pl.changes);
    assert!(inv.duplicates.is_empty());
    assert_eq!(a.web_pids(), vec![old.clone()]);

    // A stage of the same names elsewhere does not.
    let b = Stage::named(&a.stack);
    let (pl, r) = b.apply(&b.graph("v1\n"), Mode::Deploy).await;
    assert_eq!(pl.summary.create, 4, "{:?}", pl.changes);
    assert_eq!(r.status, ApplyStatus::Succeeded, "{:?}", r.failed);
    assert!(old.is_alive(), "B's deploy stopped A's process");
    assert_ne!(b.web_pids(), vec![old]);
}
