//! The `boxctl` command line.

mod apply;
mod boxes;
mod context;
mod decommission;
mod runner;
mod secret;
mod status;
mod validate;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::render::ColorChoice;

/// boxctl reconciles the world to stack.toml: `diff` shows what would change,
/// `deploy` makes it so.
#[derive(Debug, Parser)]
#[command(
    name = "boxctl",
    version,
    about = "Deploy and operate the BoxLite platform from one declarative stack.toml",
    long_about = "Deploy and operate the BoxLite platform from one declarative stack.toml.\n\n\
        boxctl reads stack.toml, resolves a stage into the resources it needs, observes what \
        exists, and reconciles the difference: `diff` shows exactly what would change and \
        touches nothing; `deploy` makes it so, asking before anything is deleted or replaced.",
    after_help = "Examples:\n  \
        boxctl validate                      check stack.toml, every problem at once\n  \
        boxctl diff --stage dev              what deploy would change\n  \
        boxctl deploy --stage dev            bring the dev stage up on this machine\n  \
        boxctl status --stage dev            what the last deploy did, and the stage's URLs\n  \
        boxctl destroy --stage dev --yes     remove everything the stage created\n\n\
        Exit codes: 0 success; 1 failure or invalid input; 2 `diff --exit-code` found changes."
)]
pub struct Cli {
    /// Path of stack.toml (default: ./stack.toml, or the first one found in a parent directory).
    #[arg(long, global = true, env = "BOXCTL_STACK", value_name = "PATH")]
    stack: Option<PathBuf>,
    /// When to colour output.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "auto",
        value_name = "WHEN"
    )]
    color: ColorChoice,
    /// Send every AWS request to this endpoint instead of AWS (an emulator such as moto).
    #[arg(
        long,
        global = true,
        env = "BOXCTL_AWS_ENDPOINT_URL",
        value_name = "URL",
        value_parser = parse_endpoint
    )]
    endpoint_url: Option<String>,
    /// More log output on stderr (-v info, -vv debug, -vvv trace).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check stack.toml and report every problem with its line and column.
    Validate(ValidateArgs),
    /// Show what `deploy` would change, without changing anything.
    Diff(DiffArgs),
    /// Make the stage match stack.toml.
    Deploy(DeployArgs),
    /// Remove everything the stage created (resources marked `retain` are kept).
    Destroy(DestroyArgs),
    /// Show what the last deploy did and the stage's outputs (URLs, ids).
    Status(StatusArgs),
    /// Remove a stage's deploy lock by hand (a crashed deploy's lock also expires by itself).
    Unlock(UnlockArgs),
    /// Print the stage's desired resource graph as canonical JSON.
    Graph(StageArg),
    /// Use the deployed platform: create, list, exec into and delete boxes.
    #[command(subcommand, name = "box")]
    Box(boxes::BoxCommand),
    /// Operate runners: roll out a new runner binary.
    #[command(subcommand)]
    Runner(runner::RunnerCommand),
    /// Set, list and remove the stage's secrets (values never shown).
    #[command(subcommand)]
    Secret(secret::SecretCommand),
    /// Retire one runner: drain it, empty it (--migrate or --wait), then stop
    /// and remove it (on aws: lift termination protection and terminate its
    /// instance) and deregister it.
    #[command(after_help = decommission::HELP)]
    Decommission(decommission::DecommissionArgs),
}

/// Output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// For people.
    Text,
    /// For machines.
    Json,
}

#[derive(Debug, Args)]
pub(crate) struct StageArg {
    /// The stage, as declared under [stages.<name>] in stack.toml.
    #[arg(long, short = 's', env = "BOXCTL_STAGE", value_name = "STAGE")]
    pub(crate) stage: String,
}

#[derive(Debug, Args)]
struct ValidateArgs {
    /// Also resolve this stage's resource graph.
    #[arg(long, short = 's', value_name = "STAGE")]
    stage: Option<String>,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value = "text")]
    output: Output,
}

#[derive(Debug, Args)]
struct DiffArgs {
    #[command(flatten)]
    stage: StageArg,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value = "text")]
    output: Output,
    /// Exit 2 when there are changes, 0 when there are none.
    #[arg(long)]
    exit_code: bool,
    /// Show the plan as if `deploy --adopt ID` (see deploy --help).
    #[arg(long, value_name = "ID")]
    adopt: Vec<String>,
}

#[derive(Debug, Args)]
struct ApplyArgs {
    /// Apply destructive changes (delete, replace) without asking.
    #[arg(long, short = 'y')]
    yes: bool,
    /// Steps run at once.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u16).range(1..=256))]
    parallelism: u16,
    /// How long to wait for another deploy's lock before giving up (e.g. 30s, 5m; 0 = fail at once).
    #[arg(long, default_value = "0s", value_parser = parse_duration, value_name = "DURATION")]
    lock_timeout: Duration,
    /// Output format of the final result (progress always goes to stderr).
    #[arg(long, short = 'o', value_enum, default_value = "text")]
    output: Output,
}

