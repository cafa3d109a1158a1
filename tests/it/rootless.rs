//! `mse-vpn run --cidr ... --proxy ... -- APP` without root (issue 24): mse-vpn and its app
//! run as an ordinary user the test creates; the app gets a network namespace of its own and
//! reaches the VPC's servers through the tunnel, while the laptop namespace (its links,
//! addresses, routes, rules and /etc/resolv.conf) stays byte-identical before, during and
//! after, after a `kill -9` of mse-vpn or of the app too. The failures an ordinary user can
//! meet (user namespaces forbidden, /dev/net/tun closed) are shown with their fix; each is
//! made in a namespace of the test's own, never by changing the machine's settings.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::frameworks::{App, CALLS, JUMP, ZK, assert_all_reached, start_provider, tail, vpc_ns};
use crate::harness::{TestUser, Testbed, Vpn, keygen, pub_path, s, stderr, stdout, wait_for_file};

/// The CIDR every test routes.
const VPC: &str = "10.0.0.0/16";

/// `run`'s options for a consumer resolving the VPC's private zone through the tunnel.
const CONSUMER_WITH_SPLIT_DNS: [&str; 5] = [
    "--subscribe-only",
    "--dns-domain",
    "internal",
    "--dns",
    "10.0.0.13",
];

/// `/dev/net/tun`, mode 0600 on these machines (FACTS.md).
const TUN_DEV: &str = "/dev/net/tun";

/// While any test holds one, `/dev/net/tun` is open to everyone (0666); the last one to end
/// puts the original mode back. Tests of other checkouts may run at once: a lock file, held
/// shared by each user of the device, says who is last, and keeps the original mode.
struct TunOpenToAll {
    lock: Option<nix::fcntl::Flock<std::fs::File>>,
}

impl TunOpenToAll {
    const LOCK: &str = "/tmp/mse-vpn-test-tun-mode.lock";

    fn new() -> TunOpenToAll {
        use nix::fcntl::{Flock, FlockArg};
        use std::io::{Read, Seek, Write};
        use std::os::unix::fs::PermissionsExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(Self::LOCK)
            .expect("open the TUN mode lock");
        let mut lock = Flock::lock(file, FlockArg::LockExclusive).expect("lock");
        let mut text = String::new();
        lock.read_to_string(&mut text).expect("read the lock");
        if text.trim().is_empty() {
            // The first user: the mode to put back.
            let mode = std::fs::metadata(TUN_DEV)
                .expect(TUN_DEV)
                .permissions()
                .mode()
                & 0o7777;
            lock.rewind().unwrap();
            write!(lock, "{mode:o}").unwrap();
        }
        std::fs::set_permissions(TUN_DEV, std::fs::Permissions::from_mode(0o666))
            .expect("chmod /dev/net/tun");
        lock.relock(FlockArg::LockShared).expect("share the lock");
        TunOpenToAll { lock: Some(lock) }
    }
}

impl Drop for TunOpenToAll {
    fn drop(&mut self) {
        use nix::fcntl::FlockArg;
        use std::io::{Read, Seek};
        use std::os::unix::fs::PermissionsExt;
        let Some(mut lock) = self.lock.take() else {
            return;
        };
        // Exclusive only when no other test holds it: the last one restores.
        if lock.relock(FlockArg::LockExclusiveNonblock).is_ok() {
            let mut text = String::new();
            let _ = lock.rewind();
            let _ = lock.read_to_string(&mut text);
            if let Ok(mode) = u32::from_str_radix(text.trim(), 8) {
                let _ = std::fs::set_permissions(TUN_DEV, std::fs::Permissions::from_mode(mode));
            }
            let _ = lock.set_len(0);
        }
    }
}

/// A test's ordinary user: a login with a key the jump host accepts, its known_hosts, and a
/// copy of mse-vpn it can run.
struct Ordinary {
    user: TestUser,
    key: PathBuf,
    known_hosts: PathBuf,
    bin: String,
}

