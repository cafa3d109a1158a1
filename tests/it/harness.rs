//! The test harness: a namespace testbed built by `scripts/testbed` (torn down on drop, even
//! when a test panics), and a running `mse-vpn up` in its laptop namespace.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_mse-vpn")
}

/// True (after saying so on the terminal) when this process is not root: the end-to-end
/// tests build network namespaces and TUN devices, so as a non-root user each one is
/// reported as skipped and passes. Call it first thing in every test that needs root:
///
/// ```ignore
/// if crate::harness::skip_unless_root() {
///     return;
/// }
/// ```
pub fn skip_unless_root() -> bool {
    if nix::unistd::Uid::effective().is_root() {
        return false;
    }
    use std::io::Write;
    static ONCE: std::sync::Once = std::sync::Once::new();
    // The harness names each test's thread after the test (`module::name`); a test run on
    // the main thread is just "this test".
    let name = match std::thread::current().name() {
        Some(n) if n != "main" => n.to_owned(),
        _ => "(this test)".to_owned(),
    };
    // Written to the process's stderr directly: the test harness captures `eprintln!` and
    // shows it only for failing tests, and a skip must be visible.
    let mut err = std::io::stderr().lock();
    ONCE.call_once(|| {
        let _ = writeln!(
            err,
            "\nthe end-to-end tests (tests/it) build network namespaces and TUN devices and need root: each is skipped; run them as root (`bash scripts/test`, as CI does)"
        );
    });
    let _ = writeln!(err, "test {name} skipped: needs root (network namespaces)");
    true
}

fn must_be_root() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "the end-to-end tests build network namespaces and need root (CI runs them as root)"
    );
}

/// A simulated laptop / jump host / VPC in network namespaces.
pub struct Testbed {
    /// Testbed name (namespace prefix).
    pub name: String,
    /// Its directory (keys, configs, logs).
    pub dir: PathBuf,
    /// The jump host's address as the laptop reaches it.
    pub jump_addr: String,
}

