//! The rootless mode's namespace (`mse-vpn run --cidr ... --proxy ... -- APP` as an ordinary
//! user, Linux only): the app gets a network of its own, whose only way out is a TUN device
//! that mse-vpn, staying in the host's namespace, reads and writes.
//!
//! ```text
//!  mse-vpn (host namespaces, the user's uid)           helper = `mse-vpn __netns-init`
//!  ─────────────────────────────────────────           ─────────────────────────────────
//!  Namespace::create ──spawn (SEQPACKET pair)──▶ unshare(user+net+mount), uid/gid maps
//!                                                lo up; /dev/net/tun, TUNSETIFF; `ip` sets
//!                                                address, MTU, routes; a private resolv.conf
//!                                                nested user namespace: the user's own uid
//!  TUN fd ◀───────────── "T" + SCM_RIGHTS ────── (no capabilities left after exec)
//!  the session comes up on that TUN
//!  Namespace::start_app ── "G" + env ──────────▶ execvpe(APP): the helper's pid is the app's
//!  EOF (exec'd) or "E" (why not) ◀──────────────
//! ```
//!
//! Nothing on the host changes: no route, no file, no device outside the app's namespace;
//! the kernel removes the namespace (and the TUN) when its last process exits, after a
//! `kill -9` too. What it never does: carry packets (the session's driver does), or keep a
//! journal (there is nothing to undo).
//!
//! The pure parts ([`NetnsSpec`]: the helper's arguments and `ip` commands; [`resolv_conf`];
//! [`UsernsSysctls`]: which setting keeps user namespaces off) build on every OS for the unit
//! tests; the namespace itself is Linux's (elsewhere [`Namespace::create`] answers
//! [`NamespaceError::Unsupported`]).

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use thiserror::Error;

use crate::plan::RoutePlan;

/// The first argument that makes `mse-vpn` the namespace helper (hidden from `--help`).
pub const INIT_ARG: &str = "__netns-init";

/// What the app's network namespace holds: its TUN, addresses and routes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetnsSpec {
    /// The TUN device's name inside the namespace.
    pub tun: String,
    /// Its MTU.
    pub mtu: u32,
    /// Its IPv4 address (the app's source address; the engine's local address).
    pub v4: Ipv4Addr,
    /// Its IPv6 address, when IPv6 is routed.
    pub v6: Option<Ipv6Addr>,
    /// The networks routed into the TUN (the VPC CIDRs less the excludes).
    pub routes: Vec<IpNet>,
    /// The split-DNS responder's address, routed into the TUN: the app's resolv.conf names
    /// it. `None`: the app keeps the host's resolv.conf.
    pub dns: Option<Ipv4Addr>,
    /// Everything else goes into the TUN too (default routes), for a session that carries
    /// flows to addresses outside the VPC. Without it only the routes above (and replies to
    /// cloud callers) do; other destinations are unreachable at once.
    pub outside: bool,
    /// The table holding the TUN's default route for replies to cloud callers (when not
    /// `outside`).
    pub reply_table: u32,
}

/// The rule priority of the reply rule inside the namespace (after `local`, before `main`).
const REPLY_RULE_PRIORITY: u32 = 32_000;

impl NetnsSpec {
    /// The namespace for `plan` (built with no jump-host addresses: in this mode mse-vpn's own
    /// connections never enter the namespace). `dns`: the app resolves through the session's
    /// responder; `outside`: the session carries every destination (default routes).
    pub fn new(plan: &RoutePlan, dns: bool, outside: bool) -> NetnsSpec {
        let v4 = plan.tun_v4();
        let mut v6 = plan.tun_v6();
        if outside && v6.is_none() {
            // IPv6 destinations outside the VPC need a source address too.
            v6 = Some(Ipv6Addr::new(0xfd6d, 0x7365, 0x7670, 0x6e00, 0, 0, 0, 1))
                .filter(|a| !plan.carries(IpAddr::V6(*a)));
        }
        // The responder lives next to the TUN's address, after the host's loopback alias.
        let dns = dns
            .then(|| neighbours(v4, |a| plan.carries(IpAddr::V4(a))).nth(1))
            .flatten();
        NetnsSpec {
            tun: plan.tun_name().to_owned(),
            mtu: plan.mtu(),
            v4,
            v6,
            routes: plan.routes().to_vec(),
            dns,
            outside,
            reply_table: plan.reply_table(),
        }
    }

