//! The agent: start-up, the services it runs, shutdown and re-exec.
//!
//! Start-up order: take the state directory's agent lock, prepare cgroups
//! (on v2 without systemd this moves the agent into a leaf first), build the
//! default image if missing, re-adopt boxes whose shims answer, then serve
//! the HTTP API, the admin socket and the healthcheck loop.
//!
//! SIGTERM and SIGINT stop the agent only — boxes and their sessions live in
//! their shims. SIGUSR2 (or the admin `reexec` request) re-executes the
//! binary `<state>/current` points to, keeping the pid: this is how an
//! upgrade restarts the agent where no service manager does it.

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use tokio::sync::Notify;

use crate::admin::{AdminStatus, Supervisor};
use crate::boxes::Boxes;
use crate::cgroups::Hierarchy;
use crate::config::Config;
use crate::sys;

/// Test hook: when set to the SHA-256 of the running binary, health reports
/// `degraded` (503). Lets tests build a release that fails its health check.
pub const UNHEALTHY_IF_SHA256_ENV: &str = "BOXLITE_RUNNER_UNHEALTHY_IF_SHA256";

/// The running agent.
pub struct Agent {
    /// Configuration.
    pub config: Config,
    /// Boxes.
    pub boxes: Boxes,
    /// When this process (image) started.
    pub started: Instant,
    /// Random id of this process (image), sent with every healthcheck: the
    /// control plane rotates the API key when it changes.
    pub instance: String,
    /// Imports the control plane announced.
    pub imports: crate::imports::Imports,
    /// Output limits and budget of one-shot execs.
    pub exec_capture: crate::exec::Capture,
    api_key: RwLock<Option<String>>,
    first_check: tokio::sync::watch::Sender<bool>,
    binary_sha256: OnceLock<String>,
    exe: PathBuf,
    start_time: u64,
    supervisor: Supervisor,
    unhealthy: AtomicBool,
    retiring: AtomicBool,
    wake: Notify,
    args: Vec<OsString>,
    listen_fd: std::os::fd::RawFd,
}

/// How this process is supervised (systemd service or not).
pub fn detect_supervisor() -> Supervisor {
    if std::env::var_os("INVOCATION_ID").is_some()
        && let Ok(cg) = std::fs::read_to_string("/proc/self/cgroup")
    {
        for line in cg.lines() {
            let path = line.rsplit(':').next().unwrap_or("");
            // The agent may have moved itself into a leaf below its unit.
            for comp in path.split('/').rev() {
                if comp.ends_with(".service") {
                    return Supervisor::Systemd {
                        unit: comp.to_string(),
                    };
                }
            }
        }
    }
    Supervisor::Local
}

impl Agent {
    /// The bearer key the control plane uses, if any.
    pub fn api_key(&self) -> Option<String> {
        self.api_key.read().unwrap().clone()
    }

    /// Record that the first healthcheck of this process has an outcome.
    pub fn first_check_done(&self) {
        self.first_check
            .send_if_modified(|done| !std::mem::replace(done, true));
    }

    /// Wait (at most `limit`) until the first healthcheck of this process has an
    /// outcome, so a request is judged against the key that check brought.
    pub async fn wait_first_check(&self, limit: std::time::Duration) {
        let mut rx = self.first_check.subscribe();
        let _ = tokio::time::timeout(limit, rx.wait_for(|done| *done)).await;
    }

    /// Store a new API key (persisted with mode 0600) when it changed.
    pub fn set_api_key(&self, key: &str) -> Result<()> {
        if self.api_key.read().unwrap().as_deref() == Some(key) {
            return Ok(());
        }
        crate::health::valid_api_key(key)?;
        sys::write_atomic(&self.config.layout().api_key(), key.as_bytes(), 0o600)?;
        *self.api_key.write().unwrap() = Some(key.to_string());
        tracing::info!("received a new API key from the control plane");
        Ok(())
    }

