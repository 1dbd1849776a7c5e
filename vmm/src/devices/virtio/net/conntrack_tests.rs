//! Connection tracking on synthetic frames: parsing, what is learned from
//! each direction, the RSTs built, and the table's bounds.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::*;

pub(crate) const GUEST_MAC: [u8; 6] = [0x06, 0, 10, 0, 0, 2];
pub(crate) const HOP_MAC: [u8; 6] = [0x02, 0, 10, 0, 0, 1];
const REMOTE_MAC: [u8; 6] = [0x02, 0, 10, 0, 0, 9];
const G4: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2));
const R4: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));

/// An Ethernet/IP/TCP frame (no vnet header) with `payload` zero bytes
/// and valid checksums.
#[allow(clippy::too_many_arguments)]
pub(crate) fn tcp_frame(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: (IpAddr, u16),
    dst: (IpAddr, u16),
    seq: u32,
    ack: u32,
    flags: u8,
    payload: &[u8],
) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    let tcp_len = TCP_HLEN + payload.len();
    let mut pseudo = 0;
    match (src.0, dst.0) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            f.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
            let at = f.len();
            f.extend_from_slice(&[0x45, 0]);
            f.extend_from_slice(&((20 + tcp_len) as u16).to_be_bytes());
            f.extend_from_slice(&[0, 1, 0x40, 0, 64, IPPROTO_TCP, 0, 0]);
            f.extend_from_slice(&s.octets());
            f.extend_from_slice(&d.octets());
            let sum = checksum(&f[at..], 0);
            f[at + 10..at + 12].copy_from_slice(&sum.to_be_bytes());
            pseudo = sum_words(&s.octets(), sum_words(&d.octets(), pseudo));
        }
        (s, d) => {
            let (s, d) = (v6_octets(s), v6_octets(d));
            f.extend_from_slice(&ETHERTYPE_IPV6.to_be_bytes());
            f.extend_from_slice(&[0x60, 0, 0, 0]);
            f.extend_from_slice(&(tcp_len as u16).to_be_bytes());
            f.extend_from_slice(&[IPPROTO_TCP, 64]);
            f.extend_from_slice(&s);
            f.extend_from_slice(&d);
            pseudo = sum_words(&s, sum_words(&d, pseudo));
        }
    }
    pseudo += u32::from(IPPROTO_TCP) + tcp_len as u32;
    let at = f.len();
    f.extend_from_slice(&src.1.to_be_bytes());
    f.extend_from_slice(&dst.1.to_be_bytes());
    f.extend_from_slice(&seq.to_be_bytes());
    f.extend_from_slice(&ack.to_be_bytes());
    f.extend_from_slice(&[0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    f.extend_from_slice(payload);
    let sum = checksum(&f[at..], pseudo);
    f[at + 16..at + 18].copy_from_slice(&sum.to_be_bytes());
    f
}

/// Parses a built frame (vnet header first) and checks that it is one
/// that a receiver takes as is: zero vnet header, valid IPv4 header and
/// TCP checksums.
pub(crate) fn check_frame(with_hdr: &[u8]) -> Segment {
    assert_eq!(with_hdr[..VNET_HDR_LEN], [0; VNET_HDR_LEN], "vnet header");
    let f = &with_hdr[VNET_HDR_LEN..];
    let s = parse(f).expect("a TCP segment");
    let (l4, pseudo) = match (s.src, s.dst) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            assert_eq!(checksum(&f[ETH_HLEN..ETH_HLEN + 20], 0), 0, "IPv4 checksum");
            (
                ETH_HLEN + 20,
                sum_words(&a.octets(), sum_words(&b.octets(), 0)),
            )
        }
        (a, b) => (
            ETH_HLEN + 40,
            sum_words(&v6_octets(a), sum_words(&v6_octets(b), 0)),
        ),
    };
    let tcp = &f[l4..];
    let pseudo = pseudo + u32::from(IPPROTO_TCP) + tcp.len() as u32;
    assert_eq!(checksum(tcp, pseudo), 0, "TCP checksum");
    s
}

