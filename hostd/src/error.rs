//! Errors as Lambda's API reports them (shared with the cluster).

pub use ember_cluster::error::ApiError;
