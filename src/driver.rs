//! The driver: the one task that owns the [`Engine`], moving packets between it and the TUN
//! and bytes between it and SSH channels.
//!
//! ```text
//!            ┌──────────── Driver task (owns Engine; no lock) ─────────────┐
//!  TUN ─recv─▶ handle_tun_packet ─▶ poll ─▶ poll_transmit ─send─▶ TUN      │
//!            │                        │                                     │
//!            │          Event::Open ──┼─▶ open task ─▶ FlowMsg::Opened      │
//!            │          Event::Data ──┼─▶ per-flow writer (bounded) ─▶ SSH  │
//!            │   FlowMsg (bounded) ◀──┴── per-flow reader (always drains)   │
//!            └─────────────────────────────────────────────────────────────┘
//! ```
//!
//! Every flow has a reader task that drains its channel into one shared bounded queue to the
//! driver; the engine holds each flow's backlog under its own bound. russh re-opens the SSH
//! window as data arrives and stalls the whole connection when one channel's queue is full,
//! so the reader paces itself by read credit (what the app has taken, plus
//! [`READ_CREDIT`]) only while the engine, not the app, is the bottleneck. Once a flow's app
//! socket is full (the app reads slower than the jump host sends), or a reader waited
//! [`CREDIT_WAIT`] in vain, that reader drains freely from then on, so one slow app never
//! paces its connection's other flows, and the engine's buffer limit resets that flow if its
//! app never catches up. Writes to a channel wait for the
//! SSH window in the flow's writer task, and the engine reads no more from the app than the
//! flow's credit allows: backpressure end to end, no unbounded queue.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt;
use russh::ChannelMsg;
use russh::client::ChannelOpenHandle;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::time::Instant as TokioInstant;
use tracing::{Instrument, debug, info_span, warn};

use crate::engine::{CloseReason, Engine, EngineConfig, Event, FlowId, FlowKey};
use crate::pool::{LinkId, Pool};
use crate::reverse::Forwards;
use crate::ssh::{Inbound, OpenError};
use crate::tun::Tun;

/// Messages from flow tasks to the driver.
enum FlowMsg {
    Opened(FlowId, LinkId, russh::Channel<russh::client::Msg>),
    OpenFailed(FlowId, CloseReason),
    Data(FlowId, Bytes),
    Eof(FlowId),
    Closed(FlowId),
    Sent(FlowId, usize),
}

/// Commands to a flow's writer task.
enum WriterCmd {
    Data(Bytes),
    Eof,
    Close,
}

/// Channel bytes a flow's reader may forward ahead of what the app has taken. Past it the
/// reader waits for the app, so a bulk download runs at the app's pace instead of piling up
/// (russh re-opens the SSH window on arrival, so waiting briefly is the only brake).
const READ_CREDIT: usize = 16 * 1024 * 1024;
/// How long a reader waits for credit before deciding the app has stopped reading: it then
/// drains freely again (a paused channel stalls its whole SSH connection), and the engine's
/// buffer limit decides the flow's fate.
const CREDIT_WAIT: Duration = Duration::from_secs(2);

/// Capacity of the shared queue from flow tasks to the driver.
const FLOW_QUEUE: usize = 4096;
/// Packets read from the TUN per wake-up before the engine runs.
const TUN_BATCH: usize = 64;

/// Driver settings.
#[derive(Clone, Debug)]
pub struct DriverConfig {
    /// Engine tunables.
    pub engine: EngineConfig,
    /// How long a `direct-tcpip` open may take before the app gets a reset; also how long a
    /// local app may take to answer a cloud caller.
    pub open_timeout: Duration,
    /// The TUN's IPv4 address: cloud callers' connections are made to it.
    pub local_v4: std::net::Ipv4Addr,
    /// The TUN's IPv6 address, if it has one (for IPv6 callers).
    pub local_v6: Option<std::net::Ipv6Addr>,
}

/// Capacity of the queue of cloud callers' channels waiting for the driver.
pub const INBOUND_QUEUE: usize = 256;

