//! End-to-end tests of connecting "the way ssh does": the invoking user's `~/.ssh/config`
//! (alias, HostName, Port, User, IdentityFile, UserKnownHostsFile, Include) under sudo,
//! `ProxyJump` through a hop namespace the laptop cannot bypass, password login from a file
//! and from a terminal prompt, and refusals that name the file and line at fault.
//!
//! Which login sshd accepted is read from its own log, and which port carried it from the
//! jump host's socket table, so a test cannot pass by some other path getting in.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::harness::{TestUser, curl_within, s, strs};
use crate::harness::{Testbed, Vpn, fingerprint, keygen, pub_path, stderr, stdout};

/// The CIDR every test routes.
const VPC: &str = "10.0.0.0/16";

/// The laptop's snapshot once it stops changing (the kernel adds the link-local IPv6
/// address of a fresh link a moment after it comes up).
fn settled_snapshot(tb: &Testbed) -> String {
    let mut last = tb.snapshot();
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(200));
        let now = tb.snapshot();
        if now == last && now.contains("fe80::") {
            return now;
        }
        last = now;
    }
    last
}

/// Lines of a log after byte `mark` that contain `needle`.
fn log_lines(log: &str, mark: usize, needle: &str) -> Vec<String> {
    log.get(mark..)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_owned)
        .collect()
}

/// The `ssh-ed25519 AAAA...` part of a host's public key file.
fn host_key(tb: &Testbed, file: &str) -> String {
    let key = std::fs::read_to_string(tb.dir.join(file)).expect("host key");
    key.split_whitespace().take(2).collect::<Vec<_>>().join(" ")
}

/// `mse-vpn ARGS` in the laptop namespace on behalf of `user` (as sudo runs it).
fn as_user(tb: &Testbed, user: &TestUser, wrapper: &[&str], args: &[String]) -> Command {
    let env = user.sudo_env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    tb.mse_vpn_with_env(&env, wrapper, &strs(args))
}

/// Established TCP connections to the jump host's sshd on `port`, seen from the jump host.
fn sshd_connections(tb: &Testbed, port: u16) -> usize {
    connections_in(tb, "jump", port)
}

/// Established TCP connections to port `port` in namespace NAME-`ns`.
fn connections_in(tb: &Testbed, ns: &str, port: u16) -> usize {
    let out = tb
        .cmd_in(
            &format!("{}-{ns}", tb.name),
            &[
                "ss",
                "-Htn",
                "state",
                "established",
                &format!("( sport = :{port} )"),
            ],
        )
        .output()
        .expect("ss");
    stdout(&out)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count()
}

/// Writes `text` as this testbed's ssh config file (mode 600, as ssh requires); its path.
fn write_ssh_config(tb: &Testbed, text: &str) -> String {
    let config = tb.dir.join("ssh_config");
    std::fs::write(&config, text).unwrap();
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600)).unwrap();
    s(&config)
}

/// A `Host vpc` block for the jump host: root, `key`, the testbed's known_hosts, then
/// `extra` lines.
fn vpc_host(tb: &Testbed, key: &Path, extra: &str) -> String {
    format!(
        "Host vpc\n  HostName {}\n  User root\n  IdentityFile {}\n  UserKnownHostsFile {}\n{extra}",
        tb.jump_addr,
        s(key),
        s(&tb.dir.join("known_hosts"))
    )
}

