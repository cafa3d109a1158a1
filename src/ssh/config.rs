//! The OpenSSH client configuration (`~/.ssh/config` of the invoking user, then
//! `/etc/ssh/ssh_config`), read the way `ssh` reads it for one host: `Host` blocks with
//! wildcard and negated patterns, `Include` (globs, relative to `~/.ssh` or `/etc/ssh`), and
//! the first value of each directive wins. Only the directives mse-vpn acts on are kept;
//! directives that change how `ssh` would connect and that mse-vpn cannot honour are warned
//! about (`Match`, `CertificateFile`, ...). Where an OpenSSH client is installed, the
//! effective settings come from `ssh -G` instead ([`super::effective`], which follows
//! `Match`); this parser still reads the files first, for their checks (owner and mode, bad
//! values named by file and line) and the aliases, and is the fallback.
//!
//! This file only reads configuration files; it never connects anywhere.

use std::path::{Path, PathBuf};

use thiserror::Error;

use super::target::{JumpHost, JumpHostError};

/// How many `Include` levels deep a file may go (OpenSSH's limit too).
const MAX_INCLUDE_DEPTH: usize = 16;

/// Why a configuration file was refused. Each names the file and line at fault.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file exists but cannot be read.
    #[error("cannot read ssh config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The file may be changed by someone other than its owner (OpenSSH refuses it too).
    #[error(
        "bad owner or permissions on ssh config {path}: it must belong to you (or root) and not be writable by others; run `chmod 600 {path}`"
    )]
    Permissions {
        /// The file.
        path: PathBuf,
    },
    /// A value that does not parse.
    #[error("{path}:{line}: bad value '{value}' for {keyword}: {expected}")]
    BadValue {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// The directive.
        keyword: String,
        /// The value given.
        value: String,
        /// What was expected.
        expected: &'static str,
    },
    /// A `ProxyJump` hop that is not `[USER@]HOST[:PORT]`.
    #[error("{path}:{line}: bad ProxyJump hop: {source}")]
    BadHop {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// Why.
        #[source]
        source: JumpHostError,
    },
    /// `ssh -G` refused the configuration (its own message) or could not run.
    #[error("ssh config for {host}: {message}")]
    SshG {
        /// The host asked about.
        host: String,
        /// What ssh said.
        message: String,
    },
    /// `ssh -G` printed a value mse-vpn cannot use.
    #[error(
        "ssh config for {host} (as `ssh -G` reports it): bad value '{value}' for {keyword}: {expected}"
    )]
    SshGValue {
        /// The host asked about.
        host: String,
        /// The setting.
        keyword: String,
        /// Its value.
        value: String,
        /// What was expected.
        expected: &'static str,
    },
    /// `Include` nested too deep (a loop?).
    #[error("{path}:{line}: Include nested more than {MAX_INCLUDE_DEPTH} levels deep (a loop?)")]
    IncludeDepth {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
    },
}

/// `StrictHostKeyChecking` as mse-vpn applies it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostKeyPolicy {
    /// `yes` or `ask` (there is nobody to ask): only known keys.
    Strict,
    /// `accept-new`: record unknown keys, refuse changed ones (as --accept-new-host-key).
    AcceptNew,
    /// `no` / `off`: mse-vpn warns and behaves as `accept-new` (a changed key is still
    /// refused).
    Off,
}

