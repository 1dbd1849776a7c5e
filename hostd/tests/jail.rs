//! The real `ember-jailer`, as root: busybox in a jail (identity, mounts,
//! writable and read-only paths, cgroup limits, cleanup), cleanup's
//! refusals, and `ember-vmm` jailed, answering its API and booting a guest
//! to the agent. Skipped when not run as root.

use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use ember_hostd::jail::{self, cgroup, Bind, Device, JailSpec, Step};

const UID: u32 = 12345;
const GID: u32 = 12345;

fn jailer() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ember-jailer"))
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

macro_rules! require_root {
    () => {
        if !is_root() {
            eprintln!("skipped: the jailer tests need root");
            return;
        }
    };
}

fn unique_id(tag: &str) -> String {
    format!("it-{tag}-{}", std::process::id())
}

fn base_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("ember-jail-test-")
        .tempdir_in("/tmp")
        .unwrap()
}

fn run(spec: &JailSpec) -> Output {
    spec.command(&jailer())
        .stdin(Stdio::null())
        .output()
        .expect("spawn ember-jailer")
}

/// Stops a jailer as hostd does: SIGTERM, which kills its program; it
/// exits once it has reaped the program.
fn stop(child: &mut Child) -> std::process::ExitStatus {
    // SAFETY: kill(2) on our own child, not yet reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    child.wait().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The jail's cgroup files hold the limits.
fn assert_cgroup_limits(id: &str, memory: u64, quota: u64) {
    let layout = cgroup::detect().unwrap().expect("a cgroup filesystem");
    let read = |p: PathBuf| {
        std::fs::read_to_string(&p)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
            .trim()
            .to_string()
    };
    match &layout {
        cgroup::Layout::V2 { mount } => {
            let dir = mount.join("ember").join(id);
            assert_eq!(read(dir.join("memory.max")), memory.to_string());
            assert_eq!(read(dir.join("cpu.max")), format!("{quota} 100000"));
        }
        cgroup::Layout::V1 { memory: m, cpu, .. } => {
            let m = m.as_ref().unwrap().join("ember").join(id);
            assert_eq!(read(m.join("memory.limit_in_bytes")), memory.to_string());
            let c = cpu.as_ref().unwrap().join("ember").join(id);
            assert_eq!(read(c.join("cpu.cfs_quota_us")), quota.to_string());
            assert_eq!(read(c.join("cpu.cfs_period_us")), "100000");
        }
    }
}

fn assert_cgroup_gone(id: &str) {
    if let Some(layout) = cgroup::detect().unwrap() {
        for d in layout.dirs(id) {
            assert!(!d.exists(), "{} still exists", d.display());
        }
    }
}

#[test]
fn busybox_in_a_jail() {
    require_root!();
    let base = base_dir();
    let host = tempfile::tempdir().unwrap();
    let ro_dir = host.path().join("ro");
    let rw_dir = host.path().join("rw");
    std::fs::create_dir(&ro_dir).unwrap();
    std::fs::create_dir(&rw_dir).unwrap();
    std::fs::set_permissions(&ro_dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    std::fs::set_permissions(&rw_dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    std::fs::write(ro_dir.join("hello.txt"), "hello\n").unwrap();
    let ro_file = host.path().join("file.txt");
    std::fs::write(&ro_file, "a file\n").unwrap();
    std::fs::set_permissions(&ro_file, std::fs::Permissions::from_mode(0o666)).unwrap();

    let id = unique_id("busybox");
    let mut spec = JailSpec::new(&id, "/bin/busybox", UID, GID);
    spec.chroot_base = base.path().to_path_buf();
    spec.binds = vec![
        Bind::read_only(&ro_dir, "/data"),
        Bind::read_only(&ro_file, "/etc/file.txt"),
        Bind::read_write(&rw_dir, "/rw"),
    ];
    spec.dirs = vec!["/run".into(), "/out".into()];
    spec.devices = vec![Device::Tun, Device::Userfaultfd];
    spec.proc = true;
    spec.memory_limit = Some(256 << 20);
    spec.cpus = Some(0.5);
    let script = r#"
        echo "ID $(id)"
        echo "PID $$ HOST $(hostname)"
        echo "LS" $(ls /)
        echo "DEV" $(ls /dev /dev/net)
        grep -E '^(Uid|CapEff|CapPrm|NoNewPrivs):' /proc/self/status
        echo "PROC" $(ls /proc)
        cat /data/hello.txt /etc/file.txt
        echo x > /data/hello.txt && echo RO-DIR-WRITTEN || echo RO-DIR-REFUSED
        echo x > /etc/file.txt && echo RO-FILE-WRITTEN || echo RO-FILE-REFUSED
        echo x > /newfile && echo ROOT-WRITTEN || echo ROOT-REFUSED
        echo y > /out/f && echo DIR-WRITTEN
        echo z > /rw/new.txt && echo RW-WRITTEN
        cat /dev/kvm 2>&1 | head -c 0; test -r /dev/kvm -a -w /dev/kvm && echo KVM-RW
        echo "FDS" $(ls /proc/self/fd)
        true
    "#;
    spec.args = vec!["sh".into(), "-c".into(), script.into()];
    let out = run(&spec);
    let text = stdout(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?}\n{text}\n{err}", out.status);
    eprintln!("{text}");

    assert!(text.contains(&format!("ID uid={UID} gid={GID}")), "{text}");
    // PID 1 of its own PID namespace, with the jail id as host name.
    assert!(text.contains(&format!("PID 1 HOST {id}")), "{text}");
    // Nothing but what the spec asked for.
    assert!(
        text.contains("LS busybox data dev etc out proc run rw"),
        "{text}"
    );
    assert!(
        text.contains("DEV /dev: kvm net null urandom userfaultfd /dev/net: tun"),
        "{text}"
    );
    assert!(text.contains(&format!("Uid:\t{UID}\t{UID}\t{UID}\t{UID}")));
    assert!(text.contains("CapEff:\t0000000000000000"), "{text}");
    assert!(text.contains("CapPrm:\t0000000000000000"), "{text}");
    assert!(text.contains("NoNewPrivs:\t1"), "{text}");
    // Only the jail's own processes (sh as PID 1, ls) and no /proc/sys & co.
    let procs: Vec<&str> = text
        .lines()
        .find_map(|l| l.strip_prefix("PROC "))
        .unwrap()
        .split_whitespace()
        .collect();
    assert!(procs.contains(&"self"), "{procs:?}");
    assert!(!procs.contains(&"sys") && procs.contains(&"1"), "{procs:?}");
    assert!(
        procs
            .iter()
            .filter_map(|p| p.parse::<u32>().ok())
            .all(|p| p < 10),
        "{procs:?}"
    );
    assert!(procs.len() <= 6, "{procs:?}");
    assert!(text.contains("hello\na file\n"), "{text}");
    for want in [
        "RO-DIR-REFUSED",
        "RO-FILE-REFUSED",
        "ROOT-REFUSED",
        "DIR-WRITTEN",
        "RW-WRITTEN",
        "KVM-RW",
    ] {
        assert!(text.contains(want), "{want} missing: {text}");
    }
    // The jailer's own descriptors did not leak (ls holds one for /proc/self/fd).
    let fds = text.lines().find_map(|l| l.strip_prefix("FDS ")).unwrap();
    assert!(fds.split_whitespace().count() <= 4, "fds: {fds}");

    // As seen from the host.
    let root = spec.root();
    assert_eq!(root, base.path().join(&id).join("root"));
    let exe = std::fs::metadata(root.join("busybox")).unwrap();
    assert_eq!(exe.mode() & 0o7777, 0o555);
    assert_eq!(exe.uid(), 0);
    let kvm = std::fs::metadata(root.join("dev/kvm")).unwrap();
    assert_eq!(
        (kvm.uid(), kvm.gid(), kvm.mode() & 0o777),
        (UID, GID, 0o660)
    );
    let f = spec.host_path(Path::new("/out/f"));
    assert_eq!(std::fs::read_to_string(&f).unwrap(), "y\n");
    assert_eq!(std::fs::metadata(&f).unwrap().uid(), UID);
    assert_eq!(
        spec.host_path(Path::new("/rw/new.txt")),
        rw_dir.join("new.txt")
    );
    // The mounts stayed in the jail's namespace.
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(base.path().to_str().unwrap()), "{mounts}");

    assert_cgroup_limits(&id, 256 << 20, 50_000);
    let usage = jail::cgroup_usage(&id).expect("cgroup usage");
    assert!(usage.memory_peak.unwrap_or(1) > 0, "{usage:?}");

    jail::cleanup(base.path(), &id).unwrap();
    assert!(!base.path().join(&id).exists());
    assert_cgroup_gone(&id);
    assert_eq!(jail::cgroup_usage(&id), None);
    // Bound host files are intact.
    assert_eq!(
        std::fs::read_to_string(ro_dir.join("hello.txt")).unwrap(),
        "hello\n"
    );
    assert_eq!(std::fs::read_to_string(&ro_file).unwrap(), "a file\n");
    assert_eq!(
        std::fs::read_to_string(rw_dir.join("new.txt")).unwrap(),
        "z\n"
    );
    // Cleaning up twice is fine.
    jail::cleanup(base.path(), &id).unwrap();
}

#[test]
fn failures_and_cleanup_refusals() {
    require_root!();
    let base = base_dir();
    let id = unique_id("refuse");
    let mut spec = JailSpec::new(&id, "/bin/busybox", UID, GID);
    spec.chroot_base = base.path().to_path_buf();
    spec.args = vec!["sleep".into(), "60".into()];

    // Invalid arguments: refused before touching anything.
    let mut bad = spec.clone();
    bad.uid = 0;
    bad.gid = 0;
    let out = run(&bad);
    assert_eq!(
        Step::from_exit_code(out.status.code().unwrap()),
        Some(Step::Validate)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("--allow-root"));
    assert!(!base.path().join(&id).exists());

    let mut child: Child = spec
        .command(&jailer())
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let layout = cgroup::detect().unwrap().unwrap();
    let procs = layout.dirs(&id)[0].join("cgroup.procs");
    let mut jailed = 0;
    wait_until("the jailed sleep", Duration::from_secs(10), || {
        jailed = jail::jailed_pid(child.id()).unwrap_or(0);
        jailed != 0
            && std::fs::read_to_string(&procs).is_ok_and(|p| {
                let mut v: Vec<&str> = p.split_whitespace().collect();
                v.sort();
                let mut want = [child.id().to_string(), jailed.to_string()];
                want.sort();
                v == want
            })
            && std::fs::read_to_string(format!("/proc/{jailed}/comm"))
                .is_ok_and(|c| c.trim() == "busybox")
    });
    // The jailer's child, now the unprivileged program, PID 1 of its namespace.
    let status = std::fs::read_to_string(format!("/proc/{jailed}/status")).unwrap();
    assert!(status.contains(&format!("Uid:\t{UID}\t")), "{status}");
    assert!(
        status.contains(&format!("NSpid:\t{jailed}\t1\n")),
        "{status}"
    );

    // A second jail with the same id is refused.
    let out = run(&spec);
    assert_eq!(
        Step::from_exit_code(out.status.code().unwrap()),
        Some(Step::ChrootDir),
        "{out:?}"
    );
    // Cleanup refuses while the jail runs.
    match jail::cleanup(base.path(), &id) {
        Err(jail::CleanupError::Running(..)) => {}
        other => panic!("{other:?}"),
    }
    assert!(spec.root().join("busybox").exists());
    let status = stop(&mut child);
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL),
        "{status:?}"
    );

    // A mount under the jail directory in this namespace: refused.
    let mnt = spec.root().join("dev");
    nix::mount::mount(
        Some("tmpfs"),
        &mnt,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .unwrap();
    let refused = jail::cleanup(base.path(), &id);
    nix::mount::umount2(&mnt, nix::mount::MntFlags::MNT_DETACH).unwrap();
    match refused {
        Err(jail::CleanupError::Mounted { mounts, .. }) => assert_eq!(mounts, vec![mnt]),
        other => panic!("{other:?}"),
    }
    jail::cleanup(base.path(), &id).unwrap();
    assert!(!base.path().join(&id).exists());
    assert_cgroup_gone(&id);
}

/// `ember-vmm` built beside this test (or `EMBER_VMM_BIN`).
fn vmm_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("EMBER_VMM_BIN") {
        return p.into();
    }
    let p = jailer().with_file_name("ember-vmm");
    assert!(
        p.is_file(),
        "{} not found: run `cargo build --workspace --bins` first (or set EMBER_VMM_BIN)",
        p.display()
    );
    p
}

