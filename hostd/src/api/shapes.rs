//! Lambda's shapes (`ember_lambda::shapes`) as emberd fills them from its
//! records, and the volume ARNs of `FileSystemConfigs`.

use crate::daemon::Daemon;
use crate::model::{AliasRecord, State, VersionRecord};
pub use ember_lambda::shapes::*;

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
) -> Result<Option<crate::model::FileSystem>, ember_lambda::error::ApiError> {
    let configs = configs.unwrap_or_default();
    if configs.len() > 1 {
        return Err(ember_lambda::error::ApiError::invalid(
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
            ember_lambda::error::ApiError::invalid(format!(
                "FileSystemConfigs: {:?} is not an Ember volume ARN (arn:aws:ember:REGION:ACCOUNT:volume/NAME)",
                c.arn
            ))
        })?;
    if !arn_account.is_empty() && arn_account != account {
        return Err(ember_lambda::error::ApiError::access_denied(format!(
                "FileSystemConfigs: {:?} is a volume of account {arn_account:?}; a function of account {account} may only mount its own account's volumes",
                c.arn
            ),
        ));
    }
    if !arn_region.is_empty() && arn_region != region {
        return Err(ember_lambda::error::ApiError::invalid(format!(
            "FileSystemConfigs: {:?} is a volume of region {arn_region:?}, not this host's ({region})",
            c.arn
        )));
    }
    Ok(Some(crate::model::FileSystem {
        volume,
        mount_path: c.local_mount_path,
    }))
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
        function_arn: d.functions.function_arn(name, qualifier),
        runtime: v.spec.runtime.clone(),
        role: None,
        handler: v.spec.handler.clone(),
        code_size: v.spec.code_size,
        code_sha256: sha_b64,
        description: v.spec.description.clone(),
        timeout: v.spec.timeout_secs,
        memory_size: v.spec.memory_mib,
        last_modified: v.last_modified.clone(),
        version: v.version.clone(),
        environment: Environment {
            variables: Some(v.spec.environment.clone()),
        },
        state: v.state.as_str().into(),
        state_reason: v.state_reason.clone(),
        state_reason_code: v.state_reason_code.clone(),
        last_update_status: last_update_status.into(),
        revision_id: v.revision_id.clone(),
        package_type: FunctionConfiguration::PACKAGE_TYPE.into(),
        architectures: vec![FunctionConfiguration::ARCHITECTURE.into()],
        init_duration_ms: v.snapshot.as_ref().map(|s| s.init_duration_ms),
        ephemeral_storage: Some(EphemeralStorage {
            size: v.spec.ephemeral_mib.unwrap_or(512),
        }),
        file_system_configs: v.spec.file_system.as_ref().map(|fs| {
            vec![FileSystemConfig {
                arn: volume_arn(d, &fs.volume),
                local_mount_path: fs.mount_path.clone(),
            }]
        }),
    }
}

pub fn alias(d: &Daemon, function: &str, a: &AliasRecord) -> AliasConfiguration {
    AliasConfiguration {
        alias_arn: d.functions.function_arn(function, Some(&a.name)),
        name: a.name.clone(),
        function_version: a.function_version.clone(),
        description: a.description.clone(),
        revision_id: a.revision_id.clone(),
        routing_config: None,
    }
}

#[cfg(test)]
mod volume_arn_tests {
    use super::*;

    fn parse(arn: &str) -> Result<Option<crate::model::FileSystem>, ember_lambda::error::ApiError> {
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
