//! Filesystem layers as tar streams: applying one onto a directory and
//! writing a box's overlay upper directory out as one.
//!
//! Archives are hostile input. Applying never follows a symlink out of the
//! target directory: every parent directory is resolved with openat2
//! `RESOLVE_IN_ROOT` (so `lib -> /usr/lib` resolves inside the tree, as
//! container runtimes do), every final component is created with `*at()`
//! calls that do not follow symlinks, `..` components refuse the whole
//! archive, device nodes are skipped, set-id bits are dropped, and every
//! entry's owner is mapped into the target's id range ([`IdRange`]; ids
//! past its end become `nobody`). Totals are capped.
//!
//! Whiteouts use the OCI notation in archives (`.wh.NAME` deletes `NAME`,
//! `.wh..wh..opq` hides everything the lower layers had in a directory). When
//! flattening image layers they delete; when restoring a box's upper
//! directory they become overlayfs whiteouts (a 0:0 character device, the
//! `trusted.overlay.opaque` attribute) again.

use std::collections::{HashMap, HashSet};
use std::ffi::{CStr, CString, OsStr};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};

use crate::ids::IdRange;
use crate::sys;

/// OCI whiteout prefix.
pub const WHITEOUT_PREFIX: &str = ".wh.";
/// OCI opaque-directory marker.
pub const OPAQUE_MARKER: &str = ".wh..wh..opq";
/// Overlayfs attribute marking an opaque directory in an upper layer.
const OVERLAY_OPAQUE_XATTR: &CStr = c"trusted.overlay.opaque";

/// What whiteouts mean while applying.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WhiteoutMode {
    /// Flattening image layers: whiteouts delete from the tree.
    Delete,
    /// Restoring an overlay upper directory: whiteouts become overlayfs whiteouts.
    Overlay,
}

/// Options for [`apply`].
#[derive(Clone, Copy, Debug)]
pub struct ApplyOptions {
    /// Whiteout handling.
    pub whiteouts: WhiteoutMode,
    /// Host ids the archive's ids land in: an entry owned by `n` in the
    /// archive is owned by `ids.host_id(n)` (so a one-id range owns everything).
    pub ids: IdRange,
    /// Most bytes of file content accepted.
    pub max_bytes: u64,
    /// Most entries accepted.
    pub max_entries: u64,
}

/// Counts from [`apply`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApplyStats {
    /// Entries created or updated.
    pub entries: u64,
    /// Bytes of file content written.
    pub bytes: u64,
    /// Device nodes and other unsupported entries skipped.
    pub skipped: u64,
    /// Whiteouts applied.
    pub whiteouts: u64,
}

/// Split an archive path into safe components; `..`, NUL and empty names refuse it.
pub fn safe_components(raw: &[u8]) -> Result<Vec<Vec<u8>>> {
    if raw.contains(&0) {
        bail!("archive path contains NUL");
    }
    let mut out = Vec::new();
    for c in raw.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => bail!(
                "archive path {:?} escapes the root (`..`)",
                String::from_utf8_lossy(raw)
            ),
            c => {
                if c.len() > 255 {
                    bail!("archive path component longer than 255 bytes");
                }
                out.push(c.to_vec());
            }
        }
    }
    if out.len() > 256 {
        bail!("archive path nested deeper than 256 directories");
    }
    Ok(out)
}

fn cstr(b: &[u8]) -> Result<CString> {
    CString::new(b).map_err(|_| anyhow!("name contains NUL"))
}

fn io_err(what: &str, name: &[u8]) -> anyhow::Error {
    anyhow::Error::new(std::io::Error::last_os_error())
        .context(format!("{what} {:?}", String::from_utf8_lossy(name)))
}