/// A guest at G4:40000 talking to R4:80.
struct Flow {
    g: (IpAddr, u16),
    r: (IpAddr, u16),
}

const F4: Flow = Flow {
    g: (G4, 40000),
    r: (R4, 80),
};

impl Flow {
    fn out(&self, seq: u32, ack: u32, flags: u8, len: usize) -> Vec<u8> {
        tcp_frame(
            GUEST_MAC,
            HOP_MAC,
            self.g,
            self.r,
            seq,
            ack,
            flags,
            &vec![0; len],
        )
    }

    fn inc(&self, seq: u32, ack: u32, flags: u8, len: usize) -> Vec<u8> {
        tcp_frame(
            REMOTE_MAC,
            GUEST_MAC,
            self.r,
            self.g,
            seq,
            ack,
            flags,
            &vec![0; len],
        )
    }
}

#[test]
fn parses_v4_v6_and_ignores_the_rest() {
    let f = F4.out(7, 9, TCP_ACK | TCP_FIN, 100);
    let s = parse(&f).unwrap();
    assert_eq!((s.src, s.sport, s.dst, s.dport), (G4, 40000, R4, 80));
    assert_eq!((s.seq, s.ack, s.payload_len, s.seq_len()), (7, 9, 100, 101));
    assert_eq!((s.src_mac, s.dst_mac), (GUEST_MAC, HOP_MAC));

    // Ethernet padding after a short segment is not payload.
    let mut padded = F4.out(7, 9, TCP_ACK, 0);
    padded.extend_from_slice(&[0; 6]);
    assert_eq!(parse(&padded).unwrap().payload_len, 0);
    // A GSO frame too large for the length field carries 0 there.
    let mut big = F4.out(7, 9, TCP_ACK, 70000);
    big[ETH_HLEN + 2..ETH_HLEN + 4].copy_from_slice(&[0, 0]);
    assert_eq!(parse(&big).unwrap().payload_len, 70000);

    let g6: IpAddr = "fd00::2".parse().unwrap();
    let r6: IpAddr = "fd00::1".parse().unwrap();
    let f6 = tcp_frame(
        GUEST_MAC,
        HOP_MAC,
        (g6, 1),
        (r6, 2),
        1,
        2,
        TCP_SYN,
        &[1, 2, 3],
    );
    let s = parse(&f6).unwrap();
    assert_eq!((s.src, s.dst, s.payload_len, s.seq_len()), (g6, r6, 3, 4));

    let mut udp = f.clone();
    udp[ETH_HLEN + 9] = 17;
    assert_eq!(parse(&udp), None);
    let mut frag = f.clone();
    frag[ETH_HLEN + 6] = 0x20; // more fragments
    assert_eq!(parse(&frag), None);
    let mut arp = f.clone();
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    assert_eq!(parse(&arp), None);
    let mut bad_doff = f.clone();
    bad_doff[ETH_HLEN + 20 + 12] = 0x20;
    assert_eq!(parse(&bad_doff), None);
    for n in [0, 13, 14, 33, 53] {
        assert_eq!(parse(&f[..n]), None, "truncated to {n}");
    }
    let mut v6_ext = f6.clone();
    v6_ext[ETH_HLEN + 6] = 0; // hop-by-hop options first
    assert_eq!(parse(&v6_ext), None);
}

