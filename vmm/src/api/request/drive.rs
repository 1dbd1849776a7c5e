//! `PUT /drives/{drive_id}` (before boot) and `PATCH /drives/{drive_id}`
//! (backend, size and limits at run time).

use crate::api::parsed_request::{checked_id, parse_json, ParseError};
use crate::rpc_interface::VmmAction;
use crate::vmm_config::{BlockDeviceConfig, BlockDeviceUpdate};

pub fn parse_patch(body: &[u8], id_from_path: &str) -> Result<VmmAction, ParseError> {
    let id = checked_id(id_from_path)?;
    let upd: BlockDeviceUpdate = parse_json(body)?;
    if upd.drive_id != id {
        return Err(ParseError::bad_request(
            "The id from the path does not match the id from the body!",
        ));
    }
    crate::vmm_config::drive::validate_update(&upd).map_err(ParseError::bad_request)?;
    Ok(VmmAction::PatchDrive(upd))
}

pub fn parse_put(body: &[u8], id_from_path: &str) -> Result<VmmAction, ParseError> {
    let id = checked_id(id_from_path)?;
    let cfg: BlockDeviceConfig = parse_json(body)?;
    if cfg.drive_id != id {
        return Err(ParseError::bad_request(
            "The id from the path does not match the id from the body!",
        ));
    }
    Ok(VmmAction::PutDrive(cfg))
}

#[cfg(test)]
mod tests {
    use crate::api::parse_request;
    use crate::rpc_interface::VmmAction;
    use crate::vmm_config::BlockDeviceConfig;

    fn put(path: &str, body: &str) -> Result<VmmAction, crate::api::ParseError> {
        parse_request("PUT", path, body.as_bytes())
    }

    const ROOTFS: &str = r#"{"drive_id": "rootfs", "path_on_host": "/r.ext4",
        "is_root_device": true, "is_read_only": false}"#;

    #[test]
    fn valid() {
        assert_eq!(
            put("/drives/rootfs", ROOTFS),
            Ok(VmmAction::PutDrive(BlockDeviceConfig {
                is_root_device: true,
                ..BlockDeviceConfig::file("rootfs", "/r.ext4")
            }))
        );
    }

    #[test]
    fn vhost_user_socket() {
        let r = put(
            "/drives/data",
            r#"{"drive_id": "data", "socket": "/run/vu.sock", "is_root_device": false}"#,
        );
        let Ok(VmmAction::PutDrive(cfg)) = r else {
            panic!("{r:?}");
        };
        assert_eq!(cfg.socket.as_deref(), Some("/run/vu.sock"));
        assert!(cfg.path_on_host.is_empty());
    }

    #[test]
    fn patch() {
        let r = parse_request(
            "PATCH",
            "/drives/data",
            br#"{"drive_id": "data", "rate_limiter": {"ops": {"size": 100, "refill_time": 1000}},
                 "io_scheduler": {"max_outstanding_writes": 4}}"#,
        );
        let Ok(VmmAction::PatchDrive(u)) = r else {
            panic!("{r:?}");
        };
        assert_eq!(u.rate_limiter.unwrap().ops.unwrap().size, 100);
        assert_eq!(u.io_scheduler.unwrap().max_outstanding_writes, Some(4));
        let bad = [
            (r#"{"drive_id": "x"}"#, "does not match"),
            (
                r#"{"drive_id": "data", "nbd_uri": "http://h/e"}"#,
                "bad nbd_uri",
            ),
            (
                r#"{"drive_id": "data", "nbd_uri": "nbd://h/e", "path_on_host": "/f"}"#,
                "not both",
            ),
            (
                r#"{"drive_id": "data", "io_scheduler": {"max_outstanding_writes": 0}}"#,
                "must be > 0",
            ),
            (
                r#"{"drive_id": "data", "is_read_only": true}"#,
                "unknown field",
            ),
        ];
        for (body, want) in bad {
            let e = parse_request("PATCH", "/drives/data", body.as_bytes()).unwrap_err();
            assert!(e.message.contains(want), "{body}: {}", e.message);
        }
    }

    #[test]
    fn fill_from_and_its_progress() {
        let r = put(
            "/drives/data",
            r#"{"drive_id": "data", "path_on_host": "/local.img", "is_root_device": false,
                "fill_from": {"nbd_uri": "nbd://src:10809/disk", "background_bytes_per_sec": 1000}}"#,
        );
        let Ok(VmmAction::PutDrive(cfg)) = r else {
            panic!("{r:?}");
        };
        let f = cfg.fill_from.unwrap();
        assert_eq!(f.nbd_uri, "nbd://src:10809/disk");
        assert_eq!(f.background_bytes_per_sec, Some(1000));
        let e = put(
            "/drives/data",
            r#"{"drive_id": "data", "is_root_device": false, "fill_from": {"uri": "x"}}"#,
        )
        .unwrap_err();
        assert!(e.message.contains("unknown field `uri`"), "{}", e.message);
        assert_eq!(
            parse_request("GET", "/drives/data/fill", b""),
            Ok(VmmAction::GetDriveFill("data".into()))
        );
        assert!(parse_request("GET", "/drives/a.b/fill", b"").is_err());
    }

    #[test]
    fn id_mismatch() {
        let e = put("/drives/other", ROOTFS).unwrap_err();
        assert_eq!(e.status, 400);
        assert_eq!(
            e.message,
            "The id from the path does not match the id from the body!"
        );
    }

    #[test]
    fn bad_ids() {
        let e = put("/drives/a.b", ROOTFS).unwrap_err();
        assert!(e.message.contains("alphanumeric"), "{}", e.message);
        let e = put("/drives/", ROOTFS).unwrap_err();
        assert_eq!(e.message, "The ID cannot be empty.");
    }

    #[test]
    fn bad_bodies() {
        let e = put("/drives/d", r#"{"drive_id": "d"}"#).unwrap_err();
        assert!(
            e.message.contains("missing field `is_root_device`"),
            "{}",
            e.message
        );
        let e = put(
            "/drives/d",
            r#"{"drive_id": "d", "is_root_device": false, "rate_limit": {}}"#,
        )
        .unwrap_err();
        assert!(
            e.message.contains("unknown field `rate_limit`"),
            "{}",
            e.message
        );
        let e = put("/drives/d", r#"{"drive_id": "d", "is_root_device": "yes"}"#).unwrap_err();
        assert!(e.message.contains("invalid type"), "{}", e.message);
    }
}
