//! Linux's side of the rootless mode: the helper ([`init_main`], `mse-vpn __netns-init`, run
//! in a fresh process before any thread exists, as `unshare(CLONE_NEWUSER)` requires) and the
//! parent's handle on it ([`Namespace`]). See the parent module for the exchange.

use std::ffi::{CString, OsString};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use nix::errno::Errno;
use nix::mount::{MsFlags, mount};
use nix::sched::{CloneFlags, unshare};
use nix::sys::signal::Signal;
use nix::sys::socket::{
    AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, sendmsg, socketpair,
};

use super::{
    INIT_ARG, NamespaceError, NetnsSpec, PARENT_ENV, SOCK_ENV, Stage, UsernsSysctls, failure_error,
    failure_message, resolv_conf,
};
use crate::sys;

/// Where `ip` (iproute2) is looked for first: an ordinary user's PATH often lacks `sbin`.
const IP_PATHS: [&str; 4] = ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"];

/// The largest message either side sends (the app's added environment is a few KiB).
const MAX_MESSAGE: usize = 256 * 1024;

/// The namespace helper, and later the app it became: the parent's side.
///
/// Dropped before [`Namespace::into_child`], it kills the helper (or the app) and reaps it.
pub struct Namespace {
    child: Option<Child>,
    sock: OwnedFd,
    tun: Option<(OwnedFd, bool)>,
}

/// The helper's failure reports are read with the helper's own errno values.
fn helper(e: impl Into<io::Error>) -> NamespaceError {
    NamespaceError::Helper(e.into())
}

impl Namespace {
    /// Starts the helper for `spec` and the app `app` (program and arguments), and waits until
    /// the namespace is ready (the TUN's descriptor arrived) or says why it is not. The app is
    /// not started yet: [`Namespace::start_app`] does. Blocks for the helper's setup (tens of
    /// milliseconds: a few `ip` commands).
    ///
    /// The helper gets a parent-death signal: call this from a thread that lives as long as
    /// the app (the main thread, or a runtime's worker; never a blocking pool's thread, which
    /// exits when idle and would take the helper with it).
    pub fn create(spec: &NetnsSpec, app: &[OsString]) -> Result<Namespace, NamespaceError> {
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(helper)?;
        let mut cmd = Command::new("/proc/self/exe");
        cmd.arg0("mse-vpn")
            .arg(INIT_ARG)
            .args(spec.args())
            .arg("--")
            .args(app)
            .env(SOCK_ENV, theirs.as_raw_fd().to_string())
            .env(PARENT_ENV, std::process::id().to_string());
        sys::inherit_fd(&mut cmd, theirs.as_raw_fd());
        let child = cmd.spawn().map_err(helper)?;
        drop(theirs);
        let mut ns = Namespace {
            child: Some(child),
            sock: ours,
            tun: None,
        };
        let mut buf = vec![0u8; MAX_MESSAGE];
        let (n, fd) = sys::recv_with_fd(&ns.sock, &mut buf).map_err(helper)?;
        match (&buf[..n], fd) {
            ([b'T', flags, ..], Some(fd)) => {
                ns.tun = Some((fd, *flags == b'v'));
                Ok(ns)
            }
            (msg @ [b'E', ..], _) => Err(failure_error(msg, || UsernsSysctls::read().blocker())),
            ([], _) => Err(NamespaceError::HelperEnded(ns.reap())),
            _ => Err(NamespaceError::HelperEnded(
                "an unexpected message".to_owned(),
            )),
        }
    }

    /// The helper's pid, which becomes the app's.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// The TUN device's descriptor, once, and whether its packets carry a virtio-net header.
    pub fn take_tun(&mut self) -> Option<(OwnedFd, bool)> {
        self.tun.take()
    }

