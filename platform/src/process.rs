//! Processes and signals, per OS: whether a process still runs, whether we are privileged,
//! leaving the terminal's session, the signals that stop a session, passing signals on to a
//! child (`mse-vpn run`), and running a child as the invoking user.
//!
//! - **Unix**: `kill(pid, 0)`, effective uid 0, `setsid`, SIGINT/SIGTERM, SIGTERM/SIGHUP passed
//!   on, `setuid`/`setgid` for children started under `sudo`.
//! - **Windows**: `OpenProcess` and the token's elevation (`win32.rs`), Ctrl-C / Ctrl-Break /
//!   console close / shutdown; a console's Ctrl-C already reaches every process attached to
//!   it, so nothing is passed on; children run as the current user (there is no `sudo`).

use std::process::ExitStatus;

use crate::account::Account;

/// True if process `pid` is running (our own pid included). On Linux a zombie (killed, not
/// yet reaped by its parent) is dead: it holds no TUN and will never undo its changes.
pub fn pid_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    if pid as u32 == std::process::id() {
        return true;
    }
    // EPERM: it exists, and belongs to someone else (`status` run by the session's user).
    #[cfg(unix)]
    return match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) {
        Ok(()) | Err(nix::errno::Errno::EPERM) => !zombie(pid),
        Err(_) => false,
    };
    #[cfg(windows)]
    return crate::win32::pid_alive(pid as u32);
}

/// True if `pid` is a zombie, by `/proc/PID/stat` ("pid (comm) S ..."; comm may contain
/// spaces and parentheses). Unreadable: not known to be one.
#[cfg(target_os = "linux")]
fn zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state == "Z" || state == "X")
    })
}

/// Only Linux tells a zombie apart here.
#[cfg(all(unix, not(target_os = "linux")))]
fn zombie(_pid: i32) -> bool {
    false
}

/// How to get the privileges [`is_privileged`] checks, for messages ("must be run ...").
#[cfg(unix)]
pub const PRIVILEGED: &str = "as root (use sudo)";
/// How to get the privileges [`is_privileged`] checks, for messages ("must be run ...").
#[cfg(windows)]
pub const PRIVILEGED: &str = "from an elevated prompt (Run as administrator)";

/// True when running with the privileges `up` needs: root on Unix, an elevated token on
/// Windows.
pub fn is_privileged() -> bool {
    #[cfg(unix)]
    return nix::unistd::geteuid().is_root();
    #[cfg(windows)]
    return crate::win32::is_elevated();
}

/// Leaves the terminal's session (the `--daemon` child), so that the terminal's hangup and
/// Ctrl-C do not reach it. On Windows the child is started without a console instead.
pub fn detach() {
    #[cfg(unix)]
    let _ = nix::unistd::setsid();
}

/// Points this process's standard output at `file` (the `--daemon` child, once the parent
/// has read what it waited for from the pipe that was its stdout).
pub fn redirect_stdout(file: std::fs::File) -> std::io::Result<()> {
    #[cfg(unix)]
    return nix::unistd::dup2_stdout(&file).map_err(std::io::Error::from);
    #[cfg(windows)]
    return crate::win32::set_stdout(file);
}

/// Starts `cmd` outside the terminal's reach where that is decided at spawn time: on Windows
/// without a console and in a process group of its own (Ctrl-C in the terminal does not reach
/// it). On Unix the child calls [`detach`] itself.
pub fn detached(cmd: &mut std::process::Command) {
    #[cfg(windows)]
    {
        use std::os::windows::process::CommandExt;
        const DETACHED_PROCESS: u32 = 0x0000_0008;
        const CREATE_NEW_PROCESS_GROUP: u32 = 0x0000_0200;
        cmd.creation_flags(DETACHED_PROCESS | CREATE_NEW_PROCESS_GROUP);
    }
    #[cfg(unix)]
    let _ = cmd;
}

/// The exit status a shell would report: the code, or 128 + the signal that ended it.
pub fn exit_code(status: ExitStatus) -> i32 {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        status
            .code()
            .or_else(|| status.signal().map(|s| 128 + s))
            .unwrap_or(1)
    }
    #[cfg(windows)]
    {
        status.code().unwrap_or(1)
    }
}

/// Makes `cmd` run as `account` (uid, gid, and `HOME`, `USER`, `LOGNAME` unless its name is
/// unknown) when we are root; on Windows children always run as the current user.
pub fn run_as(cmd: &mut tokio::process::Command, account: &Account) {
    #[cfg(unix)]
    if is_privileged() && account.uid != 0 {
        cmd.uid(account.uid).gid(account.gid);
        if !account.name.is_empty() {
            cmd.env("HOME", &account.home)
                .env("USER", &account.name)
                .env("LOGNAME", &account.name);
        }
    }
    #[cfg(windows)]
    let _ = (cmd, account);
}

