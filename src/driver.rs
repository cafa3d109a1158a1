//! The driver: the one task that owns the [`Engine`], moving packets between it and the TUN
//! and bytes between it and SSH channels. It spawns no task per flow.
//!
//! ```text
//!            ┌──────────────── Driver task (owns Engine; no lock) ────────────────┐
//!  TUN ─recv─▶ handle_tun_packet ─▶ poll ─▶ poll_transmit ─send─▶ TUN             │
//!            │                        │                                            │
//!            │       Event::Open ─────┼─▶ opening: channel-open futures (bounded)  │
//!            │       Event::Data ─────┼─▶ per-flow outbox ─▶ one write future ─▶ SSH│
//!            │  channel reads ◀───────┴── woken flows only, while wants_data       │
//!            └────────────────────────────────────────────────────────────────────┘
//! ```
//!
//! Backpressure, both ways, through each flow's own SSH window:
//! - **Download.** A flow's channel is read only while the engine wants more for it
//!   ([`Engine::wants_data`]: its socket's send buffer plus at most
//!   [`PENDING_LOW`](crate::engine::PENDING_LOW) bytes);
//!   the patched russh re-opens the channel's SSH window only as the driver reads. An app that
//!   stops reading (a breakpoint, a GC pause) therefore stops its own flow at the jump host,
//!   costs at most its window in memory, and is never reset for being slow; every other
//!   flow of the connection goes on.
//! - **Upload.** The engine hands out at most `max_inflight` unwritten bytes per flow; each
//!   flow has one write in progress at a time, waiting for that channel's window only.
//!
//! Channel reads are driven by wakers, not tasks: each flow's channel registers a waker that
//! puts the flow on [`Ready`]; the driver reads only the flows on it.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use bytes::Bytes;
use futures::future::{AbortHandle, Abortable, BoxFuture};
use futures::stream::FuturesUnordered;
use futures::task::AtomicWaker;
use futures::{FutureExt, StreamExt};
use russh::client::Msg;
use russh::{ChannelMsg, ChannelReadHalf, ChannelWriteHalf};
use tokio::sync::watch;
use tokio::time::Instant as TokioInstant;
use tracing::{Instrument, debug, info_span, warn};

use crate::engine::{CloseReason, Engine, EngineConfig, Event, FlowId, FlowKey, RxPacket};
use crate::logging::bytes as human_bytes;
use crate::pool::{INBOUND_QUEUE, InboundCall, InboundCalls, LinkId, Placement, Pool};
use crate::repeats::Repeats;
use crate::reverse::{self, Forwards, Waiting};
use crate::ssh::OpenError;
use crate::tun::{Fault, Tun};

/// Packets read from the TUN per wake-up before the engine runs.
const TUN_BATCH: usize = 64;
/// Channel messages read from one flow before the driver turns to the next (fairness).
const READ_BATCH: usize = 16;
/// Longest a channel open is tracked once started. sshd answers every open (its own connect
/// gives up after about two minutes); past this the open is forgotten.
const OPEN_CAP: Duration = Duration::from_secs(300);
/// Repeated warnings of one kind are summarized over this window.
const WARN_WINDOW: Duration = Duration::from_secs(10);
/// Destinations whose channel opened within this long keep a reserve of open slots.
const ANSWERED_FOR: Duration = Duration::from_secs(600);
/// The most destinations remembered as having answered.
const ANSWERED_MAX: usize = 4096;
/// A flow that moved this much (both ways) is bulk: [`Placement::Pack`] avoids its link.
const HEAVY_BYTES: u64 = 1 << 20;
/// A flow that ended within this time, and was not bulk, was a short connection.
const SHORT_FLOW: Duration = Duration::from_secs(1);
/// Destinations whose flows' shape is remembered (see [`Driver::placement`]).
const SHAPES_MAX: usize = 4096;
/// After a TUN read failed for a passing reason, reading resumes after this pause (so a
/// condition that lasts does not spin).
const RECV_RETRY: Duration = Duration::from_millis(10);
/// Freed memory goes back to the system at most this often (see [`Trim`]).
const TRIM_EVERY: Duration = Duration::from_secs(2);

/// When to give freed memory back to the system: soon after flows close (what a burst of
/// flows leaves behind is their buffered channel data, freed in the middle of the heap where
/// the allocator does not return it by itself), at most every [`TRIM_EVERY`].
///
/// The release (`malloc_trim`) walks the whole heap: it runs on tokio's blocking pool, never
/// on the driver's task, so no flow waits for it; one at a time.
struct Trim {
    /// Flows closed since the last trim.
    pending: bool,
    not_before: TokioInstant,
    /// What gives the memory back ([`mse_vpn_platform::sys::release_free_memory`]).
    release: fn() -> bool,
    /// The release in progress.
    running: Option<tokio::task::JoinHandle<bool>>,
}

