//! hostd's HTTP API on a unix socket: Lambda's REST API shapes (so Lambda
//! users and tools recognise them) plus a few `/ember/v1` extensions for
//! what Lambda exposes elsewhere (async outcomes, pools, logs).

mod ember;
mod errors;
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

use crate::daemon::Daemon;
use crate::model::{FunctionRecord, VersionRecord};
use ember_lambda::error::ApiError;
use ember_lambda::shapes::parse;

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

/// The version of `rec` that `qualifier` names (`$LATEST` without), or
/// Lambda's 404 for it.
fn version_of<'r>(
    d: &Daemon,
    rec: &'r FunctionRecord,
    qualifier: Option<&str>,
) -> Result<&'r VersionRecord, ApiError> {
    rec.resolve(qualifier).ok_or_else(|| {
        ApiError::not_found(format!(
            "Function not found: {}",
            d.functions.function_arn(&rec.name, qualifier)
        ))
    })
}

/// A function named in a path (see [`ember_lambda::rules::FunctionRef`]);
/// an ARN of another account than this host's is refused.
fn function_ref(d: &Daemon, raw: &str) -> Result<(String, Option<String>), ApiError> {
    let r = ember_lambda::rules::FunctionRef::parse(raw)?;
    if !r.is_of(&d.cfg.account) {
        return Err(ApiError::access_denied(format!(
            "User is not authorized to access {raw}"
        )));
    }
    Ok((r.name, r.qualifier))
}
