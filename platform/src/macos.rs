//! macOS: the utun device's MTU and addresses through `ifconfig`, routes and the jump host's
//! bypass route through `route`, the host's routes read from `netstat -rn`, and split DNS
//! through one `/etc/resolver/DOMAIN` file per zone (macOS's own per-domain resolver
//! mechanism: mDNSResponder watches the directory). Every change is journaled before it is
//! made and undone in reverse by `down` or, after a crash, by the next start or `down --force`
//! (the shared driver in `host.rs`).
//!
//! The commands go through a [`Runner`], so the exact command lines this backend would run are
//! unit-tested on any OS with a recording runner; the resolver files are written under a
//! directory that tests point at a temporary one. Nothing here was run on a macOS kernel in CI
//! (see the README, "Operating systems").
//!
//! Replies to cloud callers need no policy rules here: callers are inside the routed networks,
//! whose routes already lead into the utun device.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;

use crate::dns::{DnsBackend, DnsPlan, MARKER};
use crate::host::{self, Backend, RouteEntry};
use crate::journal::Change;
use crate::{ExistingRoute, PathInfo, PlatformError, Preflight, RoutePlan};

/// Where macOS looks for per-domain resolver files.
pub const RESOLVER_DIR: &str = "/etc/resolver";

/// Runs one command line, returning its standard output.
pub trait Runner {
    /// `argv[0]` is the program.
    async fn run(&mut self, argv: &[String]) -> Result<String, PlatformError>;
}

/// Runs commands for real.
#[derive(Debug, Default)]
pub struct System;

impl Runner for System {
    async fn run(&mut self, argv: &[String]) -> Result<String, PlatformError> {
        let args: Vec<&str> = argv[1..].iter().map(String::as_str).collect();
        host::run(&argv[0], &args).await
    }
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
}

fn argv(words: &[&str]) -> Vec<String> {
    words.iter().map(|w| (*w).to_owned()).collect()
}

fn family(net: &IpNet) -> &'static str {
    match net {
        IpNet::V4(_) => "-inet",
        IpNet::V6(_) => "-inet6",
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
            match via {
                Some(gw) => v.push(gw.to_string()),
                None => v.extend(argv(&["-interface", dev])),
            }
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
            match via {
                Some(gw) => v.push(gw.to_string()),
                None => v.extend(argv(&["-interface", dev])),
            }
            v
        }
        _ => return None,
    })
}

/// The gateway and interface from `route -n get ADDR` output.
pub fn parse_route_get(text: &str) -> Option<PathInfo> {
    let field = |name: &str| {
        text.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == name).then(|| v.trim().to_owned())
        })
    };
    let dev = field("interface")?;
    let via = field("gateway").and_then(|g| g.parse().ok());
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

/// The content of the resolver file for one zone.
pub fn resolver_file_content(tun: &str, server: IpAddr) -> String {
    format!(
        "{MARKER} (session on {tun}): `mse-vpn down` (or `mse-vpn down --force` after a crash) removes this file.\nnameserver {server}\nport 53\n"
    )
}

/// The resolver file for `zone` in `dir`.
pub fn resolver_file(dir: &Path, zone: &str) -> PathBuf {
    dir.join(zone.trim_end_matches('.'))
}

impl<R: Runner> Backend for Macos<R> {
    const DNS: DnsBackend = DnsBackend::ResolverDir;

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

    async fn routes(&mut self) -> Result<Vec<RouteEntry>, PlatformError> {
        let mut out = Vec::new();
        for fam in ["inet", "inet6"] {
            let text = self.run(argv(&["netstat", "-rn", "-f", fam])).await?;
            out.extend(parse_netstat(&text));
        }
        Ok(out)
    }

    async fn make(&mut self, change: &Change, plan: &RoutePlan) -> Result<(), PlatformError> {
        match make_command(change, plan.mtu()) {
            Some(cmd) => self.run(cmd).await.map(drop),
            None => Ok(()),
        }
    }

    fn dns_changes(&self, _tun: &str, plan: &DnsPlan) -> Vec<Change> {
        plan.zones
            .iter()
            .map(|z| Change::ResolverFile {
                file: resolver_file(&self.resolver_dir, z),
            })
            .collect()
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
        // Another tool's file for the same domain (another VPN's split DNS) is not ours to
        // replace: say so instead.
        if let Ok(existing) = std::fs::read_to_string(file)
            && !existing.starts_with(MARKER)
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
        match undo_command(change) {
            Some(cmd) => self.run(cmd).await.map(|_| true),
            // The utun device goes away with its file descriptor.
            None => Ok(false),
        }
    }
}

fn system() -> Macos<System> {
    Macos::new(System, RESOLVER_DIR)
}

/// The changes one session made.
#[derive(Debug)]
pub struct Applied(host::Applied);

pub async fn preflight(plan: &RoutePlan, state_dir: &Path) -> Result<Preflight, PlatformError> {
    host::preflight(&mut system(), plan, state_dir).await
}

