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

use ipnet::IpNet;
use tokio::net::windows::named_pipe::{NamedPipeServer, ServerOptions};
use windows_sys::Win32::Foundation::{
    CloseHandle, ERROR_ACCESS_DENIED, ERROR_FILE_NOT_FOUND, ERROR_NOT_FOUND, HANDLE, LocalFree,
    STILL_ACTIVE,
};
use windows_sys::Win32::NetworkManagement::IpHelper::{
    ConvertInterfaceAliasToLuid, CreateIpForwardEntry2, CreateUnicastIpAddressEntry,
    DeleteIpForwardEntry2, DeleteUnicastIpAddressEntry, FreeMibTable, GetBestRoute2,
    GetIpForwardTable2, InitializeIpForwardEntry, InitializeUnicastIpAddressEntry,
    MIB_IPFORWARD_ROW2, MIB_IPFORWARD_TABLE2, MIB_UNICASTIPADDRESS_ROW,
};
use windows_sys::Win32::NetworkManagement::Ndis::NET_LUID_LH;
use windows_sys::Win32::Networking::WinSock::{
    AF_INET, AF_INET6, AF_UNSPEC, IpDadStatePreferred, MIB_IPPROTO_LOCAL, MIB_IPPROTO_NETMGMT,
    SOCKADDR_INET,
};
use windows_sys::Win32::Security::Authorization::{
    ConvertSidToStringSidW, ConvertStringSecurityDescriptorToSecurityDescriptorW, SDDL_REVISION_1,
};
use windows_sys::Win32::Security::{
    GetTokenInformation, SECURITY_ATTRIBUTES, TOKEN_ELEVATION, TOKEN_QUERY, TOKEN_USER,
    TokenElevation, TokenUser,
};
use windows_sys::Win32::System::GroupPolicy::{RP_FORCE, RefreshPolicyEx};
use windows_sys::Win32::System::Registry::{
    HKEY, HKEY_LOCAL_MACHINE, KEY_WRITE, REG_DWORD, REG_MULTI_SZ, REG_OPTION_NON_VOLATILE, REG_SZ,
    RegCloseKey, RegCreateKeyExW, RegDeleteTreeW, RegSetValueExW,
};
use windows_sys::Win32::System::Threading::{
    GetCurrentProcess, GetExitCodeProcess, OpenProcess, OpenProcessToken,
    PROCESS_QUERY_LIMITED_INFORMATION,
};

use crate::PlatformError;
use crate::host::RouteEntry;
use crate::windows::{Api, Call, NRPT_ROOT};

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
        // SAFETY: the handle came from RegCreateKeyExW and is closed exactly once.
        unsafe { RegCloseKey(self.0) };
    }
}