/// The driver. See the module documentation.
pub struct Driver {
    engine: Engine,
    config: DriverConfig,
    tun: Arc<Tun>,
    pool: Arc<Pool>,
    /// The link each open flow's channel lives on.
    links: HashMap<FlowId, LinkId>,
    msgs_tx: mpsc::Sender<FlowMsg>,
    msgs: mpsc::Receiver<FlowMsg>,
    writers: HashMap<FlowId, mpsc::Sender<WriterCmd>>,
    /// Read credit of each open flow's channel reader.
    credits: HashMap<FlowId, Arc<Semaphore>>,
    epoch: TokioInstant,
    stats: watch::Sender<crate::engine::EngineStats>,
    /// Cloud callers' channels from the SSH handlers, and the table of exposed ports.
    inbound: Option<(mpsc::Receiver<Inbound>, Arc<Forwards>)>,
    /// Cloud callers' channels waiting for their local app to answer.
    accepting: HashMap<FlowId, Accepting>,
}

/// A cloud caller's channel waiting for its local app to answer on the TUN address.
struct Accepting {
    channel: russh::Channel<russh::client::Msg>,
    reply: ChannelOpenHandle,
    /// The exposed port's entry in [`Forwards`].
    forward: u64,
    local_port: u16,
}

impl Driver {
    /// A driver moving flows between `tun` and the connections of `pool`.
    pub fn new(config: DriverConfig, tun: Arc<Tun>, pool: Arc<Pool>) -> Driver {
        let epoch = TokioInstant::now();
        let (msgs_tx, msgs) = mpsc::channel(FLOW_QUEUE);
        let engine = Engine::new(
            config.engine.clone(),
            smoltcp::time::Instant::from_micros(0),
        );
        Driver {
            engine,
            config,
            tun,
            pool,
            links: HashMap::new(),
            msgs_tx,
            msgs,
            writers: HashMap::new(),
            credits: HashMap::new(),
            epoch,
            stats: watch::channel(Default::default()).0,
            inbound: None,
            accepting: HashMap::new(),
        }
    }

    /// Also serves cloud callers (`--expose`): channels arriving on `rx` for the listeners in
    /// `forwards` become TCP connections to the local app.
    pub fn with_inbound(mut self, rx: mpsc::Receiver<Inbound>, forwards: Arc<Forwards>) -> Driver {
        self.inbound = Some((rx, forwards));
        self
    }

    /// A receiver of the engine's counters, updated as the driver runs.
    pub fn stats(&self) -> watch::Receiver<crate::engine::EngineStats> {
        self.stats.subscribe()
    }

    fn now(&self) -> smoltcp::time::Instant {
        smoltcp::time::Instant::from_micros(self.epoch.elapsed().as_micros() as i64)
    }

    fn deadline(&self, at: smoltcp::time::Instant) -> TokioInstant {
        self.epoch + Duration::from_micros(at.total_micros().max(0) as u64)
    }