/// What the configuration says about one host, before command-line overrides. `None` (or
/// empty) where the configuration is silent.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostConfig {
    /// `HostName`, tokens expanded.
    pub host_name: Option<String>,
    /// `User`.
    pub user: Option<String>,
    /// `Port`.
    pub port: Option<u16>,
    /// `IdentityFile`s in order, raw (tokens and `~` are expanded by [`HostConfig::expand`]).
    pub identity_files: Vec<String>,
    /// `IdentitiesOnly`.
    pub identities_only: Option<bool>,
    /// The first `UserKnownHostsFile`, raw.
    pub user_known_hosts_file: Option<String>,
    /// `StrictHostKeyChecking`.
    pub strict_host_key_checking: Option<HostKeyPolicy>,
    /// `ServerAliveInterval` (seconds; 0 means off in OpenSSH).
    pub server_alive_interval: Option<u64>,
    /// `ServerAliveCountMax`.
    pub server_alive_count_max: Option<u32>,
    /// `ConnectTimeout` (seconds).
    pub connect_timeout: Option<u64>,
    /// `ProxyJump` hops, in order (`Some(vec![])` for `ProxyJump none`).
    pub proxy_jump: Option<Vec<JumpHost>>,
    /// `ProxyCommand` as written (tokens not expanded; `none` disables it).
    pub proxy_command: Option<String>,
    /// Messages about directives that were ignored although they change how `ssh` would
    /// connect (`Match`, `CertificateFile`, ...): the caller warns.
    pub warnings: Vec<String>,
    /// Messages about directives that were ignored and do not change how mse-vpn connects
    /// (`ControlMaster`, `ControlPath`, ...): shown with `-v` only.
    pub notes: Vec<String>,
    /// Every literal `Host` name of the files read (no patterns), whatever host was asked
    /// for: the candidates for "did you mean".
    pub aliases: Vec<String>,
}

/// Where to read configuration from, and how to expand `~` and `%u`.
#[derive(Clone, Debug)]
pub struct Sources {
    /// The user's file (`~/.ssh/config`), if it should be read.
    pub user_file: Option<PathBuf>,
    /// The system file (`/etc/ssh/ssh_config`), if it should be read.
    pub system_file: Option<PathBuf>,
    /// The invoking user's home (for `~`, `%d`, and relative `Include`s of the user file).
    pub home: PathBuf,
    /// The invoking user's login name (`%u`).
    pub local_user: String,
    /// The invoking user's uid: the owner the user file must have (or root).
    pub uid: u32,
    /// The invoking user's primary gid (`ssh -G` runs as the user).
    pub gid: u32,
    /// The OpenSSH client whose `ssh -G` gives the effective settings
    /// ([`super::effective`]); `None`: this parser only.
    pub ssh_client: Option<PathBuf>,
}

/// Which file a line is in, for relative `Include`s and the owner check.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Origin {
    User,
    System,
}

struct Reader<'a> {
    sources: &'a Sources,
    host: &'a str,
    out: HostConfig,
}

impl HostConfig {
    /// Reads `sources` for the alias `host` (as typed after `--proxy`, without user and port).
    pub fn load(sources: &Sources, host: &str) -> Result<HostConfig, ConfigError> {
        let mut reader = Reader {
            sources,
            host,
            out: HostConfig::default(),
        };
        if let Some(f) = &sources.user_file {
            reader.read_file(f, Origin::User, true, 0)?;
        }
        if let Some(f) = &sources.system_file {
            reader.read_file(f, Origin::System, true, 0)?;
        }
        Ok(reader.out)
    }

    /// Parses configuration text (no `Include`s followed), for tests and `config check`.
    pub fn parse_str(text: &str, sources: &Sources, host: &str) -> Result<HostConfig, ConfigError> {
        let mut reader = Reader {
            sources,
            host,
            out: HostConfig::default(),
        };
        reader.read_text(text, Path::new("<text>"), Origin::User, true, 0)?;
        Ok(reader.out)
    }

