//! Ember's cluster API (issue #9), built up in layers. So far:
//!
//! * [`sigv4`]: verifying AWS Signature Version 4 on incoming requests,
//!   so that unmodified AWS SDKs and the AWS CLI can call the cluster.
pub mod sigv4;
