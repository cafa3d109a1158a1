//! Windows: addresses and routes on the wintun adapter through the IP Helper API, the jump
//! host's bypass route on its current interface, and split DNS through a Name Resolution Policy
//! Table (NRPT) rule: the per-namespace rules Windows' DNS client honours (as Tailscale and
//! corporate VPN clients use them), one registry key under the DNS client's `DnsPolicyConfig`
//! naming the zones and the responder. Every change is journaled before it is made and undone
//! in reverse by `down` or, after a crash, by the next start or `down --force` (the shared
//! driver in `host.rs`).
//!
//! This file maps each [`Change`] to the exact API operations ([`Call`]) that make or undo it,
//! over an [`Api`]: the real one (`win32.rs`, the only Windows file with `unsafe`) calls
//! `CreateUnicastIpAddressEntry`, `CreateIpForwardEntry2`, `GetBestRoute2`,
//! `GetIpForwardTable2` and the registry; the tests here record the calls on any OS. The MTU is
//! set when the adapter is created (the `tun` crate), and the adapter itself is removed by
//! wintun when its owner process exits.

use std::net::IpAddr;

use ipnet::IpNet;

use crate::dns::{DnsBackend, DnsPlan};
use crate::host::{self, Backend, RouteEntry};
use crate::journal::Change;
#[cfg(windows)]
use crate::{ExistingRoute, Preflight};
use crate::{PathInfo, PlatformError, RoutePlan};
#[cfg(windows)]
use std::path::Path;

/// The registry key (under HKLM) holding the DNS client's local NRPT rules.
pub const NRPT_ROOT: &str =
    r"SYSTEM\CurrentControlSet\Services\Dnscache\Parameters\DnsPolicyConfig";

/// One operation of the Windows host API, as this backend asks for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Call {
    /// `CreateUnicastIpAddressEntry` on the interface `luid`.
    AddAddress {
        /// The interface.
        luid: u64,
        /// The address, as a host prefix.
        addr: IpNet,
    },
    /// `DeleteUnicastIpAddressEntry`.
    DeleteAddress {
        /// The interface.
        luid: u64,
        /// The address.
        addr: IpNet,
    },
    /// `CreateIpForwardEntry2`: a route into `luid`, on-link when `next_hop` is `None`.
    AddRoute {
        /// The interface.
        luid: u64,
        /// The destination.
        dst: IpNet,
        /// The gateway.
        next_hop: Option<IpAddr>,
    },
    /// `DeleteIpForwardEntry2`.
    DeleteRoute {
        /// The interface.
        luid: u64,
        /// The destination.
        dst: IpNet,
        /// The gateway.
        next_hop: Option<IpAddr>,
    },
    /// Creates the NRPT rule `key` (`Name` = `names`, `GenericDNSServers` = `server`,
    /// `ConfigOptions` = 8, `Version` = 2).
    SetNrptRule {
        /// The rule's key under [`NRPT_ROOT`].
        key: String,
        /// The namespaces, each with a leading dot (suffix match).
        names: Vec<String>,
        /// The DNS server for them.
        server: IpAddr,
    },
    /// Deletes the NRPT rule `key`.
    DeleteNrptRule {
        /// The rule's key under [`NRPT_ROOT`].
        key: String,
    },
    /// Tells the DNS client to re-read its policy and flushes its cache.
    RefreshDns,
}

/// The Windows host API this backend needs.
pub trait Api {
    /// The LUID of the interface named `alias`.
    fn luid(&mut self, alias: &str) -> Result<u64, PlatformError>;
    /// The current best route to `addr`: gateway and interface LUID (`GetBestRoute2`).
    fn best_route(&mut self, addr: IpAddr) -> Result<(Option<IpAddr>, u64), PlatformError>;
    /// Every route (`GetIpForwardTable2`).
    fn routes(&mut self) -> Result<Vec<RouteEntry>, PlatformError>;
    /// Makes one call; `Ok(false)` if it found nothing to delete.
    fn call(&mut self, call: &Call) -> Result<bool, PlatformError>;
    /// True if process `pid` is running.
    fn pid_alive(&self, pid: i32) -> bool;
}