    /// Expands `~` and the tokens `%%`, `%d` (home), `%h` (host name), `%p` (port), `%r`
    /// (remote user), `%u` (local user) and `%n` (the alias) in a path-like value.
    pub fn expand(
        raw: &str,
        sources: &Sources,
        alias: &str,
        host: &str,
        port: u16,
        remote_user: &str,
    ) -> PathBuf {
        let mut s = String::new();
        let mut chars = raw.chars();
        while let Some(c) = chars.next() {
            if c != '%' {
                s.push(c);
                continue;
            }
            match chars.next() {
                Some('%') => s.push('%'),
                Some('d') => s.push_str(&sources.home.to_string_lossy()),
                Some('h') => s.push_str(host),
                Some('p') => s.push_str(&port.to_string()),
                Some('r') => s.push_str(remote_user),
                Some('u') => s.push_str(&sources.local_user),
                Some('n') => s.push_str(alias),
                Some(other) => {
                    // Unknown tokens are kept as typed: the file then does not exist, and the
                    // error names it.
                    s.push('%');
                    s.push(other);
                }
                None => s.push('%'),
            }
        }
        tilde(&s, &sources.home)
    }
}

/// `~` and `~/...` to the home directory.
fn tilde(s: &str, home: &Path) -> PathBuf {
    if s == "~" {
        home.to_owned()
    } else if let Some(rest) = s.strip_prefix("~/") {
        home.join(rest)
    } else {
        PathBuf::from(s)
    }
}

