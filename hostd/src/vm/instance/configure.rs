//! The VMM request sequences that make a VM: a fresh boot, a clone's
//! restore from a snapshot, a migration's receiving end; and the snapshot
//! of a booted VM. Each build runs under one [`HalfBuilt`] guard, which
//! destroys what it made if a step fails.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ember_agent::ClientError;
use ember_vmm_api::{
    BlockDeviceConfig, BootSourceConfig, CreateSnapshotParams, DriveOverride, FillFrom,
    FillOverride, LoadSnapshotParams, MachineConfig, MemBackend, MemBackendType,
    NetworkInterfaceConfig, ReceiveMigrationParams, SnapshotType, VsockConfig, VsockOverride,
    WorkingSetLoad,
};

use super::half_built::HalfBuilt;
use super::{vm_paths, wire_path, Instance, InstanceError, LaunchConfig, VmFiles};
use crate::net::NetRequest;

impl Instance {
    /// Boots a fresh VM from `files` and waits for its agent's hello.
    /// The VMM may write into `out` (seen as `/out`), for a snapshot.
    /// With `volume_bytes`, the VM gets a read-write drive of that size
    /// for a volume, on a sparse placeholder in `out`: restores open the
    /// volume in its place (see [`Instance::restore`]).
    #[allow(clippy::too_many_arguments)]
    pub async fn boot(
        cfg: &LaunchConfig,
        files: &VmFiles,
        mem_mib: u32,
        vcpus: u32,
        out: &Path,
        net: Option<&NetRequest>,
        volume_bytes: Option<u64>,
        tmp_mib: Option<u32>,
    ) -> Result<Instance, InstanceError> {
        HalfBuilt::build(async |half| {
            let inputs = [
                (vm_paths::KERNEL, files.kernel.as_path()),
                (vm_paths::ROOTFS, files.rootfs.as_path()),
                (vm_paths::CODE, files.code.as_path()),
            ];
            let inst = half
                .spawn(cfg, &inputs, Some(out), mem_mib, vcpus, net)
                .await?;
            let placeholder = volume_bytes
                .map(|size| {
                    inst.make_out_file(out, vm_paths::VOLUME_PLACEHOLDER, |f| f.set_len(size))
                })
                .transpose()?;
            let tmp_disk = tmp_mib
                .map(|mib| {
                    inst.make_out_file(out, vm_paths::TMP_DISK, |f| {
                        crate::ephemeral::format_image(f, mib)
                    })
                })
                .transpose()?;
            // The VMM writes its snapshot there: the directory becomes its
            // uid's (0700) for the build.
            inst.give_disks(out)?;
            inst.configure_and_start(cfg, files, mem_mib, vcpus, tmp_disk, placeholder)
                .await
        })
        .await
    }