    /// Lets the helper exec the app with `env` added to (or replacing in) the environment it
    /// inherited. Returns once the app runs, or why it could not start. Blocks for a moment.
    pub fn start_app(&mut self, env: &[(String, String)]) -> Result<(), NamespaceError> {
        let mut msg = vec![b'G'];
        for (name, value) in env {
            msg.extend_from_slice(name.as_bytes());
            msg.push(b'=');
            msg.extend_from_slice(value.as_bytes());
            msg.push(0);
        }
        let iov = [io::IoSlice::new(&msg)];
        sendmsg::<()>(
            self.sock.as_raw_fd(),
            &iov,
            &[],
            MsgFlags::MSG_NOSIGNAL,
            None,
        )
        .map_err(helper)?;
        let mut buf = vec![0u8; 4096];
        let (n, _) = sys::recv_with_fd(&self.sock, &mut buf).map_err(helper)?;
        match &buf[..n] {
            // The socket is close-on-exec in the helper: its end means the exec succeeded.
            [] => Ok(()),
            msg => {
                let e = failure_error(msg, || None);
                self.reap();
                Err(e)
            }
        }
    }

    /// The app's process, to wait for (this handle no longer kills it).
    pub fn into_child(mut self) -> Child {
        self.child.take().expect("the child is there until taken")
    }

    /// Kills the helper (or the app) and reaps it; says how it ended.
    fn reap(&mut self) -> String {
        let Some(mut child) = self.child.take() else {
            return "already reaped".to_owned();
        };
        if let Ok(Some(status)) = child.try_wait() {
            return status.to_string();
        }
        let _ = child.kill();
        child
            .wait()
            .map_or_else(|e| e.to_string(), |s| s.to_string())
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        self.reap();
    }
}

/// Where a `run` session of this user keeps its control socket (no root, nothing to journal):
/// `$XDG_RUNTIME_DIR/mse-vpn` when that is set, else `/tmp/mse-vpn-UID`.
pub fn user_state_dir() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| Path::new(d).is_absolute()) {
        Some(dir) => PathBuf::from(dir).join("mse-vpn"),
        None => std::env::temp_dir().join(format!("mse-vpn-{}", nix::unistd::getuid())),
    }
}

/// A failure of the helper: where, the errno, and a detail (a name, a command).
struct Failure(Stage, i32, String);

impl Failure {
    fn at(stage: Stage, detail: impl Into<String>) -> impl FnOnce(Errno) -> Failure {
        let detail = detail.into();
        move |e| Failure(stage, e as i32, detail)
    }

    fn io(stage: Stage, detail: impl Into<String>) -> impl FnOnce(io::Error) -> Failure {
        let detail = detail.into();
        move |e| Failure(stage, e.raw_os_error().unwrap_or(0), detail)
    }
}

