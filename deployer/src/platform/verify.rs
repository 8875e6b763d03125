//! After a deploy: wait until the declared runners report ready, then prove
//! the platform works end to end with a throwaway box.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use protocol::{BoxState, CreateBoxRequest, ExecRequest, RunnerState};
use uuid::Uuid;

use super::client::Client;

/// Wait until every runner in `names` is `ready`; fails naming the laggards.
pub async fn wait_ready(
    client: &Client,
    names: &[String],
    timeout: Duration,
) -> anyhow::Result<Duration> {
    let t0 = Instant::now();
    loop {
        let runners = client.runners().await.context("listing runners")?;
        let not_ready: Vec<String> = names
            .iter()
            .filter(|n| {
                !runners
                    .iter()
                    .any(|r| &r.name == *n && r.state == RunnerState::Ready)
            })
            .map(|n| {
                let state = runners.iter().find(|r| &r.name == n).map_or_else(
                    || "not registered".to_string(),
                    |r| format!("{:?}", r.state).to_lowercase(),
                );
                format!("{n} ({state})")
            })
            .collect();
        if not_ready.is_empty() {
            return Ok(t0.elapsed());
        }
        if t0.elapsed() >= timeout {
            bail!(
                "runners not ready after {}s: {}; look at their logs",
                timeout.as_secs(),
                not_ready.join(", ")
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Wait until a box reaches `state`; fails with its last error.
pub async fn wait_box(
    client: &Client,
    id: Uuid,
    state: BoxState,
    timeout: Duration,
) -> anyhow::Result<()> {
    let t0 = Instant::now();
    loop {
        let b = client.get_box(id).await?;
        if b.state == state {
            return Ok(());
        }
        if b.state == BoxState::Error {
            bail!(
                "box {id} failed: {}",
                b.error.unwrap_or_else(|| "no error reported".into())
            );
        }
        if t0.elapsed() >= timeout {
            bail!(
                "box {id} is {:?}, not {state:?}, after {}s",
                b.state,
                timeout.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Create a box, run a command in it, delete it; the time it took.
pub async fn smoke(client: &Client, timeout: Duration) -> anyhow::Result<Duration> {
    let t0 = Instant::now();
    let mut labels = std::collections::BTreeMap::new();
    labels.insert(
        "boxlite.dev/purpose".to_string(),
        "boxctl-smoke-check".to_string(),
    );
    let b = client
        .create_box(&CreateBoxRequest {
            labels,
            ..CreateBoxRequest::default()
        })
        .await
        .context("smoke check: creating a box")?;
    let outcome = async {
        wait_box(client, b.id, BoxState::Running, timeout).await?;
        let out = client
            .exec(
                b.id,
                &ExecRequest {
                    command: vec![
                        "sh".into(),
                        "-c".into(),
                        "echo boxlite-smoke-$((6*7))".into(),
                    ],
                    timeout_secs: Some(30),
                    ..ExecRequest::default()
                },
            )
            .await
            .context("smoke check: running a command")?;
        let (stdout, stderr) = (out.stdout_lossy(), out.stderr_lossy());
        if out.exit_code != 0 || stdout.trim() != "boxlite-smoke-42" {
            bail!(
                "smoke check: the command in box {} answered exit {} with {stdout:?} (stderr {stderr:?})",
                b.id,
                out.exit_code,
            );
        }
        anyhow::Ok(())
    }
    .await;
    // Delete the box whatever happened, and report the first problem.
    let deleted = client
        .delete_box(b.id)
        .await
        .context("smoke check: deleting the box");
    outcome?;
    deleted?;
    Ok(t0.elapsed())
}
