//! `boxlite-runner`: the agent, and its operator commands.
//!
//! - `boxlite-runner [--config PATH]` or `boxlite-runner run --config PATH`: run the agent.
//! - `boxlite-runner upgrade --artifact URL-OR-PATH --sha256 HEX [--config PATH] [--timeout SECS]`:
//!   verified self-upgrade with rollback; exit codes in [`runner_image::upgrade::ExitCode`].
//! - `boxlite-runner image import NAME LAYOUT.tar [--config PATH]`, `image list`: the image store.
//! - `boxlite-runner status [--config PATH]`: the running agent's status (admin socket).
//! - `boxlite-runner version [--json]`.
//! - `boxlite-runner shim --box-dir DIR` (internal): the per-box shim.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use runner_image::config::{Config, DEFAULT_CONFIG_PATH};

#[derive(Parser)]
#[command(name = "boxlite-runner", version, about = "BoxLite runner agent")]
struct Cli {
    /// Configuration file.
    #[arg(long, global = true, default_value = DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent (the default).
    Run,
    /// Install a new release of this binary, verified, with rollback.
    ///
    /// Exit codes: 0 upgraded or already installed; 2 usage/configuration;
    /// 3 download failed; 4 checksum mismatch or malformed artifact (nothing
    /// changed); 5 agent not reachable (nothing changed); 6 new binary not
    /// installable (nothing switched); 7 new release failed, old one back;
    /// 8 rollback failed; 9 another upgrade is running.
    Upgrade {
        /// http(s) URL, file:// URL or path of a .tar.gz holding `boxlite-runner`.
        #[arg(long)]
        artifact: String,
        /// SHA-256 of the artifact (hex).
        #[arg(long)]
        sha256: String,
        /// Seconds to wait for the restarted agent to be healthy.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
    /// Manage the image store.
    Image {
        #[command(subcommand)]
        command: ImageCommand,
    },
    /// Show the running agent's status.
    Status,
    /// Delete every box of this runner and take no new ones (for retiring it:
    /// `boxctl destroy` and `boxctl decommission` run this before stopping the agent).
    Purge,
    /// Print the version.
    Version {
        /// As JSON.
        #[arg(long)]
        json: bool,
    },
    /// Internal: run the shim of one box.
    #[command(hide = true)]
    Shim {
        /// The box directory.
        #[arg(long)]
        box_dir: PathBuf,
        /// Descriptor to report readiness on.
        #[arg(long)]
        ready_fd: Option<i32>,
    },
}

#[derive(Subcommand)]
enum ImageCommand {
    /// Import an OCI image layout tarball as NAME.
    Import {
        /// Image name.
        name: String,
        /// OCI image layout tarball (optionally gzipped).
        tarball: PathBuf,
    },
    /// List images.
    List,
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

fn load(path: &std::path::Path) -> Config {
    match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(2);
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| {
            eprintln!("error: starting the runtime: {e}");
            std::process::exit(1)
        })
}

fn main() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let cli = Cli::parse();
    init_tracing();
    let code = match cli.command.unwrap_or(Command::Run) {
        Command::Shim { box_dir, ready_fd } => {
            // Before any thread exists: the shim forks and changes namespaces.
            match runner_image::shim::run(&box_dir, ready_fd) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    1
                }
            }
        }
        Command::Run => {
            let config = load(&cli.config);
            // May exec into the installed release (before any thread exists).
            if let Err(e) = runner_image::upgrade::startup(&config) {
                eprintln!("error: {e:#}");
                std::process::exit(1);
            }
            match runtime().block_on(runner_image::agent::run(config)) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    1
                }
            }
        }
        Command::Upgrade {
            artifact,
            sha256,
            timeout,
        } => {
            let config = load(&cli.config);
            let args = runner_image::upgrade::UpgradeArgs {
                artifact,
                sha256,
                timeout: Duration::from_secs(timeout.clamp(5, 3600)),
            };
            runtime().block_on(runner_image::upgrade::upgrade(&config, &args))
        }
        Command::Image { command } => {
            let config = load(&cli.config);
            let store = runner_image::images::ImageStore::new(&config.image_dir, config.box_uid);
            match command {
                ImageCommand::Import { name, tarball } => match store.import_oci(&name, &tarball) {
                    Ok(info) => {
                        println!("imported {} ({})", info.name, info.digest);
                        0
                    }
                    Err(e) => {
                        eprintln!("error: {e:#}");
                        1
                    }
                },
                ImageCommand::List => {
                    for i in store.list() {
                        println!("{}\t{}\t{}\t{}", i.name, i.source, i.digest, i.created_at);
                    }
                    0
                }
            }
        }
        Command::Status => {
            let config = load(&cli.config);
            let path = config.layout().admin_socket();
            runtime().block_on(async move {
                match runner_image::admin::AdminClient::connect(&path).await {
                    Ok(mut c) => match c.status().await {
                        Ok(s) => {
                            println!("{}", serde_json::to_string_pretty(&s).unwrap_or_default());
                            0
                        }
                        Err(e) => {
                            eprintln!("error: {e:#}");
                            1
                        }
                    },
                    Err(e) => {
                        eprintln!("error: {e:#}");
                        1
                    }
                }
            })
        }
        Command::Purge => {
            let config = load(&cli.config);
            let path = config.layout().admin_socket();
            runtime().block_on(async move {
                let result = async {
                    let mut c = runner_image::admin::AdminClient::connect(&path).await?;
                    let before = c.status().await?.boxes.len();
                    c.call_ok(&runner_image::admin::AdminRequest::Purge).await?;
                    anyhow::Ok(before)
                }
                .await;
                match result {
                    Ok(n) => {
                        println!("deleted {n} box(es); the runner takes no new ones");
                        0
                    }
                    Err(e) => {
                        eprintln!("error: {e:#}");
                        1
                    }
                }
            })
        }
        Command::Version { json } => {
            if json {
                println!("{}", serde_json::json!({"version": runner_image::VERSION}));
            } else {
                println!("boxlite-runner {}", runner_image::VERSION);
            }
            0
        }
    };
    std::process::exit(code);
}
