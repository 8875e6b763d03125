//! Boxes: create (with placement), list, get, start, stop, delete.

use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use protocol::{BoxInfo, BoxPage, BoxState, CreateBoxRequest, Ipv4Cidr, NetworkMode, Resources};
use sqlx::Row;
use sqlx::any::AnyRow;
use uuid::Uuid;

use crate::clock::from_millis;
use crate::db::{get_flag, get_u64, get_uuid, retry, to_i64};
use crate::error::{Error, Result};
use crate::runners::{RUNNER_COLS, RunnerRow, reserve};
use crate::scheduler::{self, NoPlacement};
use crate::state::AppState;

/// Image used when a create names none.
pub const DEFAULT_IMAGE: &str = "default";
/// Default CPU, millicores.
pub const DEFAULT_CPU_MILLICORES: u64 = 1000;
/// Default memory, MiB.
pub const DEFAULT_MEMORY_MIB: u64 = 1024;
/// Default disk, MiB.
pub const DEFAULT_DISK_MIB: u64 = 4096;
/// CPU bounds, millicores.
pub const CPU_RANGE: (u64, u64) = (50, 256_000);
/// Memory bounds, MiB.
pub const MEMORY_RANGE: (u64, u64) = (32, 4 * 1024 * 1024);
/// Disk bounds, MiB.
pub const DISK_RANGE: (u64, u64) = (64, 64 * 1024 * 1024);
/// Most environment variables per box.
pub const MAX_ENV: usize = 256;
/// Most labels per box.
pub const MAX_LABELS: usize = 64;
/// Default page size of listings.
pub const DEFAULT_LIMIT: u32 = 50;
/// Largest page size.
pub const MAX_LIMIT: u32 = 500;

/// Database spelling of a state.
pub fn state_str(s: BoxState) -> &'static str {
    match s {
        BoxState::Pending => "pending",
        BoxState::Stopped => "stopped",
        BoxState::Running => "running",
        BoxState::Migrating => "migrating",
        BoxState::Deleting => "deleting",
        BoxState::Deleted => "deleted",
        BoxState::Error => "error",
    }
}

/// Parse the database (and API) spelling of a state.
pub fn parse_state(s: &str) -> Option<BoxState> {
    Some(match s {
        "pending" => BoxState::Pending,
        "stopped" => BoxState::Stopped,
        "running" => BoxState::Running,
        "migrating" => BoxState::Migrating,
        "deleting" => BoxState::Deleting,
        "deleted" => BoxState::Deleted,
        "error" => BoxState::Error,
        _ => return None,
    })
}

/// Columns read by [`box_from_row`] (boxes `b` joined with runners `r`).
pub const BOX_COLS: &str = "b.id, b.organization_id, r.name AS runner_name, b.image, b.cpu, b.memory, b.disk, \
    b.labels, b.network, b.egress_allow, b.state, b.desired_state, b.error, b.created_at, b.updated_at";
/// FROM clause matching [`BOX_COLS`].
pub const BOX_FROM: &str = "boxes b JOIN runners r ON r.id = b.runner_id";

/// Read a row selected with [`BOX_COLS`].
pub fn box_from_row(r: &AnyRow) -> Result<BoxInfo> {
    let labels: String = r.try_get("labels")?;
    let state: String = r.try_get("state")?;
    let desired: String = r.try_get("desired_state")?;
    let bad =
        |c: &str, v: &str| Error::internal(anyhow::anyhow!("column {c} holds unknown state {v:?}"));
    Ok(BoxInfo {
        id: get_uuid(r, "id")?,
        organization_id: get_uuid(r, "organization_id")?,
        runner: r.try_get("runner_name")?,
        image: r.try_get("image")?,
        state: parse_state(&state).ok_or_else(|| bad("state", &state))?,
        desired_state: parse_state(&desired).ok_or_else(|| bad("desired_state", &desired))?,
        resources: Resources {
            cpu_millicores: get_u64(r, "cpu")?,
            memory_mib: get_u64(r, "memory")?,
            disk_mib: get_u64(r, "disk")?,
        },
        labels: serde_json::from_str(&labels).map_err(Error::internal)?,
        network: network_mode(r)?,
        egress_allow: egress_allow(r)?,
        error: r.try_get("error")?,
        created_at: from_millis(r.try_get("created_at")?),
        updated_at: from_millis(r.try_get("updated_at")?),
    })
}

