//! Carries out API actions on the VMM thread. Before boot, actions edit the
//! VM's resources; after InstanceStart only runtime actions are accepted.

use crate::builder::{self, EventMgr};
use crate::devices::legacy::serial::SerialOut;
use crate::devices::virtio::net::Tap;
use crate::metrics::METRICS;
use crate::rpc_interface::{InstanceInfo, VmmAction, VmmActionError, VmmData, VmmResponse};
use crate::vmm::{SnapshotError, VmState, Vmm};
use crate::vmm_config::net::parse_mac;
use crate::vmm_config::VmResources;
use crate::vmm_config::{BlockDeviceUpdate, LoadSnapshotParams, NetworkInterfaceUpdate};
use crate::vstate::vcpu::VmExitNotifier;

/// Opens the serial console's output when the VM is built.
pub type SerialOutFactory = Box<dyn FnMut() -> std::io::Result<SerialOut> + Send>;

pub struct Controller {
    id: String,
    resources: VmResources,
    vmm: Option<Vmm>,
    exit: VmExitNotifier,
    serial_out: SerialOutFactory,
}

fn not_allowed(what: &str) -> VmmActionError {
    VmmActionError::NotAllowed(format!(
        "{what} is not allowed after the microVM has started"
    ))
}

impl Controller {
    pub fn new(
        id: String,
        resources: VmResources,
        exit: VmExitNotifier,
        serial_out: SerialOutFactory,
    ) -> Self {
        Controller {
            id,
            resources,
            vmm: None,
            exit,
            serial_out,
        }
    }

    pub fn vmm(&self) -> Option<&Vmm> {
        self.vmm.as_ref()
    }

    pub fn instance_info(&self) -> InstanceInfo {
        InstanceInfo {
            id: self.id.clone(),
            state: match self.vmm.as_ref().map(Vmm::state) {
                None => "Not started",
                Some(VmState::Running) => "Running",
                Some(VmState::Paused) => "Paused",
            }
            .to_string(),
            vmm_version: env!("CARGO_PKG_VERSION").to_string(),
            app_name: "ember".to_string(),
        }
    }

    pub fn handle(&mut self, action: VmmAction, em: &mut EventMgr) -> VmmResponse {
        METRICS.api.actions.inc();
        let r = self.dispatch(action, em);
        if r.is_err() {
            METRICS.api.action_errors.inc();
        }
        r
    }

    fn dispatch(&mut self, action: VmmAction, em: &mut EventMgr) -> VmmResponse {
        use VmmAction::*;
        match action {
            GetInstanceInfo => Ok(VmmData::InstanceInfo(self.instance_info())),
            GetMachineConfig => Ok(VmmData::MachineConfig(
                self.resources.machine_config.clone(),
            )),
            GetVmConfig => serde_json::to_value(&self.resources)
                .map(VmmData::Json)
                .map_err(|e| VmmActionError::Internal(e.to_string())),
            InstanceStart => self.start(em),
            FlushMetrics => crate::metrics::flush()
                .map(|_| VmmData::Empty)
                .map_err(|e| VmmActionError::Internal(format!("cannot write metrics: {e}"))),
            PutMetrics(m) => crate::metrics::set_sink(&m.metrics_path)
                .map(|_| VmmData::Empty)
                .map_err(|e| {
                    VmmActionError::InvalidInput(format!("metrics_path {}: {e}", m.metrics_path))
                }),
            SendCtrlAltDel => match &self.vmm {
                Some(vmm) => {
                    vmm.send_ctrl_alt_del();
                    Ok(VmmData::Empty)
                }
                None => Err(VmmActionError::NotAllowed(
                    "SendCtrlAltDel needs a started microVM".into(),
                )),
            },
            CreateSnapshot(params) => {
                let vmm = self.vmm.as_ref().ok_or_else(|| {
                    VmmActionError::NotAllowed("the microVM is not started".into())
                })?;
                vmm.create_snapshot(&params)
                    .map(|_| VmmData::Empty)
                    .map_err(|e| match e {
                        SnapshotError::NotPaused | SnapshotError::Unsupported(_) => {
                            VmmActionError::NotAllowed(e.to_string())
                        }
                        _ => VmmActionError::InvalidInput(format!("cannot create snapshot: {e}")),
                    })
            }
            LoadSnapshot(params) => self.load_snapshot(&params, em),
            PatchNetworkInterface(update) => self.patch_net(&update),
            PatchDrive(update) => self.patch_drive(&update),
            Pause => self.set_paused(true),
            Resume => self.set_paused(false),
            other => self.configure(other),
        }
    }

    fn set_paused(&mut self, paused: bool) -> VmmResponse {
        let vmm = self
            .vmm
            .as_mut()
            .ok_or_else(|| VmmActionError::NotAllowed("the microVM is not started".into()))?;
        let r = if paused { vmm.pause() } else { vmm.resume() };
        r.map(|_| VmmData::Empty)
            .map_err(|e| VmmActionError::Internal(e.to_string()))
    }

