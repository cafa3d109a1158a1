//! Which names go through the tunnel, sans-IO: the `--dns-domain` values as typed
//! [`DnsDomain`]s, the reverse zones (`in-addr.arpa` / `ip6.arpa`) that cover exactly the
//! routed CIDRs, and the [`Split`] that decides, per query name, tunnel or not.

use std::fmt;
use std::str::FromStr;

use ipnet::IpNet;

/// A DNS domain given with `--dns-domain`: lowercase, no trailing dot, valid labels.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DnsDomain(String);

/// Why a `--dns-domain` value was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    /// Empty, or the root.
    #[error("a DNS domain cannot be empty or the root: name the private zone, e.g. internal")]
    Empty,
    /// Longer than 253 characters.
    #[error("a DNS domain is at most 253 characters long")]
    TooLong,
    /// A label is empty or longer than 63 characters.
    #[error("each label of a DNS domain has 1 to 63 characters (no empty labels such as a..b)")]
    BadLabel,
    /// A character outside letters, digits, '-' and '_'.
    #[error("a DNS domain has only letters, digits, '-', '_' and dots")]
    BadChar,
    /// `.internal`: a leading dot, as in a search list or `no_proxy`.
    #[error("drop the leading dot: write {0}")]
    LeadingDot(String),
}

impl FromStr for DnsDomain {
    type Err = DomainError;

    fn from_str(s: &str) -> Result<DnsDomain, DomainError> {
        let s = s.trim().trim_end_matches('.').to_ascii_lowercase();
        let s = s.strip_prefix("~").unwrap_or(&s).to_owned();
        if s.is_empty() {
            return Err(DomainError::Empty);
        }
        if let Some(rest) = s.strip_prefix('.')
            && !rest.is_empty()
            && !rest.starts_with('.')
        {
            return Err(DomainError::LeadingDot(rest.to_owned()));
        }
        if s.len() > 253 {
            return Err(DomainError::TooLong);
        }
        for label in s.split('.') {
            if label.is_empty() || label.len() > 63 {
                return Err(DomainError::BadLabel);
            }
            if !label
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
            {
                return Err(DomainError::BadChar);
            }
        }
        Ok(DnsDomain(s))
    }
}

impl fmt::Display for DnsDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl DnsDomain {
    /// The domain as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// True if `name` (lowercase, no trailing dot) is this domain or under it.
    pub fn contains(&self, name: &str) -> bool {
        name == self.0
            || (name.len() > self.0.len()
                && name.ends_with(self.0.as_str())
                && name.as_bytes()[name.len() - self.0.len() - 1] == b'.')
    }
}

/// Most zones one CIDR may expand to (a /9 is 128 zones of /16; an IPv6 prefix at most 8).
const MAX_ZONES_PER_CIDR: usize = 128;

