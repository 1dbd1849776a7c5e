//! Addressing a guest interface with the classic ioctls (no `ip` binary
//! needed in the root filesystem, and no netlink code to keep).

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};

use crate::protocol::GuestNetwork;

/// Checks what the kernel would otherwise reject with a less clear error.
pub fn validate(net: &GuestNetwork) -> Result<(), String> {
    if net.interface.is_empty() || net.interface.len() >= libc::IFNAMSIZ {
        return Err(format!("invalid interface name {:?}", net.interface));
    }
    if !(1..=32).contains(&net.prefix_len) {
        return Err(format!("invalid prefix length {}", net.prefix_len));
    }
    if let Some(gw) = net.gateway {
        if !same_subnet(net.address, gw, net.prefix_len) {
            return Err(format!(
                "gateway {gw} is outside {}/{}",
                net.address, net.prefix_len
            ));
        }
    }
    Ok(())
}

fn mask(prefix_len: u8) -> u32 {
    u32::MAX
        .checked_shl(32 - u32::from(prefix_len))
        .unwrap_or(0)
}

fn same_subnet(a: Ipv4Addr, b: Ipv4Addr, prefix_len: u8) -> bool {
    let m = mask(prefix_len);
    u32::from(a) & m == u32::from(b) & m
}

/// Gives `net.interface` its address and netmask, brings it up, and adds
/// the default route.
pub fn configure(net: &GuestNetwork) -> Result<(), String> {
    validate(net)?;
    let sock = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| format!("socket: {e}"))?;
    let ctx = |what: &str, e: io::Error| format!("{} {what}: {e}", net.interface);
    set_addr(&sock, &net.interface, libc::SIOCSIFADDR, net.address)
        .map_err(|e| ctx("address", e))?;
    let m = Ipv4Addr::from(mask(net.prefix_len));
    set_addr(&sock, &net.interface, libc::SIOCSIFNETMASK, m).map_err(|e| ctx("netmask", e))?;
    set_up(&sock, &net.interface).map_err(|e| ctx("up", e))?;
    if let Some(gw) = net.gateway {
        add_default_route(&sock, gw).map_err(|e| ctx("default route", e))?;
    }
    Ok(())
}

fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.as_bytes()) {
        *dst = *src as libc::c_char;
    }
    req
}

fn sockaddr_in(addr: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(addr).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size (16 bytes), and
    // every bit pattern is a valid sockaddr.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn ioctl<T>(sock: &OwnedFd, request: libc::Ioctl, arg: &mut T) -> io::Result<()> {
    // SAFETY: every request used here reads or writes exactly the struct
    // passed (ifreq or rtentry), which is initialised and outlives the call,
    // on a socket fd we own.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), request, arg as *mut T) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn set_addr(sock: &OwnedFd, name: &str, request: libc::Ioctl, addr: Ipv4Addr) -> io::Result<()> {
    let mut req = ifreq(name);
    req.ifr_ifru.ifru_addr = sockaddr_in(addr);
    ioctl(sock, request, &mut req)
}

fn set_up(sock: &OwnedFd, name: &str) -> io::Result<()> {
    let mut req = ifreq(name);
    ioctl(sock, libc::SIOCGIFFLAGS, &mut req)?;
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    req.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
    ioctl(sock, libc::SIOCSIFFLAGS, &mut req)
}

fn add_default_route(sock: &OwnedFd, gateway: Ipv4Addr) -> io::Result<()> {
    // SAFETY: rtentry is plain data; all-zero is a valid value.
    let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
    rt.rt_dst = sockaddr_in(Ipv4Addr::UNSPECIFIED);
    rt.rt_genmask = sockaddr_in(Ipv4Addr::UNSPECIFIED);
    rt.rt_gateway = sockaddr_in(gateway);
    rt.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
    match ioctl(sock, libc::SIOCADDRT, &mut rt) {
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        r => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(prefix_len: u8, gateway: Option<&str>) -> GuestNetwork {
        GuestNetwork {
            interface: "eth0".into(),
            address: "172.16.0.2".parse().unwrap(),
            prefix_len,
            gateway: gateway.map(|g| g.parse().unwrap()),
        }
    }

    #[test]
    fn validates_prefix_and_gateway() {
        assert!(validate(&net(30, Some("172.16.0.1"))).is_ok());
        assert!(validate(&net(32, None)).is_ok());
        assert!(validate(&net(0, None)).is_err());
        assert!(validate(&net(33, None)).is_err());
        let e = validate(&net(30, Some("172.16.0.5"))).unwrap_err();
        assert!(e.contains("outside 172.16.0.2/30"), "{e}");
        let mut bad = net(30, None);
        bad.interface = "a-very-long-interface-name".into();
        assert!(validate(&bad).is_err());
    }

    #[test]
    fn masks() {
        assert_eq!(Ipv4Addr::from(mask(30)), Ipv4Addr::new(255, 255, 255, 252));
        assert_eq!(Ipv4Addr::from(mask(32)), Ipv4Addr::new(255, 255, 255, 255));
        assert_eq!(Ipv4Addr::from(mask(1)), Ipv4Addr::new(128, 0, 0, 0));
    }
}
