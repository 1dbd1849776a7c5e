//! `ember-export`, the real binary: one file served read-only over NBD,
//! read by an unmodified client (`qemu-img` from qemu-utils) and by the
//! tests' own client; writes are refused and never land.

use std::process::Command;

use ember_nbd::*;
use ember_tests::volumed::Export;
use ember_volumed::nbd::client::{Client, ClientError};

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 4096) as u8).collect()
}

#[test]
fn a_file_export_is_read_only_and_reads_back_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    let data = pattern(3 << 20);
    std::fs::write(&img, &data).unwrap();
    let exp = Export::start(&img, &dir.path().join("export.sock"));

    let mut c = Client::connect_unix(&exp.sock, "disk").unwrap();
    assert_eq!(c.size, data.len() as u64);
    assert_ne!(c.flags & TFLAG_READ_ONLY, 0, "the export says read-only");
    let r = c.read(1 << 20, 65536).unwrap();
    assert_eq!(r.error, 0);
    assert_eq!(r.data, data[1 << 20..(1 << 20) + 65536]);
    let w = c.write(0, &[0xff; 4096]).unwrap();
    assert_eq!(w.error, EPERM, "a write to a read-only export is refused");
    let r = c.read(0, 4096).unwrap();
    assert_eq!(r.data, data[..4096], "the refused write did not land");
    assert_eq!(c.read(data.len() as u64 - 512, 1024).unwrap().error, EINVAL);
    assert_eq!(c.flush().unwrap().error, 0);
    c.disconnect().unwrap();
    assert_eq!(std::fs::read(&img).unwrap(), data);

    // The default name is the same export; another name is refused.
    assert!(Client::connect_unix(&exp.sock, "").is_ok());
    assert!(matches!(
        Client::connect_unix(&exp.sock, "other"),
        Err(ClientError::Refused(_))
    ));

    if Command::new("qemu-img").arg("--version").output().is_err() {
        eprintln!("SKIPPED the qemu-img part: qemu-img (qemu-utils) is not installed");
        return;
    }
    let copy = dir.path().join("copy.img");
    let out = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(exp.uri())
        .arg(&copy)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(std::fs::read(&copy).unwrap(), data);
}
