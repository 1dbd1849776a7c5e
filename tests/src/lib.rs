//! Shared helpers for Ember's integration tests: the guest artifacts (built
//! by the project's own scripts, cached), `ember-vmm` processes, and API
//! calls made with curl, an HTTP client Ember did not write.

pub mod artifacts;
pub mod cluster;
pub mod emberd;
pub mod migration;
pub mod nbd;
pub mod snapshots;
pub mod vmm_process;
pub mod volumed;

pub use artifacts::{kernel_path, rootfs_path, workspace_root};
pub use vmm_process::{ApiReply, VmmProcess};

/// True when /dev/kvm can be opened; KVM tests say so and skip otherwise.
pub fn kvm_available() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// True when run as root (network namespaces, jails).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Runs `ip ARGS...` (iproute2); panics unless it succeeds.
pub fn ip(args: &[&str]) {
    let st = std::process::Command::new("ip")
        .args(args)
        .status()
        .expect("ip");
    assert!(st.success(), "ip {args:?}");
}

/// Runs `f` on a thread inside the named network namespace
/// (`/run/netns/NAME`): sockets it makes are that namespace's.
pub fn in_named_netns<T: Send>(name: &str, f: impl FnOnce() -> T + Send) -> T {
    let path = format!("/run/netns/{name}");
    std::thread::scope(|s| {
        s.spawn(|| {
            let file = std::fs::File::open(&path).expect("netns");
            // SAFETY: setns on an fd we own moves only this thread.
            let rc =
                unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}");
            f()
        })
        .join()
        .expect("netns thread")
    })
}

/// Runs `script` with `/bin/sh -c` in the guest and returns its stdout;
/// panics with its output unless it exits 0.
pub fn guest_sh(agent: &mut ember_agent::AgentClient, script: &str) -> String {
    run_guest_sh(agent, script, None)
}

/// [`guest_sh`], adding the VMM's log to a failure.
pub fn guest_sh_logged(
    agent: &mut ember_agent::AgentClient,
    vmm: &VmmProcess,
    script: &str,
) -> String {
    run_guest_sh(agent, script, Some(vmm))
}

fn run_guest_sh(
    agent: &mut ember_agent::AgentClient,
    script: &str,
    vmm: Option<&VmmProcess>,
) -> String {
    let logs = || vmm.map(|v| v.logs()).unwrap_or_default();
    let r = agent
        .exec(&ember_agent::ExecRequest::new(["/bin/sh", "-c", script]))
        .unwrap_or_else(|e| panic!("exec {script:?}: {e}; {}", logs()));
    let out = String::from_utf8_lossy(&r.stdout).into_owned();
    let err = String::from_utf8_lossy(&r.stderr).into_owned();
    assert_eq!(
        r.exit_code,
        Some(0),
        "guest `{script}`: stdout {out:?} stderr {err:?}; {}",
        logs()
    );
    out
}
