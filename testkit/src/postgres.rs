//! A real PostgreSQL server for tests and benchmarks.
//!
//! [`PostgresServer::start`] runs Debian's PostgreSQL binaries: `initdb` into a
//! fresh temporary directory, `postgres` on a free 127.0.0.1 port (as the
//! `postgres` system user when the test runs as root, because PostgreSQL
//! refuses to run as root), trust authentication on loopback only. Databases
//! are created with [`PostgresServer::create_database`]. Dropping the server
//! (or [`PostgresServer::stop`]) shuts PostgreSQL down and removes the
//! directory.
//!
//! [`PostgresServer::shared`] gives one server per test process, stopped by an
//! `atexit` hook when the test binary exits. Should the process die without
//! running it, the server is told by the kernel (parent-death signal) and shuts
//! itself down.
//!
//! Nothing is skipped silently: when the binaries are missing, starting fails
//! with a message that says which package to install.

use std::fs::File;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

/// Environment variable naming the directory that holds `initdb` and `postgres`.
pub const PG_BIN_ENV: &str = "BOXLITE_PG_BIN";

/// How the server is tuned.
#[derive(Clone, Debug)]
pub struct PostgresOptions {
    /// Keep PostgreSQL's durability settings (fsync, synchronous commit, full
    /// page writes). Off by default: tests lose nothing when the machine
    /// crashes, and run much faster without fsync.
    pub durable: bool,
    /// `max_connections`.
    pub max_connections: u32,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        PostgresOptions {
            durable: false,
            max_connections: 300,
        }
    }
}

/// A running PostgreSQL server owned by this process.
pub struct PostgresServer {
    port: u16,
    bin_dir: PathBuf,
    dir: PathBuf,
    version: String,
    state: Mutex<Option<Running>>,
}

struct Running {
    stop: mpsc::Sender<()>,
    keeper: JoinHandle<()>,
    _dir: tempfile::TempDir,
}

static SHARED: OnceLock<PostgresServer> = OnceLock::new();
static DB_COUNTER: AtomicU32 = AtomicU32::new(0);

impl PostgresServer {
    /// Start a server tuned for tests (see [`PostgresOptions::default`]).
    pub fn start() -> Result<Self> {
        Self::start_with(PostgresOptions::default())
    }

