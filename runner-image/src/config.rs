//! The agent's configuration file (`runner.toml`) and the state directory layout.
//!
//! Required keys are the ones `boxctl` renders (`name`, `listen`,
//! `advertise_url`, `control_plane_url`, `token_file`, `state_dir`); every other
//! key is optional with a default. Unknown keys are an error, so a typo never
//! silently falls back to a default. Relative paths are resolved against the
//! working directory at load time, so later `chdir`s or a re-exec do not move
//! them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use protocol::Ipv4Cidr;
use serde::Deserialize;

/// Default path of the configuration file on a runner host.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/boxlite/runner.toml";

/// Host uid boxes' root mapped to before every box had a range of its own;
/// box ranges start right above it (see [`Config::box_uid`]).
pub const DEFAULT_BOX_UID: u32 = 0x7000_0000;

/// Which cgroup layout the agent uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CgroupMode {
    /// Detect: v1 when the controllers are mounted separately; on v2 use
    /// per-box systemd scopes when systemd runs the host, else the agent's own
    /// delegated cgroup.
    Auto,
    /// cgroup v1 (one hierarchy per controller).
    V1,
    /// cgroup v2, boxes under the agent's own (delegated) cgroup or `cgroup_parent`.
    V2,
    /// cgroup v2, one transient systemd scope (`Delegate=yes`) per box.
    Systemd,
}

/// The file as written; see [`Config`] for meanings.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    name: String,
    listen: String,
    advertise_url: String,
    control_plane_url: String,
    token_file: PathBuf,
    state_dir: PathBuf,
    #[serde(default)]
    image_dir: Option<PathBuf>,
    #[serde(default)]
    cgroup_mode: Option<CgroupMode>,
    #[serde(default)]
    cgroup_parent: Option<String>,
    #[serde(default)]
    box_uid: Option<u32>,
    #[serde(default)]
    pids_per_box: Option<u64>,
    #[serde(default)]
    default_cpu_millicores: Option<u64>,
    #[serde(default)]
    default_memory_mib: Option<u64>,
    #[serde(default)]
    default_disk_mib: Option<u64>,
    #[serde(default)]
    capacity_cpu_millicores: Option<u64>,
    #[serde(default)]
    cpu_overcommit: Option<u64>,
    #[serde(default)]
    capacity_memory_mib: Option<u64>,
    #[serde(default)]
    capacity_disk_mib: Option<u64>,
    #[serde(default)]
    reserved_memory_mib: Option<u64>,
    #[serde(default)]
    bwrap_path: Option<PathBuf>,
    #[serde(default)]
    busybox_path: Option<PathBuf>,
    #[serde(default)]
    stop_grace_secs: Option<u64>,
    #[serde(default)]
    keep_releases: Option<usize>,
    #[serde(default)]
    exec: crate::exec::ExecLimits,
    #[serde(default)]
    max_sessions_per_box: Option<usize>,
    #[serde(default)]
    nofile_per_process: Option<u64>,
    #[serde(default)]
    box_subnet: Option<Ipv4Cidr>,
    #[serde(default)]
    box_dns: Option<String>,
    #[serde(default)]
    egress_allow: Vec<Ipv4Cidr>,
    #[serde(default)]
    egress_deny: Vec<Ipv4Cidr>,
    #[serde(default)]
    id_claims_dir: Option<PathBuf>,
}