impl Trim {
    fn new(now: TokioInstant) -> Trim {
        Trim {
            pending: false,
            not_before: now,
            release: mse_vpn_platform::sys::release_free_memory,
            running: None,
        }
    }

    fn deadline(&self) -> Option<TokioInstant> {
        self.pending.then_some(self.not_before)
    }

    fn run(&mut self, now: TokioInstant) {
        if self.running.as_ref().is_some_and(|r| !r.is_finished()) {
            return; // the next one waits for it (still pending)
        }
        if self.pending && now >= self.not_before {
            self.pending = false;
            self.not_before = now + TRIM_EVERY;
            self.running = Some(tokio::task::spawn_blocking(self.release));
        }
    }
}

/// Driver settings.
#[derive(Clone, Debug)]
pub struct DriverConfig {
    /// Engine tunables (its `open_timeout` is how long an app waits for its channel).
    pub engine: EngineConfig,
    /// How long a local app may take to answer a cloud caller; also how long an open waits
    /// for an SSH connection when none is up.
    pub open_timeout: Duration,
    /// Channel opens that may be pending at the jump host at once (counting those whose app
    /// gave up): SYNs beyond it are reset at once ([`CloseReason::OpenLimit`]).
    pub max_opening: usize,
    /// The TUN's IPv4 address: cloud callers' connections are made to it.
    pub local_v4: std::net::Ipv4Addr,
    /// The TUN's IPv6 address, if it has one (for IPv6 callers).
    pub local_v6: Option<std::net::Ipv6Addr>,
    /// The memory budget the SSH connections count their channels' windows in: the engine
    /// learns those windows each turn and reports what it holds back
    /// ([`crate::budget`]).
    pub budget: Option<Arc<crate::budget::MemoryBudget>>,
}

/// Default for [`DriverConfig::max_opening`].
pub const DEFAULT_MAX_OPENING: usize = 1024;

/// Flows whose channel has something to read (set by their wakers).
struct Ready {
    flows: Mutex<Vec<FlowId>>,
    driver: AtomicWaker,
}

impl Ready {
    fn push(&self, id: FlowId) {
        self.flows
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(id);
        self.driver.wake();
    }

    fn take(&self) -> Vec<FlowId> {
        std::mem::take(&mut *self.flows.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Resolves once a flow is ready.
    fn wait(&self) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(|cx| {
            self.driver.register(cx.waker());
            if self
                .flows
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_empty()
            {
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        })
    }
}

/// The waker of one flow's channel: wakes the driver with the flow's id.
struct FlowWaker {
    id: FlowId,
    ready: Arc<Ready>,
}

impl Wake for FlowWaker {
    fn wake(self: Arc<Self>) {
        self.ready.push(self.id);
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.ready.push(self.id);
    }
}

/// What is written to a flow's channel, in order.
enum WriteCmd {
    Data(Bytes),
    Eof,
    Close,
}

/// What a write future reports.
struct Written {
    id: FlowId,
    /// Bytes of data written (0 for EOF / close), or `None` if the channel is gone.
    bytes: Option<usize>,
}

type WriteFuture = Abortable<BoxFuture<'static, Written>>;
type OpenFuture = BoxFuture<'static, (FlowId, Result<(LinkId, russh::Channel<Msg>), OpenError>)>;

/// A flow's lifetime figures, for the line logged when it ends.
struct FlowLog {
    since: TokioInstant,
    up: u64,
    down: u64,
}

impl FlowLog {
    fn new() -> FlowLog {
        FlowLog {
            since: TokioInstant::now(),
            up: 0,
            down: 0,
        }
    }
}

/// The I/O side of one flow whose channel is open.
struct FlowIo {
    link: LinkId,
    /// The channel's receiving half, until it reported its end.
    read: Option<ChannelReadHalf>,
    /// The waker `read` is polled with.
    waker: Waker,
    /// Reading stopped because the engine has no room (resumed by [`Engine::poll_room`]).
    paused: bool,
    write: Arc<ChannelWriteHalf<Msg>>,
    /// Writes waiting behind the one in progress.
    outbox: VecDeque<WriteCmd>,
    /// The write in progress.
    writing: Option<AbortHandle>,
    /// The engine ended the flow: the entry goes once the outbox (ending with the channel's
    /// close) is written.
    closing: bool,
    log: FlowLog,
    /// Counted as bulk on its link ([`Pool::mark_heavy`]).
    heavy: bool,
    /// The destination of an outbound flow, whose shape it teaches (see
    /// [`Driver::placement`]).
    dst: Option<SocketAddr>,
}

/// After bytes moved (counted in `log`): true once, when a flow reaches [`HEAVY_BYTES`] (it
/// is then bulk on its link, [`Pool::mark_heavy`]).
fn becomes_heavy(heavy: &mut bool, log: &FlowLog) -> bool {
    if *heavy || log.up + log.down < HEAVY_BYTES {
        return false;
    }
    *heavy = true;
    true
}

/// See [`Driver::placement`].
fn placement_of(shapes: &HashMap<SocketAddr, f32>, dst: SocketAddr) -> Placement {
    match shapes.get(&dst) {
        Some(short) if *short > 0.5 => Placement::Pack,
        _ => Placement::Spread,
    }
}

/// Counts one ended flow to `dst` in its destination's shape (see [`Driver::placement`]).
fn note_shape(shapes: &mut HashMap<SocketAddr, f32>, dst: SocketAddr, short: bool) {
    if shapes.len() >= SHAPES_MAX && !shapes.contains_key(&dst) {
        // A bound, not a cache policy: forgetting only costs the default placement.
        shapes.clear();
    }
    let shape = shapes.entry(dst).or_insert(0.0);
    *shape = 0.9 * *shape + if short { 0.1 } else { 0.0 };
}

/// Where the driver reads and writes packets: the TUN device, or a test's queues. Each
/// packet has the TUN's header (`EngineConfig::tun`) in front.
pub trait PacketIo: Send + Sync + 'static {
    /// Reads one packet into `buf`.
    fn recv(&self, buf: &mut [u8]) -> impl Future<Output = std::io::Result<usize>> + Send;
    /// Writes one packet.
    fn send(&self, packet: &[u8]) -> impl Future<Output = std::io::Result<usize>> + Send;
}

impl PacketIo for Tun {
    fn recv(&self, buf: &mut [u8]) -> impl Future<Output = std::io::Result<usize>> + Send {
        Tun::recv(self, buf)
    }

