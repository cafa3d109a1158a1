//! The sans-IO engine: everything between raw IP packets on the TUN and byte streams on SSH
//! channels, with no sockets, no tasks and no clock of its own.
//!
//! ```text
//!  TUN packets ──handle_tun_packet──▶ classify ──▶ TCP of a known flow ──▶ smoltcp ──▶ socket
//!                                        │             new SYN: held, Event::Open
//!                                        ├─▶ UDP, ping: ICMP unreachable, or (the direct path,
//!                                        │        `datagrams`) Event::Datagram / Event::Echo;
//!                                        │        replies through handle_datagram / _echo_reply
//!                                        └─▶ other: ICMP unreachable (poll_transmit)
//!  socket bytes ──(within the flow's SSH credit)──▶ Event::Data / Event::Eof / Event::Close
//!  channel bytes ──handle_channel_data──▶ per-flow bounded buffer ──▶ socket ──▶ poll_transmit
//! ```
//!
//! The driver calls `handle_*` with the current time, then [`Engine::poll`], then drains
//! [`Engine::poll_event`] and [`Engine::poll_transmit`], and sleeps until
//! [`Engine::poll_timeout`]. A flow's SYN is held until the driver reports the SSH channel
//! open ([`Engine::handle_open_ok`]); only then does smoltcp answer it, so a closed port at the
//! far end shows up to the app as a plain connection refused (RST), never "connected, then
//! reset".
//!
//! The TCP stack is sharded: flows are spread over [`SHARDS`] smoltcp interfaces, each with
//! its own socket set and packet queues. smoltcp scans every socket of an interface on each
//! packet and each poll, so one interface with 10,000 idle flows would make every new flow
//! pay for all of them; a shard is polled only when it has work.
//!
//! Invariant: no smoltcp socket stays in LISTEN. A socket listening on exactly one
//! destination is created and fed its held SYN in the same call, so concurrent flows to the
//! same destination can never steal each other's SYN.
//!
//! Deterministic: the engine has no clock and no randomness of its own. Time is the `now`
//! of each call, and everything random (the secret of RFC 6528 initial sequence numbers, the
//! interfaces' generators) comes from the seed given to [`Engine::new`]: the same seed and
//! the same calls produce the same packets and events, byte for byte, so a fuzz or test
//! failure replays from its seed. What a hostile app could do with sequence numbers (blind
//! RSTs and SYNs, RFC 5961; predictable ISNs, RFC 6528) is dealt with inside smoltcp by our
//! patch series (`patches/smoltcp`), not around it.

mod bucket;
mod closing;
mod device;
pub mod flow;
pub mod packet;
mod sockets;

#[cfg(test)]
mod fuzz;
#[cfg(test)]
mod hostile_tests;
#[cfg(test)]
mod tests;

/// The seed of the engine in tests: any fixed value (a run replays from it).
#[cfg(test)]
pub(crate) const TEST_SEED: Seed = *b"mse-vpn engine tests: fixed seed";

use std::collections::VecDeque;

use bytes::{Buf, Bytes};
use rand::{Rng, SeedableRng, rngs::StdRng};
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr, IpListenEndpoint, TcpSeqNumber};

pub use closing::CLOSE_GRACE;
pub use device::{QueueDevice, RxPacket, TunFormat, VNET_HDR_LEN, rx_buffer_len};
pub use flow::{CloseReason, FlowId, FlowKey, FlowTable};
pub use packet::{DropReason, Ingress, TcpFlags, Unreachable};

/// The seed of an engine's randomness (see [`Engine::new`]).
pub type Seed = [u8; 32];

/// Internal address of the smoltcp interface (RFC 7600 dummy address). With `any_ip` the
/// interface answers for every destination; this address only anchors the default route.
const IFACE_V4: std::net::Ipv4Addr = std::net::Ipv4Addr::new(192, 0, 0, 8);
/// Internal IPv6 address of the smoltcp interface (from the RFC 6666 discard prefix).
const IFACE_V6: std::net::Ipv6Addr = std::net::Ipv6Addr::new(0x100, 0, 0, 0, 0, 0, 0, 1);
/// Number of smoltcp interfaces the flows are spread over.
pub const SHARDS: usize = 64;
/// Largest chunk read from a socket into one [`Event::Data`].
const CHUNK: usize = 64 * 1024;
/// Channel bytes a flow may hold beyond its socket's send buffer before the driver stops
/// reading its channel ([`Engine::wants_data`]).
pub const PENDING_LOW: usize = 64 * 1024;
/// How often every flow is re-examined even without new packets (catches timer-driven
/// state changes such as retransmission timeouts).
const SWEEP_INTERVAL: Duration = Duration::from_millis(1000);
/// A flow whose SYN-ACK the app never acknowledges is dropped this long after the SYN-ACK
/// first went out, as Linux gives up on a SYN-RECEIVED connection after its five SYN-ACK
/// retransmissions (1 + 2 + 4 + 8 + 16 s, then 32 s for the last one): a spoofed source or a
/// firewall dropping SYN-ACKs no longer holds a flow slot and an SSH channel forever.
pub const SYN_RECEIVED_TIMEOUT: Duration = Duration::from_secs(63);

/// ICMP unreachable replies (to UDP and ICMP for routed addresses) sent at most this many a
/// second, after a burst of [`ICMP_BURST`], as Linux's `icmp_msgs_per_sec` and
/// `icmp_msgs_burst`: a local flood of UDP to VPC addresses cannot make the engine answer
/// it packet for packet.
pub const ICMP_RATE: u32 = 1000;
/// See [`ICMP_RATE`].
pub const ICMP_BURST: u32 = 50;

/// Default of [`EngineConfig::max_inbound`] (`--max-inbound`).
pub const DEFAULT_MAX_INBOUND: usize = 1_000;

