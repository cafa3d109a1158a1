//! End-to-end tests of cloud-to-local calls: `--expose` listeners on a real OpenSSH sshd
//! (`GatewayPorts clientspecified`), callers in the VPC namespace, apps in the laptop
//! namespace; `mse-vpn run` with a real ZooKeeper registry and a JVM.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{Testbed, Vpn, rss_mib, stderr, stdout};
use crate::lifecycle::status;

/// A TCP server for the laptop on PORT [ADDR] (default 0.0.0.0; "::" is dual-stack): greets
/// each caller with "peer IP:PORT", echoes until EOF, then closes (so a caller's half-close
/// still gets every echoed byte).
pub(crate) const PEER_SERVER: &str = r#"
import socket, sys, threading
host = sys.argv[2] if len(sys.argv) > 2 else "0.0.0.0"
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
s = socket.socket(fam, socket.SOCK_STREAM)
if fam == socket.AF_INET6:
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((host, int(sys.argv[1]))); s.listen(1024)
print("listening", flush=True)
def serve(c, a):
    with c:
        peer = a[0].removeprefix("::ffff:")
        c.sendall(f"peer {peer}:{a[1]}\n".encode())
        while True:
            d = c.recv(65536)
            if not d: break
            c.sendall(d)
while True:
    c, a = s.accept()
    threading.Thread(target=serve, args=(c, a), daemon=True).start()
"#;

/// A caller for the VPC: N parallel connections to HOST:PORT, each sends its own payload,
/// half-closes, and checks the greeting and the echo. Prints "ok N PEERS" or fails.
const CALLERS: &str = r#"
import socket, sys, threading
host, port, n, src = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
errors, peers = [], set()
def call(i):
    try:
        c = socket.socket(); c.settimeout(20)
        if src != "-": c.bind((src, 0))
        c.connect((host, port))
        payload = (f"caller {i} " * 2000).encode()
        c.sendall(payload); c.shutdown(socket.SHUT_WR)
        data = b""
        while True:
            d = c.recv(65536)
            if not d: break
            data += d
        greeting, _, echo = data.partition(b"\n")
        peers.add(greeting.decode().split()[1].rsplit(":", 1)[0])
        assert echo == payload, f"caller {i}: echo of {len(echo)} bytes, sent {len(payload)}"
    except Exception as e:
        errors.append(repr(e))
ts = [threading.Thread(target=call, args=(i,)) for i in range(n)]
[t.start() for t in ts]; [t.join() for t in ts]
if errors:
    print("errors", len(errors), errors[:3]); sys.exit(1)
print("ok", n, " ".join(sorted(peers)))
"#;

fn vpc(tb: &Testbed, secs: u32, argv: &[&str]) -> Output {
    let t = secs.to_string();
    let mut full = vec!["timeout", t.as_str()];
    full.extend_from_slice(argv);
    tb.cmd_in(&format!("{}-vpc", tb.name), &full)
        .output()
        .expect("run a command in the VPC namespace")
}

fn write_script(tb: &Testbed, name: &str, text: &str) -> String {
    let path = tb.dir.join(name);
    std::fs::write(&path, text).expect("write a test script");
    path.to_string_lossy().into_owned()
}

/// Starts the peer server on `port` in the laptop namespace; killed on drop.
struct LocalApp(std::process::Child);

impl LocalApp {
    fn start(tb: &Testbed, port: u16) -> LocalApp {
        LocalApp::start_on(tb, port, "0.0.0.0")
    }

    fn start_on(tb: &Testbed, port: u16, addr: &str) -> LocalApp {
        let script = write_script(tb, "peer_server.py", PEER_SERVER);
        let mut child = tb
            .cmd_in(&tb.lap(), &["python3", &script, &port.to_string(), addr])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the local app");
        let mut line = String::new();
        use std::io::BufRead;
        std::io::BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "listening");
        LocalApp(child)
    }
}

