//! From what the user typed (`--proxy ALIAS`, flags) and what the OpenSSH client
//! configuration says about that alias, to the [`SshOptions`] a session connects with.
//! Command-line values win over the configuration; the configuration wins over built-in
//! defaults. `ProxyJump` hops are resolved through the configuration too, as `ssh` does.

use std::path::PathBuf;
use std::time::Duration;

use tracing::{debug, warn};

use super::config::{ConfigError, HostConfig, HostKeyPolicy, Sources};
use super::{Hop, InvokingUser, JumpHost, SshOptions};

/// Default seconds to wait for the SSH connection (flag `--connect-timeout`).
pub const DEFAULT_CONNECT_TIMEOUT: u64 = 15;
/// Default seconds between keepalives (flag `--keepalive`).
pub const DEFAULT_KEEPALIVE: u64 = 5;
/// Unanswered keepalives before a link is declared dead, unless `ServerAliveCountMax` says.
const DEFAULT_KEEPALIVE_MAX: u32 = 2;

/// The SSH-related command-line values; `None` / empty where the user gave nothing.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    /// `--proxy`: an alias or `[USER@]HOST[:PORT]`.
    pub proxy: Option<JumpHost>,
    /// `-i`.
    pub identity: Vec<PathBuf>,
    /// `--known-hosts`.
    pub known_hosts: Option<PathBuf>,
    /// `--accept-new-host-key`.
    pub accept_new_host_key: bool,
    /// `--connect-timeout`.
    pub connect_timeout: Option<u64>,
    /// `--keepalive`.
    pub keepalive: Option<u64>,
    /// `-J` / `--jump`: hops that replace the configuration's `ProxyJump`.
    pub jump: Option<Vec<JumpHost>>,
    /// `-F` / `--ssh-config`: read only this file (`none`: no file at all).
    pub ssh_config: Option<PathBuf>,
    /// `--password-file`.
    pub password_file: Option<PathBuf>,
}

/// Where the configuration of `user` is read from, unless `-F` says otherwise.
pub fn sources(user: &InvokingUser, only: Option<&PathBuf>) -> Sources {
    let (user_file, system_file) = match only {
        Some(f) if f.as_os_str() == "none" => (None, None),
        Some(f) => (Some(f.clone()), None),
        None => (
            Some(user.home().join(".ssh").join("config")),
            Some(PathBuf::from("/etc/ssh/ssh_config")),
        ),
    };
    Sources {
        user_file,
        system_file,
        home: user.home().to_owned(),
        local_user: user.name().to_owned(),
        uid: user.uid(),
        gid: user.gid(),
        ssh_client: Some(PathBuf::from("ssh")),
    }
}

/// What the configuration says about `typed`: `ssh -G`'s effective settings where an
/// OpenSSH client is installed (`Match` blocks and all), else the files as the parser reads
/// them. The parser reads the files either way first: its checks (owner and mode, a bad
/// value named by file and line) come before ssh's, and it collects the aliases. When
/// `ssh -G` fails (a file the invoking user cannot read, a directive this ssh does not know),
/// the parser's reading is used, with a warning.
fn host_config(sources: &Sources, typed: &JumpHost) -> Result<HostConfig, ConfigError> {
    let parsed = HostConfig::load(sources, &typed.host)?;
    let port = typed.port_given.then_some(typed.port);
    match super::effective::load(sources, &typed.host, typed.user.as_deref(), port) {
        Ok(Some(effective)) => {
            debug!(host = %typed.host, "ssh config: effective settings from `ssh -G`");
            Ok(HostConfig {
                aliases: parsed.aliases,
                ..effective
            })
        }
        Ok(None) => Ok(parsed),
        Err(e) => {
            warn!(
                "{e}; using mse-vpn's own reading of the ssh config instead (it does not follow Match blocks)"
            );
            Ok(parsed)
        }
    }
}