    /// The helper's arguments for this spec (after [`INIT_ARG`], before `--` and the app).
    pub fn args(&self) -> Vec<String> {
        let mut a = vec![
            "--tun".to_owned(),
            self.tun.clone(),
            "--mtu".to_owned(),
            self.mtu.to_string(),
            "--v4".to_owned(),
            self.v4.to_string(),
            "--table".to_owned(),
            self.reply_table.to_string(),
        ];
        if let Some(v6) = self.v6 {
            a.extend(["--v6".to_owned(), v6.to_string()]);
        }
        for r in &self.routes {
            a.extend(["--route".to_owned(), r.to_string()]);
        }
        if let Some(d) = self.dns {
            a.extend(["--dns".to_owned(), d.to_string()]);
        }
        if self.outside {
            a.push("--outside".to_owned());
        }
        a
    }

    /// Parses what [`NetnsSpec::args`] made; `None` for anything else (the helper and its
    /// parent are the same binary: a mismatch is a bug, not a user's mistake).
    pub fn parse(args: &[String]) -> Option<NetnsSpec> {
        let mut spec = NetnsSpec {
            tun: String::new(),
            mtu: 0,
            v4: Ipv4Addr::UNSPECIFIED,
            v6: None,
            routes: Vec::new(),
            dns: None,
            outside: false,
            reply_table: 0,
        };
        let mut it = args.iter();
        while let Some(flag) = it.next() {
            match flag.as_str() {
                "--outside" => spec.outside = true,
                "--tun" => spec.tun = it.next()?.clone(),
                "--mtu" => spec.mtu = it.next()?.parse().ok()?,
                "--v4" => spec.v4 = it.next()?.parse().ok()?,
                "--v6" => spec.v6 = Some(it.next()?.parse().ok()?),
                "--route" => spec.routes.push(it.next()?.parse().ok()?),
                "--dns" => spec.dns = Some(it.next()?.parse().ok()?),
                "--table" => spec.reply_table = it.next()?.parse().ok()?,
                _ => return None,
            }
        }
        let name_ok = !spec.tun.is_empty()
            && spec.tun.len() < 16
            && spec
                .tun
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        (name_ok && spec.mtu > 0 && !spec.v4.is_unspecified()).then_some(spec)
    }

    /// The address that stands for this host's loopback inside the namespace, with outside
    /// traffic: the first address next to the TUN's that no route claims (198.18.0.2 for a
    /// TUN at 198.18.0.1; slirp's 10.0.2.2). The DNS responder's is the next one.
    pub fn host_loopback(&self) -> Option<Ipv4Addr> {
        let vpc = |a: Ipv4Addr| self.routes.iter().any(|r| r.contains(&IpAddr::V4(a)));
        self.outside
            .then(|| neighbours(self.v4, vpc).next())
            .flatten()
    }

    /// True when the routes (or the default routes) send `addr` into the TUN.
    fn routed(&self, addr: IpAddr) -> bool {
        self.outside || self.routes.iter().any(|r| r.contains(&addr))
    }

