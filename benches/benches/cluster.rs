//! `cargo bench -p ember-benches --bench cluster`: the cluster's cost.
//!
//! 1. Invoke latency and throughput of one `provided` function (bash +
//!    curl, answers its event) through ember-cluster (SigV4-signed, placed,
//!    proxied) against straight to emberd's TCP API (mutual TLS and the
//!    bearer token), the
//!    same warm instances behind both: p50/p99 at concurrency 1, and
//!    invocations per second at concurrency 1 and 4, with the ratios.
//!    Also the proxy hop without a guest: GetFunctionConfiguration
//!    straight to emberd against through the cluster.
//! 2. Control-plane operations per second (GetFunction, a read;
//!    PutFunctionConcurrency, a compare-and-swap write) at concurrency 4
//!    through ember-cluster on etcd against ember-cluster on the embedded
//!    store (each without hosts, so nothing is deployed).
//!
//! Requests use a raw HTTP/1.1 client (one connection each), signed with
//! ember-cluster's own SigV4 signer (checked against botocore in the
//! cluster's tests). One host, one replica, one etcd. Prints numbers;
//! asserts nothing. Needs /dev/kvm and etcd.

use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ember_benches::{http_exchange, percentile, Resp};
use ember_cluster::sigv4;
use ember_store::testing::{free_port, EtcdProcess};
use ember_tests::cluster::{create_account, ClusterApi, Key};
use ember_tests::emberd::{provided_bootstrap_bash, write_file, zip_dir, Emberd};
use ember_tests::kvm_available;
use ember_tls::tokio_rustls::rustls;
use serde_json::{json, Value};

// Few: a guest invocation takes seconds on nested KVM.
const LATENCY_N: usize = 15;
const LEVELS: [usize; 2] = [1, 4];
const LEVEL_SECS: u64 = 20;
const CONTROL_SECS: u64 = 5;
const TOKEN: &str = "bench-token-0123456789abcdef";

/// Where requests go and how they are authorised.
#[derive(Clone)]
enum Target {
    Host {
        addr: String,
        function: String,
        /// The host's API is mutual TLS: a client certificate of its CA.
        tls: Arc<rustls::ClientConfig>,
    },
    Cluster {
        addr: String,
        key: Key,
    },
}

fn request(t: &Target, method: &str, path: &str, body: &[u8]) -> Result<Resp, String> {
    let addr = match t {
        Target::Host { addr, .. } | Target::Cluster { addr, .. } => addr,
    };
    let s = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(900))).ok();
    s.set_nodelay(true).ok();
    if let Target::Host { tls, .. } = t {
        let name = ember_tls::server_name(addr)?;
        let conn = rustls::ClientConnection::new(tls.clone(), name).map_err(|e| e.to_string())?;
        let hs = [("Authorization", format!("Bearer {TOKEN}"))];
        let hs: Vec<(&str, &str)> = hs.iter().map(|(k, v)| (*k, v.as_str())).collect();
        return http_exchange(
            rustls::StreamOwned::new(conn, s),
            addr,
            method,
            path,
            &hs,
            body,
        );
    }
    let (p, q) = path.split_once('?').unwrap_or((path, ""));
    // Content-Type (added by http_exchange for a body) is left unsigned.
    let mut headers: Vec<(String, String)> = Vec::new();
    match t {
        // Answered above, inside TLS.
        Target::Host { .. } => {}
        Target::Cluster { key, .. } => {
            // A signed header unique per request, as AWS SDKs add: the
            // cluster refuses a signature it has seen (replays), and
            // identical requests within one second would share one.
            static SEQ: AtomicUsize = AtomicUsize::new(0);
            let id = format!(
                "{}-{}",
                std::process::id(),
                SEQ.fetch_add(1, Ordering::Relaxed)
            );
            headers.push(("amz-sdk-invocation-id".into(), id.clone()));
            let to_sign = vec![
                ("Host".to_string(), addr.clone()),
                ("amz-sdk-invocation-id".to_string(), id),
            ];
            let req = sigv4::Request {
                method,
                path: p,
                query: q,
                headers: &to_sign,
                body,
            };
            headers.extend(sigv4::sign_request(
                &req,
                &key.id,
                &key.secret,
                "us-east-1",
                "lambda",
                jiff::Timestamp::now(),
            ));
        }
    }
    let hs: Vec<(&str, &str)> = headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    http_exchange(s, addr, method, path, &hs, body)
}

fn invoke(t: &Target) -> Result<(), String> {
    let name = match t {
        Target::Host { function, .. } => function.as_str(),
        Target::Cluster { .. } => "echo",
    };
    let r = request(
        t,
        "POST",
        &format!("/2015-03-31/functions/{name}/invocations"),
        b"{\"n\":1}",
    )?;
    if r.status != 200 || r.headers.contains_key("x-amz-function-error") {
        return Err(format!("invoke: {} {}", r.status, r.text()));
    }
    Ok(())
}

fn latency(t: &Target) -> Result<Vec<Duration>, String> {
    for _ in 0..2 {
        invoke(t)?;
    }
    let mut out = Vec::new();
    for _ in 0..LATENCY_N {
        let start = Instant::now();
        invoke(t)?;
        out.push(start.elapsed());
    }
    Ok(out)
}

