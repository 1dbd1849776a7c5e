//! The cluster's front door, attacked: 200 concurrent 70 MB POSTs that are
//! unsigned or badly signed (the replica's memory stays bounded, each gets
//! a 4xx), a correctly signed request sent again byte for byte (refused),
//! bodies over an operation's limit (refused before they are read), and
//! `UNSIGNED-PAYLOAD` / streaming payloads (refused). Against a real etcd,
//! with requests signed by unmodified botocore, and a check that ordinary
//! SDK use (identical calls in one second included) still works.
//! Skipped without etcd or boto3.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ember_store::testing::EtcdProcess;
use ember_tests::cluster::{
    bootstrap_zip_b64, boto3, boto3_or_skip, botocore_sign, create_account, ok, python, ClusterApi,
    Key,
};
use serde_json::{json, Value};

/// A 70 MB body: under CreateFunction's limit, so size alone refuses none.
const BIG: u64 = 70_000_000;
const CONCURRENT: usize = 200;
const RSS_LIMIT_KIB: u64 = 256 * 1024;

/// A response's status and error type, and the body bytes the client had
/// sent when it came.
#[derive(Debug, Clone)]
struct Answer {
    status: u16,
    error_type: String,
    body: String,
    sent: u64,
}

/// Reads one response head (and its body, by Content-Length) from `s`.
fn read_response(s: &mut TcpStream) -> Result<(u16, String, String), String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(0) => return Err(format!("closed after {} bytes of head", head.len())),
            Ok(_) => head.push(byte[0]),
            Err(e) => return Err(format!("read: {e}")),
        }
        if head.len() > 64 * 1024 {
            return Err("head too long".into());
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("bad status line: {head}"))?;
    let header = |name: &str| {
        head.lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case(name)
                    .then(|| v.trim().to_string())
            })
            .unwrap_or_default()
    };
    let mut body = vec![0u8; header("content-length").parse().unwrap_or(0)];
    if status != 100 && !body.is_empty() {
        s.read_exact(&mut body).map_err(|e| format!("body: {e}"))?;
    }
    Ok((
        status,
        header("x-amzn-errortype"),
        String::from_utf8_lossy(&body).into_owned(),
    ))
}

/// Sends `head` then a body of `len` zero bytes (chunked when `declared`
/// is false), from another thread, while reading the answer; with
/// `expect`, asks `Expect: 100-continue` and sends the body only on 100.
/// The body stops as soon as the answer is in.
fn flood(addr: &str, head: &str, len: u64, declared: bool, expect: bool) -> Result<Answer, String> {
    let mut s = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(300))).ok();
    let mut h = head.to_string();
    if declared {
        h += &format!("Content-Length: {len}\r\n");
    } else {
        h += "Transfer-Encoding: chunked\r\n";
    }
    if expect {
        h += "Expect: 100-continue\r\n";
    }
    h += "\r\n";
    s.write_all(h.as_bytes())
        .map_err(|e| format!("write head: {e}"))?;
    let done = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let start_body = |s: &TcpStream| {
        let mut w = s.try_clone().expect("clone");
        let (done, sent) = (done.clone(), sent.clone());
        std::thread::spawn(move || {
            let chunk = vec![0u8; 64 * 1024];
            while sent.load(Ordering::Relaxed) < len && !done.load(Ordering::Relaxed) {
                let n = (len - sent.load(Ordering::Relaxed)).min(chunk.len() as u64) as usize;
                let r = if declared {
                    w.write_all(&chunk[..n])
                } else {
                    w.write_all(format!("{n:x}\r\n").as_bytes())
                        .and_then(|_| w.write_all(&chunk[..n]))
                        .and_then(|_| w.write_all(b"\r\n"))
                };
                if r.is_err() {
                    return;
                }
                sent.fetch_add(n as u64, Ordering::Relaxed);
            }
            if !declared && !done.load(Ordering::Relaxed) {
                let _ = w.write_all(b"0\r\n\r\n");
            }
        })
    };
    let writer = if expect { None } else { Some(start_body(&s)) };
    let mut answer = read_response(&mut s);
    let mut writer = writer;
    if let Ok((100, _, _)) = answer {
        writer = Some(start_body(&s));
        answer = read_response(&mut s);
    }
    done.store(true, Ordering::Relaxed);
    let sent_then = sent.load(Ordering::Relaxed);
    let _ = s.shutdown(std::net::Shutdown::Both);
    if let Some(w) = writer {
        let _ = w.join();
    }
    let (status, error_type, body) = answer?;
    Ok(Answer {
        status,
        error_type,
        body,
        sent: sent_then,
    })
}

