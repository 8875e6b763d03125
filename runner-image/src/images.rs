//! The image store: read-only root filesystems that boxes are layered on.
//!
//! Layout: `<image_dir>/<name>/rootfs/` (the tree, with the image's own ids:
//! owned by host root, shown to each box in its own id range through an
//! idmapped mount, see [`crate::ids`]) and `<image_dir>/<name>/image.json`.
//! Images stored before that are owned by the runner's single `box_uid`;
//! [`ImageInfo::ids`] tells the two apart.
//! Images are immutable once stored — overlayfs forbids changing a lower
//! layer under a mounted box — so importing an existing name is refused.
//!
//! Two ways in:
//! - the `default` image, built on first start from the host's static busybox
//!   (Debian's `busybox-static`), so a fresh runner needs no registry;
//! - `boxlite-runner image import NAME LAYOUT.tar`: an OCI image layout
//!   tarball (`oci-layout`, `index.json`, `blobs/sha256/…`). Every blob is
//!   checked against its digest, the manifest for this platform is chosen,
//!   and its layers are applied in order with whiteouts honoured and path
//!   traversal refused (see [`crate::layers`]).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::ids::IdRange;
use crate::layers::{self, ApplyOptions, WhiteoutMode};
use crate::sys;

/// Name of the image every runner has.
pub const DEFAULT_IMAGE: &str = "default";
/// Largest OCI layout tarball blob accepted (per blob), bytes.
const MAX_BLOB: u64 = 8 << 30;
/// Largest unpacked image, bytes.
const MAX_IMAGE_BYTES: u64 = 32 << 30;
/// Most entries of one image.
const MAX_IMAGE_ENTRIES: u64 = 2_000_000;

/// `image.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageInfo {
    /// Name in the store.
    pub name: String,
    /// `busybox` or `oci`.
    pub source: String,
    /// Content identity: SHA-256 of the busybox binary, or the OCI manifest digest.
    pub digest: String,
    /// Environment from the image configuration (`KEY=VALUE`), the base of every box's.
    #[serde(default)]
    pub env: Vec<String>,
    /// Working directory from the image configuration.
    #[serde(default)]
    pub working_dir: Option<String>,
    /// When it was stored (RFC 3339).
    pub created_at: String,
    /// Host ids its files are owned by; absent for images stored with the
    /// runner's single box uid (see [`ImageStore::ids_of`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ids: Option<IdRange>,
}

/// The store.
#[derive(Clone, Debug)]
pub struct ImageStore {
    dir: PathBuf,
    legacy_owner: u32,
}

/// Ids new images are stored with: their own, unshifted.
pub const IMAGE_IDS: IdRange = IdRange {
    base: 0,
    count: crate::ids::ID_RANGE,
};

/// True for names like `default`, `python-3.12`, `ubuntu_24.04`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

impl ImageStore {
    /// The store at `dir`; images stored before id ranges are owned by
    /// `legacy_owner` (the runner's `box_uid`).
    pub fn new(dir: &Path, legacy_owner: u32) -> ImageStore {
        ImageStore {
            dir: dir.to_path_buf(),
            legacy_owner,
        }
    }

    /// Host ids the files of image `info` are owned by.
    pub fn ids_of(&self, info: &ImageInfo) -> IdRange {
        info.ids.unwrap_or(IdRange {
            base: self.legacy_owner,
            count: 1,
        })
    }

    /// Root filesystem of an image.
    pub fn rootfs(&self, name: &str) -> PathBuf {
        self.dir.join(name).join("rootfs")
    }

    /// Metadata of an image, if stored.
    pub fn get(&self, name: &str) -> Option<ImageInfo> {
        if !valid_name(name) {
            return None;
        }
        let text = std::fs::read(self.dir.join(name).join("image.json")).ok()?;
        serde_json::from_slice(&text).ok()
    }

