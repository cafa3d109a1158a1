//! The SSH side: one authenticated russh client connection to the jump host, and
//! `direct-tcpip` channels on it. This module (with `tun.rs` and the platform crate) is one of
//! the few places that touch the OS: it resolves names, opens TCP connections, reads key
//! files and `known_hosts`, and may prompt on the terminal for a key's passphrase.
//!
//! Never logged: passphrases, key material, channel payloads.

mod agent;
mod command;
pub mod config;
mod effective;
mod key_file;
pub mod known_hosts;
pub mod password;
pub mod resolve;
mod target;
mod user;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use russh::client::{self, Handle};
use russh::keys::{PrivateKeyWithHashAlg, PublicKey};
use russh::{ChannelOpenFailure, Preferred, cipher};
use thiserror::Error;
use tokio::sync::watch;
use tracing::{debug, warn};

pub use key_file::check as check_key_file;
pub use known_hosts::Verdict;
pub use target::{JumpHost, JumpHostError};
pub use user::{InvokingUser, UserError};

/// How to reach and log in to the jump host.
#[derive(Clone, Debug)]
pub struct SshOptions {
    /// The jump host.
    pub jump: JumpHost,
    /// Login name (resolved: the `user@` part, or the invoking user's name).
    pub user: String,
    /// Private key files to try, in order, after the agent's identities.
    pub identity_files: Vec<PathBuf>,
    /// The `known_hosts` file to check (and, with `accept_new_host_key`, to extend).
    pub known_hosts: PathBuf,
    /// Record an unknown host key instead of refusing it (a changed key is always refused).
    pub accept_new_host_key: bool,
    /// Limit for TCP connect + SSH handshake, and for each authentication request. Time spent
    /// waiting for the user to type a key's passphrase does not count.
    pub connect_timeout: Duration,
    /// SSH keepalive interval.
    pub keepalive_interval: Duration,
    /// Unanswered keepalives after which the connection is declared dead.
    pub keepalive_max: u32,
    /// Per-channel receive window (bytes): the most each grant gives a channel.
    pub window_size: u32,
    /// The memory budget channels' receive windows are counted in (`--memory-budget`): each
    /// channel starts with [`crate::budget::INITIAL_WINDOW`] and its grants shrink as the
    /// budget fills. `None`: every channel gets `window_size`.
    pub budget: Option<Arc<crate::budget::MemoryBudget>>,
    /// ssh-agent socket, if any.
    pub agent_socket: Option<PathBuf>,
    /// `IdentitiesOnly yes`: of the agent's keys, offer only those of the identity files.
    pub identities_only: bool,
    /// `ProxyCommand` (tokens expanded): the jump host is reached through this command's
    /// standard input and output instead of a TCP connection. Run by `sh -c`, as the invoking
    /// user. Not with `hops`.
    pub proxy_command: Option<String>,
    /// Owner for files created under the user's home (known_hosts), when running as root for
    /// another user.
    pub file_owner: Option<(u32, u32)>,
    /// Each connection of the pool runs one command so that the jump host's sshd sends
    /// without Nagle's delay ([`Session::start_bulk_mode`]).
    pub bulk_mode: bool,
    /// Where cloud callers' connections to our `tcpip-forward` listeners go. `None` rejects
    /// them.
    pub inbound: Option<InboundSender>,
    /// `ProxyJump` hops, in order: the first is the only host this machine connects to
    /// directly; each next one (and finally `jump`) is reached through the one before.
    pub hops: Vec<Hop>,
    /// `--password-file`: the password for password / keyboard-interactive authentication
    /// (otherwise it is asked on the terminal, if the server offers those methods).
    pub password_file: Option<PathBuf>,
}

/// One `ProxyJump` hop, resolved through the ssh config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hop {
    /// Host name or address.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Login name.
    pub user: String,
    /// Key files to try after the agent's identities.
    pub identity_files: Vec<PathBuf>,
    /// Its `known_hosts` file (`--known-hosts`, else its own `UserKnownHostsFile`, else
    /// the user's default).
    pub known_hosts: PathBuf,
}