/// The literal `Host` names of the configuration `user` would read (`-F` file when given):
/// the candidates when a typed jump host does not resolve. Empty when it cannot be read.
pub fn aliases(ssh_config: Option<&PathBuf>, user: &InvokingUser) -> Vec<String> {
    HostConfig::load(&sources(user, ssh_config), "")
        .map(|c| c.aliases)
        .unwrap_or_default()
}

/// Resolves the options for `over.proxy` (which must be set) on behalf of `user`.
pub fn ssh_options(over: &Overrides, user: &InvokingUser) -> Result<SshOptions, ConfigError> {
    options_from(over, user, &sources(user, over.ssh_config.as_ref()))
}

/// [`ssh_options`] with the configuration read from `sources`.
fn options_from(
    over: &Overrides,
    user: &InvokingUser,
    sources: &Sources,
) -> Result<SshOptions, ConfigError> {
    let typed = over
        .proxy
        .clone()
        .expect("resolve is called once --proxy is known");
    let cfg = host_config(sources, &typed)?;
    for w in &cfg.warnings {
        warn!("{w}");
    }
    for n in &cfg.notes {
        debug!("{n}");
    }
    let (jump, identity_files) = endpoint(&typed, &cfg, sources, user, &over.identity);

    let known_hosts = over.known_hosts.clone().unwrap_or_else(|| {
        cfg.user_known_hosts_file
            .as_deref()
            .map(|raw| expand(raw, sources, &typed.host, &jump))
            .unwrap_or_else(|| user.known_hosts_path())
    });
    let accept_new_host_key = over.accept_new_host_key
        || match cfg.strict_host_key_checking {
            Some(HostKeyPolicy::AcceptNew) => true,
            Some(HostKeyPolicy::Off) => {
                warn!(
                    "StrictHostKeyChecking no for {}: mse-vpn never connects to a host whose key changed; it records unknown keys (as accept-new) and refuses changed ones",
                    typed.host
                );
                true
            }
            Some(HostKeyPolicy::Strict) | None => false,
        };
    let connect_timeout = over
        .connect_timeout
        .or(cfg.connect_timeout.filter(|s| *s > 0))
        .unwrap_or(DEFAULT_CONNECT_TIMEOUT);
    let keepalive = over
        .keepalive
        .or(cfg.server_alive_interval.filter(|s| *s > 0))
        .unwrap_or(DEFAULT_KEEPALIVE);
    let hops_typed = over
        .jump
        .clone()
        .or(cfg.proxy_jump.clone())
        .unwrap_or_default();
    let mut hops = Vec::new();
    for hop in &hops_typed {
        let hop_cfg = host_config(sources, hop)?;
        let (hop_jump, hop_ids) = endpoint(hop, &hop_cfg, sources, user, &over.identity);
        let hop_known_hosts = over.known_hosts.clone().unwrap_or_else(|| {
            hop_cfg
                .user_known_hosts_file
                .as_deref()
                .map(|raw| expand(raw, sources, &hop.host, &hop_jump))
                .unwrap_or_else(|| user.known_hosts_path())
        });
        hops.push(Hop {
            user: hop_jump.user.clone().unwrap_or_default(),
            host: hop_jump.host,
            port: hop_jump.port,
            identity_files: hop_ids,
            known_hosts: hop_known_hosts,
        });
    }
    // ProxyJump and ProxyCommand: ProxyJump (or -J) wins, as a typed -J would in ssh.
    let proxy_command = cfg
        .proxy_command
        .as_deref()
        .filter(|c| !c.eq_ignore_ascii_case("none"))
        .map(|c| {
            expand(c, sources, &typed.host, &jump)
                .to_string_lossy()
                .into_owned()
        });
    let proxy_command = match (proxy_command, hops.is_empty()) {
        (Some(c), true) => Some(c),
        (Some(_), false) => {
            warn!(
                "ProxyJump is set for {}: its ProxyCommand is not used",
                typed.host
            );
            None
        }
        (None, _) => None,
    };
    Ok(SshOptions {
        user: jump.user.clone().unwrap_or_default(),
        identity_files,
        known_hosts,
        accept_new_host_key,
        connect_timeout: Duration::from_secs(connect_timeout),
        keepalive_interval: Duration::from_secs(keepalive),
        keepalive_max: cfg.server_alive_count_max.unwrap_or(DEFAULT_KEEPALIVE_MAX),
        window_size: 4 * 1024 * 1024,
        agent_socket: user.agent_socket(),
        // IdentitiesOnly: the key files only (and the agent's copies of them).
        identities_only: cfg.identities_only == Some(true),
        proxy_command,
        file_owner: Some((user.uid(), user.gid())),
        bulk_mode: true,
        jump,
        hops,
        password_file: over.password_file.clone(),
        inbound: None,
        budget: None,
    })
}

