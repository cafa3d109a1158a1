//! `up --daemon`: the session started again as a detached child whose stderr is the log file;
//! the parent waits for the child's "is up" lines on a pipe (its stdout), prints them and
//! exits, or prints the log and the child's exit status if it never comes up. The child
//! knows itself by [`is_child`].

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use mse_vpn_platform as platform;

use super::UpArgs;
use crate::ssh;

/// Set in the environment of the detached child of `up --daemon`.
const DAEMON_CHILD: &str = "MSE_VPN_DAEMON_CHILD";

/// True in the detached child of `up --daemon`.
pub fn is_child() -> bool {
    std::env::var_os(DAEMON_CHILD).is_some()
}

/// The log file of `up --daemon`.
pub fn log_path(args: &UpArgs, log_file: Option<&Path>, state_dir: &Path) -> PathBuf {
    log_file
        .map(Path::to_owned)
        .unwrap_or_else(|| state_dir.join(format!("{}.log", args.tun)))
}

/// `up --daemon`: starts the same command detached, its stderr (the log) in the log file and
/// its stdout a pipe to us. The child writes the lines a foreground `up` prints to the pipe
/// once the tunnel is up, then points its stdout at the log file: we print those lines and
/// exit 0 at the pipe's end. A child that fails ends without them: we print the log and exit
/// with its status.
pub fn daemonize(args: &UpArgs, log_file: Option<&Path>, state_dir: &Path) -> ExitCode {
    use std::io::{BufRead, Read, Seek, SeekFrom};
    let log_path = log_path(args, log_file, state_dir);
    let fail = |msg: String| {
        eprintln!("mse-vpn: {msg}");
        ExitCode::FAILURE
    };
    if let Some(dir) = log_path.parent()
        && let Err(e) = std::fs::create_dir_all(dir)
    {
        return fail(format!("cannot create {}: {e}", dir.display()));
    }
    let log = match std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
    {
        Ok(f) => f,
        Err(e) => {
            return fail(format!(
                "cannot open the log file {}: {e}",
                log_path.display()
            ));
        }
    };
    let start = log.metadata().map(|m| m.len()).unwrap_or(0);
    let (ready, ready_writer) = match std::io::pipe() {
        Ok(p) => p,
        Err(e) => return fail(format!("cannot create a pipe: {e}")),
    };
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => return fail(format!("cannot find my own executable: {e}")),
    };
    let mut cmd = std::process::Command::new(exe);
    cmd.args(std::env::args_os().skip(1))
        .env(DAEMON_CHILD, "1")
        .stdin(std::process::Stdio::null())
        .stdout(ready_writer)
        .stderr(log);
    platform::process::detached(&mut cmd);
    let spawned = cmd.spawn();
    drop(cmd); // our copy of the pipe's writing end: the pipe ends when the child's does
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => return fail(format!("cannot start the daemon: {e}")),
    };
    // The pipe, read in a thread so that a child that hangs can be given up on.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let lines: Vec<String> = std::io::BufReader::new(ready)
            .lines()
            .map_while(Result::ok)
            .collect();
        let _ = tx.send(lines);
    });
    let limit = Duration::from_secs(
        args.connect_timeout
            .unwrap_or(ssh::resolve::DEFAULT_CONNECT_TIMEOUT)
            * 2
            * (1 + args.jump.as_ref().map_or(1, |h| h.0.len()) as u64)
            + 30,
    );
    let read_log = || {
        let mut text = String::new();
        if let Ok(mut f) = std::fs::File::open(&log_path)
            && f.seek(SeekFrom::Start(start)).is_ok()
        {
            let _ = f.read_to_string(&mut text);
        }
        text
    };
    let lines = match rx.recv_timeout(limit) {
        Ok(lines) => lines,
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            eprint!("{}", read_log());
            return fail("the session did not come up in time; stopped it".into());
        }
    };
    if lines.last().is_some_and(|l| l.starts_with("mse-vpn is up")) {
        for line in &lines {
            println!("{line}");
        }
        println!(
            "running in the background as pid {}; log: {}; stop it with `mse-vpn down`",
            child.id(),
            log_path.display()
        );
        return ExitCode::SUCCESS;
    }
    // No "is up": the child ended (or is ending) without the tunnel.
    let status = match child.wait() {
        Ok(s) => s,
        Err(e) => return fail(format!("cannot wait for the daemon: {e}")),
    };
    eprint!("{}", read_log());
    let _ = fail(format!(
        "the session did not come up ({status}); log: {}",
        log_path.display()
    ));
    // The same documented exit status as the session's own.
    status
        .code()
        .and_then(|c| u8::try_from(c).ok())
        .map_or(ExitCode::FAILURE, ExitCode::from)
}