impl SshOptions {
    /// The jump host as `user@host:port`, with the ProxyJump hops it is reached through.
    pub fn target_label(&self) -> String {
        match self.hops.as_slice() {
            [] => self.jump.to_string(),
            hops => format!(
                "{} via {}",
                self.jump,
                hops.iter()
                    .map(|h| format!("{}@{}:{}", h.user, h.host, h.port))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }

    /// The host and port this machine opens a TCP connection to, if it opens one at all (not
    /// with a `ProxyCommand`). Only this address must stay out of the tunnel.
    pub fn direct_target(&self) -> Option<(&str, u16)> {
        self.proxy_command.is_none().then(|| self.first_hop())
    }

    /// The host and port this machine opens a TCP connection to: the first `ProxyJump` hop,
    /// or the jump host itself. Only this address must stay out of the tunnel.
    pub fn first_hop(&self) -> (&str, u16) {
        match self.hops.first() {
            Some(h) => (&h.host, h.port),
            None => (&self.jump.host, self.jump.port),
        }
    }
}

/// Who logs in where: the jump host or one hop.
struct Login<'a> {
    /// Host name or address (for known_hosts and messages).
    host: &'a str,
    /// TCP port.
    port: u16,
    /// Login name.
    user: &'a str,
    /// Key files.
    identity_files: &'a [PathBuf],
    /// Where its host key is checked (and, with accept-new, recorded).
    known_hosts: &'a Path,
}

/// A cloud caller's connection to one of our `tcpip-forward` listeners on the jump host,
/// not yet accepted: accept it once the local app answered, or drop `reply` to refuse it
/// (the jump host then closes the caller's connection).
pub struct Inbound {
    /// [`Session::id`] of the connection it arrived on.
    pub session: u64,
    /// The jump host port the caller connected to (the listener's port).
    pub listen_port: u16,
    /// The caller's address and port as the jump host reports them (`None` if unparsable).
    pub caller: Option<SocketAddr>,
    /// The channel.
    pub channel: russh::Channel<client::Msg>,
    /// Accepts or refuses the channel.
    pub reply: client::ChannelOpenHandle,
}

/// The bounded queue of [`Inbound`] connections to the driver.
pub type InboundSender = tokio::sync::mpsc::Sender<Inbound>;

/// Numbers sessions for [`Session::id`].
static NEXT_SESSION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Why a `direct-tcpip` channel did not open.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
pub enum OpenError {
    /// The jump host could not connect to the destination (closed port, no route).
    #[error("the jump host could not connect to the destination")]
    ConnectFailed,
    /// The jump host forbids forwarding (`AllowTcpForwarding no`, `permitopen`).
    #[error("the jump host forbids TCP forwarding (AllowTcpForwarding)")]
    Prohibited,
    /// No answer within the open timeout.
    #[error("the jump host did not answer the channel open in time")]
    Timeout,
    /// The SSH connection is gone.
    #[error("the SSH connection is closed")]
    SessionLost,
    /// Any other refusal (resource shortage, unknown type).
    #[error("the jump host refused the channel")]
    Other,
}

/// Failure to connect or authenticate. Messages say what happened and what to do.
#[derive(Debug, Error)]
pub enum SshError {
    /// The jump host's name does not resolve.
    #[error(
        "could not resolve the jump host {host}: {source}. Check the name, or use its IP address"
    )]
    Resolve {
        /// The name.
        host: String,
        /// The resolver error.
        #[source]
        source: std::io::Error,
    },
    /// The typed jump host does not resolve, and is close to an alias of the ssh config.
    #[error(
        "could not resolve the jump host {host}: {source}. Did you mean `{alias}`, a Host of your ssh config?"
    )]
    UnknownAlias {
        /// The name as typed.
        host: String,
        /// The alias it is probably a typo of.
        alias: String,
        /// The resolver error.
        #[source]
        source: std::io::Error,
    },
    /// TCP connect failed (refused, unreachable).
    #[error(
        "cannot reach the jump host at {addr}: {source}. Check the address and port, and that sshd runs there"
    )]
    Unreachable {
        /// The address tried.
        addr: SocketAddr,
        /// The socket error.
        #[source]
        source: std::io::Error,
    },
    /// No connection within the timeout.
    #[error("the jump host {target} did not answer within {secs} s (firewall or wrong address?)")]
    ConnectTimeout {
        /// `host:port`.
        target: String,
        /// The timeout.
        secs: u64,
    },
    /// The server's key is not in known_hosts.
    #[error(
        "the host key of {target} is not known ({algorithm} {fingerprint}){}. Verify it (e.g. `ssh-keygen -lf /etc/ssh/ssh_host_{kind}_key.pub` on the jump host), then re-run with --accept-new-host-key to record it in {path}",
        certificate.as_ref().map(|why| format!("; its host certificate was not accepted: {why}")).unwrap_or_default()
    )]
    UnknownHostKey {
        /// `host:port`.
        target: String,
        /// Key algorithm.
        algorithm: String,
        /// Key kind for the hint (ed25519, ecdsa, rsa).
        kind: &'static str,
        /// `SHA256:...`.
        fingerprint: String,
        /// The known_hosts file.
        path: PathBuf,
        /// Why the host certificate the server presented was not accepted, if it presented
        /// one.
        certificate: Option<String>,
    },
    /// The server's key differs from the recorded one.
    #[error(
        "WARNING: the host key of {target} has CHANGED (now {fingerprint}). Someone may be intercepting the connection. If the change is expected, remove line {line} of {path} and connect again"
    )]
    HostKeyChanged {
        /// `host:port`.
        target: String,
        /// The new key's fingerprint.
        fingerprint: String,
        /// The known_hosts file.
        path: PathBuf,
        /// The line holding the old key.
        line: usize,
    },
    /// The server's key (or the authority of its certificate) is marked `@revoked`.
    #[error(
        "WARNING: REVOKED HOST KEY DETECTED: the host key of {target} ({fingerprint}) is marked as revoked on line {line} of {path}; a stolen key may be used to impersonate the jump host. Refusing to connect (even with --accept-new-host-key): ask the jump host's admin"
    )]
    HostKeyRevoked {
        /// `host:port`.
        target: String,
        /// The presented key's fingerprint.
        fingerprint: String,
        /// The known_hosts file.
        path: PathBuf,
        /// The `@revoked` line.
        line: usize,
    },
    /// known_hosts could not be read or written.
    #[error("cannot use known_hosts file {path}: {source}")]
    KnownHosts {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: russh::keys::Error,
    },
    /// A key file could not be loaded.
    #[error("cannot load key file {path}: {source}")]
    KeyFile {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: russh::keys::Error,
    },
    /// A key file given with `-i` does not exist.
    #[error(
        "key file {path} does not exist: pass an existing private key with -i, or omit -i to use the agent and ~/.ssh/id_*"
    )]
    NoKeyFile {
        /// The file.
        path: PathBuf,
    },
    /// A public key file was given where the private key is needed.
    #[error("{path} is a public key: pass the private key{}", private.as_ref().map(|p| format!(" ({})", p.display())).unwrap_or_default())]
    PublicKeyFile {
        /// The file given.
        path: PathBuf,
        /// The private key next to it (the same name without `.pub`), if it exists.
        private: Option<PathBuf>,
    },
    /// An encrypted key needs a passphrase and there is no terminal to ask on.
    #[error(
        "key file {path} is encrypted and there is no terminal to ask for its passphrase: add it to ssh-agent, or run mse-vpn from a terminal"
    )]
    NoTerminalForPassphrase {
        /// The file.
        path: PathBuf,
    },
    /// The passphrase typed for an encrypted key was wrong every time it was asked.
    #[error(
        "wrong passphrase for key file {path} (asked {attempts} times): run mse-vpn again and retype it, or add the key to ssh-agent with `ssh-add {path}`"
    )]
    WrongPassphrase {
        /// The file.
        path: PathBuf,
        /// How many times it was asked.
        attempts: u32,
    },
    /// Every method failed.
    #[error(
        "authentication as {user} on {target} failed (tried: {tried}). Check the user name, and that one of these keys is in ~{user}/.ssh/authorized_keys on the jump host; pass another key with -i"
    )]
    AuthFailed {
        /// Login name.
        user: String,
        /// `host:port`.
        target: String,
        /// What was tried.
        tried: String,
    },
    /// A `ProxyJump` hop could not reach the next host.
    #[error(
        "the ProxyJump hop {hop} could not connect to {target}: {source}. Check the next host's name and port as the hop sees them"
    )]
    HopForward {
        /// The hop, `host:port`.
        hop: String,
        /// The next host, `host:port`.
        target: String,
        /// The channel-open failure.
        #[source]
        source: Box<russh::Error>,
    },
    /// The `ProxyCommand` ended (or closed its output) before the SSH handshake was done.
    #[error(
        "the ProxyCommand `{command}` ended before an SSH connection to {target} was made (its own message, if any, is above): check that the command reaches the jump host"
    )]
    ProxyCommandEnded {
        /// The command, tokens expanded.
        command: String,
        /// `host:port` of the jump host.
        target: String,
    },
    /// The `ProxyCommand` could not be started.
    #[error("cannot run the ProxyCommand `{command}`: {source}")]
    ProxyCommand {
        /// The command, tokens expanded.
        command: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The password was refused.
    #[error(
        "the password for {user}@{target} was refused. Check it (and the login name), then try again"
    )]
    WrongPassword {
        /// Login name.
        user: String,
        /// `host:port`.
        target: String,
    },
    /// The `--password-file` cannot be used.
    #[error("cannot use password file {path}: {source}")]
    PasswordFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: password::PasswordFileError,
    },
    /// The jump host reset or closed the connection during the SSH banner or key exchange:
    /// what sshd does beyond `MaxStartups` unauthenticated connections, or while it
    /// restarts. It passes: the pool retries it.
    #[error(
        "the jump host {target} closed the connection during the SSH handshake ({source}): it is refusing new connections for now (MaxStartups?)"
    )]
    Refused {
        /// `host:port`.
        target: String,
        /// What russh saw.
        #[source]
        source: russh::Error,
    },
    /// Every try within the connect timeout was refused as [`SshError::Refused`] says.
    #[error(
        "the jump host {target} refused new connections for {secs} s ({tries} tries, each closed during the SSH handshake: sshd's MaxStartups, too many logins being set up at once, or sshd restarting). Try again in a moment, raise --connect-timeout, or ask the jump host's admin to raise MaxStartups"
    )]
    RefusedTooLong {
        /// `host:port`.
        target: String,
        /// Tries refused.
        tries: u32,
        /// How long it kept trying.
        secs: u64,
    },
    /// The SSH protocol failed (handshake, connection lost).
    #[error("SSH connection to {target} failed: {source}")]
    Protocol {
        /// `host:port`.
        target: String,
        /// The russh error.
        #[source]
        source: russh::Error,
    },
}

