//! Small, safe wrappers around Linux calls the rest of the crate needs and
//! that `nix` does not cover in the shape we want.

use std::ffi::CString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use sha2::{Digest, Sha256};

/// `errno` of the last failed libc call.
pub fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Convert a path into a C string, refusing interior NULs.
pub fn cpath(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| anyhow!("path {:?} contains NUL", p))
}

/// Open `path` below the directory `root` as if `root` were `/`: absolute
/// symlinks and `..` never leave it (openat2 `RESOLVE_IN_ROOT`), and
/// `/proc` magic links are refused. This is how host-side code reads files of
/// a box without following a box-planted symlink out of it.
pub fn open_in_root(root: &OwnedFd, path: &str, flags: i32) -> std::io::Result<OwnedFd> {
    let c = CString::new(path.trim_start_matches('/'))
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    let c = if c.as_bytes().is_empty() {
        CString::new(".").expect("no NUL")
    } else {
        c
    };
    // SAFETY: open_how is plain data; zero is valid for every field.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: valid pointers, size of the struct we pass.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            c.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just gave us this descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Open a directory (or any path) as an `O_PATH` descriptor.
pub fn open_path(p: &Path, directory: bool) -> Result<OwnedFd> {
    let c = cpath(p)?;
    let mut flags = libc::O_PATH | libc::O_CLOEXEC;
    if directory {
        flags |= libc::O_DIRECTORY;
    }
    // SAFETY: valid C string.
    let fd = unsafe { libc::open(c.as_ptr(), flags) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("open {}", p.display()));
    }
    // SAFETY: fresh descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// An anonymous, sealed in-memory file holding `bytes` (offset 0, not close-on-exec).
pub fn sealed_memfd(name: &str, bytes: &[u8]) -> Result<OwnedFd> {
    let cname = CString::new(name).map_err(|_| anyhow!("memfd name has NUL"))?;
    // SAFETY: valid C string; flags are constants.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("memfd_create");
    }
    // SAFETY: fresh descriptor.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut f = File::from(owned);
    f.write_all(bytes).context("writing memfd")?;
    // SAFETY: plain fcntl/lseek on our descriptor.
    unsafe {
        if libc::fcntl(
            f.as_raw_fd(),
            libc::F_ADD_SEALS,
            libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE | libc::F_SEAL_SEAL,
        ) != 0
        {
            return Err(std::io::Error::last_os_error()).context("sealing memfd");
        }
        if libc::lseek(f.as_raw_fd(), 0, libc::SEEK_SET) != 0 {
            return Err(std::io::Error::last_os_error()).context("rewinding memfd");
        }
    }
    Ok(OwnedFd::from(f))
}

/// Names in the directory open as `dir` (without `.` and `..`), sorted.
pub fn list_dir(dir: &OwnedFd) -> std::io::Result<Vec<Vec<u8>>> {
    let mut names: Vec<Vec<u8>> = std::fs::read_dir(format!("/proc/self/fd/{}", dir.as_raw_fd()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().as_bytes().to_vec())
        .collect();
    names.sort();
    Ok(names)
}

/// Set or clear close-on-exec on `fd`.
pub fn set_cloexec(fd: RawFd, on: bool) -> std::io::Result<()> {
    // SAFETY: fcntl on a caller-provided descriptor.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFD);
        if flags < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let new = if on {
            flags | libc::FD_CLOEXEC
        } else {
            flags & !libc::FD_CLOEXEC
        };
        if libc::fcntl(fd, libc::F_SETFD, new) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Set or clear `O_NONBLOCK` on `fd`.
pub fn set_nonblocking(fd: RawFd, on: bool) -> std::io::Result<()> {
    // SAFETY: fcntl on a caller-provided descriptor.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let new = if on {
            flags | libc::O_NONBLOCK
        } else {
            flags & !libc::O_NONBLOCK
        };
        if libc::fcntl(fd, libc::F_SETFL, new) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A pipe whose both ends are close-on-exec: (read, write).
pub fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: array of two ints.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error()).context("pipe2");
    }
    // SAFETY: fresh descriptors.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Start time of a process in clock ticks since boot (field 22 of `/proc/PID/stat`),
