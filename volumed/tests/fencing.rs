//! The volume service end to end: the real `ember-volumed` binary, its API
//! over a unix socket (curl), and unmodified NBD clients (`qemu-io` from
//! qemu-utils) writing and reading volumes by their attachment's URI. A
//! writer whose attachment moved away is refused and its writes never land.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::Duration;

use ember_nbd::*;
use ember_tests::volumed::Volumed;
use ember_volumed::nbd::client::Client;

/// Runs `qemu-io` on `uri`; (success, output).
fn qemu_io(uri: &str, cmds: &[&str]) -> (bool, String) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = c.arg(uri).output().expect("qemu-io");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // qemu-io exits 0 after a failed command; errors show in its output.
    let ok = out.status.success()
        && !text.contains("failed")
        && !text.contains("Pattern verification")
        && !text.contains("error");
    (ok, text)
}

#[test]
fn a_moved_attachment_fences_the_old_writer() {
    if Command::new("qemu-io").arg("--version").output().is_err() {
        eprintln!("skipped: qemu-io (qemu-utils) is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let v = Volumed::start(dir.path());
    // Bad input first: clear 4xx.
    assert_eq!(
        v.call(
            "POST",
            "/v1/volumes",
            Some(r#"{"Name":"../x","SizeBytes":4096}"#)
        )
        .0,
        400
    );
    assert_eq!(
        v.call(
            "POST",
            "/v1/volumes",
            Some(r#"{"Name":"v","SizeBytes":100}"#)
        )
        .0,
        400
    );
    assert_eq!(v.call("POST", "/v1/volumes", Some("{nope")).0, 400);
    assert_eq!(
        v.call("POST", "/v1/volumes/nosuch/attach", Some(r#"{"Host":"a"}"#))
            .0,
        404
    );
    let (st, rec) = v.call(
        "POST",
        "/v1/volumes",
        Some(r#"{"Name":"vol1","SizeBytes":1048576}"#),
    );
    assert_eq!(st, 201, "{rec}");
    assert_eq!(
        v.call(
            "POST",
            "/v1/volumes",
            Some(r#"{"Name":"vol1","SizeBytes":4096}"#)
        )
        .0,
        409
    );

    let (st, a) = v.call(
        "POST",
        "/v1/volumes/vol1/attach",
        Some(r#"{"Host":"host-a"}"#),
    );
    assert_eq!(st, 200, "{a}");
    assert_eq!(a["Generation"], 1);
    let uri_a = a["UnixUri"].as_str().unwrap().to_string();
    let export_a = a["ExportName"].as_str().unwrap().to_string();
    // The export name carries a credential: 256 random bits, not the
    // generation.
    let cred_a = export_a.strip_prefix("vol1@").unwrap().to_string();
    assert_eq!(cred_a.len(), 64, "{a}");
    assert_eq!(
        uri_a,
        format!("nbd+unix:///{export_a}?socket={}", v.nbd.display())
    );
    assert_eq!(
        v.call(
            "POST",
            "/v1/volumes/vol1/attach",
            Some(r#"{"Host":"host-b"}"#)
        )
        .0,
        409
    );
    assert_eq!(v.call("DELETE", "/v1/volumes/vol1", None).0, 409);

    // An unmodified client writes and reads through the attachment.
    let (ok, out) = qemu_io(
        &uri_a,
        &["write -P 0xab 0 64k", "flush", "read -P 0xab 0 64k"],
    );
    assert!(ok, "{out}");
    // A wrong credential (the generation, a guess), or none, is refused
    // at the handshake, saying only that.
    for bad in ["vol1@1", "vol1@7", &format!("vol1@{}", "0".repeat(64))] {
        let (ok, out) = qemu_io(
            &format!("nbd+unix:///{bad}?socket={}", v.nbd.display()),
            &["read 0 4k"],
        );
        assert!(!ok, "{out}");
        assert!(out.contains("not authorised"), "{out}");
        assert!(
            !out.contains("generation") && !out.contains(&cred_a),
            "{out}"
        );
    }
    let (ok, out) = qemu_io(
        &format!("nbd+unix:///vol1?socket={}", v.nbd.display()),
        &["read 0 4k"],
    );
    assert!(!ok, "{out}");

    // host-a keeps a connection open; it works until the attachment moves.
    // (Our own client: a connection kept open, as a VMM keeps it.)
    let mut holder = Client::connect_unix(&v.nbd, &export_a).unwrap();
    assert_eq!(holder.write(65536, &[0x11; 4096]).unwrap().error, 0);
    let (st, b) = v.call(
        "POST",
        "/v1/volumes/vol1/move",
        Some(r#"{"Host":"host-b"}"#),
    );
    assert_eq!(st, 200, "{b}");
    assert_eq!(b["Generation"], 2);
    // The stale writer is refused and nothing it sends lands.
    assert_eq!(holder.write(0, &[0xcd; 4096]).unwrap().error, EPERM);
    assert_eq!(
        holder
            .call(CMD_WRITE_ZEROES, 0, 0, 4096, &[])
            .unwrap()
            .error,
        EPERM
    );
    assert_eq!(holder.flush().unwrap().error, EPERM);
    assert_eq!(holder.read(0, 4096).unwrap().error, EPERM);
    let e = Client::connect_unix(&v.nbd, &export_a)
        .err()
        .expect("old credential refused");
    assert!(e.to_string().contains("not authorised"), "{e}");
    // The new holder (over TCP this time) sees host-a's writes from before
    // the move, and none from after.
    let uri_b = b["Uri"].as_str().unwrap().to_string();
    let export_b = b["ExportName"].as_str().unwrap();
    assert_ne!(export_b, export_a, "a move issues a new credential");
    assert_eq!(uri_b, format!("nbd://127.0.0.1:{}/{export_b}", v.port));
    let (ok, out) = qemu_io(&uri_b, &["read -P 0xab 0 64k", "read -P 0x11 64k 4k"]);
    assert!(ok, "{out}");
    // WRITE_ZEROES and TRIM (the image's fallocate paths) read back as zeroes.
    let (ok, out) = qemu_io(
        &uri_b,
        &[
            "write -P 0x33 128k 8k",
            "write -z 128k 4k",
            "discard 132k 4k",
            "read -P 0 128k 8k",
            "read -P 0x11 64k 4k",
        ],
    );
    assert!(ok, "{out}");

    // Resize: new connections see the new size.
    assert_eq!(
        v.call("PATCH", "/v1/volumes/vol1", Some(r#"{"SizeBytes":512}"#))
            .0,
        400
    );
    let (st, r) = v.call(
        "PATCH",
        "/v1/volumes/vol1",
        Some(r#"{"SizeBytes":2097152}"#),
    );
    assert_eq!(st, 200, "{r}");
    let (ok, out) = qemu_io(&uri_b, &["write -P 0x22 1536k 4k", "read -P 0x22 1536k 4k"]);
    assert!(ok, "{out}");

    // An owner account: an unowned volume gets one, once; then only that
    // account's hosts may move it, and the answer says only "not authorised".
    assert_eq!(v.call("PATCH", "/v1/volumes/vol1", Some("{}")).0, 400);
    let own = |a: &str| {
        v.call(
            "PATCH",
            "/v1/volumes/vol1",
            Some(&format!(r#"{{"Account":"{a}"}}"#)),
        )
    };
    let (st, r) = own("111122223333");
    assert_eq!(
        (st, r["Account"].as_str()),
        (200, Some("111122223333")),
        "{r}"
    );
    assert_eq!(own("999988887777").0, 409);
    assert_eq!(own("../x").0, 400);
    let (st, r) = v.call(
        "POST",
        "/v1/volumes/vol1/move",
        Some(r#"{"Host":"host-c","Account":"999988887777"}"#),
    );
    assert_eq!(
        (st, r["Message"].as_str()),
        (403, Some("not authorised")),
        "{r}"
    );
    let (ok, out) = qemu_io(&uri_b, &["read -P 0x22 1536k 4k"]);
    assert!(ok, "the refused move changed nothing: {out}");

    // A client speaking garbage is dropped; the server keeps serving.
    let mut junk = UnixStream::connect(&v.nbd).unwrap();
    junk.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut hello = [0u8; 18];
    junk.read_exact(&mut hello).unwrap();
    let _ = junk.write_all(b"this is not the NBD protocol at all........");
    let mut rest = Vec::new();
    let _ = junk.read_to_end(&mut rest);
    let (ok, out) = qemu_io(&uri_b, &["read -P 0xab 0 4k"]);
    assert!(ok, "{out}");

    // Detach: every token is stale, then the volume can go.
    assert_eq!(v.call("POST", "/v1/volumes/vol1/detach", None).0, 204);
    let (ok, out) = qemu_io(&uri_b, &["read 0 4k"]);
    assert!(!ok, "{out}");
    assert_eq!(v.call("DELETE", "/v1/volumes/vol1", None).0, 204);
    assert_eq!(v.call("GET", "/v1/volumes/vol1", None).0, 404);
}

/// With etcd as the store, the fencing state outlives the service: a
/// volumed killed and started again still refuses the old token, and a
/// second volumed writing the same state makes the first one's stale
/// changes fail instead of overwriting them.
#[test]
fn fencing_state_lives_in_etcd() {
    let Some(etcd) = ember_store::testing::EtcdProcess::start_or_skip() else {
        return;
    };
    if Command::new("qemu-io").arg("--version").output().is_err() {
        eprintln!("skipped: qemu-io (qemu-utils) is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let etcd_args = ["--etcd-endpoints", etcd.url.as_str()];
    let v = Volumed::start_with(dir.path(), &etcd_args);
    assert_eq!(
        v.call(
            "POST",
            "/v1/volumes",
            Some(r#"{"Name":"e1","SizeBytes":1048576}"#)
        )
        .0,
        201
    );
    let (st, g) = v.call("POST", "/v1/volumes/e1/attach", Some(r#"{"Host":"h1"}"#));
    assert_eq!(st, 200, "{g}");
    let e1 = g["ExportName"].as_str().unwrap().to_string();
    let (ok, out) = qemu_io(
        &format!("nbd+unix:///{e1}?socket={}", v.nbd.display()),
        &["write -P 0x5a 0 4k", "flush"],
    );
    assert!(ok, "{out}");
    let (st, m) = v.call("POST", "/v1/volumes/e1/move", Some(r#"{"Host":"h2"}"#));
    assert_eq!((st, m["Generation"].as_u64()), (200, Some(2)), "{m}");
    let e2 = m["ExportName"].as_str().unwrap().to_string();
    v.kill();

    // Restarted: the state (credentials included) comes back from etcd.
    let v = Volumed::start_with(dir.path(), &etcd_args);
    let e = Client::connect_unix(&v.nbd, &e1)
        .err()
        .expect("old credential refused after restart");
    assert!(e.to_string().contains("not authorised"), "{e}");
    let (ok, out) = qemu_io(
        &format!("nbd+unix:///{e2}?socket={}", v.nbd.display()),
        &["read -P 0x5a 0 4k"],
    );
    assert!(ok, "{out}");

    // A second service on the same etcd moves the attachment; the first
    // one's view is now stale, and its next change is refused.
    let dir2 = tempfile::tempdir().unwrap();
    let v2 = Volumed::start_with(dir2.path(), &etcd_args);
    let (st, m) = v2.call("POST", "/v1/volumes/e1/move", Some(r#"{"Host":"h3"}"#));
    assert_eq!((st, m["Generation"].as_u64()), (200, Some(3)), "{m}");
    let (st, body) = v.call("POST", "/v1/volumes/e1/move", Some(r#"{"Host":"h1"}"#));
    assert_eq!(st, 500, "a stale service must not overwrite: {body}");
    assert!(
        body["Message"]
            .as_str()
            .unwrap_or_default()
            .contains("changed in the store"),
        "{body}"
    );
    v.kill();
    let v = Volumed::start_with(dir.path(), &etcd_args);
    assert_eq!(
        v.call("GET", "/v1/volumes/e1", None).1["Attachment"]["Host"],
        "h3"
    );
    v2.kill();
}
