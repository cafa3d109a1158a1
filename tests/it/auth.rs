//! End-to-end tests of SSH authentication against a real OpenSSH sshd: every key type, an
//! encrypted key whose passphrase is typed on a real pseudo-terminal, ssh-agent, and the
//! invoking user's `~/.ssh` when root runs mse-vpn on behalf of a user (as `sudo` does).
//!
//! Which key logged in is read from sshd's own log ("Accepted publickey for USER ... TYPE
//! SHA256:..."), so a test cannot pass by some other key getting in.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{TestUser, curl_within, s, strs};
use crate::harness::{Testbed, Vpn, fingerprint, keygen, pub_path, stderr, stdout};

/// The CIDR every test routes.
const VPC: &str = "10.0.0.0/16";

/// The prompt mse-vpn shows for an encrypted key.
const PROMPT: &str = "Enter passphrase for key";

/// "Accepted publickey" lines sshd logged after byte `mark` of its log.
fn logins_since(tb: &Testbed, mark: usize) -> Vec<String> {
    tb.sshd_log()
        .get(mark..)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("Accepted publickey"))
        .map(str::to_owned)
        .collect()
}

/// Asserts that sshd accepted at least one login since `mark`, and that every one was
/// `login` with the key in `pubkey`, of sshd's type name `kind` (RSA, ECDSA, ED25519).
fn assert_logins(tb: &Testbed, mark: usize, login: &str, kind: &str, pubkey: &Path) {
    let fp = fingerprint(pubkey);
    let logins = logins_since(tb, mark);
    assert!(
        !logins.is_empty(),
        "sshd logged no login:\n{}",
        tb.sshd_log()
    );
    for l in &logins {
        assert!(
            l.contains(&format!("for {login} from")) && l.contains(&format!("{kind} {fp}")),
            "expected {login} with {kind} {fp}, sshd logged: {l}"
        );
    }
}

#[test]
fn rsa_ecdsa_and_ed25519_key_files_each_log_in_and_carry_traffic() {
    if crate::harness::skip_unless_root() {
        return;
    }
    let tb = Testbed::up("au1", &["--with", "nginx"]);
    let kh = s(&tb.dir.join("known_hosts"));
    // (file, ssh-keygen options, sshd's name for the type)
    let kinds: [(&str, &[&str], &str); 4] = [
        ("key_rsa", &["-t", "rsa", "-b", "3072"], "RSA"),
        // The older "BEGIN RSA PRIVATE KEY" (PKCS#1 PEM) format many existing keys still use.
        (
            "key_rsa_pem",
            &["-t", "rsa", "-b", "3072", "-m", "PEM"],
            "RSA",
        ),
        ("key_ecdsa", &["-t", "ecdsa", "-b", "256"], "ECDSA"),
        ("key_ed25519", &["-t", "ed25519"], "ED25519"),
    ];
    for (file, opts, kind) in kinds {
        let key = tb.dir.join(file);
        keygen(&key, "", opts);
        tb.authorize(&pub_path(&key));
        let mark = tb.sshd_log().len();
        let args = tb.up_args_without_auth(
            Some("root"),
            &[VPC],
            &["-i", &s(&key), "--known-hosts", &kh],
        );
        let vpn = tb.start_cmd(tb.mse_vpn(&strs(&args)));
        tb.assert_curl_index();
        assert_logins(&tb, mark, "root", kind, &pub_path(&key));
        assert!(vpn.interrupt().success(), "{file}: unclean exit");
    }
}

/// An encrypted ed25519 key, authorized on the jump host; returns its path.
fn encrypted_key(tb: &Testbed, passphrase: &str) -> PathBuf {
    let key = tb.dir.join("key_encrypted");
    keygen(&key, passphrase, &["-t", "ed25519"]);
    tb.authorize(&pub_path(&key));
    key
}

/// `mse-vpn ARGS` on a pseudo-terminal, answering passphrase prompts with `answers` after
/// `delay_secs` each.
fn on_pty(tb: &Testbed, answers: &[&str], delay_secs: u32, args: &[String]) -> Vpn {
    tb.on_pty("Enter passphrase", answers, delay_secs, &strs(args))
}

