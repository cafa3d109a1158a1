//! End-to-end tests of a jump host shared by a team, against a real sshd whose
//! `MaxStartups` is full: `up` retries the connections sshd drops during the SSH banner (as
//! it does past MaxStartups) within the connect timeout, fails only at the timeout with the
//! count of refused tries, and costs sshd one pending connection at a time. The team itself
//! (100 laptops) is `scripts/bench-team`'s.
//!
//! sshd's own log (`LogLevel VERBOSE`: every "past MaxStartups" drop) says what it dropped.

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{Testbed, Vpn, curl_within, strs};

/// The CIDR every test routes.
const VPC: &str = "10.0.0.0/16";

fn drops(tb: &Testbed) -> usize {
    tb.sshd_log().matches("past MaxStartups").count()
}

/// A client in the laptop namespace that opens a TCP connection to sshd, reads its banner
/// and says nothing for `secs` seconds: one unauthenticated connection, pending at sshd until
/// it leaves. (A try that sshd itself drops, still busy with an earlier one, is repeated.)
fn hold_a_pending_connection(tb: &Testbed, secs: u32) -> Child {
    let script = format!(
        "for i in $(seq 50); do \
           if exec 3<>/dev/tcp/{addr}/22 && read -t 2 -r line <&3 && [[ $line == SSH-* ]]; then \
             echo held; exec sleep {secs}; fi; \
           exec 3<&-; sleep 0.1; \
         done; exit 1",
        addr = tb.jump_addr
    );
    let mut child = tb
        .cmd_in(&tb.lap(), &["bash", "-c", &script])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn the holder");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read the holder");
    assert_eq!(line.trim(), "held", "the holder never got sshd's banner");
    child
}

#[test]
fn up_retries_what_maxstartups_drops_and_fails_only_at_the_connect_timeout() {
    if crate::harness::skip_unless_root() {
        return;
    }
    let tb = Testbed::up("tm1", &["--with", "nginx"]);
    let before = tb.snapshot();
    // sshd drops every new connection while one is pending (`MaxStartups 1`), and logs each
    // (the testbed's LogLevel VERBOSE).
    tb.edit_sshd_config("MaxStartups 100:30:200", "MaxStartups 1");

    // A login that stays pending for 4 s: `up` is refused until it leaves, then gets in.
    let mut holder = hold_a_pending_connection(&tb, 4);
    let dropped_before = drops(&tb);
    let started = Instant::now();
    let vpn = Vpn::spawn(tb.mse_vpn(&strs(&tb.up_args(&[VPC], &[]))));
    vpn.wait_up(Duration::from_secs(15));
    let took = started.elapsed();
    let _ = holder.wait();
    let err = vpn.stderr();
    assert!(
        err.contains("is refusing new connections for now (MaxStartups?); retrying"),
        "{err}"
    );
    assert_eq!(
        err.lines()
            .filter(|l| l.contains("WARN") && l.contains("refusing new connections"))
            .count(),
        1,
        "said once: {err}"
    );
    assert!(
        drops(&tb) > dropped_before,
        "sshd dropped: {}",
        tb.sshd_log()
    );
    assert!(
        took >= Duration::from_secs(3) && took < Duration::from_secs(8),
        "up after the pending login left: {took:?}"
    );
    assert!(curl_within(&tb, Duration::from_secs(5)), "{}", vpn.stderr());
    // The pool's other connections follow the first one, one at a time: with MaxStartups 1,
    // sshd drops none of them.
    let after_up = drops(&tb);
    let jump = format!("{}-jump", tb.name);
    let start = Instant::now();
    let established = || {
        let out = tb
            .cmd_in(
                &jump,
                &["ss", "-Htn", "state", "established", "( sport = :22 )"],
            )
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).lines().count()
    };
    while established() < 4 && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(established(), 4, "the whole pool: {}", vpn.stderr());
    assert_eq!(drops(&tb), after_up, "no drop after the first login");
    assert!(vpn.interrupt().success());
    assert_eq!(tb.snapshot(), before);

    // A login that stays pending for longer than the connect timeout: `up` fails at the
    // timeout, saying how many tries were refused, with nothing changed on the host.
    let mut holder = hold_a_pending_connection(&tb, 20);
    let started = Instant::now();
    let (status, err) = tb.up_fails(&strs(&tb.up_args(&[VPC], &["--connect-timeout", "4"])));
    let took = started.elapsed();
    let _ = holder.kill();
    let _ = holder.wait();
    assert_eq!(status.code(), Some(5), "{err}");
    assert!(
        took >= Duration::from_secs(4) && took < Duration::from_secs(8),
        "failed at the timeout: {took:?}"
    );
    let line = err
        .lines()
        .find(|l| l.contains("refused new connections for 4 s"))
        .unwrap_or_else(|| panic!("{err}"));
    let tries: u32 = line
        .split('(')
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    assert!(tries >= 4, "{line}");
    assert_eq!(tb.snapshot(), before);
}
