//! Lambda's JSON shapes for functions, versions and aliases.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::daemon::Daemon;
use crate::model::{AliasRecord, State, VersionRecord};
pub use ember_cluster::lambda::{
    code_sha256_b64, CodeIn, EnvironmentIn, UpdateCode, UpdateConfiguration,
};

/// CreateFunction's request.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct CreateFunction {
    pub function_name: String,
    pub runtime: Option<String>,
    pub handler: Option<String>,
    pub code: Option<CodeIn>,
    pub memory_size: Option<u32>,
    pub timeout: Option<u32>,
    pub environment: Option<EnvironmentIn>,
    pub description: Option<String>,
    #[serde(default)]
    pub publish: bool,
    pub ephemeral_storage: Option<EphemeralStorage>,
    /// At most one, naming an Ember volume (see [`volume_arn`]).
    #[serde(default)]
    pub file_system_configs: Option<Vec<FileSystemConfig>>,
    /// Accepted and ignored (no IAM here).
    #[allow(dead_code)]
    pub role: Option<String>,
}

/// Lambda's `EphemeralStorage` (`/tmp`), in MB.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct EphemeralStorage {
    pub size: u32,
}

/// Lambda's `FileSystemConfig`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct FileSystemConfig {
    pub arn: String,
    pub local_mount_path: String,
}

/// An Ember volume's ARN, in the place of an EFS access point's.
pub fn volume_arn(d: &Daemon, volume: &str) -> String {
    format!(
        "arn:aws:ember:{}:{}:volume/{volume}",
        d.cfg.region, d.cfg.account
    )
}

