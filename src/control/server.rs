//! The session side of the control socket: accepts connections (at most 64 at once, each
//! given 5 s to send its request), answers each typed [`Request`] from the [`Board`] and the
//! session's [`Forwards`], and sets the session's stop signal on `down`. A failed `accept`
//! (out of descriptors, say) pauses the loop for 100 ms instead of letting it spin, with one
//! warning a minute per kind of error.

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mse_vpn_platform::ipc::{Conn, Listener};
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, WriteHalf};
use tokio::sync::watch;
use tracing::{debug, warn};

use super::ControlError;
use super::board::Board;
use super::schema::{Ack, ErrorCode, ErrorReply, ExposeReply, Request};
use crate::repeats::Repeats;
use crate::reverse::{ForwardSpec, ForwardState, Forwards};

/// How long an `expose` request waits for its listeners to be set up.
const EXPOSE_WAIT: Duration = Duration::from_secs(20);
/// A control connection must send its request within this long, or it is closed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Control connections served at once (each holds a descriptor); more are closed at once.
pub(super) const MAX_CLIENTS: usize = 64;
/// The longest request line read.
const MAX_REQUEST: u64 = 4096;
/// The accept loop's pause after a failed `accept`.
const ACCEPT_BACKOFF: Duration = crate::fds::ACCEPT_BACKOFF;
/// Repeats of the same accept error within this long are counted into one line.
const WARN_WINDOW: Duration = Duration::from_secs(60);

/// A bound control socket; removed from disk when dropped.
pub struct Server {
    /// The socket (a named pipe on Windows).
    listener: Listener,
}

impl Server {
    /// Binds the socket, readable and writable only by `owner_uid` (and root).
    pub fn bind(path: &Path, owner_uid: u32, owner_gid: u32) -> Result<Server, ControlError> {
        // (A socket file left by a crashed session, which nobody answers on, is replaced.)
        let listener =
            Listener::bind(path, (owner_uid, owner_gid)).map_err(|source| ControlError::Io {
                path: path.to_owned(),
                source,
            })?;
        Ok(Server { listener })
    }

    /// Serves requests until the process ends; a `down` request sets `stop`.
    pub async fn serve(self, board: Arc<Board>, stop: watch::Sender<bool>) {
        self.serve_with(board, stop, REQUEST_TIMEOUT).await;
    }

    /// [`Server::serve`] with a connection's time to send its request (tests shorten it).
    pub(super) async fn serve_with(
        mut self,
        board: Arc<Board>,
        stop: watch::Sender<bool>,
        request_timeout: Duration,
    ) {
        let clients = Arc::new(tokio::sync::Semaphore::new(MAX_CLIENTS));
        let mut errors = AcceptErrors::new();
        loop {
            let stream = match self.listener.accept().await {
                Ok(stream) => stream,
                Err(e) => {
                    let pause = errors.failed(Instant::now(), &e);
                    tokio::time::sleep(pause).await;
                    continue;
                }
            };
            let Ok(permit) = clients.clone().try_acquire_owned() else {
                debug!("too many control connections: closing a new one");
                continue;
            };
            let board = board.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let _permit = permit;
                if let Err(e) = answer(stream, &board, &stop, request_timeout).await {
                    debug!("control request failed: {e}");
                }
            });
        }
    }
}

/// What the accept loop does about failed `accept`s: a pause after each (the listener stays
/// readable while the process is out of descriptors, so retrying at once would spin), and a
/// warning for the first of a kind in each [`WARN_WINDOW`], with a count of the rest.
struct AcceptErrors {
    /// Repeats by kind of error.
    repeats: Repeats<io::ErrorKind>,
}

impl AcceptErrors {
    fn new() -> AcceptErrors {
        AcceptErrors {
            repeats: Repeats::new(WARN_WINDOW, 8),
        }
    }

    /// Logs `e` (rate-limited) and returns how long to pause before the next `accept`.
    fn failed(&mut self, now: Instant, e: &io::Error) -> Duration {
        for s in self.repeats.poll(now) {
            warn!(
                "control socket accept failed {} more times in the last {} s",
                s.suppressed,
                s.over.as_secs()
            );
        }
        if self.repeats.hit(now, e.kind()) {
            warn!(
                "control socket accept failed: {e}; retrying every {} ms",
                ACCEPT_BACKOFF.as_millis()
            );
        }
        ACCEPT_BACKOFF
    }
}

