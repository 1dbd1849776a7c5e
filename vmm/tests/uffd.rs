//! The `Uffd` memory backend without a guest: this process plays the VMM
//! (creates userfaultfd-registered memory and hands it to
//! `ember-uffd-handler`), then touches guest memory itself, so every first
//! touch is a page fault served by the handler from the memory file.
//! userfaultfd needs root here (CI runs as root): without it these tests fail
//! loudly rather than pass.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ember_vmm::snapshot::memory::{GuestMemoryState, MemoryRegionState};
use ember_vmm::snapshot::uffd::{
    create_uffd_memory, send_mappings, GuestRegionUffdMapping, UffdBackend, UffdError,
};
use ember_vmm::vstate::memory::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

const HANDLER: &str = env!("CARGO_BIN_EXE_ember-uffd-handler");
const TIMEOUT: Duration = Duration::from_secs(20);

/// Three regions; the second and third start at nonzero guest addresses
/// and file offsets.
fn layout() -> GuestMemoryState {
    let r = |base_address, size, file_offset| MemoryRegionState {
        base_address,
        size,
        file_offset,
    };
    GuestMemoryState {
        regions: vec![
            r(0, 1 << 20, 0),
            r(4 << 30, 2 << 20, 1 << 20),
            r(5 << 30, 64 << 10, 3 << 20),
        ],
    }
}

/// Every 8-byte word holds its own file offset, scrambled, so a page served
/// from the wrong place shows.
fn pattern(len: usize) -> Vec<u8> {
    (0..len / 8)
        .flat_map(|i| ((i as u64 * 8) ^ 0x9e37_79b9_7f4a_7c15).to_le_bytes())
        .collect()
}

struct HandlerProc {
    child: Child,
    lines: Receiver<String>,
    log: Arc<Mutex<String>>,
    reader: Option<JoinHandle<()>>,
}

impl HandlerProc {
    /// Starts the handler and waits until it listens.
    fn start(sock: &Path, mem_file: &Path, prefault: bool) -> Self {
        Self::start_with(sock, mem_file, if prefault { &["--prefault"] } else { &[] })
    }

    /// The same, with more arguments.
    fn start_with(sock: &Path, mem_file: &Path, extra: &[&str]) -> Self {
        let mut cmd = Command::new(HANDLER);
        cmd.arg("--socket")
            .arg(sock)
            .arg("--mem-file")
            .arg(mem_file)
            .args(extra);
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start ember-uffd-handler");
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        let log = Arc::new(Mutex::new(String::new()));
        let log2 = log.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[handler] {line}");
                log2.lock().unwrap().push_str(&(line.clone() + "\n"));
                let _ = tx.send(line);
            }
        });
        let h = HandlerProc {
            child,
            lines,
            log,
            reader: Some(reader),
        };
        h.wait_line("listening on");
        h
    }

    fn wait_line(&self, needle: &str) -> String {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.contains(needle) => return l,
                Ok(_) => {}
                Err(e) => panic!(
                    "no handler line with {needle:?} ({e:?}); log:\n{}",
                    self.log()
                ),
            }
        }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits for the handler to exit; returns its status and whole log.
    fn wait_exit(&mut self) -> (ExitStatus, String) {
        let deadline = Instant::now() + TIMEOUT;
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(
                Instant::now() < deadline,
                "handler did not exit; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        if let Some(r) = self.reader.take() {
            r.join().unwrap();
        }
        (status, self.log())
    }
}

impl Drop for HandlerProc {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A temp dir with a memory file of `len` bytes of [`pattern`].
fn setup(len: usize) -> (tempfile::TempDir, PathBuf, PathBuf, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let data = pattern(len);
    let mem = dir.path().join("mem");
    std::fs::write(&mem, &data).unwrap();
    let sock = dir.path().join("uffd.sock");
    (dir, sock, mem, data)
}

fn uffd_memory(sock: &Path, state: &GuestMemoryState) -> (GuestMemoryMmap, UffdBackend) {
    match create_uffd_memory(sock, state) {
        Err(e @ UffdError::Unavailable(_)) => panic!(
            "\n*** USERFAULTFD IS UNAVAILABLE, SO THE UFFD BACKEND IS UNTESTED: {e}\n\
             *** run these tests as root (CI does)\n"
        ),
        r => r.expect("create_uffd_memory"),
    }
}

/// Runs `f` on another thread and fails the test if it takes too long (a
/// fault nobody serves blocks forever).
fn with_timeout<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    let t = std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(TIMEOUT) {
        Ok(v) => v,
        Err(RecvTimeoutError::Disconnected) => std::panic::resume_unwind(t.join().unwrap_err()),
        Err(RecvTimeoutError::Timeout) => panic!("{what} hung (page faults not served?)"),
    }
}

