//! volumed's NBD server (`nbd::server::serve`: the fixed newstyle
//! handshake, then requests) driven by fuzzed client bytes through an
//! in-memory pipe, against a real `Registry` over a temp dir (tmpfs where
//! there is one) and a real file export.
//!
//! The registry holds `vol` (4 MiB) and `big` (160 MiB, sparse: over the
//! 128 MiB a single allocation may take, so a request length that sizes a
//! buffer shows; slower to serve, so only when asked for) attached with
//! credentials, `other` attached with another, and `old`, whose first
//! credential went stale when it moved to another host. Credentials are
//! random, made at start: no input can hold one.
//!
//! Input: a mode byte, then the client's bytes.
//! - bit 0: serve the file export (else the volumes).
//! - bit 1: the target writes a well-formed handshake first (client flags,
//!   then `NBD_OPT_GO`, or `NBD_OPT_EXPORT_NAME` if bit 4, for an export
//!   name it picks with bits 2-3: 0 `vol` with its credential, 1 `vol`
//!   with a credential one character off, 2 `old` with its stale
//!   credential, 3 `vol` with `other`'s credential), and the rest of the
//!   input is the request phase. Else the input is the whole client side.
//! - bit 6, with the right credential: `big` instead of `vol`.
//! - bit 5, with the right credential for `vol`: `vol` moves to another host (a new
//!   credential) once the handshake is done, before the first request.
//!
//! Checks: no panic, no allocation over 128 MiB (`LimitAlloc`), and a
//! volume is opened (the server's "serving" line) only with the handshake
//! this target wrote with the right credential, and then always; after a
//! move, every request is refused (no reply without an error). The file
//! export never changes.
#![no_main]

use std::cell::{Cell, RefCell};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use ember_nbd::*;
use ember_volumed::nbd::{Exports, FileExport, SetTimeouts, Timeouts};
use ember_volumed::registry::{export_name, Registry};
use ember_volumed::store::{State, StateStore};
use libfuzzer_sys::fuzz_target;
// Links ember_fuzz, whose global allocator aborts on one allocation over 128 MiB.
use ember_fuzz as _;

const VOL_SIZE: u64 = 4 << 20;
const BIG_SIZE: u64 = 160 << 20;
const FILE_SIZE: usize = 64 << 10;

/// The registry's state in memory (the embedded store would fsync each
/// change; the state only changes at start here).
struct MemStore(Mutex<State>);

impl StateStore for MemStore {
    fn load(&self) -> io::Result<State> {
        Ok(self.0.lock().unwrap().clone())
    }
    fn save(&self, state: &State) -> io::Result<()> {
        *self.0.lock().unwrap() = state.clone();
        Ok(())
    }
}

struct World {
    reg: Arc<Registry>,
    volumes: Exports,
    file: Exports,
    file_data: Vec<u8>,
    file_path: std::path::PathBuf,
    images: [std::path::PathBuf; 2],
    /// Export names: `vol` right, one character off, `old` stale, `vol`
    /// with `other`'s credential; `big` right.
    names: Mutex<[String; 5]>,
    _dir: tempfile::TempDir,
}

/// Records the server's "serving" lines (the export it opened).
struct Opened(Mutex<Vec<String>>);

impl log::Log for Opened {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::Level::Info
    }
    fn log(&self, r: &log::Record) {
        if r.level() == log::Level::Info && r.target().starts_with("ember_volumed::nbd::server") {
            let msg = r.args().to_string();
            if msg.starts_with("nbd fuzz: serving ") {
                self.0.lock().unwrap().push(msg);
            }
        }
    }
    fn flush(&self) {}
}

