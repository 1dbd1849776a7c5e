//! The cluster's async queue on a real etcd, with answers etcd would
//! refuse to store: a function that answers 2 MB (over etcd's ~1.5 MiB
//! request limit) runs once when it succeeds and at most three times (the
//! first try and two retries) when it fails, and its outcome is recorded, cut and flagged;
//! another account's event is delivered meanwhile. The host is a stand-in
//! that answers the cluster's host API (deploy, state, invoke) and counts
//! the invocations it gets; the full path with real guests is in
//! cluster_e2e.rs. Skipped without etcd or boto3.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ember_lambda::hosts::{HostReport, Membership};
use ember_store::testing::EtcdProcess;
use ember_tests::cluster::{async_record, boto3, boto3_or_skip, create_account, ClusterApi, Key};
use ember_tls::tokio_rustls::rustls::{ServerConfig, ServerConnection, StreamOwned};
use serde_json::{json, Value};

const BIG: usize = 2_000_000;

type Counts = Arc<Mutex<HashMap<String, u32>>>;

/// Answers one request of the cluster's host client (inside TLS).
fn serve_one(s: TcpStream, tls: Arc<ServerConfig>, counts: &Counts) -> std::io::Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let conn = ServerConnection::new(tls).map_err(std::io::Error::other)?;
    let mut r = BufReader::new(StreamOwned::new(conn, s));
    let mut line = String::new();
    r.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let (method, path) = (
        parts.next().unwrap_or("").to_string(),
        parts.next().unwrap_or("").to_string(),
    );
    let mut len = 0usize;
    loop {
        let mut h = String::new();
        r.read_line(&mut h)?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    let (status, extra, answer): (u16, &str, Vec<u8>) =
        if method == "POST" && path == "/2015-03-31/functions" {
            (201, "", b"{}".to_vec())
        } else if method == "GET" && path.ends_with("/configuration") {
            (
                200,
                "",
                br#"{"State":"Active","LastUpdateStatus":"Successful"}"#.to_vec(),
            )
        } else if method == "POST" && path.ends_with("/invocations") {
            let ev: Value = serde_json::from_slice(&body).unwrap_or_default();
            let tag = ev["tag"].as_str().unwrap_or("?").to_string();
            *counts.lock().unwrap().entry(tag).or_default() += 1;
            let size = ev["size"].as_u64().unwrap_or(2) as usize;
            let mut out = vec![b'"'];
            out.extend(std::iter::repeat_n(b'a', size.saturating_sub(2)));
            out.push(b'"');
            if ev["mode"] == "fail" {
                (200, "X-Amz-Function-Error: Unhandled\r\n", out)
            } else {
                (200, "", out)
            }
        } else {
            (
                404,
                "x-amzn-ErrorType: ResourceNotFoundException\r\n",
                b"{}".to_vec(),
            )
        };
    let s = r.get_mut();
    write!(
        s,
        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n{extra}X-Amz-Executed-Version: $LATEST\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        answer.len()
    )?;
    s.write_all(&answer)?;
    s.flush()
}

/// The stand-in host on a free port, with a certificate from the
/// cluster's CA in `tls_dir` (hosts are reached over mutual TLS only): its
/// endpoint.
fn stand_in_host(counts: Counts, tls_dir: &std::path::Path) -> String {
    let files =
        ember_tls::dev_certs(tls_dir, "stand-in", &["127.0.0.1".into()]).expect("dev certificates");
    let tls = ember_tls::Tls::load(&files).expect("TLS settings");
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("https://{}", l.local_addr().unwrap());
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let counts = counts.clone();
            let server = tls.server.clone();
            std::thread::spawn(move || {
                let _ = serve_one(s, server, &counts);
            });
        }
    });
    endpoint
}

fn event(url: &str, key: &Key, payload: Value) -> String {
    let r = boto3(
        url,
        key,
        "invoke",
        json!({"FunctionName": "work", "InvocationType": "Event", "Payload": payload.to_string()}),
    );
    assert_eq!(r["ok"]["StatusCode"], 202, "{r}");
    r["ok"]["RequestId"].as_str().unwrap().to_string()
}

