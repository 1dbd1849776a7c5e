//! PID 1 duties and the accept loops of the `ember-agent` binary.

use std::io::{self, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::Duration;

use nix::mount::MsFlags;

use crate::log;
use crate::protocol::{
    write_frame, HealthInfo, ProtocolError, Response, AGENT_PORT, HOST_CID, READY_PORT,
};
use crate::server::{panic_message, Agent, PowerAction};

/// `PATH` given to the agent and its children.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Hostname unless the kernel command line sets `EMBER_HOSTNAME=...` (the
/// kernel passes unknown `key=value` arguments to init as environment).
pub const DEFAULT_HOSTNAME: &str = "ember";

/// Installs a panic hook that logs the panic in one line. (Panics in
/// connection threads end only that request; see `Agent::handle`.)
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("?");
        let loc = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        log(&format!(
            "panic in thread '{name}'{loc}: {}",
            panic_message(info.payload())
        ));
    }));
}

struct MountSpec {
    source: &'static str,
    target: &'static str,
    fstype: &'static str,
    flags: MsFlags,
    data: Option<&'static str>,
}

fn mount_one(m: &MountSpec) {
    match nix::mount::mount(Some(m.source), m.target, Some(m.fstype), m.flags, m.data) {
        Ok(()) => {}
        // Already mounted (e.g. CONFIG_DEVTMPFS_MOUNT mounted /dev).
        Err(nix::errno::Errno::EBUSY) => {}
        Err(e) => log(&format!("mount {} on {}: {e}", m.fstype, m.target)),
    }
}

/// Everything PID 1 does before serving: /dev, console, the other mounts,
/// hostname and environment. Failures are logged and tolerated. About a
/// dozen syscalls in total.
pub fn early_setup() {
    let nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount_one(&MountSpec {
        source: "devtmpfs",
        target: "/dev",
        fstype: "devtmpfs",
        flags: MsFlags::MS_NOSUID,
        data: Some("mode=0755"),
    });
    setup_console();
    let rest = [
        MountSpec {
            source: "proc",
            target: "/proc",
            fstype: "proc",
            flags: nodev,
            data: None,
        },
        MountSpec {
            source: "sysfs",
            target: "/sys",
            fstype: "sysfs",
            flags: nodev,
            data: None,
        },
        MountSpec {
            source: "tmpfs",
            target: "/tmp",
            fstype: "tmpfs",
            flags: MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            data: Some("mode=1777"),
        },
        MountSpec {
            source: "tmpfs",
            target: "/run",
            fstype: "tmpfs",
            flags: MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            data: Some("mode=0755"),
        },
    ];
    for m in &rest {
        mount_one(m);
    }
    let hostname = std::env::var("EMBER_HOSTNAME").unwrap_or_else(|_| DEFAULT_HOSTNAME.into());
    if let Err(e) = nix::unistd::sethostname(&hostname) {
        log(&format!("sethostname {hostname:?}: {e}"));
    }
    set_default_env();
    loopback_up();
}

/// Brings up `lo` (the kernel then gives it 127.0.0.1), for the Lambda
/// Runtime API on 127.0.0.1:9001. Three syscalls: socket, ioctl, close.
pub fn loopback_up() {
    use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
    use std::os::fd::AsRawFd;
    let sock = match socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    ) {
        Ok(s) => s,
        Err(e) => {
            log(&format!("loopback: socket: {e}"));
            return;
        }
    };
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // lo has no other flag a user may change, so no SIOCGIFFLAGS first.
    req.ifr_ifru.ifru_flags = libc::IFF_UP as libc::c_short;
    // SAFETY: SIOCSIFFLAGS reads a valid, initialised ifreq that outlives
    // the call, on a socket fd we own.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) };
    if rc != 0 {
        log(&format!(
            "loopback: SIOCSIFFLAGS lo up: {}",
            io::Error::last_os_error()
        ));
    }
}

/// Sets PATH and HOME for the agent and its children. Call before any
/// other thread exists.
pub fn set_default_env() {
    std::env::set_var("PATH", DEFAULT_PATH);
    if std::env::var_os("HOME").is_none_or(|h| h == "/") {
        std::env::set_var("HOME", "/root");
    }
}

