//! The single-host backend: the whole state in memory, with etcd's
//! semantics for versions and leases within this process. On disk, a
//! snapshot of the state (`store.json`, replaced atomically: temporary
//! file, fsync, rename, fsync of the directory) and a log of the changes
//! since (`store.log`, one JSON line per change, appended and fsynced
//! before the change is made in memory). A change costs its own size on
//! disk, not the whole state's (which holds code zips); the log is folded
//! into a new snapshot once it outgrows it. Replaying a log onto a snapshot
//! that already holds some of it gives the same state (each line sets
//! values), so a crash between a snapshot's rename and the log's truncation
//! loses nothing; a torn last line (a crash mid-append) is dropped.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{Expect, Lease, StoreError, Versioned};

#[derive(Default, Serialize, Deserialize)]
struct Data {
    /// The last version handed out (like etcd's store revision).
    revision: i64,
    keys: BTreeMap<String, Entry>,
    /// Lease id → TTL in seconds.
    leases: BTreeMap<i64, u64>,
}

#[derive(Clone, Serialize, Deserialize)]
struct Entry {
    value: Vec<u8>,
    version: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    lease: Option<i64>,
}

/// One change, as one line of the log.
#[derive(Serialize, Deserialize)]
struct Change {
    /// The store's revision after the change.
    revision: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    put: Option<(String, Entry)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    delete: Option<String>,
    /// A lease granted: id and TTL in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    grant: Option<(i64, u64)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    revoke: Option<i64>,
}

impl Change {
    fn new(revision: i64) -> Change {
        Change {
            revision,
            put: None,
            delete: None,
            grant: None,
            revoke: None,
        }
    }

    fn apply(self, data: &mut Data) {
        data.revision = self.revision;
        if let Some((k, e)) = self.put {
            data.keys.insert(k, e);
        }
        if let Some(k) = self.delete {
            data.keys.remove(&k);
        }
        if let Some((id, ttl)) = self.grant {
            data.leases.insert(id, ttl);
        }
        if let Some(id) = self.revoke {
            data.leases.remove(&id);
            data.keys.retain(|_, e| e.lease != Some(id));
        }
    }
}

/// The log is folded into a new snapshot once it is larger than this or
/// than the snapshot, whichever is larger.
const MIN_COMPACT_BYTES: u64 = 1 << 20;

struct Inner {
    data: Data,
    log: File,
    log_len: u64,
    snapshot_len: u64,
    /// When each lease expires unless kept alive (not saved: a restarted
    /// process gives every lease its full TTL again).
    deadlines: HashMap<i64, Instant>,
}

pub struct EmbeddedStore {
    /// The snapshot; the log is beside it.
    path: PathBuf,
    inner: Mutex<Inner>,
}

fn invalid(path: &Path, e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("{}: {e}", path.display()),
    )
}

/// Replays the complete lines of the log at `path` onto `data`; returns
/// the length of the good part (a torn or unreadable tail is dropped).
fn replay(path: &Path, data: &mut Data) -> std::io::Result<u64> {
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut r = std::io::BufReader::new(f);
    let mut good = 0u64;
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = r.read_until(b'\n', &mut line)?;
        if n == 0 || line.last() != Some(&b'\n') {
            break;
        }
        match serde_json::from_slice::<Change>(&line) {
            Ok(c) => c.apply(data),
            Err(e) => {
                log::warn!(
                    "embedded store: {}: dropping the log from byte {good}: {e}",
                    path.display()
                );
                break;
            }
        }
        good += n as u64;
    }
    Ok(good)
}

/// Makes a rename (or a new file) in `dir` durable.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

