//! `VmmResponse` / `ParseError` → HTTP status and JSON body, without I/O.

use serde::Serialize;

use super::parsed_request::ParseError;
use crate::rpc_interface::{VmmData, VmmResponse};

/// What the server writes back: a status and, unless 204, a JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiResponse {
    pub status: u16,
    pub body: Option<String>,
}

impl ApiResponse {
    pub fn no_content() -> Self {
        ApiResponse {
            status: 204,
            body: None,
        }
    }

    /// `{"fault_message": "..."}`, Firecracker's error body.
    pub fn fault(status: u16, message: impl Into<String>) -> Self {
        // A string field cannot fail to serialize.
        let body = serde_json::to_string(&ember_vmm_api::FaultBody::new(message)).ok();
        ApiResponse { status, body }
    }

    fn json<T: Serialize>(value: &T) -> Self {
        match serde_json::to_string(value) {
            Ok(body) => ApiResponse {
                status: 200,
                body: Some(body),
            },
            Err(e) => Self::fault(500, format!("Cannot serialize the response: {e}")),
        }
    }

    pub fn from_vmm(resp: &VmmResponse) -> Self {
        match resp {
            Ok(VmmData::Empty) => Self::no_content(),
            Ok(VmmData::InstanceInfo(info)) => Self::json(info),
            Ok(VmmData::MachineConfig(cfg)) => Self::json(cfg),
            Ok(VmmData::Json(value)) => Self::json(value),
            Err(e) => Self::fault(e.http_status(), e.to_string()),
        }
    }
}

impl From<ParseError> for ApiResponse {
    fn from(e: ParseError) -> Self {
        ApiResponse::fault(e.status, e.message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rpc_interface::{InstanceInfo, VmmActionError};
    use crate::vmm_config::MachineConfig;

    #[test]
    fn success_shapes() {
        assert_eq!(ApiResponse::from_vmm(&Ok(VmmData::Empty)).status, 204);
        assert_eq!(ApiResponse::from_vmm(&Ok(VmmData::Empty)).body, None);

        let r = ApiResponse::from_vmm(&Ok(VmmData::MachineConfig(MachineConfig::default())));
        assert_eq!(r.status, 200);
        let v: serde_json::Value = serde_json::from_str(r.body.as_deref().unwrap()).unwrap();
        assert_eq!(v["vcpu_count"], 1);
        assert_eq!(v["mem_size_mib"], 128);

        let info = InstanceInfo {
            id: "x".into(),
            state: "Not started".into(),
            vmm_version: "0.1.0".into(),
            app_name: "ember".into(),
        };
        let r = ApiResponse::from_vmm(&Ok(VmmData::InstanceInfo(info)));
        assert_eq!(r.status, 200);
        assert!(r.body.unwrap().contains(r#""state":"Not started""#));

        let r = ApiResponse::from_vmm(&Ok(VmmData::Json(serde_json::json!({"a": 1}))));
        assert_eq!((r.status, r.body.as_deref()), (200, Some(r#"{"a":1}"#)));
    }

    #[test]
    fn error_shapes() {
        let r = ApiResponse::from_vmm(&Err(VmmActionError::NotAllowed("after boot".into())));
        assert_eq!(r.status, 400);
        assert_eq!(r.body.as_deref(), Some(r#"{"fault_message":"after boot"}"#));
        let r = ApiResponse::from_vmm(&Err(VmmActionError::Internal("boom".into())));
        assert_eq!(r.status, 500);

        let r: ApiResponse = ParseError::bad_request("say \"why\"").into();
        assert_eq!(
            r.body.as_deref(),
            Some(r#"{"fault_message":"say \"why\""}"#)
        );
    }
}