/// Tunables of the engine.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// The TUN MTU: largest IP packet exchanged with the kernel.
    pub mtu: usize,
    /// Concurrent outbound flows (the laptop's own connections) beyond which new SYNs are
    /// answered with a reset.
    pub max_flows: usize,
    /// Concurrent inbound flows (cloud callers through `--expose`), a budget of their own so
    /// that callers can never take the laptop's own connections' slots.
    pub max_inbound: usize,
    /// Size of each smoltcp socket's receive and send buffers.
    pub tcp_buffer: usize,
    /// Bytes of one flow handed to the SSH side and not yet written there: the app's upload
    /// is paused beyond this (backpressure from the SSH channel window).
    pub max_inflight: usize,
    /// [`Event::Data`] messages of one flow not yet acknowledged by [`Engine::handle_sent`]:
    /// with `max_inflight` this bounds the driver's per-flow write queue.
    pub max_inflight_msgs: usize,
    /// How long an outbound flow's SYN is held for its channel to open: then the app gets a
    /// reset ([`CloseReason::OpenTimedOut`]). Checked once a second.
    pub open_timeout: Duration,
    /// How packets look on the TUN (a header in front, checksum offload).
    pub tun: TunFormat,
    /// How long a flow that ended normally (FIN both ways) may take to write what it still
    /// holds for its channel: then the rest is discarded and the channel closed
    /// ([`Event::CloseNow`]). Until then it is closing: counted against the limits.
    pub close_linger: Duration,
    /// The memory budget (`--memory-budget`, see [`crate::budget`]): as it fills, each
    /// flow's upload credit and what the engine puts in its socket for the app shrink, down
    /// to [`crate::budget::FLOOR`]. `None`: no budget.
    pub memory_budget: Option<u64>,
    /// UDP datagrams are handed to the driver ([`Event::Datagram`]) for the direct path
    /// (`mse-vpn run`: see [`crate::relay::DirectConfig`]) instead of being answered with
    /// ICMP port unreachable. Off in `up`.
    pub datagrams: bool,
    /// How long an app's segment may wait for its ACK, so that the ACK rides on the answer
    /// (a request's reply comes back from the jump host within about this) instead of being
    /// a packet of its own; every second full-sized segment is ACKed at once (RFC 9293), so
    /// bulk uploads are not slowed. `None`: every segment is ACKed at once. An app with
    /// Nagle on that writes a request in two pieces waits up to this for the second one to
    /// leave, as it would behind Linux's own delayed ACK (40 ms) with `ssh -L` or a server.
    pub ack_delay: Option<Duration>,
}

/// Default of [`EngineConfig::ack_delay`]. Measured (12-07, `scripts/bench`, A/B): redis
/// `-c 50` +6 %, keep-alive HTTP +7 %, `Connection: close` +5 %; bulk rows unchanged.
pub const DEFAULT_ACK_DELAY: Duration = Duration::from_millis(10);

/// Default of [`EngineConfig::close_linger`]: Linux's `tcp_fin_timeout`.
pub const DEFAULT_CLOSE_LINGER: Duration = Duration::from_secs(60);

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            mtu: 65_000,
            max_flows: 10_000,
            max_inbound: DEFAULT_MAX_INBOUND,
            tcp_buffer: 512 * 1024,
            max_inflight: 4 * 1024 * 1024,
            max_inflight_msgs: 128,
            open_timeout: Duration::from_secs(10),
            tun: TunFormat::default(),
            close_linger: DEFAULT_CLOSE_LINGER,
            memory_budget: None,
            datagrams: false,
            ack_delay: Some(DEFAULT_ACK_DELAY),
        }
    }
}

/// What the engine asks the driver to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// Open a `direct-tcpip` channel to `key.dst` with `key.src` as the originator; answer
    /// with [`Engine::handle_open_ok`] or [`Engine::handle_open_failed`].
    Open {
        /// The new flow.
        id: FlowId,
        /// Its 4-tuple.
        key: FlowKey,
    },
    /// An inbound flow ([`Engine::connect_inbound`]) was answered by the local app: accept
    /// its channel; data may follow at once.
    Connected {
        /// The flow.
        id: FlowId,
    },
    /// Send these bytes on the flow's channel, then call [`Engine::handle_sent`].
    Data {
        /// The flow.
        id: FlowId,
        /// Bytes the app sent.
        data: Bytes,
    },
    /// The app shut down its write side: send EOF on the channel (after any earlier data).
    Eof {
        /// The flow.
        id: FlowId,
    },
    /// A new connection was refused at once, without becoming a flow (for logs).
    Refused {
        /// Its 4-tuple.
        key: FlowKey,
        /// Why ([`CloseReason::FlowLimit`]).
        reason: CloseReason,
    },
    /// The flow is over: close its channel, after the data already handed over if
    /// [`CloseReason::flushes`] (a normal end), at once discarding it otherwise (a reset).
    /// A flow whose channel was open stays *closing* until [`Engine::handle_close_done`].
    Close {
        /// The flow.
        id: FlowId,
        /// Its 4-tuple (for logs).
        key: FlowKey,
        /// Why it ended.
        reason: CloseReason,
    },
    /// A closing flow's channel did not finish writing what it held within
    /// [`EngineConfig::close_linger`]: discard the rest and close the channel now.
    CloseNow {
        /// The flow.
        id: FlowId,
    },
    /// An ICMP echo request (ping) from the app ([`EngineConfig::datagrams`]): carry it, or
    /// answer with [`Engine::handle_echo_prohibited`]. Replies come back through
    /// [`Engine::handle_echo_reply`].
    Echo {
        /// The app's address.
        src: std::net::IpAddr,
        /// The pinged address.
        dst: std::net::IpAddr,
        /// The app's identifier (its ping socket).
        ident: u16,
        /// The request's sequence number.
        seq: u16,
        /// The ICMP message (header and data), as an unprivileged ICMP socket sends it.
        message: Bytes,
    },
    /// A UDP datagram from the app ([`EngineConfig::datagrams`]): carry it, or answer with
    /// [`Engine::handle_port_unreachable`]. Replies come back through
    /// [`Engine::handle_datagram`].
    Datagram {
        /// The app's socket.
        src: std::net::SocketAddr,
        /// Where it is sent.
        dst: std::net::SocketAddr,
        /// Its payload.
        payload: Bytes,
    },
}

/// Why [`Engine::connect_inbound`] could not start a flow (the caller's channel is rejected).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InboundError {
    /// The concurrent flow limit (`--max-flows`) is reached.
    #[error("the flow limit is reached")]
    FlowLimit,
    /// A flow with the same 4-tuple is live (a caller port reused too early).
    #[error("a flow with the same addresses is still open")]
    Duplicate,
    /// The caller's and the local address are of different families, or a port is 0.
    #[error("the caller's address cannot be mapped into the TUN")]
    Unroutable,
}

