//! Deterministic pair tests: an "app" smoltcp interface on a queue device plays the kernel,
//! the engine sits in the middle, and the test scripts the SSH side. Time is virtual.

use std::net::{Ipv4Addr, SocketAddr};

use bytes::Bytes;
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr};

use super::packet::tests::{APP_V4, VPC_V4, udp_v4};
use super::*;

const T0: Instant = Instant::from_millis_const(1_000);
const APP_GW: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const DST: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(VPC_V4), 80);
const APP_PORT: u16 = 40_000;

/// The kernel's side of the TUN, played by a second smoltcp interface.
struct Pair {
    now: Instant,
    app: Interface,
    app_dev: QueueDevice,
    app_sockets: SocketSet<'static>,
    engine: Engine,
    events: Vec<Event>,
    keys: Vec<(FlowId, FlowKey)>,
    /// Every packet the engine sent, if kept (see `a_pair_run_replays_bit_exact`).
    log: Option<Vec<Vec<u8>>>,
}

impl Pair {
    fn new(config: EngineConfig) -> Pair {
        Pair::with_seed(config, TEST_SEED)
    }

    fn with_seed(config: EngineConfig, seed: Seed) -> Pair {
        let mut app_dev = QueueDevice::new(config.mtu);
        let mut app = Interface::new(Config::new(HardwareAddress::Ip), &mut app_dev, T0);
        app.update_ip_addrs(|a| {
            a.push(IpCidr::new(IpAddress::Ipv4(APP_V4), 24)).unwrap();
        });
        app.routes_mut().add_default_ipv4_route(APP_GW).unwrap();
        Pair {
            now: T0,
            app,
            app_dev,
            app_sockets: SocketSet::new(Vec::new()),
            engine: Engine::new(config, T0, seed),
            events: Vec::new(),
            keys: Vec::new(),
            log: None,
        }
    }

    fn connect(&mut self, port: u16, dst: SocketAddr) -> SocketHandle {
        let mut s = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; 256 * 1024]),
            tcp::SocketBuffer::new(vec![0; 256 * 1024]),
        );
        s.set_ack_delay(None);
        s.connect(self.app.context(), dst, (IpAddress::Ipv4(APP_V4), port))
            .unwrap();
        let h = self.app_sockets.add(s);
        self.step();
        h
    }

    fn app(&mut self, h: SocketHandle) -> &mut tcp::Socket<'static> {
        self.app_sockets.get_mut::<tcp::Socket>(h)
    }

    /// Moves packets both ways until nothing moves.
    fn step(&mut self) {
        for _ in 0..64 {
            self.app
                .poll(self.now, &mut self.app_dev, &mut self.app_sockets);
            let mut moved = false;
            while let Some(p) = self.app_dev.tx.pop_front() {
                moved = true;
                self.engine.handle_tun_packet(self.now, p);
            }
            self.engine.poll(self.now);
            while let Some(p) = self.engine.poll_transmit() {
                moved = true;
                if let Some(log) = &mut self.log {
                    log.push(p.clone());
                }
                self.app_dev.rx.push_back(p.into());
            }
            while let Some(e) = self.engine.poll_event() {
                moved = true;
                if let Event::Open { id, key } = &e {
                    self.keys.push((*id, *key));
                }
                self.events.push(e);
            }
            if !moved {
                break;
            }
        }
    }

    fn advance(&mut self, by: Duration) {
        self.now += by;
        self.step();
    }

    /// The key of the flow `id` as seen in its Open event (recorded by `open_id`).
    fn key_of(&self, id: FlowId) -> FlowKey {
        self.keys
            .iter()
            .find(|(i, _)| *i == id)
            .expect("known flow")
            .1
    }

    fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    fn open_id(&mut self) -> FlowId {
        let events = self.take_events();
        match events.as_slice() {
            [Event::Open { id, key }] => {
                assert_eq!(key.dst, DST);
                *id
            }
            other => panic!("expected one Open, got {other:?}"),
        }
    }

    /// The bytes of all Data events so far, acknowledging them as sent.
    fn uploaded(&mut self) -> (Vec<u8>, Vec<Event>) {
        let mut bytes = Vec::new();
        let mut rest = Vec::new();
        for e in self.take_events() {
            match e {
                Event::Data { id, data } => {
                    bytes.extend_from_slice(&data);
                    self.engine.handle_sent(id, data.len());
                }
                other => rest.push(other),
            }
        }
        (bytes, rest)
    }

    /// The bytes of all Data events so far, left unacknowledged (the SSH side is stuck).
    fn uploaded_unacked(&mut self) -> (Vec<u8>, Vec<Event>) {
        let mut bytes = Vec::new();
        let mut rest = Vec::new();
        for e in self.take_events() {
            match e {
                Event::Data { data, .. } => bytes.extend_from_slice(&data),
                other => rest.push(other),
            }
        }
        (bytes, rest)
    }

    fn app_recv_all(&mut self, h: SocketHandle) -> Vec<u8> {
        let mut out = Vec::new();
        let s = self.app(h);
        while s.can_recv() {
            s.recv(|b| {
                out.extend_from_slice(b);
                (b.len(), ())
            })
            .unwrap();
        }
        out
    }
}

