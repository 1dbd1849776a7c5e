//! The record rules, with builds that boot nothing.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::build::{BuildFailure, BuildFuture, Built, SnapshotBuilder};
use super::records::lambda_timestamp;
use super::*;
use crate::model::sample_record;

/// A build that takes no time: it fails with an init error while `fail` is set.
#[derive(Default)]
struct QuickBuilder {
    fail: AtomicBool,
}

impl SnapshotBuilder for QuickBuilder {
    fn build<'a>(&'a self, _: &'a str, _: &'a VersionRecord, dir: &'a Path) -> BuildFuture<'a> {
        Box::pin(async move {
            if self.fail.load(Ordering::SeqCst) {
                return Err(BuildFailure::Init("Runtime.ImportModuleError: boom".into()));
            }
            std::fs::create_dir_all(dir).map_err(|e| BuildFailure::Internal(e.to_string()))?;
            Ok(Built {
                init_duration_ms: 7,
                network: None,
            })
        })
    }
}

fn settings() -> Settings {
    Settings {
        region: "us-east-1".into(),
        account: "123456789012".into(),
        kernel: "/nonexistent/vmlinux".into(),
        rootfs: BTreeMap::from([(RuntimeKind::Python3, "/nonexistent/rootfs".into())]),
        init_timeout: Duration::from_secs(1),
        parallel_builds: 1,
        volume_service: false,
    }
}

fn open(dir: &Path, builder: Arc<dyn SnapshotBuilder>) -> Arc<Functions> {
    let store = Store::open(dir).unwrap();
    let records = Functions::load(&store).unwrap();
    Arc::new(Functions::new(settings(), store, records, builder))
}

/// Stores `rec` and opens the records over it, with builds that succeed.
fn with_stored(dir: &Path, rec: &FunctionRecord) -> Arc<Functions> {
    Store::open(dir).unwrap().save_function(rec).unwrap();
    open(dir, Arc::new(QuickBuilder::default()))
}

/// Stores `f` with an active `$LATEST` and opens the records over it.
fn with_active(dir: &Path, builder: Arc<dyn SnapshotBuilder>) -> Arc<Functions> {
    let mut rec = sample_record("f");
    rec.versions.get_mut(LATEST).unwrap().state = State::Active;
    Store::open(dir).unwrap().save_function(&rec).unwrap();
    open(dir, builder)
}

/// Waits for the builds of `f` to be recorded.
async fn settled(fns: &Functions) -> FunctionRecord {
    for _ in 0..1000 {
        let rec = fns.get("f").unwrap();
        if rec
            .versions
            .values()
            .all(|v| v.state != State::Pending && !v.update_in_progress)
        {
            return rec;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("builds of f never ended: {:?}", fns.get("f"));
}

fn describe(text: &str) -> SpecInput {
    SpecInput {
        description: Some(text.into()),
        ..SpecInput::default()
    }
}

#[test]
fn timestamps_look_like_lambdas() {
    let t = jiff::Timestamp::from_millisecond(1_700_000_000_123).unwrap();
    assert_eq!(lambda_timestamp(t), "2023-11-14T22:13:20.123+0000");
}

/// A write stuck on the disk (here: its temporary file is a FIFO
/// nobody reads, so opening it blocks) holds up no reader, and when it
/// fails the record in memory is still the stored one.
#[test]
fn readers_never_wait_for_a_write_and_a_failed_write_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let fns = with_stored(dir.path(), &sample_record("f1"));
    let fifo = dir
        .path()
        .join(format!("functions/.f1.json.tmp-{}", std::process::id()));
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    let writer = {
        let fns = fns.clone();
        std::thread::spawn(move || fns.set_reserved_concurrency("f1", Some(7)))
    };
    std::thread::sleep(Duration::from_millis(200));
    let (tx, rx) = std::sync::mpsc::channel();
    {
        let fns = fns.clone();
        std::thread::spawn(move || {
            let _ = tx.send((
                fns.get("f1").map(|r| r.reserved_concurrency),
                fns.list().len(),
            ));
        });
    }
    let read = rx.recv_timeout(Duration::from_secs(10));
    // Let the write go on: its body goes into the pipe, and fsync of a
    // pipe fails, so the write fails.
    let mut pipe = std::fs::File::open(&fifo).unwrap();
    let written = writer.join().unwrap();
    let mut body = Vec::new();
    std::io::Read::read_to_end(&mut pipe, &mut body).unwrap();
    let (got, listed) = read.expect("a read waited for a write's disk");
    assert_eq!(got.unwrap(), None, "a reader saw an unstored change");
    assert_eq!(listed, 1);
    assert!(
        matches!(written, Err(FunctionError::Save { .. })),
        "writing through a FIFO cannot succeed: {written:?}"
    );
    assert_eq!(fns.get("f1").unwrap().reserved_concurrency, None);
    assert_eq!(
        Store::open(dir.path()).unwrap().load_functions().unwrap().0[0],
        sample_record("f1")
    );
}

/// A published version is `$LATEST`'s copy, pending until its own
/// snapshot is built; publishing an unchanged `$LATEST` again gives the
/// same version.
#[tokio::test]
async fn publish_copies_latest_once_and_builds_its_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let fns = with_active(dir.path(), Arc::new(QuickBuilder::default()));
    let v1 = fns.publish("f").unwrap();
    assert_eq!(
        (
            v1.version.as_str(),
            v1.state,
            v1.state_reason_code.as_deref()
        ),
        ("1", State::Pending, Some("Creating"))
    );
    let rec = settled(&fns).await;
    let built = &rec.versions["1"];
    assert_eq!(built.state, State::Active);
    let snap = built.snapshot.as_ref().expect("a snapshot");
    assert_eq!((snap.generation, snap.init_duration_ms), (1, 7));
    assert_eq!(built.spec, rec.latest().spec);

    assert_eq!(fns.publish("f").unwrap().version, "1", "nothing changed");
    assert_eq!(fns.get("f").unwrap().next_version, 2);

    fns.update("f", describe("second"), None, false).unwrap();
    settled(&fns).await;
    let v2 = fns.publish("f").unwrap();
    assert_eq!(
        (v2.version.as_str(), v2.spec.description.as_str()),
        ("2", "second")
    );
    assert_eq!(settled(&fns).await.published(), vec![1, 2]);
}

