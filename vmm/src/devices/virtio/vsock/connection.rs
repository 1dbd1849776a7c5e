//! One guest stream bridged to one host Unix stream: state, credit-based
//! flow control (virtio 1.1 section 5.10.6.3) and buffering.
//!
//! Guest -> host: data is written straight to the (non-blocking) Unix
//! stream; what the host does not take yet waits in `tx_buf`, which the
//! advertised credit (`CONN_BUF_SIZE`) bounds. Host -> guest: data stays in
//! the host socket until the guest has both an RX buffer and credit, so
//! nothing is buffered in the VMM in that direction.

use std::collections::VecDeque;
use std::io::{self, ErrorKind, Read, Write};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::unix::net::UnixStream;

use event_manager::EventSet;

use super::packet::*;
use super::{CONN_BUF_SIZE, VSOCK_HOST_CID};

/// Offer the guest fresh credit once its view of our free space drops
/// below this.
const CREDIT_UPDATE_THRESHOLD: u32 = CONN_BUF_SIZE / 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ConnState {
    /// Host-initiated; REQUEST queued or sent, waiting for the guest.
    LocalInit,
    Established,
}

/// Control packets owed to the guest, sent in this order (before and after
/// data as listed in `Connection::next_packet`).
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Pending {
    pub request: bool,
    pub response: bool,
    pub credit_update: bool,
    pub shutdown: bool,
}

/// What `next_packet` produced.
pub(crate) enum Produced {
    Packet(VsockHeader),
    Nothing,
    /// The host stream failed: reset the connection.
    Reset,
}

pub(crate) struct Connection {
    pub stream: UnixStream,
    /// Host-side port (the guest's dst_port).
    pub local_port: u32,
    /// Guest-side port.
    pub peer_port: u32,
    pub state: ConnState,
    pub pending: Pending,
    /// epoll said the host stream is readable (or hung up).
    pub host_readable: bool,
    /// The host stream reached EOF.
    pub host_eof: bool,
    /// The guest will receive / send no more data.
    pub peer_shut_rcv: bool,
    pub peer_shut_send: bool,
    write_shut: bool,
    tx_buf: VecDeque<u8>,
    /// Leading bytes of `tx_buf` that are ours (the `OK` line), not guest data.
    tx_uncounted: usize,
    /// Guest bytes handed to the host stream.
    fwd_cnt: Wrapping<u32>,
    last_fwd_cnt_sent: Wrapping<u32>,
    /// Bytes sent to the guest.
    rx_cnt: Wrapping<u32>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// Interest currently registered with epoll (None: not registered).
    pub registered: Option<EventSet>,
    /// In the muxer's RX queue.
    pub queued: bool,
}

impl Connection {
    /// A connection the host asked for: a REQUEST goes to the guest.
    pub fn local_init(stream: UnixStream, local_port: u32, peer_port: u32) -> Connection {
        let mut c = Connection::new(stream, local_port, peer_port, ConnState::LocalInit);
        c.pending.request = true;
        c
    }

    /// A connection the guest asked for (REQUEST `hdr`) that the host accepted.
    pub fn peer_init(stream: UnixStream, hdr: &VsockHeader) -> Connection {
        let mut c = Connection::new(stream, hdr.dst_port, hdr.src_port, ConnState::Established);
        c.pending.response = true;
        c.update_peer_credit(hdr);
        c
    }

    fn new(stream: UnixStream, local_port: u32, peer_port: u32, state: ConnState) -> Connection {
        Connection {
            stream,
            local_port,
            peer_port,
            state,
            pending: Pending::default(),
            host_readable: false,
            host_eof: false,
            peer_shut_rcv: false,
            peer_shut_send: false,
            write_shut: false,
            tx_buf: VecDeque::new(),
            tx_uncounted: 0,
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            rx_cnt: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            registered: None,
            queued: false,
        }
    }

    pub fn update_peer_credit(&mut self, hdr: &VsockHeader) {
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
    }

