//! The client against real NBD servers (qemu-nbd, nbdkit, nbd-server) run
//! on unix sockets in a temp dir. A server that is not installed is skipped
//! with a message, not passed silently.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{Durability, NbdClient, NbdEngine, NbdError, NbdUri, Op, MAX_REQUEST};

const SIZE: u64 = 4 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    QemuNbd,
    Nbdkit,
    NbdServer,
}

const ALL: [Kind; 3] = [Kind::QemuNbd, Kind::Nbdkit, Kind::NbdServer];

fn binary(kind: Kind) -> &'static str {
    match kind {
        Kind::QemuNbd => "qemu-nbd",
        Kind::Nbdkit => "nbdkit",
        Kind::NbdServer => "nbd-server",
    }
}

fn installed(kind: Kind) -> bool {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(binary(kind)).is_file()))
        .unwrap_or(false);
    if !found {
        eprintln!("SKIPPED for {}: not installed", binary(kind));
    }
    found
}

/// A server process serving `image` on `sock`; killed on drop.
struct Server {
    kind: Kind,
    dir: PathBuf,
    image: PathBuf,
    sock: PathBuf,
    filters: Vec<String>,
    child: Option<Child>,
    /// The temp dir of [`Server::started`], removed after the server.
    _tmp: Option<tempfile::TempDir>,
}

impl Server {
    /// A `kind` server in a temp dir of its own; None (the test skips)
    /// when it is not installed.
    fn started(kind: Kind, filters: &[&str]) -> Option<Server> {
        if !installed(kind) {
            return None;
        }
        let tmp = tempfile::tempdir().unwrap();
        let mut s = Server::start(kind, tmp.path(), filters);
        s._tmp = Some(tmp);
        Some(s)
    }

    fn start(kind: Kind, dir: &Path, filters: &[&str]) -> Server {
        let image = dir.join("disk.img");
        if !image.exists() {
            let f = std::fs::File::create(&image).unwrap();
            f.set_len(SIZE).unwrap();
        }
        let mut s = Server {
            kind,
            dir: dir.to_path_buf(),
            image,
            sock: dir.join("nbd.sock"),
            filters: filters.iter().map(|f| f.to_string()).collect(),
            child: None,
            _tmp: None,
        };
        s.spawn();
        s
    }

    fn uri(&self) -> NbdUri {
        let export = if self.kind == Kind::NbdServer {
            "exp"
        } else {
            ""
        };
        NbdUri::parse(&format!(
            "nbd+unix:///{export}?socket={}",
            self.sock.display()
        ))
        .unwrap()
    }

