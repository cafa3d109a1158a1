//! A seeded mutation fuzzer for the engine's packet ingest: valid segments of a few flows
//! (SYN, SYN with data, ACK, data, FIN, RST, IPv6, UDP, ICMP) are mutated, their IP and TCP/UDP
//! checksums made valid again (so mutations reach the flow table and smoltcp instead of
//! dying at the checksum check), and fed to [`Engine::handle_tun_packet`] while the SSH side
//! opens, refuses, feeds and closes channels at random and a virtual clock advances.
//!
//! `cargo test` runs a short smoke (`FUZZ_INPUTS`, default 20,000); `scripts/fuzz` runs ten
//! million inputs on a release build. A failure prints the seed to replay with `FUZZ_SEED`.

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

/// The engine's side of each seed port as its last segment showed it: (RCV.NXT, SND.NXT),
/// i.e. the sequence and acknowledgement numbers an in-sync app would use next.
type Peers = std::collections::HashMap<u16, (TcpSeqNumber, TcpSeqNumber)>;

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
    let (seq, ack) = match peers.get(&port) {
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

/// What the SSH side does between packets.
fn ssh_side(rng: &mut Rng, engine: &mut Engine, now: Instant, open: &mut Vec<FlowId>) {
    while let Some(e) = engine.poll_event() {
        match e {
            Event::Open { id, .. } => open.push(id),
            Event::Data { id, data } => engine.handle_sent(id, data.len()),
            Event::Close { id, .. } => open.retain(|i| *i != id),
            Event::Connected { .. }
            | Event::Eof { .. }
            | Event::Refused { .. }
            | Event::CloseNow { .. } => {}
        }
    }
    if open.is_empty() || rng.below(4) != 0 {
        return;
    }
    let id = open[rng.below(open.len())];
    match rng.below(8) {
        0..=2 => engine.handle_open_ok(now, id),
        3 => engine.handle_open_failed(now, id, CloseReason::OpenRefused),
        4 => engine.handle_channel_data(now, id, Bytes::from_static(b"reply")),
        5 => engine.handle_channel_eof(now, id),
        6 => engine.handle_channel_closed(now, id),
        _ => engine.abort(now, id, CloseReason::RemoteReset),
    }
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
        let mut open = Vec::new();
        let mut peers = Peers::new();
        for _ in 0..INPUTS_PER_ENGINE.min(inputs - done) {
            engine.handle_tun_packet(now, input(&mut rng, &peers));
            if rng.below(4) == 0 {
                if rng.below(16) == 0 {
                    now += Duration::from_millis(rng.below(3_000) as u64);
                }
                engine.poll(now);
                while let Some(p) = engine.poll_transmit() {
                    if let Some(e) = packet::egress(&p)
                        && let Some(ack) = e.ack
                    {
                        peers.insert(e.key.src.port(), (ack, e.seq_end));
                    }
                    engine.recycle(p);
                }
                ssh_side(&mut rng, &mut engine, now, &mut open);
            }
            done += 1;
        }
        if rng.below(2) == 0 {
            engine.reset_all(now, CloseReason::SessionLost);
        }
        let _ = engine.poll_timeout(now);
        let s = engine.stats();
        total.flows_opened += s.flows_opened;
        total.bytes_up += s.bytes_up;
        total.rst_syn_screened += s.rst_syn_screened;
        total.packets_dropped += s.packets_dropped;
        total.icmp_rejects += s.icmp_rejects;
    }
    total
}

#[test]
fn ingest_of_mutated_packets_never_panics() {
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
        panic!("the engine panicked: replay with FUZZ_SEED={seed} FUZZ_INPUTS={inputs}");
    };
    println!(
        "fuzz: {inputs} inputs, seed {seed}, {:.1} s, no panic; {stats:?}",
        start.elapsed().as_secs_f64()
    );
    // The inputs reached every stage: admission, relaying, RST screening, the classifier's
    // drops and rejects.
    assert!(stats.flows_opened > 0 && stats.bytes_up > 0 && stats.rst_syn_screened > 0);
    assert!(stats.packets_dropped > 0 && stats.icmp_rejects > 0);
}
