//! Volumes changed while attached, with two real `ember-volumed` processes
//! and an NBD client writing all the while: a volume moved to the other
//! service has every write acknowledged before the fence, the old server
//! refuses every request after it, and the new attachment works; split and
//! combine give copies checked byte for byte. A move to a service that
//! cannot be reached, or that has the name already, leaves the source
//! attachment as it was.

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use ember_nbd::EPERM;
use ember_tests::volumed::Volumed;
use ember_volumed::nbd::client::Client;

const BLOCK: u64 = 4096;
/// The writer's outcome when the server ended its connection.
const LOST: u32 = u32::MAX;
const SIZE: u64 = 16 << 20;

/// Block `b` as written with sequence number `seq`.
fn pattern(b: u64, seq: u64) -> Vec<u8> {
    let mut v = vec![(seq % 251) as u8 + 1; BLOCK as usize];
    v[0..8].copy_from_slice(&seq.to_le_bytes());
    v[8..16].copy_from_slice(&b.to_le_bytes());
    v
}

/// The sequence number a block holds (0: never written), checking the rest
/// of the block matches it.
fn seq_of(b: u64, data: &[u8]) -> u64 {
    if data.iter().all(|&x| x == 0) {
        return 0;
    }
    let seq = u64::from_le_bytes(data[0..8].try_into().unwrap());
    assert_eq!(data, &pattern(b, seq)[..], "block {b} is torn or foreign");
    seq
}

fn read_image(p: &Path, off: u64, len: u64) -> Vec<u8> {
    let f = std::fs::File::open(p).unwrap();
    let mut v = vec![0u8; len as usize];
    f.read_exact_at(&mut v, off).unwrap();
    v
}

/// Writes pseudo-random blocks of `blocks` until told to stop or refused.
struct Writer {
    stop: Arc<AtomicBool>,
    /// Per block, the last sequence number acknowledged.
    acked: Arc<Mutex<HashMap<u64, u64>>>,
    /// The last sequence number sent.
    sent: Arc<AtomicU64>,
    thread: JoinHandle<(u64, u32)>,
}

impl Writer {
    fn start(mut c: Client, blocks: u64) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(HashMap::new()));
        let sent = Arc::new(AtomicU64::new(0));
        let (st, ack, se) = (stop.clone(), acked.clone(), sent.clone());
        let thread = std::thread::spawn(move || {
            let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
            let mut seq = 1_000_000;
            while !st.load(Ordering::SeqCst) {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let b = (x >> 33) % blocks;
                seq += 1;
                se.store(seq, Ordering::SeqCst);
                match c.write(b * BLOCK, &pattern(b, seq)) {
                    Ok(r) if r.error != 0 => return (seq, r.error),
                    Ok(_) => {}
                    // The server ended the connection.
                    Err(_) => return (seq, LOST),
                }
                ack.lock().unwrap().insert(b, seq);
            }
            (seq, 0)
        });
        Writer {
            stop,
            acked,
            sent,
            thread,
        }
    }

    /// Stops it: (the last sequence number sent, the error that ended it).
    fn finish(self) -> (HashMap<u64, u64>, u64, u32) {
        self.stop.store(true, Ordering::SeqCst);
        let (seq, err) = self.thread.join().unwrap();
        let acked = self.acked.lock().unwrap().clone();
        (acked, seq, err)
    }
}

