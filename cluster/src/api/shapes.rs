//! Lambda's shapes (`ember_lambda::shapes`) as the cluster fills them from
//! its records.

use crate::functions::{Alias, FunctionRecord, Version, LATEST};
pub use ember_lambda::shapes::*;

/// A build's state as a host reports it (or Active when on no host yet:
/// it is built on its first invocation).
#[derive(Debug, Clone)]
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
pub fn configuration(
    rec: &FunctionRecord,
    region: &str,
    v: &Version,
    st: &BuildStatus,
) -> FunctionConfiguration {
    let q = (v.version != LATEST).then_some(v.version.as_str());
    FunctionConfiguration {
        function_name: rec.name.clone(),
        function_arn: rec.arn(region, q),
        runtime: v.spec.runtime.clone(),
        role: Some(format!("arn:aws:iam::{}:role/ember", rec.account)),
        handler: v.spec.handler.clone(),
        code_size: v.spec.code_size,
        code_sha256: code_sha256_b64(&v.spec.code_sha256),
        description: v.description.clone(),
        timeout: v.spec.timeout,
        memory_size: v.spec.memory_size,
        last_modified: v.last_modified.clone(),
        version: v.version.clone(),
        environment: Environment {
            variables: Some(v.spec.environment.clone()),
        },
        state: st.state.into(),
        state_reason: st.reason.clone(),
        last_update_status: st.last_update_status.into(),
        revision_id: v.revision_id.clone(),
        package_type: FunctionConfiguration::PACKAGE_TYPE.into(),
        architectures: vec![FunctionConfiguration::ARCHITECTURE.into()],
        ..Default::default()
    }
}

pub fn alias(rec: &FunctionRecord, region: &str, a: &Alias) -> AliasConfiguration {
    AliasConfiguration {
        alias_arn: rec.arn(region, Some(&a.name)),
        name: a.name.clone(),
        function_version: a.function_version.clone(),
        description: a.description.clone(),
        revision_id: a.revision_id.clone(),
        routing_config: (!a.additional_version_weights.is_empty()).then(|| RoutingConfig {
            additional_version_weights: a.additional_version_weights.clone(),
        }),
    }
}
