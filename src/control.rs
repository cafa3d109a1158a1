//! The control socket: a running session answers `status` and `down` requests on a Unix
//! socket at `/run/mse-vpn/<tun>.sock`, readable by root and the user who started it only (on
//! Windows a named pipe with an owner-only ACL: the transport is `mse_vpn_platform::ipc`).
//!
//! Protocol: one JSON request line (`{"cmd":"status"}` or `{"cmd":"down"}`), one JSON reply
//! line. The reply to `status` is a [`Status`]; its fields are the stable, documented
//! `status --json` format (new fields may be added; none are renamed or removed).
//!
//! The [`Board`] a status is made from follows the pool's link events ([`LinkObserver`]) and
//! the current driver's counters.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mse_vpn_platform::ipc::{self, Conn, Listener};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, WriteHalf};
use tokio::sync::watch;
use tracing::{debug, warn};

use crate::engine::EngineStats;
use crate::pool::{LinkEvent, LinkObserver};
use crate::reverse::{ForwardSpec, ForwardState, ForwardStatus, Forwards};

/// Errors of the control socket, on either side.
#[derive(Debug, Error)]
pub enum ControlError {
    /// No session is running (no socket, or nobody answers on it).
    #[error("no mse-vpn session is running (nothing answers on {path})")]
    NotRunning {
        /// The socket path tried.
        path: PathBuf,
    },
    /// The socket exists but this user may not use it.
    #[error(
        "permission denied on {path}: only root and the user who started the session may use it"
    )]
    Denied {
        /// The socket path.
        path: PathBuf,
    },
    /// Socket I/O failed.
    #[error("control socket {path}: {source}")]
    Io {
        /// The socket path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The other side sent something that is not the expected JSON.
    #[error("control socket {path}: malformed reply: {source}")]
    Malformed {
        /// The socket path.
        path: PathBuf,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
}

/// The state of the SSH link, as shown by `status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LinkState {
    /// Connected; flows are carried.
    Connected,
    /// The connection was lost; mse-vpn is reconnecting (routes stay in place).
    Reconnecting,
    /// Shutting down.
    Stopping,
}

/// One state change, for the `status` history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateChange {
    /// Unix time in seconds.
    pub at_unix: u64,
    /// The new state.
    pub state: LinkState,
    /// Why (for a loss or a failed reconnect).
    pub detail: Option<String>,
}

/// The `status --json` document.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// Format version of this document: 1.
    pub version: u32,
    /// Process id of the session.
    pub pid: u32,
    /// The jump host, as `user@host:port`.
    pub jump: String,
    /// The TUN device name.
    pub tun: String,
    /// The routed networks.
    pub routes: Vec<String>,
    /// Current link state.
    pub state: LinkState,
    /// Unix time the session started.
    pub started_unix: u64,
    /// Seconds since the session started.
    pub uptime_secs: u64,
    /// Successful reconnects since start (the link came back after an outage).
    pub reconnects: u64,
    /// SSH connections in the pool.
    #[serde(default)]
    pub connections: u32,
    /// SSH connections up right now.
    #[serde(default)]
    pub connections_up: u32,
    /// Flows open right now.
    pub flows_active: u64,
    /// Flows admitted since start.
    pub flows_opened: u64,
    /// Flows refused (the jump host could not connect) since start.
    pub flows_refused: u64,
    /// New connections reset because of the flow limit.
    pub flows_over_limit: u64,
    /// Bytes from local apps into the tunnel.
    pub bytes_up: u64,
    /// Bytes from the tunnel to local apps.
    pub bytes_down: u64,
    /// The last state changes, oldest first (at most 32).
    pub history: Vec<StateChange>,
    /// Cloud callers' connections to exposed ports accepted since start.
    #[serde(default)]
    pub inbound_opened: u64,
    /// Cloud callers not accepted on the TUN address (closed or silent port, or an app on
    /// loopback only, which is then reached over loopback).
    #[serde(default)]
    pub inbound_refused: u64,
    /// Cloud callers connected right now (counted against `max_inbound`).
    #[serde(default)]
    pub inbound_active: u64,
    /// `--max-flows`: the budget of outbound flows.
    #[serde(default)]
    pub max_flows: u64,
    /// `--max-inbound`: the budget of cloud callers, separate from `max_flows`.
    #[serde(default)]
    pub max_inbound: u64,
    /// The exposed ports (`--expose`, `mse-vpn run --expose`).
    #[serde(default)]
    pub forwards: Vec<ForwardStatus>,
    /// Split DNS, when `--dns-domain` is in use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<crate::dns::DnsStatus>,
}

