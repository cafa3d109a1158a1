//! The client side of the control socket: one typed [`Request`] out, its reply back, as
//! values or a [`ControlError`]. What the CLI prints is made from them by the CLI.

use std::path::Path;

use mse_vpn_platform::ipc::{self, Conn};
use serde::de::DeserializeOwned;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use super::ControlError;
use super::schema::{ErrorReply, ExposeReply, Request, Status};
use crate::reverse::ForwardSpec;

/// The longest reply line read (a status with many forwards is a few KiB).
const MAX_REPLY: u64 = 1 << 20;

/// Asks the session behind `path` for its status.
pub async fn status(path: &Path) -> Result<Status, ControlError> {
    Ok(call(path, &Request::Status).await?.0)
}

/// Asks the session behind `path` to stop. It answers before it stops: wait for its socket
/// to go to know it has.
pub async fn down(path: &Path) -> Result<(), ControlError> {
    let line = serde_json::to_string(&Request::Down).map_err(|source| ControlError::Malformed {
        path: path.to_owned(),
        source,
    })?;
    let (reply, _) = exchange(path, &line).await?;
    // An `Ack`, or nothing from a session that stopped before it wrote one: stopping
    // all the same.
    match refusal(path, &reply) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Asks the session behind `path` to expose `specs`. With `hold`, the returned connection
/// must be kept open: the session removes the new listeners when it closes.
pub async fn expose(
    path: &Path,
    specs: &[ForwardSpec],
    hold: bool,
) -> Result<(ExposeReply, Conn), ControlError> {
    let req = Request::Expose {
        specs: specs.to_vec(),
        hold,
    };
    call(path, &req).await
}

/// Asks the session behind `path` to stop exposing `specs`.
pub async fn unexpose(path: &Path, specs: &[ForwardSpec]) -> Result<(), ControlError> {
    let req = Request::Unexpose {
        specs: specs.to_vec(),
    };
    let (ExposeReply { .. }, _) = call(path, &req).await?;
    Ok(())
}

/// Sends `req` and parses the reply as a `T`, or as the session's refusal; returns it with
/// the still open connection.
async fn call<T: DeserializeOwned>(path: &Path, req: &Request) -> Result<(T, Conn), ControlError> {
    let malformed = |source| ControlError::Malformed {
        path: path.to_owned(),
        source,
    };
    let line = serde_json::to_string(req).map_err(malformed)?;
    let (reply, conn) = exchange(path, &line).await?;
    if let Some(e) = refusal(path, &reply) {
        return Err(e);
    }
    Ok((serde_json::from_str(&reply).map_err(malformed)?, conn))
}

/// The session's refusal, if `reply` is one.
fn refusal(path: &Path, reply: &str) -> Option<ControlError> {
    let refused = serde_json::from_str::<ErrorReply>(reply).ok()?;
    Some(ControlError::Refused {
        path: path.to_owned(),
        code: refused.code,
        message: refused.error,
    })
}

/// Sends one request line; returns the reply line and the still open connection.
async fn exchange(path: &Path, req: &str) -> Result<(String, Conn), ControlError> {
    let stream = ipc::connect(path).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::PermissionDenied => ControlError::Denied {
            path: path.to_owned(),
        },
        _ => ControlError::NotRunning {
            path: path.to_owned(),
        },
    })?;
    let io = |source| ControlError::Io {
        path: path.to_owned(),
        source,
    };
    let (r, mut w) = tokio::io::split(stream);
    w.write_all(req.as_bytes()).await.map_err(io)?;
    w.write_all(b"\n").await.map_err(io)?;
    let mut line = String::new();
    let mut r = BufReader::new(r).take(MAX_REPLY);
    r.read_line(&mut line).await.map_err(io)?;
    let stream = r.into_inner().into_inner().unsplit(w);
    Ok((line, stream))
}
