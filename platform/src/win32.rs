//! The Windows system calls of mse-vpn: the one Windows file with `unsafe` code. It implements
//! [`Api`] (IP Helper: addresses, routes, best route, route table; the registry: NRPT rules),
//! process liveness and token elevation, and the control pipe's owner-only security
//! descriptor. What to call, and when, is decided in `windows.rs` (unit-tested on every OS);
//! this file only translates one call into the Win32 API and its result back.
//!
//! Proven here by type-checking and clippy for x86_64-pc-windows-gnu and -msvc, and (process
//! liveness, elevation, the pipe ACL) by unit tests under Wine; the IP Helper and NRPT calls
//! need a real Windows host.

#![allow(unsafe_code)]

use std::ffi::OsStr;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::windows::ffi::OsStrExt;
use std::path::Path;

use ipnet::IpNet;
use tokio::net::windows::named_pipe::{NamedPipeServer, ServerOptions};
use windows_sys::Win32::Foundation::{
    CloseHandle, ERROR_ACCESS_DENIED, ERROR_ALREADY_EXISTS, ERROR_FILE_NOT_FOUND,
    ERROR_NO_MORE_ITEMS, ERROR_NOT_FOUND, HANDLE, LocalFree, STILL_ACTIVE,
};
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
use windows_sys::Win32::Security::Authorization::{
    ConvertSecurityDescriptorToStringSecurityDescriptorW, ConvertSidToStringSidW,
    ConvertStringSecurityDescriptorToSecurityDescriptorW, GetNamedSecurityInfoW, GetSecurityInfo,
    SDDL_REVISION_1, SE_FILE_OBJECT, SE_KERNEL_OBJECT, SetNamedSecurityInfoW,
};
use windows_sys::Win32::Security::{
    ACL, DACL_SECURITY_INFORMATION, GetSecurityDescriptorDacl, GetSecurityDescriptorOwner,
    GetTokenInformation, OBJECT_SECURITY_INFORMATION, OWNER_SECURITY_INFORMATION,
    PROTECTED_DACL_SECURITY_INFORMATION, PSECURITY_DESCRIPTOR, PSID, SECURITY_ATTRIBUTES,
    TOKEN_ELEVATION, TOKEN_QUERY, TOKEN_USER, TokenElevation, TokenUser,
};
use windows_sys::Win32::Storage::FileSystem::CreateDirectoryW;
use windows_sys::Win32::System::GroupPolicy::RefreshPolicyEx;
use windows_sys::Win32::System::Registry::{
    HKEY, HKEY_LOCAL_MACHINE, KEY_READ, KEY_WRITE, REG_DWORD, REG_MULTI_SZ,
    REG_OPTION_NON_VOLATILE, REG_OPTION_VOLATILE, REG_SZ, RegCloseKey, RegCreateKeyExW,
    RegDeleteTreeW, RegEnumKeyExW, RegOpenKeyExW, RegSetValueExW,
};
use windows_sys::Win32::System::Threading::{
    GetCurrentProcess, GetExitCodeProcess, OpenProcess, OpenProcessToken,
    PROCESS_QUERY_LIMITED_INFORMATION,
};
use windows_sys::core::GUID;

use crate::PlatformError;
use crate::host::RouteEntry;
use crate::windows::{
    Api, Call, NRPT_POLICY_ROOT, NRPT_ROOT, RegValue, nrpt_values, trusted_owner,
};

/// The real Windows host API.
#[derive(Debug, Default)]
pub struct Win32;

fn wide(s: &OsStr) -> Vec<u16> {
    s.encode_wide().chain(Some(0)).collect()
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

/// True when running under Wine (ntdll exports `wine_get_version`): tests say which Windows
/// behaviour Wine does not implement.
#[cfg(test)]
pub fn under_wine() -> bool {
    use windows_sys::Win32::System::LibraryLoader::{GetModuleHandleW, GetProcAddress};
    let ntdll = wide(OsStr::new("ntdll.dll"));
    // SAFETY: both names are NUL-terminated; ntdll is always loaded; a null module or
    // procedure is checked, nothing is called.
    unsafe {
        let m = GetModuleHandleW(ntdll.as_ptr());
        !m.is_null() && GetProcAddress(m, c"wine_get_version".as_ptr().cast()).is_some()
    }
}

/// A kernel handle, closed on drop.
struct Handle(HANDLE);

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: the handle was returned open by the OS and is closed exactly once.
        unsafe { CloseHandle(self.0) };
    }
}

