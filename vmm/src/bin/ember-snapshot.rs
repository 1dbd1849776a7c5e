//! `ember-snapshot`: offline tools for snapshot files.
//!
//! `ember-snapshot merge --base MEM --diff DIFFMEM` writes a Diff
//! snapshot's memory file onto the memory file of the snapshot before it,
//! in place; the result and the Diff snapshot's state file restore the VM
//! as a Full snapshot taken at the Diff's moment would.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "ember-snapshot", version, about = "Ember snapshot file tools")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Copy every page a Diff memory file holds onto its base memory file.
    Merge {
        /// The base memory file (of a Full snapshot, or an earlier merge);
        /// changed in place.
        #[arg(long)]
        base: PathBuf,
        /// The Diff snapshot's memory file.
        #[arg(long)]
        diff: PathBuf,
    },
}

fn main() -> ExitCode {
    ember_startup::exit_code!(match Args::parse().command {
        Command::Merge { base, diff } => {
            ember_vmm::snapshot::memory::merge_diff(&base, &diff).map(|()| ExitCode::SUCCESS)
        }
    })
}
