//! HTTP request (method, path, body) → `VmmAction`, with no I/O, so every
//! route and error can be unit-tested without sockets.

use serde::de::DeserializeOwned;

use super::request::{
    actions, boot_source, drive, machine_config, metrics, migration, net, snapshot, vm, vsock,
};
use crate::rpc_interface::VmmAction;

/// Largest request body accepted; API bodies are small JSON documents.
pub const MAX_BODY_BYTES: usize = 1 << 20;

/// A request that cannot become a `VmmAction`: an HTTP status and the text
/// sent back as `{"fault_message": ...}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    pub status: u16,
    pub message: String,
}

impl ParseError {
    pub fn bad_request(message: impl Into<String>) -> Self {
        ParseError {
            status: 400,
            message: message.into(),
        }
    }
}

/// Maps one request to a `VmmAction`. An empty `body` means "no body", as
/// in Firecracker. `path` is the URI path without the query string.
pub fn parse_request(method: &str, path: &str, body: &[u8]) -> Result<VmmAction, ParseError> {
    let body = (!body.is_empty()).then_some(body);
    // Like Firecracker: leading slashes are ignored and a trailing one is allowed.
    let tokens: Vec<&str> = path.trim_start_matches('/').split_terminator('/').collect();

    match (method, tokens.as_slice(), body) {
        ("GET", [], None) => Ok(VmmAction::GetInstanceInfo),
        ("GET", ["machine-config"], None) => Ok(VmmAction::GetMachineConfig),
        ("GET", ["vm", "config"], None) => Ok(VmmAction::GetVmConfig),
        ("GET", ["migrate"], None) => Ok(VmmAction::GetMigration),
        ("GET", ["snapshot", "working-set"], None) => Ok(VmmAction::GetWorkingSet),
        ("GET", ["drives", id, "fill"], None) => {
            Ok(VmmAction::GetDriveFill(checked_id(id)?.to_string()))
        }
        // Cancel needs no body; `{}` is accepted too.
        ("PUT", ["migrate", "cancel"], _) => Ok(VmmAction::CancelMigration),
        ("PUT", ["migrate", "switch-over"], b) => migration::parse_put_switch_over(b),
        ("GET", _, Some(_)) => Err(ParseError::bad_request("GET request cannot have a body.")),

        ("PUT", ["actions"], Some(b)) => actions::parse_put(b),
        ("PUT", ["boot-source"], Some(b)) => boot_source::parse_put(b),
        ("PUT", ["drives", id], Some(b)) => drive::parse_put(b, id),
        ("PUT", ["drives"], Some(b)) => drive::parse_put(b, ""),
        ("PUT", ["machine-config"], Some(b)) => machine_config::parse_put(b),
        ("PUT", ["vsock"], Some(b)) => vsock::parse_put(b),
        ("PUT", ["metrics"], Some(b)) => metrics::parse_put(b),
        ("PUT", ["network-interfaces", id], Some(b)) => net::parse_put(b, id),
        ("PUT", ["snapshot", "create"], Some(b)) => snapshot::parse_put_create(b),
        ("PUT", ["snapshot", "load"], Some(b)) => snapshot::parse_put_load(b),
        ("PUT", ["snapshot", "working-set"], Some(b)) => snapshot::parse_put_working_set(b),
        ("PUT", ["migrate", "send"], Some(b)) => migration::parse_put_send(b),
        ("PUT", ["migrate", "receive"], Some(b)) => migration::parse_put_receive(b),
        ("PUT", _, None) if is_known_put(&tokens) => {
            Err(ParseError::bad_request("Empty PUT request."))
        }

        ("PATCH", ["machine-config"], Some(b)) => machine_config::parse_patch(b),
        ("PATCH", ["vm"], Some(b)) => vm::parse_patch(b),
        ("PATCH", ["network-interfaces", id], Some(b)) => net::parse_patch(b, id),
        ("PATCH", ["drives", id], Some(b)) => drive::parse_patch(b, id),
        (
            "PATCH",
            ["machine-config"] | ["vm"] | ["network-interfaces", _] | ["drives", _],
            None,
        ) => Err(ParseError::bad_request("Empty PATCH request.")),

        _ => Err(ParseError::bad_request(format!(
            "Invalid request method and/or path: {method} {path}."
        ))),
    }
}