impl Ordinary {
    /// The user `NAME` (after this checkout's testbed prefix, so that two checkouts never
    /// share it).
    fn new(tb: &Testbed, name: &str) -> Ordinary {
        let full = format!(
            "{}{name}",
            std::env::var("MSE_VPN_TB_PREFIX").unwrap_or_default()
        );
        let user = TestUser::create(Box::leak(full.into_boxed_str()), None);
        let ssh_dir = user.home.join(".ssh");
        std::fs::create_dir_all(&ssh_dir).unwrap();
        user.own(&ssh_dir, 0o700);
        let key = ssh_dir.join("id_ed25519");
        keygen(&key, "", &["-t", "ed25519"]);
        user.own(&key, 0o600);
        user.own(&pub_path(&key), 0o644);
        tb.authorize(&pub_path(&key));
        let known_hosts = ssh_dir.join("known_hosts");
        std::fs::copy(tb.dir.join("known_hosts"), &known_hosts).unwrap();
        user.own(&known_hosts, 0o600);
        // A copy other users can run wherever the checkout lives.
        let bin = tb.dir.join("mse-vpn-rootless");
        std::fs::copy(crate::harness::bin(), &bin).expect("copy the binary");
        Ordinary {
            user,
            key,
            known_hosts,
            bin: s(&bin),
        }
    }

    /// What runs a command as this user: no root, no capabilities, a PATH without sbin, no
    /// state directory named (the user's own is used).
    fn as_user(&self) -> Vec<String> {
        [
            "setpriv",
            "--reuid",
            &self.user.uid.to_string(),
            "--regid",
            &self.user.gid.to_string(),
            "--clear-groups",
            "--inh-caps=-all",
            "env",
            "-u",
            "MSE_VPN_STATE_DIR",
            "-u",
            "XDG_RUNTIME_DIR",
            "-u",
            "SUDO_USER",
            &format!("HOME={}", s(&self.user.home)),
            &format!("USER={}", self.user.name),
            "PATH=/usr/local/bin:/usr/bin:/bin",
        ]
        .iter()
        .map(|a| a.to_string())
        .collect()
    }

    /// `argv` as this user in the laptop namespace, from its home.
    fn cmd(&self, tb: &Testbed, argv: &[&str]) -> Command {
        let prefix = self.as_user();
        let mut full: Vec<&str> = prefix.iter().map(String::as_str).collect();
        full.extend_from_slice(argv);
        let mut c = tb.cmd_in(&tb.lap(), &full);
        c.current_dir(&self.user.home);
        c
    }

    /// `mse-vpn ARGS` as this user.
    fn mse_vpn(&self, tb: &Testbed, args: &[&str]) -> Command {
        let mut argv = vec![self.bin.as_str()];
        argv.extend_from_slice(args);
        self.cmd(tb, &argv)
    }

    /// The session options: the VPC, the jump host, this user's key and known_hosts.
    fn session_args(&self, tb: &Testbed) -> Vec<String> {
        [
            "--cidr",
            VPC,
            "--proxy",
            &format!("root@{}", tb.jump_addr),
            "-i",
            &s(&self.key),
            "--known-hosts",
            &s(&self.known_hosts),
            // No ssh config: in the test's own user namespace, root's would be unreadable.
            "-F",
            "none",
        ]
        .iter()
        .map(|a| a.to_string())
        .collect()
    }

    /// `mse-vpn run SESSION EXTRA -- sh -c SCRIPT` as this user, started.
    fn run_app(&self, tb: &Testbed, extra: &[&str], script: &str) -> Vpn {
        let mut args: Vec<String> = vec!["run".into(), "-v".into()];
        args.extend(self.session_args(tb));
        args.extend(extra.iter().map(|a| a.to_string()));
        args.extend(["--", "sh", "-c", script].iter().map(|a| a.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Vpn::spawn(self.mse_vpn(tb, &args))
    }

    /// A file in the user's home (the app signals through it).
    fn file(&self, name: &str) -> PathBuf {
        self.user.home.join(name)
    }

    /// Where this user's `run` sessions keep their sockets when nothing else is said.
    fn state_dir(&self) -> PathBuf {
        std::env::temp_dir().join(format!("mse-vpn-{}", self.user.uid))
    }
}

impl Drop for Ordinary {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(self.state_dir());
    }
}

/// The laptop namespace as mse-vpn must leave it: links, addresses, routes, rules, and the
/// bytes of its /etc/resolv.conf.
fn laptop_state(tb: &Testbed) -> String {
    let resolv = tb.sh(5, "cat /etc/resolv.conf");
    format!("{}\n--- resolv.conf\n{}", tb.snapshot(), stdout(&resolv))
}

/// The value of the app's output line `key=value`.
fn said(out: &str, key: &str) -> Option<String> {
    out.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .map(str::to_owned)
}

fn pid_alive(pid: i32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|st| {
            st.rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
        })
}