/// The NRPT rule key of the session on `tun`: GUID-shaped (as the DNS client's own rules are),
/// fixed per TUN name so that a crashed session's rule is found again.
pub fn nrpt_key(tun: &str) -> String {
    let hash = tun.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!(
        "{{6d73652d-7670-6e00-{:04x}-{:012x}}}",
        hash >> 48,
        hash & 0xffff_ffff_ffff
    )
}

/// The calls that make `change` (bypass routes name their interface by LUID in `dev`).
pub fn make_calls(change: &Change, tun_luid: u64, plan: Option<&DnsPlan>) -> Vec<Call> {
    match change {
        Change::Addr { addr, .. } => vec![Call::AddAddress {
            luid: tun_luid,
            addr: *addr,
        }],
        Change::Route { dst, .. } => vec![Call::AddRoute {
            luid: tun_luid,
            dst: *dst,
            next_hop: None,
        }],
        Change::Bypass { dst, via, dev } => vec![Call::AddRoute {
            luid: dev.parse().unwrap_or_default(),
            dst: *dst,
            next_hop: *via,
        }],
        Change::NrptRule { key } => match plan {
            Some(p) => vec![
                Call::SetNrptRule {
                    key: key.clone(),
                    names: p
                        .zones
                        .iter()
                        .map(|z| format!(".{}", z.trim_end_matches('.')))
                        .collect(),
                    server: p.server.ip(),
                },
                Call::RefreshDns,
            ],
            None => Vec::new(),
        },
        _ => Vec::new(),
    }
}

/// The calls that undo `change`; `None` where nothing is to be done (the adapter goes with its
/// process). Addresses and routes on the TUN need its LUID, which `tun_luid` looks up (the
/// adapter may already be gone: then so are they).
pub fn undo_calls(change: &Change, tun_luid: Option<u64>) -> Option<Vec<Call>> {
    Some(match change {
        Change::Addr { addr, .. } => vec![Call::DeleteAddress {
            luid: tun_luid?,
            addr: *addr,
        }],
        Change::Route { dst, .. } => vec![Call::DeleteRoute {
            luid: tun_luid?,
            dst: *dst,
            next_hop: None,
        }],
        Change::Bypass { dst, via, dev } => vec![Call::DeleteRoute {
            luid: dev.parse().ok()?,
            dst: *dst,
            next_hop: *via,
        }],
        Change::NrptRule { key } => {
            vec![Call::DeleteNrptRule { key: key.clone() }, Call::RefreshDns]
        }
        _ => return None,
    })
}

/// The Windows backend over an [`Api`].
#[derive(Debug)]
pub struct Windows<A> {
    api: A,
}

impl<A: Api> Windows<A> {
    /// A backend calling `api`.
    pub fn new(api: A) -> Self {
        Windows { api }
    }

    /// The API (tests read what it recorded).
    #[cfg(test)]
    pub fn api(&self) -> &A {
        &self.api
    }

    fn run(&mut self, calls: Vec<Call>) -> Result<bool, PlatformError> {
        let mut any = false;
        for c in &calls {
            any |= self.api.call(c)?;
        }
        Ok(any)
    }

    fn tun_of(change: &Change) -> Option<&str> {
        match change {
            Change::Addr { dev, .. } | Change::Route { dev, .. } => Some(dev),
            _ => None,
        }
    }
}

impl<A: Api> Backend for Windows<A> {
    const DNS: DnsBackend = DnsBackend::Nrpt;

    fn pid_alive(&self, pid: i32) -> bool {
        self.api.pid_alive(pid)
    }

    async fn path_to(&mut self, addr: IpAddr) -> Result<PathInfo, PlatformError> {
        let (via, luid) = self
            .api
            .best_route(addr)
            .map_err(|_| PlatformError::NoPathTo { addr })?;
        Ok(PathInfo {
            via,
            dev: luid.to_string(),
        })
    }

