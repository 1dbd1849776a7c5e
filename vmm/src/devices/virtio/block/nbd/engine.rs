//! The I/O engine of one NBD drive: a worker thread owns the connection and
//! writes requests, a reader thread per connection reads replies and
//! matches them to requests by cookie, so many requests are in flight at
//! once and reconnecting never blocks the VMM thread. Finished requests
//! are queued as completions and announced on an eventfd.
//!
//! Invariants:
//! - A request completes OK only after the server acknowledged every NBD
//!   request it was split into.
//! - A lost connection (EOF, garbage, a request older than the timeout) is
//!   re-established with backoff; requests in flight on it are sent again
//!   (reads trivially; writes because NBD writes at a fixed offset are
//!   idempotent and the guest orders nothing among requests in flight),
//!   up to `MAX_ATTEMPTS` times, and otherwise fail.
//! - Writes acknowledged since the last flush are kept (up to `JOURNAL_MAX`
//!   bytes) and written again first on a new connection, because a
//!   restarted server may have lost them; nothing else is sent until the
//!   server acknowledged them. A FLUSH retires only the writes acknowledged
//!   before it was sent. When the journal overflowed before a reconnect,
//!   the next flush fails so the guest learns of the possible loss.
//! - Server errors (an errno in the reply) are final and not retried.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::{self, Write};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::conn::{connect, Conn, Stream};
use super::uri::NbdUri;
use super::{ExportInfo, NbdError};
use ember_nbd::{
    read_simple_data, ChunkProgress, Command, ReplyHeader, Request, CMD_FLAG_FUA, TFLAG_SEND_FLUSH,
    TFLAG_SEND_FUA,
};

/// Default bound on one request's round trip, and on a reconnect.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Unflushed write bytes kept for replay after a reconnect.
const JOURNAL_MAX: usize = 64 << 20;
/// Connections one request may see fail before it fails to the guest.
const MAX_ATTEMPTS: u32 = 4;
const BACKOFF_START: Duration = Duration::from_millis(20);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Longest single NBD request we send (servers commonly cap at 32 MiB).
pub const MAX_REQUEST: usize = 1 << 20;
/// Longest TRIM or WRITE_ZEROES piece (fits a u32, well below 4 GiB).
const MAX_RANGE: u64 = 1 << 30;

/// Whether acknowledged writes must be made durable, and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// No flushes at all (cache_type Unsafe).
    None,
    /// The guest flushes; FLUSH is sent, or FUA on each write when the
    /// server offers FUA but not FLUSH.
    OnFlush,
}

/// One operation as the device asks for it; split into NBD requests here.
#[derive(Debug)]
pub enum Op {
    Read(usize),
    Write(Vec<u8>),
    Flush,
    Trim(u64),
    WriteZeroes(u64),
}

impl Op {
    pub fn is_write(&self) -> bool {
        matches!(self, Op::Write(_) | Op::Trim(_) | Op::WriteZeroes(_))
    }
}

/// A finished operation: the data of a read, or why it failed.
#[derive(Debug)]
pub struct Completion {
    pub id: u64,
    pub result: io::Result<Vec<u8>>,
}

/// A write acknowledged but not yet flushed, kept for replay.
enum Journaled {
    Data(u64, Arc<Vec<u8>>),
    /// WRITE_ZEROES: replayed too, or an older journaled write would
    /// reappear over the zeroes.
    Zeroes(u64, u32),
}

/// One NBD request on the wire (or waiting to be sent).
struct Piece {
    /// The operation it belongs to; `None` for a journal replay.
    parent: Option<u64>,
    cmd: Command,
    flags: u16,
    offset: u64,
    len: u32,
    data: Option<Arc<Vec<u8>>>,
    /// Reads: where this piece lands in the operation's buffer.
    buf_at: usize,
    attempts: u32,
    /// When it was sent on the current connection; `None`: not yet.
    sent: Option<Instant>,
    /// FLUSH: journal sequence number when it was sent.
    flush_mark: u64,
}