fn assert_all_memory_matches(mem: &GuestMemoryMmap, state: &GuestMemoryState, data: &[u8]) {
    for r in &state.regions {
        let mut got = vec![0u8; r.size as usize];
        mem.read_slice(&mut got, GuestAddress(r.base_address))
            .unwrap();
        let want = &data[r.file_offset as usize..(r.file_offset + r.size) as usize];
        assert!(
            got == want,
            "region at {:#x} differs from the memory file",
            r.base_address
        );
    }
}

#[test]
fn handler_serves_faults_from_the_memory_file() {
    let state = layout();
    let (_dir, sock, mem_file, data) = setup(state.total_size() as usize);
    let mut handler = HandlerProc::start(&sock, &mem_file, false);
    let (mem, backend) = uffd_memory(&sock, &state);

    // What was sent describes our memory, in Firecracker's shape.
    let sent = backend.mappings();
    assert_eq!(sent.len(), 3);
    for (m, r) in sent.iter().zip(&state.regions) {
        let host = mem.get_host_address(GuestAddress(r.base_address)).unwrap() as u64;
        assert_eq!(
            (m.base_host_virt_addr, m.size, m.offset),
            (host, r.size, r.file_offset)
        );
        assert_eq!(m.page_bytes(), 4096);
    }

    // It serves under its seccomp filter; stray bytes from the VMM are
    // read (and ignored) under it too.
    handler.wait_line("seccomp filter installed");
    let mut sock = backend.socket();
    sock.write_all(b"junk").unwrap();
    handler.wait_line("ignoring 4 unexpected bytes");

    let mem = Arc::new(mem);
    let (m2, s2, d2) = (mem.clone(), state.clone(), data.clone());
    with_timeout("reading guest memory", move || {
        // Single words first: each touches a fresh page.
        for r in &s2.regions {
            for off in [0, 3 * 4096 + 16, r.size / 2 + 8, r.size - 8] {
                let got: u64 = m2.read_obj(GuestAddress(r.base_address + off)).unwrap();
                let at = (r.file_offset + off) as usize;
                let want = u64::from_le_bytes(d2[at..at + 8].try_into().unwrap());
                assert_eq!(got, want, "region {:#x} offset {off:#x}", r.base_address);
            }
        }
        // A write fault on an untouched page: the page comes from the file,
        // then the write lands on it.
        let r = &s2.regions[1];
        let page = r.base_address + r.size - 2 * 4096;
        m2.write_obj(0xabcd_u32, GuestAddress(page + 100)).unwrap();
        let mut got = vec![0u8; 4096];
        m2.read_slice(&mut got, GuestAddress(page)).unwrap();
        let at = (r.file_offset + r.size - 2 * 4096) as usize;
        let mut want = d2[at..at + 4096].to_vec();
        want[100..104].copy_from_slice(&0xabcd_u32.to_le_bytes());
        assert!(got == want, "write-faulted page differs");
        want.copy_from_slice(&d2[at..at + 4096]);
        m2.write_obj(
            u32::from_le_bytes(want[100..104].try_into().unwrap()),
            GuestAddress(page + 100),
        )
        .unwrap();
        // Then everything.
        assert_all_memory_matches(&m2, &s2, &d2);

        // Pages the VMM discards (remove event) come back as zeroes.
        let page = m2.get_host_address(GuestAddress(5 * 4096)).unwrap();
        // SAFETY: one page of our own guest memory, which nothing borrows.
        let r = unsafe { libc::madvise(page.cast(), 4096, libc::MADV_DONTNEED) };
        assert_eq!(r, 0, "madvise: {}", std::io::Error::last_os_error());
        let mut got = vec![1u8; 4096];
        m2.read_slice(&mut got, GuestAddress(5 * 4096)).unwrap();
        assert!(got.iter().all(|&b| b == 0), "removed page not zero");
    });

    assert!(!backend.handler_hung_up());
    drop(mem);
    drop(backend);
    let (status, log) = handler.wait_exit();
    assert!(
        status.success(),
        "handler failed after the VMM closed: {log}"
    );
    assert!(log.contains("the VMM closed the connection"), "{log}");
    // At least one fault per page (all were touched) plus the removed one.
    let served: u64 = log
        .split("served ")
        .nth(1)
        .and_then(|t| t.split(' ').next()?.parse().ok())
        .expect("fault count in the log");
    assert!(served > state.total_size() / 4096, "{log}");
}

