//! Where a cloud caller's connection goes on this host ([`route`]): from the caller's own
//! address to the TUN address of its family and the exposed port's local port, or why it is
//! refused before it reaches the local app.
//!
//! Pure: owns no sockets and no channels; the exposed port (the [`Target`]) is looked up in
//! [`Forwards`](crate::reverse::Forwards) by the driver before the call reaches the relay.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use thiserror::Error;

use crate::reverse::Target;

/// Where a cloud caller's connection goes on this host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CallRoute {
    /// The caller as the local app sees it (an IPv4-mapped IPv6 address as plain IPv4).
    pub caller: SocketAddr,
    /// The TUN address of the caller's family, and the app's port.
    pub local: SocketAddr,
    /// The exposed port's entry (to count the call, and for the loopback fallback).
    pub forward: u64,
}

/// Why a cloud caller's connection is refused before it reaches the local app.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
pub enum CallRefused {
    /// No listener of this session is bound on that port of that connection.
    #[error("no exposed port listens there")]
    NoForward,
    /// The jump host's caller address could not be parsed.
    #[error("the jump host reported no usable caller address")]
    NoCaller,
    /// An IPv6 caller, and no IPv6 network is routed (the TUN has no IPv6 address).
    #[error("an IPv6 caller, and the TUN has no IPv6 address")]
    NoIpv6,
}

/// Where a call to the exposed port `target` (`None`: no listener of ours there) from
/// `caller` (as the jump host reported it) goes, given the TUN's addresses.
pub fn route(
    target: Option<Target>,
    caller: Option<SocketAddr>,
    local_v4: Ipv4Addr,
    local_v6: Option<Ipv6Addr>,
) -> Result<CallRoute, CallRefused> {
    let target = target.ok_or(CallRefused::NoForward)?;
    let caller = caller.map(unmap).ok_or(CallRefused::NoCaller)?;
    let local = local_for(caller, local_v4, local_v6)?;
    Ok(CallRoute {
        caller,
        local: SocketAddr::new(local, target.local_port),
        forward: target.id,
    })
}

/// An IPv4-mapped IPv6 address (`::ffff:10.0.7.9`, as sshd may report an IPv4 caller) as
/// the IPv4 address it is.
fn unmap(c: SocketAddr) -> SocketAddr {
    match c.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), c.port()),
            None => c,
        },
        IpAddr::V4(_) => c,
    }
}

/// The TUN address a caller of this family reaches.
fn local_for(
    caller: SocketAddr,
    v4: Ipv4Addr,
    v6: Option<Ipv6Addr>,
) -> Result<IpAddr, CallRefused> {
    match caller {
        SocketAddr::V4(_) => Ok(IpAddr::V4(v4)),
        SocketAddr::V6(_) => v6.map(IpAddr::V6).ok_or(CallRefused::NoIpv6),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn callers_are_mapped_to_the_tun_address_of_their_family() {
        let v4 = Ipv4Addr::new(198, 18, 0, 1);
        let v6: Ipv6Addr = "fd00:198:18::1".parse().unwrap();
        let mapped: SocketAddr = "[::ffff:10.0.7.9]:40022".parse().unwrap();
        assert_eq!(unmap(mapped), "10.0.7.9:40022".parse().unwrap());
        let plain6: SocketAddr = "[fd00:10::20]:5000".parse().unwrap();
        assert_eq!(unmap(plain6), plain6);
        assert_eq!(local_for(unmap(mapped), v4, None), Ok(IpAddr::V4(v4)));
        assert_eq!(local_for(plain6, v4, Some(v6)), Ok(IpAddr::V6(v6)));
        assert_eq!(local_for(plain6, v4, None), Err(CallRefused::NoIpv6));
    }
}
