//! The driver between an in-memory TUN (an app-side smoltcp interface) and a pool connected
//! to the in-process jump host: an app's TCP connection to a VPC address becomes a
//! `direct-tcpip` channel and back, byte-exact; FIN and EOF, resets and refusals map as
//! the README says; a cloud caller reaches a local app from its own address.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use smoltcp::socket::tcp::State;
use tokio::sync::watch;

use mse_vpn::dns::{DnsCounters, Responder, ResponderConfig, Split, Tunnel};
use mse_vpn::driver::{Driver, DriverConfig};
use mse_vpn::engine::packet::{Ingress, classify, emit_udp};
use mse_vpn::engine::{EngineConfig, EngineStats, TunFormat};
use mse_vpn::pool::Pool;
use mse_vpn::relay::direct::{DNS_V4, HOST_LOOPBACK_V4};
use mse_vpn::relay::{DirectConfig, DnsRedirect};
use mse_vpn::reverse::{ForwardSpec, ForwardState, Forwards};

use crate::app::{
    self, APP_V4, App, Queues, VPC_V4, closed_port, count_server, echo_server, pattern,
    source_server, udp_echo_server, watch_server,
};
use crate::jump::Jump;
use crate::{LIMIT, start_pool};

/// How long an app's SYN is held for its channel: long, so a reset well before it is a
/// refusal, not a timeout.
const OPEN_TIMEOUT: Duration = Duration::from_secs(30);

/// A driver running between `app` and a pool on a fresh jump host.
struct Rig {
    jump: Jump,
    pool: Arc<Pool>,
    app: App,
    /// The driver's packet side, for fault injection (the errno tests, on Unix).
    #[cfg_attr(not(unix), allow(dead_code))]
    queues: Arc<Queues>,
    forwards: Arc<Forwards>,
    stats: watch::Receiver<EngineStats>,
    stop: watch::Sender<bool>,
    driver: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Rig {
    async fn start() -> Rig {
        Rig::with_open_timeout(OPEN_TIMEOUT).await
    }

    /// A rig whose apps wait `open_timeout` for their channel.
    async fn with_open_timeout(open_timeout: Duration) -> Rig {
        Rig::build(open_timeout, None, None).await
    }

    /// A rig whose driver gives memory back with `release` (not `malloc_trim`).
    async fn with_release(release: fn() -> bool) -> Rig {
        Rig::build(OPEN_TIMEOUT, Some(release), None).await
    }

    /// A rig with the direct path on (`mse-vpn run`): only 10.0.0.0/16 goes through SSH;
    /// the host's loopback is at [`HOST_LOOPBACK_V4`].
    async fn direct() -> Rig {
        Rig::direct_with_dns(None).await
    }

    /// [`Rig::direct`], DNS to `dns.at` going to `dns.to`.
    async fn direct_with_dns(dns: Option<DnsRedirect>) -> Rig {
        let direct = DirectConfig {
            host_loopback: vec![HOST_LOOPBACK_V4.into()],
            dns,
            ..DirectConfig::new(vec!["10.0.0.0/16".parse().unwrap()])
        };
        Rig::build(OPEN_TIMEOUT, None, Some(direct)).await
    }

    async fn build(
        open_timeout: Duration,
        release: Option<fn() -> bool>,
        direct: Option<DirectConfig>,
    ) -> Rig {
        let jump = Jump::start().await;
        let (pool, stop) = start_pool(&jump, 1).await;
        let (app, queues) = App::new();
        let config = DriverConfig {
            engine: EngineConfig {
                mtu: app::MTU,
                tcp_buffer: 256 * 1024,
                open_timeout: open_timeout.into(),
                tun: TunFormat {
                    header: 0,
                    checksum_offload: false,
                },
                ..EngineConfig::default()
            },
            open_timeout: Duration::from_secs(5),
            max_opening: 64,
            local_v4: APP_V4,
            local_v6: None,
            budget: None,
            direct,
        };
        let forwards = Forwards::new();
        tokio::spawn(Arc::clone(&forwards).keep(pool.clone(), stop.subscribe()));
        let mut driver = Driver::new(config, queues.clone(), pool.clone())
            .with_inbound(pool.inbound_calls().expect("calls"), forwards.clone());
        if let Some(release) = release {
            driver = driver.with_memory_release(release);
        }
        let stats = driver.stats();
        let driver = tokio::spawn(driver.run(stop.subscribe()));
        Rig {
            jump,
            pool,
            app,
            queues,
            forwards,
            stats,
            stop,
            driver,
        }
    }

    /// Stops the driver; it must end cleanly.
    async fn stop(self) {
        let _ = self.stop.send(true);
        let ended = tokio::time::timeout(LIMIT, self.driver).await;
        ended
            .expect("the driver stops")
            .expect("no panic")
            .expect("no TUN error");
    }

    fn vpc(port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(VPC_V4), port)
    }