#[test]
fn an_ordinary_users_app_reaches_the_vpc_and_the_laptop_is_left_as_it_was() {
    if crate::harness::skip_unless_root() {
        return;
    }
    let tb = Testbed::up("rl", &["--with", "nginx,redis,postgres"]);
    let _tun = TunOpenToAll::new();
    let me = Ordinary::new(&tb, "mvrl");
    let before = laptop_state(&tb);

    // doctor --rootless, as the user: the namespace can be made, the jump host takes the key.
    let mut args: Vec<String> = vec!["doctor".into(), "--rootless".into()];
    args.extend(me.session_args(&tb));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = me.mse_vpn(&tb, &args).output().expect("run doctor");
    let text = stdout(&out);
    assert!(out.status.success(), "{text}{}", stderr(&out));
    for line in [
        "ok    user namespaces",
        "ok    tun",
        "ok    app namespace",
        "ok    login",
    ] {
        assert!(text.contains(line), "no {line:?} in:\n{text}");
    }
    assert!(!text.contains("privileges"), "{text}");

    let (ready, go) = (me.file("ready"), me.file("go"));
    let script = format!(
        "echo uid=$(id -u); \
         echo http=$(curl -sS -m 10 http://10.0.0.10/); \
         echo redis=$(redis-cli -h 10.0.0.11 ping); \
         echo psql=$(psql -h 10.0.0.12 -U app -d app -tAc 'select 40 + 2'); \
         echo resolv=$(grep nameserver /etc/resolv.conf); \
         echo sigign=$(grep SigIgn /proc/self/status | cut -f2); \
         echo pid=$$ > {ready}.tmp; mv {ready}.tmp {ready}; \
         i=0; while [ ! -e {go} ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done; \
         exit 7",
        ready = s(&ready),
        go = s(&go)
    );
    let mut vpn = me.run_app(&tb, &CONSUMER_WITH_SPLIT_DNS, &script);
    wait_for_file(&ready, &vpn, Duration::from_secs(30));
    let out = vpn.stdout();
    assert_eq!(said(&out, "uid"), Some(me.user.uid.to_string()), "{out}");
    assert_eq!(
        said(&out, "http").as_deref(),
        Some("hello from the VPC"),
        "{out}\n{}",
        vpn.stderr()
    );
    assert_eq!(said(&out, "redis").as_deref(), Some("PONG"), "{out}");
    assert_eq!(said(&out, "psql").as_deref(), Some("42"), "{out}");
    // SIGPIPE is not ignored in the app, though mse-vpn (a Rust program) ignores it.
    let ignored = said(&out, "sigign").and_then(|m| u64::from_str_radix(&m, 16).ok());
    assert_eq!(
        ignored.map(|m| m & (1 << 12)),
        Some(0),
        "SIGPIPE ignored: {out}"
    );
    // The app's own resolv.conf names the split-DNS responder in its namespace.
    assert_eq!(
        said(&out, "resolv").as_deref(),
        Some("nameserver 198.18.0.3"),
        "{out}"
    );
    let app_pid: i32 = std::fs::read_to_string(&ready)
        .unwrap()
        .trim()
        .strip_prefix("pid=")
        .and_then(|p| p.parse().ok())
        .expect("the app's pid");

    // During: nothing changed on the laptop (no TUN, no route, no rule, the same resolv.conf).
    assert_eq!(
        laptop_state(&tb),
        before,
        "the laptop changed while the app ran"
    );
    // `status`, as the user: a `run` session with the app's pid.
    let out = me
        .mse_vpn(&tb, &["status", "--json"])
        .output()
        .expect("status");
    let st: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("status --json: {e}: {}{}", stdout(&out), stderr(&out)));
    let session = &st[0];
    assert_eq!(session["app_pid"], app_pid, "{st}");
    assert_eq!(session["routes"][0], VPC, "{st}");
    assert_eq!(session["pid"], vpn.pid(), "{st}");
    assert!(session["tun"].as_str().unwrap().starts_with("run-"), "{st}");

    std::fs::write(&go, "").unwrap();
    let status = vpn.wait_exit(Duration::from_secs(20));
    assert_eq!(
        status.code(),
        Some(7),
        "the app's exit status:\n{}",
        vpn.stderr()
    );
    assert!(
        vpn.stderr().contains("runs in a network of its own"),
        "{}",
        vpn.stderr()
    );
    assert_eq!(
        laptop_state(&tb),
        before,
        "the laptop changed after the app ended"
    );
    assert!(!pid_alive(app_pid));
}

