//! Host-key checking against an OpenSSH `known_hosts` file, as `ssh` checks it.
//!
//! Each line is parsed by ssh-key's `known_hosts` module (marker, plain or hashed host
//! names, key), once its fields are split on spaces or tabs as OpenSSH splits them; a line
//! that does not parse is skipped, as OpenSSH skips it. Matching is ours, OpenSSH's rules:
//! the host is `host` on port 22 and `[host]:port` on any other, compared without case
//! against comma-separated patterns with `*`, `?` and `!negation` (a matching negated
//! pattern rules the line out), or against a hashed name (`|1|salt|HMAC-SHA1`).
//!
//! - `@revoked` lines: a presented key (or the authority that signed a presented
//!   certificate) listed there is refused, always ("REVOKED HOST KEY DETECTED").
//! - `@cert-authority` lines: a host certificate signed by one of these keys, valid now,
//!   for this host name (its principals, `*` and `?` allowed; none means any host), with no
//!   critical option, is accepted. A certificate that is not accepted falls back to the key
//!   inside it, checked as a plain key (OpenSSH does the same).
//! - other lines: the key of the same algorithm must be the recorded one (the key *data* is
//!   compared: `PublicKey` equality also compares comments).
//!
//! This file reads and appends to the one file it is given; it never connects anywhere.

use std::path::Path;

use hmac::{Hmac, KeyInit, Mac};
use russh::keys::ssh_key::certificate::CertType;
use russh::keys::ssh_key::known_hosts::{Entry, HostPatterns, Marker};
use russh::keys::ssh_key::public::KeyData;
use russh::keys::{Algorithm, Certificate, HashAlg, PublicKey};
use tracing::debug;

/// The outcome of looking a server key up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// A line for this host has exactly this key.
    Known,
    /// The server's host certificate is signed by the `@cert-authority` key on `line`.
    Certified {
        /// The authority's line (1-based).
        line: usize,
    },
    /// No line for this host has a key of this algorithm.
    Unknown {
        /// Why a host certificate the server presented was not accepted, if it presented
        /// one (its key was then looked up as a plain key).
        certificate: Option<String>,
    },
    /// A line for this host has a different key of the same algorithm (1-based line number).
    Changed {
        /// The line that holds the recorded key.
        line: usize,
    },
    /// The key, or the authority that signed its certificate, is marked `@revoked` on `line`.
    Revoked {
        /// The `@revoked` line (1-based).
        line: usize,
    },
}

/// What the server presented: its host key, and the certificate that carries it, if any.
#[derive(Clone, Copy, Debug)]
pub struct Presented<'a> {
    /// The host key (for a certificate: the key it certifies).
    pub key: &'a PublicKey,
    /// The host certificate.
    pub certificate: Option<&'a Certificate>,
}

/// One parsed line of the file.
struct Line {
    /// 1-based line number.
    number: usize,
    entry: Entry,
}

/// Looks what the server presented up for `host`:`port` in `path` at `now_unix` (seconds
/// since the epoch, for certificates' validity). A missing file means every key is unknown;
/// a file that exists but cannot be read is an error, never "unknown" (out of descriptors,
/// the caller retries: [`crate::ssh::SshError::is_fatal`]).
pub fn check(
    host: &str,
    port: u16,
    presented: Presented<'_>,
    path: &Path,
    now_unix: u64,
) -> Result<Verdict, russh::keys::Error> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(russh::keys::Error::IO(e)),
    };
    Ok(check_text(&text, host, port, presented, now_unix))
}