static OPENED: Opened = Opened(Mutex::new(Vec::new()));

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        log::set_logger(&OPENED).expect("logger");
        log::set_max_level(log::LevelFilter::Info);
        let dir = match std::fs::metadata("/dev/shm") {
            Ok(m) if m.is_dir() => tempfile::tempdir_in("/dev/shm"),
            _ => tempfile::tempdir(),
        }
        .expect("temp dir");
        let reg = Registry::open(dir.path(), Box::new(MemStore(Mutex::new(State::new()))))
            .expect("registry");
        reg.create("vol", VOL_SIZE, None).expect("vol");
        reg.create("big", BIG_SIZE, None).expect("big");
        reg.create("other", 1 << 20, None).expect("other");
        reg.create("old", 1 << 20, None).expect("old");
        let vol = reg.attach("vol", "host-a", None).expect("attach vol");
        let big = reg.attach("big", "host-a", None).expect("attach big");
        let other = reg.attach("other", "host-a", None).expect("attach other");
        let stale = reg.attach("old", "host-a", None).expect("attach old");
        reg.move_to("old", "host-b", None).expect("move old");
        let mut off = vol.credential.clone().into_bytes();
        off[7] = if off[7] == b'0' { b'1' } else { b'0' };
        let names = [
            export_name("vol", &vol.credential),
            export_name("vol", std::str::from_utf8(&off).unwrap()),
            export_name("old", &stale.credential),
            export_name("vol", &other.credential),
            export_name("big", &big.credential),
        ];
        let file_data: Vec<u8> = (0..FILE_SIZE).map(|i| (i * 7 + i / 4096) as u8).collect();
        let file_path = dir.path().join("export.img");
        std::fs::write(&file_path, &file_data).expect("file export");
        let file = FileExport {
            name: "disk".into(),
            file: std::fs::File::open(&file_path).expect("open the export"),
            size: FILE_SIZE as u64,
        };
        World {
            images: [reg.image_path("vol"), reg.image_path("big")],
            reg: reg.clone(),
            volumes: Exports::Volumes(reg),
            file: Exports::File(Arc::new(file)),
            file_data,
            file_path,
            names: Mutex::new(names),
            _dir: dir,
        }
    })
}

/// The client's side of the pipe, as the server reads it. With a fence,
/// reads stop at the end of the handshake the target wrote; the next read
/// (the first request's) moves `vol` away first and notes how much the
/// server had written by then.
struct ClientBytes<'a> {
    data: &'a [u8],
    pos: usize,
    fence: Option<(usize, &'a Cell<Option<usize>>, &'a Sink)>,
}

impl Read for ClientBytes<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut end = self.data.len();
        if let Some((handshake, fenced_at, sink)) = self.fence {
            if self.pos < handshake {
                end = handshake;
            } else if fenced_at.get().is_none() {
                world()
                    .reg
                    .move_to("vol", "host-b", None)
                    .expect("move vol");
                fenced_at.set(Some(sink.out.borrow().len()));
            }
        }
        let n = buf.len().min(end - self.pos);
        buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// What the server writes to the client: kept (up to a bound) when a
/// fence's replies are to be read, else counted.
struct Sink {
    out: RefCell<Vec<u8>>,
    keep: bool,
    total: Cell<u64>,
}

impl Write for &Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.total.set(self.total.get() + buf.len() as u64);
        let mut out = self.out.borrow_mut();
        if self.keep && out.len() < 1 << 20 {
            out.extend_from_slice(buf);
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl SetTimeouts for ClientBytes<'_> {
    fn set_read_timeout(&self, _: Option<Duration>) -> io::Result<()> {
        Ok(())
    }
    fn set_write_timeout(&self, _: Option<Duration>) -> io::Result<()> {
        Ok(())
    }
}

impl SetTimeouts for &Sink {
    fn set_read_timeout(&self, _: Option<Duration>) -> io::Result<()> {
        Ok(())
    }
    fn set_write_timeout(&self, _: Option<Duration>) -> io::Result<()> {
        Ok(())
    }
}

fn option(out: &mut Vec<u8>, opt: u32, data: &[u8]) {
    out.extend(encode_option(opt, data).expect("a short option"));
}

