//! ember-cluster's Lambda front end with unmodified boto3 (and botocore's
//! signer for raw requests), on the embedded store, with no hosts: the
//! control plane, SigV4 refusals, accounts kept apart, and Lambda-shaped
//! errors for malformed requests. Invocations on real hosts are in
//! `cluster_hosts_e2e.rs`. Skipped without boto3 (tests/python-env.sh).

use ember_tests::cluster::{
    bootstrap_zip_b64, boto3, boto3_or_skip, create_account, ok, signed_request, ClusterApi, Key,
};
use serde_json::{json, Value};

fn err(v: &Value) -> (String, u64) {
    let e = v
        .get("error")
        .unwrap_or_else(|| panic!("expected an error: {v}"));
    (
        e["Code"].as_str().unwrap().to_string(),
        e["Status"].as_u64().unwrap(),
    )
}

#[test]
fn lambda_control_plane_with_boto3() {
    if !boto3_or_skip() {
        return;
    }
    let state = tempfile::tempdir().unwrap();
    let state_arg = state.path().display().to_string();
    let store = ["--state-dir", state_arg.as_str()];
    // The embedded store is one process's: accounts first, then serve.
    let alpha = create_account(&store, "alpha");
    let beta = create_account(&store, "beta");
    assert_ne!(alpha.account_id, beta.account_id);
    assert_eq!(create_account(&store, "alpha").account_id, alpha.account_id);
    let token = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(token.path(), "a-test-token-of-some-length").unwrap();
    let api = ClusterApi::start(&store, token.path(), &[]);
    let url = api.url.as_str();
    let call = |k: &Key, op: &str, args: Value| boto3(url, k, op, args);

    let zip = bootstrap_zip_b64("v1");
    let created = ok(call(
        &alpha,
        "create_function",
        json!({"FunctionName": "greet", "Runtime": "provided.al2023", "Handler": "x",
               "Role": "arn:aws:iam::000000000000:role/r", "Code": {"ZipFileB64": zip},
               "Timeout": 30, "Environment": {"Variables": {"K": "V"}}}),
    ));
    assert_eq!(created["FunctionName"], "greet");
    assert_eq!(
        created["FunctionArn"],
        format!(
            "arn:aws:lambda:us-east-1:{}:function:greet",
            alpha.account_id
        )
    );
    assert_eq!(created["Version"], "$LATEST");
    assert_eq!(created["Environment"]["Variables"]["K"], "V");
    let (code, status) = err(&call(
        &alpha,
        "create_function",
        json!({"FunctionName": "greet", "Runtime": "provided", "Role": "r", "Code": {"ZipFileB64": zip}}),
    ));
    assert_eq!((code.as_str(), status), ("ResourceConflictException", 409));

    // Configuration, publish (unchanged twice → one version), aliases.
    let got = ok(call(
        &alpha,
        "get_function",
        json!({"FunctionName": "greet"}),
    ));
    assert_eq!(got["Configuration"]["Timeout"], 30);
    let upd = ok(call(
        &alpha,
        "update_function_configuration",
        json!({"FunctionName": "greet", "Timeout": 10, "Description": "d"}),
    ));
    assert_eq!(
        (upd["Timeout"].as_u64(), upd["Description"].as_str()),
        (Some(10), Some("d"))
    );
    let v1 = ok(call(
        &alpha,
        "publish_version",
        json!({"FunctionName": "greet"}),
    ));
    assert_eq!(v1["Version"], "1");
    let again = ok(call(
        &alpha,
        "publish_version",
        json!({"FunctionName": "greet"}),
    ));
    assert_eq!(again["Version"], "1", "nothing changed since version 1");
    ok(call(
        &alpha,
        "update_function_code",
        json!({"FunctionName": "greet", "ZipFileB64": bootstrap_zip_b64("v1"), "Publish": true}),
    ));
    let versions = ok(call(
        &alpha,
        "list_versions_by_function",
        json!({"FunctionName": "greet"}),
    ));
    let names: Vec<&str> = versions["Versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["Version"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["$LATEST", "1"], "same zip bytes: no new version");
    let a = ok(call(
        &alpha,
        "create_alias",
        json!({"FunctionName": "greet", "Name": "live", "FunctionVersion": "1"}),
    ));
    assert!(a["AliasArn"]
        .as_str()
        .unwrap()
        .ends_with(":function:greet:live"));
    ok(call(
        &alpha,
        "update_function_configuration",
        json!({"FunctionName": "greet", "Timeout": 11}),
    ));
    assert_eq!(
        ok(call(
            &alpha,
            "publish_version",
            json!({"FunctionName": "greet"})
        ))["Version"],
        "2"
    );
    let a = ok(call(
        &alpha,
        "update_alias",
        json!({"FunctionName": "greet", "Name": "live",
               "RoutingConfig": {"AdditionalVersionWeights": {"2": 0.25}}}),
    ));
    assert_eq!(a["RoutingConfig"]["AdditionalVersionWeights"]["2"], 0.25);
    let a = ok(call(
        &alpha,
        "get_alias",
        json!({"FunctionName": "greet", "Name": "live"}),
    ));
    assert_eq!(a["FunctionVersion"], "1");
    let (code, _) = err(&call(
        &alpha,
        "update_alias",
        json!({"FunctionName": "greet", "Name": "live",
               "RoutingConfig": {"AdditionalVersionWeights": {"9": 0.5}}}),
    ));
    assert_eq!(code, "InvalidParameterValueException");
    let (code, status) = err(&call(
        &alpha,
        "get_alias",
        json!({"FunctionName": "greet", "Name": "nope"}),
    ));
    assert_eq!((code.as_str(), status), ("ResourceNotFoundException", 404));

    // Concurrency settings.
    let r = ok(call(
        &alpha,
        "put_function_concurrency",
        json!({"FunctionName": "greet", "ReservedConcurrentExecutions": 0}),
    ));
    assert_eq!(r["ReservedConcurrentExecutions"], 0);
    // Reserved 0: throttled before any host is asked.
    let (code, status) = err(&call(&alpha, "invoke", json!({"FunctionName": "greet"})));
    assert_eq!((code.as_str(), status), ("TooManyRequestsException", 429));
    ok(call(
        &alpha,
        "delete_function_concurrency",
        json!({"FunctionName": "greet"}),
    ));
    let r = ok(call(
        &alpha,
        "put_provisioned_concurrency_config",
        json!({"FunctionName": "greet", "Qualifier": "live", "ProvisionedConcurrentExecutions": 1}),
    ));
    assert_eq!(r["Status"], "IN_PROGRESS");
    let (code, _) = err(&call(
        &alpha,
        "put_provisioned_concurrency_config",
        json!({"FunctionName": "greet", "Qualifier": "$LATEST", "ProvisionedConcurrentExecutions": 1}),
    ));
    assert_eq!(code, "InvalidParameterValueException");
    // No hosts: DryRun checks only; a real invoke has nowhere to run.
    let r = ok(call(
        &alpha,
        "invoke",
        json!({"FunctionName": "greet", "InvocationType": "DryRun"}),
    ));
    assert_eq!(r["StatusCode"], 204);
    let (code, status) = err(&call(&alpha, "invoke", json!({"FunctionName": "greet"})));
    assert_eq!((code.as_str(), status), ("ServiceException", 503));
    // Event: accepted durably (delivered once a host exists).
    let r = ok(call(
        &alpha,
        "invoke",
        json!({"FunctionName": "greet", "InvocationType": "Event", "Payload": "{\"a\": 1}"}),
    ));
    assert_eq!(r["StatusCode"], 202);

    // Another account sees nothing of alpha's.
    let listed = ok(call(&beta, "list_functions", json!({})));
    assert_eq!(listed["Functions"], json!([]));
    let (code, status) = err(&call(
        &beta,
        "get_function",
        json!({"FunctionName": "greet"}),
    ));
    assert_eq!((code.as_str(), status), ("ResourceNotFoundException", 404));
    let arn = format!(
        "arn:aws:lambda:us-east-1:{}:function:greet",
        alpha.account_id
    );
    let (code, status) = err(&call(&beta, "invoke", json!({"FunctionName": arn})));
    assert_eq!((code.as_str(), status), ("AccessDeniedException", 403));
    let (code, _) = err(&call(
        &beta,
        "delete_function",
        json!({"FunctionName": "greet"}),
    ));
    assert_eq!(code, "ResourceNotFoundException");
    // beta's own "greet" is another function.
    ok(call(
        &beta,
        "create_function",
        json!({"FunctionName": "greet", "Runtime": "provided", "Role": "r", "Code": {"ZipFileB64": zip}}),
    ));
    let listed = ok(call(&alpha, "list_functions", json!({})));
    assert_eq!(listed["Functions"].as_array().unwrap().len(), 1);
    assert_eq!(listed["Functions"][0]["Timeout"], 11, "alpha's, untouched");

    // Bad signatures: a wrong secret, an unknown key, none at all.
    let wrong = Key {
        secret: "not-the-secret".into(),
        ..alpha.clone()
    };
    let (code, status) = err(&call(&wrong, "list_functions", json!({})));
    assert_eq!((code.as_str(), status), ("InvalidSignatureException", 403));
    let unknown = Key {
        id: "AKIAUNKNOWNUNKNOWN00".into(),
        ..alpha.clone()
    };
    let (code, status) = err(&call(&unknown, "list_functions", json!({})));
    assert_eq!(
        (code.as_str(), status),
        ("UnrecognizedClientException", 403)
    );
    let r = signed_request(url, None, "GET", "/2015-03-31/functions/", "");
    assert_eq!(r["Status"], 403);
    assert_eq!(
        r["Headers"]["x-amzn-errortype"],
        "MissingAuthenticationTokenException"
    );

    // Malformed requests: Lambda's status, x-amzn-ErrorType and body.
    for (method, path, body, want, status) in [
        (
            "POST",
            "/2015-03-31/functions",
            "{not json",
            "InvalidRequestContentException",
            400,
        ),
        (
            "POST",
            "/2015-03-31/functions",
            r#"{"FunctionName":"bad/name","Runtime":"provided","Code":{"ZipFile":"UEsFBg=="}}"#,
            "InvalidParameterValueException",
            400,
        ),
        (
            "POST",
            "/2015-03-31/functions",
            r#"{"FunctionName":"f2","Runtime":"cobol","Code":{"ZipFile":"UEsFBg=="}}"#,
            "InvalidParameterValueException",
            400,
        ),
        (
            "POST",
            "/2015-03-31/functions",
            r#"{"FunctionName":"f2","Runtime":"provided","MemorySize":1,"Code":{"ZipFile":"UEsFBg=="}}"#,
            "InvalidParameterValueException",
            400,
        ),
        (
            "POST",
            "/2015-03-31/functions",
            r#"{"FunctionName":"f2","Runtime":"provided","Code":{"ZipFile":"%%%"}}"#,
            "InvalidParameterValueException",
            400,
        ),
        (
            "POST",
            "/2015-03-31/functions/greet/invocations",
            "{nope",
            "InvalidRequestContentException",
            400,
        ),
        (
            "POST",
            "/2015-03-31/functions/nosuch/invocations",
            "{}",
            "ResourceNotFoundException",
            404,
        ),
        (
            "PUT",
            "/2017-10-31/functions/greet/concurrency",
            r#"{"ReservedConcurrentExecutions":-1}"#,
            "InvalidParameterValueException",
            400,
        ),
        (
            "GET",
            "/2015-03-31/functions/greet/configuration?Qualifier=77",
            "",
            "ResourceNotFoundException",
            404,
        ),
        (
            "GET",
            "/2099-01-01/nothing",
            "",
            "UnknownOperationException",
            404,
        ),
    ] {
        let r = signed_request(url, Some(&alpha), method, path, body);
        assert_eq!(r["Status"], status, "{method} {path}: {r}");
        assert_eq!(
            r["Headers"]["x-amzn-errortype"], want,
            "{method} {path}: {r}"
        );
        let b: Value = serde_json::from_str(r["Body"].as_str().unwrap()).unwrap();
        assert!(b["message"].as_str().is_some_and(|m| !m.is_empty()), "{r}");
    }

    ok(call(
        &alpha,
        "delete_alias",
        json!({"FunctionName": "greet", "Name": "live"}),
    ));
    ok(call(
        &alpha,
        "delete_function",
        json!({"FunctionName": "greet", "Qualifier": "1"}),
    ));
    ok(call(
        &alpha,
        "delete_function",
        json!({"FunctionName": "greet"}),
    ));
    let (code, _) = err(&call(
        &alpha,
        "get_function",
        json!({"FunctionName": "greet"}),
    ));
    assert_eq!(code, "ResourceNotFoundException");
    assert!(ok(call(
        &beta,
        "get_function",
        json!({"FunctionName": "greet"})
    ))["Configuration"]
        .is_object());
}
