//! Box lifecycle on this runner: create, start, stop, delete, re-adoption
//! after an agent restart, and what is reported to the control plane.
//!
//! Each box has a directory `<state>/boxes/<id>/` holding `box.json` (its
//! spec and desired state, written atomically), `launch.json` (what its shim
//! runs), the overlay `upper/` and `work/` directories, `shim.sock` and
//! `shim.log`. A running box is exactly a live shim: on start the agent asks
//! every shim socket it finds, and the boxes that answer are re-adopted.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use std::net::Ipv4Addr;
use std::sync::OnceLock;

use anyhow::{Context, Result, anyhow};
use protocol::{BoxReport, BoxSpec, BoxState, Resources};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::cgroups::{Hierarchy, Limits, Placement};
use crate::config::{Config, Layout};
use crate::ids::{IdPool, IdRange};
use crate::images::ImageStore;
use crate::ipc::{self, ShimInfo};
use crate::network::{EgressLaunch, NetPlan};
use crate::sandbox::BoxLaunch;
use crate::sys;

/// Smallest memory limit a box may have.
pub const MIN_MEMORY_MIB: u64 = 16;
/// Most entries of one box's egress allow-list.
pub const MAX_EGRESS_ALLOW: usize = 64;

/// An error with an API code, so the HTTP layer can answer precisely.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct BoxError {
    /// `not_found`, `conflict`, `bad_request`, `unavailable`, `internal`.
    pub code: &'static str,
    /// Explanation.
    pub message: String,
}

impl BoxError {
    /// A new error.
    pub fn new(code: &'static str, message: impl Into<String>) -> BoxError {
        BoxError {
            code,
            message: message.into(),
        }
    }
}

fn not_found(id: &Uuid) -> anyhow::Error {
    BoxError::new("not_found", format!("no box {id} on this runner")).into()
}

/// What the agent wants a box to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Desired {
    /// Running.
    Running,
    /// Stopped.
    Stopped,
}

/// `box.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BoxRecord {
    /// The spec it was created with.
    pub spec: BoxSpec,
    /// Creation time (RFC 3339).
    pub created_at: String,
    /// Desired state.
    pub desired: Desired,
    /// Its cgroups while it runs.
    #[serde(default)]
    pub placement: Option<Placement>,
    /// Digest of the image it was created from.
    #[serde(default)]
    pub image_digest: String,
    /// Last failure.
    #[serde(default)]
    pub last_error: Option<String>,
    /// Address of an egress box while it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<Ipv4Addr>,
    /// The box's host id range; absent for boxes created before ranges
    /// (they run as the runner's single `box_uid` until their next start).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ids: Option<IdRange>,
}

struct Entry {
    record: BoxRecord,
    state: BoxState,
    error: Option<String>,
    shim: Option<ShimInfo>,
    lock: Arc<tokio::sync::Mutex<()>>,
    cpu_prev: Option<(Instant, u64)>,
    cpu_millicores: u64,
    disk: Option<(Instant, u64)>,
    /// Address reserved for (or held by) the box, egress only.
    address: Option<Ipv4Addr>,
}

/// Where a box's writable layer can be read from.
#[derive(Clone, Debug)]
pub enum UpperSource {
    /// A running box's: through its shim's mount namespace.
    Running(PathBuf),
    /// A stopped box's disk image (to be mounted).
    Disk(PathBuf),
    /// A box from before disks: its directory.
    Dir(PathBuf),
}

/// A box as the admin surface lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BoxSummary {
    /// Id.
    pub id: Uuid,
    /// State.
    pub state: BoxState,
    /// Image.
    pub image: String,
    /// Last error.
    #[serde(default)]
    pub error: Option<String>,
    /// Shim pid while running.
    #[serde(default)]
    pub shim_pid: Option<u32>,
}

