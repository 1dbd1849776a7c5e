//! The nftables rulesets of instance networking: in each instance's
//! namespace, NAT between the logical and the physical address, the fence
//! (other instances, the operator's denied networks), the egress policy,
//! no way in to the namespace itself from the guest and no way out of it
//! for anything but the guest's forwarded traffic; in emberd's own
//! namespace, nothing new from an instance's link reaches the host or
//! another instance's link unless the operator opened that service.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use ipnet::Ipv4Net;

use super::egress::{EgressPolicy, PortRange, PortRangeError};
use super::{NS_VETH, TAP_NAME};

/// The prefix of every host-side veth (`emb{slot}`): the host's rules match
/// instance links by it.
pub const HOST_VETH_PREFIX: &str = "emb";

/// The refusal used everywhere: an immediate error in the guest
/// (EHOSTUNREACH), not a timeout.
pub(super) const REJECT: &str = "reject with icmp type admin-prohibited";

/// What one instance's ruleset is made from.
pub struct Addressing {
    pub logical: Ipv4Addr,
    pub physical: Ipv4Addr,
    /// Networks the guest may never reach, whatever its egress policy
    /// says: every physical address on this host (instances and the host
    /// side of their links) first, then the operator's denied networks.
    pub fenced: Vec<Ipv4Net>,
}

/// A service on the host that the operator opened to guests
/// (`--allow-guest-to-host`): `ADDRESS[/PREFIX]:PORTS[/udp]`, PORTS being
/// `443`, `8000-8100` or a comma-separated list of those; TCP unless
/// `/udp` is given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostService {
    pub cidr: Ipv4Net,
    pub udp: bool,
    pub ports: Vec<PortRange>,
}

/// A `--allow-guest-to-host` that names no host service.
#[derive(Debug, thiserror::Error)]
#[error(
    "invalid host service {spec:?}: {reason} (want ADDRESS[/PREFIX]:PORTS[/udp], e.g. \
     10.0.0.5:8080 or 10.0.0.53:53/udp)"
)]
pub struct HostServiceError {
    spec: String,
    reason: HostServiceReason,
}

