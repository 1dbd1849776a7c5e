//! The `nodejs18.x` runtime end to end: real microVMs with the nodejs root
//! filesystem (Debian's node 18 and Ember's runtime client,
//! rootfs/nodejs/ric.js) run Lambda's three kinds of Node.js handler: an
//! async one, one that answers through its callback, and one that throws.

use std::time::{Duration, Instant};

use ember_tests::artifacts::runtime_rootfs_path;
use ember_tests::emberd::{write_file, Emberd};
use ember_tests::kvm_available;
use serde_json::json;

const BUILD_TIMEOUT: Duration = Duration::from_secs(900);

const INDEX_JS: &str = r#"
class MyError extends Error {
  constructor(message) {
    super(message);
    this.name = 'MyError';
  }
}

exports.asyncHandler = async (event, context) => {
  console.log('async got', JSON.stringify(event));
  await new Promise((resolve) => setTimeout(resolve, 10));
  return {
    echo: event,
    functionName: context.functionName,
    functionVersion: context.functionVersion,
    invokedFunctionArn: context.invokedFunctionArn,
    memoryLimitInMB: context.memoryLimitInMB,
    awsRequestId: context.awsRequestId,
    logGroupName: context.logGroupName,
    remainingMs: context.getRemainingTimeInMillis(),
    waits: context.callbackWaitsForEmptyEventLoop,
    executionEnv: process.env.AWS_EXECUTION_ENV,
    node: process.version,
    uid: process.getuid(),
  };
};

exports.callbackHandler = (event, context, callback) => {
  setTimeout(() => {
    callback(null, { doubled: event.n * 2, requestId: context.awsRequestId });
    // Lambda answers once the event loop is empty (by default): after this.
    setTimeout(() => console.log('after the callback'), 200);
  }, 50);
};

exports.throwingHandler = async (event) => {
  throw new MyError(`refused ${event.n}`);
};
"#;

#[test]
fn nodejs_handlers_async_callback_and_throwing() {
    if !kvm_available() {
        eprintln!("SKIPPED: /dev/kvm is not available");
        return;
    }
    let rootfs = runtime_rootfs_path("nodejs");
    let code = tempfile::tempdir().unwrap();
    write_file(&code.path().join("index.js"), INDEX_JS, 0o644);
    let rootfs = rootfs.to_str().expect("utf-8 path");
    let d = Emberd::start(&["--rootfs-nodejs", rootfs]);

    // Refused before anything is built: other Node.js versions, handlers
    // that are not file.function.
    let zip = ember_tests::emberd::zip_dir(code.path());
    for (runtime, handler, why) in [
        ("nodejs20.x", "index.asyncHandler", "nodejs18.x"),
        ("nodejs18.x", "index", "file.function"),
        ("nodejs18.x", "", "Handler is required"),
    ] {
        let r = d.post_json(
            "/2015-03-31/functions",
            &json!({"FunctionName": "refused", "Runtime": runtime, "Handler": handler,
                    "Code": {"ZipFile": zip}}),
        );
        assert_eq!(r.status, 400, "{runtime} {handler}: {}", r.text());
        assert!(r.text().contains(why), "{runtime} {handler}: {}", r.text());
    }

    let t = Instant::now();
    for (name, handler) in [
        ("js-async", "index.asyncHandler"),
        ("js-callback", "index.callbackHandler"),
        ("js-throw", "index.throwingHandler"),
    ] {
        d.create_function(name, "nodejs18.x", handler, code.path(), 20, &[]);
    }
    for name in ["js-async", "js-callback", "js-throw"] {
        d.wait_active(name, "$LATEST", BUILD_TIMEOUT);
    }
    eprintln!(
        "three nodejs18.x functions snapshotted after {:.1} s",
        t.elapsed().as_secs_f64()
    );

    // Async: the returned object, with the event and Lambda's context.
    for n in 1..=2 {
        let t = Instant::now();
        let r = d.invoke("js-async", &json!({"n": n}));
        eprintln!(
            "js-async invoke {n}: {:.0} ms",
            t.elapsed().as_secs_f64() * 1e3
        );
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("x-amz-function-error"), None, "{}", r.text());
        let p = r.json();
        assert_eq!(p["echo"], json!({"n": n}));
        assert_eq!(p["functionName"], "js-async");
        assert_eq!(p["functionVersion"], "$LATEST");
        assert!(
            p["invokedFunctionArn"]
                .as_str()
                .is_some_and(|a| a.starts_with("arn:aws:lambda:") && a.contains("js-async")),
            "{p}"
        );
        assert_eq!(p["memoryLimitInMB"], "128");
        assert_eq!(p["logGroupName"], "/aws/lambda/js-async");
        assert_eq!(p["waits"], true);
        assert_eq!(p["executionEnv"], "AWS_Lambda_nodejs18.x");
        assert!(
            p["node"].as_str().is_some_and(|v| v.starts_with("v18.")),
            "{p}"
        );
        assert_eq!(p["uid"], 993, "functions run as sbx_user1051");
        let request_id = p["awsRequestId"].as_str().unwrap();
        assert_eq!(Some(request_id), r.header("x-amzn-requestid"));
        let remaining = p["remainingMs"].as_u64().unwrap();
        assert!(remaining > 0 && remaining <= 21_000, "{remaining}");
        // console.log as Lambda's: time, request id, level, message.
        let log = r.log_tail();
        assert!(
            log.contains(&format!("\t{request_id}\tINFO\tasync got {{\"n\":{n}}}")),
            "{log}"
        );
    }

    // Callback: the value passed to it, once the event loop is empty.
    let r = d.invoke("js-callback", &json!({"n": 21}));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-amz-function-error"), None, "{}", r.text());
    let p = r.json();
    assert_eq!(p["doubled"], 42);
    assert_eq!(p["requestId"].as_str(), r.header("x-amzn-requestid"));
    let log = r.log_tail();
    assert!(log.contains("after the callback"), "{log}");

    // Throwing: a function error in Lambda's shape.
    let r = d.invoke("js-throw", &json!({"n": 7}));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-amz-function-error"), Some("Unhandled"));
    let p = r.json();
    assert_eq!(p["errorType"], "MyError", "{p}");
    assert_eq!(p["errorMessage"], "refused 7", "{p}");
    let trace: Vec<&str> = p["trace"]
        .as_array()
        .expect("trace")
        .iter()
        .filter_map(|l| l.as_str())
        .collect();
    assert_eq!(trace.first(), Some(&"MyError: refused 7"), "{p}");
    assert!(
        trace.iter().any(|l| l.contains("/var/task/index.js")),
        "{p}"
    );
    // The instance survives its handler's error.
    let r = d.invoke("js-throw", &json!({"n": 8}));
    assert_eq!(r.json()["errorMessage"], "refused 8");
    eprintln!("total {:.1} s", t.elapsed().as_secs_f64());
}
