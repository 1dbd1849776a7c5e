//! The jail's cgroup `ember/<id>`: cgroup v2 (unified hierarchy at
//! `/sys/fs/cgroup`) or cgroup v1 (one hierarchy per controller), chosen
//! at run time from `/proc/self/mountinfo`.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use thiserror::Error;

use super::mounts::{self, MountInfo};

/// The cgroup under which every jail's cgroup is created, at the top of
/// each hierarchy.
pub const CGROUP_PARENT: &str = "ember";

/// The v2 controllers a jail's cgroup gets, when the host has them.
const V2_CONTROLLERS: [&str; 2] = ["memory", "cpu"];

#[derive(Debug, Error)]
#[error("{0}")]
pub struct CgroupError(pub String);

/// Where the cgroup filesystems are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// The unified hierarchy.
    V2 { mount: PathBuf },
    /// Separate hierarchies (the same path twice when co-mounted, as
    /// `cpu,cpuacct`).
    V1 {
        memory: Option<PathBuf>,
        cpu: Option<PathBuf>,
        cpuacct: Option<PathBuf>,
    },
}

/// Resource limits for a jail's cgroup.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    pub memory_bytes: Option<u64>,
    /// CFS quota and period in microseconds.
    pub cpu: Option<(u64, u64)>,
}

/// Usage counters of a jail's cgroup.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CgroupStats {
    /// Memory charged now, in bytes (page cache included).
    pub memory_current: u64,
    /// The high-water mark, when the kernel keeps one.
    pub memory_peak: Option<u64>,
    /// CPU time used, in microseconds, when available.
    pub cpu_usage_us: Option<u64>,
}

/// Picks the layout from the mount table: cgroup2 mounted at
/// `/sys/fs/cgroup` is v2; otherwise v1 hierarchies holding memory or cpu;
/// otherwise any cgroup2 mount.
pub fn layout_from(mounts: &[MountInfo]) -> Option<Layout> {
    if let Some(m) = mounts
        .iter()
        .find(|m| m.fs_type == "cgroup2" && m.mount_point == Path::new("/sys/fs/cgroup"))
    {
        return Some(Layout::V2 {
            mount: m.mount_point.clone(),
        });
    }
    let v1 = |ctrl: &str| {
        mounts
            .iter()
            .find(|m| m.fs_type == "cgroup" && m.super_options.split(',').any(|o| o == ctrl))
            .map(|m| m.mount_point.clone())
    };
    let (memory, cpu, cpuacct) = (v1("memory"), v1("cpu"), v1("cpuacct"));
    if memory.is_some() || cpu.is_some() {
        return Some(Layout::V1 {
            memory,
            cpu,
            cpuacct,
        });
    }
    mounts
        .iter()
        .find(|m| m.fs_type == "cgroup2")
        .map(|m| Layout::V2 {
            mount: m.mount_point.clone(),
        })
}

/// This host's cgroup layout (`None`: no cgroup filesystem mounted).
pub fn detect() -> io::Result<Option<Layout>> {
    Ok(layout_from(&mounts::mountinfo()?))
}

fn read(path: &Path) -> Result<String, CgroupError> {
    std::fs::read_to_string(path)
        .map_err(|e| CgroupError(format!("cannot read {}: {e}", path.display())))
}

/// Writes an existing cgroup file (never creates one).
fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    use std::io::Write;
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|mut f| f.write_all(value.as_bytes()))
        .map_err(|e| CgroupError(format!("cannot write {value:?} to {}: {e}", path.display())))
}

fn mkdir(path: &Path) -> Result<(), CgroupError> {
    std::fs::create_dir_all(path)
        .map_err(|e| CgroupError(format!("cannot create cgroup {}: {e}", path.display())))
}

