//! The driver: the one task that owns both sans-IO cores, the [`Engine`] (packets ↔ byte
//! streams) and the [`Relay`] (flows ↔ channels, and every decision about them): the loop
//! between them and the world. It decides nothing: it waits on the TUN, the pool's links,
//! what is in flight ([`Inflight`]: channel opens, host connects and writes, cloud callers),
//! the channels' and UDP sockets' wakers and one timer (the earlier `poll_timeout` of the two
//! cores), hands each to its core, and carries out what the relay commands. No task per
//! flow, no lock, no flow table.
//!
//! ```text
//!  TUN ─recv─▶ Engine ─events─▶ Relay ─commands─▶ channel opens, host connects, UDP sockets,
//!   ◀──send── poll_transmit  ▲          │          writes, accepts, refusals, trims, log lines
//!                            └─ OpenOk, Deliver, Reset, Sent, CloseDone, ... (ToEngine)
//!  reads (woken flows, UDP sockets), opens, connects, writes done, cloud callers ──▶ Relay
//! ```

use std::io;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use futures::FutureExt;
use tokio::sync::watch;
use tokio::time::Instant as TokioInstant;

use crate::channel::{CallReply, Done, FlowChan, Inflight};
use crate::engine::{Engine, EngineConfig, EngineStats, RxPacket};
use crate::pool::{InboundCalls, Pool};
use crate::relay::{Command, DirectConfig, Relay, RelayConfig, TunOp};
use crate::reverse::Forwards;
use crate::tun::Tun;

pub use crate::relay::DEFAULT_MAX_OPENING;
pub use crate::tun::PacketIo;

/// Packets read from the TUN per wake-up before the engine runs.
const TUN_BATCH: usize = 64;
/// Channel messages read from one flow before the driver turns to the next (fairness).
const READ_BATCH: usize = 16;

/// Driver settings.
#[derive(Clone, Debug)]
pub struct DriverConfig {
    /// Engine tunables (its `open_timeout` is how long an app waits for its channel).
    pub engine: EngineConfig,
    /// See [`RelayConfig::open_timeout`].
    pub open_timeout: Duration,
    /// See [`RelayConfig::max_opening`].
    pub max_opening: usize,
    /// See [`RelayConfig::local_v4`].
    pub local_v4: std::net::Ipv4Addr,
    /// See [`RelayConfig::local_v6`].
    pub local_v6: Option<std::net::Ipv6Addr>,
    /// See [`RelayConfig::budget`].
    pub budget: Option<Arc<crate::budget::MemoryBudget>>,
    /// See [`RelayConfig::direct`] (it also has the engine hand over UDP datagrams).
    pub direct: Option<DirectConfig>,
}

/// The driver. See the module documentation. Generic over its packet side ([`PacketIo`]:
/// the TUN, or a test's queues); its SSH side is the [`Pool`].
pub struct Driver<T: PacketIo = Tun> {
    engine: Engine,
    relay: Relay<FlowChan, CallReply>,
    tun: Arc<T>,
    pool: Arc<Pool>,
    /// The TUN's header in front of each packet read (see `EngineConfig::tun`).
    header: usize,
    /// Channel opens and writes in flight, cloud callers, the memory release.
    inflight: Inflight,
    epoch: TokioInstant,
    stats: watch::Sender<EngineStats>,
}

impl<T: PacketIo> Driver<T> {
    /// A driver moving flows between `tun` and the connections of `pool`.
    pub fn new(config: DriverConfig, tun: Arc<T>, pool: Arc<Pool>) -> Driver<T> {
        let epoch = TokioInstant::now();
        let mut engine = config.engine;
        engine.datagrams |= config.direct.is_some();
        let relay = RelayConfig {
            max_opening: config.max_opening,
            open_timeout: config.open_timeout,
            local_v4: config.local_v4,
            local_v6: config.local_v6,
            budget: config.budget,
            direct: config.direct,
            trim_after: crate::relay::TRIM_AFTER_BURST,
        };
        Driver {
            header: engine.tun.header,
            engine: Engine::new(engine, smoltcp::time::Instant::ZERO, rand::random()),
            relay: Relay::new(relay, epoch.into_std()),
            tun,
            pool,
            inflight: Inflight::default(),
            epoch,
            stats: watch::channel(Default::default()).0,
        }
    }

