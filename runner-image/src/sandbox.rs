//! Starting a box with bubblewrap, and starting processes inside a running box.
//!
//! A box's root is an overlay (image read-only below, the box's own upper
//! directory on top) mounted in the shim's private mount namespace, so it
//! never shows up in the host's mount table and disappears with the box; its
//! layers are named by descriptor (`/proc/self/fd/N`), so the box's
//! `/proc/self/mountinfo` names no host path.
//!
//! bubblewrap runs as the box's own unprivileged host uid (the first of its
//! range, [`IdRange`]) and creates the box's user namespace; it then waits
//! (`--userns-block-fd`) while the shim, root on the host, maps the box's
//! whole uid/gid range into it and caps nested user namespaces at zero
//! there. Then new pid, ipc, uts, cgroup and network namespaces (the network
//! one always: see [`crate::network`]), `--new-session`, every capability
//! dropped, the seccomp programs of [`crate::seccomp`], the box's cgroup
//! joined and its rlimits set before anything runs, and [`crate::init_elf`]
//! as PID 1. Only the descriptors in [`BWRAP_FDS`] reach bubblewrap, and PID
//! 1 closes all of them first thing.
//!
//! Later processes (exec sessions) do not go through bubblewrap: the shim
//! forks, and the child joins the box's cgroup, enters its namespaces
//! (opened once from PID 1 and kept), becomes root of the box's user
//! namespace (the box's first uid on the host), drops every capability and
//! the bounding set, sets `no_new_privs`, starts a new session, sets the
//! box's rlimits, installs the same seccomp programs, marks every other
//! descriptor close-on-exec and executes the command. Everything the child
//! needs is prepared before `fork`, so the child only makes system calls.

use std::collections::BTreeMap;
use std::ffi::{CStr, CString};
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};

use crate::cgroups::{Limits, Placement};
use crate::ids::IdRange;
use crate::ipc::ExecSpec;
use crate::network::EgressLaunch;
use crate::seccomp::Policy;
use crate::sys;

/// Default `PATH` inside a box.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Login shells, in order of preference.
pub const SHELLS: [&str; 6] = [
    "/bin/bash",
    "/usr/bin/bash",
    "/bin/ash",
    "/usr/bin/ash",
    "/bin/sh",
    "/usr/bin/sh",
];
/// Readiness pipe (PID 1 writes `R` once the sandbox is complete).
const FD_READY: RawFd = 3;
/// bubblewrap's `--info-fd` (reports PID 1's host pid).
const FD_INFO: RawFd = 4;
/// First of the seccomp programs' descriptors.
const FD_SECCOMP: RawFd = 5;
/// Slots for seccomp programs.
const SECCOMP_SLOTS: usize = 4;
/// The init program (a sealed memfd), executed as `/proc/self/fd/9`.
const FD_INIT: RawFd = 9;
/// The box's root directory.
const FD_ROOT: RawFd = 10;
/// `--userns-block-fd`: bubblewrap waits on it while the shim maps the box's ids.
const FD_USERNS_BLOCK: RawFd = 11;
/// `/etc/resolv.conf` of an egress box (`--ro-bind-data`).
const FD_RESOLV: RawFd = 12;
/// Descriptor numbers bubblewrap receives, in order.
pub const BWRAP_FDS: [RawFd; 10] = [3, 4, 5, 6, 7, 8, 9, 10, 11, 12];
/// `RLIMIT_CORE` of every box process. 1, not 0: a pipe `core_pattern` (the
/// host's crash reporter, run as root outside the box) ignores 0 but refuses
/// to run for a limit of 1, and a file dump needs a page at least.
pub const CORE_LIMIT: u64 = 1;

/// Everything a shim needs to start one box (`<box>/launch.json`, written by the agent).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BoxLaunch {
    /// Box id.
    pub id: uuid::Uuid,
    /// Image root filesystem (overlay lower layer).
    pub lower: PathBuf,
    /// The box's disk image, holding its writable layer (see [`crate::disk`]).
    pub disk: PathBuf,
    /// The egress interface of the box; `None`: loopback only.
    pub egress: Option<EgressLaunch>,
    /// Host name inside the box.
    pub hostname: String,
    /// Environment of every process in the box (image's, then the spec's).
    pub env: BTreeMap<String, String>,
    /// cgroups.
    pub placement: Placement,
    /// Limits.
    pub limits: Limits,
    /// Host uids and gids of the box.
    pub ids: IdRange,
    /// Host ids the image's files are owned by (shown to the box in its range).
    pub lower_ids: IdRange,
    /// `RLIMIT_NOFILE` of every process in the box.
    pub nofile: u64,
    /// bubblewrap binary.
    pub bwrap: PathBuf,
    /// Most sessions kept at once.
    pub max_sessions: usize,
}

