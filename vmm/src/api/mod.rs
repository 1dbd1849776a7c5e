//! HTTP/JSON API on a unix socket (Firecracker's shapes).
