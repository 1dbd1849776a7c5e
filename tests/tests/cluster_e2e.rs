//! The cluster end to end: three hosts (an emberd in each of three
//! network namespaces, linked to this one by veth pairs), a real etcd and
//! two ember-cluster replicas; functions created and invoked with boto3
//! and with the AWS CLI, synchronously and asynchronously, through an
//! alias with weighted routing; a host stopped and its provisioned
//! concurrency and invocations moved to another; the leading replica
//! killed and the other serving (and delivering async invocations). Real
//! guests (`provided` functions, bash + curl), so each version's first
//! build on a host boots one. Needs root, /dev/kvm, etcd and boto3.

use std::time::{Duration, Instant};

use ember_lambda::hosts::{live_hosts, HostReport};
use ember_store::testing::EtcdProcess;
use ember_store::Store;
use ember_tests::cluster::{
    async_record, aws_cli, aws_lambda, bootstrap_zip_b64, boto3, boto3_or_skip, create_account, ok,
    signed_request, ClusterApi, Key,
};
use ember_tests::emberd::Emberd;
use ember_tests::{ip, is_root, kvm_available};
use serde_json::{json, Value};

const HOSTS: usize = 3;
const BUILD: Duration = Duration::from_secs(900);

fn hosts(etcd: &str) -> Vec<HostReport> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let store = Store::open(&[etcd.to_string()], std::path::Path::new("/nonexistent"))
            .await
            .unwrap();
        live_hosts(&store).await.unwrap()
    })
}

