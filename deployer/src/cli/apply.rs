//! `boxctl diff`, `deploy` and `destroy`: plan, then (for the latter two)
//! lock, journal and apply.

use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use stack::DesiredGraph;
use tokio_util::sync::CancellationToken;

use super::context::{self, Providers, StageTarget};
use super::{ApplyArgs, Output};
use crate::engine::apply::{ApplyOptions, RetryPolicy, apply as run_apply};
use crate::engine::journal::{self, ApplyStatus, Journal};
use crate::engine::lock::{self, Holder, LockRequest, SystemClock, fmt_time};
use crate::engine::plan::{Mode, Plan, plan};
use crate::engine::provider::{Inventory, Provider};
use crate::providers::cloudflare::CloudflareProvider;
use crate::providers::pair::Pair;
use crate::render::{self, ColorChoice, ProgressPrinter, Style, human_duration};

/// Observe the world and plan; `prepare` runs only when deploying (it needs
/// the binaries a deploy would start; a destroy does not).
pub async fn make_plan<P: Provider>(
    p: &P,
    graph: &mut DesiredGraph,
    mode: Mode,
) -> anyhow::Result<(Inventory, Plan)> {
    if mode == Mode::Deploy {
        let mut retry = Retry::new("preparing the desired state");
        loop {
            match p.prepare(graph).await {
                Ok(()) => break,
                Err(e) if retry.again(&e).await => {}
                Err(e) => return Err(retry.fail(e)),
            }
        }
    }
    let mut retry = Retry::new("observing the stage");
    let inventory = loop {
        match p.observe().await {
            Ok(inv) => break inv,
            Err(e) if retry.again(&e).await => {}
            Err(e) => return Err(retry.fail(e)),
        }
    };
    let pl = plan(graph, &inventory, p.kinds(), mode);
    Ok((inventory, pl))
}

/// Throttling and server errors that outlast the SDK's own retries, tried
/// again with backoff outside the apply (where the engine retries steps).
struct Retry {
    what: &'static str,
    policy: RetryPolicy,
    attempt: u32,
}

impl Retry {
    fn new(what: &'static str) -> Self {
        Retry {
            what,
            policy: RetryPolicy::default(),
            attempt: 1,
        }
    }

    /// True (after a backoff) when `e` is worth another attempt.
    async fn again(&mut self, e: &crate::engine::provider::ProviderError) -> bool {
        if !e.is_retryable() || self.attempt >= self.policy.max_attempts {
            return false;
        }
        tracing::info!(
            "{}: attempt {} failed, retrying: {e}",
            self.what,
            self.attempt
        );
        tokio::time::sleep(self.policy.delay(self.attempt)).await;
        self.attempt += 1;
        true
    }

    fn fail(&self, e: crate::engine::provider::ProviderError) -> anyhow::Error {
        anyhow::Error::new(e).context(self.what)
    }
}

/// The stage's graph: for a deploy, with the stage's secrets that are set
/// (an unset required one stops here, before anything is observed).
async fn resolve(
    loaded: &context::Loaded,
    stage: &str,
    target: &StageTarget,
    mode: Mode,
) -> anyhow::Result<DesiredGraph> {
    if mode == Mode::Destroy {
        return Ok(loaded.stack.resolve(stage)?);
    }
    let set = target
        .secrets
        .names()
        .await
        .context("listing the stage's secrets")?;
    Ok(loaded.stack.resolve_with_secrets(stage, &set)?)
}

/// The stage's DNS provider, if it has one, taking over the records to adopt.
async fn dns(
    loaded: &context::Loaded,
    stage: &stack::Stage,
    target: &StageTarget,
    adopt: &[String],
) -> anyhow::Result<Option<CloudflareProvider>> {
    let mut dns = context::dns(loaded, stage, target).await?;
    match dns.as_mut() {
        Some(d) => d.adopt(adopt.iter().map(|a| stack::ResourceId::new(a.as_str()))),
        None if !adopt.is_empty() => bail!(
            "--adopt takes over DNS records, and stage {:?} has no [dns]",
            stage.name
        ),
        None => {}
    }
    Ok(dns)
}

