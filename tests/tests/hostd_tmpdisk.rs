//! Functions' `/tmp` disks (`EphemeralStorage`) on the host: in emberd's
//! disk directory (`--disk-dir`, by default `disks` in its state
//! directory), never in its run directory, which is tmpfs on most hosts.
//!
//! * A function with a 2048 MiB `/tmp` writes more into it than its
//!   VMM's memory limit (guest memory + 128 MiB) allows, with emberd's run
//!   directory on tmpfs as on a real host: the invocation succeeds, and
//!   the data is in a file under the disk directory. (Before, the disk
//!   lived in the run directory, its tmpfs pages were charged to the VMM's
//!   memory cgroup for good, and the VMM was OOM-killed.) The guest writes
//!   with O_DIRECT from user space: on nested kvm_pvm, where guest kernel
//!   code is emulated, a buffered copy of each byte through the guest's
//!   page cache costs minutes per GiB. `EMBER_TMP_WRITE_MB` sets how much
//!   is written (default 384 MiB, 1.5 times the VMM's memory limit; about
//!   0.2 s per MiB on a loaded 2-core kvm_pvm host); the full run, Lambda's
//!   "1 GB into a 2 GB /tmp" (3.5 minutes or more of writing there):
//!   `EMBER_TMP_WRITE_MB=1024 cargo test -p ember-tests --test hostd_tmpdisk
//!   -- --nocapture a_function_fills`. `EMBER_TMP_CONTROL=tmpfs` runs the
//!   control: `--disk-dir` on a tmpfs, as the disks were (in the run
//!   directory) before `--disk-dir`, where the same write must fail.
//! * What a crashed run left in the disk directory is gone once emberd
//!   has started again (links removed as links, never followed), and a
//!   disk directory on tmpfs is warned about.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ember_tests::emberd::{zip_dir, Emberd};
use ember_tests::{is_root, kvm_available};
use serde_json::json;

/// A tmpfs mounted at a path for the test, unmounted (lazily: jails may
/// still hold it) when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=4g,mode=0755", "tmpfs"])
            .arg(at)
            .status()
            .expect("mount");
        assert!(st.success(), "mount -t tmpfs {}", at.display());
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn is_tmpfs(p: &Path) -> bool {
    let out = Command::new("stat")
        .args(["-f", "-c", "%T"])
        .arg(p)
        .output()
        .expect("stat");
    String::from_utf8_lossy(&out.stdout).trim() == "tmpfs"
}

/// Files named `tmp.img` under `dir`, with their allocated bytes.
fn images_under(dir: &Path) -> Vec<(PathBuf, u64)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let Ok(m) = std::fs::symlink_metadata(e.path()) else {
                continue;
            };
            if m.is_dir() {
                stack.push(e.path());
            } else if e.file_name() == "tmp.img" {
                out.push((e.path(), m.blocks() * 512));
            }
        }
    }
    out
}

/// The function: writes `mb` MiB into /tmp/fill from a 1 MiB buffer
/// touched during init (before the snapshot), with O_DIRECT unless told
/// `"direct": false`, and answers what it wrote and how long it took.
const WRITER: &str = r#"
import mmap
import os
import time

MIB = 1 << 20
BUF = mmap.mmap(-1, MIB)
BUF.write(b"\xa5" * MIB)


def handler(event, context):
    mb = int(event["mb"])
    direct = bool(event.get("direct", True))
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    if direct:
        flags |= os.O_DIRECT
    start = time.time()
    fd = os.open("/tmp/fill", flags, 0o600)
    written = 0
    try:
        view = memoryview(BUF)
        for _ in range(mb):
            off = 0
            while off < MIB:
                off += os.write(fd, view[off:])
            written += MIB
        os.fsync(fd)
    finally:
        os.close(fd)
    st = os.statvfs("/tmp")
    return {
        "written": written,
        "size": os.stat("/tmp/fill").st_size,
        "seconds": round(time.time() - start, 2),
        "tmp_total_mib": st.f_blocks * st.f_frsize // MIB,
    }
