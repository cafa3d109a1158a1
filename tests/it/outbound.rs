//! End-to-end tests of `mse-vpn up`: real OpenSSH sshd on the jump host, real nginx, redis
//! and PostgreSQL in the VPC, real clients on the laptop, all in namespaces.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use crate::harness::{Testbed, sha256_file, stderr, stdout};

/// A laptop-side client that sends a request, shuts down its write side, and reads the whole
/// reply; and a VPC-side server that reads to EOF before replying. Half-close must work.
const HALF_CLOSE_SERVER: &str = r#"
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("10.0.0.10", 7000)); s.listen(8)
while True:
    c, _ = s.accept(); data = b""
    while True:
        b = c.recv(65536)
        if not b: break
        data += b
    c.sendall(b"got %d bytes after EOF" % len(data)); c.close()
"#;

const HALF_CLOSE_CLIENT: &str = r#"
import socket
c = socket.create_connection(("10.0.0.10", 7000), timeout=10)
c.sendall(b"x" * 100000); c.shutdown(socket.SHUT_WR)
reply = b""
while True:
    b = c.recv(65536)
    if not b: break
    reply += b
print(reply.decode())
"#;

#[test]
fn real_clients_reach_the_vpc_by_private_ip_and_nothing_is_left_after_sigint() {
    if crate::harness::skip_unless_root() {
        return;
    }
    let tb = Testbed::up("ob", &["--with", "nginx,redis,postgres"]);
    let before = tb.snapshot();
    let vpn = tb.start(&["10.0.0.0/16", "fd00:10::/64"], &[]);

    // HTTP: 1 KiB and 10 MiB, bodies checked.
    for file in ["1k.bin", "10m.bin"] {
        let out = tb.sh(
            60,
            &format!("curl -sS -m 50 http://10.0.0.10/{file} | sha256sum"),
        );
        let got = stdout(&out);
        let want = sha256_file(&tb.dir.join("www").join(file));
        assert!(
            got.starts_with(&want),
            "{file}: sha256 {got} != {want}; {}",
            stderr(&out)
        );
    }

    // Redis PING, SET/GET.
    let out = tb.on_laptop(10, &["redis-cli", "-h", "10.0.0.11", "ping"]);
    assert_eq!(stdout(&out).trim(), "PONG", "{}", stderr(&out));
    tb.on_laptop(
        10,
        &[
            "redis-cli",
            "-h",
            "10.0.0.11",
            "set",
            "k",
            "through the tunnel",
        ],
    );
    let out = tb.on_laptop(10, &["redis-cli", "-h", "10.0.0.11", "get", "k"]);
    assert_eq!(stdout(&out).trim(), "through the tunnel");

    // PostgreSQL.
    let out = tb.on_laptop(
        15,
        &[
            "psql",
            "-h",
            "10.0.0.12",
            "-U",
            "app",
            "-d",
            "app",
            "-tAc",
            "select 40 + 2",
        ],
    );
    assert_eq!(stdout(&out).trim(), "42", "psql: {}", stderr(&out));

    // A closed port is refused at once (a reset, not a timeout).
    let t = Instant::now();
    let out = tb.on_laptop(10, &["curl", "-sS", "-m", "5", "http://10.0.0.10:81/"]);
    let took = t.elapsed();
    assert_eq!(
        out.status.code(),
        Some(7),
        "curl to a closed port: {}",
        stderr(&out)
    );
    assert!(took < Duration::from_secs(1), "refusal took {took:?}");

    // UDP is not carried: an ICMP port unreachable makes it fail at once.
    let t = Instant::now();
    let out = tb.on_laptop(
        10,
        &["dig", "+tries=1", "+time=5", "@10.0.0.10", "example.com"],
    );
    assert!(
        stdout(&out).contains("connection refused") || stderr(&out).contains("connection refused"),
        "dig over UDP: {}{}",
        stdout(&out),
        stderr(&out)
    );
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "UDP refusal took {:?}",
        t.elapsed()
    );

    // IPv6.
    let out = tb.on_laptop(
        10,
        &["curl", "-sS", "-m", "5", "-g", "http://[fd00:10::10]/"],
    );
    assert_eq!(
        stdout(&out).trim(),
        "hello from the VPC",
        "{}",
        stderr(&out)
    );

    // Half-close: the client shuts down its write side and still gets the full reply.
    let mut server = tb
        .cmd_in(
            &format!("{}-vpc", tb.name),
            &["python3", "-c", HALF_CLOSE_SERVER],
        )
        .spawn()
        .unwrap();
    tb.wait_listening(&format!("{}-vpc", tb.name), 7000, Duration::from_secs(5));
    let out = tb.on_laptop(20, &["python3", "-c", HALF_CLOSE_CLIENT]);
    let _ = server.kill();
    let _ = server.wait();
    assert_eq!(
        stdout(&out).trim(),
        "got 100000 bytes after EOF",
        "{}",
        stderr(&out)
    );

    // 200 parallel connections all complete.
    let out = tb.sh(
        60,
        "for i in $(seq 200); do curl -sS -m 30 -o /dev/null -w '%{http_code}\\n' http://10.0.0.10/1k.bin & done; wait",
    );
    let ok = stdout(&out).lines().filter(|l| *l == "200").count();
    assert_eq!(ok, 200, "parallel connections: {}", stderr(&out));

    // The pool's connections come up one after another over the first seconds: all up
    // before the check below narrows the ports (a connection made during it took one).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let st = crate::lifecycle::status(&tb);
        if st["connections_up"] == st["connections"] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the pool never came up whole: {st:#}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // Every SSH connection of the pool ran one command, so that its sshd sends without
    // Nagle's delay (`Session::start_bulk_mode`). sshd logs the login and the command each
    // with the connection's port.
    let ports = |what: &str| -> BTreeSet<String> {
        tb.sshd_log()
            .lines()
            .filter(|l| l.contains(what))
            .filter_map(|l| {
                l.split(" port ")
                    .nth(1)?
                    .split(' ')
                    .next()
                    .map(str::to_owned)
            })
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    let (logins, commands) = loop {
        let (logins, commands) = (
            ports("Accepted publickey for root"),
            ports("Starting session: command for root"),
        );
        if (logins.len() >= 2 && logins.is_subset(&commands)) || Instant::now() > deadline {
            break (logins, commands);
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        logins.len() >= 2 && logins.is_subset(&commands),
        "connections (by port) {logins:?}, those that ran a command {commands:?}:\n{}",
        tb.sshd_log()
    );

    // An app's kernel can reuse the TIME-WAIT ports of its closed connections through the
    // tunnel (tcp_tw_reuse needs the peer's TCP timestamps): with 10 ephemeral ports, 30
    // connections one after another all succeed. Without reuse the 11th cannot get a port.
    // The ports are past the default range (which ends at 60999), so none is still in
    // TIME-WAIT from the 200 connections above (not yet reusable).
    let out = tb.sh(
        60,
        "sysctl -qw net.ipv4.tcp_tw_reuse=1 net.ipv4.ip_local_port_range='61000 61009' || exit 9
         for i in $(seq 30); do
           curl -sS -m 10 -o /dev/null -w '%{http_code}\n' http://10.0.0.10/1k.bin
           if (( i % 10 == 0 )); then sleep 2.1; fi
         done
         sysctl -qw net.ipv4.ip_local_port_range='32768 60999'",
    );
    let ok = stdout(&out).lines().filter(|l| *l == "200").count();
    assert_eq!(ok, 30, "connections over 10 reused ports: {}", stderr(&out));

    // The only route into the tunnel is the one asked for; SIGINT removes everything.
    let routes = stdout(&tb.on_laptop(5, &["ip", "route"]));
    assert!(
        routes.contains(&format!("10.0.0.0/16 dev {}", tb.tun())),
        "{routes}"
    );
    let status = vpn.interrupt();
    assert!(status.success(), "exit status after SIGINT: {status}");
    assert_eq!(
        tb.snapshot(),
        before,
        "the laptop's links, addresses and routes are restored"
    );
}

#[test]
fn the_jump_host_inside_the_routed_cidr_keeps_its_own_path() {
    if crate::harness::skip_unless_root() {
        return;
    }
    let tb = Testbed::up("jin", &["--with", "nginx", "--jump-in-cidr"]);
    assert!(tb.jump_addr.starts_with("10."));
    let before = tb.snapshot();
    let vpn = tb.start(&["10.0.0.0/8"], &[]);
    let routes = stdout(&tb.on_laptop(5, &["ip", "route"]));
    assert!(
        routes.contains("10.99.0.1 via"),
        "bypass host route: {routes}"
    );
    let out = tb.on_laptop(10, &["curl", "-sS", "-m", "5", "http://10.0.0.10/"]);
    assert_eq!(
        stdout(&out).trim(),
        "hello from the VPC",
        "{}",
        stderr(&out)
    );
    assert!(vpn.interrupt().success());
    assert_eq!(tb.snapshot(), before);
}

#[test]
fn host_keys_are_checked_strictly() {
    if crate::harness::skip_unless_root() {
        return;
    }
    let tb = Testbed::up("hk", &["--with", "nginx"]);
    let before = tb.snapshot();
    let kh = tb.dir.join("known_hosts");
    let real = std::fs::read_to_string(&kh).unwrap();

    // Unknown: refused with the fingerprint and the flag, nothing changed.
    std::fs::write(&kh, "").unwrap();
    let args = tb.up_args(&["10.0.0.0/16"], &[]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (status, err) = tb.up_fails(&args);
    assert!(!status.success());
    assert!(
        err.contains("SHA256:") && err.contains("--accept-new-host-key"),
        "{err}"
    );
    assert_eq!(tb.snapshot(), before);

    // Accepted on request, recorded, and then known.
    let vpn = tb.start(&["10.0.0.0/16"], &["--accept-new-host-key"]);
    let recorded = std::fs::read_to_string(&kh).unwrap();
    assert!(
        recorded.contains(&tb.jump_addr) && recorded.contains("ssh-ed25519"),
        "{recorded}"
    );
    assert!(vpn.interrupt().success());
    let vpn = tb.start(&["10.0.0.0/16"], &[]);
    assert!(vpn.interrupt().success());

    // Changed: refused loudly, even with --accept-new-host-key.
    let other = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(tb.dir.join("other_key"))
        .status()
        .unwrap();
    assert!(other.success());
    let other_pub = std::fs::read_to_string(tb.dir.join("other_key.pub")).unwrap();
    let fake: Vec<&str> = other_pub.split_whitespace().take(2).collect();
    std::fs::write(
        &kh,
        format!("# line 1\n{} {}\n", tb.jump_addr, fake.join(" ")),
    )
    .unwrap();
    let args = tb.up_args(&["10.0.0.0/16"], &["--accept-new-host-key"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (status, err) = tb.up_fails(&args);
    assert!(!status.success());
    assert!(err.contains("CHANGED") && err.contains("line 2"), "{err}");
    assert_eq!(tb.snapshot(), before);
    std::fs::write(&kh, real).unwrap();
}

#[test]
fn bad_input_is_refused_before_the_host_is_touched() {
    if crate::harness::skip_unless_root() {
        return;
    }
    let tb = Testbed::up("bad", &["--with", "nginx"]);
    let before = tb.snapshot();
    let cases: &[(&[&str], &str, &[&str])] = &[
        (&["10.0.0.0/33"], "not a CIDR", &[]),
        (&["0.0.0.0/0"], "whole internet", &[]),
        (&["10.0.0.1/16"], "did you mean 10.0.0.0/16", &[]),
        // The laptop's own link network is reached directly: routing it would cut it off.
        (&["172.16.0.0/12"], "overlaps", &[]),
        (
            &["10.0.0.0/16"],
            "does not exist",
            &["-i", "/nonexistent/key"],
        ),
    ];
    for (cidrs, expect, extra) in cases {
        let args = tb.up_args(cidrs, extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (status, err) = tb.up_fails(&args);
        assert!(!status.success(), "{cidrs:?} must be refused");
        assert!(
            err.contains(expect),
            "{cidrs:?}: expected '{expect}' in: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
    // A jump host that does not resolve, and one where nothing listens.
    let mut args = tb.up_args(&["10.0.0.0/16"], &[]);
    let p = args.iter().position(|a| a == "--proxy").unwrap();
    args[p + 1] = "root@no-such-host.invalid".into();
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let (status, err) = tb.up_fails(&a);
    assert!(!status.success());
    assert!(err.contains("could not resolve"), "{err}");
    args[p + 1] = format!("root@{}:2", tb.jump_addr);
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let t = Instant::now();
    let (status, err) = tb.up_fails(&a);
    assert!(!status.success());
    assert!(err.contains("cannot reach the jump host"), "{err}");
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
    assert_eq!(tb.snapshot(), before, "nothing changed on the host");
}

#[test]
fn the_flow_limit_resets_new_connections_and_keeps_the_others() {
    if crate::harness::skip_unless_root() {
        return;
    }
    let tb = Testbed::up("lim", &["--with", "nginx"]);
    let vpn = tb.start(&["10.0.0.0/16"], &["--max-flows", "2"]);
    let script = r#"
import socket
held = [socket.create_connection(("10.0.0.10", 80), timeout=5) for _ in range(2)]
try:
    third = socket.create_connection(("10.0.0.10", 80), timeout=5)
    third.sendall(b"GET / HTTP/1.0\r\n\r\n")
    print("third:", third.recv(100))
except OSError as e:
    print("third refused:", type(e).__name__)
for c in held:
    c.sendall(b"GET / HTTP/1.0\r\n\r\n")
    print("held:", c.recv(12).decode())
"#;
    let out = tb.on_laptop(20, &["python3", "-c", script]);
    let text = stdout(&out);
    assert!(text.contains("third refused"), "{text}{}", stderr(&out));
    assert_eq!(text.matches("held: HTTP/1.1 200").count(), 2, "{text}");
    assert!(
        vpn.stderr()
            .contains("flow limit (--max-flows) was reached"),
        "{}",
        vpn.stderr()
    );
    assert!(vpn.interrupt().success());
}

#[test]
fn a_slow_reader_still_gets_every_byte_and_a_fast_one_beside_it_is_not_held_back() {
    if crate::harness::skip_unless_root() {
        return;
    }
    let tb = Testbed::up("slw", &[]);
    let vpn = tb.start(&["10.0.0.0/16"], &["--connections", "1"]);
    // A reader at 3 MB/s of a 10 MiB body (the jump host sends far faster), and, on the same
    // SSH connection, a full-speed download that must not be paced by the slow one.
    let slow = tb
        .cmd_in(
            &tb.lap(),
            &[
                "bash",
                "-c",
                "curl -sS --limit-rate 3M -m 30 http://10.0.0.10/10m.bin | sha256sum",
            ],
        )
        .output_async();
    tb.wait_established(&tb.lap(), "10.0.0.10:80", Duration::from_secs(5));
    let started = Instant::now();
    let out = tb.sh(30, "curl -sS -m 25 http://10.0.0.10/10m.bin | sha256sum");
    let fast = started.elapsed();
    let want = sha256_file(&tb.dir.join("www/10m.bin"));
    assert!(stdout(&out).starts_with(&want), "fast: {}", stderr(&out));
    assert!(
        fast < Duration::from_millis(2500),
        "the fast download took {fast:?}: held back by the slow reader on its connection"
    );
    let out = slow.join().expect("slow curl");
    assert!(stdout(&out).starts_with(&want), "slow: {}", stderr(&out));
    assert!(vpn.interrupt().success());
}

/// Runs a command to completion on a thread.
pub trait OutputAsync {
    fn output_async(self) -> std::thread::JoinHandle<std::process::Output>;
}

impl OutputAsync for std::process::Command {
    fn output_async(mut self) -> std::thread::JoinHandle<std::process::Output> {
        std::thread::spawn(move || self.output().expect("run command"))
    }
}