#[test]
fn syn_is_held_until_the_channel_opens_then_bytes_flow_and_half_close_works() {
    let mut p = Pair::new(EngineConfig::default());
    let h = p.connect(APP_PORT, DST);
    let id = p.open_id();
    assert_eq!(
        p.app(h).state(),
        tcp::State::SynSent,
        "no SYN-ACK before the channel is open"
    );

    p.engine.handle_open_ok(p.now, id);
    p.step();
    assert_eq!(p.app(h).state(), tcp::State::Established);

    // The app sends a request and shuts down its write side.
    p.app(h).send_slice(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    p.app(h).close();
    p.step();
    let (up, rest) = p.uploaded();
    assert_eq!(up, b"GET / HTTP/1.0\r\n\r\n");
    assert_eq!(
        rest,
        vec![Event::Eof { id }],
        "FIN maps to channel EOF after the data"
    );

    // Half-closed: the response still reaches the app, then FIN.
    p.engine
        .handle_channel_data(p.now, id, Bytes::from_static(b"HTTP/1.0 200 OK\r\n\r\nhi"));
    p.engine.handle_channel_eof(p.now, id);
    p.step();
    assert_eq!(p.app_recv_all(h), b"HTTP/1.0 200 OK\r\n\r\nhi");
    assert!(!p.app(h).may_recv(), "EOF maps to FIN");
    p.engine.handle_channel_closed(p.now, id);
    p.advance(Duration::from_millis(10));
    assert!(matches!(
        p.app(h).state(),
        tcp::State::TimeWait | tcp::State::Closed
    ));
    assert_eq!(
        p.take_events(),
        vec![Event::Close {
            id,
            key: p.key_of(id),
            reason: CloseReason::Finished
        }]
    );
    assert_eq!(p.engine.flow_count(), 0);
}

#[test]
fn refused_channel_resets_the_app_connection_at_once() {
    let mut p = Pair::new(EngineConfig::default());
    let h = p.connect(APP_PORT, DST);
    let id = p.open_id();
    p.engine
        .handle_open_failed(p.now, id, CloseReason::OpenRefused);
    p.step();
    assert_eq!(
        p.app(h).state(),
        tcp::State::Closed,
        "RST answers the held SYN"
    );
    assert_eq!(
        p.take_events(),
        vec![Event::Close {
            id,
            key: p.key_of(id),
            reason: CloseReason::OpenRefused
        }]
    );
    assert_eq!(p.engine.stats().flows_refused, 1);
}

#[test]
fn a_channel_that_does_not_open_in_time_resets_the_app() {
    let mut p = Pair::new(EngineConfig {
        open_timeout: Duration::from_secs(3),
        ..EngineConfig::default()
    });
    let h = p.connect(APP_PORT, DST);
    let id = p.open_id();
    p.advance(Duration::from_millis(2500));
    assert_eq!(p.take_events(), vec![], "still waiting");
    assert_ne!(p.app(h).state(), tcp::State::Closed);
    p.advance(Duration::from_millis(1600));
    assert_eq!(p.app(h).state(), tcp::State::Closed, "RST at the timeout");
    assert_eq!(
        p.take_events(),
        vec![Event::Close {
            id,
            key: p.key_of(id),
            reason: CloseReason::OpenTimedOut
        }]
    );
    // The channel opens too late: the engine has forgotten the flow.
    p.engine.handle_open_ok(p.now, id);
    p.step();
    assert_eq!(p.take_events(), vec![]);
    assert_eq!(p.engine.flow_count(), 0);
}

#[test]
fn retransmitted_syn_does_not_open_a_second_channel() {
    let mut p = Pair::new(EngineConfig::default());
    let h = p.connect(APP_PORT, DST);
    let id = p.open_id();
    for _ in 0..3 {
        p.advance(Duration::from_secs(2)); // the app's SYN retransmit timer fires
    }
    assert_eq!(p.take_events(), vec![], "SYN retransmits are deduplicated");
    p.engine.handle_open_ok(p.now, id);
    p.step();
    assert_eq!(p.app(h).state(), tcp::State::Established);
}

#[test]
fn concurrent_flows_to_one_destination_keep_their_own_sockets() {
    let mut p = Pair::new(EngineConfig::default());
    let a = p.connect(APP_PORT, DST);
    let b = p.connect(APP_PORT + 1, DST);
    let events = p.take_events();
    let ids: Vec<(FlowId, u16)> = events
        .iter()
        .map(|e| match e {
            Event::Open { id, key } => (*id, key.src.port()),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    // Open the second flow's channel first.
    p.engine.handle_open_ok(p.now, ids[1].0);
    p.step();
    p.engine.handle_open_ok(p.now, ids[0].0);
    p.step();
    p.app(a).send_slice(b"from-a").unwrap();
    p.app(b).send_slice(b"from-b").unwrap();
    p.step();
    for e in p.take_events() {
        if let Event::Data { id, data } = e {
            let port = ids.iter().find(|(i, _)| *i == id).unwrap().1;
            let expect: &[u8] = if port == APP_PORT {
                b"from-a"
            } else {
                b"from-b"
            };
            assert_eq!(&data[..], expect, "data mapped to the right flow");
        }
    }
    p.engine
        .handle_channel_data(p.now, ids[0].0, Bytes::from_static(b"to-a"));
    p.engine
        .handle_channel_data(p.now, ids[1].0, Bytes::from_static(b"to-b"));
    p.step();
    assert_eq!(p.app_recv_all(a), b"to-a");
    assert_eq!(p.app_recv_all(b), b"to-b");
}

#[test]
fn flow_limit_resets_new_syns_and_keeps_existing_flows() {
    let mut p = Pair::new(EngineConfig {
        max_flows: 1,
        ..EngineConfig::default()
    });
    let a = p.connect(APP_PORT, DST);
    let id = p.open_id();
    p.engine.handle_open_ok(p.now, id);
    p.step();
    let b = p.connect(APP_PORT + 1, DST);
    assert_eq!(
        p.app(b).state(),
        tcp::State::Closed,
        "over the limit: reset"
    );
    assert!(
        matches!(
            p.take_events().as_slice(),
            [Event::Refused {
                reason: CloseReason::FlowLimit,
                ..
            }]
        ),
        "no channel requested, the refusal reported"
    );
    assert_eq!(p.engine.stats().flows_over_limit, 1);
    p.app(a).send_slice(b"still-works").unwrap();
    p.step();
    let (up, _) = p.uploaded();
    assert_eq!(up, b"still-works");
}

#[test]
fn app_reset_closes_the_channel_and_channel_close_without_eof_resets_the_app() {
    let mut p = Pair::new(EngineConfig::default());
    let a = p.connect(APP_PORT, DST);
    let id_a = p.open_id();
    p.engine.handle_open_ok(p.now, id_a);
    p.step();
    p.app(a).abort();
    p.step();
    assert_eq!(
        p.take_events(),
        vec![Event::Close {
            id: id_a,
            key: p.key_of(id_a),
            reason: CloseReason::AppReset
        }]
    );

    let b = p.connect(APP_PORT + 1, DST);
    let id_b = p.open_id();
    p.engine.handle_open_ok(p.now, id_b);
    p.step();
    p.engine.handle_channel_closed(p.now, id_b);
    p.step();
    assert_eq!(p.app(b).state(), tcp::State::Closed, "RST to the app");
    assert_eq!(
        p.take_events(),
        vec![Event::Close {
            id: id_b,
            key: p.key_of(id_b),
            reason: CloseReason::RemoteReset
        }]
    );
    assert_eq!(p.engine.flow_count(), 0);
}

#[test]
fn upload_pauses_at_the_inflight_limit_until_the_ssh_side_catches_up() {
    let mut p = Pair::new(EngineConfig {
        max_inflight: 64 * 1024,
        // The app's window opens segment by segment, without waiting on the pair's clock.
        ack_delay: None,
        ..EngineConfig::default()
    });
    let h = p.connect(APP_PORT, DST);
    let id = p.open_id();
    p.engine.handle_open_ok(p.now, id);
    p.step();
    let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let mut sent = 0;
    let mut received = Vec::new();
    for _ in 0..200 {
        if sent < payload.len() {
            sent += p.app(h).send_slice(&payload[sent..]).unwrap();
        }
        p.step();
        let mut outstanding = 0;
        for e in p.take_events() {
            if let Event::Data { data, .. } = e {
                outstanding += data.len();
                received.extend_from_slice(&data);
            }
        }
        assert!(
            outstanding <= 64 * 1024,
            "never more than max_inflight outstanding"
        );
        p.engine.handle_sent(id, outstanding);
        if received.len() == payload.len() {
            break;
        }
    }
    assert_eq!(received, payload, "every byte arrives, in order");
}

/// Feeds `flow` channel messages of `size` bytes, numbered from `*next`, while the engine
/// wants them (the driver's rule); returns how many it took.
fn feed_while_wanted(p: &mut Pair, flow: FlowId, size: usize, next: &mut u8, max: usize) -> usize {
    let mut taken = 0;
    while taken < max && p.engine.wants_data(flow) {
        p.engine
            .handle_channel_data(p.now, flow, Bytes::from(vec![*next; size]));
        *next = next.wrapping_add(1);
        taken += 1;
        p.step();
    }
    taken
}

#[test]
fn a_flow_whose_app_stops_reading_stops_taking_channel_data_and_is_never_reset() {
    const MSG: usize = 16 * 1024;
    let mut p = Pair::new(EngineConfig {
        tcp_buffer: 16 * 1024,
        ..EngineConfig::default()
    });
    let h = p.connect(APP_PORT, DST);
    let id = p.open_id();
    p.engine.handle_open_ok(p.now, id);
    p.step();
    // The app does not read: the engine takes what its socket and the app's buffer hold, plus
    // at most PENDING_LOW, then says no.
    let mut next = 0u8;
    let taken = feed_while_wanted(&mut p, id, MSG, &mut next, 1000);
    assert!(taken < 1000, "the engine stops taking data");
    for _ in 0..100 {
        p.advance(Duration::from_millis(500));
    }
    assert!(!p.engine.wants_data(id), "still full while the app sleeps");
    assert!(p.engine.poll_room().is_none());
    assert!(
        !p.take_events()
            .iter()
            .any(|e| matches!(e, Event::Close { .. })),
        "a paused app is never reset"
    );
    // The app reads: the flow has room again, and every byte arrives in order.
    let mut got = p.app_recv_all(h);
    p.step();
    assert_eq!(p.engine.poll_room(), Some(id));
    let more = feed_while_wanted(&mut p, id, MSG, &mut next, 1000);
    assert!(more > 0);
    for _ in 0..200 {
        got.extend(p.app_recv_all(h));
        p.step();
        if got.len() == (taken + more) * MSG {
            break;
        }
    }
    let expected: Vec<u8> = (0..taken + more)
        .flat_map(|i| std::iter::repeat_n(i as u8, MSG))
        .collect();
    assert_eq!(got.len(), expected.len());
    assert!(got == expected, "every byte, in order");
}

#[test]
fn a_stalled_flow_does_not_keep_another_from_taking_data() {
    let mut p = Pair::new(EngineConfig {
        tcp_buffer: 16 * 1024,
        ..EngineConfig::default()
    });
    let _stalled_app = p.connect(APP_PORT, DST);
    let a = p.open_id();
    p.engine.handle_open_ok(p.now, a);
    let reading_app = p.connect(APP_PORT + 1, DST);
    let b = p.open_id();
    p.engine.handle_open_ok(p.now, b);
    p.step();
    let mut next = 0u8;
    feed_while_wanted(&mut p, a, 16 * 1024, &mut next, 1000);
    assert!(!p.engine.wants_data(a));
    // Flow b moves 4 MiB while flow a stays full.
    let mut got = 0;
    for _ in 0..10_000 {
        if got >= 4 << 20 {
            break;
        }
        feed_while_wanted(&mut p, b, 16 * 1024, &mut next, 4);
        got += p.app_recv_all(reading_app).len();
        p.step();
    }
    assert!(got >= 4 << 20, "flow b moved {got} bytes");
    assert!(!p.engine.wants_data(a));
}

#[test]
fn udp_to_a_routed_address_is_answered_with_icmp_and_garbage_is_ignored() {
    let mut p = Pair::new(EngineConfig::default());
    p.engine
        .handle_tun_packet(p.now, udp_v4((APP_V4, 5000), (VPC_V4, 53), b"dns?"));
    p.engine.handle_tun_packet(p.now, vec![0x45, 0x00, 0xff]);
    p.engine.poll(p.now);
    let reply = p.engine.poll_transmit().expect("an ICMP reply");
    assert_eq!(reply[9], 1, "IP protocol ICMP");
    assert_eq!(p.engine.stats().icmp_rejects, 1);
    assert_eq!(p.engine.stats().packets_dropped, 1);
    assert!(p.engine.poll_transmit().is_none());
}

#[test]
fn with_datagrams_on_udp_is_handed_over_and_replies_go_back_as_udp_from_the_destination() {
    let config = EngineConfig {
        mtu: 1500,
        datagrams: true,
        ..EngineConfig::default()
    };
    let mut p = Pair::new(config);
    let (app, outside) = (
        SocketAddr::from((APP_V4, 5000)),
        SocketAddr::from(([192, 0, 2, 53], 53)),
    );
    p.engine.handle_tun_packet(
        p.now,
        udp_v4((APP_V4, 5000), (Ipv4Addr::new(192, 0, 2, 53), 53), b"dns?"),
    );
    p.engine.poll(p.now);
    assert_eq!(
        p.engine.poll_event(),
        Some(Event::Datagram {
            src: app,
            dst: outside,
            payload: Bytes::from_static(b"dns?"),
        })
    );
    assert!(p.engine.poll_transmit().is_none(), "no ICMP");
    assert_eq!(p.engine.stats().datagrams_up, 1);

    // The answer, from the address the app asked.
    p.engine.handle_datagram(p.now, outside, app, b"answer");
    let reply = p.engine.poll_transmit().expect("a UDP packet");
    match packet::classify(&reply) {
        Ingress::Udp {
            src,
            dst,
            start,
            len,
        } => {
            assert_eq!((src, dst), (outside, app));
            assert_eq!(&reply[start..start + len], b"answer");
        }
        other => panic!("expected UDP, got {other:?}"),
    }
    // Too large for the TUN: dropped, counted.
    p.engine.handle_datagram(p.now, outside, app, &[0; 1500]);
    assert!(p.engine.poll_transmit().is_none());
    assert_eq!(
        (
            p.engine.stats().datagrams_down,
            p.engine.stats().datagrams_dropped
        ),
        (1, 1)
    );

    // Not carried (the relay says so): ICMP port unreachable, within the ICMP rate.
    for _ in 0..2 * ICMP_BURST {
        p.engine.handle_port_unreachable(p.now, app, outside);
    }
    let mut icmp = 0;
    while let Some(reply) = p.engine.poll_transmit() {
        assert_eq!(reply[9], 1, "IP protocol ICMP");
        icmp += 1;
    }
    assert_eq!(icmp, ICMP_BURST as usize);
    assert_eq!(
        p.engine.stats().icmp_rejects_suppressed,
        u64::from(ICMP_BURST)
    );
}

#[test]
fn a_ping_is_prohibited_as_always_and_with_datagrams_on_handed_over_and_answered() {
    let (app, dst) = (
        std::net::IpAddr::V4(APP_V4),
        std::net::IpAddr::from([192, 0, 2, 1]),
    );
    let ping = packet::emit_echo((app, dst), true, (0x77, 1), b"abc", 1500).unwrap();
    let mut off = Pair::new(EngineConfig::default());
    off.engine.handle_tun_packet(off.now, ping.clone());
    off.engine.poll(off.now);
    assert!(off.engine.poll_event().is_none());
    let reply = off.engine.poll_transmit().expect("ICMP");
    assert_eq!((reply[9], reply[20], reply[21]), (1, 3, 13), "prohibited");

    let mut on = Pair::new(EngineConfig {
        mtu: 1500,
        datagrams: true,
        ..EngineConfig::default()
    });
    on.engine.handle_tun_packet(on.now, ping.clone());
    on.engine.poll(on.now);
    assert_eq!(
        on.engine.poll_event(),
        Some(Event::Echo {
            src: app,
            dst,
            ident: 0x77,
            seq: 1,
            message: Bytes::copy_from_slice(&ping[20..]),
        })
    );
    assert!(on.engine.poll_transmit().is_none());
    // The host socket's reply (its own identifier) goes back with the app's.
    let host = packet::emit_echo((dst, app), false, (0x4242, 1), b"abc", 1500).unwrap();
    on.engine
        .handle_echo_reply(on.now, (dst, app), 0x77, &host[20..]);
    let reply = on.engine.poll_transmit().expect("an echo reply");
    let expected = packet::emit_echo((dst, app), false, (0x77, 1), b"abc", 1500).unwrap();
    assert_eq!(reply, expected);
    on.engine
        .handle_echo_prohibited(on.now, (app, dst), 0x77, 2);
    assert_eq!(on.engine.poll_transmit().map(|p| p[21]), Some(13));
}

#[test]
fn session_loss_resets_open_and_opening_flows() {
    let mut p = Pair::new(EngineConfig::default());
    let a = p.connect(APP_PORT, DST);
    let id_a = p.open_id();
    p.engine.handle_open_ok(p.now, id_a);
    p.step();
    let b = p.connect(APP_PORT + 1, DST);
    let _ = p.open_id();
    p.engine.reset_all(p.now, CloseReason::SessionLost);
    p.step();
    assert_eq!(p.app(a).state(), tcp::State::Closed);
    assert_eq!(p.app(b).state(), tcp::State::Closed);
    assert_eq!(p.engine.flow_count(), 0);
    let closes = p
        .take_events()
        .into_iter()
        .filter(|e| {
            matches!(
                e,
                Event::Close {
                    reason: CloseReason::SessionLost,
                    ..
                }
            )
        })
        .count();
    assert_eq!(closes, 2);
}

/// The caller of an inbound flow: a VPC address, as the jump host reports it.
const CALLER: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(VPC_V4), 51_000);
const LOCAL_PORT: u16 = 8080;
const INBOUND_TIMEOUT: Duration = Duration::from_secs(10);

impl Pair {
    /// A listening "local app" on `port`.
    fn listen(&mut self, port: u16) -> SocketHandle {
        let mut s = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; 64 * 1024]),
            tcp::SocketBuffer::new(vec![0; 64 * 1024]),
        );
        s.set_ack_delay(None);
        s.listen(port).unwrap();
        self.app_sockets.add(s)
    }

    fn local(&self) -> SocketAddr {
        SocketAddr::new(std::net::IpAddr::V4(APP_V4), LOCAL_PORT)
    }
}

