//! `cargo bench -p ember-benches --bench hostd`: emberd end to end with a
//! small Python handler (awslambdaric in the python3 root filesystem)
//! returning its event:
//!
//! 1. invoke latency, client-side over emberd's unix socket: a warm
//!    (reused idle) instance, a clone restored on demand (alternately with
//!    the snapshot's working set prefetched and with none recorded yet),
//!    and a fresh boot (CreateFunction to the first answer);
//! 2. throughput at concurrency 1, 4 and 16 (instances restored on demand
//!    during a warm-up, then kept busy);
//! 3. memory (RSS, PSS) per warm instance;
//! 4. a peer: the same handler under awslambdaric natively on the host,
//!    driven through `ember-agent --listen-unix` (no VM, no emberd).
//!
//! One emberd (`--warm-instances 0 --idle-ttl-secs 0 --max-concurrency 16`)
//! serves every part: the function is booted and snapshotted once. The
//! warm count stays 0 except for the memory part (provisioned concurrency
//! 5): the maintainer keeps that many *idle* instances, so with one busy it
//! restores another in the background, which would load the CPUs during
//! latency and throughput runs. Every timed invoke asks for the log tail,
//! whose REPORT line says whether it was a restore. Timed requests use a raw
//! HTTP/1.1 client on the unix socket (one connection per request), not
//! curl, so no process start is measured. A part that fails is reported
//! and the others still run. Prints numbers; asserts nothing.

use std::collections::BTreeMap;
use std::os::unix::net::UnixStream;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ember_benches::{http_exchange, percentile, smaps_rollup, Resp};
use ember_tests::artifacts::workspace_bin;
use ember_tests::emberd::{write_file, Emberd};
use ember_tests::kvm_available;
use serde_json::{json, Value};

const FUNCTION: &str = "echo";
const HANDLER_PY: &str = "def handler(event, context):\n    return event\n";
const WARM_N: usize = 50;
const RESTORE_N: usize = 15;
const MEM_INSTANCES: usize = 5;
const LEVELS: [usize; 3] = [1, 4, 16];
const LEVEL_SECS: u64 = 10;
const BUILD_TIMEOUT: Duration = Duration::from_secs(900);

// ---------------------------------------------------------------- HTTP

/// One HTTP/1.1 request on a fresh unix-socket connection (Connection: close).
fn http(
    sock: &Path,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<Resp, String> {
    let s = UnixStream::connect(sock).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(900))).ok();
    http_exchange(s, "localhost", method, path, headers, body)
}

fn b64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.bytes().filter_map(val) {
        acc = (acc << 6) | c;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}

/// A timed invoke. Returns (latency, restored?) where restored comes from
/// the REPORT line of the log tail (None without `tail`).
fn invoke(sock: &Path, payload: &Value, tail: bool) -> Result<(Duration, Option<bool>), String> {
    let body = payload.to_string();
    let hdrs: &[(&str, &str)] = if tail {
        &[("X-Amz-Log-Type", "Tail")]
    } else {
        &[]
    };
    let t0 = Instant::now();
    let r = http(
        sock,
        "POST",
        &format!("/2015-03-31/functions/{FUNCTION}/invocations"),
        hdrs,
        body.as_bytes(),
    )?;
    let lat = t0.elapsed();
    if r.status != 200 || r.headers.contains_key("x-amz-function-error") {
        return Err(format!("invoke: {} {}", r.status, r.text()));
    }
    if r.json() != *payload {
        return Err(format!("invoke: payload not echoed: {}", r.text()));
    }
    let restored = r.headers.get("x-amz-log-result").map(|b| {
        let log = String::from_utf8_lossy(&b64_decode(b)).into_owned();
        log.contains("Restore: yes")
    });
    Ok((lat, restored))
}

