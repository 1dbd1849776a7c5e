//! [`JailSpec`]: what one jail holds, its validation, and the
//! `ember-jailer` command line that builds it.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::process::Command;

use thiserror::Error;

/// Where jails are created unless told otherwise: `<base>/<id>/root`.
pub const DEFAULT_CHROOT_BASE: &str = "/srv/ember-jail";

/// The CFS period used for CPU limits, in microseconds.
pub const CPU_PERIOD_US: u64 = 100_000;

/// An invalid [`JailSpec`] or `ember-jailer` argument.
#[derive(Debug, Error, PartialEq)]
pub enum SpecError {
    #[error("invalid id {0:?}: want 1 to 64 characters of [A-Za-z0-9-]")]
    Id(String),
    #[error("{what} {path:?} must be an absolute path")]
    NotAbsolute { what: &'static str, path: PathBuf },
    #[error("jail path {0:?} must be absolute, not \"/\", without \".\", \"..\" or \":\"")]
    JailPath(PathBuf),
    #[error("jail path {0:?} is reserved (/dev, /proc or the exec file)")]
    Reserved(PathBuf),
    #[error("jail path {0:?} overlaps the bind mount at {1:?}")]
    Overlap(PathBuf, PathBuf),
    #[error("invalid bind {0:?}: want HOST_PATH:JAIL_PATH[:rw|:ro]")]
    Bind(String),
    #[error("exec file {0:?} has no usable file name")]
    ExecFile(PathBuf),
    #[error("uid/gid 0 needs --allow-root (debugging only)")]
    Root,
    #[error("memory limit must be at least 1 MiB, got {0} bytes")]
    Memory(u64),
    #[error("CPU limit must be between 0.01 and 1024 CPUs, got {0}")]
    Cpus(f64),
}

/// A host file or directory bound into the jail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    pub host: PathBuf,
    /// Absolute path inside the jail.
    pub jail: PathBuf,
    /// Read-write instead of the default read-only.
    pub writable: bool,
}

impl Bind {
    pub fn read_only(host: impl Into<PathBuf>, jail: impl Into<PathBuf>) -> Bind {
        Bind {
            host: host.into(),
            jail: jail.into(),
            writable: false,
        }
    }

    pub fn read_write(host: impl Into<PathBuf>, jail: impl Into<PathBuf>) -> Bind {
        Bind {
            writable: true,
            ..Bind::read_only(host, jail)
        }
    }

    /// Parses `HOST_PATH:JAIL_PATH[:rw|:ro]` (paths cannot hold `:`).
    pub fn parse(s: &OsStr) -> Result<Bind, SpecError> {
        let err = || SpecError::Bind(s.to_string_lossy().into_owned());
        let parts: Vec<&[u8]> = s.as_bytes().split(|b| *b == b':').collect();
        let (host, jail, writable) = match parts.as_slice() {
            [h, j] => (h, j, false),
            [h, j, b"rw"] => (h, j, true),
            [h, j, b"ro"] => (h, j, false),
            _ => return Err(err()),
        };
        if host.is_empty() || jail.is_empty() {
            return Err(err());
        }
        Ok(Bind {
            host: PathBuf::from(OsStr::from_bytes(host)),
            jail: PathBuf::from(OsStr::from_bytes(jail)),
            writable,
        })
    }

    /// The `--bind` argument for this bind.
    pub fn to_arg(&self) -> OsString {
        let mut s = OsString::from(self.host.as_os_str());
        s.push(":");
        s.push(self.jail.as_os_str());
        if self.writable {
            s.push(":rw");
        }
        s
    }
}

/// Optional device nodes (`/dev/kvm` is always created).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Device {
    /// `/dev/net/tun` (10:200), for tap network devices.
    Tun,
    /// `/dev/userfaultfd` (10:257 where present), for UFFD snapshot restore.
    Userfaultfd,
}

impl Device {
    pub fn arg(self) -> &'static str {
        match self {
            Device::Tun => "tun",
            Device::Userfaultfd => "userfaultfd",
        }
    }
}

