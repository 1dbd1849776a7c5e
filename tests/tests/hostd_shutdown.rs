//! emberd ends on SIGTERM within its shutdown limit whatever it is doing,
//! and no VMM of its outlives it: during a function's first snapshot
//! build, with an invocation in flight for minutes on a VMM that does not
//! move (stopped), and with its cluster store gone. Needs /dev/kvm.

use std::time::{Duration, Instant};

use ember_store::testing::EtcdProcess;
use ember_tests::emberd::{provided_bootstrap, write_file, Emberd};
use ember_tests::kvm_available;

/// The limit given to emberd, and how long the test waits beyond it.
const LIMIT_SECS: u64 = 10;
const MARGIN: Duration = Duration::from_secs(20);

/// A runtime whose every invocation sleeps for ten minutes.
const SLEEPER: &str = r#"#!/bin/bash
API="http://${AWS_LAMBDA_RUNTIME_API}/2018-06-01/runtime"
while true; do
  curl -sS -D /tmp/headers -o /dev/null "$API/invocation/next"
  ID=$(sed -n 's/^lambda-runtime-aws-request-id: *//Ip' /tmp/headers | tr -d '[:space:]')
  sleep 600
  curl -sS -o /dev/null -d '{}' "$API/invocation/$ID/response"
done
"#;

/// Whether this process has CAP_SYS_RESOURCE (needed to lower an OOM
/// score; containers often drop it).
fn may_lower_oom_scores() -> bool {
    const CAP_SYS_RESOURCE: u32 = 24;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << CAP_SYS_RESOURCE) != 0)
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

/// SIGTERM, then: emberd exits within its limit (plus a margin), and
/// every process it had started is gone soon after.
fn terminate_and_check(d: &mut Emberd, what: &str) {
    let before = d.descendants();
    let took = d.terminate(Duration::from_secs(LIMIT_SECS) + MARGIN);
    let logs = d.logs();
    let took = took.unwrap_or_else(|| panic!("{what}: emberd still ran after SIGTERM: {logs}"));
    eprintln!(
        "{what}: emberd exited {took:?} after SIGTERM, {} processes of its own before",
        before.len()
    );
    let start = Instant::now();
    loop {
        let left: Vec<_> = before.iter().filter(|(p, _)| alive(*p)).collect();
        if left.is_empty() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{what}: outlived emberd: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn create(d: &Emberd, name: &str) {
    let code = tempfile::tempdir().unwrap();
    write_file(
        &code.path().join("bootstrap"),
        &provided_bootstrap(name),
        0o755,
    );
    d.create_function(name, "provided.al2023", "unused", code.path(), 30, &[]);
}

fn wait_for(what: &str, d: &Emberd, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(600),
            "{what}: {}",
            d.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn sigterm_ends_emberd_in_bounded_time() {
    assert!(kvm_available(), "these tests need /dev/kvm (read-write)");
    let limit = LIMIT_SECS.to_string();

    // A snapshot build in progress: its VMM is running, the build is not
    // done. emberd's OOM score: the default (-800) where this process may
    // lower scores (CAP_SYS_RESOURCE), else one raised to 300 (always
    // allowed); its VMMs and jailers start at 0 either way.
    let (oom_args, oom_expected): (&[&str], &str) = if may_lower_oom_scores() {
        (&[], "-800")
    } else {
        eprintln!("no CAP_SYS_RESOURCE here: emberd's OOM score is checked raised to 300");
        (&["--oom-score-adj", "300"], "300")
    };
    let mut args = vec!["--shutdown-timeout-secs", &limit];
    args.extend_from_slice(oom_args);
    let mut d = Emberd::start(&args);
    create(&d, "building");
    wait_for("a build VMM", &d, || {
        d.descendants().iter().any(|(_, c)| c.contains("ember-vmm"))
    });
    // The OOM killer takes a VMM long before emberd, which all die with.
    let score = |pid: i32| {
        std::fs::read_to_string(format!("/proc/{pid}/oom_score_adj"))
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    };
    assert_eq!(score(d.pid() as i32), oom_expected);
    for (pid, comm) in d.descendants() {
        if comm.contains("ember-vmm") || comm.contains("ember-jailer") {
            assert_eq!(score(pid), "0", "{comm} ({pid})");
        }
    }
    terminate_and_check(&mut d, "during a snapshot build");

    // An invocation in flight whose function sleeps for minutes, on a
    // VMM that then does not move (stopped): neither the open request nor
    // the VMM holds emberd up.
    let mut d = Emberd::start(&["--shutdown-timeout-secs", &limit, "--warm-instances", "1"]);
    let code = tempfile::tempdir().unwrap();
    write_file(&code.path().join("bootstrap"), SLEEPER, 0o755);
    d.create_function(
        "sleeper",
        "provided.al2023",
        "unused",
        code.path(),
        900,
        &[],
    );
    d.wait_active("sleeper", "$LATEST", Duration::from_secs(900));
    let socket = d.socket.clone();
    let caller = std::thread::spawn(move || {
        std::process::Command::new("curl")
            .args(["-sS", "-m", "900", "--unix-socket"])
            .arg(&socket)
            .args(["-X", "POST", "-d", "{}"])
            .arg("http://localhost/2015-03-31/functions/sleeper/invocations")
            .output()
    });
    wait_for("a busy instance", &d, || {
        d.pools()["Pools"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|p| p["Busy"].as_array().is_some_and(|b| !b.is_empty()))
    });
    let stopped = d.descendants();
    assert!(!stopped.is_empty());
    for (pid, _) in &stopped {
        // SAFETY: kill on a pid we just read; at worst it is gone.
        unsafe { libc::kill(*pid, libc::SIGSTOP) };
    }
    terminate_and_check(&mut d, "with an invocation in flight and its VMM stopped");
    let out = caller.join().unwrap().expect("curl");
    eprintln!(
        "the caller got: {} {}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );

    // The cluster store gone.
    let Some(etcd) = EtcdProcess::start() else {
        eprintln!("skipped the etcd case: etcd (etcd-server) is not installed");
        return;
    };
    let mut d = Emberd::start(&[
        "--shutdown-timeout-secs",
        &limit,
        "--no-network",
        "--cluster-etcd",
        &etcd.url,
        "--advertise",
        "http://127.0.0.1:9",
        "--host-id",
        "gone-etcd",
    ]);
    wait_for("joined", &d, || d.logs().contains("joined"));
    drop(etcd);
    terminate_and_check(&mut d, "with etcd gone");
}
