//! Live migration between two hosts: two emberds, each in a network
//! namespace of its own joined by a veth pair, each with its TCP API.
//! A function's warm instance counts its invocations in memory; the count
//! goes on across a migration (a fresh instance would start again at 1),
//! an invocation running when its host is drained completes, and a
//! destination that cannot be reached leaves the instance where it was.
//!
//! A second function mounts a volume (an ext4 volume of the volume
//! service, in `FileSystemConfigs`) and appends a line to a file on it
//! per invocation: across a migration both its memory (the count) and its
//! volume (the lines) go on, the attachment moves to the destination with
//! a new generation, and the source's old attachment can write no more.
//!
//! Each host builds each function's snapshot once (a guest boot each);
//! every instance after that is restored or migrated.
//!
//! Hosts speak mutual TLS only (one development CA). During the first
//! migration, strangers connect to the destination's migration port and
//! to the source's disk export port as soon as they open (plain TCP,
//! silent or with a made-up ticket; TLS without a client certificate;
//! with another CA's; with a certificate of the hosts' CA but no
//! ticket): the migration completes all the same, and none of them reads
//! a byte.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ember_tls::tokio_rustls::rustls;
use ember_tls::{dev_certs, TlsFiles};

use ember_tests::emberd::{provided_bootstrap_counting_into, write_file, zip_dir, Emberd, Reply};
use ember_tests::volumed::Volumed;
use ember_tests::{ip, is_root, kvm_available};
use serde_json::json;

const BUILD_TIMEOUT: Duration = Duration::from_secs(900);

/// The instances of `function` on `d` in pool list `which` (Idle, Busy).
fn instances(d: &Emberd, function: &str, which: &str) -> Vec<String> {
    d.pools()["Pools"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["FunctionName"] == function)
        .flat_map(|p| p[which].as_array().cloned().unwrap_or_default())
        .filter_map(|i| i["Id"].as_str().map(str::to_string))
        .collect()
}

fn count(r: &Reply) -> u64 {
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert!(r.header("x-amz-function-error").is_none(), "{v}");
    v["count"]
        .as_u64()
        .unwrap_or_else(|| panic!("no count in {v}"))
}

fn wait_until<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Migrates `id` from `from` to `to` (at `to_url`) and answers the report;
/// panics with both hosts' logs unless it succeeds.
fn migrate_ok(from: &Emberd, to: &Emberd, id: &str, to_url: &str) -> serde_json::Value {
    let r = migrate(from, id, to_url);
    assert_eq!(
        r.status,
        200,
        "{}\nsource:\n{}\ndestination:\n{}",
        r.text(),
        from.logs(),
        to.logs()
    );
    r.json()
}

/// Waits until `to` has the whole of a migration's disk (`rep`, the
/// migration's answer).
fn wait_disk_filled(to: &Emberd, rep: &serde_json::Value) {
    let mid = rep["MigrationId"].as_str().unwrap();
    wait_until(
        "B's copy of the /tmp disk",
        Duration::from_secs(120),
        || {
            let m = to.get(&format!("/ember/v1/migrations/{mid}")).json();
            (m["DiskFilled"] == true).then_some(())
        },
    );
}

fn migrate(d: &Emberd, id: &str, dest: &str) -> Reply {
    d.post_json(
        &format!("/ember/v1/instances/{id}/migrate"),
        &json!({"Destination": dest}),
    )
}