pub async fn overlapping_routes(plan: &RoutePlan) -> Result<Vec<ExistingRoute>, PlatformError> {
    host::overlapping_routes(&mut system(), plan).await
}

pub async fn apply(plan: &RoutePlan, state_dir: &Path) -> Result<Applied, PlatformError> {
    host::apply(&mut system(), plan, state_dir)
        .await
        .map(Applied)
}

pub async fn apply_dns(
    applied: &mut Applied,
    tun: &str,
    plan: &DnsPlan,
    _state_dir: &Path,
) -> Result<DnsBackend, PlatformError> {
    host::apply_dns(&mut system(), &mut applied.0, tun, plan).await
}

pub async fn restore(applied: Applied) -> Result<(), PlatformError> {
    host::restore(&mut system(), applied.0).await
}

pub async fn repair(state_dir: &Path) -> Result<Vec<Change>, PlatformError> {
    host::repair(&mut system(), state_dir).await
}

pub fn pid_alive(pid: i32) -> bool {
    crate::process::pid_alive(pid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PlanSpec;

    /// Records every command line; answers `route get`, `netstat` and failures from a script.
    #[derive(Default)]
    struct Recorder {
        ran: Vec<String>,
        fail: Option<&'static str>,
    }

    const ROUTE_GET: &str = "   route to: 10.99.0.2\ndestination: default\n       mask: default\n    gateway: 192.168.1.1\n  interface: en0\n      flags: <UP,GATEWAY,DONE,STATIC,PRCLONING>\n";
    const NETSTAT4: &str = "Routing tables\n\nInternet:\nDestination        Gateway            Flags        Netif Expire\ndefault            192.168.1.1        UGScg          en0\n10.20/16           192.168.1.7        UGSc           en0\n127                127.0.0.1          UCS            lo0\n192.168.1          link#6             UCS            en0      !\n192.168.1.23       a4:83:e7:1:2:3     UHLWIi         en0   1177\n";
    const NETSTAT6: &str = "Internet6:\nDestination        Gateway            Flags        Netif Expire\n::1                ::1                UHL            lo0\nfe80::%lo0/64      fe80::1%lo0        UcI            lo0\n";

    impl Runner for Recorder {
        async fn run(&mut self, argv: &[String]) -> Result<String, PlatformError> {
            let line = argv.join(" ");
            self.ran.push(line.clone());
            if self.fail.is_some_and(|f| line.starts_with(f)) {
                return Err(PlatformError::Command {
                    cmd: line,
                    stderr: "route: writing to routing socket: File exists".into(),
                });
            }
            Ok(match argv.get(1).map(String::as_str) {
                Some("-n") if argv[0] == "route" => ROUTE_GET.to_owned(),
                Some("-rn") if argv[3] == "inet" => NETSTAT4.to_owned(),
                Some("-rn") => NETSTAT6.to_owned(),
                _ => String::new(),
            })
        }
    }

    fn plan(cidrs: &[&str], jump: &[&str]) -> RoutePlan {
        RoutePlan::new(PlanSpec {
            cidrs: cidrs.iter().map(|c| c.parse().unwrap()).collect(),
            excludes: Vec::new(),
            jump_addrs: jump.iter().map(|a| a.parse().unwrap()).collect(),
            tun_name: "utun9".into(),
            mtu: 16_000,
        })
        .unwrap()
    }

    fn tmp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("mse-vpn-macos-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[tokio::test]
    async fn apply_runs_the_exact_commands_journals_them_and_restore_undoes_them() {
        let dir = tmp("apply");
        let mut mac = Macos::new(Recorder::default(), dir.join("resolver"));
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
        let lines: Vec<String> = journal.changes.iter().map(ToString::to_string).collect();
        assert_eq!(
            lines,
            [
                "link utun9",
                "addr 198.18.0.1/32 utun9",
                "addr fd6d:7365:7670:6e00::1/128 utun9",
                "bypass 10.99.0.2/32 via 192.168.1.1 dev en0",
                "route 10.0.0.0/8 utun9",
                "route fd00:1::/64 utun9",
            ]
        );
        mac.runner.ran.clear();
        host::restore(&mut mac, applied).await.unwrap();
        assert_eq!(
            mac.runner().ran,
            [
                "route -q -n delete -inet6 fd00:1::/64 -interface utun9",
                "route -q -n delete -inet 10.0.0.0/8 -interface utun9",
                "route -q -n delete -inet -host 10.99.0.2 192.168.1.1",
                "ifconfig utun9 inet6 fd6d:7365:7670:6e00::1 -alias",
                "ifconfig utun9 inet 198.18.0.1 -alias",
            ]
        );
        assert!(!crate::journal::path_for(&state, "utun9").exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_failed_command_undoes_what_was_done() {
        let dir = tmp("fail");
        let mut mac = Macos::new(
            Recorder {
                fail: Some("route -q -n add -inet 10.0.0.0/16"),
                ..Recorder::default()
            },
            dir.join("resolver"),
        );
        let p = plan(&["10.0.0.0/16"], &[]);
        let e = host::apply(&mut mac, &p, &dir).await.unwrap_err();
        assert!(e.to_string().contains("File exists"), "{e}");
        // The route that failed (someone else's of the same name?) is not removed: only what
        // this session made is undone.
        assert_eq!(
            &mac.runner().ran[3..],
            ["ifconfig utun9 inet 198.18.0.1 -alias"]
        );
        assert!(!crate::journal::path_for(&dir, "utun9").exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn resolver_files_are_written_per_zone_and_removed_on_restore() {
        let dir = tmp("dns");
        let resolver = dir.join("resolver");
        let mut mac = Macos::new(Recorder::default(), &resolver);
        let p = plan(&["10.0.0.0/16"], &[]);
        let mut applied = host::apply(&mut mac, &p, &dir).await.unwrap();
        let dns = DnsPlan {
            server: "198.18.0.1".parse().unwrap(),
            zones: vec!["internal".into(), "0.10.in-addr.arpa".into()],
        };
        // Another tool's file for an unrelated domain stays untouched.
        std::fs::create_dir_all(&resolver).unwrap();
        std::fs::write(resolver.join("corp.example"), "nameserver 192.0.2.53\n").unwrap();
        let backend = host::apply_dns(&mut mac, &mut applied, "utun9", &dns)
            .await
            .unwrap();
        assert_eq!(backend, DnsBackend::ResolverDir);
        let text = std::fs::read_to_string(resolver.join("internal")).unwrap();
        assert!(text.starts_with(MARKER), "{text}");
        assert!(
            text.contains("\nnameserver 198.18.0.1\nport 53\n"),
            "{text}"
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
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_domain_another_tool_resolves_is_refused() {
        let dir = tmp("taken");
        let resolver = dir.join("resolver");
        std::fs::create_dir_all(&resolver).unwrap();
        std::fs::write(resolver.join("internal"), "nameserver 192.0.2.53\n").unwrap();
        let mut mac = Macos::new(Recorder::default(), &resolver);
        let mut applied = host::apply(&mut mac, &plan(&["10.0.0.0/16"], &[]), &dir)
            .await
            .unwrap();
        let dns = DnsPlan {
            server: "198.18.0.1".parse().unwrap(),
            zones: vec!["internal".into()],
        };
        let e = host::apply_dns(&mut mac, &mut applied, "utun9", &dns)
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
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn repair_undoes_a_dead_sessions_journal() {
        let dir = tmp("repair");
        let path = crate::journal::path_for(&dir, "utun9");
        // A pid that cannot be running.
        let mut j = crate::journal::Journal::create(&path, i32::MAX as u32).unwrap();
        for c in changes_of_a_small_session() {
            j.record(&c).unwrap();
        }
        drop(j);
        let mut mac = Macos::new(Recorder::default(), dir.join("resolver"));
        let undone = host::repair(&mut mac, &dir).await.unwrap();
        assert_eq!(
            mac.runner().ran,
            [
                "route -q -n delete -inet 10.0.0.0/16 -interface utun9",
                "ifconfig utun9 inet 198.18.0.1 -alias",
            ]
        );
        assert_eq!(
            undone.len(),
            2,
            "the link is not counted: it went with its fd"
        );
        assert!(!path.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn what_restore_cannot_undo_stays_in_the_journal() {
        let dir = tmp("keep");
        let mut mac = Macos::new(Recorder::default(), dir.join("resolver"));
        let applied = host::apply(&mut mac, &plan(&["10.0.0.0/16"], &[]), &dir)
            .await
            .unwrap();
        mac.runner.fail = Some("route -q -n delete");
        let e = host::restore(&mut mac, applied).await.unwrap_err();
        assert!(matches!(&e, PlatformError::Undo { count: 1, .. }), "{e}");
        let kept = crate::journal::read(&crate::journal::path_for(&dir, "utun9")).unwrap();
        let lines: Vec<String> = kept.changes.iter().map(ToString::to_string).collect();
        assert_eq!(lines, ["route 10.0.0.0/16 utun9"]);
        // The next repair (the session is gone) tries again, and succeeds.
        mac.runner.fail = None;
        let path = crate::journal::path_for(&dir, "utun9");
        let mut j = crate::journal::Journal::create(&path, i32::MAX as u32).unwrap();
        j.record(&kept.changes[0]).unwrap();
        drop(j);
        let undone = host::repair(&mut mac, &dir).await.unwrap();
        assert_eq!(undone, kept.changes);
        assert!(!path.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn changes_of_a_small_session() -> Vec<Change> {
        let p = plan(&["10.0.0.0/16"], &[]);
        host::changes_for(&p, &[])
    }

    #[tokio::test]
    async fn preflight_refuses_a_network_reached_directly() {
        let dir = tmp("preflight");
        let mut mac = Macos::new(Recorder::default(), dir.join("resolver"));
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
        let _ = std::fs::remove_dir_all(&dir);
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
