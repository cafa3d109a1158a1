//! Micro-benchmark of the two sans-IO cores together, the [engine](mse_vpn::engine) and the
//! [relay](mse_vpn::relay), driven the way the driver drives them: a smoltcp "app" interface
//! plays the kernel on one side; on the other a scripted jump host whose channels are
//! in-memory queues answers every request as soon as the relay writes it. No sockets, no SSH,
//! no crypto, no tokio: what is left is the cost of the cores and of carrying out the relay's
//! commands.
//!
//!   cargo bench --bench relay              # full run
//!   cargo bench --bench relay -- --quick   # a few seconds
//!
//! Figures: 64-byte request/response exchanges over 1, 50 and 1,000 flows at once, per second
//! of the whole pair (the simulated kernel side included) and in the cores' own time (every
//! engine and relay call) per exchange; beside them the same exchanges through the engine
//! alone (`benches/engine.rs`) show what the relay adds.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::rc::Rc;
use std::time::{Duration, Instant as WallClock};

use bytes::Bytes;
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr};

use mse_vpn::engine::{Engine, EngineConfig, FlowId, QueueDevice};
use mse_vpn::pool::LinkId;
use mse_vpn::relay::{ChannelOp, Command, Received, Relay, RelayConfig, WriteOp};

const APP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const GW: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const DST: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 10)), 6379);
const LINK: LinkId = LinkId {
    slot: 0,
    generation: 1,
};

/// The far end of one channel: what the jump host sent, not read yet.
type Chan = Rc<RefCell<VecDeque<Received>>>;

struct Pair {
    now: Instant,
    /// The relay's clock, moved with `now`.
    wall: std::time::Instant,
    app: Interface,
    dev: QueueDevice,
    sockets: SocketSet<'static>,
    engine: Engine,
    relay: Relay<Chan, u32>,
    /// The answer the jump host gives to each request.
    answer: Bytes,
    /// Channel opens asked for, not confirmed yet.
    opens: Vec<FlowId>,
    /// Flows whose channel has something to read.
    ready: Vec<FlowId>,
    /// Writes finished, not reported yet.
    done: Vec<(FlowId, Option<usize>)>,
    /// Wall time spent in the engine's and the relay's calls (not the app side's).
    cores: Duration,
}

impl Pair {
    fn new(answer_size: usize) -> Pair {
        let mut dev = QueueDevice::new(65_000);
        let now = Instant::from_millis(1000);
        let mut app = Interface::new(Config::new(HardwareAddress::Ip), &mut dev, now);
        app.update_ip_addrs(|a| {
            a.push(IpCidr::new(IpAddress::Ipv4(APP), 24)).unwrap();
        });
        app.routes_mut().add_default_ipv4_route(GW).unwrap();
        let engine = EngineConfig {
            mtu: 65_000,
            max_flows: 50_000,
            ..EngineConfig::default()
        };
        let wall = std::time::Instant::now();
        let relay = RelayConfig {
            max_opening: 50_000,
            open_timeout: Duration::from_secs(10),
            local_v4: APP,
            local_v6: None,
            budget: None,
            direct: None,
            trim_after: mse_vpn::relay::TRIM_AFTER_BURST,
        };
        Pair {
            now,
            wall,
            app,
            dev,
            sockets: SocketSet::new(Vec::new()),
            engine: Engine::new(engine, now, [0x42; 32]),
            relay: Relay::new(relay, wall),
            answer: Bytes::from(vec![0x62_u8; answer_size]),
            opens: Vec::new(),
            ready: Vec::new(),
            done: Vec::new(),
            cores: Duration::ZERO,
        }
    }

    /// One turn of the driver, repeated until nothing moves: packets from the app, finished
    /// writes, channel reads, the relay's tick and commands, the engine's events and packets.
    fn step(&mut self) {
        for _ in 0..64 {
            self.app.poll(self.now, &mut self.dev, &mut self.sockets);
            let start = WallClock::now();
            let (now, wall) = (self.now, self.wall);
            let mut moved = false;
            while let Some(p) = self.dev.tx.pop_front() {
                moved = true;
                self.engine.handle_tun_packet(now, p);
            }
            for (id, written) in std::mem::take(&mut self.done) {
                moved = true;
                self.relay.handle_written(wall, id, written);
                self.carry_out();
            }
            for id in std::mem::take(&mut self.ready) {
                loop {
                    let wants = self.engine.wants_data(id);
                    let Some(chan) = self.relay.reader(id, wants) else {
                        break;
                    };
                    let Some(received) = chan.borrow_mut().pop_front() else {
                        break;
                    };
                    moved = true;
                    self.relay.handle_read(wall, id, received);
                    self.carry_out();
                }
            }
            self.relay.handle_tick(wall);
            self.carry_out();
            self.engine.poll(now);
            while let Some(event) = self.engine.poll_event() {
                moved = true;
                self.relay.handle_event(wall, event);
                self.carry_out();
            }
            while let Some(id) = self.engine.poll_room() {
                moved |= self.relay.handle_room(id);
            }
            self.carry_out();
            while let Some(p) = self.engine.poll_transmit() {
                moved = true;
                self.dev.rx.push_back(p.into());
            }
            self.relay.handle_stats(&self.engine.stats());
            self.cores += start.elapsed();
            if !moved {
                break;
            }
        }
        self.now += smoltcp::time::Duration::from_micros(100);
        self.wall += Duration::from_micros(100);
    }

