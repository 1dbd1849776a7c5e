//! Volumes and their attachments. Each grant (attach, move) issues a new
//! credential, a random secret that a connection presents in its export
//! name (`<volume>@<credential>`), and bumps the volume's fencing
//! generation. Moving or detaching replaces or drops the credential, so
//! every connection holding an older one is refused from then on, on its
//! next request. A refusal says only "not authorised".
//!
//! Live copies (move to another service, split, combine) need two more
//! things from here: the *I/O gate*, held shared by every request from its
//! token check until its effect is on the image and exclusively by a fence
//! or a final copy pass, so no request checked before a fence lands after
//! it; and *dirty trackers*, which collect the ranges written while a copy
//! runs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

use subtle::ConstantTimeEq;

use crate::store::{Attachment, State, StateStore, VolumeRecord};

/// Largest volume (16 TiB).
pub const MAX_SIZE: u64 = 16 << 40;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RegistryError {
    #[error("invalid volume name {0:?}: want 1 to 64 characters of [A-Za-z0-9_-]")]
    Name(String),
    #[error("invalid size {0}: want a multiple of 512 bytes, from 512 bytes to 16 TiB")]
    Size(u64),
    #[error("volume {0} not found")]
    NotFound(String),
    #[error("volume {0} already exists")]
    Exists(String),
    #[error("volume {name} is attached to {host}: detach it or move the attachment")]
    Attached { name: String, host: String },
    #[error("volume {0} is not attached")]
    NotAttached(String),
    #[error("volume {name}: a volume cannot shrink ({from} to {to} bytes)")]
    Shrink { name: String, from: u64, to: u64 },
    /// A credential that is not the volume's current one (or a volume
    /// that does not exist, or belongs to another account): nothing more
    /// is said.
    #[error("not authorised")]
    NotAuthorised,
    #[error("invalid account {0:?}: want 1 to 64 characters of [A-Za-z0-9_-]")]
    Account(String),
    #[error("volume {0} already has an owner account, which is never changed")]
    Owned(String),
    #[error("volume {name} moved to {target}: this copy is stale (delete it)")]
    Moved { name: String, target: String },
    #[error("storage: {0}")]
    Io(String),
}

/// Ranges (offset, length) written to a volume since a copy began.
pub type DirtyLog = Arc<Mutex<Vec<(u64, u64)>>>;

pub struct Registry {
    data_dir: PathBuf,
    store: Box<dyn StateStore>,
    state: Mutex<State>,
    gate: RwLock<()>,
    trackers: Mutex<HashMap<String, Vec<DirtyLog>>>,
}

/// A dirty log registered for a volume; unregistered when dropped.
pub struct Tracker {
    reg: Arc<Registry>,
    name: String,
    pub log: DirtyLog,
}

impl Tracker {
    /// The ranges written since the last call, sorted and merged.
    pub fn take(&self) -> Vec<(u64, u64)> {
        let mut v = std::mem::take(&mut *self.log.lock().unwrap_or_else(|p| p.into_inner()));
        v.sort_unstable();
        let mut out: Vec<(u64, u64)> = Vec::with_capacity(v.len());
        for (off, len) in v {
            match out.last_mut() {
                Some((o, l)) if off <= *o + *l => *l = (*l).max(off + len - *o),
                _ => out.push((off, len)),
            }
        }
        out
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        let mut t = self.reg.trackers_lock();
        if let Some(v) = t.get_mut(&self.name) {
            v.retain(|l| !Arc::ptr_eq(l, &self.log));
            if v.is_empty() {
                t.remove(&self.name);
            }
        }
    }
}

fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Whether `account` (when given) may use `rec`: only the owner's hosts
/// may, and a volume that has no owner is refused to every account.
/// The volume `name` in `s`, to change.
fn record_mut<'a>(s: &'a mut State, name: &str) -> Result<&'a mut VolumeRecord, RegistryError> {
    s.get_mut(name)
        .ok_or_else(|| RegistryError::NotFound(name.into()))
}

fn owned_by(rec: &VolumeRecord, account: Option<&str>) -> Result<(), RegistryError> {
    match account {
        Some(a) if rec.account.as_deref() != Some(a) => Err(RegistryError::NotAuthorised),
        _ => Ok(()),
    }
}

pub fn valid_size(size_bytes: u64) -> Result<(), RegistryError> {
    if size_bytes == 0 || size_bytes > MAX_SIZE || !size_bytes.is_multiple_of(512) {
        return Err(RegistryError::Size(size_bytes));
    }
    Ok(())
}