/// One host's address, login and key files: the typed values over the configuration's over
/// the defaults. The returned `JumpHost` always has its user set.
fn endpoint(
    typed: &JumpHost,
    cfg: &HostConfig,
    sources: &Sources,
    user: &InvokingUser,
    cli_identity: &[PathBuf],
) -> (JumpHost, Vec<PathBuf>) {
    let host = cfg.host_name.clone().unwrap_or_else(|| typed.host.clone());
    let port = if typed.port_given {
        typed.port
    } else {
        cfg.port.unwrap_or(typed.port)
    };
    let login = typed
        .user
        .clone()
        .or(cfg.user.clone())
        .unwrap_or_else(|| user.name().to_owned());
    let jump = JumpHost {
        user: Some(login),
        host,
        port,
        port_given: true,
    };
    let ids = if !cli_identity.is_empty() {
        cli_identity.to_vec()
    } else if !cfg.identity_files.is_empty() {
        // As ssh does, a configured key file that does not exist is skipped.
        cfg.identity_files
            .iter()
            .map(|raw| expand(raw, sources, &typed.host, &jump))
            .filter(|p| {
                let exists = p.exists();
                if !exists {
                    debug!(path = %p.display(), "IdentityFile does not exist, skipped");
                }
                exists
            })
            .collect()
    } else {
        user.default_identity_files()
    };
    (jump, ids)
}