/// Enter a new, private mount namespace (the shim's own).
pub fn enter_private_mount_ns() -> Result<()> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
        .context("unshare(CLONE_NEWNS) (are we root?)")?;
    nix::mount::mount(
        None::<&str>,
        "/",
        None::<&str>,
        nix::mount::MsFlags::MS_REC | nix::mount::MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .context("making the shim's mounts private")?;
    Ok(())
}

/// Where the shim mounts the box's root inside its private mount namespace.
/// bubblewrap runs as the unprivileged box uid and resolves its bind source
/// by path, so the path must be traversable by that uid; the state
/// directory is not (0700). `/run/boxlite` exists on the host only as an
/// empty directory: each shim mounts its own private tmpfs over it.
pub const SANDBOX_MOUNT_BASE: &str = "/run/boxlite";

/// Mount the box's root (in the current, private mount namespace) and
/// return where it is: the image, idmapped into the box's id range, below
/// the box's own disk (`upper/` and `work/` on it) in an overlay. The
/// layers are opened first, never through a symlink, and named to
/// overlayfs by descriptor, so the mount options the box can read in its
/// `/proc/self/mountinfo` are `/proc/self/fd/N`, not host paths. The disk
/// stays locked by this process for its life.
pub fn mount_overlay(l: &BoxLaunch) -> Result<PathBuf> {
    let open = |p: &Path| -> Result<OwnedFd> {
        let c = sys::cpath(p)?;
        // SAFETY: valid C string; flags are constants.
        let fd = unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("{} is missing or not a directory", p.display()));
        }
        // SAFETY: fresh descriptor.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    };
    let base = Path::new(SANDBOX_MOUNT_BASE);
    nix::mount::mount(
        Some("tmpfs"),
        base,
        Some("tmpfs"),
        nix::mount::MsFlags::MS_NOSUID
            | nix::mount::MsFlags::MS_NODEV
            | nix::mount::MsFlags::MS_NOEXEC,
        Some("mode=0755,size=64k"),
    )
    .with_context(|| format!("mounting a private tmpfs on {}", base.display()))?;
    // The image, its ids shown in the box's range (an idmapped mount).
    let lower = base.join("lower");
    std::fs::create_dir(&lower)?;
    let userns = crate::ids::idmap_userns(&crate::ids::idmap_line(l.lower_ids, l.ids))?;
    crate::ids::mount_idmapped(&l.lower, &lower, &userns)?;
    drop(userns);
    // The box's disk.
    let disk = base.join("disk");
    std::fs::create_dir(&disk)?;
    let mounted = crate::disk::mount(&l.disk, &disk, false)?;
    let (upper, work) = crate::disk::prepare_layers(&disk, l.ids.base)?;
    crate::disk::leak(mounted);
    let layers = [open(&lower)?, open(&upper)?, open(&work)?];
    let root = base.join("root");
    std::fs::create_dir(&root)?;
    let fd = |f: &OwnedFd| format!("/proc/self/fd/{}", f.as_raw_fd());
    let opts = format!(
        "lowerdir={},upperdir={},workdir={},index=off,metacopy=off,redirect_dir=off",
        fd(&layers[0]),
        fd(&layers[1]),
        fd(&layers[2]),
    );
    nix::mount::mount(
        Some("overlay"),
        &root,
        Some("overlay"),
        nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
        Some(opts.as_str()),
    )
    .with_context(|| format!("mounting the overlay root at {}", root.display()))?;
    Ok(root)
}

/// Create the (empty, host-visible) mount base; run before entering the private namespace.
pub fn ensure_mount_base() -> Result<()> {
    std::fs::create_dir_all(SANDBOX_MOUNT_BASE)
        .with_context(|| format!("creating {SANDBOX_MOUNT_BASE}"))?;
    Ok(())
}

/// bubblewrap's arguments for a box (descriptor numbers per [`BWRAP_FDS`]).
pub fn bwrap_args(l: &BoxLaunch, seccomp_programs: usize) -> Vec<String> {
    let fd = |n: RawFd| n.to_string();
    let mut a: Vec<String> = vec![
        // The box's user namespace; the shim writes its id maps while
        // bubblewrap waits on the block descriptor.
        "--unshare-user".into(),
        "--userns-block-fd".into(),
        fd(FD_USERNS_BLOCK),
        "--uid".into(),
        "0".into(),
        "--gid".into(),
        "0".into(),
        "--unshare-pid".into(),
        "--unshare-ipc".into(),
        "--unshare-uts".into(),
        "--unshare-cgroup-try".into(),
        // Always: nothing of the host's network is reachable from a box.
        "--unshare-net".into(),
        "--hostname".into(),
        l.hostname.clone(),
        "--new-session".into(),
        "--die-with-parent".into(),
        "--as-pid-1".into(),
        "--cap-drop".into(),
        "ALL".into(),
        "--bind-fd".into(),
        fd(FD_ROOT),
        "/".into(),
        "--proc".into(),
        "/proc".into(),
        "--dev".into(),
        "/dev".into(),
    ];
    if l.egress.is_some() {
        // The box's resolver is its gateway (see crate::network).
        a.extend([
            "--perms".into(),
            "0644".into(),
            "--ro-bind-data".into(),
            fd(FD_RESOLV),
            "/etc/resolv.conf".into(),
        ]);
    }
    a.extend([
        "--clearenv".into(),
        "--chdir".into(),
        "/".into(),
        "--info-fd".into(),
        fd(FD_INFO),
    ]);
    for i in 0..seccomp_programs {
        a.push("--add-seccomp-fd".into());
        a.push(fd(FD_SECCOMP + i as RawFd));
    }
    a.push(format!("/proc/self/fd/{FD_INIT}"));
    a
}

