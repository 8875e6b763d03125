//! The local target: the platform on this machine under a stage directory.
//!
//! Each resource leaves a record under `<stage>/.boxctl/resources/`; processes
//! also carry their name in their environment, checked against what the
//! kernel says of them ([`identity`]), and boxctl notes each process it
//! starts under `<stage>/.boxctl/launches/` before it waits for it to be
//! healthy, so one found in `/proc` without a record (boxctl died before it
//! could write one) is still recognised.

pub mod host;
pub mod identity;
pub mod process;
pub mod registration;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use base64::Engine as _;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use stack::{DesiredGraph, Policy, Props, Resource, ResourceId, Value, kinds};

use crate::engine::provider::{Inventory, KindSpec, Observed, Provider, ProviderError, StepCtx};
use crate::engine::store::write_atomic;
use identity::{Expect, Found, Marker, Refused, StageId};
use process::{Health, ProcId};

/// Directory of resource records, relative to the stage directory.
pub const RECORDS_DIR: &str = ".boxctl/resources";
/// Directory of launch notes, relative to the stage directory.
pub const LAUNCHES_DIR: &str = ".boxctl/launches";
/// Directory of the lock and journal, relative to the stage directory.
pub const STATE_DIR: &str = ".boxctl/state";

const KINDS: &[KindSpec] = &[
    KindSpec {
        kind: kinds::LOCAL_DIRECTORY,
        replace_on: &["path"],
        order: 10,
        create_before_delete: false,
        volatile_outputs: &[],
    },
    KindSpec {
        kind: kinds::LOCAL_SECRET,
        replace_on: &["path", "prefix", "bytes"],
        order: 10,
        create_before_delete: false,
        volatile_outputs: &[],
    },
    KindSpec {
        kind: kinds::LOCAL_FILE,
        replace_on: &["path"],
        order: 20,
        create_before_delete: false,
        volatile_outputs: &[],
    },
    KindSpec {
        kind: kinds::LOCAL_PROCESS,
        replace_on: &[],
        order: 30,
        create_before_delete: false,
        volatile_outputs: &[],
    },
    // Same order as processes: within it, deletes follow the graph (the runner
    // goes before its registration, the registration before the control plane).
    KindSpec {
        kind: kinds::LOCAL_RUNNER_REGISTRATION,
        replace_on: &["name", "control_plane"],
        order: 30,
        create_before_delete: false,
        volatile_outputs: &[],
    },
];

/// What boxctl remembers of a resource it made.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Record {
    id: ResourceId,
    kind: String,
    props: Props,
    #[serde(default)]
    policy: Policy,
    #[serde(default)]
    generation: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    process: Option<ProcId>,
}

/// What boxctl last started for a process resource: written before it
/// starts the program and again with the process's identity right after,
/// before the health check, so a process found later without a record (the
/// run died while waiting for it) can still be checked and adopted.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Launch {
    /// The resolved program.
    program: PathBuf,
    /// The process, once started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    process: Option<ProcId>,
}

/// The local provider of one stage.
pub struct LocalProvider {
    stack: String,
    stage: String,
    stage_dir: PathBuf,
    stack_dir: PathBuf,
    health_timeout: Duration,
    digests: Mutex<BTreeMap<PathBuf, String>>,
}

fn hard(op: &str, e: impl std::fmt::Display) -> ProviderError {
    ProviderError::hard(op, e.to_string())
}

fn str_prop<'a>(r: &'a Props, key: &str, id: &ResourceId) -> Result<&'a str, ProviderError> {
    r.get(key).and_then(Value::as_str).ok_or_else(|| {
        ProviderError::hard(
            "read properties",
            format!("{id} has no text property `{key}`"),
        )
    })
}

fn mode_of(s: &str) -> u32 {
    u32::from_str_radix(s, 8).unwrap_or(0o600)
}

