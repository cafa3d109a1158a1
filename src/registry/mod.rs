//! Reading the team's service registry, read only, to confirm what an app really registered
//! there: `mse-vpn run` looks up the records that point at the address it advertises and
//! says what they hold — above all whether a `--tag` survived into the record that
//! consumers route by (Dubbo drops it from the registered URL when
//! `dubbo.registry.simplified=true`, and then teammates' untagged calls reach the laptop
//! after all).
//!
//! - [`RegistryUrl`]: `zookeeper://HOST:PORT` or `nacos://HOST:PORT[?namespace=..]`, given
//!   with `--registry` or found in the app's own settings ([`from_settings`]);
//! - [`zk`]: a minimal ZooKeeper client (connect, list, read: nothing is ever written);
//!   Dubbo's interface-level layout (`/dubbo/SERVICE/providers/URL`) and the Curator layout
//!   of Spring Cloud Zookeeper and Dubbo 3's application-level discovery
//!   (`/services/APP/ID`, JSON);
//! - [`nacos`]: Nacos's HTTP API (`/nacos/v1/ns/...`): services, then their instances;
//! - [`judge`]: pure, records and the plan in, what to tell the user out.
//!
//! It goes through the ordinary host network, so a VPC registry is reached through the
//! tunnel like any app's connection. It never writes to a registry.

pub mod http;
pub mod nacos;
pub mod zk;

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

use crate::run::{Plan, Tag, UserSettings};

/// The registries mse-vpn can read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Apache ZooKeeper.
    Zookeeper,
    /// Alibaba Nacos (or a compatible server), over its HTTP API.
    Nacos,
}

impl Kind {
    fn scheme(self) -> &'static str {
        match self {
            Kind::Zookeeper => "zookeeper",
            Kind::Nacos => "nacos",
        }
    }

    fn default_port(self) -> u16 {
        match self {
            Kind::Zookeeper => 2181,
            Kind::Nacos => 8848,
        }
    }
}

/// Where the registry is: `zookeeper://HOST[:PORT]` or `nacos://HOST[:PORT]`, optionally
/// with Dubbo's `?namespace=NS&username=U&password=P` parameters (Nacos). Of a cluster
/// (`a:2181,b:2181`, `?backup=...`), the first address.
#[derive(Clone, PartialEq, Eq)]
pub struct RegistryUrl {
    /// Which registry.
    pub kind: Kind,
    /// Its host name or address.
    pub host: String,
    /// Its port.
    pub port: u16,
    /// Nacos namespace id (public when unset).
    pub namespace: Option<String>,
    /// Nacos login, when the server has authentication on.
    pub login: Option<(String, String)>,
}

impl fmt::Debug for RegistryUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the password.
        write!(f, "RegistryUrl({self})")
    }
}

/// Why a registry address was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    /// Neither `zookeeper://` nor `nacos://`.
    #[error("a registry is zookeeper://HOST:PORT or nacos://HOST:PORT")]
    Scheme,
    /// No host.
    #[error("the registry address has no host")]
    Host,
    /// The port is not a number from 1 to 65535.
    #[error("the registry's port is not a number from 1 to 65535")]
    Port,
}

impl FromStr for RegistryUrl {
    type Err = UrlError;

    fn from_str(s: &str) -> Result<RegistryUrl, UrlError> {
        let (scheme, rest) = s.trim().split_once("://").ok_or(UrlError::Scheme)?;
        let kind = match scheme.to_ascii_lowercase().as_str() {
            "zookeeper" | "zk" => Kind::Zookeeper,
            "nacos" => Kind::Nacos,
            _ => return Err(UrlError::Scheme),
        };
        let (authority, query) = rest.split_once('?').unwrap_or((rest, ""));
        let authority = authority.trim_end_matches('/');
        let first = authority.split(',').next().unwrap_or_default();
        let (host, port) = split_host_port(first, kind.default_port())?;
        let params: BTreeMap<&str, &str> = query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .collect();
        let namespace = params
            .get("namespace")
            .filter(|n| !n.is_empty())
            .map(|n| n.to_string());
        let login = match (params.get("username"), params.get("password")) {
            (Some(u), Some(p)) if !u.is_empty() => Some((u.to_string(), p.to_string())),
            _ => None,
        };
        Ok(RegistryUrl {
            kind,
            host,
            port,
            namespace,
            login,
        })
    }
}

