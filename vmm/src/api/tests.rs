//! End-to-end tests: `run_api_server` on a real unix socket, a fake VMM
//! thread on the channel, and raw HTTP/1.1 written by hand so the exact
//! framing (keep-alive, chunked, 100-continue) is what gets tested.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::rpc_interface::{InstanceInfo, VmmAction, VmmActionError, VmmData, VmmResponse};
use crate::vmm_config::MachineConfig;

const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// A directory under the system temp dir, removed on drop.
pub(crate) struct TempDir(PathBuf);

impl TempDir {
    pub(crate) fn new(tag: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("ember-api-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Answers like a VMM would; returns every action it saw.
fn fake_vmm(rx: Receiver<VmmAction>, tx: Sender<VmmResponse>, evt: EventFd) -> Vec<VmmAction> {
    let mut seen = Vec::new();
    while let Ok(action) = rx.recv() {
        // The server must kick the eventfd for each action (blocks until it does).
        evt.read().unwrap();
        let resp = match &action {
            VmmAction::GetInstanceInfo => Ok(VmmData::InstanceInfo(InstanceInfo {
                id: "anonymous-instance".into(),
                state: "Not started".into(),
                vmm_version: "0.1.0".into(),
                app_name: "ember".into(),
            })),
            VmmAction::GetMachineConfig => Ok(VmmData::MachineConfig(MachineConfig::default())),
            VmmAction::PutDrive(d) if d.path_on_host.is_empty() => Err(
                VmmActionError::InvalidInput("path_on_host must not be empty".into()),
            ),
            _ => Ok(VmmData::Empty),
        };
        seen.push(action);
        if tx.send(resp).is_err() {
            break;
        }
    }
    seen
}

struct Server {
    _dir: TempDir,
    path: PathBuf,
    shutdown: ShutdownHandle,
    done: Receiver<Result<(), ApiError>>,
    _server: JoinHandle<()>,
    vmm: Option<JoinHandle<Vec<VmmAction>>>,
}

impl Server {
    /// `with_vmm: false` starts the server with the VMM side already gone.
    fn start(with_vmm: bool) -> Self {
        let dir = TempDir::new("srv");
        let path = dir.path().join("api.sock");
        let listener = bind_api_socket(&path).unwrap();
        let (to_vmm, actions) = channel();
        let (responses, from_vmm) = channel();
        let vmm_evt = EventFd::new(0).unwrap();
        let vmm = if with_vmm {
            let evt = vmm_evt.try_clone().unwrap();
            Some(thread::spawn(move || fake_vmm(actions, responses, evt)))
        } else {
            drop((actions, responses));
            None
        };
        let shutdown = ShutdownHandle::new().unwrap();
        let chan = ApiChannel {
            to_vmm,
            vmm_evt,
            from_vmm,
        };
        let (done_tx, done) = channel();
        let stop = shutdown.clone();
        let server = thread::spawn(move || {
            let _ = done_tx.send(run_api_server(listener, chan, stop));
        });
        Server {
            _dir: dir,
            path,
            shutdown,
            done,
            _server: server,
            vmm,
        }
    }

    fn connect(&self) -> Client {
        let stream = UnixStream::connect(&self.path).unwrap();
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        Client(BufReader::new(stream))
    }

    /// Shuts down and returns the actions the fake VMM received.
    fn stop(mut self) -> Vec<VmmAction> {
        self.shutdown.trigger();
        let res = self
            .done
            .recv_timeout(IO_TIMEOUT)
            .expect("server did not stop");
        res.unwrap();
        // The server dropped its channel ends, so the fake VMM ends too.
        self.vmm
            .take()
            .map(|h| h.join().unwrap())
            .unwrap_or_default()
    }
}

#[derive(Debug)]
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn fault(&self) -> String {
        let v: serde_json::Value = serde_json::from_str(&self.body).unwrap();
        v["fault_message"].as_str().unwrap().to_string()
    }
}

struct Client(BufReader<UnixStream>);

impl Client {
    fn send_raw(&mut self, raw: &[u8]) {
        self.0.get_mut().write_all(raw).unwrap();
    }

    fn request(&mut self, method: &str, path: &str, body: Option<&str>) -> Resp {
        let mut raw = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\n");
        if let Some(b) = body {
            raw += &format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
                b.len()
            );
        } else {
            raw += "\r\n";
        }
        self.send_raw(raw.as_bytes());
        self.read_response()
    }

    fn read_line(&mut self) -> String {
        let mut line = String::new();
        self.0.read_line(&mut line).unwrap();
        line.trim_end().to_string()
    }

    /// Reads one response; bodies are `Content-Length` framed (hyper knows
    /// the length of every body we send).
    fn read_response(&mut self) -> Resp {
        let status_line = self.read_line();
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
        let mut headers = Vec::new();
        loop {
            let line = self.read_line();
            if line.is_empty() {
                break;
            }
            let (n, v) = line.split_once(':').unwrap();
            headers.push((n.trim().to_string(), v.trim().to_string()));
        }
        let mut resp = Resp {
            status,
            headers,
            body: String::new(),
        };
        let len: usize = resp
            .header("content-length")
            .map_or(0, |v| v.parse().unwrap());
        let mut body = vec![0; len];
        self.0.read_exact(&mut body).unwrap();
        resp.body = String::from_utf8(body).unwrap();
        resp
    }

    /// True once the server has closed the connection.
    fn at_eof(&mut self) -> bool {
        let mut buf = [0u8; 1];
        matches!(self.0.read(&mut buf), Ok(0))
    }
}

#[test]
fn keep_alive_serves_many_requests_on_one_connection() {
    let server = Server::start(true);
    let mut c = server.connect();

    let r = c.request("GET", "/", None);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let info: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(info["state"], "Not started");

    let r = c.request(
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 2, "mem_size_mib": 256}"#),
    );
    assert_eq!((r.status, r.body.as_str()), (204, ""));

