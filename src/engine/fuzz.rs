//! A seeded mutation fuzzer for the engine's packet ingest: valid segments of a few flows
//! (SYN, SYN with data, ACK, data, FIN, RST, IPv6, UDP, ICMP) are mutated, their IP and TCP/UDP
//! checksums made valid again (so mutations reach the flow table and smoltcp instead of
//! dying at the checksum check), and fed to [`Engine::handle_tun_packet`] while the SSH side
//! opens, refuses, feeds and closes channels at random and a virtual clock advances.
//!
//! Not only "no panic": after every step the engine's invariants hold
//! ([`Engine::check_invariants`]: no socket listening, no socket without its flow, the
//! buffered-bytes count exact); every flow opened gets exactly one close and no event after
//! it; and at the end of each engine's life, when the app's kernel resets every connection
//! (answering challenge ACKs as a kernel does) and the SSH side fails every open, no flow
//! outlives its reset and nothing is left closing.
//!
//! `cargo test` runs a short smoke (`FUZZ_INPUTS`, default 20,000); `scripts/fuzz` runs ten
//! million inputs on a release build, then the coverage-guided targets (`fuzz/`). A failure
//! prints the seed to replay with `FUZZ_SEED`.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;

use bytes::Bytes;
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{
    IpAddress, IpProtocol, Ipv4Packet, Ipv6Packet, TcpControl, TcpPacket, TcpRepr, TcpSeqNumber,
    UdpPacket,
};

use super::packet::tests::{APP_V4, APP_V6, VPC_V4, VPC_V6, tcp_v4, udp_v4, udp_v6};
use super::*;

/// Inputs in a plain `cargo test` run.
const SMOKE_INPUTS: u64 = 20_000;
/// A fresh engine after this many inputs (bounds memory, varies the start state).
const INPUTS_PER_ENGINE: u64 = 50_000;
/// App ports the seeds use: few, so mutated segments often hit live flows.
const PORTS: [u16; 4] = [40_000, 40_001, 40_002, 40_003];

/// xorshift64*: small, fast, deterministic from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// The engine's side of each seed connection (app port, IPv6) as its last segment showed it:
/// (RCV.NXT, SND.NXT), i.e. the sequence and acknowledgement numbers an in-sync app would use
/// next.
type Peers = HashMap<(u16, bool), (TcpSeqNumber, TcpSeqNumber)>;

/// The same, by each connection's exact 4-tuple (mutations make flows of other addresses and
/// ports too).
type Exact = HashMap<FlowKey, TcpSeqNumber>;

/// The app's own next sequence number (SND.NXT) on each connection, from the segments fed
/// to the engine: where the app's kernel puts its RST, whether or not the engine took all
/// of those segments.
type AppNext = HashMap<FlowKey, TcpSeqNumber>;

/// The connection and the end of the sequence space of a TCP segment from an app.
fn app_segment(p: &[u8]) -> Option<(FlowKey, TcpSeqNumber)> {
    let (src, dst, payload) = match p.first()? >> 4 {
        4 => {
            let ip = Ipv4Packet::new_checked(p).ok()?;
            if ip.next_header() != IpProtocol::Tcp {
                return None;
            }
            (
                IpAddr::V4(ip.src_addr()),
                IpAddr::V4(ip.dst_addr()),
                ip.payload(),
            )
        }
        6 => {
            let ip = Ipv6Packet::new_checked(p).ok()?;
            if ip.next_header() != IpProtocol::Tcp {
                return None;
            }
            (
                IpAddr::V6(ip.src_addr()),
                IpAddr::V6(ip.dst_addr()),
                ip.payload(),
            )
        }
        _ => return None,
    };
    let tcp = TcpPacket::new_checked(payload).ok()?;
    let len = tcp.payload().len() + usize::from(tcp.syn()) + usize::from(tcp.fin());
    let key = FlowKey {
        src: std::net::SocketAddr::new(src, tcp.src_port()),
        dst: std::net::SocketAddr::new(dst, tcp.dst_port()),
    };
    Some((key, tcp.seq_number() + len))
}

