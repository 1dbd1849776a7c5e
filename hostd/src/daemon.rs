//! The daemon's state and the operations on functions: create, update,
//! publish, aliases, delete, and building each version's snapshot.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ember_agent::RuntimeSpec;
use tokio::sync::Semaphore;

use crate::code;
use crate::model::*;
use crate::pool::Pools;
use crate::queue::AsyncQueue;
use crate::store::Store;
use crate::vm::{Instance, LaunchConfig, VmFiles};
use crate::volumes::Volumes;
use ember_lambda::error::ApiError;

/// The function user in Lambda's sandboxes (`sbx_user1051`).
pub const FUNCTION_UID: u32 = 993;
pub const FUNCTION_GID: u32 = 990;
/// What runtimes are told about their init (`AWS_LAMBDA_INITIALIZATION_TYPE`).
const INITIALIZATION_TYPE: &str = "snap-start";
/// Drives in attach order: the root filesystem is vda, the code vdb.
const CODE_DEVICE: &str = "/dev/vdb";

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
    /// The records as stored; held only to read or replace one, never
    /// across a disk write, so readers never wait for an fsync.
    functions: Mutex<BTreeMap<String, FunctionRecord>>,
    /// Held by whoever writes a record (a function's, or the address
    /// reservations), from reading it to replacing it once it is stored:
    /// writes of records happen one at a time.
    writes: Mutex<()>,
    /// (function, version) pairs with a snapshot build running.
    building: Mutex<HashSet<(String, String)>>,
    build_slots: Semaphore,
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

/// Input of create and update-configuration (all optional for updates).
#[derive(Debug, Clone, Default)]
pub struct SpecInput {
    /// CreateFunction only.
    pub file_system: Option<crate::model::FileSystem>,
    /// CreateFunction only.
    pub ephemeral_mib: Option<u32>,
    pub runtime: Option<String>,
    pub handler: Option<String>,
    pub memory_mib: Option<u32>,
    pub timeout_secs: Option<u32>,
    pub environment: Option<BTreeMap<String, String>>,
    pub description: Option<String>,
}

pub fn now_rfc3339() -> String {
    lambda_timestamp(jiff::Timestamp::now())
}

/// `2026-11-23T16:00:00.000+0000`, the form Lambda's `LastModified` uses.
fn lambda_timestamp(t: jiff::Timestamp) -> String {
    t.strftime("%Y-%m-%dT%H:%M:%S%.3f+0000").to_string()
}

fn revision() -> String {
    uuid::Uuid::new_v4().to_string()
}

impl Daemon {
    /// Loads the stored state. Versions without a usable snapshot get one
    /// built in the background by [`Daemon::start`].
    pub fn open(cfg: Config) -> std::io::Result<Arc<Daemon>> {
        let store = Store::open(&cfg.state_dir)?;
        let (records, bad) = store.load_functions()?;
        for b in bad {
            log::error!("skipping unreadable function record {b}");
        }
        let functions = records
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
            .collect();
        let queue = AsyncQueue::open(store.async_dir())?;
        let reservations = crate::net::load_reservations(&store)?;
        let volumes = cfg
            .volume_service
            .clone()
            .map(|s| Arc::new(Volumes::new(s)));
        Ok(Arc::new(Daemon {
            reservations: Mutex::new(reservations),
            build_slots: Semaphore::new(cfg.parallel_builds.max(1)),
            pools: Arc::new(Pools::new(crate::pool::VmRestorer::new(
                &cfg,
                volumes.clone(),
            ))),
            volumes,
            cfg,
            store,
            functions: Mutex::new(functions),
            writes: Mutex::new(()),
            building: Mutex::new(HashSet::new()),
            queue,
            draining: Default::default(),
            incoming: Default::default(),
        }))
    }

    /// Starts background work: snapshot builds still owed, the pool
    /// maintainer and the async workers.
    pub fn start(self: &Arc<Daemon>) {
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

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, FunctionRecord>> {
        self.functions.lock().unwrap_or_else(|p| p.into_inner())
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
            self.cfg.region, self.cfg.account
        );
        match qualifier {
            Some(q) => format!("{base}:{q}"),
            None => base,
        }
    }