impl LocalProvider {
    /// The provider of `stack`/`stage`, rooted at `stage_dir`; relative program
    /// paths are relative to `stack_dir` (where stack.toml is).
    pub fn new(stack: &str, stage: &str, stage_dir: PathBuf, stack_dir: PathBuf) -> Self {
        let health_timeout = std::env::var("BOXCTL_HEALTH_TIMEOUT_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .map_or(Duration::from_secs(30), Duration::from_secs);
        LocalProvider {
            stack: stack.to_string(),
            stage: stage.to_string(),
            stage_dir,
            stack_dir,
            health_timeout,
            digests: Mutex::new(BTreeMap::new()),
        }
    }

    /// The stage directory.
    pub fn stage_dir(&self) -> &Path {
        &self.stage_dir
    }

    /// The live processes of process resource `id`, oldest first: what
    /// `observe` counts as it.
    pub fn processes(&self, id: &ResourceId) -> Result<Vec<ProcId>, ProviderError> {
        Ok(self.own_processes(
            id,
            &process::scan(&self.marker_prefix()),
            self.record(id)?.as_ref(),
            self.launches().get(id),
            None,
        ))
    }

    /// `<stack>/<stage>/`: what every marker of this stage starts with.
    fn marker_prefix(&self) -> String {
        format!("{}/{}/", self.stack, self.stage)
    }

    /// The name a process of `id` carries in its marker.
    fn marker_name(&self, id: &ResourceId) -> String {
        format!("{}{id}", self.marker_prefix())
    }

    /// A path inside the stage directory; `..` and absolute paths are refused.
    fn inside(&self, rel: &str, id: &ResourceId) -> Result<PathBuf, ProviderError> {
        let p = Path::new(rel);
        if rel.is_empty() || p.components().any(|c| !matches!(c, Component::Normal(_))) {
            return Err(ProviderError::hard(
                "resolve path",
                format!("{id}: path {rel:?} must be relative and stay inside the stage directory"),
            ));
        }
        Ok(self.stage_dir.join(p))
    }

    fn record_path(&self, id: &ResourceId) -> PathBuf {
        self.stage_dir
            .join(RECORDS_DIR)
            .join(format!("{}.json", id.as_str().replace('/', "~")))
    }

    fn launch_path(&self, id: &ResourceId) -> PathBuf {
        self.stage_dir
            .join(LAUNCHES_DIR)
            .join(format!("{}.json", id.as_str().replace('/', "~")))
    }

    fn write_launch(&self, id: &ResourceId, launch: &Launch) -> Result<(), ProviderError> {
        let body = serde_json::to_vec_pretty(launch).expect("launch serializes");
        write_atomic(&self.launch_path(id), &body, 0o600).map_err(|e| hard("write launch", e))
    }

    /// The launch notes by resource id. A note that cannot be read is no
    /// evidence of anything and is skipped (the next start rewrites it).
    fn launches(&self) -> BTreeMap<ResourceId, Launch> {
        let Ok(entries) = fs::read_dir(self.stage_dir.join(LAUNCHES_DIR)) else {
            return BTreeMap::new();
        };
        entries
            .flatten()
            .filter_map(|e| {
                let name = e
                    .file_name()
                    .to_str()?
                    .strip_suffix(".json")?
                    .replace('~', "/");
                let launch = serde_json::from_slice(&fs::read(e.path()).ok()?).ok()?;
                Some((ResourceId::new(name), launch))
            })
            .collect()
    }

    fn write_record(&self, rec: &Record) -> Result<(), ProviderError> {
        let body = serde_json::to_vec_pretty(rec).expect("record serializes");
        write_atomic(&self.record_path(&rec.id), &body, 0o600).map_err(|e| hard("write record", e))
    }

    fn remove_record(&self, id: &ResourceId) -> Result<(), ProviderError> {
        for path in [self.launch_path(id), self.record_path(id)] {
            match fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(hard("remove record", e)),
            }
        }
        Ok(())
    }

    /// The record of `id`, if boxctl has one.
    fn record(&self, id: &ResourceId) -> Result<Option<Record>, ProviderError> {
        Ok(self.records()?.into_iter().find(|r| r.id == *id))
    }

