//! `ember-vmm`: runs one microVM, configured through the API socket or a
//! JSON config file.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use ember_vmm::controller::Controller;
use ember_vmm::devices::legacy::serial::SerialOut;
use ember_vmm::event_loop::{self, ApiReceiver};
use ember_vmm::vmm_config::VmResources;
use ember_vmm::vstate::vcpu::VmExitNotifier;

#[derive(Parser, Debug)]
#[command(name = "ember-vmm", version, about = "Ember's microVM monitor")]
struct Args {
    /// Unix socket for the HTTP/JSON API.
    #[arg(long)]
    api_sock: Option<PathBuf>,
    /// Start a microVM from this JSON file (Firecracker's format) at once.
    #[arg(long)]
    config_file: Option<PathBuf>,
    /// Instance id reported by `GET /`.
    #[arg(long, default_value = "anonymous-instance")]
    id: String,
    /// Write the guest's serial console here instead of stdout.
    #[arg(long)]
    serial_out: Option<PathBuf>,
    /// Run without seccomp filters (debugging only).
    #[arg(long)]
    no_seccomp: bool,
    /// Let the VMM's threads open AF_INET and AF_INET6 sockets (migration
    /// to `tcp://` addresses, `nbd://` drives). Off by default: hostd hands
    /// a jailed VMM unix sockets only.
    #[arg(long)]
    allow_inet: bool,
    /// Install the filters of KIND (vmm, api, vcpu), make CALL (a name in
    /// ember_vmm::seccomp's FORBIDDEN or PERMITTED tables) and exit: the
    /// filters' own test.
    #[arg(long, hide = true, value_name = "KIND:CALL")]
    seccomp_self_test: Option<String>,
    /// Log level (error, warn, info, debug, trace); RUST_LOG overrides.
    #[arg(long, default_value = "info")]
    log_level: String,
}

fn main() -> ExitCode {
    let args = Args::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(&args.log_level))
        .format(|buf, rec| {
            let line = serde_json::json!({
                "ts": buf.timestamp_micros().to_string(),
                "level": rec.level().as_str(),
                "target": rec.target(),
                "thread": std::thread::current().name().unwrap_or("?"),
                "msg": rec.args().to_string(),
            });
            writeln!(buf, "{line}")
        })
        .init();
    match run(args) {
        Ok(code) => ExitCode::from(code as u8),
        Err(e) => {
            log::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<i32, String> {
    ember_vmm::seccomp::allow_inet(args.allow_inet);
    if let Some(spec) = &args.seccomp_self_test {
        println!("{}", ember_vmm::seccomp::self_test(spec)?);
        return Ok(0);
    }
    if args.api_sock.is_none() && args.config_file.is_none() {
        return Err("give --api-sock, --config-file, or both".into());
    }
    let resources = match &args.config_file {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .map_err(|e| format!("cannot read config file {}: {e}", p.display()))?;
            serde_json::from_str::<VmResources>(&text)
                .map_err(|e| format!("invalid config file {}: {e}", p.display()))?
        }
        None => VmResources::default(),
    };
    ember_vmm::seccomp::enable(!args.no_seccomp);

    let serial_path = args.serial_out.clone();
    let serial_out = Box::new(move || -> std::io::Result<SerialOut> {
        Ok(match &serial_path {
            Some(p) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)?,
            ),
            None => Box::new(std::io::stdout()),
        })
    });
    let exit = VmExitNotifier::new().map_err(|e| format!("eventfd: {e}"))?;
    let controller = Controller::new(args.id.clone(), resources, exit.clone(), serial_out);

    let api: Option<ApiReceiver> = match &args.api_sock {
        Some(path) => Some(ember_vmm::api::start_api_thread(path)?),
        None => None,
    };
    ember_vmm::seccomp::apply_for_current_thread(ember_vmm::seccomp::ThreadKind::Vmm);
    event_loop::run(controller, exit, api, args.config_file.is_some())
}