/// PUT routes, so a missing body is reported as such rather than as a bad path.
fn is_known_put(tokens: &[&str]) -> bool {
    matches!(
        tokens,
        ["actions"]
            | ["boot-source"]
            | ["drives", _]
            | ["machine-config"]
            | ["vsock"]
            | ["snapshot", "working-set"]
            | ["metrics"]
            | ["network-interfaces", _]
            | ["snapshot", "create" | "load"]
            | ["migrate", "send" | "receive"]
    )
}

/// Deserializes a JSON body; serde's text names the offending field or type.
pub(super) fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ParseError> {
    serde_json::from_slice(body).map_err(|e| {
        ParseError::bad_request(format!(
            "An error occurred when deserializing the json body of a request: {e}."
        ))
    })
}

/// Resource ids appear in paths: keep them to Firecracker's safe alphabet.
pub(super) fn checked_id(id: &str) -> Result<&str, ParseError> {
    if id.is_empty() {
        return Err(ParseError::bad_request("The ID cannot be empty."));
    }
    if !id.chars().all(|c| c == '_' || c.is_ascii_alphanumeric()) {
        return Err(ParseError::bad_request(
            "API Resource IDs can only contain alphanumeric characters and underscores.",
        ));
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(method: &str, path: &str, body: &str) -> ParseError {
        parse_request(method, path, body.as_bytes()).unwrap_err()
    }

    #[test]
    fn get_routes() {
        let ok = |p| parse_request("GET", p, b"").unwrap();
        assert_eq!(ok("/"), VmmAction::GetInstanceInfo);
        assert_eq!(ok(""), VmmAction::GetInstanceInfo);
        assert_eq!(ok("/machine-config"), VmmAction::GetMachineConfig);
        assert_eq!(ok("/machine-config/"), VmmAction::GetMachineConfig);
        assert_eq!(ok("/vm/config"), VmmAction::GetVmConfig);
    }

    #[test]
    fn get_with_body_is_refused() {
        let e = err("GET", "/machine-config", "{}");
        assert_eq!(e.status, 400);
        assert_eq!(e.message, "GET request cannot have a body.");
    }

    #[test]
    fn unknown_paths_are_400() {
        for (m, p) in [
            ("GET", "/foo"),
            ("GET", "/vm"),
            ("GET", "/vm/config/extra"),
            ("GET", "/machine-config/x"),
            ("PUT", "/foo"),
            ("PUT", "/drives/a/b"),
            ("PATCH", "/boot-source"),
        ] {
            let body = if m == "GET" { "" } else { "{}" };
            let e = err(m, p, body);
            assert_eq!(e.status, 400, "{m} {p}");
            assert_eq!(
                e.message,
                format!("Invalid request method and/or path: {m} {p}.")
            );
        }
    }

    #[test]
    fn wrong_methods_are_400() {
        for (m, p, b) in [
            ("POST", "/actions", "{}"),
            ("DELETE", "/drives/rootfs", ""),
            ("PUT", "/", "{}"),
            ("PUT", "/vm/config", "{}"),
            ("GET", "/actions", ""),
            ("GET", "/boot-source", ""),
            ("PATCH", "/", ""),
            ("HEAD", "/", ""),
        ] {
            let e = err(m, p, b);
            assert_eq!(e.status, 400, "{m} {p}");
            assert!(e.message.starts_with("Invalid request method and/or path"));
        }
    }

    #[test]
    fn missing_bodies() {
        for p in [
            "/actions",
            "/boot-source",
            "/drives/rootfs",
            "/machine-config",
            "/vsock",
        ] {
            let e = err("PUT", p, "");
            assert_eq!((e.status, e.message.as_str()), (400, "Empty PUT request."));
        }
        let e = err("PATCH", "/machine-config", "");
        assert_eq!(
            (e.status, e.message.as_str()),
            (400, "Empty PATCH request.")
        );
    }

    #[test]
    fn malformed_json_is_400_with_serde_text() {
        let e = err("PUT", "/boot-source", "{not json");
        assert_eq!(e.status, 400);
        assert!(
            e.message
                .starts_with("An error occurred when deserializing the json body"),
            "{}",
            e.message
        );
        assert!(e.message.contains("key must be a string"), "{}", e.message);
    }

    #[test]
    fn ids() {
        assert_eq!(checked_id("root_fs1"), Ok("root_fs1"));
        assert!(checked_id("").is_err());
        assert!(checked_id("a-b").is_err());
        assert!(checked_id("a%2Fb").is_err());
    }
}