impl SshError {
    /// True for failures that retrying cannot fix (host keys, authentication, key files):
    /// a reconnect loop must stop on them. A known_hosts or key file that could not be read
    /// for want of descriptors or memory is not one of them: that passes, so it is retried.
    pub fn is_fatal(&self) -> bool {
        if let SshError::KnownHosts {
            source: russh::keys::Error::IO(e),
            ..
        }
        | SshError::KeyFile {
            source: russh::keys::Error::IO(e),
            ..
        } = self
            && crate::fds::is_exhaustion(e)
        {
            return false;
        }
        matches!(
            self,
            SshError::UnknownHostKey { .. }
                | SshError::HostKeyChanged { .. }
                | SshError::HostKeyRevoked { .. }
                | SshError::KnownHosts { .. }
                | SshError::KeyFile { .. }
                | SshError::NoKeyFile { .. }
                | SshError::PublicKeyFile { .. }
                | SshError::NoTerminalForPassphrase { .. }
                | SshError::WrongPassphrase { .. }
                | SshError::AuthFailed { .. }
                | SshError::WrongPassword { .. }
                | SshError::PasswordFile { .. }
        )
    }
}

impl SshError {
    /// True for a connection the jump host reset or closed during the SSH handshake
    /// ([`SshError::Refused`]): a refusal that passes.
    pub fn is_refusal(&self) -> bool {
        matches!(self, SshError::Refused { .. })
    }
}

/// True if `e` is the connection being reset or closed under the handshake (rather than a
/// protocol disagreement): sshd's `MaxStartups` drop, or a restarting sshd.
fn closed_under_handshake(e: &russh::Error) -> bool {
    use std::io::ErrorKind as K;
    match e {
        russh::Error::Disconnect | russh::Error::HUP => true,
        russh::Error::IO(io) => matches!(
            io.kind(),
            K::ConnectionReset | K::ConnectionAborted | K::UnexpectedEof | K::BrokenPipe
        ),
        _ => false,
    }
}

/// Maps a russh error of a request to `target` into [`SshError::Protocol`].
fn protocol(target: &str) -> impl Fn(russh::Error) -> SshError + '_ {
    move |source| SshError::Protocol {
        target: target.to_owned(),
        source,
    }
}

/// What the handler found about the server key (russh only tells us "rejected").
#[derive(Debug, Default)]
struct KeyCheck {
    failure: Option<SshError>,
}

struct Client {
    host: String,
    port: u16,
    known_hosts: PathBuf,
    accept_new: bool,
    file_owner: Option<(u32, u32)>,
    check: Arc<Mutex<KeyCheck>>,
    closed: watch::Sender<bool>,
    inbound: Option<InboundSender>,
    session: u64,
    /// This connection's channel windows, counted in the memory budget.
    windows: Option<crate::budget::ChannelWindows>,
}

impl Drop for Client {
    fn drop(&mut self) {
        // The session loop ended, whatever the reason.
        let _ = self.closed.send(true);
    }
}

/// Held while a connection records a new host key: the pool's connections check the key at
/// the same moment, and with accept-new each would otherwise append its own copy.
static LEARNING: Mutex<()> = Mutex::new(());

