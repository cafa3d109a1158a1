//! The ssh settings for one host as OpenSSH itself computes them: `ssh -G`, with its exact
//! semantics (`Match` blocks, tokens, canonicalisation, `Include`), run as the invoking user
//! so that it reads their `~/.ssh/config` (and runs a `Match exec` command as them, never as
//! root). Where no OpenSSH client is installed, [`super::config`]'s own parser is the
//! fallback.
//!
//! `ssh -G` prints every setting, defaults included; a setting counts as configured when it
//! differs from what `ssh -G -F none` prints for the same host (no configuration at all), so
//! mse-vpn's own defaults still apply where the configuration is silent. One consequence: a
//! configuration that sets a value equal to OpenSSH's default (`ServerAliveCountMax 3`) is
//! taken as silent, and mse-vpn's default applies.
//!
//! This file runs `ssh -G` only; it never connects anywhere.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use super::config::{ConfigError, HostConfig, HostKeyPolicy, Sources, parse_hops};

/// How long `ssh -G` may take (a `Match exec` command runs inside it).
const SSH_G_LIMIT: Duration = Duration::from_secs(10);

/// Settings mse-vpn does not honour, warned about when configured.
const UNSUPPORTED: &[(&str, &str)] = &[
    ("certificatefile", "CertificateFile"),
    ("pkcs11provider", "PKCS11Provider"),
    ("securitykeyprovider", "SecurityKeyProvider"),
    ("hostkeyalias", "HostKeyAlias"),
    ("globalknownhostsfile", "GlobalKnownHostsFile"),
    ("addressfamily", "AddressFamily"),
    ("bindaddress", "BindAddress"),
    ("bindinterface", "BindInterface"),
];

/// Settings that change nothing for mse-vpn (it opens its own connections and runs no
/// shell): noted with `-v` only.
const NOT_APPLICABLE: &[(&str, &str)] = &[
    ("controlmaster", "ControlMaster"),
    ("controlpath", "ControlPath"),
    ("controlpersist", "ControlPersist"),
    ("localcommand", "LocalCommand"),
    ("permitlocalcommand", "PermitLocalCommand"),
    ("remotecommand", "RemoteCommand"),
    ("requesttty", "RequestTTY"),
    ("sessiontype", "SessionType"),
];

/// `ssh -G` output: each keyword's values (a keyword may repeat: `identityfile`).
type Dump = BTreeMap<String, Vec<String>>;

/// What `ssh -G` says about `host` (as typed after `--proxy`, with the typed `user` and
/// `port` if any), as a [`HostConfig`] of the settings that differ from OpenSSH's defaults.
/// `Ok(None)` when `sources` names no OpenSSH client or it is not installed: the caller
/// falls back to the parser. An error when `ssh -G` refuses the configuration (its own
/// message, as the user's `ssh` would print it).
pub fn load(
    sources: &Sources,
    host: &str,
    user: Option<&str>,
    port: Option<u16>,
) -> Result<Option<HostConfig>, ConfigError> {
    let Some(client) = &sources.ssh_client else {
        return Ok(None);
    };
    let config: Option<&Path> = match (&sources.user_file, &sources.system_file) {
        // `-F none`: no configuration, nothing to ask.
        (None, None) => return Ok(None),
        (Some(f), None) => Some(f),
        _ => None,
    };
    // Both at once: each is a process start (a few ms, more on a busy machine).
    let Some(effective) = start(client, sources, config, host, user, port)? else {
        return Ok(None);
    };
    let Some(defaults) = start(client, sources, Some(Path::new("none")), host, user, port)? else {
        return Ok(None);
    };
    let (effective, defaults) = (finish(effective, host)?, finish(defaults, host)?);
    from_dumps(&effective, &defaults, host).map(Some)
}

/// A running `ssh -G`, its output read by two threads (nothing blocks on a full pipe).
struct Running {
    child: std::process::Child,
    stdout: std::thread::JoinHandle<String>,
    stderr: std::thread::JoinHandle<String>,
}

