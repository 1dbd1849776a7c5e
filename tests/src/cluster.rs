//! `ember-cluster` replicas as child processes, and unmodified AWS clients
//! pointed at them: boto3 (any Lambda operation, from Python given by
//! `EMBER_TEST_PYTHON`, see tests/python-env.sh), botocore-signed raw
//! requests, and the AWS CLI from the same virtualenv.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::artifacts::workspace_bin;

pub struct ClusterApi {
    child: Option<Child>,
    pub url: String,
    pub log: PathBuf,
    dir: Option<tempfile::TempDir>,
}

/// An access key of an account, as `ember-cluster account create` prints it.
#[derive(Debug, Clone)]
pub struct Key {
    pub account_id: String,
    pub id: String,
    pub secret: String,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

impl ClusterApi {
    /// A replica on a free port of 127.0.0.1 with `store_args` (e.g.
    /// `--etcd URL`) and `extra` serve flags; waits until it answers.
    pub fn start(store_args: &[&str], token_file: &Path, extra: &[&str]) -> ClusterApi {
        let dir = tempfile::Builder::new()
            .prefix("ember-cluster-test-")
            .tempdir()
            .expect("tempdir");
        let port = free_port();
        let log = dir.path().join("cluster.log");
        let child = Command::new(workspace_bin("ember-cluster"))
            .args(store_args)
            .arg("serve")
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--host-token-file")
            .arg(token_file)
            .args(extra)
            .args(
                // Hosts are reached over mutual TLS only: a CA of its own
                // unless the test shares one with its hosts.
                (!extra.iter().any(|a| a.starts_with("--host-tls")))
                    .then(|| ["--host-tls-dev-dir".into(), dir.path().join("tls")])
                    .into_iter()
                    .flatten()
                    .collect::<Vec<PathBuf>>(),
            )
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("spawn ember-cluster");
        let mut c = ClusterApi {
            child: Some(child),
            url: format!("http://127.0.0.1:{port}"),
            log,
            dir: Some(dir),
        };
        let start = Instant::now();
        while c.health().is_none() {
            if let Some(Ok(Some(st))) = c.child.as_mut().map(|ch| ch.try_wait()) {
                panic!("ember-cluster exited ({st}):\n{}", c.logs());
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "ember-cluster did not answer:\n{}",
                c.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        c
    }

    /// `GET /ember/v1/health` (unauthenticated), or None if it is down.
    pub fn health(&self) -> Option<Value> {
        let out = Command::new("curl")
            .args(["-sf", "--max-time", "5"])
            .arg(format!("{}/ember/v1/health", self.url))
            .output()
            .ok()?;
        serde_json::from_slice(&out.stdout).ok()
    }

    pub fn is_leader(&self) -> bool {
        self.health().is_some_and(|h| h["Leader"] == true)
    }

    /// The replica's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL: no clean hand-over of leadership.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for ClusterApi {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "ember-cluster log {} ({}):\n{}",
                self.url,
                self.log.display(),
                self.logs()
            );
            // Kept for a look after the test.
            let _ = self.dir.take().map(tempfile::TempDir::keep);
        }
    }
}

