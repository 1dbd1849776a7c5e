//! Instance networking. Every clone of a snapshot wakes up with the
//! address, gateway and MAC its snapshot was taken with (its *logical*
//! address). Each instance gets a network namespace of its own holding its
//! tap (always `tap0`, so snapshots need no override) and one end of a veth
//! pair; NAT in that namespace maps the logical address to a *physical*
//! address unique on this host, from `physical_net`, one /30 per instance
//! (host side `.1`, instance `.2`). The namespace's firewall applies the
//! function's egress policy and keeps the guest away from every other
//! physical address (other instances, the host side of their links) and
//! from the namespace itself.

mod daemon;
mod egress;
mod netns;
mod rules;

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Instant;

use ember_agent::GuestNetwork;
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

pub use daemon::load_reservations;
pub use egress::{
    Action, EgressPolicy, EgressRule, PolicyError, PortRange, PortRangeError, Protocol,
};
pub use netns::CommandError;
pub use rules::{HostService, HostServiceError};

/// The tap in every instance namespace, as the VMM (and the snapshot) names it.
pub const TAP_NAME: &str = "tap0";
/// The namespace's end of its veth pair.
pub const NS_VETH: &str = "veth0";
/// The guest's interface.
pub const GUEST_IFACE: &str = "eth0";
/// The tap's MAC, the guest's gateway: the same in every namespace, so the
/// ARP entry a snapshot holds stays right in every clone.
pub const GATEWAY_MAC: &str = "02:00:00:00:00:01";

/// A logical network: what the guest sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct LogicalNet {
    /// The guest's address and prefix, e.g. `172.16.0.2/30`.
    pub address: Ipv4Net,
    pub gateway: Ipv4Addr,
}

impl LogicalNet {
    /// What instances get unless their account reserved another address.
    pub fn default_net() -> LogicalNet {
        LogicalNet {
            address: Ipv4Net::new(Ipv4Addr::new(172, 16, 0, 2), 30).expect("valid prefix"),
            gateway: Ipv4Addr::new(172, 16, 0, 1),
        }
    }

    pub fn ip(&self) -> Ipv4Addr {
        self.address.addr()
    }

    /// A locally administered MAC made from the address: the same for every
    /// clone, different for different logical addresses.
    pub fn mac(&self) -> String {
        let o = self.ip().octets();
        format!("06:00:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3])
    }

    pub fn validate(&self, physical_net: Ipv4Net) -> Result<(), AddressError> {
        let (ip, gateway, net) = (self.ip(), self.gateway, self.address);
        let subnet = net.trunc();
        if ip == gateway {
            return Err(AddressError::GatewayIsAddress);
        }
        if !net.contains(&gateway) {
            return Err(AddressError::GatewayOutside { gateway, subnet });
        }
        if net.prefix_len() < 31 && (ip == net.network() || ip == net.broadcast()) {
            return Err(AddressError::NotAHost { ip, subnet });
        }
        if ip.is_loopback() || ip.is_multicast() || ip.is_unspecified() || ip.is_broadcast() {
            return Err(AddressError::Reserved(ip));
        }
        if subnet.contains(&physical_net.network()) || physical_net.contains(&ip) {
            return Err(AddressError::Overlaps {
                subnet,
                physical_net,
            });
        }
        Ok(())
    }

    /// The agent's configuration of the guest's interface.
    pub fn guest(&self) -> GuestNetwork {
        GuestNetwork {
            interface: GUEST_IFACE.into(),
            address: self.ip(),
            prefix_len: self.address.prefix_len(),
            gateway: Some(self.gateway),
        }
    }
}

#[derive(Debug, Clone)]
pub struct NetConfig {
    /// Where physical addresses come from.
    pub physical_net: Ipv4Net,
    /// Records of namespaces made, so a restarted hostd removes leftovers.
    pub state_dir: PathBuf,
    /// Have VMMs end open TCP connections when they pause.
    pub terminate_connections: bool,
    /// Services of this host that guests may reach (nothing else of the
    /// host is reachable from an instance).
    pub host_services: Vec<HostService>,
    /// Networks no guest may reach, whatever its egress policy says (e.g.
    /// the hosts' own network).
    pub denied: Vec<Ipv4Net>,
}

impl NetConfig {
    /// What every instance's fence keeps its guest from.
    fn fenced(&self) -> Vec<Ipv4Net> {
        std::iter::once(self.physical_net)
            .chain(self.denied.iter().copied())
            .collect()
    }
}

/// Why a logical address cannot be an instance's.
#[derive(Debug, thiserror::Error)]
pub enum AddressError {
    #[error("the address and the gateway must differ")]
    GatewayIsAddress,
    #[error("gateway {gateway} is outside {subnet}")]
    GatewayOutside { gateway: Ipv4Addr, subnet: Ipv4Net },
    #[error("{ip} is not a host address of {subnet}")]
    NotAHost { ip: Ipv4Addr, subnet: Ipv4Net },
    #[error("{0} cannot be an instance's address")]
    Reserved(Ipv4Addr),
    #[error("{subnet} overlaps this host's physical network {physical_net}")]
    Overlaps {
        subnet: Ipv4Net,
        physical_net: Ipv4Net,
    },
}

/// Why instance networking cannot start on this host.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("physical network {0} is too small: want /29 or larger")]
    TooSmall(Ipv4Net),
    #[error("instance networking needs `{tool}`: {error}")]
    NoTool {
        tool: &'static str,
        #[source]
        error: CommandError,
    },
    #[error("{}: {error}", dir.display())]
    StateDir {
        dir: PathBuf,
        #[source]
        error: std::io::Error,
    },
    #[error("closing this host to instances: {0}")]
    CloseHost(#[source] CommandError),
}

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("no free physical address left in {0}")]
    Exhausted(Ipv4Net),
    #[error("setting up the instance network: {0}")]
    Setup(#[source] CommandError),
    /// The record that lets a restarted hostd remove the namespace.
    #[error("setting up the instance network: {0}")]
    Record(#[source] std::io::Error),
    /// An instance's namespace refused a new egress policy.
    #[error("{netns}: {error}")]
    Egress {
        netns: String,
        #[source]
        error: CommandError,
    },
}

/// One row of the address table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct AddressEntry {
    pub instance_id: String,
    pub function_name: String,
    pub version: String,
    pub logical_address: Ipv4Addr,
    pub logical_mac: String,
    pub gateway: Ipv4Addr,
    pub physical_address: Ipv4Addr,
    /// The host's end of the instance's link.
    pub host_address: Ipv4Addr,
    pub netns: String,
}