/// `HOST[:PORT]` or `[V6]:PORT`.
fn split_host_port(s: &str, default_port: u16) -> Result<(String, u16), UrlError> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, after) = rest.split_once(']').ok_or(UrlError::Host)?;
        (h, after.strip_prefix(':'))
    } else if s.matches(':').count() == 1 {
        let (h, p) = s.split_once(':').unwrap_or((s, ""));
        (h, Some(p))
    } else {
        (s, None)
    };
    if host.is_empty() {
        return Err(UrlError::Host);
    }
    let port = match port {
        None => default_port,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or(UrlError::Port)?,
    };
    Ok((host.to_owned(), port))
}

impl fmt::Display for RegistryUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        write!(f, "{}://{host}:{}", self.kind.scheme(), self.port)?;
        if let Some(ns) = &self.namespace {
            write!(f, "?namespace={ns}")?;
        }
        Ok(())
    }
}

/// The registry an app is configured with, when its command line or environment says:
/// `dubbo.registry.address`, `spring.cloud.nacos.discovery.server-addr`,
/// `spring.cloud.nacos.server-addr`, `spring.cloud.zookeeper.connect-string` (as `-D` or
/// `--` options, in `JAVA_TOOL_OPTIONS`, or as their environment variables). A registry
/// configured only inside the app's own files is not seen: pass `--registry`.
pub fn from_settings(user: UserSettings<'_>) -> Option<RegistryUrl> {
    let keys: [(&str, &str, Option<Kind>); 4] = [
        ("dubbo.registry.address", "DUBBO_REGISTRY_ADDRESS", None),
        (
            "spring.cloud.nacos.discovery.server-addr",
            "SPRING_CLOUD_NACOS_DISCOVERY_SERVER_ADDR",
            Some(Kind::Nacos),
        ),
        (
            "spring.cloud.nacos.server-addr",
            "SPRING_CLOUD_NACOS_SERVER_ADDR",
            Some(Kind::Nacos),
        ),
        (
            "spring.cloud.zookeeper.connect-string",
            "SPRING_CLOUD_ZOOKEEPER_CONNECT_STRING",
            Some(Kind::Zookeeper),
        ),
    ];
    let jto = user
        .env
        .get("JAVA_TOOL_OPTIONS")
        .map(String::as_str)
        .unwrap_or("");
    let words: Vec<&str> = user
        .args
        .iter()
        .map(String::as_str)
        .chain(jto.split_whitespace())
        .collect();
    for (prop, var, kind) in keys {
        let value = words
            .iter()
            .find_map(|w| {
                let body = w.strip_prefix("-D").or_else(|| w.strip_prefix("--"))?;
                body.strip_prefix(prop)?.strip_prefix('=')
            })
            .or_else(|| user.env.get(var).map(String::as_str));
        let Some(value) = value else { continue };
        let text = match kind {
            None => value.to_owned(),
            Some(k) => format!("{}://{value}", k.scheme()),
        };
        if let Ok(url) = text.parse() {
            return Some(url);
        }
    }
    None
}

/// Which kind of record, which decides where its tag is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// A Dubbo interface-level provider URL (ZooKeeper `/dubbo/S/providers`, Nacos service
    /// `providers:S:..`): the tag is its `dubbo.tag` parameter.
    DubboProvider,
    /// A Nacos instance of an application (Spring Cloud Alibaba): the tag is its cluster.
    NacosInstance,
    /// An application instance in ZooKeeper's `/services` (Spring Cloud Zookeeper, Dubbo 3
    /// application-level discovery): `hint` in its metadata, informational only.
    ServiceInstance,
}

/// One record a registry holds for a provider.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// What it is, as the user would look for it (`/dubbo/org.example.Greeter/providers`,
    /// `nacos service greeter-provider`).
    pub location: String,
    /// Its family.
    pub family: Family,
    /// The host it names (an address, or a name).
    pub host: String,
    /// The port it names.
    pub port: u16,
    /// Its parameters or metadata (Dubbo URL parameters, Nacos metadata plus `nacos.cluster`).
    pub params: BTreeMap<String, String>,
}