    /// Carries out the relay's commands as the driver does; the jump host answers each data
    /// write with one answer, at once.
    fn carry_out(&mut self) {
        while let Some(command) = self.relay.poll() {
            match command {
                Command::Engine(call) => call.apply(&mut self.engine, self.now),
                Command::Open(open) => self.opens.push(open.id),
                Command::Channel(id, ChannelOp::Write(op)) => {
                    let written = match op {
                        WriteOp::Data(d) => {
                            if let Some(chan) = self.relay.channel_mut(id) {
                                chan.borrow_mut()
                                    .push_back(Received::Data(self.answer.clone()));
                            }
                            self.ready.push(id);
                            Some(d.len())
                        }
                        WriteOp::Eof => Some(0),
                        WriteOp::Close => None,
                    };
                    self.done.push((id, written));
                }
                Command::Read { id } => self.ready.push(id),
                _ => {}
            }
        }
    }

    /// An app connection, its channel confirmed at once.
    fn open(&mut self, port: u16) -> SocketHandle {
        let mut s = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; 64 * 1024]),
            tcp::SocketBuffer::new(vec![0; 64 * 1024]),
        );
        s.set_ack_delay(None);
        s.set_nagle_enabled(false);
        s.connect(self.app.context(), DST, (IpAddress::Ipv4(APP), port))
            .unwrap();
        let h = self.sockets.add(s);
        self.step();
        for id in std::mem::take(&mut self.opens) {
            self.relay
                .handle_opened(self.wall, id, LINK, Chan::default());
            self.carry_out();
        }
        self.step();
        assert!(self.sockets.get::<tcp::Socket>(h).may_send(), "handshake");
        h
    }
}

/// `rounds` rounds of request/response exchanges of `size` bytes on `flows` flows at once:
/// every app sends a request, the jump host answers each write, every app reads its answer.
/// Returns exchanges per second of the whole pair and the cores' own time per exchange in
/// microseconds.
fn messages(flows: usize, size: usize, rounds: usize) -> (f64, f64) {
    let mut p = Pair::new(size);
    let open: Vec<SocketHandle> = (0..flows).map(|i| p.open(10_000 + i as u16)).collect();
    let request = vec![0x61_u8; size];
    let mut buf = vec![0_u8; 4096];
    p.cores = Duration::ZERO;
    let start = WallClock::now();
    for _ in 0..rounds {
        for &h in &open {
            let sent = p.sockets.get_mut::<tcp::Socket>(h).send_slice(&request);
            assert_eq!(sent, Ok(size), "the app's send buffer has room");
        }
        let mut back = 0;
        let mut turns = 0;
        while back < flows * size {
            p.step();
            for &h in &open {
                let s = p.sockets.get_mut::<tcp::Socket>(h);
                while s.can_recv() {
                    back += s.recv_slice(&mut buf).unwrap();
                }
            }
            turns += 1;
            assert!(
                turns < 10_000,
                "every answer comes back ({back} bytes of {})",
                flows * size
            );
        }
        assert_eq!(back, flows * size, "one answer per request");
    }
    let exchanges = (flows * rounds) as f64;
    (
        exchanges / start.elapsed().as_secs_f64(),
        p.cores.as_secs_f64() / exchanges * 1e6,
    )
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    println!("engine + relay micro-benchmark (in-memory pair, scripted jump host)");
    let exchanges = if quick { 2_000 } else { 50_000 };
    for flows in [1, 50, 1_000] {
        let (rate, cores_us) = messages(flows, 64, (exchanges / flows).max(2));
        println!(
            "  64-byte request/response, {flows:>5} flows at once: {rate:>8.0} exchanges/s; the cores' own time {cores_us:.2} us per exchange"
        );
    }
}
