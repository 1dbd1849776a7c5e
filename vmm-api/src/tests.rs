//! Every shape survives JSON both ways; bodies written from Firecracker's
//! API description (its field names, its optional fields left out) read as
//! expected; unknown fields in a request are refused, as the VMM has
//! always refused them.

use std::fmt::Debug;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::migration::{Phase, Role};
use crate::*;

/// `v` to JSON and back gives `v`, and its JSON is stable (a second trip
/// writes the same text).
fn round_trip<T: Serialize + DeserializeOwned + PartialEq + Debug>(v: &T) {
    let text = serde_json::to_string(v).unwrap();
    let back: T = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text}: {e}"));
    assert_eq!(&back, v, "{text}");
    assert_eq!(serde_json::to_string(&back).unwrap(), text);
}

fn text<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap()
}

fn parse<T: DeserializeOwned>(body: &str) -> T {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{body}: {e}"))
}

/// `body` plus an unknown field is refused, naming it.
fn refuses_unknown<T: DeserializeOwned + Debug>(body: &str) {
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    let mut obj = v.as_object().unwrap().clone();
    obj.insert("not_a_field".into(), 1.into());
    let text = serde_json::Value::Object(obj).to_string();
    let e = serde_json::from_str::<T>(&text).unwrap_err().to_string();
    assert!(e.contains("unknown field `not_a_field`"), "{text}: {e}");
}

fn bucket(size: u64) -> TokenBucketConfig {
    TokenBucketConfig {
        size,
        one_time_burst: Some(size / 2),
        refill_time: 100,
    }
}

fn limiter() -> RateLimiterConfig {
    RateLimiterConfig {
        bandwidth: Some(bucket(1 << 20)),
        ops: Some(bucket(100)),
    }
}

fn full_drive() -> BlockDeviceConfig {
    BlockDeviceConfig {
        drive_id: "data".into(),
        path_on_host: "/d.img".into(),
        is_root_device: false,
        is_read_only: true,
        partuuid: Some("0eaa91a0-01".into()),
        cache_type: Some("Writeback".into()),
        serial: Some("s1".into()),
        nbd_uri: Some("nbd://h:10809/e".into()),
        nbd_timeout_ms: Some(5000),
        socket: Some("/vu.sock".into()),
        rate_limiter: Some(limiter()),
        io_scheduler: Some(IoSchedulerConfig {
            max_outstanding_writes: Some(4),
            max_write_latency_us: Some(2000),
        }),
        fill_from: Some(FillFrom {
            nbd_uri: "nbd+unix:///disk?socket=/f".into(),
            nbd_timeout_ms: Some(1000),
            background_bytes_per_sec: Some(1 << 20),
        }),
    }
}

fn full_iface() -> NetworkInterfaceConfig {
    NetworkInterfaceConfig {
        guest_mac: Some("06:00:ac:10:00:02".into()),
        rx_rate_limiter: Some(limiter()),
        tx_rate_limiter: Some(RateLimiterConfig::default()),
        terminate_connections_on_pause: true,
        ..NetworkInterfaceConfig::tap("eth0", "tap0")
    }
}

fn full_load() -> LoadSnapshotParams {
    LoadSnapshotParams {
        snapshot_path: "/s".into(),
        mem_backend: Some(MemBackend {
            backend_type: MemBackendType::Uffd,
            backend_path: "/uffd.sock".into(),
        }),
        mem_file_path: Some("/m".into()),
        resume_vm: true,
        enable_diff_snapshots: true,
        vsock_override: Some(VsockOverride {
            uds_path: "/v".into(),
        }),
        drive_overrides: vec![DriveOverride {
            drive_id: "rootfs".into(),
            path_on_host: "/r".into(),
        }],
        network_overrides: vec![NetworkOverride {
            iface_id: "eth0".into(),
            host_dev_name: "tap9".into(),
        }],
        vhost_user_overrides: vec![VhostUserOverride {
            drive_id: "data".into(),
            socket: "/vu2".into(),
        }],
        fill_overrides: vec![FillOverride {
            drive_id: "tmp".into(),
            fill_from: FillFrom::nbd("nbd://src:1/disk"),
        }],
        serial_out_path: Some("/serial".into()),
        working_set: Some(WorkingSetLoad {
            record: true,
            prefetch_path: Some("/ws".into()),
        }),
        huge_pages: Some(LoadHugePages::Snapshot),
        memory_backing: Some(MemoryBacking::Memfd),
    }
}