#[test]
fn prefault_populates_everything_before_the_first_touch() {
    let state = layout();
    let (_dir, sock, mem_file, data) = setup(state.total_size() as usize);
    let mut handler = HandlerProc::start(&sock, &mem_file, true);
    let (mem, backend) = uffd_memory(&sock, &state);
    handler.wait_line("prefaulted");

    // Every page is resident before this process has touched any.
    for m in backend.mappings() {
        let pages = (m.size / 4096) as usize;
        let mut vec = vec![0u8; pages];
        // SAFETY: the range is our own guest memory mapping and `vec` has
        // one byte per page of it.
        let r = unsafe {
            libc::mincore(
                m.base_host_virt_addr as *mut libc::c_void,
                m.size as usize,
                vec.as_mut_ptr(),
            )
        };
        assert_eq!(r, 0, "mincore: {}", std::io::Error::last_os_error());
        let missing = vec.iter().filter(|&&b| b & 1 == 0).count();
        assert_eq!(
            missing, 0,
            "{missing} of {pages} pages at {:#x} not prefaulted",
            m.base_host_virt_addr
        );
    }

    let mem = Arc::new(mem);
    let (m2, s2) = (mem.clone(), state.clone());
    with_timeout("reading prefaulted memory", move || {
        assert_all_memory_matches(&m2, &s2, &data)
    });
    drop(mem);
    drop(backend);
    let (status, log) = handler.wait_exit();
    assert!(status.success(), "{log}");
    assert!(log.contains("served 0 page faults"), "{log}");
}

/// Which pages of the mapping at `addr` (`len` bytes) are resident.
fn resident(addr: u64, len: u64) -> Vec<bool> {
    let mut vec = vec![0u8; (len / 4096) as usize];
    // SAFETY: the range is our own guest memory mapping and `vec` has one
    // byte per page of it.
    let r = unsafe { libc::mincore(addr as *mut libc::c_void, len as usize, vec.as_mut_ptr()) };
    assert_eq!(r, 0, "mincore: {}", std::io::Error::last_os_error());
    vec.iter().map(|b| b & 1 == 1).collect()
}

#[test]
fn a_working_set_is_installed_before_the_first_touch_and_the_rest_on_demand() {
    use ember_vmm::snapshot::working_set::WorkingSet;
    let state = layout();
    let (dir, sock, mem_file, data) = setup(state.total_size() as usize);
    // Pages 1-2 and the last of region 0, 0 of region 1 (file page 256,
    // right after region 0: one run across the boundary), 3 of region 2.
    let mut bits: Vec<Vec<u64>> = state
        .regions
        .iter()
        .map(|r| vec![0; (r.size / 4096).div_ceil(64) as usize])
        .collect();
    bits[0][0] |= 0b110;
    bits[0][3] |= 1 << 63;
    bits[1][0] |= 1;
    bits[2][0] |= 1 << 3;
    let ws = WorkingSet::from_bitmaps(&state, &bits);
    assert_eq!(ws.runs, vec![(1, 2), (255, 2), (771, 1)]);
    let ws_path = dir.path().join("ws");
    ws.write(&ws_path).unwrap();

    let ws_arg = ws_path.to_str().unwrap();
    let mut handler = HandlerProc::start_with(&sock, &mem_file, &["--working-set", ws_arg]);
    let (mem, backend) = uffd_memory(&sock, &state);
    handler.wait_line("prefaulted");

    let maps = backend.mappings();
    let want: [&[usize]; 3] = [&[1, 2, 255], &[0], &[3]];
    for (m, want) in maps.iter().zip(want) {
        let present: Vec<usize> = resident(m.base_host_virt_addr, m.size)
            .iter()
            .enumerate()
            .filter_map(|(i, &p)| p.then_some(i))
            .collect();
        assert_eq!(present, want, "region at {:#x}", m.base_host_virt_addr);
    }

    let mem = Arc::new(mem);
    let (m2, s2) = (mem.clone(), state.clone());
    with_timeout("reading memory after the working set", move || {
        assert_all_memory_matches(&m2, &s2, &data)
    });
    drop(mem);
    drop(backend);
    let (status, log) = handler.wait_exit();
    assert!(status.success(), "{log}");
    let pages = state.total_size() / 4096;
    assert!(
        log.contains(&format!("served {} page faults", pages - 5)),
        "every page but the 5 of the set faulted once: {log}"
    );
}

