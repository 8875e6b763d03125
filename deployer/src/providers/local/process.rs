//! Supervised processes: daemonized so they outlive boxctl, found again by an
//! environment marker in `/proc` and checked to be what they claim (see
//! [`identity`](super::identity)), tracked by pid plus start time (never
//! confused after pid reuse), health-checked after start, stopped politely.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use super::identity::{Facts, Found, Marker};

/// Environment variable carrying `<stack>/<stage>/<id>@<stage digest>` (see
/// [`Marker`]): which resource a process claims to be, checked by
/// [`check`](super::identity::check) before it is believed.
pub const MARKER: &str = "BOXCTL_RESOURCE";

/// How one running process is known.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcId {
    /// Process id.
    pub pid: i32,
    /// Start time in clock ticks since boot (`/proc/<pid>/stat` field 22).
    pub start_time: u64,
    /// Boot id, so a pid from before a reboot is never taken for a live one.
    pub boot_id: String,
}

/// This boot's id.
pub fn boot_id() -> String {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map_or_else(|_| String::new(), |s| s.trim().to_string())
}

/// Fields of `/proc/<pid>/stat` this module needs.
struct Stat {
    start: u64,
    state: char,
    session: i32,
}

/// Start time, state and session of a pid, or `None` when it does not exist.
fn stat(pid: i32) -> Option<Stat> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces: split after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Indices count from field 3 (state): session is field 6, start time field 22.
    Some(Stat {
        state: fields.first()?.chars().next()?,
        session: fields.get(3)?.parse().ok()?,
        start: fields.get(19)?.parse().ok()?,
    })
}

impl ProcId {
    /// Identify a live pid.
    pub fn of(pid: i32) -> Option<ProcId> {
        stat(pid).map(|s| ProcId {
            pid,
            start_time: s.start,
            boot_id: boot_id(),
        })
    }

    /// True while this very process (not a later one with the same pid) runs.
    pub fn is_alive(&self) -> bool {
        if self.boot_id != boot_id() {
            return false;
        }
        matches!(stat(self.pid), Some(s) if s.start == self.start_time && s.state != 'Z' && s.state != 'X')
    }
}

/// Every live supervised process whose marker starts with `prefix`, with
/// what the kernel says about it; which of them a resource's are is for
/// [`check`](super::identity::check) to say. A supervised process is the session leader
/// boxctl started; its children inherit the marker but are not leaders, so
/// a service's workers are never taken for copies of the service. A process
/// boxctl may not inspect is left out.
pub fn scan(prefix: &str) -> Vec<Found> {
    let mut found = Vec::new();
    let Ok(entries) = fs::read_dir("/proc") else {
        return found;
    };
    let needle = format!("{MARKER}={prefix}");
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(environ) = fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        let Some(value) = environ
            .split(|b| *b == 0)
            .filter_map(|var| std::str::from_utf8(var).ok())
            .find(|var| var.starts_with(&needle))
            .map(|var| &var[MARKER.len() + 1..])
        else {
            continue;
        };
        let leader = stat(pid).is_some_and(|s| s.session == pid);
        let Some(process) = ProcId::of(pid).filter(|p| leader && p.is_alive()) else {
            continue;
        };
        if let Some(facts) = Facts::read(&entry.path()) {
            found.push(Found {
                marker: Marker::parse(value),
                process,
                facts,
            });
        }
    }
    found.sort_by_key(|f| (f.process.start_time, f.process.pid));
    found
}

/// What to run.
pub struct Spec<'a> {
    /// Resolved program path.
    pub program: &'a Path,
    /// Arguments.
    pub args: &'a [String],
    /// Declared environment (the operator's environment is not inherited).
    pub env: &'a BTreeMap<String, String>,
    /// Working directory.
    pub cwd: &'a Path,
    /// Log file for stdout and stderr.
    pub log: &'a Path,
    /// Marker value.
    pub marker: &'a str,
}

/// Start a daemon in its own session; returns its id and the log offset at start.
pub fn spawn(spec: &Spec<'_>) -> std::io::Result<(ProcId, u64)> {
    if let Some(parent) = spec.log.parent() {
        fs::create_dir_all(parent)?;
    }
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(spec.log)?;
    let offset = log.metadata()?.len();
    let mut cmd = Command::new(spec.program);
    cmd.args(spec.args)
        .current_dir(spec.cwd)
        .env_clear()
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // A minimal, predictable environment: nothing of the operator's (tokens,
    // credentials) leaks into the platform's processes.
    for key in ["PATH", "HOME", "USER", "LANG", "TZ"] {
        if let Some(v) = std::env::var_os(key) {
            cmd.env(key, v);
        }
    }
    cmd.envs(spec.env).env(MARKER, spec.marker);
    // SAFETY: setsid is async-signal-safe; it detaches the child from boxctl's
    // session and terminal, so Ctrl-C on boxctl does not reach it.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid()
                .map(|_| ())
                .map_err(std::io::Error::from)
        });
    }
    let mut child = cmd.spawn()?;
    let pid = i32::try_from(child.id()).map_err(|_| std::io::Error::other("pid out of range"))?;
    let id = ProcId::of(pid).ok_or_else(|| {
        std::io::Error::other(format!("process {pid} vanished right after start"))
    })?;
    // Reap it if it exits while boxctl still runs; once boxctl exits, init adopts it.
    std::thread::spawn(move || {
        let _ = child.wait();
    });
    Ok((id, offset))
}

