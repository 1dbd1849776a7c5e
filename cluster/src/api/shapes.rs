//! Lambda's JSON shapes, as the cluster takes and gives them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::functions::{Alias, FunctionRecord, Version, LATEST};
pub use crate::lambda::{code_sha256_b64, CodeIn, EnvironmentIn, UpdateCode, UpdateConfiguration};

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct CreateFunction {
    pub function_name: Option<String>,
    pub runtime: Option<String>,
    pub handler: Option<String>,
    pub code: Option<CodeIn>,
    pub memory_size: Option<u32>,
    pub timeout: Option<u32>,
    pub environment: Option<EnvironmentIn>,
    pub description: Option<String>,
    #[serde(default)]
    pub publish: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct PublishIn {
    pub description: Option<String>,
    pub code_sha256: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RoutingIn {
    #[serde(default)]
    pub additional_version_weights: BTreeMap<String, f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct AliasIn {
    pub name: Option<String>,
    pub function_version: Option<String>,
    pub description: Option<String>,
    pub routing_config: Option<RoutingIn>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ConcurrencyIn {
    pub reserved_concurrent_executions: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ProvisionedIn {
    pub provisioned_concurrent_executions: Option<i64>,
}

/// A build's state as a host reports it (or Active when on no host yet:
/// it is built on its first invocation).
#[derive(Debug, Clone, Serialize)]
pub struct BuildStatus {
    pub state: &'static str,
    pub last_update_status: &'static str,
    pub reason: Option<String>,
}

impl BuildStatus {
    pub fn active() -> BuildStatus {
        BuildStatus {
            state: "Active",
            last_update_status: "Successful",
            reason: None,
        }
    }
}

/// Lambda's `FunctionConfiguration`.
pub fn configuration(rec: &FunctionRecord, region: &str, v: &Version, st: &BuildStatus) -> Value {
    let q = (v.version != LATEST).then_some(v.version.as_str());
    let mut out = json!({
        "FunctionName": rec.name,
        "FunctionArn": rec.arn(region, q),
        "Runtime": v.spec.runtime,
        "Role": format!("arn:aws:iam::{}:role/ember", rec.account),
        "Handler": v.spec.handler,
        "CodeSize": v.spec.code_size,
        "CodeSha256": code_sha256_b64(&v.spec.code_sha256),
        "Description": v.description,
        "Timeout": v.spec.timeout,
        "MemorySize": v.spec.memory_size,
        "LastModified": v.last_modified,
        "Version": v.version,
        "Environment": {"Variables": v.spec.environment},
        "State": st.state,
        "LastUpdateStatus": st.last_update_status,
        "RevisionId": v.revision_id,
        "PackageType": "Zip",
        "Architectures": ["x86_64"],
    });
    if let Some(r) = &st.reason {
        out["StateReason"] = json!(r);
    }
    out
}

pub fn alias(rec: &FunctionRecord, region: &str, a: &Alias) -> Value {
    let mut out = json!({
        "AliasArn": rec.arn(region, Some(&a.name)),
        "Name": a.name,
        "FunctionVersion": a.function_version,
        "Description": a.description,
        "RevisionId": a.revision_id,
    });
    if !a.additional_version_weights.is_empty() {
        out["RoutingConfig"] = json!({"AdditionalVersionWeights": a.additional_version_weights});
    }
    out
}
