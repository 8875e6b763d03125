//! Concurrent one-shot execs per organization, bounded across replicas.
//!
//! An exec holds one of its organization's `exec_max_concurrent_per_org`
//! slots (rows of `exec_slots`) while it runs; with every slot taken the
//! next one is refused with 429 `too_many_execs` and `Retry-After`. Taking,
//! renewing and giving back a slot are short transactions: no database
//! connection is held while the exec itself runs, however long it takes.
//! A slot is a lease of [`LEASE`] that its holder renews every third of it,
//! so the slots of a replica that died free themselves within [`LEASE`].

use std::time::Duration;

use sqlx::Row;
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::clock::Millis;
use crate::db::retry;
use crate::error::{Error, Result};
use crate::state::AppState;

/// How long a slot stays taken without a renewal.
pub const LEASE: Duration = Duration::from_secs(30);
/// `Retry-After` of a refused exec, in seconds.
pub const RETRY_AFTER_SECS: u64 = 2;

/// A taken slot. [`ExecSlot::release`] gives it back; dropping it (a client
/// that went away mid-exec cancels the handler) gives it back in the background.
#[derive(Debug)]
pub struct ExecSlot {
    state: AppState,
    organization_id: String,
    holder: String,
    renew: JoinHandle<()>,
    released: bool,
}

enum Take {
    Got,
    Full,
    /// Another replica or request took the slot first: look again.
    Raced,
}

/// Take a slot of organization `org_id` (`org_name` for the refusal's message).
pub async fn acquire(state: &AppState, org_id: Uuid, org_name: &str) -> Result<ExecSlot> {
    let limit = i64::from(state.config.exec_max_concurrent_per_org);
    let organization_id = org_id.to_string();
    let holder = Uuid::new_v4().to_string();
    for _ in 0..limit + 4 {
        match retry(|| try_take(state, &organization_id, &holder, limit)).await? {
            Take::Got => {
                let renew = tokio::spawn(renew_loop(
                    state.clone(),
                    organization_id.clone(),
                    holder.clone(),
                ));
                return Ok(ExecSlot {
                    state: state.clone(),
                    organization_id,
                    holder,
                    renew,
                    released: false,
                });
            }
            Take::Full => break,
            Take::Raced => continue,
        }
    }
    Err(Error::too_many(
        "too_many_execs",
        format!(
            "organization {org_name} already runs {limit} one-shot execs, its limit; retry when one ends"
        ),
        RETRY_AFTER_SECS,
    ))
}

fn lease_end(state: &AppState) -> Millis {
    state.clock.now_ms() + LEASE.as_millis() as Millis
}

async fn try_take(state: &AppState, org: &str, holder: &str, limit: i64) -> Result<Take> {
    let now = state.clock.now_ms();
    let until = lease_end(state);
    let mut tx = state.db.begin().await?;
    // A free slot: released, or its holder's lease ran out.
    let free = sqlx::query(
        "SELECT slot FROM exec_slots WHERE organization_id = $1 AND slot < $2 \
         AND (holder IS NULL OR expires_at <= $3) ORDER BY slot LIMIT 1",
    )
    .bind(org)
    .bind(limit)
    .bind(now)
    .fetch_optional(&mut *tx)
    .await?;
    let taken = if let Some(row) = free {
        let slot: i64 = row.try_get("slot")?;
        sqlx::query(
            "UPDATE exec_slots SET holder = $1, expires_at = $2 \
             WHERE organization_id = $3 AND slot = $4 AND (holder IS NULL OR expires_at <= $5)",
        )
        .bind(holder)
        .bind(until)
        .bind(org)
        .bind(slot)
        .bind(now)
        .execute(&mut *tx)
        .await?
        .rows_affected()
    } else {
        // Every existing slot is taken: make a new one, if the limit allows.
        let rows =
            sqlx::query("SELECT slot FROM exec_slots WHERE organization_id = $1 AND slot < $2")
                .bind(org)
                .bind(limit)
                .fetch_all(&mut *tx)
                .await?;
        let used = rows
            .iter()
            .map(|r| r.try_get::<i64, _>("slot"))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let Some(slot) = (0..limit).find(|s| !used.contains(s)) else {
            return Ok(Take::Full);
        };
        sqlx::query(
            "INSERT INTO exec_slots (organization_id, slot, holder, expires_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (organization_id, slot) DO NOTHING",
        )
        .bind(org)
        .bind(slot)
        .bind(holder)
        .bind(until)
        .execute(&mut *tx)
        .await?
        .rows_affected()
    };
    if taken == 1 {
        tx.commit().await?;
        Ok(Take::Got)
    } else {
        Ok(Take::Raced)
    }
}

async fn renew_loop(state: AppState, org: String, holder: String) {
    let mut tick = tokio::time::interval(LEASE / 3);
    tick.tick().await;
    loop {
        tick.tick().await;
        let until = lease_end(&state);
        let renewed = retry(|| async {
            let mut tx = state.db.begin().await?;
            sqlx::query(
                "UPDATE exec_slots SET expires_at = $1 WHERE organization_id = $2 AND holder = $3",
            )
            .bind(until)
            .bind(&org)
            .bind(&holder)
            .execute(&mut *tx)
            .await?;
            tx.commit().await
        })
        .await;
        if let Err(e) = renewed {
            tracing::warn!(error = %e, "could not renew an exec slot; it may be given to another exec");
        }
    }
}

async fn give_back(state: &AppState, org: &str, holder: &str) {
    let done = retry(|| async {
        let mut tx = state.db.begin().await?;
        sqlx::query(
            "UPDATE exec_slots SET holder = NULL, expires_at = 0 \
             WHERE organization_id = $1 AND holder = $2",
        )
        .bind(org)
        .bind(holder)
        .execute(&mut *tx)
        .await?;
        tx.commit().await
    })
    .await;
    if let Err(e) = done {
        tracing::warn!(error = %e, "could not give back an exec slot; it frees itself when its lease ends");
    }
}

impl ExecSlot {
    /// Give the slot back now.
    pub async fn release(mut self) {
        self.released = true;
        self.renew.abort();
        give_back(&self.state, &self.organization_id, &self.holder).await;
    }
}

impl Drop for ExecSlot {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        self.renew.abort();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let state = self.state.clone();
            let org = std::mem::take(&mut self.organization_id);
            let holder = std::mem::take(&mut self.holder);
            rt.spawn(async move { give_back(&state, &org, &holder).await });
        }
    }
}
