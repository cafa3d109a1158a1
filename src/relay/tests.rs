//! Pair tests of the relay on virtual time, in the manner of quinn-proto's `Pair`: the real
//! engine in the middle; an "app" smoltcp interface on a queue device playing the kernel on
//! one side; on the other a scripted pool whose channels are in-memory queues ([`Wire`]).
//! [`Pair`] carries out the relay's commands as the driver does (engine calls through the
//! same [`ToEngine::apply`]); the test decides when the jump host answers an open, what a
//! channel receives and how much it takes, and when a link goes. No SSH, no tokio, no clock:
//! every run is the same.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{Ipv4Addr, SocketAddr};
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::socket::tcp::{self, State};
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr};

use super::*;
use crate::budget::{ChannelWindows, INITIAL_WINDOW, MemoryBudget};
use crate::engine::packet::tests::udp_v4;
use crate::engine::{EngineConfig, PENDING_LOW, QueueDevice, TunFormat};

/// The app's (the TUN's) address, and its gateway.
const APP_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const APP_GW: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// Two links of the pool.
const LINK0: LinkId = LinkId {
    slot: 0,
    generation: 1,
};
const LINK1: LinkId = LinkId {
    slot: 1,
    generation: 1,
};
const MAX_OPENING: usize = 8;
/// How long the engine holds an app's SYN for its channel.
const SYN_HOLD: Duration = Duration::from_secs(10);
/// How long a flow that ended normally may take to write what it holds.
const LINGER: Duration = Duration::from_secs(5);
/// The engine's per-socket buffers.
const TCP_BUFFER: usize = 64 * 1024;
/// The app's socket buffers (the kernel's, for its connections).
const APP_BUFFER: usize = 256 * 1024;
/// The engine's clock at the start.
const T0: smoltcp::time::Instant = smoltcp::time::Instant::from_millis_const(1_000);

fn vpc(host: u8, port: u16) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, host], port))
}

fn engine_config() -> EngineConfig {
    EngineConfig {
        mtu: 1500,
        tcp_buffer: TCP_BUFFER,
        open_timeout: SYN_HOLD.into(),
        close_linger: LINGER.into(),
        tun: TunFormat {
            header: 0,
            checksum_offload: false,
        },
        ..EngineConfig::default()
    }
}

fn relay_config() -> RelayConfig {
    RelayConfig {
        max_opening: MAX_OPENING,
        open_timeout: Duration::from_secs(5),
        local_v4: APP_V4,
        local_v6: None,
        budget: None,
        direct: None,
        trim_after: TRIM_AFTER_BURST,
    }
}

/// The far end of one channel.
#[derive(Debug, Default)]
struct Wire {
    /// What the jump host sent, not read yet.
    inbox: VecDeque<Received>,
    /// What the relay wrote, in order.
    written: Vec<WriteOp>,
    /// Bytes of data the destination still takes (`None`: any amount); a data write beyond
    /// it waits until [`Pair::make_room`].
    room: Option<usize>,
    /// The write that waits for room.
    blocked: Option<WriteOp>,
    /// The relay let go of the receiving side.
    stopped: bool,
    /// The relay closed the channel as unwanted ([`Command::Drop`]).
    dropped: bool,
}

impl Wire {
    /// The bytes of data written.
    fn data(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for op in &self.written {
            if let WriteOp::Data(d) = op {
                out.extend_from_slice(d);
            }
        }
        out
    }
}

/// The relay's channel handle in these tests.
type Handle = Rc<RefCell<Wire>>;

/// A UDP datagram the app received: from, to, payload.
type Datagram = (SocketAddr, SocketAddr, Vec<u8>);

/// How a cloud caller's channel was answered (the reply handle is a number).
#[derive(Clone, Debug, PartialEq, Eq)]
enum Answer {
    Accepted,
    Refused(Refusal),
    Loopback { port: u16, forward: u64 },
}

/// The relay and the engine between an app and a scripted pool. See the module doc.
struct Pair {
    t0: Instant,
    elapsed: Duration,
    app: Interface,
    app_dev: QueueDevice,
    app_sockets: SocketSet<'static>,
    next_port: u16,
    engine: Engine,
    relay: Relay<Handle, u32>,
    /// Every channel open asked for.
    opens: Vec<OpenRequest>,
    /// Every host connection asked for (the direct path).
    connects: Vec<ConnectRequest>,
    /// Every UDP socket operation asked for (the direct path).
    udp: Vec<UdpOp>,
    /// UDP and ICMP packets the engine wrote for the app (the app's stack has no UDP).
    datagrams: Vec<Vec<u8>>,
    /// Every link counter change asked for.
    links: Vec<(LinkId, LinkChange)>,
    /// Every channel handed to the relay, by flow.
    wires: HashMap<FlowId, Handle>,
    /// Flows whose channel may have something to read.
    ready: Vec<FlowId>,
    /// Writes finished, not reported to the relay yet.
    done: Vec<(FlowId, Option<usize>)>,
    /// Flows with a write in progress (never two).
    writing: HashSet<FlowId>,
    answers: Vec<(u32, Answer)>,
    notes: Vec<Note>,
    trims: usize,
    /// The engine's spares at each [`ToEngine::DropSpares`], before it.
    spares_dropped: Vec<usize>,
    /// The windows last told to the engine.
    windows: Option<u64>,
}

impl Pair {
    fn new() -> Pair {
        Pair::with(engine_config(), relay_config())
    }

    fn with(engine: EngineConfig, relay: RelayConfig) -> Pair {
        let mut app_dev = QueueDevice::new(engine.mtu);
        let mut app = Interface::new(Config::new(HardwareAddress::Ip), &mut app_dev, T0);
        app.update_ip_addrs(|a| {
            a.push(IpCidr::new(IpAddress::Ipv4(APP_V4), 24)).unwrap();
        });
        app.routes_mut().add_default_ipv4_route(APP_GW).unwrap();
        let t0 = Instant::now();
        Pair {
            t0,
            elapsed: Duration::ZERO,
            app,
            app_dev,
            app_sockets: SocketSet::new(Vec::new()),
            next_port: 40_000,
            engine: Engine::new(engine, T0, crate::engine::TEST_SEED),
            relay: Relay::new(relay, t0),
            opens: Vec::new(),
            connects: Vec::new(),
            udp: Vec::new(),
            datagrams: Vec::new(),
            links: Vec::new(),
            wires: HashMap::new(),
            ready: Vec::new(),
            done: Vec::new(),
            writing: HashSet::new(),
            answers: Vec::new(),
            notes: Vec::new(),
            trims: 0,
            spares_dropped: Vec::new(),
            windows: None,
        }
    }

    /// The engine's clock.
    fn at(&self) -> smoltcp::time::Instant {
        T0 + smoltcp::time::Duration::from(self.elapsed)
    }

    /// The relay's clock.
    fn now(&self) -> Instant {
        self.t0 + self.elapsed
    }

    /// Moves packets, channel messages and commands until nothing moves, as the driver's
    /// turn does.
    fn step(&mut self) {
        for _ in 0..1000 {
            let (at, now) = (self.at(), self.now());
            self.app.poll(at, &mut self.app_dev, &mut self.app_sockets);
            let mut moved = false;
            while let Some(p) = self.app_dev.tx.pop_front() {
                moved = true;
                self.engine.handle_tun_packet(at, p);
            }
            for (id, written) in std::mem::take(&mut self.done) {
                moved = true;
                self.writing.remove(&id);
                self.relay.handle_written(now, id, written);
                self.carry_out();
            }
            moved |= self.read_ready();
            self.relay.handle_tick(now);
            self.carry_out();
            self.engine.poll(at);
            while let Some(event) = self.engine.poll_event() {
                moved = true;
                self.relay.handle_event(now, event);
                self.carry_out();
            }
            while let Some(id) = self.engine.poll_room() {
                moved |= self.relay.handle_room(id);
            }
            self.carry_out();
            while let Some(p) = self.engine.poll_transmit() {
                moved = true;
                // IPv4's protocol: UDP and ICMP are the test's to read.
                match p[9] {
                    17 | 1 => self.datagrams.push(p),
                    _ => self.app_dev.rx.push_back(p.into()),
                }
            }
            self.relay.handle_stats(&self.engine.stats());
            if !moved {
                return;
            }
        }
        panic!("the pair never settles");
    }

