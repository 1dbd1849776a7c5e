//! `PUT /migrate/send`, `PUT /migrate/receive` (`GET /migrate` and
//! `PUT /migrate/cancel` take no body).

use crate::api::parsed_request::{parse_json, ParseError};
use crate::rpc_interface::VmmAction;
use crate::vmm_config::migration::{
    self, ReceiveMigrationParams, SendMigrationParams, SwitchOverParams,
};

pub fn parse_put_send(body: &[u8]) -> Result<VmmAction, ParseError> {
    let p: SendMigrationParams = parse_json(body)?;
    migration::validate_send(&p).map_err(ParseError::bad_request)?;
    Ok(VmmAction::SendMigration(p))
}

pub fn parse_put_receive(body: &[u8]) -> Result<VmmAction, ParseError> {
    let p: ReceiveMigrationParams = parse_json(body)?;
    migration::validate_receive(&p).map_err(ParseError::bad_request)?;
    Ok(VmmAction::ReceiveMigration(p))
}

/// The body is optional: no overrides.
pub fn parse_put_switch_over(body: Option<&[u8]>) -> Result<VmmAction, ParseError> {
    let p: SwitchOverParams = match body {
        Some(b) => parse_json(b)?,
        None => SwitchOverParams::default(),
    };
    Ok(VmmAction::SwitchOverMigration(p))
}

#[cfg(test)]
mod tests {
    use crate::api::parse_request;
    use crate::rpc_interface::VmmAction;

    #[test]
    fn migrate_routes() {
        match parse_request(
            "PUT",
            "/migrate/send",
            br#"{"destination_uri": "tcp://10.0.0.2:7000", "downtime_ms": 100}"#,
        ) {
            Ok(VmmAction::SendMigration(p)) => {
                assert_eq!(p.downtime_ms, 100);
                assert_eq!(p.max_rounds, 30);
            }
            other => panic!("{other:?}"),
        }
        match parse_request(
            "PUT",
            "/migrate/receive",
            br#"{"listen_uri": "unix:///tmp/m.sock", "vsock_override": {"uds_path": "/v"}}"#,
        ) {
            Ok(VmmAction::ReceiveMigration(p)) => {
                let l = p.load_params();
                assert!(!l.resume_vm);
                assert_eq!(l.vsock_override.unwrap().uds_path, "/v");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            parse_request("GET", "/migrate", b"").unwrap(),
            VmmAction::GetMigration
        );
        assert_eq!(
            parse_request("PUT", "/migrate/cancel", b"").unwrap(),
            VmmAction::CancelMigration
        );
        match parse_request(
            "PUT",
            "/migrate/switch-over",
            br#"{"drive_overrides": [{"drive_id": "data", "path_on_host": "nbd://h:1/v@2"}]}"#,
        ) {
            Ok(VmmAction::SwitchOverMigration(p)) => {
                assert_eq!(p.drive_overrides[0].path_on_host, "nbd://h:1/v@2")
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse_request("PUT", "/migrate/switch-over", b""),
            Ok(VmmAction::SwitchOverMigration(_))
        ));
        match parse_request(
            "PUT",
            "/migrate/send",
            br#"{"destination_uri": "tcp://h:1", "switch_over": "Manual"}"#,
        ) {
            Ok(VmmAction::SendMigration(p)) => {
                assert_eq!(
                    p.switch_over,
                    crate::vmm_config::migration::SwitchOver::Manual
                )
            }
            other => panic!("{other:?}"),
        }
        for (path, body, needle) in [
            (
                "/migrate/send",
                r#"{"destination_uri": "ftp://x"}"#,
                "destination_uri",
            ),
            (
                "/migrate/send",
                r#"{"destination_uri": "tcp://h:1", "downtime_ms": 0}"#,
                "downtime_ms",
            ),
            (
                "/migrate/send",
                r#"{"destination_uri": "tcp://h:1", "max_rounds": 0}"#,
                "max_rounds",
            ),
            (
                "/migrate/send",
                r#"{"destination": "tcp://h:1"}"#,
                "unknown field",
            ),
            (
                "/migrate/receive",
                r#"{"listen_uri": "unix://rel"}"#,
                "listen_uri",
            ),
            ("/migrate/send", "", "Empty PUT"),
        ] {
            let e = parse_request("PUT", path, body.as_bytes()).unwrap_err();
            assert_eq!(e.status, 400);
            assert!(e.message.contains(needle), "{path} {body}: {}", e.message);
        }
    }
}