/// An instance's network, until [`NetManager::teardown`].
#[derive(Debug)]
pub struct InstanceNet {
    pub instance_id: String,
    pub netns: String,
    pub host_veth: String,
    pub physical: Ipv4Addr,
    pub logical: LogicalNet,
    slot: u32,
}

impl InstanceNet {
    pub fn netns_path(&self) -> PathBuf {
        netns::path(&self.netns)
    }
}

/// What a restarted hostd needs to remove an instance's network.
#[derive(Debug, Serialize, Deserialize)]
struct Record {
    netns: String,
    host_veth: String,
}

/// Who an instance belongs to (for the table and egress updates).
pub struct Owner<'a> {
    pub function: &'a str,
    pub version: &'a str,
}

/// Everything an instance's network is made from.
#[derive(Clone)]
pub struct NetRequest {
    pub manager: std::sync::Arc<NetManager>,
    pub logical: LogicalNet,
    pub egress: EgressPolicy,
    pub function: String,
    pub version: String,
}

impl NetRequest {
    /// [`NetManager::setup`] for `instance_id`.
    pub fn setup(
        &self,
        instance_id: &str,
        tap_owner: Option<u32>,
    ) -> Result<InstanceNet, NetError> {
        self.manager.setup(
            instance_id,
            Owner {
                function: &self.function,
                version: &self.version,
            },
            self.logical,
            &self.egress,
            tap_owner,
        )
    }
}

pub struct NetManager {
    cfg: NetConfig,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    used: BTreeSet<u32>,
    entries: BTreeMap<String, AddressEntry>,
}

impl std::fmt::Debug for NetManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetManager")
            .field("cfg", &self.cfg)
            .finish()
    }
}

impl NetManager {
    /// Checks the tools are there and removes what a previous hostd left.
    pub fn new(cfg: NetConfig) -> Result<NetManager, StartError> {
        if cfg.physical_net.prefix_len() > 29 {
            return Err(StartError::TooSmall(cfg.physical_net));
        }
        for tool in ["ip", "nft"] {
            netns::run(tool, &["-V"], None).map_err(|error| StartError::NoTool { tool, error })?;
        }
        std::fs::create_dir_all(&cfg.state_dir).map_err(|error| StartError::StateDir {
            dir: cfg.state_dir.clone(),
            error,
        })?;
        // Closed before any instance has a link: this namespace (emberd's)
        // takes nothing new from instances but the services opened to them.
        netns::run(
            "nft",
            &["-f", "-"],
            Some(&rules::host_ruleset(cfg.physical_net, &cfg.host_services)),
        )
        .map_err(StartError::CloseHost)?;
        let m = NetManager {
            cfg,
            inner: Mutex::new(Inner::default()),
        };
        m.remove_leftovers();
        Ok(m)
    }

    pub fn config(&self) -> &NetConfig {
        &self.cfg
    }