    /// Also serves cloud callers (`--expose`): channels arriving on `calls` for the
    /// listeners in `forwards` become TCP connections to the local app.
    pub fn with_inbound(mut self, calls: InboundCalls, forwards: Arc<Forwards>) -> Driver<T> {
        self.inflight.with_inbound(calls, forwards);
        self
    }

    /// Gives freed memory back with `release` instead of `malloc_trim` (for tests: a slow
    /// release shows that no flow waits for it).
    pub fn with_memory_release(mut self, release: fn() -> bool) -> Driver<T> {
        self.inflight.with_memory_release(release);
        self
    }

    /// A receiver of the engine's counters, updated as the driver runs.
    pub fn stats(&self) -> watch::Receiver<EngineStats> {
        self.stats.subscribe()
    }

    /// Now, for the engine and for the relay.
    fn now(&self) -> (smoltcp::time::Instant, std::time::Instant) {
        let now = TokioInstant::now();
        let micros = now.saturating_duration_since(self.epoch).as_micros() as i64;
        (smoltcp::time::Instant::from_micros(micros), now.into_std())
    }

    /// When the earlier of the two cores wants to run again.
    fn deadline(&mut self) -> TokioInstant {
        let micros = |t: smoltcp::time::Instant| t.total_micros().max(0) as u64;
        let engine = self.engine.poll_timeout(self.now().0);
        let engine = engine.map(|t| self.epoch + Duration::from_micros(micros(t)));
        let relay = self.relay.poll_timeout().map(TokioInstant::from_std);
        let far = TokioInstant::now() + Duration::from_secs(3600);
        engine.into_iter().chain(relay).min().unwrap_or(far)
    }

