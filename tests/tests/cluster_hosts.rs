//! emberd in a cluster: it joins the cluster store (a real etcd) with its
//! report, heartbeats, is marked down by itself when killed, joins again
//! when restarted and leaves at once when stopped; its API over TCP is
//! mutual TLS only and wants the token: no client certificate, another
//! CA's, an expired one or plain HTTP get nothing, and emberd serves on
//! after them. Without TLS settings emberd refuses --listen-tcp. No guest
//! is booted.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use ember_lambda::hosts::{live_hosts, HostReport};
use ember_store::testing::{free_port, EtcdProcess};
use ember_store::Store;
use ember_tests::emberd::Emberd;
use ember_tls::{dev_certs, leaf_params, TlsFiles};

async fn hosts(store: &Store) -> Vec<HostReport> {
    live_hosts(store).await.unwrap()
}

async fn wait_for(
    store: &Store,
    what: &str,
    want: impl Fn(&[HostReport]) -> bool,
) -> Vec<HostReport> {
    let start = Instant::now();
    loop {
        let h = hosts(store).await;
        if want(&h) {
            return h;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "never: {what}; hosts: {h:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// curl's status for `url` (0: no HTTP answer), presenting `cert` (the
/// PEM files' stem in the dev directory) if given, trusting `ca`.
fn curl_status(url: &str, token: Option<&str>, ca: &Path, cert: Option<&TlsFiles>) -> u16 {
    let mut c = Command::new("curl");
    c.arg("--cacert").arg(ca);
    if let Some(f) = cert {
        c.arg("--cert").arg(&f.cert).arg("--key").arg(&f.key);
    }
    c.args([
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--max-time",
        "10",
    ]);
    if let Some(t) = token {
        c.args(["-H", &format!("Authorization: Bearer {t}")]);
    }
    let out = c.arg(url).output().expect("curl");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn emberd_joins_heartbeats_and_leaves_the_cluster() {
    let Some(etcd) = EtcdProcess::start_or_skip() else {
        return;
    };
    let store = etcd.store().await.unwrap();
    let port = free_port().unwrap();
    let token_file = tempfile::NamedTempFile::new().unwrap();
    let token = "a-test-token-of-some-length";
    std::fs::write(token_file.path(), token).unwrap();
    let tcp = format!("127.0.0.1:{port}");
    let token_path = token_file.path().display().to_string();
    let tls_dir = tempfile::tempdir().unwrap();
    let tls_path = tls_dir.path().display().to_string();
    let args = [
        "--no-network",
        "--cluster-etcd",
        etcd.url.as_str(),
        "--host-id",
        "host-a",
        "--listen-tcp",
        tcp.as_str(),
        "--api-token-file",
        token_path.as_str(),
        "--tls-dev-dir",
        tls_path.as_str(),
        "--cluster-ttl-secs",
        "3",
        "--host-capacity",
        "7",
    ];
    let mut d = Emberd::start(&args);
    let h = wait_for(&store, "host-a joins", |h| h.len() == 1).await;
    assert_eq!(h[0].id, "host-a");
    assert_eq!(h[0].endpoint, format!("https://{tcp}"));
    assert_eq!((h[0].capacity, h[0].running), (7, 0));

    // The API over TCP: mutual TLS, and then only with the token.
    let client = dev_certs(tls_dir.path(), "test-client", &["localhost".into()]).unwrap();
    let ca = client.ca.clone();
    let health = format!("https://{tcp}/ember/v1/health");
    assert_eq!(curl_status(&health, Some(token), &ca, Some(&client)), 200);
    assert_eq!(curl_status(&health, None, &ca, Some(&client)), 401);
    assert_eq!(
        curl_status(&health, Some("wrong-token-wrong-token"), &ca, Some(&client)),
        401
    );
    // Strangers with the token: nothing without a certificate of the CA.
    let other_dir = tempfile::tempdir().unwrap();
    let other = dev_certs(other_dir.path(), "stranger", &["localhost".into()]).unwrap();
    let expired = expired_cert(tls_dir.path());
    let plain = format!("http://{tcp}/ember/v1/health");
    let attempts: [(&str, u16); 5] = [
        (
            "no client certificate",
            curl_status(&health, Some(token), &ca, None),
        ),
        (
            "another CA's certificate",
            curl_status(&health, Some(token), &ca, Some(&other)),
        ),
        (
            "an expired certificate",
            curl_status(&health, Some(token), &ca, Some(&expired)),
        ),
        (
            "trusting another CA",
            curl_status(&health, Some(token), &other.ca, Some(&client)),
        ),
        (
            "plain http://",
            curl_status(&plain, Some(token), &ca, Some(&client)),
        ),
    ];
    eprintln!("{:<28} HTTP status (0: none)", "attempt");
    for (what, st) in &attempts {
        eprintln!("{what:<28} {st}");
    }
    let through = attempts.iter().filter(|(_, st)| *st != 0).count();
    assert_eq!(through, 0, "{attempts:?}");
    // emberd serves on after them.
    assert_eq!(curl_status(&health, Some(token), &ca, Some(&client)), 200);

    // Still there after several TTLs: the heartbeats keep it.
    tokio::time::sleep(Duration::from_secs(7)).await;
    assert_eq!(hosts(&store).await.len(), 1, "heartbeats keep the host");

    // Killed: marked down by itself once the lease runs out.
    // SAFETY: kill on the pid of our own child.
    unsafe { libc::kill(d.pid() as i32, libc::SIGKILL) };
    let t = Instant::now();
    wait_for(&store, "host-a marked down", |h| h.is_empty()).await;
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "down after {:?}",
        t.elapsed()
    );

    // Restarted: back; stopped cleanly: gone at once.
    d.restart();
    wait_for(&store, "host-a back", |h| h.len() == 1).await;
    d.stop();
    let h = hosts(&store).await;
    assert!(h.is_empty(), "a clean stop leaves at once: {h:?}");
}

/// A certificate of the dev CA in `dir` that expired in 2021.
fn expired_cert(dir: &Path) -> TlsFiles {
    let ca_key = rcgen_key(&dir.join("ca-key.pem"));
    // The same name and key as the dev CA: what it signs chains to it.
    let ca = dev_ca_again(&ca_key);
    let key = ember_tls::rcgen::KeyPair::generate().unwrap();
    let mut p = leaf_params("expired", &["localhost".into()]).unwrap();
    p.not_before = ember_tls::rcgen::date_time_ymd(2020, 1, 1);
    p.not_after = ember_tls::rcgen::date_time_ymd(2021, 1, 1);
    let cert = p.signed_by(&key, &ca, &ca_key).unwrap();
    let files = TlsFiles {
        cert: dir.join("expired.pem"),
        key: dir.join("expired-key.pem"),
        ca: dir.join("ca.pem"),
    };
    std::fs::write(&files.cert, cert.pem()).unwrap();
    std::fs::write(&files.key, key.serialize_pem()).unwrap();
    files
}

fn rcgen_key(path: &Path) -> ember_tls::rcgen::KeyPair {
    ember_tls::rcgen::KeyPair::from_pem(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn dev_ca_again(key: &ember_tls::rcgen::KeyPair) -> ember_tls::rcgen::Certificate {
    ember_tls::dev_ca_params().self_signed(key).unwrap()
}

/// emberd will not serve its API over TCP without TLS.
#[test]
fn listen_tcp_without_tls_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "a-test-token-of-some-length").unwrap();
    let out = Command::new(ember_tests::artifacts::workspace_bin("emberd"))
        .arg("--socket")
        .arg(dir.path().join("s.sock"))
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--kernel")
        .arg("/nonexistent")
        .args(["--listen-tcp", "127.0.0.1:0", "--api-token-file"])
        .arg(&token)
        .output()
        .expect("emberd");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("needs TLS"), "{err}");
}

/// Volume attachments through emberd's API: it asks the volume service
/// (the real `ember-volumed`) in its own name, and passes the answer on.
#[test]
fn volume_attachments_through_emberd() {
    let dir = tempfile::tempdir().unwrap();
    let volumed = ember_tests::volumed::Volumed::start(dir.path());
    let (st, _) = volumed.call(
        "POST",
        "/v1/volumes",
        Some(r#"{"Name":"data1","SizeBytes":1048576,"Account":"000000000000"}"#),
    );
    assert_eq!(st, 201);
    // Another account's volume, and one of no account.
    for body in [
        r#"{"Name":"theirs","SizeBytes":1048576,"Account":"999988887777"}"#,
        r#"{"Name":"nobodys","SizeBytes":1048576}"#,
    ] {
        assert_eq!(volumed.call("POST", "/v1/volumes", Some(body)).0, 201);
    }
    let api = volumed.api.clone();
    let api_arg = api.display().to_string();
    let d = Emberd::start(&[
        "--no-network",
        "--volume-service",
        &api_arg,
        "--host-id",
        "host-a",
    ]);
    let post = |path: &str, body: &str| d.request("POST", path, &[], Some(body.as_bytes()));
    let r = post("/ember/v1/volumes/data1/attach", "{}");
    assert_eq!(r.status, 200, "{}", r.text());
    let g = r.json();
    assert_eq!(
        (g["Host"].as_str(), g["Generation"].as_u64()),
        (Some("host-a"), Some(1)),
        "{g}"
    );
    // The grant's export name carries a credential, not the generation.
    let export = g["ExportName"].as_str().unwrap();
    assert_eq!(export.strip_prefix("data1@").map(str::len), Some(64), "{g}");
    assert!(g["UnixUri"].as_str().unwrap().contains(export), "{g}");
    // This host (account 000000000000) may not attach the others'.
    for v in ["theirs", "nobodys"] {
        let r = post(&format!("/ember/v1/volumes/{v}/attach"), "{}");
        assert_eq!(r.status, 403, "{v}: {}", r.text());
        assert_eq!(
            volumed
                .call("GET", &format!("/v1/volumes/{v}"), None)
                .1
                .get("Attachment"),
            None
        );
    }
    // Errors from the service come through with its status.
    assert_eq!(post("/ember/v1/volumes/nosuch/attach", "{}").status, 404);
    assert_eq!(
        post("/ember/v1/volumes/bad%2Fname/attach", "{}").status,
        400
    );
    assert_eq!(post("/ember/v1/volumes/data1/move", "{nope").status, 400);
    let r = post("/ember/v1/volumes/data1/move", r#"{"Host":"host-b"}"#);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["Generation"], 2);
    assert_eq!(post("/ember/v1/volumes/data1/detach", "").status, 204);
    assert_eq!(
        post("/ember/v1/volumes/data1/detach", "").status,
        409,
        "not attached"
    );
    drop(d);
}