impl Record {
    /// True when the record points at `addr`.
    pub fn points_at(&self, addr: SocketAddr) -> bool {
        self.port == addr.port() && self.host.parse::<IpAddr>().ok() == Some(addr.ip())
    }

    /// The tag consumers route this record by, where its family has one.
    pub fn tag(&self) -> Option<&str> {
        let key = match self.family {
            Family::DubboProvider => "dubbo.tag",
            Family::NacosInstance => "nacos.cluster",
            Family::ServiceInstance => "hint",
        };
        self.params.get(key).map(String::as_str)
    }
}

/// What the records say about a plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Finding {
    /// A record for the advertised address, tagged as asked (or untagged, as asked).
    Registered {
        /// The record.
        record: Record,
    },
    /// A Dubbo provider URL for the advertised address without the tag: untagged calls
    /// reach the laptop.
    TagDropped {
        /// The record.
        record: Record,
        /// The tag asked for.
        tag: Tag,
    },
    /// A Nacos instance for the advertised address outside the tag's cluster.
    ClusterNotSet {
        /// The record.
        record: Record,
        /// The tag asked for.
        tag: Tag,
    },
}

/// Judges the records for `plan` (an empty result: nothing points at the advertised
/// address yet). Pure.
pub fn judge(plan: &Plan, records: &[Record]) -> Vec<Finding> {
    let Some(addr) = plan.advertise else {
        return Vec::new();
    };
    records
        .iter()
        .filter(|r| r.points_at(addr))
        .map(|r| {
            let record = r.clone();
            match (&plan.tag, r.family) {
                (Some(tag), Family::DubboProvider) if r.tag() != Some(tag.as_str()) => {
                    Finding::TagDropped {
                        record,
                        tag: tag.clone(),
                    }
                }
                (Some(tag), Family::NacosInstance) if r.tag() != Some(tag.as_str()) => {
                    Finding::ClusterNotSet {
                        record,
                        tag: tag.clone(),
                    }
                }
                _ => Finding::Registered { record },
            }
        })
        .collect()
}

/// Why reading a registry failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The host name did not resolve.
    #[error("cannot resolve {host}")]
    Resolve {
        /// The name.
        host: String,
        /// The resolver's error.
        #[source]
        source: std::io::Error,
    },
    /// No TCP connection.
    #[error("cannot connect to {addr}")]
    Connect {
        /// The address.
        addr: SocketAddr,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The connection broke.
    #[error("the connection to the registry failed")]
    Io(#[from] std::io::Error),
    /// No answer in time.
    #[error("the registry did not answer within {0:?}")]
    Timeout(Duration),
    /// ZooKeeper answered with an error code.
    #[error("ZooKeeper answered error {0}")]
    Zookeeper(i32),
    /// Nacos answered with an HTTP error status.
    #[error("Nacos answered HTTP {0}")]
    Http(u16),
    /// The answer did not parse.
    #[error("the registry's answer is malformed ({0})")]
    Malformed(&'static str),
}

/// Every provider record the registry holds (bounded: a huge registry is read in part).
pub async fn records(url: &RegistryUrl, limit: Duration) -> Result<Vec<Record>, RegistryError> {
    let work = async {
        let addr = resolve(url).await?;
        match url.kind {
            Kind::Zookeeper => zk::records(addr).await,
            Kind::Nacos => nacos::records(addr, url).await,
        }
    };
    tokio::time::timeout(limit, work)
        .await
        .map_err(|_| RegistryError::Timeout(limit))?
}

async fn resolve(url: &RegistryUrl) -> Result<SocketAddr, RegistryError> {
    let mut addrs = tokio::net::lookup_host((url.host.as_str(), url.port))
        .await
        .map_err(|source| RegistryError::Resolve {
            host: url.host.clone(),
            source,
        })?;
    addrs.next().ok_or_else(|| RegistryError::Resolve {
        host: url.host.clone(),
        source: std::io::Error::from(std::io::ErrorKind::NotFound),
    })
}

/// The string entries of a JSON object (a registry record's metadata); others are skipped.
fn string_map(v: Option<&serde_json::Value>) -> BTreeMap<String, String> {
    v.and_then(|m| m.as_object())
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                .collect()
        })
        .unwrap_or_default()
}

