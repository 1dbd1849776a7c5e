//! Functions as the cluster keeps them: one record per function under its
//! account (`/ember/functions/<account>/<name>`), holding `$LATEST`, the
//! published versions, the aliases and the concurrency settings. Every
//! change is a compare-and-swap on the record's version (an etcd
//! transaction), so replicas changing one function at once never lose a
//! write: the loser reads again and reapplies its change.

use std::collections::BTreeMap;

use ember_store::{Expect, Store};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use ember_lambda::error::ApiError;

pub const FUNCTIONS_PREFIX: &str = "/ember/functions/";
pub const LATEST: &str = "$LATEST";

/// Everything that goes into a version's snapshot on a host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Spec {
    pub runtime: String,
    pub handler: String,
    pub memory_size: u32,
    pub timeout: u32,
    pub environment: BTreeMap<String, String>,
    /// Hex SHA-256 of the zip (the key in [`crate::code`]).
    pub code_sha256: String,
    pub code_size: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Version {
    pub version: String,
    pub spec: Spec,
    pub description: String,
    pub last_modified: String,
    pub revision_id: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Alias {
    pub name: String,
    pub function_version: String,
    pub description: String,
    /// Lambda's `RoutingConfig.AdditionalVersionWeights`: version → share.
    #[serde(default)]
    pub additional_version_weights: BTreeMap<String, f64>,
    pub revision_id: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct FunctionRecord {
    pub account: String,
    pub name: String,
    pub latest: Version,
    #[serde(default)]
    pub versions: BTreeMap<u64, Version>,
    pub next_version: u64,
    #[serde(default)]
    pub aliases: BTreeMap<String, Alias>,
    pub reserved_concurrency: Option<u32>,
    /// Qualifier → instances kept warm somewhere in the cluster.
    #[serde(default)]
    pub provisioned: BTreeMap<String, u32>,
}

impl FunctionRecord {
    /// The version a qualifier names: none or `$LATEST`, a number, or an
    /// alias (its primary version).
    pub fn resolve(&self, q: Option<&str>) -> Option<&Version> {
        match q {
            None | Some(LATEST) => Some(&self.latest),
            Some(q) => match q.parse::<u64>() {
                Ok(n) => self.versions.get(&n),
                Err(_) => self
                    .aliases
                    .get(q)
                    .and_then(|a| self.resolve(Some(&a.function_version))),
            },
        }
    }

    /// Like [`resolve`](Self::resolve), with an alias's weighted routing:
    /// `roll` in [0, 1) picks an additional version with its weight.
    pub fn route(&self, q: Option<&str>, roll: f64) -> Option<&Version> {
        if let Some(a) = q.and_then(|q| self.aliases.get(q)) {
            let mut acc = 0.0;
            for (v, w) in &a.additional_version_weights {
                acc += w;
                if roll < acc {
                    return self.resolve(Some(v));
                }
            }
        }
        self.resolve(q)
    }

    pub fn arn(&self, region: &str, q: Option<&str>) -> String {
        function_arn(region, &self.account, &self.name, q)
    }

    /// Every version a host may need (for clean-up on delete).
    pub fn all_versions(&self) -> impl Iterator<Item = &Version> {
        std::iter::once(&self.latest).chain(self.versions.values())
    }
}

pub fn function_arn(region: &str, account: &str, name: &str, q: Option<&str>) -> String {
    match q {
        Some(q) => format!("arn:aws:lambda:{region}:{account}:function:{name}:{q}"),
        None => format!("arn:aws:lambda:{region}:{account}:function:{name}"),
    }
}

/// The name of a version's deployment on hosts: the account, function and
/// spec hashed, so two accounts' (or functions') same-named code never
/// meet, and publishing `$LATEST` unchanged reuses its snapshot.
pub fn deployment_name(account: &str, function: &str, spec: &Spec) -> String {
    let mut h = Sha256::new();
    h.update(account.as_bytes());
    h.update([0]);
    h.update(function.as_bytes());
    h.update([0]);
    h.update(serde_json::to_vec(spec).expect("serialisable"));
    format!("c{}", &hex::encode(h.finalize())[..24])
}

fn key(account: &str, name: &str) -> String {
    format!("{FUNCTIONS_PREFIX}{account}/{name}")
}

fn store_err(e: ember_store::StoreError) -> ApiError {
    ApiError::service(format!("cluster store: {e}"))
}

pub async fn get(store: &Store, account: &str, name: &str) -> Result<FunctionRecord, ApiError> {
    let v = store.get(&key(account, name)).await.map_err(store_err)?;
    v.and_then(|v| serde_json::from_slice(&v.value).ok())
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "Function not found: {}",
                function_arn("us-east-1", account, name, None)
            ))
        })
}

/// Creates the record; a conflict if the function exists.
pub async fn create(store: &Store, rec: &FunctionRecord) -> Result<(), ApiError> {
    let body = serde_json::to_vec(rec).expect("serialisable");
    match store
        .compare_and_swap(&key(&rec.account, &rec.name), Expect::Absent, &body, None)
        .await
        .map_err(store_err)?
    {
        Some(_) => Ok(()),
        None => Err(ApiError::conflict(format!(
            "Function already exist: {}",
            rec.name
        ))),
    }
}

