//! Function, version, alias and concurrency operations.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::shapes::*;
use super::{function_ref, parse, version_of};
use crate::daemon::Daemon;
use crate::functions::SpecInput;
use ember_lambda::error::ApiError;

type D = State<Arc<Daemon>>;

fn qualified(
    d: &Daemon,
    path_name: &str,
    q: Option<String>,
) -> Result<(String, Option<String>), ApiError> {
    let (name, from_path) = function_ref(d, path_name)?;
    Ok((name, q.or(from_path)))
}

pub async fn create(State(d): D, body: Bytes) -> Result<Response, ApiError> {
    let req: CreateFunction = parse(&body)?;
    let name = req.name()?.to_string();
    let zip = FunctionCode::zip(req.code.as_ref().and_then(|c| c.zip_file.as_deref()))?;
    let input = SpecInput {
        file_system: super::shapes::file_system(
            req.file_system_configs,
            &d.cfg.region,
            &d.cfg.account,
        )?,
        ephemeral_mib: req.ephemeral_storage.map(|e| e.size),
        runtime: req.runtime,
        handler: req.handler,
        memory_mib: req.memory_size,
        timeout_secs: req.timeout,
        environment: req.environment.and_then(|e| e.variables),
        description: req.description,
    };
    // The volume must be this account's (the volume service says whose).
    if let (Some(fs), Some(vs)) = (&input.file_system, &d.volumes) {
        crate::volumes::validate(fs)?;
        vs.size(&fs.volume).await?;
    }
    let d2 = d.clone();
    // Unzipping and mkfs take a moment: off the async threads.
    let rec =
        tokio::task::spawn_blocking(move || d2.functions.create(&name, input, &zip, req.publish))
            .await
            .map_err(|e| ApiError::service(e.to_string()))??;
    let v = rec.latest();
    Ok((StatusCode::CREATED, Json(configuration(&d, &rec.name, v))).into_response())
}

pub async fn list(State(d): D) -> Json<ListFunctions> {
    Json(ListFunctions {
        functions: d
            .functions
            .list()
            .iter()
            .map(|f| configuration(&d, &f.name, f.latest()))
            .collect(),
        next_marker: None,
    })
}

pub async fn get(
    State(d): D,
    Path(name): Path<String>,
    Query(q): Query<QualifierQuery>,
) -> Result<Json<GetFunction>, ApiError> {
    let (name, q) = qualified(&d, &name, q.qualifier)?;
    let rec = d.functions.get(&name)?;
    let v = version_of(&d, &rec, q.as_deref())?;
    Ok(Json(GetFunction {
        configuration: configuration(&d, &name, v),
        code: FunctionCodeLocation::ember(
            d.store.code_zip(&v.spec.code_sha256).display().to_string(),
        ),
        concurrency: rec
            .reserved_concurrency
            .map(|n| Concurrency::reserved(Some(n))),
    }))
}

pub async fn get_configuration(
    State(d): D,
    Path(name): Path<String>,
    Query(q): Query<QualifierQuery>,
) -> Result<Json<FunctionConfiguration>, ApiError> {
    let (name, q) = qualified(&d, &name, q.qualifier)?;
    let rec = d.functions.get(&name)?;
    let v = version_of(&d, &rec, q.as_deref())?;
    Ok(Json(configuration(&d, &name, v)))
}

