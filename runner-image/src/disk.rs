//! Per-box disks: the writable layer of a box lives on a filesystem of its
//! own, an ext4 image of the box's `disk_mib` in its directory
//! (`<box>/disk.img`), so the kernel enforces the size: a full box gets
//! `ENOSPC` and the host's free space is untouched.
//!
//! - The image is sparse: it takes host blocks only for what the box wrote.
//!   A new image is a sparse copy of a template formatted once per size
//!   (`<state>/disk-templates/`), so creating a box runs no `mkfs`.
//! - It is attached to a loop device (auto-clearing) and mounted only in the
//!   private mount namespace of the box's shim (or, for an export, import or
//!   repair of a stopped box, of one short-lived agent thread): the host's
//!   mount table never lists box disks. An exclusive `flock` on the image
//!   guards against two mounts of one disk.
//! - The filesystem holds `upper/` (owned by the box's root) and `work/`,
//!   overlayfs' upper and work directories.
//! - Journal-less (the box layer is its own, and cheap to check): an image
//!   not cleanly unmounted (a host crash) is checked with `e2fsck -p` before
//!   its next mount.

use std::ffi::CString;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, anyhow, bail};

use crate::sys;

/// Name of the image in a box directory.
pub const IMAGE: &str = "disk.img";
/// Smallest disk a box may have, MiB.
pub const MIN_MIB: u64 = 16;
/// Largest disk a box may have, MiB (64 TiB).
pub const MAX_MIB: u64 = 64 << 20;

/// The disk image of the box in `box_dir`.
pub fn image_path(box_dir: &Path) -> PathBuf {
    box_dir.join(IMAGE)
}

/// Host bytes the image takes (its allocated blocks, not its size).
pub fn usage_bytes(image: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(image).ok().map(|m| m.blocks() * 512)
}

fn tool(name: &str) -> Command {
    let mut c = Command::new(name);
    c.env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .stdin(Stdio::null());
    c
}

/// Create `dest` (which must not exist), a fresh filesystem of `mib` MiB,
/// by a sparse copy of the template of that size in `templates`.
pub fn create(templates: &Path, dest: &Path, mib: u64) -> Result<()> {
    if !(MIN_MIB..=MAX_MIB).contains(&mib) {
        bail!("a box disk must be {MIN_MIB} MiB to {MAX_MIB} MiB, not {mib} MiB");
    }
    let template = template(templates, mib)?;
    let mut src = std::fs::File::open(&template)
        .with_context(|| format!("opening {}", template.display()))?;
    let mut dst = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dest)
        .with_context(|| format!("creating {}", dest.display()))?;
    use std::os::unix::fs::PermissionsExt;
    dst.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    copy_sparse_file(&mut src, &mut dst)
        .with_context(|| format!("copying {}", template.display()))?;
    Ok(())
}