/// A TCP segment of one of the seed flows, over IPv4 or IPv6; mostly in sync with the
/// engine's sequence numbers, so that handshakes complete and data is relayed.
fn segment(rng: &mut Rng, v6: bool, peers: &Peers) -> Vec<u8> {
    const CONTROLS: [TcpControl; 5] = [
        TcpControl::Syn,
        TcpControl::None,
        TcpControl::Psh,
        TcpControl::Fin,
        TcpControl::Rst,
    ];
    let control = CONTROLS[rng.below(CONTROLS.len())];
    let payload = vec![0x42; [0, 0, 1, 100, 1400][rng.below(5)]];
    let port = PORTS[rng.below(PORTS.len())];
    let (seq, ack) = match peers.get(&(port, v6)) {
        Some(&(seq, ack)) if rng.below(4) != 0 => (seq, ack),
        _ => (
            TcpSeqNumber(1000 + rng.below(3) as i32),
            TcpSeqNumber(rng.next() as i32),
        ),
    };
    let tcp = TcpRepr {
        src_port: port,
        dst_port: 80,
        control,
        seq_number: seq,
        ack_number: (control != TcpControl::Syn || rng.below(4) == 0).then_some(ack),
        window_len: rng.next() as u16,
        window_scale: (rng.below(2) == 0).then_some(7),
        max_seg_size: (control == TcpControl::Syn).then_some(1460),
        sack_permitted: rng.below(2) == 0,
        sack_ranges: [None, None, None],
        timestamp: None,
        payload: &payload,
    };
    let (src, dst) = if v6 {
        (IpAddr::V6(APP_V6), IpAddr::V6(VPC_V6))
    } else {
        (IpAddr::V4(APP_V4), IpAddr::V4(VPC_V4))
    };
    packet::emit_tcp(src, dst, &tcp).expect("one family")
}

/// Makes the IPv4 header checksum and the TCP/UDP checksum valid again, where the mutated
/// packet still parses far enough to have them.
fn fix_checksums(p: &mut [u8]) {
    match p.first().map(|b| b >> 4) {
        Some(4) => {
            let Ok(mut ip) = Ipv4Packet::new_checked(&mut *p) else {
                return;
            };
            ip.fill_checksum();
            let (src, dst) = (ip.src_addr(), ip.dst_addr());
            let proto = ip.next_header();
            fix_transport(
                proto,
                ip.payload_mut(),
                &IpAddress::Ipv4(src),
                &IpAddress::Ipv4(dst),
            );
        }
        Some(6) => {
            let Ok(mut ip) = Ipv6Packet::new_checked(&mut *p) else {
                return;
            };
            let (src, dst) = (ip.src_addr(), ip.dst_addr());
            let proto = ip.next_header();
            fix_transport(
                proto,
                ip.payload_mut(),
                &IpAddress::Ipv6(src),
                &IpAddress::Ipv6(dst),
            );
        }
        _ => {}
    }
}

fn fix_transport(proto: IpProtocol, payload: &mut [u8], src: &IpAddress, dst: &IpAddress) {
    match proto {
        IpProtocol::Tcp => {
            if let Ok(mut tcp) = TcpPacket::new_checked(payload) {
                tcp.fill_checksum(src, dst);
            }
        }
        IpProtocol::Udp => {
            if let Ok(mut udp) = UdpPacket::new_checked(payload) {
                udp.fill_checksum(src, dst);
            }
        }
        _ => {}
    }
}

/// One input: a seed packet, mutated.
fn input(rng: &mut Rng, peers: &Peers) -> Vec<u8> {
    let mut p = match rng.below(10) {
        0 => udp_v4((APP_V4, 5353), (VPC_V4, 53), b"query"),
        1 => udp_v6((APP_V6, 5353), (VPC_V6, 53), b"query"),
        2 => tcp_v4((APP_V4, PORTS[0]), (VPC_V4, 80), TcpControl::Syn),
        3 => segment(rng, true, peers),
        _ => segment(rng, false, peers),
    };
    match rng.below(8) {
        0 => {} // unmutated: drives flows forward
        1 => p.truncate(rng.below(p.len() + 1)),
        2 => {
            let extra = rng.below(64);
            p.extend((0..extra).map(|_| rng.next() as u8));
        }
        _ => {
            for _ in 0..=rng.below(4) {
                let i = rng.below(p.len());
                match rng.below(3) {
                    0 => p[i] = rng.next() as u8,
                    1 => p[i] ^= 1 << rng.below(8),
                    // Header fields live early: aim there more often.
                    _ => {
                        let j = rng.below(p.len().min(60));
                        p[j] = rng.next() as u8;
                    }
                }
            }
        }
    }
    if rng.below(8) != 0 {
        fix_checksums(&mut p);
    }
    p
}

/// What the fuzzer saw of each flow, to check that every open gets exactly one close and
/// nothing after it.
#[derive(Default)]
struct Ledger {
    /// Flows opened and not closed, with their 4-tuple.
    live: HashMap<FlowId, FlowKey>,
    closed: HashSet<FlowId>,
}

