//! The route plan: which prefixes go into the TUN, which address the TUN gets, and which
//! jump-host addresses must bypass it. Pure computation, no I/O.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use thiserror::Error;

/// What the user asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlanSpec {
    /// Networks to route into the tunnel.
    pub cidrs: Vec<IpNet>,
    /// Networks inside `cidrs` to keep out.
    pub excludes: Vec<IpNet>,
    /// The jump host's addresses (kept out of the tunnel when inside `cidrs`).
    pub jump_addrs: Vec<IpAddr>,
    /// TUN device name.
    pub tun_name: String,
    /// TUN MTU.
    pub mtu: u32,
}

/// Why a plan was refused. Every message says what to do instead.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum PlanError {
    /// No `--cidr`.
    #[error("no network to route: pass at least one --cidr, e.g. --cidr 10.0.0.0/16")]
    NoCidr,
    /// A CIDR so wide it would capture internet traffic.
    #[error(
        "{cidr} covers {what}: mse-vpn routes private networks only; pass the VPC's own CIDR (e.g. 10.0.0.0/16)"
    )]
    TooWide {
        /// The CIDR.
        cidr: IpNet,
        /// "the whole internet" or "a large part of the internet".
        what: &'static str,
    },
    /// Host bits set (`10.0.0.1/16`).
    #[error("{cidr} has host bits set: did you mean {network}?")]
    HostBits {
        /// As typed.
        cidr: IpNet,
        /// The network it lies in.
        network: IpNet,
    },
    /// The excludes remove everything.
    #[error("the --exclude networks cover every --cidr: nothing would be routed")]
    EverythingExcluded,
    /// Splitting around excludes produced too many routes.
    #[error(
        "the --exclude networks split the CIDRs into more than {max} routes: use fewer, wider excludes"
    )]
    TooManyRoutes {
        /// The limit.
        max: usize,
    },
    /// Invalid interface name.
    #[error("'{name}' is not a valid interface name: use 1 to 15 letters, digits, '-' or '_'")]
    BadTunName {
        /// As typed.
        name: String,
    },
    /// MTU out of range.
    #[error("MTU {mtu} is out of range: use {min} to 65535")]
    BadMtu {
        /// As typed.
        mtu: u32,
        /// The minimum for this plan (1280 with IPv6 routes).
        min: u32,
    },
    /// No address left for the TUN.
    #[error(
        "the routed networks cover every candidate TUN address (198.18.0.0/15, 100.64.0.0/10, 192.0.0.0/24): exclude one of them"
    )]
    NoTunAddress,
}

/// A validated plan. Immutable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoutePlan {
    routes: Vec<IpNet>,
    tun_name: String,
    mtu: u32,
    tun_v4: Ipv4Addr,
    tun_v6: Option<Ipv6Addr>,
    bypass: Vec<IpAddr>,
}

const MAX_ROUTES: usize = 256;

/// Subtracts `hole` from `net` (as a list of prefixes).
fn subtract(net: IpNet, hole: &IpNet) -> Vec<IpNet> {
    if hole.contains(&net) {
        return Vec::new();
    }
    if !net.contains(hole) {
        return vec![net];
    }
    // Split into halves until the hole is isolated.
    match net.subnets(net.prefix_len() + 1) {
        Ok(halves) => halves.flat_map(|h| subtract(h, hole)).collect(),
        Err(_) => Vec::new(),
    }
}

fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

