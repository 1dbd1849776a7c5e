//! `ember-agent`: init (PID 1) and host agent of an Ember microVM.
//!
//! As PID 1 (no arguments needed; the kernel may pass some, they are
//! ignored): mounts /dev /proc /sys /tmp /run, sets up the console,
//! hostname and PATH, listens on vsock port 52, sends a hello to the host
//! on vsock 2:53 and serves forever. It never exits.
//!
//! Not as PID 1 (tests, or under another init):
//!   ember-agent --listen-unix PATH [--ready-unix PATH] [--runtime-api ADDR]
//!   ember-agent --vsock [--runtime-api ADDR]
//! `Shutdown`/`Reboot` then make the process exit with status 0.
//! `--runtime-api` is where the Lambda Runtime API listens (default
//! 127.0.0.1:9001; port 0 picks a free one).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::Arc;

use ember_agent::init::{self, fatal};
use ember_agent::runtime::RuntimeConfig;
use ember_agent::{log, Agent, PowerAction, AGENT_PORT, AGENT_VERSION, PROTOCOL_VERSION};

const USAGE: &str = "usage: ember-agent                      (as PID 1 in the guest)
       ember-agent --listen-unix PATH [--ready-unix PATH] [--runtime-api ADDR]
       ember-agent --vsock [--runtime-api ADDR]
       ember-agent --version";

fn main() {
    if std::process::id() == 1 {
        run_as_init();
    }
    let mut listen_unix: Option<PathBuf> = None;
    let mut ready_unix: Option<PathBuf> = None;
    let mut vsock = false;
    let mut runtime = RuntimeConfig::default();
    let mut args = std::env::args_os().skip(1);
    while let Some(arg) = args.next() {
        match arg.to_str() {
            Some("--listen-unix") => listen_unix = args.next().map(PathBuf::from),
            Some("--ready-unix") => ready_unix = args.next().map(PathBuf::from),
            Some("--vsock") => vsock = true,
            Some("--runtime-api") => {
                let addr = args.next();
                match addr.as_ref().and_then(|a| a.to_str()?.parse().ok()) {
                    Some(a) => runtime.api_addr = a,
                    None => {
                        eprintln!("ember-agent: --runtime-api needs IP:PORT, got {addr:?}");
                        std::process::exit(2);
                    }
                }
            }
            Some("--version") => {
                println!("ember-agent {AGENT_VERSION} (protocol {PROTOCOL_VERSION})");
                return;
            }
            Some("--help" | "-h") => {
                println!("{USAGE}");
                return;
            }
            _ => {
                eprintln!("ember-agent: unexpected argument {arg:?}\n{USAGE}");
                std::process::exit(2);
            }
        }
    }
    init::install_panic_hook();
    // Orphans of our children come to us, as they would to PID 1, so the
    // reaper is exercised the same way in tests.
    if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
        log(&format!("PR_SET_CHILD_SUBREAPER: {e}"));
    }
    let agent = Agent::with_runtime(
        Arc::new(|action: PowerAction| {
            log(&format!(
                "{action:?} requested; not PID 1, so exiting instead"
            ));
            std::process::exit(0);
        }),
        runtime,
    );
    if let Some(path) = listen_unix {
        let listener = match init::bind_unix(&path) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("ember-agent: bind {}: {e}", path.display());
                std::process::exit(1);
            }
        };
        if let Some(ready) = ready_unix {
            init::send_hello_unix(&ready);
        }
        init::serve_forever(|| listener.accept().map(|(s, _)| s), agent);
    } else if vsock {
        let listener = match init::bind_vsock() {
            Ok(l) => l,
            Err(e) => {
                eprintln!("ember-agent: vsock port {AGENT_PORT}: {e}");
                std::process::exit(1);
            }
        };
        init::send_hello_vsock();
        init::serve_forever(|| listener.accept().map(|(s, _)| s), agent);
    } else {
        eprintln!("ember-agent: not PID 1 and no --listen-unix/--vsock given\n{USAGE}");
        std::process::exit(2);
    }
}

/// PID 1: must never return or unwind out of main (the kernel would panic).
fn run_as_init() -> ! {
    init::install_panic_hook();
    let outcome = catch_unwind(AssertUnwindSafe(|| -> std::io::Error {
        init::early_setup();
        let listener = match init::bind_vsock() {
            Ok(l) => l,
            Err(e) => return e,
        };
        init::send_hello_vsock();
        log(&format!(
            "v{AGENT_VERSION} serving on vsock port {AGENT_PORT}, uptime {} ms",
            ember_agent::protocol::uptime_ms()
        ));
        let agent = Agent::new(Arc::new(|action: PowerAction| {
            let e = init::power(action);
            log(&format!("{action:?} failed: {e}"));
        }));
        init::serve_forever(|| listener.accept().map(|(s, _)| s), agent)
    }));
    match outcome {
        Ok(e) => fatal(&format!("cannot listen on vsock port {AGENT_PORT}: {e}")),
        Err(p) => fatal(&format!(
            "panic: {}",
            ember_agent::server::panic_message(p.as_ref())
        )),
    }
}