#[test]
fn an_inbound_flow_reaches_the_local_app_from_the_callers_own_address() {
    let mut p = Pair::new(EngineConfig::default());
    let h = p.listen(LOCAL_PORT);
    let local = p.local();
    let id = p
        .engine
        .connect_inbound(p.now, CALLER, local, INBOUND_TIMEOUT)
        .unwrap();
    p.step();
    assert_eq!(p.app(h).state(), tcp::State::Established);
    assert_eq!(
        p.app(h).remote_endpoint().map(|e| e.port),
        Some(CALLER.port())
    );
    assert_eq!(
        p.app(h).remote_endpoint().map(|e| e.addr),
        Some(IpAddress::Ipv4(VPC_V4)),
        "the app sees the caller's address as its peer"
    );
    assert_eq!(p.take_events(), vec![Event::Connected { id }]);

    // Caller -> app, app -> caller, then the caller half-closes and the app still answers.
    p.engine
        .handle_channel_data(p.now, id, Bytes::from_static(b"ping"));
    p.engine.handle_channel_eof(p.now, id);
    p.step();
    assert_eq!(p.app_recv_all(h), b"ping");
    assert!(!p.app(h).may_recv(), "caller EOF maps to FIN");
    p.app(h).send_slice(b"pong").unwrap();
    p.app(h).close();
    p.step();
    let (up, rest) = p.uploaded();
    assert_eq!(up, b"pong");
    assert_eq!(
        rest,
        vec![
            Event::Eof { id },
            Event::Close {
                id,
                key: FlowKey {
                    src: local,
                    dst: CALLER
                },
                reason: CloseReason::Finished
            }
        ],
        "FIN both ways ends the flow"
    );
    assert_eq!(p.engine.stats().inbound_opened, 1);
}