/// A request line.
#[derive(Deserialize, Serialize)]
struct Request {
    cmd: String,
    /// `expose`: the `--expose` values.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    specs: Vec<String>,
    /// `expose`: remove the new listeners when this connection closes.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    hold: bool,
}

/// The reply to an `expose` request.
#[derive(Debug, Deserialize, Serialize)]
pub struct ExposeReply {
    /// The listeners asked for, in order, as `status` shows them.
    #[serde(default)]
    pub forwards: Vec<ForwardStatus>,
    /// Why the request was refused.
    #[serde(default)]
    pub error: Option<String>,
}

/// Shared, updatable session facts from which [`Status`] documents are made.
pub struct Board {
    inner: Mutex<Status>,
    forwards: Mutex<Option<Arc<Forwards>>>,
    stats: Mutex<Option<watch::Receiver<EngineStats>>>,
    started: std::time::Instant,
    dns: Mutex<Option<Arc<crate::dns::DnsCounters>>>,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs()
}

impl Board {
    /// A board for a new session.
    pub fn new(jump: String, tun: String, routes: Vec<String>) -> Arc<Board> {
        let now = unix_now();
        Arc::new(Board {
            inner: Mutex::new(Status {
                version: 1,
                pid: std::process::id(),
                jump,
                tun,
                routes,
                state: LinkState::Connected,
                started_unix: now,
                uptime_secs: 0,
                reconnects: 0,
                connections: 0,
                connections_up: 0,
                flows_active: 0,
                flows_opened: 0,
                flows_refused: 0,
                flows_over_limit: 0,
                bytes_up: 0,
                bytes_down: 0,
                history: vec![StateChange {
                    at_unix: now,
                    state: LinkState::Connected,
                    detail: None,
                }],
                inbound_opened: 0,
                inbound_refused: 0,
                inbound_active: 0,
                max_flows: 0,
                max_inbound: 0,
                forwards: Vec::new(),
                dns: None,
            }),
            forwards: Mutex::new(None),
            stats: Mutex::new(None),
            started: std::time::Instant::now(),
            dns: Mutex::new(None),
        })
    }

    /// The flow budgets shown by `status` (`--max-flows`, `--max-inbound`).
    pub fn set_limits(&self, max_flows: u64, max_inbound: u64) {
        if let Ok(mut st) = self.inner.lock() {
            st.max_flows = max_flows;
            st.max_inbound = max_inbound;
        }
    }

    /// The session's exposed ports, shown by `status` and extended by `expose` requests.
    pub fn set_forwards(&self, forwards: Arc<Forwards>) {
        if let Ok(mut f) = self.forwards.lock() {
            *f = Some(forwards);
        }
    }

    fn forwards(&self) -> Option<Arc<Forwards>> {
        self.forwards.lock().ok().and_then(|f| f.clone())
    }

    /// Follows the counters of the current driver.
    pub fn follow(&self, stats: watch::Receiver<EngineStats>) {
        if let Ok(mut s) = self.stats.lock() {
            // Counters restart with each driver: fold the old driver's totals in first.
            if let Some(old) = s.take() {
                self.fold(&old.borrow());
            }
            *s = Some(stats);
        }
    }