    fn records(&self) -> Result<Vec<Record>, ProviderError> {
        let dir = self.stage_dir.join(RECORDS_DIR);
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(hard("read records", format!("{}: {e}", dir.display()))),
        };
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            let body = fs::read(&path)
                .map_err(|e| hard("read record", format!("{}: {e}", path.display())))?;
            let rec: Record = serde_json::from_slice(&body).map_err(|e| {
                ProviderError::hard("read record", format!("{} is corrupt: {e}", path.display()))
                    .with_hint("remove the file; the next deploy recreates what it described")
            })?;
            out.push(rec);
        }
        Ok(out)
    }

    /// SHA-256 of a program, from the stage's digest cache when the file's
    /// size, mtime and inode are unchanged (hashing large binaries on every
    /// `diff` would cost seconds).
    fn digest(&self, path: &Path) -> Result<String, ProviderError> {
        if let Some(d) = self.digests.lock().expect("digest mutex").get(path) {
            return Ok(d.clone());
        }
        let meta = fs::metadata(path)
            .map_err(|e| hard("hash program", format!("{}: {e}", path.display())))?;
        let stamp = {
            use std::os::unix::fs::MetadataExt;
            format!(
                "{}:{}:{}:{}",
                meta.len(),
                meta.mtime(),
                meta.mtime_nsec(),
                meta.ino()
            )
        };
        let cache_path = self.stage_dir.join(".boxctl/digests.json");
        let mut cache: BTreeMap<String, (String, String)> = fs::read(&cache_path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let key = path.display().to_string();
        let digest = match cache.get(&key) {
            Some((s, d)) if *s == stamp => d.clone(),
            _ => {
                let mut f = fs::File::open(path)
                    .map_err(|e| hard("hash program", format!("{}: {e}", path.display())))?;
                let mut h = Sha256::new();
                std::io::copy(&mut f, &mut h)
                    .map_err(|e| hard("hash program", format!("{}: {e}", path.display())))?;
                let d = hex::encode(h.finalize());
                // Only a stage that exists keeps a cache: `diff` of a new stage writes nothing.
                if self.stage_dir.join(".boxctl").is_dir() {
                    cache.insert(key, (stamp, d.clone()));
                    let body = serde_json::to_vec(&cache).expect("cache serializes");
                    let _ = write_atomic(&cache_path, &body, 0o600);
                }
                d
            }
        };
        self.digests
            .lock()
            .expect("digest mutex")
            .insert(path.to_path_buf(), digest.clone());
        Ok(digest)
    }

    fn program(&self, props: &Props, id: &ResourceId) -> Result<PathBuf, ProviderError> {
        let program = str_prop(props, "program", id)?;
        process::resolve_program(program, &self.stack_dir).map_err(|e| {
            ProviderError::hard("find program", format!("{id}: {e}"))
                .with_hint("build the platform binaries with `cargo build --bins`, or set [local] bin_dir in stack.toml")
        })
    }

    /// The live processes of process resource `id`, oldest first: those
    /// carrying its marker that [`identity::check`] accepts against what
    /// boxctl knows of it — its record (program and process), its launch
    /// note, and `starting`, the program about to be started.
    fn own_processes(
        &self,
        id: &ResourceId,
        found: &[Found],
        record: Option<&Record>,
        launch: Option<&Launch>,
        starting: Option<&Path>,
    ) -> Vec<ProcId> {
        let Some(stage) = StageId::of(&self.stage_dir) else {
            return Vec::new();
        };
        let recorded = record.and_then(|r| self.program(&r.props, id).ok());
        let programs = identity::program_paths(
            launch
                .map(|l| l.program.as_path())
                .into_iter()
                .chain(recorded.as_deref())
                .chain(starting),
        );
        let known: Vec<ProcId> = record
            .and_then(|r| r.process.clone())
            .into_iter()
            .chain(launch.and_then(|l| l.process.clone()))
            .collect();
        let expect = Expect {
            uid: nix::unistd::geteuid().as_raw(),
            stage: &stage,
            programs: &programs,
            known: &known,
        };
        let name = self.marker_name(id);
        found
            .iter()
            .filter(|f| f.marker.name == name)
            .filter(|f| match identity::check(&expect, f) {
                Ok(()) => true,
                Err(why) => {
                    // Another stage's process, or one from before digests in
                    // another directory, is ordinary; one claiming this very
                    // stage directory is not.
                    if f.marker.stage.is_some() && why != Refused::OtherStage {
                        tracing::warn!(
                            "pid {} carries the marker of {id} but {why}: not taken for it",
                            f.process.pid
                        );
                    } else {
                        tracing::debug!("pid {} is not {id} of this stage: {why}", f.process.pid);
                    }
                    false
                }
            })
            .map(|f| f.process.clone())
            .collect()
    }

    fn observe_one(
        &self,
        rec: &Record,
        live: &[ProcId],
        registered: &BTreeMap<(String, String), Option<std::collections::BTreeSet<String>>>,
        inv: &mut Inventory,
    ) {
        if rec.kind == kinds::LOCAL_RUNNER_REGISTRATION {
            // Registered as recorded, unless its control plane answers and says otherwise.
            let key = (
                rec.props
                    .get("control_plane")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
                rec.props
                    .get("admin_key_path")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
            );
            let name = rec
                .props
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or_default();
            if let Some(Some(names)) = registered.get(&key)
                && !names.contains(name)
            {
                return;
            }
        }
        let id = &rec.id;
        let path = rec
            .props
            .get("path")
            .and_then(Value::as_str)
            .and_then(|p| self.inside(p, id).ok());
        let mut props = Props::new();
        let mut outputs = BTreeMap::new();
        match rec.kind.as_str() {
            kinds::LOCAL_DIRECTORY => {
                let Some(path) = path.filter(|p| p.is_dir()) else {
                    return;
                };
                let mode = fs::metadata(&path)
                    .map(|m| m.permissions().mode() & 0o7777)
                    .unwrap_or(0);
                props.insert("path".into(), rec.props["path"].clone());
                props.insert("mode".into(), Value::str(format!("{mode:04o}")));
                outputs.insert("path".into(), Value::str(path.display().to_string()));
            }
            kinds::LOCAL_FILE => {
                let Some(path) = path else { return };
                let Ok(bytes) = fs::read(&path) else { return };
                let mode = fs::metadata(&path)
                    .map(|m| m.permissions().mode() & 0o7777)
                    .unwrap_or(0);
                props.insert("path".into(), rec.props["path"].clone());
                props.insert(
                    "content".into(),
                    Value::str(String::from_utf8_lossy(&bytes)),
                );
                props.insert("mode".into(), Value::str(format!("{mode:04o}")));
                outputs.insert("path".into(), Value::str(path.display().to_string()));
            }
            kinds::LOCAL_SECRET => {
                // The value never enters the inventory: only that it exists, and
                // its SHA-256 (what a control plane stores to recognise it).
                let Some(path) = path.filter(|p| p.is_file()) else {
                    return;
                };
                let Ok(value) = fs::read(&path) else { return };
                props = rec.props.clone();
                outputs.insert("path".into(), Value::str(path.display().to_string()));
                outputs.insert(
                    "sha256".into(),
                    Value::str(hex::encode(Sha256::digest(value.trim_ascii()))),
                );
            }
            kinds::LOCAL_RUNNER_REGISTRATION => {
                props = rec.props.clone();
            }
            kinds::LOCAL_PROCESS => {
                let procs = live.to_vec();
                // The recorded process if it is one of them, else the oldest.
                let current = rec
                    .process
                    .as_ref()
                    .filter(|p| procs.contains(p))
                    .cloned()
                    .or_else(|| procs.first().cloned());
                props = rec.props.clone();
                props.insert("running".into(), Value::Bool(current.is_some()));
                let mut o = Observed::new(id.clone(), &rec.kind, props);
                o.policy = rec.policy.clone();
                o.generation = rec.generation;
                if let Some(c) = &current {
                    o.handle = Some(format!("pid {}", c.pid));
                    o.outputs.insert("pid".into(), Value::Int(i64::from(c.pid)));
                }
                inv.add(o);
                for extra in procs.into_iter().filter(|p| Some(p) != current.as_ref()) {
                    let mut d = Observed::new(id.clone(), &rec.kind, Props::new());
                    d.handle = Some(format!("pid {}", extra.pid));
                    d.outputs
                        .insert("pid".into(), Value::Int(i64::from(extra.pid)));
                    inv.duplicates.push(d);
                }
                return;
            }
            _ => return,
        }
        let mut o = Observed::new(id.clone(), &rec.kind, props);
        o.outputs = outputs;
        o.policy = rec.policy.clone();
        o.generation = rec.generation;
        inv.add(o);
    }

    fn record_for(&self, ctx: &StepCtx, d: &Resource, process: Option<ProcId>) -> Record {
        Record {
            id: d.id.clone(),
            kind: d.kind.clone(),
            props: d.props.clone(),
            policy: d.policy.clone(),
            generation: ctx.generation,
            process,
        }
    }

    async fn start_process(&self, d: &Resource, program: &Path) -> Result<ProcId, ProviderError> {
        let id = &d.id;
        let args: Vec<String> = d
            .props
            .get("args")
            .and_then(Value::as_list)
            .unwrap_or_default()
            .iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect();
        let mut env = str_map(&d.props, "env");
        // Secrets are read from the stage's secrets file only now, so their
        // values live in the process's environment and nowhere else.
        let secret_names = secret_env(&d.props);
        if !secret_names.is_empty() {
            let (values, _) = crate::secrets::local_values(
                &crate::secrets::local_file(&self.stage_dir),
                &secret_names,
            )
            .map_err(|e| hard("start process", format!("{id}: {e:#}")))?;
            env.extend(values.into_iter().map(|(k, v)| (k, v.expose().to_string())));
        }
        let health = Health::parse(str_prop(&d.props, "health", id)?)
            .map_err(|e| hard("health check", format!("{id}: {e}")))?;
        let log = self.inside(str_prop(&d.props, "log", id)?, id)?;
        if let Some(addr) = health.address()
            && process::address_in_use(addr)
        {
            return Err(ProviderError::hard(
                "start process",
                format!("{id}: {addr} is already in use by a process this stage does not manage"),
            )
            .with_hint("stop that process, or choose other ports in [local] of stack.toml"));
        }
        fs::create_dir_all(&self.stage_dir).map_err(|e| hard("start process", e))?;
        let stage = StageId::of(&self.stage_dir).ok_or_else(|| {
            hard(
                "start process",
                format!(
                    "{id}: stage directory {} vanished",
                    self.stage_dir.display()
                ),
            )
        })?;
        let marker = Marker::value(&self.marker_name(id), &stage);
        let spec = process::Spec {
            program,
            args: &args,
            env: &env,
            cwd: &stage.dir,
            log: &log,
            marker: &marker,
        };
        let mut launch = Launch {
            program: program.to_path_buf(),
            process: None,
        };
        self.write_launch(id, &launch)?;
        let (pid, offset) = process::spawn(&spec)
            .map_err(|e| hard("start process", format!("{id}: {}: {e}", program.display())))?;
        launch.process = Some(pid.clone());
        if let Err(e) = self.write_launch(id, &launch) {
            process::stop(&pid, Duration::from_secs(5));
            return Err(e);
        }
        match process::wait_healthy(&pid, &health, self.health_timeout).await {
            Ok(_) => Ok(pid),
            Err(why) => {
                let tail = process::log_tail(&log, offset, 20);
                process::stop(&pid, Duration::from_secs(5));
                let mut msg = format!("{id}: {why} ({})", health_text(&health));
                if !tail.is_empty() {
                    msg.push_str(&format!("; last lines of {}:\n{tail}", log.display()));
                }
                Err(ProviderError::hard("health check", msg))
            }
        }
    }

    /// Run the process's `on_delete` command (its own program with those
    /// arguments) before it is stopped for good; a process that is not
    /// running has nothing to hand over, so the hook is skipped with a warning.
    async fn on_delete(&self, o: &Observed) -> Result<(), ProviderError> {
        let Some(args) = o.props.get("on_delete").and_then(Value::as_list) else {
            return Ok(());
        };
        let args: Vec<String> = args
            .iter()
            .filter_map(|a| a.as_str().map(str::to_string))
            .collect();
        let alive = o
            .outputs
            .get("pid")
            .and_then(Value::as_int)
            .and_then(|p| i32::try_from(p).ok())
            .and_then(ProcId::of)
            .is_some();
        if !alive {
            tracing::warn!(
                "{} is not running: skipping `{}` before removing it",
                o.id,
                args.join(" ")
            );
            return Ok(());
        }
        let program = self.program(&o.props, &o.id)?;
        let out = tokio::time::timeout(
            Duration::from_secs(300),
            tokio::process::Command::new(&program)
                .args(&args)
                .current_dir(&self.stage_dir)
                .env_clear()
                .env("PATH", std::env::var_os("PATH").unwrap_or_default())
                .output(),
        )
        .await
        .map_err(|_| {
            ProviderError::hard(
                "on_delete",
                format!("{}: `{}` did not finish within 300 s", o.id, args.join(" ")),
            )
        })?
        .map_err(|e| hard("on_delete", format!("{}: {}: {e}", o.id, program.display())))?;
        if !out.status.success() {
            return Err(ProviderError::hard(
                "on_delete",
                format!(
                    "{}: `{} {}` failed ({}): {}",
                    o.id,
                    program.display(),
                    args.join(" "),
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            ));
        }
        Ok(())
    }

    fn stop_observed(&self, o: &Observed) {
        let pid = o
            .outputs
            .get("pid")
            .and_then(Value::as_int)
            .and_then(|p| i32::try_from(p).ok());
        if let Some(p) = pid.and_then(ProcId::of) {
            process::stop(&p, Duration::from_secs(10));
        }
    }
}

fn health_text(h: &Health) -> String {
    match h {
        Health::Http(u) => format!("GET {u}"),
        Health::Tcp(a) => format!("connect {a}"),
    }
}

/// A random secret: prefix followed by `bytes` random bytes, base64url.
fn new_secret(prefix: &str, bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut buf);
    format!(
        "{prefix}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(buf)
    )
}

