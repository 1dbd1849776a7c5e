//! The host side of the device: the Unix listener, the map of connections,
//! and what goes to the guest next. Runs on the device thread and never
//! blocks (all sockets are non-blocking; epoll interest follows each
//! connection's state, so an idle or stalled stream costs no wake-ups).

use std::collections::{HashMap, HashSet, VecDeque};
use std::ffi::OsString;
use std::io::{ErrorKind, Read};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use event_manager::{EventOps, EventSet, Events};
use serde::{Deserialize, Serialize};

use super::connection::{ConnState, Connection, Produced};
use super::packet::*;
use super::{VsockError, MAX_CONNECTIONS, MAX_PKT_DATA, VSOCK_HOST_CID};

/// (host port, guest port).
type ConnKey = (u32, u32);

/// Longest `CONNECT <port>` line accepted.
const MAX_CONNECT_LINE: usize = 32;
/// RSTs for packets that match no connection, waiting for RX buffers.
/// Beyond this they are dropped (the guest times out instead).
const MAX_PENDING_RST: usize = 1024;
/// Host ports for host-initiated connections are allocated from here up.
const FIRST_LOCAL_PORT: u32 = 1 << 30;

/// An accepted host stream still sending its `CONNECT <port>` line.
struct Handshake {
    stream: UnixStream,
    line: Vec<u8>,
    registered: bool,
}

/// A stream to close once it is removed from epoll (which needs `EventOps`,
/// only available on the device thread).
struct Zombie {
    stream: UnixStream,
    registered: bool,
}

/// The host's side of a guest's vsock connections as a snapshot keeps it:
/// the (host port, guest port) of every connection and of every RST not yet
/// delivered, and the next host port to hand out.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct HostConnections {
    pub ports: Vec<(u32, u32)>,
    pub next_local_port: u32,
}

pub(crate) struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    conns: HashMap<ConnKey, Connection>,
    conn_fds: HashMap<RawFd, ConnKey>,
    handshakes: HashMap<RawFd, Handshake>,
    local_ports: HashSet<u32>,
    next_local_port: u32,
    /// Connections with something for the guest, in turn.
    rxq: VecDeque<ConnKey>,
    rst_q: VecDeque<VsockHeader>,
    zombies: Vec<Zombie>,
    rx_buf: Vec<u8>,
}

impl Muxer {
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Muxer, VsockError> {
        let listener = bind(uds_path)?;
        Ok(Muxer {
            guest_cid,
            uds_path: uds_path.to_path_buf(),
            listener,
            conns: HashMap::new(),
            conn_fds: HashMap::new(),
            handshakes: HashMap::new(),
            local_ports: HashSet::new(),
            next_local_port: FIRST_LOCAL_PORT,
            rxq: VecDeque::new(),
            rst_q: VecDeque::new(),
            zombies: Vec::new(),
            rx_buf: vec![0; MAX_PKT_DATA],
        })
    }

    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// What a snapshot keeps of the host's side of the connections.
    pub fn saved_connections(&self) -> HostConnections {
        let mut ports: Vec<(u32, u32)> = self.conns.keys().copied().collect();
        ports.extend(self.rst_q.iter().map(|h| (h.src_port, h.dst_port)));
        ports.sort_unstable();
        ports.dedup();
        HostConnections {
            ports,
            next_local_port: self.next_local_port,
        }
    }