    /// The `ip` commands (without `ip` itself) that set up the namespace once the TUN exists:
    /// loopback up, the TUN's MTU, addresses and routes (each naming the TUN's address of its
    /// family as the source), the responder's address, and either default routes (`outside`)
    /// or the reply rule that sends answers to cloud callers back into the TUN.
    pub fn ip_commands(&self) -> Vec<Vec<String>> {
        let t = self.tun.as_str();
        let v4 = self.v4.to_string();
        let v6 = self.v6.map(|a| a.to_string());
        let w = |words: &[&str]| words.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let mut c = vec![
            w(&["link", "set", "dev", "lo", "up"]),
            w(&["link", "set", "dev", t, "mtu", &self.mtu.to_string(), "up"]),
            w(&["-4", "addr", "add", &format!("{v4}/32"), "dev", t]),
        ];
        if let Some(v6) = &v6 {
            c.push(w(&[
                "-6",
                "addr",
                "add",
                &format!("{v6}/128"),
                "dev",
                t,
                "nodad",
            ]));
        }
        for r in &self.routes {
            let (fam, src) = match r {
                IpNet::V4(_) => ("-4", Some(&v4)),
                IpNet::V6(_) => ("-6", v6.as_ref()),
            };
            let dst = r.to_string();
            let mut cmd = w(&[fam, "route", "add", &dst, "dev", t]);
            if let Some(src) = src {
                cmd.extend(w(&["src", src]));
            }
            c.push(cmd);
        }
        if let Some(d) = self.dns.filter(|d| !self.routed(IpAddr::V4(*d))) {
            c.push(w(&[
                "-4",
                "route",
                "add",
                &format!("{d}/32"),
                "dev",
                t,
                "src",
                &v4,
            ]));
        }
        let families = [("-4", Some(&v4)), ("-6", v6.as_ref())];
        for (fam, src) in families {
            let Some(src) = src else { continue };
            if self.outside {
                c.push(w(&[fam, "route", "add", "default", "dev", t, "src", src]));
            } else {
                let table = self.reply_table.to_string();
                c.push(w(&[
                    fam, "route", "add", "default", "dev", t, "table", &table,
                ]));
                c.push(w(&[
                    fam,
                    "rule",
                    "add",
                    "from",
                    src,
                    "priority",
                    &REPLY_RULE_PRIORITY.to_string(),
                    "lookup",
                    &table,
                ]));
            }
        }
        c
    }
}

/// The addresses after `v4` in its /24 that `carried` (the VPC routes) does not claim: the
/// host's loopback alias first, then the DNS responder's.
fn neighbours(v4: Ipv4Addr, carried: impl Fn(Ipv4Addr) -> bool) -> impl Iterator<Item = Ipv4Addr> {
    let [a, b, c, d] = v4.octets();
    (d.saturating_add(1)..=254)
        .map(move |last| Ipv4Addr::new(a, b, c, last))
        .filter(move |addr| !carried(*addr))
}

/// The app's resolv.conf: the responder at `dns` as its only nameserver, with the host's
/// `search`, `domain` and `options` lines kept (short names and `ndots` behave as before).
pub fn resolv_conf(host: &str, dns: Ipv4Addr) -> String {
    let mut out = format!(
        "# mse-vpn run: this app resolves through its session's split-DNS responder\nnameserver {dns}\n"
    );
    for line in host.lines() {
        if matches!(
            line.split_whitespace().next(),
            Some("search" | "domain" | "options")
        ) {
            out.push_str(line.trim());
            out.push('\n');
        }
    }
    out
}

/// The settings that can keep an ordinary user from creating user namespaces, as read from
/// `/proc/sys` (`None`: the setting does not exist on this kernel).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UsernsSysctls {
    /// `kernel.unprivileged_userns_clone` (Debian's and Ubuntu's older kernels): 0 forbids.
    pub unprivileged_userns_clone: Option<u64>,
    /// `user.max_user_namespaces` (per user namespace): 0 forbids.
    pub max_user_namespaces: Option<u64>,
    /// `kernel.apparmor_restrict_unprivileged_userns` (Ubuntu 23.10 and later): 1 lets
    /// unconfined programs create user namespaces but gives them no capabilities there.
    pub apparmor_restrict_unprivileged_userns: Option<u64>,
}

impl UsernsSysctls {
    /// The settings of this machine (for the caller's user namespace).
    pub fn read() -> UsernsSysctls {
        let read = |path: &str| {
            std::fs::read_to_string(path)
                .ok()
                .and_then(|t| parse_sysctl(&t))
        };
        UsernsSysctls {
            unprivileged_userns_clone: read("/proc/sys/kernel/unprivileged_userns_clone"),
            max_user_namespaces: read("/proc/sys/user/max_user_namespaces"),
            apparmor_restrict_unprivileged_userns: read(
                "/proc/sys/kernel/apparmor_restrict_unprivileged_userns",
            ),
        }
    }

