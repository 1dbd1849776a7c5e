//! NBD across hosts inside mutual TLS, with real TLS and unmodified NBD
//! tools on both sides:
//! - `ember-volumed` with TLS settings against `nbdinfo` (libnbd) and
//!   `qemu-img`/`qemu-io` (GnuTLS): a client with a certificate of the CA
//!   reads and writes a volume over `nbds://`; a client without a
//!   certificate, with one of another CA, trusting another CA, or in the
//!   clear gets nothing (the tools exit non-zero), and the service goes on
//!   serving. Raw negotiation checks the protocol's FORCEDTLS rules.
//! - Ember's STARTTLS client against `nbdkit --tls=require` and
//!   `qemu-nbd --tls-creds` (both verifying the client's certificate):
//!   it works with the CA's identity and fails cleanly with another's.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use ember_nbd::*;
use ember_tests::volumed::Volumed;
use ember_tls::{dev_certs, Tls, TlsFiles};
use ember_volumed::nbd::client::Client;

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn link(from: &Path, to: &Path) {
    let _ = std::fs::remove_file(to);
    std::fs::copy(from, to).unwrap();
}

/// A directory as GnuTLS-based tools read it: `ca-cert.pem` (the CA they
/// trust), and `PREFIX-cert.pem`/`PREFIX-key.pem` (their identity, if any).
fn tool_dir(dir: &Path, trust: &Path, identity: Option<(&TlsFiles, &str)>) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    link(trust, &dir.join("ca-cert.pem"));
    if let Some((f, prefix)) = identity {
        link(&f.cert, &dir.join(format!("{prefix}-cert.pem")));
        link(&f.key, &dir.join(format!("{prefix}-key.pem")));
    }
    dir.to_path_buf()
}

/// The certificates of one test: ours (a CA, the service's and a client's)
/// and another CA's (a client's, and a stranger server's).
struct Certs {
    service: TlsFiles,
    client: TlsFiles,
    other: TlsFiles,
}

impl Certs {
    /// A client with another CA's certificate that trusts our CA (so the
    /// server's check of the client is what is tried).
    fn theirs(&self) -> Tls {
        Tls::load(&TlsFiles {
            cert: self.other.cert.clone(),
            key: self.other.key.clone(),
            ca: self.service.ca.clone(),
        })
        .unwrap()
    }
}

fn certs(dir: &Path) -> Certs {
    let sans = ["127.0.0.1".to_string(), "localhost".to_string()];
    Certs {
        service: dev_certs(&dir.join("ours"), "volumed", &sans).unwrap(),
        client: dev_certs(&dir.join("ours"), "client", &sans).unwrap(),
        other: dev_certs(&dir.join("theirs"), "client", &sans).unwrap(),
    }
}

fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)
}

fn create_and_attach(v: &Volumed, name: &str) -> (String, String) {
    let (st, b) = v.call(
        "POST",
        "/v1/volumes",
        Some(&format!(r#"{{"Name":"{name}","SizeBytes":1048576}}"#)),
    );
    assert_eq!(st, 201, "{b}");
    let (st, g) = v.call(
        "POST",
        &format!("/v1/volumes/{name}/attach"),
        Some(r#"{"Host":"h1"}"#),
    );
    assert_eq!(st, 200, "{g}");
    (
        g["ExportName"].as_str().unwrap().to_string(),
        g["Uri"].as_str().unwrap_or_default().to_string(),
    )
}

/// A raw negotiation in the clear: the greeting read, the flags sent.
fn raw(port: u16) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let greeting = ServerGreeting::read(&mut s).unwrap();
    assert_ne!(greeting.flags & FLAG_FIXED_NEWSTYLE, 0);
    s.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())
        .unwrap();
    s
}

fn send_option(s: &mut TcpStream, option: u32, data: &[u8]) {
    write_option(s, option, data).unwrap();
}

/// One option reply's type and message, or None if the server closed.
fn reply(s: &mut TcpStream, option: u32) -> Option<(u32, String)> {
    let reply = match OptionReply::read_for(s, option) {
        Ok(r) => r,
        Err(e) if e.is_transport() => return None,
        Err(e) => panic!("{e}"),
    };
    Some((
        reply.reply,
        String::from_utf8_lossy(&reply.data).into_owned(),
    ))
}

fn go_data(export: &str) -> Vec<u8> {
    let go = GoRequest {
        export: export.to_string(),
        info_requests: vec![],
    };
    go.encode().unwrap()
}

/// Whether the server ends the connection (EOF or reset) within 30 s.
fn closed(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 64];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return false,
            Err(_) => return true,
        }
    }
}