    async fn routes(&mut self) -> Result<Vec<RouteEntry>, PlatformError> {
        self.api.routes()
    }

    async fn make(&mut self, change: &Change, _plan: &RoutePlan) -> Result<(), PlatformError> {
        let luid = match Self::tun_of(change) {
            Some(tun) => self.api.luid(tun)?,
            None => 0,
        };
        self.run(make_calls(change, luid, None)).map(drop)
    }

    fn dns_changes(&self, tun: &str, _plan: &DnsPlan) -> Vec<Change> {
        vec![Change::NrptRule { key: nrpt_key(tun) }]
    }

    async fn make_dns(
        &mut self,
        change: &Change,
        _tun: &str,
        plan: &DnsPlan,
    ) -> Result<(), PlatformError> {
        self.run(make_calls(change, 0, Some(plan))).map(drop)
    }

    async fn undo(&mut self, change: &Change) -> Result<bool, PlatformError> {
        let luid = match Self::tun_of(change) {
            Some(tun) => self.api.luid(tun).ok(),
            None => None,
        };
        match undo_calls(change, luid) {
            Some(calls) => self.run(calls),
            None => Ok(false),
        }
    }
}

#[cfg(windows)]
fn system() -> Windows<crate::win32::Win32> {
    Windows::new(crate::win32::Win32)
}

/// The changes one session made.
#[cfg(windows)]
#[derive(Debug)]
pub struct Applied(host::Applied);

#[cfg(windows)]
pub async fn preflight(plan: &RoutePlan, state_dir: &Path) -> Result<Preflight, PlatformError> {
    host::preflight(&mut system(), plan, state_dir).await
}

#[cfg(windows)]
pub async fn overlapping_routes(plan: &RoutePlan) -> Result<Vec<ExistingRoute>, PlatformError> {
    host::overlapping_routes(&mut system(), plan).await
}

#[cfg(windows)]
pub async fn apply(plan: &RoutePlan, state_dir: &Path) -> Result<Applied, PlatformError> {
    host::apply(&mut system(), plan, state_dir)
        .await
        .map(Applied)
}

#[cfg(windows)]
pub async fn apply_dns(
    applied: &mut Applied,
    tun: &str,
    plan: &DnsPlan,
    _state_dir: &Path,
) -> Result<DnsBackend, PlatformError> {
    host::apply_dns(&mut system(), &mut applied.0, tun, plan).await
}

#[cfg(windows)]
pub async fn restore(applied: Applied) -> Result<(), PlatformError> {
    host::restore(&mut system(), applied.0).await
}

#[cfg(windows)]
pub async fn repair(state_dir: &Path) -> Result<Vec<Change>, PlatformError> {
    host::repair(&mut system(), state_dir).await
}

