//! `boxctl runner upgrade`: publish a runner artifact and roll it over the
//! stage's runners, verified, with rollback on each runner.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};
use stack::{ResourceId, Target, Value};

use super::context::{self, Loaded};
use super::{Output, StageArg};
use crate::engine::journal::{ApplyStatus, Journal, StepStatus};
use crate::engine::lock::{self, Holder, LockRequest, SystemClock};
use crate::engine::plan::{Action, Change, FieldChange, Mode, Plan, Summary};
use crate::platform::artifact;
use crate::platform::rollout::{self, LocalUpgrader, Outcome, RunnerResult};
use crate::providers::local::process::resolve_program;
use crate::render::{ColorChoice, Style, human_duration};

/// `boxctl runner` subcommands.
#[derive(Debug, Subcommand)]
pub enum RunnerCommand {
    /// Roll a new runner binary over the stage's runners: verified before
    /// anything stops, health-checked, confirmed through the control plane,
    /// rolled back on the runner that fails, stopped after --max-errors.
    Upgrade(UpgradeArgs),
    /// Publish a runner artifact to the stage's artifact location without
    /// rolling it out; prints the release name for `upgrade --version`.
    Publish(PublishArgs),
}

/// `runner publish`.
#[derive(Debug, Args)]
pub struct PublishArgs {
    #[command(flatten)]
    stage: StageArg,
    /// The artifact (a .tar.gz holding `boxlite-runner`, or the binary); the workspace's runner by default.
    #[arg(long, value_name = "PATH")]
    artifact: Option<PathBuf>,
}

/// `runner upgrade`.
#[derive(Debug, Args)]
pub struct UpgradeArgs {
    #[command(flatten)]
    stage: StageArg,
    /// Upgrade only these runners (repeatable; default: every runner of the stage).
    #[arg(long = "runner", short = 'r', value_name = "NAME")]
    runners: Vec<String>,
    /// Roll out an already published release: a version (its newest release)
    /// or an exact release name, instead of the workspace's runner.
    #[arg(long, conflicts_with = "artifact")]
    version: Option<String>,
    /// Roll out this artifact (a .tar.gz holding `boxlite-runner`, or the binary itself).
    #[arg(long, value_name = "PATH")]
    artifact: Option<PathBuf>,
    /// Runners upgraded at once.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=100))]
    max_concurrency: u16,
    /// Failures that stop the rollout (runners not started yet are skipped).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=100))]
    max_errors: u16,
    /// How long to wait for the control plane to see the new binary on a runner.
    #[arg(long, default_value = "120s", value_parser = super::parse_duration, value_name = "DURATION")]
    confirm_timeout: Duration,
    /// Output format of the final result.
    #[arg(long, short = 'o', value_enum, default_value = "text")]
    output: Output,
}

