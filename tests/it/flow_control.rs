//! Flow control end to end, against a real sshd: an app that stops reading in the middle of
//! a download (a debugger breakpoint, a long GC pause) pauses only its own flow at the jump
//! host, costs mse-vpn at most that flow's windows in memory, is never reset, and gets every
//! byte once it reads again; other flows on the same SSH connection keep their latency.

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{Testbed, rss_mib, sha256_file, stderr, stdout};

/// How long the apps stop reading (the issue's figure).
const PAUSE_SECS: u64 = 60;
/// The SSH window mse-vpn keeps open per channel, and the per-flow buffers behind it
/// (smoltcp's send buffer and the engine's read-ahead), in MiB, rounded up.
const WINDOW_MIB: u64 = 4;
const BUFFERS_MIB: u64 = 1;
/// Slack the issue allows on top of the windows and buffers.
const SLACK_MIB: u64 = 50;
/// RSS (MiB) the process falls back under once its flows are over.
const RELEASED_MIB: u64 = 64;

/// A client of nginx in the VPC that reads `--first` bytes of `--path`, stops reading for
/// `--pause` seconds (printing "paused" then), then reads the rest and prints the body's
/// sha256; `--flows N` runs N such downloads at once.
const PAUSING_CLIENT: &str = r#"
import hashlib, socket, sys, threading, time
path, first, pause, flows = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
results = [None] * flows
paused = threading.Barrier(flows + 1)
def one(i):
    s = socket.create_connection(("10.0.0.10", 80), timeout=PAUSE_TIMEOUT)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 * 1024)
    s.sendall(b"GET " + path.encode() + b" HTTP/1.0\r\nHost: vpc\r\n\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(1)
    h = hashlib.sha256()
    got = 0
    while got < first:
        b = s.recv(min(65536, first - got))
        if not b:
            break
        h.update(b); got += len(b)
    paused.wait()
    time.sleep(pause)
    try:
        while True:
            b = s.recv(1 << 20)
            if not b:
                break
            h.update(b); got += len(b)
        results[i] = (got, h.hexdigest())
    except OSError as e:
        results[i] = (got, "error: " + type(e).__name__ + " " + str(e))
ts = [threading.Thread(target=one, args=(i,)) for i in range(flows)]
for t in ts: t.start()
paused.wait()
print("paused", flush=True)
for t in ts: t.join()
for got, digest in results:
    print(got, digest, flush=True)
"#;

/// PINGs redis in the VPC `n` times over one connection; prints each round trip in µs.
const REDIS_PINGS: &str = r#"
import socket, sys, time
s = socket.create_connection(("10.0.0.11", 6379), timeout=5)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
for _ in range(int(sys.argv[1])):
    t = time.perf_counter()
    s.sendall(b"PING\r\n")
    assert s.recv(64) == b"+PONG\r\n"
    print(int((time.perf_counter() - t) * 1e6))
    time.sleep(0.02)
"#;

fn write_script(tb: &Testbed, name: &str, text: &str) -> String {
    let path = tb.dir.join(name);
    std::fs::write(
        &path,
        text.replace("PAUSE_TIMEOUT", &(PAUSE_SECS * 3).to_string()),
    )
    .unwrap();
    path.to_string_lossy().into_owned()
}

/// A file of `mib` random MiB in the VPC's web root; returns its sha256.
fn web_file(tb: &Testbed, name: &str, mib: usize) -> String {
    let path = tb.dir.join("www").join(name);
    let out = std::process::Command::new("bash")
        .args([
            "-c",
            &format!(
                "head -c {} /dev/urandom > {p} && chmod 644 {p}",
                mib << 20,
                p = path.display()
            ),
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    sha256_file(&path)
}

/// Starts the pausing client; returns once every flow is paused.
fn start_pausing(tb: &Testbed, path: &str, first: usize, flows: usize) -> Child {
    let script = write_script(tb, "pausing.py", PAUSING_CLIENT);
    let mut child = tb
        .cmd_in(
            &tb.lap(),
            &[
                "python3",
                &script,
                path,
                &first.to_string(),
                &PAUSE_SECS.to_string(),
                &flows.to_string(),
            ],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "paused", "the client did not reach its pause");
    child
}

/// Round trips of `n` redis PINGs over one connection, sorted, in µs.
fn pings(tb: &Testbed, n: usize) -> Child {
    let script = write_script(tb, "pings.py", REDIS_PINGS);
    tb.cmd_in(&tb.lap(), &["python3", &script, &n.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn ping_results(child: Child, n: usize) -> Latency {
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "redis pings: {}", stderr(&out));
    let mut rtts: Vec<u64> = stdout(&out)
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect();
    assert_eq!(rtts.len(), n);
    rtts.sort_unstable();
    Latency {
        p50: rtts[n / 2 - 1],
        p99: rtts[n * 99 / 100 - 1],
    }
}

/// Percentiles of redis PING round trips, µs.
#[derive(Debug)]
struct Latency {
    p50: u64,
    p99: u64,
}

/// Waits until `flows` downloads are stuck behind full windows: the jump host's sshd stops
/// reading nginx once a flow's SSH window is used up, so nginx's socket for it backs up in
/// the VPC (at least 256 KiB unsent).
fn wait_windows_full(tb: &Testbed, flows: usize) {
    let vpc = format!("{}-vpc", tb.name);
    let start = Instant::now();
    loop {
        let stuck = tb
            .send_queues(&vpc, &["sport", "= :80"])
            .into_iter()
            .filter(|q| *q >= 256 * 1024)
            .count();
        if stuck >= flows {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "only {stuck} of {flows} paused downloads backed up at nginx"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// While the apps are paused: samples mse-vpn's RSS, and measures redis PINGs (over the same
/// single SSH connection). Returns the peak RSS (MiB) and the PINGs' latency.
fn during_pause(tb: &Testbed, pid: i32, flows: usize) -> (u64, Latency) {
    // The paused flows fill their windows first.
    wait_windows_full(tb, flows);
    let mut peak = rss_mib(pid);
    let pinger = pings(tb, 1000);
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(PAUSE_SECS - 15) {
        peak = peak.max(rss_mib(pid));
        std::thread::sleep(Duration::from_millis(500));
    }
    (peak, ping_results(pinger, 1000))
}

/// The PINGs beside the paused flows were never held up by them (before flow control, one
/// unread channel stalled its whole SSH connection for seconds): p99 within 20 ms, or four
/// times what it was before the pause (a debug build on a busy test machine). The latency
/// target itself (p99 under 5 ms) is measured on the release build by `scripts/bench`
/// (workload `paused`).
fn assert_latency_kept(before: &Latency, during: &Latency) {
    let bound = 20_000.max(4 * before.p99);
    assert!(
        during.p99 <= bound,
        "redis p99 {} µs (p50 {}) beside paused flows (before them: p99 {}, p50 {}; bound {bound} µs)",
        during.p99,
        during.p50,
        before.p99,
        before.p50
    );
}

/// Waits for the client and checks every download is complete and byte-exact.
fn assert_complete(child: Child, size: usize, sha: &str, flows: usize) {
    let out = child.wait_with_output().unwrap();
    let text = stdout(&out);
    let results: Vec<&str> = text.lines().collect();
    assert_eq!(results.len(), flows, "{text}{}", stderr(&out));
    for r in results {
        assert_eq!(r, format!("{size} {sha}"), "a download after the pause");
    }
}

#[test]
fn an_app_paused_mid_download_costs_one_window_and_gets_every_byte() {
    if crate::harness::skip_unless_root() {
        return;
    }
    let tb = Testbed::up("fc1", &["--with", "nginx,redis"]);
    let sha = web_file(&tb, "1g.bin", 1024);
    let vpn = tb.start(&["10.0.0.0/16"], &["--connections", "1"]);
    let before = ping_results(pings(&tb, 200), 200);
    let client = start_pausing(&tb, "/1g.bin", 16 << 20, 1);
    let (peak, during) = during_pause(&tb, vpn.pid(), 1);
    println!(
        "one paused download: peak RSS {peak} MiB; redis PING before {before:?}, during {during:?} (µs)"
    );
    assert!(
        peak <= WINDOW_MIB + BUFFERS_MIB + SLACK_MIB,
        "mse-vpn grew to {peak} MiB while the app was paused"
    );
    assert_latency_kept(&before, &during);
    assert_complete(client, 1 << 30, &sha, 1);
    let log = vpn.stderr();
    assert!(!log.contains("reset"), "{log}");
    assert!(vpn.interrupt().success());
}

#[test]
fn fifty_paused_downloads_cost_fifty_windows_and_all_complete() {
    if crate::harness::skip_unless_root() {
        return;
    }
    const FLOWS: usize = 50;
    let tb = Testbed::up("fc2", &["--with", "nginx,redis"]);
    let sha = web_file(&tb, "64m.bin", 64);
    let vpn = tb.start(&["10.0.0.0/16"], &["--connections", "1"]);
    let before = ping_results(pings(&tb, 200), 200);
    let client = start_pausing(&tb, "/64m.bin", 8 << 20, FLOWS);
    let (peak, during) = during_pause(&tb, vpn.pid(), FLOWS);
    println!(
        "{FLOWS} paused downloads: peak RSS {peak} MiB; redis PING before {before:?}, during {during:?} (µs)"
    );
    let bound = FLOWS as u64 * (WINDOW_MIB + BUFFERS_MIB) + SLACK_MIB;
    assert!(peak <= bound, "mse-vpn grew to {peak} MiB (bound {bound})");
    assert_latency_kept(&before, &during);
    assert_complete(client, 64 << 20, &sha, FLOWS);
    // Once they are over, what they held goes back to the system within seconds (the driver
    // trims the allocator's free memory after flows close, at most every 2 s): a long-lived
    // process does not keep the peak of its busiest moment.
    let mut after = rss_mib(vpn.pid());
    for _ in 0..50 {
        if after <= RELEASED_MIB {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
        after = rss_mib(vpn.pid());
    }
    println!("{FLOWS} downloads over: RSS {after} MiB (peak {peak} MiB)");
    assert!(
        after <= RELEASED_MIB,
        "mse-vpn kept {after} MiB after the downloads ended (peak {peak} MiB)"
    );
    assert!(vpn.interrupt().success());
}

/// What the memory budget counts comes back to nothing once the flows are over: every
/// channel's window is released when the channel closes (if it leaked, the budget would
/// fill over a long session and every new window would shrink to the floor), and `status`
/// shows the budget.
#[test]
fn the_memory_budget_is_released_when_flows_end() {
    if crate::harness::skip_unless_root() {
        return;
    }
    let tb = Testbed::up("fc3", &["--with", "nginx"]);
    web_file(&tb, "32m.bin", 32);
    let vpn = tb.start(&["10.0.0.0/16"], &["--memory-budget", "64"]);
    // Eight downloads, read slowly (`--limit-rate`): their windows are counted meanwhile.
    let curls = tb
        .cmd_in(
            &tb.lap(),
            &[
                "bash",
                "-c",
                "for i in 1 2 3 4 5 6 7 8; do curl -sS --limit-rate 8M -o /dev/null http://10.0.0.10/32m.bin & done; wait",
            ],
        )
        .spawn()
        .unwrap();
    let start = Instant::now();
    loop {
        let st = crate::lifecycle::status(&tb);
        if st["memory_windows"].as_u64().unwrap() > 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no window counted during the downloads: {st:#}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = curls.wait_with_output().unwrap();
    assert!(out.status.success(), "the downloads failed");
    let released = |what: &str| {
        let start = Instant::now();
        loop {
            let st = crate::lifecycle::status(&tb);
            if st["memory_windows"] == 0 && st["memory_buffered"] == 0 && st["flows_active"] == 0 {
                break st;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "the budget still counts bytes after {what}: {st:#}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let st = released("the downloads ended");
    assert_eq!(st["memory_budget"], 64 << 20, "{st:#}");
    assert!(st["bytes_down"].as_u64().unwrap() >= 8 * (32 << 20));

    // Downloads the app gives up halfway (curl's -m): mse-vpn closes those channels first,
    // and the jump host's close that answers each releases its window too (russh patch
    // 0010: it used to be dropped, and the budget kept every such window for good).
    let out = tb.sh(
        30,
        "for i in 1 2 3 4 5 6 7 8; do (curl -sS --limit-rate 4M -m 2 -o /dev/null http://10.0.0.10/32m.bin; echo \"exit $?\") & done; wait",
    );
    // curl's exit status 28: the operation timed out.
    assert_eq!(
        stdout(&out).lines().filter(|l| *l == "exit 28").count(),
        8,
        "the downloads are given up halfway: {}{}",
        stdout(&out),
        stderr(&out)
    );
    released("the app gave up its downloads");
    assert!(vpn.interrupt().success());
}
