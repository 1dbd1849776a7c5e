//! Where the volume service keeps its state (volumes, attachments and their
//! fencing generations): one interface, so that the cluster's etcd can
//! replace the embedded file store without touching the rest.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Who may write a volume now: one host, with the generation its
/// connections must present.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Attachment {
    pub host: String,
    pub generation: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct VolumeRecord {
    pub name: String,
    pub size_bytes: u64,
    /// The last generation handed out; only ever increases, so a token
    /// once fenced off never becomes valid again.
    pub generation: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attachment: Option<Attachment>,
}

pub type State = BTreeMap<String, VolumeRecord>;

pub trait StateStore: Send + Sync {
    fn load(&self) -> io::Result<State>;
    /// Durable before it returns: a fencing change must not be lost.
    fn save(&self, state: &State) -> io::Result<()>;
}

/// The single-host default: a JSON file, replaced atomically.
pub struct FileStore {
    path: PathBuf,
}

impl FileStore {
    pub fn new(path: impl Into<PathBuf>) -> FileStore {
        FileStore { path: path.into() }
    }
}

impl StateStore for FileStore {
    fn load(&self) -> io::Result<State> {
        match std::fs::read(&self.path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: {e}", self.path.display()),
                )
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(State::new()),
            Err(e) => Err(e),
        }
    }

    fn save(&self, state: &State) -> io::Result<()> {
        write_atomic(&self.path, &serde_json::to_vec_pretty(state)?)
    }
}

fn write_atomic(path: &Path, body: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(body)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}