#[test]
fn instances_migrate_between_hosts_and_a_host_drains() {
    if !is_root() || !kvm_available() {
        eprintln!("SKIPPED: needs root (network namespaces, jails) and /dev/kvm");
        return;
    }
    let token = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(token.path(), "migration-test-token-0123456789").unwrap();
    let token_path = token.path().display().to_string();
    let tls_dir = tempfile::tempdir().unwrap();
    let tls_path = tls_dir.path().display().to_string();
    let vol_dir = tempfile::tempdir().unwrap();
    let vol = Volumed::start(vol_dir.path());
    let (st, v) = vol.call(
        "POST",
        "/v1/volumes",
        Some(
            r#"{"Name": "data", "SizeBytes": 67108864, "Filesystem": "ext4", "Account": "000000000000"}"#,
        ),
    );
    assert_eq!(st, 201, "{v}");
    // A volume of another account, which these hosts (account
    // 000000000000, the default) may not mount.
    let (st, v) = vol.call(
        "POST",
        "/v1/volumes",
        Some(r#"{"Name": "theirs", "SizeBytes": 1048576, "Account": "999988887777"}"#),
    );
    assert_eq!(st, 201, "{v}");
    let vol_api = vol.api.display().to_string();
    let pid = std::process::id();
    let net = format!("10.214.{}", (pid % 60) * 4);
    let (a_ip, b_ip) = (format!("{net}.1"), format!("{net}.2"));
    let (a_dev, b_dev) = (format!("emA{pid}"), format!("emB{pid}"));
    let args = |ip: &str| {
        vec![
            "--listen-tcp".to_string(),
            format!("{ip}:8600"),
            "--api-token-file".into(),
            token_path.clone(),
            "--tls-dev-dir".into(),
            tls_path.clone(),
            "--warm-instances".into(),
            "0".into(),
            "--host-id".into(),
            format!("host-{ip}"),
            "--idle-ttl-secs".into(),
            "1800".into(),
            "--volume-service".into(),
            vol_api.clone(),
        ]
    };
    let a_args = args(&a_ip);
    let a_args: Vec<&str> = a_args.iter().map(String::as_str).collect();
    // A's end of the link goes into A's namespace; B's waits here for B's.
    let a = Emberd::start_with(&a_args, |ns| {
        ip(&[
            "link", "add", &a_dev, "type", "veth", "peer", "name", &b_dev,
        ]);
        ip(&["link", "set", &a_dev, "netns", ns]);
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{a_ip}/30"),
            "dev",
            &a_dev,
        ]);
        ip(&["-n", ns, "link", "set", &a_dev, "up"]);
    });
    let b_args = args(&b_ip);
    let b_args: Vec<&str> = b_args.iter().map(String::as_str).collect();
    let mut b = Emberd::start_with(&b_args, |ns| {
        ip(&["link", "set", &b_dev, "netns", ns]);
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{b_ip}/30"),
            "dev",
            &b_dev,
        ]);
        ip(&["-n", ns, "link", "set", &b_dev, "up"]);
    });
    let (a_url, b_url) = (
        format!("https://{a_ip}:8600"),
        format!("https://{b_ip}:8600"),
    );
    let client = dev_certs(tls_dir.path(), "test-client", &["localhost".into()]).unwrap();

    let code = tempfile::tempdir().unwrap();
    write_file(
        &code.path().join("bootstrap"),
        &provided_bootstrap_counting_into("mig", "/tmp/log"),
        0o755,
    );
    assert!(!zip_dir(code.path()).is_empty());
    let keeper = tempfile::tempdir().unwrap();
    write_file(
        &keeper.path().join("bootstrap"),
        &provided_bootstrap_counting_into("keep", "/mnt/data/log"),
        0o755,
    );
    let t = Instant::now();
    for d in [&a, &b] {
        // /tmp on a local disk of its own (EphemeralStorage), which
        // migrations copy on demand after the switch.
        let r = d.post_json(
            "/2015-03-31/functions",
            &json!({"FunctionName": "counter", "Runtime": "provided.al2023", "Handler": "x",
                    "Code": {"ZipFile": zip_dir(code.path())}, "Timeout": 60, "MemorySize": 128,
                    "EphemeralStorage": {"Size": 512}}),
        );
        assert_eq!(r.status, 201, "{}", r.text());
        assert_eq!(r.json()["EphemeralStorage"]["Size"], 512);
        let r = d.post_json(
            "/2015-03-31/functions",
            &json!({"FunctionName": "keeper", "Runtime": "provided.al2023", "Handler": "x",
                    "Code": {"ZipFile": zip_dir(keeper.path())}, "Timeout": 60, "MemorySize": 128,
                    "FileSystemConfigs": [{"Arn": "arn:aws:ember:us-east-1:000000000000:volume/data",
                                           "LocalMountPath": "/mnt/data"}]}),
        );
        assert_eq!(r.status, 201, "{}", r.text());
        assert_eq!(
            r.json()["FileSystemConfigs"][0]["LocalMountPath"],
            "/mnt/data",
            "{}",
            r.text()
        );
    }
    let r = a.post_json(
        "/2015-03-31/functions",
        &json!({"FunctionName": "badfs", "Runtime": "provided.al2023", "Handler": "x",
                "Code": {"ZipFile": zip_dir(keeper.path())},
                "FileSystemConfigs": [{"Arn": "arn:aws:elasticfilesystem:us-east-1:000000000000:access-point/fsap-1",
                                       "LocalMountPath": "/mnt/data"}]}),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    // Another account's volume: by its ARN, or by its name under this
    // account's ARN, or the ARN's account this one with no such volume
    // of its own: each a clear 4xx, and no function is made.
    for (arn, status) in [
        ("arn:aws:ember:us-east-1:999988887777:volume/theirs", 403),
        ("arn:aws:ember:us-east-1:999988887777:volume/data", 403),
        ("arn:aws:ember:us-east-1:000000000000:volume/theirs", 403),
        ("arn:aws:ember:::volume/theirs", 403),
        ("arn:aws:ember:us-east-1:000000000000:volume/nosuch", 404),
    ] {
        let r = a.post_json(
            "/2015-03-31/functions",
            &json!({"FunctionName": "thief", "Runtime": "provided.al2023", "Handler": "x",
                    "Code": {"ZipFile": zip_dir(keeper.path())},
                    "FileSystemConfigs": [{"Arn": arn, "LocalMountPath": "/mnt/data"}]}),
        );
        eprintln!("CreateFunction with {arn}: {} {}", r.status, r.text());
        assert_eq!(r.status, status, "{arn}: {}", r.text());
    }
    assert_eq!(a.get("/2015-03-31/functions/thief").status, 404);
    for d in [&a, &b] {
        d.wait_active("counter", "$LATEST", BUILD_TIMEOUT);
        d.wait_active("keeper", "$LATEST", BUILD_TIMEOUT);
    }
    eprintln!(
        "both hosts snapshotted after {:.1} s",
        t.elapsed().as_secs_f64()
    );

    // A warm instance on A counts 1, 2, in memory and in /tmp/log on its
    // /tmp disk.
    let r = a.invoke("counter", &json!({}));
    assert_eq!(count(&r), 1);
    assert_eq!(r.json()["tmp_fs"], "ext4", "{}", r.text());
    assert_eq!(r.json()["lines"], 1, "{}", r.text());
    assert_eq!(count(&a.invoke("counter", &json!({}))), 2);
    let ids = instances(&a, "counter", "Idle");
    assert_eq!(ids.len(), 1, "{}", a.pools());
    let id = ids[0].clone();

    // Bad requests change nothing.
    let r = migrate(&a, "vm-nosuchinstance", &b_url);
    assert_eq!(r.status, 404, "{}", r.text());
    let r = migrate(&a, &id, "ftp://elsewhere");
    assert_eq!(r.status, 400, "{}", r.text());
    // Plain http:// to a peer is refused, not downgraded to.
    let r = migrate(&a, &id, &format!("http://{b_ip}:8600"));
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("https://"), "{}", r.text());
    let r = a.post_json(
        &format!("/ember/v1/instances/{id}/migrate"),
        &json!({"Destination": b_url, "Bogus": 1}),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    let r = a.request(
        "DELETE",
        &format!("/ember/v1/instances/{id}/migrate"),
        &[],
        None,
    );
    assert_eq!(r.status, 404, "not migrating: {}", r.text());
    // A destination that cannot be reached: the instance stays, counting.
    let r = migrate(&a, &id, &format!("https://{b_ip}:9"));
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(
        r.text().contains("runs here still") || r.text().contains("destination"),
        "{}",
        r.text()
    );
    assert_eq!(instances(&a, "counter", "Idle"), vec![id.clone()]);
    assert_eq!(count(&a.invoke("counter", &json!({}))), 3);
    // A wrong token at the destination's API is refused there.
    let r = b.in_netns(|| {
        Command::new("curl")
            .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST"])
            .arg("--cacert")
            .arg(&client.ca)
            .arg("--cert")
            .arg(&client.cert)
            .arg("--key")
            .arg(&client.key)
            .args(["-H", "Authorization: Bearer wrong-token-0123456789"])
            .args(["-d", "{}", &format!("{b_url}/ember/v1/migrations")])
            .output()
            .expect("curl")
    });
    assert_eq!(String::from_utf8_lossy(&r.stdout), "401");

    // A → B: the count goes on on B; nothing of it is left on A. Strangers
    // try the migration and disk ports meanwhile.
    let strangers = Strangers::new(tls_dir.path());
    let stop = AtomicBool::new(false);
    let rep = std::thread::scope(|s| {
        let (strangers, stop) = (&strangers, &stop);
        let (a, b, a_ip, b_ip) = (&a, &b, a_ip.as_str(), b_ip.as_str());
        let on_b = s.spawn(move || b.in_netns(|| strangers.watch(b_ip, "migration (B)", stop)));
        let on_a = s.spawn(move || a.in_netns(|| strangers.watch(a_ip, "disk export (A)", stop)));
        let rep = migrate_ok(a, b, &id, &b_url);
        // The disk is served until B's copy is whole.
        wait_disk_filled(b, &rep);
        stop.store(true, Ordering::SeqCst);
        on_a.join().expect("stranger A");
        on_b.join().expect("stranger B");
        rep
    });
    eprintln!("A -> B: {rep}");
    let table = strangers.table();
    eprintln!("{:<16} {:<6} {:<44} outcome", "port", "", "attempt");
    for (port, n, how, outcome) in &table {
        eprintln!("{port:<16} {n:<6} {how:<44} {outcome}");
    }
    let tried = |what: &str| table.iter().filter(|t| t.0.starts_with(what)).count();
    eprintln!(
        "stranger attempts: {} on the migration port, {} on the disk port; successes: {}",
        tried("migration"),
        tried("disk"),
        strangers.successes()
    );
    assert!(
        tried("disk") > 0,
        "the disk export port was never seen open"
    );
    assert_eq!(strangers.successes(), 0, "{table:?}");
    assert_eq!(rep["InstanceId"], id.as_str());
    assert!(rep["DowntimeMs"].as_u64().is_some(), "{rep}");
    assert!(rep["Bytes"].as_u64().unwrap_or(0) > 0, "{rep}");
    assert!(instances(&a, "counter", "Idle").is_empty(), "{}", a.pools());
    assert!(
        instances(&a, "counter", "Migrating").is_empty(),
        "{}",
        a.pools()
    );
    let moved = rep["DestinationInstanceId"].as_str().unwrap().to_string();
    assert_eq!(instances(&b, "counter", "Idle"), vec![moved.clone()]);
    let m = b.get("/ember/v1/migrations").json();
    assert_eq!(m["Migrations"][0]["State"], "Running", "{m}");
    // The /tmp disk came along: read on demand while it fills there.
    let r = b.invoke("counter", &json!({}));
    assert_eq!(count(&r), 4);
    assert_eq!(r.json()["lines"], 4, "{}", r.text());
    wait_disk_filled(&b, &rep);
    // The source lets its copy go once the destination has it all.
    wait_until(
        "A to drop its copy of the disk",
        Duration::from_secs(30),
        || {
            let left = std::fs::read_dir(a.dir.join("state/disks"))
                .map(|d| d.count())
                .unwrap_or(0);
            (left == 0).then_some(())
        },
    );

    // Drain B while an invocation runs there: it completes on B, then its
    // instance moves to A, and the count goes on there.
    let inflight = std::thread::scope(|s| {
        let call = s.spawn(|| b.invoke("counter", &json!({"sleep": 6})));
        wait_until("the invocation to run", Duration::from_secs(60), || {
            instances(&b, "counter", "Busy").first().cloned()
        });
        let r = b.post_json("/ember/v1/drain", &json!({"Destination": a_url}));
        assert_eq!(r.status, 200, "{}\nB:\n{}", r.text(), b.logs());
        let rep = r.json();
        eprintln!("drain B: {rep}");
        assert_eq!(rep["Migrated"].as_array().map(Vec::len), Some(1), "{rep}");
        assert_eq!(rep["Failed"], json!([]), "{rep}");
        assert_eq!(rep["Remaining"], 0, "{rep}");
        assert!(
            rep["Migrated"][0]["WaitedForInvocationMs"]
                .as_u64()
                .unwrap_or(0)
                > 0
        );
        call.join().expect("invoke")
    });
    assert_eq!(count(&inflight), 5);
    assert_eq!(b.get("/ember/v1/health").json()["Draining"], true);
    assert_eq!(instances(&a, "counter", "Idle").len(), 1, "{}", a.pools());
    assert_eq!(count(&a.invoke("counter", &json!({}))), 6);
    let r = b.request("DELETE", "/ember/v1/drain", &[], None);
    assert_eq!(r.status, 204, "{}", r.text());
    assert_eq!(b.get("/ember/v1/health").json()["Draining"], false);

    // The volume's function: memory and volume both go on across hosts.
    let lines_and_count = |r: &Reply| {
        let c = count(r);
        (r.json()["lines"].as_u64().unwrap(), c)
    };
    assert_eq!(lines_and_count(&a.invoke("keeper", &json!({}))), (1, 1));
    assert_eq!(lines_and_count(&a.invoke("keeper", &json!({}))), (2, 2));
    let attached = |host: &str| {
        let (st, v) = vol.call("GET", "/v1/volumes/data", None);
        assert_eq!(st, 200, "{v}");
        assert_eq!(v["Attachment"]["Host"], host, "{v}");
        v["Attachment"]["Generation"].as_u64().unwrap_or(0)
    };
    let gen_a = attached(&format!("host-{a_ip}"));
    // While A holds the volume, B cannot start an instance with it.
    let r = b.invoke("keeper", &json!({}));
    assert_ne!(r.status, 200, "{}", r.text());
    assert!(r.text().contains("attached"), "{}", r.text());
    let id = instances(&a, "keeper", "Idle")[0].clone();
    eprintln!("keeper A -> B: {}", migrate_ok(&a, &b, &id, &b_url));
    let gen_b = attached(&format!("host-{b_ip}"));
    assert!(gen_b > gen_a, "{gen_a} -> {gen_b}");
    assert_eq!(lines_and_count(&b.invoke("keeper", &json!({}))), (3, 3));
    // The source's attachment is fenced. Its credential stayed in hostd
    // (the volume service never shows it); a guess from the generation
    // is refused like any other.
    let (_, v) = vol.call("GET", "/v1/volumes/data", None);
    assert!(v["Attachment"].get("Credential").is_none(), "{v}");
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write 0 4096"])
        .arg(format!(
            "nbd+unix:///data@{gen_a}?socket={}",
            vol.nbd.display()
        ))
        .output()
        .expect("qemu-io");
    let said =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    eprintln!("a write with the old token: {}", said.trim());
    assert!(
        !out.status.success() || said.contains("failed") || said.contains("error"),
        "a write with the old token went through: {said}"
    );
    // And A may not start it again while B holds the volume.
    let r = a.invoke("keeper", &json!({}));
    assert_ne!(r.status, 200, "{}", r.text());
    assert_eq!(lines_and_count(&b.invoke("keeper", &json!({}))), (4, 4));

    // The destination host gone: the migration fails, A keeps the instance.
    b.stop();
    let id = instances(&a, "counter", "Idle")[0].clone();
    let r = migrate(&a, &id, &b_url);
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(count(&a.invoke("counter", &json!({}))), 7);
}

