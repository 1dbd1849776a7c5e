//! Lambda's rules for names and settings, shared by emberd (which runs
//! functions) and the cluster (which takes them from users first, and must
//! refuse the same things before any host sees them).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Environment variables Lambda reserves for itself; functions may not set them.
pub const RESERVED_ENV: &[&str] = &[
    "_HANDLER",
    "_X_AMZN_TRACE_ID",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_EXECUTION_ENV",
    "AWS_LAMBDA_FUNCTION_NAME",
    "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
    "AWS_LAMBDA_FUNCTION_VERSION",
    "AWS_LAMBDA_INITIALIZATION_TYPE",
    "AWS_LAMBDA_LOG_GROUP_NAME",
    "AWS_LAMBDA_LOG_STREAM_NAME",
    "AWS_ACCESS_KEY",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_LAMBDA_RUNTIME_API",
    "LAMBDA_TASK_ROOT",
    "LAMBDA_RUNTIME_DIR",
];

/// The runtimes hostd can run, each with its own root filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeKind {
    /// The function ships an executable `bootstrap`.
    Provided,
    /// Debian's python3 with the AWS Lambda Python runtime interface client.
    Python3,
}

impl RuntimeKind {
    /// Parses Lambda's runtime identifiers: `provided`, `provided.al2`,
    /// `provided.al2023`; `python3` and `python3.N` (served by the one
    /// Python the root filesystem has).
    pub fn parse(s: &str) -> Option<RuntimeKind> {
        match s {
            "provided" | "provided.al2" | "provided.al2023" => Some(RuntimeKind::Provided),
            "python3" => Some(RuntimeKind::Python3),
            s => s
                .strip_prefix("python3.")
                .filter(|minor| !minor.is_empty() && minor.chars().all(|c| c.is_ascii_digit()))
                .map(|_| RuntimeKind::Python3),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RuntimeKind::Provided => "provided",
            RuntimeKind::Python3 => "python3",
        }
    }
}

/// A validation failure, reported as Lambda's `InvalidParameterValueException`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

/// Lambda's function-name rule: 1-64 of letters, digits, `-` and `_`.
pub fn validate_function_name(name: &str) -> Result<(), Invalid> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(Invalid(format!(
            "invalid function name {name:?}: use 1 to 64 letters, digits, hyphens or underscores"
        )))
    }
}

/// Alias names: 1-128 characters `[a-zA-Z0-9-_]`, not all digits (that
/// would read as a version).
pub fn validate_alias_name(name: &str) -> Result<(), Invalid> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        && !name.chars().all(|c| c.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(Invalid(format!(
            "invalid alias name {name:?}: use 1 to 128 letters, digits, hyphens or underscores, not only digits"
        )))
    }
}

/// Checks the settings Lambda checks.
pub fn validate_settings(
    runtime: &str,
    handler: &str,
    memory_mib: u32,
    timeout_secs: u32,
    environment: &BTreeMap<String, String>,
) -> Result<(), Invalid> {
    let kind = RuntimeKind::parse(runtime).ok_or_else(|| {
        Invalid(format!(
            "unsupported runtime {:?}: use provided, provided.al2, provided.al2023, python3 or python3.N",
            runtime
        ))
    })?;
    if !(128..=10240).contains(&memory_mib) {
        return Err(Invalid(format!(
            "MemorySize {} is out of range: use 128 to 10240 (MiB)",
            memory_mib
        )));
    }
    if !(1..=900).contains(&timeout_secs) {
        return Err(Invalid(format!(
            "Timeout {} is out of range: use 1 to 900 (seconds)",
            timeout_secs
        )));
    }
    if handler.len() > 128 || handler.chars().any(|c| c.is_whitespace()) {
        return Err(Invalid(format!("invalid handler {:?}", handler)));
    }
    if kind == RuntimeKind::Python3 {
        let valid = handler
            .rsplit_once('.')
            .is_some_and(|(m, f)| !m.is_empty() && !f.is_empty());
        if !valid {
            return Err(Invalid(format!(
                "handler {:?} is not module.function, as the python runtime needs",
                handler
            )));
        }
    }
    let mut env_size = 0;
    for (k, v) in environment {
        let key_ok = !k.is_empty()
            && k.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
            && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !key_ok {
            return Err(Invalid(format!(
                "environment variable name {k:?} must start with a letter and hold only letters, digits and underscores"
            )));
        }
        if RESERVED_ENV.contains(&k.as_str()) {
            return Err(Invalid(format!(
                "environment variable {k} is reserved by the runtime"
            )));
        }
        env_size += k.len() + v.len();
    }
    if env_size > 4096 {
        return Err(Invalid(format!(
            "environment variables total {env_size} bytes; the limit is 4096"
        )));
    }
    Ok(())
}
