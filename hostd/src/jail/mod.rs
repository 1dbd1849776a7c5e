//! Jails for VMM processes (see `ember-jailer`). Placeholder API; the
//! jailer is being written on its own branch.
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Default)]
pub struct Bind {
    pub host: PathBuf,
    pub jail: PathBuf,
    pub writable: bool,
}

impl Bind {
    pub fn read_only(host: &Path, jail: &str) -> Bind {
        Bind { host: host.into(), jail: jail.into(), writable: false }
    }
    pub fn writable(host: &Path, jail: &str) -> Bind {
        Bind { host: host.into(), jail: jail.into(), writable: true }
    }
}

#[derive(Debug, Clone, Default)]
pub struct JailSpec {
    pub id: String,
    pub exec_file: PathBuf,
    pub chroot_base: PathBuf,
    pub uid: u32,
    pub gid: u32,
    pub binds: Vec<Bind>,
    pub dirs: Vec<PathBuf>,
    pub memory_limit_bytes: Option<u64>,
    pub cpus: Option<f64>,
    pub args: Vec<String>,
}

impl JailSpec {
    pub fn root(&self) -> PathBuf {
        self.chroot_base.join(&self.id).join("root")
    }
    pub fn command(&self, jailer: &Path) -> std::process::Command {
        std::process::Command::new(jailer)
    }
}

pub fn cleanup(_base: &Path, _id: &str) -> std::io::Result<()> {
    Ok(())
}