    /// The setting that keeps user namespaces from an ordinary user, if one does.
    pub fn blocker(&self) -> Option<UsernsBlocker> {
        if self.unprivileged_userns_clone == Some(0) {
            Some(UsernsBlocker::CloneDisabled)
        } else if self.max_user_namespaces == Some(0) {
            Some(UsernsBlocker::NoneAllowed)
        } else if self
            .apparmor_restrict_unprivileged_userns
            .is_some_and(|v| v != 0)
        {
            Some(UsernsBlocker::AppArmor)
        } else {
            None
        }
    }
}

/// A sysctl file's value (one integer, whitespace around it).
pub fn parse_sysctl(text: &str) -> Option<u64> {
    text.trim().parse().ok()
}

/// The setting that keeps an ordinary user from creating user namespaces; the message names
/// it and the command that changes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
pub enum UsernsBlocker {
    /// `kernel.unprivileged_userns_clone = 0`.
    #[error(
        "unprivileged user namespaces are disabled (kernel.unprivileged_userns_clone = 0): allow them with `sudo sysctl -w kernel.unprivileged_userns_clone=1` (a line in /etc/sysctl.d/ keeps it)"
    )]
    CloneDisabled,
    /// `user.max_user_namespaces = 0`.
    #[error(
        "user namespaces are disabled (user.max_user_namespaces = 0): allow them with `sudo sysctl -w user.max_user_namespaces=15000` (a line in /etc/sysctl.d/ keeps it)"
    )]
    NoneAllowed,
    /// `kernel.apparmor_restrict_unprivileged_userns = 1`.
    #[error(
        "AppArmor gives unprivileged user namespaces no capabilities (kernel.apparmor_restrict_unprivileged_userns = 1): allow mse-vpn with an AppArmor profile holding the `userns,` rule (see the README), or `sudo sysctl -w kernel.apparmor_restrict_unprivileged_userns=0`"
    )]
    AppArmor,
}

