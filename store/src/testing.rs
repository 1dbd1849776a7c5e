//! A real etcd (Debian's `etcd`) on free local ports, for tests: started
//! with a data directory of its own, killed when dropped.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct EtcdProcess {
    child: Child,
    pub url: String,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for EtcdProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP port free on 127.0.0.1 at the time of asking.
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl EtcdProcess {
    /// None when `etcd` is not installed; waits until it answers.
    pub fn start() -> Option<EtcdProcess> {
        EtcdProcess::start_on("127.0.0.1")
    }

    /// [`EtcdProcess::start`], saying on stderr that the test is skipped
    /// when there is no etcd.
    pub fn start_or_skip() -> Option<EtcdProcess> {
        EtcdProcess::start_on_or_skip("127.0.0.1")
    }

    /// [`EtcdProcess::start_on`], saying on stderr that the test is
    /// skipped when there is no etcd.
    pub fn start_on_or_skip(ip: &str) -> Option<EtcdProcess> {
        let etcd = EtcdProcess::start_on(ip);
        if etcd.is_none() {
            eprintln!("skipped: etcd (etcd-server) is not installed");
        }
        etcd
    }

    /// A store on this etcd alone.
    pub async fn store(&self) -> Result<crate::Store, crate::StoreError> {
        crate::Store::open(
            std::slice::from_ref(&self.url),
            std::path::Path::new("/nonexistent"),
        )
        .await
    }

    /// The same, listening for clients on `ip` (e.g. `0.0.0.0`, for hosts
    /// in other network namespaces); `url` stays on 127.0.0.1.
    pub fn start_on(ip: &str) -> Option<EtcdProcess> {
        Command::new("etcd").arg("--version").output().ok()?;
        let dir = tempfile::tempdir().ok()?;
        let (client, peer) = (free_port().ok()?, free_port().ok()?);
        let url = format!("http://127.0.0.1:{client}");
        let listen = format!("http://{ip}:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let child = Command::new("etcd")
            .arg("--data-dir")
            .arg(dir.path())
            .args([
                "--listen-client-urls",
                &listen,
                "--advertise-client-urls",
                &url,
            ])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("default={peer_url}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let e = EtcdProcess {
            child,
            url,
            port: client,
            _dir: dir,
        };
        let start = Instant::now();
        let addr = format!("127.0.0.1:{client}");
        while std::net::TcpStream::connect(&addr).is_err() {
            if start.elapsed() > Duration::from_secs(30) {
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Some(e)
    }
}