#[test]
fn kill_9_of_mse_vpn_or_of_the_app_leaves_nothing_and_failures_say_what_to_change() {
    if crate::harness::skip_unless_root() {
        return;
    }
    let tb = Testbed::up("rk", &["--with", "nginx"]);
    let _tun = TunOpenToAll::new();
    let me = Ordinary::new(&tb, "mvrk");
    let before = laptop_state(&tb);
    let ready = me.file("ready");
    // An app that says its pid, then waits; SIGTERM ends it with 143.
    let script = format!(
        "trap 'echo got=TERM; exit 143' TERM; \
         curl -sS -m 10 -o /dev/null http://10.0.0.10/ && echo pid=$$ > {r}.tmp && mv {r}.tmp {r}; \
         while true; do sleep 0.1; done",
        r = s(&ready)
    );
    let app_pid = |vpn: &Vpn| -> i32 {
        wait_for_file(&ready, vpn, Duration::from_secs(30));
        let pid = std::fs::read_to_string(&ready)
            .unwrap()
            .trim()
            .strip_prefix("pid=")
            .and_then(|p| p.parse().ok())
            .expect("the app's pid");
        std::fs::remove_file(&ready).unwrap();
        pid
    };
    let gone_within = |pid: i32, limit: Duration| {
        let start = Instant::now();
        while pid_alive(pid) && start.elapsed() < limit {
            std::thread::sleep(Duration::from_millis(50));
        }
        !pid_alive(pid)
    };

    // SIGTERM to mse-vpn is passed on to the app; its exit status is the app's.
    let mut vpn = me.run_app(&tb, &["--subscribe-only"], &script);
    let pid = app_pid(&vpn);
    vpn.signal(nix::sys::signal::Signal::SIGTERM);
    let status = vpn.wait_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(143), "{}", vpn.stderr());
    assert!(vpn.stdout().contains("got=TERM"), "{}", vpn.stdout());
    assert!(!pid_alive(pid));
    assert_eq!(laptop_state(&tb), before);

    // kill -9 of mse-vpn: the app, left without a network, is sent SIGTERM; nothing remains.
    let mut vpn = me.run_app(&tb, &["--subscribe-only"], &script);
    let pid = app_pid(&vpn);
    vpn.kill9();
    assert!(
        gone_within(pid, Duration::from_secs(10)),
        "the app outlived mse-vpn"
    );
    assert_eq!(laptop_state(&tb), before, "after kill -9 of mse-vpn");

    // kill -9 of the app: mse-vpn ends with it (128 + 9), nothing remains.
    let mut vpn = me.run_app(&tb, &["--subscribe-only"], &script);
    let pid = app_pid(&vpn);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let status = vpn.wait_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(137), "{}", vpn.stderr());
    assert_eq!(laptop_state(&tb), before, "after kill -9 of the app");

    // User namespaces forbidden: made so in a user namespace of the test's own (the limit
    // user.max_user_namespaces is per user namespace), never on the machine.
    let mut run: Vec<String> = vec![me.bin.clone(), "run".into()];
    run.extend(me.session_args(&tb));
    run.extend(
        ["--subscribe-only", "--", "true"]
            .iter()
            .map(|a| a.to_string()),
    );
    let run = run.join(" ");
    let marker = tb.sshd_log().len();
    let out = me
        .cmd(
            &tb,
            &[
                "unshare",
                "--user",
                "--map-root-user",
                "sh",
                "-c",
                &format!("echo 0 > /proc/sys/user/max_user_namespaces && exec {run}"),
            ],
        )
        .output()
        .expect("run in a user namespace that allows no more");
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(
        err.contains("user.max_user_namespaces = 0")
            && err.contains("sysctl -w user.max_user_namespaces=")
            && err.contains("sudo mse-vpn up"),
        "{err}"
    );
    assert_eq!(
        tb.sshd_log().len(),
        marker,
        "the jump host was contacted before the namespace was known to work"
    );

    // /dev/net/tun closed to the user (0600, as on these machines), in a mount namespace of
    // the test's own.
    let dev = s(&tb.dir.join("tun-0600"));
    let mut mse = tb.cmd_in(
        &tb.lap(),
        &[
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            &format!(
                "mknod {dev} c 10 200 && chmod 600 {dev} && mount --bind {dev} {TUN_DEV} && exec {} {run}",
                me.as_user().join(" ")
            ),
        ],
    );
    let out = mse.current_dir(&me.user.home).output().expect("run");
    let _ = std::fs::remove_file(&dev);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("cannot open /dev/net/tun as an ordinary user")
            && err.contains("chmod 0666 /dev/net/tun"),
        "{err}"
    );

    // An app that does not exist: 127, before anything is contacted.
    let marker = tb.sshd_log().len();
    let mut args: Vec<String> = vec!["run".into()];
    args.extend(me.session_args(&tb));
    args.extend(
        ["--subscribe-only", "--", "no-such-app"]
            .iter()
            .map(|a| a.to_string()),
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = me.mse_vpn(&tb, &args).output().expect("run");
    assert_eq!(out.status.code(), Some(127), "{}", stderr(&out));
    assert!(stderr(&out).contains("no-such-app: command not found"));
    assert_eq!(tb.sshd_log().len(), marker);
    assert_eq!(laptop_state(&tb), before);
}

