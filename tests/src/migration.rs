//! Live migration between `ember-vmm` processes, driven over their APIs.

use std::time::{Duration, Instant};

use ember_vmm_api::{ReceiveMigrationParams, SendMigrationParams, VsockOverride};
use serde_json::Value;

use crate::vmm_process::path_str;
use crate::VmmProcess;

/// `GET /migrate`.
pub fn status(vmm: &VmmProcess) -> Value {
    let r = vmm.request("GET", "/migrate", None);
    assert_eq!(r.status, 200, "{r:?}");
    r.json()
}

/// Waits until `GET /migrate` leaves the active states; returns the status.
pub fn wait_done(vmm: &VmmProcess, timeout: Duration) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let s = status(vmm);
        let state = s["state"].as_str().unwrap_or_default().to_string();
        if ![
            "Listening",
            "PreCopy",
            "StopAndCopy",
            "SwitchOver",
            "PostCopy",
        ]
        .contains(&state.as_str())
        {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "migration still {state} after {timeout:?}: {s}; {}",
            vmm.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A fresh VMM waiting for a migration on `uri`, with its own vsock socket.
pub fn receiver(uri: &str) -> VmmProcess {
    // Some of these VMMs migrate on over TCP.
    let vmm = VmmProcess::spawn(&["--allow-inet"]);
    let mut params = ReceiveMigrationParams::new(uri);
    params.vsock_override = Some(VsockOverride {
        uds_path: path_str(&vmm.path("vsock.sock")),
    });
    let r = vmm.put("/migrate/receive", &params);
    assert_eq!(r.status, 204, "{r:?}; {}", vmm.logs());
    assert_eq!(status(&vmm)["state"], "Listening");
    vmm
}

/// Migrates `from` to `to` (waiting on `uri`) and returns the source's
/// final status once both ends report Completed.
pub fn migrate(
    from: &VmmProcess,
    to: &VmmProcess,
    uri: &str,
    downtime_ms: u64,
    max_rounds: u32,
) -> Value {
    let params = SendMigrationParams {
        downtime_ms,
        max_rounds,
        ..SendMigrationParams::new(uri)
    };
    migrate_with(from, to, &params)
}

/// Migrates `from` to `to` with `body` as the `PUT /migrate/send` request
/// (a [`SendMigrationParams`] or raw JSON) and returns the source's final
/// status once both ends report Completed.
pub fn migrate_with(from: &VmmProcess, to: &VmmProcess, body: &impl serde::Serialize) -> Value {
    let r = from.put("/migrate/send", body);
    assert_eq!(r.status, 204, "{r:?}; {}", from.logs());
    let s = wait_done(from, Duration::from_secs(1200));
    assert_eq!(s["state"], "Completed", "{s}; {}", from.logs());
    let d = wait_done(to, Duration::from_secs(60));
    assert_eq!(d["state"], "Completed", "{d}; {}", to.logs());
    s
}