fn is_dynamic(exe: &Path) -> bool {
    let bytes = std::fs::read(exe).unwrap();
    bytes
        .windows(b"ld-linux-x86-64.so.2".len())
        .any(|w| w == b"ld-linux-x86-64.so.2")
}

fn artifact(var: &str, script: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(var) {
        return p.into();
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(script);
    let out = Command::new("bash")
        .arg(&path)
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(out.status.success(), "{} failed", path.display());
    let last = stdout(&out).lines().last().unwrap_or("").trim().to_string();
    PathBuf::from(last)
}

/// One API call through curl: (status, body).
fn api(sock: &Path, method: &str, path: &str, body: Option<serde_json::Value>) -> (u16, String) {
    let mut c = Command::new("curl");
    c.args(["-s", "-m", "30", "-w", "\n%{http_code}", "--unix-socket"])
        .arg(sock)
        .args(["-X", method]);
    if let Some(b) = body {
        c.args(["-H", "Content-Type: application/json", "-d", &b.to_string()]);
    }
    let out = c.arg(format!("http://localhost{path}")).output().unwrap();
    let text = stdout(&out);
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

#[test]
fn ember_vmm_in_a_jail_boots_a_guest() {
    require_root!();
    let vmm = vmm_bin();
    let base = base_dir();
    let id = unique_id("vmm");
    let mut spec = JailSpec::new(&id, &vmm, UID, GID);
    spec.chroot_base = base.path().to_path_buf();
    spec.dirs = vec!["/run".into()];
    spec.memory_limit = Some(512 << 20);
    spec.cpus = Some(1.0);
    if is_dynamic(&vmm) {
        // A glibc-dynamic build needs its libraries; a static one
        // (`-C target-feature=+crt-static`) needs nothing.
        spec.binds.push(Bind::read_only(
            "/lib/x86_64-linux-gnu",
            "/lib/x86_64-linux-gnu",
        ));
        spec.binds.push(Bind::read_only("/lib64", "/lib64"));
    }
    // ember-vmm detects the nested kvm_pvm host by this sysfs directory.
    if Path::new("/sys/module/kvm_pvm").exists() {
        spec.binds.push(Bind::read_only(
            "/sys/module/kvm_pvm",
            "/sys/module/kvm_pvm",
        ));
    }
    let kernel = artifact("EMBER_KERNEL", "kernels/build.sh");
    let rootfs = artifact("EMBER_ROOTFS", "rootfs/build.sh");
    spec.binds.push(Bind::read_only(&kernel, "/boot/vmlinux"));
    spec.binds
        .push(Bind::read_only(&rootfs, "/boot/rootfs.ext4"));
    spec.args = [
        "--api-sock",
        "/run/api.sock",
        "--id",
        &id,
        "--serial-out",
        "/run/serial.log",
    ]
    .map(Into::into)
    .to_vec();

    let log_path = base.path().join("vmm.log");
    let mut child = spec
        .command(&jailer())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let logs = || {
        let serial = std::fs::read_to_string(spec.host_path(Path::new("/run/serial.log")))
            .unwrap_or_default();
        let tail: Vec<&str> = serial.lines().rev().take(30).collect();
        format!(
            "vmm log:\n{}\nserial tail (reversed):\n{}",
            std::fs::read_to_string(&log_path).unwrap_or_default(),
            tail.join("\n")
        )
    };
    let sock = spec.host_path(Path::new("/run/api.sock"));
    let start = Instant::now();
    while !(sock.exists() && api(&sock, "GET", "/", None).0 == 200) {
        if let Ok(Some(s)) = child.try_wait() {
            panic!("jailed ember-vmm exited ({s}); {}", logs());
        }
        assert!(start.elapsed() < Duration::from_secs(20), "{}", logs());
        std::thread::sleep(Duration::from_millis(20));
    }
    let (code, body) = api(&sock, "GET", "/", None);
    assert_eq!(code, 200);
    assert!(body.contains(&format!("\"id\":\"{id}\"")), "{body}");
    let vmm_pid = jail::jailed_pid(child.id()).expect("the jailed VMM");
    let status = std::fs::read_to_string(format!("/proc/{vmm_pid}/status")).unwrap();
    assert!(status.contains(&format!("Uid:\t{UID}\t")), "{status}");
    assert!(
        status.contains("Seccomp:\t2"),
        "seccomp filter is on: {status}"
    );
    assert_cgroup_limits(&id, 512 << 20, 100_000);

    // The agent's ready listener, created by the host inside the jail and
    // given to the jail's uid so that the VMM may connect to it.
    let vsock = spec.host_path(Path::new("/run/v.sock"));
    let ready = ember_agent::client::bind_ready_listener(&vsock).unwrap();
    spec.give_to_jail(&ember_agent::client::host_port_socket_path(&vsock, 53))
        .unwrap();

    let put = |path: &str, body: serde_json::Value| {
        let (code, reply) = api(&sock, "PUT", path, Some(body));
        assert_eq!(code, 204, "PUT {path}: {reply}; {}", logs());
    };
    put(
        "/boot-source",
        serde_json::json!({"kernel_image_path": "/boot/vmlinux",
            "boot_args": "console=ttyS0 reboot=k panic=1 pci=off i8042.noaux i8042.nomux i8042.dumbkbd"}),
    );
    put(
        "/machine-config",
        serde_json::json!({"vcpu_count": 1, "mem_size_mib": 128}),
    );
    put(
        "/drives/rootfs",
        serde_json::json!({"drive_id": "rootfs", "path_on_host": "/boot/rootfs.ext4",
            "is_root_device": true, "is_read_only": true}),
    );
    put(
        "/vsock",
        serde_json::json!({"guest_cid": 3, "uds_path": "/run/v.sock"}),
    );
    put(
        "/actions",
        serde_json::json!({"action_type": "InstanceStart"}),
    );

    let boot = Instant::now();
    let hello = loop {
        match ember_agent::client::wait_ready(&ready, Duration::from_secs(2)) {
            Ok(h) => break h,
            Err(ember_agent::client::ClientError::Timeout(_)) => {}
            Err(e) => panic!("waiting for the agent: {e}; {}", logs()),
        }
        if let Ok(Some(s)) = child.try_wait() {
            panic!("jailed ember-vmm exited ({s}) before the agent; {}", logs());
        }
        assert!(
            boot.elapsed() < Duration::from_secs(600),
            "no agent; {}",
            logs()
        );
    };
    eprintln!(
        "agent ready in the jail after {:?}: {hello:?}",
        boot.elapsed()
    );
    let mut agent = ember_agent::client::AgentClient::connect(
        &vsock,
        ember_agent::AGENT_PORT,
        Duration::from_secs(30),
    )
    .unwrap_or_else(|e| panic!("agent connect: {e}; {}", logs()));
    let health = agent.health().unwrap();
    eprintln!("health through the jail's vsock socket: {health:?}");
    let usage = jail::cgroup_usage(&id).unwrap();
    eprintln!("cgroup usage: {usage:?}");
    assert!(usage.memory_current > 0);
    std::io::stderr().flush().unwrap();

    let status = stop(&mut child);
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL),
        "{status:?}"
    );
    jail::cleanup(base.path(), &id).unwrap();
    assert!(!base.path().join(&id).exists());
    assert_cgroup_gone(&id);
    assert!(kernel.is_file() && rootfs.is_file());
}

