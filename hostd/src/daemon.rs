//! The daemon: where its parts are made and wired together. Each part
//! owns its concern: [`Functions`] the records and builds, [`Pools`] the
//! warm instances, [`AsyncQueue`] the async invocations, `incoming` the
//! migrations to this host.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::functions::vm_build::VmBuilder;
use crate::functions::{FunctionError, Functions, Settings};
use crate::model::*;
use crate::pool::Pools;
use crate::queue::AsyncQueue;
use crate::store::Store;
use crate::vm::LaunchConfig;
use crate::volumes::Volumes;

#[derive(Debug, Clone)]
pub struct Config {
    pub state_dir: PathBuf,
    pub launch: LaunchConfig,
    pub kernel: PathBuf,
    pub rootfs: BTreeMap<RuntimeKind, PathBuf>,
    pub region: String,
    pub account: String,
    /// Idle instances kept per version unless its provisioned concurrency says otherwise.
    pub default_warm: u32,
    /// Invocations running at once per function, unless reserved concurrency says otherwise.
    pub default_concurrency: u32,
    pub idle_ttl: Duration,
    pub init_timeout: Duration,
    /// Snapshot builds (guest boots) at once.
    pub parallel_builds: usize,
    pub async_workers: usize,
    /// Delay before the first async retry; doubles for the second.
    pub async_retry_delay: Duration,
    /// Instance networking (None: instances have no network device).
    pub network: Option<Arc<crate::net::NetManager>>,
    /// The volume service attachments are asked of.
    pub volume_service: Option<crate::volumes::VolumeService>,
    /// How this host reaches its peers and they reach it, for migrations
    /// (None: no TCP API, so no migrations).
    pub peers: Option<crate::migrate::PeerConfig>,
    /// `ember-export`, which serves a migrating instance's disk.
    pub export_bin: PathBuf,
}

pub struct Daemon {
    pub cfg: Config,
    pub store: Store,
    /// The function, version and alias records, and their snapshot builds.
    pub functions: Arc<Functions>,
    pub pools: Arc<Pools>,
    /// Functions' volumes (None: no volume service).
    pub volumes: Option<Arc<Volumes>>,
    pub queue: AsyncQueue,
    /// Logical addresses reserved per account.
    pub(crate) reservations: Mutex<BTreeMap<String, crate::net::LogicalNet>>,
    /// Set by a drain: no instances are restored to fill warm pools.
    draining: std::sync::atomic::AtomicBool,
    /// Migrations to this host.
    pub incoming: crate::migrate::Incoming,
}

impl Daemon {
    /// Loads the stored state. Versions without a usable snapshot get one
    /// built in the background by [`Daemon::start`].
    pub fn open(cfg: Config) -> std::io::Result<Arc<Daemon>> {
        let store = Store::open(&cfg.state_dir)?;
        let records = Functions::load(&store)?;
        let queue = AsyncQueue::open(store.async_dir())?;
        let reservations = crate::net::load_reservations(&store)?;
        let volumes = cfg
            .volume_service
            .clone()
            .map(|s| Arc::new(Volumes::new(s)));
        Ok(Arc::new_cyclic(|me| Daemon {
            reservations: Mutex::new(reservations),
            // Snapshots are built with the daemon's network and volumes.
            functions: Arc::new(Functions::new(
                Settings::of(&cfg),
                store.clone(),
                records,
                Arc::new(VmBuilder::new(me.clone())),
            )),
            pools: Arc::new(Pools::new(crate::pool::VmRestorer::new(
                &cfg,
                volumes.clone(),
            ))),
            volumes,
            cfg,
            store,
            queue,
            draining: Default::default(),
            incoming: Default::default(),
        }))
    }

    /// Starts background work: snapshot builds still owed, the pool
    /// maintainer and the async workers.
    pub fn start(self: &Arc<Daemon>) {
        self.functions.build_owed();
        crate::pool::start_maintainer(self.clone());
        crate::queue::start_workers(self.clone());
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn set_draining(&self, on: bool) {
        self.draining
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// DeleteFunction: the function's records (or one version's), then
    /// their warm instances.
    pub fn delete_function(
        &self,
        name: &str,
        qualifier: Option<&str>,
    ) -> Result<(), FunctionError> {
        self.functions.delete(name, qualifier)?;
        match qualifier {
            None => self.pools.retire_function(name),
            Some(q) => self.pools.retire(name, q),
        }
        Ok(())
    }
}
