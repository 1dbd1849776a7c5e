//! Ember's cluster API (issue #9): several hosts as one Lambda-compatible
//! service. The `ember-cluster` binary serves [`api`]; the rest is what it
//! is built from:
//!
//! * [`sigv4`]: verifying AWS Signature Version 4 on incoming requests,
//!   so that unmodified AWS SDKs and the AWS CLI can call the cluster;
//!   [`replay`]: signatures already used, refused again.
//! * [`accounts`]: accounts and their access keys.
//! * [`hosts`]: host membership in the cluster store (leases, heartbeats).
//! * [`leader`]: one leader among the API's replicas, for background work.
//! * [`placement`]: which host an invocation goes to.
//! * [`functions`], [`code`]: functions, versions and aliases, and their
//!   zips, in the store; [`deploy`]: versions made runnable on hosts.
//! * [`invoke`] (proxied to hosts), [`queue`] (async invocations),
//!   [`concurrency`] (reserved), [`provisioned`] (kept warm by the leader).
//! * [`lambda`], [`error`]: Lambda's rules and error shapes, shared with
//!   emberd.
pub mod accounts;
pub mod api;
pub mod code;
pub mod concurrency;
pub mod deploy;
pub mod error;
pub mod functions;
pub mod hostapi;
pub mod hosts;
pub mod invoke;
pub mod lambda;
pub mod leader;
pub mod placement;
pub mod provisioned;
pub mod queue;
pub mod replay;
pub mod service;
pub mod sigv4;