impl Ledger {
    /// Takes the engine's events, checking them against what was seen before.
    fn events(&mut self, engine: &mut Engine) {
        while let Some(e) = engine.poll_event() {
            match e {
                Event::Open { id, key } => {
                    assert!(
                        !self.closed.contains(&id) && !self.live.contains_key(&id),
                        "{id} opened twice"
                    );
                    self.live.insert(id, key);
                }
                Event::Data { id, data } => {
                    assert!(self.live.contains_key(&id), "data for {id}, not open");
                    engine.handle_sent(id, data.len());
                }
                Event::Eof { id } | Event::CloseNow { id } | Event::Connected { id } => {
                    assert!(self.live.contains_key(&id) || self.closed.contains(&id));
                    assert!(
                        !matches!(e, Event::Eof { .. }) || !self.closed.contains(&id),
                        "EOF for {id} after its close"
                    );
                }
                Event::Close { id, .. } => {
                    assert!(
                        self.live.remove(&id).is_some(),
                        "{id} closed twice or never opened"
                    );
                    self.closed.insert(id);
                    // The driver's close of the channel is done at once.
                    engine.handle_close_done(id);
                }
                Event::Refused { .. } => {}
            }
        }
    }
}

/// What the SSH side does between packets.
fn ssh_side(rng: &mut Rng, engine: &mut Engine, now: Instant, ledger: &mut Ledger) {
    ledger.events(engine);
    if ledger.live.is_empty() || rng.below(4) != 0 {
        return;
    }
    let ids: Vec<FlowId> = ledger.live.keys().copied().collect();
    let id = ids[rng.below(ids.len())];
    match rng.below(8) {
        0..=2 => engine.handle_open_ok(now, id),
        3 => engine.handle_open_failed(now, id, CloseReason::OpenRefused),
        4 => engine.handle_channel_data(now, id, Bytes::from_static(b"reply")),
        5 => engine.handle_channel_eof(now, id),
        6 => engine.handle_channel_closed(now, id),
        _ => engine.abort(now, id, CloseReason::RemoteReset),
    }
}

/// Polls, moves what the engine sent to `peers` and `exact`, checks the invariants.
fn step(engine: &mut Engine, now: Instant, peers: &mut Peers, exact: &mut Exact) {
    engine.poll(now);
    while let Some(p) = engine.poll_transmit() {
        if let Some(e) = packet::egress(&p)
            && let Some(ack) = e.ack
        {
            peers.insert((e.key.src.port(), e.key.src.is_ipv6()), (ack, e.seq_end));
            exact.insert(e.key, ack);
        }
        engine.recycle(p);
    }
    if let Err(broken) = engine.check_invariants() {
        panic!("engine invariant broken: {broken}");
    }
}

/// The end of an engine's life: the app's kernel resets every connection, answering each
/// challenge ACK with an RST at its acknowledgement number as a kernel does, and the SSH
/// side fails every open still waiting. No flow may outlive that; then `reset_all` leaves
/// nothing, and nothing is left closing.
fn reset_everything(
    engine: &mut Engine,
    mut now: Instant,
    peers: &mut Peers,
    exact: &mut Exact,
    app_next: &AppNext,
    ledger: &mut Ledger,
) {
    // The app's first RST is at its own SND.NXT (possibly past what the engine took); after
    // that, the kernel answers each segment of the engine with an RST at its ACK number.
    exact.clear();
    for round in 0..4 {
        step(engine, now, peers, exact);
        ledger.events(engine);
        let live: Vec<(FlowId, FlowKey)> = ledger.live.iter().map(|(i, k)| (*i, *k)).collect();
        for (id, key) in live {
            let has_socket = engine
                .flows
                .get(id)
                .is_some_and(|f| f.phase.handle().is_some());
            let seq = if round == 0 {
                app_next.get(&key).or(exact.get(&key))
            } else {
                exact.get(&key)
            };
            match seq {
                Some(&rcv_nxt) if has_socket => {
                    let p =
                        packet::bare_segment((key.src, key.dst), TcpControl::Rst, rcv_nxt, None, 0)
                            .expect("one family");
                    engine.handle_tun_packet(now, p);
                }
                _ if has_socket => {}
                _ => engine.handle_open_failed(now, id, CloseReason::OpenRefused),
            }
        }
        // A challenge held back by its rate limit goes out at the next sweep.
        now += Duration::from_secs(1);
    }
    step(engine, now, peers, exact);
    ledger.events(engine);
    // A flow whose socket never sent anything to learn its sequence numbers from cannot be
    // reset by the app (it does not know them either): the SSH side ends those. A flow still
    // in its handshake may ignore the RST (smoltcp in SYN-RECEIVED, seen with mutated
    // segments): the handshake timeout ends it.
    let outlived = |engine: &Engine, ledger: &Ledger, handshakes: bool| -> Vec<FlowId> {
        ledger
            .live
            .keys()
            .copied()
            .filter(|id| {
                engine.flows.get(*id).is_some_and(|f| {
                    let synced = f.seq.is_some_and(|t| t.rcv_nxt.is_some());
                    let handshake = f.phase.handle().is_some_and(|h| {
                        engine.shards[shard_of(*id)]
                            .sockets
                            .get::<tcp::Socket>(h)
                            .state()
                            == tcp::State::SynReceived
                    });
                    synced && (handshakes || !handshake)
                })
            })
            .collect()
    };
    let left = outlived(engine, ledger, false);
    assert!(
        left.is_empty(),
        "flows outlived their app's reset: {left:?}"
    );
    now += SYN_RECEIVED_TIMEOUT;
    step(engine, now, peers, exact);
    ledger.events(engine);
    let left = outlived(engine, ledger, true);
    assert!(
        left.is_empty(),
        "handshakes outlived their timeout: {left:?}"
    );
    engine.reset_all(now, CloseReason::SessionLost);
    step(engine, now, peers, exact);
    ledger.events(engine);
    assert_eq!(engine.flow_count(), 0, "reset_all leaves no flow");
    assert!(
        ledger.live.is_empty(),
        "every open got its close: {:?}",
        ledger.live
    );
    assert_eq!(engine.stats().flows_closing, 0, "nothing left closing");
    assert_eq!(engine.stats().buffered, 0, "nothing left buffered");
}

