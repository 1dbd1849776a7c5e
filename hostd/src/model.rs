//! Functions, versions and aliases as hostd keeps them, with the checks
//! Lambda applies to their names and settings.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// `$LATEST`: the unpublished, mutable version of every function.
pub const LATEST: &str = "$LATEST";

pub use ember_lambda::rules::{RuntimeKind, RESERVED_ENV};

/// Lambda's `State` of a function version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum State {
    Pending,
    Active,
    Failed,
}

impl State {
    /// Its name in Lambda's `FunctionConfiguration.State`.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Pending => "Pending",
            State::Active => "Active",
            State::Failed => "Failed",
        }
    }
}

/// What a version runs: everything that goes into its snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionSpec {
    /// As given (e.g. `python3.11`); [`RuntimeKind::parse`] accepts it.
    pub runtime: String,
    pub handler: String,
    pub memory_mib: u32,
    pub timeout_secs: u32,
    #[serde(default)]
    pub environment: BTreeMap<String, String>,
    #[serde(default)]
    pub description: String,
    /// Hex SHA-256 of the code zip (names the code files in the store).
    pub code_sha256: String,
    pub code_size: u64,
    /// The volume the function mounts, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_system: Option<FileSystem>,
    /// Lambda's `EphemeralStorage.Size` in MB, when given: `/tmp` is then a
    /// local disk of that size per instance (else a tmpfs, in memory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ephemeral_mib: Option<u32>,
}

/// Lambda's `FileSystemConfig` with an Ember volume in place of an EFS
/// access point: mounted at `mount_path` in every instance. A volume has
/// one writer, so such a function runs one instance at a time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileSystem {
    pub volume: String,
    pub mount_path: String,
}

impl FunctionSpec {
    pub fn runtime_kind(&self) -> RuntimeKind {
        // Validated on the way in.
        RuntimeKind::parse(&self.runtime).unwrap_or(RuntimeKind::Provided)
    }
}

/// The snapshot a version's instances are restored from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRef {
    /// Directory holding `vm.snap` and `mem`.
    pub dir: std::path::PathBuf,
    /// Bumped by every snapshot of this version, so instances restored
    /// from an older one are not reused.
    pub generation: u64,
    pub init_duration_ms: u64,
    /// The logical network the guest was given (None: no network device).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<crate::net::LogicalNet>,
}

/// One version of a function (`$LATEST` or a published number).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionRecord {
    pub version: String,
    pub spec: FunctionSpec,
    pub state: State,
    #[serde(default)]
    pub state_reason: Option<String>,
    #[serde(default)]
    pub state_reason_code: Option<String>,
    /// Snapshot being served (kept while a newer one builds).
    #[serde(default)]
    pub snapshot: Option<SnapshotRef>,
    /// The spec of `snapshot` differs from `spec` and a new one is building.
    #[serde(default)]
    pub update_in_progress: bool,
    pub last_modified: String,
    pub revision_id: String,
}

/// A name pointing at a published version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AliasRecord {
    pub name: String,
    pub function_version: String,
    #[serde(default)]
    pub description: String,
    pub revision_id: String,
}

/// Everything hostd keeps about one function (one file in the store).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionRecord {
    pub name: String,
    /// `$LATEST` and published versions, by version string.
    pub versions: BTreeMap<String, VersionRecord>,
    #[serde(default)]
    pub aliases: BTreeMap<String, AliasRecord>,
    /// Number the next published version gets.
    pub next_version: u64,
    /// Lambda's reserved concurrency: most invocations of the function
    /// (all versions) running at once (None: the daemon's default).
    #[serde(default)]
    pub reserved_concurrency: Option<u32>,
    /// Warm instances kept ready per qualifier (Lambda's provisioned
    /// concurrency); qualifiers without an entry get the daemon default.
    #[serde(default)]
    pub provisioned: BTreeMap<String, u32>,
    /// Where its instances may connect to (Ember's extension).
    #[serde(default)]
    pub egress: crate::net::EgressPolicy,
}

impl FunctionRecord {
    /// The version `qualifier` names: none means `$LATEST`; a number; an alias.
    pub fn resolve(&self, qualifier: Option<&str>) -> Option<&VersionRecord> {
        let q = qualifier.unwrap_or(LATEST);
        if let Some(v) = self.versions.get(q) {
            return Some(v);
        }
        let alias = self.aliases.get(q)?;
        self.versions.get(&alias.function_version)
    }

    pub fn latest(&self) -> &VersionRecord {
        // Every record is created with $LATEST and it is never removed.
        self.versions
            .get(LATEST)
            .or_else(|| self.versions.values().next())
            .expect("a function has at least one version")
    }

    /// Published version numbers, ascending.
    pub fn published(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .versions
            .keys()
            .filter_map(|k| k.parse().ok())
            .collect();
        v.sort_unstable();
        v
    }
}

