//! Organizations, their users and API keys: the tenancy model of the API.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

/// An organization: owns boxes, users and API keys.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrganizationInfo {
    /// Organization id.
    pub id: Uuid,
    /// Unique name.
    pub name: String,
    /// True for the operators' organization seeded at first start: its
    /// members may call the admin API.
    pub admin: bool,
    /// Creation time.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

/// `POST /api/admin/organizations` body (admin).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateOrganizationRequest {
    /// Unique name: lowercase letters, digits and `-`, 1–63 characters.
    pub name: String,
}

/// `POST /api/admin/organizations` answer: the organization and its first API key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateOrganizationResponse {
    /// The new organization.
    pub organization: OrganizationInfo,
    /// Its first API key, shown this once.
    pub api_key: CreateApiKeyResponse,
}

/// An API key as listings show it (never the key itself).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKeyInfo {
    /// Key id.
    pub id: Uuid,
    /// Owning organization.
    pub organization_id: Uuid,
    /// Name given at creation.
    pub name: String,
    /// The first characters of the key (`bxk_AbCd1234`), to recognise it.
    pub prefix: String,
    /// Creation time.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// When it was revoked; revoked keys no longer authenticate.
    #[serde(
        default,
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub revoked_at: Option<OffsetDateTime>,
}

/// `POST /api/keys` body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateApiKeyRequest {
    /// A name to tell keys apart (1–100 characters).
    pub name: String,
}

/// `POST /api/keys` answer: the key, shown this once.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateApiKeyResponse {
    /// What listings show about it.
    pub info: ApiKeyInfo,
    /// The key (`bxk_…`); only its SHA-256 is stored.
    pub key: String,
}

/// A user: an OIDC subject who belongs to an organization.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserInfo {
    /// User id.
    pub id: Uuid,
    /// Organization.
    pub organization_id: Uuid,
    /// OIDC `sub` claim of the configured issuer.
    pub subject: String,
    /// E-mail, informational.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    /// Creation time.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

/// `POST /api/admin/organizations/{id}/users` body (admin).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateUserRequest {
    /// OIDC `sub` claim (1–255 characters).
    pub subject: String,
    /// E-mail, informational.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
}

/// How a caller authenticated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthMethod {
    /// An API key (`bxk_…`).
    ApiKey,
    /// An OIDC access token.
    Oidc,
}

/// `GET /api/me` answer: who the caller is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WhoAmI {
    /// Organization acted for.
    pub organization_id: Uuid,
    /// Its name.
    pub organization_name: String,
    /// Whether the caller may use the admin API.
    pub admin: bool,
    /// How the caller authenticated.
    pub auth: AuthMethod,
    /// The user, for OIDC callers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<Uuid>,
    /// The key, for API-key callers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_id: Option<Uuid>,
}
