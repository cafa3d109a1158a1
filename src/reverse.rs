//! Cloud-to-local (`--expose`): `tcpip-forward` listeners on the jump host, kept on one live
//! SSH connection each, and the table the driver uses to map a cloud caller's
//! `forwarded-tcpip` channel to the local port it is meant for.
//!
//! ```text
//!  VPC caller 10.0.7.9:40022 ──▶ jump host 10.0.0.1:20880 (sshd listener, tcpip-forward)
//!        ──forwarded-tcpip──▶ Driver ──▶ engine: SYN from 10.0.7.9:40022 to 198.18.0.1:20880
//!        ──TUN──▶ local app (its peer is the caller's own address)
//! ```
//!
//! sshd binds a listener for the connection that asked for it, so each exposed port lives on
//! exactly one link of the pool; when that link is lost, the [`Forwards`] keeper re-requests
//! it on another live link (or the same slot once reconnected). Before a listener is
//! announced, the keeper checks it is reachable on the jump host's VPC address: sshd with
//! `GatewayPorts no` silently binds loopback only, which would leave cloud callers with a
//! refused connection and the user with no clue.
//!
//! It also looks up which exposed port a cloud caller's channel is for ([`Forwards::lookup`];
//! where the call then goes is the relay's decision, [`crate::relay::route`]), and owns the
//! fallback for an app that listens on 127.0.0.1 only ([`loopback_fallback`]): the only
//! sockets of this module, on loopback. Everything else it does through [`Session`] and the
//! driver.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ipnet::IpNet;
use russh::client::{ChannelOpenHandle, Msg};
use russh::{ChannelReadHalf, ChannelWriteHalf};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::sync::{Notify, watch};
use tracing::{debug, info, warn};

use crate::pool::{LinkId, Pool};
use crate::ssh::{OpenError, Session};

/// How long the keeper waits before retrying listeners that failed.
const RETRY: Duration = Duration::from_secs(5);
/// Limit for one discovery command on the jump host.
const EXEC_TIMEOUT: Duration = Duration::from_secs(5);

/// One `--expose [BIND:]REMOTE_PORT[:LOCAL_PORT]`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ForwardSpec {
    /// Address the jump host listens on; empty means all its addresses.
    pub bind: String,
    /// Port on the jump host (0: the jump host picks one).
    pub remote_port: u16,
    /// Port of the local app.
    pub local_port: u16,
}

/// A malformed `--expose` value.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum ForwardSpecError {
    /// Not one to three `:`-separated parts.
    #[error(
        "'{0}' is not [BIND:]REMOTE_PORT[:LOCAL_PORT] (e.g. 20880, 18080:8080, 0.0.0.0:18080:8080)"
    )]
    Shape(String),
    /// A port is not a number in 1..=65535 (the remote port may be 0).
    #[error("'{0}' is not a port number (1-65535)")]
    Port(String),
}

fn port(s: &str, allow_zero: bool) -> Result<u16, ForwardSpecError> {
    match s.parse::<u16>() {
        Ok(0) if !allow_zero => Err(ForwardSpecError::Port(s.to_owned())),
        Ok(p) => Ok(p),
        Err(_) => Err(ForwardSpecError::Port(s.to_owned())),
    }
}

impl FromStr for ForwardSpec {
    type Err = ForwardSpecError;