#[cfg(windows)]
pub fn pid_alive(pid: i32) -> bool {
    crate::process::pid_alive(pid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PlanSpec;

    const TUN_LUID: u64 = 0x0047_0000_0100_0000;
    const ETH_LUID: u64 = 0x0006_0000_0200_0000;

    /// Records every call; the TUN exists unless `gone`; one call may fail.
    #[derive(Default)]
    struct Recorder {
        calls: Vec<Call>,
        gone: bool,
        fail: Option<Call>,
    }

    impl Api for Recorder {
        fn luid(&mut self, alias: &str) -> Result<u64, PlatformError> {
            if self.gone || alias != "mse0" {
                return Err(PlatformError::Os {
                    call: format!("ConvertInterfaceAliasToLuid({alias})"),
                    source: std::io::Error::from_raw_os_error(2),
                });
            }
            Ok(TUN_LUID)
        }
        fn best_route(&mut self, _: IpAddr) -> Result<(Option<IpAddr>, u64), PlatformError> {
            Ok((Some("192.168.1.1".parse().unwrap()), ETH_LUID))
        }
        fn routes(&mut self) -> Result<Vec<RouteEntry>, PlatformError> {
            Ok(vec![RouteEntry {
                dst: "192.168.1.0/24".parse().unwrap(),
                dev: ETH_LUID.to_string(),
                via: None,
                local: true,
            }])
        }
        fn call(&mut self, call: &Call) -> Result<bool, PlatformError> {
            self.calls.push(call.clone());
            if self.fail.as_ref() == Some(call) {
                return Err(PlatformError::Os {
                    call: "CreateIpForwardEntry2".into(),
                    source: std::io::Error::from_raw_os_error(5010),
                });
            }
            Ok(true)
        }
        fn pid_alive(&self, pid: i32) -> bool {
            pid as u32 == std::process::id()
        }
    }

    fn plan(cidrs: &[&str], jump: &[&str]) -> RoutePlan {
        RoutePlan::new(PlanSpec {
            cidrs: cidrs.iter().map(|c| c.parse().unwrap()).collect(),
            excludes: Vec::new(),
            jump_addrs: jump.iter().map(|a| a.parse().unwrap()).collect(),
            tun_name: "mse0".into(),
            mtu: 65_000,
        })
        .unwrap()
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn tmp(name: &str) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("mse-vpn-windows-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[tokio::test]
    async fn apply_makes_the_exact_api_calls_and_restore_undoes_them() {
        let dir = tmp("apply");
        let mut win = Windows::new(Recorder::default());
        let p = plan(&["10.0.0.0/8", "fd00:1::/64"], &["10.99.0.2"]);
        let mut applied = host::apply(&mut win, &p, &dir).await.unwrap();
        let dns = DnsPlan {
            server: "198.18.0.1:53".parse().unwrap(),
            zones: vec!["internal".into(), "0.10.in-addr.arpa".into()],
        };
        assert_eq!(
            host::apply_dns(&mut win, &mut applied, "mse0", &dns)
                .await
                .unwrap(),
            DnsBackend::Nrpt
        );
        let key = nrpt_key("mse0");
        assert_eq!(
            win.api().calls,
            [
                Call::AddAddress {
                    luid: TUN_LUID,
                    addr: net("198.18.0.1/32")
                },
                Call::AddAddress {
                    luid: TUN_LUID,
                    addr: net("fd6d:7365:7670:6e00::1/128")
                },
                Call::AddRoute {
                    luid: ETH_LUID,
                    dst: net("10.99.0.2/32"),
                    next_hop: Some("192.168.1.1".parse().unwrap())
                },
                Call::AddRoute {
                    luid: TUN_LUID,
                    dst: net("10.0.0.0/8"),
                    next_hop: None
                },
                Call::AddRoute {
                    luid: TUN_LUID,
                    dst: net("fd00:1::/64"),
                    next_hop: None
                },
                Call::SetNrptRule {
                    key: key.clone(),
                    names: vec![".internal".into(), ".0.10.in-addr.arpa".into()],
                    server: "198.18.0.1".parse().unwrap()
                },
                Call::RefreshDns,
            ]
        );
        let journal = crate::journal::read(&crate::journal::path_for(&dir, "mse0")).unwrap();
        let lines: Vec<String> = journal.changes.iter().map(ToString::to_string).collect();
        assert_eq!(
            lines,
            [
                "link mse0".to_owned(),
                "addr 198.18.0.1/32 mse0".into(),
                "addr fd6d:7365:7670:6e00::1/128 mse0".into(),
                format!("bypass 10.99.0.2/32 via 192.168.1.1 dev {ETH_LUID}"),
                "route 10.0.0.0/8 mse0".into(),
                "route fd00:1::/64 mse0".into(),
                format!("nrpt-rule {key}"),
            ]
        );
        win.api.calls.clear();
        host::restore(&mut win, applied).await.unwrap();
        assert_eq!(
            win.api().calls,
            [
                Call::DeleteNrptRule { key },
                Call::RefreshDns,
                Call::DeleteRoute {
                    luid: TUN_LUID,
                    dst: net("fd00:1::/64"),
                    next_hop: None
                },
                Call::DeleteRoute {
                    luid: TUN_LUID,
                    dst: net("10.0.0.0/8"),
                    next_hop: None
                },
                Call::DeleteRoute {
                    luid: ETH_LUID,
                    dst: net("10.99.0.2/32"),
                    next_hop: Some("192.168.1.1".parse().unwrap())
                },
                Call::DeleteAddress {
                    luid: TUN_LUID,
                    addr: net("fd6d:7365:7670:6e00::1/128")
                },
                Call::DeleteAddress {
                    luid: TUN_LUID,
                    addr: net("198.18.0.1/32")
                },
            ]
        );
        assert!(!crate::journal::path_for(&dir, "mse0").exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_failed_call_undoes_what_was_done() {
        let dir = tmp("fail");
        let route = Call::AddRoute {
            luid: TUN_LUID,
            dst: net("10.0.0.0/16"),
            next_hop: None,
        };
        let mut win = Windows::new(Recorder {
            fail: Some(route.clone()),
            ..Recorder::default()
        });
        let e = host::apply(&mut win, &plan(&["10.0.0.0/16"], &[]), &dir)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("CreateIpForwardEntry2"), "{e}");
        // The route that failed is journaled as not made, and not undone.
        assert_eq!(
            &win.api().calls[1..],
            [
                route,
                Call::DeleteAddress {
                    luid: TUN_LUID,
                    addr: net("198.18.0.1/32")
                },
            ]
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn repair_after_a_crash_removes_the_bypass_route_and_the_nrpt_rule() {
        let dir = tmp("repair");
        let path = crate::journal::path_for(&dir, "mse0");
        let mut j = crate::journal::Journal::create(&path, 1).unwrap();
        let key = nrpt_key("mse0");
        for line in [
            "link mse0".to_owned(),
            "addr 198.18.0.1/32 mse0".into(),
            format!("bypass 10.99.0.2/32 via 192.168.1.1 dev {ETH_LUID}"),
            "route 10.0.0.0/8 mse0".into(),
            format!("nrpt-rule {key}"),
        ] {
            j.record(&Change::parse(&line).unwrap()).unwrap();
        }
        drop(j);
        // The adapter went with the crashed process, and its addresses and routes with it.
        let mut win = Windows::new(Recorder {
            gone: true,
            ..Recorder::default()
        });
        let undone = host::repair(&mut win, &dir).await.unwrap();
        assert_eq!(
            win.api().calls,
            [
                Call::DeleteNrptRule { key },
                Call::RefreshDns,
                Call::DeleteRoute {
                    luid: ETH_LUID,
                    dst: net("10.99.0.2/32"),
                    next_hop: Some("192.168.1.1".parse().unwrap())
                },
            ]
        );
        assert_eq!(undone.len(), 2);
        assert!(!path.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn preflight_refuses_the_lan_and_finds_the_jump_hosts_path() {
        let dir = tmp("preflight");
        let mut win = Windows::new(Recorder::default());
        let e = host::preflight(&mut win, &plan(&["192.168.0.0/16"], &[]), &dir)
            .await
            .unwrap_err();
        assert!(matches!(e, PlatformError::RouteConflict { .. }), "{e}");
        let pre = host::preflight(&mut win, &plan(&["10.0.0.0/8"], &["10.99.0.2"]), &dir)
            .await
            .unwrap();
        assert_eq!(pre.bypass_paths[0].1.dev, ETH_LUID.to_string());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn nrpt_keys_are_guid_shaped_and_fixed_per_tun() {
        let k = nrpt_key("mse0");
        assert_eq!(k, nrpt_key("mse0"));
        assert_ne!(k, nrpt_key("mse1"));
        assert_eq!(k.len(), 38, "{k}");
        assert!(
            k.starts_with("{6d73652d-7670-6e00-") && k.ends_with('}'),
            "{k}"
        );
        assert!(!k.contains(char::is_whitespace));
    }
}
