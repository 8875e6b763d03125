//! Runners: registration, state, the healthcheck loop that converges each
//! runner on the desired state of its boxes, drain and decommission.

use std::collections::{HashMap, HashSet};

use protocol::{
    BoxReport, BoxSpec, BoxState, HealthcheckRequest, HealthcheckResponse, RegisterRunnerRequest,
    RegisterRunnerResponse, Resources, RunnerAction, RunnerInfo, RunnerState,
};
use sqlx::Row;
use sqlx::any::AnyRow;
use uuid::Uuid;

use crate::auth::RunnerIdentity;
use crate::boxes::{parse_state, state_str};
use crate::clock::{Millis, from_millis};
use crate::db::{get_flag, get_opt_uuid, get_u64, get_uuid, retry, to_i64};
use crate::error::{Error, Result};
use crate::scheduler::Candidate;
use crate::state::AppState;
use crate::tokens;

/// Columns read into [`RunnerRow`].
pub const RUNNER_COLS: &str = "id, name, draining, decommissioned_at, version, address, binary_sha256, \
    capacity_cpu, capacity_memory, capacity_disk, usage_cpu, usage_memory, usage_disk, \
    alloc_cpu, alloc_memory, alloc_disk, alloc_boxes, last_seen_at";

/// Most boxes one healthcheck may report.
pub const MAX_REPORTED_BOXES: usize = 50_000;
/// Longest error text stored per box.
const MAX_ERROR_LEN: usize = 2000;

/// A runner as stored.
#[derive(Clone, Debug)]
pub struct RunnerRow {
    /// Id.
    pub id: Uuid,
    /// Name.
    pub name: String,
    /// Marked draining.
    pub draining: bool,
    /// Decommissioned.
    pub decommissioned: bool,
    /// Reported version.
    pub version: Option<String>,
    /// Reported address.
    pub address: Option<String>,
    /// Reported SHA-256 of its binary.
    pub binary_sha256: Option<String>,
    /// Reported capacity.
    pub capacity: Resources,
    /// Reported usage.
    pub usage: Resources,
    /// Allocated to its boxes.
    pub allocated: Resources,
    /// Live boxes pinned to it.
    pub boxes: u64,
    /// Last healthcheck.
    pub last_seen_at: Option<Millis>,
}

impl RunnerRow {
    /// Read a row selected with [`RUNNER_COLS`].
    pub fn from_row(r: &AnyRow) -> Result<Self> {
        let decommissioned_at: Option<i64> = r.try_get("decommissioned_at")?;
        Ok(RunnerRow {
            id: get_uuid(r, "id")?,
            name: r.try_get("name")?,
            draining: get_flag(r, "draining")?,
            decommissioned: decommissioned_at.is_some(),
            version: r.try_get("version")?,
            address: r.try_get("address")?,
            binary_sha256: r.try_get("binary_sha256")?,
            capacity: resources(r, "capacity")?,
            usage: resources(r, "usage")?,
            allocated: resources(r, "alloc")?,
            boxes: get_u64(r, "alloc_boxes")?,
            last_seen_at: r.try_get("last_seen_at")?,
        })
    }

    /// State given that runners last seen before `cutoff` are unresponsive.
    pub fn state(&self, cutoff: Millis) -> RunnerState {
        if self.decommissioned {
            return RunnerState::Decommissioned;
        }
        match self.last_seen_at {
            None => RunnerState::Initializing,
            Some(t) if t < cutoff => RunnerState::Unresponsive,
            Some(_) if self.draining => RunnerState::Draining,
            Some(_) => RunnerState::Ready,
        }
    }

