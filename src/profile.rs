//! Named profiles: `[profile.NAME]` tables in `~/.config/mse-vpn/config.toml` of the
//! invoking user and in `/etc/mse-vpn/config.toml`, each holding `up` options, so that
//! `mse-vpn up dev` stands for a long command line. Values are parsed into the same typed
//! values as the flags (a bad CIDR or jump host is refused with the file and line), unknown
//! keys are errors, and flags given on the command line win over the profile.
//!
//! This file reads configuration files only; it never touches the network or the host.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer};
use thiserror::Error;

use clap::ArgMatches;
use clap::parser::ValueSource;

use crate::cli::{JumpHops, UpArgs};
use crate::ssh::JumpHost;

/// The system-wide profile file.
pub const SYSTEM_FILE: &str = "/etc/mse-vpn/config.toml";

/// The profile file of a user whose home is `home`.
pub fn user_file(home: &Path) -> PathBuf {
    home.join(".config").join("mse-vpn").join("config.toml")
}

/// Why a profile file or a profile was refused.
#[derive(Debug, Error)]
pub enum ProfileError {
    /// The file exists but cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Bad TOML, an unknown key, or a value that does not parse.
    #[error("{path}:{line}: {}", error.message().trim_end())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// 1-based line of the bad entry.
        line: usize,
        /// The parser's error (its message is shown; its code snippet is not, the line
        /// number says where).
        error: toml::de::Error,
    },
    /// `up NAME` for a profile no file defines.
    #[error("no profile named '{name}' in {searched}; defined: {known}")]
    NotFound {
        /// The name asked for.
        name: String,
        /// The files looked in.
        searched: String,
        /// The names that exist (or "none").
        known: String,
    },
}

/// One file's contents.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileFile {
    /// The profiles by name.
    #[serde(default)]
    pub profile: BTreeMap<String, Profile>,
}

/// The `up` options a profile may hold; every key is optional.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// `--proxy`.
    #[serde(default, deserialize_with = "parsed")]
    pub proxy: Option<JumpHost>,
    /// `--cidr`s.
    #[serde(default, deserialize_with = "cidr_list")]
    pub cidrs: Vec<IpNet>,
    /// `--exclude`s.
    #[serde(default, deserialize_with = "cidr_list")]
    pub excludes: Vec<IpNet>,
    /// `-i` key files (`~` is the invoking user's home).
    #[serde(default)]
    pub identity: Vec<String>,
    /// `--known-hosts`.
    pub known_hosts: Option<String>,
    /// `--accept-new-host-key`.
    pub accept_new_host_key: Option<bool>,
    /// `--mtu`.
    #[serde(default, deserialize_with = "ranged::<_, 1280, 65_535>")]
    pub mtu: Option<u64>,
    /// `--tun`.
    pub tun: Option<String>,
    /// `--max-flows`.
    #[serde(default, deserialize_with = "ranged::<_, 1, 1_000_000>")]
    pub max_flows: Option<u64>,
    /// `--max-inbound`.
    #[serde(default, deserialize_with = "ranged::<_, 1, 1_000_000>")]
    pub max_inbound: Option<u64>,
    /// `--open-timeout`.
    #[serde(default, deserialize_with = "ranged::<_, 1, 300>")]
    pub open_timeout: Option<u64>,
    /// `--connect-timeout`.
    #[serde(default, deserialize_with = "ranged::<_, 1, 300>")]
    pub connect_timeout: Option<u64>,
    /// `--keepalive`.
    #[serde(default, deserialize_with = "ranged::<_, 1, 3600>")]
    pub keepalive: Option<u64>,
    /// `--connections`.
    #[serde(default, deserialize_with = "ranged::<_, 1, 64>")]
    pub connections: Option<u64>,
    /// `-J` hops.
    #[serde(default, deserialize_with = "parsed_list")]
    pub jump: Vec<JumpHost>,
    /// `-F`.
    pub ssh_config: Option<String>,
    /// `--password-file`.
    pub password_file: Option<String>,
    /// `--dns`: the VPC's resolvers.
    #[serde(default, deserialize_with = "parsed_list")]
    pub dns: Vec<std::net::IpAddr>,
    /// `--dns-domain`: the split-DNS domains.
    #[serde(default, deserialize_with = "parsed_list")]
    pub dns_domains: Vec<crate::dns::DnsDomain>,
    /// `--expose` specs.
    #[serde(default, deserialize_with = "parsed_list")]
    pub expose: Vec<crate::reverse::ForwardSpec>,
    /// `--advertise`.
    #[serde(default, deserialize_with = "parsed")]
    pub advertise: Option<std::net::IpAddr>,
}

