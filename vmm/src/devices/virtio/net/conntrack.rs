//! TCP connection tracking on the frames crossing virtio-net, so that a
//! pausing VMM can end the guest's connections cleanly: an RST to each side
//! that the receiver accepts (RFC 5961: the sequence number must be exactly
//! the receiver's RCV.NXT, or it answers with a challenge ACK).
//!
//! Frames are Ethernet (untagged) with IPv4 or IPv6 and TCP directly after
//! the fixed IP header; anything else is ignored. Parsing borrows the
//! frame and allocates nothing. A connection is created by a segment the
//! guest sends (any segment, not only a SYN, so tracking can start
//! mid-stream: after a restore, or when switched on at run time); segments
//! towards the guest only update existing entries, so a remote scanning
//! the guest cannot fill the table.

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::net::IpAddr;

use super::VNET_HDR_LEN;

/// Default bound on tracked connections.
pub const MAX_CONNECTIONS: usize = 4096;

const ETH_HLEN: usize = 14;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const IPPROTO_TCP: u8 = 6;
const TCP_HLEN: usize = 20;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// The TCP segment in a frame: what tracking needs of its headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    /// TCP payload bytes (from the IP length, so GSO superframes count whole).
    pub payload_len: u32,
}

impl Segment {
    /// Sequence space the segment occupies: payload, plus one each for SYN and FIN.
    pub fn seq_len(&self) -> u32 {
        self.payload_len
            .wrapping_add(u32::from(self.flags & TCP_SYN != 0))
            .wrapping_add(u32::from(self.flags & TCP_FIN != 0))
    }

    pub fn end_seq(&self) -> u32 {
        self.seq.wrapping_add(self.seq_len())
    }

    fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn mac(b: &[u8]) -> [u8; 6] {
    [b[0], b[1], b[2], b[3], b[4], b[5]]
}

/// Parses an Ethernet frame (no vnet header). `None` for anything but an
/// unfragmented TCP segment with sane header lengths.
pub fn parse(frame: &[u8]) -> Option<Segment> {
    if frame.len() < ETH_HLEN {
        return None;
    }
    let ip = &frame[ETH_HLEN..];
    let (src, dst, l4_off, ip_len) = match be16(frame, 12) {
        ETHERTYPE_IPV4 => {
            if ip.len() < 20 || ip[0] >> 4 != 4 || ip[9] != IPPROTO_TCP {
                return None;
            }
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            // More fragments, or not the first fragment: no whole segment.
            if ihl < 20 || be16(ip, 6) & 0x3fff != 0 {
                return None;
            }
            let src: [u8; 4] = ip[12..16].try_into().ok()?;
            let dst: [u8; 4] = ip[16..20].try_into().ok()?;
            // 0 is what a GSO frame too large for the field carries.
            let tot = usize::from(be16(ip, 2));
            let len = if tot == 0 {
                ip.len()
            } else {
                tot.min(ip.len())
            };
            (IpAddr::from(src), IpAddr::from(dst), ihl, len)
        }
        ETHERTYPE_IPV6 => {
            if ip.len() < 40 || ip[0] >> 4 != 6 || ip[6] != IPPROTO_TCP {
                return None;
            }
            let src: [u8; 16] = ip[8..24].try_into().ok()?;
            let dst: [u8; 16] = ip[24..40].try_into().ok()?;
            let pl = usize::from(be16(ip, 4));
            let len = if pl == 0 {
                ip.len()
            } else {
                (40 + pl).min(ip.len())
            };
            (IpAddr::from(src), IpAddr::from(dst), 40, len)
        }
        _ => return None,
    };
    if ip_len < l4_off + TCP_HLEN {
        return None;
    }
    let tcp = &ip[l4_off..ip_len];
    let doff = usize::from(tcp[12] >> 4) * 4;
    if doff < TCP_HLEN || doff > tcp.len() {
        return None;
    }
    Some(Segment {
        dst_mac: mac(&frame[0..6]),
        src_mac: mac(&frame[6..12]),
        src,
        dst,
        sport: be16(tcp, 0),
        dport: be16(tcp, 2),
        seq: be32(tcp, 4),
        ack: be32(tcp, 8),
        flags: tcp[13],
        payload_len: (tcp.len() - doff) as u32,
    })
}

/// `a` is later than `b` in sequence space (RFC 793 modular compare).
fn after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

fn later(cur: Option<u32>, new: u32) -> Option<u32> {
    match cur {
        Some(c) if !after(new, c) => Some(c),
        _ => Some(new),
    }
}

/// A connection, seen from the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowKey {
    pub guest: IpAddr,
    pub remote: IpAddr,
    pub guest_port: u16,
    pub remote_port: u16,
}