/// `%XX` decoding (Dubbo URL-encodes each provider URL into one ZooKeeper node name).
pub fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2]))
        {
            out.push((h * 16 + l) as u8);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses a Dubbo URL `proto://host:port/path?k=v&...` into (host, port, params).
pub fn parse_dubbo_url(url: &str) -> Option<(String, u16, BTreeMap<String, String>)> {
    let (_, rest) = url.split_once("://")?;
    let (authority, after) = rest.split_once('/').unwrap_or((rest, ""));
    let (host, port) = split_host_port(authority, 0).ok()?;
    if port == 0 {
        return None;
    }
    let query = after.split_once('?').map(|(_, q)| q).unwrap_or("");
    let params = query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), percent_decode(v)))
        .collect();
    Some((host, port, params))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_urls_parse_in_dubbo_and_spring_forms() {
        let u: RegistryUrl = "zookeeper://10.0.0.14:2181".parse().unwrap();
        assert_eq!(
            (u.kind, u.host.as_str(), u.port),
            (Kind::Zookeeper, "10.0.0.14", 2181)
        );
        let u: RegistryUrl = "zookeeper://zk.internal".parse().unwrap();
        assert_eq!(u.port, 2181);
        let u: RegistryUrl = "zookeeper://a:2182?backup=b:2181,c:2181".parse().unwrap();
        assert_eq!((u.host.as_str(), u.port), ("a", 2182));
        let u: RegistryUrl = "nacos://10.0.0.15:8848?namespace=dev&username=n&password=s3"
            .parse()
            .unwrap();
        assert_eq!(u.kind, Kind::Nacos);
        assert_eq!(u.namespace.as_deref(), Some("dev"));
        assert_eq!(u.login, Some(("n".into(), "s3".into())));
        assert_eq!(u.to_string(), "nacos://10.0.0.15:8848?namespace=dev");
        assert!(!format!("{u:?}").contains("s3"), "no password in logs");
        let u: RegistryUrl = "nacos://[fd00:10::15]:8848".parse().unwrap();
        assert_eq!(u.host, "fd00:10::15");
        assert_eq!(u.to_string(), "nacos://[fd00:10::15]:8848");
        assert_eq!("http://x".parse::<RegistryUrl>(), Err(UrlError::Scheme));
        assert_eq!(
            "10.0.0.1:2181".parse::<RegistryUrl>(),
            Err(UrlError::Scheme)
        );
        assert_eq!(
            "zookeeper://:2181".parse::<RegistryUrl>(),
            Err(UrlError::Host)
        );
        assert_eq!("nacos://h:0".parse::<RegistryUrl>(), Err(UrlError::Port));
        assert_eq!("nacos://h:x".parse::<RegistryUrl>(), Err(UrlError::Port));
    }

    #[test]
    fn the_registry_is_found_in_the_apps_own_settings() {
        let none = BTreeMap::new();
        let found = |env: &BTreeMap<String, String>, args: &[&str]| {
            let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
            from_settings(UserSettings { env, args: &args }).map(|u| u.to_string())
        };
        assert_eq!(
            found(
                &none,
                &[
                    "-Ddubbo.registry.address=zookeeper://zk.internal:2181",
                    "-jar"
                ]
            ),
            Some("zookeeper://zk.internal:2181".into())
        );
        assert_eq!(
            found(
                &none,
                &[
                    "-jar",
                    "x.jar",
                    "--spring.cloud.nacos.discovery.server-addr=10.0.0.15:8848"
                ]
            ),
            Some("nacos://10.0.0.15:8848".into())
        );
        assert_eq!(
            found(
                &none,
                &["--spring.cloud.zookeeper.connect-string=10.0.0.14:2181,b:2181"]
            ),
            Some("zookeeper://10.0.0.14:2181".into())
        );
        let mut env = BTreeMap::new();
        env.insert(
            "JAVA_TOOL_OPTIONS".to_owned(),
            "-Xmx1g -Ddubbo.registry.address=nacos://10.0.0.15:8848".to_owned(),
        );
        assert_eq!(found(&env, &[]), Some("nacos://10.0.0.15:8848".into()));
        let mut env = BTreeMap::new();
        env.insert(
            "SPRING_CLOUD_ZOOKEEPER_CONNECT_STRING".to_owned(),
            "zk:2181".to_owned(),
        );
        assert_eq!(found(&env, &[]), Some("zookeeper://zk:2181".into()));
        assert_eq!(found(&none, &["-jar", "app.jar"]), None);
        // A Dubbo registry that is neither (multicast, redis): not readable, not guessed.
        assert_eq!(
            found(
                &none,
                &["-Ddubbo.registry.address=multicast://224.5.6.7:1234"]
            ),
            None
        );
    }

    fn record(family: Family, host: &str, port: u16, params: &[(&str, &str)]) -> Record {
        Record {
            location: "/dubbo/org.example.Greeter/providers".into(),
            family,
            host: host.into(),
            port,
            params: params
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn plan(tag: Option<&str>) -> Plan {
        Plan {
            advertise: Some("10.0.0.1:20880".parse().unwrap()),
            local_port: Some(20880),
            tag: tag.map(|t| t.parse().unwrap()),
            subscribe_only: false,
        }
    }

    #[test]
    fn a_tag_dropped_from_the_registered_url_is_found() {
        let tagged = record(
            Family::DubboProvider,
            "10.0.0.1",
            20880,
            &[("dubbo.tag", "alice")],
        );
        let simplified = record(
            Family::DubboProvider,
            "10.0.0.1",
            20880,
            &[("side", "provider")],
        );
        let cloud = record(Family::DubboProvider, "10.0.0.20", 20880, &[]);
        let found = judge(&plan(Some("alice")), &[tagged.clone(), cloud.clone()]);
        assert_eq!(found, [Finding::Registered { record: tagged }]);
        let found = judge(&plan(Some("alice")), &[simplified.clone(), cloud.clone()]);
        assert_eq!(
            found,
            [Finding::TagDropped {
                record: simplified.clone(),
                tag: "alice".parse().unwrap()
            }]
        );
        // Untagged, as asked: registered.
        assert_eq!(
            judge(&plan(None), std::slice::from_ref(&simplified)),
            [Finding::Registered { record: simplified }]
        );
        // Nothing for our address yet.
        assert!(judge(&plan(Some("alice")), &[cloud]).is_empty());
    }

    #[test]
    fn a_nacos_instance_must_be_in_the_tags_cluster() {
        let default = record(
            Family::NacosInstance,
            "10.0.0.1",
            20880,
            &[("nacos.cluster", "DEFAULT")],
        );
        let mine = record(
            Family::NacosInstance,
            "10.0.0.1",
            20880,
            &[("nacos.cluster", "alice")],
        );
        assert!(matches!(
            judge(&plan(Some("alice")), &[default])[..],
            [Finding::ClusterNotSet { .. }]
        ));
        assert!(matches!(
            judge(&plan(Some("alice")), &[mine])[..],
            [Finding::Registered { .. }]
        ));
        // A Curator /services record carries no routing tag: reported, not judged.
        let svc = record(Family::ServiceInstance, "10.0.0.1", 20880, &[]);
        assert!(matches!(
            judge(&plan(Some("alice")), &[svc])[..],
            [Finding::Registered { .. }]
        ));
    }

    #[test]
    fn dubbo_urls_decode() {
        let node = "dubbo%3A%2F%2F10.0.0.1%3A20880%2Forg.example.Greeter%3Fanyhost%3Dtrue%26dubbo.tag%3Dalice%26methods%3Dhello%2Cbye";
        let url = percent_decode(node);
        assert_eq!(
            url,
            "dubbo://10.0.0.1:20880/org.example.Greeter?anyhost=true&dubbo.tag=alice&methods=hello,bye"
        );
        let (host, port, params) = parse_dubbo_url(&url).unwrap();
        assert_eq!((host.as_str(), port), ("10.0.0.1", 20880));
        assert_eq!(params["dubbo.tag"], "alice");
        assert_eq!(params["methods"], "hello,bye");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
        assert!(parse_dubbo_url("dubbo://10.0.0.1/x").is_none());
        assert!(parse_dubbo_url("garbage").is_none());
    }
}