impl EmbeddedStore {
    pub fn open(dir: &Path) -> std::io::Result<EmbeddedStore> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("store.json");
        let log_path = dir.join("store.log");
        let mut data: Data = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| invalid(&path, e))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Data::default(),
            Err(e) => return Err(e),
        };
        let snapshot_len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        let log_len = replay(&log_path, &mut data)?;
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?;
        // A torn tail goes before anything is appended after it.
        if log.metadata()?.len() != log_len {
            log.set_len(log_len)?;
            log.sync_all()?;
        }
        sync_dir(dir)?;
        let now = Instant::now();
        let deadlines = data
            .leases
            .iter()
            .map(|(id, ttl)| (*id, now + Duration::from_secs(*ttl)))
            .collect();
        Ok(EmbeddedStore {
            path,
            inner: Mutex::new(Inner {
                data,
                log,
                log_len,
                snapshot_len,
                deadlines,
            }),
        })
    }

    /// The state with expired leases (and their keys) removed.
    fn lock(&self) -> MutexGuard<'_, Inner> {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let expired: Vec<i64> = g
            .deadlines
            .iter()
            .filter(|(_, d)| **d <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            drop_lease(&mut g, id);
        }
        g
    }

    /// Makes `change` durable (appended to the log, fsynced), then applies
    /// it in memory; on any error nothing changes.
    fn commit(&self, g: &mut Inner, change: Change) -> Result<(), StoreError> {
        let mut line = serde_json::to_vec(&change).map_err(std::io::Error::from)?;
        line.push(b'\n');
        let appended = g.log.write_all(&line).and_then(|()| g.log.sync_data());
        if let Err(e) = appended {
            // Whatever part of the line got out is cut off again, so the
            // next line starts clean; if even that fails, the torn line is
            // dropped at the next open.
            let _ = g.log.set_len(g.log_len);
            return Err(e.into());
        }
        g.log_len += line.len() as u64;
        change.apply(&mut g.data);
        if g.log_len > MIN_COMPACT_BYTES.max(g.snapshot_len) {
            if let Err(e) = self.compact(g) {
                // The log still holds everything: only the fold is late.
                log::warn!("embedded store: folding the log into a snapshot: {e}");
            }
        }
        Ok(())
    }

    /// Writes the whole state as the new snapshot and empties the log.
    fn compact(&self, g: &mut Inner) -> std::io::Result<()> {
        let body = serde_json::to_vec(&g.data)?;
        let tmp = self.path.with_extension("tmp");
        let mut f = File::create(&tmp)?;
        f.write_all(&body)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &self.path)?;
        sync_dir(self.path.parent().unwrap_or(Path::new(".")))?;
        g.snapshot_len = body.len() as u64;
        g.log.set_len(0)?;
        g.log.sync_all()?;
        g.log_len = 0;
        Ok(())
    }

    /// The log's and the snapshot's sizes on disk.
    pub fn disk_usage(&self) -> (u64, u64) {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        (g.log_len, g.snapshot_len)
    }

    pub fn get(&self, key: &str) -> Option<Versioned> {
        self.lock().data.keys.get(key).map(|e| Versioned {
            value: e.value.clone(),
            version: e.version,
        })
    }

    pub fn list(&self, prefix: &str) -> Vec<(String, Versioned)> {
        self.lock()
            .data
            .keys
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, e)| {
                (
                    k.clone(),
                    Versioned {
                        value: e.value.clone(),
                        version: e.version,
                    },
                )
            })
            .collect()
    }

    fn matches(g: &Inner, key: &str, expect: Expect) -> bool {
        match (expect, g.data.keys.get(key)) {
            (Expect::Absent, None) => true,
            (Expect::Version(v), Some(e)) => e.version == v,
            _ => false,
        }
    }

    fn write(
        &self,
        g: &mut Inner,
        key: &str,
        value: &[u8],
        lease: Option<Lease>,
    ) -> Result<i64, StoreError> {
        if let Some(l) = lease {
            if !g.data.leases.contains_key(&l.0) {
                return Err(StoreError::LeaseGone(l.0));
            }
        }
        let version = g.data.revision + 1;
        let mut change = Change::new(version);
        change.put = Some((
            key.to_string(),
            Entry {
                value: value.to_vec(),
                version,
                lease: lease.map(|l| l.0),
            },
        ));
        self.commit(g, change)?;
        Ok(version)
    }

    pub fn put(&self, key: &str, value: &[u8], lease: Option<Lease>) -> Result<i64, StoreError> {
        let mut g = self.lock();
        self.write(&mut g, key, value, lease)
    }

    pub fn compare_and_swap(
        &self,
        key: &str,
        expect: Expect,
        value: &[u8],
        lease: Option<Lease>,
    ) -> Result<Option<i64>, StoreError> {
        let mut g = self.lock();
        if !Self::matches(&g, key, expect) {
            return Ok(None);
        }
        self.write(&mut g, key, value, lease).map(Some)
    }

    pub fn compare_and_delete(&self, key: &str, expect: Expect) -> Result<bool, StoreError> {
        let mut g = self.lock();
        if !Self::matches(&g, key, expect) {
            return Ok(false);
        }
        let mut change = Change::new(g.data.revision);
        change.delete = Some(key.to_string());
        self.commit(&mut g, change)?;
        Ok(true)
    }

    pub fn grant_lease(&self, ttl: Duration) -> Lease {
        let mut g = self.lock();
        let id = g.data.revision + 1;
        let secs = ttl.as_secs().max(1);
        let mut change = Change::new(id);
        change.grant = Some((id, secs));
        if let Err(e) = self.commit(&mut g, change) {
            // Held in memory only: a restart forgets it, as it forgets
            // every lease's deadline.
            log::warn!("embedded store: saving lease {id}: {e}");
            g.data.revision = id;
            g.data.leases.insert(id, secs);
        }
        g.deadlines
            .insert(id, Instant::now() + Duration::from_secs(secs));
        Lease(id)
    }

    pub fn keep_alive(&self, lease: Lease) -> Result<(), StoreError> {
        let mut g = self.lock();
        let ttl = *g
            .data
            .leases
            .get(&lease.0)
            .ok_or(StoreError::LeaseGone(lease.0))?;
        g.deadlines
            .insert(lease.0, Instant::now() + Duration::from_secs(ttl));
        Ok(())
    }

    pub fn revoke(&self, lease: Lease) -> Result<(), StoreError> {
        let mut g = self.lock();
        let mut change = Change::new(g.data.revision);
        change.revoke = Some(lease.0);
        self.commit(&mut g, change)?;
        g.deadlines.remove(&lease.0);
        Ok(())
    }
}

