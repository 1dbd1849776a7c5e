//! `PUT /vsock`.

use crate::api::parsed_request::{parse_json, ParseError};
use crate::rpc_interface::VmmAction;

pub fn parse_put(body: &[u8]) -> Result<VmmAction, ParseError> {
    parse_json(body).map(VmmAction::PutVsock)
}

#[cfg(test)]
mod tests {
    use crate::api::parse_request;
    use crate::rpc_interface::VmmAction;
    use crate::vmm_config::VsockConfig;

    fn put(body: &str) -> Result<VmmAction, crate::api::ParseError> {
        parse_request("PUT", "/vsock", body.as_bytes())
    }

    #[test]
    fn valid() {
        assert_eq!(
            put(r#"{"vsock_id": "v", "guest_cid": 3, "uds_path": "/v.sock"}"#),
            Ok(VmmAction::PutVsock(VsockConfig {
                vsock_id: Some("v".into()),
                guest_cid: 3,
                uds_path: "/v.sock".into(),
            }))
        );
    }

    #[test]
    fn invalid() {
        let e = put(r#"{"guest_cid": -1, "uds_path": "/v"}"#).unwrap_err();
        assert_eq!(e.status, 400);
        assert!(e.message.contains("invalid value"), "{}", e.message);
        let e = put(r#"{"guest_cid": 3}"#).unwrap_err();
        assert!(
            e.message.contains("missing field `uds_path`"),
            "{}",
            e.message
        );
        let e = put(r#"{"guest_cid": 3, "uds_path": "/v", "x": 0}"#).unwrap_err();
        assert!(e.message.contains("unknown field `x`"), "{}", e.message);
    }
}
