//! macOS: the utun device's MTU and addresses through `ifconfig`, routes and the jump host's
//! bypass route through `route`, the host's routes read from `netstat -rn`, and split DNS
//! through one `/etc/resolver/DOMAIN` file per zone (macOS's own per-domain resolver
//! mechanism: mDNSResponder watches the directory). Every change is journaled before it is
//! made and undone in reverse by `down` or, after a crash, by the next start or `down --force`
//! (the shared driver in `host.rs`).
//!
//! The commands go through a [`Runner`], so the exact command lines this backend would run are
//! unit-tested on any OS against a fake host that answers each command as Apple's network_cmds
//! do (exit status and output, with the source named at each answer); the resolver files are
//! written under a directory that tests point at a temporary one. Nothing here was run on a
//! macOS kernel in CI (see the README, "Operating systems").
//!
//! What the tools say, and how it is read (network_cmds `route.tproj/route.c`,
//! `ifconfig.tproj/ifconfig.c`):
//! - `route add|delete` exits 0 even when the kernel refuses: it prints `add net D: gateway G:
//!   File exists` (or `: not in table`) on stdout. The line is read: a refused add is a
//!   failure (never journaled as made), a delete of a route that is not there is "already
//!   gone".
//! - A utun device dies with the process that opened it, and the kernel removes its addresses
//!   and routes with it. `ifconfig utunN` then exits 1 ("interface utunN does not exist"), and
//!   so do the undo commands that name it (`route ... -interface utunN`: exit 68, "bad address:
//!   utunN"): undoing an address or route of an interface that no longer exists is "already
//!   gone", checked with `ifconfig DEV` first.
//!
//! Replies to cloud callers need no policy rules here: callers are inside the routed networks,
//! whose routes already lead into the utun device.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use ipnet::IpNet;

use crate::command::{Runner, System, argv};
use crate::dns::{DnsBackend, DnsPlan, MARKER};
use crate::error::PlatformError;
use crate::host::{Backend, PathInfo, RouteEntry};
use crate::journal::Change;
use crate::plan::RoutePlan;

/// Where macOS looks for per-domain resolver files.
pub const RESOLVER_DIR: &str = "/etc/resolver";

/// The macOS backend on the real host.
pub fn system() -> Macos<System> {
    Macos::new(System, RESOLVER_DIR)
}

/// The macOS backend over a command runner.
#[derive(Debug)]
pub struct Macos<R> {
    runner: R,
    resolver_dir: PathBuf,
}

impl<R: Runner> Macos<R> {
    /// A backend running its commands with `runner` and writing resolver files in
    /// `resolver_dir`.
    pub fn new(runner: R, resolver_dir: impl Into<PathBuf>) -> Self {
        Macos {
            runner,
            resolver_dir: resolver_dir.into(),
        }
    }

    /// The runner (tests read what it recorded).
    #[cfg(test)]
    pub fn runner(&self) -> &R {
        &self.runner
    }

    async fn run(&mut self, argv: Vec<String>) -> Result<String, PlatformError> {
        self.runner.run(&argv).await
    }

    /// Runs a `route add|delete` and reads its answer: `Ok(true)` done, `Ok(false)` a delete
    /// of a route that is not there; a refusal is an error.
    async fn route(&mut self, cmd: Vec<String>) -> Result<bool, PlatformError> {
        let out = self.run(cmd.clone()).await?;
        match route_outcome(&cmd, &out) {
            Ok(()) => Ok(true),
            Err(reason) if cmd[3] == "delete" && reason == NOT_IN_TABLE => Ok(false),
            Err(reason) => Err(PlatformError::Refused {
                cmd: cmd.join(" "),
                reason,
            }),
        }
    }

