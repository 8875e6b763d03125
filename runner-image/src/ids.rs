//! Host uid/gid ranges of boxes.
//!
//! Every box gets a range of [`ID_RANGE`] host ids of its own: root in the
//! box is the first, and the box's user namespace maps the whole range, so
//! files an image owns by uid 1000 stay owned by "1000" inside. Because the
//! ranges differ, kernel per-user counts (inotify instances, user
//! namespaces, keys, …) and file ownership are per box: an escaped process
//! of one box owns nothing of another, nor of any image (images are stored
//! with their own, unshifted ids, owned by host root, and shown to each box
//! through an idmapped mount of its range).
//!
//! Ranges are claimed host-wide — several runners (the local target) may
//! share a host — by files in a claims directory, one per range, naming the
//! box directory that holds it; a claim whose box directory is gone is free
//! again. Claims are taken under a `flock` of the directory.
//!
//! Boxes created before ranges existed have no range in their record; they
//! keep running as they are (one uid, the runner's `box_uid`) and get a
//! range, their files shifted into it, when they next start.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};

use crate::sys;

/// Size of a box's uid (and gid) range.
pub const ID_RANGE: u32 = 65536;
/// The id unmapped files show as (`nobody`), inside a full range.
pub const OVERFLOW_ID: u32 = 65534;

/// A run of host ids (uids and gids alike): id `n` of the box is `base + n`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct IdRange {
    /// First host id.
    pub base: u32,
    /// How many ids.
    pub count: u32,
}

impl IdRange {
    /// The `uid_map`/`gid_map` line mapping ids 0.. of a namespace onto the range.
    pub fn map_line(&self) -> String {
        format!("0 {} {}\n", self.base, self.count)
    }

    /// True when the host id `id` belongs to the range.
    pub fn contains(&self, id: u32) -> bool {
        id >= self.base && id - self.base < self.count
    }

    /// The host id of id `inner` of the range; ids past its end become
    /// `nobody` when the range has one, else its first id.
    pub fn host_id(&self, inner: u64) -> u32 {
        let n = match u32::try_from(inner) {
            Ok(n) if n < self.count => n,
            _ if OVERFLOW_ID < self.count => OVERFLOW_ID,
            _ => 0,
        };
        self.base + n
    }

    /// The id inside the range of host id `id`, if it belongs to it.
    pub fn inner(&self, id: u32) -> Option<u32> {
        self.contains(id).then(|| id - self.base)
    }
}

/// The line of an idmapped mount showing files owned by `stored` (an
/// image's ids on disk) as owned by the same ids of `shown` (a box's range).
pub fn idmap_line(stored: IdRange, shown: IdRange) -> String {
    format!(
        "{} {} {}\n",
        stored.base,
        shown.base,
        stored.count.min(shown.count)
    )
}

/// How long a claim holds without its box directory.
const CLAIM_GRACE: std::time::Duration = std::time::Duration::from_secs(3600);

/// The ranges a runner hands out, claimed host-wide.
#[derive(Clone, Debug)]
pub struct IdPool {
    first: u32,
    slots: u32,
    claims: PathBuf,
}

impl IdPool {
    /// Ranges from the one after `legacy_uid` (the single uid boxes had before
    /// ranges) up to the top of the id space; claims kept in `claims`.
    pub fn new(legacy_uid: u32, claims: &Path) -> IdPool {
        let first = u64::from(legacy_uid) + u64::from(ID_RANGE);
        // The last id (u32::MAX) is "no id": never inside a range.
        let slots = (u64::from(u32::MAX).saturating_sub(first)) / u64::from(ID_RANGE);
        IdPool {
            first: u32::try_from(first).unwrap_or(u32::MAX),
            slots: u32::try_from(slots).unwrap_or(0),
            claims: claims.to_path_buf(),
        }
    }

    /// How many ranges the pool has.
    pub fn slots(&self) -> u32 {
        self.slots
    }

    fn range(&self, slot: u32) -> IdRange {
        IdRange {
            base: self.first + slot * ID_RANGE,
            count: ID_RANGE,
        }
    }

    fn claim_path(&self, r: IdRange) -> PathBuf {
        self.claims.join(r.base.to_string())
    }

    fn lock(&self) -> Result<std::fs::File> {
        std::fs::create_dir_all(&self.claims)
            .with_context(|| format!("creating {}", self.claims.display()))?;
        sys::lock_wait(&self.claims.join(".lock"))
    }

