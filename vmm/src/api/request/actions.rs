//! `PUT /actions`.

use serde::Deserialize;

use crate::api::parsed_request::{parse_json, ParseError};
use crate::rpc_interface::VmmAction;

/// `action_type` is read as a string, not a serde enum: serde_json's error
/// for a non-string enum value ("expected value") does not say what is wrong.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ActionBody {
    action_type: String,
}

const ACTIONS: &str = "`InstanceStart`, `SendCtrlAltDel`, `FlushMetrics`";

pub fn parse_put(body: &[u8]) -> Result<VmmAction, ParseError> {
    let body: ActionBody = parse_json(body)?;
    match body.action_type.as_str() {
        "InstanceStart" => Ok(VmmAction::InstanceStart),
        "SendCtrlAltDel" => Ok(VmmAction::SendCtrlAltDel),
        "FlushMetrics" => Ok(VmmAction::FlushMetrics),
        other => Err(ParseError::bad_request(format!(
            "Unknown action_type `{other}`, expected one of {ACTIONS}."
        ))),
    }
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