    fn from_str(s: &str) -> Result<ForwardSpec, ForwardSpecError> {
        let shape = || ForwardSpecError::Shape(s.to_owned());
        // A bracketed IPv6 bind address first: [::]:PORT[:PORT].
        let (bind, rest) = match s.strip_prefix('[') {
            Some(r) => {
                let (addr, rest) = r.split_once("]:").ok_or_else(shape)?;
                addr.parse::<std::net::Ipv6Addr>().map_err(|_| shape())?;
                (Some(addr.to_owned()), rest.to_owned())
            }
            None => (None, s.to_owned()),
        };
        let parts: Vec<&str> = rest.split(':').collect();
        let is_port = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
        let (bind, remote, local) = match (bind, parts.as_slice()) {
            (Some(b), [r]) => (b, *r, *r),
            (Some(b), [r, l]) => (b, *r, *l),
            (None, [r]) => (String::new(), *r, *r),
            (None, [b, r]) if !b.is_empty() && !is_port(b) => ((*b).to_owned(), *r, *r),
            (None, [r, l]) => (String::new(), *r, *l),
            (None, [b, r, l]) if !b.is_empty() && !is_port(b) => ((*b).to_owned(), *r, *l),
            _ => return Err(shape()),
        };
        if bind.contains(char::is_whitespace) {
            return Err(shape());
        }
        let remote_port = port(remote, true)?;
        let local_port = port(local, remote_port == 0 && local != remote)?;
        if local_port == 0 {
            return Err(ForwardSpecError::Port(local.to_owned()));
        }
        Ok(ForwardSpec {
            bind: if bind == "*" { String::new() } else { bind },
            remote_port,
            local_port,
        })
    }
}

impl fmt::Display for ForwardSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.bind.as_str(), self.bind.contains(':')) {
            ("", _) => write!(f, "{}:{}", self.remote_port, self.local_port),
            (b, true) => write!(f, "[{b}]:{}:{}", self.remote_port, self.local_port),
            (b, false) => write!(f, "{b}:{}:{}", self.remote_port, self.local_port),
        }
    }
}

impl ForwardSpec {
    /// True if the jump host is asked to listen on loopback only (callers on the jump host
    /// itself; the reachability check is skipped).
    fn loopback_only(&self) -> bool {
        self.bind == "localhost" || self.bind.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
    }
}

/// Where a listener is, as `status` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ForwardState {
    /// No SSH link is up, or the listener is being (re)requested.
    Waiting,
    /// The jump host listens and cloud callers are forwarded.
    Listening,
    /// The jump host refused, or bound loopback only; `detail` says what to change.
    Failed,
}

/// One exposed port in `status --json` (`forwards`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForwardStatus {
    /// The `--expose` value.
    pub spec: String,
    /// Port the local app listens on.
    pub local_port: u16,
    /// The port on the jump host (known once it listens; differs from the spec for port 0).
    pub remote_port: Option<u16>,
    /// `ADDR:PORT` that VPC callers use (the jump host's VPC-facing address), if known.
    pub advertised: Option<String>,
    /// Listener state.
    pub state: ForwardState,
    /// Why it failed, with the fix; or a note.
    pub detail: Option<String>,
    /// Cloud connections accepted so far.
    pub connections: u64,
}

struct Entry {
    id: u64,
    spec: ForwardSpec,
    /// The link holding the listener and the session's [`Session::id`].
    holder: Option<(LinkId, u64)>,
    /// The port the jump host bound.
    bound: Option<u16>,
    state: ForwardState,
    detail: Option<String>,
    /// Held by a `mse-vpn run` whose control connection closed: cancel and drop.
    removed: bool,
    /// Cloud connections accepted.
    connections: u64,
    /// Its app was found listening on loopback only.
    loopback: bool,
}

/// Every exposed port of the session. Shared by the keeper task, the driver (lookups) and
/// the control socket (add, remove, status).
pub struct Forwards {
    entries: Mutex<Vec<Entry>>,
    next_id: Mutex<u64>,
    /// The jump host's VPC-facing address (`--advertise`, or discovered).
    advertise: Mutex<Option<IpAddr>>,
    wake: Notify,
    changed: watch::Sender<u64>,
}

impl Default for Forwards {
    fn default() -> Self {
        Forwards {
            entries: Mutex::new(Vec::new()),
            next_id: Mutex::new(1),
            advertise: Mutex::new(None),
            wake: Notify::new(),
            changed: watch::channel(0).0,
        }
    }
}

/// What the reachability probe found.
enum Probe {
    Reachable,
    LoopbackOnly,
    Inconclusive(String),
}

/// What a cloud caller's channel is for, as the driver needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target {
    /// The entry (to count connections).
    pub id: u64,
    /// The local app's port.
    pub local_port: u16,
}