    /// The admin view.
    pub fn info(&self, cutoff: Millis) -> RunnerInfo {
        RunnerInfo {
            id: self.id,
            name: self.name.clone(),
            state: self.state(cutoff),
            version: self.version.clone(),
            address: self.address.clone(),
            binary_sha256: self.binary_sha256.clone(),
            capacity: self.capacity,
            usage: self.usage,
            allocated: self.allocated,
            draining: self.draining,
            boxes: u32::try_from(self.boxes).unwrap_or(u32::MAX),
            last_seen_at: self.last_seen_at.map(from_millis),
        }
    }

    /// As a placement candidate.
    pub fn candidate(&self) -> Candidate {
        Candidate {
            id: self.id,
            name: self.name.clone(),
            capacity: self.capacity,
            allocated: self.allocated,
            usage: self.usage,
            boxes: self.boxes,
        }
    }
}

fn resources(r: &AnyRow, prefix: &str) -> Result<Resources> {
    Ok(Resources {
        cpu_millicores: get_u64(r, &format!("{prefix}_cpu"))?,
        memory_mib: get_u64(r, &format!("{prefix}_memory"))?,
        disk_mib: get_u64(r, &format!("{prefix}_disk"))?,
    })
}

/// Runner names: 1-63 of letters, digits, `-`, `_`, `.`, starting with a letter or digit.
pub fn validate_runner_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(Error::bad_request(
            "invalid_name",
            "runner names are 1-63 letters, digits, '-', '_' or '.', starting with a letter or digit",
        ))
    }
}

/// Outcome of a registration.
#[derive(Debug)]
pub struct Registered {
    /// The answer.
    pub response: RegisterRunnerResponse,
    /// True when a runner was created (or a decommissioned one came back).
    pub created: bool,
}

/// Register runner `req.name` (admin). See the module docs of `api` for the rules.
pub async fn register(state: &AppState, req: &RegisterRunnerRequest) -> Result<Registered> {
    validate_runner_name(&req.name)?;
    let given_hash = match &req.token_sha256 {
        Some(h) if tokens::is_sha256_hex(h.trim()) => Some(h.trim().to_ascii_lowercase()),
        Some(_) => {
            return Err(Error::bad_request(
                "invalid_token_sha256",
                "token_sha256 must be the SHA-256 of the token as 64 hex characters",
            ));
        }
        None => None,
    };
    let minted = match given_hash {
        Some(_) => None,
        None => Some(tokens::generate(protocol::RUNNER_TOKEN_PREFIX)),
    };
    let hash =
        given_hash.unwrap_or_else(|| tokens::sha256_hex(minted.as_deref().unwrap_or_default()));

    let res = retry(|| async {
        let now = state.clock.now_ms();
        let cutoff = state.responsive_cutoff(now);
        let mut tx = state.db.begin().await?;
        let existing = sqlx::query("SELECT id, token_sha256, decommissioned_at FROM runners WHERE name = $1")
            .bind(&req.name)
            .fetch_optional(&mut *tx)
            .await?;
        let (id, created) = match existing {
            None => {
                let id = Uuid::now_v7();
                sqlx::query(
                    "INSERT INTO runners (id, name, token_sha256, api_key, created_at, updated_at) \
                     VALUES ($1, $2, $3, $4, $5, $5)",
                )
                .bind(id.to_string())
                .bind(&req.name)
                .bind(&hash)
                .bind(tokens::generate(protocol::RUNNER_API_KEY_PREFIX))
                .bind(now)
                .execute(&mut *tx)
                .await?;
                (id, true)
            }
            Some(row) => {
                let id = get_uuid(&row, "id")?;
                let stored: String = row.try_get("token_sha256")?;
                let decommissioned: Option<i64> = row.try_get("decommissioned_at")?;
                if decommissioned.is_none() {
                    if minted.is_none() && stored == hash {
                        (id, false)
                    } else {
                        return Err(Error::conflict(
                            "runner_exists",
                            format!(
                                "runner {:?} is registered with another token; decommission it first to register it again",
                                req.name
                            ),
                        ));
                    }
                } else {
                    // A decommissioned runner comes back fresh: new token, new API key, no history.
                    sqlx::query(
                        "UPDATE runners SET token_sha256 = $1, api_key = $2, agent_instance = NULL, draining = 0, decommissioned_at = NULL, \
                         version = NULL, address = NULL, binary_sha256 = NULL, capacity_cpu = 0, capacity_memory = 0, capacity_disk = 0, \
                         usage_cpu = 0, usage_memory = 0, usage_disk = 0, alloc_cpu = 0, alloc_memory = 0, \
                         alloc_disk = 0, alloc_boxes = 0, last_seen_at = NULL, updated_at = $3 WHERE id = $4",
                    )
                    .bind(&hash)
                    .bind(tokens::generate(protocol::RUNNER_API_KEY_PREFIX))
                    .bind(now)
                    .bind(id.to_string())
                    .execute(&mut *tx)
                    .await?;
                    (id, true)
                }
            }
        };
        let row = sqlx::query(&format!("SELECT {RUNNER_COLS} FROM runners WHERE id = $1"))
            .bind(id.to_string())
            .fetch_one(&mut *tx)
            .await?;
        let runner = RunnerRow::from_row(&row)?.info(cutoff);
        tx.commit().await?;
        Ok(Registered {
            response: RegisterRunnerResponse {
                runner,
                token: if created { minted.clone() } else { None },
            },
            created,
        })
    })
    .await;
    res.map_err(|e| {
        if e.is_unique_violation() {
            Error::conflict("token_in_use", "another runner already uses this token")
        } else {
            e
        }
    })
}