    /// Every stored image.
    pub fn list(&self) -> Vec<ImageInfo> {
        let mut v: Vec<ImageInfo> = std::fs::read_dir(&self.dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .filter_map(|e| self.get(&e.file_name().to_string_lossy()))
                    .collect()
            })
            .unwrap_or_default();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    fn prepare(&self) -> Result<()> {
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("creating image store {}", self.dir.display()))?;
        // Nobody but root walks the store: boxes see their image only through overlayfs.
        std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700))?;
        // Leftovers of an interrupted build or import (not one running right now).
        if let Ok(rd) = std::fs::read_dir(&self.dir) {
            for e in rd.flatten() {
                let old = e
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age > std::time::Duration::from_secs(24 * 3600));
                if old && e.file_name().to_string_lossy().starts_with(".staging-") {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        Ok(())
    }

    fn staging(&self) -> Result<PathBuf> {
        let s = self
            .dir
            .join(format!(".staging-{:016x}", rand::random::<u64>()));
        std::fs::create_dir_all(s.join("rootfs"))?;
        Ok(s)
    }

    /// Move a finished staging directory into place as `name` (atomic rename).
    fn commit(&self, staging: &Path, info: &ImageInfo) -> Result<()> {
        let json = serde_json::to_vec_pretty(info)?;
        std::fs::write(staging.join("image.json"), json)?;
        let dest = self.dir.join(&info.name);
        if dest.exists() {
            bail!(
                "image {:?} already exists (images are immutable)",
                info.name
            );
        }
        std::fs::rename(staging, &dest)
            .with_context(|| format!("moving image into {}", dest.display()))?;
        sys::fsync_dir(&self.dir);
        Ok(())
    }

    /// Build the `default` image from a static busybox unless it exists.
    pub fn ensure_default(&self, busybox: &Path) -> Result<ImageInfo> {
        self.prepare()?;
        if let Some(i) = self.get(DEFAULT_IMAGE) {
            return Ok(i);
        }
        let staging = self.staging()?;
        let res = self
            .build_busybox(busybox, &staging.join("rootfs"))
            .and_then(|digest| {
                let info = ImageInfo {
                    name: DEFAULT_IMAGE.into(),
                    source: "busybox".into(),
                    digest,
                    env: vec![
                        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
                    ],
                    working_dir: None,
                    created_at: now_rfc3339(),
                    ids: Some(IMAGE_IDS),
                };
                self.commit(&staging, &info)?;
                Ok(info)
            });
        if res.is_err() {
            let _ = std::fs::remove_dir_all(&staging);
        }
        res
    }

    fn build_busybox(&self, busybox: &Path, root: &Path) -> Result<String> {
        let bin = std::fs::read(busybox).with_context(|| {
            format!(
                "reading {} (install Debian's busybox-static)",
                busybox.display()
            )
        })?;
        if is_dynamic_elf(&bin) {
            bail!(
                "{} is dynamically linked and cannot run inside a box; install busybox-static",
                busybox.display()
            );
        }
        let digest = hex::encode(Sha256::digest(&bin));
        let dirs: [(&str, u32); 17] = [
            ("bin", 0o755),
            ("sbin", 0o755),
            ("usr", 0o755),
            ("usr/bin", 0o755),
            ("usr/sbin", 0o755),
            ("usr/local/bin", 0o755),
            ("etc", 0o755),
            ("root", 0o700),
            ("home", 0o755),
            ("tmp", 0o1777),
            ("var", 0o755),
            ("var/tmp", 0o1777),
            ("dev", 0o755),
            ("proc", 0o555),
            ("sys", 0o555),
            ("run", 0o755),
            ("mnt", 0o755),
        ];
        for (d, mode) in dirs {
            let p = root.join(d);
            std::fs::create_dir_all(&p)?;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))?;
        }
        let target = root.join("bin/busybox");
        std::fs::write(&target, &bin)?;
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o755))?;
        // Applet list from the binary itself.
        let out = std::process::Command::new(busybox)
            .arg("--list-full")
            .stdin(std::process::Stdio::null())
            .output()
            .with_context(|| format!("running {} --list-full", busybox.display()))?;
        if !out.status.success() {
            bail!("{} --list-full failed", busybox.display());
        }
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let rel = line.trim().trim_start_matches('/');
            if rel.is_empty()
                || rel == "bin/busybox"
                || layers::safe_components(rel.as_bytes()).is_err()
            {
                continue;
            }
            let link = root.join(rel);
            if let Some(parent) = link.parent() {
                std::fs::create_dir_all(parent)?;
            }
            if !link.exists() {
                symlink("/bin/busybox", &link)?;
            }
        }
        let files: [(&str, &str, u32); 7] = [
            (
                "etc/passwd",
                "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
                0o644,
            ),
            ("etc/group", "root:x:0:\nnogroup:x:65534:\n", 0o644),
            ("etc/shells", "/bin/sh\n/bin/ash\n", 0o644),
            (
                "etc/hosts",
                "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n",
                0o644,
            ),
            ("etc/resolv.conf", "", 0o644),
            (
                "etc/profile",
                "export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\nexport PS1='\\u@\\h:\\w\\$ '\n",
                0o644,
            ),
            (
                "etc/os-release",
                "NAME=\"BoxLite busybox\"\nID=busybox\n",
                0o644,
            ),
        ];
        for (f, content, mode) in files {
            let p = root.join(f);
            std::fs::write(&p, content)?;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))?;
        }
        chown_tree(root, IMAGE_IDS.base)?;
        Ok(digest)
    }

    /// Import an OCI image layout tarball as `name`.
    pub fn import_oci(&self, name: &str, tarball: &Path) -> Result<ImageInfo> {
        if !valid_name(name) {
            bail!(
                "invalid image name {name:?} (lower-case letters, digits, `.`, `_`, `-`; at most 64)"
            );
        }
        self.prepare()?;
        if self.dir.join(name).exists() {
            bail!("image {name:?} already exists (images are immutable)");
        }
        let staging = self.staging()?;
        let res = self.import_into(name, tarball, &staging);
        if res.is_err() {
            let _ = std::fs::remove_dir_all(&staging);
        }
        res
    }

    fn import_into(&self, name: &str, tarball: &Path, staging: &Path) -> Result<ImageInfo> {
        let blobs = staging.join("blobs");
        std::fs::create_dir_all(&blobs)?;
        let f = std::fs::File::open(tarball)
            .with_context(|| format!("opening {}", tarball.display()))?;
        // One pass over the outer archive: keep index.json, store and verify blobs.
        let mut index: Option<Vec<u8>> = None;
        let mut layout_ok = false;
        let mut outer = tar::Archive::new(maybe_gunzip(f)?);
        for entry in outer.entries().context("reading OCI layout tarball")? {
            let mut entry = entry.context("reading OCI layout tarball")?;
            if entry.header().entry_type() != tar::EntryType::Regular {
                continue;
            }
            let path = entry.path_bytes().into_owned();
            let comps = layers::safe_components(&path)?;
            let comps: Vec<&[u8]> = comps.iter().map(|c| c.as_slice()).collect();
            match comps.as_slice() {
                [b"index.json"] => {
                    let mut v = Vec::new();
                    (&mut entry).take(4 << 20).read_to_end(&mut v)?;
                    index = Some(v);
                }
                [b"oci-layout"] => {
                    let mut v = Vec::new();
                    (&mut entry).take(4096).read_to_end(&mut v)?;
                    let l: serde_json::Value =
                        serde_json::from_slice(&v).context("oci-layout is not JSON")?;
                    layout_ok = l
                        .get("imageLayoutVersion")
                        .and_then(|v| v.as_str())
                        .is_some();
                }
                [b"blobs", b"sha256", hexname] => {
                    let hexname = std::str::from_utf8(hexname).unwrap_or("");
                    if !sys::is_sha256_hex(hexname)
                        || hexname.bytes().any(|b| b.is_ascii_uppercase())
                    {
                        bail!("blob name {hexname:?} is not a sha256 digest");
                    }
                    if entry.size() > MAX_BLOB {
                        bail!("blob {hexname} is larger than {MAX_BLOB} bytes");
                    }
                    let dest = blobs.join(hexname);
                    let mut out = std::fs::File::create(&dest)?;
                    let mut h = Sha256::new();
                    let mut buf = vec![0u8; 1 << 16];
                    loop {
                        let n = entry.read(&mut buf)?;
                        if n == 0 {
                            break;
                        }
                        h.update(&buf[..n]);
                        out.write_all(&buf[..n])?;
                    }
                    if hex::encode(h.finalize()) != hexname {
                        bail!("blob {hexname} does not match its digest");
                    }
                }
                _ => {}
            }
        }
        if !layout_ok {
            bail!("not an OCI image layout: `oci-layout` missing or invalid");
        }
        let index = index.ok_or_else(|| anyhow!("not an OCI image layout: index.json missing"))?;
        let read_blob = |digest: &str, max: u64| -> Result<Vec<u8>> {
            let hexd = digest
                .strip_prefix("sha256:")
                .filter(|h| sys::is_sha256_hex(h))
                .ok_or_else(|| anyhow!("unsupported digest {digest:?}"))?;
            let p = blobs.join(hexd);
            let len = std::fs::metadata(&p)
                .with_context(|| format!("blob {digest} is referenced but not in the layout"))?
                .len();
            if len > max {
                bail!("blob {digest} is too large for a JSON document");
            }
            Ok(std::fs::read(p)?)
        };
        // index → (maybe nested index) → manifest for this platform.
        let mut doc: serde_json::Value =
            serde_json::from_slice(&index).context("index.json is not JSON")?;
        let mut manifest_digest = String::new();
        for _ in 0..3 {
            if doc.get("layers").is_some() {
                break;
            }
            let manifests = doc
                .get("manifests")
                .and_then(|m| m.as_array())
                .filter(|m| !m.is_empty())
                .ok_or_else(|| anyhow!("index lists no manifests"))?;
            let chosen = pick_platform(manifests)
                .ok_or_else(|| anyhow!("no manifest for {}/linux", oci_arch()))?;
            manifest_digest = chosen
                .get("digest")
                .and_then(|d| d.as_str())
                .ok_or_else(|| anyhow!("manifest descriptor without digest"))?
                .to_string();
            doc = serde_json::from_slice(&read_blob(&manifest_digest, 4 << 20)?)
                .context("manifest is not JSON")?;
        }
        let layer_list = doc
            .get("layers")
            .and_then(|l| l.as_array())
            .ok_or_else(|| anyhow!("manifest has no layers"))?
            .clone();
        let rootfs = staging.join("rootfs");
        let opts = ApplyOptions {
            whiteouts: WhiteoutMode::Delete,
            ids: IMAGE_IDS,
            max_bytes: MAX_IMAGE_BYTES,
            max_entries: MAX_IMAGE_ENTRIES,
        };
        for (i, layer) in layer_list.iter().enumerate() {
            let digest = layer
                .get("digest")
                .and_then(|d| d.as_str())
                .ok_or_else(|| anyhow!("layer {i} without digest"))?;
            let media = layer
                .get("mediaType")
                .and_then(|m| m.as_str())
                .unwrap_or("");
            let hexd = digest
                .strip_prefix("sha256:")
                .filter(|h| sys::is_sha256_hex(h))
                .ok_or_else(|| anyhow!("layer {i}: unsupported digest {digest:?}"))?;
            let f = std::fs::File::open(blobs.join(hexd))
                .with_context(|| format!("layer {digest} is referenced but not in the layout"))?;
            let reader: Box<dyn Read> = if media.ends_with("+gzip") || media.ends_with(".gzip") {
                Box::new(flate2::read::GzDecoder::new(f))
            } else if media.ends_with(".tar") || media.ends_with("tar") || media.is_empty() {
                maybe_gunzip(f)?
            } else {
                bail!("layer {i}: unsupported media type {media:?}");
            };
            layers::apply(reader, &rootfs, &opts)
                .with_context(|| format!("applying layer {i} ({digest})"))?;
        }
        // Mount points bubblewrap needs, and a world-writable /tmp.
        for (d, mode) in [
            ("proc", 0o555),
            ("dev", 0o755),
            ("tmp", 0o1777),
            ("root", 0o700),
        ] {
            let p = rootfs.join(d);
            if std::fs::symlink_metadata(&p).is_err() {
                std::fs::create_dir(&p)?;
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))?;
                std::os::unix::fs::chown(&p, Some(IMAGE_IDS.base), Some(IMAGE_IDS.base))?;
            }
        }
        // Environment and working directory from the image configuration.
        let (env, working_dir) = match doc
            .get("config")
            .and_then(|c| c.get("digest"))
            .and_then(|d| d.as_str())
        {
            Some(d) => {
                let cfg: serde_json::Value = serde_json::from_slice(&read_blob(d, 4 << 20)?)
                    .context("config is not JSON")?;
                let c = cfg.get("config");
                let env = c
                    .and_then(|c| c.get("Env"))
                    .and_then(|e| e.as_array())
                    .map(|a| {
                        a.iter()
                            .filter_map(|v| v.as_str())
                            .filter(|s| s.contains('=') && !s.contains('\0'))
                            .map(String::from)
                            .collect()
                    })
                    .unwrap_or_default();
                let wd = c
                    .and_then(|c| c.get("WorkingDir"))
                    .and_then(|w| w.as_str())
                    .filter(|w| w.starts_with('/'))
                    .map(String::from);
                (env, wd)
            }
            None => (vec![], None),
        };
        std::fs::remove_dir_all(&blobs)?;
        let info = ImageInfo {
            name: name.to_string(),
            source: "oci".into(),
            digest: manifest_digest,
            env,
            working_dir,
            created_at: now_rfc3339(),
            ids: Some(IMAGE_IDS),
        };
        self.commit(staging, &info)?;
        Ok(info)
    }
}

