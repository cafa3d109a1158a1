//! The relay: the second sans-IO core, beside the [`engine`](crate::engine). The engine turns
//! packets into byte streams; the relay owns each flow's *channel side* and every decision
//! about it that is not TCP: when a channel is opened and on which kind of SSH connection
//! (admission, with a reserve for destinations that answered lately; placement learned per
//! destination; bulk flows counted per link), what is written to the channel and in what
//! order (one write in progress per flow), when the channel is read (only while the engine
//! takes more), what a refused open, a lost link, a late confirmation or a flush that ran out
//! of time does, where a cloud caller goes (and the loopback fallback), which warnings are
//! logged (rate-limited, [`Note`]), when freed memory is given back, and the memory budget's
//! accounting. With the direct path on ([`RelayConfig::direct`], `mse-vpn run`), also which
//! flows leave through this host's own sockets instead of SSH ([`Command::Connect`]) and the
//! UDP NAT table ([`Command::Udp`]): see [`direct`].
//!
//! ```text
//!  engine events ──handle_event──▶ ┌───────┐ ──poll──▶ Command: to the pool (Open, Link),
//!  pool answers ──handle_opened───▶ │ Relay │           to a channel (Write, Accept, Refuse,
//!  channel reads ─handle_read─────▶ │       │           Drop, ...), to the engine (OpenOk,
//!  writes done ──handle_written───▶ │       │           Deliver, Reset, Sent, CloseDone,
//!  cloud callers ─handle_call─────▶ └───────┘           ...), Trim, Note (a log line)
//!  time ──handle_tick(now)──▶        poll_timeout() ──▶ when to tick next
//! ```
//!
//! Like quinn-proto's `Connection`: events in through `handle_*(now, ..)`, commands out
//! through [`Relay::poll`], the next deadline from [`Relay::poll_timeout`]. It never touches
//! a socket, a task, the clock, the TUN or russh: a channel is an opaque handle `C` and a
//! cloud caller's reply an opaque handle `R`, kept for the driver and handed back in
//! commands; time is an argument. So every policy here is tested on virtual time
//! (`tests.rs`) with no SSH at all.

mod destinations;
pub mod direct;
mod inbound;
mod note;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::budget::MemoryBudget;
use crate::engine::{CloseReason, Engine, EngineStats, Event, FlowId, FlowKey, InboundError};
use crate::pool::{LinkChange, LinkId, Placement};
use crate::reverse::Target;
use crate::ssh::OpenError;
use crate::tun::Fault;

pub use destinations::Destinations;
pub use direct::{DirectConfig, DnsRedirect, Route, UdpId, UdpKey, UdpNat};
pub use inbound::{CallRefused, CallRoute, route};
pub use note::{Note, Notes, TunOp, WARN_WINDOW};

/// Default of [`RelayConfig::max_opening`] (`--max-opening`).
pub const DEFAULT_MAX_OPENING: usize = 1024;
/// Longest a channel open is tracked once started. sshd answers every open (its own connect
/// gives up after about two minutes); past this the open is forgotten.
pub const OPEN_CAP: Duration = Duration::from_secs(300);
/// A flow that moves this much (both ways) within [`HEAVY_WITHIN`] is bulk:
/// [`Placement::Pack`] avoids its link, and its destination's next flows are spread (each
/// sshd then encrypts a part: one sshd is a core's worth of AES-GCM, about 1 GB/s here).
pub const HEAVY_BYTES: u64 = 16 << 20;
/// See [`HEAVY_BYTES`]: a flow that keeps under 16 MiB a second, however long it lives and
/// however much it moves in all, is light: a connection pool's RPCs, a registry session, a
/// cache client, keep-alive HTTP (`wrk` with 1 KiB responses: 3 MB/s per connection, and
/// 10 such connections packed on one SSH connection gave 34,000 requests/s where spread
/// over four gave 22,000–24,000).
pub const HEAVY_WITHIN: Duration = Duration::from_secs(1);
/// Freed memory goes back to the system at most this often ([`Command::Trim`]).
pub const TRIM_EVERY: Duration = Duration::from_secs(2);
/// Default of [`RelayConfig::trim_after`]: glibc keeps up to 16 MiB free at the heap's top
/// by itself (`main.rs` pins that, so that a bulk flow's buffers stop faulting pages in and
/// out); a burst that moved more may have left more behind.
pub const TRIM_AFTER_BURST: u64 = 16 << 20;
/// How long no channel moves data before a burst's memory is given back.
pub const TRIM_QUIET: Duration = Duration::from_secs(1);
/// After a TUN read failed for a passing reason, reading resumes after this pause (so a
/// condition that lasts does not spin).
pub const RECV_RETRY: Duration = Duration::from_millis(10);

/// Relay settings.
#[derive(Clone, Debug)]
pub struct RelayConfig {
    /// Channel opens that may be pending at the jump host at once (counting those whose app
    /// gave up): SYNs beyond it are reset at once ([`CloseReason::OpenLimit`]); destinations
    /// that answered lately get a quarter more.
    pub max_opening: usize,
    /// How long a local app may take to answer a cloud caller; also how long an open waits
    /// for an SSH connection when none is up.
    pub open_timeout: Duration,
    /// The TUN's IPv4 address: cloud callers' connections are made to it.
    pub local_v4: Ipv4Addr,
    /// The TUN's IPv6 address, if it has one (for IPv6 callers).
    pub local_v6: Option<Ipv6Addr>,
    /// The memory budget the SSH connections count their channels' windows in: the engine
    /// learns those windows each turn ([`ToEngine::Windows`]), and the budget what the engine
    /// holds ([`Relay::handle_stats`]).
    pub budget: Option<Arc<MemoryBudget>>,
    /// The direct path: what is not the VPC leaves through this host's sockets (TCP flows
    /// on host connections, UDP through the NAT table). `None` (`up`): every flow goes
    /// through SSH, as the TUN only carries the VPC.
    pub direct: Option<DirectConfig>,
    /// A burst that moved at least this many bytes through channels (both ways) left its
    /// buffers' memory free in the heap: once the flows have been quiet for [`TRIM_QUIET`],
    /// it goes back to the system ([`Command::Trim`]). [`TRIM_AFTER_BURST`] by default.
    pub trim_after: u64,
}