    /// A copy of one function's record.
    pub fn get(&self, name: &str) -> Result<FunctionRecord, ApiError> {
        self.lock()
            .get(name)
            .cloned()
            .ok_or_else(|| self.not_found(name))
    }

    pub fn list(&self) -> Vec<FunctionRecord> {
        self.lock().values().cloned().collect()
    }

    fn not_found(&self, name: &str) -> ApiError {
        ApiError::not_found(format!(
            "Function not found: {}",
            self.function_arn(name, None)
        ))
    }

    /// Applies `f` to the record of `name` and stores the result; on an
    /// error nothing changes.
    pub(crate) fn modify<T>(
        &self,
        name: &str,
        f: impl FnOnce(&mut FunctionRecord) -> Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        self.write(|| {
            let mut copy = self.get(name)?;
            let out = f(&mut copy)?;
            self.store
                .save_function(&copy)
                .map_err(|e| ApiError::service(format!("cannot save function {name}: {e}")))?;
            self.lock().insert(name.to_string(), copy);
            Ok(out)
        })
    }

    fn ingest_code(&self, zip: &[u8]) -> Result<code::Code, ApiError> {
        code::ingest(&self.store, zip).map_err(|e| match e {
            code::CodeError::BadZip(_) => ApiError::invalid(e.to_string()),
            code::CodeError::TooLarge(_) => ApiError::too_large(e.to_string()),
            _ => ApiError::service(e.to_string()),
        })
    }

    /// CreateFunction: stores the code and the record (`Pending`) and
    /// starts building the `$LATEST` snapshot (and version 1 if `publish`).
    pub fn create(
        self: &Arc<Daemon>,
        name: &str,
        input: SpecInput,
        zip: &[u8],
        publish: bool,
    ) -> Result<FunctionRecord, ApiError> {
        validate_function_name(name)?;
        let runtime = input
            .runtime
            .ok_or_else(|| ApiError::invalid("Runtime is required"))?;
        let handler = input.handler.unwrap_or_default();
        if handler.is_empty() {
            match RuntimeKind::parse(&runtime) {
                Some(RuntimeKind::Python3) => {
                    return Err(ApiError::invalid("Handler is required for python runtimes"))
                }
                Some(RuntimeKind::Nodejs) => {
                    return Err(ApiError::invalid(
                        "Handler is required for Node.js runtimes",
                    ))
                }
                _ => {}
            }
        }
        let mut spec = FunctionSpec {
            runtime,
            handler,
            memory_mib: input.memory_mib.unwrap_or(128),
            timeout_secs: input.timeout_secs.unwrap_or(3),
            environment: input.environment.unwrap_or_default(),
            description: input.description.unwrap_or_default(),
            code_sha256: String::new(),
            code_size: 0,
            file_system: input.file_system,
            ephemeral_mib: input.ephemeral_mib,
        };
        if let Some(mb) = spec.ephemeral_mib {
            if !(512..=10240).contains(&mb) {
                return Err(ApiError::invalid(format!(
                    "EphemeralStorage.Size {mb}: must be 512 to 10240 MB"
                )));
            }
        }
        validate_spec(&spec)?;
        if let Some(fs) = &spec.file_system {
            crate::volumes::validate(fs)?;
            if self.volumes.is_none() {
                return Err(ApiError::invalid(
                    "FileSystemConfigs need a volume service (emberd --volume-service)",
                ));
            }
        }
        self.check_runtime_available(&spec)?;
        if self.lock().contains_key(name) {
            return Err(ApiError::conflict(format!(
                "Function already exist: {name}"
            )));
        }
        let code = self.ingest_code(zip)?;
        spec.code_sha256 = code.sha256_hex;
        spec.code_size = code.size;
        let latest = VersionRecord {
            version: LATEST.to_string(),
            spec,
            state: State::Pending,
            state_reason: Some("The function is being created.".into()),
            state_reason_code: Some("Creating".into()),
            snapshot: None,
            update_in_progress: false,
            last_modified: now_rfc3339(),
            revision_id: revision(),
        };
        let mut rec = FunctionRecord {
            name: name.to_string(),
            versions: BTreeMap::from([(LATEST.to_string(), latest)]),
            aliases: BTreeMap::new(),
            next_version: 1,
            reserved_concurrency: None,
            provisioned: BTreeMap::new(),
            egress: Default::default(),
        };
        self.write(|| {
            if self.lock().contains_key(name) {
                return Err(ApiError::conflict(format!(
                    "Function already exist: {name}"
                )));
            }
            if publish {
                publish_into(&mut rec);
            }
            self.store
                .save_function(&rec)
                .map_err(|e| ApiError::service(format!("cannot save function {name}: {e}")))?;
            self.lock().insert(name.to_string(), rec.clone());
            Ok(())
        })?;
        for v in rec.versions.keys() {
            self.spawn_build(name, v);
        }
        Ok(rec)
    }

