//! Running one command on the jump host over an SSH `session` channel and collecting its
//! standard output (bounded in size and time). Used to read facts of the jump host, such as
//! its resolver for split DNS; never for anything interactive.
//!
//! Merge note: `main` has an identical `Session::exec` in `ssh/mod.rs`; when both meet,
//! this file (and its `mod exec;` line) is the one to delete.

use std::time::Duration;

use russh::ChannelMsg;

use super::Session;

/// Most output kept from a command.
const MAX_OUTPUT: usize = 64 * 1024;

impl Session {
    /// Runs `command` on the jump host (an `exec` session channel) and returns its standard
    /// output, or `None` if the jump host refused, the command failed, or it took longer than
    /// `timeout`. For small discovery commands only: the output is capped at 64 KiB.
    pub async fn exec(&self, command: &str, timeout: Duration) -> Option<String> {
        let run = async {
            let mut channel = self.handle.channel_open_session().await.ok()?;
            channel.exec(true, command).await.ok()?;
            let mut out = Vec::new();
            let mut status = None;
            while let Some(msg) = channel.wait().await {
                match msg {
                    ChannelMsg::Data { data } if out.len() < MAX_OUTPUT => {
                        out.extend_from_slice(&data)
                    }
                    ChannelMsg::ExitStatus { exit_status } => status = Some(exit_status),
                    ChannelMsg::Close => break,
                    _ => {}
                }
            }
            (status == Some(0)).then(|| String::from_utf8_lossy(&out).into_owned())
        };
        tokio::time::timeout(timeout, run).await.ok().flatten()
    }
}