    fn spawn(&mut self) {
        let _ = std::fs::remove_file(&self.sock);
        let mut cmd = match self.kind {
            Kind::QemuNbd => {
                let mut c = Command::new("qemu-nbd");
                c.args([
                    "-f",
                    "raw",
                    "--persistent",
                    "--shared=0",
                    "--cache=writeback",
                ])
                .arg("-k")
                .arg(&self.sock)
                .arg(&self.image);
                c
            }
            Kind::Nbdkit => {
                let mut c = Command::new("nbdkit");
                c.args(["-f", "-U"]).arg(&self.sock);
                let (filters, params): (Vec<_>, Vec<_>) =
                    self.filters.iter().partition(|f| !f.contains('='));
                for f in filters {
                    c.arg(format!("--filter={f}"));
                }
                c.arg("file").arg(&self.image).args(params);
                c
            }
            Kind::NbdServer => {
                let conf = self.dir.join("nbd-server.conf");
                std::fs::write(
                    &conf,
                    format!(
                        "[generic]\nunixsock = {}\n[exp]\nexportname = {}\n",
                        self.sock.display(),
                        self.image.display()
                    ),
                )
                .unwrap();
                let mut c = Command::new("nbd-server");
                c.arg("-C").arg(&conf).arg("-d");
                c
            }
        };
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.sock.exists() {
            assert!(Instant::now() < deadline, "{:?} did not listen", self.kind);
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn file_bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        let data = std::fs::read(&self.image).unwrap();
        data[offset as usize..offset as usize + len].to_vec()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

fn client(server: &Server, timeout: Duration) -> NbdClient {
    NbdClient::connect(server.uri(), timeout, Durability::OnFlush).unwrap()
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

#[test]
fn read_write_flush_against_each_server() {
    for kind in ALL {
        let Some(server) = Server::started(kind, &[]) else {
            continue;
        };
        let mut c = client(&server, Duration::from_secs(10));
        assert_eq!(c.size(), SIZE, "{kind:?}");
        assert!(!c.read_only());
        let expect_structured = kind != Kind::NbdServer;
        assert_eq!(c.info().structured, expect_structured, "{kind:?}");
        // Larger than one request, unaligned to it.
        let data = pattern(1, (1 << 20) + 3 * 4096);
        c.write_at(&data, 8192).unwrap();
        c.flush().unwrap();
        let mut back = vec![0; data.len()];
        c.read_at(&mut back, 8192).unwrap();
        assert!(back == data, "{kind:?}: read back differs");
        assert!(server.file_bytes(8192, data.len()) == data, "{kind:?}");
        // Reads past the end are refused by the server, not a hang.
        let mut past = [0u8; 512];
        assert!(c.read_at(&mut past, SIZE).is_err(), "{kind:?}");
        // The connection is still usable afterwards.
        c.read_at(&mut past, 0).unwrap();
    }
}

#[test]
fn server_restart_is_survived() {
    for kind in ALL {
        let Some(mut server) = Server::started(kind, &[]) else {
            continue;
        };
        let mut c = client(&server, Duration::from_secs(10));
        let flushed = pattern(2, 64 * 1024);
        c.write_at(&flushed, 0).unwrap();
        c.flush().unwrap();
        server.kill();
        // The server comes back after the client noticed it was gone.
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let restart = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            server.spawn();
            // nbdkit exits when the thread that started it does (parent
            // death signal), so this thread lives until the reads are done.
            let _ = done_rx.recv();
            server
        });
        let mut back = vec![0; flushed.len()];
        c.read_at(&mut back, 0)
            .unwrap_or_else(|e| panic!("{kind:?}: {e}"));
        assert!(back == flushed, "{kind:?}: flushed data after restart");
        let more = pattern(3, 4096);
        c.write_at(&more, 1 << 20).unwrap();
        c.flush().unwrap();
        drop(done_tx);
        let server = restart.join().unwrap();
        assert!(server.file_bytes(1 << 20, 4096) == more, "{kind:?}");
    }
}

/// The memory plugin forgets everything on restart: unflushed writes the
/// guest was told about come back only through the client's replay.
#[test]
fn unflushed_writes_are_replayed_after_reconnect() {
    if !installed(Kind::Nbdkit) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("mem.sock");
    let spawn = || {
        let _ = std::fs::remove_file(&sock);
        let child = Command::new("nbdkit")
            .args(["-f", "-U"])
            .arg(&sock)
            .args(["memory", "size=4M"])
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        while !sock.exists() {
            std::thread::sleep(Duration::from_millis(10));
        }
        child
    };
    let mut child = spawn();
    let uri = NbdUri::parse(&format!("nbd+unix:///?socket={}", sock.display())).unwrap();
    let mut c = NbdClient::connect(uri, Duration::from_secs(10), Durability::OnFlush).unwrap();
    let data = pattern(4, 8192);
    c.write_at(&data, 4096).unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let mut child = spawn();
    let mut back = vec![0; data.len()];
    c.read_at(&mut back, 4096).unwrap();
    assert!(back == data, "unflushed write lost across restart");
    c.flush().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn server_errors_fail_the_request_without_retry() {
    let Some(server) = Server::started(
        Kind::Nbdkit,
        &["error", "error-pread-rate=100%", "error=EIO"],
    ) else {
        return;
    };
    let mut c = client(&server, Duration::from_secs(10));
    let mut buf = [0u8; 4096];
    let t = Instant::now();
    let err = c.read_at(&mut buf, 0).unwrap_err();
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "retried a server error"
    );
    assert!(err.to_string().contains("server error 5"), "{err}");
    // Writes still work on the same connection.
    c.write_at(&buf, 0).unwrap();
    c.flush().unwrap();
}

#[test]
fn request_timeout_fails_the_request() {
    let Some(server) = Server::started(Kind::Nbdkit, &["delay", "rdelay=5"]) else {
        return;
    };
    let mut c = client(&server, Duration::from_millis(300));
    let mut buf = [0u8; 512];
    let t = Instant::now();
    assert!(c.read_at(&mut buf, 0).is_err());
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    // Writes are not delayed: the client is usable after the failure.
    c.write_at(&buf, 0).unwrap();
}

#[test]
fn unreachable_and_garbage_servers_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let uri = NbdUri::parse(&format!(
        "nbd+unix:///?socket={}",
        dir.path().join("none.sock").display()
    ))
    .unwrap();
    let err = NbdClient::connect(uri, Duration::from_secs(1), Durability::None)
        .err()
        .unwrap();
    assert!(err.is_transport(), "{err}");

    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let garbage = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\nnot nbd at all");
        let mut sink = [0u8; 64];
        let _ = s.read(&mut sink);
    });
    let uri = NbdUri::parse(&format!("nbd://127.0.0.1:{port}/x")).unwrap();
    let err = NbdClient::connect(uri, Duration::from_secs(2), Durability::None)
        .err()
        .unwrap();
    assert!(matches!(err, NbdError::Protocol(_)), "{err}");
    garbage.join().unwrap();
}