/// which together with the pid identifies a process across pid reuse.
pub fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces: split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    // Fields after the name start at field 3 (state); start time is field 22.
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// True when `pid` exists, is not a zombie, and (when given) started at `start_time`.
pub fn process_alive(pid: u32, start_time: Option<u64>) -> bool {
    if pid == 0 {
        return false;
    }
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let Some(close) = stat.rfind(')') else {
        return false;
    };
    let mut fields = stat[close + 1..].split_whitespace();
    let state = fields.next().unwrap_or("");
    if state == "Z" || state == "X" {
        return false;
    }
    match start_time {
        None => true,
        Some(t) => fields.nth(18).and_then(|s| s.parse::<u64>().ok()) == Some(t),
    }
}

/// Highest capability number the kernel knows.
pub fn cap_last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
}

/// Write `bytes` to `path` atomically (temp file in the same directory, fsync, rename).
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    write_replace(path, bytes, mode, true)
}

/// Like [`write_atomic`] without the fsyncs: for runtime state that a power
/// loss makes meaningless anyway (it never leaves a torn file behind).
pub fn write_atomic_nosync(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    write_replace(path, bytes, mode, false)
}

fn write_replace(path: &Path, bytes: &[u8], mode: u32, sync: bool) -> Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| anyhow!("{} has no parent", path.display()))?;
    let name = path
        .file_name()
        .ok_or_else(|| anyhow!("{} has no file name", path.display()))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        rand::random::<u32>()
    ));
    let res = (|| -> Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .with_context(|| format!("create {}", tmp.display()))?;
        f.write_all(bytes)?;
        if sync {
            f.sync_all()?;
        }
        std::fs::rename(&tmp, path)
            .with_context(|| format!("rename {} -> {}", tmp.display(), path.display()))?;
        if sync {
            fsync_dir(dir);
        }
        Ok(())
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

/// fsync a directory so a rename in it is durable (best effort).
pub fn fsync_dir(dir: &Path) {
    if let Ok(f) = File::open(dir) {
        let _ = f.sync_all();
    }
}

/// Take an exclusive `flock` on `path` (created 0600). `Ok(None)` when another holder has it.
pub fn try_lock(path: &Path) -> Result<Option<File>> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("open lock {}", path.display()))?;
    // SAFETY: flock on our descriptor.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r != 0 {
        let e = errno();
        if e == libc::EWOULDBLOCK {
            return Ok(None);
        }
        bail!(
            "flock {}: {}",
            path.display(),
            std::io::Error::from_raw_os_error(e)
        );
    }
    Ok(Some(f))
}

/// Take an exclusive `flock` on `path` (created 0600), waiting for it.
pub fn lock_wait(path: &Path) -> Result<File> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("open lock {}", path.display()))?;
    loop {
        // SAFETY: flock on our descriptor.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } == 0 {
            return Ok(f);
        }
        if errno() != libc::EINTR {
            bail!(
                "flock {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            );
        }
    }
}

/// SHA-256 (lower-case hex) of a file's content.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// True when `s` is 64 hex digits.
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Constant-time comparison of two byte strings (length may leak, content does not).
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Total memory of the host in MiB (from `/proc/meminfo`).
pub fn mem_total_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map(|kib| kib / 1024)
        .unwrap_or(0)
}

/// Size and free space (MiB) of the filesystem holding `path`.
pub fn fs_size_mib(path: &Path) -> Option<(u64, u64)> {
    let c = cpath(path).ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid path and out pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    let frsize = st.f_frsize;
    Some((
        st.f_blocks * frsize / (1024 * 1024),
        st.f_bavail * frsize / (1024 * 1024),
    ))
}