/// What is written to a flow's channel, in order, one at a time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WriteOp {
    /// Data from the app.
    Data(Bytes),
    /// The app shut its write side.
    Eof,
    /// The flow is over: close the channel (the last write).
    Close,
}

/// What the driver does on a flow's channel ([`Command::Channel`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChannelOp {
    /// Start this write; report with [`Relay::handle_written`]. Never more than one in
    /// progress per flow.
    Write(WriteOp),
    /// Give up the write in progress (its report is not expected any more).
    Abort,
    /// Stop reading for good (let go of the receiving side).
    StopReading,
}

/// What reading a flow's channel gave.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Received {
    /// Data for the app.
    Data(Bytes),
    /// The far end shut its write side.
    Eof,
    /// The channel is closed (nothing more will be read).
    Closed,
    /// Anything else (ignored).
    Other,
}

/// How a cloud caller's channel is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Not ours to take (no listener there, no usable address): "administratively
    /// prohibited", as when the call is dropped.
    Prohibited,
    /// The local app did not answer: "connect failed".
    ConnectFailed,
}

/// A cloud caller's `forwarded-tcpip` channel, as the driver hands it over.
#[derive(Debug)]
pub struct Call<C, R> {
    /// The link it arrived on.
    pub link: LinkId,
    /// The jump host port it called.
    pub listen_port: u16,
    /// The caller, as the jump host reports it (`None` if unparsable).
    pub caller: Option<SocketAddr>,
    /// The exposed port behind that listener of that link, if any
    /// ([`Forwards::lookup`](crate::reverse::Forwards::lookup)).
    pub target: Option<Target>,
    /// Its channel.
    pub channel: C,
    /// Its accept / refuse handle.
    pub reply: R,
}

/// A routed cloud caller whose flow the engine started: waiting for the local app.
struct Routed<C, R> {
    call: Call<C, R>,
    route: CallRoute,
}

/// A channel open for a new flow ([`Command::Open`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpenRequest {
    /// The flow.
    pub id: FlowId,
    /// Its 4-tuple: a `direct-tcpip` channel to `key.dst` with `key.src` as the originator.
    pub key: FlowKey,
    /// Where among the links.
    pub placement: Placement,
    /// How long to wait for a link when none is up.
    pub link_wait: Duration,
    /// How long the open may take.
    pub cap: Duration,
}

/// A host TCP connection for a new flow on the direct path ([`Command::Connect`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectRequest {
    /// The flow.
    pub id: FlowId,
    /// Its 4-tuple, as the app sees it.
    pub key: FlowKey,
    /// Where to connect ([`DirectConfig::route`]: `key.dst`, or the loopback / DNS target).
    pub target: SocketAddr,
    /// How long the connect may take (then it fails as unreachable).
    pub cap: Duration,
}

/// Why a host connection failed ([`Relay::handle_connected`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectError {
    /// The destination refused it (`ECONNREFUSED`).
    Refused,
    /// Anything else: no route, unreachable, timed out, out of descriptors.
    Unreachable,
}

/// What the driver does with a host UDP socket of the NAT table ([`Command::Udp`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UdpOp {
    /// Open the association's socket, connected to `target`; failing, report
    /// [`UdpEvent::Failed`].
    Open {
        /// The association.
        id: UdpId,
        /// Where its datagrams go.
        target: SocketAddr,
        /// An unprivileged ICMP socket for echo requests (not a UDP socket).
        echo: bool,
    },
    /// Send a datagram (if the socket has no room, it is dropped, as UDP may).
    Send {
        /// The association.
        id: UdpId,
        /// The datagram.
        payload: Bytes,
    },
    /// Close the socket.
    Close {
        /// The association.
        id: UdpId,
    },
}

/// What a host UDP socket gave ([`Relay::handle_udp`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UdpEvent {
    /// A datagram from the destination.
    Datagram(Bytes),
    /// The destination answered with ICMP port unreachable (`ECONNREFUSED`).
    Refused,
    /// The socket could not be opened or failed for good.
    Failed,
}

/// A cloud caller the local app did not answer on the TUN address ([`Command::Loopback`]).
#[derive(Debug)]
pub struct Fallback<C, R> {
    /// The flow that was refused on the TUN address.
    pub id: FlowId,
    /// The caller.
    pub caller: SocketAddr,
    /// The call's channel.
    pub channel: C,
    /// Its reply handle.
    pub reply: R,
    /// The app's port.
    pub port: u16,
    /// The exposed port's entry.
    pub forward: u64,
}

/// What the relay asks the driver to do. Carry them out in order.
#[derive(Debug)]
pub enum Command<C, R> {
    /// Tell the engine ([`ToEngine::apply`]).
    Engine(ToEngine),
    /// Open a channel through the pool; report with [`Relay::handle_opened`] or
    /// [`Relay::handle_open_failed`].
    Open(OpenRequest),
    /// Connect a host TCP socket for a flow on the direct path; report with
    /// [`Relay::handle_connected`].
    Connect(ConnectRequest),
    /// Do this with a host UDP socket of the NAT table.
    Udp(UdpOp),
    /// Update a link's counters in the pool ([`Pool::update`](crate::pool::Pool::update)).
    Link {
        /// The link.
        link: LinkId,
        /// What changed.
        change: LinkChange,
    },
    /// Do this on the flow's channel ([`Relay::channel_mut`]).
    Channel(FlowId, ChannelOp),
    /// The flow's channel may have something to read: read it ([`Relay::reader`]).
    Read {
        /// The flow.
        id: FlowId,
    },
    /// Close a channel that no flow wants (its app gave up before it was confirmed).
    Drop {
        /// The channel.
        channel: C,
    },
    /// Accept a cloud caller's channel (now relayed as its flow's).
    Accept {
        /// The reply handle.
        reply: R,
    },
    /// Refuse a cloud caller's channel: the jump host closes the caller's connection.
    Refuse {
        /// The reply handle.
        reply: R,
        /// How.
        how: Refusal,
    },
    /// Nothing answered on the TUN address: try the app on 127.0.0.1 (an app listening on
    /// loopback only, as `ssh -R` users expect to work), relaying the call there, or refuse.
    Loopback(Fallback<C, R>),
    /// Give freed memory back to the system, off the driver's task; report with
    /// [`Relay::handle_trimmed`]. Never more than one at a time.
    Trim,
    /// Log this.
    Note(Note),
}