/// Resource limits of the jailed program (soft = hard; None: inherited).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResourceLimits {
    /// RLIMIT_FSIZE: the largest file it may write, in bytes.
    pub fsize: Option<u64>,
    /// RLIMIT_NOFILE: descriptors open at once.
    pub nofile: Option<u64>,
    /// RLIMIT_NPROC: processes and threads of its uid.
    pub nproc: Option<u64>,
}

/// One jail: the chroot `<chroot_base>/<id>/root` with its cgroup
/// `ember/<id>`, running `exec_file` as `uid:gid`.
#[derive(Debug, Clone, PartialEq)]
pub struct JailSpec {
    pub id: String,
    /// The program to copy into the jail and run (normally `ember-vmm`).
    pub exec_file: PathBuf,
    pub chroot_base: PathBuf,
    pub uid: u32,
    pub gid: u32,
    /// Allow uid or gid 0 (debugging only).
    pub allow_root: bool,
    pub binds: Vec<Bind>,
    /// Directories created inside the jail, owned by `uid:gid`.
    pub dirs: Vec<PathBuf>,
    pub devices: Vec<Device>,
    /// Memory limit in bytes.
    pub memory_limit: Option<u64>,
    /// CPU limit in CPUs (fractional: 0.5 is half a CPU).
    pub cpus: Option<f64>,
    /// A network namespace to join (e.g. `/var/run/netns/NAME`).
    pub netns: Option<PathBuf>,
    /// Mount a minimal procfs at `/proc` (only the jail's own processes).
    pub proc: bool,
    /// SIGKILL the program when the spawning thread exits (`--die-with-parent`).
    pub die_with_parent: bool,
    pub limits: ResourceLimits,
    /// Arguments for the exec file.
    pub args: Vec<OsString>,
}

impl JailSpec {
    /// A spec with no binds, dirs, limits or arguments, under
    /// [`DEFAULT_CHROOT_BASE`].
    pub fn new(id: impl Into<String>, exec_file: impl Into<PathBuf>, uid: u32, gid: u32) -> Self {
        JailSpec {
            id: id.into(),
            exec_file: exec_file.into(),
            chroot_base: PathBuf::from(DEFAULT_CHROOT_BASE),
            uid,
            gid,
            allow_root: false,
            binds: Vec::new(),
            dirs: Vec::new(),
            devices: Vec::new(),
            memory_limit: None,
            cpus: None,
            netns: None,
            proc: false,
            die_with_parent: false,
            limits: ResourceLimits::default(),
            args: Vec::new(),
        }
    }

    /// `<chroot_base>/<id>`: the jail's directory (removed by `cleanup`).
    pub fn jail_dir(&self) -> PathBuf {
        self.chroot_base.join(&self.id)
    }

    /// `<chroot_base>/<id>/root`: the jail's `/` as seen from the host.
    pub fn root(&self) -> PathBuf {
        self.jail_dir().join("root")
    }

    /// The exec file's name: it runs as `/<name>` in the jail.
    pub fn exec_name(&self) -> Result<&OsStr, SpecError> {
        match self.exec_file.file_name() {
            Some(n) if !n.as_bytes().contains(&b':') => Ok(n),
            _ => Err(SpecError::ExecFile(self.exec_file.clone())),
        }
    }

    /// Where `jail_path` (absolute, inside the jail) is on the host: under
    /// a bind, the bound host path; elsewhere under [`JailSpec::root`]
    /// (for example the API socket `/run/api.sock`).
    pub fn host_path(&self, jail_path: &Path) -> PathBuf {
        let rel = jail_path.strip_prefix("/").unwrap_or(jail_path);
        for b in &self.binds {
            let bind_rel = b.jail.strip_prefix("/").unwrap_or(&b.jail);
            if let Ok(rest) = rel.strip_prefix(bind_rel) {
                return if rest.as_os_str().is_empty() {
                    b.host.clone()
                } else {
                    b.host.join(rest)
                };
            }
        }
        self.root().join(rel)
    }

