//! Lambda's rules for the records: create, update, publish, delete,
//! aliases and concurrency settings. Each change is stored before it is
//! seen; versions it leaves without a snapshot get one built.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::error::invalid;
use super::{FunctionError, Functions};
use crate::code;
use crate::model::*;

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
pub(super) fn lambda_timestamp(t: jiff::Timestamp) -> String {
    t.strftime("%Y-%m-%dT%H:%M:%S%.3f+0000").to_string()
}

fn revision() -> String {
    uuid::Uuid::new_v4().to_string()
}

impl Functions {
    fn ingest_code(&self, zip: &[u8]) -> Result<code::Code, FunctionError> {
        Ok(code::ingest(&self.store, zip)?)
    }

    /// CreateFunction: stores the code and the record (`Pending`) and
    /// starts building the `$LATEST` snapshot (and version 1 if `publish`).
    pub fn create(
        self: &Arc<Functions>,
        name: &str,
        input: SpecInput,
        zip: &[u8],
        publish: bool,
    ) -> Result<FunctionRecord, FunctionError> {
        validate_function_name(name)?;
        let runtime = input
            .runtime
            .ok_or_else(|| invalid("Runtime is required"))?;
        let handler = input.handler.unwrap_or_default();
        if handler.is_empty() {
            match RuntimeKind::parse(&runtime) {
                Some(RuntimeKind::Python3) => {
                    return Err(invalid("Handler is required for python runtimes"))
                }
                Some(RuntimeKind::Nodejs) => {
                    return Err(invalid("Handler is required for Node.js runtimes"))
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
                return Err(invalid(format!(
                    "EphemeralStorage.Size {mb}: must be 512 to 10240 MB"
                )));
            }
        }
        validate_spec(&spec)?;
        if let Some(fs) = &spec.file_system {
            crate::volumes::validate(fs).map_err(|e| invalid(e.to_string()))?;
            if !self.settings.volume_service {
                return Err(invalid(
                    "FileSystemConfigs need a volume service (emberd --volume-service)",
                ));
            }
        }
        self.check_runtime_available(&spec)?;
        if self.lock().contains_key(name) {
            return Err(FunctionError::AlreadyExists(name.to_string()));
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
                return Err(FunctionError::AlreadyExists(name.to_string()));
            }
            if publish {
                publish_into(&mut rec);
            }
            self.save(&rec)?;
            self.lock().insert(name.to_string(), rec.clone());
            Ok(())
        })?;
        for v in rec.versions.keys() {
            self.spawn_build(name, v);
        }
        Ok(rec)
    }

    /// UpdateFunctionCode / UpdateFunctionConfiguration of `$LATEST`: the
    /// old snapshot keeps serving until the new one is ready.
    pub fn update(
        self: &Arc<Functions>,
        name: &str,
        input: SpecInput,
        zip: Option<&[u8]>,
        publish: bool,
    ) -> Result<FunctionRecord, FunctionError> {
        let code = zip.map(|z| self.ingest_code(z)).transpose()?;
        let rec = self.modify(name, |rec| {
            let v = rec
                .versions
                .get_mut(LATEST)
                .ok_or(FunctionError::NoLatest)?;
            if v.update_in_progress || v.state == State::Pending {
                return Err(FunctionError::UpdateInProgress {
                    arn: self.function_arn(name, None),
                });
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
    pub fn publish(self: &Arc<Functions>, name: &str) -> Result<VersionRecord, FunctionError> {
        let v = self.modify(name, |rec| {
            let latest = rec.latest();
            if latest.update_in_progress || latest.state == State::Pending {
                return Err(FunctionError::LatestUpdating);
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

    /// Deletes the function's records (`qualifier` None) or one published
    /// version's; its instances are the pools' to retire.
    pub fn delete(&self, name: &str, qualifier: Option<&str>) -> Result<(), FunctionError> {
        match qualifier {
            None => self.write(|| {
                if !self.lock().contains_key(name) {
                    return Err(self.not_found(name));
                }
                self.store
                    .delete_function(name)
                    .map_err(|source| FunctionError::Delete {
                        name: name.to_string(),
                        source,
                    })?;
                self.lock().remove(name);
                Ok(())
            }),
            Some(LATEST) => Err(FunctionError::DeleteLatest),
            Some(q) => self.modify(name, |rec| {
                if rec.aliases.values().any(|a| a.function_version == q) {
                    return Err(FunctionError::VersionHasAlias(q.to_string()));
                }
                rec.versions
                    .remove(q)
                    .ok_or_else(|| FunctionError::NoSuchVersion(q.to_string()))?;
                Ok(())
            }),
        }
    }

    /// CreateAlias (`create`) or UpdateAlias: what is not given stays as it was.
    pub fn put_alias(
        &self,
        name: &str,
        alias: &str,
        version: Option<String>,
        description: Option<String>,
        create: bool,
    ) -> Result<AliasRecord, FunctionError> {
        validate_alias_name(alias)?;
        self.modify(name, |rec| {
            let exists = rec.aliases.contains_key(alias);
            if create && exists {
                return Err(FunctionError::AliasExists(alias.to_string()));
            }
            if !create && !exists {
                return Err(FunctionError::NoSuchAlias(alias.to_string()));
            }
            let old = rec.aliases.get(alias).cloned();
            let version = version
                .or(old.as_ref().map(|a| a.function_version.clone()))
                .ok_or(FunctionError::NoAliasVersion)?;
            if !rec.versions.contains_key(&version) {
                return Err(FunctionError::NoAliasTarget(version));
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

    pub fn delete_alias(&self, name: &str, alias: &str) -> Result<(), FunctionError> {
        self.modify(name, |rec| {
            rec.aliases
                .remove(alias)
                .map(|_| ())
                .ok_or_else(|| FunctionError::NoSuchAlias(alias.to_string()))
        })
    }

    pub fn set_reserved_concurrency(
        &self,
        name: &str,
        n: Option<u32>,
    ) -> Result<(), FunctionError> {
        self.modify(name, |rec| {
            rec.reserved_concurrency = n;
            Ok(())
        })
    }

    pub fn set_provisioned(
        &self,
        name: &str,
        qualifier: &str,
        n: u32,
    ) -> Result<(), FunctionError> {
        self.modify(name, |rec| {
            if rec.resolve(Some(qualifier)).is_none() {
                return Err(FunctionError::NoSuchQualifier(qualifier.to_string()));
            }
            rec.provisioned.insert(qualifier.to_string(), n);
            Ok(())
        })
    }
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
