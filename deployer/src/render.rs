//! Rendering: the plan as a reviewable diff for people or JSON for machines,
//! and progress lines while an apply runs.

use std::fmt::Write as _;
use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::Duration;

use similar::TextDiff;
use stack::Value;

use crate::engine::apply::{Progress, StepView};
use crate::engine::plan::{Action, Change, FieldChange, Plan};
use crate::engine::provider::ProviderError;

/// ANSI styling, or none.
#[derive(Clone, Copy, Debug)]
pub struct Style {
    color: bool,
}

impl Style {
    /// Colour when `choice` says so, or when auto and the stream is a terminal.
    pub fn new(choice: ColorChoice, is_terminal: bool) -> Style {
        let color = match choice {
            ColorChoice::Always => true,
            ColorChoice::Never => false,
            ColorChoice::Auto => {
                is_terminal
                    && std::env::var_os("NO_COLOR").is_none()
                    && std::env::var("TERM").map_or(true, |t| t != "dumb")
            }
        };
        Style { color }
    }

    /// Styling for standard output.
    pub fn stdout(choice: ColorChoice) -> Style {
        Style::new(choice, std::io::stdout().is_terminal())
    }

    /// Styling for standard error.
    pub fn stderr(choice: ColorChoice) -> Style {
        Style::new(choice, std::io::stderr().is_terminal())
    }

    fn paint(&self, code: &str, s: &str) -> String {
        if self.color {
            format!("\x1b[{code}m{s}\x1b[0m")
        } else {
            s.to_string()
        }
    }

    /// Green.
    pub fn green(&self, s: &str) -> String {
        self.paint("32", s)
    }
    /// Yellow.
    pub fn yellow(&self, s: &str) -> String {
        self.paint("33", s)
    }
    /// Red.
    pub fn red(&self, s: &str) -> String {
        self.paint("31", s)
    }
    /// Bold red, for what destroys.
    pub fn danger(&self, s: &str) -> String {
        self.paint("1;31", s)
    }
    /// Cyan.
    pub fn cyan(&self, s: &str) -> String {
        self.paint("36", s)
    }
    /// Dim.
    pub fn dim(&self, s: &str) -> String {
        self.paint("2", s)
    }
    /// Bold.
    pub fn bold(&self, s: &str) -> String {
        self.paint("1", s)
    }
}

/// `--color`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ColorChoice {
    /// Colour on terminals, unless NO_COLOR is set.
    Auto,
    /// Always.
    Always,
    /// Never.
    Never,
}

/// The plan's symbol per action.
pub fn symbol(action: Action) -> &'static str {
    match action {
        Action::Create => "+",
        Action::Update => "~",
        Action::Replace => "-/+",
        Action::Delete => "-",
        Action::IgnoredDrift => "!",
        Action::Retain => "=",
        Action::Unchanged => " ",
    }
}

fn colored_symbol(style: &Style, action: Action) -> String {
    let s = format!("{:>3}", symbol(action));
    match action {
        Action::Create => style.green(&s),
        Action::Update => style.yellow(&s),
        Action::Replace | Action::Delete => style.danger(&s),
        Action::IgnoredDrift => style.cyan(&s),
        Action::Retain | Action::Unchanged => style.dim(&s),
    }
}

/// A single-line rendering of a value.
pub fn inline(v: &Value) -> String {
    match v {
        Value::Str(s) => serde_json::to_string(s).expect("string serializes"),
        Value::Ref(r) => format!("(known after apply: {r})"),
        Value::Secret(name) => format!("(secret {name:?})"),
        other => serde_json::to_string(&other.to_json()).expect("value serializes"),
    }
}

fn is_multiline(v: Option<&Value>) -> bool {
    matches!(v, Some(Value::Str(s)) if s.contains('\n'))
}

fn render_field(out: &mut String, style: &Style, f: &FieldChange, creating: bool) {
    let mut note = String::new();
    if f.forces_replace {
        note.push_str(&style.danger(" # forces replacement"));
    }
    if f.ignored {
        note.push_str(&style.cyan(" # ignored by policy"));
    }
    if is_multiline(f.old.as_ref()) || is_multiline(f.new.as_ref()) {
        let old = f.old.as_ref().and_then(Value::as_str).unwrap_or("");
        let new = f.new.as_ref().and_then(Value::as_str).unwrap_or("");
        let _ = writeln!(out, "      {}:{note}", f.name);
        if creating {
            for line in new.lines() {
                let _ = writeln!(out, "        {}", style.green(&format!("+{line}")));
            }
            return;
        }
        let diff = TextDiff::from_lines(old, new);
        for line in diff.unified_diff().context_radius(2).to_string().lines() {
            let styled = if line.starts_with("@@") {
                style.cyan(line)
            } else if line.starts_with('+') {
                style.green(line)
            } else if line.starts_with('-') {
                style.red(line)
            } else {
                line.to_string()
            };
            let _ = writeln!(out, "        {styled}");
        }
        return;
    }
    let new = match (&f.new, f.known_after_apply) {
        (_, true) => style.dim("(known after apply)"),
        (Some(v), false) => inline(v),
        (None, false) => style.dim("(removed)"),
    };
    if creating {
        let _ = writeln!(out, "      {}: {new}{note}", f.name);
    } else {
        let old = f.old.as_ref().map_or_else(|| style.dim("(none)"), inline);
        let _ = writeln!(out, "      {}: {old} → {new}{note}", f.name);
    }
}

