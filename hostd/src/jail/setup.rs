//! What `ember-jailer` does, in order: chroot directory, cgroup, network
//! namespace, mount namespace, the exec file, device nodes, directories,
//! bind mounts, new PID, IPC and UTS namespaces, resource limits; then it
//! forks. The child is PID 1 of the new PID namespace: procfs (showing
//! only the jail's processes), `pivot_root`, dropping privileges, closing
//! file descriptors, `exec`. The jailer stays as the child's parent in
//! the host's PID namespace (see [`supervise`]): it exits as the program
//! does (same exit code, or killed by the same signal), turns SIGTERM,
//! SIGINT and SIGHUP into SIGKILL for the program (PID 1 of a namespace
//! ignores signals it has no handler for), and the program gets SIGKILL
//! if the jailer dies.

use std::convert::Infallible;
use std::ffi::{CString, OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use clap::Parser;
use nix::errno::Errno;
use nix::sched::{setns, unshare, CloneFlags};
use nix::sys::stat::{makedev, mknod, umask, Mode, SFlag};
use nix::unistd::{getpid, setgroups, setresgid, setresuid, Gid, Uid};

use super::cgroup::{self, CgroupError, Limits};
use super::mounts;
use super::spec::{Bind, Device, JailSpec, SpecError, CPU_PERIOD_US, DEFAULT_CHROOT_BASE};

/// The steps of the jailer, each with its exit code (200 and up, apart
/// from the VMM's own codes: 0, 1, 2 for usage, 148 for seccomp).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Validate = 200,
    ChrootDir,
    Cgroup,
    Netns,
    MountNamespace,
    CopyExec,
    Devices,
    Dirs,
    Binds,
    Proc,
    PivotRoot,
    Privileges,
    Fds,
    Exec,
    Namespaces,
    Limits,
    Fork,
}

const STEPS: [Step; 17] = [
    Step::Validate,
    Step::ChrootDir,
    Step::Cgroup,
    Step::Netns,
    Step::MountNamespace,
    Step::CopyExec,
    Step::Devices,
    Step::Dirs,
    Step::Binds,
    Step::Proc,
    Step::PivotRoot,
    Step::Privileges,
    Step::Fds,
    Step::Exec,
    Step::Namespaces,
    Step::Limits,
    Step::Fork,
];

impl Step {
    pub fn exit_code(self) -> i32 {
        self as i32
    }

    /// The step a jailer exit code stands for (`None`: not the jailer's).
    pub fn from_exit_code(code: i32) -> Option<Step> {
        STEPS.into_iter().find(|s| s.exit_code() == code)
    }

    pub fn name(self) -> &'static str {
        match self {
            Step::Validate => "invalid arguments",
            Step::ChrootDir => "chroot directory",
            Step::Cgroup => "cgroup",
            Step::Netns => "network namespace",
            Step::MountNamespace => "mount namespace",
            Step::CopyExec => "copying the exec file",
            Step::Devices => "device nodes",
            Step::Dirs => "directories",
            Step::Binds => "bind mounts",
            Step::Proc => "procfs",
            Step::PivotRoot => "pivot_root",
            Step::Privileges => "dropping privileges",
            Step::Fds => "closing file descriptors",
            Step::Exec => "exec",
            Step::Namespaces => "PID, IPC and UTS namespaces",
            Step::Limits => "resource limits",
            Step::Fork => "starting the jailed process",
        }
    }
}

/// A failed jailer step.
#[derive(Debug, thiserror::Error)]
#[error("{}: {error}", step.name())]
pub struct JailError {
    pub step: Step,
    pub error: JailSetupError,
}

impl JailError {
    pub fn exit_code(&self) -> i32 {
        self.step.exit_code()
    }
}

/// Why a jailer step failed.
#[derive(Debug, thiserror::Error)]
pub enum JailSetupError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("ember-jailer must run as root")]
    NotRoot,
    /// A system call failed; `call` names it and what it acted on.
    #[error("{call}: {errno}")]
    Sys { call: String, errno: Errno },
    /// A file operation failed; `what` names it and its path.
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error("{} already exists and is not empty (a jail with this id is running or was not cleaned up)", .0.display())]
    RootInUse(PathBuf),
    #[error("limits given, but no cgroup filesystem is mounted")]
    NoCgroupFs,
    #[error("{} is on a filesystem mounted nodev, where device nodes cannot be opened: choose another --chroot-base", .0.display())]
    Nodev(PathBuf),
    #[error("the jailer exited during set-up")]
    JailerGone,
    #[error("the parent exited during set-up")]
    ParentGone,
    #[error("capabilities remain after setuid({uid}): effective {effective:#x}, permitted {permitted:#x}")]
    CapabilitiesRemain {
        uid: u32,
        effective: u64,
        permitted: u64,
    },
    #[error("argument {0:?} holds a NUL byte")]
    NulByte(OsString),
}