/// Makes `dir` (if missing) and takes every permission of it from the
/// group and others.
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

fn io_err(e: std::io::Error) -> RegistryError {
    RegistryError::Io(e.to_string())
}

impl Registry {
    /// The data directory is made private to this service's user (0700):
    /// it holds the images and, with the embedded store, the credentials.
    pub fn open(data_dir: &Path, store: Box<dyn StateStore>) -> std::io::Result<Arc<Registry>> {
        private_dir(data_dir)?;
        std::fs::create_dir_all(data_dir.join("volumes"))?;
        let state = store.load()?;
        Ok(Arc::new(Registry {
            data_dir: data_dir.to_path_buf(),
            store,
            state: Mutex::new(state),
            gate: RwLock::new(()),
            trackers: Mutex::new(HashMap::new()),
        }))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn trackers_lock(&self) -> MutexGuard<'_, HashMap<String, Vec<DirtyLog>>> {
        self.trackers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Held by a request from its token check until its write is applied.
    pub fn gate_shared(&self) -> RwLockReadGuard<'_, ()> {
        self.gate.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Held by a fence or a final copy pass: no request is between its
    /// check and its effect meanwhile.
    pub fn gate_exclusive(&self) -> RwLockWriteGuard<'_, ()> {
        self.gate.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts collecting the ranges written to `name`.
    pub fn track(self: &Arc<Self>, name: &str) -> Tracker {
        let log = DirtyLog::default();
        self.trackers_lock()
            .entry(name.to_string())
            .or_default()
            .push(log.clone());
        Tracker {
            reg: self.clone(),
            name: name.to_string(),
            log,
        }
    }

    /// Records a write (or zeroing, or discard) that was applied to `name`.
    pub fn mark_dirty(&self, name: &str, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        if let Some(v) = self.trackers_lock().get(name) {
            for l in v {
                l.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((offset, len));
            }
        }
    }

    pub fn image_path(&self, name: &str) -> PathBuf {
        self.data_dir.join("volumes").join(format!("{name}.img"))
    }

    /// Applies `f` to a copy of the state and stores it; on any error
    /// (including the store's) nothing changes.
    fn change<T>(
        &self,
        f: impl FnOnce(&mut State) -> Result<T, RegistryError>,
    ) -> Result<T, RegistryError> {
        let mut state = self.lock();
        let mut copy = state.clone();
        let out = f(&mut copy)?;
        self.store.save(&copy).map_err(io_err)?;
        *state = copy;
        Ok(out)
    }

    pub fn list(&self) -> Vec<VolumeRecord> {
        self.lock().values().cloned().collect()
    }

    pub fn get(&self, name: &str) -> Result<VolumeRecord, RegistryError> {
        self.lock()
            .get(name)
            .cloned()
            .ok_or_else(|| RegistryError::NotFound(name.into()))
    }

    /// A new, empty (sparse) volume, owned by `account` if given.
    pub fn create(
        &self,
        name: &str,
        size_bytes: u64,
        account: Option<&str>,
    ) -> Result<VolumeRecord, RegistryError> {
        if !valid_name(name) {
            return Err(RegistryError::Name(name.into()));
        }
        if let Some(a) = account.filter(|a| !valid_name(a)) {
            return Err(RegistryError::Account(a.into()));
        }
        valid_size(size_bytes)?;
        let path = self.image_path(name);
        self.change(|s| {
            if s.contains_key(name) {
                return Err(RegistryError::Exists(name.into()));
            }
            let f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)
                .map_err(io_err)?;
            f.set_len(size_bytes).map_err(io_err)?;
            let rec = VolumeRecord::new(name, size_bytes, account);
            s.insert(name.into(), rec.clone());
            Ok(rec)
        })
    }

    pub fn delete(&self, name: &str) -> Result<(), RegistryError> {
        self.change(|s| {
            let rec = s
                .get(name)
                .ok_or_else(|| RegistryError::NotFound(name.into()))?;
            if let Some(a) = &rec.attachment {
                return Err(RegistryError::Attached {
                    name: name.into(),
                    host: a.host.clone(),
                });
            }
            s.remove(name);
            Ok(())
        })?;
        let _ = std::fs::remove_file(self.image_path(name));
        Ok(())
    }

