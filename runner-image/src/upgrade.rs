//! Releases of the agent binary and `boxlite-runner upgrade`.
//!
//! Layout under the state directory:
//! - `releases/<version>-<sha12>/boxlite-runner` (+ `release.json`): installed binaries;
//! - `current` → `releases/<…>`: the release the agent runs (switched atomically
//!   by renaming a new symlink over it);
//! - `installed.json`: the last *confirmed* installation, written last;
//! - `upgrade.json`: journal of an upgrade in progress (removed at the end),
//!   so an interrupted upgrade is visible and never mistaken for success.
//!
//! The artifact is a `.tar.gz` holding one regular file, `boxlite-runner`.
//!
//! Upgrade steps: lock → ask the running agent for its status (it must be
//! reachable) → download (http, https, `file://` or a path) → verify the
//! SHA-256 **before** anything changes → unpack and run `version --json` on
//! the new binary → install the release → switch `current` → restart (under
//! systemd `systemctl restart UNIT`; otherwise the agent re-executes itself
//! through the admin socket, keeping its pid) → wait until health reports
//! `ok` and the admin socket reports the new binary's SHA-256 and every box
//! that ran before running again → write `installed.json`. On failure after the switch: switch back,
//! restart the old release the same way (or, if the new one died, start the
//! old agent again with its original command line, working directory,
//! environment and log) and wait for it to be healthy with every box.
//!
//! Exit codes ([`ExitCode`]): 0 upgraded (or already installed), 2 usage or
//! configuration, 3 download failed, 4 checksum mismatch or malformed
//! artifact, 5 agent not reachable (nothing changed), 6 the new binary could
//! not be installed (nothing switched), 7 the new release failed and the old
//! one is back, 8 the rollback failed too (manual attention needed), 9
//! another upgrade holds the lock.

use std::ffi::OsString;
use std::io::Read;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::admin::{AdminClient, AdminRequest, AdminStatus, Supervisor};
use crate::config::{Config, Layout};
use crate::sys;
use protocol::RunnerLiveness;

/// Environment variable counting start-up hops into `current` (loop guard).
pub const EXEC_HOPS_ENV: &str = "BOXLITE_RUNNER_EXEC_HOPS";
/// Largest artifact accepted.
const MAX_ARTIFACT: u64 = 512 << 20;

/// Exit codes of `upgrade`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(i32)]
pub enum ExitCode {
    /// Upgraded, or the release was already installed and running.
    Ok = 0,
    /// Bad arguments or configuration.
    Usage = 2,
    /// The artifact could not be fetched.
    Download = 3,
    /// Checksum mismatch or malformed artifact; nothing changed.
    Checksum = 4,
    /// The running agent could not be reached; nothing changed.
    AgentDown = 5,
    /// The new binary could not be installed or does not run; nothing switched.
    Install = 6,
    /// The new release failed; the old one is back and serving.
    RolledBack = 7,
    /// The new release failed and the rollback failed too.
    RollbackFailed = 8,
    /// Another upgrade is running.
    Locked = 9,
}

/// `release.json` next to an installed binary.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseInfo {
    /// `boxlite-runner` version.
    pub version: String,
    /// SHA-256 of the binary.
    pub binary_sha256: String,
    /// Size of the binary.
    pub size: u64,
    /// SHA-256 of the artifact it came from (absent for a self-installed first release).
    #[serde(default)]
    pub artifact_sha256: Option<String>,
    /// When it was installed.
    pub installed_at: String,
}

/// `installed.json`: the last confirmed installation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Installed {
    /// Release directory name.
    pub release: String,
    /// Version.
    pub version: String,
    /// SHA-256 of the binary.
    pub binary_sha256: String,
    /// SHA-256 of the artifact.
    #[serde(default)]
    pub artifact_sha256: Option<String>,
    /// Release it replaced.
    #[serde(default)]
    pub previous: Option<String>,
    /// When it was confirmed.
    pub installed_at: String,
}