#[test]
fn a_working_set_of_another_snapshot_is_refused() {
    use ember_vmm::snapshot::working_set::WorkingSet;
    let state = layout();
    let (dir, sock, mem_file, _) = setup(state.total_size() as usize);
    let small = GuestMemoryState {
        regions: vec![MemoryRegionState {
            base_address: 0,
            size: 1 << 20,
            file_offset: 0,
        }],
    };
    let ws = WorkingSet::from_bitmaps(&small, &[vec![1; 4]]);
    let ws_path = dir.path().join("ws");
    ws.write(&ws_path).unwrap();
    let mut handler = HandlerProc::start_with(
        &sock,
        &mem_file,
        &["--working-set", ws_path.to_str().unwrap()],
    );
    let (_mem, backend) = uffd_memory(&sock, &state);
    let (status, log) = handler.wait_exit();
    drop(backend);
    assert!(!status.success(), "{log}");
    assert!(
        log.contains("is not a working set of this snapshot"),
        "{log}"
    );
}

#[test]
fn vmm_side_errors_are_clear() {
    let state = layout();
    let dir = tempfile::tempdir().unwrap();

    let missing = dir.path().join("nobody.sock");
    let e = create_uffd_memory(&missing, &state).unwrap_err();
    assert!(matches!(e, UffdError::NoHandler(_)), "{e}");
    assert!(
        e.to_string().contains("no page-fault handler socket at"),
        "{e}"
    );

    // A socket file nobody listens on any more.
    let stale = dir.path().join("stale.sock");
    drop(UnixListener::bind(&stale).unwrap());
    let e = create_uffd_memory(&stale, &state).unwrap_err();
    assert!(matches!(e, UffdError::Refused { .. }), "{e}");
    assert!(e.to_string().contains("refused"), "{e}");

    let mut bad = state.clone();
    bad.regions[1].file_offset += 4096;
    let e = create_uffd_memory(&missing, &bad).unwrap_err();
    assert!(matches!(e, UffdError::Layout(_)), "{e}");
}

