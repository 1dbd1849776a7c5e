//! SigV4 verification: `sigv4::verify` and the cluster's real front door
//! (`api::authenticate`, the axum middleware that checks the headers, the
//! access key in the store, the size and then the body), fed fuzzed
//! requests. The store (embedded, in a temp dir) holds one access key,
//! `KEY_ID` with `SECRET`; the fuzzer never sees that secret.
//!
//! Checks: no panic; a request that reaches the handler behind the front
//! door, or that `verify` accepts, was signed by this target with the
//! key's real secret and not changed after (a request signed with any
//! other secret, or not signed, or changed, never verifies); no request
//! verifies for an unknown key; and the front door and `verify` agree on
//! every request they both see as sent.
//!
//! Input: a flags byte, then lines (`\n`):
//! - method
//! - path, with `?query` if any
//! - `region/service` to sign with
//! - an access key id and a secret (space between) for the input's own key
//! - headers, `Name: value`, up to an empty line
//! - the body: everything after.
//!
//! Flags: bit 0 signs the request (`sigv4::sign_request`, now) before it is
//! sent; bit 1 signs with the real secret (else the input's, never equal);
//! bit 2 names the real key id (else the input's); bit 3 changes the body
//! after signing; bit 4 declares the body's hash (`x-amz-content-sha256`).
//! In header values `{now}` becomes the current `X-Amz-Date` and `{today}`
//! its day, so the fuzzer's dates are in the allowed skew.
#![no_main]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use axum::body::Body;
use axum::http;
use ember_cluster::sigv4;
use libfuzzer_sys::fuzz_target;
// Links ember_fuzz, whose global allocator aborts on one allocation over 128 MiB.
use ember_fuzz as _;
use sha2::{Digest, Sha256};
use tower::ServiceExt;

const KEY_ID: &str = "AKIAFUZZEXAMPLE0001";
const SECRET: &str = "fuzzSecretNeverInAnyInput/K7MDENG+bPxRfiCY";
const ACCOUNT: &str = "123456789012";

/// Set by the handler behind the front door: the request got through.
static REACHED: AtomicBool = AtomicBool::new(false);

struct Door {
    rt: tokio::runtime::Runtime,
    app: axum::Router,
    _dir: tempfile::TempDir,
}

fn door() -> &'static Door {
    static DOOR: OnceLock<Door> = OnceLock::new();
    DOOR.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temp dir");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let store = ember_store::Store::Embedded(
            ember_store::EmbeddedStore::open(&dir.path().join("store")).expect("store"),
        );
        let key = ember_cluster::accounts::AccessKey {
            access_key_id: KEY_ID.into(),
            secret_access_key: SECRET.into(),
            account: ACCOUNT.into(),
        };
        rt.block_on(ember_cluster::accounts::add_key(&store, &key))
            .expect("add the key");
        let files = ember_tls::dev_certs(&dir.path().join("tls"), "fuzz", &[])
            .expect("certificates");
        let tls = ember_tls::Tls::load(&files).expect("TLS");
        let c = ember_cluster::service::Cluster::new(
            store,
            ember_lambda::host_client::HostClient::new("fuzz", &tls),
            ember_cluster::service::Config {
                replica_id: "fuzz".into(),
                region: "us-east-1".into(),
                leader_ttl: std::time::Duration::from_secs(6),
                async_retry_delay: std::time::Duration::from_secs(1),
                body_budget: 0,
                // No replay cache: the same input verifies the same way
                // every time it runs.
                replay_cache_entries: 0,
            },
        );
        let app = axum::Router::new()
            .fallback(|| async {
                REACHED.store(true, Ordering::SeqCst);
                "reached"
            })
            .layer(axum::middleware::from_fn_with_state(
                c,
                ember_cluster::api::authenticate,
            ));
        Door { rt, app, _dir: dir }
    })
}