/// `upgrade.json`: an upgrade in progress.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Journal {
    /// Release being replaced.
    pub from: Option<String>,
    /// Release being installed.
    pub to: String,
    /// Current step.
    pub step: String,
    /// Pid of the upgrade process.
    pub pid: u32,
    /// Start time.
    pub started_at: String,
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// The binary's SHA-256 from its release's `release.json`, when it is an installed release.
pub fn release_sha256_of(exe: &Path) -> Option<String> {
    let info: ReleaseInfo =
        serde_json::from_slice(&std::fs::read(exe.parent()?.join("release.json")).ok()?).ok()?;
    let len = std::fs::metadata(exe).ok()?.len();
    (len == info.size && sys::is_sha256_hex(&info.binary_sha256)).then_some(info.binary_sha256)
}

/// Name of the release `current` points to.
pub fn current_release(layout: &Layout) -> Option<String> {
    let t = std::fs::read_link(layout.current()).ok()?;
    t.file_name().map(|n| n.to_string_lossy().into_owned())
}

/// Read `installed.json`.
pub fn installed(layout: &Layout) -> Option<Installed> {
    serde_json::from_slice(&std::fs::read(layout.installed()).ok()?).ok()
}

/// Copy `binary` into a new release directory (idempotent). Returns the release name.
pub fn install_release(
    layout: &Layout,
    binary: &Path,
    version: &str,
    artifact_sha256: Option<&str>,
) -> Result<(String, ReleaseInfo)> {
    let rel = layout.releases();
    std::fs::create_dir_all(&rel)?;
    std::fs::set_permissions(&rel, std::fs::Permissions::from_mode(0o700))?;
    if version.is_empty()
        || version.len() > 64
        || !version
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || ".+-_".contains(c))
    {
        bail!("unusable version string {version:?}");
    }
    let sha = sys::sha256_file(binary)?;
    let size = std::fs::metadata(binary)?.len();
    let name = format!("{version}-{}", &sha[..12]);
    let dir = rel.join(&name);
    if let Some(existing) = std::fs::read(dir.join("release.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<ReleaseInfo>(&b).ok())
        && existing.binary_sha256 == sha
        && sys::sha256_file(&dir.join(crate::BINARY_NAME))
            .ok()
            .as_deref()
            == Some(sha.as_str())
    {
        return Ok((name, existing));
    }
    let staging = rel.join(format!(".staging-{:08x}", rand::random::<u32>()));
    let res = (|| -> Result<ReleaseInfo> {
        std::fs::create_dir(&staging)?;
        let dest = staging.join(crate::BINARY_NAME);
        std::fs::copy(binary, &dest)
            .with_context(|| format!("copying {} into {}", binary.display(), dest.display()))?;
        std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o755))?;
        if sys::sha256_file(&dest)? != sha {
            bail!("the copied binary does not match the source (changed while copying?)");
        }
        let info = ReleaseInfo {
            version: version.to_string(),
            binary_sha256: sha.clone(),
            size,
            artifact_sha256: artifact_sha256.map(str::to_string),
            installed_at: now_rfc3339(),
        };
        std::fs::write(
            staging.join("release.json"),
            serde_json::to_vec_pretty(&info)?,
        )?;
        std::fs::File::open(&dest)?.sync_all()?;
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        std::fs::rename(&staging, &dir)?;
        sys::fsync_dir(&rel);
        Ok(info)
    })();
    match res {
        Ok(info) => Ok((name, info)),
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staging);
            Err(e)
        }
    }
}

/// Point `current` at `release` atomically.
pub fn switch_current(layout: &Layout, release: &str) -> Result<()> {
    let tmp = layout
        .root()
        .join(format!(".current.tmp-{:08x}", rand::random::<u32>()));
    std::os::unix::fs::symlink(Path::new("releases").join(release), &tmp)?;
    if let Err(e) = std::fs::rename(&tmp, layout.current()) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).context("switching the current release");
    }
    sys::fsync_dir(layout.root());
    Ok(())
}

/// Remove old releases, keeping the newest `keep` plus `protect`.
pub fn prune(layout: &Layout, keep: usize, protect: &[&str]) {
    let Ok(rd) = std::fs::read_dir(layout.releases()) else {
        return;
    };
    let mut rels: Vec<(std::time::SystemTime, String)> = rd
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .filter_map(|e| {
            let t = e.metadata().and_then(|m| m.modified()).ok()?;
            Some((t, e.file_name().to_string_lossy().into_owned()))
        })
        .collect();
    rels.sort_by_key(|r| std::cmp::Reverse(r.0));
    for (i, (_, name)) in rels.iter().enumerate() {
        if i >= keep && !protect.contains(&name.as_str()) {
            let _ = std::fs::remove_dir_all(layout.releases().join(name));
        }
    }
}