    /// After a restore, ends every connection the guest may still hold
    /// with its own RST (the host ends died with the old VMM), queued
    /// before anything else for the guest, and allocates new local ports
    /// after the saved ones. Returns false when that cannot be done: the
    /// state does not list the connections (an older snapshot) or lists
    /// more than a live muxer could have had. Then only a transport reset
    /// ends them, and ports are handed out from a point unlikely to have
    /// been used: the guest keeps a closed connection's socket for a
    /// while, and a new REQUEST from the same host port would meet it and
    /// be refused.
    pub fn restore_connections(&mut self, saved: Option<&HostConnections>) -> bool {
        match saved {
            Some(saved) if saved.ports.len() <= MAX_CONNECTIONS + MAX_PENDING_RST => {
                self.next_local_port = saved.next_local_port.max(FIRST_LOCAL_PORT);
                for &(local_port, peer_port) in &saved.ports {
                    self.rst_q.push_back(self.rst_header(local_port, peer_port));
                }
                true
            }
            _ => {
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.subsec_nanos());
                self.next_local_port = FIRST_LOCAL_PORT + nanos % (1 << 29);
                false
            }
        }
    }

    /// Something is waiting for a guest RX buffer.
    pub fn has_rx(&self) -> bool {
        !self.rst_q.is_empty() || !self.rxq.is_empty()
    }

    /// Drops every connection without telling the guest (transport reset or
    /// device reset: the guest forgets its side too).
    pub fn reset(&mut self) {
        for (_, c) in self.conns.drain() {
            self.zombies.push(Zombie {
                registered: c.registered.is_some(),
                stream: c.stream,
            });
        }
        for (_, h) in self.handshakes.drain() {
            self.zombies.push(Zombie {
                stream: h.stream,
                registered: h.registered,
            });
        }
        self.conn_fds.clear();
        self.local_ports.clear();
        self.rxq.clear();
        self.rst_q.clear();
    }

    /// Handles an epoll event on the listener or a host stream.
    pub fn handle_event(&mut self, fd: RawFd, set: EventSet) {
        if fd == self.listener.as_raw_fd() {
            self.accept();
        } else if self.handshakes.contains_key(&fd) {
            self.read_connect_line(fd);
        } else if let Some(&key) = self.conn_fds.get(&fd) {
            self.conn_event(key, set);
        } else {
            log::debug!("vsock: event for unknown fd {fd}");
        }
    }

    fn accept(&mut self) {
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    crate::guest_warn!("vsock: accept on {} failed: {e}", self.uds_path.display());
                    return;
                }
            };
            if self.conns.len() + self.handshakes.len() >= MAX_CONNECTIONS {
                crate::guest_warn!("vsock: too many connections, refusing a host connection");
                continue;
            }
            if let Err(e) = stream.set_nonblocking(true) {
                crate::guest_warn!("vsock: cannot make host stream non-blocking: {e}");
                continue;
            }
            let fd = stream.as_raw_fd();
            self.handshakes.insert(
                fd,
                Handshake {
                    stream,
                    line: Vec::new(),
                    registered: false,
                },
            );
            // The line usually arrives with the connection.
            self.read_connect_line(fd);
        }
    }

    /// Reads the `CONNECT <port>\n` line byte by byte, so nothing after it
    /// is consumed before the guest accepts.
    fn read_connect_line(&mut self, fd: RawFd) {
        let Some(h) = self.handshakes.get_mut(&fd) else {
            return;
        };
        let mut byte = [0u8; 1];
        let port = loop {
            match h.stream.read(&mut byte) {
                Ok(0) => break None,
                Ok(_) if byte[0] == b'\n' => break parse_connect(&h.line),
                Ok(_) if h.line.len() < MAX_CONNECT_LINE => h.line.push(byte[0]),
                Ok(_) => break None,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => break None,
            }
        };
        let Some(h) = self.handshakes.remove(&fd) else {
            return;
        };
        let Some(peer_port) = port else {
            log::debug!(
                "vsock: bad CONNECT line {:?}",
                String::from_utf8_lossy(&h.line)
            );
            self.zombies.push(Zombie {
                stream: h.stream,
                registered: h.registered,
            });
            return;
        };
        let local_port = self.alloc_local_port();
        let mut conn = Connection::local_init(h.stream, local_port, peer_port);
        conn.registered = h.registered.then_some(EventSet::IN);
        log::debug!("vsock: host connects to guest port {peer_port} from {local_port}");
        self.insert(conn);
    }

    fn alloc_local_port(&mut self) -> u32 {
        // At most MAX_CONNECTIONS ports are taken, so this ends quickly.
        loop {
            let port = self.next_local_port;
            self.next_local_port = port.checked_add(1).unwrap_or(FIRST_LOCAL_PORT);
            if self.local_ports.insert(port) {
                return port;
            }
        }
    }

    fn insert(&mut self, conn: Connection) {
        let key = (conn.local_port, conn.peer_port);
        self.conn_fds.insert(conn.stream.as_raw_fd(), key);
        self.conns.insert(key, conn);
        self.enqueue(key);
    }

    fn enqueue(&mut self, key: ConnKey) {
        if let Some(c) = self.conns.get_mut(&key) {
            if !c.queued && c.has_pending_rx() {
                c.queued = true;
                self.rxq.push_back(key);
            }
        }
    }

    /// Removes a connection; with `rst`, the guest is sent a RST.
    fn remove(&mut self, key: ConnKey, rst: bool) {
        let Some(c) = self.conns.remove(&key) else {
            return;
        };
        self.conn_fds.remove(&c.stream.as_raw_fd());
        self.local_ports.remove(&c.local_port);
        if c.queued {
            self.rxq.retain(|k| *k != key);
        }
        if rst {
            self.queue_rst(c.local_port, c.peer_port);
        }
        self.zombies.push(Zombie {
            registered: c.registered.is_some(),
            stream: c.stream,
        });
    }

    fn queue_rst(&mut self, local_port: u32, peer_port: u32) {
        if self.rst_q.len() >= MAX_PENDING_RST {
            crate::guest_warn!("vsock: too many pending RSTs, dropping one");
            return;
        }
        self.rst_q.push_back(self.rst_header(local_port, peer_port));
    }

    fn rst_header(&self, local_port: u32, peer_port: u32) -> VsockHeader {
        VsockHeader {
            src_cid: VSOCK_HOST_CID,
            dst_cid: self.guest_cid,
            src_port: local_port,
            dst_port: peer_port,
            type_: VSOCK_TYPE_STREAM,
            op: VSOCK_OP_RST,
            ..Default::default()
        }
    }

    /// Closes the connection with a RST if both directions are finished.
    fn check_done(&mut self, key: ConnKey) {
        if self.conns.get(&key).is_some_and(Connection::is_done) {
            self.remove(key, true);
        }
    }

    fn conn_event(&mut self, key: ConnKey, set: EventSet) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        let hup = set.intersects(EventSet::HANG_UP | EventSet::ERROR);
        if c.state == ConnState::LocalInit {
            if hup {
                // The host gave up before the guest answered; the guest only
                // needs a RST if it has seen the REQUEST.
                let rst = !c.pending.request;
                self.remove(key, rst);
            }
            return;
        }
        if set.contains(EventSet::OUT) || hup {
            if let Err(e) = c.flush() {
                log::debug!("vsock: host stream write failed: {e}");
                self.remove(key, true);
                return;
            }
        }
        if set.contains(EventSet::IN) || hup {
            c.host_readable = true;
        }
        self.enqueue(key);
        self.check_done(key);
    }

    /// Handles one packet the guest sent.
    pub fn handle_tx(&mut self, hdr: &VsockHeader, payload: &[u8]) {
        if hdr.src_cid != self.guest_cid || hdr.dst_cid != VSOCK_HOST_CID {
            log::debug!(
                "vsock: dropping packet {}->{} (guest CID is {})",
                hdr.src_cid,
                hdr.dst_cid,
                self.guest_cid
            );
            return;
        }
        if hdr.type_ != VSOCK_TYPE_STREAM {
            if hdr.op != VSOCK_OP_RST {
                self.queue_rst(hdr.dst_port, hdr.src_port);
            }
            return;
        }
        let key = (hdr.dst_port, hdr.src_port);
        let Some(c) = self.conns.get_mut(&key) else {
            match hdr.op {
                VSOCK_OP_REQUEST => self.guest_connect(hdr),
                VSOCK_OP_RST => {}
                _ => self.queue_rst(hdr.dst_port, hdr.src_port),
            }
            return;
        };
        c.update_peer_credit(hdr);
        match (c.state, hdr.op) {
            (ConnState::LocalInit, VSOCK_OP_RESPONSE) => {
                if let Err(e) = c.establish() {
                    log::debug!("vsock: host peer gone before the guest accepted: {e}");
                    self.remove(key, true);
                    return;
                }
            }
            (_, VSOCK_OP_RST) => {
                self.remove(key, false);
                return;
            }
            (ConnState::Established, VSOCK_OP_RW) => {
                if c.peer_shut_send {
                    log::debug!("vsock: guest sent data after SHUTDOWN(SEND), ignored");
                } else if let Err(e) = c.send_to_host(payload) {
                    log::debug!("vsock: forwarding guest data failed: {e}");
                    self.remove(key, true);
                    return;
                }
            }
            (ConnState::Established, VSOCK_OP_CREDIT_UPDATE) => {}
            (ConnState::Established, VSOCK_OP_CREDIT_REQUEST) => c.pending.credit_update = true,
            (ConnState::Established, VSOCK_OP_SHUTDOWN) => c.peer_shutdown(hdr.flags),
            _ => {
                log::debug!("vsock: unexpected op {} in state {:?}", hdr.op, c.state);
                self.remove(key, true);
                return;
            }
        }
        self.enqueue(key);
        self.check_done(key);
    }

    /// The guest connects to host port P: connect to `<uds_path>_P`.
    fn guest_connect(&mut self, hdr: &VsockHeader) {
        if self.conns.len() + self.handshakes.len() >= MAX_CONNECTIONS {
            crate::guest_warn!("vsock: too many connections, refusing guest connection");
            self.queue_rst(hdr.dst_port, hdr.src_port);
            return;
        }
        let mut path = OsString::from(self.uds_path.as_os_str());
        path.push(format!("_{}", hdr.dst_port));
        let stream = UnixStream::connect(&path).and_then(|s| {
            s.set_nonblocking(true)?;
            Ok(s)
        });
        match stream {
            Ok(s) => self.insert(Connection::peer_init(s, hdr)),
            Err(e) => {
                log::debug!("vsock: guest connect to {path:?}: {e}");
                self.queue_rst(hdr.dst_port, hdr.src_port);
            }
        }
    }

    /// The next packet for the guest, with at most `max_data` payload bytes.
    pub fn recv_pkt(&mut self, max_data: usize) -> Option<(VsockHeader, &[u8])> {
        let max_data = max_data.min(self.rx_buf.len());
        loop {
            if let Some(hdr) = self.rst_q.pop_front() {
                return Some((hdr, &[]));
            }
            let key = self.rxq.pop_front()?;
            let Some(c) = self.conns.get_mut(&key) else {
                continue;
            };
            c.queued = false;
            match c.next_packet(self.guest_cid, &mut self.rx_buf[..max_data]) {
                Produced::Packet(hdr) => {
                    self.enqueue(key);
                    self.check_done(key);
                    return Some((hdr, &self.rx_buf[..hdr.len as usize]));
                }
                Produced::Nothing => self.check_done(key),
                Produced::Reset => self.remove(key, true),
            }
        }
    }

    /// Registers the listener; called from the device's `init`.
    pub fn init(&mut self, ops: &mut EventOps) {
        let fd = self.listener.as_raw_fd();
        if let Err(e) = ops.add(Events::with_data(&self.listener, fd as u32, EventSet::IN)) {
            log::error!("vsock: cannot register listener: {e:?}");
        }
        self.sync(ops);
    }

    /// Brings epoll registrations in line with connection state and closes
    /// dropped streams. Called at the end of every event.
    pub fn sync(&mut self, ops: &mut EventOps) {
        for z in self.zombies.drain(..) {
            if z.registered {
                let _ = ops.remove(Events::empty(&z.stream));
            }
        }
        for h in self.handshakes.values_mut() {
            if !h.registered {
                let fd = h.stream.as_raw_fd();
                match ops.add(Events::with_data(&h.stream, fd as u32, EventSet::IN)) {
                    Ok(()) => h.registered = true,
                    Err(e) => crate::guest_warn!("vsock: cannot register host stream: {e:?}"),
                }
            }
        }
        let mut failed = Vec::new();
        for (key, c) in self.conns.iter_mut() {
            let want = c.interest();
            if want == c.registered {
                continue;
            }
            let fd = c.stream.as_raw_fd();
            let res = match (c.registered, want) {
                (_, None) => ops.remove(Events::empty(&c.stream)),
                (None, Some(set)) => ops.add(Events::with_data(&c.stream, fd as u32, set)),
                (Some(_), Some(set)) => ops.modify(Events::with_data(&c.stream, fd as u32, set)),
            };
            match res {
                Ok(()) => c.registered = want,
                Err(e) => {
                    crate::guest_warn!("vsock: epoll update for host stream failed: {e:?}");
                    failed.push(*key);
                }
            }
        }
        for key in failed {
            self.remove(key, true);
        }
        // Removing failed connections made zombies; close them now.
        for z in self.zombies.drain(..) {
            if z.registered {
                let _ = ops.remove(Events::empty(&z.stream));
            }
        }
    }
}