    /// Gives a host-created file inside the jail (e.g. the vsock listener
    /// `<uds_path>_53`) to the jail's uid:gid so the jailed process can use it.
    /// A link there (the jail's directories are its uid's to write)
    /// changes owner itself; what it points to does not.
    pub fn give_to_jail(&self, host_path: &Path) -> std::io::Result<()> {
        std::os::unix::fs::lchown(host_path, Some(self.uid), Some(self.gid))
    }

    /// Checks everything the jailer checks before touching the system.
    pub fn validate(&self) -> Result<(), SpecError> {
        validate_id(&self.id)?;
        if !self.exec_file.is_absolute() {
            return Err(SpecError::NotAbsolute {
                what: "exec file",
                path: self.exec_file.clone(),
            });
        }
        let exec = Path::new("/").join(self.exec_name()?);
        if !self.chroot_base.is_absolute() {
            return Err(SpecError::NotAbsolute {
                what: "chroot base",
                path: self.chroot_base.clone(),
            });
        }
        if (self.uid == 0 || self.gid == 0) && !self.allow_root {
            return Err(SpecError::Root);
        }
        if let Some(m) = self.memory_limit {
            if m < 1 << 20 {
                return Err(SpecError::Memory(m));
            }
        }
        if let Some(c) = self.cpus {
            if !(0.01..=1024.0).contains(&c) {
                return Err(SpecError::Cpus(c));
            }
        }
        if let Some(n) = &self.netns {
            if !n.is_absolute() {
                return Err(SpecError::NotAbsolute {
                    what: "netns",
                    path: n.clone(),
                });
            }
        }
        let reserved = |p: &Path| p.starts_with("/dev") || p.starts_with("/proc") || p == exec;
        for (i, b) in self.binds.iter().enumerate() {
            if !b.host.is_absolute() {
                return Err(SpecError::NotAbsolute {
                    what: "bind host path",
                    path: b.host.clone(),
                });
            }
            check_jail_path(&b.jail)?;
            if reserved(&b.jail) {
                return Err(SpecError::Reserved(b.jail.clone()));
            }
            if let Some(o) = self.binds[..i]
                .iter()
                .find(|o| o.jail.starts_with(&b.jail) || b.jail.starts_with(&o.jail))
            {
                return Err(SpecError::Overlap(b.jail.clone(), o.jail.clone()));
            }
        }
        for d in &self.dirs {
            check_jail_path(d)?;
            if reserved(d) {
                return Err(SpecError::Reserved(d.clone()));
            }
            // A directory inside a bind would be created on the host.
            if let Some(o) = self.binds.iter().find(|o| d.starts_with(&o.jail)) {
                return Err(SpecError::Overlap(d.clone(), o.jail.clone()));
            }
        }
        Ok(())
    }

    /// The CFS quota for the CPU limit, per [`CPU_PERIOD_US`].
    pub fn cpu_quota_us(&self) -> Option<u64> {
        self.cpus.map(cpu_quota_us)
    }

    /// The `ember-jailer` arguments for this spec.
    pub fn jailer_args(&self) -> Vec<OsString> {
        let mut a: Vec<OsString> = Vec::new();
        let mut push = |k: &str, v: OsString| {
            a.push(k.into());
            a.push(v);
        };
        push("--id", self.id.clone().into());
        push("--exec-file", self.exec_file.clone().into());
        push("--chroot-base", self.chroot_base.clone().into());
        push("--uid", self.uid.to_string().into());
        push("--gid", self.gid.to_string().into());
        for b in &self.binds {
            push("--bind", b.to_arg());
        }
        for d in &self.dirs {
            push("--dir", d.clone().into());
        }
        for d in &self.devices {
            push("--device", d.arg().into());
        }
        if let Some(m) = self.memory_limit {
            push("--memory-limit", m.to_string().into());
        }
        if let Some(c) = self.cpus {
            push("--cpus", c.to_string().into());
        }
        if let Some(n) = &self.netns {
            push("--netns", n.clone().into());
        }
        for (k, v) in [
            ("--rlimit-fsize", self.limits.fsize),
            ("--rlimit-nofile", self.limits.nofile),
            ("--rlimit-nproc", self.limits.nproc),
        ] {
            if let Some(v) = v {
                push(k, v.to_string().into());
            }
        }
        if self.allow_root {
            a.push("--allow-root".into());
        }
        if self.proc {
            a.push("--proc".into());
        }
        if self.die_with_parent {
            a.push("--die-with-parent".into());
        }
        a.push("--".into());
        a.extend(self.args.iter().cloned());
        a
    }