fuzz_target!(|data: &[u8]| {
    let w = world();
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let file = mode & 1 != 0;
    let handshake = mode & 2 != 0;
    let mut which = ((mode >> 2) & 3) as usize;
    let export_name_opt = mode & 16 != 0;
    if which == 0 && mode & 64 != 0 {
        which = 4;
    }
    let fence = handshake && !file && which == 0 && mode & 32 != 0;
    let names = w.names.lock().unwrap().clone();

    let mut client = Vec::new();
    if handshake {
        client.extend_from_slice(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes());
        let name = if file { "disk" } else { names[which].as_str() };
        if export_name_opt {
            option(&mut client, OPT_EXPORT_NAME, name.as_bytes());
        } else {
            let go = GoRequest {
                export: name.to_string(),
                info_requests: vec![],
            };
            option(&mut client, OPT_GO, &go.encode().expect("a short name"));
        }
    }
    let handshake_len = client.len();
    client.extend_from_slice(rest);

    OPENED.0.lock().unwrap().clear();
    let exports = if file { &w.file } else { &w.volumes };
    let sink = Sink {
        out: RefCell::new(Vec::new()),
        keep: fence,
        total: Cell::new(0),
    };
    let fenced_at = Cell::new(None);
    let timeouts = Timeouts {
        handshake: Duration::from_secs(5),
        io: Duration::from_secs(5),
        idle: Some(Duration::from_secs(5)),
    };
    let reader = ClientBytes {
        data: &client,
        pos: 0,
        fence: fence.then_some((handshake_len, &fenced_at, &sink)),
    };
    let _ = ember_volumed::nbd::server::serve(reader, &sink, exports, "fuzz", timeouts);
    let opened = std::mem::take(&mut *OPENED.0.lock().unwrap());
    assert!(opened.len() <= 1, "opened twice: {opened:?}");
    let volume_opened = opened.iter().any(|l| l.contains("(volume,"));
    if !file {
        let right = handshake && (which == 0 || which == 4);
        assert_eq!(
            volume_opened,
            right,
            "a volume opened {} the right credential: {opened:?}",
            if right { "not even with" } else { "without" }
        );
        if let Some(at) = fenced_at.get() {
            // Moved away: every reply since is a simple reply with an
            // error (none carries data).
            let out = sink.out.borrow();
            for r in out[at..].chunks(SimpleReply::LEN) {
                assert!(
                    r.len() == SimpleReply::LEN,
                    "a partial reply after the move"
                );
                let Ok(ReplyHeader::Simple(reply)) = ReplyHeader::read(&mut &r[..]) else {
                    panic!("not a simple reply");
                };
                assert_ne!(
                    reply.errno, 0,
                    "a request served after the volume moved away"
                );
            }
            // Back to host-a with a fresh credential, for the next runs.
            let a = w.reg.move_to("vol", "host-a", None).expect("move back");
            let mut off = a.credential.clone().into_bytes();
            off[7] = if off[7] == b'0' { b'1' } else { b'0' };
            let mut n = w.names.lock().unwrap();
            n[0] = export_name("vol", &a.credential);
            n[1] = export_name("vol", std::str::from_utf8(&off).unwrap());
        }
    } else {
        assert!(!volume_opened);
        if handshake {
            assert_eq!(opened.len(), 1, "the file export did not open");
        }
        // Read-only: the file never changes.
        let mut now = vec![0u8; FILE_SIZE + 1];
        let n = std::fs::File::open(&w.file_path)
            .and_then(|f| f.read_at(&mut now, 0))
            .expect("read the export back");
        assert!(
            n == FILE_SIZE && now[..n] == w.file_data[..],
            "the file export changed"
        );
    }

    // Keep the sparse volumes from filling tmpfs: drop their blocks now
    // and then (their contents do not matter to any check).
    static RUNS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    if RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 1024 == 1023 {
        for (img, size) in w.images.iter().zip([VOL_SIZE, BIG_SIZE]) {
            if let Ok(f) = std::fs::OpenOptions::new().write(true).open(img) {
                let _ = ember_volumed::image::discard(&f, 0, size);
            }
        }
    }
});
