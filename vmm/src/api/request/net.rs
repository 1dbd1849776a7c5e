//! `PUT /network-interfaces/{iface_id}` (pre-boot) and
//! `PATCH /network-interfaces/{iface_id}` (rate limiters, at run time).

use crate::api::parsed_request::{checked_id, parse_json, ParseError};
use crate::rpc_interface::VmmAction;
use crate::vmm_config::{NetworkInterfaceConfig, NetworkInterfaceUpdate};

fn check_id(body_id: &str, path_id: &str) -> Result<(), ParseError> {
    if body_id != path_id {
        return Err(ParseError::bad_request(
            "The id from the path does not match the id from the body!",
        ));
    }
    Ok(())
}

pub fn parse_put(body: &[u8], id_from_path: &str) -> Result<VmmAction, ParseError> {
    let id = checked_id(id_from_path)?;
    let cfg: NetworkInterfaceConfig = parse_json(body)?;
    check_id(&cfg.iface_id, id)?;
    // Shape errors (MAC, tap name length, limiter values) are known now.
    cfg.validate().map_err(ParseError::bad_request)?;
    Ok(VmmAction::PutNetworkInterface(cfg))
}

pub fn parse_patch(body: &[u8], id_from_path: &str) -> Result<VmmAction, ParseError> {
    let id = checked_id(id_from_path)?;
    let upd: NetworkInterfaceUpdate = parse_json(body)?;
    check_id(&upd.iface_id, id)?;
    crate::vmm_config::net::validate_limiters(&upd.rx_rate_limiter, &upd.tx_rate_limiter)
        .map_err(ParseError::bad_request)?;
    Ok(VmmAction::PatchNetworkInterface(upd))
}

#[cfg(test)]
mod tests {
    use crate::api::parse_request;
    use crate::rate_limiter::{RateLimiterConfig, TokenBucketConfig};
    use crate::rpc_interface::VmmAction;
    use crate::vmm_config::{NetworkInterfaceConfig, NetworkInterfaceUpdate};

    const ETH0: &str = r#"{"iface_id": "eth0", "host_dev_name": "tap0",
        "guest_mac": "06:00:AC:10:00:02",
        "rx_rate_limiter": {"bandwidth": {"size": 1000, "refill_time": 100}},
        "tx_rate_limiter": {"ops": {"size": 10, "one_time_burst": 5, "refill_time": 1000}}}"#;

    #[test]
    fn put_valid() {
        let a = parse_request("PUT", "/network-interfaces/eth0", ETH0.as_bytes()).unwrap();
        assert_eq!(
            a,
            VmmAction::PutNetworkInterface(NetworkInterfaceConfig {
                iface_id: "eth0".into(),
                host_dev_name: "tap0".into(),
                guest_mac: Some("06:00:AC:10:00:02".into()),
                rx_rate_limiter: Some(RateLimiterConfig {
                    bandwidth: Some(TokenBucketConfig {
                        size: 1000,
                        one_time_burst: None,
                        refill_time: 100
                    }),
                    ops: None
                }),
                tx_rate_limiter: Some(RateLimiterConfig {
                    bandwidth: None,
                    ops: Some(TokenBucketConfig {
                        size: 10,
                        one_time_burst: Some(5),
                        refill_time: 1000
                    })
                }),
                terminate_connections_on_pause: false,
            })
        );
        let min = r#"{"iface_id": "eth1", "host_dev_name": "tap1"}"#;
        assert!(parse_request("PUT", "/network-interfaces/eth1", min.as_bytes()).is_ok());
        let ct = r#"{"iface_id": "eth1", "host_dev_name": "tap1",
            "terminate_connections_on_pause": true}"#;
        match parse_request("PUT", "/network-interfaces/eth1", ct.as_bytes()).unwrap() {
            VmmAction::PutNetworkInterface(c) => assert!(c.terminate_connections_on_pause),
            a => panic!("{a:?}"),
        }
    }

    #[test]
    fn put_errors() {
        let put = |p: &str, b: &str| parse_request("PUT", p, b.as_bytes()).unwrap_err();
        let e = put("/network-interfaces/eth1", ETH0);
        assert!(e.message.contains("does not match"), "{}", e.message);
        let e = put(
            "/network-interfaces/eth0",
            r#"{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:ac:10:00"}"#,
        );
        assert_eq!(e.status, 400);
        assert!(e.message.contains("invalid MAC"), "{}", e.message);
        let e = put(
            "/network-interfaces/eth0",
            r#"{"iface_id": "eth0", "host_dev_name": "tap0",
                "rx_rate_limiter": {"bandwidth": {"size": "x", "refill_time": 1}}}"#,
        );
        assert!(e.message.contains("deserializing"), "{}", e.message);
        let e = put(
            "/network-interfaces/eth0",
            r#"{"iface_id": "eth0", "host_dev_name": "tap0",
                "rx_rate_limiter": {"bandwith": {"size": 1, "refill_time": 1}}}"#,
        );
        assert!(e.message.contains("unknown field"), "{}", e.message);
        let e = put("/network-interfaces/eth0", "");
        assert_eq!(e.message, "Empty PUT request.");
        let e = put("/network-interfaces/a.b", ETH0);
        assert!(e.message.contains("alphanumeric"), "{}", e.message);
    }

    #[test]
    fn patch() {
        let b = r#"{"iface_id": "eth0", "tx_rate_limiter": {"bandwidth": {"size": 5, "refill_time": 10}}}"#;
        let a = parse_request("PATCH", "/network-interfaces/eth0", b.as_bytes()).unwrap();
        assert!(matches!(
            a,
            VmmAction::PatchNetworkInterface(NetworkInterfaceUpdate {
                rx_rate_limiter: None,
                tx_rate_limiter: Some(_),
                ..
            })
        ));
        let b = r#"{"iface_id": "eth0", "terminate_connections_on_pause": false}"#;
        let a = parse_request("PATCH", "/network-interfaces/eth0", b.as_bytes()).unwrap();
        assert!(matches!(
            a,
            VmmAction::PatchNetworkInterface(NetworkInterfaceUpdate {
                terminate_connections_on_pause: Some(false),
                rx_rate_limiter: None,
                ..
            })
        ));
        let e = parse_request("PATCH", "/network-interfaces/eth0", b"").unwrap_err();
        assert_eq!(e.message, "Empty PATCH request.");
        let e = parse_request(
            "PATCH",
            "/network-interfaces/eth0",
            br#"{"iface_id": "eth0", "host_dev_name": "tap9"}"#,
        )
        .unwrap_err();
        assert!(e.message.contains("unknown field"), "{}", e.message);
    }
}