/// Starts `ssh -G [-F config] [-l user] [-p port] host` as the invoking user; `None` if the
/// client is not installed.
fn start(
    client: &Path,
    sources: &Sources,
    config: Option<&Path>,
    host: &str,
    user: Option<&str>,
    port: Option<u16>,
) -> Result<Option<Running>, ConfigError> {
    let mut cmd = tokio::process::Command::new(client);
    cmd.arg("-G");
    if let Some(f) = config {
        cmd.arg("-F").arg(f);
    }
    if let Some(u) = user {
        cmd.arg("-l").arg(u);
    }
    if let Some(p) = port {
        cmd.arg("-p").arg(p.to_string());
    }
    // `--`: a host that starts with `-` is a host, not an option.
    cmd.arg("--").arg(host);
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    mse_vpn_platform::process::run_as(
        &mut cmd,
        &mse_vpn_platform::account::Account {
            name: sources.local_user.clone(),
            uid: sources.uid,
            gid: sources.gid,
            home: sources.home.clone(),
        },
    );
    let mut child = match cmd.into_std().spawn() {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(ConfigError::SshG {
                host: host.to_owned(),
                message: format!("cannot run {}: {source}", client.display()),
            });
        }
    };
    fn drain(pipe: Option<impl std::io::Read + Send + 'static>) -> std::thread::JoinHandle<String> {
        std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_string(&mut s);
            }
            s
        })
    }
    Ok(Some(Running {
        stdout: drain(child.stdout.take()),
        stderr: drain(child.stderr.take()),
        child,
    }))
}

/// Waits (at most [`SSH_G_LIMIT`]) for a `ssh -G` and parses what it printed.
fn finish(mut running: Running, host: &str) -> Result<Dump, ConfigError> {
    let started = Instant::now();
    let status = loop {
        match running.child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if started.elapsed() < SSH_G_LIMIT => {
                std::thread::sleep(Duration::from_millis(2));
            }
            Ok(None) | Err(_) => {
                let _ = running.child.kill();
                let _ = running.child.wait();
                return Err(ConfigError::SshG {
                    host: host.to_owned(),
                    message: format!(
                        "`ssh -G {host}` did not finish within {} s (a Match exec command that hangs?)",
                        SSH_G_LIMIT.as_secs()
                    ),
                });
            }
        }
    };
    let out = running.stdout.join().unwrap_or_default();
    let err = running.stderr.join().unwrap_or_default();
    if !status.success() {
        let message = err
            .lines()
            .filter(|l| !l.trim().is_empty())
            .collect::<Vec<_>>()
            .join("; ");
        return Err(ConfigError::SshG {
            host: host.to_owned(),
            message: if message.is_empty() {
                format!("`ssh -G {host}` failed ({status})")
            } else {
                message
            },
        });
    }
    Ok(parse(&out))
}

/// `keyword value...` lines into a map (keywords in lower case, as `ssh -G` prints them).
fn parse(out: &str) -> Dump {
    let mut dump = Dump::new();
    for line in out.lines() {
        let line = line.trim();
        let (key, value) = line.split_once(' ').unwrap_or((line, ""));
        if key.is_empty() {
            continue;
        }
        dump.entry(key.to_ascii_lowercase())
            .or_default()
            .push(value.trim().to_owned());
    }
    dump
}

