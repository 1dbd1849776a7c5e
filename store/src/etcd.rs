//! The etcd backend (etcd v3 API over gRPC, with `etcd-client`).

use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp};
use tokio::sync::Mutex;

use super::{Expect, Lease, StoreError, Versioned};

pub struct EtcdStore {
    // etcd-client's calls take `&mut self`; the client is cheap to clone,
    // but one behind a lock keeps call order simple.
    client: Mutex<Client>,
}

fn err(e: etcd_client::Error) -> StoreError {
    StoreError::Etcd(e.to_string())
}

fn compare(key: &str, expect: Expect) -> Compare {
    match expect {
        // A key that does not exist has create revision 0.
        Expect::Absent => Compare::create_revision(key, CompareOp::Equal, 0),
        Expect::Version(v) => Compare::mod_revision(key, CompareOp::Equal, v),
    }
}

fn put_options(lease: Option<Lease>) -> Option<PutOptions> {
    lease.map(|l| PutOptions::new().with_lease(l.0))
}

impl EtcdStore {
    pub async fn connect(endpoints: &[String]) -> Result<EtcdStore, StoreError> {
        let client = Client::connect(endpoints, None).await.map_err(err)?;
        Ok(EtcdStore {
            client: Mutex::new(client),
        })
    }

    pub async fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        let resp = self.client.lock().await.get(key, None).await.map_err(err)?;
        Ok(resp.kvs().first().map(|kv| Versioned {
            value: kv.value().to_vec(),
            version: kv.mod_revision(),
        }))
    }

    pub async fn list(&self, prefix: &str) -> Result<Vec<(String, Versioned)>, StoreError> {
        let resp = self
            .client
            .lock()
            .await
            .get(prefix, Some(GetOptions::new().with_prefix()))
            .await
            .map_err(err)?;
        Ok(resp
            .kvs()
            .iter()
            .map(|kv| {
                (
                    String::from_utf8_lossy(kv.key()).into_owned(),
                    Versioned {
                        value: kv.value().to_vec(),
                        version: kv.mod_revision(),
                    },
                )
            })
            .collect())
    }

    pub async fn put(
        &self,
        key: &str,
        value: &[u8],
        lease: Option<Lease>,
    ) -> Result<i64, StoreError> {
        let resp = self
            .client
            .lock()
            .await
            .put(key, value, put_options(lease))
            .await
            .map_err(|e| lease_err(e, lease))?;
        Ok(resp.header().map(|h| h.revision()).unwrap_or_default())
    }

    pub async fn compare_and_swap(
        &self,
        key: &str,
        expect: Expect,
        value: &[u8],
        lease: Option<Lease>,
    ) -> Result<Option<i64>, StoreError> {
        let txn = Txn::new()
            .when([compare(key, expect)])
            .and_then([TxnOp::put(key, value, put_options(lease))]);
        let resp = self
            .client
            .lock()
            .await
            .txn(txn)
            .await
            .map_err(|e| lease_err(e, lease))?;
        if !resp.succeeded() {
            return Ok(None);
        }
        Ok(Some(
            resp.header().map(|h| h.revision()).unwrap_or_default(),
        ))
    }

    pub async fn compare_and_delete(&self, key: &str, expect: Expect) -> Result<bool, StoreError> {
        let txn = Txn::new()
            .when([compare(key, expect)])
            .and_then([TxnOp::delete(key, None)]);
        let resp = self.client.lock().await.txn(txn).await.map_err(err)?;
        Ok(resp.succeeded())
    }

    pub async fn grant_lease(&self, ttl: Duration) -> Result<Lease, StoreError> {
        let secs = ttl.as_secs().max(1) as i64;
        let resp = self
            .client
            .lock()
            .await
            .lease_grant(secs, None)
            .await
            .map_err(err)?;
        Ok(Lease(resp.id()))
    }

    pub async fn keep_alive(&self, lease: Lease) -> Result<(), StoreError> {
        let mut client = self.client.lock().await;
        let gone = |e| lease_err(e, Some(lease));
        let (mut keeper, mut stream) = client.lease_keep_alive(lease.0).await.map_err(gone)?;
        keeper.keep_alive().await.map_err(gone)?;
        match stream.message().await.map_err(gone)? {
            // etcd answers an unknown lease with TTL 0.
            Some(r) if r.ttl() > 0 => Ok(()),
            _ => Err(StoreError::LeaseGone(lease.0)),
        }
    }

    pub async fn revoke(&self, lease: Lease) -> Result<(), StoreError> {
        match self.client.lock().await.lease_revoke(lease.0).await {
            Ok(_) => Ok(()),
            Err(e) if e.to_string().contains("not found") => Ok(()),
            Err(e) => Err(err(e)),
        }
    }
}

fn lease_err(e: etcd_client::Error, lease: Option<Lease>) -> StoreError {
    match lease {
        Some(l) if e.to_string().contains("lease not found") => StoreError::LeaseGone(l.0),
        _ => err(e),
    }
}