fn header(style: &Style, verb: &str, stack: &str, stage: &str, t: &StageTarget) {
    eprintln!(
        "{} {} stack {}, stage {} ({})",
        style.bold("boxctl"),
        verb,
        style.bold(stack),
        style.bold(stage),
        t.description
    );
}

/// `boxctl diff`.
pub async fn diff(
    explicit: Option<&Path>,
    endpoint: Option<&str>,
    stage: &str,
    output: Output,
    exit_code: bool,
    adopt: &[String],
    color: ColorChoice,
) -> anyhow::Result<ExitCode> {
    let loaded = context::load(explicit, color)?;
    let stage_cfg = loaded.stack.stage(stage)?;
    let target = context::target(&loaded, stage_cfg, endpoint).await?;
    let mut graph = resolve(&loaded, stage, &target, Mode::Deploy).await?;
    let dns = dns(&loaded, stage_cfg, &target, adopt).await?;
    let style = Style::stdout(color);
    if output == Output::Text {
        header(
            &Style::stderr(color),
            "diff",
            &loaded.stack.name,
            stage,
            &target,
        );
    }
    let t0 = Instant::now();
    let (_, pl) = match (&target.providers, &dns) {
        (Providers::Local(p), _) => make_plan(p, &mut graph, Mode::Deploy).await?,
        (Providers::Aws(p), None) => make_plan(p.as_ref(), &mut graph, Mode::Deploy).await?,
        (Providers::Aws(p), Some(d)) => {
            make_plan(&Pair::new(p.as_ref(), d), &mut graph, Mode::Deploy).await?
        }
    };
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&render::plan_json(&pl))?),
        Output::Text => {
            print!("{}", render::plan_text(&pl, &style));
            eprintln!(
                "{}",
                Style::stderr(color).dim(&format!("planned in {}", human_duration(t0.elapsed())))
            );
        }
    }
    Ok(if !pl.errors.is_empty() {
        ExitCode::FAILURE
    } else if exit_code && pl.has_changes() {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    })
}

/// `boxctl deploy` and `boxctl destroy`.
#[allow(clippy::too_many_arguments)]
pub async fn apply(
    explicit: Option<&Path>,
    endpoint: Option<&str>,
    stage: &str,
    mode: Mode,
    args: &ApplyArgs,
    verify: bool,
    adopt: &[String],
    color: ColorChoice,
) -> anyhow::Result<ExitCode> {
    let loaded = context::load(explicit, color)?;
    let stage_cfg = loaded.stack.stage(stage)?;
    let target = context::target(&loaded, stage_cfg, endpoint).await?;
    let graph = resolve(&loaded, stage, &target, mode).await?;
    let dns = dns(&loaded, stage_cfg, &target, adopt).await?;
    let verb = match mode {
        Mode::Deploy => "deploy",
        Mode::Destroy => "destroy",
    };
    header(
        &Style::stderr(color),
        verb,
        &loaded.stack.name,
        stage,
        &target,
    );
    let command = format!("boxctl {verb} --stage {stage}");
    let runners: Vec<String> = graph
        .resources
        .keys()
        .filter(|id| id.family() == "runner")
        .map(|id| id.name().to_string())
        .collect();
    let (code, applied) = match &target.providers {
        Providers::Local(p) => run(p, &target, graph.clone(), mode, &command, args, color).await?,
        Providers::Aws(p) => {
            // The lock lives in the stage bucket: it must exist first.
            if p.ensure_state_bucket(&graph)
                .await
                .context("creating the stage bucket (it holds the deploy lock)")?
            {
                eprintln!("created the stage bucket s3://{}", p.bucket());
            }
            match &dns {
                Some(d) => {
                    let both = Pair::new(p.as_ref(), d);
                    run(&both, &target, graph.clone(), mode, &command, args, color).await?
                }
                None => {
                    run(
                        p.as_ref(),
                        &target,
                        graph.clone(),
                        mode,
                        &command,
                        args,
                        color,
                    )
                    .await?
                }
            }
        }
    };
    if mode == Mode::Deploy && applied && verify && code == ExitCode::SUCCESS {
        // On aws the check needs an admin key for the stage's API.
        if stage_cfg.target == stack::Target::Local || std::env::var_os("BOXLITE_API_KEY").is_some()
        {
            verify_stage(&loaded, stage_cfg, &runners, args.output, color).await?;
        } else {
            eprintln!(
                "{} skipped the post-deploy check: set BOXLITE_API_KEY to an admin key of stage {stage} to run it",
                Style::stderr(color).dim("verify:")
            );
        }
    }
    if mode == Mode::Destroy
        && code == ExitCode::SUCCESS
        && let Providers::Aws(p) = &target.providers
    {
        // The bucket goes last, lock and journal with it, unless it is retained.
        if p.finish_destroy(&graph)
            .await
            .context("deleting the stage bucket")?
        {
            eprintln!("deleted the stage bucket s3://{}", p.bucket());
        }
    }
    if mode == Mode::Destroy
        && code == ExitCode::SUCCESS
        && let Providers::Local(p) = &target.providers
    {
        // Nothing retained is left in the stage directory: remove it, lock and journal included.
        if p.stage_dir().exists() && !has_retained(p.stage_dir()) {
            std::fs::remove_dir_all(p.stage_dir())
                .with_context(|| format!("removing {}", p.stage_dir().display()))?;
            // The stack's directory goes too once its last stage is gone.
            if let Some(parent) = p.stage_dir().parent() {
                let _ = std::fs::remove_dir(parent);
            }
        }
    }
    Ok(code)
}

