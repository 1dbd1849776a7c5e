//! SigV4 as an unmodified AWS SDK signs it: botocore (the signer under
//! boto3 and the AWS CLI) signs Lambda requests, and `verify` must accept
//! exactly those and refuse them once anything signed is changed.
//! Python comes from `EMBER_TEST_PYTHON` (tests/python-env.sh), else
//! `python3`; skipped when it has no botocore.

use std::process::Command;

use ember_cluster::sigv4::{verify, AuthError, Request};
use serde_json::Value;

const SIGN: &str = r#"
import json, sys
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
spec = json.loads(sys.argv[1])
req = AWSRequest(method=spec["method"], url=spec["url"], data=spec["body"].encode(),
                 headers=spec["headers"])
SigV4Auth(Credentials("AKIDEMBERTEST", "ember/secret+key"), "lambda", "us-east-1").add_auth(req)
print(json.dumps({"headers": [[k, v] for k, v in req.headers.items()]}))
"#;

fn python() -> String {
    std::env::var("EMBER_TEST_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// botocore's headers for the request, or None without botocore.
fn sign(
    method: &str,
    url: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> Option<Vec<(String, String)>> {
    let spec = serde_json::json!({
        "method": method, "url": url, "body": body,
        "headers": headers.iter().map(|(k, v)| (k.to_string(), Value::from(*v))).collect::<serde_json::Map<String, Value>>(),
    });
    let out = Command::new(python())
        .args(["-c", SIGN, &spec.to_string()])
        .output()
        .ok()?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("No module named"), "botocore failed: {err}");
        return None;
    }
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut hs: Vec<(String, String)> = v["headers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p[0].as_str().unwrap().to_string(),
                p[1].as_str().unwrap().to_string(),
            )
        })
        .collect();
    // What the wire adds: botocore signs the Host it will send.
    if !hs.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        hs.push(("Host".into(), "127.0.0.1:9000".into()));
    }
    Some(hs)
}

#[test]
fn botocore_signed_lambda_requests_verify() {
    let cases = [
        ("POST", "/2015-03-31/functions/my-fn/invocations", "Qualifier=%24LATEST", r#"{"a": 1}"#,
         vec![("X-Amz-Invocation-Type", "RequestResponse"), ("X-Amz-Log-Type", "Tail")]),
        ("GET", "/2015-03-31/functions/arn%3Aaws%3Alambda%3Aus-east-1%3A000000000000%3Afunction%3Af/configuration", "", "", vec![]),
        ("GET", "/2015-03-31/functions/", "MaxItems=50&Marker=abc%2Fdef", "", vec![]),
        ("PUT", "/2017-10-31/functions/f/concurrency", "", r#"{"ReservedConcurrentExecutions": 5}"#,
         vec![("Content-Type", "application/json")]),
    ];
    let now = jiff::Timestamp::now();
    let secret = |k: &str| (k == "AKIDEMBERTEST").then(|| "ember/secret+key".to_string());
    for (method, path, query, body, extra) in cases {
        let url = if query.is_empty() {
            format!("http://127.0.0.1:9000{path}")
        } else {
            format!("http://127.0.0.1:9000{path}?{query}")
        };
        let Some(headers) = sign(method, &url, body, &extra) else {
            eprintln!(
                "skipped: no botocore for {} (run tests/python-env.sh)",
                python()
            );
            return;
        };
        let req = Request {
            method,
            path,
            query,
            headers: &headers,
            body: body.as_bytes(),
        };
        let who = verify(&req, now, secret).unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        assert_eq!(
            (who.region.as_str(), who.service.as_str()),
            ("us-east-1", "lambda")
        );
        // Anything signed changed → refused.
        let other_body = Request {
            body: b"{\"a\": 2}",
            ..req
        };
        if method != "GET" {
            assert_eq!(verify(&other_body, now, secret), Err(AuthError::Mismatch));
        }
        let other_path = Request {
            path: "/2015-03-31/functions/other/invocations",
            ..req
        };
        assert_eq!(verify(&other_path, now, secret), Err(AuthError::Mismatch));
        assert_eq!(
            verify(&req, now, |_| Some("wrong".into())),
            Err(AuthError::Mismatch)
        );
    }
}
