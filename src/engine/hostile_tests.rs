//! Packet-vector tests of the engine against hostile or broken peers on the TUN side:
//! unpredictable initial sequence numbers (RFC 6528), blind RST and SYN injection (RFC 5961),
//! SYNs carrying data, handshakes that never complete, and the inbound flow budget. Segments
//! are built with smoltcp's emitters; time is virtual. The sequence-number defences live in
//! our smoltcp patches (`patches/smoltcp`, with their own tests there); these tests check
//! that the engine gets them for every flow.

use std::net::{IpAddr, SocketAddr};

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{
    IpAddress, IpProtocol, Ipv4Packet, TcpControl, TcpPacket, TcpRepr, TcpSeqNumber,
};

use super::packet::tests::{APP_V4, VPC_V4};
use super::*;

const T0: Instant = Instant::from_millis_const(5_000);
const APP_PORT: u16 = 41_000;
const DST_PORT: u16 = 5432;
/// The app's initial sequence number.
const APP_ISN: TcpSeqNumber = TcpSeqNumber(0x1234_5678);
/// Bytes a SYN with data carries (a raw SYN with payload, or TCP Fast Open).
const SYN_DATA: usize = 60_000;

fn app(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(APP_V4), port)
}

/// A segment from the app (`port`) to the destination.
fn from_app(
    port: u16,
    control: TcpControl,
    seq: TcpSeqNumber,
    ack: Option<TcpSeqNumber>,
    payload: &[u8],
) -> Vec<u8> {
    from_app_scaled(port, control, seq, ack, payload, None)
}

/// [`from_app`], a SYN offering window scaling with `window_scale`.
fn from_app_scaled(
    port: u16,
    control: TcpControl,
    seq: TcpSeqNumber,
    ack: Option<TcpSeqNumber>,
    payload: &[u8],
    window_scale: Option<u8>,
) -> Vec<u8> {
    let tcp = TcpRepr {
        src_port: port,
        dst_port: DST_PORT,
        control,
        seq_number: seq,
        ack_number: ack,
        window_len: 64_000,
        window_scale,
        max_seg_size: (control == TcpControl::Syn).then_some(1460),
        sack_permitted: false,
        sack_ranges: [None, None, None],
        timestamp: None,
        payload,
    };
    packet::emit_tcp(IpAddr::V4(APP_V4), IpAddr::V4(VPC_V4), &tcp).expect("v4")
}

/// A segment the engine sent to the app, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    control: TcpControl,
    seq: TcpSeqNumber,
    ack: Option<TcpSeqNumber>,
    len: usize,
}

fn parse(p: &[u8]) -> Seen {
    parse_with_window(p).0
}

/// [`parse`], and the segment's window field (as sent: scaled down).
fn parse_with_window(p: &[u8]) -> (Seen, u16) {
    let ip = Ipv4Packet::new_checked(p).expect("IPv4");
    assert_eq!(ip.next_header(), IpProtocol::Tcp);
    let tcp = TcpPacket::new_checked(ip.payload()).expect("TCP");
    let repr = TcpRepr::parse(
        &tcp,
        &IpAddress::Ipv4(ip.src_addr()),
        &IpAddress::Ipv4(ip.dst_addr()),
        &ChecksumCapabilities::default(),
    )
    .expect("a valid segment");
    let seen = Seen {
        control: repr.control,
        seq: repr.seq_number,
        ack: repr.ack_number,
        len: repr.payload.len(),
    };
    (seen, repr.window_len)
}

/// The engine alone; the test plays both the app's kernel and the SSH side.
struct Rig {
    now: Instant,
    engine: Engine,
}

impl Rig {
    fn new(config: EngineConfig) -> Rig {
        Rig::with_seed(config, TEST_SEED)
    }

    fn with_seed(config: EngineConfig, seed: Seed) -> Rig {
        Rig {
            now: T0,
            engine: Engine::new(config, T0, seed),
        }
    }

