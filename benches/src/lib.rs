//! Measurement helpers shared by Ember's benchmarks.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ember_tests::artifacts::workspace_bin;

use serde_json::Value;

/// The p-th percentile (0-100) of `samples`, nearest-rank.
pub fn percentile(samples: &[Duration], p: f64) -> Duration {
    if samples.is_empty() {
        return Duration::ZERO;
    }
    let mut s = samples.to_vec();
    s.sort();
    let rank = ((p / 100.0) * s.len() as f64).ceil() as usize;
    s[rank.clamp(1, s.len()) - 1]
}

/// CPU time of a process so far, summed over its threads, in nanoseconds
/// of run time (from /proc/<pid>/task/*/schedstat: tick-free resolution).
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let mut ns: u64 = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let path = task.ok()?.path().join("schedstat");
        let text = std::fs::read_to_string(path).unwrap_or_default();
        ns += text
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    }
    Some(Duration::from_nanos(ns))
}

/// Resident memory of a process in KiB: (all mappings, guest memory).
/// Guest memory is the anonymous mapping of exactly `guest_bytes` (named
/// `[anon:ember-guest-memory]` where the host kernel supports VMA names),
/// or the mapping of a snapshot's memory file of that size.
pub fn rss_split(pid: u32, guest_bytes: u64) -> Option<(u64, u64)> {
    smaps_split(pid, guest_bytes, "Rss:")
}

/// The VMM's own anonymous memory in KiB (heap, stacks, buffers): what each
/// VMM costs beyond guest memory, where its code pages are shared with
/// every other VMM on the host.
pub fn own_anonymous(pid: u32, guest_bytes: u64) -> Option<u64> {
    smaps_split(pid, guest_bytes, "Anonymous:").map(|(all, guest)| all - guest)
}

/// Sums smaps field `field` (in KiB) over (all mappings, guest memory).
fn smaps_split(pid: u32, guest_bytes: u64, field: &str) -> Option<(u64, u64)> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let mut total = 0;
    let mut guest = 0;
    let mut cur_is_guest = false;
    for line in smaps.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let Some(first) = fields.first() else {
            continue;
        };
        if let Some((a, b)) = first.split_once('-').filter(|_| !first.ends_with(':')) {
            // "start-end perms offset dev inode [path]"
            let len = u64::from_str_radix(b, 16).ok()? - u64::from_str_radix(a, 16).ok()?;
            let path = fields.get(5).copied().unwrap_or("");
            // A restore's File backend maps the memory file instead.
            cur_is_guest = len == guest_bytes
                && (path.is_empty()
                    || path == "[anon:ember-guest-memory]"
                    || path.starts_with('/'));
        } else if *first == field {
            let kib: u64 = fields.get(1)?.parse().ok()?;
            total += kib;
            if cur_is_guest {
                guest += kib;
            }
        }
    }
    Some((total, guest))
}

/// (Rss, Pss) of a process in KiB, from /proc/<pid>/smaps_rollup.
pub fn smaps_rollup(pid: u32) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some((field("Rss:")?, field("Pss:")?))
}

/// A child process, killed and reaped when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits (10 s at most) for `p` to exist.
pub fn wait_for(p: &Path) -> Result<(), String> {
    let start = Instant::now();
    while !p.exists() {
        if start.elapsed() > Duration::from_secs(10) {
            return Err(format!("{} never appeared", p.display()));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// An `ember-volumed` with its API and NBD on unix sockets in `dir` and
/// one volume, `bench`, of `size` bytes, attached: the process, the NBD
/// socket and the volume's export name.
pub fn volumed_with_volume(dir: &Path, size: u64) -> Result<(Proc, PathBuf, String), String> {
    let api = dir.join("volumed-api.sock");
    let sock = dir.join("volumed-nbd.sock");
    let child = Command::new(workspace_bin("ember-volumed"))
        .arg("--data-dir")
        .arg(dir.join("volumes"))
        .arg("--api-socket")
        .arg(&api)
        .arg("--nbd-socket")
        .arg(&sock)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("ember-volumed: {e}"))?;
    let p = Proc(child);
    wait_for(&api)?;
    wait_for(&sock)?;
    let call = |method: &str, path: &str, body: &str| -> Result<String, String> {
        let o = Command::new("curl")
            .args(["-sS", "-f", "-X", method, "--unix-socket"])
            .arg(&api)
            .args(["-d", body])
            .arg(format!("http://v{path}"))
            .output()
            .map_err(|e| e.to_string())?;
        if o.status.success() {
            Ok(String::from_utf8_lossy(&o.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&o.stderr).into_owned())
        }
    };
    call(
        "POST",
        "/v1/volumes",
        &format!(r#"{{"Name":"bench","SizeBytes":{size}}}"#),
    )?;
    let g = call("POST", "/v1/volumes/bench/attach", r#"{"Host":"bench"}"#)?;
    let g: Value = serde_json::from_str(&g).map_err(|e| e.to_string())?;
    let export = g["ExportName"].as_str().unwrap_or_default().to_string();
    Ok((p, sock, export))
}

/// An HTTP answer: status, headers (lower-case names), body.
pub struct Resp {
    pub status: u16,
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One HTTP/1.1 request (`Connection: close`) on a fresh connection `s`
/// (TCP or unix), read to its end: a raw client, so that no client
/// process start or library of note is measured.
pub fn http_exchange<S: Read + Write>(
    mut s: S,
    host: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<Resp, String> {
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !body.is_empty() {
        req.push_str("Content-Type: application/json\r\n");
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    let mut buf = req.into_bytes();
    buf.extend_from_slice(body);
    s.write_all(&buf).map_err(|e| format!("write: {e}"))?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).map_err(|e| format!("read: {e}"))?;
    let end = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("no header end in {:?}", String::from_utf8_lossy(&out)))?;
    let head = String::from_utf8_lossy(&out[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("bad status line in {head:?}"))?;
    let mut hdrs = BTreeMap::new();
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            hdrs.insert(k.trim().to_lowercase(), v.trim().to_string());
        }
    }
    let mut body = out[end + 4..].to_vec();
    if hdrs
        .get("transfer-encoding")
        .is_some_and(|t| t.contains("chunked"))
    {
        body = dechunk(&body);
    }
    Ok(Resp {
        status,
        headers: hdrs,
        body,
    })
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(i) = b.windows(2).position(|w| w == b"\r\n") {
        let n = usize::from_str_radix(
            String::from_utf8_lossy(&b[..i])
                .split(';')
                .next()
                .unwrap_or("")
                .trim(),
            16,
        )
        .unwrap_or(0);
        if n == 0 || b.len() < i + 2 + n {
            break;
        }
        out.extend_from_slice(&b[i + 2..i + 2 + n]);
        b = &b[(i + 4 + n).min(b.len())..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let s: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&s, 50.0), Duration::from_millis(50));
        assert_eq!(percentile(&s, 99.0), Duration::from_millis(99));
        assert_eq!(percentile(&[], 50.0), Duration::ZERO);
    }

    #[test]
    fn own_process_stats() {
        let me = std::process::id();
        assert!(cpu_time(me).is_some());
        let (total, guest) = rss_split(me, 12345 * 4096).unwrap();
        assert!(total > 0);
        assert_eq!(guest, 0);
        let (rss, pss) = smaps_rollup(me).unwrap();
        assert!(rss > 0 && pss > 0 && pss <= rss);
    }
}
