//! `boxlite-control-plane --config PATH`: serve the BoxLite API.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use control_plane::{Clock, Config, Server, server, telemetry};

/// BoxLite control plane.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Configuration file (TOML). Every key can also come from a
    /// `BOXLITE_<KEY>` environment variable, which wins over the file.
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let config = match Config::load(args.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("boxlite-control-plane: configuration: {e:#}");
            return ExitCode::from(2);
        }
    };
    telemetry::init(config.log_format);
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("boxlite-control-plane: start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "control plane failed");
            eprintln!("boxlite-control-plane: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    let listen = config.listen;
    let public_url = config.public_url.to_string();
    let server = Server::new(config, Clock::system()).await?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("listen on {listen}"))?;
    tracing::info!(
        listen = %listener.local_addr()?,
        public_url,
        database = ?server.state().db.dialect(),
        version = env!("CARGO_PKG_VERSION"),
        "control plane serving"
    );
    server.serve(listener, server::shutdown_signal()).await
}
