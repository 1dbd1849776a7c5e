//! An `emberd` child process (jailed VMMs when run as root) with its own
//! state and run directories, driven over its unix socket with curl.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::artifacts::{kernel_path, runtime_rootfs_path, workspace_bin};

pub struct Emberd {
    child: Option<Child>,
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub log: PathBuf,
    extra: Vec<String>,
    /// The network namespace emberd runs in (as root), so that its
    /// instances' links and routes stay out of the machine's own.
    pub netns: Option<String>,
}

/// A service address the test's host side answers on in emberd's
/// namespace (on `lo`), for guest → host connections.
pub const HOST_SERVICE_IP: &str = "198.51.100.1";

/// An HTTP answer: status, headers (lower-case names), body.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "reply is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(&name.to_lowercase()).map(String::as_str)
    }

    /// The base64 `X-Amz-Log-Result`, decoded.
    pub fn log_tail(&self) -> String {
        use std::io::Read;
        let Some(b64) = self.header("x-amz-log-result") else {
            return String::new();
        };
        let mut child = Command::new("base64")
            .arg("-d")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("base64");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(b64.as_bytes())
            .expect("write");
        let mut out = String::new();
        child
            .stdout
            .take()
            .expect("stdout")
            .read_to_string(&mut out)
            .expect("read");
        let _ = child.wait();
        out
    }
}

impl Emberd {
    /// Starts emberd in a fresh directory with both runtimes. Jailed when
    /// run as root, else `--no-jail`.
    pub fn start(extra: &[&str]) -> Emberd {
        Emberd::start_with(extra, |_| {})
    }

    /// Like [`start`](Self::start); `setup` runs with the name of emberd's
    /// network namespace (as root) before emberd starts in it, e.g. to link
    /// it to the machine's namespace.
    pub fn start_with(extra: &[&str], setup: impl FnOnce(&str)) -> Emberd {
        Emberd::start_prepared(extra, |_| {}, setup)
    }

    /// Like [`start_with`](Self::start_with); `prepare` first runs with
    /// emberd's directory (its state is `state/`, its run directory
    /// `run/`), e.g. to leave what a crashed run would have left there.
    pub fn start_prepared(
        extra: &[&str],
        prepare: impl FnOnce(&Path),
        setup: impl FnOnce(&str),
    ) -> Emberd {
        let dir = tempfile::Builder::new()
            .prefix("emberd-test-")
            .tempdir()
            .expect("tempdir")
            .keep();
        prepare(&dir);
        let mut d = Emberd {
            child: None,
            socket: dir.join("emberd.sock"),
            log: dir.join("emberd.log"),
            dir,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            netns: None,
        };
        // Without instance networking there is nothing to keep apart.
        if nix_is_root() && !extra.contains(&"--no-network") {
            let name = format!("ember-test-{}", std::process::id() ^ rand_u32());
            let ok = |args: &[&str]| {
                Command::new("ip")
                    .args(args)
                    .status()
                    .map(|s| s.success())
                    .unwrap_or(false)
            };
            assert!(ok(&["netns", "add", &name]), "ip netns add {name}");
            d.netns = Some(name.clone());
            assert!(ok(&["-n", &name, "link", "set", "lo", "up"]));
            assert!(ok(&[
                "-n",
                &name,
                "addr",
                "add",
                &format!("{HOST_SERVICE_IP}/32"),
                "dev",
                "lo"
            ]));
            setup(&name);
        }
        d.spawn();
        d
    }