/// [`JailSetupError::Sys`].
fn sys(call: impl Into<String>, errno: Errno) -> JailSetupError {
    JailSetupError::Sys {
        call: call.into(),
        errno,
    }
}

/// [`JailSetupError::Io`].
fn io(what: impl Into<String>, source: std::io::Error) -> JailSetupError {
    JailSetupError::Io {
        what: what.into(),
        source,
    }
}

fn fail(step: Step) -> impl Fn(JailSetupError) -> JailError {
    move |error| JailError { step, error }
}

fn parse_bind(s: &str) -> Result<Bind, SpecError> {
    Bind::parse(OsStr::new(s))
}

/// `ember-jailer`'s command line (what [`JailSpec::command`] produces).
#[derive(Debug, Parser)]
#[command(
    name = "ember-jailer",
    version,
    about = "Runs a program (normally ember-vmm) jailed: own chroot, mount namespace and cgroup, unprivileged. Run as root; the program keeps this process's pid."
)]
pub struct JailerArgs {
    /// Jail id: [A-Za-z0-9-]{1,64}.
    #[arg(long)]
    pub id: String,
    /// The program to copy into the jail and run as /<file name>.
    #[arg(long)]
    pub exec_file: PathBuf,
    /// The jail is <chroot-base>/<id>/root.
    #[arg(long, default_value = DEFAULT_CHROOT_BASE)]
    pub chroot_base: PathBuf,
    /// User id to run as.
    #[arg(long)]
    pub uid: u32,
    /// Group id to run as.
    #[arg(long)]
    pub gid: u32,
    /// Allow uid or gid 0 (debugging only).
    #[arg(long)]
    pub allow_root: bool,
    /// HOST_PATH:JAIL_PATH[:rw]: bind a file or directory (read-only unless :rw).
    #[arg(long = "bind", value_name = "HOST:JAIL[:rw]", value_parser = parse_bind)]
    pub binds: Vec<Bind>,
    /// Create this directory in the jail, owned by uid:gid.
    #[arg(long = "dir", value_name = "JAIL_PATH")]
    pub dirs: Vec<PathBuf>,
    /// Extra device node (/dev/kvm is always there).
    #[arg(long = "device", value_enum)]
    pub devices: Vec<Device>,
    /// Memory limit in bytes.
    #[arg(long, value_name = "BYTES")]
    pub memory_limit: Option<u64>,
    /// CPU limit in CPUs (fractional, e.g. 0.5).
    #[arg(long)]
    pub cpus: Option<f64>,
    /// Join this network namespace (e.g. /var/run/netns/NAME).
    #[arg(long)]
    pub netns: Option<PathBuf>,
    /// Mount a minimal /proc (the jail's own processes only).
    #[arg(long)]
    pub proc: bool,
    /// Kill the program (SIGKILL) when the thread that started the jailer
    /// exits, so jailed VMMs do not outlive their daemon.
    #[arg(long)]
    pub die_with_parent: bool,
    /// RLIMIT_FSIZE: the largest file the program may write, in bytes.
    #[arg(long, value_name = "BYTES")]
    pub rlimit_fsize: Option<u64>,
    /// RLIMIT_NOFILE: how many descriptors it may hold open.
    #[arg(long, value_name = "COUNT")]
    pub rlimit_nofile: Option<u64>,
    /// RLIMIT_NPROC: how many processes and threads its uid may run.
    #[arg(long, value_name = "COUNT")]
    pub rlimit_nproc: Option<u64>,
    /// Arguments for the program.
    #[arg(last = true)]
    pub args: Vec<OsString>,
}