/// [`check`] on the file's text.
pub fn check_text(
    text: &str,
    host: &str,
    port: u16,
    presented: Presented<'_>,
    now_unix: u64,
) -> Verdict {
    let name = host_port(host, port);
    let lines: Vec<Line> = parse(text)
        .into_iter()
        .filter(|l| host_matches(l.entry.host_patterns(), &name))
        .collect();
    let same = |a: &KeyData, b: &PublicKey| a == b.key_data();
    let marked = |marker: Marker| {
        lines
            .iter()
            .filter(move |l| l.entry.marker() == Some(&marker))
    };

    // Revoked keys first: nothing else can make them acceptable.
    let ca = presented.certificate.map(Certificate::signature_key);
    if let Some(l) = marked(Marker::Revoked).find(|l| {
        same(presented.key.key_data(), l.entry.public_key())
            || ca.is_some_and(|ca| same(ca, l.entry.public_key()))
    }) {
        return Verdict::Revoked { line: l.number };
    }

    let mut problem = None;
    if let Some(cert) = presented.certificate {
        let signer = marked(Marker::CertAuthority)
            .find(|l| same(cert.signature_key(), l.entry.public_key()));
        match signer {
            Some(l) => match certificate_problem(cert, host, now_unix) {
                None => return Verdict::Certified { line: l.number },
                Some(why) => {
                    problem = Some(format!("{why} (its authority is on line {})", l.number))
                }
            },
            None => {
                problem = Some(format!(
                    "it is signed by {}, which is not a @cert-authority for this host",
                    cert.signature_key().fingerprint(HashAlg::Sha256)
                ))
            }
        }
    }

    let mut changed = None;
    for l in lines.iter().filter(|l| l.entry.marker().is_none()) {
        let recorded = l.entry.public_key();
        if recorded.algorithm() != presented.key.algorithm() {
            continue;
        }
        if recorded.key_data() == presented.key.key_data() {
            return Verdict::Known;
        }
        changed.get_or_insert(l.number);
    }
    match changed {
        Some(line) => Verdict::Changed { line },
        None => Verdict::Unknown {
            certificate: problem,
        },
    }
}

/// Lines that parse, with their numbers. Fields may be separated by runs of spaces or tabs
/// (ssh-key's parser splits on single spaces only).
fn parse(text: &str) -> Vec<Line> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let normal = line
            .split([' ', '\t'])
            .filter(|f| !f.is_empty())
            .collect::<Vec<_>>()
            .join(" ");
        match normal.parse::<Entry>() {
            Ok(entry) => out.push(Line {
                number: i + 1,
                entry,
            }),
            Err(e) => {
                debug!(line = i + 1, error = %e, "known_hosts line skipped: it does not parse")
            }
        }
    }
    out
}

/// The name a host is recorded under: `host`, or `[host]:port` off port 22 (lower case).
fn host_port(host: &str, port: u16) -> String {
    let host = host.to_ascii_lowercase();
    if port == 22 {
        host
    } else {
        format!("[{host}]:{port}")
    }
}

/// OpenSSH's `match_hostname`: a negated pattern that matches rules the line out; otherwise
/// one matching pattern is needed. A hashed name is HMAC-SHA1(salt, name).
fn host_matches(patterns: &HostPatterns, name: &str) -> bool {
    match patterns {
        HostPatterns::HashedName { salt, hash } => Hmac::<sha1::Sha1>::new_from_slice(salt)
            .map(|mac| mac.chain_update(name).verify_slice(hash).is_ok())
            .unwrap_or(false),
        HostPatterns::Patterns(list) => {
            let mut found = false;
            for p in list {
                let p = p.to_ascii_lowercase();
                match p.strip_prefix('!') {
                    Some(neg) if wildcard(neg.as_bytes(), name.as_bytes()) => return false,
                    Some(_) => {}
                    None => found |= wildcard(p.as_bytes(), name.as_bytes()),
                }
            }
            found
        }
    }
}