    /// Runs `f` on a thread inside emberd's network namespace (or here,
    /// when it has none): sockets it makes are on emberd's side.
    pub fn in_netns<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        match &self.netns {
            Some(ns) => crate::in_named_netns(ns, f),
            None => f(),
        }
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log");
        let mut cmd = Command::new(workspace_bin("emberd"));
        cmd.arg("--socket")
            .arg(&self.socket)
            .arg("--state-dir")
            .arg(self.dir.join("state"))
            .arg("--run-dir")
            .arg(self.dir.join("run"))
            .arg("--kernel")
            .arg(kernel_path())
            .arg("--rootfs-provided")
            .arg(runtime_rootfs_path("provided"))
            .arg("--rootfs-python3")
            .arg(runtime_rootfs_path("python3"))
            .arg("--vmm-bin")
            .arg(workspace_bin("ember-vmm"))
            .args(&self.extra);
        // Node.js only when asked for (the test that uses it passes it) or
        // built already: building its image is not every test's business.
        if !self.extra.iter().any(|a| a == "--rootfs-nodejs") {
            if let Some(p) = std::env::var_os("EMBER_ROOTFS_NODEJS") {
                cmd.arg("--rootfs-nodejs").arg(p);
            }
        }
        if nix_is_root() {
            cmd.arg("--jailer-bin").arg(workspace_bin("ember-jailer"));
        } else {
            cmd.arg("--no-jail");
            if !self.extra.iter().any(|a| a == "--no-network") {
                cmd.arg("--no-network");
            }
        }
        let ns_file = self
            .netns
            .as_ref()
            .map(|ns| std::fs::File::open(format!("/run/netns/{ns}")).expect("netns"));
        if let Some(f) = &ns_file {
            let fd = std::os::fd::AsRawFd::as_raw_fd(f);
            // SAFETY: runs in the child before exec; setns is
            // async-signal-safe and the fd stays open until after spawn.
            unsafe {
                std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                    if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn emberd");
        drop(ns_file);
        self.child = Some(child);
        let start = Instant::now();
        while !self.socket.exists() {
            if let Some(Some(st)) = self.child.as_mut().map(|c| c.try_wait().ok().flatten()) {
                panic!("emberd exited ({st}); log:\n{}", self.logs());
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "emberd did not listen; log:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends SIGTERM and waits up to `within` for emberd to exit: how long
    /// it took, or None (then it is killed).
    pub fn terminate(&mut self, within: Duration) -> Option<Duration> {
        let mut c = self.child.take()?;
        // SAFETY: kill on the pid of our own child, not yet reaped.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let start = Instant::now();
        while start.elapsed() < within {
            if let Ok(Some(_)) = c.try_wait() {
                return Some(start.elapsed());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        let _ = c.wait();
        None
    }

    /// emberd's descendants now (its jailers and VMMs): pid and command.
    pub fn descendants(&self) -> Vec<(i32, String)> {
        let mut parent = BTreeMap::new();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            // `pid (comm) state ppid ...`; comm may hold spaces.
            let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<i32>().ok());
            if let Some(ppid) = ppid {
                parent.insert(pid, ppid);
            }
        }
        let root = self.pid() as i32;
        let mut out = vec![];
        for &pid in parent.keys() {
            let mut p = pid;
            while let Some(&pp) = parent.get(&p) {
                if pp == root {
                    let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                    out.push((pid, String::from_utf8_lossy(&cmd).replace('\0', " ")));
                    break;
                }
                if pp <= 1 {
                    break;
                }
                p = pp;
            }
        }
        out
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Stops emberd with SIGTERM and starts it again on the same state.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status();
            let start = Instant::now();
            loop {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                if start.elapsed() > Duration::from_secs(30) {
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = std::fs::remove_file(&self.socket);
        }
    }

    /// emberd's directory (`state/`, `run/`, its log).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// One request with curl; headers as (name, value).
    pub fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Reply {
        let hdr_file = tempfile::NamedTempFile::new().expect("tmp");
        let body_file = tempfile::NamedTempFile::new().expect("tmp");
        let mut cmd = Command::new("curl");
        cmd.arg("-sS")
            .arg("--max-time")
            .arg("900")
            .arg("--unix-socket")
            .arg(&self.socket)
            .arg("-X")
            .arg(method)
            .arg("-D")
            .arg(hdr_file.path())
            .arg("-o")
            .arg(body_file.path())
            .arg("-w")
            .arg("%{http_code}");
        for (k, v) in headers {
            cmd.arg("-H").arg(format!("{k}: {v}"));
        }
        let mut input = None;
        if let Some(b) = body {
            let f = tempfile::NamedTempFile::new().expect("tmp");
            std::fs::write(f.path(), b).expect("write body");
            cmd.arg("-H")
                .arg("Content-Type: application/json")
                .arg("--data-binary")
                .arg(format!("@{}", f.path().display()));
            input = Some(f);
        }
        cmd.arg(format!("http://localhost{path}"));
        let out = cmd.output().expect("curl");
        drop(input);
        let code = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let status: u16 = code.parse().unwrap_or_else(|_| {
            panic!(
                "{method} {path}: curl failed: {}; emberd log:\n{}",
                String::from_utf8_lossy(&out.stderr),
                self.logs()
            )
        });
        let mut headers = BTreeMap::new();
        for line in std::fs::read_to_string(hdr_file.path())
            .unwrap_or_default()
            .lines()
        {
            if let Some((k, v)) = line.split_once(':') {
                headers.insert(k.trim().to_lowercase(), v.trim().to_string());
            }
        }
        Reply {
            status,
            headers,
            body: std::fs::read(body_file.path()).unwrap_or_default(),
        }
    }

    pub fn get(&self, path: &str) -> Reply {
        self.request("GET", path, &[], None)
    }

    pub fn post_json(&self, path: &str, body: &serde_json::Value) -> Reply {
        self.request("POST", path, &[], Some(body.to_string().as_bytes()))
    }

    /// CreateFunction with the code in `dir` zipped; panics unless 201.
    pub fn create_function(
        &self,
        name: &str,
        runtime: &str,
        handler: &str,
        code_dir: &Path,
        timeout: u32,
        env: &[(&str, &str)],
    ) -> serde_json::Value {
        let zip = zip_dir(code_dir);
        let vars: serde_json::Map<String, serde_json::Value> = env
            .iter()
            .map(|(k, v)| (k.to_string(), serde_json::json!(v)))
            .collect();
        let r = self.post_json(
            "/2015-03-31/functions",
            &serde_json::json!({
                "FunctionName": name, "Runtime": runtime, "Handler": handler,
                "Code": {"ZipFile": zip}, "Timeout": timeout, "MemorySize": 128,
                "Environment": {"Variables": vars},
            }),
        );
        assert_eq!(r.status, 201, "create {name}: {}", r.text());
        r.json()
    }

    /// Waits until `name`:`qualifier` is no longer being built; panics if
    /// it failed.
    pub fn wait_active(&self, name: &str, qualifier: &str, timeout: Duration) -> serde_json::Value {
        let start = Instant::now();
        loop {
            let r = self.get(&format!(
                "/2015-03-31/functions/{name}/configuration?Qualifier={}",
                qualifier.replace('$', "%24")
            ));
            assert_eq!(r.status, 200, "{}", r.text());
            let cfg = r.json();
            if cfg["LastUpdateStatus"] != "InProgress" {
                assert_eq!(
                    cfg["State"],
                    "Active",
                    "{name}:{qualifier} did not become active: {cfg}; log:\n{}",
                    self.logs()
                );
                return cfg;
            }
            assert!(
                start.elapsed() < timeout,
                "{name}:{qualifier} still building after {timeout:?}; log:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// A synchronous invoke with the log tail.
    pub fn invoke(&self, name: &str, payload: &serde_json::Value) -> Reply {
        self.request(
            "POST",
            &format!("/2015-03-31/functions/{name}/invocations"),
            &[("X-Amz-Log-Type", "Tail")],
            Some(payload.to_string().as_bytes()),
        )
    }

    pub fn pools(&self) -> serde_json::Value {
        self.get("/ember/v1/pools").json()
    }
}

impl Drop for Emberd {
    fn drop(&mut self) {
        self.stop();
        if let Some(ns) = &self.netns {
            let _ = Command::new("ip").args(["netns", "delete", ns]).status();
        }
        if std::thread::panicking() {
            eprintln!("emberd state kept in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn rand_u32() -> u32 {
    let mut b = [0u8; 4];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut b);
    }
    u32::from_ne_bytes(b)
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Base64 of a zip of `dir` (with `zip -r`, keeping modes).
pub fn zip_dir(dir: &Path) -> String {
    let tmp = tempfile::tempdir().expect("tmp");
    let zip = tmp.path().join("code.zip");
    let st = Command::new("python3")
        .arg("-c")
        .arg(
            "import os,sys,zipfile\n\
             src,out=sys.argv[1],sys.argv[2]\n\
             z=zipfile.ZipFile(out,'w',zipfile.ZIP_DEFLATED)\n\
             for root,_,files in os.walk(src):\n\
             \x20 for f in sorted(files):\n\
             \x20   p=os.path.join(root,f); i=zipfile.ZipInfo(os.path.relpath(p,src))\n\
             \x20   i.external_attr=(os.stat(p).st_mode&0o7777)<<16; i.compress_type=zipfile.ZIP_DEFLATED\n\
             \x20   z.writestr(i,open(p,'rb').read())\n\
             z.close()\n",
        )
        .arg(dir)
        .arg(&zip)
        .status()
        .expect("python3 zip");
    assert!(st.success());
    let out = Command::new("base64")
        .arg("-w0")
        .arg(&zip)
        .output()
        .expect("base64");
    String::from_utf8(out.stdout).expect("utf8")
}

/// A `provided` function's `bootstrap` in AWS's custom-runtime pattern:
/// bash and curl against the Runtime API. It answers
/// `{"tag", "version", "event"}`, or a function error when the event
/// contains "fail".
pub fn provided_bootstrap(tag: &str) -> String {
    format!(
        r#"#!/bin/bash
set -uo pipefail
API="http://${{AWS_LAMBDA_RUNTIME_API}}/2018-06-01/runtime"
echo "bootstrap {tag} initialising"
while true; do
  EVENT=$(curl -sS -D /tmp/headers "$API/invocation/next")
  ID=""
  while IFS=: read -r k v; do
    if [[ "${{k,,}}" == "lambda-runtime-aws-request-id" ]]; then ID="${{v//[[:space:]]/}}"; fi
  done < /tmp/headers
  echo "handling $ID"
  if [[ "$EVENT" == *fail* ]]; then
    curl -sS -o /dev/null -H "Lambda-Runtime-Function-Error-Type: Custom.Failure" \
      -d '{{"errorMessage":"bootstrap asked to fail","errorType":"Custom.Failure"}}' "$API/invocation/$ID/error"
  else
    curl -sS -o /dev/null -d "{{\"tag\":\"{tag}\",\"version\":\"$AWS_LAMBDA_FUNCTION_VERSION\",\"event\":$EVENT}}" "$API/invocation/$ID/response"
  fi
done
"#
    )
}

/// The same function in bash alone: HTTP to the Runtime API over bash's
/// `/dev/tcp`, no process per request. On nested KVM, where every guest
/// syscall is slow, an invocation takes a fraction of the curl version's
/// time (curl's start-up alone is thousands of syscalls).
pub fn provided_bootstrap_bash(tag: &str) -> String {
    BASH_BOOTSTRAP.replace("@TAG@", tag)
}

const BASH_BOOTSTRAP: &str = r#"#!/bin/bash
export LC_ALL=C
HP="$AWS_LAMBDA_RUNTIME_API"
API=/2018-06-01/runtime
echo "bootstrap @TAG@ initialising"
# call METHOD PATH BODY [HEADER]: the answer's request id in RID, body in BODY.
call() {
  exec 3<>"/dev/tcp/${HP%:*}/${HP##*:}" || return 1
  local hdr="" line len=0
  [[ -n "${4:-}" ]] && hdr="$4"$'\r\n'
  printf '%s %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\nContent-Length: %s\r\n%s\r\n%s' \
    "$1" "$2" "$HP" "${#3}" "$hdr" "$3" >&3
  RID=""
  IFS= read -r line <&3
  while IFS= read -r line <&3; do
    line=${line%$'\r'}
    [[ -z "$line" ]] && break
    case "${line,,}" in
      content-length:*) len="${line#*:}"; len="${len//[[:space:]]/}" ;;
      lambda-runtime-aws-request-id:*) RID="${line#*:}"; RID="${RID//[[:space:]]/}" ;;
    esac
  done
  BODY=""
  if (( len > 0 )); then IFS= read -r -N "$len" BODY <&3; fi
  exec 3<&-
}
while true; do
  call GET "$API/invocation/next" "" || { sleep 1; continue; }
  [[ -n "$RID" ]] || { sleep 1; continue; }
  ID="$RID"; EVENT="$BODY"
  echo "handling $ID"
  if [[ "$EVENT" == *fail* ]]; then
    call POST "$API/invocation/$ID/error" '{"errorMessage":"bootstrap asked to fail","errorType":"Custom.Failure"}' \
      "Lambda-Runtime-Function-Error-Type: Custom.Failure"
  else
    call POST "$API/invocation/$ID/response" \
      "{\"tag\":\"@TAG@\",\"version\":\"$AWS_LAMBDA_FUNCTION_VERSION\",\"event\":$EVENT}"
  fi
done
"#;

/// [`provided_bootstrap_bash`] that also counts its invocations in the
/// runtime's memory (`"count"` in the answer: 1, 2, ... per instance) and
/// sleeps for `{"sleep": N}`: a warm instance's state, made visible.
pub fn provided_bootstrap_counting(tag: &str) -> String {
    provided_bootstrap_bash(tag)
        .replace(
            r#""{\"tag\":"#,
            r#""{\"count\":$((++N)),\"tag\":"#,
        )
        .replace(
            r#"  echo "handling $ID""#,
            "  echo \"handling $ID\"\n  if [[ \"$EVENT\" =~ \\\"sleep\\\":([0-9]+) ]]; then sleep \"${BASH_REMATCH[1]}\"; fi",
        )
}

/// [`provided_bootstrap_counting`] that also appends a line per
/// invocation to `FILE` (on a volume or the `/tmp` disk) and answers the
/// file's line count as `"lines"` (0 while `FILE` cannot be written), and
/// the filesystem type of `/tmp` as `"tmp_fs"`.
pub fn provided_bootstrap_counting_into(tag: &str, file: &str) -> String {
    provided_bootstrap_counting(tag)
        .replace(
            "  echo \"handling $ID\"\n",
            &format!(
                "  echo \"handling $ID\"\n  F=0; if echo \"$ID\" >> '{file}'; then mapfile -t L < '{file}'; F=${{#L[@]}}; fi\n  TFS=; while read -r _ m t _; do [[ $m == /tmp ]] && TFS=$t; done < /proc/mounts\n"
            ),
        )
        .replace(
            r#""{\"count\":"#,
            r#""{\"tmp_fs\":\"$TFS\",\"lines\":$F,\"count\":"#,
        )
}

pub fn write_file(path: &Path, content: &str, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p).expect("mkdir");
    }
    std::fs::write(path, content).expect("write");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}