    /// The jailer invocation: `jailer [options] -- args...`. The caller
    /// sets stdio and spawns it; the child's pid is the jailed process's.
    pub fn command(&self, jailer: &Path) -> Command {
        let mut c = Command::new(jailer);
        c.args(self.jailer_args());
        c
    }
}

/// The CFS quota (µs per [`CPU_PERIOD_US`]) for `cpus` CPUs.
pub fn cpu_quota_us(cpus: f64) -> u64 {
    ((cpus * CPU_PERIOD_US as f64).round() as u64).max(1000)
}

/// `[A-Za-z0-9-]{1,64}`.
pub fn validate_id(id: &str) -> Result<(), SpecError> {
    if (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        Ok(())
    } else {
        Err(SpecError::Id(id.to_string()))
    }
}

/// Absolute, not `/`, only normal components, no `:`.
fn check_jail_path(p: &Path) -> Result<(), SpecError> {
    let mut comps = p.components();
    let ok = comps.next() == Some(Component::RootDir)
        && p.components().count() > 1
        && comps.all(|c| matches!(c, Component::Normal(_)))
        && !p.as_os_str().as_bytes().contains(&b':')
        // Path::components drops interior "." silently: compare bytes too.
        && !p.as_os_str().as_bytes().windows(3).any(|w| w == b"/./")
        && !p.as_os_str().as_bytes().ends_with(b"/.");
    if ok {
        Ok(())
    } else {
        Err(SpecError::JailPath(p.to_path_buf()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> JailSpec {
        let mut s = JailSpec::new("vm-1", "/usr/bin/ember-vmm", 12345, 12345);
        s.chroot_base = "/srv/j".into();
        s
    }

    #[test]
    fn ids() {
        assert!(validate_id("abc-DEF-123").is_ok());
        assert!(validate_id(&"a".repeat(64)).is_ok());
        for bad in ["", "a/b", "..", "a_b", "a b", "é", &"a".repeat(65)] {
            assert!(validate_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn binds_parse_and_print() {
        let b = Bind::parse(OsStr::new("/h/k:/kernel")).unwrap();
        assert_eq!(b, Bind::read_only("/h/k", "/kernel"));
        assert_eq!(b.to_arg(), "/h/k:/kernel");
        let b = Bind::parse(OsStr::new("/h/out:/out:rw")).unwrap();
        assert_eq!(b, Bind::read_write("/h/out", "/out"));
        assert_eq!(b.to_arg(), "/h/out:/out:rw");
        assert!(Bind::parse(OsStr::new("/h/k:/kernel:ro")).is_ok());
        for bad in ["/h", "/h:", ":/j", "/h:/j:rx", "/a:/b:rw:x"] {
            assert!(Bind::parse(OsStr::new(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn paths() {
        let mut s = spec();
        s.binds
            .push(Bind::read_only("/var/cache/k/vmlinux", "/kernel"));
        s.binds.push(Bind::read_write("/data/out", "/out"));
        assert_eq!(s.root(), Path::new("/srv/j/vm-1/root"));
        assert_eq!(
            s.host_path(Path::new("/run/api.sock")),
            Path::new("/srv/j/vm-1/root/run/api.sock")
        );
        assert_eq!(
            s.host_path(Path::new("/kernel")),
            Path::new("/var/cache/k/vmlinux")
        );
        assert_eq!(
            s.host_path(Path::new("/out/snap/mem")),
            Path::new("/data/out/snap/mem")
        );
        // "/outer" is not under "/out".
        assert_eq!(
            s.host_path(Path::new("/outer")),
            Path::new("/srv/j/vm-1/root/outer")
        );
    }

    #[test]
    fn validation() {
        let ok = {
            let mut s = spec();
            s.binds.push(Bind::read_only("/k", "/boot/kernel"));
            s.dirs.push("/run".into());
            s.memory_limit = Some(256 << 20);
            s.cpus = Some(1.5);
            s
        };
        ok.validate().unwrap();
        let bad = |f: &dyn Fn(&mut JailSpec)| {
            let mut s = ok.clone();
            f(&mut s);
            s.validate().unwrap_err()
        };
        assert_eq!(bad(&|s| s.id = "a/b".into()), SpecError::Id("a/b".into()));
        assert_eq!(bad(&|s| s.uid = 0), SpecError::Root);
        assert!(matches!(
            bad(&|s| s.exec_file = "ember-vmm".into()),
            SpecError::NotAbsolute { .. }
        ));
        assert!(matches!(
            bad(&|s| s.chroot_base = "srv".into()),
            SpecError::NotAbsolute { .. }
        ));
        for p in ["run", "/", "/a/../b", "/a/./b", "/a/.", "/a:b"] {
            assert_eq!(
                bad(&|s| s.dirs.push(p.into())),
                SpecError::JailPath(p.into())
            );
        }
        for p in ["/dev", "/dev/kvm", "/proc/self", "/ember-vmm"] {
            assert_eq!(
                bad(&|s| s.dirs.push(p.into())),
                SpecError::Reserved(p.into())
            );
        }
        assert!(matches!(
            bad(&|s| s.binds.push(Bind::read_only("/x", "/boot"))),
            SpecError::Overlap(..)
        ));
        assert!(matches!(
            bad(&|s| s.dirs.push("/boot/kernel/x".into())),
            SpecError::Overlap(..)
        ));
        assert!(matches!(
            bad(&|s| s.binds.push(Bind::read_only("x", "/y"))),
            SpecError::NotAbsolute { .. }
        ));
        assert_eq!(bad(&|s| s.cpus = Some(0.0)), SpecError::Cpus(0.0));
        assert!(matches!(
            bad(&|s| s.cpus = Some(f64::NAN)),
            SpecError::Cpus(_)
        ));
        assert_eq!(
            bad(&|s| s.memory_limit = Some(4096)),
            SpecError::Memory(4096)
        );
        let mut root = ok.clone();
        root.uid = 0;
        root.gid = 0;
        root.allow_root = true;
        root.validate().unwrap();
    }

    #[test]
    fn cpu_quota() {
        assert_eq!(cpu_quota_us(1.0), 100_000);
        assert_eq!(cpu_quota_us(0.5), 50_000);
        assert_eq!(cpu_quota_us(2.25), 225_000);
        assert_eq!(cpu_quota_us(0.001), 1000);
    }

    #[test]
    fn command_line() {
        let mut s = spec();
        s.binds.push(Bind::read_only("/k", "/kernel"));
        s.binds.push(Bind::read_write("/o", "/out"));
        s.dirs.push("/run".into());
        s.devices.push(Device::Userfaultfd);
        s.memory_limit = Some(1 << 30);
        s.cpus = Some(0.5);
        s.proc = true;
        s.args = vec!["--api-sock".into(), "/run/api.sock".into()];
        let c = s.command(Path::new("/usr/bin/ember-jailer"));
        assert_eq!(c.get_program(), "/usr/bin/ember-jailer");
        let args: Vec<&OsStr> = c.get_args().collect();
        let expect = [
            "--id",
            "vm-1",
            "--exec-file",
            "/usr/bin/ember-vmm",
            "--chroot-base",
            "/srv/j",
            "--uid",
            "12345",
            "--gid",
            "12345",
            "--bind",
            "/k:/kernel",
            "--bind",
            "/o:/out:rw",
            "--dir",
            "/run",
            "--device",
            "userfaultfd",
            "--memory-limit",
            "1073741824",
            "--cpus",
            "0.5",
            "--proc",
            "--",
            "--api-sock",
            "/run/api.sock",
        ];
        assert_eq!(args, expect.map(OsStr::new));
    }
}
