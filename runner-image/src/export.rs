//! Box archives: export a box's writable layer and metadata, import it back
//! under the same box id — on this runner or any other.
//!
//! Format (`.tar.gz`): first entry `boxlite-export.json` ([`ExportMeta`]),
//! then the overlay upper directory under `upper/` with OCI whiteouts,
//! ownership relative to the box's id range, and files with holes as GNU
//! sparse entries (holes are neither read nor carried; import writes zero
//! runs as holes again). The SHA-256 of the whole archive is
//! computed while it is written; import hashes the body while storing it and
//! refuses a mismatch before touching anything. A running box is frozen
//! (cgroup freezer) while its layer is read, so the archive is consistent.
//!
//! Import restores onto a new disk of the box's size (see [`crate::disk`]),
//! after refusing an archive whose declared content exceeds it. Restoring
//! never follows a symlink: the staging directory is created and opened
//! with `O_NOFOLLOW`, the layer is applied relative to the disk's root descriptor
//! (see [`crate::layers`]), the top of the archive may hold only the metadata
//! file and an `upper` *directory* (a symlinked `upper` would otherwise become
//! the box's writable layer wherever it points), and ownership is set with
//! `fchown` on a descriptor opened `O_DIRECTORY | O_NOFOLLOW`, never on a path.

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow};
use futures::{Stream, StreamExt};
use nix::errno::Errno;
use nix::fcntl::{AT_FDCWD, AtFlags, OFlag, openat};
use nix::sys::stat::{Mode, SFlag, fchmod, fstatat, mkdirat};
use nix::unistd::{Gid, Uid, UnlinkatFlags, fchown, unlinkat};
use protocol::{BoxReport, BoxSpec, BoxState, Resources};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use uuid::Uuid;

use crate::boxes::{BoxError, BoxRecord, Boxes, Desired, UpperSource};
use crate::ids::IdRange;
use crate::layers::{self, ApplyOptions, WhiteoutMode};
use crate::sys;

/// Name of the metadata entry.
pub const META_ENTRY: &str = "boxlite-export.json";
/// Archive format version.
pub const FORMAT: u32 = 1;
/// Largest archive accepted by import.
pub const MAX_ARCHIVE: u64 = 64 << 30;

/// `boxlite-export.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportMeta {
    /// Format version.
    pub format: u32,
    /// Box id.
    pub box_id: Uuid,
    /// Spec.
    pub spec: BoxSpec,
    /// Image digest the box was created from.
    pub image_digest: String,
    /// Creation time of the box.
    pub created_at: String,
    /// When the archive was written.
    pub exported_at: String,
    /// Runner that wrote it.
    pub source_runner: String,
}

/// A finished export: a temporary file (deleted on drop) and its checksum.
pub struct Export {
    /// The archive.
    pub path: PathBuf,
    /// SHA-256, lower-case hex.
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
}

impl Drop for Export {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Writes through to a file while hashing.
struct HashingWriter {
    f: std::fs::File,
    h: Sha256,
    n: u64,
}

impl Write for HashingWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.f.write(buf)?;
        self.h.update(&buf[..n]);
        self.n += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.f.flush()
    }
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Export a box (running or stopped).
pub async fn export(boxes: &Boxes, id: &Uuid) -> Result<Export> {
    let lock = boxes.lock_of(id).ok_or_else(|| {
        anyhow::Error::from(BoxError::new(
            "not_found",
            format!("no box {id} on this runner"),
        ))
    })?;
    let _g = lock.lock().await;
    let record = boxes
        .record(id)
        .ok_or_else(|| anyhow::Error::from(BoxError::new("not_found", format!("no box {id}"))))?;
    let meta = ExportMeta {
        format: FORMAT,
        box_id: *id,
        spec: record.spec.clone(),
        image_digest: record.image_digest.clone(),
        created_at: record.created_at.clone(),
        exported_at: now_rfc3339(),
        source_runner: boxes.config().name.clone(),
    };
    let source = boxes
        .upper_source(id)
        .ok_or_else(|| anyhow::Error::from(BoxError::new("not_found", format!("no box {id}"))))?;
    let owner = boxes.ids_of(&record).base;
    let scratch = boxes.config().layout().tmp();
    let path = boxes
        .config()
        .layout()
        .tmp()
        .join(format!("export-{id}-{:08x}.tar.gz", rand::random::<u32>()));
    let placement = boxes.placement(id);
    let frozen = match &placement {
        Some(p) => p.set_frozen(true).unwrap_or_else(|e| {
            tracing::warn!(%id, "could not freeze the box for export: {e:#}");
            false
        }),
        None => false,
    };
    let p2 = path.clone();
    let res = tokio::task::spawn_blocking(move || -> Result<(String, u64)> {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&p2)?;
        let w = HashingWriter {
            f,
            h: Sha256::new(),
            n: 0,
        };
        let gz = flate2::write::GzEncoder::new(w, flate2::Compression::fast());
        let mut b = tar::Builder::new(gz);
        let json = serde_json::to_vec_pretty(&meta)?;
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o600);
        h.set_size(json.len() as u64);
        b.append_data(&mut h, META_ENTRY, &json[..])?;
        let b = match source {
            UpperSource::Running(upper) | UpperSource::Dir(upper) => {
                layers::write_upper(&mut b, &upper, "upper", owner)?;
                b
            }
            UpperSource::Disk(image) => {
                crate::disk::with_mounted(&image, &scratch, true, move |m| {
                    layers::write_upper(&mut b, &m.join("upper"), "upper", owner)?;
                    Ok(b)
                })?
            }
        };
        let gz = b.into_inner()?;
        let mut w = gz.finish()?;
        w.flush()?;
        w.f.sync_all()?;
        Ok((hex::encode(w.h.finalize()), w.n))
    })
    .await
    .map_err(|e| anyhow!("{e}"));
    if frozen && let Some(p) = &placement {
        let _ = p.set_frozen(false);
    }
    match res.and_then(|r| r) {
        Ok((sha256, size)) => Ok(Export { path, sha256, size }),
        Err(e) => {
            let _ = std::fs::remove_file(&path);
            Err(e.context(format!("exporting box {id}")))
        }
    }
}

