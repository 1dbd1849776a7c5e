//! Warm pools: per function version, idle instances restored from its
//! snapshot, reused for the next invocation; more are restored under
//! concurrency up to a limit; idle ones past their time-to-live are
//! reclaimed; dead ones are replaced.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::daemon::{machine_for, Daemon};
use crate::model::{FunctionRecord, SnapshotRef, State, VersionRecord};
use crate::vm::{Instance, VmFiles};
use ember_lambda::error::ApiError;

type Key = (String, String);

struct Idle {
    inst: Arc<Instance>,
    since: Instant,
}

#[derive(Default)]
struct Pool {
    generation: u64,
    idle: VecDeque<Idle>,
    /// Instances running an invocation.
    busy: Vec<Arc<Instance>>,
    /// Restores under way for invocations waiting on them.
    starting: u32,
    /// Restores under way to fill the warm pool.
    warming: u32,
    /// Instances on their way to another host (out of service meanwhile).
    migrating: Vec<Arc<Instance>>,
    /// Busy instances to migrate once their invocation ends.
    leaving: HashSet<String>,
    /// Ones of those that ended it: in `migrating`, not yet taken.
    left: HashSet<String>,
}

#[derive(Default)]
pub struct Pools {
    inner: Mutex<HashMap<Key, Pool>>,
}

/// What serves one invocation; give it back with [`Pools::release`].
pub struct Lease {
    pub inst: Arc<Instance>,
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
            files: d.vm_files(&v.spec)?,
            snapshot,
            mem_mib,
            vcpus,
            network: d.clone_network(f, v),
            file_system: v.spec.file_system.clone(),
            tmp_disk: v.spec.ephemeral_mib.is_some(),
        })
    }
}