/// Strangers at a host's ports: each port that opens on the host's address
/// (other than the API's) is tried in every way below, once, at once.
struct Strangers {
    /// Trusts the hosts' CA, presents no certificate.
    anonymous: Arc<rustls::ClientConfig>,
    /// Trusts the hosts' CA, presents another CA's certificate.
    other_ca: Arc<rustls::ClientConfig>,
    /// A certificate of the hosts' CA, but no ticket.
    insider: Arc<rustls::ClientConfig>,
    /// (which port, port, attempt, outcome).
    seen: Mutex<Vec<(String, String, String, String)>>,
}

fn client_config(files: &TlsFiles, present: bool) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(&files.ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let b = rustls::ClientConfig::builder_with_provider(ember_tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    Arc::new(if present {
        let certs = CertificateDer::pem_file_iter(&files.cert)
            .unwrap()
            .map(Result::unwrap)
            .collect();
        b.with_client_auth_cert(certs, PrivateKeyDer::from_pem_file(&files.key).unwrap())
            .unwrap()
    } else {
        b.with_no_client_auth()
    })
}

impl Strangers {
    fn new(hosts_ca_dir: &Path) -> Strangers {
        let names = ["localhost".to_string()];
        let insider = dev_certs(hosts_ca_dir, "insider", &names).unwrap();
        let other_dir = tempfile::tempdir().unwrap();
        let mut other = dev_certs(other_dir.path(), "stranger", &names).unwrap();
        other.ca = insider.ca.clone();
        Strangers {
            anonymous: client_config(&insider, false),
            other_ca: client_config(&other, true),
            insider: client_config(&insider, true),
            seen: Mutex::new(Vec::new()),
        }
    }

    /// Listening ports on `ip` in this thread's network namespace.
    fn ports(ip: &str) -> BTreeSet<u16> {
        let want = u32::from(ip.parse::<std::net::Ipv4Addr>().unwrap()).swap_bytes();
        let want = format!("{want:08X}");
        let table = std::fs::read_to_string("/proc/thread-self/net/tcp").unwrap_or_default();
        table
            .lines()
            .skip(1)
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                let (addr, port) = f.get(1)?.split_once(':')?;
                (f.get(3) == Some(&"0A") && addr == want)
                    .then(|| u16::from_str_radix(port, 16).ok())
                    .flatten()
            })
            .filter(|p| *p != 8600)
            .collect()
    }

    /// Until `stop`: every new port on `ip` gets every attempt.
    fn watch(&self, ip: &str, what: &str, stop: &AtomicBool) {
        let mut done = BTreeSet::new();
        std::thread::scope(|s| {
            while !stop.load(Ordering::SeqCst) {
                for port in Self::ports(ip) {
                    if done.insert(port) {
                        let addr = format!("{ip}:{port}");
                        s.spawn(move || self.attack(&addr, what, stop));
                    }
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        });
    }

    fn record(&self, what: &str, addr: &str, how: &str, r: Result<usize, String>) {
        let port = addr.rsplit(':').next().unwrap_or("").to_string();
        let mut outcome = match r {
            Ok(0) => "closed, read nothing".to_string(),
            Ok(n) => format!("READ {n} BYTES"),
            Err(e) => format!("refused: {e}"),
        };
        outcome.truncate(80);
        self.seen
            .lock()
            .unwrap()
            .push((what.to_string(), port, how.to_string(), outcome));
    }

    fn attack(&self, addr: &str, what: &str, stop: &AtomicBool) {
        std::thread::scope(|s| {
            // A silent connection held while the migration goes on (the
            // port took one connection before: this one would have ended it).
            s.spawn(|| {
                let r = TcpStream::connect(addr)
                    .map_err(|e| e.to_string())
                    .map(|mut t| {
                        t.set_read_timeout(Some(Duration::from_millis(200))).ok();
                        let mut b = [0u8; 64];
                        let mut total = 0;
                        while !stop.load(Ordering::SeqCst) {
                            match t.read(&mut b) {
                                Ok(0) => break,
                                Ok(n) => total += n,
                                Err(e)
                                    if e.kind() == std::io::ErrorKind::WouldBlock
                                        || e.kind() == std::io::ErrorKind::TimedOut => {}
                                Err(_) => break,
                            }
                        }
                        total
                    });
                self.record(what, addr, "plain TCP, silent, held open", r);
            });
            s.spawn(|| {
                let r = plain_with_ticket(addr);
                self.record(what, addr, "plain TCP + a made-up ticket", r);
            });
            for (how, cfg) in [
                ("TLS without a client certificate", &self.anonymous),
                ("TLS with another CA's certificate", &self.other_ca),
                ("TLS with the hosts' CA's cert, wrong ticket", &self.insider),
            ] {
                s.spawn(move || {
                    let r = tls_with_ticket(addr, cfg.clone());
                    self.record(what, addr, how, r);
                });
            }
        });
    }

    fn table(&self) -> Vec<(String, String, String, String)> {
        let mut t = self.seen.lock().unwrap().clone();
        t.sort();
        t
    }

    fn successes(&self) -> usize {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.3.contains("READ"))
            .count()
    }
}

