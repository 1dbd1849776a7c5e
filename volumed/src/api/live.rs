//! Volumes changed while attached: moved to another service, a range split
//! off into a new volume, volumes combined into a new one. All three are
//! live copies ([`crate::copy`]); the copy runs on a blocking thread.

use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{parse, ApiError, Grant, Service, S};
use crate::copy::{FileSink, LiveCopy, NbdSink, Part, Sink};
use crate::nbd::client::Client;
use crate::registry::{valid_size, RegistryError, MAX_SIZE};
use crate::remote;

/// The host name the copier's own attachment on the target carries.
const COPIER: &str = "ember-volumed-move";

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
struct MoveInput {
    /// The other service's API socket.
    target: String,
    /// What the old attachment's open NBD connections get after the fence.
    #[serde(default)]
    fence: FenceMode,
}

#[derive(Deserialize, Default, PartialEq, Eq, Clone, Copy)]
enum FenceMode {
    /// Every request is answered EPERM and never applied.
    Refuse,
    /// The connection ends at its next request, unanswered and unapplied:
    /// the default, because a client that re-sends on a new connection (the
    /// VMM's NBD engine) then loses nothing across the move, where an errno
    /// would fail the guest's request.
    #[default]
    Disconnect,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
struct SplitInput {
    new_name: String,
    offset: u64,
    length: u64,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
struct CombineInput {
    new_name: String,
    sources: Vec<String>,
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "CopyError",
        e.to_string(),
    )
}

fn bad_gateway(msg: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_GATEWAY, "TargetError", msg)
}

/// Runs blocking work (copies, store writes) off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.map_err(internal)?
}