    fn fold(&self, e: &EngineStats) {
        if let Ok(mut st) = self.inner.lock() {
            st.flows_opened += e.flows_opened;
            st.flows_refused += e.flows_refused;
            st.flows_over_limit += e.flows_over_limit;
            st.bytes_up += e.bytes_up;
            st.bytes_down += e.bytes_down;
            st.inbound_opened += e.inbound_opened;
            st.inbound_refused += e.inbound_refused;
        }
    }

    /// Shows split DNS (its settings, and `counters` as they grow) in the status.
    pub fn set_dns(&self, dns: crate::dns::DnsStatus, counters: Arc<crate::dns::DnsCounters>) {
        if let Ok(mut st) = self.inner.lock() {
            st.dns = Some(dns);
        }
        if let Ok(mut c) = self.dns.lock() {
            *c = Some(counters);
        }
    }

    /// Records a link state change.
    pub fn set_state(&self, state: LinkState, detail: Option<String>) {
        if let Ok(mut st) = self.inner.lock() {
            if state == LinkState::Connected && st.state == LinkState::Reconnecting {
                st.reconnects += 1;
            }
            st.state = state;
            st.history.push(StateChange {
                at_unix: unix_now(),
                state,
                detail,
            });
            let excess = st.history.len().saturating_sub(32);
            st.history.drain(..excess);
        }
    }

    /// Records how many of the pool's `total` connections are up. The link is connected
    /// while at least one is; a change between none and some is a state change.
    pub fn set_links(&self, up: usize, total: usize, detail: Option<String>) {
        let state = {
            let Ok(mut st) = self.inner.lock() else {
                return;
            };
            st.connections = total as u32;
            st.connections_up = up as u32;
            st.state
        };
        match (state, up) {
            (LinkState::Connected, 0) => self.set_state(LinkState::Reconnecting, detail),
            (LinkState::Reconnecting, n) if n > 0 => {
                let lost_at = self.inner.lock().ok().and_then(|st| {
                    st.history
                        .iter()
                        .rev()
                        .find(|c| c.state == LinkState::Reconnecting)
                        .map(|c| c.at_unix)
                });
                let detail = lost_at.map(|at| {
                    format!(
                        "reconnected after {}",
                        duration(unix_now().saturating_sub(at))
                    )
                });
                self.set_state(LinkState::Connected, detail)
            }
            (LinkState::Reconnecting, _) => {
                // Still down: keep the latest reason without growing the history.
                if let (Ok(mut st), Some(d)) = (self.inner.lock(), detail)
                    && let Some(last) = st.history.last_mut()
                {
                    last.detail = Some(d);
                }
            }
            _ => {}
        }
    }

    /// The current status document.
    pub fn snapshot(&self) -> Status {
        let mut st = match self.inner.lock() {
            Ok(st) => st.clone(),
            Err(p) => p.into_inner().clone(),
        };
        st.uptime_secs = self.started.elapsed().as_secs();
        if let Ok(s) = self.stats.lock()
            && let Some(rx) = s.as_ref()
        {
            let e = *rx.borrow();
            st.flows_active = e.flows_active;
            st.inbound_active = e.inbound_active;
            st.flows_opened += e.flows_opened;
            st.flows_refused += e.flows_refused;
            st.flows_over_limit += e.flows_over_limit;
            st.bytes_up += e.bytes_up;
            st.bytes_down += e.bytes_down;
            st.inbound_opened += e.inbound_opened;
            st.inbound_refused += e.inbound_refused;
        }
        if let Some(f) = self.forwards() {
            st.forwards = f.status();
        }
        if let Some(dns) = st.dns.take() {
            st.dns = Some(match self.dns.lock() {
                Ok(c) => match c.as_ref() {
                    Some(c) => dns.with_counters(c),
                    None => dns,
                },
                Err(_) => dns,
            });
        }
        st
    }
}

