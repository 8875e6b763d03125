//! Box cgroups: memory, CPU and pids limits, usage, freezing — on cgroup v1
//! and v2.
//!
//! Layouts:
//! - **v1** (controllers mounted one per hierarchy): the box's processes go
//!   into `<controller mount>/<parent>/<box id>` in the memory, cpu, cpuacct,
//!   pids and (when present) freezer hierarchies. The shim stays outside, so a
//!   box running out of memory never takes its shim with it.
//! - **v2**: every box has its own subtree `R`: the shim lives in the leaf
//!   `R/shim`, the box's processes in the leaf `R/box`, which carries the
//!   limits (no process ever sits in an inner node, as v2 requires). `R` is
//!   either `<base>/<box id>` below a base cgroup the agent owns, or — on a
//!   host run by systemd — a transient scope `boxlite-box-<id>.scope` with
//!   `Delegate=yes`, created by `systemd-run --scope`. Scopes keep the boxes
//!   out of the agent's service cgroup altogether, so restarting the service
//!   can neither kill a box nor run into the "no internal processes" rule
//!   when systemd puts the new agent back into its unit cgroup.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};

use crate::config::{CgroupMode, Config};

/// Where cgroup v2 is normally mounted.
pub const CGROUP2_ROOT: &str = "/sys/fs/cgroup";
/// v1 controllers a box uses (freezer is optional).
const V1_CONTROLLERS: [&str; 5] = ["memory", "cpu", "cpuacct", "pids", "freezer"];
/// v2 controllers a box uses.
const V2_CONTROLLERS: &str = "+memory +cpu +pids";
/// Period of the CPU bandwidth limit, µs.
const CPU_PERIOD_US: u64 = 100_000;

/// Limits written into a box's cgroup.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Hard memory limit, bytes (no swap on top).
    pub memory_bytes: u64,
    /// CPU, thousandths of a core.
    pub cpu_millicores: u64,
    /// Most processes and threads.
    pub pids_max: u64,
}

/// What a box's cgroup reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Memory charged to the box, bytes.
    pub memory_bytes: u64,
    /// CPU time used since the cgroup was created, µs.
    pub cpu_usec: u64,
    /// Processes in the box.
    pub pids: u64,
}

/// Where one box's cgroups are; persisted with the box and handed to its shim.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Placement {
    /// cgroup v1: the box's directory in each controller hierarchy.
    V1 {
        /// Controller name → the box's cgroup directory (controllers mounted
        /// together share a directory).
        dirs: BTreeMap<String, PathBuf>,
    },
    /// cgroup v2: the box's subtree root `R` (shim in `R/shim`, box in `R/box`).
    V2 {
        /// `R`.
        dir: PathBuf,
    },
    /// cgroup v2 in a systemd scope: `R` is the scope's cgroup, known once the shim runs in it.
    SystemdScope {
        /// Scope unit name (`boxlite-box-<id>.scope`).
        unit: String,
        /// `R`, filled in by the shim.
        #[serde(default)]
        dir: Option<PathBuf>,
    },
}

/// The cgroup setup of this host, decided once when the agent starts.
#[derive(Clone, Debug)]
pub enum Hierarchy {
    /// v1 with per-controller mounts; `parent` is the runner's directory name below each.
    V1 {
        /// Controller → mount point.
        mounts: BTreeMap<String, PathBuf>,
        /// Relative directory of this runner's boxes below each mount.
        parent: PathBuf,
    },
    /// v2, boxes below `base` (a cgroup the agent made sure has the controllers enabled).
    V2 {
        /// Base cgroup directory.
        base: PathBuf,
    },
    /// v2, one systemd scope per box.
    Systemd {
        /// `systemd-run` binary.
        systemd_run: PathBuf,
    },
}

/// Controllers mounted as cgroup v1 hierarchies: controller → mount point.
fn v1_mounts() -> BTreeMap<String, PathBuf> {
    let mut out = BTreeMap::new();
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return out;
    };
    for line in info.lines() {
        // ... mount_point ... - fstype source super_options
        let Some((pre, post)) = line.split_once(" - ") else {
            continue;
        };
        let mut post = post.split_whitespace();
        if post.next() != Some("cgroup") {
            continue;
        }
        let opts = post.nth(1).unwrap_or("");
        let Some(mp) = pre.split_whitespace().nth(4) else {
            continue;
        };
        for c in opts.split(',') {
            if V1_CONTROLLERS.contains(&c) {
                out.insert(c.to_string(), PathBuf::from(unescape_mountinfo(mp)));
            }
        }
    }
    out
}