/// `mse-vpn __netns-init SPEC... -- APP ARGS...`: builds the namespace (see the parent
/// module), sends the TUN's descriptor, waits for the go, and execs the app. Returns only on
/// failure (the exit status), after reporting it to the parent.
pub fn init_main() -> std::process::ExitCode {
    use std::process::ExitCode;
    let sock = std::env::var(SOCK_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .and_then(|raw| sys::adopt_inherited_socket(raw).ok());
    let Some(sock) = sock else {
        eprintln!("mse-vpn: {INIT_ARG} is internal to `mse-vpn run`");
        return ExitCode::from(2);
    };
    // Not left to the programs the helper starts (`ip`, the app).
    let _ = nix::fcntl::fcntl(
        &sock,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    );
    let report = |f: Failure| {
        let msg = failure_message(f.0, f.1, &f.2);
        let _ = sendmsg::<()>(
            sock.as_raw_fd(),
            &[io::IoSlice::new(&msg)],
            &[],
            MsgFlags::MSG_NOSIGNAL,
            None,
        );
    };
    // Until the app runs there is nothing to be gentle with: the helper dies with mse-vpn.
    if !orphan_guard(Signal::SIGKILL) {
        return ExitCode::from(1);
    }
    let args: Vec<OsString> = std::env::args_os().skip(2).collect();
    let split = args.iter().position(|a| a == "--").unwrap_or(args.len());
    let spec = args[..split]
        .iter()
        .map(|a| a.to_str().map(str::to_owned))
        .collect::<Option<Vec<String>>>()
        .and_then(|a| NetnsSpec::parse(&a));
    let app = args.get(split + 1..).unwrap_or_default();
    let (Some(spec), Some(program)) = (spec, app.first()) else {
        report(Failure(Stage::Other, 0, "bad arguments".to_owned()));
        return ExitCode::from(2);
    };
    let (tun, vnet) = match setup(&spec) {
        Ok(t) => t,
        Err(f) => {
            report(f);
            return ExitCode::from(1);
        }
    };
    let flags = [b'T', if vnet { b'v' } else { b'-' }];
    let fds = [tun.as_raw_fd()];
    let sent = sendmsg::<()>(
        sock.as_raw_fd(),
        &[io::IoSlice::new(&flags)],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::MSG_NOSIGNAL,
        None,
    );
    drop(tun);
    if sent.is_err() {
        return ExitCode::from(1);
    }
    // The go, with the app's added environment; the parent's end closed instead: it gave up.
    let mut buf = vec![0u8; MAX_MESSAGE];
    let added = match sys::recv_with_fd(&sock, &mut buf) {
        Ok((n, _)) if n > 0 && buf[0] == b'G' => buf[1..n].to_vec(),
        _ => return ExitCode::from(1),
    };
    // The app outlives no mse-vpn: without it, it has no network. SIGTERM lets it shut
    // down cleanly (a JVM runs its shutdown hooks).
    if !orphan_guard(Signal::SIGTERM) {
        return ExitCode::from(1);
    }
    let name = program.to_string_lossy().into_owned();
    // The app starts with the signal dispositions a shell would give it.
    let _ = sys::default_sigpipe();
    let e = exec(app, &added);
    report(Failure(Stage::Exec, e as i32, name));
    ExitCode::from(if e == Errno::ENOENT { 127 } else { 126 })
}

/// Sets the parent-death signal and checks that the parent that started us is still there
/// (it may have died before the signal was set).
fn orphan_guard(signal: Signal) -> bool {
    let _ = nix::sys::prctl::set_pdeathsig(signal);
    let parent = std::env::var(PARENT_ENV)
        .ok()
        .and_then(|p| p.parse::<i32>().ok());
    parent == Some(nix::unistd::getppid().as_raw())
}

/// Execs the app with the inherited environment (less the helper's own variables), `added`
/// (`NAME=VALUE\0...`) replacing what it names. Returns only on failure.
fn exec(app: &[OsString], added: &[u8]) -> Errno {
    let cstr = |b: &[u8]| CString::new(b).map_err(|_| Errno::EINVAL);
    let added: Vec<&[u8]> = added.split(|b| *b == 0).filter(|e| !e.is_empty()).collect();
    let name_of = |e: &[u8]| e.split(|b| *b == b'=').next().unwrap_or_default().to_vec();
    let replaced: Vec<Vec<u8>> = added.iter().map(|e| name_of(e)).collect();
    let mut env = Vec::new();
    for (k, v) in std::env::vars_os() {
        let k = k.as_bytes();
        if k == SOCK_ENV.as_bytes() || k == PARENT_ENV.as_bytes() || replaced.iter().any(|r| r == k)
        {
            continue;
        }
        let mut e = k.to_vec();
        e.push(b'=');
        e.extend_from_slice(v.as_bytes());
        env.push(e);
    }
    env.extend(added.iter().map(|e| e.to_vec()));
    let argv: Result<Vec<CString>, Errno> = app.iter().map(|a| cstr(a.as_bytes())).collect();
    let envp: Result<Vec<CString>, Errno> = env.iter().map(|e| cstr(e)).collect();
    match (argv, envp) {
        (Ok(argv), Ok(envp)) => match nix::unistd::execvpe(&argv[0], &argv, &envp) {
            Ok(never) => match never {},
            Err(e) => e,
        },
        (Err(e), _) | (_, Err(e)) => e,
    }
}

/// The namespace: user + network + mount, the user mapped to root in it; loopback and the
/// TUN set up; a private resolv.conf when the spec names a responder; then a nested user
/// namespace that maps the user back to itself, so that the app runs with its own uid and
/// no capabilities. Returns the TUN and whether it carries virtio-net headers.
fn setup(spec: &NetnsSpec) -> Result<(OwnedFd, bool), Failure> {
    let (uid, gid) = (nix::unistd::getuid(), nix::unistd::getgid());
    unshare(CloneFlags::CLONE_NEWUSER | CloneFlags::CLONE_NEWNET | CloneFlags::CLONE_NEWNS)
        .map_err(Failure::at(Stage::UserNs, ""))?;
    write_id_maps(&format!("0 {uid} 1\n"), &format!("0 {gid} 1\n"))?;

    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(Failure::io(Stage::TunOpen, "/dev/net/tun"))?;
    let vnet = match sys::tun_set_iff(&dev, &spec.tun, true) {
        Ok(()) => true,
        // A kernel without virtio-net headers on TUN: plain packets.
        Err(e) if e.raw_os_error() == Some(Errno::EINVAL as i32) => {
            sys::tun_set_iff(&dev, &spec.tun, false)
                .map_err(Failure::io(Stage::TunDevice, spec.tun.clone()))?;
            false
        }
        Err(e) => return Err(Failure::io(Stage::TunDevice, spec.tun.clone())(e)),
    };

    let ip = find_ip().ok_or(Failure(Stage::NoIp, 0, String::new()))?;
    for args in spec.ip_commands() {
        let shown = format!("ip {}", args.join(" "));
        let out = Command::new(&ip)
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .map_err(Failure::io(Stage::NoIp, shown.clone()))?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
            let errno = if stderr.contains("Operation not permitted") {
                Errno::EPERM as i32
            } else {
                0
            };
            return Err(Failure(Stage::Ip, errno, format!("{shown}\t{stderr}")));
        }
    }

    // The app's own ping opens an ICMP socket (iputils does when it has no raw socket, as
    // here): its group may (gid 0 here is the user's, as the nested map below keeps it).
    // The session carries the echo out where this host allows it. Best effort: a kernel
    // without the setting only costs the app its ping.
    let _ = std::fs::write("/proc/sys/net/ipv4/ping_group_range", "0 0\n");

    // Nothing mounted here propagates back to the host.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(Failure::at(Stage::Mount, "/"))?;
    if let Some(dns) = spec.dns {
        let host = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        bind_file(&resolv_conf(&host, dns), Path::new("/etc/resolv.conf"))?;
    }

    unshare(CloneFlags::CLONE_NEWUSER).map_err(Failure::at(Stage::UserNs, "nested"))?;
    write_id_maps(&format!("{uid} 0 1\n"), &format!("{gid} 0 1\n"))?;
    Ok((OwnedFd::from(dev), vnet))
}