/// Set the rlimits every box process has. Async-signal-safe.
fn set_box_rlimits(nofile: u64) -> std::io::Result<()> {
    for (resource, value) in [
        (libc::RLIMIT_NOFILE, nofile),
        (libc::RLIMIT_CORE, CORE_LIMIT),
    ] {
        let lim = libc::rlimit {
            rlim_cur: value,
            rlim_max: value,
        };
        // SAFETY: plain system call on a valid struct.
        if unsafe { libc::setrlimit(resource, &lim) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Map the box's ids into the user namespace of `pid` (bubblewrap's child,
/// waiting on its block descriptor) and forbid nested user namespaces in it.
fn map_ids(pid: u32, ids: &IdRange) -> Result<()> {
    for file in ["uid_map", "gid_map"] {
        std::fs::write(format!("/proc/{pid}/{file}"), ids.map_line())
            .with_context(|| format!("writing the box's {file}"))?;
    }
    // `user.max_user_namespaces` is per user namespace and only writable from
    // inside it: a forked child enters the box's namespace and sets it to 0.
    // (The seccomp policy refuses namespace creation too; this holds even
    // without it, and nothing in the box has the capability to raise it.)
    let userns = std::fs::File::open(format!("/proc/{pid}/ns/user"))
        .context("opening the box's user namespace")?;
    let path = c"/proc/sys/user/max_user_namespaces";
    // SAFETY: the child only makes system calls on values prepared before
    // fork, then _exits.
    unsafe {
        let child = libc::fork();
        if child < 0 {
            return Err(std::io::Error::last_os_error()).context("fork");
        }
        if child == 0 {
            let mut code = 1;
            if libc::setns(userns.as_raw_fd(), libc::CLONE_NEWUSER) == 0 {
                let f = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if f >= 0 && libc::write(f, b"0".as_ptr().cast(), 1) == 1 {
                    code = 0;
                }
            }
            libc::_exit(code);
        }
        let mut status = 0;
        if libc::waitpid(child, &mut status, 0) != child
            || !libc::WIFEXITED(status)
            || libc::WEXITSTATUS(status) != 0
        {
            bail!("could not forbid nested user namespaces in the box");
        }
    }
    Ok(())
}

/// A box whose bubblewrap is running.
#[derive(Debug)]
pub struct Started {
    /// Host pid of bubblewrap's outer process (our child).
    pub bwrap_pid: u32,
    /// Host pid of the box's PID 1.
    pub pid1: u32,
}

/// Start bubblewrap for the box (the overlay must be mounted, the cgroups created).
/// Returns once PID 1 runs, i.e. the sandbox is completely set up.
pub fn start_box(l: &BoxLaunch, root: &Path, policy: &Policy, stderr: RawFd) -> Result<Started> {
    let programs = policy.program_bytes();
    if programs.len() > SECCOMP_SLOTS {
        bail!("more seccomp programs than descriptor slots");
    }
    let (ready_r, ready_w) = sys::pipe()?;
    let (info_r, info_w) = sys::pipe()?;
    let (block_r, block_w) = sys::pipe()?;
    let mut sources: Vec<OwnedFd> = vec![ready_w, info_w];
    for (i, p) in programs.iter().enumerate() {
        sources.push(sys::sealed_memfd(&format!("boxlite-seccomp-{i}"), p)?);
    }
    let null = || -> Result<OwnedFd> { Ok(OwnedFd::from(std::fs::File::open("/dev/null")?)) };
    // Unused slots get /dev/null so the numbering stays fixed.
    while sources.len() < (FD_INIT - FD_READY) as usize {
        sources.push(null()?);
    }
    sources.push(sys::sealed_memfd(
        "boxlite-init",
        &crate::init_elf::init_program()?,
    )?);
    sources.push(sys::open_path(root, true)?);
    sources.push(block_r);
    sources.push(match &l.egress {
        Some(e) => sys::sealed_memfd("boxlite-resolv", e.resolv_conf().as_bytes())?,
        None => null()?,
    });
    debug_assert_eq!(sources.len(), BWRAP_FDS.len());
    let src_raw: Vec<RawFd> = sources.iter().map(|f| f.as_raw_fd()).collect();
    let cgroup_fds = l.placement.open_procs_files()?;
    let cg_raw: Vec<RawFd> = cgroup_fds.iter().map(|f| f.as_raw_fd()).collect();
    let uid = l.ids.base;
    let nofile = l.nofile;
    let stderr_fd = stderr;
    let first_closed = (BWRAP_FDS[BWRAP_FDS.len() - 1] + 1) as u32;

    let mut cmd = std::process::Command::new(&l.bwrap);
    cmd.args(bwrap_args(l, programs.len()))
        .env_clear()
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null());
    // SAFETY: the closure only makes async-signal-safe system calls on values
    // prepared before fork.
    unsafe {
        cmd.pre_exec(move || {
            // Join the box's cgroups while still root.
            for fd in &cg_raw {
                if libc::write(*fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if libc::dup2(stderr_fd, 2) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // Move the sources out of the way, then into their fixed slots.
            let mut high = [0 as RawFd; BWRAP_FDS.len()];
            for (i, s) in src_raw.iter().enumerate() {
                let h = libc::fcntl(*s, libc::F_DUPFD_CLOEXEC, 100);
                if h < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                high[i] = h;
            }
            for (i, h) in high.iter().enumerate() {
                if libc::dup2(*h, BWRAP_FDS[i]) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            // Nothing else may reach bubblewrap (and from it, the box).
            if libc::syscall(
                libc::SYS_close_range,
                first_closed,
                u32::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            set_box_rlimits(nofile)?;
            // Become the box's unprivileged host uid: the user namespace
            // bubblewrap creates is owned by it, so kernel per-user counts
            // (inotify instances, namespaces, ...) are the box's own.
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setresgid(uid, uid, uid) != 0
                || libc::setresuid(uid, uid, uid) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {}", l.bwrap.display()))?;
    drop(sources);
    drop(cgroup_fds);
    let bwrap_pid = child.id();
    // We reap bubblewrap ourselves (waitpid in the shim's SIGCHLD loop).
    std::mem::forget(child);

    let deadline = Instant::now() + Duration::from_secs(15);
    let info = read_all_until(&info_r, deadline).context("reading bubblewrap's info")?;
    let v: serde_json::Value = serde_json::from_slice(&info).map_err(|_| {
        anyhow!(
            "bubblewrap failed before the box started (see the shim log); info: {:?}",
            String::from_utf8_lossy(&info)
        )
    })?;
    let pid1 = v
        .get("child-pid")
        .and_then(|p| p.as_u64())
        .ok_or_else(|| anyhow!("bubblewrap reported no child pid"))? as u32;
    map_ids(pid1, &l.ids)?;
    // SAFETY: a plain write on our end of the block pipe.
    if unsafe { libc::write(block_w.as_raw_fd(), b"1".as_ptr().cast(), 1) } != 1 {
        return Err(std::io::Error::last_os_error()).context("releasing bubblewrap");
    }
    drop(block_w);
    let ready = read_all_until(&ready_r, deadline).context("waiting for the box to start")?;
    if ready.first() != Some(&b'R') {
        bail!("the box's init did not start (see the shim log)");
    }
    // PID 1 must be bubblewrap's child, not a recycled pid.
    let status = std::fs::read_to_string(format!("/proc/{pid1}/status")).unwrap_or_default();
    let ppid = status
        .lines()
        .find_map(|l| l.strip_prefix("PPid:"))
        .and_then(|v| v.trim().parse::<u32>().ok());
    if ppid != Some(bwrap_pid) {
        bail!("box PID 1 ({pid1}) is not bubblewrap's child");
    }
    // Neither bubblewrap nor PID 1 is ever the out-of-memory victim: the
    // kernel picks a process the box started.
    for pid in [bwrap_pid, pid1] {
        let _ = std::fs::write(format!("/proc/{pid}/oom_score_adj"), "-1000");
    }
    Ok(Started { bwrap_pid, pid1 })
}

/// Read a pipe until EOF or `deadline`.
fn read_all_until(fd: &OwnedFd, deadline: Instant) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("timed out");
        }
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(i32::MAX as u128) as i32) };
        if r < 0 {
            if sys::errno() == libc::EINTR {
                continue;
            }
            return Err(std::io::Error::last_os_error().into());
        }
        if r == 0 {
            continue;
        }
        // SAFETY: valid descriptor and buffer.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            if sys::errno() == libc::EINTR {
                continue;
            }
            return Err(std::io::Error::last_os_error().into());
        }
        if n == 0 {
            return Ok(out);
        }
        out.extend_from_slice(&buf[..n as usize]);
        if out.len() > 1 << 20 {
            bail!("too much data");
        }
    }
}

/// Handles on a running box, opened once from its PID 1 and kept for its life.
pub struct BoxHandle {
    /// Host pid of PID 1.
    pub pid1: u32,
    /// The box's root directory (`/proc/PID1/root`).
    pub root: OwnedFd,
    /// Namespaces to enter, user namespace last.
    namespaces: Vec<(OwnedFd, libc::c_int)>,
    /// The pid namespace (entered by the shim itself, so its children are born in it).
    pub pid_ns: OwnedFd,
    /// The network namespace.
    pub net_ns: OwnedFd,
    cgroup_procs: Vec<OwnedFd>,
    seccomp: Policy,
    last_cap: u32,
    nofile: u64,
    env: BTreeMap<String, String>,
    hostname: String,
}

impl BoxHandle {
    /// Open the namespaces and root of the box whose PID 1 is `pid1`.
    pub fn open(pid1: u32, l: &BoxLaunch, seccomp: Policy) -> Result<BoxHandle> {
        let ns = |name: &str| -> Result<OwnedFd> {
            std::fs::File::open(format!("/proc/{pid1}/ns/{name}"))
                .map(OwnedFd::from)
                .with_context(|| format!("opening the box's {name} namespace"))
        };
        let mine = |name: &str| std::fs::metadata(format!("/proc/self/ns/{name}")).ok();
        let theirs = |name: &str| std::fs::metadata(format!("/proc/{pid1}/ns/{name}")).ok();
        use std::os::unix::fs::MetadataExt;
        let differs = |name: &str| match (mine(name), theirs(name)) {
            (Some(a), Some(b)) => a.ino() != b.ino(),
            _ => false,
        };
        let mut namespaces = vec![
            (ns("ipc")?, libc::CLONE_NEWIPC),
            (ns("uts")?, libc::CLONE_NEWUTS),
        ];
        let net = ns("net")?;
        namespaces.push((net.try_clone()?, libc::CLONE_NEWNET));
        if differs("cgroup") {
            namespaces.push((ns("cgroup")?, libc::CLONE_NEWCGROUP));
        }
        namespaces.push((ns("mnt")?, libc::CLONE_NEWNS));
        namespaces.push((ns("user")?, libc::CLONE_NEWUSER));
        let root = sys::open_path(Path::new(&format!("/proc/{pid1}/root")), true)?;
        Ok(BoxHandle {
            pid1,
            root,
            namespaces,
            pid_ns: ns("pid")?,
            net_ns: net,
            cgroup_procs: l.placement.open_procs_files()?,
            seccomp,
            last_cap: sys::cap_last_cap(),
            nofile: l.nofile,
            env: l.env.clone(),
            hostname: l.hostname.clone(),
        })
    }

    /// Make the calling process's future children members of the box's pid namespace.
    pub fn enter_pid_namespace(&self) -> Result<()> {
        // SAFETY: setns on a namespace descriptor we own.
        if unsafe { libc::setns(self.pid_ns.as_raw_fd(), libc::CLONE_NEWPID) } != 0 {
            return Err(std::io::Error::last_os_error()).context("entering the box pid namespace");
        }
        Ok(())
    }

    /// Home directory of root in the box (from its /etc/passwd, read without leaving the box root).
    pub fn home(&self) -> String {
        let mut text = String::new();
        if let Ok(fd) =
            sys::open_in_root(&self.root, "/etc/passwd", libc::O_RDONLY | libc::O_NONBLOCK)
        {
            let f = std::fs::File::from(fd);
            if f.metadata().map(|m| m.is_file()).unwrap_or(false) {
                let _ = f.take(1 << 20).read_to_string(&mut text);
            }
        }
        text.lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split(':').collect();
                (f.len() >= 7 && f[2] == "0").then(|| f[5].to_string())
            })
            .find(|h| h.starts_with('/'))
            .unwrap_or_else(|| "/root".to_string())
    }

    fn exists(&self, path: &str) -> bool {
        sys::open_in_root(&self.root, path, libc::O_PATH)
            .ok()
            .and_then(|fd| std::fs::File::from(fd).metadata().ok())
            .is_some_and(|m| !m.is_dir())
    }

    fn is_dir(&self, path: &str) -> bool {
        sys::open_in_root(&self.root, path, libc::O_PATH | libc::O_DIRECTORY).is_ok()
    }

    /// Turn an exec request into everything the child needs. Fails on
    /// malformed input (NUL bytes, bad names) before anything is forked.
    pub fn prepare(&self, spec: &ExecSpec) -> Result<Prepared> {
        let home = self.home();
        let mut env = self.env.clone();
        for (k, v) in &spec.env {
            env.insert(k.clone(), v.clone());
        }
        env.entry("PATH".into())
            .or_insert_with(|| DEFAULT_PATH.into());
        env.insert("HOME".into(), home.clone());
        env.entry("USER".into()).or_insert_with(|| "root".into());
        env.entry("LOGNAME".into()).or_insert_with(|| "root".into());
        env.insert("HOSTNAME".into(), self.hostname.clone());
        if spec.tty {
            env.entry("TERM".into())
                .or_insert_with(|| "xterm-256color".into());
        }
        let mut candidates: Vec<(String, Vec<String>)> = Vec::new();
        if spec.command.is_empty() {
            // The first of bash, ash, sh, as a login shell.
            let shell = SHELLS
                .iter()
                .find(|s| self.exists(s))
                .ok_or_else(|| anyhow!("no shell (bash, ash or sh) in this box"))?;
            let base = shell.rsplit('/').next().unwrap_or("sh");
            env.insert("SHELL".into(), shell.to_string());
            candidates.push((shell.to_string(), vec![format!("-{base}")]));
        } else {
            let prog = &spec.command[0];
            if prog.is_empty() {
                bail!("empty program name");
            }
            if prog.contains('/') {
                candidates.push((prog.clone(), spec.command.clone()));
            } else {
                let path = env.get("PATH").cloned().unwrap_or_default();
                for dir in path.split(':').filter(|d| !d.is_empty()) {
                    candidates.push((format!("{dir}/{prog}"), spec.command.clone()));
                }
                if candidates.is_empty() {
                    candidates.push((prog.clone(), spec.command.clone()));
                }
            }
        }
        let cwd = match &spec.cwd {
            Some(c) => c.clone(),
            None if self.is_dir(&home) => home,
            None => "/".into(),
        };
        for k in env.keys() {
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                bail!("invalid environment variable name {k:?}");
            }
        }
        let c = |s: &str| CString::new(s).map_err(|_| anyhow!("NUL byte in {s:?}"));
        let mut cands = Vec::with_capacity(candidates.len());
        for (path, argv) in &candidates {
            let argv: Vec<CString> = argv.iter().map(|a| c(a)).collect::<Result<_>>()?;
            cands.push((c(path)?, argv));
        }
        let envp: Vec<CString> = env
            .iter()
            .map(|(k, v)| c(&format!("{k}={v}")))
            .collect::<Result<_>>()?;
        let shown = spec
            .command
            .first()
            .cloned()
            .unwrap_or_else(|| candidates[0].0.clone());
        Ok(Prepared::new(cands, envp, c(&cwd)?, c(&shown)?))
    }

    /// Fork a process into the box with `stdio` as its descriptors 0, 1, 2
    /// (`ctty`: make descriptor 0, a terminal, its controlling terminal).
    /// Returns its host pid once it has executed (or failed to execute) the
    /// program; a failure to enter the box is an error.
    pub fn spawn(&self, p: &Prepared, stdio: [RawFd; 3], ctty: bool) -> Result<u32> {
        let (err_r, err_w) = sys::pipe()?;
        let ns: Vec<(RawFd, libc::c_int)> = self
            .namespaces
            .iter()
            .map(|(f, t)| (f.as_raw_fd(), *t))
            .collect();
        let cg: Vec<RawFd> = self.cgroup_procs.iter().map(|f| f.as_raw_fd()).collect();
        let ctx = ChildCtx {
            prepared: p,
            stdio,
            ctty,
            namespaces: &ns,
            cgroup_procs: &cg,
            seccomp: self.seccomp.programs(),
            last_cap: self.last_cap,
            nofile: self.nofile,
            err: err_w.as_raw_fd(),
        };
        // SAFETY: the child runs `child_main`, which only makes system calls on
        // data prepared above and never returns.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(std::io::Error::last_os_error()).context("fork");
        }
        if pid == 0 {
            child_main(&ctx);
        }
        drop(err_w);
        let report =
            read_all_until(&err_r, Instant::now() + Duration::from_secs(10)).unwrap_or_default();
        if report.len() >= 5 {
            let step = report[0];
            let errno = i32::from_ne_bytes(report[1..5].try_into().unwrap_or([0; 4]));
            // The child exits right away; the SIGCHLD loop reaps it.
            bail!(
                "entering the box failed at {}: {}",
                STEP_NAMES.get(step as usize).unwrap_or(&"?"),
                std::io::Error::from_raw_os_error(errno)
            );
        }
        Ok(pid as u32)
    }
}

