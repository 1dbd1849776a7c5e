//! emberd end to end: real microVMs (jailed when run as root), the real
//! python3 and provided root filesystems, unmodified runtime clients
//! (awslambdaric; bash + curl), driven over emberd's API with curl.
//!
//! Booting a guest is slow on nested KVM, so one emberd serves every case
//! below, run in order in one test: each function is booted and
//! snapshotted once, and every invocation runs in restored clones. A case
//! that fails is reported by name and the others still run.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::time::{Duration, Instant};

use ember_tests::emberd::{write_file, zip_dir, Emberd, Reply};
use ember_tests::kvm_available;
use serde_json::{json, Value};

const BUILD_TIMEOUT: Duration = Duration::from_secs(900);

const PY_APP: &str = r#"
import json, os, sys, time

def handler(event, context):
    print("got event", json.dumps(event))
    print("a line on stderr", file=sys.stderr)
    if event.get("fail"):
        raise ValueError("asked to fail: " + str(event["fail"]))
    if event.get("sleep"):
        time.sleep(event["sleep"])
    return {
        "echo": event,
        "request_id": context.aws_request_id,
        "function": context.function_name,
        "version": context.function_version,
        "remaining_ms": context.get_remaining_time_in_millis(),
        "greeting": os.environ.get("GREETING"),
        "uid": os.getuid(),
    }
"#;

fn bootstrap(tag: &str) -> String {
    ember_tests::emberd::provided_bootstrap(tag)
}

struct Ctx {
    d: Emberd,
    code: tempfile::TempDir,
}

impl Ctx {
    fn code_dir(&self, name: &str) -> std::path::PathBuf {
        self.code.path().join(name)
    }
}

fn payload(r: &Reply) -> Value {
    r.json()
}

