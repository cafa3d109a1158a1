//! The direct path (`mse-vpn run` without root, issue 24): when the TUN carries *all* of an
//! app's traffic, only the VPC goes through SSH; everything else leaves through this host's
//! own sockets, as slirp4netns and pasta carry a rootless container's traffic. This file is
//! the pure half: which way a destination goes ([`DirectConfig::route`]) and the UDP NAT table
//! ([`UdpNat`]), on injected time. It never opens a socket: the relay turns its answers into
//! commands ([`super::Command::Connect`], [`super::Command::Udp`]) that the driver carries out.
//!
//! ```text
//!  app ─▶ TUN ─▶ engine ─▶ relay: route(dst)
//!                    ├─ in a VPC CIDR ─────────────▶ SSH channel (TCP); ICMP unreachable (UDP,
//!                    │                               ping)
//!                    ├─ the host-loopback alias ───▶ host socket to 127.0.0.1 / ::1, same port
//!                    ├─ the DNS address (port 53) ─▶ host socket to the split-DNS responder
//!                    └─ anything else ─────────────▶ host socket to dst itself (TCP, UDP;
//!                                                    ping: an unprivileged ICMP socket)
//! ```
//!
//! Off unless configured ([`super::RelayConfig::direct`] `None`): `up` routes only the VPC
//! CIDRs into the TUN and behaves exactly as before. A session turns it on with one field of
//! the driver's settings (which also has the engine hand UDP over instead of refusing it):
//!
//! ```text
//!  DriverConfig {
//!      direct: Some(DirectConfig {
//!          host_loopback: vec![HOST_LOOPBACK_V4.into()],           // 198.18.0.2 -> 127.0.0.1
//!          dns: Some(DnsRedirect { at: (DNS_V4, 53).into(),         // the app's resolv.conf
//!                                  to: responder.local_addr()? }), // bound on 127.0.0.1:0
//!          ..DirectConfig::new(vpc_cidrs)
//!      }),
//!      ..
//!  }
//! ```
//!
//! ICMP echo (ping) outside the VPC goes through the same table, on unprivileged ICMP
//! sockets (`SOCK_DGRAM`/`IPPROTO_ICMP`), where the host allows them to this user
//! (`net.ipv4.ping_group_range`); where it does not, and to the VPC, the app gets ICMP
//! "administratively prohibited", as in `up`.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use ipnet::IpNet;

/// Default of [`DirectConfig::udp_idle`]: Linux conntrack's timeout for a UDP stream
/// (`nf_conntrack_udp_timeout_stream`).
pub const DEFAULT_UDP_IDLE: Duration = Duration::from_secs(180);
/// How long a UDP association that is not a stream (yet) lives without traffic: Linux
/// conntrack's `nf_conntrack_udp_timeout`. A DNS lookup's socket is gone 30 s after its
/// answer.
pub const UDP_SHORT_IDLE: Duration = Duration::from_secs(30);
/// An association becomes a stream (with [`DirectConfig::udp_idle`]) once its destination
/// answered and traffic goes on this long after its first datagram, as conntrack's rule.
pub const UDP_STREAM_AFTER: Duration = Duration::from_secs(2);
/// Default of [`DirectConfig::max_udp`]: host UDP sockets at once. An ordinary user's
/// descriptor limit is often 1024, shared with the direct TCP flows and the SSH connections.
pub const DEFAULT_MAX_UDP: usize = 256;
/// Idle associations are looked for this often.
pub const UDP_SWEEP: Duration = Duration::from_secs(1);

/// The direct path's settings (see the module documentation).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirectConfig {
    /// The routed VPC CIDRs: TCP to them goes through SSH as always (UDP to them is answered
    /// with ICMP port unreachable, as in `up`); every other destination goes direct.
    pub vpc: Vec<IpNet>,
    /// Addresses that stand for this host's own loopback inside the app's network: a TCP
    /// connection or UDP datagram to one of them goes to 127.0.0.1 (an IPv4 alias) or ::1
    /// (an IPv6 one) at the same port, so a database listening on the host's 127.0.0.1 is
    /// reached from inside at `ALIAS:5432`. The convention, as slirp's 10.0.2.2: the TUN's
    /// peer address, e.g. 198.18.0.2 for a TUN at 198.18.0.1 ([`HOST_LOOPBACK_V4`]).
    pub host_loopback: Vec<IpAddr>,
    /// The DNS server as the app sees it (what its resolv.conf names, port 53) and where
    /// its queries really go on this host (the split-DNS responder's socket, bound on
    /// 127.0.0.1 because the app's address is not this namespace's): UDP and TCP to `at`
    /// go to `to`. As slirp's 10.0.2.3.
    pub dns: Option<DnsRedirect>,
    /// How long a UDP stream lives without traffic (associations that are not streams
    /// live [`UDP_SHORT_IDLE`], or this if shorter).
    pub udp_idle: Duration,
    /// Host UDP sockets at once: beyond it the association idle longest is dropped to make
    /// room (its app sees its datagrams go unanswered, as after a NAT timeout).
    pub max_udp: usize,
}