impl JailerArgs {
    pub fn into_spec(self) -> JailSpec {
        JailSpec {
            id: self.id,
            exec_file: self.exec_file,
            chroot_base: self.chroot_base,
            uid: self.uid,
            gid: self.gid,
            allow_root: self.allow_root,
            binds: self.binds,
            dirs: self.dirs,
            devices: self.devices,
            memory_limit: self.memory_limit,
            cpus: self.cpus,
            netns: self.netns,
            proc: self.proc,
            die_with_parent: self.die_with_parent,
            limits: super::spec::ResourceLimits {
                fsize: self.rlimit_fsize,
                nofile: self.rlimit_nofile,
                nproc: self.rlimit_nproc,
            },
            args: self.args,
        }
    }
}

/// `root` joined with the absolute `jail_path`.
fn inside(root: &Path, jail_path: &Path) -> PathBuf {
    root.join(jail_path.strip_prefix("/").unwrap_or(jail_path))
}

/// Builds the jail described by `spec` and executes its program; returns
/// only on failure. Must run as root, single-threaded.
pub fn setup(spec: &JailSpec) -> Result<Infallible, JailError> {
    spec.validate()
        .map_err(|e| fail(Step::Validate)(e.into()))?;
    if !nix::unistd::geteuid().is_root() {
        return Err(fail(Step::Validate)(JailSetupError::NotRoot));
    }
    umask(Mode::from_bits_truncate(0o022));
    let root = spec.root();

    create_root(&root).map_err(fail(Step::ChrootDir))?;
    join_cgroup(spec).map_err(fail(Step::Cgroup))?;
    if let Some(ns) = &spec.netns {
        join_netns(ns).map_err(fail(Step::Netns))?;
    }
    new_mount_namespace(&root).map_err(fail(Step::MountNamespace))?;
    let exec_name = spec
        .exec_name()
        .map_err(|e| fail(Step::CopyExec)(e.into()))?;
    copy_exec(&spec.exec_file, &root.join(exec_name)).map_err(fail(Step::CopyExec))?;
    make_devices(spec, &root).map_err(fail(Step::Devices))?;
    make_dirs(spec, &root).map_err(fail(Step::Dirs))?;
    for b in &spec.binds {
        bind(&root, b).map_err(fail(Step::Binds))?;
    }
    new_namespaces(&spec.id).map_err(fail(Step::Namespaces))?;
    set_limits(&spec.limits).map_err(fail(Step::Limits))?;
    if spec.die_with_parent {
        // The jailer (root, it keeps its uid) dies with hostd; the
        // program dies with the jailer.
        die_with_parent(nix::unistd::getppid()).map_err(fail(Step::Fork))?;
    }
    // The child learns that the jailer has gone by this pipe's hang-up.
    let (alive_r, alive_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| fail(Step::Fork)(sys("pipe", e)))?;
    // SAFETY: the jailer is single-threaded (it runs before any thread is
    // started), so the child may run ordinary Rust code after fork.
    match unsafe { nix::unistd::fork() } {
        Err(e) => Err(fail(Step::Fork)(sys("fork", e))),
        Ok(nix::unistd::ForkResult::Parent { child }) => {
            drop(alive_r);
            supervise(child, alive_w)
        }
        Ok(nix::unistd::ForkResult::Child) => {
            drop(alive_w);
            let e = match enter_jail(spec, &root, exec_name, alive_r) {
                Ok(never) => match never {},
                Err(e) => e,
            };
            eprintln!("ember-jailer: {e}");
            std::process::exit(e.exit_code());
        }
    }
}

/// The child, PID 1 of the jail's PID namespace: procfs, `pivot_root`,
/// privileges, descriptors, `exec`.
fn enter_jail(
    spec: &JailSpec,
    root: &Path,
    exec_name: &OsStr,
    jailer_alive: std::os::fd::OwnedFd,
) -> Result<Infallible, JailError> {
    if spec.proc {
        mount_proc(root).map_err(fail(Step::Proc))?;
    }
    enter_root(root).map_err(fail(Step::PivotRoot))?;
    drop_privileges(spec.uid, spec.gid).map_err(fail(Step::Privileges))?;
    // After the uid change, which clears the parent-death signal: the
    // program never outlives the jailer that reports its exit.
    die_with_jailer(jailer_alive).map_err(fail(Step::Privileges))?;
    cloexec_fds().map_err(fail(Step::Fds))?;
    exec(exec_name, &spec.args).map_err(fail(Step::Exec))
}