    /// True if the interface `dev` exists: `ifconfig DEV` exits 1 with "interface DEV does
    /// not exist" when it does not (ifconfig.c, `if_nametoindex` failing).
    async fn interface_exists(&mut self, dev: &str) -> Result<bool, PlatformError> {
        match self.run(argv(&["ifconfig", dev])).await {
            Ok(_) => Ok(true),
            Err(PlatformError::Command { stderr, .. }) if stderr.contains("does not exist") => {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }
}

fn family(net: &IpNet) -> &'static str {
    match net {
        IpNet::V4(_) => "-inet",
        IpNet::V6(_) => "-inet6",
    }
}

/// The gateway word of a bypass route: the gateway address, with its scope (`fe80::1%en0`)
/// when it is link-local (an IPv6 link-local address means nothing without its interface;
/// `route` reads the scope through getaddrinfo), or `-interface DEV` for an on-link host.
fn bypass_gateway(via: Option<IpAddr>, dev: &str) -> Vec<String> {
    match via {
        Some(IpAddr::V6(gw)) if gw.is_unicast_link_local() => vec![format!("{gw}%{dev}")],
        Some(gw) => vec![gw.to_string()],
        None => argv(&["-interface", dev]),
    }
}

/// The command that makes `change` (`None` for changes that are not commands).
pub fn make_command(change: &Change, mtu: u32) -> Option<Vec<String>> {
    Some(match change {
        Change::Link { name } => argv(&["ifconfig", name, "mtu", &mtu.to_string(), "up"]),
        Change::Addr {
            addr: IpNet::V4(a),
            dev,
        } => {
            // utun is point to point: the address is its own peer.
            let a = a.addr().to_string();
            argv(&[
                "ifconfig",
                dev,
                "inet",
                &a,
                &a,
                "netmask",
                "255.255.255.255",
                "alias",
            ])
        }
        Change::Addr {
            addr: IpNet::V6(a),
            dev,
        } => argv(&[
            "ifconfig",
            dev,
            "inet6",
            &a.addr().to_string(),
            "prefixlen",
            "128",
            "alias",
        ]),
        Change::Route { dst, dev } => argv(&[
            "route",
            "-q",
            "-n",
            "add",
            family(dst),
            &dst.to_string(),
            "-interface",
            dev,
        ]),
        Change::Bypass { dst, via, dev } => {
            let mut v = argv(&["route", "-q", "-n", "add", family(dst), "-host"]);
            v.push(dst.addr().to_string());
            v.extend(bypass_gateway(*via, dev));
            v
        }
        _ => return None,
    })
}

/// The command that undoes `change` (`None` for changes that are not undone by a command).
pub fn undo_command(change: &Change) -> Option<Vec<String>> {
    Some(match change {
        Change::Addr {
            addr: IpNet::V4(a),
            dev,
        } => argv(&["ifconfig", dev, "inet", &a.addr().to_string(), "-alias"]),
        Change::Addr {
            addr: IpNet::V6(a),
            dev,
        } => argv(&["ifconfig", dev, "inet6", &a.addr().to_string(), "-alias"]),
        Change::Route { dst, dev } => argv(&[
            "route",
            "-q",
            "-n",
            "delete",
            family(dst),
            &dst.to_string(),
            "-interface",
            dev,
        ]),
        Change::Bypass { dst, via, dev } => {
            let mut v = argv(&["route", "-q", "-n", "delete", family(dst), "-host"]);
            v.push(dst.addr().to_string());
            v.extend(bypass_gateway(*via, dev));
            v
        }
        _ => return None,
    })
}

/// What the kernel answered to a `route add|delete` command (`cmd`, whose last word is the
/// gateway), from the line route.c prints on stdout whatever happened: `add net 10.0.0.0:
/// gateway utun9` when done, `...: gateway utun9: File exists` when refused (`route_strerror`:
/// EEXIST "File exists", ESRCH "not in table", ENOBUFS "routing table overflow", else
/// strerror). route.c exits 0 either way. `Err` carries the refusal.
pub fn route_outcome(cmd: &[String], stdout: &str) -> Result<(), String> {
    let gateway = format!(": gateway {}", cmd.last().map(String::as_str).unwrap_or(""));
    let verb = cmd.get(3).map(String::as_str).unwrap_or("");
    let line = stdout
        .lines()
        .find(|l| l.starts_with(verb) && l.contains(&gateway))
        .ok_or_else(|| format!("unexpected output {:?}", stdout.trim()))?;
    let rest = &line[line.find(&gateway).unwrap_or(0) + gateway.len()..];
    match rest.strip_prefix(": ") {
        None if rest.trim().is_empty() => Ok(()),
        Some(reason) => Err(reason.trim().to_owned()),
        None => Err(format!("unexpected output {:?}", line.trim())),
    }
}

/// route.c's answer when a route to delete is not there (ESRCH).
const NOT_IN_TABLE: &str = "not in table";

/// The gateway and interface from `route -n get ADDR` output.
pub fn parse_route_get(text: &str) -> Option<PathInfo> {
    let field = |name: &str| {
        text.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == name).then(|| v.trim().to_owned())
        })
    };
    let dev = field("interface")?;
    // A link-local gateway is printed with its scope (`fe80::1%en0`: getnameinfo with
    // NI_WITHSCOPEID in route.c's `routename`); the scope is the interface, kept in `dev`.
    let via = field("gateway").and_then(|g| g.split('%').next()?.parse().ok());
    Some(PathInfo { via, dev })
}

/// A `netstat -rn` destination: `10/8`, `192.168.1` (a /24: one octet per 8 bits), `10.0.3.7`
/// (a host), `fe80::%utun0/64`, `::1`. `None` for `default` and anything unreadable.
pub fn parse_destination(dst: &str) -> Option<IpNet> {
    if dst == "default" {
        return None;
    }
    let (addr, len) = match dst.split_once('/') {
        Some((a, l)) => (a, Some(l.parse::<u8>().ok()?)),
        None => (dst, None),
    };
    let addr = addr.split('%').next()?;
    if addr.contains(':') {
        let a: std::net::Ipv6Addr = addr.parse().ok()?;
        return IpNet::new(a.into(), len.unwrap_or(128))
            .ok()
            .map(|n| n.trunc());
    }
    let octets: Vec<u8> = addr
        .split('.')
        .map(|o| o.parse().ok())
        .collect::<Option<_>>()?;
    if octets.is_empty() || octets.len() > 4 {
        return None;
    }
    let mut full = [0u8; 4];
    full[..octets.len()].copy_from_slice(&octets);
    let len = len.unwrap_or(8 * octets.len() as u8);
    IpNet::new(IpAddr::from(full), len).ok().map(|n| n.trunc())
}

/// The routes of `netstat -rn -f inet|inet6` output. Entries cloned from another route (flag
/// `W`: ARP and neighbour entries) are skipped; a route without a gateway (no flag `G`) is a
/// network reached directly.
pub fn parse_netstat(text: &str) -> Vec<RouteEntry> {
    let mut out = Vec::new();
    for line in text.lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        let [dst, gateway, flags, netif, ..] = w.as_slice() else {
            continue;
        };
        if flags.contains('W') {
            continue;
        }
        let Some(dst) = parse_destination(dst) else {
            continue;
        };
        let gateway = gateway.split('%').next().unwrap_or_default();
        out.push(RouteEntry {
            dst,
            dev: (*netif).to_owned(),
            via: gateway.parse().ok().filter(|_| flags.contains('G')),
            local: !flags.contains('G'),
        });
    }
    out
}

/// How the resolver files of the session on `tun` begin.
fn resolver_file_marker(tun: &str) -> String {
    format!("{MARKER} (session on {tun})")
}

