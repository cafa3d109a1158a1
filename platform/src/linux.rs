//! Linux: the TUN link, its addresses, the routes, the jump host's bypass route and the policy
//! rules for replies to cloud callers through iproute2's `ip` (JSON output when reading); split
//! DNS through systemd-resolved (`resolvectl`) or the resolv.conf fallback ([`crate::dns`]).
//! A backend of the shared driver (`host.rs`): every change is journaled before it is made
//! and undone in reverse by `down` or, after a crash, by the next start or `down --force`.
//!
//! The commands go through a [`Runner`], so the exact command lines this backend would run are
//! unit-tested against a fake host that answers each command as iproute2 and resolvectl do
//! (exit status, output, the kernel's error messages); the resolver files are named by the
//! backend, so tests point them at temporary ones. The end-to-end tests (tests/it) run the
//! real `ip` in network namespaces.
//!
//! What is Linux's own:
//! - **Replies to cloud callers** (`--expose`) leave from the TUN's address. Callers inside the
//!   routed networks are reached through the routes; for the others, packets from the TUN's
//!   address that the main table could only send along its default route (or not at all) go
//!   into the TUN instead: a default route into the TUN in a table of our own
//!   ([`RoutePlan::reply_table`]), a rule `from TUN-ADDRESS lookup main suppress_prefixlength
//!   0` and, after it, `from TUN-ADDRESS lookup TABLE`. Nothing else on the host is sourced
//!   from that address. The rules outlive the process: after a crash only repair removes them.
//! - **A host route to the jump host that already exists** (someone else's) is kept as it is:
//!   neither journaled nor made, never undone.
//! - **Undo tolerates "already gone"**: the TUN closes with its process and the kernel removes
//!   its addresses and routes with it; iproute2 then answers the undo commands with the
//!   kernel's "no such ..." messages ([`says_absent`]). A dead session's TUN itself can only
//!   remain if something else holds it: repair deletes it only if it is a tun device.
//! - **DNS**: a `resolvectl` sequence or a resolv.conf write that fails half-way may have
//!   changed something: such a change stays journaled as made, for undo to clean up.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde_json::Value;
use tracing::debug;

use crate::command::{Runner, System, argv};
use crate::dns::{self, DnsBackend, DnsPlan};
use crate::error::PlatformError;
use crate::host::{Backend, PathInfo, RouteEntry};
use crate::journal::Change;
use crate::plan::RoutePlan;

/// Priority of the reply rules (the second one has this + 1); below the main table's 32766.
const REPLY_RULE_PRIORITY: u32 = 5210;

/// The Linux backend over a command runner.
#[derive(Debug)]
pub struct Linux<R> {
    runner: R,
    /// The resolver configuration file (`/etc/resolv.conf`).
    resolv_conf: PathBuf,
    /// systemd-resolved's runtime directory (present while it runs).
    resolved_dir: PathBuf,
}

/// The Linux backend on the real host.
pub fn system() -> Linux<System> {
    Linux::new(System, dns::RESOLV_CONF, dns::RESOLVED_RUN_DIR)
}

impl<R: Runner> Linux<R> {
    /// A backend running its commands with `runner`, pointing the resolver configuration file
    /// `resolv_conf` at the responder when systemd-resolved (whose runtime directory is
    /// `resolved_dir`) does not run.
    pub fn new(
        runner: R,
        resolv_conf: impl Into<PathBuf>,
        resolved_dir: impl Into<PathBuf>,
    ) -> Self {
        Linux {
            runner,
            resolv_conf: resolv_conf.into(),
            resolved_dir: resolved_dir.into(),
        }
    }

    /// The runner (tests read what it recorded).
    #[cfg(test)]
    pub fn runner(&self) -> &R {
        &self.runner
    }

    async fn ip(&mut self, args: &[&str]) -> Result<String, PlatformError> {
        let mut cmd = argv(&["ip"]);
        cmd.extend(argv(args));
        self.runner.run(&cmd).await
    }

    async fn ip_json(&mut self, args: &[&str]) -> Result<Vec<Value>, PlatformError> {
        let text = self.ip(args).await?;
        if text.trim().is_empty() {
            return Ok(Vec::new());
        }
        serde_json::from_str(&text).map_err(|source| PlatformError::Parse {
            cmd: format!("ip {}", args.join(" ")),
            source,
        })
    }
}

fn family(net: &IpNet) -> &'static str {
    match net {
        IpNet::V4(_) => "-4",
        IpNet::V6(_) => "-6",
    }
}

fn text(v: &Value, key: &str) -> Option<String> {
    v.get(key).and_then(Value::as_str).map(str::to_owned)
}

/// Parses a route's `dst` ("default", "10.0.0.0/16", or a bare host address).
fn route_dst(v: &Value) -> Option<IpNet> {
    let dst = v.get("dst")?.as_str()?;
    if dst == "default" {
        return None;
    }
    dst.parse::<IpNet>()
        .ok()
        .or_else(|| dst.parse::<IpAddr>().ok().map(IpNet::from))
}

/// The routes of `ip -j route show` output, default routes left out. A route of scope link
/// or made by the kernel (an interface's own network) is a network reached directly.
pub fn parse_routes(routes: &[Value]) -> Vec<RouteEntry> {
    routes
        .iter()
        .filter_map(|r| {
            Some(RouteEntry {
                dst: route_dst(r)?,
                dev: text(r, "dev").unwrap_or_else(|| "?".to_owned()),
                via: text(r, "gateway").and_then(|g| g.parse().ok()),
                local: text(r, "scope").as_deref() == Some("link")
                    || text(r, "protocol").as_deref() == Some("kernel"),
            })
        })
        .collect()
}

/// The gateway and device of `ip -j route get ADDR` output.
pub fn parse_route_get(routes: &[Value]) -> Option<PathInfo> {
    let r = routes.first()?;
    Some(PathInfo {
        via: text(r, "gateway").and_then(|g| g.parse().ok()),
        dev: text(r, "dev")?,
    })
}

/// The changes that send replies to cloud callers into the TUN (see the file's doc): for each
/// TUN address, the reply table's default route and the two rules.
pub fn reply_changes(plan: &RoutePlan) -> Vec<Change> {
    let table = plan.reply_table();
    let mut out = Vec::new();
    for addr in plan.tun_addrs() {
        let from = addr.addr();
        out.push(Change::TableDefault {
            table,
            dev: plan.tun_name().to_owned(),
            v6: from.is_ipv6(),
        });
        out.push(Change::Rule {
            from,
            priority: REPLY_RULE_PRIORITY,
            table: None,
        });
        out.push(Change::Rule {
            from,
            priority: REPLY_RULE_PRIORITY + 1,
            table: Some(table),
        });
    }
    out
}

