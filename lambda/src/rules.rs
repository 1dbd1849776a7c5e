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
    /// Debian's Node.js 18 with Ember's runtime interface client
    /// (rootfs/nodejs/ric.js).
    Nodejs,
}

impl RuntimeKind {
    /// Parses Lambda's runtime identifiers: `provided`, `provided.al2`,
    /// `provided.al2023`; `python3` and `python3.N` (served by the one
    /// Python the root filesystem has); `nodejs18.x` only, the one Node.js
    /// the root filesystem has (Debian bookworm's 18.20).
    pub fn parse(s: &str) -> Option<RuntimeKind> {
        match s {
            "provided" | "provided.al2" | "provided.al2023" => Some(RuntimeKind::Provided),
            "python3" => Some(RuntimeKind::Python3),
            "nodejs18.x" => Some(RuntimeKind::Nodejs),
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
            RuntimeKind::Nodejs => "nodejs",
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
            "unsupported runtime {:?}: use provided, provided.al2, provided.al2023, python3, python3.N or nodejs18.x",
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
    // python: `module.function`; Node.js: `[dir/]file.function` (the file
    // name ends at its first dot).
    let (valid, form) = match kind {
        RuntimeKind::Provided => (true, ""),
        RuntimeKind::Python3 => (
            handler
                .rsplit_once('.')
                .is_some_and(|(m, f)| !m.is_empty() && !f.is_empty()),
            "module.function, as the python runtime needs",
        ),
        RuntimeKind::Nodejs => {
            let file = handler.rsplit_once('/').map_or(handler, |(_, f)| f);
            (
                file.split_once('.')
                    .is_some_and(|(m, f)| !m.is_empty() && !f.is_empty()),
                "file.function, as the Node.js runtime needs",
            )
        }
    };
    if !valid {
        return Err(Invalid(format!("handler {handler:?} is not {form}")));
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

/// A function as a request's path names it: `NAME`, `NAME:QUALIFIER`,
/// Lambda's partial ARN `ACCOUNT:function:NAME[:QUALIFIER]` or a full ARN
/// `arn:PARTITION:lambda:REGION:ACCOUNT:function:NAME[:QUALIFIER]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FunctionRef {
    /// The account an ARN names (None for a plain name).
    pub account: Option<String>,
    pub name: String,
    pub qualifier: Option<String>,
}

impl FunctionRef {
    /// Parses `raw`; the name must be a valid function name.
    pub fn parse(raw: &str) -> Result<FunctionRef, Invalid> {
        let bad = || Invalid(format!("invalid function ARN {raw:?}"));
        let (account, rest) = if let Some(arn) = raw.strip_prefix("arn:") {
            let parts: Vec<&str> = arn.splitn(5, ':').collect();
            let [_partition, "lambda", _region, account, rest] = parts[..] else {
                return Err(bad());
            };
            (
                Some(account.to_string()),
                rest.strip_prefix("function:").ok_or_else(bad)?,
            )
        } else if let Some((account, rest)) = raw.split_once(":function:") {
            (Some(account.to_string()), rest)
        } else {
            (None, raw)
        };
        let (name, qualifier) = match rest.split_once(':') {
            Some((n, q)) => (n.to_string(), Some(q.to_string())),
            None => (rest.to_string(), None),
        };
        validate_function_name(&name)?;
        Ok(FunctionRef {
            account,
            name,
            qualifier,
        })
    }

    /// Whether `account` may name it: a plain name is anyone's own; an ARN
    /// must name `account` (Lambda answers another's with
    /// AccessDeniedException).
    pub fn is_of(&self, account: &str) -> bool {
        self.account.as_deref().is_none_or(|a| a == account)
    }
}

#[cfg(test)]
mod function_ref_tests {
    use super::*;

    #[test]
    fn names_qualifiers_and_arns() {
        let p = |s| FunctionRef::parse(s).map(|r| (r.account, r.name, r.qualifier));
        assert_eq!(p("f").unwrap(), (None, "f".into(), None));
        assert_eq!(
            p("f:live").unwrap(),
            (None, "f".into(), Some("live".into()))
        );
        assert_eq!(
            p("arn:aws:lambda:us-east-1:111122223333:function:f:3").unwrap(),
            (Some("111122223333".into()), "f".into(), Some("3".into()))
        );
        assert_eq!(
            p("111122223333:function:f").unwrap(),
            (Some("111122223333".into()), "f".into(), None)
        );
        assert!(p("arn:nope").is_err());
        assert!(p("arn:aws:lambda:r:1:layer:f").is_err());
        assert!(p("a/b").is_err());
        let r = FunctionRef::parse("arn:aws:lambda:us-east-1:444455556666:function:f").unwrap();
        assert!(!r.is_of("111122223333"));
        assert!(FunctionRef::parse("f").unwrap().is_of("111122223333"));
    }
}

#[cfg(test)]
mod runtime_tests {
    use super::*;

    #[test]
    fn nodejs_is_named_for_the_node_it_runs() {
        assert_eq!(RuntimeKind::parse("nodejs18.x"), Some(RuntimeKind::Nodejs));
        for other in ["nodejs", "nodejs20.x", "nodejs16.x", "nodejs18", "node18.x"] {
            assert_eq!(RuntimeKind::parse(other), None, "{other}");
        }
        let err =
            validate_settings("nodejs20.x", "index.handler", 128, 3, &BTreeMap::new()).unwrap_err();
        assert!(err.0.contains("nodejs18.x"), "{err}");
    }

    #[test]
    fn nodejs_handlers_are_file_dot_function() {
        let check = |h| validate_settings("nodejs18.x", h, 128, 3, &BTreeMap::new());
        for ok in ["index.handler", "src/app.handler", "lib.v2/app.fn.nested"] {
            assert!(check(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "index",
            ".handler",
            "index.",
            "src.d/app",
            "src/.handler",
        ] {
            let err = check(bad).unwrap_err();
            assert!(err.0.contains("file.function"), "{bad}: {err}");
        }
    }
}