    /// Reads the ready flows' channels as far as the relay lets it.
    fn read_ready(&mut self) -> bool {
        let mut moved = false;
        for id in std::mem::take(&mut self.ready) {
            loop {
                let wants = self.engine.wants_data(id);
                let Some(wire) = self.relay.reader(id, wants) else {
                    break;
                };
                let Some(received) = wire.borrow_mut().inbox.pop_front() else {
                    break;
                };
                moved = true;
                self.relay.handle_read(self.now(), id, received);
                self.carry_out();
            }
        }
        moved
    }

    /// Carries out the relay's commands: engine calls as the driver makes them, the rest
    /// recorded or played by the scripted pool and channels.
    fn carry_out(&mut self) {
        while let Some(command) = self.relay.poll() {
            match command {
                Command::Engine(call) => {
                    if let ToEngine::Windows(w) = call {
                        self.windows = Some(w);
                    }
                    let drop = matches!(call, ToEngine::DropSpares);
                    if drop {
                        self.spares_dropped.push(self.engine.spares());
                    }
                    let at = self.at();
                    call.apply(&mut self.engine, at);
                    assert!(
                        !drop || self.engine.spares() == 0,
                        "spares left after a drop"
                    );
                }
                Command::Open(open) => self.opens.push(open),
                Command::Connect(connect) => self.connects.push(connect),
                Command::Udp(op) => self.udp.push(op),
                Command::Link { link, change } => self.links.push((link, change)),
                Command::Channel(id, op) => {
                    let wire = self
                        .relay
                        .channel_mut(id)
                        .expect("commands only for flows with an open channel")
                        .clone();
                    match op {
                        ChannelOp::Write(op) => {
                            assert!(self.writing.insert(id), "one write at a time per flow");
                            self.write(id, &wire, op);
                        }
                        ChannelOp::Abort => {
                            wire.borrow_mut().blocked = None;
                            self.done.retain(|(i, _)| *i != id);
                            self.writing.remove(&id);
                        }
                        ChannelOp::StopReading => wire.borrow_mut().stopped = true,
                    }
                }
                Command::Read { id } => self.ready.push(id),
                Command::Drop { channel } => channel.borrow_mut().dropped = true,
                Command::Accept { reply } => self.answers.push((reply, Answer::Accepted)),
                Command::Refuse { reply, how } => self.answers.push((reply, Answer::Refused(how))),
                Command::Loopback(f) => self.answers.push((
                    f.reply,
                    Answer::Loopback {
                        port: f.port,
                        forward: f.forward,
                    },
                )),
                Command::Trim => {
                    self.trims += 1;
                    assert_eq!(
                        self.spares_dropped.len(),
                        self.trims,
                        "each trim comes after the engine let go of its spares"
                    );
                }
                Command::Note(note) => self.notes.push(note),
            }
        }
    }

    /// The destination takes a write if it has room; otherwise the write waits.
    fn write(&mut self, id: FlowId, wire: &Handle, op: WriteOp) {
        let mut w = wire.borrow_mut();
        let result = match &op {
            WriteOp::Data(d) => match w.room {
                Some(room) if room < d.len() => {
                    w.blocked = Some(op);
                    return;
                }
                Some(room) => {
                    w.room = Some(room - d.len());
                    Some(d.len())
                }
                None => Some(d.len()),
            },
            WriteOp::Eof => Some(0),
            WriteOp::Close => None,
        };
        w.written.push(op);
        self.done.push((id, result));
    }

    /// The destination of flow `id` reads `n` more bytes.
    fn make_room(&mut self, id: FlowId, n: usize) {
        let wire = self.wires[&id].clone();
        let blocked = {
            let mut w = wire.borrow_mut();
            w.room = w.room.map(|r| r + n);
            w.blocked.take()
        };
        if let Some(op) = blocked {
            self.write(id, &wire, op);
        }
        self.step();
    }

    /// Moves time forward by `by`, stopping at every deadline of the engine and the relay
    /// on the way. A relay deadline that stepping does not clear is a bug (the driver would
    /// spin on it).
    fn run_for(&mut self, by: Duration) {
        let end = self.elapsed + by;
        loop {
            let engine = self
                .engine
                .poll_timeout(self.at())
                .map(|t| Duration::from_micros((t - T0).total_micros()));
            let relay = self.relay.poll_timeout().map(|t| t - self.t0);
            assert!(
                relay.is_none_or(|t| t > self.elapsed),
                "a relay deadline that ticking did not clear"
            );
            match engine.into_iter().chain(relay).min() {
                Some(t) if t <= end => {
                    self.elapsed = t.max(self.elapsed + Duration::from_millis(1));
                    self.step();
                }
                _ => break,
            }
        }
        self.elapsed = end;
        self.step();
    }

    // ----- the app -----