    fn check_runtime_available(&self, spec: &FunctionSpec) -> Result<(), ApiError> {
        let kind = spec.runtime_kind();
        if self.cfg.rootfs.contains_key(&kind) {
            Ok(())
        } else {
            Err(ApiError::invalid(format!(
                "runtime {} is not available on this host (no root filesystem configured for it)",
                spec.runtime
            )))
        }
    }

    /// UpdateFunctionCode / UpdateFunctionConfiguration of `$LATEST`: the
    /// old snapshot keeps serving until the new one is ready.
    pub fn update(
        self: &Arc<Daemon>,
        name: &str,
        input: SpecInput,
        zip: Option<&[u8]>,
        publish: bool,
    ) -> Result<FunctionRecord, ApiError> {
        let code = zip.map(|z| self.ingest_code(z)).transpose()?;
        let rec = self.modify(name, |rec| {
            let v = rec
                .versions
                .get_mut(LATEST)
                .ok_or_else(|| ApiError::service("function without $LATEST"))?;
            if v.update_in_progress || v.state == State::Pending {
                return Err(ApiError::conflict(format!(
                    "The operation cannot be performed at this time. An update is in progress for resource: {}",
                    self.function_arn(name, None)
                )));
            }
            let mut spec = v.spec.clone();
            if let Some(r) = input.runtime {
                spec.runtime = r;
            }
            if let Some(h) = input.handler {
                spec.handler = h;
            }
            if let Some(m) = input.memory_mib {
                spec.memory_mib = m;
            }
            if let Some(t) = input.timeout_secs {
                spec.timeout_secs = t;
            }
            if let Some(e) = input.environment {
                spec.environment = e;
            }
            if let Some(d) = input.description {
                spec.description = d;
            }
            if let Some(c) = &code {
                spec.code_sha256 = c.sha256_hex.clone();
                spec.code_size = c.size;
            }
            validate_spec(&spec)?;
            self.check_runtime_available(&spec)?;
            v.spec = spec;
            v.update_in_progress = true;
            v.state_reason = None;
            v.state_reason_code = None;
            if v.state == State::Failed {
                v.state = State::Pending;
            }
            v.last_modified = now_rfc3339();
            v.revision_id = revision();
            if publish {
                publish_into(rec);
            }
            Ok(rec.clone())
        })?;
        for v in rec.versions.values() {
            if v.update_in_progress || v.state == State::Pending {
                self.spawn_build(name, &v.version);
            }
        }
        Ok(rec)
    }

    /// PublishVersion: a numbered, immutable copy of `$LATEST`, with its own snapshot.
    pub fn publish(self: &Arc<Daemon>, name: &str) -> Result<VersionRecord, ApiError> {
        let v = self.modify(name, |rec| {
            let latest = rec.latest();
            if latest.update_in_progress || latest.state == State::Pending {
                return Err(ApiError::conflict(
                    "The operation cannot be performed at this time. $LATEST is being updated.",
                ));
            }
            // Lambda does not publish a version identical to the last one.
            if let Some(last) = rec.published().last() {
                if rec.versions[&last.to_string()].spec == latest.spec {
                    return Ok(rec.versions[&last.to_string()].clone());
                }
            }
            Ok(publish_into(rec))
        })?;
        if v.state == State::Pending {
            self.spawn_build(name, &v.version);
        }
        Ok(v)
    }

