//! The per-box shim: the process that owns a running box and its sessions.
//!
//! `boxlite-runner shim --box-dir DIR` is started by the agent for each box it
//! starts and immediately detaches (double fork, own session), so it outlives
//! the agent: killing or upgrading the agent leaves every box and every exec
//! session untouched. The shim
//!
//! - mounts the box's overlay root in its own private mount namespace,
//! - creates the box's cgroups and limits,
//! - starts bubblewrap (see [`crate::sandbox`]) and is its parent
//!   (`--die-with-parent`: if the shim dies, the box dies with it rather
//!   than lingering unmanaged),
//! - holds every session's terminal or pipes, buffering output (bounded;
//!   a full buffer stops reading, so the process blocks as on a real
//!   terminal) while no client is attached,
//! - serves the agent on `DIR/shim.sock` (root only), see [`crate::ipc`].
//!
//! It is deliberately single-threaded (a current-thread runtime, no
//! blocking pool): it forks to start processes in the box.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use tokio::io::unix::AsyncFd;
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::watch;

use crate::ipc::{
    self, ExecSpec, Frame, SessionInfo, ShimInfo, ShimMessage, ShimRequest, StreamControl,
};
use crate::sandbox::{self, BoxHandle, BoxLaunch};
use crate::sys;

/// Output kept per session while nobody reads it.
const OUTPUT_BUFFER: usize = 256 * 1024;
/// How long a finished, never-collected session is kept.
const FINISHED_TTL: Duration = Duration::from_secs(600);
/// After the process exits, how long to wait for output still held open by its children.
const DRAIN_GRACE: Duration = Duration::from_millis(250);

/// Files of a box directory the shim uses.
pub fn socket_path(box_dir: &Path) -> PathBuf {
    box_dir.join("shim.sock")
}

/// The launch description written by the agent.
pub fn launch_path(box_dir: &Path) -> PathBuf {
    box_dir.join("launch.json")
}

/// Entry point of `boxlite-runner shim`. Never returns on success (the
/// detached shim exits when its box stops); the first process returns as
/// soon as it has forked. Must be called before any runtime or thread starts.
pub fn run(box_dir: &Path, ready_fd: Option<RawFd>) -> Result<()> {
    let launch: BoxLaunch = serde_json::from_slice(
        &std::fs::read(launch_path(box_dir)).context("reading launch.json")?,
    )
    .context("parsing launch.json")?;
    // SAFETY: fork in a single-threaded process; the parent only exits.
    match unsafe { libc::fork() } {
        -1 => bail!("fork: {}", std::io::Error::last_os_error()),
        0 => {}
        _ => unsafe { libc::_exit(0) },
    }
    // SAFETY: plain system call.
    unsafe { libc::setsid() };
    let ready = ready_fd.map(|fd| unsafe { std::fs::File::from_raw_fd(fd) });
    let report = |ready: Option<std::fs::File>, msg: serde_json::Value| {
        if let Some(mut f) = ready {
            let _ = f.write_all(msg.to_string().as_bytes());
        }
    };
    match setup(box_dir, launch) {
        Ok((shim, listener)) => {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    report(
                        ready,
                        serde_json::json!({"ok": false, "error": format!("starting the shim runtime: {e}")}),
                    );
                    // The box dies with us (bubblewrap --die-with-parent).
                    std::process::exit(1);
                }
            };
            let local = tokio::task::LocalSet::new();
            // Ready is reported from inside the runtime, once connections are served.
            let on_ready = move |info: ShimInfo| {
                report(ready, serde_json::json!({"ok": true, "info": info}));
            };
            let code = local.block_on(&rt, serve(shim, listener, on_ready));
            std::process::exit(code);
        }
        Err(e) => {
            tracing::error!("box failed to start: {e:#}");
            report(
                ready,
                serde_json::json!({"ok": false, "error": format!("{e:#}")}),
            );
            std::process::exit(1);
        }
    }
}