impl Forwards {
    /// An empty table.
    pub fn new() -> Arc<Forwards> {
        Arc::new(Forwards::default())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Entry>> {
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Sets the address shown to users as the one VPC callers use.
    pub fn set_advertise(&self, addr: Option<IpAddr>) {
        *self
            .advertise
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = addr;
    }

    fn advertise(&self) -> Option<IpAddr> {
        *self
            .advertise
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Adds listeners (the keeper requests them at once); returns their ids, each with
    /// `true` if it is new. A spec that is already exposed keeps its entry (`false`).
    pub fn add(&self, specs: &[ForwardSpec]) -> Vec<(u64, bool)> {
        let mut ids = Vec::new();
        {
            let mut entries = self.lock();
            for spec in specs {
                if let Some(e) = entries.iter().find(|e| &e.spec == spec && !e.removed) {
                    ids.push((e.id, false));
                    continue;
                }
                let mut next = self
                    .next_id
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let id = *next;
                *next += 1;
                entries.push(Entry {
                    id,
                    spec: spec.clone(),
                    holder: None,
                    bound: None,
                    state: ForwardState::Waiting,
                    detail: None,
                    removed: false,
                    connections: 0,
                    loopback: false,
                });
                ids.push((id, true));
            }
        }
        self.wake.notify_one();
        ids
    }

    /// Removes listeners (the keeper cancels them on the jump host).
    pub fn remove(&self, ids: &[u64]) {
        for e in self.lock().iter_mut().filter(|e| ids.contains(&e.id)) {
            e.removed = true;
        }
        self.wake.notify_one();
    }

    /// Removes the listeners of these specs; returns how many were exposed.
    pub fn remove_specs(&self, specs: &[ForwardSpec]) -> usize {
        let ids: Vec<u64> = self
            .lock()
            .iter()
            .filter(|e| !e.removed && specs.contains(&e.spec))
            .map(|e| e.id)
            .collect();
        self.remove(&ids);
        ids.len()
    }

    /// The local port for a caller that reached `listen_port` through session `session`.
    /// `None` (refuse the caller) for unknown listeners and those not announced yet.
    pub fn lookup(&self, link: LinkId, listen_port: u16) -> Option<Target> {
        let mut entries = self.lock();
        let e = entries.iter_mut().find(|e| {
            !e.removed
                && e.state == ForwardState::Listening
                && e.bound == Some(listen_port)
                && e.holder.is_some_and(|(l, _)| l == link)
        })?;
        e.connections += 1;
        Some(Target {
            id: e.id,
            local_port: e.spec.local_port,
        })
    }

    /// Records that calls to entry `id` reach its app over loopback (it listens on
    /// 127.0.0.1 only); true the first time.
    pub fn note_loopback(&self, id: u64) -> bool {
        let mut entries = self.lock();
        let Some(e) = entries.iter_mut().find(|e| e.id == id) else {
            return false;
        };
        let first = !e.loopback;
        e.loopback = true;
        if first || e.detail.is_none() {
            e.detail = Some(
                "the app listens on 127.0.0.1 only: calls reach it over loopback, from 127.0.0.1 (listen on 0.0.0.0 to see the callers' own addresses)".into(),
            );
        }
        first
    }

    /// The rows of `status`.
    pub fn status(&self) -> Vec<ForwardStatus> {
        self.rows(|_| true)
    }

    /// The rows of the given entries.
    pub fn status_of(&self, ids: &[u64]) -> Vec<ForwardStatus> {
        self.rows(|e| ids.contains(&e.id))
    }

    /// The rows of the live entries that `keep` selects, read under one lock.
    fn rows(&self, keep: impl Fn(&Entry) -> bool) -> Vec<ForwardStatus> {
        let advertise = self.advertise();
        self.lock()
            .iter()
            .filter(|e| !e.removed && keep(e))
            .map(|e| ForwardStatus {
                spec: e.spec.to_string(),
                local_port: e.spec.local_port,
                remote_port: e.bound,
                advertised: match (advertise, e.bound) {
                    (Some(ip), Some(p)) if e.state == ForwardState::Listening => {
                        Some(SocketAddr::new(ip, p).to_string())
                    }
                    _ => None,
                },
                state: e.state.clone(),
                detail: e.detail.clone(),
                connections: e.connections,
            })
            .collect()
    }

    /// Waits until none of `ids` is [`ForwardState::Waiting`] any more, or `timeout`.
    pub async fn settled(&self, ids: &[u64], timeout: Duration) {
        let mut rx = self.changed.subscribe();
        let done = |f: &Forwards| {
            f.lock()
                .iter()
                .filter(|e| ids.contains(&e.id))
                .all(|e| e.state != ForwardState::Waiting)
        };
        let _ = tokio::time::timeout(timeout, async {
            while !done(self) {
                if rx.changed().await.is_err() {
                    break;
                }
            }
        })
        .await;
    }

    fn touch(&self) {
        self.changed.send_modify(|n| *n += 1);
    }

    /// One pass: cancel removed listeners, and (re)request every listener whose link is gone.
    async fn reconcile(&self, pool: &Pool) -> bool {
        // Removed entries: cancel where they still listen, then forget them.
        type Gone = (ForwardSpec, Option<(LinkId, u64)>, Option<u16>);
        let gone: Vec<Gone> = {
            let mut entries = self.lock();
            let gone = entries
                .iter()
                .filter(|e| e.removed)
                .map(|e| (e.spec.clone(), e.holder, e.bound))
                .collect();
            entries.retain(|e| !e.removed);
            gone
        };
        for (spec, holder, bound) in gone {
            if let (Some((link, _)), Some(port)) = (holder, bound)
                && let Some(session) = pool.session(link)
            {
                session.cancel_forward(&spec.bind, port).await;
                info!(spec = %spec, "stopped exposing");
            }
        }
        let todo: Vec<(u64, ForwardSpec)> = {
            let mut entries = self.lock();
            let mut todo = Vec::new();
            for e in entries.iter_mut() {
                let live = e.holder.is_some_and(|(link, _)| pool.is_live(link));
                if live {
                    continue;
                }
                if e.holder.take().is_some() {
                    e.state = ForwardState::Waiting;
                    e.detail = Some("its SSH connection was lost; re-requesting".into());
                    e.bound = None;
                }
                todo.push((e.id, e.spec.clone()));
            }
            todo
        };
        self.touch();
        let mut all_ok = true;
        for (id, spec) in todo {
            let Some((link, session)) = pool.first_live() else {
                all_ok = false;
                break;
            };
            let (state, detail, bound) = self.request(&session, &spec).await;
            all_ok &= state == ForwardState::Listening;
            let mut entries = self.lock();
            if let Some(e) = entries.iter_mut().find(|e| e.id == id) {
                match state {
                    ForwardState::Listening => {
                        e.holder = Some((link, session.id()));
                        e.bound = bound;
                        if e.state != ForwardState::Listening {
                            debug!(spec = %spec, port = bound, "exposed on the jump host");
                        }
                    }
                    ForwardState::Failed => {
                        if e.state != ForwardState::Failed {
                            warn!(spec = %spec, "cannot expose: {}", detail.as_deref().unwrap_or(""));
                        }
                    }
                    ForwardState::Waiting => {}
                }
                e.state = state;
                e.detail = detail;
            }
            drop(entries);
            self.touch();
        }
        all_ok
    }

    /// Asks `session` for the listener, after checking that VPC callers can reach what the
    /// jump host binds for us.
    async fn request(
        &self,
        session: &Session,
        spec: &ForwardSpec,
    ) -> (ForwardState, Option<String>, Option<u16>) {
        let mut note = None;
        if let (Some(ip), false) = (self.advertise(), spec.loopback_only()) {
            match self.probe(session, &spec.bind, ip).await {
                Probe::Reachable => {}
                Probe::LoopbackOnly => {
                    return (
                        ForwardState::Failed,
                        Some(format!(
                            "the jump host binds forwarded ports to loopback only (`GatewayPorts no`), so VPC callers could not reach {ip}:{}: set `GatewayPorts clientspecified` in the jump host's sshd_config and reload sshd (or pass --advertise if {ip} is not its VPC address)",
                            spec.remote_port
                        )),
                        None,
                    );
                }
                Probe::Inconclusive(why) => {
                    note = Some(format!("could not check reachability on {ip}: {why}"));
                }
            }
        }
        match session.request_forward(&spec.bind, spec.remote_port).await {
            Some(port) => (ForwardState::Listening, note, Some(port)),
            None => {
                let what = if spec.bind.is_empty() {
                    format!("port {}", spec.remote_port)
                } else {
                    format!("{}:{}", spec.bind, spec.remote_port)
                };
                (
                    ForwardState::Failed,
                    Some(format!(
                        "the jump host refused to listen on {what}: the port is taken there, ports below 1024 need a root login, or sshd_config has `AllowTcpForwarding no`/`local` (set it to `yes` or `remote`)"
                    )),
                    None,
                )
            }
        }
    }

    /// sshd with `GatewayPorts no` binds loopback whatever we ask. A throw-away listener on
    /// a port the jump host picks, dialled on its VPC address, tells. No entry ever matches
    /// the throw-away port, so the probe's own forwarded connection is refused and never
    /// reaches a local app.
    async fn probe(&self, session: &Session, bind: &str, ip: IpAddr) -> Probe {
        let Some(port) = session.request_forward(bind, 0).await else {
            return Probe::Inconclusive("the jump host refused a probe listener".into());
        };
        let dial = session
            .open_direct_tcpip(
                SocketAddr::new(ip, port),
                SocketAddr::new(ip, 0),
                Duration::from_secs(5),
            )
            .await;
        session.cancel_forward(bind, port).await;
        match dial {
            Ok(channel) => {
                let _ = channel.close().await;
                Probe::Reachable
            }
            Err(OpenError::ConnectFailed) => Probe::LoopbackOnly,
            Err(e) => Probe::Inconclusive(e.to_string()),
        }
    }

    /// Keeps the listeners up until `stop`: after every change of the pool's links, every
    /// add/remove, and every [`RETRY`] while one has failed.
    pub async fn keep(self: Arc<Self>, pool: Arc<Pool>, mut stop: watch::Receiver<bool>) {
        let mut links = pool.subscribe();
        loop {
            let ok = self.reconcile(&pool).await;
            let retry = async {
                if ok {
                    std::future::pending::<()>().await
                } else {
                    tokio::time::sleep(RETRY).await
                }
            };
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                r = links.changed() => if r.is_err() { return },
                _ = self.wake.notified() => {}
                _ = retry => {}
            }
        }
    }
}

/// The jump host's address as VPC callers see it: `--advertise`, else the address we reach
/// it on when that is inside a routed network, else the source address the jump host itself
/// uses towards the first routed network (`ip route get` over an `exec` channel), else the
/// first of `hostname -I` inside a routed network. `None` when nothing can be found out (a
/// jump host without a shell for us).
pub async fn discover_advertise(
    session: &Session,
    connected: Option<IpAddr>,
    routes: &[IpNet],
) -> Option<IpAddr> {
    if let Some(ip) = connected.filter(|ip| routes.iter().any(|n| n.contains(ip))) {
        return Some(ip);
    }
    let first = routes.first()?;
    let probe = match first {
        IpNet::V4(n) => IpAddr::V4(n.hosts().next().unwrap_or_else(|| n.network())),
        IpNet::V6(n) => IpAddr::V6(n.hosts().next().unwrap_or_else(|| n.network())),
    };
    if let Some(out) = session
        .exec(&format!("ip -o route get {probe}"), EXEC_TIMEOUT)
        .await
        && let Some(src) = parse_route_src(&out)
    {
        return Some(src);
    }
    let out = session.exec("hostname -I", EXEC_TIMEOUT).await?;
    let addrs: Vec<IpAddr> = out
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    addrs
        .iter()
        .find(|a| routes.iter().any(|n| n.contains(*a)))
        .or(addrs.first())
        .copied()
}

/// The `src` address in `ip -o route get` output.
fn parse_route_src(out: &str) -> Option<IpAddr> {
    let mut words = out.split_whitespace();
    while let Some(w) = words.next() {
        if w == "src" {
            return words.next()?.parse().ok();
        }
    }
    None
}

/// How long the loopback fallback waits for the local app.
const LOOPBACK_CONNECT: Duration = Duration::from_secs(2);

/// A cloud caller whose local app did not answer on the TUN address: try 127.0.0.1 (an app
/// bound to loopback only) on the app's `port`. The app then sees 127.0.0.1 as its peer, not
/// the caller; the exposed port's status (entry `forward`) says so. Refused there too, the
/// channel is refused and the jump host closes the caller's connection.
pub async fn loopback_fallback(
    (read, write): (Option<ChannelReadHalf>, Arc<ChannelWriteHalf<Msg>>),
    reply: ChannelOpenHandle,
    port: u16,
    forward: u64,
    forwards: Arc<Forwards>,
) {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let tcp = tokio::time::timeout(LOOPBACK_CONNECT, tokio::net::TcpStream::connect(addr)).await;
    let Ok(Ok(tcp)) = tcp else {
        debug!(port, "nothing listens on the local port: caller refused");
        use futures::FutureExt;
        let _ = reply
            .reject(russh::ChannelOpenFailure::ConnectFailed)
            .now_or_never();
        return;
    };
    if forwards.note_loopback(forward) {
        warn!(
            port,
            "the app listens on 127.0.0.1 only: cloud calls reach it over loopback and it sees 127.0.0.1 as their address (listen on 0.0.0.0 to see the callers' own)"
        );
    }
    let _ = tcp.set_nodelay(true);
    reply.accept().await;
    relay_loopback(read, write, tcp).await;
}

/// Relays a caller's channel and a loopback connection both ways, with half-close. The
/// channel is read only as fast as the app takes the bytes: its SSH window carries the app's
/// pace to the caller (the channel never holds up the rest of its SSH connection).
async fn relay_loopback(
    read: Option<ChannelReadHalf>,
    write: Arc<ChannelWriteHalf<Msg>>,
    tcp: tokio::net::TcpStream,
) {
    use russh::ChannelMsg;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Some(mut read) = read else {
        let _ = write.close().await;
        return;
    };
    let (mut tcp_read, mut tcp_write) = tcp.into_split();
    // Caller -> app; the caller's EOF becomes a shutdown of the app's read side. Ends when the
    // caller is gone or the app stopped taking data.
    let to_app = async {
        while let Some(msg) = read.wait().await {
            let written = match msg {
                ChannelMsg::Data { data } => tcp_write.write_all(&data).await.is_ok(),
                ChannelMsg::Eof => {
                    let _ = tcp_write.shutdown().await;
                    return true;
                }
                ChannelMsg::Close => return false,
                _ => true,
            };
            if !written {
                return false;
            }
        }
        false
    };
    // App -> caller, until the app's EOF.
    let to_caller = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match tcp_read.read(&mut buf).await {
                Ok(0) => {
                    let _ = write.eof().await;
                    return true;
                }
                Ok(n) => {
                    let data = bytes::Bytes::copy_from_slice(&buf[..n]);
                    if write.data_bytes(data).await.is_err() {
                        return false;
                    }
                }
                Err(_) => return false,
            }
        }
    };
    tokio::pin!(to_app, to_caller);
    // Both directions finish (half-close), or one fails and the call ends.
    let mut app_done = false;
    let mut caller_done = false;
    while !(app_done && caller_done) {
        tokio::select! {
            ok = &mut to_app, if !app_done => {
                app_done = true;
                if !ok { break; }
            }
            ok = &mut to_caller, if !caller_done => {
                caller_done = true;
                if !ok { break; }
            }
        }
    }
    let _ = write.close().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(bind: &str, remote: u16, local: u16) -> ForwardSpec {
        ForwardSpec {
            bind: bind.into(),
            remote_port: remote,
            local_port: local,
        }
    }