impl Source {
    /// A running clone of this version.
    /// A clone with a volume attaches it to this host first (refused
    /// while another host holds it) and mounts it before it serves.
    pub async fn restore(&self, d: &Daemon) -> Result<Instance, crate::vm::InstanceError> {
        use crate::vm::InstanceError;
        let grant = match (&self.file_system, &d.cfg.volumes) {
            (None, _) => None,
            (Some(_), None) => {
                return Err(InstanceError::Spawn(
                    "the function has a volume but this host no volume service".into(),
                ))
            }
            (Some(fs), Some(vs)) => Some(vs.attach(&fs.volume).await.map_err(|e| {
                InstanceError::Spawn(format!("volume {}: {}", fs.volume, e.message))
            })?),
        };
        let inst = Instance::restore(
            &d.cfg.launch,
            &self.files,
            &self.snapshot.dir,
            self.mem_mib,
            self.vcpus,
            self.network.as_ref(),
            grant.as_ref(),
            self.tmp_disk.then_some(self.snapshot.dir.as_path()),
        )
        .await?;
        if let Some(fs) = &self.file_system {
            let script = crate::volume::mount_script(
                crate::volume::guest_device(self.tmp_disk),
                &fs.mount_path,
                crate::daemon::FUNCTION_UID,
                crate::daemon::FUNCTION_GID,
            );
            if let Err(e) = inst.run_in_guest(script).await {
                inst.destroy().await;
                return Err(e);
            }
        }
        Ok(inst)
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

fn info(i: &Instance) -> InstanceInfo {
    InstanceInfo {
        id: i.id.clone(),
        pid: i.pid(),
        age_ms: i.started.elapsed().as_millis() as u64,
        physical_address: i.physical_address,
    }
}

fn throttled(function: &str, limit: u32) -> ApiError {
    ApiError::throttled(format!(
        "Rate Exceeded: {function} already runs {limit} concurrent invocations (its concurrency limit)"
    ))
}

fn destroy_later(inst: Arc<Instance>) {
    tokio::spawn(async move { inst.destroy().await });
}

impl Pools {
    pub fn new() -> Pools {
        Pools::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Pool>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An instance for one invocation: an idle one, or a new clone, if
    /// fewer than `limit` invocations of the function run; otherwise a
    /// throttle error.
    pub async fn acquire(
        &self,
        d: &Daemon,
        function: &str,
        version: &str,
        source: &Source,
        limit: u32,
    ) -> Result<Lease, ApiError> {
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
                return Err(throttled(function, limit));
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
            let others: Vec<Arc<Instance>> = self
                .lock()
                .iter_mut()
                .filter(|(k, _)| k.0 == function)
                .flat_map(|(_, p)| p.idle.drain(..).map(|i| i.inst).collect::<Vec<_>>())
                .collect();
            for i in others {
                i.destroy().await;
            }
        }
        let restored = source.restore(d).await;
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
            Err(e) => Err(ApiError::service(format!(
                "could not restore a microVM for {function}:{version}: {e}"
            ))),
        }
    }

    /// Returns a leased instance: back to the idle list if `reusable`,
    /// alive and of the current snapshot; destroyed otherwise.
    pub fn release(&self, function: &str, version: &str, lease: Lease, reusable: bool) {
        let key = (function.to_string(), version.to_string());
        let mut pools = self.lock();
        let Some(pool) = pools.get_mut(&key) else {
            destroy_later(lease.inst);
            return;
        };
        pool.busy.retain(|i| !Arc::ptr_eq(i, &lease.inst));
        if pool.leaving.remove(&lease.inst.id) && reusable && lease.inst.is_alive() {
            pool.left.insert(lease.inst.id.clone());
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
    pub fn take_for_migration(&self, id: &str) -> Taking {
        let mut pools = self.lock();
        for ((f, v), pool) in pools.iter_mut() {
            let key = (f.clone(), v.clone());
            if let Some(i) = pool.migrating.iter().find(|i| i.id == id) {
                return if pool.left.remove(id) {
                    Taking::Taken(key, i.clone())
                } else {
                    Taking::InProgress
                };
            }
            if let Some(pos) = pool.idle.iter().position(|i| i.inst.id == id) {
                let Some(idle) = pool.idle.remove(pos) else {
                    continue;
                };
                pool.migrating.push(idle.inst.clone());
                return Taking::Taken(key, idle.inst);
            }
            if pool.busy.iter().any(|i| i.id == id) {
                pool.leaving.insert(id.to_string());
                return Taking::Busy;
            }
        }
        Taking::Gone
    }

    /// Instance `id` if it is being migrated away.
    pub fn migrating(&self, id: &str) -> Option<Arc<Instance>> {
        self.lock()
            .values()
            .find_map(|p| p.migrating.iter().find(|i| i.id == id).cloned())
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
    pub fn migration_ended(&self, id: &str, moved: bool) -> Option<Arc<Instance>> {
        let mut pools = self.lock();
        for pool in pools.values_mut() {
            let Some(pos) = pool.migrating.iter().position(|i| i.id == id) else {
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
    pub fn adopt(&self, function: &str, version: &str, generation: u64, inst: Arc<Instance>) {
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
                    .map(|i| i.inst.id.clone())
                    .chain(p.busy.iter().map(|i| i.id.clone()))
                    .chain(p.migrating.iter().map(|i| i.id.clone()))
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
                idle: p.idle.iter().map(|i| info(&i.inst)).collect(),
                busy: p.busy.iter().map(|i| info(i)).collect(),
                starting: p.starting,
                warming: p.warming,
                migrating: p.migrating.iter().map(|i| info(i)).collect(),
            })
            .collect();
        out.sort_by(|a, b| (&a.function_name, &a.version).cmp(&(&b.function_name, &b.version)));
        out
    }

    /// Destroys every instance (daemon shutdown).
    pub async fn shutdown(&self) {
        let all: Vec<Arc<Instance>> = {
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

    /// One maintenance pass over a version's pool: drop dead idle
    /// instances, reclaim those idle past `ttl` beyond the `warm` count,
    /// and say how many restores are needed to get back to `warm`
    /// instances (idle or busy).
    fn maintain(&self, key: &Key, generation: u64, warm: u32, ttl: Duration) -> u32 {
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
                    idle.inst.id,
                    key.0,
                    key.1
                );
                destroy_later(idle.inst);
            } else {
                kept.push_back(idle);
            }
        }
        // Oldest first: reclaim from the front while above the warm count.
        while kept.len() as u32 > warm && kept.front().is_some_and(|i| i.since.elapsed() > ttl) {
            if let Some(i) = kept.pop_front() {
                log::info!(
                    "reclaiming idle instance {} of {}:{}",
                    i.inst.id,
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

    fn warmed(&self, key: &Key, inst: Option<Instance>, generation: u64) {
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
pub enum Taking {
    Taken(Key, Arc<Instance>),
    /// Running an invocation; taken when it ends.
    Busy,
    /// Another migration has it.
    InProgress,
    Gone,
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
    for f in d.list() {
        for v in f.versions.values() {
            if v.state != State::Active {
                continue;
            }
            let Some(snap) = &v.snapshot else { continue };
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
                .unwrap_or(d.cfg.default_warm);
            // A volume's function keeps the one instance it restores on
            // demand, no more (one writer).
            let warm = if v.spec.file_system.is_some() {
                0
            } else {
                warm
            };
            let key = (f.name.clone(), v.version.clone());
            let need = d
                .pools
                .maintain(&key, snap.generation, warm, d.cfg.idle_ttl);
            if need == 0 {
                continue;
            }
            let source = match Source::of(d, &f, v) {
                Ok(s) => s,
                Err(e) => {
                    log::error!("cannot warm {}:{}: {e}", key.0, key.1);
                    continue;
                }
            };
            for _ in 0..need {
                let d = d.clone();
                let key = key.clone();
                let source = source.clone();
                tokio::spawn(async move {
                    let r = source.restore(&d).await;
                    let inst = match r {
                        Ok(i) => Some(i),
                        Err(e) => {
                            log::error!("warming {}:{} failed: {e}", key.0, key.1);
                            // Do not retry in a tight loop.
                            tokio::time::sleep(Duration::from_secs(5)).await;
                            None
                        }
                    };
                    d.pools.warmed(&key, inst, source.snapshot.generation);
                });
            }
        }
    }
}
