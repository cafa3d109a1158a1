//! Strict host-key checking against an OpenSSH `known_hosts` file.
//!
//! Matching of host patterns (plain, `[host]:port`, hashed `|1|` entries) is russh's; the key
//! comparison is ours and compares key *data* only (russh's `PublicKey` equality also compares
//! the comment, so a key with a comment would never match). Lines with markers
//! (`@cert-authority`, `@revoked`) and wildcard patterns are not interpreted.

use std::path::Path;

use russh::keys::{HashAlg, PublicKey};

/// The outcome of looking a server key up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// A line for this host has exactly this key.
    Known,
    /// No line for this host has a key of this algorithm.
    Unknown,
    /// A line for this host has a different key of the same algorithm (1-based line number).
    Changed {
        /// The line that holds the recorded key.
        line: usize,
    },
}

/// Looks `key` up for `host`:`port` in `path` (a missing file means every key is unknown).
///
/// A file that exists but cannot be opened (no descriptor left, a permission or path error)
/// is an error, never "unknown": russh's helper returns an empty list on *any* open error,
/// so the file is opened here first, and again after an empty answer (in case the helper's
/// own open failed in between). Out of descriptors, the error is transient: the caller retries
/// ([`crate::ssh::SshError::is_fatal`]).
pub fn check(
    host: &str,
    port: u16,
    key: &PublicKey,
    path: &Path,
) -> Result<Verdict, russh::keys::Error> {
    let readable = || match std::fs::File::open(path) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(russh::keys::Error::IO(e)),
    };
    if !readable()? {
        return Ok(Verdict::Unknown);
    }
    let entries = russh::keys::known_hosts::known_host_keys_path(host, port, path)?;
    if entries.is_empty() {
        readable()?;
    }
    let mut changed = None;
    for (line, recorded) in entries {
        if recorded.algorithm() != key.algorithm() {
            continue;
        }
        if recorded.key_data() == key.key_data() {
            return Ok(Verdict::Known);
        }
        changed.get_or_insert(line);
    }
    Ok(match changed {
        Some(nth) => Verdict::Changed {
            line: file_line(path, nth).unwrap_or(nth),
        },
        None => Verdict::Unknown,
    })
}

/// russh numbers entries without counting comment lines: map its `nth` entry back to the
/// file's real 1-based line number.
fn file_line(path: &Path, nth: usize) -> Option<usize> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut seen = 0;
    for (i, line) in text.lines().enumerate() {
        if line.starts_with('#') {
            continue;
        }
        seen += 1;
        if seen == nth {
            return Some(i + 1);
        }
    }
    None
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

    const ED_A: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHxTl9hKdZcvY9lP5iDplUq5W2CYdhPjPdvK5eS09qX0";
    const ED_B: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIN+ABQh3tOlAfW26/Y46Ouwwdz4aT+XSw9kjRsz66mdE";

    fn key(s: &str) -> PublicKey {
        PublicKey::from_openssh(s).unwrap()
    }

    fn file(contents: &str) -> (tempdir::Dir, std::path::PathBuf) {
        let dir = tempdir::Dir::new();
        let path = dir.0.join("known_hosts");
        std::fs::write(&path, contents).unwrap();
        (dir, path)
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
        let (_dir, path) = file(ED_A);
        // A path through a regular file: open fails with ENOTDIR (not "missing").
        let bad = path.join("known_hosts");
        let r = check("bastion", 22, &key(ED_A), &bad);
        assert!(
            matches!(r, Err(russh::keys::Error::IO(_))),
            "{r:?}: a read error must not look like an unknown host key"
        );
        let missing = path.with_file_name("absent");
        assert_eq!(
            check("bastion", 22, &key(ED_A), &missing).unwrap(),
            Verdict::Unknown
        );
    }

    #[test]
    fn known_even_with_a_comment_on_either_side() {
        let (_d, p) = file(&format!("# comment\nbastion {ED_A} root@bastion\n"));
        assert_eq!(
            check("bastion", 22, &key(&format!("{ED_A} other-comment")), &p).unwrap(),
            Verdict::Known
        );
    }

    #[test]
    fn unknown_host_and_missing_file() {
        let (_d, p) = file(&format!("other {ED_A}\n"));
        assert_eq!(
            check("bastion", 22, &key(ED_A), &p).unwrap(),
            Verdict::Unknown
        );
        assert_eq!(
            check(
                "bastion",
                22,
                &key(ED_A),
                Path::new("/nonexistent/known_hosts")
            )
            .unwrap(),
            Verdict::Unknown
        );
    }

    #[test]
    fn changed_key_reports_its_line() {
        let (_d, p) = file(&format!("a {ED_B}\n# comment\nb {ED_B}\nbastion {ED_B}\n"));
        assert_eq!(
            check("bastion", 22, &key(ED_A), &p).unwrap(),
            Verdict::Changed { line: 4 }
        );
    }

    #[test]
    fn non_default_port_uses_bracket_form_and_learn_round_trips() {
        let (_d, p) = file("");
        learn("10.0.0.1", 2222, &key(&format!("{ED_A} some comment")), &p).unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(
            text.trim_start()
                .starts_with("[10.0.0.1]:2222 ssh-ed25519 "),
            "{text}"
        );
        assert_eq!(
            check("10.0.0.1", 2222, &key(ED_A), &p).unwrap(),
            Verdict::Known
        );
        assert_eq!(
            check("10.0.0.1", 22, &key(ED_A), &p).unwrap(),
            Verdict::Unknown
        );
    }

    #[test]
    fn hashed_entries_match() {
        // `ssh-keygen -H` form of "bastion" with salt "0123456789abcdefghij" (HMAC-SHA1).
        use base64_like::encode;
        let salt = b"0123456789abcdefghij";
        // HMAC-SHA1(salt, "bastion"), from `openssl dgst -sha1 -mac HMAC -macopt hexkey:..`.
        let mac = [
            0x15, 0x76, 0x57, 0x85, 0x19, 0x7e, 0x83, 0x65, 0x23, 0x03, 0xfa, 0x76, 0xa5, 0x41,
            0xa8, 0x35, 0x87, 0xa9, 0x21, 0x2a,
        ];
        let line = format!("|1|{}|{} {ED_A}\n", encode(salt), encode(&mac));
        let (_d, p) = file(&line);
        assert_eq!(
            check("bastion", 22, &key(ED_A), &p).unwrap(),
            Verdict::Known
        );
    }

    mod base64_like {
        pub fn encode(b: &[u8]) -> String {
            const T: &[u8; 64] =
                b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
            let mut out = String::new();
            for c in b.chunks(3) {
                let n = (c[0] as u32) << 16
                    | (*c.get(1).unwrap_or(&0) as u32) << 8
                    | *c.get(2).unwrap_or(&0) as u32;
                for i in 0..4 {
                    if i <= c.len() {
                        out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
                    } else {
                        out.push('=');
                    }
                }
            }
            out
        }
    }
}
