//! `mse-vpn run --cidr ... --proxy ... -- APP` (or `--profile NAME`): the app alone inside the
//! VPC, no root needed (Linux). The app gets a network namespace of its own
//! ([`mse_vpn_platform::rootless`]) whose TUN is this session's; the session is `up`'s
//! ([`Session::in_namespace`]: same SSH, reconnects, `--expose`, split DNS, `status`) but
//! changes nothing on the host. It runs until the app exits and ends with the app's exit
//! status; SIGTERM and SIGHUP are passed on to the app, Ctrl-C reaches it from the terminal.
//!
//! On other systems `run` says in one line that no equivalent exists.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Result;
use mse_vpn_platform::rootless::NamespaceError;

use super::RunArgs;

/// The directory of this user's `run` sessions (their control sockets), where `status`
/// looks too; `None` where `run` has no session of its own.
pub fn user_state_dir() -> Option<PathBuf> {
    #[cfg(target_os = "linux")]
    return Some(mse_vpn_platform::rootless::user_state_dir());
    #[cfg(not(target_os = "linux"))]
    return None;
}

/// `run` with a session of its own (see the module documentation). `state_dir` holds its
/// control socket.
pub async fn run(args: RunArgs, state_dir: &Path) -> Result<ExitCode> {
    #[cfg(target_os = "linux")]
    return linux::run(args, state_dir).await;
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (args, state_dir);
        Err(NamespaceError::Unsupported.into())
    }
}

/// `program` as the app's namespace would find it: a path (with a `/`) as is, else the first
/// executable file of that name in `path` (`$PATH`).
pub fn find_program(program: &std::ffi::OsStr, path: Option<&std::ffi::OsStr>) -> Option<PathBuf> {
    let runnable = |p: &Path| {
        p.metadata().is_ok_and(|m| {
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                m.is_file() && m.permissions().mode() & 0o111 != 0
            }
            #[cfg(not(unix))]
            m.is_file()
        })
    };
    let as_path = Path::new(program);
    if program.is_empty() {
        return None;
    }
    if as_path.components().count() > 1 || program.to_string_lossy().contains('/') {
        return runnable(as_path).then(|| as_path.to_owned());
    }
    std::env::split_paths(path?)
        .map(|dir| dir.join(program))
        .find(|p| runnable(p))
}

#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
/// Prints a namespace failure and returns the exit status it stands for (127 / 126 for the
/// app, as a shell would), or the error itself for `main` to report.
fn fail(e: NamespaceError) -> Result<ExitCode> {
    match e.exit_code() {
        Some(code) => {
            eprintln!("mse-vpn: {}", crate::logging::error_line(&e));
            Ok(ExitCode::from(code))
        }
        None => Err(e.into()),
    }
}

#[cfg(target_os = "linux")]
mod linux {
    use std::path::Path;
    use std::process::ExitCode;
    use std::time::Duration;

    use anyhow::{Context, Result, bail};
    use mse_vpn_platform::rootless::{Namespace, NamespaceError, NetnsSpec};
    use mse_vpn_platform::{self as platform, PlanSpec, RoutePlan};
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;

    use super::super::RunArgs;
    use super::super::client::Launch;
    use super::super::up::{spawn_signal_handler, with_alias_hint};
    use super::{fail, find_program};
    use crate::session::{InNamespace, Session, SessionError};
    use crate::ssh;
    use crate::tun::Tun;

    /// How long an app that the session's end asked to stop (SIGTERM) may take before it is
    /// killed.
    const APP_GRACE: Duration = Duration::from_secs(10);

