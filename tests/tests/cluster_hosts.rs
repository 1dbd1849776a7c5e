//! emberd in a cluster: it joins the cluster store (a real etcd) with its
//! report, heartbeats, is marked down by itself when killed, joins again
//! when restarted and leaves at once when stopped; its API over TCP wants
//! the token. No guest is booted.

use std::process::Command;
use std::time::{Duration, Instant};

use ember_cluster::hosts::{live_hosts, HostReport};
use ember_store::testing::{free_port, EtcdProcess};
use ember_store::Store;
use ember_tests::emberd::Emberd;

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

fn curl_status(url: &str, token: Option<&str>) -> u16 {
    let mut c = Command::new("curl");
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
    let Some(etcd) = EtcdProcess::start() else {
        eprintln!("skipped: etcd (etcd-server) is not installed");
        return;
    };
    let store = Store::open(
        std::slice::from_ref(&etcd.url),
        std::path::Path::new("/nonexistent"),
    )
    .await
    .unwrap();
    let port = free_port().unwrap();
    let token_file = tempfile::NamedTempFile::new().unwrap();
    let token = "a-test-token-of-some-length";
    std::fs::write(token_file.path(), token).unwrap();
    let tcp = format!("127.0.0.1:{port}");
    let token_path = token_file.path().display().to_string();
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
        "--cluster-ttl-secs",
        "3",
        "--host-capacity",
        "7",
    ];
    let mut d = Emberd::start(&args);
    let h = wait_for(&store, "host-a joins", |h| h.len() == 1).await;
    assert_eq!(h[0].id, "host-a");
    assert_eq!(h[0].endpoint, format!("http://{tcp}"));
    assert_eq!((h[0].capacity, h[0].running), (7, 0));

    // The API over TCP: only with the token.
    let health = format!("http://{tcp}/ember/v1/health");
    assert_eq!(curl_status(&health, Some(token)), 200);
    assert_eq!(curl_status(&health, None), 401);
    assert_eq!(curl_status(&health, Some("wrong-token-wrong-token")), 401);

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
