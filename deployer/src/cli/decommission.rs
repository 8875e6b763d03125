//! `boxctl decommission RUNNER`: drain, empty (wait or migrate), then retire
//! one runner: one guarded command, journaled like a deploy. The control-plane
//! part is the same on every target; retiring deletes the runner's resources
//! through the stage's provider (on aws: its protected EC2 instance, whose
//! termination protection is lifted for this one deliberate command, and its
//! token parameter).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Args;
use protocol::{BoxInfo, BoxState, RunnerState};
use stack::{ResourceId, Target};

use super::StageArg;
use super::context::{self, Loaded, Providers};
use crate::engine::apply::{ApplyOptions, apply};
use crate::engine::journal::{ApplyStatus, Journal};
use crate::engine::lock::{self, Holder, LockRequest, SystemClock};
use crate::engine::plan::{Action, Change, Mode, Plan, Summary};
use crate::engine::provider::Provider;
use crate::platform::client::Client;
use crate::render::{ColorChoice, ProgressPrinter, Style, human_duration};

/// What `boxctl decommission --help` says after the options.
pub const HELP: &str = "\
Steps: mark the runner draining in the control plane (no new boxes); wait for
its boxes to go (--wait) or move them (--migrate), and refuse, listing them, if
any remain; ask (or --yes); then retire it and deregister it from the control
plane. The operation is journaled like a deploy (`boxctl status`).

On local, retiring stops the runner process and removes its registration,
token, configuration and state directory.

On aws, retiring deletes its token parameter
(/boxlite/<stage>/runner-tokens/<runner>), lifts the instance's termination
protection (ModifyInstanceAttribute DisableApiTermination=false), terminates
it (TerminateInstances) and waits until it is terminated (up to 15 minutes).
A runner whose launch failed after its token was minted has only the token;
decommissioning it deletes that. The
control plane is https://api.<domain> (or BOXLITE_API_URL); its admin key is
BOXLITE_API_KEY, or else the stage's own from SSM (/boxlite/<stage>/admin-api-key);
without one nothing is touched.

A runner still declared in stack.toml comes back fresh (new instance, new
token) on the next deploy; to scale down, lower `runners` and decommission the
runners above the new count.

Examples:
  boxctl decommission runner-3 --stage prod --migrate
  boxctl decommission runner-2 --stage prod --wait 30m --yes";

/// `boxctl decommission`.
#[derive(Debug, Args)]
pub struct DecommissionArgs {
    /// The runner to retire (`runner-3`).
    runner: String,
    #[command(flatten)]
    stage: StageArg,
    /// Move each box to another ready runner (same id, same files) instead of
    /// waiting for the boxes to go.
    #[arg(long)]
    migrate: bool,
    /// Wait this long for the runner's boxes to be deleted by their owners
    /// (e.g. 30m); without it (or --migrate), boxes on the runner stop the command.
    #[arg(long, value_parser = super::parse_duration, value_name = "DURATION")]
    wait: Option<Duration>,
    /// Do not ask before retiring the runner.
    #[arg(long, short = 'y')]
    yes: bool,
}

fn describe(b: &BoxInfo) -> String {
    let labels: Vec<String> = b.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!(
        "{} ({}{})",
        b.id,
        format!("{:?}", b.state).to_lowercase(),
        if labels.is_empty() {
            String::new()
        } else {
            format!(", {}", labels.join(","))
        }
    )
}

/// The live boxes pinned to `runner`.
async fn boxes_on(client: &Client, runner: &str) -> anyhow::Result<Vec<BoxInfo>> {
    Ok(client
        .runner_boxes(runner)
        .await?
        .into_iter()
        .filter(|b| b.state != BoxState::Deleted)
        .collect())
}

/// Move every box off `runner`, each to the ready, schedulable runner with
/// the most free memory at that moment.
async fn migrate(
    client: &Client,
    runner: &str,
    boxes: &[BoxInfo],
    style: &Style,
) -> anyhow::Result<()> {
    for b in boxes {
        let targets: Vec<_> = client
            .runners()
            .await?
            .into_iter()
            .filter(|r| r.name != runner && r.state == RunnerState::Ready && !r.draining)
            .collect();
        let Some(target) = targets
            .iter()
            .max_by_key(|r| r.capacity.memory_mib.saturating_sub(r.allocated.memory_mib))
        else {
            bail!(
                "no other runner is ready to take box {}; add or undrain a runner, then run again",
                b.id
            );
        };
        let t0 = Instant::now();
        eprintln!("{} moving box {} to {}", style.dim("·"), b.id, target.name);
        client
            .move_box(b.id, &target.name)
            .await
            .with_context(|| format!("moving box {} to {}", b.id, target.name))?;
        // Moved means back in the state it had, on the new runner.
        if b.desired_state == BoxState::Running {
            crate::platform::verify::wait_box(
                client,
                b.id,
                BoxState::Running,
                Duration::from_secs(60),
            )
            .await
            .with_context(|| format!("box {} did not start again on {}", b.id, target.name))?;
        }
        eprintln!(
            "{} box {} now on {} ({})",
            style.green("✓"),
            b.id,
            target.name,
            human_duration(t0.elapsed())
        );
    }
    Ok(())
}