/// True if process `pid` runs (or exists and is not ours to query).
pub fn pid_alive(pid: u32) -> bool {
    // SAFETY: plain call; a null result is checked before use.
    let h = unsafe { OpenProcess(PROCESS_QUERY_LIMITED_INFORMATION, 0, pid) };
    if h.is_null() {
        return io::Error::last_os_error().raw_os_error() == Some(ERROR_ACCESS_DENIED as i32);
    }
    let h = Handle(h);
    let mut code = 0u32;
    // SAFETY: `h` is an open process handle with query rights; `code` a valid out pointer.
    let ok = unsafe { GetExitCodeProcess(h.0, &mut code) };
    ok != 0 && code == STILL_ACTIVE as u32
}

/// This process's access token, open for queries.
fn own_token() -> io::Result<Handle> {
    let mut token: HANDLE = std::ptr::null_mut();
    // SAFETY: GetCurrentProcess returns a pseudo handle that needs no closing; `token` is a
    // valid out pointer, closed by `Handle` on drop.
    let ok = unsafe { OpenProcessToken(GetCurrentProcess(), TOKEN_QUERY, &mut token) };
    if ok == 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Handle(token))
}

/// True if this process runs with an elevated (administrator) token.
pub fn is_elevated() -> bool {
    let Ok(token) = own_token() else {
        return false;
    };
    let mut elevation = TOKEN_ELEVATION::default();
    let mut len = 0u32;
    // SAFETY: `elevation` is a writable TOKEN_ELEVATION of the size passed; `len` a valid out
    // pointer.
    let ok = unsafe {
        GetTokenInformation(
            token.0,
            TokenElevation,
            (&mut elevation as *mut TOKEN_ELEVATION).cast(),
            size_of::<TOKEN_ELEVATION>() as u32,
            &mut len,
        )
    };
    ok != 0 && elevation.TokenIsElevated != 0
}

/// The string SID (`S-1-5-21-...`) of the user this process runs as.
pub(crate) fn own_sid() -> io::Result<String> {
    let token = own_token()?;
    let mut len = 0u32;
    // SAFETY: a size query: null buffer of length 0; the call fails and sets `len`.
    unsafe { GetTokenInformation(token.0, TokenUser, std::ptr::null_mut(), 0, &mut len) };
    // u64 elements: the buffer is aligned for TOKEN_USER (pointer alignment).
    let mut buf = vec![0u64; (len as usize).div_ceil(8).max(1)];
    // SAFETY: `buf` is writable for at least `len` bytes and suitably aligned.
    let ok =
        unsafe { GetTokenInformation(token.0, TokenUser, buf.as_mut_ptr().cast(), len, &mut len) };
    if ok == 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: on success the buffer starts with a TOKEN_USER whose Sid points into `buf`,
    // which lives until the end of this function.
    let sid = unsafe { (*(buf.as_ptr() as *const TOKEN_USER)).User.Sid };
    let mut text: *mut u16 = std::ptr::null_mut();
    // SAFETY: `sid` is a valid SID (above); `text` is a valid out pointer, freed below with
    // LocalFree as the API requires.
    let ok = unsafe { ConvertSidToStringSidW(sid, &mut text) };
    if ok == 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: on success `text` is a NUL-terminated UTF-16 string owned by us until LocalFree.
    let s = unsafe {
        let n = (0..).take_while(|&i| *text.add(i) != 0).count();
        let s = String::from_utf16_lossy(std::slice::from_raw_parts(text, n));
        LocalFree(text.cast());
        s
    };
    Ok(s)
}

/// A security descriptor made from SDDL, freed on drop.
struct Descriptor(PSECURITY_DESCRIPTOR);