impl Testbed {
    /// Builds a testbed; `opts` are `scripts/testbed up` options. `MSE_VPN_TB_PREFIX` (a few
    /// lowercase letters) is put in front of `name`, so two checkouts can run the suite at
    /// once without sharing namespaces.
    pub fn up(name: &str, opts: &[&str]) -> Testbed {
        must_be_root();
        let name = &format!(
            "{}{name}",
            std::env::var("MSE_VPN_TB_PREFIX").unwrap_or_default()
        );
        let out = Command::new("bash")
            .arg(root().join("scripts/testbed"))
            .args(["up", name])
            .args(opts)
            .output()
            .expect("run scripts/testbed");
        let dir = PathBuf::from(format!("/tmp/mvtb-{name}"));
        let mut tb = Testbed {
            name: name.to_owned(),
            dir: dir.clone(),
            jump_addr: String::new(),
        };
        assert!(
            out.status.success(),
            "testbed {name} failed to come up:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        tb.jump_addr = std::fs::read_to_string(dir.join("jump_addr"))
            .expect("jump_addr")
            .trim()
            .to_owned();
        tb
    }

    /// Runs `scripts/testbed CMD NAME` (sshd-kill, sshd-start, sshd-restart).
    pub fn control(&self, cmd: &str) {
        let out = Command::new("bash")
            .arg(root().join("scripts/testbed"))
            .args([cmd, &self.name])
            .output()
            .expect("run scripts/testbed");
        assert!(
            out.status.success(),
            "testbed {cmd}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Replaces `from` with `to` in the jump host's sshd_config and restarts sshd.
    pub fn edit_sshd_config(&self, from: &str, to: &str) {
        let conf = self.dir.join("sshd_config");
        let text = std::fs::read_to_string(&conf).expect("read sshd_config");
        assert!(text.contains(from), "sshd_config has no {from:?}");
        std::fs::write(&conf, text.replace(from, to)).expect("write sshd_config");
        self.control("sshd-restart");
    }

    /// Namespace names.
    pub fn lap(&self) -> String {
        format!("{}-lap", self.name)
    }

    /// A command run inside namespace `ns`.
    pub fn cmd_in(&self, ns: &str, argv: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns]).args(argv);
        c
    }

    /// Runs a command in the laptop namespace (bounded by `timeout` seconds) and returns its
    /// output.
    pub fn on_laptop(&self, timeout: u32, argv: &[&str]) -> Output {
        let t = timeout.to_string();
        let mut full = vec!["timeout", t.as_str()];
        full.extend_from_slice(argv);
        self.cmd_in(&self.lap(), &full)
            .output()
            .expect("run a command in the laptop namespace")
    }

    /// Waits until something listens on TCP `port` in namespace `ns` (a server the test
    /// just spawned is ready); panics after `limit`.
    pub fn wait_listening(&self, ns: &str, port: u16, limit: Duration) {
        let filter = format!("sport = :{port}");
        self.wait_ss(
            ns,
            &["-Hltn", &filter],
            limit,
            &format!("a listener on port {port}"),
        );
    }

    /// Waits until namespace `ns` has an established TCP connection to `dst` (`ADDR:PORT`):
    /// a client the test just spawned is under way; panics after `limit`.
    pub fn wait_established(&self, ns: &str, dst: &str, limit: Duration) {
        let filter = format!("dst {dst}");
        self.wait_ss(
            ns,
            &["-Htn", "state", "established", &filter],
            limit,
            &format!("a connection to {dst}"),
        );
    }

    fn wait_ss(&self, ns: &str, args: &[&str], limit: Duration, what: &str) {
        let start = Instant::now();
        let mut argv = vec!["ss"];
        argv.extend_from_slice(args);
        loop {
            let out = self.cmd_in(ns, &argv).output().expect("run ss");
            if !String::from_utf8_lossy(&out.stdout).trim().is_empty() {
                return;
            }
            assert!(
                start.elapsed() < limit,
                "no {what} in {ns} within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The unsent bytes (Send-Q) of each established TCP connection of namespace `ns` that
    /// matches `filter` (an `ss` filter, e.g. `["dst", "10.0.0.1:80"]`).
    pub fn send_queues(&self, ns: &str, filter: &[&str]) -> Vec<u64> {
        let mut argv = vec!["ss", "-Htn", "state", "established"];
        argv.extend_from_slice(filter);
        let out = self.cmd_in(ns, &argv).output().expect("run ss");
        // Columns without the state: Recv-Q Send-Q Local Peer.
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1)?.parse().ok())
            .collect()
    }

    /// Runs a shell snippet in the laptop namespace.
    pub fn sh(&self, timeout: u32, script: &str) -> Output {
        self.on_laptop(timeout, &["bash", "-c", script])
    }

    /// The laptop's links, addresses and routes: what mse-vpn must leave as it found it.
    pub fn snapshot(&self) -> String {
        let out = self.sh(
            10,
            "ip -o link show | sed 's/@[^:]*//' | awk '{print $2}'; ip -o addr show; ip route show table all; ip -6 route show table all; ip rule show; ip -6 rule show",
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The state directory used by this testbed's sessions.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    /// The TUN name used by this testbed's sessions.
    pub fn tun(&self) -> String {
        format!("mv{}", self.name)
    }

    /// `mse-vpn ARGS` in the laptop namespace, with this testbed's state dir.
    pub fn mse_vpn(&self, args: &[&str]) -> Command {
        let mut c = self.cmd_in(&self.lap(), &[bin()]);
        c.env("MSE_VPN_STATE_DIR", self.state_dir()).args(args);
        c
    }

    /// The usual `up` arguments for this testbed plus `extra`.
    pub fn up_args(&self, cidrs: &[&str], extra: &[&str]) -> Vec<String> {
        let mut v: Vec<String> = vec!["up".into()];
        for c in cidrs {
            v.push("--cidr".into());
            v.push((*c).into());
        }
        v.extend(
            [
                "--proxy",
                &format!("root@{}", self.jump_addr),
                "-i",
                &self.dir.join("id_ed25519").to_string_lossy(),
                "--known-hosts",
                &self.dir.join("known_hosts").to_string_lossy(),
                "--tun",
                &self.tun(),
                "-v",
            ]
            .iter()
            .map(|s| s.to_string()),
        );
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    }

    /// Starts `mse-vpn up` and waits (20 s at most) for it to report the tunnel up.
    pub fn start(&self, cidrs: &[&str], extra: &[&str]) -> Vpn {
        let args = self.up_args(cidrs, extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let vpn = Vpn::spawn(self.mse_vpn(&args));
        vpn.wait_up(Duration::from_secs(20));
        vpn
    }

    /// Runs `mse-vpn up` expecting it to fail; returns (status, stderr).
    pub fn up_fails(&self, args: &[&str]) -> (ExitStatus, String) {
        let mut vpn = Vpn::spawn(self.mse_vpn(args));
        let status = vpn.wait_exit(Duration::from_secs(30));
        (status, vpn.stderr())
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(root().join("scripts/testbed"))
            .args(["down", &self.name])
            .output();
    }
}

/// A running `mse-vpn` process.
pub struct Vpn {
    child: Child,
    up_rx: mpsc::Receiver<String>,
    stderr: Arc<Mutex<String>>,
    stdout: Arc<Mutex<String>>,
    /// One message from each output reader when it has read its pipe to the end.
    drained: mpsc::Receiver<()>,
    /// Readers that reported their end.
    readers_done: usize,
}

impl Vpn {
    /// Spawns the command, collecting its output.
    pub fn spawn(mut cmd: Command) -> Vpn {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env("NO_COLOR", "1")
            .env_remove("SUDO_USER")
            .env_remove("SSH_AUTH_SOCK");
        let mut child = cmd.spawn().expect("spawn mse-vpn");
        let (tx, up_rx) = mpsc::channel();
        let (drained_tx, drained) = mpsc::channel();
        let drained_err = drained_tx.clone();
        let stdout = Arc::new(Mutex::new(String::new()));
        let out = child.stdout.take().unwrap();
        let so = stdout.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                so.lock().unwrap().push_str(&format!("{line}\n"));
                if line.contains("mse-vpn is up") {
                    let _ = tx.send(line);
                }
            }
            let _ = drained_tx.send(());
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let err = child.stderr.take().unwrap();
        let se = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                se.lock().unwrap().push_str(&format!("{line}\n"));
            }
            let _ = drained_err.send(());
        });
        Vpn {
            child,
            up_rx,
            stderr,
            stdout,
            drained,
            readers_done: 0,
        }
    }

    /// Waits for the "is up" line; panics with the logs if it does not come.
    pub fn wait_up(&self, limit: Duration) {
        if self.up_rx.recv_timeout(limit).is_err() {
            panic!(
                "mse-vpn did not come up within {limit:?}\nstdout:\n{}\nstderr:\n{}",
                self.stdout(),
                self.stderr()
            );
        }
    }

    /// Everything it wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Everything it wrote to stdout so far.
    pub fn stdout(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }

    /// Its pid.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Waits for the process to exit (killing it after `limit`).
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().expect("wait") {
                // The output threads have read everything once both pipes hit EOF (a
                // `--daemon` child may hold them open longer: bounded).
                while self.readers_done < 2
                    && self.drained.recv_timeout(Duration::from_secs(2)).is_ok()
                {
                    self.readers_done += 1;
                }
                return st;
            }
            if start.elapsed() > limit {
                let _ = self.child.kill();
                panic!(
                    "mse-vpn did not exit within {limit:?}\nstderr:\n{}",
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends a signal to the process (`ip netns exec` execs, so the pid is mse-vpn's).
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig).expect("signal");
    }

    /// SIGKILL, then waits until the process is gone (reaped: its TUN and sockets are
    /// closed by the kernel by then).
    pub fn kill9(&mut self) {
        self.signal(nix::sys::signal::Signal::SIGKILL);
        self.wait_exit(Duration::from_secs(10));
    }

    /// True while the process runs.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGINT, then waits for a clean exit.
    pub fn interrupt(mut self) -> ExitStatus {
        self.signal(nix::sys::signal::Signal::SIGINT);
        self.wait_exit(Duration::from_secs(15))
    }
}

impl Drop for Vpn {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// sha256 of a file, as hex.
/// Waits until `path` exists (what a test waits for got there); panics with the session's
/// output after `limit`.
pub fn wait_for_file(path: &Path, vpn: &Vpn, limit: Duration) {
    let start = std::time::Instant::now();
    while !path.exists() {
        assert!(
            start.elapsed() < limit,
            "{} did not appear within {limit:?}\nstdout:\n{}\nstderr:\n{}",
            path.display(),
            vpn.stdout(),
            vpn.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn sha256_file(path: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// Text of an output's stdout.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Text of an output's stderr.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

// ----- A process's descriptors and CPU time, from /proc (used by tests/it/lifecycle.rs) -----

/// The descriptors `pid` has open, ascending.
pub fn open_fds(pid: i32) -> Vec<i32> {
    let mut fds: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("read /proc/PID/fd")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    fds.sort_unstable();
    fds
}

/// [`open_fds`] once it stopped changing (two reads 300 ms apart agree): what the process
/// holds when idle, without a short-lived descriptor in flight.
pub fn idle_fds(pid: i32) -> Vec<i32> {
    let mut last = open_fds(pid);
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(300));
        let now = open_fds(pid);
        if now == last {
            return now;
        }
        last = now;
    }
    panic!("the descriptors of {pid} never settled: {last:?}");
}

/// The soft `RLIMIT_NOFILE` that leaves exactly `free` more descriptors to a process holding
/// `held` (a new descriptor takes the lowest free number, and numbers at or above the limit
/// are refused with EMFILE).
pub fn nofile_leaving(held: &[i32], free: usize) -> u64 {
    let nth_free = (0..)
        .filter(|n| !held.contains(n))
        .nth(free - 1)
        .expect("a free number");
    nth_free as u64 + 1
}

/// `pid`'s soft and hard `RLIMIT_NOFILE`.
pub fn nofile(pid: i32) -> (u64, u64) {
    let out = Command::new("prlimit")
        .args([
            "--pid",
            &pid.to_string(),
            "--nofile",
            "--raw",
            "--noheadings",
        ])
        .args(["--output", "SOFT,HARD"])
        .output()
        .expect("run prlimit");
    let text = stdout(&out);
    let v: Vec<u64> = text
        .split_whitespace()
        .map(|n| n.parse().expect("a number"))
        .collect();
    assert_eq!(v.len(), 2, "prlimit: {text}{}", stderr(&out));
    (v[0], v[1])
}

/// Sets `pid`'s soft `RLIMIT_NOFILE` (the hard limit stays).
pub fn set_nofile(pid: i32, soft: u64) {
    let out = Command::new("prlimit")
        .args(["--pid", &pid.to_string(), &format!("--nofile={soft}:")])
        .output()
        .expect("run prlimit");
    assert!(out.status.success(), "prlimit: {}", stderr(&out));
    assert_eq!(nofile(pid).0, soft);
}

/// CPU time `pid` has used so far (user + system, all threads).
pub fn cpu_time(pid: i32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc/PID/stat");
    // After "pid (comm) ": state is field 3, utime 14, stime 15.
    let rest: Vec<&str> = stat
        .rsplit_once(')')
        .expect("a stat line")
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 = rest[11].parse::<u64>().unwrap() + rest[12].parse::<u64>().unwrap();
    let per_sec = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as u64;
    Duration::from_millis(ticks * 1000 / per_sec)
}

// ----- Authentication helpers (used by tests/it/auth.rs) -----

impl Testbed {
    /// Lets the key in the public key file `pubkey` log in to the jump host. sshd's
    /// `AuthorizedKeysFile` is this testbed's `authorized_keys`, shared by every login name.
    pub fn authorize(&self, pubkey: &Path) {
        let key = std::fs::read_to_string(pubkey).expect("read a public key");
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(self.dir.join("authorized_keys"))
            .expect("open authorized_keys");
        std::io::Write::write_all(&mut file, key.as_bytes()).expect("append to authorized_keys");
    }

    /// `up` arguments with no key and no known_hosts option (mse-vpn picks its defaults):
    /// `--proxy [LOGIN@]JUMP` (no `LOGIN@` when `login` is `None`), this testbed's TUN, `-v`,
    /// then `extra`.
    pub fn up_args_without_auth(
        &self,
        login: Option<&str>,
        cidrs: &[&str],
        extra: &[&str],
    ) -> Vec<String> {
        let mut v: Vec<String> = vec!["up".into()];
        for c in cidrs {
            v.extend(["--cidr".to_owned(), (*c).to_owned()]);
        }
        let proxy = match login {
            Some(l) => format!("{l}@{}", self.jump_addr),
            None => self.jump_addr.clone(),
        };
        v.extend([
            "--proxy".into(),
            proxy,
            "--tun".into(),
            self.tun(),
            "-v".into(),
        ]);
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    }

    /// `WRAPPER... mse-vpn ARGS` in the laptop namespace with `env` set. The variables are set
    /// by env(1) inside the namespace, so they survive [`Vpn::spawn`], which scrubs
    /// `SUDO_USER` and `SSH_AUTH_SOCK` from the environment it starts with.
    pub fn mse_vpn_with_env(
        &self,
        env: &[(&str, &str)],
        wrapper: &[&str],
        args: &[&str],
    ) -> Command {
        let mut argv: Vec<String> = vec![
            "env".into(),
            format!("MSE_VPN_STATE_DIR={}", self.state_dir().display()),
        ];
        argv.extend(env.iter().map(|(k, v)| format!("{k}={v}")));
        argv.extend(wrapper.iter().map(|s| s.to_string()));
        argv.push(bin().to_owned());
        argv.extend(args.iter().map(|s| s.to_string()));
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        self.cmd_in(&self.lap(), &argv)
    }

    /// `mse-vpn ARGS` on a fresh pseudo-terminal (its controlling terminal, so `/dev/tty`
    /// works as in a real shell), answering each output containing `prompt` with the next of
    /// `answers` after `delay_secs` (a prompt with no answer left waits, as a user who walked
    /// away would). Everything printed on the terminal is the returned process's stdout.
    pub fn on_pty(&self, prompt: &str, answers: &[&str], delay_secs: u32, args: &[&str]) -> Vpn {
        let driver = self.dir.join("pty_driver.py");
        std::fs::write(&driver, PTY_DRIVER).expect("write the pty driver");
        let answers = answers.join("\n");
        let delay = delay_secs.to_string();
        let env = [
            ("MV_ANSWERS", answers.as_str()),
            ("MV_PROMPT", prompt),
            ("MV_DELAY", delay.as_str()),
        ];
        let driver = driver.to_string_lossy().into_owned();
        Vpn::spawn(self.mse_vpn_with_env(&env, &["python3", &driver], args))
    }

    /// Spawns `cmd` (an `mse-vpn up`) and waits (20 s at most) for it to report the tunnel up.
    pub fn start_cmd(&self, cmd: Command) -> Vpn {
        let vpn = Vpn::spawn(cmd);
        vpn.wait_up(Duration::from_secs(20));
        vpn
    }

    /// The jump host's sshd log so far (LogLevel VERBOSE: one "Accepted publickey for USER
    /// ... ssh2: TYPE SHA256:..." line per login, one "Starting session: command ..." per
    /// command).
    pub fn sshd_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("sshd.log")).unwrap_or_default()
    }

    /// GETs http://10.0.0.10/ from the laptop and checks nginx's page came back.
    pub fn assert_curl_index(&self) {
        let out = self.on_laptop(15, &["curl", "-sS", "-m", "10", "http://10.0.0.10/"]);
        assert_eq!(
            stdout(&out).trim(),
            "hello from the VPC",
            "curl through the tunnel: {}",
            stderr(&out)
        );
    }
}

/// Makes a key pair at `path` (and `path.pub`) with `ssh-keygen -q -N PASSPHRASE -f path ARGS`.
pub fn keygen(path: &Path, passphrase: &str, args: &[&str]) {
    let _ = std::fs::remove_file(path);
    let _ = std::fs::remove_file(pub_path(path));
    let out = Command::new("ssh-keygen")
        .args(["-q", "-N", passphrase, "-C", "mse-vpn-test", "-f"])
        .arg(path)
        .args(args)
        .output()
        .expect("run ssh-keygen");
    assert!(
        out.status.success(),
        "ssh-keygen {args:?}: {}",
        stderr(&out)
    );
}

/// The `SHA256:...` fingerprint of a public key file, as sshd logs it.
pub fn fingerprint(pubkey: &Path) -> String {
    let out = Command::new("ssh-keygen")
        .arg("-lf")
        .arg(pubkey)
        .output()
        .expect("run ssh-keygen -lf");
    assert!(out.status.success(), "ssh-keygen -lf: {}", stderr(&out));
    stdout(&out)
        .split_whitespace()
        .nth(1)
        .expect("a fingerprint")
        .to_owned()
}

/// The public key file next to private key file `path` (`path.pub`).
pub fn pub_path(path: &Path) -> PathBuf {
    PathBuf::from(format!("{}.pub", path.display()))
}

/// Runs a command on a fresh pseudo-terminal that is its controlling terminal, copies
/// everything it prints to stdout, and answers each output containing `MV_PROMPT` with the
/// next line of `MV_ANSWERS` after `MV_DELAY` seconds. SIGINT/SIGTERM are passed on; the
/// exit code is the command's (128+N for signal N).
const PTY_DRIVER: &str = r#"
import os, pty, signal, sys, time
answers = [a for a in os.environ.pop("MV_ANSWERS", "").split("\n") if a]
prompt = os.environ.pop("MV_PROMPT").encode()
delay = float(os.environ.pop("MV_DELAY", "0"))
pid, fd = pty.fork()
if pid == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
def forward(sig, _frame):
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
signal.signal(signal.SIGINT, forward)
signal.signal(signal.SIGTERM, forward)
seen = b""
while True:
    try:
        data = os.read(fd, 4096)
    except OSError:
        break
    if not data:
        break
    os.write(1, data)
    seen += data
    while prompt in seen:
        seen = seen.split(prompt, 1)[1]
        if answers:
            time.sleep(0.2 + delay)
            os.write(fd, (answers.pop(0) + "\n").encode())
_, status = os.waitpid(pid, 0)
code = os.waitstatus_to_exitcode(status)
sys.exit(code if code >= 0 else 128 - code)
"#;

/// A throwaway local user, deleted (with its home) on drop, even when the test fails.
pub struct TestUser {
    /// Login name.
    pub name: &'static str,
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Home directory.
    pub home: PathBuf,
}

impl TestUser {
    /// A user with an unlocked account and no password, or with `password`.
    pub fn create(name: &'static str, password: Option<&str>) -> TestUser {
        let _ = Command::new("userdel").args(["-r", name]).output();
        run_ok(&["useradd", "-m", "-s", "/bin/sh", name]);
        match password {
            // "*": no password login, but not "!" (locked), which sshd refuses without PAM.
            None => run_ok(&["usermod", "-p", "*", name]),
            Some(p) => {
                let mut child = Command::new("chpasswd")
                    .stdin(std::process::Stdio::piped())
                    .spawn()
                    .expect("chpasswd");
                std::io::Write::write_all(
                    child.stdin.as_mut().unwrap(),
                    format!("{name}:{p}\n").as_bytes(),
                )
                .unwrap();
                assert!(child.wait().unwrap().success(), "chpasswd");
            }
        }
        let user = nix::unistd::User::from_name(name)
            .expect("passwd lookup")
            .expect("the new user");
        TestUser {
            name,
            uid: user.uid.as_raw(),
            gid: user.gid.as_raw(),
            home: user.dir,
        }
    }

    /// Writes `path` (creating its directories, all the user's) with `mode`.
    pub fn write(&self, path: &Path, text: &str, mode: u32) {
        let dir = path.parent().unwrap();
        std::fs::create_dir_all(dir).unwrap();
        for d in dir.ancestors().take_while(|d| d.starts_with(&self.home)) {
            self.own(d, 0o700);
        }
        std::fs::write(path, text).unwrap();
        self.own(path, mode);
    }

    /// Gives `path` to this user with `mode`.
    pub fn own(&self, path: &Path, mode: u32) {
        std::os::unix::fs::chown(path, Some(self.uid), Some(self.gid)).expect("chown");
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode))
            .expect("chmod");
    }

    /// The environment `sudo` gives root's process on this user's behalf.
    pub fn sudo_env(&self) -> Vec<(String, String)> {
        vec![
            ("SUDO_USER".into(), self.name.into()),
            ("SUDO_UID".into(), self.uid.to_string()),
            ("SUDO_GID".into(), self.gid.to_string()),
            ("HOME".into(), "/root".into()),
        ]
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        let _ = Command::new("userdel").args(["-r", self.name]).output();
    }
}

/// Runs a command, which must succeed.
fn run_ok(argv: &[&str]) {
    let out = Command::new(argv[0])
        .args(&argv[1..])
        .output()
        .expect("run");
    assert!(out.status.success(), "{argv:?}: {}", stderr(&out));
}

/// `args` as `&str`s.
pub fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// The path as a `String`.
pub fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// Retries a GET of http://10.0.0.10/ for up to `limit`; true once one succeeds.
pub fn curl_within(tb: &Testbed, limit: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        let out = tb.on_laptop(5, &["curl", "-sS", "-m", "2", "http://10.0.0.10/"]);
        if stdout(&out).trim() == "hello from the VPC" {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    false
}

/// Resident memory of process `pid`, in MiB (from /proc).
pub fn rss_mib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmRSS")
        / 1024
}
