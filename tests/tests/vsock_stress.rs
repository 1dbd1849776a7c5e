//! Stress for the vsock data path (ignored by default: minutes on nested
//! KVM). One guest with two vCPUs echoes large payloads through `cat` again
//! and again; every reply frame is read raw, so a corrupted stream is shown
//! byte by byte instead of as a parse error.
//!
//!     cargo test -p ember-tests --test vsock_stress -- --ignored --nocapture
//!
//! `EMBER_VSOCK_STRESS_ROUNDS` sets the number of rounds (default 20),
//! `EMBER_VSOCK_STRESS_VCPUS` the guest's vCPUs (default 2).
//!
//! Measured on a nested kvm_pvm host (2026-12-01): with 2 vCPUs, 8 of the
//! first 12 rounds came back damaged, both ways (requests the agent could
//! not parse, replies with 64-byte runs of zero bytes in the middle of the
//! base64 text, stdout differing from 896 KiB on); with 1 vCPU, 10 of 10
//! rounds were intact. On 2026-12-07, at that day's main, 20 of 20 rounds
//! (4 KiB to 5 MiB) came back intact with 2 vCPUs on the same host, with
//! both cores busy (752 s): guests and functions have their vCPUs back.

use std::time::{Duration, Instant};

use ember_agent::client::{bind_ready_listener, AgentClient};
use ember_agent::protocol::{
    read_frame_bytes, write_frame, ExecRequest, ExecResult, Request, Response,
};
use ember_agent::AGENT_PORT;
use ember_tests::{kernel_path, kvm_available, rootfs_path, VmmProcess};

fn payload(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_add(seed).wrapping_mul(2654435761) >> 24) as u8)
        .collect()
}

/// Where `frame` first stops being printable JSON, with the bytes around it.
fn describe_corruption(frame: &[u8]) -> String {
    let bad = frame
        .iter()
        .position(|&b| !(0x20..0x7f).contains(&b))
        .unwrap_or(frame.len());
    let from = bad.saturating_sub(32);
    let to = (bad + 96).min(frame.len());
    format!(
        "frame of {} bytes, first non-printable byte at {bad}; bytes {from}..{to}: {:02x?}; as text {:?}",
        frame.len(),
        &frame[from..to],
        String::from_utf8_lossy(&frame[from..to])
    )
}

#[test]
#[ignore = "stress: minutes on nested KVM; run with --ignored"]
fn large_echoes_arrive_intact() {
    assert!(kvm_available(), "needs /dev/kvm");
    let rounds: usize = std::env::var("EMBER_VSOCK_STRESS_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let vcpus: u8 = std::env::var("EMBER_VSOCK_STRESS_VCPUS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    eprintln!("{rounds} rounds, {vcpus} vCPUs");
    let mut vmm = VmmProcess::spawn(&[]);
    let vsock = vmm.path("vsock.sock");
    let ready = bind_ready_listener(&vsock).unwrap();
    vmm.boot(&kernel_path(), &rootfs_path(), vcpus, 128);
    vmm.wait_agent_ready(&ready, Duration::from_secs(600));
    let mut agent = AgentClient::connect(&vsock, AGENT_PORT, Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("connect: {e}; {}", vmm.logs()));
    agent.set_timeout(Some(Duration::from_secs(600))).unwrap();

    let sizes = [3usize << 20, 1 << 20, 64 << 10, 5 << 20, 4097];
    let mut failures = Vec::new();
    for round in 0..rounds {
        let len = sizes[round % sizes.len()];
        let data = payload(len, round as u32);
        let t0 = Instant::now();
        let req = Request::Exec(ExecRequest::new(["/bin/cat"]).stdin(data.clone()));
        let mut stream = agent.stream().try_clone().unwrap();
        write_frame(&mut stream, &req).unwrap();
        let frame = read_frame_bytes(&mut stream)
            .unwrap_or_else(|e| panic!("round {round}: read: {e}; {}", vmm.logs()))
            .unwrap_or_else(|| panic!("round {round}: agent closed; {}", vmm.logs()));
        let outcome = match serde_json::from_slice::<Response>(&frame) {
            Ok(Response::Exec(ExecResult {
                exit_code: Some(0),
                stdout,
                ..
            })) if stdout == data => "ok".to_string(),
            Ok(Response::Exec(r)) => {
                let first = r.stdout.iter().zip(&data).position(|(a, b)| a != b);
                format!(
                    "stdout differs: {} of {} bytes, first difference at {first:?}, exit {:?}",
                    r.stdout.len(),
                    data.len(),
                    r.exit_code
                )
            }
            Ok(other) => format!("unexpected reply {other:?}"),
            Err(e) => format!("unparsable reply ({e}): {}", describe_corruption(&frame)),
        };
        eprintln!(
            "round {round}: {len} bytes in {:?}: {outcome}",
            t0.elapsed()
        );
        if outcome != "ok" {
            let framing_lost = outcome.starts_with("unparsable");
            failures.push(format!("round {round} ({len} bytes): {outcome}"));
            if framing_lost {
                // The stream's framing cannot be trusted after this.
                break;
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {rounds} rounds failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