/// Everything up to a running box and a bound socket (synchronous, before the runtime).
fn setup(
    box_dir: &Path,
    mut launch: BoxLaunch,
) -> Result<(Rc<Shim>, std::os::unix::net::UnixListener)> {
    let t0 = Instant::now();
    let _ = std::fs::write("/proc/self/oom_score_adj", "-900");
    sandbox::ensure_mount_base()?;
    sandbox::enter_private_mount_ns()?;
    let root = sandbox::mount_overlay(&launch)?;
    let t_mount = t0.elapsed();
    launch
        .placement
        .create(&launch.limits)
        .context("creating the box's cgroups")?;
    let t_cgroup = t0.elapsed();
    let policy = crate::seccomp::Policy::compile()?;
    let stderr = std::io::stderr().as_raw_fd();
    let started = sandbox::start_box(&launch, &root, &policy, stderr)?;
    tracing::debug!(
        mount_ms = t_mount.as_secs_f64() * 1e3,
        cgroup_ms = (t_cgroup - t_mount).as_secs_f64() * 1e3,
        bwrap_ms = (t0.elapsed() - t_cgroup).as_secs_f64() * 1e3,
        "box set up"
    );
    let handle = match BoxHandle::open(started.pid1, &launch, policy) {
        Ok(h) => h,
        Err(e) => {
            unsafe { libc::kill(started.pid1 as i32, libc::SIGKILL) };
            return Err(e);
        }
    };
    if let Some(e) = &launch.egress {
        let t_net = Instant::now();
        if let Err(err) = crate::network::attach(e, started.pid1, &handle.net_ns) {
            unsafe { libc::kill(started.pid1 as i32, libc::SIGKILL) };
            return Err(err);
        }
        tracing::debug!(
            net_ms = t_net.elapsed().as_secs_f64() * 1e3,
            address = %e.address,
            "egress interface up"
        );
    }
    handle.enter_pid_namespace()?;
    let sock = socket_path(box_dir);
    let _ = std::fs::remove_file(&sock);
    let (_dir, addr) = crate::sys::socket_addr_path(&sock)?;
    let listener = std::os::unix::net::UnixListener::bind(&addr)
        .with_context(|| format!("binding {}", sock.display()))?;
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600))?;
    listener.set_nonblocking(true)?;
    let me = std::process::id();
    let shim = Rc::new(Shim {
        box_dir: box_dir.to_path_buf(),
        shim_start_time: sys::process_start_time(me).unwrap_or(0),
        bwrap_pid: started.bwrap_pid,
        pid1: started.pid1,
        pid1_start_time: sys::process_start_time(started.pid1).unwrap_or(0),
        handle,
        launch,
        sessions: RefCell::new(HashMap::new()),
        by_pid: RefCell::new(HashMap::new()),
        orphans: RefCell::new(HashMap::new()),
        box_exit: Cell::new(None),
        stopping: Cell::new(false),
        tick: watch::channel(0u64).0,
    });
    Ok((shim, listener))
}

struct Shim {
    box_dir: PathBuf,
    launch: BoxLaunch,
    handle: BoxHandle,
    shim_start_time: u64,
    bwrap_pid: u32,
    pid1: u32,
    pid1_start_time: u64,
    sessions: RefCell<HashMap<String, Rc<Session>>>,
    by_pid: RefCell<HashMap<u32, String>>,
    orphans: RefCell<HashMap<u32, i32>>,
    box_exit: Cell<Option<i32>>,
    stopping: Cell<bool>,
    /// Bumped when the box itself changes state.
    tick: watch::Sender<u64>,
}

struct Session {
    id: String,
    pid: u32,
    tty: bool,
    detachable: bool,
    master: Option<Rc<AsyncFd<OwnedFd>>>,
    stdin: RefCell<Option<Rc<AsyncFd<OwnedFd>>>>,
    buf: RefCell<VecDeque<(u8, Vec<u8>)>>,
    buf_bytes: Cell<usize>,
    open_streams: Cell<u8>,
    exit: Cell<Option<i32>>,
    exited_at: Cell<Option<Instant>>,
    attach_gen: Cell<u64>,
    /// Bumped on every change (output, space, exit, attach).
    tick: watch::Sender<u64>,
}

impl Session {
    fn bump(&self) {
        self.tick.send_modify(|v| *v = v.wrapping_add(1));
    }

    fn info(&self) -> SessionInfo {
        SessionInfo {
            id: self.id.clone(),
            pid: self.pid,
            tty: self.tty,
            exit_code: self.exit.get(),
        }
    }