/// Counters since the engine started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Flows live right now (opening or open), inbound ones included.
    pub flows_active: u64,
    /// Flows that ended whose channel is not closed yet (it is writing what it held, within
    /// [`EngineConfig::close_linger`]); they count against the flow limits.
    pub flows_closing: u64,
    /// Closing flows whose flush ran out of time ([`Event::CloseNow`]).
    pub close_flushes_cut: u64,
    /// Bytes the engine holds for flows right now: waiting for the app or for its
    /// acknowledgement, and taken from the app and not yet written to the channel.
    pub buffered: u64,
    /// Receive windows committed to channels, as last reported by the memory budget.
    pub windows: u64,
    /// The memory budget ([`EngineConfig::memory_budget`]; 0: none).
    pub memory_budget: u64,
    /// Inbound flows (cloud callers) live right now.
    pub inbound_active: u64,
    /// Flows admitted (SYN held, channel requested).
    pub flows_opened: u64,
    /// SYNs refused because of the flow limit.
    pub flows_over_limit: u64,
    /// Flows whose channel could not be opened.
    pub flows_refused: u64,
    /// Inbound flows (cloud callers through `--expose` listeners) started.
    pub inbound_opened: u64,
    /// Inbound flows the local app refused (closed port) or never answered.
    pub inbound_refused: u64,
    /// Bytes from apps to the SSH side.
    pub bytes_up: u64,
    /// Bytes from the SSH side to apps.
    pub bytes_down: u64,
    /// Packets dropped while classifying (malformed, multicast, fragments...).
    pub packets_dropped: u64,
    /// ICMP unreachable replies sent for traffic the tunnel does not carry.
    pub icmp_rejects: u64,
    /// ICMP unreachable replies not sent, over the rate limit ([`ICMP_RATE`]).
    pub icmp_rejects_suppressed: u64,
    /// RSTs not taken while a flow's SYN is held (its channel opening): any but the one at
    /// the sequence number right after the SYN (RFC 5961). Once a smoltcp socket terminates
    /// the flow, smoltcp screens RSTs and SYNs itself (our patches 0002 to 0004).
    pub rst_syn_screened: u64,
    /// Flows dropped because the app never acknowledged their SYN-ACK.
    pub syn_received_timeouts: u64,
    /// Packets for the TUN dropped because writing them failed for a passing reason
    /// (`ENOBUFS`, the link down): TCP retransmits them.
    pub tun_write_drops: u64,
    /// Reads from the TUN that failed for a passing reason.
    pub tun_read_errors: u64,
    /// UDP datagrams and echo requests from apps handed over for the direct path
    /// ([`Event::Datagram`], [`Event::Echo`]).
    pub datagrams_up: u64,
    /// UDP datagrams and echo replies written back to apps ([`Engine::handle_datagram`],
    /// [`Engine::handle_echo_reply`]).
    pub datagrams_down: u64,
    /// Those dropped: larger than the TUN's MTU, of the wrong family, or not an echo reply.
    pub datagrams_dropped: u64,
}

/// Where a flow is in its life.
///
/// ```text
///  outbound:  Opening ──channel open──▶ Open ──FIN both ways / RST──▶ (reaped)
///  inbound:   Connecting ──app answers──▶ Open
///  any phase with a socket ──engine resets it──▶ Ending ──RST out──▶ (reaped)
/// ```
enum Phase {
    /// Outbound: the app's SYN is held (its header only: see [`packet::syn_header`]) while
    /// the channel opens; refused at `deadline`.
    Opening { syn: Vec<u8>, deadline: Instant },
    /// Inbound: our SYN, from the caller's address, is out to the local app; no answer yet.
    Connecting { handle: SocketHandle },
    /// A smoltcp socket terminates the flow and bytes are relayed.
    Open { handle: SocketHandle, relay: Relay },
    /// The engine reset the flow; it is reaped once smoltcp's RST is out.
    Ending {
        handle: SocketHandle,
        reason: CloseReason,
    },
}

impl Phase {
    /// The flow's socket, once it has one.
    fn handle(&self) -> Option<SocketHandle> {
        match self {
            Phase::Opening { .. } => None,
            Phase::Connecting { handle }
            | Phase::Open { handle, .. }
            | Phase::Ending { handle, .. } => Some(*handle),
        }
    }
}

/// The two directions of an open flow.
struct Relay {
    /// SSH → app.
    down: Down,
    /// App → SSH.
    up: Up,
    /// When the SYN-ACK first went out, until the app acknowledges it (outbound flows): the
    /// handshake times out from here.
    handshake: Option<Instant>,
}

impl Relay {
    fn new(handshake: Option<Instant>) -> Relay {
        Relay {
            down: Down::Open,
            up: Up::Open,
            handshake,
        }
    }
}

/// SSH → app.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Down {
    /// Channel data goes to the app.
    Open,
    /// The channel sent EOF: the app gets FIN once what is pending is in its socket.
    Eof,
    /// The FIN is queued on the socket.
    FinQueued,
}

/// App → SSH.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Up {
    /// The app's bytes go to the channel.
    Open,
    /// The app sent FIN and all its data was handed over ([`Event::Eof`]).
    Eof,
    /// The channel is closed: the app's bytes have nowhere to go and are dropped.
    Gone,
}

struct Flow {
    key: FlowKey,
    phase: Phase,
    /// Bytes given to the SSH side and not yet acknowledged by `handle_sent`.
    inflight: usize,
    /// `Event::Data` messages not yet acknowledged by `handle_sent`.
    inflight_msgs: usize,
    /// Bytes from the SSH side waiting for room in the socket's send buffer.
    pending: VecDeque<Bytes>,
    pending_len: usize,
    /// In the dirty list.
    dirty: bool,
    /// Bytes that went through the socket's buffers, both ways (see [`sockets`]).
    moved: u64,
    /// The driver has a channel for it (from [`Engine::handle_open_ok`], or
    /// [`Event::Connected`] for an inbound flow): its end makes it closing.
    channel: bool,
    /// Bytes it holds, as of its last service (counted in [`Engine::buffered`]).
    held: u64,
}

impl Flow {
    /// A new flow in `phase` with nothing relayed yet.
    fn new(key: FlowKey, phase: Phase) -> Flow {
        Flow {
            key,
            phase,
            inflight: 0,
            inflight_msgs: 0,
            pending: VecDeque::new(),
            pending_len: 0,
            dirty: false,
            moved: 0,
            channel: false,
            held: 0,
        }
    }

    /// The engine reset it.
    fn ending(&self) -> bool {
        matches!(self.phase, Phase::Ending { .. })
    }
}

/// One smoltcp interface with its sockets and packet queues.
struct Shard {
    iface: Interface,
    device: QueueDevice,
    sockets: SocketSet<'static>,
    /// Has queued ingress or changed sockets: poll it.
    active: bool,
    /// When its timers need a poll (cached after each poll).
    poll_at: Option<Instant>,
}

/// A smoltcp interface answering for every address, its random generator seeded with `seed`
/// and its TCP initial sequence numbers chosen as RFC 6528 asks, keyed with `isn_secret`
/// (our smoltcp patch 0005): a clock plus a keyed hash of the 4-tuple, so that no ISN says
/// anything about another connection's.
fn new_iface(device: &mut QueueDevice, now: Instant, seed: u64, isn_secret: [u8; 16]) -> Interface {
    let mut config = Config::new(HardwareAddress::Ip);
    config.random_seed = seed;
    let mut iface = Interface::new(config, device, now);
    iface.set_tcp_isn_secret(Some(isn_secret));
    iface.set_any_ip(true);
    iface.update_ip_addrs(|addrs| {
        // Capacity is set by the `iface-max-addr-count-2` feature: two always fit.
        let _ = addrs.push(IpCidr::new(IpAddress::Ipv4(IFACE_V4), 32));
        let _ = addrs.push(IpCidr::new(IpAddress::Ipv6(IFACE_V6), 128));
    });
    // Replies go back to whatever address the app used: default routes via ourselves.
    let _ = iface.routes_mut().add_default_ipv4_route(IFACE_V4);
    let _ = iface.routes_mut().add_default_ipv6_route(IFACE_V6);
    iface
}

