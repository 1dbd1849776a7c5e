//! `ember-export`: serves one file (a VM's local disk) read-only over NBD,
//! with the volume service's NBD server, so that the host a VM migrates to
//! can fill its own copy of the disk from it (`fill_from` on the VMM's
//! drive). Runs until killed.
//!
//! With `--stdin` it serves the file open on its standard input, which
//! hostd opens itself without following links (the disk's directory is
//! writable by the VMM's uid): then no path is looked up here at all.
//! `--file` refuses a link at the path's last component.

use std::os::fd::AsFd;
use std::path::PathBuf;

use clap::Parser;

/// Serve one file read-only over NBD (a local disk for a migration's fill).
#[derive(Debug, Parser)]
#[command(name = "ember-export", version)]
struct Args {
    /// The file (or block device) to serve.
    #[arg(long, required_unless_present = "stdin", conflicts_with = "stdin")]
    file: Option<PathBuf>,
    /// Serve the file open on standard input instead.
    #[arg(long)]
    stdin: bool,
    /// `unix:PATH` or `tcp:HOST:PORT`.
    #[arg(long)]
    listen: String,
    /// The export name; the default name "" is served too.
    #[arg(long, default_value = "disk")]
    name: String,
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    log_level: String,
}

fn main() {
    let args = Args::parse();
    ember_startup::init_logging(&args.log_level);
    let (what, served) = match &args.file {
        Some(f) => (
            f.display().to_string(),
            ember_volumed::nbd::export_file(f, &args.name, &args.listen),
        ),
        None => {
            // Standard input, taken over (nothing else reads it).
            let fd = std::io::stdin().as_fd().try_clone_to_owned();
            (
                "standard input".to_string(),
                fd.and_then(|fd| {
                    ember_volumed::nbd::export_open_file(fd.into(), &args.name, &args.listen)
                }),
            )
        }
    };
    if let Err(e) = served {
        ember_startup::fail!("{what}: {e}");
    }
    log::info!(
        "serving {what} read-only as {:?} on {}",
        args.name,
        args.listen
    );
    loop {
        std::thread::park();
    }
}