impl Descriptor {
    fn from_sddl(sddl: &str) -> io::Result<Descriptor> {
        let w = wide(OsStr::new(sddl));
        let mut sd: PSECURITY_DESCRIPTOR = std::ptr::null_mut();
        // SAFETY: `w` is NUL-terminated UTF-16; `sd` a valid out pointer, freed on drop with
        // LocalFree; the size out pointer may be null.
        let ok = unsafe {
            ConvertStringSecurityDescriptorToSecurityDescriptorW(
                w.as_ptr(),
                SDDL_REVISION_1,
                &mut sd,
                std::ptr::null_mut(),
            )
        };
        if ok == 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Descriptor(sd))
    }

    /// The descriptor in SDDL, for the parts in `what` (owner, DACL).
    fn to_sddl(&self, what: OBJECT_SECURITY_INFORMATION) -> io::Result<String> {
        let mut text: *mut u16 = std::ptr::null_mut();
        // SAFETY: the descriptor is valid (from the OS); `text` is a valid out pointer, freed
        // below with LocalFree; the length out pointer may be null.
        let ok = unsafe {
            ConvertSecurityDescriptorToStringSecurityDescriptorW(
                self.0,
                SDDL_REVISION_1,
                what,
                &mut text,
                std::ptr::null_mut(),
            )
        };
        if ok == 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: on success `text` is a NUL-terminated UTF-16 string owned by us until
        // LocalFree.
        Ok(unsafe {
            let n = (0..).take_while(|&i| *text.add(i) != 0).count();
            let s = String::from_utf16_lossy(std::slice::from_raw_parts(text, n));
            LocalFree(text.cast());
            s
        })
    }

    fn attributes(&self) -> SECURITY_ATTRIBUTES {
        SECURITY_ATTRIBUTES {
            nLength: size_of::<SECURITY_ATTRIBUTES>() as u32,
            lpSecurityDescriptor: self.0,
            bInheritHandle: 0,
        }
    }
}

impl Drop for Descriptor {
    fn drop(&mut self) {
        // SAFETY: the descriptor was allocated by the OS for us (LocalAlloc) and is freed
        // exactly once.
        unsafe { LocalFree(self.0.cast()) };
    }
}

/// The owner in an SDDL string: `O:BA...` → `BA`.
fn sddl_owner(sddl: &str) -> String {
    let rest = sddl.strip_prefix("O:").unwrap_or(sddl);
    let end = rest.find(':').map_or(rest.len(), |i| i.saturating_sub(1));
    rest[..end].to_owned()
}

/// The owner in the descriptor a `Get*SecurityInfo` call answered (`rc`, `sd`), as SDDL names
/// it; the descriptor is freed.
fn owner_from(rc: u32, sd: PSECURITY_DESCRIPTOR) -> io::Result<String> {
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc as i32));
    }
    Ok(sddl_owner(
        &Descriptor(sd).to_sddl(OWNER_SECURITY_INFORMATION)?,
    ))
}

/// The owner of the file or directory `path`, as SDDL names it (`BA`, `SY`, `S-1-5-21-...`).
pub fn path_owner(path: &Path) -> io::Result<String> {
    let w = wide(path.as_os_str());
    let mut sd: PSECURITY_DESCRIPTOR = std::ptr::null_mut();
    // SAFETY: `w` is NUL-terminated UTF-16; only the descriptor is asked for (the other out
    // pointers may be null); it is freed by `Descriptor`.
    let rc = unsafe {
        GetNamedSecurityInfoW(
            w.as_ptr(),
            SE_FILE_OBJECT,
            OWNER_SECURITY_INFORMATION,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            &mut sd,
        )
    };
    owner_from(rc, sd)
}

/// The owner of the kernel object behind `handle` (a pipe), as SDDL names it.
fn handle_owner(handle: HANDLE) -> io::Result<String> {
    let mut sd: PSECURITY_DESCRIPTOR = std::ptr::null_mut();
    // SAFETY: `handle` is open (borrowed from its owner for the call); only the descriptor is
    // asked for; it is freed by `Descriptor`.
    let rc = unsafe {
        GetSecurityInfo(
            handle,
            SE_KERNEL_OBJECT,
            OWNER_SECURITY_INFORMATION,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            &mut sd,
        )
    };
    owner_from(rc, sd)
}

/// The state directory's security descriptor: owned by Administrators, a protected DACL (no
/// ACE inherited from C:\ProgramData, where every user may create files) granting SYSTEM and
/// Administrators full control and Users read and list only (the analogue of mode 0755: an
/// unelevated `status` still sees the sessions), inherited by the files inside.
pub const STATE_DIR_SDDL: &str = "O:BAD:PAI(A;OICI;FA;;;SY)(A;OICI;FA;;;BA)(A;OICI;0x1200a9;;;BU)";