#[test]
fn every_shape_round_trips() {
    round_trip(&BootSourceConfig::new("/k"));
    round_trip(&BootSourceConfig {
        kernel_image_path: "/k".into(),
        initrd_path: Some("/i".into()),
        boot_args: Some("console=ttyS0".into()),
    });
    round_trip(&MachineConfig::default());
    round_trip(&MachineConfig {
        vcpu_count: 4,
        mem_size_mib: 4096,
        smt: true,
        track_dirty_pages: true,
        huge_pages: HugePages::Hugetlbfs2M,
        memory_backing: MemoryBacking::Memfd,
    });
    round_trip(&MachineConfigUpdate::default());
    round_trip(&MachineConfigUpdate {
        vcpu_count: Some(2),
        mem_size_mib: Some(512),
        smt: Some(false),
        track_dirty_pages: Some(true),
        huge_pages: Some(HugePages::Transparent),
        memory_backing: Some(MemoryBacking::Anonymous),
    });
    round_trip(&BlockDeviceConfig {
        is_root_device: true,
        ..BlockDeviceConfig::file("rootfs", "/r")
    });
    round_trip(&full_drive());
    round_trip(&BlockDeviceUpdate {
        drive_id: "vol".into(),
        path_on_host: Some("/p".into()),
        nbd_uri: Some("nbd://h:1/v".into()),
        rate_limiter: Some(limiter()),
        io_scheduler: Some(IoSchedulerConfig::default()),
    });
    round_trip(&FillStatus {
        drive_id: "tmp".into(),
        state: FillPhase::Filling,
        source: "nbd://h:1/d".into(),
        chunk_size: 1 << 20,
        chunks_total: 10,
        chunks_local: 3,
        bytes_on_demand: 5,
        bytes_background: 6,
        requests_waiting: 1,
        error: Some("connection refused".into()),
        elapsed_ms: 7,
    });
    round_trip(&NetworkInterfaceConfig::tap("eth1", "tap1"));
    round_trip(&full_iface());
    round_trip(&NetworkInterfaceUpdate {
        iface_id: "eth0".into(),
        rx_rate_limiter: Some(limiter()),
        tx_rate_limiter: None,
        terminate_connections_on_pause: Some(false),
    });
    round_trip(&VsockConfig {
        vsock_id: Some("v".into()),
        guest_cid: 3,
        uds_path: "/v.sock".into(),
    });
    round_trip(&MetricsConfig {
        metrics_path: "/metrics".into(),
    });
    for snapshot_type in [SnapshotType::Full, SnapshotType::Diff] {
        round_trip(&CreateSnapshotParams {
            snapshot_type,
            snapshot_path: "/s".into(),
            mem_file_path: "/m".into(),
        });
    }
    round_trip(&full_load());
    round_trip(&LoadSnapshotParams::new(
        "/s",
        MemBackend {
            backend_type: MemBackendType::File,
            backend_path: "/m".into(),
        },
    ));
    round_trip(&SendMigrationParams::new("tcp://10.0.0.2:7000"));
    round_trip(&SendMigrationParams {
        destination_uri: "unix:///m.sock".into(),
        downtime_ms: 50,
        max_rounds: 5,
        switch_over: SwitchOver::Manual,
        switch_over_timeout_ms: 1000,
        mode: MigrationMode::PostCopy,
        postcopy_after_rounds: Some(2),
    });
    let mut recv = ReceiveMigrationParams::new("unix:///in");
    round_trip(&recv);
    let load = full_load();
    recv.vsock_override = load.vsock_override;
    recv.drive_overrides = load.drive_overrides;
    recv.network_overrides = load.network_overrides;
    recv.vhost_user_overrides = load.vhost_user_overrides;
    recv.fill_overrides = load.fill_overrides;
    recv.serial_out_path = load.serial_out_path;
    round_trip(&recv);
    round_trip(&SwitchOverParams::default());
    round_trip(&SwitchOverParams {
        drive_overrides: vec![DriveOverride {
            drive_id: "vol".into(),
            path_on_host: "nbd://h:1/v@2".into(),
        }],
    });
    round_trip(&MigrationStatus::default());
    round_trip(&MigrationStatus {
        role: Role::Destination,
        state: Phase::PostCopy,
        peer: Some("unix:///in".into()),
        memory_bytes: 1 << 30,
        rounds: 3,
        bytes: 1 << 29,
        pages: 1 << 17,
        last_dirty_pages: 12,
        bandwidth_mib_s: 812.25,
        final_pages: 12,
        mode: MigrationMode::PostCopy,
        postcopy_pages_on_demand: 3,
        postcopy_pages_pushed: 9,
        postcopy_ms: Some(40),
        downtime_ms: Some(8),
        total_ms: Some(900),
        error: Some("x".into()),
    });
    round_trip(&InstanceInfo {
        id: "anonymous-instance".into(),
        state: "Not started".into(),
        vmm_version: "0.1.0".into(),
        app_name: "ember".into(),
    });
    for a in ActionType::ALL {
        round_trip(&InstanceActionInfo::new(a));
        round_trip(&a);
    }
    for state in [VmState::Paused, VmState::Resumed] {
        round_trip(&VmStateUpdate { state });
    }
    round_trip(&FaultBody::new("say \"why\""));
    round_trip(&VmResources::default());
    round_trip(&VmResources {
        boot_source: Some(BootSourceConfig::new("/k")),
        machine_config: MachineConfig::new(2, 256),
        drives: vec![full_drive()],
        vsock: Some(VsockConfig {
            vsock_id: None,
            guest_cid: 3,
            uds_path: "/v".into(),
        }),
        network_interfaces: vec![full_iface()],
    });
}