    async fn configure_and_start(
        &self,
        cfg: &LaunchConfig,
        files: &VmFiles,
        mem_mib: u32,
        vcpus: u32,
        tmp_disk: Option<PathBuf>,
        volume_placeholder: Option<PathBuf>,
    ) -> Result<(), InstanceError> {
        let api = self.client();
        api.put_boot_source(&BootSourceConfig {
            boot_args: cfg.boot_args.clone(),
            ..BootSourceConfig::new(self.input_str(vm_paths::KERNEL, &files.kernel)?)
        })
        .await?;
        let vcpu_count = u8::try_from(vcpus)
            .map_err(|_| InstanceError::Config(format!("{vcpus} vCPUs is too many")))?;
        api.put_machine_config(&MachineConfig::new(vcpu_count, mem_mib as usize))
            .await?;
        let rootfs = self.input_str(vm_paths::ROOTFS, &files.rootfs)?;
        api.put_drive(&BlockDeviceConfig {
            is_root_device: true,
            is_read_only: true,
            ..BlockDeviceConfig::file("rootfs", rootfs)
        })
        .await?;
        let code = self.input_str(vm_paths::CODE, &files.code)?;
        api.put_drive(&BlockDeviceConfig {
            is_read_only: true,
            ..BlockDeviceConfig::file("code", code)
        })
        .await?;
        // Drive order is guest device order: /tmp's disk, then a volume.
        if let Some(p) = tmp_disk {
            let drive = BlockDeviceConfig::file(crate::ephemeral::DRIVE_ID, wire_path(&p)?);
            api.put_drive(&drive).await?;
        }
        if let Some(p) = volume_placeholder {
            let drive = BlockDeviceConfig::file(crate::volumes::DRIVE_ID, wire_path(&p)?);
            api.put_drive(&drive).await?;
        }
        let iface = self
            .net
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|(m, n)| NetworkInterfaceConfig {
                guest_mac: Some(n.logical.mac()),
                terminate_connections_on_pause: m.config().terminate_connections,
                ..NetworkInterfaceConfig::tap(crate::net::GUEST_IFACE, crate::net::TAP_NAME)
            });
        if let Some(iface) = iface {
            api.put_network_interface(&iface).await?;
        }
        api.put_vsock(&VsockConfig {
            vsock_id: None,
            guest_cid: 3,
            uds_path: self.vm_str(vm_paths::VSOCK)?,
        })
        .await?;
        // The hello arrives on <uds>_53; listen before the guest starts.
        let listener = ember_agent::bind_ready_listener(self.vsock_path())?;
        // The jailed VMM (another uid) must be able to connect.
        self.give_to_vmm(&ember_agent::host_port_socket_path(self.vsock_path(), 53))?;
        api.start().await?;
        let timeout = cfg.boot_timeout;
        let hello =
            tokio::task::spawn_blocking(move || ember_agent::wait_ready(&listener, timeout));
        self.unless_exited(async {
            match hello.await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(ClientError::Timeout(t))) => Err(InstanceError::BootTimeout(t)),
                Ok(Err(e)) => Err(e.into()),
                Err(e) => Err(InstanceError::Spawn(format!("hello waiter: {e}"))),
            }
        })
        .await?;
        self.connect_agent(Duration::from_secs(30)).await
    }

    /// Restores a clone from the snapshot in `snapshot_dir` (running) and
    /// connects to its agent, refreshing its entropy and clock.
    /// With `volume`, the snapshot's volume drive opens that attachment
    /// (through [`Instance::start_nbd_path`]).
    #[allow(clippy::too_many_arguments)]
    pub async fn restore(
        cfg: &LaunchConfig,
        files: &VmFiles,
        snapshot_dir: &Path,
        mem_mib: u32,
        vcpus: u32,
        net: Option<&NetRequest>,
        volume: Option<&crate::volumes::Grant>,
        tmp_golden: Option<&Path>,
    ) -> Result<Instance, InstanceError> {
        HalfBuilt::build(async |half| {
            let snap = snapshot_dir.join("vm.snap");
            // The clone's own /tmp disk: a copy of the snapshot's.
            let disk_dir = match tmp_golden {
                None => None,
                Some(golden) => {
                    let dir = half.new_disk_dir(cfg)?;
                    crate::ephemeral::copy_image(golden, &dir)?;
                    Some(dir.path().to_path_buf())
                }
            };
            let mem = snapshot_dir.join("mem");
            let ws = match cfg.working_sets {
                true => super::working_set::saved(snapshot_dir),
                false => None,
            };
            let mut inputs = vec![
                (vm_paths::SNAPSHOT, snap.as_path()),
                (vm_paths::MEM, mem.as_path()),
                (vm_paths::ROOTFS, files.rootfs.as_path()),
                (vm_paths::CODE, files.code.as_path()),
            ];
            if let Some(ws) = &ws {
                inputs.push((vm_paths::WORKING_SET, ws.as_path()));
            }
            let inst = half
                .spawn(cfg, &inputs, disk_dir.as_deref(), mem_mib, vcpus, net)
                .await?;
            let mut load = inst.load_params(&snap, &mem, disk_dir.as_deref(), volume)?;
            let t = Instant::now();
            if let Some(ws) = &ws {
                load.working_set = Some(WorkingSetLoad {
                    record: false,
                    prefetch_path: Some(inst.input_str(vm_paths::WORKING_SET, ws)?),
                });
                // A set the VMM refuses (corrupt, of another snapshot) is
                // dropped, to be recorded again; the load goes on without.
                if let Err(e) = inst.client().load_snapshot(&load).await {
                    log::warn!("{}: dropping working set {}: {e}", inst.id, ws.display());
                    let _ = std::fs::remove_file(ws);
                    load.working_set = None;
                }
            }
            if load.working_set.is_none() {
                inst.client().load_snapshot(&load).await?;
            }
            let _ = inst.restored_from.set(snapshot_dir.to_path_buf());
            let loaded = t.elapsed();
            inst.connect_agent(Duration::from_secs(30)).await?;
            let connected = t.elapsed();
            inst.with_agent(|a| a.refresh()).await??;
            log::debug!(
                "restored {}: VMM ready {:?}, loaded +{loaded:?}, agent +{connected:?}, refreshed +{:?}",
                inst.id,
                t.duration_since(inst.started),
                t.elapsed()
            );
            Ok(())
        })
        .await
    }

    /// Starts a VMM that waits, on [`Instance::migration_in_socket`], for
    /// a migration stream of a VM made of `files` (bound where the source
    /// had them in its jail; passed as overrides when unjailed).
    /// With `volume`, hostd's NBD path to the volume service is ready in
    /// the jail for the drive override the switch-over brings.
    pub async fn receive(
        cfg: &LaunchConfig,
        files: &VmFiles,
        mem_mib: u32,
        vcpus: u32,
        net: Option<&NetRequest>,
        volume: Option<&crate::volumes::Grant>,
        fill_tmp_from: Option<crate::migrate::stream::PeerTarget>,
    ) -> Result<Instance, InstanceError> {
        HalfBuilt::build(async |half| {
            let inputs = [
                (vm_paths::ROOTFS, files.rootfs.as_path()),
                (vm_paths::CODE, files.code.as_path()),
            ];
            // A /tmp disk arriving: an empty file the VMM fills from the
            // source (it makes the file there as it fills it).
            let disk_dir = match fill_tmp_from {
                Some(_) => Some(half.new_disk_dir(cfg)?.path().to_path_buf()),
                None => None,
            };
            let inst = half
                .spawn(cfg, &inputs, disk_dir.as_deref(), mem_mib, vcpus, net)
                .await?;
            let mut params = ReceiveMigrationParams::new(format!(
                "unix://{}",
                inst.vm_str(vm_paths::MIGRATE_IN)?
            ));
            params.serial_out_path = Some(inst.vm_str(vm_paths::SERIAL)?);
            if !inst.jailed {
                params.vsock_override = Some(VsockOverride {
                    uds_path: inst.vm_str(vm_paths::VSOCK)?,
                });
                for (drive_id, path) in [("rootfs", &files.rootfs), ("code", &files.code)] {
                    params.drive_overrides.push(DriveOverride {
                        drive_id: drive_id.into(),
                        path_on_host: wire_path(path)?,
                    });
                }
            }
            if let Some(g) = volume {
                inst.start_nbd_path(g)?;
            }
            if let (Some(t), Some(dir)) = (fill_tmp_from, &disk_dir) {
                let sock = inst.start_peer_forwarder(vm_paths::FILL, t)?;
                params.fill_overrides.push(FillOverride {
                    drive_id: crate::ephemeral::DRIVE_ID.into(),
                    fill_from: FillFrom::nbd(format!(
                        "nbd+unix:///disk?socket={}",
                        wire_path(&sock)?
                    )),
                });
                if !inst.jailed {
                    params.drive_overrides.push(DriveOverride {
                        drive_id: crate::ephemeral::DRIVE_ID.into(),
                        path_on_host: wire_path(&dir.join(crate::ephemeral::FILE))?,
                    });
                }
            }
            inst.client().receive_migration(&params).await?;
            Ok(())
        })
        .await
    }

    /// `PUT /snapshot/load` of a clone: its memory, its own vsock socket
    /// and /tmp disk (unjailed; in a jail the paths saved are already the
    /// clone's), and the volume's attachment through hostd's NBD path.
    fn load_params(
        &self,
        snap: &Path,
        mem: &Path,
        disk_dir: Option<&Path>,
        volume: Option<&crate::volumes::Grant>,
    ) -> Result<LoadSnapshotParams, InstanceError> {
        let backend = MemBackend {
            backend_type: MemBackendType::File,
            backend_path: self.input_str(vm_paths::MEM, mem)?,
        };
        let mut load = LoadSnapshotParams::new(self.input_str(vm_paths::SNAPSHOT, snap)?, backend);
        load.resume_vm = true;
        load.serial_out_path = Some(self.vm_str(vm_paths::SERIAL)?);
        if !self.jailed {
            // Every clone's vsock socket must differ; in a jail the path
            // recorded in the snapshot is already private to the clone.
            load.vsock_override = Some(VsockOverride {
                uds_path: self.vm_str(vm_paths::VSOCK)?,
            });
        }
        if let (Some(d), false) = (disk_dir, self.jailed) {
            load.drive_overrides.push(DriveOverride {
                drive_id: crate::ephemeral::DRIVE_ID.into(),
                path_on_host: wire_path(&d.join(crate::ephemeral::FILE))?,
            });
        }
        if let Some(g) = volume {
            let sock = self.start_nbd_path(g)?;
            load.drive_overrides.push(DriveOverride {
                drive_id: crate::volumes::DRIVE_ID.into(),
                path_on_host: g.uri_via(&sock),
            });
        }
        Ok(load)
    }

    /// Pauses the VM and writes a Full snapshot to `dir` (a host path; for
    /// a jailed VMM it must be the `out` directory given to [`Instance::boot`]).
    pub async fn snapshot(&self, dir: &Path) -> Result<(), InstanceError> {
        let api = self.client();
        api.pause().await?;
        let base = if self.jailed {
            PathBuf::from(vm_paths::OUT)
        } else {
            dir.to_path_buf()
        };
        api.create_snapshot(&CreateSnapshotParams {
            snapshot_type: SnapshotType::Full,
            snapshot_path: wire_path(&base.join("vm.snap"))?,
            mem_file_path: wire_path(&base.join("mem"))?,
        })
        .await?;
        Ok(())
    }
}