    /// Deliver `sig` to the session's process group (the terminal's
    /// foreground group when it has one).
    fn signal(&self, sig: i32) {
        // SAFETY: plain system calls.
        unsafe {
            if let Some(m) = &self.master {
                let fg = libc::tcgetpgrp(m.get_ref().as_raw_fd());
                if fg > 0 && libc::kill(-fg, sig) == 0 {
                    return;
                }
            }
            if libc::kill(-(self.pid as i32), sig) != 0 {
                libc::kill(self.pid as i32, sig);
            }
        }
    }
}

impl Shim {
    fn info(&self) -> ShimInfo {
        let mut sessions: Vec<SessionInfo> =
            self.sessions.borrow().values().map(|s| s.info()).collect();
        sessions.sort_by(|a, b| a.id.cmp(&b.id));
        let cgroup_dir = match &self.launch.placement {
            crate::cgroups::Placement::SystemdScope { dir, .. } => dir.clone(),
            crate::cgroups::Placement::V2 { dir } => Some(dir.clone()),
            _ => None,
        };
        ShimInfo {
            protocol: ipc::PROTOCOL_VERSION,
            version: crate::VERSION.to_string(),
            box_id: self.launch.id,
            shim_pid: std::process::id(),
            shim_start_time: self.shim_start_time,
            bwrap_pid: self.bwrap_pid,
            pid1: self.pid1,
            pid1_start_time: self.pid1_start_time,
            cgroup_dir,
            sessions,
        }
    }

    /// Reap every exited child and record exit codes.
    fn reap(&self) {
        loop {
            let mut status = 0;
            // SAFETY: waitpid with an out pointer.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG | libc::__WALL) };
            if pid <= 0 {
                break;
            }
            let code = if libc::WIFEXITED(status) {
                libc::WEXITSTATUS(status)
            } else if libc::WIFSIGNALED(status) {
                128 + libc::WTERMSIG(status)
            } else {
                continue;
            };
            let pid = pid as u32;
            if pid == self.bwrap_pid {
                self.box_exit.set(Some(code));
                self.tick.send_modify(|v| *v = v.wrapping_add(1));
                continue;
            }
            let sid = self.by_pid.borrow_mut().remove(&pid);
            match sid.and_then(|sid| self.sessions.borrow().get(&sid).cloned()) {
                Some(s) => {
                    s.exit.set(Some(code));
                    s.exited_at.set(Some(Instant::now()));
                    s.bump();
                }
                None => {
                    let mut o = self.orphans.borrow_mut();
                    // Only the exit of a process forked a moment ago and not yet
                    // registered matters; never let this grow.
                    if o.len() > 1024 {
                        o.clear();
                    }
                    o.insert(pid, code);
                }
            }
        }
    }

    fn remove_session(&self, id: &str) {
        if let Some(s) = self.sessions.borrow_mut().remove(id) {
            self.by_pid.borrow_mut().remove(&s.pid);
        }
    }