/// The settings of `effective` that differ from `defaults`, as a [`HostConfig`].
fn from_dumps(effective: &Dump, defaults: &Dump, host: &str) -> Result<HostConfig, ConfigError> {
    // The first value of `key`, if configured (differs from the default).
    let set = |key: &str| -> Option<&str> {
        let v = effective.get(key)?;
        (defaults.get(key) != Some(v)).then(|| v.first().map(String::as_str))?
    };
    let bad = |keyword: &str, value: &str, expected: &'static str| ConfigError::SshGValue {
        host: host.to_owned(),
        keyword: keyword.to_owned(),
        value: value.to_owned(),
        expected,
    };
    let number = |key: &str| -> Result<Option<u64>, ConfigError> {
        match set(key) {
            None | Some("none") => Ok(None),
            Some(v) => v
                .parse()
                .map(Some)
                .map_err(|_| bad(key, v, "a number of seconds")),
        }
    };
    let mut out = HostConfig {
        host_name: set("hostname").map(str::to_owned),
        user: set("user").map(str::to_owned),
        ..HostConfig::default()
    };
    if let Some(p) = set("port") {
        out.port = Some(
            p.parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| bad("port", p, "a port number from 1 to 65535"))?,
        );
    }
    if effective.get("identityfile") != defaults.get("identityfile") {
        out.identity_files = effective.get("identityfile").cloned().unwrap_or_default();
    }
    if let Some(v) = set("identitiesonly") {
        out.identities_only = Some(matches!(v, "yes" | "true"));
    }
    if let Some(v) = set("userknownhostsfile") {
        out.user_known_hosts_file = v.split_whitespace().next().map(str::to_owned);
    }
    if let Some(v) = set("stricthostkeychecking") {
        out.strict_host_key_checking = Some(match v {
            "yes" | "true" | "ask" => HostKeyPolicy::Strict,
            "accept-new" => HostKeyPolicy::AcceptNew,
            "no" | "false" | "off" => HostKeyPolicy::Off,
            other => {
                return Err(bad(
                    "stricthostkeychecking",
                    other,
                    "yes, ask, accept-new or no",
                ));
            }
        });
    }
    out.server_alive_interval = number("serveraliveinterval")?;
    out.server_alive_count_max =
        number("serveralivecountmax")?.map(|n| u32::try_from(n).unwrap_or(u32::MAX));
    out.connect_timeout = number("connecttimeout")?;
    if let Some(v) = set("proxyjump") {
        out.proxy_jump = Some(if v.eq_ignore_ascii_case("none") {
            Vec::new()
        } else {
            parse_hops(v).map_err(|_| bad("proxyjump", v, "[USER@]HOST[:PORT],..."))?
        });
    }
    out.proxy_command = set("proxycommand").map(str::to_owned);
    for (key, name) in UNSUPPORTED {
        if let Some(v) = set(key) {
            out.warnings.push(format!(
                "ssh config for {host}: {name} is not supported by mse-vpn and is ignored ({name} {v})"
            ));
        }
    }
    for (key, name) in NOT_APPLICABLE {
        if let Some(v) = set(key) {
            out.notes.push(format!(
                "ssh config for {host}: {name} does not apply to mse-vpn: ignored ({name} {v})"
            ));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULTS: &str = "host dev\nuser alice\nhostname dev\nport 22\nidentitiesonly no\n\
        stricthostkeychecking ask\nserveralivecountmax 3\nserveraliveinterval 0\n\
        connecttimeout none\ncontrolmaster false\nidentityfile ~/.ssh/id_rsa\n\
        identityfile ~/.ssh/id_ed25519\nuserknownhostsfile /home/alice/.ssh/known_hosts /home/alice/.ssh/known_hosts2\n\
        addressfamily any\n";

    fn config(changes: &str) -> Result<HostConfig, ConfigError> {
        let defaults = parse(DEFAULTS);
        let mut effective = defaults.clone();
        let changed = parse(changes);
        for (k, v) in changed {
            effective.insert(k, v);
        }
        from_dumps(&effective, &defaults, "dev")
    }

    #[test]
    fn only_what_differs_from_the_defaults_counts_as_configured() {
        let c = config("").unwrap();
        assert_eq!(c, HostConfig::default());
        let c = config(
            "user ops\nhostname 10.1.2.3\nport 2222\nidentityfile ~/.ssh/k_%r\n\
             userknownhostsfile /home/alice/.ssh/kh_dev /dev/null\nstricthostkeychecking accept-new\n\
             serveraliveinterval 9\nserveralivecountmax 5\nconnecttimeout 4\nproxyjump u@hop:2200,hop2\n\
             identitiesonly yes\naddressfamily inet\ncontrolmaster auto\n",
        )
        .unwrap();
        assert_eq!(c.user.as_deref(), Some("ops"));
        assert_eq!(c.host_name.as_deref(), Some("10.1.2.3"));
        assert_eq!(c.port, Some(2222));
        assert_eq!(c.identity_files, ["~/.ssh/k_%r"]);
        assert_eq!(
            c.user_known_hosts_file.as_deref(),
            Some("/home/alice/.ssh/kh_dev")
        );
        assert_eq!(c.strict_host_key_checking, Some(HostKeyPolicy::AcceptNew));
        assert_eq!(
            (
                c.server_alive_interval,
                c.server_alive_count_max,
                c.connect_timeout
            ),
            (Some(9), Some(5), Some(4))
        );
        assert_eq!(c.identities_only, Some(true));
        let hops = c.proxy_jump.unwrap();
        assert_eq!(hops[0].to_string(), "u@hop:2200");
        assert_eq!(hops[1].host, "hop2");
        assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
        assert!(c.warnings[0].contains("AddressFamily inet"));
        assert_eq!(c.notes.len(), 1, "{:?}", c.notes);
        assert_eq!(
            config("stricthostkeychecking false\n")
                .unwrap()
                .strict_host_key_checking,
            Some(HostKeyPolicy::Off)
        );
        assert!(config("serveraliveinterval soon\n").is_err());
    }

    /// Through a real OpenSSH client where one is installed: a `Match` block that the
    /// file parser cannot follow sets the user and the key file.
    #[test]
    fn a_match_block_sets_the_user_and_the_key_file_through_ssh_g() {
        let me = mse_vpn_platform::account::current().unwrap().unwrap();
        let dir = std::env::temp_dir().join(format!("mse-vpn-ssh-g-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("config");
        std::fs::write(
            &file,
            "Host dev\n  HostName 10.1.2.3\nMatch host 10.1.2.3 !user ops\n  User ops\n  IdentityFile %d/.ssh/match_%r\nHost *\n  ServerAliveInterval 7\n",
        )
        .unwrap();
        mse_vpn_platform::account::set_mode(&file, 0o600).unwrap();
        let sources = Sources {
            user_file: Some(file),
            system_file: None,
            home: me.home.clone(),
            local_user: me.name.clone(),
            uid: me.uid,
            gid: me.gid,
            ssh_client: Some("ssh".into()),
        };
        let Some(c) = load(&sources, "dev", None, None).unwrap() else {
            eprintln!("no OpenSSH client installed: nothing to check");
            let _ = std::fs::remove_dir_all(&dir);
            return;
        };
        assert_eq!(c.host_name.as_deref(), Some("10.1.2.3"));
        assert_eq!(c.user.as_deref(), Some("ops"));
        assert_eq!(c.identity_files, ["%d/.ssh/match_%r"]);
        assert_eq!(c.server_alive_interval, Some(7));
        // The parser alone does not follow Match.
        let parsed = HostConfig::load(
            &Sources {
                ssh_client: None,
                ..sources.clone()
            },
            "dev",
        )
        .unwrap();
        assert_eq!(parsed.user, None);
        // A typed user wins, and Match sees it: typed `ops`, `!user ops` does not match.
        let c = load(&sources, "dev", Some("ops"), Some(2200))
            .unwrap()
            .unwrap();
        assert_eq!(c.user, None, "the typed user, as ssh -l would");
        assert!(c.identity_files.is_empty());
        // A configuration ssh refuses is refused with ssh's own words.
        std::fs::write(
            sources.user_file.as_ref().unwrap(),
            "Host dev\n  Port none\n",
        )
        .unwrap();
        let e = load(&sources, "dev", None, None).unwrap_err();
        assert!(e.to_string().contains("line 2"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
