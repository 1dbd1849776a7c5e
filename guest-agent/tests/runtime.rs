//! The Lambda Runtime API end to end: the real `ember-agent` in
//! `--listen-unix` mode runs a `/bin/sh` + curl bootstrap (as in AWS's
//! custom-runtime tutorial) and the test plays the host.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use ember_agent::{
    AgentClient, ClientError, InvokeRequest, InvokeStatus, Request, Response, RuntimeSpec,
};

const T: Duration = Duration::from_secs(30);

/// The tutorial's loop, plus behaviours chosen by the event: `fail`
/// posts an error, `exit` ends the runtime, `big` posts a body over 6 MB,
/// `wrongid` first posts to an unknown id; anything else is echoed.
/// With `AWS_LAMBDA_INITIALIZATION_TYPE=snap-start` it first waits on
/// `restore/next` and writes the file `restored` (status, body size, time)
/// when that returns; `RESTORE_MODE=fail` then posts `restore/error`.
const BOOTSTRAP: &str = r#"#!/bin/sh
set -eu
echo "init: ${GREETING:-none} from $(pwd)"
[ "${INIT_MODE:-}" = fail ] && {
  curl -sS -X POST -H 'Lambda-Runtime-Function-Error-Type: Runtime.Custom' \
    -d '{"errorMessage":"bad config","errorType":"Other"}' \
    "http://$AWS_LAMBDA_RUNTIME_API/2018-06-01/runtime/init/error"
  exit 1
}
[ "${INIT_MODE:-}" = hang ] && sleep 600
[ "${INIT_MODE:-}" = exit ] && { echo "dying in init" >&2; exit 2; }
API="http://$AWS_LAMBDA_RUNTIME_API/2018-06-01/runtime"
if [ "${AWS_LAMBDA_INITIALIZATION_TYPE:-}" = snap-start ]; then
  # SnapStart, as AWS's runtime clients do it: before-snapshot hooks,
  # wait for the restore, after-restore hooks (or report their failure).
  echo "before snapshot"
  CODE=$(curl -sS -o restore_body -w '%{http_code}' "$API/restore/next")
  echo "$CODE $(wc -c < restore_body) $(date +%s%N)" > restored.tmp
  mv restored.tmp restored
  echo "after restore: $CODE"
  [ "${RESTORE_MODE:-}" = fail ] && {
    sleep 0.3
    CODE=$(curl -sS -o /dev/null -w '%{http_code}' -X POST \
      -H 'Lambda-Runtime-Function-Error-Type: Runtime.AfterRestoreError' \
      -d '{"errorMessage":"hook failed","errorType":"HookError"}' "$API/restore/error")
    echo "restore/error: $CODE"
    exit 65
  }
fi
while true; do
  curl -sS -D headers -o event "$API/invocation/next"
  ID=$(grep -i '^Lambda-Runtime-Aws-Request-Id:' headers | cut -d' ' -f2 | tr -d '\r')
  ARN=$(grep -i '^Lambda-Runtime-Invoked-Function-Arn:' headers | cut -d' ' -f2 | tr -d '\r')
  EVENT=$(cat event)
  echo "stdout: got $ID for $ARN"
  echo "stderr: event $EVENT" >&2
  case "$EVENT" in
  fail)
    curl -sS -o /dev/null -X POST -H 'Lambda-Runtime-Function-Error-Type: Function.Oops' \
      -d '{"errorMessage":"it failed","errorType":"MyError"}' "$API/invocation/$ID/error" ;;
  exit) echo "exiting now" >&2; exit 3 ;;
  big)
    head -c 7000000 /dev/zero | tr '\0' a > big
    CODE=$(curl -sS -o /dev/null -w '%{http_code}' -X POST --data-binary @big "$API/invocation/$ID/response")
    echo "big post: $CODE" ;;
  wrongid)
    CODE=$(curl -sS -o /dev/null -w '%{http_code}' -X POST -d x "$API/invocation/not-$ID/response")
    curl -sS -o /dev/null -X POST -d "wrong id got $CODE" "$API/invocation/$ID/response" ;;
  *)
    curl -sS -o /dev/null -X POST --data-binary "echo:$EVENT" "$API/invocation/$ID/response" ;;
  esac