/// The agent's resolved configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// Runner name (`runner-1`).
    pub name: String,
    /// Address the API listens on.
    pub listen: SocketAddr,
    /// Base URL the control plane uses to reach this runner.
    pub advertise_url: String,
    /// Base URL of the control plane.
    pub control_plane_url: String,
    /// File holding the runner token (`bxr_…`).
    pub token_file: PathBuf,
    /// State directory (boxes, images, releases, sockets).
    pub state_dir: PathBuf,
    /// Image store (default `<state_dir>/images`).
    pub image_dir: PathBuf,
    /// cgroup layout.
    pub cgroup_mode: CgroupMode,
    /// v1: parent cgroup name under each controller (default `boxlite/<name>`);
    /// v2: parent cgroup path below `/sys/fs/cgroup` (default: the agent's own cgroup).
    pub cgroup_parent: Option<String>,
    /// Host uid (and gid) root of boxes mapped to before per-box ranges (and
    /// still does for such boxes until they restart); each box's own range of
    /// 65,536 ids is taken from above it. Unprivileged on the host.
    pub box_uid: u32,
    /// `pids.max` of every box.
    pub pids_per_box: u64,
    /// CPU given to a box whose spec says 0.
    pub default_cpu_millicores: u64,
    /// Memory given to a box whose spec says 0.
    pub default_memory_mib: u64,
    /// Disk reported for a box whose spec says 0.
    pub default_disk_mib: u64,
    /// Capacity override (default: cores × 1000 × `cpu_overcommit`).
    pub capacity_cpu_millicores: Option<u64>,
    /// How many times the cores are offered to boxes: a box's CPU is a CFS
    /// quota and most sandboxes idle, so CPU is shared; memory never is.
    pub cpu_overcommit: u64,
    /// Capacity override (default: MemTotal − reserved).
    pub capacity_memory_mib: Option<u64>,
    /// Capacity override (default: size of the state directory's filesystem).
    pub capacity_disk_mib: Option<u64>,
    /// Memory kept for the host when computing capacity.
    pub reserved_memory_mib: u64,
    /// bubblewrap binary.
    pub bwrap_path: PathBuf,
    /// Static busybox used to build the default image.
    pub busybox_path: PathBuf,
    /// Seconds a stopping box's processes get between SIGTERM and SIGKILL.
    pub stop_grace_secs: u64,
    /// Releases kept besides the current and previous one.
    pub keep_releases: usize,
    /// Output limits of one-shot execs (the `[exec]` table).
    pub exec: crate::exec::ExecLimits,
    /// Most exec sessions (running or finished but unread) one box keeps.
    pub max_sessions_per_box: usize,
    /// `RLIMIT_NOFILE` of every process in a box (at most 4096 by default;
    /// the kernel's file table is shared by the whole host).
    pub nofile_per_process: u64,
    /// Subnet egress boxes take addresses from (default: a free block of
    /// [`crate::network::SUBNET_POOL`], chosen once and kept).
    pub box_subnet: Option<Ipv4Cidr>,
    /// Upstream resolver of egress boxes: an address, `"none"` (no DNS), or
    /// unset (the host's first non-loopback resolver).
    pub box_dns: BoxDns,
    /// The stage's allow-list: private destinations an egress box may be
    /// allowed to reach (each box names its own, within this list).
    pub egress_allow: Vec<Ipv4Cidr>,
    /// Destinations denied to every box on top of the built-in deny list
    /// (the control plane's and runner's addresses are added by themselves).
    pub egress_deny: Vec<Ipv4Cidr>,
    /// Where the host's box id-range claims are kept, shared by every runner
    /// of the host (default [`DEFAULT_ID_CLAIMS_DIR`]).
    pub id_claims_dir: PathBuf,
}

/// Default of [`Config::id_claims_dir`].
pub const DEFAULT_ID_CLAIMS_DIR: &str = "/var/lib/boxlite/id-claims";

/// Where egress boxes' DNS queries go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BoxDns {
    /// The host's first non-loopback resolver.
    Host,
    /// This resolver.
    Resolver(std::net::Ipv4Addr),
    /// No DNS for boxes.
    Off,
}