/// New PID (for the children), IPC and UTS namespaces; the host name is
/// the jail id.
fn new_namespaces(id: &str) -> Result<(), JailSetupError> {
    unshare(CloneFlags::CLONE_NEWPID | CloneFlags::CLONE_NEWIPC | CloneFlags::CLONE_NEWUTS)
        .map_err(|e| sys("unshare(CLONE_NEWPID|CLONE_NEWIPC|CLONE_NEWUTS)", e))?;
    nix::unistd::sethostname(id).map_err(|e| sys("sethostname", e))
}

/// Sets the soft and hard limits given (inherited by the child).
fn set_limits(l: &super::spec::ResourceLimits) -> Result<(), JailSetupError> {
    use nix::sys::resource::{setrlimit, Resource};
    for (name, res, v) in [
        ("RLIMIT_FSIZE", Resource::RLIMIT_FSIZE, l.fsize),
        ("RLIMIT_NOFILE", Resource::RLIMIT_NOFILE, l.nofile),
        ("RLIMIT_NPROC", Resource::RLIMIT_NPROC, l.nproc),
    ] {
        if let Some(v) = v {
            setrlimit(res, v, v).map_err(|e| sys(format!("{name} {v}"), e))?;
        }
    }
    Ok(())
}

/// The pid of the program the jailer supervises (its only child).
static CHILD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

extern "C" fn kill_child(_: libc::c_int) {
    let pid = CHILD.load(std::sync::atomic::Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill(2) is async-signal-safe.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// The jailer's life after the fork: wait for the program and exit as it
/// did. SIGTERM, SIGINT and SIGHUP kill the program (SIGKILL: as PID 1 of
/// its namespace, it would ignore signals it has no handler for).
fn supervise(
    child: nix::unistd::Pid,
    alive: std::os::fd::OwnedFd,
) -> Result<Infallible, JailError> {
    use nix::sys::signal::{signal, SigHandler, Signal};
    use nix::sys::wait::{waitpid, WaitStatus};
    CHILD.store(child.as_raw(), std::sync::atomic::Ordering::SeqCst);
    for sig in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        // SAFETY: the handler only calls kill(2).
        unsafe { signal(sig, SigHandler::Handler(kill_child)) }
            .map_err(|e| fail(Step::Fork)(sys(format!("signal({sig})"), e)))?;
    }
    loop {
        match waitpid(child, None) {
            Ok(WaitStatus::Exited(_, code)) => std::process::exit(code),
            Ok(WaitStatus::Signaled(_, sig, _)) => {
                drop(alive);
                // Die by the same signal, so that our parent sees it.
                // SAFETY: restoring the default action of a signal.
                let _ = unsafe { signal(sig, SigHandler::SigDfl) };
                let _ = nix::sys::signal::raise(sig);
                std::process::exit(128 + sig as i32);
            }
            Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                return Err(fail(Step::Fork)(sys(format!("waitpid({child})"), e)));
            }
        }
    }
}

/// PR_SET_PDEATHSIG for the program: SIGKILL when the jailer exits. The
/// jailer is outside the program's PID namespace (getppid() says 0), so
/// that it is still there is read from the pipe it holds open.
fn die_with_jailer(alive: std::os::fd::OwnedFd) -> Result<(), JailSetupError> {
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
        .map_err(|e| sys("PR_SET_PDEATHSIG", e))?;
    let mut fds = [nix::poll::PollFd::new(
        std::os::fd::AsFd::as_fd(&alive),
        nix::poll::PollFlags::POLLIN,
    )];
    match nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO) {
        Ok(0) => Ok(()),
        Ok(_) => Err(JailSetupError::JailerGone),
        Err(e) => Err(sys("poll", e)),
    }
}

fn create_root(root: &Path) -> Result<(), JailSetupError> {
    match std::fs::read_dir(root) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(JailSetupError::RootInUse(root.to_path_buf()));
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::create_dir_all(root)
            .map_err(|e| io(format!("cannot create {}", root.display()), e)),
        Err(e) => Err(io(format!("cannot read {}", root.display()), e)),
    }
}

fn join_cgroup(spec: &JailSpec) -> Result<(), JailSetupError> {
    let limits = Limits {
        memory_bytes: spec.memory_limit,
        cpu: spec.cpu_quota_us().map(|q| (q, CPU_PERIOD_US)),
    };
    match cgroup::detect().map_err(|e| io("cannot read /proc/self/mountinfo", e))? {
        Some(layout) => {
            let dirs = layout.join(&spec.id, &limits, getpid().as_raw() as u32)?;
            log::debug!("joined cgroups {dirs:?}");
            Ok(())
        }
        None if limits == Limits::default() => {
            log::warn!("no cgroup filesystem is mounted: running without a cgroup");
            Ok(())
        }
        None => Err(JailSetupError::NoCgroupFs),
    }
}