    /// The app connects to `dst`.
    fn connect(&mut self, dst: SocketAddr) -> SocketHandle {
        let mut s = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; APP_BUFFER]),
            tcp::SocketBuffer::new(vec![0; APP_BUFFER]),
        );
        s.set_ack_delay(None);
        let port = self.next_port;
        self.next_port += 1;
        s.connect(self.app.context(), dst, (IpAddress::Ipv4(APP_V4), port))
            .unwrap();
        let h = self.app_sockets.add(s);
        self.step();
        h
    }

    /// The app listens on `port` of the TUN address (one connection).
    fn listen(&mut self, port: u16) -> SocketHandle {
        let mut s = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; 64 * 1024]),
            tcp::SocketBuffer::new(vec![0; 64 * 1024]),
        );
        s.set_ack_delay(None);
        s.listen(port).unwrap();
        self.app_sockets.add(s)
    }

    fn tcp(&mut self, h: SocketHandle) -> &mut tcp::Socket<'static> {
        self.app_sockets.get_mut::<tcp::Socket>(h)
    }

    fn state(&mut self, h: SocketHandle) -> State {
        self.tcp(h).state()
    }

    /// The app sends `data`.
    fn send(&mut self, h: SocketHandle, data: &[u8]) {
        assert_eq!(self.tcp(h).send_slice(data).unwrap(), data.len());
        self.step();
    }

    /// What the app can read now.
    fn recv(&mut self, h: SocketHandle) -> Vec<u8> {
        let mut out = Vec::new();
        let s = self.tcp(h);
        while s.can_recv() {
            s.recv(|b| {
                out.extend_from_slice(b);
                (b.len(), ())
            })
            .unwrap();
        }
        self.step();
        out
    }

    /// The channel open asked for the app connection `h`.
    fn open_of(&mut self, h: SocketHandle) -> OpenRequest {
        let port = self.tcp(h).local_endpoint().expect("connecting").port;
        *self
            .opens
            .iter()
            .find(|o| o.key.src.port() == port)
            .expect("an open for the connection")
    }

    // ----- the jump host -----

    /// The jump host confirms flow `id`'s channel on `link`.
    fn confirm(&mut self, id: FlowId, link: LinkId) -> Handle {
        let wire = Handle::default();
        self.wires.insert(id, wire.clone());
        self.relay.handle_opened(self.now(), id, link, wire.clone());
        self.carry_out();
        self.step();
        wire
    }

    /// The app connects to `dst` and the jump host confirms the channel on `link`.
    fn open(&mut self, dst: SocketAddr, link: LinkId) -> (SocketHandle, FlowId, Handle) {
        let h = self.connect(dst);
        let id = self.open_of(h).id;
        let wire = self.confirm(id, link);
        assert_eq!(self.state(h), State::Established);
        (h, id, wire)
    }

    /// The host connection asked for the app connection `h`.
    fn connect_of(&mut self, h: SocketHandle) -> ConnectRequest {
        let port = self.tcp(h).local_endpoint().expect("connecting").port;
        *self
            .connects
            .iter()
            .find(|c| c.key.src.port() == port)
            .expect("a host connection for the app's")
    }

    /// The host connection of flow `id` is made (a handle) or failed.
    fn connected(&mut self, id: FlowId, result: Result<(), ConnectError>) -> Handle {
        let wire = Handle::default();
        self.wires.insert(id, wire.clone());
        let result = result.map(|()| wire.clone());
        self.relay.handle_connected(self.now(), id, result);
        self.carry_out();
        self.step();
        wire
    }

    /// The app sends a UDP datagram from its `port` to `dst`.
    fn send_udp(&mut self, port: u16, dst: SocketAddr, payload: &[u8]) {
        let SocketAddr::V4(dst) = dst else {
            panic!("IPv4 only")
        };
        let packet = udp_v4((APP_V4, port), (*dst.ip(), dst.port()), payload);
        self.app_dev.tx.push_back(packet);
        self.step();
    }

    /// A host UDP socket gave `event`.
    fn udp_event(&mut self, id: UdpId, event: UdpEvent) {
        self.relay.handle_udp(self.now(), id, event);
        self.carry_out();
        self.step();
    }

    /// The datagrams the app received: (from, to, payload) for UDP, and for each ICMP
    /// packet the port unreachable's quoted destination.
    fn take_datagrams(&mut self) -> (Vec<Datagram>, Vec<SocketAddr>) {
        let (mut udp, mut icmp) = (Vec::new(), Vec::new());
        for p in std::mem::take(&mut self.datagrams) {
            match crate::engine::packet::classify(&p) {
                crate::engine::Ingress::Udp {
                    src,
                    dst,
                    start,
                    len,
                } => udp.push((src, dst, p[start..start + len].to_vec())),
                _ => {
                    assert_eq!(p[9], 1, "ICMP");
                    assert_eq!((p[20], p[21]), (3, 3), "port unreachable");
                    let quoted = &p[28..];
                    let ip = Ipv4Addr::new(quoted[16], quoted[17], quoted[18], quoted[19]);
                    let port = u16::from_be_bytes([quoted[22], quoted[23]]);
                    icmp.push(SocketAddr::from((ip, port)));
                }
            }
        }
        (udp, icmp)
    }

    /// The jump host refuses flow `id`'s channel.
    fn fail(&mut self, id: FlowId, error: OpenError) {
        self.relay.handle_open_failed(self.now(), id, error);
        self.carry_out();
        self.step();
    }

    /// Flow `id`'s channel receives `received`.
    fn deliver(&mut self, id: FlowId, received: Received) {
        self.wires[&id].borrow_mut().inbox.push_back(received);
        self.ready.push(id);
        self.step();
    }

    /// A cloud caller arrives (its reply handle is `reply`).
    fn call(&mut self, reply: u32, caller: Option<&str>, target: Option<Target>) -> Option<FlowId> {
        let call = Call {
            link: LINK0,
            listen_port: 18080,
            caller: caller.map(|c| c.parse().unwrap()),
            target,
            channel: Handle::default(),
            reply,
        };
        let wire = call.channel.clone();
        let (at, now, engine) = (self.at(), self.now(), &mut self.engine);
        let mut started = None;
        self.relay.handle_call(now, call, |caller, local, timeout| {
            let r = engine.connect_inbound(at, caller, local, timeout.into());
            started = r.ok();
            r
        });
        if let Some(id) = started {
            self.wires.insert(id, wire);
        }
        self.carry_out();
        self.step();
        started
    }

    fn notes_of(&self, keep: impl Fn(&Note) -> bool) -> Vec<Note> {
        self.notes.iter().filter(|n| keep(n)).cloned().collect()
    }
}

/// A short connection to `dst` on `link`: a request and its reply, both sides close, within
/// milliseconds.
fn short_flow(p: &mut Pair, dst: SocketAddr, link: LinkId) {
    let (h, id, wire) = p.open(dst, link);
    p.send(h, b"GET / HTTP/1.0\r\n\r\n");
    p.deliver(
        id,
        Received::Data(Bytes::from_static(b"HTTP/1.0 200 OK\r\n\r\n")),
    );
    p.deliver(id, Received::Eof);
    p.deliver(id, Received::Closed);
    assert_eq!(p.recv(h), b"HTTP/1.0 200 OK\r\n\r\n");
    p.tcp(h).close();
    p.run_for(Duration::from_millis(50));
    assert_eq!(wire.borrow().written.last(), Some(&WriteOp::Close));
}

// ----- admission -----

#[test]
fn a_syn_flood_gets_only_max_opening_opens_and_a_destination_that_answered_keeps_a_reserve() {
    let mut p = Pair::new();
    let web = vpc(10, 80);
    p.open(web, LINK0);

    // 20 SYNs to silent destinations: MAX_OPENING opens go to the jump host; the others are
    // reset at once.
    let flood: Vec<SocketHandle> = (0..20).map(|i| p.connect(vpc(100 + i, 80))).collect();
    assert_eq!(p.opens.len(), 1 + MAX_OPENING);
    let reset = flood
        .iter()
        .filter(|h| p.state(**h) == State::Closed)
        .count();
    assert_eq!(reset, 20 - MAX_OPENING, "the rest get a reset, not a wait");
    assert_eq!(p.engine.stats().flows_over_limit, 12);
    let open_limited = p.notes_of(|n| matches!(n, Note::OpenLimited { .. }));
    assert_eq!(open_limited.len(), 1, "one warning for the twelve refusals");

    // The service that answered lately is still reached meanwhile, up to a quarter more.
    let again: Vec<SocketHandle> = (0..3).map(|_| p.connect(web)).collect();
    assert_eq!(p.opens.len(), 1 + MAX_OPENING + 2);
    assert_eq!(p.state(again[0]), State::SynSent);
    assert_eq!(p.state(again[1]), State::SynSent);
    assert_eq!(p.state(again[2]), State::Closed, "the reserve is bounded");
    let stranger = p.connect(vpc(200, 80));
    assert_eq!(
        p.state(stranger),
        State::Closed,
        "no reserve for the unknown"
    );
    let id = p.open_of(again[0]).id;
    p.confirm(id, LINK0);
    assert_eq!(p.state(again[0]), State::Established);

    // The flood's apps give up; their opens are still pending at the jump host and count.
    p.run_for(SYN_HOLD + Duration::from_secs(1));
    assert!(flood.iter().all(|h| p.state(*h) == State::Closed));
    assert_eq!(p.relay.opening(), MAX_OPENING + 1);
    let late = p.connect(vpc(201, 80));
    assert_eq!(p.state(late), State::Closed);

    // The jump host gives up on them: their slots are free again.
    let pending: Vec<FlowId> = p.opens[1..=MAX_OPENING].iter().map(|o| o.id).collect();
    for id in pending {
        p.fail(id, OpenError::Timeout);
    }
    assert_eq!(p.relay.opening(), 1);
    let fresh = p.connect(vpc(202, 80));
    assert_eq!(p.state(fresh), State::SynSent, "admitted again");
}

#[test]
fn a_channel_confirmed_after_its_app_gave_up_is_closed_at_once() {
    let mut p = Pair::new();
    let h = p.connect(vpc(10, 80));
    let id = p.open_of(h).id;
    p.run_for(SYN_HOLD + Duration::from_secs(1));
    assert_eq!(
        p.state(h),
        State::Closed,
        "the app was reset at the open timeout"
    );
    assert_eq!(p.relay.flow_count(), 0);
    assert_eq!(
        p.relay.opening(),
        1,
        "the open is still pending at the jump host"
    );

    // The jump host connected after all: the channel is closed, its link count given back,
    // and the engine hears nothing of it.
    let wire = p.confirm(id, LINK0);
    assert!(wire.borrow().dropped);
    assert_eq!(p.links, [(LINK0, LinkChange::Release)]);
    assert_eq!(p.relay.opening(), 0);
    assert_eq!(p.relay.flow_count(), 0);
    assert_eq!(p.engine.flow_count(), 0);
    assert_eq!(p.engine.stats().flows_closing, 0);
}

