//! The send and receive loops against each other over real sockets, with
//! plain guest memory behind [`SourceVm`] and [`TargetVm`] (a writer thread
//! plays the guest). Whole VMs migrating are tested in tests/tests/migrate.rs.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::plain::{PlainSource, PlainTarget, TargetLog};
use super::transport::Endpoint;
use super::*;
use crate::vmm_config::migration::{validate_send, MigrationMode, SwitchOver};
use crate::vmm_config::snapshot::DriveOverride;
use crate::vmm_config::SendMigrationParams;

const MIB: usize = 1 << 20;

/// Page `i` of `n` in a scattered order (a permutation: `n` is a power of
/// two and the factor odd).
fn scattered(i: u64, n: u64) -> u64 {
    (i.wrapping_mul(2654435761) + 12345) % n
}

/// Where the "guest" leaves its mark in the pages it writes (away from the
/// writer's word at offset 8 and the pattern at 0).
const MARK_AT: u64 = 2048;

/// Plays the guest on the destination: touches every page in a scattered
/// order (each first touch faults), checks it against the source, and
/// writes a mark into every third page, which no later push may undo.
fn run_guest(dst: GuestMemoryMmap, src: GuestMemoryMmap) -> Result<u64, String> {
    use vm_memory::GuestMemoryRegion;
    let n: u64 = dst.iter().map(|r| r.len() / 4096).sum();
    let mut page = vec![0u8; 4096];
    let mut want = vec![0u8; 4096];
    for i in 0..n {
        let p = scattered(i, n);
        let at = GuestAddress(p * 4096);
        dst.read_slice(&mut page, at).map_err(|e| e.to_string())?;
        src.read_slice(&mut want, at).map_err(|e| e.to_string())?;
        if page != want {
            return Err(format!("page {p} differs from the source's"));
        }
        if p.is_multiple_of(3) {
            dst.write_obj(0xfeed_0000_0000 + p, GuestAddress(p * 4096 + MARK_AT))
                .map_err(|e| e.to_string())?;
        }
    }
    Ok(n)
}

fn guest(mib: usize) -> GuestMemoryMmap {
    super::plain::patterned_memory(mib).unwrap()
}

fn same(a: &GuestMemoryMmap, b: &GuestMemoryMmap) -> bool {
    a.iter().zip(b.iter()).all(|(x, y)| {
        use vm_memory::GuestMemoryRegion;
        // SAFETY: both are live mappings of the regions' lengths, read only.
        let (x, y) = unsafe {
            (
                std::slice::from_raw_parts(x.as_ptr(), x.len() as usize),
                std::slice::from_raw_parts(y.as_ptr(), y.len() as usize),
            )
        };
        x == y
    })
}

struct Run {
    source: Progress,
    target: Progress,
    log: Arc<Mutex<TargetLog>>,
    resumed: Arc<AtomicU64>,
    handed_over: Arc<AtomicBool>,
    src_mem: GuestMemoryMmap,
    /// Post-copy: the destination's guest thread.
    guest: GuestThread,
}

impl Run {
    /// The source's status, which must be in `state`.
    fn source_in(&self, state: Phase) -> MigrationStatus {
        let s = self.source.status();
        assert_eq!(s.state, state, "{s:?}");
        s
    }

    fn target_in(&self, state: Phase) -> MigrationStatus {
        let t = self.target.status();
        assert_eq!(t.state, state, "{t:?}");
        t
    }

    /// The source failed for a reason that says `why`, kept the VM (and
    /// resumed it `resumes` times).
    fn source_kept_the_vm(&self, why: &str, resumes: u64) {
        let s = self.source_in(Phase::Failed);
        assert!(s.error.as_deref().unwrap().contains(why), "{s:?}");
        assert_eq!(self.resumed.load(Ordering::SeqCst), resumes);
        assert!(!self.handed_over.load(Ordering::SeqCst));
    }

    /// The destination holds the source's memory at the pause.
    fn arrived_identical(&self) {
        assert!(
            same(
                &self.src_mem,
                self.log.lock().unwrap().loaded.as_ref().unwrap()
            ),
            "destination memory differs from the source's at the pause"
        );
    }
}

/// A source's progress, active before anyone looks, as the controller
/// makes it.
fn source_progress() -> Progress {
    let source = Progress::new(Role::Source, "test".into());
    source.update(|s| s.state = Phase::PreCopy);
    source
}