fn owned(fd: libc::c_int) -> OwnedFd {
    // SAFETY: callers pass a descriptor the kernel just returned.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Resolve (creating as needed) the directory `comps` below `root`, confined to `root`.
fn ensure_dir(root: &OwnedFd, comps: &[Vec<u8>], owner: u32) -> Result<OwnedFd> {
    let joined = comps.join(&b'/');
    let path = String::from_utf8_lossy(&joined).into_owned();
    match sys::open_in_root(root, &path, libc::O_PATH | libc::O_DIRECTORY) {
        Ok(fd) => return Ok(fd),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) && !comps.is_empty() => {}
        Err(e) => {
            return Err(anyhow::Error::new(e).context(format!("resolving directory {path:?}")));
        }
    }
    let (last, parent) = comps.split_last().expect("not empty");
    let pfd = ensure_dir(root, parent, owner)?;
    let name = cstr(last)?;
    // SAFETY: valid descriptor and C string.
    if unsafe { libc::mkdirat(pfd.as_raw_fd(), name.as_ptr(), 0o755) } != 0
        && sys::errno() != libc::EEXIST
    {
        return Err(io_err("mkdir", &joined));
    }
    // SAFETY: as above; AT_SYMLINK_NOFOLLOW keeps a planted link untouched.
    unsafe {
        libc::fchownat(
            pfd.as_raw_fd(),
            name.as_ptr(),
            owner,
            owner,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    sys::open_in_root(root, &path, libc::O_PATH | libc::O_DIRECTORY).with_context(|| {
        format!("{path:?} is not a directory (or a link pointing at nothing inside the tree)")
    })
}

/// `lstat` of `name` in `dir`; `None` when absent.
fn lstat_at(dir: &OwnedFd, name: &CStr) -> Option<libc::stat> {
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid descriptor, C string and out pointer.
    let r = unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            name.as_ptr(),
            &mut st,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    (r == 0).then_some(st)
}

fn is_dir(st: &libc::stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFDIR
}

/// Remove `name` in `dir` whatever it is (directories recursively), never following links.
pub fn remove_at(dir: &OwnedFd, name: &[u8]) -> Result<()> {
    let c = cstr(name)?;
    let Some(st) = lstat_at(dir, &c) else {
        return Ok(());
    };
    if is_dir(&st) {
        // std's remove_dir_all does not follow symlinks (CVE-2022-21658 fixed);
        // the /proc/self/fd prefix pins the already-resolved parent.
        let p = format!(
            "/proc/self/fd/{}/{}",
            dir.as_raw_fd(),
            String::from_utf8_lossy(name)
        );
        std::fs::remove_dir_all(&p)
            .with_context(|| format!("removing directory {:?}", String::from_utf8_lossy(name)))?;
    } else {
        // SAFETY: valid descriptor and C string.
        if unsafe { libc::unlinkat(dir.as_raw_fd(), c.as_ptr(), 0) } != 0
            && sys::errno() != libc::ENOENT
        {
            return Err(io_err("unlink", name));
        }
    }
    Ok(())
}

/// Remove every child of the directory `dir` whose path (under `prefix`) is not in `keep`.
fn clear_dir(dir: &OwnedFd, prefix: &[u8], keep: &HashSet<Vec<u8>>) -> Result<()> {
    let names = sys::list_dir(dir).context("reading directory to clear")?;
    for n in names {
        let mut full = prefix.to_vec();
        if !full.is_empty() {
            full.push(b'/');
        }
        full.extend_from_slice(&n);
        if !keep.contains(&full) {
            remove_at(dir, &n)?;
        }
    }
    Ok(())
}

/// Apply one layer (an uncompressed tar stream) onto `root`.
pub fn apply(reader: impl Read, root: &Path, opts: &ApplyOptions) -> Result<ApplyStats> {
    apply_at(reader, &sys::open_path(root, true)?, opts)
}

/// [`apply`] onto the directory open as `rootfd`, for callers that opened it
/// without following symlinks (a restore into a fresh box directory).
pub fn apply_at(reader: impl Read, rootfd: &OwnedFd, opts: &ApplyOptions) -> Result<ApplyStats> {
    let mut archive = tar::Archive::new(reader);
    let mut stats = ApplyStats::default();
    // Paths this layer created: an opaque marker must not hide them.
    let mut created: HashSet<Vec<u8>> = HashSet::new();
    let mut dir_times: Vec<(Vec<Vec<u8>>, i64)> = Vec::new();
    for entry in archive.entries().context("reading archive")? {
        let mut entry = entry.context("reading archive entry")?;
        stats.entries += 1;
        if stats.entries > opts.max_entries {
            bail!("archive has more than {} entries", opts.max_entries);
        }
        let raw_path = entry.path_bytes().into_owned();
        let comps = safe_components(&raw_path)?;
        let Some((name, parent)) = comps.split_last() else {
            continue; // the root itself
        };
        let header = entry.header().clone();
        let kind = header.entry_type();
        let pfd = ensure_dir(rootfd, parent, opts.ids.base)?;
        let parent_path = parent.join(&b'/');

        // Whiteouts.
        if name.as_slice() == OPAQUE_MARKER.as_bytes() {
            stats.whiteouts += 1;
            match opts.whiteouts {
                WhiteoutMode::Delete => clear_dir(&pfd, &parent_path, &created)?,
                WhiteoutMode::Overlay => {
                    let dfd = sys::open_in_root(
                        rootfd,
                        &String::from_utf8_lossy(&parent_path),
                        libc::O_RDONLY | libc::O_DIRECTORY,
                    )
                    .context("opening opaque directory")?;
                    // SAFETY: valid descriptor, attribute name and value.
                    let r = unsafe {
                        libc::fsetxattr(
                            dfd.as_raw_fd(),
                            OVERLAY_OPAQUE_XATTR.as_ptr(),
                            b"y".as_ptr().cast(),
                            1,
                            0,
                        )
                    };
                    if r != 0 {
                        return Err(io_err("marking opaque", &parent_path));
                    }
                }
            }
            continue;
        }
        if let Some(target) = name.strip_prefix(WHITEOUT_PREFIX.as_bytes()) {
            if target.is_empty() || target == b"." || target == b".." {
                bail!("malformed whiteout entry");
            }
            stats.whiteouts += 1;
            remove_at(&pfd, target)?;
            if opts.whiteouts == WhiteoutMode::Overlay {
                let c = cstr(target)?;
                // SAFETY: valid descriptor and C string; 0:0 char device = overlay whiteout.
                if unsafe { libc::mknodat(pfd.as_raw_fd(), c.as_ptr(), libc::S_IFCHR, 0) } != 0 {
                    return Err(io_err("creating whiteout", target));
                }
                unsafe {
                    libc::fchownat(
                        pfd.as_raw_fd(),
                        c.as_ptr(),
                        opts.ids.base,
                        opts.ids.base,
                        libc::AT_SYMLINK_NOFOLLOW,
                    )
                };
            }
            continue;
        }

        let cname = cstr(name)?;
        let (uid, gid) = (
            opts.ids.host_id(header.uid().unwrap_or(0)),
            opts.ids.host_id(header.gid().unwrap_or(0)),
        );
        let mode = (header.mode().unwrap_or(0o644) & 0o1777) as libc::mode_t;
        let mtime = header.mtime().unwrap_or(0) as i64;
        let full: Vec<u8> = comps.join(&b'/');
        let existing = lstat_at(&pfd, &cname);
        let fd = pfd.as_raw_fd();

        match kind {
            tar::EntryType::Directory => {
                if let Some(st) = existing
                    && !is_dir(&st)
                {
                    remove_at(&pfd, name)?;
                }
                // SAFETY: valid descriptor and C string.
                if unsafe { libc::mkdirat(fd, cname.as_ptr(), 0o700) } != 0
                    && sys::errno() != libc::EEXIST
                {
                    return Err(io_err("mkdir", &full));
                }
                let dfd = sys::open_in_root(
                    rootfd,
                    &String::from_utf8_lossy(&full),
                    libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                )
                .with_context(|| {
                    format!("opening directory {:?}", String::from_utf8_lossy(&full))
                })?;
                // SAFETY: valid descriptor.
                unsafe {
                    libc::fchown(dfd.as_raw_fd(), uid, gid);
                    libc::fchmod(dfd.as_raw_fd(), mode);
                }
                dir_times.push((comps.clone(), mtime));
            }
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                if existing.is_some() {
                    remove_at(&pfd, name)?;
                }
                let size = entry.size();
                if stats.bytes.saturating_add(size) > opts.max_bytes {
                    bail!("archive content exceeds {} bytes", opts.max_bytes);
                }
                // SAFETY: valid descriptor and C string; O_EXCL|O_NOFOLLOW never reuse a planted link.
                let ffd = unsafe {
                    libc::openat(
                        fd,
                        cname.as_ptr(),
                        libc::O_WRONLY
                            | libc::O_CREAT
                            | libc::O_EXCL
                            | libc::O_NOFOLLOW
                            | libc::O_CLOEXEC,
                        0o600,
                    )
                };
                if ffd < 0 {
                    return Err(io_err("create", &full));
                }
                let mut f = std::fs::File::from(owned(ffd));
                let n = crate::disk::copy_keeping_holes((&mut entry).take(opts.max_bytes), &mut f)
                    .with_context(|| format!("writing {:?}", String::from_utf8_lossy(&full)))?;
                stats.bytes += n;
                // SAFETY: valid descriptor. chown first: it would clear set-id bits anyway.
                unsafe {
                    libc::fchown(f.as_raw_fd(), uid, gid);
                    libc::fchmod(f.as_raw_fd(), mode);
                }
                set_mtime(fd, &cname, mtime);
            }
            tar::EntryType::Symlink => {
                if existing.is_some() {
                    remove_at(&pfd, name)?;
                }
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| anyhow!("symlink without target"))?
                    .into_owned();
                let t = cstr(&target)?;
                // SAFETY: valid descriptor and C strings.
                if unsafe { libc::symlinkat(t.as_ptr(), fd, cname.as_ptr()) } != 0 {
                    return Err(io_err("symlink", &full));
                }
                unsafe { libc::fchownat(fd, cname.as_ptr(), uid, gid, libc::AT_SYMLINK_NOFOLLOW) };
                set_mtime(fd, &cname, mtime);
            }
            tar::EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| anyhow!("hard link without target"))?
                    .into_owned();
                let tcomps = safe_components(&target)?;
                let Some((tname, tparent)) = tcomps.split_last() else {
                    bail!("hard link to the root");
                };
                let tpfd = ensure_dir(rootfd, tparent, opts.ids.base)?;
                let tc = cstr(tname)?;
                match lstat_at(&tpfd, &tc) {
                    Some(st) if !is_dir(&st) => {}
                    _ => bail!(
                        "hard link {:?} to a missing file or a directory",
                        String::from_utf8_lossy(&full)
                    ),
                }
                if existing.is_some() {
                    remove_at(&pfd, name)?;
                }
                // SAFETY: valid descriptors and C strings; flags 0 = do not follow.
                if unsafe { libc::linkat(tpfd.as_raw_fd(), tc.as_ptr(), fd, cname.as_ptr(), 0) }
                    != 0
                {
                    return Err(io_err("link", &full));
                }
            }
            tar::EntryType::Fifo => {
                if existing.is_some() {
                    remove_at(&pfd, name)?;
                }
                // SAFETY: valid descriptor and C string.
                if unsafe { libc::mknodat(fd, cname.as_ptr(), libc::S_IFIFO | mode, 0) } != 0 {
                    return Err(io_err("mkfifo", &full));
                }
                unsafe { libc::fchownat(fd, cname.as_ptr(), uid, gid, libc::AT_SYMLINK_NOFOLLOW) };
            }
            tar::EntryType::XGlobalHeader | tar::EntryType::XHeader => continue,
            _ => {
                // Character and block devices, sockets: a box gets its devices from bubblewrap.
                stats.skipped += 1;
                continue;
            }
        }
        created.insert(full);
    }
    // Directory times last: creating entries changed them.
    for (comps, mtime) in dir_times.iter().rev() {
        if let Some((name, parent)) = comps.split_last()
            && let Ok(pfd) = ensure_dir(rootfd, parent, opts.ids.base)
            && let Ok(c) = cstr(name)
        {
            set_mtime(pfd.as_raw_fd(), &c, *mtime);
        }
    }
    Ok(stats)
}