/// (idle pids, busy count, starting+warming) of the function's pool.
fn pool(sock: &Path) -> Result<(Vec<u32>, usize, u64), String> {
    let r = http(sock, "GET", "/ember/v1/pools", &[], b"")?;
    let v = r.json();
    let mut idle = Vec::new();
    let mut busy = 0;
    let mut pending = 0;
    for p in v["Pools"].as_array().into_iter().flatten() {
        if p["FunctionName"] != FUNCTION {
            continue;
        }
        for i in p["Idle"].as_array().into_iter().flatten() {
            idle.push(i["Pid"].as_u64().unwrap_or(0) as u32);
        }
        busy += p["Busy"].as_array().map_or(0, |a| a.len());
        pending += p["Starting"].as_u64().unwrap_or(0) + p["Warming"].as_u64().unwrap_or(0);
    }
    Ok((idle, busy, pending))
}

fn set_provisioned(sock: &Path, n: u32) -> Result<(), String> {
    let body = json!({ "ProvisionedConcurrentExecutions": n }).to_string();
    let r = http(
        sock,
        "PUT",
        &format!("/2019-09-30/functions/{FUNCTION}/provisioned-concurrency?Qualifier=%24LATEST"),
        &[],
        body.as_bytes(),
    )?;
    if r.status / 100 != 2 {
        return Err(format!(
            "provisioned concurrency {n}: {} {}",
            r.status,
            r.text()
        ));
    }
    Ok(())
}

