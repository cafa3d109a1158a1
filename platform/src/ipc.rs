//! The control channel's transport, per OS: a running session listens, `status`, `down`,
//! `expose` and `run` connect. It carries bytes only; the protocol is the main crate's.
//!
//! - **Unix** (Linux, macOS): a Unix socket `<state_dir>/<tun>.sock`, mode 0600, owned by the
//!   invoking user (root can always connect).
//! - **Windows**: a named pipe `\\.\pipe\mse-vpn\<tun>` owned by Administrators, whose ACL
//!   grants SYSTEM, Administrators and the user who started the session only, and which
//!   refuses remote clients (`win32.rs` builds the security descriptor). Any user may create
//!   a pipe of any name: a client talks only to a pipe owned by SYSTEM or Administrators, and
//!   a session does not start when someone else already serves its name.

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Where the session on `tun` listens.
pub fn endpoint(state_dir: &Path, tun: &str) -> PathBuf {
    #[cfg(unix)]
    return state_dir.join(format!("{tun}.sock"));
    #[cfg(windows)]
    {
        let _ = state_dir;
        PathBuf::from(format!(r"\\.\pipe\mse-vpn\{tun}"))
    }
}

/// The endpoints of the sessions that may be running (sorted): Unix sockets in `state_dir`; on
/// Windows the pipes of the sessions that have a journal there.
pub fn endpoints(state_dir: &Path) -> Vec<PathBuf> {
    #[cfg(unix)]
    let ext = "sock";
    #[cfg(windows)]
    let ext = "journal";
    let files: Vec<PathBuf> = std::fs::read_dir(state_dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == ext))
                .collect()
        })
        .unwrap_or_default();
    let mut out: Vec<PathBuf> = if cfg!(windows) {
        files
            .iter()
            .filter_map(|p| p.file_stem())
            .map(|tun| endpoint(state_dir, &tun.to_string_lossy()))
            .collect()
    } else {
        files
    };
    out.sort();
    out
}

/// True if something answers at `path`, or refuses us for lack of permission (so the caller
/// can say so); synchronous, for listing sessions.
pub fn probe(path: &Path) -> bool {
    #[cfg(unix)]
    let r = std::os::unix::net::UnixStream::connect(path).map(drop);
    #[cfg(windows)]
    let r = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map(drop);
    match r {
        Ok(()) => true,
        Err(e) => e.kind() == io::ErrorKind::PermissionDenied,
    }
}

/// One control connection, on either side.
#[derive(Debug)]
pub struct Conn(Inner);

#[cfg(unix)]
type Inner = tokio::net::UnixStream;

#[cfg(windows)]
#[derive(Debug)]
enum Inner {
    Server(tokio::net::windows::named_pipe::NamedPipeServer),
    Client(tokio::net::windows::named_pipe::NamedPipeClient),
}

