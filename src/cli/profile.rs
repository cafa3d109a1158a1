//! Named profiles: `[profile.NAME]` tables in `~/.config/mse-vpn/config.toml` of the
//! invoking user and in `/etc/mse-vpn/config.toml`, each holding `up` options, so that
//! `mse-vpn up dev` stands for a long command line. Values are parsed into the same typed
//! values as the flags (a bad CIDR or jump host is refused with the file and line), unknown
//! keys are errors, and flags given on the command line win over the profile.
//!
//! This file reads configuration files only; it never touches the network or the host.

use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use ipnet::IpNet;
use serde::de::{self, SeqAccess, Visitor};
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
    #[error("{path}:{line}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// 1-based line of the bad entry.
        line: usize,
        /// What is wrong, and what would be right ("unknown key `cidr`: did you mean
        /// `cidrs`?"). The parser's code snippet is not shown: the line number says where.
        message: String,
    },
    /// `up NAME` for a profile no file defines.
    #[error("no profile named '{name}' in {searched}; {known}")]
    NotFound {
        /// The name asked for.
        name: String,
        /// The files looked in.
        searched: String,
        /// "did you mean 'dev'?", or the names that exist, or that there are none.
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

/// The `up` options a profile may hold; every key is optional. Each key may also be
/// written as its flag is (`cidr`, `dns-domain`, `max-flows`, ...).
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// `--proxy`.
    #[serde(default, deserialize_with = "one")]
    pub proxy: Option<JumpHost>,
    /// `--cidr`s.
    #[serde(default, alias = "cidr", deserialize_with = "cidr_list")]
    pub cidrs: Vec<IpNet>,
    /// `--exclude`s.
    #[serde(default, alias = "exclude", deserialize_with = "cidr_list")]
    pub excludes: Vec<IpNet>,
    /// `-i` key files (`~` is the invoking user's home).
    #[serde(default, alias = "identities", deserialize_with = "list")]
    pub identity: Vec<String>,
    /// `--known-hosts`.
    #[serde(default, alias = "known-hosts", deserialize_with = "text")]
    pub known_hosts: Option<String>,
    /// `--accept-new-host-key`.
    #[serde(default, alias = "accept-new-host-key", deserialize_with = "boolean")]
    pub accept_new_host_key: Option<bool>,
    /// `--mtu`.
    #[serde(default, deserialize_with = "ranged::<_, 1280, 65_535>")]
    pub mtu: Option<u64>,
    /// `--tun`.
    #[serde(default, deserialize_with = "text")]
    pub tun: Option<String>,
    /// `--max-flows`.
    #[serde(
        default,
        alias = "max-flows",
        deserialize_with = "ranged::<_, 1, 1_000_000>"
    )]
    pub max_flows: Option<u64>,
    /// `--max-inbound`.
    #[serde(default, deserialize_with = "ranged::<_, 1, 1_000_000>")]
    pub max_inbound: Option<u64>,
    /// `--max-opening`.
    #[serde(
        default,
        alias = "max-opening",
        deserialize_with = "ranged::<_, 1, 1_000_000>"
    )]
    pub max_opening: Option<u64>,
    /// `--memory-budget` (MiB).
    #[serde(
        default,
        alias = "memory-budget",
        deserialize_with = "ranged::<_, 16, 1_048_576>"
    )]
    pub memory_budget: Option<u64>,
    /// `--open-timeout`.
    #[serde(
        default,
        alias = "open-timeout",
        deserialize_with = "ranged::<_, 1, 300>"
    )]
    pub open_timeout: Option<u64>,
    /// `--connect-timeout`.
    #[serde(
        default,
        alias = "connect-timeout",
        deserialize_with = "ranged::<_, 1, 300>"
    )]
    pub connect_timeout: Option<u64>,
    /// `--keepalive`.
    #[serde(default, deserialize_with = "ranged::<_, 1, 3600>")]
    pub keepalive: Option<u64>,
    /// `--connections`.
    #[serde(default, deserialize_with = "ranged::<_, 1, 64>")]
    pub connections: Option<u64>,
    /// `-J` hops.
    #[serde(default, deserialize_with = "list")]
    pub jump: Vec<JumpHost>,
    /// `-F`.
    #[serde(default, alias = "ssh-config", deserialize_with = "text")]
    pub ssh_config: Option<String>,
    /// `--password-file`.
    #[serde(default, alias = "password-file", deserialize_with = "text")]
    pub password_file: Option<String>,
    /// `--dns`: the VPC's resolvers.
    #[serde(default, deserialize_with = "list")]
    pub dns: Vec<std::net::IpAddr>,
    /// `--dns-domain`: the split-DNS domains.
    #[serde(
        default,
        alias = "dns-domain",
        alias = "dns_domain",
        alias = "dns-domains",
        deserialize_with = "list"
    )]
    pub dns_domains: Vec<crate::dns::DnsDomain>,
    /// `--expose` specs.
    #[serde(default, deserialize_with = "list")]
    pub expose: Vec<crate::reverse::ForwardSpec>,
    /// `--advertise`.
    #[serde(default, deserialize_with = "one")]
    pub advertise: Option<std::net::IpAddr>,
}

