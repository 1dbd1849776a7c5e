//! Function, version, alias and concurrency operations, on the caller's
//! account's records. A changed `$LATEST` is deployed to one host at once
//! (so `State` goes Pending → Active as in Lambda, and SDK waiters work);
//! other hosts get it when invocations need them.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Extension, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use serde::Deserialize;
use serde_json::{json, Value};

use super::shapes::*;
use super::{function_ref, parse, Caller};
use crate::deploy::{self, BuildState};
use crate::functions::{
    self as records, deployment_name, Alias, FunctionRecord, Spec, Version, LATEST,
};
use crate::service::Cluster;
use ember_lambda::error::ApiError;
use ember_lambda::hosts::live_hosts;
use ember_lambda::rules::{validate_alias_name, validate_function_name, validate_settings};

type C = State<Arc<Cluster>>;
type Who = Extension<Caller>;

pub fn now() -> String {
    jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%S%.3f+0000")
        .to_string()
}

fn revision() -> String {
    uuid::Uuid::new_v4().to_string()
}

fn check(spec: &Spec) -> Result<(), ApiError> {
    validate_settings(
        &spec.runtime,
        &spec.handler,
        spec.memory_size,
        spec.timeout,
        &spec.environment,
    )?;
    Ok(())
}

fn not_found(c: &Cluster, rec: &FunctionRecord, q: Option<&str>) -> ApiError {
    ApiError::not_found(format!("Function not found: {}", rec.arn(&c.cfg.region, q)))
}

/// The state of `v`'s build, from a live host that has it.
async fn status(c: &Cluster, rec: &FunctionRecord, v: &Version) -> BuildStatus {
    let name = deployment_name(&rec.account, &rec.name, &v.spec);
    let (Ok(deps), Ok(hosts)) = (
        deploy::placed(&c.store, &name).await,
        live_hosts(&c.store).await,
    ) else {
        return BuildStatus::active();
    };
    for d in deps {
        let Some(h) = hosts.iter().find(|h| h.id == d.host) else {
            continue;
        };
        return match deploy::build_state(c, &h.endpoint, &name).await {
            Some(BuildState::InProgress) => BuildStatus {
                state: "Pending",
                last_update_status: "InProgress",
                reason: None,
            },
            Some(BuildState::Failed(r)) => BuildStatus {
                state: "Failed",
                last_update_status: "Failed",
                reason: Some(r),
            },
            _ => continue,
        };
    }
    BuildStatus::active()
}

/// Deploys `v` on the best live host unless a live host has it. Errors
/// are logged: the first invocation deploys it then.
async fn deploy_now(c: &Cluster, rec: &FunctionRecord, v: &Version) -> bool {
    let name = deployment_name(&rec.account, &rec.name, &v.spec);
    let Ok(hosts) = live_hosts(&c.store).await else {
        return false;
    };
    let placed = deploy::placed(&c.store, &name).await.unwrap_or_default();
    if placed.iter().any(|d| hosts.iter().any(|h| h.id == d.host)) {
        return false;
    }
    let Some(p) = crate::placement::place(&hosts, &name, LATEST) else {
        return false;
    };
    let Some(h) = hosts.iter().find(|h| h.id == p.host()) else {
        return false;
    };
    match deploy::deploy(c, h, &name, &v.spec).await {
        Ok(()) => true,
        Err(e) => {
            log::warn!("deploying {}: {e}", rec.name);
            false
        }
    }
}

/// Retires, in the background, deployments of `old` no version of `rec`
/// (if it still exists) uses.
fn retire_unused(c: &Arc<Cluster>, rec: Option<&FunctionRecord>, old: &FunctionRecord) {
    let used: Vec<String> = rec
        .map(|r| {
            r.all_versions()
                .map(|v| deployment_name(&r.account, &r.name, &v.spec))
                .collect()
        })
        .unwrap_or_default();
    let mut gone: Vec<String> = old
        .all_versions()
        .map(|v| deployment_name(&old.account, &old.name, &v.spec))
        .filter(|n| !used.contains(n))
        .collect();
    gone.dedup();
    if gone.is_empty() {
        return;
    }
    let c = c.clone();
    tokio::spawn(async move { deploy::retire(&c, gone).await });
}