    /// Stop creating and starting boxes for the control plane: this runner is
    /// being retired (`purge`), and its boxes are about to be deleted.
    pub fn retire(&self) {
        self.retiring
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// True once [`Agent::retire`] was called (until the process restarts).
    pub fn is_retiring(&self) -> bool {
        self.retiring.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Retire the runner and delete every box it has; the number deleted.
    pub async fn purge(&self) -> anyhow::Result<usize> {
        self.retire();
        let ids: Vec<uuid::Uuid> = self.boxes.list().iter().map(|b| b.id).collect();
        for id in &ids {
            match self.boxes.delete(id).await {
                Ok(_) => {}
                // Deleted meanwhile (the control plane's own delete): gone is the goal.
                Err(e)
                    if e.downcast_ref::<crate::boxes::BoxError>()
                        .is_some_and(|b| b.code == "not_found") => {}
                Err(e) => return Err(e),
            }
        }
        self.boxes.hierarchy().remove_empty_parents();
        crate::network::teardown(&self.config.state_dir);
        Ok(ids.len())
    }

    /// SHA-256 of the running binary, once computed.
    pub fn binary_sha256(&self) -> Option<String> {
        self.binary_sha256.get().cloned()
    }

    /// False when the agent should not be considered healthy.
    pub fn healthy(&self) -> bool {
        !self.unhealthy.load(Ordering::Relaxed)
    }

    /// Ask the healthcheck loop to report now.
    pub fn wake_healthcheck(&self) {
        self.wake.notify_one();
    }

    /// Resolves when someone asked for an early healthcheck.
    pub async fn healthcheck_wakeup(&self) {
        self.wake.notified().await;
    }

    /// The admin `status` answer.
    pub fn status(&self) -> AdminStatus {
        AdminStatus {
            name: self.config.name.clone(),
            version: crate::VERSION.to_string(),
            binary_sha256: self.binary_sha256(),
            exe: self.exe.clone(),
            pid: std::process::id(),
            start_time: self.start_time,
            listen: self.config.listen.to_string(),
            supervisor: self.supervisor.clone(),
            cgroups: self.boxes.hierarchy().describe(),
            boxes: self.boxes.list(),
        }
    }

    /// The binary a re-exec would run, if it is usable.
    pub fn check_reexec(&self) -> Result<PathBuf> {
        let p = self.config.layout().current_binary();
        let meta = std::fs::metadata(&p).with_context(|| format!("{} is missing", p.display()))?;
        use std::os::unix::fs::PermissionsExt;
        if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
            bail!("{} is not an executable file", p.display());
        }
        Ok(p)
    }

    /// Replace this process with `path`, same pid and arguments. Returns only if exec failed.
    /// The API's listening socket goes along (its descriptor kept open and
    /// named in the environment), so the port is never closed meanwhile.
    pub fn reexec(&self, path: PathBuf) {
        use std::os::unix::process::CommandExt;
        tracing::info!("re-executing {}", path.display());
        let fd = self.listen_fd;
        let _ = sys::set_cloexec(fd, false);
        let err = std::process::Command::new(&path)
            .args(self.args.iter().skip(1))
            .env_remove(crate::upgrade::EXEC_HOPS_ENV)
            .env(LISTEN_FD_ENV, fd.to_string())
            .env(LISTEN_PID_ENV, std::process::id().to_string())
            .exec();
        let _ = sys::set_cloexec(fd, true);
        tracing::error!(
            "re-exec of {} failed: {err}; still running the old binary",
            path.display()
        );
    }
}

/// The descriptor of the API socket a re-exec hands to the new image.
pub const LISTEN_FD_ENV: &str = "BOXLITE_RUNNER_LISTEN_FD";
/// The pid that descriptor was handed to (the same across exec).
pub const LISTEN_PID_ENV: &str = "BOXLITE_RUNNER_LISTEN_PID";

/// The API's listening socket: the one systemd passes (socket activation,
/// `LISTEN_FDS`), or the one a re-exec of this process handed over, when it
/// listens on the configured port; else a new one. Either way, no moment
/// exists in a restart where the port is closed for a process to take.
pub fn api_listener(addr: std::net::SocketAddr) -> Result<std::net::TcpListener> {
    let me = std::process::id().to_string();
    let env = |k: &str| std::env::var(k).ok();
    let inherited = if env("LISTEN_PID").as_deref() == Some(me.as_str())
        && env("LISTEN_FDS")
            .and_then(|n| n.parse::<u32>().ok())
            .unwrap_or(0)
            >= 1
    {
        Some((3, "systemd"))
    } else if env(LISTEN_PID_ENV).as_deref() == Some(me.as_str()) {
        env(LISTEN_FD_ENV)
            .and_then(|f| f.parse::<std::os::fd::RawFd>().ok())
            .filter(|f| *f >= 3)
            .map(|f| (f, "the previous image"))
    } else {
        None
    };
    if let Some((fd, from)) = inherited {
        let mut listening: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt into a c_int of the size passed.
        let ok = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_ACCEPTCONN,
                (&mut listening as *mut libc::c_int).cast(),
                &mut len,
            )
        } == 0
            && listening == 1;
        if ok {
            let _ = sys::set_cloexec(fd, true);
            // SAFETY: a listening socket this process was given and nothing else owns.
            let l = unsafe { <std::net::TcpListener as std::os::fd::FromRawFd>::from_raw_fd(fd) };
            match l.local_addr() {
                Ok(a) if a.port() == addr.port() => {
                    l.set_nonblocking(true)?;
                    tracing::info!(listen = %a, "serving on the API socket from {from}");
                    return Ok(l);
                }
                Ok(a) => tracing::warn!(
                    "the API socket from {from} listens on {a}, not {addr}; opening {addr}"
                ),
                Err(e) => tracing::warn!("the API socket from {from}: {e}"),
            }
        } else {
            tracing::warn!("descriptor {fd} from {from} is not a listening socket; ignoring it");
        }
    }
    let l = std::net::TcpListener::bind(addr).with_context(|| format!("listening on {addr}"))?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// Egress networking for boxes (see [`crate::network`]); an error leaves the