    /// New rate limiters: on the device of a started VM, else in the
    /// pre-boot configuration.
    fn patch_net(&mut self, update: &NetworkInterfaceUpdate) -> VmmResponse {
        crate::vmm_config::net::validate_limiters(&update.rx_rate_limiter, &update.tx_rate_limiter)
            .map_err(VmmActionError::InvalidInput)?;
        if let Some(vmm) = self.vmm.as_mut() {
            vmm.update_net_rate_limiters(update)
                .map_err(VmmActionError::InvalidInput)?;
            self.resources = vmm.resources().clone();
            return Ok(VmmData::Empty);
        }
        let cfg = self
            .resources
            .network_interfaces
            .iter_mut()
            .find(|n| n.iface_id == update.iface_id)
            .ok_or_else(|| {
                VmmActionError::InvalidInput(format!("no network interface {:?}", update.iface_id))
            })?;
        update.apply_to(cfg);
        Ok(VmmData::Empty)
    }

    /// A drive's backend, size or limits: on the device of a started VM,
    /// else in the pre-boot configuration.
    fn patch_drive(&mut self, update: &BlockDeviceUpdate) -> VmmResponse {
        update.validate().map_err(VmmActionError::InvalidInput)?;
        if let Some(vmm) = self.vmm.as_mut() {
            vmm.update_drive(update)
                .map_err(VmmActionError::InvalidInput)?;
            self.resources = vmm.resources().clone();
            return Ok(VmmData::Empty);
        }
        let cfg = self
            .resources
            .drives
            .iter_mut()
            .find(|d| d.drive_id == update.drive_id)
            .ok_or_else(|| {
                VmmActionError::InvalidInput(format!("no drive {:?}", update.drive_id))
            })?;
        let mut new = cfg.clone();
        update.apply_to(&mut new);
        new.validate().map_err(VmmActionError::InvalidInput)?;
        *cfg = new;
        Ok(VmmData::Empty)
    }

    /// Pre-boot configuration.
    fn configure(&mut self, action: VmmAction) -> VmmResponse {
        use VmmAction::*;
        if self.vmm.is_some() {
            return Err(not_allowed(&format!("{action:?}")));
        }
        let r = &mut self.resources;
        match action {
            PutBootSource(b) => {
                if !std::path::Path::new(&b.kernel_image_path).is_file() {
                    return Err(VmmActionError::InvalidInput(format!(
                        "kernel_image_path {} is not a readable file",
                        b.kernel_image_path
                    )));
                }
                r.boot_source = Some(b);
            }
            PutMachineConfig(mc) => {
                mc.validate().map_err(VmmActionError::InvalidInput)?;
                r.machine_config = mc;
            }
            PatchMachineConfig(update) => {
                let mc = update.apply_to(&r.machine_config);
                mc.validate().map_err(VmmActionError::InvalidInput)?;
                r.machine_config = mc;
            }
            PutDrive(d) => {
                d.validate().map_err(VmmActionError::InvalidInput)?;
                if let Some(sock) = &d.socket {
                    check_vhost_user_socket(&d.drive_id, &d.path_on_host, sock)?;
                }
                if d.nbd_uri.is_some() {
                    // Catch unreachable or non-NBD servers now, as a 400,
                    // rather than at InstanceStart.
                    crate::devices::virtio::block::Block::probe(&d)
                        .map_err(|e| VmmActionError::InvalidInput(e.to_string()))?;
                }
                if d.is_root_device
                    && r.drives
                        .iter()
                        .any(|o| o.is_root_device && o.drive_id != d.drive_id)
                {
                    return Err(VmmActionError::InvalidInput(
                        "a root device is already configured".into(),
                    ));
                }
                match r.drives.iter_mut().find(|o| o.drive_id == d.drive_id) {
                    Some(o) => *o = d,
                    None => r.drives.push(d),
                }
            }
            PutNetworkInterface(n) => {
                let mac = n.validate().map_err(VmmActionError::InvalidInput)?;
                for other in r
                    .network_interfaces
                    .iter()
                    .filter(|o| o.iface_id != n.iface_id)
                {
                    if other.host_dev_name == n.host_dev_name {
                        return Err(VmmActionError::InvalidInput(format!(
                            "network interface {}: host_dev_name {} is already used by {}",
                            n.iface_id, n.host_dev_name, other.iface_id
                        )));
                    }
                    let other_mac = other.guest_mac.as_deref().and_then(|m| parse_mac(m).ok());
                    if mac.is_some() && other_mac == mac {
                        return Err(VmmActionError::InvalidInput(format!(
                            "network interface {}: guest_mac {} is already used by {}",
                            n.iface_id,
                            n.guest_mac.as_deref().unwrap_or_default(),
                            other.iface_id
                        )));
                    }
                }
                // Open the tap now, so a missing or unusable one is reported
                // here rather than at InstanceStart.
                Tap::open(&n.host_dev_name).map_err(|e| {
                    VmmActionError::InvalidInput(format!("network interface {}: {e}", n.iface_id))
                })?;
                match r
                    .network_interfaces
                    .iter_mut()
                    .find(|o| o.iface_id == n.iface_id)
                {
                    Some(o) => *o = n,
                    None => r.network_interfaces.push(n),
                }
            }
            PutVsock(v) => {
                if v.guest_cid < 3 {
                    return Err(VmmActionError::InvalidInput(format!(
                        "guest_cid must be 3 or more (0-2 are reserved), got {}",
                        v.guest_cid
                    )));
                }
                r.vsock = Some(v);
            }
            other => {
                return Err(VmmActionError::InvalidInput(format!(
                    "unsupported action {other:?}"
                )))
            }
        }
        Ok(VmmData::Empty)
    }