/// Operations per second of `op` on `threads` threads for `secs`.
fn rate(
    threads: usize,
    secs: u64,
    op: impl Fn() -> Result<(), String> + Send + Sync,
) -> (f64, usize) {
    let done = AtomicUsize::new(0);
    let errors = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    match op() {
                        Ok(()) => done.fetch_add(1, Ordering::Relaxed),
                        Err(_) => errors.fetch_add(1, Ordering::Relaxed),
                    };
                }
            });
        }
        std::thread::sleep(Duration::from_secs(secs));
        stop.store(true, Ordering::Relaxed);
    });
    (
        done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64(),
        errors.load(Ordering::Relaxed),
    )
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

fn zip() -> String {
    let dir = tempfile::tempdir().unwrap();
    write_file(
        &dir.path().join("bootstrap"),
        &provided_bootstrap_bash("bench"),
        0o755,
    );
    zip_dir(dir.path())
}

fn create(t: &Target, name: &str) -> Result<(), String> {
    let body = json!({"FunctionName": name, "Runtime": "provided", "Handler": "bootstrap",
                      "Code": {"ZipFile": zip()}, "Timeout": 30});
    let r = request(
        t,
        "POST",
        "/2015-03-31/functions",
        body.to_string().as_bytes(),
    )?;
    if r.status != 201 {
        return Err(format!("create: {} {}", r.status, r.text()));
    }
    Ok(())
}