/// `up --cidr CIDR --proxy vpc -F CONFIG --tun TUN -v`.
fn up_via_config(tb: &Testbed, cidr: &str, config: &str) -> Vec<String> {
    [
        "up",
        "--cidr",
        cidr,
        "--proxy",
        "vpc",
        "-F",
        config,
        "--tun",
        &tb.tun(),
        "-v",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

#[test]
fn under_sudo_an_alias_resolves_through_the_users_ssh_config() {
    if crate::harness::skip_unless_root() {
        return;
    }
    let tb = Testbed::up("cf1", &["--with", "nginx", "--extra-port", "2222"]);
    let before = settled_snapshot(&tb);
    let user = TestUser::create("mvcfg1", None);
    let ssh = user.home.join(".ssh");
    // A key under a name ssh would not try by itself: only IdentityFile can name it.
    let key = ssh.join("work_key");
    user.write(&key, "", 0o600);
    keygen(&key, "", &["-t", "ed25519"]);
    user.own(&key, 0o600);
    tb.authorize(&pub_path(&key));
    // The jump host's key recorded for port 2222, in a known_hosts file named by the config
    // (with a %h token); the user's default known_hosts stays empty.
    user.write(
        &ssh.join(format!("kh_{}", tb.jump_addr)),
        &format!(
            "[{}]:2222 {}\n",
            tb.jump_addr,
            host_key(&tb, "ssh_host_ed25519_key.pub")
        ),
        0o600,
    );
    user.write(&ssh.join("known_hosts"), "", 0o600);
    user.write(
        &ssh.join("config"),
        "# the alias lives in an included file\nInclude conf.d/*.conf\n\nHost *\n  Port 22\n  User nobody\n",
        0o600,
    );
    let alias = format!(
        "Host other\n  User wrong\nHost vpc-jump !nothing\n  HostName {}\n  Port 2222\n  User root\n  IdentityFile ~/.ssh/work_key\n  UserKnownHostsFile ~/.ssh/kh_%h\n  ServerAliveInterval 3\n",
        tb.jump_addr
    );
    user.write(&ssh.join("conf.d/50-vpc.conf"), &alias, 0o600);

    let args: Vec<String> = [
        "up",
        "--cidr",
        VPC,
        "--proxy",
        "vpc-jump",
        "--tun",
        &tb.tun(),
        "-v",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mark = tb.sshd_log().len();
    let vpn = tb.start_cmd(as_user(&tb, &user, &[], &args));
    tb.assert_curl_index();
    let fp = fingerprint(&pub_path(&key));
    let logins = log_lines(&tb.sshd_log(), mark, "Accepted publickey");
    assert!(!logins.is_empty(), "{}", tb.sshd_log());
    for l in &logins {
        assert!(
            l.contains("for root from") && l.contains(&fp),
            "expected root with the config's key {fp}: {l}"
        );
    }
    assert!(
        sshd_connections(&tb, 2222) >= 1,
        "no connection on port 2222"
    );
    assert_eq!(sshd_connections(&tb, 22), 0, "a connection went to port 22");
    assert!(
        vpn.stdout()
            .contains(&format!("via root@{}:2222", tb.jump_addr)),
        "{}",
        vpn.stdout()
    );
    assert!(vpn.interrupt().success());
    assert_eq!(tb.snapshot(), before);

    // The command line wins over the config: `:22` and `--known-hosts` (whose port-22 line
    // is the testbed's) take the session to port 22.
    let mut over = args.clone();
    over[4] = "vpc-jump:22".into();
    over.extend(["--known-hosts".into(), s(&tb.dir.join("known_hosts"))]);
    let vpn = tb.start_cmd(as_user(&tb, &user, &[], &over));
    tb.assert_curl_index();
    assert!(sshd_connections(&tb, 22) >= 1, "no connection on port 22");
    assert_eq!(sshd_connections(&tb, 2222), 0);
    assert!(vpn.interrupt().success());

    // Port 22 without --known-hosts: the config's known_hosts file has the key for port
    // 2222 only, so the key is unknown: refused, exit status 4.
    let mut unknown = args.clone();
    unknown[4] = "vpc-jump:22".into();
    let mut vpn = Vpn::spawn(as_user(&tb, &user, &[], &unknown));
    assert_eq!(
        vpn.wait_exit(Duration::from_secs(20)).code(),
        Some(4),
        "{}",
        vpn.stderr()
    );
    assert!(vpn.stderr().contains("is not known"), "{}", vpn.stderr());

    // A bad entry in the included file: refused before anything changes, naming the file
    // and the line.
    let bad = alias.replace("Port 2222", "Port twenty-two");
    user.write(&ssh.join("conf.d/50-vpc.conf"), &bad, 0o600);
    let mut vpn = Vpn::spawn(as_user(&tb, &user, &[], &args));
    let status = vpn.wait_exit(Duration::from_secs(20));
    assert_eq!(
        status.code(),
        Some(2),
        "a configuration mistake exits with 2"
    );
    assert!(
        vpn.stderr()
            .contains("50-vpc.conf:5: bad value 'twenty-two' for port"),
        "{}",
        vpn.stderr()
    );
    // A ProxyCommand of the user's config, with its tokens (HostName and Port 2222), run as
    // the user.
    let pc = format!("{alias}  ProxyCommand socat - TCP:%h:%p\n");
    user.write(&ssh.join("conf.d/50-vpc.conf"), &pc, 0o600);
    let vpn = tb.start_cmd(as_user(&tb, &user, &[], &args));
    tb.assert_curl_index();
    // One command per connection of the pool (the others follow the first one).
    let socats = || {
        let out = tb.sh(
            5,
            &format!(
                "ps -o user=,args= -C socat | grep -c '^mvcfg1 .*socat - TCP:{}:2222$'",
                tb.jump_addr
            ),
        );
        stdout(&out).trim().to_owned()
    };
    let start = Instant::now();
    while socats() != "4" && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(socats(), "4");
    assert!(vpn.interrupt().success());
    assert_eq!(tb.snapshot(), before);
}

#[test]
fn proxy_jump_reaches_a_jump_host_the_laptop_cannot_route_to() {
    if crate::harness::skip_unless_root() {
        return;
    }
    let tb = Testbed::up("cf2", &["--with", "nginx", "--hop"]);
    let before = settled_snapshot(&tb);
    let hop_addr = std::fs::read_to_string(tb.dir.join("hop_addr"))
        .unwrap()
        .trim()
        .to_owned();
    // The laptop has no route to the jump host: only the hop gets there.
    let out = tb.sh(5, &format!("exec 3<>/dev/tcp/{}/22", tb.jump_addr));
    assert!(
        !out.status.success(),
        "the laptop reaches the jump host directly"
    );

    // Each host's key in a known_hosts file of its own, as the config names them: the hop's
    // key is checked against the hop's file, not the jump host's.
    let all = std::fs::read_to_string(tb.dir.join("known_hosts")).unwrap();
    let (hop_lines, vpc_lines): (Vec<&str>, Vec<&str>) = all
        .lines()
        .partition(|l| l.starts_with(&format!("{hop_addr} ")));
    assert_eq!(hop_lines.len(), 1, "{all}");
    let (kh_hop, kh_vpc) = (tb.dir.join("kh_hop"), tb.dir.join("kh_vpc"));
    std::fs::write(&kh_hop, hop_lines.join("\n") + "\n").unwrap();
    std::fs::write(&kh_vpc, vpc_lines.join("\n") + "\n").unwrap();
    let config = write_ssh_config(
        &tb,
        &format!(
            "Host bastion\n  HostName {hop_addr}\n  UserKnownHostsFile {}\nHost vpc\n  HostName {}\n  ProxyJump bastion\n  UserKnownHostsFile {}\nHost *\n  User root\n  IdentityFile {}\n  UserKnownHostsFile {}\n",
            s(&kh_hop),
            tb.jump_addr,
            s(&kh_vpc),
            s(&tb.dir.join("id_ed25519")),
            s(&tb.dir.join("known_hosts"))
        ),
    );
    let args = up_via_config(&tb, VPC, &config);
    let vpn = tb.start_cmd(tb.mse_vpn_with_env(&[], &[], &strs(&args)));
    tb.assert_curl_index();
    let hop_log = std::fs::read_to_string(tb.dir.join("hop_sshd.log")).unwrap_or_default();
    assert!(
        hop_log.contains("Accepted publickey for root"),
        "the hop saw no login:\n{hop_log}"
    );
    assert!(
        tb.sshd_log()
            .contains(&format!("Accepted publickey for root from {}", "172.30.")),
        "the jump host's logins should come from the hop's side:\n{}",
        tb.sshd_log()
    );

    // The jump host's sshd dies and comes back: the supervisors redo the whole chain.
    tb.control("sshd-kill");
    tb.control("sshd-start");
    assert!(
        curl_within(&tb, Duration::from_secs(20)),
        "no traffic after the jump host came back:\n{}",
        vpn.stderr()
    );
    // The reconnects redid the chain and let the old hop connections go: one hop
    // connection per pool connection (4 by default), not one more per reconnect.
    let start = Instant::now();
    while connections_in(&tb, "hop", 22) != 4 && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(connections_in(&tb, "hop", 22), 4, "hop connections leak");
    assert!(vpn.interrupt().success());
    assert_eq!(tb.snapshot(), before);

    // The same chain from the command line (-J), with the hop's address unknown to the
    // config: the flag replaces ProxyJump.
    let mut flags = args.clone();
    flags[4] = format!("root@{}", tb.jump_addr);
    flags.extend(["-J".into(), format!("root@{hop_addr}:22")]);
    let vpn = tb.start_cmd(tb.mse_vpn_with_env(&[], &[], &strs(&flags)));
    tb.assert_curl_index();
    assert!(vpn.interrupt().success());

    // doctor follows the same chain: every check passes, the reverse-forwarding probe
    // included (it must target the jump host, not the hop).
    let mut doctor = flags.clone();
    doctor[0] = "doctor".into();
    let out = tb
        .mse_vpn_with_env(&[], &[], &strs(&doctor))
        .output()
        .expect("doctor");
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(
        stdout(&out).contains(&format!("TCP {hop_addr}:22 answers"))
            && stdout(&out).contains("ok    reverse forwarding"),
        "{}",
        stdout(&out)
    );

    // A hop that cannot reach the next host: a clear error naming both.
    let mut bad = args.clone();
    bad[4] = "root@10.0.0.99".into();
    bad.extend([
        "-J".into(),
        format!("root@{hop_addr}"),
        "--connect-timeout".into(),
        "3".into(),
    ]);
    let mut vpn = Vpn::spawn(tb.mse_vpn_with_env(&[], &[], &strs(&bad)));
    assert_eq!(
        vpn.wait_exit(Duration::from_secs(30)).code(),
        Some(5),
        "{}",
        vpn.stderr()
    );
    assert!(
        vpn.stderr().contains(&format!("hop {hop_addr}:22")) && vpn.stderr().contains("10.0.0.99"),
        "{}",
        vpn.stderr()
    );
    assert_eq!(tb.snapshot(), before);
}

#[test]
fn password_login_from_a_private_file_or_the_terminal() {
    if crate::harness::skip_unless_root() {
        return;
    }
    let tb = Testbed::up("cf3", &["--with", "nginx", "--password-auth"]);
    let before = settled_snapshot(&tb);
    let password = "Tr0ub4dor&3 horse";
    let user = TestUser::create("mvpw3", Some(password));
    let kh = s(&tb.dir.join("known_hosts"));
    let args = tb.up_args_without_auth(Some(user.name), &[VPC], &["--known-hosts", &kh]);

    // From a file, mode 600: logged in with the password, traffic flows.
    let file = tb.dir.join("password");
    std::fs::write(&file, format!("{password}\n")).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut with_file = args.clone();
    with_file.extend(["--password-file".into(), s(&file)]);
    let mark = tb.sshd_log().len();
    let vpn = tb.start_cmd(tb.mse_vpn_with_env(&[], &[], &strs(&with_file)));
    tb.assert_curl_index();
    let logins = log_lines(&tb.sshd_log(), mark, "Accepted password");
    assert!(
        logins
            .iter()
            .any(|l| l.contains(&format!("for {} from", user.name))),
        "{}",
        tb.sshd_log()
    );
    assert!(vpn.interrupt().success());

    // Readable by others: refused before connecting, saying chmod 600.
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mark = tb.sshd_log().len();
    let (status, err) = tb.up_fails(&strs(&with_file));
    assert_eq!(status.code(), Some(3), "{err}");
    assert!(
        err.contains("chmod 600") && err.contains(&s(&file)),
        "{err}"
    );
    assert!(log_lines(&tb.sshd_log(), mark, "Accepted").is_empty());

    // A wrong password: a fatal authentication error that says so.
    std::fs::write(&file, "not it\n").unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (status, err) = tb.up_fails(&strs(&with_file));
    assert_eq!(
        status.code(),
        Some(3),
        "an authentication failure exits with 3: {err}"
    );
    assert!(
        err.contains("password for mvpw3@") && err.contains("refused"),
        "{err}"
    );
    assert_eq!(tb.snapshot(), before);

    // No file: asked once on the terminal (no echo), and the answer serves every connection
    // of the pool and the reconnects.
    let vpn = tb.on_pty("'s password: ", &[password], 0, &strs(&args));
    vpn.wait_up(Duration::from_secs(20));
    tb.assert_curl_index();
    let prompt = format!("{}@{}:22's password: ", user.name, tb.jump_addr);
    assert_eq!(vpn.stdout().matches(&prompt).count(), 1, "{}", vpn.stdout());
    tb.control("sshd-kill");
    tb.control("sshd-start");
    assert!(
        curl_within(&tb, Duration::from_secs(15)),
        "no traffic after the jump host came back:\n{}",
        vpn.stdout()
    );
    assert_eq!(
        vpn.stdout().matches(&prompt).count(),
        1,
        "asked again: {}",
        vpn.stdout()
    );
    assert!(
        !vpn.stdout().contains(password),
        "password echoed or logged"
    );
    assert!(vpn.interrupt().success());
    assert_eq!(tb.snapshot(), before);

    // A typo at the prompt is asked again (as ssh does), then the right one logs in.
    let vpn = tb.on_pty("'s password: ", &["not it", password], 0, &strs(&args));
    vpn.wait_up(Duration::from_secs(20));
    tb.assert_curl_index();
    assert_eq!(vpn.stdout().matches(&prompt).count(), 2, "{}", vpn.stdout());
    assert!(
        vpn.stdout()
            .contains("Permission denied, please try again."),
        "{}",
        vpn.stdout()
    );
    assert!(vpn.interrupt().success());
    // Three wrong answers: refused with exit status 3, nothing left behind.
    let mut vpn = tb.on_pty("'s password: ", &["a", "b", "c"], 0, &strs(&args));
    let status = vpn.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(3), "{}{}", vpn.stdout(), vpn.stderr());
    assert_eq!(vpn.stdout().matches(&prompt).count(), 3, "{}", vpn.stdout());
    assert_eq!(tb.snapshot(), before);
}

/// The `status --json` facts that make a session what it is: jump host, TUN, routes, pool.
fn session_facts(tb: &Testbed) -> (String, String, String, String) {
    let out = tb.mse_vpn(&["status", "--json"]).output().expect("status");
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("status json");
    let s = &v[0];
    (
        s["jump"].to_string(),
        s["tun"].to_string(),
        s["routes"].to_string(),
        s["connections"].to_string(),
    )
}

/// The laptop's routes and the TUN's MTU (the snapshot without link indexes and random
/// link-local addresses, which differ between two runs of the same session).
fn routes_and_mtu(tb: &Testbed) -> String {
    let out = tb.sh(
        5,
        &format!("ip route show table all; ip -6 route show; ip -o link show dev {} | grep -o 'mtu [0-9]*'", tb.tun()),
    );
    stdout(&out)
        .lines()
        .filter(|l| !l.contains("fe80::") || !l.starts_with("local"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn a_profile_brings_up_the_same_session_as_its_flags() {
    if crate::harness::skip_unless_root() {
        return;
    }
    let tb = Testbed::up("cf4", &["--with", "nginx"]);
    let before = settled_snapshot(&tb);
    let user = TestUser::create("mvcfg4", None);
    let key = s(&tb.dir.join("id_ed25519"));
    let kh = s(&tb.dir.join("known_hosts"));
    let flags: Vec<String> = [
        "up",
        "--proxy",
        &format!("root@{}", tb.jump_addr),
        "--cidr",
        VPC,
        "--exclude",
        "10.0.9.0/24",
        "-i",
        &key,
        "--known-hosts",
        &kh,
        "--tun",
        &tb.tun(),
        "--connections",
        "3",
        "--mtu",
        "9000",
        "-v",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let vpn = tb.start_cmd(as_user(&tb, &user, &[], &flags));
    tb.assert_curl_index();
    let by_flags = (session_facts(&tb), routes_and_mtu(&tb));
    assert!(vpn.interrupt().success());

    let profile_file = user.home.join(".config/mse-vpn/config.toml");
    let profile = format!(
        "# written by the cf4 test\n[profile.other]\ntun = \"nope\"\n\n[profile.vpc]\nproxy = \"root@{}\"\ncidrs = [\"{VPC}\"]\nexcludes = [\"10.0.9.0/24\"]\nidentity = [\"{key}\"]\nknown_hosts = \"{kh}\"\ntun = \"{}\"\nconnections = 3\nmtu = 9000\n",
        tb.jump_addr,
        tb.tun()
    );
    user.write(&profile_file, &profile, 0o600);
    let by_name: Vec<String> = ["up", "vpc", "-v"].iter().map(|s| s.to_string()).collect();
    let vpn = tb.start_cmd(as_user(&tb, &user, &[], &by_name));
    tb.assert_curl_index();
    assert_eq!((session_facts(&tb), routes_and_mtu(&tb)), by_flags);
    assert!(vpn.interrupt().success());

    // A flag given with the profile wins over the profile's value.
    let mut over = by_name.clone();
    over.extend(["--mtu".into(), "1500".into()]);
    let vpn = tb.start_cmd(as_user(&tb, &user, &[], &over));
    let link = tb.on_laptop(5, &["ip", "link", "show", &tb.tun()]);
    assert!(stdout(&link).contains("mtu 1500"), "{}", stdout(&link));
    assert!(vpn.interrupt().success());
    assert_eq!(tb.snapshot(), before);

    // A bad entry: refused with the file and the line, exit status 2; `config check` says
    // the same.
    user.write(
        &profile_file,
        &profile.replace("connections = 3", "conections = 3"),
        0o600,
    );
    let mut vpn = Vpn::spawn(as_user(&tb, &user, &[], &by_name));
    let status = vpn.wait_exit(Duration::from_secs(20));
    let want = format!("{}:12: ", profile_file.display());
    assert_eq!(status.code(), Some(2), "{}", vpn.stderr());
    assert!(
        vpn.stderr().contains(&want) && vpn.stderr().contains("conections"),
        "{}",
        vpn.stderr()
    );
    let check_args: Vec<String> = vec!["config".into(), "check".into()];
    let out = as_user(&tb, &user, &[], &check_args).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains(&want), "{}", stderr(&out));
    // An unknown profile name lists the ones that exist.
    user.write(&profile_file, &profile, 0o600);
    let mut vpn = Vpn::spawn(as_user(&tb, &user, &[], &["up".into(), "nosuch".into()]));
    assert_eq!(vpn.wait_exit(Duration::from_secs(20)).code(), Some(2));
    assert!(
        vpn.stderr().contains("defined: other, vpc"),
        "{}",
        vpn.stderr()
    );
    assert_eq!(tb.snapshot(), before);
}

#[test]
fn the_jump_hosts_configured_address_stays_out_of_the_tunnel() {
    if crate::harness::skip_unless_root() {
        return;
    }
    // The jump host at 10.99.0.1, inside the routed 10.0.0.0/8, known only by its alias: the
    // route plan must keep the config's HostName out of the TUN, or the SSH connection would
    // try to run through itself.
    let tb = Testbed::up("cf5", &["--with", "nginx", "--jump-in-cidr"]);
    let before = settled_snapshot(&tb);
    let config = write_ssh_config(&tb, &vpc_host(&tb, &tb.dir.join("id_ed25519"), ""));
    let args = up_via_config(&tb, "10.0.0.0/8", &config);
    let vpn = tb.start_cmd(tb.mse_vpn_with_env(&[], &[], &strs(&args)));
    tb.assert_curl_index();
    let route = tb.on_laptop(5, &["ip", "route", "get", &tb.jump_addr]);
    assert!(
        !stdout(&route).contains(&tb.tun()),
        "the jump host's address goes into the tunnel: {}",
        stdout(&route)
    );
    assert!(vpn.interrupt().success());
    assert_eq!(tb.snapshot(), before);
}

#[test]
fn identities_only_offers_just_the_agents_copy_of_the_configured_key() {
    if crate::harness::skip_unless_root() {
        return;
    }
    // sshd gives up after one refused key: offering any other agent key first would fail.
    let tb = Testbed::up("cf6", &["--with", "nginx"]);
    tb.edit_sshd_config("MaxSessions 100", "MaxSessions 100\nMaxAuthTries 1");
    let agent = crate::auth::Agent::start(tb.dir.join("agent.sock"));
    // First in the agent: a key the jump host does not know.
    let other = tb.dir.join("other_key");
    keygen(&other, "", &["-t", "ed25519"]);
    agent.add(&[&s(&other)]);
    // The configured key: encrypted on disk (no terminal to unlock it here), and in the agent.
    let key = tb.dir.join("work_key");
    keygen(&key, "sekrit", &["-t", "ed25519"]);
    tb.authorize(&pub_path(&key));
    let plain = tb.dir.join("work_key_plain");
    std::fs::copy(&key, &plain).unwrap();
    std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = Command::new("ssh-keygen")
        .args(["-p", "-q", "-P", "sekrit", "-N", "", "-f", &s(&plain)])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    agent.add(&[&s(&plain)]);
    let sock = s(&agent.socket);
    let run = |identities_only: bool| {
        let extra = if identities_only {
            "  IdentitiesOnly yes\n"
        } else {
            ""
        };
        let config = write_ssh_config(&tb, &vpc_host(&tb, &key, extra));
        let args = up_via_config(&tb, VPC, &config);
        Vpn::spawn(tb.mse_vpn_with_env(&[("SSH_AUTH_SOCK", &sock)], &[], &strs(&args)))
    };

    // Without IdentitiesOnly the agent's first key is offered, and sshd hangs up.
    let mut vpn = run(false);
    let status = vpn.wait_exit(Duration::from_secs(30));
    assert!(!status.success(), "{}", vpn.stderr());

    // With it, only the agent's copy of the configured key is offered: logged in with it,
    // and the encrypted file on disk never needed a passphrase.
    let mark = tb.sshd_log().len();
    let vpn = run(true);
    vpn.wait_up(Duration::from_secs(20));
    tb.assert_curl_index();
    let fp = fingerprint(&pub_path(&key));
    let logins = log_lines(&tb.sshd_log(), mark, "Accepted publickey for root");
    assert!(!logins.is_empty(), "{}", tb.sshd_log());
    assert!(logins.iter().all(|l| l.contains(&fp)), "{logins:?}");
    assert!(vpn.interrupt().success());
}

#[test]
fn a_proxy_command_carries_the_connection() {
    if crate::harness::skip_unless_root() {
        return;
    }
    let tb = Testbed::up("cf8", &["--with", "nginx"]);
    let before = settled_snapshot(&tb);
    let key = tb.dir.join("id_ed25519");
    let write_config = |command: &str| {
        write_ssh_config(
            &tb,
            &vpc_host(&tb, &key, &format!("  ProxyCommand {command}\n")),
        )
    };
    // The way netcat-style helpers are used: %h and %p are the jump host's.
    let config = write_config("socat - TCP:%h:%p");
    let args = up_via_config(&tb, VPC, &config);
    let args = strs(&args);
    let vpn = tb.start_cmd(tb.mse_vpn_with_env(&[], &[], &args));
    tb.assert_curl_index();
    // One command per SSH connection of the pool, and nothing else dialled the jump host.
    let pattern = format!("socat - TCP:{}:22", tb.jump_addr);
    let count = |tb: &Testbed| {
        stdout(&tb.sh(5, &format!("pgrep -c -f '^{pattern}$' || true")))
            .trim()
            .to_owned()
    };
    // The pool's other connections follow the first one.
    let start = Instant::now();
    while count(&tb) != "4" && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(count(&tb), "4");
    assert!(vpn.interrupt().success());
    assert_eq!(count(&tb), "0", "the commands end with their connections");
    assert_eq!(tb.snapshot(), before);

    // Under sudo, the command runs as the invoking user, never as root.
    let user = TestUser::create("mvpc8", None);
    let mark = std::env::temp_dir().join("mse-vpn-cf8-proxy-user");
    let _ = std::fs::remove_file(&mark);
    write_config(&format!(
        "sh -c 'id -un > {}; exec socat - TCP:%h:%p'",
        mark.display()
    ));
    let env = user.sudo_env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let vpn = tb.start_cmd(tb.mse_vpn_with_env(&env, &[], &args));
    tb.assert_curl_index();
    assert!(vpn.interrupt().success());
    assert_eq!(
        std::fs::read_to_string(&mark).unwrap_or_default().trim(),
        "mvpc8"
    );
    let _ = std::fs::remove_file(&mark);

    // A command that cannot reach the jump host: a clear failure, nothing left behind.
    write_config("socat - TCP:%h:2");
    let mut vpn = Vpn::spawn(tb.mse_vpn_with_env(&[], &[], &args));
    let status = vpn.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(5), "{}", vpn.stderr());
    let err = vpn.stderr();
    assert!(
        err.contains("Connection refused"),
        "the command's own message: {err}"
    );
    assert!(
        err.contains(&format!(
            "mse-vpn: the ProxyCommand `socat - TCP:{}:2` ended before an SSH connection",
            tb.jump_addr
        )),
        "{err}"
    );
    assert_eq!(tb.snapshot(), before);
}

#[test]
fn a_match_block_of_the_users_config_sets_the_login_and_the_key_under_sudo() {
    if crate::harness::skip_unless_root() {
        return;
    }
    let tb = Testbed::up("cf9", &["--with", "nginx"]);
    let before = settled_snapshot(&tb);
    let user = TestUser::create("mvmatch1", None);
    let ssh = user.home.join(".ssh");
    // The key only the Match block names (ssh would not try it by itself).
    let key = ssh.join("match_key");
    user.write(&key, "", 0o600);
    keygen(&key, "", &["-t", "ed25519"]);
    user.own(&key, 0o600);
    tb.authorize(&pub_path(&key));
    user.write(
        &ssh.join("kh_match"),
        &format!(
            "{} {}\n",
            tb.jump_addr,
            host_key(&tb, "ssh_host_ed25519_key.pub")
        ),
        0o600,
    );
    // As corporate configs do: the alias names the host, a Match block on the resolved host
    // (with an `exec` test that holds only when ssh runs as the user, not as root) sets the
    // login and the key. Without Match the login would be the user's own name, no key.
    user.write(
        &ssh.join("config"),
        &format!(
            "Host corp-jump\n  HostName {addr}\n  UserKnownHostsFile ~/.ssh/kh_match\n\
             Match host {addr} exec \"test $(id -u) -eq {uid}\"\n  User root\n  IdentityFile %d/.ssh/match_key\n",
            addr = tb.jump_addr,
            uid = user.uid
        ),
        0o600,
    );
    let args: Vec<String> = [
        "up",
        "--cidr",
        VPC,
        "--proxy",
        "corp-jump",
        "--tun",
        &tb.tun(),
        "-v",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mark = tb.sshd_log().len();
    let vpn = tb.start_cmd(as_user(&tb, &user, &[], &args));
    tb.assert_curl_index();
    let fp = fingerprint(&pub_path(&key));
    let logins = log_lines(&tb.sshd_log(), mark, "Accepted publickey");
    assert!(!logins.is_empty(), "{}", tb.sshd_log());
    for l in &logins {
        assert!(
            l.contains("for root from") && l.contains(&fp),
            "expected root with the Match block's key {fp}: {l}"
        );
    }
    assert!(
        !vpn.stderr().contains("Match blocks are not supported"),
        "{}",
        vpn.stderr()
    );
    assert!(vpn.interrupt().success());
    assert_eq!(tb.snapshot(), before);
}