impl Drop for LocalApp {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn cloud_callers_reach_a_local_app_from_their_own_address() {
    if crate::harness::skip_unless_root() {
        return;
    }
    let tb = Testbed::up("rv1", &["--with", "none"]);
    let _app = LocalApp::start_on(&tb, 8080, "::");
    let _loopback_app = LocalApp::start_on(&tb, 8082, "127.0.0.1");
    let vpn = tb.start(
        &["10.0.0.0/16", "fd00:10::/64"],
        &[
            "--expose",
            "18080:8080",
            "--expose",
            "18081:9",
            "--expose",
            "18082:8082",
        ],
    );
    // The exposed ports are printed right after the "up" line.
    let start = Instant::now();
    while !vpn.stdout().contains("-> local port 8082") && start.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        vpn.stdout()
            .contains("exposed: cloud callers reach 10.0.0.1:18080 -> local port 8080"),
        "{}",
        vpn.stdout()
    );

    // One caller: the app sees the caller's own VPC address, and the echo comes back.
    let out = vpc(
        &tb,
        10,
        &[
            "bash",
            "-c",
            "echo hello | socat - TCP:10.0.0.1:18080,shut-down",
        ],
    );
    let text = stdout(&out);
    assert!(
        text.starts_with("peer 10.0.0.10:"),
        "the app's peer is the caller: {text} {}",
        stderr(&out)
    );
    assert!(text.ends_with("hello\n"), "{text}");

    // An IPv6 caller: its own IPv6 address, through the TUN's IPv6 address.
    let out = vpc(
        &tb,
        10,
        &[
            "bash",
            "-c",
            "echo hello6 | socat - TCP6:[fd00:10::1]:18080,shut-down",
        ],
    );
    let text = stdout(&out);
    assert!(
        text.starts_with("peer fd00:10::10:"),
        "{text} {}",
        stderr(&out)
    );
    assert!(text.ends_with("hello6\n"), "{text}");

    // An app that listens on 127.0.0.1 only is still reached (over loopback, as with
    // `ssh -R`); it then sees 127.0.0.1, and status says why.
    let out = vpc(
        &tb,
        10,
        &[
            "bash",
            "-c",
            "echo local | socat - TCP:10.0.0.1:18082,shut-down",
        ],
    );
    let text = stdout(&out);
    assert!(
        text.starts_with("peer 127.0.0.1:"),
        "{text} {}",
        stderr(&out)
    );
    assert!(text.ends_with("local\n"), "{text}");

    // 100 callers at once, each with 40 KB, each half-closing before reading the echo.
    let callers = write_script(&tb, "callers.py", CALLERS);
    let start = Instant::now();
    let out = vpc(
        &tb,
        60,
        &["python3", &callers, "10.0.0.1", "18080", "100", "-"],
    );
    let took = start.elapsed();
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert_eq!(stdout(&out).trim(), "ok 100 10.0.0.10");
    println!("100 parallel inbound calls (40 KB each, half-closed) in {took:?}");

    // A closed local port: the caller's connection is closed promptly, not left hanging.
    let start = Instant::now();
    let out = vpc(
        &tb,
        10,
        &[
            "bash",
            "-c",
            "echo x | socat -t 5 - TCP:10.0.0.1:18081; echo done",
        ],
    );
    let took = start.elapsed();
    assert_eq!(stdout(&out).trim(), "done", "{}", stderr(&out));
    assert!(took < Duration::from_secs(3), "closed after {took:?}");
    println!("a call to a closed local port was closed after {took:?}");

    let st = status(&tb);
    let forwards = st["forwards"].as_array().expect("forwards in status");
    assert_eq!(forwards.len(), 3, "{st}");
    assert_eq!(forwards[0]["state"], "listening");
    assert_eq!(forwards[0]["advertised"], "10.0.0.1:18080");
    assert_eq!(forwards[0]["connections"], 102);
    assert!(
        forwards[2]["detail"]
            .as_str()
            .is_some_and(|d| d.contains("listens on 127.0.0.1 only")),
        "{st}"
    );
    // Not accepted on the TUN address: the closed port, and the loopback-only app.
    assert_eq!(st["inbound_opened"], 104, "{st}");
    assert_eq!(st["inbound_refused"], 2, "{st}");
    assert!(vpn.interrupt().success());
}

