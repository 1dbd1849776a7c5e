//! Lambda's request and response shapes (its REST API, `2015-03-31`), each
//! defined once: emberd and the cluster parse and answer with these, and
//! the cluster sends them on to hosts. Fields one side does not have are
//! `Option`s left out of the JSON when empty.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::ApiError;
use crate::rules::Invalid;

/// A request's JSON body (empty reads as `{}`), with Lambda's error when
/// it is not the shape asked for.
pub fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let body = if body.is_empty() {
        b"{}" as &[u8]
    } else {
        body
    };
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("Could not parse request body into json: {e}")))
}

/// Lambda's `Environment` (requests) and `EnvironmentResponse`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Environment {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variables: Option<BTreeMap<String, String>>,
}

/// The `?Qualifier=` of the paths that take one.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct QualifierQuery {
    pub qualifier: Option<String>,
}

/// Lambda's `FunctionCode` (Ember takes only a zip).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct FunctionCode {
    /// Base64 of the zip.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zip_file: Option<String>,
}

/// Lambda's `EphemeralStorage` (`/tmp`), in MB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct EphemeralStorage {
    pub size: u32,
}

/// Lambda's `FileSystemConfig`; the ARN names an Ember volume
/// (`arn:aws:ember:REGION:ACCOUNT:volume/NAME`) in the place of an EFS
/// access point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct FileSystemConfig {
    pub arn: String,
    pub local_mount_path: String,
}

/// Lambda's `AliasRoutingConfiguration`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RoutingConfig {
    #[serde(default)]
    pub additional_version_weights: BTreeMap<String, f64>,
}

/// CreateFunction's request.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct CreateFunction {
    /// Required; an `Option` so that its absence gets Lambda's error.
    pub function_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub runtime: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub handler: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<FunctionCode>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_size: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub environment: Option<Environment>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default)]
    pub publish: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ephemeral_storage: Option<EphemeralStorage>,
    /// At most one, naming an Ember volume.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file_system_configs: Option<Vec<FileSystemConfig>>,
    /// Accepted and ignored (no IAM here).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
}

impl FunctionCode {
    /// The zip, decoded; Lambda's errors when it is missing, not base64 or
    /// not a zip.
    pub fn zip(zip_file: Option<&str>) -> Result<Vec<u8>, ApiError> {
        use base64::Engine;
        let b64 = zip_file.ok_or_else(|| ApiError::invalid("Code.ZipFile is required"))?;
        let zip = base64::engine::general_purpose::STANDARD
            .decode(b64.trim())
            .map_err(|e| ApiError::invalid(format!("ZipFile is not valid base64: {e}")))?;
        if !zip.starts_with(b"PK") {
            return Err(ApiError::invalid(
                "Could not unzip uploaded file. Please check your file, then try to upload again.",
            ));
        }
        Ok(zip)
    }
}

impl CreateFunction {
    /// `FunctionName`, which Lambda requires.
    pub fn name(&self) -> Result<&str, Invalid> {
        self.function_name
            .as_deref()
            .ok_or_else(|| Invalid("FunctionName is required".into()))
    }
}

/// UpdateFunctionConfiguration's request.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct UpdateConfiguration {
    pub runtime: Option<String>,
    pub handler: Option<String>,
    pub memory_size: Option<u32>,
    pub timeout: Option<u32>,
    pub environment: Option<Environment>,
    pub description: Option<String>,
}

/// UpdateFunctionCode's request.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct UpdateCode {
    pub zip_file: Option<String>,
    #[serde(default)]
    pub publish: bool,
}

/// PublishVersion's request.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct PublishVersion {
    pub description: Option<String>,
    pub code_sha256: Option<String>,
}

/// CreateAlias's and UpdateAlias's request.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct AliasRequest {
    pub name: Option<String>,
    pub function_version: Option<String>,
    pub description: Option<String>,
    pub routing_config: Option<RoutingConfig>,
}

/// PutFunctionConcurrency's request, and GetFunctionConcurrency's answer
/// (empty when none is reserved).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Concurrency {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reserved_concurrent_executions: Option<i64>,
}

impl Concurrency {
    /// The reservation asked for, within Lambda's range.
    pub fn checked(&self) -> Result<u32, Invalid> {
        let n = self
            .reserved_concurrent_executions
            .ok_or_else(|| Invalid("ReservedConcurrentExecutions is required".into()))?;
        u32::try_from(n)
            .ok()
            .filter(|n| *n <= 10_000)
            .ok_or_else(|| {
                Invalid(format!(
                    "ReservedConcurrentExecutions {n} is outside 0 to 10000"
                ))
            })
    }

    pub fn reserved(n: Option<u32>) -> Concurrency {
        Concurrency {
            reserved_concurrent_executions: n.map(i64::from),
        }
    }
}

/// PutProvisionedConcurrencyConfig's request.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ProvisionedRequest {
    pub provisioned_concurrent_executions: Option<i64>,
}