    fn send(&self, packet: &[u8]) -> impl Future<Output = std::io::Result<usize>> + Send {
        Tun::send(self, packet)
    }
}

/// The driver. See the module documentation.
///
/// Generic over its packet side ([`PacketIo`]: the TUN, or a test's queues). Its SSH side is
/// the [`Pool`] itself: channels are russh's own types, which only a real SSH session makes,
/// so in-process tests run the pool against an in-process SSH server (tests/inproc).
pub struct Driver<T: PacketIo = Tun> {
    engine: Engine,
    config: DriverConfig,
    tun: Arc<T>,
    pool: Arc<Pool>,
    /// Flows with an open channel.
    io: HashMap<FlowId, FlowIo>,
    /// Outbound flows waiting for their channel (gone from here when the app gives up; the
    /// open itself stays in `opening` until the jump host answers).
    waiting: HashMap<FlowId, FlowLog>,
    opening: FuturesUnordered<OpenFuture>,
    writes: FuturesUnordered<WriteFuture>,
    ready: Arc<Ready>,
    epoch: TokioInstant,
    stats: watch::Sender<crate::engine::EngineStats>,
    /// Cloud callers' channels (from the pool), and the table of exposed ports.
    inbound: Option<(InboundCalls, Arc<Forwards>)>,
    /// Cloud callers' channels waiting for their local app to answer.
    accepting: HashMap<FlowId, Waiting>,
    /// Flows that failed, by destination and reason: one warning per kind per window.
    failures: Repeats<(SocketAddr, CloseReason)>,
    /// Connections refused before becoming flows (flow limit), by reason.
    refusals: Repeats<CloseReason>,
    /// Destinations whose channel opened lately, with when: opens to them may use a reserve
    /// of `max_opening / 4` slots beyond the bound. Opens to silent destinations (a SYN
    /// flood) stay pending at the jump host until its own connect gives up (two minutes on
    /// Linux), whether or not their app still waits; the reserve keeps the services in use
    /// reachable meanwhile.
    answered: HashMap<SocketAddr, TokioInstant>,
    /// Per destination, how much its recent flows looked like short connections (an average
    /// of 1 for short, 0 for long or bulk, weighting the latest flow by a tenth).
    shapes: HashMap<SocketAddr, f32>,
    trim: Trim,
    /// TUN reads and writes that failed for a passing reason, by operation and `errno`:
    /// one warning per kind per window.
    tun_faults: Repeats<(&'static str, Option<i32>)>,
    /// Reading the TUN is paused until then after a passing failure.
    recv_resume: Option<TokioInstant>,
}

impl<T: PacketIo> Driver<T> {
    /// A driver moving flows between `tun` and the connections of `pool`.
    pub fn new(config: DriverConfig, tun: Arc<T>, pool: Arc<Pool>) -> Driver<T> {
        let epoch = TokioInstant::now();
        let engine = Engine::new(
            config.engine.clone(),
            smoltcp::time::Instant::from_micros(0),
            rand::random(),
        );
        Driver {
            engine,
            config,
            tun,
            pool,
            io: HashMap::new(),
            waiting: HashMap::new(),
            opening: FuturesUnordered::new(),
            writes: FuturesUnordered::new(),
            ready: Arc::new(Ready {
                flows: Mutex::new(Vec::new()),
                driver: AtomicWaker::new(),
            }),
            epoch,
            stats: watch::channel(Default::default()).0,
            inbound: None,
            accepting: HashMap::new(),
            failures: Repeats::new(WARN_WINDOW, 64),
            refusals: Repeats::new(WARN_WINDOW, 8),
            answered: HashMap::new(),
            shapes: HashMap::new(),
            trim: Trim::new(epoch),
            tun_faults: Repeats::new(WARN_WINDOW, 8),
            recv_resume: None,
        }
    }

