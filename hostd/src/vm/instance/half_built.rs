//! The one guard over an instance being built (booted, restored or
//! received): whatever the build has made so far (its disk directory,
//! its network namespace, the VMM process and its jail) is destroyed if
//! the build fails, and in the background if the build is abandoned (its
//! future dropped), so no build step cleans up after itself.

use std::path::PathBuf;

use super::{new_id, teardown_net, Instance, InstanceError, LaunchConfig, NetPart};

/// What a build has made so far; the disk directory and the namespace
/// move into the instance once the VMM process exists.
#[derive(Default)]
pub(super) struct Parts {
    /// The instance's own disk directory, before the instance exists.
    pub(super) disk_dir: Option<PathBuf>,
    /// Its network namespace, before the instance exists.
    pub(super) net: Option<NetPart>,
    pub(super) inst: Option<Instance>,
}

impl Parts {
    fn is_empty(&self) -> bool {
        self.disk_dir.is_none() && self.net.is_none() && self.inst.is_none()
    }

    /// Kills the VMM and removes its files, namespace and disks (and those
    /// the build made before the VMM existed).
    async fn destroy(self) {
        if let Some(inst) = self.inst {
            inst.destroy().await;
        }
        if let Some(net) = self.net {
            teardown_net(net).await;
        }
        if let Some(dir) = self.disk_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }

    /// [`Parts::destroy`] without a runtime: the instance's own drop
    /// kills the VMM and removes its namespace; a daemon's next start
    /// removes the files left in its run directory.
    fn destroy_now(self) {
        drop(self.inst);
        if let Some((manager, net)) = self.net {
            std::thread::spawn(move || manager.teardown(&net));
        }
        if let Some(dir) = self.disk_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// An instance being built: destroyed, with all its build made, unless
/// [`HalfBuilt::finish`] answers it.
#[derive(Default)]
pub(super) struct HalfBuilt {
    pub(super) parts: Parts,
}

impl HalfBuilt {
    /// A fresh directory (0700, root's until the VMM is given it) for the
    /// instance's own disks, in the disk directory; removed if the build
    /// fails.
    pub(super) fn new_disk_dir(
        &mut self,
        cfg: &LaunchConfig,
    ) -> std::io::Result<crate::beneath::Dir> {
        let dir = crate::ephemeral::new_dir(&cfg.disk_dir, &new_id())?;
        self.parts.disk_dir = Some(dir.path().to_path_buf());
        Ok(dir)
    }

    /// Runs the build `steps` under a new guard: the instance they made
    /// if they succeed, otherwise (having destroyed all they made) their
    /// error.
    pub(super) async fn build(
        steps: impl AsyncFnOnce(&mut HalfBuilt) -> Result<(), InstanceError>,
    ) -> Result<Instance, InstanceError> {
        let mut half = HalfBuilt::default();
        let built = steps(&mut half).await;
        half.finish(built).await
    }

    /// The one exit of a build: the instance if `built` is Ok, otherwise
    /// (having destroyed all the build made) the error.
    async fn finish(mut self, built: Result<(), InstanceError>) -> Result<Instance, InstanceError> {
        let made = built.and_then(|()| {
            self.parts
                .inst
                .take()
                .ok_or_else(|| InstanceError::Spawn("the build started no VMM".into()))
        });
        if made.is_err() {
            std::mem::take(&mut self.parts).destroy().await;
        }
        made
    }
}

impl Drop for HalfBuilt {
    /// A build abandoned midway (its caller gone) is destroyed off the
    /// caller's path.
    fn drop(&mut self) {
        if self.parts.is_empty() {
            return;
        }
        let parts = std::mem::take(&mut self.parts);
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(parts.destroy());
            }
            Err(_) => parts.destroy_now(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::process::Placement;
    use super::*;

    /// A launch configuration whose run and disk directories are in a
    /// new temporary directory (removed when dropped).
    fn scratch() -> (tempfile::TempDir, LaunchConfig) {
        let base = tempfile::tempdir().unwrap();
        let cfg = LaunchConfig {
            vmm_bin: PathBuf::from("/bin/false"),
            jail: None,
            run_dir: base.path().join("run"),
            disk_dir: base.path().join("disks"),
            boot_args: None,
            boot_timeout: Duration::from_secs(1),
            working_sets: false,
        };
        (base, cfg)
    }

    /// What an instance leaves on the host while it lives.
    struct Traces {
        exit: tokio::sync::watch::Receiver<Option<String>>,
        host_dir: PathBuf,
        log_path: PathBuf,
        disks: PathBuf,
    }

    impl Traces {
        fn all_gone(&self) -> bool {
            self.exit.borrow().is_some()
                && !self.host_dir.exists()
                && !self.log_path.exists()
                && !self.disks.exists()
        }

        fn all_there(&self) -> bool {
            self.exit.borrow().is_none()
                && self.host_dir.is_dir()
                && self.log_path.is_file()
                && self.disks.is_dir()
        }
    }

    /// The first steps of a restore, with a stand-in VMM process
    /// (`sleep`, unjailed, its working directory and log in the run
    /// directory as a VMM's are): a disk directory, then the VMM, which
    /// takes the disk directory.
    fn start(half: &mut HalfBuilt, cfg: &LaunchConfig) -> Traces {
        let disks = half.new_disk_dir(cfg).unwrap().path().to_path_buf();
        let id = new_id();
        let host_dir = cfg.run_dir.join("instances").join(&id);
        std::fs::create_dir_all(&host_dir).unwrap();
        let log_path = cfg.run_dir.join(format!("{id}.log"));
        std::fs::write(&log_path, "started\n").unwrap();
        let child = tokio::process::Command::new("sleep")
            .arg("600")
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let place = Placement {
            id,
            host_dir: host_dir.clone(),
            jail: None,
            log_path: log_path.clone(),
        };
        let inst = Instance::of_process(place, child, None);
        inst.own_disks(half.parts.disk_dir.take());
        let traces = Traces {
            exit: inst.exit.clone(),
            host_dir,
            log_path,
            disks,
        };
        assert!(traces.all_there());
        half.parts.inst = Some(inst);
        traces
    }

    fn failed(why: &str) -> Result<(), InstanceError> {
        Err(InstanceError::Config(why.into()))
    }

    /// The error a build ended with.
    fn error_of(built: Result<Instance, InstanceError>) -> String {
        built.err().expect("the build failed").to_string()
    }

    /// A build that starts (see [`start`]) and then ends with `end`.
    async fn build_ending(
        end: Result<(), InstanceError>,
    ) -> (tempfile::TempDir, Result<Instance, InstanceError>, Traces) {
        let (base, cfg) = scratch();
        let mut traces = None;
        let built = HalfBuilt::build(async |half| {
            traces = Some(start(half, &cfg));
            end
        })
        .await;
        (base, built, traces.expect("the build ran"))
    }

    #[tokio::test]
    async fn a_build_failing_before_its_vmm_removes_its_disk_dir() {
        let (_base, cfg) = scratch();
        let mut disks = None;
        let built = HalfBuilt::build(async |half| {
            disks = Some(half.new_disk_dir(&cfg)?.path().to_path_buf());
            failed("early")
        })
        .await;
        assert!(error_of(built).contains("early"));
        let disks = disks.unwrap();
        assert!(!disks.exists(), "{} left", disks.display());
    }

    #[tokio::test]
    async fn a_failed_build_kills_its_vmm_and_removes_its_files() {
        let (_base, built, traces) = build_ending(failed("late")).await;
        assert!(error_of(built).contains("late"));
        // Destroyed before the error is answered.
        assert!(traces.all_gone());
    }

    #[tokio::test]
    async fn an_abandoned_build_is_destroyed_in_the_background() {
        let (_base, cfg) = scratch();
        let mut half = HalfBuilt::default();
        let traces = start(&mut half, &cfg);
        drop(half);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !traces.all_gone() {
            assert!(std::time::Instant::now() < deadline, "not destroyed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn a_finished_build_answers_its_instance_intact() {
        let (_base, built, traces) = build_ending(Ok(())).await;
        let inst = built.unwrap_or_else(|e| panic!("{e}"));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(traces.all_there());
        assert!(inst.is_alive());
        inst.destroy().await;
        assert!(traces.all_gone());
    }

    #[tokio::test]
    async fn a_build_that_started_no_vmm_is_an_error() {
        let built = HalfBuilt::build(async |_| Ok(())).await;
        assert!(error_of(built).contains("started no VMM"));
    }
}
