//! End-to-end split DNS: the VPC's resolver is dnsmasq on 10.0.0.13 (its query log proves
//! which names reached it), the laptop's original resolver is another dnsmasq on 127.0.0.1
//! in the laptop namespace; real sshd, real glibc (`getent`), `dig`, `curl`. The laptop's
//! /etc/resolv.conf is /etc/netns/NAME-lap/resolv.conf, which must come back byte for byte.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::harness::{Testbed, Vpn, stderr, stdout};
use crate::lifecycle::status;

const DOMAINS: [&str; 4] = [
    "--dns-domain",
    "internal",
    "--dns-domain",
    "rds.example.com",
];

/// The laptop's resolver configuration file, as seen from the root namespace.
fn lap_resolv_conf(tb: &Testbed) -> PathBuf {
    PathBuf::from(format!("/etc/netns/{}/resolv.conf", tb.lap()))
}

fn vpc_log(tb: &Testbed) -> String {
    std::fs::read_to_string(tb.dir.join("dnsmasq-vpc.log")).unwrap_or_default()
}

fn lap_log(tb: &Testbed) -> String {
    std::fs::read_to_string(tb.dir.join("dnsmasq-lap.log")).unwrap_or_default()
}

/// Runs a shell snippet on the laptop, asserting it succeeded; returns its stdout.
fn lap_ok(tb: &Testbed, script: &str) -> String {
    let out = tb.sh(20, script);
    assert!(
        out.status.success(),
        "`{script}` failed: {}{}",
        stdout(&out),
        stderr(&out)
    );
    stdout(&out)
}