#[test]
fn an_encrypted_key_asks_for_its_passphrase_on_the_terminal_once() {
    if crate::harness::skip_unless_root() {
        return;
    }
    let tb = Testbed::up("au2", &["--with", "nginx"]);
    let before = tb.snapshot();
    let key = encrypted_key(&tb, "correct horse");
    let kh = s(&tb.dir.join("known_hosts"));
    let args = tb.up_args_without_auth(
        Some("root"),
        &[VPC],
        &["-i", &s(&key), "--known-hosts", &kh],
    );

    // No terminal at all (a new session, no controlling tty): refused with what to do.
    let mut vpn = Vpn::spawn(tb.mse_vpn_with_env(&[], &["setsid", "-w"], &strs(&args)));
    let status = vpn.wait_exit(Duration::from_secs(20));
    assert!(!status.success());
    assert!(
        vpn.stderr().contains("no terminal") && vpn.stderr().contains("ssh-agent"),
        "{}",
        vpn.stderr()
    );
    assert_eq!(tb.snapshot(), before);

    // Wrong every time: a clear error after a bounded number of prompts, non-zero, and
    // nothing changed on the host.
    let mut vpn = on_pty(&tb, &["wrong"; 5], 0, &args);
    let status = vpn.wait_exit(Duration::from_secs(25));
    let out = vpn.stdout();
    assert!(!status.success(), "{out}");
    assert!(
        out.contains("passphrase")
            && out.contains(&s(&key))
            && out.to_lowercase().contains("wrong"),
        "the error should say the passphrase was wrong:\n{out}"
    );
    let prompts = out.matches(PROMPT).count();
    assert!((1..=3).contains(&prompts), "{prompts} prompts:\n{out}");
    assert_eq!(tb.snapshot(), before);
    assert!(logins_since(&tb, 0).is_empty(), "{}", tb.sshd_log());

    // A typo, then the right passphrase: up, traffic flows, and one good answer serves every
    // connection of the pool.
    let mark = tb.sshd_log().len();
    let vpn = on_pty(&tb, &["typo", "correct horse"], 0, &args);
    vpn.wait_up(Duration::from_secs(20));
    tb.assert_curl_index();
    assert_logins(&tb, mark, "root", "ED25519", &pub_path(&key));
    assert_eq!(vpn.stdout().matches(PROMPT).count(), 2, "{}", vpn.stdout());

    // The jump host's sshd dies and comes back: mse-vpn reconnects with the key it already
    // decrypted, without asking again (nobody may be at the terminal by then).
    tb.control("sshd-kill");
    tb.control("sshd-start");
    assert!(
        curl_within(&tb, Duration::from_secs(15)),
        "no traffic after the jump host came back:\n{}",
        vpn.stdout()
    );
    assert_eq!(
        vpn.stdout().matches(PROMPT).count(),
        2,
        "asked again on reconnect:\n{}",
        vpn.stdout()
    );
    let out = vpn.stdout();
    assert!(
        !out.contains("correct horse"),
        "passphrase echoed or logged:\n{out}"
    );
    assert!(vpn.interrupt().success());
    assert_eq!(tb.snapshot(), before);
}

#[test]
fn typing_a_passphrase_slowly_does_not_count_against_the_connect_timeout() {
    if crate::harness::skip_unless_root() {
        return;
    }
    let tb = Testbed::up("au5", &["--with", "nginx"]);
    let key = encrypted_key(&tb, "slow typist");
    let kh = s(&tb.dir.join("known_hosts"));
    let args = tb.up_args_without_auth(
        Some("root"),
        &[VPC],
        &[
            "-i",
            &s(&key),
            "--known-hosts",
            &kh,
            "--connect-timeout",
            "2",
        ],
    );
    // The answer comes 3 s after the prompt, past the 2 s connect timeout.
    let vpn = on_pty(&tb, &["slow typist"], 3, &args);
    vpn.wait_up(Duration::from_secs(20));
    tb.assert_curl_index();
    assert!(vpn.interrupt().success());
}

/// An `ssh-agent -D` on a socket of its own, killed on drop.
pub(crate) struct Agent {
    child: Child,
    /// Its socket (`SSH_AUTH_SOCK`).
    pub(crate) socket: PathBuf,
}

