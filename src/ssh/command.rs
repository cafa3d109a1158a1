//! `ProxyCommand`: the SSH connection runs over a command's standard input and output
//! instead of a TCP connection (`ssh -W %h:%p bastion`, `nc`, a cloud provider's tunnel
//! helper). The command runs under `sh -c`, as the invoking user (never as root), with its
//! standard error passed through so its own messages reach the user; it is killed when the
//! connection it carries ends.

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::process::{Child, ChildStdin, ChildStdout};

/// A running `ProxyCommand` as a byte stream.
pub struct CommandStream {
    /// Kept so that the command lives (and is killed on drop) with the stream.
    _child: Child,
    stdout: ChildStdout,
    /// `None` once shut down (dropping it closes the command's standard input).
    stdin: Option<ChildStdin>,
}

impl CommandStream {
    /// Starts `command` with `sh -c` (Windows: `cmd /C`). As root on behalf of `owner` (uid,
    /// gid), the command runs as that user, with the user's home as `HOME`.
    pub fn spawn(command: &str, owner: Option<(u32, u32)>) -> std::io::Result<CommandStream> {
        #[cfg(unix)]
        let mut cmd = tokio::process::Command::new("/bin/sh");
        #[cfg(unix)]
        cmd.arg("-c").arg(format!("exec {command}"));
        #[cfg(windows)]
        let mut cmd = tokio::process::Command::new("cmd");
        #[cfg(windows)]
        cmd.arg("/C").raw_arg(command);
        cmd.stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .kill_on_drop(true);
        if let Some((uid, gid)) = owner {
            use mse_vpn_platform::account::{Account, by_uid};
            let account = by_uid(uid).unwrap_or_else(|| Account {
                name: String::new(),
                uid,
                gid,
                home: Default::default(),
            });
            mse_vpn_platform::process::run_as(&mut cmd, &Account { gid, ..account });
        }
        let mut child = cmd.spawn()?;
        let (Some(stdout), Some(stdin)) = (child.stdout.take(), child.stdin.take()) else {
            return Err(std::io::Error::other("the command's pipes are missing"));
        };
        Ok(CommandStream {
            _child: child,
            stdout,
            stdin: Some(stdin),
        })
    }
}

impl AsyncRead for CommandStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stdout).poll_read(cx, buf)
    }
}

impl AsyncWrite for CommandStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.stdin.as_mut() {
            Some(stdin) => Pin::new(stdin).poll_write(cx, buf),
            None => Poll::Ready(Err(std::io::ErrorKind::BrokenPipe.into())),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.stdin.as_mut() {
            Some(stdin) => Pin::new(stdin).poll_flush(cx),
            None => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        // A pipe has no half-close of its own: closing it is the EOF the command sees.
        let flushed = match self.stdin.as_mut() {
            Some(stdin) => Pin::new(stdin).poll_flush(cx),
            None => return Poll::Ready(Ok(())),
        };
        if flushed.is_ready() {
            self.stdin = None;
        }
        flushed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    #[cfg(unix)]
    use tokio::io::AsyncWriteExt;

    #[cfg(unix)]
    #[tokio::test]
    async fn bytes_go_through_the_command_both_ways() {
        let mut s = CommandStream::spawn("cat", None).unwrap();
        s.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
        s.shutdown().await.unwrap();
        assert_eq!(
            s.read(&mut buf).await.unwrap(),
            0,
            "EOF after the command ends"
        );
    }

    #[tokio::test]
    async fn a_command_that_exits_is_an_eof() {
        let mut s = CommandStream::spawn("exit 3", None).unwrap();
        let mut buf = [0u8; 4];
        assert_eq!(s.read(&mut buf).await.unwrap(), 0);
    }
}