/// The volume service on 127.0.0.1 with TLS required, against unmodified
/// clients and raw negotiation; every attempt without the CA's client
/// certificate is counted, and none may get anything.
#[test]
fn volumed_over_tls_serves_only_clients_with_the_cas_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let c = certs(&dir.path().join("certs"));
    let v = Volumed::start_with(
        dir.path(),
        &[
            "--tls-cert",
            c.service.cert.to_str().unwrap(),
            "--tls-key",
            c.service.key.to_str().unwrap(),
            "--tls-ca",
            c.service.ca.to_str().unwrap(),
            "--nbd-handshake-timeout-ms",
            "3000",
        ],
    );
    let (export, uri) = create_and_attach(&v, "vol");
    // TLS URIs: libnbd's scheme.
    assert_eq!(uri, format!("nbds://127.0.0.1:{}/{export}", v.port));
    let image = v.image("vol");
    let pattern_at = |byte: u8| -> bool {
        let data = std::fs::read(&image).unwrap();
        data[..65536].iter().all(|b| *b == byte)
    };
    let ours = Tls::load(&c.client).unwrap();
    let theirs = c.theirs();

    // Ember's own client with the CA's certificate: reads and writes.
    let mut cl = Client::connect_tcp_tls(&format!("127.0.0.1:{}", v.port), &export, &ours)
        .expect("our client over TLS");
    assert_eq!(cl.size, 1 << 20);
    assert_eq!(cl.write(4096, &[0x11; 512]).unwrap().error, 0);
    assert_eq!(cl.read(4096, 512).unwrap().data, vec![0x11; 512]);
    cl.disconnect().unwrap();

    let mut attempts = 0;
    let mut got_through = 0;
    let mut count = |what: &str, ok: bool, detail: String| {
        attempts += 1;
        eprintln!(
            "{what}: {} ({})",
            if ok { "GOT THROUGH" } else { "refused" },
            detail.trim().lines().last().unwrap_or("")
        );
        if ok {
            got_through += 1;
        }
    };

    // Raw negotiation in the clear (FORCEDTLS): every option but STARTTLS
    // and ABORT is answered NBD_REP_ERR_TLS_REQD, and the connection stays.
    let mut s = raw(v.port);
    for (opt, data) in [
        (OPT_GO, go_data(&export)),
        (OPT_INFO, go_data(&export)),
        (OPT_LIST, vec![]),
        (99, vec![1, 2, 3]),
    ] {
        send_option(&mut s, opt, &data);
        let r = reply(&mut s, opt).expect("an answer, not a close");
        assert_eq!(r.0, REP_ERR_TLS_REQD, "option {opt}: {r:?}");
        count(
            &format!("option {opt} in the clear"),
            r.0 & REP_FLAG_ERROR == 0,
            r.1,
        );
    }
    send_option(&mut s, OPT_ABORT, &[]);
    assert_eq!(reply(&mut s, OPT_ABORT).map(|r| r.0), Some(REP_ACK));
    // NBD_OPT_EXPORT_NAME in the clear cannot be refused by a reply: the
    // server ends the session.
    let mut s = raw(v.port);
    send_option(&mut s, OPT_EXPORT_NAME, export.as_bytes());
    let mut b = [0u8; ExportNameReply::LEN];
    let opened = s.read_exact(&mut b).is_ok();
    count("NBD_OPT_EXPORT_NAME in the clear", opened, String::new());
    // STARTTLS with data is invalid; then STARTTLS, ACK, and clear text
    // instead of a TLS handshake: closed.
    let mut s = raw(v.port);
    send_option(&mut s, OPT_STARTTLS, &[0]);
    assert_eq!(
        reply(&mut s, OPT_STARTTLS).map(|r| r.0),
        Some(REP_ERR_INVALID)
    );
    send_option(&mut s, OPT_STARTTLS, &[]);
    assert_eq!(reply(&mut s, OPT_STARTTLS).map(|r| r.0), Some(REP_ACK));
    send_option(&mut s, OPT_GO, &go_data(&export));
    assert!(closed(&mut s), "clear text after STARTTLS is not served");
    // STARTTLS, then silence: closed by the handshake deadline.
    let mut s = raw(v.port);
    send_option(&mut s, OPT_STARTTLS, &[]);
    assert_eq!(reply(&mut s, OPT_STARTTLS).map(|r| r.0), Some(REP_ACK));
    assert!(closed(&mut s), "a silent TLS handshake is closed");

    // Ember's client: in the clear, and with another CA's certificate.
    let r = Client::connect_tcp(&format!("127.0.0.1:{}", v.port), &export);
    count(
        "our client in the clear",
        r.is_ok(),
        r.err().map(|e| e.to_string()).unwrap_or_default(),
    );
    let r = Client::connect_tcp_tls(&format!("127.0.0.1:{}", v.port), &export, &theirs);
    count(
        "our client with another CA's certificate",
        r.is_ok(),
        r.err().map(|e| e.to_string()).unwrap_or_default(),
    );

    // Unmodified clients. Directories as libnbd and qemu read them.
    let tools = dir.path().join("tools");
    let good = tool_dir(
        &tools.join("good"),
        &c.service.ca,
        Some((&c.client, "client")),
    );
    let no_cert = tool_dir(&tools.join("no-cert"), &c.service.ca, None);
    let other_ca_cert = tool_dir(
        &tools.join("other-ca-cert"),
        &c.service.ca,
        Some((&c.other, "client")),
    );
    let trusts_other = tool_dir(
        &tools.join("trusts-other"),
        &c.other.ca,
        Some((&c.client, "client")),
    );
    let base = format!("nbds://127.0.0.1:{}/{export}", v.port);
    if have("nbdinfo") {
        let nbdinfo = |uri: String| {
            Command::new("timeout")
                .args(["60", "nbdinfo"])
                .arg(uri)
                .output()
                .unwrap()
        };
        let o = nbdinfo(format!("{base}?tls-certificates={}", good.display()));
        assert!(o.status.success(), "{}", text(&o));
        assert!(text(&o).contains("1048576"), "{}", text(&o));
        eprintln!("nbdinfo with the CA's certificate: ok");
        for (what, d) in [
            ("no client certificate", &no_cert),
            ("another CA's client certificate", &other_ca_cert),
            ("trusting another CA", &trusts_other),
        ] {
            let o = nbdinfo(format!("{base}?tls-certificates={}", d.display()));
            count(&format!("nbdinfo, {what}"), o.status.success(), text(&o));
        }
        let o = nbdinfo(format!("nbd://127.0.0.1:{}/{export}", v.port));
        count("nbdinfo in the clear", o.status.success(), text(&o));
    } else {
        eprintln!("nbdinfo skipped: not installed (package libnbd-bin)");
    }
    if have("qemu-io") {
        let qemu_io = |creds: Option<&Path>, cmds: &[&str]| {
            let mut c = Command::new("timeout");
            c.args(["60", "qemu-io"]);
            let mut opts = format!(
                "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={},export={export}",
                v.port
            );
            if let Some(d) = creds {
                c.arg("--object").arg(format!(
                    "tls-creds-x509,id=t,dir={},endpoint=client",
                    d.display()
                ));
                opts.push_str(",tls-creds=t");
            }
            c.arg("--image-opts").arg(opts);
            for cmd in cmds {
                c.args(["-c", cmd]);
            }
            c.output().unwrap()
        };
        let o = qemu_io(Some(&good), &["write -P 0x5a 0 64k", "read -P 0x5a 0 64k"]);
        assert!(o.status.success(), "{}", text(&o));
        assert!(text(&o).contains("read 65536/65536"), "{}", text(&o));
        assert!(!text(&o).contains("Pattern verification failed"));
        assert!(pattern_at(0x5a), "qemu-io's write is on the volume");
        eprintln!("qemu-io with the CA's certificate: wrote and read 64 KiB");
        for (what, d) in [
            ("no client certificate", Some(&no_cert)),
            ("another CA's client certificate", Some(&other_ca_cert)),
            ("trusting another CA", Some(&trusts_other)),
            ("in the clear", None),
        ] {
            let o = qemu_io(d.map(|p| p.as_path()), &["write -P 0xee 0 64k"]);
            let wrote = o.status.success() && text(&o).contains("wrote 65536/65536");
            count(&format!("qemu-io write, {what}"), wrote, text(&o));
        }
        assert!(pattern_at(0x5a), "no refused client wrote anything");
        let o = Command::new("timeout")
            .args(["60", "qemu-img", "info", "--object"])
            .arg(format!(
                "tls-creds-x509,id=t,dir={},endpoint=client",
                good.display()
            ))
            .arg("--image-opts")
            .arg(format!(
                "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={},export={export},tls-creds=t",
                v.port
            ))
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", text(&o));
        assert!(text(&o).contains("1 MiB"), "{}", text(&o));
    } else {
        eprintln!("qemu-io skipped: not installed (package qemu-utils)");
    }

    // After every refusal the service still serves the CA's clients.
    let mut cl = Client::connect_tcp_tls(&format!("127.0.0.1:{}", v.port), &export, &ours)
        .expect("still serving");
    assert_eq!(cl.read(0, 512).unwrap().data, vec![0x5a; 512]);
    let log = std::fs::read_to_string(&v.log).unwrap();
    assert!(log.contains("TLS handshake"), "refusals are logged");
    assert!(!log.contains(export.split('@').nth(1).unwrap()));
    eprintln!("{attempts} attempts without the CA's client certificate, {got_through} got through");
    assert_eq!(got_through, 0);
}