impl Shard {
    fn new(mtu: usize, tun: TunFormat, now: Instant, seed: u64, isn_secret: [u8; 16]) -> Shard {
        let mut device = QueueDevice::with_format(mtu, tun);
        let iface = new_iface(&mut device, now, seed, isn_secret);
        Shard {
            iface,
            device,
            sockets: SocketSet::new(Vec::new()),
            active: false,
            poll_at: None,
        }
    }

    /// Runs smoltcp on this shard and moves what it sent to `tx`. Packet buffers come from
    /// the engine's one pool of spares, lent to the shard's device for the call; the read
    /// buffers of the packets it processed go back to that pool.
    fn poll(&mut self, now: Instant, tx: &mut VecDeque<Vec<u8>>, pool: &mut QueueDevice) {
        std::mem::swap(self.device.spare_mut(), pool.spare_mut());
        sockets::set_clock(now);
        self.iface.poll(now, &mut self.device, &mut self.sockets);
        std::mem::swap(self.device.spare_mut(), pool.spare_mut());
        for buf in self.device.rx_spare.drain(..) {
            pool.recycle_rx(buf);
        }
        tx.append(&mut self.device.tx);
        self.poll_at = self.iface.poll_at(now, &self.sockets);
        self.active = false;
    }

    fn inject(&mut self, packet: impl Into<RxPacket>) {
        self.device.rx.push_back(packet.into());
        self.active = true;
    }
}

/// The shard of a flow.
fn shard_of(id: FlowId) -> usize {
    (id.0 % SHARDS as u64) as usize
}

/// The engine. See the module documentation.
pub struct Engine {
    config: EngineConfig,
    shards: Vec<Shard>,
    /// Packets for the TUN, from every shard.
    tx: VecDeque<Vec<u8>>,
    /// Spare packet buffers, shared by the shards (see [`Shard::poll`]).
    spare: QueueDevice,
    flows: FlowTable<Flow>,
    events: VecDeque<Event>,
    dirty: Vec<FlowId>,
    next_sweep: Instant,
    stats: EngineStats,
    /// Flows whose channel the driver may read again (see [`Engine::poll_room`]).
    room: Vec<FlowId>,
    /// Closed sockets for the next flows.
    sockets: sockets::SocketPool,
    /// Flows that ended whose channel is not closed yet.
    closing: closing::ClosingFlows,
    /// The rate limit of ICMP unreachable replies.
    icmp: bucket::Bucket,
    /// Bytes all flows hold (the sum of their `held`).
    buffered: u64,
    /// Receive windows committed to channels, as last reported ([`Engine::handle_windows`]).
    windows: u64,
}

impl Engine {
    /// A new engine; `now` is the driver's clock, `seed` the engine's only source of
    /// randomness (give it 32 random bytes; tests give a fixed value and replay from it).
    pub fn new(config: EngineConfig, now: Instant, seed: Seed) -> Engine {
        let mut rng = StdRng::from_seed(seed);
        let isn_secret: [u8; 16] = rng.random();
        Engine {
            shards: (0..SHARDS)
                .map(|_| Shard::new(config.mtu, config.tun, now, rng.random(), isn_secret))
                .collect(),
            spare: QueueDevice::with_format(config.mtu, config.tun),
            sockets: sockets::SocketPool::new(config.tcp_buffer, config.ack_delay),
            config,
            tx: VecDeque::new(),
            flows: FlowTable::default(),
            events: VecDeque::new(),
            dirty: Vec::new(),
            next_sweep: now + SWEEP_INTERVAL,
            stats: EngineStats::default(),
            room: Vec::new(),
            closing: closing::ClosingFlows::default(),
            icmp: bucket::Bucket::new(ICMP_RATE, ICMP_BURST),
            buffered: 0,
            windows: 0,
        }
    }

    /// Counters since start.
    pub fn stats(&self) -> EngineStats {
        EngineStats {
            flows_active: self.flows.len() as u64,
            inbound_active: self.flows.inbound_len() as u64,
            flows_closing: self.closing.len() as u64,
            buffered: self.buffered,
            windows: self.windows,
            memory_budget: self.config.memory_budget.unwrap_or(0),
            ..self.stats
        }
    }

    /// Number of live flows (opening or open).
    pub fn flow_count(&self) -> usize {
        self.flows.len()
    }

    /// The 4-tuple of a live flow.
    pub fn flow_key(&self, id: FlowId) -> Option<FlowKey> {
        self.flows.get(id).map(|f| f.key)
    }

    /// One raw IP packet read from the TUN.
    pub fn handle_tun_packet(&mut self, now: Instant, packet: Vec<u8>) {
        self.handle_tun_read(now, packet.into());
    }

    /// A buffer for the next TUN read ([`rx_buffer_len`] bytes, recycled: no zero-filling).
    /// Hand it back with [`Engine::handle_tun_read`].
    pub fn rx_buffer(&mut self) -> Vec<u8> {
        self.spare.rx_buffer()
    }

    /// One raw IP packet read from the TUN into a buffer from [`Engine::rx_buffer`].
    pub fn handle_tun_read(&mut self, now: Instant, packet: RxPacket) {
        let ingress = match packet::classify_with(packet.bytes(), !self.config.tun.checksum_offload)
        {
            Ingress::Udp { .. } if !self.config.datagrams => Ingress::Reject(Unreachable::Port),
            Ingress::Echo { .. } if !self.config.datagrams => {
                Ingress::Reject(Unreachable::Prohibited)
            }
            ingress => ingress,
        };
        match ingress {
            Ingress::Udp {
                src,
                dst,
                start,
                len,
            } => {
                let payload = Bytes::copy_from_slice(&packet.bytes()[start..start + len]);
                self.spare.recycle_rx(packet.buf);
                self.stats.datagrams_up += 1;
                self.events.push_back(Event::Datagram { src, dst, payload });
            }
            Ingress::Echo {
                src,
                dst,
                ident,
                seq,
                start,
                len,
            } => {
                let message = Bytes::copy_from_slice(&packet.bytes()[start..start + len]);
                self.spare.recycle_rx(packet.buf);
                self.stats.datagrams_up += 1;
                self.events.push_back(Event::Echo {
                    src,
                    dst,
                    ident,
                    seq,
                    message,
                });
            }
            Ingress::Drop(_) => {
                self.stats.packets_dropped += 1;
                self.spare.recycle_rx(packet.buf);
            }
            Ingress::Reject(_) if !self.icmp.take(now) => {
                self.stats.icmp_rejects_suppressed += 1;
                self.spare.recycle_rx(packet.buf);
            }
            Ingress::Reject(kind) => {
                if let Some(reply) = packet::unreachable_reply(packet.bytes(), kind) {
                    self.stats.icmp_rejects += 1;
                    self.tx
                        .push_back(device::with_header(self.config.tun, reply));
                }
                self.spare.recycle_rx(packet.buf);
            }
            Ingress::Tcp { key, flags, seq } => match self.flows.id_of(&key) {
                Some(id) => self.flow_packet(now, id, flags, seq, packet),
                None if flags.is_connect() => {
                    let syn = packet::syn_header(packet.bytes());
                    self.spare.recycle_rx(packet.buf);
                    self.admit(now, key, syn);
                }
                // A segment of no known flow: smoltcp answers with RST (or ignores an RST).
                None => self.shards[0].inject(packet),
            },
        }
    }