    pub async fn run(args: RunArgs, state_dir: &Path) -> Result<ExitCode> {
        let user = ssh::InvokingUser::detect().context("cannot tell which user invoked mse-vpn")?;
        let program = args.command[0].clone();
        if find_program(&program, std::env::var_os("PATH").as_deref()).is_none() {
            return fail(NamespaceError::AppNotFound {
                app: program.to_string_lossy().into_owned(),
            });
        }
        let config = args.session.session_config(&user, state_dir)?;
        // The namespace's routes are the session's (no jump host to keep out of them: our
        // own connections stay in this namespace).
        let plan = RoutePlan::new(PlanSpec {
            cidrs: config.network.cidrs.clone(),
            excludes: config.network.excludes.clone(),
            jump_addrs: Vec::new(),
            tun_name: config.network.tun.clone(),
            mtu: config.network.mtu,
        })?;
        // Every destination goes through the session (the VPC through SSH, the rest directly
        // from this host), every name through its responder (split names through the
        // tunnel, the rest to this host's own nameservers).
        let spec = NetnsSpec::new(&plan, true, true);
        tracing::debug!(namespace = %spec, dns = ?spec.dns, "the app's namespace");
        // Made before any connection: a system that forbids it says so at once. From this
        // (the runtime's) thread, which lives as long as the app: the helper's parent-death
        // signal follows the thread that started it.
        let mut ns = match Namespace::create(&spec, &args.command) {
            Ok(ns) => ns,
            Err(e) => return fail(e),
        };
        let pid = ns.pid();
        let (fd, vnet) = ns
            .take_tun()
            .context("the app's namespace sent no TUN device")?;
        let tun = Tun::from_fd(fd, &spec.tun, spec.mtu as u16, vnet)?;
        let session = Session::new(config).in_namespace(InNamespace {
            tun,
            name: format!("run-{pid}"),
            app_pid: pid,
            v6: spec.v6,
            dns: spec.dns,
            host_loopback: spec.host_loopback(),
        });
        let signals = spawn_signal_handler(session.stopper())?;
        let running = match session.start().await {
            Ok(r) => r,
            Err(SessionError::Ssh(e)) => {
                return Err(with_alias_hint(e, &args.session, &user).into());
            }
            Err(e) => return Err(e.into()),
        };
        // From now on Ctrl-C is the app's (it reaches it from the terminal).
        signals.abort();
        let report = running.report().clone();
        for (reach, port) in &report.exposed {
            eprintln!(
                "mse-vpn: cloud callers reach {reach} -> local port {port} while the app runs"
            );
        }
        // The first exposed port is the one registered, at the jump host's VPC address.
        let (advertise, local_port) = match report.exposed.first() {
            None => (None, None),
            Some((reach, port)) => match reach.parse() {
                Ok(addr) => (Some(addr), Some(*port)),
                Err(_) => {
                    running.stopper().stop();
                    let _ = running.wait().await;
                    bail!(
                        "the session does not know the jump host's VPC address: pass --advertise ADDR"
                    );
                }
            },
        };
        if let Some(dns) = &report.dns {
            eprintln!("mse-vpn: {dns}");
        }
        eprintln!(
            "mse-vpn: {} runs in a network of its own: {} via {} (no root; nothing on this machine changed)",
            program.to_string_lossy(),
            report.routes.join(", "),
            report.jump
        );
        let launch = Launch::new(&args, advertise, local_port);
        if let Err(e) = ns.start_app(&launch.env) {
            running.stopper().stop();
            let _ = running.wait().await;
            return fail(e);
        }
        let mut child = ns.into_child();
        let confirm = launch.confirm();
        let stop = running.stopper();
        let mut session = tokio::spawn(running.wait());
        let mut app = tokio::task::spawn_blocking(move || child.wait());
        let relay = platform::process::relay_signals(Some(pid));
        tokio::pin!(relay);
        let outcome = tokio::select! {
            status = &mut app => Ok(status),
            ended = &mut session => Err(ended),
            r = &mut relay => match r? {},
        };
        if let Some(task) = confirm {
            task.abort();
        }
        match outcome {
            Ok(status) => {
                let status = status.context("waiting for the app")??;
                stop.stop();
                match session.await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => eprintln!("mse-vpn: the session ended with an error: {e}"),
                    Err(e) => eprintln!("mse-vpn: the session failed: {e}"),
                }
                let code = platform::process::exit_code(status);
                Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
            }
            // The session ended first (`down`, a jump host gone for good): the app has no
            // network left; it is asked to stop, then made to.
            Err(ended) => {
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
                if tokio::time::timeout(APP_GRACE, &mut app).await.is_err() {
                    let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
                    let _ = app.await;
                }
                match ended {
                    Ok(Ok(())) => {
                        eprintln!("mse-vpn: the session was stopped; the app was stopped with it");
                        Ok(ExitCode::from(super::super::EXIT_FAILURE))
                    }
                    Ok(Err(e)) => Err(e.into()),
                    Err(e) => Err(SessionError::Driver(e).into()),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_app_is_looked_for_as_its_namespace_will_exec_it() {
        let dir = std::env::temp_dir().join(format!("mse-vpn-find-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let tool = dir.join("tool");
        std::fs::write(&tool, "#!/bin/sh\n").unwrap();
        let data = dir.join("data");
        std::fs::write(&data, "").unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
            std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        let path = std::env::join_paths([Path::new("/nonexistent"), &dir]).unwrap();
        let find = |p: &str| find_program(std::ffi::OsStr::new(p), Some(&path));
        assert_eq!(find("tool"), Some(tool.clone()));
        assert_eq!(find(&tool.to_string_lossy()), Some(tool.clone()));
        assert_eq!(find("nope"), None);
        assert_eq!(find(""), None);
        #[cfg(unix)]
        assert_eq!(find("data"), None, "not executable");
        assert_eq!(find_program(std::ffi::OsStr::new("tool"), None), None);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_app_that_cannot_start_exits_as_a_shell_would() {
        let code = |e| match fail(e) {
            Ok(code) => format!("{code:?}"),
            Err(e) => format!("error: {e}"),
        };
        assert_eq!(
            code(NamespaceError::AppNotFound {
                app: "javaa".into()
            }),
            format!("{:?}", ExitCode::from(127))
        );
        assert!(code(NamespaceError::TunMissing).starts_with("error: /dev/net/tun"));
    }
}