impl Reader<'_> {
    fn read_file(
        &mut self,
        path: &Path,
        origin: Origin,
        active: bool,
        depth: usize,
    ) -> Result<(), ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        if origin == Origin::User {
            // As ssh does: owned by the user (or root), not writable by others. Windows: no
            // modes to check (see mse_vpn_platform::account).
            if let Some((owner, mode)) = std::fs::metadata(path)
                .ok()
                .and_then(|m| mse_vpn_platform::account::owner_and_mode(&m))
                && ((owner != self.sources.uid && owner != 0) || mode & 0o022 != 0)
            {
                return Err(ConfigError::Permissions {
                    path: path.to_owned(),
                });
            }
        }
        self.read_text(&text, path, origin, active, depth)
    }

    fn read_text(
        &mut self,
        text: &str,
        path: &Path,
        origin: Origin,
        mut active: bool,
        depth: usize,
    ) -> Result<(), ConfigError> {
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let Some((keyword, args)) = split_line(raw) else {
                continue;
            };
            let keyword = keyword.to_ascii_lowercase();
            let bad = |value: &str, expected: &'static str| ConfigError::BadValue {
                path: path.to_owned(),
                line,
                keyword: keyword.clone(),
                value: value.to_owned(),
                expected,
            };
            match keyword.as_str() {
                "host" => {
                    active = host_matches(&args, self.host);
                    for a in &args {
                        if !a.contains(['*', '?', '!']) && !self.out.aliases.contains(a) {
                            self.out.aliases.push(a.clone());
                        }
                    }
                    continue;
                }
                "match" => {
                    self.out.warnings.push(format!(
                        "{}:{line}: Match blocks are not supported by mse-vpn; the directives under it are ignored",
                        path.display()
                    ));
                    active = false;
                    continue;
                }
                "include" => {
                    if depth >= MAX_INCLUDE_DEPTH {
                        return Err(ConfigError::IncludeDepth {
                            path: path.to_owned(),
                            line,
                        });
                    }
                    for pattern in &args {
                        let base = match origin {
                            Origin::User => self.sources.home.join(".ssh"),
                            Origin::System => PathBuf::from("/etc/ssh"),
                        };
                        let full = tilde(pattern, &self.sources.home);
                        let full = if full.is_absolute() {
                            full
                        } else {
                            base.join(full)
                        };
                        for file in glob(&full) {
                            self.read_file(&file, origin, active, depth + 1)?;
                        }
                    }
                    continue;
                }
                _ => {}
            }
            if !active {
                continue;
            }
            let Some(first) = args.first().cloned() else {
                return Err(bad("", "a value"));
            };
            let out = &mut self.out;
            match keyword.as_str() {
                "hostname" if out.host_name.is_none() => {
                    out.host_name = Some(first.replace("%h", self.host).replace("%%", "%"));
                }
                "user" => {
                    out.user.get_or_insert(first);
                }
                "port" => {
                    let port = first
                        .parse::<u16>()
                        .ok()
                        .filter(|p| *p > 0)
                        .ok_or_else(|| bad(&first, "a port number from 1 to 65535"))?;
                    out.port.get_or_insert(port);
                }
                "identityfile" => out.identity_files.push(first),
                "identitiesonly" => {
                    let v = yes_no(&first).ok_or_else(|| bad(&first, "yes or no"))?;
                    out.identities_only.get_or_insert(v);
                }
                "userknownhostsfile" if out.user_known_hosts_file.is_none() => {
                    if args.len() > 1 {
                        out.notes.push(format!(
                            "{}:{line}: only the first UserKnownHostsFile ({first}) is used",
                            path.display()
                        ));
                    }
                    out.user_known_hosts_file = Some(first);
                }
                "stricthostkeychecking" => {
                    let v = match first.to_ascii_lowercase().as_str() {
                        "yes" | "ask" => HostKeyPolicy::Strict,
                        "accept-new" => HostKeyPolicy::AcceptNew,
                        "no" | "off" => HostKeyPolicy::Off,
                        _ => return Err(bad(&first, "yes, ask, accept-new or no")),
                    };
                    out.strict_host_key_checking.get_or_insert(v);
                }
                "serveraliveinterval" => {
                    let v = first
                        .parse::<u64>()
                        .map_err(|_| bad(&first, "a number of seconds"))?;
                    out.server_alive_interval.get_or_insert(v);
                }
                "serveralivecountmax" => {
                    let v = first.parse::<u32>().map_err(|_| bad(&first, "a count"))?;
                    out.server_alive_count_max.get_or_insert(v);
                }
                "connecttimeout" => {
                    let v = first
                        .parse::<u64>()
                        .map_err(|_| bad(&first, "a number of seconds"))?;
                    out.connect_timeout.get_or_insert(v);
                }
                "proxyjump" if out.proxy_jump.is_none() => {
                    out.proxy_jump = Some(if first.eq_ignore_ascii_case("none") {
                        Vec::new()
                    } else {
                        parse_hops(&first).map_err(|source| ConfigError::BadHop {
                            path: path.to_owned(),
                            line,
                            source,
                        })?
                    });
                }
                "proxycommand" if out.proxy_command.is_none() => {
                    // The rest of the line, as the shell will see it.
                    out.proxy_command = Some(raw_value(raw).to_owned());
                }
                "certificatefile"
                | "pkcs11provider"
                | "securitykeyprovider"
                | "hostkeyalias"
                | "canonicalizehostname"
                | "globalknownhostsfile"
                | "addressfamily"
                | "bindaddress" => {
                    out.warnings.push(format!(
                        "{}:{line}: {} is not supported by mse-vpn and is ignored",
                        path.display(),
                        split_line(raw).map_or("", |(k, _)| k)
                    ));
                }
                // Connection sharing and commands run around a login: mse-vpn opens its own
                // connections and runs no shell, so these change nothing for it.
                "controlmaster" | "controlpath" | "controlpersist" | "localcommand"
                | "permitlocalcommand" | "remotecommand" | "requesttty" | "sessiontype" => {
                    out.notes.push(format!(
                        "{}:{line}: {} does not apply to mse-vpn: ignored",
                        path.display(),
                        split_line(raw).map_or("", |(k, _)| k)
                    ));
                }
                // Everything else (SendEnv, HashKnownHosts, ForwardAgent, Ciphers, ...) does
                // not change where or as whom mse-vpn connects.
                _ => {}
            }
        }
        Ok(())
    }
}

/// A `ProxyJump` value: comma-separated `[USER@]HOST[:PORT]` hops.
pub fn parse_hops(s: &str) -> Result<Vec<JumpHost>, JumpHostError> {
    s.split(',').map(str::parse).collect()
}

fn yes_no(s: &str) -> Option<bool> {
    match s.to_ascii_lowercase().as_str() {
        "yes" | "true" => Some(true),
        "no" | "false" => Some(false),
        _ => None,
    }
}