/// The file system of CreateFunction's `FileSystemConfigs`, for a
/// function of `account` in `region` (this host's): the ARN's region and
/// account must be those, or empty (meaning those); a volume of another
/// account is refused here, and the volume service refuses it again when
/// it is attached (hostd names its account there).
pub fn file_system(
    configs: Option<Vec<FileSystemConfig>>,
    region: &str,
    account: &str,
) -> Result<Option<crate::model::FileSystem>, crate::error::ApiError> {
    let configs = configs.unwrap_or_default();
    if configs.len() > 1 {
        return Err(crate::error::ApiError::invalid(
            "FileSystemConfigs: at most one file system per function",
        ));
    }
    let Some(c) = configs.into_iter().next() else {
        return Ok(None);
    };
    let (arn_region, arn_account, volume) = c
        .arn
        .strip_prefix("arn:aws:ember:")
        .and_then(|r| r.split_once(":volume/"))
        .and_then(|(ra, v)| ra.split_once(':').map(|(r, a)| (r, a, v.to_string())))
        .ok_or_else(|| {
            crate::error::ApiError::invalid(format!(
                "FileSystemConfigs: {:?} is not an Ember volume ARN (arn:aws:ember:REGION:ACCOUNT:volume/NAME)",
                c.arn
            ))
        })?;
    if !arn_account.is_empty() && arn_account != account {
        return Err(crate::error::ApiError::new(
            axum::http::StatusCode::FORBIDDEN,
            "AccessDeniedException",
            format!(
                "FileSystemConfigs: {:?} is a volume of account {arn_account:?}; a function of account {account} may only mount its own account's volumes",
                c.arn
            ),
        ));
    }
    if !arn_region.is_empty() && arn_region != region {
        return Err(crate::error::ApiError::invalid(format!(
            "FileSystemConfigs: {:?} is a volume of region {arn_region:?}, not this host's ({region})",
            c.arn
        )));
    }
    Ok(Some(crate::model::FileSystem {
        volume,
        mount_path: c.local_mount_path,
    }))
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct AliasIn {
    pub name: Option<String>,
    pub function_version: Option<String>,
    pub description: Option<String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct Environment {
    pub variables: BTreeMap<String, String>,
}

/// Lambda's `FunctionConfiguration`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct FunctionConfiguration {
    pub function_name: String,
    pub function_arn: String,
    pub runtime: String,
    pub handler: String,
    pub code_size: u64,
    pub code_sha256: String,
    pub description: String,
    pub timeout: u32,
    pub memory_size: u32,
    pub last_modified: String,
    pub version: String,
    pub environment: Environment,
    pub state: State,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_reason_code: Option<String>,
    pub last_update_status: &'static str,
    pub revision_id: String,
    pub package_type: &'static str,
    pub architectures: [&'static str; 1],
    /// Ember: how long the runtime took to initialize before its snapshot.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub init_duration_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file_system_configs: Option<Vec<FileSystemConfig>>,
    pub ephemeral_storage: EphemeralStorage,
}

pub fn configuration(d: &Daemon, name: &str, v: &VersionRecord) -> FunctionConfiguration {
    let sha_b64 = code_sha256_b64(&v.spec.code_sha256);
    let last_update_status = if v.update_in_progress || v.state == State::Pending {
        "InProgress"
    } else if v.state_reason_code.is_some() {
        "Failed"
    } else {
        "Successful"
    };
    let qualifier = (v.version != crate::model::LATEST).then_some(v.version.as_str());
    FunctionConfiguration {
        function_name: name.to_string(),
        function_arn: d.function_arn(name, qualifier),
        runtime: v.spec.runtime.clone(),
        handler: v.spec.handler.clone(),
        code_size: v.spec.code_size,
        code_sha256: sha_b64,
        description: v.spec.description.clone(),
        timeout: v.spec.timeout_secs,
        memory_size: v.spec.memory_mib,
        last_modified: v.last_modified.clone(),
        version: v.version.clone(),
        environment: Environment {
            variables: v.spec.environment.clone(),
        },
        state: v.state,
        state_reason: v.state_reason.clone(),
        state_reason_code: v.state_reason_code.clone(),
        last_update_status,
        revision_id: v.revision_id.clone(),
        package_type: "Zip",
        architectures: ["x86_64"],
        init_duration_ms: v.snapshot.as_ref().map(|s| s.init_duration_ms),
        ephemeral_storage: EphemeralStorage {
            size: v.spec.ephemeral_mib.unwrap_or(512),
        },
        file_system_configs: v.spec.file_system.as_ref().map(|fs| {
            vec![FileSystemConfig {
                arn: volume_arn(d, &fs.volume),
                local_mount_path: fs.mount_path.clone(),
            }]
        }),
    }
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct AliasConfiguration {
    pub alias_arn: String,
    pub name: String,
    pub function_version: String,
    pub description: String,
    pub revision_id: String,
}

pub fn alias(d: &Daemon, function: &str, a: &AliasRecord) -> AliasConfiguration {
    AliasConfiguration {
        alias_arn: d.function_arn(function, Some(&a.name)),
        name: a.name.clone(),
        function_version: a.function_version.clone(),
        description: a.description.clone(),
        revision_id: a.revision_id.clone(),
    }
}

#[cfg(test)]
mod volume_arn_tests {
    use super::*;

    fn parse(arn: &str) -> Result<Option<crate::model::FileSystem>, crate::error::ApiError> {
        file_system(
            Some(vec![FileSystemConfig {
                arn: arn.into(),
                local_mount_path: "/mnt/data".into(),
            }]),
            "us-east-1",
            "111122223333",
        )
    }

    #[test]
    fn volume_arns_of_another_account_are_refused() {
        let fs = parse("arn:aws:ember:us-east-1:111122223333:volume/data")
            .unwrap()
            .unwrap();
        assert_eq!(fs.volume, "data");
        // The CLI's form: this host's region and account.
        assert_eq!(
            parse("arn:aws:ember:::volume/data")
                .unwrap()
                .unwrap()
                .volume,
            "data"
        );
        let mut refused = 0;
        let tries = [
            "arn:aws:ember:us-east-1:999988887777:volume/data",
            "arn:aws:ember::999988887777:volume/data",
            "arn:aws:ember:us-east-1:11112222333:volume/data",
            "arn:aws:ember:us-east-1:111122223333 :volume/data",
            "arn:aws:ember:eu-west-1:111122223333:volume/data",
            "arn:aws:ember:us-east-1:volume/data",
            "arn:aws:ember:us-east-1:111122223333:999988887777:volume/data",
        ];
        for arn in tries {
            match parse(arn) {
                Err(e) => {
                    assert!(e.status.is_client_error(), "{arn}: {e:?}");
                    refused += 1;
                }
                Ok(fs) => panic!("{arn} accepted: {fs:?}"),
            }
        }
        assert_eq!(refused, tries.len());
        let e = parse("arn:aws:ember:us-east-1:999988887777:volume/data").unwrap_err();
        assert_eq!(e.status.as_u16(), 403);
        assert!(e.message.contains("account"), "{}", e.message);
    }
}