    /// Also serves cloud callers (`--expose`): channels arriving on `rx` for the listeners in
    /// `forwards` become TCP connections to the local app.
    pub fn with_inbound(mut self, calls: InboundCalls, forwards: Arc<Forwards>) -> Driver<T> {
        self.inbound = Some((calls, forwards));
        self
    }

    /// Gives freed memory back with `release` instead of `malloc_trim` (for tests: a slow
    /// release shows that no flow waits for it).
    pub fn with_memory_release(mut self, release: fn() -> bool) -> Driver<T> {
        self.trim.release = release;
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
    /// all flows are reset on exit, and on a TUN error.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) -> std::io::Result<()> {
        let mut buf = self.engine.rx_buffer();
        // Every packet read has the TUN's header in front (see `EngineConfig::tun`).
        let header = self.config.engine.tun.header;
        let mut links = self.pool.subscribe();
        let ready = self.ready.clone();
        let result = loop {
            let now = self.now();
            let mut deadline = self
                .engine
                .poll_timeout(now)
                .map(|t| self.deadline(t))
                .unwrap_or_else(|| TokioInstant::now() + Duration::from_secs(3600));
            for t in [
                self.failures.poll_timeout(),
                self.refusals.poll_timeout(),
                self.tun_faults.poll_timeout(),
            ]
            .into_iter()
            .flatten()
            {
                deadline = deadline.min(TokioInstant::from_std(t));
            }
            if let Some(t) = self.recv_resume {
                if TokioInstant::now() >= t {
                    self.recv_resume = None;
                } else {
                    deadline = deadline.min(t);
                }
            }
            let reading = self.recv_resume.is_none();
            self.trim.run(TokioInstant::now());
            if let Some(t) = self.trim.deadline() {
                deadline = deadline.min(t);
            }
            tokio::select! {
                _ = shutdown.wait_for(|stop| *stop) => break Ok(()),
                Ok(()) = links.changed() => self.reset_lost_flows(),
                r = self.tun.recv(&mut buf), if reading => {
                    let n = match r {
                        Ok(n) => n,
                        Err(e) => match self.tun_failed("read", e) {
                            Some(e) => break Err(e),
                            None => continue,
                        },
                    };
                    // Each packet is read into a pooled buffer the engine keeps: no copy.
                    let now = self.now();
                    let packet = std::mem::replace(&mut buf, self.engine.rx_buffer());
                    self.engine.handle_tun_read(now, RxPacket { buf: packet, start: header, len: n });
                    let mut failed = None;
                    for _ in 1..TUN_BATCH {
                        match self.tun.recv(&mut buf).now_or_never() {
                            Some(Ok(n)) => {
                                let packet = std::mem::replace(&mut buf, self.engine.rx_buffer());
                                self.engine.handle_tun_read(
                                    now,
                                    RxPacket { buf: packet, start: header, len: n },
                                );
                            }
                            Some(Err(e)) => {
                                failed = self.tun_failed("read", e);
                                break;
                            }
                            None => break,
                        }
                    }
                    if let Some(e) = failed {
                        break Err(e);
                    }
                }
                () = ready.wait() => {}
                Some(done) = self.writes.next() => {
                    if let Ok(done) = done {
                        self.write_done(done);
                    }
                    while let Some(Some(done)) = self.writes.next().now_or_never() {
                        if let Ok(done) = done {
                            self.write_done(done);
                        }
                    }
                }
                Some((id, result)) = self.opening.next() => self.open_done(id, result),
                Some(call) = recv_inbound(&mut self.inbound) => {
                    self.handle_inbound(call);
                    for _ in 1..INBOUND_QUEUE {
                        match self.inbound.as_mut().and_then(|(calls, _)| calls.try_recv()) {
                            Some(call) => self.handle_inbound(call),
                            None => break,
                        }
                    }
                }
                _ = tokio::time::sleep_until(deadline) => {}
            }
            if let Err(e) = self.turn().await {
                break Err(e);
            }
        };
        // Stopping, or the TUN failed: every app gets a reset, every channel a close.
        let now = self.now();
        let reason = if result.is_ok() {
            CloseReason::Shutdown
        } else {
            CloseReason::SessionLost
        };
        self.engine.reset_all(now, reason);
        let _ = self.turn().await;
        result
    }