/// runner serving `none` boxes, and says why egress boxes cannot start.
async fn setup_network(
    config: &Config,
    boxes: &Boxes,
) -> std::result::Result<crate::network::NetPlan, String> {
    use crate::config::BoxDns;
    let dns = match config.box_dns {
        BoxDns::Host => crate::network::host_resolver(),
        BoxDns::Resolver(a) => Some(a),
        BoxDns::Off => None,
    };
    if dns.is_none() && config.box_dns != BoxDns::Off {
        tracing::warn!(
            "no usable upstream resolver on this host: egress boxes get no DNS (set `box_dns`)"
        );
    }
    let mut deny = config.egress_deny.clone();
    let urls = [
        config.control_plane_url.clone(),
        config.advertise_url.clone(),
    ];
    deny.extend(
        tokio::task::spawn_blocking(move || crate::network::addresses_of(&urls))
            .await
            .unwrap_or_default(),
    );
    let allow = boxes.egress_allowances();
    let state = config.state_dir.clone();
    let subnet = config.box_subnet;
    let res = tokio::task::spawn_blocking(move || {
        crate::network::setup(&state, subnet, dns, &deny, &allow)
    })
    .await
    .map_err(|e| format!("{e}"))
    .and_then(|r| r.map_err(|e| format!("{e:#}")));
    match &res {
        Ok(p) => {
            tracing::info!(subnet = %p.subnet, dns = ?p.dns, table = %p.table(), "box egress network ready")
        }
        Err(e) => tracing::error!("box egress network unavailable: {e}"),
    }
    res
}

