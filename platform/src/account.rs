//! Users and file ownership, per OS: the account behind a login name or the current process,
//! and the owner/permission operations mse-vpn does on the user's files (`~/.ssh`, password
//! files, the state directory).
//!
//! - **Unix** (Linux, macOS): the passwd database (`nix`), numeric uid/gid, file modes and
//!   `chown`. Under `sudo` the files mse-vpn creates for the user are given to the user.
//! - **Windows**: there is no `sudo`; an elevated prompt runs as the same user (with an admin
//!   token), so the account is the current one: name from `USERNAME`, home from the profile
//!   directory (`USERPROFILE`). There are no numeric ids (both read as 0) and no modes: files
//!   created in the profile inherit its ACL, which grants the user and administrators only.
//!   mse-vpn does **not** inspect file ACLs on Windows ([`owner_and_mode`] answers `None`):
//!   that is a documented choice (README, "Operating systems"), not an oversight.

use std::path::{Path, PathBuf};

/// A user account.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Account {
    /// Login name.
    pub name: String,
    /// Numeric user id (0 on Windows).
    pub uid: u32,
    /// Numeric primary group id (0 on Windows).
    pub gid: u32,
    /// Home directory (the profile directory on Windows).
    pub home: PathBuf,
}

#[cfg(unix)]
fn from_nix(u: nix::unistd::User) -> Account {
    Account {
        name: u.name,
        uid: u.uid.as_raw(),
        gid: u.gid.as_raw(),
        home: u.dir,
    }
}

/// The account named `name`, if it exists.
#[cfg(unix)]
pub fn by_name(name: &str) -> std::io::Result<Option<Account>> {
    nix::unistd::User::from_name(name)
        .map(|u| u.map(from_nix))
        .map_err(std::io::Error::from)
}

/// The account with user id `uid`, if it exists.
#[cfg(unix)]
pub fn by_uid(uid: u32) -> Option<Account> {
    nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(from_nix)
}

/// The account this process runs as.
#[cfg(unix)]
pub fn current() -> std::io::Result<Option<Account>> {
    nix::unistd::User::from_uid(nix::unistd::Uid::current())
        .map(|u| u.map(from_nix))
        .map_err(std::io::Error::from)
}

/// See the Unix version: on Windows only the current account is known by name.
#[cfg(windows)]
pub fn by_name(name: &str) -> std::io::Result<Option<Account>> {
    Ok(current()?.filter(|a| a.name.eq_ignore_ascii_case(name)))
}

/// See the Unix version: Windows has no numeric user ids.
#[cfg(windows)]
pub fn by_uid(_uid: u32) -> Option<Account> {
    None
}

/// The account this process runs as: `USERNAME` and the profile directory.
#[cfg(windows)]
pub fn current() -> std::io::Result<Option<Account>> {
    let name = std::env::var("USERNAME").ok();
    let home = std::env::var_os("USERPROFILE")
        .map(PathBuf::from)
        .or_else(std::env::home_dir);
    Ok(name.zip(home).map(|(name, home)| Account {
        name,
        uid: 0,
        gid: 0,
        home,
    }))
}

/// A file's owner uid and permission bits, where the OS has them (`None` on Windows: see the
/// module docs).
#[cfg(unix)]
pub fn owner_and_mode(meta: &std::fs::Metadata) -> Option<(u32, u32)> {
    use std::os::unix::fs::MetadataExt;
    Some((meta.uid(), meta.mode() & 0o7777))
}

/// See the Unix version.
#[cfg(windows)]
pub fn owner_and_mode(_meta: &std::fs::Metadata) -> Option<(u32, u32)> {
    None
}

/// Gives `path` to `uid`/`gid` (a no-op on Windows, where the profile's ACL is inherited).
pub fn chown(path: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    #[cfg(unix)]
    return std::os::unix::fs::chown(path, Some(uid), Some(gid));
    #[cfg(windows)]
    {
        let _ = (path, uid, gid);
        Ok(())
    }
}

/// Sets `path`'s permission bits (a no-op on Windows).
pub fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
    }
    #[cfg(windows)]
    {
        let _ = (path, mode);
        Ok(())
    }
}

/// Creates the directory `dir` readable by its owner only (mode 0700 on Unix; on Windows it
/// inherits its parent's ACL).
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new().mode(0o700).create(dir)
    }
    #[cfg(windows)]
    std::fs::create_dir(dir)
}

/// Creates the symlink `link` pointing at `target` (Windows: a file symlink, which needs the
/// privilege elevated processes have).
pub fn symlink(target: &Path, link: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    return std::os::unix::fs::symlink(target, link);
    #[cfg(windows)]
    return std::os::windows::fs::symlink_file(target, link);
}

/// True if a file (a journal) or pipe owned by `owner` (as SDDL names it: `BA`, `SY`,
/// `S-1-5-...`) was made by an elevated mse-vpn: SYSTEM or the Administrators group (what an
/// elevated process's files are owned by, and what `win32.rs` sets explicitly). Windows only;
/// pure, so that it is tested on every OS.
pub fn trusted_owner(owner: &str) -> bool {
    matches!(owner, "SY" | "BA" | "S-1-5-18" | "S-1-5-32-544")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_current_account_has_a_name_and_a_home() {
        let me = current().unwrap().expect("the current account");
        assert!(!me.name.is_empty());
        assert!(me.home.is_absolute(), "{}", me.home.display());
        assert_eq!(by_name(&me.name).unwrap(), Some(me.clone()));
        assert_eq!(by_name("no-such-user-mse-vpn").unwrap(), None);
    }

    #[test]
    fn private_dirs_and_modes() {
        let dir = std::env::temp_dir().join(format!("mse-vpn-account-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        create_private_dir(&dir).unwrap();
        let f = dir.join("secret");
        std::fs::write(&f, "x").unwrap();
        set_mode(&f, 0o600).unwrap();
        let meta = std::fs::metadata(&f).unwrap();
        let modes = owner_and_mode(&meta)
            .zip(owner_and_mode(&std::fs::metadata(&dir).unwrap()))
            .map(|((_, f), (_, d))| (f, d));
        let expected = if cfg!(windows) {
            None // documented: no modes
        } else {
            Some((0o600, 0o700))
        };
        assert_eq!(modes, expected);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