/// Runs the destination on `target` behind `listener` on a thread of its
/// own.
fn spawn_target(
    listener: transport::Listener,
    mut target: PlainTarget,
) -> (Progress, Arc<Mutex<TargetLog>>, std::thread::JoinHandle<()>) {
    let progress = Progress::new(Role::Destination, "test".into());
    progress.update(|s| s.state = Phase::Listening);
    let log = target.log.clone();
    let p = progress.clone();
    let rx = std::thread::spawn(move || receive::run(&mut target, listener, &p));
    (progress, log, rx)
}

type GuestThread = Arc<Mutex<Option<std::thread::JoinHandle<Result<u64, String>>>>>;

/// Damage done to the source's stream on its way.
#[derive(Clone, Copy)]
enum Tamper {
    /// One byte flipped at this offset.
    Flip(usize),
    /// Both directions cut after this many bytes (the source "dies").
    Cut(usize),
}

/// How a test migration goes, besides its parameters.
#[derive(Default)]
struct Setup {
    /// Pages the source's writer dirties per millisecond.
    dirty_per_ms: u64,
    /// The destination cannot load the VM.
    refuse_load: bool,
    /// Damage done to the stream on its way.
    tamper: Option<Tamper>,
    /// A manual switch-over's go-ahead, given once the source waits.
    go_ahead: Option<Vec<DriveOverride>>,
    /// Applied to the source before it starts.
    source: Option<fn(&mut PlainSource)>,
}

fn dirtying(dirty_per_ms: u64) -> Setup {
    Setup {
        dirty_per_ms,
        ..Setup::default()
    }
}

/// Migrates a 32 MiB fake guest whose writer keeps dirtying pages as
/// `setup` says.
fn migrate(params: SendMigrationParams, setup: Setup) -> Run {
    let Setup {
        dirty_per_ms,
        refuse_load,
        tamper,
        go_ahead,
        source: tweak,
    } = setup;
    let src_mem = guest(32);
    let guest_checks = (params.mode == MigrationMode::PostCopy).then(|| src_mem.clone());
    let guest_thread: GuestThread = Arc::default();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("m.sock");
    let listener = Endpoint::Unix(sock.clone()).listen().unwrap();
    let g = guest_thread.clone();
    let tv = PlainTarget {
        refuse_load,
        on_resume: guest_checks.map(|src| {
            Box::new(move |dst: &GuestMemoryMmap| {
                let (src, dst) = (src.clone(), dst.clone());
                *g.lock().unwrap() = Some(std::thread::spawn(move || run_guest(dst, src)));
            }) as super::plain::OnResume
        }),
        ..PlainTarget::new()
    };
    let (target, log, rx) = spawn_target(listener, tv);
    // A proxy that flips one byte at offset `at` of the source's stream.
    let connect_to = match tamper {
        None => sock.clone(),
        Some(tamper) => {
            let proxy = dir.path().join("proxy.sock");
            let pl = std::os::unix::net::UnixListener::bind(&proxy).unwrap();
            let sock = sock.clone();
            std::thread::spawn(move || {
                use std::io::{Read, Write};
                let (mut a, _) = pl.accept().unwrap();
                let mut b = std::os::unix::net::UnixStream::connect(&sock).unwrap();
                let (mut a2, mut b2) = (a.try_clone().unwrap(), b.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut b2, &mut a2);
                });
                let mut buf = vec![0u8; 65536];
                let mut seen = 0usize;
                loop {
                    let n = match a.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    let n = match tamper {
                        Tamper::Flip(at) => {
                            if (seen..seen + n).contains(&at) {
                                buf[at - seen] ^= 0x40;
                            }
                            n
                        }
                        Tamper::Cut(at) => n.min(at.saturating_sub(seen)),
                    };
                    if n == 0 {
                        // The source is gone, both ways.
                        let _ = a.shutdown(std::net::Shutdown::Both);
                        let _ = b.shutdown(std::net::Shutdown::Both);
                        break;
                    }
                    seen += n;
                    if b.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = b.shutdown(std::net::Shutdown::Write);
            });
            proxy
        }
    };
    let paused = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = super::plain::dirty(
        src_mem.clone(),
        paused.clone(),
        stop.clone(),
        Some(dirty_per_ms),
        32 * MIB as u64 / 4096,
    );
    // Active before the caller below looks.
    let source = source_progress();
    if let Some(o) = go_ahead {
        // The caller of a manual switch-over: waits for the pause, then lets go.
        let p = source.clone();
        std::thread::spawn(move || {
            while p.status().state != Phase::AwaitingSwitchOver {
                if !p.status().is_active() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            assert!(p.switch_over(o));
        });
    }
    let mut sv = PlainSource {
        paused,
        ..PlainSource::new(src_mem.clone())
    };
    let (resumed, handed_over) = (sv.resumed.clone(), sv.handed_over.clone());
    if let Some(tweak) = tweak {
        tweak(&mut sv);
    }
    let stream = Endpoint::Unix(connect_to)
        .connect(Duration::from_secs(5))
        .unwrap();
    source.set_stream(&stream);
    send::run(&mut sv, stream, &params, &source);
    stop.store(true, Ordering::SeqCst);
    writer.join().unwrap();
    rx.join().unwrap();
    Run {
        source,
        target,
        log,
        resumed,
        handed_over,
        src_mem,
        guest: guest_thread,
    }
}