fn has_retained(stage_dir: &Path) -> bool {
    std::fs::read_dir(stage_dir.join(crate::providers::local::RECORDS_DIR))
        .map(|mut d| d.next().is_some())
        .unwrap_or(false)
}

fn confirm(style: &Style, plan: &Plan) -> anyhow::Result<bool> {
    let destructive = plan
        .changes
        .iter()
        .filter(|c| c.action.is_destructive())
        .count();
    if !std::io::stdin().is_terminal() {
        bail!(
            "the plan deletes or replaces {destructive} resource(s) and stdin is not a terminal to confirm; review it with `boxctl diff`, then rerun with --yes"
        );
    }
    eprint!(
        "{} the plan deletes or replaces {destructive} resource(s). Type {} to apply: ",
        style.danger("warning:"),
        style.bold("yes")
    );
    std::io::stderr().flush().ok();
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    Ok(line.trim() == "yes")
}

/// Cancel `token` on the first SIGINT/SIGTERM; exit at once on the second.
fn on_interrupt(token: CancellationToken, style: Style) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut int), Ok(mut term)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) else {
            return;
        };
        tokio::select! { _ = int.recv() => {}, _ = term.recv() => {} }
        eprintln!(
            "{} finishing the steps in flight, then releasing the lock (interrupt again to quit at once)",
            style.yellow("interrupted:")
        );
        token.cancel();
        tokio::select! { _ = int.recv() => {}, _ = term.recv() => {} }
        eprintln!(
            "{} quitting now; the lock expires with its lease",
            style.danger("interrupted again:")
        );
        std::process::exit(130);
    })
}

async fn run<P: Provider>(
    p: &P,
    target: &StageTarget,
    mut graph: DesiredGraph,
    mode: Mode,
    command: &str,
    args: &ApplyArgs,
    color: ColorChoice,
) -> anyhow::Result<(ExitCode, bool)> {
    let style_out = Style::stdout(color);
    let style = Style::stderr(color);
    let store = Arc::clone(&target.store);
    let holder = Holder::current(command);
    // Held, its lease renewed, from here to the end: observing, planning and
    // confirming can outlast one lease. Losing it cancels the apply.
    let cancel = CancellationToken::new();
    let held = lock::acquire(
        Arc::clone(&store),
        Arc::new(SystemClock),
        LockRequest {
            stack: &graph.stack,
            stage: &graph.stage,
            holder: holder.clone(),
            lease: lock::LEASE,
            wait: args.lock_timeout,
        },
        |held| eprintln!("waiting for the deploy lock, held by {}", held.describe()),
    )
    .await?
    .hold(cancel.clone());
    let result = locked(
        p, target, &mut graph, mode, command, holder, args, &style, &style_out, &cancel,
    )
    .await;
    if let Err(e) = held.release().await {
        eprintln!(
            "{} could not release the deploy lock: {e}",
            style.yellow("warning:")
        );
    }
    result
}

