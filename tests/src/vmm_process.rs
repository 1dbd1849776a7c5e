//! An `ember-vmm` child process with its API socket, driven with curl.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use ember_vmm_api::{
    ActionType, BlockDeviceConfig, BootSourceConfig, InstanceActionInfo, MachineConfig, VsockConfig,
};

use crate::artifacts::workspace_bin;

/// A test path as the API carries it (the tests' temporary paths are UTF-8).
pub fn path_str(p: &Path) -> String {
    p.to_str()
        .unwrap_or_else(|| panic!("{} is not UTF-8", p.display()))
        .to_string()
}

fn to_json(body: &impl serde::Serialize) -> String {
    serde_json::to_string(body).expect("an API body serializes")
}

pub struct VmmProcess {
    child: Child,
    pub dir: tempfile::TempDir,
    pub api_sock: PathBuf,
    pub serial_log: PathBuf,
    pub vmm_log: PathBuf,
}

#[derive(Debug)]
pub struct ApiReply {
    pub status: u16,
    pub body: String,
}

impl ApiReply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("reply is not JSON ({e}): {:?}", self.body))
    }

    /// The `fault_message` of an error reply.
    pub fn fault(&self) -> String {
        self.json()["fault_message"]
            .as_str()
            .unwrap_or_else(|| panic!("no fault_message in {:?}", self.body))
            .to_string()
    }
}

