//! `boxctl secret set|list|rm`: the stage's secrets, by name. Values come
//! from stdin or a prompt, never from the command line, and are never shown.

use std::io::{IsTerminal, Read as _};
use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};

use super::context;
use super::{Output, StageArg};
use crate::render::{ColorChoice, Style};
use crate::secrets::SecretValue;

/// Largest secret value accepted (SSM's advanced tier holds 8 KiB).
const MAX_VALUE_BYTES: usize = 8 * 1024;

/// Secret subcommands.
#[derive(Debug, Subcommand)]
pub enum SecretCommand {
    /// Set a secret: the value is read from stdin (or a prompt on a terminal).
    #[command(after_help = "Examples:\n  \
        boxctl secret set cloudflare-api-token --stage prod      prompts for the value\n  \
        printf %s \"$TOKEN\" | boxctl secret set cloudflare-api-token --stage prod\n\n\
        aws stages keep secrets as SSM SecureString parameters under /boxlite/<stage>/;\n\
        local stages in a 0600 file in the stage's state directory. Services name the\n\
        secrets they receive in stack.toml (`secrets`, `optional_secrets`).")]
    Set(SetArgs),
    /// List the stage's secrets: names and when they last changed, never values.
    List(ListArgs),
    /// Remove a secret (a service's optional secret then turns its feature off at the next deploy).
    Rm(RmArgs),
}

/// `secret set`.
#[derive(Debug, Args)]
pub struct SetArgs {
    /// Secret name: lowercase letters, digits and '-'.
    name: String,
    #[command(flatten)]
    stage: StageArg,
}

/// `secret list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    stage: StageArg,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value = "text")]
    output: Output,
}

/// `secret rm`.
#[derive(Debug, Args)]
pub struct RmArgs {
    /// Secret name.
    name: String,
    #[command(flatten)]
    stage: StageArg,
}

/// Run a secret subcommand.
pub async fn run(
    explicit: Option<&Path>,
    endpoint: Option<&str>,
    cmd: SecretCommand,
    color: ColorChoice,
) -> anyhow::Result<ExitCode> {
    let loaded = context::load(explicit, color)?;
    let stage_name = match &cmd {
        SecretCommand::Set(a) => &a.stage.stage,
        SecretCommand::List(a) => &a.stage.stage,
        SecretCommand::Rm(a) => &a.stage.stage,
    };
    let stage = loaded.stack.stage(stage_name)?;
    let style = Style::stderr(color);
    match &cmd {
        SecretCommand::Set(a) => {
            stack::secrets::check_name(&a.name).map_err(anyhow::Error::msg)?;
            let value = read_value(&a.name)?;
            let target = context::target(&loaded, stage, endpoint).await?;
            target.secrets.set(&a.name, &value).await?;
            eprintln!(
                "{} secret {} of stage {}",
                style.green("set"),
                style.bold(&a.name),
                stage.name
            );
        }
        SecretCommand::List(a) => {
            let target = context::target(&loaded, stage, endpoint).await?;
            let list = target.secrets.list().await?;
            match a.output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&list)?),
                Output::Text if list.is_empty() => {
                    eprintln!("stage {} has no secrets set", stage.name)
                }
                Output::Text => {
                    let width = list.iter().map(|s| s.name.len()).max().unwrap_or(4).max(4);
                    println!("{:width$}  MODIFIED", "NAME");
                    for s in list {
                        let when = s
                            .modified
                            .and_then(|t| {
                                t.format(&time::format_description::well_known::Rfc3339)
                                    .ok()
                            })
                            .unwrap_or_else(|| "-".into());
                        println!("{:width$}  {when}", s.name);
                    }
                }
            }
        }
        SecretCommand::Rm(a) => {
            stack::secrets::check_name(&a.name).map_err(anyhow::Error::msg)?;
            let target = context::target(&loaded, stage, endpoint).await?;
            if !target.secrets.remove(&a.name).await? {
                bail!("stage {} has no secret {}", stage.name, a.name);
            }
            eprintln!(
                "{} secret {} of stage {}",
                style.green("removed"),
                style.bold(&a.name),
                stage.name
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The value from a prompt (terminal) or stdin, without its final newline.
fn read_value(name: &str) -> anyhow::Result<SecretValue> {
    let value = if std::io::stdin().is_terminal() {
        let v = rpassword::prompt_password(format!("value of {name}: "))
            .context("reading the value from the terminal")?;
        let again =
            rpassword::prompt_password("again: ").context("reading the value from the terminal")?;
        if v != again {
            bail!("the two values differ; nothing was set");
        }
        v
    } else {
        let mut buf = Vec::new();
        std::io::stdin()
            .take(MAX_VALUE_BYTES as u64 + 1)
            .read_to_end(&mut buf)
            .context("reading the value from stdin")?;
        if buf.len() > MAX_VALUE_BYTES {
            bail!("the value is longer than {MAX_VALUE_BYTES} bytes");
        }
        let mut v = String::from_utf8(buf).context("the value is not UTF-8 text")?;
        if v.ends_with('\n') {
            v.pop();
            if v.ends_with('\r') {
                v.pop();
            }
        }
        v
    };
    if value.is_empty() {
        bail!(
            "the value is empty; pipe it on stdin (printf %s \"$VALUE\" | boxctl secret set {name} --stage S)"
        );
    }
    Ok(SecretValue::new(value))
}
