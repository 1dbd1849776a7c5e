//! Volumes served as vhost-user-blk to VMMs on the same host. Each
//! attachment gets its own socket, `<dir>/<name>.sock`, while it is the
//! volume's current one. vhost-user has no place for a credential, so the
//! socket's name is one: 128 bits of a hash of the attachment's credential,
//! in a directory others may enter but not list (0711), so only the grantee
//! (told the path in the grant) can connect. The attachment's socket: a move or detach closes it (new
//! connections are refused), and the connection already open is fenced
//! request by request (VIRTIO_BLK_S_IOERR, nothing applied), as the NBD
//! server does. One connection at a time per socket; when it ends, the
//! socket takes the next (a VMM reconnects there after a snapshot restore).

mod backend;
mod request;

use std::collections::HashMap;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

pub use backend::{config_space, BlkBackend, CONFIG_LEN};

use sha2::{Digest, Sha256};

use crate::registry::Registry;

/// The attachment sockets of one volume service.
pub struct VhostUserServer {
    dir: PathBuf,
    reg: Arc<Registry>,
    /// Per volume: the credential served and its socket's stop flag.
    open: Mutex<HashMap<String, Serving>>,
}

struct Serving {
    credential: String,
    path: PathBuf,
    stop: Arc<AtomicBool>,
    wake: UnixListener,
}

impl VhostUserServer {
    /// Serves every current attachment under `dir`, after removing the
    /// sockets a previous run left there.
    pub fn start(dir: &Path, reg: Arc<Registry>) -> std::io::Result<Arc<VhostUserServer>> {
        std::fs::create_dir_all(dir)?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711))?;
        }
        for e in std::fs::read_dir(dir)?.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "sock") {
                let _ = std::fs::remove_file(&p);
            }
        }
        let s = Arc::new(VhostUserServer {
            dir: dir.to_path_buf(),
            reg: reg.clone(),
            open: Mutex::new(HashMap::new()),
        });
        for rec in reg.list() {
            // Logged; attaching again retries.
            let _ = s.sync(&rec.name);
        }
        Ok(s)
    }

    /// Where the attachment with `credential` is served.
    pub fn socket_path(&self, credential: &str) -> PathBuf {
        let h = Sha256::new()
            .chain_update(b"ember vhost-user socket\0")
            .chain_update(credential.as_bytes())
            .finalize();
        let name: String = h[..16].iter().map(|b| format!("{b:02x}")).collect();
        self.dir.join(format!("{name}.sock"))
    }

    /// Makes the sockets follow the registry after a change to `volume`:
    /// its current attachment served, any earlier one closed. An error
    /// means the current attachment has no socket (attaching again retries).
    pub fn sync(&self, volume: &str) -> Result<(), String> {
        let want = self
            .reg
            .get(volume)
            .ok()
            .filter(|r| r.moved_to.is_none())
            .and_then(|r| r.attachment.map(|a| a.credential))
            .filter(|c| !c.is_empty());
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = open.get(volume) {
            if Some(&s.credential) == want.as_ref() {
                return Ok(());
            }
        }
        if let Some(old) = open.remove(volume) {
            old.close();
        }
        let Some(credential) = want else {
            return Ok(());
        };
        let path = self.socket_path(&credential);
        // (The path is a secret: not in errors or the log.)
        let fail = |e: std::io::Error| {
            let msg = format!("vhost-user socket for {volume}: {e}");
            log::error!("{msg}");
            msg
        };
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).map_err(fail)?;
        // A second handle, kept to shut the listener down from here.
        let wake = listener.try_clone().map_err(fail)?;
        let stop = Arc::new(AtomicBool::new(false));
        let (reg, name, flag) = (self.reg.clone(), volume.to_string(), stop.clone());
        let token = credential.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("vu-{volume}"))
            .spawn(move || serve(Listener::from(listener), reg, &name, &token, &flag));
        if let Err(e) = spawned {
            let _ = std::fs::remove_file(&path);
            return Err(fail(e));
        }
        log::info!("vhost-user: serving {volume}");
        open.insert(
            volume.to_string(),
            Serving {
                credential,
                path,
                stop,
                wake,
            },
        );
        Ok(())
    }
}

impl Serving {
    /// Refuses new connections at once; an open one is fenced by the
    /// registry and its thread ends when the client goes.
    fn close(self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = std::fs::remove_file(&self.path);
        // A shut-down listening socket fails its accept (also the one
        // blocked now) with EINVAL, so the thread sees the flag.
        // SAFETY: shutdown(2) on a socket this struct owns.
        unsafe { libc::shutdown(self.wake.as_raw_fd(), libc::SHUT_RDWR) };
    }
}

/// Accepts one client after another on an attachment's socket until the
/// attachment ends.
fn serve(mut listener: Listener, reg: Arc<Registry>, name: &str, token: &str, stop: &AtomicBool) {
    let id = name.to_string();
    while !stop.load(Ordering::SeqCst) {
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let backend = match BlkBackend::open(reg.clone(), name, token, mem.clone()) {
            Ok(b) => Arc::new(b),
            Err(e) => {
                log::info!("vhost-user {id}: no longer served: {e}");
                break;
            }
        };
        let mut daemon = match VhostUserDaemon::new(id.clone(), backend.clone(), mem) {
            Ok(d) => d,
            Err(e) => {
                log::error!("vhost-user {id}: {e}");
                break;
            }
        };
        match daemon.start(&mut listener) {
            Err(e) if !stop.load(Ordering::SeqCst) => {
                log::warn!("vhost-user {id}: accept: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(_) => {}
            Ok(()) => {
                // Checked at connection time too: nothing is read from the
                // volume before the first request, which is checked again.
                if stop.load(Ordering::SeqCst) || !backend.allowed() {
                    daemon.request_shutdown();
                } else {
                    log::info!("vhost-user {id}: client connected");
                }
                match daemon.wait() {
                    Ok(()) => log::info!("vhost-user {id}: client disconnected"),
                    Err(e) => log::info!("vhost-user {id}: connection ended: {e}"),
                }
            }
        }
        // The daemon's queue worker ends with it.
        for h in daemon.get_epoll_handlers() {
            h.send_exit_event();
        }
    }
}
