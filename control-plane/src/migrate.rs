//! Moving a box to another runner, keeping its id: reserve room on the
//! target, stream the box's archive from its runner's export into the
//! target's import (checking the SHA-256 on the way; the import announced to
//! the target with a one-time token, see [`crate::imports`]), then re-pin it.
//! Used by `boxctl decommission --migrate`.
//!
//! While a move is under way the box is `migrating` with `migrate_to` set:
//! healthchecks leave it alone on both runners. If the copy fails, the move is
//! abandoned (the reservation released, the box back on its runner; the
//! target's partial copy is deleted by its next healthcheck, as a box it does
//! not own). Calling move again after a crash resumes it.

use std::sync::{Arc, Mutex};

use futures::StreamExt;
use protocol::{ARCHIVE_SHA256_HEADER, BoxInfo, BoxState, IMPORT_TOKEN_HEADER, Resources};
use sha2::{Digest, Sha256};
use sqlx::Row;
use uuid::Uuid;

use crate::boxes::{self, parse_state, state_str};
use crate::db::{get_opt_uuid, get_u64, get_uuid, retry};
use crate::error::{Error, Result};
use crate::exec_proxy::{RunnerEndpoint, endpoint, runner_error, unreachable};
use crate::imports::{self, Purpose};
use crate::runners::{self, release, reserve};
use crate::state::AppState;
use crate::tokens::is_sha256_hex;

struct Plan {
    source_id: Uuid,
    resources: Resources,
    restore_state: BoxState,
    copy: bool,
}

