//! The Windows system calls of mse-vpn below the network backend: process liveness, token
//! elevation and the user's SID, file and pipe owners, the state directory's and the control
//! pipe's security descriptors, and the standard output handle. One of the two Windows files
//! with `unsafe` code (the other, `win32net.rs`, makes the network calls); this one imports
//! nothing from the rest of the crate but [`crate::account::trusted_owner`], so that
//! `process`, `journal` and `ipc` can build on it.
//!
//! Proven here by type-checking and clippy for x86_64-pc-windows-gnu and -msvc, and by unit
//! tests under Wine (process liveness, elevation, the pipe ACL).

#![allow(unsafe_code)]

use std::ffi::OsStr;
use std::io;
use std::os::windows::ffi::OsStrExt;
use std::path::Path;

use tokio::net::windows::named_pipe::{NamedPipeServer, ServerOptions};
use windows_sys::Win32::Foundation::{
    CloseHandle, ERROR_ACCESS_DENIED, ERROR_ALREADY_EXISTS, HANDLE, LocalFree, STILL_ACTIVE,
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
use windows_sys::Win32::System::Threading::{
    GetCurrentProcess, GetExitCodeProcess, OpenProcess, OpenProcessToken,
    PROCESS_QUERY_LIMITED_INFORMATION,
};

use crate::account::trusted_owner;

/// `s` as a NUL-terminated UTF-16 string.
pub(crate) fn wide(s: &OsStr) -> Vec<u16> {
    s.encode_wide().chain(Some(0)).collect()
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
        // What `Journal::create` does with a journal: write it, then claim it.
        let journal = dir.join("mse0.journal");
        std::fs::write(&journal, "mse-vpn-journal 1\n").unwrap();
        claim_for_administrators(&journal).unwrap();
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
}