fn params(downtime_ms: u64, max_rounds: u32) -> SendMigrationParams {
    SendMigrationParams {
        destination_uri: "unix:///unused".into(),
        downtime_ms,
        max_rounds,
        switch_over: Default::default(),
        switch_over_timeout_ms: 30_000,
        mode: Default::default(),
        postcopy_after_rounds: None,
    }
}

#[test]
fn memory_arrives_identical_while_the_guest_writes() {
    let r = migrate(params(50, 10), dirtying(20));
    let s = r.source_in(Phase::Completed);
    assert!(s.rounds >= 1 && s.rounds <= 10, "{s:?}");
    assert!(s.downtime_ms.is_some());
    assert!(r.handed_over.load(Ordering::SeqCst));
    assert_eq!(r.resumed.load(Ordering::SeqCst), 0);
    r.target_in(Phase::Completed);
    let log = r.log.lock().unwrap();
    assert!(log.resumed && !log.discarded);
    drop(log);
    r.arrived_identical();
}

#[test]
fn an_idle_guest_goes_in_one_round_without_its_zero_pages() {
    let r = migrate(params(50, 10), dirtying(0));
    let s = r.source_in(Phase::Completed);
    assert_eq!((s.rounds, s.final_pages), (1, 0), "{s:?}");
    // Half of the 32 MiB is zero and stays home.
    assert!(
        s.bytes < 17 * MIB as u64 && s.bytes > 16 * MIB as u64,
        "{s:?}"
    );
    r.arrived_identical();
}

#[test]
fn a_dirty_rate_that_never_converges_stops_at_the_round_limit() {
    let r = migrate(params(1, 3), dirtying(400));
    let s = r.source_in(Phase::Completed);
    assert_eq!(s.rounds, 3, "{s:?}");
    assert!(s.final_pages > 0, "{s:?}");
    r.arrived_identical();
}

#[test]
fn a_refused_load_resumes_the_source() {
    let r = migrate(
        params(50, 5),
        Setup {
            refuse_load: true,
            ..dirtying(5)
        },
    );
    r.source_kept_the_vm("no tap here", 1);
    r.target_in(Phase::Failed);
    assert!(r.log.lock().unwrap().discarded);
}

#[test]
fn a_failed_capture_leaves_the_source_running() {
    let r = migrate(
        params(50, 5),
        Setup {
            source: Some(|s| s.fail_capture = true),
            ..dirtying(5)
        },
    );
    // The capture failed before any pause: nothing to resume.
    r.source_kept_the_vm("capture failed on purpose", 0);
    assert!(r.log.lock().unwrap().discarded);
}

#[test]
fn a_corrupt_stream_is_refused_and_the_source_resumes() {
    // A byte deep inside the first round's page data.
    let r = migrate(
        params(50, 5),
        Setup {
            tamper: Some(Tamper::Flip(3 * MIB)),
            ..dirtying(5)
        },
    );
    let t = r.target_in(Phase::Failed);
    assert!(t.error.as_deref().unwrap().contains("checksum"), "{t:?}");
    let s = r.source_in(Phase::Failed);
    assert!(s.error.as_deref().unwrap().contains("refused"), "{s:?}");
    assert!(!r.handed_over.load(Ordering::SeqCst));
    let log = r.log.lock().unwrap();
    assert!(log.loaded.is_none() && log.discarded);
}