#[test]
fn a_refused_open_resets_the_app_and_repeated_failures_are_one_warning_and_a_summary() {
    let mut p = Pair::new();
    let closed = vpc(10, 81);
    for _ in 0..20 {
        let h = p.connect(closed);
        let id = p.open_of(h).id;
        p.fail(id, OpenError::ConnectFailed);
        assert_eq!(p.state(h), State::Closed, "a closed port looks closed");
        p.run_for(Duration::from_millis(100));
    }
    let failed = |n: &Note| matches!(n, Note::FlowFailed { .. });
    assert_eq!(p.notes_of(failed).len(), 1);
    assert_eq!(
        p.notes_of(|n| matches!(n, Note::Closed { .. })).len(),
        20,
        "every flow's end is a debug line"
    );
    // Another destination gets its own warning.
    let h = p.connect(vpc(11, 81));
    let id = p.open_of(h).id;
    p.fail(id, OpenError::ConnectFailed);
    assert_eq!(p.notes_of(failed).len(), 2);

    // When the window ends, one summary line for the nineteen that were not logged.
    let first = p.notes.iter().position(failed).unwrap();
    assert!(
        p.relay.poll_timeout().is_some(),
        "the summary is a deadline"
    );
    p.run_for(WARN_WINDOW);
    let summaries = p.notes_of(|n| matches!(n, Note::FailureSummary(_)));
    assert_eq!(summaries.len(), 1, "{:?}", &p.notes[first..]);
    let Note::FailureSummary(s) = &summaries[0] else {
        unreachable!()
    };
    assert_eq!(s.kind, Some((closed, CloseReason::OpenRefused)));
    assert_eq!(s.suppressed, 19);

    // A jump host that forbids forwarding says so every time.
    let h = p.connect(vpc(12, 80));
    let id = p.open_of(h).id;
    p.fail(id, OpenError::Prohibited);
    assert_eq!(p.state(h), State::Closed);
    assert_eq!(p.notes_of(|n| *n == Note::Prohibited).len(), 1);
}

#[test]
fn connections_over_the_flow_limit_are_one_warning_per_window() {
    let mut p = Pair::with(
        EngineConfig {
            max_flows: 2,
            ..engine_config()
        },
        relay_config(),
    );
    let _held: Vec<SocketHandle> = (0..2).map(|i| p.connect(vpc(20 + i, 80))).collect();
    let refused: Vec<SocketHandle> = (0..5).map(|i| p.connect(vpc(30 + i, 80))).collect();
    assert!(refused.iter().all(|h| p.state(*h) == State::Closed));
    let warned = p.notes_of(|n| matches!(n, Note::Refused { .. }));
    assert_eq!(warned.len(), 1);
    let Note::Refused { reason, .. } = warned[0] else {
        unreachable!()
    };
    assert_eq!(reason, CloseReason::FlowLimit);
    p.run_for(WARN_WINDOW);
    let summary = p.notes_of(|n| matches!(n, Note::RefusalSummary(_)));
    assert!(
        matches!(&summary[..], [Note::RefusalSummary(s)] if s.suppressed == 4),
        "{summary:?}"
    );
}

// ----- placement -----

#[test]
fn light_flows_are_packed_and_a_destination_whose_flows_turn_bulk_is_spread() {
    let mut p = Pair::new();
    let web = vpc(10, 80);
    let bulk = vpc(10, 5201);
    let placement_of_next = |p: &mut Pair, dst| {
        let h = p.connect(dst);
        let (id, placement) = (p.open_of(h).id, p.open_of(h).placement);
        p.fail(id, OpenError::ConnectFailed);
        placement
    };

    // Not seen yet: packed (most flows are light).
    assert_eq!(placement_of_next(&mut p, web), Placement::Pack, "unknown");

    // A long flow that moves less each second (a keep-alive connection): 8 MiB a second
    // for 4 s, 32 MiB in all, is light: never counted heavy on its link, and its
    // destination stays packed.
    p.links.clear();
    let (h, id, _wire) = p.open(web, LINK0);
    let chunk = Bytes::from(vec![7u8; 32 * 1024]);
    for _ in 0..4 {
        for _ in 0..256 {
            p.deliver(id, Received::Data(chunk.clone()));
            assert_eq!(p.recv(h).len(), chunk.len());
        }
        p.run_for(Duration::from_secs(1));
    }
    p.tcp(h).abort();
    p.step();
    assert_eq!(p.links, [(LINK0, LinkChange::Release)], "never heavy");
    assert_eq!(
        placement_of_next(&mut p, web),
        Placement::Pack,
        "long, light"
    );

    // A bulk download: counted heavy on its link once it moved 16 MiB within a second,
    // until it ends; its destination's next flows are spread from then on.
    p.links.clear();
    let (h, id, _wire) = p.open(bulk, LINK1);
    let chunk = Bytes::from(vec![7u8; 32 * 1024]);
    let chunks = (HEAVY_BYTES as usize).div_ceil(chunk.len());
    let mut got = 0;
    for i in 0..chunks {
        assert!(p.links.is_empty(), "heavy after {i} chunks");
        p.deliver(id, Received::Data(chunk.clone()));
        got += p.recv(h).len();
    }
    got += p.recv(h).len();
    assert_eq!(got, chunks * chunk.len());
    assert_eq!(p.links, [(LINK1, LinkChange::Heavy)], "marked once");
    assert_eq!(placement_of_next(&mut p, bulk), Placement::Spread, "bulk");
    p.tcp(h).abort();
    p.step();
    assert_eq!(
        p.links,
        [
            (LINK1, LinkChange::Heavy),
            (LINK1, LinkChange::Release),
            (LINK1, LinkChange::Light)
        ]
    );

    // Light flows to it (an iperf3 control connection) do not bring it back at once; four
    // in a row do.
    for _ in 0..3 {
        short_flow(&mut p, bulk, LINK0);
    }
    assert_eq!(placement_of_next(&mut p, bulk), Placement::Spread, "three");
    short_flow(&mut p, bulk, LINK0);
    assert_eq!(placement_of_next(&mut p, bulk), Placement::Pack, "four");
}

// ----- lost links -----

#[test]
fn a_lost_link_resets_exactly_its_flows() {
    let mut p = Pair::new();
    let (a, ida, wire_a) = p.open(vpc(10, 80), LINK0);
    let (b, _, _) = p.open(vpc(11, 80), LINK0);
    let (c, idc, _) = p.open(vpc(12, 80), LINK1);
    let opening = p.connect(vpc(13, 80));

    let now = p.now();
    p.relay.handle_links(now, |link| link != LINK0);
    p.carry_out();
    p.step();
    assert_eq!(p.state(a), State::Closed, "reset");
    assert_eq!(p.state(b), State::Closed, "reset");
    assert_eq!(
        p.state(c),
        State::Established,
        "on the other link: untouched"
    );
    assert_eq!(
        p.state(opening),
        State::SynSent,
        "no channel yet: untouched"
    );
    assert_eq!(
        p.notes_of(|n| matches!(n, Note::LinkLost { .. })),
        [Note::LinkLost { flows: 2 }]
    );
    assert_eq!(wire_a.borrow().written.last(), Some(&WriteOp::Close));
    assert!(p.wires[&idc].borrow().written.is_empty());
    let closed = p.notes_of(|n| matches!(n, Note::Closed { .. }));
    assert!(closed.iter().all(|n| matches!(
        n,
        Note::Closed { reason: CloseReason::SessionLost, id, .. } if *id != idc
    )));
    assert_eq!(closed.len(), 2);

    // The flow on the other link still carries data, and a second loss report resets
    // nothing more.
    p.deliver(idc, Received::Data(Bytes::from_static(b"still here")));
    assert_eq!(p.recv(c), b"still here");
    let now = p.now();
    p.relay.handle_links(now, |link| link != LINK0);
    p.carry_out();
    assert_eq!(p.notes_of(|n| matches!(n, Note::LinkLost { .. })).len(), 1);
    assert!(!p.relay.flows.contains_key(&ida));
}