/// Forwards a poll to the stream inside a [`Conn`].
macro_rules! inner {
    ($self:ident, $s:ident => $e:expr) => {{
        #[cfg(unix)]
        {
            let $s = Pin::new(&mut $self.get_mut().0);
            $e
        }
        #[cfg(windows)]
        match &mut $self.get_mut().0 {
            Inner::Server(s) => {
                let $s = Pin::new(s);
                $e
            }
            Inner::Client(s) => {
                let $s = Pin::new(s);
                $e
            }
        }
    }};
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        inner!(self, s => s.poll_read(cx, buf))
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        inner!(self, s => s.poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        inner!(self, s => s.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        inner!(self, s => s.poll_shutdown(cx))
    }
}

/// Connects to the session listening at `path`.
pub async fn connect(path: &Path) -> io::Result<Conn> {
    #[cfg(unix)]
    return tokio::net::UnixStream::connect(path).await.map(Conn);
    #[cfg(windows)]
    {
        use tokio::net::windows::named_pipe::ClientOptions;
        // ERROR_PIPE_BUSY: every instance is taken for a moment; the server makes a new one
        // as soon as it accepted.
        const PIPE_BUSY: i32 = 231;
        for _ in 0..100 {
            match ClientOptions::new().open(path) {
                Ok(c) => {
                    crate::win32::check_pipe_server(&c, path)?;
                    return Ok(Conn(Inner::Client(c)));
                }
                Err(e) if e.raw_os_error() == Some(PIPE_BUSY) => {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "every instance of the control pipe stayed busy",
        ))
    }
}

/// A listening control endpoint; a Unix socket file is removed when this is dropped.
#[derive(Debug)]
pub struct Listener {
    path: PathBuf,
    #[cfg(unix)]
    listener: tokio::net::UnixListener,
    #[cfg(windows)]
    next: tokio::net::windows::named_pipe::NamedPipeServer,
}

impl Listener {
    /// Listens at `path`, for `owner` (uid, gid; Unix) and root/administrators only. A socket
    /// file left by a crashed session (nobody answers on it) is replaced; on Windows a pipe
    /// another live process already serves is refused.
    pub fn bind(path: &Path, owner: (u32, u32)) -> io::Result<Listener> {
        #[cfg(unix)]
        {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            if std::os::unix::net::UnixStream::connect(path).is_err() {
                let _ = std::fs::remove_file(path);
            }
            let listener = tokio::net::UnixListener::bind(path)?;
            crate::account::set_mode(path, 0o600)?;
            crate::account::chown(path, owner.0, owner.1)?;
            Ok(Listener {
                path: path.to_owned(),
                listener,
            })
        }
        #[cfg(windows)]
        {
            let _ = owner;
            // FILE_FLAG_FIRST_PIPE_INSTANCE: ERROR_ACCESS_DENIED when the name is served.
            let next = crate::win32::create_pipe(path.as_os_str(), true).map_err(|e| {
                match e.kind() {
                    io::ErrorKind::PermissionDenied => io::Error::new(
                        e.kind(),
                        format!(
                            "another process already serves {} (another session on this TUN name, or a program squatting it): {e}",
                            path.display()
                        ),
                    ),
                    _ => e,
                }
            })?;
            Ok(Listener {
                path: path.to_owned(),
                next,
            })
        }
    }

    /// Waits for the next connection.
    pub async fn accept(&mut self) -> io::Result<Conn> {
        #[cfg(unix)]
        return self.listener.accept().await.map(|(s, _)| Conn(s));
        #[cfg(windows)]
        {
            self.next.connect().await?;
            let next = crate::win32::create_pipe(self.path.as_os_str(), false)?;
            Ok(Conn(Inner::Server(std::mem::replace(&mut self.next, next))))
        }
    }

    /// Where it listens.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        #[cfg(unix)]
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

    #[tokio::test]
    async fn a_line_goes_both_ways_and_a_second_client_is_served() {
        let dir = std::env::temp_dir().join(format!("mse-vpn-ipc-{}", std::process::id()));
        let tun = format!("ipc{}", std::process::id() % 10_000);
        let path = endpoint(&dir, &tun);
        let me = crate::account::current().unwrap().unwrap();
        let mut listener = Listener::bind(&path, (me.uid, me.gid)).unwrap();
        // Unix: a probe is a connection too; answer it like any other.
        #[cfg(unix)]
        assert!(probe(&path), "probe sees the listener");
        let mut served = 0;
        let server = tokio::spawn(async move {
            while served < 2 {
                let conn = listener.accept().await.unwrap();
                let (r, mut w) = tokio::io::split(conn);
                let mut line = String::new();
                BufReader::new(r).read_line(&mut line).await.unwrap();
                if line.is_empty() {
                    continue;
                }
                w.write_all(format!("echo {line}").as_bytes())
                    .await
                    .unwrap();
                w.flush().await.unwrap();
                served += 1;
            }
            listener
        });
        for n in 0..2 {
            let conn = connect(&path).await.unwrap();
            let (r, mut w) = tokio::io::split(conn);
            w.write_all(format!("hello {n}\n").as_bytes())
                .await
                .unwrap();
            let mut line = String::new();
            BufReader::new(r).read_line(&mut line).await.unwrap();
            assert_eq!(line, format!("echo hello {n}\n"));
        }
        let listener = server.await.unwrap();
        #[cfg(unix)]
        {
            let (_, mode) =
                crate::account::owner_and_mode(&std::fs::metadata(listener.path()).unwrap())
                    .unwrap();
            assert_eq!(mode & 0o777, 0o600);
        }
        drop(listener);
        #[cfg(unix)]
        assert!(!path.exists(), "the socket file goes with the listener");
        assert!(connect(&path).await.is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Item 5 of issue 25: any user may create a pipe of any name; a client must not talk to
    /// one that is not an elevated session's, and a session must not start behind it. (Wine
    /// keeps a pipe's owner as created and returns it to GetSecurityInfo; it does not check
    /// the DACL when the pipe is opened.)
    #[cfg(windows)]
    #[tokio::test]
    async fn a_control_pipe_someone_else_created_is_refused() {
        let dir = std::env::temp_dir();
        let tun = format!("sq{}", std::process::id() % 10_000);
        let path = endpoint(&dir, &tun);
        // What an unelevated user's pipe looks like: owned by that user, open to everyone.
        let user = crate::win32::own_sid().unwrap();
        let squatter = crate::win32::create_pipe_with(
            path.as_os_str(),
            true,
            &format!("O:{user}D:P(A;;GA;;;WD)"),
        )
        .unwrap();
        let serve = tokio::spawn(async move {
            let _ = squatter.connect().await;
            squatter
        });
        let e = connect(&path).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
        assert!(e.to_string().contains("another program"), "{e}");
        // A session does not start behind it: FILE_FLAG_FIRST_PIPE_INSTANCE makes Windows
        // refuse a second server of a name (ERROR_ACCESS_DENIED). Wine does not implement that
        // flag (observed: a second first instance is created), so only Windows can show it.
        if !crate::win32::under_wine() {
            let e = Listener::bind(&path, (0, 0)).unwrap_err();
            assert!(e.to_string().contains("already serves"), "{e}");
        }
        drop(serve.await.unwrap());
        // An elevated session's own pipe is owned by Administrators, and accepted.
        let path = endpoint(&dir, &format!("{tun}b"));
        let mut listener = Listener::bind(&path, (0, 0)).unwrap();
        let accept = tokio::spawn(async move { listener.accept().await.map(drop) });
        connect(&path).await.unwrap();
        accept.await.unwrap().unwrap();
    }
}