/// What the relay tells the engine: one [`Engine`] call each ([`ToEngine::apply`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ToEngine {
    /// The flow's channel is open ([`Engine::handle_open_ok`]).
    OpenOk(FlowId),
    /// The flow's channel could not be opened ([`Engine::handle_open_failed`]).
    OpenFailed(FlowId, CloseReason),
    /// Reset the flow towards its app ([`Engine::abort`]).
    Reset(FlowId, CloseReason),
    /// Reset every flow ([`Engine::reset_all`]).
    ResetAll(CloseReason),
    /// Bytes from the flow's channel for its app ([`Engine::handle_channel_data`]).
    Deliver(FlowId, Bytes),
    /// The channel sent EOF ([`Engine::handle_channel_eof`]).
    DeliverEof(FlowId),
    /// The channel was closed by the jump host ([`Engine::handle_channel_closed`]).
    ChannelClosed(FlowId),
    /// One of the flow's data events, this long, was written ([`Engine::handle_sent`]).
    Sent(FlowId, usize),
    /// The ended flow's channel is let go of ([`Engine::handle_close_done`]).
    CloseDone(FlowId),
    /// The receive windows committed to channels now ([`Engine::handle_windows`]).
    Windows(u64),
    /// Let go of the spare sockets and packet buffers, before a trim
    /// ([`Engine::drop_spares`]).
    DropSpares,
    /// A datagram for the app ([`Engine::handle_datagram`]).
    Datagram {
        /// The address the app sent to.
        from: SocketAddr,
        /// The app's socket.
        to: SocketAddr,
        /// The datagram.
        payload: Bytes,
    },
    /// The app's datagrams are not carried ([`Engine::handle_port_unreachable`]).
    PortUnreachable {
        /// The app's socket.
        src: SocketAddr,
        /// Where it sent them.
        dst: SocketAddr,
    },
    /// An echo reply for the app ([`Engine::handle_echo_reply`]).
    EchoReply {
        /// The address the app pinged.
        from: IpAddr,
        /// The app's address.
        to: IpAddr,
        /// The app's identifier.
        ident: u16,
        /// The reply as the host socket received it.
        message: Bytes,
    },
    /// The app's echo request is not carried ([`Engine::handle_echo_prohibited`]).
    EchoProhibited {
        /// The app's address.
        src: IpAddr,
        /// The pinged address.
        dst: IpAddr,
        /// Its identifier.
        ident: u16,
        /// Its sequence number.
        seq: u16,
    },
}

impl ToEngine {
    /// Makes the engine call this stands for, at `now` (the engine's clock).
    pub fn apply(self, engine: &mut Engine, now: smoltcp::time::Instant) {
        match self {
            ToEngine::OpenOk(id) => engine.handle_open_ok(now, id),
            ToEngine::OpenFailed(id, reason) => engine.handle_open_failed(now, id, reason),
            ToEngine::Reset(id, reason) => engine.abort(now, id, reason),
            ToEngine::ResetAll(reason) => engine.reset_all(now, reason),
            ToEngine::Deliver(id, data) => engine.handle_channel_data(now, id, data),
            ToEngine::DeliverEof(id) => engine.handle_channel_eof(now, id),
            ToEngine::ChannelClosed(id) => engine.handle_channel_closed(now, id),
            ToEngine::Sent(id, n) => engine.handle_sent(id, n),
            ToEngine::CloseDone(id) => engine.handle_close_done(id),
            ToEngine::Windows(windows) => engine.handle_windows(windows),
            ToEngine::DropSpares => engine.drop_spares(),
            ToEngine::Datagram { from, to, payload } => {
                engine.handle_datagram(now, from, to, &payload)
            }
            ToEngine::PortUnreachable { src, dst } => engine.handle_port_unreachable(now, src, dst),
            ToEngine::EchoReply {
                from,
                to,
                ident,
                message,
            } => engine.handle_echo_reply(now, (from, to), ident, &message),
            ToEngine::EchoProhibited {
                src,
                dst,
                ident,
                seq,
            } => engine.handle_echo_prohibited(now, (src, dst), ident, seq),
        }
    }
}

/// One flow's channel side.
struct Flow<C, R> {
    /// When its SYN (or its call) arrived.
    since: Instant,
    /// Bytes from the app to the channel.
    up: u64,
    /// Bytes from the channel to the app.
    down: u64,
    phase: Phase<C, R>,
}

impl<C, R> Flow<C, R> {
    /// A flow that has moved nothing yet, arrived `now`.
    fn new(now: Instant, phase: Phase<C, R>) -> Flow<C, R> {
        Flow {
            since: now,
            up: 0,
            down: 0,
            phase,
        }
    }
}

enum Phase<C, R> {
    /// Outbound, its channel being opened ([`Command::Open`]), or its host connection
    /// ([`Command::Connect`], `direct`).
    Opening {
        /// The destination (it answered, if the channel opens).
        dst: SocketAddr,
        /// On the direct path.
        direct: bool,
    },
    /// A cloud caller's, waiting for the local app to answer.
    Accepting(Routed<C, R>),
    /// Its channel is open.
    Open(Open<C>),
}

/// A flow whose channel is open.
struct Open<C> {
    /// The SSH connection it is on (`None`: a host connection, on the direct path).
    link: Option<LinkId>,
    channel: C,
    /// The channel has not reported its end, and the flow did not end.
    reading: bool,
    /// Reading stopped because the engine had no room (resumed by [`Relay::handle_room`]).
    paused: bool,
    /// Writes waiting behind the one in progress.
    outbox: VecDeque<WriteOp>,
    /// A write is in progress.
    writing: bool,
    /// The engine ended the flow: it goes once the outbox (ending with the channel's close)
    /// is written.
    closing: bool,
    /// Counted as bulk on its link ([`LinkChange::Heavy`]).
    heavy: bool,
    /// Bytes moved since the start of the current [`HEAVY_WITHIN`] interval, and when it
    /// started.
    burst: (Option<Instant>, u64),
    /// The destination of an outbound flow, whose shape it teaches.
    dst: Option<SocketAddr>,
}