// ----- writes and closes -----

#[test]
fn writes_go_out_one_at_a_time_in_order_and_the_close_comes_last() {
    let mut p = Pair::new();
    let (h, id, wire) = p.open(vpc(10, 80), LINK0);
    // The destination takes 10 bytes at a time.
    wire.borrow_mut().room = Some(10);
    p.send(h, b"0123456789");
    p.send(h, b"abcdefghij");
    p.tcp(h).close();
    p.step();
    assert_eq!(
        wire.borrow().data(),
        b"0123456789",
        "the second waits for room"
    );
    p.make_room(id, 10);
    assert_eq!(wire.borrow().data(), b"0123456789abcdefghij");
    p.deliver(id, Received::Eof);
    p.deliver(id, Received::Closed);
    p.run_for(Duration::from_millis(50));
    let written = wire.borrow().written.clone();
    assert_eq!(written.len(), 4, "{written:?}");
    assert_eq!(&written[2..], [WriteOp::Eof, WriteOp::Close]);
    assert!(wire.borrow().stopped);
    assert_eq!(p.relay.flow_count(), 0);
    assert_eq!(
        p.engine.stats().flows_closing,
        0,
        "the channel was let go of"
    );
}

#[test]
fn a_reset_discards_what_was_not_written_and_closes_the_channel_at_once() {
    let mut p = Pair::new();
    let (h, _, wire) = p.open(vpc(10, 80), LINK0);
    wire.borrow_mut().room = Some(0);
    p.send(h, &[1u8; 5000]);
    assert!(
        wire.borrow().blocked.is_some(),
        "a write waits for the destination"
    );
    p.tcp(h).abort();
    p.step();
    assert_eq!(
        wire.borrow().written,
        [WriteOp::Close],
        "nothing of the data, then the close"
    );
    assert_eq!(p.relay.flow_count(), 0);
    assert_eq!(p.engine.stats().flows_closing, 0);
}

#[test]
fn a_closing_flow_whose_destination_never_reads_is_dropped_after_the_linger() {
    let mut p = Pair::new();
    let (h, id, wire) = p.open(vpc(10, 80), LINK0);
    wire.borrow_mut().room = Some(0);
    // The app uploads and finishes; the destination's answer is EOF; it never reads.
    p.send(h, &[1u8; 20_000]);
    p.tcp(h).close();
    p.deliver(id, Received::Eof);
    p.run_for(Duration::from_millis(100));
    assert_eq!(p.engine.flow_count(), 0, "the TCP connection is over");
    assert_eq!(p.engine.stats().flows_closing, 1, "its flush is not");
    assert!(wire.borrow().written.is_empty());

    p.run_for(LINGER - Duration::from_secs(2));
    assert_eq!(p.engine.stats().flows_closing, 1, "still within the linger");
    assert!(wire.borrow().written.is_empty());

    p.run_for(Duration::from_secs(3));
    assert_eq!(
        wire.borrow().written,
        [WriteOp::Close],
        "the rest was dropped"
    );
    assert_eq!(p.engine.stats().flows_closing, 0);
    assert_eq!(p.engine.stats().close_flushes_cut, 1);
    assert_eq!(p.notes_of(|n| *n == Note::FlushCut { id }).len(), 1);
    assert_eq!(p.relay.flow_count(), 0);
}

// ----- reading -----

#[test]
fn a_channel_is_read_only_while_the_engine_takes_more() {
    let mut p = Pair::new();
    let (h, id, wire) = p.open(vpc(10, 80), LINK0);
    let chunk = Bytes::from(vec![9u8; 32 * 1024]);
    for _ in 0..64 {
        wire.borrow_mut()
            .inbox
            .push_back(Received::Data(chunk.clone()));
    }
    p.ready.push(id);
    p.step();
    // The app does not read: its own receive buffer fills, the engine holds its socket's
    // buffer plus PENDING_LOW and one message; the rest stays in the channel (whose SSH
    // window carries the pause to the jump host).
    let held = p.engine.stats().buffered as usize;
    assert!(held <= TCP_BUFFER + PENDING_LOW + chunk.len(), "{held}");
    let taken = (APP_BUFFER + TCP_BUFFER + PENDING_LOW) / chunk.len() + 1;
    let left = wire.borrow().inbox.len();
    assert!(left >= 64 - taken, "{left}");
    p.run_for(Duration::from_secs(1));
    assert_eq!(wire.borrow().inbox.len(), left, "paused, not polling");

    // The app reads: the channel is read again as room comes, to the last byte.
    let mut got = 0;
    for _ in 0..200 {
        got += p.recv(h).len();
        if got == 64 * chunk.len() {
            break;
        }
    }
    assert_eq!(got, 64 * chunk.len());
    assert!(wire.borrow().inbox.is_empty());
}

// ----- cloud callers -----

#[test]
fn cloud_callers_are_routed_to_the_app_or_refused_and_a_closed_port_falls_back_to_loopback() {
    let mut p = Pair::with(
        EngineConfig {
            max_inbound: 2,
            ..engine_config()
        },
        relay_config(),
    );
    let target = |port| {
        Some(Target {
            id: 3,
            local_port: port,
        })
    };

    // Routed: from the caller's own address (an IPv4-mapped one, as sshd may report it).
    let app = p.listen(8080);
    let id = p
        .call(1, Some("[::ffff:10.0.7.9]:40022"), target(8080))
        .expect("a flow");
    assert_eq!(
        p.answers,
        [(1, Answer::Accepted)],
        "accepted once the app answered"
    );
    assert_eq!(p.links, [(LINK0, LinkChange::Adopt)]);
    assert_eq!(
        p.tcp(app).remote_endpoint().map(|e| e.addr.to_string()),
        Some("10.0.7.9".into()),
        "the app sees the caller"
    );
    p.deliver(id, Received::Data(Bytes::from_static(b"hello")));
    assert_eq!(p.recv(app), b"hello");
    p.send(app, b"hi");
    assert_eq!(p.wires[&id].borrow().data(), b"hi");

    // Refused before reaching the app: no listener there, no address, no IPv6.
    p.answers.clear();
    assert_eq!(p.call(2, Some("10.0.7.9:40023"), None), None);
    assert_eq!(p.call(3, None, target(8080)), None);
    assert_eq!(p.call(4, Some("[fd00::9]:40024"), target(8080)), None);
    let prohibited = Answer::Refused(Refusal::Prohibited);
    assert_eq!(
        p.answers,
        [
            (2, prohibited.clone()),
            (3, prohibited.clone()),
            (4, prohibited.clone())
        ]
    );
    let why: Vec<CallRefused> = p
        .notes
        .iter()
        .filter_map(|n| match n {
            Note::CallRefused { why, .. } => Some(*why),
            _ => None,
        })
        .collect();
    assert_eq!(
        why,
        [
            CallRefused::NoForward,
            CallRefused::NoCaller,
            CallRefused::NoIpv6
        ]
    );

    // Nothing listens on the TUN address: the loopback fallback gets the call, and the link
    // it came on is given back.
    p.answers.clear();
    p.links.clear();
    p.call(5, Some("10.0.7.9:40025"), target(8081))
        .expect("a flow");
    assert_eq!(
        p.answers,
        [(
            5,
            Answer::Loopback {
                port: 8081,
                forward: 3
            }
        )]
    );
    assert_eq!(
        p.links,
        [(LINK0, LinkChange::Adopt), (LINK0, LinkChange::Release)]
    );

    // Over the engine's inbound limit (two: the first call's flow, and this one): refused.
    p.answers.clear();
    let _second = p.listen(8082);
    p.call(6, Some("10.0.7.9:40026"), target(8082))
        .expect("a flow");
    assert_eq!(p.call(7, Some("10.0.7.9:40027"), target(8082)), None);
    assert_eq!(p.answers, [(6, Answer::Accepted), (7, prohibited)]);
    assert!(p.notes.iter().any(|n| matches!(
        n,
        Note::CallerRefused {
            error: InboundError::FlowLimit,
            ..
        }
    )));
}

