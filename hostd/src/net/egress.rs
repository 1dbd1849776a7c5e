//! A function's egress policy: which destinations its instances may reach,
//! as ordered allow/deny rules (first match wins) and a default action.

use std::fmt;
use std::str::FromStr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Most rules one policy may hold.
pub const MAX_RULES: usize = 256;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Action {
    #[default]
    Allow,
    Deny,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Protocol {
    #[default]
    All,
    Tcp,
    Udp,
}

/// `443` or `8000-8100`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

/// A port or port range that is neither.
#[derive(Debug, thiserror::Error)]
#[error("invalid port or port range {0:?} (want 443 or 8000-8100)")]
pub struct PortRangeError(String);

impl FromStr for PortRange {
    type Err = PortRangeError;
    fn from_str(s: &str) -> Result<Self, PortRangeError> {
        let bad = || PortRangeError(s.to_string());
        let (a, b) = s.split_once('-').unwrap_or((s, s));
        let first: u16 = a.trim().parse().map_err(|_| bad())?;
        let last: u16 = b.trim().parse().map_err(|_| bad())?;
        if first == 0 || last < first {
            return Err(bad());
        }
        Ok(PortRange { first, last })
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

impl Serialize for PortRange {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // A bare number is accepted too.
        let v = serde_json::Value::deserialize(d)?;
        let s = match v {
            serde_json::Value::String(s) => s,
            serde_json::Value::Number(n) => n.to_string(),
            other => return Err(serde::de::Error::custom(format!("invalid port {other}"))),
        };
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// One rule: traffic to `cidr` (and, for TCP or UDP, one of `ports`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct EgressRule {
    pub action: Action,
    pub cidr: Ipv4Net,
    #[serde(default)]
    pub protocol: Protocol,
    /// Destination ports (empty: all); only with `Tcp` or `Udp`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortRange>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct EgressPolicy {
    /// What happens to traffic no rule matches.
    #[serde(default)]
    pub default_action: Action,
    #[serde(default)]
    pub rules: Vec<EgressRule>,
}

/// Why an egress policy cannot be applied.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("an egress policy holds at most {MAX_RULES} rules, got {0}")]
    TooManyRules(usize),
    #[error("rule {0}: Ports need Protocol Tcp or Udp")]
    PortsWithoutProtocol(usize),
}

impl EgressPolicy {
    pub fn validate(&self) -> Result<(), PolicyError> {
        if self.rules.len() > MAX_RULES {
            return Err(PolicyError::TooManyRules(self.rules.len()));
        }
        for (i, r) in self.rules.iter().enumerate() {
            if !r.ports.is_empty() && r.protocol == Protocol::All {
                return Err(PolicyError::PortsWithoutProtocol(i));
            }
        }
        Ok(())
    }

    /// The nftables statements of the `egress` chain for these rules
    /// (without the chain's fixed first rule and its default).
    pub fn nft_rules(&self) -> Vec<String> {
        let mut out: Vec<String> = self.rules.iter().map(rule_nft).collect();
        out.push(verdict(self.default_action).to_string());
        out
    }
}

fn verdict(a: Action) -> &'static str {
    match a {
        Action::Allow => "accept",
        Action::Deny => super::rules::REJECT,
    }
}

fn rule_nft(r: &EgressRule) -> String {
    let mut s = format!("ip daddr {}", r.cidr.trunc());
    let proto = match r.protocol {
        Protocol::All => None,
        Protocol::Tcp => Some("tcp"),
        Protocol::Udp => Some("udp"),
    };
    if let Some(p) = proto {
        if r.ports.is_empty() {
            s += &format!(" meta l4proto {p}");
        } else {
            let ports: Vec<String> = r.ports.iter().map(|p| p.to_string()).collect();
            s += &format!(" {p} dport {{ {} }}", ports.join(", "));
        }
    }
    format!("{s} {}", verdict(r.action))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_renders_rules() {
        let p: EgressPolicy = serde_json::from_str(
            r#"{"DefaultAction":"Deny","Rules":[
                {"Action":"Allow","Cidr":"10.1.2.3/16","Protocol":"Tcp","Ports":["443", 8000, "9000-9100"]},
                {"Action":"Deny","Cidr":"0.0.0.0/0","Protocol":"Udp"},
                {"Action":"Allow","Cidr":"192.0.2.1/32"}]}"#,
        )
        .unwrap();
        p.validate().unwrap();
        assert_eq!(
            p.nft_rules(),
            vec![
                "ip daddr 10.1.0.0/16 tcp dport { 443, 8000, 9000-9100 } accept",
                "ip daddr 0.0.0.0/0 meta l4proto udp reject with icmp type admin-prohibited",
                "ip daddr 192.0.2.1/32 accept",
                "reject with icmp type admin-prohibited",
            ]
        );
        let back: EgressPolicy = serde_json::from_value(serde_json::to_value(&p).unwrap()).unwrap();
        assert_eq!(back, p);
    }

    #[test]
    fn default_allows_everything() {
        let p: EgressPolicy = serde_json::from_str("{}").unwrap();
        assert_eq!(p.nft_rules(), vec!["accept"]);
    }

    #[test]
    fn rejects_bad_input() {
        for bad in [
            r#"{"Rules":[{"Action":"Allow","Cidr":"10.0.0.0/33"}]}"#,
            r#"{"Rules":[{"Action":"Allow","Cidr":"nonsense"}]}"#,
            r#"{"Rules":[{"Action":"Maybe","Cidr":"10.0.0.0/8"}]}"#,
            r#"{"Rules":[{"Action":"Allow","Cidr":"10.0.0.0/8","Protocol":"Tcp","Ports":["0"]}]}"#,
            r#"{"Rules":[{"Action":"Allow","Cidr":"10.0.0.0/8","Protocol":"Tcp","Ports":["9-1"]}]}"#,
            r#"{"Rules":[{"Action":"Allow","Cidr":"10.0.0.0/8","Protocol":"Tcp","Ports":["x"]}]}"#,
            r#"{"Rules":[],"Extra":1}"#,
        ] {
            assert!(serde_json::from_str::<EgressPolicy>(bad).is_err(), "{bad}");
        }
        let p: EgressPolicy = serde_json::from_str(
            r#"{"Rules":[{"Action":"Allow","Cidr":"10.0.0.0/8","Ports":["80"]}]}"#,
        )
        .unwrap();
        assert!(p
            .validate()
            .unwrap_err()
            .to_string()
            .contains("Ports need Protocol"));
    }
}