#[test]
fn a_cloud_caller_reaches_the_app_in_its_namespace_from_its_own_address() {
    if crate::harness::skip_unless_root() {
        return;
    }
    let tb = Testbed::up("rx", &["--with", "none"]);
    let _tun = TunOpenToAll::new();
    let me = Ordinary::new(&tb, "mvrx");
    let before = laptop_state(&tb);
    let server = tb.dir.join("peer_server.py");
    std::fs::write(&server, crate::reverse::PEER_SERVER).unwrap();
    let script = format!(
        "echo advertise=$MSE_VPN_ADVERTISE; exec python3 {} 8080",
        s(&server)
    );
    let mut vpn = me.run_app(&tb, &["--expose", "18080:8080"], &script);
    let start = Instant::now();
    while !vpn.stdout().contains("listening") {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the app did not listen:\n{}\n{}",
            vpn.stdout(),
            vpn.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The app was told the address cloud callers use: the jump host's, the exposed port.
    assert_eq!(
        said(&vpn.stdout(), "advertise").as_deref(),
        Some("10.0.0.1:18080"),
        "{}",
        vpn.stdout()
    );
    assert!(
        vpn.stderr()
            .contains("cloud callers reach 10.0.0.1:18080 -> local port 8080"),
        "{}",
        vpn.stderr()
    );
    // A caller in the VPC reaches the app through the jump host, and the app sees the
    // caller's own address.
    let out = tb
        .cmd_in(
            &format!("{}-vpc", tb.name),
            &[
                "timeout",
                "10",
                "bash",
                "-c",
                "echo hello | socat - TCP:10.0.0.1:18080,shut-down",
            ],
        )
        .output()
        .expect("call from the VPC");
    let text = stdout(&out);
    assert!(
        text.starts_with("peer 10.0.0.10:") && text.ends_with("hello\n"),
        "{text}{}",
        stderr(&out)
    );
    // The app listens in its own network, not the laptop's.
    let listening = tb.on_laptop(5, &["ss", "-Hltn", "sport = :8080"]);
    assert_eq!(
        stdout(&listening).trim(),
        "",
        "port 8080 open on the laptop"
    );
    assert_eq!(laptop_state(&tb), before);
    vpn.signal(nix::sys::signal::Signal::SIGTERM);
    let status = vpn.wait_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(143), "{}", vpn.stderr());
    assert_eq!(laptop_state(&tb), before);
}

/// A UDP echo server: answers each datagram with it and the sender's address.
const UDP_ECHO: &str = "import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
while True:
    d, a = s.recvfrom(2048)
    s.sendto(d + b' from ' + a[0].encode(), a)
";

/// What the app runs to send `ping` to `ADDR:PORT` over UDP and print the answer.
fn udp_ask(addr: &str, port: u16) -> String {
    format!(
        "python3 -c \"import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); \
         s.settimeout(5); s.sendto(b'ping', ('{addr}', {port})); print(s.recv(100).decode())\""
    )
}