/// Resident set size and proportional set size of `pid`, in KiB.
pub fn process_memory_kib(pid: u32) -> Option<(u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let field = |name: &str| -> Option<u64> {
        s.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
    };
    Some((field("Rss:")?, field("Pss:")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_in_root_never_leaves_the_root() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::write(d.path().join("secret"), "host secret").unwrap();
        std::fs::write(root.join("etc/ok"), "box file").unwrap();
        std::os::unix::fs::symlink("/etc/ok", root.join("abs")).unwrap();
        std::os::unix::fs::symlink("../../secret", root.join("etc/up")).unwrap();
        let rootfd = open_path(&root, true).unwrap();
        let read = |p: &str| -> Option<String> {
            let fd = open_in_root(&rootfd, p, libc::O_RDONLY).ok()?;
            let mut s = String::new();
            File::from(fd).read_to_string(&mut s).ok()?;
            Some(s)
        };
        assert_eq!(read("/abs").as_deref(), Some("box file"));
        // `../../secret` resolved inside the root is /secret, which does not exist there.
        assert_eq!(read("/etc/up"), None);
        assert_eq!(read("../secret"), None);
    }

    #[test]
    fn process_identity_survives_only_for_the_same_process() {
        let me = std::process::id();
        let t = process_start_time(me).unwrap();
        assert!(process_alive(me, Some(t)));
        assert!(!process_alive(me, Some(t + 1)));
        assert!(!process_alive(0, None));
    }

    #[test]
    fn atomic_write_and_lock() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        write_atomic(&p, b"one", 0o600).unwrap();
        write_atomic(&p, b"two", 0o600).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        let l = d.path().join("lock");
        let held = try_lock(&l).unwrap().unwrap();
        assert!(try_lock(&l).unwrap().is_none());
        drop(held);
        assert!(try_lock(&l).unwrap().is_some());
    }

    #[test]
    fn constant_time_eq() {
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"ab"));
    }
}

/// A path to bind or connect a unix socket at `path` with: `path` itself when
/// it fits in `sockaddr_un` (108 bytes), else `/proc/self/fd/<dir>/<name>`
/// through an open descriptor of its directory, returned alongside and to be
/// kept open until the bind or connect is done. Deep state directories (a long
/// home, a box id) would otherwise make sockets impossible to create.
pub fn socket_addr_path(path: &Path) -> std::io::Result<(Option<OwnedFd>, std::path::PathBuf)> {
    const FITS: usize = 100;
    if path.as_os_str().len() < FITS {
        return Ok((None, path.to_path_buf()));
    }
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(std::io::Error::other(format!(
            "{} has no directory",
            path.display()
        )));
    };
    let dir = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(dir)?;
    let fd: OwnedFd = dir.into();
    let short = std::path::PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd())).join(name);
    Ok((Some(fd), short))
}

#[cfg(test)]
mod socket_path_tests {
    use super::*;

    #[test]
    fn sockets_bind_and_connect_under_a_directory_too_deep_for_sockaddr_un() {
        let tmp = tempfile::tempdir().unwrap();
        let deep = tmp.path().join("a".repeat(60)).join("b".repeat(60));
        std::fs::create_dir_all(&deep).unwrap();
        let sock = deep.join("shim.sock");
        assert!(sock.as_os_str().len() > 108);
        assert!(
            std::os::unix::net::UnixListener::bind(&sock).is_err(),
            "too long for a plain bind"
        );
        let (_d, addr) = socket_addr_path(&sock).unwrap();
        let listener = std::os::unix::net::UnixListener::bind(&addr).unwrap();
        assert!(sock.exists(), "the socket is created at the real path");
        let (_d2, addr2) = socket_addr_path(&sock).unwrap();
        let _client = std::os::unix::net::UnixStream::connect(&addr2).unwrap();
        let (_conn, _) = listener.accept().unwrap();
        let (none, same) = socket_addr_path(Path::new("/run/x.sock")).unwrap();
        assert!(none.is_none() && same == Path::new("/run/x.sock"));
    }
}