    #[test]
    fn expose_values_parse_into_specs() {
        let ok = [
            ("20880", spec("", 20880, 20880)),
            ("18080:8080", spec("", 18080, 8080)),
            ("0.0.0.0:18080:8080", spec("0.0.0.0", 18080, 8080)),
            ("10.0.0.1:9000", spec("10.0.0.1", 9000, 9000)),
            ("localhost:9000:80", spec("localhost", 9000, 80)),
            ("*:9000:80", spec("", 9000, 80)),
            ("[::]:9000:80", spec("::", 9000, 80)),
            ("[::1]:9000", spec("::1", 9000, 9000)),
            ("0:8080", spec("", 0, 8080)),
        ];
        for (text, want) in ok {
            assert_eq!(text.parse::<ForwardSpec>(), Ok(want.clone()), "{text}");
            // Display round-trips.
            assert_eq!(want.to_string().parse::<ForwardSpec>(), Ok(want), "{text}");
        }
        let bad = [
            "",
            ":",
            "0",
            "abc",
            "70000",
            "1:2:3:4",
            "8080:0",
            "[::]",
            "[zz]:80",
            "a b:80:80",
            "80:",
            ":80",
            "-1",
        ];
        for text in bad {
            assert!(text.parse::<ForwardSpec>().is_err(), "{text} accepted");
        }
    }

