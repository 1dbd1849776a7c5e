//! Where the volume service keeps its state (volumes, attachments and their
//! fencing generations): one interface, so that the cluster's etcd can
//! replace the embedded file store without touching the rest.

use std::collections::BTreeMap;
use std::io;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// Who may write a volume now: one host, with the credential its
/// connections must present (a random secret issued with the grant) and
/// the fencing generation it was granted at.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Attachment {
    pub host: String,
    pub generation: u64,
    /// 256 random bits (hex). Stored with the state, never shown by the
    /// API's volume listings (see [`VolumeRecord::public`]); empty in state
    /// written before credentials existed, which no connection matches.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub credential: String,
}

impl std::fmt::Debug for Attachment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attachment")
            .field("host", &self.host)
            .field("generation", &self.generation)
            .field("credential", &"<secret>")
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct VolumeRecord {
    pub name: String,
    pub size_bytes: u64,
    /// The account that owns the volume, if it was created for one: only
    /// that account's hosts may attach it (they name it when they do).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
    /// The last generation handed out; only ever increases, so a token
    /// once fenced off never becomes valid again.
    pub generation: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attachment: Option<Attachment>,
    /// Set once the volume moved to another service: this copy is stale
    /// and is never attached again (it may be deleted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moved_to: Option<String>,
    /// How a move fenced the old attachment's open connections: `false`,
    /// each request is answered EPERM; `true`, the connection is ended
    /// without an answer, so a client that reconnects and sends its
    /// requests again (Ember's VMM) sends them to the new server once told.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub disconnect_fenced: bool,
}

impl VolumeRecord {
    /// A volume just made: never attached, never moved.
    pub fn new(name: &str, size_bytes: u64, account: Option<&str>) -> VolumeRecord {
        VolumeRecord {
            name: name.into(),
            size_bytes,
            account: account.map(str::to_string),
            generation: 0,
            attachment: None,
            moved_to: None,
            disconnect_fenced: false,
        }
    }

    /// The record as the API shows it: without the attachment's credential.
    pub fn public(mut self) -> VolumeRecord {
        if let Some(a) = &mut self.attachment {
            a.credential.clear();
        }
        self
    }
}

pub type State = BTreeMap<String, VolumeRecord>;

pub trait StateStore: Send + Sync {
    fn load(&self) -> io::Result<State>;
    /// Durable before it returns: a fencing change must not be lost.
    fn save(&self, state: &State) -> io::Result<()>;
}

/// The state as one JSON value under `key` in Ember's cluster store (etcd
/// when several hosts share it, else the embedded store), written with
/// compare-and-swap on the version last read or written: if anyone else
/// changed it meanwhile, the change is refused rather than lost.
pub struct KvStore {
    store: ember_store::Store,
    key: String,
    version: std::sync::Mutex<Option<i64>>,
    /// The store's own runtime: etcd's client runs its connection there,
    /// and the registry's callers are plain threads or async tasks alike.
    rt: tokio::runtime::Runtime,
}

impl KvStore {
    /// etcd at `endpoints`, or the embedded store in `dir` when none.
    pub fn open(endpoints: &[String], dir: &Path, key: &str) -> io::Result<KvStore> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("volumed-store")
            .enable_all()
            .build()?;
        let store = rt
            .block_on(ember_store::Store::open(endpoints, dir))
            .map_err(|e| io::Error::other(e.to_string()))?;
        Ok(KvStore {
            store,
            key: key.to_string(),
            version: std::sync::Mutex::new(None),
            rt,
        })
    }

    /// Runs `f` on the store's runtime from any thread (a task of
    /// another runtime included).
    fn run<T: Send>(&self, f: impl std::future::Future<Output = T> + Send) -> T {
        std::thread::scope(|s| {
            s.spawn(|| self.rt.block_on(f))
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }

    fn version(&self) -> std::sync::MutexGuard<'_, Option<i64>> {
        self.version.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl StateStore for KvStore {
    fn load(&self) -> io::Result<State> {
        let got = self
            .run(self.store.get(&self.key))
            .map_err(|e| io::Error::other(e.to_string()))?;
        let Some(v) = got else {
            *self.version() = None;
            return Ok(State::new());
        };
        let state = serde_json::from_slice(&v.value).map_err(|e| {
            io::Error::new(io::ErrorKind::InvalidData, format!("{}: {e}", self.key))
        })?;
        *self.version() = Some(v.version);
        Ok(state)
    }

    fn save(&self, state: &State) -> io::Result<()> {
        let body = serde_json::to_vec(state)?;
        let mut version = self.version();
        let expect = match *version {
            Some(v) => ember_store::Expect::Version(v),
            None => ember_store::Expect::Absent,
        };
        let done = self
            .run(self.store.compare_and_swap(&self.key, expect, &body, None))
            .map_err(|e| io::Error::other(e.to_string()))?;
        match done {
            Some(v) => {
                *version = Some(v);
                Ok(())
            }
            None => Err(io::Error::other(format!(
                "{} changed in the store under this service (another ember-volumed?); \
                 restart it to reload",
                self.key
            ))),
        }
    }
}