    fn send(&mut self, p: Vec<u8>) {
        self.engine.handle_tun_packet(self.now, p);
        self.engine.poll(self.now);
    }

    fn sent(&mut self) -> Vec<Seen> {
        std::iter::from_fn(|| self.engine.poll_transmit())
            .map(|p| parse(&p))
            .collect()
    }

    /// What the engine sent, with each segment's window field.
    fn sent_with_windows(&mut self) -> Vec<(Seen, u16)> {
        std::iter::from_fn(|| self.engine.poll_transmit())
            .map(|p| parse_with_window(&p))
            .collect()
    }

    fn events(&mut self) -> Vec<Event> {
        std::iter::from_fn(|| self.engine.poll_event()).collect()
    }

    /// SYN from `port`, channel opened: returns the flow and the SYN-ACK.
    fn accept(&mut self, port: u16) -> (FlowId, Seen) {
        self.send(from_app(port, TcpControl::Syn, APP_ISN, None, &[]));
        let id = match self.events().as_slice() {
            [Event::Open { id, .. }] => *id,
            other => panic!("expected one Open, got {other:?}"),
        };
        self.engine.handle_open_ok(self.now, id);
        self.engine.poll(self.now);
        let sent = self.sent();
        assert_eq!(sent.len(), 1, "{sent:?}");
        assert_eq!(sent[0].control, TcpControl::Syn);
        assert_eq!(sent[0].ack, Some(APP_ISN + 1));
        (id, sent[0].clone())
    }

    /// An established flow from `port`: returns it and the engine's next sequence number.
    fn establish(&mut self, port: u16) -> (FlowId, TcpSeqNumber) {
        let (id, syn_ack) = self.accept(port);
        let ours = syn_ack.seq + 1;
        self.send(from_app(
            port,
            TcpControl::None,
            APP_ISN + 1,
            Some(ours),
            &[],
        ));
        assert_eq!(self.sent(), vec![], "nothing answers a pure ACK");
        (id, ours)
    }

    fn advance(&mut self, by: Duration) {
        self.now += by;
        self.engine.poll(self.now);
    }
}

#[test]
fn initial_sequence_numbers_differ_between_flows_and_between_engines() {
    let mut a = Rig::new(EngineConfig::default());
    let mut b = Rig::with_seed(EngineConfig::default(), [0x5e; 32]);
    let mut isns = Vec::new();
    // Flows 1 and 1 + SHARDS share a shard: its interface must not repeat either.
    for port in 0..(SHARDS as u16 + 1) {
        isns.push(a.accept(APP_PORT + port).1.seq);
    }
    // The same connection in an engine of another seed (another secret), at the same time.
    isns.push(b.accept(APP_PORT).1.seq);
    let mut unique = isns.clone();
    unique.sort_by_key(|s| s.0);
    unique.dedup();
    assert_eq!(unique.len(), isns.len(), "repeated ISN in {isns:?}");
    // Nor are they a sequence: far apart, not a few counts from each other.
    let spread = |x: TcpSeqNumber, y: TcpSeqNumber| x.0.wrapping_sub(y.0).unsigned_abs() > 1 << 20;
    assert!(isns.windows(2).all(|w| spread(w[0], w[1])), "{isns:?}");
}

/// The same 4-tuple again (an app reusing its port): RFC 6528's clock moves its ISN forward
/// with time, 250 a millisecond, so segments of the old connection are not taken for the new
/// one's; and nothing here rebuilds an interface.
#[test]
fn a_reused_four_tuple_gets_a_later_initial_sequence_number() {
    let mut r = Rig::new(EngineConfig::default());
    let (id, first) = r.accept(APP_PORT);
    r.engine.abort(r.now, id, CloseReason::Shutdown);
    r.engine.poll(r.now);
    let _ = (r.sent(), r.events());
    r.now += Duration::from_millis(40);
    let (_, second) = r.accept(APP_PORT);
    assert_eq!(second.seq - first.seq, 40 * 250);
}