fn render_change(out: &mut String, style: &Style, c: &Change, width: usize) {
    let label = match c.action {
        Action::Replace => format!("  {}", style.danger("REPLACE: destroys and recreates")),
        Action::Delete => format!("  {}", style.danger("DELETE")),
        Action::IgnoredDrift => format!("  {}", style.cyan("drift ignored by policy")),
        Action::Retain => format!("  {}", style.dim("kept: retain")),
        _ => String::new(),
    };
    let reason = c
        .reason
        .as_ref()
        .map(|r| style.dim(&format!(" ({r})")))
        .unwrap_or_default();
    let pad = " ".repeat(width.saturating_sub(c.id.as_str().chars().count()));
    let _ = writeln!(
        out,
        "{} {}{pad}  {}{label}{reason}",
        colored_symbol(style, c.action),
        style.bold(c.id.as_str()),
        style.dim(&c.kind)
    );
    for f in &c.fields {
        render_field(out, style, f, c.action == Action::Create);
    }
}

/// The plan as text: one block per changed resource, then errors and a summary.
pub fn plan_text(plan: &Plan, style: &Style) -> String {
    let mut out = String::new();
    let shown: Vec<&Change> = plan
        .changes
        .iter()
        .filter(|c| c.action != Action::Unchanged)
        .collect();
    let width = shown
        .iter()
        .map(|c| c.id.as_str().chars().count())
        .max()
        .unwrap_or(0);
    for c in &shown {
        render_change(&mut out, style, c, width);
    }
    if !shown.is_empty() {
        out.push('\n');
    }
    for e in &plan.errors {
        let _ = writeln!(out, "{} {}", style.danger("error:"), e.message);
        let _ = writeln!(out, "  hint: {}", e.hint);
    }
    if !plan.errors.is_empty() {
        out.push('\n');
    }
    out.push_str(&summary_line(plan, style));
    out.push('\n');
    out
}

/// "Plan: 2 to create, …" or "No changes."
pub fn summary_line(plan: &Plan, style: &Style) -> String {
    let s = &plan.summary;
    let mut extra = vec![format!("{} unchanged", s.unchanged)];
    if s.ignored_drift > 0 {
        extra.push(format!("{} with ignored drift", s.ignored_drift));
    }
    if s.retain > 0 {
        extra.push(format!("{} retained", s.retain));
    }
    if !s.has_changes() {
        return format!(
            "No changes. Stage {} is up to date ({}).",
            plan.stage,
            extra.join(", ")
        );
    }
    let destroy = format!("{} to replace, {} to delete", s.replace, s.delete);
    let destroy = if s.replace + s.delete > 0 {
        style.danger(&destroy)
    } else {
        destroy
    };
    format!(
        "Plan: {} to create, {} to update, {destroy}; {}.",
        style.green(&s.create.to_string()),
        style.yellow(&s.update.to_string()),
        extra.join(", ")
    )
}

/// The plan as JSON for machines: changed resources, summary, errors.
pub fn plan_json(plan: &Plan) -> serde_json::Value {
    let changes: Vec<&Change> = plan
        .changes
        .iter()
        .filter(|c| c.action != Action::Unchanged)
        .collect();
    serde_json::json!({
        "stack": plan.stack,
        "stage": plan.stage,
        "mode": plan.mode,
        "changes": changes,
        "summary": plan.summary,
        "errors": plan.errors,
    })
}

/// Prints one line per step event to standard error.
pub struct ProgressPrinter {
    style: Style,
    lock: Mutex<()>,
}

impl ProgressPrinter {
    /// A printer with the given styling.
    pub fn new(style: Style) -> Self {
        ProgressPrinter {
            style,
            lock: Mutex::new(()),
        }
    }

    fn line(&self, s: String) {
        let _g = self.lock.lock().expect("progress mutex");
        eprintln!("{s}");
    }
}

fn verb(action: Action) -> &'static str {
    match action {
        Action::Create => "create",
        Action::Update => "update",
        Action::Replace => "replace",
        Action::Delete => "delete",
        _ => "check",
    }
}

/// "1.2s" or "350ms".
pub fn human_duration(d: Duration) -> String {
    if d >= Duration::from_secs(1) {
        format!("{:.1}s", d.as_secs_f64())
    } else {
        format!("{}ms", d.as_millis())
    }
}

impl Progress for ProgressPrinter {
    fn started(&self, step: &StepView) {
        self.line(format!(
            "[{}/{}] {} {} {}",
            step.number,
            step.total,
            self.style.dim("start"),
            verb(step.action),
            step.id
        ));
    }

    fn retrying(&self, step: &StepView, attempt: u32, error: &ProviderError, delay: Duration) {
        self.line(format!(
            "      {} {} {} (attempt {attempt} failed: {error}); retrying in {}",
            self.style.yellow("retry"),
            verb(step.action),
            step.id,
            human_duration(delay)
        ));
    }

    fn finished(&self, step: &StepView, result: &Result<(), ProviderError>, elapsed: Duration) {
        match result {
            Ok(()) => self.line(format!(
                "[{}/{}] {} {} {} ({})",
                step.number,
                step.total,
                self.style.green("done "),
                verb(step.action),
                step.id,
                human_duration(elapsed)
            )),
            Err(e) => self.line(format!(
                "[{}/{}] {} {} {}: {e}",
                step.number,
                step.total,
                self.style.danger("FAILED"),
                verb(step.action),
                step.id
            )),
        }
    }

    fn stopping(&self, why: &str, in_flight: usize) {
        self.line(format!(
            "{} {why}: no new steps start; waiting for {in_flight} in flight",
            self.style.yellow("stopping:")
        ));
    }
}