impl Provider for LocalProvider {
    fn kinds(&self) -> &[KindSpec] {
        KINDS
    }

    async fn prepare(&self, graph: &mut DesiredGraph) -> Result<(), ProviderError> {
        // Runners need bubblewrap, nftables, loop devices, ...: say so before anything changes.
        if graph
            .resources
            .keys()
            .any(|id| id.as_str().starts_with("runner/"))
        {
            let missing = host::missing();
            if !missing.is_empty() {
                return Err(hard("checking this machine", host::explain(&missing)));
            }
        }
        for r in graph
            .resources
            .values_mut()
            .filter(|r| r.kind == kinds::LOCAL_PROCESS)
        {
            let program = self.program(&r.props, &r.id)?;
            let digest = self.digest(&program)?;
            r.props.insert("program_sha256".into(), Value::str(digest));
            // A changed secret value restarts the process; the digest is
            // salted per stage, so it reveals nothing about the values.
            let secret_names = secret_env(&r.props);
            if !secret_names.is_empty() {
                let (_, digest) = crate::secrets::local_values(
                    &crate::secrets::local_file(&self.stage_dir),
                    &secret_names,
                )
                .map_err(|e| hard("prepare", format!("{}: {e:#}", r.id)))?;
                r.props.insert("secrets_sha256".into(), Value::str(digest));
            }
        }
        Ok(())
    }