/// One call to the target; its error answers become ours (a 409 for a name
/// taken there), an unreachable target a 502.
async fn target_call(
    target: &FsPath,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> Result<Value, ApiError> {
    let (st, v) = remote::call(target, method, path, body)
        .await
        .map_err(|e| bad_gateway(format!("the target volume service: {e}")))?;
    if (200..300).contains(&st) {
        return Ok(v);
    }
    let msg = format!(
        "the target volume service {} answered {st} to {method} {path}: {}",
        target.display(),
        v["Message"].as_str().unwrap_or("(no message)")
    );
    Err(match st {
        409 => ApiError::new(StatusCode::CONFLICT, "Conflict", msg),
        _ => bad_gateway(msg),
    })
}

/// Best effort, after a failed move: the target's half-made volume goes.
async fn remove_on_target(target: &FsPath, name: &str) {
    let _ = remote::call(target, "POST", &format!("/v1/volumes/{name}/detach"), None).await;
    let _ = remote::call(target, "DELETE", &format!("/v1/volumes/{name}"), None).await;
}

/// Opens the copier's NBD connection from the target's attach answer: the
/// unix socket when it is on this host, else TCP (inside TLS, with this
/// service's identity, when the target's URI is `nbds://`).
fn connect(g: &Grant, tls: Option<&ember_tls::Tls>) -> Result<Client, ApiError> {
    let unix = g.unix_uri.as_deref().and_then(|u| u.split_once("?socket="));
    let done = match (unix, g.uri.as_deref()) {
        (Some((_, sock)), _) if FsPath::new(sock).exists() => {
            Client::connect_unix(FsPath::new(sock), &g.export_name)
        }
        (_, Some(u)) => {
            let (secure, rest) = match (u.strip_prefix("nbds://"), u.strip_prefix("nbd://")) {
                (Some(r), _) => (true, r),
                (None, Some(r)) => (false, r),
                // (No address: refused just below.)
                (None, None) => (false, ""),
            };
            // (Never the URI itself in a message: it holds the credential.)
            let addr = rest.split_once('/').map(|(a, _)| a).ok_or_else(|| {
                bad_gateway("the target's NBD URI is not nbd[s]://HOST:PORT/EXPORT")
            })?;
            match (secure, tls) {
                (false, _) => Client::connect_tcp(addr, &g.export_name),
                (true, Some(tls)) => Client::connect_tcp_tls(addr, &g.export_name, tls),
                (true, None) => {
                    return Err(bad_gateway(format!(
                        "the target serves NBD over TLS (nbds://{addr}) and this service has \
                         no TLS identity (--tls-cert/--tls-key/--tls-ca or --tls-dev-dir)"
                    )))
                }
            }
        }
        _ => {
            return Err(bad_gateway(
                "the target serves no NBD URI this host can reach",
            ))
        }
    };
    done.map_err(|e| bad_gateway(format!("the target's NBD server: {e}")))
}

/// `POST /v1/volumes/{name}/move-to-server {"Target": "<API socket>"}`.
pub async fn move_to_server(
    State(s): S,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let i: MoveInput = parse(&body)?;
    if i.target.is_empty() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "InvalidParameter",
            "Target: want the other ember-volumed's API socket",
        ));
    }
    let target = PathBuf::from(&i.target);
    let rec = s.registry.get(&name)?;
    if let Some(t) = rec.moved_to {
        return Err(RegistryError::Moved { name, target: t }.into());
    }
    // The volume on the target, attached to the copier alone for now.
    target_call(
        &target,
        "POST",
        "/v1/volumes",
        Some(json!({"Name": name, "SizeBytes": rec.size_bytes, "Account": rec.account})),
    )
    .await?;
    let copier = match target_call(
        &target,
        "POST",
        &format!("/v1/volumes/{name}/attach"),
        Some(json!({"Host": COPIER})),
    )
    .await
    .and_then(|v| {
        serde_json::from_value::<Grant>(v)
            .map_err(|e| bad_gateway(format!("the target's attach answer: {e}")))
    }) {
        Ok(g) => g,
        Err(e) => {
            remove_on_target(&target, &name).await;
            return Err(e);
        }
    };
    // Rounds while the attachment stays live here.
    let (reg, n, tls) = (s.registry.clone(), name.clone(), s.nbd_tls.clone());
    let copied = blocking(move || {
        let mut sink = NbdSink(connect(&copier, tls.as_ref())?);
        let mut c = LiveCopy::start(
            &reg,
            vec![Part {
                name: n.clone(),
                src: 0,
                len: rec.size_bytes,
                dst: 0,
            }],
        )
        .map_err(internal)?;
        c.converge(&mut sink)
            .map_err(|e| bad_gateway(format!("copying {n}: {e}")))?;
        Ok((c, sink))
    })
    .await;
    let (mut c, mut sink) = match copied {
        Ok(x) => x,
        Err(e) => {
            remove_on_target(&target, &name).await;
            return Err(e);
        }
    };
    // The fence: from here every request of the old attachment is refused.
    let (reg, n, t) = (s.registry.clone(), name.clone(), i.target.clone());
    let disconnect = i.fence == FenceMode::Disconnect;
    let fenced = blocking(move || Ok(reg.fence_moved(&n, &t, disconnect)?)).await;
    let host = match fenced {
        Ok(h) => h,
        Err(e) => {
            remove_on_target(&target, &name).await;
            return Err(e);
        }
    };
    // Closes its vhost-user socket; nothing is opened, so nothing fails
    // that matters here (and the fence holds regardless).
    let _ = s.sync(&name);
    // The last dirty ranges, made durable on the target before anyone is
    // pointed there.
    let finished = blocking(move || {
        c.final_pass(&mut sink)
            .and_then(|()| sink.sync())
            .map_err(|e| bad_gateway(format!("the final copy: {e}")))?;
        let _ = sink.0.disconnect();
        Ok(c)
    })
    .await;
    // Then the target's attachment for the host (a new generation there,
    // which also fences the copier's).
    let switched = match finished {
        Ok(c) => match &host {
            Some(h) => target_call(
                &target,
                "POST",
                &format!("/v1/volumes/{name}/move"),
                Some(json!({"Host": h})),
            )
            .await
            .map(|g| (c, g)),
            None => target_call(&target, "POST", &format!("/v1/volumes/{name}/detach"), None)
                .await
                .map(|_| (c, Value::Null)),
        },
        Err(e) => Err(e),
    };
    match switched {
        Ok((c, grant)) => {
            log::info!(
                "volume {name} moved to {} ({} rounds, {} bytes)",
                i.target,
                c.rounds,
                c.bytes
            );
            Ok(Json(json!({
                "Volume": name,
                "Target": i.target,
                "Rounds": c.rounds,
                "BytesCopied": c.bytes,
                "Attachment": grant,
            })))
        }
        Err(e) => {
            // Served here again, under a new generation.
            remove_on_target(&target, &name).await;
            let (reg, n, h) = (s.registry.clone(), name.clone(), host.clone());
            let back = blocking(move || Ok(reg.unfence(&n, h.as_deref())?)).await?;
            // The move's error is the one to report; a socket that could
            // not be made shows in the log, and attaching again retries.
            let _ = s.sync(&name);
            let grant = back.map(|a| s.grant(&name, a));
            Err(ApiError::new(
                e.0,
                &e.1,
                format!(
                    "{}; the volume stays on this service{}",
                    e.2,
                    grant
                        .map(|g| format!(", attached again to {}", g.host))
                        .unwrap_or_default()
                ),
            ))
        }
    }
}