/// Run a `runner` subcommand.
pub async fn run(
    explicit: Option<&Path>,
    cmd: RunnerCommand,
    color: ColorChoice,
) -> anyhow::Result<ExitCode> {
    match cmd {
        RunnerCommand::Upgrade(a) => upgrade(explicit, a, color).await,
        RunnerCommand::Publish(a) => {
            let loaded = context::load(explicit, color)?;
            let stage = loaded.stack.stage(&a.stage.stage)?.clone();
            if stage.target != Target::Local {
                bail!("publishing to S3 is not in this build yet");
            }
            let art = match &a.artifact {
                Some(p) => artifact::load(p)?,
                None => artifact::from_binary(&local_runner_program(&loaded, &stage.name)?)?,
            };
            let published = artifact::publish_local(
                &art,
                &context::local_stage_dir(&loaded, &stage)?.join("artifacts"),
            )?;
            eprintln!(
                "published {} at {}",
                published.release,
                published.path.display()
            );
            println!("{}", published.release);
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The stage's runner names, in order, narrowed to `only` (which must exist).
pub fn stage_runners(loaded: &Loaded, stage: &str, only: &[String]) -> anyhow::Result<Vec<String>> {
    let graph = loaded.stack.resolve(stage)?;
    let all: Vec<String> = graph
        .resources
        .keys()
        .filter(|id| id.family() == "runner")
        .map(|id| id.name().to_string())
        .collect();
    if only.is_empty() {
        let mut all = all;
        all.sort_by_key(|n| (n.len(), n.clone()));
        return Ok(all);
    }
    for n in only {
        if !all.contains(n) {
            bail!(
                "stage {stage:?} has no runner {n:?} (runners: {})",
                all.join(", ")
            );
        }
    }
    Ok(only.to_vec())
}

fn local_runner_program(loaded: &Loaded, stage: &str) -> anyhow::Result<PathBuf> {
    let graph = loaded.stack.resolve(stage)?;
    let program = graph
        .resources
        .iter()
        .find(|(id, _)| id.family() == "runner")
        .and_then(|(_, r)| {
            r.props
                .get("program")
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .unwrap_or_else(|| artifact::BINARY.to_string());
    resolve_program(&program, &loaded.dir())
        .map_err(|e| anyhow::anyhow!("{e}; build it with `cargo build --bins` or pass --artifact"))
}

async fn upgrade(
    explicit: Option<&Path>,
    a: UpgradeArgs,
    color: ColorChoice,
) -> anyhow::Result<ExitCode> {
    let loaded = context::load(explicit, color)?;
    let stage = loaded.stack.stage(&a.stage.stage)?.clone();
    if stage.target != Target::Local {
        bail!("`runner upgrade` drives runners over SSM on aws, which this build does not do yet");
    }
    let style = Style::stderr(color);
    let stage_dir = context::local_stage_dir(&loaded, &stage)?;
    let runners = stage_runners(&loaded, &stage.name, &a.runners)?;
    if runners.is_empty() {
        bail!("stage {:?} declares no runners", stage.name);
    }
    let program = local_runner_program(&loaded, &stage.name)?;
    let artifacts = stage_dir.join("artifacts");
    // A published release is rolled out from its record: each runner checks
    // the archive against it before stopping anything.
    let art = match (&a.artifact, &a.version) {
        (None, Some(v)) => artifact::find_local(&artifacts, v)?,
        (Some(path), _) => artifact::publish_local(&artifact::load(path)?, &artifacts)?,
        (None, None) => artifact::publish_local(&artifact::from_binary(&program)?, &artifacts)?,
    };
    eprintln!(
        "{} runner {} (artifact sha256 {}, binary {}) from {}",
        style.bold("rolling out"),
        art.release,
        &art.sha256[..12],
        &art.binary_sha256[..12],
        art.path.display()
    );
    let client = context::control_plane(&loaded, &stage)?;
    let store: Arc<dyn crate::engine::store::StateStore> = Arc::new(
        crate::engine::store::LocalStore::new(stage_dir.join(crate::providers::local::STATE_DIR)),
    );
    let command = format!("boxctl runner upgrade --stage {}", stage.name);
    let holder = Holder::current(&command);
    let lock = lock::acquire(
        Arc::clone(&store),
        Arc::new(SystemClock),
        LockRequest {
            stack: &loaded.stack.name,
            stage: &stage.name,
            holder: holder.clone(),
            lease: Duration::from_secs(60),
            wait: Duration::ZERO,
        },
        |_| {},
    )
    .await?;
    let lock = Arc::new(lock);
    let stop = tokio_util::sync::CancellationToken::new();
    let renewal = lock.keep_alive(stop.clone(), tokio_util::sync::CancellationToken::new());

    // The journal records the rollout like a plan: one update per runner.
    let plan = Plan {
        stack: loaded.stack.name.clone(),
        stage: stage.name.clone(),
        mode: Mode::Deploy,
        changes: runners
            .iter()
            .map(|r| Change {
                id: ResourceId::new(format!("runner/{r}")),
                kind: "runner.release".into(),
                action: Action::Update,
                fields: vec![FieldChange {
                    name: "release".into(),
                    old: None,
                    new: Some(Value::str(art.release.clone())),
                    known_after_apply: false,
                    forces_replace: false,
                    ignored: false,
                }],
                reason: None,
                desired: None,
                observed: None,
            })
            .collect(),
        errors: Vec::new(),
        summary: Summary {
            update: runners.len(),
            ..Summary::default()
        },
        deps: Default::default(),
    };
    let journal = Journal::start(Arc::clone(&store), &plan, &command, holder, Vec::new()).await?;
    let upgrader = LocalUpgrader {
        stage_dir: stage_dir.clone(),
        program,
        artifact: art.path.clone(),
        sha256: art.sha256.clone(),
    };
    let opts = rollout::Options {
        max_concurrency: usize::from(a.max_concurrency),
        max_errors: usize::from(a.max_errors),
        confirm_timeout: a.confirm_timeout,
    };
    let started = |name: &str| {
        eprintln!(
            "{} {name}: upgrading to {}",
            style.dim("·"),
            art.release.clone()
        )
    };
    let report = |r: &RunnerResult| match &r.outcome {
        Outcome::Upgraded { took_ms } => eprintln!(
            "{} {}: upgraded, confirmed by the control plane ({})",
            style.green("✓"),
            r.runner,
            human_duration(Duration::from_millis(*took_ms))
        ),
        Outcome::AlreadyCurrent => eprintln!(
            "{} {}: already runs {}",
            style.dim("="),
            r.runner,
            art.release.clone()
        ),
        Outcome::Failed(f) => {
            eprintln!("{} {}: FAILED at {}:", style.danger("✗"), r.runner, f.step);
            for line in f.output.lines() {
                eprintln!("    {line}");
            }
        }
        Outcome::Skipped => eprintln!(
            "{} {}: skipped (the rollout stopped)",
            style.yellow("-"),
            r.runner
        ),
    };
    let results =
        rollout::rollout(&client, &upgrader, &runners, &art, &opts, &report, &started).await;
    for r in &results {
        let id = format!("runner/{}", r.runner);
        let (status, error) = match &r.outcome {
            Outcome::Upgraded { .. } | Outcome::AlreadyCurrent => (StepStatus::Succeeded, None),
            Outcome::Failed(f) => (
                StepStatus::Failed,
                Some(format!("{}: {}", f.step, f.output)),
            ),
            Outcome::Skipped => {
                journal.steps_skipped(&[(id.clone(), Action::Update)]);
                continue;
            }
        };
        journal.step_started(&id, Action::Update).await;
        journal.step_finished(&id, status, 1, error).await;
    }
    let failed = results
        .iter()
        .filter(|r| matches!(r.outcome, Outcome::Failed(_)))
        .count();
    let status = if failed == 0 {
        ApplyStatus::Succeeded
    } else {
        ApplyStatus::Failed
    };
    journal
        .finish(status, Default::default())
        .await
        .context("writing the journal")?;
    stop.cancel();
    let _ = renewal.await;
    lock.release().await?;
    if a.output == Output::Json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "release": art.release.clone(),
                "artifact_sha256": art.sha256,
                "binary_sha256": art.binary_sha256,
                "runners": results,
            }))?
        );
    }
    if failed > 0 {
        let skipped = results
            .iter()
            .filter(|r| r.outcome == Outcome::Skipped)
            .count();
        bail!(
            "the rollout stopped: {failed} runner(s) failed, {skipped} not started; failed runners run their previous release"
        );
    }
    eprintln!(
        "{} {} runner(s) run {}",
        style.green("Rollout complete:"),
        results.len(),
        art.release.clone()
    );
    Ok(ExitCode::SUCCESS)
}
