//! The fill against real NBD servers: `ember-export`'s server (in this
//! process) and qemu-nbd (a child, killed to lose the source mid-fill).

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use super::{Fill, FillPhase, CHUNK_SIZE};
use crate::devices::virtio::block::nbd::Op;
use crate::vmm_config::drive::FillFrom;

const CS: u64 = CHUNK_SIZE;

/// Data in the first half, zeroes in the second.
fn source_image(path: &Path, size: u64) -> Vec<u8> {
    let data: Vec<u8> = (0..size)
        .map(|i| if i < size / 2 { (i % 251) as u8 + 1 } else { 0 })
        .collect();
    std::fs::write(path, &data).unwrap();
    data
}

fn from(uri: String, rate: Option<u64>, timeout_ms: Option<u64>) -> FillFrom {
    FillFrom {
        nbd_uri: uri,
        nbd_timeout_ms: timeout_ms,
        background_bytes_per_sec: rate,
    }
}

/// A child process killed (and reaped) when dropped, also on a panic.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs one request; whether it went to the fill thread, and its result.
fn run(f: &mut Fill, id: u64, op: Op, offset: u64) -> (bool, io::Result<Vec<u8>>) {
    if let Some(c) = f.submit(id, op, offset) {
        assert_eq!(c.id, id);
        return (false, c.result);
    }
    assert!(
        f.wait_idle(Duration::from_secs(60)),
        "request {id} unanswered"
    );
    let mut done = f.take_completions();
    assert_eq!(done.len(), 1);
    let c = done.pop().unwrap();
    assert_eq!(c.id, id);
    (true, c.result)
}