    #[test]
    fn loopback_binds_skip_the_reachability_probe() {
        assert!(spec("localhost", 1, 1).loopback_only());
        assert!(spec("127.0.0.1", 1, 1).loopback_only());
        assert!(spec("::1", 1, 1).loopback_only());
        assert!(!spec("", 1, 1).loopback_only());
        assert!(!spec("0.0.0.0", 1, 1).loopback_only());
    }

    #[test]
    fn route_get_output_gives_the_source_address() {
        let out = "10.0.0.1 dev lo table local src 10.0.0.1 uid 0 \\    cache <local> \n";
        assert_eq!(parse_route_src(out), Some("10.0.0.1".parse().unwrap()));
        let out = "10.0.5.9 via 10.0.0.254 dev eth1 src 10.0.3.4 uid 1000\n";
        assert_eq!(parse_route_src(out), Some("10.0.3.4".parse().unwrap()));
        assert_eq!(parse_route_src("unreachable"), None);
    }

    #[test]
    fn lookups_only_find_announced_listeners_of_the_right_connection() {
        let f = Forwards::new();
        let added = f.add(&[spec("", 20880, 20880), spec("", 18080, 8080)]);
        assert!(added.iter().all(|(_, new)| *new));
        let ids: Vec<u64> = added.iter().map(|(id, _)| *id).collect();
        assert_eq!(
            f.add(&[spec("", 20880, 20880)]),
            vec![(ids[0], false)],
            "no duplicate"
        );
        let link = LinkId {
            slot: 0,
            generation: 1,
        };
        let other = LinkId {
            slot: 0,
            generation: 2,
        };
        assert_eq!(f.lookup(link, 20880), None, "not listening yet");
        {
            let mut entries = f.lock();
            let e = &mut entries[1];
            e.state = ForwardState::Listening;
            e.bound = Some(18080);
            e.holder = Some((link, 7));
        }
        assert_eq!(
            f.lookup(link, 18080),
            Some(Target {
                id: ids[1],
                local_port: 8080
            })
        );
        assert_eq!(f.lookup(other, 18080), None, "another connection");
        assert_eq!(f.lookup(link, 20880), None);
        f.set_advertise(Some("10.0.0.1".parse().unwrap()));
        let st = f.status_of(&[ids[1]]);
        assert_eq!(st.len(), 1);
        assert_eq!(st[0].advertised.as_deref(), Some("10.0.0.1:18080"));
        assert_eq!(st[0].connections, 1);
        f.remove(&[ids[1]]);
        assert_eq!(f.lookup(link, 18080), None, "removed");
        assert_eq!(f.status().len(), 1);
    }
}
