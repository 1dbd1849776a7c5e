//! HTTP/JSON API on a unix socket (Firecracker's shapes).

use std::path::Path;

use crate::event_loop::ApiReceiver;

/// Placeholder until the HTTP server lands: binds nothing.
pub fn start_api_thread(_path: &Path) -> Result<ApiReceiver, String> {
    Err("the API server is not available yet".into())
}