    fn flow_packet(
        &mut self,
        now: Instant,
        id: FlowId,
        flags: TcpFlags,
        seq: TcpSeqNumber,
        packet: RxPacket,
    ) {
        let Some(flow) = self.flows.get_mut(id) else {
            self.spare.recycle_rx(packet.buf);
            return;
        };
        match &mut flow.phase {
            Phase::Opening { syn, .. } => {
                if flags.is_connect() {
                    // A retransmitted SYN: keep the newest, do not open a second channel.
                    if let Some(header) = packet::syn_header(packet.bytes()) {
                        *syn = header;
                    }
                } else if flags.rst {
                    // Nothing was sent to the app yet: the only RST it can mean is one at the
                    // sequence number right after its SYN (RFC 5961); with it, the app gave up
                    // before the channel opened.
                    if packet::tcp_seq(syn).is_some_and(|isn| seq == isn + 1) {
                        self.end(now, id, CloseReason::AppReset);
                    } else {
                        self.stats.rst_syn_screened += 1;
                    }
                }
                self.spare.recycle_rx(packet.buf);
            }
            // smoltcp takes it from here, RFC 5961's checks included.
            Phase::Connecting { .. } | Phase::Open { .. } | Phase::Ending { .. } => {
                self.shards[shard_of(id)].inject(packet);
                mark_dirty(&mut self.dirty, id, flow);
            }
        }
    }

    /// Polls one shard.
    fn poll_shard(&mut self, i: usize, now: Instant) {
        self.shards[i].poll(now, &mut self.tx, &mut self.spare);
    }

    fn admit(&mut self, now: Instant, key: FlowKey, syn: Option<Vec<u8>>) {
        // Only the header is held (the app retransmits any data the SYN carried).
        let Some(syn) = syn else {
            self.stats.packets_dropped += 1;
            return;
        };
        let outbound = self.flows.len() - self.flows.inbound_len() + self.closing.outbound();
        if outbound >= self.config.max_flows {
            self.stats.flows_over_limit += 1;
            self.events.push_back(Event::Refused {
                key,
                reason: CloseReason::FlowLimit,
            });
            // No socket listens for it: smoltcp answers the SYN with RST.
            self.shards[0].inject(syn);
            return;
        }
        self.stats.flows_opened += 1;
        let deadline = now + self.config.open_timeout;
        let id = self
            .flows
            .insert(key, |_| Flow::new(key, Phase::Opening { syn, deadline }));
        self.events.push_back(Event::Open { id, key });
    }

    /// The channel for `id` is open: let smoltcp accept the held SYN.
    pub fn handle_open_ok(&mut self, now: Instant, id: FlowId) {
        // Drain the shard's queued ingress first so that no packet already queued can reach
        // the new listening socket before its own SYN does.
        let i = shard_of(id);
        if !self.shards[i].device.rx.is_empty() {
            self.poll_shard(i, now);
        }
        let shard = &mut self.shards[i];
        let Some(flow) = self.flows.get_mut(id) else {
            return;
        };
        let Phase::Opening { syn, .. } = &mut flow.phase else {
            return;
        };
        let syn = std::mem::take(syn);
        // The driver holds the channel from here on, whatever happens next.
        flow.channel = true;
        let mut socket = self.sockets.take();
        let endpoint = IpListenEndpoint {
            addr: Some(flow.key.dst.ip().into()),
            port: flow.key.dst.port(),
        };
        if socket.listen(endpoint).is_err() {
            // Port 0 cannot be listened on: refuse like a closed port.
            self.refuse(now, id, syn, CloseReason::OpenRefused);
            return;
        }
        let handle = shard.sockets.add(socket);
        flow.phase = Phase::Open {
            handle,
            relay: Relay::new(Some(now)),
        };
        shard.inject(syn);
        self.poll_shard(i, now);
        if self.flows.get(id).is_none() {
            return;
        }
        let socket = self.shards[i].sockets.get::<tcp::Socket>(handle);
        if socket.state() == tcp::State::Listen {
            // smoltcp did not take the SYN (it should always): never leave a listener behind.
            self.end(now, id, CloseReason::OpenRefused);
        }
    }

    /// A cloud caller reached an `--expose` listener: open a TCP connection into the TUN from
    /// `caller` (its own address, so the local app sees who called) to `local` (the TUN's
    /// address and the app's port). [`Event::Connected`] follows once the app answers, or
    /// [`Event::Close`] with [`CloseReason::LocalRefused`] if it resets the SYN or stays silent
    /// for `timeout`.
    pub fn connect_inbound(
        &mut self,
        now: Instant,
        caller: std::net::SocketAddr,
        local: std::net::SocketAddr,
        timeout: Duration,
    ) -> Result<FlowId, InboundError> {
        if caller.is_ipv4() != local.is_ipv4() || caller.port() == 0 || local.port() == 0 {
            return Err(InboundError::Unroutable);
        }
        if self.flows.inbound_len() + self.closing.inbound() >= self.config.max_inbound {
            self.stats.flows_over_limit += 1;
            return Err(InboundError::FlowLimit);
        }
        let key = FlowKey {
            src: local,
            dst: caller,
        };
        if self.flows.id_of(&key).is_some() {
            return Err(InboundError::Duplicate);
        }
        // The socket is added below, once the flow's id (and so its shard) is known.
        let id = self.flows.insert_inbound(key, |_| {
            Flow::new(
                key,
                Phase::Opening {
                    syn: Vec::new(),
                    deadline: now,
                },
            )
        });
        let mut socket = self.sockets.take();
        socket.set_timeout(Some(timeout));
        let shard = &mut self.shards[shard_of(id)];
        if socket
            .connect(shard.iface.context(), local, IpListenEndpoint::from(caller))
            .is_err()
        {
            self.flows.remove(id, &key);
            return Err(InboundError::Unroutable);
        }
        let handle = shard.sockets.add(socket);
        shard.active = true;
        self.stats.inbound_opened += 1;
        if let Some(flow) = self.flows.get_mut(id) {
            flow.phase = Phase::Connecting { handle };
            mark_dirty(&mut self.dirty, id, flow);
        }
        self.poll(now);
        Ok(id)
    }

    /// The channel for `id` could not be opened: the app gets a TCP reset for its SYN.
    pub fn handle_open_failed(&mut self, now: Instant, id: FlowId, reason: CloseReason) {
        let Some(flow) = self.flows.get_mut(id) else {
            return;
        };
        if let Phase::Opening { syn, .. } = &mut flow.phase {
            let syn = std::mem::take(syn);
            self.refuse(now, id, syn, reason);
        }
    }