#[test]
fn an_inbound_flow_to_a_closed_local_port_is_refused_at_once() {
    let mut p = Pair::new(EngineConfig::default());
    let local = p.local();
    let id = p
        .engine
        .connect_inbound(p.now, CALLER, local, INBOUND_TIMEOUT)
        .unwrap();
    p.step();
    let events = p.take_events();
    assert_refused_locally(&events, id);
    assert_eq!(p.engine.flow_count(), 0);
    assert_eq!(p.engine.stats().inbound_refused, 1);
}

#[test]
fn an_inbound_flow_the_local_side_never_answers_times_out() {
    let mut p = Pair::new(EngineConfig::default());
    let local = p.local();
    let id = p
        .engine
        .connect_inbound(p.now, CALLER, local, Duration::from_secs(3))
        .unwrap();
    // The "kernel" swallows every SYN.
    for _ in 0..8 {
        p.engine.poll(p.now);
        while p.engine.poll_transmit().is_some() {}
        p.now += Duration::from_secs(1);
    }
    p.engine.poll(p.now);
    let mut events = Vec::new();
    while let Some(e) = p.engine.poll_event() {
        events.push(e);
    }
    assert_refused_locally(&events, id);
}

/// The only event is the inbound flow's end because the local side did not accept it.
fn assert_refused_locally(events: &[Event], id: FlowId) {
    assert!(
        matches!(
            events,
            [Event::Close { id: i, reason: CloseReason::LocalRefused, .. }] if *i == id
        ),
        "{events:?}"
    );
}