    /// Grows a volume (attached or not); connections made from now on see
    /// the new size.
    pub fn resize(&self, name: &str, size_bytes: u64) -> Result<VolumeRecord, RegistryError> {
        valid_size(size_bytes)?;
        let path = self.image_path(name);
        self.change(|s| {
            let rec = record_mut(s, name)?;
            if size_bytes < rec.size_bytes {
                return Err(RegistryError::Shrink {
                    name: name.into(),
                    from: rec.size_bytes,
                    to: size_bytes,
                });
            }
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(io_err)?;
            f.set_len(size_bytes).map_err(io_err)?;
            rec.size_bytes = size_bytes;
            Ok(rec.clone())
        })
    }

    /// Gives a volume of no account the owner `account` (again the same
    /// one is no change); another owner is never replaced.
    pub fn set_account(&self, name: &str, account: &str) -> Result<VolumeRecord, RegistryError> {
        if !valid_name(account) {
            return Err(RegistryError::Account(account.into()));
        }
        self.change(|s| {
            let rec = record_mut(s, name)?;
            match rec.account.as_deref() {
                None => rec.account = Some(account.into()),
                Some(a) if a == account => {}
                Some(_) => return Err(RegistryError::Owned(name.into())),
            }
            Ok(rec.clone())
        })
    }

    /// Grants `host` write access. Attaching again from the same host
    /// returns the current attachment; from another host it is refused
    /// (that is a move, which fences the first host off). With `account`,
    /// the volume must be that account's.
    pub fn attach(
        &self,
        name: &str,
        host: &str,
        account: Option<&str>,
    ) -> Result<Attachment, RegistryError> {
        let credential = new_credential()?;
        self.change(|s| {
            let rec = record_mut(s, name)?;
            owned_by(rec, account)?;
            if let Some(target) = &rec.moved_to {
                return Err(RegistryError::Moved {
                    name: name.into(),
                    target: target.clone(),
                });
            }
            match &rec.attachment {
                // (State from before credentials: granted again.)
                Some(a) if a.host == host && !a.credential.is_empty() => Ok(a.clone()),
                Some(a) if a.host != host => Err(RegistryError::Attached {
                    name: name.into(),
                    host: a.host.clone(),
                }),
                _ => Ok(grant(rec, host, credential)),
            }
        })
    }

    /// Moves the attachment to `host` with a new generation and a new
    /// credential: the previous holder's requests are refused from now on.
    pub fn move_to(
        &self,
        name: &str,
        host: &str,
        account: Option<&str>,
    ) -> Result<Attachment, RegistryError> {
        let credential = new_credential()?;
        self.change(|s| {
            let rec = record_mut(s, name)?;
            owned_by(rec, account)?;
            if rec.attachment.is_none() {
                return Err(RegistryError::NotAttached(name.into()));
            }
            Ok(grant(rec, host, credential))
        })
    }

    /// Ends the attachment; its token is stale from now on.
    pub fn detach(&self, name: &str) -> Result<(), RegistryError> {
        self.change(|s| {
            let rec = record_mut(s, name)?;
            if rec.attachment.take().is_none() {
                return Err(RegistryError::NotAttached(name.into()));
            }
            rec.generation += 1;
            Ok(())
        })
    }

    /// Whether `credential` is the volume's current attachment's: checked
    /// when a connection opens the volume and before every request it
    /// makes. Compared in constant time; every refusal is the same
    /// [`RegistryError::NotAuthorised`] (an unknown volume included).
    pub fn check(&self, name: &str, credential: &str) -> Result<VolumeRecord, RegistryError> {
        let s = self.lock();
        let rec = s.get(name).ok_or(RegistryError::NotAuthorised)?;
        let current = match (&rec.attachment, &rec.moved_to) {
            (Some(a), None) if !a.credential.is_empty() => a.credential.as_bytes(),
            _ => return Err(RegistryError::NotAuthorised),
        };
        let given = credential.as_bytes();
        // Lengths are public (every credential has the same one).
        if given.len() == current.len() && bool::from(given.ct_eq(current)) {
            Ok(rec.clone())
        } else {
            Err(RegistryError::NotAuthorised)
        }
    }

    /// The end of a move to another service: under the I/O gate, the
    /// attachment (if any) ends with a new generation and the volume is
    /// marked moved, so every later request here is refused. Returns the
    /// host it was attached to.
    pub fn fence_moved(
        &self,
        name: &str,
        target: &str,
        disconnect: bool,
    ) -> Result<Option<String>, RegistryError> {
        let _gate = self.gate_exclusive();
        self.change(|s| {
            let rec = record_mut(s, name)?;
            if let Some(t) = &rec.moved_to {
                // Another move got there first.
                return Err(RegistryError::Moved {
                    name: name.into(),
                    target: t.clone(),
                });
            }
            rec.generation += 1;
            rec.moved_to = Some(target.to_string());
            rec.disconnect_fenced = disconnect;
            Ok(rec.attachment.take().map(|a| a.host))
        })
    }