    /// One server for the whole test process, started on first use and
    /// stopped when the process exits. Panics with a clear message when it
    /// cannot start (missing binaries, no `postgres` user).
    pub fn shared() -> &'static PostgresServer {
        SHARED.get_or_init(|| {
            let server = PostgresServer::start().unwrap_or_else(|e| {
                panic!("cannot start the shared PostgreSQL test server: {e:#}")
            });
            // Statics are never dropped: stop the server from an exit hook.
            // SAFETY: registering a plain `extern "C"` function with no captured state.
            unsafe {
                libc::atexit(stop_shared_at_exit);
            }
            server
        })
    }

    /// Start a server with `options`.
    pub fn start_with(options: PostgresOptions) -> Result<Self> {
        let bin_dir = find_bin_dir()?;
        let run_as = postgres_user()?;
        let version = pg_version(&bin_dir).unwrap_or_else(|_| "unknown".to_string());

        let tmp = tempfile::Builder::new()
            .prefix("boxlite-pg-")
            .tempdir()
            .context("create a temporary directory for PostgreSQL")?;
        let dir = tmp.path().to_path_buf();
        if let Some((uid, gid)) = run_as {
            nix::unistd::chown(&dir, Some(uid.into()), Some(gid.into()))
                .with_context(|| format!("chown {} to the postgres user", dir.display()))?;
        }
        let data = dir.join("data");
        let log_path = dir.join("postgres.log");

        // initdb
        let mut initdb = Command::new(bin_dir.join("initdb"));
        initdb
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ])
            .stdin(Stdio::null());
        as_user(&mut initdb, run_as);
        let out = initdb
            .output()
            .with_context(|| format!("run {}", bin_dir.join("initdb").display()))?;
        if !out.status.success() {
            bail!(
                "initdb failed ({}):\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }

        let port = crate::free_port();
        let mut cmd = Command::new(bin_dir.join("postgres"));
        cmd.arg("-D")
            .arg(&data)
            .arg("-p")
            .arg(port.to_string())
            .arg("-c")
            .arg("listen_addresses=127.0.0.1")
            .arg("-c")
            .arg(format!("unix_socket_directories={}", dir.display()))
            .arg("-c")
            .arg(format!("max_connections={}", options.max_connections))
            .args([
                "-c",
                "logging_collector=off",
                "-c",
                "log_min_messages=warning",
            ]);
        if !options.durable {
            cmd.args([
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
            ]);
        }
        let log = File::create(&log_path).context("create the PostgreSQL log file")?;
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().context("clone the log file handle")?)
            .stderr(log);
        as_user(&mut cmd, run_as);
        // SAFETY: prctl and getppid are async-signal-safe; the closure allocates nothing.
        unsafe {
            cmd.pre_exec(|| {
                // After setuid (which clears it): if the thread that spawned us
                // dies, PostgreSQL gets SIGQUIT (immediate shutdown).
                if libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGQUIT as libc::c_ulong,
                    0,
                    0,
                    0,
                ) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }

        // The child is spawned and owned by a keeper thread that lives until
        // `stop`, so the parent-death signal fires only when the keeper (or the
        // whole process) goes away, never when a short-lived test thread ends.
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let (ready_tx, ready_rx) = mpsc::channel::<std::io::Result<u32>>();
        let keeper = std::thread::Builder::new()
            .name(format!("postgres-{port}"))
            .spawn(move || {
                let child = match cmd.spawn() {
                    Ok(c) => {
                        let _ = ready_tx.send(Ok(c.id()));
                        c
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                keep(child, stop_rx);
            })
            .context("spawn the PostgreSQL keeper thread")?;
        ready_rx
            .recv()
            .map_err(|_| anyhow!("PostgreSQL keeper thread died"))?
            .with_context(|| format!("start {}", bin_dir.join("postgres").display()))?;

        let server = PostgresServer {
            port,
            bin_dir,
            dir,
            version,
            state: Mutex::new(Some(Running {
                stop: stop_tx,
                keeper,
                _dir: tmp,
            })),
        };
        server.wait_ready(Duration::from_secs(60)).map_err(|e| {
            let tail = read_tail(&log_path, 4000);
            anyhow!("{e:#}\n--- postgres log ---\n{tail}")
        })?;
        Ok(server)
    }

    fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let ok = Command::new(self.bin_dir.join("pg_isready"))
                .args([
                    "-h",
                    "127.0.0.1",
                    "-U",
                    "postgres",
                    "-d",
                    "postgres",
                    "-t",
                    "2",
                ])
                .arg("-p")
                .arg(self.port.to_string())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ok {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "PostgreSQL did not accept connections on 127.0.0.1:{} within {timeout:?}",
                    self.port
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `major.minor` of the server binaries (e.g. `15.14`).
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Directory holding the data directory, socket and log.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Connection URL of database `db` as the `postgres` superuser.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Create database `name` (letters, digits, `_`) and return its URL.
    pub fn create_database(&self, name: &str) -> Result<String> {
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            bail!("invalid database name {name:?}: use letters, digits and _");
        }
        let out = Command::new(self.bin_dir.join("createdb"))
            .args(["-h", "127.0.0.1", "-U", "postgres"])
            .arg("-p")
            .arg(self.port.to_string())
            .arg(name)
            .stdin(Stdio::null())
            .output()
            .context("run createdb")?;
        if !out.status.success() {
            bail!(
                "createdb {name} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(self.url(name))
    }

    /// Create a database with a name unique in this process (`prefix_<pid>_<n>`).
    pub fn create_unique_database(&self, prefix: &str) -> Result<String> {
        let n = DB_COUNTER.fetch_add(1, Ordering::Relaxed);
        self.create_database(&format!("{prefix}_{}_{n}", std::process::id()))
    }

    /// Shut PostgreSQL down (fast shutdown, then SIGKILL after 10 s) and remove
    /// its directory. Idempotent.
    pub fn stop(&self) {
        let running = match self.state.lock() {
            Ok(mut g) => g.take(),
            Err(p) => p.into_inner().take(),
        };
        if let Some(r) = running {
            let _ = r.stop.send(());
            let _ = r.keeper.join();
            // `_dir` drops here: the directory is removed.
        }
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        self.stop();
    }
}

extern "C" fn stop_shared_at_exit() {
    if let Some(s) = SHARED.get() {
        s.stop();
    }
}

/// Keeper thread body: wait for the stop order (or the server dying), then shut down.
fn keep(mut child: Child, stop: mpsc::Receiver<()>) {
    loop {
        match stop.recv_timeout(Duration::from_millis(500)) {
            Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if !matches!(child.try_wait(), Ok(None)) {
                    return; // exited on its own; nothing to stop
                }
            }
        }
    }
    // SIGINT = "fast shutdown": disconnect clients, checkpoint, exit.
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if !matches!(child.try_wait(), Ok(None)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn as_user(cmd: &mut Command, run_as: Option<(u32, u32)>) {
    if let Some((uid, gid)) = run_as {
        // std clears supplementary groups when root drops to `uid`.
        cmd.uid(uid).gid(gid);
    }
}

/// `Some((uid, gid))` of the `postgres` user when running as root, `None` otherwise.
fn postgres_user() -> Result<Option<(u32, u32)>> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(None);
    }
    let user = nix::unistd::User::from_name("postgres")
        .context("look up the postgres user")?
        .ok_or_else(|| {
            anyhow!(
                "running as root but there is no `postgres` system user to run PostgreSQL as \
                 (PostgreSQL refuses to run as root); install Debian's `postgresql` package, \
                 which creates it"
            )
        })?;
    Ok(Some((user.uid.as_raw(), user.gid.as_raw())))
}

/// Directory with `initdb`, `postgres`, `pg_isready` and `createdb`.
pub fn find_bin_dir() -> Result<PathBuf> {
    let has_all = |d: &Path| {
        ["initdb", "postgres", "pg_isready", "createdb"]
            .iter()
            .all(|b| d.join(b).is_file())
    };
    if let Some(d) = std::env::var_os(PG_BIN_ENV) {
        let d = PathBuf::from(d);
        if has_all(&d) {
            return Ok(d);
        }
        bail!(
            "{PG_BIN_ENV}={} does not hold initdb, postgres, pg_isready and createdb",
            d.display()
        );
    }
    // Debian: /usr/lib/postgresql/<major>/bin; take the newest.
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let major: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            has_all(&bin).then_some((major, bin))
        })
        .collect();
    found.sort();
    if let Some((_, d)) = found.pop() {
        return Ok(d);
    }
    if let Some(path) = std::env::var_os("PATH") {
        for d in std::env::split_paths(&path) {
            if has_all(&d) {
                return Ok(d);
            }
        }
    }
    bail!(
        "PostgreSQL server binaries (initdb, postgres) not found. Install Debian's PostgreSQL \
         server package (`apt-get install postgresql`, which provides /usr/lib/postgresql/<version>/bin), \
         or set {PG_BIN_ENV} to the directory that holds them"
    )
}

fn pg_version(bin_dir: &Path) -> Result<String> {
    let out = Command::new(bin_dir.join("postgres"))
        .arg("--version")
        .output()?;
    let s = String::from_utf8_lossy(&out.stdout);
    Ok(s.split_whitespace().last().unwrap_or("unknown").to_string())
}

fn read_tail(path: &Path, max: usize) -> String {
    let mut s = String::new();
    if let Ok(mut f) = File::open(path) {
        let _ = f.read_to_string(&mut s);
    }
    if s.len() > max {
        let mut cut = s.len() - max;
        while !s.is_char_boundary(cut) {
            cut += 1;
        }
        s = s[cut..].to_string();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_creates_databases_and_cleans_up_on_drop() {
        let server = PostgresServer::start().expect("start PostgreSQL");
        let dir = server.dir().to_path_buf();
        let port = server.port();
        assert!(dir.join("data").join("PG_VERSION").is_file());
        let url = server.create_unique_database("testkit").expect("createdb");
        assert!(url.starts_with(&format!("postgres://postgres@127.0.0.1:{port}/testkit_")));
        // A second database with the same name is refused by PostgreSQL itself.
        let name = url.rsplit('/').next().unwrap().to_string();
        assert!(server.create_database(&name).is_err());
        assert!(server.create_database("bad-name; drop").is_err());
        drop(server);
        assert!(!dir.exists(), "data directory removed on drop");
        assert!(
            !crate::wait_for_port(port, Duration::from_millis(300)),
            "server stopped on drop"
        );
    }

    #[test]
    fn shared_server_is_started_once() {
        let a = PostgresServer::shared();
        let b = PostgresServer::shared();
        assert_eq!(a.port(), b.port());
        assert!(crate::wait_for_port(a.port(), Duration::from_secs(1)));
    }
}