/// All boxes of this runner.
pub struct Boxes {
    config: Config,
    layout: Layout,
    images: ImageStore,
    pool: IdPool,
    hierarchy: Hierarchy,
    exe: PathBuf,
    entries: Mutex<HashMap<Uuid, Entry>>,
    adopted: AtomicU32,
    /// Egress networking, once set up (or why it is unavailable).
    net: OnceLock<std::result::Result<NetPlan, String>>,
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Validate a spec from the control plane.
pub fn validate_spec(spec: &BoxSpec) -> Result<()> {
    let bad = |m: String| -> anyhow::Error { BoxError::new("bad_request", m).into() };
    if !crate::images::valid_name(&spec.image) {
        return Err(bad(format!("invalid image name {:?}", spec.image)));
    }
    if spec.resources.memory_mib != 0 && spec.resources.memory_mib < MIN_MEMORY_MIB {
        return Err(bad(format!("memory_mib must be at least {MIN_MEMORY_MIB}")));
    }
    if spec.resources.memory_mib > 1 << 30 || spec.resources.cpu_millicores > 1 << 30 {
        return Err(bad("resources out of range".into()));
    }
    let disk = spec.resources.disk_mib;
    if disk != 0 && !(crate::disk::MIN_MIB..=crate::disk::MAX_MIB).contains(&disk) {
        return Err(bad(format!(
            "disk_mib must be {} to {}",
            crate::disk::MIN_MIB,
            crate::disk::MAX_MIB
        )));
    }
    for (k, v) in &spec.env {
        if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
            return Err(bad(format!("invalid environment variable {k:?}")));
        }
    }
    if spec.env.len() > 4096 {
        return Err(bad("too many environment variables".into()));
    }
    if !spec.egress_allow.is_empty() && !spec.network.is_egress() {
        return Err(bad("egress_allow needs the egress network mode".into()));
    }
    if spec.egress_allow.len() > MAX_EGRESS_ALLOW {
        return Err(bad(format!(
            "egress_allow has more than {MAX_EGRESS_ALLOW} entries"
        )));
    }
    Ok(())
}

