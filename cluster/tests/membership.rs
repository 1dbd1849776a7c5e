//! Host membership and leader election on both stores: the embedded one
//! and a real etcd. Leases are short (2 s) so expiry is seen quickly.

use std::time::{Duration, Instant};

use ember_cluster::leader::{leader, Candidate};
use ember_lambda::hosts::{live_hosts, HostReport, Membership};
use ember_store::Store;

const TTL: Duration = Duration::from_secs(2);

fn report(id: &str, running: u32) -> HostReport {
    HostReport {
        id: id.into(),
        endpoint: format!("http://{id}:9000"),
        capacity: 8,
        running,
        warm_idle: Default::default(),
    }
}

async fn ids(store: &Store) -> Vec<String> {
    live_hosts(store)
        .await
        .unwrap()
        .into_iter()
        .map(|h| h.id)
        .collect()
}

/// Polls `cond` for up to 15 s.
async fn eventually<F: std::future::Future<Output = bool>>(
    what: &str,
    mut cond: impl FnMut() -> F,
) {
    let start = Instant::now();
    while !cond().await {
        assert!(start.elapsed() < Duration::from_secs(15), "never: {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn membership_and_leadership(store: &Store) {
    let mut h1 = Membership::join(store, &report("h1", 0), TTL)
        .await
        .unwrap();
    let _h2 = Membership::join(store, &report("h2", 0), TTL)
        .await
        .unwrap();
    assert_eq!(ids(store).await, vec!["h1", "h2"]);
    // h1 heartbeats, h2 is silent: h2 goes down by itself.
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        h1.heartbeat(store, &report("h1", 3)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eventually("h2 marked down", || async {
        ids(store).await == vec!["h1"]
    })
    .await;
    assert_eq!(
        live_hosts(store).await.unwrap()[0].running,
        3,
        "the latest report"
    );
    h1.leave(store).await.unwrap();
    assert!(ids(store).await.is_empty(), "a clean leave is immediate");

    // Leader election: one of two replicas leads; when it stops, the other.
    let (mut a, mut b) = (
        Candidate::new("replica-a", TTL),
        Candidate::new("replica-b", TTL),
    );
    assert!(a.campaign(store).await.unwrap());
    assert!(!b.campaign(store).await.unwrap());
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(a.campaign(store).await.unwrap(), "the leader keeps leading");
        assert!(!b.campaign(store).await.unwrap());
    }
    assert_eq!(leader(store).await.unwrap().as_deref(), Some("replica-a"));
    // a stops heartbeating (as if killed).
    let start = Instant::now();
    while !b.campaign(store).await.unwrap() {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "b never took over"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(leader(store).await.unwrap().as_deref(), Some("replica-b"));
    assert!(!a.campaign(store).await.unwrap(), "a learns it lost");
    b.resign(store).await.unwrap();
    assert_eq!(leader(store).await.unwrap(), None);
}

#[tokio::test]
async fn on_the_embedded_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&[], dir.path()).await.unwrap();
    membership_and_leadership(&store).await;
}

#[tokio::test]
async fn on_etcd() {
    let Some(etcd) = ember_store::testing::EtcdProcess::start_or_skip() else {
        return;
    };
    let store = etcd.store().await.unwrap();
    membership_and_leadership(&store).await;
}