    pub fn delete(&self, name: &str, qualifier: Option<&str>) -> Result<(), ApiError> {
        match qualifier {
            None => {
                self.write(|| {
                    if !self.lock().contains_key(name) {
                        return Err(self.not_found(name));
                    }
                    self.store
                        .delete_function(name)
                        .map_err(|e| ApiError::service(format!("deleting {name}: {e}")))?;
                    self.lock().remove(name);
                    Ok(())
                })?;
                self.pools.retire_function(name);
                Ok(())
            }
            Some(LATEST) => Err(ApiError::invalid(
                "$LATEST cannot be deleted on its own; delete the function",
            )),
            Some(q) => {
                self.modify(name, |rec| {
                    if rec.aliases.values().any(|a| a.function_version == q) {
                        return Err(ApiError::conflict(format!(
                            "Unable to delete version {q}: an alias points at it"
                        )));
                    }
                    rec.versions
                        .remove(q)
                        .ok_or_else(|| ApiError::not_found(format!("Version {q} not found")))?;
                    Ok(())
                })?;
                self.pools.retire(name, q);
                Ok(())
            }
        }
    }

    pub fn put_alias(
        &self,
        name: &str,
        alias: &str,
        version: Option<String>,
        description: Option<String>,
        create: bool,
    ) -> Result<AliasRecord, ApiError> {
        validate_alias_name(alias)?;
        self.modify(name, |rec| {
            let exists = rec.aliases.contains_key(alias);
            if create && exists {
                return Err(ApiError::conflict(format!("Alias already exists: {alias}")));
            }
            if !create && !exists {
                return Err(ApiError::not_found(format!("Alias not found: {alias}")));
            }
            let old = rec.aliases.get(alias).cloned();
            let version = match version.or(old.as_ref().map(|a| a.function_version.clone())) {
                Some(v) => v,
                None => return Err(ApiError::invalid("FunctionVersion is required")),
            };
            if !rec.versions.contains_key(&version) {
                return Err(ApiError::not_found(format!(
                    "Function version {version} not found"
                )));
            }
            let a = AliasRecord {
                name: alias.to_string(),
                function_version: version,
                description: description
                    .or(old.map(|a| a.description))
                    .unwrap_or_default(),
                revision_id: revision(),
            };
            rec.aliases.insert(alias.to_string(), a.clone());
            Ok(a)
        })
    }

    pub fn delete_alias(&self, name: &str, alias: &str) -> Result<(), ApiError> {
        self.modify(name, |rec| {
            rec.aliases
                .remove(alias)
                .map(|_| ())
                .ok_or_else(|| ApiError::not_found(format!("Alias not found: {alias}")))
        })
    }

    pub fn set_reserved_concurrency(&self, name: &str, n: Option<u32>) -> Result<(), ApiError> {
        self.modify(name, |rec| {
            rec.reserved_concurrency = n;
            Ok(())
        })
    }

    pub fn set_provisioned(&self, name: &str, qualifier: &str, n: u32) -> Result<(), ApiError> {
        self.modify(name, |rec| {
            if rec.resolve(Some(qualifier)).is_none() {
                return Err(ApiError::not_found(format!(
                    "Qualifier {qualifier} not found"
                )));
            }
            rec.provisioned.insert(qualifier.to_string(), n);
            Ok(())
        })
    }