/// `CONNECT <port>` (an optional trailing '\r' is tolerated).
fn parse_connect(line: &[u8]) -> Option<u32> {
    let line = std::str::from_utf8(line).ok()?.trim_end_matches('\r');
    let port = line.strip_prefix("CONNECT ")?;
    port.trim().parse().ok()
}

/// Listens on `path`, replacing a stale socket file but nothing else.
fn bind(path: &Path) -> Result<UnixListener, VsockError> {
    let display = path.display().to_string();
    if path.as_os_str().is_empty() {
        return Err(VsockError::EmptyPath);
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(VsockError::PathInUse { path: display });
        }
        std::fs::remove_file(path).map_err(|source| VsockError::RemoveStale {
            path: display.clone(),
            source,
        })?;
    }
    let listener = UnixListener::bind(path).map_err(|source| VsockError::Bind {
        path: display.clone(),
        source,
    })?;
    listener
        .set_nonblocking(true)
        .map_err(|source| VsockError::Bind {
            path: display,
            source,
        })?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::parse_connect;

    #[test]
    fn connect_line() {
        assert_eq!(parse_connect(b"CONNECT 52"), Some(52));
        assert_eq!(parse_connect(b"CONNECT 52\r"), Some(52));
        assert_eq!(parse_connect(b"CONNECT 4294967295"), Some(u32::MAX));
        assert_eq!(parse_connect(b"CONNECT 4294967296"), None);
        assert_eq!(parse_connect(b"CONNECT"), None);
        assert_eq!(parse_connect(b"connect 52"), None);
        assert_eq!(parse_connect(b"CONNECT -1"), None);
        assert_eq!(parse_connect(b"\xff\xfe"), None);
    }
}