/// Why the app's namespace could not be made, or the app not started. Each message says what
/// to change.
#[derive(Debug, Error)]
pub enum NamespaceError {
    /// This OS has no unprivileged network namespaces.
    #[error(
        "`run` with --cidr/--proxy (an app in a network of its own, without root) needs Linux: no equivalent exists on this system; use `sudo mse-vpn up`, then `mse-vpn run` without --cidr/--proxy"
    )]
    Unsupported,
    /// A system setting keeps user namespaces from ordinary users.
    #[error(
        "cannot give the app a network of its own: {0}; or put the whole machine inside with `sudo mse-vpn up`"
    )]
    Disabled(UsernsBlocker),
    /// Creating the user namespace failed for a reason no known setting explains.
    #[error(
        "cannot create a user namespace for the app ({0}): unprivileged user namespaces may be disabled here (a container, a security module); or put the whole machine inside with `sudo mse-vpn up`"
    )]
    UserNs(#[source] io::Error),
    /// `/dev/net/tun` is not open to this user.
    #[error(
        "cannot open /dev/net/tun as an ordinary user ({0}): it is mode 0600 here where most distributions ship 0666; allow it with `sudo chmod 0666 /dev/net/tun` (a udev rule `KERNEL==\"tun\", MODE=\"0666\"` keeps it), or use `sudo mse-vpn up`"
    )]
    TunDenied(#[source] io::Error),
    /// No `/dev/net/tun`.
    #[error(
        "/dev/net/tun does not exist: load the tun module (`sudo modprobe tun`); in a container, pass the device in"
    )]
    TunMissing,
    /// The TUN device could not be created inside the namespace.
    #[error("cannot create the TUN device {name} in the app's namespace: {source}")]
    Tun {
        /// Its name.
        name: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// No iproute2.
    #[error("no `ip` command to set up the app's network: install iproute2")]
    NoIp,
    /// An `ip` command failed inside the namespace.
    #[error("setting up the app's network failed: `{command}`: {stderr}")]
    Setup {
        /// The command.
        command: String,
        /// What it printed on stderr.
        stderr: String,
    },
    /// The app's resolv.conf could not be put in place.
    #[error("cannot point the app's /etc/resolv.conf at the split-DNS responder: {0}")]
    ResolvConf(#[source] io::Error),
    /// The app's program does not exist (exit status 127, as a shell's).
    #[error("cannot start {app}: command not found")]
    AppNotFound {
        /// As typed.
        app: String,
    },
    /// The app's program exists but cannot be run (exit status 126).
    #[error("cannot start {app}: {source}")]
    App {
        /// As typed.
        app: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The helper could not be started, or talking to it failed.
    #[error("the namespace helper (mse-vpn __netns-init) failed: {0}")]
    Helper(#[source] io::Error),
    /// The helper ended before it said why.
    #[error("the namespace helper (mse-vpn __netns-init) ended unexpectedly ({0})")]
    HelperEnded(String),
}

impl NamespaceError {
    /// The exit status a shell would give: 127 for a program not found, 126 for one that
    /// cannot run, else `None` (the caller's own).
    pub fn exit_code(&self) -> Option<u8> {
        match self {
            NamespaceError::AppNotFound { .. } => Some(127),
            NamespaceError::App { .. } => Some(126),
            _ => None,
        }
    }
}

/// Where the helper was when it failed (the first byte after `E` on the wire).
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    /// `unshare(CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWNS)`, or the nested user namespace.
    UserNs,
    /// Writing `uid_map`, `gid_map` or `setgroups`.
    IdMap,
    /// Opening `/dev/net/tun`.
    TunOpen,
    /// `TUNSETIFF`.
    TunDevice,
    /// No `ip` command.
    NoIp,
    /// An `ip` command failed (detail: the command, a tab, its stderr).
    Ip,
    /// Mounts, resolv.conf.
    Mount,
    /// `execvpe` of the app (detail: the app).
    Exec,
    /// Anything else (a protocol error).
    Other,
}

#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
impl Stage {
    const ALL: [(Stage, u8); 9] = [
        (Stage::UserNs, b'u'),
        (Stage::IdMap, b'm'),
        (Stage::TunOpen, b't'),
        (Stage::TunDevice, b'd'),
        (Stage::NoIp, b'i'),
        (Stage::Ip, b'c'),
        (Stage::Mount, b'r'),
        (Stage::Exec, b'x'),
        (Stage::Other, b'o'),
    ];

    fn code(self) -> u8 {
        Stage::ALL
            .iter()
            .find(|(s, _)| *s == self)
            .map_or(b'o', |c| c.1)
    }

    fn of(code: u8) -> Stage {
        Stage::ALL
            .iter()
            .find(|(_, c)| *c == code)
            .map_or(Stage::Other, |c| c.0)
    }
}

#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
/// A failure report of the helper: `E`, the stage, the errno (decimal), a NUL, the detail.
fn failure_message(stage: Stage, errno: i32, detail: &str) -> Vec<u8> {
    let mut m = vec![b'E', stage.code()];
    m.extend_from_slice(errno.to_string().as_bytes());
    m.push(0);
    m.extend_from_slice(detail.as_bytes());
    m
}

#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
/// The error a failure report stands for; `blocker` is consulted for permission failures
/// on the namespace's way up (a security setting shows up as EPERM/ENOSPC there).
fn failure_error(msg: &[u8], blocker: impl FnOnce() -> Option<UsernsBlocker>) -> NamespaceError {
    let (stage, rest) = match msg {
        [b'E', code, rest @ ..] => (Stage::of(*code), rest),
        _ => return NamespaceError::HelperEnded("a malformed report".to_owned()),
    };
    let (errno, detail) = match rest.iter().position(|b| *b == 0) {
        Some(i) => (
            &rest[..i],
            String::from_utf8_lossy(&rest[i + 1..]).into_owned(),
        ),
        None => (rest, String::new()),
    };
    let errno: i32 = std::str::from_utf8(errno)
        .ok()
        .and_then(|e| e.parse().ok())
        .unwrap_or(0);
    let source = io::Error::from_raw_os_error(errno);
    // A security setting shows up as EPERM, EACCES or ENOSPC anywhere on the namespace's way
    // up (AppArmor's restriction only at the first privileged operation in it).
    let refused = matches!(errno, EPERM | EACCES | ENOSPC);
    if ((refused
        && matches!(
            stage,
            Stage::IdMap | Stage::TunDevice | Stage::Ip | Stage::Mount
        ))
        || stage == Stage::UserNs)
        && let Some(b) = blocker()
    {
        return NamespaceError::Disabled(b);
    }
    match stage {
        Stage::UserNs | Stage::IdMap => NamespaceError::UserNs(source),
        Stage::TunOpen if matches!(errno, ENOENT | ENODEV | ENXIO) => NamespaceError::TunMissing,
        Stage::TunOpen => NamespaceError::TunDenied(source),
        Stage::TunDevice => NamespaceError::Tun {
            name: detail,
            source,
        },
        Stage::NoIp => NamespaceError::NoIp,
        Stage::Ip => {
            let (command, stderr) = detail.split_once('\t').unwrap_or((&detail, ""));
            NamespaceError::Setup {
                command: command.to_owned(),
                stderr: stderr.trim().to_owned(),
            }
        }
        Stage::Mount => NamespaceError::ResolvConf(source),
        Stage::Exec if errno == ENOENT => NamespaceError::AppNotFound { app: detail },
        Stage::Exec => NamespaceError::App {
            app: detail,
            source,
        },
        Stage::Other => NamespaceError::HelperEnded(detail),
    }
}

/// errno values the reports are read with (the same on every Linux architecture).
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
const EPERM: i32 = 1;
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
const ENOENT: i32 = 2;
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
const ENXIO: i32 = 6;
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
const EACCES: i32 = 13;
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
const ENODEV: i32 = 19;
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
const ENOSPC: i32 = 28;

/// The helper's side of the environment: the socket's descriptor and the parent's pid.
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
const SOCK_ENV: &str = "MSE_VPN_NETNS_SOCK";
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
const PARENT_ENV: &str = "MSE_VPN_NETNS_PARENT";

impl fmt::Display for NetnsSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let routes: Vec<String> = self.routes.iter().map(ToString::to_string).collect();
        write!(
            f,
            "{} ({}{}) → {}",
            self.tun,
            self.v4,
            self.v6.map(|a| format!(", {a}")).unwrap_or_default(),
            routes.join(", ")
        )
    }
}

