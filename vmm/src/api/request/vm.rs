//! `PATCH /vm`: pause or resume the microVM.

use ember_vmm_api::{VmState, VmStateUpdate};

use crate::api::parsed_request::{parse_json, ParseError};
use crate::rpc_interface::VmmAction;

pub fn parse_patch(body: &[u8]) -> Result<VmmAction, ParseError> {
    let b: VmStateUpdate = parse_json(body)?;
    Ok(match b.state {
        VmState::Paused => VmmAction::Pause,
        VmState::Resumed => VmmAction::Resume,
    })
}

#[cfg(test)]
mod tests {
    use crate::api::parse_request;
    use crate::rpc_interface::VmmAction;

    #[test]
    fn states() {
        let p = |b: &str| parse_request("PATCH", "/vm", b.as_bytes());
        assert_eq!(p(r#"{"state": "Paused"}"#), Ok(VmmAction::Pause));
        assert_eq!(p(r#"{"state": "Resumed"}"#), Ok(VmmAction::Resume));
        let e = p(r#"{"state": "Sleeping"}"#).unwrap_err();
        assert_eq!(e.status, 400);
        assert!(e.message.contains("Sleeping"), "{}", e.message);
        assert!(p(r#"{"state": "Paused", "x": 1}"#).is_err());
        assert_eq!(parse_request("PATCH", "/vm", b"").unwrap_err().status, 400);
    }
}