done
"#;

struct Agent {
    child: Child,
    dir: tempfile::TempDir,
    sock: PathBuf,
}

impl Agent {
    fn start() -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("agent.sock");
        let child = Command::new(env!("CARGO_BIN_EXE_ember-agent"))
            .arg("--listen-unix")
            .arg(&sock)
            .args(["--runtime-api", "127.0.0.1:0"])
            .spawn()
            .unwrap();
        let start = Instant::now();
        while !sock.exists() {
            assert!(start.elapsed() < T, "agent did not listen");
            std::thread::sleep(Duration::from_millis(10));
        }
        let boot = dir.path().join("bootstrap");
        std::fs::write(&boot, BOOTSTRAP).unwrap();
        std::fs::set_permissions(&boot, std::fs::Permissions::from_mode(0o755)).unwrap();
        Agent { child, dir, sock }
    }

    fn client(&self) -> AgentClient {
        // The socket's file appears at bind(), a moment before listen():
        // a refusal in between is retried.
        let start = Instant::now();
        let stream = loop {
            match UnixStream::connect(&self.sock) {
                Ok(s) => break s,
                Err(_) if start.elapsed() < T => std::thread::sleep(Duration::from_millis(10)),
                Err(e) => panic!("connecting to the agent: {e}"),
            }
        };
        AgentClient::from_stream(stream, Some(T)).unwrap()
    }

    fn spec(&self, env: &[(&str, &str)]) -> RuntimeSpec {
        let root: &Path = self.dir.path();
        RuntimeSpec {
            argv: vec![root.join("bootstrap").to_string_lossy().into_owned()],
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
            code_device: None,
            task_root: root.to_string_lossy().into_owned(),
            uid: None,
            gid: None,
            init_timeout_ms: Some(20_000),
            network: None,
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn event(id: &str, payload: &str) -> InvokeRequest {
    InvokeRequest {
        request_id: id.into(),
        payload: payload.as_bytes().to_vec(),
        deadline_ms: 4_102_444_800_000,
        invoked_function_arn: "arn:aws:lambda:us-east-1:1:function:f".into(),
        trace_id: Some("Root=1-abc".into()),
        client_context: None,
        cognito_identity: None,
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn agent_error<T: std::fmt::Debug>(r: Result<T, ClientError>) -> String {
    match r {
        Err(ClientError::Agent(m)) => m,
        other => panic!("expected an agent error, got {other:?}"),
    }
}

#[test]
fn curl_runtime_serves_invocations() {
    let agent = Agent::start();
    let mut c = agent.client();
    // Before StartRuntime there is nothing to invoke.
    assert!(agent_error(c.invoke(&event("early", "x"))).contains("StartRuntime"));

    let ready = c
        .start_runtime(&agent.spec(&[("GREETING", "hello")]))
        .unwrap()
        .expect("runtime ready");
    let init_log = text(&ready.log);
    assert!(init_log.contains("init: hello from"), "{init_log}");
    assert!(agent_error(c.start_runtime(&agent.spec(&[]))).contains("already"));

    for i in 0..3 {
        let id = format!("ok-{i}");
        let r = c.invoke(&event(&id, &format!("payload {i}"))).unwrap();
        assert_eq!(r.status, InvokeStatus::Success);
        assert_eq!(text(&r.payload), format!("echo:payload {i}"));
        let log = text(&r.log);
        // Both streams, in order, only this invocation's.
        assert!(
            log.starts_with(&format!(
                "stdout: got {id} for arn:aws:lambda:us-east-1:1:function:f\nstderr: event payload {i}\n"
            )),
            "{log}"
        );
        assert!(!log.contains("init:"), "{log}");
    }

    let r = c.invoke(&event("f1", "fail")).unwrap();
    assert_eq!(r.status, InvokeStatus::FunctionError);
    assert_eq!(r.error_type.as_deref(), Some("Function.Oops"));
    assert_eq!(
        text(&r.payload),
        r#"{"errorMessage":"it failed","errorType":"MyError"}"#
    );

    let r = c.invoke(&event("w1", "wrongid")).unwrap();
    assert_eq!(text(&r.payload), "wrong id got 400");

    let r = c.invoke(&event("b1", "big")).unwrap();
    assert_eq!(r.status, InvokeStatus::FunctionError);
    assert_eq!(
        r.error_type.as_deref(),
        Some("Function.ResponseSizeTooLarge")
    );
    // The runtime carries on after its 413.
    let r = c.invoke(&event("after-big", "still here")).unwrap();
    assert_eq!(text(&r.payload), "echo:still here");
    assert!(text(&r.log).contains("big post: 413"), "{}", text(&r.log));

    let r = c.invoke(&event("x1", "exit")).unwrap();
    assert_eq!(r.status, InvokeStatus::RuntimeExited);
    assert_eq!(r.error_type.as_deref(), Some("Runtime.ExitError"));
    let body: serde_json::Value = serde_json::from_slice(&r.payload).unwrap();
    assert_eq!(
        body["errorMessage"],
        "RequestId: x1 Error: Runtime exited with error: exit status 3"
    );
    assert!(text(&r.log).contains("exiting now"), "{}", text(&r.log));
    assert!(agent_error(c.invoke(&event("x2", "again"))).contains("exited"));
    // The agent itself is fine.
    c.health().unwrap();
}

#[test]
fn init_error_post_is_init_error() {
    let agent = Agent::start();
    let f = agent
        .client()
        .start_runtime(&agent.spec(&[("INIT_MODE", "fail")]))
        .unwrap()
        .expect_err("init must fail");
    assert_eq!(f.error_type, "Runtime.Custom");
    assert_eq!(
        text(&f.payload),
        r#"{"errorMessage":"bad config","errorType":"Other"}"#
    );
    assert!(text(&f.log).contains("init: none"), "{}", text(&f.log));
}

#[test]
fn exit_during_init_is_exit_error() {
    let agent = Agent::start();
    let f = agent
        .client()
        .start_runtime(&agent.spec(&[("INIT_MODE", "exit")]))
        .unwrap()
        .expect_err("init must fail");
    assert_eq!(f.error_type, "Runtime.ExitError");
    let body: serde_json::Value = serde_json::from_slice(&f.payload).unwrap();
    assert_eq!(
        body["errorMessage"],
        "Runtime exited with error: exit status 2"
    );
    assert!(text(&f.log).contains("dying in init"), "{}", text(&f.log));
}

#[test]
fn init_timeout_kills_the_runtime() {
    let agent = Agent::start();
    let mut spec = agent.spec(&[("INIT_MODE", "hang")]);
    spec.init_timeout_ms = Some(300);
    let t = Instant::now();
    let f = agent
        .client()
        .start_runtime(&spec)
        .unwrap()
        .expect_err("init must time out");
    assert_eq!(f.error_type, "Runtime.InitTimeout");
    assert!(t.elapsed() < Duration::from_secs(10));
    assert!(text(&f.log).contains("init: none"), "{}", text(&f.log));
}

#[test]
fn missing_bootstrap_is_invalid_entrypoint() {
    let agent = Agent::start();
    let mut spec = agent.spec(&[]);
    spec.argv = vec!["/nonexistent/bootstrap".into()];
    let f = agent
        .client()
        .start_runtime(&spec)
        .unwrap()
        .expect_err("cannot start");
    assert_eq!(f.error_type, "Runtime.InvalidEntrypoint");
}

/// A `Refresh` the agent refuses (no entropy) before touching the RNG or
/// the clock, so the test leaves the host's alone; it still counts as the
/// restore and releases `restore/next`.
fn harmless_refresh(c: &mut AgentClient) {
    let r = c
        .request(&Request::Refresh {
            entropy: Vec::new(),
            realtime_ns: 0,
        })
        .unwrap();
    assert!(
        matches!(&r, Response::Error { message } if message.contains("entropy")),
        "{r:?}"
    );
}

fn wait_for(path: &Path) -> String {
    let start = Instant::now();
    loop {
        if let Ok(s) = std::fs::read_to_string(path) {
            return s;
        }
        assert!(start.elapsed() < T, "{} never appeared", path.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

const SNAP: (&str, &str) = ("AWS_LAMBDA_INITIALIZATION_TYPE", "snap-start");

#[test]
fn snapstart_runtime_waits_for_the_restore() {
    let agent = Agent::start();
    let mut c = agent.client();
    let ready = c
        .start_runtime(&agent.spec(&[SNAP]))
        .unwrap()
        .expect("runtime ready");
    // Ready as soon as it waits on restore/next (the host snapshots now).
    let init_log = text(&ready.log);
    assert!(init_log.contains("before snapshot"), "{init_log}");
    assert!(!init_log.contains("after restore"), "{init_log}");

    // Nothing but the restore releases it.
    let marker = agent.dir.path().join("restored");
    std::thread::sleep(Duration::from_millis(300));
    c.health().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(!marker.exists(), "restore/next answered before Refresh");

    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    harmless_refresh(&mut c);
    let restored = wait_for(&marker);
    let fields: Vec<&str> = restored.split_whitespace().collect();
    assert_eq!(&fields[..2], ["200", "0"], "{restored}");
    let at: u128 = fields[2].parse().unwrap();
    assert!(at >= before, "released at {at}, Refresh sent at {before}");

    // Then the usual loop; after-restore output is in the first log.
    let r = c.invoke(&event("s1", "hi")).unwrap();
    assert_eq!(r.status, InvokeStatus::Success);
    assert_eq!(text(&r.payload), "echo:hi");
    assert!(
        text(&r.log).contains("after restore: 200"),
        "{}",
        text(&r.log)
    );
    // A second Refresh (another restore of this clone?) changes nothing.
    harmless_refresh(&mut c);
    let r = c.invoke(&event("s2", "again")).unwrap();
    assert_eq!(text(&r.payload), "echo:again");
}

#[test]
fn snapstart_after_restore_error_fails_invokes() {
    let agent = Agent::start();
    let mut c = agent.client();
    c.start_runtime(&agent.spec(&[SNAP, ("RESTORE_MODE", "fail")]))
        .unwrap()
        .expect("runtime ready");
    harmless_refresh(&mut c);
    // This Invoke waits through the hooks, which then fail.
    let r = c.invoke(&event("r1", "x")).unwrap();
    assert_eq!(r.status, InvokeStatus::RuntimeExited);
    assert_eq!(r.error_type.as_deref(), Some("Runtime.AfterRestoreError"));
    assert_eq!(
        text(&r.payload),
        r#"{"errorMessage":"hook failed","errorType":"HookError"}"#
    );
    assert!(
        text(&r.log).contains("after restore: 200"),
        "{}",
        text(&r.log)
    );
    // The runtime exits (65) after posting; later Invokes get the same.
    std::thread::sleep(Duration::from_millis(300));
    let r = c.invoke(&event("r2", "y")).unwrap();
    assert_eq!(r.status, InvokeStatus::RuntimeExited);
    assert_eq!(r.error_type.as_deref(), Some("Runtime.AfterRestoreError"));
    c.health().unwrap();
}

#[test]
fn snapstart_invoke_without_refresh_still_runs() {
    let agent = Agent::start();
    let mut c = agent.client();
    c.start_runtime(&agent.spec(&[SNAP]))
        .unwrap()
        .expect("runtime ready");
    let r = c.invoke(&event("n1", "direct")).unwrap();
    assert_eq!(text(&r.payload), "echo:direct");
    assert!(agent.dir.path().join("restored").exists());
}
