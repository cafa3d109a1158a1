//! File-descriptor exhaustion: telling it apart from other I/O errors, and pausing an accept
//! loop while it lasts instead of spinning on the same error.
//!
//! A local user can hold many of this process's descriptors (DNS queries, connections to the
//! responder). Accept loops must then neither spin (a listener whose queue is not empty keeps
//! failing with `EMFILE` at once) nor give up; readers of files that matter (known_hosts)
//! must treat the error as transient, never as "the file says no".

use std::io;
use std::time::Duration;

/// How long an accept loop pauses after a resource error before it tries again.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// True for errors that mean "out of descriptors or memory right now": they pass.
pub fn is_exhaustion(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::OutOfMemory || e.raw_os_error().is_some_and(errno::exhaustion)
}

#[cfg(unix)]
mod errno {
    use nix::errno::Errno;

    /// EMFILE, ENFILE, ENOBUFS, ENOMEM.
    pub fn exhaustion(n: i32) -> bool {
        [Errno::EMFILE, Errno::ENFILE, Errno::ENOBUFS, Errno::ENOMEM]
            .iter()
            .any(|e| *e as i32 == n)
    }
}

#[cfg(not(unix))]
mod errno {
    /// WSAEMFILE, WSAENOBUFS.
    pub fn exhaustion(n: i32) -> bool {
        matches!(n, 10024 | 10055)
    }
}

/// An "out of descriptors" error as this OS reports it (EMFILE; WSAEMFILE on Windows), for
/// tests.
#[cfg(test)]
pub fn emfile() -> io::Error {
    #[cfg(unix)]
    return io::Error::from_raw_os_error(nix::errno::Errno::EMFILE as i32);
    #[cfg(not(unix))]
    return io::Error::from_raw_os_error(10024);
}

/// What an accept loop does after `accept` failed with `e`: a pause of [`ACCEPT_BACKOFF`] for
/// resource exhaustion (the listener stays readable, so retrying at once would spin), none
/// for per-connection errors (the peer reset before we took the connection).
pub fn accept_pause(e: &io::Error) -> Option<Duration> {
    is_exhaustion(e).then_some(ACCEPT_BACKOFF)
}

/// Sleeps as [`accept_pause`] says; call after every failed `accept`.
pub async fn after_accept_error(e: &io::Error) {
    if let Some(pause) = accept_pause(e) {
        tokio::time::sleep(pause).await;
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    #[test]
    fn exhaustion_pauses_and_a_peer_reset_does_not() {
        let emfile = io::Error::from_raw_os_error(nix::errno::Errno::EMFILE as i32);
        assert_eq!(accept_pause(&emfile), Some(ACCEPT_BACKOFF));
        let enfile = io::Error::from_raw_os_error(nix::errno::Errno::ENFILE as i32);
        assert!(is_exhaustion(&enfile));
        let reset = io::Error::from(io::ErrorKind::ConnectionAborted);
        assert_eq!(accept_pause(&reset), None);
        assert!(!is_exhaustion(&io::Error::from(
            io::ErrorKind::PermissionDenied
        )));
    }
}