impl ProvisionedRequest {
    /// The count asked for, within Lambda's range.
    pub fn checked(&self) -> Result<u32, Invalid> {
        let n = self
            .provisioned_concurrent_executions
            .ok_or_else(|| Invalid("ProvisionedConcurrentExecutions is required".into()))?;
        u32::try_from(n)
            .ok()
            .filter(|n| (1..=1000).contains(n))
            .ok_or_else(|| {
                Invalid(format!(
                    "ProvisionedConcurrentExecutions {n} is outside 1 to 1000"
                ))
            })
    }
}

/// Lambda's `FunctionConfiguration`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct FunctionConfiguration {
    pub function_name: String,
    pub function_arn: String,
    pub runtime: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    pub handler: String,
    pub code_size: u64,
    pub code_sha256: String,
    pub description: String,
    pub timeout: u32,
    pub memory_size: u32,
    pub last_modified: String,
    pub version: String,
    pub environment: Environment,
    /// `Pending`, `Active`, `Inactive` or `Failed`.
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_reason_code: Option<String>,
    /// `Successful`, `Failed` or `InProgress`.
    pub last_update_status: String,
    pub revision_id: String,
    pub package_type: String,
    pub architectures: Vec<String>,
    /// Ember: how long the runtime took to initialize before its snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_duration_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_system_configs: Option<Vec<FileSystemConfig>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ephemeral_storage: Option<EphemeralStorage>,
}

impl FunctionConfiguration {
    /// What every Ember function is: a zip, on x86_64.
    pub const PACKAGE_TYPE: &'static str = "Zip";
    pub const ARCHITECTURE: &'static str = "x86_64";
}

/// Lambda's `AliasConfiguration`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct AliasConfiguration {
    pub alias_arn: String,
    pub name: String,
    pub function_version: String,
    pub description: String,
    pub revision_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routing_config: Option<RoutingConfig>,
}

/// Lambda's `FunctionCodeLocation` (Ember: where the zip is kept).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct FunctionCodeLocation {
    pub repository_type: String,
    pub location: String,
}

impl FunctionCodeLocation {
    pub fn ember(location: String) -> FunctionCodeLocation {
        FunctionCodeLocation {
            repository_type: "Ember".into(),
            location,
        }
    }
}

/// GetFunction's answer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct GetFunction {
    pub configuration: FunctionConfiguration,
    pub code: FunctionCodeLocation,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<Concurrency>,
}

/// ListFunctions's answer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ListFunctions {
    pub functions: Vec<FunctionConfiguration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_marker: Option<String>,
}

/// ListVersionsByFunction's answer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ListVersions {
    pub versions: Vec<FunctionConfiguration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_marker: Option<String>,
}

/// ListAliases's answer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ListAliases {
    pub aliases: Vec<AliasConfiguration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_marker: Option<String>,
}

/// Lambda's `CodeSha256`: the base64 of the digest kept as hex.
pub fn code_sha256_b64(hex_digest: &str) -> String {
    use base64::Engine;
    let bytes = hex::decode(hex_digest).unwrap_or_default();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a host is sent is what a host parses, field for field.
    #[test]
    fn create_function_round_trips() {
        let c = CreateFunction {
            function_name: Some("f".into()),
            runtime: Some("provided.al2023".into()),
            memory_size: Some(256),
            environment: Some(Environment {
                variables: Some(BTreeMap::from([("A".into(), "b".into())])),
            }),
            code: Some(FunctionCode {
                zip_file: Some("UEsFBg==".into()),
            }),
            ephemeral_storage: Some(EphemeralStorage { size: 1024 }),
            ..Default::default()
        };
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(json["Environment"]["Variables"]["A"], "b");
        assert_eq!(json["EphemeralStorage"]["Size"], 1024);
        assert!(json.get("Handler").is_none());
        assert_eq!(serde_json::from_value::<CreateFunction>(json).unwrap(), c);
        assert!(CreateFunction::default().name().is_err());
    }

    #[test]
    fn concurrency_limits_are_lambdas() {
        let c = |n| Concurrency {
            reserved_concurrent_executions: n,
        };
        assert_eq!(c(Some(0)).checked().unwrap(), 0);
        assert!(c(Some(10_001)).checked().is_err());
        assert!(c(Some(-1)).checked().is_err());
        assert!(c(None).checked().is_err());
        let p = |n| ProvisionedRequest {
            provisioned_concurrent_executions: n,
        };
        assert_eq!(p(Some(1)).checked().unwrap(), 1);
        assert!(p(Some(0)).checked().is_err());
        assert!(p(Some(1001)).checked().is_err());
        assert_eq!(
            serde_json::to_string(&Concurrency::reserved(None)).unwrap(),
            "{}"
        );
    }

    #[test]
    fn code_sha256_is_base64_of_the_digest() {
        assert_eq!(code_sha256_b64("00ff"), "AP8=");
    }
}
