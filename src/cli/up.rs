//! `mse-vpn up`: builds the [`Session`] from the command line, wires SIGINT/SIGTERM to its
//! [`Stopper`], prints what the session reports once it is up (in the daemon's child: to the
//! parent's pipe, then to the log), and waits for it to end.

use std::path::Path;

use anyhow::{Context, Result};
use mse_vpn_platform as platform;
use tracing::debug;

use super::UpArgs;
use crate::session::{Session, SessionError, Stopper};
use crate::ssh;

/// `up`: the session, brought up and run until Ctrl-C / SIGTERM / `down`. In the daemon's
/// child, the lines a foreground `up` prints go to the parent (its stdout is a pipe the
/// parent reads), then stdout is pointed at the log file.
pub async fn up(args: UpArgs, state_dir: &Path, daemon_log: Option<&Path>) -> Result<()> {
    let user = ssh::InvokingUser::detect().context("cannot tell which user invoked mse-vpn")?;
    let session = Session::new(args.session_config(&user, state_dir)?);
    spawn_signal_handler(session.stopper())?;
    let running = match session.start().await {
        Ok(r) => r,
        Err(SessionError::Ssh(e)) => return Err(with_alias_hint(e, &args, &user).into()),
        Err(e) => return Err(e.into()),
    };
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        for line in running.report().lines() {
            let _ = writeln!(out, "{line}");
        }
        let _ = out.flush();
    }
    if let Some(log) = daemon_log {
        // The parent has what it waited for: from now on stdout is the log file too.
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(log)
            .with_context(|| format!("cannot open the log file {}", log.display()))?;
        platform::process::redirect_stdout(file).context("cannot redirect stdout to the log")?;
        // And the log says it too.
        for line in running.report().lines() {
            println!("{line}");
        }
    }
    running.wait().await?;
    Ok(())
}

/// Stops the session at SIGINT / SIGTERM (`run` aborts the task once its app runs: the
/// signals are then the app's).
pub(super) fn spawn_signal_handler(stop: Stopper) -> Result<tokio::task::JoinHandle<()>> {
    let mut signals =
        platform::process::StopSignals::new().context("cannot handle SIGINT and SIGTERM")?;
    Ok(tokio::spawn(async move {
        // Every signal, not only the first: each one asks again (harmless once stopping).
        loop {
            let name = signals.recv().await;
            debug!("{name}: shutting down");
            stop.stop();
        }
    }))
}

/// A jump host name that does not resolve but is close to a `Host` alias of the ssh config
/// is reported with that alias.
pub(super) fn with_alias_hint(
    e: ssh::SshError,
    args: &UpArgs,
    user: &ssh::InvokingUser,
) -> ssh::SshError {
    let ssh::SshError::Resolve { host, source } = e else {
        return e;
    };
    let typed = args
        .proxy
        .as_ref()
        .map(|p| p.host.as_str())
        .unwrap_or(&host);
    let aliases = ssh::resolve::aliases(args.ssh_config.as_ref(), user);
    match crate::suggest::did_you_mean(typed, aliases.iter().map(String::as_str)) {
        Some(alias) => ssh::SshError::UnknownAlias {
            host: typed.to_owned(),
            alias: alias.to_owned(),
            source,
        },
        None => ssh::SshError::Resolve { host, source },
    }
}
