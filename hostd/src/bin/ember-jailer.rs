//! `ember-jailer`: builds a jail and executes the program in it (see
//! `ember_hostd::jail`). Exit codes 200 and up name the failed step.

use clap::Parser;
use ember_hostd::jail::{setup, JailerArgs, Step};

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let args = match JailerArgs::try_parse() {
        Ok(a) => a,
        Err(e) if e.use_stderr() => {
            let _ = e.print();
            std::process::exit(Step::Validate.exit_code());
        }
        Err(e) => e.exit(),
    };
    let err = match setup(&args.into_spec()) {
        Ok(never) => match never {},
        Err(e) => e,
    };
    eprintln!("ember-jailer: {err}");
    std::process::exit(err.exit_code());
}