fn line<'a>(rest: &mut &'a [u8]) -> &'a [u8] {
    match rest.iter().position(|&b| b == b'\n') {
        Some(i) => {
            let l = &rest[..i];
            *rest = &rest[i + 1..];
            l
        }
        None => std::mem::take(rest),
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// What the front door answers: whether the request got through; None
/// when `http` cannot even represent it (hyper would have refused it).
fn front_door(
    method: &str,
    path: &str,
    query: &str,
    headers: &[(String, String)],
    body: &[u8],
) -> Option<bool> {
    if !path.starts_with('/') {
        return None;
    }
    let uri = if query.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{query}")
    };
    let mut b = http::Request::builder()
        .method(http::Method::from_bytes(method.as_bytes()).ok()?)
        .uri(&uri);
    for (k, v) in headers {
        b = b.header(k.as_str(), v.as_str());
    }
    let req = b.body(Body::from(body.to_vec())).ok()?;
    // Only requests whose path and query read back as sent: the rest are
    // forms (absolute URIs) the front door sees differently by design.
    if req.uri().path() != path || req.uri().query().unwrap_or("") != query {
        return None;
    }
    let d = door();
    REACHED.store(false, Ordering::SeqCst);
    let resp =
        d.rt.block_on(d.app.clone().oneshot(req))
            .expect("the router never fails");
    let reached = REACHED.load(Ordering::SeqCst);
    assert_eq!(
        reached,
        resp.status() == http::StatusCode::OK,
        "status {}",
        resp.status()
    );
    Some(reached)
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, mut rest)) = data.split_first() else {
        return;
    };
    let (sign, real_secret, real_key, tamper, declare) = (
        flags & 1 != 0,
        flags & 2 != 0,
        flags & 4 != 0,
        flags & 8 != 0,
        flags & 16 != 0,
    );
    let method = text(line(&mut rest));
    let target = text(line(&mut rest));
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_string(), q.to_string()),
        None => (target.clone(), String::new()),
    };
    let scope = text(line(&mut rest));
    let (region, service) = scope.split_once('/').unwrap_or((&scope, "lambda"));
    let own = text(line(&mut rest));
    let (own_key, own_secret) = own.split_once(' ').unwrap_or((&own, ""));
    // The input's own secret is never the real one.
    let own_secret = if own_secret == SECRET {
        format!("{own_secret}x")
    } else {
        own_secret.to_string()
    };

    let now = jiff::Timestamp::now();
    let amz_date = now.strftime("%Y%m%dT%H%M%SZ").to_string();
    let mut headers: Vec<(String, String)> = Vec::new();
    loop {
        if rest.is_empty() {
            break;
        }
        let l = line(&mut rest);
        if l.is_empty() {
            break;
        }
        let l = text(l);
        let (k, v) = l.split_once(':').unwrap_or((&l, ""));
        let v = v
            .trim_start()
            .replace("{now}", &amz_date)
            .replace("{today}", &amz_date[..8]);
        headers.push((k.to_string(), v));
        if headers.len() > 64 {
            return;
        }
    }
    let mut body = rest.to_vec();
    // The request line, for both requests below (before and after signing).
    let request_line = sigv4::Request {
        method: &method,
        path: &path,
        query: &query,
        headers: &[],
        body: &[],
    };

    if sign {
        if declare {
            headers.push((
                "x-amz-content-sha256".into(),
                hex::encode(Sha256::digest(&body)),
            ));
        }
        let req = sigv4::Request {
            headers: &headers,
            body: &body,
            ..request_line
        };
        let key = if real_key { KEY_ID } else { own_key };
        let secret = if real_secret {
            SECRET
        } else {
            own_secret.as_str()
        };
        let added = sigv4::sign_request(&req, key, secret, region, service, now);
        headers.extend(added);
        if tamper {
            body.push(b'!');
        }
    }
    // Signed by this target with the key's secret, unchanged since.
    let legit = sign && real_secret && real_key && !tamper;

    let req = sigv4::Request {
        headers: &headers,
        body: &body,
        ..request_line
    };
    let verified = sigv4::verify(&req, now, |k| (k == KEY_ID).then(|| SECRET.to_string()));
    if verified.is_ok() {
        assert!(legit, "verified without the key's secret: {verified:?}");
    }
    // The input's own secret for its own key: only its signatures pass.
    let own_verified = sigv4::verify(&req, now, |k| (k == own_key).then(|| own_secret.clone()));
    if own_verified.is_ok() {
        assert!(
            sign && !real_secret && !tamper,
            "verified under a secret it was not signed with"
        );
    }
    assert!(
        !matches!(sigv4::verify(&req, now, |_| None), Ok(_)),
        "verified for an unknown key"
    );
    if let Err(e) = &verified {
        // Every refusal has AWS's code. (A request this target signed may
        // still be refused: the input's own headers can carry another
        // Authorization or date ahead of the ones signing adds.)
        assert!(!e.code().is_empty());
    }

    if let Some(reached) = front_door(&method, &path, &query, &headers, &body) {
        if reached {
            assert!(
                legit,
                "the front door let through a request not signed with the key's secret"
            );
        }
        // The front door refuses key ids AWS would never issue before
        // looking them up; ours is plausible, so it agrees with verify.
        assert_eq!(
            reached,
            verified.is_ok(),
            "the front door and verify disagree: {verified:?}"
        );
    }
});
