//! The real [`Api`] of the Windows backend: IP Helper calls for addresses, routes, the best
//! route and the route table; the registry for NRPT rules and the adapter's settings; a policy
//! refresh and a DNS cache flush. What to call, and when, is decided in `windows.rs`
//! (unit-tested on every OS); this file only translates one call into the Win32 API and its
//! result back. It also builds the backend that `up` and `down` use ([`system`]).
//!
//! Proven here by type-checking and clippy for x86_64-pc-windows-gnu and -msvc; the IP Helper
//! and NRPT calls need a real Windows host.

#![allow(unsafe_code)]

use std::ffi::OsStr;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

use ipnet::IpNet;
use windows_sys::Win32::Foundation::{ERROR_FILE_NOT_FOUND, ERROR_NO_MORE_ITEMS, ERROR_NOT_FOUND};
use windows_sys::Win32::NetworkManagement::IpHelper::{
    ConvertInterfaceAliasToLuid, ConvertInterfaceLuidToGuid, CreateIpForwardEntry2,
    CreateUnicastIpAddressEntry, DeleteIpForwardEntry2, DeleteUnicastIpAddressEntry, FreeMibTable,
    GetBestRoute2, GetIpForwardTable2, GetIpInterfaceEntry, InitializeIpForwardEntry,
    InitializeIpInterfaceEntry, InitializeUnicastIpAddressEntry, MIB_IPFORWARD_ROW2,
    MIB_IPFORWARD_TABLE2, MIB_IPINTERFACE_ROW, MIB_UNICASTIPADDRESS_ROW,
};
use windows_sys::Win32::NetworkManagement::Ndis::NET_LUID_LH;
use windows_sys::Win32::Networking::WinSock::{
    AF_INET, AF_INET6, AF_UNSPEC, IpDadStatePreferred, MIB_IPPROTO_LOCAL, MIB_IPPROTO_NETMGMT,
    SOCKADDR_INET,
};
use windows_sys::Win32::System::GroupPolicy::RefreshPolicyEx;
use windows_sys::Win32::System::Registry::{
    HKEY, HKEY_LOCAL_MACHINE, KEY_READ, KEY_WRITE, REG_DWORD, REG_MULTI_SZ,
    REG_OPTION_NON_VOLATILE, REG_OPTION_VOLATILE, REG_SZ, RegCloseKey, RegCreateKeyExW,
    RegDeleteTreeW, RegEnumKeyExW, RegOpenKeyExW, RegSetValueExW,
};
use windows_sys::core::GUID;

use crate::error::PlatformError;
use crate::host::RouteEntry;
use crate::win32::{path_owner, wide};
use crate::windows::{Api, Call, NRPT_POLICY_ROOT, NRPT_ROOT, RegValue, Windows, nrpt_values};

/// The real Windows host API.
#[derive(Debug, Default)]
pub struct Win32;

/// The Windows backend on the real host API.
pub fn system() -> Windows<Win32> {
    Windows::new(Win32)
}

fn os_err(call: &str, code: u32) -> PlatformError {
    PlatformError::Os {
        call: call.to_owned(),
        source: io::Error::from_raw_os_error(code as i32),
    }
}

fn sockaddr(addr: IpAddr) -> SOCKADDR_INET {
    let mut sa = SOCKADDR_INET::default();
    match addr {
        IpAddr::V4(a) => {
            sa.Ipv4.sin_family = AF_INET;
            sa.Ipv4.sin_addr.S_un.S_addr = u32::from_ne_bytes(a.octets());
        }
        IpAddr::V6(a) => {
            sa.Ipv6.sin6_family = AF_INET6;
            sa.Ipv6.sin6_addr.u.Byte = a.octets();
        }
    }
    sa
}

