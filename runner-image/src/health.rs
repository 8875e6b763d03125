//! The healthcheck loop: report to the control plane, apply its actions.
//!
//! Every `interval_secs` (from the last answer, 1–60 s; 5 s before the
//! first) the agent sends `POST {control_plane_url}/api/runners/healthcheck`
//! with its token, version, address, capacity, usage summed from the boxes'
//! cgroups, every box with its state, and this process's random
//! `agent_instance`. The answer is level-triggered: the agent persists the
//! `api_key` it carries, takes note of the imports it announces (see
//! [`crate::imports`]), and applies each action in the background (one
//! operation per box at a time; an action already in flight is not started
//! twice). When actions finish, the next check goes out at once so the
//! control plane sees the new states quickly.
//!
//! The control plane issues a new `api_key` when the `agent_instance`
//! changes, i.e. at the first check-in of every agent process. Until that
//! first check has an outcome, the API holds authenticated requests back
//! (up to [`FIRST_CHECK_WAIT`]) rather than accept the previous process's key,
//! so a key captured around a restart stops working the moment the new agent
//! is up — unless the control plane cannot be reached, when the persisted key
//! keeps the runner usable.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use protocol::{HealthcheckRequest, HealthcheckResponse, Resources, RunnerAction};
use uuid::Uuid;

use crate::agent::Agent;

/// Longest an authenticated API request waits for the first healthcheck of
/// this agent process to have an outcome.
pub const FIRST_CHECK_WAIT: Duration = Duration::from_secs(5);

/// Interval before the control plane has told us one.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);

/// What the runner can give to boxes in total.
pub fn capacity(agent: &Agent) -> Resources {
    let c = &agent.config;
    let cores = std::thread::available_parallelism()
        .map(|n| n.get() as u64)
        .unwrap_or(1);
    Resources {
        cpu_millicores: c
            .capacity_cpu_millicores
            .unwrap_or(cores * 1000 * c.cpu_overcommit),
        memory_mib: c
            .capacity_memory_mib
            .unwrap_or_else(|| crate::sys::mem_total_mib().saturating_sub(c.reserved_memory_mib)),
        disk_mib: c.capacity_disk_mib.unwrap_or_else(|| {
            crate::sys::fs_size_mib(&c.state_dir)
                .map(|(size, _)| size)
                .unwrap_or(0)
        }),
    }
}

/// The request body of one healthcheck.
pub fn build_request(agent: &Agent) -> HealthcheckRequest {
    let boxes = agent.boxes.reports();
    let mut usage = Resources::default();
    for b in &boxes {
        usage.cpu_millicores += b.usage.cpu_millicores;
        usage.memory_mib += b.usage.memory_mib;
        usage.disk_mib += b.usage.disk_mib;
    }
    HealthcheckRequest {
        version: crate::VERSION.to_string(),
        address: agent.config.advertise_url.clone(),
        capacity: capacity(agent),
        usage,
        binary_sha256: agent.binary_sha256(),
        agent_instance: Some(agent.instance.clone()),
        boxes,
    }
}

fn read_token(agent: &Agent) -> Result<String> {
    let t = std::fs::read_to_string(&agent.config.token_file)
        .with_context(|| format!("reading token file {}", agent.config.token_file.display()))?;
    let t = t.trim().to_string();
    if t.is_empty() {
        bail!("token file {} is empty", agent.config.token_file.display());
    }
    Ok(t)
}

/// Send one healthcheck and return the answer.
pub async fn check_once(agent: &Agent, client: &reqwest::Client) -> Result<HealthcheckResponse> {
    let token = read_token(agent)?;
    let url = format!("{}/api/runners/healthcheck", agent.config.control_plane_url);
    let resp = client
        .post(&url)
        .bearer_auth(token)
        .json(&build_request(agent))
        .send()
        .await
        .with_context(|| format!("POST {url}"))?;
    let status = resp.status();
    if !status.is_success() {
        let body = resp.text().await.unwrap_or_default();
        bail!(
            "control plane answered {status}: {}",
            body.chars().take(300).collect::<String>()
        );
    }
    resp.json::<HealthcheckResponse>()
        .await
        .context("malformed healthcheck answer")
}

