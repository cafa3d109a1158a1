//! `mse-vpn doctor`: read-only checks of everything `up` needs, each with a verdict and, when
//! it is not fine, what to do. Nothing on the host or the jump host is changed (the
//! reverse-forwarding probe opens a listener on the jump host and cancels it at once).
//! [`dns`] holds the split-DNS checks, [`rootless`] those of `run` without root.

pub mod dns;
pub mod rootless;

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use mse_vpn_platform as platform;

use crate::session::NetworkConfig;
use crate::ssh::config::ConfigError;
use crate::ssh::{InvokingUser, OpenError, Session, SshError, SshOptions};

/// How a check came out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Fine.
    Ok,
    /// Works, with a caveat.
    Warn,
    /// `up` would fail, or misbehave.
    Fail,
    /// Not checked because an earlier check failed.
    Skipped,
}

/// One check's outcome.
#[derive(Clone, Debug)]
pub struct Check {
    /// What was checked.
    pub name: &'static str,
    /// The verdict.
    pub verdict: Verdict,
    /// What was found.
    pub detail: String,
    /// What to do about it.
    pub fix: Option<String>,
}

impl Check {
    pub(crate) fn new(name: &'static str, verdict: Verdict, detail: impl Into<String>) -> Check {
        Check {
            name,
            verdict,
            detail: detail.into(),
            fix: None,
        }
    }

    pub(crate) fn fix(mut self, fix: impl Into<String>) -> Check {
        self.fix = Some(fix.into());
        self
    }
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = match self.verdict {
            Verdict::Ok => "ok",
            Verdict::Warn => "WARN",
            Verdict::Fail => "FAIL",
            Verdict::Skipped => "skip",
        };
        write!(f, "{v:<5} {:<18} {}", self.name, self.detail)?;
        if let Some(fix) = &self.fix {
            write!(f, "\n{:24}fix: {fix}", "")?;
        }
        Ok(())
    }
}