/// Names of the child's setup steps, for error reports.
const STEP_NAMES: [&str; 12] = [
    "signal reset",
    "joining the cgroup and setting limits",
    "clearing groups",
    "entering a namespace",
    "switching to the box user",
    "dropping capabilities",
    "no_new_privs",
    "starting a session",
    "setting up the terminal",
    "changing directory",
    "installing seccomp",
    "closing descriptors",
];

/// An exec request turned into C strings and pointer arrays.
pub struct Prepared {
    candidates: Vec<(CString, Vec<CString>)>,
    argv_ptrs: Vec<Vec<*const libc::c_char>>,
    _envp: Vec<CString>,
    envp_ptrs: Vec<*const libc::c_char>,
    cwd: CString,
    shown: CString,
}

impl Prepared {
    fn new(
        candidates: Vec<(CString, Vec<CString>)>,
        envp: Vec<CString>,
        cwd: CString,
        shown: CString,
    ) -> Prepared {
        let argv_ptrs = candidates
            .iter()
            .map(|(_, argv)| {
                let mut v: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
                v.push(std::ptr::null());
                v
            })
            .collect();
        let mut envp_ptrs: Vec<*const libc::c_char> = envp.iter().map(|e| e.as_ptr()).collect();
        envp_ptrs.push(std::ptr::null());
        Prepared {
            candidates,
            argv_ptrs,
            _envp: envp,
            envp_ptrs,
            cwd,
            shown,
        }
    }
}

