//! The same contract checked on both backends: the embedded store, and a
//! real etcd (Debian's etcd-server) started for the test.

use std::time::{Duration, Instant};

use ember_store::{Expect, Store, StoreError};

async fn contract(s: &Store, p: &str) {
    let k = format!("{p}/a");
    assert_eq!(s.get(&k).await.unwrap(), None);
    let v1 = s.put(&k, b"one", None).await.unwrap();
    let got = s.get(&k).await.unwrap().unwrap();
    assert_eq!(got.value, b"one");
    assert_eq!(got.version, v1);
    // Compare-and-swap: only on the version read.
    assert_eq!(
        s.compare_and_swap(&k, Expect::Absent, b"x", None)
            .await
            .unwrap(),
        None
    );
    let v2 = s
        .compare_and_swap(&k, Expect::Version(v1), b"two", None)
        .await
        .unwrap()
        .expect("swap on the current version");
    assert!(v2 > v1);
    assert_eq!(
        s.compare_and_swap(&k, Expect::Version(v1), b"x", None)
            .await
            .unwrap(),
        None
    );
    assert_eq!(s.get(&k).await.unwrap().unwrap().value, b"two");
    let kb = format!("{p}/b");
    assert!(s
        .compare_and_swap(&kb, Expect::Absent, b"new", None)
        .await
        .unwrap()
        .is_some());
    s.put(&format!("{p}x"), b"not under the prefix", None)
        .await
        .unwrap();
    let keys: Vec<String> = s
        .list(&format!("{p}/"))
        .await
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(keys, vec![k.clone(), kb.clone()]);
    assert!(!s.compare_and_delete(&k, Expect::Version(v1)).await.unwrap());
    assert!(s.compare_and_delete(&k, Expect::Version(v2)).await.unwrap());
    assert_eq!(s.get(&k).await.unwrap(), None);

    // Leases: a kept lease keeps its keys; an unkept one loses them.
    let lease = s.grant_lease(Duration::from_secs(2)).await.unwrap();
    let kl = format!("{p}/leased");
    s.put(&kl, b"alive", Some(lease)).await.unwrap();
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        s.keep_alive(lease).await.unwrap();
    }
    assert!(s.get(&kl).await.unwrap().is_some(), "kept alive");
    let start = Instant::now();
    while s.get(&kl).await.unwrap().is_some() {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "lease never expired"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let r = s.keep_alive(lease).await;
    assert!(matches!(r, Err(StoreError::LeaseGone(_))), "{r:?}");
    assert!(matches!(
        s.put(&kl, b"x", Some(lease)).await,
        Err(StoreError::LeaseGone(_))
    ));
    let l2 = s.grant_lease(Duration::from_secs(30)).await.unwrap();
    s.put(&kl, b"again", Some(l2)).await.unwrap();
    s.revoke(l2).await.unwrap();
    assert_eq!(s.get(&kl).await.unwrap(), None, "revoked with its lease");
}

#[tokio::test]
async fn embedded_store_keeps_the_contract_and_survives_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = Store::open(&[], dir.path()).await.unwrap();
        contract(&s, "/t").await;
        s.put("/kept", b"yes", None).await.unwrap();
    }
    let s = Store::open(&[], dir.path()).await.unwrap();
    assert_eq!(s.get("/kept").await.unwrap().unwrap().value, b"yes");
    assert_eq!(s.get("/t/b").await.unwrap().unwrap().value, b"new");
}

#[tokio::test]
async fn etcd_keeps_the_contract() {
    let Some(etcd) = ember_store::testing::EtcdProcess::start_or_skip() else {
        return;
    };
    let s = etcd
        .store()
        .await
        .unwrap_or_else(|e| panic!("etcd at {}: {e}", etcd.url));
    contract(&s, "/t").await;
}