"#;

#[test]
fn a_function_fills_its_tmp_beyond_its_vmms_memory_limit() {
    if !is_root() || !kvm_available() {
        eprintln!("SKIPPED: needs root (jails, a tmpfs run directory) and /dev/kvm");
        return;
    }
    let mb: u64 = std::env::var("EMBER_TMP_WRITE_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(384);
    let direct = std::env::var("EMBER_TMP_WRITE_BUFFERED").is_err();
    // The control, `EMBER_TMP_CONTROL=tmpfs`: `--disk-dir` on a tmpfs, as
    // the disks were in the tmpfs run directory before --disk-dir. Then
    // the same write must fail (the VMM is OOM-killed): what this test
    // saw before the fix.
    let control = std::env::var("EMBER_TMP_CONTROL").is_ok_and(|v| v == "tmpfs");
    const MEMORY_MIB: u64 = 128;
    let control_dir = tempfile::tempdir().unwrap();
    let control_fs = control.then(|| Tmpfs::mount(control_dir.path()));
    let control_disks = control_dir.path().join("disks").display().to_string();
    let mut args = vec!["--no-network"];
    if control {
        args.extend(["--disk-dir", &control_disks]);
    }
    let mut run_tmpfs = None;
    let mut d = Emberd::start_prepared(
        &args,
        |dir| run_tmpfs = Some(Tmpfs::mount(&dir.join("run"))),
        |_| {},
    );
    let run = d.dir().join("run");
    assert!(is_tmpfs(&run), "the run directory is tmpfs, as on a host");
    let code = tempfile::tempdir().unwrap();
    std::fs::write(code.path().join("app.py"), WRITER).unwrap();
    let r = d.post_json(
        "/2015-03-31/functions",
        &json!({"FunctionName": "filler", "Runtime": "python3.11", "Handler": "app.handler",
                "Code": {"ZipFile": zip_dir(code.path())}, "Timeout": 900,
                "MemorySize": MEMORY_MIB, "EphemeralStorage": {"Size": 2048}}),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let t = Instant::now();
    d.wait_active("filler", "$LATEST", Duration::from_secs(900));
    eprintln!("snapshot built in {:.1} s", t.elapsed().as_secs_f64());

    let t = Instant::now();
    let r = d.invoke("filler", &json!({"mb": mb, "direct": direct}));
    let took = t.elapsed();
    if control {
        eprintln!(
            "control (disks on tmpfs): {} {} after {:.1} s",
            r.status,
            r.text(),
            took.as_secs_f64()
        );
        assert!(
            r.status != 200 || r.header("x-amz-function-error").is_some(),
            "with its disk on tmpfs the VMM should have been OOM-killed: {}",
            r.text()
        );
        d.stop();
        drop(run_tmpfs);
        drop(control_fs);
        return;
    }
    assert_eq!(r.status, 200, "{}\nlog:\n{}", r.text(), d.logs());
    let v = r.json();
    assert!(
        r.header("x-amz-function-error").is_none(),
        "{v}\n{}",
        r.log_tail()
    );
    eprintln!(
        "wrote {mb} MiB into /tmp (direct: {direct}): {v}; invocation {:.1} s",
        took.as_secs_f64()
    );
    assert_eq!(v["written"], mb << 20, "{v}");
    assert_eq!(v["size"], mb << 20, "{v}");
    assert!(v["tmp_total_mib"].as_u64().unwrap() > 1900, "{v}");
    // The data is in the instance's image under the disk directory (on
    // disk), and no image is in the run directory.
    let disks = d.dir().join("state").join("disks");
    let images = images_under(&disks);
    assert!(
        images.iter().any(|(_, bytes)| *bytes >= mb << 20),
        "no image under {} holds {mb} MiB: {images:?}",
        disks.display()
    );
    assert_eq!(images_under(&run), vec![], "images in the run directory");
    for (p, _) in &images {
        let dir = p.parent().unwrap();
        let m = std::fs::metadata(dir).unwrap();
        assert_eq!(m.mode() & 0o7777, 0o700, "{}", dir.display());
    }
    // The point: more than the VMM's memory limit went through it.
    let limit_mib = MEMORY_MIB + 128;
    if mb <= limit_mib {
        eprintln!(
            "NOTE: {mb} MiB does not exceed the VMM's memory limit ({limit_mib} MiB): \
             this run proves less"
        );
    }
    // The instance is still there and answers.
    let r = d.invoke("filler", &json!({"mb": 1}));
    assert_eq!(r.status, 200, "{}", r.text());
    d.stop();
    drop(run_tmpfs);
}

#[test]
fn a_crashed_runs_disks_are_removed_at_start() {
    // What a crashed run leaves: a disk directory of a VMM's uid with its
    // image, a link in the disk directory (to a directory that must stay
    // whole), a directory that is open to everyone, and a disk in the
    // run directory where versions before --disk-dir kept them.
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("precious"), "keep").unwrap();
    let outside_path = outside.path().to_path_buf();
    let d = Emberd::start_prepared(
        &["--no-network"],
        |dir| {
            let disks = dir.join("state").join("disks");
            let stale = disks.join("vm-stale");
            std::fs::create_dir_all(&stale).unwrap();
            std::fs::write(stale.join("tmp.img"), vec![0u8; 4096]).unwrap();
            std::os::unix::fs::symlink(&outside_path, stale.join("sub")).unwrap();
            if is_root() {
                std::os::unix::fs::chown(&stale, Some(900_123), Some(900_000)).unwrap();
                std::os::unix::fs::chown(stale.join("tmp.img"), Some(900_123), None).unwrap();
            }
            std::os::unix::fs::symlink(&outside_path, disks.join("vm-link")).unwrap();
            std::fs::set_permissions(&disks, std::fs::Permissions::from_mode(0o777)).unwrap();
            let legacy = dir.join("run").join("disks").join("vm-old");
            std::fs::create_dir_all(&legacy).unwrap();
            std::fs::write(legacy.join("tmp.img"), "old").unwrap();
        },
        |_| {},
    );
    let disks = d.dir().join("state").join("disks");
    let left: Vec<_> = std::fs::read_dir(&disks)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "left in {}: {left:?}", disks.display());
    assert_eq!(
        std::fs::metadata(&disks).unwrap().mode() & 0o7777,
        0o700,
        "the disk directory is 0700"
    );
    assert!(!d.dir().join("run").join("disks").exists());
    assert_eq!(
        std::fs::read_to_string(outside.path().join("precious")).unwrap(),
        "keep"
    );
}

#[test]
fn a_disk_directory_on_tmpfs_is_warned_about() {
    if !is_root() {
        eprintln!("SKIPPED: needs root (mounts a tmpfs)");
        return;
    }
    let mnt = tempfile::tempdir().unwrap();
    let fs = Tmpfs::mount(mnt.path());
    let disk_dir = mnt.path().join("disks").display().to_string();
    let mut d = Emberd::start(&["--no-network", "--disk-dir", &disk_dir]);
    d.stop();
    let logs = d.logs();
    assert!(
        logs.contains("is on tmpfs") && logs.contains(&disk_dir),
        "no warning in:\n{logs}"
    );
    drop(d);
    drop(fs);
    // And none for the default, on the state directory's filesystem
    // (unless that is tmpfs here).
    let mut d = Emberd::start(&["--no-network"]);
    d.stop();
    let state = d.dir().join("state");
    if !is_tmpfs(&state) {
        assert!(!d.logs().contains("is on tmpfs"), "{}", d.logs());
    }
}
