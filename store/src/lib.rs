//! Ember's cluster state store. One interface, [`Store`], over two
//! backends: etcd, when there are several hosts (transactions for
//! compare-and-swap, leases for liveness), and an embedded store, the
//! single-host default (a file, with the same semantics in one process).
//!
//! Values are bytes; every key has a version (etcd's mod revision; a
//! counter in the embedded store) so that writers can compare-and-swap.

mod embedded;
mod etcd;
pub mod testing;

use std::time::Duration;

pub use embedded::EmbeddedStore;
pub use etcd::EtcdStore;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("etcd: {0}")]
    Etcd(String),
    #[error("embedded store: {0}")]
    Io(#[from] std::io::Error),
    #[error("lease {0} is gone (expired or revoked)")]
    LeaseGone(i64),
}

/// A value and the version it had when read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    pub value: Vec<u8>,
    /// Changes on every write of the key; never 0 for a key that exists.
    pub version: i64,
}

/// What a compare-and-swap expects the key to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    Absent,
    Version(i64),
}

/// A lease: keys put with it vanish when it expires unkept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease(pub i64);

/// Runs `f`, which blocks on the disk (an fsync), off the async worker
/// where the runtime allows it, so that other tasks go on meanwhile: the
/// embedded store's writes, and hostd's records.
pub fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

pub enum Store {
    Embedded(EmbeddedStore),
    // Boxed: the gRPC client is large beside the embedded store.
    Etcd(Box<EtcdStore>),
}

impl Store {
    /// etcd when `endpoints` are given, else the embedded store in `dir`.
    pub async fn open(endpoints: &[String], dir: &std::path::Path) -> Result<Store, StoreError> {
        if endpoints.is_empty() {
            Ok(Store::Embedded(EmbeddedStore::open(dir)?))
        } else {
            Ok(Store::Etcd(Box::new(EtcdStore::connect(endpoints).await?)))
        }
    }

    pub async fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        match self {
            Store::Embedded(s) => Ok(s.get(key)),
            Store::Etcd(s) => s.get(key).await,
        }
    }

    /// Every key under `prefix`, in key order.
    pub async fn list(&self, prefix: &str) -> Result<Vec<(String, Versioned)>, StoreError> {
        match self {
            Store::Embedded(s) => Ok(s.list(prefix)),
            Store::Etcd(s) => s.list(prefix).await,
        }
    }

    pub async fn put(
        &self,
        key: &str,
        value: &[u8],
        lease: Option<Lease>,
    ) -> Result<i64, StoreError> {
        match self {
            Store::Embedded(s) => blocking(|| s.put(key, value, lease)),
            Store::Etcd(s) => s.put(key, value, lease).await,
        }
    }

    /// Writes `value` only if the key is as `expect` says (one etcd
    /// transaction). Returns the new version, or None if it was not.
    pub async fn compare_and_swap(
        &self,
        key: &str,
        expect: Expect,
        value: &[u8],
        lease: Option<Lease>,
    ) -> Result<Option<i64>, StoreError> {
        match self {
            Store::Embedded(s) => blocking(|| s.compare_and_swap(key, expect, value, lease)),
            Store::Etcd(s) => s.compare_and_swap(key, expect, value, lease).await,
        }
    }

    /// Deletes the key if it is as `expect` says; true if it did.
    pub async fn compare_and_delete(&self, key: &str, expect: Expect) -> Result<bool, StoreError> {
        match self {
            Store::Embedded(s) => blocking(|| s.compare_and_delete(key, expect)),
            Store::Etcd(s) => s.compare_and_delete(key, expect).await,
        }
    }

    pub async fn grant_lease(&self, ttl: Duration) -> Result<Lease, StoreError> {
        match self {
            Store::Embedded(s) => blocking(|| Ok(s.grant_lease(ttl))),
            Store::Etcd(s) => s.grant_lease(ttl).await,
        }
    }

    /// Renews the lease for its full TTL; [`StoreError::LeaseGone`] once expired.
    pub async fn keep_alive(&self, lease: Lease) -> Result<(), StoreError> {
        match self {
            Store::Embedded(s) => s.keep_alive(lease),
            Store::Etcd(s) => s.keep_alive(lease).await,
        }
    }

    /// Ends the lease now; its keys go with it.
    pub async fn revoke(&self, lease: Lease) -> Result<(), StoreError> {
        match self {
            Store::Embedded(s) => blocking(|| s.revoke(lease)),
            Store::Etcd(s) => s.revoke(lease).await,
        }
    }
}