#[test]
fn optional_fields_are_left_out() {
    assert_eq!(
        text(&BootSourceConfig::new("/k")),
        r#"{"kernel_image_path":"/k"}"#
    );
    assert_eq!(
        text(&BlockDeviceConfig {
            is_root_device: true,
            ..BlockDeviceConfig::file("rootfs", "/r")
        }),
        r#"{"drive_id":"rootfs","path_on_host":"/r","is_root_device":true,"is_read_only":false}"#
    );
    assert_eq!(
        text(&BlockDeviceUpdate {
            drive_id: "v".into(),
            nbd_uri: Some("nbd://h:1/v".into()),
            ..BlockDeviceUpdate::default()
        }),
        r#"{"drive_id":"v","nbd_uri":"nbd://h:1/v"}"#
    );
    assert_eq!(
        text(&ReceiveMigrationParams::new("unix:///in")),
        r#"{"listen_uri":"unix:///in"}"#
    );
    assert_eq!(
        text(&InstanceActionInfo::new(ActionType::InstanceStart)),
        r#"{"action_type":"InstanceStart"}"#
    );
    assert_eq!(
        text(&VmStateUpdate {
            state: VmState::Paused
        }),
        r#"{"state":"Paused"}"#
    );
    assert_eq!(text(&FaultBody::new("no")), r#"{"fault_message":"no"}"#);
    assert_eq!(
        text(&MachineConfigUpdate {
            mem_size_mib: Some(256),
            ..MachineConfigUpdate::default()
        }),
        r#"{"mem_size_mib":256}"#
    );
}

#[test]
fn firecracker_bodies() {
    let b: BootSourceConfig = parse(
        r#"{"kernel_image_path": "./vmlinux.bin",
            "boot_args": "console=ttyS0 reboot=k panic=1 pci=off"}"#,
    );
    assert_eq!(b.kernel_image_path, "./vmlinux.bin");
    assert_eq!(
        b.boot_args.as_deref(),
        Some("console=ttyS0 reboot=k panic=1 pci=off")
    );
    assert_eq!(b.initrd_path, None);

    let m: MachineConfig = parse(r#"{"vcpu_count": 2, "mem_size_mib": 1024}"#);
    assert_eq!(m, MachineConfig::new(2, 1024));
    let m: MachineConfig =
        parse(r#"{"vcpu_count": 1, "mem_size_mib": 128, "smt": false, "track_dirty_pages": true}"#);
    assert!(m.track_dirty_pages);

    let d: BlockDeviceConfig = parse(
        r#"{"drive_id": "rootfs", "path_on_host": "./rootfs.ext4",
            "is_root_device": true, "is_read_only": false,
            "partuuid": "0eaa91a0-01", "cache_type": "Unsafe",
            "rate_limiter": {"bandwidth": {"size": 1048576, "refill_time": 1000},
                             "ops": {"size": 100, "one_time_burst": 50, "refill_time": 1000}}}"#,
    );
    assert_eq!(d.drive_id, "rootfs");
    assert!(d.is_root_device && !d.is_read_only);
    assert_eq!(d.partuuid.as_deref(), Some("0eaa91a0-01"));
    assert_eq!(d.cache_type.as_deref(), Some("Unsafe"));
    let rl = d.rate_limiter.unwrap();
    assert_eq!(rl.bandwidth.unwrap().size, 1 << 20);
    assert_eq!(rl.bandwidth.unwrap().one_time_burst, None);
    assert_eq!(rl.ops.unwrap().one_time_burst, Some(50));
    // A vhost-user drive: no path_on_host, no is_read_only.
    let d: BlockDeviceConfig =
        parse(r#"{"drive_id": "data", "is_root_device": false, "socket": "/vu.sock"}"#);
    assert_eq!(
        (d.path_on_host.as_str(), d.is_read_only, d.socket.as_deref()),
        ("", false, Some("/vu.sock"))
    );
    let p: BlockDeviceUpdate = parse(r#"{"drive_id": "data", "path_on_host": "/new.img"}"#);
    assert!(p.reopens());
    assert_eq!(p.path_on_host.as_deref(), Some("/new.img"));

    let n: NetworkInterfaceConfig = parse(
        r#"{"iface_id": "eth0", "guest_mac": "AA:FC:00:00:00:01", "host_dev_name": "tap0",
            "tx_rate_limiter": {"bandwidth": {"size": 1000, "refill_time": 100}}}"#,
    );
    assert_eq!(n.guest_mac.as_deref(), Some("AA:FC:00:00:00:01"));
    assert!(!n.terminate_connections_on_pause);
    assert_eq!(n.rx_rate_limiter, None);
    assert_eq!(
        n.tx_rate_limiter.unwrap().bandwidth.unwrap().refill_time,
        100
    );
    let u: NetworkInterfaceUpdate = parse(
        r#"{"iface_id": "eth0", "rx_rate_limiter": {"ops": {"size": 10, "refill_time": 1}}}"#,
    );
    assert_eq!(u.rx_rate_limiter.unwrap().ops.unwrap().size, 10);

    let v: VsockConfig = parse(r#"{"guest_cid": 3, "uds_path": "./v.sock"}"#);
    assert_eq!((v.guest_cid, v.vsock_id), (3, None));
    let v: VsockConfig = parse(r#"{"vsock_id": "1", "guest_cid": 3, "uds_path": "./v.sock"}"#);
    assert_eq!(v.vsock_id.as_deref(), Some("1"));

    let m: MetricsConfig = parse(r#"{"metrics_path": "metrics.fifo"}"#);
    assert_eq!(m.metrics_path, "metrics.fifo");

    let a: InstanceActionInfo = parse(r#"{"action_type": "InstanceStart"}"#);
    assert_eq!(a.action(), Ok(ActionType::InstanceStart));
    let a: InstanceActionInfo = parse(r#"{"action_type": "FlushMetrics"}"#);
    assert_eq!(a.action(), Ok(ActionType::FlushMetrics));

    let s: VmStateUpdate = parse(r#"{"state": "Paused"}"#);
    assert_eq!(s.state, VmState::Paused);

    let c: CreateSnapshotParams = parse(r#"{"snapshot_path": "./snap", "mem_file_path": "./mem"}"#);
    assert_eq!(c.snapshot_type, SnapshotType::Full);
    let c: CreateSnapshotParams =
        parse(r#"{"snapshot_type": "Diff", "snapshot_path": "./snap", "mem_file_path": "./mem"}"#);
    assert_eq!(c.snapshot_type, SnapshotType::Diff);

    let l: LoadSnapshotParams = parse(
        r#"{"snapshot_path": "./snap",
            "mem_backend": {"backend_type": "File", "backend_path": "./mem"},
            "enable_diff_snapshots": true, "resume_vm": true,
            "network_overrides": [{"iface_id": "eth0", "host_dev_name": "vmtap2"}],
            "vsock_override": {"uds_path": "./v2.sock"}}"#,
    );
    assert_eq!(
        l.backend(),
        Ok(MemBackend {
            backend_type: MemBackendType::File,
            backend_path: "./mem".into()
        })
    );
    assert!(l.resume_vm && l.enable_diff_snapshots);
    assert_eq!(l.network_overrides[0].host_dev_name, "vmtap2");
    assert_eq!(l.vsock_override.unwrap().uds_path, "./v2.sock");
    assert!(l.drive_overrides.is_empty() && l.fill_overrides.is_empty());
    // The older spelling.
    let l: LoadSnapshotParams = parse(r#"{"snapshot_path": "./snap", "mem_file_path": "./mem"}"#);
    assert_eq!(l.backend().unwrap().backend_type, MemBackendType::File);
    assert!(!l.resume_vm);
    let l: LoadSnapshotParams = parse(r#"{"snapshot_path": "./snap"}"#);
    assert_eq!(l.backend(), Err("mem_backend is required".into()));
    let l: LoadSnapshotParams = parse(
        r#"{"snapshot_path": "s", "mem_file_path": "m",
            "mem_backend": {"backend_type": "Uffd", "backend_path": "u"}}"#,
    );
    assert!(l.backend().unwrap_err().contains("not both"));

    let i: InstanceInfo = parse(
        r#"{"app_name": "Firecracker", "id": "anonymous-instance",
            "state": "Not started", "vmm_version": "1.0.0"}"#,
    );
    assert_eq!(i.state, "Not started");

    let f: FaultBody = parse(r#"{"fault_message": "The requested operation is not supported"}"#);
    assert_eq!(f.fault_message, "The requested operation is not supported");

    let r: VmResources = parse(
        r#"{"boot-source": {"kernel_image_path": "vmlinux"},
            "machine-config": {"vcpu_count": 2, "mem_size_mib": 256},
            "drives": [{"drive_id": "rootfs", "path_on_host": "r.ext4",
                        "is_root_device": true, "is_read_only": false}],
            "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0"}],
            "vsock": {"guest_cid": 3, "uds_path": "v.sock"}}"#,
    );
    assert_eq!(r.machine_config.vcpu_count, 2);
    assert_eq!(r.drives[0].path_on_host, "r.ext4");
    assert_eq!(r.network_interfaces[0].host_dev_name, "tap0");
    let r: VmResources = parse("{}");
    assert_eq!(r, VmResources::default());
}

#[test]
fn ember_bodies() {
    let s: SendMigrationParams = parse(r#"{"destination_uri": "tcp://10.0.0.2:7000"}"#);
    assert_eq!(s, SendMigrationParams::new("tcp://10.0.0.2:7000"));
    assert_eq!(
        (s.downtime_ms, s.max_rounds, s.switch_over_timeout_ms),
        (300, 30, 30_000)
    );
    assert_eq!(
        (s.switch_over, s.mode),
        (SwitchOver::Auto, MigrationMode::PreCopy)
    );
    assert_eq!(s.precopy_rounds(), 30);
    let s: SendMigrationParams = parse(
        r#"{"destination_uri": "unix:///m", "downtime_ms": 100, "switch_over": "Manual",
            "mode": "PostCopy", "postcopy_after_rounds": 2}"#,
    );
    assert_eq!(s.precopy_rounds(), 2);
    assert_eq!(s.validate_limits(), Ok(()));

    let r: ReceiveMigrationParams = parse(
        r#"{"listen_uri": "unix:///in", "vsock_override": {"uds_path": "/v"},
            "drive_overrides": [{"drive_id": "rootfs", "path_on_host": "/r"}],
            "fill_overrides": [{"drive_id": "tmp",
                                "fill_from": {"nbd_uri": "nbd+unix:///disk?socket=/f"}}],
            "serial_out_path": "/serial"}"#,
    );
    let l = r.load_params();
    assert!(!l.resume_vm);
    assert_eq!(l.snapshot_path, "migration stream on unix:///in");
    assert_eq!(
        l.fill_overrides[0].fill_from,
        FillFrom::nbd("nbd+unix:///disk?socket=/f")
    );
    assert_eq!(l.serial_out_path.as_deref(), Some("/serial"));

    let o: SwitchOverParams = parse("{}");
    assert!(o.drive_overrides.is_empty());

    let d: BlockDeviceConfig = parse(
        r#"{"drive_id": "vol", "is_root_device": false, "nbd_uri": "nbd://h:10809/v",
            "nbd_timeout_ms": 2000, "io_scheduler": {"max_outstanding_writes": 8}}"#,
    );
    assert_eq!(d.nbd_timeout_ms, Some(2000));
    assert_eq!(d.io_scheduler.unwrap().max_write_latency_us, None);

    let u: BlockDeviceUpdate = parse(r#"{"drive_id": "vol", "nbd_uri": "nbd://h:1/v@2"}"#);
    let mut cfg = d.clone();
    u.apply_to(&mut cfg);
    assert_eq!(cfg.nbd_uri.as_deref(), Some("nbd://h:1/v@2"));
    assert_eq!(cfg.io_scheduler, d.io_scheduler);

    let n: NetworkInterfaceUpdate =
        parse(r#"{"iface_id": "eth0", "terminate_connections_on_pause": true}"#);
    let mut iface = NetworkInterfaceConfig::tap("eth0", "tap0");
    n.apply_to(&mut iface);
    assert!(iface.terminate_connections_on_pause);

    let m: MachineConfigUpdate = parse(r#"{"vcpu_count": 4}"#);
    assert!(!m.is_empty());
    assert_eq!(
        m.apply_to(&MachineConfig::default()),
        MachineConfig::new(4, 128)
    );
    assert!(parse::<MachineConfigUpdate>("{}").is_empty());
}

#[test]
fn unknown_fields_are_refused_in_requests() {
    refuses_unknown::<BootSourceConfig>(r#"{"kernel_image_path": "/k"}"#);
    refuses_unknown::<MachineConfig>(r#"{"vcpu_count": 1, "mem_size_mib": 128}"#);
    refuses_unknown::<MachineConfigUpdate>(r#"{"vcpu_count": 1}"#);
    refuses_unknown::<BlockDeviceConfig>(r#"{"drive_id": "r", "is_root_device": true}"#);
    refuses_unknown::<BlockDeviceUpdate>(r#"{"drive_id": "r"}"#);
    refuses_unknown::<FillFrom>(r#"{"nbd_uri": "nbd://h:1/e"}"#);
    refuses_unknown::<IoSchedulerConfig>("{}");
    refuses_unknown::<RateLimiterConfig>("{}");
    refuses_unknown::<TokenBucketConfig>(r#"{"size": 1, "refill_time": 1}"#);
    refuses_unknown::<NetworkInterfaceConfig>(r#"{"iface_id": "e", "host_dev_name": "t"}"#);
    refuses_unknown::<NetworkInterfaceUpdate>(r#"{"iface_id": "e"}"#);
    refuses_unknown::<VsockConfig>(r#"{"guest_cid": 3, "uds_path": "/v"}"#);
    refuses_unknown::<MetricsConfig>(r#"{"metrics_path": "/m"}"#);
    refuses_unknown::<CreateSnapshotParams>(r#"{"snapshot_path": "s", "mem_file_path": "m"}"#);
    refuses_unknown::<LoadSnapshotParams>(r#"{"snapshot_path": "s"}"#);
    refuses_unknown::<MemBackend>(r#"{"backend_type": "File", "backend_path": "m"}"#);
    refuses_unknown::<DriveOverride>(r#"{"drive_id": "d", "path_on_host": "p"}"#);
    refuses_unknown::<FillOverride>(r#"{"drive_id": "d", "fill_from": {"nbd_uri": "u"}}"#);
    refuses_unknown::<VhostUserOverride>(r#"{"drive_id": "d", "socket": "s"}"#);
    refuses_unknown::<VsockOverride>(r#"{"uds_path": "u"}"#);
    refuses_unknown::<NetworkOverride>(r#"{"iface_id": "e", "host_dev_name": "t"}"#);
    refuses_unknown::<SendMigrationParams>(r#"{"destination_uri": "tcp://h:1"}"#);
    refuses_unknown::<ReceiveMigrationParams>(r#"{"listen_uri": "unix:///l"}"#);
    refuses_unknown::<SwitchOverParams>("{}");
    refuses_unknown::<InstanceActionInfo>(r#"{"action_type": "InstanceStart"}"#);
    refuses_unknown::<VmStateUpdate>(r#"{"state": "Paused"}"#);
    refuses_unknown::<VmResources>("{}");
}

#[test]
fn wrong_values_are_refused() {
    for (body, want) in [
        (r#"{"state": "Sleeping"}"#, "unknown variant `Sleeping`"),
        (r#"{"state": 1}"#, "expected"),
    ] {
        let e = serde_json::from_str::<VmStateUpdate>(body).unwrap_err();
        assert!(e.to_string().contains(want), "{body}: {e}");
    }
    let e =
        serde_json::from_str::<VsockConfig>(r#"{"guest_cid": -1, "uds_path": "/v"}"#).unwrap_err();
    assert!(e.to_string().contains("invalid value"), "{e}");
    let e = serde_json::from_str::<MachineConfig>(r#"{"vcpu_count": 300, "mem_size_mib": 1}"#)
        .unwrap_err();
    assert!(e.to_string().contains("invalid value"), "{e}");
    let e = serde_json::from_str::<SendMigrationParams>(
        r#"{"destination_uri": "tcp://h:1", "mode": "Sideways"}"#,
    )
    .unwrap_err();
    assert!(e.to_string().contains("Sideways"), "{e}");
    let e = serde_json::from_str::<RateLimiterConfig>(r#"{"ops": {"size": -1, "refill_time": 1}}"#)
        .unwrap_err();
    assert!(e.to_string().contains("invalid value"), "{e}");
    let a: InstanceActionInfo = parse(r#"{"action_type": "Reboot"}"#);
    assert_eq!(
        a.action(),
        Err("Unknown action_type `Reboot`, expected one of \
             `InstanceStart`, `SendCtrlAltDel`, `FlushMetrics`."
            .into())
    );
}

#[test]
fn shape_checks() {
    assert_eq!(MachineConfig::default().validate(), Ok(()));
    for bad in [
        MachineConfig::new(0, 128),
        MachineConfig::new(33, 128),
        MachineConfig::new(1, 15),
        MachineConfig::new(1, 64 * 1024 + 1),
        MachineConfig {
            smt: true,
            ..MachineConfig::default()
        },
        MachineConfig {
            huge_pages: HugePages::Hugetlbfs2M,
            ..MachineConfig::new(1, 129)
        },
    ] {
        assert!(bad.validate().is_err(), "{bad:?}");
    }
    assert!(MachineConfig::new(32, 64 * 1024).validate().is_ok());

    assert!(limiter().validate().is_ok());
    let huge = RateLimiterConfig {
        bandwidth: Some(TokenBucketConfig {
            size: 1,
            one_time_burst: None,
            refill_time: u64::MAX,
        }),
        ops: None,
    };
    assert!(huge.validate().unwrap_err().starts_with("bandwidth: "));
    // Zero means unlimited, whatever the other number.
    let unlimited = TokenBucketConfig {
        size: 0,
        one_time_burst: None,
        refill_time: u64::MAX,
    };
    assert!(unlimited.validate().is_ok());
    assert!(IoSchedulerConfig {
        max_outstanding_writes: Some(0),
        max_write_latency_us: None,
    }
    .validate()
    .is_err());

    let mut s = SendMigrationParams::new("tcp://h:1");
    assert!(s.validate_limits().is_ok());
    s.postcopy_after_rounds = Some(1);
    assert!(s.validate_limits().unwrap_err().contains("PostCopy"));
    s.mode = MigrationMode::PostCopy;
    s.postcopy_after_rounds = Some(31);
    assert!(s.validate_limits().unwrap_err().contains("max_rounds"));
    for (field, v) in [("downtime_ms", 0), ("downtime_ms", 60_001)] {
        let mut s = SendMigrationParams::new("tcp://h:1");
        s.downtime_ms = v;
        assert!(s.validate_limits().unwrap_err().contains(field));
    }
    let mut s = SendMigrationParams::new("tcp://h:1");
    s.switch_over_timeout_ms = 110_001;
    assert!(s
        .validate_limits()
        .unwrap_err()
        .contains("switch_over_timeout_ms"));
    s.switch_over_timeout_ms = 1;
    s.max_rounds = 0;
    assert!(s.validate_limits().unwrap_err().contains("max_rounds"));

    assert!(MigrationStatus::default().state == Phase::None);
    assert!(!MigrationStatus::default().is_active());
}
