//! The runner artifact: a `.tar.gz` holding exactly one file, `boxlite-runner`,
//! identified by the SHA-256 of the archive (what `boxlite-runner upgrade`
//! verifies before touching anything) and of the binary inside (what the
//! runner reports once it runs it).

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use sha2::{Digest, Sha256};

use crate::engine::store::write_atomic;

/// Name of the binary inside the archive.
pub const BINARY: &str = "boxlite-runner";

/// A runner artifact ready to publish.
#[derive(Clone, Debug)]
pub struct Artifact {
    /// Archive bytes.
    pub bytes: Vec<u8>,
    /// SHA-256 (hex) of the archive.
    pub sha256: String,
    /// SHA-256 (hex) of the binary inside.
    pub binary_sha256: String,
    /// Version the binary reports.
    pub version: String,
}

impl Artifact {
    /// `<version>-<first 12 hex of the archive digest>`: unique per build.
    pub fn release(&self) -> String {
        format!("{}-{}", self.version, &self.sha256[..12])
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The version a runner binary reports (`boxlite-runner version --json`).
pub fn binary_version(binary: &Path) -> anyhow::Result<String> {
    let out = std::process::Command::new(binary)
        .args(["version", "--json"])
        .env_clear()
        .output()
        .with_context(|| format!("running {} version --json", binary.display()))?;
    if !out.status.success() {
        bail!(
            "{} version --json failed: {}",
            binary.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("{} version --json printed no JSON", binary.display()))?;
    match v["version"].as_str() {
        Some(s) if !s.is_empty() => Ok(s.to_string()),
        _ => bail!("{} version --json has no version", binary.display()),
    }
}

/// Package a runner binary.
pub fn from_binary(binary: &Path) -> anyhow::Result<Artifact> {
    let version = binary_version(binary)?;
    let content = fs::read(binary).with_context(|| format!("reading {}", binary.display()))?;
    let binary_sha256 = sha256_hex(&content);
    let mut archive = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::fast(),
    ));
    let mut header = tar::Header::new_gnu();
    header.set_size(content.len() as u64);
    header.set_mode(0o755);
    header.set_mtime(0);
    header.set_entry_type(tar::EntryType::Regular);
    header.set_cksum();
    archive.append_data(&mut header, BINARY, content.as_slice())?;
    let bytes = archive.into_inner()?.finish()?;
    let sha256 = sha256_hex(&bytes);
    Ok(Artifact {
        bytes,
        sha256,
        binary_sha256,
        version,
    })
}

/// Read an artifact from a `.tar.gz` (checked to hold exactly `boxlite-runner`),
/// or package it when `path` is the binary itself.
pub fn load(path: &Path) -> anyhow::Result<Artifact> {
    let bytes = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    if !bytes.starts_with(&[0x1f, 0x8b]) {
        return from_binary(path);
    }
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(bytes.as_slice()));
    let mut binary = None;
    for entry in archive.entries().context("reading the artifact")? {
        let mut entry = entry.context("reading the artifact")?;
        let name = entry.path()?.to_string_lossy().to_string();
        if name != BINARY
            || entry.header().entry_type() != tar::EntryType::Regular
            || binary.is_some()
        {
            bail!(
                "{} must hold exactly one regular file `{BINARY}`, found {name:?}",
                path.display()
            );
        }
        let mut content = Vec::new();
        entry.read_to_end(&mut content)?;
        binary = Some(content);
    }
    let Some(content) = binary else {
        bail!("{} does not hold `{BINARY}`", path.display());
    };
    // The version comes from running it, so unpack to a private temp file.
    let dir = tempfile::tempdir()?;
    let exe = dir.path().join(BINARY);
    write_atomic(&exe, &content, 0o755)?;
    Ok(Artifact {
        sha256: sha256_hex(&bytes),
        binary_sha256: sha256_hex(&content),
        version: binary_version(&exe)?,
        bytes,
    })
}

/// What a published release records beside its archive (`release.json`), so
/// a later rollout of it needs only this record: the runners verify the
/// archive itself against `sha256` before they stop anything.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Published {
    /// `<version>-<sha12>`.
    pub release: String,
    /// Version.
    pub version: String,
    /// SHA-256 of the archive.
    pub sha256: String,
    /// SHA-256 of the binary inside.
    pub binary_sha256: String,
    /// Where the archive is.
    #[serde(skip)]
    pub path: PathBuf,
}

/// Publish to a local artifact directory:
/// `<dir>/runner/<release>/boxlite-runner.tar.gz`, its `.sha256` and
/// `release.json`. Idempotent.
pub fn publish_local(artifact: &Artifact, dir: &Path) -> anyhow::Result<Published> {
    let release_dir = dir.join("runner").join(artifact.release());
    let path = release_dir.join(format!("{BINARY}.tar.gz"));
    let published = Published {
        release: artifact.release(),
        version: artifact.version.clone(),
        sha256: artifact.sha256.clone(),
        binary_sha256: artifact.binary_sha256.clone(),
        path: path.clone(),
    };
    let already = fs::read(&path).is_ok_and(|b| sha256_hex(&b) == artifact.sha256);
    if !already {
        write_atomic(&path, &artifact.bytes, 0o644)?;
        write_atomic(
            &release_dir.join(format!("{BINARY}.tar.gz.sha256")),
            format!("{}  {BINARY}.tar.gz\n", artifact.sha256).as_bytes(),
            0o644,
        )?;
        // Written last: a release without its record was never published.
        write_atomic(
            &release_dir.join("release.json"),
            &serde_json::to_vec_pretty(&published)?,
            0o644,
        )?;
    }
    Ok(published)
}

/// A published release by exact name (`0.1.0-3f800c499e02`), or the newest
/// release of a version (`0.1.0`).
pub fn find_local(dir: &Path, wanted: &str) -> anyhow::Result<Published> {
    let runner = dir.join("runner");
    let mut found: Vec<(std::time::SystemTime, PathBuf)> = fs::read_dir(&runner)
        .map(|d| {
            d.flatten()
                .filter(|e| {
                    let name = e.file_name().to_string_lossy().to_string();
                    name == wanted || name.starts_with(&format!("{wanted}-"))
                })
                .map(|e| e.path().join("release.json"))
                .filter_map(|p| Some((fs::metadata(&p).ok()?.modified().ok()?, p)))
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    let Some((_, record)) = found.pop() else {
        bail!(
            "no runner release {wanted:?} is published in {}; omit --version to publish the workspace's runner",
            runner.display()
        );
    };
    let mut published: Published = serde_json::from_slice(&fs::read(&record)?)
        .with_context(|| format!("{} is unreadable", record.display()))?;
    published.path = record.with_file_name(format!("{BINARY}.tar.gz"));
    Ok(published)
}