    /// Who holds `r`: the box directory named in its claim, while that
    /// exists — or while the claim is young (a box being imported has no
    /// directory yet).
    fn holder(&self, r: IdRange) -> Option<PathBuf> {
        let path = self.claim_path(r);
        let text = std::fs::read_to_string(&path).ok()?;
        let dir = PathBuf::from(text.trim_end_matches('\n'));
        let young = std::fs::metadata(&path)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age < CLAIM_GRACE);
        (young || dir.exists()).then_some(dir)
    }

    fn write_claim(&self, r: IdRange, owner: &Path) -> Result<()> {
        let mut text = owner.as_os_str().as_bytes().to_vec();
        text.push(b'\n');
        sys::write_atomic_nosync(&self.claim_path(r), &text, 0o600)
    }

    /// Claim a free range for the box directory `owner`, starting the search
    /// at a slot derived from `hint` (the box id), so concurrent runners
    /// rarely probe the same slots.
    pub fn claim(&self, owner: &Path, hint: &uuid::Uuid) -> Result<IdRange> {
        if self.slots == 0 {
            bail!("no uid ranges: `box_uid` leaves no room above it");
        }
        let _lock = self.lock()?;
        let start = (hint.as_u128() % u128::from(self.slots)) as u32;
        for i in 0..self.slots {
            let r = self.range((start + i) % self.slots);
            match self.holder(r) {
                Some(h) if h != owner => continue,
                _ => {
                    self.write_claim(r, owner)?;
                    return Ok(r);
                }
            }
        }
        bail!("every one of the {} uid ranges is in use", self.slots)
    }

    /// Make sure `owner` holds `r` (re-claiming it when the claim went
    /// missing); false when another live box holds it.
    pub fn confirm(&self, r: IdRange, owner: &Path) -> Result<bool> {
        let _lock = self.lock()?;
        match self.holder(r) {
            Some(h) if h != owner => Ok(false),
            Some(_) => Ok(true),
            None => {
                self.write_claim(r, owner)?;
                Ok(true)
            }
        }
    }

    /// Give `r` back, if `owner` holds it.
    pub fn release(&self, r: IdRange, owner: &Path) {
        let Ok(_lock) = self.lock() else { return };
        let path = self.claim_path(r);
        let held = std::fs::read_to_string(&path)
            .is_ok_and(|t| Path::new(t.trim_end_matches('\n')) == owner);
        if held {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// A user namespace with `line` as its uid and gid map, for an idmapped
/// mount: nothing ever runs in it. A forked child creates it and exits.
pub fn idmap_userns(line: &str) -> Result<OwnedFd> {
    let (r, w) = sys::pipe()?;
    let w_raw = w.as_raw_fd();
    // SAFETY: the child only makes system calls on values prepared before
    // fork (close, unshare, read, _exit).
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(std::io::Error::last_os_error()).context("fork");
    }
    if pid == 0 {
        unsafe {
            // Its copy of the write end would keep it waiting forever.
            libc::close(w_raw);
            if libc::unshare(libc::CLONE_NEWUSER) != 0 {
                libc::_exit(1);
            }
            let mut b = 0u8;
            libc::read(r.as_raw_fd(), (&mut b as *mut u8).cast(), 1);
            libc::_exit(0);
        }
    }
    drop(r);
    let res = (|| -> Result<OwnedFd> {
        // The child unshares right after fork; its namespace differs from ours once it has.
        let mine = std::fs::metadata("/proc/self/ns/user")?;
        use std::os::unix::fs::MetadataExt;
        for _ in 0..2000 {
            match std::fs::metadata(format!("/proc/{pid}/ns/user")) {
                Ok(m) if m.ino() != mine.ino() => break,
                _ => std::thread::sleep(std::time::Duration::from_micros(50)),
            }
        }
        for f in ["uid_map", "gid_map"] {
            std::fs::write(format!("/proc/{pid}/{f}"), line)
                .with_context(|| format!("writing {f} of an idmap namespace"))?;
        }
        let ns = std::fs::File::open(format!("/proc/{pid}/ns/user"))?;
        Ok(OwnedFd::from(ns))
    })();
    drop(w);
    // SAFETY: reaping our own child.
    unsafe {
        let mut status = 0;
        libc::waitpid(pid, &mut status, 0);
    }
    res
}

/// Attach a copy of the tree at `src` to `dst` with its ids shown through
/// the user namespace `userns` (an idmapped mount). The caller is in a
/// private mount namespace.
pub fn mount_idmapped(src: &Path, dst: &Path, userns: &OwnedFd) -> Result<()> {
    let csrc = sys::cpath(src)?;
    // SAFETY: valid C string; flags are constants.
    let tree = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            csrc.as_ptr(),
            libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC | libc::AT_SYMLINK_NOFOLLOW as u32,
        )
    };
    if tree < 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("open_tree {}", src.display()));
    }
    // SAFETY: the kernel just returned this descriptor.
    let tree = unsafe { OwnedFd::from_raw_fd(tree as i32) };
    let attr = libc::mount_attr {
        attr_set: libc::MOUNT_ATTR_IDMAP,
        attr_clr: 0,
        propagation: 0,
        userns_fd: userns.as_raw_fd() as u64,
    };
    let empty = CString::new("").expect("no NUL");
    // SAFETY: valid descriptor, empty path with AT_EMPTY_PATH, a struct of the size passed.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_EMPTY_PATH,
            &attr as *const libc::mount_attr,
            std::mem::size_of::<libc::mount_attr>(),
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error())
            .context("idmapping the image (needs Linux 5.19 or later)");
    }
    let cdst = sys::cpath(dst)?;
    // SAFETY: valid descriptors and C strings.
    let r = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_FDCWD,
            cdst.as_ptr(),
            libc::MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("attaching the idmapped image at {}", dst.display()));
    }
    Ok(())
}

