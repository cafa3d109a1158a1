//! End-to-end lifecycle tests: a jump host that dies and comes back, a black-holed link,
//! SIGKILL and repair, status during traffic. Real OpenSSH sshd in namespaces.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::{
    Testbed, Vpn, cpu_time, idle_fds, nofile, nofile_leaving, set_nofile, stderr, stdout,
};
use crate::outbound::OutputAsync;

/// `mse-vpn status --json` for this testbed's session.
pub(crate) fn status(tb: &Testbed) -> Value {
    let out = tb
        .mse_vpn(&["status", "--json", "--tun", &tb.tun()])
        .output()
        .expect("run mse-vpn status");
    assert!(out.status.success(), "status failed: {}", stderr(&out));
    let all: Value = serde_json::from_slice(&out.stdout).expect("status --json is JSON");
    all[0].clone()
}

/// Polls `status` until `pred` holds; returns how long it took.
fn wait_status(
    tb: &Testbed,
    limit: Duration,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> Duration {
    let start = Instant::now();
    loop {
        let st = status(tb);
        if pred(&st) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "status never showed {what} within {limit:?}; last: {st:#}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Retries a short curl until it succeeds; returns how long it took.
fn curl_until_ok(tb: &Testbed, limit: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let out = tb.on_laptop(
            3,
            &["curl", "-sS", "-m", "1", "http://10.0.0.10/index.html"],
        );
        if stdout(&out).contains("hello from the VPC") {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "no curl got through within {limit:?}: {}",
            stderr(&out)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A long, slow download in the background; returns its child (curl's exit code tells how it
/// ended).
fn slow_download(tb: &Testbed) -> std::process::Child {
    tb.cmd_in(
        &tb.lap(),
        &[
            "curl",
            "-sS",
            "-o",
            "/dev/null",
            "--limit-rate",
            "1M",
            "-m",
            "60",
            "http://10.0.0.10/10m.bin",
        ],
    )
    .stderr(std::process::Stdio::piped())
    .spawn()
    .expect("spawn curl")
}

#[test]
fn sshd_killed_and_restarted_the_tunnel_comes_back_by_itself() {
    if crate::harness::skip_unless_root() {
        return;
    }
    let tb = Testbed::up("lc1", &[]);
    let vpn = tb.start(
        &["10.0.0.0/16"],
        &["--keepalive", "2", "--open-timeout", "4"],
    );
    curl_until_ok(&tb, Duration::from_secs(5));
    let fresh = status(&tb);
    assert_eq!(
        fresh["reconnects"], 0,
        "a fresh session has not reconnected: {fresh:#}"
    );
    assert_eq!(fresh["state"], "connected", "{fresh:#}");
    let download = slow_download(&tb);
    wait_status(
        &tb,
        Duration::from_secs(5),
        "the download under way",
        |st| st["flows_active"].as_u64().unwrap() >= 1 && st["bytes_down"].as_u64().unwrap() > 0,
    );

    // sshd and all its children die at once.
    tb.control("sshd-kill");
    let lost = wait_status(&tb, Duration::from_secs(10), "the outage", |st| {
        st["state"] == "reconnecting" && st["connections_up"] == 0
    });
    // The download in progress is reset, not left hanging.
    let out = download.wait_with_output().expect("curl");
    assert!(
        !out.status.success(),
        "the download survived the jump host's death?"
    );
    let msg = stderr(&out);
    assert!(
        msg.contains("reset") || msg.contains("Recv failure") || msg.contains("transfer closed"),
        "curl should see a reset: {msg}"
    );
    // While the jump host is down, a new connection waits for a link (bounded by
    // --open-timeout) and is then refused: it neither leaks past the tunnel nor hangs.
    let started = Instant::now();
    let out = tb.on_laptop(
        20,
        &["curl", "-sS", "-m", "15", "http://10.0.0.10/index.html"],
    );
    let waited = started.elapsed();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("Couldn't connect") || stderr(&out).contains("refused"),
        "refused, not timed out: {}",
        stderr(&out)
    );
    assert!(
        waited > Duration::from_secs(3) && waited < Duration::from_secs(10),
        "refused after the open timeout (4 s), took {waited:?}"
    );

    // A connection made while the jump host is still down, shortly before it returns, waits
    // and goes through.
    std::thread::sleep(Duration::from_secs(5).saturating_sub(waited));
    let opened = status(&tb)["flows_opened"].as_u64().unwrap();
    let early = tb
        .cmd_in(
            &tb.lap(),
            &["curl", "-sS", "-m", "10", "http://10.0.0.10/index.html"],
        )
        .output_async();
    // Its SYN is held, waiting for a link, when sshd comes back.
    wait_status(
        &tb,
        Duration::from_secs(3),
        "the early connection waiting",
        |st| st["flows_opened"].as_u64().unwrap() > opened,
    );
    tb.control("sshd-start");
    let back = Instant::now();
    let out = early.join().expect("curl");
    let first = back.elapsed();
    assert!(
        stdout(&out).contains("hello from the VPC"),
        "the waiting connection went through: {}",
        stderr(&out)
    );
    assert!(
        first < Duration::from_secs(3),
        "through {first:?} after sshd was back"
    );
    curl_until_ok(&tb, Duration::from_secs(3));
    eprintln!(
        "outage seen after {lost:?}; a new flow refused after {waited:?} (--open-timeout 4); \
         the flow waiting for the link went through {first:?} after sshd was back"
    );
    let st = status(&tb);
    assert_eq!(st["state"], "connected", "{st:#}");
    assert_eq!(st["reconnects"], 1, "one outage, one reconnect: {st:#}");
    let history = st["history"].as_array().unwrap();
    assert!(
        history.iter().any(|h| h["state"] == "reconnecting"),
        "history shows the outage: {st:#}"
    );
    // All connections of the pool come back.
    wait_status(&tb, Duration::from_secs(10), "every connection up", |st| {
        st["connections_up"] == st["connections"]
    });
    eprintln!("pool fully back {:?} after sshd", back.elapsed());
    assert!(vpn.interrupt().success());
}

#[test]
fn a_black_holed_link_is_detected_by_keepalive_and_recovers() {
    if crate::harness::skip_unless_root() {
        return;
    }
    let tb = Testbed::up("lc2", &[]);
    let vpn = tb.start(&["10.0.0.0/16"], &["--keepalive", "3"]);
    curl_until_ok(&tb, Duration::from_secs(5));
    let rule = format!(
        "nft add table inet mvblk && nft add chain inet mvblk out '{{ type filter hook output priority 0; }}' && \
         nft add chain inet mvblk in '{{ type filter hook input priority 0; }}' && \
         nft add rule inet mvblk out ip daddr {j} drop && nft add rule inet mvblk in ip saddr {j} drop",
        j = tb.jump_addr
    );
    let out = tb.sh(10, &rule);
    assert!(out.status.success(), "nft: {}", stderr(&out));
    let blackholed = Instant::now();
    // keepalive 3 s: the loss is declared after three silent intervals (~9 s); allow slack.
    let detected = wait_status(&tb, Duration::from_secs(15), "the loss", |st| {
        st["state"] == "reconnecting"
    });
    eprintln!("black hole detected after {detected:?} (keepalive 3 s)");
    std::thread::sleep(Duration::from_secs(30).saturating_sub(blackholed.elapsed()));
    let out = tb.sh(10, "nft delete table inet mvblk");
    assert!(out.status.success(), "nft: {}", stderr(&out));
    let took = curl_until_ok(&tb, Duration::from_secs(30));
    eprintln!("traffic flowed again {took:?} after the black hole was lifted");
    let st = status(&tb);
    assert_eq!(st["reconnects"], 1, "one outage, one reconnect: {st:#}");
    assert!(vpn.interrupt().success());
}

#[test]
fn after_sigkill_down_force_and_the_next_up_remove_exactly_the_leftovers() {
    if crate::harness::skip_unless_root() {
        return;
    }
    // The jump host inside the routed CIDR: mse-vpn adds a bypass host route via the
    // laptop's gateway, which outlives a SIGKILLed process (the TUN and its routes do not:
    // the kernel deletes a non-persistent TUN with its last file descriptor).
    let tb = Testbed::up("lc3", &["--jump-in-cidr"]);
    let before = tb.snapshot();

    let mut vpn = tb.start(&["10.0.0.0/8"], &[]);
    // A second session may not take the same TUN or overlapping networks.
    let args = tb.up_args(&["10.0.0.0/16"], &[]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (st, err) = tb.up_fails(&args);
    assert!(!st.success());
    assert!(err.contains("another mse-vpn session"), "{err}");
    let mut other = tb.up_args(&["10.0.0.0/16"], &[]);
    let i = other.iter().position(|a| a == "--tun").unwrap();
    other[i + 1] = "mvother".into();
    let other: Vec<&str> = other.iter().map(String::as_str).collect();
    let (st, err) = tb.up_fails(&other);
    assert!(!st.success());
    assert!(err.contains("overlap"), "{err}");

    vpn.kill9();
    let left = tb.snapshot();
    assert_ne!(left, before, "SIGKILL left nothing to repair?");
    assert!(
        left.contains("10.99.0.1"),
        "the bypass route is left: {left}"
    );

    let out = tb
        .mse_vpn(&["down", "--force"])
        .output()
        .expect("down --force");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("undone"), "{}", stdout(&out));
    assert_eq!(
        tb.snapshot(),
        before,
        "down --force restores the host exactly"
    );
    let out = tb
        .mse_vpn(&["down", "--force"])
        .output()
        .expect("down --force");
    assert!(stdout(&out).contains("nothing left"), "{}", stdout(&out));

    // Again, but this time the next `up` repairs it.
    let mut vpn = tb.start(&["10.0.0.0/8"], &[]);
    vpn.kill9();
    assert_ne!(tb.snapshot(), before);
    let vpn: Vpn = tb.start(&["10.0.0.0/8"], &[]);
    assert!(vpn.stderr().contains("repaired"), "{}", vpn.stderr());
    curl_until_ok(&tb, Duration::from_secs(5));
    assert!(vpn.interrupt().success());
    assert_eq!(
        tb.snapshot(),
        before,
        "the repaired session cleaned up after itself"
    );
}

#[test]
fn status_json_shows_flows_and_bytes_moving_during_traffic() {
    if crate::harness::skip_unless_root() {
        return;
    }
    let tb = Testbed::up("lc4", &[]);
    let vpn = tb.start(&["10.0.0.0/16"], &["--connections", "2"]);
    let download = slow_download(&tb);
    wait_status(&tb, Duration::from_secs(5), "an active flow", |st| {
        st["flows_active"].as_u64().unwrap() >= 1 && st["bytes_down"].as_u64().unwrap() > 0
    });
    // The pool's second connection follows the first one, a second or two later.
    wait_status(&tb, Duration::from_secs(10), "both connections up", |st| {
        st["connections_up"] == 2
    });
    let a = status(&tb);
    let da = a["bytes_down"].as_u64().unwrap();
    // The measurement: traffic between two samples. The download reads 1 MB/s while the
    // jump host may send a whole window (up to 4 MiB) ahead, which then waits for curl to
    // read half of it: the count can stand still for two seconds of a slow flow.
    let b = (0..10)
        .map(|_| {
            std::thread::sleep(Duration::from_millis(500));
            status(&tb)
        })
        .find(|b| b["bytes_down"].as_u64().unwrap() > da + 100_000);
    let b = b.unwrap_or_else(|| panic!("bytes do not move past {da} within 5 s"));
    assert!(b["bytes_up"].as_u64().unwrap() > 0);
    assert_eq!(b["version"], 1);
    assert_eq!(b["state"], "connected");
    assert_eq!(b["connections"], 2);
    assert_eq!(b["connections_up"], 2);
    assert_eq!(b["reconnects"], 0, "{b:#}");
    assert_eq!(
        b["history"].as_array().unwrap().len(),
        1,
        "no state change yet: {b:#}"
    );
    assert_eq!(b["routes"][0], "10.0.0.0/16");
    assert_eq!(b["pid"].as_u64().unwrap() as i32, vpn.pid());
    // The human table too.
    let out = tb.mse_vpn(&["status"]).output().unwrap();
    let table = stdout(&out);
    assert!(table.contains("connected (2/2 connections up)"), "{table}");
    assert!(table.contains("10.0.0.0/16"), "{table}");
    let mut download = download;
    let _ = download.kill();
    let _ = download.wait();
    assert!(vpn.interrupt().success());
    // After the session, status says so.
    let out = tb.mse_vpn(&["status"]).output().unwrap();
    assert!(
        stdout(&out).contains("no mse-vpn session"),
        "{}",
        stdout(&out)
    );
}

/// `mse-vpn doctor ARGS` for this testbed: (success, stdout + stderr).
fn doctor(tb: &Testbed, cidrs: &[&str]) -> (bool, String) {
    let mut args = tb.up_args(cidrs, &[]);
    args[0] = "doctor".into();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = tb.mse_vpn(&args).output().expect("run mse-vpn doctor");
    (
        out.status.success(),
        format!("{}{}", stdout(&out), stderr(&out)),
    )
}

#[test]
fn doctor_changes_nothing_and_names_each_problem_with_its_fix() {
    if crate::harness::skip_unless_root() {
        return;
    }
    let tb = Testbed::up("lc5", &[]);
    let before = tb.snapshot();

    let (ok, report) = doctor(&tb, &["10.0.0.0/16"]);
    assert!(ok, "{report}");
    for line in [
        "ok    privileges",
        "ok    tun",
        "ok    routes",
        "ok    host key",
        "ok    login",
        "ok    forwarding",
        "ok    reverse forwarding",
    ] {
        assert!(report.contains(line), "missing '{line}' in:\n{report}");
    }
    assert!(report.contains("all checks passed"), "{report}");

    // A CIDR that covers the laptop's own LAN (an interface route).
    let (ok, report) = doctor(&tb, &["172.31.0.0/16"]);
    assert!(!ok, "{report}");
    assert!(report.contains("FAIL  routes"), "{report}");
    assert!(report.contains("overlaps"), "{report}");

    // A jump host that binds forwarded ports to loopback only: reverse calls could not
    // reach the laptop. A warning with the fix, not a failure (outbound still works).
    tb.edit_sshd_config("GatewayPorts clientspecified", "GatewayPorts no");
    let (ok, report) = doctor(&tb, &["10.0.0.0/16"]);
    assert!(ok, "{report}");
    assert!(report.contains("WARN  reverse forwarding"), "{report}");
    assert!(
        report.contains("GatewayPorts clientspecified"),
        "the fix is named: {report}"
    );

    // A jump host that forbids TCP forwarding.
    tb.edit_sshd_config("GatewayPorts no", "GatewayPorts clientspecified");
    tb.edit_sshd_config("AllowTcpForwarding yes", "AllowTcpForwarding no");
    let (ok, report) = doctor(&tb, &["10.0.0.0/16"]);
    assert!(!ok, "{report}");
    assert!(report.contains("FAIL  forwarding"), "{report}");
    assert!(
        report.contains("AllowTcpForwarding yes"),
        "the fix is named: {report}"
    );

    // An unknown host key.
    std::fs::write(tb.dir.join("known_hosts"), "").unwrap();
    let (ok, report) = doctor(&tb, &["10.0.0.0/16"]);
    assert!(!ok, "{report}");
    assert!(report.contains("FAIL  host key"), "{report}");
    assert!(report.contains("--accept-new-host-key"), "{report}");
    assert_eq!(
        std::fs::read_to_string(tb.dir.join("known_hosts")).unwrap(),
        "",
        "doctor never records a key"
    );

    assert_eq!(tb.snapshot(), before, "doctor changed the host");
}

#[test]
fn daemon_mode_detaches_once_up_and_down_stops_it() {
    if crate::harness::skip_unless_root() {
        return;
    }
    let tb = Testbed::up("lc6", &[]);
    let before = tb.snapshot();
    let args = tb.up_args(&["10.0.0.0/16"], &["--daemon"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let started = Instant::now();
    let out = tb.mse_vpn(&args).output().expect("up --daemon");
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(started.elapsed() < Duration::from_secs(15));
    let text = stdout(&out);
    assert!(
        text.contains("mse-vpn is up") && text.contains("running in the background"),
        "{text}"
    );
    curl_until_ok(&tb, Duration::from_secs(5));
    let st = status(&tb);
    assert_eq!(st["state"], "connected", "{st:#}");
    let log = tb.state_dir().join(format!("{}.log", tb.tun()));
    assert!(
        std::fs::read_to_string(&log)
            .unwrap()
            .contains("mse-vpn is up")
    );

    let out = tb.mse_vpn(&["down"]).output().expect("down");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("stopped"), "{}", stdout(&out));
    assert_eq!(tb.snapshot(), before, "down restored the host");

    // A daemon that cannot come up says so in its exit status.
    std::fs::write(tb.dir.join("known_hosts"), "").unwrap();
    let out = tb.mse_vpn(&args).output().expect("up --daemon");
    assert!(!out.status.success());
    assert!(stderr(&out).contains("not known"), "{}", stderr(&out));
    assert_eq!(tb.snapshot(), before);
}

/// Waits until the session's log (after byte `mark`) has `n` lines containing every one of
/// `words`; panics with the log if it does not within `limit`, or if the session exits.
fn wait_log_lines(vpn: &mut Vpn, mark: usize, words: &[&str], n: usize, limit: Duration) {
    let start = Instant::now();
    loop {
        let log = vpn.stderr();
        let seen = log
            .get(mark..)
            .unwrap_or_default()
            .lines()
            .filter(|l| words.iter().all(|w| l.contains(w)))
            .count();
        if seen >= n {
            return;
        }
        assert!(
            vpn.running(),
            "the session ended while waiting for {n} lines with {words:?}:\n{log}"
        );
        assert!(
            start.elapsed() < limit,
            "no {n} lines with {words:?} within {limit:?}:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn known_hosts_unreadable_for_want_of_descriptors_during_a_reconnect_is_retried() {
    if crate::harness::skip_unless_root() {
        return;
    }
    let tb = Testbed::up("lc7", &[]);
    let mut vpn = tb.start(&["10.0.0.0/16"], &["--keepalive", "2"]);
    curl_until_ok(&tb, Duration::from_secs(5));
    tb.control("sshd-kill");
    wait_status(&tb, Duration::from_secs(10), "the outage", |st| {
        st["state"] == "reconnecting" && st["connections_up"] == 0
    });
    // One descriptor left: a reconnect gets its TCP socket to the jump host, and then
    // opening known_hosts to check the host key fails with EMFILE (as when a local user's
    // DNS flood holds the others).
    let pid = vpn.pid();
    let (soft, _) = nofile(pid);
    set_nofile(pid, nofile_leaving(&idle_fds(pid), 1));
    let mark = vpn.stderr().len();
    tb.control("sshd-start");
    // Retried, not taken for an unknown key: the same failure twice, the session still up.
    wait_log_lines(
        &mut vpn,
        mark,
        &["reconnect failed", "known_hosts", "Too many open files"],
        2,
        Duration::from_secs(15),
    );
    set_nofile(pid, soft);
    let back = curl_until_ok(&tb, Duration::from_secs(15));
    eprintln!("traffic flowed again {back:?} after descriptors were available again");
    assert!(vpn.running());
    let st = status(&tb);
    assert_eq!(st["state"], "connected", "{st:#}");
    let log = vpn.stderr();
    assert!(!log.contains("not known"), "{log}");
    assert!(vpn.interrupt().success());
}

#[test]
fn a_host_key_that_changed_during_a_reconnect_stops_the_session() {
    if crate::harness::skip_unless_root() {
        return;
    }
    let tb = Testbed::up("lc8", &[]);
    let before = tb.snapshot();
    let mut vpn = tb.start(&["10.0.0.0/16"], &["--keepalive", "2"]);
    curl_until_ok(&tb, Duration::from_secs(5));
    tb.control("sshd-kill");
    wait_status(&tb, Duration::from_secs(10), "the outage", |st| {
        st["state"] == "reconnecting"
    });
    // The jump host comes back with another host key (a man in the middle, or a rebuilt
    // host): never retried, never accepted.
    let key = tb.dir.join("ssh_host_ed25519_key");
    std::fs::remove_file(&key).unwrap();
    std::fs::remove_file(tb.dir.join("ssh_host_ed25519_key.pub")).unwrap();
    crate::harness::keygen(&key, "", &["-t", "ed25519"]);
    tb.control("sshd-start");
    let status = vpn.wait_exit(Duration::from_secs(20));
    assert!(!status.success());
    let log = vpn.stderr();
    assert!(
        log.contains("CHANGED") && log.contains("known_hosts"),
        "the session says the key changed: {log}"
    );
    assert_eq!(
        tb.snapshot(),
        before,
        "the stopped session restored the host"
    );
}

#[test]
fn out_of_descriptors_the_control_socket_waits_instead_of_spinning() {
    if crate::harness::skip_unless_root() {
        return;
    }
    let tb = Testbed::up("lc9", &[]);
    let mut vpn = tb.start(&["10.0.0.0/16"], &[]);
    let pid = vpn.pid();
    let (soft, _) = nofile(pid);
    // Two descriptors left: two connections that never send a request are taken (and held
    // for the 5 s a request may take); the others wait in the listen queue, and accepting
    // them fails with EMFILE while it lasts.
    set_nofile(pid, nofile_leaving(&idle_fds(pid), 2));
    let sock = tb.state_dir().join(format!("{}.sock", tb.tun()));
    let mark = vpn.stderr().len();
    let silent: Vec<std::os::unix::net::UnixStream> = (0..20)
        .map(|_| std::os::unix::net::UnixStream::connect(&sock).expect("connect"))
        .collect();
    wait_log_lines(
        &mut vpn,
        mark,
        &["control socket accept failed", "Too many open files"],
        1,
        Duration::from_secs(5),
    );
    let (cpu, wall) = (cpu_time(pid), Instant::now());
    std::thread::sleep(Duration::from_secs(3));
    let busy = (cpu_time(pid) - cpu).as_secs_f64() / wall.elapsed().as_secs_f64();
    let failures = vpn.stderr()[mark..]
        .matches("control socket accept failed")
        .count();
    eprintln!(
        "out of descriptors: {:.1} % of a core over 3 s, {failures} failed accepts logged",
        busy * 100.0
    );
    assert!(
        busy < 0.10,
        "the accept loop spins: {:.0} % of a core",
        busy * 100.0
    );
    // The clients give up: the queue drains, and the socket answers again without more
    // descriptors (the loop paused, it did not give up).
    drop(silent);
    let back = Instant::now();
    loop {
        let out = tb
            .mse_vpn(&["status", "--json", "--tun", &tb.tun()])
            .output()
            .expect("run mse-vpn status");
        if out.status.success() {
            break;
        }
        assert!(
            back.elapsed() < Duration::from_secs(10),
            "status never answered again: {}",
            stderr(&out)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!(
        "status answered {:?} after the clients left",
        back.elapsed()
    );
    set_nofile(pid, soft);
    curl_until_ok(&tb, Duration::from_secs(5));
    assert!(vpn.interrupt().success());
}

/// The policy rules a session adds for replies to cloud callers, as `ip rule show` prints
/// them (the TUN's address is 198.18.0.1 when 10.0.0.0/16 is routed).
const REPLY_RULES: [&str; 2] = [
    "5210:\tfrom 198.18.0.1 lookup main suppress_prefixlength 0",
    "5211:\tfrom 198.18.0.1 lookup",
];

/// A directory holding an `ip` that runs the real one, except that while `flag` exists a
/// policy-rule deletion runs out of descriptors (the real `ip` under `prlimit --nofile=3`
/// cannot even load its libraries: EMFILE), as in a session that ran out of them. Returns
/// a PATH with it first.
fn ip_out_of_descriptors_for_rule_del(tb: &Testbed, flag: &std::path::Path) -> String {
    let real = ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("iproute2's ip");
    let bin = tb.dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let wrapper = bin.join("ip");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nif [ -e '{flag}' ]; then\n  case \" $* \" in *' rule del '*) exec prlimit --nofile=3 {real} \"$@\";; esac\nfi\nexec {real} \"$@\"\n",
            flag = flag.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

/// `ip rule show` in the laptop namespace.
fn rules(tb: &Testbed) -> String {
    stdout(&tb.on_laptop(10, &["ip", "rule", "show"]))
}

#[test]
fn an_undo_that_fails_is_kept_reported_and_done_by_the_next_down() {
    if crate::harness::skip_unless_root() {
        return;
    }
    let tb = Testbed::up("lc10", &[]);
    let before = tb.snapshot();
    let flag = tb.dir.join("ip-out-of-descriptors");
    let path = ip_out_of_descriptors_for_rule_del(&tb, &flag);
    let env = [("PATH", path.as_str())];
    let args = tb.up_args(&["10.0.0.0/16"], &[]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut vpn = tb.start_cmd(tb.mse_vpn_with_env(&env, &[], &args));
    curl_until_ok(&tb, Duration::from_secs(5));
    let journal = tb.state_dir().join(format!("{}.journal", tb.tun()));
    assert!(journal.exists());

    // `down` while deleting a rule fails: the session undoes the rest, keeps the two rules
    // in its journal and says so; so does `down`.
    std::fs::write(&flag, "").unwrap();
    let out = tb
        .mse_vpn_with_env(&env, &[], &["down"])
        .output()
        .expect("mse-vpn down");
    let status = vpn.wait_exit(Duration::from_secs(15));
    let said = format!("{}{}", stdout(&out), stderr(&out));
    assert!(!status.success(), "the session hides the failed undo");
    assert!(
        vpn.stderr()
            .contains("could not undo 2 host change(s), kept in"),
        "{}",
        vpn.stderr()
    );
    assert!(!out.status.success(), "down hides the failed undo: {said}");
    // The change it names is the one whose failure it quotes.
    assert!(
        said.contains("could not undo 2 host change(s)")
            && said.contains(
                "the first: `rule from 198.18.0.1 prio 5210 main-nodefault`: `ip -4 rule del from 198.18.0.1 priority 5210 "
            )
            && said.contains("Error 24"),
        "{said}"
    );
    let kept = std::fs::read_to_string(&journal).expect("the journal is kept");
    let entries: Vec<&str> = kept
        .lines()
        .filter(|l| !l.starts_with("mse-vpn-journal") && !l.starts_with("pid "))
        .collect();
    assert!(
        entries.len() == 2
            && entries[0] == "rule from 198.18.0.1 prio 5210 main-nodefault"
            && entries[1].starts_with("rule from 198.18.0.1 prio 5211 table "),
        "exactly what could not be undone: {kept}"
    );
    // Those two are left on the host, and only those.
    let now = tb.snapshot();
    for r in REPLY_RULES {
        assert!(now.contains(r), "{r:?} is left: {now}");
    }
    let others: String = now
        .lines()
        .filter(|l| !l.starts_with("5210:") && !l.starts_with("5211:"))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(others, before, "the rest is undone");
    // status tells too.
    let out = tb.mse_vpn(&["status"]).output().unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("is no longer running but left routes behind"),
        "{}",
        stderr(&out)
    );

    // The obstacle is gone: the next `down` undoes what was kept, and the host is as before.
    std::fs::remove_file(&flag).unwrap();
    let out = tb
        .mse_vpn_with_env(&env, &[], &["down"])
        .output()
        .expect("mse-vpn down");
    assert!(out.status.success(), "{}", stderr(&out));
    let said = stdout(&out);
    assert!(
        said.contains("undone: rule from 198.18.0.1 prio 5210")
            && said.contains("undone: rule from 198.18.0.1 prio 5211"),
        "{said}"
    );
    assert!(!journal.exists(), "the journal goes once all is undone");
    assert_eq!(tb.snapshot(), before);
}

#[test]
fn a_failed_up_leaves_a_rule_it_did_not_create() {
    if crate::harness::skip_unless_root() {
        return;
    }
    let tb = Testbed::up("lc11", &[]);
    // Someone else's rule, identical to the one mse-vpn adds first.
    let out = tb.on_laptop(
        10,
        &[
            "ip",
            "rule",
            "add",
            "from",
            "198.18.0.1",
            "priority",
            "5210",
            "lookup",
            "main",
            "suppress_prefixlength",
            "0",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let before = tb.snapshot();
    assert!(before.contains(REPLY_RULES[0]), "{before}");

    let args = tb.up_args(&["10.0.0.0/16"], &[]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (status, err) = tb.up_fails(&args);
    assert!(!status.success());
    assert!(err.contains("File exists"), "{err}");
    // What the failed up made is undone; the rule it did not make is still there.
    assert_eq!(tb.snapshot(), before, "{err}");
    let journal = tb.state_dir().join(format!("{}.journal", tb.tun()));
    assert!(!journal.exists(), "nothing of ours is left to undo");
    let out = tb.mse_vpn(&["down"]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("nothing left behind"),
        "{}",
        stdout(&out)
    );
    assert!(rules(&tb).contains(REPLY_RULES[0]), "{}", rules(&tb));
}

#[test]
fn a_signal_while_up_is_still_starting_stops_it_and_restores_the_host() {
    if crate::harness::skip_unless_root() {
        return;
    }
    // A jump host whose commands hang (a slow login shell): `up`'s address discovery waits
    // on them, and SIGTERM arrives in the middle of it. It used to be lost there (nothing
    // listened for it yet): `up` came up anyway and ignored every later signal.
    let tb = Testbed::up("lc12", &[]);
    tb.edit_sshd_config(
        "LogLevel VERBOSE",
        "LogLevel VERBOSE\nForceCommand sleep 30",
    );
    let before = tb.snapshot();
    let args = tb.up_args(&["10.0.0.0/16"], &[]);
    let mut vpn = Vpn::spawn(tb.mse_vpn(&crate::harness::strs(&args)));
    let start = Instant::now();
    while !tb.sshd_log().contains("Accepted publickey") {
        assert!(start.elapsed() < Duration::from_secs(20), "no login");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Logged in; the first command is under way.
    std::thread::sleep(Duration::from_millis(500));
    vpn.signal(nix::sys::signal::Signal::SIGTERM);
    // It ends by itself (wait_exit fails the test after 40 s), not by a signal's default.
    let status = vpn.wait_exit(Duration::from_secs(40));
    assert!(status.code().is_some(), "{status:?}\n{}", vpn.stderr());
    assert_eq!(tb.snapshot(), before, "the host is as it was");
}

/// A directory under `/run` for a sshd `AuthorizedKeysCommand` (sshd refuses one under
/// `/tmp`, whose mode lets others write), removed with its files when dropped.
struct RunDir(std::path::PathBuf);

impl RunDir {
    fn new(name: &str) -> RunDir {
        let dir = std::path::PathBuf::from(format!("/run/mse-vpn-it-{name}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).expect("create the /run dir");
        RunDir(dir)
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        // With it goes the hold: a key check still waiting on it ends.
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn a_connection_lost_while_the_jump_host_checks_the_key_is_retried_not_taken_for_a_refusal() {
    if crate::harness::skip_unless_root() {
        return;
    }
    // The jump host restarts while mse-vpn is half-way through logging in again: sshd has its
    // key and is checking it when it dies. That once counted as a refused key (russh answered
    // "failure, no methods left"), and mse-vpn never reconnected. Here sshd gets its keys
    // from an AuthorizedKeysCommand that waits while a `hold` file exists, so the moment is
    // exact: the command's `held` file says sshd is checking the key.
    let tb = Testbed::up("lc13", &[]);
    let run = RunDir::new("lc13");
    let (hold, held) = (run.0.join("hold"), run.0.join("held"));
    let command = run.0.join("keys");
    std::fs::write(
        &command,
        format!(
            "#!/bin/sh\nif [ -e {h} ]; then : > {d}; while [ -e {h} ]; do sleep 0.05; done; fi\n\
             exec cat {k}\n",
            h = hold.display(),
            d = held.display(),
            k = tb.dir.join("authorized_keys").display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        &command,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let file_line = format!(
        "AuthorizedKeysFile {}",
        tb.dir.join("authorized_keys").display()
    );
    tb.edit_sshd_config(
        &file_line,
        &format!(
            "AuthorizedKeysFile none\nAuthorizedKeysCommand {}\nAuthorizedKeysCommandUser root",
            command.display()
        ),
    );
    let mut vpn = tb.start(&["10.0.0.0/16"], &["--keepalive", "2"]);
    curl_until_ok(&tb, Duration::from_secs(5));

    std::fs::write(&hold, "").unwrap();
    tb.control("sshd-kill");
    wait_status(&tb, Duration::from_secs(10), "the outage", |st| {
        st["state"] == "reconnecting"
    });
    tb.control("sshd-start");
    // `held` appears when sshd checks the key.
    crate::harness::wait_for_file(&held, &vpn, Duration::from_secs(20));
    // sshd is checking the key: it dies now, and comes back with the check instant.
    tb.control("sshd-kill");
    std::fs::remove_file(&hold).unwrap();
    tb.control("sshd-start");
    let back = curl_until_ok(&tb, Duration::from_secs(20));
    eprintln!("traffic flowed again {back:?} after sshd came back");
    assert!(vpn.running(), "the session ended:\n{}", vpn.stderr());
    let st = status(&tb);
    assert_eq!(st["state"], "connected", "{st:#}");
    let log = vpn.stderr();
    assert!(
        !log.contains("authentication as"),
        "a lost connection was reported as a failed login:\n{log}"
    );
    assert!(vpn.interrupt().success());
}