/// Runs every check for an `up` that would route `network`, connecting as `ssh_options`
/// says for the invoking user (the ssh config and flags decide; an error there is a failed
/// check). `rootless`: for `run` without root instead ([`rootless`]'s checks in place of
/// privileges, the TUN, host routes and the host resolver).
pub async fn run(
    ssh_options: impl FnOnce(&InvokingUser) -> Result<SshOptions, ConfigError>,
    network: &NetworkConfig,
    state_dir: &Path,
    rootless: bool,
) -> Vec<Check> {
    let mut checks = Vec::new();
    if rootless {
        checks.extend(self::rootless::checks(network));
    } else {
        checks.push(privileges());
        checks.push(tun_support());
        #[cfg(windows)]
        checks.push(firewall_profile());
    }

    let user = match InvokingUser::detect() {
        Ok(u) => u,
        Err(e) => {
            checks.push(Check::new("login", Verdict::Fail, e.to_string()));
            return checks;
        }
    };
    // The ssh config decides the address (HostName, Port, ProxyJump): this machine only ever
    // connects to the first hop.
    let mut opts = match ssh_options(&user) {
        Ok(o) => o,
        Err(e) => {
            checks.push(
                Check::new("ssh config", Verdict::Fail, e.to_string())
                    .fix("correct or remove the entry named above"),
            );
            return checks;
        }
    };
    let (first_host, first_port) = opts.first_hop();
    let first_host = first_host.to_owned();
    let lookup = async {
        match opts.proxy_command {
            // Nothing is connected to directly: where the command goes is its own business.
            Some(_) => Ok(Vec::new().into_iter()),
            None => tokio::net::lookup_host((first_host.as_str(), first_port))
                .await
                .map(|a| a.collect::<Vec<_>>().into_iter()),
        }
    };
    let jump_addrs = match lookup.await {
        Ok(_) if opts.proxy_command.is_some() => {
            checks.push(Check::new(
                "jump host name",
                Verdict::Skipped,
                format!(
                    "reached through ProxyCommand `{}`",
                    opts.proxy_command.as_deref().unwrap_or_default()
                ),
            ));
            Vec::new()
        }
        Ok(addrs) => {
            let addrs: Vec<SocketAddr> = addrs.collect();
            let shown: Vec<String> = addrs.iter().map(|a| a.ip().to_string()).collect();
            checks.push(Check::new(
                "jump host name",
                Verdict::Ok,
                format!("{first_host} resolves to {}", shown.join(", ")),
            ));
            addrs
        }
        Err(e) => {
            checks.push(
                Check::new(
                    "jump host name",
                    Verdict::Fail,
                    format!("{first_host} does not resolve: {e}"),
                )
                .fix("check the name (or the ~/.ssh/config alias), or pass the jump host's IP address"),
            );
            Vec::new()
        }
    };

    if !rootless {
        checks.extend(routes(network, &jump_addrs, state_dir).await);
        if network.dns.enabled() {
            checks.extend(dns::host_checks(&network.dns, &network.tun).await);
        }
    }

    let reachable = if opts.proxy_command.is_some() {
        None
    } else if let Some(r) = reachability(&jump_addrs, &mut checks).await {
        Some(r)
    } else {
        for name in ["host key", "login", "forwarding", "reverse forwarding"] {
            checks.push(Check::new(
                name,
                Verdict::Skipped,
                "the jump host is not reachable",
            ));
        }
        return checks;
    };

    opts.accept_new_host_key = false;
    let session = match Session::connect(&opts).await {
        Ok(s) => {
            checks.push(Check::new(
                "host key",
                Verdict::Ok,
                format!("known in {}", opts.known_hosts.display()),
            ));
            checks.push(Check::new(
                "login",
                Verdict::Ok,
                format!("logged in as {}", opts.user),
            ));
            s
        }
        Err(e) => {
            let (key, login) = match &e {
                SshError::UnknownHostKey { .. } => (
                    Check::new("host key", Verdict::Fail, e.to_string()).fix(
                        "check the fingerprint with the jump host's admin, then run `up` once with --accept-new-host-key",
                    ),
                    Check::new("login", Verdict::Skipped, "the host key is not trusted"),
                ),
                SshError::HostKeyChanged { .. } | SshError::HostKeyRevoked { .. } => (
                    Check::new("host key", Verdict::Fail, e.to_string()),
                    Check::new("login", Verdict::Skipped, "the host key is not trusted"),
                ),
                _ => (
                    Check::new("host key", Verdict::Ok, "known"),
                    Check::new("login", Verdict::Fail, e.to_string()),
                ),
            };
            checks.push(key);
            checks.push(login);
            checks.push(Check::new("forwarding", Verdict::Skipped, "not logged in"));
            checks.push(Check::new(
                "reverse forwarding",
                Verdict::Skipped,
                "not logged in",
            ));
            return checks;
        }
    };

    checks.push(forwarding(&session).await);
    // Through ProxyJump hops (or a ProxyCommand), the jump host's own address is the one it
    // is known by from the far side (`reachable` is the first hop's).
    let jump_ip = match reachable {
        Some(r) if opts.hops.is_empty() => Some(r.ip()),
        _ => opts.jump.host.parse::<IpAddr>().ok(),
    };
    match jump_ip {
        Some(ip) => checks.push(reverse_forwarding(&session, ip).await),
        None => checks.push(Check::new(
            "reverse forwarding",
            Verdict::Skipped,
            "the jump host is named (not an address) behind ProxyJump hops",
        )),
    }
    if network.dns.enabled() {
        checks.push(dns::resolver_check(&network.dns, &session).await);
    }
    session.disconnect().await;
    checks
}

fn privileges() -> Check {
    let (ok, not, fix) = if cfg!(windows) {
        (
            "running elevated",
            "not elevated: `up` creates a TUN adapter and routes",
            "run it from an elevated prompt (Run as administrator; status works without it)",
        )
    } else {
        (
            "running as root",
            "not root: `up` creates a TUN device and routes",
            "run it with sudo (status works without root)",
        )
    };
    if mse_vpn_platform::process::is_privileged() {
        Check::new("privileges", Verdict::Ok, ok)
    } else {
        Check::new("privileges", Verdict::Fail, not).fix(fix)
    }
}

/// macOS: utun is part of the kernel.
#[cfg(target_os = "macos")]
fn tun_support() -> Check {
    Check::new("tun", Verdict::Ok, "utun is built into macOS")
}