/// Run the agent until SIGTERM/SIGINT.
pub async fn run(config: Config) -> Result<()> {
    let layout = config.layout();
    std::fs::create_dir_all(layout.root())
        .with_context(|| format!("creating state dir {}", layout.root().display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(layout.root(), std::fs::Permissions::from_mode(0o700))?;
    let _lock = sys::try_lock(&layout.agent_lock())?.ok_or_else(|| {
        anyhow!(
            "another boxlite-runner is already running with state dir {}",
            layout.root().display()
        )
    })?;
    if !config.bwrap_path.exists() {
        bail!(
            "bubblewrap not found at {} (install the bubblewrap package)",
            config.bwrap_path.display()
        );
    }
    crate::seccomp::self_check()?;
    let hierarchy = Hierarchy::setup(&config).context("preparing cgroups")?;
    tracing::info!("{}", hierarchy.describe());
    let exe = std::fs::read_link("/proc/self/exe").context("resolving /proc/self/exe")?;
    let boxes = Boxes::new(&config, hierarchy, exe.clone())?;
    let images = boxes.images().clone();
    let busybox = config.busybox_path.clone();
    tokio::task::spawn_blocking(move || images.ensure_default(&busybox))
        .await
        .map_err(|e| anyhow!("{e}"))?
        .context("building the default image")?;
    boxes.adopt_all().await?;
    tracing::info!(
        adopted = boxes.adopted(),
        total = boxes.ids().len(),
        "boxes loaded"
    );
    boxes.set_network(setup_network(&config, &boxes).await);
    let api_key = std::fs::read_to_string(layout.api_key())
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty());
    let listener = tokio::net::TcpListener::from_std(api_listener(config.listen)?)?;
    let agent = Arc::new(Agent {
        config: config.clone(),
        boxes,
        started: Instant::now(),
        instance: format!("{:032x}", rand::random::<u128>()),
        imports: Default::default(),
        exec_capture: crate::exec::Capture::new(config.exec),
        api_key: RwLock::new(api_key),
        first_check: tokio::sync::watch::channel(false).0,
        binary_sha256: OnceLock::new(),
        start_time: sys::process_start_time(std::process::id()).unwrap_or(0),
        exe: exe.clone(),
        supervisor: detect_supervisor(),
        unhealthy: AtomicBool::new(false),
        retiring: AtomicBool::new(false),
        wake: Notify::new(),
        args: std::env::args_os().collect(),
        listen_fd: std::os::fd::AsRawFd::as_raw_fd(&listener),
    });
    // The binary's identity: from the release's checksum file, else hashed in the background.
    {
        let a = agent.clone();
        tokio::spawn(async move {
            let sha = match crate::upgrade::release_sha256_of(&a.exe) {
                Some(s) => Ok(s),
                None => {
                    let exe = a.exe.clone();
                    tokio::task::spawn_blocking(move || sys::sha256_file(&exe))
                        .await
                        .map_err(|e| anyhow!("{e}"))
                        .and_then(|r| r)
                }
            };
            match sha {
                Ok(s) => {
                    if std::env::var(UNHEALTHY_IF_SHA256_ENV).ok().as_deref() == Some(s.as_str()) {
                        tracing::warn!(
                            "{UNHEALTHY_IF_SHA256_ENV} matches this binary: reporting unhealthy"
                        );
                        a.unhealthy.store(true, Ordering::Relaxed);
                    }
                    let _ = a.binary_sha256.set(s);
                }
                Err(e) => tracing::warn!("hashing the running binary: {e:#}"),
            }
        });
    }
    let mut admin = tokio::spawn(crate::admin::serve(agent.clone(), layout.admin_socket()));
    tokio::spawn(crate::health::run(agent.clone()));
    let app = crate::api::router(agent.clone());
    let mut server = tokio::spawn(async move { axum::serve(listener, app).await });
    tracing::info!(
        name = %config.name,
        listen = %config.listen,
        pid = std::process::id(),
        version = crate::VERSION,
        "boxlite-runner serving"
    );
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut usr2 = signal(SignalKind::user_defined2())?;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = usr2.recv() => match agent.check_reexec() {
                Ok(p) => agent.reexec(p),
                Err(e) => tracing::error!("SIGUSR2: cannot re-exec: {e:#}"),
            },
            r = &mut admin => bail!("the admin socket stopped: {r:?}"),
            r = &mut server => bail!("the HTTP server stopped: {r:?}"),
        }
    }
    tracing::info!("stopping the agent; boxes keep running");
    let _ = std::fs::remove_file(layout.admin_socket());
    Ok(())
}