/// What retiring does to the runner, for the confirmation.
fn consequence(target: Target) -> &'static str {
    match target {
        Target::Local => "stops it and removes its state",
        Target::Aws => "terminates its EC2 instance and deletes its token",
    }
}

fn confirm(style: &Style, runner: &str, stage: &stack::Stage) -> anyhow::Result<()> {
    let what = consequence(stage.target);
    if !std::io::stdin().is_terminal() {
        bail!("decommissioning {runner} {what}; rerun with --yes to confirm");
    }
    let stage = &stage.name;
    eprint!(
        "{} this {what} ({runner} of stage {stage}). Type {} to continue: ",
        style.danger("warning:"),
        style.bold(runner)
    );
    std::io::stderr().flush().ok();
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    if line.trim() != runner {
        bail!("not confirmed; {runner} stays (draining)");
    }
    Ok(())
}

/// Run `boxctl decommission`; `endpoint` points the AWS clients at an emulator.
pub async fn run(
    explicit: Option<&Path>,
    endpoint: Option<&str>,
    a: DecommissionArgs,
    color: ColorChoice,
) -> anyhow::Result<ExitCode> {
    let loaded = context::load(explicit, color)?;
    let stage = loaded.stack.stage(&a.stage.stage)?.clone();
    let style = Style::stderr(color);
    // The control plane drains and empties the runner first: without access
    // to it nothing is touched.
    let client = context::control_plane(&loaded, &stage, endpoint)
        .await
        .map_err(|e| anyhow::anyhow!("{e:#}; nothing was changed"))?;
    let target = context::target(&loaded, &stage, endpoint).await?;
    let command = format!("boxctl decommission {} --stage {}", a.runner, stage.name);
    let holder = Holder::current(&command);
    let held = lock::acquire(
        Arc::clone(&target.store),
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
    let result = match &target.providers {
        Providers::Local(p) => {
            locked(
                p, &loaded, &stage, &a, &client, &target, &command, holder, &style,
            )
            .await
        }
        Providers::Aws(p) => {
            locked(
                p.as_ref(),
                &loaded,
                &stage,
                &a,
                &client,
                &target,
                &command,
                holder,
                &style,
            )
            .await
        }
    };
    held.release().await?;
    result
}

#[allow(clippy::too_many_arguments)]
async fn locked<P: Provider>(
    provider: &P,
    loaded: &Loaded,
    stage: &stack::Stage,
    a: &DecommissionArgs,
    client: &Client,
    target: &context::StageTarget,
    command: &str,
    holder: Holder,
    style: &Style,
) -> anyhow::Result<ExitCode> {
    let name = a.runner.as_str();
    let inventory = provider.observe().await.context("observing the stage")?;
    let prefix_ids: BTreeSet<ResourceId> = [
        format!("runner/{name}"),
        format!("registration/{name}"),
        format!("secret/{name}-token"),
        format!("config/{name}"),
    ]
    .into_iter()
    .map(ResourceId::new)
    .collect();
    let mine: Vec<_> = inventory
        .resources
        .values()
        .filter(|o| prefix_ids.contains(&o.id))
        .cloned()
        .collect();
    let registered = match client.runner(name).await {
        Ok(r) => Some(r),
        Err(e) if e.status() == Some(404) => None,
        Err(e) => return Err(e.into()),
    };
    if mine.is_empty()
        && registered
            .as_ref()
            .is_none_or(|r| r.state == RunnerState::Decommissioned)
    {
        // A runner whose launch failed after its token was minted has only
        // the token: nothing else reclaims it once the runner is undeclared.
        if let Providers::Aws(p) = &target.providers
            && p.reclaim_runner_token(name)
                .await
                .context("reclaiming the runner's token")?
        {
            eprintln!(
                "{} {name} never launched: deleted its token parameter",
                style.green("✓")
            );
            return Ok(ExitCode::SUCCESS);
        }
        bail!(
            "stage {:?} has no runner {name:?} to decommission",
            stage.name
        );
    }

    // 1. No new boxes.
    if registered
        .as_ref()
        .is_some_and(|r| r.state != RunnerState::Decommissioned)
    {
        client.drain(name).await.context("draining the runner")?;
        eprintln!(
            "{} {name} is draining: it gets no new boxes",
            style.dim("·")
        );
    }
    // 2. Empty it.
    let mut boxes = if registered.is_some() {
        boxes_on(client, name).await?
    } else {
        Vec::new()
    };
    if !boxes.is_empty() && a.migrate {
        migrate(client, name, &boxes, style).await?;
        boxes = boxes_on(client, name).await?;
    }
    if !boxes.is_empty()
        && let Some(wait) = a.wait
    {
        eprintln!(
            "{} waiting up to {} for {} box(es) to go",
            style.dim("·"),
            human_duration(wait),
            boxes.len()
        );
        let deadline = Instant::now() + wait;
        while !boxes.is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_secs(2)).await;
            boxes = boxes_on(client, name).await?;
        }
    }
    if !boxes.is_empty() {
        let list: Vec<String> = boxes.iter().map(describe).collect();
        bail!(
            "{name} still has {} box(es): {}. It stays draining. Move them with --migrate, wait for them with --wait, or delete them, then run again",
            boxes.len(),
            list.join(", ")
        );
    }
    if !a.yes {
        confirm(style, name, stage)?;
    }

    // 3. Retire, journaled like any apply: on local its process (after
    // purging boxes), registration, token and configuration; on aws its
    // instance (termination protection lifted, terminated, waited for) and
    // token parameter. Protection is lifted for this one deliberate command.
    let changes: Vec<Change> = mine
        .iter()
        .map(|o| Change {
            id: o.id.clone(),
            kind: o.kind.clone(),
            action: Action::Delete,
            fields: Vec::new(),
            reason: Some("decommissioned".into()),
            desired: None,
            observed: Some(o.clone()),
        })
        .collect();
    // The process goes before what it stands on.
    let process = ResourceId::new(format!("runner/{name}"));
    let mut deps = BTreeMap::new();
    deps.insert(
        process.clone(),
        prefix_ids
            .iter()
            .filter(|id| **id != process)
            .cloned()
            .collect(),
    );
    let plan = Plan {
        stack: loaded.stack.name.clone(),
        stage: stage.name.clone(),
        mode: Mode::Destroy,
        summary: Summary {
            delete: changes.len(),
            ..Summary::default()
        },
        changes,
        errors: Vec::new(),
        deps,
    };
    let journal = Journal::start(
        Arc::clone(&target.store),
        &plan,
        command,
        holder,
        Vec::new(),
    )
    .await?;
    let graph = stack::DesiredGraph::new(&loaded.stack.name, &stage.name, stage.target);
    let report = apply(
        provider,
        &graph,
        &plan,
        &inventory,
        Some(&journal),
        &ApplyOptions::default(),
        &ProgressPrinter::new(*style),
        &tokio_util::sync::CancellationToken::new(),
    )
    .await;
    journal.finish(report.status, Default::default()).await?;
    if report.status != ApplyStatus::Succeeded {
        let why: Vec<String> = report
            .failed
            .iter()
            .map(|(id, _, e)| format!("{id}: {e}"))
            .collect();
        bail!("retiring {name} failed: {}", why.join("; "));
    }
    if let Providers::Local(local) = &target.providers {
        let state_dir = local.stage_dir().join("data/runners").join(name);
        if state_dir.exists() {
            std::fs::remove_dir_all(&state_dir)
                .with_context(|| format!("removing {}", state_dir.display()))?;
        }
    }
    // 4. Deregistered, even if its registration record was gone.
    match client.decommission(name, false).await {
        Ok(_) => {}
        Err(e) if e.status() == Some(404) => {}
        Err(e) => return Err(e).context("deregistering the runner"),
    }
    let declared = loaded
        .stack
        .resolve(&stage.name)?
        .resources
        .contains_key(&ResourceId::new(format!("runner/{name}")));
    eprintln!(
        "{} {name} is decommissioned{}",
        style.green("done:"),
        if declared {
            "; it is still declared in stack.toml, so the next deploy brings it back fresh"
        } else {
            ""
        }
    );
    Ok(ExitCode::SUCCESS)
}
