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
use axum::routing::get;
use axum::Router;

use crate::service::Cluster;
use ember_lambda::error::ApiError;
use ember_lambda::shapes::parse;

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
    use ember_lambda::operations::{handle, Operation::*};
    ember_lambda::operations::router(|op| {
        Some(match op {
            CreateFunction => handle(op, functions::create),
            ListFunctions => handle(op, functions::list),
            GetFunction => handle(op, functions::get),
            DeleteFunction => handle(op, functions::delete),
            GetFunctionConfiguration => handle(op, functions::get_configuration),
            UpdateFunctionConfiguration => handle(op, functions::update_configuration),
            UpdateFunctionCode => handle(op, functions::update_code),
            PublishVersion => handle(op, functions::publish),
            ListVersionsByFunction => handle(op, functions::list_versions),
            CreateAlias => handle(op, functions::create_alias),
            ListAliases => handle(op, functions::list_aliases),
            GetAlias => handle(op, functions::get_alias),
            UpdateAlias => handle(op, functions::update_alias),
            DeleteAlias => handle(op, functions::delete_alias),
            Invoke => handle(op, invoke::invoke),
            PutFunctionConcurrency => handle(op, functions::put_concurrency),
            DeleteFunctionConcurrency => handle(op, functions::delete_concurrency),
            GetFunctionConcurrency => handle(op, functions::get_concurrency),
            PutProvisionedConcurrencyConfig => handle(op, functions::put_provisioned),
            GetProvisionedConcurrencyConfig => handle(op, functions::get_provisioned),
        })
    })
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

/// A function named in a path: a name, `name:qualifier`, or an ARN
/// (`arn:aws:lambda:region:account:function:name[:qualifier]`), checked
/// against the caller's account: another account's ARN is refused as
/// Lambda refuses it, with AccessDeniedException.
fn function_ref(caller: &Caller, raw: &str) -> Result<(String, Option<String>), ApiError> {
    let r = ember_lambda::rules::FunctionRef::parse(raw)?;
    if !r.is_of(&caller.account) {
        return Err(ApiError::access_denied(format!(
            "User is not authorized to access {raw}"
        )));
    }
    Ok((r.name, r.qualifier))
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
