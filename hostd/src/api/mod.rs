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
use axum::routing::{get, post, put};
use axum::Router;
use serde::de::DeserializeOwned;

use crate::daemon::Daemon;
use ember_lambda::error::ApiError;

/// Base64 of a 50 MB zip, plus the rest of the request.
const MAX_BODY: usize = 70 * 1024 * 1024;

pub fn router(d: Arc<Daemon>) -> Router {
    Router::new()
        .route(
            "/2015-03-31/functions",
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
            put(functions::put_provisioned),
        )
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