    /// A link went down: reset the flows that were on it (their channels are gone).
    fn reset_lost_flows(&mut self) {
        let lost: Vec<FlowId> = self
            .io
            .iter()
            .filter(|(_, io)| !io.closing && !self.pool.is_live(io.link))
            .map(|(id, _)| *id)
            .collect();
        if !lost.is_empty() {
            debug!(
                flows = lost.len(),
                "resetting the flows of a lost SSH connection"
            );
        }
        let now = self.now();
        for id in lost {
            self.engine.abort(now, id, CloseReason::SessionLost);
        }
    }

    /// Reads the ready flows' channels, runs the engine, carries out what it asks for, until
    /// nothing moves; then writes the packets out.
    async fn turn(&mut self) -> std::io::Result<()> {
        for _ in 0..8 {
            // Writes and opens that finished meanwhile (safe to poll without the task's waker:
            // the select in `run` polls both sets again before it sleeps).
            while let Some(Some(done)) = self.writes.next().now_or_never() {
                if let Ok(done) = done {
                    self.write_done(done);
                }
            }
            while let Some(Some((id, result))) = self.opening.next().now_or_never() {
                self.open_done(id, result);
            }
            let read = self.read_ready();
            let now = self.now();
            if let Some(b) = &self.config.budget {
                self.engine.handle_windows(b.windows());
            }
            self.engine.poll(now);
            let mut events = 0;
            while let Some(event) = self.engine.poll_event() {
                self.handle_event(event);
                events += 1;
            }
            let mut resumed = 0;
            while let Some(id) = self.engine.poll_room() {
                if let Some(io) = self.io.get_mut(&id)
                    && io.paused
                {
                    io.paused = false;
                    self.ready.push(id);
                    resumed += 1;
                }
            }
            while let Some(packet) = self.engine.poll_transmit() {
                match self.tun.send(&packet).await {
                    Ok(_) => self.engine.recycle(packet),
                    Err(e) => {
                        if let Some(e) = self.tun_failed("write", e) {
                            return Err(e);
                        }
                        self.engine.handle_transmit_dropped(packet);
                    }
                }
            }
            if read == 0 && events == 0 && resumed == 0 {
                break;
            }
        }
        self.log_summaries();
        let stats = self.engine.stats();
        if let Some(b) = &self.config.budget {
            b.set_engine(stats.buffered);
        }
        self.stats.send_replace(stats);
        Ok(())
    }

    /// Reads what the ready flows' channels hold, as far as the engine takes it. Returns the
    /// number of channel messages read.
    fn read_ready(&mut self) -> usize {
        let mut total = 0;
        for id in self.ready.take() {
            let now = self.now();
            let Some(io) = self.io.get_mut(&id) else {
                continue;
            };
            if io.paused || io.closing {
                continue;
            }
            let mut cx = Context::from_waker(&io.waker);
            let mut n = 0;
            while let Some(read) = io.read.as_mut() {
                if n == READ_BATCH {
                    // More may be there: come back after the others.
                    self.ready.push(id);
                    break;
                }
                if !self.engine.wants_data(id) {
                    io.paused = true;
                    break;
                }
                match read.poll_wait(&mut cx) {
                    Poll::Pending => break,
                    Poll::Ready(Some(ChannelMsg::Data { data })) => {
                        n += 1;
                        io.log.down += data.len() as u64;
                        if becomes_heavy(&mut io.heavy, &io.log) {
                            self.pool.mark_heavy(io.link);
                        }
                        self.engine.handle_channel_data(now, id, data);
                    }
                    Poll::Ready(Some(ChannelMsg::Eof)) => {
                        n += 1;
                        self.engine.handle_channel_eof(now, id);
                    }
                    Poll::Ready(Some(ChannelMsg::Close) | None) => {
                        n += 1;
                        io.read = None;
                        self.engine.handle_channel_closed(now, id);
                    }
                    Poll::Ready(Some(_)) => n += 1,
                }
            }
            total += n;
        }
        total
    }

    fn handle_event(&mut self, event: Event) {
        match event {
            Event::Open { id, key } => self.open(id, key),
            Event::Connected { id } => self.accept_inbound(id),
            Event::Data { id, data } => {
                if let Some(io) = self.io.get_mut(&id) {
                    io.log.up += data.len() as u64;
                    if becomes_heavy(&mut io.heavy, &io.log) {
                        self.pool.mark_heavy(io.link);
                    }
                }
                self.queue_write(id, WriteCmd::Data(data));
            }
            Event::Eof { id } => self.queue_write(id, WriteCmd::Eof),
            Event::Refused { key, reason } => {
                if self.refusals.hit(std::time::Instant::now(), reason) {
                    warn!(src = %key.src, dst = %key.dst, "connection refused: {reason}");
                }
            }
            Event::Close { id, key, reason } => self.close(id, key, reason),
            Event::CloseNow { id } => {
                if let Some(io) = self.io.get_mut(&id) {
                    debug!(flow = %id, "closing flow: its flush ran out of time");
                    discard(io);
                    io.outbox.push_back(WriteCmd::Close);
                    self.start_write(id);
                }
            }
        }
    }

