//! A function's volume from a volume service on another host, end to end:
//! `ember-volumed` serves NBD only inside mutual TLS on an address of the
//! machine's namespace (no unix socket: as seen from emberd it is another
//! host), emberd runs in a namespace of its own joined to it by a veth
//! pair, with its TLS identity from the same development CA. A function
//! mounting the volume appends a line per invocation to a file on it: the
//! jailed VMM speaks plain NBD to hostd's forwarder, which opens the
//! service's `nbds://` port with `NBD_OPT_STARTTLS` and its certificate.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ember_tests::artifacts::workspace_bin;
use ember_tests::emberd::{provided_bootstrap_counting_into, write_file, zip_dir, Emberd};
use ember_tests::{ip, is_root, kvm_available};
use serde_json::json;

const BUILD_TIMEOUT: Duration = Duration::from_secs(900);

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One call to the volume service's API: (status, body).
fn call(api: &Path, method: &str, path: &str, body: &str) -> (u16, serde_json::Value) {
    let out = Command::new("curl")
        .args(["-sS", "-X", method, "--unix-socket"])
        .arg(api)
        .args(["-w", "\n%{http_code}"])
        .args(["-H", "Content-Type: application/json", "-d", body])
        .arg(format!("http://v{path}"))
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').expect("status line");
    (
        code.trim().parse().expect("status"),
        serde_json::from_str(body).unwrap_or(serde_json::Value::Null),
    )
}

#[test]
fn a_function_mounts_a_volume_of_another_host_over_tls() {
    if !is_root() || !kvm_available() {
        eprintln!("SKIPPED: needs root (network namespaces, jails) and /dev/kvm");
        return;
    }
    let token = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(token.path(), "volume-tls-test-token-0123456789").unwrap();
    let tls_dir = tempfile::tempdir().unwrap();
    let tls_path = tls_dir.path().display().to_string();
    let vol_dir = tempfile::tempdir().unwrap();
    let api = vol_dir.path().join("api.sock");
    let pid = std::process::id();
    let net = format!("10.215.{}", (pid % 60) * 4);
    let (host_ip, service_ip) = (format!("{net}.1"), format!("{net}.2"));
    let (h_dev, s_dev) = (format!("evH{pid}"), format!("evS{pid}"));
    let d = Emberd::start_with(
        &[
            "--listen-tcp",
            &format!("{host_ip}:8600"),
            "--api-token-file",
            &token.path().display().to_string(),
            "--tls-dev-dir",
            &tls_path,
            "--warm-instances",
            "0",
            "--host-id",
            "h1",
            "--volume-service",
            &api.display().to_string(),
        ],
        |ns| {
            ip(&[
                "link", "add", &h_dev, "type", "veth", "peer", "name", &s_dev,
            ]);
            ip(&["link", "set", &h_dev, "netns", ns]);
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{host_ip}/30"),
                "dev",
                &h_dev,
            ]);
            ip(&["-n", ns, "link", "set", &h_dev, "up"]);
            ip(&["addr", "add", &format!("{service_ip}/30"), "dev", &s_dev]);
            ip(&["link", "set", &s_dev, "up"]);
        },
    );
    // The root end of the link goes with the namespace; remove it anyway.
    struct Link(String);
    impl Drop for Link {
        fn drop(&mut self) {
            let _ = Command::new("ip")
                .args(["link", "del", &self.0])
                .stderr(Stdio::null())
                .status();
        }
    }
    let _link = Link(s_dev.clone());
    let port = std::net::TcpListener::bind((service_ip.as_str(), 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let log = vol_dir.path().join("volumed.log");
    let _volumed = Kill(
        Command::new(workspace_bin("ember-volumed"))
            .arg("--nbd-listen")
            .arg(format!("{service_ip}:{port}"))
            .args(["--tls-dev-dir", &tls_path, "--tls-name", "volumed"])
            .arg("--data-dir")
            .arg(vol_dir.path().join("data"))
            .arg("--api-socket")
            .arg(&api)
            .env("RUST_LOG", "info")
            .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
            .spawn()
            .expect("ember-volumed"),
    );
    let start = Instant::now();
    while !api.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "ember-volumed did not start: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (st, v) = call(
        &api,
        "POST",
        "/v1/volumes",
        r#"{"Name": "data", "SizeBytes": 67108864, "Filesystem": "ext4", "Account": "000000000000"}"#,
    );
    assert_eq!(st, 201, "{v}");

    let code = tempfile::tempdir().unwrap();
    write_file(
        &code.path().join("bootstrap"),
        &provided_bootstrap_counting_into("keep", "/mnt/data/log"),
        0o755,
    );
    let r = d.post_json(
        "/2015-03-31/functions",
        &json!({"FunctionName": "keeper", "Runtime": "provided.al2023", "Handler": "x",
                "Code": {"ZipFile": zip_dir(code.path())}, "Timeout": 60, "MemorySize": 128,
                "FileSystemConfigs": [{"Arn": "arn:aws:ember:us-east-1:000000000000:volume/data",
                                       "LocalMountPath": "/mnt/data"}]}),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    d.wait_active("keeper", "$LATEST", BUILD_TIMEOUT);
    let tail = || {
        let l = d.logs();
        l.get(l.len().saturating_sub(4000)..)
            .unwrap_or(&l)
            .to_string()
    };
    for want in 1..=2 {
        let r = d.invoke("keeper", &json!({}));
        assert_eq!(r.status, 200, "{}\n{}", r.text(), tail());
        assert_eq!(r.json()["lines"], want, "{}\n{}", r.text(), tail());
    }
    let (st, g) = call(&api, "GET", "/v1/volumes/data", "");
    assert_eq!(st, 200, "{g}");
    assert_eq!(g["Attachment"]["Host"], "h1", "{g}");
    // The VMM's NBD reached the service over TCP from emberd's address,
    // inside TLS (the port serves nothing else).
    let vlog = std::fs::read_to_string(&log).unwrap();
    let served: Vec<&str> = vlog
        .lines()
        .filter(|l| l.contains(&format!("nbd {host_ip}:")) && l.contains("serving data"))
        .collect();
    eprintln!("volume service: {served:#?}");
    assert!(!served.is_empty(), "{vlog}");
    assert!(vlog.contains("TLS required"), "{vlog}");
}
