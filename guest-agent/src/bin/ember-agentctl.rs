//! `ember-agentctl`: talks to a guest's agent through the VMM's vsock unix
//! socket (Firecracker's convention), from the host.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use ember_agent::client::{bind_ready_listener, wait_ready, AgentClient};
use ember_agent::protocol::ExecRequest;
use ember_agent::AGENT_PORT;

/// Talk to the Ember guest agent over vsock.
#[derive(Parser)]
#[command(name = "ember-agentctl", version)]
struct Args {
    /// The VMM's vsock unix socket (`uds_path` of PUT /vsock).
    #[arg(long)]
    uds: PathBuf,
    /// Seconds to wait for the guest.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Wait for the agent's ready hello (bind before the guest boots).
    WaitReady,
    /// Print the agent's health (uptime, version).
    Health,
    /// Run a command in the guest; prints its output and exits with its code.
    Exec {
        #[arg(trailing_var_arg = true, required = true)]
        argv: Vec<String>,
    },
    /// Send fresh entropy and the host clock (after a snapshot restore).
    Refresh,
    /// Reboot the guest (which ends the VMM).
    Reboot,
}

fn main() -> ExitCode {
    ember_startup::exit_code!(run(Args::parse()))
}

fn run(args: Args) -> Result<ExitCode, String> {
    let timeout = Duration::from_secs(args.timeout);
    let connect = || {
        AgentClient::connect_retry(&args.uds, AGENT_PORT, timeout, Duration::from_secs(10))
            .map_err(|e| e.to_string())
    };
    match args.cmd {
        Cmd::WaitReady => {
            let l = bind_ready_listener(&args.uds).map_err(|e| e.to_string())?;
            let h = wait_ready(&l, timeout).map_err(|e| e.to_string())?;
            println!("{}", serde_json::to_string(&h).map_err(|e| e.to_string())?);
        }
        Cmd::Health => {
            let h = connect()?.health().map_err(|e| e.to_string())?;
            println!("{}", serde_json::to_string(&h).map_err(|e| e.to_string())?);
        }
        Cmd::Exec { argv } => {
            let r = connect()?
                .exec(&ExecRequest::new(argv))
                .map_err(|e| e.to_string())?;
            let _ = std::io::stdout().write_all(&r.stdout);
            let _ = std::io::stderr().write_all(&r.stderr);
            return Ok(match (r.exit_code, r.signal) {
                (Some(c), _) => ExitCode::from(c as u8),
                (None, Some(s)) => ExitCode::from(128 + s as u8),
                _ => ExitCode::FAILURE,
            });
        }
        Cmd::Refresh => connect()?.refresh().map_err(|e| e.to_string())?,
        Cmd::Reboot => connect()?.reboot().map_err(|e| e.to_string())?,
    }
    Ok(ExitCode::SUCCESS)
}