fn drop_lease(g: &mut Inner, id: i64) {
    g.deadlines.remove(&id);
    g.data.leases.remove(&id);
    g.data.keys.retain(|_, e| e.lease != Some(id));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reopen(dir: &Path) -> EmbeddedStore {
        EmbeddedStore::open(dir).unwrap()
    }

    /// Every acknowledged change survives a crash (no orderly close: the
    /// store is dropped without folding its log), in order, with its
    /// version; deletes and revocations too.
    #[test]
    fn changes_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let s = reopen(dir.path());
        let l = s.grant_lease(Duration::from_secs(60));
        let v1 = s.put("a", b"1", None).unwrap();
        let v2 = s.put("a", b"2", None).unwrap();
        s.put("b", b"x", None).unwrap();
        s.put("leased", b"y", Some(l)).unwrap();
        assert!(s.compare_and_delete("b", Expect::Version(v2 + 1)).unwrap());
        assert_eq!(
            s.compare_and_swap("a", Expect::Version(v1), b"no", None)
                .unwrap(),
            None
        );
        let l2 = s.grant_lease(Duration::from_secs(60));
        s.put("gone-with-l2", b"z", Some(l2)).unwrap();
        s.revoke(l2).unwrap();
        drop(s);
        let s = reopen(dir.path());
        assert_eq!(s.get("a").unwrap().value, b"2");
        assert_eq!(s.get("a").unwrap().version, v2);
        assert!(s.get("b").is_none());
        assert!(s.get("gone-with-l2").is_none());
        assert_eq!(s.get("leased").unwrap().value, b"y");
        // Versions go on from where they were.
        assert!(s.put("c", b"", None).unwrap() > v2);
        assert!(matches!(s.keep_alive(l2), Err(StoreError::LeaseGone(_))));
        s.keep_alive(l).unwrap();
    }

    /// A crash mid-append leaves a torn last line: it is dropped, and the
    /// lines after it (written after the reopen) are read again.
    #[test]
    fn a_torn_last_line_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let s = reopen(dir.path());
        s.put("a", b"1", None).unwrap();
        drop(s);
        let mut log = OpenOptions::new()
            .append(true)
            .open(dir.path().join("store.log"))
            .unwrap();
        log.write_all(br#"{"revision":9,"put":["a",{"val"#).unwrap();
        drop(log);
        let s = reopen(dir.path());
        assert_eq!(s.get("a").unwrap().value, b"1");
        s.put("b", b"2", None).unwrap();
        drop(s);
        let s = reopen(dir.path());
        assert_eq!(s.get("a").unwrap().value, b"1");
        assert_eq!(s.get("b").unwrap().value, b"2");
    }

    /// A small change costs its own size on disk, not the whole state's:
    /// beside a 4 MiB value (a code zip), 200 small writes add a few
    /// kilobytes to the log and leave the snapshot alone; the log is
    /// folded into the snapshot once it outgrows it, and a fold's leftover
    /// log (a crash before its truncation) replays onto it harmlessly.
    #[test]
    fn small_changes_do_not_rewrite_the_state() {
        let dir = tempfile::tempdir().unwrap();
        let s = reopen(dir.path());
        s.put("code", &vec![7u8; 4 << 20], None).unwrap();
        let (log, snapshot) = s.disk_usage();
        assert_eq!(log, 0, "the large write was folded at once");
        assert!(snapshot > 4 << 20);
        let modified = std::fs::metadata(dir.path().join("store.json"))
            .unwrap()
            .modified()
            .unwrap();
        for i in 0..200 {
            s.put(&format!("k{i}"), b"small", None).unwrap();
        }
        let (log, snapshot2) = s.disk_usage();
        assert!(log < 64 << 10, "{log} bytes of log for 200 small writes");
        assert_eq!(snapshot2, snapshot);
        let after = std::fs::metadata(dir.path().join("store.json"))
            .unwrap()
            .modified()
            .unwrap();
        assert_eq!(modified, after, "the snapshot was rewritten");
        // A leftover log replayed onto a snapshot that holds it already.
        let leftover = std::fs::read(dir.path().join("store.log")).unwrap();
        {
            let mut g = s.inner.lock().unwrap();
            s.compact(&mut g).unwrap();
        }
        drop(s);
        std::fs::write(dir.path().join("store.log"), leftover).unwrap();
        let s = reopen(dir.path());
        assert_eq!(s.get("k199").unwrap().value, b"small");
        assert_eq!(s.get("code").unwrap().value.len(), 4 << 20);
        assert_eq!(s.list("k").len(), 200);
    }

    /// A store written before the log existed (a snapshot only) opens as
    /// it was.
    #[test]
    fn a_snapshot_alone_opens() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("store.json"),
            br#"{"revision":3,"keys":{"a":{"value":[104,105],"version":3}},"leases":{}}"#,
        )
        .unwrap();
        let s = reopen(dir.path());
        assert_eq!(s.get("a").unwrap().value, b"hi");
        assert_eq!(s.put("b", b"", None).unwrap(), 4);
    }
}