/// At agent start (before any thread): install ourselves as the first release
/// when there is none, and exec into `current` when it is another binary.
/// Returns normally when this process should go on as the agent.
pub fn startup(config: &Config) -> Result<()> {
    let layout = config.layout();
    std::fs::create_dir_all(layout.root())?;
    std::fs::set_permissions(layout.root(), std::fs::Permissions::from_mode(0o700))?;
    let me = std::fs::read_link("/proc/self/exe").context("resolving /proc/self/exe")?;
    if std::fs::symlink_metadata(layout.current()).is_err() {
        let (name, info) = install_release(&layout, &me, crate::VERSION, None)
            .context("installing this binary as the first release")?;
        switch_current(&layout, &name)?;
        let inst = Installed {
            release: name.clone(),
            version: info.version,
            binary_sha256: info.binary_sha256,
            artifact_sha256: None,
            previous: None,
            installed_at: now_rfc3339(),
        };
        sys::write_atomic(
            &layout.installed(),
            &serde_json::to_vec_pretty(&inst)?,
            0o600,
        )?;
        tracing::info!("installed this binary as the first release {name}");
    }
    if let Ok(j) = std::fs::read(layout.upgrade_journal())
        && let Ok(j) = serde_json::from_slice::<Journal>(&j)
        && !sys::process_alive(j.pid, None)
    {
        tracing::warn!(
            "an upgrade from {:?} to {} was interrupted at step {:?}; the confirmed installation is {:?}",
            j.from,
            j.to,
            j.step,
            installed(&layout).map(|i| i.release)
        );
    }
    let target = layout.current_binary();
    let (Ok(t), Ok(m)) = (std::fs::canonicalize(&target), std::fs::canonicalize(&me)) else {
        tracing::warn!(
            "{} is not usable; running {}",
            target.display(),
            me.display()
        );
        return Ok(());
    };
    if t == m {
        return Ok(());
    }
    let hops: u32 = std::env::var(EXEC_HOPS_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if hops >= 2 {
        tracing::warn!("not following {} again (exec loop guard)", target.display());
        return Ok(());
    }
    tracing::info!("switching to the installed release {}", t.display());
    use std::os::unix::process::CommandExt;
    let err = std::process::Command::new(&t)
        .args(std::env::args_os().skip(1))
        .env(EXEC_HOPS_ENV, (hops + 1).to_string())
        .exec();
    tracing::warn!(
        "exec of {} failed ({err}); running {}",
        t.display(),
        me.display()
    );
    Ok(())
}

/// What `upgrade` needs besides the configuration.
#[derive(Clone, Debug)]
pub struct UpgradeArgs {
    /// URL or path of the artifact.
    pub artifact: String,
    /// Its SHA-256.
    pub sha256: String,
    /// How long to wait for the restarted agent.
    pub timeout: Duration,
}

/// How to start the agent again if it died: read from /proc before restarting it.
#[derive(Clone, Debug)]
struct LaunchInfo {
    argv: Vec<OsString>,
    cwd: PathBuf,
    env: Vec<(OsString, OsString)>,
    log: Option<PathBuf>,
}

fn launch_info(pid: u32) -> Option<LaunchInfo> {
    let split = |b: Vec<u8>| -> Vec<OsString> {
        b.split(|c| *c == 0)
            .filter(|s| !s.is_empty())
            .map(|s| OsString::from_vec(s.to_vec()))
            .collect()
    };
    let argv = split(std::fs::read(format!("/proc/{pid}/cmdline")).ok()?);
    let env = split(std::fs::read(format!("/proc/{pid}/environ")).ok()?)
        .into_iter()
        .filter_map(|kv| {
            let b = kv.into_vec();
            let i = b.iter().position(|c| *c == b'=')?;
            Some((
                OsString::from_vec(b[..i].to_vec()),
                OsString::from_vec(b[i + 1..].to_vec()),
            ))
        })
        .collect();
    let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).ok()?;
    let log = std::fs::read_link(format!("/proc/{pid}/fd/2"))
        .ok()
        .filter(|p| p.is_absolute() && p.is_file());
    Some(LaunchInfo {
        argv,
        cwd,
        env,
        log,
    })
}