/// A value parsed with its `FromStr`, so a profile is checked exactly like the flag.
fn parsed<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr,
    T::Err: std::fmt::Display,
{
    let s = String::deserialize(d)?;
    s.parse().map(Some).map_err(serde::de::Error::custom)
}

/// A list of values parsed with their `FromStr`.
fn parsed_list<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr,
    T::Err: std::fmt::Display,
{
    let v = Vec::<String>::deserialize(d)?;
    v.iter()
        .map(|s| {
            s.parse()
                .map_err(|e| serde::de::Error::custom(format!("'{s}': {e}")))
        })
        .collect()
}

/// A list of CIDRs, parsed as `--cidr` parses them (a bare address is one host).
fn cidr_list<'de, D>(d: D) -> Result<Vec<IpNet>, D::Error>
where
    D: Deserializer<'de>,
{
    let v = Vec::<String>::deserialize(d)?;
    v.iter()
        .map(|s| crate::cli::parse_cidr(s).map_err(serde::de::Error::custom))
        .collect()
}

/// A number within `LO..=HI` (the flag's range).
fn ranged<'de, D, const LO: u64, const HI: u64>(d: D) -> Result<Option<u64>, D::Error>
where
    D: Deserializer<'de>,
{
    let n = u64::deserialize(d)?;
    if (LO..=HI).contains(&n) {
        Ok(Some(n))
    } else {
        Err(serde::de::Error::custom(format!(
            "{n} is out of range: expected {LO} to {HI}"
        )))
    }
}

/// Parses profile file text; `path` names it in errors.
pub fn parse(text: &str, path: &Path) -> Result<ProfileFile, ProfileError> {
    toml::from_str(text).map_err(|error| {
        let offset = error.span().map_or(0, |s| s.start);
        let line = text
            .get(..offset)
            .map_or(1, |before| before.matches('\n').count() + 1);
        ProfileError::Invalid {
            path: path.to_owned(),
            line,
            error,
        }
    })
}