fn wait_complete(f: &Fill) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !f.is_complete() {
        assert!(Instant::now() < deadline, "fill stuck: {:?}", f.status("d"));
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn chunks_come_on_demand_then_in_the_background_and_a_snapshot_continues() {
    let dir = tempfile::tempdir().unwrap();
    let size = 8 << 20;
    let mut want = source_image(&dir.path().join("src.img"), size);
    let sock = dir.path().join("export.sock");
    let listen = format!("unix:{}", sock.display());
    ember_volumed::nbd::export_file(&dir.path().join("src.img"), "disk", &listen).unwrap();
    let uri = format!("nbd+unix:///disk?socket={}", sock.display());
    let local = dir.path().join("local.img");
    let local_s = local.to_str().unwrap();

    // Slow background (its first 1 MiB batch goes at once, then 64 KiB/s),
    // so chunks from 32 on stay missing until asked for.
    let mut f = Fill::open(local_s, &from(uri.clone(), Some(64 << 10), None), None).unwrap();
    assert_eq!(
        std::fs::metadata(&local).unwrap().len(),
        size,
        "created at the source's size"
    );

    let at = 100 * CS + 100;
    let (queued, r) = run(&mut f, 1, Op::Read(4096), at);
    assert!(queued, "a missing chunk is fetched by the fill thread");
    assert_eq!(r.unwrap(), want[at as usize..at as usize + 4096]);
    let (queued, r) = run(&mut f, 2, Op::Read(512), at + 8192);
    assert!(!queued, "a local chunk is read at once");
    assert_eq!(
        r.unwrap(),
        want[(at + 8192) as usize..(at + 8192 + 512) as usize]
    );
    assert_eq!(f.status("d").bytes_on_demand, CS);

    // A write into part of a missing chunk fetches it first...
    let w = 50 * CS + 1000;
    let (queued, r) = run(&mut f, 3, Op::Write(vec![0xee; 3000]), w);
    assert!(queued);
    r.unwrap();
    want[w as usize..w as usize + 3000].fill(0xee);
    let (_, r) = run(&mut f, 4, Op::Read(CS as usize), 50 * CS);
    assert_eq!(r.unwrap(), want[(50 * CS) as usize..(51 * CS) as usize]);
    // ...one covering whole chunks fetches nothing.
    let (queued, r) = run(&mut f, 5, Op::Write(vec![0x11; 2 * CS as usize]), 60 * CS);
    assert!(queued);
    r.unwrap();
    want[(60 * CS) as usize..(62 * CS) as usize].fill(0x11);
    assert_eq!(f.status("d").bytes_on_demand, 2 * CS);
    // A read across a local and a missing chunk.
    let (queued, r) = run(&mut f, 6, Op::Read(200), 51 * CS - 100);
    assert!(queued);
    assert_eq!(
        r.unwrap(),
        want[(51 * CS - 100) as usize..(51 * CS + 100) as usize]
    );
    let st = f.status("d");
    assert_eq!(st.state, FillPhase::Filling);
    assert_eq!(st.bytes_on_demand, 3 * CS);
    assert!(st.chunks_local < st.chunks_total);

    // A snapshot's map, reopened (as a restore does) without the cap.
    let saved = f.state().expect("filling");
    for c in [50, 51, 60, 61, 100] {
        assert!(
            saved.present.iter().any(|r| r[0] <= c && c < r[0] + r[1]),
            "{c}"
        );
    }
    drop(f);
    let f = Fill::open(local_s, &from(uri, None, None), Some(&saved)).unwrap();
    let before = f.status("d").chunks_local;
    let saved_chunks: u64 = saved.present.iter().map(|r| r[1]).sum();
    assert!(saved_chunks >= 5);
    assert!(
        before >= saved_chunks,
        "the saved chunks count as local: {before}"
    );
    wait_complete(&f);
    let st = f.status("d");
    assert_eq!(st.state, FillPhase::Complete);
    assert_eq!(st.chunks_local, size / CS);
    assert_eq!(st.bytes_background, (st.chunks_total - before) * CS);
    assert!(
        f.state().is_none(),
        "a completed fill leaves nothing to save"
    );
    assert!(
        std::fs::read(&local).unwrap() == want,
        "the local file is the disk"
    );
    // The zero half stayed holes.
    let allocated = std::fs::metadata(&local).unwrap().blocks() * 512;
    assert!(allocated < size * 3 / 4, "{allocated} bytes allocated");
}

#[test]
fn a_lost_source_fails_missing_reads_only_and_a_restarted_one_serves_again() {
    if std::process::Command::new("qemu-nbd")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("SKIPPED: qemu-nbd (qemu-utils) is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let size = 4 << 20;
    let img = dir.path().join("src.img");
    let want = source_image(&img, size);
    let sock = dir.path().join("qemu.sock");
    let server = Killed(ember_tests::nbd::qemu_nbd(&img, &sock));
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let local = dir.path().join("local.img");
    let fill_from = from(uri, Some(16 << 10), Some(1000));
    let mut f = Fill::open(local.to_str().unwrap(), &fill_from, None).unwrap();

    let (_, r) = run(&mut f, 1, Op::Read(4096), 40 * CS);
    assert_eq!(
        r.unwrap(),
        want[(40 * CS) as usize..(40 * CS + 4096) as usize]
    );
    drop(server);

    let (queued, r) = run(&mut f, 2, Op::Read(4096), 30 * CS);
    assert!(queued);
    let e = r.expect_err("the source is gone");
    assert!(e.to_string().contains("fill source"), "{e}");
    assert!(f.status("d").error.is_some(), "{:?}", f.status("d"));
    let (queued, r) = run(&mut f, 3, Op::Read(4096), 40 * CS);
    assert!(!queued, "local chunks are still served");
    assert_eq!(
        r.unwrap(),
        want[(40 * CS) as usize..(40 * CS + 4096) as usize]
    );

    // Still down (within the backoff after a failure this fails at once,
    // "unreachable", instead of waiting out another reconnect).
    let (_, r) = run(&mut f, 4, Op::Read(4096), 31 * CS);
    let e = r.expect_err("still down");
    assert!(e.to_string().contains("fill source"), "{e}");

    let _server = Killed(ember_tests::nbd::qemu_nbd(&img, &sock));
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut id = 5;
    let data = loop {
        match run(&mut f, id, Op::Read(4096), 30 * CS).1 {
            Ok(d) => break d,
            Err(e) => assert!(Instant::now() < deadline, "the source stays unused: {e}"),
        }
        id += 1;
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(data, want[(30 * CS) as usize..(30 * CS + 4096) as usize]);
    assert!(f.status("d").error.is_none(), "{:?}", f.status("d"));
}

#[test]
fn bad_local_files_and_sources_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("src.img");
    source_image(&img, 1 << 20);
    let sock = dir.path().join("export.sock");
    let listen = format!("unix:{}", sock.display());
    ember_volumed::nbd::export_file(&img, "disk", &listen).unwrap();
    let uri = format!("nbd+unix:///disk?socket={}", sock.display());
    let other = dir.path().join("other.img");
    std::fs::write(&other, vec![1u8; 4096]).unwrap();
    let e = Fill::open(
        other.to_str().unwrap(),
        &from(uri.clone(), None, None),
        None,
    )
    .err()
    .unwrap();
    assert!(e.contains("has 4096 bytes but the fill source"), "{e}");
    let gone = format!(
        "nbd+unix:///disk?socket={}",
        dir.path().join("no.sock").display()
    );
    let e = Fill::open(other.to_str().unwrap(), &from(gone, None, Some(200)), None)
        .err()
        .unwrap();
    assert!(e.contains("fill source"), "{e}");
    let e = Fill::open("/nonexistent/dir/x.img", &from(uri, None, None), None)
        .err()
        .unwrap();
    assert!(e.contains("/nonexistent/dir/x.img"), "{e}");
}