    /// Runs until `shutdown` fires. Flows on a lost SSH connection are reset when it goes;
    /// all flows are reset on exit.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) -> std::io::Result<()> {
        let mut buf = vec![0u8; self.config.engine.mtu + 64];
        let mut links = self.pool.subscribe();
        loop {
            let now = self.now();
            let deadline = self
                .engine
                .poll_timeout(now)
                .map(|t| self.deadline(t))
                .unwrap_or_else(|| TokioInstant::now() + Duration::from_secs(3600));
            tokio::select! {
                biased;
                _ = shutdown.wait_for(|stop| *stop) => break,
                Ok(()) = links.changed() => self.reset_lost_flows(),
                r = self.tun.recv(&mut buf) => {
                    let n = r?;
                    let now = self.now();
                    self.engine.handle_tun_packet(now, buf[..n].to_vec());
                    for _ in 1..TUN_BATCH {
                        match self.tun.recv(&mut buf).now_or_never() {
                            Some(Ok(n)) => self.engine.handle_tun_packet(now, buf[..n].to_vec()),
                            Some(Err(e)) => return Err(e),
                            None => break,
                        }
                    }
                }
                Some(msg) = self.msgs.recv() => {
                    self.handle_msg(msg);
                    for _ in 1..FLOW_QUEUE {
                        match self.msgs.try_recv() {
                            Ok(msg) => self.handle_msg(msg),
                            Err(_) => break,
                        }
                    }
                }
                Some(call) = recv_inbound(&mut self.inbound) => {
                    self.handle_inbound(call);
                    for _ in 1..INBOUND_QUEUE {
                        match self.inbound.as_mut().map(|(rx, _)| rx.try_recv()) {
                            Some(Ok(call)) => self.handle_inbound(call),
                            _ => break,
                        }
                    }
                }
                _ = tokio::time::sleep_until(deadline) => {}
            }
            self.turn().await?;
        }
        let now = self.now();
        self.engine.reset_all(now, CloseReason::Shutdown);
        self.turn().await?;
        Ok(())
    }

    /// A link went down: reset the flows that were on it (their channels are gone).
    fn reset_lost_flows(&mut self) {
        let lost: Vec<FlowId> = self
            .links
            .iter()
            .filter(|(_, link)| !self.pool.is_live(**link))
            .map(|(id, _)| *id)
            .collect();
        if !lost.is_empty() {
            warn!(
                flows = lost.len(),
                "resetting the flows of a lost SSH connection"
            );
        }
        for id in lost {
            self.links.remove(&id);
            self.engine.abort(id, CloseReason::SessionLost);
        }
    }

    /// Runs the engine once and carries out what it asks for.
    async fn turn(&mut self) -> std::io::Result<()> {
        let now = self.now();
        self.engine.poll(now);
        while let Some(event) = self.engine.poll_event() {
            self.handle_event(event);
        }
        while let Some(c) = self.engine.poll_consumed() {
            if c.app_limited {
                // Pacing this flow would stall every flow of its SSH connection at this app's
                // speed: let its reader drain freely; the engine's buffer limit bounds it.
                if let Some(credit) = self.credits.remove(&c.id) {
                    credit.add_permits(Semaphore::MAX_PERMITS / 2);
                }
            } else if let Some(credit) = self.credits.get(&c.id) {
                credit.add_permits(c.bytes);
            }
        }
        while let Some(packet) = self.engine.poll_transmit() {
            self.tun.send(&packet).await?;
            self.engine.recycle(packet);
        }
        self.stats.send_replace(self.engine.stats());
        Ok(())
    }

    fn handle_msg(&mut self, msg: FlowMsg) {
        let now = self.now();
        match msg {
            FlowMsg::Opened(id, link, channel) => {
                let Some(key) = self.engine.flow_key(id) else {
                    // The app gave up while the channel was opening.
                    self.pool.release(link);
                    tokio::spawn(async move {
                        let _ = channel.close().await;
                    });
                    return;
                };
                self.links.insert(id, link);
                self.start_flow_tasks(id, key, channel);
                self.engine.handle_open_ok(now, id);
            }
            FlowMsg::OpenFailed(id, reason) => self.engine.handle_open_failed(now, id, reason),
            FlowMsg::Data(id, data) => self.engine.handle_channel_data(now, id, data),
            FlowMsg::Eof(id) => self.engine.handle_channel_eof(now, id),
            FlowMsg::Closed(id) => self.engine.handle_channel_closed(now, id),
            FlowMsg::Sent(id, n) => self.engine.handle_sent(id, n),
        }
    }

    fn handle_event(&mut self, event: Event) {
        match event {
            Event::Open { id, key } => self.open(id, key),
            Event::Connected { id } => self.accept_inbound(id),
            Event::Data { id, data } => self.send_to_writer(id, WriterCmd::Data(data)),
            Event::Eof { id } => self.send_to_writer(id, WriterCmd::Eof),
            Event::Close { id, key, reason } => {
                if let Some(waiting) = self.accepting.remove(&id) {
                    match (&self.inbound, reason) {
                        // Nothing answered on the TUN address: an app listening on loopback
                        // only (as `ssh -R` users expect to work) is still reached there.
                        (Some((_, forwards)), CloseReason::LocalRefused) => {
                            tokio::spawn(
                                loopback_fallback(waiting, forwards.clone())
                                    .instrument(info_span!("flow", id = %id, dst = %key.dst)),
                            );
                        }
                        // The jump host closes the caller's connection.
                        _ => {
                            let _ = waiting
                                .reply
                                .reject(russh::ChannelOpenFailure::ConnectFailed)
                                .now_or_never();
                        }
                    }
                }
                if let Some(w) = self.writers.remove(&id) {
                    let _ = w.try_send(WriterCmd::Close);
                }
                if let Some(link) = self.links.remove(&id) {
                    self.pool.release(link);
                }
                if let Some(credit) = self.credits.remove(&id) {
                    credit.close();
                }
                if reason.is_normal() {
                    debug!(flow = %id, src = %key.src, dst = %key.dst, %reason, "flow closed");
                } else {
                    warn!(flow = %id, src = %key.src, dst = %key.dst, %reason, "flow closed");
                }
            }
        }
    }

    /// A cloud caller reached an exposed port: connect to the local app from the caller's
    /// address. The channel is accepted once the app answers ([`Event::Connected`]).
    fn handle_inbound(&mut self, call: Inbound) {
        let Some((_, forwards)) = &self.inbound else {
            return;
        };
        let Some(target) = forwards.lookup(call.session, call.listen_port) else {
            debug!(
                port = call.listen_port,
                "a forwarded connection for no exposed port: refused"
            );
            return; // dropping the reply refuses the channel
        };
        let Some(link) = self.pool.link_of(call.session) else {
            return;
        };
        let Some(caller) = call.caller.map(|c| match c.ip() {
            std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => SocketAddr::new(v4.into(), c.port()),
                None => c,
            },
            _ => c,
        }) else {
            warn!("the jump host reported no usable caller address: refused");
            return;
        };
        let local_ip = match caller {
            SocketAddr::V4(_) => Some(std::net::IpAddr::V4(self.config.local_v4)),
            SocketAddr::V6(_) => self.config.local_v6.map(std::net::IpAddr::V6),
        };
        let Some(local_ip) = local_ip else {
            warn!(%caller, "an IPv6 caller, and the TUN has no IPv6 address: refused");
            return;
        };
        let local = SocketAddr::new(local_ip, target.local_port);
        let now = self.now();
        match self
            .engine
            .connect_inbound(now, caller, local, self.config.open_timeout.into())
        {
            Ok(id) => {
                debug!(flow = %id, %caller, %local, "cloud caller");
                self.links.insert(id, link);
                self.pool.adopt(link);
                self.accepting.insert(
                    id,
                    Accepting {
                        channel: call.channel,
                        reply: call.reply,
                        forward: target.id,
                        local_port: target.local_port,
                    },
                );
            }
            Err(e) => warn!(%caller, %local, "cloud caller refused: {e}"),
        }
    }

    /// The local app answered a cloud caller: accept its channel and relay.
    fn accept_inbound(&mut self, id: FlowId) {
        let (Some(waiting), Some(key)) = (self.accepting.remove(&id), self.engine.flow_key(id))
        else {
            return;
        };
        // Accepting only queues a message for the session loop (it never waits).
        let _ = waiting.reply.accept().now_or_never();
        self.start_flow_tasks(id, key, waiting.channel);
    }

    fn send_to_writer(&mut self, id: FlowId, cmd: WriterCmd) {
        if let Some(w) = self.writers.get(&id) {
            // The queue holds max_inflight_msgs data messages plus EOF and close: the engine's
            // credit guarantees room. If it is ever full, the flow is broken: reset it.
            if w.try_send(cmd).is_err() {
                warn!(flow = %id, "writer queue full: resetting flow");
                self.engine.abort(id, CloseReason::RemoteReset);
            }
        }
    }

    fn open(&mut self, id: FlowId, key: FlowKey) {
        let pool = self.pool.clone();
        let tx = self.msgs_tx.clone();
        let timeout = self.config.open_timeout;
        let span = info_span!("flow", id = %id, src = %key.src, dst = %key.dst);
        tokio::spawn(
            async move {
                let msg = match pool.open(key.dst, key.src, timeout).await {
                    Ok((link, channel)) => {
                        debug!(slot = link.slot, "channel open");
                        FlowMsg::Opened(id, link, channel)
                    }
                    Err(e) => {
                        let reason = match e {
                            OpenError::ConnectFailed => CloseReason::OpenRefused,
                            OpenError::Prohibited => CloseReason::OpenProhibited,
                            OpenError::Timeout => CloseReason::OpenTimedOut,
                            OpenError::SessionLost => CloseReason::SessionLost,
                            _ => CloseReason::OpenRefused,
                        };
                        if matches!(e, OpenError::Prohibited) {
                            warn!("the jump host refused to forward: enable AllowTcpForwarding in its sshd_config");
                        } else {
                            debug!(error = ?e, "channel open failed");
                        }
                        FlowMsg::OpenFailed(id, reason)
                    }
                };
                let _ = tx.send(msg).await;
            }
            .instrument(span),
        );
    }

    fn start_flow_tasks(
        &mut self,
        id: FlowId,
        key: FlowKey,
        channel: russh::Channel<russh::client::Msg>,
    ) {
        let (mut read, write) = channel.split();
        let span = info_span!("flow", id = %id, src = %key.src, dst = %key.dst);
        let tx = self.msgs_tx.clone();
        let credit = Arc::new(Semaphore::new(READ_CREDIT));
        self.credits.insert(id, credit.clone());
        tokio::spawn(
            async move {
                let mut paced = true;
                loop {
                    let msg = match read.wait().await {
                        Some(ChannelMsg::Data { data }) => {
                            if paced {
                                let n = u32::try_from(data.len()).unwrap_or(u32::MAX);
                                match tokio::time::timeout(CREDIT_WAIT, credit.acquire_many(n))
                                    .await
                                {
                                    Ok(Ok(permit)) => permit.forget(),
                                    Ok(Err(_)) => break, // the flow is gone
                                    Err(_) => {
                                        debug!("the app is not reading: draining without pacing");
                                        paced = false;
                                    }
                                }
                            }
                            FlowMsg::Data(id, data)
                        }
                        Some(ChannelMsg::Eof) => FlowMsg::Eof(id),
                        Some(ChannelMsg::Close) | None => {
                            let _ = tx.send(FlowMsg::Closed(id)).await;
                            break;
                        }
                        Some(_) => continue,
                    };
                    if tx.send(msg).await.is_err() {
                        break;
                    }
                }
            }
            .instrument(span.clone()),
        );
        let (wtx, mut wrx) = mpsc::channel(self.config.engine.max_inflight_msgs + 2);
        self.writers.insert(id, wtx);
        let tx = self.msgs_tx.clone();
        tokio::spawn(
            async move {
                while let Some(cmd) = wrx.recv().await {
                    match cmd {
                        WriterCmd::Data(data) => {
                            let n = data.len();
                            if write.data_bytes(data).await.is_err() {
                                break;
                            }
                            if tx.send(FlowMsg::Sent(id, n)).await.is_err() {
                                break;
                            }
                        }
                        WriterCmd::Eof => {
                            if write.eof().await.is_err() {
                                break;
                            }
                        }
                        WriterCmd::Close => break,
                    }
                }
                let _ = write.close().await;
            }
            .instrument(span),
        );
        debug!(flow = %id, src = %key.src, dst = %key.dst, "flow open");
    }
}

