//! A first look at a private key file named by `-i` or `IdentityFile`, so the two common
//! mistakes get a message that says what to do: a path that does not exist, and the public
//! half (`id_ed25519.pub`) given instead of the private key. Reads the file's first bytes
//! only; never parses or logs key material.

use std::io::Read;
use std::path::{Path, PathBuf};

use super::SshError;

/// What public key files start with (`ssh-ed25519 AAAA…`, `ecdsa-sha2-nistp256 AAAA…`,
/// `sk-ssh-ed25519@openssh.com AAAA…`, and the RFC 4716 format).
const PUBLIC_KEY_STARTS: [&str; 4] = ["ssh-", "ecdsa-", "sk-", "---- BEGIN SSH2 PUBLIC KEY"];

/// Checks that `path` exists and is not a public key.
pub fn check(path: &Path) -> Result<(), SshError> {
    let mut head = [0u8; 64];
    let n = match std::fs::File::open(path).and_then(|mut f| f.read(&mut head)) {
        Ok(n) => n,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(SshError::NoKeyFile {
                path: path.to_owned(),
            });
        }
        // Unreadable for another reason: loading it says why.
        Err(_) => return Ok(()),
    };
    let head = String::from_utf8_lossy(&head[..n]);
    if PUBLIC_KEY_STARTS.iter().any(|p| head.starts_with(p)) {
        let private = path
            .to_str()
            .and_then(|p| p.strip_suffix(".pub"))
            .map(PathBuf::from)
            .filter(|p| p.is_file());
        return Err(SshError::PublicKeyFile {
            path: path.to_owned(),
            private,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_and_public_key_files_are_named_with_the_fix() {
        let dir = std::env::temp_dir().join(format!("mse-vpn-keyfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = check(&dir.join("nope")).unwrap_err();
        assert!(matches!(missing, SshError::NoKeyFile { .. }), "{missing}");

        let private = dir.join("id_ed25519");
        let public = dir.join("id_ed25519.pub");
        std::fs::write(
            &private,
            "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n",
        )
        .unwrap();
        std::fs::write(&public, "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA me@host\n").unwrap();
        assert!(check(&private).is_ok());
        let e = check(&public).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "{} is a public key: pass the private key ({})",
                public.display(),
                private.display()
            )
        );
        // A public key with no private key next to it.
        std::fs::remove_file(&private).unwrap();
        let e = check(&public).unwrap_err();
        assert!(e.to_string().ends_with("pass the private key"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