/// `$LATEST`'s configuration, deployed now if it changed.
async fn latest_reply(c: &Cluster, rec: &FunctionRecord, status: StatusCode) -> Response {
    let st = if deploy_now(c, rec, &rec.latest).await {
        BuildStatus {
            state: "Pending",
            last_update_status: "InProgress",
            reason: None,
        }
    } else {
        self::status(c, rec, &rec.latest).await
    };
    (
        status,
        Json(configuration(rec, &c.cfg.region, &rec.latest, &st)),
    )
        .into_response()
}

/// Changes `$LATEST` of `name` with `f` (compare-and-swap), retires the
/// deployments the change left unused, and answers its configuration.
async fn change_latest(
    c: &Arc<Cluster>,
    account: &str,
    name: &str,
    mut f: impl FnMut(&mut FunctionRecord) -> Result<(), ApiError>,
) -> Result<Response, ApiError> {
    let mut old = None;
    let (rec, ()) = records::modify(&c.store, account, name, |rec| {
        old = Some(rec.clone());
        f(rec)
    })
    .await?;
    if let Some(old) = old {
        retire_unused(c, Some(&rec), &old);
    }
    Ok(latest_reply(c, &rec, StatusCode::OK).await)
}

fn publish_in(rec: &mut FunctionRecord, description: Option<String>) -> Version {
    // Unchanged since the last publish: that version, as Lambda does.
    if let Some(last) = rec.versions.values().next_back() {
        let description = description.as_ref().unwrap_or(&rec.latest.description);
        if last.spec == rec.latest.spec && last.description == *description {
            return last.clone();
        }
    }
    let n = rec.next_version;
    rec.next_version += 1;
    let v = Version {
        version: n.to_string(),
        description: description.unwrap_or_else(|| rec.latest.description.clone()),
        last_modified: now(),
        revision_id: revision(),
        spec: rec.latest.spec.clone(),
    };
    rec.versions.insert(n, v.clone());
    v
}

