//! `PUT /actions`.

use ember_vmm_api::{ActionType, InstanceActionInfo};

use crate::api::parsed_request::{parse_json, ParseError};
use crate::rpc_interface::VmmAction;

/// `action_type` is read as a string and then matched (see
/// [`InstanceActionInfo`]), so an unknown action gets a clear answer.
pub fn parse_put(body: &[u8]) -> Result<VmmAction, ParseError> {
    let body: InstanceActionInfo = parse_json(body)?;
    Ok(match body.action().map_err(ParseError::bad_request)? {
        ActionType::InstanceStart => VmmAction::InstanceStart,
        ActionType::SendCtrlAltDel => VmmAction::SendCtrlAltDel,
        ActionType::FlushMetrics => VmmAction::FlushMetrics,
    })
}

#[cfg(test)]
mod tests {
    use crate::api::parse_request;
    use crate::rpc_interface::VmmAction;

    fn put(body: &str) -> Result<VmmAction, crate::api::ParseError> {
        parse_request("PUT", "/actions", body.as_bytes())
    }

    #[test]
    fn valid_actions() {
        assert_eq!(
            put(r#"{"action_type": "InstanceStart"}"#),
            Ok(VmmAction::InstanceStart)
        );
        assert_eq!(
            put(r#"{"action_type": "SendCtrlAltDel"}"#),
            Ok(VmmAction::SendCtrlAltDel)
        );
        assert_eq!(
            put(r#"{"action_type": "FlushMetrics"}"#),
            Ok(VmmAction::FlushMetrics)
        );
    }

    #[test]
    fn invalid_actions() {
        let e = put(r#"{"action_type": "Reboot"}"#).unwrap_err();
        assert_eq!(e.status, 400);
        assert_eq!(
            e.message,
            "Unknown action_type `Reboot`, expected one of \
             `InstanceStart`, `SendCtrlAltDel`, `FlushMetrics`."
        );

        let e = put(r#"{"action_type": "InstanceStart", "foo": 1}"#).unwrap_err();
        assert!(e.message.contains("unknown field `foo`"), "{}", e.message);

        let e = put("{}").unwrap_err();
        assert!(
            e.message.contains("missing field `action_type`"),
            "{}",
            e.message
        );

        let e = put(r#"{"action_type": 3}"#).unwrap_err();
        assert!(
            e.message
                .contains("invalid type: integer `3`, expected a string"),
            "{}",
            e.message
        );
    }
}