impl Config {
    /// Read and validate the file at `path`; relative paths are resolved against the working directory.
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config {}", path.display()))?;
        let cwd = std::env::current_dir().context("current directory")?;
        Config::parse(&text, &cwd).with_context(|| format!("config {}", path.display()))
    }

    /// Parse `text`, resolving relative paths against `base`.
    pub fn parse(text: &str, base: &Path) -> Result<Config> {
        let raw: RawConfig = toml::from_str(text)?;
        let abs = |p: &Path| -> PathBuf {
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                base.join(p)
            }
        };
        if raw.name.is_empty()
            || raw.name.len() > 63
            || !raw
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            bail!(
                "`name` must be 1-63 characters of letters, digits, `-` or `_` (got {:?})",
                raw.name
            );
        }
        let listen: SocketAddr = raw
            .listen
            .parse()
            .with_context(|| format!("`listen` is not an address:port ({:?})", raw.listen))?;
        for (key, v) in [
            ("advertise_url", &raw.advertise_url),
            ("control_plane_url", &raw.control_plane_url),
        ] {
            let u = url::Url::parse(v).with_context(|| format!("`{key}` is not a URL ({v:?})"))?;
            if u.scheme() != "http" && u.scheme() != "https" {
                bail!("`{key}` must be http or https ({v:?})");
            }
        }
        let state_dir = abs(&raw.state_dir);
        let image_dir = raw
            .image_dir
            .as_deref()
            .map(abs)
            .unwrap_or_else(|| state_dir.join("images"));
        let box_uid = raw.box_uid.unwrap_or(DEFAULT_BOX_UID);
        if box_uid == 0 || box_uid == u32::MAX {
            bail!("`box_uid` must be an unprivileged uid (not 0 or 4294967295)");
        }
        if let Some(p) = &raw.cgroup_parent
            && (p.split('/').any(|c| c == ".." || c == ".") || p.contains('\0'))
        {
            bail!("`cgroup_parent` must not contain `.` or `..` components ({p:?})");
        }
        let pids_per_box = raw.pids_per_box.unwrap_or(1024);
        if pids_per_box < 8 {
            bail!("`pids_per_box` must be at least 8");
        }
        let default_memory_mib = raw.default_memory_mib.unwrap_or(512);
        if default_memory_mib < crate::boxes::MIN_MEMORY_MIB {
            bail!(
                "`default_memory_mib` must be at least {}",
                crate::boxes::MIN_MEMORY_MIB
            );
        }
        Ok(Config {
            name: raw.name,
            listen,
            advertise_url: raw.advertise_url.trim_end_matches('/').to_string(),
            control_plane_url: raw.control_plane_url.trim_end_matches('/').to_string(),
            token_file: abs(&raw.token_file),
            state_dir,
            image_dir,
            cgroup_mode: raw.cgroup_mode.unwrap_or(CgroupMode::Auto),
            cgroup_parent: raw.cgroup_parent,
            box_uid,
            pids_per_box,
            default_cpu_millicores: raw.default_cpu_millicores.unwrap_or(1000).max(10),
            default_memory_mib,
            default_disk_mib: raw.default_disk_mib.unwrap_or(10 * 1024),
            capacity_cpu_millicores: raw.capacity_cpu_millicores,
            cpu_overcommit: match raw.cpu_overcommit {
                None => 4,
                Some(n @ 1..=64) => n,
                Some(n) => bail!("`cpu_overcommit` must be 1 to 64, not {n}"),
            },
            capacity_memory_mib: raw.capacity_memory_mib,
            capacity_disk_mib: raw.capacity_disk_mib,
            reserved_memory_mib: raw.reserved_memory_mib.unwrap_or(512),
            bwrap_path: raw
                .bwrap_path
                .as_deref()
                .map(abs)
                .unwrap_or_else(|| PathBuf::from("/usr/bin/bwrap")),
            busybox_path: raw
                .busybox_path
                .as_deref()
                .map(abs)
                .unwrap_or_else(|| PathBuf::from("/bin/busybox")),
            stop_grace_secs: raw.stop_grace_secs.unwrap_or(3).min(300),
            keep_releases: raw.keep_releases.unwrap_or(3).max(1),
            exec: raw.exec.checked()?,
            max_sessions_per_box: raw.max_sessions_per_box.unwrap_or(64).clamp(1, 4096),
            nofile_per_process: match raw.nofile_per_process {
                None => 4096,
                Some(n @ 64..=1_048_576) => n,
                Some(n) => bail!("`nofile_per_process` must be 64 to 1048576, not {n}"),
            },
            box_subnet: match raw.box_subnet {
                Some(c) if !(16..=28).contains(&c.prefix()) => {
                    bail!("`box_subnet` must be a /16 to /28 block (got {c})")
                }
                other => other,
            },
            box_dns: match raw.box_dns.as_deref() {
                None => BoxDns::Host,
                Some("none") => BoxDns::Off,
                Some(a) => BoxDns::Resolver(a.parse().with_context(|| {
                    format!("`box_dns` must be an IPv4 address or \"none\" (got {a:?})")
                })?),
            },
            egress_allow: {
                let hard = crate::network::hard_deny_builtin();
                for a in &raw.egress_allow {
                    if let Some(h) = hard.iter().find(|h| h.overlaps(a)) {
                        bail!("`egress_allow` entry {a} overlaps {h}, which boxes may never reach");
                    }
                }
                raw.egress_allow
            },
            egress_deny: raw.egress_deny,
            id_claims_dir: raw
                .id_claims_dir
                .as_deref()
                .map(abs)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_ID_CLAIMS_DIR)),
        })
    }

    /// The state directory layout.
    pub fn layout(&self) -> Layout {
        Layout::new(&self.state_dir)
    }
}

/// Where everything lives under the state directory.
#[derive(Clone, Debug)]
pub struct Layout {
    root: PathBuf,
}

impl Layout {
    /// Layout rooted at `state_dir`.
    pub fn new(state_dir: &Path) -> Layout {
        Layout {
            root: state_dir.to_path_buf(),
        }
    }

