//! Windows: addresses and routes on the wintun adapter through the IP Helper API, the jump
//! host's bypass route on its current interface, and split DNS through a Name Resolution Policy
//! Table (NRPT) rule: the per-namespace rules Windows' DNS client honours (as Tailscale and
//! corporate VPN clients use them), one registry key under the DNS client's `DnsPolicyConfig`
//! naming the zones and the responder. Every change is journaled before it is made and undone
//! in reverse by `down` or, after a crash, by the next start or `down --force` (the shared
//! driver in `host.rs`).
//!
//! This file maps each [`Change`] to the exact API operations ([`Call`]) that make or undo it,
//! over an [`Api`]: the real one (`win32net.rs`, with `unsafe` code like `win32.rs`) calls
//! `CreateUnicastIpAddressEntry`, `CreateIpForwardEntry2`, `GetBestRoute2`,
//! `GetIpForwardTable2` and the registry; the tests here run against a fake Windows that answers
//! as the real one does (Win32 error codes, the registry's rules, the DNS client's choice of
//! NRPT key), on any OS. The MTU is set when the adapter is created (the `tun` crate), and the
//! adapter itself is removed by wintun when its owner process exits.
//!
//! What the real Windows does, and what is done about it:
//! - **NRPT**: rules under the Group Policy key ([`NRPT_POLICY_ROOT`]) take precedence over
//!   the local key: where policy rules exist (managed laptops, DirectAccess, Always On VPN),
//!   local ones are ignored. The rule is then written under both (as Tailscale's
//!   `nrpt_windows.go` does when foreign policy rules exist). `Version` is 1 (MS-GPNRPT
//!   2.2.2.3). The rule's key is volatile (`REG_OPTION_VOLATILE`): a crashed session's rule is
//!   gone at the next reboot even if nobody repairs it. A local rule needs only a DNS cache
//!   flush; a policy one a (non-forced) machine policy refresh as well.
//! - **The adapter** has a fixed GUID per TUN name ([`adapter_guid`]; with a random one
//!   Windows sees a new network, on the Public profile, every run), and is kept out of dynamic
//!   DNS registration, NetBIOS and LLMNR (as Tailscale's `manager_windows.go` does): a
//!   domain-joined laptop would otherwise register the TUN's address in Active Directory DNS.
//! - **IPv6**: the adapter's IPv6 interface appears a moment after the adapter (and never when
//!   IPv6 is disabled); until then address and route calls fail with `ERROR_NOT_FOUND`. The
//!   first IPv6 change waits for it ([`IPV6_WAIT`]) and says plainly when it never comes.
//! - **Journals** are repaired only when owned by SYSTEM or Administrators
//!   ([`trusted_owner`]):
//!   the state directory gets an explicit ACL (`win32.rs`), and a journal someone else planted
//!   would otherwise make an elevated `up` or `down` delete what it names.

use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use ipnet::IpNet;

use crate::account::trusted_owner;
use crate::dns::{DnsBackend, DnsPlan};
use crate::error::PlatformError;
use crate::host::{Backend, PathInfo, RouteEntry};
use crate::journal::Change;
use crate::plan::RoutePlan;

/// The registry key (under HKLM) holding the DNS client's local NRPT rules.
pub const NRPT_ROOT: &str =
    r"SYSTEM\CurrentControlSet\Services\Dnscache\Parameters\DnsPolicyConfig";

/// The registry key (under HKLM) holding the NRPT rules set by Group Policy; when it has rules,
/// the DNS client reads these and ignores [`NRPT_ROOT`] (MS-GPNRPT 2.2.2; Tailscale's
/// `nrpt_windows.go`: "Group policy will continue to override local settings").
pub const NRPT_POLICY_ROOT: &str =
    r"SOFTWARE\Policies\Microsoft\Windows NT\DNSClient\DnsPolicyConfig";

/// How long the first IPv6 change waits for the adapter's IPv6 interface.
pub const IPV6_WAIT: Duration = Duration::from_secs(5);

/// A registry value, as this backend writes them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RegValue {
    /// `REG_DWORD`.
    Dword(u32),
    /// `REG_SZ`.
    Sz(String),
    /// `REG_MULTI_SZ`.
    MultiSz(Vec<String>),
}

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
    /// Creates the NRPT rule `key` as a volatile key under [`NRPT_ROOT`], and under
    /// [`NRPT_POLICY_ROOT`] too when `policy`, with the values of [`nrpt_values`].
    SetNrptRule {
        /// The rule's key.
        key: String,
        /// The namespaces, each with a leading dot (suffix match).
        names: Vec<String>,
        /// The DNS server for them.
        server: IpAddr,
        /// Also under the Group Policy key.
        policy: bool,
    },
    /// Deletes the NRPT rule `key` under both roots.
    DeleteNrptRule {
        /// The rule's key.
        key: String,
    },
    /// Flushes the DNS client's cache; when `policy`, first asks for a (non-forced) machine
    /// policy refresh so that the DNS client re-reads the Group Policy NRPT key.
    RefreshDns {
        /// A rule under the Group Policy key changed.
        policy: bool,
    },
    /// Sets a `REG_DWORD` value under HKLM (creating the key if needed).
    SetDword {
        /// The key, under HKLM.
        key: String,
        /// The value's name.
        name: String,
        /// The value.
        value: u32,
    },
}

