//! Drives the real `ember-agent` binary in `--listen-unix` mode (no VM,
//! no KVM) through the library's client.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use ember_agent::client::{call, ClientError};
use ember_agent::protocol::{read_frame, write_frame, write_frame_bytes};
use ember_agent::{
    bind_ready_listener, host_port_socket_path, wait_ready, AgentClient, ExecRequest, Request,
    Response, AGENT_PORT, PROTOCOL_VERSION, READY_PORT,
};

const T: Duration = Duration::from_secs(20);

/// The binary under test: `EMBER_AGENT_BIN` (e.g. the static build that
/// rootfs/build.sh puts into the image) or the one cargo just built.
fn agent_bin() -> PathBuf {
    std::env::var_os("EMBER_AGENT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_ember-agent")))
}

struct AgentProc {
    child: Child,
    dir: tempfile::TempDir,
    sock: PathBuf,
}

impl AgentProc {
    fn start() -> AgentProc {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("agent.sock");
        // The same listener the host uses for the VMM's `<uds>_53`.
        let vsock_uds = dir.path().join("vsock.sock");
        let ready = bind_ready_listener(&vsock_uds).unwrap();
        let child = Command::new(agent_bin())
            .arg("--listen-unix")
            .arg(&sock)
            .arg("--ready-unix")
            .arg(host_port_socket_path(&vsock_uds, READY_PORT))
            .spawn()
            .unwrap();
        let mut agent = AgentProc { child, dir, sock };
        let hello = match wait_ready(&ready, T) {
            Ok(h) => h,
            Err(e) => {
                let _ = agent.child.kill();
                panic!("no hello from the agent: {e}");
            }
        };
        assert_eq!(hello.pid, agent.child.id());
        assert_eq!(hello.protocol_version, PROTOCOL_VERSION);
        agent
    }

