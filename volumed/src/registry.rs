//! Volumes and their attachments. Each attachment carries a fencing token:
//! the volume's generation when it was granted. Attaching to another host,
//! moving or detaching bumps the generation, so every connection holding
//! an older one is refused from then on, on its next request.
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
    #[error("volume {name}: fencing token {token} is stale (the attachment is {current})")]
    Fenced {
        name: String,
        token: u64,
        current: String,
    },
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

pub fn valid_size(size_bytes: u64) -> Result<(), RegistryError> {
    if size_bytes == 0 || size_bytes > MAX_SIZE || !size_bytes.is_multiple_of(512) {
        return Err(RegistryError::Size(size_bytes));
    }
    Ok(())
}

fn io_err(e: std::io::Error) -> RegistryError {
    RegistryError::Io(e.to_string())
}

impl Registry {
    pub fn open(data_dir: &Path, store: Box<dyn StateStore>) -> std::io::Result<Arc<Registry>> {
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

    /// A new, empty (sparse) volume.
    pub fn create(&self, name: &str, size_bytes: u64) -> Result<VolumeRecord, RegistryError> {
        if !valid_name(name) {
            return Err(RegistryError::Name(name.into()));
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
            let rec = VolumeRecord::new(name, size_bytes);
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
            let rec = s
                .get_mut(name)
                .ok_or_else(|| RegistryError::NotFound(name.into()))?;
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

    /// Grants `host` write access. Attaching again from the same host
    /// returns the current attachment; from another host it is refused
    /// (that is a move, which fences the first host off).
    pub fn attach(&self, name: &str, host: &str) -> Result<Attachment, RegistryError> {
        self.change(|s| {
            let rec = s
                .get_mut(name)
                .ok_or_else(|| RegistryError::NotFound(name.into()))?;
            if let Some(target) = &rec.moved_to {
                return Err(RegistryError::Moved {
                    name: name.into(),
                    target: target.clone(),
                });
            }
            match &rec.attachment {
                Some(a) if a.host == host => Ok(a.clone()),
                Some(a) => Err(RegistryError::Attached {
                    name: name.into(),
                    host: a.host.clone(),
                }),
                None => Ok(grant(rec, host)),
            }
        })
    }

    /// Moves the attachment to `host` with a new generation: the previous
    /// holder's requests are refused from now on.
    pub fn move_to(&self, name: &str, host: &str) -> Result<Attachment, RegistryError> {
        self.change(|s| {
            let rec = s
                .get_mut(name)
                .ok_or_else(|| RegistryError::NotFound(name.into()))?;
            if rec.attachment.is_none() {
                return Err(RegistryError::NotAttached(name.into()));
            }
            Ok(grant(rec, host))
        })
    }

    /// Ends the attachment; its token is stale from now on.
    pub fn detach(&self, name: &str) -> Result<(), RegistryError> {
        self.change(|s| {
            let rec = s
                .get_mut(name)
                .ok_or_else(|| RegistryError::NotFound(name.into()))?;
            if rec.attachment.take().is_none() {
                return Err(RegistryError::NotAttached(name.into()));
            }
            rec.generation += 1;
            Ok(())
        })
    }

    /// Whether `token` is the volume's current attachment: checked when a
    /// connection opens the volume and before every request it makes.
    pub fn check(&self, name: &str, token: u64) -> Result<VolumeRecord, RegistryError> {
        let s = self.lock();
        let rec = s
            .get(name)
            .ok_or_else(|| RegistryError::NotFound(name.into()))?;
        match &rec.attachment {
            Some(a) if a.generation == token => Ok(rec.clone()),
            other => Err(RegistryError::Fenced {
                name: name.into(),
                token,
                current: match (other, &rec.moved_to) {
                    (_, Some(t)) => format!("moved to {t}"),
                    (Some(a), None) => format!("generation {} on {}", a.generation, a.host),
                    (None, None) => "detached".into(),
                },
            }),
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
            let rec = s
                .get_mut(name)
                .ok_or_else(|| RegistryError::NotFound(name.into()))?;
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
    /// volume is served here again, to `host` with a new generation.
    pub fn unfence(
        &self,
        name: &str,
        host: Option<&str>,
    ) -> Result<Option<Attachment>, RegistryError> {
        self.change(|s| {
            let rec = s
                .get_mut(name)
                .ok_or_else(|| RegistryError::NotFound(name.into()))?;
            rec.moved_to = None;
            rec.disconnect_fenced = false;
            Ok(host.map(|h| grant(rec, h)))
        })
    }

    /// Registers a volume whose image was written at `tmp` (a copy): the
    /// file takes the volume's place only if the name is still free.
    pub fn adopt(
        &self,
        name: &str,
        size_bytes: u64,
        tmp: &Path,
    ) -> Result<VolumeRecord, RegistryError> {
        let path = self.image_path(name);
        self.change(|s| {
            if s.contains_key(name) {
                return Err(RegistryError::Exists(name.into()));
            }
            std::fs::rename(tmp, &path).map_err(io_err)?;
            let rec = VolumeRecord::new(name, size_bytes);
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

fn grant(rec: &mut VolumeRecord, host: &str) -> Attachment {
    rec.generation += 1;
    let a = Attachment {
        host: host.into(),
        generation: rec.generation,
    };
    rec.attachment = Some(a.clone());
    a
}

/// The NBD export name of an attachment: `<volume>@<generation>`.
pub fn export_name(volume: &str, generation: u64) -> String {
    format!("{volume}@{generation}")
}

/// Parses an export name into (volume, generation).
pub fn parse_export_name(s: &str) -> Option<(&str, u64)> {
    let (name, g) = s.rsplit_once('@')?;
    Some((name, g.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::KvStore;

    fn registry(dir: &Path) -> Arc<Registry> {
        let store = KvStore::open(&[], &dir.join("store"), "/ember/volumes/state").unwrap();
        Registry::open(dir, Box::new(store)).unwrap()
    }

    #[test]
    fn fencing_follows_the_attachment() {
        let dir = tempfile::tempdir().unwrap();
        let r = registry(dir.path());
        r.create("v1", 1 << 20).unwrap();
        assert!(matches!(
            r.check("v1", 0),
            Err(RegistryError::Fenced { .. })
        ));
        let a = r.attach("v1", "host-a").unwrap();
        assert_eq!(a.generation, 1);
        assert_eq!(r.attach("v1", "host-a").unwrap(), a, "idempotent");
        assert!(matches!(
            r.attach("v1", "host-b"),
            Err(RegistryError::Attached { .. })
        ));
        r.check("v1", 1).unwrap();
        let b = r.move_to("v1", "host-b").unwrap();
        assert_eq!(b.generation, 2);
        assert!(matches!(
            r.check("v1", 1),
            Err(RegistryError::Fenced { .. })
        ));
        r.check("v1", 2).unwrap();
        assert!(matches!(
            r.delete("v1"),
            Err(RegistryError::Attached { .. })
        ));
        r.detach("v1").unwrap();
        assert!(matches!(
            r.check("v1", 2),
            Err(RegistryError::Fenced { .. })
        ));
        // A new attachment never reuses a generation.
        assert_eq!(r.attach("v1", "host-a").unwrap().generation, 4);
    }

    #[test]
    fn state_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        {
            let r = registry(dir.path());
            r.create("v1", 1 << 20).unwrap();
            r.attach("v1", "h").unwrap();
            r.move_to("v1", "h2").unwrap();
        }
        let r = registry(dir.path());
        assert!(r.check("v1", 1).is_err());
        r.check("v1", 2).unwrap();
        assert_eq!(
            std::fs::metadata(r.image_path("v1")).unwrap().len(),
            1 << 20
        );
    }

    #[test]
    fn bad_input() {
        let dir = tempfile::tempdir().unwrap();
        let r = registry(dir.path());
        assert!(matches!(r.create("../x", 512), Err(RegistryError::Name(_))));
        assert!(matches!(r.create("v", 0), Err(RegistryError::Size(_))));
        assert!(matches!(r.create("v", 513), Err(RegistryError::Size(_))));
        r.create("v", 4096).unwrap();
        assert!(matches!(r.create("v", 4096), Err(RegistryError::Exists(_))));
        assert!(matches!(
            r.resize("v", 512),
            Err(RegistryError::Shrink { .. })
        ));
        assert_eq!(r.resize("v", 8192).unwrap().size_bytes, 8192);
        assert!(matches!(
            r.move_to("v", "h"),
            Err(RegistryError::NotAttached(_))
        ));
        assert!(matches!(r.detach("v"), Err(RegistryError::NotAttached(_))));
        assert!(matches!(
            r.attach("nope", "h"),
            Err(RegistryError::NotFound(_))
        ));
    }

    #[test]
    fn a_moved_volume_stays_fenced_until_unfenced() {
        let dir = tempfile::tempdir().unwrap();
        let r = registry(dir.path());
        r.create("v", 4096).unwrap();
        r.attach("v", "h").unwrap();
        assert_eq!(
            r.fence_moved("v", "/b.sock", false).unwrap(),
            Some("h".into())
        );
        assert!(matches!(r.check("v", 1), Err(RegistryError::Fenced { .. })));
        assert!(matches!(
            r.attach("v", "h"),
            Err(RegistryError::Moved { .. })
        ));
        // A second move finds the first one's mark.
        assert!(matches!(
            r.fence_moved("v", "/c.sock", false),
            Err(RegistryError::Moved { .. })
        ));
        let a = r.unfence("v", Some("h")).unwrap().unwrap();
        assert_eq!(a.generation, 3, "never a generation handed out before");
        r.check("v", 3).unwrap();
    }

    #[test]
    fn export_names() {
        assert_eq!(export_name("v1", 3), "v1@3");
        assert_eq!(parse_export_name("v1@3"), Some(("v1", 3)));
        assert_eq!(parse_export_name("v1"), None);
        assert_eq!(parse_export_name("v1@x"), None);
    }
}