#[test]
fn learns_both_directions_and_builds_accepted_rsts() {
    let mut ct = ConnTracker::default();
    assert!(ct.on_guest_frame(&F4.out(100, 0, TCP_SYN, 0)));
    ct.on_remote_frame(&F4.inc(5000, 101, TCP_SYN | TCP_ACK, 0));
    ct.on_guest_frame(&F4.out(101, 5001, TCP_ACK, 10));
    ct.on_remote_frame(&F4.inc(5001, 111, TCP_ACK, 20));
    // The guest has not acknowledged the 20 bytes yet; a retransmission
    // and a keepalive do not move its SND.NXT back.
    ct.on_guest_frame(&F4.out(101, 5001, TCP_ACK, 10));
    ct.on_guest_frame(&F4.out(110, 5001, TCP_ACK, 0));
    assert_eq!(ct.len(), 1);

    let t = ct.terminate();
    assert_eq!(ct.len(), 0);
    assert_eq!(t.len(), 1);
    let r = check_frame(&t[0].to_remote);
    assert_eq!((r.src, r.sport, r.dst, r.dport), (G4, 40000, R4, 80));
    assert_eq!((r.src_mac, r.dst_mac), (GUEST_MAC, HOP_MAC));
    assert_eq!((r.seq, r.ack, r.flags), (111, 5021, TCP_RST | TCP_ACK));
    assert_eq!(r.payload_len, 0);
    let g = check_frame(&t[0].to_guest);
    assert_eq!((g.src, g.sport, g.dst, g.dport), (R4, 80, G4, 40000));
    assert_eq!((g.src_mac, g.dst_mac), (REMOTE_MAC, GUEST_MAC));
    // What the guest expects next from the remote, as RFC 5961 wants.
    assert_eq!((g.seq, g.ack, g.flags), (5021, 111, TCP_RST | TCP_ACK));
}

#[test]
fn mid_stream_start_uses_the_guests_ack() {
    // Tracking switched on (or restored) mid-connection: only the guest's
    // ACK tells where the remote is.
    let mut ct = ConnTracker::default();
    ct.on_guest_frame(&F4.out(7000, 9000, TCP_ACK, 0));
    let t = ct.terminate();
    let g = check_frame(&t[0].to_guest);
    assert_eq!((g.seq, g.ack), (9000, 7000));
    // Nothing came from the remote: the next hop's MAC stands in for it.
    assert_eq!(g.src_mac, HOP_MAC);
    let r = check_frame(&t[0].to_remote);
    assert_eq!((r.seq, r.ack), (7000, 9000));
}

#[test]
fn syn_sent_gets_rsts_that_ack_the_syn() {
    let mut ct = ConnTracker::default();
    ct.on_guest_frame(&F4.out(u32::MAX, 0, TCP_SYN, 0));
    let t = ct.terminate();
    let r = check_frame(&t[0].to_remote);
    // No ACK seen from the guest: a plain RST at its SND.NXT (wrapped).
    assert_eq!((r.seq, r.flags), (0, TCP_RST));
    let g = check_frame(&t[0].to_guest);
    assert_eq!((g.ack, g.flags), (0, TCP_RST | TCP_ACK));
}

#[test]
fn sequence_numbers_wrap() {
    let mut ct = ConnTracker::default();
    ct.on_guest_frame(&F4.out(u32::MAX - 4, 10, TCP_ACK, 4));
    ct.on_guest_frame(&F4.out(u32::MAX, 10, TCP_ACK, 10));
    ct.on_guest_frame(&F4.out(u32::MAX - 4, 10, TCP_ACK, 4)); // retransmission
    ct.on_remote_frame(&F4.inc(10, 9, TCP_ACK, 5));
    let t = ct.terminate();
    let r = check_frame(&t[0].to_remote);
    assert_eq!((r.seq, r.ack), (9, 15));
}