#[test]
fn a_caller_outside_the_routed_networks_is_answered_and_down_restores_the_rules() {
    if crate::harness::skip_unless_root() {
        return;
    }
    let tb = Testbed::up("rv2", &["--with", "none"]);
    let _app = LocalApp::start(&tb, 8080);
    let before = tb.snapshot();
    // Only 10.0.0.0/24 is routed; the caller is 10.0.50.20, which the laptop has no
    // route to at all: only the reply rules bring its answers back into the TUN.
    let vpn = tb.start(&["10.0.0.0/24"], &["--expose", "18080:8080"]);
    let callers = write_script(&tb, "callers.py", CALLERS);
    let out = vpc(
        &tb,
        30,
        &["python3", &callers, "10.0.0.1", "18080", "10", "10.0.50.20"],
    );
    assert_eq!(stdout(&out).trim(), "ok 10 10.0.50.20", "{}", stderr(&out));
    let rules = stdout(&tb.sh(5, "ip rule show"));
    assert!(
        rules.contains("from 198.18.0.1 lookup main suppress_prefixlength 0"),
        "{rules}"
    );
    // Outbound still works next to it.
    assert!(vpn.interrupt().success());
    assert_eq!(
        tb.snapshot(),
        before,
        "routes, rules and addresses restored"
    );
}

