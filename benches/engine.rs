//! Micro-benchmark of the engine alone: an in-memory pair (a smoltcp "app" interface playing
//! the kernel, the engine in the middle, the SSH side scripted), no sockets, no threads, no
//! crypto. It shows data-path regressions without the namespace testbed.
//!
//!   cargo bench --bench engine              # full run
//!   cargo bench --bench engine -- --quick   # a few seconds
//!
//! Figures: upload and download MB/s through one flow (TUN MTU 65000 and 1500), flow setups
//! per second (SYN held, channel "opens", handshake completes, app closes), and small
//! messages: 64-byte request/response exchanges over 1, 50 and 1,000 flows at once, per
//! second of the whole pair and in the engine's own time per exchange.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Instant as WallClock;

use bytes::Bytes;
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr};

use mse_vpn::engine::{Engine, EngineConfig, Event, FlowId, QueueDevice};

const APP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const GW: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const DST: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 10)), 80);

struct Pair {
    now: Instant,
    app: Interface,
    dev: QueueDevice,
    sockets: SocketSet<'static>,
    engine: Engine,
    events: Vec<Event>,
    /// Wall time spent in the engine's calls by [`Pair::step`] (not the app side's).
    engine_time: std::time::Duration,
}

impl Pair {
    fn new(mtu: usize) -> Pair {
        let mut dev = QueueDevice::new(mtu);
        let t0 = Instant::from_millis(1000);
        let mut app = Interface::new(Config::new(HardwareAddress::Ip), &mut dev, t0);
        app.update_ip_addrs(|a| {
            a.push(IpCidr::new(IpAddress::Ipv4(APP), 24)).unwrap();
        });
        app.routes_mut().add_default_ipv4_route(GW).unwrap();
        let config = EngineConfig {
            mtu,
            max_flows: 50_000,
            ..EngineConfig::default()
        };
        Pair {
            now: t0,
            app,
            dev,
            sockets: SocketSet::new(Vec::new()),
            engine: Engine::new(config, t0, [0x42; 32]),
            events: Vec::new(),
            engine_time: std::time::Duration::ZERO,
        }
    }

    fn step(&mut self) {
        for _ in 0..64 {
            self.app.poll(self.now, &mut self.dev, &mut self.sockets);
            let mut moved = false;
            let engine_start = WallClock::now();
            while let Some(p) = self.dev.tx.pop_front() {
                moved = true;
                self.engine.handle_tun_packet(self.now, p);
            }
            self.engine.poll(self.now);
            while let Some(p) = self.engine.poll_transmit() {
                moved = true;
                self.dev.rx.push_back(p.into());
            }
            while let Some(e) = self.engine.poll_event() {
                moved = true;
                self.events.push(e);
            }
            // The driver resumes reading these flows' channels; here they are only drained.
            while self.engine.poll_room().is_some() {}
            self.engine_time += engine_start.elapsed();
            if !moved {
                break;
            }
        }
        self.now += Duration::from_micros(100);
    }

    /// Connects an app socket and completes the open; returns (app socket, flow id).
    fn open(&mut self, port: u16) -> (SocketHandle, FlowId) {
        let mut s = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; 512 * 1024]),
            tcp::SocketBuffer::new(vec![0; 512 * 1024]),
        );
        s.set_ack_delay(None);
        s.set_nagle_enabled(false);
        s.connect(self.app.context(), DST, (IpAddress::Ipv4(APP), port))
            .unwrap();
        let h = self.sockets.add(s);
        self.step();
        let id = self
            .events
            .drain(..)
            .find_map(|e| match e {
                Event::Open { id, .. } => Some(id),
                _ => None,
            })
            .expect("an Open event");
        self.engine.handle_open_ok(self.now, id);
        self.step();
        assert!(self.sockets.get::<tcp::Socket>(h).may_send(), "handshake");
        (h, id)
    }
}

fn upload(mtu: usize, total: usize) -> f64 {
    let mut p = Pair::new(mtu);
    let (h, _) = p.open(40_000);
    let chunk = vec![0x5a_u8; 256 * 1024];
    let (mut sent, mut got) = (0, 0);
    let start = WallClock::now();
    while got < total {
        if sent < total {
            sent += p
                .sockets
                .get_mut::<tcp::Socket>(h)
                .send_slice(&chunk[..chunk.len().min(total - sent)])
                .unwrap();
        }
        p.step();
        for e in std::mem::take(&mut p.events) {
            if let Event::Data { id, data } = e {
                got += data.len();
                p.engine.handle_sent(id, data.len());
            }
        }
    }
    total as f64 / start.elapsed().as_secs_f64() / 1e6
}

fn download(mtu: usize, total: usize) -> f64 {
    let mut p = Pair::new(mtu);
    let (h, id) = p.open(40_001);
    let chunk = Bytes::from(vec![0xa5_u8; 32 * 1024]);
    let mut buf = vec![0u8; 256 * 1024];
    let (mut fed, mut got) = (0, 0);
    let start = WallClock::now();
    while got < total {
        // Keep about 1 MiB queued towards the app, as the SSH window would.
        while fed < total && fed - got < 1024 * 1024 {
            p.engine.handle_channel_data(p.now, id, chunk.clone());
            fed += chunk.len();
        }
        p.step();
        let s = p.sockets.get_mut::<tcp::Socket>(h);
        while s.can_recv() {
            got += s.recv_slice(&mut buf).unwrap();
        }
    }
    total as f64 / start.elapsed().as_secs_f64() / 1e6
}

