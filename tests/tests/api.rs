//! The VMM's API from outside, with curl: errors are 4xx with a
//! fault_message and leave the VMM usable. Needs no guest.

use ember_tests::VmmProcess;
use serde_json::json;

#[test]
fn malformed_and_out_of_order_requests_get_4xx_and_vmm_stays_usable() {
    let vmm = VmmProcess::spawn(&[]);

    let info = vmm.request("GET", "/", None);
    assert_eq!(info.status, 200);
    assert_eq!(info.json()["state"], "Not started");

    // Malformed JSON.
    let r = vmm.request("PUT", "/machine-config", Some("{\"vcpu_count\": "));
    assert_eq!(r.status, 400, "{r:?}");
    assert!(!r.fault().is_empty());

    // Unknown field, wrong type, invalid value.
    let r = vmm.put(
        "/machine-config",
        &json!({"vcpu_count": 1, "mem_size_mib": 128, "bogus": 1}),
    );
    assert_eq!(r.status, 400);
    assert!(r.fault().contains("bogus"), "{r:?}");
    let r = vmm.put(
        "/machine-config",
        &json!({"vcpu_count": "two", "mem_size_mib": 128}),
    );
    assert_eq!(r.status, 400);
    let r = vmm.put(
        "/machine-config",
        &json!({"vcpu_count": 0, "mem_size_mib": 128}),
    );
    assert_eq!(r.status, 400);
    assert!(r.fault().contains("vcpu_count"), "{r:?}");

    // Unknown path and method.
    assert_eq!(vmm.request("GET", "/no-such-thing", None).status, 400);
    assert_eq!(vmm.request("DELETE", "/machine-config", None).status, 400);

    // Drive id mismatch and a missing backing file.
    let r = vmm.put(
        "/drives/a",
        &json!({"drive_id": "b", "path_on_host": "/dev/null", "is_root_device": false}),
    );
    assert_eq!(r.status, 400);
    let r = vmm.put(
        "/drives/a",
        &json!({"drive_id": "a", "path_on_host": "/nonexistent/disk.img", "is_root_device": false}),
    );
    assert_eq!(r.status, 400);
    assert!(r.fault().contains("/nonexistent/disk.img"), "{r:?}");

    // Out of order: starting before a boot source is configured.
    let r = vmm.put("/actions", &json!({"action_type": "InstanceStart"}));
    assert_eq!(r.status, 400);
    assert!(r.fault().contains("boot"), "{r:?}");
    let r = vmm.put("/actions", &json!({"action_type": "SendCtrlAltDel"}));
    assert_eq!(r.status, 400);
    let r = vmm.put("/actions", &json!({"action_type": "Explode"}));
    assert_eq!(r.status, 400);

    // A kernel that is not an ELF image: refused at InstanceStart, clearly.
    let not_elf = vmm.path("not-a-kernel");
    std::fs::write(&not_elf, b"hello").unwrap();
    let r = vmm.put("/boot-source", &json!({"kernel_image_path": not_elf}));
    assert_eq!(r.status, 204, "{r:?}");
    let r = vmm.put("/actions", &json!({"action_type": "InstanceStart"}));
    assert_eq!(r.status, 400, "{r:?}");
    assert!(r.fault().contains("kernel"), "{r:?}");

    // Still usable: a valid configuration is accepted and reported back.
    let r = vmm.put(
        "/machine-config",
        &json!({"vcpu_count": 2, "mem_size_mib": 256}),
    );
    assert_eq!(r.status, 204, "{r:?}");
    let r = vmm.request("GET", "/machine-config", None);
    assert_eq!(r.json()["vcpu_count"], 2);
    assert_eq!(r.json()["mem_size_mib"], 256);
    let r = vmm.request("PATCH", "/machine-config", Some("{\"mem_size_mib\": 512}"));
    assert_eq!(r.status, 204, "{r:?}");
    let r = vmm.request("GET", "/vm/config", None);
    assert_eq!(r.json()["machine-config"]["mem_size_mib"], 512);
    assert_eq!(r.json()["machine-config"]["vcpu_count"], 2);
    assert_eq!(vmm.request("GET", "/", None).json()["state"], "Not started");
}

#[test]
fn config_file_errors_are_reported_before_anything_starts() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("vm.json");
    std::fs::write(
        &cfg,
        r#"{"boot-source": {"kernel_image_path": "/k"}, "unknown": 1}"#,
    )
    .unwrap();
    let out = std::process::Command::new(ember_tests::artifacts::workspace_bin("ember-vmm"))
        .arg("--config-file")
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("unknown"), "{stderr}");
}
