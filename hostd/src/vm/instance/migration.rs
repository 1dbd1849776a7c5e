//! The VMM's side of a live migration: the source's send, switch-over
//! and cancel, the destination's adoption of the VM, and the states hostd
//! polls.

use std::path::PathBuf;
use std::time::Duration;

use ember_vmm_api::{
    BlockDeviceUpdate, DriveOverride, SendMigrationParams, SwitchOver, SwitchOverParams,
};

use super::{as_json, vm_paths, Instance, InstanceError};

impl Instance {
    /// Host path of the socket a receiving VMM listens on.
    pub fn migration_in_socket(&self) -> PathBuf {
        self.host(vm_paths::MIGRATE_IN)
    }

    /// Listens where this (source) VMM will send its migration stream,
    /// reachable by the jailed VMM's uid.
    pub fn migration_out_listener(&self) -> std::io::Result<tokio::net::UnixListener> {
        self.listen_for_vmm(vm_paths::MIGRATE_OUT)
    }

    /// `PUT /migrate/send` to the socket of [`Instance::migration_out_listener`].
    /// With `manual`, the source waits paused after the last page for
    /// [`Instance::switch_over`].
    pub async fn send_migration(
        &self,
        downtime_ms: u64,
        manual: bool,
    ) -> Result<(), InstanceError> {
        let uri = format!("unix://{}", self.vm_str(vm_paths::MIGRATE_OUT)?);
        let params = SendMigrationParams {
            downtime_ms,
            switch_over: if manual {
                SwitchOver::Manual
            } else {
                SwitchOver::Auto
            },
            ..SendMigrationParams::new(uri)
        };
        self.client().migrate(&params).await?;
        Ok(())
    }

    /// `PUT /migrate/switch-over`: the destination opens `drive_id` at
    /// `uri` and resumes.
    pub async fn switch_over(&self, drive_id: &str, uri: &str) -> Result<(), InstanceError> {
        let params = SwitchOverParams {
            drive_overrides: vec![DriveOverride {
                drive_id: drive_id.into(),
                path_on_host: uri.into(),
            }],
        };
        self.client().switch_over(&params).await?;
        Ok(())
    }

    /// `PATCH /drives/{id}` to another NBD URI (a volume moved back here).
    pub async fn reopen_nbd(&self, drive_id: &str, uri: &str) -> Result<(), InstanceError> {
        let update = BlockDeviceUpdate {
            drive_id: drive_id.into(),
            nbd_uri: Some(uri.into()),
            ..BlockDeviceUpdate::default()
        };
        self.client().patch_drive(&update).await?;
        Ok(())
    }

    /// `PUT /migrate/cancel` (a migration past its switch-over refuses).
    pub async fn cancel_migration(&self) -> Result<(), InstanceError> {
        self.client().cancel_migration().await?;
        Ok(())
    }

    /// The VMM's `GET /migrate`, as JSON (how hostd's migration code reads
    /// it).
    pub async fn migration_status(&self) -> Result<serde_json::Value, InstanceError> {
        let status = self.client().migration_status().await?;
        as_json(&status)
    }

    /// `GET /drives/tmp/fill` of a VM whose /tmp disk is filling, as JSON
    /// (how hostd's migration code reads it).
    pub async fn tmp_fill_status(&self) -> Result<serde_json::Value, InstanceError> {
        let status = self
            .client()
            .drive_fill_status(crate::ephemeral::DRIVE_ID)
            .await?;
        as_json(&status)
    }

    /// After a migration here: connects to the agent and refreshes the
    /// guest's entropy and clock, as after a restore.
    pub async fn adopt_migrated(&self) -> Result<(), InstanceError> {
        self.connect_agent(Duration::from_secs(30)).await?;
        self.with_agent(|a| a.refresh()).await??;
        Ok(())
    }
}