/// Why a host certificate signed by a trusted authority is still not accepted for `host`
/// at `now_unix`, as OpenSSH's `sshkey_cert_check_host` decides; `None` if it is accepted.
fn certificate_problem(cert: &Certificate, host: &str, now_unix: u64) -> Option<String> {
    if cert.cert_type() != CertType::Host {
        return Some("it is a user certificate, not a host certificate".to_owned());
    }
    if now_unix < cert.valid_after() {
        return Some("it is not valid yet".to_owned());
    }
    if now_unix >= cert.valid_before() {
        return Some("it has expired".to_owned());
    }
    // OpenSSH's default CASignatureAlgorithms leave out ssh-rsa (RSA with SHA-1).
    if cert.signature().algorithm() == (Algorithm::Rsa { hash: None }) {
        return Some("its authority signed it with ssh-rsa (SHA-1), which is refused".to_owned());
    }
    let fingerprint = cert.signature_key().fingerprint(HashAlg::Sha256);
    if cert.validate_at(now_unix, [&fingerprint]).is_err() {
        return Some("its signature does not verify".to_owned());
    }
    let host = host.to_ascii_lowercase();
    let principals = cert.valid_principals();
    if !principals.is_empty()
        && !principals
            .iter()
            .any(|p| wildcard(p.to_ascii_lowercase().as_bytes(), host.as_bytes()))
    {
        return Some(format!(
            "it is for {}, not for {host}",
            principals.join(", ")
        ));
    }
    if !cert.critical_options().is_empty() {
        return Some("it has critical options, which host certificates may not have".to_owned());
    }
    None
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

/// True if `path` has a `@cert-authority` line for `host`:`port`: the server is then asked
/// for its host certificate first (as OpenSSH orders its host key algorithms by what it
/// knows for the host). Unreadable or missing: false.
pub fn has_authority_for(host: &str, port: u16, path: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(path) else {
        return false;
    };
    let name = host_port(host, port);
    parse(&text).iter().any(|l| {
        l.entry.marker() == Some(&Marker::CertAuthority)
            && host_matches(l.entry.host_patterns(), &name)
    })
}

/// Appends a line for `host`:`port` with `key` (creating the file and its directory).
pub fn learn(
    host: &str,
    port: u16,
    key: &PublicKey,
    path: &Path,
) -> Result<(), russh::keys::Error> {
    // Record the key without any comment the server may have attached.
    let mut bare = key.clone();
    bare.set_comment("");
    russh::keys::known_hosts::learn_known_hosts_path(host, port, &bare, path)
}

/// `SHA256:...`, as `ssh-keygen -lf` prints it.
pub fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use russh::keys::PrivateKey;
    use russh::keys::ssh_key::certificate::Builder;
    use russh::keys::ssh_key::private::Ed25519Keypair;

    const ED_A: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHxTl9hKdZcvY9lP5iDplUq5W2CYdhPjPdvK5eS09qX0";
    const ED_B: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIN+ABQh3tOlAfW26/Y46Ouwwdz4aT+XSw9kjRsz66mdE";
    /// A time inside the test certificates' validity.
    const NOW: u64 = 1_800_000_000;

    fn key(s: &str) -> PublicKey {
        PublicKey::from_openssh(s).unwrap()
    }

    fn plain(k: &PublicKey) -> Presented<'_> {
        Presented {
            key: k,
            certificate: None,
        }
    }

    fn check(text: &str, host: &str, port: u16, k: &PublicKey) -> Verdict {
        check_text(text, host, port, plain(k), NOW)
    }

    fn ed25519(seed: u8) -> PrivateKey {
        PrivateKey::from(Ed25519Keypair::from_seed(&[seed; 32]))
    }

    /// A host certificate for `host_key` signed by `ca`, for `principals`, valid around NOW.
    fn host_cert(ca: &PrivateKey, host_key: &PrivateKey, principals: &[&str]) -> Certificate {
        let mut b = Builder::new(
            [7u8; 16].to_vec(),
            host_key.public_key().key_data().clone(),
            NOW - 3600,
            NOW + 3600,
        )
        .unwrap();
        b.cert_type(CertType::Host).unwrap();
        if principals.is_empty() {
            b.all_principals_valid().unwrap();
        }
        for p in principals {
            b.valid_principal(*p).unwrap();
        }
        b.sign(ca).unwrap()
    }

    fn openssh(k: &PublicKey) -> String {
        k.to_openssh().unwrap()
    }

    mod tempdir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Dir {
                use std::sync::atomic::{AtomicU32, Ordering};
                static N: AtomicU32 = AtomicU32::new(0);
                let p = std::env::temp_dir().join(format!(
                    "mse-vpn-kh-{}-{}",
                    std::process::id(),
                    N.fetch_add(1, Ordering::Relaxed)
                ));
                std::fs::create_dir_all(&p).unwrap();
                Dir(p)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[test]
    fn out_of_descriptors_is_retried_a_changed_key_is_not() {
        let kh = |e: std::io::Error| crate::ssh::SshError::KnownHosts {
            path: "known_hosts".into(),
            source: russh::keys::Error::IO(e),
        };
        let emfile = crate::fds::emfile();
        assert!(!kh(emfile).is_fatal(), "EMFILE passes: reconnect again");
        let denied = std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        assert!(kh(denied).is_fatal(), "a lasting error stops the session");
    }

    // Unix: Windows reports a path through a regular file as not found, like a missing file.
    #[cfg(unix)]
    #[test]
    fn an_unopenable_file_is_an_error_not_an_unknown_key() {
        let dir = tempdir::Dir::new();
        let path = dir.0.join("known_hosts");
        std::fs::write(&path, ED_A).unwrap();
        // A path through a regular file: open fails with ENOTDIR (not "missing").
        let bad = path.join("known_hosts");
        let k = key(ED_A);
        let r = super::check("bastion", 22, plain(&k), &bad, NOW);
        assert!(
            matches!(r, Err(russh::keys::Error::IO(_))),
            "{r:?}: a read error must not look like an unknown host key"
        );
        let missing = path.with_file_name("absent");
        assert_eq!(
            super::check("bastion", 22, plain(&k), &missing, NOW).unwrap(),
            Verdict::Unknown { certificate: None }
        );
    }

    #[test]
    fn known_even_with_a_comment_on_either_side_and_tabs_between_fields() {
        let k = key(&format!("{ED_A} other-comment"));
        assert_eq!(
            check(
                &format!("# comment\nbastion {ED_A} root@bastion\n"),
                "bastion",
                22,
                &k
            ),
            Verdict::Known
        );
        let tabbed = format!("bastion\t{}\n", ED_A.replacen(' ', " \t ", 1));
        assert_eq!(check(&tabbed, "bastion", 22, &k), Verdict::Known);
        assert_eq!(
            check(&format!("  bastion {ED_A}"), "BASTION", 22, &k),
            Verdict::Known
        );
    }

    #[test]
    fn unknown_host_and_lines_that_do_not_parse_are_skipped() {
        let k = key(ED_A);
        assert_eq!(
            check(
                &format!("other {ED_A}\ngarbage\n@bogus x {ED_A}\n"),
                "bastion",
                22,
                &k
            ),
            Verdict::Unknown { certificate: None }
        );
    }

    #[test]
    fn changed_key_reports_its_line() {
        let k = key(ED_A);
        assert_eq!(
            check(
                &format!("a {ED_B}\n# comment\n\nb {ED_B}\nbastion {ED_B}\n"),
                "bastion",
                22,
                &k
            ),
            Verdict::Changed { line: 5 }
        );
    }

    #[test]
    fn patterns_ports_and_negation() {
        let k = key(ED_A);
        let v = |text: &str, host: &str, port: u16| check(text, host, port, &k);
        let known = Verdict::Known;
        assert_eq!(v(&format!("a,*.corp {ED_A}"), "db.corp", 22), known);
        assert_eq!(
            v(&format!("*.corp,!bad.corp {ED_A}"), "bad.corp", 22),
            Verdict::Unknown { certificate: None }
        );
        assert_eq!(
            v(&format!("[10.0.0.1]:2222 {ED_A}"), "10.0.0.1", 2222),
            known
        );
        assert_eq!(
            v(&format!("[10.0.0.1]:2222 {ED_A}"), "10.0.0.1", 22),
            Verdict::Unknown { certificate: None }
        );
        assert_eq!(
            v(&format!("10.0.0.1 {ED_A}"), "10.0.0.1", 2222),
            Verdict::Unknown { certificate: None }
        );
        assert_eq!(v(&format!("[10.0.0.?]:* {ED_A}"), "10.0.0.7", 2200), known);
    }

    #[test]
    fn non_default_port_uses_bracket_form_and_learn_round_trips() {
        let dir = tempdir::Dir::new();
        let p = dir.0.join("known_hosts");
        learn("10.0.0.1", 2222, &key(&format!("{ED_A} some comment")), &p).unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(
            text.trim_start()
                .starts_with("[10.0.0.1]:2222 ssh-ed25519 "),
            "{text}"
        );
        let k = key(ED_A);
        assert_eq!(
            super::check("10.0.0.1", 2222, plain(&k), &p, NOW).unwrap(),
            Verdict::Known
        );
        assert_eq!(
            super::check("10.0.0.1", 22, plain(&k), &p, NOW).unwrap(),
            Verdict::Unknown { certificate: None }
        );
    }

    /// `|1|salt|hash` for `name` with salt "0123456789abcdefghij": HMAC-SHA1 from
    /// `openssl dgst -sha1 -mac HMAC -macopt key:0123456789abcdefghij`.
    const HASHED_BASTION: &str = "|1|MDEyMzQ1Njc4OWFiY2RlZmdoaWo=|FXZXhRl+g2UjA/p2pUGoNYepISo=";

    #[test]
    fn hashed_entries_match_plain_and_revoked() {
        let k = key(ED_A);
        assert_eq!(
            check(&format!("{HASHED_BASTION} {ED_A}\n"), "bastion", 22, &k),
            Verdict::Known
        );
        assert_eq!(
            check(&format!("{HASHED_BASTION} {ED_A}\n"), "other", 22, &k),
            Verdict::Unknown { certificate: None }
        );
        assert_eq!(
            check(
                &format!("{HASHED_BASTION} {ED_A}\n@revoked {HASHED_BASTION} {ED_A}\n"),
                "bastion",
                22,
                &k
            ),
            Verdict::Revoked { line: 2 }
        );
    }

    #[test]
    fn a_revoked_key_is_refused_whatever_else_the_file_says() {
        let k = key(ED_A);
        // Known on line 1, revoked for every host on line 3.
        let text = format!("bastion {ED_A}\n# revoked after the incident\n@revoked\t* {ED_A}\n");
        assert_eq!(
            check(&text, "bastion", 22, &k),
            Verdict::Revoked { line: 3 }
        );
        assert_eq!(
            check(&text, "elsewhere", 2222, &k),
            Verdict::Revoked { line: 3 }
        );
        // Another key is not affected by the line.
        assert_eq!(
            check(&text, "bastion", 22, &key(ED_B)),
            Verdict::Changed { line: 1 }
        );
        // A revocation for other hosts only does not apply.
        let text = format!("@revoked other {ED_A}\nbastion {ED_A}\n");
        assert_eq!(check(&text, "bastion", 22, &k), Verdict::Known);
    }

    #[test]
    fn a_host_certificate_signed_by_a_listed_authority_is_accepted() {
        let (ca, host) = (ed25519(1), ed25519(2));
        let cert = host_cert(&ca, &host, &["bastion", "*.corp"]);
        let inner = PublicKey::new(cert.public_key().clone(), "");
        let shown = Presented {
            key: &inner,
            certificate: Some(&cert),
        };
        let ca_line = |hosts: &str| {
            format!(
                "# CA\n@cert-authority {hosts} {}\n",
                openssh(ca.public_key())
            )
        };
        assert_eq!(
            check_text(&ca_line("*"), "bastion", 22, shown, NOW),
            Verdict::Certified { line: 2 }
        );
        assert_eq!(
            check_text(&ca_line("*.corp"), "db.corp", 22, shown, NOW),
            Verdict::Certified { line: 2 }
        );
        // Not a principal of the certificate: falls back to the plain key, unknown.
        let v = check_text(&ca_line("*"), "other", 22, shown, NOW);
        assert!(
            matches!(&v, Verdict::Unknown { certificate: Some(why) } if why.contains("not for other") && why.contains("line 2")),
            "{v:?}"
        );
        // Expired, or not valid yet.
        let v = check_text(&ca_line("*"), "bastion", 22, shown, NOW + 7200);
        assert!(
            matches!(&v, Verdict::Unknown { certificate: Some(why) } if why.contains("expired")),
            "{v:?}"
        );
        // Another authority: the CA line does not vouch for it; the plain key still can.
        let other = host_cert(&ed25519(3), &host, &[]);
        let shown_other = Presented {
            key: &inner,
            certificate: Some(&other),
        };
        let v = check_text(&ca_line("*"), "bastion", 22, shown_other, NOW);
        assert!(
            matches!(&v, Verdict::Unknown { certificate: Some(why) } if why.contains("not a @cert-authority")),
            "{v:?}"
        );
        let both = format!("{}bastion {}\n", ca_line("*"), openssh(host.public_key()));
        assert_eq!(
            check_text(&both, "bastion", 22, shown_other, NOW),
            Verdict::Known
        );
        // An authority for other hosts only does not vouch for this one.
        let v = check_text(&ca_line("*.corp"), "bastion", 22, shown, NOW);
        assert!(
            matches!(
                v,
                Verdict::Unknown {
                    certificate: Some(_)
                }
            ),
            "{v:?}"
        );
        // A revoked authority revokes its certificates.
        let revoked = format!("{}@revoked * {}\n", ca_line("*"), openssh(ca.public_key()));
        assert_eq!(
            check_text(&revoked, "bastion", 22, shown, NOW),
            Verdict::Revoked { line: 3 }
        );
    }

    #[test]
    fn a_user_certificate_or_a_forged_signature_is_not_a_host_certificate() {
        let (ca, host) = (ed25519(1), ed25519(2));
        let mut b = Builder::new(
            [1u8; 16].to_vec(),
            host.public_key().key_data().clone(),
            NOW - 1,
            NOW + 1,
        )
        .unwrap();
        b.cert_type(CertType::User).unwrap();
        b.all_principals_valid().unwrap();
        let user_cert = b.sign(&ca).unwrap();
        assert!(
            certificate_problem(&user_cert, "bastion", NOW)
                .unwrap()
                .contains("user certificate")
        );
        // Signed by a key other than the one it names as its authority.
        let good = host_cert(&ca, &host, &[]);
        let forged = host_cert(&ed25519(9), &host, &[]);
        let mut bytes = forged.to_bytes().unwrap();
        let (theirs, ours) = (
            forged.signature_key().fingerprint(HashAlg::Sha256),
            good.signature_key().fingerprint(HashAlg::Sha256),
        );
        assert_ne!(theirs, ours);
        // Replace the signing key's bytes in the encoding with the trusted CA's.
        let from = openssh_key_blob(ed25519(9).public_key());
        let to = openssh_key_blob(ca.public_key());
        let at = bytes.windows(from.len()).position(|w| w == from).unwrap();
        bytes[at..at + from.len()].copy_from_slice(&to);
        let forged = Certificate::from_bytes(&bytes).unwrap();
        assert!(
            certificate_problem(&forged, "bastion", NOW)
                .unwrap()
                .contains("signature"),
            "a certificate whose signature does not verify is refused"
        );
    }

    fn openssh_key_blob(k: &PublicKey) -> Vec<u8> {
        k.to_bytes().unwrap()
    }

    #[test]
    fn an_authority_line_for_the_host_is_found() {
        let dir = tempdir::Dir::new();
        let p = dir.0.join("known_hosts");
        std::fs::write(
            &p,
            format!("@cert-authority *.corp {ED_A}\nbastion {ED_B}\n"),
        )
        .unwrap();
        assert!(has_authority_for("db.corp", 22, &p));
        assert!(!has_authority_for("bastion", 22, &p));
        assert!(!has_authority_for(
            "db.corp",
            22,
            &p.with_file_name("absent")
        ));
    }
}