    fn refuse(&mut self, now: Instant, id: FlowId, syn: Vec<u8>, reason: CloseReason) {
        if self.flows.get(id).is_none() {
            return;
        }
        match reason {
            CloseReason::OpenLimit => self.stats.flows_over_limit += 1,
            _ => self.stats.flows_refused += 1,
        }
        // With no socket listening, smoltcp answers the held SYN with RST.
        self.shards[shard_of(id)].inject(syn);
        self.end(now, id, reason);
    }

    /// Ends a flow: gives its socket, if it has one, back to the pool (see [`sockets`]),
    /// forgets the flow and tells the driver to close its channel ([`Event::Close`]); a flow
    /// that had a channel is closing until [`Engine::handle_close_done`]. Every end of a flow
    /// goes through here.
    fn end(&mut self, now: Instant, id: FlowId, reason: CloseReason) {
        let inbound = self.flows.is_inbound(id);
        let Some(key) = self.flows.get(id).map(|f| f.key) else {
            return;
        };
        let Some(flow) = self.flows.remove(id, &key) else {
            return;
        };
        if let Some(handle) = flow.phase.handle() {
            let socket = self.shards[shard_of(id)].sockets.remove(handle);
            self.sockets.give(socket, flow.moved);
        }
        self.buffered -= flow.held;
        if flow.channel {
            self.closing
                .insert(id, inbound, reason.flushes(), now, self.config.close_linger);
        }
        self.events.push_back(Event::Close { id, key, reason });
    }