    async fn observe(&self) -> Result<Inventory, ProviderError> {
        let records = self.records()?;
        let mut launches = self.launches();
        let found = if self.stage_dir.exists() {
            process::scan(&self.marker_prefix())
        } else {
            Vec::new()
        };
        // Each control plane with registrations is asked once.
        let mut registered = BTreeMap::new();
        for (key, ()) in registration::endpoints(
            records
                .iter()
                .filter(|r| r.kind == kinds::LOCAL_RUNNER_REGISTRATION)
                .map(|r| &r.props),
        ) {
            let names = registration::registered(&self.stage_dir, &key.0, &key.1).await;
            registered.insert(key, names);
        }
        let mut inv = Inventory::default();
        for rec in &records {
            let launch = launches.remove(&rec.id);
            let live = if rec.kind == kinds::LOCAL_PROCESS {
                self.own_processes(&rec.id, &found, Some(rec), launch.as_ref(), None)
            } else {
                Vec::new()
            };
            self.observe_one(rec, &live, &registered, &mut inv);
        }
        // Processes boxctl started without recording them: the run died
        // before they were healthy. They are observed with no known
        // properties, so the plan restarts them under a record. A process
        // carrying a marker of this stage with neither record nor launch
        // note is nothing boxctl can vouch for, and is left alone.
        for (id, launch) in &launches {
            let procs = self.own_processes(id, &found, None, Some(launch), None);
            for (i, p) in procs.iter().enumerate() {
                let mut props = Props::new();
                props.insert("running".into(), Value::Bool(true));
                let mut o = Observed::new(id.clone(), kinds::LOCAL_PROCESS, props);
                o.handle = Some(format!("pid {}", p.pid));
                o.outputs.insert("pid".into(), Value::Int(i64::from(p.pid)));
                if i == 0 {
                    inv.add(o);
                } else {
                    inv.duplicates.push(o);
                }
            }
        }
        Ok(inv)
    }