impl<C> Open<C> {
    fn new(link: Option<LinkId>, channel: C, dst: Option<SocketAddr>) -> Open<C> {
        Open {
            link,
            channel,
            reading: true,
            paused: false,
            outbox: VecDeque::new(),
            writing: false,
            closing: false,
            heavy: false,
            burst: (None, 0),
            dst,
        }
    }
}

/// When to give freed memory back: soon after flows close (what a burst of flows leaves
/// behind is their buffered channel data, freed in the middle of the heap where the
/// allocator does not return it by itself), and once the flows are quiet after a burst of
/// data ([`RelayConfig::trim_after`]); at most every [`TRIM_EVERY`], one at a time.
#[derive(Debug)]
struct Trim {
    /// Flows closed since the last trim.
    pending: bool,
    not_before: Instant,
    /// A trim is in progress.
    running: bool,
    /// Bytes moved through channels, both ways, since the last trim.
    moved: u64,
    /// [`RelayConfig::trim_after`].
    burst: u64,
    /// When a channel last moved data.
    last_moved: Instant,
}

impl Trim {
    /// When the next trim is due, if one is.
    fn due(&self) -> Option<Instant> {
        if self.running {
            None
        } else if self.pending {
            Some(self.not_before)
        } else if self.moved >= self.burst {
            Some(self.not_before.max(self.last_moved + TRIM_QUIET))
        } else {
            None
        }
    }

    /// A channel moved `bytes` (read or written) at `now`.
    fn count(&mut self, now: Instant, bytes: usize) {
        self.moved = self.moved.saturating_add(bytes as u64);
        self.last_moved = now;
    }
}

/// The relay. See the module documentation.
pub struct Relay<C, R> {
    config: RelayConfig,
    flows: HashMap<FlowId, Flow<C, R>>,
    /// Channel opens pending at the jump host, those whose app gave up included.
    opening: usize,
    /// Host connections in progress on the direct path (bounded by `max_opening` apart
    /// from the jump host's opens: neither kind can starve the other).
    connecting: usize,
    /// The UDP NAT table of the direct path (empty when it is off); echo requests too.
    udp: UdpNat,
    /// Echo requests are answered "prohibited" until then: the host gave no ICMP socket.
    echo_denied: Option<Instant>,
    destinations: Destinations,
    notes: Notes,
    trim: Trim,
    /// Reading the TUN is paused until then after a passing failure.
    recv_resume: Option<Instant>,
    commands: VecDeque<Command<C, R>>,
}

impl<C, R> Relay<C, R> {
    /// A relay with no flows.
    pub fn new(config: RelayConfig, now: Instant) -> Relay<C, R> {
        let trim_after = config.trim_after;
        let (max_udp, udp_idle) = config
            .direct
            .as_ref()
            .map_or((direct::DEFAULT_MAX_UDP, direct::DEFAULT_UDP_IDLE), |d| {
                (d.max_udp, d.udp_idle)
            });
        Relay {
            config,
            flows: HashMap::new(),
            opening: 0,
            connecting: 0,
            udp: UdpNat::new(max_udp, udp_idle),
            echo_denied: None,
            destinations: Destinations::default(),
            notes: Notes::default(),
            trim: Trim {
                pending: false,
                not_before: now,
                running: false,
                moved: 0,
                burst: trim_after,
                last_moved: now,
            },
            recv_resume: None,
            commands: VecDeque::new(),
        }
    }

    /// The next command for the driver.
    pub fn poll(&mut self) -> Option<Command<C, R>> {
        self.commands.pop_front()
    }