/// One `write` of all of it: the keyed hasher (the guest chooses the
/// keys) then costs a third of hashing field by field.
impl Hash for FlowKey {
    fn hash<H: Hasher>(&self, h: &mut H) {
        let mut b = [0u8; 36];
        b[..16].copy_from_slice(&v6_octets(self.guest));
        b[16..32].copy_from_slice(&v6_octets(self.remote));
        b[32..34].copy_from_slice(&self.guest_port.to_be_bytes());
        b[34..].copy_from_slice(&self.remote_port.to_be_bytes());
        h.write(&b);
    }
}

impl FlowKey {
    fn from_guest(s: &Segment) -> FlowKey {
        FlowKey {
            guest: s.src,
            remote: s.dst,
            guest_port: s.sport,
            remote_port: s.dport,
        }
    }

    fn from_remote(s: &Segment) -> FlowKey {
        FlowKey {
            guest: s.dst,
            remote: s.src,
            guest_port: s.dport,
            remote_port: s.sport,
        }
    }
}

#[derive(Debug, Clone, Default)]
struct Conn {
    guest_mac: [u8; 6],
    /// Where the guest sends: the next hop's MAC.
    next_hop_mac: [u8; 6],
    /// Source MAC of frames delivered to the guest.
    remote_mac: Option<[u8; 6]>,
    /// SND.NXT of the guest (end of the furthest segment it sent).
    guest_nxt: Option<u32>,
    /// The guest's latest ACK: its RCV.NXT when it sent it.
    guest_ack: Option<u32>,
    /// SND.NXT of the remote, from segments delivered to the guest.
    remote_nxt: Option<u32>,
    remote_ack: Option<u32>,
    /// Sequence number just past each side's FIN.
    guest_fin_end: Option<u32>,
    remote_fin_end: Option<u32>,
    last_seen: u64,
}

impl Conn {
    /// Takes in a segment the guest sent; true when that closed it.
    fn learn_from_guest(&mut self, s: &Segment, now: u64) -> bool {
        if s.has(TCP_SYN) {
            // The guest's sequence space starts here (a new connection
            // on a reused 4-tuple, too).
            *self = Conn::default();
        }
        self.last_seen = now;
        self.guest_mac = s.src_mac;
        self.next_hop_mac = s.dst_mac;
        // Retransmissions and keepalives do not move it back.
        let end = s.end_seq();
        self.guest_nxt = later(self.guest_nxt, end);
        if s.has(TCP_ACK) {
            self.guest_ack = later(self.guest_ack, s.ack);
        }
        if s.has(TCP_FIN) {
            self.guest_fin_end = Some(end);
        }
        self.closed()
    }

    /// Both FINs sent and each acknowledged: a clean close, nothing to end.
    fn closed(&self) -> bool {
        let acked = |fin: Option<u32>, ack: Option<u32>| match (fin, ack) {
            (Some(f), Some(a)) => !after(f, a),
            _ => false,
        };
        acked(self.guest_fin_end, self.remote_ack) && acked(self.remote_fin_end, self.guest_ack)
    }
}

/// What to do with a frame towards the guest while terminated connections
/// are remembered (between a pause and the resume).
#[derive(Debug, PartialEq, Eq)]
pub enum RemoteVerdict {
    Deliver,
    /// It belongs to a connection already ended: do not deliver it.
    Drop,
    /// As `Drop`, and write `frame` (an RST, vnet header first) to the tap:
    /// the remote had not accepted the first RST (it answered with a
    /// challenge ACK, or was still sending), and one taking its sequence
    /// number from this segment's ACK is what it accepts.
    DropAndReply(Vec<u8>),
}

/// The RSTs that end one connection, each with its vnet header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Termination {
    pub key: FlowKey,
    /// For the tap: from the guest to the remote.
    pub to_remote: Vec<u8>,
    /// For the guest: from the remote to the guest.
    pub to_guest: Vec<u8>,
}

pub struct ConnTracker {
    conns: HashMap<FlowKey, Conn>,
    /// Connections ended at the last pause: their late frames are dropped
    /// until the VM runs again.
    terminated: HashSet<FlowKey>,
    capacity: usize,
    clock: u64,
    evict_logged: bool,
}

impl Default for ConnTracker {
    fn default() -> Self {
        ConnTracker::new(MAX_CONNECTIONS)
    }
}

impl ConnTracker {
    pub fn new(capacity: usize) -> ConnTracker {
        ConnTracker {
            conns: HashMap::new(),
            terminated: HashSet::new(),
            capacity: capacity.max(1),
            clock: 0,
            evict_logged: false,
        }
    }

