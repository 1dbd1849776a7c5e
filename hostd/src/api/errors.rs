//! The one place the core's typed errors become Lambda's HTTP answers
//! (status and exception name).

use ember_lambda::error::ApiError;

use crate::code::CodeError;
use crate::functions::FunctionError;
use crate::invoke::InvokeError;
use crate::migrate::MigrateError;
use crate::pool::PoolError;
use crate::queue::QueueError;
use crate::volumes::VolumeError;

impl From<FunctionError> for ApiError {
    fn from(e: FunctionError) -> ApiError {
        use FunctionError::*;
        match e {
            NotFound { .. }
            | NoSuchVersion(_)
            | NoSuchAlias(_)
            | NoAliasTarget(_)
            | NoSuchQualifier(_) => ApiError::not_found(e.to_string()),
            AlreadyExists(_)
            | UpdateInProgress { .. }
            | LatestUpdating
            | VersionHasAlias(_)
            | AliasExists(_) => ApiError::conflict(e.to_string()),
            Invalid(_) | RuntimeUnavailable(_) | DeleteLatest | NoAliasVersion => {
                ApiError::invalid(e.to_string())
            }
            Code(CodeError::BadZip(_)) => ApiError::invalid(e.to_string()),
            Code(CodeError::TooLarge(_)) => ApiError::too_large(e.to_string()),
            Code(_) | Save { .. } | Delete { .. } | NoLatest | NoRootfs(_) => {
                ApiError::service(e.to_string())
            }
        }
    }
}

impl From<PoolError> for ApiError {
    fn from(e: PoolError) -> ApiError {
        match e {
            PoolError::Throttled { .. } => ApiError::throttled(e.to_string()),
            PoolError::Restore { .. } => ApiError::service(e.to_string()),
        }
    }
}

impl From<InvokeError> for ApiError {
    fn from(e: InvokeError) -> ApiError {
        match e {
            InvokeError::TooLarge => ApiError::too_large(e.to_string()),
            InvokeError::NoSuchQualifier { .. } => ApiError::not_found(e.to_string()),
            InvokeError::NotReady { .. } => ApiError::conflict(e.to_string()),
            InvokeError::NoConcurrency => ApiError::throttled(e.to_string()),
            InvokeError::Pool(e) => e.into(),
            InvokeError::Records(e) => e.into(),
            InvokeError::Function(e) => e,
        }
    }
}

impl From<QueueError> for ApiError {
    fn from(e: QueueError) -> ApiError {
        match e {
            QueueError::TooLarge => ApiError::too_large(e.to_string()),
            QueueError::Store(_) => ApiError::service(e.to_string()),
        }
    }
}

impl From<VolumeError> for ApiError {
    fn from(e: VolumeError) -> ApiError {
        use VolumeError::*;
        match e {
            // The volume service's own refusal keeps its meaning.
            Refused { status: 403, .. } | OtherAccount { .. } => {
                ApiError::access_denied(e.to_string())
            }
            Refused { status: 404, .. } => ApiError::not_found(e.to_string()),
            Refused { status: 409, .. } => ApiError::conflict(e.to_string()),
            Refused { status: 400, .. }
            | NotConfigured
            | InvalidName(_)
            | BadMountPath(_)
            | BadVolumeName(_) => ApiError::invalid(e.to_string()),
            Refused { .. }
            | Unreachable(_)
            | BadAnswer(_)
            | BadGrant(_)
            | NoSize(_)
            | NoEndpoint(_)
            | NoTlsIdentity { .. } => ApiError::service(e.to_string()),
        }
    }
}