/// `ember-cluster account create NAME` against the store of `store_args`.
pub fn create_account(store_args: &[&str], name: &str) -> Key {
    let out = Command::new(workspace_bin("ember-cluster"))
        .args(store_args)
        .args(["account", "create", name])
        .output()
        .expect("ember-cluster account create");
    assert!(
        out.status.success(),
        "account create: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("account JSON");
    Key {
        account_id: v["AccountId"].as_str().unwrap().into(),
        id: v["AccessKeyId"].as_str().unwrap().into(),
        secret: v["SecretAccessKey"].as_str().unwrap().into(),
    }
}

pub fn python() -> String {
    std::env::var("EMBER_TEST_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// True when the Python has boto3 (and so botocore).
pub fn have_boto3() -> bool {
    Command::new(python())
        .args(["-c", "import boto3"])
        .status()
        .is_ok_and(|s| s.success())
}

/// [`have_boto3`], saying on stderr that the test is skipped without it.
pub fn boto3_or_skip() -> bool {
    let have = have_boto3();
    if !have {
        eprintln!("skipped: no boto3 (run with EMBER_TEST_PYTHON=$(bash tests/python-env.sh))");
    }
    have
}

/// What a [`boto3`] call that must succeed answered.
pub fn ok(v: Value) -> Value {
    assert!(v.get("ok").is_some(), "expected success: {v}");
    v["ok"].clone()
}

/// A function's code, base64: a `provided` bootstrap that answers with `tag`.
pub fn bootstrap_zip_b64(tag: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    crate::emberd::write_file(
        &dir.path().join("bootstrap"),
        &crate::emberd::provided_bootstrap_bash(tag),
        0o755,
    );
    crate::emberd::zip_dir(dir.path())
}

/// The record of async invocation `id` (its GET must answer 200).
pub fn async_record(url: &str, key: &Key, id: &str) -> Value {
    let r = signed_request(
        url,
        Some(key),
        "GET",
        &format!("/ember/v1/async-invocations/{id}"),
        "",
    );
    assert_eq!(r["Status"], 200, "{r}");
    serde_json::from_str(r["Body"].as_str().unwrap()).unwrap()
}

/// The AWS CLI beside the Python (the virtualenv's), if there is one.
pub fn aws_cli() -> Option<PathBuf> {
    let py = PathBuf::from(python());
    let aws = py.parent()?.join("aws");
    aws.is_file().then_some(aws)
}

const BOTO3_CALL: &str = r#"
import base64, json, sys, time
import boto3, botocore.config, botocore.exceptions
spec = json.loads(sys.argv[1])
cfg = botocore.config.Config(read_timeout=900, connect_timeout=10,
                             retries={"max_attempts": 1, "mode": "standard"})
c = boto3.client("lambda", endpoint_url=spec["url"], region_name="us-east-1",
                 aws_access_key_id=spec["key"], aws_secret_access_key=spec["secret"],
                 config=cfg)
args = spec["args"]
if "ZipFileB64" in args.get("Code", {}):
    args["Code"]["ZipFile"] = base64.b64decode(args["Code"].pop("ZipFileB64"))
if "ZipFileB64" in args:
    args["ZipFile"] = base64.b64decode(args.pop("ZipFileB64"))
if "Payload" in args:
    args["Payload"] = args["Payload"].encode()
def call():
    if spec["op"].startswith("wait:"):
        c.get_waiter(spec["op"][5:]).wait(**args,
            WaiterConfig={"Delay": 2, "MaxAttempts": 450})
        return {}
    return getattr(c, spec["op"])(**args)
try:
    # Retries are off, to see each error as it is; but the same call made
    # twice within one second carries the same signature, which the
    # cluster's replay cache refuses with a throttle that SDKs retry:
    # retry that one, as botocore's default retries would.
    for attempt in range(5):
        try:
            r = call()
            break
        except botocore.exceptions.ClientError as e:
            if attempt == 4 or "already used" not in e.response["Error"].get("Message", ""):
                raise
            time.sleep(0.5)
    r["RequestId"] = r.pop("ResponseMetadata", {}).get("RequestId")
    if "Payload" in r:
        r["Payload"] = r["Payload"].read().decode()
    if "LogResult" in r:
        r["LogResult"] = base64.b64decode(r["LogResult"]).decode(errors="replace")
    print(json.dumps({"ok": r}, default=str))
except botocore.exceptions.ClientError as e:
    print(json.dumps({"error": {"Code": e.response["Error"]["Code"],
        "Message": e.response["Error"].get("Message", ""),
        "Status": e.response["ResponseMetadata"]["HTTPStatusCode"]}}))
"#;

/// A boto3 Lambda client call `op(**args)` (or `wait:NAME` for a waiter):
/// `{"ok": response}` or `{"error": {"Code", "Message", "Status"}}`.
/// A `Code.ZipFileB64` / `ZipFileB64` argument is sent as the zip's bytes.
pub fn boto3(url: &str, key: &Key, op: &str, args: Value) -> Value {
    let spec = json!({"url": url, "key": key.id, "secret": key.secret, "op": op, "args": args});
    let out = Command::new(python())
        .args(["-c", BOTO3_CALL, &spec.to_string()])
        .output()
        .expect("python");
    assert!(
        out.status.success(),
        "boto3 {op}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("boto3 {op}: {e}: {}", String::from_utf8_lossy(&out.stdout)))
}

const RAW_CALL: &str = r#"
import json, sys, urllib.request, urllib.error
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
spec = json.loads(sys.argv[1])
req = AWSRequest(method=spec["method"], url=spec["url"], data=spec["body"].encode(),
                 headers={"Content-Type": "application/json"})
if spec.get("key"):
    SigV4Auth(Credentials(spec["key"], spec["secret"]), "lambda", "us-east-1").add_auth(req)
r = urllib.request.Request(spec["url"], data=spec["body"].encode() if spec["body"] else None,
                           method=spec["method"], headers=dict(req.headers))
try:
    resp = urllib.request.urlopen(r, timeout=900)
    status, headers, body = resp.status, dict(resp.headers), resp.read()
except urllib.error.HTTPError as e:
    status, headers, body = e.code, dict(e.headers), e.read()
print(json.dumps({"Status": status, "Headers": {k.lower(): v for k, v in headers.items()},
                  "Body": body.decode(errors="replace")}))
"#;

/// One request signed by botocore with `key` (unsigned with None):
/// `{"Status", "Headers" (lower-case), "Body"}`.
pub fn signed_request(url: &str, key: Option<&Key>, method: &str, path: &str, body: &str) -> Value {
    let spec = json!({
        "url": format!("{url}{path}"), "method": method, "body": body,
        "key": key.map(|k| k.id.clone()), "secret": key.map(|k| k.secret.clone()),
    });
    let out = Command::new(python())
        .args(["-c", RAW_CALL, &spec.to_string()])
        .output()
        .expect("python");
    assert!(
        out.status.success(),
        "{method} {path}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("reply JSON")
}

const SIGN_ONLY: &str = r#"
import json, sys
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
spec = json.load(sys.stdin)
req = AWSRequest(method=spec["method"], url=spec["url"], data=spec["body"].encode(),
                 headers=spec["headers"])
SigV4Auth(Credentials(spec["key"], spec["secret"]), "lambda", "us-east-1").add_auth(req)
print(json.dumps([[k, v] for k, v in req.headers.items()]))
"#;

/// The headers botocore's SigV4 signer adds to a request (with `headers`
/// it is given), to send byte for byte with another client.
pub fn botocore_sign(
    url: &str,
    key: &Key,
    method: &str,
    path: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> Vec<(String, String)> {
    let hs: serde_json::Map<String, Value> = headers
        .iter()
        .map(|(k, v)| (k.to_string(), Value::from(*v)))
        .collect();
    let spec = json!({
        "url": format!("{url}{path}"), "method": method, "body": body,
        "key": key.id, "secret": key.secret, "headers": hs,
    });
    let mut child = Command::new(python())
        .args(["-c", SIGN_ONLY])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin
            .write_all(spec.to_string().as_bytes())
            .expect("spec to python");
    }
    let out = child.wait_with_output().expect("python");
    assert!(
        out.status.success(),
        "botocore sign: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Vec<(String, String)> = serde_json::from_slice(&out.stdout).expect("headers JSON");
    v
}

/// `aws lambda ARGS --endpoint-url URL` with `key`: (exit status, stdout, stderr).
pub fn aws_lambda(aws: &Path, url: &str, key: &Key, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(aws)
        .arg("lambda")
        .args(args)
        .args([
            "--endpoint-url",
            url,
            "--cli-read-timeout",
            "900",
            "--output",
            "json",
        ])
        .env("AWS_ACCESS_KEY_ID", &key.id)
        .env("AWS_SECRET_ACCESS_KEY", &key.secret)
        .env("AWS_DEFAULT_REGION", "us-east-1")
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
        .output()
        .expect("aws");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