/// `python3 -m http.server` in `ns` on `addr:port`, serving `dir`, started and listening.
fn http_server(tb: &Testbed, ns: &str, addr: &str, port: u16, dir: &Path) -> Vpn {
    let server = Vpn::spawn(tb.cmd_in(
        ns,
        &[
            "/usr/bin/python3",
            "-m",
            "http.server",
            "--bind",
            addr,
            "--directory",
            &s(dir),
            &port.to_string(),
        ],
    ));
    tb.wait_listening(ns, port, Duration::from_secs(10));
    server
}

#[test]
fn the_apps_other_destinations_go_out_directly_the_hosts_loopback_and_names_too() {
    if crate::harness::skip_unless_root() {
        return;
    }
    let tb = Testbed::up("rd", &["--with", "nginx,dns"]);
    let _tun = TunOpenToAll::new();
    let me = Ordinary::new(&tb, "mvrd");
    let jump_ns = format!("{}-jump", tb.name);
    // A server on the laptop's LAN (the jump host's LAN address, outside the VPC CIDRs), one
    // on the laptop's own loopback, a UDP echo on the LAN; the laptop lets every group ping.
    let site = tb.dir.join("site");
    std::fs::create_dir_all(&site).unwrap();
    std::fs::write(site.join("lan.txt"), "hello from the LAN\n").unwrap();
    std::fs::write(site.join("loop.txt"), "hello from the laptop's loopback\n").unwrap();
    let lan = http_server(&tb, &jump_ns, &tb.jump_addr, 18080, &site);
    let lo = http_server(&tb, &tb.lap(), "127.0.0.1", 18082, &site);
    let echo = tb.dir.join("udp_echo.py");
    std::fs::write(&echo, UDP_ECHO).unwrap();
    let _udp = Vpn::spawn(tb.cmd_in(
        &jump_ns,
        &["/usr/bin/python3", &s(&echo), &tb.jump_addr, "18081"],
    ));
    let sysctl = tb.on_laptop(
        5,
        &["sysctl", "-qw", "net.ipv4.ping_group_range=0 2147483647"],
    );
    assert!(sysctl.status.success(), "{}", stderr(&sysctl));
    let before = laptop_state(&tb);

    let jump = &tb.jump_addr;
    let script = format!(
        "echo lan=$(curl -sS -m 10 http://{jump}:18080/lan.txt); \
         echo loop=$(curl -sS -m 10 http://198.18.0.2:18082/loop.txt); \
         echo api=$(getent hosts api.internal | cut -d' ' -f1); \
         echo www=$(getent hosts www.example.org | cut -d' ' -f1); \
         echo named=$(curl -sS -m 10 http://api.internal/); \
         echo udp=$({udp}); \
         echo ping=$(ping -n -c 1 -W 5 {jump} >/dev/null 2>&1 && echo ok || echo failed); \
         echo done=1",
        udp = udp_ask(jump, 18081),
    );
    let mut vpn = me.run_app(&tb, &CONSUMER_WITH_SPLIT_DNS, &script);
    let status = vpn.wait_exit(Duration::from_secs(60));
    let out = vpn.stdout();
    let err = vpn.stderr();
    assert!(status.success(), "{out}\n{err}");
    assert_eq!(said(&out, "done").as_deref(), Some("1"), "{out}\n{err}");
    // The LAN and the laptop's loopback, from the laptop's own address (not through SSH).
    assert_eq!(
        said(&out, "lan").as_deref(),
        Some("hello from the LAN"),
        "{out}\n{err}"
    );
    assert_eq!(
        said(&out, "loop").as_deref(),
        Some("hello from the laptop's loopback"),
        "{out}\n{err}"
    );
    let laptop_addr =
        stdout(&tb.on_laptop(5, &["ip", "-4", "-o", "addr", "show", "scope", "global"]))
            .split_whitespace()
            .find_map(|w| w.split_once('/').map(|(a, _)| a.to_owned()))
            .expect("the laptop's address");
    // python's http.server logs each request with its client's address first.
    let (lan_log, lo_log) = (lan.stderr(), lo.stderr());
    assert!(
        lan_log.contains(&format!("{laptop_addr} - - ")) && lan_log.contains("GET /lan.txt"),
        "the LAN server saw the laptop's own address:\n{lan_log}"
    );
    assert!(
        lo_log.contains("127.0.0.1 - - ") && lo_log.contains("GET /loop.txt"),
        "{lo_log}"
    );
    // Split names through the tunnel (the laptop's own resolver says 192.0.2.99 for
    // api.internal), every other name through the laptop's own resolver (a loopback stub).
    assert_eq!(
        said(&out, "api").as_deref(),
        Some("10.0.0.10"),
        "{out}\n{err}"
    );
    assert_eq!(
        said(&out, "www").as_deref(),
        Some("192.0.2.80"),
        "{out}\n{err}"
    );
    assert_eq!(
        said(&out, "named").as_deref(),
        Some("hello from the VPC"),
        "{out}\n{err}"
    );
    assert_eq!(
        said(&out, "udp"),
        Some(format!("ping from {laptop_addr}")),
        "{out}\n{err}"
    );
    assert_eq!(said(&out, "ping").as_deref(), Some("ok"), "{out}\n{err}");
    assert_eq!(laptop_state(&tb), before, "the laptop changed");
}