#[test]
fn unknown_export_is_refused() {
    let Some(server) = Server::started(Kind::QemuNbd, &[]) else {
        return;
    };
    let mut uri = server.uri();
    uri.export = "nope".into();
    let err = NbdClient::connect(uri, Duration::from_secs(2), Durability::None)
        .err()
        .unwrap();
    assert!(matches!(err, NbdError::Refused { .. }), "{err}");
}

#[test]
fn trim_and_write_zeroes() {
    for kind in ALL {
        let Some(server) = Server::started(kind, &[]) else {
            continue;
        };
        let mut c = client(&server, Duration::from_secs(10));
        c.write_at(&pattern(5, 64 * 1024), 0).unwrap();
        if c.can_write_zeroes() {
            c.write_zeroes(4096, 8192).unwrap();
            let mut back = vec![0xffu8; 8192];
            c.read_at(&mut back, 4096).unwrap();
            assert!(back.iter().all(|&b| b == 0), "{kind:?}");
        } else {
            eprintln!("{kind:?} does not offer WRITE_ZEROES");
            assert!(c.write_zeroes(0, 512).is_err());
        }
        if c.can_trim() {
            c.trim(32 * 1024, 4096).unwrap();
        } else {
            eprintln!("{kind:?} does not offer TRIM");
        }
        c.flush().unwrap();
    }
}

/// Waits for every operation submitted to `e`; returns the completions by id.
fn wait_all(e: &NbdEngine, n: usize) -> std::collections::HashMap<u64, std::io::Result<Vec<u8>>> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut out = std::collections::HashMap::new();
    while out.len() < n {
        assert!(Instant::now() < deadline, "{} of {n} completed", out.len());
        e.wait_idle(Duration::from_millis(100));
        for c in e.take_completions() {
            out.insert(c.id, c.result);
        }
    }
    out
}

fn engine(server: &Server, timeout: Duration) -> NbdEngine {
    NbdEngine::connect(server.uri(), timeout, Durability::OnFlush).unwrap()
}

/// Many operations at once, some split into several NBD requests: every
/// reply reaches its own request, whatever order the server answers in.
#[test]
fn many_in_flight_against_each_server() {
    for kind in ALL {
        let Some(server) = Server::started(kind, &[]) else {
            continue;
        };
        let e = engine(&server, Duration::from_secs(10));
        let len = 8192;
        for i in 0..48u64 {
            e.submit(i, Op::Write(pattern(i as u8, len)), i * len as u64);
        }
        // Larger than one NBD request: three pieces in flight.
        let big = pattern(99, 2 * MAX_REQUEST + 4096);
        e.submit(100, Op::Write(big.clone()), 1 << 20);
        for (id, r) in wait_all(&e, 49) {
            r.unwrap_or_else(|err| panic!("{kind:?}: write {id}: {err}"));
        }
        e.submit(200, Op::Flush, 0);
        wait_all(&e, 1)[&200].as_ref().unwrap();
        for i in 0..48u64 {
            e.submit(i, Op::Read(len), i * len as u64);
        }
        e.submit(100, Op::Read(big.len()), 1 << 20);
        let reads = wait_all(&e, 49);
        for i in 0..48u64 {
            let got = reads[&i].as_ref().unwrap();
            assert!(*got == pattern(i as u8, len), "{kind:?}: read {i} differs");
        }
        assert!(*reads[&100].as_ref().unwrap() == big, "{kind:?}: big read");
        assert!(server.file_bytes(1 << 20, big.len()) == big, "{kind:?}");
    }
}

