//! Rolling a runner artifact over a stage's runners: `max_concurrency` at a
//! time, stopping after `max_errors` failures, each runner confirmed through
//! the control plane (it reports the new binary's digest and is ready) before
//! it counts as upgraded.

use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use protocol::RunnerState;
use serde::Serialize;

use super::artifact::Published;
use super::client::Client;

/// Why one runner's upgrade failed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Failure {
    /// The step that failed (`check`, `download`, `checksum`, `restart`, `confirm`, …).
    pub step: String,
    /// What the step printed or saw.
    pub output: String,
}

/// How one runner's upgrade ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// Runs the new binary, confirmed by the control plane.
    Upgraded {
        /// From start to confirmation, milliseconds.
        took_ms: u64,
    },
    /// Already ran it.
    AlreadyCurrent,
    /// Failed; the runner's own upgrade rolled back where it could.
    Failed(Failure),
    /// Not attempted: the rollout stopped first.
    Skipped,
}

/// One runner's result.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RunnerResult {
    /// Runner name.
    pub runner: String,
    /// Outcome.
    #[serde(flatten)]
    pub outcome: Outcome,
}

/// Runs `boxlite-runner upgrade` on one runner (directly on local, over SSM on aws).
pub trait Upgrader: Sync {
    /// Upgrade `runner` to the published artifact; its output on success.
    fn upgrade(&self, runner: &str) -> impl Future<Output = Result<String, Failure>>;
}

/// Rollout settings.
#[derive(Clone, Debug)]
pub struct Options {
    /// Runners upgraded at once.
    pub max_concurrency: usize,
    /// Failures that stop the rollout.
    pub max_errors: usize,
    /// How long a restarted runner has to report the new binary.
    pub confirm_timeout: Duration,
}

/// What `boxlite-runner upgrade`'s exit code says failed (see its `--help`).
pub fn step_of_exit_code(code: Option<i32>) -> &'static str {
    match code {
        Some(2) => "configuration",
        Some(3) => "download",
        Some(4) => "checksum",
        Some(5) => "agent unreachable",
        Some(6) => "install",
        Some(7) => "health (rolled back)",
        Some(8) => "rollback",
        Some(9) => "locked by another upgrade",
        _ => "upgrade",
    }
}

/// Upgrade `runners` in order; `report` sees each result as it comes.
pub async fn rollout<U: Upgrader>(
    client: &Client,
    upgrader: &U,
    runners: &[String],
    artifact: &Published,
    opts: &Options,
    report: &(dyn Fn(&RunnerResult) + Sync),
    started: &(dyn Fn(&str) + Sync),
) -> Vec<RunnerResult> {
    let mut results: Vec<RunnerResult> = Vec::new();
    let mut pending = runners.iter();
    let mut in_flight = FuturesUnordered::new();
    let mut errors = 0usize;
    loop {
        while errors < opts.max_errors && in_flight.len() < opts.max_concurrency.max(1) {
            let Some(name) = pending.next() else { break };
            started(name);
            in_flight.push(async move {
                RunnerResult {
                    runner: name.clone(),
                    outcome: one(client, upgrader, name, artifact, opts.confirm_timeout).await,
                }
            });
        }
        let Some(r) = in_flight.next().await else {
            break;
        };
        if matches!(r.outcome, Outcome::Failed(_)) {
            errors += 1;
        }
        report(&r);
        results.push(r);
    }
    for name in pending {
        let r = RunnerResult {
            runner: name.clone(),
            outcome: Outcome::Skipped,
        };
        report(&r);
        results.push(r);
    }
    results
}

/// Checking in: ready, or draining (still running its boxes).
fn serving(state: RunnerState) -> bool {
    matches!(state, RunnerState::Ready | RunnerState::Draining)
}

async fn one<U: Upgrader>(
    client: &Client,
    upgrader: &U,
    name: &str,
    artifact: &Published,
    timeout: Duration,
) -> Outcome {
    let t0 = Instant::now();
    let fail = |step: &str, output: String| {
        Outcome::Failed(Failure {
            step: step.to_string(),
            output,
        })
    };
    match client.runner(name).await {
        Err(e) => return fail("check", e.to_string()),
        // A draining runner still runs boxes: it is upgraded like a ready one.
        Ok(r) if !serving(r.state) => {
            return fail(
                "check",
                format!("{name} is {:?}, not ready", r.state).to_lowercase(),
            );
        }
        Ok(r) if r.binary_sha256.as_deref() == Some(artifact.binary_sha256.as_str()) => {
            return Outcome::AlreadyCurrent;
        }
        Ok(_) => {}
    }
    let said = match upgrader.upgrade(name).await {
        Ok(out) => out,
        Err(f) => return Outcome::Failed(f),
    };
    // What the runner's own upgrade printed, for a confirm that fails.
    let said = if said.trim().is_empty() {
        String::new()
    } else {
        format!("\nits upgrade reported success:\n{}", said.trim_end())
    };
    // The runner says it is healthy on the new binary; the control plane must
    // agree within `timeout` of that (delivering the command, as over SSM,
    // does not eat into it).
    let upgraded = Instant::now();
    loop {
        match client.runner(name).await {
            Ok(r)
                if serving(r.state)
                    && r.binary_sha256.as_deref() == Some(artifact.binary_sha256.as_str()) =>
            {
                return Outcome::Upgraded {
                    took_ms: u64::try_from(t0.elapsed().as_millis()).unwrap_or(u64::MAX),
                };
            }
            Ok(r) if upgraded.elapsed() >= timeout => {
                return fail(
                    "confirm",
                    format!(
                        "the control plane sees {name} {:?} with binary {} after {}s, not {}{said}",
                        r.state,
                        r.binary_sha256
                            .as_deref()
                            .map_or("unknown", |s| &s[..s.len().min(12)]),
                        timeout.as_secs(),
                        &artifact.binary_sha256[..12]
                    ),
                );
            }
            Err(e) if upgraded.elapsed() >= timeout => {
                return fail("confirm", format!("{e}{said}"));
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Runs `boxlite-runner upgrade` as a local process in the stage directory.
pub struct LocalUpgrader {
    /// The stage directory (the runners' working directory).
    pub stage_dir: PathBuf,
    /// The `boxlite-runner` program to run the upgrade with.
    pub program: PathBuf,
    /// The published artifact.
    pub artifact: PathBuf,
    /// Its SHA-256.
    pub sha256: String,
}

impl Upgrader for LocalUpgrader {
    async fn upgrade(&self, runner: &str) -> Result<String, Failure> {
        let config = format!("config/{runner}.toml");
        let out = tokio::process::Command::new(&self.program)
            .args(["--config", &config, "upgrade", "--artifact"])
            .arg(&self.artifact)
            .args(["--sha256", &self.sha256])
            .current_dir(&self.stage_dir)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .output()
            .await
            .map_err(|e| Failure {
                step: "start".into(),
                output: format!("{}: {e}", self.program.display()),
            })?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let tail: Vec<&str> = text.lines().rev().take(15).collect();
        let tail: String = tail.into_iter().rev().collect::<Vec<_>>().join("\n");
        if out.status.success() {
            Ok(tail)
        } else {
            Err(Failure {
                step: step_of_exit_code(out.status.code()).to_string(),
                output: tail,
            })
        }
    }
}