/// While `$LATEST` is pending or being updated, it can be neither
/// published nor updated again.
#[tokio::test]
async fn a_pending_latest_takes_no_publish_and_no_update() {
    let dir = tempfile::tempdir().unwrap();
    let fns = with_stored(dir.path(), &sample_record("f"));
    assert!(matches!(
        fns.publish("f"),
        Err(FunctionError::LatestUpdating)
    ));
    let e = fns.update("f", describe("x"), None, false).unwrap_err();
    assert_eq!(
        e.to_string(),
        "The operation cannot be performed at this time. An update is in progress for resource: \
         arn:aws:lambda:us-east-1:123456789012:function:f"
    );
    let rec = fns.get("f").unwrap();
    assert_eq!(rec.next_version, 1);
    assert_eq!(rec.latest().spec.description, "");
}

#[tokio::test]
async fn aliases_point_at_existing_versions_and_keep_what_an_update_leaves_out() {
    let dir = tempfile::tempdir().unwrap();
    let fns = with_active(dir.path(), Arc::new(QuickBuilder::default()));
    fns.publish("f").unwrap();
    settled(&fns).await;
    let put = |alias: &str, version: Option<&str>, description: Option<&str>, create| {
        fns.put_alias(
            "f",
            alias,
            version.map(String::from),
            description.map(String::from),
            create,
        )
    };
    assert!(matches!(
        put("live", None, None, true),
        Err(FunctionError::NoAliasVersion)
    ));
    assert!(
        matches!(put("live", Some("7"), None, true), Err(FunctionError::NoAliasTarget(v)) if v == "7")
    );
    assert!(matches!(
        put("bad name!", Some("1"), None, true),
        Err(FunctionError::Invalid(_))
    ));
    put("live", Some("1"), Some("prod"), true).unwrap();
    assert!(
        matches!(put("live", Some("1"), None, true), Err(FunctionError::AliasExists(a)) if a == "live")
    );
    assert!(
        matches!(put("gone", Some("1"), None, false), Err(FunctionError::NoSuchAlias(a)) if a == "gone")
    );
    let updated = put("live", None, None, false).unwrap();
    assert_eq!(
        (
            updated.function_version.as_str(),
            updated.description.as_str()
        ),
        ("1", "prod")
    );
    let moved = put("live", Some(LATEST), None, false).unwrap();
    assert_eq!(moved.function_version, LATEST);
    assert_eq!(
        fns.get("f").unwrap().resolve(Some("live")).unwrap().version,
        LATEST
    );
    fns.delete_alias("f", "live").unwrap();
    assert!(matches!(
        fns.delete_alias("f", "live"),
        Err(FunctionError::NoSuchAlias(_))
    ));
}