/// Every runner, by name.
pub async fn list(state: &AppState) -> Result<Vec<RunnerInfo>> {
    let cutoff = state.responsive_cutoff(state.clock.now_ms());
    let rows = sqlx::query(&format!("SELECT {RUNNER_COLS} FROM runners ORDER BY name"))
        .fetch_all(state.db.pool())
        .await?;
    rows.iter()
        .map(|r| Ok(RunnerRow::from_row(r)?.info(cutoff)))
        .collect()
}

/// Runner `name`, or 404.
pub async fn get_row(state: &AppState, name: &str) -> Result<RunnerRow> {
    let row = sqlx::query(&format!(
        "SELECT {RUNNER_COLS} FROM runners WHERE name = $1"
    ))
    .bind(name)
    .fetch_optional(state.db.pool())
    .await?
    .ok_or_else(|| Error::not_found(format!("runner {name:?}")))?;
    RunnerRow::from_row(&row)
}

/// Runner `name` as the admin API shows it.
pub async fn get(state: &AppState, name: &str) -> Result<RunnerInfo> {
    let cutoff = state.responsive_cutoff(state.clock.now_ms());
    Ok(get_row(state, name).await?.info(cutoff))
}

/// Mark runner `name` draining (no new boxes) or not.
pub async fn set_draining(state: &AppState, name: &str, draining: bool) -> Result<RunnerInfo> {
    let n = sqlx::query("UPDATE runners SET draining = $1, updated_at = $2 WHERE name = $3 AND decommissioned_at IS NULL")
        .bind(i64::from(draining))
        .bind(state.clock.now_ms())
        .bind(name)
        .execute(state.db.pool())
        .await?
        .rows_affected();
    let info = get(state, name).await?;
    if n == 0 {
        return Err(Error::conflict(
            "runner_decommissioned",
            format!("runner {name:?} is decommissioned"),
        ));
    }
    tracing::info!(runner = name, draining, "runner drain flag changed");
    Ok(info)
}