/// Print a progress line.
fn step(n: u32, what: &str) {
    println!("[{n}/8] {what}");
}

struct Failed(ExitCode, String);

fn failed(code: ExitCode, msg: impl Into<String>) -> Failed {
    Failed(code, msg.into())
}

/// Run an upgrade; returns the process exit code.
pub async fn upgrade(config: &Config, args: &UpgradeArgs) -> i32 {
    match upgrade_inner(config, args).await {
        Ok(msg) => {
            println!("{msg}");
            ExitCode::Ok as i32
        }
        Err(Failed(code, msg)) => {
            eprintln!("upgrade failed: {msg}");
            code as i32
        }
    }
}

fn health_url(listen: &str) -> String {
    let addr: std::net::SocketAddr = listen
        .parse()
        .unwrap_or_else(|_| "127.0.0.1:0".parse().expect("literal"));
    let host = match addr.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => "127.0.0.1".to_string(),
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => "[::1]".to_string(),
        std::net::IpAddr::V6(ip) => format!("[{ip}]"),
        ip => ip.to_string(),
    };
    format!("http://{host}:{}/api/health", addr.port())
}

/// Fetch the artifact into `dest`, hashing it; returns the SHA-256.
async fn download(artifact: &str, dest: &Path) -> Result<String> {
    let mut out = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dest)
        .await?;
    let mut h = Sha256::new();
    let mut n: u64 = 0;
    if artifact.starts_with("http://") || artifact.starts_with("https://") {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(600))
            .build()?;
        let mut resp = client
            .get(artifact)
            .send()
            .await
            .with_context(|| format!("GET {artifact}"))?;
        if !resp.status().is_success() {
            bail!("GET {artifact}: {}", resp.status());
        }
        while let Some(chunk) = resp.chunk().await? {
            n += chunk.len() as u64;
            if n > MAX_ARTIFACT {
                bail!("artifact larger than {MAX_ARTIFACT} bytes");
            }
            h.update(&chunk);
            out.write_all(&chunk).await?;
        }
    } else {
        let path = artifact.strip_prefix("file://").unwrap_or(artifact);
        let mut f = tokio::fs::File::open(path)
            .await
            .with_context(|| format!("opening {path}"))?;
        let mut buf = vec![0u8; 1 << 16];
        use tokio::io::AsyncReadExt;
        loop {
            let k = f.read(&mut buf).await?;
            if k == 0 {
                break;
            }
            n += k as u64;
            if n > MAX_ARTIFACT {
                bail!("artifact larger than {MAX_ARTIFACT} bytes");
            }
            h.update(&buf[..k]);
            out.write_all(&buf[..k]).await?;
        }
    }
    out.flush().await?;
    out.sync_all().await?;
    Ok(hex::encode(h.finalize()))
}

/// Unpack the single `boxlite-runner` of a verified artifact into `dest`.
fn unpack(artifact: &Path, dest: &Path) -> Result<()> {
    let f = std::fs::File::open(artifact)?;
    let mut magic = [0u8; 2];
    (&f).read_exact(&mut magic).context("artifact is empty")?;
    if magic != [0x1f, 0x8b] {
        bail!("the artifact is not a .tar.gz (it must hold a single file named boxlite-runner)");
    }
    let f = std::fs::File::open(artifact)?;
    let mut a = tar::Archive::new(flate2::read::GzDecoder::new(f));
    let mut found = false;
    for e in a.entries()? {
        let mut e = e?;
        let path = e.path_bytes().into_owned();
        let comps = crate::layers::safe_components(&path)?;
        match e.header().entry_type() {
            tar::EntryType::Directory if comps.is_empty() => continue,
            tar::EntryType::Regular if comps == [crate::BINARY_NAME.as_bytes().to_vec()] => {
                if found {
                    bail!("the artifact holds boxlite-runner twice");
                }
                if e.size() > MAX_ARTIFACT * 4 {
                    bail!("boxlite-runner in the artifact is too large");
                }
                let mut out = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o755)
                    .open(dest)?;
                std::io::copy(&mut (&mut e).take(MAX_ARTIFACT * 4), &mut out)?;
                out.sync_all()?;
                found = true;
            }
            _ => bail!(
                "unexpected entry {:?} in the artifact (it must hold only boxlite-runner)",
                String::from_utf8_lossy(&path)
            ),
        }
    }
    if !found {
        bail!("the artifact does not hold boxlite-runner");
    }
    Ok(())
}