/// The template of `mib` MiB, formatted now if it is the first of its size.
fn template(dir: &Path, mib: u64) -> Result<PathBuf> {
    let path = dir.join(format!("{mib}m.img"));
    if path.exists() {
        return Ok(path);
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(format!(".{mib}m-{:08x}.img", rand::random::<u32>()));
    let res = (|| -> Result<()> {
        let f = std::fs::File::create(&tmp)?;
        f.set_len(mib << 20)?;
        drop(f);
        let out = tool("mkfs.ext4")
            .args([
                "-q",
                "-F",
                "-O",
                "^has_journal",
                "-E",
                "lazy_itable_init=1,nodiscard,root_owner=0:0",
                "-m",
                "0",
                "-L",
                "boxlite-box",
            ])
            .arg(&tmp)
            .output()
            .context("running mkfs.ext4 (install e2fsprogs)")?;
        if !out.status.success() {
            bail!(
                "mkfs.ext4 failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        std::fs::rename(&tmp, &path)?;
        Ok(())
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res.with_context(|| format!("formatting a {mib} MiB box disk template"))?;
    Ok(path)
}

/// Copy `src` to `dst` keeping holes: only the data extents are copied.
fn copy_sparse_file(src: &mut std::fs::File, dst: &mut std::fs::File) -> Result<()> {
    let len = src.metadata()?.len();
    dst.set_len(len)?;
    let mut pos: i64 = 0;
    while (pos as u64) < len {
        // SAFETY: lseek on our descriptor.
        let data = unsafe { libc::lseek(src.as_raw_fd(), pos, libc::SEEK_DATA) };
        if data < 0 {
            if sys::errno() == libc::ENXIO {
                break; // only a hole is left
            }
            return Err(std::io::Error::last_os_error().into());
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(src.as_raw_fd(), data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        let mut off_in = data;
        let mut off_out = data;
        let mut left = (hole - data) as usize;
        while left > 0 {
            // SAFETY: valid descriptors and offsets.
            let n = unsafe {
                libc::copy_file_range(
                    src.as_raw_fd(),
                    &mut off_in,
                    dst.as_raw_fd(),
                    &mut off_out,
                    left,
                    0,
                )
            };
            if n < 0 {
                return Err(std::io::Error::last_os_error().into());
            }
            if n == 0 {
                break;
            }
            left -= n as usize;
        }
        pos = hole;
    }
    Ok(())
}

/// Copy `reader` into `f` from its current offset, writing runs of zero
/// blocks as holes: a sparse file stays sparse whatever carried it.
/// Returns the bytes read.
pub fn copy_keeping_holes(mut reader: impl Read, f: &mut std::fs::File) -> std::io::Result<u64> {
    const BLOCK: usize = 64 * 1024;
    let mut buf = vec![0u8; BLOCK];
    let start = f.stream_position()?;
    let mut total: u64 = 0;
    loop {
        // Fill the whole block (short reads are common from a decompressor).
        let mut n = 0;
        while n < BLOCK {
            match reader.read(&mut buf[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if n == 0 {
            break;
        }
        if is_zero(&buf[..n]) {
            f.seek(SeekFrom::Current(n as i64))?;
        } else {
            f.write_all(&buf[..n])?;
        }
        total += n as u64;
        if n < BLOCK {
            break;
        }
    }
    // A trailing hole still counts for the length.
    f.set_len(start + total)?;
    f.seek(SeekFrom::Start(start + total))?;
    Ok(total)
}

/// True when every byte of `b` is zero (libc's `memcmp`, fast in any build).
fn is_zero(b: &[u8]) -> bool {
    static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
    b.chunks(ZEROS.len()).all(|c| {
        // SAFETY: both pointers are valid for c.len() bytes.
        unsafe { libc::memcmp(c.as_ptr().cast(), ZEROS.as_ptr().cast(), c.len()) == 0 }
    })
}

/// True when the filesystem in `image` was cleanly unmounted (ext4 `s_state`).
fn clean(image: &Path) -> Result<bool> {
    let mut f = std::fs::File::open(image)?;
    let mut sb = [0u8; 64];
    f.seek(SeekFrom::Start(1024))?;
    f.read_exact(&mut sb)?;
    if u16::from_le_bytes([sb[56], sb[57]]) != 0xEF53 {
        bail!("{} holds no ext4 filesystem", image.display());
    }
    let state = u16::from_le_bytes([sb[58], sb[59]]);
    // EXT4_VALID_FS set, EXT4_ERROR_FS clear.
    Ok(state & 1 == 1 && state & 2 == 0)
}

/// Repair `image` with `e2fsck -p` when it was not cleanly unmounted.
pub fn check(image: &Path) -> Result<()> {
    if clean(image)? {
        return Ok(());
    }
    tracing::warn!(image = %image.display(), "box disk not cleanly unmounted; checking it");
    let st = tool("e2fsck")
        .args(["-p", "-f"])
        .arg(image)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .context("running e2fsck (install e2fsprogs)")?;
    // 0: clean, 1: errors corrected.
    match st.code() {
        Some(0 | 1) => Ok(()),
        _ => bail!("e2fsck could not repair {} ({st})", image.display()),
    }
}

/// `struct loop_info64`.
#[repr(C)]
struct LoopInfo64 {
    device: u64,
    inode: u64,
    rdevice: u64,
    offset: u64,
    sizelimit: u64,
    number: u32,
    encrypt_type: u32,
    encrypt_key_size: u32,
    flags: u32,
    file_name: [u8; 64],
    crypt_name: [u8; 64],
    encrypt_key: [u8; 32],
    init: [u64; 2],
}

/// `struct loop_config`.
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LO_FLAGS_READ_ONLY: u32 = 1;
const LO_FLAGS_AUTOCLEAR: u32 = 4;
const LO_FLAGS_DIRECT_IO: u32 = 16;

/// Attach `image` to a free loop device that detaches itself once unmounted;
/// returns its path and an open descriptor of it, which the caller keeps
/// until the device is mounted (closing the last one before would detach it).
fn attach(image: &std::fs::File, read_only: bool) -> Result<(PathBuf, std::fs::File)> {
    let ctl = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/loop-control")
        .context("opening /dev/loop-control (is the loop module available?)")?;
    for _ in 0..32 {
        // SAFETY: an ioctl without arguments on our descriptor.
        let n = unsafe { libc::ioctl(ctl.as_raw_fd(), LOOP_CTL_GET_FREE) };
        if n < 0 {
            return Err(std::io::Error::last_os_error()).context("finding a free loop device");
        }
        let dev = PathBuf::from(format!("/dev/loop{n}"));
        let Ok(loopdev) = std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(&dev)
        else {
            continue;
        };
        for direct in [true, false] {
            // SAFETY: plain data; zero is valid for every field.
            let mut cfg: LoopConfig = unsafe { std::mem::zeroed() };
            cfg.fd = image.as_raw_fd() as u32;
            cfg.info.flags = LO_FLAGS_AUTOCLEAR
                | if read_only { LO_FLAGS_READ_ONLY } else { 0 }
                | if direct { LO_FLAGS_DIRECT_IO } else { 0 };
            // SAFETY: a correctly laid-out struct for LOOP_CONFIGURE.
            if unsafe { libc::ioctl(loopdev.as_raw_fd(), LOOP_CONFIGURE, &cfg) } == 0 {
                return Ok((dev, loopdev));
            }
            match sys::errno() {
                // Taken by someone else between GET_FREE and here: next one.
                libc::EBUSY => break,
                libc::EINVAL if direct => continue,
                e => {
                    return Err(std::io::Error::from_raw_os_error(e))
                        .with_context(|| format!("attaching {}", dev.display()));
                }
            }
        }
    }
    bail!("no free loop device")
}

/// A mounted box disk: the image locked, the filesystem at `path`.
pub struct Mounted {
    /// Mount point.
    pub path: PathBuf,
    _lock: std::fs::File,
}

/// Lock `image` exclusively (nobody else has it mounted), check it, attach
/// and mount it at `target` (in the caller's, private, mount namespace).
pub fn mount(image: &Path, target: &Path, read_only: bool) -> Result<Mounted> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(image)
        .with_context(|| format!("opening {}", image.display()))?;
    // SAFETY: flock on our descriptor.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        bail!("the box's disk is in use (the box runs)");
    }
    if !read_only {
        check(image)?;
    }
    let (dev, held) = attach(&f, read_only)?;
    let mut flags = nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV;
    if read_only {
        flags |= nix::mount::MsFlags::MS_RDONLY;
    }
    let res = nix::mount::mount(
        Some(&dev),
        target,
        Some("ext4"),
        flags,
        Some(if read_only {
            "noload"
        } else {
            "noinit_itable,errors=remount-ro"
        }),
    );
    if let Err(e) = res {
        // Never mounted: detach it (closing it would too, being auto-clearing).
        // SAFETY: LOOP_CLR_FD on our descriptor.
        unsafe { libc::ioctl(held.as_raw_fd(), 0x4C01) };
        return Err(anyhow!(
            "mounting {} ({}): {e}",
            image.display(),
            dev.display()
        ));
    }
    drop(held);
    Ok(Mounted {
        path: target.to_path_buf(),
        _lock: f,
    })
}

/// Make `upper/` (owned by `root_id`) and an empty `work/` on a mounted
/// disk; returns their paths.
pub fn prepare_layers(mnt: &Path, root_id: u32) -> Result<(PathBuf, PathBuf)> {
    let upper = mnt.join("upper");
    let work = mnt.join("work");
    match std::fs::symlink_metadata(&upper) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => bail!("the box's disk holds an `upper` that is not a directory"),
        Err(_) => {
            std::fs::create_dir(&upper)?;
            std::os::unix::fs::chown(&upper, Some(root_id), Some(root_id))?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&upper, std::fs::Permissions::from_mode(0o755))?;
        }
    }
    // overlayfs refuses a work directory left from an unclean stop.
    if std::fs::symlink_metadata(&work).is_ok() {
        std::fs::remove_dir_all(&work)?;
    }
    std::fs::create_dir(&work)?;
    let _ = std::fs::remove_dir_all(mnt.join("lost+found"));
    Ok((upper, work))
}

/// Run `f` with the disk `image` mounted at a private mount point, in a
/// thread of its own that has its own mount namespace (so nothing else sees
/// the mount, and it goes when the thread ends). Refused while the box runs.
pub fn with_mounted<T: Send + 'static>(
    image: &Path,
    scratch: &Path,
    read_only: bool,
    f: impl FnOnce(&Path) -> Result<T> + Send + 'static,
) -> Result<T> {
    let image = image.to_path_buf();
    let target = scratch.join(format!("mnt-{:08x}", rand::random::<u32>()));
    std::fs::create_dir(&target).with_context(|| format!("creating {}", target.display()))?;
    let t2 = target.clone();
    let res = std::thread::Builder::new()
        .name("boxlite-disk".into())
        .spawn(move || -> Result<T> {
            // SAFETY: unshare affects this thread only (CLONE_NEWNS implies
            // CLONE_FS: the thread gets its own root and cwd too).
            if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
                return Err(std::io::Error::last_os_error()).context("unshare(CLONE_NEWNS)");
            }
            nix::mount::mount(
                None::<&str>,
                "/",
                None::<&str>,
                nix::mount::MsFlags::MS_REC | nix::mount::MsFlags::MS_PRIVATE,
                None::<&str>,
            )
            .context("making the thread's mounts private")?;
            let m = mount(&image, &t2, read_only)?;
            let out = f(&m.path);
            // Unmount now (not lazily when the namespace goes) so the loop
            // device is gone before anyone mounts the image again.
            let c = CString::new(t2.as_os_str().as_encoded_bytes()).expect("no NUL");
            // SAFETY: valid C string.
            if unsafe { libc::umount2(c.as_ptr(), 0) } != 0 {
                tracing::warn!("unmounting a box disk: {}", std::io::Error::last_os_error());
            }
            drop(m);
            out
        })
        .context("starting a thread")?
        .join()
        .map_err(|_| anyhow!("the disk thread panicked"));
    let _ = std::fs::remove_dir(&target);
    res?
}

/// The root directory of a mounted disk, opened without following a link.
pub fn open_root(mnt: &Path) -> Result<std::os::fd::OwnedFd> {
    let fd = nix::fcntl::open(
        mnt,
        nix::fcntl::OFlag::O_RDONLY
            | nix::fcntl::OFlag::O_DIRECTORY
            | nix::fcntl::OFlag::O_NOFOLLOW
            | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .with_context(|| format!("opening {}", mnt.display()))?;
    Ok(fd)
}

/// Where a running box's disk is: inside its shim's mount namespace.
pub fn running_upper(shim_pid: u32) -> PathBuf {
    PathBuf::from(format!(
        "/proc/{shim_pid}/root{}/disk/upper",
        crate::sandbox::SANDBOX_MOUNT_BASE
    ))
}

/// Keep a descriptor from being closed (the shim holds its disk's lock for life).
pub fn leak(m: Mounted) {
    std::mem::forget(m);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_runs_become_holes_and_data_survives() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        let mut f = std::fs::File::create(&p).unwrap();
        let mut data = vec![0u8; 8 << 20];
        data[5 << 20] = 7;
        data.extend_from_slice(b"tail");
        let n = copy_keeping_holes(&data[..], &mut f).unwrap();
        assert_eq!(n, data.len() as u64);
        drop(f);
        assert_eq!(std::fs::read(&p).unwrap(), data);
        use std::os::unix::fs::MetadataExt;
        let blocks = std::fs::metadata(&p).unwrap().blocks() * 512;
        assert!(
            blocks < 1 << 20,
            "{blocks} bytes allocated for 8 MiB of mostly zeros"
        );
    }

    #[test]
    fn a_disk_mounts_privately_holds_its_size_and_refuses_a_second_mount() {
        if !nix::unistd::geteuid().is_root() || !Path::new("/dev/loop-control").exists() {
            eprintln!("skipped: needs root and loop devices");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("disk.img");
        create(&d.path().join("t"), &img, 16).unwrap();
        let scratch = d.path().to_path_buf();
        let written = with_mounted(&img, &scratch, false, |m| {
            std::fs::write(m.join("hello"), "world")?;
            let mut f = std::fs::File::create(m.join("big"))?;
            let chunk = vec![1u8; 1 << 20];
            let mut n = 0u64;
            let err = loop {
                match f.write_all(&chunk).and_then(|_| f.sync_all()) {
                    Ok(()) => n += 1,
                    Err(e) => break e,
                }
                assert!(n < 64, "a 16 MiB disk took 64 MiB");
            };
            assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
            Ok(n)
        })
        .unwrap();
        assert!((8..17).contains(&written), "{written} MiB fit");
        // Not visible on the host.
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(!mounts.contains(&img.display().to_string()));
        let read = with_mounted(&img, &scratch, true, |m| {
            Ok(std::fs::read_to_string(m.join("hello"))?)
        })
        .unwrap();
        assert_eq!(read, "world");
        // Locked while mounted.
        let img2 = img.clone();
        let s2 = scratch.clone();
        with_mounted(&img, &scratch, true, move |_| {
            let e = with_mounted(&img2, &s2, true, |_| Ok(())).unwrap_err();
            assert!(format!("{e:#}").contains("in use"), "{e:#}");
            Ok(())
        })
        .unwrap();
    }

    #[test]
    fn disks_are_sparse_copies_of_a_template_and_refuse_odd_sizes() {
        if Command::new("mkfs.ext4").arg("-V").output().is_err() {
            eprintln!("skipped: needs mkfs.ext4");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let t = d.path().join("templates");
        let a = d.path().join("a.img");
        create(&t, &a, 64).unwrap();
        assert_eq!(std::fs::metadata(&a).unwrap().len(), 64 << 20);
        assert!(usage_bytes(&a).unwrap() < 8 << 20, "{:?}", usage_bytes(&a));
        assert!(clean(&a).unwrap());
        let b = d.path().join("b.img");
        create(&t, &b, 64).unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        assert!(create(&t, &b, 64).is_err(), "never overwrites");
        assert!(create(&t, &d.path().join("c.img"), 1).is_err());
        assert!(create(&t, &d.path().join("c.img"), MAX_MIB + 1).is_err());
    }
}