pub async fn create(State(c): C, Extension(who): Who, body: Bytes) -> Result<Response, ApiError> {
    let req: CreateFunction = parse(&body)?;
    let name = req
        .function_name
        .ok_or_else(|| ApiError::invalid("FunctionName is required"))?;
    validate_function_name(&name)?;
    let runtime = req
        .runtime
        .ok_or_else(|| ApiError::invalid("Runtime is required for a .zip deployment package"))?;
    let zip = FunctionCode::zip(req.code.as_ref().and_then(|c| c.zip_file.as_deref()))?;
    let mut spec = Spec {
        runtime,
        handler: req.handler.unwrap_or_default(),
        memory_size: req.memory_size.unwrap_or(128),
        timeout: req.timeout.unwrap_or(3),
        environment: req
            .environment
            .and_then(|e| e.variables)
            .unwrap_or_default(),
        code_sha256: String::new(),
        code_size: zip.len() as u64,
    };
    check(&spec)?;
    spec.code_sha256 = crate::code::put(&c.store, &zip)
        .await
        .map_err(|e| ApiError::service(format!("storing the code: {e}")))?;
    let mut rec = FunctionRecord {
        account: who.account.clone(),
        name,
        latest: Version {
            version: LATEST.into(),
            spec,
            description: req.description.unwrap_or_default(),
            last_modified: now(),
            revision_id: revision(),
        },
        versions: BTreeMap::new(),
        next_version: 1,
        aliases: BTreeMap::new(),
        reserved_concurrency: None,
        provisioned: BTreeMap::new(),
    };
    if req.publish {
        publish_in(&mut rec, None);
    }
    records::create(&c.store, &rec).await?;
    Ok(latest_reply(&c, &rec, StatusCode::CREATED).await)
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ListQuery {
    pub max_items: Option<usize>,
    pub marker: Option<String>,
}

pub async fn list(
    State(c): C,
    Extension(who): Who,
    Query(q): Query<ListQuery>,
) -> Result<Json<ListFunctions>, ApiError> {
    let recs = records::list(&c.store, Some(&who.account)).await?;
    let max = q.max_items.unwrap_or(50).clamp(1, 10_000);
    let start = q
        .marker
        .as_deref()
        .and_then(|m| recs.iter().position(|r| r.name.as_str() > m))
        .unwrap_or(if q.marker.is_some() { recs.len() } else { 0 });
    let functions = recs
        .iter()
        .skip(start)
        .take(max)
        .map(|r| configuration(r, &c.cfg.region, &r.latest, &BuildStatus::active()))
        .collect();
    Ok(Json(ListFunctions {
        functions,
        next_marker: (start + max < recs.len()).then(|| recs[start + max - 1].name.clone()),
    }))
}

async fn resolved(
    c: &Cluster,
    who: &Caller,
    raw: &str,
    q: Option<String>,
) -> Result<(FunctionRecord, Version), ApiError> {
    let (name, from_path) = function_ref(who, raw)?;
    let q = q.or(from_path);
    let rec = records::get(&c.store, &who.account, &name).await?;
    let v = rec
        .resolve(q.as_deref())
        .cloned()
        .ok_or_else(|| not_found(c, &rec, q.as_deref()))?;
    Ok((rec, v))
}

pub async fn get(
    State(c): C,
    Extension(who): Who,
    Path(name): Path<String>,
    Query(q): Query<QualifierQuery>,
) -> Result<Json<GetFunction>, ApiError> {
    let (rec, v) = resolved(&c, &who, &name, q.qualifier).await?;
    let st = status(&c, &rec, &v).await;
    Ok(Json(GetFunction {
        configuration: configuration(&rec, &c.cfg.region, &v, &st),
        code: FunctionCodeLocation::ember(format!("ember://code/{}", v.spec.code_sha256)),
        concurrency: rec
            .reserved_concurrency
            .map(|n| Concurrency::reserved(Some(n))),
    }))
}

pub async fn get_configuration(
    State(c): C,
    Extension(who): Who,
    Path(name): Path<String>,
    Query(q): Query<QualifierQuery>,
) -> Result<Json<FunctionConfiguration>, ApiError> {
    let (rec, v) = resolved(&c, &who, &name, q.qualifier).await?;
    let st = status(&c, &rec, &v).await;
    Ok(Json(configuration(&rec, &c.cfg.region, &v, &st)))
}

pub async fn update_configuration(
    State(c): C,
    Extension(who): Who,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let req: UpdateConfiguration = parse(&body)?;
    let (name, _) = function_ref(&who, &name)?;
    change_latest(&c, &who.account, &name, |rec| {
        let l = &mut rec.latest;
        let mut spec = l.spec.clone();
        if let Some(r) = &req.runtime {
            spec.runtime = r.clone();
        }
        if let Some(h) = &req.handler {
            spec.handler = h.clone();
        }
        if let Some(m) = req.memory_size {
            spec.memory_size = m;
        }
        if let Some(t) = req.timeout {
            spec.timeout = t;
        }
        if let Some(e) = &req.environment {
            spec.environment = e.variables.clone().unwrap_or_default();
        }
        check(&spec)?;
        l.spec = spec;
        if let Some(d) = &req.description {
            l.description = d.clone();
        }
        l.last_modified = now();
        l.revision_id = revision();
        Ok(())
    })
    .await
}

pub async fn update_code(
    State(c): C,
    Extension(who): Who,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let req: UpdateCode = parse(&body)?;
    let (name, _) = function_ref(&who, &name)?;
    let zip = FunctionCode::zip(req.zip_file.as_deref())?;
    // The function must exist before its code is stored.
    records::get(&c.store, &who.account, &name).await?;
    let sha = crate::code::put(&c.store, &zip)
        .await
        .map_err(|e| ApiError::service(format!("storing the code: {e}")))?;
    change_latest(&c, &who.account, &name, |rec| {
        rec.latest.spec.code_sha256 = sha.clone();
        rec.latest.spec.code_size = zip.len() as u64;
        rec.latest.last_modified = now();
        rec.latest.revision_id = revision();
        if req.publish {
            publish_in(rec, None);
        }
        Ok(())
    })
    .await
}

pub async fn delete(
    State(c): C,
    Extension(who): Who,
    Path(name): Path<String>,
    Query(q): Query<QualifierQuery>,
) -> Result<StatusCode, ApiError> {
    let (name, from_path) = function_ref(&who, &name)?;
    match q.qualifier.or(from_path).as_deref() {
        None | Some(LATEST) => {
            let old = records::delete(&c.store, &who.account, &name).await?;
            retire_unused(&c, None, &old);
        }
        Some(q) => {
            let n: u64 = q.parse().map_err(|_| {
                ApiError::invalid(format!("Qualifier {q:?} is not a version number"))
            })?;
            let (rec, removed) = records::modify(&c.store, &who.account, &name, |rec| {
                if rec.aliases.values().any(|a| {
                    a.function_version == q || a.additional_version_weights.contains_key(q)
                }) {
                    return Err(ApiError::conflict(format!(
                        "Unable to delete version {q}: an alias points at it"
                    )));
                }
                let v = rec
                    .versions
                    .remove(&n)
                    .ok_or_else(|| not_found(&c, rec, Some(q)))?;
                rec.provisioned.remove(q);
                Ok(v)
            })
            .await?;
            // Its deployment goes unless another version shares it.
            let mut before = rec.clone();
            before.versions.insert(n, removed);
            retire_unused(&c, Some(&rec), &before);
        }
    }
    Ok(StatusCode::NO_CONTENT)
}

pub async fn publish(
    State(c): C,
    Extension(who): Who,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let req: PublishVersion = parse(&body)?;
    let (name, _) = function_ref(&who, &name)?;
    let (rec, v) = records::modify(&c.store, &who.account, &name, |rec| {
        if let Some(sha) = &req.code_sha256 {
            let have = base64::engine::general_purpose::STANDARD
                .encode(hex::decode(&rec.latest.spec.code_sha256).unwrap_or_default());
            if *sha != have {
                return Err(ApiError::new(
                    StatusCode::PRECONDITION_FAILED,
                    "PreconditionFailedException",
                    "CodeSha256 does not match $LATEST's code",
                ));
            }
        }
        Ok(publish_in(rec, req.description.clone()))
    })
    .await?;
    let st = status(&c, &rec, &v).await;
    Ok((
        StatusCode::CREATED,
        Json(configuration(&rec, &c.cfg.region, &v, &st)),
    )
        .into_response())
}

pub async fn list_versions(
    State(c): C,
    Extension(who): Who,
    Path(name): Path<String>,
) -> Result<Json<ListVersions>, ApiError> {
    let (name, _) = function_ref(&who, &name)?;
    let rec = records::get(&c.store, &who.account, &name).await?;
    Ok(Json(ListVersions {
        versions: rec
            .all_versions()
            .map(|v| configuration(&rec, &c.cfg.region, v, &BuildStatus::active()))
            .collect(),
        next_marker: None,
    }))
}

/// Checks an alias's target and routing against the record.
fn check_alias(rec: &FunctionRecord, a: &Alias) -> Result<(), ApiError> {
    let exists = |v: &str| {
        v == LATEST
            || v.parse::<u64>()
                .is_ok_and(|n| rec.versions.contains_key(&n))
    };
    if !exists(&a.function_version) {
        return Err(ApiError::not_found(format!(
            "Function not found: {}:{}",
            rec.name, a.function_version
        )));
    }
    if a.additional_version_weights.len() > 1 {
        return Err(ApiError::invalid(
            "RoutingConfig may name one additional version",
        ));
    }
    for (v, w) in &a.additional_version_weights {
        if v == LATEST || !exists(v) {
            return Err(ApiError::invalid(format!(
                "RoutingConfig names {v:?}, which is not a published version"
            )));
        }
        if *v == a.function_version {
            return Err(ApiError::invalid(
                "the additional version must differ from the alias's FunctionVersion",
            ));
        }
        if !(0.0..=1.0).contains(w) || w.is_nan() {
            return Err(ApiError::invalid(format!(
                "weight {w} for version {v} is outside [0.0, 1.0]"
            )));
        }
    }
    Ok(())
}

pub async fn create_alias(
    State(c): C,
    Extension(who): Who,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let req: AliasRequest = parse(&body)?;
    let (name, _) = function_ref(&who, &name)?;
    let alias_name = req
        .name
        .ok_or_else(|| ApiError::invalid("Name is required"))?;
    validate_alias_name(&alias_name)?;
    let a = Alias {
        name: alias_name.clone(),
        function_version: req
            .function_version
            .ok_or_else(|| ApiError::invalid("FunctionVersion is required"))?,
        description: req.description.unwrap_or_default(),
        additional_version_weights: req
            .routing_config
            .map(|r| r.additional_version_weights)
            .unwrap_or_default(),
        revision_id: revision(),
    };
    let (rec, ()) = records::modify(&c.store, &who.account, &name, |rec| {
        if rec.aliases.contains_key(&alias_name) {
            return Err(ApiError::conflict(format!(
                "Alias already exists: {}",
                rec.arn(&c.cfg.region, Some(&alias_name))
            )));
        }
        check_alias(rec, &a)?;
        rec.aliases.insert(alias_name.clone(), a.clone());
        Ok(())
    })
    .await?;
    Ok((StatusCode::CREATED, Json(alias(&rec, &c.cfg.region, &a))).into_response())
}

pub async fn list_aliases(
    State(c): C,
    Extension(who): Who,
    Path(name): Path<String>,
) -> Result<Json<ListAliases>, ApiError> {
    let (name, _) = function_ref(&who, &name)?;
    let rec = records::get(&c.store, &who.account, &name).await?;
    Ok(Json(ListAliases {
        aliases: rec
            .aliases
            .values()
            .map(|a| alias(&rec, &c.cfg.region, a))
            .collect(),
        next_marker: None,
    }))
}

fn alias_not_found(c: &Cluster, rec: &FunctionRecord, a: &str) -> ApiError {
    ApiError::not_found(format!(
        "Alias not found: {}",
        rec.arn(&c.cfg.region, Some(a))
    ))
}

pub async fn get_alias(
    State(c): C,
    Extension(who): Who,
    Path((name, a)): Path<(String, String)>,
) -> Result<Json<AliasConfiguration>, ApiError> {
    let (name, _) = function_ref(&who, &name)?;
    let rec = records::get(&c.store, &who.account, &name).await?;
    let found = rec
        .aliases
        .get(&a)
        .ok_or_else(|| alias_not_found(&c, &rec, &a))?;
    Ok(Json(alias(&rec, &c.cfg.region, found)))
}

pub async fn update_alias(
    State(c): C,
    Extension(who): Who,
    Path((name, a)): Path<(String, String)>,
    body: Bytes,
) -> Result<Json<AliasConfiguration>, ApiError> {
    let req: AliasRequest = parse(&body)?;
    let (name, _) = function_ref(&who, &name)?;
    let (rec, updated) = records::modify(&c.store, &who.account, &name, |rec| {
        let mut cur = rec
            .aliases
            .get(&a)
            .cloned()
            .ok_or_else(|| alias_not_found(&c, rec, &a))?;
        if let Some(v) = &req.function_version {
            cur.function_version = v.clone();
        }
        if let Some(d) = &req.description {
            cur.description = d.clone();
        }
        if let Some(r) = &req.routing_config {
            cur.additional_version_weights = r.additional_version_weights.clone();
        }
        cur.revision_id = revision();
        check_alias(rec, &cur)?;
        rec.aliases.insert(a.clone(), cur.clone());
        Ok(cur)
    })
    .await?;
    Ok(Json(alias(&rec, &c.cfg.region, &updated)))
}

pub async fn delete_alias(
    State(c): C,
    Extension(who): Who,
    Path((name, a)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let (name, _) = function_ref(&who, &name)?;
    records::modify(&c.store, &who.account, &name, |rec| {
        rec.aliases.remove(&a);
        rec.provisioned.remove(&a);
        Ok(())
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn put_concurrency(
    State(c): C,
    Extension(who): Who,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Json<Concurrency>, ApiError> {
    let n = parse::<Concurrency>(&body)?.checked()?;
    let (name, _) = function_ref(&who, &name)?;
    records::modify(&c.store, &who.account, &name, |rec| {
        rec.reserved_concurrency = Some(n);
        Ok(())
    })
    .await?;
    Ok(Json(Concurrency::reserved(Some(n))))
}

pub async fn delete_concurrency(
    State(c): C,
    Extension(who): Who,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    let (name, _) = function_ref(&who, &name)?;
    records::modify(&c.store, &who.account, &name, |rec| {
        rec.reserved_concurrency = None;
        Ok(())
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn get_concurrency(
    State(c): C,
    Extension(who): Who,
    Path(name): Path<String>,
) -> Result<Json<Concurrency>, ApiError> {
    let (name, _) = function_ref(&who, &name)?;
    let rec = records::get(&c.store, &who.account, &name).await?;
    Ok(Json(Concurrency::reserved(rec.reserved_concurrency)))
}

fn provisioned_qualifier(q: Option<String>) -> Result<String, ApiError> {
    match q {
        None => Err(ApiError::invalid("Qualifier is required")),
        Some(q) if q == LATEST => Err(ApiError::invalid(
            "Provisioned Concurrency Configs cannot be applied to unpublished function versions.",
        )),
        Some(q) => Ok(q),
    }
}

pub async fn put_provisioned(
    State(c): C,
    Extension(who): Who,
    Path(name): Path<String>,
    Query(q): Query<QualifierQuery>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let n = parse::<ProvisionedRequest>(&body)?.checked()?;
    let (name, from_path) = function_ref(&who, &name)?;
    let q = provisioned_qualifier(q.qualifier.or(from_path))?;
    records::modify(&c.store, &who.account, &name, |rec| {
        if rec.resolve(Some(&q)).is_none() {
            return Err(not_found(&c, rec, Some(&q)));
        }
        rec.provisioned.insert(q.clone(), n);
        Ok(())
    })
    .await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({
            "RequestedProvisionedConcurrentExecutions": n,
            "AllocatedProvisionedConcurrentExecutions": 0,
            "AvailableProvisionedConcurrentExecutions": 0,
            "Status": "IN_PROGRESS",
            "LastModified": now(),
        })),
    )
        .into_response())
}

pub async fn get_provisioned(
    State(c): C,
    Extension(who): Who,
    Path(name): Path<String>,
    Query(q): Query<QualifierQuery>,
) -> Result<Json<Value>, ApiError> {
    let (name, from_path) = function_ref(&who, &name)?;
    let q = provisioned_qualifier(q.qualifier.or(from_path))?;
    let rec = records::get(&c.store, &who.account, &name).await?;
    let (Some(n), Some(v)) = (rec.provisioned.get(&q), rec.resolve(Some(&q))) else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "ProvisionedConcurrencyConfigNotFoundException",
            format!("No Provisioned Concurrency Config found for this function: {q}"),
        ));
    };
    let dname = deployment_name(&rec.account, &rec.name, &v.spec);
    let hosts = live_hosts(&c.store).await.unwrap_or_default();
    let on = deploy::placed(&c.store, &dname)
        .await?
        .into_iter()
        .find(|d| d.provisioned == *n && hosts.iter().any(|h| h.id == d.host));
    let allocated = if on.is_some() { *n } else { 0 };
    let mut out = json!({
        "RequestedProvisionedConcurrentExecutions": n,
        "AllocatedProvisionedConcurrentExecutions": allocated,
        "AvailableProvisionedConcurrentExecutions": allocated,
        "Status": if on.is_some() { "READY" } else { "IN_PROGRESS" },
    });
    if let Some(d) = on {
        // Ember: where the instances are kept.
        out["Host"] = json!(d.host);
    }
    Ok(Json(out))
}

pub async fn health(State(c): C) -> Json<Value> {
    Json(json!({"Replica": c.cfg.replica_id, "Leader": c.is_leader()}))
}