/// Reads what comes back within 15 s (or until closed).
fn read_some(s: &mut impl Read) -> Result<usize, String> {
    let mut b = [0u8; 256];
    let mut total = 0;
    loop {
        match s.read(&mut b) {
            Ok(0) => return Ok(total),
            Ok(n) => total += n,
            Err(_) if total > 0 => return Ok(total),
            Err(e) => return Err(e.to_string()),
        }
    }
}

fn plain_with_ticket(addr: &str) -> Result<usize, String> {
    let mut t = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    t.set_read_timeout(Some(Duration::from_secs(15))).ok();
    t.write_all(b"0123456789abcdef0123456789abcdef")
        .map_err(|e| e.to_string())?;
    let mut b = [0u8; 8];
    // A TLS alert (the answer of a TLS port to plain bytes) is no data.
    match t.peek(&mut b) {
        Ok(n) if (1..=7).contains(&n) && b[0] == 0x15 => {
            return Err(format!("a TLS alert ({n} bytes), closed"))
        }
        _ => {}
    }
    read_some(&mut t)
}

fn tls_with_ticket(addr: &str, cfg: Arc<rustls::ClientConfig>) -> Result<usize, String> {
    let ip: std::net::IpAddr = addr.rsplit_once(':').unwrap().0.parse().unwrap();
    let conn = rustls::ClientConnection::new(cfg, rustls::pki_types::ServerName::from(ip))
        .map_err(|e| e.to_string())?;
    let t = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    t.set_read_timeout(Some(Duration::from_secs(15))).ok();
    let mut s = rustls::StreamOwned::new(conn, t);
    s.write_all(b"0123456789abcdef0123456789abcdef")
        .map_err(|e| e.to_string())?;
    read_some(&mut s)
}