/// Move box `box_id` to runner `target_name` (admin).
pub async fn move_box(state: &AppState, box_id: Uuid, target_name: &str) -> Result<BoxInfo> {
    let target = runners::get_row(state, target_name).await?;
    let target_id = target.id.to_string();
    let plan = retry(|| async {
        let now = state.clock.now_ms();
        let cutoff = state.responsive_cutoff(now);
        let mut tx = state.db.begin().await?;
        let row = sqlx::query(
            "SELECT runner_id, migrate_to, state, desired_state, cpu, memory, disk FROM boxes \
             WHERE id = $1 AND deleted_at IS NULL",
        )
        .bind(box_id.to_string())
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(|| Error::not_found("box"))?;
        let source_id = get_uuid(&row, "runner_id")?;
        let migrate_to = get_opt_uuid(&row, "migrate_to")?;
        let st: String = row.try_get("state")?;
        let st = parse_state(&st).unwrap_or(BoxState::Error);
        let desired: String = row.try_get("desired_state")?;
        if desired == "deleted" {
            return Err(Error::conflict(
                "box_deleted",
                "the box is deleted or being deleted",
            ));
        }
        let resources = Resources {
            cpu_millicores: get_u64(&row, "cpu")?,
            memory_mib: get_u64(&row, "memory")?,
            disk_mib: get_u64(&row, "disk")?,
        };
        if source_id == target.id {
            return Ok(None); // already there
        }
        if let Some(prev) = migrate_to
            && prev != target.id
        {
            // An earlier move to another runner never finished: give its room back.
            release(&mut tx, &prev.to_string(), &resources).await?;
        }
        if migrate_to != Some(target.id)
            && !reserve(&mut tx, &target_id, &resources, cutoff, now).await?
        {
            let why = match target.state(cutoff) {
                protocol::RunnerState::Ready => {
                    return Err(Error::unavailable(
                        "no_capacity",
                        format!("runner {target_name} has no room for this box"),
                    ));
                }
                other => format!("{other:?}").to_lowercase(),
            };
            return Err(Error::conflict(
                "runner_unavailable",
                format!("runner {target_name} is {why}; it cannot take boxes"),
            ));
        }
        // A resumed move does not know the state before it; the source's next report corrects it.
        let restore_state = if st == BoxState::Migrating {
            BoxState::Stopped
        } else {
            st
        };
        sqlx::query(
            "UPDATE boxes SET state = 'migrating', migrate_to = $1, updated_at = $2 WHERE id = $3",
        )
        .bind(&target_id)
        .bind(now)
        .bind(box_id.to_string())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Some(Plan {
            source_id,
            resources,
            restore_state,
            copy: restore_state != BoxState::Pending,
        }))
    })
    .await?;
    let Some(plan) = plan else {
        return boxes::get_any(state, box_id).await;
    };
    tracing::info!(r#box = %box_id, to = target_name, "moving box");

    if plan.copy {
        let source_id = plan.source_id.to_string();
        let mut attempt = 1;
        let copied = loop {
            let r = async {
                let source = endpoint(state, &source_id).await?;
                let dest = endpoint(state, &target_id).await?;
                copy(state, &source, &dest, &target_id, box_id).await
            }
            .await;
            match r {
                // A runner whose agent just restarted has a new key (see
                // `runners::healthcheck`): read the keys again, once.
                Err(e) if attempt == 1 && key_refused(&e) => {
                    tracing::info!(r#box = %box_id, error = %e, "a runner refused its key; retrying the copy with the current keys");
                    attempt += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                }
                r => break r,
            }
        };
        if let Err(e) = copied {
            abandon(state, box_id, &target_id, &plan).await?;
            tracing::warn!(r#box = %box_id, to = target_name, error = %e, "move abandoned");
            return Err(e);
        }
    }

    let new_state = if plan.copy {
        BoxState::Stopped
    } else {
        BoxState::Pending
    };
    let source_id = plan.source_id.to_string();
    retry(|| async {
        let now = state.clock.now_ms();
        let mut tx = state.db.begin().await?;
        let n = sqlx::query(
            "UPDATE boxes SET runner_id = $1, migrate_to = NULL, state = $2, error = NULL, updated_at = $3 \
             WHERE id = $4 AND migrate_to = $1",
        )
        .bind(&target_id)
        .bind(state_str(new_state))
        .bind(now)
        .bind(box_id.to_string())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n == 0 {
            return Err(Error::conflict(
                "move_aborted",
                "the move was cancelled meanwhile (target decommissioned or box deleted)",
            ));
        }
        release(&mut tx, &source_id, &plan.resources).await?;
        tx.commit().await?;
        Ok(())
    })
    .await?;
    tracing::info!(r#box = %box_id, to = target_name, "box moved");
    // The target holds the copy stopped; it starts it on its next check-in: now.
    runners::poke(state, target_name);
    boxes::get_any(state, box_id).await
}

async fn abandon(state: &AppState, box_id: Uuid, target_id: &str, plan: &Plan) -> Result<()> {
    retry(|| async {
        let mut tx = state.db.begin().await?;
        let n = sqlx::query(
            "UPDATE boxes SET migrate_to = NULL, state = $1, updated_at = $2 WHERE id = $3 AND migrate_to = $4",
        )
        .bind(state_str(plan.restore_state))
        .bind(state.clock.now_ms())
        .bind(box_id.to_string())
        .bind(target_id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n == 1 {
            release(&mut tx, target_id, &plan.resources).await?;
        }
        tx.commit().await?;
        Ok(())
    })
    .await
}

/// True when a runner refused the key we presented: 401, or 503
/// `not_registered` from an agent that has no key yet.
fn key_refused(e: &Error) -> bool {
    e.status == axum::http::StatusCode::UNAUTHORIZED
        || (e.status == axum::http::StatusCode::SERVICE_UNAVAILABLE && e.code == "not_registered")
}

/// Stream the export of `box_id` from `source` into the import of `dest`
/// (runner `dest_id`), verifying the archive's SHA-256. Returns it.
///
/// The import is announced to `dest` once the archive is ready to stream:
/// a one-time token ([`crate::imports`]), which the import presents and
/// which is withdrawn when the import returned, whatever the outcome.
async fn copy(
    state: &AppState,
    source: &RunnerEndpoint,
    dest: &RunnerEndpoint,
    dest_id: &str,
    box_id: Uuid,
) -> Result<String> {
    let export = state
        .http
        .get(source.url(&format!("/api/boxes/{box_id}/export")))
        .bearer_auth(source.api_key.expose())
        .send()
        .await
        .map_err(|e| unreachable(&source.name, e))?;
    if !export.status().is_success() {
        return Err(runner_error(&source.name, export).await);
    }
    let announced = export
        .headers()
        .get(ARCHIVE_SHA256_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| is_sha256_hex(v))
        .map(str::to_ascii_lowercase)
        .ok_or_else(|| {
            Error::bad_gateway(
                "runner_error",
                format!(
                    "runner {} sent an export without a valid {ARCHIVE_SHA256_HEADER}",
                    source.name
                ),
            )
        })?;
    let hasher = Arc::new(Mutex::new(Sha256::new()));
    let h = hasher.clone();
    let body = export.bytes_stream().map(move |chunk| {
        if let Ok(c) = &chunk {
            h.lock().expect("hasher lock").update(c);
        }
        chunk
    });
    let token = imports::announce(state, box_id, dest_id, Purpose::Move).await?;
    // The target learns of the import from its next healthcheck: ask for it
    // now (it also checks in by itself when an import it does not know yet
    // arrives).
    runners::poke(state, &dest.name);
    let import = state
        .http
        .post(dest.url(&format!("/api/boxes/{box_id}/import")))
        .bearer_auth(dest.api_key.expose())
        .header(ARCHIVE_SHA256_HEADER, &announced)
        .header(IMPORT_TOKEN_HEADER, token.expose())
        .body(reqwest::Body::wrap_stream(body))
        .send()
        .await;
    // Used or not, the token has done its job.
    if let Err(e) = imports::withdraw(state, box_id, dest_id).await {
        tracing::warn!(r#box = %box_id, error = %e, "withdrawing the import token (it expires by itself)");
    }
    let import = import.map_err(|e| unreachable(&dest.name, e))?;
    if !import.status().is_success() {
        return Err(runner_error(&dest.name, import).await);
    }
    let seen = hex::encode(hasher.lock().expect("hasher lock").clone().finalize());
    if seen != announced {
        return Err(Error::bad_gateway(
            "archive_corrupt",
            format!(
                "the archive from runner {} does not match its SHA-256 (sent {announced}, got {seen})",
                source.name
            ),
        ));
    }
    Ok(seen)
}