#[test]
fn handler_refuses_a_memory_file_too_short_for_the_mappings() {
    let state = layout();
    let (_dir, sock, mem_file, _) = setup(state.total_size() as usize - 4096);
    let mut handler = HandlerProc::start(&sock, &mem_file, false);
    // The VMM side cannot tell (the protocol has no reply)...
    let (mem, backend) = uffd_memory(&sock, &state);
    let (status, log) = handler.wait_exit();
    assert!(!status.success(), "{log}");
    assert!(log.contains("lies outside the memory file"), "{log}");
    assert!(!log.contains("panicked"), "{log}");
    // ...until it sees the handler hang up; it must not touch memory then.
    let deadline = Instant::now() + TIMEOUT;
    while !backend.handler_hung_up() {
        assert!(
            Instant::now() < deadline,
            "VMM side never saw the handler go away"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(mem);
}

/// Plays a bad VMM against a fresh handler; returns the handler's log
/// after checking it failed cleanly.
fn bad_vmm(send: impl FnOnce(&UnixStream)) -> String {
    let (_dir, sock, mem_file, _) = setup(1 << 20);
    let mut handler = HandlerProc::start(&sock, &mem_file, false);
    let stream = UnixStream::connect(&sock).unwrap();
    send(&stream);
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let (status, log) = handler.wait_exit();
    assert!(!status.success(), "{log}");
    assert!(!log.contains("panicked"), "{log}");
    log
}

#[test]
fn handler_rejects_bad_input_without_panicking() {
    let one = vec![GuestRegionUffdMapping {
        base_host_virt_addr: 0x7f00_0000_0000,
        size: 1 << 20,
        offset: 0,
        page_size: 4096,
        page_size_kib: None,
    }];

    let log = bad_vmm(|s| {
        (&*s)
            .write_all(b"[{\"base_host_virt_addr\": oops}]")
            .unwrap()
    });
    assert!(log.contains("malformed memory mappings"), "{log}");

    let log = bad_vmm(|s| (&*s).write_all(b"[{\"base_host_virt").unwrap());
    assert!(
        log.contains("in the middle of the memory mappings"),
        "{log}"
    );

    let log = bad_vmm(|s| send_mappings(s, &one, None).unwrap());
    assert!(log.contains("without a userfaultfd attached"), "{log}");

    let not_uffd = std::fs::File::open("/dev/null").unwrap();
    let log = bad_vmm(|s| send_mappings(s, &one, Some(not_uffd.as_fd())).unwrap());
    assert!(log.contains("not a userfaultfd"), "{log}");

    let log = bad_vmm(|_| {});
    assert!(log.contains("without sending the memory mappings"), "{log}");
}

/// Starts a handler with `--seccomp-self-test CALL`, plays the VMM (so the
/// handler sets up for real and confines itself), and returns its exit
/// status, stdout and log.
fn confined_call(call: &str) -> (ExitStatus, String, String) {
    let state = GuestMemoryState {
        regions: vec![MemoryRegionState {
            base_address: 0,
            size: 64 << 10,
            file_offset: 0,
        }],
    };
    let (_dir, sock, mem_file, _) = setup(state.total_size() as usize);
    let mut handler = HandlerProc::start_with(&sock, &mem_file, &["--seccomp-self-test", call]);
    let mut stdout = handler.child.stdout.take().unwrap();
    let (mem, backend) = uffd_memory(&sock, &state);
    let (status, log) = handler.wait_exit();
    let mut out = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut out).unwrap();
    drop((mem, backend));
    (status, out, log)
}

/// Every call `seccomp::FORBIDDEN` lists for the handler, made by the real
/// `ember-uffd-handler` after its real setup, under its real filter: each
/// must end it with exit code 148 and the call logged. The calls
/// `PERMITTED` to it go through.
#[test]
fn the_confined_handler_is_killed_for_every_forbidden_call() {
    use ember_vmm::seccomp::{ThreadKind, FORBIDDEN, PERMITTED, SECCOMP_VIOLATION_EXIT};
    let kind = ThreadKind::UffdHandler;
    let mut rows = Vec::new();
    let mut allowed = 0;
    for a in FORBIDDEN.iter().filter(|a| a.kinds.contains(&kind)) {
        let (status, out, log) = confined_call(a.name);
        let killed = status.code() == Some(SECCOMP_VIOLATION_EXIT)
            && log.contains(&format!(
                "ember-uffd-handler: seccomp violation: syscall {} blocked",
                a.nr
            ))
            && log.contains("seccomp filter installed");
        if !killed {
            allowed += 1;
            eprintln!("NOT KILLED: {}: {status:?}\n{out}\n{log}", a.name);
        }
        rows.push(format!(
            "{:<28} {}",
            a.name,
            if killed { "killed (148)" } else { "ALLOWED" }
        ));
    }
    eprintln!("{}", rows.join("\n"));
    eprintln!("{} attempts, {allowed} allowed", rows.len());
    assert!(rows.len() > 40, "{}", rows.len());
    assert_eq!(allowed, 0);

    let mut permitted = 0;
    for a in PERMITTED.iter().filter(|a| a.kinds.contains(&kind)) {
        let (status, out, log) = confined_call(a.name);
        assert!(status.success(), "{}: {status:?}\n{out}\n{log}", a.name);
        assert!(
            out.contains(a.name) && !out.contains("returned -1"),
            "{out}"
        );
        permitted += 1;
    }
    assert!(permitted > 0);
}
