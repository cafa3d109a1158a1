//! The documented exit statuses (`EXIT_*`, listed in the man page): which one an error that
//! ends a command maps to, from the typed error inside its chain.

use mse_vpn_platform as platform;

use super::profile::ProfileError;
use super::{EXIT_AUTH, EXIT_FAILURE, EXIT_HOST_KEY, EXIT_UNREACHABLE, EXIT_USAGE, SetupError};
use crate::session::SessionError;
use crate::ssh::{self, SshError};

/// The documented exit status for an error, from the typed error inside it.
pub fn exit_code(e: &anyhow::Error) -> u8 {
    for cause in e.chain() {
        if cause.is::<ssh::config::ConfigError>()
            || cause.is::<ProfileError>()
            || cause.is::<platform::PlanError>()
        {
            return EXIT_USAGE;
        }
        if let Some(ssh) = cause.downcast_ref::<SshError>() {
            return ssh_exit_code(ssh);
        }
        // The layers that carry the errors above transparently.
        match cause.downcast_ref::<SessionError>() {
            Some(SessionError::Ssh(ssh)) => return ssh_exit_code(ssh),
            Some(SessionError::Plan(_)) => return EXIT_USAGE,
            Some(_) => return EXIT_FAILURE,
            None => {}
        }
        match cause.downcast_ref::<SetupError>() {
            Some(SetupError::Ssh(ssh)) => return ssh_exit_code(ssh),
            Some(SetupError::Config(_)) => return EXIT_USAGE,
            None => {}
        }
    }
    EXIT_FAILURE
}

/// The exit status for an SSH failure: who has to act (the user's credentials, the host key,
/// the network).
pub fn ssh_exit_code(e: &SshError) -> u8 {
    use SshError as E;
    match e {
        E::AuthFailed { .. }
        | E::WrongPassword { .. }
        | E::PasswordFile { .. }
        | E::WrongPassphrase { .. }
        | E::NoTerminalForPassphrase { .. }
        | E::KeyFile { .. }
        | E::NoKeyFile { .. }
        | E::PublicKeyFile { .. } => EXIT_AUTH,
        E::UnknownHostKey { .. }
        | E::HostKeyChanged { .. }
        | E::HostKeyRevoked { .. }
        | E::KnownHosts { .. } => EXIT_HOST_KEY,
        E::Resolve { .. }
        | E::UnknownAlias { .. }
        | E::Unreachable { .. }
        | E::ConnectTimeout { .. }
        | E::HopForward { .. }
        | E::ProxyCommandEnded { .. }
        | E::Refused { .. }
        | E::RefusedTooLong { .. } => EXIT_UNREACHABLE,
        _ => EXIT_FAILURE,
    }
}