/// Creates the state directory `dir` with [`STATE_DIR_SDDL`], or gives an existing one that
/// owner and DACL (someone may have created it first, with ProgramData's inherited ACL, and
/// planted journals: those stay untrusted by their owner).
pub fn secure_dir(dir: &Path) -> io::Result<()> {
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let sd = Descriptor::from_sddl(STATE_DIR_SDDL)?;
    let attrs = sd.attributes();
    let w = wide(dir.as_os_str());
    // SAFETY: `w` is NUL-terminated UTF-16; `attrs` points at a live descriptor.
    if unsafe { CreateDirectoryW(w.as_ptr(), &attrs) } != 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() != Some(ERROR_ALREADY_EXISTS as i32) {
        return Err(e);
    }
    let (mut owner, mut dacl): (PSID, *mut ACL) = (std::ptr::null_mut(), std::ptr::null_mut());
    let (mut defaulted, mut present) = (0, 0);
    // SAFETY: `sd` is a valid self-relative descriptor; the out pointers point into it and
    // live as long as it does (until the end of this function).
    unsafe {
        GetSecurityDescriptorOwner(sd.0, &mut owner, &mut defaulted);
        GetSecurityDescriptorDacl(sd.0, &mut present, &mut dacl, &mut defaulted);
    }
    // SAFETY: `w` names the directory; owner and DACL point into `sd`, alive here. Setting
    // the owner to Administrators needs the elevated token `up` runs with.
    let rc = unsafe {
        SetNamedSecurityInfoW(
            w.as_ptr(),
            SE_FILE_OBJECT,
            OWNER_SECURITY_INFORMATION
                | DACL_SECURITY_INFORMATION
                | PROTECTED_DACL_SECURITY_INFORMATION,
            owner,
            std::ptr::null_mut(),
            dacl,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} exists and its owner and ACL cannot be set to Administrators' ({}): delete it from an elevated prompt",
                dir.display(),
                io::Error::from_raw_os_error(rc as i32)
            ),
        ));
    }
    Ok(())
}