fn unescape_mountinfo(s: &str) -> String {
    // mountinfo escapes space, tab, newline and backslash as \ooo.
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 4 <= b.len()
            && let Ok(v) =
                u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 4]).unwrap_or("x"), 8)
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// True when `/sys/fs/cgroup` is a cgroup2 mount (the unified hierarchy).
fn is_v2_unified() -> bool {
    Path::new(CGROUP2_ROOT).join("cgroup.controllers").exists()
}

/// True when systemd manages this host (`sd_booted`) and `systemd-run` exists.
fn systemd_run() -> Option<PathBuf> {
    if !Path::new("/run/systemd/system").is_dir() {
        return None;
    }
    ["/usr/bin/systemd-run", "/bin/systemd-run"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// The calling process's cgroup v2 path (relative to the cgroup2 root, leading `/`).
pub fn own_v2_cgroup() -> Result<String> {
    let s = std::fs::read_to_string("/proc/self/cgroup").context("reading /proc/self/cgroup")?;
    s.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| p.trim().to_string())
        .ok_or_else(|| anyhow!("no cgroup v2 entry in /proc/self/cgroup"))
}

fn write_file(path: &Path, value: &str) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .with_context(|| format!("open {}", path.display()))?;
    f.write_all(value.as_bytes())
        .with_context(|| format!("write {:?} to {}", value.trim(), path.display()))
}

fn read_u64(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Remove a cgroup directory, retrying briefly while its last processes exit.
fn rmdir_retry(dir: &Path) -> Result<()> {
    for attempt in 0..50 {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && attempt < 49 => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e).with_context(|| format!("rmdir {}", dir.display())),
        }
    }
    Ok(())
}

/// Enable the box controllers in `dir`'s `cgroup.subtree_control`.
fn enable_controllers(dir: &Path) -> Result<()> {
    write_file(&dir.join("cgroup.subtree_control"), V2_CONTROLLERS).with_context(|| {
        format!(
            "enabling {V2_CONTROLLERS} in {} (is the subtree delegated and are the controllers available?)",
            dir.display()
        )
    })
}

impl Hierarchy {
    /// Decide the layout for this host and prepare the runner's part of it.
    /// On v2 without systemd this moves the calling process (the agent) into
    /// the leaf `agent` of its own cgroup before enabling controllers there.
    pub fn setup(config: &Config) -> Result<Hierarchy> {
        let mounts = v1_mounts();
        let mode = match config.cgroup_mode {
            CgroupMode::Auto => {
                if !is_v2_unified() && mounts.contains_key("memory") {
                    CgroupMode::V1
                } else if is_v2_unified() && systemd_run().is_some() {
                    CgroupMode::Systemd
                } else if is_v2_unified() {
                    CgroupMode::V2
                } else {
                    bail!(
                        "no usable cgroup hierarchy: neither cgroup v2 at {CGROUP2_ROOT} nor a v1 memory controller"
                    );
                }
            }
            m => m,
        };
        match mode {
            CgroupMode::V1 => {
                for c in ["memory", "cpu", "cpuacct", "pids"] {
                    if !mounts.contains_key(c) {
                        bail!("cgroup v1 controller `{c}` is not mounted");
                    }
                }
                let parent = PathBuf::from(
                    config
                        .cgroup_parent
                        .clone()
                        .unwrap_or_else(|| format!("boxlite/{}", config.name)),
                );
                let mut seen = std::collections::BTreeSet::new();
                for m in mounts.values() {
                    if seen.insert(m.clone()) {
                        let d = m.join(&parent);
                        std::fs::create_dir_all(&d)
                            .with_context(|| format!("creating cgroup {}", d.display()))?;
                    }
                }
                Ok(Hierarchy::V1 { mounts, parent })
            }
            CgroupMode::Systemd => {
                let systemd_run = systemd_run().ok_or_else(|| {
                    anyhow!("cgroup_mode = \"systemd\" but systemd is not running this host")
                })?;
                Ok(Hierarchy::Systemd { systemd_run })
            }
            CgroupMode::V2 => {
                let root = Path::new(CGROUP2_ROOT);
                let base = match &config.cgroup_parent {
                    Some(p) => {
                        let base = root.join(p.trim_start_matches('/'));
                        // Enable the controllers along the path from the root down.
                        let mut dir = root.to_path_buf();
                        for comp in Path::new(p.trim_start_matches('/')).components() {
                            enable_controllers(&dir)?;
                            dir = dir.join(comp);
                            std::fs::create_dir_all(&dir)
                                .with_context(|| format!("creating cgroup {}", dir.display()))?;
                        }
                        enable_controllers(&base)?;
                        base
                    }
                    None => {
                        let own = own_v2_cgroup()?;
                        let own_dir = root.join(own.trim_start_matches('/'));
                        if own == "/" {
                            // The root cgroup may hold processes and enable controllers.
                            let base = root.join("boxlite").join(&config.name);
                            enable_controllers(root)?;
                            std::fs::create_dir_all(&base)?;
                            enable_controllers(&root.join("boxlite"))?;
                            enable_controllers(&base)?;
                            base
                        } else {
                            move_into_leaf(&own_dir)?;
                            enable_controllers(&own_dir)?;
                            let base = own_dir.join("boxes");
                            std::fs::create_dir_all(&base)
                                .with_context(|| format!("creating cgroup {}", base.display()))?;
                            enable_controllers(&base)?;
                            base
                        }
                    }
                };
                Ok(Hierarchy::V2 { base })
            }
            CgroupMode::Auto => unreachable!("resolved above"),
        }
    }