#[test]
fn an_in_window_rst_gets_a_challenge_ack_and_only_the_exact_one_resets() {
    // Each data segment's ACK is read as it is sent.
    let mut r = Rig::new(EngineConfig {
        ack_delay: None,
        ..EngineConfig::default()
    });
    let (id, ours) = r.establish(APP_PORT);
    let rcv_nxt = APP_ISN + 1;

    // A blind attacker's RST somewhere in the window: the flow survives, the app is asked.
    r.send(from_app(
        APP_PORT,
        TcpControl::Rst,
        rcv_nxt + 1000,
        None,
        &[],
    ));
    assert_eq!(r.events(), vec![], "the flow is not reset");
    let challenge = r.sent();
    assert_eq!(
        challenge,
        vec![Seen {
            control: TcpControl::None,
            seq: ours,
            ack: Some(rcv_nxt),
            len: 0
        }],
        "a challenge ACK with the exact next sequence numbers"
    );
    // A storm of them: at most one challenge ACK per interval.
    for k in 2..50 {
        r.send(from_app(
            APP_PORT,
            TcpControl::Rst,
            rcv_nxt + k * 997,
            None,
            &[],
        ));
    }
    assert_eq!(r.sent(), vec![], "challenge ACKs are rate limited");
    // The last of the storm is answered once the interval is over, so an app whose real RST
    // came during a storm still gets its challenge.
    assert_eq!(
        r.engine.poll_timeout(r.now),
        Some(T0 + Duration::from_secs(1)),
        "the engine asks to be polled when the challenge is due"
    );
    r.advance(Duration::from_secs(1));
    assert_eq!(r.sent(), challenge, "the held-back challenge goes out");
    r.advance(Duration::from_secs(2));
    assert_eq!(r.sent(), vec![], "and only one");
    // Far out of the window: a blind guess, dropped silently (RFC 5961), never taken.
    r.send(from_app(
        APP_PORT,
        TcpControl::Rst,
        rcv_nxt + (1 << 30),
        None,
        &[],
    ));
    r.send(from_app(APP_PORT, TcpControl::Rst, APP_ISN, None, &[]));
    assert_eq!(r.sent(), vec![]);
    assert_eq!(r.engine.flow_count(), 1);

    // Data still flows after the storm.
    r.send(from_app(
        APP_PORT,
        TcpControl::Psh,
        rcv_nxt,
        Some(ours),
        b"ping",
    ));
    assert!(r.events().contains(&Event::Data {
        id,
        data: bytes::Bytes::from_static(b"ping")
    }));
    let rcv_nxt = rcv_nxt + 4;
    assert_eq!(r.sent()[0].ack, Some(rcv_nxt));

    // The real peer answers a challenge ACK with an RST at exactly RCV.NXT: taken.
    r.send(from_app(APP_PORT, TcpControl::Rst, rcv_nxt, None, &[]));
    assert!(
        r.events().iter().any(|e| matches!(
            e,
            Event::Close { id: i, reason: CloseReason::AppReset, .. } if *i == id
        )),
        "the exact RST resets the flow"
    );
    assert_eq!(r.engine.flow_count(), 0);
}

/// Socket buffers in [`an_app_reset_past_a_window_shrunk_by_rounding_still_ends_its_flow`]: 128
/// KiB, so the engine's window is scaled by 2^2 (its field counts units of 4 bytes).
const SCALED_BUFFER: usize = 128 * 1024;