/// Makes Administrators the owner of `path` (a journal just written), whatever the policy
/// "Default owner for objects created by members of the Administrators group" says: a journal
/// is acted on only if owned by SYSTEM or Administrators.
pub fn claim_for_administrators(path: &Path) -> io::Result<()> {
    let sd = Descriptor::from_sddl("O:BA")?;
    let (mut owner, mut defaulted): (PSID, _) = (std::ptr::null_mut(), 0);
    // SAFETY: `sd` is valid; `owner` points into it, alive until the end of this function.
    unsafe { GetSecurityDescriptorOwner(sd.0, &mut owner, &mut defaulted) };
    let w = wide(path.as_os_str());
    // SAFETY: `w` names the file; `owner` is a valid SID (above).
    let rc = unsafe {
        SetNamedSecurityInfoW(
            w.as_ptr(),
            SE_FILE_OBJECT,
            OWNER_SECURITY_INFORMATION,
            owner,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    match rc {
        0 => Ok(()),
        code => Err(io::Error::from_raw_os_error(code as i32)),
    }
}

/// The control pipe's security descriptor in SDDL: owned by Administrators (a session runs
/// elevated; clients refuse a pipe owned by anyone else, see [`check_pipe_server`]), a
/// protected DACL granting full access to SYSTEM, the Administrators group and the user `sid`
/// only.
pub fn pipe_sddl(sid: &str) -> String {
    format!("O:BAD:P(A;;GA;;;SY)(A;;GA;;;BA)(A;;GA;;;{sid})")
}

/// Creates one instance of the control pipe `name`, owner-only (see [`pipe_sddl`]) and closed
/// to remote clients; `first`: fail if another process already serves that name.
pub fn create_pipe(name: &OsStr, first: bool) -> io::Result<NamedPipeServer> {
    create_pipe_with(name, first, &pipe_sddl(&own_sid()?))
}

/// [`create_pipe`] with the security descriptor `sddl`.
pub fn create_pipe_with(name: &OsStr, first: bool, sddl: &str) -> io::Result<NamedPipeServer> {
    let sd = Descriptor::from_sddl(sddl)?;
    let mut attrs = sd.attributes();
    // SAFETY: `attrs` is a valid SECURITY_ATTRIBUTES whose descriptor (`sd`) stays alive until
    // after the call (the pipe copies it).
    unsafe {
        ServerOptions::new()
            .first_pipe_instance(first)
            .reject_remote_clients(true)
            .create_with_security_attributes_raw(
                name,
                (&mut attrs as *mut SECURITY_ATTRIBUTES).cast(),
            )
    }
}

/// Refuses a control pipe that is not owned by SYSTEM or Administrators: a user who created
/// the pipe's name before the session (every user may create pipes) would otherwise receive
/// `status`, `down` and `run` requests of an administrator, and answer them.
pub fn check_pipe_server(
    pipe: &impl std::os::windows::io::AsRawHandle,
    name: &Path,
) -> io::Result<()> {
    let owner = handle_owner(pipe.as_raw_handle() as HANDLE)?;
    if trusted_owner(&owner) {
        return Ok(());
    }
    Err(io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!(
            "{} is served by a process that is not an elevated mse-vpn (the pipe's owner is {owner}): another program took its name; not talking to it",
            name.display()
        ),
    ))
}

/// Makes `file` the process's standard output (`SetStdHandle`): Rust's `stdout()` looks the
/// handle up on each write, so later output goes there. The handle is handed over to the
/// process's standard output for good (never closed).
pub fn set_stdout(file: std::fs::File) -> io::Result<()> {
    use std::os::windows::io::IntoRawHandle;
    use windows_sys::Win32::System::Console::{STD_OUTPUT_HANDLE, SetStdHandle};
    let handle = file.into_raw_handle();
    // SAFETY: SetStdHandle takes a handle value and a constant; it reads no memory of ours.
    // The handle is owned by nobody else now (into_raw_handle), so it stays valid.
    let ok = unsafe { SetStdHandle(STD_OUTPUT_HANDLE, handle as _) };
    if ok == 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pipe_acl_names_only_system_administrators_and_the_user() {
        let sid = own_sid().unwrap();
        assert!(sid.starts_with("S-1-"), "{sid}");
        assert_eq!(
            pipe_sddl("S-1-5-21-1-2-3-1001"),
            "O:BAD:P(A;;GA;;;SY)(A;;GA;;;BA)(A;;GA;;;S-1-5-21-1-2-3-1001)"
        );
    }

    /// Item 5 of issue 25. What Wine does with these calls, as observed (Wine 8): it accepts
    /// the state directory's descriptor but keeps only what maps to Unix permission bits
    /// (owner and ACEs are not stored: GetNamedSecurityInfoW answers a descriptor made from
    /// the file's Unix owner and mode, owned by the Wine user's SID), and it checks no file
    /// ACL on open. So this proves the calls are well formed and the owner is read; that the
    /// directory's ACL and journal owners hold is for a real Windows to show.
    #[test]
    fn the_state_directory_is_created_with_an_explicit_acl_and_owners_are_read() {
        let sd = Descriptor::from_sddl(STATE_DIR_SDDL).unwrap();
        assert_eq!(
            sd.to_sddl(OWNER_SECURITY_INFORMATION | DACL_SECURITY_INFORMATION)
                .unwrap(),
            STATE_DIR_SDDL,
            "the descriptor says what the SDDL says"
        );
        let dir = std::env::temp_dir().join(format!("mse-vpn-state-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        secure_dir(&dir).unwrap();
        secure_dir(&dir).unwrap();
        let journal = crate::journal::path_for(&dir, "mse0");
        drop(crate::journal::Journal::create(&journal, 1).unwrap());
        let owner = path_owner(&journal).unwrap();
        assert!(
            trusted_owner(&owner) || owner.starts_with("S-1-5-21-"),
            "{owner}"
        );
        assert_eq!(sddl_owner("O:BAD:P(A;;FA;;;SY)"), "BA");
        assert_eq!(
            sddl_owner("O:S-1-5-21-1-2-3-1001D:(A;;FA;;;SY)"),
            "S-1-5-21-1-2-3-1001"
        );
        assert_eq!(sddl_owner("O:SY"), "SY");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn our_process_is_alive() {
        assert!(pid_alive(std::process::id()));
        assert!(!pid_alive(0x7fff_fff0));
    }

    #[test]
    fn addresses_round_trip_through_sockaddr_inet() {
        for a in ["198.18.0.1", "fd6d:7365:7670:6e00::1"] {
            let ip: IpAddr = a.parse().unwrap();
            assert_eq!(from_sockaddr(&sockaddr(ip)), Some(ip));
        }
    }
}