    /// The engine ended a flow: close its channel (after the writes already queued, if it
    /// ended normally) and log one line for it.
    fn close(&mut self, id: FlowId, key: FlowKey, reason: CloseReason) {
        self.trim.pending = true;
        if let Some(waiting) = self.accepting.remove(&id) {
            self.pool.release(waiting.call.link);
            match (&self.inbound, reason) {
                // Nothing answered on the TUN address: an app listening on loopback only (as
                // `ssh -R` users expect to work) is still reached there.
                (Some((_, forwards)), CloseReason::LocalRefused) => {
                    tokio::spawn(
                        reverse::loopback_fallback(waiting, forwards.clone())
                            .instrument(info_span!("flow", id = %id, dst = %key.dst)),
                    );
                }
                // The jump host closes the caller's connection.
                _ => waiting.refuse(),
            }
        }
        let log = match self.io.get_mut(&id) {
            Some(io) => {
                io.closing = true;
                io.read = None;
                self.pool.release(io.link);
                if io.heavy {
                    self.pool.unmark_heavy(io.link);
                }
                if let Some(dst) = io.dst {
                    let short = !io.heavy && io.log.since.elapsed() < SHORT_FLOW;
                    note_shape(&mut self.shapes, dst, short);
                }
                if !reason.flushes() {
                    // A reset: what was not written yet is discarded.
                    discard(io);
                }
                io.outbox.push_back(WriteCmd::Close);
                let log = std::mem::replace(&mut io.log, FlowLog::new());
                self.start_write(id);
                Some(log)
            }
            None => self.waiting.remove(&id),
        };
        self.log_close(id, key, reason, log);
    }

    fn log_close(&mut self, id: FlowId, key: FlowKey, reason: CloseReason, log: Option<FlowLog>) {
        let span = info_span!("flow", id = %id, src = %key.src, dst = %key.dst);
        let _enter = span.enter();
        let (secs, up, down) = log.map_or((0.0, 0, 0), |l| {
            (l.since.elapsed().as_secs_f64(), l.up, l.down)
        });
        if reason == CloseReason::OpenLimit {
            // A local condition, not the destination's: one line per window for all of them.
            if self.refusals.hit(std::time::Instant::now(), reason) {
                warn!("connection refused: {reason}");
            }
        } else if is_failure(reason)
            && self
                .failures
                .hit(std::time::Instant::now(), (key.dst, reason))
        {
            warn!("flow to {} failed: {reason}", key.dst);
        }
        debug!(
            "closed ({reason}) after {secs:.3} s: {} up, {} down",
            human_bytes(up),
            human_bytes(down)
        );
    }

    /// A TUN read or write failed: the error if the device is gone (the session ends);
    /// otherwise it is counted and warned about (once per kind per window), a failed write's
    /// packet is dropped, and reading pauses for [`RECV_RETRY`].
    fn tun_failed(&mut self, op: &'static str, e: std::io::Error) -> Option<std::io::Error> {
        if Fault::of(&e) == Fault::Gone {
            return Some(e);
        }
        if op == "read" {
            self.engine.handle_receive_failed();
            self.recv_resume = Some(TokioInstant::now() + RECV_RETRY);
        }
        if self
            .tun_faults
            .hit(std::time::Instant::now(), (op, e.raw_os_error()))
        {
            warn!("TUN {op} failed ({e}); the packet is dropped, the session goes on");
        }
        None
    }

    /// Logs the summaries of repeated warnings whose window ended.
    fn log_summaries(&mut self) {
        let now = std::time::Instant::now();
        for s in self.tun_faults.poll(now) {
            match &s.kind {
                Some((op, _)) => warn!("TUN {op} failures: {}", s.tail()),
                None => warn!("TUN failures: {}", s.tail()),
            }
        }
        for s in self.failures.poll(now) {
            match &s.kind {
                Some((dst, reason)) => warn!("flow to {dst} failed: {reason}: {}", s.tail()),
                None => warn!("flows to other destinations failed: {}", s.tail()),
            }
        }
        for s in self.refusals.poll(now) {
            match &s.kind {
                Some(reason) => warn!("connections refused: {reason}: {}", s.tail()),
                None => warn!("connections refused: {}", s.tail()),
            }
        }
    }

    fn queue_write(&mut self, id: FlowId, cmd: WriteCmd) {
        if let Some(io) = self.io.get_mut(&id)
            && !io.closing
        {
            io.outbox.push_back(cmd);
            self.start_write(id);
        }
    }