/// Writes this process's uid and gid maps (after `setgroups deny`, which an unprivileged
/// gid map needs; a nested namespace inherits the denial).
fn write_id_maps(uid_map: &str, gid_map: &str) -> Result<(), Failure> {
    let write = |file: &str, text: &str| {
        std::fs::write(format!("/proc/self/{file}"), text).map_err(Failure::io(Stage::IdMap, file))
    };
    if let Err(f) = write("setgroups", "deny") {
        let already =
            std::fs::read_to_string("/proc/self/setgroups").is_ok_and(|t| t.trim() == "deny");
        if !already {
            return Err(f);
        }
    }
    write("uid_map", uid_map)?;
    write("gid_map", gid_map)
}

/// Bind-mounts a file holding `text` over `target` (following a symlink such as
/// systemd-resolved's). The file is made in the temporary directory and removed once
/// mounted: the mount keeps it, and nothing is left behind.
fn bind_file(text: &str, target: &Path) -> Result<(), Failure> {
    let path = std::env::temp_dir().join(format!("mse-vpn-resolv.{}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let fail = Failure::io(Stage::Mount, path.display().to_string());
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(&path)
        .and_then(|mut f| io::Write::write_all(&mut f, text.as_bytes()));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&path);
        return Err(fail(e));
    }
    let mounted = mount(
        Some(&path),
        target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    );
    let _ = std::fs::remove_file(&path);
    mounted.map_err(Failure::at(Stage::Mount, target.display().to_string()))
}

/// iproute2's `ip`.
fn find_ip() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    IP_PATHS
        .iter()
        .map(PathBuf::from)
        .chain(std::env::split_paths(&path).map(|d| d.join("ip")))
        .find(|p| p.is_file())
}
