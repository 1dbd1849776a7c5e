//! `cargo bench -p ember-benches --bench volmove`: volumes changed while
//! attached, between two `ember-volumed` processes on this host (no guest).
//! A 256 MiB volume, all written: `move-to-server` idle, next to
//! `qemu-img convert` copying the same volume between the same two NBD
//! servers (the peer); the same move while a client writes 4 KiB blocks at
//! random, with the rounds it took, the writes made meanwhile and the
//! client's longest write (the fence and final pass as it sees them);
//! `split` of 128 MiB next to `dd` of the same range (conv=fsync). Prints
//! numbers and ratios; asserts nothing.

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ember_tests::volumed::Volumed;
use ember_volumed::nbd::client::Client;

const SIZE: u64 = 256 << 20;

fn make(v: &Volumed, name: &str, fill: bool) -> Result<String, String> {
    let (st, b) = v.call(
        "POST",
        "/v1/volumes",
        Some(&format!(r#"{{"Name":"{name}","SizeBytes":{SIZE}}}"#)),
    );
    if st != 201 {
        return Err(format!("create {name}: {st} {b}"));
    }
    let (st, g) = v.call(
        "POST",
        &format!("/v1/volumes/{name}/attach"),
        Some(r#"{"Host":"bench"}"#),
    );
    if st != 200 {
        return Err(format!("attach {name}: {st} {g}"));
    }
    let export = g["ExportName"].as_str().unwrap_or_default().to_string();
    if fill {
        let mut c = Client::connect_unix(&v.nbd, &export).map_err(|e| e.to_string())?;
        let mut block = vec![0u8; 1 << 20];
        for i in 0..SIZE >> 20 {
            block.iter_mut().for_each(|b| *b = (i as u8) | 1);
            c.write(i << 20, &block).map_err(|e| e.to_string())?;
        }
        c.flush().map_err(|e| e.to_string())?;
    }
    Ok(export)
}

fn move_to(a: &Volumed, b: &Volumed, name: &str) -> Result<(Duration, serde_json::Value), String> {
    let t = Instant::now();
    let (st, m) = a.call(
        "POST",
        &format!("/v1/volumes/{name}/move-to-server"),
        Some(&format!(r#"{{"Target":"{}"}}"#, b.api.display())),
    );
    if st != 200 {
        return Err(format!("move {name}: {st} {m}"));
    }
    Ok((t.elapsed(), m))
}

fn secs(d: Duration) -> String {
    format!("{:.3} s", d.as_secs_f64())
}

fn run() -> Result<(), String> {
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, b) = (Volumed::start(d1.path()), Volumed::start(d2.path()));

    // Idle move vs qemu-img convert between the same servers.
    make(&a, "idle", true)?;
    let (t_move, m) = move_to(&a, &b, "idle")?;
    let src = make(&a, "peer", true)?;
    let dst = make(&b, "peer", false)?;
    let t = Instant::now();
    let out = Command::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(format!("nbd+unix:///{src}?socket={}", a.nbd.display()))
        .arg(format!("nbd+unix:///{dst}?socket={}", b.nbd.display()))
        .output()
        .map_err(|e| format!("qemu-img: {e}"))?;
    let t_peer = t.elapsed();
    if !out.status.success() {
        return Err(format!(
            "qemu-img: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    println!(
        "move-to-server, idle, {} MiB:        {}  ({} rounds)   qemu-img convert: {}   ratio {:.2}",
        SIZE >> 20,
        secs(t_move),
        m["Rounds"],
        secs(t_peer),
        t_move.as_secs_f64() / t_peer.as_secs_f64()
    );

    // A move while a client writes.
    let export = make(&a, "busy", true)?;
    let mut c = Client::connect_unix(&a.nbd, &export).map_err(|e| e.to_string())?;
    let stop = Arc::new(AtomicBool::new(false));
    let st = stop.clone();
    let writer = std::thread::spawn(move || {
        let (mut n, mut worst, mut x) = (0u64, Duration::ZERO, 1u64);
        let block = vec![0x5au8; 4096];
        while !st.load(Ordering::SeqCst) {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let t = Instant::now();
            match c.write(((x >> 33) % (SIZE / 4096)) * 4096, &block) {
                Ok(r) if r.error == 0 => {}
                _ => break, // fenced
            }
            worst = worst.max(t.elapsed());
            n += 1;
        }
        (n, worst)
    });
    std::thread::sleep(Duration::from_millis(300));
    let (t_busy, m) = move_to(&a, &b, "busy")?;
    stop.store(true, Ordering::SeqCst);
    let (n, worst) = writer.join().map_err(|_| "writer panicked")?;
    println!(
        "move-to-server under 4k writes:      {}  ({} rounds, {} MiB copied, {} writes acknowledged, longest write {:.1} ms)   ratio to idle {:.2}",
        secs(t_busy),
        m["Rounds"],
        m["BytesCopied"].as_u64().unwrap_or(0) >> 20,
        n,
        worst.as_secs_f64() * 1000.0,
        t_busy.as_secs_f64() / t_move.as_secs_f64()
    );

    // Split half of a volume vs dd of the same range.
    make(&a, "whole", true)?;
    let t = Instant::now();
    let (st, r) = a.call(
        "POST",
        "/v1/volumes/whole/split",
        Some(&format!(
            r#"{{"NewName":"half","Offset":{},"Length":{}}}"#,
            SIZE / 4,
            SIZE / 2
        )),
    );
    let t_split = t.elapsed();
    if st != 201 {
        return Err(format!("split: {st} {r}"));
    }
    let t = Instant::now();
    let out = Command::new("dd")
        .arg(format!("if={}", a.image("whole").display()))
        .arg(format!("of={}", d1.path().join("dd.img").display()))
        .args(["bs=1M", "conv=fsync"])
        .arg(format!("skip={}", (SIZE / 4) >> 20))
        .arg(format!("count={}", (SIZE / 2) >> 20))
        .output()
        .map_err(|e| format!("dd: {e}"))?;
    let t_dd = t.elapsed();
    if !out.status.success() {
        return Err(format!("dd: {}", String::from_utf8_lossy(&out.stderr)));
    }
    println!(
        "split {} MiB:                        {}   dd conv=fsync: {}   ratio {:.2}",
        (SIZE / 2) >> 20,
        secs(t_split),
        secs(t_dd),
        t_split.as_secs_f64() / t_dd.as_secs_f64()
    );
    Ok(())
}

fn main() {
    println!("== live volume copies: two ember-volumed processes, unix sockets ==");
    if let Err(e) = run() {
        println!("FAILED: {e}");
    }
}