    /// Bytes the guest can still take. A guest reporting more consumed than
    /// was sent gets no credit rather than a huge one.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn can_send_data(&self) -> bool {
        self.state == ConnState::Established
            && self.host_readable
            && !self.host_eof
            && !self.peer_shut_rcv
            && self.peer_credit() > 0
    }

    pub fn has_pending_rx(&self) -> bool {
        let p = &self.pending;
        p.request || p.response || p.credit_update || p.shutdown || self.can_send_data()
    }

    /// The epoll registration this connection needs now (None: none).
    pub fn interest(&self) -> Option<EventSet> {
        if self.state == ConnState::LocalInit {
            // Only hang-ups (always reported): notice a host that gives up
            // while the guest has not answered.
            return Some(EventSet::empty());
        }
        let mut set = EventSet::empty();
        let wants_read =
            !self.host_readable && !self.host_eof && !self.peer_shut_rcv && self.peer_credit() > 0;
        if wants_read {
            set |= EventSet::IN;
        }
        if !self.tx_buf.is_empty() {
            set |= EventSet::OUT;
        }
        // Registered with nothing to wait for, a hung-up stream would wake
        // the loop forever.
        (!set.is_empty()).then_some(set)
    }

    /// Both directions are finished: the guest stopped sending and all its
    /// data reached the host, and the guest stopped receiving or the host
    /// hit EOF and the guest was told.
    pub fn is_done(&self) -> bool {
        self.state == ConnState::Established
            && self.peer_shut_send
            && self.tx_buf.is_empty()
            && (self.peer_shut_rcv || (self.host_eof && !self.pending.shutdown))
    }

    fn header(&mut self, guest_cid: u64, op: u16) -> VsockHeader {
        self.last_fwd_cnt_sent = self.fwd_cnt;
        VsockHeader {
            src_cid: VSOCK_HOST_CID,
            dst_cid: guest_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len: 0,
            type_: VSOCK_TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: CONN_BUF_SIZE,
            fwd_cnt: self.fwd_cnt.0,
        }
    }

    /// Produces the next packet for the guest; RW payload goes into `buf`
    /// (whose length is what the guest's RX buffer can hold).
    pub fn next_packet(&mut self, guest_cid: u64, buf: &mut [u8]) -> Produced {
        if self.pending.request {
            self.pending.request = false;
            return Produced::Packet(self.header(guest_cid, VSOCK_OP_REQUEST));
        }
        if self.pending.response {
            self.pending.response = false;
            return Produced::Packet(self.header(guest_cid, VSOCK_OP_RESPONSE));
        }
        if self.can_send_data() && !buf.is_empty() {
            let n = buf.len().min(self.peer_credit() as usize);
            match self.stream.read(&mut buf[..n]) {
                Ok(0) => {
                    self.host_readable = false;
                    self.host_eof = true;
                    self.pending.shutdown = true;
                }
                Ok(n) => {
                    crate::metrics::METRICS.vsock.rx_bytes.add(n as u64);
                    self.rx_cnt += Wrapping(n as u32);
                    let mut hdr = self.header(guest_cid, VSOCK_OP_RW);
                    hdr.len = n as u32;
                    return Produced::Packet(hdr);
                }
                Err(e)
                    if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted =>
                {
                    self.host_readable = false;
                }
                Err(e) => {
                    log::debug!("vsock: host stream read failed: {e}");
                    return Produced::Reset;
                }
            }
        }
        if self.pending.credit_update {
            self.pending.credit_update = false;
            return Produced::Packet(self.header(guest_cid, VSOCK_OP_CREDIT_UPDATE));
        }
        if self.pending.shutdown {
            self.pending.shutdown = false;
            let mut hdr = self.header(guest_cid, VSOCK_OP_SHUTDOWN);
            hdr.flags = VSOCK_FLAGS_SHUTDOWN_SEND;
            return Produced::Packet(hdr);
        }
        Produced::Nothing
    }

    /// The guest accepted a host-initiated connection: tell the host.
    pub fn establish(&mut self) -> io::Result<()> {
        self.state = ConnState::Established;
        let line = format!("OK {}\n", self.local_port);
        self.tx_uncounted = line.len();
        self.tx_buf.extend(line.as_bytes());
        self.flush()
    }

    /// Forwards guest data to the host. Fails if the guest overran the
    /// credit it was given or the host stream is broken.
    pub fn send_to_host(&mut self, data: &[u8]) -> io::Result<()> {
        let buffered = self.tx_buf.len() - self.tx_uncounted;
        if buffered + data.len() > CONN_BUF_SIZE as usize {
            return Err(io::Error::other("guest exceeded its credit"));
        }
        crate::metrics::METRICS
            .vsock
            .tx_bytes
            .add(data.len() as u64);
        let mut written = 0;
        if self.tx_buf.is_empty() {
            written = write_some(&mut self.stream, data)?;
            self.fwd_cnt += Wrapping(written as u32);
        }
        self.tx_buf.extend(&data[written..]);
        self.after_forward();
        Ok(())
    }

    /// Writes buffered guest data to the host; shuts the host stream's write
    /// side once the guest has stopped sending and everything is through.
    pub fn flush(&mut self) -> io::Result<()> {
        while !self.tx_buf.is_empty() {
            let (front, _) = self.tx_buf.as_slices();
            let n = write_some(&mut self.stream, front)?;
            if n == 0 {
                break;
            }
            self.tx_buf.drain(..n);
            let ours = n.min(self.tx_uncounted);
            self.tx_uncounted -= ours;
            self.fwd_cnt += Wrapping((n - ours) as u32);
        }
        self.after_forward();
        Ok(())
    }

    fn after_forward(&mut self) {
        if self.tx_buf.is_empty() && self.peer_shut_send && !self.write_shut {
            self.write_shut = true;
            // The host may already be gone; the next read/write reports it.
            let _ = self.stream.shutdown(Shutdown::Write);
        }
        // The guest's view of our free space.
        let buffered = (self.tx_buf.len() - self.tx_uncounted) as u32;
        let unseen = (self.fwd_cnt - self.last_fwd_cnt_sent).0;
        let guest_view_free = CONN_BUF_SIZE.saturating_sub(buffered.saturating_add(unseen));
        if unseen > 0 && !self.peer_shut_send && guest_view_free < CREDIT_UPDATE_THRESHOLD {
            self.pending.credit_update = true;
        }
    }

    /// The guest sent SHUTDOWN with `flags`.
    pub fn peer_shutdown(&mut self, flags: u32) {
        self.peer_shut_rcv |= flags & VSOCK_FLAGS_SHUTDOWN_RCV != 0;
        self.peer_shut_send |= flags & VSOCK_FLAGS_SHUTDOWN_SEND != 0;
        self.after_forward();
    }
}

/// Writes what the non-blocking stream takes now; 0 if it is full.
fn write_some(stream: &mut UnixStream, data: &[u8]) -> io::Result<usize> {
    loop {
        match stream.write(data) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(0),
            Err(e) => return Err(e),
        }
    }
}