/// Opens and resets `n` flows one after another; returns setups per second.
fn setup_rate(p: &mut Pair, n: usize, first_port: u16) -> f64 {
    let start = WallClock::now();
    for i in 0..n {
        let (h, id) = p.open(first_port.wrapping_add((i % 20_000) as u16));
        p.sockets.get_mut::<tcp::Socket>(h).abort();
        p.step();
        p.engine.handle_channel_closed(p.now, id);
        p.step();
        p.sockets.remove(h);
        p.events.clear();
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn setups(n: usize) -> f64 {
    setup_rate(&mut Pair::new(65_000), n, 20_000)
}

/// Flow setups per second while `idle` other flows stay open, and the cost of one engine
/// poll with them.
fn setups_with_idle(idle: usize, n: usize) -> (f64, f64) {
    let mut p = Pair::new(65_000);
    for i in 0..idle {
        p.open(1_000 + i as u16);
    }
    let start = WallClock::now();
    for _ in 0..n {
        p.engine.poll(p.now);
        let _ = p.engine.poll_timeout(p.now);
    }
    let poll_us = start.elapsed().as_secs_f64() / n as f64 * 1e6;
    (setup_rate(&mut p, n, 30_000), poll_us)
}

/// `rounds` rounds of request/response exchanges of `size` bytes on `flows` flows at once:
/// every app sends a request, the SSH side answers each one as soon as it has it whole, every
/// app reads its answer. Returns exchanges per second of the whole pair (the simulated
/// kernel side included: one smoltcp interface polling all the app sockets) and the
/// engine's own time per exchange in microseconds (its calls only, feeding the answers
/// included).
fn messages(flows: usize, size: usize, rounds: usize) -> (f64, f64) {
    let mut p = Pair::new(65_000);
    let open: Vec<(SocketHandle, FlowId)> = (0..flows).map(|i| p.open(10_000 + i as u16)).collect();
    let request = vec![0x61_u8; size];
    let answer = Bytes::from(vec![0x62_u8; size]);
    let mut buf = vec![0_u8; 4096];
    let mut pending = vec![0_usize; flows];
    let slot = |id: FlowId| {
        open.iter()
            .position(|&(_, f)| f == id)
            .expect("a flow of ours")
    };
    p.engine_time = std::time::Duration::ZERO;
    let start = WallClock::now();
    for _ in 0..rounds {
        for &(h, _) in &open {
            let sent = p.sockets.get_mut::<tcp::Socket>(h).send_slice(&request);
            assert_eq!(sent, Ok(size), "the app's send buffer has room");
        }
        let (mut answered, mut back) = (0, 0);
        while back < flows * size {
            p.step();
            for e in std::mem::take(&mut p.events) {
                if let Event::Data { id, data } = e {
                    let at = WallClock::now();
                    p.engine.handle_sent(id, data.len());
                    let i = slot(id);
                    pending[i] += data.len();
                    if pending[i] == size {
                        pending[i] = 0;
                        answered += 1;
                        p.engine.handle_channel_data(p.now, id, answer.clone());
                    }
                    p.engine_time += at.elapsed();
                }
            }
            for &(h, _) in &open {
                let s = p.sockets.get_mut::<tcp::Socket>(h);
                while s.can_recv() {
                    back += s.recv_slice(&mut buf).unwrap();
                }
            }
        }
        assert_eq!(answered, flows, "every request arrived whole");
    }
    let exchanges = (flows * rounds) as f64;
    (
        exchanges / start.elapsed().as_secs_f64(),
        p.engine_time.as_secs_f64() / exchanges * 1e6,
    )
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let mb = if quick { 64 } else { 1024 } << 20;
    println!(
        "engine micro-benchmark (in-memory pair, one flow; {} MiB per run)",
        mb >> 20
    );
    for mtu in [65_000, 1_500] {
        println!("  upload   mtu {mtu:>5}: {:>8.0} MB/s", upload(mtu, mb));
        println!("  download mtu {mtu:>5}: {:>8.0} MB/s", download(mtu, mb));
    }
    let n = if quick { 500 } else { 5_000 };
    println!(
        "  flow setups (SYN held, open, handshake, reset): {:>8.0} /s",
        setups(n)
    );
    let idle = if quick { 2_000 } else { 10_000 };
    let (rate, poll_us) = setups_with_idle(idle, 200);
    println!(
        "  with {idle} idle flows: one engine poll {poll_us:.0} us; {rate:>6.0} setups/s (this rate includes the simulated kernel side, one smoltcp interface holding all {idle} flows)"
    );
    let exchanges = if quick { 2_000 } else { 50_000 };
    for flows in [1, 50, 1_000] {
        let (rate, engine_us) = messages(flows, 64, (exchanges / flows).max(2));
        println!(
            "  64-byte request/response, {flows:>5} flows at once: {rate:>8.0} exchanges/s; the engine's own time {engine_us:.2} us per exchange"
        );
    }
}