/// nbdkit's log filter (outermost) records each request as it arrives and
/// the pause filter holds them: all of them are on the server at once.
#[test]
fn requests_are_on_the_wire_together() {
    if !installed(Kind::Nbdkit) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("requests.log");
    let control = dir.path().join("pause.sock");
    let server = Server::start(
        Kind::Nbdkit,
        dir.path(),
        &[
            "log",
            "pause",
            &format!("logfile={}", log.display()),
            &format!("pause-control={}", control.display()),
        ],
    );
    let e = engine(&server, Duration::from_secs(30));
    let mut ctl = std::os::unix::net::UnixStream::connect(&control).unwrap();
    let mut answer = [0u8; 1];
    ctl.write_all(b"p").unwrap();
    ctl.read_exact(&mut answer).unwrap();
    assert_eq!(&answer, b"P");
    for i in 0..8u64 {
        e.submit(i, Op::Read(4096), i * 65536);
    }
    let arrived = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(" Read id=") && l.ends_with("..."))
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while arrived() < 8 {
        assert!(
            Instant::now() < deadline,
            "only {} of 8 reads reached the server",
            arrived()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(e.in_flight(), 8, "held by the paused server");
    assert!(e.take_completions().is_empty());
    ctl.write_all(b"r").unwrap();
    ctl.read_exact(&mut answer).unwrap();
    for (id, r) in wait_all(&e, 8) {
        assert_eq!(r.unwrap().len(), 4096, "read {id}");
    }
}

/// The server is killed with requests in flight and comes back: they are
/// sent again and complete, and flushed data is on the server.
#[test]
fn server_restart_with_requests_in_flight() {
    for kind in ALL {
        let Some(mut server) = Server::started(kind, &[]) else {
            continue;
        };
        let e = engine(&server, Duration::from_secs(20));
        let len = 64 * 1024;
        for i in 0..32u64 {
            e.submit(i, Op::Write(pattern(i as u8 ^ 0x55, len)), i * len as u64);
        }
        server.kill();
        std::thread::sleep(Duration::from_millis(300));
        server.spawn();
        for (id, r) in wait_all(&e, 32) {
            r.unwrap_or_else(|err| panic!("{kind:?}: write {id}: {err}"));
        }
        e.submit(99, Op::Flush, 0);
        wait_all(&e, 1)[&99]
            .as_ref()
            .unwrap_or_else(|err| panic!("{kind:?}: flush: {err}"));
        for i in 0..32u64 {
            assert!(
                server.file_bytes(i * len as u64, len) == pattern(i as u8 ^ 0x55, len),
                "{kind:?}: write {i} missing after restart"
            );
        }
        for i in 0..32u64 {
            e.submit(i, Op::Read(len), i * len as u64);
        }
        for (id, r) in wait_all(&e, 32) {
            assert!(r.unwrap() == pattern(id as u8 ^ 0x55, len), "{kind:?}");
        }
    }
}

/// A server that fails every write (nbdkit's error filter): each write in
/// flight fails on its own, none is retried, reads keep working.
#[test]
fn server_errors_fail_each_request_in_flight() {
    let Some(server) = Server::started(
        Kind::Nbdkit,
        &["error", "error-pwrite-rate=100%", "error=ENOSPC"],
    ) else {
        return;
    };
    let e = engine(&server, Duration::from_secs(10));
    for i in 0..8u64 {
        e.submit(i, Op::Write(vec![1; 4096]), i * 4096);
    }
    e.submit(8, Op::Read(4096), 0);
    let done = wait_all(&e, 9);
    for i in 0..8u64 {
        let err = done[&i].as_ref().unwrap_err().to_string();
        assert!(err.contains("server error 28"), "{err}");
    }
    assert!(done[&8].is_ok());
}
