//! `boxctl validate` and `boxctl graph`.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context as _;
use stack::Severity;

use super::Output;
use super::context::{find_stack, print_diagnostics};
use crate::render::{ColorChoice, Style};

/// Check stack.toml; exit 1 when there is any error.
pub fn run(
    explicit: Option<&Path>,
    stage: Option<&str>,
    output: Output,
    color: ColorChoice,
) -> anyhow::Result<ExitCode> {
    let path = find_stack(explicit)?;
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let shown = path.display().to_string();
    let (diags, stack) = match stack::load(&text) {
        Ok(l) => (l.warnings, Some(l.stack)),
        Err(d) => (d, None),
    };
    let mut stage_error = None;
    if let (Some(stack), Some(stage)) = (&stack, stage)
        && let Err(e) = stack.resolve(stage)
    {
        stage_error = Some(e.to_string());
    }
    let errors = diags
        .iter()
        .filter(|d| d.severity == Severity::Error)
        .count()
        + usize::from(stage_error.is_some());
    let warnings = diags.len() + usize::from(stage_error.is_some()) - errors;
    match output {
        Output::Json => {
            let v = serde_json::json!({
                "path": shown,
                "valid": errors == 0,
                "diagnostics": diags,
                "stage_error": stage_error,
            });
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        Output::Text => {
            print_diagnostics(&shown, &diags, color);
            let style = Style::stderr(color);
            if let Some(e) = &stage_error {
                eprintln!("{} {e}", style.danger("error:"));
            }
            if errors == 0 {
                let stages = stack
                    .as_ref()
                    .map(|s| s.stages.keys().cloned().collect::<Vec<_>>().join(", "))
                    .unwrap_or_default();
                eprintln!(
                    "{shown}: valid{} (stages: {stages})",
                    if warnings > 0 {
                        format!(", {warnings} warning(s)")
                    } else {
                        String::new()
                    }
                );
            } else {
                eprintln!("{shown}: {errors} error(s), {warnings} warning(s)");
            }
        }
    }
    Ok(if errors == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Print the desired graph of a stage as canonical JSON.
pub fn graph(explicit: Option<&Path>, stage: &str) -> anyhow::Result<ExitCode> {
    let loaded = super::context::load(explicit, ColorChoice::Auto)?;
    let g = loaded.stack.resolve(stage)?;
    print!("{}", g.to_canonical_json());
    Ok(ExitCode::SUCCESS)
}