    /// Undoes [`Registry::fence_moved`] when the move failed after it: the
    /// volume is served here again, to `host` with a new generation (and
    /// a new credential).
    pub fn unfence(
        &self,
        name: &str,
        host: Option<&str>,
    ) -> Result<Option<Attachment>, RegistryError> {
        let credential = new_credential()?;
        self.change(|s| {
            let rec = record_mut(s, name)?;
            rec.moved_to = None;
            rec.disconnect_fenced = false;
            Ok(host.map(|h| grant(rec, h, credential)))
        })
    }

    /// Registers a volume whose image was written at `tmp` (a copy): the
    /// file takes the volume's place only if the name is still free.
    pub fn adopt(
        &self,
        name: &str,
        size_bytes: u64,
        account: Option<&str>,
        tmp: &Path,
    ) -> Result<VolumeRecord, RegistryError> {
        let path = self.image_path(name);
        self.change(|s| {
            if s.contains_key(name) {
                return Err(RegistryError::Exists(name.into()));
            }
            std::fs::rename(tmp, &path).map_err(io_err)?;
            let rec = VolumeRecord::new(name, size_bytes, account);
            s.insert(name.into(), rec.clone());
            Ok(rec)
        })
    }

    /// Checks a name for a new volume: valid and not taken.
    pub fn check_new_name(&self, name: &str) -> Result<(), RegistryError> {
        if !valid_name(name) {
            return Err(RegistryError::Name(name.into()));
        }
        if self.lock().contains_key(name) {
            return Err(RegistryError::Exists(name.into()));
        }
        Ok(())
    }
}

fn grant(rec: &mut VolumeRecord, host: &str, credential: String) -> Attachment {
    rec.generation += 1;
    let a = Attachment {
        host: host.into(),
        generation: rec.generation,
        credential,
    };
    rec.attachment = Some(a.clone());
    a
}

/// Bytes of randomness in a credential.
pub const CREDENTIAL_BYTES: usize = 32;