    /// Checks the engine's invariants, for tests and fuzzers (`fuzz/`): no socket listens
    /// (each one listens only for the call that feeds it its SYN); every socket belongs to a
    /// live flow, and every flow past its open has one; `buffered` is the sum of what the
    /// flows hold. O(flows): not for the packet path.
    #[doc(hidden)]
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut sockets = 0;
        for shard in &self.shards {
            for (_, s) in shard.sockets.iter() {
                #[allow(irrefutable_let_patterns)]
                if let smoltcp::socket::Socket::Tcp(s) = s
                    && s.state() == tcp::State::Listen
                {
                    return Err("a socket is listening".into());
                }
                sockets += 1;
            }
        }
        let with_socket = self
            .flows
            .iter()
            .filter(|(_, f)| f.phase.handle().is_some())
            .count();
        if sockets != with_socket {
            return Err(format!(
                "{sockets} sockets for {with_socket} flows with one"
            ));
        }
        let held: u64 = self.flows.iter().map(|(_, f)| f.held).sum();
        if held != self.buffered {
            return Err(format!(
                "buffered {} but the flows hold {held}",
                self.buffered
            ));
        }
        Ok(())
    }

    /// The receive windows committed to channels now (from the memory budget): what the
    /// flows' allowances are reckoned against, with what the engine holds.
    pub fn handle_windows(&mut self, windows: u64) {
        self.windows = windows;
    }

    /// What a flow holding `own` bytes may hold now, down (socket and pending bytes for the
    /// app) and up (taken from the app, not yet written): see [`EngineConfig::memory_budget`].
    fn allowances(&self, own: u64) -> (usize, usize) {
        let Some(limit) = self.config.memory_budget else {
            return (usize::MAX, self.config.max_inflight);
        };
        let others = (self.windows + self.buffered).saturating_sub(own);
        let share = |max: usize| {
            crate::budget::allowance(limit, others, max as u64, crate::budget::FLOOR) as usize
        };
        (
            share(self.config.tcp_buffer + PENDING_LOW),
            share(self.config.max_inflight),
        )
    }

    /// The channel of a flow that ended is closed (its close went out, or it was already
    /// gone): the flow no longer counts as closing. Call it once the driver let go of the
    /// channel of any flow that ended (unknown ids are ignored).
    pub fn handle_close_done(&mut self, id: FlowId) {
        self.closing.done(id);
    }

    /// Lets go of what is kept for the next flows and packets: the spare sockets (their
    /// buffers) and the pooled packet buffers. The relay calls it each time freed memory goes
    /// back to the system (flows closed, or a burst went quiet; at most every 2 s), so what
    /// the pools hold goes back too: after the benchmark's workloads the 64 pooled TUN read
    /// buffers alone kept 4 MB resident. The next packets and flows allocate again.
    pub fn drop_spares(&mut self) {
        self.sockets.drop_spares();
        self.spare.drop_spares();
    }

    /// Spare sockets and pooled packet buffers held now (see [`Engine::drop_spares`]).
    #[cfg(test)]
    pub(crate) fn spares(&self) -> usize {
        self.sockets.spares() + self.spare.spares()
    }

    /// Cuts short the flushes of closing flows that ran out of time.
    fn expire_closing(&mut self, now: Instant) {
        let expired = self.closing.expire(now);
        self.stats.close_flushes_cut += expired.cut.len() as u64;
        for id in expired.cut {
            self.events.push_back(Event::CloseNow { id });
        }
    }

    /// Bytes that arrived on the flow's channel. Read a flow's channel only while
    /// [`Engine::wants_data`] says so: the flow then holds at most [`PENDING_LOW`] bytes plus
    /// one channel message beyond its socket's buffer, and the SSH window, re-opened only as
    /// the driver reads, carries the app's pace to the jump host.
    pub fn handle_channel_data(&mut self, _now: Instant, id: FlowId, data: Bytes) {
        let Some(flow) = self.flows.get_mut(id) else {
            return;
        };
        let takes = match &flow.phase {
            Phase::Opening { .. } | Phase::Ending { .. } => false,
            Phase::Connecting { .. } => true,
            Phase::Open { relay, .. } => relay.down == Down::Open,
        };
        if !takes || data.is_empty() {
            return;
        }
        flow.pending_len += data.len();
        flow.pending.push_back(data);
        mark_dirty(&mut self.dirty, id, flow);
    }

    /// True while the flow can take more channel data (see [`Engine::handle_channel_data`]);
    /// when it says no, [`Engine::poll_room`] names the flow once it can again. A flow that is
    /// gone or ending takes anything (and drops it), so its channel never stalls.
    pub fn wants_data(&self, id: FlowId) -> bool {
        self.flows
            .get(id)
            .is_none_or(|f| f.ending() || f.pending_len < PENDING_LOW)
    }

    /// A flow that [`Engine::wants_data`] refused earlier and that can take data again.
    pub fn poll_room(&mut self) -> Option<FlowId> {
        self.room.pop()
    }

    /// The channel sent EOF: the app gets FIN after the data already received.
    pub fn handle_channel_eof(&mut self, _now: Instant, id: FlowId) {
        if let Some(flow) = self.flows.get_mut(id)
            && let Phase::Open { relay, .. } = &mut flow.phase
            && relay.down == Down::Open
        {
            relay.down = Down::Eof;
            mark_dirty(&mut self.dirty, id, flow);
        }
    }

    /// The channel was closed by the jump host. Without a prior EOF this is a reset.
    pub fn handle_channel_closed(&mut self, now: Instant, id: FlowId) {
        let Some(flow) = self.flows.get_mut(id) else {
            return;
        };
        match &mut flow.phase {
            // After its EOF: the app still gets what is pending, then FIN; what it sends has
            // nowhere to go.
            Phase::Open { relay, .. } if relay.down != Down::Open => {
                if relay.up == Up::Open {
                    relay.up = Up::Gone;
                }
                mark_dirty(&mut self.dirty, id, flow);
            }
            _ => self.abort(now, id, CloseReason::RemoteReset),
        }
    }

    /// The driver wrote one earlier [`Event::Data`] of this flow, `n` bytes long, to the
    /// channel. Call it once per `Data` event.
    pub fn handle_sent(&mut self, id: FlowId, n: usize) {
        if let Some(flow) = self.flows.get_mut(id) {
            flow.inflight = flow.inflight.saturating_sub(n);
            flow.inflight_msgs = flow.inflight_msgs.saturating_sub(1);
            mark_dirty(&mut self.dirty, id, flow);
        }
    }

    /// Resets every flow (the SSH connection was lost, or mse-vpn is stopping).
    pub fn reset_all(&mut self, now: Instant, reason: CloseReason) {
        let ids: Vec<FlowId> = self.flows.ids().collect();
        for id in ids {
            let opening = match self.flows.get_mut(id).map(|f| &mut f.phase) {
                Some(Phase::Opening { syn, .. }) => Some(std::mem::take(syn)),
                _ => None,
            };
            match opening {
                Some(syn) => self.refuse(now, id, syn, reason),
                None => self.abort(now, id, reason),
            }
        }
        self.poll(now);
    }

    /// Resets one flow towards the app; its `Close` event follows once the RST is out.
    pub fn abort(&mut self, now: Instant, id: FlowId, reason: CloseReason) {
        let Some(flow) = self.flows.get_mut(id) else {
            return;
        };
        match &mut flow.phase {
            Phase::Opening { syn, .. } => {
                let syn = std::mem::take(syn);
                self.refuse(now, id, syn, reason);
            }
            Phase::Connecting { handle } | Phase::Open { handle, .. } => {
                let handle = *handle;
                flow.phase = Phase::Ending { handle, reason };
                flow.pending.clear();
                flow.pending_len = 0;
                let shard = &mut self.shards[shard_of(id)];
                shard.sockets.get_mut::<tcp::Socket>(handle).abort();
                shard.active = true;
                mark_dirty(&mut self.dirty, id, flow);
            }
            Phase::Ending { .. } => mark_dirty(&mut self.dirty, id, flow),
        }
    }

    /// Runs the TCP stack and moves bytes between sockets and flow buffers.
    pub fn poll(&mut self, now: Instant) {
        if now >= self.next_sweep {
            self.next_sweep = now + SWEEP_INTERVAL;
            let ids: Vec<FlowId> = self.flows.ids().collect();
            for id in ids {
                if let Some(flow) = self.flows.get_mut(id) {
                    mark_dirty(&mut self.dirty, id, flow);
                }
                self.expire_handshake(now, id);
            }
            self.expire_closing(now);
        }
        for _ in 0..8 {
            for i in 0..SHARDS {
                let shard = &self.shards[i];
                if shard.active || shard.poll_at.is_some_and(|t| t <= now) {
                    self.poll_shard(i, now);
                }
            }
            if !self.service_dirty(now) {
                break;
            }
        }
    }

    /// Resets an outbound flow whose channel did not open within the open timeout
    /// ([`CloseReason::OpenTimedOut`]), or whose app has not acknowledged the SYN-ACK within
    /// [`SYN_RECEIVED_TIMEOUT`] (its channel is closed with [`CloseReason::TimedOut`]).
    fn expire_handshake(&mut self, now: Instant, id: FlowId) {
        let Some(flow) = self.flows.get_mut(id) else {
            return;
        };
        if let Phase::Opening { syn, deadline } = &mut flow.phase {
            if now >= *deadline {
                let syn = std::mem::take(syn);
                self.refuse(now, id, syn, CloseReason::OpenTimedOut);
            }
            return;
        }
        let Phase::Open { handle, relay } = &mut flow.phase else {
            return;
        };
        let Some(at) = relay.handshake else {
            return;
        };
        let socket = self.shards[shard_of(id)]
            .sockets
            .get::<tcp::Socket>(*handle);
        if socket.state() != tcp::State::SynReceived {
            relay.handshake = None; // past the handshake: never looked at again
            return;
        }
        if now >= at + SYN_RECEIVED_TIMEOUT {
            self.stats.syn_received_timeouts += 1;
            self.abort(now, id, CloseReason::TimedOut);
        }
    }

    /// The next event for the driver.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// The next packet to write to the TUN.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.tx.pop_front()
    }

    /// Gives a written packet's buffer back for reuse.
    pub fn recycle(&mut self, buf: Vec<u8>) {
        self.spare.recycle(buf);
    }

    /// A packet from [`Engine::poll_transmit`] could not be written to the TUN, for a
    /// passing reason: it is dropped (TCP retransmits, as for a packet lost on a wire) and
    /// counted; its buffer is reused.
    pub fn handle_transmit_dropped(&mut self, buf: Vec<u8>) {
        self.stats.tun_write_drops += 1;
        self.spare.recycle(buf);
    }

    /// A read from the TUN failed for a passing reason (counted).
    pub fn handle_receive_failed(&mut self) {
        self.stats.tun_read_errors += 1;
    }

    /// A datagram for the app at `to` from `from` (the address it sent to): written into the
    /// TUN as a UDP packet, or dropped (counted) if it does not fit the MTU.
    pub fn handle_datagram(
        &mut self,
        _now: Instant,
        from: std::net::SocketAddr,
        to: std::net::SocketAddr,
        payload: &[u8],
    ) {
        match packet::emit_udp(from, to, payload, self.config.mtu) {
            Some(p) => {
                self.stats.datagrams_down += 1;
                self.tx.push_back(device::with_header(self.config.tun, p));
            }
            None => self.stats.datagrams_dropped += 1,
        }
    }

    /// An echo reply for the app's ping socket `ident` at `to` from `from` (the address it
    /// pinged): `message` is the reply a host ICMP socket received; written into the TUN
    /// with the app's identifier, or dropped (counted).
    pub fn handle_echo_reply(
        &mut self,
        _now: Instant,
        (from, to): (std::net::IpAddr, std::net::IpAddr),
        ident: u16,
        message: &[u8],
    ) {
        match packet::echo_reply((from, to), ident, message, self.config.mtu) {
            Some(p) => {
                self.stats.datagrams_down += 1;
                self.tx.push_back(device::with_header(self.config.tun, p));
            }
            None => self.stats.datagrams_dropped += 1,
        }
    }

    /// The app's echo request is not carried: it gets an ICMP "administratively prohibited"
    /// (rate-limited as every ICMP reply of the engine, [`ICMP_RATE`]), as in `up`.
    pub fn handle_echo_prohibited(
        &mut self,
        now: Instant,
        (src, dst): (std::net::IpAddr, std::net::IpAddr),
        ident: u16,
        seq: u16,
    ) {
        self.icmp_reply(now, packet::echo_prohibited(src, dst, ident, seq));
    }

    /// Writes an ICMP error for the app, within the rate limit.
    fn icmp_reply(&mut self, now: Instant, reply: Option<Vec<u8>>) {
        if !self.icmp.take(now) {
            self.stats.icmp_rejects_suppressed += 1;
            return;
        }
        if let Some(reply) = reply {
            self.stats.icmp_rejects += 1;
            self.tx
                .push_back(device::with_header(self.config.tun, reply));
        }
    }

    /// The app's datagrams from `src` to `dst` are not carried: it gets an ICMP port
    /// unreachable (rate-limited as every ICMP reply of the engine, [`ICMP_RATE`]).
    pub fn handle_port_unreachable(
        &mut self,
        now: Instant,
        src: std::net::SocketAddr,
        dst: std::net::SocketAddr,
    ) {
        self.icmp_reply(now, packet::port_unreachable(src, dst));
    }

    /// When [`Engine::poll`] must run next even if nothing happens.
    pub fn poll_timeout(&mut self, now: Instant) -> Option<Instant> {
        let active = self.shards.iter().any(|s| s.active).then_some(now);
        let stack = self
            .shards
            .iter()
            .filter_map(|s| s.poll_at)
            .chain(active)
            .min();
        let sweep = (!self.flows.is_empty() || self.closing.len() > 0).then_some(self.next_sweep);
        match (stack, sweep) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Services every dirty flow; true if a socket changed so that smoltcp should run again.
    fn service_dirty(&mut self, now: Instant) -> bool {
        let mut again = false;
        let mut dirty = std::mem::take(&mut self.dirty);
        for id in dirty.drain(..) {
            again |= self.service(now, id);
        }
        if self.dirty.is_empty() {
            self.dirty = dirty; // keep the allocation
        }
        again
    }

    fn service(&mut self, now: Instant, id: FlowId) -> bool {
        let Some(own) = self.flows.get(id).map(|f| f.held) else {
            return false;
        };
        let (allow_down, allow_up) = self.allowances(own);
        let Some(flow) = self.flows.get_mut(id) else {
            return false;
        };
        flow.dirty = false;
        let Some(handle) = flow.phase.handle() else {
            return false;
        };
        let shard = &mut self.shards[shard_of(id)];
        let socket = shard.sockets.get_mut::<tcp::Socket>(handle);
        let mut progressed = false;

        if let Phase::Connecting { .. } = flow.phase {
            match socket.state() {
                tcp::State::SynSent | tcp::State::SynReceived => return false,
                tcp::State::Closed | tcp::State::Listen => {
                    // The local app refused the caller (closed port) or never answered.
                    self.stats.inbound_refused += 1;
                    self.end(now, id, CloseReason::LocalRefused);
                    return false;
                }
                _ => {
                    // The local app answered: the caller's channel may be accepted now, before
                    // any data event of this flow.
                    socket.set_timeout(None);
                    flow.channel = true;
                    flow.phase = Phase::Open {
                        handle,
                        relay: Relay::new(None),
                    };
                    self.events.push_back(Event::Connected { id });
                }
            }
        }

        if let Phase::Open { relay, .. } = &mut flow.phase {
            // SSH -> app, as far as the socket's send buffer (and the budget) allows.
            let before = flow.pending_len;
            while let Some(front) = flow.pending.front_mut() {
                let room = allow_down.saturating_sub(socket.send_queue());
                let n = match socket.send_slice(&front[..front.len().min(room)]) {
                    Ok(n) if n > 0 => n,
                    _ => break,
                };
                progressed = true;
                flow.pending_len -= n;
                flow.moved += n as u64;
                self.stats.bytes_down += n as u64;
                if n == front.len() {
                    flow.pending.pop_front();
                } else {
                    front.advance(n);
                }
            }
            // The driver stopped reading the channel at PENDING_LOW: it may read again.
            if before >= PENDING_LOW && flow.pending_len < PENDING_LOW {
                self.room.push(id);
            }
            if relay.down == Down::Eof && flow.pending.is_empty() {
                socket.close();
                relay.down = Down::FinQueued;
                progressed = true;
            }
            // App -> SSH, within the flow's credit.
            while socket.can_recv()
                && flow.inflight < allow_up
                && flow.inflight_msgs < self.config.max_inflight_msgs
            {
                let budget = (allow_up - flow.inflight).min(CHUNK);
                let data = socket
                    .recv(|buf| {
                        let n = buf.len().min(budget);
                        (n, Bytes::copy_from_slice(&buf[..n]))
                    })
                    .unwrap_or_default();
                if data.is_empty() {
                    break;
                }
                progressed = true;
                flow.moved += data.len() as u64;
                if relay.up == Up::Gone {
                    continue; // nowhere to send it: the far end is gone
                }
                self.stats.bytes_up += data.len() as u64;
                flow.inflight += data.len();
                flow.inflight_msgs += 1;
                self.events.push_back(Event::Data { id, data });
            }
            let fin_received = matches!(
                socket.state(),
                tcp::State::CloseWait
                    | tcp::State::LastAck
                    | tcp::State::Closing
                    | tcp::State::TimeWait
            );
            if fin_received && relay.up == Up::Open && !socket.can_recv() {
                relay.up = Up::Eof;
                self.events.push_back(Event::Eof { id });
            }
        }

        let state = socket.state();
        let reason = match (&flow.phase, state) {
            (Phase::Ending { reason, .. }, tcp::State::Closed | tcp::State::Listen) => {
                Some(*reason)
            }
            (_, tcp::State::TimeWait) => Some(CloseReason::Finished),
            // A SYN-RECEIVED socket that got RST falls back to LISTEN: never keep a listener.
            (_, tcp::State::Listen) => Some(CloseReason::AppReset),
            (Phase::Open { relay, .. }, tcp::State::Closed)
                if socket.remote_endpoint().is_none() =>
            {
                Some(if relay.up == Up::Eof && relay.down == Down::FinQueued {
                    CloseReason::Finished
                } else {
                    CloseReason::AppReset
                })
            }
            _ => None,
        };
        if progressed {
            shard.active = true;
        }
        let held =
            (flow.pending_len + flow.inflight + socket.send_queue() + socket.recv_queue()) as u64;
        self.buffered = self.buffered + held - flow.held;
        flow.held = held;
        if let Some(reason) = reason {
            self.end(now, id, reason);
        }
        progressed
    }
}

fn mark_dirty(dirty: &mut Vec<FlowId>, id: FlowId, flow: &mut Flow) {
    if !flow.dirty {
        flow.dirty = true;
        dirty.push(id);
    }
}