    /// Start a process in the box.
    fn exec(self: &Rc<Self>, spec: &ExecSpec, detachable: bool) -> Result<Rc<Session>> {
        if self.stopping.get() || self.box_exit.get().is_some() {
            bail!("the box is stopping");
        }
        {
            let s = self.sessions.borrow();
            if s.len() >= self.launch.max_sessions {
                bail!(
                    "too many sessions in this box ({}); attach to or finish some first",
                    s.len()
                );
            }
        }
        let prepared = self.handle.prepare(spec)?;
        let (pid, master, stdin, outputs) = if spec.tty {
            let (master, peer) = sandbox::open_pty(
                &self.handle,
                self.launch.ids.base,
                spec.rows.unwrap_or(24),
                spec.cols.unwrap_or(80),
            )?;
            let p = peer.as_raw_fd();
            let pid = self.handle.spawn(&prepared, [p, p, p], true)?;
            drop(peer);
            sys::set_nonblocking(master.as_raw_fd(), true)?;
            let m = Rc::new(async_fd(master)?);
            (pid, Some(m.clone()), None, vec![(ipc::STDOUT, m)])
        } else {
            let (in_r, in_w) = sys::pipe()?;
            let (out_r, out_w) = sys::pipe()?;
            let (err_r, err_w) = sys::pipe()?;
            let pid = self.handle.spawn(
                &prepared,
                [in_r.as_raw_fd(), out_w.as_raw_fd(), err_w.as_raw_fd()],
                false,
            )?;
            drop((in_r, out_w, err_w));
            for fd in [&in_w, &out_r, &err_r] {
                sys::set_nonblocking(fd.as_raw_fd(), true)?;
            }
            (
                pid,
                None,
                Some(Rc::new(async_fd(in_w)?)),
                vec![
                    (ipc::STDOUT, Rc::new(async_fd(out_r)?)),
                    (ipc::STDERR, Rc::new(async_fd(err_r)?)),
                ],
            )
        };
        let id = uuid::Uuid::new_v4().simple().to_string();
        let session = Rc::new(Session {
            id: id.clone(),
            pid,
            tty: spec.tty,
            detachable,
            master,
            stdin: RefCell::new(stdin),
            buf: RefCell::new(VecDeque::new()),
            buf_bytes: Cell::new(0),
            open_streams: Cell::new(outputs.len() as u8),
            exit: Cell::new(None),
            exited_at: Cell::new(None),
            attach_gen: Cell::new(0),
            tick: watch::channel(0u64).0,
        });
        // A very fast process may already have been reaped.
        if let Some(code) = self.orphans.borrow_mut().remove(&pid) {
            session.exit.set(Some(code));
            session.exited_at.set(Some(Instant::now()));
        } else {
            self.by_pid.borrow_mut().insert(pid, id.clone());
        }
        self.sessions.borrow_mut().insert(id, session.clone());
        for (kind, fd) in outputs {
            tokio::task::spawn_local(read_output(session.clone(), kind, fd));
        }
        Ok(session)
    }

