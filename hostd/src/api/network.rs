//! Ember's networking endpoints: the address table, logical addresses
//! reserved by accounts, and each function's egress policy.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde_json::json;

use super::{function_ref, parse};
use crate::daemon::Daemon;
use crate::net::{EgressPolicy, LogicalNet};
use ember_lambda::error::ApiError;

type D = State<Arc<Daemon>>;

/// `GET /ember/v1/network`: instance → logical → physical address.
pub async fn table(State(d): D) -> Json<serde_json::Value> {
    let Some(m) = &d.cfg.network else {
        return Json(json!({"Enabled": false, "Instances": [], "Reservations": {}}));
    };
    Json(json!({
        "Enabled": true,
        "PhysicalNetwork": m.config().physical_net,
        "TerminateConnectionsOnPause": m.config().terminate_connections,
        "HostServicesOpenToGuests": m.config().host_services.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        "DeniedNetworks": m.config().denied,
        "DefaultLogicalNetwork": LogicalNet::default_net(),
        "Reservations": d.reservations(),
        "Instances": m.table(),
    }))
}

/// `GET /ember/v1/accounts/{account}/logical-address`.
pub async fn get_reservation(
    State(d): D,
    Path(account): Path<String>,
) -> Result<Json<LogicalNet>, ApiError> {
    d.reservations()
        .get(&account)
        .copied()
        .map(Json)
        .ok_or_else(|| {
            ApiError::not_found(format!("account {account} has no reserved logical address"))
        })
}

/// `PUT /ember/v1/accounts/{account}/logical-address` with
/// `{"Address": "10.9.0.20/24", "Gateway": "10.9.0.1"}`.
pub async fn put_reservation(
    State(d): D,
    Path(account): Path<String>,
    body: Bytes,
) -> Result<Json<LogicalNet>, ApiError> {
    let net: LogicalNet = parse(&body)?;
    d.reserve_address(&account, net)?;
    Ok(Json(net))
}

pub async fn delete_reservation(
    State(d): D,
    Path(account): Path<String>,
) -> Result<StatusCode, ApiError> {
    d.release_address(&account)?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /ember/v1/functions/{name}/egress`.
pub async fn get_egress(
    State(d): D,
    Path(name): Path<String>,
) -> Result<Json<EgressPolicy>, ApiError> {
    let (name, _) = function_ref(&d, &name)?;
    Ok(Json(d.functions.get(&name)?.egress))
}

/// `PUT /ember/v1/functions/{name}/egress`: applies to running instances
/// at once and to every later one.
pub async fn put_egress(
    State(d): D,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let (name, _) = function_ref(&d, &name)?;
    let policy: EgressPolicy = parse(&body)?;
    let updated = d.set_egress(&name, policy.clone()).await?;
    Ok(Json(json!({"Policy": policy, "InstancesUpdated": updated})))
}