/// Windows: the wintun driver ships as wintun.dll, loaded from beside the executable (or the
/// DLL search path).
#[cfg(windows)]
fn tun_support() -> Check {
    let beside = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("wintun.dll")));
    let system = std::env::var_os("SystemRoot").map(|r| {
        std::path::PathBuf::from(r)
            .join("System32")
            .join("wintun.dll")
    });
    match [beside, system].into_iter().flatten().find(|p| p.is_file()) {
        Some(dll) => Check::new("tun", Verdict::Ok, format!("{} found", dll.display())),
        None => Check::new("tun", Verdict::Fail, "wintun.dll not found")
            .fix("download wintun from wintun.net and put the wintun.dll for your CPU beside mse-vpn.exe"),
    }
}

/// Windows: the adapter is an "Unidentified network", which Windows puts on the Public
/// firewall profile; the Windows Firewall blocks unsolicited inbound connections there, and
/// those are exactly what `--expose` and `mse-vpn run` bring to local apps (callers in the VPC
/// connect through the tunnel to the app's port).
#[cfg(windows)]
fn firewall_profile() -> Check {
    Check::new(
        "firewall profile",
        Verdict::Warn,
        "Windows puts mse-vpn's adapter on the Public firewall profile (an unidentified network), where the Windows Firewall blocks inbound connections: calls from the VPC to an --expose'd (or `mse-vpn run`) app are dropped unless the app is allowed on Public networks",
    )
    .fix(
        "allow the app on Public networks when Windows asks (or `netsh advfirewall firewall add rule name=mse-vpn-expose dir=in action=allow protocol=TCP localport=PORT profile=public`), or, while a session is up, `Set-NetConnectionProfile -InterfaceAlias mse0 -NetworkCategory Private` (the adapter keeps its identity across runs); outbound use needs nothing",
    )
}

#[cfg(not(any(target_os = "macos", windows)))]
fn tun_support() -> Check {
    // Opening the clone device creates nothing until TUNSETIFF, which we do not issue.
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
    {
        Ok(_) => Check::new("tun", Verdict::Ok, "/dev/net/tun is usable"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Check::new("tun", Verdict::Fail, "/dev/net/tun does not exist").fix(
                "load the tun module (`modprobe tun`); in a container, pass --device /dev/net/tun",
            )
        }
        Err(e) => Check::new("tun", Verdict::Fail, format!("/dev/net/tun: {e}"))
            .fix("run as root, or grant CAP_NET_ADMIN"),
    }
}