/// Points fds 0, 1 and 2 at /dev/console (the serial console with
/// `console=ttyS0`), whatever the kernel left there.
pub fn setup_console() {
    use nix::fcntl::{open, OFlag};
    use nix::sys::stat::Mode;
    let fd = match open(
        "/dev/console",
        OFlag::O_RDWR | OFlag::O_NOCTTY,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(e) => {
            log(&format!("open /dev/console: {e}"));
            return;
        }
    };
    let _ = nix::unistd::dup2_stdin(&fd);
    let _ = nix::unistd::dup2_stdout(&fd);
    let _ = nix::unistd::dup2_stderr(&fd);
    // If open() returned 0, 1 or 2 itself, keep it: it is now a std fd.
    if std::os::fd::AsRawFd::as_raw_fd(&fd) <= 2 {
        std::mem::forget(fd);
    }
}

/// Flushes filesystems and asks the kernel to reboot (`Reboot`, and also
/// `Shutdown`: a power-off without ACPI only halts the vCPU, while a
/// reboot makes a Firecracker-like VMM exit). Refuses unless this process
/// is PID 1, so a test run on a development host can never reboot it.
/// Returns only on failure.
pub fn power(action: PowerAction) -> io::Error {
    if std::process::id() != 1 {
        return io::Error::other("refusing to reboot: not PID 1");
    }
    log(&format!("{action:?}: syncing and rebooting"));
    nix::unistd::sync();
    match nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT) {
        Ok(never) => match never {},
        Err(e) => e.into(),
    }
}

/// Last resort for PID 1: sync, reboot, and if even that fails, sleep
/// forever (exiting would panic the kernel).
pub fn fatal(msg: &str) -> ! {
    log(&format!("fatal: {msg}"));
    let e = power(PowerAction::Reboot);
    log(&format!("reboot failed: {e}; idling"));
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Sends the ready hello on `stream`.
pub fn send_hello<W: Write>(mut stream: W) -> io::Result<()> {
    write_frame(&mut stream, &Response::Hello(HealthInfo::current()))
        .map_err(|e| io::Error::other(e.to_string()))
}

/// Connects to the host (CID 2) on [`READY_PORT`] and sends the hello;
/// failure (no one listening) is logged and ignored.
pub fn send_hello_vsock() {
    match vsock::VsockStream::connect_with_cid_port(HOST_CID, READY_PORT) {
        Ok(s) => {
            if let Err(e) = send_hello(&s) {
                log(&format!(
                    "ready hello to host port {READY_PORT}: {e} (ignored)"
                ));
            }
        }
        Err(e) => log(&format!(
            "ready hello: connect to vsock {HOST_CID}:{READY_PORT}: {e} (ignored)"
        )),
    }
}

/// Like [`send_hello_vsock`] for test mode: connects to a unix socket.
pub fn send_hello_unix(path: &Path) {
    match UnixStream::connect(path) {
        Ok(s) => {
            if let Err(e) = send_hello(&s) {
                log(&format!("ready hello to {}: {e} (ignored)", path.display()));
            }
        }
        Err(e) => log(&format!(
            "ready hello: connect to {}: {e} (ignored)",
            path.display()
        )),
    }
}

/// Binds the vsock listener on [`AGENT_PORT`] for any local CID.
pub fn bind_vsock() -> io::Result<vsock::VsockListener> {
    vsock::VsockListener::bind_with_cid_port(libc::VMADDR_CID_ANY, AGENT_PORT)
}

/// Binds a unix listener at `path`, replacing a stale socket file.
pub fn bind_unix(path: &Path) -> io::Result<UnixListener> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    UnixListener::bind(path)
}

/// Accepts connections forever, serving each on its own thread. Accept
/// errors are logged and retried, never fatal.
pub fn serve_forever<S, F>(mut accept: F, agent: Agent) -> !
where
    F: FnMut() -> io::Result<S>,
    S: Send + 'static,
    for<'a> &'a S: Read + Write,
{
    let mut conn_id: u64 = 0;
    loop {
        let stream = match accept() {
            Ok(s) => s,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log(&format!("accept: {e}"));
                // EMFILE and the like: back off instead of spinning.
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        conn_id += 1;
        let agent = agent.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("conn-{conn_id}"))
            .spawn(move || {
                match agent.serve_connection(BufReader::new(&stream), &stream) {
                    // A host that went away, or the vsock transport reset a
                    // restore sends: expected, and the console is slow.
                    Err(ProtocolError::Io(e)) if peer_gone(&e) => {}
                    Err(e) => log(&format!("connection {conn_id}: {e}")),
                    Ok(()) => {}
                }
            });
        if let Err(e) = spawned {
            log(&format!(
                "cannot start a thread for connection {conn_id}: {e}"
            ));
        }
    }
}

/// Errors that only mean the peer (or the transport) closed the connection.
fn peer_gone(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::NotConnected
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::UnexpectedEof
    )
}