/// One request with `headers` and `body`, as given.
fn send(addr: &str, method: &str, path: &str, headers: &[(String, String)], body: &[u8]) -> Answer {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(120))).ok();
    let mut h = format!("{method} {path} HTTP/1.1\r\n");
    for (k, v) in headers {
        h += &format!("{k}: {v}\r\n");
    }
    h += &format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(h.as_bytes()).expect("write");
    // The body goes out while the answer is read: a body over its limit is
    // refused from its Content-Length, and the server may close before it
    // has all arrived (then the rest cannot be written: that is fine).
    let mut w = s.try_clone().expect("clone");
    let rest = body.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = w.write_all(&rest);
    });
    let answer = read_response(&mut s);
    let _ = s.shutdown(std::net::Shutdown::Both);
    let _ = writer.join();
    let (status, error_type, body) = answer.expect("answer");
    Answer {
        status,
        error_type,
        body,
        sent: 0,
    }
}

fn head_of(method: &str, path: &str, host: &str, headers: &[(String, String)]) -> String {
    let mut h = format!("{method} {path} HTTP/1.1\r\n");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        h += &format!("Host: {host}\r\n");
    }
    for (k, v) in headers {
        h += &format!("{k}: {v}\r\n");
    }
    h
}

fn vm_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn sha256_hex(b: &[u8]) -> String {
    // The workspace's own SHA-256 (via the signer's dependency) is not
    // exposed; sha256sum is on every test host.
    let mut child = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("sha256sum");
    child.stdin.take().unwrap().write_all(b).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

#[test]
fn the_front_door_holds() {
    if !boto3_or_skip() {
        return;
    }
    let Some(etcd) = EtcdProcess::start_or_skip() else {
        return;
    };
    let store = ["--etcd", etcd.url.as_str()];
    let alpha = create_account(&store, "alpha");
    let token = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(token.path(), "a-test-token-of-some-length").unwrap();
    let api = ClusterApi::start(&store, token.path(), &[]);
    let url = api.url.clone();
    let addr = url.trim_start_matches("http://").to_string();
    let pid = api.pid().unwrap();

    // Ordinary SDK use: a function from a zip, listed.
    let created = ok(boto3(
        &url,
        &alpha,
        "create_function",
        json!({"FunctionName": "f", "Runtime": "provided.al2023", "Handler": "x",
               "Role": "arn:aws:iam::000000000000:role/r", "Code": {"ZipFileB64": bootstrap_zip_b64("v1")}}),
    ));
    assert_eq!(created["FunctionName"], "f");
    let listed = ok(boto3(&url, &alpha, "list_functions", json!({})));
    assert_eq!(listed["Functions"].as_array().unwrap().len(), 1);

    // 1. 200 concurrent 70 MB POSTs, none with a valid signature: half
    // ask 100-continue, half just send.
    let create = "/2015-03-31/functions";
    let wrong = Key {
        secret: "not-the-secret".into(),
        ..alpha.clone()
    };
    let stranger = Key {
        id: "AKIAUNKNOWNUNKNOWN00".into(),
        secret: "whatever".into(),
        ..alpha.clone()
    };
    let claimed = "0".repeat(64);
    let kinds: Vec<(&str, Vec<(String, String)>)> = vec![
        ("unsigned", vec![]),
        ("unsigned", vec![]),
        (
            "unknown key",
            botocore_sign(&url, &stranger, "POST", create, "", &[]),
        ),
        (
            "wrong secret, claimed hash",
            botocore_sign(
                &url,
                &wrong,
                "POST",
                create,
                "",
                &[("X-Amz-Content-SHA256", &claimed)],
            ),
        ),
        (
            "wrong secret",
            botocore_sign(&url, &wrong, "POST", create, "", &[]),
        ),
    ];
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut max = 0;
            while !stop.load(Ordering::Relaxed) {
                max = max.max(vm_kib(pid, "VmRSS:"));
                std::thread::sleep(Duration::from_millis(20));
            }
            max
        })
    };
    let threads: Vec<_> = (0..CONCURRENT)
        .map(|i| {
            let (kind, headers) = kinds[i % kinds.len()].clone();
            let head = head_of("POST", create, &addr, &headers);
            let addr = addr.clone();
            std::thread::spawn(move || (kind, flood(&addr, &head, BIG, true, i % 2 == 0)))
        })
        .collect();
    let results: Vec<(&str, Result<Answer, String>)> =
        threads.into_iter().map(|t| t.join().unwrap()).collect();
    stop.store(true, Ordering::Relaxed);
    let max_rss = sampler.join().unwrap();
    let hwm = vm_kib(pid, "VmHWM:");
    let mut table = std::collections::BTreeMap::<String, usize>::new();
    for (kind, r) in &results {
        let k = match r {
            Ok(a) => format!("{kind}: {} {}", a.status, a.error_type),
            Err(e) => format!("{kind}: no answer ({e})"),
        };
        *table.entry(k).or_default() += 1;
    }
    eprintln!(
        "{CONCURRENT} concurrent {BIG}-byte POSTs: peak VmRSS {max_rss} KiB, VmHWM {hwm} KiB"
    );
    for (k, n) in &table {
        eprintln!("  {n:4} × {k}");
    }
    let answered_4xx = results
        .iter()
        .filter(|(_, r)| r.as_ref().is_ok_and(|a| (400..500).contains(&a.status)))
        .count();
    assert_eq!(answered_4xx, CONCURRENT, "every one gets a 4xx: {table:?}");
    assert!(
        hwm < RSS_LIMIT_KIB,
        "the replica's peak RSS was {hwm} KiB (limit {RSS_LIMIT_KIB})"
    );
    // Refused before the body: an unsigned, unknown-key or claimed-hash
    // request never had its body read (at most what the socket buffers).
    for (kind, r) in &results {
        let a = r.as_ref().unwrap();
        if *kind != "wrong secret" {
            assert_eq!(a.status, 403, "{kind}: {a:?}");
            assert!(a.sent < BIG, "{kind}: the whole body was taken: {a:?}");
        } else {
            assert!([403, 429].contains(&a.status), "{kind}: {a:?}");
        }
    }
    assert!(api.health().is_some(), "the replica still answers");

    // 2. A correctly signed request, sent twice byte for byte.
    let invoke = "/2015-03-31/functions/f/invocations";
    let event = [("X-Amz-Invocation-Type", "Event")];
    let body = r#"{"n": 1}"#;
    let mut signed = botocore_sign(&url, &alpha, "POST", invoke, body, &event);
    signed.push(("Host".into(), addr.clone()));
    let first = send(&addr, "POST", invoke, &signed, body.as_bytes());
    assert_eq!(first.status, 202, "the original is accepted: {first:?}");
    let again = send(&addr, "POST", invoke, &signed, body.as_bytes());
    assert_eq!(again.status, 429, "the replay is refused: {again:?}");
    assert!(again.body.contains("already used"), "{again:?}");
    let mut replays_accepted = 0;
    for _ in 0..20 {
        if send(&addr, "POST", invoke, &signed, body.as_bytes()).status < 300 {
            replays_accepted += 1;
        }
    }
    assert_eq!(replays_accepted, 0);
    // The same headers with another body: the signature does not cover it.
    let swapped = send(&addr, "POST", invoke, &signed, br#"{"n": 2}"#);
    assert_eq!(
        (swapped.status, swapped.error_type.as_str()),
        (403, "InvalidSignatureException"),
        "{swapped:?}"
    );

    // 3. Bodies over the operation's limit: refused at once, unread.
    // A declared 1 GB invoke, of which only the head is sent.
    let huge = 1u64 << 30;
    let invoke_sync = botocore_sign(&url, &alpha, "POST", invoke, "", &[]);
    let a = flood(
        &addr,
        &head_of("POST", invoke, &addr, &invoke_sync),
        huge,
        true,
        true,
    )
    .unwrap();
    assert_eq!(
        (a.status, a.error_type.as_str()),
        (413, "RequestTooLargeException"),
        "{a:?}"
    );
    assert_eq!(a.sent, 0, "refused before any of the body: {a:?}");
    // Chunked (no length): read up to the limit, then refused.
    let a = flood(
        &addr,
        &head_of("POST", invoke, &addr, &invoke_sync),
        huge,
        false,
        false,
    )
    .unwrap();
    assert_eq!(a.status, 413, "{a:?}");
    assert!(
        a.sent < huge / 4,
        "refused at the limit, not the end: {a:?}"
    );
    // An Event payload over 1 MB, signed and sent whole.
    let big_event = format!("[\"{}\"]", "x".repeat(1_100_000));
    let mut h = botocore_sign(&url, &alpha, "POST", invoke, &big_event, &event);
    h.push(("Host".into(), addr.clone()));
    let a = send(&addr, "POST", invoke, &h, big_event.as_bytes());
    assert_eq!(a.status, 413, "{a:?}");
    // A control call with a 1 MB body.
    let conc = "/2017-10-31/functions/f/concurrency";
    let big_json = format!(
        "{{\"ReservedConcurrentExecutions\": 1, \"x\": \"{}\"}}",
        "y".repeat(1 << 20)
    );
    let mut h = botocore_sign(&url, &alpha, "PUT", conc, &big_json, &[]);
    h.push(("Host".into(), addr.clone()));
    let a = send(&addr, "PUT", conc, &h, big_json.as_bytes());
    assert_eq!(
        (a.status, a.error_type.as_str()),
        (413, "RequestEntityTooLargeException"),
        "{a:?}"
    );

    // 4. Unsigned and streaming payloads, correctly signed over them.
    for mode in [
        "UNSIGNED-PAYLOAD",
        "STREAMING-AWS4-HMAC-SHA256-PAYLOAD",
        "STREAMING-UNSIGNED-PAYLOAD-TRAILER",
    ] {
        let mut h = botocore_sign(
            &url,
            &alpha,
            "POST",
            invoke,
            body,
            &[
                ("X-Amz-Invocation-Type", "Event"),
                ("X-Amz-Content-SHA256", mode),
            ],
        );
        h.push(("Host".into(), addr.clone()));
        let a = send(&addr, "POST", invoke, &h, body.as_bytes());
        assert_eq!(
            (a.status, a.error_type.as_str()),
            (403, "InvalidSignatureException"),
            "{mode}: {a:?}"
        );
        assert!(a.body.contains("x-amz-content-sha256"), "{mode}: {a:?}");
        assert!(!a.body.contains(&alpha.secret), "no secret in refusals");
    }
    // A real claimed hash, signed: the signature is checked before the
    // body (and a replay refused then), the body against the hash after.
    let claim = |b: &str| {
        let mut h = botocore_sign(
            &url,
            &alpha,
            "POST",
            invoke,
            b,
            &[
                ("X-Amz-Invocation-Type", "Event"),
                ("X-Amz-Content-SHA256", &sha256_hex(b.as_bytes())),
            ],
        );
        h.push(("Host".into(), addr.clone()));
        h
    };
    let h = claim(r#"{"n": 3}"#);
    let a = send(&addr, "POST", invoke, &h, br#"{"n": 4}"#);
    assert_eq!(
        (a.status, a.error_type.as_str()),
        (403, "InvalidSignatureException"),
        "{a:?}"
    );
    let h = claim(r#"{"n": 5}"#);
    let a = send(&addr, "POST", invoke, &h, br#"{"n": 5}"#);
    assert_eq!(a.status, 202, "{a:?}");
    let a = send(&addr, "POST", invoke, &h, br#"{"n": 5}"#);
    assert_eq!(a.status, 429, "a replay, refused before its body: {a:?}");

    // 5. Unmodified boto3, default retries: identical calls in a tight
    // loop (the same signature within a second) all get through.
    let script = r#"
import json, sys, boto3
spec = json.loads(sys.argv[1])
c = boto3.client("lambda", endpoint_url=spec["url"], region_name="us-east-1",
                 aws_access_key_id=spec["key"], aws_secret_access_key=spec["secret"])
codes = [c.invoke(FunctionName="f", InvocationType="Event", Payload=b"{}")["StatusCode"]
         for _ in range(8)]
names = [len(c.list_functions()["Functions"]) for _ in range(4)]
print(json.dumps({"codes": codes, "lists": names}))
"#;
    let spec = json!({"url": url, "key": alpha.id, "secret": alpha.secret});
    let out = std::process::Command::new(python())
        .args(["-c", script, &spec.to_string()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        v["codes"],
        json!([202, 202, 202, 202, 202, 202, 202, 202]),
        "{v}"
    );
    assert_eq!(v["lists"], json!([1, 1, 1, 1]), "{v}");
}
