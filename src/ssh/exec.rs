//! Running one command on the jump host over an SSH `session` channel and collecting its
//! standard output (bounded in size and time). Used to read facts of the jump host, such as
//! its resolver for split DNS; never for anything interactive.

use std::time::Duration;

use russh::ChannelMsg;

use super::{OpenError, Session};

/// Most output kept from a command.
const MAX_OUTPUT: usize = 64 * 1024;

impl Session {
    /// Runs `command` on the jump host and returns its standard output once it exits with
    /// status 0; fails on a non-zero status, a refused channel, or after `timeout`.
    pub async fn exec_output(
        &self,
        command: &str,
        timeout: Duration,
    ) -> Result<Vec<u8>, OpenError> {
        let work = async {
            let mut channel = self
                .handle
                .channel_open_session()
                .await
                .map_err(|_| OpenError::Other)?;
            channel
                .exec(true, command)
                .await
                .map_err(|_| OpenError::Other)?;
            let mut out = Vec::new();
            let mut status = None;
            while let Some(msg) = channel.wait().await {
                match msg {
                    ChannelMsg::Data { data } => {
                        let room = MAX_OUTPUT.saturating_sub(out.len());
                        out.extend_from_slice(&data[..data.len().min(room)]);
                    }
                    ChannelMsg::ExitStatus { exit_status } => status = Some(exit_status),
                    ChannelMsg::Close => break,
                    _ => {}
                }
            }
            match status {
                Some(0) => Ok(out),
                _ => Err(OpenError::Other),
            }
        };
        tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| OpenError::Timeout)?
    }
}
