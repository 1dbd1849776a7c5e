//! Warm pools: per function version, idle instances restored from its
//! snapshot, reused for the next invocation; more are restored under
//! concurrency up to a limit; idle ones past their time-to-live are
//! reclaimed; dead ones are replaced.
//!
//! A pool only restores, watches and destroys instances, through the
//! narrow [`Restorer`] and [`Pooled`] traits: [`VmRestorer`] and
//! [`Instance`] are the real ones (exercised with a real guest by the
//! hostd integration tests), and the unit tests below drive the pool's
//! planning with a fake.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::model::{FunctionRecord, SnapshotRef, State, VersionRecord};
use crate::vm::{Instance, InstanceError, LaunchConfig, VmFiles};
use crate::volumes::Volumes;
use crate::{daemon::Daemon, functions::machine_for};
use ember_lambda::error::ApiError;

type Key = (String, String);

/// What a pool needs of an instance it holds.
pub trait Pooled: Send + Sync + 'static {
    fn id(&self) -> &str;
    /// `Some(reason)` once the instance has died.
    fn exited(&self) -> Option<String>;
    fn is_alive(&self) -> bool {
        self.exited().is_none()
    }
    /// Stops the instance and frees what it holds.
    fn destroy(&self) -> impl Future<Output = ()> + Send;
    fn info(&self) -> InstanceInfo;
}

/// Where a pool's new instances come from.
pub trait Restorer: Send + Sync + 'static {
    type Instance: Pooled;
    /// A running clone of `source`'s snapshot.
    fn restore(
        &self,
        source: &Source,
    ) -> impl Future<Output = Result<Self::Instance, InstanceError>> + Send;
}

/// Why an instance could not be had.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error(
        "Rate Exceeded: {function} already runs {limit} concurrent invocations (its concurrency limit)"
    )]
    Throttled { function: String, limit: u32 },
    #[error("could not restore a microVM for {function}:{version}: {error}")]
    Restore {
        function: String,
        version: String,
        #[source]
        error: Box<InstanceError>,
    },
}

struct Idle<I> {
    inst: Arc<I>,
    since: Instant,
}

struct Pool<I> {
    generation: u64,
    idle: VecDeque<Idle<I>>,
    /// Instances running an invocation.
    busy: Vec<Arc<I>>,
    /// Restores under way for invocations waiting on them.
    starting: u32,
    /// Restores under way to fill the warm pool.
    warming: u32,
    /// Instances on their way to another host (out of service meanwhile).
    migrating: Vec<Arc<I>>,
    /// Busy instances to migrate once their invocation ends.
    leaving: HashSet<String>,
    /// Ones of those that ended it: in `migrating`, not yet taken.
    left: HashSet<String>,
}

impl<I> Default for Pool<I> {
    fn default() -> Self {
        Pool {
            generation: 0,
            idle: VecDeque::new(),
            busy: Vec::new(),
            starting: 0,
            warming: 0,
            migrating: Vec::new(),
            leaving: HashSet::new(),
            left: HashSet::new(),
        }
    }
}

/// How long a failed warming restore holds its slot, so that a broken
/// version is not restored in a tight loop.
const WARM_RETRY_DELAY: Duration = Duration::from_secs(5);

pub struct Pools<R: Restorer = VmRestorer> {
    restorer: R,
    inner: Mutex<HashMap<Key, Pool<R::Instance>>>,
    warm_retry_delay: Duration,
}

/// What serves one invocation; give it back with [`Pools::release`].
pub struct Lease<I = Instance> {
    pub inst: Arc<I>,
    pub generation: u64,
    /// True if the instance was restored for this invocation.
    pub restored: bool,
}

/// How to make new instances of one version.
#[derive(Clone)]
pub struct Source {
    pub files: VmFiles,
    pub snapshot: SnapshotRef,
    pub mem_mib: u32,
    pub vcpus: u32,
    pub network: Option<crate::net::NetRequest>,
    /// The volume each instance mounts.
    pub file_system: Option<crate::model::FileSystem>,
    /// Each instance's `/tmp` disk is a copy of the snapshot's.
    pub tmp_disk: bool,
}

impl Source {
    pub fn of(d: &Daemon, f: &FunctionRecord, v: &VersionRecord) -> Result<Source, ApiError> {
        let snapshot = v
            .snapshot
            .clone()
            .ok_or_else(|| ApiError::service("version has no snapshot"))?;
        let (vcpus, mem_mib) = machine_for(v.spec.memory_mib);
        Ok(Source {
            files: d.functions.vm_files(&v.spec)?,
            snapshot,
            mem_mib,
            vcpus,
            network: d.clone_network(f, v),
            file_system: v.spec.file_system.clone(),
            tmp_disk: v.spec.ephemeral_mib.is_some(),
        })
    }
}

/// Restores real microVMs from snapshots.
pub struct VmRestorer {
    launch: LaunchConfig,
    volumes: Option<Arc<Volumes>>,
}

impl VmRestorer {
    pub fn new(cfg: &crate::daemon::Config, volumes: Option<Arc<Volumes>>) -> VmRestorer {
        VmRestorer {
            launch: cfg.launch.clone(),
            volumes,
        }
    }
}

impl Restorer for VmRestorer {
    type Instance = Instance;

    /// A clone with a volume attaches it to this host first (refused
    /// while another host holds it) and mounts it before it serves.
    async fn restore(&self, source: &Source) -> Result<Instance, InstanceError> {
        let volume = match (&source.file_system, &self.volumes) {
            (None, _) => None,
            (Some(_), None) => {
                return Err(InstanceError::Spawn(
                    "the function has a volume but this host no volume service".into(),
                ))
            }
            (Some(fs), Some(vs)) => Some(
                vs.attach_clone(fs, source.tmp_disk)
                    .await
                    .map_err(|e| InstanceError::Spawn(format!("volume {}: {e}", fs.volume)))?,
            ),
        };
        let inst = Instance::restore(
            &self.launch,
            &source.files,
            &source.snapshot.dir,
            source.mem_mib,
            source.vcpus,
            source.network.as_ref(),
            volume.as_ref().map(|v| &v.grant),
            source.tmp_disk.then_some(source.snapshot.dir.as_path()),
        )
        .await?;
        if let Some(v) = volume {
            if let Err(e) = inst.run_in_guest(v.mount_script).await {
                inst.destroy().await;
                return Err(e);
            }
        }
        Ok(inst)
    }
}

