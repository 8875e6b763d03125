//! Putting it together: connect and migrate the database, seed the admin
//! key, build the router, serve until told to stop, then shut down gracefully.

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::Router;
use axum::body::Bytes;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::api::{self, SHUTDOWN_GRACE};
use crate::clock::Clock;
use crate::config::Config;
use crate::db::Db;
use crate::oidc::OidcVerifier;
use crate::openapi;
use crate::orgs;
use crate::state::{AppState, Inner};

/// A ready-to-serve control plane.
#[derive(Debug)]
pub struct Server {
    state: AppState,
}

impl Server {
    /// Connect to the database, migrate it, seed the admin key. `clock` is
    /// [`Clock::system`] outside tests.
    pub async fn new(config: Config, clock: Clock) -> anyhow::Result<Server> {
        let db = Db::connect(
            config.database_url.expose(),
            config.database_max_connections,
        )
        .await?;
        db.migrate().await?;
        orgs::ensure_admin(&db, &clock, config.admin_key.expose())
            .await
            .map_err(|e| anyhow::anyhow!("seed the admin organization and key: {e}"))?;
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .pool_idle_timeout(Duration::from_secs(60))
            .user_agent(concat!("boxlite-control-plane/", env!("CARGO_PKG_VERSION")))
            .build()
            .context("build the HTTP client")?;
        let oidc = config
            .oidc
            .as_ref()
            .map(|o| OidcVerifier::new(o, http.clone(), clock.clone()));
        let doc = serde_json::to_vec_pretty(&openapi::document(&api::routes()))
            .context("render the OpenAPI document")?;
        let state = AppState::new(Inner {
            db,
            config,
            clock,
            oidc,
            http,
            started: Instant::now(),
            shutdown: CancellationToken::new(),
            openapi: Bytes::from(doc),
        });
        register_declared(&state).await?;
        Ok(Server { state })
    }

    /// Replace the OIDC verifier (tests tune its refresh limits).
    pub fn with_oidc(self, verifier: OidcVerifier) -> Server {
        let inner =
            std::sync::Arc::try_unwrap(self.state.into_inner()).expect("state not shared yet");
        Server {
            state: AppState::new(Inner {
                oidc: Some(verifier),
                ..inner
            }),
        }
    }

    /// Shared state.
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// The router with every route and middleware.
    pub fn router(&self) -> Router {
        api::router(self.state.clone(), api::routes())
    }

    /// Serve on `listener` until `shutdown` completes; then stop accepting,
    /// end WebSocket sessions, give in-flight requests up to 30 s, and close
    /// the database pool.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let token = self.state.shutdown.clone();
        let app = self.router();
        let graceful = {
            let token = token.clone();
            async move { token.cancelled().await }
        };
        let serving = axum::serve(listener, app).with_graceful_shutdown(graceful);
        let serving = std::pin::pin!(serving.into_future());
        let signal = async move {
            shutdown.await;
            tracing::info!("shutting down: no new connections; finishing in-flight requests");
            token.cancel();
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        };
        tokio::select! {
            r = serving => r.context("serve HTTP")?,
            _ = signal => tracing::warn!("requests still running after {}s; closing them", SHUTDOWN_GRACE.as_secs()),
        }
        self.state.db.close().await;
        tracing::info!("stopped");
        Ok(())
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("install the SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("install the SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}

/// Register the runners the deployment declares (their token hashes from the
/// configuration). A runner registered with another token is left as it is
/// and reported: decommissioning it lets it come back with the new one.
async fn register_declared(state: &AppState) -> anyhow::Result<()> {
    for (name, hash) in &state.config.declared_runners {
        let req = protocol::runners::RegisterRunnerRequest {
            name: name.clone(),
            token_sha256: Some(hash.clone()),
        };
        match crate::runners::register(state, &req).await {
            Ok(r) if r.created => tracing::info!(runner = %name, "registered declared runner"),
            Ok(_) => {}
            Err(e) if e.status == axum::http::StatusCode::CONFLICT => tracing::warn!(
                runner = %name,
                "declared runner is registered with another token; decommission it to register the new one: {e}"
            ),
            Err(e) => anyhow::bail!("registering declared runner {name}: {e}"),
        }
    }
    Ok(())
}