    /// Where a new box's cgroups go.
    pub fn placement_for(&self, id: &uuid::Uuid) -> Placement {
        match self {
            Hierarchy::V1 { mounts, parent } => Placement::V1 {
                dirs: mounts
                    .iter()
                    .map(|(c, m)| (c.clone(), m.join(parent).join(id.to_string())))
                    .collect(),
            },
            Hierarchy::V2 { base } => Placement::V2 {
                dir: base.join(id.to_string()),
            },
            Hierarchy::Systemd { .. } => Placement::SystemdScope {
                unit: scope_unit(id),
                dir: None,
            },
        }
    }

    /// Remove this runner's own cgroup directories (v1) and their parents when
    /// empty, after every box is gone; anything still in use stays. Under v2
    /// the base holds the agent itself, and systemd removes its own slices.
    pub fn remove_empty_parents(&self) {
        if let Hierarchy::V1 { mounts, parent } = self {
            for mount in mounts.values() {
                let mut dir = Some(parent.as_path());
                while let Some(d) = dir.filter(|d| !d.as_os_str().is_empty()) {
                    if std::fs::remove_dir(mount.join(d)).is_err() {
                        break;
                    }
                    dir = d.parent();
                }
            }
        }
    }

    /// Human-readable name of the layout.
    pub fn describe(&self) -> String {
        match self {
            Hierarchy::V1 { parent, .. } => format!("cgroup v1 (boxes under {})", parent.display()),
            Hierarchy::V2 { base } => format!("cgroup v2 (boxes under {})", base.display()),
            Hierarchy::Systemd { .. } => {
                "cgroup v2 (one systemd scope per box in boxlite.slice)".to_string()
            }
        }
    }
}

/// The systemd scope unit of a box.
pub fn scope_unit(id: &uuid::Uuid) -> String {
    format!("boxlite-box-{id}.scope")
}

/// Arguments of `systemd-run` that start `program args…` in a new delegated scope for the box.
pub fn systemd_run_args(id: &uuid::Uuid) -> Vec<String> {
    vec![
        "--scope".into(),
        "--quiet".into(),
        "--collect".into(),
        format!("--unit={}", scope_unit(id)),
        "--slice=boxlite.slice".into(),
        "--property=Delegate=yes".into(),
        // The shim's own memory is not the box's; no limits on the scope itself.
        "--".into(),
    ]
}

/// Move every process of the cgroup `dir` into its child `agent` (v2 "no internal processes").
fn move_into_leaf(dir: &Path) -> Result<()> {
    let leaf = dir.join("agent");
    std::fs::create_dir_all(&leaf)
        .with_context(|| format!("creating cgroup {}", leaf.display()))?;
    // Processes may appear while we move them (threads, forks): repeat until empty.
    for _ in 0..20 {
        let procs = std::fs::read_to_string(dir.join("cgroup.procs"))
            .with_context(|| format!("reading {}/cgroup.procs", dir.display()))?;
        let pids: Vec<&str> = procs.split_whitespace().collect();
        if pids.is_empty() {
            return Ok(());
        }
        for pid in pids {
            // A process that exited meanwhile is fine.
            let _ = write_file(&leaf.join("cgroup.procs"), pid);
        }
    }
    bail!("could not empty cgroup {} into its leaf", dir.display())
}