async fn routes(network: &NetworkConfig, jump: &[SocketAddr], state_dir: &Path) -> Vec<Check> {
    let plan = match platform::RoutePlan::new(platform::PlanSpec {
        cidrs: network.cidrs.clone(),
        excludes: network.excludes.clone(),
        jump_addrs: jump.iter().map(|a| a.ip()).collect(),
        tun_name: network.tun.clone(),
        mtu: network.mtu,
    }) {
        Ok(p) => p,
        Err(e) => return vec![Check::new("routes", Verdict::Fail, e.to_string())],
    };
    let mut out = Vec::new();
    let shown: Vec<String> = plan.routes().iter().map(ToString::to_string).collect();
    match platform::preflight(&plan, state_dir).await {
        Ok(_) => {
            let mut detail = format!("{} would go to {}", shown.join(", "), plan.tun_name());
            if !plan.bypass().is_empty() {
                detail.push_str(&format!(
                    "; the jump host ({}) keeps its current path",
                    plan.bypass()
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
            out.push(Check::new("routes", Verdict::Ok, detail));
        }
        Err(e) => out.push(Check::new("routes", Verdict::Fail, e.to_string())),
    }
    match platform::overlapping_routes(&plan).await {
        Ok(existing) => {
            for r in existing.into_iter().filter(|r| !r.local) {
                let ours = &r.planned;
                let via = r.via.map(|v| format!(" via {v}")).unwrap_or_default();
                let (verdict, detail, fix) = if r.dst.prefix_len() > ours.prefix_len() {
                    (
                        Verdict::Warn,
                        format!(
                            "{}{} dev {} is more specific than {ours}: that traffic keeps going to {}, not through the tunnel",
                            r.dst, via, r.dev, r.dev
                        ),
                        "if that is another VPN for the same VPC, stop it or --exclude the range"
                            .to_owned(),
                    )
                } else if r.dst.prefix_len() == ours.prefix_len() {
                    (
                        Verdict::Fail,
                        format!(
                            "{}{} dev {} is the same network as {ours}",
                            r.dst, via, r.dev
                        ),
                        format!(
                            "remove that route (another VPN?), or route a narrower CIDR than {ours}"
                        ),
                    )
                } else {
                    (
                        Verdict::Warn,
                        format!(
                            "{}{} dev {} covers {ours}: mse-vpn's more specific route takes {ours} from it",
                            r.dst, via, r.dev
                        ),
                        "fine if that route is a broader VPN or gateway route; otherwise --exclude the overlap".to_owned(),
                    )
                };
                out.push(Check::new("route overlap", verdict, detail).fix(fix));
            }
        }
        Err(e) => out.push(Check::new("route overlap", Verdict::Warn, e.to_string())),
    }
    out
}

async fn reachability(addrs: &[SocketAddr], checks: &mut Vec<Check>) -> Option<SocketAddr> {
    if addrs.is_empty() {
        checks.push(Check::new(
            "jump host reach",
            Verdict::Skipped,
            "the name does not resolve",
        ));
        return None;
    }
    let mut errors = Vec::new();
    for addr in addrs {
        match tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
            .await
        {
            Ok(Ok(_)) => {
                checks.push(Check::new(
                    "jump host reach",
                    Verdict::Ok,
                    format!("TCP {addr} answers"),
                ));
                return Some(*addr);
            }
            Ok(Err(e)) => errors.push(format!("{addr}: {e}")),
            Err(_) => errors.push(format!("{addr}: no answer within 5 s")),
        }
    }
    checks.push(
        Check::new("jump host reach", Verdict::Fail, errors.join("; "))
            .fix("check that sshd runs there and that a firewall or security group lets this machine reach its port"),
    );
    None
}

async fn forwarding(session: &Session) -> Check {
    // Ask the jump host to connect to its own loopback: any answer but "prohibited" shows it
    // forwards TCP.
    let dst: SocketAddr = ([127, 0, 0, 1], 22).into();
    let origin: SocketAddr = ([127, 0, 0, 1], 0).into();
    match session
        .open_direct_tcpip(dst, origin, Duration::from_secs(5))
        .await
    {
        Ok(ch) => {
            let _ = ch.close().await;
            Check::new("forwarding", Verdict::Ok, "direct-tcpip channels are allowed")
        }
        Err(OpenError::ConnectFailed) => Check::new(
            "forwarding",
            Verdict::Ok,
            "direct-tcpip channels are allowed",
        ),
        Err(OpenError::Prohibited) => Check::new(
            "forwarding",
            Verdict::Fail,
            "the jump host refuses TCP forwarding (direct-tcpip: administratively prohibited)",
        )
        .fix("set `AllowTcpForwarding yes` (or `local`) in the jump host's sshd_config (and no `PermitOpen none` for this user), then reload sshd"),
        Err(e) => Check::new("forwarding", Verdict::Warn, format!("inconclusive: {e}")),
    }
}

async fn reverse_forwarding(session: &Session, jump_ip: IpAddr) -> Check {
    let Some(port) = session.request_forward("0.0.0.0", 0).await else {
        return Check::new(
            "reverse forwarding",
            Verdict::Warn,
            "the jump host refuses tcpip-forward: cloud-to-local calls (--expose) will not work",
        )
        .fix("set `AllowTcpForwarding yes` (or `remote`) in the jump host's sshd_config");
    };
    // With `GatewayPorts no` sshd binds loopback only, whatever we asked: try the port on the
    // jump host's own non-loopback address.
    let dst = SocketAddr::new(jump_ip, port);
    let origin: SocketAddr = ([127, 0, 0, 1], 0).into();
    let check = match session
        .open_direct_tcpip(dst, origin, Duration::from_secs(5))
        .await
    {
        Ok(ch) => {
            let _ = ch.close().await;
            Check::new(
                "reverse forwarding",
                Verdict::Ok,
                format!("listeners on non-loopback addresses work (probe port {port})"),
            )
        }
        Err(OpenError::ConnectFailed) => Check::new(
            "reverse forwarding",
            Verdict::Warn,
            format!("the jump host binds forwarded ports to loopback only (probe port {port} not reachable on {jump_ip}): VPC callers cannot reach --expose ports"),
        )
        .fix("set `GatewayPorts clientspecified` in the jump host's sshd_config"),
        Err(e) => Check::new(
            "reverse forwarding",
            Verdict::Warn,
            format!("tcpip-forward is allowed; binding check inconclusive: {e}"),
        ),
    };
    session.cancel_forward("0.0.0.0", port).await;
    check
}