/// The keys of a profile, as the file spells them (for "did you mean").
const KEYS: [&str; 23] = [
    "proxy",
    "cidrs",
    "excludes",
    "identity",
    "known_hosts",
    "accept_new_host_key",
    "mtu",
    "tun",
    "max_flows",
    "max_inbound",
    "max_opening",
    "memory_budget",
    "open_timeout",
    "connect_timeout",
    "keepalive",
    "connections",
    "jump",
    "ssh_config",
    "password_file",
    "dns",
    "dns_domains",
    "expose",
    "advertise",
];

/// A value of a profile key, shown in messages about a value of the wrong type.
trait Example {
    /// A valid value, as TOML.
    const EXAMPLE: &'static str;
}

impl Example for JumpHost {
    const EXAMPLE: &'static str = "\"ops@bastion.example.com\"";
}
impl Example for Cidr {
    const EXAMPLE: &'static str = "\"10.0.0.0/16\"";
}
impl Example for std::net::IpAddr {
    const EXAMPLE: &'static str = "\"10.0.0.2\"";
}
impl Example for crate::dns::DnsDomain {
    const EXAMPLE: &'static str = "\"internal\"";
}
impl Example for crate::reverse::ForwardSpec {
    const EXAMPLE: &'static str = "\"20880\"";
}
impl Example for String {
    const EXAMPLE: &'static str = "\"~/.ssh/id_ed25519\"";
}

/// A CIDR as `--cidr` parses it.
struct Cidr(IpNet);

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Cidr, String> {
        crate::cli::parse_cidr(s).map(Cidr)
    }
}

/// One string, parsed with its `FromStr` (so a profile is checked exactly like the flag).
struct Item<T>(T);

impl<'de, T> Deserialize<'de> for Item<T>
where
    T: FromStr + Example,
    T::Err: fmt::Display,
{
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<T> Visitor<'_> for V<T>
        where
            T: FromStr + Example,
            T::Err: fmt::Display,
        {
            type Value = Item<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "a string like {}", T::EXAMPLE)
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Item<T>, E> {
                s.parse()
                    .map(Item)
                    .map_err(|e| E::custom(format!("'{s}': {e}")))
            }
        }
        d.deserialize_str(V(PhantomData))
    }
}

/// A list of strings, each parsed with its `FromStr`.
struct List<T>(Vec<T>);

impl<'de, T> Deserialize<'de> for List<T>
where
    T: FromStr + Example,
    T::Err: fmt::Display,
{
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T> Visitor<'de> for V<T>
        where
            T: FromStr + Example,
            T::Err: fmt::Display,
        {
            type Value = List<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "a list like [{}]", T::EXAMPLE)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<List<T>, A::Error> {
                let mut out = Vec::new();
                while let Some(Item(v)) = seq.next_element::<Item<T>>()? {
                    out.push(v);
                }
                Ok(List(out))
            }
        }
        d.deserialize_seq(V(PhantomData))
    }
}

/// `proxy`, `advertise`: one string, parsed.
fn one<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr + Example,
    T::Err: fmt::Display,
{
    Item::deserialize(d).map(|Item(v)| Some(v))
}

/// A list of strings, parsed.
fn list<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr + Example,
    T::Err: fmt::Display,
{
    List::deserialize(d).map(|List(v)| v)
}

/// A list of CIDRs, parsed as `--cidr` parses them.
fn cidr_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<IpNet>, D::Error> {
    List::<Cidr>::deserialize(d).map(|List(v)| v.into_iter().map(|c| c.0).collect())
}

/// A path or a name.
fn text<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    struct V;
    impl Visitor<'_> for V {
        type Value = String;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a string in quotes, like \"mse0\" or \"~/.ssh/known_hosts\"")
        }
        fn visit_str<E: de::Error>(self, s: &str) -> Result<String, E> {
            Ok(s.to_owned())
        }
    }
    d.deserialize_str(V).map(Some)
}

