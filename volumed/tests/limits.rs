//! The NBD server's connection limits and deadlines, against the real
//! `ember-volumed`: connections over the per-client or the overall limit
//! are closed at once, unanswered, while the earlier ones go on working;
//! a client that says nothing (or dribbles its handshake) is dropped at
//! the handshake deadline and its place given back; a client that breaks
//! the protocol ends only its own connection.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use ember_nbd::{encode_option, OptionHeader, ServerGreeting, FLAG_C_FIXED_NEWSTYLE, OPT_GO};
use ember_tests::volumed::Volumed;
use ember_volumed::nbd::client::Client;

/// What the server did with a fresh connection: greeted it (`true`) or
/// closed it unanswered (`false`).
fn greeted(s: &mut impl Read) -> bool {
    ServerGreeting::read(s).is_ok()
}

fn tcp_from(source: &str, port: u16) -> TcpStream {
    // A socket bound to another loopback address: another client.
    let s = socket2_free_connect(source, port);
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s
}

/// Connects to 127.0.0.1:`port` from `source` (an address of lo).
fn socket2_free_connect(source: &str, port: u16) -> TcpStream {
    use std::os::fd::FromRawFd;
    let src: SocketAddr = format!("{source}:0").parse().unwrap();
    let dst: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let sin = |a: &SocketAddr| {
        let SocketAddr::V4(a) = a else {
            panic!("v4 only")
        };
        libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: a.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(*a.ip()).to_be(),
            },
            sin_zero: [0; 8],
        }
    };
    let (s, d) = (sin(&src), sin(&dst));
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: a new socket, bound and connected with sockaddr_in values
    // that live across the calls; the fd is owned by the TcpStream after.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0);
        assert_eq!(
            libc::bind(fd, (&s as *const libc::sockaddr_in).cast(), len),
            0
        );
        assert_eq!(
            libc::connect(fd, (&d as *const libc::sockaddr_in).cast(), len),
            0
        );
        TcpStream::from_raw_fd(fd)
    }
}