fn join_netns(path: &Path) -> Result<(), JailSetupError> {
    let f =
        std::fs::File::open(path).map_err(|e| io(format!("cannot open {}", path.display()), e))?;
    setns(&f, CloneFlags::CLONE_NEWNET).map_err(|e| sys(format!("setns({})", path.display()), e))
}

fn new_mount_namespace(root: &Path) -> Result<(), JailSetupError> {
    unshare(CloneFlags::CLONE_NEWNS).map_err(|e| sys("unshare(CLONE_NEWNS)", e))?;
    mounts::make_root_private().map_err(|e| sys("making / private", e))?;
    mounts::bind_self(root).map_err(|e| sys(format!("binding {} onto itself", root.display()), e))
}

fn copy_exec(src: &Path, dst: &Path) -> Result<(), JailSetupError> {
    std::fs::copy(src, dst).map_err(|e| {
        io(
            format!("cannot copy {} to {}", src.display(), dst.display()),
            e,
        )
    })?;
    std::fs::set_permissions(dst, std::fs::Permissions::from_mode(0o555))
        .map_err(|e| io(format!("chmod {}", dst.display()), e))
}

/// One device node: the host node's numbers if it has one, else `default`.
fn make_device(
    root: &Path,
    path: &str,
    default: (u64, u64),
    mode: u32,
    owner: Option<(u32, u32)>,
) -> Result<(), JailSetupError> {
    let rdev = std::fs::metadata(path)
        .ok()
        .filter(|m| m.file_type().is_char_device())
        .map(|m| m.rdev())
        .unwrap_or_else(|| makedev(default.0, default.1));
    let node = inside(root, Path::new(path));
    if let Some(parent) = node.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| io(format!("cannot create {}", parent.display()), e))?;
    }
    mknod(&node, SFlag::S_IFCHR, Mode::from_bits_truncate(mode), rdev)
        .map_err(|e| sys(format!("mknod {}", node.display()), e))?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(&node, Some(uid), Some(gid))
            .map_err(|e| io(format!("chown {}", node.display()), e))?;
    }
    std::fs::set_permissions(&node, std::fs::Permissions::from_mode(mode))
        .map_err(|e| io(format!("chmod {}", node.display()), e))
}

fn make_devices(spec: &JailSpec, root: &Path) -> Result<(), JailSetupError> {
    if mounts::is_nodev(root).map_err(|e| sys(format!("statvfs {}", root.display()), e))? {
        return Err(JailSetupError::Nodev(root.to_path_buf()));
    }
    let jail = Some((spec.uid, spec.gid));
    make_device(root, "/dev/kvm", (10, 232), 0o660, jail)?;
    for d in &spec.devices {
        match d {
            Device::Tun => make_device(root, "/dev/net/tun", (10, 200), 0o660, jail)?,
            Device::Userfaultfd => make_device(root, "/dev/userfaultfd", (10, 257), 0o660, jail)?,
        }
    }
    make_device(root, "/dev/null", (1, 3), 0o666, None)?;
    make_device(root, "/dev/urandom", (1, 9), 0o666, None)
}

fn make_dirs(spec: &JailSpec, root: &Path) -> Result<(), JailSetupError> {
    for d in &spec.dirs {
        let dir = inside(root, d);
        std::fs::create_dir_all(&dir)
            .map_err(|e| io(format!("cannot create {}", dir.display()), e))?;
        std::os::unix::fs::chown(&dir, Some(spec.uid), Some(spec.gid))
            .map_err(|e| io(format!("chown {}", dir.display()), e))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| io(format!("chmod {}", dir.display()), e))?;
    }
    Ok(())
}

fn bind(root: &Path, b: &Bind) -> Result<(), JailSetupError> {
    let meta = std::fs::metadata(&b.host)
        .map_err(|e| io(format!("bind source {}", b.host.display()), e))?;
    let target = inside(root, &b.jail);
    let created = if meta.is_dir() {
        std::fs::create_dir_all(&target)
    } else {
        target
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| {
                std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(&target)
                    .map(drop)
            })
    };
    created.map_err(|e| io(format!("cannot create mount point {}", target.display()), e))?;
    mounts::bind(&b.host, &target, b.writable).map_err(|e| {
        sys(
            format!("bind {} onto {}", b.host.display(), target.display()),
            e,
        )
    })
}

