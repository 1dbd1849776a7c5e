//! Lambda's payload limits, checked by the cluster before a body is read
//! and by emberd again.

/// RequestResponse invocations: the request and the response.
pub const MAX_SYNC_PAYLOAD: usize = 6 * 1024 * 1024;
/// Event (asynchronous) invocations (1 MB since 2025).
pub const MAX_ASYNC_PAYLOAD: usize = 1024 * 1024;
