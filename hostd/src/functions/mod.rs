//! The functions part of the daemon: the records of functions, their
//! versions and aliases ([`records`]), the code they are made from, and
//! each version's snapshot ([`build`], booted by [`vm_build`]), with the
//! environment its runtime gets ([`runtime`]).
//!
//! Its errors are [`FunctionError`]s; they become Lambda's HTTP answers
//! only at the API edge.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Semaphore;

use crate::model::*;
use crate::store::Store;

pub mod build;
mod error;
pub mod records;
pub mod runtime;
#[cfg(test)]
mod tests;
pub mod vm_build;

pub use build::{BuildFailure, Built, SnapshotBuilder};
pub use error::FunctionError;
pub use records::{now_rfc3339, SpecInput};
pub use runtime::{machine_for, FUNCTION_GID, FUNCTION_UID};

/// What the functions part is told of the host.
#[derive(Debug, Clone)]
pub struct Settings {
    pub region: String,
    pub account: String,
    pub kernel: PathBuf,
    /// The root filesystem per runtime: a runtime without one is not available.
    pub rootfs: BTreeMap<RuntimeKind, PathBuf>,
    pub init_timeout: Duration,
    /// Snapshot builds (guest boots) at once.
    pub parallel_builds: usize,
    /// Whether functions may mount volumes (a volume service is configured).
    pub volume_service: bool,
}

impl Settings {
    pub fn of(cfg: &crate::daemon::Config) -> Settings {
        Settings {
            region: cfg.region.clone(),
            account: cfg.account.clone(),
            kernel: cfg.kernel.clone(),
            rootfs: cfg.rootfs.clone(),
            init_timeout: cfg.init_timeout,
            parallel_builds: cfg.parallel_builds,
            volume_service: cfg.volume_service.is_some(),
        }
    }
}

pub struct Functions {
    settings: Settings,
    store: Store,
    /// The records as stored; held only to read or replace one, never
    /// across a disk write, so readers never wait for an fsync.
    records: Mutex<BTreeMap<String, FunctionRecord>>,
    /// Held by whoever writes a record (a function's, or the address
    /// reservations), from reading it to replacing it once it is stored:
    /// writes of records happen one at a time.
    writes: Mutex<()>,
    /// (function, version) pairs with a snapshot build running.
    building: Mutex<HashSet<(String, String)>>,
    build_slots: Semaphore,
    builder: Arc<dyn SnapshotBuilder>,
}

impl Functions {
    /// The stored records, but those that cannot be used (skipped with a
    /// log line).
    pub fn load(store: &Store) -> std::io::Result<BTreeMap<String, FunctionRecord>> {
        let (records, bad) = store.load_functions()?;
        for b in bad {
            log::error!("skipping unreadable function record {b}");
        }
        Ok(records
            .into_iter()
            .filter(|f| {
                let ok = f.versions.contains_key(LATEST) && validate_function_name(&f.name).is_ok();
                if !ok {
                    log::error!(
                        "skipping function record {:?}: no $LATEST or a bad name",
                        f.name
                    );
                }
                ok
            })
            .map(|f| (f.name.clone(), f))
            .collect())
    }

    /// The functions part over `records` (as [`Functions::load`] gives
    /// them); `builder` makes the versions' snapshots.
    pub fn new(
        settings: Settings,
        store: Store,
        records: BTreeMap<String, FunctionRecord>,
        builder: Arc<dyn SnapshotBuilder>,
    ) -> Functions {
        Functions {
            build_slots: Semaphore::new(settings.parallel_builds.max(1)),
            settings,
            store,
            records: Mutex::new(records),
            writes: Mutex::new(()),
            building: Mutex::new(HashSet::new()),
            builder,
        }
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, FunctionRecord>> {
        self.records.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f`, a write of records, alone among writes and off the async
    /// workers (it waits for the disk).
    pub(crate) fn write<T>(&self, f: impl FnOnce() -> T) -> T {
        ember_store::blocking(|| {
            let _w = self.writes.lock().unwrap_or_else(|p| p.into_inner());
            f()
        })
    }

    pub fn function_arn(&self, name: &str, qualifier: Option<&str>) -> String {
        let base = format!(
            "arn:aws:lambda:{}:{}:function:{name}",
            self.settings.region, self.settings.account
        );
        match qualifier {
            Some(q) => format!("{base}:{q}"),
            None => base,
        }
    }

    /// A copy of one function's record.
    pub fn get(&self, name: &str) -> Result<FunctionRecord, FunctionError> {
        self.lock()
            .get(name)
            .cloned()
            .ok_or_else(|| self.not_found(name))
    }

    pub fn list(&self) -> Vec<FunctionRecord> {
        self.lock().values().cloned().collect()
    }

    fn not_found(&self, name: &str) -> FunctionError {
        FunctionError::NotFound {
            arn: self.function_arn(name, None),
        }
    }

    /// Applies `f` to the record of `name` and stores the result; on an
    /// error nothing changes.
    pub(crate) fn modify<T>(
        &self,
        name: &str,
        f: impl FnOnce(&mut FunctionRecord) -> Result<T, FunctionError>,
    ) -> Result<T, FunctionError> {
        self.write(|| {
            let mut copy = self.get(name)?;
            let out = f(&mut copy)?;
            self.save(&copy)?;
            self.lock().insert(name.to_string(), copy);
            Ok(out)
        })
    }

    fn save(&self, rec: &FunctionRecord) -> Result<(), FunctionError> {
        self.store
            .save_function(rec)
            .map_err(|source| FunctionError::Save {
                name: rec.name.clone(),
                source,
            })
    }
}