/// Import an archive streamed as `body` as box `id`, checking `expected_sha256` first.
/// The box is registered stopped; nothing changes when anything fails.
pub async fn import<S, E>(
    boxes: &Boxes,
    id: &Uuid,
    expected_sha256: &str,
    mut body: S,
) -> Result<BoxReport>
where
    S: Stream<Item = Result<bytes::Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    let expected = expected_sha256.trim().to_ascii_lowercase();
    if !sys::is_sha256_hex(&expected) {
        return Err(BoxError::new("bad_request", "x-boxlite-sha256 must be 64 hex digits").into());
    }
    if boxes.exists(id) {
        return Err(BoxError::new(
            "conflict",
            format!("box {id} already exists on this runner; delete it first"),
        )
        .into());
    }
    let tmp = boxes
        .config()
        .layout()
        .tmp()
        .join(format!("import-{id}-{:08x}.tar.gz", rand::random::<u32>()));
    let guard = TempFile(tmp.clone());
    let mut f = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .await?;
    let mut h = Sha256::new();
    let mut n: u64 = 0;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| anyhow!("reading the request body: {e}"))?;
        n += chunk.len() as u64;
        if n > MAX_ARCHIVE {
            return Err(BoxError::new("bad_request", "archive too large").into());
        }
        h.update(&chunk);
        f.write_all(&chunk).await?;
    }
    f.flush().await?;
    drop(f);
    let actual = hex::encode(h.finalize());
    if actual != expected {
        return Err(BoxError::new(
            "checksum_mismatch",
            format!("archive SHA-256 is {actual}, expected {expected}; nothing was imported"),
        )
        .into());
    }
    let boxes_dir = boxes.config().layout().boxes();
    let staging = boxes_dir.join(format!(".import-{id}-{:08x}", rand::random::<u32>()));
    // The box's own id range, claimed for its final directory.
    let ids = boxes.pool().claim(&boxes.dir_of(id), id)?;
    let images = boxes.images().clone();
    let id2 = *id;
    let tmp2 = tmp.clone();
    let st2 = staging.clone();
    let target = RestoreTarget {
        templates: boxes.config().layout().disk_templates(),
        scratch: boxes.config().layout().tmp(),
        default_disk_mib: boxes.config().default_disk_mib,
    };
    let res =
        tokio::task::spawn_blocking(move || restore(&tmp2, &st2, &id2, ids, &images, &target))
            .await
            .map_err(|e| anyhow!("{e}"))
            .and_then(|r| r);
    let record = match res {
        Ok(r) => r,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staging);
            boxes.pool().release(ids, &boxes.dir_of(id));
            return Err(e);
        }
    };
    drop(guard);
    // Someone may have created the same id meanwhile: rename refuses to replace a directory.
    let dest = boxes.dir_of(id);
    if boxes.exists(id) {
        let _ = std::fs::remove_dir_all(&staging);
        boxes.pool().release(ids, &dest);
        return Err(BoxError::new("conflict", format!("box {id} appeared meanwhile")).into());
    }
    if let Err(e) = std::fs::rename(&staging, &dest) {
        let _ = std::fs::remove_dir_all(&staging);
        boxes.pool().release(ids, &dest);
        return Err(anyhow::Error::new(e).context("moving the imported box into place"));
    }
    sys::fsync_dir(&boxes_dir);
    boxes.register_imported(*id, record);
    Ok(BoxReport {
        id: *id,
        state: BoxState::Stopped,
        usage: Resources::default(),
        error: None,
    })
}