fn volume(v: &Volumed) -> String {
    let (st, r) = v.call(
        "POST",
        "/v1/volumes",
        Some(r#"{"Name":"v","SizeBytes":1048576}"#),
    );
    assert_eq!(st, 201, "{r}");
    let (st, g) = v.call("POST", "/v1/volumes/v/attach", Some(r#"{"Host":"h"}"#));
    assert_eq!(st, 200, "{g}");
    g["ExportName"].as_str().unwrap().to_string()
}

/// Polls until `f` holds (the server frees a place when the connection's
/// thread ends, just after the close).
fn eventually(mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + Duration::from_secs(30);
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

#[test]
fn connections_over_the_limits_are_refused_and_the_others_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let v = Volumed::start_with(
        dir.path(),
        &[
            "--nbd-max-connections",
            "6",
            "--nbd-max-connections-per-client",
            "4",
        ],
    );
    let export = volume(&v);
    let addr = format!("127.0.0.1:{}", v.port);

    // Per client, on the unix socket (one uid: one client).
    let mut held: Vec<Client> = (0..4)
        .map(|_| Client::connect_unix(&v.nbd, &export).unwrap())
        .collect();
    let mut refused = 0;
    for _ in 0..20 {
        let mut s = UnixStream::connect(&v.nbd).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        if !greeted(&mut s) {
            refused += 1;
        }
    }
    println!("unix: 4 held, 20 more tried, {refused} refused");
    assert_eq!(refused, 20);
    for (i, c) in held.iter_mut().enumerate() {
        let at = i as u64 * 4096;
        assert_eq!(c.write(at, &[i as u8 + 1; 4096]).unwrap().error, 0);
        assert_eq!(c.read(at, 4096).unwrap().data, vec![i as u8 + 1; 4096]);
    }
    // One goes: a place is free again.
    held.pop();
    assert!(eventually(|| Client::connect_unix(&v.nbd, &export)
        .map(|c| held.push(c))
        .is_ok()));

    // Per client and overall, over TCP: 4 from 127.0.0.1, then only 2
    // from 127.0.0.2 (6 in all), the rest refused.
    let mut a: Vec<Client> = (0..4)
        .map(|_| Client::connect_tcp(&addr, &export).unwrap())
        .collect();
    let mut s = tcp_from("127.0.0.1", v.port);
    assert!(!greeted(&mut s), "a 5th from one client");
    let mut b: Vec<TcpStream> = Vec::new();
    for _ in 0..2 {
        let mut s = tcp_from("127.0.0.2", v.port);
        assert!(greeted(&mut s));
        b.push(s);
    }
    let mut refused = 0;
    for _ in 0..10 {
        if !greeted(&mut tcp_from("127.0.0.3", v.port)) {
            refused += 1;
        }
    }
    println!("tcp: 6 held (4 + 2 clients), 10 more from a third client, {refused} refused");
    assert_eq!(refused, 10, "over the overall limit");
    for c in &mut a {
        assert_eq!(c.read(0, 4096).unwrap().error, 0);
    }
    // The silent ones (b) are dropped at the handshake deadline (10 s by
    // default) and their places given back.
    for s in &mut b {
        let mut rest = Vec::new();
        assert!(s.read_to_end(&mut rest).is_ok(), "closed by the server");
    }
    assert!(eventually(|| {
        let mut s = tcp_from("127.0.0.3", v.port);
        greeted(&mut s)
    }));
    for c in &mut a {
        assert_eq!(c.read(0, 4096).unwrap().error, 0);
    }
}

#[test]
fn silent_and_broken_clients_end_only_their_own_connection() {
    let dir = tempfile::tempdir().unwrap();
    let v = Volumed::start_with(dir.path(), &["--nbd-handshake-timeout-ms", "1500"]);
    let export = volume(&v);
    let mut good = Client::connect_unix(&v.nbd, &export).unwrap();

    // Says nothing after the greeting: closed at the deadline (the test's
    // own read timeout is far longer).
    let mut silent = UnixStream::connect(&v.nbd).unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    assert!(greeted(&mut silent));
    let mut rest = Vec::new();
    assert_eq!(
        silent.read_to_end(&mut rest).unwrap(),
        0,
        "closed, not timed out here"
    );

    // Dribbles its handshake, a byte every 200 ms: still closed by the
    // deadline, which is for the whole handshake.
    let mut slow = TcpStream::connect(("127.0.0.1", v.port)).unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    assert!(greeted(&mut slow));
    let mut sent = 0;
    let mut opt = FLAG_C_FIXED_NEWSTYLE.to_be_bytes().to_vec();
    opt.extend(encode_option(OPT_GO, &[b'x'; 10_000]).unwrap());
    for b in &opt {
        if slow.write_all(&[*b]).is_err() {
            break;
        }
        sent += 1;
        std::thread::sleep(Duration::from_millis(200));
        if sent > 200 {
            break;
        }
    }
    let mut rest = Vec::new();
    let closed = slow.read_to_end(&mut rest).is_ok() || sent < 200;
    println!("a dribbling client was cut off after {sent} bytes");
    assert!(
        sent < 100,
        "the handshake deadline did not end it ({sent} bytes sent)"
    );
    assert!(closed);

    // Garbage, an oversized option and a bad request magic: each ends
    // only that connection.
    let mut junk = UnixStream::connect(&v.nbd).unwrap();
    junk.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    assert!(greeted(&mut junk));
    let mut big = FLAG_C_FIXED_NEWSTYLE.to_be_bytes().to_vec();
    big.extend(
        OptionHeader {
            option: OPT_GO,
            len: u32::MAX,
        }
        .encode(),
    );
    let _ = junk.write_all(&big);
    assert!(junk.read_to_end(&mut Vec::new()).is_ok());
    let mut bad = Client::connect_unix(&v.nbd, &export).unwrap();
    let _ = bad.call(0xffff, 0, 0, 0, &[]);
    let mut raw = UnixStream::connect(&v.nbd).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    assert!(greeted(&mut raw));
    let _ = raw.write_all(&[0xa5; 100]);
    assert!(raw.read_to_end(&mut Vec::new()).is_ok());

    // The good connection, opened first, never noticed.
    assert_eq!(good.write(0, &[7; 4096]).unwrap().error, 0);
    assert_eq!(good.read(0, 4096).unwrap().data, vec![7; 4096]);
    let mut again = Client::connect_unix(&v.nbd, &export).unwrap();
    assert_eq!(again.read(0, 4096).unwrap().data, vec![7; 4096]);
}