/// What `ip FAMILY OBJECT add|del SELECTOR` names for `change`: the family, the object and
/// the selector, the same for making and for undoing it. `None` for a change that is not one
/// `ip` object.
fn selector(change: &Change) -> Option<(&'static str, &'static str, Vec<String>)> {
    Some(match change {
        Change::Addr { addr, dev } => {
            (family(addr), "addr", argv(&[&addr.to_string(), "dev", dev]))
        }
        Change::Route { dst, dev } => (family(dst), "route", argv(&[&dst.to_string(), "dev", dev])),
        Change::Bypass { dst, via, dev } => {
            let mut words = argv(&[&dst.to_string()]);
            if let Some(v) = via {
                words.extend(argv(&["via", &v.to_string()]));
            }
            words.extend(argv(&["dev", dev]));
            (family(dst), "route", words)
        }
        Change::TableDefault { table, dev, v6 } => (
            if *v6 { "-6" } else { "-4" },
            "route",
            argv(&["default", "dev", dev, "table", &table.to_string()]),
        ),
        Change::Rule {
            from,
            priority,
            table,
        } => {
            let mut words = argv(&["from", &from.to_string(), "priority", &priority.to_string()]);
            match table {
                Some(t) => words.extend(argv(&["lookup", &t.to_string()])),
                None => words.extend(argv(&["lookup", "main", "suppress_prefixlength", "0"])),
            }
            (family(&IpNet::from(*from)), "rule", words)
        }
        _ => return None,
    })
}

/// `ip FAMILY OBJECT VERB SELECTOR`.
fn ip_command(change: &Change, verb: &str) -> Option<Vec<String>> {
    let (fam, object, words) = selector(change)?;
    let mut cmd = argv(&["ip", fam, object, verb]);
    cmd.extend(words);
    Some(cmd)
}

/// The command that makes `change` of `plan` (`None` for changes that are not `ip` commands).
/// The link gets the MTU and goes up; an IPv6 address skips duplicate address detection (a
/// TUN has no neighbours, and a tentative address cannot be a source); a route into the TUN
/// names the TUN's address of its family as the source.
pub fn make_command(change: &Change, plan: &RoutePlan) -> Option<Vec<String>> {
    if let Change::Link { name } = change {
        let mtu = plan.mtu().to_string();
        return Some(argv(&["ip", "link", "set", "dev", name, "mtu", &mtu, "up"]));
    }
    let mut cmd = ip_command(change, "add")?;
    match change {
        Change::Addr {
            addr: IpNet::V6(_), ..
        } => cmd.push("nodad".to_owned()),
        Change::Route { dst, .. } => {
            let src = match dst {
                IpNet::V4(_) => Some(IpAddr::from(plan.tun_v4())),
                IpNet::V6(_) => plan.tun_v6().map(IpAddr::from),
            };
            if let Some(s) = src {
                cmd.extend(argv(&["src", &s.to_string()]));
            }
        }
        _ => {}
    }
    Some(cmd)
}

/// The command that undoes `change` (`None` for changes not undone by one command).
pub fn undo_command(change: &Change) -> Option<Vec<String>> {
    match change {
        // resolved forgets a link's settings when the link goes; revert covers a link that
        // is still there.
        Change::ResolvedLink { link } => Some(argv(&["resolvectl", "revert", link])),
        _ => ip_command(change, "del"),
    }
}

/// True when a failed undo command says the thing to delete does not exist.
pub fn says_absent(e: &PlatformError) -> bool {
    const ABSENT: [&str; 6] = [
        "No such process",                 // route del
        "No such file or directory",       // rule del
        "Cannot assign requested address", // addr del
        "Cannot find device",              // any, once the link is gone
        "does not exist",                  // link show: Device "mse0" does not exist.
        "No such device",                  // resolvectl revert of a link that is gone
    ];
    matches!(e, PlatformError::Command { stderr, .. } if ABSENT.iter().any(|a| stderr.contains(a)))
}

impl<R: Runner> Backend for Linux<R> {
    fn pid_alive(&self, pid: i32) -> bool {
        crate::process::pid_alive(pid)
    }

    async fn path_to(&mut self, addr: IpAddr) -> Result<PathInfo, PlatformError> {
        let routes = self
            .ip_json(&["-j", "route", "get", &addr.to_string()])
            .await
            .map_err(|_| PlatformError::NoPathTo { addr })?;
        parse_route_get(&routes).ok_or(PlatformError::NoPathTo { addr })
    }

    async fn routes(&mut self, plan: &RoutePlan) -> Result<Vec<RouteEntry>, PlatformError> {
        let mut out = Vec::new();
        for fam in ["-4", "-6"] {
            if plan.routes().iter().any(|r| family(r) == fam) {
                let routes = self
                    .ip_json(&[fam, "-j", "route", "show", "table", "main"])
                    .await?;
                out.extend(parse_routes(&routes));
            }
        }
        Ok(out)
    }

    fn reply_changes(&self, plan: &RoutePlan) -> Vec<Change> {
        reply_changes(plan)
    }

    async fn present(&mut self, change: &Change) -> Result<bool, PlatformError> {
        let Change::Bypass { dst, .. } = change else {
            return Ok(false);
        };
        let existing = self
            .ip(&[family(dst), "route", "show", "exact", &dst.to_string()])
            .await?;
        Ok(!existing.trim().is_empty())
    }

    async fn make(&mut self, change: &Change, plan: &RoutePlan) -> Result<(), PlatformError> {
        match make_command(change, plan) {
            Some(cmd) => self.runner.run(&cmd).await.map(drop),
            None => Ok(()),
        }
    }

    async fn dns_backend(&mut self) -> DnsBackend {
        if dns::may_use_resolved(&self.resolv_conf, &self.resolved_dir)
            && self
                .runner
                .run(&argv(&["resolvectl", "status"]))
                .await
                .is_ok()
        {
            DnsBackend::Resolved
        } else {
            DnsBackend::ResolvConf
        }
    }