#[test]
fn inbound_flows_respect_the_flow_limit_and_mismatched_families() {
    let mut p = Pair::new(EngineConfig {
        max_inbound: 1,
        ..EngineConfig::default()
    });
    let local = p.local();
    p.listen(LOCAL_PORT);
    p.engine
        .connect_inbound(p.now, CALLER, local, INBOUND_TIMEOUT)
        .unwrap();
    let other = SocketAddr::new(CALLER.ip(), CALLER.port() + 1);
    assert_eq!(
        p.engine
            .connect_inbound(p.now, other, local, INBOUND_TIMEOUT),
        Err(InboundError::FlowLimit)
    );
    let mut p = Pair::new(EngineConfig::default());
    let v6: SocketAddr = "[fd00::1]:5000".parse().unwrap();
    assert_eq!(
        p.engine.connect_inbound(p.now, v6, local, INBOUND_TIMEOUT),
        Err(InboundError::Unroutable)
    );
}

/// One request and response, then both sides close: the flow ends `Finished`.
fn short_exchange(p: &mut Pair, port: u16) {
    let h = p.connect(port, DST);
    let id = p.open_id();
    p.engine.handle_open_ok(p.now, id);
    p.step();
    assert_eq!(p.app(h).state(), tcp::State::Established);
    p.app(h).send_slice(b"PING\r\n").unwrap();
    p.step();
    let (up, _) = p.uploaded();
    assert_eq!(up, b"PING\r\n");
    p.engine
        .handle_channel_data(p.now, id, Bytes::from_static(b"+PONG\r\n"));
    p.engine.handle_channel_eof(p.now, id);
    p.step();
    assert_eq!(p.app_recv_all(h), b"+PONG\r\n");
    p.app(h).close();
    p.step();
    p.engine.handle_channel_closed(p.now, id);
    p.advance(Duration::from_millis(10));
    let events = p.take_events();
    assert!(
        events.contains(&Event::Close {
            id,
            key: p.key_of(id),
            reason: CloseReason::Finished
        }),
        "{events:?}"
    );
}