    /// Starts the flow's next write if none is in progress.
    fn start_write(&mut self, id: FlowId) {
        let Some(io) = self.io.get_mut(&id) else {
            return;
        };
        if io.writing.is_some() {
            return;
        }
        let Some(cmd) = io.outbox.pop_front() else {
            if io.closing {
                self.release(id);
            }
            return;
        };
        let write = io.write.clone();
        let fut: BoxFuture<'static, Written> = match cmd {
            WriteCmd::Data(data) => async move {
                let n = data.len();
                let ok = write.data_bytes(data).await.is_ok();
                Written {
                    id,
                    bytes: ok.then_some(n),
                }
            }
            .boxed(),
            WriteCmd::Eof => async move {
                let ok = write.eof().await.is_ok();
                Written {
                    id,
                    bytes: ok.then_some(0),
                }
            }
            .boxed(),
            WriteCmd::Close => async move {
                let _ = write.close().await;
                Written { id, bytes: None }
            }
            .boxed(),
        };
        let (fut, handle) = futures::future::abortable(fut);
        io.writing = Some(handle);
        self.writes.push(fut);
    }

    /// Lets go of the channel of a flow that ended.
    fn release(&mut self, id: FlowId) {
        self.io.remove(&id);
        self.engine.handle_close_done(id);
    }

    fn write_done(&mut self, done: Written) {
        let Some(io) = self.io.get_mut(&done.id) else {
            return;
        };
        io.writing = None;
        match done.bytes {
            Some(n) => {
                if n > 0 {
                    self.engine.handle_sent(done.id, n);
                }
                self.start_write(done.id);
            }
            None if io.closing => {
                // The close went out (or the channel was already gone).
                self.release(done.id);
            }
            None => {
                // The channel is gone under a write: the flow cannot go on.
                let now = self.now();
                self.engine.abort(now, done.id, CloseReason::RemoteReset);
            }
        }
    }

    /// Starts opening a flow's channel, unless too many opens are pending at the jump host.
    fn open(&mut self, id: FlowId, key: FlowKey) {
        let now = self.now();
        let answered = self
            .answered
            .get(&key.dst)
            .is_some_and(|at| at.elapsed() < ANSWERED_FOR);
        let limit = if answered {
            self.config.max_opening + self.config.max_opening.div_ceil(4)
        } else {
            self.config.max_opening
        };
        if self.opening.len() >= limit {
            self.engine
                .handle_open_failed(now, id, CloseReason::OpenLimit);
            return;
        }
        self.waiting.insert(id, FlowLog::new());
        let pool = self.pool.clone();
        let link_wait = self.config.open_timeout;
        let placement = self.placement(key.dst);
        let span = info_span!("flow", id = %id, src = %key.src, dst = %key.dst);
        self.opening.push(
            async move {
                let result = pool
                    .open(key.dst, key.src, placement, link_wait, OPEN_CAP)
                    .await;
                (id, result)
            }
            .instrument(span)
            .boxed(),
        );
    }

    /// The jump host answered a channel open.
    fn open_done(&mut self, id: FlowId, result: Result<(LinkId, russh::Channel<Msg>), OpenError>) {
        let now = self.now();
        match result {
            Ok((link, channel)) => {
                if let Some(key) = self.engine.flow_key(id) {
                    self.note_answered(key.dst);
                }
                if !self.waiting.contains_key(&id) || self.engine.flow_key(id).is_none() {
                    self.waiting.remove(&id);
                    // The app gave up (or timed out) while the jump host was connecting:
                    // close the channel at once, so its connection in the VPC goes too.
                    self.pool.release(link);
                    tokio::spawn(async move {
                        let _ = channel.close().await;
                    });
                    return;
                }
                let dst = self.engine.flow_key(id).map(|k| k.dst);
                self.start_io(id, link, channel);
                if let Some(io) = self.io.get_mut(&id) {
                    io.dst = dst;
                }
                self.engine.handle_open_ok(now, id);
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
                    warn!(
                        "the jump host refused to forward: enable AllowTcpForwarding in its sshd_config"
                    );
                }
                if self.waiting.contains_key(&id) {
                    self.engine.handle_open_failed(now, id, reason);
                }
            }
        }
    }

    /// Remembers that `dst` answered an open (forgetting the oldest when full).
    /// Where a new flow to `dst` goes among the SSH connections. A destination whose recent
    /// flows were short connections (a service called with a new connection per request, a
    /// health check, a registry lookup) gets its flows packed on one connection, away from
    /// bulk ones: sshd then serves many of them per wake-up (measured with
    /// `wrk -H 'Connection: close'`: sshd's CPU per request 30 % lower than with the flows
    /// spread over four connections, and throughput up to `ssh -L`'s). Other destinations,
    /// and those not seen yet, get theirs spread, so parallel bulk flows use several sshd
    /// processes.
    fn placement(&self, dst: SocketAddr) -> Placement {
        placement_of(&self.shapes, dst)
    }

