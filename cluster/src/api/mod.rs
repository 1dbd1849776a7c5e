//! The cluster's HTTP API: Lambda's REST paths, every request signed with
//! SigV4 by an access key of an account, checked before the body is read
//! and with each operation's size limit ([`auth`]); what a request sees
//! and changes is its account's only.

mod auth;
mod functions;
mod invoke;
mod shapes;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post, put};
use axum::Router;
use serde::de::DeserializeOwned;

use crate::error::ApiError;
use crate::service::Cluster;

/// The front door (SigV4 and body limits), for the fuzz target `sigv4`.
#[cfg(feature = "fuzzing")]
pub use auth::authenticate;
pub use auth::{MAX_CODE_BODY, MAX_CONTROL_BODY, MAX_SYNC_PAYLOAD};

/// Who made a request (from its verified signature).
#[derive(Debug, Clone)]
pub struct Caller {
    pub account: String,
}

pub fn router(c: Arc<Cluster>) -> Router {
    Router::new()
        .route(
            "/2015-03-31/functions",
            post(functions::create).get(functions::list),
        )
        .route(
            "/2015-03-31/functions/",
            post(functions::create).get(functions::list),
        )
        .route(
            "/2015-03-31/functions/{name}",
            get(functions::get).delete(functions::delete),
        )
        .route(
            "/2015-03-31/functions/{name}/configuration",
            get(functions::get_configuration).put(functions::update_configuration),
        )
        .route(
            "/2015-03-31/functions/{name}/code",
            put(functions::update_code),
        )
        .route(
            "/2015-03-31/functions/{name}/versions",
            post(functions::publish).get(functions::list_versions),
        )
        .route(
            "/2015-03-31/functions/{name}/aliases",
            post(functions::create_alias).get(functions::list_aliases),
        )
        .route(
            "/2015-03-31/functions/{name}/aliases/{alias}",
            get(functions::get_alias)
                .put(functions::update_alias)
                .delete(functions::delete_alias),
        )
        .route(
            "/2015-03-31/functions/{name}/invocations",
            post(invoke::invoke),
        )
        .route(
            "/2017-10-31/functions/{name}/concurrency",
            put(functions::put_concurrency).delete(functions::delete_concurrency),
        )
        .route(
            "/2019-09-30/functions/{name}/concurrency",
            get(functions::get_concurrency),
        )
        .route(
            "/2019-09-30/functions/{name}/provisioned-concurrency",
            put(functions::put_provisioned).get(functions::get_provisioned),
        )
        .route("/ember/v1/async-invocations/{id}", get(invoke::get_async))
        .route("/ember/v1/health", get(functions::health))
        .fallback(|| async {
            ApiError::new(
                axum::http::StatusCode::NOT_FOUND,
                "UnknownOperationException",
                "Unknown operation",
            )
        })
        .layer(axum::middleware::from_fn_with_state(
            c.clone(),
            auth::authenticate,
        ))
        // The front door has applied each operation's limit already.
        .layer(DefaultBodyLimit::max(MAX_CODE_BODY))
        .with_state(c)
}

/// Parses a JSON body with Lambda's error on failure.
fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let body = if body.is_empty() {
        b"{}" as &[u8]
    } else {
        body
    };
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("Could not parse request body into json: {e}")))
}

/// A function named in a path: a name, `name:qualifier`, or an ARN
/// (`arn:aws:lambda:region:account:function:name[:qualifier]`), checked
/// against the caller's account: another account's ARN is refused as
/// Lambda refuses it, with AccessDeniedException.
fn function_ref(caller: &Caller, raw: &str) -> Result<(String, Option<String>), ApiError> {
    let rest = if let Some(arn) = raw.strip_prefix("arn:") {
        let parts: Vec<&str> = arn.splitn(5, ':').collect();
        let [_partition, "lambda", _region, account, rest] = parts[..] else {
            return Err(ApiError::invalid(format!("invalid function ARN {raw:?}")));
        };
        if account != caller.account {
            return Err(ApiError::new(
                axum::http::StatusCode::FORBIDDEN,
                "AccessDeniedException",
                format!("User is not authorized to access {raw}"),
            ));
        }
        rest.strip_prefix("function:")
            .ok_or_else(|| ApiError::invalid(format!("invalid function ARN {raw:?}")))?
    } else if let Some((acct, rest)) = raw.split_once(":function:") {
        // `ACCOUNT:function:NAME`, Lambda's partial ARN.
        if acct != caller.account {
            return Err(ApiError::new(
                axum::http::StatusCode::FORBIDDEN,
                "AccessDeniedException",
                format!("User is not authorized to access {raw}"),
            ));
        }
        rest
    } else {
        raw
    };
    let (name, q) = match rest.split_once(':') {
        Some((n, q)) => (n.to_string(), Some(q.to_string())),
        None => (rest.to_string(), None),
    };
    crate::lambda::validate_function_name(&name)?;
    Ok((name, q))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn function_refs_are_the_callers() {
        let me = Caller {
            account: "111122223333".into(),
        };
        assert_eq!(function_ref(&me, "f").unwrap(), ("f".into(), None));
        assert_eq!(
            function_ref(&me, "f:live").unwrap(),
            ("f".into(), Some("live".into()))
        );
        assert_eq!(
            function_ref(&me, "arn:aws:lambda:us-east-1:111122223333:function:f:3").unwrap(),
            ("f".into(), Some("3".into()))
        );
        assert_eq!(
            function_ref(&me, "111122223333:function:f").unwrap(),
            ("f".into(), None)
        );
        let e = function_ref(&me, "arn:aws:lambda:us-east-1:444455556666:function:f").unwrap_err();
        assert_eq!((e.status.as_u16(), e.kind), (403, "AccessDeniedException"));
        assert_eq!(function_ref(&me, "arn:nope").unwrap_err().status, 400);
        assert_eq!(function_ref(&me, "a/b").unwrap_err().status, 400);
    }
}