    fn dns_changes(
        &self,
        dns: DnsBackend,
        tun: &str,
        _plan: &DnsPlan,
        state_dir: &Path,
    ) -> Result<Vec<Change>, PlatformError> {
        if dns == DnsBackend::Resolved {
            return Ok(vec![Change::ResolvedLink {
                link: tun.to_owned(),
            }]);
        }
        // (The other systems' backends are never detected here.)
        let backup = dns::backup_path(state_dir, tun);
        if backup.to_string_lossy().contains(char::is_whitespace) {
            return Err(PlatformError::UnsafePath { path: backup });
        }
        let change = dns::resolv_conf_change(&self.resolv_conf, &backup).map_err(|source| {
            PlatformError::Dns {
                path: self.resolv_conf.clone(),
                source,
            }
        })?;
        Ok(vec![change])
    }

    async fn make_dns(
        &mut self,
        change: &Change,
        tun: &str,
        plan: &DnsPlan,
    ) -> Result<(), PlatformError> {
        match change {
            Change::ResolvedLink { link } => {
                for args in dns::resolved_commands(link, plan) {
                    let mut cmd = argv(&["resolvectl"]);
                    cmd.extend(args);
                    self.runner.run(&cmd).await?;
                }
                Ok(())
            }
            Change::ResolvConf { file, .. } | Change::ResolvConfLink { file, .. } => {
                dns::write_resolv_conf(change, plan, tun).map_err(|source| PlatformError::Dns {
                    path: file.clone(),
                    source,
                })
            }
            _ => Ok(()),
        }
    }

    fn partial(&self, change: &Change) -> bool {
        matches!(
            change,
            Change::ResolvedLink { .. } | Change::ResolvConf { .. } | Change::ResolvConfLink { .. }
        )
    }

