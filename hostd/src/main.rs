//! `emberd`, the host daemon: keeps snapshot-based warm instances of each
//! function, restores them on invocation and reports to the cluster API.
//! It arrives with issue #4; until then this binary only says so.

fn main() {
    eprintln!("emberd: the host daemon is not implemented yet (see issue #4)");
    std::process::exit(2);
}