impl Client {
    fn verify(&self, presented: known_hosts::Presented<'_>) -> Result<(), SshError> {
        let key = presented.key;
        let target = format!("{}:{}", self.host, self.port);
        let kh_err = |source| SshError::KnownHosts {
            path: self.known_hosts.clone(),
            source,
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let lookup =
            || known_hosts::check(&self.host, self.port, presented, &self.known_hosts, now);
        let verdict = match lookup().map_err(kh_err)? {
            Verdict::Unknown { .. } if self.accept_new => {
                let _one_at_a_time = LEARNING.lock().unwrap_or_else(PoisonError::into_inner);
                // Another connection of the pool may have recorded it in the meantime.
                match lookup().map_err(kh_err)? {
                    Verdict::Unknown { certificate } => {
                        self.learn(key).map_err(kh_err)?;
                        warn!(host = %target, fingerprint = %known_hosts::fingerprint(key),
                            path = %self.known_hosts.display(),
                            certificate_not_accepted = certificate.as_deref().unwrap_or("-"),
                            "recorded a new host key");
                        return Ok(());
                    }
                    other => other,
                }
            }
            other => other,
        };
        match verdict {
            Verdict::Known => Ok(()),
            Verdict::Certified { line } => {
                debug!(host = %target, line, path = %self.known_hosts.display(),
                    "host certificate signed by a @cert-authority");
                Ok(())
            }
            Verdict::Changed { line } => Err(SshError::HostKeyChanged {
                target,
                fingerprint: known_hosts::fingerprint(key),
                path: self.known_hosts.clone(),
                line,
            }),
            Verdict::Revoked { line } => Err(SshError::HostKeyRevoked {
                target,
                fingerprint: known_hosts::fingerprint(key),
                path: self.known_hosts.clone(),
                line,
            }),
            Verdict::Unknown { certificate } => {
                let algorithm = key.algorithm().to_string();
                let kind = if algorithm.contains("ed25519") {
                    "ed25519"
                } else if algorithm.contains("ecdsa") {
                    "ecdsa"
                } else {
                    "rsa"
                };
                Err(SshError::UnknownHostKey {
                    target,
                    algorithm,
                    kind,
                    fingerprint: known_hosts::fingerprint(key),
                    path: self.known_hosts.clone(),
                    certificate,
                })
            }
        }
    }

    /// Appends `key` to known_hosts, creating the file and its directories (given to the
    /// invoking user when running for one).
    fn learn(&self, key: &PublicKey) -> Result<(), russh::keys::Error> {
        let existed = self.known_hosts.exists();
        create_parent_dirs(&self.known_hosts, self.file_owner)?;
        known_hosts::learn(&self.host, self.port, key, &self.known_hosts)?;
        if let Some((uid, gid)) = self.file_owner.filter(|_| !existed) {
            let _ = mse_vpn_platform::account::chown(&self.known_hosts, uid, gid);
        }
        Ok(())
    }
}

/// Creates the missing directories above `file` with mode 0700 (OpenSSH wants `~/.ssh`
/// private), owned by `owner`: under sudo, a `~/.ssh` created for the user must be theirs,
/// not root's.
fn create_parent_dirs(file: &Path, owner: Option<(u32, u32)>) -> std::io::Result<()> {
    let Some(dir) = file.parent() else {
        return Ok(());
    };
    let missing: Vec<&Path> = dir
        .ancestors()
        .take_while(|d| !d.as_os_str().is_empty() && !d.exists())
        .collect();
    for d in missing.into_iter().rev() {
        create_private_dir(d, owner)?;
    }
    Ok(())
}

/// Creates directory `d` (mode 0700, given to `owner`). A directory that exists already is
/// not an error: another process, or another connection of the pool, made it since we
/// looked (and gave it away, if it had to).
fn create_private_dir(d: &Path, owner: Option<(u32, u32)>) -> std::io::Result<()> {
    use mse_vpn_platform::account;
    match account::create_private_dir(d) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && d.is_dir() => return Ok(()),
        Err(e) => return Err(e),
    }
    if let Some((uid, gid)) = owner
        && let Err(e) = account::chown(d, uid, gid)
    {
        warn!(dir = %d.display(), error = %e, "cannot give the new directory to its user");
    }
    Ok(())
}

impl client::Handler for Client {
    type Error = russh::Error;

    async fn server_channel_open_forwarded_tcpip(
        &mut self,
        channel: russh::Channel<client::Msg>,
        _connected_address: &str,
        connected_port: u32,
        originator_address: &str,
        originator_port: u32,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        // Runs inside the session loop: hand over and return at once. Dropping `reply`
        // refuses the channel.
        let (Some(tx), Ok(listen_port)) = (&self.inbound, u16::try_from(connected_port)) else {
            debug!(
                connected_port,
                "a forwarded connection nobody asked for: refused"
            );
            return Ok(());
        };
        let caller = originator_address
            .parse::<std::net::IpAddr>()
            .ok()
            .zip(u16::try_from(originator_port).ok())
            .map(|(ip, port)| SocketAddr::new(ip, port));
        let call = Inbound {
            session: self.session,
            listen_port,
            caller,
            channel,
            reply,
        };
        if tx.try_send(call).is_err() {
            warn!(
                listen_port,
                "too many cloud connections waiting to be accepted: refused one"
            );
        }
        Ok(())
    }

    // The memory budget (src/budget.rs): each channel's window is counted from its first
    // data to its close, and each grant asks the budget.
    fn adjust_window(&mut self, channel: russh::ChannelId, window: u32) -> u32 {
        match &mut self.windows {
            Some(w) => w.grant(channel.into(), std::time::Instant::now()),
            None => window,
        }
    }

    async fn data(
        &mut self,
        channel: russh::ChannelId,
        _data: &[u8],
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        if let Some(w) = &mut self.windows {
            w.seen(channel.into(), std::time::Instant::now());
        }
        Ok(())
    }

    async fn channel_close(
        &mut self,
        channel: russh::ChannelId,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        if let Some(w) = &mut self.windows {
            w.close(channel.into());
        }
        Ok(())
    }

    async fn check_server_key(
        &mut self,
        server_public_key: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let key = server_public_key.public_key();
        let presented = known_hosts::Presented {
            key: &key,
            certificate: server_public_key.certificate(),
        };
        match self.verify(presented) {
            Ok(()) => Ok(true),
            Err(e) => {
                if let Ok(mut c) = self.check.lock() {
                    c.failure = Some(e);
                }
                Ok(false)
            }
        }
    }
}

/// What [`Session::start_bulk_mode`] runs on the jump host.
pub const BULK_MODE_COMMAND: &str = "exit 0";
/// How long [`Session::start_bulk_mode`] waits for its command.
pub const BULK_MODE_TIMEOUT: Duration = Duration::from_secs(10);

/// One authenticated SSH connection to the jump host.
pub struct Session {
    handle: Handle<Client>,
    closed: watch::Receiver<bool>,
    target: String,
    id: u64,
    /// The `ProxyJump` hops' connections this one is tunnelled through, kept alive with it.
    _hops: Vec<Handle<Client>>,
}

impl Session {
    /// Connects (through the `ProxyJump` hops, if any), checks each host key, and
    /// authenticates on each (agent, key files, then password).
    pub async fn connect(opts: &SshOptions) -> Result<Session, SshError> {
        let final_login = Login {
            host: &opts.jump.host,
            port: opts.jump.port,
            user: &opts.user,
            identity_files: &opts.identity_files,
            known_hosts: &opts.known_hosts,
        };
        let mut logins: Vec<Login<'_>> = opts
            .hops
            .iter()
            .map(|h| Login {
                host: &h.host,
                port: h.port,
                user: &h.user,
                identity_files: &h.identity_files,
                known_hosts: &h.known_hosts,
            })
            .collect();
        logins.push(final_login);
        let target_of = |l: &Login<'_>| {
            JumpHost {
                user: None,
                host: l.host.to_owned(),
                port: l.port,
                port_given: true,
            }
            .to_string()
        };