impl Pooled for Instance {
    fn id(&self) -> &str {
        &self.id
    }

    fn exited(&self) -> Option<String> {
        Instance::exited(self)
    }

    fn destroy(&self) -> impl Future<Output = ()> + Send {
        Instance::destroy(self)
    }

    fn info(&self) -> InstanceInfo {
        InstanceInfo {
            id: self.id.clone(),
            pid: self.pid(),
            age_ms: self.started.elapsed().as_millis() as u64,
            physical_address: self.physical_address,
        }
    }
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct PoolStats {
    pub function_name: String,
    pub version: String,
    pub generation: u64,
    pub idle: Vec<InstanceInfo>,
    pub busy: Vec<InstanceInfo>,
    pub starting: u32,
    pub warming: u32,
    pub migrating: Vec<InstanceInfo>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct InstanceInfo {
    pub id: String,
    pub pid: Option<u32>,
    pub age_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub physical_address: Option<std::net::Ipv4Addr>,
}

fn destroy_later<I: Pooled>(inst: Arc<I>) {
    tokio::spawn(async move { inst.destroy().await });
}

impl<R: Restorer> Pools<R> {
    pub fn new(restorer: R) -> Pools<R> {
        Pools {
            restorer,
            inner: Mutex::default(),
            warm_retry_delay: WARM_RETRY_DELAY,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Pool<R::Instance>>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An instance for one invocation: an idle one, or a new clone, if
    /// fewer than `limit` invocations of the function run; otherwise a
    /// throttle error.
    pub async fn acquire(
        &self,
        function: &str,
        version: &str,
        source: &Source,
        limit: u32,
    ) -> Result<Lease<R::Instance>, PoolError> {
        let key = (function.to_string(), version.to_string());
        {
            let mut pools = self.lock();
            // As Lambda's reserved concurrency: running invocations of the
            // whole function, all versions, count against the limit.
            let running: u32 = pools
                .iter()
                .filter(|(k, _)| k.0 == function)
                .map(|(_, p)| p.busy.len() as u32 + p.starting)
                .sum();
            if running >= limit {
                return Err(PoolError::Throttled {
                    function: function.to_string(),
                    limit,
                });
            }
            let pool = pools.entry(key.clone()).or_default();
            if pool.generation != source.snapshot.generation {
                // A newer snapshot: older instances are not reused.
                pool.generation = source.snapshot.generation;
                pool.idle.drain(..).for_each(|i| destroy_later(i.inst));
            }
            while let Some(idle) = pool.idle.pop_back() {
                if idle.inst.is_alive() {
                    pool.busy.push(idle.inst.clone());
                    return Ok(Lease {
                        inst: idle.inst,
                        generation: pool.generation,
                        restored: false,
                    });
                }
                destroy_later(idle.inst);
            }
            pool.starting += 1;
        }
        if source.file_system.is_some() {
            // One instance at a time mounts a volume: idle ones of other
            // versions go before this one mounts it.
            let others: Vec<Arc<R::Instance>> = self
                .lock()
                .iter_mut()
                .filter(|(k, _)| k.0 == function)
                .flat_map(|(_, p)| p.idle.drain(..).map(|i| i.inst).collect::<Vec<_>>())
                .collect();
            for i in others {
                i.destroy().await;
            }
        }
        let restored = self.restorer.restore(source).await;
        let mut pools = self.lock();
        let pool = pools.entry(key).or_default();
        pool.starting = pool.starting.saturating_sub(1);
        match restored {
            Ok(inst) => {
                let inst = Arc::new(inst);
                pool.busy.push(inst.clone());
                Ok(Lease {
                    inst,
                    generation: source.snapshot.generation,
                    restored: true,
                })
            }
            Err(error) => Err(PoolError::Restore {
                function: function.to_string(),
                version: version.to_string(),
                error: Box::new(error),
            }),
        }
    }

    /// Returns a leased instance: back to the idle list if `reusable`,
    /// alive and of the current snapshot; destroyed otherwise.
    pub fn release(
        &self,
        function: &str,
        version: &str,
        lease: Lease<R::Instance>,
        reusable: bool,
    ) {
        let key = (function.to_string(), version.to_string());
        let mut pools = self.lock();
        let Some(pool) = pools.get_mut(&key) else {
            destroy_later(lease.inst);
            return;
        };
        pool.busy.retain(|i| !Arc::ptr_eq(i, &lease.inst));
        if pool.leaving.remove(lease.inst.id()) && reusable && lease.inst.is_alive() {
            pool.left.insert(lease.inst.id().to_string());
            pool.migrating.push(lease.inst);
        } else if reusable && lease.inst.is_alive() && lease.generation == pool.generation {
            pool.idle.push_back(Idle {
                inst: lease.inst,
                since: Instant::now(),
            });
        } else {
            destroy_later(lease.inst);
        }
    }

    /// Destroys the idle instances of one version and forgets the pool
    /// (busy ones are destroyed when released).
    pub fn retire(&self, function: &str, version: &str) {
        if let Some(pool) = self
            .lock()
            .remove(&(function.to_string(), version.to_string()))
        {
            pool.idle.into_iter().for_each(|i| destroy_later(i.inst));
        }
    }

    pub fn retire_function(&self, function: &str) {
        let keys: Vec<Key> = self
            .lock()
            .keys()
            .filter(|k| k.0 == function)
            .cloned()
            .collect();
        for k in keys {
            self.retire(&k.0, &k.1);
        }
    }

    /// Takes instance `id` out of service to migrate it: at once if idle
    /// (`Taken`); if busy, once its invocation ends (`Busy` now; `Taken`
    /// when asked again after that).
    pub fn take_for_migration(&self, id: &str) -> Taking<R::Instance> {
        let mut pools = self.lock();
        for ((f, v), pool) in pools.iter_mut() {
            let key = (f.clone(), v.clone());
            if let Some(i) = pool.migrating.iter().find(|i| i.id() == id) {
                return if pool.left.remove(id) {
                    Taking::Taken(key, i.clone())
                } else {
                    Taking::InProgress
                };
            }
            if let Some(pos) = pool.idle.iter().position(|i| i.inst.id() == id) {
                let Some(idle) = pool.idle.remove(pos) else {
                    continue;
                };
                pool.migrating.push(idle.inst.clone());
                return Taking::Taken(key, idle.inst);
            }
            if pool.busy.iter().any(|i| i.id() == id) {
                pool.leaving.insert(id.to_string());
                return Taking::Busy;
            }
        }
        Taking::Gone
    }

    /// Instance `id` if it is being migrated away.
    pub fn migrating(&self, id: &str) -> Option<Arc<R::Instance>> {
        self.lock()
            .values()
            .find_map(|p| p.migrating.iter().find(|i| i.id() == id).cloned())
    }

    /// A caller stops waiting for busy instance `id`: it stays here.
    pub fn abandon(&self, id: &str) {
        let left = {
            let mut pools = self.lock();
            pools
                .values_mut()
                .any(|p| p.leaving.remove(id) | p.left.remove(id))
        };
        if left {
            self.migration_ended(id, false);
        }
    }

    /// The migration of `id` ended: `Some(inst)` (the VM moved away; the
    /// caller destroys it) or, with `moved` false, back to the idle list.
    pub fn migration_ended(&self, id: &str, moved: bool) -> Option<Arc<R::Instance>> {
        let mut pools = self.lock();
        for pool in pools.values_mut() {
            let Some(pos) = pool.migrating.iter().position(|i| i.id() == id) else {
                continue;
            };
            let inst = pool.migrating.remove(pos);
            if moved || !inst.is_alive() {
                return Some(inst);
            }
            pool.idle.push_back(Idle {
                inst,
                since: Instant::now(),
            });
            return None;
        }
        None
    }

    /// An instance migrated here joins the idle list of its version.
    pub fn adopt(&self, function: &str, version: &str, generation: u64, inst: Arc<R::Instance>) {
        let mut pools = self.lock();
        let pool = pools
            .entry((function.to_string(), version.to_string()))
            .or_default();
        if pool.generation == 0 {
            pool.generation = generation;
        }
        pool.idle.push_back(Idle {
            inst,
            since: Instant::now(),
        });
    }

    /// Ids of every instance of every pool (idle, busy and migrating).
    pub fn instance_ids(&self) -> Vec<String> {
        let pools = self.lock();
        pools
            .values()
            .flat_map(|p| {
                p.idle
                    .iter()
                    .map(|i| i.inst.id().to_string())
                    .chain(p.busy.iter().map(|i| i.id().to_string()))
                    .chain(p.migrating.iter().map(|i| i.id().to_string()))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    pub fn stats(&self) -> Vec<PoolStats> {
        let pools = self.lock();
        let mut out: Vec<PoolStats> = pools
            .iter()
            .map(|((f, v), p)| PoolStats {
                function_name: f.clone(),
                version: v.clone(),
                generation: p.generation,
                idle: p.idle.iter().map(|i| i.inst.info()).collect(),
                busy: p.busy.iter().map(|i| i.info()).collect(),
                starting: p.starting,
                warming: p.warming,
                migrating: p.migrating.iter().map(|i| i.info()).collect(),
            })
            .collect();
        out.sort_by(|a, b| (&a.function_name, &a.version).cmp(&(&b.function_name, &b.version)));
        out
    }

    /// Destroys every instance (daemon shutdown).
    pub async fn shutdown(&self) {
        let all: Vec<Arc<R::Instance>> = {
            let mut pools = self.lock();
            pools
                .drain()
                .flat_map(|(_, p)| {
                    p.idle
                        .into_iter()
                        .map(|i| i.inst)
                        .chain(p.busy)
                        .chain(p.migrating)
                        .collect::<Vec<_>>()
                })
                .collect()
        };
        // All at once: each waits for its VMM, and a stuck one must not
        // hold up the others.
        let mut set = tokio::task::JoinSet::new();
        for i in all {
            set.spawn(async move { i.destroy().await });
        }
        while set.join_next().await.is_some() {}
    }

    /// One maintenance pass over a version's pool, as of `now`: drop dead
    /// idle instances, reclaim those idle past `ttl` beyond the `warm`
    /// count, and say how many restores are needed to get back to `warm`
    /// instances (idle or busy). Those restores count as warming from
    /// here on: start them with [`Pools::warm`].
    fn maintain(&self, key: &Key, generation: u64, warm: u32, ttl: Duration, now: Instant) -> u32 {
        let mut pools = self.lock();
        let pool = pools.entry(key.clone()).or_default();
        if pool.generation != generation {
            pool.generation = generation;
            pool.idle.drain(..).for_each(|i| destroy_later(i.inst));
        }
        let mut kept = VecDeque::new();
        for idle in pool.idle.drain(..) {
            if let Some(reason) = idle.inst.exited() {
                log::warn!(
                    "idle instance {} of {}:{} died ({reason}); replacing it",
                    idle.inst.id(),
                    key.0,
                    key.1
                );
                destroy_later(idle.inst);
            } else {
                kept.push_back(idle);
            }
        }
        // Oldest first: reclaim from the front while above the warm count.
        while kept.len() as u32 > warm
            && kept
                .front()
                .is_some_and(|i| now.saturating_duration_since(i.since) > ttl)
        {
            if let Some(i) = kept.pop_front() {
                log::info!(
                    "reclaiming idle instance {} of {}:{}",
                    i.inst.id(),
                    key.0,
                    key.1
                );
                destroy_later(i.inst);
            }
        }
        pool.idle = kept;
        // As with Lambda's provisioned concurrency, busy instances count:
        // the warm count is how many are initialised, not how many idle.
        let have = pool.idle.len() as u32
            + pool.warming
            + pool.busy.len() as u32
            + pool.migrating.len() as u32;
        let need = warm.saturating_sub(have);
        pool.warming += need;
        need
    }

    /// Starts the `need` restores [`Pools::maintain`] asked for; each
    /// joins the idle list when done (unless a newer snapshot came
    /// meanwhile).
    fn warm(self: &Arc<Self>, key: &Key, source: &Source, need: u32) {
        for _ in 0..need {
            let pools = self.clone();
            let key = key.clone();
            let source = source.clone();
            tokio::spawn(async move {
                let inst = match pools.restorer.restore(&source).await {
                    Ok(i) => Some(i),
                    Err(e) => {
                        log::error!("warming {}:{} failed: {e}", key.0, key.1);
                        // Do not retry in a tight loop.
                        tokio::time::sleep(pools.warm_retry_delay).await;
                        None
                    }
                };
                pools.warmed(&key, inst, source.snapshot.generation);
            });
        }
    }

    fn warmed(&self, key: &Key, inst: Option<R::Instance>, generation: u64) {
        let mut pools = self.lock();
        let pool = pools.entry(key.clone()).or_default();
        pool.warming = pool.warming.saturating_sub(1);
        if let Some(inst) = inst {
            let inst = Arc::new(inst);
            if pool.generation == generation {
                pool.idle.push_back(Idle {
                    inst,
                    since: Instant::now(),
                });
            } else {
                destroy_later(inst);
            }
        }
    }
}

/// What [`Pools::take_for_migration`] found.
pub enum Taking<I = Instance> {
    Taken(Key, Arc<I>),
    /// Running an invocation; taken when it ends.
    Busy,
    /// Another migration has it.
    InProgress,
    Gone,
}

/// How many instances of version `v` of `f` to keep initialised, and of
/// which snapshot generation; None for a version with nothing to restore
/// (not active, or no snapshot).
fn warm_target(f: &FunctionRecord, v: &VersionRecord, default_warm: u32) -> Option<(u64, u32)> {
    if v.state != State::Active {
        return None;
    }
    let generation = v.snapshot.as_ref()?.generation;
    // A volume's function keeps the one instance it restores on demand,
    // no more (one writer).
    if v.spec.file_system.is_some() {
        return Some((generation, 0));
    }
    let warm = f
        .provisioned
        .get(&v.version)
        .copied()
        .or_else(|| {
            // Provisioned concurrency set on an alias counts for its version.
            f.aliases
                .values()
                .filter(|a| a.function_version == v.version)
                .find_map(|a| f.provisioned.get(&a.name).copied())
        })
        .unwrap_or(default_warm);
    Some((generation, warm))
}

/// Every second: keep each active version's pool at its warm count and
/// reclaim what is idle too long.
pub fn start_maintainer(d: Arc<Daemon>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            maintain_all(&d);
        }
    });
}

fn maintain_all(d: &Arc<Daemon>) {
    if d.is_draining() {
        // Instances are leaving this host: restore none to replace them.
        return;
    }
    let now = Instant::now();
    for f in d.functions.list() {
        for v in f.versions.values() {
            let Some((generation, warm)) = warm_target(&f, v, d.cfg.default_warm) else {
                continue;
            };
            let key = (f.name.clone(), v.version.clone());
            let need = d
                .pools
                .maintain(&key, generation, warm, d.cfg.idle_ttl, now);
            if need == 0 {
                continue;
            }
            match Source::of(d, &f, v) {
                Ok(source) => d.pools.warm(&key, &source, need),
                Err(e) => log::error!("cannot warm {}:{}: {e}", key.0, key.1),
            }
        }
    }
}

/// A fake [`Restorer`] for unit tests of the pool and its users.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    use tokio::sync::Semaphore;

    /// An instance that is only bookkeeping: it can be made to die, and
    /// says when it is destroyed.
    #[derive(Debug)]
    pub(crate) struct FakeVm {
        pub id: String,
        pub death: Mutex<Option<String>>,
        pub destroyed: Arc<Mutex<Vec<String>>>,
    }

    impl FakeVm {
        pub(crate) fn die(&self) {
            *self.death.lock().unwrap() = Some("killed by the test".into());
        }
    }

    impl Pooled for FakeVm {
        fn id(&self) -> &str {
            &self.id
        }
        fn exited(&self) -> Option<String> {
            self.death.lock().unwrap().clone()
        }
        async fn destroy(&self) {
            self.destroyed.lock().unwrap().push(self.id.clone());
        }
        fn info(&self) -> InstanceInfo {
            InstanceInfo {
                id: self.id.clone(),
                pid: None,
                age_ms: 0,
                physical_address: None,
            }
        }
    }

    /// Counts restores, fails them on demand, and (with a gate) holds
    /// each until the test lets it through.
    #[derive(Default)]
    pub(crate) struct Fake {
        pub restores: AtomicU32,
        pub fail: AtomicBool,
        pub gate: Option<Arc<Semaphore>>,
        pub destroyed: Arc<Mutex<Vec<String>>>,
    }

    impl Restorer for Fake {
        type Instance = FakeVm;
        async fn restore(&self, source: &Source) -> Result<FakeVm, InstanceError> {
            if let Some(gate) = &self.gate {
                gate.acquire().await.unwrap().forget();
            }
            let n = self.restores.fetch_add(1, Ordering::SeqCst) + 1;
            if self.fail.load(Ordering::SeqCst) {
                return Err(InstanceError::Spawn("the fake fails".into()));
            }
            Ok(FakeVm {
                id: format!("vm{n}-g{}", source.snapshot.generation),
                death: Mutex::new(None),
                destroyed: self.destroyed.clone(),
            })
        }
    }

    /// Pools over [`Fake`], retrying failed warming at once.
    pub(crate) fn fake_pools(fake: Fake) -> Pools<Fake> {
        Pools {
            warm_retry_delay: Duration::ZERO,
            ..Pools::new(fake)
        }
    }

    pub(crate) fn source(generation: u64) -> Source {
        Source {
            files: VmFiles {
                kernel: "/nonexistent/vmlinux".into(),
                rootfs: "/nonexistent/rootfs.ext4".into(),
                code: "/nonexistent/code.ext4".into(),
            },
            snapshot: SnapshotRef {
                dir: "/nonexistent/snap".into(),
                generation,
                init_duration_ms: 0,
                network: None,
            },
            mem_mib: 128,
            vcpus: 1,
            network: None,
            file_system: None,
            tmp_disk: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;
    use crate::model::{AliasRecord, FileSystem, LATEST};
    use std::sync::atomic::Ordering;
    use tokio::sync::Semaphore;

    fn pools() -> Pools<Fake> {
        fake_pools(Fake::default())
    }

    fn with_volume(mut s: Source) -> Source {
        s.file_system = Some(FileSystem {
            volume: "vol".into(),
            mount_path: "/mnt/vol".into(),
        });
        s
    }

    fn key(f: &str, v: &str) -> Key {
        (f.to_string(), v.to_string())
    }

    /// Lets spawned destroys and restores run (and their timers fire).
    async fn settle() {
        for _ in 0..3 {
            for _ in 0..20 {
                tokio::task::yield_now().await;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    fn destroyed(p: &Pools<Fake>) -> Vec<String> {
        let mut d = p.restorer.destroyed.lock().unwrap().clone();
        d.sort();
        d
    }

    fn restores(p: &Pools<Fake>) -> u32 {
        p.restorer.restores.load(Ordering::SeqCst)
    }

    fn idle_ids(p: &Pools<Fake>, f: &str, v: &str) -> Vec<String> {
        p.lock()
            .get(&key(f, v))
            .map(|p| p.idle.iter().map(|i| i.inst.id.clone()).collect())
            .unwrap_or_default()
    }

    /// Acquires and releases right away (the instance goes idle).
    async fn warm_one(p: &Pools<Fake>, f: &str, v: &str, s: &Source) -> String {
        let l = p.acquire(f, v, s, 100).await.unwrap();
        let id = l.inst.id.clone();
        p.release(f, v, l, true);
        id
    }

    /// `n` instances of `f`:`v` made idle, in the order of their release.
    async fn idle_several(p: &Pools<Fake>, f: &str, v: &str, s: &Source, n: usize) -> Vec<String> {
        let mut leases = Vec::new();
        for _ in 0..n {
            leases.push(p.acquire(f, v, s, 100).await.unwrap());
        }
        let ids = leases.iter().map(|l| l.inst.id.clone()).collect();
        for l in leases {
            p.release(f, v, l, true);
        }
        ids
    }

    #[tokio::test]
    async fn the_first_invocation_restores_and_the_next_reuses_it() {
        let p = pools();
        let s = source(1);
        let l = p.acquire("f", "1", &s, 10).await.unwrap();
        assert!(l.restored);
        assert_eq!(l.generation, 1);
        let id = l.inst.id.clone();
        p.release("f", "1", l, true);
        assert_eq!(idle_ids(&p, "f", "1"), std::slice::from_ref(&id));
        let l = p.acquire("f", "1", &s, 10).await.unwrap();
        assert!(!l.restored, "an idle instance is reused");
        assert_eq!(l.inst.id, id);
        assert_eq!(restores(&p), 1);
        assert!(idle_ids(&p, "f", "1").is_empty(), "busy now");
    }

    #[tokio::test]
    async fn the_most_recently_used_idle_instance_serves_first() {
        let p = pools();
        let s = source(1);
        let ids = idle_several(&p, "f", "1", &s, 2).await;
        // The oldest idle ones are left for the TTL to reclaim.
        assert_eq!(p.acquire("f", "1", &s, 10).await.unwrap().inst.id, ids[1]);
        assert_eq!(idle_ids(&p, "f", "1"), ids[..1]);
    }

    #[tokio::test]
    async fn an_unreusable_or_dead_instance_is_destroyed_on_release() {
        let p = pools();
        let s = source(1);
        let a = p.acquire("f", "1", &s, 10).await.unwrap();
        let b = p.acquire("f", "1", &s, 10).await.unwrap();
        let (a_id, b_id) = (a.inst.id.clone(), b.inst.id.clone());
        p.release("f", "1", a, false);
        b.inst.die();
        p.release("f", "1", b, true);
        settle().await;
        assert!(idle_ids(&p, "f", "1").is_empty());
        assert_eq!(destroyed(&p), [a_id, b_id]);
        assert!(p.instance_ids().is_empty());
    }

    #[tokio::test]
    async fn a_crashed_idle_instance_is_skipped_and_replaced_on_acquire() {
        let p = pools();
        let s = source(1);
        let l = p.acquire("f", "1", &s, 10).await.unwrap();
        let inst = l.inst.clone();
        p.release("f", "1", l, true);
        inst.die();
        let l = p.acquire("f", "1", &s, 10).await.unwrap();
        assert!(l.restored);
        assert_ne!(l.inst.id, inst.id);
        settle().await;
        assert_eq!(destroyed(&p), std::slice::from_ref(&inst.id));
    }

    #[tokio::test]
    async fn the_limit_counts_every_version_of_the_function() {
        let p = pools();
        let s = source(1);
        let _a = p.acquire("f", "1", &s, 2).await.unwrap();
        let _b = p.acquire("f", "$LATEST", &s, 2).await.unwrap();
        match p.acquire("f", "1", &s, 2).await {
            Err(PoolError::Throttled { function, limit }) => {
                assert_eq!((function.as_str(), limit), ("f", 2))
            }
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("a third invocation ran under a limit of 2"),
        }
        // Another function has a limit of its own.
        assert!(p.acquire("g", "1", &s, 2).await.is_ok());
        assert_eq!(restores(&p), 3, "a throttled call restores nothing");
    }

    #[tokio::test]
    async fn idle_instances_do_not_count_against_the_limit() {
        let p = pools();
        let s = source(1);
        warm_one(&p, "f", "1", &s).await;
        let l = p.acquire("f", "1", &s, 1).await.unwrap();
        assert!(!l.restored);
        assert!(matches!(
            p.acquire("f", "1", &s, 1).await,
            Err(PoolError::Throttled { .. })
        ));
    }

    #[tokio::test]
    async fn restores_under_way_count_against_the_limit() {
        let gate = Arc::new(Semaphore::new(0));
        let p = Arc::new(fake_pools(Fake {
            gate: Some(gate.clone()),
            ..Fake::default()
        }));
        let s = source(1);
        let first = {
            let (p, s) = (p.clone(), s.clone());
            tokio::spawn(async move { p.acquire("f", "1", &s, 1).await.map(|l| l.inst.id.clone()) })
        };
        settle().await;
        assert_eq!(p.stats()[0].starting, 1);
        assert!(
            matches!(
                p.acquire("f", "1", &s, 1).await,
                Err(PoolError::Throttled { limit: 1, .. })
            ),
            "a second invocation while the first one's restore runs"
        );
        gate.add_permits(1);
        let id = first.await.unwrap().unwrap();
        let st = &p.stats()[0];
        assert_eq!((st.starting, st.busy.len()), (0, 1));
        assert_eq!(st.busy[0].id, id);
    }

    #[tokio::test]
    async fn a_failed_restore_is_an_error_and_frees_its_slot() {
        let p = pools();
        let s = source(1);
        p.restorer.fail.store(true, Ordering::SeqCst);
        let e = p.acquire("f", "1", &s, 1).await.err().unwrap();
        assert!(matches!(e, PoolError::Restore { .. }));
        assert!(e.to_string().contains("f:1"), "{e}");
        assert!(e.to_string().contains("the fake fails"), "{e}");
        assert_eq!(p.stats()[0].starting, 0);
        p.restorer.fail.store(false, Ordering::SeqCst);
        assert!(p.acquire("f", "1", &s, 1).await.is_ok(), "the slot is free");
    }

    #[tokio::test]
    async fn a_newer_snapshot_retires_older_instances() {
        let p = pools();
        let old = warm_one(&p, "f", "1", &source(1)).await;
        let busy_old = p.acquire("f", "1", &source(1), 10).await.unwrap();
        assert_eq!(busy_old.inst.id, old);
        let idle_old = warm_one(&p, "f", "1", &source(1)).await;
        let l = p.acquire("f", "1", &source(2), 10).await.unwrap();
        assert!(l.restored, "an instance of the old snapshot is not reused");
        assert_eq!(l.generation, 2);
        settle().await;
        assert_eq!(destroyed(&p), std::slice::from_ref(&idle_old));
        // The busy one of the old snapshot goes when its invocation ends.
        p.release("f", "1", busy_old, true);
        p.release("f", "1", l, true);
        settle().await;
        assert_eq!(destroyed(&p), [old, idle_old]);
        assert_eq!(idle_ids(&p, "f", "1").len(), 1);
    }

    #[tokio::test]
    async fn a_volume_function_destroys_other_versions_idle_instances_first() {
        let p = pools();
        let s = with_volume(source(1));
        let other = warm_one(&p, "f", "1", &s).await;
        let unrelated = warm_one(&p, "g", "1", &source(1)).await;
        let l = p.acquire("f", LATEST, &s, 1).await.unwrap();
        assert!(l.restored);
        // Destroyed before the restore (awaited, not spawned).
        assert_eq!(destroyed(&p), [other]);
        assert_eq!(idle_ids(&p, "g", "1"), [unrelated]);
    }

    #[tokio::test]
    async fn maintenance_plans_restores_up_to_the_warm_count() {
        let p = pools();
        let k = key("f", "1");
        let now = Instant::now();
        let ttl = Duration::from_secs(60);
        assert_eq!(p.maintain(&k, 1, 3, ttl, now), 3);
        assert_eq!(
            p.maintain(&k, 1, 3, ttl, now),
            0,
            "restores under way are counted"
        );
        assert_eq!(p.stats()[0].warming, 3);
        p.warmed(&k, None, 1);
        assert_eq!(p.maintain(&k, 1, 3, ttl, now), 1, "a failed one is redone");
        assert_eq!(p.maintain(&k, 1, 0, ttl, now), 0);
    }

    #[tokio::test]
    async fn busy_and_migrating_instances_count_as_warm() {
        let p = pools();
        let s = source(1);
        let k = key("f", "1");
        let busy = p.acquire("f", "1", &s, 10).await.unwrap();
        let ids = idle_several(&p, "f", "1", &s, 2).await;
        assert!(matches!(p.take_for_migration(&ids[0]), Taking::Taken(..)));
        // One busy, one migrating, one idle.
        let now = Instant::now();
        assert_eq!(p.maintain(&k, 1, 4, Duration::from_secs(60), now), 1);
        drop(busy);
    }

    #[tokio::test]
    async fn idle_instances_past_their_ttl_are_reclaimed_oldest_first_down_to_the_warm_count() {
        let p = pools();
        let s = source(1);
        let k = key("f", "1");
        let ids = idle_several(&p, "f", "1", &s, 3).await;
        let ttl = Duration::from_secs(60);
        assert_eq!(p.maintain(&k, 1, 1, ttl, Instant::now()), 0);
        settle().await;
        assert!(destroyed(&p).is_empty(), "none idle past the TTL yet");
        let later = Instant::now() + 2 * ttl;
        assert_eq!(p.maintain(&k, 1, 1, ttl, later), 0);
        settle().await;
        assert_eq!(destroyed(&p), ids[..2]);
        assert_eq!(idle_ids(&p, "f", "1"), ids[2..]);
        // Never below the warm count, however old.
        assert_eq!(p.maintain(&k, 1, 1, ttl, later + ttl), 0);
        assert_eq!(idle_ids(&p, "f", "1").len(), 1);
    }

    #[tokio::test]
    async fn a_crashed_idle_instance_is_replaced_by_maintenance() {
        let p = pools();
        let s = source(1);
        let k = key("f", "1");
        let a = p.acquire("f", "1", &s, 10).await.unwrap();
        let b = p.acquire("f", "1", &s, 10).await.unwrap();
        let dead = a.inst.clone();
        p.release("f", "1", a, true);
        p.release("f", "1", b, true);
        dead.die();
        let need = p.maintain(&k, 1, 2, Duration::from_secs(60), Instant::now());
        assert_eq!(need, 1);
        settle().await;
        assert_eq!(destroyed(&p), std::slice::from_ref(&dead.id));
        assert_eq!(idle_ids(&p, "f", "1").len(), 1);
    }

    #[tokio::test]
    async fn warming_restores_join_the_idle_list() {
        let p = Arc::new(pools());
        let k = key("f", "1");
        let need = p.maintain(&k, 7, 2, Duration::from_secs(60), Instant::now());
        p.warm(&k, &source(7), need);
        settle().await;
        assert_eq!(restores(&p), 2);
        let st = &p.stats()[0];
        assert_eq!((st.idle.len(), st.warming), (2, 0));
        assert!(st.idle.iter().all(|i| i.id.ends_with("-g7")));
        let l = p.acquire("f", "1", &source(7), 1).await.unwrap();
        assert!(!l.restored, "the next invocation finds one warm");
    }

    #[tokio::test]
    async fn a_failed_warming_restore_is_tried_again_on_the_next_pass() {
        let p = Arc::new(pools());
        p.restorer.fail.store(true, Ordering::SeqCst);
        let k = key("f", "1");
        let ttl = Duration::from_secs(60);
        let need = p.maintain(&k, 1, 1, ttl, Instant::now());
        p.warm(&k, &source(1), need);
        settle().await;
        assert_eq!(p.stats()[0].warming, 0);
        assert!(idle_ids(&p, "f", "1").is_empty());
        p.restorer.fail.store(false, Ordering::SeqCst);
        let need = p.maintain(&k, 1, 1, ttl, Instant::now());
        assert_eq!(need, 1);
        p.warm(&k, &source(1), need);
        settle().await;
        assert_eq!(idle_ids(&p, "f", "1").len(), 1);
        assert_eq!(restores(&p), 2);
    }

    #[tokio::test]
    async fn a_warmed_instance_of_an_older_snapshot_is_destroyed() {
        let gate = Arc::new(Semaphore::new(0));
        let p = Arc::new(fake_pools(Fake {
            gate: Some(gate.clone()),
            ..Fake::default()
        }));
        let k = key("f", "1");
        let ttl = Duration::from_secs(60);
        let need = p.maintain(&k, 1, 1, ttl, Instant::now());
        p.warm(&k, &source(1), need);
        settle().await;
        // A new snapshot lands while the restore runs.
        p.maintain(&k, 2, 0, ttl, Instant::now());
        gate.add_permits(1);
        settle().await;
        assert_eq!(destroyed(&p), ["vm1-g1"]);
        assert!(idle_ids(&p, "f", "1").is_empty());
        assert_eq!(p.stats()[0].warming, 0);
    }

    #[tokio::test]
    async fn retiring_a_version_destroys_its_instances() {
        let p = pools();
        let s = source(1);
        let busy = p.acquire("f", "1", &s, 10).await.unwrap();
        let busy_id = busy.inst.id.clone();
        let idle = warm_one(&p, "f", "1", &s).await;
        let kept = warm_one(&p, "f", "2", &s).await;
        p.retire("f", "1");
        settle().await;
        assert_eq!(destroyed(&p), std::slice::from_ref(&idle));
        // Its busy instance goes when the invocation ends.
        p.release("f", "1", busy, true);
        settle().await;
        let mut both = vec![idle, busy_id];
        both.sort();
        assert_eq!(destroyed(&p), both);
        assert_eq!(p.instance_ids(), [kept]);
    }

    #[tokio::test]
    async fn retiring_a_function_leaves_other_functions_alone() {
        let p = pools();
        let s = source(1);
        warm_one(&p, "f", "1", &s).await;
        warm_one(&p, "f", LATEST, &s).await;
        let g = warm_one(&p, "g", "1", &s).await;
        p.retire_function("f");
        settle().await;
        assert_eq!(destroyed(&p).len(), 2);
        assert_eq!(p.instance_ids(), [g]);
        let st = p.stats();
        assert_eq!(st.len(), 1);
        assert_eq!(st[0].function_name, "g");
    }

    #[tokio::test]
    async fn an_idle_instance_is_taken_for_migration_at_once() {
        let p = pools();
        let id = warm_one(&p, "f", "1", &source(1)).await;
        match p.take_for_migration(&id) {
            Taking::Taken(k, i) => {
                assert_eq!(k, key("f", "1"));
                assert_eq!(i.id, id);
            }
            _ => panic!("not taken"),
        }
        assert!(matches!(p.take_for_migration(&id), Taking::InProgress));
        assert!(p.migrating(&id).is_some());
        // Out of service meanwhile.
        assert!(p.acquire("f", "1", &source(1), 10).await.unwrap().restored);
        let moved = p.migration_ended(&id, true).unwrap();
        assert_eq!(moved.id, id);
        assert!(p.migrating(&id).is_none());
        assert!(!p.instance_ids().contains(&id));
        assert!(matches!(p.take_for_migration(&id), Taking::Gone));
    }

    #[tokio::test]
    async fn a_busy_instance_is_taken_once_its_invocation_ends() {
        let p = pools();
        let l = p.acquire("f", "1", &source(1), 10).await.unwrap();
        let id = l.inst.id.clone();
        assert!(matches!(p.take_for_migration(&id), Taking::Busy));
        assert!(matches!(p.take_for_migration(&id), Taking::Busy));
        p.release("f", "1", l, true);
        assert!(idle_ids(&p, "f", "1").is_empty(), "it leaves, not idles");
        assert!(matches!(p.take_for_migration(&id), Taking::Taken(..)));
        // A failed migration puts it back in service.
        assert!(p.migration_ended(&id, false).is_none());
        assert_eq!(idle_ids(&p, "f", "1"), [id]);
    }

    #[tokio::test]
    async fn an_abandoned_migration_leaves_the_instance_in_service() {
        let p = pools();
        let a = p.acquire("f", "1", &source(1), 10).await.unwrap();
        let b = p.acquire("f", "1", &source(1), 10).await.unwrap();
        let (a_id, b_id) = (a.inst.id.clone(), b.inst.id.clone());
        assert!(matches!(p.take_for_migration(&a_id), Taking::Busy));
        assert!(matches!(p.take_for_migration(&b_id), Taking::Busy));
        // Given up before the invocation ended ...
        p.abandon(&a_id);
        p.release("f", "1", a, true);
        // ... and after it ended, before it was taken.
        p.release("f", "1", b, true);
        p.abandon(&b_id);
        let mut idle = idle_ids(&p, "f", "1");
        idle.sort();
        assert_eq!(idle, [a_id, b_id]);
        assert!(p.stats()[0].migrating.is_empty());
    }

    #[tokio::test]
    async fn a_dead_instance_does_not_come_back_from_a_failed_migration() {
        let p = pools();
        let id = warm_one(&p, "f", "1", &source(1)).await;
        let Taking::Taken(_, inst) = p.take_for_migration(&id) else {
            panic!("not taken")
        };
        inst.die();
        assert!(
            p.migration_ended(&id, false).is_some(),
            "the caller destroys it"
        );
        assert!(p.instance_ids().is_empty());
    }

    #[tokio::test]
    async fn an_adopted_instance_serves_the_next_invocation() {
        let p = pools();
        let inst = Arc::new(FakeVm {
            id: "migrated".into(),
            death: Mutex::new(None),
            destroyed: p.restorer.destroyed.clone(),
        });
        p.adopt("f", "1", 4, inst);
        assert_eq!(p.stats()[0].generation, 4);
        let l = p.acquire("f", "1", &source(4), 1).await.unwrap();
        assert_eq!((l.inst.id.as_str(), l.restored), ("migrated", false));
        assert_eq!(restores(&p), 0);
    }

    #[tokio::test]
    async fn shutdown_destroys_every_instance() {
        let p = pools();
        let s = source(1);
        let [idle, migrating]: [String; 2] =
            idle_several(&p, "f", "1", &s, 2).await.try_into().unwrap();
        assert!(matches!(
            p.take_for_migration(&migrating),
            Taking::Taken(..)
        ));
        let busy = p.acquire("g", "1", &s, 10).await.unwrap();
        let mut all = vec![idle, migrating, busy.inst.id.clone()];
        all.sort();
        let mut ids = p.instance_ids();
        ids.sort();
        assert_eq!(ids, all);
        p.shutdown().await;
        assert_eq!(destroyed(&p), all);
        assert!(p.stats().is_empty());
    }

    #[tokio::test]
    async fn stats_are_sorted_and_count_each_state() {
        let p = pools();
        let s = source(3);
        warm_one(&p, "z", "1", &s).await;
        let _busy = p.acquire("a", "2", &s, 10).await.unwrap();
        warm_one(&p, "a", "10", &s).await;
        let st = p.stats();
        let names: Vec<(&str, &str)> = st
            .iter()
            .map(|s| (s.function_name.as_str(), s.version.as_str()))
            .collect();
        assert_eq!(names, [("a", "10"), ("a", "2"), ("z", "1")]);
        assert_eq!((st[1].busy.len(), st[1].idle.len()), (1, 0));
        assert_eq!((st[0].idle.len(), st[0].generation), (1, 3));
    }

    fn version(v: &str, state: State, generation: Option<u64>) -> VersionRecord {
        let mut r = crate::model::sample_record("f").latest().clone();
        r.version = v.into();
        r.state = state;
        r.snapshot = generation.map(|generation| SnapshotRef {
            dir: "/nonexistent".into(),
            generation,
            init_duration_ms: 0,
            network: None,
        });
        r
    }

    fn function(versions: Vec<VersionRecord>) -> FunctionRecord {
        FunctionRecord {
            versions: versions
                .into_iter()
                .map(|v| (v.version.clone(), v))
                .collect(),
            ..crate::model::sample_record("f")
        }
    }

    #[test]
    fn the_warm_count_is_provisioned_concurrency_or_the_default() {
        let mut f = function(vec![
            version(LATEST, State::Active, Some(5)),
            version("1", State::Active, Some(2)),
            version("2", State::Active, Some(1)),
        ]);
        let v = |f: &FunctionRecord, n: &str| f.versions[n].clone();
        assert_eq!(warm_target(&f, &v(&f, LATEST), 1), Some((5, 1)));
        f.provisioned.insert("1".into(), 4);
        assert_eq!(warm_target(&f, &v(&f, "1"), 1), Some((2, 4)));
        // On an alias: counts for the version it points at.
        f.aliases.insert(
            "live".into(),
            AliasRecord {
                name: "live".into(),
                function_version: "2".into(),
                description: String::new(),
                revision_id: String::new(),
            },
        );
        f.provisioned.insert("live".into(), 6);
        assert_eq!(warm_target(&f, &v(&f, "2"), 1), Some((1, 6)));
        assert_eq!(warm_target(&f, &v(&f, LATEST), 0), Some((5, 0)));
    }

    #[test]
    fn versions_that_cannot_serve_or_have_a_volume_are_not_warmed() {
        let mut f = function(vec![
            version(LATEST, State::Pending, Some(1)),
            version("1", State::Active, None),
            version("2", State::Active, Some(1)),
            version("3", State::Failed, Some(1)),
        ]);
        f.provisioned.insert("2".into(), 3);
        assert_eq!(warm_target(&f, &f.versions[LATEST], 2), None);
        assert_eq!(warm_target(&f, &f.versions["1"], 2), None);
        assert_eq!(warm_target(&f, &f.versions["3"], 2), None);
        assert_eq!(warm_target(&f, &f.versions["2"], 2), Some((1, 3)));
        let v = f.versions.get_mut("2").unwrap();
        v.spec.file_system = Some(FileSystem {
            volume: "vol".into(),
            mount_path: "/mnt/vol".into(),
        });
        assert_eq!(warm_target(&f, &f.versions["2"], 2), Some((1, 0)));
    }
}