    /// Stop the box: SIGTERM to its processes, SIGKILL to PID 1 after `grace`
    /// (which ends the whole pid namespace), then wait for bubblewrap.
    async fn stop(&self, grace: Duration) {
        self.stopping.set(true);
        let keep = [self.bwrap_pid, self.pid1];
        let others = |s: &Shim| -> Vec<u32> {
            s.launch
                .placement
                .pids()
                .into_iter()
                .filter(|p| !keep.contains(p))
                .collect()
        };
        for p in others(self) {
            // SAFETY: plain kill.
            unsafe { libc::kill(p as i32, libc::SIGTERM) };
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline && !others(self).is_empty() {
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        // SAFETY: plain kill.
        unsafe { libc::kill(self.pid1 as i32, libc::SIGKILL) };
        let mut rx = self.tick.subscribe();
        let wait = async {
            while self.box_exit.get().is_none() {
                self.reap();
                if self.box_exit.get().is_some() {
                    break;
                }
                let _ = tokio::time::timeout(Duration::from_millis(100), rx.changed()).await;
            }
        };
        if tokio::time::timeout(Duration::from_secs(10), wait)
            .await
            .is_err()
        {
            unsafe { libc::kill(self.bwrap_pid as i32, libc::SIGKILL) };
            self.reap();
        }
    }
}

/// Register a descriptor we exclusively own with the runtime.
fn async_fd(fd: OwnedFd) -> Result<AsyncFd<OwnedFd>> {
    // SAFETY: `fd` is owned here and nowhere else; the AsyncFd owns it from now on.
    unsafe { AsyncFd::register(fd) }.map_err(|e| anyhow!("registering a descriptor: {e}"))
}

/// Read one output stream of a session into its buffer until EOF.
async fn read_output(s: Rc<Session>, kind: u8, fd: Rc<AsyncFd<OwnedFd>>) {
    let mut rx = s.tick.subscribe();
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        while s.buf_bytes.get() >= OUTPUT_BUFFER {
            if rx.changed().await.is_err() {
                return;
            }
        }
        let mut guard = match fd.readable().await {
            Ok(g) => g,
            Err(_) => break,
        };
        match guard.try_io(|inner| Ok(nix::unistd::read(inner.get_ref(), &mut buf)?)) {
            Ok(Ok(0)) => break,
            Ok(Ok(n)) => {
                s.buf.borrow_mut().push_back((kind, buf[..n].to_vec()));
                s.buf_bytes.set(s.buf_bytes.get() + n);
                s.bump();
            }
            // EIO: the terminal's last user went away.
            Ok(Err(_)) => break,
            Err(_would_block) => continue,
        }
    }
    s.open_streams.set(s.open_streams.get().saturating_sub(1));
    s.bump();
}

async fn write_fd(fd: &AsyncFd<OwnedFd>, mut data: &[u8]) -> std::io::Result<()> {
    while !data.is_empty() {
        let mut guard = fd.writable().await?;
        match guard.try_io(|inner| Ok(nix::unistd::write(inner.get_ref(), data)?)) {
            Ok(Ok(n)) => data = &data[n..],
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => continue,
        }
    }
    Ok(())
}

/// SIGKILL the session's process group until it is empty (a process that
/// forks while being killed would otherwise leave survivors), for up to 5 s.
fn kill_group(s: Rc<Session>) {
    s.signal(libc::SIGKILL);
    tokio::task::spawn_local(async move {
        for _ in 0..1000 {
            // SAFETY: plain kill; ESRCH means the group is gone.
            if unsafe { libc::kill(-(s.pid as i32), libc::SIGKILL) } != 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
}

/// Agent → session: stdin and control messages, until the connection closes.
async fn input_loop(s: Rc<Session>, mut rd: OwnedReadHalf, generation: u64) {
    loop {
        let frame = match ipc::read_frame(&mut rd).await {
            Ok(Some(f)) => f,
            _ => return,
        };
        if s.attach_gen.get() != generation {
            return;
        }
        match frame {
            Frame::Data(ipc::STDIN, data) => {
                let target = s.master.clone().or_else(|| s.stdin.borrow().clone());
                if let Some(fd) = target {
                    // A process that stopped reading must not wedge the shim:
                    // the write is awaited here, on this connection's task only.
                    if write_fd(&fd, &data).await.is_err() && s.master.is_none() {
                        s.stdin.borrow_mut().take();
                    }
                }
            }
            Frame::Data(..) => {}
            Frame::Json(j) => match ipc::parse::<StreamControl>(&j) {
                Ok(StreamControl::Resize { rows, cols }) => {
                    if let Some(m) = &s.master {
                        let ws = libc::winsize {
                            ws_row: rows.max(1),
                            ws_col: cols.max(1),
                            ws_xpixel: 0,
                            ws_ypixel: 0,
                        };
                        // SAFETY: ioctl on our master with a valid winsize.
                        unsafe { libc::ioctl(m.get_ref().as_raw_fd(), libc::TIOCSWINSZ, &ws) };
                    }
                }
                Ok(StreamControl::Signal { signal }) => {
                    if signal == libc::SIGKILL {
                        kill_group(s.clone());
                    } else if (1..=64).contains(&signal) {
                        s.signal(signal);
                    }
                }
                Ok(StreamControl::StdinEof) => match &s.master {
                    // A terminal has no end of file: send the EOF character.
                    Some(m) => {
                        let _ = write_fd(m, &[0x04]).await;
                    }
                    None => {
                        s.stdin.borrow_mut().take();
                    }
                },
                Err(_) => return,
            },
        }
    }
}

/// Stream a session over `conn` until it ends, the client leaves, or someone else attaches.
async fn stream(shim: Rc<Shim>, s: Rc<Session>, conn: UnixStream) {
    let generation = s.attach_gen.get() + 1;
    s.attach_gen.set(generation);
    s.bump();
    let (rd, mut wr) = conn.into_split();
    let mut input = tokio::task::spawn_local(input_loop(s.clone(), rd, generation));
    let mut rx = s.tick.subscribe();
    let mut client_gone = false;
    let delivered = loop {
        if s.attach_gen.get() != generation {
            let _ = ipc::write_json(
                &mut wr,
                &ShimMessage::Error {
                    message: "the session was attached elsewhere".into(),
                },
            )
            .await;
            break false;
        }
        // Send buffered output; remove a chunk only once it is written.
        let next = s.buf.borrow().front().cloned();
        if let Some((kind, data)) = next {
            if write_out(&mut wr, kind, &data).await.is_err() {
                client_gone = true;
                break false;
            }
            if s.attach_gen.get() == generation {
                s.buf.borrow_mut().pop_front();
                s.buf_bytes
                    .set(s.buf_bytes.get().saturating_sub(data.len()));
                s.bump();
            }
            continue;
        }
        let mut wait = Duration::from_secs(3600);
        if let Some(code) = s.exit.get() {
            let since = s.exited_at.get().map(|t| t.elapsed()).unwrap_or_default();
            if s.open_streams.get() == 0 || since >= DRAIN_GRACE {
                if ipc::write_json(&mut wr, &ShimMessage::Exit { code })
                    .await
                    .is_ok()
                {
                    break true;
                }
                client_gone = true;
                break false;
            }
            wait = DRAIN_GRACE - since;
        }
        tokio::select! {
            r = rx.changed() => { if r.is_err() { break false; } }
            _ = &mut input => { client_gone = true; break false; }
            _ = tokio::time::sleep(wait) => {}
        }
    };
    input.abort();
    if delivered {
        shim.remove_session(&s.id);
    } else if client_gone
        && s.attach_gen.get() == generation
        && !s.detachable
        && s.exit.get().is_none()
    {
        // A one-shot exec whose caller went away (or timed out): end it.
        kill_group(s.clone());
    }
}

async fn write_out(wr: &mut OwnedWriteHalf, kind: u8, data: &[u8]) -> Result<()> {
    ipc::write_data(wr, kind, data).await
}

/// Handle one agent connection.
async fn handle(shim: Rc<Shim>, mut conn: UnixStream) {
    let req = match tokio::time::timeout(Duration::from_secs(10), ipc::read_frame(&mut conn)).await
    {
        Ok(Ok(Some(Frame::Json(j)))) => ipc::parse::<ShimRequest>(&j),
        _ => return,
    };
    let req = match req {
        Ok(r) => r,
        Err(e) => {
            let _ = ipc::write_json(
                &mut conn,
                &ShimMessage::Error {
                    message: format!("{e:#}"),
                },
            )
            .await;
            return;
        }
    };
    match req {
        ShimRequest::Hello => {
            let _ = ipc::write_json(&mut conn, &ShimMessage::Info { info: shim.info() }).await;
        }
        ShimRequest::Exec { spec, detachable } => match shim.exec(&spec, detachable) {
            Ok(s) => {
                let started = ShimMessage::Started {
                    session: s.id.clone(),
                    pid: s.pid,
                };
                if ipc::write_json(&mut conn, &started).await.is_ok() {
                    stream(shim, s, conn).await;
                } else if !detachable {
                    s.signal(libc::SIGKILL);
                }
            }
            Err(e) => {
                let _ = ipc::write_json(
                    &mut conn,
                    &ShimMessage::Error {
                        message: format!("{e:#}"),
                    },
                )
                .await;
            }
        },
        ShimRequest::Attach { session } => {
            let s = shim.sessions.borrow().get(&session).cloned();
            match s {
                Some(s) => {
                    let started = ShimMessage::Started {
                        session: s.id.clone(),
                        pid: s.pid,
                    };
                    if ipc::write_json(&mut conn, &started).await.is_ok() {
                        stream(shim, s, conn).await;
                    }
                }
                None => {
                    let _ = ipc::write_json(
                        &mut conn,
                        &ShimMessage::Error {
                            message: format!("no session {session:?} in this box"),
                        },
                    )
                    .await;
                }
            }
        }
        ShimRequest::Stop { grace_ms } => {
            if !shim.stopping.get() {
                shim.stop(Duration::from_millis(grace_ms.min(300_000)))
                    .await;
            }
            let _ = ipc::write_json(&mut conn, &ShimMessage::Stopped).await;
            finish(&shim, 0);
        }
    }
}

/// Remove the socket and exit.
fn finish(shim: &Shim, code: i32) -> ! {
    let _ = std::fs::remove_file(socket_path(&shim.box_dir));
    tracing::info!(box_id = %shim.launch.id, "shim exiting");
    std::process::exit(code);
}

async fn serve(
    shim: Rc<Shim>,
    listener: std::os::unix::net::UnixListener,
    on_ready: impl FnOnce(ShimInfo),
) -> i32 {
    let listener = match tokio::net::UnixListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("socket: {e}");
            return 1;
        }
    };
    let mut sigchld = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("SIGCHLD handler: {e}");
            return 1;
        }
    };
    // The shim ignores SIGTERM/SIGINT/SIGHUP: only the agent stops a box.
    for kind in [
        tokio::signal::unix::SignalKind::terminate(),
        tokio::signal::unix::SignalKind::interrupt(),
        tokio::signal::unix::SignalKind::hangup(),
    ] {
        if let Ok(mut s) = tokio::signal::unix::signal(kind) {
            tokio::task::spawn_local(async move { while s.recv().await.is_some() {} });
        }
    }
    shim.reap();
    on_ready(shim.info());
    tracing::info!(box_id = %shim.launch.id, pid1 = shim.pid1, "box started");
    let mut janitor = tokio::time::interval(Duration::from_secs(30));
    let mut box_rx = shim.tick.subscribe();
    loop {
        tokio::select! {
            a = listener.accept() => {
                if let Ok((conn, _)) = a {
                    // Only root (the agent) may talk to a shim.
                    let ok = conn.peer_cred().map(|c| c.uid() == 0 || c.uid() == nix::unistd::geteuid().as_raw()).unwrap_or(false);
                    if ok {
                        tokio::task::spawn_local(handle(shim.clone(), conn));
                    }
                }
            }
            _ = sigchld.recv() => shim.reap(),
            _ = box_rx.changed() => {}
            _ = janitor.tick() => {
                let stale: Vec<String> = shim.sessions.borrow().values()
                    .filter(|s| s.exited_at.get().is_some_and(|t| t.elapsed() > FINISHED_TTL))
                    .map(|s| s.id.clone()).collect();
                for id in stale { shim.remove_session(&id); }
            }
        }
        if let Some(code) = shim.box_exit.get()
            && !shim.stopping.get()
        {
            tracing::warn!(box_id = %shim.launch.id, code, "the box ended on its own");
            // Let attached clients receive their exit codes.
            tokio::time::sleep(Duration::from_millis(300)).await;
            finish(&shim, 1);
        }
    }
}