/// Feeds `inputs` mutated packets to fresh engines; returns their counters summed (to show
/// the inputs got past classification into flows).
fn run(seed: u64, inputs: u64) -> EngineStats {
    let mut rng = Rng(seed | 1);
    let mut done = 0;
    let mut total = EngineStats::default();
    while done < inputs {
        let mut now = Instant::from_secs(1);
        let mut engine = Engine::new(
            EngineConfig {
                max_flows: 64,
                tcp_buffer: 4096,
                ..EngineConfig::default()
            },
            now,
        );
        let mut ledger = Ledger::default();
        let mut peers = Peers::new();
        let mut exact = Exact::new();
        let mut app_next = AppNext::new();
        for _ in 0..INPUTS_PER_ENGINE.min(inputs - done) {
            let p = input(&mut rng, &peers);
            if let Some((key, end)) = app_segment(&p) {
                let next = app_next.entry(key).or_insert(end);
                *next = (*next).max(end);
            }
            engine.handle_tun_packet(now, p);
            if rng.below(4) == 0 {
                if rng.below(16) == 0 {
                    now += Duration::from_millis(rng.below(3_000) as u64);
                }
                step(&mut engine, now, &mut peers, &mut exact);
                ssh_side(&mut rng, &mut engine, now, &mut ledger);
            }
            done += 1;
        }
        let _ = engine.poll_timeout(now);
        let s = engine.stats();
        reset_everything(
            &mut engine,
            now,
            &mut peers,
            &mut exact,
            &app_next,
            &mut ledger,
        );
        total.flows_opened += s.flows_opened;
        total.bytes_up += s.bytes_up;
        total.rst_syn_screened += s.rst_syn_screened;
        total.packets_dropped += s.packets_dropped;
        total.icmp_rejects += s.icmp_rejects;
    }
    total
}

#[test]
fn ingest_of_mutated_packets_keeps_every_invariant() {
    let inputs = std::env::var("FUZZ_INPUTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(SMOKE_INPUTS);
    let seed = std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed_f00d_u64);
    let start = std::time::Instant::now();
    let Ok(stats) = std::panic::catch_unwind(|| run(seed, inputs)) else {
        panic!(
            "the engine panicked or broke an invariant: replay with FUZZ_SEED={seed} FUZZ_INPUTS={inputs}"
        );
    };
    println!(
        "fuzz: {inputs} inputs, seed {seed}, {:.1} s, every invariant held; {stats:?}",
        start.elapsed().as_secs_f64()
    );
    // The inputs reached every stage: admission, relaying, RST screening, the classifier's
    // drops and rejects.
    assert!(stats.flows_opened > 0 && stats.bytes_up > 0 && stats.rst_syn_screened > 0);
    assert!(stats.packets_dropped > 0 && stats.icmp_rejects > 0);
}