/// The escape probe's resource limits (small, to be reached quickly).
const PROBE_FSIZE: u64 = 1 << 20;
const PROBE_NOFILE: u64 = 64;
const PROBE_NPROC: u64 = 16;
/// Where the probe finds its input in its jail (and its mark).
const PROBE_IN: &str = "/probe-in";

/// Runs `f` in a child process, under the VMM's seccomp filter if
/// `filtered`; `f` returns 0 when the attempt got through, or the errno
/// that stopped it. The outcome in words, and whether it got through.
fn probe_attempt(filtered: bool, f: fn() -> i32) -> (String, bool) {
    // SAFETY: the child only makes system calls and, under a filter,
    // compiles and installs it (glibc's fork keeps malloc usable).
    match unsafe { nix::unistd::fork() }.expect("fork") {
        nix::unistd::ForkResult::Child => {
            if filtered {
                ember_vmm::seccomp::enable(true);
                ember_vmm::seccomp::apply_for_current_thread(ember_vmm::seccomp::ThreadKind::Vmm);
            }
            let code = f();
            // SAFETY: leaving the child at once.
            unsafe { libc::_exit(code) };
        }
        nix::unistd::ForkResult::Parent { child } => {
            use nix::sys::wait::{waitpid, WaitStatus};
            match waitpid(child, None).expect("waitpid") {
                WaitStatus::Exited(_, 0) => ("ALLOWED".into(), true),
                WaitStatus::Exited(_, 148) => ("killed by the seccomp filter (148)".into(), false),
                WaitStatus::Exited(_, e) => (
                    format!("refused: {}", nix::errno::Errno::from_raw(e)),
                    false,
                ),
                other => (format!("ended: {other:?}"), false),
            }
        }
    }
}