/// An app whose upload filled the engine's window resets at its own next sequence number
/// (Linux does so when it is past the window by less than a window unit). The engine's window
/// is scaled and rounded down, so its right edge moves left by up to 3 bytes as data arrives:
/// the app, which sent up to an earlier edge, resets past the current one. The flow must still
/// end: the RST gets a challenge ACK (smoltcp patch 0003), which the app's kernel (its socket
/// gone) answers with the exact RST. Without that patch such an RST is dropped silently and
/// the flow, with its channel, stays for good.
#[test]
fn an_app_reset_past_a_window_shrunk_by_rounding_still_ends_its_flow() {
    let mut r = Rig::new(EngineConfig {
        tcp_buffer: SCALED_BUFFER,
        max_inflight: 1024,
        // Each segment's ACK (and the window it tells) is read as it is sent.
        ack_delay: None,
        ..EngineConfig::default()
    });
    // The handshake, offering window scaling.
    r.send(from_app_scaled(
        APP_PORT,
        TcpControl::Syn,
        APP_ISN,
        None,
        &[],
        Some(7),
    ));
    let id = match r.events().as_slice() {
        [Event::Open { id, .. }] => *id,
        other => panic!("{other:?}"),
    };
    r.engine.handle_open_ok(r.now, id);
    r.engine.poll(r.now);
    let ours = r.sent()[0].seq + 1;
    let mut next = APP_ISN + 1;
    r.send(from_app(APP_PORT, TcpControl::None, next, Some(ours), &[]));
    // The edge the app is told by the latest ACK: ACK + window << 2.
    let latest_edge = |r: &mut Rig| {
        let (s, window) = r.sent_with_windows().pop().expect("an ACK");
        s.ack.expect("an ACK") + (usize::from(window) << 2)
    };
    // The SSH side takes 1 KiB and no more; then the app sends 1 byte at a time until the
    // edge it is told moves left.
    r.send(from_app(
        APP_PORT,
        TcpControl::Psh,
        next,
        Some(ours),
        &[1; 2000],
    ));
    next += 2000;
    let mut highest = latest_edge(&mut r);
    let shrunk = loop {
        r.send(from_app(APP_PORT, TcpControl::Psh, next, Some(ours), &[2]));
        next += 1;
        let latest = latest_edge(&mut r);
        if latest < highest {
            break latest;
        }
        highest = latest;
    };
    // The app had been told `highest`: it fills the window up to there (the engine takes
    // only what fits below the new edge), then resets at its own next sequence number.
    while next < highest {
        let chunk = vec![3; (highest - next).min(60_000)];
        r.send(from_app(
            APP_PORT,
            TcpControl::Psh,
            next,
            Some(ours),
            &chunk,
        ));
        next += chunk.len();
    }
    let acked = r.sent().last().and_then(|s| s.ack).expect("ACKs");
    assert_eq!(
        acked, shrunk,
        "the engine took what fits below its new edge"
    );
    assert!(next > acked, "the app is past the engine's window");
    r.send(from_app(APP_PORT, TcpControl::Rst, next, None, &[]));
    let challenge = r.sent();
    assert_eq!(challenge.len(), 1, "a challenge ACK: {challenge:?}");
    assert_eq!(challenge[0].ack, Some(acked));
    assert_eq!(r.engine.flow_count(), 1, "not taken");
    // The app's kernel has no socket for it: it answers with an RST at the ACK number.
    r.send(from_app(APP_PORT, TcpControl::Rst, acked, None, &[]));
    assert!(r.events().iter().any(|e| matches!(
        e,
        Event::Close { id: i, reason: CloseReason::AppReset, .. } if *i == id
    )));
    assert_eq!(r.engine.flow_count(), 0);
}

#[test]
fn a_syn_on_an_established_flow_gets_a_challenge_ack() {
    let mut r = Rig::new(EngineConfig::default());
    let (_, ours) = r.establish(APP_PORT);
    let other_isn = TcpSeqNumber(0x0bad_cafe);
    r.send(from_app(APP_PORT, TcpControl::Syn, other_isn, None, &[]));
    assert_eq!(r.events(), vec![], "no second Open, no reset");
    assert_eq!(
        r.sent(),
        vec![Seen {
            control: TcpControl::None,
            seq: ours,
            ack: Some(APP_ISN + 1),
            len: 0
        }]
    );
    assert_eq!(r.engine.flow_count(), 1);
}

