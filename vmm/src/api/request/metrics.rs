//! `PUT /metrics`.

use crate::api::parsed_request::{parse_json, ParseError};
use crate::rpc_interface::VmmAction;

pub fn parse_put(body: &[u8]) -> Result<VmmAction, ParseError> {
    parse_json(body).map(VmmAction::PutMetrics)
}

#[cfg(test)]
mod tests {
    use crate::api::parse_request;
    use crate::rpc_interface::VmmAction;
    use crate::vmm_config::MetricsConfig;

    #[test]
    fn put_metrics() {
        assert_eq!(
            parse_request("PUT", "/metrics", br#"{"metrics_path": "/m"}"#),
            Ok(VmmAction::PutMetrics(MetricsConfig {
                metrics_path: "/m".into()
            }))
        );
        assert!(parse_request("PUT", "/metrics", br#"{"path": "/m"}"#).is_err());
    }
}