    async fn create(&self, ctx: &StepCtx, d: &Resource) -> Result<Observed, ProviderError> {
        let id = &d.id;
        let mut outputs = BTreeMap::new();
        let mut process = None;
        match d.kind.as_str() {
            kinds::LOCAL_DIRECTORY => {
                let path = self.inside(str_prop(&d.props, "path", id)?, id)?;
                fs::create_dir_all(&path)
                    .map_err(|e| hard("create directory", format!("{}: {e}", path.display())))?;
                let mode = mode_of(str_prop(&d.props, "mode", id)?);
                fs::set_permissions(&path, fs::Permissions::from_mode(mode))
                    .map_err(|e| hard("chmod", e))?;
                outputs.insert("path".into(), Value::str(path.display().to_string()));
            }
            kinds::LOCAL_FILE => {
                let path = self.inside(str_prop(&d.props, "path", id)?, id)?;
                let mode = mode_of(str_prop(&d.props, "mode", id)?);
                write_atomic(&path, str_prop(&d.props, "content", id)?.as_bytes(), mode)
                    .map_err(|e| hard("write file", format!("{}: {e}", path.display())))?;
                outputs.insert("path".into(), Value::str(path.display().to_string()));
            }
            kinds::LOCAL_SECRET => {
                let path = self.inside(str_prop(&d.props, "path", id)?, id)?;
                let prefix = str_prop(&d.props, "prefix", id)?;
                let bytes = d
                    .props
                    .get("bytes")
                    .and_then(Value::as_int)
                    .unwrap_or(32)
                    .clamp(16, 256) as usize;
                // A secret written by a run that died before recording it is kept, not rotated.
                let existing = fs::read_to_string(&path)
                    .ok()
                    .filter(|s| s.starts_with(prefix));
                let value = match existing {
                    Some(v) => v,
                    None => {
                        let v = new_secret(prefix, bytes);
                        write_atomic(&path, v.as_bytes(), 0o600).map_err(|e| {
                            hard("write secret", format!("{}: {e}", path.display()))
                        })?;
                        v
                    }
                };
                outputs.insert("path".into(), Value::str(path.display().to_string()));
                outputs.insert(
                    "sha256".into(),
                    Value::str(hex::encode(Sha256::digest(value.trim().as_bytes()))),
                );
            }
            kinds::LOCAL_RUNNER_REGISTRATION => {
                registration::register(&self.stage_dir, &d.props, None).await?;
            }
            kinds::LOCAL_PROCESS => {
                // A process left running by a run that died: stop it before
                // starting ours (exact name only: runner-1 is not runner-10;
                // and only what passes the identity check: never another
                // stage's process, nor a box's).
                let program = self.program(&d.props, id)?;
                let stale = self.own_processes(
                    id,
                    &process::scan(&self.marker_prefix()),
                    self.record(id)?.as_ref(),
                    self.launches().get(id),
                    Some(&program),
                );
                for p in stale {
                    process::stop(&p, Duration::from_secs(10));
                }
                let pid = self.start_process(d, &program).await?;
                outputs.insert("pid".into(), Value::Int(i64::from(pid.pid)));
                process = Some(pid);
            }
            other => {
                return Err(ProviderError::hard(
                    "create",
                    format!("{id}: unknown kind {other}"),
                ));
            }
        }
        self.write_record(&self.record_for(ctx, d, process))?;
        let mut o = Observed::new(id.clone(), &d.kind, d.props.clone());
        o.outputs = outputs;
        o.policy = d.policy.clone();
        o.generation = ctx.generation;
        Ok(o)
    }

