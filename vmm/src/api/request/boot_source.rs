//! `PUT /boot-source`.

use crate::api::parsed_request::{parse_json, ParseError};
use crate::rpc_interface::VmmAction;

pub fn parse_put(body: &[u8]) -> Result<VmmAction, ParseError> {
    parse_json(body).map(VmmAction::PutBootSource)
}

#[cfg(test)]
mod tests {
    use crate::api::parse_request;
    use crate::rpc_interface::VmmAction;
    use crate::vmm_config::BootSourceConfig;

    fn put(body: &str) -> Result<VmmAction, crate::api::ParseError> {
        parse_request("PUT", "/boot-source", body.as_bytes())
    }

    #[test]
    fn valid() {
        let body = r#"{"kernel_image_path": "/k", "boot_args": "console=ttyS0"}"#;
        assert_eq!(
            put(body),
            Ok(VmmAction::PutBootSource(BootSourceConfig {
                kernel_image_path: "/k".into(),
                initrd_path: None,
                boot_args: Some("console=ttyS0".into()),
            }))
        );
    }

    #[test]
    fn invalid() {
        let e = put(r#"{"kernel_image_path": "/k", "foo": 1}"#).unwrap_err();
        assert_eq!(e.status, 400);
        assert!(e.message.contains("unknown field `foo`"), "{}", e.message);
        assert!(e.message.contains("expected one of"), "{}", e.message);

        let e = put(r#"{"boot_args": ""}"#).unwrap_err();
        assert!(
            e.message.contains("missing field `kernel_image_path`"),
            "{}",
            e.message
        );

        let e = put(r#"{"kernel_image_path": 5}"#).unwrap_err();
        assert!(
            e.message.contains("invalid type: integer `5`"),
            "{}",
            e.message
        );

        let e = put(r#""/k""#).unwrap_err();
        assert!(e.message.contains("invalid type: string"), "{}", e.message);
    }
}