#[test]
fn async_answers_too_large_for_etcd_run_within_their_retries() {
    if !boto3_or_skip() {
        return;
    }
    let Some(etcd) = EtcdProcess::start_or_skip() else {
        return;
    };
    let store_args = ["--etcd", etcd.url.as_str()];
    let alpha = create_account(&store_args, "alpha");
    let beta = create_account(&store_args, "beta");
    let token = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(token.path(), "a-test-token-of-some-length").unwrap();
    let tls_dir = tempfile::tempdir().unwrap();
    let tls_arg = tls_dir.path().display().to_string();
    let api = ClusterApi::start(
        &store_args,
        token.path(),
        &[
            "--async-retry-delay-ms",
            "200",
            "--leader-ttl-secs",
            "3",
            "--host-tls-dev-dir",
            &tls_arg,
        ],
    );
    let url = api.url.clone();

    let counts: Counts = Default::default();
    let endpoint = stand_in_host(counts.clone(), tls_dir.path());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let store = rt.block_on(async { etcd.store().await.unwrap() });
    let report = HostReport {
        id: "stand-in".into(),
        endpoint,
        capacity: 64,
        running: 0,
        warm_idle: Default::default(),
    };
    let _member = rt
        .block_on(Membership::join(&store, &report, Duration::from_secs(600)))
        .unwrap();

    let zip = {
        let dir = tempfile::tempdir().unwrap();
        ember_tests::emberd::write_file(&dir.path().join("bootstrap"), "#!/bin/sh\n", 0o755);
        ember_tests::emberd::zip_dir(dir.path())
    };
    for k in [&alpha, &beta] {
        let r = boto3(
            &url,
            k,
            "create_function",
            json!({"FunctionName": "work", "Runtime": "provided.al2023", "Handler": "x",
                   "Role": "arn:aws:iam::000000000000:role/r", "Code": {"ZipFileB64": zip}}),
        );
        assert!(r.get("ok").is_some(), "{r}");
    }

    // alpha: one 2 MB success and ten 2 MB failures (more than the
    // leader runs at once); beta: one small event.
    let ok_id = event(
        &url,
        &alpha,
        json!({"tag": "a-ok", "mode": "ok", "size": BIG}),
    );
    let fail_ids: Vec<(String, String)> = (0..10)
        .map(|i| {
            let tag = format!("a-fail-{i}");
            let id = event(
                &url,
                &alpha,
                json!({"tag": tag, "mode": "fail", "size": BIG}),
            );
            (tag, id)
        })
        .collect();
    let beta_id = event(
        &url,
        &beta,
        json!({"tag": "b-ok", "mode": "ok", "size": 10}),
    );

    let mut all: Vec<(&Key, String)> = vec![(&alpha, ok_id.clone()), (&beta, beta_id.clone())];
    all.extend(fail_ids.iter().map(|(_, id)| (&alpha, id.clone())));
    let start = Instant::now();
    loop {
        let pending: Vec<&String> = all
            .iter()
            .filter(|(k, id)| async_record(&url, k, id)["Status"] == "Queued")
            .map(|(_, id)| id)
            .collect();
        if pending.is_empty() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "not finished: {pending:?}; runs: {:?}\n{}",
            counts.lock().unwrap(),
            api.logs()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // Some more leader ticks: nothing runs again.
    std::thread::sleep(Duration::from_secs(3));
    let runs = counts.lock().unwrap().clone();
    eprintln!("runs per event: {runs:?}");

    let r = async_record(&url, &alpha, &ok_id);
    assert_eq!(r["Status"], "Succeeded", "{r}");
    assert_eq!(runs.get("a-ok"), Some(&1), "a success runs once: {runs:?}");
    assert_eq!(r["ResponseTruncated"], true, "{r}");
    assert_eq!(r["ResponseSize"], BIG, "{r}");
    let kept = r["Response"].as_str().unwrap();
    assert!(
        kept.len() <= 256 * 1024 && kept.starts_with("\"aaaa"),
        "{}",
        kept.len()
    );
    for (tag, id) in &fail_ids {
        let r = async_record(&url, &alpha, id);
        assert_eq!(r["Status"], "Failed", "{tag}: {r}");
        assert_eq!(r["Attempts"], 3, "{tag}: {r}");
        assert_eq!(r["FunctionError"], "Unhandled", "{tag}: {r}");
        assert_eq!(r["ResponseTruncated"], true, "{tag}: {r}");
        let n = runs.get(tag).copied().unwrap_or(0);
        assert!(
            n <= 3,
            "{tag} ran {n} times (first try + 2 retries at most)"
        );
        assert_eq!(n, 3, "{tag}: a failing event is retried twice");
    }
    let r = async_record(&url, &beta, &beta_id);
    assert_eq!(r["Status"], "Succeeded", "{r}");
    assert_eq!(r["ResponseTruncated"], false, "{r}");
    assert_eq!(runs.get("b-ok"), Some(&1));
    // Nothing left in the queue.
    let left = rt
        .block_on(store.list(ember_cluster::queue::QUEUED_PREFIX))
        .unwrap();
    assert!(left.is_empty(), "{left:?}");
    let warnings = api.logs();
    assert!(
        !warnings.contains("too large"),
        "no write was refused for its size:\n{warnings}"
    );
}