impl RoutePlan {
    /// Validates `spec` and computes the plan.
    pub fn new(spec: PlanSpec) -> Result<RoutePlan, PlanError> {
        if spec.cidrs.is_empty() {
            return Err(PlanError::NoCidr);
        }
        if !valid_ifname(&spec.tun_name) {
            return Err(PlanError::BadTunName {
                name: spec.tun_name,
            });
        }
        for cidr in spec.cidrs.iter().chain(&spec.excludes) {
            if cidr.network() != cidr.addr() {
                return Err(PlanError::HostBits {
                    cidr: *cidr,
                    network: cidr.trunc(),
                });
            }
        }
        for cidr in &spec.cidrs {
            let (len, min) = match cidr {
                IpNet::V4(n) => (n.prefix_len(), 8),
                IpNet::V6(n) => (n.prefix_len(), 16),
            };
            if len == 0 {
                return Err(PlanError::TooWide {
                    cidr: *cidr,
                    what: "the whole internet",
                });
            }
            if len < min {
                return Err(PlanError::TooWide {
                    cidr: *cidr,
                    what: "a large part of the internet",
                });
            }
        }
        let mut routes: Vec<IpNet> = IpNet::aggregate(&spec.cidrs);
        for hole in &spec.excludes {
            routes = routes.into_iter().flat_map(|n| subtract(n, hole)).collect();
            if routes.len() > MAX_ROUTES {
                return Err(PlanError::TooManyRoutes { max: MAX_ROUTES });
            }
        }
        routes = IpNet::aggregate(&routes);
        if routes.is_empty() {
            return Err(PlanError::EverythingExcluded);
        }
        let has_v6 = routes.iter().any(|r| matches!(r, IpNet::V6(_)));
        let min_mtu = if has_v6 { 1280 } else { 576 };
        if spec.mtu < min_mtu || spec.mtu > 65_535 {
            return Err(PlanError::BadMtu {
                mtu: spec.mtu,
                min: min_mtu,
            });
        }
        let taken = |a: IpAddr| {
            routes.iter().any(|r| r.contains(&a)) || spec.excludes.iter().any(|r| r.contains(&a))
        };
        let tun_v4 = [
            Ipv4Addr::new(198, 18, 0, 1),
            Ipv4Addr::new(198, 19, 255, 1),
            Ipv4Addr::new(100, 64, 0, 1),
            Ipv4Addr::new(100, 127, 255, 1),
            Ipv4Addr::new(192, 0, 0, 9),
        ]
        .into_iter()
        .find(|a| !taken(IpAddr::V4(*a)))
        .ok_or(PlanError::NoTunAddress)?;
        let tun_v6 = if has_v6 {
            Some(
                [
                    Ipv6Addr::new(0xfd6d, 0x7365, 0x7670, 0x6e00, 0, 0, 0, 1),
                    Ipv6Addr::new(0xfdff, 0x6d73, 0x6576, 0x706e, 0, 0, 0, 1),
                ]
                .into_iter()
                .find(|a| !taken(IpAddr::V6(*a)))
                .ok_or(PlanError::NoTunAddress)?,
            )
        } else {
            None
        };
        let mut bypass: Vec<IpAddr> = spec
            .jump_addrs
            .iter()
            .copied()
            .filter(|a| routes.iter().any(|r| r.contains(a)))
            .collect();
        bypass.sort();
        bypass.dedup();
        Ok(RoutePlan {
            routes,
            tun_name: spec.tun_name,
            mtu: spec.mtu,
            tun_v4,
            tun_v6,
            bypass,
        })
    }

    /// Prefixes routed into the TUN (CIDRs minus excludes, aggregated).
    pub fn routes(&self) -> &[IpNet] {
        &self.routes
    }

    /// The routing table holding the TUN's default route for replies to cloud callers.
    pub fn reply_table(&self) -> u32 {
        // One table per TUN name, in a range unlikely to be used by anything else.
        let hash = self.tun_name().bytes().fold(2_166_136_261u32, |h, b| {
            (h ^ u32::from(b)).wrapping_mul(16_777_619)
        });
        28_000 + hash % 1000
    }

    /// The TUN device name.
    pub fn tun_name(&self) -> &str {
        &self.tun_name
    }

    /// The TUN MTU.
    pub fn mtu(&self) -> u32 {
        self.mtu
    }

    /// The TUN's IPv4 address (outside every routed and excluded network).
    pub fn tun_v4(&self) -> Ipv4Addr {
        self.tun_v4
    }

    /// The TUN's IPv6 address, when IPv6 networks are routed.
    pub fn tun_v6(&self) -> Option<Ipv6Addr> {
        self.tun_v6
    }

    /// Jump-host addresses inside the routed networks: they keep their pre-TUN path.
    pub fn bypass(&self) -> &[IpAddr] {
        &self.bypass
    }

    /// True if traffic to `addr` goes into the tunnel.
    pub fn carries(&self, addr: IpAddr) -> bool {
        !self.bypass.contains(&addr) && self.routes.iter().any(|r| r.contains(&addr))
    }