/// The `network` column: 0 none, 1 egress.
pub fn network_mode(r: &AnyRow) -> Result<NetworkMode> {
    Ok(if get_flag(r, "network")? {
        NetworkMode::Egress
    } else {
        NetworkMode::None
    })
}

/// The `egress_allow` column: a JSON array of CIDR blocks.
pub fn egress_allow(r: &AnyRow) -> Result<Vec<Ipv4Cidr>> {
    let text: String = r.try_get("egress_allow")?;
    serde_json::from_str(&text).map_err(Error::internal)
}

/// A create request with defaults applied and every field checked.
#[derive(Clone, Debug)]
pub struct ValidBox {
    /// Image.
    pub image: String,
    /// Limits.
    pub resources: Resources,
    /// Environment.
    pub env: BTreeMap<String, String>,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Network mode.
    pub network: NetworkMode,
    /// Private destinations the box may reach (egress).
    pub egress_allow: Vec<Ipv4Cidr>,
}

fn in_range(name: &str, v: u64, (lo, hi): (u64, u64)) -> Result<u64> {
    if v < lo || v > hi {
        return Err(Error::bad_request(
            "invalid_resources",
            format!("{name} must be between {lo} and {hi}"),
        ));
    }
    Ok(v)
}

/// Most entries of a box's egress allow-list.
pub const MAX_EGRESS_ALLOW: usize = 64;

/// Check a create request and apply defaults; `egress_ceiling` is the
/// stage's egress allow-list, which a box's own must lie within.
pub fn validate(req: &CreateBoxRequest, egress_ceiling: &[Ipv4Cidr]) -> Result<ValidBox> {
    let image = req
        .image
        .clone()
        .unwrap_or_else(|| DEFAULT_IMAGE.to_string());
    let image_ok = !image.is_empty()
        && image.len() <= 255
        && image.as_bytes()[0].is_ascii_alphanumeric()
        && image.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/' | b':' | b'@')
        });
    if !image_ok {
        return Err(Error::bad_request(
            "invalid_image",
            "image names are 1-255 letters, digits and . _ - / : @, starting with a letter or digit",
        ));
    }
    let resources = Resources {
        cpu_millicores: in_range(
            "cpu_millicores",
            req.cpu_millicores.unwrap_or(DEFAULT_CPU_MILLICORES),
            CPU_RANGE,
        )?,
        memory_mib: in_range(
            "memory_mib",
            req.memory_mib.unwrap_or(DEFAULT_MEMORY_MIB),
            MEMORY_RANGE,
        )?,
        disk_mib: in_range(
            "disk_mib",
            req.disk_mib.unwrap_or(DEFAULT_DISK_MIB),
            DISK_RANGE,
        )?,
    };
    if req.env.len() > MAX_ENV {
        return Err(Error::bad_request(
            "invalid_env",
            format!("at most {MAX_ENV} variables"),
        ));
    }
    for (k, v) in &req.env {
        let name_ok = !k.is_empty()
            && k.len() <= 255
            && !k.as_bytes()[0].is_ascii_digit()
            && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !name_ok {
            return Err(Error::bad_request(
                "invalid_env",
                format!("environment variable name {k:?} is not [A-Za-z_][A-Za-z0-9_]*"),
            ));
        }
        if v.len() > 32 * 1024 || v.contains('\0') {
            return Err(Error::bad_request(
                "invalid_env",
                format!("value of {k} is longer than 32 KiB or holds a NUL byte"),
            ));
        }
    }
    if req.labels.len() > MAX_LABELS {
        return Err(Error::bad_request(
            "invalid_labels",
            format!("at most {MAX_LABELS} labels"),
        ));
    }
    for (k, v) in &req.labels {
        validate_label(k, v)?;
    }
    if !req.egress_allow.is_empty() && !req.network.is_egress() {
        return Err(Error::bad_request(
            "invalid_network",
            "egress_allow needs \"network\": \"egress\"",
        ));
    }
    if req.egress_allow.len() > MAX_EGRESS_ALLOW {
        return Err(Error::bad_request(
            "invalid_network",
            format!("egress_allow has more than {MAX_EGRESS_ALLOW} entries"),
        ));
    }
    let outside = protocol::net::outside_of(&req.egress_allow, egress_ceiling);
    if !outside.is_empty() {
        let list: Vec<String> = outside.iter().map(|c| c.to_string()).collect();
        return Err(Error::bad_request(
            "egress_not_allowed",
            format!(
                "egress_allow {} is outside this stage's egress allow-list{}",
                list.join(", "),
                if egress_ceiling.is_empty() {
                    " (which is empty)".to_string()
                } else {
                    let c: Vec<String> = egress_ceiling.iter().map(|c| c.to_string()).collect();
                    format!(" ({})", c.join(", "))
                }
            ),
        ));
    }
    let mut egress_allow = req.egress_allow.clone();
    egress_allow.sort();
    egress_allow.dedup();
    Ok(ValidBox {
        image,
        resources,
        env: req.env.clone(),
        labels: req.labels.clone(),
        network: req.network,
        egress_allow,
    })
}