    fn note_answered(&mut self, dst: SocketAddr) {
        let now = TokioInstant::now();
        if self.answered.len() >= ANSWERED_MAX && !self.answered.contains_key(&dst) {
            self.answered.retain(|_, at| at.elapsed() < ANSWERED_FOR);
            if self.answered.len() >= ANSWERED_MAX
                && let Some(oldest) = self
                    .answered
                    .iter()
                    .min_by_key(|(_, at)| **at)
                    .map(|(d, _)| *d)
            {
                self.answered.remove(&oldest);
            }
        }
        self.answered.insert(dst, now);
    }

    /// A flow's channel is open: register it for reading and writing.
    fn start_io(&mut self, id: FlowId, link: LinkId, channel: russh::Channel<Msg>) {
        let log = self.waiting.remove(&id).unwrap_or_else(FlowLog::new);
        let (read, write) = channel.split();
        let waker = Waker::from(Arc::new(FlowWaker {
            id,
            ready: self.ready.clone(),
        }));
        self.io.insert(
            id,
            FlowIo {
                link,
                read: Some(read),
                waker,
                paused: false,
                write: Arc::new(write),
                outbox: VecDeque::new(),
                writing: None,
                closing: false,
                log,
                heavy: false,
                dst: None,
            },
        );
        // Data may already wait in the channel.
        self.ready.push(id);
    }

    /// A cloud caller reached an exposed port: connect to the local app from the caller's
    /// address (where, [`Forwards::route`] decides). The channel is accepted once the app
    /// answers ([`Event::Connected`]).
    fn handle_inbound(&mut self, call: InboundCall) {
        let Some((_, forwards)) = &self.inbound else {
            return;
        };
        let route = match forwards.route(&call, self.config.local_v4, self.config.local_v6) {
            Ok(route) => route,
            Err(refused) => {
                // Dropping the call refuses its channel: the jump host closes the caller.
                debug!(port = call.listen_port, "cloud caller refused: {refused}");
                return;
            }
        };
        let now = self.now();
        match self.engine.connect_inbound(
            now,
            route.caller,
            route.local,
            self.config.open_timeout.into(),
        ) {
            Ok(id) => {
                debug!(flow = %id, caller = %route.caller, local = %route.local, "cloud caller");
                self.pool.adopt(call.link);
                self.waiting.insert(id, FlowLog::new());
                self.accepting.insert(id, Waiting { call, route });
            }
            Err(e) => {
                warn!(caller = %route.caller, local = %route.local, "cloud caller refused: {e}")
            }
        }
    }

    /// The local app answered a cloud caller: accept its channel and relay.
    fn accept_inbound(&mut self, id: FlowId) {
        let Some(waiting) = self.accepting.remove(&id) else {
            return;
        };
        let link = waiting.call.link;
        if self.engine.flow_key(id).is_none() {
            self.pool.release(link);
            return;
        }
        // Accepting only queues a message for the session loop (it never waits).
        let _ = waiting.call.reply.accept().now_or_never();
        self.start_io(id, link, waiting.call.channel);
    }
}

/// Drops what a flow's channel was still to write, the write in progress included.
fn discard(io: &mut FlowIo) {
    io.outbox.clear();
    if let Some(w) = io.writing.take() {
        w.abort();
    }
}

/// Failures worth a (rate-limited) warning; every other end of a flow is a debug line.
fn is_failure(reason: CloseReason) -> bool {
    matches!(
        reason,
        CloseReason::OpenRefused
            | CloseReason::OpenProhibited
            | CloseReason::OpenTimedOut
            | CloseReason::OpenLimit
            | CloseReason::FlowLimit
    )
}

/// The next cloud caller, or never when the session exposes nothing.
async fn recv_inbound(inbound: &mut Option<(InboundCalls, Arc<Forwards>)>) -> Option<InboundCall> {
    match inbound {
        Some((calls, _)) => calls.recv().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_destination_is_packed_once_most_of_its_recent_flows_were_short() {
        let mut shapes = HashMap::new();
        let web: SocketAddr = "10.0.0.10:80".parse().unwrap();
        let bulk: SocketAddr = "10.0.0.10:5201".parse().unwrap();
        let pack =
            |shapes: &HashMap<SocketAddr, f32>, dst| placement_of(shapes, dst) == Placement::Pack;
        assert!(!pack(&shapes, web), "unknown destinations are spread");
        for _ in 0..6 {
            note_shape(&mut shapes, web, true);
        }
        assert!(!pack(&shapes, web), "six short flows are not enough yet");
        note_shape(&mut shapes, web, true);
        assert!(pack(&shapes, web), "seven are");
        // Long or bulk flows to it move it back to spreading, a few at a time.
        for _ in 0..3 {
            note_shape(&mut shapes, web, false);
        }
        assert!(!pack(&shapes, web));
        note_shape(&mut shapes, bulk, false);
        assert!(!pack(&shapes, bulk));
        // The table is bounded.
        for i in 0..SHAPES_MAX as u16 + 10 {
            note_shape(&mut shapes, SocketAddr::from(([10, 1, 0, 1], i)), true);
        }
        assert!(shapes.len() <= SHAPES_MAX);
    }
}