    /// The Lambda environment of a version, then the function's own variables.
    pub fn runtime_spec(&self, name: &str, v: &VersionRecord) -> RuntimeSpec {
        let spec = &v.spec;
        let kind = spec.runtime_kind();
        let mut env = spec.environment.clone();
        let mut set = |k: &str, val: String| {
            env.insert(k.to_string(), val);
        };
        set("_HANDLER", spec.handler.clone());
        set("AWS_LAMBDA_FUNCTION_NAME", name.to_string());
        set("AWS_LAMBDA_FUNCTION_VERSION", v.version.clone());
        set(
            "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
            spec.memory_mib.to_string(),
        );
        set("AWS_LAMBDA_LOG_GROUP_NAME", format!("/aws/lambda/{name}"));
        set(
            "AWS_LAMBDA_LOG_STREAM_NAME",
            format!(
                "[{}]{}",
                v.version,
                v.revision_id.chars().take(8).collect::<String>()
            ),
        );
        set("AWS_LAMBDA_INITIALIZATION_TYPE", INITIALIZATION_TYPE.into());
        set("AWS_REGION", self.cfg.region.clone());
        set("AWS_DEFAULT_REGION", self.cfg.region.clone());
        set("LAMBDA_TASK_ROOT", "/var/task".into());
        set("LAMBDA_RUNTIME_DIR", "/var/runtime".into());
        set("LANG", "C.UTF-8".into());
        set("TZ", ":UTC".into());
        set(
            "PATH",
            "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin:/var/task".into(),
        );
        set("HOME", "/tmp".into());
        let argv = match kind {
            RuntimeKind::Provided => vec!["/var/task/bootstrap".to_string()],
            RuntimeKind::Python3 => {
                env.insert(
                    "AWS_EXECUTION_ENV".into(),
                    format!("AWS_Lambda_{}", spec.runtime),
                );
                env.insert("PYTHONUNBUFFERED".into(), "1".into());
                env.insert("PYTHONDONTWRITEBYTECODE".into(), "1".into());
                vec![
                    "/usr/bin/python3".to_string(),
                    "-m".to_string(),
                    "awslambdaric".to_string(),
                    spec.handler.clone(),
                ]
            }
            RuntimeKind::Nodejs => {
                env.insert(
                    "AWS_EXECUTION_ENV".into(),
                    format!("AWS_Lambda_{}", spec.runtime),
                );
                // Where Lambda's Node.js looks for modules: layers, then
                // the runtime's own, then the function's.
                env.insert(
                    "NODE_PATH".into(),
                    "/opt/nodejs/node18/node_modules:/opt/nodejs/node_modules:\
                     /var/runtime/node_modules:/var/runtime:/var/task"
                        .into(),
                );
                vec![
                    "/usr/bin/node".to_string(),
                    "/usr/lib/ember/ric.js".to_string(),
                    spec.handler.clone(),
                ]
            }
        };
        RuntimeSpec {
            argv,
            env,
            code_device: Some(CODE_DEVICE.to_string()),
            task_root: "/var/task".to_string(),
            uid: Some(FUNCTION_UID),
            gid: Some(FUNCTION_GID),
            init_timeout_ms: Some(self.cfg.init_timeout.as_millis() as u64),
            network: None,
        }
    }

    pub fn vm_files(&self, spec: &FunctionSpec) -> Result<VmFiles, ApiError> {
        let rootfs =
            self.cfg.rootfs.get(&spec.runtime_kind()).ok_or_else(|| {
                ApiError::service(format!("no root filesystem for {}", spec.runtime))
            })?;
        Ok(VmFiles {
            kernel: self.cfg.kernel.clone(),
            rootfs: rootfs.clone(),
            code: self.store.code_image(&spec.code_sha256),
        })
    }