fn validate_label(k: &str, v: &str) -> Result<()> {
    let key_ok = !k.is_empty()
        && k.len() <= 63
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/'));
    if !key_ok {
        return Err(Error::bad_request(
            "invalid_labels",
            format!("label key {k:?} is not 1-63 letters, digits and . _ - /"),
        ));
    }
    if v.len() > 255 || v.chars().any(char::is_control) {
        return Err(Error::bad_request(
            "invalid_labels",
            format!("value of label {k} is longer than 255 bytes or holds control characters"),
        ));
    }
    Ok(())
}

/// Create a box in `org_id`: place it on a runner and record it, atomically.
pub async fn create(state: &AppState, org_id: Uuid, req: &CreateBoxRequest) -> Result<BoxInfo> {
    let spec = validate(req, &state.config.egress_allow)?;
    let env_json = serde_json::to_string(&spec.env).map_err(Error::internal)?;
    let allow_json = serde_json::to_string(&spec.egress_allow).map_err(Error::internal)?;
    let labels_json = serde_json::to_string(&spec.labels).map_err(Error::internal)?;
    let id = Uuid::now_v7();
    let info = retry(|| async {
        let now = state.clock.now_ms();
        let cutoff = state.responsive_cutoff(now);
        let mut tx = state.db.begin().await?;
        let rows = sqlx::query(&format!(
            "SELECT {RUNNER_COLS} FROM runners WHERE decommissioned_at IS NULL"
        ))
        .fetch_all(&mut *tx)
        .await?;
        let runners: Vec<RunnerRow> = rows.iter().map(RunnerRow::from_row).collect::<Result<_>>()?;
        let mut ready = Vec::new();
        let (mut draining, mut initializing, mut unresponsive) = (0, 0, 0);
        for r in &runners {
            match r.state(cutoff) {
                protocol::RunnerState::Ready => ready.push(r.candidate()),
                protocol::RunnerState::Draining => draining += 1,
                protocol::RunnerState::Initializing => initializing += 1,
                protocol::RunnerState::Unresponsive => unresponsive += 1,
                protocol::RunnerState::Decommissioned => {}
            }
        }
        let why = if !ready.is_empty() {
            NoPlacement::NoCapacity {
                ready: ready.len(),
                largest_free: scheduler::largest_free(&ready),
            }
        } else if draining > 0 {
            NoPlacement::AllDraining { draining }
        } else {
            NoPlacement::NoneReady {
                initializing,
                unresponsive,
            }
        };
        for c in scheduler::spread_near_ties(scheduler::rank(ready, &spec.resources), &spec.resources) {
            let runner_id = c.id.to_string();
            if !reserve(&mut tx, &runner_id, &spec.resources, cutoff, now).await? {
                continue; // taken by a concurrent create, or drained meanwhile: try the next
            }
            sqlx::query(
                "INSERT INTO boxes (id, organization_id, runner_id, image, cpu, memory, disk, env, labels, network, \
                 egress_allow, state, desired_state, created_at, updated_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, 'pending', 'running', $12, $12)",
            )
            .bind(id.to_string())
            .bind(org_id.to_string())
            .bind(&runner_id)
            .bind(&spec.image)
            .bind(to_i64(spec.resources.cpu_millicores))
            .bind(to_i64(spec.resources.memory_mib))
            .bind(to_i64(spec.resources.disk_mib))
            .bind(&env_json)
            .bind(&labels_json)
            .bind(i64::from(spec.network.is_egress()))
            .bind(&allow_json)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            for (k, v) in &spec.labels {
                sqlx::query("INSERT INTO box_labels (box_id, label_key, label_value) VALUES ($1, $2, $3)")
                    .bind(id.to_string())
                    .bind(k)
                    .bind(v)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            return Ok(BoxInfo {
                id,
                organization_id: org_id,
                runner: Some(c.name),
                image: spec.image.clone(),
                state: BoxState::Pending,
                desired_state: BoxState::Running,
                resources: spec.resources,
                labels: spec.labels.clone(),
                network: spec.network,
                egress_allow: spec.egress_allow.clone(),
                error: None,
                created_at: from_millis(now),
                updated_at: from_millis(now),
            });
        }
        Err(Error::unavailable(why.code(), why.message(&spec.resources)))
    })
    .await?;
    tracing::info!(r#box = %info.id, runner = info.runner.as_deref().unwrap_or(""), "box created");
    if let Some(r) = &info.runner {
        crate::runners::poke(state, r);
    }
    Ok(info)
}

/// Filters of a listing.
#[derive(Clone, Debug, Default)]
pub struct ListFilter {
    /// Only these states (deleted boxes are listed only when asked for).
    pub states: Vec<BoxState>,
    /// Every `(key, value)` must match.
    pub labels: Vec<(String, String)>,
    /// Resume after this id.
    pub after: Option<Uuid>,
    /// Page size.
    pub limit: u32,
}

/// Encode a page cursor.
pub fn encode_cursor(last: Uuid) -> String {
    URL_SAFE_NO_PAD.encode(format!("v1:{last}"))
}

/// Decode a page cursor.
pub fn decode_cursor(s: &str) -> Result<Uuid> {
    let bad = || Error::bad_request("invalid_cursor", "cursor is not one this API returned");
    let raw = URL_SAFE_NO_PAD.decode(s.as_bytes()).map_err(|_| bad())?;
    let text = String::from_utf8(raw).map_err(|_| bad())?;
    let id = text.strip_prefix("v1:").ok_or_else(bad)?;
    Uuid::parse_str(id).map_err(|_| bad())
}

/// Parse `label=key=value` filters, `state=a,b` and paging from a raw query string.
pub fn parse_list_query(query: Option<&str>) -> Result<ListFilter> {
    let mut f = ListFilter {
        limit: DEFAULT_LIMIT,
        ..Default::default()
    };
    for (k, v) in url::form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match k.as_ref() {
            "state" => {
                for s in v.split(',').filter(|s| !s.is_empty()) {
                    let st = parse_state(s).ok_or_else(|| {
                        Error::bad_request("invalid_query", format!("unknown state {s:?}"))
                    })?;
                    if !f.states.contains(&st) {
                        f.states.push(st);
                    }
                }
            }
            "label" => {
                let (lk, lv) = v.split_once('=').ok_or_else(|| {
                    Error::bad_request("invalid_query", "label filters are label=key=value")
                })?;
                validate_label(lk, lv)
                    .map_err(|e| Error::bad_request("invalid_query", e.message))?;
                if f.labels.len() >= 16 {
                    return Err(Error::bad_request(
                        "invalid_query",
                        "at most 16 label filters",
                    ));
                }
                f.labels.push((lk.to_string(), lv.to_string()));
            }
            "limit" => {
                let n: u32 = v
                    .parse()
                    .map_err(|_| Error::bad_request("invalid_query", "limit is a whole number"))?;
                if n == 0 || n > MAX_LIMIT {
                    return Err(Error::bad_request(
                        "invalid_query",
                        format!("limit is between 1 and {MAX_LIMIT}"),
                    ));
                }
                f.limit = n;
            }
            "cursor" => f.after = Some(decode_cursor(&v)?),
            other => {
                return Err(Error::bad_request(
                    "invalid_query",
                    format!("unknown query parameter {other:?} (use state, label, limit, cursor)"),
                ));
            }
        }
    }
    Ok(f)
}

enum Arg {
    Text(String),
    Int(i64),
}

/// One page of `org_id`'s boxes, oldest first.
pub async fn list(state: &AppState, org_id: Uuid, f: &ListFilter) -> Result<BoxPage> {
    let mut sql = format!("SELECT {BOX_COLS} FROM {BOX_FROM} WHERE b.organization_id = $1");
    let mut args = vec![Arg::Text(org_id.to_string())];
    let push = |args: &mut Vec<Arg>, a: Arg| -> String {
        args.push(a);
        format!("${}", args.len())
    };
    if f.states.is_empty() {
        sql.push_str(" AND b.deleted_at IS NULL");
    } else {
        let ps: Vec<String> = f
            .states
            .iter()
            .map(|s| push(&mut args, Arg::Text(state_str(*s).to_string())))
            .collect();
        sql.push_str(&format!(" AND b.state IN ({})", ps.join(", ")));
    }
    if let Some(after) = f.after {
        let p = push(&mut args, Arg::Text(after.to_string()));
        sql.push_str(&format!(" AND b.id > {p}"));
    }
    for (k, v) in &f.labels {
        let pk = push(&mut args, Arg::Text(k.clone()));
        let pv = push(&mut args, Arg::Text(v.clone()));
        sql.push_str(&format!(
            " AND EXISTS (SELECT 1 FROM box_labels l WHERE l.box_id = b.id AND l.label_key = {pk} AND l.label_value = {pv})"
        ));
    }
    let pl = push(&mut args, Arg::Int(i64::from(f.limit) + 1));
    sql.push_str(&format!(" ORDER BY b.id LIMIT {pl}"));

    let mut q = sqlx::query(&sql);
    for a in args {
        q = match a {
            Arg::Text(s) => q.bind(s),
            Arg::Int(i) => q.bind(i),
        };
    }
    let rows = q.fetch_all(state.db.pool()).await?;
    let mut boxes: Vec<BoxInfo> = rows.iter().map(box_from_row).collect::<Result<_>>()?;
    let next_cursor = if boxes.len() > f.limit as usize {
        boxes.truncate(f.limit as usize);
        boxes.last().map(|b| encode_cursor(b.id))
    } else {
        None
    };
    Ok(BoxPage { boxes, next_cursor })
}

/// Box `id` of `org_id` (404 when it is another organization's).
pub async fn get(state: &AppState, org_id: Uuid, id: Uuid) -> Result<BoxInfo> {
    let row = sqlx::query(&format!(
        "SELECT {BOX_COLS} FROM {BOX_FROM} WHERE b.id = $1 AND b.organization_id = $2"
    ))
    .bind(id.to_string())
    .bind(org_id.to_string())
    .fetch_optional(state.db.pool())
    .await?
    .ok_or_else(|| Error::not_found("box"))?;
    box_from_row(&row)
}

/// Box `id` whatever its organization (admin).
pub async fn get_any(state: &AppState, id: Uuid) -> Result<BoxInfo> {
    let row = sqlx::query(&format!(
        "SELECT {BOX_COLS} FROM {BOX_FROM} WHERE b.id = $1"
    ))
    .bind(id.to_string())
    .fetch_optional(state.db.pool())
    .await?
    .ok_or_else(|| Error::not_found("box"))?;
    box_from_row(&row)
}

/// The live boxes pinned to runner `runner_id` (admin), oldest first.
pub async fn list_on_runner(state: &AppState, runner_id: Uuid) -> Result<Vec<BoxInfo>> {
    let rows = sqlx::query(&format!(
        "SELECT {BOX_COLS} FROM {BOX_FROM} WHERE b.runner_id = $1 AND b.deleted_at IS NULL ORDER BY b.id"
    ))
    .bind(runner_id.to_string())
    .fetch_all(state.db.pool())
    .await?;
    rows.iter().map(box_from_row).collect()
}

/// Ask for box `id` to run or stop; the runner converges on its next healthcheck.
pub async fn set_desired(
    state: &AppState,
    org_id: Uuid,
    id: Uuid,
    desired: BoxState,
) -> Result<BoxInfo> {
    debug_assert!(matches!(desired, BoxState::Running | BoxState::Stopped));
    let n = sqlx::query(
        "UPDATE boxes SET desired_state = $1, updated_at = $2 \
         WHERE id = $3 AND organization_id = $4 AND desired_state <> 'deleted'",
    )
    .bind(state_str(desired))
    .bind(state.clock.now_ms())
    .bind(id.to_string())
    .bind(org_id.to_string())
    .execute(state.db.pool())
    .await?
    .rows_affected();
    let info = get(state, org_id, id).await?;
    if n == 0 {
        return Err(Error::conflict(
            "box_deleted",
            "the box is deleted or being deleted",
        ));
    }
    if let Some(r) = &info.runner {
        crate::runners::poke(state, r);
    }
    Ok(info)
}

/// Delete box `id` (idempotent): its runner removes it on the next
/// healthcheck, and its resources are released once the runner confirms.
pub async fn delete(state: &AppState, org_id: Uuid, id: Uuid) -> Result<BoxInfo> {
    sqlx::query(
        "UPDATE boxes SET desired_state = 'deleted', \
         state = CASE WHEN state = 'migrating' THEN state ELSE 'deleting' END, updated_at = $1 \
         WHERE id = $2 AND organization_id = $3 AND desired_state <> 'deleted'",
    )
    .bind(state.clock.now_ms())
    .bind(id.to_string())
    .bind(org_id.to_string())
    .execute(state.db.pool())
    .await?;
    let info = get(state, org_id, id).await?;
    if let Some(r) = &info.runner {
        crate::runners::poke(state, r);
    }
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip_and_match_the_wire_spelling() {
        for s in [
            BoxState::Pending,
            BoxState::Stopped,
            BoxState::Running,
            BoxState::Migrating,
            BoxState::Deleting,
            BoxState::Deleted,
            BoxState::Error,
        ] {
            assert_eq!(parse_state(state_str(s)), Some(s));
            assert_eq!(
                serde_json::to_value(s).unwrap(),
                serde_json::json!(state_str(s))
            );
        }
        assert_eq!(parse_state("RUNNING"), None);
    }

    #[test]
    fn cursors_round_trip_and_reject_garbage() {
        let id = Uuid::now_v7();
        assert_eq!(decode_cursor(&encode_cursor(id)).unwrap(), id);
        for bad in [
            "",
            "!!",
            "djE6bm90LWEtdXVpZA",
            &URL_SAFE_NO_PAD.encode(id.to_string()),
        ] {
            assert_eq!(
                decode_cursor(bad).unwrap_err().code,
                "invalid_cursor",
                "{bad}"
            );
        }
    }

    #[test]
    fn list_query_parses_filters_and_refuses_unknowns() {
        let f = parse_list_query(Some(
            "state=running,stopped&label=env%3Dprod&label=team=a&limit=10",
        ))
        .unwrap();
        assert_eq!(f.states, vec![BoxState::Running, BoxState::Stopped]);
        assert_eq!(
            f.labels,
            vec![("env".into(), "prod".into()), ("team".into(), "a".into())]
        );
        assert_eq!(f.limit, 10);
        for bad in [
            "state=nope",
            "label=novalue",
            "limit=0",
            "limit=x",
            "limit=501",
            "color=red",
            "cursor=zz",
        ] {
            assert!(parse_list_query(Some(bad)).is_err(), "{bad}");
        }
        assert_eq!(parse_list_query(None).unwrap().limit, DEFAULT_LIMIT);
    }

    #[test]
    fn create_requests_are_checked() {
        let ok = validate(&CreateBoxRequest::default(), &[]).unwrap();
        assert_eq!(ok.image, DEFAULT_IMAGE);
        assert_eq!(ok.resources.cpu_millicores, DEFAULT_CPU_MILLICORES);
        let bad = |f: &dyn Fn(&mut CreateBoxRequest)| {
            let mut r = CreateBoxRequest::default();
            f(&mut r);
            validate(&r, &[]).unwrap_err().code
        };
        assert_eq!(bad(&|r| r.image = Some("../etc".into())), "invalid_image");
        assert_eq!(bad(&|r| r.image = Some(String::new())), "invalid_image");
        assert_eq!(bad(&|r| r.cpu_millicores = Some(0)), "invalid_resources");
        assert_eq!(bad(&|r| r.memory_mib = Some(u64::MAX)), "invalid_resources");
        assert_eq!(bad(&|r| r.disk_mib = Some(1)), "invalid_resources");
        assert_eq!(
            bad(&|r| {
                r.env.insert("1X".into(), "v".into());
            }),
            "invalid_env"
        );
        assert_eq!(
            bad(&|r| {
                r.env.insert("X".into(), "a\0b".into());
            }),
            "invalid_env"
        );
        assert_eq!(
            bad(&|r| {
                r.labels.insert("bad key".into(), "v".into());
            }),
            "invalid_labels"
        );
    }
}