        let id = NEXT_SESSION.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let first = &logins[0];
        let first_target = target_of(first);
        let mut hops: Vec<Handle<Client>> = Vec::new();
        let first_session =
            match &opts.proxy_command {
                // The first (and only) host through a ProxyCommand's standard input and output.
                Some(command) => {
                    let stream = command::CommandStream::spawn(command, opts.file_owner).map_err(
                        |source| SshError::ProxyCommand {
                            command: command.clone(),
                            source,
                        },
                    )?;
                    let handshake = Self::handshake(opts, first, &first_target, stream, id);
                    bounded(opts, &first_target, handshake)
                        .await?
                        .map_err(|e| match e {
                            SshError::Protocol { target, .. }
                            | SshError::Refused { target, .. } => SshError::ProxyCommandEnded {
                                command: command.clone(),
                                target,
                            },
                            other => other,
                        })
                }
                None => {
                    let stream =
                        bounded(opts, &first_target, tcp_connect(first.host, first.port)).await??;
                    let handshake = Self::handshake(opts, first, &first_target, stream, id);
                    bounded(opts, &first_target, handshake).await?
                }
            };
        let mut first_session = Some(first_session?);
        let last = logins.len() - 1;
        for (i, login) in logins.iter().enumerate() {
            let target = target_of(login);
            let (mut handle, closed) = match (first_session.take(), hops.last()) {
                (Some(session), _) => session,
                (None, Some(prev)) => {
                    // Through the previous hop: a direct-tcpip channel to this host, as a
                    // stream.
                    let open = prev.channel_open_direct_tcpip(
                        login.host,
                        login.port.into(),
                        "127.0.0.1",
                        0,
                    );
                    let channel = bounded(opts, &target, open).await?.map_err(|source| {
                        SshError::HopForward {
                            hop: target_of(&logins[i - 1]),
                            target: target.clone(),
                            source: Box::new(source),
                        }
                    })?;
                    bounded(
                        opts,
                        &target,
                        Self::handshake(opts, login, &target, channel.into_stream(), id),
                    )
                    .await??
                }
                (None, None) => unreachable!("every later host has a hop before it"),
            };
            tracing::trace!(%target, "handshake done, authenticating");
            authenticate(&mut handle, opts, login, &target).await?;
            debug!(%target, user = %login.user, connection = id, "authenticated");
            if i == last {
                return Ok(Session {
                    handle,
                    closed,
                    target,
                    id,
                    _hops: hops,
                });
            }
            hops.push(handle);
        }
        unreachable!("the jump host is the last login")
    }

    /// SSH handshake over `stream` (host key checked).
    async fn handshake<S>(
        opts: &SshOptions,
        login: &Login<'_>,
        target: &str,
        stream: S,
        id: u64,
    ) -> Result<(Handle<Client>, watch::Receiver<bool>), SshError>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let config = Arc::new(client::Config {
            // With a budget, channels start small and grow as they are read (`Client`'s
            // `adjust_window`).
            window_size: match opts.budget {
                Some(_) => crate::budget::INITIAL_WINDOW.min(opts.window_size),
                None => opts.window_size,
            },
            maximum_packet_size: 65_535,
            channel_buffer_size: 256,
            inactivity_timeout: None,
            keepalive_interval: Some(opts.keepalive_interval),
            keepalive_max: opts.keepalive_max as usize,
            nodelay: true,
            preferred: Preferred {
                // AES-GCM first: with AES-NI it is markedly faster than ChaCha20-Poly1305, and
                // AES-128 does a third less AES work than AES-256.
                cipher: std::borrow::Cow::Borrowed(&[
                    cipher::AES_128_GCM,
                    cipher::AES_256_GCM,
                    cipher::AES_128_CTR,
                    cipher::AES_192_CTR,
                    cipher::AES_256_CTR,
                    cipher::CHACHA20_POLY1305,
                ]),
                // Asked for a host certificate first where known_hosts trusts an authority
                // for this host (as OpenSSH orders its host key algorithms).
                host_key_certificates: if known_hosts::has_authority_for(
                    login.host,
                    login.port,
                    login.known_hosts,
                ) {
                    std::borrow::Cow::Borrowed(HOST_CERTIFICATE_ALGORITHMS)
                } else {
                    std::borrow::Cow::Borrowed(&[])
                },
                ..Preferred::default()
            },
            limits: rekey_limits(),
            ..client::Config::default()
        });
        let check = Arc::new(Mutex::new(KeyCheck::default()));
        let (closed_tx, closed) = watch::channel(false);
        let handler = Client {
            host: login.host.to_owned(),
            port: login.port,
            known_hosts: login.known_hosts.to_owned(),
            accept_new: opts.accept_new_host_key,
            file_owner: opts.file_owner,
            check: check.clone(),
            closed: closed_tx,
            inbound: opts.inbound.clone(),
            session: id,
            windows: opts
                .budget
                .clone()
                .map(|b| crate::budget::ChannelWindows::new(b, opts.window_size)),
        };
        match client::connect_stream(config, stream, handler).await {
            Ok(handle) => Ok((handle, closed)),
            Err(source) => {
                let failure = check.lock().ok().and_then(|mut c| c.failure.take());
                Err(failure.unwrap_or_else(|| {
                    let target = target.to_owned();
                    if closed_under_handshake(&source) {
                        SshError::Refused { target, source }
                    } else {
                        SshError::Protocol { target, source }
                    }
                }))
            }
        }
    }

    /// Opens a `direct-tcpip` channel to `dst`, telling the jump host the connection comes
    /// from `originator`.
    pub async fn open_direct_tcpip(
        &self,
        dst: SocketAddr,
        originator: SocketAddr,
        timeout: Duration,
    ) -> Result<russh::Channel<client::Msg>, OpenError> {
        let open = self.handle.channel_open_direct_tcpip(
            dst.ip().to_string(),
            dst.port().into(),
            originator.ip().to_string(),
            originator.port().into(),
        );
        match tokio::time::timeout(timeout, open).await {
            Err(_) => Err(OpenError::Timeout),
            Ok(Ok(ch)) => Ok(ch),
            Ok(Err(russh::Error::ChannelOpenFailure(reason))) => Err(match reason {
                ChannelOpenFailure::ConnectFailed => OpenError::ConnectFailed,
                ChannelOpenFailure::AdministrativelyProhibited => OpenError::Prohibited,
                _ => OpenError::Other,
            }),
            Ok(Err(_)) if self.is_closed() => Err(OpenError::SessionLost),
            Ok(Err(e)) => {
                debug!(error = %e, "channel open failed");
                Err(OpenError::Other)
            }
        }
    }

    /// True once the connection is gone.
    pub fn is_closed(&self) -> bool {
        *self.closed.borrow() || self.handle.is_closed()
    }

    /// Resolves when the connection is gone (keepalive timeout, EOF, error, disconnect).
    pub async fn closed(&self) {
        let mut rx = self.closed.clone();
        let _ = rx.wait_for(|c| *c).await;
    }

    /// A number unique to this connection within the process.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Runs `command` on the jump host (an `exec` session channel) and returns its standard
    /// output, or `None` if the jump host refused, the command failed, or it took longer than
    /// `timeout`. For small discovery commands only: the output is capped at 64 KiB.
    pub async fn exec(&self, command: &str, timeout: Duration) -> Option<String> {
        let run = async {
            let mut channel = self.handle.channel_open_session().await.ok()?;
            channel.exec(true, command).await.ok()?;
            let mut out = Vec::new();
            let mut status = None;
            while let Some(msg) = channel.wait().await {
                match msg {
                    russh::ChannelMsg::Data { data } if out.len() < 64 * 1024 => {
                        out.extend_from_slice(&data)
                    }
                    russh::ChannelMsg::ExitStatus { exit_status } => status = Some(exit_status),
                    russh::ChannelMsg::Close => break,
                    _ => {}
                }
            }
            (status == Some(0)).then(|| String::from_utf8_lossy(&out).into_owned())
        };
        tokio::time::timeout(timeout, run).await.ok().flatten()
    }

    /// Has the jump host's sshd send this connection's data without delay, by starting one
    /// command on it (`exit 0`, which `sh`, `cmd.exe` and PowerShell all run). OpenSSH turns
    /// on `TCP_NODELAY` on a connection's socket (and marks it with `IPQoS`) only when a
    /// session starts a command (`do_exec` calls `ssh_packet_set_interactive`, once per
    /// connection); a connection that only carries forwarded channels, as `ssh -N -L`'s
    /// does, keeps Nagle's algorithm for its whole life. Measured on the benchmark testbed
    /// (OpenSSH 9.2, iperf3 `-R` through one connection): sshd spent 1.43 s of CPU per GB
    /// and moved 5.1 Gbit/s without it, 0.92 s and 8.3 Gbit/s with it; `ssh -L` with a
    /// remote command instead of `-N` shows the same (5.8 → 8.0 Gbit/s). A jump host that
    /// refuses sessions loses only the speed-up. Returns whether the command ran.
    pub async fn start_bulk_mode(&self) -> bool {
        let ran = self
            .exec(BULK_MODE_COMMAND, BULK_MODE_TIMEOUT)
            .await
            .is_some();
        debug!(
            connection = self.id,
            ran, "asked the jump host for TCP_NODELAY (a session command)"
        );
        ran
    }

    /// `host:port` of the jump host.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// Asks the jump host to listen on `address:port` for us (`tcpip-forward`; port 0 lets
    /// it pick). Returns the bound port, or `None` if the jump host refused.
    pub async fn request_forward(&self, address: &str, port: u16) -> Option<u16> {
        match self.handle.tcpip_forward(address, port.into()).await {
            Ok(0) => Some(port),
            Ok(p) => u16::try_from(p).ok(),
            Err(e) => {
                debug!(error = %e, address, port, "tcpip-forward refused");
                None
            }
        }
    }

    /// Cancels a listener set up by [`Session::request_forward`].
    pub async fn cancel_forward(&self, address: &str, port: u16) {
        let _ = self.handle.cancel_tcpip_forward(address, port.into()).await;
    }

    /// Politely ends the connection.
    pub async fn disconnect(&self) {
        let _ = self
            .handle
            .disconnect(
                russh::Disconnect::ByApplication,
                "mse-vpn shutting down",
                "en",
            )
            .await;
    }
}