#[tokio::test]
async fn deletes_keep_latest_and_aliased_versions_and_are_stored() {
    let dir = tempfile::tempdir().unwrap();
    let fns = with_active(dir.path(), Arc::new(QuickBuilder::default()));
    fns.publish("f").unwrap();
    settled(&fns).await;
    fns.put_alias("f", "live", Some("1".into()), None, true)
        .unwrap();
    assert!(matches!(
        fns.delete("f", Some(LATEST)),
        Err(FunctionError::DeleteLatest)
    ));
    assert!(
        matches!(fns.delete("f", Some("1")), Err(FunctionError::VersionHasAlias(v)) if v == "1")
    );
    assert!(matches!(fns.delete("f", Some("9")), Err(FunctionError::NoSuchVersion(v)) if v == "9"));
    fns.delete_alias("f", "live").unwrap();
    fns.delete("f", Some("1")).unwrap();
    assert_eq!(fns.get("f").unwrap().published(), Vec::<u64>::new());
    assert_eq!(
        open(dir.path(), Arc::new(QuickBuilder::default()))
            .get("f")
            .unwrap()
            .published(),
        Vec::<u64>::new(),
        "the deletion is stored"
    );

    fns.delete("f", None).unwrap();
    let gone = fns.get("f").unwrap_err();
    assert_eq!(
        gone.to_string(),
        "Function not found: arn:aws:lambda:us-east-1:123456789012:function:f"
    );
    assert!(matches!(
        fns.delete("f", None),
        Err(FunctionError::NotFound { .. })
    ));
    assert!(open(dir.path(), Arc::new(QuickBuilder::default()))
        .list()
        .is_empty());
}

/// A first build that fails leaves the version `Failed` with the reason;
/// an update builds it again.
#[tokio::test]
async fn a_failed_build_fails_the_version_until_an_update_builds_it() {
    let dir = tempfile::tempdir().unwrap();
    let builder = Arc::new(QuickBuilder::default());
    builder.fail.store(true, Ordering::SeqCst);
    let fns = with_active(dir.path(), builder.clone());
    fns.update("f", describe("one"), None, false).unwrap();
    let latest = settled(&fns).await.latest().clone();
    assert_eq!(latest.state, State::Failed);
    assert_eq!(latest.state_reason_code.as_deref(), Some("InitError"));
    assert_eq!(
        latest.state_reason.as_deref(),
        Some("Runtime.ImportModuleError: boom")
    );

    builder.fail.store(false, Ordering::SeqCst);
    let pending = fns.update("f", describe("two"), None, false).unwrap();
    assert_eq!(pending.latest().state, State::Pending);
    let latest = settled(&fns).await.latest().clone();
    assert_eq!(
        (latest.state, latest.state_reason_code),
        (State::Active, None)
    );
    assert_eq!(latest.spec.description, "two");
}

#[tokio::test]
async fn updates_are_checked_against_lambdas_rules_and_this_hosts_runtimes() {
    let dir = tempfile::tempdir().unwrap();
    let fns = with_active(dir.path(), Arc::new(QuickBuilder::default()));
    let runtime = |r: &str| SpecInput {
        runtime: Some(r.into()),
        ..SpecInput::default()
    };
    let e = fns
        .update("f", runtime("nodejs18.x"), None, false)
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "runtime nodejs18.x is not available on this host (no root filesystem configured for it)"
    );
    let too_big = SpecInput {
        memory_mib: Some(1 << 20),
        ..SpecInput::default()
    };
    assert!(matches!(
        fns.update("f", too_big, None, false),
        Err(FunctionError::Invalid(_))
    ));
    assert!(matches!(
        fns.update("nope", describe("x"), None, false),
        Err(FunctionError::NotFound { .. })
    ));
    let rec = fns.get("f").unwrap();
    assert_eq!(
        rec.latest().state,
        State::Active,
        "a refused update changes nothing"
    );
    assert!(!rec.latest().update_in_progress);
}

#[test]
fn concurrency_settings_are_stored_for_known_qualifiers_only() {
    let dir = tempfile::tempdir().unwrap();
    let fns = with_active(dir.path(), Arc::new(QuickBuilder::default()));
    fns.set_reserved_concurrency("f", Some(3)).unwrap();
    fns.set_provisioned("f", LATEST, 2).unwrap();
    assert!(
        matches!(fns.set_provisioned("f", "live", 1), Err(FunctionError::NoSuchQualifier(q)) if q == "live")
    );
    let reopened = open(dir.path(), Arc::new(QuickBuilder::default()))
        .get("f")
        .unwrap();
    assert_eq!(reopened.reserved_concurrency, Some(3));
    assert_eq!(
        reopened.provisioned,
        BTreeMap::from([(LATEST.to_string(), 2)])
    );
    fns.set_reserved_concurrency("f", None).unwrap();
    assert_eq!(fns.get("f").unwrap().reserved_concurrency, None);
}