/// Splits a line into its keyword and arguments (`Keyword arg ...` or `Keyword=arg`;
/// double-quoted arguments may hold spaces; `#` starts a comment). `None` for blank and
/// comment lines.
/// The value of a config line as written: everything after the keyword and its separator.
fn raw_value(line: &str) -> &str {
    let line = line.trim();
    let end = line
        .find(|c: char| c.is_whitespace() || c == '=')
        .unwrap_or(line.len());
    let rest = line[end..].trim_start();
    rest.strip_prefix('=').unwrap_or(rest).trim()
}

fn split_line(line: &str) -> Option<(&str, Vec<String>)> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let end = line
        .find(|c: char| c.is_whitespace() || c == '=')
        .unwrap_or(line.len());
    let (keyword, rest) = line.split_at(end);
    let rest = rest.trim_start();
    let rest = rest.strip_prefix('=').unwrap_or(rest);
    let mut args = Vec::new();
    let mut chars = rest.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        match chars.peek() {
            None | Some('#') => break,
            Some('"') => {
                chars.next();
                args.push(chars.by_ref().take_while(|c| *c != '"').collect());
            }
            Some(_) => {
                let mut arg = String::new();
                while let Some(c) = chars.peek().copied().filter(|c| !c.is_whitespace()) {
                    arg.push(c);
                    chars.next();
                }
                args.push(arg);
            }
        }
    }
    Some((keyword, args))
}

/// A `Host` line's patterns against `host`: a negated pattern that matches rules the block
/// out; otherwise one positive match is needed. Case-insensitive, as OpenSSH.
fn host_matches(patterns: &[String], host: &str) -> bool {
    let host = host.to_ascii_lowercase();
    let mut matched = false;
    for p in patterns {
        let p = p.to_ascii_lowercase();
        if let Some(neg) = p.strip_prefix('!') {
            if wildcard(neg.as_bytes(), host.as_bytes()) {
                return false;
            }
        } else if wildcard(p.as_bytes(), host.as_bytes()) {
            matched = true;
        }
    }
    matched
}

/// `*` (any run) and `?` (one character) matching.
fn wildcard(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && (pattern[p] == b'?' || pattern[p] == text[t]) {
            p += 1;
            t += 1;
        } else if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if let Some((sp, st)) = star {
            p = sp + 1;
            t = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|c| *c == b'*')
}