async fn authenticate(
    handle: &mut Handle<Client>,
    opts: &SshOptions,
    login: &Login<'_>,
    target: &str,
) -> Result<(), SshError> {
    let user = login.user;
    let mut tried: Vec<String> = Vec::new();
    // What the server said it still accepts after the last failure.
    let mut methods: Option<russh::MethodSet> = None;
    let note = |r: &russh::client::AuthResult, methods: &mut Option<russh::MethodSet>| {
        if let russh::client::AuthResult::Failure {
            remaining_methods, ..
        } = r
        {
            *methods = Some(remaining_methods.clone());
        }
    };
    let rsa_hash = bounded(opts, target, handle.best_supported_rsa_hash())
        .await?
        .ok()
        .flatten()
        .flatten();

    if let Some(sock) = &opts.agent_socket {
        match agent::connect(sock).await {
            Ok(mut agent) => {
                let ids = bounded(opts, target, agent.request_identities())
                    .await?
                    .unwrap_or_default();
                // IdentitiesOnly: only the agent's copies of the configured key files.
                let allowed: Option<Vec<PublicKey>> = opts.identities_only.then(|| {
                    login
                        .identity_files
                        .iter()
                        .filter_map(|p| public_key_of(p))
                        .collect()
                });
                for id in ids {
                    let key = id.public_key().into_owned();
                    if let Some(allowed) = &allowed
                        && !allowed.iter().any(|a| a.key_data() == key.key_data())
                    {
                        debug!(key = %known_hosts::fingerprint(&key), "IdentitiesOnly: agent key skipped");
                        continue;
                    }
                    let hash = if key.algorithm().is_rsa() {
                        rsa_hash
                    } else {
                        None
                    };
                    tried.push(format!("agent key {}", known_hosts::fingerprint(&key)));
                    let auth = handle.authenticate_publickey_with(user, key, hash, &mut agent);
                    match bounded(opts, target, auth).await? {
                        Ok(r) if r.success() => return Ok(()),
                        Ok(r) => note(&r, &mut methods),
                        Err(e) => debug!(error = %e, "agent signing failed"),
                    }
                }
            }
            Err(e) => debug!(error = %e, socket = %sock.display(), "ssh-agent not usable"),
        }
    }

    for path in login.identity_files {
        let key = load_key(path).await?;
        let hash = if key.algorithm().is_rsa() {
            rsa_hash
        } else {
            None
        };
        tried.push(path.display().to_string());
        let auth = handle.authenticate_publickey(user, PrivateKeyWithHashAlg::new(key, hash));
        let r = bounded(opts, target, auth)
            .await?
            .map_err(protocol(target))?;
        if r.success() {
            return Ok(());
        }
        note(&r, &mut methods);
    }

    // Then keyboard-interactive and password, if the server offers them.
    let methods = match methods {
        Some(m) => m,
        None => {
            let r = bounded(opts, target, handle.authenticate_none(user))
                .await?
                .map_err(protocol(target))?;
            if r.success() {
                return Ok(());
            }
            let mut m = None;
            note(&r, &mut m);
            m.unwrap_or_else(russh::MethodSet::empty)
        }
    };
    let kbd = methods.contains(&russh::MethodKind::KeyboardInteractive);
    let pwd = methods.contains(&russh::MethodKind::Password);
    if kbd || pwd {
        match password::log_in(handle, opts, user, target, kbd, pwd).await? {
            password::Outcome::LoggedIn => return Ok(()),
            password::Outcome::NoPassword => {
                tried.push("password (no terminal to ask on: use --password-file)".to_owned());
            }
        }
    }
    if tried.is_empty() {
        tried.push("no agent and no key file found".to_owned());
    }
    Err(SshError::AuthFailed {
        user: user.to_owned(),
        target: target.to_owned(),
        tried: tried.join(", "),
    })
}

