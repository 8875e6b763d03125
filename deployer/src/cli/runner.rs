//! `boxctl runner upgrade`: publish a runner artifact and roll it over the
//! stage's runners, verified, with rollback on each runner: directly on
//! local, over SSM Run Command on aws (from the stage bucket).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use clap::{Args, Subcommand};
use stack::{ResourceId, Target, Value};

use super::context::{self, Loaded, Providers};
use super::{Output, StageArg};
use crate::engine::journal::{ApplyStatus, Journal, StepStatus};
use crate::engine::lock::{self, Holder, LockRequest, SystemClock};
use crate::engine::plan::{Action, Change, FieldChange, Mode, Plan, Summary};
use crate::platform::artifact;
use crate::platform::artifact::Published;
use crate::platform::rollout::{self, LocalUpgrader, Outcome, RunnerResult, Upgrader};
use crate::platform::ssm_upgrade::SsmUpgrader;
use crate::providers::aws::AwsProvider;
use crate::providers::aws::artifacts::{self as s3_artifacts, S3Release};
use crate::providers::local::process::resolve_program;
use crate::render::{ColorChoice, Style, human_duration};

/// `boxctl runner` subcommands.
#[derive(Debug, Subcommand)]
pub enum RunnerCommand {
    /// Roll a new runner binary over the stage's runners: verified before
    /// anything stops, health-checked, confirmed through the control plane,
    /// rolled back on the runner that fails, stopped after --max-errors.
    #[command(after_help = UPGRADE_HELP)]
    Upgrade(UpgradeArgs),
    /// Publish a runner artifact to the stage's artifact location without
    /// rolling it out; prints the release name for `upgrade --version`.
    #[command(after_help = PUBLISH_HELP)]
    Publish(PublishArgs),
}

const UPGRADE_HELP: &str = "\
On local, each runner process is upgraded directly from the stage's artifact directory.