#[derive(Debug, thiserror::Error)]
enum HostServiceReason {
    #[error("no ports")]
    NoPorts,
    #[error("{0}")]
    Network(#[from] ipnet::AddrParseError),
    #[error("{0}")]
    Address(#[from] std::net::AddrParseError),
    #[error("{0}")]
    Ports(#[from] PortRangeError),
}

impl FromStr for HostService {
    type Err = HostServiceError;
    fn from_str(s: &str) -> Result<Self, HostServiceError> {
        let bad = |reason: HostServiceReason| HostServiceError {
            spec: s.to_string(),
            reason,
        };
        let (rest, udp) = match s.strip_suffix("/udp") {
            Some(r) => (r, true),
            None => (s.strip_suffix("/tcp").unwrap_or(s), false),
        };
        let (addr, ports) = rest
            .rsplit_once(':')
            .ok_or_else(|| bad(HostServiceReason::NoPorts))?;
        let cidr = if addr.contains('/') {
            addr.parse::<Ipv4Net>().map_err(|e| bad(e.into()))?
        } else {
            let ip: Ipv4Addr = addr.parse().map_err(|e| bad(HostServiceReason::from(e)))?;
            Ipv4Net::from(ip)
        };
        let ports = ports
            .split(',')
            .map(|p| p.parse::<PortRange>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(e.into()))?;
        Ok(HostService {
            cidr: cidr.trunc(),
            udp,
            ports,
        })
    }
}

impl fmt::Display for HostService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ports: Vec<String> = self.ports.iter().map(|p| p.to_string()).collect();
        write!(f, "{}:{}", self.cidr, ports.join(","))?;
        if self.udp {
            write!(f, "/udp")?;
        }
        Ok(())
    }
}

impl HostService {
    fn nft(&self) -> String {
        let ports: Vec<String> = self.ports.iter().map(|p| p.to_string()).collect();
        let proto = if self.udp { "udp" } else { "tcp" };
        format!(
            "ip daddr {} {proto} dport {{ {} }} accept",
            self.cidr,
            ports.join(", ")
        )
    }
}

/// The `ip ember_host` table of emberd's own namespace, replacing any
/// previous one. Traffic that enters from an instance's link (by its
/// interface, or by a source address in `physical_net`) may reach the host
/// only as a reply to a connection the host opened, or at a service in
/// `open`; it is never forwarded to another instance's link or physical
/// address. Nothing else is touched: the host's other traffic and the
/// instances' egress to the outside pass as before.
pub fn host_ruleset(physical_net: Ipv4Net, open: &[HostService]) -> String {
    let p = HOST_VETH_PREFIX;
    let mut from_instance = vec!["ct state established,related accept".to_string()];
    from_instance.extend(open.iter().map(HostService::nft));
    from_instance.push("reject with icmpx type admin-prohibited".into());
    format!(
        r#"table inet ember_host {{}}
delete table inet ember_host
table inet ember_host {{
  chain input {{
    type filter hook input priority filter - 10; policy accept;
    iifname "{p}*" jump from_instance
    ip saddr {physical_net} jump from_instance
  }}
  chain forward {{
    type filter hook forward priority filter - 10; policy accept;
    iifname "{p}*" oifname "{p}*" reject with icmpx type admin-prohibited
    iifname "{p}*" ip daddr {physical_net} reject with icmpx type admin-prohibited
  }}
  chain from_instance {{
{}
  }}
}}
"#,
        indent(&from_instance)
    )
}

/// The fence: the first rules of every egress chain.
fn fence(fenced: &[Ipv4Net]) -> Vec<String> {
    fenced
        .iter()
        .map(|n| format!("ip daddr {} {REJECT}", n.trunc()))
        .collect()
}

/// The whole `ip ember` table, replacing any previous one.
pub fn ruleset(a: &Addressing, egress: &EgressPolicy) -> String {
    let (logical, physical) = (a.logical, a.physical);
    let mut egress_rules = fence(&a.fenced);
    egress_rules.extend(egress.nft_rules());
    format!(
        r#"table ip ember {{}}
delete table ip ember
table ip ember {{
  chain nat_pre {{
    type nat hook prerouting priority dstnat; policy accept;
    iifname "{NS_VETH}" ip daddr {physical} dnat to {logical}
  }}
  chain nat_post {{
    type nat hook postrouting priority srcnat; policy accept;
    oifname "{NS_VETH}" ip saddr {logical} snat to {physical}
  }}
  chain instance_fwd {{
    type filter hook forward priority filter; policy drop;
    ct state established,related accept
    iifname "{TAP_NAME}" oifname "{NS_VETH}" ip saddr {logical} jump egress_policy
    iifname "{NS_VETH}" oifname "{TAP_NAME}" ip daddr {logical} accept
  }}
  chain egress_policy {{
{}
  }}
  chain guest_in {{
    type filter hook input priority filter; policy accept;
    iifname "{TAP_NAME}" ct state established,related accept
    iifname "{TAP_NAME}" icmp type echo-request accept
    iifname "{TAP_NAME}" {REJECT}
  }}
  chain namespace_out {{
    type filter hook output priority filter; policy accept;
    oifname "{NS_VETH}" ct state established,related accept
    oifname "{NS_VETH}" {REJECT}
  }}
}}
"#,
        indent(&egress_rules)
    )
}

/// Replaces the `egress_policy` chain's rules (a policy changed while instances run).
pub fn egress_update(fenced: &[Ipv4Net], egress: &EgressPolicy) -> String {
    let mut s = String::from("flush chain ip ember egress_policy\n");
    for r in fence(fenced).into_iter().chain(egress.nft_rules()) {
        s += &format!("add rule ip ember egress_policy {r}\n");
    }
    s
}

fn indent(lines: &[String]) -> String {
    lines
        .iter()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addressing() -> Addressing {
        Addressing {
            logical: "172.16.0.2".parse().unwrap(),
            physical: "10.200.0.6".parse().unwrap(),
            fenced: vec![
                "10.200.0.0/16".parse().unwrap(),
                "192.168.77.0/24".parse().unwrap(),
            ],
        }
    }

    #[test]
    fn ruleset_translates_and_fences() {
        let r = ruleset(&addressing(), &EgressPolicy::default());
        assert!(r.contains(r#"iifname "veth0" ip daddr 10.200.0.6 dnat to 172.16.0.2"#));
        assert!(r.contains(r#"oifname "veth0" ip saddr 172.16.0.2 snat to 10.200.0.6"#));
        // Other instances and the operator's denied networks first, then
        // the policy's default.
        let fence = r.find("ip daddr 10.200.0.0/16 reject").expect("fence rule");
        let denied = r.find("ip daddr 192.168.77.0/24 reject").expect("denied");
        let default = r.find("    accept\n").expect("default accept");
        assert!(fence < denied && denied < default, "{r}");
        // Nothing the namespace itself sends leaves by its veth, but replies.
        assert!(r.contains(
            r#"oifname "veth0" ct state established,related accept
    oifname "veth0" reject"#
        ));
    }

    #[test]
    fn an_egress_policy_cannot_reopen_the_fence() {
        let p: EgressPolicy = serde_json::from_str(
            r#"{"Rules":[{"Action":"Allow","Cidr":"192.168.77.5/32"},
                         {"Action":"Allow","Cidr":"10.200.0.0/16"}]}"#,
        )
        .unwrap();
        let r = ruleset(&addressing(), &p);
        let allow = r.find("ip daddr 192.168.77.5/32 accept").expect("allow");
        assert!(r.find("ip daddr 192.168.77.0/24 reject").unwrap() < allow);
        let u = egress_update(&addressing().fenced, &p);
        assert!(
            u.find("192.168.77.0/24 reject").unwrap() < u.find("192.168.77.5/32 accept").unwrap()
        );
    }

    #[test]
    fn host_services_parse() {
        let s: HostService = "198.51.100.1:9000-9001".parse().unwrap();
        assert_eq!(s.cidr, "198.51.100.1/32".parse::<Ipv4Net>().unwrap());
        assert!(!s.udp);
        assert_eq!(s.to_string(), "198.51.100.1/32:9000-9001");
        assert_eq!(
            s.nft(),
            "ip daddr 198.51.100.1/32 tcp dport { 9000-9001 } accept"
        );
        let s: HostService = "10.0.0.0/24:53,5353/udp".parse().unwrap();
        assert!(s.udp);
        assert_eq!(
            s.nft(),
            "ip daddr 10.0.0.0/24 udp dport { 53, 5353 } accept"
        );
        for bad in [
            "10.0.0.1",
            "10.0.0.1:",
            "10.0.0.1:0",
            "10.0.0.1:x",
            "nonsense:80",
            "10.0.0.0/33:80",
            ":80",
        ] {
            let e = bad.parse::<HostService>().unwrap_err().to_string();
            assert!(e.contains("invalid host service"), "{bad}: {e}");
        }
    }

    #[test]
    fn host_ruleset_lets_only_replies_and_opened_services_in() {
        let open = ["198.51.100.1:9000".parse().unwrap()];
        let r = host_ruleset("10.200.0.0/16".parse().unwrap(), &open);
        let est = r.find("ct state established,related accept").unwrap();
        let svc = r
            .find("ip daddr 198.51.100.1/32 tcp dport { 9000 } accept")
            .unwrap();
        let rej = r.rfind("reject with icmpx type admin-prohibited").unwrap();
        assert!(est < svc && svc < rej, "{r}");
        assert!(r.contains(r#"iifname "emb*" jump from_instance"#));
        assert!(r.contains("ip saddr 10.200.0.0/16 jump from_instance"));
        assert!(r.contains(r#"iifname "emb*" oifname "emb*" reject"#));
    }

    #[test]
    fn egress_update_replaces_the_chain() {
        let p: EgressPolicy = serde_json::from_str(r#"{"DefaultAction":"Deny"}"#).unwrap();
        let u = egress_update(&["10.200.0.0/16".parse().unwrap()], &p);
        assert_eq!(
            u,
            "flush chain ip ember egress_policy\n\
             add rule ip ember egress_policy ip daddr 10.200.0.0/16 reject with icmp type admin-prohibited\n\
             add rule ip ember egress_policy reject with icmp type admin-prohibited\n"
        );
    }

    /// The rules load into a real nftables (in a throwaway namespace), and
    /// so does an egress update. Needs root and `nft`; skipped otherwise.
    #[test]
    fn nft_accepts_the_ruleset() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0
            || super::super::netns::run("nft", &["-V"], None).is_err()
        {
            eprintln!("skipped: needs root and nft");
            return;
        }
        let policy: EgressPolicy = serde_json::from_str(
            r#"{"DefaultAction":"Deny","Rules":[
                {"Action":"Allow","Cidr":"192.0.2.0/24","Protocol":"Tcp","Ports":["443","8000-8100"]},
                {"Action":"Deny","Cidr":"198.51.100.7/32","Protocol":"Udp"}]}"#,
        )
        .unwrap();
        let r = std::thread::spawn(move || {
            // SAFETY: unshare only moves this thread (and `nft`, its child).
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error().to_string());
            }
            let run = |input: &str| {
                super::super::netns::run("nft", &["-f", "-"], Some(input))
                    .map_err(|e| e.to_string())
            };
            run(&ruleset(&addressing(), &policy))?;
            run(&ruleset(&addressing(), &policy))?; // replacing works too
            run(&egress_update(
                &addressing().fenced,
                &EgressPolicy::default(),
            ))?;
            run(&host_ruleset(
                "10.200.0.0/16".parse().unwrap(),
                &[
                    "198.51.100.1:9000-9001,80".parse().unwrap(),
                    "10.0.0.53:53/udp".parse().unwrap(),
                ],
            ))?;
            run(&host_ruleset("10.200.0.0/16".parse().unwrap(), &[]))
        })
        .join()
        .unwrap();
        r.unwrap();
    }
}