    pub fn len(&self) -> usize {
        self.conns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// Connections that `terminate` would end.
    pub fn keys(&self) -> impl Iterator<Item = &FlowKey> {
        self.conns.keys()
    }

    /// A frame the guest sent (Ethernet, no vnet header). Returns false
    /// when it belongs to a connection ended at the pause: not to be sent.
    pub fn on_guest_frame(&mut self, frame: &[u8]) -> bool {
        let Some(s) = parse(frame) else {
            return true;
        };
        let key = FlowKey::from_guest(&s);
        if !self.terminated.is_empty() && self.terminated.contains(&key) {
            return false;
        }
        if s.has(TCP_RST) {
            self.conns.remove(&key);
            return true;
        }
        self.clock += 1;
        // One lookup for a known connection, the common case.
        let closed = match self.conns.get_mut(&key) {
            Some(c) => c.learn_from_guest(&s, self.clock),
            None => {
                self.make_room();
                let c = self.conns.entry(key).or_default();
                c.learn_from_guest(&s, self.clock)
            }
        };
        if closed {
            self.conns.remove(&key);
        }
        true
    }

    /// Whether a frame towards the guest may be delivered. Only does work
    /// between a pause and the resume.
    pub fn check_remote_frame(&self, frame: &[u8]) -> RemoteVerdict {
        if self.terminated.is_empty() {
            return RemoteVerdict::Deliver;
        }
        let Some(s) = parse(frame) else {
            return RemoteVerdict::Deliver;
        };
        if !self.terminated.contains(&FlowKey::from_remote(&s)) {
            return RemoteVerdict::Deliver;
        }
        if s.has(TCP_RST) || !s.has(TCP_ACK) {
            return RemoteVerdict::Drop;
        }
        // RFC 793's reset for a segment with ACK: SEQ = SEG.ACK.
        let mut rst = Vec::new();
        build_rst(
            &mut rst,
            &Endpoints {
                src_mac: s.dst_mac,
                dst_mac: s.src_mac,
                src: s.dst,
                dst: s.src,
                sport: s.dport,
                dport: s.sport,
            },
            s.ack,
            Some(s.end_seq()),
        );
        RemoteVerdict::DropAndReply(rst)
    }

    /// A frame now in the guest's receive ring (Ethernet, no vnet header).
    pub fn on_remote_frame(&mut self, frame: &[u8]) {
        let Some(s) = parse(frame) else {
            return;
        };
        let key = FlowKey::from_remote(&s);
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        if s.has(TCP_RST) {
            self.conns.remove(&key);
            return;
        }
        self.clock += 1;
        c.last_seen = self.clock;
        c.remote_mac = Some(s.src_mac);
        if s.has(TCP_SYN) {
            // SYN-ACK: the remote's sequence space starts here.
            c.remote_nxt = Some(s.end_seq());
        } else {
            c.remote_nxt = later(c.remote_nxt, s.end_seq());
        }
        if s.has(TCP_ACK) {
            c.remote_ack = later(c.remote_ack, s.ack);
        }
        if s.has(TCP_FIN) {
            c.remote_fin_end = Some(s.end_seq());
        }
        if c.closed() {
            self.conns.remove(&key);
        }
    }

    /// Ends every tracked connection: returns the RSTs for both sides and
    /// empties the table. The connections are remembered (their late
    /// frames dropped) until `forget_terminated`.
    pub fn terminate(&mut self) -> Vec<Termination> {
        let mut out = Vec::with_capacity(self.conns.len());
        for (key, c) in self.conns.drain() {
            // The guest's RCV.NXT: everything delivered to it (its ACKs
            // lag behind), or its ACK if nothing was seen from the remote.
            let guest_rcv_nxt = match (c.remote_nxt, c.guest_ack) {
                (Some(r), Some(a)) if after(a, r) => Some(a),
                (Some(r), _) => Some(r),
                (None, a) => a,
            };
            // Set by the guest segment that made the entry.
            let guest_nxt = c.guest_nxt.unwrap_or_default();
            let mut to_remote = Vec::new();
            build_rst(
                &mut to_remote,
                &Endpoints {
                    src_mac: c.guest_mac,
                    dst_mac: c.next_hop_mac,
                    src: key.guest,
                    dst: key.remote,
                    sport: key.guest_port,
                    dport: key.remote_port,
                },
                guest_nxt,
                guest_rcv_nxt,
            );
            let mut to_guest = Vec::new();
            build_rst(
                &mut to_guest,
                &Endpoints {
                    src_mac: c.remote_mac.unwrap_or(c.next_hop_mac),
                    dst_mac: c.guest_mac,
                    src: key.remote,
                    dst: key.guest,
                    sport: key.remote_port,
                    dport: key.guest_port,
                },
                guest_rcv_nxt.unwrap_or(0),
                // Acknowledging the guest's SYN is what makes a SYN-SENT
                // socket accept the RST.
                Some(guest_nxt),
            );
            self.terminated.insert(key);
            out.push(Termination {
                key,
                to_remote,
                to_guest,
            });
        }
        out
    }

    /// The VM runs again: its own stack answers late frames from now on.
    pub fn forget_terminated(&mut self) {
        self.terminated.clear();
    }

    /// Drops the least recently seen eighth of the table when it is full,
    /// so a full table costs one scan per many new connections.
    fn make_room(&mut self) {
        if self.conns.len() < self.capacity {
            return;
        }
        if !self.evict_logged {
            crate::guest_warn!(
                "virtio-net: more than {} TCP connections; forgetting the least recently \
                 used (they will not be ended at a pause)",
                self.capacity
            );
            self.evict_logged = true;
        }
        let mut ages: Vec<u64> = self.conns.values().map(|c| c.last_seen).collect();
        let n = (self.capacity / 8).max(1);
        let (_, &mut cutoff, _) = ages.select_nth_unstable(n - 1);
        let mut left = n;
        self.conns.retain(|_, c| {
            if left > 0 && c.last_seen <= cutoff {
                left -= 1;
                false
            } else {
                true
            }
        });
    }
}

/// Addresses of a frame to build.
struct Endpoints {
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: IpAddr,
    dst: IpAddr,
    sport: u16,
    dport: u16,
}

/// Appends a vnet header (all zero: no offloads, checksums complete) and an
/// Ethernet/IP/TCP RST to `out`; with `ack`, RST|ACK.
fn build_rst(out: &mut Vec<u8>, e: &Endpoints, seq: u32, ack: Option<u32>) {
    out.extend_from_slice(&[0; VNET_HDR_LEN]);
    out.extend_from_slice(&e.dst_mac);
    out.extend_from_slice(&e.src_mac);
    let mut pseudo = 0u32;
    match (e.src, e.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            out.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
            let ip_start = out.len();
            out.extend_from_slice(&[0x45, 0]);
            out.extend_from_slice(&((20 + TCP_HLEN) as u16).to_be_bytes());
            // id 0, don't fragment, TTL 64, TCP, checksum below.
            out.extend_from_slice(&[0, 0, 0x40, 0, 64, IPPROTO_TCP, 0, 0]);
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
            let sum = checksum(&out[ip_start..], 0);
            out[ip_start + 10..ip_start + 12].copy_from_slice(&sum.to_be_bytes());
            pseudo = sum_words(&s.octets(), sum_words(&d.octets(), pseudo));
        }
        (src, dst) => {
            let (s, d) = (v6_octets(src), v6_octets(dst));
            out.extend_from_slice(&ETHERTYPE_IPV6.to_be_bytes());
            out.extend_from_slice(&[0x60, 0, 0, 0]);
            out.extend_from_slice(&(TCP_HLEN as u16).to_be_bytes());
            out.extend_from_slice(&[IPPROTO_TCP, 64]);
            out.extend_from_slice(&s);
            out.extend_from_slice(&d);
            pseudo = sum_words(&s, sum_words(&d, pseudo));
        }
    }
    pseudo += u32::from(IPPROTO_TCP) + TCP_HLEN as u32;
    let tcp_start = out.len();
    out.extend_from_slice(&e.sport.to_be_bytes());
    out.extend_from_slice(&e.dport.to_be_bytes());
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(&ack.unwrap_or(0).to_be_bytes());
    let flags = if ack.is_some() {
        TCP_RST | TCP_ACK
    } else {
        TCP_RST
    };
    // Data offset 5 words; window, checksum (below), urgent pointer 0.
    out.extend_from_slice(&[(TCP_HLEN as u8 / 4) << 4, flags, 0, 0, 0, 0, 0, 0]);
    let sum = checksum(&out[tcp_start..], pseudo);
    out[tcp_start + 16..tcp_start + 18].copy_from_slice(&sum.to_be_bytes());
}

fn v6_octets(a: IpAddr) -> [u8; 16] {
    match a {
        IpAddr::V6(a) => a.octets(),
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
    }
}

/// Adds `data` as big-endian 16-bit words to `sum` (odd tail zero-padded).
fn sum_words(data: &[u8], mut sum: u32) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for w in &mut chunks {
        sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [b] = chunks.remainder() {
        sum += u32::from(*b) << 8;
    }
    sum
}

/// The Internet checksum (RFC 1071) of `data` plus a partial `sum`.
pub fn checksum(data: &[u8], sum: u32) -> u16 {
    let mut s = u64::from(sum_words(data, sum));
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

#[cfg(test)]
#[path = "conntrack_tests.rs"]
pub(crate) mod tests;