#[test]
fn an_ordinary_users_jvm_consumer_calls_a_cloud_dubbo_provider_found_by_private_name() {
    if crate::harness::skip_unless_root() {
        return;
    }
    let tb = Testbed::up("rj", &["--with", "zookeeper,dns"]);
    let _tun = TunOpenToAll::new();
    let me = Ordinary::new(&tb, "mvrj");
    let (provider, _) = start_provider(
        &tb,
        &vpc_ns(&tb),
        &App::Dubbo33.argv(
            &tb,
            "provider",
            &[
                ("dubbo.registry.address", &format!("zookeeper://{ZK}")),
                ("demo.id", "cloud-1"),
            ],
            &[],
        ),
    );
    let before = laptop_state(&tb);
    // The consumer as the user would start it: its jar and home are the user's (the
    // checkout may be unreadable to other users), the registry known only by its private
    // name.
    let app_dir = tb.dir.join("dubbo33");
    let built = App::Dubbo33.jar();
    let copy = Command::new("cp")
        .args(["-a", &s(&built), &s(&built.with_file_name("lib"))])
        .arg(
            std::fs::create_dir_all(&app_dir)
                .map(|()| &app_dir)
                .unwrap(),
        )
        .status()
        .expect("cp");
    assert!(copy.success(), "copy the app and its lib/");
    let jar = app_dir.join("dubbo33.jar");
    let home = me.file("java-home");
    me.user.write(&home.join("tmp").join(".keep"), "", 0o600);
    let argv: Vec<String> = App::Dubbo33
        .argv(
            &tb,
            "consumer",
            &[("dubbo.registry.address", "zookeeper://zk.internal:2181")],
            &[&CALLS.to_string()],
        )
        .into_iter()
        .map(|a| {
            if a.starts_with("-Duser.home=") {
                format!("-Duser.home={}", s(&home))
            } else if a.starts_with("-Djava.io.tmpdir=") {
                format!("-Djava.io.tmpdir={}", s(&home.join("tmp")))
            } else if a.ends_with("dubbo33.jar") {
                s(&jar)
            } else {
                a
            }
        })
        .collect();
    let mut args: Vec<String> = vec!["run".into()];
    args.extend(me.session_args(&tb));
    args.extend(CONSUMER_WITH_SPLIT_DNS.map(String::from));
    args.push("--".into());
    args.extend(argv);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut vpn = Vpn::spawn(me.mse_vpn(&tb, &args));
    let status = vpn.wait_exit(Duration::from_secs(150));
    let out = std::process::Output {
        status,
        stdout: vpn.stdout().into_bytes(),
        stderr: vpn.stderr().into_bytes(),
    };
    // Every call reached the VPC's provider, from the jump host (where the tunnel ends).
    assert_all_reached(&out, "cloud-1", JUMP);
    assert!(status.success(), "{}", tail(&vpn.stderr(), 40));
    let log = std::fs::read_to_string(tb.dir.join("dnsmasq-vpc.log")).unwrap_or_default();
    assert!(
        log.contains("query[A] zk.internal"),
        "the name was resolved by the VPC's resolver"
    );
    drop(provider);
    assert_eq!(laptop_state(&tb), before, "the laptop changed");
}