/// An operation whose pieces are not all answered.
struct Parent {
    remaining: usize,
    error: Option<String>,
    data: Vec<u8>,
}

struct State {
    uri: NbdUri,
    info: ExportInfo,
    /// By cookie; cookies only grow, so this is also the order of submission.
    pieces: BTreeMap<u64, Piece>,
    parents: HashMap<u64, Parent>,
    completions: VecDeque<Completion>,
    journal: VecDeque<(u64, Journaled)>,
    journal_bytes: usize,
    journal_overflow: bool,
    /// A reconnect happened while unjournaled writes were unflushed.
    lost_unflushed: bool,
    next_seq: u64,
    next_cookie: u64,
    /// Bumped when a connection is given up: replies read from an older one
    /// are ignored.
    generation: u64,
    /// The URI changed: reconnect there even with nothing in flight.
    moved: bool,
}

struct Shared {
    state: Mutex<State>,
    /// Notified on every completion.
    cv: Condvar,
    done: EventFd,
    timeout: Duration,
    durability: Durability,
    /// Wakes the worker (new pieces, a replay answered, a lost connection).
    kick: Sender<Msg>,
}

fn lock(shared: &Shared) -> MutexGuard<'_, State> {
    // A panicked engine thread leaves consistent-enough state; keep going.
    shared.state.lock().unwrap_or_else(|p| p.into_inner())
}

enum Msg {
    /// New pieces to send.
    Kick,
    /// The reader of this connection generation saw it fail.
    Lost(u64, String),
    Stop,
}

/// The engine as the device holds it; dropping it ends its threads.
pub struct NbdEngine {
    shared: Arc<Shared>,
    worker: Option<JoinHandle<()>>,
}