fn wait_until<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(t) = f() {
            return t;
        }
        assert!(start.elapsed() < timeout, "never: {what}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The async invocation's record once it is no longer queued.
fn async_outcome(url: &str, key: &Key, id: &str) -> Value {
    wait_until("async invocation delivered", BUILD, || {
        let v = async_record(url, key, id);
        (v["Status"] != "Queued").then_some(v)
    })
}

#[test]
fn three_hosts_two_replicas_boto3_and_aws_cli() {
    if !is_root() || !kvm_available() {
        eprintln!("skipped: needs root (network namespaces) and /dev/kvm");
        return;
    }
    if !boto3_or_skip() {
        return;
    }
    let Some(etcd) = EtcdProcess::start_on_or_skip("0.0.0.0") else {
        return;
    };
    let token = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(token.path(), "cluster-test-token-0123456789").unwrap();
    let token_path = token.path().display().to_string();
    // One development CA for the hosts and the cluster (mutual TLS).
    let tls_dir = tempfile::tempdir().unwrap();
    let tls_path = tls_dir.path().display().to_string();

    // Three hosts, each in its namespace, at 10.213.N.2 (this side .1).
    let pid = std::process::id();
    let base = (pid % 60) * 4;
    let mut emberds: Vec<Emberd> = (0..HOSTS)
        .map(|i| {
            let net = format!("10.213.{}", base + i as u32);
            let args = [
                "--cluster-etcd".to_string(),
                format!("http://{net}.1:{}", etcd.port),
                "--host-id".into(),
                format!("host-{i}"),
                "--listen-tcp".into(),
                format!("{net}.2:8600"),
                "--api-token-file".into(),
                token_path.clone(),
                "--tls-dev-dir".into(),
                tls_path.clone(),
                "--cluster-ttl-secs".into(),
                "4".into(),
                "--host-capacity".into(),
                "4".into(),
            ];
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            Emberd::start_with(&args, |ns| {
                let (outer, inner) = (format!("ecl{i}-{pid}"), format!("ecn{i}-{pid}"));
                ip(&[
                    "link", "add", &outer, "type", "veth", "peer", "name", &inner,
                ]);
                ip(&["link", "set", &inner, "netns", ns]);
                ip(&["addr", "add", &format!("{net}.1/30"), "dev", &outer]);
                ip(&["link", "set", &outer, "up"]);
                ip(&[
                    "-n",
                    ns,
                    "addr",
                    "add",
                    &format!("{net}.2/30"),
                    "dev",
                    &inner,
                ]);
                ip(&["-n", ns, "link", "set", &inner, "up"]);
            })
        })
        .collect();
    wait_until("three hosts join", Duration::from_secs(60), || {
        (hosts(&etcd.url).len() == HOSTS).then_some(())
    });

    let store = ["--etcd", etcd.url.as_str()];
    let alpha = create_account(&store, "alpha");
    let beta = create_account(&store, "beta");
    let serve = [
        "--leader-ttl-secs",
        "3",
        "--async-retry-delay-ms",
        "1000",
        "--host-tls-dev-dir",
        tls_path.as_str(),
    ];
    let mut replicas = [
        ClusterApi::start(
            &store,
            token.path(),
            &[&["--replica-id", "r1"][..], &serve[..]].concat(),
        ),
        ClusterApi::start(
            &store,
            token.path(),
            &[&["--replica-id", "r2"][..], &serve[..]].concat(),
        ),
    ];
    let (u1, u2) = (replicas[0].url.clone(), replicas[1].url.clone());
    wait_until("a leader", Duration::from_secs(30), || {
        replicas.iter().any(|r| r.is_leader()).then_some(())
    });

    // boto3: create (built on one host; the waiter sees Pending → Active).
    let created = ok(boto3(
        &u1,
        &alpha,
        "create_function",
        json!({"FunctionName": "greet", "Runtime": "provided.al2023", "Handler": "bootstrap",
               "Role": "arn:aws:iam::000000000000:role/r", "Code": {"ZipFileB64": bootstrap_zip_b64("v1")},
               "Timeout": 300, "Publish": true}),
    ));
    assert_eq!(created["State"], "Pending", "{created}");
    ok(boto3(
        &u2,
        &alpha,
        "wait:function_active_v2",
        json!({"FunctionName": "greet"}),
    ));

    // Synchronous, with the log tail. (Each guest invocation takes
    // seconds on nested KVM: the test makes few.)
    {
        let r = ok(boto3(
            &u1,
            &alpha,
            "invoke",
            json!({"FunctionName": "greet", "Payload": "{\"n\": 1}", "LogType": "Tail"}),
        ));
        assert_eq!(r["StatusCode"], 200, "{r}");
        let p: Value = serde_json::from_str(r["Payload"].as_str().unwrap()).unwrap();
        assert_eq!(
            (p["tag"].as_str(), p["event"]["n"].as_u64()),
            (Some("v1"), Some(1)),
            "{r}"
        );
        assert_eq!(r["ExecutedVersion"], "$LATEST");
        assert!(r["LogResult"].as_str().unwrap().contains("handling"), "{r}");
        assert!(r.get("FunctionError").is_none(), "{r}");
    }
    let r = ok(boto3(
        &u1,
        &alpha,
        "invoke",
        json!({"FunctionName": "greet", "Payload": "{\"fail\": 1}"}),
    ));
    assert_eq!(r["FunctionError"], "Unhandled", "{r}");
    assert!(
        r["Payload"].as_str().unwrap().contains("Custom.Failure"),
        "{r}"
    );
    // Another account cannot invoke it.
    let r = boto3(&u1, &beta, "invoke", json!({"FunctionName": "greet"}));
    assert_eq!(r["error"]["Code"], "ResourceNotFoundException", "{r}");

    // Async: accepted (202), delivered by the leader, outcome kept.
    let r = ok(boto3(
        &u2,
        &alpha,
        "invoke",
        json!({"FunctionName": "greet", "InvocationType": "Event", "Payload": "{\"async\": 1}"}),
    ));
    assert_eq!(r["StatusCode"], 202);
    let out = async_outcome(&u1, &alpha, r["RequestId"].as_str().unwrap());
    assert_eq!(out["Status"], "Succeeded", "{out}");
    let answer: Value = serde_json::from_str(out["Response"].as_str().unwrap()).unwrap();
    assert_eq!(answer["event"]["async"], 1, "{out}");

    // The AWS CLI, unmodified.
    if let Some(aws) = aws_cli() {
        let dir = tempfile::tempdir().unwrap();
        let outfile = dir.path().join("out.json").display().to_string();
        let (st, stdout, stderr) = aws_lambda(
            &aws,
            &u1,
            &alpha,
            &[
                "invoke",
                "--function-name",
                "greet",
                "--qualifier",
                "1",
                "--payload",
                "{\"cli\": 7}",
                &outfile,
            ],
        );
        assert_eq!(st, 0, "{stdout} {stderr}");
        let meta: Value = serde_json::from_str(&stdout).unwrap();
        assert_eq!(meta["StatusCode"], 200, "{stdout}");
        // Version 1 has $LATEST's spec: the same deployment, no new build.
        assert_eq!(meta["ExecutedVersion"], "1", "{stdout}");
        let p: Value = serde_json::from_slice(&std::fs::read(&outfile).unwrap()).unwrap();
        assert_eq!(p["event"]["cli"], 7, "{p}");
        let (st, stdout, stderr) = aws_lambda(
            &aws,
            &u2,
            &alpha,
            &[
                "invoke",
                "--function-name",
                "greet",
                "--invocation-type",
                "Event",
                "--payload",
                "{\"cli\": 8}",
                &outfile,
            ],
        );
        assert_eq!(st, 0, "{stdout} {stderr}");
        assert_eq!(
            serde_json::from_str::<Value>(&stdout).unwrap()["StatusCode"],
            202
        );
        let (st, stdout, _) = aws_lambda(&aws, &u1, &alpha, &["list-functions"]);
        assert_eq!(st, 0);
        assert_eq!(
            serde_json::from_str::<Value>(&stdout).unwrap()["Functions"][0]["FunctionName"],
            "greet"
        );
        let (st, _, stderr) = aws_lambda(
            &aws,
            &u1,
            &alpha,
            &["get-function", "--function-name", "nosuch"],
        );
        assert!(
            st != 0 && stderr.contains("ResourceNotFoundException"),
            "{stderr}"
        );
        let wrong = Key {
            secret: "wrong".into(),
            ..alpha.clone()
        };
        let (st, _, stderr) = aws_lambda(&aws, &u1, &wrong, &["list-functions"]);
        assert!(
            st != 0 && stderr.contains("InvalidSignatureException"),
            "{stderr}"
        );
    } else {
        panic!(
            "no aws CLI beside {}: tests/python-env.sh installs awscli",
            ember_tests::cluster::python()
        );
    }

    // Version 2: a new description only, so it shares version 1's
    // deployment (no second build; new code on hosts is a new deployment,
    // as the control-plane test shows). The alias sends half its traffic
    // there.
    let d = ok(boto3(
        &u1,
        &alpha,
        "update_function_configuration",
        json!({"FunctionName": "greet", "Description": "second"}),
    ));
    assert_eq!(d["State"], "Active", "the same deployment, built: {d}");
    assert_eq!(
        ok(boto3(
            &u1,
            &alpha,
            "publish_version",
            json!({"FunctionName": "greet"})
        ))["Version"],
        "2"
    );
    ok(boto3(
        &u1,
        &alpha,
        "create_alias",
        json!({"FunctionName": "greet", "Name": "live", "FunctionVersion": "1",
               "RoutingConfig": {"AdditionalVersionWeights": {"2": 0.5}}}),
    ));
    // Until both versions ran (a guest's invocation takes seconds here, so
    // not a fixed large sample); 30 tries at 50% miss one with p < 1e-8.
    let mut seen = std::collections::BTreeMap::new();
    for _ in 0..30 {
        let r = ok(boto3(
            &u2,
            &alpha,
            "invoke",
            json!({"FunctionName": "greet", "Qualifier": "live"}),
        ));
        let p: Value = serde_json::from_str(r["Payload"].as_str().unwrap()).unwrap();
        let v = r["ExecutedVersion"].as_str().unwrap().to_string();
        assert_eq!(p["tag"], "v1", "version {v} ran {p}");
        *seen.entry(v).or_insert(0) += 1;
        if seen.len() == 2 {
            break;
        }
    }
    assert_eq!(
        seen.keys().collect::<Vec<_>>(),
        ["1", "2"],
        "weighted routing: {seen:?}"
    );

    // Provisioned concurrency on version 1: the leader places it.
    ok(boto3(
        &u1,
        &alpha,
        "put_provisioned_concurrency_config",
        json!({"FunctionName": "greet", "Qualifier": "1", "ProvisionedConcurrentExecutions": 1}),
    ));
    // Raw (boto3 drops the `Host` that Ember adds to the answer).
    let ready_on = |not: Option<&str>| {
        wait_until("provisioned concurrency ready", BUILD, || {
            let r = signed_request(
                &u2,
                Some(&alpha),
                "GET",
                "/2019-09-30/functions/greet/provisioned-concurrency?Qualifier=1",
                "",
            );
            assert_eq!(r["Status"], 200, "{r}");
            let s: Value = serde_json::from_str(r["Body"].as_str().unwrap()).unwrap();
            let host = s["Host"].as_str().map(str::to_string);
            (s["Status"] == "READY" && host.as_deref() != not)
                .then(|| host.expect("a READY config names its host"))
        })
    };
    let first = ready_on(None);
    // That host stops: it leaves, and the leader moves the instances.
    let i: usize = first.trim_start_matches("host-").parse().unwrap();
    emberds[i].stop();
    wait_until("the host leaves", Duration::from_secs(30), || {
        (!hosts(&etcd.url).iter().any(|h| h.id == first)).then_some(())
    });
    let second = ready_on(Some(&first));
    assert_ne!(first, second);
    let r = ok(boto3(
        &u1,
        &alpha,
        "invoke",
        json!({"FunctionName": "greet", "Qualifier": "1", "Payload": "{\"moved\": 1}"}),
    ));
    let p: Value = serde_json::from_str(r["Payload"].as_str().unwrap()).unwrap();
    assert_eq!(
        (p["tag"].as_str(), p["event"]["moved"].as_u64()),
        (Some("v1"), Some(1)),
        "{r}"
    );

    // The leading replica is killed: the other serves and takes over.
    let leader = replicas
        .iter()
        .position(|r| r.is_leader())
        .expect("a leader");
    replicas[leader].kill();
    let other = replicas[1 - leader].url.clone();
    assert!(ok(boto3(&other, &alpha, "list_functions", json!({})))["Functions"][0].is_object());
    let r = ok(boto3(
        &other,
        &alpha,
        "invoke",
        json!({"FunctionName": "greet", "Qualifier": "1", "InvocationType": "Event", "Payload": "{\"after\": 1}"}),
    ));
    let out = async_outcome(&other, &alpha, r["RequestId"].as_str().unwrap());
    assert_eq!(out["Status"], "Succeeded", "{out}");
    assert!(replicas[1 - leader].is_leader());
    drop(replicas);
    drop(emberds);
}