    /// Pumps the app until no flow is live in the engine.
    async fn until_no_flows(&mut self) -> bool {
        let stats = self.stats.clone();
        self.app
            .until(LIMIT, |_| stats.borrow().flows_active == 0)
            .await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_apps_connection_to_a_vpc_address_echoes_byte_exact_and_closes_cleanly() {
    let mut rig = Rig::start().await;
    let echo = echo_server().await;
    let h = rig.app.connect(Rig::vpc(echo.port()));
    let data = pattern(500_000);
    let got = rig.app.exchange(h, &data, data.len(), LIMIT).await;
    assert_eq!(got.len(), data.len());
    assert!(got == data, "the bytes come back as sent");
    assert_eq!(
        rig.jump.opens(),
        [(VPC_V4.to_string(), echo.port())],
        "one channel, to the address the app dialled"
    );

    // The app closes: its FIN is the channel's EOF, the echo server closes, its EOF is the
    // app's FIN; then the flow is gone from the engine.
    rig.app.tcp(h).close();
    let mut rest = Vec::new();
    assert!(rig.app.read_to_fin(h, &mut rest, LIMIT).await, "FIN back");
    assert!(rest.is_empty());
    assert!(rig.until_no_flows().await, "the flow is reaped");
    let stats = *rig.stats.borrow();
    assert_eq!((stats.bytes_up, stats.bytes_down), (500_000, 500_000));
    assert_eq!(stats.flows_opened, 1);
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_apps_fin_arrives_as_eof_and_the_reply_still_flows_back() {
    let mut rig = Rig::start().await;
    let server = count_server().await;
    let h = rig.app.connect(Rig::vpc(server.port()));
    let data = pattern(70_000);
    // The app writes everything, then shuts its write side (FIN after the data).
    let mut queued = 0;
    let written = rig
        .app
        .until(LIMIT, |app| {
            let s = app.tcp(h);
            if s.can_send() && queued < data.len() {
                queued += s.send_slice(&data[queued..]).expect("send");
            }
            queued == data.len()
        })
        .await;
    assert!(written);
    rig.app.tcp(h).close();
    let mut reply = Vec::new();
    assert!(
        rig.app.read_to_fin(h, &mut reply, LIMIT).await,
        "the server's FIN"
    );
    assert_eq!(String::from_utf8_lossy(&reply), "got 70000 bytes");
    assert!(rig.until_no_flows().await);
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_apps_reset_closes_its_channel_and_the_server_connection_ends() {
    let mut rig = Rig::start().await;
    let (server, mut ends) = watch_server().await;
    let h = rig.app.connect(Rig::vpc(server.port()));
    let data = pattern(30_000);
    let mut sent = 0;
    let written = rig
        .app
        .until(LIMIT, |app| {
            let s = app.tcp(h);
            if s.can_send() && sent < data.len() {
                sent += s.send_slice(&data[sent..]).expect("send");
            }
            sent == data.len() && s.send_queue() == 0
        })
        .await;
    assert!(written, "the data is out and acknowledged");
    // The app resets its connection: the flow ends, its channel is closed, and the jump
    // host's connection to the server goes with it.
    rig.app.tcp(h).abort();
    assert!(rig.until_no_flows().await, "the flow is reaped");
    let end = tokio::select! {
        end = ends.recv() => end.expect("the server saw its connection end"),
        _ = rig.app.until(LIMIT, |_| false) => panic!("the server's connection stayed"),
    };
    assert_eq!(
        end.expect("closed, not failed"),
        data.len(),
        "every byte arrived first"
    );
    assert_eq!(rig.pool.connected(), 1, "a reset flow leaves the link up");
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_destination_resets_the_app_at_once() {
    let mut rig = Rig::start().await;
    let h = rig.app.connect(Rig::vpc(closed_port()));
    let started = tokio::time::Instant::now();
    let mut established = false;
    let closed = rig
        .app
        .until(LIMIT, |app| {
            let s = app.tcp(h);
            established |= s.state() == State::Established;
            s.state() == State::Closed
        })
        .await;
    assert!(closed, "the app's connect ends");
    assert!(
        !established,
        "the SYN is held until the channel opens: never a SYN-ACK"
    );
    assert!(
        started.elapsed() < OPEN_TIMEOUT / 10,
        "a reset on the refusal, not the open timeout ({:?})",
        started.elapsed()
    );
    assert!(rig.until_no_flows().await);
    assert_eq!(rig.stats.borrow().flows_refused, 1);
    assert_eq!(rig.pool.connected(), 1, "a refusal keeps the link");
    rig.stop().await;
}

/// On a virtual clock (`start_paused`: time jumps ahead whenever every task waits, and the
/// loopback sockets' readiness is seen before it does): the open timeout's 10 s pass in
/// no time, and the reset comes exactly when the engine's once-a-second check finds the
/// held SYN expired.
#[tokio::test(start_paused = true)]
async fn a_destination_that_never_answers_is_reset_at_the_open_timeout() {
    const OPEN: Duration = Duration::from_secs(10);
    let mut rig = Rig::with_open_timeout(OPEN).await;
    let silent = closed_port();
    rig.jump.silence(silent);
    let h = rig.app.connect(Rig::vpc(silent));
    let started = tokio::time::Instant::now();
    let mut established = false;
    let closed = rig
        .app
        .until(OPEN * 2, |app| {
            let s = app.tcp(h);
            established |= s.state() == State::Established;
            s.state() == State::Closed
        })
        .await;
    let took = started.elapsed();
    assert!(closed, "the app's connect ends");
    assert!(!established, "never a SYN-ACK for an unanswered open");
    assert!(
        took >= OPEN && took <= OPEN + Duration::from_millis(1_100),
        "reset at the open timeout (checked once a second), took {took:?}"
    );
    assert_eq!(rig.jump.opens(), [(VPC_V4.to_string(), silent)]);
    assert_eq!(rig.stats.borrow().flows_refused, 1);
    assert!(rig.until_no_flows().await);
    assert_eq!(
        rig.pool.connected(),
        1,
        "the link outlives the unanswered open"
    );
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_that_stops_reading_pauses_only_its_own_flow_and_then_gets_every_byte() {
    const BULK: usize = 8 * 1024 * 1024;
    let mut rig = Rig::start().await;
    let source = source_server(BULK).await;
    let echo = echo_server().await;
    let paused = rig.app.connect(Rig::vpc(source.port()));
    // The app never reads `paused`: its receive buffer fills (256 KiB), then the engine's
    // socket (256 KiB), then the driver stops reading the channel.
    let stats = rig.stats.clone();
    let filled = rig
        .app
        .until(LIMIT, |_| stats.borrow().bytes_down >= 256 * 1024)
        .await;
    assert!(filled, "the download started and filled the app's buffer");
    // Until the engine holds a socketful for it and the driver stopped reading its channel
    // (at PENDING_LOW): from then on nothing more is taken in.
    let full = rig
        .app
        .until(LIMIT, |_| {
            stats.borrow().buffered >= (256 * 1024 + mse_vpn::engine::PENDING_LOW) as u64
        })
        .await;
    assert!(full, "the engine's socket for the paused flow filled");
    let held = stats.borrow().bytes_down;
    assert!(
        held < 1024 * 1024,
        "a paused flow costs its buffers, not the whole download: {held} bytes taken in"
    );
    // Another flow on the same SSH connection is not held up.
    let other = rig.app.connect(Rig::vpc(echo.port()));
    let data = pattern(200_000);
    assert_eq!(
        rig.app.exchange(other, &data, data.len(), LIMIT).await,
        data
    );
    let s = *stats.borrow();
    assert!(
        (s.bytes_down - data.len() as u64) < 1024 * 1024 && s.buffered < 512 * 1024,
        "the paused flow took more in meanwhile: {} bytes down, {} held",
        s.bytes_down - data.len() as u64,
        s.buffered
    );
    // The app reads again: every byte, in order.
    let mut got = Vec::new();
    assert!(
        rig.app.read_to_fin(paused, &mut got, LIMIT).await,
        "the FIN at the end"
    );
    assert_eq!(got.len(), BULK);
    assert!(got == pattern(BULK), "byte-exact after the pause");
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_link_resets_its_flows_and_the_next_connection_goes_through_the_new_one() {
    let mut rig = Rig::start().await;
    let echo = echo_server().await;
    let h = rig.app.connect(Rig::vpc(echo.port()));
    let data = pattern(20_000);
    assert_eq!(rig.app.exchange(h, &data, data.len(), LIMIT).await, data);

    rig.jump.drop_connections();
    let reset = rig
        .app
        .until(LIMIT, |app| app.tcp(h).state() == State::Closed)
        .await;
    assert!(reset, "the app's connection is reset when its link goes");
    assert!(rig.until_no_flows().await);

    // The pool reconnects by itself; a new connection is carried on the new link.
    let pool = rig.pool.clone();
    assert!(rig.app.until(LIMIT, |_| pool.connected() == 1).await);
    let h2 = rig.app.connect(Rig::vpc(echo.port()));
    assert_eq!(rig.app.exchange(h2, &data, data.len(), LIMIT).await, data);
    assert_eq!(rig.jump.accepted(), 2);
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cloud_caller_reaches_the_local_app_from_its_own_address() {
    const LOCAL_PORT: u16 = 8080;
    const CALLER: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 7, 9)), 40_022);
    let mut rig = Rig::start().await;
    let ids: Vec<u64> = rig
        .forwards
        .add(&[ForwardSpec {
            bind: String::new(),
            remote_port: 0,
            local_port: LOCAL_PORT,
        }])
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    rig.forwards.settled(&ids, LIMIT).await;
    let row = rig.forwards.status_of(&ids).remove(0);
    assert_eq!(row.state, ForwardState::Listening);
    let port = row.remote_port.expect("port");

    let listener = rig.app.listen(LOCAL_PORT);
    // The jump host's open completes once the local app answered: run it beside the app.
    let call = tokio::spawn(rig.jump.call(port, CALLER));
    let answered = rig
        .app
        .until(LIMIT, |app| app.tcp(listener).state() == State::Established)
        .await;
    assert!(answered, "the local app accepts the caller's connection");
    assert_eq!(
        rig.app.tcp(listener).remote_endpoint(),
        Some(CALLER.into()),
        "the app sees the caller's own address"
    );
    let opened = rig.app.until(LIMIT, |_| call.is_finished()).await;
    assert!(opened, "the jump host's open completes");
    let channel = call
        .await
        .expect("no panic")
        .expect("the channel was accepted");
    let (mut read, write) = channel.split();
    write
        .data_bytes(&b"ping from the cloud"[..])
        .await
        .expect("send");
    let got = rig
        .app
        .exchange(listener, b"pong", "ping from the cloud".len(), LIMIT)
        .await;
    assert_eq!(got, b"ping from the cloud");
    // The app answers and closes: the caller gets the answer, then EOF.
    rig.app.tcp(listener).close();
    let caller_side = tokio::time::timeout(LIMIT, async {
        let mut got = Vec::new();
        loop {
            match read.wait().await {
                Some(russh::ChannelMsg::Data { data }) => got.extend_from_slice(&data),
                Some(russh::ChannelMsg::Eof) => break (got, true),
                Some(_) => continue,
                None => break (got, false),
            }
        }
    });
    // The app side keeps running while the caller reads.
    let (reply, eof) = tokio::select! {
        r = caller_side => r.expect("the answer in time"),
        _ = rig.app.until(LIMIT, |_| false) => panic!("no answer"),
    };
    assert_eq!(reply, b"pong");
    assert!(eof, "the app's FIN reaches the caller as EOF");
    assert_eq!(rig.stats.borrow().inbound_opened, 1);
    rig.stop().await;
}

/// Writes to the TUN that fail for a passing reason (`ENOBUFS`: the kernel is out of buffers)
/// drop their packets and are counted; TCP retransmits and the transfer completes. Before,
/// the first such failure ended the session.
#[cfg(unix)] // errno values from libc
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tun_writes_failing_with_enobufs_drop_packets_and_the_session_goes_on() {
    const DROPS: u32 = 5;
    let mut rig = Rig::start().await;
    let echo = echo_server().await;
    let h = rig.app.connect(Rig::vpc(echo.port()));
    let data = pattern(100_000);
    let got = rig.app.exchange(h, &data[..1000], 1000, LIMIT).await;
    assert_eq!(got, data[..1000]);
    rig.queues.fail_sends(DROPS, nix::libc::ENOBUFS);
    let got = rig
        .app
        .exchange(h, &data[1000..], data.len() - 1000, LIMIT)
        .await;
    assert!(got == data[1000..], "every byte, after the drops");
    assert_eq!(rig.queues.failing(), 0);
    assert_eq!(rig.stats.borrow().tun_write_drops, u64::from(DROPS));
    assert!(!rig.driver.is_finished(), "the session goes on");
    rig.stop().await;
}

/// A write that fails because the device is gone (`EBADFD`) ends the session with that
/// error.
#[cfg(target_os = "linux")] // EBADFD is Linux's
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gone_tun_device_ends_the_session() {
    let mut rig = Rig::start().await;
    let echo = echo_server().await;
    rig.queues.fail_sends(u32::MAX, nix::libc::EBADFD);
    let h = rig.app.connect(Rig::vpc(echo.port()));
    let _ = rig.app.exchange(h, b"x", 1, Duration::from_secs(2)).await;
    let ended = tokio::time::timeout(LIMIT, rig.driver)
        .await
        .expect("the driver ends")
        .expect("no panic");
    let e = ended.expect_err("with the TUN's error");
    assert_eq!(e.raw_os_error(), Some(nix::libc::EBADFD));
}

/// How long the slow release below takes, and the releases it made.
const SLOW_RELEASE: Duration = Duration::from_millis(500);
static RELEASES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

fn slow_release() -> bool {
    std::thread::sleep(SLOW_RELEASE);
    RELEASES.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    true
}

/// Giving freed memory back (`malloc_trim`, which walks the whole heap) never holds up a
/// flow: with a release that takes 500 ms, started when a flow closes, another flow's echoes
/// keep their round trip. Before, the release ran on the driver's task and every flow
/// stalled for as long as it took.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn giving_memory_back_never_stalls_a_flow() {
    let mut rig = Rig::with_release(slow_release).await;
    let echo = echo_server().await;
    let a = rig.app.connect(Rig::vpc(echo.port()));
    assert_eq!(rig.app.exchange(a, b"warm", 4, LIMIT).await, b"warm");
    // Another flow closes: the release starts.
    let b = rig.app.connect(Rig::vpc(echo.port()));
    assert_eq!(rig.app.exchange(b, b"bye", 3, LIMIT).await, b"bye");
    rig.app.tcp(b).abort();
    let closed = std::time::Instant::now();
    let mut slowest = Duration::ZERO;
    while RELEASES.load(std::sync::atomic::Ordering::SeqCst) == 0 || closed.elapsed() < SLOW_RELEASE
    {
        assert!(closed.elapsed() < LIMIT, "the release never ran");
        let t = std::time::Instant::now();
        assert_eq!(rig.app.exchange(a, b"ping", 4, LIMIT).await, b"ping");
        slowest = slowest.max(t.elapsed());
    }
    assert!(
        slowest < SLOW_RELEASE / 3,
        "an echo took {slowest:?} while memory was given back"
    );
    rig.stop().await;
}

// ----- the direct path (`mse-vpn run`) -----

/// The host's `port` as the app reaches it: the loopback alias.
fn host(port: u16) -> SocketAddr {
    SocketAddr::from((HOST_LOOPBACK_V4, port))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_direct_path_a_flow_outside_the_vpc_is_a_host_connection_not_a_channel() {
    let mut rig = Rig::direct().await;
    let echo = echo_server().await;
    let h = rig.app.connect(host(echo.port()));
    let data = pattern(500_000);
    let got = rig.app.exchange(h, &data, data.len(), LIMIT).await;
    assert!(
        got == data,
        "the bytes come back as sent ({} of them)",
        got.len()
    );
    assert!(
        rig.jump.opens().is_empty(),
        "no SSH channel: {:?}",
        rig.jump.opens()
    );
    rig.app.tcp(h).close();
    let mut rest = Vec::new();
    assert!(rig.app.read_to_fin(h, &mut rest, LIMIT).await, "FIN back");
    assert!(rig.until_no_flows().await, "the flow is reaped");
    let stats = *rig.stats.borrow();
    assert_eq!((stats.bytes_up, stats.bytes_down), (500_000, 500_000));

    // The VPC still goes through the jump host.
    let v = rig.app.connect(Rig::vpc(echo.port()));
    let got = rig.app.exchange(v, b"ping", 4, LIMIT).await;
    assert_eq!(got, b"ping");
    assert_eq!(rig.jump.opens(), [(VPC_V4.to_string(), echo.port())]);
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_direct_path_a_closed_host_port_resets_the_app_at_once() {
    let mut rig = Rig::direct().await;
    let h = rig.app.connect(host(closed_port()));
    let mut established = false;
    let closed = rig
        .app
        .until(LIMIT, |app| {
            let s = app.tcp(h);
            established |= s.state() == State::Established;
            s.state() == State::Closed
        })
        .await;
    assert!(closed && !established, "a closed port looks closed");
    assert!(rig.until_no_flows().await);
    assert_eq!(rig.stats.borrow().flows_refused, 1);
    assert!(rig.jump.opens().is_empty());
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_direct_path_an_app_reset_resets_the_host_connection() {
    let mut rig = Rig::direct().await;
    let (server, mut ends) = watch_server().await;
    let h = rig.app.connect(host(server.port()));
    let sent = rig
        .app
        .until(LIMIT, |app| {
            let s = app.tcp(h);
            if s.state() == State::Established && s.send_queue() == 0 {
                return s.send_slice(b"partial request").is_ok();
            }
            false
        })
        .await;
    assert!(sent);
    rig.app
        .until(LIMIT, |app| app.tcp(h).send_queue() == 0)
        .await;
    rig.app.tcp(h).abort();
    rig.app.until(Duration::from_millis(50), |_| false).await;
    let end = tokio::time::timeout(LIMIT, ends.recv())
        .await
        .expect("the server's connection ends")
        .expect("reported");
    assert!(end.is_err(), "a reset, not an orderly EOF: {end:?}");
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_direct_path_udp_round_trips_through_a_host_socket() {
    let mut rig = Rig::direct().await;
    let echo = udp_echo_server().await;
    let (app, dst) = (SocketAddr::from((APP_V4, 5353)), host(echo.port()));
    for payload in [&b"first"[..], b"second"] {
        let p = emit_udp(app, dst, payload, app::MTU).expect("a datagram");
        rig.app.send_raw(p).await;
    }
    let got = rig.app.until(LIMIT, |a| a.datagrams.len() >= 2).await;
    assert!(
        got,
        "two answers: {:?} {:?}",
        rig.app.datagrams,
        *rig.stats.borrow()
    );
    let answers: Vec<(SocketAddr, SocketAddr, Vec<u8>)> = rig
        .app
        .datagrams
        .drain(..)
        .map(|p| match classify(&p) {
            Ingress::Udp {
                src,
                dst,
                start,
                len,
            } => (src, dst, p[start..start + len].to_vec()),
            other => panic!("expected UDP, got {other:?}"),
        })
        .collect();
    assert_eq!(
        answers,
        [
            (dst, app, b"first".to_vec()),
            (dst, app, b"second".to_vec())
        ],
        "from the address the app sent to"
    );
    // The counters are published after the turn that wrote the answers.
    let stats = rig.stats.clone();
    let counted = rig
        .app
        .until(LIMIT, |_| {
            let s = stats.borrow();
            (s.datagrams_up, s.datagrams_down) == (2, 2)
        })
        .await;
    assert!(counted, "{:?}", *rig.stats.borrow());

    // UDP to the VPC is not carried: ICMP port unreachable, as in `up`.
    let vpc = SocketAddr::new(VPC_V4.into(), 53);
    rig.app
        .send_raw(emit_udp(app, vpc, b"q", app::MTU).unwrap())
        .await;
    assert!(rig.app.until(LIMIT, |a| !a.datagrams.is_empty()).await);
    assert_eq!(rig.app.datagrams[0][9], 1, "ICMP");
    rig.stop().await;
}

/// A DNS query for `name`'s A record.
fn dns_query(id: u16, name: &str) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// The answer to [`dns_query`] from a responder with no nameserver for names outside its
/// split domains: REFUSED, with the query's id.
fn assert_refused(answer: &[u8], id: u16) {
    assert!(answer.len() >= 12, "{answer:?}");
    assert_eq!(u16::from_be_bytes([answer[0], answer[1]]), id);
    assert_eq!(answer[2] & 0x80, 0x80, "a response");
    assert_eq!(answer[3] & 0x0f, 5, "REFUSED");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_direct_path_dns_to_the_dns_address_is_answered_by_the_responder_udp_and_tcp() {
    // The split-DNS responder as `run` starts it: on this host's 127.0.0.1 (the app's
    // address is not this namespace's), no original nameserver (other names: REFUSED).
    let tunnel = Tunnel::spawn(
        Pool::new(1),
        vec![([10, 0, 0, 2], 53).into()],
        ([127, 0, 0, 1], 53).into(),
        1,
        Duration::from_secs(2),
    );
    let counters = Arc::new(DnsCounters::default());
    let responder = Responder::bind(
        ResponderConfig {
            listen: ([127, 0, 0, 1], 0).into(),
            split: Split::new(vec!["internal".parse().unwrap()], &[]),
            upstream: Vec::new(),
        },
        tunnel,
        counters.clone(),
    )
    .await
    .expect("bind");
    let dns = SocketAddr::from((DNS_V4, 53));
    let redirect = DnsRedirect {
        at: dns,
        to: responder.local_addr().unwrap(),
    };
    let (stop_dns, stopped) = watch::channel(false);
    tokio::spawn(responder.run(stopped));
    let mut rig = Rig::direct_with_dns(Some(redirect)).await;

    // UDP: the answer comes from the DNS address.
    let app = SocketAddr::from((APP_V4, 5353));
    let query = dns_query(0x1234, "www.example.org");
    rig.app
        .send_raw(emit_udp(app, dns, &query, app::MTU).unwrap())
        .await;
    assert!(rig.app.until(LIMIT, |a| !a.datagrams.is_empty()).await);
    let p = rig.app.datagrams.remove(0);
    let Ingress::Udp {
        src,
        dst,
        start,
        len,
    } = classify(&p)
    else {
        panic!("expected UDP, got {p:?}")
    };
    assert_eq!((src, dst), (dns, app));
    assert_refused(&p[start..start + len], 0x1234);

    // TCP: a length-prefixed query on a connection to the DNS address.
    let h = rig.app.connect(dns);
    let query = dns_query(0x4321, "www.example.org");
    let mut framed = (query.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&query);
    // REFUSED carries the question back: as long as the query.
    let got = rig.app.exchange(h, &framed, framed.len(), LIMIT).await;
    assert!(got.len() >= 2 + 12, "{got:?}");
    assert_eq!(
        usize::from(u16::from_be_bytes([got[0], got[1]])),
        got.len() - 2
    );
    assert_refused(&got[2..], 0x4321);
    assert!(rig.jump.opens().is_empty(), "nothing went through SSH");
    assert_eq!(
        counters.refused.load(std::sync::atomic::Ordering::Relaxed),
        2
    );
    let _ = stop_dns.send(true);
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_direct_path_the_apps_fin_is_a_shutdown_and_the_reply_still_flows_back() {
    let mut rig = Rig::direct().await;
    let server = count_server().await;
    let h = rig.app.connect(host(server.port()));
    let data = pattern(70_000);
    let mut queued = 0;
    let written = rig
        .app
        .until(LIMIT, |app| {
            let s = app.tcp(h);
            if s.can_send() && queued < data.len() {
                queued += s.send_slice(&data[queued..]).expect("send");
            }
            queued == data.len()
        })
        .await;
    assert!(written);
    rig.app.tcp(h).close();
    let mut reply = Vec::new();
    assert!(
        rig.app.read_to_fin(h, &mut reply, LIMIT).await,
        "the server's FIN"
    );
    assert_eq!(String::from_utf8_lossy(&reply), "got 70000 bytes");
    assert!(rig.until_no_flows().await);
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_direct_path_an_app_that_stops_reading_stops_its_host_connection_too() {
    const BULK: usize = 8 * 1024 * 1024;
    let mut rig = Rig::direct().await;
    let source = source_server(BULK).await;
    let paused = rig.app.connect(host(source.port()));
    let stats = rig.stats.clone();
    // The app does not read: its buffer, then the engine's socket and its pending bytes
    // fill, and the host connection is no longer read (its kernel buffers hold the rest).
    let full = rig
        .app
        .until(LIMIT, |_| {
            stats.borrow().buffered >= (256 * 1024 + mse_vpn::engine::PENDING_LOW) as u64
        })
        .await;
    assert!(full, "the engine's socket for the paused flow filled");
    rig.app.until(Duration::from_millis(300), |_| false).await;
    let s = *stats.borrow();
    assert!(
        s.bytes_down < 1024 * 1024 && s.buffered < 512 * 1024,
        "a paused flow costs its buffers, not the download: {} bytes down, {} held",
        s.bytes_down,
        s.buffered
    );
    let mut got = Vec::new();
    assert!(
        rig.app.read_to_fin(paused, &mut got, LIMIT).await,
        "the FIN at the end"
    );
    assert_eq!(got.len(), BULK);
    assert!(got == pattern(BULK), "byte-exact after the pause");
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_direct_path_a_server_that_resets_resets_the_app() {
    let mut rig = Rig::direct().await;
    // A server that answers, then resets the connection.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        if let Ok((mut s, _)) = listener.accept().await {
            use tokio::io::AsyncWriteExt;
            let _ = s.write_all(b"bye").await;
            let _ = s.set_zero_linger();
        }
    });
    let h = rig.app.connect(host(port));
    let mut got = Vec::new();
    let reset = rig
        .app
        .until(LIMIT, |app| {
            let s = app.tcp(h);
            while s.can_recv() {
                s.recv(|b| {
                    got.extend_from_slice(b);
                    (b.len(), ())
                })
                .unwrap();
            }
            s.state() == State::Closed
        })
        .await;
    assert!(reset, "the app's connection is reset");
    assert!(got.is_empty() || got == b"bye", "{got:?}");
    assert!(rig.until_no_flows().await);
    rig.stop().await;
}

/// Pings through the direct path: ICMP sockets as Linux gives them to ordinary users.
#[cfg(target_os = "linux")]
mod ping {
    use super::*;
    use mse_vpn::engine::packet::emit_echo;

    /// True if this host gives this process unprivileged ICMP sockets (its group is in
    /// `net.ipv4.ping_group_range`, of this network namespace).
    fn ping_sockets_allowed() -> bool {
        let range =
            std::fs::read_to_string("/proc/sys/net/ipv4/ping_group_range").unwrap_or_default();
        let mut bounds = range.split_whitespace().map(|n| n.parse::<u32>().ok());
        let (Some(Some(low)), Some(Some(high))) = (bounds.next(), bounds.next()) else {
            return false;
        };
        let gid = nix::unistd::getegid().as_raw();
        low <= gid && gid <= high
    }

    /// A ping to the host's loopback through the alias: answered where the host gives ICMP
    /// sockets (`ping_group_range`), "prohibited" at once where it does not (after the first
    /// request, which goes unanswered). Both are real outcomes; the other branch runs where the
    /// setting differs (`ip netns exec NS` with the range opened in that namespace).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn with_the_direct_path_a_ping_to_the_host_is_answered_where_ping_sockets_are_allowed() {
        let mut rig = Rig::direct().await;
        let (app, alias) = (IpAddr::V4(APP_V4), IpAddr::V4(HOST_LOOPBACK_V4));
        let ping = |seq| emit_echo((app, alias), true, (0x77, seq), b"hello", app::MTU).unwrap();
        rig.app.send_raw(ping(1)).await;
        if ping_sockets_allowed() {
            assert!(rig.app.until(LIMIT, |a| !a.datagrams.is_empty()).await);
            let reply = rig.app.datagrams.remove(0);
            let expected = emit_echo((alias, app), false, (0x77, 1), b"hello", app::MTU).unwrap();
            assert_eq!(
                reply, expected,
                "the echo reply, from the alias, with our identifier"
            );
        } else {
            rig.app.until(Duration::from_millis(200), |_| false).await;
            assert!(rig.app.datagrams.is_empty(), "{:?}", rig.app.datagrams);
            rig.app.send_raw(ping(2)).await;
            assert!(rig.app.until(LIMIT, |a| !a.datagrams.is_empty()).await);
            let reply = &rig.app.datagrams[0];
            assert_eq!((reply[9], reply[20], reply[21]), (1, 3, 13), "prohibited");
        }
        rig.stop().await;
    }
}