#[test]
fn a_short_flows_socket_serves_the_next_flow_and_a_bulk_flows_socket_is_freed() {
    let mut p = Pair::new(EngineConfig::default());
    short_exchange(&mut p, APP_PORT);
    assert_eq!(
        p.engine.sockets.spares(),
        1,
        "a short flow's socket is kept"
    );
    assert_eq!(p.engine.sockets.reused, 0);

    // The next flow gets that socket, starting clean (a new handshake, its own bytes).
    short_exchange(&mut p, APP_PORT + 1);
    assert_eq!(p.engine.sockets.reused, 1);
    assert_eq!(p.engine.sockets.spares(), 1);

    // A flow that moves more than REUSE_MAX_MOVED touched much of its buffers: freed.
    let h = p.connect(APP_PORT + 2, DST);
    let id = p.open_id();
    p.engine.handle_open_ok(p.now, id);
    p.step();
    assert_eq!(p.engine.sockets.reused, 2);
    let chunk = vec![7u8; 16 * 1024];
    let mut got = 0;
    for _ in 0..(sockets::REUSE_MAX_MOVED as usize / chunk.len() + 2) {
        p.engine
            .handle_channel_data(p.now, id, Bytes::from(chunk.clone()));
        p.step();
        got += p.app_recv_all(h).len();
        p.step();
    }
    assert!(got as u64 > sockets::REUSE_MAX_MOVED, "{got}");
    p.engine.handle_channel_eof(p.now, id);
    p.step();
    p.app(h).close();
    p.step();
    p.engine.handle_channel_closed(p.now, id);
    p.advance(Duration::from_millis(10));
    assert!(p.engine.flow_count() == 0, "{:?}", p.take_events());
    assert_eq!(
        p.engine.sockets.spares(),
        0,
        "a bulk flow's socket is freed"
    );
}

#[test]
fn dropping_the_spares_frees_the_pooled_sockets_and_read_and_packet_buffers() {
    let mut p = Pair::new(EngineConfig::default());
    short_exchange(&mut p, APP_PORT);
    let read = p.engine.rx_buffer();
    p.engine.spare.recycle_rx(read);
    p.engine.recycle(vec![0; 1500]);
    assert_eq!(
        p.engine.spares(),
        3,
        "a socket, a read buffer and a packet buffer"
    );
    p.engine.drop_spares();
    assert_eq!(p.engine.spares(), 0);
    // The next flow is served as before, on a new socket that is kept in turn.
    short_exchange(&mut p, APP_PORT + 1);
    assert_eq!(p.engine.sockets.reused, 0, "a new socket");
    assert_eq!(p.engine.sockets.spares(), 1);
}

#[test]
fn an_inbound_flows_timeout_does_not_follow_its_socket_to_the_next_flow() {
    let mut pool = sockets::SocketPool::new(4096, Some(DEFAULT_ACK_DELAY));
    let mut socket = pool.take();
    socket.set_timeout(Some(Duration::from_secs(3)));
    socket.set_keep_alive(Some(Duration::from_secs(1)));
    pool.give(smoltcp::socket::Socket::Tcp(socket), 0);
    assert_eq!(pool.spares(), 1);
    let socket = pool.take();
    assert_eq!(pool.reused, 1);
    assert_eq!(socket.timeout(), None);
    assert_eq!(socket.keep_alive(), None);
    assert!(!socket.nagle_enabled());
    assert_eq!(socket.ack_delay(), Some(DEFAULT_ACK_DELAY));
    assert_eq!(socket.state(), tcp::State::Closed);
}