impl Placement {
    /// The v2 subtree root, when known.
    fn v2_root(&self) -> Option<&Path> {
        match self {
            Placement::V2 { dir } => Some(dir),
            Placement::SystemdScope { dir, .. } => dir.as_deref(),
            Placement::V1 { .. } => None,
        }
    }

    /// Directories the box's processes live in (one per v1 hierarchy, or `R/box`).
    pub fn box_dirs(&self) -> Vec<PathBuf> {
        match self {
            Placement::V1 { dirs } => {
                let mut v: Vec<PathBuf> = dirs.values().cloned().collect();
                v.sort();
                v.dedup();
                v
            }
            _ => self
                .v2_root()
                .map(|r| vec![r.join("box")])
                .unwrap_or_default(),
        }
    }

    /// Create the box's cgroups and write its limits. Runs in the shim; on v2
    /// it first moves the shim itself into `R/shim`.
    pub fn create(&mut self, limits: &Limits) -> Result<()> {
        match self {
            Placement::V1 { dirs } => {
                for d in dirs.values() {
                    std::fs::create_dir_all(d)
                        .with_context(|| format!("creating cgroup {}", d.display()))?;
                }
                let get = |c: &str| -> Result<&PathBuf> {
                    dirs.get(c)
                        .ok_or_else(|| anyhow!("v1 controller {c} missing from placement"))
                };
                let mem = get("memory")?;
                write_file(
                    &mem.join("memory.limit_in_bytes"),
                    &limits.memory_bytes.to_string(),
                )?;
                let memsw = mem.join("memory.memsw.limit_in_bytes");
                if memsw.exists() {
                    write_file(&memsw, &limits.memory_bytes.to_string())?;
                }
                let cpu = get("cpu")?;
                write_file(&cpu.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
                write_file(
                    &cpu.join("cpu.cfs_quota_us"),
                    &cpu_quota_us(limits.cpu_millicores).to_string(),
                )?;
                write_file(&get("pids")?.join("pids.max"), &limits.pids_max.to_string())?;
                Ok(())
            }
            Placement::V2 { dir } => {
                std::fs::create_dir_all(&*dir)
                    .with_context(|| format!("creating cgroup {}", dir.display()))?;
                setup_v2_subtree(dir, limits)
            }
            Placement::SystemdScope { dir, .. } => {
                let own = own_v2_cgroup()?;
                let r = Path::new(CGROUP2_ROOT).join(own.trim_start_matches('/'));
                if !r.to_string_lossy().ends_with(".scope") {
                    bail!(
                        "expected to run in a systemd scope, but the cgroup is {}",
                        r.display()
                    );
                }
                *dir = Some(r.clone());
                setup_v2_subtree(&r, limits)
            }
        }
    }

    /// Open the `cgroup.procs` files a new box process writes "0" into to join the box.
    pub fn open_procs_files(&self) -> Result<Vec<OwnedFd>> {
        self.box_dirs()
            .iter()
            .map(|d| {
                let p = d.join("cgroup.procs");
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&p)
                    .map(OwnedFd::from)
                    .with_context(|| format!("open {}", p.display()))
            })
            .collect()
    }

    /// Current usage, from the box's cgroup files (zeros for what cannot be read).
    pub fn usage(&self) -> Usage {
        match self {
            Placement::V1 { dirs } => {
                let memory_bytes = dirs
                    .get("memory")
                    .and_then(|d| read_u64(&d.join("memory.usage_in_bytes")))
                    .unwrap_or(0);
                let cpu_usec = dirs
                    .get("cpuacct")
                    .and_then(|d| read_u64(&d.join("cpuacct.usage")))
                    .map(|ns| ns / 1000)
                    .unwrap_or(0);
                let pids = dirs
                    .get("pids")
                    .and_then(|d| read_u64(&d.join("pids.current")))
                    .unwrap_or(0);
                Usage {
                    memory_bytes,
                    cpu_usec,
                    pids,
                }
            }
            _ => {
                let Some(r) = self.v2_root() else {
                    return Usage::default();
                };
                let b = r.join("box");
                let cpu_usec = std::fs::read_to_string(b.join("cpu.stat"))
                    .ok()
                    .and_then(|s| {
                        s.lines()
                            .find_map(|l| l.strip_prefix("usage_usec "))
                            .and_then(|v| v.trim().parse().ok())
                    })
                    .unwrap_or(0);
                Usage {
                    memory_bytes: read_u64(&b.join("memory.current")).unwrap_or(0),
                    cpu_usec,
                    pids: read_u64(&b.join("pids.current")).unwrap_or(0),
                }
            }
        }
    }

