//! Who invoked mse-vpn. Under `sudo` that is `SUDO_USER`, not root: their `~/.ssh` holds the
//! keys and `known_hosts` the user trusts, and files we create there must belong to them. On
//! Windows, where an elevated prompt runs as the same user, it is the current user and their
//! profile directory (the account lookups are `mse_vpn_platform::account`'s).

use std::path::PathBuf;

use mse_vpn_platform::account::{self, Account};
use thiserror::Error;

/// The invoking user could not be determined.
#[derive(Debug, Error)]
pub enum UserError {
    /// No passwd entry for the user.
    #[error("no passwd entry for user {0}")]
    Unknown(String),
    /// The passwd lookup failed.
    #[error("passwd lookup failed: {0}")]
    Lookup(#[source] std::io::Error),
}

/// The human behind this process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InvokingUser {
    name: String,
    uid: u32,
    gid: u32,
    home: PathBuf,
    agent_socket: Option<PathBuf>,
}

impl InvokingUser {
    /// From the process environment: `SUDO_USER` when running as root under sudo, else the
    /// current user.
    pub fn detect() -> Result<InvokingUser, UserError> {
        let sudo_user = std::env::var("SUDO_USER").ok();
        let agent = std::env::var_os("SSH_AUTH_SOCK").map(PathBuf::from);
        #[cfg(windows)]
        let agent = agent.or_else(|| Some(PathBuf::from(super::agent::DEFAULT_AGENT)));
        Self::resolve(
            cfg!(unix) && mse_vpn_platform::process::is_privileged(),
            sudo_user.as_deref(),
            agent,
            account::by_name,
            account::current,
        )
    }

    /// The testable core of [`InvokingUser::detect`].
    pub fn resolve(
        is_root: bool,
        sudo_user: Option<&str>,
        agent_socket: Option<PathBuf>,
        by_name: impl Fn(&str) -> std::io::Result<Option<Account>>,
        current: impl Fn() -> std::io::Result<Option<Account>>,
    ) -> Result<InvokingUser, UserError> {
        let user = match sudo_user.filter(|u| is_root && !u.is_empty() && *u != "root") {
            Some(name) => by_name(name)
                .map_err(UserError::Lookup)?
                .ok_or_else(|| UserError::Unknown(name.to_owned()))?,
            None => current()
                .map_err(UserError::Lookup)?
                .ok_or_else(|| UserError::Unknown("current user".to_owned()))?,
        };
        Ok(InvokingUser {
            name: user.name,
            uid: user.uid,
            gid: user.gid,
            home: user.home,
            agent_socket: agent_socket.filter(|p| !p.as_os_str().is_empty()),
        })
    }

    /// Login name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Numeric user id.
    pub fn uid(&self) -> u32 {
        self.uid
    }

    /// Numeric primary group id.
    pub fn gid(&self) -> u32 {
        self.gid
    }

    /// Home directory.
    pub fn home(&self) -> &std::path::Path {
        &self.home
    }

    /// `~/.ssh/known_hosts`.
    pub fn known_hosts_path(&self) -> PathBuf {
        self.home.join(".ssh").join("known_hosts")
    }

    /// The default key files OpenSSH tries, that exist, in OpenSSH's order.
    pub fn default_identity_files(&self) -> Vec<PathBuf> {
        ["id_ed25519", "id_ecdsa", "id_rsa"]
            .iter()
            .map(|f| self.home.join(".ssh").join(f))
            .filter(|p| p.is_file())
            .collect()
    }

    /// The ssh-agent socket, when the environment still has one (sudo drops it unless told
    /// to keep `SSH_AUTH_SOCK`).
    pub fn agent_socket(&self) -> Option<PathBuf> {
        self.agent_socket.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str, uid: u32, home: &str) -> Account {
        Account {
            name: name.into(),
            uid,
            gid: uid,
            home: home.into(),
        }
    }

    #[test]
    fn under_sudo_the_invoking_user_wins() {
        let u = InvokingUser::resolve(
            true,
            Some("alice"),
            None,
            |n| Ok((n == "alice").then(|| user("alice", 1000, "/home/alice"))),
            || Ok(Some(user("root", 0, "/root"))),
        )
        .unwrap();
        assert_eq!(u.name(), "alice");
        assert_eq!(u.uid(), 1000);
        assert_eq!(
            u.known_hosts_path(),
            PathBuf::from("/home/alice/.ssh/known_hosts")
        );
    }

    #[test]
    fn without_sudo_or_as_plain_user_the_current_user_is_used() {
        let root = || Ok(Some(user("root", 0, "/root")));
        let u = InvokingUser::resolve(true, None, None, |_| Ok(None), root).unwrap();
        assert_eq!(u.name(), "root");
        // SUDO_USER is ignored when we are not root (it cannot be trusted then).
        let u = InvokingUser::resolve(
            false,
            Some("alice"),
            Some(PathBuf::from("/tmp/agent.sock")),
            |_| Ok(Some(user("alice", 1000, "/home/alice"))),
            || Ok(Some(user("bob", 1001, "/home/bob"))),
        )
        .unwrap();
        assert_eq!(u.name(), "bob");
        assert_eq!(u.agent_socket(), Some(PathBuf::from("/tmp/agent.sock")));
    }

    #[test]
    fn unknown_sudo_user_is_an_error() {
        let e = InvokingUser::resolve(true, Some("ghost"), None, |_| Ok(None), || Ok(None))
            .unwrap_err();
        assert!(e.to_string().contains("ghost"));
    }
}