/// Copies `parts` into a new volume `new_name` of `size` bytes on this
/// service: rounds while the sources are written, then the final pass
/// with every request held off (the exclusive I/O gate), so the new volume
/// is the sources at one instant. Made durable before it is registered.
async fn copy_into_new(
    s: &Arc<Service>,
    new_name: String,
    size: u64,
    account: Option<String>,
    parts: Vec<Part>,
) -> Result<Value, ApiError> {
    let reg = s.registry.clone();
    blocking(move || {
        reg.check_new_name(&new_name)?;
        let tmp = reg.image_path(&new_name).with_extension("img.copying");
        let made = (|| -> Result<(LiveCopy, u64), ApiError> {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&tmp)
                .map_err(internal)?;
            f.set_len(size).map_err(internal)?;
            let mut sink = FileSink(f);
            let mut c = LiveCopy::start(&reg, parts).map_err(internal)?;
            c.converge(&mut sink).map_err(internal)?;
            {
                let _gate = reg.gate_exclusive();
                c.final_pass(&mut sink).map_err(internal)?;
            }
            sink.sync().map_err(internal)?;
            Ok((c, size))
        })();
        let rec = made.and_then(|(c, size)| {
            let rec = reg.adopt(&new_name, size, account.as_deref(), &tmp)?;
            Ok((c, rec))
        });
        match rec {
            Ok((c, rec)) => Ok(json!({
                "Volume": rec.public(),
                "Rounds": c.rounds,
                "BytesCopied": c.bytes,
            })),
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                Err(e)
            }
        }
    })
    .await
}

fn invalid(msg: String) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "InvalidParameter", msg)
}

/// `POST /v1/volumes/{name}/split {"NewName", "Offset", "Length"}`.
pub async fn split(
    State(s): S,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let i: SplitInput = parse(&body)?;
    let rec = s.registry.get(&name)?;
    if let Some(t) = rec.moved_to {
        return Err(RegistryError::Moved { name, target: t }.into());
    }
    valid_size(i.length).map_err(|_| {
        invalid(format!(
            "Length {}: want a multiple of 512 bytes, at least 512",
            i.length
        ))
    })?;
    if !i.offset.is_multiple_of(512)
        || i.offset
            .checked_add(i.length)
            .is_none_or(|e| e > rec.size_bytes)
    {
        return Err(invalid(format!(
            "the range {}+{} is not inside volume {name} ({} bytes) at a multiple of 512",
            i.offset, i.length, rec.size_bytes
        )));
    }
    let part = Part {
        name,
        src: i.offset,
        len: i.length,
        dst: 0,
    };
    let out = copy_into_new(&s, i.new_name, i.length, rec.account, vec![part]).await?;
    Ok((StatusCode::CREATED, Json(out)))
}

/// `POST /v1/volumes/combine {"NewName", "Sources": [a, b, ...]}`.
pub async fn combine(State(s): S, body: Bytes) -> Result<(StatusCode, Json<Value>), ApiError> {
    let i: CombineInput = parse(&body)?;
    if i.sources.len() < 2 {
        return Err(invalid("Sources: want two volumes or more".into()));
    }
    let mut parts = Vec::new();
    let mut size = 0u64;
    let mut account = None;
    for (n, name) in i.sources.iter().enumerate() {
        let rec = s.registry.get(name)?;
        if n == 0 {
            account = rec.account.clone();
        } else if rec.account != account {
            return Err(invalid(
                "Sources: every volume must belong to the same account".into(),
            ));
        }
        if let Some(t) = rec.moved_to {
            return Err(RegistryError::Moved {
                name: name.clone(),
                target: t,
            }
            .into());
        }
        parts.push(Part {
            name: name.clone(),
            src: 0,
            len: rec.size_bytes,
            dst: size,
        });
        size += rec.size_bytes;
    }
    if size > MAX_SIZE {
        return Err(invalid(format!(
            "the combined size {size} is over the largest volume ({MAX_SIZE} bytes)"
        )));
    }
    let out = copy_into_new(&s, i.new_name, size, account, parts).await?;
    Ok((StatusCode::CREATED, Json(out)))
}