/// Start a shim for the box in `box_dir` and wait until its box runs.
/// `program` is the runner binary (or `systemd-run` followed by its arguments
/// and the runner binary). Returns what the shim reports.
pub async fn launch(
    program: &[PathBuf],
    args_prefix: &[String],
    box_dir: &Path,
    log: &Path,
) -> Result<ShimInfo> {
    let (ready_r, ready_w) = sys::pipe()?;
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    let (first, rest) = program
        .split_first()
        .ok_or_else(|| anyhow!("no program to start the shim with"))?;
    let mut cmd = std::process::Command::new(first);
    cmd.args(args_prefix)
        .args(rest)
        .arg("shim")
        .arg("--box-dir")
        .arg(box_dir)
        .arg("--ready-fd")
        .arg("3")
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdin(std::process::Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file);
    let w = ready_w.as_raw_fd();
    // SAFETY: dup2/setsid/close_range are async-signal-safe.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(move || {
            if libc::dup2(w, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::setsid();
            // The agent's sockets and files stay with the agent.
            libc::syscall(
                libc::SYS_close_range,
                4u32,
                u32::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            );
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("starting the shim")?;
    drop(ready_w);
    // The first shim process forks and exits at once.
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .map_err(|e| anyhow!("{e}"))??;
    let mut f = tokio::fs::File::from_std(std::fs::File::from(ready_r));
    let mut out = Vec::new();
    use tokio::io::AsyncReadExt;
    let read = tokio::time::timeout(Duration::from_secs(30), f.read_to_end(&mut out)).await;
    if read.is_err() {
        bail!("the shim did not report within 30 s");
    }
    if out.is_empty() {
        // Some launchers (systemd-run) may not pass the pipe on: ask the socket.
        let sock = socket_path(box_dir);
        for _ in 0..100 {
            if let Ok(info) = ipc::hello(&sock).await {
                return Ok(info);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!(
            "the shim exited ({status}) without starting the box; see {}",
            log.display()
        );
    }
    let v: serde_json::Value = serde_json::from_slice(&out).context("the shim's report")?;
    if v.get("ok").and_then(|o| o.as_bool()) == Some(true) {
        Ok(serde_json::from_value(v["info"].clone())?)
    } else {
        bail!(
            "{}",
            v.get("error")
                .and_then(|e| e.as_str())
                .unwrap_or("the shim failed")
        )
    }
}