#[test]
fn vpc_names_resolve_through_the_tunnel_and_other_names_as_before() {
    if crate::harness::skip_unless_root() {
        return;
    }
    let tb = Testbed::up("dn1", &["--with", "nginx,dns"]);
    let conf = lap_resolv_conf(&tb);
    let original = std::fs::read(&conf).unwrap();
    // Before: the laptop's own resolver answers api.internal with ITS address.
    assert_eq!(
        lap_ok(&tb, "getent hosts api.internal")
            .split_whitespace()
            .next(),
        Some("192.0.2.99")
    );

    let mut extra = vec!["--dns", "10.0.0.13"];
    extra.extend(DOMAINS);
    let mut vpn = tb.start(&["10.0.0.0/16", "fd00:10::/64"], &extra);
    assert!(
        vpn.stdout().contains("split DNS (resolv.conf)"),
        "{}",
        vpn.stdout()
    );
    let now = std::fs::read_to_string(&conf).unwrap();
    assert!(now.contains("nameserver 198.18.0.1"), "{now}");

    // glibc, dig and curl, by name.
    let hosts = lap_ok(&tb, "getent hosts api.internal");
    assert_eq!(
        hosts.split_whitespace().next(),
        Some("10.0.0.10"),
        "{hosts}"
    );
    let db = lap_ok(&tb, "getent hosts db.rds.example.com");
    assert_eq!(db.split_whitespace().next(), Some("10.0.0.12"), "{db}");
    assert_eq!(lap_ok(&tb, "dig +short api.internal").trim(), "10.0.0.10");
    assert_eq!(
        lap_ok(&tb, "curl -sS -m 10 http://api.internal/").trim(),
        "hello from the VPC"
    );
    // A name in a split domain that does not exist: the VPC resolver's NXDOMAIN.
    assert!(
        lap_ok(&tb, "dig nothere.internal").contains("status: NXDOMAIN"),
        "NXDOMAIN from the VPC"
    );

    // A name outside the domains: as before, from the original resolver, never the VPC's.
    assert_eq!(
        lap_ok(&tb, "getent hosts www.example.org")
            .split_whitespace()
            .next(),
        Some("192.0.2.80")
    );
    assert_eq!(
        lap_ok(&tb, "dig +short www.example.org").trim(),
        "192.0.2.80"
    );
    assert_eq!(
        lap_ok(&tb, "dig +tcp +short www.example.org").trim(),
        "192.0.2.80",
        "TCP to the original resolver"
    );
    assert!(lap_log(&tb).contains("www.example.org"));

    // A large answer: UDP is truncated (TC) at the client's size, TCP carries all of it.
    let udp = lap_ok(&tb, "dig +ignore +bufsize=1232 big.internal TXT");
    assert!(
        udp.contains(" tc ") || udp.contains(" tc;"),
        "TC set on a truncated UDP answer: {udp}"
    );
    let udp512 = lap_ok(&tb, "dig +ignore +noedns big.internal TXT");
    assert!(udp512.contains("ANSWER: 0"), "{udp512}");
    let tcp = lap_ok(&tb, "dig +tcp big.internal TXT");
    assert!(tcp.contains("ANSWER: 16"), "{tcp}");
    let retried = lap_ok(&tb, "dig big.internal TXT");
    assert!(
        retried.contains("ANSWER: 16") && retried.contains("(TCP)"),
        "dig retries over TCP after TC: {retried}"
    );
    // PTR for routed addresses, through the VPC resolver.
    assert_eq!(
        lap_ok(&tb, "dig +short -x 10.0.3.7").trim(),
        "batch.internal."
    );
    let ptr = lap_ok(&tb, "getent hosts 10.0.0.10");
    assert!(ptr.contains("api.internal"), "{ptr}");
    assert_eq!(
        lap_ok(&tb, "dig +short -x fd00:10::10").trim(),
        "v6.internal.",
        "ip6.arpa PTR for the routed IPv6 prefix"
    );
    assert_eq!(
        lap_ok(&tb, "dig +short AAAA v6.internal").trim(),
        "fd00:10::10"
    );

    // The VPC resolver saw the split names and the routed PTR, and never an outside name.
    let log = vpc_log(&tb);
    assert!(log.contains("query[A] api.internal"), "{log}");
    assert!(log.contains("db.rds.example.com"), "{log}");
    assert!(log.contains("7.3.0.10.in-addr.arpa"), "{log}");
    assert!(
        !log.contains("example.org"),
        "an outside name reached the VPC resolver:\n{log}"
    );

    let st = status(&tb);
    let dns = &st["dns"];
    assert_eq!(dns["mode"], "resolv.conf", "{st:#}");
    assert_eq!(dns["servers"][0], "10.0.0.13");
    assert!(dns["via_tunnel"].as_u64().unwrap() >= 8, "{dns:#}");
    assert!(dns["via_upstream"].as_u64().unwrap() >= 3, "{dns:#}");
    assert!(dns["truncated"].as_u64().unwrap() >= 2, "{dns:#}");
    assert_eq!(dns["servfail"], 0, "{dns:#}");
    assert!(
        dns["domains"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d == "0.10.in-addr.arpa"),
        "{dns:#}"
    );

    // The VPC resolver dies (the SSH link stays up): SERVFAIL at once, outside names fine.
    // Only the dnsmasq processes of this testbed's VPC namespace (pkill would see them all).
    let vpc = format!("{}-vpc", tb.name);
    let kill = format!(
        "for p in $(ip netns pids {vpc}); do [ \"$(cat /proc/$p/comm)\" = dnsmasq ] && kill -9 $p; done; true"
    );
    let out = Command::new("bash").args(["-c", &kill]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let t = Instant::now();
    let out = lap_ok(&tb, "dig +tries=1 +time=5 api.internal");
    assert!(out.contains("status: SERVFAIL"), "{out}");
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    assert_eq!(
        lap_ok(&tb, "dig +short www.example.org").trim(),
        "192.0.2.80"
    );

    let out = tb.mse_vpn(&["down"]).output().expect("mse-vpn down");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(vpn.wait_exit(Duration::from_secs(15)).success());
    assert_eq!(
        std::fs::read(&conf).unwrap(),
        original,
        "resolv.conf is byte-identical after down"
    );
    assert!(
        !tb.state_dir()
            .join(format!("{}.resolv.conf.orig", tb.tun()))
            .exists(),
        "the backup is removed"
    );
    assert_eq!(
        lap_ok(&tb, "getent hosts api.internal")
            .split_whitespace()
            .next(),
        Some("192.0.2.99"),
        "back to the laptop's own resolver"
    );
}

#[test]
fn servfail_at_once_when_the_jump_host_dies_and_sigkill_is_repaired() {
    if crate::harness::skip_unless_root() {
        return;
    }
    let tb = Testbed::up("dn2", &["--with", "nginx,dns"]);
    let conf = lap_resolv_conf(&tb);
    let original = std::fs::read(&conf).unwrap();

    // doctor: the integration it would use, the original nameserver, the VPC resolver.
    let mut doctor = tb.up_args(&["10.0.0.0/16"], &DOMAINS);
    doctor[0] = "doctor".into();
    let doctor: Vec<&str> = doctor.iter().map(String::as_str).collect();
    let out = tb.mse_vpn(&doctor).output().expect("doctor");
    let report = stdout(&out);
    assert!(out.status.success(), "{report}{}", stderr(&out));
    assert!(
        report.contains("dns integration    no systemd-resolved"),
        "{report}"
    );
    assert!(report.contains("keep going to 127.0.0.1"), "{report}");
    assert!(
        report.contains("10.0.0.13 answers DNS over TCP through the jump host"),
        "{report}"
    );
    let mut bad = doctor.clone();
    bad.extend(["--dns", "10.0.0.99"]);
    let out = tb.mse_vpn(&bad).output().expect("doctor");
    assert!(!out.status.success());
    assert!(
        stdout(&out).contains("FAIL  dns resolver"),
        "{}",
        stdout(&out)
    );

    // A jump host whose resolv.conf names only a loopback stub: `up` refuses, clearly, and
    // changes nothing. (Written in place: sshd's sessions see the bind-mounted inode.)
    let jump_conf = PathBuf::from(format!("/etc/netns/{}-jump/resolv.conf", tb.name));
    let jump_orig = std::fs::read(&jump_conf).unwrap();
    std::fs::write(&jump_conf, "nameserver 127.0.0.53\n").unwrap();
    let args = tb.up_args(&["10.0.0.0/16"], &DOMAINS);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (st, err) = tb.up_fails(&args);
    assert!(!st.success());
    assert!(err.contains("pass --dns ADDR"), "{err}");
    assert_eq!(std::fs::read(&conf).unwrap(), original);
    std::fs::write(&jump_conf, &jump_orig).unwrap();

    // No --dns: the jump host's resolv.conf names a loopback stub first, then 10.0.0.13.
    let mut vpn = tb.start(&["10.0.0.0/16"], &DOMAINS);
    assert!(
        vpn.stdout()
            .contains("→ 10.0.0.13 (the jump host's resolver) through the tunnel"),
        "discovered resolver: {}",
        vpn.stdout()
    );
    assert_eq!(lap_ok(&tb, "dig +short api.internal").trim(), "10.0.0.10");

    tb.control("sshd-kill");
    // Wait until the session noticed (sshd's death closes its TCP connections).
    let start = Instant::now();
    while status(&tb)["connections_up"] != 0 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "link loss unnoticed"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let t = Instant::now();
    let out = lap_ok(&tb, "dig +tries=1 +time=5 api.internal");
    let took = t.elapsed();
    assert!(out.contains("status: SERVFAIL"), "{out}");
    assert!(took < Duration::from_millis(1000), "SERVFAIL took {took:?}");
    let query_time = out
        .lines()
        .find_map(|l| l.strip_prefix(";; Query time: "))
        .unwrap_or("?");
    eprintln!(
        "SERVFAIL with the jump host down: dig query time {query_time}, whole command {took:?}"
    );
    // The host's DNS is not broken: outside names still resolve.
    assert_eq!(
        lap_ok(&tb, "dig +short www.example.org").trim(),
        "192.0.2.80"
    );
    assert!(status(&tb)["dns"]["servfail"].as_u64().unwrap() >= 1);

    tb.control("sshd-start");
    let start = Instant::now();
    loop {
        let out = tb.sh(10, "dig +short +tries=1 +time=2 api.internal");
        if stdout(&out).trim() == "10.0.0.10" {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "split DNS did not come back after the jump host returned"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // SIGKILL: resolv.conf stays rewritten until `down --force` restores it.
    vpn.kill9();
    assert_ne!(std::fs::read(&conf).unwrap(), original);
    let out = tb
        .mse_vpn(&["down", "--force"])
        .output()
        .expect("down --force");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("undone: resolv-conf"),
        "{}",
        stdout(&out)
    );
    assert_eq!(
        std::fs::read(&conf).unwrap(),
        original,
        "byte-identical after SIGKILL + down --force"
    );

    // Again, and this time the next `up` repairs it, then restores on its own down.
    let mut vpn = tb.start(&["10.0.0.0/16"], &DOMAINS);
    vpn.kill9();
    let vpn: Vpn = tb.start(&["10.0.0.0/16"], &DOMAINS);
    assert!(vpn.stderr().contains("repaired"), "{}", vpn.stderr());
    assert_eq!(lap_ok(&tb, "dig +short api.internal").trim(), "10.0.0.10");
    assert_eq!(
        lap_ok(&tb, "dig +short www.example.org").trim(),
        "192.0.2.80"
    );
    assert!(vpn.interrupt().success());
    assert_eq!(std::fs::read(&conf).unwrap(), original);
}

/// 50 clients, 20 UDP queries each, over a mix of split and outside names; prints the
/// latency percentiles; exits non-zero unless every query got the right answer.
const LOAD: &str = r#"
import socket, struct, threading, time, random, sys
NAMES = [("api.internal", "10.0.0.10"), ("db.rds.example.com", "10.0.0.12"),
         ("cache.internal", "10.0.0.11"), ("www.example.org", "192.0.2.80")]
def query(name, qid):
    q = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    for label in name.split("."):
        q += bytes([len(label)]) + label.encode()
    return q + b"\0" + struct.pack(">HH", 1, 1)
lat, bad, lock = [], [], threading.Lock()
def client(n):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(5)
    for i in range(20):
        name, want = NAMES[(n + i) % len(NAMES)]
        qid = random.randrange(65536)
        t = time.monotonic()
        s.sendto(query(name, qid), ("198.18.0.1", 53))
        try:
            r = s.recv(4096)
        except socket.timeout:
            with lock: bad.append((name, "timeout"))
            continue
        dt = time.monotonic() - t
        ok = (struct.unpack(">H", r[:2])[0] == qid and r[3] & 0xf == 0
              and socket.inet_aton(want) in r)
        with lock:
            lat.append(dt)
            if not ok: bad.append((name, r[3] & 0xf))
ts = [threading.Thread(target=client, args=(n,)) for n in range(50)]
t0 = time.monotonic()
for t in ts: t.start()
for t in ts: t.join()
wall = time.monotonic() - t0
lat.sort()
pct = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] * 1000
print(f"answered={len(lat)} bad={len(bad)} wall={wall:.2f}s qps={len(lat)/wall:.0f} "
      f"p50={pct(0.5):.1f}ms p90={pct(0.9):.1f}ms p99={pct(0.99):.1f}ms max={lat[-1]*1000:.1f}ms")
sys.exit(0 if len(lat) == 1000 and not bad else 1)
"#;

#[test]
fn a_thousand_queries_from_fifty_clients_are_all_answered() {
    if crate::harness::skip_unless_root() {
        return;
    }
    let tb = Testbed::up("dn3", &["--with", "dns"]);
    let mut extra = vec!["--dns", "10.0.0.13"];
    extra.extend(DOMAINS);
    let vpn = tb.start(&["10.0.0.0/16"], &extra);
    let out = tb.on_laptop(120, &["python3", "-c", LOAD]);
    let report = stdout(&out);
    eprintln!("split DNS load: {report}");
    assert!(
        out.status.success(),
        "not every query was answered correctly: {report}{}",
        stderr(&out)
    );
    let dns = &status(&tb)["dns"];
    assert_eq!(
        dns["via_tunnel"].as_u64().unwrap() + dns["via_upstream"].as_u64().unwrap(),
        1000,
        "{dns:#}"
    );
    assert_eq!(dns["via_upstream"], 250, "{dns:#}");
    // Pipelined on a few long-lived channels, not one per query: the VPC resolver saw at
    // most two TCP connections (from the jump host) for 750 queries.
    let out = tb
        .cmd_in(
            &format!("{}-vpc", tb.name),
            &["ss", "-Htn", "state", "established", "( sport = :53 )"],
        )
        .output()
        .unwrap();
    let conns = stdout(&out).lines().count();
    assert!(
        (1..=2).contains(&conns),
        "{conns} TCP connections at the VPC resolver:\n{}",
        stdout(&out)
    );
    let queries = vpc_log(&tb)
        .lines()
        .filter(|l| l.contains("query[A]") && l.ends_with("from 10.0.0.1"))
        .count();
    assert_eq!(
        queries, 750,
        "each split query reached the VPC resolver once, from the jump host"
    );
    assert!(vpn.interrupt().success());
}

/// Runs mse-vpn as if systemd-resolved were running: inside `ip netns exec` (a private mount
/// namespace) a tmpfs over /run/systemd holds an empty `resolve` directory, the laptop's
/// resolv.conf points at resolved's stub, and `resolvectl` is a stub on PATH that records its
/// arguments. This proves mse-vpn's resolved wiring (detection, journal, commands, undo);
/// resolved itself cannot run here (no systemd as PID 1).
fn with_fake_resolved(tb: &Testbed, args: &[&str]) -> Command {
    let bin = tb.dir.join("fakebin");
    std::fs::create_dir_all(&bin).unwrap();
    let log = tb.dir.join("resolvectl.log");
    let stub = format!("#!/bin/sh\necho \"$*\" >>{}\nexit 0\n", log.display());
    let path = bin.join("resolvectl");
    std::fs::write(&path, stub).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path_env = format!("{}:/usr/sbin:/usr/bin:/sbin:/bin", bin.display());
    tb.mse_vpn_with_env(
        &[("PATH", &path_env)],
        &[
            "bash",
            "-c",
            "mount -t tmpfs mse-vpn-test /run/systemd && mkdir /run/systemd/resolve && exec \"$0\" \"$@\"",
        ],
        args,
    )
}

#[test]
fn with_systemd_resolved_only_routing_domains_are_set_on_the_tun_link_and_reverted() {
    if crate::harness::skip_unless_root() {
        return;
    }
    let tb = Testbed::up("dn4", &["--with", "dns"]);
    let conf = lap_resolv_conf(&tb);
    std::fs::write(&conf, "nameserver 127.0.0.53\noptions edns0 trust-ad\n").unwrap();
    let original = std::fs::read(&conf).unwrap();
    let log = tb.dir.join("resolvectl.log");
    let tun = tb.tun();

    let mut extra = vec!["--dns", "10.0.0.13"];
    extra.extend(DOMAINS);
    let args = tb.up_args(&["10.0.0.0/16"], &extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let vpn = tb.start_cmd(with_fake_resolved(&tb, &args));
    assert!(
        vpn.stdout().contains("split DNS (resolved)"),
        "{}{}",
        vpn.stdout(),
        vpn.stderr()
    );
    let calls = std::fs::read_to_string(&log).unwrap();
    assert!(calls.contains("status\n"), "{calls}");
    assert!(
        calls.contains(&format!("dns {tun} 198.18.0.1\n")),
        "{calls}"
    );
    assert!(
        calls.contains(&format!(
            "domain {tun} ~internal ~rds.example.com ~0.10.in-addr.arpa\n"
        )),
        "{calls}"
    );
    assert!(
        calls.contains(&format!("default-route {tun} false\n")),
        "{calls}"
    );
    assert_eq!(
        std::fs::read(&conf).unwrap(),
        original,
        "with resolved, resolv.conf is never touched"
    );
    // What resolved would send to the link is answered through the tunnel.
    assert_eq!(
        lap_ok(&tb, "dig +short @198.18.0.1 api.internal").trim(),
        "10.0.0.10"
    );
    assert_eq!(status(&tb)["dns"]["mode"], "resolved");

    assert!(vpn.interrupt().success());
    let calls = std::fs::read_to_string(&log).unwrap();
    assert!(calls.ends_with(&format!("revert {tun}\n")), "{calls}");

    // SIGKILL, then `down --force` reverts the link from the journal.
    let mut vpn = tb.start_cmd(with_fake_resolved(&tb, &args));
    vpn.kill9();
    std::fs::write(&log, "").unwrap();
    let out = with_fake_resolved(&tb, &["down", "--force"])
        .output()
        .expect("down --force");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains(&format!("undone: resolved-link {tun}")),
        "{}",
        stdout(&out)
    );
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        format!("revert {tun}\n")
    );
    assert_eq!(std::fs::read(&conf).unwrap(), original);
}