#[test]
fn clean_close_forgets_half_close_does_not() {
    let mut ct = ConnTracker::default();
    ct.on_guest_frame(&F4.out(100, 0, TCP_SYN, 0));
    ct.on_remote_frame(&F4.inc(5000, 101, TCP_SYN | TCP_ACK, 0));
    ct.on_guest_frame(&F4.out(101, 5001, TCP_ACK | TCP_FIN, 0));
    ct.on_remote_frame(&F4.inc(5001, 102, TCP_ACK, 0));
    // Half closed: the remote may still send, the guest still reads.
    assert_eq!(ct.len(), 1);
    ct.on_remote_frame(&F4.inc(5001, 102, TCP_ACK | TCP_FIN, 3));
    assert_eq!(ct.len(), 1, "the remote's FIN is not acknowledged yet");
    ct.on_guest_frame(&F4.out(102, 5005, TCP_ACK, 0));
    assert_eq!(ct.len(), 0);

    // Both FINs, the guest's last: forgotten at the remote's final ACK.
    ct.on_guest_frame(&F4.out(100, 0, TCP_SYN, 0));
    ct.on_remote_frame(&F4.inc(5000, 101, TCP_SYN | TCP_ACK, 0));
    ct.on_remote_frame(&F4.inc(5001, 101, TCP_ACK | TCP_FIN, 0));
    ct.on_guest_frame(&F4.out(101, 5002, TCP_ACK | TCP_FIN, 0));
    assert_eq!(ct.len(), 1);
    ct.on_remote_frame(&F4.inc(5002, 102, TCP_ACK, 0));
    assert_eq!(ct.len(), 0);

    // A half-closed connection is ended at SND.NXT past the FIN.
    ct.on_guest_frame(&F4.out(100, 0, TCP_SYN, 0));
    ct.on_remote_frame(&F4.inc(5000, 101, TCP_SYN | TCP_ACK, 0));
    ct.on_guest_frame(&F4.out(101, 5001, TCP_ACK | TCP_FIN, 0));
    let t = ct.terminate();
    assert_eq!(check_frame(&t[0].to_remote).seq, 102);
    assert_eq!(check_frame(&t[0].to_guest).ack, 102);
}

#[test]
fn rst_either_way_forgets() {
    let mut ct = ConnTracker::default();
    ct.on_guest_frame(&F4.out(100, 0, TCP_SYN, 0));
    ct.on_guest_frame(&F4.out(101, 0, TCP_RST, 0));
    assert!(ct.is_empty());
    ct.on_guest_frame(&F4.out(100, 0, TCP_SYN, 0));
    ct.on_remote_frame(&F4.inc(0, 101, TCP_RST | TCP_ACK, 0));
    assert!(ct.is_empty());
    assert!(ct.terminate().is_empty());
}

#[test]
fn remote_segments_alone_make_no_entry() {
    let mut ct = ConnTracker::default();
    ct.on_remote_frame(&F4.inc(5000, 0, TCP_SYN, 0));
    ct.on_remote_frame(&F4.inc(5001, 1, TCP_ACK, 100));
    assert!(ct.is_empty());
    // The guest's SYN-ACK starts its own sequence space over an old entry.
    ct.on_guest_frame(&F4.out(50, 9, TCP_ACK, 0));
    ct.on_guest_frame(&F4.out(100, 5001, TCP_SYN | TCP_ACK, 0));
    let t = ct.terminate();
    let r = check_frame(&t[0].to_remote);
    assert_eq!((r.seq, r.ack), (101, 5001));
}

#[test]
fn ipv6_connections() {
    let g6: IpAddr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2).into();
    let r6: IpAddr = "2001:db8::80".parse().unwrap();
    let f = Flow {
        g: (g6, 33000),
        r: (r6, 443),
    };
    let mut ct = ConnTracker::default();
    // A v4 flow with the same ports is another connection.
    ct.on_guest_frame(&F4.out(1, 1, TCP_ACK, 0));
    ct.on_guest_frame(&f.out(100, 0, TCP_SYN, 0));
    ct.on_remote_frame(&f.inc(7000, 101, TCP_SYN | TCP_ACK, 0));
    ct.on_guest_frame(&f.out(101, 7001, TCP_ACK, 1000));
    ct.on_remote_frame(&f.inc(7001, 1101, TCP_ACK, 1));
    assert_eq!(ct.len(), 2);
    let t = ct.terminate();
    let t = t.iter().find(|t| t.key.guest == g6).unwrap();
    let r = check_frame(&t.to_remote);
    assert_eq!((r.src, r.sport, r.dst, r.dport), (g6, 33000, r6, 443));
    assert_eq!((r.seq, r.ack), (1101, 7002));
    let g = check_frame(&t.to_guest);
    assert_eq!((g.src, g.dst, g.seq, g.ack), (r6, g6, 7002, 1101));
    assert_eq!(t.to_guest.len(), VNET_HDR_LEN + ETH_HLEN + 40 + TCP_HLEN);
}