    fn client(&self) -> AgentClient {
        AgentClient::from_stream(UnixStream::connect(&self.sock).unwrap(), Some(T)).unwrap()
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn sh(script: &str) -> ExecRequest {
    ExecRequest::new(["/bin/sh", "-c", script])
}

#[test]
fn health_reports_version_pid_and_uptime() {
    let agent = AgentProc::start();
    let mut c = agent.client();
    let h1 = c.health().unwrap();
    assert_eq!(h1.protocol_version, PROTOCOL_VERSION);
    assert_eq!(h1.agent_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(h1.pid, agent.child.id());
    std::thread::sleep(Duration::from_millis(30));
    let h2 = c.health().unwrap();
    assert!(h2.uptime_ms >= h1.uptime_ms + 20, "{h1:?} {h2:?}");
}

#[test]
fn exec_captures_exit_code_stdout_stderr() {
    let agent = AgentProc::start();
    let mut c = agent.client();
    let r = c.exec(&sh("echo hi; echo err >&2; exit 3")).unwrap();
    assert_eq!(r.exit_code, Some(3));
    assert_eq!(r.signal, None);
    assert_eq!(r.stdout, b"hi\n");
    assert_eq!(r.stderr, b"err\n");
    assert!(!r.timed_out);
    assert!(!r.truncated);
}

#[test]
fn exec_feeds_stdin() {
    let agent = AgentProc::start();
    let mut c = agent.client();
    let data: Vec<u8> = b"hello\x00\xff\n".to_vec();
    let r = c
        .exec(&ExecRequest::new(["cat"]).stdin(data.clone()))
        .unwrap();
    assert_eq!(r.exit_code, Some(0));
    assert_eq!(r.stdout, data);

    // Larger than any pipe buffer in both directions at once.
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let r = c
        .exec(&ExecRequest::new(["cat"]).stdin(big.clone()))
        .unwrap();
    assert_eq!(r.exit_code, Some(0));
    assert_eq!(r.stdout.len(), big.len());
    assert!(r.stdout == big, "cat output differs from its input");

    // Without stdin the child reads /dev/null.
    let r = c.exec(&sh("wc -c")).unwrap();
    assert_eq!(String::from_utf8_lossy(&r.stdout).trim(), "0");
}

#[test]
fn exec_timeout_kills_child() {
    let agent = AgentProc::start();
    let mut c = agent.client();
    let t0 = Instant::now();
    let r = c
        .exec(&ExecRequest::new(["sleep", "10"]).timeout(Duration::from_millis(300)))
        .unwrap();
    let took = t0.elapsed();
    assert!(r.timed_out);
    assert_eq!(r.exit_code, None);
    assert_eq!(r.signal, Some(libc::SIGKILL));
    assert!(took >= Duration::from_millis(300), "{took:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");

    // The whole process group dies, so a grandchild holding the pipes
    // does not keep the exec alive.
    let t0 = Instant::now();
    let r = c
        .exec(&sh("sleep 10 & sleep 10; echo never").timeout(Duration::from_millis(300)))
        .unwrap();
    assert!(r.timed_out);
    assert!(r.stdout.is_empty());
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());

    // A fast child is not marked timed out.
    let r = c
        .exec(&sh("exit 0").timeout(Duration::from_secs(10)))
        .unwrap();
    assert!(!r.timed_out);
    assert_eq!(r.exit_code, Some(0));
}

#[test]
fn chatty_child_on_both_streams_does_not_deadlock() {
    let agent = AgentProc::start();
    let mut c = agent.client();
    let r = c
        .exec(
            &sh("i=0; while [ $i -lt 20 ]; do head -c 100000 /dev/zero; head -c 100000 /dev/zero >&2; i=$((i+1)); done")
                .timeout(Duration::from_secs(30)),
        )
        .unwrap();
    assert!(!r.timed_out);
    assert_eq!(r.exit_code, Some(0));
    assert_eq!(r.stdout.len(), 2_000_000);
    assert_eq!(r.stderr.len(), 2_000_000);
}

#[test]
fn exec_env_cwd_and_signal() {
    let agent = AgentProc::start();
    let mut c = agent.client();
    let r = c
        .exec(&sh("echo \"$FOO\"; pwd").env("FOO", "bar baz").cwd("/tmp"))
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&r.stdout), "bar baz\n/tmp\n");
    let r = c.exec(&sh("echo $PATH")).unwrap();
    assert!(
        String::from_utf8_lossy(&r.stdout).contains("/bin"),
        "{:?}",
        r.stdout
    );
    let r = c.exec(&sh("kill -TERM $$")).unwrap();
    assert_eq!(r.exit_code, None);
    assert_eq!(r.signal, Some(libc::SIGTERM));
}

#[test]
fn spawn_failures_are_error_replies_and_connection_survives() {
    let agent = AgentProc::start();
    let mut c = agent.client();
    match c.exec(&ExecRequest::new(["/no/such/program"])) {
        Err(ClientError::Agent(m)) => assert!(m.contains("/no/such/program"), "{m}"),
        r => panic!("expected an agent error, got {r:?}"),
    }
    match c.exec(&ExecRequest::new(["true"]).cwd("/no/such/dir")) {
        Err(ClientError::Agent(m)) => assert!(m.contains("cannot start"), "{m}"),
        r => panic!("expected an agent error, got {r:?}"),
    }
    match c.exec(&ExecRequest::new(Vec::<String>::new())) {
        Err(ClientError::Agent(m)) => assert!(m.contains("argv"), "{m}"),
        r => panic!("expected an agent error, got {r:?}"),
    }
    // Failed spawns must not disturb later ones (the reaper and std's
    // internal wait for a failed exec do not race).
    for _ in 0..5 {
        assert!(c.exec(&ExecRequest::new(["/no/such/program"])).is_err());
        let r = c.exec(&ExecRequest::new(["true"])).unwrap();
        assert_eq!(r.exit_code, Some(0));
    }
    assert_eq!(c.health().unwrap().pid, agent.child.id());
}