#[test]
fn a_jump_host_that_binds_loopback_only_is_reported_with_the_fix() {
    if crate::harness::skip_unless_root() {
        return;
    }
    let tb = Testbed::up("rv3", &["--with", "none"]);
    tb.edit_sshd_config("GatewayPorts clientspecified", "GatewayPorts no");
    let before = tb.snapshot();
    let args = tb.up_args(&["10.0.0.0/16"], &["--expose", "18080:8080"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (status, err) = tb.up_fails(&args);
    assert!(!status.success());
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.starts_with(
            "mse-vpn: --expose 18080:8080: the jump host binds forwarded ports to loopback only"
        ),
        "{err}"
    );
    assert!(last.contains("GatewayPorts clientspecified"), "{last}");
    assert_eq!(tb.snapshot(), before, "nothing left behind");

    // A port already taken on the jump host: refused plainly too.
    tb.edit_sshd_config("GatewayPorts no", "GatewayPorts clientspecified");
    let mut taken = tb
        .cmd_in(
            &format!("{}-jump", tb.name),
            &["socat", "TCP6-LISTEN:18090,ipv6only=0,fork", "-"],
        )
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    tb.wait_listening(&format!("{}-jump", tb.name), 18090, Duration::from_secs(5));
    let args = tb.up_args(&["10.0.0.0/16"], &["--expose", "18090:8080"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (status, err) = tb.up_fails(&args);
    let _ = taken.kill();
    let _ = taken.wait();
    assert!(!status.success());
    assert!(
        err.contains("--expose 18090:8080: the jump host refused to listen on port 18090: the port is taken there"),
        "{err}"
    );
    assert_eq!(tb.snapshot(), before, "nothing left behind");
}

/// Compiles tests/it/java/MseDemo.java against Debian's ZooKeeper client.
fn compile_demo(tb: &Testbed) -> PathBuf {
    let out_dir = tb.dir.join("java");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/java/MseDemo.java");
    let out = Command::new("javac")
        .args(["-cp", "/usr/share/java/zookeeper.jar", "-d"])
        .arg(&out_dir)
        .arg(&src)
        .output()
        .expect("run javac (scripts/setup installs default-jdk-headless)");
    assert!(out.status.success(), "javac: {}", stderr(&out));
    out_dir
}

#[test]
fn a_provider_started_by_run_registers_the_jump_host_address_and_a_cloud_consumer_calls_it() {
    if crate::harness::skip_unless_root() {
        return;
    }
    let tb = Testbed::up("rv4", &["--with", "zookeeper"]);
    let classes = compile_demo(&tb);
    let cp = format!("{}:/usr/share/java/zookeeper.jar", classes.display());
    let vpn = tb.start(&["10.0.0.0/16"], &[]);

    // A JVM started by `run` sees the registration properties; the user's own
    // JAVA_TOOL_OPTIONS survive; the app's exit status is run's.
    let out = tb
        .mse_vpn(&[
            "run",
            "--expose",
            "20881:8080",
            "--",
            "java",
            "-cp",
            &cp,
            "MseDemo",
            "props",
        ])
        .env("JAVA_TOOL_OPTIONS", "-Dkeep.me=yes -Dhsf.server.port=12200")
        .output()
        .unwrap();
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(3), "{text}{}", stderr(&out));
    for want in [
        "prop DUBBO_IP_TO_REGISTRY=10.0.0.1",
        "prop DUBBO_PORT_TO_REGISTRY=20881",
        "prop spring.cloud.nacos.discovery.ip=10.0.0.1",
        "prop spring.cloud.nacos.discovery.port=20881",
        "prop hsf.server.ip=10.0.0.1",
        "prop hsf.server.port=12200",
        "prop keep.me=yes",
    ] {
        assert!(text.contains(want), "{want} missing:\n{text}");
    }
    assert!(
        stderr(&out).contains("keeping your own setting -Dhsf.server.port=12200"),
        "{}",
        stderr(&out)
    );

    // The provider registers in ZooKeeper (reached through the tunnel) the address run
    // gave it; a consumer in the VPC finds it there and calls it through the jump host.
    let mut provider = Vpn::spawn({
        let mut c = tb.mse_vpn(&[
            "run",
            "--expose",
            "20880",
            "--",
            "java",
            "-cp",
            &cp,
            "MseDemo",
            "provider",
            "10.0.0.14:2181",
            "com.example.Greeter",
            "20880",
        ]);
        c.env_remove("JAVA_TOOL_OPTIONS");
        c
    });
    let start = Instant::now();
    while !provider.stdout().contains("registered ") {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the provider did not register:\n{}\n{}",
            provider.stdout(),
            provider.stderr()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        provider
            .stdout()
            .contains("registered dubbo://10.0.0.1:20880/com.example.Greeter"),
        "{}",
        provider.stdout()
    );
    let out = vpc(
        &tb,
        30,
        &[
            "java",
            "-cp",
            &cp,
            "MseDemo",
            "consumer",
            "10.0.0.14:2181",
            "com.example.Greeter",
            "world",
        ],
    );
    let text = stdout(&out);
    assert!(
        text.contains("found dubbo://10.0.0.1:20880/com.example.Greeter"),
        "{text}{}",
        stderr(&out)
    );
    assert!(
        text.contains("reply hello world from the laptop; your address 10.0.0.10"),
        "{text}{}",
        stderr(&out)
    );
    let st = status(&tb);
    assert_eq!(st["forwards"][0]["spec"], "20880:20880", "{st}");

    // The provider stops: run exits with its status, and its listener goes with it.
    provider.signal(nix::sys::signal::Signal::SIGTERM);
    let code = provider.wait_exit(Duration::from_secs(15));
    assert_eq!(code.code(), Some(143), "SIGTERM was passed on to the JVM");
    let start = Instant::now();
    while status(&tb)["forwards"]
        .as_array()
        .is_some_and(|f| !f.is_empty())
    {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the listener stayed"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = vpc(&tb, 10, &["bash", "-c", "exec 3<>/dev/tcp/10.0.0.1/20880"]);
    assert!(
        !out.status.success(),
        "nothing listens on the jump host any more"
    );
    assert!(vpn.interrupt().success());
}

#[test]
fn exposed_ports_come_back_after_the_jump_host_restarts() {
    if crate::harness::skip_unless_root() {
        return;
    }
    let tb = Testbed::up("rv5", &["--with", "none"]);
    let _app = LocalApp::start(&tb, 8080);
    let vpn = tb.start(&["10.0.0.0/16"], &["--expose", "18080:8080"]);
    let call = || {
        vpc(
            &tb,
            10,
            &[
                "bash",
                "-c",
                "echo again | socat - TCP:10.0.0.1:18080,shut-down",
            ],
        )
    };
    assert!(stdout(&call()).ends_with("again\n"));

    tb.control("sshd-kill");
    let start = Instant::now();
    while status(&tb)["forwards"][0]["state"] == "listening" {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the loss was not noticed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        !call().status.success(),
        "nothing listens while sshd is down"
    );
    tb.control("sshd-start");
    let back = Instant::now();
    while status(&tb)["forwards"][0]["state"] != "listening" {
        assert!(
            back.elapsed() < Duration::from_secs(10),
            "the listener did not come back: {}",
            status(&tb)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    println!(
        "the exposed port listened again {:?} after sshd was back",
        back.elapsed()
    );
    let out = call();
    assert!(
        stdout(&out).starts_with("peer 10.0.0.10:"),
        "{}",
        stderr(&out)
    );
    assert!(stdout(&out).ends_with("again\n"));

    // Ports added to, and removed from, the running session.
    let call2 = || {
        vpc(
            &tb,
            10,
            &[
                "bash",
                "-c",
                "echo more | socat - TCP:10.0.0.1:18090,shut-down",
            ],
        )
    };
    let out = tb.mse_vpn(&["expose", "18090:8080"]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        "exposed: cloud callers reach 10.0.0.1:18090 -> local port 8080\n"
    );
    assert!(stdout(&call2()).ends_with("more\n"));
    let out = tb.mse_vpn(&["unexpose", "18090:8080"]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let start = Instant::now();
    while call2().status.success() {
        assert!(start.elapsed() < Duration::from_secs(5), "still listening");
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = tb.mse_vpn(&["unexpose", "18090:8080"]).output().unwrap();
    assert!(!out.status.success(), "removed twice");
    assert!(stderr(&out).contains("not exposed"), "{}", stderr(&out));
    assert_eq!(status(&tb)["forwards"].as_array().map(Vec::len), Some(1));
    // A port the jump host refuses (another program has it): reported, and not left
    // behind as a failed row in `status`.
    let jump = format!("{}-jump", tb.name);
    let mut taken = tb
        .cmd_in(&jump, &["socat", "TCP6-LISTEN:18095,ipv6only=0,fork", "-"])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    tb.wait_listening(&jump, 18095, Duration::from_secs(5));
    let out = tb.mse_vpn(&["expose", "18095:8080"]).output().unwrap();
    let _ = taken.kill();
    let _ = taken.wait();
    assert!(!out.status.success());
    assert!(
        stderr(&out)
            .contains("cannot expose 18095:8080: the jump host refused to listen on port 18095"),
        "{}",
        stderr(&out)
    );
    assert_eq!(status(&tb)["forwards"].as_array().map(Vec::len), Some(1));
    let table = stdout(&tb.mse_vpn(&["status"]).output().unwrap());
    assert!(!table.contains("FAILED"), "{table}");
    assert!(vpn.interrupt().success());
}

#[test]
fn run_starts_the_app_as_the_invoking_user_never_as_root() {
    if crate::harness::skip_unless_root() {
        return;
    }
    let tb = Testbed::up("rv6", &["--with", "none"]);
    let user = crate::harness::TestUser::create("mvrun", None);
    let env = user.sudo_env();
    // The session was started with sudo by mvrun: its control socket is mvrun's.
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let args = tb.up_args(&["10.0.0.0/16"], &[]);
    let args: Vec<&str> = args.iter().skip(1).map(String::as_str).collect();
    let mut up_args = vec!["up"];
    up_args.extend(args);
    let vpn = tb.start_cmd(tb.mse_vpn_with_env(&env, &[], &up_args));
    // A copy of the binary other users can run (the checkout may live under /root, 0700).
    let shared = tb.dir.join("mse-vpn-run");
    std::fs::copy(crate::harness::bin(), &shared).expect("copy the binary");
    let shared = shared.to_string_lossy().into_owned();
    let state = tb.state_dir();

    // mvrun itself, no root: allowed (the socket is theirs), and the app runs as mvrun.
    let out = tb
        .cmd_in(
            &tb.lap(),
            &[
                "runuser",
                "-u",
                "mvrun",
                "--",
                &shared,
                "run",
                "--expose",
                "20881:8080",
                "--",
                "id",
                "-un",
            ],
        )
        .env("MSE_VPN_STATE_DIR", &state)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "mvrun");

    // `sudo mse-vpn run` by mvrun: root drops to mvrun for the app.
    let out = tb
        .mse_vpn_with_env(
            &env,
            &[],
            &[
                "run",
                "--expose",
                "20882:8080",
                "--",
                "sh",
                "-c",
                "id -un; echo $HOME; exit 5",
            ],
        )
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert_eq!(stdout(&out), "mvrun\n/home/mvrun\n");

    // Another user may not expose ports on mvrun's session.
    let out = tb
        .cmd_in(
            &tb.lap(),
            &[
                "runuser",
                "-u",
                "nobody",
                "--",
                &shared,
                "run",
                "--expose",
                "20883:8080",
                "--",
                "true",
            ],
        )
        .env("MSE_VPN_STATE_DIR", &state)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("permission denied"),
        "{}",
        stderr(&out)
    );
    assert!(vpn.interrupt().success());
}

/// A local app on 127.0.0.1:PORT that accepts connections and never reads from them.
const DEAF_SERVER: &str = r#"
import socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(16)
print("listening", flush=True)
held = []
while True:
    c, _ = s.accept()
    held.append(c)
"#;

#[test]
fn a_loopback_app_that_stops_reading_pauses_only_its_own_call() {
    if crate::harness::skip_unless_root() {
        return;
    }
    let tb = Testbed::up("rv7", &["--with", "nginx"]);
    let script = write_script(&tb, "deaf.py", DEAF_SERVER);
    let mut deaf = tb
        .cmd_in(&tb.lap(), &["python3", &script, "8083"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    {
        let mut line = String::new();
        use std::io::BufRead;
        std::io::BufReader::new(deaf.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "listening");
    }
    // One SSH connection: the stuck call and the download share it.
    let vpn = tb.start(
        &["10.0.0.0/16"],
        &["--connections", "1", "--expose", "18083:8083"],
    );
    // A cloud caller pushes 300 MB at the app that never reads.
    let mut pusher = tb
        .cmd_in(
            &format!("{}-vpc", tb.name),
            &[
                "timeout",
                "60",
                "bash",
                "-c",
                "head -c 300000000 /dev/zero | socat -u - TCP:10.0.0.1:18083",
            ],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Until the call's SSH window and every buffer behind it are full: the jump host's sshd
    // stops reading the caller once the window is used up, and the caller's socket backs up
    // in the VPC. The download below then shares the connection with a stuck channel.
    let vpc = format!("{}-vpc", tb.name);
    let start = Instant::now();
    loop {
        let queues = tb.send_queues(&vpc, &["dst", "10.0.0.1:18083"]);
        if queues.iter().any(|q| *q >= 256 * 1024) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the caller never backed up: {queues:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Meanwhile a download over the same SSH connection is not held up.
    let start = Instant::now();
    let out = tb.sh(
        30,
        "curl -sS -o /dev/null -w '%{size_download}' http://10.0.0.10/10m.bin",
    );
    let took = start.elapsed();
    assert_eq!(stdout(&out), "10485760", "{}", stderr(&out));
    assert!(took < Duration::from_secs(10), "the download took {took:?}");
    println!("10 MiB downloaded in {took:?} beside a stuck loopback call");
    // The stuck call is paused at its SSH window: still open (never reset for being slow),
    // and not buffered without end.
    assert!(
        pusher.try_wait().unwrap().is_none(),
        "the paused call was ended"
    );
    let rss = rss_mib(vpn.pid());
    assert!(rss < 150, "mse-vpn holds {rss} MiB for a paused call");
    let _ = pusher.kill();
    let _ = pusher.wait();
    let _ = deaf.kill();
    let _ = deaf.wait();
    assert!(vpn.interrupt().success());
}

#[test]
fn a_jump_host_address_not_found_at_start_is_found_later_and_env_waits_for_it() {
    if crate::harness::skip_unless_root() {
        return;
    }
    // The jump host's commands hang while a flag file exists (a slow login shell): `up`'s
    // first look for its VPC address fails. Once they answer again, the session finds it by
    // itself, and `env` (or `run`) waits for it instead of telling the user to restart.
    let tb = Testbed::up("rv8", &[]);
    let flag = tb.dir.join("slow-shell");
    let script = tb.dir.join("slow-shell.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nwhile [ -e {} ]; do sleep 0.2; done\nexec sh -c \"$SSH_ORIGINAL_COMMAND\"\n",
            flag.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::write(&flag, "").unwrap();
    tb.edit_sshd_config(
        "LogLevel VERBOSE",
        &format!("LogLevel VERBOSE\nForceCommand {}", script.display()),
    );
    let vpn = tb.start(&["10.0.0.0/16"], &[]);
    // Said before "is up", on stderr (read by its own thread: allow it a moment).
    let said = Instant::now();
    while !vpn
        .stderr()
        .contains("could not find out the jump host's VPC address")
    {
        assert!(said.elapsed() < Duration::from_secs(5), "{}", vpn.stderr());
        std::thread::sleep(Duration::from_millis(50));
    }
    std::fs::remove_file(&flag).unwrap();
    let out = tb
        .mse_vpn(&["env", "--expose", "20890"])
        .output()
        .expect("run env");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("export DUBBO_IP_TO_REGISTRY='10.0.0.1'"),
        "{}",
        stdout(&out)
    );
    assert!(vpn.interrupt().success());
}