impl From<MigrateError> for ApiError {
    fn from(e: MigrateError) -> ApiError {
        use MigrateError::*;
        match e {
            NotConfigured(_)
            | BadDestination { .. }
            | NotTls(_)
            | NoHost(_)
            | NoDiskSource(..)
            | NoVolume(_) => ApiError::invalid(e.to_string()),
            NoInstance(_) | VersionGone(..) | NoSuchVersion(..) | NoMigration(_) => {
                ApiError::not_found(e.to_string())
            }
            AlreadyMigrating(_)
            | StillBusy(_)
            | DiskArriving(_)
            | NotActive(..)
            | OtherCode { .. }
            | NoVolumeService(..)
            | NotReceiving(..)
            | NoVolumeServiceHere => ApiError::conflict(e.to_string()),
            Host(_) => ApiError::service(e.to_string()),
            // The other host failed its part: a bad gateway.
            Failed(_) => ApiError::new(
                axum::http::StatusCode::BAD_GATEWAY,
                "ServiceException",
                e.to_string(),
            ),
            Volume(e) => e.into(),
            Api(e) => e,
            Function(e) => e.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::State;
    use axum::http::StatusCode;

    #[test]
    fn each_core_error_answers_with_lambdas_status_and_exception() {
        let cases: Vec<(ApiError, StatusCode, &str)> = vec![
            (
                PoolError::Throttled {
                    function: "f".into(),
                    limit: 2,
                }
                .into(),
                StatusCode::TOO_MANY_REQUESTS,
                "TooManyRequestsException",
            ),
            (
                InvokeError::TooLarge.into(),
                StatusCode::PAYLOAD_TOO_LARGE,
                "RequestTooLargeException",
            ),
            (
                InvokeError::NotReady {
                    state: State::Pending,
                    reason: String::new(),
                }
                .into(),
                StatusCode::CONFLICT,
                "ResourceConflictException",
            ),
            (
                InvokeError::NoSuchQualifier { arn: "arn".into() }.into(),
                StatusCode::NOT_FOUND,
                "ResourceNotFoundException",
            ),
            (
                InvokeError::Pool(PoolError::Throttled {
                    function: "f".into(),
                    limit: 1,
                })
                .into(),
                StatusCode::TOO_MANY_REQUESTS,
                "TooManyRequestsException",
            ),
            (
                QueueError::Store(std::io::Error::other("disk full")).into(),
                StatusCode::INTERNAL_SERVER_ERROR,
                "ServiceException",
            ),
            (
                MigrateError::Failed("the destination is down".into()).into(),
                StatusCode::BAD_GATEWAY,
                "ServiceException",
            ),
            (
                MigrateError::StillBusy("i".into()).into(),
                StatusCode::CONFLICT,
                "ResourceConflictException",
            ),
            (
                VolumeError::Refused {
                    status: 409,
                    method: "POST",
                    uri: "/v1/volumes/v/attach".into(),
                    body: "held by h2".into(),
                }
                .into(),
                StatusCode::CONFLICT,
                "ResourceConflictException",
            ),
            (
                VolumeError::OtherAccount {
                    volume: "v".into(),
                    account: "1".into(),
                }
                .into(),
                StatusCode::FORBIDDEN,
                "AccessDeniedException",
            ),
            (
                MigrateError::Volume(VolumeError::NotConfigured).into(),
                StatusCode::BAD_REQUEST,
                "InvalidParameterValueException",
            ),
            (
                MigrateError::NotTls("http://x".into()).into(),
                StatusCode::BAD_REQUEST,
                "InvalidParameterValueException",
            ),
        ];
        for (e, status, kind) in cases {
            assert_eq!((e.status, e.kind), (status, kind), "{}", e.message);
        }
    }

    /// The records' errors answer as Lambda's API did when the records
    /// spoke HTTP: same status, exception and message.
    #[test]
    fn each_record_error_answers_as_lambda_does() {
        let cases: Vec<(FunctionError, StatusCode, &str, &str)> = vec![
            (
                FunctionError::NotFound {
                    arn: "arn:aws:lambda:r:1:function:f".into(),
                },
                StatusCode::NOT_FOUND,
                "ResourceNotFoundException",
                "Function not found: arn:aws:lambda:r:1:function:f",
            ),
            (
                FunctionError::AlreadyExists("f".into()),
                StatusCode::CONFLICT,
                "ResourceConflictException",
                "Function already exist: f",
            ),
            (
                FunctionError::LatestUpdating,
                StatusCode::CONFLICT,
                "ResourceConflictException",
                "The operation cannot be performed at this time. $LATEST is being updated.",
            ),
            (
                FunctionError::VersionHasAlias("1".into()),
                StatusCode::CONFLICT,
                "ResourceConflictException",
                "Unable to delete version 1: an alias points at it",
            ),
            (
                FunctionError::DeleteLatest,
                StatusCode::BAD_REQUEST,
                "InvalidParameterValueException",
                "$LATEST cannot be deleted on its own; delete the function",
            ),
            (
                FunctionError::NoAliasTarget("7".into()),
                StatusCode::NOT_FOUND,
                "ResourceNotFoundException",
                "Function version 7 not found",
            ),
            (
                crate::model::Invalid("Runtime is required".into()).into(),
                StatusCode::BAD_REQUEST,
                "InvalidParameterValueException",
                "Runtime is required",
            ),
            (
                CodeError::TooLarge("70 MB".into()).into(),
                StatusCode::PAYLOAD_TOO_LARGE,
                "RequestTooLargeException",
                "the code is too large: 70 MB",
            ),
            (
                CodeError::BadZip("no end header".into()).into(),
                StatusCode::BAD_REQUEST,
                "InvalidParameterValueException",
                "the code is not a valid zip file: no end header",
            ),
            (
                FunctionError::NoRootfs("python3.12".into()),
                StatusCode::INTERNAL_SERVER_ERROR,
                "ServiceException",
                "no root filesystem for python3.12",
            ),
        ];
        for (e, status, kind, message) in cases {
            let api = ApiError::from(e);
            assert_eq!(
                (api.status, api.kind, api.message.as_str()),
                (status, kind, message)
            );
        }
        let missing = || FunctionError::NotFound { arn: "arn".into() };
        assert_eq!(
            ApiError::from(InvokeError::Records(missing())),
            ApiError::from(missing())
        );
        assert_eq!(
            ApiError::from(MigrateError::Function(missing())),
            ApiError::from(missing())
        );
    }

    #[test]
    fn an_error_already_in_lambdas_terms_passes_through_unchanged() {
        let inner = ApiError::not_found("Function not found: arn:aws:lambda:r:1:function:f");
        assert_eq!(ApiError::from(InvokeError::Function(inner.clone())), inner);
        let m = MigrateError::Api(inner.clone());
        assert_eq!(
            m.to_string(),
            inner.message,
            "a drain report shows the message"
        );
        assert_eq!(ApiError::from(m), inner);
        let e = ApiError::from(InvokeError::TooLarge);
        assert!(
            e.message.starts_with("Request must be smaller than"),
            "{}",
            e.message
        );
    }
}