#[allow(clippy::too_many_arguments)]
async fn locked<P: Provider>(
    p: &P,
    target: &StageTarget,
    graph: &mut DesiredGraph,
    mode: Mode,
    command: &str,
    holder: Holder,
    args: &ApplyArgs,
    style: &Style,
    style_out: &Style,
    cancel: &CancellationToken,
) -> anyhow::Result<(ExitCode, bool)> {
    let store = Arc::clone(&target.store);
    let mut notes = Vec::new();
    if let Ok(Some(last)) = journal::latest(store.as_ref()).await
        && last.status == ApplyStatus::Running
    {
        let in_flight: Vec<&str> = last
            .steps
            .iter()
            .filter(|s| s.status == journal::StepStatus::Running)
            .map(|s| s.id.as_str())
            .collect();
        let note = format!(
            "the previous apply ({} by {}@{}, started {}) ended without finishing{}; the world is observed afresh and the plan converges from there",
            last.command,
            last.holder.user,
            last.holder.host,
            fmt_time(last.started_at),
            if in_flight.is_empty() {
                String::new()
            } else {
                format!(" (in flight: {})", in_flight.join(", "))
            }
        );
        eprintln!("{} {note}", style.yellow("note:"));
        notes.push(note);
    }
    let t0 = Instant::now();
    let (inventory, pl) = make_plan(p, graph, mode).await?;
    print!("{}", render::plan_text(&pl, style_out));
    if !pl.errors.is_empty() {
        bail!(
            "the plan is refused ({} error(s)); nothing was changed",
            pl.errors.len()
        );
    }
    if !pl.has_changes() {
        if mode == Mode::Deploy {
            // Nothing to do, but the outputs are known: keep `status` current.
            let outputs = graph
                .outputs
                .iter()
                .filter_map(|(k, v)| {
                    crate::engine::plan::resolve_refs(v, &|r: &stack::Ref| {
                        inventory
                            .resources
                            .get(&r.id)
                            .and_then(|o| o.outputs.get(&r.output))
                            .cloned()
                    })
                    .ok()
                    .map(|v| (k.clone(), v))
                })
                .collect();
            let _ = journal::save_outputs(store.as_ref(), &outputs).await;
        }
        return Ok((ExitCode::SUCCESS, false));
    }
    if pl.is_destructive() && !args.yes && !confirm(style, &pl)? {
        bail!("not confirmed; nothing was changed");
    }

    let journal = Journal::start(Arc::clone(&store), &pl, command, holder, notes)
        .await
        .context("writing the journal")?;
    if cancel.is_cancelled() {
        bail!("the deploy lock was taken over while planning; nothing was changed");
    }
    let signals = on_interrupt(cancel.clone(), *style);
    let opts = ApplyOptions {
        parallelism: usize::from(args.parallelism),
        retry: RetryPolicy::default(),
    };
    let printer = ProgressPrinter::new(*style);
    let report = run_apply(
        p,
        graph,
        &pl,
        &inventory,
        Some(&journal),
        &opts,
        &printer,
        cancel,
    )
    .await;
    signals.abort();
    if let Err(e) = journal.finish(report.status, report.outputs.clone()).await {
        eprintln!(
            "{} could not write the journal: {e}",
            style.yellow("warning:")
        );
    }
    if report.status == ApplyStatus::Succeeded
        && mode == Mode::Deploy
        && let Err(e) = journal::save_outputs(store.as_ref(), &report.outputs).await
    {
        eprintln!(
            "{} could not record the stage's outputs: {e}",
            style.yellow("warning:")
        );
    }
    let elapsed = human_duration(t0.elapsed());
    let journal_at = format!("{}/{}", store.location(), journal.key());

    if args.output == Output::Json {
        let failed: Vec<serde_json::Value> = report
            .failed
            .iter()
            .map(|(id, action, e)| serde_json::json!({"id": id, "action": action, "error": e}))
            .collect();
        let skipped: Vec<serde_json::Value> = report
            .skipped
            .iter()
            .map(|(id, action)| serde_json::json!({"id": id, "action": action}))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "status": report.status,
                "summary": pl.summary,
                "outputs": report.outputs,
                "failed": failed,
                "skipped": skipped,
                "journal": journal_at,
            }))?
        );
    }
    match report.status {
        ApplyStatus::Succeeded => {
            let s = &pl.summary;
            eprintln!(
                "{} in {elapsed}: {} created, {} updated, {} replaced, {} deleted.",
                style.green("Apply complete"),
                s.create,
                s.update,
                s.replace,
                s.delete
            );
            if args.output == Output::Text && mode == Mode::Deploy && !report.outputs.is_empty() {
                println!("\nOutputs:");
                let width = report.outputs.keys().map(String::len).max().unwrap_or(0);
                for (k, v) in &report.outputs {
                    let shown = v.as_str().map_or_else(|| render::inline(v), str::to_string);
                    println!("  {k:<width$}  {shown}");
                }
            }
            Ok((ExitCode::SUCCESS, true))
        }
        ApplyStatus::Interrupted => {
            eprintln!(
                "{} after {elapsed}: {} step(s) done, {} not started; journal: {journal_at}. Run the same command again to converge.",
                style.yellow("Apply interrupted"),
                report.succeeded.len(),
                report.skipped.len()
            );
            Ok((ExitCode::from(130), true))
        }
        ApplyStatus::Failed | ApplyStatus::Running => {
            for (id, action, e) in &report.failed {
                eprintln!("{} {action:?} {id}: {e}", style.danger("failed:"));
            }
            bail!(
                "apply failed after {elapsed}: {} step(s) failed, {} done, {} not started; journal: {journal_at}. Fix the cause and run the same command again: it converges from the current state",
                report.failed.len(),
                report.succeeded.len(),
                report.skipped.len()
            )
        }
    }
}