impl LinkObserver for Board {
    fn link_event(&self, event: LinkEvent) {
        self.set_links(event.up, event.total, event.detail);
    }
}

/// The socket path of the session using TUN `tun`.
pub fn socket_path(state_dir: &Path, tun: &str) -> PathBuf {
    ipc::endpoint(state_dir, tun)
}

/// A bound control socket; removed from disk when dropped.
pub struct Server {
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
    async fn serve_with(
        mut self,
        board: Arc<Board>,
        stop: watch::Sender<bool>,
        request_timeout: Duration,
    ) {
        let clients = Arc::new(tokio::sync::Semaphore::new(MAX_CLIENTS));
        loop {
            let stream = match self.listener.accept().await {
                Ok(stream) => stream,
                Err(e) => {
                    // Out of descriptors: pause (the listener stays readable; retrying at
                    // once would spin).
                    debug!("control socket accept failed: {e}");
                    crate::fds::after_accept_error(&e).await;
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

async fn answer(
    stream: Conn,
    board: &Board,
    stop: &watch::Sender<bool>,
    request_timeout: Duration,
) -> std::io::Result<()> {
    let (r, mut w) = tokio::io::split(stream);
    let mut line = String::new();
    let mut r = BufReader::new(r).take(4096);
    // A connection that never sends its request is closed (it holds a descriptor).
    tokio::time::timeout(request_timeout, r.read_line(&mut line))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    let reply_text = match serde_json::from_str::<Request>(&line) {
        Ok(req) if req.cmd == "status" => serde_json::to_string(&board.snapshot())?,
        Ok(req) if req.cmd == "down" => {
            warn!("stop requested through the control socket");
            let _ = stop.send(true);
            r#"{"ok":true}"#.to_owned()
        }
        Ok(req) if req.cmd == "unexpose" => {
            let (forwards, specs) = match forward_specs(board, &req) {
                Ok(f) => f,
                Err(e) => return reply(&mut w, &expose_error(&e)).await,
            };
            let removed = forwards.remove_specs(&specs);
            let out = ExposeReply {
                forwards: Vec::new(),
                error: (removed < specs.len())
                    .then(|| "some of these ports were not exposed".to_owned()),
            };
            serde_json::to_string(&out)?
        }
        Ok(req) if req.cmd == "expose" => {
            let (forwards, specs) = match forward_specs(board, &req) {
                Ok(f) => f,
                Err(e) => return reply(&mut w, &expose_error(&e)).await,
            };
            let added = forwards.add(&specs);
            let ids: Vec<u64> = added.iter().map(|(id, _)| *id).collect();
            forwards.settled(&ids, EXPOSE_WAIT).await;
            let rows = forwards.status_of(&ids);
            // A port the jump host refused is reported to the requester, not kept as a
            // failed row in `status`.
            let refused: Vec<u64> = added
                .iter()
                .zip(&rows)
                .filter(|((_, new), row)| *new && row.state == ForwardState::Failed)
                .map(|((id, _), _)| *id)
                .collect();
            forwards.remove(&refused);
            let out = ExposeReply {
                forwards: rows,
                error: None,
            };
            reply(&mut w, &serde_json::to_string(&out)?).await?;
            if req.hold {
                // The listeners live as long as the requester (`mse-vpn run`) keeps this
                // connection: when it exits, however it exits, they are removed.
                let new: Vec<u64> = added
                    .iter()
                    .filter(|(_, new)| *new)
                    .map(|(id, _)| *id)
                    .collect();
                let mut sink = [0u8; 64];
                let mut r = r.into_inner();
                while matches!(r.read(&mut sink).await, Ok(n) if n > 0) {}
                forwards.remove(&new);
            }
            return Ok(());
        }
        _ => r#"{"error":"unknown request"}"#.to_owned(),
    };
    reply(&mut w, &reply_text).await?;
    w.shutdown().await
}

/// The session's exposed ports and the specs of an `expose`/`unexpose` request, or what to
/// answer instead.
fn forward_specs(
    board: &Board,
    req: &Request,
) -> Result<(Arc<Forwards>, Vec<ForwardSpec>), String> {
    let forwards = board
        .forwards()
        .ok_or_else(|| "this session cannot expose ports".to_owned())?;
    let specs = req
        .specs
        .iter()
        .map(|t| t.parse::<ForwardSpec>().map_err(|e| e.to_string()))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((forwards, specs))
}

/// How long an `expose` request waits for its listeners to be set up.
const EXPOSE_WAIT: Duration = Duration::from_secs(20);
/// A control connection must send its request within this long, or it is closed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Control connections served at once (each holds a descriptor); more are closed at once.
const MAX_CLIENTS: usize = 64;

fn expose_error(msg: &str) -> String {
    serde_json::to_string(&ExposeReply {
        forwards: Vec::new(),
        error: Some(msg.to_owned()),
    })
    .unwrap_or_default()
}

async fn reply(w: &mut WriteHalf<Conn>, line: &str) -> std::io::Result<()> {
    w.write_all(line.as_bytes()).await?;
    w.write_all(b"\n").await?;
    w.flush().await
}

/// Asks the session behind `path` to expose `specs`. With `hold`, the returned stream must
/// be kept open: the session removes the new listeners when it closes.
pub async fn expose(
    path: &Path,
    specs: &[ForwardSpec],
    hold: bool,
) -> Result<(ExposeReply, Conn), ControlError> {
    forward_request(path, "expose", specs, hold).await
}

/// Asks the session behind `path` to stop exposing `specs`.
pub async fn unexpose(path: &Path, specs: &[ForwardSpec]) -> Result<ExposeReply, ControlError> {
    Ok(forward_request(path, "unexpose", specs, false).await?.0)
}

async fn forward_request(
    path: &Path,
    cmd: &str,
    specs: &[ForwardSpec],
    hold: bool,
) -> Result<(ExposeReply, Conn), ControlError> {
    let req = Request {
        cmd: cmd.into(),
        specs: specs.iter().map(ToString::to_string).collect(),
        hold,
    };
    let line = serde_json::to_string(&req).unwrap_or_default();
    let (reply, stream) = exchange(path, &line).await?;
    let parsed = serde_json::from_str(&reply).map_err(|source| ControlError::Malformed {
        path: path.to_owned(),
        source,
    })?;
    Ok((parsed, stream))
}

/// Sends one request and returns the reply line.
pub async fn request(path: &Path, cmd: &str) -> Result<String, ControlError> {
    let req = serde_json::to_string(&Request {
        cmd: cmd.to_owned(),
        specs: Vec::new(),
        hold: false,
    })
    .map_err(|source| ControlError::Malformed {
        path: path.to_owned(),
        source,
    })?;
    Ok(exchange(path, &req).await?.0)
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
    let mut r = BufReader::new(r).take(1 << 20);
    r.read_line(&mut line).await.map_err(io)?;
    let stream = r.into_inner().into_inner().unsplit(w);
    Ok((line, stream))
}

/// Asks the session behind `path` for its status.
pub async fn status(path: &Path) -> Result<Status, ControlError> {
    let line = request(path, "status").await?;
    serde_json::from_str(&line).map_err(|source| ControlError::Malformed {
        path: path.to_owned(),
        source,
    })
}

/// Renders a status as the compact human table of `mse-vpn status`.
pub fn render(st: &Status) -> String {
    let mut out = String::new();
    let state = match st.state {
        LinkState::Connected => "connected",
        LinkState::Reconnecting => "RECONNECTING",
        LinkState::Stopping => "stopping",
    };
    let up = st.uptime_secs;
    out.push_str(&format!(
        "state       {state} ({}/{} connections up)\njump host   {}\ntun         {} (pid {})\nuptime      {}h{:02}m{:02}s\nroutes      {}\nflows       {} active, {} opened, {} refused, {} over limit\nbytes       {} up, {} down\nreconnects  {}\n",
        st.connections_up,
        st.connections,
        st.jump,
        st.tun,
        st.pid,
        up / 3600,
        up / 60 % 60,
        up % 60,
        st.routes.join(", "),
        st.flows_active,
        st.flows_opened,
        st.flows_refused,
        st.flows_over_limit,
        crate::logging::bytes(st.bytes_up),
        crate::logging::bytes(st.bytes_down),
        st.reconnects
    ));
    if st.max_inbound > 0 {
        out.push_str(&format!(
            "limits      {} outbound flows; {} cloud callers ({} connected)\n",
            st.max_flows, st.max_inbound, st.inbound_active
        ));
    }
    for f in &st.forwards {
        let remote = f
            .advertised
            .clone()
            .or_else(|| f.remote_port.map(|p| format!("<jump host>:{p}")))
            .unwrap_or_else(|| f.spec.clone());
        let state = match f.state {
            ForwardState::Listening => "listening",
            ForwardState::Waiting => "WAITING",
            ForwardState::Failed => "FAILED",
        };
        out.push_str(&format!(
            "exposed     {remote} -> local :{} {state}, {} call{}{}\n",
            f.local_port,
            f.connections,
            if f.connections == 1 { "" } else { "s" },
            f.detail
                .as_deref()
                .map(|d| format!(" ({d})"))
                .unwrap_or_default()
        ));
    }
    if let Some(d) = &st.dns {
        out.push_str(&format!(
            "dns         {} on {} → {} for {}\ndns queries {} via tunnel, {} via original nameservers, {} servfail, {} refused, {} truncated\n",
            d.mode,
            d.listen,
            d.servers.join(", "),
            d.domains.join(", "),
            d.via_tunnel,
            d.via_upstream,
            d.servfail,
            d.refused,
            d.truncated
        ));
    }
    // The latest state change (not the first entry: the session's start).
    if let Some(last) = st.history.iter().skip(1).next_back() {
        let ago = duration((st.started_unix + st.uptime_secs).saturating_sub(last.at_unix));
        let what = match (last.state, last.detail.as_deref()) {
            (LinkState::Reconnecting, Some(d)) => format!("lost the jump host, reconnecting: {d}"),
            (LinkState::Reconnecting, None) => "lost the jump host, reconnecting".to_owned(),
            (LinkState::Connected, Some(d)) => d.to_owned(),
            (LinkState::Connected, None) => "reconnected".to_owned(),
            (LinkState::Stopping, _) => "stopping".to_owned(),
        };
        out.push_str(&format!("last event  {what} ({ago} ago)\n"));
    }
    out
}

/// A duration for people: `18 s`, `3 min`, `2 h 5 min`.
fn duration(secs: u64) -> String {
    match secs {
        0..120 => format!("{secs} s"),
        120..7200 => format!("{} min", secs / 60),
        _ => format!("{} h {} min", secs / 3600, secs / 60 % 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn status_and_down_round_trip_over_the_socket() {
        let dir = std::env::temp_dir().join(format!("mse-vpn-ctl-{}", std::process::id()));
        let path = socket_path(&dir, "mvtest0");
        let me = mse_vpn_platform::account::current().unwrap().unwrap();
        let server = Server::bind(&path, me.uid, me.gid).unwrap();
        let board = Board::new(
            "u@h:22".into(),
            "mvtest0".into(),
            vec!["10.0.0.0/16".into()],
        );
        let (stats_tx, stats_rx) = watch::channel(EngineStats::default());
        board.follow(stats_rx);
        stats_tx.send_replace(EngineStats {
            flows_active: 2,
            bytes_up: 10,
            ..Default::default()
        });
        board.set_state(LinkState::Reconnecting, Some("keepalive timeout".into()));
        board.set_state(LinkState::Connected, None);
        let (stop_tx, mut stop_rx) = watch::channel(false);
        tokio::spawn(server.serve(board.clone(), stop_tx));

        let st = status(&path).await.unwrap();
        assert_eq!(st.flows_active, 2);
        assert_eq!(st.bytes_up, 10);
        assert_eq!(st.reconnects, 1);
        assert_eq!(st.state, LinkState::Connected);
        assert_eq!(st.history.len(), 3);
        let table = render(&st);
        assert!(table.contains("bytes       10 B up, 0 B down"), "{table}");
        // The last event is the latest change, not an older one with more words.
        assert!(table.contains("last event  reconnected ("), "{table}");
        board.set_links(0, 4, Some("cannot reach the jump host".into()));
        let table = render(&board.snapshot());
        assert!(
            table.contains(
                "last event  lost the jump host, reconnecting: cannot reach the jump host (0 s ago)"
            ),
            "{table}"
        );
        board.set_links(1, 4, None);
        let table = render(&board.snapshot());
        assert!(
            table.contains("last event  reconnected after 0 s (0 s ago)"),
            "{table}"
        );
        assert!(
            table.contains("state       connected (1/4 connections up)"),
            "{table}"
        );

        assert!(st.dns.is_none(), "no dns object without --dns-domain");
        let counters = Arc::new(crate::dns::DnsCounters::default());
        board.set_dns(
            crate::dns::DnsStatus {
                mode: "resolv.conf".into(),
                listen: "198.18.0.1:53".into(),
                servers: vec!["10.0.0.2".into()],
                domains: vec!["internal".into()],
                upstream: vec!["127.0.0.1:53".into()],
                via_tunnel: 0,
                via_upstream: 0,
                servfail: 0,
                refused: 0,
                truncated: 0,
            },
            counters.clone(),
        );
        counters
            .via_tunnel
            .fetch_add(3, std::sync::atomic::Ordering::Relaxed);
        let st = status(&path).await.unwrap();
        let dns = st.dns.as_ref().expect("a dns object");
        assert_eq!((dns.via_tunnel, dns.servfail), (3, 0));
        assert!(render(&st).contains("3 via tunnel"), "{}", render(&st));

        request(&path, "down").await.unwrap();
        stop_rx.wait_for(|s| *s).await.unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_silent_connection_is_closed_and_the_socket_keeps_answering() {
        let dir = std::env::temp_dir().join(format!("mse-vpn-ctl-idle-{}", std::process::id()));
        let path = socket_path(&dir, "mvtest1");
        let me = mse_vpn_platform::account::current().unwrap().unwrap();
        let server = Server::bind(&path, me.uid, me.gid).unwrap();
        let board = Board::new("u@h:22".into(), "mvtest1".into(), Vec::new());
        board.set_limits(500, 40);
        let (stop_tx, _stop_rx) = watch::channel(false);
        let timeout = Duration::from_millis(200);
        tokio::spawn(server.serve_with(board, stop_tx, timeout));

        // Connections that never send a request: more than the server serves at once.
        let mut idle = Vec::new();
        for _ in 0..MAX_CLIENTS {
            idle.push(ipc::connect(&path).await.unwrap());
        }
        let mut buf = [0u8; 1];
        let closed = tokio::time::timeout(timeout * 10, idle[0].read(&mut buf))
            .await
            .expect("the server closes a silent connection");
        assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
        let st = status(&path)
            .await
            .expect("answered once the idle ones are gone");
        assert_eq!((st.max_flows, st.max_inbound), (500, 40));
        assert!(render(&st).contains("40 cloud callers"), "{}", render(&st));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn no_session_is_a_clear_error() {
        let e = status(Path::new("/nonexistent/mse-vpn/x.sock"))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("no mse-vpn session is running"));
    }

    #[test]
    fn durations_for_people() {
        assert_eq!(duration(18), "18 s");
        assert_eq!(duration(600), "10 min");
        assert_eq!(duration(7500), "2 h 5 min");
    }
}