    /// Runs until `shutdown` fires. Flows on a lost SSH connection are reset when it goes;
    /// all flows are reset on exit, and on a TUN error.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) -> io::Result<()> {
        let mut buf = self.engine.rx_buffer();
        let mut links = self.pool.subscribe();
        let ready = self.inflight.ready.clone();
        let result = loop {
            let deadline = self.deadline();
            tokio::select! {
                _ = shutdown.wait_for(|stop| *stop) => break Ok(()),
                Ok(()) = links.changed() => {
                    self.relay.handle_links(self.now().1, |link| self.pool.is_live(link));
                }
                r = self.tun.recv(&mut buf), if self.relay.reading_tun() => {
                    if let Err(e) = self.read_tun(r, &mut buf) {
                        break Err(e);
                    }
                }
                () = ready.wait() => {}
                done = std::future::poll_fn(|cx| self.inflight.poll_done(cx)) => self.done(done),
                _ = tokio::time::sleep_until(deadline) => {}
            }
            if let Err(e) = self.turn().await {
                break Err(e);
            }
        };
        // Stopping, or the TUN failed: every app gets a reset, every channel a close.
        self.relay.handle_stop(result.is_err());
        let _ = self.turn().await;
        result
    }

    /// Hands the packet just read, and those that follow at once (up to [`TUN_BATCH`]), to
    /// the engine. Each is read into a pooled buffer the engine keeps: no copy.
    fn read_tun(&mut self, first: io::Result<usize>, buf: &mut Vec<u8>) -> io::Result<()> {
        let ((at, now), start, mut read) = (self.now(), self.header, first);
        for _ in 0..TUN_BATCH {
            match read {
                Ok(len) => {
                    let buf = std::mem::replace(buf, self.engine.rx_buffer());
                    self.engine
                        .handle_tun_read(at, RxPacket { buf, start, len });
                }
                Err(e) if self.relay.handle_tun_failed(now, TunOp::Read, &e) => {
                    self.engine.handle_receive_failed();
                    return Ok(());
                }
                Err(e) => return Err(e),
            }
            match self.tun.recv(buf).now_or_never() {
                Some(next) => read = next,
                None => break,
            }
        }
        Ok(())
    }

    /// Runs the cores until nothing moves (what finished meanwhile, channel reads of the
    /// ready flows, the engine, what the relay commands); then writes the packets out.
    async fn turn(&mut self) -> io::Result<()> {
        for _ in 0..8 {
            while let Some(done) = self.inflight.done_now() {
                self.done(done);
            }
            let read = self.read_ready();
            let (at, now) = self.now();
            self.relay.handle_tick(now);
            self.carry_out();
            self.engine.poll(at);
            let mut events = 0;
            while let Some(event) = self.engine.poll_event() {
                self.relay.handle_event(now, event);
                self.carry_out();
                events += 1;
            }
            let mut resumed = 0;
            while let Some(id) = self.engine.poll_room() {
                resumed += usize::from(self.relay.handle_room(id));
            }
            self.carry_out();
            while let Some(packet) = self.engine.poll_transmit() {
                match self.tun.send(&packet).await {
                    Ok(_) => self.engine.recycle(packet),
                    Err(e) if self.relay.handle_tun_failed(now, TunOp::Write, &e) => {
                        self.engine.handle_transmit_dropped(packet);
                        self.carry_out();
                    }
                    Err(e) => return Err(e),
                }
            }
            if read == 0 && events == 0 && resumed == 0 {
                break;
            }
        }
        let stats = self.engine.stats();
        self.relay.handle_stats(&stats);
        self.stats.send_replace(stats);
        Ok(())
    }

    /// Reads the ready flows' channels as far as the relay lets it (only while the engine
    /// takes more), and the direct path's UDP sockets that woke. Returns the number of
    /// messages read.
    fn read_ready(&mut self) -> usize {
        let (now, relay) = (self.now().1, &mut self.relay);
        let mut total = (self.inflight.udp).recv(|id, got| relay.handle_udp(now, id, got));
        'flows: for id in self.inflight.ready.take() {
            for _ in 0..READ_BATCH {
                let wants = self.engine.wants_data(id);
                let Some(channel) = self.relay.reader(id, wants) else {
                    continue 'flows;
                };
                let Poll::Ready(received) = channel.read(id, &self.inflight.ready) else {
                    continue 'flows;
                };
                total += 1;
                self.relay.handle_read(now, id, received);
                self.carry_out();
            }
            // More may be there: come back after the others.
            self.inflight.ready.push(id);
        }
        total
    }

    /// Something the driver waited for: to the relay.
    fn done(&mut self, done: Done) {
        let (at, now) = self.now();
        match done {
            Done::Opened(id, Ok((link, channel))) => {
                self.relay.handle_opened(now, id, link, channel)
            }
            Done::Opened(id, Err(e)) => self.relay.handle_open_failed(now, id, e),
            Done::Connected(id, r) => self.relay.handle_connected(now, id, r),
            Done::Written(id, written) => self.relay.handle_written(now, id, written),
            Done::Call(call) => {
                let engine = &mut self.engine;
                self.relay.handle_call(now, call, |caller, local, timeout| {
                    engine.connect_inbound(at, caller, local, timeout.into())
                });
            }
            Done::Trimmed => self.relay.handle_trimmed(),
        }
        self.carry_out();
    }

    /// Carries out what the relay commands, in order.
    fn carry_out(&mut self) {
        let (at, now) = self.now();
        while let Some(command) = self.relay.poll() {
            match command {
                Command::Engine(call) => call.apply(&mut self.engine, at),
                Command::Channel(id, op) => {
                    if let Some(channel) = self.relay.channel_mut(id) {
                        self.inflight.channel(channel, id, op);
                    }
                }
                // I/O only: opens, connects, UDP sockets (what they give goes to the relay), ...
                other => (self.inflight).carry_out(&self.pool, other, |id, got| {
                    self.relay.handle_udp(now, id, got)
                }),
            }
        }
    }
}
