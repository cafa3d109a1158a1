//! End-to-end tests of host-key checking as OpenSSH does it, against a real sshd: a
//! `@revoked` key is refused even with `--accept-new-host-key`, and a host certificate
//! (sshd's `HostCertificate`, signed with `ssh-keygen -s`) is accepted through a
//! `@cert-authority` line alone, and refused with its reason when it is not for this host.
//!
//! That no login happened is read from sshd's own log: a refused host key ends the
//! connection before authentication.

use std::time::Duration;

use crate::harness::{Testbed, Vpn, curl_within, s, strs};

/// The CIDR every test routes.
const VPC: &str = "10.0.0.0/16";

/// The `ssh-ed25519 AAAA...` part of a public key file.
fn key_of(path: &std::path::Path) -> String {
    let key = std::fs::read_to_string(path).expect("public key");
    key.split_whitespace().take(2).collect::<Vec<_>>().join(" ")
}

/// `up` with `known_hosts` instead of the testbed's, and `extra`.
fn up_with(tb: &Testbed, known_hosts: &std::path::Path, extra: &[&str]) -> Vec<String> {
    let mut args = tb.up_args(&[VPC], extra);
    let at = args.iter().position(|a| a == "--known-hosts").unwrap();
    args[at + 1] = s(known_hosts);
    args
}

fn logins(tb: &Testbed) -> usize {
    tb.sshd_log().matches("Accepted publickey").count()
}

#[test]
fn a_revoked_host_key_is_refused_even_when_accepting_new_keys() {
    if crate::harness::skip_unless_root() {
        return;
    }
    let tb = Testbed::up("hk1", &["--with", "nginx"]);
    let before = tb.snapshot();
    let host_key = key_of(&tb.dir.join("ssh_host_ed25519_key.pub"));
    // As an admin writes it after a key leaked: a tab after the marker, every host.
    let kh = tb.dir.join("known_hosts_revoked");
    let text = format!("# the old jump host key leaked\n@revoked\t* {host_key} old\n");
    std::fs::write(&kh, &text).unwrap();
    let logged_in = logins(&tb);
    let (status, err) = tb.up_fails(&strs(&up_with(&tb, &kh, &["--accept-new-host-key"])));
    assert_eq!(status.code(), Some(4), "host key exit status: {err}");
    assert!(err.contains("REVOKED HOST KEY DETECTED"), "{err}");
    assert!(
        err.contains(&format!("line 2 of {}", kh.display())),
        "names the file and line: {err}"
    );
    assert_eq!(
        std::fs::read_to_string(&kh).unwrap(),
        text,
        "nothing recorded"
    );
    assert_eq!(logins(&tb), logged_in, "no login after a revoked key");
    assert_eq!(tb.snapshot(), before, "the host is as it was");

    // The same key also known as a plain line (hashed, port 22 implied) is still refused:
    // the revocation wins over any other line.
    let hashed = {
        let plain = tb.dir.join("known_hosts_plain");
        std::fs::write(&plain, format!("{} {host_key}\n", tb.jump_addr)).unwrap();
        let out = std::process::Command::new("ssh-keygen")
            .args(["-H", "-f", &s(&plain)])
            .output()
            .unwrap();
        assert!(out.status.success());
        std::fs::read_to_string(&plain).unwrap()
    };
    assert!(hashed.starts_with("|1|"), "{hashed}");
    std::fs::write(
        &kh,
        format!("{hashed}@revoked {} {host_key}\n", tb.jump_addr),
    )
    .unwrap();
    let (status, err) = tb.up_fails(&strs(&up_with(&tb, &kh, &[])));
    assert_eq!(status.code(), Some(4), "{err}");
    assert!(
        err.contains("REVOKED HOST KEY DETECTED") && err.contains("line 2 of"),
        "{err}"
    );

    // Without the revocation the hashed line lets the session up.
    std::fs::write(&kh, &hashed).unwrap();
    let args = up_with(&tb, &kh, &[]);
    let vpn = Vpn::spawn(tb.mse_vpn(&strs(&args)));
    vpn.wait_up(Duration::from_secs(20));
    assert!(curl_within(&tb, Duration::from_secs(5)), "{}", vpn.stderr());
    assert!(vpn.interrupt().success());
}

#[test]
fn a_host_certificate_signed_by_a_cert_authority_is_accepted() {
    if crate::harness::skip_unless_root() {
        return;
    }
    let tb = Testbed::up("hk2", &["--with", "nginx"]);
    let before = tb.snapshot();
    // An authority signs the jump host's key as a host certificate for its address.
    let ca = tb.dir.join("host_ca");
    crate::harness::keygen(&ca, "", &["-t", "ed25519"]);
    let host_pub = tb.dir.join("ssh_host_ed25519_key.pub");
    let cert = tb.dir.join("ssh_host_ed25519_key-cert.pub");
    let sign = |principals: &str| {
        let out = std::process::Command::new("ssh-keygen")
            .args(["-q", "-s", &s(&ca), "-I", "jump", "-h", "-n", principals])
            .args(["-V", "-5m:+1h", &s(&host_pub)])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(cert.exists());
    };
    sign(&format!("{},bastion.example", tb.jump_addr));
    let host_key_line = format!("HostKey {}", s(&tb.dir.join("ssh_host_ed25519_key")));
    tb.edit_sshd_config(
        &host_key_line,
        &format!("{host_key_line}\nHostCertificate {}", s(&cert)),
    );

    // known_hosts trusts the authority for every host, and holds no key of the jump host.
    let kh = tb.dir.join("known_hosts_ca");
    let ca_pub = crate::harness::pub_path(&ca);
    let text = format!("@cert-authority * {} the team CA\n", key_of(&ca_pub));
    std::fs::write(&kh, &text).unwrap();
    let vpn = Vpn::spawn(tb.mse_vpn(&strs(&up_with(&tb, &kh, &[]))));
    vpn.wait_up(Duration::from_secs(20));
    assert!(curl_within(&tb, Duration::from_secs(5)), "{}", vpn.stderr());
    assert!(vpn.interrupt().success());
    assert_eq!(
        std::fs::read_to_string(&kh).unwrap(),
        text,
        "nothing recorded"
    );
    assert_eq!(tb.snapshot(), before);

    // The plain key still works for a known_hosts without the authority (the certificate is
    // not asked for then).
    let vpn = tb.start(&[VPC], &[]);
    assert!(curl_within(&tb, Duration::from_secs(5)));
    assert!(vpn.interrupt().success());

    // A certificate for other names only is not accepted; its key is then unknown, and the
    // message says why the certificate was not taken.
    sign("bastion.example");
    tb.control("sshd-restart");
    let (status, err) = tb.up_fails(&strs(&up_with(&tb, &kh, &[])));
    assert_eq!(status.code(), Some(4), "{err}");
    assert!(
        err.contains("is not known") && err.contains("host certificate was not accepted"),
        "{err}"
    );
    assert!(
        err.contains(&format!("not for {}", tb.jump_addr)) && err.contains("line 1"),
        "{err}"
    );

    // A revoked authority revokes its certificates.
    sign(&tb.jump_addr);
    tb.control("sshd-restart");
    std::fs::write(&kh, format!("{text}@revoked * {}\n", key_of(&ca_pub))).unwrap();
    let (status, err) = tb.up_fails(&strs(&up_with(&tb, &kh, &["--accept-new-host-key"])));
    assert_eq!(status.code(), Some(4), "{err}");
    assert!(
        err.contains("REVOKED HOST KEY DETECTED") && err.contains("line 2 of"),
        "{err}"
    );
    assert_eq!(tb.snapshot(), before);
}