/// Reads a profile file; a missing file is an empty one.
pub fn load(path: &Path) -> Result<ProfileFile, ProfileError> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse(&text, path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ProfileFile::default()),
        Err(source) => Err(ProfileError::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Finds profile `name`: the first of `files` that defines it wins (the user's file comes
/// before the system's). Every file is checked, so a broken file is reported even when an
/// earlier one has the profile.
pub fn find(name: &str, files: &[PathBuf]) -> Result<Profile, ProfileError> {
    let mut found = None;
    let mut known = std::collections::BTreeSet::new();
    for f in files {
        let file = load(f)?;
        known.extend(file.profile.keys().cloned());
        if found.is_none() {
            found = file.profile.get(name).cloned();
        }
    }
    found.ok_or_else(|| ProfileError::NotFound {
        name: name.to_owned(),
        searched: files
            .iter()
            .map(|f| f.display().to_string())
            .collect::<Vec<_>>()
            .join(" and "),
        known: if known.is_empty() {
            "none".to_owned()
        } else {
            known.into_iter().collect::<Vec<_>>().join(", ")
        },
    })
}

/// Fills in `args` from `profile` wherever the command line (`matches`, the `up` or
/// `doctor` subcommand's) did not give the option. `~/` in paths is `home`.
pub fn apply(args: &mut UpArgs, matches: &ArgMatches, profile: &Profile, home: &Path) {
    let typed = |id: &str| matches.value_source(id) == Some(ValueSource::CommandLine);
    let path = |s: &String| {
        s.strip_prefix("~/")
            .map_or_else(|| PathBuf::from(s), |rest| home.join(rest))
    };
    if !typed("proxy") && profile.proxy.is_some() {
        args.proxy = profile.proxy.clone();
    }
    if !typed("cidrs") && !profile.cidrs.is_empty() {
        args.cidrs = profile.cidrs.clone();
    }
    if !typed("excludes") && !profile.excludes.is_empty() {
        args.excludes = profile.excludes.clone();
    }
    if !typed("identity") && !profile.identity.is_empty() {
        args.identity = profile.identity.iter().map(path).collect();
    }
    if !typed("known_hosts") && profile.known_hosts.is_some() {
        args.known_hosts = profile.known_hosts.as_ref().map(path);
    }
    if !typed("accept_new_host_key") {
        args.accept_new_host_key |= profile.accept_new_host_key.unwrap_or(false);
    }
    if !typed("mtu")
        && let Some(v) = profile.mtu
    {
        args.mtu = v as u32;
    }
    if !typed("tun")
        && let Some(v) = &profile.tun
    {
        args.tun = v.clone();
    }
    if !typed("max_flows")
        && let Some(v) = profile.max_flows
    {
        args.max_flows = v;
    }
    if !typed("max_inbound")
        && let Some(v) = profile.max_inbound
    {
        args.max_inbound = v;
    }
    if !typed("open_timeout")
        && let Some(v) = profile.open_timeout
    {
        args.open_timeout = v;
    }
    if !typed("connect_timeout") && profile.connect_timeout.is_some() {
        args.connect_timeout = profile.connect_timeout;
    }
    if !typed("keepalive") && profile.keepalive.is_some() {
        args.keepalive = profile.keepalive;
    }
    if !typed("connections")
        && let Some(v) = profile.connections
    {
        args.connections = v;
    }
    if !typed("jump") && !profile.jump.is_empty() {
        args.jump = Some(JumpHops(profile.jump.clone()));
    }
    if !typed("ssh_config") && profile.ssh_config.is_some() {
        args.ssh_config = profile.ssh_config.as_ref().map(path);
    }
    if !typed("password_file") && profile.password_file.is_some() {
        args.password_file = profile.password_file.as_ref().map(path);
    }
    if !typed("dns_servers") && !profile.dns.is_empty() {
        args.dns_servers = profile.dns.clone();
    }
    if !typed("dns_domains") && !profile.dns_domains.is_empty() {
        args.dns_domains = profile.dns_domains.clone();
    }
    if !typed("expose") && !profile.expose.is_empty() {
        args.expose = profile.expose.clone();
    }
    if !typed("advertise") && profile.advertise.is_some() {
        args.advertise = profile.advertise;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Result<ProfileFile, ProfileError> {
        parse(text, Path::new("/x/config.toml"))
    }

    #[test]
    fn the_example_file_is_valid() {
        let f = p(include_str!("../examples/config.toml")).unwrap();
        let dev = &f.profile["dev"];
        assert_eq!(dev.proxy.as_ref().unwrap().host, "bastion.example.com");
        assert!(!dev.cidrs.is_empty());
        assert!(f.profile.len() >= 2);
    }

    #[test]
    fn values_are_typed_like_the_flags() {
        let f = p(
            "[profile.a]\nproxy = \"ops@h:2222\"\ncidrs = [\"10.0.0.0/16\", \"fd00::/64\"]\n\
             mtu = 1500\njump = [\"hop1\", \"u@hop2:2200\"]\nexpose = [\"8080\"]\n",
        )
        .unwrap();
        let a = &f.profile["a"];
        assert_eq!(a.proxy.as_ref().unwrap().port, 2222);
        assert_eq!(a.cidrs.len(), 2);
        assert_eq!(a.mtu, Some(1500));
        assert_eq!(a.jump[1].to_string(), "u@hop2:2200");
        assert_eq!(
            a.expose,
            ["8080".parse::<crate::reverse::ForwardSpec>().unwrap()]
        );
    }

    #[test]
    fn bad_entries_name_the_file_and_line() {
        let e = p("[profile.a]\nproxy = \"h\"\ncidrs = [\"10.0.0.0/33\"]\n").unwrap_err();
        assert!(e.to_string().starts_with("/x/config.toml:3: "), "{e}");
        assert!(e.to_string().contains("not a CIDR"), "{e}");
        let e = p("[profile.a]\n\nprxy = \"h\"\n").unwrap_err();
        assert!(e.to_string().starts_with("/x/config.toml:3: "), "{e}");
        assert!(e.to_string().contains("prxy"), "{e}");
        let e = p("[profile.a]\nmtu = 10\n").unwrap_err();
        assert!(
            e.to_string().contains(":2: ") && e.to_string().contains("1280"),
            "{e}"
        );
        let e = p("[profile.a]\nproxy = \"-oProxyCommand=x\"\n").unwrap_err();
        assert!(e.to_string().contains(":2: "), "{e}");
        let e = p("[profiles.a]\n").unwrap_err();
        assert!(e.to_string().contains(":1: "), "{e}");
    }

    #[test]
    fn typed_flags_win_over_the_profile() {
        use clap::{CommandFactory, FromArgMatches};
        let f = p(
            "[profile.dev]\nproxy = \"ops@h\"\ncidrs = [\"10.0.0.0/16\"]\nmtu = 1500\n\
                   tun = \"p0\"\nidentity = [\"~/.ssh/k\"]\nkeepalive = 9\n",
        )
        .unwrap();
        let matches = crate::cli::Cli::command()
            .try_get_matches_from(["mse-vpn", "up", "dev", "--tun", "cli0", "--keepalive", "2"])
            .unwrap();
        let mut cli = crate::cli::Cli::from_arg_matches(&matches).unwrap();
        let crate::cli::Command::Up(up) = &mut cli.command else {
            panic!("up")
        };
        let sub = matches.subcommand_matches("up").unwrap();
        apply(up, sub, &f.profile["dev"], Path::new("/home/a"));
        assert_eq!(up.proxy.as_ref().unwrap().to_string(), "ops@h:22");
        assert_eq!(up.cidrs.len(), 1);
        assert_eq!(up.mtu, 1500);
        assert_eq!(up.tun, "cli0");
        assert_eq!(up.keepalive, Some(2));
        assert_eq!(up.identity, [PathBuf::from("/home/a/.ssh/k")]);
        assert_eq!(up.connections, 4, "the default stays when neither sets it");
    }

    #[test]
    fn the_first_file_defining_a_profile_wins() {
        let dir = std::env::temp_dir().join(format!("mse-vpn-prof-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (u, s) = (dir.join("user.toml"), dir.join("system.toml"));
        std::fs::write(&u, "[profile.a]\ntun = \"user\"\n").unwrap();
        std::fs::write(
            &s,
            "[profile.a]\ntun = \"system\"\n[profile.b]\ntun = \"b\"\n",
        )
        .unwrap();
        let files = [u.clone(), s.clone(), dir.join("missing.toml")];
        assert_eq!(find("a", &files).unwrap().tun.as_deref(), Some("user"));
        assert_eq!(find("b", &files).unwrap().tun.as_deref(), Some("b"));
        let e = find("c", &files).unwrap_err().to_string();
        assert!(e.contains("'c'") && e.contains("defined: a, b"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