/// The next cloud caller, or never when the session exposes nothing.
async fn recv_inbound(
    inbound: &mut Option<(mpsc::Receiver<Inbound>, Arc<Forwards>)>,
) -> Option<Inbound> {
    match inbound {
        Some((rx, _)) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// How long the loopback fallback waits for the local app.
const LOOPBACK_CONNECT: Duration = Duration::from_secs(2);

/// A cloud caller whose local app did not answer on the TUN address: try 127.0.0.1 (an app
/// bound to loopback only). The app then sees 127.0.0.1 as its peer, not the caller; the
/// exposed port's status says so. Refused there too, the channel is refused and the jump
/// host closes the caller's connection.
async fn loopback_fallback(waiting: Accepting, forwards: Arc<Forwards>) {
    let addr = SocketAddr::from(([127, 0, 0, 1], waiting.local_port));
    let tcp = tokio::time::timeout(LOOPBACK_CONNECT, tokio::net::TcpStream::connect(addr)).await;
    let Ok(Ok(tcp)) = tcp else {
        debug!(
            port = waiting.local_port,
            "nothing listens on the local port: caller refused"
        );
        let _ = waiting
            .reply
            .reject(russh::ChannelOpenFailure::ConnectFailed)
            .await;
        return;
    };
    if forwards.note_loopback(waiting.forward) {
        warn!(
            port = waiting.local_port,
            "the app listens on 127.0.0.1 only: cloud calls reach it over loopback and it sees 127.0.0.1 as their address (listen on 0.0.0.0 to see the callers' own)"
        );
    }
    let _ = tcp.set_nodelay(true);
    waiting.reply.accept().await;
    relay_loopback(waiting.channel, tcp).await;
}

/// Channel messages a loopback relay may hold for a slow app before it gives up on the call
/// (each at most one SSH packet, so about 64 MiB at worst).
const LOOPBACK_QUEUE: usize = 1024;

/// Relays a caller's channel and a loopback connection both ways, with half-close. The
/// channel is always drained (a channel left unread stalls its whole SSH connection) into
/// a bounded queue; an app that lets the queue fill is reset.
async fn relay_loopback(channel: russh::Channel<russh::client::Msg>, tcp: tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut read, write) = channel.split();
    let (mut tcp_read, mut tcp_write) = tcp.into_split();
    let (tx, mut rx) = mpsc::channel::<Option<Bytes>>(LOOPBACK_QUEUE);
    let (closed_tx, mut closed) = watch::channel(false);
    // Caller -> queue, always; true if the app fell too far behind.
    let drain = async move {
        let mut overflow = false;
        while let Some(msg) = read.wait().await {
            let item = match msg {
                ChannelMsg::Data { data } => Some(data),
                ChannelMsg::Eof => None,
                ChannelMsg::Close => break,
                _ => continue,
            };
            if tx.try_send(item).is_err() {
                warn!("the app behind a loopback-only port stopped reading: call reset");
                overflow = true;
                break;
            }
        }
        let _ = closed_tx.send(true);
        overflow
    };
    // Queue -> app; caller EOF becomes a shutdown of the app's read side.
    let to_app = async move {
        while let Some(item) = rx.recv().await {
            let ok = match item {
                Some(data) => tcp_write.write_all(&data).await.is_ok(),
                None => {
                    let _ = tcp_write.shutdown().await;
                    false
                }
            };
            if !ok {
                break;
            }
        }
    };
    // App -> caller, until the app's EOF or the caller is gone.
    let to_caller = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            tokio::select! {
                r = tcp_read.read(&mut buf) => match r {
                    Ok(0) => {
                        let _ = write.eof().await;
                        break;
                    }
                    Ok(n) => {
                        if write.data(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    Err(_) => break,
                },
                _ = async { drop(closed.wait_for(|c| *c).await) } => break,
            }
        }
    };
    let app_side = async { tokio::join!(to_app, to_caller) };
    tokio::pin!(drain, app_side);
    tokio::select! {
        overflow = &mut drain => {
            // The caller is gone (or the app is hopelessly behind): finish delivering what
            // is queued unless the app is the problem.
            if !overflow {
                app_side.await;
            }
        }
        _ = &mut app_side => {
            // The app closed both ways; the caller's side is closed below.
        }
    }
    let _ = write.close().await;
}