#[test]
fn cancel_before_the_switch_over_keeps_the_source() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("m.sock");
    let listener = Endpoint::Unix(sock.clone()).listen().unwrap();
    // A destination that accepts and then reads slowly.
    let slow = std::thread::spawn(move || {
        use std::io::Read;
        let s = listener.accept(&|| false).unwrap();
        let mut s = match s {
            transport::Stream::Unix(u) => u,
            _ => unreachable!(),
        };
        let mut buf = [0u8; 4096];
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    });
    let source = source_progress();
    let stream = Endpoint::Unix(sock)
        .connect(Duration::from_secs(5))
        .unwrap();
    source.set_stream(&stream);
    let mut sv = PlainSource::new(guest(32));
    let handed_over = sv.handed_over.clone();
    let p = source.clone();
    let sender = std::thread::spawn(move || send::run(&mut sv, stream, &params(50, 5), &p));
    std::thread::sleep(Duration::from_millis(300));
    assert!(source.cancel(), "{:?}", source.status());
    sender.join().unwrap();
    slow.join().unwrap();
    let s = source.status();
    assert_eq!(s.state, Phase::Cancelled, "{s:?}");
    assert!(!handed_over.load(Ordering::SeqCst));
    // A second cancel has nothing to cancel.
    assert!(!source.cancel());
}

#[test]
fn a_destination_that_is_not_ember_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("m.sock");
    let listener = Endpoint::Unix(sock.clone()).listen().unwrap();
    let (target, log, rx) = spawn_target(listener, PlainTarget::new());
    let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    std::io::Write::write_all(&mut s, b"GET / HTTP/1.1\r\n\r\n").unwrap();
    rx.join().unwrap();
    let st = target.status();
    assert_eq!(st.state, Phase::Failed);
    assert!(st.error.unwrap().contains("not an Ember migration stream"));
    assert!(log.lock().unwrap().loaded.is_none());
}

#[test]
fn a_manual_switch_over_waits_for_its_go_ahead_and_passes_overrides_on() {
    let mut p = params(50, 5);
    p.switch_over = SwitchOver::Manual;
    let o = vec![DriveOverride {
        drive_id: "data".into(),
        path_on_host: "nbd://h:10809/vol@2".into(),
    }];
    let r = migrate(
        p,
        Setup {
            go_ahead: Some(o.clone()),
            ..dirtying(5)
        },
    );
    r.source_in(Phase::Completed);
    let log = r.log.lock().unwrap();
    assert_eq!(log.overrides, o);
    assert!(log.resumed);
    drop(log);
    r.arrived_identical();
}

#[test]
fn a_manual_switch_over_that_never_comes_resumes_the_source() {
    let mut p = params(50, 5);
    p.switch_over = SwitchOver::Manual;
    p.switch_over_timeout_ms = 300;
    let r = migrate(p, dirtying(5));
    r.source_kept_the_vm("switch-over", 1);
    let log = r.log.lock().unwrap();
    assert!(log.loaded.is_none() && log.discarded);
}

fn postcopy(after_rounds: Option<u32>) -> SendMigrationParams {
    SendMigrationParams {
        mode: MigrationMode::PostCopy,
        postcopy_after_rounds: after_rounds,
        ..params(1, 10)
    }
}

/// The destination's memory at the end: the source's, but for the marks
/// its guest wrote (which must all be there).
fn check_postcopy_memory(r: &Run) {
    let log = r.log.lock().unwrap();
    let touched = r
        .guest
        .lock()
        .unwrap()
        .take()
        .expect("the guest ran")
        .join()
        .unwrap()
        .expect("the guest saw the source's memory");
    assert_eq!(touched, 8192);
    let dst = log.loaded.clone().unwrap();
    for p in 0..8192u64 {
        let at = GuestAddress(p * 4096);
        let mut got = vec![0u8; 4096];
        let mut want = vec![0u8; 4096];
        dst.read_slice(&mut got, at).unwrap();
        r.src_mem.read_slice(&mut want, at).unwrap();
        if p.is_multiple_of(3) {
            let mark: u64 = dst.read_obj(GuestAddress(p * 4096 + MARK_AT)).unwrap();
            assert_eq!(
                mark,
                0xfeed_0000_0000 + p,
                "page {p} lost the guest's write"
            );
            want[MARK_AT as usize..MARK_AT as usize + 8].copy_from_slice(&mark.to_ne_bytes());
        }
        assert!(got == want, "page {p} differs at the end");
    }
}