#[test]
fn the_syn_ack_carries_timestamps_when_the_app_offers_them() {
    use smoltcp::phy::ChecksumCapabilities;
    use smoltcp::wire::{IpProtocol, Ipv4Packet, TcpPacket, TcpRepr};

    // The SYN-ACK the engine answers with, for an app socket with or without timestamps, when
    // the channel opens 234 ms after the SYN.
    fn syn_ack(app_timestamps: bool) -> TcpRepr<'static> {
        let mut p = Pair::new(EngineConfig::default());
        let mut s = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; 4096]),
            tcp::SocketBuffer::new(vec![0; 4096]),
        );
        if app_timestamps {
            s.set_tsval_generator(Some(|| 1000));
        }
        s.connect(p.app.context(), DST, (IpAddress::Ipv4(APP_V4), APP_PORT))
            .unwrap();
        p.app_sockets.add(s);
        p.step();
        let id = p.open_id();
        p.now += Duration::from_millis(234);
        p.engine.handle_open_ok(p.now, id);
        p.engine.poll(p.now);
        let packet = p.engine.poll_transmit().expect("a SYN-ACK");
        let ip = Ipv4Packet::new_checked(&packet[..]).unwrap();
        assert_eq!(ip.next_header(), IpProtocol::Tcp);
        let tcp = TcpPacket::new_checked(ip.payload()).unwrap();
        let repr = TcpRepr::parse(
            &tcp,
            &ip.src_addr().into(),
            &ip.dst_addr().into(),
            &ChecksumCapabilities::ignored(),
        )
        .unwrap();
        assert_eq!(repr.control, smoltcp::wire::TcpControl::Syn);
        TcpRepr {
            payload: &[],
            sack_ranges: [None; 3],
            ..repr
        }
    }
    let with = syn_ack(true);
    let ts = with.timestamp.expect("timestamps answered");
    assert_eq!(ts.tsecr, 1000, "echoes the app's TSval");
    assert_eq!(
        ts.tsval,
        (T0 + Duration::from_millis(234)).total_millis() as u32,
        "its own TSval is the engine's clock (the `now` it is given), in milliseconds"
    );
    assert!(syn_ack(false).timestamp.is_none(), "none unless offered");
}

/// A run of the pair: flows with timestamps that upload, download, finish, reset and time out,
/// an inbound flow, over a few seconds of virtual time. Returns every packet the engine sent.
fn scripted_run(seed: Seed) -> Vec<Vec<u8>> {
    let mut p = Pair::with_seed(EngineConfig::default(), seed);
    p.log = Some(Vec::new());
    let mut flows = Vec::new();
    for port in APP_PORT..APP_PORT + 4 {
        let mut s = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; 64 * 1024]),
            tcp::SocketBuffer::new(vec![0; 64 * 1024]),
        );
        s.set_ack_delay(None);
        s.set_tsval_generator(Some(|| 77));
        s.connect(p.app.context(), DST, (IpAddress::Ipv4(APP_V4), port))
            .unwrap();
        let h = p.app_sockets.add(s);
        p.step();
        let id = p.open_id();
        p.advance(Duration::from_millis(3));
        p.engine.handle_open_ok(p.now, id);
        p.step();
        flows.push((h, id));
    }
    for (i, &(h, id)) in flows.iter().enumerate() {
        p.app(h).send_slice(&vec![i as u8; 10_000]).unwrap();
        p.engine
            .handle_channel_data(p.now, id, Bytes::from(vec![0xa0 + i as u8; 20_000]));
        p.advance(Duration::from_millis(7));
        let _ = p.uploaded();
        let _ = p.app_recv_all(h);
    }
    // One finishes, one is reset by the app, one by the jump host, one is left to the timers.
    let (h0, id0) = flows[0];
    p.app(h0).close();
    p.engine.handle_channel_eof(p.now, id0);
    p.advance(Duration::from_millis(5));
    p.app(flows[1].0).abort();
    p.engine.handle_channel_closed(p.now, flows[2].1);
    p.advance(Duration::from_millis(5));
    // An inbound flow.
    let local = p.local();
    p.listen(LOCAL_PORT);
    p.engine
        .connect_inbound(p.now, CALLER, local, INBOUND_TIMEOUT)
        .unwrap();
    p.step();
    for _ in 0..5 {
        p.advance(Duration::from_millis(700));
    }
    p.engine.reset_all(p.now, CloseReason::SessionLost);
    p.step();
    p.log.take().unwrap()
}

/// The same seed and the same calls give the same packets, byte for byte (ISNs, timestamps
/// and the order of everything): the engine reads no clock and no randomness of its own, so a
/// test or fuzz failure replays from its seed. Another seed gives other packets.
#[test]
fn a_pair_run_replays_bit_exact() {
    let first = scripted_run(TEST_SEED);
    let again = scripted_run(TEST_SEED);
    assert!(
        first.len() >= 16,
        "a run that did something (4 flows): {}",
        first.len()
    );
    assert_eq!(first.len(), again.len());
    for (i, (a, b)) in first.iter().zip(&again).enumerate() {
        assert_eq!(a, b, "packet {i} differs");
    }
    assert_ne!(scripted_run([1; 32]), first, "the seed reaches the packets");
}

/// Opens a flow from `port` and completes its handshake; returns the app's socket and the id.
fn open_flow(p: &mut Pair, port: u16) -> (SocketHandle, FlowId) {
    let h = p.connect(port, DST);
    let id = p.open_id();
    p.engine.handle_open_ok(p.now, id);
    p.step();
    assert_eq!(p.app(h).state(), tcp::State::Established);
    (h, id)
}