pub use ember_lambda::rules::{validate_alias_name, validate_function_name, Invalid};

/// Checks the settings Lambda checks.
pub fn validate_spec(spec: &FunctionSpec) -> Result<(), Invalid> {
    ember_lambda::rules::validate_settings(
        &spec.runtime,
        &spec.handler,
        spec.memory_mib,
        spec.timeout_secs,
        &spec.environment,
    )
}

/// A function with only `$LATEST`, pending, for tests.
#[cfg(test)]
pub(crate) fn sample_record(name: &str) -> FunctionRecord {
    FunctionRecord {
        name: name.into(),
        versions: BTreeMap::from([(
            LATEST.to_string(),
            VersionRecord {
                version: LATEST.into(),
                spec: tests::spec(),
                state: State::Pending,
                state_reason: None,
                state_reason_code: None,
                snapshot: None,
                update_in_progress: false,
                last_modified: "t".into(),
                revision_id: "r".into(),
            },
        )]),
        aliases: BTreeMap::new(),
        next_version: 1,
        reserved_concurrency: None,
        provisioned: BTreeMap::new(),
        egress: Default::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn spec() -> FunctionSpec {
        FunctionSpec {
            runtime: "python3.11".into(),
            handler: "app.handler".into(),
            memory_mib: 128,
            timeout_secs: 3,
            environment: BTreeMap::new(),
            description: String::new(),
            code_sha256: "00".into(),
            code_size: 1,
            file_system: None,
            ephemeral_mib: None,
        }
    }

    #[test]
    fn runtimes_parse_like_lambda_identifiers() {
        assert_eq!(RuntimeKind::parse("python3.12"), Some(RuntimeKind::Python3));
        assert_eq!(RuntimeKind::parse("python3"), Some(RuntimeKind::Python3));
        assert_eq!(
            RuntimeKind::parse("provided.al2023"),
            Some(RuntimeKind::Provided)
        );
        assert_eq!(RuntimeKind::parse("python3."), None);
        assert_eq!(RuntimeKind::parse("nodejs18.x"), Some(RuntimeKind::Nodejs));
        // Only the Node.js the root filesystem has (Debian's 18).
        assert_eq!(RuntimeKind::parse("nodejs20.x"), None);
    }

    #[test]
    fn names_follow_lambda_rules() {
        assert!(validate_function_name("my-func_1").is_ok());
        assert!(validate_function_name("").is_err());
        assert!(validate_function_name("a/b").is_err());
        assert!(validate_function_name(&"x".repeat(65)).is_err());
        assert!(validate_alias_name("prod").is_ok());
        assert!(validate_alias_name("12").is_err());
    }

    #[test]
    fn spec_checks_limits_handler_and_env() {
        assert!(validate_spec(&spec()).is_ok());
        let mut s = spec();
        s.memory_mib = 64;
        assert!(validate_spec(&s).unwrap_err().0.contains("MemorySize"));
        let mut s = spec();
        s.timeout_secs = 901;
        assert!(validate_spec(&s).is_err());
        let mut s = spec();
        s.handler = "nodot".into();
        assert!(validate_spec(&s).unwrap_err().0.contains("module.function"));
        let mut s = spec();
        s.environment.insert("AWS_REGION".into(), "x".into());
        assert!(validate_spec(&s).unwrap_err().0.contains("reserved"));
        let mut s = spec();
        s.environment.insert("1BAD".into(), "x".into());
        assert!(validate_spec(&s).is_err());
        let mut s = spec();
        s.runtime = "provided".into();
        s.handler = "anything".into();
        assert!(validate_spec(&s).is_ok());
    }

    #[test]
    fn qualifiers_resolve_versions_and_aliases() {
        let v = |n: &str| VersionRecord {
            version: n.into(),
            spec: spec(),
            state: State::Active,
            state_reason: None,
            state_reason_code: None,
            snapshot: None,
            update_in_progress: false,
            last_modified: String::new(),
            revision_id: String::new(),
        };
        let mut f = FunctionRecord {
            name: "f".into(),
            versions: BTreeMap::from([(LATEST.into(), v(LATEST)), ("1".into(), v("1"))]),
            aliases: BTreeMap::new(),
            next_version: 2,
            reserved_concurrency: None,
            provisioned: BTreeMap::new(),
            egress: Default::default(),
        };
        f.aliases.insert(
            "prod".into(),
            AliasRecord {
                name: "prod".into(),
                function_version: "1".into(),
                description: String::new(),
                revision_id: String::new(),
            },
        );
        assert_eq!(f.resolve(None).unwrap().version, LATEST);
        assert_eq!(f.resolve(Some("1")).unwrap().version, "1");
        assert_eq!(f.resolve(Some("prod")).unwrap().version, "1");
        assert!(f.resolve(Some("2")).is_none());
        assert_eq!(f.published(), vec![1]);
    }
}