/// Resolves `host` and opens a TCP connection to the first address that answers.
async fn tcp_connect(host: &str, port: u16) -> Result<tokio::net::TcpStream, SshError> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|source| SshError::Resolve {
            host: host.to_owned(),
            source,
        })?
        .collect();
    let mut last = None;
    for addr in addrs {
        match tokio::net::TcpStream::connect(addr).await {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Err(source) => last = Some(SshError::Unreachable { addr, source }),
        }
    }
    Err(last.unwrap_or_else(|| SshError::Resolve {
        host: host.to_owned(),
        source: std::io::Error::new(std::io::ErrorKind::NotFound, "no address"),
    }))
}

/// Runs one network step of connecting, bounded by the connect timeout.
async fn bounded<T>(
    opts: &SshOptions,
    target: &str,
    step: impl Future<Output = T>,
) -> Result<T, SshError> {
    tokio::time::timeout(opts.connect_timeout, step)
        .await
        .map_err(|_| SshError::ConnectTimeout {
            target: target.to_owned(),
            secs: opts.connect_timeout.as_secs(),
        })
}

/// How many times a passphrase is asked before giving up (OpenSSH's default too).
const PASSPHRASE_ATTEMPTS: u32 = 3;

/// What asking for an encrypted key's passphrase came to.
#[derive(Clone)]
enum Unlock {
    /// The decrypted key.
    Key(Arc<russh::keys::PrivateKey>),
    /// Every passphrase typed was wrong.
    WrongPassphrase,
    /// There is no terminal to ask on.
    NoTerminal,
}

/// Encrypted keys by path, as their passphrase prompt left them, for the life of the
/// process: the pool's other connections and every reconnect use the key decrypted once,
/// and never ask again (nobody may be at the terminal by then). Held while prompting, so
/// connections that need the same key wait for the one answer (an async lock: waiting never
/// blocks a thread of the runtime).
static UNLOCKED: tokio::sync::Mutex<BTreeMap<PathBuf, Unlock>> =
    tokio::sync::Mutex::const_new(BTreeMap::new());

/// The public key of an identity file: its `.pub` file, or the key itself if it is not
/// encrypted. `None` when neither can be read.
fn public_key_of(path: &Path) -> Option<PublicKey> {
    let mut pub_path = path.as_os_str().to_owned();
    pub_path.push(".pub");
    if let Ok(key) = PublicKey::read_openssh_file(Path::new(&pub_path)) {
        return Some(key);
    }
    russh::keys::load_secret_key(path, None)
        .ok()
        .map(|k| k.public_key().clone())
}

async fn load_key(path: &Path) -> Result<Arc<russh::keys::PrivateKey>, SshError> {
    let key_err = |source| SshError::KeyFile {
        path: path.to_owned(),
        source,
    };
    key_file::check(path)?;
    match russh::keys::load_secret_key(path, None) {
        Ok(k) => return Ok(Arc::new(k)),
        Err(russh::keys::Error::KeyIsEncrypted) => {}
        Err(e) => return Err(key_err(e)),
    }
    let mut unlocked = UNLOCKED.lock().await;
    let outcome = match unlocked.get(path) {
        Some(outcome) => outcome.clone(),
        None => {
            // The terminal prompt and the key derivation block: off the runtime's threads.
            let owned = path.to_owned();
            let outcome = tokio::task::spawn_blocking(move || unlock(&owned))
                .await
                .unwrap_or(Unlock::NoTerminal);
            unlocked.insert(path.to_owned(), outcome.clone());
            outcome
        }
    };
    match outcome {
        Unlock::Key(key) => Ok(key),
        Unlock::WrongPassphrase => Err(SshError::WrongPassphrase {
            path: path.to_owned(),
            attempts: PASSPHRASE_ATTEMPTS,
        }),
        Unlock::NoTerminal => Err(SshError::NoTerminalForPassphrase {
            path: path.to_owned(),
        }),
    }
}

/// Asks for `path`'s passphrase until it decrypts the key, [`PASSPHRASE_ATTEMPTS`] times at
/// most.
fn unlock(path: &Path) -> Unlock {
    for attempt in 1..=PASSPHRASE_ATTEMPTS {
        let Ok(passphrase) = passphrase_for(path) else {
            return Unlock::NoTerminal;
        };
        match russh::keys::load_secret_key(path, Some(&passphrase)) {
            Ok(key) => return Unlock::Key(Arc::new(key)),
            Err(e) => {
                let path = path.display();
                debug!(%path, attempt, error = %e, "the passphrase did not decrypt the key");
            }
        }
    }
    Unlock::WrongPassphrase
}