    /// When [`Relay::handle_tick`] must run next even if nothing happens.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let trim = self.trim.due();
        let udp = self.udp.poll_timeout();
        [self.notes.poll_timeout(), trim, self.recv_resume, udp]
            .into_iter()
            .flatten()
            .min()
    }

    /// Flows the relay knows (opening, accepting, open or closing).
    pub fn flow_count(&self) -> usize {
        self.flows.len()
    }

    /// Channel opens pending at the jump host.
    pub fn opening(&self) -> usize {
        self.opening
    }

    /// Host connections in progress on the direct path.
    pub fn connecting(&self) -> usize {
        self.connecting
    }

    /// UDP associations of the direct path live now.
    pub fn udp_associations(&self) -> usize {
        self.udp.len()
    }

    /// The channel of a flow whose channel is open (for [`Command::Channel`]).
    pub fn channel_mut(&mut self, id: FlowId) -> Option<&mut C> {
        self.open_mut(id).map(|o| &mut o.channel)
    }

    /// The channel of `id` if the driver should read it now: the flow is open, its channel
    /// has not ended and it is not paused. `wants` is the engine's
    /// [`Engine::wants_data`](crate::engine::Engine::wants_data): when false, the flow is
    /// paused until [`Relay::handle_room`]. So a flow's channel is read only as fast as its
    /// app takes the bytes, and its SSH window carries that pace to the jump host.
    pub fn reader(&mut self, id: FlowId, wants: bool) -> Option<&mut C> {
        let o = self.open_mut(id)?;
        if o.paused || o.closing || !o.reading {
            return None;
        }
        if !wants {
            o.paused = true;
            return None;
        }
        Some(&mut o.channel)
    }

    /// True while the TUN should be read (not paused after a passing failure).
    pub fn reading_tun(&self) -> bool {
        self.recv_resume.is_none()
    }

    fn open_mut(&mut self, id: FlowId) -> Option<&mut Open<C>> {
        match self.flows.get_mut(&id).map(|f| &mut f.phase) {
            Some(Phase::Open(o)) => Some(o),
            _ => None,
        }
    }

    fn note(&mut self, note: Option<Note>) {
        if let Some(note) = note {
            self.commands.push_back(Command::Note(note));
        }
    }

    // ----- time -----

    /// Time passed: summaries of repeated warnings whose window ended, the memory trim when
    /// due, the TUN's read pause, and the committed windows for the engine. Call it before
    /// each run of the engine.
    pub fn handle_tick(&mut self, now: Instant) {
        if self.notes.poll_timeout().is_some_and(|t| t <= now) {
            let summaries: Vec<Note> = self.notes.poll(now).collect();
            self.commands
                .extend(summaries.into_iter().map(Command::Note));
        }
        if self.trim.due().is_some_and(|t| now >= t) {
            self.trim.pending = false;
            self.trim.moved = 0;
            self.trim.running = true;
            self.trim.not_before = now + TRIM_EVERY;
            // What the engine keeps for the next flows and packets goes back with it.
            self.commands
                .push_back(Command::Engine(ToEngine::DropSpares));
            self.commands.push_back(Command::Trim);
        }
        if self.recv_resume.is_some_and(|t| now >= t) {
            self.recv_resume = None;
        }
        for id in self.udp.expire(now) {
            self.commands.push_back(Command::Udp(UdpOp::Close { id }));
        }
        if let Some(b) = &self.config.budget {
            self.commands
                .push_back(Command::Engine(ToEngine::Windows(b.windows())));
        }
    }

    /// The memory trim ([`Command::Trim`]) finished.
    pub fn handle_trimmed(&mut self) {
        self.trim.running = false;
    }

    /// The engine's counters after a turn: what it holds is counted in the memory budget.
    pub fn handle_stats(&mut self, stats: &EngineStats) {
        if let Some(b) = &self.config.budget {
            b.set_engine(stats.buffered);
        }
    }

    /// The driver stops (`failed`: because the TUN failed): every app gets a reset, every
    /// channel a close.
    pub fn handle_stop(&mut self, failed: bool) {
        let reason = if failed {
            CloseReason::SessionLost
        } else {
            CloseReason::Shutdown
        };
        self.commands
            .push_back(Command::Engine(ToEngine::ResetAll(reason)));
    }

    /// A TUN read or write failed. False if the device is gone (the session ends);
    /// otherwise the failure is warned about (once per kind per window) and, for a read,
    /// reading pauses for [`RECV_RETRY`].
    pub fn handle_tun_failed(&mut self, now: Instant, op: TunOp, e: &std::io::Error) -> bool {
        if Fault::of(e) == Fault::Gone {
            return false;
        }
        if op == TunOp::Read {
            self.recv_resume = Some(now + RECV_RETRY);
        }
        let note = self.notes.tun_failed(now, op, e);
        self.note(note);
        true
    }

    // ----- the engine -----

    /// What the engine asked for.
    pub fn handle_event(&mut self, now: Instant, event: Event) {
        match event {
            Event::Open { id, key } => self.open(now, id, key),
            Event::Connected { id } => self.accept(id),
            Event::Data { id, data } => {
                if let Some(flow) = self.flows.get_mut(&id)
                    && let Phase::Open(o) = &mut flow.phase
                {
                    flow.up += data.len() as u64;
                    if becomes_heavy(o, now, data.len()) {
                        mark_heavy(o, &mut self.commands, &mut self.destinations);
                    }
                }
                self.queue_write(id, WriteOp::Data(data));
            }
            Event::Eof { id } => self.queue_write(id, WriteOp::Eof),
            Event::Refused { key, reason } => {
                let note = self.notes.refused(now, key, reason);
                self.note(note);
            }
            Event::Close { id, key, reason } => self.close(now, id, key, reason),
            Event::Datagram { src, dst, payload } => self.datagram(now, src, dst, payload),
            Event::Echo {
                src,
                dst,
                ident,
                seq,
                message,
            } => self.echo(now, (src, dst), (ident, seq), message),
            Event::CloseNow { id } => {
                if let Some(Flow {
                    phase: Phase::Open(o),
                    ..
                }) = self.flows.get_mut(&id)
                {
                    discard(id, o, &mut self.commands);
                    o.outbox.push_back(WriteOp::Close);
                    self.commands
                        .push_back(Command::Note(Note::FlushCut { id }));
                    self.start_write(id);
                }
            }
        }
    }

    /// A flow the engine refused earlier ([`Relay::reader`] with `wants` false) can take
    /// data again: its channel is read again. True if it was paused.
    pub fn handle_room(&mut self, id: FlowId) -> bool {
        match self.open_mut(id) {
            Some(o) if o.paused => {
                o.paused = false;
                self.commands.push_back(Command::Read { id });
                true
            }
            _ => false,
        }
    }

    /// A new outbound flow: its channel is opened, unless too many opens are pending at the
    /// jump host; on the direct path, a destination outside the VPC gets a host connection.
    fn open(&mut self, now: Instant, id: FlowId, key: FlowKey) {
        match self.config.direct.as_ref().map(|d| d.route(key.dst)) {
            Some(Route::Host(target)) => return self.connect(now, id, key, target),
            Some(Route::Refuse) => {
                let refused = ToEngine::OpenFailed(id, CloseReason::HostRefused);
                return self.commands.push_back(Command::Engine(refused));
            }
            Some(Route::Tunnel) | None => {}
        }
        let limit = self
            .destinations
            .open_limit(key.dst, now, self.config.max_opening);
        if self.opening >= limit {
            self.commands
                .push_back(Command::Engine(ToEngine::OpenFailed(
                    id,
                    CloseReason::OpenLimit,
                )));
            return;
        }
        self.opening += 1;
        self.flows.insert(
            id,
            Flow::new(
                now,
                Phase::Opening {
                    dst: key.dst,
                    direct: false,
                },
            ),
        );
        self.commands.push_back(Command::Open(OpenRequest {
            id,
            key,
            placement: self.destinations.placement(key.dst),
            link_wait: self.config.open_timeout,
            cap: OPEN_CAP,
        }));
    }

    /// A new flow on the direct path: a host connection to `target`, unless
    /// `max_opening` are in progress (then a reset, as for the jump host's opens). Its SYN
    /// is held until the connection is made, so a closed port looks closed.
    fn connect(&mut self, now: Instant, id: FlowId, key: FlowKey, target: SocketAddr) {
        if self.connecting >= self.config.max_opening {
            self.commands
                .push_back(Command::Engine(ToEngine::OpenFailed(
                    id,
                    CloseReason::OpenLimit,
                )));
            return;
        }
        self.connecting += 1;
        self.flows.insert(
            id,
            Flow::new(
                now,
                Phase::Opening {
                    dst: key.dst,
                    direct: true,
                },
            ),
        );
        self.commands.push_back(Command::Connect(ConnectRequest {
            id,
            key,
            target,
            cap: self.config.open_timeout,
        }));
    }

    /// A UDP datagram from the app: out through its association's host socket (made, and
    /// room made for it, if it is new); to the VPC, or with the direct path off, an ICMP
    /// port unreachable (UDP does not go through SSH).
    fn datagram(&mut self, now: Instant, src: SocketAddr, dst: SocketAddr, payload: Bytes) {
        let route = self.config.direct.as_ref().map(|d| d.route(dst));
        let Some(Route::Host(target)) = route else {
            self.commands
                .push_back(Command::Engine(ToEngine::PortUnreachable { src, dst }));
            return;
        };
        let key = UdpKey {
            src,
            dst,
            echo: false,
        };
        self.associate(now, key, target, payload);
    }

    /// An echo request from the app: out through an unprivileged ICMP socket of this host,
    /// as a datagram of the table (keyed by the app's address and identifier); to the VPC,
    /// with the direct path off, or while the host gives no ICMP socket, an ICMP
    /// "administratively prohibited" (as in `up`).
    fn echo(
        &mut self,
        now: Instant,
        (src, dst): (IpAddr, IpAddr),
        (ident, seq): (u16, u16),
        message: Bytes,
    ) {
        let route = self
            .config
            .direct
            .as_ref()
            .map(|d| d.route(SocketAddr::new(dst, 0)));
        let denied = self.echo_denied.is_some_and(|until| now < until);
        let (Some(Route::Host(target)), false) = (route, denied) else {
            self.commands
                .push_back(Command::Engine(ToEngine::EchoProhibited {
                    src,
                    dst,
                    ident,
                    seq,
                }));
            return;
        };
        let key = UdpKey {
            src: SocketAddr::new(src, ident),
            dst: SocketAddr::new(dst, 0),
            echo: true,
        };
        self.associate(now, key, target, message);
    }

    /// Sends `payload` on `key`'s association, made (and room made for it) if new.
    fn associate(&mut self, now: Instant, key: UdpKey, target: SocketAddr, payload: Bytes) {
        let out = self.udp.outbound(now, key);
        if let Some((id, key)) = out.evicted {
            self.commands.push_back(Command::Udp(UdpOp::Close { id }));
            self.commands
                .push_back(Command::Note(Note::UdpEvicted { key }));
        }
        if out.new {
            self.commands.push_back(Command::Udp(UdpOp::Open {
                id: out.id,
                target,
                echo: key.echo,
            }));
        }
        self.commands.push_back(Command::Udp(UdpOp::Send {
            id: out.id,
            payload,
        }));
    }

    /// Queues a write on a flow whose channel is open (not once it is closing).
    fn queue_write(&mut self, id: FlowId, op: WriteOp) {
        if let Some(o) = self.open_mut(id)
            && !o.closing
        {
            o.outbox.push_back(op);
            self.start_write(id);
        }
    }

    /// Starts the flow's next write if none is in progress; lets go of a closing flow once
    /// everything is written.
    fn start_write(&mut self, id: FlowId) {
        let Some(o) = self.open_mut(id) else {
            return;
        };
        if o.writing {
            return;
        }
        match o.outbox.pop_front() {
            Some(op) => {
                o.writing = true;
                self.commands
                    .push_back(Command::Channel(id, ChannelOp::Write(op)));
            }
            None if o.closing => self.release(id),
            None => {}
        }
    }

    /// Lets go of the channel of a flow that ended.
    fn release(&mut self, id: FlowId) {
        self.flows.remove(&id);
        self.commands
            .push_back(Command::Engine(ToEngine::CloseDone(id)));
    }

    /// The engine ended a flow: close its channel (after the writes already queued, if it
    /// ended normally), answer a cloud caller still waiting, and log it.
    fn close(&mut self, now: Instant, id: FlowId, key: FlowKey, reason: CloseReason) {
        self.trim.pending = true;
        let (since, up, down) = match self.flows.remove(&id) {
            None => (now, 0, 0),
            Some(mut flow) => {
                let figures = (flow.since, flow.up, flow.down);
                match flow.phase {
                    Phase::Opening { .. } => {}
                    Phase::Accepting(Routed { call, route }) => {
                        self.commands.push_back(Command::Link {
                            link: call.link,
                            change: LinkChange::Release,
                        });
                        self.commands
                            .push_back(if reason == CloseReason::LocalRefused {
                                Command::Loopback(Fallback {
                                    id,
                                    caller: route.caller,
                                    channel: call.channel,
                                    reply: call.reply,
                                    port: route.local.port(),
                                    forward: route.forward,
                                })
                            } else {
                                Command::Refuse {
                                    reply: call.reply,
                                    how: Refusal::ConnectFailed,
                                }
                            });
                    }
                    Phase::Open(mut o) => {
                        self.close_open(id, &mut o, reason);
                        flow.phase = Phase::Open(o);
                        self.flows.insert(id, flow);
                        self.start_write(id);
                    }
                }
                figures
            }
        };
        let note = self.notes.ended(now, id, key, reason);
        self.note(note);
        self.commands.push_back(Command::Note(Note::Closed {
            id,
            key,
            reason,
            secs: now.saturating_duration_since(since).as_secs_f64(),
            up,
            down,
        }));
    }

    /// The channel side of an open flow that ended: it stops reading, leaves its link's
    /// counts, teaches its destination's shape, and queues the channel's close.
    fn close_open(&mut self, id: FlowId, o: &mut Open<C>, reason: CloseReason) {
        o.closing = true;
        o.reading = false;
        self.commands
            .push_back(Command::Channel(id, ChannelOp::StopReading));
        link_change(&mut self.commands, o.link, LinkChange::Release);
        if o.heavy {
            link_change(&mut self.commands, o.link, LinkChange::Light);
        }
        if let Some(dst) = o.dst
            && !o.heavy
        {
            self.destinations.note_light(dst);
        }
        if !reason.flushes() {
            // A reset: what was not written yet is discarded.
            discard(id, o, &mut self.commands);
        }
        o.outbox.push_back(WriteOp::Close);
    }

    // ----- the pool -----

    /// The jump host confirmed a flow's channel on `link`. A flow whose app gave up (or
    /// timed out) meanwhile has its channel closed at once, so its connection in the VPC
    /// goes too.
    pub fn handle_opened(&mut self, now: Instant, id: FlowId, link: LinkId, channel: C) {
        self.opening = self.opening.saturating_sub(1);
        let Some(Flow {
            phase: phase @ Phase::Opening { direct: false, .. },
            ..
        }) = self.flows.get_mut(&id)
        else {
            self.commands.push_back(Command::Link {
                link,
                change: LinkChange::Release,
            });
            self.commands.push_back(Command::Drop { channel });
            return;
        };
        if let Phase::Opening { dst, .. } = *phase {
            self.destinations.note_answered(dst, now);
            *phase = Phase::Open(Open::new(Some(link), channel, Some(dst)));
        }
        // Data may already wait in the channel.
        self.commands.push_back(Command::Read { id });
        self.commands
            .push_back(Command::Engine(ToEngine::OpenOk(id)));
    }

    /// The jump host refused a flow's channel, or the open failed: its app gets a reset.
    pub fn handle_open_failed(&mut self, _now: Instant, id: FlowId, error: OpenError) {
        self.opening = self.opening.saturating_sub(1);
        let reason = match error {
            OpenError::ConnectFailed => CloseReason::OpenRefused,
            OpenError::Prohibited => CloseReason::OpenProhibited,
            OpenError::Timeout => CloseReason::OpenTimedOut,
            OpenError::SessionLost => CloseReason::SessionLost,
            OpenError::Other => CloseReason::OpenRefused,
        };
        if error == OpenError::Prohibited {
            self.commands.push_back(Command::Note(Note::Prohibited));
        }
        if let Some(Flow {
            phase: Phase::Opening { .. },
            ..
        }) = self.flows.get(&id)
        {
            self.commands
                .push_back(Command::Engine(ToEngine::OpenFailed(id, reason)));
        }
    }

    /// A host connection ([`Command::Connect`]) is made, or failed: the flow is open (its
    /// SYN answered), or its app gets a reset. A connection whose app gave up meanwhile is
    /// closed at once.
    pub fn handle_connected(&mut self, _now: Instant, id: FlowId, result: Result<C, ConnectError>) {
        self.connecting = self.connecting.saturating_sub(1);
        let Some(Flow {
            phase: phase @ Phase::Opening { direct: true, .. },
            ..
        }) = self.flows.get_mut(&id)
        else {
            if let Ok(channel) = result {
                self.commands.push_back(Command::Drop { channel });
            }
            return;
        };
        match result {
            Ok(channel) => {
                *phase = Phase::Open(Open::new(None, channel, None));
                self.commands.push_back(Command::Read { id });
                self.commands
                    .push_back(Command::Engine(ToEngine::OpenOk(id)));
            }
            Err(e) => {
                let reason = match e {
                    ConnectError::Refused => CloseReason::HostRefused,
                    ConnectError::Unreachable => CloseReason::HostUnreachable,
                };
                self.commands
                    .push_back(Command::Engine(ToEngine::OpenFailed(id, reason)));
            }
        }
    }

    /// What a host socket of the NAT table gave: a datagram (or an echo reply) goes to its
    /// app, from the address the app sent to; the destination's port unreachable too; a
    /// socket that failed is forgotten (the app's next datagram makes a new one). An ICMP
    /// socket the host refuses has echo requests answered "prohibited" for
    /// [`direct::UDP_SHORT_IDLE`], with one warning.
    pub fn handle_udp(&mut self, now: Instant, id: UdpId, event: UdpEvent) {
        match event {
            UdpEvent::Datagram(payload) => {
                let Some(key) = self.udp.inbound(now, id) else {
                    return;
                };
                let call = if key.echo {
                    ToEngine::EchoReply {
                        from: key.dst.ip(),
                        to: key.src.ip(),
                        ident: key.src.port(),
                        message: payload,
                    }
                } else {
                    ToEngine::Datagram {
                        from: key.dst,
                        to: key.src,
                        payload,
                    }
                };
                self.commands.push_back(Command::Engine(call));
            }
            UdpEvent::Refused => {
                if let Some(UdpKey {
                    src,
                    dst,
                    echo: false,
                }) = self.udp.key(id)
                {
                    self.commands
                        .push_back(Command::Engine(ToEngine::PortUnreachable { src, dst }));
                }
            }
            UdpEvent::Failed => {
                let Some(key) = self.udp.remove(id) else {
                    return;
                };
                self.commands.push_back(Command::Udp(UdpOp::Close { id }));
                if key.echo && self.echo_denied.is_none_or(|until| now >= until) {
                    self.echo_denied = Some(now + direct::UDP_SHORT_IDLE);
                    self.commands.push_back(Command::Note(Note::EchoDenied));
                }
            }
        }
    }

    /// The pool's links changed: the open flows on links that are gone are reset (their
    /// channels are gone with them). `live` says whether a link is still up.
    pub fn handle_links(&mut self, _now: Instant, live: impl Fn(LinkId) -> bool) {
        let mut lost: Vec<FlowId> = self
            .flows
            .iter()
            .filter_map(|(id, f)| match &f.phase {
                Phase::Open(o) if !o.closing && o.link.is_some_and(|l| !live(l)) => Some(*id),
                _ => None,
            })
            .collect();
        if lost.is_empty() {
            return;
        }
        lost.sort_unstable();
        self.commands
            .push_back(Command::Note(Note::LinkLost { flows: lost.len() }));
        for id in lost {
            self.commands.push_back(Command::Engine(ToEngine::Reset(
                id,
                CloseReason::SessionLost,
            )));
        }
    }

    // ----- a flow's channel -----

    /// What reading a flow's channel gave: data and EOF go to the engine, counted.
    pub fn handle_read(&mut self, now: Instant, id: FlowId, received: Received) {
        let Some(flow) = self.flows.get_mut(&id) else {
            return;
        };
        let Phase::Open(o) = &mut flow.phase else {
            return;
        };
        match received {
            Received::Data(data) => {
                flow.down += data.len() as u64;
                self.trim.count(now, data.len());
                if becomes_heavy(o, now, data.len()) {
                    mark_heavy(o, &mut self.commands, &mut self.destinations);
                }
                self.commands
                    .push_back(Command::Engine(ToEngine::Deliver(id, data)));
            }
            Received::Eof => self
                .commands
                .push_back(Command::Engine(ToEngine::DeliverEof(id))),
            Received::Closed => {
                o.reading = false;
                self.commands
                    .push_back(Command::Engine(ToEngine::ChannelClosed(id)));
            }
            Received::Other => {}
        }
    }

    /// A write ([`ChannelOp::Write`]) finished: `Some(n)` bytes of data written (0 for EOF),
    /// `None` if the channel is gone (or, for a close, closed).
    pub fn handle_written(&mut self, now: Instant, id: FlowId, written: Option<usize>) {
        let Some(o) = self.open_mut(id) else {
            return;
        };
        o.writing = false;
        match written {
            Some(n) => {
                if n > 0 {
                    self.trim.count(now, n);
                    self.commands
                        .push_back(Command::Engine(ToEngine::Sent(id, n)));
                }
                self.start_write(id);
            }
            // The close went out (or the channel was already gone).
            None if o.closing => self.release(id),
            // The channel is gone under a write: the flow cannot go on.
            None => self.commands.push_back(Command::Engine(ToEngine::Reset(
                id,
                CloseReason::RemoteReset,
            ))),
        }
    }

    // ----- cloud callers -----

    /// A cloud caller reached an exposed port: routed to the local app from the caller's
    /// address, or refused. `connect` starts its flow in the engine
    /// ([`Engine::connect_inbound`] from the caller to the local address, giving up after
    /// the timeout). The channel is accepted once the app answers ([`Event::Connected`]).
    pub fn handle_call(
        &mut self,
        now: Instant,
        call: Call<C, R>,
        connect: impl FnOnce(SocketAddr, SocketAddr, Duration) -> Result<FlowId, InboundError>,
    ) {
        let routed = route(
            call.target,
            call.caller,
            self.config.local_v4,
            self.config.local_v6,
        );
        let route = match routed {
            Ok(route) => route,
            Err(why) => {
                self.commands.push_back(Command::Note(Note::CallRefused {
                    port: call.listen_port,
                    why,
                }));
                self.commands.push_back(Command::Refuse {
                    reply: call.reply,
                    how: Refusal::Prohibited,
                });
                return;
            }
        };
        match connect(route.caller, route.local, self.config.open_timeout) {
            Ok(id) => {
                self.commands.push_back(Command::Note(Note::Caller {
                    id,
                    caller: route.caller,
                    local: route.local,
                }));
                self.commands.push_back(Command::Link {
                    link: call.link,
                    change: LinkChange::Adopt,
                });
                self.flows
                    .insert(id, Flow::new(now, Phase::Accepting(Routed { call, route })));
            }
            Err(error) => {
                self.commands.push_back(Command::Note(Note::CallerRefused {
                    caller: route.caller,
                    local: route.local,
                    error,
                }));
                self.commands.push_back(Command::Refuse {
                    reply: call.reply,
                    how: Refusal::Prohibited,
                });
            }
        }
    }

    /// The local app answered a cloud caller: its channel is accepted and relayed.
    fn accept(&mut self, id: FlowId) {
        let Some(mut flow) = self.flows.remove(&id) else {
            return;
        };
        match flow.phase {
            Phase::Accepting(Routed { call, .. }) => {
                flow.phase = Phase::Open(Open::new(Some(call.link), call.channel, None));
                self.flows.insert(id, flow);
                self.commands
                    .push_back(Command::Accept { reply: call.reply });
                // Data may already wait in the channel.
                self.commands.push_back(Command::Read { id });
            }
            phase => {
                flow.phase = phase;
                self.flows.insert(id, flow);
            }
        }
    }
}

