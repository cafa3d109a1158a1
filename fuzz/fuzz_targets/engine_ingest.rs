//! The engine's packet ingest, coverage-guided: the input is a script of operations (a TUN
//! packet, a step of the clock, or an action of the SSH side on a live flow), and after each
//! step the engine's invariants must hold (no socket listening, no socket without its flow,
//! the buffered count exact), every flow opened gets exactly one close and no data after it;
//! at the end, `reset_all` leaves no flow and nothing closing.

#![no_main]

use std::collections::HashSet;

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use mse_vpn::engine::{CloseReason, Engine, EngineConfig, Event, FlowId};
use smoltcp::time::{Duration, Instant};

fn drain(engine: &mut Engine, live: &mut HashSet<FlowId>, closed: &mut HashSet<FlowId>) {
    while let Some(e) = engine.poll_event() {
        match e {
            Event::Open { id, .. } => {
                assert!(!closed.contains(&id) && live.insert(id), "{id} opened twice");
            }
            Event::Data { id, data } => {
                assert!(live.contains(&id), "data for {id}, not open");
                engine.handle_sent(id, data.len());
            }
            Event::Close { id, .. } => {
                assert!(live.remove(&id), "{id} closed twice or never opened");
                closed.insert(id);
                engine.handle_close_done(id);
            }
            Event::Eof { id } => assert!(!closed.contains(&id), "EOF for {id} after its close"),
            _ => {}
        }
    }
    while let Some(p) = engine.poll_transmit() {
        engine.recycle(p);
    }
    if let Err(broken) = engine.check_invariants() {
        panic!("engine invariant broken: {broken}");
    }
}

fuzz_target!(|data: &[u8]| {
    let mut now = Instant::from_secs(1);
    let mut engine = Engine::new(
        EngineConfig {
            max_flows: 16,
            tcp_buffer: 4096,
            tun: mse_vpn::engine::TunFormat {
                header: 0,
                checksum_offload: true, // checksums are not what is fuzzed here
            },
            ..EngineConfig::default()
        },
        now,
        [0; 32], // a fixed seed: an input replays exactly
    );
    let (mut live, mut closed) = (HashSet::new(), HashSet::new());
    let mut rest = data;
    while let [op, tail @ ..] = rest {
        rest = tail;
        match op % 8 {
            // A packet: the next byte is its length.
            0..=3 => {
                let Some((&len, tail)) = rest.split_first() else {
                    break;
                };
                let n = (len as usize).min(tail.len());
                engine.handle_tun_packet(now, tail[..n].to_vec());
                rest = &tail[n..];
            }
            4 => now += Duration::from_millis(u64::from(op / 8) * 100),
            _ => {
                let ids: Vec<FlowId> = live.iter().copied().collect();
                if ids.is_empty() {
                    continue;
                }
                let id = ids[(*op as usize / 8) % ids.len()];
                match op / 8 % 6 {
                    0 | 1 => engine.handle_open_ok(now, id),
                    2 => engine.handle_open_failed(now, id, CloseReason::OpenRefused),
                    3 => engine.handle_channel_data(now, id, Bytes::from_static(b"reply")),
                    4 => engine.handle_channel_eof(now, id),
                    _ => engine.handle_channel_closed(now, id),
                }
            }
        }
        engine.poll(now);
        drain(&mut engine, &mut live, &mut closed);
    }
    engine.reset_all(now, CloseReason::SessionLost);
    drain(&mut engine, &mut live, &mut closed);
    assert_eq!(engine.flow_count(), 0, "reset_all leaves no flow");
    assert!(live.is_empty(), "every open got its close: {live:?}");
    assert_eq!(engine.stats().flows_closing, 0, "nothing left closing");
});