#[test]
fn malformed_and_oversized_frames() {
    let agent = AgentProc::start();
    let mut s = UnixStream::connect(&agent.sock).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    write_frame_bytes(&mut s, b"this is not json").unwrap();
    match read_frame::<_, Response>(&mut s).unwrap() {
        Some(Response::Error { message }) => assert!(message.contains("invalid request")),
        r => panic!("expected an error reply, got {r:?}"),
    }
    // Same connection still works.
    assert!(matches!(
        call(&mut s, &Request::Health).unwrap(),
        Response::Health(_)
    ));

    // An oversized frame: error reply, then the agent closes the stream.
    s.write_all(&u32::MAX.to_be_bytes()).unwrap();
    match read_frame::<_, Response>(&mut s).unwrap() {
        Some(Response::Error { message }) => assert!(message.contains("exceeds"), "{message}"),
        r => panic!("expected an error reply, got {r:?}"),
    }
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());

    // The server keeps accepting.
    assert_eq!(agent.client().health().unwrap().pid, agent.child.id());
}

#[test]
fn connections_are_served_concurrently() {
    let agent = AgentProc::start();
    let mut slow = agent.client();
    let t = std::thread::spawn(move || slow.exec(&sh("sleep 2; echo done")).unwrap());
    std::thread::sleep(Duration::from_millis(200));
    let t0 = Instant::now();
    let mut fast = agent.client();
    fast.health().unwrap();
    let r = fast.exec(&sh("echo quick")).unwrap();
    assert_eq!(r.stdout, b"quick\n");
    assert!(
        t0.elapsed() < Duration::from_millis(1500),
        "{:?}",
        t0.elapsed()
    );
    let r = t.join().unwrap();
    assert_eq!(r.stdout, b"done\n");
}

fn proc_stat(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()
}

