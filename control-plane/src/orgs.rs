//! Organizations, their API keys and OIDC users; seeding the admin key.

use protocol::{
    ApiKeyInfo, CreateApiKeyRequest, CreateApiKeyResponse, CreateOrganizationRequest,
    CreateOrganizationResponse, CreateUserRequest, OrganizationInfo, UserInfo,
};
use sqlx::Row;
use sqlx::any::AnyRow;
use uuid::Uuid;

use crate::clock::{Clock, from_millis};
use crate::db::{Db, Tx, get_flag, get_uuid, retry};
use crate::error::{Error, Result};
use crate::tokens;

/// Name of the operators' organization created at first start.
pub const ADMIN_ORG_NAME: &str = "admin";
/// Name given to the key read from configuration.
pub const CONFIGURED_KEY_NAME: &str = "configured admin key";

/// Make sure the admin organization exists and `admin_key` is one of its
/// keys (stored as a hash). Idempotent; a revoked key stays revoked.
pub async fn ensure_admin(db: &Db, clock: &Clock, admin_key: &str) -> Result<()> {
    let hash = tokens::sha256_hex(admin_key);
    retry(|| async {
        let now = clock.now_ms();
        let mut tx = db.begin().await?;
        sqlx::query(
            "INSERT INTO organizations (id, name, is_admin, created_at) VALUES ($1, $2, 1, $3) ON CONFLICT DO NOTHING",
        )
        .bind(Uuid::now_v7().to_string())
        .bind(ADMIN_ORG_NAME)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        let org = sqlx::query("SELECT id FROM organizations WHERE is_admin = 1")
            .fetch_one(&mut *tx)
            .await?;
        let org_id = get_uuid(&org, "id")?;
        let existing = sqlx::query("SELECT organization_id, revoked_at FROM api_keys WHERE key_sha256 = $1")
            .bind(&hash)
            .fetch_optional(&mut *tx)
            .await?;
        match existing {
            None => {
                insert_key(&mut tx, org_id, CONFIGURED_KEY_NAME, admin_key, now).await?;
                tracing::info!(
                    prefix = %tokens::display_prefix(admin_key, protocol::API_KEY_PREFIX),
                    "added the configured admin key"
                );
            }
            Some(row) => {
                if get_uuid(&row, "organization_id")? != org_id {
                    return Err(Error::internal(anyhow::anyhow!(
                        "the configured admin key belongs to a non-admin organization"
                    )));
                }
                let revoked: Option<i64> = row.try_get("revoked_at")?;
                if revoked.is_some() {
                    tracing::warn!("the configured admin key was revoked and stays revoked; configure a new one");
                }
            }
        }
        tx.commit().await?;
        Ok(())
    })
    .await
}

async fn insert_key(
    tx: &mut Tx,
    org_id: Uuid,
    name: &str,
    key: &str,
    now: i64,
) -> Result<ApiKeyInfo> {
    let id = Uuid::now_v7();
    let prefix = tokens::display_prefix(key, protocol::API_KEY_PREFIX);
    sqlx::query(
        "INSERT INTO api_keys (id, organization_id, name, prefix, key_sha256, created_at) VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(id.to_string())
    .bind(org_id.to_string())
    .bind(name)
    .bind(&prefix)
    .bind(tokens::sha256_hex(key))
    .bind(now)
    .execute(&mut **tx)
    .await?;
    Ok(ApiKeyInfo {
        id,
        organization_id: org_id,
        name: name.to_string(),
        prefix,
        created_at: from_millis(now),
        revoked_at: None,
    })
}

fn validate_org_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if !ok {
        return Err(Error::bad_request(
            "invalid_name",
            "organization names are 1-63 lowercase letters, digits and '-', not starting or ending with '-'",
        ));
    }
    if name == ADMIN_ORG_NAME {
        return Err(Error::conflict(
            "name_taken",
            "the name `admin` is reserved",
        ));
    }
    Ok(())
}

fn validate_key_name(name: &str) -> Result<()> {
    if name.trim().is_empty() || name.chars().count() > 100 || name.chars().any(char::is_control) {
        return Err(Error::bad_request(
            "invalid_name",
            "key names are 1-100 characters without control characters",
        ));
    }
    Ok(())
}

fn org_from_row(r: &AnyRow) -> Result<OrganizationInfo> {
    Ok(OrganizationInfo {
        id: get_uuid(r, "id")?,
        name: r.try_get("name")?,
        admin: get_flag(r, "is_admin")?,
        created_at: from_millis(r.try_get("created_at")?),
    })
}

fn key_from_row(r: &AnyRow) -> Result<ApiKeyInfo> {
    let revoked: Option<i64> = r.try_get("revoked_at")?;
    Ok(ApiKeyInfo {
        id: get_uuid(r, "id")?,
        organization_id: get_uuid(r, "organization_id")?,
        name: r.try_get("name")?,
        prefix: r.try_get("prefix")?,
        created_at: from_millis(r.try_get("created_at")?),
        revoked_at: revoked.map(from_millis),
    })
}

fn user_from_row(r: &AnyRow) -> Result<UserInfo> {
    Ok(UserInfo {
        id: get_uuid(r, "id")?,
        organization_id: get_uuid(r, "organization_id")?,
        subject: r.try_get("subject")?,
        email: r.try_get("email")?,
        created_at: from_millis(r.try_get("created_at")?),
    })
}

