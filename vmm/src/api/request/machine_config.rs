//! `GET`, `PUT` and `PATCH /machine-config`.

use crate::api::parsed_request::{parse_json, ParseError};
use crate::rpc_interface::VmmAction;
pub use crate::vmm_config::machine_config::MachineConfigUpdate;

pub fn parse_put(body: &[u8]) -> Result<VmmAction, ParseError> {
    parse_json(body).map(VmmAction::PutMachineConfig)
}

pub fn parse_patch(body: &[u8]) -> Result<VmmAction, ParseError> {
    let update: MachineConfigUpdate = parse_json(body)?;
    if update.is_empty() {
        // Firecracker treats `{}` like a missing body.
        return Err(ParseError::bad_request("Empty PATCH request."));
    }
    Ok(VmmAction::PatchMachineConfig(update))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::parse_request;
    use crate::vmm_config::machine_config::HugePages;
    use crate::vmm_config::MachineConfig;

    #[test]
    fn get() {
        assert_eq!(
            parse_request("GET", "/machine-config", b""),
            Ok(VmmAction::GetMachineConfig)
        );
    }

    #[test]
    fn put_valid() {
        let a = parse_request(
            "PUT",
            "/machine-config",
            br#"{"vcpu_count": 2, "mem_size_mib": 256}"#,
        );
        assert_eq!(
            a,
            Ok(VmmAction::PutMachineConfig(MachineConfig {
                vcpu_count: 2,
                mem_size_mib: 256,
                ..Default::default()
            }))
        );
    }

    #[test]
    fn put_invalid() {
        let put = |b: &str| parse_request("PUT", "/machine-config", b.as_bytes()).unwrap_err();
        let e = put(r#"{"vcpu_count": 2}"#);
        assert_eq!(e.status, 400);
        assert!(
            e.message.contains("missing field `mem_size_mib`"),
            "{}",
            e.message
        );
        let e = put(r#"{"vcpu_count": 300, "mem_size_mib": 256}"#);
        assert!(e.message.contains("invalid value"), "{}", e.message);
        let e = put(r#"{"vcpu_count": 1, "mem_size_mib": 256, "cpu_template": "T2"}"#);
        assert!(
            e.message.contains("unknown field `cpu_template`"),
            "{}",
            e.message
        );
    }

    #[test]
    fn patch_valid_and_merge() {
        let a = parse_request("PATCH", "/machine-config", br#"{"mem_size_mib": 512}"#).unwrap();
        let VmmAction::PatchMachineConfig(update) = a else {
            panic!("unexpected action {a:?}");
        };
        assert_eq!(
            update,
            MachineConfigUpdate {
                mem_size_mib: Some(512),
                ..Default::default()
            }
        );
        let current = MachineConfig {
            vcpu_count: 4,
            track_dirty_pages: true,
            ..Default::default()
        };
        let merged = update.apply_to(&current);
        assert_eq!(
            merged,
            MachineConfig {
                vcpu_count: 4,
                mem_size_mib: 512,
                track_dirty_pages: true,
                ..Default::default()
            }
        );
    }

    #[test]
    fn patch_invalid() {
        let patch = |b: &str| parse_request("PATCH", "/machine-config", b.as_bytes()).unwrap_err();
        assert_eq!(patch("{}").message, "Empty PATCH request.");
        let e = patch(r#"{"vcpu_count": "two"}"#);
        assert!(e.message.contains("invalid type"), "{}", e.message);
        let e = patch(r#"{"huge_pages": "4M"}"#);
        assert!(e.message.contains("unknown variant `4M`"), "{}", e.message);
        let e = patch(r#"{"hugepages": "2M"}"#);
        assert!(
            e.message.contains("unknown field `hugepages`"),
            "{}",
            e.message
        );
        // Firecracker's names for the page sizes.
        for (v, want) in [
            ("None", HugePages::None),
            ("Transparent", HugePages::Transparent),
            ("2M", HugePages::Hugetlbfs2M),
        ] {
            let body = format!(r#"{{"huge_pages": "{v}"}}"#);
            match parse_request("PATCH", "/machine-config", body.as_bytes()) {
                Ok(VmmAction::PatchMachineConfig(u)) => assert_eq!(u.huge_pages, Some(want)),
                other => panic!("{v}: {other:?}"),
            }
        }
        let e = patch("null");
        assert_eq!(e.status, 400);
    }
}
