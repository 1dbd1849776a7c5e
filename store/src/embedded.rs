//! The single-host backend: the whole state in memory, written to one
//! file (replaced atomically) on every change, with etcd's semantics for
//! versions and leases within this process.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
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

struct Inner {
    data: Data,
    /// When each lease expires unless kept alive (not saved: a restarted
    /// process gives every lease its full TTL again).
    deadlines: HashMap<i64, Instant>,
}

pub struct EmbeddedStore {
    path: PathBuf,
    inner: Mutex<Inner>,
}

impl EmbeddedStore {
    pub fn open(dir: &Path) -> std::io::Result<EmbeddedStore> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("store.json");
        let data: Data = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{}: {e}", path.display()),
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Data::default(),
            Err(e) => return Err(e),
        };
        let now = Instant::now();
        let deadlines = data
            .leases
            .iter()
            .map(|(id, ttl)| (*id, now + Duration::from_secs(*ttl)))
            .collect();
        Ok(EmbeddedStore {
            path,
            inner: Mutex::new(Inner { data, deadlines }),
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

    fn save(&self, data: &Data) -> Result<(), StoreError> {
        let body = serde_json::to_vec(data).map_err(std::io::Error::from)?;
        let tmp = self.path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&body)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &self.path)?;
        Ok(())
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
        let before = (g.data.revision, g.data.keys.get(key).cloned());
        g.data.revision += 1;
        let version = g.data.revision;
        g.data.keys.insert(
            key.to_string(),
            Entry {
                value: value.to_vec(),
                version,
                lease: lease.map(|l| l.0),
            },
        );
        if let Err(e) = self.save(&g.data) {
            // Not durable: not done.
            g.data.revision = before.0;
            match before.1 {
                Some(old) => g.data.keys.insert(key.to_string(), old),
                None => g.data.keys.remove(key),
            };
            return Err(e);
        }
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
        let old = g.data.keys.remove(key);
        if let Err(e) = self.save(&g.data) {
            if let Some(o) = old {
                g.data.keys.insert(key.to_string(), o);
            }
            return Err(e);
        }
        Ok(true)
    }

    pub fn grant_lease(&self, ttl: Duration) -> Lease {
        let mut g = self.lock();
        g.data.revision += 1;
        let id = g.data.revision;
        let secs = ttl.as_secs().max(1);
        g.data.leases.insert(id, secs);
        g.deadlines
            .insert(id, Instant::now() + Duration::from_secs(secs));
        if let Err(e) = self.save(&g.data) {
            log::warn!("embedded store: saving lease {id}: {e}");
        }
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
        drop_lease(&mut g, lease.0);
        self.save(&g.data)
    }
}

fn drop_lease(g: &mut Inner, id: i64) {
    g.deadlines.remove(&id);
    g.data.leases.remove(&id);
    g.data.keys.retain(|_, e| e.lease != Some(id));
}
