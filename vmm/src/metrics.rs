//! Process-wide counters (one microVM per process), written as one JSON
//! line to the file given by `PUT /metrics` on `FlushMetrics`, every minute
//! and at exit, as Firecracker does.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use serde::{Serialize, Serializer};

/// A monotonically increasing counter.
#[derive(Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub const fn new() -> Self {
        Counter(AtomicU64::new(0))
    }
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

impl Serialize for Counter {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.get())
    }
}

/// vCPU exits by kind.
#[derive(Serialize)]
pub struct VcpuMetrics {
    pub exit_io_in: Counter,
    pub exit_io_out: Counter,
    pub exit_mmio_read: Counter,
    pub exit_mmio_write: Counter,
    pub exit_hlt: Counter,
    pub exit_shutdown: Counter,
    pub exit_internal_error: Counter,
    pub exit_other: Counter,
    /// KVM_RUN interrupted by a kick (pause, snapshot, exit).
    pub kicked: Counter,
}

#[derive(Serialize)]
pub struct BlockMetrics {
    pub read_ops: Counter,
    pub read_bytes: Counter,
    pub write_ops: Counter,
    pub write_bytes: Counter,
    pub flush_ops: Counter,
    pub io_errors: Counter,
}

#[derive(Serialize)]
pub struct VsockMetrics {
    /// Host to guest.
    pub rx_bytes: Counter,
    /// Guest to host.
    pub tx_bytes: Counter,
}

#[derive(Serialize)]
pub struct NetMetrics {
    /// TCP connections ended with RSTs when the VM was paused.
    pub connections_terminated: Counter,
}

#[derive(Serialize)]
pub struct ApiMetrics {
    pub actions: Counter,
    pub action_errors: Counter,
}

#[derive(Serialize)]
pub struct Metrics {
    pub vcpu: VcpuMetrics,
    pub block: BlockMetrics,
    pub vsock: VsockMetrics,
    pub net: NetMetrics,
    pub api: ApiMetrics,
}

pub static METRICS: Metrics = Metrics {
    vcpu: VcpuMetrics {
        exit_io_in: Counter::new(),
        exit_io_out: Counter::new(),
        exit_mmio_read: Counter::new(),
        exit_mmio_write: Counter::new(),
        exit_hlt: Counter::new(),
        exit_shutdown: Counter::new(),
        exit_internal_error: Counter::new(),
        exit_other: Counter::new(),
        kicked: Counter::new(),
    },
    block: BlockMetrics {
        read_ops: Counter::new(),
        read_bytes: Counter::new(),
        write_ops: Counter::new(),
        write_bytes: Counter::new(),
        flush_ops: Counter::new(),
        io_errors: Counter::new(),
    },
    vsock: VsockMetrics {
        rx_bytes: Counter::new(),
        tx_bytes: Counter::new(),
    },
    net: NetMetrics {
        connections_terminated: Counter::new(),
    },
    api: ApiMetrics {
        actions: Counter::new(),
        action_errors: Counter::new(),
    },
};

static SINK: Mutex<Option<std::fs::File>> = Mutex::new(None);

/// Sets the file metrics are appended to (`PUT /metrics`).
pub fn set_sink(path: &str) -> std::io::Result<()> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    *crate::devices::bus::lock(&SINK) = Some(f);
    Ok(())
}

/// The counters as one JSON object, with a timestamp.
pub fn snapshot_json() -> serde_json::Value {
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let mut v = serde_json::to_value(&METRICS).unwrap_or_default();
    v["utc_timestamp_ms"] = ts.into();
    v
}

/// Appends the counters to the sink, if one is set.
pub fn flush() -> std::io::Result<()> {
    let mut sink = crate::devices::bus::lock(&SINK);
    if let Some(f) = sink.as_mut() {
        writeln!(f, "{}", snapshot_json())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flush_writes_json_lines_with_counters() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.json");
        set_sink(p.to_str().unwrap()).unwrap();
        METRICS.block.read_bytes.add(4096);
        flush().unwrap();
        flush().unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[1]["block"]["read_bytes"].as_u64().unwrap() >= 4096);
        assert!(lines[1]["utc_timestamp_ms"].as_u64().unwrap() > 0);
        assert!(lines[0]["vcpu"]["exit_io_out"].is_u64());
    }
}