/// Without TLS settings the service refuses to serve NBD in the clear on
/// a non-loopback address, unless told to; on loopback it serves as ever.
#[test]
fn plaintext_nbd_off_loopback_needs_an_explicit_flag() {
    let dir = tempfile::tempdir().unwrap();
    let run = |extra: &[&str]| {
        let mut c = Command::new(ember_tests::artifacts::workspace_bin("ember-volumed"));
        c.arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--api-socket")
            .arg(dir.path().join("api.sock"))
            .args(extra);
        c
    };
    let o = run(&["--nbd-listen", "0.0.0.0:0"]).output().unwrap();
    assert!(!o.status.success());
    assert!(
        text(&o).contains("--nbd-insecure-plaintext"),
        "{}",
        text(&o)
    );
    // With the flag it starts (and serves until killed).
    let mut child: Child = run(&["--nbd-listen", "0.0.0.0:0", "--nbd-insecure-plaintext"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !dir.path().join("api.sock").exists() {
        assert!(child.try_wait().unwrap().is_none(), "it exited");
        assert!(start.elapsed() < Duration::from_secs(20), "did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    // TLS and plaintext exclude each other.
    let tls_dir = dir.path().join("tls");
    let o = run(&[
        "--nbd-listen",
        "0.0.0.0:0",
        "--nbd-insecure-plaintext",
        "--tls-dev-dir",
        tls_dir.to_str().unwrap(),
    ])
    .output()
    .unwrap();
    assert!(!o.status.success(), "{}", text(&o));
}

/// A server that is not ours: `nbdkit` or `qemu-nbd` on a free loopback
/// port, killed when dropped.
struct Server(Child, u16);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A file for a server's stderr.
fn log_file(dir: &Path, name: &str) -> (Stdio, PathBuf) {
    let p = dir.join(format!("{name}.log"));
    (Stdio::from(std::fs::File::create(&p).unwrap()), p)
}

fn wait_listening(s: &mut Server, log: &Path) {
    let start = Instant::now();
    while TcpStream::connect(("127.0.0.1", s.1)).is_err() {
        assert!(
            s.0.try_wait().unwrap().is_none(),
            "the server exited: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        assert!(start.elapsed() < Duration::from_secs(20), "no listener");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Ember's STARTTLS client against unmodified TLS servers that require a
/// client certificate: with the CA's identity it reads and writes; with
/// another CA's certificate, or trusting another CA, it fails cleanly.
#[test]
fn our_starttls_client_against_nbdkit_and_qemu_nbd() {
    let dir = tempfile::tempdir().unwrap();
    let c = certs(&dir.path().join("certs"));
    let server_dir = tool_dir(
        &dir.path().join("server"),
        &c.service.ca,
        Some((&c.service, "server")),
    );
    let ours = Tls::load(&c.client).unwrap();
    let theirs = c.theirs();
    // Our certificate, but trusting the other CA: the server is a stranger.
    let distrustful = Tls::load(&TlsFiles {
        cert: c.client.cert.clone(),
        key: c.client.key.clone(),
        ca: c.other.ca.clone(),
    })
    .unwrap();
    let mut servers: Vec<(&str, Server, &str, PathBuf)> = Vec::new();
    if have("nbdkit") {
        let port = free_port();
        let child = Command::new("nbdkit")
            .args(["-f", "--exit-with-parent", "-i", "127.0.0.1", "-p"])
            .arg(port.to_string())
            .args(["--tls=require", "--tls-verify-peer"])
            .arg(format!("--tls-certificates={}", server_dir.display()))
            .args(["memory", "64M"])
            .stderr(log_file(dir.path(), "nbdkit").0)
            .spawn()
            .unwrap();
        let log = dir.path().join("nbdkit.log");
        servers.push(("nbdkit", Server(child, port), "", log));
    } else {
        eprintln!("nbdkit skipped: not installed");
    }
    if have("qemu-nbd") {
        let port = free_port();
        let img = dir.path().join("disk.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(64 << 20)
            .unwrap();
        let child = Command::new("qemu-nbd")
            .arg("--object")
            .arg(format!(
                "tls-creds-x509,id=t,dir={},endpoint=server,verify-peer=on",
                server_dir.display()
            ))
            .args(["--tls-creds", "t", "-f", "raw", "-x", "disk", "-t"])
            .args(["-b", "127.0.0.1", "-p"])
            .arg(port.to_string())
            .arg(&img)
            .stderr(log_file(dir.path(), "qemu-nbd").0)
            .spawn()
            .unwrap();
        let log = dir.path().join("qemu-nbd.log");
        servers.push(("qemu-nbd", Server(child, port), "disk", log));
    } else {
        eprintln!("qemu-nbd skipped: not installed");
    }
    let mut got_through = 0;
    for (what, server, export, log) in &mut servers {
        wait_listening(server, log);
        let addr = format!("127.0.0.1:{}", server.1);
        let mut cl = Client::connect_tcp_tls(&addr, export, &ours)
            .unwrap_or_else(|e| panic!("{what} with the CA's identity: {e}"));
        assert_eq!(cl.size, 64 << 20);
        assert_eq!(cl.write(8192, &[0xa7; 4096]).unwrap().error, 0);
        assert_eq!(cl.read(8192, 4096).unwrap().data, vec![0xa7; 4096]);
        cl.disconnect().unwrap();
        eprintln!("{what}: our client with the CA's identity wrote and read 4 KiB");
        for (how, tls) in [
            ("another CA's certificate", &theirs),
            ("trusting another CA", &distrustful),
        ] {
            match Client::connect_tcp_tls(&addr, export, tls) {
                Ok(_) => {
                    got_through += 1;
                    eprintln!("{what}, {how}: GOT THROUGH");
                }
                Err(e) => eprintln!("{what}, {how}: failed: {e}"),
            }
        }
        let r = Client::connect_tcp_tls(&addr, export, &ours);
        assert!(r.is_ok(), "{what} still serves");
    }
    // A server that will not start TLS: our client stops after asking.
    if have("nbdkit") {
        let port = free_port();
        let child = Command::new("nbdkit")
            .args(["-f", "--exit-with-parent", "-i", "127.0.0.1", "-p"])
            .arg(port.to_string())
            .args(["--tls=off", "memory", "1M"])
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut plain = Server(child, port);
        wait_listening(&mut plain, Path::new("/dev/null"));
        match Client::connect_tcp_tls(&format!("127.0.0.1:{port}"), "", &ours) {
            Ok(_) => panic!("our TLS client went on in the clear"),
            Err(e) => {
                assert!(e.to_string().contains("did not start TLS"), "{e}");
                eprintln!("nbdkit --tls=off: {e}");
            }
        }
    }
    assert_eq!(got_through, 0);
}

/// A volume copied to a volume service on another host (`move-to-server`
/// to a target reached only at its `nbds://` port): the copy runs inside
/// TLS with the source's identity. A target of another CA, or a source
/// without a TLS identity, is a clear 502 and the volume stays where it was.
#[test]
fn a_volume_moves_to_another_service_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let (ours, theirs) = (dir.path().join("ours"), dir.path().join("theirs"));
    let start = |name: &str, ca: Option<&Path>| {
        let d = dir.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        let mut extra = vec![];
        if let Some(ca) = ca {
            extra = vec![
                "--tls-dev-dir".to_string(),
                ca.display().to_string(),
                "--tls-name".into(),
                name.into(),
            ];
        }
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let v = Volumed::start_with(&d, &extra);
        // As if on another host: its unix socket is not here.
        std::fs::remove_file(&v.nbd).unwrap();
        v
    };
    let a = start("a", Some(&ours));
    let b = start("b", Some(&ours));
    let stranger = start("stranger", Some(&theirs));
    let plain = start("plain", None);
    let (st, m) = a.call(
        "POST",
        "/v1/volumes",
        Some(r#"{"Name":"d","SizeBytes":1048576}"#),
    );
    assert_eq!(st, 201, "{m}");
    let image = std::fs::OpenOptions::new()
        .write(true)
        .open(a.image("d"))
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&image, &[0x6b; 8192], 4096).unwrap();
    let mv = |from: &Volumed, to: &Volumed| {
        from.call(
            "POST",
            "/v1/volumes/d/move-to-server",
            Some(&format!(r#"{{"Target":"{}"}}"#, to.api.display())),
        )
    };
    let (st, e) = mv(&a, &stranger);
    assert_eq!(st, 502, "{e}");
    eprintln!("to a target of another CA: {st} {}", e["Message"]);
    assert_eq!(stranger.call("GET", "/v1/volumes/d", None).0, 404);
    // The volume is still a's, and moves to b inside TLS.
    assert_eq!(a.call("GET", "/v1/volumes/d", None).0, 200);
    let (st, m) = mv(&a, &b);
    assert_eq!(st, 200, "{m}");
    let got = std::fs::read(b.image("d")).unwrap();
    assert!(got[4096..12288].iter().all(|x| *x == 0x6b));
    assert!(got[..4096].iter().all(|x| *x == 0));
    // A source without a TLS identity cannot reach a TLS target: it says
    // why.
    let (st, m) = plain.call(
        "POST",
        "/v1/volumes",
        Some(r#"{"Name":"d","SizeBytes":4096}"#),
    );
    assert_eq!(st, 201, "{m}");
    let (st, e) = mv(&plain, &stranger);
    assert_eq!(st, 502, "{e}");
    let msg = e["Message"].as_str().unwrap();
    assert!(msg.contains("no TLS"), "{e}");
    assert!(
        !msg.contains('@'),
        "no export name (it holds the credential): {msg}"
    );
    eprintln!("from a source without TLS: {st} {}", e["Message"]);
}