    let r = c.request("GET", "/machine-config", None);
    assert_eq!(r.status, 200);
    let cfg: MachineConfig = serde_json::from_str(&r.body).unwrap();
    assert_eq!(cfg, MachineConfig::default());

    // Errors do not close the connection either.
    let r = c.request(
        "PUT",
        "/boot-source",
        Some(r#"{"kernel_image_path": "/k", "foo": 1}"#),
    );
    assert_eq!(r.status, 400);
    assert!(r.fault().contains("unknown field `foo`"), "{}", r.body);
    let r = c.request(
        "PUT",
        "/actions",
        Some(r#"{"action_type": "InstanceStart"}"#),
    );
    assert_eq!(r.status, 204);

    let seen = server.stop();
    assert_eq!(seen.len(), 4, "{seen:?}");
    assert_eq!(seen[3], VmmAction::InstanceStart);
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let server = Server::start(true);
    let mut c = server.connect();
    c.send_raw(b"GET /machine-config HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(c.read_response().body.contains("mem_size_mib"));
    assert!(c.read_response().body.contains("vmm_version"));
    server.stop();
}

#[test]
fn chunked_body_is_accepted() {
    let server = Server::start(true);
    let mut c = server.connect();
    let body = r#"{"drive_id": "rootfs", "path_on_host": "/r.ext4", "is_root_device": true}"#;
    let (a, b) = body.split_at(20);
    let raw = format!(
        "PUT /drives/rootfs HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
         {:x}\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\n\r\n",
        a.len(),
        b.len()
    );
    c.send_raw(raw.as_bytes());
    assert_eq!(c.read_response().status, 204);
    // Still usable after a chunked request.
    assert_eq!(c.request("GET", "/", None).status, 200);

    let seen = server.stop();
    let VmmAction::PutDrive(d) = &seen[0] else {
        panic!("unexpected {seen:?}");
    };
    assert_eq!(
        (d.drive_id.as_str(), d.path_on_host.as_str()),
        ("rootfs", "/r.ext4")
    );
}

#[test]
fn expect_continue_is_honoured() {
    let server = Server::start(true);
    let mut c = server.connect();
    let body = r#"{"action_type": "FlushMetrics"}"#;
    c.send_raw(
        format!(
            "PUT /actions HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    );
    assert_eq!(c.read_response().status, 100);
    c.send_raw(body.as_bytes());
    assert_eq!(c.read_response().status, 204);
    assert_eq!(server.stop(), vec![VmmAction::FlushMetrics]);
}

#[test]
fn malformed_http_then_good_request_on_new_connection() {
    let server = Server::start(true);
    let mut bad = server.connect();
    bad.send_raw(b"THIS IS NOT HTTP\r\n\r\n");
    assert_eq!(bad.read_response().status, 400);
    assert!(bad.at_eof());

    let mut good = server.connect();
    assert_eq!(good.request("GET", "/", None).status, 200);
    server.stop();
}

#[test]
fn api_errors_carry_fault_messages() {
    let server = Server::start(true);
    let mut c = server.connect();

    let r = c.request("GET", "/nope", None);
    assert_eq!(r.status, 400);
    assert_eq!(r.fault(), "Invalid request method and/or path: GET /nope.");

    let r = c.request("POST", "/actions", Some("{}"));
    assert_eq!(r.status, 400);
    assert!(r.fault().starts_with("Invalid request method and/or path"));

    let r = c.request("PUT", "/vsock", None);
    assert_eq!((r.status, r.fault().as_str()), (400, "Empty PUT request."));

    let r = c.request("PUT", "/vsock", Some("{"));
    assert_eq!(r.status, 400);
    assert!(r.fault().contains("EOF while parsing"), "{}", r.body);

    let body = r#"{"drive_id": "a", "is_root_device": false}"#;
    let r = c.request("PUT", "/drives/b", Some(body));
    assert_eq!(r.status, 400);
    assert!(r.fault().contains("does not match"), "{}", r.body);

    // Refused by the (fake) VMM: its error text and status come through.
    let r = c.request("PUT", "/drives/a", Some(body));
    assert_eq!(r.status, 400);
    assert_eq!(r.fault(), "path_on_host must not be empty");

    let r = c.request("PATCH", "/machine-config", Some(r#"{"vcpu_count": 3}"#));
    assert_eq!(r.status, 204);

    let seen = server.stop();
    assert_eq!(seen.len(), 2, "only valid requests reach the VMM: {seen:?}");
}

#[test]
fn oversized_bodies_are_refused() {
    let server = Server::start(true);
    let too_big = MAX_BODY_BYTES + 1;

    // Announced by Content-Length: refused before the body is read.
    let mut c = server.connect();
    c.send_raw(
        format!("PUT /vsock HTTP/1.1\r\nHost: x\r\nContent-Length: {too_big}\r\n\r\n").as_bytes(),
    );
    let r = c.read_response();
    assert_eq!(r.status, 413);
    assert!(r.fault().contains("larger than the limit"), "{}", r.body);

    // Chunked: refused once the limit is crossed.
    let mut c = server.connect();
    let mut raw = format!(
        "PUT /vsock HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n{too_big:x}\r\n"
    )
    .into_bytes();
    raw.resize(raw.len() + too_big, b' ');
    raw.extend_from_slice(b"\r\n0\r\n\r\n");
    // The server may stop reading (and close) before all of it is written.
    let _ = c.0.get_mut().write_all(&raw);
    assert_eq!(c.read_response().status, 413);

    // The server is still fine.
    assert_eq!(server.connect().request("GET", "/", None).status, 200);
    assert!(server.stop().len() == 1);
}

#[test]
fn vmm_gone_gives_503() {
    let server = Server::start(false);
    let mut c = server.connect();
    let r = c.request("GET", "/", None);
    assert_eq!(r.status, 503);
    assert!(r.fault().contains("VMM is not running"), "{}", r.body);
    // Parse errors are still answered locally.
    assert_eq!(c.request("GET", "/x", None).status, 400);
    server.stop();
}

#[test]
fn shutdown_closes_idle_connections_and_the_listener() {
    let server = Server::start(true);
    let mut idle = server.connect();
    assert_eq!(idle.request("GET", "/", None).status, 200);
    let path = server.path.clone();
    server.stop();
    assert!(idle.at_eof());
    // The listener is closed: only the (stale) socket file is left.
    assert!(UnixStream::connect(&path).is_err());
}

#[test]
fn shutdown_before_start_returns_at_once() {
    let server = Server::start(true);
    server.shutdown.trigger();
    server.stop();
}

#[test]
fn server_spawns_no_threads() {
    let server = Server::start(true);
    assert_eq!(server.connect().request("GET", "/", None).status, 200);
    // tokio names its worker and blocking-pool threads "tokio-runtime-w…".
    for task in std::fs::read_dir("/proc/self/task").unwrap() {
        let comm = std::fs::read_to_string(task.unwrap().path().join("comm")).unwrap_or_default();
        assert!(!comm.starts_with("tokio"), "unexpected thread {comm:?}");
    }
    server.stop();
}

/// hostd's typed client against this server: every shape it sends is
/// parsed into the action holding that same value, and its answers and
/// refusals read back typed.
#[test]
fn the_typed_client_speaks_this_api() {
    use ember_vmm_api::client::VmmClient;
    use ember_vmm_api::*;

    let server = Server::start(true);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let boot = BootSourceConfig {
        boot_args: Some("console=ttyS0".into()),
        ..BootSourceConfig::new("/vmlinux")
    };
    let machine = MachineConfig::new(2, 256);
    let root = BlockDeviceConfig {
        is_root_device: true,
        is_read_only: true,
        ..BlockDeviceConfig::file("rootfs", "/r.ext4")
    };
    let iface = NetworkInterfaceConfig {
        guest_mac: Some("06:00:ac:10:00:02".into()),
        terminate_connections_on_pause: true,
        ..NetworkInterfaceConfig::tap("eth0", "tap0")
    };
    let vsock = VsockConfig {
        vsock_id: None,
        guest_cid: 3,
        uds_path: "/v.sock".into(),
    };
    let snap = CreateSnapshotParams {
        snapshot_type: SnapshotType::Full,
        snapshot_path: "/s".into(),
        mem_file_path: "/m".into(),
    };
    let mut load = LoadSnapshotParams::new(
        "/s",
        MemBackend {
            backend_type: MemBackendType::File,
            backend_path: "/m".into(),
        },
    );
    load.resume_vm = true;
    load.drive_overrides.push(DriveOverride {
        drive_id: "tmp".into(),
        path_on_host: "/t".into(),
    });
    let reopen = BlockDeviceUpdate {
        drive_id: "vol".into(),
        nbd_uri: Some("nbd+unix:///v?socket=/n".into()),
        ..BlockDeviceUpdate::default()
    };
    let send = SendMigrationParams {
        downtime_ms: 100,
        switch_over: SwitchOver::Manual,
        ..SendMigrationParams::new("unix:///out.sock")
    };
    let mut receive = ReceiveMigrationParams::new("unix:///in.sock");
    receive.fill_overrides.push(FillOverride {
        drive_id: "tmp".into(),
        fill_from: FillFrom::nbd("nbd+unix:///disk?socket=/f"),
    });
    let switch = SwitchOverParams {
        drive_overrides: vec![DriveOverride {
            drive_id: "vol".into(),
            path_on_host: "nbd://h:1/v".into(),
        }],
    };

    let c = VmmClient::new(&server.path);
    rt.block_on(async {
        c.wait_ready(IO_TIMEOUT).await.unwrap();
        assert_eq!(c.instance_info().await.unwrap().state, "Not started");
        assert_eq!(c.machine_config().await.unwrap(), MachineConfig::default());
        c.put_boot_source(&boot).await.unwrap();
        c.put_machine_config(&machine).await.unwrap();
        c.put_drive(&root).await.unwrap();
        c.put_network_interface(&iface).await.unwrap();
        c.put_vsock(&vsock).await.unwrap();
        c.start().await.unwrap();
        c.pause().await.unwrap();
        c.create_snapshot(&snap).await.unwrap();
        c.resume().await.unwrap();
        c.load_snapshot(&load).await.unwrap();
        c.patch_drive(&reopen).await.unwrap();
        c.migrate(&send).await.unwrap();
        c.receive_migration(&receive).await.unwrap();
        c.switch_over(&switch).await.unwrap();
        c.cancel_migration().await.unwrap();
        // Refused by the fake VMM, and by the parser.
        let e = c
            .put_drive(&BlockDeviceConfig::file("data", ""))
            .await
            .unwrap_err();
        assert_eq!(
            (e.status(), e.fault_message().as_deref()),
            (Some(400), Some("path_on_host must not be empty"))
        );
        let e = c
            .migrate(&SendMigrationParams::new("ftp://nowhere"))
            .await
            .unwrap_err();
        assert!(
            e.fault_message().unwrap().contains("destination_uri"),
            "{e}"
        );
    });
    let seen = server.stop();
    assert_eq!(
        seen,
        vec![
            VmmAction::GetInstanceInfo,
            VmmAction::GetInstanceInfo,
            VmmAction::GetMachineConfig,
            VmmAction::PutBootSource(boot),
            VmmAction::PutMachineConfig(machine),
            VmmAction::PutDrive(root),
            VmmAction::PutNetworkInterface(iface),
            VmmAction::PutVsock(vsock),
            VmmAction::InstanceStart,
            VmmAction::Pause,
            VmmAction::CreateSnapshot(snap),
            VmmAction::Resume,
            VmmAction::LoadSnapshot(load),
            VmmAction::PatchDrive(reopen),
            VmmAction::SendMigration(send),
            VmmAction::ReceiveMigration(receive),
            VmmAction::SwitchOverMigration(switch),
            VmmAction::CancelMigration,
            VmmAction::PutDrive(BlockDeviceConfig::file("data", "")),
        ]
    );
}
