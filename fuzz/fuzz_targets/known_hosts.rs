//! known_hosts files as the host-key check reads them, through its public entry point
//! (`ssh::known_hosts::check`): any content gives a verdict or an error, never a panic, and a
//! file holding the host's key line is `Known` (or `Changed`, or `Revoked` if a line marks
//! the key `@revoked`, which wins as in OpenSSH).

#![no_main]

use std::io::Write;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use mse_vpn::ssh::known_hosts::{Presented, Verdict, check};
use russh::keys::PublicKey;

/// The key the server presents.
const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl";

fn key() -> &'static PublicKey {
    static K: OnceLock<PublicKey> = OnceLock::new();
    K.get_or_init(|| PublicKey::from_openssh(KEY).expect("the test key"))
}

/// The plain host key, no certificate.
fn presented() -> Presented<'static> {
    Presented {
        key: key(),
        certificate: None,
    }
}

/// A fixed time for certificates' validity (2027-01-01).
const NOW_UNIX: u64 = 1_798_761_600;

fuzz_target!(|data: &[u8]| {
    let path = std::env::temp_dir().join(format!("mse-vpn-fuzz-kh-{}", std::process::id()));
    let mut f = std::fs::File::create(&path).expect("temp file");
    f.write_all(data).expect("write");
    drop(f);
    for (host, port) in [("bastion", 22), ("bastion", 2222), ("10.0.0.1", 22)] {
        let _ = check(host, port, presented(), &path, NOW_UNIX);
    }
    // The fuzzed lines, then the host's own line: the key is known, whatever came before.
    let mut f = std::fs::OpenOptions::new().append(true).open(&path).expect("reopen");
    writeln!(f, "\nbastion {KEY}").expect("append");
    drop(f);
    if let Ok(v) = check("bastion", 22, presented(), &path, NOW_UNIX) {
        assert!(
            matches!(
                v,
                Verdict::Known | Verdict::Changed { .. } | Verdict::Revoked { .. }
            ),
            "the host's own line was not found: {v:?}"
        );
    }
});