fn mount_proc(root: &Path) -> Result<(), JailSetupError> {
    let target = root.join("proc");
    std::fs::create_dir_all(&target)
        .map_err(|e| io(format!("cannot create {}", target.display()), e))?;
    mounts::mount_proc(&target).map_err(|e| sys(format!("mount proc on {}", target.display()), e))
}

fn enter_root(root: &Path) -> Result<(), JailSetupError> {
    match mounts::pivot_into(root) {
        Ok(()) => Ok(()),
        // pivot_root cannot leave an initramfs root: fall back to chroot.
        Err(nix::errno::Errno::EINVAL) => {
            log::warn!(
                "pivot_root into {} failed (EINVAL): using chroot",
                root.display()
            );
            nix::unistd::chroot(root)
                .and_then(|()| nix::unistd::chdir("/"))
                .map_err(|e| sys(format!("chroot {}", root.display()), e))
        }
        Err(e) => Err(sys(format!("pivot_root into {}", root.display()), e)),
    }
}

/// The capability sets of this process: (effective, permitted, inheritable).
fn capabilities() -> Result<(u64, u64, u64), JailSetupError> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Default, Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let mut header = Header {
        version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: capget reads `header` and writes two `Data` structs (the
    // layout of version 3); both outlive the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_capget,
            &mut header as *mut Header,
            data.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return Err(io("capget", std::io::Error::last_os_error()));
    }
    let join = |f: fn(&Data) -> u32| u64::from(f(&data[0])) | (u64::from(f(&data[1])) << 32);
    Ok((
        join(|d| d.effective),
        join(|d| d.permitted),
        join(|d| d.inheritable),
    ))
}

fn die_with_parent(parent: nix::unistd::Pid) -> Result<(), JailSetupError> {
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
        .map_err(|e| sys("PR_SET_PDEATHSIG", e))?;
    // The parent may have gone before the signal was armed.
    if nix::unistd::getppid() != parent {
        return Err(JailSetupError::ParentGone);
    }
    Ok(())
}

fn drop_privileges(uid: u32, gid: u32) -> Result<(), JailSetupError> {
    setgroups(&[]).map_err(|e| sys("setgroups([])", e))?;
    let g = Gid::from_raw(gid);
    setresgid(g, g, g).map_err(|e| sys(format!("setresgid({gid})"), e))?;
    let u = Uid::from_raw(uid);
    setresuid(u, u, u).map_err(|e| sys(format!("setresuid({uid})"), e))?;
    // No setuid binary or file capability can give privileges back.
    nix::sys::prctl::set_no_new_privs().map_err(|e| sys("PR_SET_NO_NEW_PRIVS", e))?;
    if uid != 0 {
        let (eff, perm, _) = capabilities()?;
        if eff != 0 || perm != 0 {
            return Err(JailSetupError::CapabilitiesRemain {
                uid,
                effective: eff,
                permitted: perm,
            });
        }
    }
    Ok(())
}

