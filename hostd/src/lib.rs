//! Ember's host daemon: functions on warm microVMs.
//!
//! * [`jail`]: running each VMM in its own chroot, mount namespace and
//!   cgroup, unprivileged (the `ember-jailer` binary and hostd's view of a jail).
pub mod api;
pub mod beneath;
pub mod cluster;
pub mod code;
pub mod daemon;
pub mod ephemeral;
pub mod functions;
pub mod invoke;
pub mod jail;
pub mod migrate;
pub mod model;
pub mod net;
pub mod oom;
pub mod pool;
pub mod queue;
pub mod store;
pub mod vm;
pub mod volumes;
