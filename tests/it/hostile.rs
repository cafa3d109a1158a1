//! Hostile load end to end, against a real sshd: a SYN flood to VPC addresses that never
//! answer is bounded where it costs (channel opens pending at the jump host never exceed
//! `--max-opening`), costs mse-vpn little memory, leaves an existing flow working at its
//! latency, and new connections work again after it; a channel that opens after its app
//! gave up is closed at once, so its VPC server sees the connection end; connections over the
//! opening bound are reset at once, with rate-limited warnings; connections refused by the
//! VPC leave nothing behind in mse-vpn (russh patch 0008).

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use crate::harness::{Testbed, Vpn, cpu_time, curl_within, rss_mib, stderr, stdout};
use crate::lifecycle::status;

/// VPC addresses where nothing answers. The jump host routes them to the VPC namespace,
/// which does not forward: their SYNs are dropped in silence and a connect to them hangs
/// until the jump host's kernel gives up. (Left on the VPC's own link, a connect would fail
/// within 3 s instead, as nobody answers ARP for them.)
const SILENT_NET: &str = "10.0.200.0/24";
/// `net.ipv4.tcp_syn_retries` of the jump host where a test waits for its connects to give
/// up, and how long its connects to [`SILENT_NET`] then last (measured: 7 s). Linux's
/// default, 6, makes it about two minutes: see
/// [`a_syn_flood_is_bounded_at_the_jump_host_and_recovers`].
const JUMP_SYN_RETRIES: u32 = 2;
const JUMP_CONNECT_SECS: u64 = 7;

/// Routes [`SILENT_NET`] from the jump host into the VPC, where it is dropped.
fn silence(tb: &Testbed) {
    let vpc = format!("{}-vpc", tb.name);
    let out = tb
        .cmd_in(&vpc, &["sysctl", "-n", "net.ipv4.ip_forward"])
        .output()
        .unwrap();
    assert_eq!(stdout(&out).trim(), "0", "the VPC must not forward");
    let out = tb
        .cmd_in(
            &jump(tb),
            &["ip", "route", "add", SILENT_NET, "via", "10.0.0.10"],
        )
        .output()
        .unwrap();
    assert!(out.status.success(), "ip route: {}", stderr(&out));
}

/// Makes the jump host's connects to [`SILENT_NET`] give up after [`JUMP_CONNECT_SECS`].
fn shorten_jump_connects(tb: &Testbed) {
    let retries = format!("net.ipv4.tcp_syn_retries={JUMP_SYN_RETRIES}");
    let out = tb
        .cmd_in(&jump(tb), &["sysctl", "-qw", &retries])
        .output()
        .unwrap();
    assert!(out.status.success(), "sysctl: {}", stderr(&out));
}

fn jump(tb: &Testbed) -> String {
    format!("{}-jump", tb.name)
}

/// Connects sshd has pending at the jump host (sockets in SYN-SENT).
fn pending_at_jump(tb: &Testbed) -> usize {
    let out = tb
        .cmd_in(&jump(tb), &["ss", "-Htn", "state", "syn-sent"])
        .output()
        .unwrap();
    assert!(out.status.success(), "ss: {}", stderr(&out));
    stdout(&out).lines().count()
}

/// Writes a helper script into the testbed's directory; returns its path.
fn script(tb: &Testbed, name: &str, text: &str) -> String {
    let path = tb.dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.to_string_lossy().into_owned()
}

/// WARN lines of mse-vpn's log that contain `what`.
fn warnings(vpn: &Vpn, what: &str) -> usize {
    vpn.stderr()
        .lines()
        .filter(|l| l.contains(" WARN ") && l.contains(what))
        .count()
}

/// What mse-vpn logs for a SYN refused over `--max-opening` (`CloseReason::OpenLimit`).
const OPEN_LIMIT: &str = "too many connections were being opened at once";

// ----- 1. A SYN flood -----

/// `flood.py N RATE KEEP`: N non-blocking connects at RATE per second, to ports of every
/// address of [`SILENT_NET`], never more than KEEP sockets open at once (the oldest is closed
/// first: an app giving up, which sends nothing). Prints `start T` and `end T REFUSED` (T
/// monotonic seconds; REFUSED: connects reset by mse-vpn).
const FLOOD: &str = r#"
import collections, errno, socket, sys, time
n, rate, keep = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
socks = collections.deque()
refused = 0
def drop(s):
    global refused
    if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == errno.ECONNREFUSED:
        refused += 1
    s.close()
