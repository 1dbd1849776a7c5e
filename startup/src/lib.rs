//! The start-up Ember's binaries share, so that each one logs, reports a
//! fatal error and stops on a signal the same way:
//!
//! - [`init_logging`]: `env_logger` with a filter (`--log-level`, or
//!   `RUST_LOG` through clap's `env`) and millisecond timestamps.
//! - [`fail!`]: logs the error, prints `PROGRAM: message` on stderr and
//!   exits with 1; [`exit_with`] prints and exits with another code.
//! - [`exit_code!`]: the same report for a `main` that returns
//!   [`ExitCode`], without `exit` (destructors run, stdout is flushed).
//! - With the feature `tokio`, for the daemons on tokio: `runtime!` (the
//!   runtime, or the same report and exit) and `shutdown_signal` (SIGTERM
//!   or SIGINT).
//!
//! Nothing here starts a thread or makes a system call beyond writing to
//! stderr and exiting (`shutdown_signal` adds tokio's signal handlers), so
//! it fits jailed and seccomp-confined binaries as well.

use std::fmt::Display;

/// For [`fail!`], which logs under its caller's module.
#[doc(hidden)]
pub use log;
use std::process::ExitCode;

/// Logs through `env_logger` with `filter` (the `RUST_LOG` syntax, e.g.
/// `info` or `ember_hostd=debug,info`), timestamps in milliseconds.
pub fn init_logging(filter: &str) {
    env_logger::Builder::new()
        .parse_filters(filter)
        .format_timestamp_millis()
        .init();
}

/// Prints `program: msg` on stderr and exits with `code`.
pub fn exit_with(program: &str, code: i32, msg: impl Display) -> ! {
    eprintln!("{program}: {msg}");
    std::process::exit(code);
}

/// `result`'s exit code, or, for an error, [`ExitCode::FAILURE`] once the
/// error is printed as `program: error` on stderr.
pub fn report<E: Display>(program: &str, result: Result<ExitCode, E>) -> ExitCode {
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("{program}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Ends the binary that expands it: logs the message (`format!`'s
/// arguments; under the caller's module, as its own `log::error!` would),
/// prints it on stderr after the binary's name and exits with 1.
#[macro_export]
macro_rules! fail {
    ($($arg:tt)*) => {{
        let msg = ::std::format!($($arg)*);
        $crate::log::error!("{msg}");
        $crate::exit_with(env!("CARGO_BIN_NAME"), 1, msg)
    }};
}

/// [`report`] under the name of the binary that expands it: a
/// `Result<ExitCode, impl Display>` made the exit code of `main`.
#[macro_export]
macro_rules! exit_code {
    ($result:expr) => {
        $crate::report(env!("CARGO_BIN_NAME"), $result)
    };
}

/// tokio's multi-threaded runtime, or the end of the program (`program:
/// cannot start the async runtime: ...`, logged under `log_target`). Use
/// [`runtime!`].
#[cfg(feature = "tokio")]
pub fn runtime(program: &str, log_target: &str) -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().unwrap_or_else(|e| {
        let msg = format!("cannot start the async runtime: {e}");
        log::error!(target: log_target, "{msg}");
        exit_with(program, 1, msg)
    })
}

/// [`runtime`] for the binary that expands it.
#[cfg(feature = "tokio")]
#[macro_export]
macro_rules! runtime {
    () => {
        $crate::runtime(env!("CARGO_BIN_NAME"), module_path!())
    };
}

/// Watches SIGTERM and SIGINT from now on; the future ends at the first of
/// them. Registered at once (not at the first poll), so a signal that
/// comes before the future is awaited is not lost.
#[cfg(feature = "tokio")]
pub fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_passes_the_code_on_and_fails_on_an_error() {
        assert_eq!(
            report::<String>("t", Ok(ExitCode::from(3))),
            ExitCode::from(3)
        );
        assert_eq!(report("t", Err("broken")), ExitCode::FAILURE);
    }

    /// SIGTERM ends the future (and, watched, does not end the process).
    #[cfg(feature = "tokio")]
    #[tokio::test]
    async fn shutdown_signal_ends_at_sigterm() {
        let signal = shutdown_signal().unwrap();
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &std::process::id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
        tokio::time::timeout(std::time::Duration::from_secs(10), signal)
            .await
            .expect("the signal arrives");
    }
}