/// Unpack `archive` onto the root `root` of a box's new disk: only the
/// metadata (removed after) and an `upper` directory may come out of it, and
/// `upper` ends up owned by the box's root. `Err` says why the archive is
/// refused.
fn unpack_layer(
    archive: &Path,
    root: &OwnedFd,
    ids: IdRange,
    disk_mib: u64,
) -> std::result::Result<(), String> {
    let a = flate2::read::GzDecoder::new(std::fs::File::open(archive).map_err(|e| e.to_string())?);
    layers::apply_at(
        a,
        root,
        &ApplyOptions {
            whiteouts: WhiteoutMode::Overlay,
            ids,
            max_bytes: MAX_ARCHIVE * 4,
            max_entries: 10_000_000,
        },
    )
    .map_err(|e| {
        if e.chain().any(|c| {
            c.downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.raw_os_error() == Some(libc::ENOSPC))
        }) {
            format!("the archive does not fit the box's {disk_mib} MiB disk; nothing was imported")
        } else {
            format!("{e:#}")
        }
    })?;
    // Nothing but the metadata (a file) and the layer (a directory) may come
    // out of an archive: a symlinked `upper` would become the box's writable
    // layer wherever it points (the host's /etc, every box's image).
    for name in sys::list_dir(root).map_err(|e| e.to_string())? {
        let kind = fstatat(root, name.as_slice(), AtFlags::AT_SYMLINK_NOFOLLOW)
            .map(|st| SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT)
            .map_err(|e| e.to_string())?;
        match name.as_slice() {
            n if n == META_ENTRY.as_bytes() && kind == SFlag::S_IFREG => {}
            b"upper" if kind == SFlag::S_IFDIR => {}
            b"upper" => {
                return Err(format!(
                    "`upper` in the archive is {}, not a directory; nothing was imported",
                    kind_name(kind)
                ));
            }
            n => {
                return Err(format!(
                    "unexpected {} {:?} at the top of the archive",
                    kind_name(kind),
                    String::from_utf8_lossy(n)
                ));
            }
        }
    }
    let _ = unlinkat(root, META_ENTRY, UnlinkatFlags::NoRemoveDir);
    let upper = match open_dir_at(root, "upper") {
        Err(Errno::ENOENT) => {
            mkdirat(root, "upper", Mode::from_bits_truncate(0o755)).map_err(|e| e.to_string())?;
            open_dir_at(root, "upper")
        }
        r => r,
    }
    .map_err(|e| format!("`upper` in the archive is not a directory ({e})"))?;
    // The descriptor, never the path: chown on a path follows a symlink.
    fchown(
        &upper,
        Some(Uid::from_raw(ids.base)),
        Some(Gid::from_raw(ids.base)),
    )
    .map_err(|e| e.to_string())?;
    Ok(())
}

/// Bytes of file content the entries of `archive` declare (holes of sparse
/// entries not counted).
fn content_bytes(archive: &Path) -> Result<u64> {
    let mut a = tar::Archive::new(flate2::read::GzDecoder::new(std::fs::File::open(archive)?));
    let mut total: u64 = 0;
    for e in a.entries()? {
        // The header's size: what the archive carries (a sparse entry's data
        // only), not the length its holes make.
        total = total.saturating_add(e?.header().entry_size()?);
    }
    Ok(total)
}

/// Where restored boxes' disks come from.
pub struct RestoreTarget {
    /// Disk templates.
    pub templates: PathBuf,
    /// Scratch directory for mount points.
    pub scratch: PathBuf,
    /// Disk size of a box whose spec says 0, MiB.
    pub default_disk_mib: u64,
}