/// A new credential: 256 bits from the kernel's random source, in hex.
pub fn new_credential() -> Result<String, RegistryError> {
    let mut b = [0u8; CREDENTIAL_BYTES];
    getrandom::fill(&mut b).map_err(|e| RegistryError::Io(format!("random bytes: {e}")))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// The NBD export name of an attachment: `<volume>@<credential>`.
pub fn export_name(volume: &str, credential: &str) -> String {
    format!("{volume}@{credential}")
}

/// Parses an export name into (volume, credential).
pub fn parse_export_name(s: &str) -> Option<(&str, &str)> {
    s.rsplit_once('@')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::KvStore;

    fn registry(dir: &Path) -> Arc<Registry> {
        let store = KvStore::open(&[], &dir.join("store"), "/ember/volumes/state").unwrap();
        Registry::open(dir, Box::new(store)).unwrap()
    }

    fn refused(r: &Registry, name: &str, credential: &str) -> bool {
        matches!(r.check(name, credential), Err(RegistryError::NotAuthorised))
    }

    #[test]
    fn fencing_follows_the_attachment() {
        let dir = tempfile::tempdir().unwrap();
        let r = registry(dir.path());
        r.create("v1", 1 << 20, None).unwrap();
        assert!(refused(&r, "v1", ""));
        assert!(refused(&r, "v1", "0"));
        let a = r.attach("v1", "host-a", None).unwrap();
        assert_eq!(a.generation, 1);
        assert_eq!(a.credential.len(), 2 * CREDENTIAL_BYTES);
        assert_eq!(r.attach("v1", "host-a", None).unwrap(), a, "idempotent");
        assert!(matches!(
            r.attach("v1", "host-b", None),
            Err(RegistryError::Attached { .. })
        ));
        r.check("v1", &a.credential).unwrap();
        // The generation is no credential.
        assert!(refused(&r, "v1", "1"));
        assert!(refused(&r, "nosuch", &a.credential));
        let b = r.move_to("v1", "host-b", None).unwrap();
        assert_eq!(b.generation, 2);
        assert_ne!(b.credential, a.credential);
        assert!(refused(&r, "v1", &a.credential));
        r.check("v1", &b.credential).unwrap();
        assert!(matches!(
            r.delete("v1"),
            Err(RegistryError::Attached { .. })
        ));
        r.detach("v1").unwrap();
        assert!(refused(&r, "v1", &b.credential));
        // A new attachment never reuses a generation or a credential.
        let c = r.attach("v1", "host-a", None).unwrap();
        assert_eq!(c.generation, 4);
        assert!(c.credential != a.credential && c.credential != b.credential);
    }

    #[test]
    fn state_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = {
            let r = registry(dir.path());
            r.create("v1", 1 << 20, None).unwrap();
            let a = r.attach("v1", "h", None).unwrap();
            (a, r.move_to("v1", "h2", None).unwrap())
        };
        let r = registry(dir.path());
        assert!(refused(&r, "v1", &a.credential));
        r.check("v1", &b.credential).unwrap();
        assert_eq!(
            std::fs::metadata(r.image_path("v1")).unwrap().len(),
            1 << 20
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "the data dir holds credentials: {mode:o}");
    }

    #[test]
    fn accounts_own_volumes() {
        let dir = tempfile::tempdir().unwrap();
        let r = registry(dir.path());
        r.create("x", 4096, Some("111111111111")).unwrap();
        r.create("legacy", 4096, None).unwrap();
        assert!(matches!(
            r.create("y", 4096, Some("../a")),
            Err(RegistryError::Account(_))
        ));
        for (name, account) in [("x", "222222222222"), ("legacy", "111111111111")] {
            assert_eq!(
                r.attach(name, "h", Some(account)),
                Err(RegistryError::NotAuthorised)
            );
        }
        let a = r.attach("x", "h", Some("111111111111")).unwrap();
        assert_eq!(
            r.move_to("x", "h2", Some("222222222222")),
            Err(RegistryError::NotAuthorised)
        );
        r.check("x", &a.credential).unwrap();
        r.move_to("x", "h2", Some("111111111111")).unwrap();
        // An unowned volume may be given an owner, once.
        r.set_account("legacy", "111111111111").unwrap();
        r.set_account("legacy", "111111111111").unwrap();
        assert_eq!(
            r.set_account("legacy", "222222222222"),
            Err(RegistryError::Owned("legacy".into()))
        );
        assert_eq!(
            r.set_account("x", "222222222222"),
            Err(RegistryError::Owned("x".into()))
        );
        r.attach("legacy", "h", Some("111111111111")).unwrap();
    }

    #[test]
    fn bad_input() {
        let dir = tempfile::tempdir().unwrap();
        let r = registry(dir.path());
        assert!(matches!(
            r.create("../x", 512, None),
            Err(RegistryError::Name(_))
        ));
        assert!(matches!(
            r.create("v", 0, None),
            Err(RegistryError::Size(_))
        ));
        assert!(matches!(
            r.create("v", 513, None),
            Err(RegistryError::Size(_))
        ));
        r.create("v", 4096, None).unwrap();
        assert!(matches!(
            r.create("v", 4096, None),
            Err(RegistryError::Exists(_))
        ));
        assert!(matches!(
            r.resize("v", 512),
            Err(RegistryError::Shrink { .. })
        ));
        assert_eq!(r.resize("v", 8192).unwrap().size_bytes, 8192);
        assert!(matches!(
            r.move_to("v", "h", None),
            Err(RegistryError::NotAttached(_))
        ));
        assert!(matches!(r.detach("v"), Err(RegistryError::NotAttached(_))));
        assert!(matches!(
            r.attach("nope", "h", None),
            Err(RegistryError::NotFound(_))
        ));
    }

    #[test]
    fn a_moved_volume_stays_fenced_until_unfenced() {
        let dir = tempfile::tempdir().unwrap();
        let r = registry(dir.path());
        r.create("v", 4096, None).unwrap();
        let a = r.attach("v", "h", None).unwrap();
        assert_eq!(
            r.fence_moved("v", "/b.sock", false).unwrap(),
            Some("h".into())
        );
        assert!(refused(&r, "v", &a.credential));
        assert!(matches!(
            r.attach("v", "h", None),
            Err(RegistryError::Moved { .. })
        ));
        // A second move finds the first one's mark.
        assert!(matches!(
            r.fence_moved("v", "/c.sock", false),
            Err(RegistryError::Moved { .. })
        ));
        let b = r.unfence("v", Some("h")).unwrap().unwrap();
        assert_eq!(b.generation, 3, "never a generation handed out before");
        assert!(refused(&r, "v", &a.credential));
        r.check("v", &b.credential).unwrap();
    }

    #[test]
    fn export_names() {
        assert_eq!(export_name("v1", "ab12"), "v1@ab12");
        assert_eq!(parse_export_name("v1@ab12"), Some(("v1", "ab12")));
        assert_eq!(parse_export_name("v1"), None);
    }
}
