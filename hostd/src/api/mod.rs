//! hostd's HTTP API on a unix socket: Lambda's REST API shapes (so Lambda
//! users and tools recognise them) plus a few `/ember/v1` extensions for
//! what Lambda exposes elsewhere (async outcomes, pools, logs).

mod ember;
mod functions;
mod invoke;
mod migrate;
mod network;
pub mod shapes;
pub mod volumes;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use serde::de::DeserializeOwned;

use crate::daemon::Daemon;
use ember_lambda::error::ApiError;

/// Base64 of a 50 MB zip, plus the rest of the request.
const MAX_BODY: usize = 70 * 1024 * 1024;

pub fn router(d: Arc<Daemon>) -> Router {
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
            GetProvisionedConcurrencyConfig => return None,
        })
    })
    .route("/ember/v1/health", get(ember::health))
    .route("/ember/v1/pools", get(ember::pools))
    .route("/ember/v1/async-invocations", get(ember::list_async))
    .route("/ember/v1/async-invocations/{id}", get(ember::get_async))
    .route("/ember/v1/functions/{name}/logs", get(ember::logs))
    .route("/ember/v1/network", get(network::table))
    .route(
        "/ember/v1/accounts/{account}/logical-address",
        get(network::get_reservation)
            .put(network::put_reservation)
            .delete(network::delete_reservation),
    )
    .route("/ember/v1/volumes/{name}/attach", post(volumes::attach))
    .route("/ember/v1/volumes/{name}/detach", post(volumes::detach))
    .route("/ember/v1/volumes/{name}/move", post(volumes::move_to))
    .route(
        "/ember/v1/instances/{id}/migrate",
        post(migrate::migrate).delete(migrate::cancel),
    )
    .route(
        "/ember/v1/drain",
        post(migrate::drain)
            .get(migrate::draining)
            .delete(migrate::undrain),
    )
    .route(
        "/ember/v1/migrations",
        post(migrate::prepare).get(migrate::list),
    )
    .route(
        "/ember/v1/migrations/{id}",
        get(migrate::get).delete(migrate::abort),
    )
    .route(
        "/ember/v1/migrations/{id}/switch-over",
        post(migrate::switch_over),
    )
    .route(
        "/ember/v1/functions/{name}/egress",
        get(network::get_egress).put(network::put_egress),
    )
    .fallback(|| async {
        ApiError::new(
            axum::http::StatusCode::NOT_FOUND,
            "UnknownOperationException",
            "no such operation",
        )
    })
    .layer(DefaultBodyLimit::max(MAX_BODY))
    .with_state(d)
}

/// Parses a JSON body with a Lambda-style error on failure.
fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let body = if body.is_empty() {
        b"{}" as &[u8]
    } else {
        body
    };
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("could not parse request body into json: {e}")))
}

/// A function named in a path: a name, `name:qualifier`, or an ARN
/// (`arn:aws:lambda:region:account:function:name[:qualifier]`).
fn function_ref(raw: &str) -> (String, Option<String>) {
    let rest = raw
        .strip_prefix("arn:")
        .and_then(|r| r.split_once(":function:").map(|(_, n)| n))
        .unwrap_or(raw);
    match rest.split_once(':') {
        Some((n, q)) => (n.to_string(), Some(q.to_string())),
        None => (rest.to_string(), None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn function_refs_accept_names_qualifiers_and_arns() {
        assert_eq!(function_ref("f"), ("f".into(), None));
        assert_eq!(function_ref("f:prod"), ("f".into(), Some("prod".into())));
        assert_eq!(
            function_ref("arn:aws:lambda:us-east-1:000000000000:function:f:3"),
            ("f".into(), Some("3".into()))
        );
    }
}