/// Ids of a function's instances (idle and busy).
fn instance_ids(d: &Emberd, function: &str, which: &str) -> Vec<(String, u64)> {
    let pools = d.pools();
    pools["Pools"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["FunctionName"] == function)
        .flat_map(|p| p[which].as_array().cloned().unwrap_or_default())
        .map(|i| {
            (
                i["Id"].as_str().unwrap_or("").to_string(),
                i["Pid"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

/// Waits until `function` has a busy instance and returns its (id, pid).
fn wait_busy(d: &Emberd, function: &str) -> (String, u64) {
    let start = Instant::now();
    loop {
        if let Some(b) = instance_ids(d, function, "Busy").into_iter().next() {
            return b;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "never busy");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn bad_requests(c: &Ctx) {
    let d = &c.d;
    let r = d.request("POST", "/2015-03-31/functions", &[], Some(b"{not json"));
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(
        r.header("x-amzn-errortype"),
        Some("InvalidRequestContentException")
    );

    let zip = zip_dir(&c.code_dir("py"));
    let base = json!({"FunctionName": "ok-name", "Runtime": "python3.11", "Handler": "app.handler",
                      "Code": {"ZipFile": zip}});
    let mut bad = base.clone();
    bad["Runtime"] = json!("cobol9");
    let r = d.post_json("/2015-03-31/functions", &bad);
    assert_eq!(r.status, 400);
    assert!(r.text().contains("unsupported runtime"), "{}", r.text());

    let mut bad = base.clone();
    bad["MemorySize"] = json!(64);
    let r = d.post_json("/2015-03-31/functions", &bad);
    assert_eq!(r.status, 400);
    assert!(r.text().contains("MemorySize"), "{}", r.text());

    let mut bad = base.clone();
    bad["FunctionName"] = json!("no/slashes");
    assert_eq!(d.post_json("/2015-03-31/functions", &bad).status, 400);

    let mut bad = base.clone();
    bad["Code"] = json!({"ZipFile": "bm90IGEgemlw"}); // "not a zip"
    let r = d.post_json("/2015-03-31/functions", &bad);
    assert_eq!(r.status, 400);
    assert!(r.text().contains("zip"), "{}", r.text());

    let mut bad = base.clone();
    bad["Environment"] = json!({"Variables": {"AWS_REGION": "x"}});
    let r = d.post_json("/2015-03-31/functions", &bad);
    assert_eq!(r.status, 400);
    assert!(r.text().contains("reserved"), "{}", r.text());

    let r = d.post_json(
        "/2015-03-31/functions",
        &json!({"FunctionName": "py", "Runtime": "python3.11",
        "Handler": "app.handler", "Code": {"ZipFile": zip}}),
    );
    assert_eq!(r.status, 409, "{}", r.text());

    let r = d.invoke("nope", &json!({}));
    assert_eq!(r.status, 404);
    assert_eq!(
        r.header("x-amzn-errortype"),
        Some("ResourceNotFoundException")
    );

    let r = d.request(
        "POST",
        "/2015-03-31/functions/py/invocations",
        &[],
        Some(b"{broken"),
    );
    assert_eq!(r.status, 400, "{}", r.text());

    let r = d.request(
        "POST",
        "/2015-03-31/functions/py/invocations",
        &[("X-Amz-Invocation-Type", "Sometimes")],
        Some(b"{}"),
    );
    assert_eq!(r.status, 400, "{}", r.text());

    assert_eq!(d.get("/2015-03-31/nothing-here").status, 404);
    // Nothing of the above was created.
    let list = d.get("/2015-03-31/functions").json();
    let names: Vec<&str> = list["Functions"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|f| f["FunctionName"].as_str())
        .collect();
    assert!(!names.contains(&"ok-name"), "{names:?}");
}

fn python_invoke(c: &Ctx) {
    let r = c.d.invoke("py", &json!({"n": 1}));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-amz-function-error"), None, "{}", r.text());
    assert_eq!(r.header("x-amz-executed-version"), Some("$LATEST"));
    let p = payload(&r);
    assert_eq!(p["echo"], json!({"n": 1}));
    assert_eq!(p["function"], "py");
    assert_eq!(p["version"], "$LATEST");
    assert_eq!(p["greeting"], "hello");
    assert_eq!(p["uid"], 993, "functions run as sbx_user1051");
    assert_eq!(
        Some(p["request_id"].as_str().unwrap()),
        r.header("x-amzn-requestid")
    );
    let remaining = p["remaining_ms"].as_u64().unwrap();
    // The deadline is the host's clock; the guest's may lag it by a few ms.
    assert!(remaining > 0 && remaining <= 20_000 + 1_000, "{remaining}");
    let log = r.log_tail();
    assert!(log.contains("got event {\"n\": 1}"), "{log}");
    assert!(log.contains("a line on stderr"), "{log}");
    assert!(log.contains("REPORT RequestId:"), "{log}");
    // The instance is reused for the next invocation.
    let before = instance_ids(&c.d, "py", "Idle");
    let r = c.d.invoke("py", &json!({"n": 2}));
    assert_eq!(payload(&r)["echo"], json!({"n": 2}));
    let after = instance_ids(&c.d, "py", "Idle");
    assert!(!before.is_empty());
    assert!(
        after.iter().any(|i| before.contains(i)),
        "{before:?} {after:?}"
    );
    // The function's log keeps every invocation.
    let logs = c.d.get("/ember/v1/functions/py/logs").text();
    assert!(logs.contains("got event {\"n\": 2}"), "{logs}");
}

fn python_function_error(c: &Ctx) {
    let r = c.d.invoke("py", &json!({"fail": "on purpose"}));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-amz-function-error"), Some("Unhandled"));
    let p = payload(&r);
    assert_eq!(p["errorType"], "ValueError");
    assert_eq!(p["errorMessage"], "asked to fail: on purpose");
    assert!(r.log_tail().contains("ValueError"), "{}", r.log_tail());
    // A function error does not break the instance.
    let r = c.d.invoke("py", &json!({"n": 3}));
    assert_eq!(payload(&r)["echo"], json!({"n": 3}));
}

/// The `ember` CLI over the same daemon.
fn cli(c: &Ctx) {
    let ember = |args: &[&str]| {
        std::process::Command::new(ember_tests::artifacts::workspace_bin("ember"))
            .arg("--socket")
            .arg(&c.d.socket)
            .args(args)
            .output()
            .expect("ember")
    };
    let out = ember(&["invoke", "py", "--payload", r#"{"cli": true}"#]);
    assert!(out.status.success(), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).expect("payload JSON");
    assert_eq!(v["echo"], json!({"cli": true}));

    let out = ember(&["invoke", "py", "--payload", r#"{"fail": "cli"}"#]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a function error exits 1: {out:?}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("ValueError"),
        "log tail on stderr: {stderr}"
    );

    let out = ember(&["get", "py"]);
    assert!(out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["Configuration"]["Handler"], "app.handler");

    let out = ember(&["invoke", "missing"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("ResourceNotFoundException"));

    let out = ember(&["invoke", "py", "--async", "--payload", "{}"]);
    assert!(out.status.success());
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let out = ember(&["async", &id]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains(&id));
}

fn provided_invoke(c: &Ctx) {
    let r = c.d.invoke("sh", &json!({"hello": "bash"}));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-amz-function-error"), None, "{}", r.text());
    let p = payload(&r);
    assert_eq!(p["tag"], "v1");
    assert_eq!(p["version"], "$LATEST");
    assert_eq!(p["event"], json!({"hello": "bash"}));
    assert!(r.log_tail().contains("handling "), "{}", r.log_tail());

    let r = c.d.invoke("sh", &json!({"please": "fail"}));
    assert_eq!(r.header("x-amz-function-error"), Some("Unhandled"));
    assert_eq!(payload(&r)["errorType"], "Custom.Failure");
}

fn concurrent_invocations(c: &Ctx) {
    let threads: Vec<_> = (0..4)
        .map(|i| {
            let socket = c.d.socket.clone();
            std::thread::spawn(move || {
                let out = std::process::Command::new("curl")
                    .args(["-sS", "--max-time", "300", "--unix-socket"])
                    .arg(&socket)
                    .args(["-d", &format!("{{\"sleep\": 3, \"i\": {i}}}")])
                    .arg("http://localhost/2015-03-31/functions/py/invocations")
                    .output()
                    .expect("curl");
                String::from_utf8_lossy(&out.stdout).into_owned()
            })
        })
        .collect();
    let mut seen_busy = 0;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        seen_busy = seen_busy.max(instance_ids(&c.d, "py", "Busy").len());
        std::thread::sleep(Duration::from_millis(100));
    }
    let outs: Vec<String> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    for (i, o) in outs.iter().enumerate() {
        let v: Value = serde_json::from_str(o).unwrap_or_else(|e| panic!("{e}: {o}"));
        assert_eq!(v["echo"]["i"], i, "{o}");
    }
    assert!(seen_busy >= 2, "only {seen_busy} instances ran at once");
    let total = instance_ids(&c.d, "py", "Idle").len();
    assert!(total >= 2, "clones went back to the pool: {total}");
}

/// After the burst, idle clones beyond the warm count (1) are reclaimed
/// once idle past the TTL (15 s); the warm one stays.
fn idle_instances_reclaimed(c: &Ctx) {
    let start = Instant::now();
    loop {
        let idle = instance_ids(&c.d, "py", "Idle").len();
        if idle == 1 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "still {idle} idle instances"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // The warm instance is kept well past the TTL.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(instance_ids(&c.d, "py", "Idle").len(), 1);
}

fn throttling(c: &Ctx) {
    let r = c.d.request(
        "PUT",
        "/2017-10-31/functions/py/concurrency",
        &[],
        Some(br#"{"ReservedConcurrentExecutions": 1}"#),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let socket = c.d.socket.clone();
    let slow = std::thread::spawn(move || {
        std::process::Command::new("curl")
            .args(["-sS", "--unix-socket"])
            .arg(&socket)
            .args(["-d", r#"{"sleep": 4}"#])
            .arg("http://localhost/2015-03-31/functions/py/invocations")
            .output()
            .expect("curl")
    });
    wait_busy(&c.d, "py");
    let r = c.d.invoke("py", &json!({"n": 4}));
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(
        r.header("x-amzn-errortype"),
        Some("TooManyRequestsException")
    );
    assert!(String::from_utf8_lossy(&slow.join().unwrap().stdout).contains("echo"));
    let r =
        c.d.request("DELETE", "/2017-10-31/functions/py/concurrency", &[], None);
    assert_eq!(r.status, 204, "{}", r.text());
}

fn timeouts(c: &Ctx) {
    let socket = c.d.socket.clone();
    let t = std::thread::spawn(move || {
        let d = std::process::Command::new("curl")
            .args(["-sS", "-D", "-", "--unix-socket"])
            .arg(&socket)
            .args(["-d", r#"{"sleep": 30}"#])
            .arg("http://localhost/2015-03-31/functions/py/invocations")
            .output()
            .expect("curl");
        String::from_utf8_lossy(&d.stdout).into_owned()
    });
    let (id, pid) = wait_busy(&c.d, "py");
    let out = t.join().unwrap();
    assert!(
        out.contains("X-Amz-Function-Error: Unhandled")
            || out.contains("x-amz-function-error: Unhandled"),
        "{out}"
    );
    assert!(out.contains("Task timed out after 20.00 seconds"), "{out}");
    // Destroyed, never reused.
    std::thread::sleep(Duration::from_secs(1));
    let all: Vec<String> = ["Idle", "Busy"]
        .iter()
        .flat_map(|w| instance_ids(&c.d, "py", w))
        .map(|(i, _)| i)
        .collect();
    assert!(
        !all.contains(&id),
        "timed-out instance {id} is still pooled"
    );
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|s| s.contains(") Z"))
                .unwrap_or(true),
        "VMM {pid} still runs"
    );
}

fn vmm_killed_mid_invocation(c: &Ctx) {
    let socket = c.d.socket.clone();
    let t = std::thread::spawn(move || {
        let d = std::process::Command::new("curl")
            .args(["-sS", "--unix-socket"])
            .arg(&socket)
            .args(["-d", r#"{"sleep": 6}"#])
            .arg("http://localhost/2015-03-31/functions/py/invocations")
            .output()
            .expect("curl");
        String::from_utf8_lossy(&d.stdout).into_owned()
    });
    let (_, pid) = wait_busy(&c.d, "py");
    assert!(pid > 0);
    let st = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let out = t.join().unwrap();
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(v["errorType"], "Runtime.ExitError", "{out}");
    // The pool replaces it: the next invocation works.
    let r = c.d.invoke("py", &json!({"n": 5}));
    assert_eq!(payload(&r)["echo"], json!({"n": 5}), "{}", r.text());
}

fn async_invocations(c: &Ctx) {
    let send = |body: &Value| {
        let r = c.d.request(
            "POST",
            "/2015-03-31/functions/py/invocations",
            &[("X-Amz-Invocation-Type", "Event")],
            Some(body.to_string().as_bytes()),
        );
        assert_eq!(r.status, 202, "{}", r.text());
        r.header("x-amzn-requestid").unwrap().to_string()
    };
    let ok = send(&json!({"n": 6}));
    let bad = send(&json!({"fail": "async"}));
    let wait_done = |id: &str| {
        let start = Instant::now();
        loop {
            let v = c.d.get(&format!("/ember/v1/async-invocations/{id}")).json();
            if v["Status"] == "Succeeded" || v["Status"] == "Failed" {
                return v;
            }
            assert!(start.elapsed() < Duration::from_secs(120), "{v}");
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let v = wait_done(&ok);
    assert_eq!(v["Status"], "Succeeded", "{v}");
    assert_eq!(v["Attempts"].as_array().unwrap().len(), 1);
    assert!(v["Result"].as_str().unwrap().contains("\"n\": 6"), "{v}");
    let v = wait_done(&bad);
    assert_eq!(v["Status"], "Failed", "{v}");
    let attempts = v["Attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 3, "one try and two retries: {v}");
    assert!(
        attempts.iter().all(|a| a["ErrorType"] == "ValueError"),
        "{v}"
    );
    assert_eq!(c.d.get("/ember/v1/async-invocations/not-an-id").status, 404);
}

fn versions_aliases_and_updates(c: &Ctx) {
    let d = &c.d;
    let r = d.post_json("/2015-03-31/functions/sh/versions", &json!({}));
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.json()["Version"], "1");
    d.wait_active("sh", "1", BUILD_TIMEOUT);
    let r = d.post_json(
        "/2015-03-31/functions/sh/aliases",
        &json!({"Name": "live", "FunctionVersion": "1"}),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let r = d.post_json(
        "/2015-03-31/functions/sh/aliases",
        &json!({"Name": "dead", "FunctionVersion": "7"}),
    );
    assert_eq!(r.status, 404, "{}", r.text());

    // New code on $LATEST; version 1 (and the alias) keep the old code.
    write_file(&c.code_dir("sh").join("bootstrap"), &bootstrap("v2"), 0o755);
    let zip = zip_dir(&c.code_dir("sh"));
    let r = d.request(
        "PUT",
        "/2015-03-31/functions/sh/code",
        &[],
        Some(json!({"ZipFile": zip}).to_string().as_bytes()),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["LastUpdateStatus"], "InProgress");
    // A second update while one is in progress is refused.
    let r = d.request(
        "PUT",
        "/2015-03-31/functions/sh/configuration",
        &[],
        Some(br#"{"Timeout": 30}"#),
    );
    assert_eq!(r.status, 409, "{}", r.text());
    d.wait_active("sh", "$LATEST", BUILD_TIMEOUT);

    let latest = payload(&d.invoke("sh", &json!({"q": "latest"})));
    assert_eq!(latest["tag"], "v2", "{latest}");
    let r = d.invoke("sh:live", &json!({"q": "alias"}));
    assert_eq!(r.header("x-amz-executed-version"), Some("1"));
    let p = payload(&r);
    assert_eq!(p["tag"], "v1", "{p}");
    assert_eq!(p["version"], "1", "{p}");
    let r = d.request(
        "POST",
        "/2015-03-31/functions/sh/invocations?Qualifier=1",
        &[],
        Some(b"{}"),
    );
    assert_eq!(payload(&r)["tag"], "v1");
    let versions = d.get("/2015-03-31/functions/sh/versions").json();
    assert_eq!(
        versions["Versions"].as_array().unwrap().len(),
        2,
        "{versions}"
    );
    // A version an alias points at cannot be deleted.
    let r = d.request("DELETE", "/2015-03-31/functions/sh?Qualifier=1", &[], None);
    assert_eq!(r.status, 409, "{}", r.text());
}

fn restart_keeps_state(c: &mut Ctx) {
    let async_before = c.d.get("/ember/v1/async-invocations").json();
    c.d.restart();
    let list = c.d.get("/2015-03-31/functions").json();
    let mut names: Vec<&str> = list["Functions"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|f| f["FunctionName"].as_str())
        .collect();
    names.sort();
    assert_eq!(names, ["py", "sh"]);
    let alias = c.d.get("/2015-03-31/functions/sh/aliases/live").json();
    assert_eq!(alias["FunctionVersion"], "1");
    let cfg = c.d.get("/2015-03-31/functions/py/configuration").json();
    assert_eq!(cfg["State"], "Active", "{cfg}");
    assert_eq!(cfg["Environment"]["Variables"]["GREETING"], "hello");
    let r = c.d.invoke("py", &json!({"after": "restart"}));
    assert_eq!(
        payload(&r)["echo"],
        json!({"after": "restart"}),
        "{}",
        r.text()
    );
    let r = c.d.invoke("sh:live", &json!({}));
    assert_eq!(payload(&r)["tag"], "v1", "{}", r.text());
    let async_after = c.d.get("/ember/v1/async-invocations").json();
    assert_eq!(async_before, async_after);
}

/// Working sets: a clone's first answer saved its snapshot's working set
/// beside the snapshot, and the clones restored since the restart read it
/// in before their guest ran (their VMM logs say so).
fn working_sets(c: &mut Ctx) {
    let snaps = c.d.dir.join("state/snapshots");
    let deadline = Instant::now() + Duration::from_secs(60);
    let saved = loop {
        let found = std::fs::read_dir(&snaps)
            .into_iter()
            .flatten()
            .flatten()
            .flat_map(|f| std::fs::read_dir(f.path()).into_iter().flatten().flatten())
            .map(|v| v.path().join("working-set"))
            .find(|p| p.is_file());
        if let Some(p) = found {
            break p;
        }
        assert!(
            Instant::now() < deadline,
            "no working set under {}",
            snaps.display()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    let bytes = std::fs::read(&saved).unwrap();
    assert!(bytes.starts_with(b"EMBERSNP"), "{}", saved.display());
    let logs = c.d.dir.join("run/logs");
    let prefetched = std::fs::read_dir(&logs)
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .find(|t| t.contains("prefetched"));
    assert!(
        prefetched.is_some(),
        "no VMM log under {} says it prefetched a working set",
        logs.display()
    );
}

fn delete_function(c: &Ctx) {
    let r = c.d.request("DELETE", "/2015-03-31/functions/py", &[], None);
    assert_eq!(r.status, 204, "{}", r.text());
    assert_eq!(c.d.get("/2015-03-31/functions/py").status, 404);
    assert_eq!(c.d.invoke("py", &json!({})).status, 404);
    // Its instances go away.
    std::thread::sleep(Duration::from_secs(1));
    assert!(instance_ids(&c.d, "py", "Idle").is_empty());
}

#[test]
fn functions_on_warm_microvms() {
    if !kvm_available() {
        eprintln!("SKIPPED: /dev/kvm is not available");
        return;
    }
    let code = tempfile::tempdir().unwrap();
    write_file(&code.path().join("py/app.py"), PY_APP, 0o644);
    write_file(&code.path().join("sh/bootstrap"), &bootstrap("v1"), 0o755);
    let d = Emberd::start(&[
        "--async-retry-delay-ms",
        "200",
        "--warm-instances",
        "1",
        "--idle-ttl-secs",
        "15",
    ]);
    let mut c = Ctx { d, code };
    let t = Instant::now();
    c.d.create_function(
        "py",
        "python3.11",
        "app.handler",
        &c.code_dir("py"),
        // Room for four clones restored at once on a loaded 2-core machine.
        20,
        &[("GREETING", "hello")],
    );
    c.d.create_function(
        "sh",
        "provided.al2023",
        "unused",
        &c.code_dir("sh"),
        60,
        &[],
    );

    let mut failures = Vec::new();
    let mut run = |name: &str, c: &mut Ctx, f: &dyn Fn(&mut Ctx)| {
        let t = Instant::now();
        match catch_unwind(AssertUnwindSafe(|| f(c))) {
            Ok(()) => eprintln!("case {name}: ok ({:.1} s)", t.elapsed().as_secs_f64()),
            Err(e) => {
                let msg = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                eprintln!("case {name}: FAILED: {msg}");
                failures.push(name.to_string());
            }
        }
    };
    run("bad_requests", &mut c, &|c| bad_requests(c));
    c.d.wait_active("py", "$LATEST", BUILD_TIMEOUT);
    c.d.wait_active("sh", "$LATEST", BUILD_TIMEOUT);
    eprintln!(
        "both functions snapshotted after {:.1} s",
        t.elapsed().as_secs_f64()
    );
    run("python_invoke", &mut c, &|c| python_invoke(c));
    run("python_function_error", &mut c, &|c| {
        python_function_error(c)
    });
    run("cli", &mut c, &|c| cli(c));
    run("provided_invoke", &mut c, &|c| provided_invoke(c));
    run("concurrent_invocations", &mut c, &|c| {
        concurrent_invocations(c)
    });
    run("idle_instances_reclaimed", &mut c, &|c| {
        idle_instances_reclaimed(c)
    });
    run("throttling", &mut c, &|c| throttling(c));
    run("timeouts", &mut c, &|c| timeouts(c));
    run("vmm_killed_mid_invocation", &mut c, &|c| {
        vmm_killed_mid_invocation(c)
    });
    run("async_invocations", &mut c, &|c| async_invocations(c));
    run("versions_aliases_and_updates", &mut c, &|c| {
        versions_aliases_and_updates(c)
    });
    run("restart_keeps_state", &mut c, &|c| restart_keeps_state(c));
    run("working_sets", &mut c, &|c| working_sets(c));
    run("delete_function", &mut c, &|c| delete_function(c));
    assert!(
        failures.is_empty(),
        "failed cases: {failures:?}; emberd log:\n{}",
        c.d.logs()
    );
}