/// The files matching an absolute path whose components may hold `*` and `?`, sorted (as
/// glob(3)); a path without wildcards is returned as is.
fn glob(path: &Path) -> Vec<PathBuf> {
    use std::path::Component;
    // The root: `/`, or on Windows a drive (or UNC) prefix and its root.
    let mut comps = path.components().peekable();
    let mut root = PathBuf::new();
    while let Some(c @ (Component::Prefix(_) | Component::RootDir)) = comps.peek().copied() {
        root.push(c);
        comps.next();
    }
    let mut found = vec![root];
    for comp in comps {
        let comp = comp.as_os_str().to_string_lossy();
        let mut next = Vec::new();
        for dir in &found {
            if comp.contains(['*', '?']) {
                let Ok(entries) = std::fs::read_dir(dir) else {
                    continue;
                };
                let mut names: Vec<String> = entries
                    .filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| !n.starts_with('.') && wildcard(comp.as_bytes(), n.as_bytes()))
                    .collect();
                names.sort();
                next.extend(names.into_iter().map(|n| dir.join(n)));
            } else {
                next.push(dir.join(comp.as_ref()));
            }
        }
        found = next;
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sources(home: &Path) -> Sources {
        Sources {
            user_file: Some(home.join(".ssh/config")),
            system_file: None,
            home: home.to_owned(),
            local_user: "alice".into(),
            uid: mse_vpn_platform::account::current().unwrap().unwrap().uid,
            gid: 0,
            ssh_client: None,
        }
    }

    fn parse(text: &str, host: &str) -> HostConfig {
        HostConfig::parse_str(text, &sources(Path::new("/home/alice")), host).unwrap()
    }

    #[test]
    fn patterns_wildcards_and_negation() {
        assert!(wildcard(b"*.example.com", b"db.example.com"));
        assert!(wildcard(b"db?", b"db1"));
        assert!(!wildcard(b"db?", b"db12"));
        assert!(wildcard(b"*", b""));
        assert!(wildcard(b"a*b*c", b"axxbyyc"));
        assert!(!wildcard(b"a*b*c", b"axxbyy"));
        let p = |s: &str| s.split(' ').map(str::to_owned).collect::<Vec<_>>();
        assert!(host_matches(&p("*.corp !bad.corp"), "good.corp"));
        assert!(!host_matches(&p("*.corp !bad.corp"), "bad.corp"));
        assert!(!host_matches(&p("!bad.corp"), "other"));
        assert!(host_matches(&p("Bastion"), "bastion"));
    }

    #[test]
    fn first_value_wins_and_identity_files_accumulate() {
        let c = parse(
            "# comment\n\
             Host bastion\n  HostName 203.0.113.7\n  User ops\n  Port 2222\n  IdentityFile ~/.ssh/a\n\
             Host *\n  User nobody\n  Port 22\n  IdentityFile \"~/.ssh/b c\"\n  IdentitiesOnly yes\n\
               ServerAliveInterval=7\n  ServerAliveCountMax 4\n  ConnectTimeout 9 # trailing\n",
            "bastion",
        );
        assert_eq!(c.host_name.as_deref(), Some("203.0.113.7"));
        assert_eq!(c.user.as_deref(), Some("ops"));
        assert_eq!(c.port, Some(2222));
        assert_eq!(c.identity_files, ["~/.ssh/a", "~/.ssh/b c"]);
        assert_eq!(c.identities_only, Some(true));
        assert_eq!(c.server_alive_interval, Some(7));
        assert_eq!(c.server_alive_count_max, Some(4));
        assert_eq!(c.connect_timeout, Some(9));
        // Another alias only gets the `Host *` values.
        let c = parse("Host bastion\n User ops\nHost *\n User nobody\n", "other");
        assert_eq!(c.user.as_deref(), Some("nobody"));
        assert_eq!(c.host_name, None);
    }

    #[test]
    fn host_key_policy_known_hosts_and_proxy_jump() {
        let c = parse(
            "Host b\n StrictHostKeyChecking accept-new\n UserKnownHostsFile ~/kh /dev/null\n ProxyJump u@hop1:2200,hop2\n",
            "b",
        );
        assert_eq!(c.strict_host_key_checking, Some(HostKeyPolicy::AcceptNew));
        assert_eq!(c.user_known_hosts_file.as_deref(), Some("~/kh"));
        assert_eq!(
            (c.warnings.len(), c.notes.len()),
            (0, 1),
            "only the first file is used"
        );
        let hops = c.proxy_jump.unwrap();
        assert_eq!(hops.len(), 2);
        assert_eq!(hops[0].to_string(), "u@hop1:2200");
        assert_eq!(hops[1].host, "hop2");
        assert_eq!(parse("ProxyJump none\n", "x").proxy_jump, Some(vec![]));
        assert_eq!(
            parse("StrictHostKeyChecking no\n", "x").strict_host_key_checking,
            Some(HostKeyPolicy::Off)
        );
    }

    #[test]
    fn bad_and_unsupported_entries_name_file_and_line() {
        let s = sources(Path::new("/home/alice"));
        let e = HostConfig::parse_str("Host b\n\n Port none\n", &s, "b").unwrap_err();
        assert!(
            e.to_string().contains(":3: bad value 'none' for port"),
            "{e}"
        );
        // ProxyCommand is kept as written (quotes and all), for the shell; first one wins.
        let c = parse(
            "Host b\n ProxyCommand sh -c \"nc %h %p\"  # via nc\nHost *\n ProxyCommand none\n",
            "b",
        );
        assert_eq!(
            c.proxy_command.as_deref(),
            Some("sh -c \"nc %h %p\"  # via nc")
        );
        assert_eq!(
            parse("ProxyCommand=none\n", "b").proxy_command.as_deref(),
            Some("none")
        );
        let e = HostConfig::parse_str("ProxyJump -x\n", &s, "b").unwrap_err();
        assert!(e.to_string().contains(":1: bad ProxyJump hop"), "{e}");
        let c = parse("Match host b\n User m\nHost *\n CertificateFile ~/c\n", "b");
        assert_eq!(c.user, None);
        assert_eq!(c.warnings.len(), 2, "{:?}", c.warnings);
    }

    #[test]
    fn connection_sharing_is_ignored_quietly() {
        let c = parse(
            "Host *\n ControlMaster auto\n ControlPath ~/.ssh/cm-%r@%h:%p\n ControlPersist 10m\n SendEnv LANG\n",
            "10.0.0.5",
        );
        assert_eq!(c.warnings, Vec::<String>::new());
        assert_eq!(c.notes.len(), 3, "{:?}", c.notes);
        assert!(
            c.notes[0].contains(":2: ControlMaster does not apply"),
            "{:?}",
            c.notes
        );
    }

    #[test]
    fn literal_host_names_are_collected_as_aliases() {
        let c = parse(
            "Host uxjump db-prod\n User a\nHost *.corp !bad.corp\n User b\nHost db?\n",
            "other",
        );
        assert_eq!(c.aliases, ["uxjump", "db-prod"]);
    }

    #[test]
    fn tokens_and_tilde() {
        let s = sources(Path::new("/home/alice"));
        assert_eq!(
            HostConfig::expand("~/.ssh/%r@%h:%p-%u-%n%%", &s, "b", "h.example", 2222, "ops"),
            PathBuf::from("/home/alice/.ssh/ops@h.example:2222-alice-b%")
        );
        assert_eq!(
            HostConfig::expand("%d/k", &s, "b", "h", 22, "r"),
            PathBuf::from("/home/alice/k")
        );
        assert_eq!(
            parse("Host b\n HostName %h.internal\n", "b")
                .host_name
                .as_deref(),
            Some("b.internal")
        );
    }

    #[test]
    fn includes_follow_globs_relative_to_dot_ssh() {
        let home = std::env::temp_dir().join(format!("mse-vpn-cfg-{}", std::process::id()));
        let ssh = home.join(".ssh");
        std::fs::create_dir_all(ssh.join("conf.d")).unwrap();
        std::fs::write(
            ssh.join("config"),
            "Host b\n Include conf.d/*.conf\nHost *\n Port 1\n",
        )
        .unwrap();
        std::fs::write(ssh.join("conf.d/10-a.conf"), "User from-a\n").unwrap();
        std::fs::write(ssh.join("conf.d/20-b.conf"), "User from-b\nPort 2\n").unwrap();
        use mse_vpn_platform::account::set_mode;
        for f in ["config", "conf.d/10-a.conf", "conf.d/20-b.conf"] {
            set_mode(&ssh.join(f), 0o600).unwrap();
        }
        let c = HostConfig::load(&sources(&home), "b").unwrap();
        assert_eq!(c.user.as_deref(), Some("from-a"));
        assert_eq!(c.port, Some(2));
        // The include is inside `Host b`: another alias does not see it.
        let c = HostConfig::load(&sources(&home), "z").unwrap();
        assert_eq!((c.user, c.port), (None, Some(1)));
        // A group-writable user config is refused, as OpenSSH does (Windows has no modes).
        set_mode(&ssh.join("config"), 0o664).unwrap();
        if cfg!(unix) {
            let e = HostConfig::load(&sources(&home), "b").unwrap_err();
            assert!(e.to_string().contains("chmod 600"), "{e}");
        }
        std::fs::remove_dir_all(&home).unwrap();
    }
}
