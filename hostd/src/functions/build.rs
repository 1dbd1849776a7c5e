//! Scheduling each version's snapshot build and recording its outcome in
//! the version's record; the build itself is a [`SnapshotBuilder`]'s.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;

use super::Functions;
use crate::model::*;
use crate::net::LogicalNet;

/// A snapshot that was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Built {
    pub init_duration_ms: u64,
    /// The logical network the guest was built with, if it had one.
    pub network: Option<LogicalNet>,
}

/// Why a build made no snapshot; the version's `StateReasonCode` says which.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BuildFailure {
    /// The host could not boot, seed or snapshot the guest.
    #[error("{0}")]
    Internal(String),
    /// The function's settings cannot be built here (e.g. its volume).
    #[error("{0}")]
    InvalidConfiguration(String),
    /// The function's own init failed.
    #[error("{0}")]
    Init(String),
}

impl BuildFailure {
    /// Lambda's `StateReasonCode` for it.
    pub fn reason_code(&self) -> &'static str {
        match self {
            BuildFailure::Internal(_) => "InternalError",
            BuildFailure::InvalidConfiguration(_) => "InvalidConfiguration",
            BuildFailure::Init(_) => "InitError",
        }
    }
}

pub type BuildFuture<'a> = Pin<Box<dyn Future<Output = Result<Built, BuildFailure>> + Send + 'a>>;

/// Makes the snapshot of a version: boots it, lets its runtime initialize
/// and snapshots it into `dir` (a fresh path, which may exist from a build
/// cut short). The guest is the builder's; the records are not.
pub trait SnapshotBuilder: Send + Sync {
    fn build<'a>(&'a self, name: &'a str, v: &'a VersionRecord, dir: &'a Path) -> BuildFuture<'a>;
}

impl Functions {
    /// Starts the builds still owed: versions without a usable snapshot,
    /// pending, or updated since theirs (unless they failed).
    pub fn build_owed(self: &Arc<Functions>) {
        let owed: Vec<(String, String)> = {
            let fns = self.lock();
            fns.values()
                .flat_map(|f| {
                    f.versions.values().filter_map(move |v| {
                        let usable = v.snapshot.as_ref().is_some_and(|s| {
                            s.dir.join("vm.snap").is_file() && s.dir.join("mem").is_file()
                        });
                        let owed = !usable || v.update_in_progress || v.state == State::Pending;
                        (owed && v.state != State::Failed)
                            .then(|| (f.name.clone(), v.version.clone()))
                    })
                })
                .collect()
        };
        for (f, v) in owed {
            log::info!("snapshot of {f}:{v} is missing or outdated; building it");
            self.spawn_build(&f, &v);
        }
    }

    /// Builds the snapshot of `name`:`version` in the background, unless a
    /// build for it is already running (that build notices a changed spec
    /// when it ends and builds again).
    pub fn spawn_build(self: &Arc<Functions>, name: &str, version: &str) {
        let key = (name.to_string(), version.to_string());
        if !self
            .building
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.clone())
        {
            return;
        }
        let fns = self.clone();
        tokio::spawn(async move {
            loop {
                let again = fns.build_once(&key.0, &key.1).await;
                if !again {
                    break;
                }
            }
            fns.building
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&key);
        });
    }

    /// One snapshot build; true if the spec changed meanwhile and another
    /// build is owed.
    async fn build_once(&self, name: &str, version: &str) -> bool {
        let Ok(_slot) = self.build_slots.acquire().await else {
            return false;
        };
        let Some((v, generation)) = self.lock().get(name).and_then(|f| {
            f.versions.get(version).map(|v| {
                let g = v.snapshot.as_ref().map_or(0, |s| s.generation) + 1;
                (v.clone(), g)
            })
        }) else {
            return false; // deleted meanwhile
        };
        let dir = self.store.snapshot_dir(name, version, generation);
        let started = std::time::Instant::now();
        let outcome = match self.builder.build(name, &v, &dir).await {
            Ok(built) => {
                log::info!(
                    "snapshot of {name}:{version} ready in {:.1} s (init {} ms)",
                    started.elapsed().as_secs_f64(),
                    built.init_duration_ms
                );
                Ok(SnapshotRef {
                    dir: dir.clone(),
                    generation,
                    init_duration_ms: built.init_duration_ms,
                    network: built.network,
                })
            }
            Err(e) => {
                log::warn!(
                    "snapshot of {name}:{version} failed: {}: {e}",
                    e.reason_code()
                );
                let _ = std::fs::remove_dir_all(&dir);
                Err(e)
            }
        };
        self.record_build(name, version, &v, &dir, outcome)
    }

    /// Stores what the build of `built_from` into `dir` gave, unless the
    /// version changed meanwhile (then the snapshot is dropped and true
    /// says another build is owed).
    fn record_build(
        &self,
        name: &str,
        version: &str,
        built_from: &VersionRecord,
        dir: &Path,
        outcome: Result<SnapshotRef, BuildFailure>,
    ) -> bool {
        let mut old_dir = None;
        let again = self.write(|| {
            let Some(mut copy) = self.lock().get(name).cloned() else {
                let _ = std::fs::remove_dir_all(dir);
                return false;
            };
            let Some(cur) = copy.versions.get_mut(version) else {
                let _ = std::fs::remove_dir_all(dir);
                return false;
            };
            let changed = cur.spec != built_from.spec;
            let built = outcome.is_ok();
            match outcome {
                Ok(snap) if !changed => {
                    old_dir = cur.snapshot.replace(snap).map(|s| s.dir);
                    cur.state = State::Active;
                    cur.state_reason = None;
                    cur.state_reason_code = None;
                    cur.update_in_progress = false;
                }
                Ok(_) => old_dir = Some(dir.to_path_buf()),
                Err(e) if !changed => {
                    if cur.snapshot.is_none() {
                        cur.state = State::Failed;
                    }
                    cur.state_reason_code = Some(e.reason_code().to_string());
                    cur.state_reason = Some(e.to_string());
                    cur.update_in_progress = false;
                }
                Err(_) => {}
            }
            if let Err(e) = self.store.save_function(&copy) {
                // Memory stays as the disk has it: the version is still
                // pending there, and this snapshot is not used.
                log::error!(
                    "cannot save function {name} after its build: {e}; the build is discarded"
                );
                if built && !changed {
                    old_dir = Some(dir.to_path_buf());
                }
                false
            } else {
                self.lock().insert(name.to_string(), copy);
                changed
            }
        });
        if let Some(old) = old_dir {
            // Running clones keep their mappings of the unlinked files.
            let _ = std::fs::remove_dir_all(old);
        }
        again
    }
}
