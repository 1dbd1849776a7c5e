//! Ember's cluster API (issue #9), built up in layers. So far:
//!
//! * [`sigv4`]: verifying AWS Signature Version 4 on incoming requests,
//!   so that unmodified AWS SDKs and the AWS CLI can call the cluster.
//! * [`accounts`]: accounts and their access keys.
//! * [`hosts`]: host membership in the cluster store (leases, heartbeats).
//! * [`leader`]: one leader among the API's replicas, for background work.
//! * [`placement`]: which host an invocation goes to.
pub mod accounts;
pub mod hosts;
pub mod leader;
pub mod placement;
pub mod sigv4;