/// The suggested host-loopback alias for a TUN at 198.18.0.1 (its peer).
pub const HOST_LOOPBACK_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// The suggested DNS address for a TUN at 198.18.0.1.
pub const DNS_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);

/// See [`DirectConfig::dns`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DnsRedirect {
    /// The address and port the app queries.
    pub at: SocketAddr,
    /// The responder's socket on this host.
    pub to: SocketAddr,
}

impl DirectConfig {
    /// Only `vpc` through SSH, with no alias, no DNS redirect and the default UDP bounds.
    pub fn new(vpc: Vec<IpNet>) -> DirectConfig {
        DirectConfig {
            vpc,
            host_loopback: Vec::new(),
            dns: None,
            udp_idle: DEFAULT_UDP_IDLE,
            max_udp: DEFAULT_MAX_UDP,
        }
    }

    /// Which way traffic to `dst` goes (a ping's port is 0). The DNS address and the
    /// loopback aliases come first (even inside a VPC CIDR: what was configured explicitly
    /// wins). The DNS address is a host serving DNS only: its other ports are refused (they
    /// do not leave this machine for an address that is nobody's), a ping to it is answered
    /// by this host's loopback.
    pub fn route(&self, dst: SocketAddr) -> Route {
        let loopback = |port| {
            let lo = match dst.ip() {
                IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
            };
            Route::Host(SocketAddr::new(lo, port))
        };
        if let Some(dns) = self.dns
            && dst == dns.at
        {
            return Route::Host(dns.to);
        }
        if self.host_loopback.contains(&dst.ip()) {
            return loopback(dst.port());
        }
        if let Some(dns) = self.dns
            && dst.ip() == dns.at.ip()
        {
            return if dst.port() == 0 {
                loopback(0)
            } else {
                Route::Refuse
            };
        }
        if self.vpc.iter().any(|net| net.contains(&dst.ip())) {
            return Route::Tunnel;
        }
        Route::Host(dst)
    }
}

/// Which way a destination goes ([`DirectConfig::route`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// Into the VPC, through SSH.
    Tunnel,
    /// Out through a socket of this host, to this address.
    Host(SocketAddr),
    /// Nowhere: a reset for TCP, port unreachable for UDP, "prohibited" for a ping.
    Refuse,
}

/// One UDP association of the NAT table: its host socket's name in commands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UdpId(pub u64);

impl std::fmt::Display for UdpId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "u{}", self.0)
    }
}

/// What the app's datagrams of one association carry: from the app's socket to the
/// address it sent to (its replies come back from that address, whatever `target` is).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct UdpKey {
    /// The app's address and port (for an echo: its identifier).
    pub src: SocketAddr,
    /// Where the app sent them (for an echo: port 0).
    pub dst: SocketAddr,
    /// ICMP echo (ping) on an unprivileged ICMP socket, not UDP.
    pub echo: bool,
}

#[derive(Debug)]
struct Association {
    key: UdpKey,
    /// Its first datagram.
    since: Instant,
    /// Its last datagram, either way.
    last: Instant,
    /// The destination answered.
    replied: bool,
    /// Lives [`DirectConfig::udp_idle`] (not [`UDP_SHORT_IDLE`]).
    stream: bool,
}

/// The result of [`UdpNat::outbound`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outbound {
    /// The association the datagram goes out on.
    pub id: UdpId,
    /// It is new: its socket is to be opened first.
    pub new: bool,
    /// The association dropped to make room for it (its socket is to be closed).
    pub evicted: Option<(UdpId, UdpKey)>,
}

/// The UDP NAT table: one association (and one connected host socket) per app socket and
/// destination, bounded, forgotten after its idle timeout. Pure: time is an argument; the
/// order of everything is the order of the ids (deterministic).
#[derive(Debug)]
pub struct UdpNat {
    by_key: HashMap<UdpKey, UdpId>,
    associations: BTreeMap<UdpId, Association>,
    next: u64,
    max: usize,
    idle: Duration,
    next_sweep: Option<Instant>,
}

impl UdpNat {
    /// An empty table of at most `max` associations (at least one).
    pub fn new(max: usize, idle: Duration) -> UdpNat {
        UdpNat {
            by_key: HashMap::new(),
            associations: BTreeMap::new(),
            next: 0,
            max: max.max(1),
            idle,
            next_sweep: None,
        }
    }