impl Boxes {
    /// The manager; `exe` is the runner binary shims are started from.
    pub fn new(config: &Config, hierarchy: Hierarchy, exe: PathBuf) -> Result<Boxes> {
        let layout = config.layout();
        for d in [layout.boxes(), layout.tmp()] {
            std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700))?;
        }
        // Exports and imports a previous agent process did not finish.
        for e in std::fs::read_dir(layout.tmp())?.flatten() {
            let _ = std::fs::remove_file(e.path());
            // A disk mount point of a thread that died with the process.
            let _ = std::fs::remove_dir(e.path());
        }
        Ok(Boxes {
            images: ImageStore::new(&config.image_dir, config.box_uid),
            pool: IdPool::new(config.box_uid, &config.id_claims_dir),
            config: config.clone(),
            layout,
            hierarchy,
            exe,
            entries: Mutex::new(HashMap::new()),
            adopted: AtomicU32::new(0),
            net: OnceLock::new(),
        })
    }

    /// Record the outcome of setting up egress networking (once, at start).
    pub fn set_network(&self, net: std::result::Result<NetPlan, String>) {
        let _ = self.net.set(net);
    }

    /// The egress network, or why a box cannot have one.
    pub fn network(&self) -> std::result::Result<&NetPlan, BoxError> {
        match self.net.get() {
            Some(Ok(p)) => Ok(p),
            Some(Err(why)) => Err(BoxError::new(
                "unavailable",
                format!("egress networking is not available on this runner: {why}"),
            )),
            None => Err(BoxError::new(
                "unavailable",
                "egress networking is not set up yet",
            )),
        }
    }

    /// Addresses and allow-lists of the egress boxes that run (for the nftables table).
    pub fn egress_allowances(&self) -> Vec<(Ipv4Addr, protocol::Ipv4Cidr)> {
        let e = self.entries.lock().unwrap();
        let mut v: Vec<_> = e
            .values()
            .filter(|e| e.state == BoxState::Running)
            .filter_map(|e| e.address.map(|a| (a, e.record.spec.egress_allow.clone())))
            .flat_map(|(a, allow)| allow.into_iter().map(move |c| (a, c)))
            .collect();
        v.sort();
        v
    }

    /// Refuse an egress spec this runner cannot honour: no egress network,
    /// or an allow-list entry outside the stage's.
    fn check_egress(&self, spec: &BoxSpec) -> Result<()> {
        if !spec.network.is_egress() {
            return Ok(());
        }
        self.network()?;
        let outside = protocol::net::outside_of(&spec.egress_allow, &self.config.egress_allow);
        if !outside.is_empty() {
            let list: Vec<String> = outside.iter().map(|c| c.to_string()).collect();
            return Err(BoxError::new(
                "bad_request",
                format!(
                    "egress_allow {} is outside the stage's allow-list",
                    list.join(", ")
                ),
            )
            .into());
        }
        Ok(())
    }

    /// The image store.
    pub fn images(&self) -> &ImageStore {
        &self.images
    }

    /// The host id ranges boxes are given.
    pub fn pool(&self) -> &IdPool {
        &self.pool
    }

    /// Host ids of a box: its range, or the single legacy uid.
    pub fn ids_of(&self, record: &BoxRecord) -> IdRange {
        record.ids.unwrap_or(IdRange {
            base: self.config.box_uid,
            count: 1,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The cgroup layout in use.
    pub fn hierarchy(&self) -> &Hierarchy {
        &self.hierarchy
    }

    /// Boxes found running when this agent process started.
    pub fn adopted(&self) -> u32 {
        self.adopted.load(Ordering::Relaxed)
    }

    fn box_dir(&self, id: &Uuid) -> PathBuf {
        self.layout.box_dir(id)
    }

    /// Persist a box's record: an atomic replace, without fsync. Losing the
    /// last update to a power loss is harmless: the boxes are gone then too,
    /// the control plane re-sends what it wants (level-triggered), and a box
    /// directory left without a record is replaced by the next create.
    fn save(&self, id: &Uuid, rec: &BoxRecord) -> Result<()> {
        sys::write_atomic_nosync(
            &self.box_dir(id).join("box.json"),
            &serde_json::to_vec_pretty(rec)?,
            0o600,
        )
    }

    /// The per-box operation lock (serialises create/start/stop/delete/export/import of one box).
    pub fn lock_of(&self, id: &Uuid) -> Option<Arc<tokio::sync::Mutex<()>>> {
        self.entries.lock().unwrap().get(id).map(|e| e.lock.clone())
    }

    /// Record of a box.
    pub fn record(&self, id: &Uuid) -> Option<BoxRecord> {
        self.entries
            .lock()
            .unwrap()
            .get(id)
            .map(|e| e.record.clone())
    }

    /// Current state of a box.
    pub fn state(&self, id: &Uuid) -> Option<BoxState> {
        self.entries.lock().unwrap().get(id).map(|e| e.state)
    }

    /// Ids of every box.
    pub fn ids(&self) -> Vec<Uuid> {
        let mut v: Vec<Uuid> = self.entries.lock().unwrap().keys().copied().collect();
        v.sort();
        v
    }

    /// Summaries of every box.
    pub fn list(&self) -> Vec<BoxSummary> {
        let e = self.entries.lock().unwrap();
        let mut v: Vec<BoxSummary> = e
            .iter()
            .map(|(id, e)| BoxSummary {
                id: *id,
                state: e.state,
                image: e.record.spec.image.clone(),
                error: e.error.clone(),
                shim_pid: e.shim.as_ref().map(|s| s.shim_pid),
            })
            .collect();
        v.sort_by_key(|b| b.id);
        v
    }

    /// Socket of a running box's shim.
    pub fn shim_socket(&self, id: &Uuid) -> Result<PathBuf> {
        let e = self.entries.lock().unwrap();
        let entry = e.get(id).ok_or_else(|| not_found(id))?;
        if entry.state != BoxState::Running {
            return Err(BoxError::new(
                "conflict",
                format!("box {id} is not running ({:?})", entry.state),
            )
            .into());
        }
        Ok(crate::shim::socket_path(&self.box_dir(id)))
    }

    /// Where box `id`'s writable layer can be read from now.
    pub fn upper_source(&self, id: &Uuid) -> Option<UpperSource> {
        let e = self.entries.lock().unwrap();
        let e = e.get(id)?;
        let dir = self.box_dir(id);
        let image = crate::disk::image_path(&dir);
        Some(match (&e.shim, image.exists()) {
            (Some(s), true) if e.state == BoxState::Running => {
                UpperSource::Running(crate::disk::running_upper(s.shim_pid))
            }
            (_, true) => UpperSource::Disk(image),
            (_, false) => UpperSource::Dir(dir.join("upper")),
        })
    }

    /// Box directory (for export/import).
    pub fn dir_of(&self, id: &Uuid) -> PathBuf {
        self.box_dir(id)
    }

    /// Register a box restored by import (state stopped).
    pub fn register_imported(&self, id: Uuid, record: BoxRecord) {
        self.entries.lock().unwrap().insert(
            id,
            Entry {
                record,
                state: BoxState::Stopped,
                error: None,
                shim: None,
                lock: Arc::new(tokio::sync::Mutex::new(())),
                cpu_prev: None,
                cpu_millicores: 0,
                disk: None,
                address: None,
            },
        );
    }

    /// Load every box from the state directory and re-adopt those whose shim answers.
    pub async fn adopt_all(&self) -> Result<()> {
        let dir = self.layout.boxes();
        let mut found = Vec::new();
        for e in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(".import-") {
                // An import that never finished: nothing refers to it.
                let _ = std::fs::remove_dir_all(e.path());
                continue;
            }
            let Ok(id) = name.parse::<Uuid>() else {
                continue;
            };
            let rec: BoxRecord = match std::fs::read(e.path().join("box.json"))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
            {
                Some(r) => r,
                None => {
                    tracing::warn!(%id, "box directory without a readable box.json; ignoring it");
                    continue;
                }
            };
            found.push((id, rec));
        }
        for (id, mut rec) in found {
            let sock = crate::shim::socket_path(&self.box_dir(&id));
            let info = if sock.exists() {
                ipc::hello(&sock).await.ok().filter(|i| i.box_id == id)
            } else {
                None
            };
            let (state, error) = match (&info, rec.desired) {
                (Some(i), _) => {
                    self.adopted.fetch_add(1, Ordering::Relaxed);
                    // The agent may have died between starting the shim and
                    // recording where the box's cgroups are.
                    if rec.placement.is_none() {
                        rec.placement = Some(match self.hierarchy.placement_for(&id) {
                            Placement::SystemdScope { unit, .. } => Placement::SystemdScope {
                                unit,
                                dir: i.cgroup_dir.clone(),
                            },
                            p => p,
                        });
                        rec.desired = Desired::Running;
                        let _ = self.save(&id, &rec);
                    }
                    (BoxState::Running, None)
                }
                (None, Desired::Running) => {
                    if let Some(p) = &rec.placement {
                        let _ = p.remove();
                    }
                    (
                        BoxState::Stopped,
                        Some("the box was not running when the agent started (host restart or shim failure)".to_string()),
                    )
                }
                (None, Desired::Stopped) => (BoxState::Stopped, None),
            };
            // The agent may have died before recording a running box's address.
            if info.is_some() && rec.address.is_none() {
                rec.address = std::fs::read(crate::shim::launch_path(&self.box_dir(&id)))
                    .ok()
                    .and_then(|b| serde_json::from_slice::<BoxLaunch>(&b).ok())
                    .and_then(|l| l.egress.map(|e| e.address));
            }
            if info.is_none() {
                rec.address = None;
            }
            let address = rec.address;
            tracing::info!(%id, ?state, "box loaded");
            self.entries.lock().unwrap().insert(
                id,
                Entry {
                    record: rec,
                    state,
                    error,
                    shim: info,
                    lock: Arc::new(tokio::sync::Mutex::new(())),
                    cpu_prev: None,
                    cpu_millicores: 0,
                    disk: None,
                    address,
                },
            );
        }
        Ok(())
    }

    /// Create a box and start it. Idempotent for the same spec.
    pub async fn create(&self, spec: BoxSpec) -> Result<()> {
        validate_spec(&spec)?;
        self.check_egress(&spec)?;
        let id = spec.id;
        let image = self.images.get(&spec.image).ok_or_else(|| {
            BoxError::new(
                "bad_request",
                format!("image {:?} is not on this runner", spec.image),
            )
        })?;
        let record = BoxRecord {
            spec: spec.clone(),
            created_at: now_rfc3339(),
            desired: Desired::Running,
            placement: None,
            image_digest: image.digest,
            last_error: None,
            address: None,
            ids: None,
        };
        // Claim the id under the map's lock, holding the box's operation lock,
        // so two concurrent creates of one id never both build it.
        let lock = Arc::new(tokio::sync::Mutex::new(()));
        let guard = lock.clone().try_lock_owned().expect("fresh lock");
        let existing = {
            let mut e = self.entries.lock().unwrap();
            match e.get(&id) {
                Some(old) => Some(old.record.spec.clone()),
                None => {
                    e.insert(
                        id,
                        Entry {
                            record: record.clone(),
                            state: BoxState::Pending,
                            error: None,
                            shim: None,
                            lock: lock.clone(),
                            cpu_prev: None,
                            cpu_millicores: 0,
                            disk: None,
                            address: None,
                        },
                    );
                    None
                }
            }
        };
        if let Some(old) = existing {
            if old != spec {
                return Err(BoxError::new(
                    "conflict",
                    format!("box {id} exists with a different spec"),
                )
                .into());
            }
            return self.start(&id).await;
        }
        let dir = self.box_dir(&id);
        // A directory without a record is what a crash (or power loss) during
        // an earlier create of this id leaves: nothing refers to it.
        if !dir.join("box.json").exists() && dir.exists() {
            tracing::warn!(%id, "removing an unfinished box directory");
            let _ = std::fs::remove_dir_all(&dir);
        }
        let mut record = record;
        let res = (|| -> Result<()> {
            std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
            let ids = self.pool.claim(&dir, &id)?;
            record.ids = Some(ids);
            crate::disk::create(
                &self.layout.disk_templates(),
                &crate::disk::image_path(&dir),
                self.disk_mib(&spec),
            )?;
            if let Some(e) = self.entries.lock().unwrap().get_mut(&id) {
                e.record.ids = Some(ids);
            }
            self.save(&id, &record)
        })();
        if let Err(e) = res {
            // An existing directory is someone else's (an import, a leftover): not ours to remove.
            if !e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::AlreadyExists)
            }) {
                let _ = std::fs::remove_dir_all(&dir);
            }
            self.entries.lock().unwrap().remove(&id);
            return Err(e);
        }
        drop(guard);
        self.start(&id).await
    }

    /// The size of a box's disk, MiB.
    pub fn disk_mib(&self, spec: &BoxSpec) -> u64 {
        if spec.resources.disk_mib == 0 {
            self.config.default_disk_mib
        } else {
            spec.resources.disk_mib
        }
    }

    fn limits(&self, spec: &BoxSpec) -> Limits {
        let mem = if spec.resources.memory_mib == 0 {
            self.config.default_memory_mib
        } else {
            spec.resources.memory_mib
        };
        let cpu = if spec.resources.cpu_millicores == 0 {
            self.config.default_cpu_millicores
        } else {
            spec.resources.cpu_millicores
        };
        Limits {
            memory_bytes: mem << 20,
            cpu_millicores: cpu,
            pids_max: self.config.pids_per_box,
        }
    }

    /// Start a stopped box (no-op when it runs).
    pub async fn start(&self, id: &Uuid) -> Result<()> {
        let lock = self.lock_of(id).ok_or_else(|| not_found(id))?;
        let _g = lock.lock().await;
        let (mut record, state) = {
            let e = self.entries.lock().unwrap();
            let e = e.get(id).ok_or_else(|| not_found(id))?;
            (e.record.clone(), e.state)
        };
        if state == BoxState::Running {
            return Ok(());
        }
        let res = self.launch(id, &mut record).await;
        let mut entries = self.entries.lock().unwrap();
        let Some(e) = entries.get_mut(id) else {
            return Err(not_found(id));
        };
        match res {
            Ok(info) => {
                e.state = BoxState::Running;
                e.error = None;
                e.shim = Some(info);
                e.cpu_prev = None;
                e.record = record;
                Ok(())
            }
            Err(err) => {
                e.state = BoxState::Error;
                e.error = Some(format!("{err:#}"));
                record.last_error = e.error.clone();
                e.record = record.clone();
                let _ = self.save(id, &record);
                Err(err)
            }
        }
    }

    async fn launch(&self, id: &Uuid, record: &mut BoxRecord) -> Result<ShimInfo> {
        let egress = self.reserve_egress(id, &record.spec)?;
        let res = self.launch_shim(id, record, egress).await;
        if res.is_err() {
            self.release_egress(id);
        }
        res
    }

    /// An address and interface for an egress box (nothing for `none`), its
    /// allow-list added to the runner's table.
    fn reserve_egress(&self, id: &Uuid, spec: &BoxSpec) -> Result<Option<EgressLaunch>> {
        if !spec.network.is_egress() {
            return Ok(None);
        }
        self.check_egress(spec)?;
        let plan = self.network()?;
        let address = {
            let mut e = self.entries.lock().unwrap();
            let used: std::collections::BTreeSet<Ipv4Addr> = e
                .iter()
                .filter(|(other, _)| *other != id)
                .filter_map(|(_, e)| e.address)
                .collect();
            let a = plan.allocate(&used).ok_or_else(|| {
                BoxError::new(
                    "unavailable",
                    format!("every address of {} is in use", plan.subnet),
                )
            })?;
            if let Some(entry) = e.get_mut(id) {
                entry.address = Some(a);
            }
            a
        };
        if let Err(err) =
            crate::network::nft(&plan.allow_elements(true, address, &spec.egress_allow))
        {
            self.release_egress(id);
            return Err(err.context("adding the box's allow-list"));
        }
        Ok(Some(EgressLaunch {
            address,
            gateway: plan.gateway(),
            host_iface: plan.host_iface(id),
            group: plan.group,
        }))
    }

    /// Give back an egress box's address and remove its allow-list.
    fn release_egress(&self, id: &Uuid) {
        let taken = {
            let mut e = self.entries.lock().unwrap();
            e.get_mut(id).and_then(|e| {
                e.address
                    .take()
                    .map(|a| (a, e.record.spec.egress_allow.clone()))
            })
        };
        if let (Some((address, allow)), Ok(plan)) = (taken, self.network())
            && let Err(err) = crate::network::nft(&plan.allow_elements(false, address, &allow))
        {
            tracing::warn!(%id, "removing the box's allow-list: {err:#}");
        }
    }

    /// The box's id range and disk, made right before it starts: a box whose
    /// range another box took meanwhile, or from before ranges, gets a new
    /// range and its files move into it; a box from before disks gets one,
    /// its writable directory copied onto it (ids shifted on the way).
    /// Saved in the record.
    fn ensure_ids_and_disk(&self, id: &Uuid, record: &mut BoxRecord) -> Result<IdRange> {
        let dir = self.box_dir(id);
        let image = crate::disk::image_path(&dir);
        let old = self.ids_of(record);
        let kept = match record.ids {
            Some(r) => self.pool.confirm(r, &dir)?,
            None => false,
        };
        let ids = if kept {
            old
        } else {
            self.pool.claim(&dir, id)?
        };
        if image.exists() {
            if ids != old {
                let n = crate::disk::with_mounted(&image, &self.layout.tmp(), false, move |m| {
                    crate::ids::shift_tree(&m.join("upper"), old, ids)
                })
                .context("moving the box's files into its id range")?;
                tracing::info!(%id, from = old.base, to = ids.base, entries = n, "box moved to an id range of its own");
            }
        } else {
            self.migrate_to_disk(&dir, old, ids, self.disk_mib(&record.spec))
                .context("moving the box's files onto a disk of its own")?;
        }
        if record.ids != Some(ids) {
            record.ids = Some(ids);
            self.save(id, record)?;
            if let Some(e) = self.entries.lock().unwrap().get_mut(id) {
                e.record.ids = Some(ids);
            }
        }
        Ok(ids)
    }

    /// Give a box from before disks one: its `upper/` directory (owned by
    /// `old`) is archived and restored onto a new disk in range `ids`, then
    /// removed. Interrupted, it starts over (the disk is made anew).
    fn migrate_to_disk(&self, dir: &Path, old: IdRange, ids: IdRange, mib: u64) -> Result<()> {
        let image = crate::disk::image_path(dir);
        let partial = dir.join("disk.img.partial");
        let _ = std::fs::remove_file(&partial);
        crate::disk::create(&self.layout.disk_templates(), &partial, mib)?;
        let upper = dir.join("upper");
        let scratch = self.layout.tmp();
        let archive = scratch.join(format!("migrate-{:08x}.tar", rand::random::<u32>()));
        let res = (|| -> Result<()> {
            if upper.is_dir() {
                let f = std::fs::File::create(&archive)?;
                let mut b = tar::Builder::new(std::io::BufWriter::new(f));
                crate::layers::write_upper(&mut b, &upper, "upper", old.base)?;
                std::io::Write::flush(&mut b.into_inner()?)?;
            }
            let a = archive.clone();
            let has_archive = upper.is_dir();
            crate::disk::with_mounted(&partial, &scratch, false, move |m| {
                let _ = std::fs::remove_dir_all(m.join("lost+found"));
                if has_archive {
                    let root = crate::disk::open_root(m)?;
                    crate::layers::apply_at(
                        std::io::BufReader::new(std::fs::File::open(&a)?),
                        &root,
                        &crate::layers::ApplyOptions {
                            whiteouts: crate::layers::WhiteoutMode::Overlay,
                            ids,
                            max_bytes: u64::MAX,
                            max_entries: u64::MAX,
                        },
                    )?;
                }
                crate::disk::prepare_layers(m, ids.base)?;
                Ok(())
            })?;
            std::fs::rename(&partial, &image)?;
            Ok(())
        })();
        let _ = std::fs::remove_file(&archive);
        if let Err(e) = res {
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
        for d in ["upper", "work"] {
            let _ = std::fs::remove_dir_all(dir.join(d));
        }
        tracing::info!(dir = %dir.display(), "box moved onto a disk of its own");
        Ok(())
    }

    async fn launch_shim(
        &self,
        id: &Uuid,
        record: &mut BoxRecord,
        egress: Option<EgressLaunch>,
    ) -> Result<ShimInfo> {
        let ids = self.ensure_ids_and_disk(id, record)?;
        let spec = &record.spec;
        let image = self.images.get(&spec.image).ok_or_else(|| {
            BoxError::new(
                "bad_request",
                format!("image {:?} is not on this runner", spec.image),
            )
        })?;
        let dir = self.box_dir(id);
        let mut env = crate::images::env_map(&image);
        for (k, v) in &spec.env {
            env.insert(k.clone(), v.clone());
        }
        let placement = self.hierarchy.placement_for(id);
        let launch = BoxLaunch {
            id: *id,
            lower: self.images.rootfs(&spec.image),
            disk: crate::disk::image_path(&dir),
            egress: egress.clone(),
            hostname: format!("box-{}", &id.simple().to_string()[..12]),
            env,
            placement: placement.clone(),
            limits: self.limits(spec),
            ids,
            lower_ids: self.images.ids_of(&image),
            nofile: self.config.nofile_per_process,
            bwrap: self.config.bwrap_path.clone(),
            max_sessions: self.config.max_sessions_per_box,
        };
        sys::write_atomic_nosync(
            &crate::shim::launch_path(&dir),
            &serde_json::to_vec_pretty(&launch)?,
            0o600,
        )?;
        let exe = if self.exe.exists() {
            self.exe.clone()
        } else {
            PathBuf::from("/proc/self/exe")
        };
        let (program, prefix) = match &self.hierarchy {
            Hierarchy::Systemd { systemd_run } => (
                vec![systemd_run.clone(), exe],
                crate::cgroups::systemd_run_args(id),
            ),
            _ => (vec![exe], vec![]),
        };
        let t0 = Instant::now();
        let info = crate::shim::launch(&program, &prefix, &dir, &dir.join("shim.log"))
            .await
            .with_context(|| format!("starting box {id}"))?;
        tracing::debug!(%id, shim_ms = t0.elapsed().as_secs_f64() * 1e3, "shim ready");
        record.placement = Some(match placement {
            Placement::SystemdScope { unit, .. } => Placement::SystemdScope {
                unit,
                dir: info.cgroup_dir.clone(),
            },
            p => p,
        });
        record.desired = Desired::Running;
        record.last_error = None;
        record.address = egress.map(|e| e.address);
        self.save(id, record)?;
        Ok(info)
    }

    /// Stop a running box (no-op when stopped).
    pub async fn stop(&self, id: &Uuid) -> Result<()> {
        let lock = self.lock_of(id).ok_or_else(|| not_found(id))?;
        let _g = lock.lock().await;
        self.stop_locked(id).await
    }

    async fn stop_locked(&self, id: &Uuid) -> Result<()> {
        let (mut record, shim) = {
            let e = self.entries.lock().unwrap();
            let e = e.get(id).ok_or_else(|| not_found(id))?;
            (e.record.clone(), e.shim.clone())
        };
        let sock = crate::shim::socket_path(&self.box_dir(id));
        if sock.exists() {
            let grace = Duration::from_secs(self.config.stop_grace_secs);
            if let Err(e) = ipc::stop(&sock, grace).await {
                tracing::warn!(%id, "stopping through the shim failed ({e:#}); killing it");
                if let Some(s) = &shim
                    && sys::process_alive(s.shim_pid, Some(s.shim_start_time))
                {
                    // The box dies with its shim (bubblewrap --die-with-parent).
                    unsafe { libc::kill(s.shim_pid as i32, libc::SIGKILL) };
                }
            }
        }
        // Wait for the shim to be gone before removing cgroups.
        if let Some(s) = &shim {
            for _ in 0..200 {
                if !sys::process_alive(s.shim_pid, Some(s.shim_start_time)) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        let _ = std::fs::remove_file(&sock);
        if let Some(p) = &record.placement
            && let Err(e) = p.remove()
        {
            tracing::warn!(%id, "removing cgroups: {e:#}");
        }
        self.release_egress(id);
        record.desired = Desired::Stopped;
        record.placement = None;
        record.address = None;
        self.save(id, &record)?;
        let mut entries = self.entries.lock().unwrap();
        if let Some(e) = entries.get_mut(id) {
            e.state = BoxState::Stopped;
            e.shim = None;
            e.error = None;
            e.record = record;
        }
        Ok(())
    }

    /// Stop (if needed) and delete a box with all its files. Missing boxes are fine.
    pub async fn delete(&self, id: &Uuid) -> Result<()> {
        let Some(lock) = self.lock_of(id) else {
            return Ok(());
        };
        let _g = lock.lock().await;
        self.stop_locked(id).await?;
        let dir = self.box_dir(id);
        let ids = self.record(id).and_then(|r| r.ids);
        // remove_dir_all never follows the box's symlinks.
        tokio::task::spawn_blocking(move || std::fs::remove_dir_all(&dir))
            .await
            .map_err(|e| anyhow!("{e}"))?
            .or_else(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    Ok(())
                } else {
                    Err(e)
                }
            })
            .context("removing the box's files")?;
        if let Some(r) = ids {
            self.pool.release(r, &self.box_dir(id));
        }
        self.entries.lock().unwrap().remove(id);
        Ok(())
    }

    /// Notice boxes whose shim died (crash, OOM of the shim, host trouble) and mark them stopped.
    pub fn refresh(&self) {
        let mut dead = Vec::new();
        {
            let e = self.entries.lock().unwrap();
            for (id, e) in e.iter() {
                if e.state == BoxState::Running
                    && let Some(s) = &e.shim
                    && !sys::process_alive(s.shim_pid, Some(s.shim_start_time))
                {
                    dead.push(*id);
                }
            }
        }
        for id in dead {
            let lock = self.lock_of(&id);
            // Skip boxes busy with an operation; the next refresh sees them.
            let Some(lock) = lock else { continue };
            let Ok(_g) = lock.try_lock() else { continue };
            let mut entries = self.entries.lock().unwrap();
            if let Some(e) = entries.get_mut(&id)
                && e.state == BoxState::Running
            {
                tracing::warn!(%id, "the box's shim is gone; marking it stopped");
                if let Some(p) = &e.record.placement {
                    let _ = p.remove();
                }
                e.state = BoxState::Stopped;
                e.error = Some("the box stopped unexpectedly (its shim exited)".into());
                e.shim = None;
                e.record.placement = None;
                e.record.address = None;
                e.record.last_error = e.error.clone();
                let _ = self.save(&id, &e.record);
                drop(entries);
                self.release_egress(&id);
            }
        }
    }

    /// Every box with its state and usage, for the healthcheck.
    pub fn reports(&self) -> Vec<BoxReport> {
        let mut out = Vec::new();
        let mut entries = self.entries.lock().unwrap();
        for (id, e) in entries.iter_mut() {
            let mut usage = Resources::default();
            if e.state == BoxState::Running
                && let Some(p) = &e.record.placement
            {
                let u = p.usage();
                usage.memory_mib = u.memory_bytes.div_ceil(1 << 20);
                let now = Instant::now();
                if let Some((t, prev)) = e.cpu_prev {
                    let dt = now.duration_since(t).as_micros() as u64;
                    if let Some(m) = (u.cpu_usec.saturating_sub(prev) * 1000).checked_div(dt) {
                        e.cpu_millicores = m;
                    }
                }
                e.cpu_prev = Some((now, u.cpu_usec));
                usage.cpu_millicores = e.cpu_millicores;
            }
            usage.disk_mib = e.disk.map(|(_, b)| b.div_ceil(1 << 20)).unwrap_or(0);
            out.push(BoxReport {
                id: *id,
                state: e.state,
                usage,
                error: e.error.clone(),
            });
        }
        out.sort_by_key(|r| r.id);
        out
    }

    /// Recompute disk usage of boxes whose figure is older than `max_age` (walks the upper dirs).
    pub async fn refresh_disk(&self, max_age: Duration) {
        let stale: Vec<(Uuid, PathBuf)> = {
            let e = self.entries.lock().unwrap();
            e.iter()
                .filter(|(_, e)| e.disk.is_none_or(|(t, _)| t.elapsed() > max_age))
                .map(|(id, _)| (*id, self.box_dir(id).join("upper")))
                .collect()
        };
        for (id, upper) in stale {
            // A box's disk image: its allocated blocks are what it takes of
            // the host. A box from before disks: walk its directory.
            let image = crate::disk::image_path(upper.parent().unwrap_or(&upper));
            let bytes = match crate::disk::usage_bytes(&image) {
                Some(b) => b,
                None => tokio::task::spawn_blocking(move || du(&upper, 0))
                    .await
                    .unwrap_or(0),
            };
            if let Some(e) = self.entries.lock().unwrap().get_mut(&id) {
                e.disk = Some((Instant::now(), bytes));
            }
        }
    }

    /// Number of boxes running.
    pub fn running(&self) -> u32 {
        self.entries
            .lock()
            .unwrap()
            .values()
            .filter(|e| e.state == BoxState::Running)
            .count() as u32
    }

    /// Ids of running boxes.
    pub fn running_ids(&self) -> HashSet<Uuid> {
        self.entries
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, e)| e.state == BoxState::Running)
            .map(|(id, _)| *id)
            .collect()
    }

    /// True if a box with this id exists here.
    pub fn exists(&self, id: &Uuid) -> bool {
        self.entries.lock().unwrap().contains_key(id) || self.box_dir(id).exists()
    }

    /// Placement of a running box (for freezing during export).
    pub fn placement(&self, id: &Uuid) -> Option<Placement> {
        let e = self.entries.lock().unwrap();
        let e = e.get(id)?;
        (e.state == BoxState::Running)
            .then(|| e.record.placement.clone())
            .flatten()
    }
}