#[test]
fn orphans_are_reaped() {
    let agent = AgentProc::start();
    let mut c = agent.client();
    // The shell exits at once, leaving `sleep` to be re-parented to the
    // agent (a child subreaper in test mode, PID 1 in the guest).
    let r = c
        .exec(&sh("sleep 1 </dev/null >/dev/null 2>&1 & echo $!"))
        .unwrap();
    assert_eq!(r.exit_code, Some(0));
    let pid: u32 = String::from_utf8_lossy(&r.stdout).trim().parse().unwrap();
    let stat = proc_stat(pid).expect("orphan should still be sleeping");
    // Field 4 (after the parenthesised command) is the parent pid.
    let after = stat.rsplit_once(')').unwrap().1;
    let ppid: u32 = after.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert_eq!(ppid, agent.child.id(), "orphan re-parented to the agent");
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Some(stat) = proc_stat(pid) {
        assert!(
            Instant::now() < deadline,
            "orphan {pid} was never reaped: {stat}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // And exec still works afterwards.
    assert_eq!(c.exec(&sh("exit 7")).unwrap().exit_code, Some(7));
}

#[test]
fn shutdown_is_acked_and_ends_test_mode_agent() {
    let mut agent = AgentProc::start();
    let mut c = agent.client();
    c.shutdown().unwrap();
    let deadline = Instant::now() + T;
    loop {
        if let Some(status) = agent.child.try_wait().unwrap() {
            assert!(status.success(), "{status:?}");
            break;
        }
        assert!(Instant::now() < deadline, "agent did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A tiny stand-in for the VMM's vsock muxer: speaks Firecracker's
/// host-initiated `CONNECT <port>\n` / `OK <hostport>\n` handshake on a
/// unix socket and forwards port 52 to the agent's unix socket.
fn fake_muxer(uds: &Path, agent_sock: PathBuf) -> std::thread::JoinHandle<()> {
    let listener = UnixListener::bind(uds).unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut host) = conn else { return };
            let agent_sock = agent_sock.clone();
            std::thread::spawn(move || {
                let mut line = Vec::new();
                let mut b = [0u8; 1];
                while host.read(&mut b).unwrap_or(0) == 1 && b[0] != b'\n' {
                    line.push(b[0]);
                }
                let line = String::from_utf8_lossy(&line).to_string();
                match line.as_str() {
                    "CONNECT 52" => {
                        host.write_all(b"OK 1073741824\n").unwrap();
                        let guest = UnixStream::connect(&agent_sock).unwrap();
                        let (mut h2, mut g2) =
                            (host.try_clone().unwrap(), guest.try_clone().unwrap());
                        let up = std::thread::spawn(move || {
                            let _ = std::io::copy(&mut h2, &mut g2);
                            let _ = g2.shutdown(std::net::Shutdown::Write);
                        });
                        let (mut g, mut h) = (guest, host);
                        let _ = std::io::copy(&mut g, &mut h);
                        let _ = h.shutdown(std::net::Shutdown::Write);
                        let _ = up.join();
                    }
                    "CONNECT 77" => {
                        host.write_all(b"NOPE\n").unwrap();
                    }
                    // No listener on that guest port: the VMM just closes.
                    _ => {}
                }
            });
        }
    })
}

#[test]
fn connect_handshake_through_fake_vsock_muxer() {
    let agent = AgentProc::start();
    let uds = agent.dir.path().join("v.sock");
    let _mux = fake_muxer(&uds, agent.sock.clone());

    let mut c = AgentClient::connect(&uds, AGENT_PORT, T).unwrap();
    assert_eq!(c.host_port(), Some(1 << 30));
    assert_eq!(c.health().unwrap().pid, agent.child.id());
    let r = c.exec(&sh("echo via-vsock")).unwrap();
    assert_eq!(r.stdout, b"via-vsock\n");

    match AgentClient::connect(&uds, 99, T) {
        Err(ClientError::Handshake(m)) => assert!(m.contains("closed"), "{m}"),
        r => panic!("expected a handshake error, got {r:?}"),
    }
    match AgentClient::connect(&uds, 77, T) {
        Err(ClientError::Handshake(m)) => assert!(m.contains("NOPE"), "{m}"),
        r => panic!("expected a handshake error, got {r:?}"),
    }
    match AgentClient::connect(agent.dir.path().join("missing.sock"), AGENT_PORT, T) {
        Err(ClientError::Io(e)) => assert!(e.to_string().contains("missing.sock"), "{e}"),
        r => panic!("expected an I/O error, got {r:?}"),
    }
    // Retrying gives up with the last error once the time is spent.
    let t0 = Instant::now();
    let r = AgentClient::connect_retry(&uds, 99, Duration::from_millis(300), T);
    assert!(matches!(r, Err(ClientError::Handshake(_))), "{r:?}");
    assert!(t0.elapsed() < Duration::from_secs(5));
    // Raw protocol on the stream after the handshake.
    let mut c = AgentClient::connect(&uds, AGENT_PORT, T).unwrap();
    let resp = c.request(&Request::Health).unwrap();
    assert!(matches!(resp, Response::Health(_)), "{resp:?}");
    let mut s = c.stream().try_clone().unwrap();
    write_frame(&mut s, &Request::Health).unwrap();
    assert!(matches!(
        read_frame::<_, Response>(&mut s).unwrap(),
        Some(Response::Health(_))
    ));
}

#[test]
fn background_process_holding_stdout_does_not_block_exec() {
    let agent = AgentProc::start();
    let mut c = agent.client();
    let t0 = Instant::now();
    // `sleep` inherits stdout and keeps the pipe open after `sh` exits.
    let r = c.exec(&sh("sleep 5 & echo started")).unwrap();
    let took = t0.elapsed();
    assert_eq!(r.exit_code, Some(0));
    assert_eq!(r.stdout, b"started\n");
    assert!(!r.timed_out);
    assert!(
        took >= ember_agent::exec::EXIT_DRAIN_GRACE && took < Duration::from_secs(3),
        "{took:?}"
    );
}