fn from_sockaddr(sa: &SOCKADDR_INET) -> Option<IpAddr> {
    // SAFETY: every variant of the union starts with the address family, which says which
    // variant the OS filled in; the variant read is the one the family names.
    unsafe {
        match sa.si_family {
            AF_INET => Some(IpAddr::V4(Ipv4Addr::from(
                sa.Ipv4.sin_addr.S_un.S_addr.to_ne_bytes(),
            ))),
            AF_INET6 => Some(IpAddr::V6(Ipv6Addr::from(sa.Ipv6.sin6_addr.u.Byte))),
            _ => None,
        }
    }
}

fn luid(value: u64) -> NET_LUID_LH {
    NET_LUID_LH { Value: value }
}

fn route_row(luid_value: u64, dst: &IpNet, next_hop: Option<IpAddr>) -> MIB_IPFORWARD_ROW2 {
    let mut row = MIB_IPFORWARD_ROW2::default();
    // SAFETY: `row` is a valid, writable MIB_IPFORWARD_ROW2; the call only fills in defaults.
    unsafe { InitializeIpForwardEntry(&mut row) };
    row.InterfaceLuid = luid(luid_value);
    row.DestinationPrefix.Prefix = sockaddr(dst.network());
    row.DestinationPrefix.PrefixLength = dst.prefix_len();
    row.NextHop = match (next_hop, dst) {
        (Some(gw), _) => sockaddr(gw),
        // On-link: the unspecified address of the destination's family.
        (None, IpNet::V4(_)) => sockaddr(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
        (None, IpNet::V6(_)) => sockaddr(IpAddr::V6(Ipv6Addr::UNSPECIFIED)),
    };
    row.Metric = 0;
    row.Protocol = MIB_IPPROTO_NETMGMT;
    row
}

fn address_row(luid_value: u64, addr: &IpNet) -> MIB_UNICASTIPADDRESS_ROW {
    let mut row = MIB_UNICASTIPADDRESS_ROW::default();
    // SAFETY: `row` is a valid, writable MIB_UNICASTIPADDRESS_ROW; the call fills in defaults.
    unsafe { InitializeUnicastIpAddressEntry(&mut row) };
    row.InterfaceLuid = luid(luid_value);
    row.Address = sockaddr(addr.addr());
    row.OnLinkPrefixLength = addr.prefix_len();
    row.DadState = IpDadStatePreferred;
    row
}

/// A delete that found nothing is "already gone", not a failure.
fn deleted(call: &str, rc: u32) -> Result<bool, PlatformError> {
    match rc {
        0 => Ok(true),
        ERROR_NOT_FOUND | ERROR_FILE_NOT_FOUND => Ok(false),
        code => Err(os_err(call, code)),
    }
}

fn made(call: &str, rc: u32) -> Result<bool, PlatformError> {
    match rc {
        0 => Ok(true),
        code => Err(os_err(call, code)),
    }
}

/// An open registry key, closed on drop.
struct Key(HKEY);

impl Drop for Key {
    fn drop(&mut self) {
        // SAFETY: the handle came from RegCreateKeyExW/RegOpenKeyExW and is closed exactly
        // once.
        unsafe { RegCloseKey(self.0) };
    }
}

impl Key {
    /// Creates (or opens) `path` under HKLM for writing; `volatile`: the key lives in memory
    /// only and is gone at the next boot (ignored by Windows when the key exists).
    fn create(path: &str, volatile: bool) -> Result<Key, PlatformError> {
        let wpath = wide(OsStr::new(path));
        let options = if volatile {
            REG_OPTION_VOLATILE
        } else {
            REG_OPTION_NON_VOLATILE
        };
        let mut handle: HKEY = std::ptr::null_mut();
        // SAFETY: `wpath` is NUL-terminated UTF-16; `handle` is a valid out pointer; no class,
        // no security attributes, no disposition wanted (null pointers allowed by the API).
        let rc = unsafe {
            RegCreateKeyExW(
                HKEY_LOCAL_MACHINE,
                wpath.as_ptr(),
                0,
                std::ptr::null(),
                options,
                KEY_WRITE,
                std::ptr::null(),
                &mut handle,
                std::ptr::null_mut(),
            )
        };
        made(&format!(r"RegCreateKeyExW(HKLM\{path})"), rc)?;
        Ok(Key(handle))
    }

    fn set(&self, name: &str, value: &RegValue) -> Result<(), PlatformError> {
        let (kind, data) = match value {
            RegValue::Dword(v) => (REG_DWORD, v.to_le_bytes().to_vec()),
            RegValue::Sz(s) => (REG_SZ, utf16_bytes(s.encode_utf16().chain(Some(0)))),
            // Each string NUL-terminated, then one more NUL.
            RegValue::MultiSz(v) => (
                REG_MULTI_SZ,
                utf16_bytes(
                    v.iter()
                        .flat_map(|n| n.encode_utf16().chain(Some(0)))
                        .chain(Some(0)),
                ),
            ),
        };
        let n = wide(OsStr::new(name));
        // SAFETY: the key is open for writing; `n` is NUL-terminated UTF-16; `data` is valid
        // for `data.len()` bytes, which fits in u32 (registry values here are tiny).
        let rc = unsafe {
            RegSetValueExW(
                self.0,
                n.as_ptr(),
                0,
                kind,
                data.as_ptr(),
                data.len() as u32,
            )
        };
        made("RegSetValueExW", rc).map(drop)
    }
}

fn utf16_bytes(units: impl Iterator<Item = u16>) -> Vec<u8> {
    units.flat_map(u16::to_le_bytes).collect()
}

fn set_nrpt_rule(
    key: &str,
    names: &[String],
    server: IpAddr,
    policy: bool,
) -> Result<(), PlatformError> {
    let mut roots = vec![NRPT_ROOT];
    if policy {
        roots.push(NRPT_POLICY_ROOT);
    }
    for root in roots {
        let k = Key::create(&format!(r"{root}\{key}"), true)?;
        for (name, value) in nrpt_values(names, server) {
            k.set(name, &value)?;
        }
    }
    Ok(())
}

fn delete_nrpt_rule(key: &str) -> Result<bool, PlatformError> {
    let mut any = false;
    for root in [NRPT_ROOT, NRPT_POLICY_ROOT] {
        let path = wide(OsStr::new(&format!(r"{root}\{key}")));
        // SAFETY: `path` is NUL-terminated UTF-16 naming a subkey of HKLM.
        let rc = unsafe { RegDeleteTreeW(HKEY_LOCAL_MACHINE, path.as_ptr()) };
        any |= deleted("RegDeleteTreeW", rc)?;
    }
    Ok(any)
}

/// The subkeys of `path` under HKLM (none if it does not exist).
fn subkeys(path: &str) -> Result<Vec<String>, PlatformError> {
    let wpath = wide(OsStr::new(path));
    let mut handle: HKEY = std::ptr::null_mut();
    // SAFETY: `wpath` is NUL-terminated UTF-16; `handle` a valid out pointer.
    let rc = unsafe { RegOpenKeyExW(HKEY_LOCAL_MACHINE, wpath.as_ptr(), 0, KEY_READ, &mut handle) };
    if rc == ERROR_FILE_NOT_FOUND {
        return Ok(Vec::new());
    }
    made("RegOpenKeyExW", rc)?;
    let k = Key(handle);
    let mut out = Vec::new();
    for index in 0.. {
        // Key names are at most 255 characters.
        let mut name = [0u16; 256];
        let mut len = name.len() as u32;
        // SAFETY: the key is open for reading; `name` holds `len` UTF-16 units; the class and
        // time out pointers may be null.
        let rc = unsafe {
            RegEnumKeyExW(
                k.0,
                index,
                name.as_mut_ptr(),
                &mut len,
                std::ptr::null(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            )
        };
        if rc == ERROR_NO_MORE_ITEMS {
            break;
        }
        made("RegEnumKeyExW", rc)?;
        out.push(String::from_utf16_lossy(&name[..len as usize]));
    }
    Ok(out)
}

fn refresh_dns(policy: bool) -> Result<bool, PlatformError> {
    if policy {
        // SAFETY: plain call with integer arguments. Not RP_FORCE: it asks the policy engine
        // to apply what changed (our rule under the policy key), so that the DNS client
        // re-reads the policy NRPT key, without re-applying every policy of the machine.
        unsafe { RefreshPolicyEx(1, 0) };
    }
    // The DNS client's cache may still hold answers from before the rule.
    let _ = std::process::Command::new("ipconfig")
        .arg("/flushdns")
        .stdout(std::process::Stdio::null())
        .status();
    Ok(true)
}

fn set_dword(key: &str, name: &str, value: u32) -> Result<bool, PlatformError> {
    Key::create(key, false)?.set(name, &RegValue::Dword(value))?;
    Ok(true)
}

impl Api for Win32 {
    fn luid(&mut self, alias: &str) -> Result<u64, PlatformError> {
        let name = wide(OsStr::new(alias));
        let mut out = NET_LUID_LH::default();
        // SAFETY: `name` is NUL-terminated UTF-16, `out` a valid out pointer.
        let rc = unsafe { ConvertInterfaceAliasToLuid(name.as_ptr(), &mut out) };
        made("ConvertInterfaceAliasToLuid", rc)?;
        // SAFETY: every bit pattern of the union is a valid u64.
        Ok(unsafe { out.Value })
    }

    fn best_route(&mut self, addr: IpAddr) -> Result<(Option<IpAddr>, u64), PlatformError> {
        let dst = sockaddr(addr);
        let mut row = MIB_IPFORWARD_ROW2::default();
        let mut src = SOCKADDR_INET::default();
        // SAFETY: no interface constraint (null LUID, index 0), no source address (null); the
        // destination and both out pointers are valid for the duration of the call.
        let rc = unsafe {
            GetBestRoute2(
                std::ptr::null(),
                0,
                std::ptr::null(),
                &dst,
                0,
                &mut row,
                &mut src,
            )
        };
        made("GetBestRoute2", rc)?;
        let via = from_sockaddr(&row.NextHop).filter(|a| !a.is_unspecified());
        // SAFETY: every bit pattern of the union is a valid u64.
        Ok((via, unsafe { row.InterfaceLuid.Value }))
    }

    fn routes(&mut self) -> Result<Vec<RouteEntry>, PlatformError> {
        let mut table: *mut MIB_IPFORWARD_TABLE2 = std::ptr::null_mut();
        // SAFETY: `table` is a valid out pointer; on success the OS allocated the table, which
        // is freed below with FreeMibTable.
        let rc = unsafe { GetIpForwardTable2(AF_UNSPEC, &mut table) };
        made("GetIpForwardTable2", rc)?;
        let mut out = Vec::new();
        // SAFETY: on success `table` points at NumEntries rows laid out from `Table`, valid
        // until FreeMibTable; they are only read, then the table is freed exactly once.
        unsafe {
            let rows =
                std::slice::from_raw_parts((*table).Table.as_ptr(), (*table).NumEntries as usize);
            for row in rows {
                let Some(addr) = from_sockaddr(&row.DestinationPrefix.Prefix) else {
                    continue;
                };
                let Ok(dst) = IpNet::new(addr, row.DestinationPrefix.PrefixLength) else {
                    continue;
                };
                let via = from_sockaddr(&row.NextHop).filter(|a| !a.is_unspecified());
                out.push(RouteEntry {
                    dst,
                    dev: row.InterfaceLuid.Value.to_string(),
                    via,
                    local: via.is_none() && row.Protocol == MIB_IPPROTO_LOCAL,
                });
            }
            FreeMibTable(table.cast());
        }
        Ok(out)
    }

    fn call(&mut self, call: &Call) -> Result<bool, PlatformError> {
        match call {
            Call::AddAddress { luid, addr } => {
                let row = address_row(*luid, addr);
                // SAFETY: `row` is a fully initialised row, read by the call only.
                made("CreateUnicastIpAddressEntry", unsafe {
                    CreateUnicastIpAddressEntry(&row)
                })
            }
            Call::DeleteAddress { luid, addr } => {
                let row = address_row(*luid, addr);
                // SAFETY: as above.
                deleted("DeleteUnicastIpAddressEntry", unsafe {
                    DeleteUnicastIpAddressEntry(&row)
                })
            }
            Call::AddRoute {
                luid,
                dst,
                next_hop,
            } => {
                let row = route_row(*luid, dst, *next_hop);
                // SAFETY: `row` is a fully initialised row, read by the call only.
                made("CreateIpForwardEntry2", unsafe {
                    CreateIpForwardEntry2(&row)
                })
            }
            Call::DeleteRoute {
                luid,
                dst,
                next_hop,
            } => {
                let row = route_row(*luid, dst, *next_hop);
                // SAFETY: as above.
                deleted("DeleteIpForwardEntry2", unsafe {
                    DeleteIpForwardEntry2(&row)
                })
            }
            Call::SetNrptRule {
                key,
                names,
                server,
                policy,
            } => set_nrpt_rule(key, names, *server, *policy).map(|()| true),
            Call::DeleteNrptRule { key } => delete_nrpt_rule(key),
            Call::RefreshDns { policy } => refresh_dns(*policy),
            Call::SetDword { key, name, value } => set_dword(key, name, *value),
        }
    }

    fn pid_alive(&self, pid: i32) -> bool {
        crate::process::pid_alive(pid)
    }

    fn interface_guid(&mut self, luid_value: u64) -> Result<String, PlatformError> {
        let mut guid = GUID::from_u128(0);
        // SAFETY: both pointers are valid for the call's duration.
        let rc = unsafe { ConvertInterfaceLuidToGuid(&luid(luid_value), &mut guid) };
        made("ConvertInterfaceLuidToGuid", rc)?;
        Ok(format!(
            "{{{:08x}-{:04x}-{:04x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}}}",
            guid.data1,
            guid.data2,
            guid.data3,
            guid.data4[0],
            guid.data4[1],
            guid.data4[2],
            guid.data4[3],
            guid.data4[4],
            guid.data4[5],
            guid.data4[6],
            guid.data4[7]
        ))
    }

    fn ip_interface(&mut self, luid_value: u64, v6: bool) -> Result<bool, PlatformError> {
        let mut row = MIB_IPINTERFACE_ROW::default();
        // SAFETY: `row` is a valid, writable MIB_IPINTERFACE_ROW; the call fills in defaults.
        unsafe { InitializeIpInterfaceEntry(&mut row) };
        row.Family = if v6 { AF_INET6 } else { AF_INET };
        row.InterfaceLuid = luid(luid_value);
        // SAFETY: `row` names the interface and family to look up and is written in place.
        match unsafe { GetIpInterfaceEntry(&mut row) } {
            0 => Ok(true),
            ERROR_NOT_FOUND => Ok(false),
            code => Err(os_err("GetIpInterfaceEntry", code)),
        }
    }

    fn policy_nrpt_rules(&mut self) -> Result<Vec<String>, PlatformError> {
        subkeys(NRPT_POLICY_ROOT)
    }

    fn owner(&self, path: &Path) -> Result<String, PlatformError> {
        path_owner(path).map_err(|source| PlatformError::Os {
            call: format!("GetNamedSecurityInfoW({})", path.display()),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_round_trip_through_sockaddr_inet() {
        for a in ["198.18.0.1", "fd6d:7365:7670:6e00::1"] {
            let ip: IpAddr = a.parse().unwrap();
            assert_eq!(from_sockaddr(&sockaddr(ip)), Some(ip));
        }
    }
}
