//! Writes the seed inputs of `fuzz/corpus/<target>/` (valid inputs, made
//! with the project's own encoders where it has them). Run from `fuzz/`:
//! `cargo run --example gen_corpus` (see README.md). `seeds/vm.snap` is a
//! real snapshot file, taken by emberd of a real guest.

// Linked for the coverage runtime the instrumented build refers to.
extern crate libfuzzer_sys;

use std::fs;
use std::path::Path;

use ember_agent::protocol::{encode_frame, ExecRequest, InvokeRequest, Request, Response};
use ember_fuzz::{encode_guest, DATA_BASE};
use ember_vmm::migration::protocol::{
    encode_page_request, write_json, write_message, write_preamble, Hello, Kind, PagesBuilder,
    PostCopyStart, POSTCOPY_VERSION,
};
use ember_vmm::snapshot::memory::{GuestMemoryState, MemoryRegionState};
use ember_vmm::vmm_config::snapshot::DriveOverride;

fn put(target: &str, name: &str, data: &[u8]) {
    let dir = Path::new("corpus").join(target);
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join(name), data).unwrap();
}

// ---- conntrack ----

const GUEST_MAC: [u8; 6] = [6, 0, 10, 0, 0, 2];
const GW_MAC: [u8; 6] = [6, 0, 10, 0, 0, 1];