    /// Associations live now.
    pub fn len(&self) -> usize {
        self.associations.len()
    }

    /// True when there is none.
    pub fn is_empty(&self) -> bool {
        self.associations.is_empty()
    }

    /// A datagram from the app for `key`: its association, made (and room made for it) if
    /// there is none.
    pub fn outbound(&mut self, now: Instant, key: UdpKey) -> Outbound {
        if let Some(id) = self.by_key.get(&key).copied() {
            self.touch(now, id);
            return Outbound {
                id,
                new: false,
                evicted: None,
            };
        }
        let evicted = (self.associations.len() >= self.max)
            .then(|| self.idlest())
            .flatten()
            .and_then(|old| Some((old, self.remove(old)?)));
        let id = UdpId(self.next);
        self.next += 1;
        self.by_key.insert(key, id);
        self.associations.insert(
            id,
            Association {
                key,
                since: now,
                last: now,
                replied: false,
                stream: false,
            },
        );
        self.next_sweep.get_or_insert(now + UDP_SWEEP);
        Outbound {
            id,
            new: true,
            evicted,
        }
    }

    /// A datagram from the destination of `id`: the association to write it back as (from
    /// `key.dst` to `key.src`), or `None` if it is gone.
    pub fn inbound(&mut self, now: Instant, id: UdpId) -> Option<UdpKey> {
        let a = self.associations.get_mut(&id)?;
        a.replied = true;
        let key = a.key;
        self.touch(now, id);
        Some(key)
    }

    /// The association `id`, if it lives.
    pub fn key(&self, id: UdpId) -> Option<UdpKey> {
        self.associations.get(&id).map(|a| a.key)
    }

    /// Forgets `id` (its socket failed, or it was evicted); its key, if it lived.
    pub fn remove(&mut self, id: UdpId) -> Option<UdpKey> {
        let a = self.associations.remove(&id)?;
        self.by_key.remove(&a.key);
        if self.associations.is_empty() {
            self.next_sweep = None;
        }
        Some(a.key)
    }

    /// The associations idle past their timeout at `now`, forgotten (their sockets are to
    /// be closed). Looked for every [`UDP_SWEEP`] at most.
    pub fn expire(&mut self, now: Instant) -> Vec<UdpId> {
        if self.next_sweep.is_none_or(|t| now < t) {
            return Vec::new();
        }
        let expired: Vec<UdpId> = self
            .associations
            .iter()
            .filter(|(_, a)| now.saturating_duration_since(a.last) >= self.idle_of(a))
            .map(|(id, _)| *id)
            .collect();
        for id in &expired {
            self.remove(*id);
        }
        if !self.associations.is_empty() {
            self.next_sweep = Some(now + UDP_SWEEP);
        }
        expired
    }

