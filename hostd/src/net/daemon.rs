//! The daemon's side of instance networking: which logical network a
//! snapshot is built with (an account's reserved address, or the default),
//! what a clone's network is made from, and the egress policy per function.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::{EgressPolicy, LogicalNet, NetRequest};
use crate::daemon::Daemon;
use crate::model::{FunctionRecord, VersionRecord};
use crate::store::{write_json_atomic, Store};
use ember_lambda::error::ApiError;

pub fn load_reservations(store: &Store) -> std::io::Result<BTreeMap<String, LogicalNet>> {
    match std::fs::read(store.reservations_path()) {
        Ok(b) => serde_json::from_slice(&b).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{}: {e}", store.reservations_path().display()),
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
        Err(e) => Err(e),
    }
}

impl Daemon {
    fn lock_reservations(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, LogicalNet>> {
        self.reservations.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The logical network of `account`'s instances.
    pub fn logical_net(&self, account: &str) -> LogicalNet {
        self.lock_reservations()
            .get(account)
            .copied()
            .unwrap_or_else(LogicalNet::default_net)
    }

    /// The network a new snapshot of `name`'s version `v` is built with.
    pub fn build_network(&self, name: &str, v: &VersionRecord) -> Option<NetRequest> {
        let manager = self.cfg.network.clone()?;
        let egress = self
            .functions
            .get(name)
            .map(|f| f.egress)
            .unwrap_or_default();
        Some(NetRequest {
            manager,
            logical: self.logical_net(&self.cfg.account),
            egress,
            function: name.to_string(),
            version: v.version.clone(),
        })
    }

    /// The network of a clone of `v`: the logical network its snapshot
    /// holds, with the function's egress policy as it is now.
    pub fn clone_network(&self, f: &FunctionRecord, v: &VersionRecord) -> Option<NetRequest> {
        let logical = v.snapshot.as_ref()?.network?;
        let Some(manager) = self.cfg.network.clone() else {
            log::warn!(
                "{}:{} was snapshotted with a network but networking is off; \
                 its restore will fail until the snapshot is rebuilt",
                f.name,
                v.version
            );
            return None;
        };
        Some(NetRequest {
            manager,
            logical,
            egress: f.egress.clone(),
            function: f.name.clone(),
            version: v.version.clone(),
        })
    }

    pub fn reservations(&self) -> BTreeMap<String, LogicalNet> {
        self.lock_reservations().clone()
    }

    /// Reserves `net` for `account`; snapshots built from now on use it.
    pub fn reserve_address(&self, account: &str, net: LogicalNet) -> Result<(), ApiError> {
        if account.is_empty()
            || account.len() > 64
            || !account
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(ApiError::invalid(format!("invalid account {account:?}")));
        }
        if let Some(m) = &self.cfg.network {
            net.validate(m.config().physical_net)
                .map_err(|e| ApiError::invalid(format!("logical address: {e}")))?;
        }
        if net.ip() == LogicalNet::default_net().ip() {
            return Err(ApiError::invalid(format!(
                "{} is the default logical address, shared by every account without a reservation",
                net.ip()
            )));
        }
        self.change_reservations(|r| {
            if let Some((other, _)) = r.iter().find(|(a, n)| *a != account && n.ip() == net.ip()) {
                return Err(ApiError::conflict(format!(
                    "{} is already reserved by account {other}",
                    net.ip()
                )));
            }
            r.insert(account.to_string(), net);
            Ok(())
        })
    }

    pub fn release_address(&self, account: &str) -> Result<(), ApiError> {
        self.change_reservations(|r| {
            r.remove(account).map(|_| ()).ok_or_else(|| {
                ApiError::not_found(format!("account {account} has no reserved logical address"))
            })
        })
    }

    /// Applies `f` to a copy of the reservations, stores it, then replaces
    /// them (readers meanwhile see the old ones, never wait for the disk).
    fn change_reservations(
        &self,
        f: impl FnOnce(&mut BTreeMap<String, LogicalNet>) -> Result<(), ApiError>,
    ) -> Result<(), ApiError> {
        self.functions.write(|| {
            let mut copy = self.lock_reservations().clone();
            f(&mut copy)?;
            self.save_reservations(&copy)?;
            *self.lock_reservations() = copy;
            Ok(())
        })
    }

    fn save_reservations(&self, r: &BTreeMap<String, LogicalNet>) -> Result<(), ApiError> {
        let path = self.store.reservations_path();
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| ApiError::service(format!("{}: {e}", dir.display())))?;
        }
        write_json_atomic(&path, r)
            .map_err(|e| ApiError::service(format!("cannot save reservations: {e}")))
    }

    /// Stores `name`'s egress policy and applies it to its running
    /// instances; returns how many were updated.
    pub async fn set_egress(
        self: &Arc<Daemon>,
        name: &str,
        policy: EgressPolicy,
    ) -> Result<usize, ApiError> {
        policy
            .validate()
            .map_err(|e| ApiError::invalid(e.to_string()))?;
        let p = policy.clone();
        self.functions.modify(name, move |f| {
            f.egress = p;
            Ok(())
        })?;
        let Some(m) = self.cfg.network.clone() else {
            return Ok(0);
        };
        let function = name.to_string();
        tokio::task::spawn_blocking(move || m.apply_egress(&function, &policy))
            .await
            .map_err(|e| ApiError::service(format!("egress update: {e}")))?
            .map_err(|e| ApiError::service(format!("egress update: {e}")))
    }
}
