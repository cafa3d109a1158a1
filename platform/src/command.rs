//! Running the host's network tools (Linux: `ip`, `resolvectl`; macOS: `ifconfig`, `route`,
//! `netstat`): one function that runs a command line and returns its standard output, and the
//! [`Runner`] seam through which the command-driven backends run theirs, so that their tests
//! answer each command line with a fake host instead.

use std::time::Duration;

use crate::error::PlatformError;

/// How long `program` may take: `resolvectl` waits on systemd-resolved over D-Bus, which can
/// hang when resolved is stuck; the kernel answers the others at once.
fn limit(program: &str) -> Option<Duration> {
    (program == "resolvectl").then_some(Duration::from_secs(5))
}

/// Runs `program ARGS` and returns its standard output; a failure carries its standard error.
pub async fn run(program: &str, args: &[&str]) -> Result<String, PlatformError> {
    let cmd = format!("{program} {}", args.join(" "));
    let limit = limit(program);
    // A command that outlives its bound is killed, not left behind.
    let output = tokio::process::Command::new(program)
        .args(args)
        .kill_on_drop(limit.is_some())
        .output();
    let out = match limit {
        Some(limit) => match tokio::time::timeout(limit, output).await {
            Ok(out) => out,
            Err(_) => {
                return Err(PlatformError::Command {
                    cmd,
                    stderr: format!("timed out after {} s", limit.as_secs()),
                });
            }
        },
        None => output.await,
    };
    let out = out.map_err(|source| PlatformError::Spawn {
        cmd: cmd.clone(),
        source,
    })?;
    if !out.status.success() {
        return Err(PlatformError::Command {
            cmd,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs one command line, returning its standard output.
pub trait Runner {
    /// `argv[0]` is the program.
    async fn run(&mut self, argv: &[String]) -> Result<String, PlatformError>;
}

/// Runs commands for real.
#[derive(Debug, Default)]
pub struct System;

impl Runner for System {
    async fn run(&mut self, argv: &[String]) -> Result<String, PlatformError> {
        let args: Vec<&str> = argv[1..].iter().map(String::as_str).collect();
        run(&argv[0], &args).await
    }
}

/// A command line as the runners take it.
pub fn argv(words: &[&str]) -> Vec<String> {
    words.iter().map(|w| (*w).to_owned()).collect()
}
