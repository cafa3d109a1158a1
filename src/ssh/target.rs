//! The jump host as typed by the user: `[USER@]HOST[:PORT]`, parsed once at the edge.

use std::fmt;
use std::str::FromStr;

use thiserror::Error;

/// Where to SSH to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JumpHost {
    /// Login name, if given (otherwise the invoking user's name).
    pub user: Option<String>,
    /// Host name or IP address (IPv6 without brackets).
    pub host: String,
    /// TCP port (22 unless given).
    pub port: u16,
    /// True when the port was typed (`:PORT`): it then overrides the ssh config's `Port`.
    pub port_given: bool,
}

/// Why a `--proxy` value was refused.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum JumpHostError {
    /// Nothing was given.
    #[error("the jump host is empty: expected [USER@]HOST[:PORT], e.g. admin@bastion.example.com")]
    Empty,
    /// `user@` with no user.
    #[error("the user name before '@' is empty: expected [USER@]HOST[:PORT]")]
    EmptyUser,
    /// The port is not a number in 1..=65535.
    #[error("'{0}' is not a valid port: expected a number from 1 to 65535")]
    BadPort(String),
    /// `[` without a matching `]`.
    #[error("unbalanced brackets in '{0}': write IPv6 addresses as [2001:db8::1]:22")]
    Brackets(String),
    /// Characters that cannot be in a host name.
    #[error("'{0}' is not a valid host name or address")]
    BadHost(String),
    /// A URL of another scheme than `ssh://`.
    #[error("'{0}' is not an SSH address: write [USER@]HOST[:PORT] (or ssh://[USER@]HOST[:PORT])")]
    Scheme(String),
}

impl FromStr for JumpHost {
    type Err = JumpHostError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        // `ssh://[USER@]HOST[:PORT]`, as ssh(1) accepts it.
        let s = match s.split_once("://") {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("ssh") => {
                rest.strip_suffix('/').unwrap_or(rest)
            }
            Some(_) => return Err(JumpHostError::Scheme(s.to_owned())),
            None => s,
        };
        if s.is_empty() {
            return Err(JumpHostError::Empty);
        }
        let (user, rest) = match s.rsplit_once('@') {
            Some(("", _)) => return Err(JumpHostError::EmptyUser),
            Some((u, r)) => (Some(u.to_owned()), r),
            None => (None, s),
        };
        let parse_port = |p: &str| match p.parse::<u16>() {
            Ok(0) | Err(_) => Err(JumpHostError::BadPort(p.to_owned())),
            Ok(n) => Ok(n),
        };
        let port_given = rest.starts_with('[') && rest.contains("]:")
            || (!rest.starts_with('[') && rest.matches(':').count() == 1);
        let (host, port) = if let Some(inner) = rest.strip_prefix('[') {
            let (host, after) = inner
                .split_once(']')
                .ok_or_else(|| JumpHostError::Brackets(rest.to_owned()))?;
            let port = match after {
                "" => 22,
                p => parse_port(
                    p.strip_prefix(':')
                        .ok_or_else(|| JumpHostError::Brackets(rest.to_owned()))?,
                )?,
            };
            (host.to_owned(), port)
        } else if rest.matches(':').count() > 1 {
            // A bare IPv6 address: no port possible without brackets.
            (rest.to_owned(), 22)
        } else if let Some((h, p)) = rest.split_once(':') {
            (h.to_owned(), parse_port(p)?)
        } else {
            (rest.to_owned(), 22)
        };
        if host.is_empty() {
            return Err(JumpHostError::Empty);
        }
        let valid = host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':' | '%'));
        if !valid || host.starts_with('-') {
            return Err(JumpHostError::BadHost(host));
        }
        Ok(JumpHost {
            user,
            host,
            port,
            port_given,
        })
    }
}

impl fmt::Display for JumpHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(u) = &self.user {
            write!(f, "{u}@")?;
        }
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jh(user: Option<&str>, host: &str, port: u16) -> JumpHost {
        JumpHost {
            user: user.map(str::to_owned),
            host: host.to_owned(),
            port,
            port_given: port != 22,
        }
    }

    #[test]
    fn accepted_forms() {
        assert_eq!("bastion".parse(), Ok(jh(None, "bastion", 22)));
        assert_eq!(
            "admin@203.0.113.7".parse(),
            Ok(jh(Some("admin"), "203.0.113.7", 22))
        );
        assert_eq!(
            "ops@h.example:2222".parse(),
            Ok(jh(Some("ops"), "h.example", 2222))
        );
        assert_eq!(
            "u@[fe80::1]:2222".parse(),
            Ok(jh(Some("u"), "fe80::1", 2222))
        );
        assert_eq!("[2001:db8::1]".parse(), Ok(jh(None, "2001:db8::1", 22)));
        assert_eq!("2001:db8::1".parse(), Ok(jh(None, "2001:db8::1", 22)));
        assert_eq!("a@b@host".parse(), Ok(jh(Some("a@b"), "host", 22)));
        assert_eq!(
            "ssh://ops@h.example:2222".parse(),
            Ok(jh(Some("ops"), "h.example", 2222))
        );
        assert_eq!("SSH://h/".parse(), Ok(jh(None, "h", 22)));
        assert_eq!(
            "ssh://u@[fe80::1]:2222".parse(),
            Ok(jh(Some("u"), "fe80::1", 2222))
        );
    }

    #[test]
    fn refused_forms_say_why() {
        assert_eq!("".parse::<JumpHost>(), Err(JumpHostError::Empty));
        assert_eq!("@h".parse::<JumpHost>(), Err(JumpHostError::EmptyUser));
        assert_eq!(
            "h:0".parse::<JumpHost>(),
            Err(JumpHostError::BadPort("0".into()))
        );
        assert_eq!(
            "h:99999".parse::<JumpHost>(),
            Err(JumpHostError::BadPort("99999".into()))
        );
        assert!(matches!(
            "[::1".parse::<JumpHost>(),
            Err(JumpHostError::Brackets(_))
        ));
        assert!(matches!(
            "h st".parse::<JumpHost>(),
            Err(JumpHostError::BadHost(_))
        ));
        assert!(matches!(
            "-oProxyCommand=x".parse::<JumpHost>(),
            Err(JumpHostError::BadHost(_))
        ));
        assert!(matches!(
            "https://u@h".parse::<JumpHost>(),
            Err(JumpHostError::Scheme(_))
        ));
    }

    #[test]
    fn a_typed_port_is_remembered_even_when_it_is_22() {
        let given = |s: &str| s.parse::<JumpHost>().unwrap().port_given;
        assert!(given("h:22") && given("u@[::1]:22") && given("h:2222"));
        assert!(!given("h") && !given("u@h") && !given("[::1]") && !given("2001:db8::1"));
    }

    #[test]
    fn display_round_trips() {
        for s in ["u@h:22", "h:2222", "u@[fe80::1]:22"] {
            assert_eq!(s.parse::<JumpHost>().unwrap().to_string(), s);
        }
    }
}