    /// Pids of the box's processes (host pid namespace).
    pub fn pids(&self) -> Vec<u32> {
        let Some(d) = self.box_dirs().into_iter().next() else {
            return vec![];
        };
        std::fs::read_to_string(d.join("cgroup.procs"))
            .map(|s| {
                s.split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Freeze or thaw every process of the box. `Ok(false)` when this host cannot freeze.
    pub fn set_frozen(&self, frozen: bool) -> Result<bool> {
        match self {
            Placement::V1 { dirs } => {
                let Some(d) = dirs.get("freezer") else {
                    return Ok(false);
                };
                let want = if frozen { "FROZEN" } else { "THAWED" };
                write_file(&d.join("freezer.state"), want)?;
                if frozen {
                    for _ in 0..250 {
                        let s =
                            std::fs::read_to_string(d.join("freezer.state")).unwrap_or_default();
                        if s.trim() == "FROZEN" {
                            return Ok(true);
                        }
                        std::thread::sleep(Duration::from_millis(4));
                    }
                    bail!("box did not freeze within a second");
                }
                Ok(true)
            }
            _ => {
                let Some(r) = self.v2_root() else {
                    return Ok(false);
                };
                let b = r.join("box");
                write_file(&b.join("cgroup.freeze"), if frozen { "1" } else { "0" })?;
                if frozen {
                    for _ in 0..250 {
                        let ev =
                            std::fs::read_to_string(b.join("cgroup.events")).unwrap_or_default();
                        if ev.lines().any(|l| l.trim() == "frozen 1") {
                            return Ok(true);
                        }
                        std::thread::sleep(Duration::from_millis(4));
                    }
                    bail!("box did not freeze within a second");
                }
                Ok(true)
            }
        }
    }

    /// Remove the box's cgroups once its processes and its shim are gone.
    pub fn remove(&self) -> Result<()> {
        match self {
            Placement::V1 { dirs } => {
                let mut all: Vec<&PathBuf> = dirs.values().collect();
                all.sort();
                all.dedup();
                for d in all {
                    rmdir_retry(d)?;
                }
                Ok(())
            }
            _ => {
                let Some(r) = self.v2_root() else {
                    return Ok(());
                };
                rmdir_retry(&r.join("box"))?;
                rmdir_retry(&r.join("shim"))?;
                // A systemd scope's own directory is systemd's to remove.
                if matches!(self, Placement::V2 { .. }) {
                    rmdir_retry(r)?;
                }
                Ok(())
            }
        }
    }
}

/// CFS quota for `millicores` (at least 1 ms per period, as the kernel requires).
pub fn cpu_quota_us(millicores: u64) -> u64 {
    (millicores.saturating_mul(CPU_PERIOD_US) / 1000).max(1000)
}

/// v2: `R/shim` holds the caller, `R/box` gets the limits.
fn setup_v2_subtree(r: &Path, limits: &Limits) -> Result<()> {
    let shim = r.join("shim");
    std::fs::create_dir_all(&shim)
        .with_context(|| format!("creating cgroup {}", shim.display()))?;
    write_file(&shim.join("cgroup.procs"), "0")?;
    // The process that started the shim may still be in `R` for a moment
    // (it exits right after forking): retry while the kernel says busy.
    let mut tries = 0;
    loop {
        match enable_controllers(r) {
            Ok(()) => break,
            Err(e)
                if tries < 100
                    && e.chain().any(|c| {
                        c.downcast_ref::<std::io::Error>()
                            .is_some_and(|io| io.raw_os_error() == Some(libc::EBUSY))
                    }) =>
            {
                tries += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e),
        }
    }
    let b = r.join("box");
    std::fs::create_dir_all(&b).with_context(|| format!("creating cgroup {}", b.display()))?;
    write_file(&b.join("memory.max"), &limits.memory_bytes.to_string())?;
    let swap = b.join("memory.swap.max");
    if swap.exists() {
        write_file(&swap, "0")?;
    }
    write_file(
        &b.join("cpu.max"),
        &format!("{} {CPU_PERIOD_US}", cpu_quota_us(limits.cpu_millicores)),
    )?;
    write_file(&b.join("pids.max"), &limits.pids_max.to_string())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quota_has_a_floor_and_scales() {
        assert_eq!(cpu_quota_us(1000), 100_000);
        assert_eq!(cpu_quota_us(250), 25_000);
        assert_eq!(cpu_quota_us(1), 1000);
        assert_eq!(cpu_quota_us(4000), 400_000);
    }

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mountinfo(r"/a\040b"), "/a b");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
        assert_eq!(unescape_mountinfo(r"/x\"), r"/x\");
    }

    #[test]
    fn scope_command_is_delegated_and_collected() {
        let id = uuid::Uuid::nil();
        let a = systemd_run_args(&id);
        assert!(a.contains(&"--scope".to_string()));
        assert!(a.contains(&"--property=Delegate=yes".to_string()));
        assert!(a.contains(&format!("--unit=boxlite-box-{id}.scope")));
        assert_eq!(a.last().unwrap(), "--");
    }

    /// Moving every process of a cgroup into its `agent` leaf, on a real
    /// cgroup2 hierarchy (this host mounts one without controllers at
    /// /sys/fs/cgroup/unified; the v1 hierarchies hold the controllers).
    #[test]
    fn move_into_leaf_on_a_real_cgroup2_hierarchy() {
        let root = Path::new("/sys/fs/cgroup/unified");
        if !root.join("cgroup.procs").exists() {
            eprintln!("no cgroup2 hierarchy at {}; skipped", root.display());
            return;
        }
        let dir = root.join(format!("boxlite-test-{:08x}", rand::random::<u32>()));
        std::fs::create_dir(&dir).unwrap();
        let mut children: Vec<std::process::Child> = (0..3)
            .map(|_| {
                std::process::Command::new("sleep")
                    .arg("30")
                    .spawn()
                    .unwrap()
            })
            .collect();
        for c in &children {
            write_file(&dir.join("cgroup.procs"), &c.id().to_string()).unwrap();
        }
        let res = move_into_leaf(&dir);
        let leaf_procs = std::fs::read_to_string(dir.join("agent/cgroup.procs")).unwrap();
        let left = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap();
        for c in &mut children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = rmdir_retry(&dir.join("agent"));
        let _ = rmdir_retry(&dir);
        res.unwrap();
        assert!(left.trim().is_empty(), "{left}");
        for c in &children {
            assert!(
                leaf_procs
                    .split_whitespace()
                    .any(|p| p == c.id().to_string())
            );
        }
    }

    /// The v2 writes, checked against a directory that stands in for cgroupfs
    /// (this host runs cgroup v1, so the real v2 files are not available).
    #[test]
    fn v2_subtree_layout_and_limits() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path().join("r");
        std::fs::create_dir_all(r.join("shim")).unwrap();
        std::fs::create_dir_all(r.join("box")).unwrap();
        for f in [
            "shim/cgroup.procs",
            "cgroup.subtree_control",
            "box/memory.max",
            "box/memory.swap.max",
            "box/cpu.max",
            "box/pids.max",
        ] {
            std::fs::write(r.join(f), "").unwrap();
        }
        setup_v2_subtree(
            &r,
            &Limits {
                memory_bytes: 256 << 20,
                cpu_millicores: 500,
                pids_max: 77,
            },
        )
        .unwrap();
        let rd = |f: &str| std::fs::read_to_string(r.join(f)).unwrap();
        assert_eq!(rd("shim/cgroup.procs"), "0");
        assert_eq!(rd("cgroup.subtree_control"), "+memory +cpu +pids");
        assert_eq!(rd("box/memory.max"), (256u64 << 20).to_string());
        assert_eq!(rd("box/memory.swap.max"), "0");
        assert_eq!(rd("box/cpu.max"), "50000 100000");
        assert_eq!(rd("box/pids.max"), "77");
        let p = Placement::V2 { dir: r.clone() };
        assert_eq!(p.box_dirs(), vec![r.join("box")]);
    }
}