pub async fn update_configuration(
    State(d): D,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Json<FunctionConfiguration>, ApiError> {
    let req: UpdateConfiguration = parse(&body)?;
    let (name, _) = function_ref(&d, &name)?;
    let input = SpecInput {
        file_system: None,
        ephemeral_mib: None,
        runtime: req.runtime,
        handler: req.handler,
        memory_mib: req.memory_size,
        timeout_secs: req.timeout,
        environment: req.environment.map(|e| e.variables.unwrap_or_default()),
        description: req.description,
    };
    let rec = d.functions.update(&name, input, None, false)?;
    Ok(Json(configuration(&d, &name, rec.latest())))
}

pub async fn update_code(
    State(d): D,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Json<FunctionConfiguration>, ApiError> {
    let req: UpdateCode = parse(&body)?;
    let (name, _) = function_ref(&d, &name)?;
    let zip = FunctionCode::zip(req.zip_file.as_deref())?;
    let d2 = d.clone();
    let n2 = name.clone();
    let rec = tokio::task::spawn_blocking(move || {
        d2.functions
            .update(&n2, SpecInput::default(), Some(&zip), req.publish)
    })
    .await
    .map_err(|e| ApiError::service(e.to_string()))??;
    Ok(Json(configuration(&d, &name, rec.latest())))
}

pub async fn delete(
    State(d): D,
    Path(name): Path<String>,
    Query(q): Query<QualifierQuery>,
) -> Result<StatusCode, ApiError> {
    let (name, q) = qualified(&d, &name, q.qualifier)?;
    d.delete_function(&name, q.as_deref())?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn publish(State(d): D, Path(name): Path<String>) -> Result<Response, ApiError> {
    let (name, _) = function_ref(&d, &name)?;
    let v = d.functions.publish(&name)?;
    Ok((StatusCode::CREATED, Json(configuration(&d, &name, &v))).into_response())
}

pub async fn list_versions(
    State(d): D,
    Path(name): Path<String>,
) -> Result<Json<ListVersions>, ApiError> {
    let (name, _) = function_ref(&d, &name)?;
    let rec = d.functions.get(&name)?;
    let mut versions = vec![configuration(&d, &name, rec.latest())];
    for n in rec.published() {
        versions.push(configuration(&d, &name, &rec.versions[&n.to_string()]));
    }
    Ok(Json(ListVersions {
        versions,
        next_marker: None,
    }))
}

pub async fn create_alias(
    State(d): D,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let req: AliasRequest = parse(&body)?;
    let (name, _) = function_ref(&d, &name)?;
    let alias_name = req
        .name
        .ok_or_else(|| ApiError::invalid("Name is required"))?;
    let a = d.functions.put_alias(
        &name,
        &alias_name,
        req.function_version,
        req.description,
        true,
    )?;
    Ok((StatusCode::CREATED, Json(alias(&d, &name, &a))).into_response())
}

pub async fn list_aliases(
    State(d): D,
    Path(name): Path<String>,
) -> Result<Json<ListAliases>, ApiError> {
    let (name, _) = function_ref(&d, &name)?;
    let rec = d.functions.get(&name)?;
    Ok(Json(ListAliases {
        aliases: rec.aliases.values().map(|a| alias(&d, &name, a)).collect(),
        next_marker: None,
    }))
}

pub async fn get_alias(
    State(d): D,
    Path((name, a)): Path<(String, String)>,
) -> Result<Json<AliasConfiguration>, ApiError> {
    let (name, _) = function_ref(&d, &name)?;
    let rec = d.functions.get(&name)?;
    let rec_alias = rec
        .aliases
        .get(&a)
        .ok_or_else(|| ApiError::not_found(format!("Alias not found: {a}")))?;
    Ok(Json(alias(&d, &name, rec_alias)))
}

pub async fn update_alias(
    State(d): D,
    Path((name, a)): Path<(String, String)>,
    body: Bytes,
) -> Result<Json<AliasConfiguration>, ApiError> {
    let req: AliasRequest = parse(&body)?;
    let (name, _) = function_ref(&d, &name)?;
    let rec = d
        .functions
        .put_alias(&name, &a, req.function_version, req.description, false)?;
    Ok(Json(alias(&d, &name, &rec)))
}

pub async fn delete_alias(
    State(d): D,
    Path((name, a)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let (name, _) = function_ref(&d, &name)?;
    d.functions.delete_alias(&name, &a)?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn put_concurrency(
    State(d): D,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Json<Concurrency>, ApiError> {
    let n = parse::<Concurrency>(&body)?.checked()?;
    let (name, _) = function_ref(&d, &name)?;
    d.functions.set_reserved_concurrency(&name, Some(n))?;
    Ok(Json(Concurrency::reserved(Some(n))))
}

pub async fn delete_concurrency(
    State(d): D,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    let (name, _) = function_ref(&d, &name)?;
    d.functions.set_reserved_concurrency(&name, None)?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn get_concurrency(
    State(d): D,
    Path(name): Path<String>,
) -> Result<Json<Concurrency>, ApiError> {
    let (name, _) = function_ref(&d, &name)?;
    let rec = d.functions.get(&name)?;
    Ok(Json(Concurrency::reserved(rec.reserved_concurrency)))
}

pub async fn put_provisioned(
    State(d): D,
    Path(name): Path<String>,
    Query(q): Query<QualifierQuery>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let n = parse::<ProvisionedRequest>(&body)?.checked()?;
    let (name, q) = qualified(&d, &name, q.qualifier)?;
    let q = q.ok_or_else(|| ApiError::invalid("Qualifier is required"))?;
    d.functions.set_provisioned(&name, &q, n)?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"RequestedProvisionedConcurrentExecutions": n, "Status": "IN_PROGRESS"})),
    )
        .into_response())
}