type InFlight = Arc<Mutex<HashSet<(Uuid, &'static str)>>>;

fn action_key(a: &RunnerAction) -> (Uuid, &'static str) {
    match a {
        RunnerAction::Create { spec } => (spec.id, "create"),
        RunnerAction::Start { id } => (*id, "start"),
        RunnerAction::Stop { id } => (*id, "stop"),
        RunnerAction::Delete { id } => (*id, "delete"),
    }
}

/// Apply one action (idempotent).
pub async fn apply(agent: &Agent, action: RunnerAction) -> Result<()> {
    // A retiring runner deletes its boxes; it must not bring new ones up meanwhile.
    if agent.is_retiring()
        && matches!(
            action,
            RunnerAction::Create { .. } | RunnerAction::Start { .. }
        )
    {
        return Ok(());
    }
    match action {
        RunnerAction::Create { spec } => agent.boxes.create(spec).await,
        RunnerAction::Start { id } => agent.boxes.start(&id).await,
        RunnerAction::Stop { id } => agent.boxes.stop(&id).await,
        RunnerAction::Delete { id } => agent.boxes.delete(&id).await,
    }
}

/// The loop; runs until the process exits.
pub async fn run(agent: Arc<Agent>) {
    let client = match reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .connect_timeout(Duration::from_secs(5))
        .user_agent(format!("boxlite-runner/{}", crate::VERSION))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("cannot build the HTTP client: {e}");
            return;
        }
    };
    let in_flight: InFlight = Arc::new(Mutex::new(HashSet::new()));
    let mut interval;
    let mut failures: u32 = 0;
    let mut last_disk = std::time::Instant::now() - Duration::from_secs(3600);
    loop {
        agent.boxes.refresh();
        if last_disk.elapsed() > Duration::from_secs(30) {
            last_disk = std::time::Instant::now();
            let a = agent.clone();
            tokio::spawn(async move { a.boxes.refresh_disk(Duration::from_secs(60)).await });
        }
        let seq = agent.imports.begin_check();
        match check_once(&agent, &client).await {
            Ok(resp) => {
                if failures > 0 {
                    tracing::info!("healthcheck succeeded again after {failures} failures");
                }
                failures = 0;
                if let Err(e) = agent.set_api_key(&resp.api_key) {
                    tracing::error!("persisting the API key: {e:#}");
                }
                agent
                    .imports
                    .announce(seq, &resp.imports, time::OffsetDateTime::now_utc());
                interval = Duration::from_secs(resp.interval_secs.clamp(1, 60));
                for action in resp.actions {
                    let key = action_key(&action);
                    if !in_flight.lock().unwrap().insert(key) {
                        continue;
                    }
                    let a = agent.clone();
                    let inf = in_flight.clone();
                    tokio::spawn(async move {
                        let desc = format!("{} {}", key.1, key.0);
                        match apply(&a, action).await {
                            Ok(()) => tracing::info!("applied {desc}"),
                            Err(e) => tracing::warn!("{desc} failed: {e:#}"),
                        }
                        inf.lock().unwrap().remove(&key);
                        a.wake_healthcheck();
                    });
                }
            }
            Err(e) => {
                failures += 1;
                // Log the first failure and then every tenth, not every few seconds.
                if failures == 1 || failures.is_multiple_of(10) {
                    tracing::warn!("healthcheck failed ({failures}x): {e:#}");
                }
                interval = DEFAULT_INTERVAL.min(Duration::from_secs(u64::from(failures.min(5))));
            }
        }
        // Requests that waited for this process's first answer go ahead now,
        // with the key it brought (or, when the control plane did not answer,
        // the one from the previous process).
        agent.first_check_done();
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = agent.healthcheck_wakeup() => {
                // Let a burst of finishing actions settle into one report.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Validate an API key before persisting it.
pub fn valid_api_key(k: &str) -> Result<()> {
    if k.is_empty() || k.len() > 512 || k.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(anyhow!("the control plane sent an unusable API key"));
    }
    Ok(())
}