use std::os::unix::fs::OpenOptionsExt as _;

/// Run `binary version --json` and return the version it reports.
async fn probe_version(binary: &Path) -> Result<String> {
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::process::Command::new(binary)
            .args(["version", "--json"])
            .env_clear()
            .stdin(std::process::Stdio::null())
            .output(),
    )
    .await
    .map_err(|_| {
        anyhow!(
            "`{} version --json` did not finish within 20 s",
            binary.display()
        )
    })?
    .with_context(|| format!("running {}", binary.display()))?;
    if !out.status.success() {
        bail!(
            "`{} version --json` failed ({}): {}",
            binary.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|_| anyhow!("`version --json` printed no JSON"))?;
    v.get("version")
        .and_then(|v| v.as_str())
        .map(str::to_string)
        .ok_or_else(|| anyhow!("`version --json` printed no version"))
}

/// Restart the agent so it runs whatever `current` points to.
async fn restart(layout: &Layout, sup: &Supervisor) -> Result<()> {
    match sup {
        Supervisor::Systemd { unit } => {
            let st = tokio::process::Command::new("systemctl")
                .args(["restart", unit])
                .status()
                .await
                .context("running systemctl")?;
            if !st.success() {
                bail!("systemctl restart {unit}: {st}");
            }
            Ok(())
        }
        Supervisor::Local => {
            let mut c = AdminClient::connect(&layout.admin_socket()).await?;
            c.call_ok(&AdminRequest::Reexec).await?;
            Ok(())
        }
    }
}