/// The Windows host API this backend needs.
pub trait Api {
    /// The LUID of the interface named `alias`.
    fn luid(&mut self, alias: &str) -> Result<u64, PlatformError>;
    /// The interface GUID of `luid`, braced (`{...}`): the name of its registry keys.
    fn interface_guid(&mut self, luid: u64) -> Result<String, PlatformError>;
    /// True if the IPv6 (`v6`) or IPv4 interface of `luid` exists (`GetIpInterfaceEntry`;
    /// `ERROR_NOT_FOUND` is false).
    fn ip_interface(&mut self, luid: u64, v6: bool) -> Result<bool, PlatformError>;
    /// The current best route to `addr`: gateway and interface LUID (`GetBestRoute2`).
    fn best_route(&mut self, addr: IpAddr) -> Result<(Option<IpAddr>, u64), PlatformError>;
    /// Every route (`GetIpForwardTable2`).
    fn routes(&mut self) -> Result<Vec<RouteEntry>, PlatformError>;
    /// The rule keys under [`NRPT_POLICY_ROOT`] (none if it does not exist).
    fn policy_nrpt_rules(&mut self) -> Result<Vec<String>, PlatformError>;
    /// Makes one call; `Ok(false)` if it found nothing to delete.
    fn call(&mut self, call: &Call) -> Result<bool, PlatformError>;
    /// True if process `pid` is running.
    fn pid_alive(&self, pid: i32) -> bool;
    /// The owner of the file `path`, as SDDL writes it (`BA`, `SY`, `S-1-5-21-...`).
    fn owner(&self, path: &Path) -> Result<String, PlatformError>;
}

/// A 64-bit FNV-1a hash: fixed per name, across runs and builds.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The NRPT rule key of the session on `tun`: GUID-shaped (as the DNS client's own rules are),
/// fixed per TUN name so that a crashed session's rule is found again.
pub fn nrpt_key(tun: &str) -> String {
    let hash = fnv1a(tun.as_bytes());
    format!(
        "{{6d73652d-7670-6e00-{:04x}-{:012x}}}",
        hash >> 48,
        hash & 0xffff_ffff_ffff
    )
}

/// The wintun adapter's GUID for the TUN `tun`, fixed per name (as Tailscale fixes its
/// adapter's): Windows' network list identifies an adapter's network by it, so a new GUID on
/// every run is a new "Unidentified network", put on the Public firewall profile each time,
/// and a choice made for it (Private) forgotten. Shaped as an RFC 4122 version-4 GUID.
pub fn adapter_guid(tun: &str) -> u128 {
    let hi = fnv1a(format!("mse-vpn adapter {tun}").as_bytes());
    let lo = fnv1a(format!("{tun} adapter mse-vpn").as_bytes());
    let raw = (u128::from(hi) << 64) | u128::from(lo);
    // Version 4 in bits 76..80, variant 10 in bits 62..64.
    (raw & !(0xf << 76) & !(0x3 << 62)) | (0x4 << 76) | (0x2 << 62)
}

/// The values of an NRPT rule (MS-GPNRPT 2.2.2): `Version` 1 (2.2.2.3: "MUST be
/// 0x00000001"), `ConfigOptions` 8 (2.2.2.2: only the generic DNS server option),
/// `GenericDNSServers` (2.2.2.13), `Name` (2.2.2.1, each namespace with a leading dot),
/// `IPSECCARestriction` empty.
pub fn nrpt_values(names: &[String], server: IpAddr) -> Vec<(&'static str, RegValue)> {
    vec![
        ("Version", RegValue::Dword(1)),
        ("Name", RegValue::MultiSz(names.to_vec())),
        ("GenericDNSServers", RegValue::Sz(server.to_string())),
        ("ConfigOptions", RegValue::Dword(8)),
        ("IPSECCARestriction", RegValue::Sz(String::new())),
    ]
}

/// The registry values that keep the adapter `guid` out of dynamic DNS registration (it would
/// register the TUN's address in Active Directory DNS), NetBIOS and LLMNR, as Tailscale's
/// `manager_windows.go` sets them (`configureDNSRegistration`, `disableNetBIOS`, and
/// `EnableMulticast` 0 for LLMNR). They belong to this adapter's own keys (its GUID is fixed
/// per TUN name), so they are set every run and never undone.
pub fn quiet_adapter_calls(guid: &str) -> Vec<Call> {
    let mut calls = Vec::new();
    for stack in ["Tcpip", "Tcpip6"] {
        let key =
            format!(r"SYSTEM\CurrentControlSet\Services\{stack}\Parameters\Interfaces\{guid}");
        for (name, value) in [
            ("RegistrationEnabled", 0),
            ("DisableDynamicUpdate", 1),
            ("MaxNumberOfAddressesToRegister", 0),
            ("EnableMulticast", 0),
        ] {
            calls.push(Call::SetDword {
                key: key.clone(),
                name: name.to_owned(),
                value,
            });
        }
    }
    calls.push(Call::SetDword {
        key: format!(r"SYSTEM\CurrentControlSet\Services\NetBT\Parameters\Interfaces\Tcpip_{guid}"),
        name: "NetbiosOptions".to_owned(),
        // 2: NetBIOS over TCP/IP disabled.
        value: 2,
    });
    calls
}