/// The content of the resolver file for one zone (resolver(5): `nameserver` and `port`).
pub fn resolver_file_content(tun: &str, server: SocketAddr) -> String {
    format!(
        "{}: `mse-vpn down` (or `mse-vpn down --force` after a crash) removes this file.\nnameserver {}\nport {}\n",
        resolver_file_marker(tun),
        server.ip(),
        server.port()
    )
}

/// The resolver file for `zone` in `dir`.
pub fn resolver_file(dir: &Path, zone: &str) -> PathBuf {
    dir.join(zone.trim_end_matches('.'))
}

impl<R: Runner> Backend for Macos<R> {
    fn pid_alive(&self, pid: i32) -> bool {
        crate::process::pid_alive(pid)
    }

    async fn path_to(&mut self, addr: IpAddr) -> Result<PathInfo, PlatformError> {
        let out = self
            .run(argv(&["route", "-n", "get", &addr.to_string()]))
            .await
            .map_err(|_| PlatformError::NoPathTo { addr })?;
        parse_route_get(&out).ok_or(PlatformError::NoPathTo { addr })
    }

    async fn routes(&mut self, _plan: &RoutePlan) -> Result<Vec<RouteEntry>, PlatformError> {
        let mut out = Vec::new();
        for fam in ["inet", "inet6"] {
            let text = self.run(argv(&["netstat", "-rn", "-f", fam])).await?;
            out.extend(parse_netstat(&text));
        }
        Ok(out)
    }

    async fn make(&mut self, change: &Change, plan: &RoutePlan) -> Result<(), PlatformError> {
        match make_command(change, plan.mtu()) {
            Some(cmd) if cmd[0] == "route" => self.route(cmd).await.map(drop),
            Some(cmd) => self.run(cmd).await.map(drop),
            None => Ok(()),
        }
    }

    async fn dns_backend(&mut self) -> DnsBackend {
        DnsBackend::ResolverDir
    }

    fn dns_changes(
        &self,
        _dns: DnsBackend,
        _tun: &str,
        plan: &DnsPlan,
        _state_dir: &Path,
    ) -> Result<Vec<Change>, PlatformError> {
        Ok(plan
            .zones
            .iter()
            .map(|z| Change::ResolverFile {
                file: resolver_file(&self.resolver_dir, z),
            })
            .collect())
    }

    async fn make_dns(
        &mut self,
        change: &Change,
        tun: &str,
        plan: &DnsPlan,
    ) -> Result<(), PlatformError> {
        let Change::ResolverFile { file } = change else {
            return Ok(());
        };
        let dns_err = |source| PlatformError::Dns {
            path: file.clone(),
            source,
        };
        // Another tool's file for the same domain (another VPN's split DNS), or another live
        // session's (a dead one's was repaired before this session started), is not ours to
        // replace: say so instead. On macOS each session's responder has its own port, so
        // nothing else would stop a second session from taking the first one's domain.
        if let Ok(existing) = std::fs::read_to_string(file)
            && !existing.starts_with(&resolver_file_marker(tun))
        {
            return Err(PlatformError::ResolverTaken { path: file.clone() });
        }
        std::fs::create_dir_all(&self.resolver_dir).map_err(dns_err)?;
        std::fs::write(file, resolver_file_content(tun, plan.server)).map_err(dns_err)
    }