t0 = time.monotonic()
print("start %.3f" % t0, flush=True)
for i in range(n):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setblocking(False)
    s.connect_ex(("10.0.200.%d" % (1 + i % 254), 1000 + i // 254))
    socks.append(s)
    if len(socks) > keep:
        drop(socks.popleft())
    ahead = (i + 1) / rate - (time.monotonic() - t0)
    if ahead > 0:
        time.sleep(ahead)
end = time.monotonic()
while socks:
    drop(socks.popleft())
print("end %.3f %d" % (end, refused), flush=True)
"#;

/// `pings.py SECS`: PINGs redis in the VPC over one connection for SECS seconds, 50 a
/// second; prints `T RTT_US` per PING (T monotonic seconds). Fails if a PING gets no answer
/// within 5 s.
const PINGS: &str = r#"
import socket, sys, time
s = socket.create_connection(("10.0.0.11", 6379), timeout=5)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    t = time.monotonic()
    s.sendall(b"PING\r\n")
    assert s.recv(64) == b"+PONG\r\n"
    print("%.4f %d" % (t, int((time.monotonic() - t) * 1e6)), flush=True)
    time.sleep(0.02)
"#;

/// PINGs (50 a second) measured before the flood starts.
const BASELINE_PINGS: usize = 100;
/// The flood: connects, their rate, and how many sockets it keeps open (about 5 s of them).
const FLOOD_CONNECTS: usize = 20_000;
const FLOOD_RATE: usize = 1_667;
const FLOOD_KEEP: usize = 8_000;
/// mse-vpn's open timeout in the flood test: apps give up on their opens (as far as mse-vpn
/// is concerned) well before the jump host does, so most pending opens are abandoned ones.
const FLOOD_OPEN_TIMEOUT: &str = "3";
/// `--max-opening`'s default (`DEFAULT_MAX_OPENING`), and the slack allowed over it at the
/// jump host: sockets of opens that just failed (sshd closes them within its loop turn).
const MAX_OPENING: usize = 1024;
const PENDING_SLACK: usize = 16;
/// Bounds on mse-vpn's resident memory, over its baseline before the flood. While it lasts:
/// at most `MAX_OPENING` pending opens plus the flows waiting for them (each a held SYN
/// header, a flow entry and russh's open state, a few KiB: about 4 MiB measured in all);
/// 24 MiB is 16 KiB per pending open plus 8 MiB of slack. Before the opening bound, this
/// flood's rate would hold about 5,000 flows (1,667/s for the 3 s open timeout) and 11,000
/// pending opens, and the issue's flood took 300 MiB and kept it. After: everything the
/// flood held is freed once the jump host answered its opens; 8 MiB is the allocator's
/// leeway.
const RSS_DURING_MIB: u64 = 24;
const RSS_AFTER_MIB: u64 = 8;
/// The existing flow's latency after the flood: its p50 from 10 to 20 s after the flood
/// ended must be within 2 ms or 3 × its p50 before the flood (this debug build shares 2
/// cores with the flood's leftovers and other tests).
const LATENCY_FLOOR_US: u64 = 2_000;
const LATENCY_FACTOR: u64 = 3;

/// One sample of the flood's cost.
#[derive(Clone, Copy, Debug)]
struct Sample {
    /// Connects pending at the jump host.
    pending: usize,
    /// mse-vpn's RSS, MiB.
    rss: u64,
}

/// Samples [`Sample`]s every 200 ms on a thread until stopped.
struct Sampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<Sample>>,
}

impl Sampler {
    fn start(tb: &Testbed, pid: i32) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let (s, jump) = (stop.clone(), jump(tb));
        let thread = std::thread::spawn(move || {
            let mut v = Vec::new();
            while !s.load(Ordering::Relaxed) {
                let out = std::process::Command::new("ip")
                    .args(["netns", "exec", &jump, "ss", "-Htn", "state", "syn-sent"])
                    .output()
                    .unwrap();
                v.push(Sample {
                    pending: stdout(&out).lines().count(),
                    rss: rss_mib(pid),
                });
                std::thread::sleep(Duration::from_millis(200));
            }
            v
        });
        Sampler { stop, thread }
    }

    fn stop(self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

/// Runs Python script `text` (written to the testbed's directory as `name`) with `args` in
/// namespace `ns`, its stdin piped and its stderr the test's; returns it and its stdout's
/// lines, read on a thread.
fn python(
    tb: &Testbed,
    ns: &str,
    name: &str,
    text: &str,
    args: &[&str],
) -> (Child, mpsc::Receiver<String>) {
    let path = script(tb, name, text);
    let mut argv = vec!["python3", path.as_str()];
    argv.extend_from_slice(args);
    let mut child = tb
        .cmd_in(ns, &argv)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

/// The median of `v` (sorted here).
fn p50(mut v: Vec<u64>) -> u64 {
    assert!(!v.is_empty(), "no samples");
    v.sort_unstable();
    v[(v.len() - 1) / 2]
}

/// Round trips (µs) of the PINGs sent in `[from, to)` (monotonic seconds).
fn rtts(pings: &[(f64, u64)], from: f64, to: f64) -> Vec<u64> {
    pings
        .iter()
        .filter(|(t, _)| *t >= from && *t < to)
        .map(|(_, r)| *r)
        .collect()
}

/// A flood of connection attempts to silent VPC addresses (about 20,000 at 1,667/s, the
/// issue's rate) from the laptop, while a redis client PINGs over a flow opened before it.
/// Checks that the channel opens pending at the jump host stay within `--max-opening`,
/// mse-vpn's memory stays small and comes back, the redis flow never stalls and its latency
/// is back to normal within 20 s of the flood's end, and a new connection works again once
/// the jump host gave up on the flood's connects.
///
/// The jump host's connects are made to give up after 7 s (`tcp_syn_retries` 2) to keep
/// this test short: with Linux's default (127 s), the flood's abandoned opens, still counted
/// against `--max-opening` until the jump host answers them, keep refusing every new
/// connection for about two minutes after the flood (measured: 125 s). Recovery is bounded
/// by the jump host's connect timeout, not by the flood's end.
#[test]
fn a_syn_flood_is_bounded_at_the_jump_host_and_recovers() {
    if crate::harness::skip_unless_root() {
        return;
    }
    let tb = Testbed::up("hos1", &["--with", "nginx,redis"]);
    silence(&tb);
    shorten_jump_connects(&tb);
    let vpn = tb.start(&["10.0.0.0/16"], &["--open-timeout", FLOOD_OPEN_TIMEOUT]);
    let pid = vpn.pid();
    tb.assert_curl_index();
    let rss_before = rss_mib(pid);

    // The redis flow, from 3 s before the flood to 22 s after it.
    let flood_secs = FLOOD_CONNECTS as f64 / FLOOD_RATE as f64;
    let ping_secs = 3.0 + flood_secs + 22.0;
    let ping_secs = format!("{ping_secs:.0}");
    let (mut pinger, ping_lines) = python(&tb, &tb.lap(), "pings.py", PINGS, &[&ping_secs]);
    // The latency before the flood: BASELINE_PINGS of them (about 2 s), collected first.
    let mut ping_log: Vec<String> = Vec::new();
    while ping_log.len() < BASELINE_PINGS {
        ping_log.push(
            ping_lines
                .recv_timeout(Duration::from_secs(10))
                .expect("a redis PING before the flood"),
        );
    }

    let sampler = Sampler::start(&tb, pid);
    let (mut flooder, flood_lines) = python(
        &tb,
        &tb.lap(),
        "flood.py",
        FLOOD,
        &[
            &FLOOD_CONNECTS.to_string(),
            &FLOOD_RATE.to_string(),
            &FLOOD_KEEP.to_string(),
        ],
    );
    let start_line = flood_lines
        .recv_timeout(Duration::from_secs(10))
        .expect("the flood's start");
    let flood_start: f64 = start_line.strip_prefix("start ").unwrap().parse().unwrap();
    // New connections during the flood: tried once a second, counted.
    let mut tried_during = 0;
    let mut ok_during = 0;
    let end_line = loop {
        if let Ok(line) = flood_lines.recv_timeout(Duration::from_secs(1)) {
            break line;
        }
        assert!(tried_during < 60, "the flood did not end");
        tried_during += 1;
        let out = tb.on_laptop(3, &["curl", "-sS", "-m", "1", "http://10.0.0.10/"]);
        ok_during += usize::from(stdout(&out).trim() == "hello from the VPC");
    };
    let flood_ended = Instant::now();
    let end: Vec<&str> = end_line.split_whitespace().collect();
    let (flood_end, refused): (f64, usize) = (end[1].parse().unwrap(), end[2].parse().unwrap());
    assert!(flooder.wait().unwrap().success());

    // New connections work again once the jump host gave up on the flood's connects.
    assert!(
        curl_within(&tb, Duration::from_secs(JUMP_CONNECT_SECS + 8)),
        "no new connection got through within {} s of the flood's end (pending at the jump host: {})",
        JUMP_CONNECT_SECS + 8,
        pending_at_jump(&tb)
    );
    let recovered = flood_ended.elapsed();

    // Until the PINGs cover the 20 s after the flood (the latency is measured 10 to 20 s
    // after it, and the memory and pending connects at its end).
    loop {
        let line = ping_lines
            .recv_timeout(Duration::from_secs(10))
            .expect("redis PINGs after the flood");
        let t: f64 = line.split_once(' ').unwrap().0.parse().unwrap();
        ping_log.push(line);
        if t >= flood_end + 20.0 {
            break;
        }
    }
    let samples = sampler.stop();
    let rss_after = rss_mib(pid);
    let pending_after = pending_at_jump(&tb);

    assert!(pinger.wait().unwrap().success(), "a redis PING failed");
    ping_log.extend(ping_lines.try_iter());
    let pings: Vec<(f64, u64)> = ping_log
        .iter()
        .map(|l| {
            let (t, r) = l.split_once(' ').unwrap();
            (t.parse().unwrap(), r.parse().unwrap())
        })
        .collect();
    let before = p50(rtts(&pings, 0.0, flood_start));
    let during_rtts = rtts(&pings, flood_start, flood_end);
    let during_max = during_rtts.iter().copied().max().unwrap_or(0);
    let during = p50(during_rtts);
    let after = p50(rtts(&pings, flood_end + 10.0, flood_end + 20.0));
    let gap = pings
        .windows(2)
        .map(|w| w[1].0 - w[0].0)
        .fold(0.0, f64::max);
    let peak = samples.iter().map(|s| s.pending).max().unwrap();
    let rss_peak = samples.iter().map(|s| s.rss).max().unwrap();
    let st = status(&tb);
    let log_lines = warnings(&vpn, OPEN_LIMIT);
    println!(
        "flood: {FLOOD_CONNECTS} connects in {:.1} s, {refused} reset by mse-vpn; \
         pending at the jump host: peak {peak}, {pending_after} 20 s after; \
         RSS {rss_before} MiB before, peak {rss_peak}, {rss_after} after; \
         redis p50 {before} µs before, {during} during (max {during_max}), {after} 10-20 s after, \
         longest gap {gap:.3} s; new connections: {ok_during} of {tried_during} during, \
         working again {recovered:.1?} after; flows_over_limit {}; {log_lines} warning lines",
        flood_end - flood_start,
        st["flows_over_limit"]
    );

    assert!(
        peak <= MAX_OPENING + PENDING_SLACK,
        "{peak} connects pending at the jump host (bound {MAX_OPENING})"
    );
    assert!(
        peak >= MAX_OPENING / 2,
        "the flood never filled the opening bound (peak {peak}): the test proves nothing"
    );
    assert!(
        refused > FLOOD_CONNECTS / 2,
        "only {refused} connects were reset at once"
    );
    assert!(
        rss_peak <= rss_before + RSS_DURING_MIB,
        "RSS {rss_before} -> {rss_peak} MiB during the flood"
    );
    assert!(
        rss_after <= rss_before + RSS_AFTER_MIB,
        "RSS {rss_before} -> {rss_after} MiB 20 s after the flood"
    );
    assert_eq!(pending_after, 0, "connects left pending at the jump host");
    // The redis flow kept working: no PING went unanswered for a second.
    assert!(gap < 1.0, "the redis flow stalled for {gap:.3} s");
    let bound = LATENCY_FLOOR_US.max(LATENCY_FACTOR * before);
    assert!(
        after <= bound,
        "redis p50 {after} µs 10-20 s after the flood (before: {before} µs; bound {bound})"
    );
    assert!(flows_idle(&tb), "flows left: {:#}", status(&tb));
    assert!(vpn.interrupt().success());
}

/// True once `status` shows no active flow (within 5 s).
fn flows_idle(tb: &Testbed) -> bool {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        if status(tb)["flows_active"] == 0 {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

// ----- 2. A channel that opens after its app gave up -----

/// The VPC server's port in the late-open test.
const LATE_PORT: u16 = 9000;

/// `late_server.py PORT`: on 10.0.0.10:PORT, streams to each client as fast as it takes
/// (64 KiB writes) until the connection fails; prints `listening`, then `accepted` and
/// `closed SECS BYTES ERROR` for each client (SECS from its accept).
const LATE_SERVER: &str = r#"
import socket, sys, time
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("10.0.0.10", int(sys.argv[1])))
srv.listen(8)
print("listening", flush=True)
chunk = b"x" * 65536
while True:
    c, _ = srv.accept()
    t0 = time.monotonic()
    print("accepted", flush=True)
    sent = 0
    try:
        while True:
            sent += c.send(chunk)
    except OSError as e:
        print("closed %.3f %d %s" % (time.monotonic() - t0, sent, type(e).__name__), flush=True)
    c.close()
"#;

/// `connect.py HOST PORT`: one connect (20 s at most); prints `OUTCOME SECS`.
const CONNECT: &str = r#"
import socket, sys, time
t = time.monotonic()
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=20)
    r = "connected"
except OSError as e:
    r = type(e).__name__
print(r, "%.3f" % (time.monotonic() - t), flush=True)
"#;

/// What the VPC server may send before mse-vpn's close reaches it: its socket buffers, the
/// jump host's and the channel's window (2 MiB each way). Before channels confirmed after
/// their app gave up were closed, such a channel streamed gigabytes into mse-vpn.
const LATE_BYTES_MAX: u64 = 32 << 20;
/// mse-vpn's CPU while nothing moves, over 5 s, at most (10 % of a core).
const IDLE_CPU_MAX: Duration = Duration::from_millis(500);

/// A VPC server that drops SYNs for a while, then accepts and streams: with `--open-timeout
/// 3`, the app gets its reset at about 3 s while the jump host still connects; when the
/// server lets the connect through, the channel that opens (nobody wants it any more) is
/// closed at once. The server sees its connection end within 2 s, holds no connection from
/// the jump host, and mse-vpn stays idle with no flow.
#[test]
fn a_channel_that_opens_after_its_app_gave_up_is_closed_at_once() {
    if crate::harness::skip_unless_root() {
        return;
    }
    let tb = Testbed::up("hos2", &["--with", "none"]);
    let vpc = format!("{}-vpc", tb.name);
    let nft = |rules: &str| {
        let out = tb.cmd_in(&vpc, &["bash", "-c", rules]).output().unwrap();
        assert!(out.status.success(), "nft: {}", stderr(&out));
    };
    nft(&format!(
        "nft add table inet mvhold && \
         nft add chain inet mvhold in '{{ type filter hook input priority 0; }}' && \
         nft add rule inet mvhold in tcp dport {LATE_PORT} 'tcp flags & (syn | ack) == syn' drop"
    ));
    let port = LATE_PORT.to_string();
    let (mut server, events) = python(&tb, &vpc, "late_server.py", LATE_SERVER, &[&port]);
    assert_eq!(
        events.recv_timeout(Duration::from_secs(10)).as_deref(),
        Ok("listening")
    );
    let vpn = tb.start(&["10.0.0.0/16"], &["--open-timeout", "3"]);
    let pid = vpn.pid();

    // The app's connect: reset at the open timeout, with the jump host still connecting.
    let connect = script(&tb, "connect.py", CONNECT);
    let out = tb.on_laptop(30, &["python3", &connect, "10.0.0.10", &port]);
    let said = stdout(&out);
    let (outcome, secs) = said.trim().split_once(' ').expect("an outcome");
    let reset_after: f64 = secs.parse().unwrap();
    assert!(
        outcome == "ConnectionRefusedError" || outcome == "ConnectionResetError",
        "the app's connect: {said}{}",
        stderr(&out)
    );
    assert!(
        (2.9..5.0).contains(&reset_after),
        "the app was reset after {reset_after} s (open timeout 3 s)"
    );
    assert_eq!(
        pending_at_jump(&tb),
        1,
        "the jump host's connect should still be pending"
    );

    // The server lets the jump host's connect through (its next SYN, at 7 s).
    nft("nft delete table inet mvhold");
    let released = Instant::now();
    assert_eq!(
        events.recv_timeout(Duration::from_secs(12)).as_deref(),
        Ok("accepted"),
        "the jump host's connect never arrived"
    );
    let accepted = released.elapsed();
    let closed = events
        .recv_timeout(Duration::from_secs(5))
        .unwrap_or_else(|_| {
            let cpu = cpu_time(pid);
            std::thread::sleep(Duration::from_secs(2));
            panic!(
                "the late channel was not closed: the server still streams (mse-vpn used {:?} of \
                 CPU in 2 s; its RSS is {} MiB; status {:#})",
                cpu_time(pid) - cpu,
                rss_mib(pid),
                status(&tb)
            )
        });
    let f: Vec<&str> = closed.split_whitespace().collect();
    assert_eq!(f[0], "closed", "{closed}");
    let (secs, bytes): (f64, u64) = (f[1].parse().unwrap(), f[2].parse().unwrap());

    // Nothing left: no connection at the server or the jump host, no flow, no CPU.
    let cpu = cpu_time(pid);
    std::thread::sleep(Duration::from_secs(5));
    let cpu = cpu_time(pid) - cpu;
    let established = |ns: &str| {
        let out = tb
            .cmd_in(
                ns,
                &[
                    "ss",
                    "-Htn",
                    "state",
                    "established",
                    &format!("( sport = :{LATE_PORT} or dport = :{LATE_PORT} )"),
                ],
            )
            .output()
            .unwrap();
        stdout(&out)
    };
    let (at_vpc, at_jump) = (established(&vpc), established(&jump(&tb)));
    let st = status(&tb);
    println!(
        "late open: app reset after {reset_after:.2} s; the connect went through {accepted:.1?} after \
         the SYNs were let in; closed {secs:.3} s after the server accepted ({bytes} bytes sent, {}); \
         mse-vpn CPU over the next 5 s {cpu:?}; flows_active {}",
        f[3], st["flows_active"],
    );
    assert!(secs < 2.0, "closed only {secs} s after the server accepted");
    assert!(
        bytes <= LATE_BYTES_MAX,
        "{bytes} bytes streamed into a channel nobody wanted"
    );
    assert!(
        at_vpc.is_empty() && at_jump.is_empty(),
        "still connected: {at_vpc}{at_jump}"
    );
    assert!(cpu <= IDLE_CPU_MAX, "mse-vpn used {cpu:?} of CPU in 5 s");
    assert_eq!(st["flows_active"], 0, "{st:#}");
    let _ = server.kill();
    let _ = server.wait();
    assert!(vpn.interrupt().success());
}

// ----- 3. The opening bound -----

/// `bound.py HELD`: HELD non-blocking connects to 10.0.200.1:80, kept open; prints `held`
/// once made. Then for each line `N DSTS` on stdin: N blocking connects (5 s at most each)
/// spread over DSTS addresses 10.0.200.2..; prints `OUTCOME MS` for each, then `done`.
const BOUND: &str = r#"
import socket, sys, time
keep = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.setblocking(False)
    s.connect_ex(("10.0.200.1", 80))
    keep.append(s)
print("held", flush=True)
for line in sys.stdin:
    n, dsts = map(int, line.split())
    for i in range(n):
        s = socket.socket()
        s.settimeout(5)
        t = time.monotonic()
        try:
            s.connect(("10.0.200.%d" % (2 + i % dsts), 80))
            r = "connected"
        except OSError as e:
            r = type(e).__name__
        print(r, "%.1f" % ((time.monotonic() - t) * 1000), flush=True)
        s.close()
    print("done", flush=True)
"#;

/// The bound in this test, and the connects made beyond it in each round.
const SMALL_BOUND: usize = 8;
const OVER: usize = 100;
/// Longest an over-the-bound connect may take to be refused (it is refused at once: the
/// first packet mse-vpn sends back is the reset).
const REFUSED_WITHIN_MS: f64 = 500.0;

/// A running [`BOUND`] script.
struct Bound {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Bound {
    /// Starts it with `SMALL_BOUND` connects, and waits until they are pending at the jump
    /// host.
    fn start(tb: &Testbed) -> Bound {
        let held = SMALL_BOUND.to_string();
        let (child, lines) = python(tb, &tb.lap(), "bound.py", BOUND, &[&held]);
        assert_eq!(
            lines.recv_timeout(Duration::from_secs(10)).as_deref(),
            Ok("held")
        );
        let start = Instant::now();
        while pending_at_jump(tb) < SMALL_BOUND {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "the held connects never reached the jump host"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Bound { child, lines }
    }

    /// `OVER` connects spread over `dsts` destinations: each one's (outcome, ms).
    fn connects(&mut self, dsts: usize) -> Vec<(String, f64)> {
        let stdin = self.child.stdin.as_mut().unwrap();
        std::io::Write::write_all(stdin, format!("{OVER} {dsts}\n").as_bytes()).unwrap();
        let mut results = Vec::new();
        loop {
            let line = self
                .lines
                .recv_timeout(Duration::from_secs(10))
                .expect("an outcome");
            if line == "done" {
                return results;
            }
            let (r, ms) = line.split_once(' ').unwrap();
            results.push((r.to_owned(), ms.parse().unwrap()));
        }
    }
}

impl Drop for Bound {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// With `--max-opening 8` and 8 connects pending at the jump host (to a silent address),
/// 100 more connects are each reset at once, to one destination or to 100, and nothing more
/// is pending at the jump host; the refusals cost a bounded number of warning lines (not one
/// per SYN) and are counted in `status`. Opens whose app gave up still count until the jump
/// host answers them; then connections work again.
#[test]
fn connects_over_the_opening_bound_are_reset_at_once_with_few_warnings() {
    if crate::harness::skip_unless_root() {
        return;
    }
    let tb = Testbed::up("hos3", &["--with", "nginx"]);
    silence(&tb);
    shorten_jump_connects(&tb);
    let vpn = tb.start(
        &["10.0.0.0/16"],
        &[
            "--max-opening",
            &SMALL_BOUND.to_string(),
            "--open-timeout",
            "1",
        ],
    );
    tb.assert_curl_index();

    let mut bound = Bound::start(&tb);
    let held = Instant::now();
    for dsts in [1, OVER] {
        let mark = warnings(&vpn, OPEN_LIMIT);
        let results = bound.connects(dsts);
        let refused = results
            .iter()
            .filter(|(r, _)| r == "ConnectionRefusedError")
            .count();
        let slowest = results.iter().map(|(_, ms)| *ms).fold(0.0, f64::max);
        let lines = warnings(&vpn, OPEN_LIMIT) - mark;
        println!(
            "{OVER} connects over the bound to {dsts} destination(s): {refused} refused, the \
             slowest after {slowest} ms; {lines} warning lines"
        );
        assert_eq!(refused, OVER, "{results:?}");
        assert!(
            slowest < REFUSED_WITHIN_MS,
            "a connect over the bound took {slowest} ms to be refused"
        );
        assert_eq!(
            pending_at_jump(&tb),
            SMALL_BOUND,
            "connects pending at the jump host beyond --max-opening"
        );
        // One line per 10 s window, whatever the destinations (the rest are summarized).
        assert!(lines <= 1, "{lines} warning lines: {}", vpn.stderr());
    }
    let st = status(&tb);
    assert_eq!(st["flows_over_limit"], 2 * OVER, "{st:#}");

    // The held connects' apps are reset at the open timeout (1 s); their opens, pending at
    // the jump host until it gives up (7 s), still count: a new connection to a destination
    // that never answered is refused at once, by the bound (not by the VPC)...
    assert!(flows_idle(&tb), "the held flows never timed out");
    let over_before = status(&tb)["flows_over_limit"].as_u64().unwrap();
    let out = tb.on_laptop(10, &["curl", "-sS", "-m", "3", "http://10.0.0.10:81/"]);
    assert_eq!(
        out.status.code(),
        Some(7),
        "curl to a new destination while the abandoned opens are pending: {}{}",
        stdout(&out),
        stderr(&out)
    );
    assert_eq!(
        status(&tb)["flows_over_limit"].as_u64().unwrap(),
        over_before + 1,
        "refused by the opening bound"
    );
    assert_eq!(
        pending_at_jump(&tb),
        SMALL_BOUND,
        "the abandoned opens are pending at the jump host ({:.1?} after they started)",
        held.elapsed()
    );
    // ...while a service in use (nginx answered before) keeps a reserve of opens beyond the
    // bound, so a flood of silent destinations does not lock it out.
    tb.assert_curl_index();
    // Once the jump host gave up on them, connections work again.
    assert!(
        curl_within(&tb, Duration::from_secs(JUMP_CONNECT_SECS + 8)),
        "no connection within {} s (pending at the jump host: {})",
        JUMP_CONNECT_SECS + 8,
        pending_at_jump(&tb)
    );
    println!(
        "a new connection worked {:.1?} after the held connects started",
        held.elapsed()
    );
    drop(bound);
    assert!(vpn.interrupt().success());
}

// ----- 4. Refused connections -----

/// `refused.py N PAR`: N connects to 10.0.0.10:81 (a closed port in the VPC), PAR at a time;
/// prints how many were refused.
const REFUSED: &str = r#"
import errno, selectors, socket, sys
n, par = int(sys.argv[1]), int(sys.argv[2])
sel = selectors.DefaultSelector()
started = done = refused = 0
while done < n:
    while started < n and started - done < par:
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("10.0.0.10", 81))
        sel.register(s, selectors.EVENT_WRITE)
        started += 1
    ready = sel.select(timeout=10)
    if not ready:
        sys.exit("stuck: %d of %d done" % (done, n))
    for key, _ in ready:
        s = key.fileobj
        if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == errno.ECONNREFUSED:
            refused += 1
        sel.unregister(s)
        s.close()
        done += 1
print(refused, flush=True)
"#;

/// Connects to a closed VPC port, `n` of them, 200 at a time; all must be refused.
fn refuse(tb: &Testbed, n: usize) {
    let path = script(tb, "refused.py", REFUSED);
    let out = tb.on_laptop(120, &["python3", &path, &n.to_string(), "200"]);
    assert_eq!(
        stdout(&out).trim(),
        n.to_string(),
        "refused connects: {}",
        stderr(&out)
    );
}

/// Refused connections to add after the warm-up, and the growth of mse-vpn's RSS they may
/// cause (the allocator's leeway; a cost per refused connection of 100 bytes would be 2 MiB).
const REFUSALS: usize = 20_000;
const REFUSALS_GROWTH_MIB: u64 = 2;

/// An app that keeps connecting to a closed port (a retry loop, a port scan): each connect
/// is refused by the VPC server, the jump host's channel open fails, the app gets a reset,
/// and nothing of it stays in mse-vpn. Stock russh 0.65.1 queued a `Reply::ChannelOpenFailure`
/// on the handle's unbounded reply channel for every failed open, which nothing reads after
/// login: measured, 20,000 refusals took RSS from 21 to 33 MiB (about 600 bytes each, for the
/// session's lifetime); with our russh patch 0008, 21 to 21.
#[test]
fn refused_connections_leave_nothing_behind() {
    if crate::harness::skip_unless_root() {
        return;
    }
    let tb = Testbed::up("hos4", &["--with", "nginx"]);
    let vpn = tb.start(&["10.0.0.0/16"], &[]);
    let pid = vpn.pid();
    tb.assert_curl_index();
    refuse(&tb, 2_000);
    let before = rss_mib(pid);
    let started = Instant::now();
    refuse(&tb, REFUSALS);
    let took = started.elapsed();
    let after = rss_mib(pid);
    let st = status(&tb);
    println!(
        "{REFUSALS} refused connects in {took:.1?}: RSS {before} -> {after} MiB; flows_refused {}",
        st["flows_refused"]
    );
    assert!(
        after <= before + REFUSALS_GROWTH_MIB,
        "RSS grew {before} -> {after} MiB over {REFUSALS} refused connections"
    );
    assert!(flows_idle(&tb), "flows left: {:#}", status(&tb));
    assert!(vpn.interrupt().success());
}

// ----- 5. Reset flows whose server does not read -----

/// The VPC port of the server that never reads.
const SINK_PORT: u16 = 9100;

/// `sink.py PORT`: on 10.0.0.10:PORT, accepts every connection and never reads from it;
/// prints `listening`, then `accepted N` after each accept.
const SINK: &str = r#"
import socket, sys
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("10.0.0.10", int(sys.argv[1])))
srv.listen(1024)
print("listening", flush=True)
held = []
while True:
    c, _ = srv.accept()
    held.append(c)
    print("accepted", len(held), flush=True)
"#;

/// `resets.py N SIZE`: N connections to 10.0.0.10:9100; each sends up to SIZE bytes (without
/// blocking, for as long as any of them makes progress), then all are reset (SO_LINGER 0);
/// prints `reset BYTES` (bytes the apps' kernels took, in all).
const RESETS: &str = r#"
import socket, struct, sys, time
n, size = int(sys.argv[1]), int(sys.argv[2])
socks = [socket.create_connection(("10.0.0.10", 9100), timeout=10) for _ in range(n)]
for s in socks:
    s.setblocking(False)
chunk = b"x" * 65536
sent = [0] * n
idle = 0
while idle < 5 and min(sent) < size:
    moved = False
    for i, s in enumerate(socks):
        while sent[i] < size:
            try:
                k = s.send(chunk[: size - sent[i]])
            except BlockingIOError:
                break
            sent[i] += k
            moved = True
    idle = 0 if moved else idle + 1
    time.sleep(0.1)
for s in socks:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
print("reset", sum(sent), flush=True)
"#;

/// Apps in the reset test, and what each sends at most before its reset. The issue sent 2 MiB
/// each, about what the jump host absorbs per flow (sshd's 2 MiB channel window plus its and
/// the server's socket buffers), and saw 2 and 7 of 100 flows stuck; 8 MiB leaves bytes in
/// mse-vpn for every flow when its reset comes.
const RESET_APPS: usize = 100;
const RESET_SIZE: usize = 8 << 20;
/// How soon after the resets every channel must be closed at the jump host.
const RESET_CLOSED_WITHIN: Duration = Duration::from_secs(10);

/// Lines of the jump host's sshd log (LogLevel DEBUG2) containing `what`.
fn sshd_lines(tb: &Testbed, what: &str) -> usize {
    tb.sshd_log().lines().filter(|l| l.contains(what)).count()
}

/// A VPC server accepts and never reads; 100 apps each send up to 8 MiB, then reset their
/// connection (SO_LINGER 0). An app's reset aborts its flow: what mse-vpn still held of its
/// bytes is discarded and the channel is closed at once, so sshd receives a close for every
/// channel within seconds, and `status` shows no flow, active or closing. (Before, a reset
/// flow was closed only after its queued bytes were written, which a server that does not
/// read never allows: a few of the 100 channels stayed open for good while `status` said
/// 0 active.)
///
/// The jump host's own connections to the server are not asserted: sshd, once it has a
/// channel's close, still writes out what it buffered for the server before it lets the
/// connection go (OpenSSH's CHAN_OUTPUT_WAIT_DRAIN, the same with `ssh -L`).
#[test]
fn reset_flows_to_a_server_that_does_not_read_close_their_channels_at_once() {
    if crate::harness::skip_unless_root() {
        return;
    }
    let tb = Testbed::up("hos5", &["--with", "none"]);
    tb.edit_sshd_config("LogLevel VERBOSE", "LogLevel DEBUG2");
    let vpc = format!("{}-vpc", tb.name);
    let port = SINK_PORT.to_string();
    let (mut server, events) = python(&tb, &vpc, "sink.py", SINK, &[&port]);
    assert_eq!(
        events.recv_timeout(Duration::from_secs(10)).as_deref(),
        Ok("listening")
    );
    let vpn = tb.start(&["10.0.0.0/16"], &[]);
    let target = format!("target 10.0.0.10 port {SINK_PORT}");
    let closes_before = sshd_lines(&tb, ": rcvd close");

    let path = script(&tb, "resets.py", RESETS);
    let out = tb.on_laptop(
        120,
        &[
            "python3",
            &path,
            &RESET_APPS.to_string(),
            &RESET_SIZE.to_string(),
        ],
    );
    assert!(out.status.success(), "resets.py: {}", stderr(&out));
    let reset_at = Instant::now();
    let said = stdout(&out);
    let opened = sshd_lines(&tb, &target);
    assert_eq!(opened, RESET_APPS, "channels opened to the sink: {said}");

    // Every channel gets its close at once, and no flow is left, active or closing.
    let closed = loop {
        let closed = sshd_lines(&tb, ": rcvd close") - closes_before;
        let st = status(&tb);
        let idle = st["flows_active"] == 0 && st["flows_closing"].as_u64().unwrap_or(0) == 0;
        if closed >= RESET_APPS && idle {
            break reset_at.elapsed();
        }
        if reset_at.elapsed() > RESET_CLOSED_WITHIN {
            let at_jump = tb
                .cmd_in(
                    &jump(&tb),
                    &[
                        "ss",
                        "-Htn",
                        "state",
                        "established",
                        &format!("dport = :{SINK_PORT}"),
                    ],
                )
                .output()
                .unwrap();
            panic!(
                "{RESET_CLOSED_WITHIN:?} after the resets ({}), sshd got a close for {closed} \
                 of {RESET_APPS} channels; status {st:#}; the jump host still holds {} \
                 connections to the server",
                said.trim(),
                stdout(&at_jump).lines().count()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    println!(
        "{RESET_APPS} reset flows ({}): every channel closed at the jump host within {closed:.1?}",
        said.trim()
    );
    let _ = server.kill();
    let _ = server.wait();
    assert!(vpn.interrupt().success());
}