// ----- TUN faults, memory -----

// Unix errno values (nix::libc is empty on Windows, whose TUN reports its own codes).
#[cfg(unix)]
#[test]
fn tun_faults_pause_reading_are_summarized_and_a_gone_device_ends_the_session() {
    let mut p = Pair::new();
    // Portable errors (the relay's tests run on Windows too): one the device may recover from,
    // and one that says it is gone (`Fault::of`).
    let enobufs = || std::io::Error::other("no buffer space available");
    let now = p.now();
    assert!(p.relay.handle_tun_failed(now, TunOp::Read, &enobufs()));
    assert!(!p.relay.reading_tun(), "reading pauses");
    assert_eq!(p.relay.poll_timeout(), Some(now + RECV_RETRY));
    p.run_for(RECV_RETRY);
    assert!(p.relay.reading_tun(), "and resumes");

    for _ in 0..5 {
        let now = p.now();
        assert!(p.relay.handle_tun_failed(now, TunOp::Write, &enobufs()));
        p.carry_out();
    }
    let warned = p.notes_of(|n| {
        matches!(
            n,
            Note::TunFailed {
                op: TunOp::Write,
                ..
            }
        )
    });
    assert_eq!(warned.len(), 1);
    p.run_for(WARN_WINDOW);
    let summary = p.notes_of(|n| matches!(n, Note::TunSummary(_)));
    assert!(
        matches!(&summary[..], [Note::TunSummary(s)] if s.suppressed == 4),
        "{summary:?}"
    );

    let gone = std::io::Error::from(std::io::ErrorKind::BrokenPipe);
    let now = p.now();
    assert!(!p.relay.handle_tun_failed(now, TunOp::Read, &gone));
}

#[test]
fn the_memory_budget_learns_the_windows_and_what_the_engine_holds() {
    let budget = MemoryBudget::new(64 << 20);
    let mut p = Pair::with(
        engine_config(),
        RelayConfig {
            budget: Some(budget.clone()),
            ..relay_config()
        },
    );
    let mut windows = ChannelWindows::new(budget.clone(), 4 << 20);
    windows.open(1, p.now());
    windows.open(2, p.now());
    p.step();
    let committed = 2 * u64::from(INITIAL_WINDOW);
    assert_eq!(p.windows, Some(committed));
    assert_eq!(
        p.engine.stats().windows,
        committed,
        "the engine reckons with them"
    );

    // A download the app does not read: what the engine holds is counted in the budget.
    let (h, id, _) = p.open(vpc(10, 80), LINK0);
    for _ in 0..20 {
        p.deliver(id, Received::Data(Bytes::from(vec![5u8; 32 * 1024])));
    }
    let held = p.engine.stats().buffered;
    assert!(held >= (TCP_BUFFER + PENDING_LOW) as u64, "{held}");
    assert_eq!(budget.engine(), held);
    assert_eq!(budget.used(), committed + held);

    // It ends: back to nothing.
    p.tcp(h).abort();
    p.step();
    drop(windows);
    p.step();
    assert_eq!(budget.engine(), 0);
    assert_eq!(p.windows, Some(0));
    assert_eq!(budget.used(), 0);
}

#[test]
fn freed_memory_is_given_back_after_flows_close_at_most_every_two_seconds_one_at_a_time() {
    let mut p = Pair::new();
    assert_eq!(
        p.relay.poll_timeout(),
        None,
        "nothing to do while nothing closed"
    );
    let (a, ..) = p.open(vpc(10, 80), LINK0);
    let (b, ..) = p.open(vpc(11, 80), LINK0);
    p.tcp(a).abort();
    p.step();
    assert_eq!(p.trims, 1, "soon after a flow closed");
    p.tcp(b).abort();
    p.step();
    assert_eq!(p.trims, 1, "not again at once");
    p.run_for(TRIM_EVERY * 2);
    assert_eq!(p.trims, 1, "never two at a time");
    p.relay.handle_trimmed();
    p.step();
    assert_eq!(p.trims, 2, "the one that waited");
    let second = p.now();
    let (c, ..) = p.open(vpc(12, 80), LINK0);
    p.tcp(c).abort();
    p.relay.handle_trimmed();
    p.step();
    assert_eq!(p.trims, 2, "within two seconds of the last one");
    assert_eq!(p.relay.poll_timeout(), Some(second + TRIM_EVERY));
    p.run_for(TRIM_EVERY);
    assert_eq!(p.trims, 3);
}

#[test]
fn freed_memory_is_given_back_once_flows_go_quiet_after_a_burst() {
    const BURST: usize = 1 << 20;
    let relay = RelayConfig {
        trim_after: BURST as u64,
        ..relay_config()
    };
    let mut p = Pair::with(engine_config(), relay);
    let (a, id, wire) = p.open(vpc(10, 80), LINK0);
    // A download of just under a burst: nothing to give back.
    let chunk = Bytes::from(vec![7u8; 64 << 10]);
    let mut got = 0;
    for _ in 0..BURST / chunk.len() - 1 {
        p.deliver(id, Received::Data(chunk.clone()));
        got += p.recv(a).len();
    }
    p.run_for(TRIM_QUIET * 3);
    got += p.recv(a).len();
    assert_eq!(p.trims, 0, "under a burst: nothing trimmed");
    assert_eq!(p.relay.poll_timeout(), None);
    // One more chunk makes it a burst: trimmed once the flow has been quiet a while, not
    // while it moves.
    p.deliver(id, Received::Data(chunk.clone()));
    let last = p.now();
    got += p.recv(a).len();
    assert_eq!(got, BURST, "the app got every byte");
    assert_eq!(p.trims, 0, "not while data moves");
    assert_eq!(p.relay.poll_timeout(), Some(last + TRIM_QUIET));
    p.run_for(TRIM_QUIET / 2);
    assert_eq!(p.trims, 0, "not before the flows were quiet for TRIM_QUIET");
    p.run_for(TRIM_QUIET);
    assert_eq!(p.trims, 1, "the burst's memory given back");
    p.relay.handle_trimmed();
    p.run_for(TRIM_EVERY * 3);
    assert_eq!(p.trims, 1, "once per burst");
    // Uploads count too.
    let mut sent = 0;
    while sent < BURST {
        sent += p
            .tcp(a)
            .send_slice(&chunk[..chunk.len().min(BURST - sent)])
            .unwrap();
        p.run_for(Duration::from_millis(10));
        assert_eq!(p.trims, 1, "not while data moves");
    }
    p.run_for(TRIM_QUIET * 2);
    assert_eq!(
        wire.borrow().data().len(),
        BURST,
        "the destination got every byte"
    );
    assert_eq!(p.trims, 2, "an upload burst is given back too");
    // What the engine keeps for the next flows and packets goes with it: a short flow
    // leaves its socket to the spares, and the trim after it lets go of them.
    p.relay.handle_trimmed();
    short_flow(&mut p, vpc(10, 81), LINK0);
    p.run_for(TRIM_EVERY * 2);
    assert_eq!(p.trims, 3, "a closed flow's memory is given back");
    assert!(
        p.spares_dropped[2] >= 1,
        "the short flow's socket was a spare: {:?}",
        p.spares_dropped
    );
    assert_eq!(p.engine.spares(), 0);
}

#[test]
fn stopping_resets_every_flow_and_closes_every_channel() {
    let mut p = Pair::new();
    let (a, _, wire) = p.open(vpc(10, 80), LINK0);
    let waiting = p.connect(vpc(11, 80));
    p.relay.handle_stop(false);
    p.carry_out();
    p.step();
    assert_eq!(p.state(a), State::Closed);
    assert_eq!(p.state(waiting), State::Closed);
    assert_eq!(wire.borrow().written, [WriteOp::Close]);
    let reasons: Vec<CloseReason> = p
        .notes
        .iter()
        .filter_map(|n| match n {
            Note::Closed { reason, .. } => Some(*reason),
            _ => None,
        })
        .collect();
    assert_eq!(reasons, [CloseReason::Shutdown, CloseReason::Shutdown]);
}

