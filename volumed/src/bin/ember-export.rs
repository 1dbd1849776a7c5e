//! `ember-export`: serves one file (a VM's local disk) read-only over NBD,
//! with the volume service's NBD server, so that the host a VM migrates to
//! can fill its own copy of the disk from it (`fill_from` on the VMM's
//! drive). Runs until killed.

use std::path::PathBuf;

use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "ember-export",
    version,
    about = "Serve one file read-only over NBD (a local disk for a migration's fill)"
)]
struct Args {
    /// The file (or block device) to serve.
    #[arg(long)]
    file: PathBuf,
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
    env_logger::Builder::new()
        .parse_filters(&args.log_level)
        .format_timestamp_millis()
        .init();
    if let Err(e) = ember_volumed::nbd::export_file(&args.file, &args.name, &args.listen) {
        log::error!("{}: {e}", args.file.display());
        eprintln!("ember-export: {}: {e}", args.file.display());
        std::process::exit(1);
    }
    log::info!(
        "serving {} read-only as {:?} on {}",
        args.file.display(),
        args.name,
        args.listen
    );
    loop {
        std::thread::park();
    }
}
