//! What every request handler shares.

use std::ops::Deref;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use tokio_util::sync::CancellationToken;

use crate::clock::{Clock, Millis};
use crate::config::Config;
use crate::db::Db;
use crate::oidc::OidcVerifier;

/// Shared state (cheap to clone).
#[derive(Clone, Debug)]
pub struct AppState(Arc<Inner>);

/// The shared parts.
#[derive(Debug)]
pub struct Inner {
    /// Database.
    pub db: Db,
    /// Settings.
    pub config: Config,
    /// Time.
    pub clock: Clock,
    /// OIDC verifier, when configured.
    pub oidc: Option<OidcVerifier>,
    /// HTTP client for runners (exec, export/import).
    pub http: reqwest::Client,
    /// Process start, for uptime.
    pub started: Instant,
    /// Cancelled at shutdown: long-lived sessions (WebSocket relays) end.
    pub shutdown: CancellationToken,
    /// The OpenAPI document, rendered once.
    pub openapi: Bytes,
}

impl AppState {
    /// Wrap the parts.
    pub fn new(inner: Inner) -> Self {
        AppState(Arc::new(inner))
    }

    /// The shared parts, if this is the only handle.
    pub fn into_inner(self) -> Arc<Inner> {
        self.0
    }

    /// Runners last seen before this instant are unresponsive.
    pub fn responsive_cutoff(&self, now: Millis) -> Millis {
        now - self.config.runner_unresponsive_after.as_millis() as Millis
    }
}

impl Deref for AppState {
    type Target = Inner;

    fn deref(&self) -> &Inner {
        &self.0
    }
}