fn errno() -> i32 {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(255)
        .min(255)
}

fn victim_pid() -> i32 {
    std::fs::read_to_string(Path::new(PROBE_IN).join("victim"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// A syscall's result as an attempt's: 0 if it succeeded, else its errno.
fn outcome(r: i64) -> i32 {
    if r >= 0 {
        0
    } else {
        errno().max(1)
    }
}

/// Inside the probe jail (skipped anywhere else): tries each way out as
/// the jailed uid and prints one `ESCAPE attempt | outcome | ALLOWED?`
/// line per attempt for `jail_escapes_are_refused` to read.
#[test]
fn escape_probe_in_jail() {
    if !Path::new(PROBE_IN).join("victim").exists() {
        return;
    }
    type Attempt = (&'static str, bool, fn() -> i32);
    let attempts: [Attempt; 14] = [
        (
            "signal another jail's VMM by its host pid (kill 0)",
            false,
            || {
                // SAFETY: kill with signal 0 only checks.
                outcome(unsafe { libc::kill(victim_pid(), 0) }.into())
            },
        ),
        (
            "signal any pid 2..=65536 but its own (kill 0)",
            false,
            || {
                // SAFETY: getpid has no preconditions.
                let me = unsafe { libc::getpid() };
                // The probe's own threads (of PID 1, its parent) do not count.
                let own = |p: i32| {
                    std::fs::read_to_string(format!("/proc/{p}/status")).is_ok_and(|s| {
                        s.lines()
                            .any(|l| l == "Tgid:\t1" || l == format!("Tgid:\t{me}"))
                    })
                };
                // SAFETY: kill with signal 0 only checks.
                let found = (2..=65536)
                    .filter(|p| *p != me && unsafe { libc::kill(*p, 0) } == 0 && !own(*p))
                    .count();
                if found > 0 {
                    0
                } else {
                    libc::ESRCH
                }
            },
        ),
        (
            "kill(-1, SIGKILL): every process it may signal",
            false,
            || {
                // SAFETY: in the jail's PID namespace, with its uid.
                outcome(unsafe { libc::kill(-1, libc::SIGKILL) }.into())
            },
        ),
        ("see other processes in /proc", false, || {
            // SAFETY: getpid has no preconditions.
            let me = unsafe { libc::getpid() }.to_string();
            let others = std::fs::read_dir("/proc")
                .unwrap()
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.parse::<u32>().is_ok() && n != "1" && *n != me)
                .count();
            if others > 0 {
                0
            } else {
                libc::ENOENT
            }
        }),
        ("unshare(CLONE_NEWUSER)", true, || {
            // SAFETY: changes only this child's namespaces.
            outcome(unsafe { libc::unshare(libc::CLONE_NEWUSER) }.into())
        }),
        ("unshare(CLONE_NEWNET)", true, || {
            // SAFETY: as above.
            outcome(unsafe { libc::unshare(libc::CLONE_NEWNET) }.into())
        }),
        ("socket(AF_INET)", true, || {
            // SAFETY: a new socket, closed at exit.
            outcome(unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) }.into())
        }),
        ("mount tmpfs (no filter: capabilities)", false, || {
            let r = nix::mount::mount(
                Some("tmpfs"),
                "/out",
                Some("tmpfs"),
                nix::mount::MsFlags::empty(),
                None::<&str>,
            );
            r.map_or_else(|e| e as i32, |()| 0)
        }),
        ("mount tmpfs", true, || {
            // SAFETY: null data; the target is the jail's own directory.
            outcome(
                unsafe {
                    libc::mount(
                        c"tmpfs".as_ptr(),
                        c"/out".as_ptr(),
                        c"tmpfs".as_ptr(),
                        0,
                        std::ptr::null(),
                    )
                }
                .into(),
            )
        }),
        ("ptrace(PTRACE_ATTACH) the other VMM", true, || {
            // SAFETY: attaching to a pid; no memory is passed.
            outcome(unsafe { libc::ptrace(libc::PTRACE_ATTACH, victim_pid(), 0usize, 0usize) })
        }),
        ("write a file beyond RLIMIT_FSIZE", true, || {
            // SAFETY: ignoring SIGXFSZ so that the write fails with EFBIG.
            unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
            let mut f = std::fs::File::create("/out/big").unwrap();
            let chunk = vec![0u8; 64 << 10];
            for _ in 0..(2 * PROBE_FSIZE / chunk.len() as u64) {
                if let Err(e) = f.write_all(&chunk) {
                    return e.raw_os_error().unwrap_or(255);
                }
            }
            0
        }),
        ("open more than RLIMIT_NOFILE files", true, || {
            let mut files = Vec::new();
            for _ in 0..2 * PROBE_NOFILE {
                match std::fs::File::open("/dev/null") {
                    Ok(f) => files.push(f),
                    Err(e) => return e.raw_os_error().unwrap_or(255),
                }
            }
            0
        }),
        ("start threads beyond RLIMIT_NPROC", true, || {
            let (_tx, rx) = std::sync::mpsc::channel::<()>();
            let rx = std::sync::Arc::new(std::sync::Mutex::new(rx));
            for _ in 0..2 * PROBE_NPROC {
                let rx = rx.clone();
                if let Err(e) =
                    std::thread::Builder::new().spawn(move || drop(rx.lock().map(|r| r.recv())))
                {
                    return e.raw_os_error().unwrap_or(255);
                }
            }
            0
        }),
        (
            "fork beyond RLIMIT_NPROC (no filter: fork is refused there)",
            false,
            || {
                let mut kids = Vec::new();
                let mut result = 0;
                for _ in 0..2 * PROBE_NPROC {
                    // SAFETY: the child only sleeps until killed.
                    let pid = unsafe { libc::fork() };
                    if pid == 0 {
                        // SAFETY: pause(2) waits for the SIGKILL below.
                        unsafe {
                            libc::pause();
                            libc::_exit(0)
                        };
                    }
                    if pid < 0 {
                        result = errno();
                        break;
                    }
                    kids.push(pid);
                }
                for k in kids {
                    // SAFETY: our own children.
                    unsafe {
                        libc::kill(k, libc::SIGKILL);
                        libc::waitpid(k, std::ptr::null_mut(), 0);
                    }
                }
                result
            },
        ),
    ];
    for (name, filtered, f) in attempts {
        let (what, allowed) = probe_attempt(filtered, f);
        let name = if filtered {
            format!("{name} (under the VMM filter)")
        } else {
            name.to_string()
        };
        println!(
            "ESCAPE {name} | {what} | {}",
            if allowed { "ALLOWED" } else { "refused" }
        );
    }
}

/// A jailed process (the escape probe above, run from this test binary in
/// a jail as the VMM runs: its own uid, PID namespace, limits, the VMM's
/// seccomp filter where a VMM has it) tries each way out, next to
/// another jail (a second "VMM", another uid); none may work.
#[test]
fn jail_escapes_are_refused() {
    require_root!();
    let base = base_dir();
    let victim_id = unique_id("victim");
    let mut victim = JailSpec::new(&victim_id, "/bin/busybox", UID + 1, GID + 1);
    victim.chroot_base = base.path().to_path_buf();
    victim.args = vec!["sleep".into(), "120".into()];
    let mut victim_child = victim
        .command(&jailer())
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let mut victim_pid = 0;
    wait_until("the victim", Duration::from_secs(10), || {
        victim_pid = jail::jailed_pid(victim_child.id()).unwrap_or(0);
        victim_pid != 0
            && std::fs::read_to_string(format!("/proc/{victim_pid}/comm"))
                .is_ok_and(|c| c.trim() == "busybox")
    });

    let input = tempfile::tempdir().unwrap();
    std::fs::write(input.path().join("victim"), victim_pid.to_string()).unwrap();
    std::fs::set_permissions(input.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let exe = std::env::current_exe().unwrap();
    let id = unique_id("probe");
    let mut spec = JailSpec::new(&id, &exe, UID + 2, GID + 2);
    spec.chroot_base = base.path().to_path_buf();
    spec.proc = true;
    spec.dirs = vec!["/out".into()];
    spec.binds = vec![Bind::read_only(input.path(), PROBE_IN)];
    if is_dynamic(&exe) {
        spec.binds.push(Bind::read_only(
            "/lib/x86_64-linux-gnu",
            "/lib/x86_64-linux-gnu",
        ));
        spec.binds.push(Bind::read_only("/lib64", "/lib64"));
    }
    spec.limits = jail::ResourceLimits {
        fsize: Some(PROBE_FSIZE),
        nofile: Some(PROBE_NOFILE),
        nproc: Some(PROBE_NPROC),
    };
    spec.args = [
        "escape_probe_in_jail",
        "--exact",
        "--nocapture",
        "--test-threads=1",
    ]
    .map(Into::into)
    .to_vec();
    let out = run(&spec);
    let text = stdout(&out);
    assert!(
        out.status.success(),
        "{:?}\n{text}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<&str> = text
        .lines()
        .filter_map(|l| l.split_once("ESCAPE ").map(|(_, r)| r))
        .collect();
    eprintln!("attempt | outcome | result");
    for r in &rows {
        eprintln!("{r}");
    }
    let allowed = rows.iter().filter(|r| r.ends_with("| ALLOWED")).count();
    eprintln!("{} attempts, {allowed} allowed", rows.len());
    assert_eq!(rows.len(), 14, "{text}");

    // The other jail's process lived through kill(-1) and the rest.
    let victim_alive = std::fs::read_to_string(format!("/proc/{victim_pid}/stat"))
        .is_ok_and(|s| !s.contains(") Z"));
    assert!(victim_alive, "the other jail's process was killed");
    let host_file = spec.host_path(Path::new("/out/big"));
    let written = std::fs::metadata(&host_file).map(|m| m.len()).unwrap_or(0);
    assert!(written <= PROBE_FSIZE, "{written} bytes written");
    assert_eq!(allowed, 0, "{rows:#?}");

    stop(&mut victim_child);
    jail::cleanup(base.path(), &victim_id).unwrap();
    jail::cleanup(base.path(), &id).unwrap();
}