/// Move the ownership of every entry below (and of) `dir` whose uid or gid
/// belongs to `from` to the same id of `to`, never following a symlink.
pub fn shift_tree(dir: &Path, from: IdRange, to: IdRange) -> Result<u64> {
    let root = open_dir_nofollow(libc::AT_FDCWD, &sys::cpath(dir)?)
        .with_context(|| format!("opening {}", dir.display()))?;
    let mut n = 0;
    shift_at(&root, from, to, 0, &mut n)?;
    Ok(n)
}

fn open_dir_nofollow(at: i32, name: &CString) -> std::io::Result<OwnedFd> {
    // SAFETY: valid descriptor (or AT_FDCWD) and C string.
    let fd = unsafe {
        libc::openat(
            at,
            name.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fresh descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn shift_at(dir: &OwnedFd, from: IdRange, to: IdRange, depth: usize, n: &mut u64) -> Result<()> {
    if depth > 4096 {
        bail!("directory tree deeper than 4096 levels");
    }
    let map = |id: u32| from.inner(id).map(|i| to.host_id(u64::from(i)));
    // The directory itself.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid descriptor and out pointer.
    if unsafe { libc::fstat(dir.as_raw_fd(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    let (u, g) = (map(st.st_uid), map(st.st_gid));
    if u.is_some() || g.is_some() {
        // SAFETY: valid descriptor; -1 keeps an id.
        unsafe {
            libc::fchown(
                dir.as_raw_fd(),
                u.unwrap_or(u32::MAX),
                g.unwrap_or(u32::MAX),
            )
        };
        *n += 1;
    }
    for name in sys::list_dir(dir)? {
        let c = CString::new(name).map_err(|_| anyhow!("NUL in a file name"))?;
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: valid descriptor, C string and out pointer; no following.
        if unsafe {
            libc::fstatat(
                dir.as_raw_fd(),
                c.as_ptr(),
                &mut st,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        } != 0
        {
            continue;
        }
        if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
            if let Ok(sub) = open_dir_nofollow(dir.as_raw_fd(), &c) {
                shift_at(&sub, from, to, depth + 1, n)?;
            }
            continue;
        }
        let (u, g) = (map(st.st_uid), map(st.st_gid));
        if u.is_some() || g.is_some() {
            // SAFETY: valid descriptor and C string; the link itself, never its target.
            unsafe {
                libc::fchownat(
                    dir.as_raw_fd(),
                    c.as_ptr(),
                    u.unwrap_or(u32::MAX),
                    g.unwrap_or(u32::MAX),
                    libc::AT_SYMLINK_NOFOLLOW,
                )
            };
            *n += 1;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_map_ids_and_clamp_the_rest() {
        let r = IdRange {
            base: 0x7001_0000,
            count: ID_RANGE,
        };
        assert_eq!(r.map_line(), "0 1879113728 65536\n");
        assert!(r.contains(0x7001_0000) && r.contains(0x7001_ffff));
        assert!(!r.contains(0x7002_0000) && !r.contains(0x7000_ffff));
        assert_eq!(r.host_id(1000), 0x7001_0000 + 1000);
        assert_eq!(r.host_id(70_000), 0x7001_0000 + OVERFLOW_ID);
        assert_eq!(r.inner(0x7001_0005), Some(5));
        let single = IdRange { base: 42, count: 1 };
        assert_eq!(single.host_id(1000), 42);
        let image = IdRange {
            base: 0,
            count: ID_RANGE,
        };
        assert_eq!(idmap_line(image, r), "0 1879113728 65536\n");
        assert_eq!(idmap_line(single, r), "42 1879113728 1\n");
    }

    #[test]
    fn the_pool_hands_out_disjoint_ranges_and_frees_dead_claims() {
        let d = tempfile::tempdir().unwrap();
        let pool = IdPool::new(0x7000_0000, &d.path().join("claims"));
        assert_eq!(pool.slots(), (u32::MAX - 0x7001_0000) / ID_RANGE);
        let boxes: Vec<PathBuf> = (0..3)
            .map(|i| {
                let p = d.path().join(format!("box{i}"));
                std::fs::create_dir(&p).unwrap();
                p
            })
            .collect();
        let same = uuid::Uuid::from_u128(7);
        let a = pool.claim(&boxes[0], &same).unwrap();
        let b = pool.claim(&boxes[1], &same).unwrap();
        assert_ne!(a, b);
        assert!(a.base > 0x7000_0000 && a.count == ID_RANGE);
        assert!(a.base + a.count - 1 < u32::MAX && b.base + b.count - 1 < u32::MAX);
        // Claiming again for the same owner gives its range back.
        assert_eq!(pool.claim(&boxes[0], &same).unwrap(), a);
        assert!(pool.confirm(a, &boxes[0]).unwrap());
        assert!(!pool.confirm(a, &boxes[2]).unwrap());
        // A claim whose box is gone is free again, once it is not young.
        std::fs::remove_dir(&boxes[1]).unwrap();
        let c = pool.claim(&boxes[2], &same).unwrap();
        assert_ne!(c, b);
        pool.release(c, &boxes[2]);
        let old = std::time::SystemTime::now() - CLAIM_GRACE - std::time::Duration::from_secs(1);
        std::fs::File::options()
            .write(true)
            .open(pool.claim_path(b))
            .unwrap()
            .set_modified(old)
            .unwrap();
        assert_eq!(pool.claim(&boxes[2], &same).unwrap(), b);
        pool.release(b, &boxes[0]); // not its holder: kept
        assert!(!pool.confirm(b, &boxes[0]).unwrap());
        pool.release(b, &boxes[2]);
        assert!(pool.confirm(b, &boxes[0]).unwrap());
    }

    #[test]
    fn shifting_moves_owned_entries_and_leaves_links_targets_alone() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        use std::os::unix::fs::MetadataExt;
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("upper");
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::fs::write(root.join("a/b/f"), "x").unwrap();
        let outside = d.path().join("outside");
        std::fs::write(&outside, "y").unwrap();
        std::os::unix::fs::symlink(&outside, root.join("a/link")).unwrap();
        let from = IdRange {
            base: 5000,
            count: 1,
        };
        for p in ["", "a", "a/b", "a/b/f"] {
            std::os::unix::fs::lchown(root.join(p), Some(5000), Some(5000)).unwrap();
        }
        std::os::unix::fs::lchown(root.join("a/link"), Some(5000), Some(5000)).unwrap();
        let to = IdRange {
            base: 300_000,
            count: ID_RANGE,
        };
        let n = shift_tree(&root, from, to).unwrap();
        assert_eq!(n, 5);
        for p in ["", "a", "a/b", "a/b/f"] {
            let m = std::fs::symlink_metadata(root.join(p)).unwrap();
            assert_eq!((m.uid(), m.gid()), (300_000, 300_000), "{p}");
        }
        assert_eq!(
            std::fs::symlink_metadata(root.join("a/link"))
                .unwrap()
                .uid(),
            300_000
        );
        assert_eq!(std::fs::metadata(&outside).unwrap().uid(), 0);
    }
}
