//! `boxctl status` and `boxctl unlock`.

use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;
use std::process::ExitCode;

use anyhow::bail;
use time::OffsetDateTime;

use super::Output;
use super::context;
use crate::engine::journal::{self, ApplyStatus, JournalDoc, StepStatus};
use crate::engine::lock::{self, Holder, fmt_time};
use crate::render::{ColorChoice, Style, human_duration, inline};

fn last_deploy_json(doc: &JournalDoc, status: &str) -> serde_json::Value {
    let steps: Vec<serde_json::Value> = doc
        .steps
        .iter()
        .map(|s| {
            serde_json::json!({
                "id": s.id, "action": s.action, "status": s.status, "attempts": s.attempts, "error": s.error,
            })
        })
        .collect();
    serde_json::json!({
        "apply_id": doc.apply_id,
        "command": doc.command,
        "status": status,
        "holder": doc.holder,
        "started_at": fmt_time(doc.started_at),
        "finished_at": doc.finished_at.map(fmt_time),
        "summary": doc.summary,
        "steps": steps,
        "notes": doc.notes,
    })
}

/// `boxctl status`.
pub async fn status(
    explicit: Option<&Path>,
    endpoint: Option<&str>,
    stage: &str,
    output: Output,
    color: ColorChoice,
) -> anyhow::Result<ExitCode> {
    let loaded = context::load(explicit, color)?;
    let stage_cfg = loaded.stack.stage(stage)?;
    let target = context::target(&loaded, stage_cfg, endpoint).await?;
    let store = target.store.as_ref();
    let last = journal::latest_matching(store, journal::is_deploy).await?;
    let latest = journal::latest(store).await?;
    let last_operation = latest.filter(|l| !journal::is_deploy(l));
    let held = lock::read(store).await?.map(|(i, _)| i);
    let this_host = Holder::current("").host;
    let live_lock = held
        .as_ref()
        .filter(|l| !l.is_stale(OffsetDateTime::now_utc(), &this_host));
    // A journal still marked running with no live lock belongs to an apply that died.
    let status_of = |doc: &JournalDoc| match doc.status {
        ApplyStatus::Running if live_lock.is_none() => {
            "interrupted (the process died before finishing)"
        }
        ApplyStatus::Running => "running",
        ApplyStatus::Succeeded => "succeeded",
        ApplyStatus::Failed => "failed",
        ApplyStatus::Interrupted => "interrupted",
    };
    let outputs = journal::outputs(store).await?;
    if output == Output::Json {
        let v = serde_json::json!({
            "stack": loaded.stack.name,
            "stage": stage,
            "target": stage_cfg.target,
            "outputs": outputs,
                        "last_deploy": last.as_ref().map(|d| last_deploy_json(d, status_of(d))),
            "last_operation": last_operation.as_ref().map(|d| last_deploy_json(d, status_of(d))),
            "lock": live_lock,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    let style = Style::stdout(color);
    println!(
        "{} {}/{} ({})",
        style.bold("Stage"),
        loaded.stack.name,
        stage,
        target.description
    );
    match &last {
        None => println!("Last deploy: none recorded (never deployed, or destroyed)"),
        Some(d) => {
            let took = d
                .finished_at
                .map(|f| format!(" in {}", human_duration((f - d.started_at).unsigned_abs())))
                .unwrap_or_default();
            let st = status_of(d);
            let st = match d.status {
                ApplyStatus::Succeeded => style.green(st),
                ApplyStatus::Failed => style.danger(st),
                _ => style.yellow(st),
            };
            println!(
                "Last {}: {st}, started {}{took}, by {}@{}",
                d.command,
                fmt_time(d.started_at),
                d.holder.user,
                d.holder.host
            );
            let s = &d.summary;
            println!(
                "  plan: {} created, {} updated, {} replaced, {} deleted, {} unchanged",
                s.create, s.update, s.replace, s.delete, s.unchanged
            );
            for step in d.steps.iter().filter(|s| s.status != StepStatus::Succeeded) {
                let what = match step.status {
                    StepStatus::Failed => style.danger("failed"),
                    StepStatus::Running => style.yellow("in flight"),
                    _ => style.dim("skipped"),
                };
                let first = step.error.as_deref().and_then(|e| e.lines().next());
                println!(
                    "  {what} {:?} {}{}",
                    step.action,
                    step.id,
                    first.map(|e| format!(": {e}")).unwrap_or_default()
                );
            }
            for n in &d.notes {
                println!("  note: {n}");
            }
        }
    }
    if let Some(op) = &last_operation {
        let st = status_of(op);
        println!(
            "Since then: {}, {st}, started {}",
            op.command,
            fmt_time(op.started_at)
        );
        for step in op.steps.iter().filter(|s| s.status == StepStatus::Failed) {
            let first = step
                .error
                .as_deref()
                .unwrap_or("")
                .lines()
                .next()
                .unwrap_or("");
            println!("  {} {}: {first}", style.danger("failed"), step.id);
        }
    }
    if !outputs.is_empty() {
        println!("Outputs:");
        let width = outputs.keys().map(String::len).max().unwrap_or(0);
        for (k, v) in &outputs {
            println!(
                "  {k:<width$}  {}",
                v.as_str().map_or_else(|| inline(v), str::to_string)
            );
        }
    }
    match live_lock {
        Some(l) => println!("Lock: held by {}", l.describe()),
        None => println!("Lock: free"),
    }
    Ok(ExitCode::SUCCESS)
}

/// `boxctl unlock`.
pub async fn unlock(
    explicit: Option<&Path>,
    endpoint: Option<&str>,
    stage: &str,
    force: bool,
    color: ColorChoice,
) -> anyhow::Result<ExitCode> {
    let loaded = context::load(explicit, color)?;
    let stage_cfg = loaded.stack.stage(stage)?;
    let target = context::target(&loaded, stage_cfg, endpoint).await?;
    let style = Style::stderr(color);
    let Some((info, _)) = lock::read(target.store.as_ref()).await? else {
        eprintln!("stage {}/{stage} is not locked", loaded.stack.name);
        return Ok(ExitCode::SUCCESS);
    };
    let stale = info.is_stale(OffsetDateTime::now_utc(), &Holder::current("").host);
    if !stale && !force {
        if !std::io::stdin().is_terminal() {
            bail!(
                "the lock is held by {} and its lease is still running; if that deploy is really gone, rerun with --force",
                info.describe()
            );
        }
        eprint!(
            "{} the lock is held by {} and its lease is still running.\nRemove it anyway? Type {} to confirm: ",
            style.yellow("warning:"),
            info.describe(),
            style.bold("yes")
        );
        std::io::stderr().flush().ok();
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line)?;
        if line.trim() != "yes" {
            bail!("not confirmed; the lock stays");
        }
    }
    match lock::force_unlock(target.store.as_ref()).await? {
        Some(removed) => eprintln!("removed the lock held by {}", removed.describe()),
        None => eprintln!("the lock was released in the meantime"),
    }
    Ok(ExitCode::SUCCESS)
}