fn invoke_part(token_file: &std::path::Path) -> Result<(), String> {
    let etcd = EtcdProcess::start().ok_or("etcd is not installed")?;
    let hport = free_port().map_err(|e| e.to_string())?;
    let haddr = format!("127.0.0.1:{hport}");
    let token_arg = token_file.display().to_string();
    let tls_dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let tls_arg = tls_dir.path().display().to_string();
    let _host = Emberd::start(&[
        "--tls-dev-dir",
        &tls_arg,
        "--no-network",
        "--cluster-etcd",
        &etcd.url,
        "--host-id",
        "bench-host",
        "--listen-tcp",
        &haddr,
        "--api-token-file",
        &token_arg,
        "--host-capacity",
        "16",
        "--max-concurrency",
        "16",
        "--idle-ttl-secs",
        "600",
    ]);
    let store = ["--etcd", etcd.url.as_str()];
    let key = create_account(&store, "bench");
    let api = ClusterApi::start(&store, token_file, &["--host-tls-dev-dir", &tls_arg]);
    let client = ember_tls::dev_certs(tls_dir.path(), "bench", &["localhost".into()])
        .and_then(|f| ember_tls::Tls::load(&f))?
        .client;
    let cluster = Target::Cluster {
        addr: api.url.trim_start_matches("http://").to_string(),
        key,
    };
    // Wait for the host to join, then create (it builds on that host).
    let start = Instant::now();
    loop {
        match create(&cluster, "echo") {
            Ok(()) => break,
            Err(e) if start.elapsed() > Duration::from_secs(60) => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(500)),
        }
    }
    eprintln!("cluster: building the function's snapshot on the host...");
    let start = Instant::now();
    loop {
        let r = request(
            &cluster,
            "GET",
            "/2015-03-31/functions/echo/configuration",
            b"",
        )?;
        let v = r.json();
        if v["State"] == "Active" {
            break;
        }
        if v["State"] == "Failed" || start.elapsed() > Duration::from_secs(900) {
            return Err(format!("build: {v}"));
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    // The host's name for it: the only function there.
    let host_plain = Target::Host {
        addr: haddr.clone(),
        function: String::new(),
        tls: client.clone(),
    };
    let listed: Value = request(&host_plain, "GET", "/2015-03-31/functions", b"")?.json();
    let function = listed["Functions"][0]["FunctionName"]
        .as_str()
        .ok_or(format!("no function on the host: {listed}"))?
        .to_string();
    let host = Target::Host {
        addr: haddr,
        function,
        tls: client,
    };

    // The hop alone, without a guest: GetFunctionConfiguration straight
    // to the host against through the cluster (which verifies SigV4, reads
    // the record and asks that host for the build state: one proxied call).
    let cfg_path = |t: &Target| match t {
        Target::Host { function, .. } => format!("/2015-03-31/functions/{function}/configuration"),
        Target::Cluster { .. } => "/2015-03-31/functions/echo/configuration".to_string(),
    };
    let mut hop = Vec::new();
    for t in [&host, &cluster] {
        let mut v = Vec::new();
        for _ in 0..200 {
            let start = Instant::now();
            let r = request(t, "GET", &cfg_path(t), b"")?;
            if r.status != 200 {
                return Err(format!("configuration: {} {}", r.status, r.text()));
            }
            v.push(start.elapsed());
        }
        hop.push(v);
    }
    println!("\nGetFunctionConfiguration, no guest involved (200 each):");
    println!("{:<28} {:>10} {:>10}", "", "p50", "p99");
    for (name, v) in [
        ("emberd (TLS, bearer)", &hop[0]),
        ("ember-cluster (SigV4)", &hop[1]),
    ] {
        println!(
            "{name:<28} {:>10} {:>10}",
            ms(percentile(v, 50.0)),
            ms(percentile(v, 99.0))
        );
    }
    println!(
        "{:<28} {:>10.2} {:>10.2}",
        "ratio cluster/emberd",
        percentile(&hop[1], 50.0).as_secs_f64() / percentile(&hop[0], 50.0).as_secs_f64(),
        percentile(&hop[1], 99.0).as_secs_f64() / percentile(&hop[0], 99.0).as_secs_f64()
    );

    let direct = latency(&host)?;
    let through = latency(&cluster)?;
    println!("\ninvoke latency, warm instance, concurrency 1 ({LATENCY_N} each):");
    println!("{:<28} {:>10} {:>10} {:>10}", "", "p50", "p99", "mean");
    let mean = |v: &[Duration]| v.iter().sum::<Duration>() / v.len() as u32;
    for (name, v) in [
        ("emberd (TLS, bearer)", &direct),
        ("ember-cluster (SigV4)", &through),
    ] {
        println!(
            "{name:<28} {:>10} {:>10} {:>10}",
            ms(percentile(v, 50.0)),
            ms(percentile(v, 99.0)),
            ms(mean(v))
        );
    }
    println!(
        "{:<28} {:>10.2} {:>10.2} {:>10.2}",
        "ratio cluster/emberd",
        percentile(&through, 50.0).as_secs_f64() / percentile(&direct, 50.0).as_secs_f64(),
        percentile(&through, 99.0).as_secs_f64() / percentile(&direct, 99.0).as_secs_f64(),
        mean(&through).as_secs_f64() / mean(&direct).as_secs_f64()
    );
    println!("\ninvoke throughput ({LEVEL_SECS} s per level):");
    for n in LEVELS {
        // Warm-up: the host restores instances up to n.
        rate(n, 3, || invoke(&host));
        let (d, de) = rate(n, LEVEL_SECS, || invoke(&host));
        let (c, ce) = rate(n, LEVEL_SECS, || invoke(&cluster));
        println!(
            "concurrency {n:>2}: emberd {d:>8.1}/s ({de} errors), cluster {c:>8.1}/s ({ce} errors), ratio {:.2}",
            c / d
        );
    }
    Ok(())
}

/// GetFunction and PutFunctionConcurrency per second through `api`.
fn control_ops(api: &ClusterApi, key: Key) -> Result<(f64, f64), String> {
    let t = Target::Cluster {
        addr: api.url.trim_start_matches("http://").to_string(),
        key,
    };
    create(&t, "cp")?;
    let (reads, re) = rate(4, CONTROL_SECS, || {
        let r = request(&t, "GET", "/2015-03-31/functions/cp", b"")?;
        (r.status == 200).then_some(()).ok_or(r.text())
    });
    let n = Arc::new(AtomicUsize::new(0));
    let (writes, we) = rate(4, CONTROL_SECS, || {
        let v = n.fetch_add(1, Ordering::Relaxed) % 100;
        let body = json!({"ReservedConcurrentExecutions": v}).to_string();
        let r = request(
            &t,
            "PUT",
            "/2017-10-31/functions/cp/concurrency",
            body.as_bytes(),
        )?;
        (r.status == 200).then_some(()).ok_or(r.text())
    });
    if re + we > 0 {
        eprintln!("control plane: {re} read and {we} write errors");
    }
    Ok((reads, writes))
}

fn control_part(token_file: &std::path::Path) -> Result<(), String> {
    let etcd = EtcdProcess::start().ok_or("etcd is not installed")?;
    let store = ["--etcd", etcd.url.as_str()];
    let key = create_account(&store, "cp");
    let on_etcd = {
        let api = ClusterApi::start(&store, token_file, &[]);
        control_ops(&api, key)?
    };
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let dir_arg = dir.path().display().to_string();
    let store = ["--state-dir", dir_arg.as_str()];
    let key = create_account(&store, "cp");
    let embedded = {
        let api = ClusterApi::start(&store, token_file, &[]);
        control_ops(&api, key)?
    };
    println!(
        "\ncontrol plane through ember-cluster, concurrency 4 ({CONTROL_SECS} s each), ops/s:"
    );
    println!(
        "{:<28} {:>10} {:>10} {:>16}",
        "", "etcd", "embedded", "etcd/embedded"
    );
    for (name, e, m) in [
        ("GetFunction", on_etcd.0, embedded.0),
        ("PutFunctionConcurrency", on_etcd.1, embedded.1),
    ] {
        println!("{name:<28} {e:>10.1} {m:>10.1} {:>16.2}", e / m);
    }
    Ok(())
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let token = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(token.path(), TOKEN).unwrap();
    if let Err(e) = control_part(token.path()) {
        println!("control plane: failed: {e}");
    }
    if !kvm_available() {
        println!("invoke: skipped (no /dev/kvm)");
        return;
    }
    if let Err(e) = invoke_part(token.path()) {
        println!("invoke: failed: {e}");
    }
}
