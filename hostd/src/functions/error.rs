//! Why an operation on the function records was refused or failed; the
//! API edge (`api/errors.rs`) turns each into Lambda's status and exception.

use crate::code::CodeError;
use crate::model::Invalid;

#[derive(Debug, thiserror::Error)]
pub enum FunctionError {
    #[error("Function not found: {arn}")]
    NotFound { arn: String },
    #[error("Function already exist: {0}")]
    AlreadyExists(String),
    /// A request's settings break one of Lambda's rules.
    #[error(transparent)]
    Invalid(#[from] Invalid),
    #[error("runtime {0} is not available on this host (no root filesystem configured for it)")]
    RuntimeUnavailable(String),
    #[error(
        "The operation cannot be performed at this time. An update is in progress for resource: {arn}"
    )]
    UpdateInProgress { arn: String },
    #[error("The operation cannot be performed at this time. $LATEST is being updated.")]
    LatestUpdating,
    #[error("$LATEST cannot be deleted on its own; delete the function")]
    DeleteLatest,
    #[error("Unable to delete version {0}: an alias points at it")]
    VersionHasAlias(String),
    #[error("Version {0} not found")]
    NoSuchVersion(String),
    #[error("Alias already exists: {0}")]
    AliasExists(String),
    #[error("Alias not found: {0}")]
    NoSuchAlias(String),
    #[error("FunctionVersion is required")]
    NoAliasVersion,
    /// The version an alias is to point at.
    #[error("Function version {0} not found")]
    NoAliasTarget(String),
    #[error("Qualifier {0} not found")]
    NoSuchQualifier(String),
    /// The uploaded code (a bad zip, too large, or not storable).
    #[error(transparent)]
    Code(#[from] CodeError),
    #[error("cannot save function {name}: {source}")]
    Save {
        name: String,
        source: std::io::Error,
    },
    #[error("deleting {name}: {source}")]
    Delete {
        name: String,
        source: std::io::Error,
    },
    /// A stored record broken in a way loading does not let through.
    #[error("function without $LATEST")]
    NoLatest,
    #[error("no root filesystem for {0}")]
    NoRootfs(String),
}

/// An `InvalidParameterValueException` with `message`.
pub(crate) fn invalid(message: impl Into<String>) -> FunctionError {
    FunctionError::Invalid(Invalid(message.into()))
}