/// Applies `f` to the record and writes it back, retrying on a concurrent
/// change. `f` may refuse with an error, which is returned as is.
pub async fn modify<T>(
    store: &Store,
    account: &str,
    name: &str,
    mut f: impl FnMut(&mut FunctionRecord) -> Result<T, ApiError>,
) -> Result<(FunctionRecord, T), ApiError> {
    let k = key(account, name);
    loop {
        let cur = store.get(&k).await.map_err(store_err)?;
        let Some(cur) = cur else {
            // The not-found error, shaped once.
            get(store, account, name).await?;
            continue;
        };
        let mut rec: FunctionRecord = serde_json::from_slice(&cur.value)
            .map_err(|e| ApiError::service(format!("unreadable record {k}: {e}")))?;
        let out = f(&mut rec)?;
        let body = serde_json::to_vec(&rec).expect("serialisable");
        if store
            .compare_and_swap(&k, Expect::Version(cur.version), &body, None)
            .await
            .map_err(store_err)?
            .is_some()
        {
            return Ok((rec, out));
        }
    }
}

/// Deletes the record; returns it (for cleaning its deployments up).
pub async fn delete(store: &Store, account: &str, name: &str) -> Result<FunctionRecord, ApiError> {
    let k = key(account, name);
    loop {
        let cur = store.get(&k).await.map_err(store_err)?;
        let Some(cur) = cur else {
            return Err(get(store, account, name)
                .await
                .err()
                .unwrap_or_else(|| ApiError::not_found(format!("Function not found: {name}"))));
        };
        let rec: FunctionRecord = serde_json::from_slice(&cur.value)
            .map_err(|e| ApiError::service(format!("unreadable record {k}: {e}")))?;
        if store
            .compare_and_delete(&k, Expect::Version(cur.version))
            .await
            .map_err(store_err)?
        {
            return Ok(rec);
        }
    }
}

/// An account's functions, by name; all accounts' with `None`.
pub async fn list(store: &Store, account: Option<&str>) -> Result<Vec<FunctionRecord>, ApiError> {
    let prefix = match account {
        Some(a) => format!("{FUNCTIONS_PREFIX}{a}/"),
        None => FUNCTIONS_PREFIX.to_string(),
    };
    Ok(store
        .list(&prefix)
        .await
        .map_err(store_err)?
        .into_iter()
        .filter_map(|(_, v)| serde_json::from_slice(&v.value).ok())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(n: &str, sha: &str) -> Version {
        Version {
            version: n.into(),
            spec: Spec {
                runtime: "provided".into(),
                handler: "h".into(),
                memory_size: 128,
                timeout: 3,
                environment: BTreeMap::new(),
                code_sha256: sha.into(),
                code_size: 1,
            },
            description: String::new(),
            last_modified: String::new(),
            revision_id: String::new(),
        }
    }

    fn record() -> FunctionRecord {
        let mut r = FunctionRecord {
            account: "111122223333".into(),
            name: "f".into(),
            latest: version(LATEST, "c"),
            versions: BTreeMap::new(),
            next_version: 3,
            aliases: BTreeMap::new(),
            reserved_concurrency: None,
            provisioned: BTreeMap::new(),
        };
        r.versions.insert(1, version("1", "a"));
        r.versions.insert(2, version("2", "b"));
        r.aliases.insert(
            "live".into(),
            Alias {
                name: "live".into(),
                function_version: "1".into(),
                description: String::new(),
                additional_version_weights: [("2".to_string(), 0.25)].into(),
                revision_id: String::new(),
            },
        );
        r
    }

    #[test]
    fn qualifiers_and_weighted_routing() {
        let r = record();
        assert_eq!(r.resolve(None).unwrap().version, LATEST);
        assert_eq!(r.resolve(Some("2")).unwrap().version, "2");
        assert_eq!(r.resolve(Some("live")).unwrap().version, "1");
        assert!(r.resolve(Some("9")).is_none() && r.resolve(Some("nope")).is_none());
        assert_eq!(r.route(Some("live"), 0.1).unwrap().version, "2");
        assert_eq!(r.route(Some("live"), 0.3).unwrap().version, "1");
        assert_eq!(r.route(Some("1"), 0.1).unwrap().version, "1");
    }

    #[test]
    fn deployment_names_separate_accounts_and_reuse_unchanged_specs() {
        let r = record();
        let n = |acct: &str, f: &str, v: &Version| deployment_name(acct, f, &v.spec);
        let latest = n("111122223333", "f", &r.latest);
        assert!(latest.len() <= 64 && latest.starts_with('c'));
        assert_ne!(latest, n("444455556666", "f", &r.latest));
        assert_ne!(latest, n("111122223333", "g", &r.latest));
        let mut same = r.latest.clone();
        same.version = "3".into();
        same.description = "published".into();
        assert_eq!(latest, n("111122223333", "f", &same));
    }

    #[tokio::test]
    async fn modify_is_compare_and_swap() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&[], dir.path()).await.unwrap();
        let r = record();
        create(&store, &r).await.unwrap();
        assert_eq!(create(&store, &r).await.unwrap_err().status, 409);
        let (rec, n) = modify(&store, &r.account, "f", |rec| {
            rec.next_version += 1;
            Ok(rec.next_version)
        })
        .await
        .unwrap();
        assert_eq!((rec.next_version, n), (4, 4));
        assert_eq!(get(&store, &r.account, "f").await.unwrap().next_version, 4);
        assert_eq!(
            get(&store, "444455556666", "f").await.unwrap_err().status,
            404
        );
        assert_eq!(list(&store, Some(&r.account)).await.unwrap().len(), 1);
        delete(&store, &r.account, "f").await.unwrap();
        assert_eq!(
            delete(&store, &r.account, "f").await.unwrap_err().status,
            404
        );
    }
}