    async fn update(
        &self,
        ctx: &StepCtx,
        d: &Resource,
        current: &Observed,
        _changed: &[String],
    ) -> Result<Observed, ProviderError> {
        if d.kind == kinds::LOCAL_PROCESS {
            // Restart: stop what runs, start with the new settings.
            self.stop_observed(current);
        }
        if d.kind == kinds::LOCAL_RUNNER_REGISTRATION {
            registration::register(&self.stage_dir, &d.props, Some(&current.props)).await?;
            self.write_record(&self.record_for(ctx, d, None))?;
            let mut o = current.clone();
            o.props = d.props.clone();
            return Ok(o);
        }
        if d.kind == kinds::LOCAL_SECRET {
            // Nothing to rewrite: only its record (policy) can change in place.
            self.write_record(&self.record_for(ctx, d, None))?;
            let mut o = current.clone();
            o.props = d.props.clone();
            o.policy = d.policy.clone();
            return Ok(o);
        }
        let ctx = StepCtx {
            generation: current.generation,
            ..ctx.clone()
        };
        self.create(&ctx, d).await
    }

    async fn delete(&self, _ctx: &StepCtx, current: &Observed) -> Result<(), ProviderError> {
        let id = &current.id;
        let rel = current.props.get("path").and_then(Value::as_str);
        match current.kind.as_str() {
            kinds::LOCAL_PROCESS => {
                self.on_delete(current).await?;
                self.stop_observed(current);
            }
            kinds::LOCAL_RUNNER_REGISTRATION => {
                registration::deregister(&self.stage_dir, &current.props).await?;
            }
            kinds::LOCAL_DIRECTORY => {
                if let Some(rel) = rel {
                    let path = self.inside(rel, id)?;
                    match fs::remove_dir_all(&path) {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => {
                            return Err(hard(
                                "remove directory",
                                format!("{}: {e}", path.display()),
                            ));
                        }
                    }
                }
            }
            kinds::LOCAL_FILE | kinds::LOCAL_SECRET => {
                if let Some(rel) = rel {
                    let path = self.inside(rel, id)?;
                    match fs::remove_file(&path) {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => {
                            return Err(hard("remove file", format!("{}: {e}", path.display())));
                        }
                    }
                }
            }
            _ => {}
        }
        // A duplicate (observed with no properties) shares the id of the real
        // resource, whose record must stay.
        let is_duplicate = current.props.is_empty() && current.kind == kinds::LOCAL_PROCESS;
        if !is_duplicate {
            self.remove_record(id)?;
        }
        Ok(())
    }
}

/// A process's `secret_env`: environment variable → stage secret name.
fn secret_env(props: &stack::Props) -> BTreeMap<String, String> {
    str_map(props, "secret_env")
}

/// A map property of text values (missing: empty).
fn str_map(props: &stack::Props, key: &str) -> BTreeMap<String, String> {
    props
        .get(key)
        .and_then(Value::as_map)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_string())))
                .collect()
        })
        .unwrap_or_default()
}