/// Waits until exactly `n` idle instances (none busy, none starting).
fn wait_idle(sock: &Path, n: usize, timeout: Duration) -> Result<Vec<u32>, String> {
    let t0 = Instant::now();
    loop {
        let (idle, busy, pending) = pool(sock)?;
        if idle.len() == n && busy == 0 && pending == 0 {
            return Ok(idle);
        }
        if t0.elapsed() > timeout {
            return Err(format!(
                "after {timeout:?}: {} idle, {busy} busy, {pending} starting (wanted {n} idle)",
                idle.len()
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

// --------------------------------------------------------------- output

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

fn stats(lat: &[Duration]) -> String {
    format!(
        "n={:<4} p50={:>11} p99={:>11} min={:>11} max={:>11}",
        lat.len(),
        ms(percentile(lat, 50.0)),
        ms(percentile(lat, 99.0)),
        ms(lat.iter().min().copied().unwrap_or_default()),
        ms(lat.iter().max().copied().unwrap_or_default()),
    )
}

#[derive(Default)]
struct Results {
    fresh: Option<(Duration, Duration, Duration)>,
    /// Restored on demand, the snapshot's working set prefetched.
    restore: Vec<Duration>,
    /// Restored on demand with no working set beside the snapshot.
    restore_cold: Vec<Duration>,
    warm: Vec<Duration>,
    native: Vec<Duration>,
    lines: Vec<String>,
}

fn part<F: FnOnce(&mut Results) -> Result<(), String>>(name: &str, r: &mut Results, f: F) {
    eprintln!("[hostd bench] {name} ...");
    let t0 = Instant::now();
    match catch_unwind(AssertUnwindSafe(|| f(r))) {
        Ok(Ok(())) => eprintln!("[hostd bench] {name}: done in {:.1?}", t0.elapsed()),
        Ok(Err(e)) => {
            println!("{name}: FAILED: {e}");
            r.lines.push(format!("{name}: FAILED: {e}"));
        }
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            let msg: String = msg.chars().take(3000).collect();
            println!("{name}: FAILED (panic): {msg}");
            r.lines.push(format!("{name}: FAILED (panic)"));
        }
    }
}

// ---------------------------------------------------------------- parts

fn fresh_boot(d: &Emberd, code: &Path, r: &mut Results) -> Result<(), String> {
    let t0 = Instant::now();
    d.create_function(FUNCTION, "python3.11", "app.handler", code, 120, &[]);
    let created = t0.elapsed();
    // Poll the configuration every 100 ms (raw client, not curl).
    loop {
        let q = http(
            &d.socket,
            "GET",
            &format!("/2015-03-31/functions/{FUNCTION}/configuration"),
            &[],
            b"",
        )?;
        let cfg = q.json();
        if cfg["LastUpdateStatus"] != "InProgress" {
            if cfg["State"] != "Active" {
                return Err(format!("function did not become active: {cfg}"));
            }
            break;
        }
        if t0.elapsed() > BUILD_TIMEOUT {
            return Err("still building after 900 s".into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let active = t0.elapsed();
    let (_, restored) = invoke(&d.socket, &json!({"first": true}), true)?;
    let first = t0.elapsed();
    eprintln!(
        "[hostd bench] create {created:?}, active {active:?}, first answer {first:?} (restored: {restored:?})"
    );
    r.fresh = Some((first, active, first - active));
    Ok(())
}

/// Removes the working sets emberd saved beside the function's snapshots
/// (it records one again after the next clone's first answer).
fn drop_working_sets(d: &Emberd) {
    let snaps = d.dir.join("state/snapshots").join(FUNCTION);
    for v in std::fs::read_dir(snaps).into_iter().flatten().flatten() {
        let _ = std::fs::remove_file(v.path().join("working-set"));
    }
}

fn cold_restores(d: &Emberd, r: &mut Results) -> Result<(), String> {
    // Warm count 0 (the daemon default here) and idle TTL 0: each idle
    // instance is reclaimed within about a second. Every other restore
    // finds no working set beside the snapshot (removed just before); the
    // one in between prefetches the set its predecessor's answer recorded.
    let mut not_restored = 0;
    for i in 0..2 * RESTORE_N {
        let prefetch = i % 2 == 1;
        let t0 = Instant::now();
        loop {
            let (idle, busy, pending) = pool(&d.socket)?;
            if idle.is_empty()
                && busy == 0
                && pending == 0
                && t0.elapsed() > Duration::from_millis(1500)
            {
                break;
            }
            if t0.elapsed() > Duration::from_secs(60) {
                return Err(format!(
                    "instances not reclaimed: {} idle, {busy} busy",
                    idle.len()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if !prefetch {
            drop_working_sets(d);
        }
        let (lat, restored) = invoke(&d.socket, &json!({"restore": i}), true)?;
        if restored != Some(true) {
            not_restored += 1;
        } else if prefetch {
            r.restore.push(lat);
        } else {
            r.restore_cold.push(lat);
        }
    }
    if not_restored > 0 {
        r.lines.push(format!(
            "restore: {not_restored} of {} invocations were not restores (left out)",
            2 * RESTORE_N
        ));
    }
    Ok(())
}

fn warm(d: &Emberd, r: &mut Results) -> Result<(), String> {
    // Warm count 0, so the maintainer restores nothing in the background;
    // back to back, the one instance is idle only for the moment between
    // two requests, so the reclaimer (TTL 0, every second) rarely gets it.
    // Restores (the first, and any reclaim) are left out.
    let mut restored = 0;
    for i in 0..3 {
        invoke(&d.socket, &json!({"warmup": i}), false)?;
    }
    for i in 0..WARM_N + 10 {
        if r.warm.len() == WARM_N {
            break;
        }
        let (lat, rest) = invoke(&d.socket, &json!({"n": i, "s": "hello"}), true)?;
        if rest == Some(true) {
            restored += 1;
        } else {
            r.warm.push(lat);
        }
    }
    if restored > 0 {
        r.lines.push(format!(
            "warm: {restored} invocation(s) were restores (reclaimed between two requests), left out"
        ));
    }
    Ok(())
}

fn memory(d: &Emberd, label: &str, r: &mut Results) -> Result<(), String> {
    set_provisioned(&d.socket, MEM_INSTANCES as u32)?;
    let pids = wait_idle(&d.socket, MEM_INSTANCES, Duration::from_secs(400))?;
    std::thread::sleep(Duration::from_secs(2));
    let (mut rss, mut pss) = (0u64, 0u64);
    let mut per = Vec::new();
    for pid in &pids {
        let (r1, p1) = smaps_rollup(*pid).ok_or_else(|| format!("smaps_rollup of pid {pid}"))?;
        rss += r1;
        pss += p1;
        per.push(format!("{}/{}", r1 / 1024, p1 / 1024));
    }
    let n = pids.len().max(1) as u64;
    r.lines.push(format!(
        "memory per warm instance ({label}; n={}, 128 MiB functions): RSS {:.1} MiB, PSS {:.1} MiB; total PSS {:.1} MiB  [per VMM RSS/PSS MiB: {}]",
        pids.len(),
        rss as f64 / 1024.0 / n as f64,
        pss as f64 / 1024.0 / n as f64,
        pss as f64 / 1024.0,
        per.join(" ")
    ));
    Ok(())
}

fn throughput(d: &Emberd, r: &mut Results) -> Result<(), String> {
    r.lines.push(format!(
        "{:<12} {:>8} {:>11} {:>12} {:>12} {:>10} {:>9} {:>8} {:>7}",
        "concurrency",
        "invokes",
        "invokes/s",
        "p50",
        "p99",
        "instances",
        "restores",
        "warm-up",
        "errors"
    ));
    for &c in &LEVELS {
        match run_level(&d.socket, c) {
            Ok(line) => r.lines.push(line),
            Err(e) => r.lines.push(format!("{c:<12} FAILED: {e}")),
        }
    }
    Ok(())
}

/// `c` threads each invoking in sequence without pause. Warm-up: until
/// the pool holds `c` instances (restored on demand), then 2 s more; then
/// a window of LEVEL_SECS. The threads never stop in between, so the
/// instances stay busy and are not reclaimed (warm count 0, TTL 0).
fn run_level(sock: &Path, c: usize) -> Result<String, String> {
    type Sample = (Instant, Duration, bool);
    let samples = Arc::new(Mutex::new(Vec::<Sample>::new()));
    let err = Arc::new(Mutex::new(None::<String>));
    let errors = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let threads: Vec<_> = (0..c)
        .map(|t| {
            let (samples, err, stop, sock, errors) = (
                samples.clone(),
                err.clone(),
                stop.clone(),
                sock.to_path_buf(),
                errors.clone(),
            );
            std::thread::spawn(move || {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    match invoke(&sock, &json!({"t": t, "i": i}), true) {
                        Ok((l, rest)) => {
                            samples
                                .lock()
                                .unwrap()
                                .push((Instant::now(), l, rest == Some(true)))
                        }
                        Err(e) => {
                            // Counted, the first kept; the thread goes on.
                            errors.fetch_add(1, Ordering::Relaxed);
                            err.lock().unwrap().get_or_insert(e);
                            std::thread::sleep(Duration::from_millis(100));
                        }
                    }
                    i += 1;
                }
            })
        })
        .collect();
    let max_inst = AtomicUsize::new(0);
    let finish = |stop: &AtomicBool, threads: Vec<std::thread::JoinHandle<()>>| {
        stop.store(true, Ordering::Relaxed);
        for t in threads {
            let _ = t.join();
        }
    };
    // Warm-up.
    loop {
        let (idle, busy, pending) = pool(sock).unwrap_or_default();
        if idle.len() + busy >= c && pending == 0 {
            break;
        }
        if t0.elapsed() > Duration::from_secs(240) {
            finish(&stop, threads);
            return Err(format!(
                "warm-up: only {} instances after 240 s",
                idle.len() + busy
            ));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    std::thread::sleep(Duration::from_secs(2));
    let warmup = t0.elapsed();
    let w0 = Instant::now();
    while w0.elapsed() < Duration::from_secs(LEVEL_SECS) {
        if let Ok((idle, busy, pending)) = pool(sock) {
            max_inst.fetch_max(idle.len() + busy + pending as usize, Ordering::Relaxed);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let w1 = Instant::now();
    finish(&stop, threads);
    let first_error = err.lock().unwrap().take();
    let all = std::mem::take(&mut *samples.lock().unwrap());
    let inside: Vec<&Sample> = all.iter().filter(|s| s.0 >= w0 && s.0 < w1).collect();
    let lat: Vec<Duration> = inside.iter().map(|s| s.1).collect();
    let restores = inside.iter().filter(|s| s.2).count();
    let mut line = format!(
        "{:<12} {:>8} {:>11.2} {:>12} {:>12} {:>10} {:>9} {:>7.0}s {:>7}",
        c,
        lat.len(),
        lat.len() as f64 / (w1 - w0).as_secs_f64(),
        ms(percentile(&lat, 50.0)),
        ms(percentile(&lat, 99.0)),
        max_inst.load(Ordering::Relaxed),
        restores,
        warmup.as_secs_f64(),
        errors.load(Ordering::Relaxed)
    );
    if let Some(e) = first_error {
        let e: String = e.chars().take(300).collect();
        line.push_str(&format!(
            "\n{:<12} first error (warm-up or window): {e}",
            ""
        ));
    }
    Ok(line)
}

// ---------------------------------------------------------------- peer

struct Killer(Child);
impl Drop for Killer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A venv with awslambdaric for the host's /usr/bin/python3: from the
/// rootfs build's wheel cache, else from PyPI (pinned requirements).
fn venv_python() -> Result<PathBuf, String> {
    let cache = PathBuf::from(
        std::env::var_os("EMBER_CACHE_DIR").unwrap_or_else(|| "/var/cache/ember".into()),
    );
    let venv = cache.join("bench-venv");
    let py = venv.join("bin/python3");
    let ok = |py: &Path| {
        Command::new(py)
            .args(["-c", "import awslambdaric"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if py.is_file() && ok(&py) {
        return Ok(py);
    }
    let run = |cmd: &mut Command| -> Result<(), String> {
        let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{cmd:?}: {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
                    .lines()
                    .last()
                    .unwrap_or("")
            ))
        }
    };
    let host_py = if Path::new("/usr/bin/python3").is_file() {
        "/usr/bin/python3"
    } else {
        "python3"
    };
    run(Command::new(host_py).args(["-m", "venv"]).arg(&venv))?;
    let pip = venv.join("bin/pip");
    let wheels = cache.join("rootfs/wheels");
    let reqs = ember_tests::workspace_root().join("rootfs/python3-requirements.txt");
    let local = run(Command::new(&pip)
        .args([
            "install",
            "-q",
            "--disable-pip-version-check",
            "--no-index",
            "--find-links",
        ])
        .arg(&wheels)
        .arg("-r")
        .arg(&reqs));
    if let Err(e) = local {
        eprintln!("[hostd bench] venv from the wheel cache failed ({e}); trying PyPI");
        run(Command::new(&pip)
            .args(["install", "-q", "--disable-pip-version-check", "-r"])
            .arg(&reqs))?;
    }
    if !ok(&py) {
        return Err("awslambdaric still not importable in the venv".into());
    }
    Ok(py)
}

fn native_peer(code: &Path, r: &mut Results) -> Result<(), String> {
    let py = venv_python().map_err(|e| format!("skipped: pip/venv failed: {e}"))?;
    let dir = std::env::temp_dir().join(format!("ember-bench-native-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let sock = dir.join("agent.sock");
    let child = Command::new(workspace_bin("ember-agent"))
        .arg("--listen-unix")
        .arg(&sock)
        .arg("--runtime-api")
        .arg("127.0.0.1:0")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("agent.log")).map_err(|e| e.to_string())?)
        .spawn()
        .map_err(|e| format!("spawn ember-agent: {e}"))?;
    let _k = Killer(child);
    let t0 = Instant::now();
    let stream = loop {
        match UnixStream::connect(&sock) {
            Ok(s) => break s,
            Err(e) if t0.elapsed() > Duration::from_secs(10) => {
                return Err(format!("agent socket: {e}"))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    let mut client = ember_agent::AgentClient::from_stream(stream, Some(Duration::from_secs(60)))
        .map_err(|e| e.to_string())?;
    let mut env = BTreeMap::new();
    for (k, v) in [
        ("_HANDLER", "app.handler"),
        ("AWS_LAMBDA_FUNCTION_NAME", FUNCTION),
        ("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST"),
        ("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "128"),
        ("AWS_LAMBDA_LOG_GROUP_NAME", "/aws/lambda/echo"),
        ("AWS_LAMBDA_LOG_STREAM_NAME", "native"),
        ("AWS_REGION", "us-east-1"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
        ("AWS_EXECUTION_ENV", "AWS_Lambda_python3.11"),
        ("PYTHONUNBUFFERED", "1"),
        ("PYTHONDONTWRITEBYTECODE", "1"),
        ("LANG", "C.UTF-8"),
        ("TZ", ":UTC"),
        ("PATH", "/usr/local/bin:/usr/bin:/bin"),
        ("HOME", "/tmp"),
    ] {
        env.insert(k.to_string(), v.to_string());
    }
    env.insert("LAMBDA_TASK_ROOT".into(), code.display().to_string());
    let spec = ember_agent::RuntimeSpec {
        argv: vec![
            py.display().to_string(),
            "-m".into(),
            "awslambdaric".into(),
            "app.handler".into(),
        ],
        env,
        code_device: None,
        task_root: code.display().to_string(),
        uid: None,
        gid: None,
        init_timeout_ms: Some(60_000),
        network: None,
    };
    let t0 = Instant::now();
    match client.start_runtime(&spec).map_err(|e| e.to_string())? {
        Ok(ready) => eprintln!(
            "[hostd bench] native runtime ready in {:?} (init {} ms)",
            t0.elapsed(),
            ready.init_duration_ms
        ),
        Err(f) => {
            return Err(format!(
                "native init failed: {} {} {}",
                f.error_type,
                String::from_utf8_lossy(&f.payload),
                String::from_utf8_lossy(&f.log)
            ))
        }
    }
    for i in 0..(WARM_N + 3) {
        let payload = json!({"n": i, "s": "hello"});
        let req = ember_agent::InvokeRequest {
            request_id: format!("native-{i}"),
            payload: payload.to_string().into_bytes(),
            deadline_ms: (std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis()
                + 30_000) as u64,
            invoked_function_arn: "arn:aws:lambda:us-east-1:000000000000:function:echo".into(),
            trace_id: None,
            client_context: None,
            cognito_identity: None,
        };
        let t = Instant::now();
        let res = client.invoke(&req).map_err(|e| e.to_string())?;
        let lat = t.elapsed();
        if res.status != ember_agent::InvokeStatus::Success {
            return Err(format!(
                "native invoke: {:?} {}",
                res.status,
                String::from_utf8_lossy(&res.payload)
            ));
        }
        if i >= 3 {
            r.native.push(lat);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

// ----------------------------------------------------------------- main

fn main() {
    if !kvm_available() {
        println!("hostd bench: skipped: /dev/kvm is not usable");
        return;
    }
    let tmp = std::env::temp_dir().join(format!("ember-bench-hostd-{}", std::process::id()));
    let code = tmp.join("code");
    write_file(&code.join("app.py"), HANDLER_PY, 0o644);
    let mut r = Results::default();

    // The peer first: it needs no VM and fails fast if it can.
    part("native peer", &mut r, |r| native_peer(&code, r));

    let d = match catch_unwind(|| {
        Emberd::start(&[
            "--warm-instances",
            "0",
            "--idle-ttl-secs",
            "0",
            "--max-concurrency",
            "16",
        ])
    }) {
        Ok(d) => Some(d),
        Err(_) => {
            println!("emberd: FAILED to start (see above); only the peer ran");
            None
        }
    };
    let mut active = false;
    if let Some(d) = &d {
        part("fresh boot", &mut r, |r| {
            fresh_boot(d, &code, r)?;
            active = true;
            Ok(())
        });
        if active {
            part("restore on demand", &mut r, |r| cold_restores(d, r));
            part("warm invoke", &mut r, |r| warm(d, r));
            part("throughput", &mut r, |r| throughput(d, r));
            part("memory", &mut r, |r| {
                memory(d, "idle, restored for provisioned concurrency 5", r)
            });
        }
    }

    let nested = Path::new("/sys/module/kvm_pvm").exists();
    println!();
    println!(
        "== emberd invoke benchmark (python3.11 handler returning its event, 128 MiB; {} KVM) ==",
        if nested { "nested (kvm_pvm)" } else { "native" }
    );
    println!("-- invoke latency, client-side over the unix socket --");
    if !r.warm.is_empty() {
        println!("{:<34} {}", "warm (reused idle instance)", stats(&r.warm));
    }
    if !r.restore.is_empty() {
        println!(
            "{:<34} {}",
            "restored on demand, prefetched",
            stats(&r.restore)
        );
    }
    if !r.restore_cold.is_empty() {
        println!(
            "{:<34} {}",
            "restored on demand, no prefetch",
            stats(&r.restore_cold)
        );
    }
    if let Some((first, active, after)) = r.fresh {
        println!(
            "{:<34} n=1    CreateFunction->first answer {:.1} s (boot+init+snapshot {:.1} s, then restore+invoke {})",
            "fresh boot",
            first.as_secs_f64(),
            active.as_secs_f64(),
            ms(after)
        );
        if nested {
            println!("{:<34} (nested KVM: the guest boot dominates; a bare-metal host boots in well under 1 s)", "");
        }
    }
    let p = |v: &Vec<Duration>| percentile(v, 50.0).as_secs_f64();
    if !r.warm.is_empty() && !r.restore.is_empty() {
        println!(
            "ratio p50 restored/warm: {:.1}x",
            p(&r.restore) / p(&r.warm)
        );
    }
    if !r.restore.is_empty() && !r.restore_cold.is_empty() {
        println!(
            "ratio p50 prefetched/no prefetch: {:.2}x",
            p(&r.restore) / p(&r.restore_cold)
        );
    }
    if let Some((first, _, _)) = r.fresh {
        if !r.warm.is_empty() {
            println!(
                "ratio fresh boot/warm p50: {:.0}x",
                first.as_secs_f64() / p(&r.warm)
            );
        }
        if !r.restore.is_empty() {
            println!(
                "ratio fresh boot/restored p50: {:.1}x",
                first.as_secs_f64() / p(&r.restore)
            );
        }
    }
    println!("-- peer: awslambdaric natively on the host via ember-agent --listen-unix (no VM, no emberd) --");
    if !r.native.is_empty() {
        println!("{:<34} {}", "native warm invoke", stats(&r.native));
        if !r.warm.is_empty() {
            println!(
                "warm p50 in-VM (via emberd) / native: {:.1}x ({} vs {})",
                p(&r.warm) / p(&r.native),
                ms(percentile(&r.warm, 50.0)),
                ms(percentile(&r.native, 50.0))
            );
        }
    }
    println!(
        "-- throughput (--max-concurrency 16, warm count 0: instances restored on demand during warm-up; \
         {LEVEL_SECS} s window), memory, notes --"
    );
    for l in &r.lines {
        println!("{l}");
    }
    drop(d);
    let _ = std::fs::remove_dir_all(&tmp);
}
