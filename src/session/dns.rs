//! Split DNS in an `up` session: which VPC resolvers to use (`--dns`, or discovered on the
//! jump host), and starting the responder: bind it on the TUN address, then point the host
//! resolver at it through the platform crate (journaled). Called by [`super::Session::start`]
//! between the host changes and the "is up" line; [`summary`] is the one line of the
//! [`super::UpReport`] about DNS. The responder itself is [`crate::dns`]'s. A session in an
//! app's own namespace binds it on this host's loopback instead and changes no resolver
//! ([`start_unbound`]): the app's resolv.conf names an address in its namespace.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;

use mse_vpn_platform::{self as platform, Host, RoutePlan};

use crate::dns::{
    DnsCounters, DnsError, DnsSettings, DnsStatus, Responder, ResponderConfig, Split, Tunnel,
};
use crate::pool::Pool;
use crate::ssh::Session;

/// The VPC resolvers for split DNS: `--dns`, or the jump host's own (read over SSH from one
/// of `sessions`). Empty without `--dns-domain`.
pub async fn resolvers(
    dns: &DnsSettings,
    sessions: &[Option<Session>],
) -> Result<Vec<IpAddr>, DnsError> {
    if !dns.enabled() || !dns.servers.is_empty() {
        return Ok(dns.servers.clone());
    }
    let session = sessions
        .iter()
        .flatten()
        .next()
        .ok_or(DnsError::NoResolver {
            why: "no SSH connection to read it with",
        })?;
    let found = crate::dns::discover(session).await?;
    Ok(vec![found])
}

/// Binds the responder where the host resolver reaches it ([`platform::dns::listen_addr`]:
/// the TUN's IPv4 address, port 53; on macOS 127.0.0.1 on a free port, because XNU sends
/// packets for a utun's own address into the utun), then points the host resolver at it for
/// the split zones only. Returns the responder (not yet running) and the `dns` object
/// for `status`. On error, what was journaled is undone by the caller's `host.restore()`.
pub async fn start(
    dns: &DnsSettings,
    plan: &RoutePlan,
    pool: &Arc<Pool>,
    host: &mut Host,
    state_dir: &Path,
    servers: &[IpAddr],
) -> Result<(Responder, DnsStatus), DnsError> {
    let listen = platform::dns::listen_addr(plan.tun_v4());
    let (responder, mut shown) = bind(dns, plan, pool, servers, listen).await?;
    let dns_plan = platform::dns::DnsPlan {
        server: responder_addr(&responder, listen)?,
        zones: shown.domains.clone(),
    };
    let backend = host
        .apply_dns(plan.tun_name(), &dns_plan, state_dir)
        .await?;
    shown.mode = backend.name().to_owned();
    Ok((responder, shown))
}

/// The responder of a session in an app's own namespace (`mse-vpn run` without root): bound
/// on this host's loopback (a free port), the host resolver left alone. The app's
/// resolv.conf names an address in its namespace that the driver carries to it.
pub async fn start_unbound(
    dns: &DnsSettings,
    plan: &RoutePlan,
    pool: &Arc<Pool>,
    servers: &[IpAddr],
) -> Result<(Responder, DnsStatus), DnsError> {
    let listen = SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, 0));
    let (responder, mut shown) = bind(dns, plan, pool, servers, listen).await?;
    shown.mode = "the app's namespace".to_owned();
    Ok((responder, shown))
}

/// The responder's address (the port the OS chose where `listen` asked for any).
fn responder_addr(responder: &Responder, listen: SocketAddr) -> Result<SocketAddr, DnsError> {
    responder.local_addr().map_err(|source| DnsError::Bind {
        addr: listen,
        source,
    })
}

/// Binds the responder on `listen`: the split zones through the tunnel to `servers`, every
/// other name to the host's own nameservers. Returns it with its `status` object (no mode).
async fn bind(
    dns: &DnsSettings,
    plan: &RoutePlan,
    pool: &Arc<Pool>,
    servers: &[IpAddr],
    listen: SocketAddr,
) -> Result<(Responder, DnsStatus), DnsError> {
    // Without split domains (an app's namespace that only needs a way to this host's
    // resolvers) every name goes upstream, reverse lookups of VPC addresses too.
    let reverse = if dns.domains.is_empty() {
        &[][..]
    } else {
        plan.routes()
    };
    let split = Split::new(dns.domains.clone(), reverse);
    // The original nameservers, read before the host resolver is changed (glibc's default,
    // 127.0.0.1, when the file names none). Under resolved this is its stub, which never
    // sends names outside the routing domains back to us.
    let text = std::fs::read_to_string(platform::dns::RESOLV_CONF).unwrap_or_default();
    let mut upstream: Vec<SocketAddr> = platform::dns::nameservers(&text)
        .into_iter()
        .map(|a| SocketAddr::new(a, 53))
        .filter(|a| *a != listen)
        .collect();
    if upstream.is_empty() {
        upstream.push(([127, 0, 0, 1], 53).into());
    }
    // The originator sshd is told about (what its logs show): the session's own address.
    let tunnel = Tunnel::spawn(
        pool.clone(),
        servers.iter().map(|s| (*s, 53).into()).collect(),
        SocketAddr::new(plan.tun_v4().into(), 53),
        crate::dns::TUNNEL_CHANNELS,
        crate::dns::QUERY_TIMEOUT,
    );
    let zones: Vec<String> = split.zones().map(ToString::to_string).collect();
    let responder = Responder::bind(
        ResponderConfig {
            listen,
            split,
            upstream: upstream.clone(),
        },
        tunnel,
        Arc::new(DnsCounters::default()),
    )
    .await?;
    let listen = responder_addr(&responder, listen)?;
    let shown = DnsStatus {
        mode: String::new(),
        listen: listen.to_string(),
        servers: servers.iter().map(ToString::to_string).collect(),
        domains: zones,
        upstream: upstream.iter().map(ToString::to_string).collect(),
        via_tunnel: 0,
        via_upstream: 0,
        servfail: 0,
        refused: 0,
        truncated: 0,
    };
    Ok((responder, shown))
}

/// The line `up` prints about split DNS: which names go where, and how the host resolver was
/// pointed at the responder.
pub fn summary(dns: &DnsSettings, shown: &DnsStatus) -> String {
    let domains: Vec<String> = dns.domains.iter().map(ToString::to_string).collect();
    format!(
        "split DNS ({}): {} → {}{} through the tunnel; other names as before",
        shown.mode,
        domains.join(", "),
        shown.servers.join(", "),
        if dns.servers.is_empty() {
            " (the jump host's resolver)"
        } else {
            ""
        }
    )
}
