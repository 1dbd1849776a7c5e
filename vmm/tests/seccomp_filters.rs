//! The seccomp filters in the real `ember-vmm` binary: every call in
//! `seccomp::FORBIDDEN` is made on each kind of thread it is forbidden on,
//! under that thread's real filters (`--seccomp-self-test`), and must end
//! the process with exit code 148 and the syscall logged; the calls in
//! `seccomp::PERMITTED` must go through. (The `UffdHandler` kind is
//! `ember-uffd-handler`'s, tried in that binary by `tests/uffd.rs`.)

use std::process::Command;

use ember_vmm::seccomp::{ThreadKind, FORBIDDEN, PERMITTED, SECCOMP_VIOLATION_EXIT};

fn self_test(kind: ThreadKind, call: &str, extra: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ember-vmm"))
        .arg("--seccomp-self-test")
        .arg(format!("{}:{call}", kind.name()))
        .args(extra)
        .output()
        .expect("run ember-vmm")
}

/// The kinds of the VMM's own threads among `kinds`.
fn vmm_kinds(kinds: &[ThreadKind]) -> impl Iterator<Item = &ThreadKind> {
    kinds.iter().filter(|k| **k != ThreadKind::UffdHandler)
}

#[test]
fn every_forbidden_call_is_killed_on_every_thread_kind() {
    let mut rows = Vec::new();
    let mut allowed = 0;
    for a in FORBIDDEN {
        for kind in vmm_kinds(a.kinds) {
            let out = self_test(*kind, a.name, &[]);
            let stderr = String::from_utf8_lossy(&out.stderr);
            let killed = out.status.code() == Some(SECCOMP_VIOLATION_EXIT)
                && stderr.contains(&format!("syscall {} blocked", a.nr));
            if !killed {
                allowed += 1;
                eprintln!(
                    "NOT KILLED: {} on {kind:?}: {:?}\n{}\n{stderr}",
                    a.name,
                    out.status,
                    String::from_utf8_lossy(&out.stdout)
                );
            }
            rows.push(format!(
                "{:<6} {:<28} {}",
                kind.name(),
                a.name,
                if killed { "killed (148)" } else { "ALLOWED" }
            ));
        }
    }
    eprintln!("{}", rows.join("\n"));
    eprintln!("{} attempts, {allowed} allowed", rows.len());
    assert!(rows.len() > 100, "{}", rows.len());
    assert_eq!(allowed, 0);
}

#[test]
fn permitted_calls_pass_and_clone3_says_enosys() {
    for a in PERMITTED {
        for kind in vmm_kinds(a.kinds) {
            let out = self_test(*kind, a.name, &[]);
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert_eq!(
                out.status.code(),
                Some(0),
                "{} on {kind:?}: {stdout}{}",
                a.name,
                String::from_utf8_lossy(&out.stderr)
            );
            if a.name == "clone3" {
                assert!(
                    stdout.contains(&format!("returned -1 (errno {})", libc::ENOSYS)),
                    "{stdout}"
                );
            } else {
                assert!(
                    !stdout.contains("returned -1"),
                    "{} on {kind:?}: {stdout}",
                    a.name
                );
            }
        }
    }
}

#[test]
fn allow_inet_opens_inet_sockets_on_the_vmm_thread_only() {
    let out = self_test(ThreadKind::Vmm, "socket(AF_INET)", &["--allow-inet"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    for kind in [ThreadKind::Api, ThreadKind::Vcpu] {
        let out = self_test(kind, "socket(AF_INET)", &["--allow-inet"]);
        assert_eq!(
            out.status.code(),
            Some(SECCOMP_VIOLATION_EXIT),
            "{kind:?}: {out:?}"
        );
    }
    // Netlink and packet sockets stay closed.
    let out = self_test(ThreadKind::Vmm, "socket(AF_NETLINK)", &["--allow-inet"]);
    assert_eq!(out.status.code(), Some(SECCOMP_VIOLATION_EXIT), "{out:?}");
}