/// Asks for a key's passphrase: `MSE_VPN_TEST_PASSPHRASE` in tests, else the terminal.
fn passphrase_for(path: &Path) -> Result<String, SshError> {
    if cfg!(test)
        && let Ok(p) = std::env::var("MSE_VPN_TEST_PASSPHRASE")
    {
        return Ok(p);
    }
    password::note_prompt();
    rpassword::prompt_password(format!("Enter passphrase for key {}: ", path.display())).map_err(
        |_| SshError::NoTerminalForPassphrase {
            path: path.to_owned(),
        },
    )
}

/// Host certificate algorithms asked for when an authority is trusted for the host, most
/// preferred first (the plain key algorithms follow them).
const HOST_CERTIFICATE_ALGORITHMS: &[russh::keys::Algorithm] = &[
    russh::keys::Algorithm::Ed25519,
    russh::keys::Algorithm::Ecdsa {
        curve: russh::keys::EcdsaCurve::NistP256,
    },
    russh::keys::Algorithm::Ecdsa {
        curve: russh::keys::EcdsaCurve::NistP384,
    },
    russh::keys::Algorithm::Ecdsa {
        curve: russh::keys::EcdsaCurve::NistP521,
    },
    russh::keys::Algorithm::Rsa {
        hash: Some(russh::keys::HashAlg::Sha512),
    },
    russh::keys::Algorithm::Rsa {
        hash: Some(russh::keys::HashAlg::Sha256),
    },
];

/// Data volume after which a connection is re-keyed: OpenSSH's default for ciphers with
/// 16-byte blocks (2^32 blocks, 64 GiB), which are all mse-vpn prefers (russh's own default,
/// 1 GiB, re-keys a busy tunnel every few seconds). ChaCha20-Poly1305, offered last, has no
/// block-count bound of its own (its nonce is the packet's sequence number); OpenSSH's
/// smaller figure for it comes only from its nominal 8-byte block.
fn rekey_limits() -> russh::Limits {
    russh::Limits {
        rekey_write_limit: 64 << 30,
        rekey_read_limit: 64 << 30,
        rekey_time_limit: Duration::from_secs(3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ED: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHxTl9hKdZcvY9lP5iDplUq5W2CYdhPjPdvK5eS09qX0";

    /// A fresh directory under the system's temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            let p = std::env::temp_dir().join(format!("mse-vpn-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn accept_new_client(known_hosts: &Path) -> Client {
        Client {
            host: "bastion".into(),
            port: 22,
            known_hosts: known_hosts.to_owned(),
            accept_new: true,
            file_owner: None,
            check: Arc::default(),
            closed: watch::channel(false).0,
            inbound: None,
            session: 0,
            windows: None,
        }
    }

    #[test]
    fn a_directory_made_by_someone_else_in_the_meantime_is_not_an_error() {
        let tmp = TempDir::new("mkdir");
        let ssh = tmp.0.join(".ssh");
        std::fs::create_dir(&ssh).unwrap();
        // Another connection of the pool created it after we saw it missing.
        create_private_dir(&ssh, None).expect("an existing directory is fine");
        // A file in the way is still an error.
        let file = tmp.0.join("file");
        std::fs::write(&file, "").unwrap();
        let e = create_private_dir(&file, None).expect_err("a file is not a directory");
        assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists);
    }

    #[test]
    fn pool_connections_accepting_a_new_key_at_once_create_the_dirs_and_record_it_once() {
        let key = PublicKey::from_openssh(ED).unwrap();
        for round in 0..20 {
            let tmp = TempDir::new(&format!("accept-new-{round}"));
            let kh = tmp.0.join("home/user/.ssh/known_hosts");
            let start = Arc::new(std::sync::Barrier::new(8));
            let verdicts: Vec<_> = (0..8)
                .map(|_| {
                    let (client, start, key) = (accept_new_client(&kh), start.clone(), key.clone());
                    std::thread::spawn(move || {
                        start.wait();
                        let presented = known_hosts::Presented {
                            key: &key,
                            certificate: None,
                        };
                        client.verify(presented).map_err(|e| e.to_string())
                    })
                })
                .collect();
            for v in verdicts {
                v.join().unwrap().expect("every connection accepts the key");
            }
            let text = std::fs::read_to_string(&kh).unwrap();
            let lines: Vec<&str> = text.lines().filter(|l| !l.is_empty()).collect();
            assert_eq!(lines.len(), 1, "recorded once: {text}");
            assert!(lines[0].starts_with("bastion ssh-ed25519 "), "{text}");
        }
    }

    #[test]
    fn a_revoked_key_is_refused_even_when_accepting_new_keys() {
        let key = PublicKey::from_openssh(ED).unwrap();
        let tmp = TempDir::new("revoked");
        let kh = tmp.0.join("known_hosts");
        std::fs::write(&kh, format!("# keys\n@revoked * {ED}\n")).unwrap();
        let presented = known_hosts::Presented {
            key: &key,
            certificate: None,
        };
        let e = accept_new_client(&kh).verify(presented).unwrap_err();
        assert!(e.is_fatal());
        let msg = e.to_string();
        assert!(msg.contains("REVOKED HOST KEY DETECTED"), "{msg}");
        assert!(
            msg.contains(&format!("line 2 of {}", kh.display())),
            "{msg}"
        );
        assert_eq!(
            std::fs::read_to_string(&kh).unwrap().lines().count(),
            2,
            "nothing recorded"
        );
    }

    #[test]
    fn a_connection_closed_under_the_handshake_is_a_refusal_that_passes() {
        use std::io::{Error, ErrorKind};
        assert!(closed_under_handshake(&russh::Error::Disconnect));
        assert!(closed_under_handshake(&russh::Error::IO(Error::from(
            ErrorKind::ConnectionReset
        ))));
        assert!(!closed_under_handshake(&russh::Error::UnknownKey));
        assert!(!closed_under_handshake(&russh::Error::NoCommonAlgo {
            kind: russh::AlgorithmKind::Kex,
            ours: vec![],
            theirs: vec![],
        }));
        let refused = SshError::Refused {
            target: "bastion:22".into(),
            source: russh::Error::Disconnect,
        };
        assert!(refused.is_refusal() && !refused.is_fatal());
    }

    #[test]
    fn a_key_file_unreadable_for_want_of_descriptors_is_retried() {
        let emfile = crate::fds::emfile;
        let key_file = |source| SshError::KeyFile {
            path: "id_ed25519".into(),
            source,
        };
        assert!(!key_file(russh::keys::Error::IO(emfile())).is_fatal());
        let denied = std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        assert!(key_file(russh::keys::Error::IO(denied)).is_fatal());
    }
}