impl NbdEngine {
    /// Connects once on the caller's thread (errors here, such as a bad
    /// server or a refused export, are final), then starts the worker.
    pub fn connect(
        uri: NbdUri,
        timeout: Duration,
        durability: Durability,
    ) -> Result<NbdEngine, NbdError> {
        let (conn, info) = connect(&uri, timeout)?;
        let done = EventFd::new(EFD_NONBLOCK)?;
        let (tx, rx) = mpsc::channel();
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                uri,
                info,
                pieces: BTreeMap::new(),
                parents: HashMap::new(),
                completions: VecDeque::new(),
                journal: VecDeque::new(),
                journal_bytes: 0,
                journal_overflow: false,
                lost_unflushed: false,
                next_seq: 0,
                next_cookie: 1,
                generation: 0,
                moved: false,
            }),
            cv: Condvar::new(),
            done,
            timeout,
            durability,
            kick: tx,
        });
        let mut worker = Worker {
            shared: shared.clone(),
            rx,
            writer: None,
        };
        worker.adopt(conn);
        let handle = std::thread::Builder::new()
            .name("nbd-io".into())
            .spawn(move || worker.run())?;
        Ok(NbdEngine {
            shared,
            worker: Some(handle),
        })
    }

    pub fn info(&self) -> ExportInfo {
        lock(&self.shared).info
    }

    pub fn uri(&self) -> NbdUri {
        lock(&self.shared).uri.clone()
    }

    pub fn timeout(&self) -> Duration {
        self.shared.timeout
    }

    /// Readable when completions are queued; read it before taking them.
    pub fn completion_fd(&self) -> &EventFd {
        &self.shared.done
    }

    /// Starts `op` at `offset`; its completion carries `id`.
    pub fn submit(&self, id: u64, op: Op, offset: u64) {
        let mut st = lock(&self.shared);
        let pieces = split(&st, &op, offset, self.shared.durability);
        if pieces.is_empty() {
            // Nothing to send (a flush the server has no use for, or an
            // empty range): done at once, but still through the queue.
            let result = if matches!(op, Op::Flush) {
                flush_outcome(&mut st)
            } else {
                Ok(Vec::new())
            };
            st.completions.push_back(Completion { id, result });
            drop(st);
            self.announce();
            return;
        }
        let data = match op {
            Op::Read(len) => vec![0; len],
            _ => Vec::new(),
        };
        st.parents.insert(
            id,
            Parent {
                remaining: pieces.len(),
                error: None,
                data,
            },
        );
        for mut p in pieces {
            p.parent = Some(id);
            let cookie = st.next_cookie;
            st.next_cookie += 1;
            st.pieces.insert(cookie, p);
        }
        drop(st);
        let _ = self.shared.kick.send(Msg::Kick);
    }

    fn announce(&self) {
        announce(&self.shared);
    }

    /// Every completion queued so far.
    pub fn take_completions(&self) -> Vec<Completion> {
        let _ = self.shared.done.read();
        lock(&self.shared).completions.drain(..).collect()
    }

    /// Operations submitted and not yet completed.
    pub fn in_flight(&self) -> usize {
        lock(&self.shared).parents.len()
    }

    /// Waits until every submitted operation has completed, at most `for_`.
    /// Returns whether that happened.
    pub fn wait_idle(&self, for_: Duration) -> bool {
        let deadline = Instant::now() + for_;
        let mut st = lock(&self.shared);
        while !st.parents.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            st = self
                .shared
                .cv
                .wait_timeout(st, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }

    /// Waits for the completion of `id` (for synchronous callers).
    pub(crate) fn wait_for(&self, id: u64) -> io::Result<Vec<u8>> {
        let mut st = lock(&self.shared);
        loop {
            if let Some(i) = st.completions.iter().position(|c| c.id == id) {
                let c = st.completions.remove(i).expect("index found above");
                return c.result;
            }
            st = self.shared.cv.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Switches to another server (the volume moved) or re-reads the
    /// export's size: the current connection is dropped, requests in
    /// flight are sent again on the new one after the journal's writes.
    /// `info` comes from a probe of `uri`; the export may have grown.
    pub fn reattach(&self, uri: NbdUri, info: ExportInfo) {
        let mut st = lock(&self.shared);
        st.uri = uri;
        st.info.size = st.info.size.max(info.size);
        st.moved = true;
        drop(st);
        let _ = self.shared.kick.send(Msg::Kick);
    }
}

impl Drop for NbdEngine {
    fn drop(&mut self) {
        let _ = self.shared.kick.send(Msg::Stop);
        if let Some(h) = self.worker.take() {
            let _ = h.join();
        }
    }
}

fn announce(shared: &Shared) {
    shared.cv.notify_all();
    if let Err(e) = shared.done.write(1) {
        crate::guest_warn!("nbd: cannot signal completion: {e}");
    }
}

/// The outcome of a flush that reached the server: an error when writes
/// acknowledged before a reconnect may have been lost.
fn flush_outcome(st: &mut State) -> io::Result<Vec<u8>> {
    if std::mem::take(&mut st.lost_unflushed) {
        return Err(io::Error::other(
            "writes acknowledged before a reconnect may have been lost on the server",
        ));
    }
    Ok(Vec::new())
}

fn piece(cmd: Command, flags: u16, offset: u64, len: u32) -> Piece {
    Piece {
        parent: None,
        cmd,
        flags,
        offset,
        len,
        data: None,
        buf_at: 0,
        attempts: 0,
        sent: None,
        flush_mark: 0,
    }
}

/// The NBD requests that make up `op`.
fn split(st: &State, op: &Op, offset: u64, durability: Durability) -> Vec<Piece> {
    let mut out = Vec::new();
    match op {
        Op::Read(len) => {
            for at in (0..*len).step_by(MAX_REQUEST) {
                let n = (*len - at).min(MAX_REQUEST) as u32;
                let mut p = piece(Command::Read, 0, offset + at as u64, n);
                p.buf_at = at;
                out.push(p);
            }
        }
        Op::Write(data) => {
            let fua = durability == Durability::OnFlush
                && !st.info.has(TFLAG_SEND_FLUSH)
                && st.info.has(TFLAG_SEND_FUA);
            let flags = if fua { CMD_FLAG_FUA } else { 0 };
            for chunk_at in (0..data.len()).step_by(MAX_REQUEST) {
                let end = (chunk_at + MAX_REQUEST).min(data.len());
                let mut p = piece(
                    Command::Write,
                    flags,
                    offset + chunk_at as u64,
                    (end - chunk_at) as u32,
                );
                p.data = Some(Arc::new(data[chunk_at..end].to_vec()));
                out.push(p);
            }
        }
        Op::Flush => {
            if durability == Durability::OnFlush && st.info.has(TFLAG_SEND_FLUSH) {
                out.push(piece(Command::Flush, 0, 0, 0));
            }
        }
        Op::Trim(len) | Op::WriteZeroes(len) => {
            let cmd = if matches!(op, Op::Trim(_)) {
                Command::Trim
            } else {
                Command::WriteZeroes
            };
            for at in (0..*len).step_by(MAX_RANGE as usize) {
                out.push(piece(
                    cmd,
                    0,
                    offset + at,
                    (*len - at).min(MAX_RANGE) as u32,
                ));
            }
        }
    }
    out
}

/// Records the outcome of the piece `cookie` of connection `generation`
/// (ignored if that connection was given up meanwhile).
fn finish(shared: &Shared, generation: u64, cookie: u64, result: Result<Vec<u8>, u32>) {
    let mut st = lock(shared);
    if st.generation != generation {
        return;
    }
    let Some(p) = st.pieces.remove(&cookie) else {
        return;
    };
    let mut buf = Vec::new();
    let error = match result {
        Ok(data) => {
            buf = data;
            on_acked(&mut st, &p, shared.durability)
                .err()
                .map(|e| e.to_string())
        }
        Err(errno) => {
            if p.parent.is_none() {
                // A replayed write the server refuses (e.g. fenced): the
                // guest was told it landed, so the next flush must fail.
                st.lost_unflushed = true;
            }
            Some(NbdError::Server { errno }.to_string())
        }
    };
    let Some(id) = p.parent else {
        // Held requests may go once no replay is unanswered.
        let _ = shared.kick.send(Msg::Kick);
        return;
    };
    let Some(parent) = st.parents.get_mut(&id) else {
        return;
    };
    if let Some(e) = error {
        parent.error.get_or_insert(e);
    } else if p.cmd == Command::Read {
        if p.buf_at == 0 && buf.len() == parent.data.len() {
            parent.data = buf;
        } else if let Some(dst) = parent.data.get_mut(p.buf_at..p.buf_at + buf.len()) {
            dst.copy_from_slice(&buf);
        }
    }
    parent.remaining -= 1;
    if parent.remaining == 0 {
        complete(&mut st, id);
        drop(st);
        announce(shared);
    }
}

/// Journal bookkeeping for an acknowledged piece; a flush's own outcome.
fn on_acked(st: &mut State, p: &Piece, durability: Durability) -> io::Result<()> {
    let journaled = durability == Durability::OnFlush && p.parent.is_some() && p.flags == 0;
    match p.cmd {
        Command::Write if journaled => {
            if let Some(d) = &p.data {
                journal(st, Journaled::Data(p.offset, d.clone()), d.len());
            }
        }
        Command::WriteZeroes if journaled => {
            journal(st, Journaled::Zeroes(p.offset, p.len), 0);
        }
        Command::Flush => {
            while st
                .journal
                .front()
                .is_some_and(|(seq, _)| *seq < p.flush_mark)
            {
                if let Some((_, Journaled::Data(_, d))) = st.journal.pop_front() {
                    st.journal_bytes -= d.len();
                }
            }
            return flush_outcome(st).map(|_| ());
        }
        _ => {}
    }
    Ok(())
}

fn journal(st: &mut State, entry: Journaled, bytes: usize) {
    if st.journal_overflow {
        return;
    }
    if st.journal_bytes + bytes > JOURNAL_MAX {
        st.journal_overflow = true;
        st.journal.clear();
        st.journal_bytes = 0;
        return;
    }
    st.journal_bytes += bytes;
    let seq = st.next_seq;
    st.next_seq += 1;
    st.journal.push_back((seq, entry));
}

/// Fails piece `cookie`'s operation with `why` (other pieces of it may
/// still be on the wire; their replies are then ignored).
fn fail(st: &mut State, cookie: u64, why: &str) {
    let Some(p) = st.pieces.remove(&cookie) else {
        return;
    };
    let Some(id) = p.parent else {
        return;
    };
    st.pieces.retain(|_, q| q.parent != Some(id));
    if let Some(parent) = st.parents.get_mut(&id) {
        parent.error.get_or_insert_with(|| why.to_string());
        complete(st, id);
    }
}

fn complete(st: &mut State, id: u64) {
    if let Some(parent) = st.parents.remove(&id) {
        let result = match parent.error {
            Some(e) => Err(io::Error::other(e)),
            None => Ok(parent.data),
        };
        st.completions.push_back(Completion { id, result });
    }
}

/// Owns the write half of the current connection.
struct Worker {
    shared: Arc<Shared>,
    rx: Receiver<Msg>,
    writer: Option<Stream>,
}

impl Worker {
    fn run(mut self) {
        loop {
            let tick = (self.shared.timeout / 4).clamp(Duration::from_millis(10), BACKOFF_MAX);
            match self.rx.recv_timeout(tick) {
                Ok(Msg::Kick) | Err(RecvTimeoutError::Timeout) => {}
                Ok(Msg::Lost(generation, why)) => {
                    if lock(&self.shared).generation == generation {
                        self.drop_conn(&why, true);
                    }
                }
                Ok(Msg::Stop) | Err(RecvTimeoutError::Disconnected) => break,
            }
            if std::mem::take(&mut lock(&self.shared).moved) {
                self.drop_conn("reattaching", false);
            }
            let busy = !lock(&self.shared).pieces.is_empty();
            if self.writer.is_none() && busy && !self.reconnect() {
                break;
            }
            self.send_unsent();
            self.check_timeouts();
        }
        if let Some(mut w) = self.writer.take() {
            let hdr = Request::new(Command::Disconnect, 0, 0, 0, 0);
            let _ = w.write_all(&hdr.encode());
            w.shutdown();
        }
    }

    /// Starts a reader on a fresh connection and queues the journal's
    /// writes ahead of everything else.
    fn adopt(&mut self, conn: Conn) {
        let Conn { reader, writer } = conn;
        let mut st = lock(&self.shared);
        let generation = st.generation;
        if st.journal_overflow {
            st.lost_unflushed = true;
            st.journal.clear();
            st.journal_bytes = 0;
            st.journal_overflow = false;
        }
        // Replays take cookies below every waiting piece: BTreeMap order is
        // send order. Cookie 0 and down from there are never used otherwise,
        // so give the waiting pieces new cookies above the replays.
        let waiting: Vec<Piece> = std::mem::take(&mut st.pieces).into_values().collect();
        let replays: Vec<Piece> = st
            .journal
            .iter()
            .map(|(_, j)| match j {
                Journaled::Data(off, d) => {
                    let mut p = piece(Command::Write, 0, *off, d.len() as u32);
                    p.data = Some(d.clone());
                    p
                }
                Journaled::Zeroes(off, len) => piece(Command::WriteZeroes, 0, *off, *len),
            })
            .collect();
        for p in replays.into_iter().chain(waiting) {
            let cookie = st.next_cookie;
            st.next_cookie += 1;
            st.pieces.insert(cookie, p);
        }
        drop(st);
        let shared = self.shared.clone();
        let spawned = std::thread::Builder::new()
            .name("nbd-reply".into())
            .spawn(move || read_replies(&shared, reader, generation));
        match spawned {
            Ok(_) => self.writer = Some(writer),
            Err(e) => log::error!("nbd: cannot start the reply reader: {e}"),
        }
    }

    /// Gives up the current connection; pieces on it wait to be sent again
    /// (counting an attempt if `count`), replays are dropped (the journal
    /// still holds them).
    fn drop_conn(&mut self, why: &str, count: bool) {
        if let Some(w) = self.writer.take() {
            w.shutdown();
        }
        let mut st = lock(&self.shared);
        st.generation += 1;
        let uri = st.uri.to_string();
        crate::guest_warn!("nbd {uri}: connection lost ({why}); reconnecting");
        let mut failed = Vec::new();
        st.pieces.retain(|_, p| p.parent.is_some());
        for (cookie, p) in st.pieces.iter_mut() {
            if p.sent.take().is_some() && count {
                p.attempts += 1;
                if p.attempts >= MAX_ATTEMPTS {
                    failed.push(*cookie);
                }
            }
        }
        let why = format!("nbd {uri}: {why} ({MAX_ATTEMPTS} attempts)");
        let any = !failed.is_empty();
        for cookie in failed {
            fail(&mut st, cookie, &why);
        }
        drop(st);
        if any {
            announce(&self.shared);
        }
    }

    /// Reconnects with backoff for up to the timeout; on failure every
    /// waiting operation fails. Returns false when asked to stop meanwhile.
    fn reconnect(&mut self) -> bool {
        let deadline = Instant::now() + self.shared.timeout;
        let mut backoff = BACKOFF_START;
        loop {
            let uri = lock(&self.shared).uri.clone();
            let left = deadline.saturating_duration_since(Instant::now());
            let err = match connect(&uri, left.max(Duration::from_millis(100))) {
                Ok((conn, info)) => {
                    let mut st = lock(&self.shared);
                    if info.size >= st.info.size {
                        // An export that grew is fine (a resize); the
                        // device learns of it through PATCH /drives.
                        st.info = ExportInfo {
                            size: st.info.size,
                            ..info
                        };
                        drop(st);
                        log::info!("nbd {uri}: connected");
                        self.adopt(conn);
                        return true;
                    }
                    format!(
                        "export shrank from {} to {} bytes across a reconnect",
                        st.info.size, info.size
                    )
                }
                Err(e) => e.to_string(),
            };
            if Instant::now() + backoff >= deadline {
                let why = format!("nbd {uri}: cannot reconnect: {err}");
                crate::guest_warn!("{why}");
                let mut st = lock(&self.shared);
                let cookies: Vec<u64> = st.pieces.keys().copied().collect();
                for c in cookies {
                    fail(&mut st, c, &why);
                }
                drop(st);
                announce(&self.shared);
                return true;
            }
            log::debug!("nbd {uri}: reconnect failed: {err}");
            match self.rx.recv_timeout(backoff) {
                Ok(Msg::Stop) | Err(RecvTimeoutError::Disconnected) => return false,
                _ => {}
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// Writes every piece not yet on the current connection, in order.
    /// While journal replays are unanswered only replays go out: the
    /// server may run requests in any order, and a read or a flush must
    /// not overtake the writes they are meant to see.
    fn send_unsent(&mut self) {
        let Some(w) = self.writer.as_mut() else {
            return;
        };
        loop {
            let mut st = lock(&self.shared);
            let replaying = st
                .pieces
                .values()
                .any(|p| p.parent.is_none() && p.sent.is_some());
            let next_seq = st.next_seq;
            let Some((&cookie, p)) = st
                .pieces
                .iter_mut()
                .find(|(_, p)| p.sent.is_none() && !(replaying && p.parent.is_some()))
            else {
                return;
            };
            p.sent = Some(Instant::now());
            if p.cmd == Command::Flush {
                p.flush_mark = next_seq;
            }
            let hdr = Request::new(p.cmd, p.flags, cookie, p.offset, p.len).encode();
            let data = p.data.clone();
            drop(st);
            let res = match data {
                // One write for small requests saves a packet and a syscall.
                Some(d) if d.len() <= 64 * 1024 => {
                    let mut msg = Vec::with_capacity(hdr.len() + d.len());
                    msg.extend_from_slice(&hdr);
                    msg.extend_from_slice(&d);
                    w.write_all(&msg)
                }
                Some(d) => w.write_all(&hdr).and_then(|()| w.write_all(&d)),
                None => w.write_all(&hdr),
            };
            if let Err(e) = res {
                self.drop_conn(&format!("send failed: {e}"), true);
                return;
            }
        }
    }

    /// A piece unanswered for longer than the timeout ends its connection.
    fn check_timeouts(&mut self) {
        let timeout = self.shared.timeout;
        let late = lock(&self.shared)
            .pieces
            .values()
            .any(|p| p.sent.is_some_and(|t| t.elapsed() > timeout));
        if late && self.writer.is_some() {
            self.drop_conn(&format!("no reply within {timeout:?}"), true);
        }
    }
}

/// The reply reader of one connection: runs until the connection fails or
/// is shut down, then tells the worker.
fn read_replies(shared: &Shared, mut r: std::io::BufReader<Stream>, generation: u64) {
    // Structured replies to reads in progress: their buffer and progress.
    let mut partial: HashMap<u64, (Vec<u8>, ChunkProgress)> = HashMap::new();
    let err = loop {
        if let Err(e) = read_one(shared, &mut r, generation, &mut partial) {
            break e;
        }
    };
    if lock(shared).generation == generation {
        let _ = shared.kick.send(Msg::Lost(generation, err.to_string()));
    }
}

fn read_one(
    shared: &Shared,
    r: &mut std::io::BufReader<Stream>,
    generation: u64,
    partial: &mut HashMap<u64, (Vec<u8>, ChunkProgress)>,
) -> Result<(), NbdError> {
    let hdr = ReplyHeader::read(r)?;
    let cookie = hdr.cookie();
    let (cmd, offset, len) = {
        let st = lock(shared);
        match st.pieces.get(&cookie) {
            Some(p) if p.sent.is_some() && st.generation == generation => {
                (p.cmd, p.offset, p.len as usize)
            }
            _ if st.generation != generation => {
                return Err(NbdError::Protocol("connection given up".into()))
            }
            _ => {
                return Err(NbdError::Protocol(format!(
                    "reply for unknown cookie {cookie}"
                )))
            }
        }
    };
    let is_read = cmd == Command::Read;
    let outcome = match hdr {
        ReplyHeader::Simple(reply) => {
            let errno = reply.errno;
            let mut buf = if is_read && errno == 0 {
                vec![0; len]
            } else {
                Vec::new()
            };
            read_simple_data(r, errno, is_read.then_some(&mut buf[..]))?;
            Some(if errno == 0 { Ok(buf) } else { Err(errno) })
        }
        ReplyHeader::Chunk(chunk) => {
            let (buf, progress) = partial
                .entry(cookie)
                .or_insert_with(|| (vec![0; if is_read { len } else { 0 }], Default::default()));
            let res = progress.chunk(r, chunk, offset, is_read.then_some(&mut buf[..]))?;
            match res {
                None => None,
                Some(res) => {
                    let (buf, progress) = partial.remove(&cookie).unwrap_or_default();
                    if let Some(e) = progress.error() {
                        crate::guest_warn!("nbd: server error {}: {}", e.errno, e.message);
                    }
                    Some(res.map(|()| buf))
                }
            }
        }
    };
    if let Some(result) = outcome {
        finish(shared, generation, cookie, result);
    }
    Ok(())
}