/// SIGTERM, then SIGKILL after `grace`; true if it is gone. The signals go
/// to the process group the daemon leads, so children it left in its group
/// go with it; processes that made their own session (a runner's box shims)
/// are not in it and stay.
pub fn stop(id: &ProcId, grace: Duration) -> bool {
    if !id.is_alive() {
        return true;
    }
    let leader = stat(id.pid).is_some_and(|s| s.session == id.pid);
    let signal = |sig: Signal| {
        if leader {
            let _ = nix::sys::signal::killpg(Pid::from_raw(id.pid), sig);
        } else {
            let _ = kill(Pid::from_raw(id.pid), sig);
        }
    };
    signal(Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if !id.is_alive() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if id.is_alive() {
        signal(Signal::SIGKILL);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if !id.is_alive() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    !id.is_alive()
}

/// A health check: `http://host:port/path` answering 2xx, or `tcp://host:port` accepting.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Health {
    /// HTTP GET.
    Http(String),
    /// TCP connect.
    Tcp(String),
}

impl Health {
    /// Parse the `health` property.
    pub fn parse(s: &str) -> Result<Health, String> {
        if s.starts_with("http://") || s.starts_with("https://") {
            Ok(Health::Http(s.to_string()))
        } else if let Some(addr) = s.strip_prefix("tcp://") {
            Ok(Health::Tcp(addr.to_string()))
        } else {
            Err(format!(
                "health check {s:?} must start with http://, https:// or tcp://"
            ))
        }
    }

    /// The host:port it probes.
    pub fn address(&self) -> Option<SocketAddr> {
        let hostport = match self {
            Health::Http(url) => url.split_once("://")?.1.split('/').next()?.to_string(),
            Health::Tcp(a) => a.clone(),
        };
        hostport.to_socket_addrs().ok()?.next()
    }

    /// Probe once.
    pub async fn probe(&self, client: &reqwest::Client) -> bool {
        match self {
            Health::Http(url) => {
                matches!(client.get(url).send().await, Ok(r) if r.status().is_success())
            }
            Health::Tcp(_) => self.address().is_some_and(|a| {
                TcpStream::connect_timeout(&a, Duration::from_millis(300)).is_ok()
            }),
        }
    }
}

/// True when something already accepts connections at the address.
pub fn address_in_use(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

/// Wait until `health` passes; fails early when the process exits.
pub async fn wait_healthy(
    id: &ProcId,
    health: &Health,
    timeout: Duration,
) -> Result<Duration, String> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .no_proxy()
        .build()
        .map_err(|e| format!("http client: {e}"))?;
    let t0 = Instant::now();
    loop {
        if health.probe(&client).await {
            return Ok(t0.elapsed());
        }
        if !id.is_alive() {
            return Err(format!(
                "process {} exited before it became healthy",
                id.pid
            ));
        }
        if t0.elapsed() >= timeout {
            return Err(format!("not healthy after {}s", timeout.as_secs()));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The last `lines` lines written to `log` since `offset`.
pub fn log_tail(log: &Path, offset: u64, lines: usize) -> String {
    let Ok(mut f) = fs::File::open(log) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = offset.max(len.saturating_sub(64 * 1024));
    if f.seek(SeekFrom::Start(start)).is_err() {
        return String::new();
    }
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Find `program`: a path (relative to `base`) or a name next to boxctl or on PATH.
pub fn resolve_program(program: &str, base: &Path) -> Result<PathBuf, String> {
    if program.contains('/') {
        let p = Path::new(program);
        let p = if p.is_absolute() {
            p.to_path_buf()
        } else {
            base.join(p)
        };
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!("program {} does not exist", p.display()))
        };
    }
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(d) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        dirs.push(d);
    }
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    dirs.iter()
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .ok_or_else(|| format!("program {program:?} is neither next to boxctl nor on PATH"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_live_process_is_identified_and_a_reused_pid_is_not_confused() {
        let me = ProcId::of(std::process::id() as i32).unwrap();
        assert!(me.is_alive());
        let older = ProcId {
            start_time: me.start_time.saturating_sub(1),
            ..me.clone()
        };
        assert!(
            !older.is_alive(),
            "same pid, other start time: not the same process"
        );
        let rebooted = ProcId {
            boot_id: "other-boot".into(),
            ..me
        };
        assert!(!rebooted.is_alive());
    }

    #[test]
    fn health_checks_parse() {
        assert_eq!(
            Health::parse("tcp://127.0.0.1:80").unwrap(),
            Health::Tcp("127.0.0.1:80".into())
        );
        assert!(Health::parse("ftp://x").is_err());
        assert_eq!(
            Health::parse("http://127.0.0.1:7070/api/health")
                .unwrap()
                .address(),
            Some("127.0.0.1:7070".parse().unwrap())
        );
    }
}