    async fn undo(&mut self, change: &Change) -> Result<bool, PlatformError> {
        let done = match change {
            Change::ResolvConf { .. } | Change::ResolvConfLink { .. } => {
                return Ok(dns::undo_resolv_conf(change));
            }
            // The TUN of a live session goes away when its fd closes; a dead session's TUN
            // can only remain if something else holds it: delete it only if it is a tun
            // device.
            Change::Link { name } => match self.ip(&["-d", "link", "show", "dev", name]).await {
                Ok(out) if out.contains(" tun ") => self.ip(&["link", "del", "dev", name]).await,
                Ok(_) => return Ok(false),
                Err(e) => Err(e),
            },
            _ => match undo_command(change) {
                Some(cmd) => self.runner.run(&cmd).await,
                // Other systems' entries; never written on Linux.
                None => return Ok(false),
            },
        };
        match done {
            Ok(_) => Ok(true),
            Err(e) if says_absent(&e) => {
                debug!(%change, "nothing to undo: {e}");
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use serde_json::json;

    use super::*;
    use crate::host::testing::{killed, lines};
    use crate::host::{self, ExistingRoute};
    use crate::journal::{self, Journal};

    /// The main routing table's id.
    const MAIN: u32 = 254;

    /// A route as the kernel keeps it.
    #[derive(Clone, Debug, PartialEq, Eq)]
    struct Route {
        dev: String,
        via: Option<IpAddr>,
        /// Made by the kernel for an interface's own network (`proto kernel`).
        kernel: bool,
    }

    /// A Linux host as iproute2 and resolvectl show it: links, addresses, routing tables,
    /// policy rules and systemd-resolved's per-link settings. Every command line is recorded
    /// and answered as they answer it (exit status, stdout, the kernel's `RTNETLINK answers:`
    /// messages on stderr).
    struct FakeLinux {
        ran: Vec<String>,
        /// Link name → kind (`ip -d link show`: "tun", "veth", "loopback").
        links: BTreeMap<String, &'static str>,
        addrs: BTreeSet<(String, IpNet)>,
        /// (table, destination) → route.
        routes: BTreeMap<(u32, IpNet), Route>,
        /// (priority, from, what follows `lookup`).
        rules: BTreeSet<(u32, IpAddr, String)>,
        /// resolved's per-link settings, or `None` when it does not run.
        resolved: Option<BTreeMap<String, Vec<String>>>,
        /// Commands starting with `.0` exit non-zero with stderr `.1`.
        fail: Option<(&'static str, &'static str)>,
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn eth0(via: Option<&str>, kernel: bool) -> Route {
        Route {
            dev: "eth0".into(),
            via: via.map(|v| v.parse().unwrap()),
            kernel,
        }
    }

    impl Default for FakeLinux {
        fn default() -> Self {
            let mut routes = BTreeMap::new();
            routes.insert((MAIN, net("0.0.0.0/0")), eth0(Some("192.168.1.1"), false));
            routes.insert((MAIN, net("192.168.1.0/24")), eth0(None, true));
            routes.insert((MAIN, net("::/0")), eth0(Some("fe80::1"), false));
            routes.insert((MAIN, net("fe80::/64")), eth0(None, true));
            FakeLinux {
                ran: Vec::new(),
                // mvt0: the TUN the caller opened.
                links: [("lo", "loopback"), ("eth0", "veth"), ("mvt0", "tun")]
                    .map(|(n, k)| (n.to_owned(), k))
                    .into(),
                addrs: [("eth0".to_owned(), net("192.168.1.23/24"))].into(),
                routes,
                rules: BTreeSet::new(),
                resolved: None,
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

    /// The value after `key` in `words`.
    fn after<'a>(words: &[&'a str], key: &str) -> Option<&'a str> {
        let i = words.iter().position(|w| *w == key)?;
        words.get(i + 1).copied()
    }

    impl FakeLinux {
        /// The process that opened the TUN died: the device goes with its descriptor, and the
        /// kernel removes its addresses and every route through it (in every table). Policy
        /// rules name no device: they stay.
        fn close_tun(&mut self, dev: &str) {
            self.links.remove(dev);
            self.addrs.retain(|(d, _)| d != dev);
            self.routes.retain(|_, r| r.dev != dev);
        }

        fn no_device(&self, line: &str, dev: &str) -> Option<PlatformError> {
            (!self.links.contains_key(dev))
                .then(|| exited(line, &format!("Cannot find device \"{dev}\"")))
        }

        /// A route's `dst` as iproute2 prints it: `default`, a bare address for a host route.
        fn shown(dst: &IpNet) -> String {
            match dst.prefix_len() {
                0 => "default".to_owned(),
                n if n == dst.max_prefix_len() => dst.addr().to_string(),
                _ => dst.to_string(),
            }
        }

        /// `ip [-4|-6] [-j] [-d] OBJECT VERB ARGS`.
        fn ip(&mut self, line: &str, args: &[String]) -> Result<String, PlatformError> {
            let words: Vec<&str> = args[1..].iter().map(String::as_str).collect();
            let v6 = words.contains(&"-6");
            let words: Vec<&str> = words.into_iter().filter(|w| !w.starts_with('-')).collect();
            let dst_of = |w: &str| -> IpNet {
                match w {
                    "default" if v6 => net("::/0"),
                    "default" => net("0.0.0.0/0"),
                    w => w
                        .parse()
                        .unwrap_or_else(|_| IpNet::from(w.parse::<IpAddr>().unwrap())),
                }
            };
            let exists = || Err(exited(line, "RTNETLINK answers: File exists"));
            match words.as_slice() {
                ["route", "get", a] => {
                    let a: IpAddr = a.parse().unwrap();
                    let Some((_, r)) = self
                        .routes
                        .iter()
                        .filter(|((t, d), _)| *t == MAIN && d.contains(&a))
                        .max_by_key(|((_, d), _)| d.prefix_len())
                    else {
                        return Err(exited(line, "RTNETLINK answers: Network is unreachable"));
                    };
                    let mut v = json!({"dst": a.to_string(), "dev": r.dev, "flags": []});
                    if let Some(g) = r.via {
                        v["gateway"] = json!(g.to_string());
                    }
                    Ok(json!([v]).to_string())
                }
                ["route", "show", "table", "main"] => {
                    let rows: Vec<Value> = self
                        .routes
                        .iter()
                        .filter(|((t, d), _)| *t == MAIN && matches!(d, IpNet::V6(_)) == v6)
                        .map(|((_, d), r)| {
                            let mut v = json!({"dst": Self::shown(d), "dev": r.dev, "flags": []});
                            match r.via {
                                Some(g) => v["gateway"] = json!(g.to_string()),
                                None => v["scope"] = json!("link"),
                            }
                            if r.kernel {
                                v["protocol"] = json!("kernel");
                            }
                            v
                        })
                        .collect();
                    Ok(json!(rows).to_string())
                }
                ["route", "show", "exact", d] => {
                    let d = dst_of(d);
                    Ok(match self.routes.get(&(MAIN, d)) {
                        Some(r) => {
                            let via = r.via.map(|g| format!("via {g} ")).unwrap_or_default();
                            format!("{} {via}dev {} \n", Self::shown(&d), r.dev)
                        }
                        None => String::new(),
                    })
                }
                ["route", verb @ ("add" | "del"), d, rest @ ..] => {
                    let dev = after(rest, "dev").unwrap();
                    if let Some(e) = self.no_device(line, dev) {
                        return Err(e);
                    }
                    let table = after(rest, "table").map_or(MAIN, |t| t.parse().unwrap());
                    let key = (table, dst_of(d));
                    if *verb == "del" {
                        return match self.routes.remove(&key) {
                            Some(_) => Ok(String::new()),
                            None => Err(exited(line, "RTNETLINK answers: No such process")),
                        };
                    }
                    if let Some(src) = after(rest, "src") {
                        let src: IpAddr = src.parse().unwrap();
                        if !self.addrs.iter().any(|(_, a)| a.addr() == src) {
                            return Err(exited(line, "Error: Invalid prefsrc address."));
                        }
                    }
                    if self.routes.contains_key(&key) {
                        return exists();
                    }
                    let via = after(rest, "via").map(|g| g.parse().unwrap());
                    let route = Route {
                        dev: dev.to_owned(),
                        via,
                        kernel: false,
                    };
                    self.routes.insert(key, route);
                    Ok(String::new())
                }
                ["addr", verb @ ("add" | "del"), a, "dev", dev, ..] => {
                    if let Some(e) = self.no_device(line, dev) {
                        return Err(e);
                    }
                    let key = ((*dev).to_owned(), net(a));
                    match *verb {
                        "add" if self.addrs.contains(&key) => exists(),
                        "add" => {
                            self.addrs.insert(key);
                            Ok(String::new())
                        }
                        _ if self.addrs.remove(&key) => Ok(String::new()),
                        _ => Err(exited(
                            line,
                            "RTNETLINK answers: Cannot assign requested address",
                        )),
                    }
                }
                [
                    "rule",
                    verb @ ("add" | "del"),
                    "from",
                    a,
                    "priority",
                    p,
                    "lookup",
                    what @ ..,
                ] => {
                    let key = (p.parse().unwrap(), a.parse().unwrap(), what.join(" "));
                    match *verb {
                        "add" if self.rules.contains(&key) => exists(),
                        "add" => {
                            self.rules.insert(key);
                            Ok(String::new())
                        }
                        _ if self.rules.remove(&key) => Ok(String::new()),
                        _ => Err(exited(line, "RTNETLINK answers: No such file or directory")),
                    }
                }
                ["link", "set", "dev", dev, "mtu", _, "up"] => match self.no_device(line, dev) {
                    Some(e) => Err(e),
                    None => Ok(String::new()),
                },
                ["link", "show", "dev", dev] => match self.links.get(*dev) {
                    Some(kind) => Ok(format!(
                        "5: {dev}: <POINTOPOINT,UP,LOWER_UP> mtu 16000 qdisc fq_codel state UNKNOWN mode DEFAULT group default qlen 500\n    link/none  promiscuity 0 minmtu 68 maxmtu 65535 \n    {kind} type {kind} pi off vnet_hdr off persist off \n"
                    )),
                    None => Err(exited(line, &format!("Device \"{dev}\" does not exist."))),
                },
                ["link", "del", "dev", dev] => match self.no_device(line, dev) {
                    Some(e) => Err(e),
                    None => {
                        self.close_tun(dev);
                        Ok(String::new())
                    }
                },
                other => panic!("FakeLinux: unexpected ip arguments {other:?}"),
            }
        }

        /// `resolvectl VERB [LINK ARGS...]`.
        fn resolvectl(&mut self, line: &str, args: &[String]) -> Result<String, PlatformError> {
            let links = self.links.clone();
            let Some(settings) = self.resolved.as_mut() else {
                return Err(exited(
                    line,
                    "Failed to get global data: Unit dbus-org.freedesktop.resolve1.service not found.",
                ));
            };
            if args[1] == "status" {
                return Ok("Global\n       Protocols: +LLMNR\n".to_owned());
            }
            let link = &args[2];
            if !links.contains_key(link) {
                return Err(exited(
                    line,
                    &format!("Failed to resolve interface \"{link}\": No such device"),
                ));
            }
            match args[1].as_str() {
                "revert" => {
                    settings.remove(link);
                }
                _ => settings
                    .entry(link.clone())
                    .or_default()
                    .push(args[1..].join(" ")),
            }
            Ok(String::new())
        }
    }

    impl Runner for FakeLinux {
        async fn run(&mut self, argv: &[String]) -> Result<String, PlatformError> {
            let line = argv.join(" ");
            self.ran.push(line.clone());
            if let Some((prefix, stderr)) = self.fail
                && line.starts_with(prefix)
            {
                return Err(exited(&line, stderr));
            }
            match argv[0].as_str() {
                "ip" => self.ip(&line, argv),
                "resolvectl" => self.resolvectl(&line, argv),
                _ => panic!("FakeLinux: unexpected command {line}"),
            }
        }
    }

    fn plan(cidrs: &[&str], jump: &[&str]) -> RoutePlan {
        host::testing::plan("mvt0", 16_000, cidrs, jump)
    }

    fn tmp(name: &str) -> host::testing::Scratch {
        host::testing::scratch("linux", name)
    }

    /// A backend on `fake` whose resolver files are under `dir`.
    fn linux(fake: FakeLinux, dir: &Path) -> Linux<FakeLinux> {
        Linux::new(fake, dir.join("resolv.conf"), dir.join("resolve"))
    }

    #[tokio::test]
    async fn apply_runs_the_exact_commands_journals_them_and_restore_undoes_them() {
        let dir = tmp("apply");
        let mut lx = linux(FakeLinux::default(), &dir);
        let p = plan(&["10.0.0.0/8", "fd00:1::/64"], &["10.99.0.2"]);
        let t = p.reply_table();
        let applied = host::apply(&mut lx, &p, &dir).await.unwrap();
        let v6 = "fd6d:7365:7670:6e00::1";
        assert_eq!(
            lx.runner().ran,
            [
                "ip -j route get 10.99.0.2".to_owned(),
                "ip link set dev mvt0 mtu 16000 up".into(),
                "ip -4 addr add 198.18.0.1/32 dev mvt0".into(),
                format!("ip -6 addr add {v6}/128 dev mvt0 nodad"),
                "ip -4 route show exact 10.99.0.2/32".into(),
                "ip -4 route add 10.99.0.2/32 via 192.168.1.1 dev eth0".into(),
                "ip -4 route add 10.0.0.0/8 dev mvt0 src 198.18.0.1".into(),
                format!("ip -6 route add fd00:1::/64 dev mvt0 src {v6}"),
                format!("ip -4 route add default dev mvt0 table {t}"),
                "ip -4 rule add from 198.18.0.1 priority 5210 lookup main suppress_prefixlength 0"
                    .into(),
                format!("ip -4 rule add from 198.18.0.1 priority 5211 lookup {t}"),
                format!("ip -6 route add default dev mvt0 table {t}"),
                format!(
                    "ip -6 rule add from {v6} priority 5210 lookup main suppress_prefixlength 0"
                ),
                format!("ip -6 rule add from {v6} priority 5211 lookup {t}"),
            ]
        );
        let journal = journal::read(&journal::path_for(&dir, "mvt0")).unwrap();
        assert_eq!(journal.pid, Some(std::process::id() as i32));
        assert_eq!(
            lines(&journal.changes),
            [
                "link mvt0".to_owned(),
                "addr 198.18.0.1/32 mvt0".into(),
                format!("addr {v6}/128 mvt0"),
                "bypass 10.99.0.2/32 via 192.168.1.1 dev eth0".into(),
                "route 10.0.0.0/8 mvt0".into(),
                "route fd00:1::/64 mvt0".into(),
                format!("table-default {t} dev mvt0 inet"),
                "rule from 198.18.0.1 prio 5210 main-nodefault".into(),
                format!("rule from 198.18.0.1 prio 5211 table {t}"),
                format!("table-default {t} dev mvt0 inet6"),
                format!("rule from {v6} prio 5210 main-nodefault"),
                format!("rule from {v6} prio 5211 table {t}"),
            ]
        );
        assert_eq!(lx.runner().rules.len(), 4);
        lx.runner.ran.clear();
        host::restore(&mut lx, applied).await.unwrap();
        assert_eq!(
            lx.runner().ran,
            [
                format!("ip -6 rule del from {v6} priority 5211 lookup {t}"),
                format!(
                    "ip -6 rule del from {v6} priority 5210 lookup main suppress_prefixlength 0"
                ),
                format!("ip -6 route del default dev mvt0 table {t}"),
                format!("ip -4 rule del from 198.18.0.1 priority 5211 lookup {t}"),
                "ip -4 rule del from 198.18.0.1 priority 5210 lookup main suppress_prefixlength 0"
                    .into(),
                format!("ip -4 route del default dev mvt0 table {t}"),
                "ip -6 route del fd00:1::/64 dev mvt0".into(),
                "ip -4 route del 10.0.0.0/8 dev mvt0".into(),
                "ip -4 route del 10.99.0.2/32 via 192.168.1.1 dev eth0".into(),
                format!("ip -6 addr del {v6}/128 dev mvt0"),
                "ip -4 addr del 198.18.0.1/32 dev mvt0".into(),
            ]
        );
        let clean = FakeLinux::default();
        assert_eq!(lx.runner().routes, clean.routes);
        assert_eq!(lx.runner().addrs, clean.addrs);
        assert!(lx.runner().rules.is_empty());
        assert!(
            lx.runner().links.contains_key("mvt0"),
            "the caller closes it"
        );
        assert!(!journal::path_for(&dir, "mvt0").exists());
    }

    #[tokio::test]
    async fn a_host_route_to_the_jump_host_that_exists_is_kept_and_never_undone() {
        let dir = tmp("bypass");
        let mut fake = FakeLinux::default();
        let theirs = eth0(Some("192.168.1.254"), false);
        fake.routes
            .insert((MAIN, net("10.99.0.2/32")), theirs.clone());
        let mut lx = linux(fake, &dir);
        let applied = host::apply(&mut lx, &plan(&["10.0.0.0/8"], &["10.99.0.2"]), &dir)
            .await
            .unwrap();
        let ran = &lx.runner().ran;
        assert!(ran.contains(&"ip -4 route show exact 10.99.0.2/32".to_owned()));
        assert!(
            !ran.iter().any(|c| c.contains("route add 10.99.0.2")),
            "{ran:?}"
        );
        let journal = journal::read(&journal::path_for(&dir, "mvt0")).unwrap();
        assert!(
            !journal
                .changes
                .iter()
                .any(|c| matches!(c, Change::Bypass { .. })),
            "not ours: not journaled"
        );
        host::restore(&mut lx, applied).await.unwrap();
        assert_eq!(
            lx.runner().routes.get(&(MAIN, net("10.99.0.2/32"))),
            Some(&theirs)
        );
    }

    /// The unit-level twin of tests/it's `a_failed_up_leaves_a_rule_it_did_not_create`: a
    /// rule identical to the first reply rule exists (someone else's); `up` fails with the
    /// kernel's "File exists", undoes what it made, and leaves that rule.
    #[tokio::test]
    async fn a_failed_up_undoes_what_it_made_and_leaves_a_rule_it_did_not_create() {
        let dir = tmp("rule");
        let mut fake = FakeLinux::default();
        let theirs = (
            REPLY_RULE_PRIORITY,
            "198.18.0.1".parse().unwrap(),
            "main suppress_prefixlength 0".to_owned(),
        );
        fake.rules.insert(theirs.clone());
        let mut lx = linux(fake, &dir);
        let p = plan(&["10.0.0.0/16"], &[]);
        let t = p.reply_table();
        let e = host::apply(&mut lx, &p, &dir).await.unwrap_err();
        assert!(
            matches!(&e, PlatformError::Command { stderr, .. } if stderr.contains("File exists")),
            "{e}"
        );
        let ran = &lx.runner().ran;
        let failed = ran.iter().position(|c| c.contains("rule add")).unwrap();
        assert_eq!(
            ran[failed + 1..],
            [
                format!("ip -4 route del default dev mvt0 table {t}"),
                "ip -4 route del 10.0.0.0/16 dev mvt0".into(),
                "ip -4 addr del 198.18.0.1/32 dev mvt0".into(),
            ],
            "only what this session made is undone"
        );
        assert_eq!(lx.runner().rules, [theirs].into());
        assert_eq!(lx.runner().routes, FakeLinux::default().routes);
        assert!(!journal::path_for(&dir, "mvt0").exists());
    }

    /// After `kill -9` the TUN is gone and the kernel removed its addresses and routes; the
    /// policy rules and the bypass route outlive the process. Repair removes exactly those,
    /// counts the rest as gone (their commands fail with "Cannot find device"), and the next
    /// `up` works.
    #[tokio::test]
    async fn after_a_crash_repair_removes_what_outlived_the_tun_and_the_next_up_works() {
        let dir = tmp("crash");
        let mut lx = linux(FakeLinux::default(), &dir);
        let p = plan(&["10.0.0.0/8"], &["10.99.0.2"]);
        let t = p.reply_table();
        let applied = host::apply(&mut lx, &p, &dir).await.unwrap();
        drop(applied);
        killed(&dir, "mvt0");
        lx.runner.close_tun("mvt0");
        lx.runner.ran.clear();
        let undone = host::repair(&mut lx, &dir).await.unwrap();
        assert_eq!(
            lines(&undone),
            [
                format!("rule from 198.18.0.1 prio 5211 table {t}"),
                "rule from 198.18.0.1 prio 5210 main-nodefault".into(),
                "bypass 10.99.0.2/32 via 192.168.1.1 dev eth0".into(),
            ]
        );
        assert_eq!(
            lx.runner().ran,
            [
                format!("ip -4 rule del from 198.18.0.1 priority 5211 lookup {t}"),
                "ip -4 rule del from 198.18.0.1 priority 5210 lookup main suppress_prefixlength 0"
                    .into(),
                format!("ip -4 route del default dev mvt0 table {t}"),
                "ip -4 route del 10.0.0.0/8 dev mvt0".into(),
                "ip -4 route del 10.99.0.2/32 via 192.168.1.1 dev eth0".into(),
                "ip -4 addr del 198.18.0.1/32 dev mvt0".into(),
                "ip -d link show dev mvt0".into(),
            ]
        );
        assert!(!journal::path_for(&dir, "mvt0").exists());
        let clean = FakeLinux::default();
        assert_eq!(lx.runner().routes, clean.routes);
        assert!(lx.runner().rules.is_empty());
        // The next `up` opens mvt0 again and sets it up from scratch.
        lx.runner.links.insert("mvt0".into(), "tun");
        let applied = host::apply(&mut lx, &p, &dir).await.unwrap();
        host::restore(&mut lx, applied).await.unwrap();
        assert_eq!(lx.runner().routes, clean.routes);
    }

    #[tokio::test]
    async fn repair_deletes_a_leftover_tun_but_no_other_kind_of_link() {
        let dir = tmp("link");
        let mut j = Journal::create(&journal::path_for(&dir, "mvt0"), i32::MAX as u32).unwrap();
        // mvt0 is still there (something else holds it); eth0 is named by a garbled journal.
        for name in ["mvt0", "eth0"] {
            j.record(&Change::Link { name: name.into() }).unwrap();
        }
        drop(j);
        let mut lx = linux(FakeLinux::default(), &dir);
        let undone = host::repair(&mut lx, &dir).await.unwrap();
        assert_eq!(lines(&undone), ["link mvt0"]);
        assert_eq!(
            lx.runner().ran,
            [
                "ip -d link show dev eth0",
                "ip -d link show dev mvt0",
                "ip link del dev mvt0",
            ]
        );
        assert!(lx.runner().links.contains_key("eth0"));
        assert!(!lx.runner().links.contains_key("mvt0"));
    }

    /// The unit-level twin of tests/it's `an_undo_that_fails_is_kept_reported_and_done_by_the_
    /// next_down`: deleting the rules fails (`ip` out of descriptors); the rest is undone, the
    /// two rules stay in the journal, the failure names the first of them; the next repair
    /// removes them.
    #[tokio::test]
    async fn what_restore_cannot_undo_stays_in_the_journal_for_the_next_repair() {
        let dir = tmp("keep");
        let mut lx = linux(FakeLinux::default(), &dir);
        let p = plan(&["10.0.0.0/16"], &[]);
        let applied = host::apply(&mut lx, &p, &dir).await.unwrap();
        lx.runner.fail = Some((
            "ip -4 rule del",
            "ip: error while loading shared libraries: libbpf.so.1: cannot open shared object file: Error 24",
        ));
        let e = host::restore(&mut lx, applied).await.unwrap_err();
        let PlatformError::Undo {
            count,
            first,
            source,
            ..
        } = &e
        else {
            panic!("{e:?}");
        };
        assert_eq!(*count, 2, "{e}");
        assert_eq!(
            first.to_string(),
            "rule from 198.18.0.1 prio 5210 main-nodefault"
        );
        // The change named and the failure quoted are the same one.
        assert!(
            source
                .to_string()
                .contains("ip -4 rule del from 198.18.0.1 priority 5210 "),
            "{e}"
        );
        let kept = journal::read(&journal::path_for(&dir, "mvt0")).unwrap();
        assert_eq!(
            lines(&kept.changes),
            [
                "rule from 198.18.0.1 prio 5210 main-nodefault".to_owned(),
                format!("rule from 198.18.0.1 prio 5211 table {}", p.reply_table()),
            ]
        );
        assert_eq!(lx.runner().rules.len(), 2);
        assert_eq!(
            lx.runner().routes,
            FakeLinux::default().routes,
            "the rest is undone"
        );
        // The obstacle is gone and the session has exited: the next repair removes them.
        lx.runner.fail = None;
        killed(&dir, "mvt0");
        let undone = host::repair(&mut lx, &dir).await.unwrap();
        assert_eq!(undone.len(), 2);
        assert!(lx.runner().rules.is_empty());
        assert!(!journal::path_for(&dir, "mvt0").exists());
    }

    /// Nothing is made that could not be journaled first: here the state directory cannot be
    /// created (its parent is a file).
    #[tokio::test]
    async fn nothing_is_made_when_the_journal_cannot_be_written() {
        let dir = tmp("nojournal");
        std::fs::write(dir.join("file"), "").unwrap();
        let state = dir.join("file").join("state");
        let mut lx = linux(FakeLinux::default(), &dir);
        let e = host::apply(&mut lx, &plan(&["10.0.0.0/16"], &[]), &state)
            .await
            .unwrap_err();
        assert!(matches!(e, PlatformError::Journal { .. }), "{e}");
        assert!(lx.runner().ran.is_empty(), "{:?}", lx.runner().ran);
    }

    /// The same for DNS: a journal that cannot take the change (a full disk: /dev/full)
    /// leaves resolv.conf untouched and writes no backup.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_dns_change_that_cannot_be_journaled_is_not_made() {
        use crate::host::Applied;
        let dir = tmp("full");
        let original = "nameserver 192.168.1.1\n";
        std::fs::write(dir.join("resolv.conf"), original).unwrap();
        let mut lx = linux(FakeLinux::default(), &dir);
        let mut applied = Applied::on(Journal::open(Path::new("/dev/full")).unwrap());
        let dns = DnsPlan {
            server: "198.18.0.1:53".parse().unwrap(),
            zones: vec!["internal".into()],
        };
        let e = host::apply_dns(&mut lx, &mut applied, "mvt0", &dns, &dir)
            .await
            .unwrap_err();
        assert!(matches!(e, PlatformError::Journal { .. }), "{e}");
        assert_eq!(
            std::fs::read_to_string(dir.join("resolv.conf")).unwrap(),
            original
        );
        assert!(!dns::backup_path(&dir, "mvt0").exists());
    }

    fn dns_plan() -> DnsPlan {
        DnsPlan {
            server: "198.18.0.1:53".parse().unwrap(),
            zones: vec!["internal".into(), "0.10.in-addr.arpa".into()],
        }
    }

    /// A host whose resolv.conf sends lookups to systemd-resolved, which runs.
    fn with_resolved(dir: &Path) -> FakeLinux {
        std::fs::write(dir.join("resolv.conf"), "nameserver 127.0.0.53\n").unwrap();
        std::fs::create_dir_all(dir.join("resolve")).unwrap();
        FakeLinux {
            resolved: Some(BTreeMap::new()),
            ..FakeLinux::default()
        }
    }

    #[tokio::test]
    async fn dns_through_resolved_routes_only_the_zones_and_restore_reverts_the_link() {
        let dir = tmp("resolved");
        let mut lx = linux(with_resolved(&dir), &dir);
        let mut applied = host::apply(&mut lx, &plan(&["10.0.0.0/16"], &[]), &dir)
            .await
            .unwrap();
        lx.runner.ran.clear();
        let backend = host::apply_dns(&mut lx, &mut applied, "mvt0", &dns_plan(), &dir)
            .await
            .unwrap();
        assert_eq!(backend, DnsBackend::Resolved);
        assert_eq!(
            lx.runner().ran,
            [
                "resolvectl status",
                "resolvectl dns mvt0 198.18.0.1",
                "resolvectl domain mvt0 ~internal ~0.10.in-addr.arpa",
                "resolvectl default-route mvt0 false",
            ]
        );
        let journal = journal::read(&journal::path_for(&dir, "mvt0")).unwrap();
        assert_eq!(
            journal.changes.last().map(ToString::to_string).as_deref(),
            Some("resolved-link mvt0")
        );
        assert_eq!(lx.runner().resolved.as_ref().unwrap()["mvt0"].len(), 3);
        host::restore(&mut lx, applied).await.unwrap();
        assert!(
            lx.runner()
                .ran
                .contains(&"resolvectl revert mvt0".to_owned())
        );
        assert!(lx.runner().resolved.as_ref().unwrap().is_empty());
    }

    /// `resolvectl dns` worked, `resolvectl domain` did not: the link has a DNS server of
    /// ours, so the change stays journaled as made and restore reverts it (a failure that
    /// made nothing would be journaled "not made" and never undone).
    #[tokio::test]
    async fn a_resolvectl_sequence_that_fails_half_way_is_still_reverted() {
        let dir = tmp("half");
        let mut fake = with_resolved(&dir);
        fake.fail = Some((
            "resolvectl domain",
            "Failed to set DNS configuration: Access denied",
        ));
        let mut lx = linux(fake, &dir);
        let mut applied = host::apply(&mut lx, &plan(&["10.0.0.0/16"], &[]), &dir)
            .await
            .unwrap();
        let e = host::apply_dns(&mut lx, &mut applied, "mvt0", &dns_plan(), &dir)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("Access denied"), "{e}");
        assert_eq!(lx.runner().resolved.as_ref().unwrap()["mvt0"].len(), 1);
        let journal = journal::read(&journal::path_for(&dir, "mvt0")).unwrap();
        assert!(journal.changes.contains(&Change::ResolvedLink {
            link: "mvt0".into()
        }));
        host::restore(&mut lx, applied).await.unwrap();
        assert!(lx.runner().resolved.as_ref().unwrap().is_empty());
    }

    /// resolv.conf names resolved's stub, but resolved does not answer (stopped, its runtime
    /// directory left behind): the fallback rewrites resolv.conf, and restore puts the
    /// original back byte for byte.
    #[tokio::test]
    async fn without_a_running_resolved_resolv_conf_is_rewritten_and_put_back() {
        let dir = tmp("resolvconf");
        let original = "# from dhcp\nnameserver 127.0.0.53\nsearch corp.example\n";
        std::fs::write(dir.join("resolv.conf"), original).unwrap();
        std::fs::create_dir_all(dir.join("resolve")).unwrap();
        let mut lx = linux(FakeLinux::default(), &dir);
        let state = dir.join("state");
        let mut applied = host::apply(&mut lx, &plan(&["10.0.0.0/16"], &[]), &state)
            .await
            .unwrap();
        lx.runner.ran.clear();
        let backend = host::apply_dns(&mut lx, &mut applied, "mvt0", &dns_plan(), &state)
            .await
            .unwrap();
        assert_eq!(backend, DnsBackend::ResolvConf);
        assert_eq!(lx.runner().ran, ["resolvectl status"]);
        let now = std::fs::read_to_string(dir.join("resolv.conf")).unwrap();
        assert!(now.starts_with(dns::MARKER), "{now}");
        assert_eq!(dns::nameservers(&now), [IpAddr::from([198, 18, 0, 1])]);
        assert!(now.contains("\nsearch corp.example\n"), "{now}");
        let backup = dns::backup_path(&state, "mvt0");
        assert_eq!(std::fs::read_to_string(&backup).unwrap(), original);
        let journal = journal::read(&journal::path_for(&state, "mvt0")).unwrap();
        assert_eq!(
            journal.changes.last(),
            Some(&Change::ResolvConf {
                file: dir.join("resolv.conf"),
                backup: backup.clone()
            })
        );
        host::restore(&mut lx, applied).await.unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("resolv.conf")).unwrap(),
            original
        );
        assert!(!backup.exists());
    }