    /// Restores a snapshot into this (still unconfigured) VMM.
    fn load_snapshot(&mut self, params: &LoadSnapshotParams, em: &mut EventMgr) -> VmmResponse {
        if self.vmm.is_some() || self.resources != VmResources::default() {
            return Err(VmmActionError::NotAllowed(
                "snapshot load is only allowed before any other configuration".into(),
            ));
        }
        let out: SerialOut = match &params.serial_out_path {
            Some(p) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_err(|e| {
                        VmmActionError::InvalidInput(format!("serial_out_path {p}: {e}"))
                    })?,
            ),
            None => (self.serial_out)()
                .map_err(|e| VmmActionError::InvalidInput(format!("serial output: {e}")))?,
        };
        let vmm = builder::restore_from_snapshot(params, em, self.exit.clone(), out).map_err(
            |e| match e {
                builder::RestoreError::Start(builder::StartError::Vm(_))
                | builder::RestoreError::Start(builder::StartError::Vcpu(_)) => {
                    VmmActionError::Internal(format!("cannot load snapshot: {e}"))
                }
                _ => VmmActionError::InvalidInput(format!("cannot load snapshot: {e}")),
            },
        )?;
        self.resources = vmm.resources().clone();
        self.vmm = Some(vmm);
        Ok(VmmData::Empty)
    }

    fn start(&mut self, em: &mut EventMgr) -> VmmResponse {
        if self.vmm.is_some() {
            return Err(VmmActionError::NotAllowed(
                "the microVM is already started".into(),
            ));
        }
        let out = (self.serial_out)()
            .map_err(|e| VmmActionError::InvalidInput(format!("serial output: {e}")))?;
        let vmm =
            builder::build_and_boot(&self.resources, em, self.exit.clone(), out).map_err(|e| {
                match e {
                    builder::StartError::Vm(_)
                    | builder::StartError::Vcpu(_)
                    | builder::StartError::EventLoop(_) => {
                        VmmActionError::Internal(format!("cannot start microVM: {e}"))
                    }
                    _ => VmmActionError::InvalidInput(format!("cannot start microVM: {e}")),
                }
            })?;
        self.vmm = Some(vmm);
        Ok(VmmData::Empty)
    }
}