// ----- the direct path (`mse-vpn run`) -----

/// An address outside the VPC.
fn outside(port: u16) -> SocketAddr {
    SocketAddr::from(([192, 0, 2, 80], port))
}

/// The split-DNS responder's socket on the host.
const RESPONDER: &str = "127.0.0.1:40053";

/// A pair whose relay sends what is not the VPC (10.0.0.0/16) out directly, with the host's
/// loopback at 198.18.0.2 and DNS at 198.18.0.3.
fn direct_pair(max_udp: usize) -> Pair {
    let direct = DirectConfig {
        host_loopback: vec![direct::HOST_LOOPBACK_V4.into()],
        dns: Some(DnsRedirect {
            at: SocketAddr::from((direct::DNS_V4, 53)),
            to: RESPONDER.parse().unwrap(),
        }),
        max_udp,
        ..DirectConfig::new(vec!["10.0.0.0/16".parse().unwrap()])
    };
    Pair::with(
        EngineConfig {
            datagrams: true,
            ..engine_config()
        },
        RelayConfig {
            direct: Some(direct),
            ..relay_config()
        },
    )
}

#[test]
fn outside_the_vpc_a_flow_is_a_host_connection_held_until_made_and_relayed_like_a_channel() {
    let mut p = direct_pair(8);
    let h = p.connect(outside(443));
    let c = p.connect_of(h);
    assert_eq!(c.target, outside(443), "to the destination itself");
    assert_eq!(c.cap, relay_config().open_timeout);
    assert!(p.opens.is_empty(), "no SSH channel");
    assert_eq!(p.state(h), State::SynSent, "the SYN is held");
    assert_eq!(p.relay.connecting(), 1);

    let wire = p.connected(c.id, Ok(()));
    assert_eq!(p.state(h), State::Established);
    assert_eq!(p.relay.connecting(), 0);
    p.send(h, b"GET / HTTP/1.1\r\n\r\n");
    assert_eq!(wire.borrow().data(), b"GET / HTTP/1.1\r\n\r\n");
    p.deliver(
        c.id,
        Received::Data(Bytes::from_static(b"HTTP/1.1 200 OK\r\n")),
    );
    assert_eq!(p.recv(h), b"HTTP/1.1 200 OK\r\n");
    // The peer's FIN, then the app's: the flow finishes; the connection is closed.
    p.deliver(c.id, Received::Eof);
    p.tcp(h).close();
    p.run_for(Duration::from_millis(50));
    assert_eq!(
        wire.borrow().written[1..],
        [WriteOp::Eof, WriteOp::Close],
        "EOF then the close"
    );
    assert_eq!(p.relay.flow_count(), 0);
    assert!(p.links.is_empty(), "a host connection is on no SSH link");

    // The VPC still goes through SSH.
    let v = p.connect(vpc(10, 5432));
    assert_eq!(p.open_of(v).key.dst, vpc(10, 5432));
    assert_eq!(p.connects.len(), 1);
}

#[test]
fn the_loopback_alias_is_the_hosts_127_0_0_1_and_the_dns_address_the_responder() {
    let mut p = direct_pair(8);
    let db = p.connect(SocketAddr::from((direct::HOST_LOOPBACK_V4, 5432)));
    assert_eq!(p.connect_of(db).target, "127.0.0.1:5432".parse().unwrap());
    let dns = p.connect(SocketAddr::from((direct::DNS_V4, 53)));
    assert_eq!(p.connect_of(dns).target, RESPONDER.parse().unwrap());
    // The app sees the address it dialled.
    let id = p.connect_of(db).id;
    p.connected(id, Ok(()));
    assert_eq!(p.state(db), State::Established);
    let remote = p.tcp(db).remote_endpoint().unwrap();
    assert_eq!(remote.addr, IpAddress::Ipv4(direct::HOST_LOOPBACK_V4));
    // The DNS address serves DNS only: another port is refused here, never sent out.
    let web = p.connect(SocketAddr::from((direct::DNS_V4, 80)));
    assert_eq!(p.state(web), State::Closed);
    assert_eq!(p.connects.len(), 2);
}

#[test]
fn a_refused_or_unreachable_host_connection_resets_the_app() {
    let mut p = direct_pair(8);
    let h = p.connect(outside(81));
    let id = p.connect_of(h).id;
    p.connected(id, Err(ConnectError::Refused));
    assert_eq!(p.state(h), State::Closed, "a closed port looks closed");
    let g = p.connect(outside(82));
    let id = p.connect_of(g).id;
    p.connected(id, Err(ConnectError::Unreachable));
    assert_eq!(p.state(g), State::Closed);
    let reasons: Vec<CloseReason> = p
        .notes
        .iter()
        .filter_map(|n| match n {
            Note::Closed { reason, .. } => Some(*reason),
            _ => None,
        })
        .collect();
    assert_eq!(
        reasons,
        [CloseReason::HostRefused, CloseReason::HostUnreachable]
    );
    assert!(
        !p.notes.iter().any(Note::is_warning),
        "a destination outside the VPC refusing is the app's business"
    );
    assert_eq!(p.engine.stats().flows_refused, 2);
    assert_eq!(p.relay.connecting(), 0);
}

#[test]
fn a_host_connection_made_after_its_app_gave_up_is_closed_at_once() {
    let mut p = direct_pair(8);
    let h = p.connect(outside(443));
    let id = p.connect_of(h).id;
    p.run_for(SYN_HOLD + Duration::from_secs(1));
    assert_eq!(p.state(h), State::Closed);
    let wire = p.connected(id, Ok(()));
    assert!(wire.borrow().dropped);
    assert_eq!(p.relay.connecting(), 0);
    assert_eq!(p.relay.flow_count(), 0);
    assert_eq!(p.engine.flow_count(), 0);
}

#[test]
fn host_connections_have_their_own_bound_and_leave_the_jump_hosts_alone() {
    let mut p = direct_pair(8);
    let pending: Vec<SocketHandle> = (0..MAX_OPENING as u16)
        .map(|i| p.connect(outside(1000 + i)))
        .collect();
    assert_eq!(p.connects.len(), MAX_OPENING);
    let over = p.connect(outside(2000));
    assert_eq!(p.state(over), State::Closed, "reset at once");
    assert_eq!(p.connects.len(), MAX_OPENING);
    // The jump host's opens are not taken by them.
    let v = p.connect(vpc(10, 80));
    assert_eq!(p.state(v), State::SynSent);
    assert_eq!(p.opens.len(), 1);
    // One made: room for one more.
    let id = p.connect_of(pending[0]).id;
    p.connected(id, Ok(()));
    let next = p.connect(outside(2001));
    assert_eq!(p.state(next), State::SynSent);
    assert_eq!(p.relay.connecting(), MAX_OPENING);
}

#[test]
fn a_lost_link_leaves_host_connections_alone_and_they_are_never_counted_on_a_link() {
    let mut p = direct_pair(8);
    let h = p.connect(outside(443));
    let id = p.connect_of(h).id;
    p.connected(id, Ok(()));
    let (v, ..) = p.open(vpc(10, 80), LINK0);
    // Bulk both ways: an SSH flow would be counted heavy on its link.
    for _ in 0..40 {
        p.deliver(id, Received::Data(Bytes::from(vec![1u8; 32 * 1024])));
        p.recv(h);
    }
    assert!(p.links.is_empty(), "{:?}", p.links);
    let now = p.now();
    p.relay.handle_links(now, |_| false);
    p.carry_out();
    p.step();
    assert_eq!(p.state(v), State::Closed, "the SSH flow is reset");
    assert_eq!(
        p.state(h),
        State::Established,
        "the host connection goes on"
    );
}

