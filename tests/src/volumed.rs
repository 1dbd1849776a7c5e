//! An `ember-volumed` child process (the volume service): its API and NBD
//! on unix sockets in a directory of the caller's, NBD also on a free local
//! TCP port, driven over its API with curl.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::artifacts::workspace_bin;

pub struct Volumed {
    child: Child,
    pub api: PathBuf,
    pub nbd: PathBuf,
    /// The NBD TCP port on 127.0.0.1.
    pub port: u16,
    pub data_dir: PathBuf,
    /// Its log (stderr), appended to by every start on the same directory.
    pub log: PathBuf,
}

impl Volumed {
    pub fn start(dir: &Path) -> Volumed {
        Volumed::start_with(dir, &[])
    }

    /// Starts it with `extra` arguments (e.g. `--etcd-endpoints`); state and
    /// images in `dir`, so a second start on `dir` finds them again.
    pub fn start_with(dir: &Path, extra: &[&str]) -> Volumed {
        let api = dir.join("volumed.sock");
        let nbd = dir.join("volumed-nbd.sock");
        let data_dir = dir.join("volumed-data");
        let log = dir.join("volumed.log");
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("volumed.log");
        // The wait below is for a fresh socket.
        let _ = std::fs::remove_file(&api);
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let child = Command::new(workspace_bin("ember-volumed"))
            .args(extra)
            .arg("--nbd-listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("--api-socket")
            .arg(&api)
            .arg("--nbd-socket")
            .arg(&nbd)
            .env("RUST_LOG", "info,ember_volumed=debug")
            .stderr(Stdio::from(log_file))
            .spawn()
            .expect("spawn ember-volumed");
        let start = Instant::now();
        while !(api.exists() && nbd.exists()) {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "ember-volumed did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Volumed {
            child,
            api,
            nbd,
            port,
            data_dir,
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills it (SIGKILL) and waits.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// One API call: (status, JSON body or Null).
    pub fn call(&self, method: &str, path: &str, body: Option<&str>) -> (u16, serde_json::Value) {
        let mut c = Command::new("curl");
        c.args(["-sS", "-X", method, "--unix-socket"])
            .arg(&self.api)
            .args(["-w", "\n%{http_code}"]);
        if let Some(b) = body {
            c.args(["-H", "Content-Type: application/json", "-d", b]);
        }
        let out = c.arg(format!("http://v{path}")).output().expect("curl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').expect("status line");
        let v = serde_json::from_str(body).unwrap_or(serde_json::Value::Null);
        (code.trim().parse().expect("status"), v)
    }

    /// The image file of volume `name`.
    pub fn image(&self, name: &str) -> PathBuf {
        self.data_dir.join("volumes").join(format!("{name}.img"))
    }
}

impl Drop for Volumed {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An `ember-export` child process: one file served read-only over NBD on
/// a unix socket (the export a migration's destination fills from).
pub struct Export {
    child: Child,
    pub sock: PathBuf,
}

impl Export {
    /// Serves `file` as `disk` on `sock`; returns once it listens.
    pub fn start(file: &Path, sock: &Path) -> Export {
        let _ = std::fs::remove_file(sock);
        let child = Command::new(workspace_bin("ember-export"))
            .arg("--file")
            .arg(file)
            .arg("--listen")
            .arg(format!("unix:{}", sock.display()))
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn ember-export");
        let start = Instant::now();
        while !sock.exists() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "ember-export did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Export {
            child,
            sock: sock.to_path_buf(),
        }
    }

    /// `nbd+unix:///disk?socket=...`
    pub fn uri(&self) -> String {
        format!("nbd+unix:///disk?socket={}", self.sock.display())
    }
}

impl Drop for Export {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