/// A change of a link's counters, for a flow on one (not on the direct path).
fn link_change<C, R>(
    commands: &mut VecDeque<Command<C, R>>,
    link: Option<LinkId>,
    change: LinkChange,
) {
    if let Some(link) = link {
        commands.push_back(Command::Link { link, change });
    }
}

/// After `moved` bytes (either way) at `now`: true once, when a flow has moved
/// [`HEAVY_BYTES`] within one [`HEAVY_WITHIN`] (it is then bulk).
fn becomes_heavy<C>(o: &mut Open<C>, now: Instant, moved: usize) -> bool {
    if o.heavy {
        return false;
    }
    o.burst = match o.burst {
        (Some(since), bytes) if now.saturating_duration_since(since) < HEAVY_WITHIN => {
            (Some(since), bytes + moved as u64)
        }
        _ => (Some(now), moved as u64),
    };
    o.heavy = o.burst.1 >= HEAVY_BYTES;
    o.heavy
}

/// A flow just turned bulk: counted so on its link, and its destination's next flows are
/// spread.
fn mark_heavy<C, R>(
    o: &Open<C>,
    commands: &mut VecDeque<Command<C, R>>,
    destinations: &mut Destinations,
) {
    link_change(commands, o.link, LinkChange::Heavy);
    if let Some(dst) = o.dst {
        destinations.note_bulk(dst);
    }
}

/// Drops what a flow's channel was still to write, the write in progress included.
fn discard<C, R>(id: FlowId, o: &mut Open<C>, commands: &mut VecDeque<Command<C, R>>) {
    o.outbox.clear();
    if o.writing {
        o.writing = false;
        commands.push_back(Command::Channel(id, ChannelOp::Abort));
    }
}