impl Agent {
    pub(crate) fn start(socket: PathBuf) -> Agent {
        let _ = std::fs::remove_file(&socket);
        let child = Command::new("ssh-agent")
            .arg("-D")
            .arg("-a")
            .arg(&socket)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start ssh-agent");
        let agent = Agent { child, socket };
        let start = Instant::now();
        while !agent.socket.exists() {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "ssh-agent did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        agent
    }

    /// `ssh-add ARGS` against this agent.
    pub(crate) fn add(&self, args: &[&str]) {
        let out = Command::new("ssh-add")
            .env("SSH_AUTH_SOCK", &self.socket)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run ssh-add");
        assert!(out.status.success(), "ssh-add {args:?}: {}", stderr(&out));
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

#[test]
fn ssh_agent_identities_log_in_with_no_key_file() {
    if crate::harness::skip_unless_root() {
        return;
    }
    let tb = Testbed::up("au3", &["--with", "nginx"]);
    let before = tb.snapshot();
    let agent = Agent::start(tb.dir.join("agent.sock"));
    let empty_home = tb.dir.join("empty-home");
    std::fs::create_dir_all(&empty_home).unwrap();
    let kh = s(&tb.dir.join("known_hosts"));
    let sock = s(&agent.socket);
    let home = s(&empty_home);
    let env = [("SSH_AUTH_SOCK", sock.as_str()), ("HOME", home.as_str())];
    let args = tb.up_args_without_auth(Some("root"), &[VPC], &["--known-hosts", &kh]);

    // The agent holds the key; the key file is gone.
    let ed = tb.dir.join("agent_ed25519");
    keygen(&ed, "", &["-t", "ed25519"]);
    tb.authorize(&pub_path(&ed));
    agent.add(&[&s(&ed)]);
    std::fs::remove_file(&ed).unwrap();
    let mark = tb.sshd_log().len();
    let vpn = tb.start_cmd(tb.mse_vpn_with_env(&env, &[], &strs(&args)));
    tb.assert_curl_index();
    assert_logins(&tb, mark, "root", "ED25519", &pub_path(&ed));
    assert!(vpn.interrupt().success());

    // An identity the jump host refuses, then an RSA one it accepts (the agent must sign with
    // rsa-sha2-*, since sshd refuses SHA-1 ssh-rsa signatures).
    agent.add(&["-D"]);
    let stranger = tb.dir.join("agent_stranger");
    keygen(&stranger, "", &["-t", "ed25519"]);
    let rsa = tb.dir.join("agent_rsa");
    keygen(&rsa, "", &["-t", "rsa", "-b", "3072"]);
    tb.authorize(&pub_path(&rsa));
    agent.add(&[&s(&stranger)]);
    agent.add(&[&s(&rsa)]);
    std::fs::remove_file(&rsa).unwrap();
    let mark = tb.sshd_log().len();
    let vpn = tb.start_cmd(tb.mse_vpn_with_env(&env, &[], &strs(&args)));
    tb.assert_curl_index();
    assert_logins(&tb, mark, "root", "RSA", &pub_path(&rsa));
    assert!(vpn.interrupt().success());

    // Without the agent there is nothing to log in with: refused, nothing changed.
    let (status, err) = tb.up_fails(&strs(&args));
    assert!(!status.success());
    assert!(err.contains("authentication as root"), "{err}");
    assert_eq!(tb.snapshot(), before);
}

#[test]
fn under_sudo_the_invoking_users_key_and_known_hosts_are_used() {
    if crate::harness::skip_unless_root() {
        return;
    }
    let tb = Testbed::up("au4", &["--with", "nginx"]);
    let before = tb.snapshot();
    let user = TestUser::create("mvtest", None);
    let ssh_dir = user.home.join(".ssh");
    std::fs::create_dir_all(&ssh_dir).unwrap();
    user.own(&ssh_dir, 0o700);
    let key = ssh_dir.join("id_ed25519");
    keygen(&key, "", &["-t", "ed25519"]);
    user.own(&key, 0o600);
    user.own(&pub_path(&key), 0o644);
    tb.authorize(&pub_path(&key));
    let kh = ssh_dir.join("known_hosts");
    std::fs::copy(tb.dir.join("known_hosts"), &kh).unwrap();
    user.own(&kh, 0o600);

    let env = user.sudo_env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    // No login name, no -i, no --known-hosts: all three come from the invoking user.
    let args = tb.up_args_without_auth(None, &[VPC], &[]);

    // Root alone has neither key nor known_hosts entry: refused.
    let (status, err) = tb.up_fails(&strs(&args));
    assert!(!status.success(), "{err}");
    assert_eq!(tb.snapshot(), before);

    // Root on mvtest's behalf: mvtest's key, known_hosts and login name.
    let mark = tb.sshd_log().len();
    let vpn = tb.start_cmd(tb.mse_vpn_with_env(&env, &[], &strs(&args)));
    tb.assert_curl_index();
    assert_logins(&tb, mark, user.name, "ED25519", &pub_path(&key));
    // `status` works without root for the user who started the session, and for nobody else.
    // A copy of the binary other users can run wherever the checkout lives (/root is 0700).
    let shared_bin = s(&tb.dir.join("mse-vpn-status"));
    std::fs::copy(crate::harness::bin(), &shared_bin).expect("copy the binary");
    let status_as = |who: &str| {
        let state = tb.state_dir();
        tb.cmd_in(
            &tb.lap(),
            &["runuser", "-u", who, "--", &shared_bin, "status", "--json"],
        )
        .env("MSE_VPN_STATE_DIR", &state)
        .output()
        .expect("run mse-vpn status")
    };
    let out = status_as(user.name);
    assert!(
        out.status.success(),
        "status as {}: {}",
        user.name,
        stderr(&out)
    );
    assert!(
        stdout(&out).contains("\"state\": \"connected\""),
        "{}",
        stdout(&out)
    );
    let out = status_as("nobody");
    assert!(
        !out.status.success(),
        "nobody may not read the session's status"
    );
    assert!(
        stderr(&out).contains("permission denied"),
        "{}",
        stderr(&out)
    );
    assert!(vpn.interrupt().success());

    // An empty known_hosts of the user's, and --accept-new-host-key: the jump host's key is
    // recorded there, and the file stays the user's.
    std::fs::write(&kh, "").unwrap();
    let accept = tb.up_args_without_auth(None, &[VPC], &["--accept-new-host-key"]);
    let vpn = tb.start_cmd(tb.mse_vpn_with_env(&env, &[], &strs(&accept)));
    tb.assert_curl_index();
    assert!(vpn.interrupt().success());
    let recorded = std::fs::read_to_string(&kh).unwrap();
    let host_key = std::fs::read_to_string(tb.dir.join("ssh_host_ed25519_key.pub")).unwrap();
    let host_key: Vec<&str> = host_key.split_whitespace().take(2).collect();
    assert!(
        recorded.contains(&format!("{} {}", tb.jump_addr, host_key.join(" "))),
        "{recorded}"
    );
    let meta = std::fs::metadata(&kh).unwrap();
    assert_eq!(
        (meta.uid(), meta.gid()),
        (user.uid, user.gid),
        "known_hosts owner"
    );
    // Recorded means known: the next start needs no flag.
    let vpn = tb.start_cmd(tb.mse_vpn_with_env(&env, &[], &strs(&args)));
    assert!(vpn.interrupt().success());

    // A user with no ~/.ssh at all (a key passed with -i): the directory and known_hosts
    // that --accept-new-host-key creates belong to the user, ~/.ssh with mode 0700, as
    // OpenSSH expects.
    std::fs::remove_dir_all(&ssh_dir).unwrap();
    let outside_key = s(&tb.dir.join("id_ed25519"));
    let accept =
        tb.up_args_without_auth(None, &[VPC], &["-i", &outside_key, "--accept-new-host-key"]);
    let vpn = tb.start_cmd(tb.mse_vpn_with_env(&env, &[], &strs(&accept)));
    tb.assert_curl_index();
    assert!(vpn.interrupt().success());
    let dir_meta = std::fs::metadata(&ssh_dir).expect("~/.ssh created");
    assert_eq!(
        (dir_meta.uid(), dir_meta.gid()),
        (user.uid, user.gid),
        "~/.ssh owner"
    );
    assert_eq!(dir_meta.permissions().mode() & 0o777, 0o700, "~/.ssh mode");
    let meta = std::fs::metadata(&kh).expect("known_hosts created");
    assert_eq!(
        (meta.uid(), meta.gid()),
        (user.uid, user.gid),
        "known_hosts owner"
    );
    assert_eq!(tb.snapshot(), before);
}