#[test]
fn udp_outside_goes_out_on_one_socket_per_app_socket_and_replies_come_from_the_destination() {
    let mut p = direct_pair(8);
    let ntp = outside(123);
    p.send_udp(5000, ntp, b"q1");
    p.send_udp(5000, ntp, b"q2");
    let first = UdpId(0);
    assert_eq!(
        p.udp,
        [
            UdpOp::Open {
                id: first,
                target: ntp,
                echo: false
            },
            UdpOp::Send {
                id: first,
                payload: Bytes::from_static(b"q1")
            },
            UdpOp::Send {
                id: first,
                payload: Bytes::from_static(b"q2")
            },
        ]
    );
    p.udp_event(first, UdpEvent::Datagram(Bytes::from_static(b"r1")));
    let app = SocketAddr::from((APP_V4, 5000));
    assert_eq!(
        p.take_datagrams(),
        (vec![(ntp, app, b"r1".to_vec())], vec![])
    );
    // Another app socket: its own association.
    p.send_udp(5001, ntp, b"q3");
    assert!(matches!(p.udp[3], UdpOp::Open { id: UdpId(1), .. }));
    assert_eq!(p.relay.udp_associations(), 2);
    assert!(p.opens.is_empty() && p.connects.is_empty(), "no TCP");
}

#[test]
fn udp_to_the_vpc_or_to_a_closed_port_gets_port_unreachable() {
    let mut p = direct_pair(8);
    p.send_udp(5000, vpc(10, 53), b"q");
    assert!(p.udp.is_empty(), "UDP never goes through SSH");
    assert_eq!(p.take_datagrams(), (vec![], vec![vpc(10, 53)]));
    // A destination whose port is closed answers ICMP: the app hears it.
    p.send_udp(5001, outside(9), b"q");
    p.udp_event(UdpId(0), UdpEvent::Refused);
    assert_eq!(p.take_datagrams(), (vec![], vec![outside(9)]));
    assert_eq!(p.relay.udp_associations(), 1, "kept: the app may try again");
    // A socket that failed is forgotten and closed.
    p.udp_event(UdpId(0), UdpEvent::Failed);
    assert_eq!(p.relay.udp_associations(), 0);
    assert_eq!(p.udp.last(), Some(&UdpOp::Close { id: UdpId(0) }));
}

#[test]
fn dns_to_the_dns_address_goes_to_the_responder_and_answers_come_from_the_dns_address() {
    let mut p = direct_pair(8);
    let dns = SocketAddr::from((direct::DNS_V4, 53));
    p.send_udp(5353, dns, b"query");
    assert_eq!(
        p.udp[0],
        UdpOp::Open {
            id: UdpId(0),
            target: RESPONDER.parse().unwrap(),
            echo: false
        }
    );
    p.udp_event(UdpId(0), UdpEvent::Datagram(Bytes::from_static(b"answer")));
    let app = SocketAddr::from((APP_V4, 5353));
    assert_eq!(
        p.take_datagrams(),
        (vec![(dns, app, b"answer".to_vec())], vec![])
    );
    let ntp = SocketAddr::from((direct::DNS_V4, 123));
    p.send_udp(5353, ntp, b"time?");
    assert_eq!(p.take_datagrams(), (vec![], vec![ntp]));
    assert_eq!(p.udp.len(), 2, "no socket for it");
}

#[test]
fn idle_udp_associations_are_closed_and_a_full_table_makes_room_from_the_idlest() {
    let mut p = direct_pair(2);
    p.send_udp(5000, outside(53), b"a");
    p.run_for(Duration::from_secs(1));
    p.send_udp(5001, outside(53), b"b");
    p.run_for(Duration::from_secs(1));
    p.send_udp(5002, outside(53), b"c");
    assert!(
        p.udp.contains(&UdpOp::Close { id: UdpId(0) }),
        "the idlest made room: {:?}",
        p.udp
    );
    assert_eq!(p.relay.udp_associations(), 2);
    let evicted = p.notes_of(|n| matches!(n, Note::UdpEvicted { .. }));
    assert_eq!(
        evicted,
        [Note::UdpEvicted {
            key: UdpKey {
                src: SocketAddr::from((APP_V4, 5000)),
                dst: outside(53),
                echo: false
            }
        }]
    );
    p.udp.clear();
    p.run_for(direct::UDP_SHORT_IDLE + Duration::from_secs(1));
    assert_eq!(
        p.udp,
        [UdpOp::Close { id: UdpId(1) }, UdpOp::Close { id: UdpId(2) }]
    );
    assert_eq!(p.relay.udp_associations(), 0);
    assert_eq!(p.relay.poll_timeout(), None, "nothing left to wait for");
}

fn ping_packet(
    src: std::net::IpAddr,
    dst: std::net::IpAddr,
    ident_seq: (u16, u16),
    request: bool,
) -> Vec<u8> {
    crate::engine::packet::emit_echo((src, dst), request, ident_seq, b"abc", 1500).unwrap()
}

#[test]
fn a_ping_outside_goes_out_on_an_icmp_socket_and_its_reply_comes_back_to_the_app() {
    let mut p = direct_pair(8);
    let (app, dst) = (APP_V4.into(), std::net::IpAddr::from([192, 0, 2, 1]));
    let ping = ping_packet(app, dst, (0x77, 1), true);
    p.app_dev.tx.push_back(ping.clone());
    p.step();
    assert_eq!(
        p.udp,
        [
            UdpOp::Open {
                id: UdpId(0),
                target: SocketAddr::new(dst, 0),
                echo: true
            },
            UdpOp::Send {
                id: UdpId(0),
                payload: Bytes::copy_from_slice(&ping[20..])
            },
        ]
    );
    // What the host's ICMP socket receives: the reply to its own identifier.
    let host = ping_packet(dst, app, (0x4242, 1), false);
    p.udp_event(
        UdpId(0),
        UdpEvent::Datagram(Bytes::copy_from_slice(&host[20..])),
    );
    let expected = ping_packet(dst, app, (0x77, 1), false);
    assert_eq!(
        p.datagrams,
        [expected],
        "the reply, with the app's identifier"
    );

    // The loopback alias pings the host's 127.0.0.1.
    let alias = std::net::IpAddr::V4(direct::HOST_LOOPBACK_V4);
    p.app_dev
        .tx
        .push_back(ping_packet(app, alias, (0x78, 1), true));
    p.step();
    assert!(
        matches!(
            p.udp[2],
            UdpOp::Open { target, echo: true, .. } if target == "127.0.0.1:0".parse().unwrap()
        ),
        "{:?}",
        p.udp
    );
}

#[test]
fn a_ping_to_the_vpc_or_without_icmp_sockets_is_prohibited_with_one_warning() {
    let mut p = direct_pair(8);
    let app: std::net::IpAddr = APP_V4.into();
    let prohibited = |p: &Pair| {
        p.datagrams
            .iter()
            .filter(|d| (d[9], d[20], d[21]) == (1, 3, 13))
            .count()
    };
    p.app_dev
        .tx
        .push_back(ping_packet(app, vpc(10, 0).ip(), (0x77, 1), true));
    p.step();
    assert!(p.udp.is_empty(), "never through SSH");
    assert_eq!(prohibited(&p), 1);

    // The host gives no ICMP socket (ping_group_range): the first request goes unanswered,
    // the next ones are prohibited at once, with one warning.
    let outside = std::net::IpAddr::from([192, 0, 2, 1]);
    p.app_dev
        .tx
        .push_back(ping_packet(app, outside, (0x77, 1), true));
    p.step();
    p.udp_event(UdpId(0), UdpEvent::Failed);
    assert_eq!(p.relay.udp_associations(), 0);
    for seq in 2..5 {
        p.app_dev
            .tx
            .push_back(ping_packet(app, outside, (0x77, seq), true));
        p.step();
    }
    assert_eq!(prohibited(&p), 1 + 3);
    assert_eq!(p.udp.len(), 3, "no more sockets tried: {:?}", p.udp);
    assert_eq!(p.notes_of(|n| *n == Note::EchoDenied).len(), 1);
    // After a while, another try.
    p.run_for(direct::UDP_SHORT_IDLE);
    p.app_dev
        .tx
        .push_back(ping_packet(app, outside, (0x77, 5), true));
    p.step();
    assert!(
        matches!(p.udp.last(), Some(UdpOp::Send { .. })),
        "{:?}",
        p.udp
    );
}