/// The calls that make `change` (bypass routes name their interface by LUID in `dev`). An
/// NRPT rule is first deleted: `REG_OPTION_VOLATILE` is ignored for a key that already exists
/// (RegCreateKeyEx), and one left by an older mse-vpn would not be.
pub fn make_calls(change: &Change, tun_luid: u64, dns: Option<(&DnsPlan, bool)>) -> Vec<Call> {
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
        Change::NrptRule { key } => match dns {
            Some((p, policy)) => vec![
                Call::DeleteNrptRule { key: key.clone() },
                Call::SetNrptRule {
                    key: key.clone(),
                    names: p
                        .zones
                        .iter()
                        .map(|z| format!(".{}", z.trim_end_matches('.')))
                        .collect(),
                    server: p.server.ip(),
                    policy,
                },
                Call::RefreshDns { policy },
            ],
            None => Vec::new(),
        },
        _ => Vec::new(),
    }
}

/// The calls that undo `change`; `None` where nothing is to be done (the adapter goes with its
/// process). Addresses and routes on the TUN need its LUID, which `tun_luid` looks up (the
/// adapter may already be gone: then so are they). `policy`: the NRPT rule is (also) under
/// the Group Policy key.
pub fn undo_calls(change: &Change, tun_luid: Option<u64>, policy: bool) -> Option<Vec<Call>> {
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
            vec![
                Call::DeleteNrptRule { key: key.clone() },
                Call::RefreshDns { policy },
            ]
        }
        _ => return None,
    })
}

/// The Windows backend over an [`Api`].
#[derive(Debug)]
pub struct Windows<A> {
    api: A,
    /// How long the first IPv6 change waits for the adapter's IPv6 interface.
    ipv6_wait: Duration,
    /// The IPv6 interface was seen.
    ipv6_ready: bool,
}

impl<A: Api> Windows<A> {
    /// A backend calling `api`.
    pub fn new(api: A) -> Self {
        Windows {
            api,
            ipv6_wait: IPV6_WAIT,
            ipv6_ready: false,
        }
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
            Change::Link { name } => Some(name),
            Change::Addr { dev, .. } | Change::Route { dev, .. } => Some(dev),
            _ => None,
        }
    }

    /// Waits (up to `ipv6_wait`) for the IPv6 interface of the adapter `luid`: wintun's
    /// adapter gets it a moment after it appears, and never when IPv6 is disabled
    /// (`DisabledComponents`, or unbound from the adapter).
    async fn wait_for_ipv6(&mut self, luid: u64, tun: &str) -> Result<(), PlatformError> {
        if self.ipv6_ready {
            return Ok(());
        }
        let step = Duration::from_millis(100);
        let mut waited = Duration::ZERO;
        while !self.api.ip_interface(luid, true)? {
            if waited >= self.ipv6_wait {
                return Err(PlatformError::NoIpv6 {
                    tun: tun.to_owned(),
                });
            }
            tokio::time::sleep(step).await;
            waited += step;
        }
        self.ipv6_ready = true;
        Ok(())
    }

    /// True if the NRPT rule `key` is under the Group Policy key: it must be written there
    /// too when other policy rules exist (`making`), and its removal needs a policy refresh.
    fn policy_nrpt(&mut self, key: &str, making: bool) -> Result<bool, PlatformError> {
        let rules = self.api.policy_nrpt_rules()?;
        let ours = |k: &String| k.eq_ignore_ascii_case(key);
        Ok(match making {
            true => rules.iter().any(|k| !ours(k)),
            false => rules.iter().any(ours),
        })
    }
}

impl<A: Api> Backend for Windows<A> {
    fn pid_alive(&self, pid: i32) -> bool {
        self.api.pid_alive(pid)
    }