struct ChildCtx<'a> {
    prepared: &'a Prepared,
    stdio: [RawFd; 3],
    ctty: bool,
    namespaces: &'a [(RawFd, libc::c_int)],
    cgroup_procs: &'a [RawFd],
    seccomp: &'a [seccompiler::BpfProgram],
    last_cap: u32,
    nofile: u64,
    err: RawFd,
}

/// Report a failed step to the parent and exit.
fn fail(err: RawFd, step: u8) -> ! {
    let e = sys::errno().to_ne_bytes();
    let msg = [step, e[0], e[1], e[2], e[3]];
    // SAFETY: plain write and _exit.
    unsafe {
        libc::write(err, msg.as_ptr().cast(), msg.len());
        libc::_exit(126);
    }
}

fn write_str(fd: RawFd, s: &[u8]) {
    // SAFETY: plain write.
    unsafe { libc::write(fd, s.as_ptr().cast(), s.len()) };
}

/// The forked child: enter the box and execute. Only system calls from here on.
fn child_main(c: &ChildCtx) -> ! {
    // SAFETY: every call below is a raw system call on prepared data.
    unsafe {
        // 0. Default signal dispositions and an empty mask (the shim handles
        //    SIGCHLD and Rust ignores SIGPIPE; the program must not inherit that).
        for sig in 1..32 {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::signal(sig, libc::SIG_DFL);
            }
        }
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        if libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut()) != 0 {
            fail(c.err, 0);
        }
        // 1. Join the box's cgroups (as host root, before entering anything),
        //    and leave the shim's out-of-memory protection behind.
        for fd in c.cgroup_procs {
            if libc::write(*fd, b"0".as_ptr().cast(), 1) != 1 {
                fail(c.err, 1);
            }
        }
        let adj = libc::open(
            c"/proc/self/oom_score_adj".as_ptr(),
            libc::O_WRONLY | libc::O_CLOEXEC,
        );
        if adj < 0 || libc::write(adj, b"0".as_ptr().cast(), 1) != 1 {
            fail(c.err, 1);
        }
        libc::close(adj);
        if set_box_rlimits(c.nofile).is_err() {
            fail(c.err, 1);
        }
        // 2. No supplementary groups (they would be unmapped in the box).
        if libc::setgroups(0, std::ptr::null()) != 0 {
            fail(c.err, 2);
        }
        // 3. The box's namespaces; the user namespace last.
        for (fd, kind) in c.namespaces {
            if libc::setns(*fd, *kind) != 0 {
                fail(c.err, 3);
            }
        }
        // 4. Root of the box's user namespace = the unprivileged box uid on the host.
        if libc::setresgid(0, 0, 0) != 0 || libc::setresuid(0, 0, 0) != 0 {
            fail(c.err, 4);
        }
        // 5. No capabilities, now or after exec.
        for cap in 0..=c.last_cap {
            if libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) != 0
                && sys::errno() != libc::EINVAL
            {
                fail(c.err, 5);
            }
        }
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        );
        #[repr(C)]
        struct CapHeader {
            version: u32,
            pid: i32,
        }
        #[repr(C)]
        struct CapData {
            effective: u32,
            permitted: u32,
            inheritable: u32,
        }
        let hdr = CapHeader {
            version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
            pid: 0,
        };
        let data = [
            CapData {
                effective: 0,
                permitted: 0,
                inheritable: 0,
            },
            CapData {
                effective: 0,
                permitted: 0,
                inheritable: 0,
            },
        ];
        if libc::syscall(libc::SYS_capset, &hdr as *const CapHeader, data.as_ptr()) != 0 {
            fail(c.err, 5);
        }
        // 6. Never gain privileges through exec.
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            fail(c.err, 6);
        }
        // 7. A new session: no controlling terminal of anybody else's.
        if libc::setsid() < 0 {
            fail(c.err, 7);
        }
        // 8. Standard descriptors, and the terminal.
        if c.ctty && libc::ioctl(c.stdio[0], libc::TIOCSCTTY, 0) != 0 {
            fail(c.err, 8);
        }
        let mut high = [0 as RawFd; 3];
        for (i, fd) in c.stdio.iter().enumerate() {
            high[i] = libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 10);
            if high[i] < 0 {
                fail(c.err, 8);
            }
        }
        for (i, fd) in high.iter().enumerate() {
            if libc::dup2(*fd, i as RawFd) < 0 {
                fail(c.err, 8);
            }
        }
        // 9. Working directory, inside the box.
        if libc::chdir(c.prepared.cwd.as_ptr()) != 0 {
            let e = sys::errno();
            write_str(2, b"boxlite: cannot change to the working directory: ");
            write_str(2, c.prepared.cwd.as_bytes());
            write_str(2, b"\n");
            *libc::__errno_location() = e;
            fail(c.err, 9);
        }
        libc::umask(0o022);
        // 10. The box's seccomp programs.
        if Policy::install(c.seccomp).is_err() {
            fail(c.err, 10);
        }
        // 11. Nothing but 0, 1, 2 survives exec (the report pipe closes on success).
        if libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        ) != 0
        {
            fail(c.err, 11);
        }
        let mut last = libc::ENOENT;
        for (i, (path, _)) in c.prepared.candidates.iter().enumerate() {
            libc::execve(
                path.as_ptr(),
                c.prepared.argv_ptrs[i].as_ptr(),
                c.prepared.envp_ptrs.as_ptr(),
            );
            let e = sys::errno();
            if e != libc::ENOENT && e != libc::ENOTDIR {
                last = e;
                break;
            }
        }
        // The program could not be executed: say so like a shell would.
        write_str(2, b"boxlite: ");
        write_str(2, c.prepared.shown.as_bytes());
        let (msg, code): (&CStr, i32) = match last {
            libc::ENOENT => (c": command not found\n", 127),
            libc::EACCES => (c": permission denied\n", 126),
            libc::ENOEXEC => (c": exec format error\n", 126),
            _ => (c": cannot execute\n", 126),
        };
        write_str(2, msg.to_bytes());
        libc::_exit(code);
    }
}