/// Marks every descriptor above 2 close-on-exec.
fn cloexec_fds() -> Result<(), JailSetupError> {
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC only sets flags on this
    // process's descriptors; it takes no pointers.
    let rc = unsafe { libc::close_range(3, u32::MAX, libc::CLOSE_RANGE_CLOEXEC as i32) };
    if rc == 0 {
        return Ok(());
    }
    // Kernels before 5.11: one fcntl per possible descriptor.
    let mut lim = libc::rlimit {
        rlim_cur: 1024,
        rlim_max: 1024,
    };
    // SAFETY: getrlimit writes one rlimit struct, which outlives the call.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    let max = lim.rlim_cur.min(1 << 20) as i32;
    for fd in 3..max {
        // SAFETY: F_SETFD on an integer descriptor; EBADF for unused ones
        // is expected and ignored.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    Ok(())
}

fn cstring(s: &OsStr) -> Result<CString, JailSetupError> {
    CString::new(s.as_bytes()).map_err(|_| JailSetupError::NulByte(s.to_os_string()))
}

/// Environment passed to the jailed program: only these, when set.
const KEPT_ENV: [&str; 2] = ["RUST_LOG", "RUST_BACKTRACE"];

fn exec(name: &OsStr, args: &[OsString]) -> Result<Infallible, JailSetupError> {
    let mut path = OsString::from("/");
    path.push(name);
    let path = cstring(&path)?;
    let argv = std::iter::once(name)
        .chain(args.iter().map(OsString::as_os_str))
        .map(cstring)
        .collect::<Result<Vec<_>, _>>()?;
    let env = KEPT_ENV
        .iter()
        .filter_map(|k| std::env::var_os(k).map(|v| (k, v)))
        .map(|(k, v)| {
            let mut kv = OsString::from(k);
            kv.push("=");
            kv.push(v);
            cstring(&kv)
        })
        .collect::<Result<Vec<_>, _>>()?;
    nix::unistd::execve(&path, &argv, &env).map_err(|e| sys(format!("execve {path:?}"), e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jail::spec::Bind;

    #[test]
    fn exit_codes() {
        for s in STEPS {
            assert_eq!(Step::from_exit_code(s.exit_code()), Some(s));
        }
        assert_eq!(Step::Validate.exit_code(), 200);
        assert_eq!(Step::Exec.exit_code(), 213);
        assert_eq!(Step::Fork.exit_code(), 216);
        for code in [0, 1, 2, 148, 199, 217] {
            assert_eq!(Step::from_exit_code(code), None);
        }
    }

    /// What `JailSpec::command` builds parses back to the same spec.
    #[test]
    fn command_round_trips() {
        let mut s = JailSpec::new("a-1", "/bin/ember-vmm", 1000, 1001);
        s.chroot_base = "/tmp/jails".into();
        s.binds = vec![
            Bind::read_only("/k", "/kernel"),
            Bind::read_write("/o", "/out"),
        ];
        s.dirs = vec!["/run".into(), "/out2".into()];
        s.devices = vec![Device::Tun, Device::Userfaultfd];
        s.memory_limit = Some(300 << 20);
        s.cpus = Some(0.25);
        s.netns = Some("/var/run/netns/x".into());
        s.proc = true;
        s.limits.fsize = Some(1 << 30);
        s.limits.nofile = Some(4096);
        s.limits.nproc = Some(64);
        s.args = vec!["--api-sock".into(), "/run/api.sock".into(), "--".into()];
        let c = s.command(Path::new("ember-jailer"));
        let argv = std::iter::once(OsStr::new("ember-jailer")).chain(c.get_args());
        let parsed = JailerArgs::try_parse_from(argv).unwrap().into_spec();
        assert_eq!(parsed, s);

        let mut root = JailSpec::new("r", "/x", 0, 0);
        root.allow_root = true;
        let c = root.command(Path::new("j"));
        let argv = std::iter::once(OsStr::new("j")).chain(c.get_args());
        let parsed = JailerArgs::try_parse_from(argv).unwrap().into_spec();
        assert_eq!(parsed, root);
        assert_eq!(parsed.chroot_base, Path::new(DEFAULT_CHROOT_BASE));
    }

    #[test]
    fn bad_arguments_are_refused() {
        let base = [
            "j",
            "--id",
            "x",
            "--exec-file",
            "/x",
            "--uid",
            "1",
            "--gid",
            "1",
        ];
        assert!(JailerArgs::try_parse_from(base).is_ok());
        for extra in [
            &["--bind", "/a"][..],
            &["--bind", "/a:/b:wr"],
            &["--device", "sda"],
            &["--cpus", "x"],
            &["--memory-limit", "-1"],
        ] {
            let argv = base.iter().chain(extra.iter());
            assert!(JailerArgs::try_parse_from(argv).is_err(), "{extra:?}");
        }
        // Parsed, but refused by validation (before touching the system).
        let argv = base.iter().chain(["--dir", "/dev/x"].iter());
        let spec = JailerArgs::try_parse_from(argv).unwrap().into_spec();
        let e = setup(&spec).unwrap_err();
        assert_eq!(e.step, Step::Validate);
        assert!(e.to_string().contains("reserved"), "{e}");
    }

    #[test]
    fn caps_are_readable() {
        let (eff, perm, _) = capabilities().unwrap();
        if nix::unistd::geteuid().is_root() {
            assert_ne!(eff, 0);
            assert_ne!(perm, 0);
        }
    }
}