/// Wait until the agent is healthy, runs `sha`, and every box in `boxes` runs.
async fn wait_healthy(
    layout: &Layout,
    url: &str,
    sha: &str,
    boxes: &[uuid::Uuid],
    timeout: Duration,
) -> Result<AdminStatus> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(3))
        .build()?;
    let deadline = Instant::now() + timeout;
    let mut last = String::from("no answer yet");
    // Give an exec a moment to happen before the first probe.
    tokio::time::sleep(Duration::from_millis(100)).await;
    while Instant::now() < deadline {
        // The HTTP API must serve and say `ok`; what runs (binary, boxes) comes
        // from the admin socket, which only root reaches (health tells an
        // unauthenticated caller nothing more than liveness).
        match client.get(url).send().await {
            Ok(r) => {
                let code = r.status();
                match r.json::<RunnerLiveness>().await {
                    Ok(h) if !code.is_success() => {
                        last = format!("health answers {code} ({:?})", h.status)
                    }
                    Ok(_) => match AdminClient::connect(&layout.admin_socket()).await {
                        Ok(mut c) => match c.status().await {
                            Ok(st) if st.binary_sha256.as_deref() != Some(sha) => {
                                last = format!(
                                    "the agent runs binary {:?}, not {sha}",
                                    st.binary_sha256
                                )
                            }
                            Ok(st) => {
                                let missing: Vec<String> = boxes
                                    .iter()
                                    .filter(|id| {
                                        !st.boxes.iter().any(|b| {
                                            b.id == **id && b.state == protocol::BoxState::Running
                                        })
                                    })
                                    .map(|id| id.to_string())
                                    .collect();
                                if missing.is_empty() {
                                    return Ok(st);
                                }
                                last = format!("boxes not re-adopted: {}", missing.join(", "));
                            }
                            Err(e) => last = format!("admin status: {e:#}"),
                        },
                        Err(e) => last = format!("admin socket: {e:#}"),
                    },
                    Err(e) => last = format!("health body: {e}"),
                }
            }
            Err(e) => last = format!("health: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!("not healthy within {}s: {last}", timeout.as_secs())
}

/// Start the agent again from `current` with its recorded command line (it died).
fn respawn(layout: &Layout, info: &LaunchInfo) -> Result<u32> {
    let log = match &info.log {
        Some(p) => std::fs::OpenOptions::new().append(true).open(p)?,
        None => std::fs::OpenOptions::new().write(true).open("/dev/null")?,
    };
    let mut cmd = std::process::Command::new(layout.current_binary());
    cmd.args(info.argv.iter().skip(1))
        .current_dir(&info.cwd)
        .env_clear()
        .envs(info.env.iter().map(|(k, v)| (k, v)))
        .env_remove(EXEC_HOPS_ENV)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // SAFETY: setsid is async-signal-safe.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let child = cmd.spawn().context("starting the old agent")?;
    Ok(child.id())
}

async fn upgrade_inner(config: &Config, args: &UpgradeArgs) -> Result<String, Failed> {
    let layout = config.layout();
    let expected = args.sha256.trim().to_ascii_lowercase();
    if !sys::is_sha256_hex(&expected) {
        return Err(failed(ExitCode::Usage, "--sha256 must be 64 hex digits"));
    }
    let _lock = match sys::try_lock(&layout.upgrade_lock()) {
        Ok(Some(l)) => l,
        Ok(None) => {
            return Err(failed(
                ExitCode::Locked,
                "another upgrade is running on this runner",
            ));
        }
        Err(e) => return Err(failed(ExitCode::Usage, format!("{e:#}"))),
    };
    if let Ok(j) = std::fs::read(layout.upgrade_journal())
        && let Ok(j) = serde_json::from_slice::<Journal>(&j)
    {
        println!(
            "note: a previous upgrade to {} stopped at step {:?}; the confirmed installation is {:?}",
            j.to,
            j.step,
            installed(&layout).map(|i| i.release)
        );
    }

    step(1, "checking the running agent");
    let before = match AdminClient::connect(&layout.admin_socket()).await {
        Ok(mut c) => c.status().await,
        Err(e) => Err(e),
    }
    .map_err(|e| {
        failed(
            ExitCode::AgentDown,
            format!("the agent is not reachable ({e:#}); nothing changed"),
        )
    })?;
    let launch = launch_info(before.pid);
    let running: Vec<uuid::Uuid> = before
        .boxes
        .iter()
        .filter(|b| b.state == protocol::BoxState::Running)
        .map(|b| b.id)
        .collect();
    println!(
        "      agent pid {} runs {} ({} boxes running)",
        before.pid,
        before.exe.display(),
        running.len()
    );

    step(2, &format!("downloading {}", args.artifact));
    std::fs::create_dir_all(layout.releases())
        .map_err(|e| failed(ExitCode::Install, format!("creating releases dir: {e}")))?;
    let dl = layout
        .releases()
        .join(format!(".download-{:08x}", rand::random::<u32>()));
    let _dl_guard = RemoveOnDrop(dl.clone());
    let actual = download(&args.artifact, &dl).await.map_err(|e| {
        failed(
            ExitCode::Download,
            format!("download failed: {e:#}; nothing changed"),
        )
    })?;

    step(3, "verifying the SHA-256");
    if actual != expected {
        return Err(failed(
            ExitCode::Checksum,
            format!(
                "checksum mismatch: the artifact is {actual}, expected {expected}; nothing changed"
            ),
        ));
    }

    step(4, "unpacking and checking the new binary");
    let staged = layout
        .releases()
        .join(format!(".unpacked-{:08x}", rand::random::<u32>()));
    let _st_guard = RemoveOnDrop(staged.clone());
    unpack(&dl, &staged).map_err(|e| {
        failed(
            ExitCode::Checksum,
            format!("malformed artifact: {e:#}; nothing changed"),
        )
    })?;
    let version = probe_version(&staged).await.map_err(|e| {
        failed(
            ExitCode::Install,
            format!("the new binary does not run: {e:#}; nothing changed"),
        )
    })?;

    step(5, &format!("installing release {version}"));
    let (release, info) =
        install_release(&layout, &staged, &version, Some(&expected)).map_err(|e| {
            failed(
                ExitCode::Install,
                format!("installing failed: {e:#}; nothing switched"),
            )
        })?;
    let previous = before
        .exe
        .parent()
        .filter(|p| p.parent() == Some(layout.releases().as_path()))
        .and_then(|p| p.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .or_else(|| installed(&layout).map(|i| i.release))
        .or_else(|| current_release(&layout));
    let previous_sha = before.binary_sha256.clone().or_else(|| {
        previous
            .as_ref()
            .and_then(|p| release_sha256_of(&layout.releases().join(p).join(crate::BINARY_NAME)))
    });
    if previous_sha.as_deref() == Some(info.binary_sha256.as_str())
        && current_release(&layout).as_deref() == Some(release.as_str())
    {
        write_installed(
            &layout,
            &release,
            &info,
            Some(&expected),
            previous.as_deref(),
        )
        .map_err(|e| failed(ExitCode::Install, format!("{e:#}")))?;
        return Ok(format!(
            "release {release} is already installed and running"
        ));
    }
    let journal = |step: &str| {
        let j = Journal {
            from: previous.clone(),
            to: release.clone(),
            step: step.to_string(),
            pid: std::process::id(),
            started_at: now_rfc3339(),
        };
        let _ = sys::write_atomic(
            &layout.upgrade_journal(),
            &serde_json::to_vec_pretty(&j).unwrap_or_default(),
            0o600,
        );
    };

    step(
        6,
        &format!("switching current to {release} and restarting the agent"),
    );
    journal("switching");
    switch_current(&layout, &release)
        .map_err(|e| failed(ExitCode::Install, format!("switching failed: {e:#}")))?;
    journal("restarting");
    let url = health_url(&before.listen);
    let outcome = match restart(&layout, &before.supervisor).await {
        Ok(()) => {
            step(
                7,
                "waiting for the new agent to be healthy and to re-adopt every box",
            );
            journal("waiting for health");
            wait_healthy(&layout, &url, &info.binary_sha256, &running, args.timeout).await
        }
        Err(e) => Err(e.context("restart")),
    };
    match outcome {
        Ok(st) => {
            step(8, "recording the installation");
            write_installed(
                &layout,
                &release,
                &info,
                Some(&expected),
                previous.as_deref(),
            )
            .map_err(|e| failed(ExitCode::RollbackFailed, format!("recording failed: {e:#}")))?;
            let _ = std::fs::remove_file(layout.upgrade_journal());
            let mut protect = vec![release.as_str()];
            if let Some(p) = &previous {
                protect.push(p);
            }
            prune(&layout, config.keep_releases, &protect);
            Ok(format!(
                "upgraded to {release}: agent pid {} healthy, {} of {} boxes re-adopted",
                st.pid,
                running.len(),
                running.len()
            ))
        }
        Err(e) => {
            eprintln!("the new release failed: {e:#}");
            eprintln!("rolling back");
            journal("rolling back");
            let Some(prev) = previous.clone() else {
                return Err(failed(
                    ExitCode::RollbackFailed,
                    "no previous release to roll back to",
                ));
            };
            if let Err(e) = switch_current(&layout, &prev) {
                return Err(failed(
                    ExitCode::RollbackFailed,
                    format!("switching back failed: {e:#}"),
                ));
            }
            let prev_sha = previous_sha.unwrap_or_default();
            let restarted = match restart(&layout, &before.supervisor).await {
                Ok(()) => Ok(()),
                Err(re) => match (&before.supervisor, &launch) {
                    (Supervisor::Local, Some(li)) => {
                        eprintln!(
                            "re-exec through the admin socket failed ({re:#}); starting the old agent again"
                        );
                        if sys::process_alive(before.pid, Some(before.start_time)) {
                            unsafe { libc::kill(before.pid as i32, libc::SIGKILL) };
                            for _ in 0..100 {
                                if !sys::process_alive(before.pid, Some(before.start_time)) {
                                    break;
                                }
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                        }
                        respawn(&layout, li).map(|pid| {
                            eprintln!("the old agent runs again as pid {pid} (a new pid: a supervisor tracking the old one must pick it up)");
                        })
                    }
                    _ => Err(re),
                },
            };
            let back = match restarted {
                Ok(()) => wait_healthy(&layout, &url, &prev_sha, &running, args.timeout).await,
                Err(e) => Err(e),
            };
            match back {
                Ok(_) => {
                    let _ = std::fs::remove_file(layout.upgrade_journal());
                    Err(failed(
                        ExitCode::RolledBack,
                        format!(
                            "release {release} failed ({e:#}); rolled back to {prev}, which is healthy with all {} boxes",
                            running.len()
                        ),
                    ))
                }
                Err(e2) => Err(failed(
                    ExitCode::RollbackFailed,
                    format!(
                        "release {release} failed ({e:#}) and the rollback to {prev} failed too ({e2:#})"
                    ),
                )),
            }
        }
    }
}

fn write_installed(
    layout: &Layout,
    release: &str,
    info: &ReleaseInfo,
    artifact: Option<&str>,
    previous: Option<&str>,
) -> Result<()> {
    let inst = Installed {
        release: release.to_string(),
        version: info.version.clone(),
        binary_sha256: info.binary_sha256.clone(),
        artifact_sha256: artifact.map(str::to_string),
        previous: previous.map(str::to_string),
        installed_at: now_rfc3339(),
    };
    sys::write_atomic(
        &layout.installed(),
        &serde_json::to_vec_pretty(&inst)?,
        0o600,
    )
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_url_targets_loopback_for_wildcards() {
        assert_eq!(
            health_url("0.0.0.0:7101"),
            "http://127.0.0.1:7101/api/health"
        );
        assert_eq!(health_url("127.0.0.1:9"), "http://127.0.0.1:9/api/health");
        assert_eq!(health_url("[::]:80"), "http://[::1]:80/api/health");
    }

    #[test]
    fn releases_install_switch_and_prune() {
        let d = tempfile::tempdir().unwrap();
        let layout = Layout::new(d.path());
        let bin = d.path().join("bin");
        std::fs::write(&bin, b"#!/bin/sh\necho one\n").unwrap();
        let (r1, i1) = install_release(&layout, &bin, "1.0.0", None).unwrap();
        assert!(r1.starts_with("1.0.0-"));
        assert_eq!(
            release_sha256_of(&layout.releases().join(&r1).join(crate::BINARY_NAME)),
            Some(i1.binary_sha256.clone())
        );
        // Idempotent.
        assert_eq!(install_release(&layout, &bin, "1.0.0", None).unwrap().0, r1);
        switch_current(&layout, &r1).unwrap();
        assert_eq!(current_release(&layout).as_deref(), Some(r1.as_str()));
        std::fs::write(&bin, b"#!/bin/sh\necho two\n").unwrap();
        let (r2, _) = install_release(&layout, &bin, "1.0.1", None).unwrap();
        switch_current(&layout, &r2).unwrap();
        assert_eq!(current_release(&layout).as_deref(), Some(r2.as_str()));
        assert!(install_release(&layout, &bin, "../x", None).is_err());
        prune(&layout, 0, &[&r2]);
        assert!(!layout.releases().join(&r1).exists());
        assert!(layout.releases().join(&r2).exists());
    }

    #[test]
    fn artifacts_hold_exactly_the_binary() {
        let d = tempfile::tempdir().unwrap();
        let mk = |entries: &[(&str, &[u8])]| -> PathBuf {
            let p = d.path().join(format!("a-{}.tar.gz", rand::random::<u32>()));
            let gz = flate2::write::GzEncoder::new(
                std::fs::File::create(&p).unwrap(),
                flate2::Compression::fast(),
            );
            let mut b = tar::Builder::new(gz);
            for (name, data) in entries {
                let mut h = tar::Header::new_gnu();
                h.set_mode(0o755);
                h.set_size(data.len() as u64);
                h.set_entry_type(tar::EntryType::Regular);
                b.append_data(&mut h, name, *data).unwrap();
            }
            b.into_inner().unwrap().finish().unwrap();
            p
        };
        let ok = mk(&[("./boxlite-runner", b"bin")]);
        let out = d.path().join("out1");
        unpack(&ok, &out).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), b"bin");
        for bad in [
            mk(&[("other", b"x")]),
            mk(&[("boxlite-runner", b"x"), ("extra", b"y")]),
            mk(&[]),
        ] {
            assert!(unpack(&bad, &d.path().join(format!("o-{}", rand::random::<u32>()))).is_err());
        }
        let raw = d.path().join("raw");
        std::fs::write(&raw, b"\x7fELF....").unwrap();
        assert!(unpack(&raw, &d.path().join("o-raw")).is_err());
    }
}