/// The signals that stop a session.
pub struct StopSignals {
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(windows)]
    ctrl_c: tokio::signal::windows::CtrlC,
    #[cfg(windows)]
    ctrl_break: tokio::signal::windows::CtrlBreak,
    #[cfg(windows)]
    close: tokio::signal::windows::CtrlClose,
    #[cfg(windows)]
    shutdown: tokio::signal::windows::CtrlShutdown,
}

impl StopSignals {
    /// Installs the handlers (inside a tokio runtime).
    pub fn new() -> std::io::Result<StopSignals> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(StopSignals {
                int: signal(SignalKind::interrupt())?,
                term: signal(SignalKind::terminate())?,
            })
        }
        #[cfg(windows)]
        {
            use tokio::signal::windows::{ctrl_break, ctrl_c, ctrl_close, ctrl_shutdown};
            Ok(StopSignals {
                ctrl_c: ctrl_c()?,
                ctrl_break: ctrl_break()?,
                close: ctrl_close()?,
                shutdown: ctrl_shutdown()?,
            })
        }
    }

    /// Waits for the next one; returns its name.
    pub async fn recv(&mut self) -> &'static str {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.int.recv() => "SIGINT",
                _ = self.term.recv() => "SIGTERM",
            }
        }
        #[cfg(windows)]
        {
            tokio::select! {
                _ = self.ctrl_c.recv() => "Ctrl-C",
                _ = self.ctrl_break.recv() => "Ctrl-Break",
                _ = self.close.recv() => "console closed",
                _ = self.shutdown.recv() => "system shutdown",
            }
        }
    }
}

/// While a child started by `mse-vpn run` runs: Ctrl-C reaches it through the terminal (we wait
/// for it to exit rather than die first); SIGTERM and SIGHUP sent to us are passed on. Never
/// returns unless the handlers cannot be installed.
pub async fn relay_signals(child: Option<u32>) -> std::io::Result<std::convert::Infallible> {
    #[cfg(unix)]
    {
        use nix::sys::signal::{Signal, kill};
        use tokio::signal::unix::{SignalKind, signal};
        let mut int = signal(SignalKind::interrupt())?;
        let mut quit = signal(SignalKind::quit())?;
        let mut term = signal(SignalKind::terminate())?;
        let mut hup = signal(SignalKind::hangup())?;
        let pid = child.map(|p| nix::unistd::Pid::from_raw(p as i32));
        let forward = |sig| {
            if let Some(pid) = pid {
                let _ = kill(pid, sig);
            }
        };
        loop {
            tokio::select! {
                _ = int.recv() => {}
                _ = quit.recv() => {}
                _ = term.recv() => forward(Signal::SIGTERM),
                _ = hup.recv() => forward(Signal::SIGHUP),
            }
        }
    }
    #[cfg(windows)]
    {
        let _ = child;
        let mut ctrl_c = tokio::signal::windows::ctrl_c()?;
        loop {
            ctrl_c.recv().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_own_process_is_alive_and_an_impossible_pid_is_not() {
        assert!(pid_alive(std::process::id() as i32));
        assert!(!pid_alive(0));
        assert!(!pid_alive(-4));
        assert!(!pid_alive(i32::MAX));
    }

    /// A session killed with SIGKILL whose parent has not reaped it yet is a zombie: it holds
    /// no TUN and will never undo its changes, so its journal is a leftover to repair.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_zombie_is_dead() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        // Not waited for: once it exits it stays a zombie until `wait` below.
        let start = std::time::Instant::now();
        while pid_alive(pid) && start.elapsed() < std::time::Duration::from_secs(5) {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(!pid_alive(pid), "a zombie counts as running");
        assert!(
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok(),
            "still a zombie, not reaped"
        );
        child.wait().unwrap();
    }

    #[tokio::test]
    async fn a_childs_exit_code_is_reported() {
        #[cfg(unix)]
        let mut cmd = tokio::process::Command::new("/bin/sh");
        #[cfg(unix)]
        cmd.args(["-c", "exit 7"]);
        #[cfg(windows)]
        let mut cmd = tokio::process::Command::new("cmd");
        #[cfg(windows)]
        cmd.args(["/C", "exit 7"]);
        let status = cmd.status().await.unwrap();
        assert_eq!(exit_code(status), 7);
    }
}