/// An Ethernet + IPv4 + TCP frame (checksums left zero).
fn tcp4(from_guest: bool, seq: u32, ack: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
    let (smac, dmac, sip, dip, sport, dport) = if from_guest {
        (
            GUEST_MAC,
            GW_MAC,
            [10, 0, 0, 2],
            [93, 184, 216, 34],
            40000u16,
            80u16,
        )
    } else {
        (
            GW_MAC,
            GUEST_MAC,
            [93, 184, 216, 34],
            [10, 0, 0, 2],
            80,
            40000,
        )
    };
    let mut f = Vec::new();
    f.extend_from_slice(&dmac);
    f.extend_from_slice(&smac);
    f.extend_from_slice(&[0x08, 0x00]);
    let tot = (20 + 20 + payload.len()) as u16;
    f.extend_from_slice(&[
        0x45,
        0,
        (tot >> 8) as u8,
        tot as u8,
        0,
        1,
        0x40,
        0,
        64,
        6,
        0,
        0,
    ]);
    f.extend_from_slice(&sip);
    f.extend_from_slice(&dip);
    f.extend_from_slice(&sport.to_be_bytes());
    f.extend_from_slice(&dport.to_be_bytes());
    f.extend_from_slice(&seq.to_be_bytes());
    f.extend_from_slice(&ack.to_be_bytes());
    f.extend_from_slice(&[0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    f.extend_from_slice(payload);
    f
}

/// The same segment over IPv6.
fn tcp6(from_guest: bool, seq: u32, ack: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
    let v4 = tcp4(from_guest, seq, ack, flags, payload);
    let tcp = &v4[14 + 20..];
    let (g, r) = (
        [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
        [0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
    );
    let (s, d) = if from_guest { (g, r) } else { (r, g) };
    let mut f = v4[..12].to_vec();
    f.extend_from_slice(&[0x86, 0xdd]);
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&(tcp.len() as u16).to_be_bytes());
    f.extend_from_slice(&[6, 64]);
    f.extend_from_slice(&s);
    f.extend_from_slice(&d);
    f.extend_from_slice(tcp);
    f
}

fn records(ops: &[(u8, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (op, frame) in ops {
        out.push(*op);
        out.extend_from_slice(&(frame.len() as u16).to_le_bytes());
        out.extend_from_slice(frame);
    }
    out
}

fn conntrack() {
    const SYN: u8 = 0x02;
    const ACK: u8 = 0x10;
    const FIN: u8 = 0x01;
    const PSH: u8 = 0x08;
    for (name, tcp) in [
        ("v4", tcp4 as fn(bool, u32, u32, u8, &[u8]) -> Vec<u8>),
        ("v6", tcp6),
    ] {
        let conn = vec![
            (0, tcp(true, 1000, 0, SYN, b"")),
            (1, tcp(false, 5000, 1001, SYN | ACK, b"")),
            (0, tcp(true, 1001, 5001, ACK, b"")),
            (
                0,
                tcp(true, 1001, 5001, ACK | PSH, b"GET / HTTP/1.1\r\n\r\n"),
            ),
            (1, tcp(false, 5001, 1019, ACK | PSH, b"HTTP/1.1 200 OK\r\n")),
        ];
        put("conntrack", &format!("{name}-handshake"), &records(&conn));
        let mut paused = conn.clone();
        paused.push((3, vec![]));
        paused.push((1, tcp(false, 5018, 1019, ACK, b"late")));
        paused.push((1, tcp(false, 5018, 1019, 0x04, b"")));
        paused.push((4, vec![]));
        put("conntrack", &format!("{name}-pause"), &records(&paused));
        let mut closed = conn;
        closed.push((0, tcp(true, 1019, 5018, FIN | ACK, b"")));
        closed.push((2, tcp(false, 5018, 1020, FIN | ACK, b"")));
        closed.push((0, tcp(true, 1020, 5019, ACK, b"")));
        put("conntrack", &format!("{name}-close"), &records(&closed));
    }
    // Many connections: eviction.
    let many: Vec<_> = (0..12u16)
        .map(|i| {
            let mut f = tcp4(true, 1, 0, SYN, b"");
            f[34..36].copy_from_slice(&(30000 + i).to_be_bytes());
            (0u8, f)
        })
        .chain([(3, vec![])])
        .collect();
    put("conntrack", "many", &records(&many));
}

// ---- migration ----

fn layout() -> GuestMemoryState {
    GuestMemoryState {
        regions: vec![
            MemoryRegionState {
                base_address: 0,
                size: 64 << 10,
                file_offset: 0,
            },
            MemoryRegionState {
                base_address: 1 << 20,
                size: 64 << 10,
                file_offset: 64 << 10,
            },
        ],
    }
}

/// Framed-mode records: `kind, len: u16 LE, payload`.
fn framed(msgs: &[(Kind, Vec<u8>)]) -> Vec<u8> {
    let mut out = vec![0u8];
    for (kind, payload) in msgs {
        let k = *kind as u8 - 1; // the target's KINDS index
        out.push(k);
        out.extend_from_slice(&(payload.len() as u16).to_le_bytes());
        out.extend_from_slice(payload);
    }
    out
}

fn migration(snap: &[u8]) {
    let hello = serde_json::to_vec(&Hello {
        vmm_version: "0.1.0".into(),
        memory: layout(),
    })
    .unwrap();
    let mut pages = PagesBuilder::default();
    pages.push_data(0x1000, &[0x5a; 4096], 4096);
    pages.push_zero(0x2000, 3);
    pages.push_data((1 << 20) + 0x3000, &[1; 8192], 4096);
    let pages = pages.take();
    let needed = serde_json::to_vec(&PostCopyStart {
        version: POSTCOPY_VERSION,
        needed: vec![vec![0xffff], vec![0xff00]],
    })
    .unwrap();
    let overrides = serde_json::to_vec(&vec![DriveOverride {
        drive_id: "rootfs".into(),
        path_on_host: "/rootfs.ext4".into(),
    }])
    .unwrap();
    let request = encode_page_request(&[0x4000, (1 << 20) + 0x8000]);
    put(
        "migration",
        "precopy",
        &framed(&[
            (Kind::Hello, hello.clone()),
            (Kind::Pages, pages.clone()),
            (Kind::Overrides, overrides.clone()),
            (Kind::State, snap.to_vec()),
            (Kind::Resume, vec![]),
        ]),
    );
    put(
        "migration",
        "postcopy",
        &framed(&[
            (Kind::Hello, hello.clone()),
            (Kind::PostCopy, needed.clone()),
            (Kind::Pages, pages.clone()),
            (Kind::PageRequest, request.clone()),
            (Kind::PageRequest, encode_page_request(&[0xf000])),
            (Kind::PostCopyDone, vec![]),
        ]),
    );
    put(
        "migration",
        "abort",
        &framed(&[
            (Kind::Hello, hello.clone()),
            (Kind::Abort, b"cancelled".to_vec()),
        ]),
    );
    // The raw stream, as the source writes it.
    let mut raw = vec![1u8];
    write_preamble(&mut raw).unwrap();
    write_json(
        &mut raw,
        Kind::Hello,
        &Hello {
            vmm_version: "0.1.0".into(),
            memory: layout(),
        },
    )
    .unwrap();
    write_message(&mut raw, Kind::Pages, &pages).unwrap();
    write_message(&mut raw, Kind::PageRequest, &request).unwrap();
    write_message(&mut raw, Kind::Resume, b"").unwrap();
    put("migration", "raw", &raw);
}

// ---- snapshot ----

fn snapshot(snap: &[u8]) {
    let mut raw = vec![0u8];
    raw.extend_from_slice(snap);
    put("snapshot", "file", &raw);
    let mut payload = vec![1u8];
    payload.extend_from_slice(&snap[28..]);
    put("snapshot", "payload", &payload);
    let mut lay = vec![2u8];
    for r in &layout().regions {
        for v in [r.base_address, r.size, r.file_offset] {
            lay.extend_from_slice(&v.to_le_bytes());
        }
    }
    put("snapshot", "layout", &lay);
}

// ---- agent_frame ----

fn agent_frame() {
    let reqs = vec![
        Request::Health,
        Request::Refresh {
            entropy: vec![7; 32],
            realtime_ns: 1_700_000_000_000_000_000,
        },
        Request::Exec(
            ExecRequest::new(["/bin/sh", "-c", "echo hi"])
                .env("A", "b")
                .stdin(b"input".to_vec())
                .cwd("/tmp"),
        ),
        Request::Invoke(InvokeRequest {
            request_id: "8f3c".into(),
            payload: b"{\"k\":1}".to_vec(),
            deadline_ms: 1_700_000_003_000,
            invoked_function_arn: "arn:aws:lambda:us-east-1:000000000000:function:f".into(),
            trace_id: Some("Root=1-5759e988".into()),
            client_context: None,
            cognito_identity: None,
        }),
    ];
    let mut stream = vec![0u8];
    for r in &reqs {
        stream.extend_from_slice(&encode_frame(r).unwrap());
    }
    put("agent_frame", "requests", &stream);
    let mut resp = vec![1u8];
    resp.extend_from_slice(
        &encode_frame(&Response::Error {
            message: "busy".into(),
        })
        .unwrap(),
    );
    resp.extend_from_slice(&encode_frame(&Response::Ack).unwrap());
    put("agent_frame", "responses", &resp);
    for (i, url) in [
        "/2018-06-01/runtime/invocation/next",
        "/2018-06-01/runtime/invocation/8f3c/response",
        "/2018-06-01/runtime/init/error?x=1",
    ]
    .iter()
    .enumerate()
    {
        let mut b = vec![2u8, (i % 2) as u8];
        b.extend_from_slice(url.as_bytes());
        put("agent_frame", &format!("route{i}"), &b);
    }
}

// ---- virtqueues ----

const D: u64 = DATA_BASE;

fn virtio_block() {
    // header (type, reserved, sector), data, status.
    let hdr = |t: u32, sector: u64| {
        let mut h = vec![0u8; 16];
        h[0..4].copy_from_slice(&t.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        h
    };
    for (name, t, write) in [
        ("read", 0u32, true),
        ("write", 1, false),
        ("flush", 4, true),
        ("id", 8, true),
    ] {
        let mut data = hdr(t, 3);
        data.resize(16 + 1024, 0x5a);
        let chain = vec![(D, 16, false), (D + 16, 1024, write), (D + 0x1000, 1, true)];
        let mut input = vec![0xfcu8]; // all features acked
        input.extend_from_slice(&encode_guest(&[chain], &data));
        put("virtio_block", name, &input);
    }
    let mut data = hdr(13, 0); // WRITE_ZEROES
    data.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0]);
    let chain = vec![(D, 16, false), (D + 16, 16, false), (D + 0x1000, 1, true)];
    let mut input = vec![0xfcu8];
    input.extend_from_slice(&encode_guest(&[chain], &data));
    put("virtio_block", "write_zeroes", &input);
}

fn virtio_net() {
    // An ARP request from the guest for 10.0.0.1, behind a vnet header.
    let mut arp = vec![0u8; 12];
    arp.extend_from_slice(&[0xff; 6]);
    arp.extend_from_slice(&GUEST_MAC);
    arp.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    arp.extend_from_slice(&GUEST_MAC);
    arp.extend_from_slice(&[10, 0, 0, 2, 0, 0, 0, 0, 0, 0, 10, 0, 0, 1]);
    let mut syn = vec![0u8; 12];
    syn.extend_from_slice(&tcp4(true, 1000, 0, 0x02, b""));
    for (name, frame) in [("arp", arp.clone()), ("syn", syn.clone())] {
        let rx = vec![(D + 0x4000, 4096, true)];
        let tx = vec![(D, frame.len() as u32, false)];
        let mut input = vec![0x01u8, 1];
        let mut to_guest = vec![0u8; 12];
        to_guest.extend_from_slice(&tcp4(false, 5000, 1001, 0x12, b""));
        input.extend_from_slice(&(to_guest.len() as u16).to_le_bytes());
        input.extend_from_slice(&to_guest);
        input.extend_from_slice(&encode_guest(&[rx, tx], &frame));
        put("virtio_net", name, &input);
    }
}

fn virtio_vsock() {
    // A guest REQUEST to host port 1234, then data (OP_RW).
    let hdr = |op: u16, len: u32| {
        let mut h = vec![0u8; 44];
        h[0..8].copy_from_slice(&3u64.to_le_bytes()); // src_cid
        h[8..16].copy_from_slice(&2u64.to_le_bytes()); // dst_cid
        h[16..20].copy_from_slice(&5000u32.to_le_bytes());
        h[20..24].copy_from_slice(&1234u32.to_le_bytes());
        h[24..28].copy_from_slice(&len.to_le_bytes());
        h[28..30].copy_from_slice(&1u16.to_le_bytes()); // STREAM
        h[30..32].copy_from_slice(&op.to_le_bytes());
        h[36..40].copy_from_slice(&65536u32.to_le_bytes()); // buf_alloc
        h
    };
    let mut data = hdr(1, 0); // REQUEST
    data.resize(0x100, 0);
    data.extend_from_slice(&hdr(5, 5)); // RW
    data.extend_from_slice(b"hello");
    let rx = vec![(D + 0x4000, 4096, true)];
    let tx = vec![(D, 44, false)];
    let ev = vec![(D + 0x6000, 8, true)];
    put(
        "virtio_vsock",
        "request",
        &encode_guest(&[rx.clone(), tx, ev.clone()], &data),
    );
    let tx_rw = vec![(D + 0x100, 44, false), (D + 0x100 + 44, 5, false)];
    put("virtio_vsock", "rw", &encode_guest(&[rx, tx_rw, ev], &data));
}

/// The `sigv4` target's input: flags, method, path, scope, own key, headers,
/// body (see fuzz_targets/sigv4.rs).
fn sigv4_input(flags: u8, method: &str, target: &str, headers: &[&str], body: &[u8]) -> Vec<u8> {
    let mut out = vec![flags];
    out.extend_from_slice(method.as_bytes());
    out.push(b'\n');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b"\nus-east-1/lambda\nAKIDOWNKEY0001 ownSecret\n");
    for h in headers {
        out.extend_from_slice(h.as_bytes());
        out.push(b'\n');
    }
    out.push(b'\n');
    out.extend_from_slice(body);
    out
}

fn sigv4() {
    let invoke = "/2015-03-31/functions/f/invocations";
    let host = "Host: 127.0.0.1:9000";
    // Signed with the real key (flags 1|2|4), as the SDKs do.
    put(
        "sigv4",
        "invoke",
        &sigv4_input(
            7,
            "POST",
            invoke,
            &[host, "Content-Type: application/json"],
            b"{\"a\":1}",
        ),
    );
    put(
        "sigv4",
        "invoke-claimed-hash",
        &sigv4_input(
            7 | 16,
            "POST",
            &format!("{invoke}?Qualifier=%24LATEST"),
            &[host],
            b"{}",
        ),
    );
    put(
        "sigv4",
        "list",
        &sigv4_input(
            7,
            "GET",
            "/2015-03-31/functions/",
            &[host, "X-A:  a   b "],
            b"",
        ),
    );
    // Tampered after signing; signed with the input's own secret; its key.
    put(
        "sigv4",
        "tampered",
        &sigv4_input(7 | 8, "POST", invoke, &[host], b"{}"),
    );
    put(
        "sigv4",
        "own-secret",
        &sigv4_input(5, "POST", invoke, &[host], b"{}"),
    );
    put(
        "sigv4",
        "own-key",
        &sigv4_input(
            1 | 16,
            "PUT",
            "/2015-03-31/functions/f/code",
            &[host],
            b"zip",
        ),
    );
    // Unsigned, with a hand-made Authorization and a fresh date.
    put(
        "sigv4",
        "hand-made",
        &sigv4_input(
            0,
            "POST",
            invoke,
            &[
                host,
                "X-Amz-Date: {now}",
                "X-Amz-Content-Sha256: 44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a",
                "Authorization: AWS4-HMAC-SHA256 Credential=AKIAFUZZEXAMPLE0001/{today}/us-east-1/lambda/aws4_request, SignedHeaders=host;x-amz-content-sha256;x-amz-date, Signature=5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7",
            ],
            b"{}",
        ),
    );
}

/// NBD request bytes (the `nbd` target's request phase).
fn nbd_request(kind: u16, flags: u16, cookie: u64, offset: u64, length: u32) -> Vec<u8> {
    let req = ember_nbd::Request {
        flags,
        kind,
        cookie,
        offset,
        length,
    };
    req.encode().to_vec()
}

fn nbd() {
    let mut requests = Vec::new();
    requests.extend(nbd_request(1, 1, 1, 4096, 8)); // WRITE, FUA
    requests.extend_from_slice(b"ABCDEFGH");
    requests.extend(nbd_request(0, 0, 2, 4096, 8)); // READ
    requests.extend(nbd_request(3, 0, 3, 0, 0)); // FLUSH
    requests.extend(nbd_request(4, 0, 4, 0, 65536)); // TRIM
    requests.extend(nbd_request(6, 2, 5, 8192, 4096)); // WRITE_ZEROES, NO_HOLE
    requests.extend(nbd_request(0, 0, 6, u64::MAX - 4, 16)); // READ past the end
    requests.extend(nbd_request(2, 0, 7, 0, 0)); // DISC
                                                 // Handshake written by the target (mode bit 1): GO with the right
                                                 // credential, then requests; the same through EXPORT_NAME; a stale one.
    for (mode, name) in [
        (2u8, "go"),
        (2 | 16, "export-name"),
        (2 | 8, "stale"),
        (2 | 32, "go-moved"),
        (2 | 64, "go-big"),
        (3, "file"),
    ] {
        let mut d = vec![mode];
        d.extend_from_slice(&requests);
        put("nbd", name, &d);
    }
    // The whole client side from the input: flags, LIST, INFO, GO for a
    // name without a credential, ABORT.
    let opt = |out: &mut Vec<u8>, o: u32, data: &[u8]| {
        out.extend(ember_nbd::encode_option(o, data).expect("a short option"));
    };
    let go = |name: &str| {
        let go = ember_nbd::GoRequest {
            export: name.to_string(),
            info_requests: vec![ember_nbd::INFO_BLOCK_SIZE],
        };
        go.encode().expect("a short name")
    };
    for (mode, file) in [(0u8, "raw-volumes"), (1, "raw-file")] {
        let mut d = vec![mode];
        d.extend_from_slice(&3u32.to_be_bytes());
        opt(&mut d, 3, b"");
        opt(&mut d, 6, &go("vol@0000"));
        opt(&mut d, 7, &go(if mode == 1 { "disk" } else { "vol" }));
        d.extend(nbd_request(0, 0, 1, 0, 512));
        opt(&mut d, 2, b"");
        put("nbd", file, &d);
    }
}

/// `nbd_wire`: a server's handshake with structured replies and GO, a
/// structured read (data, hole, error, done), and a client's options and
/// requests.
fn nbd_wire() {
    use ember_nbd::*;
    let reply = |out: &mut Vec<u8>, option: u32, typ: u32, data: &[u8]| {
        write_option_reply(out, option, typ, data).expect("into a Vec");
    };
    let mut d = vec![0u8];
    d.extend(
        ServerGreeting {
            flags: FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES,
        }
        .encode(),
    );
    reply(&mut d, OPT_STRUCTURED_REPLY, REP_ACK, &[]);
    let info = InfoExport {
        size: 1 << 20,
        flags: TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH,
    };
    reply(&mut d, OPT_GO, REP_INFO, &info.encode());
    reply(&mut d, OPT_GO, REP_ACK, &[]);
    put("nbd_wire", "handshake", &d);

    let chunk = |out: &mut Vec<u8>, flags: u16, typ: u16, payload: &[u8]| {
        let h = ChunkHeader {
            flags,
            typ,
            cookie: 1,
            len: payload.len() as u32,
        };
        out.extend(h.encode());
        out.extend_from_slice(payload);
    };
    let mut d = vec![1u8];
    d.extend(16u16.to_be_bytes());
    d.extend(512u16.to_be_bytes());
    let mut data = 512u64.to_be_bytes().to_vec();
    data.extend_from_slice(b"8 bytes!");
    chunk(&mut d, 0, REPLY_TYPE_OFFSET_DATA, &data);
    let hole = OffsetHole {
        offset: 520,
        length: 8,
    };
    chunk(&mut d, 0, REPLY_TYPE_OFFSET_HOLE, &hole.encode());
    let err = ErrorChunk {
        errno: EIO,
        message: "seed".into(),
    };
    chunk(&mut d, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, &err.encode());
    put("nbd_wire", "structured-read", &d);
    let mut d = vec![1u8, 0, 4, 0, 0];
    d.extend(
        SimpleReply {
            errno: 0,
            cookie: 1,
        }
        .encode(),
    );
    d.extend_from_slice(b"abcd");
    put("nbd_wire", "simple-read", &d);

    let mut d = vec![2u8];
    let go = GoRequest {
        export: "vol@credential".into(),
        info_requests: vec![INFO_BLOCK_SIZE],
    };
    d.extend(encode_option(OPT_GO, &go.encode().expect("a short name")).expect("short"));
    d.extend(encode_option(OPT_LIST, &[]).expect("short"));
    put("nbd_wire", "options", &d);
    let mut d = vec![2u8];
    d.extend(Request::new(Command::Write, CMD_FLAG_FUA, 1, 4096, 0).encode());
    d.extend(Request::new(Command::Read, 0, 2, 0, 512).encode());
    put("nbd_wire", "requests", &d);
}

fn main() {
    if std::env::args().nth(1).as_deref() == Some("--new") {
        // Only the targets added last (the others' seeds are committed).
        nbd_wire();
        return;
    }
    let snap = fs::read("seeds/vm.snap").expect("run from fuzz/: seeds/vm.snap");
    conntrack();
    migration(&snap);
    snapshot(&snap);
    agent_frame();
    virtio_block();
    virtio_net();
    virtio_vsock();
    sigv4();
    nbd();
    nbd_wire();
}