#[test]
fn table_is_bounded_keeping_the_recent() {
    let mut ct = ConnTracker::new(16);
    for port in 0..40u16 {
        let f = Flow {
            g: (G4, 1000 + port),
            r: (R4, 80),
        };
        ct.on_guest_frame(&f.out(1, 1, TCP_ACK, 0));
        assert!(ct.len() <= 16);
    }
    assert!(ct.keys().any(|k| k.guest_port == 1039));
    assert!(!ct.keys().any(|k| k.guest_port == 1000));
    // A connection that keeps talking stays.
    let mut ct = ConnTracker::new(16);
    let busy = Flow {
        g: (G4, 999),
        r: (R4, 80),
    };
    for port in 0..100u16 {
        ct.on_guest_frame(&busy.out(1 + u32::from(port), 1, TCP_ACK, 1));
        let f = Flow {
            g: (G4, 1000 + port),
            r: (R4, 80),
        };
        ct.on_guest_frame(&f.out(1, 1, TCP_ACK, 0));
    }
    assert!(ct.keys().any(|k| k.guest_port == 999));
}

#[test]
fn late_frames_of_ended_connections() {
    let mut ct = ConnTracker::default();
    ct.on_guest_frame(&F4.out(100, 5000, TCP_ACK, 0));
    assert_eq!(
        ct.check_remote_frame(&F4.inc(1, 1, TCP_ACK, 0)),
        RemoteVerdict::Deliver
    );
    ct.terminate();

    // The remote's challenge ACK (its RCV.NXT was behind the guest's
    // SND.NXT): answered with the RST it accepts, not delivered.
    match ct.check_remote_frame(&F4.inc(5000, 90, TCP_ACK, 0)) {
        RemoteVerdict::DropAndReply(rst) => {
            let r = check_frame(&rst);
            assert_eq!((r.src, r.sport, r.dst, r.dport), (G4, 40000, R4, 80));
            assert_eq!((r.src_mac, r.dst_mac), (GUEST_MAC, REMOTE_MAC));
            assert_eq!((r.seq, r.ack, r.flags), (90, 5000, TCP_RST | TCP_ACK));
        }
        v => panic!("{v:?}"),
    }
    assert_eq!(
        ct.check_remote_frame(&F4.inc(5000, 90, TCP_RST, 0)),
        RemoteVerdict::Drop
    );
    // Other connections and other traffic pass.
    let other = Flow {
        g: (G4, 40001),
        r: (R4, 80),
    };
    assert_eq!(
        ct.check_remote_frame(&other.inc(1, 1, TCP_ACK, 0)),
        RemoteVerdict::Deliver
    );
    assert_eq!(ct.check_remote_frame(&[0u8; 60]), RemoteVerdict::Deliver);
    // The guest's own late frames for it are not sent.
    assert!(!ct.on_guest_frame(&F4.out(100, 5000, TCP_ACK, 5)));
    assert!(ct.is_empty());

    ct.forget_terminated();
    assert_eq!(
        ct.check_remote_frame(&F4.inc(5000, 90, TCP_ACK, 0)),
        RemoteVerdict::Deliver
    );
    assert!(ct.on_guest_frame(&F4.out(100, 5000, TCP_ACK, 5)));
}

#[test]
fn internet_checksum() {
    // RFC 1071's example words sum to ddf2; the checksum is its complement.
    assert_eq!(
        checksum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7], 0),
        !0xddf2
    );
    assert_eq!(checksum(&[0xff], 0), !0xff00);
}