/// Reads one request from `stream` and answers it.
async fn answer(
    stream: Conn,
    board: &Board,
    stop: &watch::Sender<bool>,
    request_timeout: Duration,
) -> io::Result<()> {
    let (r, mut w) = tokio::io::split(stream);
    let mut line = String::new();
    let mut r = BufReader::new(r).take(MAX_REQUEST);
    // A connection that never sends its request is closed (it holds a descriptor).
    tokio::time::timeout(request_timeout, r.read_line(&mut line))
        .await
        .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
    let req = match Request::parse(&line) {
        Ok(req) => req,
        Err(refused) => {
            debug!("control request refused: {}", refused.error);
            reply(&mut w, &refused).await?;
            return w.shutdown().await;
        }
    };
    match req {
        Request::Status => reply(&mut w, &board.snapshot()).await?,
        Request::Down => {
            warn!("stop requested through the control socket");
            stop.send_replace(true);
            reply(&mut w, &Ack { ok: true }).await?
        }
        Request::Unexpose { specs } => match exposed(board) {
            Err(refused) => reply(&mut w, &refused).await?,
            Ok(forwards) if forwards.remove_specs(&specs) < specs.len() => {
                let refused = ErrorReply::new(
                    ErrorCode::NotExposed,
                    "some of these ports were not exposed",
                );
                reply(&mut w, &refused).await?
            }
            Ok(_) => reply(&mut w, &ExposeReply::default()).await?,
        },
        Request::Expose { specs, hold } => {
            let forwards = match exposed(board) {
                Ok(f) => f,
                Err(refused) => return reply(&mut w, &refused).await,
            };
            let new = expose(&forwards, &specs).await;
            reply(&mut w, &ExposeReply { forwards: new.rows }).await?;
            if hold {
                // The listeners live as long as the requester (`mse-vpn run`) keeps this
                // connection: when it exits, however it exits, they are removed.
                let mut sink = [0u8; 64];
                let mut r = r.into_inner();
                while matches!(r.read(&mut sink).await, Ok(n) if n > 0) {}
                forwards.remove(&new.added);
            }
            return Ok(());
        }
    }
    w.shutdown().await
}

/// The outcome of an `expose` request.
struct Exposed {
    /// The listeners asked for, in order, as `status` shows them.
    rows: Vec<crate::reverse::ForwardStatus>,
    /// The ids of those this request added (not those that existed before).
    added: Vec<u64>,
}

/// Adds `specs`' listeners and waits (bounded) for them to settle. A port the jump host
/// refused is reported to the requester, not kept as a failed row in `status`.
async fn expose(forwards: &Forwards, specs: &[ForwardSpec]) -> Exposed {
    let added = forwards.add(specs);
    let ids: Vec<u64> = added.iter().map(|(id, _)| *id).collect();
    forwards.settled(&ids, EXPOSE_WAIT).await;
    let rows = forwards.status_of(&ids);
    let refused: Vec<u64> = added
        .iter()
        .zip(&rows)
        .filter(|((_, new), row)| *new && row.state == ForwardState::Failed)
        .map(|((id, _), _)| *id)
        .collect();
    forwards.remove(&refused);
    Exposed {
        rows,
        added: added
            .iter()
            .filter(|(_, new)| *new)
            .map(|(id, _)| *id)
            .collect(),
    }
}

/// The session's exposed ports, or the refusal to send.
fn exposed(board: &Board) -> Result<Arc<Forwards>, ErrorReply> {
    board
        .forwards()
        .ok_or_else(|| ErrorReply::new(ErrorCode::CannotExpose, "this session cannot expose ports"))
}

/// Writes one reply line.
async fn reply(w: &mut WriteHalf<Conn>, msg: &impl Serialize) -> io::Result<()> {
    let line = serde_json::to_string(msg)?;
    w.write_all(line.as_bytes()).await?;
    w.write_all(b"\n").await?;
    w.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_accepts_pause_and_warn_once_per_window() {
        let mut errors = AcceptErrors::new();
        let t0 = Instant::now();
        let emfile = crate::fds::emfile();
        // A loop that keeps failing: every turn pauses, so it cannot spin.
        for i in 0..100 {
            let at = t0 + ACCEPT_BACKOFF * i;
            assert_eq!(errors.failed(at, &emfile), ACCEPT_BACKOFF);
        }
        // One line was logged; the other 99 are summarized when the window ends.
        let later = t0 + WARN_WINDOW + ACCEPT_BACKOFF * 100;
        let summaries = errors.repeats.poll(later);
        assert_eq!(summaries.len(), 1);
        assert_eq!(summaries[0].suppressed, 99);
        // A peer that reset before its connection was taken pauses the loop too.
        let reset = io::Error::from(io::ErrorKind::ConnectionAborted);
        assert_eq!(errors.failed(later, &reset), ACCEPT_BACKOFF);
    }
}