/// Create an organization with a first API key (admin).
pub async fn create_org(
    db: &Db,
    clock: &Clock,
    req: &CreateOrganizationRequest,
) -> Result<CreateOrganizationResponse> {
    validate_org_name(&req.name)?;
    let key = tokens::generate(protocol::API_KEY_PREFIX);
    let res = retry(|| async {
        let now = clock.now_ms();
        let id = Uuid::now_v7();
        let mut tx = db.begin().await?;
        sqlx::query(
            "INSERT INTO organizations (id, name, is_admin, created_at) VALUES ($1, $2, 0, $3)",
        )
        .bind(id.to_string())
        .bind(&req.name)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        let info = insert_key(&mut tx, id, "initial key", &key, now).await?;
        tx.commit().await?;
        Ok(CreateOrganizationResponse {
            organization: OrganizationInfo {
                id,
                name: req.name.clone(),
                admin: false,
                created_at: from_millis(now),
            },
            api_key: CreateApiKeyResponse {
                info,
                key: key.clone(),
            },
        })
    })
    .await;
    res.map_err(|e| {
        if e.is_unique_violation() {
            Error::conflict(
                "name_taken",
                format!("an organization named {:?} exists", req.name),
            )
        } else {
            e
        }
    })
}

/// Every organization, by name.
pub async fn list_orgs(db: &Db) -> Result<Vec<OrganizationInfo>> {
    let rows =
        sqlx::query("SELECT id, name, is_admin, created_at FROM organizations ORDER BY name")
            .fetch_all(db.pool())
            .await?;
    rows.iter().map(org_from_row).collect()
}

/// One organization.
pub async fn get_org(db: &Db, id: Uuid) -> Result<OrganizationInfo> {
    let row = sqlx::query("SELECT id, name, is_admin, created_at FROM organizations WHERE id = $1")
        .bind(id.to_string())
        .fetch_optional(db.pool())
        .await?
        .ok_or_else(|| Error::not_found("organization"))?;
    org_from_row(&row)
}

/// Mint a new API key in `org_id`.
pub async fn create_key(
    db: &Db,
    clock: &Clock,
    org_id: Uuid,
    req: &CreateApiKeyRequest,
) -> Result<CreateApiKeyResponse> {
    validate_key_name(&req.name)?;
    let key = tokens::generate(protocol::API_KEY_PREFIX);
    retry(|| async {
        let mut tx = db.begin().await?;
        let info = insert_key(&mut tx, org_id, req.name.trim(), &key, clock.now_ms()).await?;
        tx.commit().await?;
        Ok(CreateApiKeyResponse {
            info,
            key: key.clone(),
        })
    })
    .await
}

/// The keys of `org_id`, oldest first.
pub async fn list_keys(db: &Db, org_id: Uuid) -> Result<Vec<ApiKeyInfo>> {
    let rows = sqlx::query(
        "SELECT id, organization_id, name, prefix, created_at, revoked_at FROM api_keys \
         WHERE organization_id = $1 ORDER BY id",
    )
    .bind(org_id.to_string())
    .fetch_all(db.pool())
    .await?;
    rows.iter().map(key_from_row).collect()
}

/// Revoke key `key_id` of `org_id` (idempotent); 404 when it is not that organization's.
pub async fn revoke_key(db: &Db, clock: &Clock, org_id: Uuid, key_id: Uuid) -> Result<ApiKeyInfo> {
    sqlx::query("UPDATE api_keys SET revoked_at = $1 WHERE id = $2 AND organization_id = $3 AND revoked_at IS NULL")
        .bind(clock.now_ms())
        .bind(key_id.to_string())
        .bind(org_id.to_string())
        .execute(db.pool())
        .await?;
    let row = sqlx::query(
        "SELECT id, organization_id, name, prefix, created_at, revoked_at FROM api_keys \
         WHERE id = $1 AND organization_id = $2",
    )
    .bind(key_id.to_string())
    .bind(org_id.to_string())
    .fetch_optional(db.pool())
    .await?
    .ok_or_else(|| Error::not_found("API key"))?;
    key_from_row(&row)
}

/// Add an OIDC user to `org_id` (admin).
pub async fn create_user(
    db: &Db,
    clock: &Clock,
    org_id: Uuid,
    req: &CreateUserRequest,
) -> Result<UserInfo> {
    let subject = req.subject.trim();
    if subject.is_empty() || subject.len() > 255 || subject.chars().any(char::is_control) {
        return Err(Error::bad_request(
            "invalid_subject",
            "subject is 1-255 characters without control characters",
        ));
    }
    if req
        .email
        .as_ref()
        .is_some_and(|e| e.len() > 320 || !e.contains('@'))
    {
        return Err(Error::bad_request(
            "invalid_email",
            "email must be an address",
        ));
    }
    get_org(db, org_id).await?;
    let now = clock.now_ms();
    let id = Uuid::now_v7();
    let res = sqlx::query("INSERT INTO users (id, organization_id, subject, email, created_at) VALUES ($1, $2, $3, $4, $5)")
        .bind(id.to_string())
        .bind(org_id.to_string())
        .bind(subject)
        .bind(req.email.clone())
        .bind(now)
        .execute(db.pool())
        .await;
    match res {
        Ok(_) => Ok(UserInfo {
            id,
            organization_id: org_id,
            subject: subject.to_string(),
            email: req.email.clone(),
            created_at: from_millis(now),
        }),
        Err(e) => {
            let e = Error::from(e);
            if e.is_unique_violation() {
                Err(Error::conflict(
                    "subject_taken",
                    "a user with this subject exists",
                ))
            } else {
                Err(e)
            }
        }
    }
}

/// The users of `org_id`.
pub async fn list_users(db: &Db, org_id: Uuid) -> Result<Vec<UserInfo>> {
    get_org(db, org_id).await?;
    let rows = sqlx::query(
        "SELECT id, organization_id, subject, email, created_at FROM users WHERE organization_id = $1 ORDER BY id",
    )
    .bind(org_id.to_string())
    .fetch_all(db.pool())
    .await?;
    rows.iter().map(user_from_row).collect()
}