impl Key {
    fn set(&self, name: &str, kind: u32, data: &[u8]) -> Result<(), PlatformError> {
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

fn set_nrpt_rule(key: &str, names: &[String], server: IpAddr) -> Result<(), PlatformError> {
    let path = wide(OsStr::new(&format!(r"{NRPT_ROOT}\{key}")));
    let mut handle: HKEY = std::ptr::null_mut();
    // SAFETY: `path` is NUL-terminated UTF-16; `handle` is a valid out pointer; no class, no
    // security attributes, no disposition wanted (null pointers allowed by the API).
    let rc = unsafe {
        RegCreateKeyExW(
            HKEY_LOCAL_MACHINE,
            path.as_ptr(),
            0,
            std::ptr::null(),
            REG_OPTION_NON_VOLATILE,
            KEY_WRITE,
            std::ptr::null(),
            &mut handle,
            std::ptr::null_mut(),
        )
    };
    made("RegCreateKeyExW", rc)?;
    let k = Key(handle);
    // REG_MULTI_SZ: each string NUL-terminated, then one more NUL.
    let multi = names
        .iter()
        .flat_map(|n| n.encode_utf16().chain(Some(0)))
        .chain(Some(0));
    k.set("Name", REG_MULTI_SZ, &utf16_bytes(multi))?;
    let server = server.to_string();
    k.set(
        "GenericDNSServers",
        REG_SZ,
        &utf16_bytes(server.encode_utf16().chain(Some(0))),
    )?;
    // 0x8: the rule names generic DNS servers; version 2 of the rule format.
    k.set("ConfigOptions", REG_DWORD, &8u32.to_le_bytes())?;
    k.set("Version", REG_DWORD, &2u32.to_le_bytes())?;
    k.set("IPSECCARestriction", REG_SZ, &[0, 0])
}

fn delete_nrpt_rule(key: &str) -> Result<bool, PlatformError> {
    let path = wide(OsStr::new(&format!(r"{NRPT_ROOT}\{key}")));
    // SAFETY: `path` is NUL-terminated UTF-16 naming a subkey of HKLM.
    let rc = unsafe { RegDeleteTreeW(HKEY_LOCAL_MACHINE, path.as_ptr()) };
    deleted("RegDeleteTreeW", rc)
}

fn refresh_dns() -> Result<bool, PlatformError> {
    // SAFETY: plain call with integer arguments; it asks the policy engine (and with it the
    // DNS client) to re-read the machine's policy.
    unsafe { RefreshPolicyEx(1, RP_FORCE) };
    // The DNS client's cache may still hold answers from before the rule.
    let _ = std::process::Command::new("ipconfig")
        .arg("/flushdns")
        .stdout(std::process::Stdio::null())
        .status();
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
            Call::SetNrptRule { key, names, server } => {
                set_nrpt_rule(key, names, *server).map(|()| true)
            }
            Call::DeleteNrptRule { key } => delete_nrpt_rule(key),
            Call::RefreshDns => refresh_dns(),
        }
    }

    fn pid_alive(&self, pid: i32) -> bool {
        crate::process::pid_alive(pid)
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
fn own_sid() -> io::Result<String> {
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

/// The control pipe's security descriptor in SDDL: a protected DACL granting full access to
/// SYSTEM, the Administrators group and the user `sid` only.
pub fn pipe_sddl(sid: &str) -> String {
    format!("D:P(A;;GA;;;SY)(A;;GA;;;BA)(A;;GA;;;{sid})")
}

/// Creates one instance of the control pipe `name`, owner-only (see [`pipe_sddl`]) and closed
/// to remote clients; `first`: fail if another process already serves that name.
pub fn create_pipe(name: &OsStr, first: bool) -> io::Result<NamedPipeServer> {
    let sddl = wide(OsStr::new(&pipe_sddl(&own_sid()?)));
    let mut sd: *mut core::ffi::c_void = std::ptr::null_mut();
    // SAFETY: `sddl` is NUL-terminated UTF-16; `sd` a valid out pointer, freed below with
    // LocalFree; the size out pointer may be null.
    let ok = unsafe {
        ConvertStringSecurityDescriptorToSecurityDescriptorW(
            sddl.as_ptr(),
            SDDL_REVISION_1,
            &mut sd,
            std::ptr::null_mut(),
        )
    };
    if ok == 0 {
        return Err(io::Error::last_os_error());
    }
    let mut attrs = SECURITY_ATTRIBUTES {
        nLength: size_of::<SECURITY_ATTRIBUTES>() as u32,
        lpSecurityDescriptor: sd,
        bInheritHandle: 0,
    };
    // SAFETY: `attrs` is a valid SECURITY_ATTRIBUTES whose descriptor stays alive until after
    // the call (the pipe copies it); it is freed right after, exactly once.
    unsafe {
        let r = ServerOptions::new()
            .first_pipe_instance(first)
            .reject_remote_clients(true)
            .create_with_security_attributes_raw(
                name,
                (&mut attrs as *mut SECURITY_ATTRIBUTES).cast(),
            );
        LocalFree(sd);
        r
    }
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
            "D:P(A;;GA;;;SY)(A;;GA;;;BA)(A;;GA;;;S-1-5-21-1-2-3-1001)"
        );
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