    fn journal_trusted(&self, path: &Path) -> bool {
        match self.api.owner(path) {
            Ok(owner) => trusted_owner(&owner),
            // Gone since it was listed: nothing to act on either way.
            Err(_) => false,
        }
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

    async fn routes(&mut self, _plan: &RoutePlan) -> Result<Vec<RouteEntry>, PlatformError> {
        self.api.routes()
    }

    async fn make(&mut self, change: &Change, _plan: &RoutePlan) -> Result<(), PlatformError> {
        let Some(tun) = Self::tun_of(change) else {
            return self.run(make_calls(change, 0, None)).map(drop);
        };
        let luid = self.api.luid(tun)?;
        match change {
            Change::Link { .. } => {
                let guid = self.api.interface_guid(luid)?;
                return self.run(quiet_adapter_calls(&guid)).map(drop);
            }
            Change::Addr {
                addr: IpNet::V6(_), ..
            }
            | Change::Route {
                dst: IpNet::V6(_), ..
            } => self.wait_for_ipv6(luid, tun).await?,
            _ => {}
        }
        self.run(make_calls(change, luid, None)).map(drop)
    }

    async fn dns_backend(&mut self) -> DnsBackend {
        DnsBackend::Nrpt
    }

    fn dns_changes(
        &self,
        _dns: DnsBackend,
        tun: &str,
        _plan: &DnsPlan,
        _state_dir: &Path,
    ) -> Result<Vec<Change>, PlatformError> {
        Ok(vec![Change::NrptRule { key: nrpt_key(tun) }])
    }

    async fn make_dns(
        &mut self,
        change: &Change,
        _tun: &str,
        plan: &DnsPlan,
    ) -> Result<(), PlatformError> {
        let policy = match change {
            Change::NrptRule { key } => self.policy_nrpt(key, true)?,
            _ => false,
        };
        self.run(make_calls(change, 0, Some((plan, policy))))
            .map(drop)
    }

    /// An NRPT rule takes three calls (delete, set, refresh): a failure of the second or the
    /// third leaves the rule in the registry, so undo must still remove it. Undo deletes only
    /// this session's own key (named after its TUN, which no other live session has).
    fn partial(&self, change: &Change) -> bool {
        matches!(change, Change::NrptRule { .. })
    }

    async fn undo(&mut self, change: &Change) -> Result<bool, PlatformError> {
        let luid = match change {
            Change::Addr { dev, .. } | Change::Route { dev, .. } => self.api.luid(dev).ok(),
            _ => None,
        };
        let policy = match change {
            Change::NrptRule { key } => self.policy_nrpt(key, false)?,
            _ => false,
        };
        match undo_calls(change, luid, policy) {
            Some(calls) => self.run(calls),
            None => Ok(false),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::PathBuf;

    use super::*;
    use crate::host;

    const TUN_LUID: u64 = 0x0047_0000_0100_0000;
    const ETH_LUID: u64 = 0x0006_0000_0200_0000;
    const TUN_GUID: &str = "{1b3e5d2c-8f60-4a4e-9b1d-6d73652d7670}";
    /// `ERROR_NOT_FOUND`: what the IP Helper calls answer for an interface (or an IP family
    /// of it) that does not exist.
    const ERROR_NOT_FOUND: i32 = 1168;

    /// A registry key: its values, and whether it is volatile (gone at the next boot).
    #[derive(Clone, Debug, Default, PartialEq, Eq)]
    struct Key {
        values: BTreeMap<String, RegValue>,
        volatile: bool,
    }

    /// A Windows host as the IP Helper API and the registry show it, answering as Windows
    /// does: `ERROR_NOT_FOUND` (1168) for an interface or IP family that does not exist
    /// (CreateUnicastIpAddressEntry, ConvertInterfaceAliasToLuid), `ERROR_OBJECT_ALREADY_EXISTS`
    /// (5010) for a route that exists, RegCreateKeyEx ignoring `REG_OPTION_VOLATILE` for a key
    /// that exists, the DNS client reading only the Group Policy NRPT key when it has rules.
    /// Every call is recorded.
    struct FakeWin {
        calls: Vec<Call>,
        /// The adapter is gone (its process died).
        gone: bool,
        /// This call fails with 5010.
        fail: Option<Call>,
        registry: BTreeMap<String, Key>,
        /// File owners (SDDL) by path; files not listed are Administrators'.
        owners: BTreeMap<PathBuf, String>,
        /// The adapter's IPv6 interface exists from the n-th `GetIpInterfaceEntry` on (a
        /// stand-in for the moment it takes); `None`: never (IPv6 disabled).
        ipv6_after: Option<u32>,
        ipv6_polls: u32,
    }

    impl Default for FakeWin {
        fn default() -> Self {
            FakeWin {
                calls: Vec::new(),
                gone: false,
                fail: None,
                registry: BTreeMap::new(),
                owners: BTreeMap::new(),
                ipv6_after: Some(0),
                ipv6_polls: 0,
            }
        }
    }

    fn os_err(call: &str, code: i32) -> PlatformError {
        PlatformError::Os {
            call: call.to_owned(),
            source: std::io::Error::from_raw_os_error(code),
        }
    }

    fn local_key(key: &str) -> String {
        format!(r"{NRPT_ROOT}\{key}")
    }

    fn policy_key(key: &str) -> String {
        format!(r"{NRPT_POLICY_ROOT}\{key}")
    }

    impl FakeWin {
        fn ipv6_attached(&self) -> bool {
            self.ipv6_after.is_some_and(|n| self.ipv6_polls >= n)
        }

        /// The NRPT rules the DNS client uses: the Group Policy key's when it has any, else
        /// the local key's (MS-GPNRPT; Tailscale's nrpt_windows.go).
        fn effective_nrpt(&self) -> BTreeMap<String, Key> {
            let under = |root: &str| -> BTreeMap<String, Key> {
                let prefix = format!(r"{root}\");
                self.registry
                    .iter()
                    .filter_map(|(k, v)| Some((k.strip_prefix(&prefix)?.to_owned(), v.clone())))
                    .collect()
            };
            let policy = under(NRPT_POLICY_ROOT);
            if policy.is_empty() {
                under(NRPT_ROOT)
            } else {
                policy
            }
        }

        /// A reboot: volatile keys are gone.
        fn reboot(&mut self) {
            self.registry.retain(|_, k| !k.volatile);
        }

        /// RegCreateKeyEx: creates the key with `volatile` unless it exists (then the option
        /// is ignored).
        fn create_key(&mut self, path: String, volatile: bool) -> &mut Key {
            self.registry.entry(path).or_insert_with(|| Key {
                values: BTreeMap::new(),
                volatile,
            })
        }
    }

    impl Api for FakeWin {
        fn luid(&mut self, alias: &str) -> Result<u64, PlatformError> {
            if self.gone || alias != "mse0" {
                return Err(os_err(&format!("ConvertInterfaceAliasToLuid({alias})"), 2));
            }
            Ok(TUN_LUID)
        }
        fn interface_guid(&mut self, luid: u64) -> Result<String, PlatformError> {
            match luid {
                TUN_LUID if !self.gone => Ok(TUN_GUID.to_owned()),
                _ => Err(os_err("ConvertInterfaceLuidToGuid", ERROR_NOT_FOUND)),
            }
        }
        fn ip_interface(&mut self, luid: u64, v6: bool) -> Result<bool, PlatformError> {
            assert_eq!(luid, TUN_LUID);
            if !v6 {
                return Ok(true);
            }
            self.ipv6_polls += 1;
            Ok(self.ipv6_attached())
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
        fn policy_nrpt_rules(&mut self) -> Result<Vec<String>, PlatformError> {
            let prefix = format!(r"{NRPT_POLICY_ROOT}\");
            Ok(self
                .registry
                .keys()
                .filter_map(|k| k.strip_prefix(&prefix).map(str::to_owned))
                .collect())
        }
        fn call(&mut self, call: &Call) -> Result<bool, PlatformError> {
            self.calls.push(call.clone());
            if self.fail.as_ref() == Some(call) {
                return Err(os_err("CreateIpForwardEntry2", 5010));
            }
            match call {
                // No IPv6 interface on the adapter (yet): the IP Helper has no such interface.
                Call::AddAddress {
                    addr: IpNet::V6(_), ..
                }
                | Call::AddRoute {
                    luid: TUN_LUID,
                    dst: IpNet::V6(_),
                    ..
                } if !self.ipv6_attached() => {
                    Err(os_err("CreateUnicastIpAddressEntry", ERROR_NOT_FOUND))
                }
                Call::SetNrptRule {
                    key,
                    names,
                    server,
                    policy,
                } => {
                    let mut paths = vec![local_key(key)];
                    if *policy {
                        paths.push(policy_key(key));
                    }
                    for path in paths {
                        let k = self.create_key(path, true);
                        for (name, value) in nrpt_values(names, *server) {
                            k.values.insert(name.to_owned(), value);
                        }
                    }
                    Ok(true)
                }
                Call::DeleteNrptRule { key } => {
                    let local = self.registry.remove(&local_key(key)).is_some();
                    let policy = self.registry.remove(&policy_key(key)).is_some();
                    Ok(local || policy)
                }
                Call::SetDword { key, name, value } => {
                    let k = self.create_key(key.clone(), false);
                    k.values.insert(name.clone(), RegValue::Dword(*value));
                    Ok(true)
                }
                _ => Ok(true),
            }
        }
        fn pid_alive(&self, pid: i32) -> bool {
            pid as u32 == std::process::id()
        }
        fn owner(&self, path: &Path) -> Result<String, PlatformError> {
            if !path.exists() {
                return Err(os_err("GetNamedSecurityInfoW", 2));
            }
            Ok(self
                .owners
                .get(path)
                .cloned()
                .unwrap_or_else(|| "BA".to_owned()))
        }
    }

    fn plan(cidrs: &[&str], jump: &[&str]) -> RoutePlan {
        host::testing::plan("mse0", 65_000, cidrs, jump)
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn dns_plan() -> DnsPlan {
        DnsPlan {
            server: "198.18.0.1:53".parse().unwrap(),
            zones: vec!["internal".into(), "0.10.in-addr.arpa".into()],
        }
    }

    fn tmp(name: &str) -> host::testing::Scratch {
        host::testing::scratch("windows", name)
    }

    /// The calls other than the adapter's registry settings.
    fn network_calls(win: &Windows<FakeWin>) -> Vec<Call> {
        win.api()
            .calls
            .iter()
            .filter(|c| !matches!(c, Call::SetDword { .. }))
            .cloned()
            .collect()
    }

    #[tokio::test]
    async fn apply_makes_the_exact_api_calls_and_restore_undoes_them() {
        let dir = tmp("apply");
        let mut win = Windows::new(FakeWin::default());
        let p = plan(&["10.0.0.0/8", "fd00:1::/64"], &["10.99.0.2"]);
        let mut applied = host::apply(&mut win, &p, &dir).await.unwrap();
        assert_eq!(
            host::apply_dns(&mut win, &mut applied, "mse0", &dns_plan(), &dir)
                .await
                .unwrap(),
            DnsBackend::Nrpt
        );
        let key = nrpt_key("mse0");
        assert_eq!(
            network_calls(&win),
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
                Call::DeleteNrptRule { key: key.clone() },
                Call::SetNrptRule {
                    key: key.clone(),
                    names: vec![".internal".into(), ".0.10.in-addr.arpa".into()],
                    server: "198.18.0.1".parse().unwrap(),
                    policy: false,
                },
                Call::RefreshDns { policy: false },
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
                Call::RefreshDns { policy: false },
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
        assert!(win.api().effective_nrpt().is_empty());
        assert!(!crate::journal::path_for(&dir, "mse0").exists());
    }

    #[tokio::test]
    async fn a_failed_call_undoes_what_was_done() {
        let dir = tmp("fail");
        let route = Call::AddRoute {
            luid: TUN_LUID,
            dst: net("10.0.0.0/16"),
            next_hop: None,
        };
        let mut win = Windows::new(FakeWin {
            fail: Some(route.clone()),
            ..FakeWin::default()
        });
        let e = host::apply(&mut win, &plan(&["10.0.0.0/16"], &[]), &dir)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("CreateIpForwardEntry2"), "{e}");
        // The route that failed is journaled as not made, and not undone.
        assert_eq!(
            &network_calls(&win)[1..],
            [
                route,
                Call::DeleteAddress {
                    luid: TUN_LUID,
                    addr: net("198.18.0.1/32")
                },
            ]
        );
    }

    fn write_journal(path: &Path, pid: u32, lines: &[String]) {
        let mut j = crate::journal::Journal::create(path, pid).unwrap();
        for line in lines {
            j.record(&Change::parse(line).unwrap()).unwrap();
        }
    }

    #[tokio::test]
    async fn repair_after_a_crash_removes_the_bypass_route_and_the_nrpt_rule() {
        let dir = tmp("repair");
        let path = crate::journal::path_for(&dir, "mse0");
        let key = nrpt_key("mse0");
        write_journal(
            &path,
            1,
            &[
                "link mse0".to_owned(),
                "addr 198.18.0.1/32 mse0".into(),
                format!("bypass 10.99.0.2/32 via 192.168.1.1 dev {ETH_LUID}"),
                "route 10.0.0.0/8 mse0".into(),
                format!("nrpt-rule {key}"),
            ],
        );
        // The adapter went with the crashed process, and its addresses and routes with it.
        let mut fake = FakeWin {
            gone: true,
            ..FakeWin::default()
        };
        fake.create_key(local_key(&key), true);
        let mut win = Windows::new(fake);
        let undone = host::repair(&mut win, &dir).await.unwrap();
        assert_eq!(
            win.api().calls,
            [
                Call::DeleteNrptRule { key },
                Call::RefreshDns { policy: false },
                Call::DeleteRoute {
                    luid: ETH_LUID,
                    dst: net("10.99.0.2/32"),
                    next_hop: Some("192.168.1.1".parse().unwrap())
                },
            ]
        );
        assert_eq!(undone.len(), 2);
        assert!(!path.exists());
    }

    /// Item 5 of issue 25: anyone may create files in C:\ProgramData's subdirectories unless
    /// their ACL says otherwise; a journal planted there (`bypass 0.0.0.0/0 ...`, an NRPT
    /// rule) would make the next elevated `up` or `down` delete the default route or someone
    /// else's NRPT rule. Only journals owned by SYSTEM or Administrators are acted on.
    #[tokio::test]
    async fn a_journal_someone_else_planted_is_not_repaired() {
        let dir = tmp("planted");
        let planted = crate::journal::path_for(&dir, "evil");
        write_journal(
            &planted,
            1,
            &[
                format!("bypass 0.0.0.0/0 via 192.168.1.1 dev {ETH_LUID}"),
                "nrpt-rule {00000000-0000-0000-0000-000000000001}".into(),
            ],
        );
        // A live pid and our TUN's name: it must not make `up` believe mse0 is busy either.
        let squat = crate::journal::path_for(&dir, "mse0");
        write_journal(
            &squat,
            std::process::id(),
            &["route 10.0.0.0/8 mse0".into()],
        );
        let ours = crate::journal::path_for(&dir, "mse1");
        write_journal(
            &ours,
            1,
            &[format!(
                "bypass 10.99.0.2/32 via 192.168.1.1 dev {ETH_LUID}"
            )],
        );
        let mut fake = FakeWin::default();
        // What GetNamedSecurityInfoW says of a file a standard user created.
        fake.owners
            .insert(planted.clone(), "S-1-5-21-1-2-3-1001".into());
        fake.owners
            .insert(squat.clone(), "S-1-5-21-1-2-3-1001".into());
        let mut win = Windows::new(fake);
        let undone = host::repair(&mut win, &dir).await.unwrap();
        assert_eq!(
            win.api().calls,
            [Call::DeleteRoute {
                luid: ETH_LUID,
                dst: net("10.99.0.2/32"),
                next_hop: Some("192.168.1.1".parse().unwrap())
            }],
            "only the administrators' journal is repaired"
        );
        assert_eq!(undone.len(), 1);
        assert!(planted.exists(), "a planted journal is left where it is");
        assert!(!ours.exists());
        // The squatted name does not block a session.
        host::preflight(&mut win, &plan(&["10.0.0.0/8"], &[]), &dir)
            .await
            .unwrap();
        let applied = host::apply(&mut win, &plan(&["10.0.0.0/8"], &[]), &dir)
            .await
            .unwrap();
        host::restore(&mut win, applied).await.unwrap();
        assert!(trusted_owner("BA") && trusted_owner("SY") && trusted_owner("S-1-5-32-544"));
        assert!(!trusted_owner("S-1-5-21-1-2-3-1001") && !trusted_owner("BU"));
    }

    /// Item 6 of issue 25: where Group Policy sets NRPT rules, the DNS client ignores local
    /// ones. The rule goes under the policy key too, `Version` 1, with a policy refresh.
    #[tokio::test]
    async fn an_nrpt_rule_goes_where_group_policy_makes_windows_read_it() {
        let dir = tmp("gpnrpt");
        let mut fake = FakeWin::default();
        // A DirectAccess / Always On VPN rule pushed by the domain.
        let corp = "{5f1c6f4e-2a8b-4d35-9d0e-1c2b3a4d5e6f}";
        fake.create_key(policy_key(corp), false).values.extend(
            nrpt_values(&[".corp.example".into()], "10.1.1.1".parse().unwrap())
                .into_iter()
                .map(|(n, v)| (n.to_owned(), v)),
        );
        let mut win = Windows::new(fake);
        let mut applied = host::apply(&mut win, &plan(&["10.0.0.0/16"], &[]), &dir)
            .await
            .unwrap();
        host::apply_dns(&mut win, &mut applied, "mse0", &dns_plan(), &dir)
            .await
            .unwrap();
        let key = nrpt_key("mse0");
        let rules = win.api().effective_nrpt();
        let ours = rules.get(&key).expect("the DNS client reads our rule");
        assert_eq!(ours.values.get("Version"), Some(&RegValue::Dword(1)));
        assert_eq!(ours.values.get("ConfigOptions"), Some(&RegValue::Dword(8)));
        assert_eq!(
            ours.values.get("Name"),
            Some(&RegValue::MultiSz(vec![
                ".internal".into(),
                ".0.10.in-addr.arpa".into()
            ]))
        );
        assert!(ours.volatile);
        assert!(rules.contains_key(corp));
        assert!(win.api().calls.contains(&Call::RefreshDns { policy: true }));
        win.api.calls.clear();
        host::restore(&mut win, applied).await.unwrap();
        assert_eq!(
            &win.api().calls[..2],
            [
                Call::DeleteNrptRule { key: key.clone() },
                Call::RefreshDns { policy: true }
            ]
        );
        let rules = win.api().effective_nrpt();
        assert!(!rules.contains_key(&key));
        assert!(rules.contains_key(corp), "the domain's rule stays");
    }

    /// Item 6 of issue 25: a rule left by a crash is gone at the next reboot (a volatile key,
    /// even where an older version left a persistent one), and a local rule needs no machine
    /// policy refresh.
    #[tokio::test]
    async fn a_local_nrpt_rule_is_volatile_and_needs_no_policy_refresh() {
        let dir = tmp("volatile");
        let key = nrpt_key("mse0");
        let mut fake = FakeWin::default();
        // A persistent rule of the same key, left by an older mse-vpn.
        fake.create_key(local_key(&key), false);
        let mut win = Windows::new(fake);
        let mut applied = host::apply(&mut win, &plan(&["10.0.0.0/16"], &[]), &dir)
            .await
            .unwrap();
        host::apply_dns(&mut win, &mut applied, "mse0", &dns_plan(), &dir)
            .await
            .unwrap();
        assert!(
            win.api()
                .calls
                .contains(&Call::RefreshDns { policy: false })
        );
        assert!(!win.api().calls.contains(&Call::RefreshDns { policy: true }));
        assert!(win.api().effective_nrpt()[&key].volatile);
        // kill -9, then a reboot before anyone repairs.
        drop(applied);
        win.api.reboot();
        assert!(win.api().effective_nrpt().is_empty());
    }

    /// A rule whose DNS refresh failed is in the registry all the same: the change stays
    /// journaled as made, so that the session's undo removes the rule (before, it was
    /// journaled as not made and stayed until the next reboot, sending the zones' names to a
    /// responder that was gone).
    #[tokio::test]
    async fn an_nrpt_rule_whose_dns_refresh_failed_is_still_undone() {
        let dir = tmp("refresh");
        let refresh = Call::RefreshDns { policy: false };
        let mut win = Windows::new(FakeWin {
            fail: Some(refresh.clone()),
            ..FakeWin::default()
        });
        let mut applied = host::apply(&mut win, &plan(&["10.0.0.0/16"], &[]), &dir)
            .await
            .unwrap();
        let e = host::apply_dns(&mut win, &mut applied, "mse0", &dns_plan(), &dir)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("CreateIpForwardEntry2"), "{e}");
        let key = nrpt_key("mse0");
        assert!(win.api().effective_nrpt().contains_key(&key));
        // The refresh works again (it failed once), and the session ends.
        win.api.fail = None;
        win.api.calls.clear();
        host::restore(&mut win, applied).await.unwrap();
        assert_eq!(
            &win.api().calls[..2],
            [Call::DeleteNrptRule { key: key.clone() }, refresh]
        );
        assert!(win.api().effective_nrpt().is_empty());
        assert!(!crate::journal::path_for(&dir, "mse0").exists());
    }

    /// Item 7 of issue 25: the adapter is kept out of DNS registration, NetBIOS and LLMNR.
    #[tokio::test]
    async fn the_adapter_is_kept_out_of_dns_registration_netbios_and_llmnr() {
        let dir = tmp("quiet");
        let mut win = Windows::new(FakeWin::default());
        let applied = host::apply(&mut win, &plan(&["10.0.0.0/16"], &[]), &dir)
            .await
            .unwrap();
        let reg = &win.api().registry;
        for stack in ["Tcpip", "Tcpip6"] {
            let k = &reg[&format!(
                r"SYSTEM\CurrentControlSet\Services\{stack}\Parameters\Interfaces\{TUN_GUID}"
            )];
            assert_eq!(k.values["RegistrationEnabled"], RegValue::Dword(0));
            assert_eq!(k.values["DisableDynamicUpdate"], RegValue::Dword(1));
            assert_eq!(k.values["EnableMulticast"], RegValue::Dword(0));
        }
        let netbt = &reg[&format!(
            r"SYSTEM\CurrentControlSet\Services\NetBT\Parameters\Interfaces\Tcpip_{TUN_GUID}"
        )];
        assert_eq!(netbt.values["NetbiosOptions"], RegValue::Dword(2));
        host::restore(&mut win, applied).await.unwrap();
    }

    /// Item 9 of issue 25: the IPv6 interface appears after the adapter; until then the IPv6
    /// address cannot be added (ERROR_NOT_FOUND).
    #[tokio::test]
    async fn ipv6_waits_for_the_adapters_ipv6_interface() {
        let dir = tmp("v6wait");
        let mut win = Windows::new(FakeWin {
            ipv6_after: Some(3),
            ..FakeWin::default()
        });
        let p = plan(&["10.0.0.0/16", "fd00:1::/64"], &[]);
        let applied = host::apply(&mut win, &p, &dir).await.unwrap();
        assert!(win.api().ipv6_polls >= 3);
        host::restore(&mut win, applied).await.unwrap();
    }

    #[tokio::test]
    async fn ipv6_disabled_on_the_host_is_said_plainly() {
        let dir = tmp("v6off");
        let mut win = Windows::new(FakeWin {
            ipv6_after: None,
            ..FakeWin::default()
        });
        win.ipv6_wait = Duration::from_millis(300);
        let e = host::apply(&mut win, &plan(&["10.0.0.0/16", "fd00:1::/64"], &[]), &dir)
            .await
            .unwrap_err();
        assert!(matches!(e, PlatformError::NoIpv6 { .. }), "{e}");
        assert!(e.to_string().contains("IPv6 disabled"), "{e}");
        // IPv4 alone is fine on such a host.
        let applied = host::apply(&mut win, &plan(&["10.0.0.0/16"], &[]), &dir)
            .await
            .unwrap();
        host::restore(&mut win, applied).await.unwrap();
    }

    #[tokio::test]
    async fn preflight_refuses_the_lan_and_finds_the_jump_hosts_path() {
        let dir = tmp("preflight");
        let mut win = Windows::new(FakeWin::default());
        let e = host::preflight(&mut win, &plan(&["192.168.0.0/16"], &[]), &dir)
            .await
            .unwrap_err();
        assert!(matches!(e, PlatformError::RouteConflict { .. }), "{e}");
        let pre = host::preflight(&mut win, &plan(&["10.0.0.0/8"], &["10.99.0.2"]), &dir)
            .await
            .unwrap();
        assert_eq!(pre.bypass_paths[0].1.dev, ETH_LUID.to_string());
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

    #[test]
    fn adapter_guids_are_fixed_per_tun_and_well_formed() {
        let g = adapter_guid("mse0");
        assert_eq!(g, adapter_guid("mse0"), "the same network every run");
        assert_ne!(g, adapter_guid("mse1"));
        assert_eq!((g >> 76) & 0xf, 4, "version 4");
        assert_eq!((g >> 62) & 0x3, 2, "RFC 4122 variant");
        assert_ne!(g, 0);
    }
}