#[test]
fn a_blind_rst_cannot_end_a_flow_whose_channel_is_opening() {
    let mut r = Rig::new(EngineConfig::default());
    r.send(from_app(APP_PORT, TcpControl::Syn, APP_ISN, None, &[]));
    let _ = r.events();
    r.send(from_app(APP_PORT, TcpControl::Rst, APP_ISN + 77, None, &[]));
    assert_eq!(r.events(), vec![]);
    assert_eq!(r.engine.flow_count(), 1);
    r.send(from_app(APP_PORT, TcpControl::Rst, APP_ISN + 1, None, &[]));
    assert!(matches!(
        r.events().as_slice(),
        [Event::Close {
            reason: CloseReason::AppReset,
            ..
        }]
    ));
}

#[test]
fn a_syn_with_data_is_held_without_its_payload() {
    let mut r = Rig::new(EngineConfig::default());
    let data = vec![0x5a; SYN_DATA];
    let syn = from_app(APP_PORT, TcpControl::Syn, APP_ISN, None, &data);
    let header = syn.len() - SYN_DATA;
    r.send(syn.clone());
    let id = match r.events().as_slice() {
        [Event::Open { id, .. }] => *id,
        other => panic!("{other:?}"),
    };
    let held = |r: &Rig| match &r.engine.flows.get(id).expect("flow").phase {
        Phase::Opening { syn, .. } => (syn.len(), syn.capacity()),
        _ => panic!("not opening any more"),
    };
    assert_eq!(held(&r), (header, header), "only the header is held");
    // A retransmission likewise.
    r.send(syn);
    assert_eq!(held(&r), (header, header));
    // The SYN-ACK acknowledges the SYN only: the app sends its data again.
    r.engine.handle_open_ok(r.now, id);
    r.engine.poll(r.now);
    let syn_ack = r.sent();
    assert_eq!(syn_ack.len(), 1);
    assert_eq!(syn_ack[0].ack, Some(APP_ISN + 1));
    let ours = syn_ack[0].seq + 1;
    r.send(from_app(
        APP_PORT,
        TcpControl::Psh,
        APP_ISN + 1,
        Some(ours),
        &data[..1000],
    ));
    let up: usize = r
        .events()
        .iter()
        .map(|e| match e {
            Event::Data { data, .. } => data.len(),
            _ => 0,
        })
        .sum();
    assert_eq!(up, 1000, "the retransmitted data is relayed once");
}

#[test]
fn a_handshake_the_app_never_completes_times_out_and_closes_the_channel() {
    let mut r = Rig::new(EngineConfig::default());
    let (id, _) = r.accept(APP_PORT);
    // The app (a spoofed source, or a firewall eating SYN-ACKs) never answers.
    let step = Duration::from_millis(500);
    let mut waited = Duration::ZERO;
    while waited + step < SYN_RECEIVED_TIMEOUT {
        r.advance(step);
        waited += step;
        let _ = r.sent(); // SYN-ACK retransmissions
        assert_eq!(r.events(), vec![], "still waiting at {waited}");
    }
    r.advance(SWEEP_INTERVAL + step);
    let _ = r.sent();
    assert!(
        matches!(
            r.events().as_slice(),
            [Event::Close { id: i, reason: CloseReason::TimedOut, .. }] if *i == id
        ),
        "the flow ends and its channel is closed"
    );
    assert_eq!(r.engine.flow_count(), 0);
    assert_eq!(r.engine.stats().syn_received_timeouts, 1);
    // A completed handshake never times out.
    let (id, _) = r.establish(APP_PORT + 1);
    r.advance(SYN_RECEIVED_TIMEOUT * 2);
    let _ = r.sent();
    assert_eq!(r.events(), vec![]);
    assert!(r.engine.flow_key(id).is_some());
}

