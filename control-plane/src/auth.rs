//! Who is calling: `Authorization: Bearer` with an API key (`bxk_…`), an OIDC
//! access token (a JWT), or a runner token (`bxr_…`). Keys and runner tokens
//! are looked up by their SHA-256; nothing secret is stored or logged.
//!
//! Refusals are uniform: no or unusable credentials → 401; valid credentials
//! of the wrong kind (a runner token on a user route, a user on a runner
//! route, a non-admin on an admin route) → 403; another organization's box →
//! 404, so ids do not leak across organizations.

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use protocol::AuthMethod;
use sqlx::Row;
use uuid::Uuid;

use crate::db::{get_flag, get_uuid};
use crate::error::{Error, Result};
use crate::state::AppState;
use crate::tokens::sha256_hex;

/// Longest bearer credential accepted.
const MAX_TOKEN_LEN: usize = 16 * 1024;

/// A member of an organization (API key or OIDC user).
#[derive(Clone, Debug)]
pub struct Member {
    /// Organization acted for.
    pub organization_id: Uuid,
    /// Its name.
    pub organization_name: String,
    /// Member of the operators' organization: may call the admin API.
    pub admin: bool,
    /// How they authenticated.
    pub method: AuthMethod,
    /// The user (OIDC).
    pub user_id: Option<Uuid>,
    /// The key (API key).
    pub api_key_id: Option<Uuid>,
}

/// A runner, by its token.
#[derive(Clone, Debug)]
pub struct RunnerIdentity {
    /// Runner id.
    pub id: Uuid,
    /// Runner name.
    pub name: String,
}

/// Any authenticated caller.
#[derive(Clone, Debug)]
pub enum Principal {
    /// A user or API key.
    Member(Member),
    /// A runner.
    Runner(RunnerIdentity),
}

/// Extractor: an organization member (user routes).
#[derive(Clone, Debug)]
pub struct Caller(pub Member);

/// Extractor: a member of the admin organization (admin routes).
#[derive(Clone, Debug)]
pub struct Admin(pub Member);

/// Extractor: a runner (runner routes).
#[derive(Clone, Debug)]
pub struct RunnerCaller(pub RunnerIdentity);

/// Why a runner token is refused outside the runner endpoints.
const RUNNER_ONLY: &str = "runner tokens may only call the runner endpoints";

impl FromRequestParts<AppState> for Caller {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self> {
        match authenticate(state, parts).await? {
            Principal::Member(m) => Ok(Caller(m)),
            Principal::Runner(_) => Err(Error::forbidden(RUNNER_ONLY)),
        }
    }
}

impl FromRequestParts<AppState> for Admin {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self> {
        match authenticate(state, parts).await? {
            Principal::Member(m) if m.admin => Ok(Admin(m)),
            Principal::Member(_) => Err(Error::forbidden(
                "the admin API needs a key or user of the admin organization",
            )),
            Principal::Runner(_) => Err(Error::forbidden(RUNNER_ONLY)),
        }
    }
}

impl FromRequestParts<AppState> for RunnerCaller {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self> {
        match authenticate(state, parts).await? {
            Principal::Runner(r) => Ok(RunnerCaller(r)),
            Principal::Member(_) => Err(Error::forbidden(
                "this endpoint is for runners (runner token required)",
            )),
        }
    }
}

/// Authenticate the request's bearer credential.
pub async fn authenticate(state: &AppState, parts: &Parts) -> Result<Principal> {
    let token = bearer(parts)?;
    let principal = if token.starts_with(protocol::API_KEY_PREFIX) {
        Principal::Member(
            member_by_api_key(state, token)
                .await?
                .ok_or_else(|| Error::unauthorized("invalid or revoked API key"))?,
        )
    } else if !token.starts_with(protocol::RUNNER_TOKEN_PREFIX) && looks_like_jwt(token) {
        let Some(oidc) = &state.oidc else {
            return Err(Error::unauthorized(
                "OIDC tokens are not accepted: OIDC is not configured",
            ));
        };
        let claims = oidc.verify(token).await?;
        Principal::Member(member_by_subject(state, &claims.sub).await?.ok_or_else(|| {
            Error::forbidden("this OIDC user is not a member of any organization; ask an operator to add them")
        })?)
    } else {
        // Runner tokens (`bxr_…`, or whatever boxctl minted): looked up by hash.
        Principal::Runner(
            runner_by_token(state, token)
                .await?
                .ok_or_else(|| Error::unauthorized("invalid credentials"))?,
        )
    };
    record(&principal);
    Ok(principal)
}

