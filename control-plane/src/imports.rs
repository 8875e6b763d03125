//! Import tokens: a runner imports a box's archive only when the control
//! plane announced it.
//!
//! To move a box (and, later, to restore one from a backup) the control plane
//! mints a one-time token for that box and that runner, stores its SHA-256
//! with a short expiry, and presents the token in the import request's
//! [`protocol::IMPORT_TOKEN_HEADER`]. The runner learns what to expect from
//! its own healthcheck answer ([`protocol::ImportGrant`]): a channel it opens
//! to the control plane with its runner token, which someone holding only the
//! runner's bearer key cannot forge. The runner accepts the token once, for
//! that box, until it expires; the control plane withdraws it when the import
//! returned, whatever the outcome.

use protocol::ImportGrant;
use sqlx::Row;
use uuid::Uuid;

use crate::clock::{Millis, from_millis};
use crate::config::Secret;
use crate::db::{Tx, get_uuid, retry};
use crate::error::{Error, Result};
use crate::state::AppState;
use crate::tokens;

/// How long an announced token is accepted. It is minted when the archive is
/// ready to stream, so it only has to outlive one healthcheck round trip.
pub const TOKEN_TTL_MS: Millis = 120_000;

/// Why a box is imported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    /// Moving it from another runner.
    Move,
    /// Restoring it from a backup.
    Restore,
}

impl Purpose {
    fn as_str(self) -> &'static str {
        match self {
            Purpose::Move => "move",
            Purpose::Restore => "restore",
        }
    }
}

/// Announce an import of `box_id` to runner `runner_id`: a new one-time token
/// (replacing any earlier one for the pair), of which only the hash is stored.
/// Returns the token, to be presented in the import request.
pub async fn announce(
    state: &AppState,
    box_id: Uuid,
    runner_id: &str,
    purpose: Purpose,
) -> Result<Secret> {
    let token = tokens::generate(protocol::IMPORT_TOKEN_PREFIX);
    let hash = tokens::sha256_hex(&token);
    retry(|| async {
        let now = state.clock.now_ms();
        let mut tx = state.db.begin().await?;
        sqlx::query("DELETE FROM box_imports WHERE expires_at <= $1 OR (box_id = $2 AND runner_id = $3)")
            .bind(now)
            .bind(box_id.to_string())
            .bind(runner_id)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO box_imports (box_id, runner_id, token_sha256, purpose, expires_at, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(box_id.to_string())
        .bind(runner_id)
        .bind(&hash)
        .bind(purpose.as_str())
        .bind(now + TOKEN_TTL_MS)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await
    })
    .await?;
    Ok(Secret::new(token))
}

/// Withdraw the announced import of `box_id` to `runner_id` (idempotent).
pub async fn withdraw(state: &AppState, box_id: Uuid, runner_id: &str) -> Result<()> {
    sqlx::query("DELETE FROM box_imports WHERE box_id = $1 AND runner_id = $2")
        .bind(box_id.to_string())
        .bind(runner_id)
        .execute(state.db.pool())
        .await?;
    Ok(())
}

/// The imports announced to `runner_id` that are still valid at `now`, for
/// its healthcheck answer.
pub async fn announced_to(tx: &mut Tx, runner_id: &str, now: Millis) -> Result<Vec<ImportGrant>> {
    let rows = sqlx::query(
        "SELECT box_id, token_sha256, expires_at FROM box_imports \
         WHERE runner_id = $1 AND expires_at > $2 ORDER BY box_id",
    )
    .bind(runner_id)
    .bind(now)
    .fetch_all(&mut **tx)
    .await?;
    rows.iter()
        .map(|r| {
            let expires_at: i64 = r.try_get("expires_at")?;
            Ok(ImportGrant {
                box_id: get_uuid(r, "box_id")?,
                token_sha256: r.try_get("token_sha256")?,
                expires_at: from_millis(expires_at),
            })
        })
        .collect::<Result<Vec<_>, Error>>()
}