    /// The state directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Directory holding one subdirectory per box.
    pub fn boxes(&self) -> PathBuf {
        self.root.join("boxes")
    }

    /// Directory of one box.
    pub fn box_dir(&self, id: &uuid::Uuid) -> PathBuf {
        self.boxes().join(id.to_string())
    }

    /// Box disk templates, one per size (see [`crate::disk`]).
    pub fn disk_templates(&self) -> PathBuf {
        self.root.join("disk-templates")
    }

    /// Scratch space for exports and imports (same filesystem as the boxes).
    pub fn tmp(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// Installed releases of the agent binary.
    pub fn releases(&self) -> PathBuf {
        self.root.join("releases")
    }

    /// Symlink to the release the agent should run.
    pub fn current(&self) -> PathBuf {
        self.root.join("current")
    }

    /// The binary `current` points at.
    pub fn current_binary(&self) -> PathBuf {
        self.current().join(crate::BINARY_NAME)
    }

    /// Last confirmed installation (written last by an upgrade).
    pub fn installed(&self) -> PathBuf {
        self.root.join("installed.json")
    }

    /// Journal of an upgrade in progress.
    pub fn upgrade_journal(&self) -> PathBuf {
        self.root.join("upgrade.json")
    }

    /// Lock held by a running upgrade.
    pub fn upgrade_lock(&self) -> PathBuf {
        self.root.join("upgrade.lock")
    }

    /// Lock held by the running agent.
    pub fn agent_lock(&self) -> PathBuf {
        self.root.join("agent.lock")
    }

    /// The local admin socket.
    pub fn admin_socket(&self) -> PathBuf {
        self.root.join("admin.sock")
    }

    /// Bearer key the control plane presents (persisted from the last healthcheck).
    pub fn api_key(&self) -> PathBuf {
        self.root.join("api_key")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
name = "runner-1"
listen = "127.0.0.1:7101"
advertise_url = "http://127.0.0.1:7101/"
control_plane_url = "http://127.0.0.1:7070"
token_file = "secrets/runner-1-token"
state_dir = "data/runners/runner-1"
"#;

    #[test]
    fn resolves_relative_paths_and_defaults() {
        let c = Config::parse(MINIMAL, Path::new("/stage")).unwrap();
        assert_eq!(c.state_dir, Path::new("/stage/data/runners/runner-1"));
        assert_eq!(c.token_file, Path::new("/stage/secrets/runner-1-token"));
        assert_eq!(
            c.image_dir,
            Path::new("/stage/data/runners/runner-1/images")
        );
        assert_eq!(c.advertise_url, "http://127.0.0.1:7101");
        assert_eq!(c.cgroup_mode, CgroupMode::Auto);
        assert_eq!(c.box_uid, DEFAULT_BOX_UID);
        assert_eq!(c.pids_per_box, 1024);
        assert_eq!(c.cpu_overcommit, 4);
    }

    #[test]
    fn the_rendered_local_template_parses() {
        let text = include_str!("../../templates/local/runner.toml")
            .replace("{{name}}", "runner-2")
            .replace("{{stage}}", "dev")
            .replace("{{port}}", "7102")
            .replace("{{api_port}}", "7070")
            .replace("{{token_file}}", "secrets/runner-2-token")
            .replace("{{state_dir}}", "data/runners/runner-2");
        let c = Config::parse(&text, Path::new("/s")).unwrap();
        assert_eq!(c.name, "runner-2");
        assert_eq!(c.listen.port(), 7102);
    }

    #[test]
    fn refuses_unknown_keys_and_bad_values() {
        let e = Config::parse(&format!("{MINIMAL}\nbogus = 1\n"), Path::new("/")).unwrap_err();
        assert!(format!("{e:#}").contains("bogus"), "{e:#}");
        let e = Config::parse(
            &MINIMAL.replace("127.0.0.1:7101\"\nadv", "nowhere\"\nadv"),
            Path::new("/"),
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("listen"), "{e:#}");
        let e = Config::parse(&format!("{MINIMAL}\nbox_uid = 0\n"), Path::new("/")).unwrap_err();
        assert!(format!("{e:#}").contains("box_uid"), "{e:#}");
        let e =
            Config::parse(&format!("{MINIMAL}\ncpu_overcommit = 0\n"), Path::new("/")).unwrap_err();
        assert!(format!("{e:#}").contains("cpu_overcommit"), "{e:#}");
        let e = Config::parse(
            &format!("{MINIMAL}\ncgroup_parent = \"a/../b\"\n"),
            Path::new("/"),
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("cgroup_parent"), "{e:#}");
    }
}
