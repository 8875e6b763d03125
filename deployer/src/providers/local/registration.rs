//! Runner registrations: the control plane learns each runner's name and the
//! SHA-256 of the token boxctl minted for it, never the token itself.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use stack::{Props, Value};

use crate::engine::provider::ProviderError;
use crate::platform::client::{ApiKey, Client, ClientError};

/// Read the admin API key from its file under the stage directory.
pub fn admin_client(
    stage_dir: &Path,
    control_plane: &str,
    admin_key_path: &str,
) -> Result<Client, ProviderError> {
    let path = stage_dir.join(admin_key_path);
    let key = std::fs::read_to_string(&path).map_err(|e| {
        ProviderError::hard("read admin key", format!("{}: {e}", path.display()))
            .with_hint("the admin key is created by deploy; run `boxctl deploy` first")
    })?;
    Ok(Client::new(control_plane, ApiKey::new(key)))
}

/// Turn a client error into a provider error: unreachable and 5xx are
/// retryable (the control plane may still be starting), the rest is not.
pub fn provider_error(op: &str, e: ClientError) -> ProviderError {
    let retry = e.is_unreachable() || e.status().is_some_and(|s| s >= 500);
    let msg = e.to_string();
    if retry {
        ProviderError::retryable(op, msg)
    } else {
        ProviderError::hard(op, msg)
    }
}

/// Names of the runners the control plane at `control_plane` has registered
/// and not decommissioned; `None` when it cannot be asked (not running yet).
pub async fn registered(
    stage_dir: &Path,
    control_plane: &str,
    admin_key_path: &str,
) -> Option<BTreeSet<String>> {
    let client = admin_client(stage_dir, control_plane, admin_key_path).ok()?;
    match client.runners().await {
        Ok(runners) => Some(
            runners
                .into_iter()
                .filter(|r| r.state != protocol::RunnerState::Decommissioned)
                .map(|r| r.name)
                .collect(),
        ),
        Err(e) => {
            tracing::debug!("cannot list runners at {control_plane}: {e}");
            None
        }
    }
}

fn text<'a>(props: &'a Props, key: &str) -> Result<&'a str, ProviderError> {
    props.get(key).and_then(Value::as_str).ok_or_else(|| {
        ProviderError::hard("read properties", format!("registration has no `{key}`"))
    })
}

/// Register (or register again) the runner described by `props`.
pub async fn register(
    stage_dir: &Path,
    props: &Props,
    previous: Option<&Props>,
) -> Result<(), ProviderError> {
    let name = text(props, "name")?;
    let token_sha256 = text(props, "token_sha256")?;
    let client = admin_client(
        stage_dir,
        text(props, "control_plane")?,
        text(props, "admin_key_path")?,
    )?;
    let token_changed = previous
        .and_then(|p| p.get("token_sha256"))
        .is_some_and(|old| old.as_str() != Some(token_sha256));
    if token_changed {
        // A new token: the control plane refuses a second hash for a live
        // runner, so retire the old registration first (refused while boxes remain).
        match client.decommission(name, false).await {
            Ok(_) => {}
            Err(e) if e.status() == Some(404) => {}
            Err(e) => return Err(provider_error("decommission runner", e)),
        }
    }
    client
        .register_runner(name, token_sha256)
        .await
        .map(|_| ())
        .map_err(|e| match e.code() {
            Some("runner_exists") => ProviderError::hard("register runner", e.to_string()).with_hint(format!(
                "the control plane knows {name} with another token; retire it with `boxctl decommission {name}`"
            )),
            _ => provider_error("register runner", e),
        })
}

/// Decommission the runner (its boxes are abandoned: this is a teardown).
pub async fn deregister(stage_dir: &Path, props: &Props) -> Result<(), ProviderError> {
    let name = text(props, "name")?;
    let Ok(client) = admin_client(
        stage_dir,
        text(props, "control_plane")?,
        text(props, "admin_key_path")?,
    ) else {
        // No admin key: the control plane's credentials are gone, and it with them.
        return Ok(());
    };
    match client.decommission(name, true).await {
        Ok(_) => Ok(()),
        Err(e) if e.is_unreachable() || e.status() == Some(404) => Ok(()),
        Err(e) => Err(provider_error("decommission runner", e)),
    }
}

/// Group registration records by (control plane, admin key) so each control
/// plane is asked once per observation.
pub fn endpoints<'a>(records: impl Iterator<Item = &'a Props>) -> BTreeMap<(String, String), ()> {
    records
        .filter_map(|p| {
            Some((
                (
                    p.get("control_plane")?.as_str()?.to_string(),
                    p.get("admin_key_path")?.as_str()?.to_string(),
                ),
                (),
            ))
        })
        .collect()
}