/// OCI architecture name of this host.
fn oci_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

fn pick_platform(manifests: &[serde_json::Value]) -> Option<&serde_json::Value> {
    let matches = |m: &&serde_json::Value| {
        let p = m.get("platform");
        let arch = p
            .and_then(|p| p.get("architecture"))
            .and_then(|a| a.as_str());
        let os = p.and_then(|p| p.get("os")).and_then(|a| a.as_str());
        arch == Some(oci_arch()) && os.is_none_or(|o| o == "linux")
    };
    manifests
        .iter()
        .find(matches)
        .or_else(|| manifests.iter().find(|m| m.get("platform").is_none()))
}

/// A reader that transparently un-gzips when the stream starts with the gzip magic.
fn maybe_gunzip(mut f: std::fs::File) -> Result<Box<dyn Read>> {
    use std::io::Seek;
    let mut magic = [0u8; 2];
    let n = f.read(&mut magic)?;
    f.seek(std::io::SeekFrom::Start(0))?;
    if n == 2 && magic == [0x1f, 0x8b] {
        Ok(Box::new(flate2::read::GzDecoder::new(f)))
    } else {
        Ok(Box::new(f))
    }
}

/// True when `bin` is an ELF file with a `PT_INTERP` program header (needs a dynamic loader).
pub fn is_dynamic_elf(bin: &[u8]) -> bool {
    if bin.len() < 64 || &bin[..4] != b"\x7fELF" || bin[4] != 2 || bin[5] != 1 {
        return false;
    }
    let u16_at = |o: usize| u16::from_le_bytes([bin[o], bin[o + 1]]);
    let u64_at = |o: usize| u64::from_le_bytes(bin[o..o + 8].try_into().unwrap_or([0; 8]));
    let phoff = u64_at(32) as usize;
    let phentsize = u16_at(54) as usize;
    let phnum = u16_at(56) as usize;
    (0..phnum).any(|i| {
        let o = phoff.saturating_add(i.saturating_mul(phentsize));
        o + 4 <= bin.len() && u32::from_le_bytes(bin[o..o + 4].try_into().unwrap_or([0; 4])) == 3
    })
}