    /// When [`UdpNat::expire`] should run next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.next_sweep
    }

    fn touch(&mut self, now: Instant, id: UdpId) {
        if let Some(a) = self.associations.get_mut(&id) {
            a.last = a.last.max(now);
            if a.replied && now.saturating_duration_since(a.since) >= UDP_STREAM_AFTER {
                a.stream = true;
            }
        }
    }

    fn idle_of(&self, a: &Association) -> Duration {
        if a.stream {
            self.idle
        } else {
            UDP_SHORT_IDLE.min(self.idle)
        }
    }

    /// The association idle longest (the oldest first among equals).
    fn idlest(&self) -> Option<UdpId> {
        self.associations
            .iter()
            .min_by_key(|(id, a)| (a.last, **id))
            .map(|(id, _)| *id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VPC: &str = "10.0.0.0/16";

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn config() -> DirectConfig {
        DirectConfig {
            host_loopback: vec![IpAddr::V4(HOST_LOOPBACK_V4), "fd00::2".parse().unwrap()],
            dns: Some(DnsRedirect {
                at: addr("198.18.0.3:53"),
                to: addr("127.0.0.1:40053"),
            }),
            ..DirectConfig::new(vec![VPC.parse().unwrap()])
        }
    }

    #[test]
    fn the_vpc_goes_through_the_tunnel_and_everything_else_to_itself() {
        let c = config();
        assert_eq!(c.route(addr("10.0.3.7:5432")), Route::Tunnel);
        assert_eq!(c.route(addr("10.0.255.255:1")), Route::Tunnel);
        assert_eq!(
            c.route(addr("10.1.0.1:80")),
            Route::Host(addr("10.1.0.1:80"))
        );
        assert_eq!(
            c.route(addr("93.184.216.34:443")),
            Route::Host(addr("93.184.216.34:443"))
        );
        assert_eq!(
            c.route(addr("[2001:db8::1]:443")),
            Route::Host(addr("[2001:db8::1]:443"))
        );
    }

    #[test]
    fn the_alias_is_the_hosts_loopback_at_the_same_port_and_dns_goes_to_the_responder() {
        let c = config();
        assert_eq!(
            c.route(addr("198.18.0.2:5432")),
            Route::Host(addr("127.0.0.1:5432"))
        );
        assert_eq!(
            c.route(addr("[fd00::2]:6379")),
            Route::Host(addr("[::1]:6379"))
        );
        assert_eq!(
            c.route(addr("198.18.0.3:53")),
            Route::Host(addr("127.0.0.1:40053"))
        );
        // The DNS address serves DNS only; a ping to it is answered by this host.
        assert_eq!(c.route(addr("198.18.0.3:80")), Route::Refuse);
        assert_eq!(
            c.route(addr("198.18.0.3:0")),
            Route::Host(addr("127.0.0.1:0"))
        );
        // An explicit alias wins over a CIDR that covers it.
        let inside = DirectConfig {
            host_loopback: vec!["10.0.0.2".parse().unwrap()],
            ..config()
        };
        assert_eq!(
            inside.route(addr("10.0.0.2:22")),
            Route::Host(addr("127.0.0.1:22"))
        );
    }

    fn key(port: u16) -> UdpKey {
        UdpKey {
            src: SocketAddr::from(([198, 18, 0, 1], port)),
            dst: addr("192.0.2.53:53"),
            echo: false,
        }
    }

    #[test]
    fn one_association_per_app_socket_and_destination() {
        let t0 = Instant::now();
        let mut nat = UdpNat::new(8, DEFAULT_UDP_IDLE);
        let a = nat.outbound(t0, key(5000));
        assert!(a.new);
        let again = nat.outbound(t0, key(5000));
        assert_eq!((again.id, again.new), (a.id, false));
        let other_dst = nat.outbound(
            t0,
            UdpKey {
                dst: addr("192.0.2.54:53"),
                ..key(5000)
            },
        );
        assert!(other_dst.new && other_dst.id != a.id);
        let b = nat.outbound(t0, key(5001));
        assert!(b.new && b.id != a.id);
        assert_eq!(nat.len(), 3);
        assert_eq!(nat.inbound(t0, a.id), Some(key(5000)));
        assert_eq!(nat.remove(a.id), Some(key(5000)));
        assert_eq!(nat.inbound(t0, a.id), None, "gone");
        assert!(nat.outbound(t0, key(5000)).new, "a new association");
    }

    #[test]
    fn a_lookup_lives_the_short_timeout_and_a_stream_the_long_one() {
        let t0 = Instant::now();
        let mut nat = UdpNat::new(8, DEFAULT_UDP_IDLE);
        let lookup = nat.outbound(t0, key(5000)).id;
        nat.inbound(t0 + Duration::from_millis(20), lookup);
        let stream = nat.outbound(t0, key(5001)).id;
        nat.inbound(t0 + Duration::from_millis(20), stream);
        nat.outbound(t0 + Duration::from_secs(3), key(5001));
        let silent = nat.outbound(t0, key(5002)).id;
        // Never sooner than the short timeout.
        assert!(nat.expire(t0 + Duration::from_secs(29)).is_empty());
        let short = nat.expire(t0 + UDP_SHORT_IDLE + Duration::from_secs(1));
        assert_eq!(short, [lookup, silent]);
        assert_eq!(nat.key(stream), Some(key(5001)));
        let at = t0 + Duration::from_secs(3) + DEFAULT_UDP_IDLE;
        assert!(nat.expire(at - Duration::from_secs(1)).is_empty());
        assert_eq!(nat.expire(at), [stream]);
        assert!(nat.is_empty());
        assert_eq!(nat.poll_timeout(), None, "no deadline when empty");
    }

    #[test]
    fn a_full_table_drops_the_association_idle_longest() {
        let t0 = Instant::now();
        let mut nat = UdpNat::new(3, DEFAULT_UDP_IDLE);
        let ids: Vec<UdpId> = (0..3)
            .map(|i| {
                nat.outbound(t0 + Duration::from_secs(i), key(5000 + i as u16))
                    .id
            })
            .collect();
        // The first one is used again: the second is now idle longest.
        nat.inbound(t0 + Duration::from_secs(5), ids[0]);
        let new = nat.outbound(t0 + Duration::from_secs(6), key(6000));
        assert!(new.new);
        assert_eq!(new.evicted, Some((ids[1], key(5001))));
        assert_eq!(nat.len(), 3);
        assert_eq!(nat.key(ids[1]), None);
        assert_eq!(nat.key(ids[0]), Some(key(5000)));
    }
}