#[test]
fn inbound_callers_have_a_budget_of_their_own() {
    let mut r = Rig::new(EngineConfig {
        max_flows: 1,
        max_inbound: 2,
        ..EngineConfig::default()
    });
    let local = app(8080);
    let caller = |port| SocketAddr::new(IpAddr::V4(VPC_V4), port);
    let timeout = Duration::from_secs(10);
    // Callers fill their own budget...
    for port in [50_000, 50_001] {
        r.engine
            .connect_inbound(r.now, caller(port), local, timeout)
            .expect("within the inbound budget");
    }
    assert_eq!(
        r.engine
            .connect_inbound(r.now, caller(50_002), local, timeout),
        Err(InboundError::FlowLimit)
    );
    let _ = r.sent();
    // ...and the laptop's own connection still gets its slot.
    r.send(from_app(APP_PORT, TcpControl::Syn, APP_ISN, None, &[]));
    assert!(matches!(r.events().as_slice(), [Event::Open { .. }]));
    // Past its own budget, an outbound SYN is reset.
    r.send(from_app(APP_PORT + 1, TcpControl::Syn, APP_ISN, None, &[]));
    assert!(matches!(
        r.events().as_slice(),
        [Event::Refused {
            reason: CloseReason::FlowLimit,
            ..
        }]
    ));
    let reset = r.sent();
    assert!(
        matches!(reset.as_slice(), [s] if s.control == TcpControl::Rst),
        "{reset:?}"
    );
}

/// A request's ACK rides on its answer when the answer comes within the delay; otherwise a
/// bare ACK goes when the delay is up (not at once); and every second full-sized segment of
/// an upload is ACKed at once.
#[test]
fn an_apps_request_is_acked_by_its_answer_or_after_the_delay_and_bulk_at_once() {
    let mut r = Rig::new(EngineConfig::default());
    let delay = EngineConfig::default()
        .ack_delay
        .expect("delayed ACKs by default");
    let (id, ours) = r.establish(APP_PORT);
    let mut rcv_nxt = APP_ISN + 1;

    // A request, answered 1 ms later: one segment back, the answer carrying the ACK.
    r.send(from_app(
        APP_PORT,
        TcpControl::Psh,
        rcv_nxt,
        Some(ours),
        b"ping",
    ));
    assert_eq!(r.sent(), vec![], "no bare ACK at once");
    rcv_nxt += 4;
    r.advance(Duration::from_millis(1));
    r.engine
        .handle_channel_data(r.now, id, bytes::Bytes::from_static(b"pong"));
    r.engine.poll(r.now);
    let sent = r.sent();
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(
        (sent[0].ack, sent[0].len),
        (Some(rcv_nxt), 4),
        "ACK on the answer"
    );
    let ours = ours + 4;

    // A request with no answer yet: its bare ACK when the delay is up.
    r.send(from_app(
        APP_PORT,
        TcpControl::Psh,
        rcv_nxt,
        Some(ours),
        b"slow",
    ));
    rcv_nxt += 4;
    r.advance(delay - Duration::from_millis(1));
    assert_eq!(r.sent(), vec![], "still waiting for an answer");
    r.advance(Duration::from_millis(1));
    assert_eq!(
        r.sent(),
        vec![Seen {
            control: TcpControl::None,
            seq: ours,
            ack: Some(rcv_nxt),
            len: 0
        }]
    );

    // An upload: the second full-sized segment is ACKed at once.
    let mss = vec![0x5a; 1460];
    r.send(from_app(
        APP_PORT,
        TcpControl::None,
        rcv_nxt,
        Some(ours),
        &mss,
    ));
    assert_eq!(r.sent(), vec![], "one segment waits");
    r.send(from_app(
        APP_PORT,
        TcpControl::None,
        rcv_nxt + 1460,
        Some(ours),
        &mss,
    ));
    let sent = r.sent();
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(
        sent[0].ack,
        Some(rcv_nxt + 2920),
        "two segments: ACKed at once"
    );
}