On aws:
  - the artifact is published to the stage bucket at
    s3://<bucket>/artifacts/boxlite-runner/<version>/boxlite-runner-linux-amd64.tar.gz
    (where new runners install from too), with its SHA-256; the same build is
    never uploaded twice, and another build of a published version is refused
    unless --force;
  - each runner's EC2 instance, found by its boxctl tags, is sent an SSM Run
    Command (AWS-RunShellScript) running `boxlite-runner upgrade --artifact
    <URL> --sha256 <digest>`. The URL is an S3 presigned GET URL valid for 15
    minutes; nothing secret goes into the command. boxctl polls the command
    until it ends and reports the failing step and the command's output;
  - the new binary is then confirmed through the control plane
    (https://api.<domain>, or BOXLITE_API_URL) with an admin key: BOXLITE_API_KEY,
    or else the stage's own from SSM; without one nothing is published or sent.
  The instances need the SSM agent (Ubuntu AMIs have it) and the runner role's
  AmazonSSMManagedInstanceCore policy, both set up by `boxctl deploy`.

Examples:
  boxctl runner upgrade --stage prod
  boxctl runner upgrade --stage prod --version 0.2.0 --max-concurrency 2 --max-errors 1
  boxctl runner upgrade --stage prod --runner runner-3 --artifact ./boxlite-runner.tar.gz";

const PUBLISH_HELP: &str = "\
On local the release goes to <state dir>/artifacts/runner/<release>/.
On aws it goes to the stage bucket (created if the stage was never deployed, so
publishing can come before the first deploy of a stage whose runners install
from it): s3://<bucket>/artifacts/boxlite-runner/<version>/, the archive with
its SHA-256 as `sha256` metadata, a .sha256 file and release.json. The bucket
holds one build per version: publishing the same build again uploads nothing,
another build of a published version is refused unless --force.";

/// `runner publish`.
#[derive(Debug, Args)]
pub struct PublishArgs {
    #[command(flatten)]
    stage: StageArg,
    /// The artifact (a .tar.gz holding `boxlite-runner`, or the binary); the workspace's runner by default.
    #[arg(long, value_name = "PATH")]
    artifact: Option<PathBuf>,
    /// aws: replace another build already published under the same version.
    #[arg(long)]
    force: bool,
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
    /// aws: replace another build already published under the same version.
    #[arg(long, conflicts_with = "version")]
    force: bool,
    /// Runners upgraded at once.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=100))]
    max_concurrency: u16,
    /// Failures that stop the rollout (runners not started yet are skipped).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=100))]
    max_errors: u16,
    /// How long to wait, once a runner's upgrade command succeeded, for the
    /// control plane to see the new binary on it.
    #[arg(long, default_value = "120s", value_parser = super::parse_duration, value_name = "DURATION")]
    confirm_timeout: Duration,
    /// Output format of the final result.
    #[arg(long, short = 'o', value_enum, default_value = "text")]
    output: Output,
}

/// Run a `runner` subcommand; `endpoint` points the AWS clients at an emulator.
pub async fn run(
    explicit: Option<&Path>,
    endpoint: Option<&str>,
    cmd: RunnerCommand,
    color: ColorChoice,
) -> anyhow::Result<ExitCode> {
    match cmd {
        RunnerCommand::Upgrade(a) => upgrade(explicit, endpoint, a, color).await,
        RunnerCommand::Publish(a) => publish(explicit, endpoint, a, color).await,
    }
}

async fn publish(
    explicit: Option<&Path>,
    endpoint: Option<&str>,
    a: PublishArgs,
    color: ColorChoice,
) -> anyhow::Result<ExitCode> {
    let loaded = context::load(explicit, color)?;
    let stage = loaded.stack.stage(&a.stage.stage)?.clone();
    let art = match &a.artifact {
        Some(p) => artifact::load(p)?,
        None => artifact::from_binary(&local_runner_program(&loaded, &stage.name)?)?,
    };
    if stage.target == Target::Local {
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
        return Ok(ExitCode::SUCCESS);
    }
    let target = context::target(&loaded, &stage, endpoint).await?;
    let Providers::Aws(p) = &target.providers else {
        bail!("stage {:?} is not an aws stage", stage.name);
    };
    // The bucket is the stage's own (deploy creates it the same way), so a
    // stage whose runners install from it can be published to before its
    // first deploy.
    let graph = loaded.stack.resolve(&stage.name)?;
    if p.ensure_state_bucket(&graph)
        .await
        .context("creating the stage bucket")?
    {
        eprintln!("created the stage bucket s3://{}", p.bucket());
    }
    let (release, uploaded) = s3_artifacts::publish(p, &art, a.force).await?;
    eprintln!(
        "{} {} at {}",
        if uploaded {
            "published"
        } else {
            "already published:"
        },
        release.published.release,
        release.url()
    );
    aws_notes(&stage, &release.published);
    println!("{}", release.published.release);
    Ok(ExitCode::SUCCESS)
}

/// Where runners created later install from, when that is not this release.
fn aws_notes(stage: &stack::Stage, published: &Published) {
    if let Some(url) = &stage.runner.artifact_url {
        eprintln!(
            "note: stage {} pins [runner] artifact_url = {url:?}: runners created from now on install that, not {}",
            stage.name, published.release
        );
    } else if stage.runner.version != published.version {
        eprintln!(
            "note: stage {} declares runner version {:?}: runners created from now on install that version, not {}; set [stages.{}.runner] version = {:?} to match",
            stage.name, stage.runner.version, published.release, stage.name, published.version
        );
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

/// The release a rollout installs, and where the runners get it.
enum Source<'a> {
    /// A local artifact directory.
    Local {
        /// The `boxlite-runner` that runs each upgrade.
        program: PathBuf,
    },
    /// The stage bucket, over SSM.
    Aws {
        /// The stage's provider.
        provider: &'a AwsProvider,
        /// The release in the bucket.
        release: S3Release,
    },
}

async fn upgrade(
    explicit: Option<&Path>,
    endpoint: Option<&str>,
    a: UpgradeArgs,
    color: ColorChoice,
) -> anyhow::Result<ExitCode> {
    let loaded = context::load(explicit, color)?;
    let stage = loaded.stack.stage(&a.stage.stage)?.clone();
    let style = Style::stderr(color);
    // Every runner is confirmed through the control plane: without access to
    // it nothing is published or sent.
    let client = context::control_plane(&loaded, &stage, endpoint)
        .await
        .map_err(|e| anyhow!("{e:#}; nothing was published or sent to any runner"))?;
    let runners = stage_runners(&loaded, &stage.name, &a.runners)?;
    if runners.is_empty() {
        bail!("stage {:?} declares no runners", stage.name);
    }
    let target = context::target(&loaded, &stage, endpoint).await?;
    let (art, location, source) = match &target.providers {
        Providers::Local(_) => {
            let program = local_runner_program(&loaded, &stage.name)?;
            let artifacts = context::local_stage_dir(&loaded, &stage)?.join("artifacts");
            // A published release is rolled out from its record: each runner checks
            // the archive against it before stopping anything.
            let art = match (&a.artifact, &a.version) {
                (None, Some(v)) => artifact::find_local(&artifacts, v)?,
                (Some(path), _) => artifact::publish_local(&artifact::load(path)?, &artifacts)?,
                (None, None) => {
                    artifact::publish_local(&artifact::from_binary(&program)?, &artifacts)?
                }
            };
            let location = art.path.display().to_string();
            (art, location, Source::Local { program })
        }
        Providers::Aws(p) => {
            if crate::providers::aws::s3::observe(p).await?.is_empty() {
                bail!(
                    "stage {:?} is not deployed: it has no bucket s3://{}; run `boxctl deploy --stage {}` first",
                    stage.name,
                    p.bucket(),
                    stage.name
                );
            }
            let release = match (&a.artifact, &a.version) {
                (None, Some(v)) => s3_artifacts::find(p, v).await?,
                (Some(path), _) => {
                    s3_artifacts::publish(p, &artifact::load(path)?, a.force)
                        .await?
                        .0
                }
                (None, None) => {
                    let program = local_runner_program(&loaded, &stage.name)?;
                    s3_artifacts::publish(p, &artifact::from_binary(&program)?, a.force)
                        .await?
                        .0
                }
            };
            aws_notes(&stage, &release.published);
            (
                release.published.clone(),
                release.url(),
                Source::Aws {
                    provider: p.as_ref(),
                    release,
                },
            )
        }
    };
    eprintln!(
        "{} runner {} (artifact sha256 {}, binary {}) from {}",
        style.bold("rolling out"),
        art.release,
        &art.sha256[..12],
        &art.binary_sha256[..12],
        location
    );
    let store = Arc::clone(&target.store);
    let command = format!("boxctl runner upgrade --stage {}", stage.name);
    let holder = Holder::current(&command);
    let held = lock::acquire(
        Arc::clone(&store),
        Arc::new(SystemClock),
        LockRequest {
            stack: &loaded.stack.name,
            stage: &stage.name,
            holder: holder.clone(),
            lease: lock::LEASE,
            wait: Duration::ZERO,
        },
        |_| {},
    )
    .await?
    .hold(tokio_util::sync::CancellationToken::new());

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
    let rolled = async {
        let journal =
            Journal::start(Arc::clone(&store), &plan, &command, holder, Vec::new()).await?;
        let opts = rollout::Options {
            max_concurrency: usize::from(a.max_concurrency),
            max_errors: usize::from(a.max_errors),
            confirm_timeout: a.confirm_timeout,
        };
        let results = match source {
            Source::Local { program } => {
                let upgrader = LocalUpgrader {
                    stage_dir: context::local_stage_dir(&loaded, &stage)?,
                    program,
                    artifact: art.path.clone(),
                    sha256: art.sha256.clone(),
                };
                roll(&client, &upgrader, &runners, &art, &opts, &style).await
            }
            Source::Aws { provider, release } => {
                let dim = style;
                let upgrader = SsmUpgrader::new(provider, release, move |line: &str| {
                    eprintln!("{} {line}", dim.dim("·"))
                })
                .await
                .context("finding the runners' EC2 instances")?;
                roll(&client, &upgrader, &runners, &art, &opts, &style).await
            }
        };
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
            .any(|r| matches!(r.outcome, Outcome::Failed(_)));
        let status = if failed {
            ApplyStatus::Failed
        } else {
            ApplyStatus::Succeeded
        };
        journal
            .finish(status, Default::default())
            .await
            .context("writing the journal")?;
        anyhow::Ok(results)
    }
    .await;
    held.release().await?;
    let results = rolled?;
    let failed = results
        .iter()
        .filter(|r| matches!(r.outcome, Outcome::Failed(_)))
        .count();
    if a.output == Output::Json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "release": art.release.clone(),
                "artifact": location,
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
        let names: Vec<&str> = results
            .iter()
            .filter(|r| matches!(r.outcome, Outcome::Failed(_)))
            .map(|r| r.runner.as_str())
            .collect();
        let unconfirmed = results
            .iter()
            .any(|r| matches!(&r.outcome, Outcome::Failed(f) if f.step == "confirm"));
        bail!(
            "the rollout stopped: {failed} runner(s) failed ({}), {skipped} not started; {}",
            names.join(", "),
            if unconfirmed {
                "a runner that failed at confirm finished its own upgrade but the control plane does not see it on the new binary: check that it reports to the control plane (`boxctl status`, its logs); the others run their previous release"
            } else {
                "failed runners run their previous release"
            }
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

/// Roll `art` over `runners` with `upgrader`, reporting each runner on stderr.
async fn roll<U: Upgrader>(
    client: &crate::platform::client::Client,
    upgrader: &U,
    runners: &[String],
    art: &Published,
    opts: &rollout::Options,
    style: &Style,
) -> Vec<RunnerResult> {
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
    rollout::rollout(client, upgrader, runners, art, opts, &report, &started).await
}