fn record(p: &Principal) {
    let span = tracing::Span::current();
    match p {
        Principal::Member(m) => {
            span.record("org", tracing::field::display(m.organization_id));
        }
        Principal::Runner(r) => {
            span.record("runner", tracing::field::display(&r.name));
        }
    }
}

fn bearer(parts: &Parts) -> Result<&str> {
    let value = parts.headers.get(AUTHORIZATION).ok_or_else(|| {
        Error::unauthorized("missing credentials: send Authorization: Bearer <key or token>")
    })?;
    let value = value
        .to_str()
        .map_err(|_| Error::unauthorized("malformed Authorization header"))?;
    let (scheme, token) = value
        .split_once(' ')
        .ok_or_else(|| Error::unauthorized("Authorization must be `Bearer <key or token>`"))?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(Error::unauthorized(
            "Authorization must use the Bearer scheme",
        ));
    }
    let token = token.trim();
    if token.is_empty() || token.len() > MAX_TOKEN_LEN || token.contains(char::is_whitespace) {
        return Err(Error::unauthorized("malformed bearer credential"));
    }
    Ok(token)
}

fn looks_like_jwt(token: &str) -> bool {
    token.split('.').count() == 3
}

async fn member_by_api_key(state: &AppState, key: &str) -> Result<Option<Member>> {
    let row = sqlx::query(
        "SELECT k.id AS key_id, o.id AS org_id, o.name AS org_name, o.is_admin \
         FROM api_keys k JOIN organizations o ON o.id = k.organization_id \
         WHERE k.key_sha256 = $1 AND k.revoked_at IS NULL",
    )
    .bind(sha256_hex(key))
    .fetch_optional(state.db.pool())
    .await?;
    row.map(|r| {
        Ok(Member {
            organization_id: get_uuid(&r, "org_id")?,
            organization_name: r.try_get("org_name")?,
            admin: get_flag(&r, "is_admin")?,
            method: AuthMethod::ApiKey,
            user_id: None,
            api_key_id: Some(get_uuid(&r, "key_id")?),
        })
    })
    .transpose()
}

async fn member_by_subject(state: &AppState, subject: &str) -> Result<Option<Member>> {
    let row = sqlx::query(
        "SELECT u.id AS user_id, o.id AS org_id, o.name AS org_name, o.is_admin \
         FROM users u JOIN organizations o ON o.id = u.organization_id WHERE u.subject = $1",
    )
    .bind(subject)
    .fetch_optional(state.db.pool())
    .await?;
    row.map(|r| {
        Ok(Member {
            organization_id: get_uuid(&r, "org_id")?,
            organization_name: r.try_get("org_name")?,
            admin: get_flag(&r, "is_admin")?,
            method: AuthMethod::Oidc,
            user_id: Some(get_uuid(&r, "user_id")?),
            api_key_id: None,
        })
    })
    .transpose()
}

async fn runner_by_token(state: &AppState, token: &str) -> Result<Option<RunnerIdentity>> {
    let row = sqlx::query(
        "SELECT id, name FROM runners WHERE token_sha256 = $1 AND decommissioned_at IS NULL",
    )
    .bind(sha256_hex(token))
    .fetch_optional(state.db.pool())
    .await?;
    row.map(|r| {
        Ok(RunnerIdentity {
            id: get_uuid(&r, "id")?,
            name: r.try_get("name")?,
        })
    })
    .transpose()
}