#[test]
fn postcopy_resumes_at_once_and_pages_come_on_fault_and_by_push() {
    let r = migrate(postcopy(None), dirtying(20));
    let s = r.source_in(Phase::Completed);
    assert_eq!((s.mode, s.rounds), (MigrationMode::PostCopy, 0), "{s:?}");
    assert!(r.handed_over.load(Ordering::SeqCst));
    assert_eq!(r.resumed.load(Ordering::SeqCst), 0);
    let t = r.target_in(Phase::Completed);
    assert_eq!(t.mode, MigrationMode::PostCopy);
    // Every page went, once, or twice when asked for while on its way
    // (the push skips those already asked for).
    let sent = s.postcopy_pages_on_demand + s.postcopy_pages_pushed;
    assert!(
        (8192..8192 + s.postcopy_pages_on_demand).contains(&sent),
        "{s:?}"
    );
    assert!(t.postcopy_pages_on_demand > 0, "{t:?}");
    assert_eq!(
        t.postcopy_pages_on_demand + t.postcopy_pages_pushed,
        8192,
        "{t:?}"
    );
    assert!(
        t.postcopy_ms.is_some() && s.downtime_ms.is_some(),
        "{t:?} {s:?}"
    );
    check_postcopy_memory(&r);
}

#[test]
fn postcopy_after_rounds_sends_only_what_the_rounds_left_dirty() {
    // Slow enough that the two rounds leave part of memory dirty.
    let r = migrate(postcopy(Some(2)), dirtying(5));
    let s = r.source_in(Phase::Completed);
    assert_eq!((s.mode, s.rounds), (MigrationMode::PostCopy, 2), "{s:?}");
    let after = s.postcopy_pages_on_demand + s.postcopy_pages_pushed;
    assert!(after > 0 && after < 8192, "{s:?}");
    r.target_in(Phase::Completed);
    check_postcopy_memory(&r);
}

#[test]
fn a_postcopy_request_that_converges_in_its_rounds_ends_as_precopy() {
    let mut p = postcopy(Some(3));
    p.downtime_ms = 50;
    let r = migrate(p, dirtying(0));
    let s = r.source_in(Phase::Completed);
    assert_eq!((s.mode, s.rounds), (MigrationMode::PreCopy, 1), "{s:?}");
    let t = r.target.status();
    assert_eq!(
        (t.state, t.mode),
        (Phase::Completed, MigrationMode::PreCopy)
    );
    assert_eq!(t.postcopy_pages_on_demand, 0);
    check_postcopy_memory(&r);
}

#[test]
fn a_source_lost_in_postcopy_stops_the_destination_and_never_resumes() {
    // 4 MiB into the stream: well after the state, mid-push.
    let r = migrate(
        postcopy(None),
        Setup {
            tamper: Some(Tamper::Cut(4 * MIB)),
            ..dirtying(5)
        },
    );
    let t = r.target_in(Phase::Failed);
    let e = t.error.as_deref().unwrap();
    assert!(e.contains("lost the source during post-copy"), "{t:?}");
    assert!(e.contains("cannot continue"), "{t:?}");
    let log = r.log.lock().unwrap();
    assert!(
        log.resumed && log.failed.is_some(),
        "the VM was not stopped"
    );
    // Its guest was woken when the memory was unregistered (it finds zero
    // pages then, which is why the VM had to stop first).
    let _ = r.guest.lock().unwrap().take().unwrap().join().unwrap();
    // Neither side may run the VM on half its memory.
    r.source_kept_the_vm("post-copy", 0);
}

#[test]
fn cancel_is_refused_once_postcopy_runs() {
    let p = Progress::new(Role::Source, "test".into());
    p.update(|s| s.state = Phase::PostCopy);
    assert!(p.status().is_active());
    assert!(!p.cancel());
    assert!(!p.cancelled());
}

#[test]
fn postcopy_parameters_are_checked() {
    let mut p = params(50, 5);
    p.postcopy_after_rounds = Some(2);
    assert!(validate_send(&p).unwrap_err().contains("PostCopy"));
    let mut p = postcopy(Some(11));
    p.max_rounds = 10;
    assert!(validate_send(&p).unwrap_err().contains("max_rounds"));
    let p: SendMigrationParams = serde_json::from_str(
        r#"{"destination_uri": "unix:///m", "mode": "PostCopy", "postcopy_after_rounds": 2}"#,
    )
    .unwrap();
    assert_eq!(p.precopy_rounds(), 2);
    assert!(serde_json::from_str::<SendMigrationParams>(
        r#"{"destination_uri": "unix:///m", "mode": "Lazy"}"#
    )
    .is_err());
}

#[test]
fn a_device_write_after_the_postcopy_pause_keeps_the_vm_on_the_source() {
    let r = migrate(
        postcopy(None),
        Setup {
            source: Some(|s| s.device_writes_after_pause = true),
            ..dirtying(0)
        },
    );
    // Before the switch-over: the source runs the VM on.
    r.source_kept_the_vm("devices wrote 1 pages", 1);
    r.target_in(Phase::Failed);
    let log = r.log.lock().unwrap();
    assert!(!log.resumed && log.discarded);
}
