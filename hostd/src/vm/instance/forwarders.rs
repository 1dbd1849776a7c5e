//! Sockets in the VMM's jail that hostd serves: each connection the VMM
//! makes there is joined to the volume service (a volume's NBD path) or
//! to a peer host (a `/tmp` disk filling from the migration's source).

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use super::{vm_paths, Instance, InstanceError};

impl Instance {
    /// Listens in the jail for the VMM's NBD connections to a volume and
    /// joins each to the export `grant` names, whatever export the VMM
    /// asks for ([`crate::volumes::forward_pinned`]); answers the socket's
    /// path as the VMM sees it. Called again with a new grant (the same
    /// volume granted again), later connections open the new one.
    pub fn start_nbd_path(&self, grant: &crate::volumes::Grant) -> Result<PathBuf, InstanceError> {
        let pin = grant.pin()?;
        *self.nbd_pin.lock().unwrap_or_else(|p| p.into_inner()) = Some(pin);
        if !self.nbd_listening.swap(true, Ordering::SeqCst) {
            let l = match self.listen_for_vmm(vm_paths::NBD) {
                Ok(l) => l,
                Err(e) => {
                    self.nbd_listening.store(false, Ordering::SeqCst);
                    return Err(e.into());
                }
            };
            self.serve(crate::volumes::forward_pinned(l, self.nbd_pin.clone()));
        }
        Ok(self.vm(vm_paths::NBD))
    }

    /// Where a receiving VMM's volume drive reaches the volume service (as
    /// the VMM sees it; the source names it in the switch-over's URI).
    pub fn nbd_socket(&self) -> PathBuf {
        self.vm(vm_paths::NBD)
    }

    /// Listens at `vm_path` in the jail and joins each connection to the
    /// peer host's port `target` (mutual TLS and its ticket).
    pub(super) fn start_peer_forwarder(
        &self,
        vm_path: &str,
        target: crate::migrate::stream::PeerTarget,
    ) -> std::io::Result<PathBuf> {
        let l = self.listen_for_vmm(vm_path)?;
        self.serve(crate::migrate::stream::forward_to_peer(l, target));
        Ok(self.vm(vm_path))
    }

    /// Runs `task` for this instance, until it ends or the instance is
    /// killed.
    fn serve(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        let handle = tokio::spawn(task);
        self.tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(handle);
    }

    /// A unix socket at `vm_path` (as the VMM sees it) that the VMM may
    /// connect to.
    pub(super) fn listen_for_vmm(
        &self,
        vm_path: &str,
    ) -> std::io::Result<tokio::net::UnixListener> {
        let host: &Path = &self.host(vm_path);
        let _ = std::fs::remove_file(host);
        let l = tokio::net::UnixListener::bind(host)?;
        self.give_to_vmm(host)?;
        Ok(l)
    }
}