/// `true` or `false`.
fn boolean<'de, D: Deserializer<'de>>(d: D) -> Result<Option<bool>, D::Error> {
    struct V;
    impl Visitor<'_> for V {
        type Value = bool;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("true or false (without quotes)")
        }
        fn visit_bool<E: de::Error>(self, b: bool) -> Result<bool, E> {
            Ok(b)
        }
    }
    d.deserialize_bool(V).map(Some)
}

/// A number within `LO..=HI` (the flag's range).
fn ranged<'de, D, const LO: u64, const HI: u64>(d: D) -> Result<Option<u64>, D::Error>
where
    D: Deserializer<'de>,
{
    struct V<const LO: u64, const HI: u64>;
    impl<const LO: u64, const HI: u64> Visitor<'_> for V<LO, HI> {
        type Value = u64;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "a number from {LO} to {HI} (without quotes)")
        }
        fn visit_i64<E: de::Error>(self, n: i64) -> Result<u64, E> {
            match u64::try_from(n) {
                Ok(n) => self.visit_u64(n),
                Err(_) => Err(E::custom(format!(
                    "{n} is out of range: expected {LO} to {HI}"
                ))),
            }
        }
        fn visit_u64<E: de::Error>(self, n: u64) -> Result<u64, E> {
            if (LO..=HI).contains(&n) {
                Ok(n)
            } else {
                Err(E::custom(format!(
                    "{n} is out of range: expected {LO} to {HI}"
                )))
            }
        }
    }
    d.deserialize_u64(V::<LO, HI>).map(Some)
}

/// Parses profile file text; `path` names it in errors. Every profile must be valid.
pub fn parse(text: &str, path: &Path) -> Result<ProfileFile, ProfileError> {
    toml::from_str(text).map_err(|error| invalid(text, path, &error))
}

/// The error for `error` in `text`: its line, and a message that says what would be right.
fn invalid(text: &str, path: &Path, error: &toml::de::Error) -> ProfileError {
    let message = error.message().trim_end();
    let mut offset = error.span().map_or(0, |s| s.start);
    let message = match unknown_key(message) {
        Some((key, top_level)) => {
            // The parser may point at the table rather than at the key: find the key's own
            // line.
            if let Some(at) = key_offset(text, key) {
                offset = at;
            }
            let known: &[&str] = if top_level { &["profile"] } else { &KEYS };
            match crate::suggest::did_you_mean(key, known.iter().copied()) {
                Some(k) => format!("unknown key `{key}`: did you mean `{k}`?"),
                None if top_level => {
                    format!("unknown key `{key}`: a file holds only [profile.NAME] tables")
                }
                None => format!("unknown key `{key}`; the keys are {}", KEYS.join(", ")),
            }
        }
        None => message
            .replace("invalid type: ", "")
            .replace(", expected", ": expected"),
    };
    let line = text
        .get(..offset)
        .map_or(1, |before| before.matches('\n').count() + 1);
    ProfileError::Invalid {
        path: path.to_owned(),
        line,
        message,
    }
}

/// The key of serde's "unknown field `KEY`, expected ..." message, and whether it is a
/// top-level one (the file's only key is `profile`).
fn unknown_key(message: &str) -> Option<(&str, bool)> {
    let rest = message.strip_prefix("unknown field `")?;
    let (key, after) = rest.split_once('`')?;
    Some((key, after.contains("expected `profile`")))
}

/// Where a line `KEY = ...` or a table header `[KEY...]` begins, if one does.
fn key_offset(text: &str, key: &str) -> Option<usize> {
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let t = line.trim_start();
        let t = t
            .strip_prefix('[')
            .map_or(t, |h| h.trim_start_matches('[').trim_start());
        if let Some(rest) = t.strip_prefix(key)
            && rest.trim_start().starts_with(['=', '.', ']'])
        {
            return Some(offset);
        }
        offset += line.len();
    }
    None
}

/// Reads a profile file; a missing file is an empty one. Every profile must be valid.
pub fn load(path: &Path) -> Result<ProfileFile, ProfileError> {
    match read(path)? {
        Some(text) => parse(&text, path),
        None => Ok(ProfileFile::default()),
    }
}

