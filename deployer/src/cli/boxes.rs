//! `boxctl box …`: a thin client of the control plane for using what was deployed.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};
use futures::{SinkExt, StreamExt};
use protocol::{BoxState, CreateBoxRequest, ExecControl, ExecEvent, ExecStart, STDERR, STDOUT};
use tokio::io::AsyncReadExt;
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

use super::context;
use super::{Output, StageArg};
use crate::platform::client::Client;
use crate::platform::verify::wait_box;
use crate::render::ColorChoice;

/// `boxctl box` subcommands.
#[derive(Debug, Subcommand)]
pub enum BoxCommand {
    /// Create a box; prints its id alone on stdout.
    Create(CreateArgs),
    /// List boxes.
    List(ListArgs),
    /// Run a command in a box, streaming its output; exits with its exit code.
    Exec(ExecArgs),
    /// Open an interactive login shell in a box.
    Shell(ShellArgs),
    /// Delete boxes.
    Rm(RmArgs),
}

/// `box create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    #[command(flatten)]
    stage: StageArg,
    /// Image (the runner's built-in `default` when absent).
    #[arg(long)]
    image: Option<String>,
    /// CPU, thousandths of a core.
    #[arg(long, value_name = "MILLICORES")]
    cpu: Option<u64>,
    /// Memory, MiB.
    #[arg(long, value_name = "MIB")]
    memory: Option<u64>,
    /// Disk, MiB.
    #[arg(long, value_name = "MIB")]
    disk: Option<u64>,
    /// Environment variable (repeatable).
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE", value_parser = key_value)]
    env: Vec<(String, String)>,
    /// Label (repeatable).
    #[arg(long = "label", short = 'l', value_name = "KEY=VALUE", value_parser = key_value)]
    labels: Vec<(String, String)>,
    /// Network mode: `none` (loopback only) or `egress` (outbound through the
    /// runner's NAT; never the host, link-local, private ranges or other boxes).
    #[arg(long, value_name = "MODE", default_value = "none", value_parser = network_mode)]
    network: protocol::NetworkMode,
    /// A private destination (IPv4 CIDR) the egress box may reach, within the
    /// stage's allow-list (repeatable).
    #[arg(long = "egress-allow", value_name = "CIDR", value_parser = cidr)]
    egress_allow: Vec<protocol::Ipv4Cidr>,
    /// Return as soon as the box is placed, without waiting until it runs.
    #[arg(long)]
    no_wait: bool,
}

/// `box list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    stage: StageArg,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value = "text")]
    output: Output,
}

/// `box exec`.
#[derive(Debug, Args)]
pub struct ExecArgs {
    #[command(flatten)]
    stage: StageArg,
    /// Box id.
    id: Uuid,
    /// Environment variable (repeatable).
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE", value_parser = key_value)]
    env: Vec<(String, String)>,
    /// Working directory in the box ($HOME when absent).
    #[arg(long, short = 'w')]
    cwd: Option<String>,
    /// Allocate a terminal (default: when stdin and stdout are terminals).
    #[arg(long, short = 't')]
    tty: bool,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    command: Vec<String>,
}

/// `box shell`.
#[derive(Debug, Args)]
pub struct ShellArgs {
    #[command(flatten)]
    stage: StageArg,
    /// Box id.
    id: Uuid,
}

/// `box rm`.
#[derive(Debug, Args)]
pub struct RmArgs {
    #[command(flatten)]
    stage: StageArg,
    /// Box ids.
    #[arg(required = true)]
    ids: Vec<Uuid>,
}

fn network_mode(s: &str) -> Result<protocol::NetworkMode, String> {
    s.parse()
}

fn cidr(s: &str) -> Result<protocol::Ipv4Cidr, String> {
    s.parse()
}

fn key_value(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))?;
    if k.is_empty() {
        return Err(format!("{s:?} has an empty key"));
    }
    Ok((k.to_string(), v.to_string()))
}