fn read_u64(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

impl Layout {
    /// The hierarchies (v1) or the single hierarchy (v2), deduplicated.
    pub fn hierarchies(&self) -> Vec<&Path> {
        let mut v: Vec<&Path> = match self {
            Layout::V2 { mount } => vec![mount],
            Layout::V1 {
                memory,
                cpu,
                cpuacct,
            } => [memory, cpu, cpuacct]
                .into_iter()
                .flatten()
                .map(PathBuf::as_path)
                .collect(),
        };
        let mut seen = Vec::new();
        v.retain(|p| {
            let new = !seen.contains(p);
            seen.push(*p);
            new
        });
        v
    }

    /// The jail's cgroup directories: `<hierarchy>/ember/<id>` for each.
    pub fn dirs(&self, id: &str) -> Vec<PathBuf> {
        self.hierarchies()
            .into_iter()
            .map(|h| h.join(CGROUP_PARENT).join(id))
            .collect()
    }

    /// The `(file, value)` writes that set `limits` in the jail's cgroup
    /// directory of hierarchy `h`. The bool is true for writes that may
    /// fail harmlessly (swap limits where swap accounting is off).
    pub fn limit_writes(&self, h: &Path, limits: &Limits) -> Vec<(&'static str, String, bool)> {
        let mut w = Vec::new();
        match self {
            Layout::V2 { .. } => {
                if let Some(m) = limits.memory_bytes {
                    w.push(("memory.max", m.to_string(), false));
                    w.push(("memory.swap.max", "0".to_string(), true));
                }
                if let Some((quota, period)) = limits.cpu {
                    w.push(("cpu.max", format!("{quota} {period}"), false));
                }
            }
            Layout::V1 { memory, cpu, .. } => {
                if let (Some(m), Some(mh)) = (limits.memory_bytes, memory) {
                    if mh == h {
                        w.push(("memory.limit_in_bytes", m.to_string(), false));
                        // Memory plus swap: no swap beyond the memory limit.
                        w.push(("memory.memsw.limit_in_bytes", m.to_string(), true));
                    }
                }
                if let (Some((quota, period)), Some(ch)) = (limits.cpu, cpu) {
                    if ch == h {
                        w.push(("cpu.cfs_period_us", period.to_string(), false));
                        w.push(("cpu.cfs_quota_us", quota.to_string(), false));
                    }
                }
            }
        }
        w
    }

    /// v2: the cgroups whose `cgroup.subtree_control` must list the
    /// controllers for the jail's cgroup to have them: the hierarchy's
    /// root and `ember`.
    pub fn v2_subtree_dirs(mount: &Path) -> [PathBuf; 2] {
        [mount.to_path_buf(), mount.join(CGROUP_PARENT)]
    }

    /// Creates the jail's cgroup, sets `limits` and moves `pid` into it.
    /// Returns the cgroup directories.
    pub fn join(&self, id: &str, limits: &Limits, pid: u32) -> Result<Vec<PathBuf>, CgroupError> {
        match self {
            Layout::V1 { memory, cpu, .. } => {
                if limits.memory_bytes.is_some() && memory.is_none() {
                    return Err(CgroupError(
                        "memory limit given, but no cgroup v1 memory hierarchy is mounted".into(),
                    ));
                }
                if limits.cpu.is_some() && cpu.is_none() {
                    return Err(CgroupError(
                        "CPU limit given, but no cgroup v1 cpu hierarchy is mounted".into(),
                    ));
                }
            }
            Layout::V2 { mount } => {
                let available = read(&mount.join("cgroup.controllers"))?;
                let has = |c: &str| available.split_whitespace().any(|a| a == c);
                for (needed, ctrl) in [
                    (limits.memory_bytes.is_some(), "memory"),
                    (limits.cpu.is_some(), "cpu"),
                ] {
                    if needed && !has(ctrl) {
                        return Err(CgroupError(format!(
                            "{ctrl} limit given, but the {ctrl} controller is not available in {}",
                            mount.display()
                        )));
                    }
                }
                let wanted: Vec<&str> = V2_CONTROLLERS.into_iter().filter(|c| has(c)).collect();
                for dir in Layout::v2_subtree_dirs(mount) {
                    mkdir(&dir)?;
                    let file = dir.join("cgroup.subtree_control");
                    let enabled = read(&file)?;
                    let missing: Vec<String> = wanted
                        .iter()
                        .filter(|c| !enabled.split_whitespace().any(|e| e == **c))
                        .map(|c| format!("+{c}"))
                        .collect();
                    if !missing.is_empty() {
                        write(&file, &missing.join(" "))?;
                    }
                }
            }
        }
        let dirs = self.dirs(id);
        for (h, dir) in self.hierarchies().into_iter().zip(&dirs) {
            mkdir(dir)?;
            for (file, value, optional) in self.limit_writes(h, limits) {
                let path = dir.join(file);
                if optional && !path.exists() {
                    continue;
                }
                match write(&path, &value) {
                    Err(e) if optional => log::warn!("{e} (optional, ignored)"),
                    r => r?,
                }
            }
        }
        for dir in &dirs {
            write(&dir.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(dirs)
    }

    /// Removes the jail's cgroup directories (they must hold no process;
    /// a cgroup whose last process was just reaped may stay busy a moment,
    /// so EBUSY is retried for up to a second).
    pub fn remove(&self, id: &str) -> Result<(), CgroupError> {
        for dir in self.dirs(id) {
            let mut tries = 0;
            loop {
                match std::fs::remove_dir(&dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) && tries < 50 => {
                        tries += 1;
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => {
                        return Err(CgroupError(format!(
                            "cannot remove cgroup {}: {e}",
                            dir.display()
                        )))
                    }
                }
            }
        }
        Ok(())
    }

    /// Memory (and CPU time where cheap) used by the jail's cgroup; `None`
    /// when it does not exist.
    pub fn usage(&self, id: &str) -> Option<CgroupStats> {
        let at = |h: &Path, f: &str| h.join(CGROUP_PARENT).join(id).join(f);
        match self {
            Layout::V2 { mount } => Some(CgroupStats {
                memory_current: read_u64(&at(mount, "memory.current"))?,
                memory_peak: read_u64(&at(mount, "memory.peak")),
                cpu_usage_us: std::fs::read_to_string(at(mount, "cpu.stat"))
                    .ok()
                    .and_then(|s| {
                        s.lines()
                            .find_map(|l| l.strip_prefix("usage_usec "))
                            .and_then(|v| v.trim().parse().ok())
                    }),
            }),
            Layout::V1 {
                memory, cpuacct, ..
            } => {
                let memory = memory.as_ref()?;
                Some(CgroupStats {
                    memory_current: read_u64(&at(memory, "memory.usage_in_bytes"))?,
                    memory_peak: read_u64(&at(memory, "memory.max_usage_in_bytes")),
                    cpu_usage_us: cpuacct
                        .as_ref()
                        .and_then(|c| read_u64(&at(c, "cpuacct.usage")))
                        .map(|ns| ns / 1000),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jail::mounts::parse_mountinfo;

    const V1_HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw
";
    const V1_COMOUNTED: &str = "\
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
";
    const V2: &str = "\
30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate
";

    #[test]
    fn detects_layouts() {
        let cg = Path::new("/sys/fs/cgroup");
        assert_eq!(
            layout_from(&parse_mountinfo(V1_HYBRID)),
            Some(Layout::V1 {
                memory: Some(cg.join("memory")),
                cpu: Some(cg.join("cpu")),
                cpuacct: Some(cg.join("cpuacct")),
            })
        );
        let co = layout_from(&parse_mountinfo(V1_COMOUNTED)).unwrap();
        assert_eq!(
            co.dirs("j1"),
            vec![cg.join("memory/ember/j1"), cg.join("cpu,cpuacct/ember/j1")]
        );
        let v2 = layout_from(&parse_mountinfo(V2)).unwrap();
        assert_eq!(
            v2,
            Layout::V2 {
                mount: cg.to_path_buf()
            }
        );
        assert_eq!(v2.dirs("j1"), vec![cg.join("ember/j1")]);
        assert_eq!(
            Layout::v2_subtree_dirs(cg),
            [cg.to_path_buf(), cg.join("ember")]
        );
        assert_eq!(layout_from(&parse_mountinfo("")), None);
        // Only a cgroup2 elsewhere: use it.
        let other = "1 1 0:1 / /mnt/cg rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            layout_from(&parse_mountinfo(other)),
            Some(Layout::V2 {
                mount: "/mnt/cg".into()
            })
        );
    }

    #[test]
    fn limit_files() {
        let limits = Limits {
            memory_bytes: Some(256 << 20),
            cpu: Some((50_000, 100_000)),
        };
        let v2 = layout_from(&parse_mountinfo(V2)).unwrap();
        assert_eq!(
            v2.limit_writes(Path::new("/sys/fs/cgroup"), &limits),
            vec![
                ("memory.max", "268435456".to_string(), false),
                ("memory.swap.max", "0".to_string(), true),
                ("cpu.max", "50000 100000".to_string(), false),
            ]
        );
        let v1 = layout_from(&parse_mountinfo(V1_HYBRID)).unwrap();
        let mem = v1.limit_writes(Path::new("/sys/fs/cgroup/memory"), &limits);
        assert_eq!(mem[0], ("memory.limit_in_bytes", "268435456".into(), false));
        assert_eq!(mem.len(), 2);
        let cpu = v1.limit_writes(Path::new("/sys/fs/cgroup/cpu"), &limits);
        assert_eq!(
            cpu,
            vec![
                ("cpu.cfs_period_us", "100000".to_string(), false),
                ("cpu.cfs_quota_us", "50000".to_string(), false),
            ]
        );
        assert!(v1
            .limit_writes(Path::new("/sys/fs/cgroup/cpuacct"), &limits)
            .is_empty());
        assert!(v2
            .limit_writes(Path::new("/sys/fs/cgroup"), &Limits::default())
            .is_empty());
    }

    /// The v2 join on a fake cgroupfs (plain files standing in for the
    /// kernel's interface files).
    #[test]
    fn v2_join_on_a_fake_tree() {
        let t = tempfile::tempdir().unwrap();
        let m = t.path();
        let leaf = m.join("ember/j1");
        std::fs::create_dir_all(&leaf).unwrap();
        std::fs::write(m.join("cgroup.controllers"), "cpuset cpu io memory pids\n").unwrap();
        std::fs::write(m.join("cgroup.subtree_control"), "cpu\n").unwrap();
        std::fs::write(m.join("ember/cgroup.subtree_control"), "").unwrap();
        for f in ["memory.max", "cpu.max", "cgroup.procs"] {
            std::fs::write(leaf.join(f), "").unwrap();
        }
        let layout = Layout::V2 {
            mount: m.to_path_buf(),
        };
        let limits = Limits {
            memory_bytes: Some(1 << 30),
            cpu: Some((150_000, 100_000)),
        };
        assert_eq!(
            layout.join("j1", &limits, 4242).unwrap(),
            vec![leaf.clone()]
        );
        let rd = |p: PathBuf| std::fs::read_to_string(p).unwrap();
        assert_eq!(rd(m.join("cgroup.subtree_control")), "+memory");
        assert_eq!(rd(m.join("ember/cgroup.subtree_control")), "+memory +cpu");
        assert_eq!(rd(leaf.join("memory.max")), "1073741824");
        assert_eq!(rd(leaf.join("cpu.max")), "150000 100000");
        assert_eq!(rd(leaf.join("cgroup.procs")), "4242");
        // No memory.swap.max here (swap accounting off): skipped.
        assert!(!leaf.join("memory.swap.max").exists());

        std::fs::write(leaf.join("memory.current"), "12345\n").unwrap();
        std::fs::write(leaf.join("cpu.stat"), "usage_usec 777\nuser_usec 1\n").unwrap();
        assert_eq!(
            layout.usage("j1"),
            Some(CgroupStats {
                memory_current: 12345,
                memory_peak: None,
                cpu_usage_us: Some(777),
            })
        );
        assert_eq!(layout.usage("other"), None);

        // A controller the host lacks is an error when a limit needs it.
        std::fs::write(m.join("cgroup.controllers"), "cpu\n").unwrap();
        let e = layout.join("j1", &limits, 1).unwrap_err();
        assert!(e.0.contains("memory limit given"), "{e}");

        for f in std::fs::read_dir(&leaf).unwrap() {
            std::fs::remove_file(f.unwrap().path()).unwrap();
        }
        layout.remove("j1").unwrap();
        assert!(!leaf.exists());
        layout.remove("j1").unwrap();
    }
}
