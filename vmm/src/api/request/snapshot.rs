//! `PUT /snapshot/create`, `PUT /snapshot/load` and
//! `PUT /snapshot/working-set`.

use crate::api::parsed_request::{parse_json, ParseError};
use crate::rpc_interface::VmmAction;
use crate::vmm_config::LoadSnapshotParams;

pub fn parse_put_create(body: &[u8]) -> Result<VmmAction, ParseError> {
    parse_json(body).map(VmmAction::CreateSnapshot)
}

pub fn parse_put_load(body: &[u8]) -> Result<VmmAction, ParseError> {
    let p: LoadSnapshotParams = parse_json(body)?;
    p.backend().map_err(ParseError::bad_request)?;
    Ok(VmmAction::LoadSnapshot(p))
}

pub fn parse_put_working_set(body: &[u8]) -> Result<VmmAction, ParseError> {
    let p: crate::vmm_config::SaveWorkingSetParams = parse_json(body)?;
    if p.working_set_path.is_empty() {
        return Err(ParseError::bad_request("working_set_path is empty"));
    }
    Ok(VmmAction::SaveWorkingSet(p))
}

#[cfg(test)]
mod tests {
    use crate::api::parse_request;
    use crate::rpc_interface::VmmAction;
    use crate::vmm_config::snapshot::{MemBackendType, SnapshotType};

    #[test]
    fn create_and_load() {
        let r = parse_request(
            "PUT",
            "/snapshot/create",
            br#"{"snapshot_type": "Diff", "snapshot_path": "/s", "mem_file_path": "/m"}"#,
        );
        match r {
            Ok(VmmAction::CreateSnapshot(p)) => {
                assert_eq!(p.snapshot_type, SnapshotType::Diff);
                assert_eq!(p.mem_file_path, "/m");
            }
            other => panic!("{other:?}"),
        }
        assert!(parse_request("PUT", "/snapshot/create", br#"{"snapshot_path": "/s"}"#).is_err());

        let r = parse_request(
            "PUT",
            "/snapshot/load",
            br#"{"snapshot_path": "/s", "mem_backend": {"backend_type": "Uffd", "backend_path": "/u"},
                 "resume_vm": true, "vsock_override": {"uds_path": "/v"},
                 "drive_overrides": [{"drive_id": "root", "path_on_host": "/r"}],
                 "vhost_user_overrides": [{"drive_id": "data", "socket": "/vu"}],
                 "fill_overrides": [{"drive_id": "root", "fill_from": {"nbd_uri": "nbd://h:1/disk"}}]}"#,
        );
        match r {
            Ok(VmmAction::LoadSnapshot(p)) => {
                assert_eq!(p.fill_overrides[0].fill_from.nbd_uri, "nbd://h:1/disk");
                assert_eq!(p.backend().unwrap().backend_type, MemBackendType::Uffd);
                assert!(p.resume_vm);
                assert_eq!(p.vsock_override.unwrap().uds_path, "/v");
                assert_eq!(p.vhost_user_overrides[0].socket, "/vu");
            }
            other => panic!("{other:?}"),
        }
        // Firecracker's older mem_file_path spelling.
        assert!(parse_request(
            "PUT",
            "/snapshot/load",
            br#"{"snapshot_path": "/s", "mem_file_path": "/m"}"#
        )
        .is_ok());
        let e = parse_request("PUT", "/snapshot/load", br#"{"snapshot_path": "/s"}"#).unwrap_err();
        assert!(e.message.contains("mem_backend"), "{}", e.message);
        let e = parse_request(
            "PUT",
            "/snapshot/load",
            br#"{"snapshot_path": "/s", "mem_backend": {"backend_type": "Tape", "backend_path": "/u"}}"#,
        )
        .unwrap_err();
        assert!(e.message.contains("Tape"), "{}", e.message);
    }
}
