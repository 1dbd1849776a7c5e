//! A qemu-nbd server (from qemu-utils), the real NBD peer of the tests and
//! benches.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Serves the raw `image` on the unix socket `sock` until killed; returns
/// once it listens.
pub fn qemu_nbd(image: &Path, sock: &Path) -> Child {
    let _ = std::fs::remove_file(sock);
    let child = Command::new("qemu-nbd")
        .args(["-f", "raw", "--persistent", "--shared=0", "-k"])
        .arg(sock)
        .arg(image)
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-nbd (tests/run.sh installs qemu-utils)");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "qemu-nbd did not listen");
        std::thread::sleep(Duration::from_millis(10));
    }
    child
}