/// Bytes allocated below `dir` (not following symlinks, not crossing into other filesystems).
fn du(dir: &Path, depth: usize) -> u64 {
    use std::os::unix::fs::MetadataExt;
    if depth > 256 {
        return 0;
    }
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut total = 0;
    for e in rd.flatten() {
        let Ok(m) = e.path().symlink_metadata() else {
            continue;
        };
        total += m.blocks() * 512;
        if m.is_dir() {
            total += du(&e.path(), depth + 1);
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> BoxSpec {
        BoxSpec {
            id: Uuid::new_v4(),
            image: "default".into(),
            resources: Resources {
                cpu_millicores: 500,
                memory_mib: 128,
                disk_mib: 100,
            },
            env: std::collections::BTreeMap::new(),
            network: protocol::NetworkMode::None,
            egress_allow: vec![],
        }
    }

    #[test]
    fn validates_specs() {
        assert!(validate_spec(&spec()).is_ok());
        let mut s = spec();
        s.image = "../etc".into();
        assert!(validate_spec(&s).is_err());
        let mut s = spec();
        s.resources.memory_mib = 4;
        assert!(validate_spec(&s).is_err());
        let mut s = spec();
        s.env.insert("A=B".into(), "x".into());
        assert!(validate_spec(&s).is_err());
        let mut s = spec();
        s.env.insert("A".into(), "x\0y".into());
        assert!(validate_spec(&s).is_err());
    }
}