async fn client(
    explicit: Option<&Path>,
    endpoint: Option<&str>,
    stage: &str,
    color: ColorChoice,
) -> anyhow::Result<Client> {
    let loaded = context::load(explicit, color)?;
    let stage = loaded.stack.stage(stage)?;
    context::control_plane(&loaded, stage, endpoint).await
}

/// Run a `box` subcommand.
pub async fn run(
    explicit: Option<&Path>,
    endpoint: Option<&str>,
    cmd: BoxCommand,
    color: ColorChoice,
) -> anyhow::Result<ExitCode> {
    match cmd {
        BoxCommand::Create(a) => {
            let c = client(explicit, endpoint, &a.stage.stage, color).await?;
            let req = CreateBoxRequest {
                image: a.image,
                cpu_millicores: a.cpu,
                memory_mib: a.memory,
                disk_mib: a.disk,
                env: a.env.into_iter().collect::<BTreeMap<_, _>>(),
                labels: a.labels.into_iter().collect::<BTreeMap<_, _>>(),
                network: a.network,
                egress_allow: a.egress_allow,
            };
            let b = c.create_box(&req).await?;
            if !a.no_wait {
                wait_box(&c, b.id, BoxState::Running, Duration::from_secs(120)).await?;
            }
            println!("{}", b.id);
            Ok(ExitCode::SUCCESS)
        }
        BoxCommand::List(a) => {
            let c = client(explicit, endpoint, &a.stage.stage, color).await?;
            let mut all = Vec::new();
            let mut cursor: Option<String> = None;
            loop {
                let page = c.list_boxes(cursor.as_deref(), 500).await?;
                all.extend(page.boxes);
                match page.next_cursor {
                    Some(next) => cursor = Some(next),
                    None => break,
                }
            }
            if a.output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&all)?);
                return Ok(ExitCode::SUCCESS);
            }
            println!(
                "{:<36}  {:<9}  {:<12}  {:<10}  CREATED",
                "ID", "STATE", "RUNNER", "IMAGE"
            );
            for b in &all {
                println!(
                    "{:<36}  {:<9}  {:<12}  {:<10}  {}",
                    b.id,
                    format!("{:?}", b.state).to_lowercase(),
                    b.runner.as_deref().unwrap_or("-"),
                    b.image,
                    crate::engine::lock::fmt_time(b.created_at)
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        BoxCommand::Exec(a) => {
            let c = client(explicit, endpoint, &a.stage.stage, color).await?;
            let tty = a.tty || (std::io::stdin().is_terminal() && std::io::stdout().is_terminal());
            let start = ExecStart {
                command: a.command,
                env: a.env.into_iter().collect(),
                cwd: a.cwd,
                tty,
                ..ExecStart::default()
            };
            interactive(&c, a.id, start).await
        }
        BoxCommand::Shell(a) => {
            let c = client(explicit, endpoint, &a.stage.stage, color).await?;
            if !std::io::stdin().is_terminal() {
                bail!("`box shell` needs a terminal; use `box exec` to run a command");
            }
            let start = ExecStart {
                tty: true,
                ..ExecStart::default()
            };
            interactive(&c, a.id, start).await
        }
        BoxCommand::Rm(a) => {
            let c = client(explicit, endpoint, &a.stage.stage, color).await?;
            let mut failed = 0;
            for id in a.ids {
                match c.delete_box(id).await {
                    Ok(_) => println!("{id}"),
                    Err(e) => {
                        eprintln!("error: {id}: {e}");
                        failed += 1;
                    }
                }
            }
            Ok(if failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

/// Puts the terminal in raw mode and restores it when dropped.
struct RawMode(Option<nix::sys::termios::Termios>);

impl RawMode {
    fn enable() -> RawMode {
        use nix::sys::termios::{SetArg, cfmakeraw, tcgetattr, tcsetattr};
        let stdin = std::io::stdin();
        match tcgetattr(&stdin) {
            Ok(saved) => {
                let mut raw = saved.clone();
                cfmakeraw(&mut raw);
                let _ = tcsetattr(&stdin, SetArg::TCSANOW, &raw);
                RawMode(Some(saved))
            }
            Err(_) => RawMode(None),
        }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(saved) = &self.0 {
            let _ = nix::sys::termios::tcsetattr(
                std::io::stdin(),
                nix::sys::termios::SetArg::TCSANOW,
                saved,
            );
        }
    }
}

/// Rows and columns of the terminal on stdout.
fn terminal_size() -> Option<(u16, u16)> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ fills the winsize we pass; a failure leaves it zeroed.
    let ok = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut ws) } == 0;
    (ok && ws.ws_row > 0).then_some((ws.ws_row, ws.ws_col))
}

/// Run one exec session over the WebSocket: stdin in, output out, resize on
/// SIGWINCH; the process's exit code is ours.
async fn interactive(c: &Client, id: Uuid, mut start: ExecStart) -> anyhow::Result<ExitCode> {
    if start.tty
        && let Some((rows, cols)) = terminal_size()
    {
        start.rows = Some(rows);
        start.cols = Some(cols);
    }
    let ws = c.exec_ws(id).await?;
    let (mut tx, mut rx) = ws.split();
    tx.send(Message::text(serde_json::to_string(&start)?))
        .await
        .context("starting the session")?;
    let _raw = start.tty.then(RawMode::enable);

    let (out_tx, mut out_rx) = tokio::sync::mpsc::channel::<Message>(64);
    // stdin → binary frames, then EOF.
    let stdin_tx = out_tx.clone();
    let stdin_task = tokio::spawn(async move {
        let mut stdin = tokio::io::stdin();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match stdin.read(&mut buf).await {
                Ok(0) | Err(_) => {
                    let eof =
                        serde_json::to_string(&ExecControl::StdinEof).expect("control serializes");
                    let _ = stdin_tx.send(Message::text(eof)).await;
                    return;
                }
                Ok(n) => {
                    if stdin_tx
                        .send(Message::binary(buf[..n].to_vec()))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
    });
    // Terminal size changes → resize.
    let resize_tx = out_tx.clone();
    let tty = start.tty;
    let resize_task = tokio::spawn(async move {
        if !tty {
            return;
        }
        let Ok(mut winch) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())
        else {
            return;
        };
        while winch.recv().await.is_some() {
            if let Some((rows, cols)) = terminal_size() {
                let msg = serde_json::to_string(&ExecControl::Resize { rows, cols })
                    .expect("control serializes");
                if resize_tx.send(Message::text(msg)).await.is_err() {
                    return;
                }
            }
        }
    });
    drop(out_tx);
    let sender = tokio::spawn(async move {
        while let Some(m) = out_rx.recv().await {
            if tx.send(m).await.is_err() {
                break;
            }
        }
    });

    let mut stdout = std::io::stdout();
    let mut stderr = std::io::stderr();
    let mut code: Option<i32> = None;
    while let Some(msg) = rx.next().await {
        let msg = msg.context("the session broke")?;
        // Its length only: output frames hold up to 1 MiB of the box's bytes.
        tracing::debug!(len = msg.len(), text = msg.is_text(), "exec session frame");
        match msg {
            Message::Binary(data) => {
                let (tag, bytes) = data.split_first().map_or((0, &[][..]), |(t, b)| (*t, b));
                match tag {
                    STDOUT => {
                        stdout.write_all(bytes)?;
                        stdout.flush()?;
                    }
                    STDERR => {
                        stderr.write_all(bytes)?;
                        stderr.flush()?;
                    }
                    _ => {}
                }
            }
            Message::Text(t) => match serde_json::from_str::<ExecEvent>(t.as_str()) {
                Ok(ExecEvent::Exit { code: c }) => {
                    code = Some(c);
                    break;
                }
                Ok(ExecEvent::Error { message }) => bail!("exec failed: {message}"),
                Ok(ExecEvent::Started { .. }) | Err(_) => {}
            },
            Message::Close(_) => break,
            _ => {}
        }
    }
    stdin_task.abort();
    resize_task.abort();
    sender.abort();
    drop(_raw);
    match code {
        Some(c) => Ok(ExitCode::from(u8::try_from(c.clamp(0, 255)).unwrap_or(1))),
        None => bail!("the session ended without an exit code"),
    }
}