impl VmmProcess {
    /// Starts `ember-vmm --api-sock` and waits for the socket to answer.
    pub fn spawn(extra_args: &[&str]) -> VmmProcess {
        let dir = tempfile::Builder::new()
            .prefix("ember-test-")
            .tempdir()
            .expect("tempdir");
        let api_sock = dir.path().join("api.sock");
        let serial_log = dir.path().join("serial.log");
        let vmm_log = dir.path().join("vmm.log");
        let log = std::fs::File::create(&vmm_log).expect("vmm log");
        let child = Command::new(workspace_bin("ember-vmm"))
            .arg("--api-sock")
            .arg(&api_sock)
            .arg("--serial-out")
            .arg(&serial_log)
            .args(extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn ember-vmm");
        let mut p = VmmProcess {
            child,
            dir,
            api_sock,
            serial_log,
            vmm_log,
        };
        p.wait_api(Duration::from_secs(20));
        p
    }

    fn wait_api(&mut self, timeout: Duration) {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("ember-vmm exited early ({status}): {}", self.logs());
            }
            if self.api_sock.exists() && self.try_request("GET", "/", None).is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("API socket never answered: {}", self.logs());
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn try_request(&self, method: &str, path: &str, body: Option<&str>) -> Option<ApiReply> {
        let mut cmd = Command::new("curl");
        cmd.arg("-sS")
            .arg("--unix-socket")
            .arg(&self.api_sock)
            .arg("-X")
            .arg(method)
            .arg("-w")
            .arg("\n%{http_code}")
            .arg("--max-time")
            .arg("120");
        if let Some(b) = body {
            cmd.arg("-H")
                .arg("Content-Type: application/json")
                .arg("--data-binary")
                .arg(b);
        }
        cmd.arg(format!("http://localhost{path}"));
        let out = cmd.output().ok()?;
        if !out.status.success() {
            return None;
        }
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let (body, code) = text.rsplit_once('\n')?;
        Some(ApiReply {
            status: code.trim().parse().ok()?,
            body: body.to_string(),
        })
    }

    /// One API request with curl; panics if the socket does not answer.
    pub fn request(&self, method: &str, path: &str, body: Option<&str>) -> ApiReply {
        self.try_request(method, path, body)
            .unwrap_or_else(|| panic!("{method} {path}: no answer; {}", self.logs()))
    }

    /// `PUT` of `body`: one of `ember_vmm_api`'s shapes, or raw JSON.
    pub fn put(&self, path: &str, body: &impl serde::Serialize) -> ApiReply {
        self.request("PUT", path, Some(&to_json(body)))
    }

    /// `PATCH` of `body`: one of `ember_vmm_api`'s shapes, or raw JSON.
    pub fn patch(&self, path: &str, body: &impl serde::Serialize) -> ApiReply {
        self.request("PATCH", path, Some(&to_json(body)))
    }

    /// Configures and boots a guest with the project's kernel and rootfs,
    /// a vsock device at `vsock.sock` in the test dir, and `vcpus` vCPUs.
    pub fn boot(&self, kernel: &Path, rootfs: &Path, vcpus: u8, mem_mib: u32) {
        self.boot_with_drives(kernel, rootfs, vcpus, mem_mib, &[]);
    }

    /// `boot` with extra `PUT /drives` bodies (after the root drive).
    pub fn boot_with_drives(
        &self,
        kernel: &Path,
        rootfs: &Path,
        vcpus: u8,
        mem_mib: u32,
        drives: &[serde_json::Value],
    ) {
        let ok = |r: ApiReply, what: &str| {
            assert_eq!(r.status, 204, "{what}: {r:?}; {}", self.logs());
        };
        let boot = BootSourceConfig {
            boot_args: Some(
                "console=ttyS0 reboot=k panic=1 pci=off i8042.noaux i8042.nomux i8042.dumbkbd"
                    .into(),
            ),
            ..BootSourceConfig::new(path_str(kernel))
        };
        ok(self.put("/boot-source", &boot), "boot-source");
        let machine = MachineConfig::new(vcpus, mem_mib as usize);
        ok(self.put("/machine-config", &machine), "machine-config");
        let root = BlockDeviceConfig {
            is_root_device: true,
            is_read_only: true,
            ..BlockDeviceConfig::file("rootfs", path_str(rootfs))
        };
        ok(self.put("/drives/rootfs", &root), "rootfs drive");
        for d in drives {
            let id = d["drive_id"].as_str().unwrap_or_default();
            ok(self.put(&format!("/drives/{id}"), d), "extra drive");
        }
        let vsock = VsockConfig {
            vsock_id: None,
            guest_cid: 3,
            uds_path: path_str(&self.path("vsock.sock")),
        };
        ok(self.put("/vsock", &vsock), "vsock");
        let start = InstanceActionInfo::new(ActionType::InstanceStart);
        ok(self.put("/actions", &start), "InstanceStart");
    }

    /// Waits for the guest agent's ready hello on `listener`, failing at
    /// once (with the logs) if the VMM process ends meanwhile.
    pub fn wait_agent_ready(
        &mut self,
        listener: &std::os::unix::net::UnixListener,
        timeout: Duration,
    ) -> ember_agent::protocol::HealthInfo {
        let start = Instant::now();
        loop {
            match ember_agent::client::wait_ready(listener, Duration::from_secs(2)) {
                Ok(h) => return h,
                Err(ember_agent::client::ClientError::Timeout(_)) => {}
                Err(e) => panic!("waiting for the agent: {e}; {}", self.logs()),
            }
            if let Some(status) = self.try_wait() {
                panic!(
                    "ember-vmm exited ({status}) before the agent was ready; {}",
                    self.logs()
                );
            }
            if start.elapsed() > timeout {
                panic!("agent not ready after {timeout:?}; {}", self.logs());
            }
        }
    }

    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits for the process to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Some(s) = self.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        None
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The VMM's log and the tail of the guest console, for failure messages.
    pub fn logs(&self) -> String {
        let vmm = std::fs::read_to_string(&self.vmm_log).unwrap_or_default();
        let serial = std::fs::read_to_string(&self.serial_log).unwrap_or_default();
        let tail: String = serial
            .lines()
            .rev()
            .take(40)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n");
        format!("\n--- vmm log ---\n{vmm}\n--- serial (tail) ---\n{tail}\n")
    }
}

impl Drop for VmmProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