    #[tokio::test]
    async fn a_state_dir_with_whitespace_is_refused_before_anything_is_changed() {
        let dir = tmp("space");
        std::fs::write(dir.join("resolv.conf"), "nameserver 192.168.1.1\n").unwrap();
        let mut lx = linux(FakeLinux::default(), &dir);
        let state = dir.join("my state");
        let mut applied = host::apply(&mut lx, &plan(&["10.0.0.0/16"], &[]), &state)
            .await
            .unwrap();
        let e = host::apply_dns(&mut lx, &mut applied, "mvt0", &dns_plan(), &state)
            .await
            .unwrap_err();
        assert!(matches!(e, PlatformError::UnsafePath { .. }), "{e}");
        assert_eq!(
            std::fs::read_to_string(dir.join("resolv.conf")).unwrap(),
            "nameserver 192.168.1.1\n"
        );
        host::restore(&mut lx, applied).await.unwrap();
    }

    #[tokio::test]
    async fn preflight_refuses_a_network_reached_directly_and_reads_only_the_planned_families() {
        let dir = tmp("preflight");
        let mut fake = FakeLinux::default();
        let gw = |g: &str| eth0(Some(g), false);
        fake.routes
            .insert((MAIN, net("10.20.0.0/16")), gw("192.168.1.7"));
        fake.routes
            .insert((MAIN, net("10.99.0.2/32")), gw("192.168.1.1"));
        let mut lx = linux(fake, &dir);
        let e = host::preflight(&mut lx, &plan(&["192.168.0.0/16"], &[]), &dir)
            .await
            .unwrap_err();
        assert!(
            matches!(&e, PlatformError::RouteConflict { existing, dev, .. } if existing.to_string() == "192.168.1.0/24" && dev == "eth0"),
            "{e}"
        );
        assert_eq!(lx.runner().ran, ["ip -4 -j route show table main"]);
        // What `doctor` lists: routes through a gateway (a host route printed without its
        // prefix length) overlap without being cut off; fe80::/64 overlaps nothing.
        let both = plan(&["10.0.0.0/8", "fd00:1::/64"], &[]);
        let found = host::overlapping_routes(&mut lx, &both).await.unwrap();
        let overlap = |dst: &str, via: &str| ExistingRoute {
            dst: net(dst),
            dev: "eth0".into(),
            via: Some(via.parse().unwrap()),
            local: false,
            planned: net("10.0.0.0/8"),
        };
        assert_eq!(
            found,
            [
                overlap("10.20.0.0/16", "192.168.1.7"),
                overlap("10.99.0.2/32", "192.168.1.1")
            ]
        );
        assert_eq!(
            lx.runner().ran.last().map(String::as_str),
            Some("ip -6 -j route show table main")
        );
        // No route at all to a jump host: said plainly.
        lx.runner.routes.clear();
        let e = host::preflight(&mut lx, &plan(&["10.0.0.0/8"], &["10.99.0.2"]), &dir)
            .await
            .unwrap_err();
        assert!(matches!(e, PlatformError::NoPathTo { .. }), "{e}");
    }

    #[test]
    fn only_a_missing_object_counts_as_already_undone() {
        let failed = |stderr: &str| PlatformError::Command {
            cmd: "ip".into(),
            stderr: stderr.into(),
        };
        assert!(says_absent(&failed("RTNETLINK answers: No such process")));
        assert!(says_absent(&failed(
            "RTNETLINK answers: No such file or directory"
        )));
        assert!(says_absent(&failed("Device \"mvt0\" does not exist.")));
        assert!(!says_absent(&failed(
            "RTNETLINK answers: Operation not permitted"
        )));
        let spawn = PlatformError::Spawn {
            cmd: "ip".into(),
            source: std::io::Error::from_raw_os_error(24),
        };
        assert!(!says_absent(&spawn), "EMFILE is not 'already gone'");
    }
}