    /// Builds the snapshot of `name`:`version` in the background, unless a
    /// build for it is already running (that build notices a changed spec
    /// when it ends and builds again).
    pub fn spawn_build(self: &Arc<Daemon>, name: &str, version: &str) {
        let key = (name.to_string(), version.to_string());
        if !self
            .building
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.clone())
        {
            return;
        }
        let d = self.clone();
        tokio::spawn(async move {
            loop {
                let again = d.build_once(&key.0, &key.1).await;
                if !again {
                    break;
                }
            }
            d.building
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&key);
        });
    }

    /// One snapshot build; true if the spec changed meanwhile and another
    /// build is owed.
    async fn build_once(self: &Arc<Daemon>, name: &str, version: &str) -> bool {
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
        let network = self.build_network(name, &v);
        let logical = network.as_ref().map(|n| n.logical);
        let result = self.build_snapshot(name, &v, &dir, network.as_ref()).await;
        let outcome = match result {
            Ok(init_ms) => {
                log::info!(
                    "snapshot of {name}:{version} ready in {:.1} s (init {init_ms} ms)",
                    started.elapsed().as_secs_f64()
                );
                Ok(SnapshotRef {
                    dir: dir.clone(),
                    generation,
                    init_duration_ms: init_ms,
                    network: logical,
                })
            }
            Err((code, reason)) => {
                log::warn!("snapshot of {name}:{version} failed: {code}: {reason}");
                let _ = std::fs::remove_dir_all(&dir);
                Err((code, reason))
            }
        };
        let mut old_dir = None;
        let again = self.write(|| {
            let Some(mut copy) = self.lock().get(name).cloned() else {
                let _ = std::fs::remove_dir_all(&dir);
                return false;
            };
            let Some(cur) = copy.versions.get_mut(version) else {
                let _ = std::fs::remove_dir_all(&dir);
                return false;
            };
            let changed = cur.spec != v.spec;
            let built = outcome.is_ok();
            match outcome {
                Ok(snap) if !changed => {
                    old_dir = cur.snapshot.replace(snap).map(|s| s.dir);
                    cur.state = State::Active;
                    cur.state_reason = None;
                    cur.state_reason_code = None;
                    cur.update_in_progress = false;
                }
                Ok(_) => old_dir = Some(dir.clone()),
                Err((code, reason)) if !changed => {
                    if cur.snapshot.is_none() {
                        cur.state = State::Failed;
                    }
                    cur.state_reason = Some(reason);
                    cur.state_reason_code = Some(code);
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
                    old_dir = Some(dir.clone());
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

    /// Boots the version, lets its runtime initialize, snapshots it into
    /// `dir`. Returns the init duration, or (reason code, message).
    async fn build_snapshot(
        &self,
        name: &str,
        v: &VersionRecord,
        dir: &std::path::Path,
        network: Option<&crate::net::NetRequest>,
    ) -> Result<u64, (String, String)> {
        let fail = |code: &str, e: String| (code.to_string(), e);
        let files = self
            .vm_files(&v.spec)
            .map_err(|e| fail("InternalError", e.message))?;
        // A directory of this generation is what a build cut short (a
        // crash) left: start it afresh (files are made new, never reused).
        if dir.exists() {
            std::fs::remove_dir_all(dir)
                .map_err(|e| fail("InternalError", format!("{}: {e}", dir.display())))?;
        }
        std::fs::create_dir_all(dir)
            .map_err(|e| fail("InternalError", format!("{}: {e}", dir.display())))?;
        // Root's alone until the jailed VMM (its own uid) is given it for
        // the build (Instance::boot); never open to everyone.
        set_mode(dir, 0o700).map_err(|e| fail("InternalError", e.to_string()))?;
        let (vcpus, mem) = machine_for(v.spec.memory_mib);
        let volume_bytes = match (&v.spec.file_system, &self.volumes) {
            (Some(fs), Some(vs)) => Some(vs.size(&fs.volume).await.map_err(|e| {
                fail(
                    "InvalidConfiguration",
                    format!("the function's volume {}: {e}", fs.volume),
                )
            })?),
            (Some(_), None) => {
                return Err(fail(
                    "InvalidConfiguration",
                    "the function has a volume but this host no volume service".into(),
                ))
            }
            _ => None,
        };
        let inst = Instance::boot(
            &self.cfg.launch,
            &files,
            mem,
            vcpus,
            dir,
            network,
            volume_bytes,
            v.spec.ephemeral_mib,
        )
        .await
        .map_err(|e| fail("InternalError", format!("booting the microVM: {e}")))?;
        let mut spec = self.runtime_spec(name, v);
        spec.network = network.map(|n| n.logical.guest());
        let with_tmp_disk = v.spec.ephemeral_mib.is_some();
        let result = async {
            if with_tmp_disk {
                // /tmp on its disk before the runtime (and its init) runs.
                let script = crate::ephemeral::mount_script(crate::ephemeral::GUEST_DEVICE);
                inst.run_in_guest(script)
                    .await
                    .map_err(|e| fail("InternalError", format!("mounting /tmp: {e}")))?;
            }
            // A fresh guest's kernel has no entropy of its own (no RDRAND
            // in nested guests, no virtio-rng): without the host's, a
            // runtime whose start reads getrandom() (node seeds OpenSSL)
            // waits for the kernel's jitter entropy, half a minute here.
            inst.with_agent(|a| a.refresh())
                .await
                .map_err(|e| fail("InternalError", e.to_string()))?
                .map_err(|e| fail("InternalError", format!("seeding the guest: {e}")))?;
            let ready = inst
                .with_agent(move |a| a.start_runtime(&spec))
                .await
                .map_err(|e| fail("InternalError", e.to_string()))?
                .map_err(|e| fail("InternalError", format!("starting the runtime: {e}")))?;
            match ready {
                Ok(r) => {
                    inst.close_agent().await;
                    inst.snapshot(dir)
                        .await
                        .map_err(|e| fail("InternalError", format!("snapshot: {e}")))?;
                    Ok(r.init_duration_ms)
                }
                Err(f) => {
                    let body = String::from_utf8_lossy(&f.payload).into_owned();
                    let log = String::from_utf8_lossy(&f.log);
                    let tail: String = log
                        .chars()
                        .rev()
                        .take(2000)
                        .collect::<Vec<_>>()
                        .into_iter()
                        .rev()
                        .collect();
                    Err(fail(
                        "InitError",
                        format!("{}: {body}; log: {tail}", f.error_type),
                    ))
                }
            }
        }
        .await;
        inst.destroy().await;
        let init_ms = result?;
        seal_snapshot(dir, with_tmp_disk).map_err(|e| {
            fail(
                "InternalError",
                format!("the snapshot in {}: {e}", dir.display()),
            )
        })?;
        Ok(init_ms)
    }
}

/// After a build, the snapshot's directory and files, which the VMM's uid
/// wrote, become root's again: the snapshot and memory readable by the
/// VMMs that restore from them, the golden `/tmp` image by hostd alone
/// (it copies it). Each must be a regular file of its own: a link or a
/// hard link left there fails the build, and nothing is followed.
pub(crate) fn seal_snapshot(dir: &std::path::Path, with_tmp_disk: bool) -> std::io::Result<()> {
    let d = crate::beneath::Dir::open(dir)?;
    let root = nix::unistd::geteuid().is_root();
    let mut files = vec![("vm.snap", 0o644), ("mem", 0o644)];
    if with_tmp_disk {
        files.push((crate::ephemeral::FILE, 0o600));
    }
    for (name, mode) in files {
        let f = d.open_file(name, false)?;
        if root {
            crate::beneath::fchown(&f, 0, 0)?;
        }
        crate::beneath::fchmod(&f, mode)?;
    }
    if root {
        d.chown(0, 0)?;
    }
    d.chmod(0o755)
}

fn set_mode(p: &std::path::Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
}

/// vCPUs and guest memory for a function's memory setting: Lambda gives a
/// full vCPU at 1769 MB, and two above that. (kvm_pvm hosts once got one
/// always, for data loss in 2-vCPU guests that tests/vsock_stress.rs no
/// longer shows: 20 of 20 rounds intact on 2026-12-07.)
pub fn machine_for(memory_mib: u32) -> (u32, u32) {
    let vcpus = if memory_mib > 1769 { 2 } else { 1 };
    (vcpus, memory_mib)
}

/// Copies `$LATEST` into the next numbered version (state `Pending` until
/// its own snapshot is built).
fn publish_into(rec: &mut FunctionRecord) -> VersionRecord {
    let n = rec.next_version;
    rec.next_version += 1;
    let latest = rec.latest().clone();
    let v = VersionRecord {
        version: n.to_string(),
        spec: latest.spec,
        state: State::Pending,
        state_reason: Some("The version is being created.".into()),
        state_reason_code: Some("Creating".into()),
        snapshot: None,
        update_in_progress: false,
        last_modified: now_rfc3339(),
        revision_id: revision(),
    };
    rec.versions.insert(v.version.clone(), v.clone());
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_look_like_lambdas() {
        let t = jiff::Timestamp::from_millisecond(1_700_000_000_123).unwrap();
        assert_eq!(lambda_timestamp(t), "2023-11-14T22:13:20.123+0000");
    }

    fn daemon(state_dir: &std::path::Path) -> Arc<Daemon> {
        Daemon::open(Config {
            state_dir: state_dir.to_path_buf(),
            launch: LaunchConfig {
                vmm_bin: "/nonexistent/ember-vmm".into(),
                jail: None,
                run_dir: state_dir.join("run"),
                disk_dir: state_dir.join("disks"),
                boot_args: None,
                boot_timeout: Duration::from_secs(1),
            },
            kernel: "/nonexistent/vmlinux".into(),
            rootfs: BTreeMap::new(),
            region: "us-east-1".into(),
            account: "123456789012".into(),
            default_warm: 0,
            default_concurrency: 1,
            idle_ttl: Duration::from_secs(1),
            init_timeout: Duration::from_secs(1),
            parallel_builds: 1,
            async_workers: 1,
            async_retry_delay: Duration::from_secs(1),
            network: None,
            volume_service: None,
            peers: None,
            export_bin: "/nonexistent/ember-export".into(),
        })
        .unwrap()
    }

    /// A write stuck on the disk (here: its temporary file is a FIFO
    /// nobody reads, so opening it blocks) holds up no reader, and when it
    /// fails the record in memory is still the stored one.
    #[test]
    fn readers_never_wait_for_a_write_and_a_failed_write_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        Store::open(dir.path())
            .unwrap()
            .save_function(&sample_record("f1"))
            .unwrap();
        let d = daemon(dir.path());
        let fifo = dir
            .path()
            .join(format!("functions/.f1.json.tmp-{}", std::process::id()));
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let writer = {
            let d = d.clone();
            std::thread::spawn(move || {
                d.modify("f1", |r| {
                    r.reserved_concurrency = Some(7);
                    Ok(())
                })
            })
        };
        std::thread::sleep(Duration::from_millis(200));
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let d = d.clone();
            std::thread::spawn(move || {
                let _ = tx.send((d.get("f1").map(|r| r.reserved_concurrency), d.list().len()));
            });
        }
        let read = rx.recv_timeout(Duration::from_secs(10));
        // Let the write go on: its body goes into the pipe, and fsync of a
        // pipe fails, so the write fails.
        let mut pipe = std::fs::File::open(&fifo).unwrap();
        let written = writer.join().unwrap();
        let mut body = Vec::new();
        std::io::Read::read_to_end(&mut pipe, &mut body).unwrap();
        let (got, listed) = read.expect("a read waited for a write's disk");
        assert_eq!(got.unwrap(), None, "a reader saw an unstored change");
        assert_eq!(listed, 1);
        assert!(written.is_err(), "writing through a FIFO cannot succeed");
        assert_eq!(d.get("f1").unwrap().reserved_concurrency, None);
        assert_eq!(
            Store::open(dir.path()).unwrap().load_functions().unwrap().0[0],
            sample_record("f1")
        );
    }

    /// A snapshot directory the building VMM's uid wrote: links or hard
    /// links left for its files fail the seal, and what they point to
    /// keeps its owner and mode; real files become root's (as root).
    #[test]
    fn sealing_a_snapshot_follows_no_link() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let t = tempfile::tempdir().unwrap();
        let secret = t.path().join("shadow");
        std::fs::write(&secret, "s").unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        let before = std::fs::metadata(&secret).unwrap();
        let mut sealed = 0;
        for (i, plant) in ["vm.snap", "mem", crate::ephemeral::FILE]
            .iter()
            .enumerate()
        {
            for hard in [false, true] {
                let dir = t.path().join(format!("snap-{i}-{hard}"));
                std::fs::create_dir(&dir).unwrap();
                for f in ["vm.snap", "mem", crate::ephemeral::FILE] {
                    if f == *plant {
                        if hard {
                            std::fs::hard_link(&secret, dir.join(f)).unwrap();
                        } else {
                            std::os::unix::fs::symlink(&secret, dir.join(f)).unwrap();
                        }
                    } else {
                        std::fs::write(dir.join(f), "x").unwrap();
                    }
                }
                if seal_snapshot(&dir, true).is_ok() {
                    sealed += 1;
                }
            }
        }
        assert_eq!(sealed, 0);
        let after = std::fs::metadata(&secret).unwrap();
        assert_eq!((after.uid(), after.mode()), (before.uid(), before.mode()));
        let ok = t.path().join("ok");
        std::fs::create_dir(&ok).unwrap();
        for f in ["vm.snap", "mem", crate::ephemeral::FILE] {
            std::fs::write(ok.join(f), "x").unwrap();
        }
        seal_snapshot(&ok, true).unwrap();
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().mode() & 0o7777;
        assert_eq!(mode(&ok), 0o755);
        assert_eq!(mode(&ok.join("mem")), 0o644);
        assert_eq!(mode(&ok.join(crate::ephemeral::FILE)), 0o600);
    }

    #[test]
    fn memory_maps_to_vcpus() {
        assert_eq!(machine_for(128), (1, 128));
        assert_eq!(machine_for(1769), (1, 1769));
        assert_eq!(machine_for(2048), (2, 2048));
    }
}