fn set_mtime(dir: RawFd, name: &CStr, mtime: i64) {
    let ts = [
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        libc::timespec {
            tv_sec: mtime,
            tv_nsec: 0,
        },
    ];
    // SAFETY: valid descriptor, C string and two timespecs.
    unsafe { libc::utimensat(dir, name.as_ptr(), ts.as_ptr(), libc::AT_SYMLINK_NOFOLLOW) };
}

/// The data extents (offset, length) of `f`, which is `len` bytes long;
/// `None` when the filesystem cannot tell holes.
fn data_extents(f: &std::fs::File, len: u64) -> Result<Option<Vec<(u64, u64)>>> {
    let mut out = Vec::new();
    let mut pos: i64 = 0;
    let end = len as i64;
    while pos < end {
        // SAFETY: lseek on our descriptor.
        let data = unsafe { libc::lseek(f.as_raw_fd(), pos, libc::SEEK_DATA) };
        if data < 0 {
            match sys::errno() {
                libc::ENXIO => break,
                libc::EINVAL => return Ok(None),
                _ => return Err(std::io::Error::last_os_error().into()),
            }
        }
        if data >= end {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(f.as_raw_fd(), data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        let hole = hole.min(end);
        out.push((data as u64, (hole - data) as u64));
        pos = hole;
    }
    // The map ends at the file's end: a trailing hole is an empty extent there.
    if out.last().is_none_or(|(o, l)| o + l < len) {
        out.push((len, 0));
    }
    Ok(Some(out))
}

/// Append `f` (`len` bytes, data in `extents`) as an old-GNU sparse entry;
/// the bytes of data written.
fn append_sparse<W: Write>(
    b: &mut tar::Builder<W>,
    h: &mut tar::Header,
    path: &str,
    f: std::fs::File,
    len: u64,
    extents: &[(u64, u64)],
) -> Result<u64> {
    let on_disk: u64 = extents.iter().map(|(_, l)| l).sum();
    h.set_entry_type(tar::EntryType::GNUSparse);
    h.set_size(on_disk);
    let gnu = h.as_gnu_mut().ok_or_else(|| anyhow!("not a GNU header"))?;
    gnu.set_real_size(len);
    for (slot, (o, l)) in gnu.sparse.iter_mut().zip(extents) {
        slot.set_offset(*o);
        slot.set_length(*l);
    }
    gnu.set_is_extended(extents.len() > gnu.sparse.len());
    // The extended sparse headers come right after the header, then the data.
    let mut ext = Vec::new();
    let mut rest = extents.iter().skip(4).peekable();
    while rest.peek().is_some() {
        let mut e = tar::GnuExtSparseHeader::new();
        for slot in e.sparse.iter_mut() {
            match rest.next() {
                Some((o, l)) => {
                    slot.set_offset(*o);
                    slot.set_length(*l);
                }
                None => break,
            }
        }
        e.set_is_extended(rest.peek().is_some());
        ext.extend_from_slice(e.as_bytes());
    }
    // Read exactly what the map announced, even if the file changes meanwhile.
    let segments = extents
        .iter()
        .filter(|(_, l)| *l > 0)
        .map(|&(o, l)| -> Box<dyn Read> {
            match f.try_clone() {
                Ok(c) => Box::new(
                    std::io::Read::take(PositionedReader { f: c, pos: o }, l)
                        .chain(std::io::repeat(0).take(l))
                        .take(l),
                ),
                Err(_) => Box::new(std::io::repeat(0).take(l)),
            }
        })
        .fold(Box::new(std::io::empty()) as Box<dyn Read>, |acc, r| {
            Box::new(acc.chain(r))
        });
    b.append_data(h, path, std::io::Cursor::new(ext).chain(segments))?;
    Ok(on_disk)
}

/// Reads a file from an offset of its own (pread), so clones do not share a position.
struct PositionedReader {
    f: std::fs::File,
    pos: u64,
}

impl Read for PositionedReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use std::os::unix::fs::FileExt;
        let n = self.f.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// Counts from [`write_upper`].
#[derive(Clone, Copy, Debug, Default)]
pub struct WriteStats {
    /// Entries written.
    pub entries: u64,
    /// File bytes written.
    pub bytes: u64,
}

/// Write the overlay upper directory `upper` as a layer into `builder`, under
/// the archive directory `prefix`, with overlayfs whiteouts turned into OCI
/// whiteouts and ownership made relative to `owner` (so it restores on a
/// runner with another box uid). Never follows a symlink: each entry is
/// opened relative to its already-open parent with `O_NOFOLLOW`, and its type
/// is taken from the open descriptor.
pub fn write_upper<W: Write>(
    builder: &mut tar::Builder<W>,
    upper: &Path,
    prefix: &str,
    owner: u32,
) -> Result<WriteStats> {
    let root =
        std::fs::File::open(upper).with_context(|| format!("opening {}", upper.display()))?;
    let mut stats = WriteStats::default();
    let mut links: HashMap<(u64, u64), String> = HashMap::new();
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_mode(0o755);
    h.set_size(0);
    builder
        .append_data(&mut h, format!("{prefix}/"), std::io::empty())
        .context("writing archive")?;
    walk(
        builder,
        &OwnedFd::from(root),
        prefix,
        owner,
        &mut stats,
        &mut links,
        0,
    )?;
    Ok(stats)
}

fn rel_id(id: u32, owner: u32) -> u64 {
    u64::from(id.checked_sub(owner).filter(|d| *d < 65536).unwrap_or(0))
}

fn walk<W: Write>(
    b: &mut tar::Builder<W>,
    dir: &OwnedFd,
    path: &str,
    owner: u32,
    stats: &mut WriteStats,
    links: &mut HashMap<(u64, u64), String>,
    depth: usize,
) -> Result<()> {
    if depth > 256 {
        bail!("directory tree deeper than 256 levels at {path}");
    }
    let names = sys::list_dir(dir).with_context(|| format!("reading {path}"))?;
    for name in names {
        let cname = cstr(&name)?;
        let child = format!("{path}/{}", String::from_utf8_lossy(&name));
        if std::str::from_utf8(&name).is_err() {
            // Archive paths must round-trip; a non-UTF-8 name would be mangled.
            bail!("file name {child:?} is not UTF-8; cannot export it faithfully");
        }
        let Some(st) = lstat_at(dir, &cname) else {
            continue; // vanished meanwhile
        };
        let fmt = st.st_mode & libc::S_IFMT;
        let mut h = tar::Header::new_gnu();
        h.set_mode(st.st_mode & 0o1777);
        h.set_uid(rel_id(st.st_uid, owner));
        h.set_gid(rel_id(st.st_gid, owner));
        h.set_mtime(st.st_mtime.max(0) as u64);
        h.set_size(0);
        match fmt {
            libc::S_IFCHR if st.st_rdev == 0 => {
                // Overlay whiteout.
                let mut w = tar::Header::new_gnu();
                w.set_entry_type(tar::EntryType::Regular);
                w.set_mode(0o600);
                w.set_size(0);
                b.append_data(
                    &mut w,
                    format!("{path}/{WHITEOUT_PREFIX}{}", String::from_utf8_lossy(&name)),
                    std::io::empty(),
                )?;
            }
            libc::S_IFDIR => {
                // SAFETY: valid descriptor and C string.
                let fd = unsafe {
                    libc::openat(
                        dir.as_raw_fd(),
                        cname.as_ptr(),
                        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                    )
                };
                if fd < 0 {
                    continue; // replaced by something else meanwhile
                }
                let sub = owned(fd);
                h.set_entry_type(tar::EntryType::Directory);
                b.append_data(&mut h, format!("{child}/"), std::io::empty())?;
                let mut val = [0u8; 4];
                // SAFETY: valid descriptor, attribute name, buffer.
                let n = unsafe {
                    libc::fgetxattr(
                        sub.as_raw_fd(),
                        OVERLAY_OPAQUE_XATTR.as_ptr(),
                        val.as_mut_ptr().cast(),
                        val.len(),
                    )
                };
                if n == 1 && val[0] == b'y' {
                    let mut w = tar::Header::new_gnu();
                    w.set_entry_type(tar::EntryType::Regular);
                    w.set_mode(0o600);
                    w.set_size(0);
                    b.append_data(&mut w, format!("{child}/{OPAQUE_MARKER}"), std::io::empty())?;
                }
                stats.entries += 1;
                walk(b, &sub, &child, owner, stats, links, depth + 1)?;
            }
            libc::S_IFLNK => {
                let target = nix::fcntl::readlinkat(dir, OsStr::from_bytes(&name))
                    .with_context(|| format!("readlink {child}"))?;
                h.set_entry_type(tar::EntryType::Symlink);
                b.append_link(&mut h, &child, Path::new(&target))?;
                stats.entries += 1;
            }
            libc::S_IFIFO => {
                h.set_entry_type(tar::EntryType::Fifo);
                b.append_data(&mut h, &child, std::io::empty())?;
                stats.entries += 1;
            }
            libc::S_IFREG => {
                // SAFETY: valid descriptor and C string. O_NONBLOCK: never hang on a
                // file swapped for a fifo meanwhile.
                let fd = unsafe {
                    libc::openat(
                        dir.as_raw_fd(),
                        cname.as_ptr(),
                        libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC,
                    )
                };
                if fd < 0 {
                    continue;
                }
                let f = std::fs::File::from(owned(fd));
                let meta = f.metadata()?;
                if !meta.is_file() {
                    continue; // swapped meanwhile: never read something else
                }
                use std::os::unix::fs::MetadataExt;
                let key = (meta.dev(), meta.ino());
                if meta.nlink() > 1 {
                    if let Some(first) = links.get(&key) {
                        h.set_entry_type(tar::EntryType::Link);
                        b.append_link(&mut h, &child, first)?;
                        stats.entries += 1;
                        continue;
                    }
                    links.insert(key, child.clone());
                }
                // A file with holes goes as a GNU sparse entry: its holes
                // are neither read nor written (nor inflated on import).
                if meta.blocks() * 512 < meta.len()
                    && let Some(extents) = data_extents(&f, meta.len())?
                {
                    stats.bytes += append_sparse(b, &mut h, &child, f, meta.len(), &extents)?;
                    stats.entries += 1;
                    continue;
                }
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(meta.len());
                // The file may change while we read: read exactly the size we announced.
                let reader = f
                    .take(meta.len())
                    .chain(std::io::repeat(0).take(meta.len()));
                b.append_data(&mut h, &child, reader.take(meta.len()))?;
                stats.entries += 1;
                stats.bytes += meta.len();
            }
            _ => {} // sockets, other devices: not part of a box's state
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(mode: WhiteoutMode) -> ApplyOptions {
        ApplyOptions {
            whiteouts: mode,
            ids: IdRange {
                base: nix::unistd::getuid().as_raw(),
                count: 1,
            },
            max_bytes: 1 << 20,
            max_entries: 1000,
        }
    }

    fn tar_of(entries: &[(&str, tar::EntryType, &[u8], Option<&str>)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, kind, data, link) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_mode(0o4755);
            h.set_size(data.len() as u64);
            if let Some(l) = link {
                h.set_link_name(l).unwrap();
            }
            // Write the raw name so `..` survives into the archive.
            let name = h.as_gnu_mut().unwrap();
            name.name[..path.len()].copy_from_slice(path.as_bytes());
            h.set_cksum();
            b.append(&h, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn refuses_traversal() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        std::fs::create_dir(&root).unwrap();
        let t = tar_of(&[("../evil", tar::EntryType::Regular, b"x", None)]);
        let e = apply(&t[..], &root, &opts(WhiteoutMode::Delete)).unwrap_err();
        assert!(format!("{e:#}").contains("escapes"), "{e:#}");
        assert!(!d.path().join("evil").exists());
    }

    #[test]
    fn never_writes_through_a_symlink_out_of_the_tree() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        let outside = d.path().join("outside");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        let out = outside.to_str().unwrap().to_string();
        // `link -> /abs/outside`, then `link/pwned`: resolves to <root>/abs/outside, not the host dir.
        let t = tar_of(&[
            ("link", tar::EntryType::Symlink, b"", Some(out.as_str())),
            ("link/pwned", tar::EntryType::Regular, b"x", None),
        ]);
        let r = apply(&t[..], &root, &opts(WhiteoutMode::Delete));
        assert!(!outside.join("pwned").exists());
        // Either refused, or created inside the root.
        if r.is_ok() {
            assert!(
                root.join(out.trim_start_matches('/'))
                    .join("pwned")
                    .exists()
            );
        }
        // A symlink then a regular file with the same name replaces the link, not its target.
        std::fs::write(outside.join("victim"), "keep").unwrap();
        let victim = format!("{out}/victim");
        let t = tar_of(&[
            ("v", tar::EntryType::Symlink, b"", Some(victim.as_str())),
            ("v", tar::EntryType::Regular, b"new", None),
        ]);
        apply(&t[..], &root, &opts(WhiteoutMode::Delete)).unwrap();
        assert_eq!(
            std::fs::read_to_string(outside.join("victim")).unwrap(),
            "keep"
        );
        assert_eq!(std::fs::read_to_string(root.join("v")).unwrap(), "new");
    }

    #[test]
    fn hard_links_never_reach_out_of_the_tree() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        std::fs::create_dir(&root).unwrap();
        let secret = d.path().join("secret");
        std::fs::write(&secret, "host").unwrap();
        let abs = secret.to_str().unwrap().to_string();
        // An absolute target names a path inside the tree: absent there, refused.
        let t = tar_of(&[("h", tar::EntryType::Link, b"", Some(abs.as_str()))]);
        assert!(apply(&t[..], &root, &opts(WhiteoutMode::Delete)).is_err());
        // Through a symlink planted first: resolved inside the tree too.
        let t = tar_of(&[
            (
                "l",
                tar::EntryType::Symlink,
                b"",
                Some(d.path().to_str().unwrap()),
            ),
            ("h", tar::EntryType::Link, b"", Some("l/secret")),
        ]);
        assert!(apply(&t[..], &root, &opts(WhiteoutMode::Delete)).is_err());
        // `..` refuses the archive.
        let t = tar_of(&[("h", tar::EntryType::Link, b"", Some("../secret"))]);
        assert!(apply(&t[..], &root, &opts(WhiteoutMode::Delete)).is_err());
        use std::os::unix::fs::MetadataExt;
        assert_eq!(std::fs::metadata(&secret).unwrap().nlink(), 1);
        assert!(!root.join("h").exists());
    }

    #[test]
    fn whiteouts_delete_lower_content_but_not_same_layer() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        std::fs::create_dir(&root).unwrap();
        let l1 = tar_of(&[
            ("a/", tar::EntryType::Directory, b"", None),
            ("a/old", tar::EntryType::Regular, b"1", None),
            ("b", tar::EntryType::Regular, b"2", None),
        ]);
        apply(&l1[..], &root, &opts(WhiteoutMode::Delete)).unwrap();
        let l2 = tar_of(&[
            ("a/new", tar::EntryType::Regular, b"3", None),
            ("a/.wh..wh..opq", tar::EntryType::Regular, b"", None),
            (".wh.b", tar::EntryType::Regular, b"", None),
        ]);
        let s = apply(&l2[..], &root, &opts(WhiteoutMode::Delete)).unwrap();
        assert_eq!(s.whiteouts, 2);
        assert!(!root.join("a/old").exists());
        assert!(root.join("a/new").exists());
        assert!(!root.join("b").exists());
        // set-id bits were dropped.
        use std::os::unix::fs::PermissionsExt;
        let m = std::fs::metadata(root.join("a/new"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(m & 0o7777, 0o755);
    }

    #[test]
    fn caps_content() {
        let d = tempfile::tempdir().unwrap();
        let big = vec![0u8; 4096];
        let t = tar_of(&[("f", tar::EntryType::Regular, &big, None)]);
        let mut o = opts(WhiteoutMode::Delete);
        o.max_bytes = 1000;
        assert!(apply(&t[..], d.path(), &o).is_err());
    }

    #[test]
    fn upper_round_trips_with_overlay_whiteouts() {
        let d = tempfile::tempdir().unwrap();
        let upper = d.path().join("upper");
        std::fs::create_dir_all(upper.join("dir/sub")).unwrap();
        std::fs::write(upper.join("dir/file"), "hello").unwrap();
        std::fs::hard_link(upper.join("dir/file"), upper.join("hard")).unwrap();
        std::os::unix::fs::symlink("/dir/file", upper.join("sym")).unwrap();
        let wh = CString::new(upper.join("gone").as_os_str().as_bytes()).unwrap();
        assert_eq!(unsafe { libc::mknod(wh.as_ptr(), libc::S_IFCHR, 0) }, 0);
        let sub = CString::new(upper.join("dir/sub").as_os_str().as_bytes()).unwrap();
        assert_eq!(
            unsafe {
                libc::setxattr(
                    sub.as_ptr(),
                    OVERLAY_OPAQUE_XATTR.as_ptr(),
                    b"y".as_ptr().cast(),
                    1,
                    0,
                )
            },
            0
        );
        let owner = nix::unistd::getuid().as_raw();
        let mut b = tar::Builder::new(Vec::new());
        write_upper(&mut b, &upper, "upper", owner).unwrap();
        let bytes = b.into_inner().unwrap();
        // Restore into a fresh directory (strip the `upper/` prefix by applying below a parent).
        let restore = d.path().join("restore");
        std::fs::create_dir(&restore).unwrap();
        apply(&bytes[..], &restore, &opts(WhiteoutMode::Overlay)).unwrap();
        let r = restore.join("upper");
        assert_eq!(
            std::fs::read_to_string(r.join("dir/file")).unwrap(),
            "hello"
        );
        use std::os::unix::fs::MetadataExt;
        assert_eq!(
            std::fs::metadata(r.join("hard")).unwrap().ino(),
            std::fs::metadata(r.join("dir/file")).unwrap().ino()
        );
        assert_eq!(
            std::fs::read_link(r.join("sym")).unwrap(),
            Path::new("/dir/file")
        );
        let st = std::fs::symlink_metadata(r.join("gone")).unwrap();
        use std::os::unix::fs::FileTypeExt;
        assert!(st.file_type().is_char_device());
        assert_eq!(st.rdev(), 0);
        let c = CString::new(r.join("dir/sub").as_os_str().as_bytes()).unwrap();
        let mut v = [0u8; 2];
        let n = unsafe {
            libc::getxattr(
                c.as_ptr(),
                OVERLAY_OPAQUE_XATTR.as_ptr(),
                v.as_mut_ptr().cast(),
                2,
            )
        };
        assert_eq!(n, 1);
        assert_eq!(v[0], b'y');
    }
}
