//! The Runtime API over real TCP, with the test playing the runtime.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::thread::JoinHandle;

use super::*;
use crate::protocol::{InvokeResult, InvokeStatus};

/// A host whose runtime is "ready" without a process: the test is it.
fn host() -> (Arc<RuntimeHost>, SocketAddr) {
    let host = Arc::new(RuntimeHost::new(RuntimeConfig {
        api_addr: "127.0.0.1:0".parse().unwrap(),
        mount_code: false,
    }));
    host.shared.lock().machine.start().unwrap();
    host.shared.lock().machine.spawned(Instant::now());
    let addr = http::serve(host.config.api_addr, host.shared.clone()).unwrap();
    (host, addr)
}

/// Sends `GET /next` and, on the first one, waits until it ended init.
fn get_next(host: &RuntimeHost, c: &mut Conn) {
    c.send("GET", NEXT, "", b"");
    while host.phase() == Phase::Init {
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn ev(id: &str, payload: &[u8]) -> InvokeRequest {
    InvokeRequest {
        request_id: id.into(),
        payload: payload.to_vec(),
        deadline_ms: 1234,
        invoked_function_arn: "arn:f".into(),
        trace_id: Some("Root=1".into()),
        client_context: None,
        cognito_identity: Some("{}".into()),
    }
}

fn invoke_async(host: &Arc<RuntimeHost>, e: InvokeRequest) -> JoinHandle<InvokeResult> {
    let host = host.clone();
    std::thread::spawn(move || match host.invoke(e) {
        Response::Invoked(r) => r,
        other => panic!("{other:?}"),
    })
}

struct Conn {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

impl Conn {
    fn new(addr: SocketAddr) -> Conn {
        let w = TcpStream::connect(addr).unwrap();
        w.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        Conn {
            r: BufReader::new(w.try_clone().unwrap()),
            w,
        }
    }

    fn send(&mut self, method: &str, path: &str, headers: &str, body: &[u8]) {
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n{headers}\r\n",
            body.len()
        );
        self.w.write_all(head.as_bytes()).unwrap();
        self.w.write_all(body).unwrap();
    }

    fn read(&mut self) -> Resp {
        let mut line = String::new();
        self.r.read_line(&mut line).unwrap();
        let status: u16 = line.split(' ').nth(1).unwrap().parse().unwrap();
        let mut headers = Vec::new();
        loop {
            let mut l = String::new();
            self.r.read_line(&mut l).unwrap();
            let l = l.trim_end();
            if l.is_empty() {
                break;
            }
            let (k, v) = l.split_once(':').unwrap();
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
        let len: usize = headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
            .map_or(0, |(_, v)| v.parse().unwrap());
        let mut body = vec![0; len];
        self.r.read_exact(&mut body).unwrap();
        Resp {
            status,
            headers,
            body,
        }
    }

    fn call(&mut self, method: &str, path: &str, headers: &str, body: &[u8]) -> Resp {
        self.send(method, path, headers, body);
        self.read()
    }
}

const NEXT: &str = "/2018-06-01/runtime/invocation/next";

fn post_path(id: &str, what: &str) -> String {
    format!("/2018-06-01/runtime/invocation/{id}/{what}")
}

#[test]
fn keep_alive_connection_serves_many_invocations() {
    let (host, addr) = host();
    let mut c = Conn::new(addr);
    for i in 0..3 {
        let id = format!("id-{i}");
        let payload = format!("{{\"n\":{i}}}");
        get_next(&host, &mut c);
        let t = invoke_async(&host, ev(&id, payload.as_bytes()));
        let r = c.read();
        assert_eq!(r.status, 200);
        assert_eq!(r.body, payload.as_bytes());
        assert_eq!(r.header("Lambda-Runtime-Aws-Request-Id"), Some(id.as_str()));
        assert_eq!(r.header("Lambda-Runtime-Deadline-Ms"), Some("1234"));
        assert_eq!(
            r.header("Lambda-Runtime-Invoked-Function-Arn"),
            Some("arn:f")
        );
        assert_eq!(r.header("Lambda-Runtime-Trace-Id"), Some("Root=1"));
        assert_eq!(r.header("Lambda-Runtime-Cognito-Identity"), Some("{}"));
        assert_eq!(r.header("Lambda-Runtime-Client-Context"), None);
        // A body over 1 KiB with Expect: 100-continue, as libcurl sends.
        let body = vec![b'r'; 4000];
        let head = format!(
            "POST {} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
            post_path(&id, "response"),
            body.len()
        );
        c.w.write_all(head.as_bytes()).unwrap();
        let cont = c.read();
        assert_eq!(cont.status, 100);
        c.w.write_all(&body).unwrap();
        let r = c.read();
        assert_eq!((r.status, r.json()["status"].as_str()), (202, Some("OK")));
        let out = t.join().unwrap();
        assert_eq!(out.status, InvokeStatus::Success);
        assert!(out.payload == body, "payload differs");
    }
}

#[test]
fn next_after_the_event_was_queued_gets_it_at_once() {
    let (host, addr) = host();
    let mut c = Conn::new(addr);
    // The first GET ends init; the event then waits for the second.
    let r0 = std::thread::spawn(move || {
        let r = c.call("GET", NEXT, "", b"");
        (c, r)
    });
    while host.phase() != Phase::Ready {
        std::thread::sleep(Duration::from_millis(5));
    }
    let t = invoke_async(&host, ev("a", b"1"));
    let (mut c, r) = r0.join().unwrap();
    assert_eq!(r.body, b"1");
    let r = c.call(
        "POST",
        &post_path("a", "error"),
        "Lambda-Runtime-Function-Error-Type: Oops\r\n",
        br#"{"errorMessage":"m","errorType":"Other"}"#,
    );
    assert_eq!(r.status, 202);
    let out = t.join().unwrap();
    assert_eq!(out.status, InvokeStatus::FunctionError);
    assert_eq!(out.error_type.as_deref(), Some("Oops"));
}

#[test]
fn bad_requests_get_lambda_style_errors_and_the_server_goes_on() {
    let (host, addr) = host();
    let mut c = Conn::new(addr);
    let r = c.call("GET", "/nope", "", b"");
    assert_eq!(r.status, 404);
    assert!(r.json()["errorMessage"].is_string());
    let r = c.call("POST", NEXT, "", b"x");
    assert_eq!(r.status, 405);
    let r = c.call("POST", &post_path("nobody", "response"), "", b"x");
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["errorType"], "InvalidRequestID");
    // Garbage is refused by tiny_http; a new connection still works.
    let mut g = TcpStream::connect(addr).unwrap();
    g.write_all(b"\x00\x01garbage\r\n\r\n").unwrap();
    let mut sink = Vec::new();
    g.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = g.read_to_end(&mut sink);
    let r = c.call("GET", "/2018-06-01/runtime/other", "", b"");
    assert_eq!(r.status, 404);

    // The whole cycle still works on the first connection.
    get_next(&host, &mut c);
    let t = invoke_async(&host, ev("z", b"p"));
    assert_eq!(c.read().status, 200);
    assert_eq!(
        c.call("POST", &post_path("z", "response"), "", b"ok")
            .status,
        202
    );
    assert_eq!(t.join().unwrap().payload, b"ok");
    // init/error after init is a state error.
    assert_eq!(
        c.call("POST", "/2018-06-01/runtime/init/error", "", b"{}")
            .status,
        403
    );
}

#[test]
fn oversized_response_is_413_and_a_function_error() {
    let (host, addr) = host();
    let mut c = Conn::new(addr);
    get_next(&host, &mut c);
    let t = invoke_async(&host, ev("big", b"p"));
    assert_eq!(c.read().status, 200);
    let body = vec![b'x'; http::MAX_BODY + 1];
    let r = c.call("POST", &post_path("big", "response"), "", &body);
    assert_eq!(r.status, 413);
    assert_eq!(r.json()["errorType"], "RequestEntityTooLarge");
    let out = t.join().unwrap();
    assert_eq!(out.status, InvokeStatus::FunctionError);
    assert_eq!(
        out.error_type.as_deref(),
        Some("Function.ResponseSizeTooLarge")
    );
    // The connection is still in step.
    let t = invoke_async(&host, ev("after", b"q"));
    assert_eq!(c.call("GET", NEXT, "", b"").body, b"q");
    assert_eq!(
        c.call("POST", &post_path("after", "response"), "", b"")
            .status,
        202
    );
    assert_eq!(t.join().unwrap().status, InvokeStatus::Success);
}

#[test]
fn init_error_post_fails_init() {
    let (host, addr) = host();
    let h = host.clone();
    let waiter = std::thread::spawn(move || {
        h.wait_init(
            &RuntimeSpec {
                argv: vec!["x".into()],
                env: Default::default(),
                code_device: None,
                task_root: "/".into(),
                uid: None,
                gid: None,
                init_timeout_ms: None,
                network: None,
            },
            Instant::now(),
        )
    });
    let mut c = Conn::new(addr);
    let r = c.call(
        "POST",
        "/2018-06-01/runtime/init/error",
        "",
        br#"{"errorMessage":"no module","errorType":"Runtime.ImportModuleError"}"#,
    );
    assert_eq!(r.status, 202);
    match waiter.join().unwrap() {
        Response::InitError(f) => assert_eq!(f.error_type, "Runtime.ImportModuleError"),
        other => panic!("{other:?}"),
    }
    assert_eq!(c.call("GET", NEXT, "", b"").status, 403);
}

#[test]
fn invoke_refuses_header_breaking_fields() {
    let (host, _) = host();
    let mut e = ev("a", b"");
    e.trace_id = Some("x\r\nInjected: 1".into());
    assert!(matches!(host.invoke(e), Response::Error { .. }));
}

const RESTORE_NEXT: &str = "/2018-06-01/runtime/restore/next";
const RESTORE_ERROR: &str = "/2018-06-01/runtime/restore/error";

/// Sends `GET /restore/next` and waits until it ended init.
fn restore_next(host: &RuntimeHost, c: &mut Conn) {
    c.send("GET", RESTORE_NEXT, "", b"");
    while host.phase() == Phase::Init {
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(host.shared.lock().machine.restore_parked());
}

/// Whether the connection has a response to read within `wait`.
fn has_answer(c: &mut Conn, wait: Duration) -> bool {
    c.w.set_read_timeout(Some(wait)).unwrap();
    let ready = match c.r.fill_buf() {
        Ok(b) => !b.is_empty(),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => false,
        Err(e) => panic!("{e}"),
    };
    c.w.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    ready
}

#[test]
fn restore_next_is_answered_by_the_restore_then_events_flow() {
    let (host, addr) = host();
    let mut c = Conn::new(addr);
    restore_next(&host, &mut c);
    let ready = host.shared.lock().machine.take_init().unwrap();
    assert!(ready.is_ok());
    assert!(!has_answer(&mut c, Duration::from_millis(200)));
    // A second connection asking for init/error now: too late.
    let mut c2 = Conn::new(addr);
    assert_eq!(
        c2.call("POST", "/2018-06-01/runtime/init/error", "", b"{}")
            .status,
        403
    );
    // Before the restore: no restore/error either.
    assert_eq!(c2.call("POST", RESTORE_ERROR, "", b"{}").status, 403);

    host.restored();
    let r = c.read();
    assert_eq!(r.status, 200);
    assert!(r.body.is_empty());
    // Only once.
    host.restored();
    // The Invoke waits while after-restore hooks run, then flows.
    let t = invoke_async(&host, ev("a", b"1"));
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(c.call("GET", NEXT, "", b"").body, b"1");
    assert_eq!(
        c.call("POST", &post_path("a", "response"), "", b"r").status,
        202
    );
    assert_eq!(t.join().unwrap().payload, b"r");
    // The handshake is over.
    assert_eq!(c.call("GET", RESTORE_NEXT, "", b"").status, 403);
}

#[test]
fn invoke_without_refresh_releases_restore_next() {
    let (host, addr) = host();
    let mut c = Conn::new(addr);
    restore_next(&host, &mut c);
    let t = invoke_async(&host, ev("a", b"1"));
    let r = c.read();
    assert_eq!((r.status, r.body.len()), (200, 0));
    assert_eq!(c.call("GET", NEXT, "", b"").body, b"1");
    c.call("POST", &post_path("a", "response"), "", b"done");
    assert_eq!(t.join().unwrap().status, InvokeStatus::Success);
}

#[test]
fn restore_error_post_fails_invokes() {
    let (host, addr) = host();
    let mut c = Conn::new(addr);
    restore_next(&host, &mut c);
    host.restored();
    assert_eq!(c.read().status, 200);
    // An Invoke arrives while the hooks run ...
    let t = invoke_async(&host, ev("a", b"1"));
    std::thread::sleep(Duration::from_millis(50));
    // ... and the hooks fail.
    let body = br#"{"errorMessage":"hook","errorType":"RuntimeError","stackTrace":[]}"#;
    let r = c.call(
        "POST",
        RESTORE_ERROR,
        "Lambda-Runtime-Function-Error-Type: Runtime.AfterRestoreError\r\n",
        body,
    );
    assert_eq!((r.status, r.json()["status"].as_str()), (202, Some("OK")));
    let out = t.join().unwrap();
    assert_eq!(out.status, InvokeStatus::RuntimeExited);
    assert_eq!(out.error_type.as_deref(), Some("Runtime.AfterRestoreError"));
    assert_eq!(out.payload, body);
    // Later Invokes too; the runtime gets no events.
    assert_eq!(c.call("GET", NEXT, "", b"").status, 403);
    match host.invoke(ev("b", b"2")) {
        Response::Invoked(out) => {
            assert_eq!(out.status, InvokeStatus::RuntimeExited);
            assert_eq!(out.payload, body);
        }
        other => panic!("{other:?}"),
    }
}
