//! The nftables ruleset of one instance's namespace: NAT between the
//! logical and the physical address, the egress policy, and no way in to
//! the namespace itself from the guest.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use super::egress::EgressPolicy;
use super::{NS_VETH, TAP_NAME};

/// What one instance's ruleset is made from.
pub struct Addressing {
    pub logical: Ipv4Addr,
    pub physical: Ipv4Addr,
    /// Every physical address on this host: instances and the host side of
    /// their links. The guest may reach none of them.
    pub physical_net: Ipv4Net,
}

/// The whole `ip ember` table, replacing any previous one.
pub fn ruleset(a: &Addressing, egress: &EgressPolicy) -> String {
    let (logical, physical) = (a.logical, a.physical);
    let mut egress_rules = vec![format!(
        "ip daddr {} reject with icmp type admin-prohibited",
        a.physical_net
    )];
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
    iifname "{TAP_NAME}" reject with icmp type admin-prohibited
  }}
}}
"#,
        indent(&egress_rules)
    )
}

/// Replaces the `egress_policy` chain's rules (a policy changed while instances run).
pub fn egress_update(physical_net: Ipv4Net, egress: &EgressPolicy) -> String {
    let mut s = String::from("flush chain ip ember egress_policy\n");
    s += &format!(
        "add rule ip ember egress_policy ip daddr {physical_net} reject with icmp type admin-prohibited\n"
    );
    for r in egress.nft_rules() {
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
            physical_net: "10.200.0.0/16".parse().unwrap(),
        }
    }

    #[test]
    fn ruleset_translates_and_fences() {
        let r = ruleset(&addressing(), &EgressPolicy::default());
        assert!(r.contains(r#"iifname "veth0" ip daddr 10.200.0.6 dnat to 172.16.0.2"#));
        assert!(r.contains(r#"oifname "veth0" ip saddr 172.16.0.2 snat to 10.200.0.6"#));
        // Other instances first, then the policy's default.
        let fence = r.find("ip daddr 10.200.0.0/16 reject").expect("fence rule");
        let default = r.find("    accept\n").expect("default accept");
        assert!(fence < default, "{r}");
    }

    #[test]
    fn egress_update_replaces_the_chain() {
        let p: EgressPolicy = serde_json::from_str(r#"{"DefaultAction":"Deny"}"#).unwrap();
        let u = egress_update("10.200.0.0/16".parse().unwrap(), &p);
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
            let run = |input: &str| super::super::netns::run("nft", &["-f", "-"], Some(input));
            run(&ruleset(&addressing(), &policy))?;
            run(&ruleset(&addressing(), &policy))?; // replacing works too
            run(&egress_update(
                addressing().physical_net,
                &EgressPolicy::default(),
            ))
        })
        .join()
        .unwrap();
        r.unwrap();
    }
}