/// After a deploy that changed something: the declared runners are ready and
/// a box can be created, used and deleted. Then tell the operator where
/// things are.
async fn verify_stage(
    loaded: &context::Loaded,
    stage: &stack::Stage,
    runners: &[String],
    output: Output,
    color: ColorChoice,
) -> anyhow::Result<()> {
    let style = Style::stderr(color);
    let client = context::control_plane(loaded, stage, None).await?;
    let health = client
        .health()
        .await
        .context("the control plane does not answer its health check")?;
    eprintln!(
        "{} control plane {} is {:?} (version {})",
        style.dim("verify:"),
        client.base(),
        health.status,
        health.version
    );
    if !runners.is_empty() {
        let took =
            crate::platform::verify::wait_ready(&client, runners, Duration::from_secs(90)).await?;
        eprintln!(
            "{} {} runner(s) ready ({})",
            style.dim("verify:"),
            runners.len(),
            human_duration(took)
        );
        let took = crate::platform::verify::smoke(&client, Duration::from_secs(60)).await?;
        eprintln!(
            "{} a box was created, ran a command and was deleted ({})",
            style.dim("verify:"),
            human_duration(took)
        );
    }
    if output == Output::Text && stage.target == stack::Target::Local {
        let key_path = context::local_stage_dir(loaded, stage)?.join("secrets/admin-api-key");
        println!(
            "
Control plane  {}",
            client.base()
        );
        // The key itself only goes to an operator's terminal, never to logs or files.
        if std::io::stdout().is_terminal() {
            let key = std::fs::read_to_string(&key_path).unwrap_or_default();
            println!("Admin API key  {}", key.trim());
        }
        println!("Key file       {}", key_path.display());
        println!(
            "Try it:        boxctl box create --stage {s} && boxctl box list --stage {s}",
            s = stage.name
        );
    }
    Ok(())
}