#[derive(Debug, Args)]
struct DeployArgs {
    #[command(flatten)]
    stage: StageArg,
    #[command(flatten)]
    apply: ApplyArgs,
    /// Skip the check after a deploy that changed something (runners ready, a
    /// box created, exec'd and deleted).
    #[arg(long)]
    no_verify: bool,
    /// Take over a DNS record boxctl does not own but the stage declares
    /// (e.g. `--adopt dns/api`): without it, a foreign record holding a wanted
    /// name stops the plan. Repeatable.
    #[arg(long, value_name = "ID")]
    adopt: Vec<String>,
}

#[derive(Debug, Args)]
struct DestroyArgs {
    #[command(flatten)]
    stage: StageArg,
    #[command(flatten)]
    apply: ApplyArgs,
}

#[derive(Debug, Args)]
struct StatusArgs {
    #[command(flatten)]
    stage: StageArg,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value = "text")]
    output: Output,
}

#[derive(Debug, Args)]
struct UnlockArgs {
    #[command(flatten)]
    stage: StageArg,
    /// Remove the lock even if its lease is still running.
    #[arg(long)]
    force: bool,
}

/// Parse `90`, `90s`, `5m`, `1h`.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (try 30s, 5m, 1h)"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => return Err(format!("unknown unit {unit:?} in {s:?} (use s, m or h)")),
    };
    Ok(Duration::from_secs(secs))
}

/// An `http://` or `https://` URL with a host.
fn parse_endpoint(s: &str) -> Result<String, String> {
    let u = url::Url::parse(s).map_err(|e| format!("{s:?} is not a URL: {e}"))?;
    if !matches!(u.scheme(), "http" | "https") || u.host_str().is_none() {
        return Err(format!(
            "{s:?} must be an http:// or https:// URL with a host"
        ));
    }
    Ok(s.trim_end_matches('/').to_string())
}

fn init_logging(verbose: u8) {
    let level = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("BOXCTL_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(format!(
            "{level},aws_config=warn,aws_smithy_runtime=warn,hyper=warn"
        ))
    });
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

/// Run boxctl with the process's arguments.
pub fn main() -> ExitCode {
    // Die quietly when stdout is a closed pipe (`boxctl status | head`), as
    // Unix tools do. Sockets are unaffected: Rust writes them with MSG_NOSIGNAL.
    // SAFETY: called before any other thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    init_logging(cli.verbose);
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let color = cli.color;
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            let style = crate::render::Style::stderr(color);
            eprintln!("{} {e}", style.danger("error:"));
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let color = cli.color;
    let endpoint = cli.endpoint_url.as_deref();
    match cli.command {
        Command::Validate(a) => {
            validate::run(cli.stack.as_deref(), a.stage.as_deref(), a.output, color)
        }
        Command::Graph(a) => validate::graph(cli.stack.as_deref(), &a.stage),
        Command::Diff(a) => {
            apply::diff(
                cli.stack.as_deref(),
                endpoint,
                &a.stage.stage,
                a.output,
                a.exit_code,
                &a.adopt,
                color,
            )
            .await
        }
        Command::Deploy(a) => {
            let mode = crate::engine::plan::Mode::Deploy;
            apply::apply(
                cli.stack.as_deref(),
                endpoint,
                &a.stage.stage,
                mode,
                &a.apply,
                !a.no_verify,
                &a.adopt,
                color,
            )
            .await
        }
        Command::Destroy(a) => {
            let mode = crate::engine::plan::Mode::Destroy;
            apply::apply(
                cli.stack.as_deref(),
                endpoint,
                &a.stage.stage,
                mode,
                &a.apply,
                false,
                &[],
                color,
            )
            .await
        }
        Command::Box(cmd) => boxes::run(cli.stack.as_deref(), endpoint, cmd, color).await,
        Command::Runner(cmd) => runner::run(cli.stack.as_deref(), endpoint, cmd, color).await,
        Command::Secret(cmd) => secret::run(cli.stack.as_deref(), endpoint, cmd, color).await,
        Command::Decommission(a) => {
            decommission::run(cli.stack.as_deref(), endpoint, a, color).await
        }
        Command::Status(a) => {
            status::status(
                cli.stack.as_deref(),
                endpoint,
                &a.stage.stage,
                a.output,
                color,
            )
            .await
        }
        Command::Unlock(a) => {
            status::unlock(
                cli.stack.as_deref(),
                endpoint,
                &a.stage.stage,
                a.force,
                color,
            )
            .await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert_eq!(parse_duration("45s").unwrap(), Duration::from_secs(45));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert!(parse_duration("5d").is_err());
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn endpoints_are_http_urls() {
        assert_eq!(
            parse_endpoint("http://127.0.0.1:5000/").unwrap(),
            "http://127.0.0.1:5000"
        );
        assert!(parse_endpoint("127.0.0.1:5000").is_err());
        assert!(parse_endpoint("ftp://x").is_err());
    }

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