fn create(v: &Volumed, name: &str, size: u64) {
    let (st, b) = v.call(
        "POST",
        "/v1/volumes",
        Some(&format!(r#"{{"Name":"{name}","SizeBytes":{size}}}"#)),
    );
    assert_eq!(st, 201, "{b}");
}

fn attach(v: &Volumed, name: &str, host: &str) -> serde_json::Value {
    let (st, b) = v.call(
        "POST",
        &format!("/v1/volumes/{name}/attach"),
        Some(&format!(r#"{{"Host":"{host}"}}"#)),
    );
    assert_eq!(st, 200, "{b}");
    b
}

/// Fills every block of `name` with sequence `seq0 + block` through NBD.
fn fill(v: &Volumed, export: &str, blocks: u64, seq0: u64) {
    let mut c = Client::connect_unix(&v.nbd, export).unwrap();
    for b in 0..blocks {
        assert_eq!(c.write(b * BLOCK, &pattern(b, seq0 + b)).unwrap().error, 0);
    }
    assert_eq!(c.flush().unwrap().error, 0);
}

/// The default fence ends the old connections (a client that re-sends on
/// a new connection, as Ember's VMM does, loses nothing).
#[test]
fn a_volume_moves_to_another_service_while_written() {
    move_while_written(None, LOST);
}

/// `"Fence": "Refuse"`: each of the old attachment's requests is answered
/// EPERM instead.
#[test]
fn a_move_can_refuse_the_old_requests_instead() {
    move_while_written(Some("Refuse"), EPERM);
}

fn move_while_written(fence: Option<&str>, fenced_with: u32) {
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, b) = (Volumed::start(d1.path()), Volumed::start(d2.path()));
    let blocks = SIZE / BLOCK;
    create(&a, "mv", SIZE);
    let g = attach(&a, "mv", "host-a");
    assert_eq!(g["Generation"], 1);
    let mv1 = g["ExportName"].as_str().unwrap().to_string();
    fill(&a, &mv1, blocks / 2, 1);
    let target = b.api.display().to_string();
    let body = match fence {
        None => format!(r#"{{"Target":"{target}"}}"#),
        Some(f) => format!(r#"{{"Target":"{target}","Fence":"{f}"}}"#),
    };

    // Bad input and failed moves leave the source as it was.
    assert_eq!(
        a.call("POST", "/v1/volumes/mv/move-to-server", Some("{")).0,
        400
    );
    assert_eq!(
        a.call(
            "POST",
            "/v1/volumes/mv/move-to-server",
            Some(r#"{"Target":""}"#)
        )
        .0,
        400
    );
    let bad_fence = format!(r#"{{"Target":"{target}","Fence":"Sometimes"}}"#);
    assert_eq!(
        a.call("POST", "/v1/volumes/mv/move-to-server", Some(&bad_fence))
            .0,
        400
    );
    assert_eq!(
        a.call("POST", "/v1/volumes/nosuch/move-to-server", Some(&body))
            .0,
        404
    );
    let (st, e) = a.call(
        "POST",
        "/v1/volumes/mv/move-to-server",
        Some(r#"{"Target":"/nonexistent/volumed.sock"}"#),
    );
    assert_eq!(st, 502, "{e}");
    assert!(
        e["Message"].as_str().unwrap().contains("cannot connect"),
        "{e}"
    );
    create(&b, "mv", 4096);
    let (st, e) = a.call("POST", "/v1/volumes/mv/move-to-server", Some(&body));
    assert_eq!(st, 409, "a name taken on the target: {e}");
    assert_eq!(b.call("DELETE", "/v1/volumes/mv", None).0, 204);
    let rec = a.call("GET", "/v1/volumes/mv", None).1;
    assert_eq!(rec["Attachment"]["Generation"], 1, "{rec}");
    assert!(rec.get("MovedTo").is_none(), "{rec}");

    // The move, with the holder writing all the while.
    let w = Writer::start(Client::connect_unix(&a.nbd, &mv1).unwrap(), blocks);
    std::thread::sleep(std::time::Duration::from_millis(200));
    let sent_before = w.sent.load(Ordering::SeqCst);
    let (st, m) = a.call("POST", "/v1/volumes/mv/move-to-server", Some(&body));
    assert_eq!(st, 200, "{m}");
    let (acked, last, err) = w.finish();
    // The writer ran into the fence: its last write was refused.
    assert_eq!(
        err, fenced_with,
        "the old server must refuse writes after the fence"
    );
    eprintln!(
        "moved: {} rounds, {} bytes copied, {} writes sent during the move, {} blocks written",
        m["Rounds"],
        m["BytesCopied"],
        last - sent_before,
        acked.len()
    );
    assert!(m["Rounds"].as_u64().unwrap() >= 1, "{m}");
    let g2 = &m["Attachment"];
    assert_eq!(g2["Host"], "host-a", "{m}");
    assert_eq!(g2["Volume"], "mv");

    // Every acknowledged write is on the target; the refused one is not.
    let img = read_image(&b.image("mv"), 0, SIZE);
    for blk in 0..blocks {
        let at = (blk * BLOCK) as usize;
        let got = seq_of(blk, &img[at..at + BLOCK as usize]);
        let want = acked
            .get(&blk)
            .copied()
            .unwrap_or(if blk < blocks / 2 { 1 + blk } else { 0 });
        assert_eq!(got, want, "block {blk} on the target");
    }

    // The old server refuses the old token, new connections included.
    let e = Client::connect_unix(&a.nbd, &mv1).err().expect("refused");
    assert!(e.to_string().contains("not authorised"), "{e}");
    let rec = a.call("GET", "/v1/volumes/mv", None).1;
    assert_eq!(rec["MovedTo"], target.as_str(), "{rec}");
    assert!(rec.get("Attachment").is_none(), "{rec}");
    let (st, e) = a.call("POST", "/v1/volumes/mv/attach", Some(r#"{"Host":"h"}"#));
    assert_eq!(st, 409, "a moved volume is never attached again: {e}");
    assert_eq!(
        a.call("POST", "/v1/volumes/mv/move-to-server", Some(&body))
            .0,
        409
    );

    // The target's attachment is the one to use (the copier's is stale),
    // and serves reads and writes.
    let export = g2["ExportName"].as_str().unwrap();
    assert!(Client::connect_unix(&b.nbd, &mv1).is_err());
    let mut c = Client::connect_unix(&b.nbd, export).unwrap();
    assert_eq!(c.size, SIZE);
    let r = c.read(0, BLOCK as u32).unwrap();
    assert_eq!(seq_of(0, &r.data), acked.get(&0).copied().unwrap_or(1));
    assert_eq!(c.write(5 * BLOCK, &pattern(5, 42)).unwrap().error, 0);
    assert_eq!(c.flush().unwrap().error, 0);
    assert_eq!(
        seq_of(5, &c.read(5 * BLOCK, BLOCK as u32).unwrap().data),
        42
    );
    let uri = g2["Uri"].as_str().unwrap();
    assert_eq!(uri, format!("nbd://127.0.0.1:{}/{export}", b.port));

    // The stale copy can go.
    assert_eq!(a.call("DELETE", "/v1/volumes/mv", None).0, 204);
}

#[test]
fn a_detached_volume_moves_and_a_failed_target_changes_nothing() {
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, b) = (Volumed::start(d1.path()), Volumed::start(d2.path()));
    create(&a, "d", 1 << 20);
    let d1 = attach(&a, "d", "h")["ExportName"]
        .as_str()
        .unwrap()
        .to_string();
    fill(&a, &d1, 16, 7);
    // A target that is gone (killed) is a 502 and the holder keeps
    // writing: the source was never fenced.
    let mut holder = Client::connect_unix(&a.nbd, &d1).unwrap();
    let target = b.api.display().to_string();
    b.kill();
    let (st, e) = a.call(
        "POST",
        "/v1/volumes/d/move-to-server",
        Some(&format!(r#"{{"Target":"{target}"}}"#)),
    );
    assert_eq!(st, 502, "{e}");
    assert_eq!(holder.write(0, &pattern(0, 99)).unwrap().error, 0);
    assert_eq!(
        a.call("GET", "/v1/volumes/d", None).1["Attachment"]["Generation"],
        1
    );
    // Detached, it moves and stays detached there.
    assert_eq!(a.call("POST", "/v1/volumes/d/detach", None).0, 204);
    let b = Volumed::start(d2.path());
    let (st, m) = a.call(
        "POST",
        "/v1/volumes/d/move-to-server",
        Some(&format!(r#"{{"Target":"{target}"}}"#)),
    );
    assert_eq!(st, 200, "{m}");
    assert!(m["Attachment"].is_null(), "{m}");
    let rec = b.call("GET", "/v1/volumes/d", None).1;
    assert!(rec.get("Attachment").is_none(), "{rec}");
    assert_eq!(
        read_image(&b.image("d"), 0, 1 << 20),
        read_image(&a.image("d"), 0, 1 << 20)
    );
    assert_eq!(seq_of(0, &read_image(&b.image("d"), 0, BLOCK)), 99);
}

#[test]
fn split_and_combine_copy_consistently_while_written() {
    let d = tempfile::tempdir().unwrap();
    let v = Volumed::start(d.path());
    let blocks = SIZE / BLOCK;
    create(&v, "src", SIZE);
    let src = attach(&v, "src", "h")["ExportName"]
        .as_str()
        .unwrap()
        .to_string();
    fill(&v, &src, blocks, 1);

    // Bad input.
    let split = |body: &str| v.call("POST", "/v1/volumes/src/split", Some(body));
    assert_eq!(split(r#"{"NewName":"x","Offset":0,"Length":0}"#).0, 400);
    assert_eq!(
        split(r#"{"NewName":"x","Offset":100,"Length":4096}"#).0,
        400
    );
    let (st, e) = split(&format!(
        r#"{{"NewName":"x","Offset":{},"Length":8192}}"#,
        SIZE - 4096
    ));
    assert_eq!(st, 400, "{e}");
    assert!(e["Message"].as_str().unwrap().contains("not inside"), "{e}");
    assert_eq!(
        split(r#"{"NewName":"../x","Offset":0,"Length":4096}"#).0,
        400
    );
    assert_eq!(
        split(r#"{"NewName":"src","Offset":0,"Length":4096}"#).0,
        409
    );
    assert_eq!(
        v.call(
            "POST",
            "/v1/volumes/nosuch/split",
            Some(r#"{"NewName":"x","Offset":0,"Length":4096}"#)
        )
        .0,
        404
    );

    // A split while the holder writes: each block of the copy holds what
    // was acknowledged before the split began, or something sent later
    // but before it answered; never a torn block, never a later one.
    let (off, len) = (4 << 20, 8 << 20);
    let w = Writer::start(Client::connect_unix(&v.nbd, &src).unwrap(), blocks);
    std::thread::sleep(std::time::Duration::from_millis(200));
    let before = w.acked.lock().unwrap().clone();
    let (st, r) = split(&format!(
        r#"{{"NewName":"part","Offset":{off},"Length":{len}}}"#
    ));
    let sent_by_answer = w.sent.load(Ordering::SeqCst);
    let (_, _, err) = w.finish();
    assert_eq!(st, 201, "{r}");
    assert_eq!(err, 0);
    assert_eq!(r["Volume"]["SizeBytes"], len);
    let part = read_image(&v.image("part"), 0, len);
    for i in 0..len / BLOCK {
        let blk = off / BLOCK + i;
        let got = seq_of(blk, &part[(i * BLOCK) as usize..((i + 1) * BLOCK) as usize]);
        let floor = before.get(&blk).copied().unwrap_or(1 + blk);
        assert!(
            got >= floor && got <= sent_by_answer.max(floor),
            "block {blk}: {got}, want {floor}..={sent_by_answer}"
        );
    }
    assert_eq!(
        split(r#"{"NewName":"part","Offset":0,"Length":4096}"#).0,
        409,
        "the new name is taken now"
    );

    // Quiet now: a split and a combine equal their sources byte for byte.
    let (st, r) = split(&format!(
        r#"{{"NewName":"p2","Offset":{off},"Length":{len}}}"#
    ));
    assert_eq!(st, 201, "{r}");
    assert_eq!(
        read_image(&v.image("p2"), 0, len),
        read_image(&v.image("src"), off, len)
    );
    create(&v, "small", 1 << 20);
    let small = attach(&v, "small", "h")["ExportName"]
        .as_str()
        .unwrap()
        .to_string();
    fill(&v, &small, 100, 5_000_000);
    let combine = |body: &str| v.call("POST", "/v1/volumes/combine", Some(body));
    assert_eq!(combine(r#"{"NewName":"c","Sources":["src"]}"#).0, 400);
    assert_eq!(
        combine(r#"{"NewName":"c","Sources":["src","nosuch"]}"#).0,
        404
    );
    assert_eq!(
        combine(r#"{"NewName":"src","Sources":["src","small"]}"#).0,
        409
    );
    let (st, r) = combine(r#"{"NewName":"c","Sources":["small","src","small"]}"#);
    assert_eq!(st, 201, "{r}");
    assert_eq!(r["Volume"]["SizeBytes"], SIZE + (2 << 20));
    let mut want = read_image(&v.image("small"), 0, 1 << 20);
    want.extend(read_image(&v.image("src"), 0, SIZE));
    want.extend(read_image(&v.image("small"), 0, 1 << 20));
    assert_eq!(read_image(&v.image("c"), 0, SIZE + (2 << 20)), want);
    // The new volumes are ordinary ones: attached and served.
    let g = attach(&v, "c", "h2");
    let mut c = Client::connect_unix(&v.nbd, g["ExportName"].as_str().unwrap()).unwrap();
    let r = c.read(1 << 20, BLOCK as u32).unwrap();
    assert_eq!(r.data, read_image(&v.image("src"), 0, BLOCK));
}