/// The reverse-lookup zones that cover exactly `cidrs`: each prefix rounded up to a label
/// boundary (8 bits for IPv4, 4 for IPv6) and enumerated, e.g. 10.0.0.0/16 →
/// `0.10.in-addr.arpa`, 172.16.0.0/12 → `16.172.in-addr.arpa` … `31.172.in-addr.arpa`.
pub fn reverse_zones(cidrs: &[IpNet]) -> Vec<DnsDomain> {
    let mut out = Vec::new();
    for net in cidrs {
        let net = net.trunc();
        let (bits, step, total) = match net {
            IpNet::V4(_) => (net.prefix_len() as u32, 8u32, 32u32),
            IpNet::V6(_) => (net.prefix_len() as u32, 4, 128),
        };
        let rounded = bits.div_ceil(step) * step;
        let count = 1usize << (rounded - bits);
        if count > MAX_ZONES_PER_CIDR {
            continue;
        }
        let base: u128 = match net {
            IpNet::V4(n) => u32::from(n.network()) as u128,
            IpNet::V6(n) => u128::from(n.network()),
        };
        for i in 0..count as u128 {
            let addr = base | (i << (total - rounded));
            let labels = (rounded / step) as usize;
            let mut parts = Vec::with_capacity(labels + 2);
            for k in 0..labels {
                let shift = total - step * (k as u32 + 1);
                let v = (addr >> shift) & ((1u128 << step) - 1);
                parts.push(if step == 8 {
                    v.to_string()
                } else {
                    format!("{v:x}")
                });
            }
            parts.reverse();
            parts.push(if step == 8 { "in-addr" } else { "ip6" }.to_owned());
            parts.push("arpa".to_owned());
            if let Ok(d) = parts.join(".").parse() {
                out.push(d);
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// The split: names inside the configured domains or the routed reverse zones go through
/// the tunnel; every other name does not.
#[derive(Clone, Debug, Default)]
pub struct Split {
    /// `--dns-domain` values.
    pub domains: Vec<DnsDomain>,
    /// Reverse zones of the routed CIDRs.
    pub reverse: Vec<DnsDomain>,
}

impl Split {
    /// The split for these domains and routed CIDRs.
    pub fn new(domains: Vec<DnsDomain>, routes: &[IpNet]) -> Split {
        Split {
            domains,
            reverse: reverse_zones(routes),
        }
    }

    /// True if a query for `name` goes to the VPC resolver through the tunnel.
    pub fn via_tunnel(&self, name: &str) -> bool {
        self.domains
            .iter()
            .chain(&self.reverse)
            .any(|d| d.contains(name))
    }

    /// Every zone routed to the tunnel (domains, then reverse zones).
    pub fn zones(&self) -> impl Iterator<Item = &DnsDomain> {
        self.domains.iter().chain(&self.reverse)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> DnsDomain {
        s.parse().unwrap()
    }

    fn zones(cidrs: &[&str]) -> Vec<String> {
        let nets: Vec<IpNet> = cidrs.iter().map(|c| c.parse().unwrap()).collect();
        reverse_zones(&nets).iter().map(|z| z.to_string()).collect()
    }

    #[test]
    fn domains_parse_to_a_canonical_form() {
        assert_eq!(d("Internal.").as_str(), "internal");
        assert_eq!(d("~rds.Example.com").as_str(), "rds.example.com");
        assert_eq!("".parse::<DnsDomain>(), Err(DomainError::Empty));
        assert_eq!(".".parse::<DnsDomain>(), Err(DomainError::Empty));
        assert_eq!("a..b".parse::<DnsDomain>(), Err(DomainError::BadLabel));
        assert_eq!(
            "x".repeat(64).parse::<DnsDomain>(),
            Err(DomainError::BadLabel)
        );
        assert_eq!("a b".parse::<DnsDomain>(), Err(DomainError::BadChar));
        assert_eq!("a/b".parse::<DnsDomain>(), Err(DomainError::BadChar));
        let e = ".internal".parse::<DnsDomain>().unwrap_err();
        assert_eq!(e, DomainError::LeadingDot("internal".into()));
        assert_eq!(e.to_string(), "drop the leading dot: write internal");
        let long = vec!["abcdefghi"; 26].join(".");
        assert_eq!(long.parse::<DnsDomain>(), Err(DomainError::TooLong));
    }

    #[test]
    fn containment_is_by_whole_labels() {
        let internal = d("internal");
        assert!(internal.contains("internal"));
        assert!(internal.contains("api.internal"));
        assert!(internal.contains("a.b.internal"));
        assert!(!internal.contains("notinternal"));
        assert!(!internal.contains("internal.com"));
        assert!(!internal.contains(""));
        assert!(!d("example.com").contains("rds.example.co"));
    }

    #[test]
    fn reverse_zones_cover_exactly_the_routed_cidrs() {
        assert_eq!(zones(&["10.0.0.0/16"]), ["0.10.in-addr.arpa"]);
        assert_eq!(zones(&["10.0.0.0/8"]), ["10.in-addr.arpa"]);
        assert_eq!(zones(&["10.1.2.0/24"]), ["2.1.10.in-addr.arpa"]);
        assert_eq!(zones(&["10.1.2.3/32"]), ["3.2.1.10.in-addr.arpa"]);
        let z = zones(&["172.16.0.0/12"]);
        assert_eq!(z.len(), 16);
        assert!(z.contains(&"16.172.in-addr.arpa".to_owned()));
        assert!(z.contains(&"31.172.in-addr.arpa".to_owned()));
        assert!(!z.contains(&"32.172.in-addr.arpa".to_owned()));
        assert_eq!(
            zones(&["10.0.0.0/23"]),
            ["0.0.10.in-addr.arpa", "1.0.10.in-addr.arpa"]
        );
        assert_eq!(
            zones(&["fd00:10::/64"]),
            ["0.0.0.0.0.0.0.0.0.1.0.0.0.0.d.f.ip6.arpa"]
        );
        assert_eq!(zones(&["fd00::/7"]).len(), 2);
        assert_eq!(zones(&["0.0.0.0/0"]), ["in-addr.arpa"]);
        assert_eq!(zones(&["10.0.0.0/9"]).len(), 128);
        assert_eq!(zones(&["128.0.0.0/1"]).len(), 128, "at most 128 per prefix");
    }

    #[test]
    fn the_split_routes_domains_and_routed_ptr_only() {
        let split = Split::new(
            vec![d("internal"), d("rds.example.com")],
            &["10.0.0.0/16".parse().unwrap()],
        );
        assert!(split.via_tunnel("api.internal"));
        assert!(split.via_tunnel("db.rds.example.com"));
        assert!(split.via_tunnel("7.3.0.10.in-addr.arpa"), "PTR of 10.0.3.7");
        assert!(
            split.via_tunnel("0.10.in-addr.arpa"),
            "the zone itself (SOA, NS)"
        );
        assert!(
            !split.via_tunnel("5.0.1.10.in-addr.arpa"),
            "10.1.0.5 is not routed"
        );
        assert!(!split.via_tunnel("10.in-addr.arpa"));
        assert!(!split.via_tunnel("example.org"));
        assert!(!split.via_tunnel("internal.example.org"));
        assert!(!split.via_tunnel("example.com"));
        assert!(!split.via_tunnel(""));
        assert_eq!(split.zones().count(), 3);
    }
}