/// Retire runner `name`: its token stops working. Refused while boxes are
/// pinned to it unless `force`, which marks those boxes deleted (their data is
/// lost with the host). Idempotent.
pub async fn decommission(state: &AppState, name: &str, force: bool) -> Result<RunnerInfo> {
    let row = get_row(state, name).await?;
    if row.decommissioned {
        return Ok(row.info(state.responsive_cutoff(state.clock.now_ms())));
    }
    let id = row.id.to_string();
    retry(|| async {
        let now = state.clock.now_ms();
        let mut tx = state.db.begin().await?;
        // Lock the runner row first: a concurrent placement waits, then sees it decommissioned.
        let locked = sqlx::query("UPDATE runners SET updated_at = $1 WHERE id = $2 AND decommissioned_at IS NULL")
            .bind(now)
            .bind(&id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if locked == 0 {
            return Ok(()); // decommissioned meanwhile
        }
        let live: i64 = sqlx::query("SELECT COUNT(*) AS n FROM boxes WHERE runner_id = $1 AND deleted_at IS NULL")
            .bind(&id)
            .fetch_one(&mut *tx)
            .await?
            .try_get("n")?;
        if live > 0 && !force {
            return Err(Error::conflict(
                "runner_not_empty",
                format!(
                    "runner {name:?} still has {live} box(es); drain it and move or delete them first \
                     (or pass force=true to abandon them)"
                ),
            ));
        }
        if live > 0 {
            sqlx::query(
                "UPDATE boxes SET state = 'deleted', desired_state = 'deleted', deleted_at = $1, updated_at = $1, \
                 migrate_to = NULL, error = $2 WHERE runner_id = $3 AND deleted_at IS NULL",
            )
            .bind(now)
            .bind(format!("runner {name} was decommissioned with this box on it"))
            .bind(&id)
            .execute(&mut *tx)
            .await?;
            tracing::warn!(runner = name, boxes = live, "decommissioned with boxes still on it (forced)");
        }
        // Moves towards this runner cannot complete any more.
        sqlx::query("UPDATE boxes SET migrate_to = NULL, state = 'stopped', updated_at = $1 WHERE migrate_to = $2")
            .bind(now)
            .bind(&id)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "UPDATE runners SET decommissioned_at = $1, draining = 1, alloc_cpu = 0, alloc_memory = 0, \
             alloc_disk = 0, alloc_boxes = 0, updated_at = $1 WHERE id = $2",
        )
        .bind(now)
        .bind(&id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    })
    .await?;
    tracing::info!(runner = name, "runner decommissioned");
    get(state, name).await
}

/// A live box pinned to the runner, as the healthcheck needs it.
struct Pinned {
    id: Uuid,
    spec: BoxSpec,
    state: BoxState,
    desired: BoxState,
    error: Option<String>,
    migrate_to: Option<Uuid>,
}

fn validate_healthcheck(req: &HealthcheckRequest) -> Result<()> {
    if req.version.is_empty()
        || req.version.len() > 100
        || req.version.chars().any(char::is_control)
    {
        return Err(Error::bad_request(
            "invalid_version",
            "version is 1-100 printable characters",
        ));
    }
    let addr_ok = req.address.len() <= 2048
        && url::Url::parse(&req.address).is_ok_and(|u| {
            matches!(u.scheme(), "http" | "https") && u.host_str().is_some_and(|h| !h.is_empty())
        });
    if !addr_ok {
        return Err(Error::bad_request(
            "invalid_address",
            "address must be the runner's base URL (http:// or https://)",
        ));
    }
    if let Some(sha) = &req.binary_sha256
        && !(sha.len() == 64 && sha.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        return Err(Error::bad_request(
            "invalid_binary_sha256",
            "binary_sha256 is 64 hexadecimal characters",
        ));
    }
    if let Some(inst) = &req.agent_instance
        && !valid_agent_instance(inst)
    {
        return Err(Error::bad_request(
            "invalid_agent_instance",
            "agent_instance is 1-64 of letters, digits, '-' and '_'",
        ));
    }
    if req.boxes.len() > MAX_REPORTED_BOXES {
        return Err(Error::bad_request(
            "too_many_boxes",
            format!("at most {MAX_REPORTED_BOXES} boxes per healthcheck"),
        ));
    }
    let mut seen = HashSet::with_capacity(req.boxes.len());
    for b in &req.boxes {
        if !seen.insert(b.id) {
            return Err(Error::bad_request(
                "duplicate_box",
                format!("box {} reported twice", b.id),
            ));
        }
    }
    Ok(())
}

fn valid_agent_instance(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
}

fn truncate(s: Option<&str>) -> Option<String> {
    s.map(|s| s.chars().take(MAX_ERROR_LEN).collect())
}

/// Record a runner's healthcheck and answer with the actions that converge
/// it on the desired state (level-triggered: the same answer until it complies).
pub async fn healthcheck(
    state: &AppState,
    runner: &RunnerIdentity,
    req: &HealthcheckRequest,
) -> Result<HealthcheckResponse> {
    validate_healthcheck(req)?;
    let reported: HashMap<Uuid, &BoxReport> = req
        .boxes
        .iter()
        .filter(|b| b.state != BoxState::Deleted)
        .map(|b| (b.id, b))
        .collect();
    let runner_id = runner.id.to_string();
    retry(|| async {
        let now = state.clock.now_ms();
        let cutoff = state.responsive_cutoff(now);
        let mut tx = state.db.begin().await?;
        let updated = sqlx::query(
            "UPDATE runners SET version = $1, address = $2, capacity_cpu = $3, capacity_memory = $4, capacity_disk = $5, \
             usage_cpu = $6, usage_memory = $7, usage_disk = $8, last_seen_at = $9, updated_at = $9, \
             binary_sha256 = $11 WHERE id = $10 AND decommissioned_at IS NULL",
        )
        .bind(&req.version)
        .bind(req.address.trim_end_matches('/'))
        .bind(to_i64(req.capacity.cpu_millicores))
        .bind(to_i64(req.capacity.memory_mib))
        .bind(to_i64(req.capacity.disk_mib))
        .bind(to_i64(req.usage.cpu_millicores))
        .bind(to_i64(req.usage.memory_mib))
        .bind(to_i64(req.usage.disk_mib))
        .bind(now)
        .bind(&runner_id)
        .bind(req.binary_sha256.as_ref().map(|s| s.to_ascii_lowercase()))
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if updated == 0 {
            return Err(Error::unauthorized("runner is decommissioned"));
        }
        // A new agent process (the row is locked by the update above, so two
        // check-ins of one process cannot both rotate): a new key, and the
        // previous one, which whoever stood on the runner's port meanwhile
        // may have seen, stops working.
        if let Some(instance) = &req.agent_instance {
            let rotated = sqlx::query(
                "UPDATE runners SET api_key = $1, agent_instance = $2 \
                 WHERE id = $3 AND (agent_instance IS NULL OR agent_instance <> $2)",
            )
            .bind(tokens::generate(protocol::RUNNER_API_KEY_PREFIX))
            .bind(instance)
            .bind(&runner_id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if rotated == 1 {
                tracing::info!(runner = %runner.name, "a new agent process checked in; its API key was replaced");
            }
        }
        let row = sqlx::query(&format!("SELECT {RUNNER_COLS}, api_key FROM runners WHERE id = $1"))
            .bind(&runner_id)
            .fetch_one(&mut *tx)
            .await?;
        let api_key: String = row.try_get("api_key")?;
        let me = RunnerRow::from_row(&row)?;

        let rows = sqlx::query(
            "SELECT id, image, cpu, memory, disk, env, network, egress_allow, state, desired_state, error, migrate_to \
             FROM boxes WHERE runner_id = $1 AND deleted_at IS NULL",
        )
        .bind(&runner_id)
        .fetch_all(&mut *tx)
        .await?;
        let mut pinned = Vec::with_capacity(rows.len());
        for r in &rows {
            let id = get_uuid(r, "id")?;
            let env: String = r.try_get("env")?;
            pinned.push(Pinned {
                id,
                spec: BoxSpec {
                    id,
                    image: r.try_get("image")?,
                    resources: Resources {
                        cpu_millicores: get_u64(r, "cpu")?,
                        memory_mib: get_u64(r, "memory")?,
                        disk_mib: get_u64(r, "disk")?,
                    },
                    env: serde_json::from_str(&env).map_err(Error::internal)?,
                    network: crate::boxes::network_mode(r)?,
                    egress_allow: crate::boxes::egress_allow(r)?,
                },
                state: stored_state(r, "state")?,
                desired: stored_state(r, "desired_state")?,
                error: r.try_get("error")?,
                migrate_to: get_opt_uuid(r, "migrate_to")?,
            });
        }
        let incoming: HashSet<Uuid> =
            sqlx::query("SELECT id FROM boxes WHERE migrate_to = $1 AND deleted_at IS NULL")
                .bind(&runner_id)
                .fetch_all(&mut *tx)
                .await?
                .iter()
                .map(|r| get_uuid(r, "id"))
                .collect::<Result<_>>()?;

        let mut actions = Vec::new();
        let pinned_ids: HashSet<Uuid> = pinned.iter().map(|p| p.id).collect();
        for b in &pinned {
            if b.state == BoxState::Migrating || b.migrate_to.is_some() {
                continue; // a move owns this box until it completes or is abandoned
            }
            match reported.get(&b.id) {
                Some(rep) => {
                    let (new_state, new_error) = if b.desired == BoxState::Deleted {
                        actions.push(RunnerAction::Delete { id: b.id });
                        (BoxState::Deleting, b.error.clone())
                    } else {
                        match (rep.state, b.desired) {
                            (BoxState::Stopped, BoxState::Running) => actions.push(RunnerAction::Start { id: b.id }),
                            (BoxState::Running, BoxState::Stopped) => actions.push(RunnerAction::Stop { id: b.id }),
                            _ => {}
                        }
                        (rep.state, truncate(rep.error.as_deref()))
                    };
                    if new_state != b.state || new_error != b.error {
                        sqlx::query(
                            "UPDATE boxes SET state = $1, error = $2, updated_at = $3 \
                             WHERE id = $4 AND runner_id = $5 AND deleted_at IS NULL AND migrate_to IS NULL",
                        )
                        .bind(state_str(new_state))
                        .bind(new_error)
                        .bind(now)
                        .bind(b.id.to_string())
                        .bind(&runner_id)
                        .execute(&mut *tx)
                        .await?;
                    }
                }
                None if b.desired == BoxState::Deleted => {
                    // Gone from the runner: the deletion is done; give back its resources.
                    let n = sqlx::query(
                        "UPDATE boxes SET state = 'deleted', deleted_at = $1, updated_at = $1 \
                         WHERE id = $2 AND runner_id = $3 AND deleted_at IS NULL AND migrate_to IS NULL",
                    )
                    .bind(now)
                    .bind(b.id.to_string())
                    .bind(&runner_id)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                    if n == 1 {
                        release(&mut tx, &runner_id, &b.spec.resources).await?;
                    }
                }
                None => {
                    if !matches!(b.state, BoxState::Pending) {
                        tracing::warn!(runner = %runner.name, r#box = %b.id, was = state_str(b.state), "runner no longer has this box; asking it to create it again");
                        sqlx::query(
                            "UPDATE boxes SET state = 'pending', updated_at = $1 \
                             WHERE id = $2 AND runner_id = $3 AND deleted_at IS NULL AND migrate_to IS NULL",
                        )
                        .bind(now)
                        .bind(b.id.to_string())
                        .bind(&runner_id)
                        .execute(&mut *tx)
                        .await?;
                    }
                    actions.push(RunnerAction::Create { spec: b.spec.clone() });
                }
            }
        }
        // Boxes the runner has that are not (or no longer) its own.
        let mut strays: Vec<Uuid> = reported
            .keys()
            .filter(|id| !pinned_ids.contains(id) && !incoming.contains(id))
            .copied()
            .collect();
        strays.sort();
        actions.extend(strays.into_iter().map(|id| RunnerAction::Delete { id }));
        let imports = crate::imports::announced_to(&mut tx, &runner_id, now).await?;
        tx.commit().await?;
        Ok(HealthcheckResponse {
            state: me.state(cutoff),
            actions,
            api_key,
            interval_secs: state.config.runner_healthcheck_interval.as_secs(),
            imports,
        })
    })
    .await
}

/// Give a box's resources back to runner `runner_id` (inside `tx`).
pub async fn release(tx: &mut crate::db::Tx, runner_id: &str, r: &Resources) -> Result<()> {
    sqlx::query(
        "UPDATE runners SET alloc_cpu = alloc_cpu - $1, alloc_memory = alloc_memory - $2, \
         alloc_disk = alloc_disk - $3, alloc_boxes = alloc_boxes - 1 WHERE id = $4",
    )
    .bind(to_i64(r.cpu_millicores))
    .bind(to_i64(r.memory_mib))
    .bind(to_i64(r.disk_mib))
    .bind(runner_id)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Reserve a box's resources on runner `runner_id` if it is schedulable
/// (ready: seen since `cutoff`, not draining, not decommissioned) and has room.
/// Atomic: the check and the update are one statement, so concurrent
/// reservations cannot overbook. Returns whether it succeeded.
pub async fn reserve(
    tx: &mut crate::db::Tx,
    runner_id: &str,
    r: &Resources,
    cutoff: Millis,
    now: Millis,
) -> Result<bool> {
    let n = sqlx::query(
        "UPDATE runners SET alloc_cpu = alloc_cpu + $1, alloc_memory = alloc_memory + $2, \
         alloc_disk = alloc_disk + $3, alloc_boxes = alloc_boxes + 1, updated_at = $4 \
         WHERE id = $5 AND decommissioned_at IS NULL AND draining = 0 AND last_seen_at >= $6 \
         AND alloc_cpu + $1 <= capacity_cpu AND alloc_memory + $2 <= capacity_memory AND alloc_disk + $3 <= capacity_disk",
    )
    .bind(to_i64(r.cpu_millicores))
    .bind(to_i64(r.memory_mib))
    .bind(to_i64(r.disk_mib))
    .bind(now)
    .bind(runner_id)
    .bind(cutoff)
    .execute(&mut **tx)
    .await?
    .rows_affected();
    Ok(n == 1)
}

fn stored_state(r: &AnyRow, col: &str) -> Result<BoxState> {
    let s: String = r.try_get(col)?;
    parse_state(&s)
        .ok_or_else(|| Error::internal(anyhow::anyhow!("column {col} holds unknown state {s:?}")))
}

/// Ask runner `name` to check in now, so it acts on a change at once instead
/// of at its next healthcheck. Best effort, in the background: a runner that
/// does not answer still converges on its next interval.
pub fn poke(state: &AppState, name: &str) {
    let state = state.clone();
    let name = name.to_string();
    tokio::spawn(async move {
        let row = sqlx::query(
            "SELECT address, api_key FROM runners WHERE name = $1 AND decommissioned_at IS NULL",
        )
        .bind(&name)
        .fetch_optional(state.db.pool())
        .await;
        let Ok(Some(row)) = row else { return };
        let (Ok(Some(address)), Ok(key)) = (
            row.try_get::<Option<String>, _>("address"),
            row.try_get::<String, _>("api_key"),
        ) else {
            return;
        };
        let sent = state
            .http
            .post(format!("{address}/api/sync"))
            .bearer_auth(key)
            .timeout(std::time::Duration::from_secs(2))
            .send()
            .await;
        if let Err(e) = sent {
            tracing::debug!("poking runner {name}: {e}");
        }
    });
}