    /// The TUN's addresses as host prefixes.
    pub fn tun_addrs(&self) -> Vec<IpNet> {
        let mut v = vec![IpNet::V4(Ipv4Net::from(self.tun_v4))];
        if let Some(a) = self.tun_v6 {
            v.push(IpNet::V6(Ipv6Net::from(a)));
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn spec(cidrs: &[&str], excludes: &[&str], jump: &[&str]) -> PlanSpec {
        PlanSpec {
            cidrs: cidrs.iter().map(|c| net(c)).collect(),
            excludes: excludes.iter().map(|c| net(c)).collect(),
            jump_addrs: jump.iter().map(|a| a.parse().unwrap()).collect(),
            tun_name: "mse0".into(),
            mtu: 65_000,
        }
    }

    #[test]
    fn simple_v4_plan() {
        let p = RoutePlan::new(spec(&["10.0.0.0/16"], &[], &["203.0.113.7"])).unwrap();
        assert_eq!(p.routes(), &[net("10.0.0.0/16")]);
        assert_eq!(p.tun_v4(), Ipv4Addr::new(198, 18, 0, 1));
        assert_eq!(p.tun_v6(), None);
        assert!(p.bypass().is_empty());
        assert!(p.carries("10.0.3.7".parse().unwrap()));
        assert!(!p.carries("10.1.0.1".parse().unwrap()));
    }

    #[test]
    fn excludes_split_the_cidr() {
        let p = RoutePlan::new(spec(&["10.0.0.0/16"], &["10.0.9.0/24"], &[])).unwrap();
        assert!(!p.carries("10.0.9.5".parse().unwrap()));
        assert!(p.carries("10.0.8.5".parse().unwrap()));
        assert!(p.carries("10.0.10.5".parse().unwrap()));
        assert!(p.carries("10.0.255.1".parse().unwrap()));
        assert_eq!(p.routes().len(), 8, "{:?}", p.routes());
        let whole = RoutePlan::new(spec(&["10.0.0.0/16"], &["10.0.0.0/8"], &[]));
        assert_eq!(whole, Err(PlanError::EverythingExcluded));
    }

    #[test]
    fn v6_gets_a_ula_tun_address_and_overlaps_merge() {
        let p = RoutePlan::new(spec(
            &["fd00:1::/64", "10.0.0.0/16", "10.0.1.0/24"],
            &[],
            &[],
        ))
        .unwrap();
        assert_eq!(p.routes(), &[net("10.0.0.0/16"), net("fd00:1::/64")]);
        assert!(p.tun_v6().is_some());
        assert!(!p.carries(IpAddr::V6(p.tun_v6().unwrap())));
    }

    #[test]
    fn jump_host_inside_a_cidr_bypasses_the_tunnel() {
        let p = RoutePlan::new(spec(&["10.0.0.0/8"], &[], &["10.99.0.2", "192.0.2.1"])).unwrap();
        assert_eq!(p.bypass(), &["10.99.0.2".parse::<IpAddr>().unwrap()]);
        assert!(!p.carries("10.99.0.2".parse().unwrap()));
        assert!(p.carries("10.99.0.3".parse().unwrap()));
    }

    #[test]
    fn tun_address_avoids_user_networks() {
        let p = RoutePlan::new(spec(&["198.18.0.0/15"], &[], &[])).unwrap();
        assert_eq!(p.tun_v4(), Ipv4Addr::new(100, 64, 0, 1));
        let p = RoutePlan::new(spec(&["10.0.0.0/16"], &["198.18.0.0/16"], &[])).unwrap();
        assert_eq!(p.tun_v4(), Ipv4Addr::new(198, 19, 255, 1));
    }

    #[test]
    fn bad_inputs_are_refused_with_a_hint() {
        assert_eq!(RoutePlan::new(spec(&[], &[], &[])), Err(PlanError::NoCidr));
        let e = RoutePlan::new(spec(&["0.0.0.0/0"], &[], &[])).unwrap_err();
        assert!(e.to_string().contains("whole internet"), "{e}");
        let e = RoutePlan::new(spec(&["::/0"], &[], &[])).unwrap_err();
        assert!(matches!(e, PlanError::TooWide { .. }));
        let e = RoutePlan::new(spec(&["0.0.0.0/1"], &[], &[])).unwrap_err();
        assert!(e.to_string().contains("large part"), "{e}");
        let e = RoutePlan::new(spec(&["10.0.0.1/16"], &[], &[])).unwrap_err();
        assert!(e.to_string().contains("did you mean 10.0.0.0/16"), "{e}");
        let mut s = spec(&["10.0.0.0/16"], &[], &[]);
        s.tun_name = "this-name-is-too-long".into();
        assert!(matches!(
            RoutePlan::new(s),
            Err(PlanError::BadTunName { .. })
        ));
        let mut s = spec(&["fd00::/64"], &[], &[]);
        s.mtu = 1000;
        assert!(matches!(
            RoutePlan::new(s),
            Err(PlanError::BadMtu { min: 1280, .. })
        ));
    }
}