    /// Removes every instance network still recorded (daemon shutdown:
    /// instances mid-build are not in any pool).
    pub fn remove_all(&self) {
        self.remove_leftovers();
        let mut inner = self.lock();
        inner.entries.clear();
        inner.used.clear();
    }

    fn remove_leftovers(&self) {
        let Ok(dir) = std::fs::read_dir(&self.cfg.state_dir) else {
            return;
        };
        for e in dir.flatten() {
            let p = e.path();
            let rec: Option<Record> = std::fs::read(&p)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
            if let Some(r) = rec {
                log::info!("removing the network {} of a previous run", r.netns);
                remove(&r.netns, &r.host_veth);
            }
            let _ = std::fs::remove_file(&p);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn slots(&self) -> u32 {
        let hosts = 1u64 << (32 - u32::from(self.cfg.physical_net.prefix_len()));
        (hosts / 4).min(u64::from(u32::MAX)) as u32
    }

    /// (host side, instance side) addresses of `slot`.
    fn addresses(&self, slot: u32) -> (Ipv4Addr, Ipv4Addr) {
        let base = u32::from(self.cfg.physical_net.network()) + slot * 4;
        (Ipv4Addr::from(base + 1), Ipv4Addr::from(base + 2))
    }

    fn record_path(&self, instance_id: &str) -> PathBuf {
        self.cfg.state_dir.join(format!("{instance_id}.json"))
    }

    /// Makes `instance_id`'s namespace, link, tap and rules. Blocking (runs
    /// `ip` and `nft`); a tap owned by `tap_owner` (a jailed VMM's uid) can
    /// be opened by that uid without privileges.
    pub fn setup(
        &self,
        instance_id: &str,
        owner: Owner<'_>,
        logical: LogicalNet,
        egress: &EgressPolicy,
        tap_owner: Option<u32>,
    ) -> Result<InstanceNet, NetError> {
        let t = Instant::now();
        let slot = {
            let mut inner = self.lock();
            let slot = (0..self.slots())
                .find(|s| !inner.used.contains(s))
                .ok_or(NetError::Exhausted(self.cfg.physical_net))?;
            inner.used.insert(slot);
            slot
        };
        let (host_side, physical) = self.addresses(slot);
        let net = InstanceNet {
            instance_id: instance_id.to_string(),
            netns: format!("ember-{instance_id}"),
            host_veth: format!("{}{slot}", rules::HOST_VETH_PREFIX),
            physical,
            logical,
            slot,
        };
        let record = Record {
            netns: net.netns.clone(),
            host_veth: net.host_veth.clone(),
        };
        let made = serde_json::to_vec(&record)
            .map_err(std::io::Error::from)
            .and_then(|b| std::fs::write(self.record_path(instance_id), b))
            .map_err(NetError::Record)
            .and_then(|_| {
                self.build(&net, host_side, egress, tap_owner)
                    .map_err(NetError::Setup)
            });
        if let Err(e) = made {
            self.teardown(&net);
            return Err(e);
        }
        self.lock().entries.insert(
            instance_id.to_string(),
            AddressEntry {
                instance_id: instance_id.to_string(),
                function_name: owner.function.to_string(),
                version: owner.version.to_string(),
                logical_address: logical.ip(),
                logical_mac: logical.mac(),
                gateway: logical.gateway,
                physical_address: physical,
                host_address: host_side,
                netns: net.netns.clone(),
            },
        );
        log::debug!(
            "network of {instance_id}: {} -> {physical} in {:?}",
            logical.ip(),
            t.elapsed()
        );
        Ok(net)
    }

    fn build(
        &self,
        net: &InstanceNet,
        host_side: Ipv4Addr,
        egress: &EgressPolicy,
        tap_owner: Option<u32>,
    ) -> Result<(), CommandError> {
        netns::create(&net.netns)?;
        let hv = &net.host_veth;
        let root = format!(
            "link add {hv} type veth peer name {NS_VETH} netns {ns}\n\
             addr add {host_side}/30 dev {hv}\n\
             link set {hv} up\n",
            ns = net.netns
        );
        netns::run("ip", &["-batch", "-"], Some(&root))?;
        let gw = net.logical.gateway;
        let prefix = net.logical.address.prefix_len();
        let user = tap_owner.map(|u| format!(" user {u}")).unwrap_or_default();
        let inside = format!(
            "link set lo up\n\
             tuntap add dev {TAP_NAME} mode tap vnet_hdr{user}\n\
             link set {TAP_NAME} address {GATEWAY_MAC}\n\
             addr add {gw}/{prefix} dev {TAP_NAME}\n\
             link set {TAP_NAME} up\n\
             addr add {phys}/30 dev {NS_VETH}\n\
             link set {NS_VETH} up\n\
             route add default via {host_side}\n",
            phys = net.physical
        );
        let ruleset = rules::ruleset(
            &rules::Addressing {
                logical: net.logical.ip(),
                physical: net.physical,
                fenced: self.cfg.fenced(),
            },
            egress,
        );
        netns::within(&net.netns_path(), || {
            // No IPv6 (there is no v6 translation); forwarding for the NAT.
            netns::sysctl("net.ipv6.conf.all.disable_ipv6", "1")?;
            netns::sysctl("net.ipv6.conf.default.disable_ipv6", "1")?;
            netns::sysctl("net.ipv4.ip_forward", "1")?;
            netns::run("ip", &["-batch", "-"], Some(&inside))?;
            netns::run("nft", &["-f", "-"], Some(&ruleset))
        })
    }

    /// Removes the instance's namespace, link and table row. Blocking.
    pub fn teardown(&self, net: &InstanceNet) {
        remove(&net.netns, &net.host_veth);
        let _ = std::fs::remove_file(self.record_path(&net.instance_id));
        let mut inner = self.lock();
        inner.entries.remove(&net.instance_id);
        inner.used.remove(&net.slot);
    }

    /// The address table: every instance with a network, by instance id.
    pub fn table(&self) -> Vec<AddressEntry> {
        self.lock().entries.values().cloned().collect()
    }

    /// Applies `policy` to the running instances of `function`; returns
    /// how many were updated. Blocking.
    pub fn apply_egress(&self, function: &str, policy: &EgressPolicy) -> Result<usize, NetError> {
        let targets: Vec<String> = self
            .lock()
            .entries
            .values()
            .filter(|e| e.function_name == function)
            .map(|e| e.netns.clone())
            .collect();
        let update = rules::egress_update(&self.cfg.fenced(), policy);
        let mut done = 0;
        for ns in targets {
            let p = netns::path(&ns);
            match netns::within(&p, || netns::run("nft", &["-f", "-"], Some(&update))) {
                Ok(()) => done += 1,
                // Gone meanwhile: the instance was destroyed.
                Err(_) if !p.exists() => {}
                Err(error) => return Err(NetError::Egress { netns: ns, error }),
            }
        }
        Ok(done)
    }
}

fn remove(netns_name: &str, host_veth: &str) {
    // The link first: deleting it is synchronous, while a deleted
    // namespace takes its devices with it only later (the kernel cleans
    // namespaces up in the background), and the slot may be reused at once.
    // Absent (never made, or gone) is fine.
    let _ = netns::run("ip", &["link", "delete", host_veth], None);
    if let Err(e) = netns::delete(netns_name) {
        log::warn!("removing network namespace {netns_name}: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn physical() -> Ipv4Net {
        "10.200.0.0/16".parse().unwrap()
    }

    fn logical(addr: &str, gw: &str) -> LogicalNet {
        LogicalNet {
            address: addr.parse().unwrap(),
            gateway: gw.parse().unwrap(),
        }
    }

    #[test]
    fn logical_net_validation() {
        assert!(LogicalNet::default_net().validate(physical()).is_ok());
        assert!(logical("10.9.0.20/24", "10.9.0.1")
            .validate(physical())
            .is_ok());
        for (a, g, why) in [
            ("10.9.0.1/24", "10.9.0.1", "differ"),
            ("10.9.0.20/24", "10.9.1.1", "outside"),
            ("10.9.0.0/24", "10.9.0.1", "host address"),
            ("10.9.0.255/24", "10.9.0.1", "host address"),
            ("10.200.5.2/24", "10.200.5.1", "overlaps"),
            ("10.0.0.2/8", "10.0.0.1", "overlaps"),
            ("127.0.0.2/8", "127.0.0.1", "cannot be"),
        ] {
            let e = logical(a, g).validate(physical()).unwrap_err().to_string();
            assert!(e.contains(why), "{a} via {g}: {e}");
        }
    }

    #[test]
    fn mac_follows_the_address() {
        assert_eq!(LogicalNet::default_net().mac(), "06:00:ac:10:00:02");
        let g = LogicalNet::default_net().guest();
        assert_eq!(g.prefix_len, 30);
        assert_eq!(g.gateway, Some(Ipv4Addr::new(172, 16, 0, 1)));
    }

    #[test]
    fn slots_are_slash_30s() {
        let dir = tempfile::tempdir().unwrap();
        let m = NetManager {
            cfg: NetConfig {
                physical_net: "10.200.0.0/24".parse().unwrap(),
                state_dir: dir.path().into(),
                terminate_connections: true,
                host_services: vec![],
                denied: vec![],
            },
            inner: Mutex::new(Inner::default()),
        };
        assert_eq!(m.slots(), 64);
        assert_eq!(
            m.addresses(3),
            (Ipv4Addr::new(10, 200, 0, 13), Ipv4Addr::new(10, 200, 0, 14))
        );
    }
}