/// Open a pseudo-terminal from the box's own devpts: (master, peer/slave).
pub fn open_pty(h: &BoxHandle, root_uid: u32, rows: u16, cols: u16) -> Result<(OwnedFd, OwnedFd)> {
    let master = sys::open_in_root(&h.root, "/dev/pts/ptmx", libc::O_RDWR | libc::O_NOCTTY)
        .context("opening the box's /dev/pts/ptmx")?;
    // SAFETY: ioctls on the master we own.
    unsafe {
        let unlock: libc::c_int = 0;
        if libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK, &unlock) != 0 {
            return Err(std::io::Error::last_os_error()).context("unlocking the pty");
        }
        let ws = libc::winsize {
            ws_row: rows.max(1),
            ws_col: cols.max(1),
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws);
        let peer = libc::ioctl(
            master.as_raw_fd(),
            libc::TIOCGPTPEER,
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        );
        if peer < 0 {
            return Err(std::io::Error::last_os_error()).context("opening the pty peer");
        }
        let peer = OwnedFd::from_raw_fd(peer);
        // Owned by root of the box (not the unmapped host root).
        libc::fchown(peer.as_raw_fd(), root_uid, root_uid);
        Ok((master, peer))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn launch(egress: bool) -> BoxLaunch {
        BoxLaunch {
            id: uuid::Uuid::nil(),
            lower: "/l".into(),
            disk: "/d/disk.img".into(),
            egress: egress.then(|| EgressLaunch {
                address: "10.224.0.2".parse().unwrap(),
                gateway: "10.224.0.1".parse().unwrap(),
                host_iface: "bl0000000000000".into(),
                group: 0x1000_0001,
            }),
            hostname: "box-1".into(),
            env: BTreeMap::new(),
            placement: Placement::V2 { dir: "/c".into() },
            limits: Limits {
                memory_bytes: 1 << 28,
                cpu_millicores: 1000,
                pids_max: 64,
            },
            ids: IdRange {
                base: 1 << 30,
                count: crate::ids::ID_RANGE,
            },
            lower_ids: crate::images::IMAGE_IDS,
            nofile: 4096,
            bwrap: "/usr/bin/bwrap".into(),
            max_sessions: 8,
        }
    }

    #[test]
    fn bwrap_isolates_everything_whatever_the_network_mode() {
        for egress in [false, true] {
            let a = bwrap_args(&launch(egress), 3);
            for flag in [
                "--unshare-user",
                "--unshare-pid",
                "--unshare-ipc",
                "--unshare-uts",
                "--unshare-net",
                "--new-session",
                "--die-with-parent",
                "--clearenv",
            ] {
                assert!(
                    a.iter().any(|x| x == flag),
                    "{flag} missing (egress {egress})"
                );
            }
            assert_eq!(a.iter().filter(|x| *x == "--add-seccomp-fd").count(), 3);
            let cap = a.iter().position(|x| x == "--cap-drop").unwrap();
            assert_eq!(a[cap + 1], "ALL");
            let block = a.iter().position(|x| x == "--userns-block-fd").unwrap();
            assert_eq!(a[block + 1], FD_USERNS_BLOCK.to_string());
            assert_eq!(a.last().unwrap(), "/proc/self/fd/9");
            // Only an egress box gets a resolver, and never the host's file.
            assert_eq!(a.iter().any(|x| x == "--ro-bind-data"), egress);
            assert!(
                !a.iter()
                    .any(|x| x.contains("/etc/resolv.conf") && x != "/etc/resolv.conf")
            );
            assert!(!a.iter().any(|x| x == "--ro-bind-try"));
        }
    }
}