/// The text of `path`, `None` if it does not exist.
fn read(path: &Path) -> Result<Option<String>, ProfileError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(ProfileError::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Parses `text` for profile `wanted`: a mistake inside another `[profile.NAME]` table does
/// not stop it. That profile is left out and its error returned with the file (for a
/// warning); a mistake in `wanted` itself, or outside any profile, is an error.
fn parse_for(
    text: &str,
    path: &Path,
    wanted: &str,
) -> Result<(ProfileFile, Vec<ProfileError>), ProfileError> {
    let mut text = text.to_owned();
    let mut skipped = Vec::new();
    loop {
        let error = match toml::from_str::<ProfileFile>(&text) {
            Ok(file) => return Ok((file, skipped)),
            Err(e) => invalid(&text, path, &e),
        };
        let ProfileError::Invalid { line, .. } = &error else {
            return Err(error);
        };
        match profile_at(&text, *line) {
            Some((name, lines)) if name != wanted && skipped.len() < 64 => {
                // Blank out its table (keeping the line numbers) and try again.
                text = text
                    .split_inclusive('\n')
                    .enumerate()
                    .map(|(i, l)| {
                        if lines.contains(&(i + 1)) {
                            if l.ends_with('\n') { "\n" } else { "" }
                        } else {
                            l
                        }
                    })
                    .collect();
                skipped.push(error);
            }
            _ => return Err(error),
        }
    }
}

/// The `[profile.NAME]` table that holds `line` (1-based): its name and its lines.
fn profile_at(text: &str, line: usize) -> Option<(String, std::ops::Range<usize>)> {
    let mut current: Option<(String, usize)> = None;
    let mut found = None;
    for (i, l) in text.lines().enumerate() {
        let n = i + 1;
        let t = l.trim();
        if t.starts_with('[') {
            if let Some((name, start)) = current.take()
                && (start..n).contains(&line)
            {
                found = Some((name, start..n));
            }
            current = t
                .strip_prefix("[profile.")
                .and_then(|r| r.strip_suffix(']'))
                .map(|name| (name.trim().trim_matches('"').to_owned(), n));
        }
    }
    let end = text.lines().count() + 1;
    if let Some((name, start)) = current
        && (start..end).contains(&line)
    {
        found = Some((name, start..end));
    }
    found
}

/// Finds profile `name`: the first of `files` that defines it wins (the user's file comes
/// before the system's). A broken file is an error, even when an earlier one has the
/// profile; a mistake in another profile is not: those are returned, for warnings.
pub fn find(name: &str, files: &[PathBuf]) -> Result<(Profile, Vec<ProfileError>), ProfileError> {
    let mut found = None;
    let mut known = std::collections::BTreeSet::new();
    let mut skipped = Vec::new();
    for f in files {
        let Some(text) = read(f)? else { continue };
        let (file, errors) = parse_for(&text, f, name)?;
        skipped.extend(errors);
        known.extend(file.profile.keys().cloned());
        if found.is_none() {
            found = file.profile.get(name).cloned();
        }
    }
    let Some(profile) = found else {
        let known = match crate::suggest::did_you_mean(name, known.iter().map(String::as_str)) {
            Some(k) => format!("did you mean '{k}'?"),
            None if known.is_empty() => "no profile is defined there".to_owned(),
            None => format!(
                "defined: {}",
                known.into_iter().collect::<Vec<_>>().join(", ")
            ),
        };
        return Err(ProfileError::NotFound {
            name: name.to_owned(),
            searched: files
                .iter()
                .map(|f| f.display().to_string())
                .collect::<Vec<_>>()
                .join(" and "),
            known,
        });
    };
    Ok((profile, skipped))
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
    if !typed("max_opening")
        && let Some(v) = profile.max_opening
    {
        args.max_opening = v;
    }
    if !typed("memory_budget")
        && let Some(v) = profile.memory_budget
    {
        args.memory_budget = v;
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
        let f = p(include_str!("../../examples/config.toml")).unwrap();
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
    fn mistakes_are_explained_with_what_would_be_right() {
        let msg = |text: &str| p(text).unwrap_err().to_string();
        assert_eq!(
            msg("[profile.a]\ntun = \"x\"\ncdirs = [\"10.0.0.0/16\"]\n"),
            "/x/config.toml:3: unknown key `cdirs`: did you mean `cidrs`?"
        );
        let e = msg("[profile.a]\nbogus = 1\n");
        assert!(
            e.starts_with("/x/config.toml:2: unknown key `bogus`; the keys are proxy, cidrs"),
            "{e}"
        );
        assert_eq!(
            msg("[profile.a]\ncidrs = \"10.0.0.0/16\"\n"),
            "/x/config.toml:2: string \"10.0.0.0/16\": expected a list like [\"10.0.0.0/16\"]"
        );
        let e = msg("[profile.a]\nmtu = \"1500\"\n");
        assert!(
            e.ends_with(
                ":2: string \"1500\": expected a number from 1280 to 65535 (without quotes)"
            ),
            "{e}"
        );
        let e = msg("[profile.a]\naccept_new_host_key = \"yes\"\n");
        assert!(
            e.ends_with("expected true or false (without quotes)"),
            "{e}"
        );
        let e = msg("[profile.a]\ndns = [10]\n");
        assert!(e.ends_with("expected a string like \"10.0.0.2\""), "{e}");
        // An unknown top-level key is reported at its own line, whatever its name.
        assert_eq!(
            msg("[profile.a]\ntun = \"x\"\n\n[zzz]\na = 1\n"),
            "/x/config.toml:4: unknown key `zzz`: a file holds only [profile.NAME] tables"
        );
        assert_eq!(
            msg("# c\n[profile.a]\ntun = \"x\"\n[profiles.b]\n"),
            "/x/config.toml:4: unknown key `profiles`: did you mean `profile`?"
        );
    }

    #[test]
    fn keys_may_be_spelled_as_their_flags() {
        let f = p(
            "[profile.a]\ncidr = [\"10.0.0.0/16\"]\nexclude = [\"10.0.9.0/24\"]\n\
             dns-domain = [\"internal\"]\nmax-flows = 5\nmax-opening = 64\nconnect-timeout = 3\n\
             accept-new-host-key = true\nknown-hosts = \"~/kh\"\n",
        )
        .unwrap();
        let a = &f.profile["a"];
        assert_eq!((a.cidrs.len(), a.excludes.len()), (1, 1));
        assert_eq!(a.dns_domains[0].as_str(), "internal");
        assert_eq!((a.max_flows, a.connect_timeout), (Some(5), Some(3)));
        assert_eq!(a.max_opening, Some(64));
        assert_eq!(a.accept_new_host_key, Some(true));
        assert_eq!(a.known_hosts.as_deref(), Some("~/kh"));
        // Both spellings at once is one key given twice.
        assert!(p("[profile.a]\ncidr = []\ncidrs = []\n").is_err());
    }

    #[test]
    fn a_mistake_in_another_profile_does_not_block_this_one() {
        let text = "[profile.old]\ncidr = \"10.0.0.0/16\"\nbogus = 1\n\n[profile.good]\ntun = \"g\"\n\
                    [profile.worse]\nmtu = 1\n";
        let path = Path::new("/x/config.toml");
        let (file, skipped) = parse_for(text, path, "good").unwrap();
        assert_eq!(file.profile["good"].tun.as_deref(), Some("g"));
        assert!(!file.profile.contains_key("old"));
        let skipped: Vec<String> = skipped.iter().map(ToString::to_string).collect();
        assert_eq!(skipped.len(), 2, "{skipped:?}");
        assert!(
            skipped[0].starts_with("/x/config.toml:3: unknown key `bogus`"),
            "{skipped:?}"
        );
        assert!(skipped[1].starts_with("/x/config.toml:8: "), "{skipped:?}");
        // The broken profile itself, and the strict check, are still refused.
        let e = parse_for(text, path, "old").unwrap_err().to_string();
        assert!(e.starts_with("/x/config.toml:3: "), "{e}");
        assert!(parse(text, path).is_err());
        // A mistake outside every profile is not skipped.
        assert!(parse_for("x = 1\n[profile.good]\n", path, "good").is_err());
    }

    #[test]
    fn an_unknown_profile_name_gets_a_suggestion() {
        let dir = std::env::temp_dir().join(format!("mse-vpn-prof-s-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("c.toml");
        std::fs::write(&f, "[profile.staging]\n[profile.dev]\n").unwrap();
        let e = find("stagign", std::slice::from_ref(&f))
            .unwrap_err()
            .to_string();
        assert!(e.ends_with("did you mean 'staging'?"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn typed_flags_win_over_the_profile() {
        use clap::{CommandFactory, FromArgMatches};
        let f = p(
            "[profile.dev]\nproxy = \"ops@h\"\ncidrs = [\"10.0.0.0/16\"]\nmtu = 1500\n\
                   tun = \"p0\"\nidentity = [\"~/.ssh/k\"]\nkeepalive = 9\nmax_opening = 32\n",
        )
        .unwrap();
        let matches = crate::cli::Cli::command()
            .try_get_matches_from(["mse-vpn", "up", "dev", "--tun", "cli0", "--keepalive", "2"])
            .unwrap();
        let mut cli = crate::cli::Cli::from_arg_matches(&matches).unwrap();
        let crate::cli::Command::Up(crate::cli::UpCommand { args: up, .. }) = &mut cli.command
        else {
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
        assert_eq!(up.max_opening, 32);
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
        assert_eq!(find("a", &files).unwrap().0.tun.as_deref(), Some("user"));
        assert_eq!(find("b", &files).unwrap().0.tun.as_deref(), Some("b"));
        let e = find("c", &files).unwrap_err().to_string();
        assert!(e.contains("'c'") && e.contains("defined: a, b"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