/// `chown -hR owner:owner root` without following symlinks.
fn chown_tree(root: &Path, owner: u32) -> Result<()> {
    std::os::unix::fs::lchown(root, Some(owner), Some(owner))?;
    for e in std::fs::read_dir(root)? {
        let e = e?;
        let p = e.path();
        std::os::unix::fs::lchown(&p, Some(owner), Some(owner))?;
        if e.file_type()?.is_dir() {
            chown_tree(&p, owner)?;
        }
    }
    Ok(())
}

/// Build an OCI image layout tarball from layer tarballs (used by tests and tooling).
pub fn write_oci_layout(out: &Path, layers_tar: &[Vec<u8>], env: &[&str]) -> Result<()> {
    let mut b = tar::Builder::new(std::fs::File::create(out)?);
    let mut add = |path: &str, data: &[u8]| -> Result<()> {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, path, data)?;
        Ok(())
    };
    let digest = |d: &[u8]| format!("sha256:{}", hex::encode(Sha256::digest(d)));
    let mut layer_descs = Vec::new();
    let mut diff_ids = Vec::new();
    for l in layers_tar {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(l)?;
        let gz = gz.finish()?;
        let d = digest(&gz);
        add(&format!("blobs/sha256/{}", &d[7..]), &gz)?;
        layer_descs.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": d, "size": gz.len()
        }));
        diff_ids.push(digest(l));
    }
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": oci_arch(), "os": "linux",
        "config": {"Env": env},
        "rootfs": {"type": "layers", "diff_ids": diff_ids}
    }))?;
    let cd = digest(&config);
    add(&format!("blobs/sha256/{}", &cd[7..]), &config)?;
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": config.len()},
        "layers": layer_descs
    }))?;
    let md = digest(&manifest);
    add(&format!("blobs/sha256/{}", &md[7..]), &manifest)?;
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": md, "size": manifest.len(),
            "platform": {"architecture": oci_arch(), "os": "linux"}
        }]
    }))?;
    add("index.json", &index)?;
    add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    b.into_inner()?.sync_all()?;
    Ok(())
}