fn expand(raw: &str, sources: &Sources, alias: &str, jump: &JumpHost) -> PathBuf {
    HostConfig::expand(
        raw,
        sources,
        alias,
        &jump.host,
        jump.port,
        jump.user.as_deref().unwrap_or_default(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use mse_vpn_platform::account;

    fn alice(home: &std::path::Path) -> InvokingUser {
        let me = account::current().unwrap().unwrap();
        InvokingUser::resolve(
            false,
            None,
            Some(PathBuf::from("/tmp/agent")),
            |_| Ok(None),
            || {
                Ok(Some(account::Account {
                    name: "alice".into(),
                    home: home.to_owned(),
                    ..me.clone()
                }))
            },
        )
        .unwrap()
    }

    fn with_config(tag: &str, text: &str) -> (PathBuf, InvokingUser) {
        let home =
            std::env::temp_dir().join(format!("mse-vpn-resolve-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(home.join(".ssh")).unwrap();
        let f = home.join(".ssh/config");
        std::fs::write(&f, text).unwrap();
        account::set_mode(&f, 0o600).unwrap();
        let user = alice(&home);
        (home, user)
    }

    /// [`ssh_options`] with the parser only: `ssh -G` would read the real home's config of
    /// this uid, not the test's.
    fn ssh_options(over: &Overrides, user: &InvokingUser) -> Result<SshOptions, ConfigError> {
        let sources = Sources {
            ssh_client: None,
            ..super::sources(user, over.ssh_config.as_ref())
        };
        options_from(over, user, &sources)
    }

    fn over(proxy: &str) -> Overrides {
        Overrides {
            proxy: Some(proxy.parse().unwrap()),
            ssh_config: None,
            ..Overrides::default()
        }
    }

    const CONFIG: &str = "Host dev\n HostName 10.1.2.3\n User ops\n Port 2222\n IdentityFile ~/.ssh/k_%r\n \
        UserKnownHostsFile ~/.ssh/kh_dev\n StrictHostKeyChecking accept-new\n ServerAliveInterval 9\n \
        ServerAliveCountMax 5\n ConnectTimeout 4\n ProxyJump hop\n IdentitiesOnly yes\n\
        Host hop\n HostName 192.0.2.1\n User hopper\n UserKnownHostsFile ~/.ssh/kh_hop\n";

    #[test]
    fn the_config_fills_in_what_was_not_typed() {
        let (home, user) = with_config("fill", CONFIG);
        let o = ssh_options(&over("dev"), &user).unwrap();
        assert_eq!(o.jump.host, "10.1.2.3");
        assert_eq!(o.jump.port, 2222);
        assert_eq!(o.user, "ops");
        // A configured key that does not exist is skipped; one that does is used.
        assert!(o.identity_files.is_empty());
        std::fs::write(home.join(".ssh/k_ops"), "").unwrap();
        let o = ssh_options(&over("dev"), &user).unwrap();
        assert_eq!(o.identity_files, [home.join(".ssh/k_ops")]);
        assert_eq!(o.known_hosts, home.join(".ssh/kh_dev"));
        assert!(o.accept_new_host_key);
        assert_eq!(o.keepalive_interval, Duration::from_secs(9));
        assert_eq!(o.keepalive_max, 5);
        assert_eq!(o.connect_timeout, Duration::from_secs(4));
        assert!(o.identities_only);
        assert_eq!(o.hops.len(), 1);
        assert_eq!(
            (
                o.hops[0].host.as_str(),
                o.hops[0].port,
                o.hops[0].user.as_str()
            ),
            ("192.0.2.1", 22, "hopper")
        );
        assert_eq!(o.first_hop(), ("192.0.2.1", 22));
        // Each hop checks its host key in its own known_hosts file.
        assert_eq!(o.hops[0].known_hosts, home.join(".ssh/kh_hop"));
        std::fs::remove_dir_all(home).unwrap();
    }

    #[test]
    fn typed_values_override_the_config() {
        let (home, user) = with_config("over", CONFIG);
        let o = ssh_options(
            &Overrides {
                identity: vec![PathBuf::from("/k")],
                known_hosts: Some(PathBuf::from("/kh")),
                connect_timeout: Some(30),
                keepalive: Some(1),
                jump: Some(vec![]),
                ..over("root@dev:22")
            },
            &user,
        )
        .unwrap();
        assert_eq!((o.user.as_str(), o.jump.port), ("root", 22));
        assert_eq!(o.jump.host, "10.1.2.3");
        assert_eq!(o.identity_files, [PathBuf::from("/k")]);
        assert_eq!(o.known_hosts, PathBuf::from("/kh"));
        assert_eq!(o.connect_timeout, Duration::from_secs(30));
        assert_eq!(o.keepalive_interval, Duration::from_secs(1));
        assert!(o.hops.is_empty());
        assert_eq!(o.first_hop(), ("10.1.2.3", 22));
        // An alias the config does not know: the invoking user's defaults.
        let o = ssh_options(&over("elsewhere"), &user).unwrap();
        assert_eq!((o.user.as_str(), o.jump.port), ("alice", 22));
        assert_eq!(o.known_hosts, home.join(".ssh/known_hosts"));
        assert_eq!(o.agent_socket, Some(PathBuf::from("/tmp/agent")));
        assert_eq!(
            o.connect_timeout,
            Duration::from_secs(DEFAULT_CONNECT_TIMEOUT)
        );
        // -F none: the config is not read at all.
        let o = ssh_options(
            &Overrides {
                ssh_config: Some(PathBuf::from("none")),
                ..over("dev")
            },
            &user,
        )
        .unwrap();
        assert_eq!(o.jump.host, "dev");
        std::fs::remove_dir_all(home).unwrap();
    }
}
