//! `PUT /network-interfaces/{iface_id}` (Firecracker's `NetworkInterface`)
//! and its `PATCH` (`PartialNetworkInterface`).

use serde::{Deserialize, Serialize};

use crate::rate_limiter::RateLimiterConfig;

/// Linux's `IFNAMSIZ`: an interface name and its terminating NUL.
pub const IFNAMSIZ: usize = 16;

/// A guest network interface backed by a host tap device.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterfaceConfig {
    pub iface_id: String,
    /// Name of an existing tap device on the host.
    pub host_dev_name: String,
    /// `aa:bb:cc:dd:ee:ff`; without it the guest picks its own MAC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiterConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiterConfig>,
    /// Track the guest's TCP connections and end them with an RST both
    /// ways when the VM is paused (for a snapshot, parking, migration),
    /// so neither side hangs on a connection that cannot survive.
    #[serde(default)]
    pub terminate_connections_on_pause: bool,
}

impl NetworkInterfaceConfig {
    /// `iface_id` on the tap `host_dev_name`, nothing else set.
    pub fn tap(iface_id: impl Into<String>, host_dev_name: impl Into<String>) -> Self {
        NetworkInterfaceConfig {
            iface_id: iface_id.into(),
            host_dev_name: host_dev_name.into(),
            guest_mac: None,
            rx_rate_limiter: None,
            tx_rate_limiter: None,
            terminate_connections_on_pause: false,
        }
    }

    /// Checks what can be checked without the host: the MAC, the tap
    /// name's length and the limiters. Answers the MAC, parsed.
    pub fn validate(&self) -> Result<Option<[u8; 6]>, String> {
        if self.iface_id.is_empty() {
            return Err("iface_id must not be empty".into());
        }
        if self.host_dev_name.is_empty() || self.host_dev_name.len() >= IFNAMSIZ {
            return Err(format!(
                "host_dev_name {:?} must be 1 to {} bytes",
                self.host_dev_name,
                IFNAMSIZ - 1
            ));
        }
        let mac = self.guest_mac.as_deref().map(parse_mac).transpose()?;
        if let Some(m) = &mac {
            if m[0] & 1 != 0 {
                return Err(format!(
                    "guest_mac {} is a multicast address",
                    format_mac(m)
                ));
            }
        }
        validate_limiters(&self.rx_rate_limiter, &self.tx_rate_limiter)?;
        Ok(mac)
    }
}

/// `PATCH /network-interfaces/{iface_id}`: new limiters, or connection
/// tracking on or off, at run time.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterfaceUpdate {
    pub iface_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiterConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiterConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub terminate_connections_on_pause: Option<bool>,
}

impl NetworkInterfaceUpdate {
    /// Writes the fields given into `cfg` (the interface's configuration).
    pub fn apply_to(&self, cfg: &mut NetworkInterfaceConfig) {
        if let Some(rx) = self.rx_rate_limiter {
            cfg.rx_rate_limiter = Some(rx);
        }
        if let Some(tx) = self.tx_rate_limiter {
            cfg.tx_rate_limiter = Some(tx);
        }
        if let Some(on) = self.terminate_connections_on_pause {
            cfg.terminate_connections_on_pause = on;
        }
    }
}

/// Checks an interface's two limiters, each named in the error.
pub fn validate_limiters(
    rx: &Option<RateLimiterConfig>,
    tx: &Option<RateLimiterConfig>,
) -> Result<(), String> {
    if let Some(r) = rx {
        r.validate().map_err(|e| format!("rx_rate_limiter: {e}"))?;
    }
    if let Some(t) = tx {
        t.validate().map_err(|e| format!("tx_rate_limiter: {e}"))?;
    }
    Ok(())
}

/// Parses `aa:bb:cc:dd:ee:ff` (hex, either case).
pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let bad = || format!("invalid MAC address {s:?} (expected aa:bb:cc:dd:ee:ff)");
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return Err(bad());
    }
    let mut mac = [0u8; 6];
    for (b, p) in mac.iter_mut().zip(parts) {
        if p.len() != 2 {
            return Err(bad());
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    Ok(mac)
}

/// `aa:bb:cc:dd:ee:ff`, lower case.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs() {
        assert_eq!(parse_mac("06:00:AC:10:00:02"), Ok([6, 0, 0xac, 0x10, 0, 2]));
        assert_eq!(format_mac(&[6, 0, 0xac, 0x10, 0, 2]), "06:00:ac:10:00:02");
        for bad in [
            "",
            "06:00:ac:10:00",
            "06:00:ac:10:00:02:03",
            "6:00:ac:10:00:02",
            "zz:00:ac:10:00:02",
            "06-00-ac-10-00-02",
        ] {
            assert!(parse_mac(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn validate() {
        let mut c = NetworkInterfaceConfig {
            guest_mac: Some("06:00:ac:10:00:02".into()),
            ..NetworkInterfaceConfig::tap("eth0", "tap0")
        };
        assert_eq!(c.validate(), Ok(Some([6, 0, 0xac, 0x10, 0, 2])));
        c.guest_mac = Some("01:00:5e:00:00:01".into());
        assert!(c.validate().unwrap_err().contains("multicast"));
        c.guest_mac = None;
        c.host_dev_name = "a-very-long-tap-name".into();
        assert!(c.validate().unwrap_err().contains("host_dev_name"));
        c.host_dev_name = "fifteen-bytes-x".into();
        assert_eq!(c.validate(), Ok(None));
        c.iface_id.clear();
        assert!(c.validate().unwrap_err().contains("iface_id"));
    }
}