    async fn undo(&mut self, change: &Change) -> Result<bool, PlatformError> {
        if let Change::ResolverFile { file } = change {
            return Ok(match std::fs::read_to_string(file) {
                Ok(text) if text.starts_with(MARKER) => std::fs::remove_file(file).is_ok(),
                Ok(_) => {
                    tracing::warn!(file = %file.display(), "resolver file was rewritten by another tool: leaving it");
                    false
                }
                Err(_) => false,
            });
        }
        // The utun device goes away with its file descriptor (a crashed session's with its
        // process), and the kernel removes its addresses and routes with it: then there is
        // nothing left to undo, and the undo commands, which name the device, would fail.
        if let Change::Addr { dev, .. } | Change::Route { dev, .. } = change
            && !self.interface_exists(dev).await?
        {
            return Ok(false);
        }
        match undo_command(change) {
            Some(cmd) if cmd[0] == "route" => self.route(cmd).await,
            Some(cmd) => match self.run(cmd).await {
                Ok(_) => Ok(true),
                // The address is not on the interface (any more): ifconfig.c's SIOCDIFADDR
                // fails with EADDRNOTAVAIL, "Can't assign requested address".
                Err(PlatformError::Command { stderr, .. })
                    if stderr.contains("Can't assign requested address") =>
                {
                    Ok(false)
                }
                Err(e) => Err(e),
            },
            None => Ok(false),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;
    use crate::host;
    use crate::host::testing::{killed, lines};

    /// How a route leaves: through a gateway (as `route` prints it: `192.168.1.1`,
    /// `fe80::1%en0`) on an interface, or straight out of an interface.
    #[derive(Clone, Debug, PartialEq, Eq)]
    enum Via {
        Gateway(String, String),
        Link(String),
    }

    impl Via {
        fn dev(&self) -> &str {
            match self {
                Via::Gateway(_, dev) | Via::Link(dev) => dev,
            }
        }
    }

    /// A macOS host as its tools show it: interfaces, addresses and a routing table. Every
    /// command line is recorded and answered as Apple's network_cmds answer it (exit status,
    /// stdout, stderr; the source is named at each answer). `netstat` prints a fixed table.
    struct FakeMac {
        ran: Vec<String>,
        ifaces: BTreeSet<String>,
        addrs: BTreeSet<(String, IpAddr)>,
        routes: BTreeMap<IpNet, Via>,
        /// Commands starting with `.0` exit non-zero with stderr `.1`.
        fail: Option<(&'static str, &'static str)>,
    }

    impl Default for FakeMac {
        fn default() -> Self {
            let mut routes = BTreeMap::new();
            routes.insert(
                net("0.0.0.0/0"),
                Via::Gateway("192.168.1.1".into(), "en0".into()),
            );
            routes.insert(net("127.0.0.0/8"), Via::Link("lo0".into()));
            routes.insert(net("192.168.1.0/24"), Via::Link("en0".into()));
            routes.insert(
                net("::/0"),
                Via::Gateway("fe80::1%en0".into(), "en0".into()),
            );
            routes.insert(net("::1/128"), Via::Link("lo0".into()));
            FakeMac {
                ran: Vec::new(),
                // utun9: the TUN the caller opened.
                ifaces: ["lo0", "en0", "utun9"].map(String::from).into(),
                addrs: BTreeSet::new(),
                routes,
                fail: None,
            }
        }
    }

    /// What `command::run` makes of a command that exited non-zero.
    fn exited(cmd: &str, stderr: &str) -> PlatformError {
        PlatformError::Command {
            cmd: cmd.to_owned(),
            stderr: stderr.to_owned(),
        }
    }

    impl FakeMac {
        /// The process that opened the utun died: the device goes with its descriptor, and
        /// XNU's if_detach purges its addresses and every route through it.
        fn close_utun(&mut self, dev: &str) {
            self.ifaces.remove(dev);
            self.addrs.retain(|(d, _)| d != dev);
            self.routes.retain(|_, via| via.dev() != dev);
        }

        fn lookup(&self, addr: IpAddr) -> Option<(&IpNet, &Via)> {
            self.routes
                .iter()
                .filter(|(dst, _)| dst.contains(&addr))
                .max_by_key(|(dst, _)| dst.prefix_len())
        }

        /// `route -n get ADDR` (route.c `print_getmsg`): the longest match; a `gateway:` line
        /// only for a route through a gateway (RTF_GATEWAY), printed with its scope. No route:
        /// "not in table" on stderr, nothing on stdout, exit 0.
        fn route_get(&self, addr: IpAddr) -> String {
            let Some((dst, via)) = self.lookup(addr) else {
                return String::new();
            };
            let dst = match dst.prefix_len() {
                0 => "default".to_owned(),
                _ => dst.addr().to_string(),
            };
            let mut out = format!("   route to: {addr}\ndestination: {dst}\n");
            if let Via::Gateway(gw, _) = via {
                out.push_str(&format!("    gateway: {gw}\n"));
            }
            out.push_str(&format!(
                "  interface: {}\n      flags: <UP,DONE,STATIC>\n",
                via.dev()
            ));
            out
        }

        fn ifconfig(&mut self, line: &str, args: &[String]) -> Result<String, PlatformError> {
            let dev = &args[1];
            // ifconfig.c main: if_nametoindex fails → errx(1, "interface %s does not exist").
            if !self.ifaces.contains(dev) {
                let msg = format!("ifconfig: interface {dev} does not exist");
                return Err(exited(line, &msg));
            }
            let words: Vec<&str> = args[2..].iter().map(String::as_str).collect();
            match words.as_slice() {
                [] => Ok(format!(
                    "{dev}: flags=8051<UP,POINTOPOINT,RUNNING,MULTICAST> mtu 16000\n"
                )),
                ["mtu", _, "up"] => Ok(String::new()),
                ["inet", a, peer, "netmask", _, "alias"] => {
                    self.addrs.insert((dev.clone(), a.parse().unwrap()));
                    // in_ifinit: a point-to-point interface gets a host route to its
                    // *destination* through itself, and no loopback route for its own address.
                    let peer: IpAddr = peer.parse().unwrap();
                    self.routes.insert(peer.into(), Via::Link(dev.clone()));
                    Ok(String::new())
                }
                ["inet6", a, "prefixlen", _, "alias"] => {
                    self.addrs.insert((dev.clone(), a.parse().unwrap()));
                    Ok(String::new())
                }
                [_, a, "-alias"] => {
                    let a: IpAddr = a.parse().unwrap();
                    if self.addrs.remove(&(dev.clone(), a)) {
                        self.routes.remove(&a.into());
                        return Ok(String::new());
                    }
                    // SIOCDIFADDR for an address the interface does not have: EADDRNOTAVAIL,
                    // reported by Perror → err(1, "ioctl (SIOCDIFADDR)").
                    Err(exited(
                        line,
                        "ifconfig: ioctl (SIOCDIFADDR): Can't assign requested address",
                    ))
                }
                other => panic!("FakeMac: unexpected ifconfig arguments {other:?}"),
            }
        }

        /// `route -q -n add|delete -inet|-inet6 [-host] DST (GW | -interface DEV)`.
        fn route(&mut self, line: &str, args: &[String]) -> Result<String, PlatformError> {
            let verb = args[3].as_str();
            let inet6 = args[4] == "-inet6";
            let host = args[5] == "-host";
            let dst_word = &args[if host { 6 } else { 5 }];
            let rest = &args[if host { 7 } else { 6 }..];
            let (gw_word, via) = match rest {
                [flag, dev] if flag == "-interface" => {
                    // getaddr(RTA_GATEWAY) with -interface looks DEV up among the interfaces
                    // (getifaddrs, AF_LINK); a name that is none falls through to the address
                    // parsers: inet → errx(EX_NOHOST, "bad address: DEV"), exit 68; inet6 →
                    // getaddrinfo fails: "DEV: nodename nor servname provided, or not
                    // known", exit(1).
                    if !self.ifaces.contains(dev) {
                        let msg = match inet6 {
                            true => format!("{dev}: nodename nor servname provided, or not known"),
                            false => format!("route: bad address: {dev}"),
                        };
                        return Err(exited(line, &msg));
                    }
                    (dev.clone(), Via::Link(dev.clone()))
                }
                [gw] => {
                    // A scoped gateway names its interface; else the route to it does.
                    let dev = match gw.split_once('%') {
                        Some((_, dev)) => dev.to_owned(),
                        None => {
                            let (_, via) = self.lookup(gw.parse().unwrap()).unwrap();
                            via.dev().to_owned()
                        }
                    };
                    (gw.clone(), Via::Gateway(gw.clone(), dev))
                }
                other => panic!("FakeMac: unexpected route gateway {other:?}"),
            };
            let dst: IpNet = match host {
                true => dst_word.parse::<IpAddr>().unwrap().into(),
                false => dst_word.parse().unwrap(),
            };
            // newroute prints `dest` as given, except that getaddr cut an IPv4 prefix at its
            // '/' in place (and did not put it back).
            let shown = match inet6 {
                true => dst_word.as_str(),
                false => dst_word.split('/').next().unwrap(),
            };
            let kind = if host { "host" } else { "net" };
            let mut out = format!("{verb} {kind} {shown}: gateway {gw_word}");
            // rtmsg's write() to the routing socket fails with EEXIST or ESRCH (the kernel
            // matches a delete by destination and mask, not by gateway); newroute appends
            // route_strerror's name for it and main exits 0 all the same.
            let refused = match verb {
                "add" if self.routes.contains_key(&dst) => Some("File exists"),
                "add" => {
                    self.routes.insert(dst, via);
                    None
                }
                "delete" if self.routes.remove(&dst).is_some() => None,
                "delete" => Some("not in table"),
                other => panic!("FakeMac: unexpected route verb {other}"),
            };
            if let Some(reason) = refused {
                out.push_str(&format!(": {reason}"));
            }
            Ok(out + "\n")
        }
    }

    const NETSTAT4: &str = "Routing tables\n\nInternet:\nDestination        Gateway            Flags        Netif Expire\ndefault            192.168.1.1        UGScg          en0\n10.20/16           192.168.1.7        UGSc           en0\n127                127.0.0.1          UCS            lo0\n192.168.1          link#6             UCS            en0      !\n192.168.1.23       a4:83:e7:1:2:3     UHLWIi         en0   1177\n";
    const NETSTAT6: &str = "Internet6:\nDestination        Gateway            Flags        Netif Expire\n::1                ::1                UHL            lo0\nfe80::%lo0/64      fe80::1%lo0        UcI            lo0\n";

    impl Runner for FakeMac {
        async fn run(&mut self, argv: &[String]) -> Result<String, PlatformError> {
            let line = argv.join(" ");
            self.ran.push(line.clone());
            if let Some((prefix, stderr)) = self.fail
                && line.starts_with(prefix)
            {
                return Err(exited(&line, stderr));
            }
            match (argv[0].as_str(), argv[1].as_str()) {
                ("ifconfig", _) => self.ifconfig(&line, argv),
                ("route", "-n") => Ok(self.route_get(argv[3].parse().unwrap())),
                ("route", _) => self.route(&line, argv),
                ("netstat", _) if argv[3] == "inet" => Ok(NETSTAT4.to_owned()),
                ("netstat", _) => Ok(NETSTAT6.to_owned()),
                _ => panic!("FakeMac: unexpected command {line}"),
            }
        }
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn plan(cidrs: &[&str], jump: &[&str]) -> RoutePlan {
        host::testing::plan("utun9", 16_000, cidrs, jump)
    }

    fn tmp(name: &str) -> host::testing::Scratch {
        host::testing::scratch("macos", name)
    }

    #[tokio::test]
    async fn apply_runs_the_exact_commands_journals_them_and_restore_undoes_them() {
        let dir = tmp("apply");
        let mut mac = Macos::new(FakeMac::default(), dir.join("resolver"));
        let p = plan(&["10.0.0.0/8", "fd00:1::/64"], &["10.99.0.2"]);
        let state = dir.join("state");
        let applied = host::apply(&mut mac, &p, &state).await.unwrap();
        assert_eq!(
            mac.runner().ran,
            [
                "route -n get 10.99.0.2",
                "ifconfig utun9 mtu 16000 up",
                "ifconfig utun9 inet 198.18.0.1 198.18.0.1 netmask 255.255.255.255 alias",
                "ifconfig utun9 inet6 fd6d:7365:7670:6e00::1 prefixlen 128 alias",
                "route -q -n add -inet -host 10.99.0.2 192.168.1.1",
                "route -q -n add -inet 10.0.0.0/8 -interface utun9",
                "route -q -n add -inet6 fd00:1::/64 -interface utun9",
            ]
        );
        let journal = crate::journal::read(&crate::journal::path_for(&state, "utun9")).unwrap();
        assert_eq!(journal.pid, Some(std::process::id() as i32));
        assert_eq!(
            lines(&journal.changes),
            [
                "link utun9",
                "addr 198.18.0.1/32 utun9",
                "addr fd6d:7365:7670:6e00::1/128 utun9",
                "bypass 10.99.0.2/32 via 192.168.1.1 dev en0",
                "route 10.0.0.0/8 utun9",
                "route fd00:1::/64 utun9",
            ]
        );
        assert_eq!(
            mac.runner().routes.get(&net("10.0.0.0/8")),
            Some(&Via::Link("utun9".into()))
        );
        mac.runner.ran.clear();
        host::restore(&mut mac, applied).await.unwrap();
        assert_eq!(
            mac.runner().ran,
            [
                "ifconfig utun9",
                "route -q -n delete -inet6 fd00:1::/64 -interface utun9",
                "ifconfig utun9",
                "route -q -n delete -inet 10.0.0.0/8 -interface utun9",
                "route -q -n delete -inet -host 10.99.0.2 192.168.1.1",
                "ifconfig utun9",
                "ifconfig utun9 inet6 fd6d:7365:7670:6e00::1 -alias",
                "ifconfig utun9",
                "ifconfig utun9 inet 198.18.0.1 -alias",
            ]
        );
        assert_eq!(mac.runner().routes, FakeMac::default().routes);
        assert!(mac.runner().addrs.is_empty());
        assert!(!crate::journal::path_for(&state, "utun9").exists());
    }

    /// Item 3 of issue 25: `route add` exits 0 when the kernel refuses (route.c prints "File
    /// exists" and exits 0). The refusal must fail `up`, and the route, someone else's, must
    /// survive the undo.
    #[tokio::test]
    async fn a_route_the_kernel_refuses_fails_and_someone_elses_route_survives() {
        let dir = tmp("refused");
        let mut fake = FakeMac::default();
        // Another VPN already routes 10.0.0.0/16 into its own utun.
        fake.ifaces.insert("utun3".into());
        fake.routes
            .insert(net("10.0.0.0/16"), Via::Link("utun3".into()));
        let mut mac = Macos::new(fake, dir.join("resolver"));
        let e = host::apply(&mut mac, &plan(&["10.0.0.0/16"], &[]), &dir)
            .await
            .unwrap_err();
        assert!(
            matches!(&e, PlatformError::Refused { reason, .. } if reason == "File exists"),
            "{e}"
        );
        assert!(e.to_string().contains("another VPN"), "{e}");
        // Only what this session made is undone: its address, not the other VPN's route.
        assert_eq!(
            &mac.runner().ran[3..],
            ["ifconfig utun9", "ifconfig utun9 inet 198.18.0.1 -alias"]
        );
        assert_eq!(
            mac.runner().routes.get(&net("10.0.0.0/16")),
            Some(&Via::Link("utun3".into()))
        );
        assert!(!crate::journal::path_for(&dir, "utun9").exists());
    }

    #[test]
    fn route_output_is_read_as_route_c_prints_it() {
        let cmd = argv(&[
            "route",
            "-q",
            "-n",
            "add",
            "-inet",
            "10.0.0.0/16",
            "-interface",
            "utun9",
        ]);
        assert_eq!(
            route_outcome(&cmd, "add net 10.0.0.0: gateway utun9\n"),
            Ok(())
        );
        assert_eq!(
            route_outcome(&cmd, "add net 10.0.0.0: gateway utun9: File exists\n"),
            Err("File exists".to_owned())
        );
        assert!(route_outcome(&cmd, "").is_err(), "no answer is no success");
        let del = argv(&[
            "route",
            "-q",
            "-n",
            "delete",
            "-inet6",
            "-host",
            "2001:db8::5",
            "fe80::1%en0",
        ]);
        assert_eq!(
            route_outcome(
                &del,
                "delete host 2001:db8::5: gateway fe80::1%en0: not in table\n"
            ),
            Err(NOT_IN_TABLE.to_owned())
        );
    }

    /// Item 2 of issue 25: after a crash the utun is gone and the kernel removed its addresses
    /// and routes; the undo commands naming it fail (`route ... -interface utun9` exits 68,
    /// `ifconfig utun9 ... -alias` exits 1). Repair must count them as done, and the next `up`
    /// must work.
    #[tokio::test]
    async fn after_a_crash_repair_finds_the_utun_gone_and_the_next_up_works() {
        let dir = tmp("crash");
        let mut mac = Macos::new(FakeMac::default(), dir.join("resolver"));
        let p = plan(&["10.0.0.0/16", "fd00:1::/64"], &["10.0.99.2"]);
        let applied = host::apply(&mut mac, &p, &dir).await.unwrap();
        // kill -9: the journal stays behind under a pid that no longer runs.
        let path = crate::journal::path_for(&dir, "utun9");
        drop(applied);
        killed(&dir, "utun9");
        mac.runner.close_utun("utun9");
        assert!(mac.runner().routes.contains_key(&net("10.0.99.2/32")));
        mac.runner.ran.clear();
        let undone = host::repair(&mut mac, &dir).await.unwrap();
        assert_eq!(
            lines(&undone),
            ["bypass 10.0.99.2/32 via 192.168.1.1 dev en0"]
        );
        assert_eq!(
            mac.runner().ran,
            [
                "ifconfig utun9",
                "ifconfig utun9",
                "route -q -n delete -inet -host 10.0.99.2 192.168.1.1",
                "ifconfig utun9",
                "ifconfig utun9",
            ]
        );
        assert!(!path.exists(), "nothing is left for a later repair");
        assert_eq!(mac.runner().routes, FakeMac::default().routes);
        // The next `up` opens utun9 again and sets it up from scratch.
        mac.runner.ifaces.insert("utun9".into());
        let applied = host::apply(&mut mac, &p, &dir).await.unwrap();
        host::restore(&mut mac, applied).await.unwrap();
    }

    /// Item 4 of issue 25: `route -n get` prints a link-local gateway with its scope
    /// (`fe80::1%en0`); the bypass must go through that gateway, not on-link out of en0.
    #[tokio::test]
    async fn an_ipv6_jump_host_keeps_its_scoped_link_local_gateway() {
        let dir = tmp("v6gw");
        let mut mac = Macos::new(FakeMac::default(), dir.join("resolver"));
        let p = plan(&["2001:db8::/32"], &["2001:db8::5"]);
        let applied = host::apply(&mut mac, &p, &dir).await.unwrap();
        assert!(
            mac.runner()
                .ran
                .contains(&"route -q -n add -inet6 -host 2001:db8::5 fe80::1%en0".to_owned()),
            "{:?}",
            mac.runner().ran
        );
        assert_eq!(
            mac.runner().routes.get(&net("2001:db8::5/128")),
            Some(&Via::Gateway("fe80::1%en0".into(), "en0".into()))
        );
        let journal = crate::journal::read(&crate::journal::path_for(&dir, "utun9")).unwrap();
        assert!(
            lines(&journal.changes).contains(&"bypass 2001:db8::5/128 via fe80::1 dev en0".into())
        );
        host::restore(&mut mac, applied).await.unwrap();
        assert!(!mac.runner().routes.contains_key(&net("2001:db8::5/128")));
    }

    #[test]
    fn route_get_is_read_with_its_scoped_gateway() {
        let text = "   route to: 2001:db8::5\ndestination: default\n    gateway: fe80::1%en0\n  interface: en0\n      flags: <UP,GATEWAY,DONE,STATIC,PRCLONING>\n";
        assert_eq!(
            parse_route_get(text),
            Some(PathInfo {
                via: Some("fe80::1".parse().unwrap()),
                dev: "en0".into()
            })
        );
        assert_eq!(
            bypass_gateway(Some("fe80::1".parse().unwrap()), "en0"),
            ["fe80::1%en0"]
        );
        assert_eq!(
            bypass_gateway(Some("2001:db8::1".parse().unwrap()), "en0"),
            ["2001:db8::1"]
        );
        assert_eq!(bypass_gateway(None, "en0"), ["-interface", "en0"]);
    }

    /// Item 1 of issue 25: the resolver file must name an address this host delivers locally.
    /// XNU routes the utun's own address into the utun (no loopback route for a
    /// point-to-point interface's local address); 127.0.0.1 goes to lo0.
    #[tokio::test]
    async fn resolver_files_name_a_local_port_and_are_removed_on_restore() {
        let dir = tmp("dns");
        let resolver = dir.join("resolver");
        let mut mac = Macos::new(FakeMac::default(), &resolver);
        let p = plan(&["10.0.0.0/16"], &[]);
        let mut applied = host::apply(&mut mac, &p, &dir).await.unwrap();
        let listen = crate::dns::listen_addr_for(DnsBackend::ResolverDir, p.tun_v4());
        // The responder bound port 0; the OS chose this one.
        let bound = SocketAddr::new(listen.ip(), 53_535);
        let dns = DnsPlan {
            server: bound,
            zones: vec!["internal".into(), "0.10.in-addr.arpa".into()],
        };
        // Another tool's file for an unrelated domain stays untouched.
        std::fs::create_dir_all(&resolver).unwrap();
        std::fs::write(resolver.join("corp.example"), "nameserver 192.0.2.53\n").unwrap();
        let backend = host::apply_dns(&mut mac, &mut applied, "utun9", &dns, &dir)
            .await
            .unwrap();
        assert_eq!(backend, DnsBackend::ResolverDir);
        let text = std::fs::read_to_string(resolver.join("internal")).unwrap();
        assert!(text.starts_with(MARKER), "{text}");
        assert!(
            text.contains("\nnameserver 127.0.0.1\nport 53535\n"),
            "{text}"
        );
        // Where mDNSResponder's query to that nameserver goes on this host.
        let ns: IpAddr = crate::dns::nameservers(&text)[0];
        let path = parse_route_get(&mac.runner().route_get(ns)).unwrap();
        assert_eq!(path.dev, "lo0");
        let own = parse_route_get(&mac.runner().route_get(p.tun_v4().into())).unwrap();
        assert_eq!(
            own.dev, "utun9",
            "the utun's own address would go into the tunnel"
        );
        assert!(resolver.join("0.10.in-addr.arpa").is_file());
        let journal = crate::journal::read(&crate::journal::path_for(&dir, "utun9")).unwrap();
        assert_eq!(
            journal.changes.last(),
            Some(&Change::ResolverFile {
                file: resolver.join("0.10.in-addr.arpa")
            })
        );
        host::restore(&mut mac, applied).await.unwrap();
        assert!(!resolver.join("internal").exists());
        assert!(!resolver.join("0.10.in-addr.arpa").exists());
        assert!(resolver.join("corp.example").is_file());
    }

    #[tokio::test]
    async fn a_domain_another_tool_resolves_is_refused() {
        let dir = tmp("taken");
        let resolver = dir.join("resolver");
        std::fs::create_dir_all(&resolver).unwrap();
        std::fs::write(resolver.join("internal"), "nameserver 192.0.2.53\n").unwrap();
        let mut mac = Macos::new(FakeMac::default(), &resolver);
        let mut applied = host::apply(&mut mac, &plan(&["10.0.0.0/16"], &[]), &dir)
            .await
            .unwrap();
        let dns = DnsPlan {
            server: "127.0.0.1:53535".parse().unwrap(),
            zones: vec!["internal".into()],
        };
        let e = host::apply_dns(&mut mac, &mut applied, "utun9", &dns, &dir)
            .await
            .unwrap_err();
        assert!(
            matches!(&e, PlatformError::ResolverTaken { path } if *path == resolver.join("internal")),
            "{e}"
        );
        host::restore(&mut mac, applied).await.unwrap();
        assert_eq!(
            std::fs::read_to_string(resolver.join("internal")).unwrap(),
            "nameserver 192.0.2.53\n",
            "restore leaves the other tool's file alone"
        );
        // Another live session's file (utun8's) is not taken over either: the responders no
        // longer share port 53 of one address, so this is what stops a second session.
        let theirs = resolver_file_content("utun8", "127.0.0.1:50001".parse().unwrap());
        std::fs::write(resolver.join("internal"), &theirs).unwrap();
        let mut applied = host::apply(&mut mac, &plan(&["10.0.0.0/16"], &[]), &dir)
            .await
            .unwrap();
        let e = host::apply_dns(&mut mac, &mut applied, "utun9", &dns, &dir)
            .await
            .unwrap_err();
        assert!(matches!(&e, PlatformError::ResolverTaken { .. }), "{e}");
        host::restore(&mut mac, applied).await.unwrap();
        assert_eq!(
            std::fs::read_to_string(resolver.join("internal")).unwrap(),
            theirs
        );
    }

    #[tokio::test]
    async fn repair_undoes_a_dead_sessions_journal() {
        let dir = tmp("repair");
        let path = crate::journal::path_for(&dir, "utun9");
        // A pid that cannot be running; its utun9 was not closed (a leftover of a session
        // whose undo failed while the device still existed).
        let mut j = crate::journal::Journal::create(&path, i32::MAX as u32).unwrap();
        let mut fake = FakeMac::default();
        fake.addrs
            .insert(("utun9".into(), "198.18.0.1".parse().unwrap()));
        fake.routes
            .insert(net("10.0.0.0/16"), Via::Link("utun9".into()));
        for c in changes_of_a_small_session() {
            j.record(&c).unwrap();
        }
        drop(j);
        let mut mac = Macos::new(fake, dir.join("resolver"));
        let undone = host::repair(&mut mac, &dir).await.unwrap();
        assert_eq!(
            mac.runner().ran,
            [
                "ifconfig utun9",
                "route -q -n delete -inet 10.0.0.0/16 -interface utun9",
                "ifconfig utun9",
                "ifconfig utun9 inet 198.18.0.1 -alias",
            ]
        );
        assert_eq!(
            undone.len(),
            2,
            "the link is not counted: it went with its fd"
        );
        assert!(!path.exists());
    }

    #[tokio::test]
    async fn what_restore_cannot_undo_stays_in_the_journal() {
        let dir = tmp("keep");
        let mut mac = Macos::new(FakeMac::default(), dir.join("resolver"));
        let applied = host::apply(&mut mac, &plan(&["10.0.0.0/16"], &[]), &dir)
            .await
            .unwrap();
        // route.c: "must be root to alter routing table", exit 77 (EX_NOPERM).
        mac.runner.fail = Some((
            "route -q -n delete",
            "route: must be root to alter routing table",
        ));
        let e = host::restore(&mut mac, applied).await.unwrap_err();
        assert!(matches!(&e, PlatformError::Undo { count: 1, .. }), "{e}");
        let kept = crate::journal::read(&crate::journal::path_for(&dir, "utun9")).unwrap();
        assert_eq!(lines(&kept.changes), ["route 10.0.0.0/16 utun9"]);
        // The next repair (the session is gone) tries again, and succeeds.
        mac.runner.fail = None;
        let path = crate::journal::path_for(&dir, "utun9");
        let mut j = crate::journal::Journal::create(&path, i32::MAX as u32).unwrap();
        j.record(&kept.changes[0]).unwrap();
        drop(j);
        let undone = host::repair(&mut mac, &dir).await.unwrap();
        assert_eq!(undone, kept.changes);
        assert!(!path.exists());
    }

    fn changes_of_a_small_session() -> Vec<Change> {
        let p = plan(&["10.0.0.0/16"], &[]);
        host::changes_for(&p, &[])
    }

    #[tokio::test]
    async fn preflight_refuses_a_network_reached_directly() {
        let dir = tmp("preflight");
        let mut mac = Macos::new(FakeMac::default(), dir.join("resolver"));
        let e = host::preflight(&mut mac, &plan(&["192.168.0.0/16"], &[]), &dir)
            .await
            .unwrap_err();
        assert!(
            matches!(&e, PlatformError::RouteConflict { existing, dev, .. } if existing.to_string() == "192.168.1.0/24" && dev == "en0"),
            "{e}"
        );
        // 10.20.0.0/16 goes through a gateway: an overlap to report, not a conflict.
        let p = plan(&["10.0.0.0/8"], &["10.99.0.2"]);
        let pre = host::preflight(&mut mac, &p, &dir).await.unwrap();
        assert_eq!(
            pre.bypass_paths,
            [(
                "10.99.0.2".parse().unwrap(),
                PathInfo {
                    via: Some("192.168.1.1".parse().unwrap()),
                    dev: "en0".into()
                }
            )]
        );
        let routes = host::overlapping_routes(&mut mac, &p).await.unwrap();
        assert_eq!(routes.len(), 1);
        assert_eq!(routes[0].dst.to_string(), "10.20.0.0/16");
        assert!(!routes[0].local);
    }

    #[test]
    fn netstat_destinations_are_read_as_macos_abbreviates_them() {
        let d = |s| parse_destination(s).map(|n| n.to_string());
        assert_eq!(d("10/8").as_deref(), Some("10.0.0.0/8"));
        assert_eq!(d("192.168.1").as_deref(), Some("192.168.1.0/24"));
        assert_eq!(d("127").as_deref(), Some("127.0.0.0/8"));
        assert_eq!(d("10.0.3.7").as_deref(), Some("10.0.3.7/32"));
        assert_eq!(d("169.254/16").as_deref(), Some("169.254.0.0/16"));
        assert_eq!(d("fe80::%lo0/64").as_deref(), Some("fe80::/64"));
        assert_eq!(d("::1").as_deref(), Some("::1/128"));
        assert_eq!(d("default"), None);
        assert_eq!(d("link#6"), None);
        let routes = parse_netstat(NETSTAT4);
        assert_eq!(routes.len(), 3, "{routes:?}");
        assert!(routes.iter().all(|r| r.dst.prefix_len() > 0));
    }
}