/// Create the staging directory `staging` (mode 0700) and open it without following symlinks.
fn create_staging(staging: &Path) -> Result<OwnedFd> {
    let parent = staging
        .parent()
        .ok_or_else(|| anyhow!("{} has no parent", staging.display()))?;
    let name = staging
        .file_name()
        .ok_or_else(|| anyhow!("{} has no name", staging.display()))?;
    let pfd = openat(
        AT_FDCWD,
        parent,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .with_context(|| format!("opening {}", parent.display()))?;
    mkdirat(&pfd, name, Mode::from_bits_truncate(0o700))
        .with_context(|| format!("creating {}", staging.display()))?;
    let fd = open_dir_at(&pfd, name).with_context(|| format!("opening {}", staging.display()))?;
    fchmod(&fd, Mode::from_bits_truncate(0o700))?;
    Ok(fd)
}

/// Open the directory `name` in `dir`; a symlink or anything else is an error.
fn open_dir_at<P: ?Sized + nix::NixPath>(dir: &OwnedFd, name: &P) -> nix::Result<OwnedFd> {
    openat(
        dir,
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
}

fn kind_name(kind: SFlag) -> &'static str {
    match kind {
        SFlag::S_IFDIR => "a directory",
        SFlag::S_IFREG => "a regular file",
        SFlag::S_IFLNK => "a symlink",
        SFlag::S_IFIFO => "a fifo",
        SFlag::S_IFCHR => "a character device",
        SFlag::S_IFBLK => "a block device",
        SFlag::S_IFSOCK => "a socket",
        _ => "something unknown",
    }
}

struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Unpack a verified archive into `staging` (a new box directory).
fn restore(
    archive: &Path,
    staging: &Path,
    id: &Uuid,
    ids: IdRange,
    images: &crate::images::ImageStore,
    target: &RestoreTarget,
) -> Result<BoxRecord> {
    let invalid = |m: String| -> anyhow::Error { BoxError::new("bad_request", m).into() };
    // Pass 1: the metadata entry comes first.
    let meta: ExportMeta = {
        let mut a = tar::Archive::new(flate2::read::GzDecoder::new(std::fs::File::open(archive)?));
        let mut entries = a
            .entries()
            .map_err(|e| invalid(format!("not a box archive: {e}")))?;
        let mut first = entries
            .next()
            .ok_or_else(|| invalid("empty archive".into()))?
            .map_err(|e| invalid(format!("not a box archive: {e}")))?;
        if first.path_bytes().as_ref() != META_ENTRY.as_bytes() {
            return Err(invalid(format!(
                "not a box archive: first entry is not {META_ENTRY}"
            )));
        }
        let mut v = Vec::new();
        (&mut first).take(1 << 20).read_to_end(&mut v)?;
        serde_json::from_slice(&v).map_err(|e| invalid(format!("bad {META_ENTRY}: {e}")))?
    };
    if meta.format != FORMAT {
        return Err(invalid(format!(
            "archive format {} is not supported",
            meta.format
        )));
    }
    if meta.box_id != *id || meta.spec.id != *id {
        return Err(invalid(format!(
            "the archive holds box {}, not {id}",
            meta.box_id
        )));
    }
    crate::boxes::validate_spec(&meta.spec)?;
    let image = images.get(&meta.spec.image).ok_or_else(|| {
        BoxError::new(
            "bad_request",
            format!("image {:?} is not on this runner", meta.spec.image),
        )
    })?;
    if !meta.image_digest.is_empty() && image.digest != meta.image_digest {
        tracing::warn!(%id, "image {:?} differs from the exporting runner's ({} vs {})", meta.spec.image, image.digest, meta.image_digest);
    }
    // The box's disk: what the archive holds must fit in it (checked on the
    // headers first, so a small archive of a huge file is refused before
    // anything is written; the disk's own size holds whatever else).
    let disk_mib = if meta.spec.resources.disk_mib == 0 {
        target.default_disk_mib
    } else {
        meta.spec.resources.disk_mib
    };
    let held = content_bytes(archive).map_err(|e| invalid(format!("not a box archive: {e:#}")))?;
    if held > disk_mib << 20 {
        return Err(invalid(format!(
            "the archive holds {} MiB of file content, more than the box's {disk_mib} MiB disk; nothing was imported",
            held.div_ceil(1 << 20)
        )));
    }
    // Pass 2: everything, onto a new disk in the staging directory. From
    // here on every path is opened relative to a directory descriptor and
    // never through a symlink: the archive decides what exists in there.
    let sfd = create_staging(staging)?;
    let image_path = staging.join(crate::disk::IMAGE);
    crate::disk::create(&target.templates, &image_path, disk_mib)?;
    let a = archive.to_path_buf();
    let refused = crate::disk::with_mounted(&image_path, &target.scratch, false, move |m| {
        let _ = std::fs::remove_dir(m.join("lost+found"));
        let root = crate::disk::open_root(m)?;
        Ok(unpack_layer(&a, &root, ids, disk_mib))
    })?;
    if let Err(why) = refused {
        return Err(invalid(why));
    }
    let record = BoxRecord {
        spec: meta.spec,
        created_at: meta.created_at,
        desired: Desired::Stopped,
        placement: None,
        image_digest: image.digest,
        last_error: None,
        address: None,
        ids: Some(ids),
    };
    let mut f = std::fs::File::from(
        openat(
            &sfd,
            "box.json",
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        )
        .context("creating box.json")?,
    );
    f.write_all(&serde_json::to_vec_pretty(&record)?)
        .and_then(|()| f.sync_all())
        .context("writing box.json")?;
    let _ = nix::unistd::fsync(&sfd);
    Ok(record)
}