/// Environment of the image as a map (later entries win).
pub fn env_map(info: &ImageInfo) -> BTreeMap<String, String> {
    info.env
        .iter()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (p, data) in entries {
            let mut h = tar::Header::new_gnu();
            if p.ends_with('/') {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                h.set_size(0);
                b.append_data(&mut h, p, std::io::empty()).unwrap();
            } else {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(0o644);
                h.set_size(data.len() as u64);
                b.append_data(&mut h, p, *data).unwrap();
            }
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn names() {
        assert!(valid_name("default"));
        assert!(valid_name("python-3.12"));
        assert!(!valid_name(""));
        assert!(!valid_name("../x"));
        assert!(!valid_name("Upper"));
        assert!(!valid_name(".hidden"));
    }

    #[test]
    fn detects_dynamic_binaries() {
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert!(is_dynamic_elf(&me));
        if let Ok(bb) = std::fs::read("/bin/busybox") {
            assert!(
                !is_dynamic_elf(&bb),
                "/bin/busybox should be busybox-static"
            );
        }
        assert!(!is_dynamic_elf(&crate::init_elf::init_program().unwrap()));
    }

    #[test]
    fn default_image_from_busybox() {
        let d = tempfile::tempdir().unwrap();
        let owner = nix::unistd::getuid().as_raw();
        let store = ImageStore::new(&d.path().join("images"), owner);
        let info = store.ensure_default(Path::new("/bin/busybox")).unwrap();
        assert_eq!(info.name, "default");
        let root = store.rootfs("default");
        assert!(root.join("bin/busybox").is_file());
        assert_eq!(
            std::fs::read_link(root.join("bin/sh")).unwrap(),
            Path::new("/bin/busybox")
        );
        assert!(
            std::fs::read_to_string(root.join("etc/passwd"))
                .unwrap()
                .starts_with("root:x:0:0:root:/root:")
        );
        let tmp = std::fs::metadata(root.join("tmp")).unwrap();
        assert_eq!(tmp.permissions().mode() & 0o7777, 0o1777);
        // Idempotent.
        assert_eq!(
            store.ensure_default(Path::new("/bin/busybox")).unwrap(),
            info
        );
    }

    #[test]
    fn oci_layout_import_applies_layers_in_order() {
        let d = tempfile::tempdir().unwrap();
        let owner = nix::unistd::getuid().as_raw();
        let store = ImageStore::new(&d.path().join("images"), owner);
        let l1 = layer(&[("etc/", b""), ("etc/a", b"one"), ("etc/b", b"gone soon")]);
        let l2 = layer(&[("etc/a", b"two"), ("etc/.wh.b", b"")]);
        let tarball = d.path().join("img.tar");
        write_oci_layout(&tarball, &[l1, l2], &["PATH=/bin", "LANG=C.UTF-8"]).unwrap();
        let info = store.import_oci("test-img", &tarball).unwrap();
        assert!(info.digest.starts_with("sha256:"));
        assert_eq!(info.env, vec!["PATH=/bin", "LANG=C.UTF-8"]);
        let root = store.rootfs("test-img");
        assert_eq!(std::fs::read_to_string(root.join("etc/a")).unwrap(), "two");
        assert!(!root.join("etc/b").exists());
        assert!(root.join("proc").is_dir());
        // Immutable.
        assert!(store.import_oci("test-img", &tarball).is_err());
        assert_eq!(store.list().len(), 1);
    }

    #[test]
    fn oci_import_refuses_tampered_blobs_and_traversal() {
        let d = tempfile::tempdir().unwrap();
        let owner = nix::unistd::getuid().as_raw();
        let store = ImageStore::new(&d.path().join("images"), owner);
        // A layer escaping the root.
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(1);
        h.as_gnu_mut().unwrap().name[..9].copy_from_slice(b"../escape");
        h.set_mode(0o644);
        h.set_cksum();
        b.append(&h, &b"x"[..]).unwrap();
        let evil = b.into_inner().unwrap();
        let tarball = d.path().join("evil.tar");
        write_oci_layout(&tarball, &[evil], &[]).unwrap();
        let e = store.import_oci("evil", &tarball).unwrap_err();
        assert!(format!("{e:#}").contains("escapes"), "{e:#}");
        assert!(!d.path().join("images/escape").exists());
        assert!(store.get("evil").is_none());
        // A blob whose content does not match its name.
        let good = d.path().join("good.tar");
        write_oci_layout(&good, &[layer(&[("f", b"data")])], &[]).unwrap();
        let mut arch = tar::Archive::new(std::fs::File::open(&good).unwrap());
        let mut out = tar::Builder::new(Vec::new());
        for e in arch.entries().unwrap() {
            let mut e = e.unwrap();
            let mut data = Vec::new();
            e.read_to_end(&mut data).unwrap();
            let mut h = e.header().clone();
            if e.path().unwrap().starts_with("blobs") && data.len() > 20 {
                let last = data.len() - 1;
                data[last] ^= 0xff;
            }
            h.set_cksum();
            out.append(&h, &data[..]).unwrap();
        }
        let bad = d.path().join("bad.tar");
        std::fs::write(&bad, out.into_inner().unwrap()).unwrap();
        let e = store.import_oci("bad", &bad).unwrap_err();
        assert!(format!("{e:#}").contains("does not match"), "{e:#}");
    }
}