/// A vhost-user drive names an existing unix socket and no file.
fn check_vhost_user_socket(drive_id: &str, path: &str, socket: &str) -> Result<(), VmmActionError> {
    use std::os::unix::fs::FileTypeExt;
    let bad = |why: String| {
        Err(VmmActionError::InvalidInput(format!(
            "drive {drive_id}: {why}"
        )))
    };
    if !path.is_empty() {
        return bad("path_on_host and socket are mutually exclusive".into());
    }
    match std::fs::metadata(socket) {
        Ok(m) if m.file_type().is_socket() => Ok(()),
        Ok(_) => bad(format!("socket {socket} is not a unix socket")),
        Err(e) => bad(format!("socket {socket}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm_config::{BootSourceConfig, MachineConfig, VsockConfig};

    fn controller() -> (Controller, EventMgr) {
        let exit = VmExitNotifier::new().unwrap();
        let c = Controller::new(
            "t".into(),
            VmResources::default(),
            exit,
            Box::new(|| Ok(Box::new(std::io::sink()) as SerialOut)),
        );
        (c, EventMgr::new().unwrap())
    }

    #[test]
    fn preboot_validation() {
        let (mut c, mut em) = controller();
        let bad = VmmAction::PutBootSource(BootSourceConfig {
            kernel_image_path: "/nonexistent/vmlinux".into(),
            initrd_path: None,
            boot_args: None,
        });
        assert!(
            matches!(c.handle(bad, &mut em), Err(VmmActionError::InvalidInput(m)) if m.contains("/nonexistent/vmlinux"))
        );
        let mc = MachineConfig {
            vcpu_count: 0,
            ..Default::default()
        };
        assert!(c.handle(VmmAction::PutMachineConfig(mc), &mut em).is_err());
        let vs = VsockConfig {
            vsock_id: None,
            guest_cid: 2,
            uds_path: "/tmp/x".into(),
        };
        assert!(c.handle(VmmAction::PutVsock(vs), &mut em).is_err());
        // Starting without a boot source is refused and changes nothing.
        assert!(matches!(
            c.handle(VmmAction::InstanceStart, &mut em),
            Err(VmmActionError::InvalidInput(m)) if m.contains("boot source")
        ));
        assert_eq!(c.instance_info().state, "Not started");
        assert!(matches!(
            c.handle(VmmAction::SendCtrlAltDel, &mut em),
            Err(VmmActionError::NotAllowed(_))
        ));
    }

    fn net(id: &str, tap: &str, mac: Option<&str>) -> VmmAction {
        VmmAction::PutNetworkInterface(crate::vmm_config::NetworkInterfaceConfig {
            iface_id: id.into(),
            host_dev_name: tap.into(),
            guest_mac: mac.map(String::from),
            rx_rate_limiter: None,
            tx_rate_limiter: None,
            terminate_connections_on_pause: false,
        })
    }

    #[test]
    fn network_interface_errors_leave_the_vmm_usable() {
        let (mut c, mut em) = controller();
        let e = c
            .handle(net("eth0", "embernosuch0", None), &mut em)
            .unwrap_err();
        assert!(e.to_string().contains("no network interface named"), "{e}");
        assert_eq!(e.http_status(), 400);
        let e = c.handle(net("eth0", "lo", None), &mut em).unwrap_err();
        assert_eq!(e.http_status(), 400, "{e}");
        let e = c
            .handle(net("eth0", "tap0", Some("zz:00:00:00:00:00")), &mut em)
            .unwrap_err();
        assert!(e.to_string().contains("invalid MAC"), "{e}");
        let upd = crate::vmm_config::NetworkInterfaceUpdate {
            iface_id: "eth9".into(),
            rx_rate_limiter: None,
            tx_rate_limiter: None,
            terminate_connections_on_pause: None,
        };
        let e = c
            .handle(VmmAction::PatchNetworkInterface(upd), &mut em)
            .unwrap_err();
        assert!(e.to_string().contains("no network interface"), "{e}");
        assert!(c.resources.network_interfaces.is_empty());
        assert!(c.handle(VmmAction::GetVmConfig, &mut em).is_ok());
    }

    #[test]
    fn network_interfaces_with_real_taps() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 || !std::path::Path::new("/dev/net/tun").exists() {
            return;
        }
        std::thread::spawn(|| {
            // SAFETY: unshare only changes this thread's namespaces.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0);
            for t in ["tapc0", "tapc1"] {
                let ok = std::process::Command::new("ip")
                    .args(["tuntap", "add", "dev", t, "mode", "tap"])
                    .status()
                    .unwrap()
                    .success();
                assert!(ok);
            }
            let (mut c, mut em) = controller();
            let mac = Some("06:00:00:00:00:01");
            c.handle(net("eth0", "tapc0", mac), &mut em).unwrap();
            // Same id again: replaced (PUT is idempotent before boot).
            c.handle(net("eth0", "tapc0", mac), &mut em).unwrap();
            let e = c.handle(net("eth1", "tapc0", None), &mut em).unwrap_err();
            assert!(e.to_string().contains("already used by eth0"), "{e}");
            let e = c
                .handle(net("eth1", "tapc1", Some("06:00:00:00:00:01")), &mut em)
                .unwrap_err();
            assert!(e.to_string().contains("guest_mac"), "{e}");
            c.handle(net("eth1", "tapc1", None), &mut em).unwrap();
            assert_eq!(c.resources.network_interfaces.len(), 2);
            let rl = crate::rate_limiter::RateLimiterConfig {
                bandwidth: None,
                ops: Some(crate::rate_limiter::TokenBucketConfig {
                    size: 5,
                    one_time_burst: None,
                    refill_time: 10,
                }),
            };
            let upd = crate::vmm_config::NetworkInterfaceUpdate {
                iface_id: "eth1".into(),
                rx_rate_limiter: Some(rl),
                tx_rate_limiter: None,
                terminate_connections_on_pause: Some(true),
            };
            c.handle(VmmAction::PatchNetworkInterface(upd), &mut em)
                .unwrap();
            assert_eq!(c.resources.network_interfaces[1].rx_rate_limiter, Some(rl));
            assert!(c.resources.network_interfaces[1].terminate_connections_on_pause);
        })
        .join()
        .unwrap();
    }
}