#[test]
fn a_reset_flow_is_closing_until_its_channel_close_is_done_and_counts_against_the_limit() {
    let mut p = Pair::new(EngineConfig {
        max_flows: 1,
        ..EngineConfig::default()
    });
    let (a, id) = open_flow(&mut p, APP_PORT);
    // The app uploads, the SSH side does not take it yet, then the app resets.
    p.app(a).send_slice(&[7; 10_000]).unwrap();
    p.step();
    p.app(a).abort();
    p.step();
    let events = p.take_events();
    assert!(
        events.contains(&Event::Close {
            id,
            key: p.key_of(id),
            reason: CloseReason::AppReset
        }),
        "{events:?}"
    );
    assert!(!CloseReason::AppReset.flushes(), "a reset discards");
    let st = p.engine.stats();
    assert_eq!((st.flows_active, st.flows_closing), (0, 1));

    // Its channel still counts: a new connection is over the limit until the close is done.
    let b = p.connect(APP_PORT + 1, DST);
    assert_eq!(p.app(b).state(), tcp::State::Closed, "over the limit");
    assert!(matches!(
        p.take_events().as_slice(),
        [Event::Refused {
            reason: CloseReason::FlowLimit,
            ..
        }]
    ));
    p.engine.handle_close_done(id);
    assert_eq!(p.engine.stats().flows_closing, 0);
    let c = p.connect(APP_PORT + 2, DST);
    assert_ne!(p.app(c).state(), tcp::State::Closed, "admitted again");
    assert!(matches!(p.take_events().as_slice(), [Event::Open { .. }]));
}

#[test]
fn a_finished_flow_flushes_until_the_linger_deadline_then_is_closed_now() {
    const LINGER: Duration = Duration::from_secs(5);
    let mut p = Pair::new(EngineConfig {
        close_linger: LINGER,
        ..EngineConfig::default()
    });
    let (h, id) = open_flow(&mut p, APP_PORT);
    // FIN both ways, with the app's last bytes still being written to the channel (never
    // acknowledged with handle_sent: a server that stopped reading).
    p.app(h).send_slice(b"last words").unwrap();
    p.app(h).close();
    p.engine.handle_channel_eof(p.now, id);
    p.step();
    p.advance(Duration::from_millis(10));
    let events = p.take_events();
    assert!(
        events.contains(&Event::Close {
            id,
            key: p.key_of(id),
            reason: CloseReason::Finished
        }),
        "{events:?}"
    );
    assert!(CloseReason::Finished.flushes());
    assert_eq!(p.engine.stats().flows_closing, 1);
    for _ in 0..4 {
        p.advance(Duration::from_secs(1));
    }
    assert_eq!(p.take_events(), vec![], "still flushing within the linger");
    p.advance(Duration::from_millis(1500));
    assert_eq!(p.take_events(), vec![Event::CloseNow { id }]);
    assert_eq!(p.engine.stats().close_flushes_cut, 1);
    // The driver closes the channel: nothing is left.
    p.engine.handle_close_done(id);
    assert_eq!(p.engine.stats().flows_closing, 0);
    // A close never reported is forgotten after the grace, so none can leak.
    let (h2, id2) = open_flow(&mut p, APP_PORT + 1);
    p.app(h2).abort();
    p.step();
    assert_eq!(p.engine.stats().flows_closing, 1);
    p.advance(CLOSE_GRACE + Duration::from_secs(1));
    assert_eq!(p.engine.stats().flows_closing, 0, "{id2} forgotten");
}

#[test]
fn icmp_unreachable_replies_are_rate_limited() {
    let mut p = Pair::new(EngineConfig::default());
    let flood = |p: &mut Pair, n: u16| {
        for i in 0..n {
            p.engine
                .handle_tun_packet(p.now, udp_v4((APP_V4, 5000 + i), (VPC_V4, 9999), b"x"));
        }
        p.engine.poll(p.now);
        std::iter::from_fn(|| p.engine.poll_transmit()).count() as u32
    };
    assert_eq!(
        flood(&mut p, 500),
        ICMP_BURST,
        "a burst, not one per packet"
    );
    assert_eq!(
        p.engine.stats().icmp_rejects_suppressed,
        500 - u64::from(ICMP_BURST)
    );
    // The bucket refills at ICMP_RATE a second.
    p.now += Duration::from_millis(20);
    assert_eq!(flood(&mut p, 500), ICMP_RATE / 50);
}

#[test]
fn a_full_memory_budget_shrinks_each_flows_credit_to_the_floor_and_it_still_moves() {
    const MIB: usize = 1 << 20;
    let floor = crate::budget::FLOOR as usize;
    let mut p = Pair::new(EngineConfig {
        memory_budget: Some(MIB as u64),
        max_inflight: MIB / 2,
        ..EngineConfig::default()
    });
    let (h, id) = open_flow(&mut p, APP_PORT);
    // Every byte of the budget is committed to channels' windows.
    p.engine.handle_windows(MIB as u64);
    let payload = vec![5u8; 200_000];
    let mut sent = p.app(h).send_slice(&payload).unwrap();
    p.step();
    let (up, _) = p.uploaded_unacked();
    assert!(!up.is_empty(), "the flow still moves");
    assert!(
        up.len() <= floor + CHUNK,
        "{} bytes in flight at the floor",
        up.len()
    );
    assert!(p.engine.stats().buffered >= up.len() as u64);
    // Download too: what the engine puts in the socket stays near the floor (the app reads
    // nothing).
    for _ in 0..8 {
        p.engine
            .handle_channel_data(p.now, id, Bytes::from(vec![1u8; 32 * 1024]));
        p.step();
    }
    let s = p.engine.stats();
    assert!(
        s.buffered <= (2 * floor + CHUNK + 8 * 32 * 1024) as u64,
        "{} buffered",
        s.buffered
    );
    // The windows are released: the credit grows back, everything goes through.
    p.engine.handle_windows(0);
    p.engine.handle_sent(id, up.len());
    let mut total = up.len();
    for _ in 0..100 {
        if sent < payload.len() {
            sent += p.app(h).send_slice(&payload[sent..]).unwrap();
        }
        p.advance(Duration::from_millis(1));
        let (more, _) = p.uploaded();
        total += more.len();
        if total == payload.len() {
            break;
        }
    }
    assert_eq!(total, payload.len());
}