#[cfg(target_os = "linux")]
mod linux;
#[cfg(target_os = "linux")]
pub use linux::{Namespace, init_main, user_state_dir};

/// The namespace of an app (not on this OS).
#[cfg(not(target_os = "linux"))]
pub struct Namespace(std::convert::Infallible);

#[cfg(not(target_os = "linux"))]
impl Namespace {
    /// No unprivileged network namespaces here: always [`NamespaceError::Unsupported`].
    pub fn create(
        _spec: &NetnsSpec,
        _app: &[std::ffi::OsString],
    ) -> Result<Namespace, NamespaceError> {
        Err(NamespaceError::Unsupported)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::PlanSpec;

    fn plan(cidrs: &[&str]) -> RoutePlan {
        RoutePlan::new(PlanSpec {
            cidrs: cidrs.iter().map(|c| c.parse().unwrap()).collect(),
            excludes: vec![],
            jump_addrs: vec![],
            tun_name: "mse0".into(),
            mtu: 65_000,
        })
        .unwrap()
    }

    fn line(words: &[String]) -> String {
        words.join(" ")
    }

    #[test]
    fn the_vpc_only_namespace_routes_the_cidrs_and_sends_replies_back() {
        let p = plan(&["10.0.0.0/16"]);
        let spec = NetnsSpec::new(&p, true, false);
        assert_eq!(spec.dns, Some(Ipv4Addr::new(198, 18, 0, 3)));
        assert_eq!(spec.host_loopback(), None, "only with outside traffic");
        let t = p.reply_table();
        let cmds: Vec<String> = spec.ip_commands().iter().map(|c| line(c)).collect();
        assert_eq!(
            cmds,
            [
                "link set dev lo up".to_owned(),
                "link set dev mse0 mtu 65000 up".into(),
                "-4 addr add 198.18.0.1/32 dev mse0".into(),
                "-4 route add 10.0.0.0/16 dev mse0 src 198.18.0.1".into(),
                "-4 route add 198.18.0.3/32 dev mse0 src 198.18.0.1".into(),
                format!("-4 route add default dev mse0 table {t}"),
                format!("-4 rule add from 198.18.0.1 priority 32000 lookup {t}"),
            ]
        );
    }

    #[test]
    fn the_loopback_alias_and_the_responder_skip_addresses_the_vpc_uses() {
        let spec = NetnsSpec::new(&plan(&["10.0.0.0/16", "198.18.0.2/31"]), true, true);
        assert_eq!(spec.v4, Ipv4Addr::new(198, 18, 0, 1));
        assert_eq!(spec.host_loopback(), Some(Ipv4Addr::new(198, 18, 0, 4)));
        assert_eq!(spec.dns, Some(Ipv4Addr::new(198, 18, 0, 5)));
    }

    #[test]
    fn outside_traffic_is_one_flag_default_routes_for_both_families() {
        let p = plan(&["10.0.0.0/16", "fd00:10::/64"]);
        let spec = NetnsSpec::new(&p, false, true);
        assert_eq!(spec.dns, None);
        let v6 = "fd6d:7365:7670:6e00::1";
        let cmds: Vec<String> = spec.ip_commands().iter().map(|c| line(c)).collect();
        assert_eq!(
            cmds,
            [
                "link set dev lo up".to_owned(),
                "link set dev mse0 mtu 65000 up".into(),
                "-4 addr add 198.18.0.1/32 dev mse0".into(),
                format!("-6 addr add {v6}/128 dev mse0 nodad"),
                "-4 route add 10.0.0.0/16 dev mse0 src 198.18.0.1".into(),
                format!("-6 route add fd00:10::/64 dev mse0 src {v6}"),
                "-4 route add default dev mse0 src 198.18.0.1".into(),
                format!("-6 route add default dev mse0 src {v6}"),
            ]
        );
        // With only IPv4 CIDRs, outside traffic still gets an IPv6 source address.
        let spec = NetnsSpec::new(&plan(&["10.0.0.0/16"]), true, true);
        assert_eq!(spec.v6, Some(v6.parse().unwrap()));
        assert_eq!(spec.host_loopback(), Some(Ipv4Addr::new(198, 18, 0, 2)));
        assert_eq!(spec.dns, Some(Ipv4Addr::new(198, 18, 0, 3)));
        let cmds: Vec<String> = spec.ip_commands().iter().map(|c| line(c)).collect();
        assert!(
            !cmds.iter().any(|c| c.contains("198.18.0.3/32")),
            "the default route carries the responder's address: {cmds:?}"
        );
    }

    #[test]
    fn the_helpers_arguments_round_trip_and_garbage_is_refused() {
        for (cidrs, dns, outside) in [
            (&["10.0.0.0/16"][..], true, false),
            (&["10.0.0.0/16", "fd00:10::/64"][..], false, true),
        ] {
            let spec = NetnsSpec::new(&plan(cidrs), dns, outside);
            assert_eq!(NetnsSpec::parse(&spec.args()), Some(spec.clone()));
        }
        let s = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert_eq!(
            NetnsSpec::parse(&s(&["--tun", "mse0", "--mtu", "1500"])),
            None
        );
        assert_eq!(
            NetnsSpec::parse(&s(&["--tun", "a b", "--mtu", "1500", "--v4", "1.2.3.4"])),
            None
        );
        assert_eq!(
            NetnsSpec::parse(&s(&[
                "--tun", "m", "--mtu", "1500", "--v4", "1.2.3.4", "--x"
            ])),
            None
        );
        assert_eq!(
            NetnsSpec::parse(&s(&["--tun", "m", "--mtu", "1500", "--v4"])),
            None
        );
        assert!(
            NetnsSpec::parse(&s(&["--tun", "m", "--mtu", "1500", "--v4", "1.2.3.4"])).is_some()
        );
    }

    #[test]
    fn the_apps_resolv_conf_names_the_responder_and_keeps_search_and_options() {
        let host = "# managed\nnameserver 127.0.0.53\nnameserver 192.168.1.1\nsearch corp.example\n  options ndots:2 edns0\nsortlist 10.0.0.0\n";
        assert_eq!(
            resolv_conf(host, Ipv4Addr::new(198, 18, 0, 2)),
            "# mse-vpn run: this app resolves through its session's split-DNS responder\nnameserver 198.18.0.2\nsearch corp.example\noptions ndots:2 edns0\n"
        );
    }

    #[test]
    fn each_setting_that_forbids_user_namespaces_is_named_with_its_fix() {
        assert_eq!(parse_sysctl("0\n"), Some(0));
        assert_eq!(parse_sysctl(" 96367 "), Some(96_367));
        assert_eq!(parse_sysctl("x"), None);
        let open = UsernsSysctls {
            unprivileged_userns_clone: None,
            max_user_namespaces: Some(96_367),
            apparmor_restrict_unprivileged_userns: Some(0),
        };
        assert_eq!(open.blocker(), None);
        let cases = [
            (
                UsernsSysctls {
                    unprivileged_userns_clone: Some(0),
                    ..open
                },
                UsernsBlocker::CloneDisabled,
                "sysctl -w kernel.unprivileged_userns_clone=1",
            ),
            (
                UsernsSysctls {
                    max_user_namespaces: Some(0),
                    ..open
                },
                UsernsBlocker::NoneAllowed,
                "sysctl -w user.max_user_namespaces=15000",
            ),
            (
                UsernsSysctls {
                    apparmor_restrict_unprivileged_userns: Some(1),
                    ..open
                },
                UsernsBlocker::AppArmor,
                "kernel.apparmor_restrict_unprivileged_userns=0",
            ),
        ];
        for (settings, blocker, fix) in cases {
            assert_eq!(settings.blocker(), Some(blocker));
            let msg = NamespaceError::Disabled(blocker).to_string();
            assert!(msg.contains(fix), "{msg}");
            assert!(msg.contains("sudo mse-vpn up"), "{msg}");
            assert!(!msg.contains('\n'), "one line: {msg}");
        }
    }

    #[test]
    fn the_helpers_reports_become_the_errors_users_read() {
        let none = || None;
        let report = |stage, errno, detail: &str| failure_message(stage, errno, detail);
        // A user namespace refused by a setting names the setting; by nothing known, says so.
        let e = failure_error(&report(Stage::UserNs, ENOSPC, ""), || {
            Some(UsernsBlocker::NoneAllowed)
        });
        assert!(
            e.to_string().contains("user.max_user_namespaces = 0"),
            "{e}"
        );
        let e = failure_error(&report(Stage::UserNs, 1, ""), none);
        assert!(matches!(e, NamespaceError::UserNs(_)), "{e}");
        // /dev/net/tun at mode 0600.
        let e = failure_error(&report(Stage::TunOpen, 13, ""), none);
        assert!(e.to_string().contains("chmod 0666 /dev/net/tun"), "{e}");
        assert!(matches!(
            failure_error(&report(Stage::TunOpen, ENOENT, ""), none),
            NamespaceError::TunMissing
        ));
        // AppArmor's restriction shows up later, as EPERM on TUNSETIFF.
        let e = failure_error(&report(Stage::TunDevice, 1, "mse0"), || {
            Some(UsernsBlocker::AppArmor)
        });
        assert!(e.to_string().contains("userns,"), "{e}");
        let e = failure_error(
            &report(Stage::Ip, 0, "ip route add x\tRTNETLINK: bad\n"),
            none,
        );
        assert_eq!(
            e.to_string(),
            "setting up the app's network failed: `ip route add x`: RTNETLINK: bad"
        );
        let e = failure_error(&report(Stage::Exec, ENOENT, "javaa"), none);
        assert_eq!(e.to_string(), "cannot start javaa: command not found");
        assert_eq!(e.exit_code(), Some(127));
        let e = failure_error(&report(Stage::Exec, 13, "./app"), none);
        assert_eq!(e.exit_code(), Some(126));
        assert!(matches!(
            failure_error(b"Zgarbage", none),
            NamespaceError::HelperEnded(_)
        ));
    }
}
