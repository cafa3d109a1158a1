//! The pool against the in-process jump host: connecting, spreading channels over the
//! links, refusals, and a link that drops and comes back.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use russh::ChannelMsg;
use russh::client::Msg;

use mse_vpn::pool::Placement;
use mse_vpn::ssh::{OpenError, SshError};

use crate::app::{VPC_V4, closed_port, echo_server, pattern, source_server};
use crate::jump::Jump;
use crate::{LIMIT, start_pool, start_pool_fatal, wait_for};

const ORIGINATOR: SocketAddr = SocketAddr::new(IpAddr::V4(crate::app::APP_V4), 40_000);
const OPEN_CAP: Duration = Duration::from_secs(5);

/// `data` through `channel` and back (to an echo server); the channel ends with EOF.
async fn echo_through(channel: russh::Channel<Msg>, data: &[u8]) -> Vec<u8> {
    let (mut read, write) = channel.split();
    write.data_bytes(data.to_vec()).await.expect("write");
    write.eof().await.expect("eof");
    let mut got = Vec::new();
    let read_all = async {
        while let Some(msg) = read.wait().await {
            match msg {
                ChannelMsg::Data { data } => got.extend_from_slice(&data),
                ChannelMsg::Eof | ChannelMsg::Close => break,
                _ => {}
            }
        }
    };
    tokio::time::timeout(LIMIT, read_all)
        .await
        .expect("echo in time");
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channels_spread_over_every_link_and_echo_byte_exact() {
    let jump = Jump::start().await;
    let echo = echo_server().await;
    let (pool, stop) = start_pool(&jump, 2).await;
    assert_eq!(jump.accepted(), 2, "one login per slot");

    // The destination is a VPC address; the jump host (not the pool) maps it to the server.
    let dst = SocketAddr::new(IpAddr::V4(VPC_V4), echo.port());
    let mut slots = Vec::new();
    let mut channels = Vec::new();
    for _ in 0..4 {
        let (link, channel) = pool
            .open(dst, ORIGINATOR, Placement::Spread, LIMIT, OPEN_CAP)
            .await
            .expect("open");
        assert!(pool.is_live(link));
        slots.push(link.slot);
        channels.push(channel);
    }
    slots.sort_unstable();
    assert_eq!(
        slots,
        [0, 0, 1, 1],
        "each new flow goes to the least loaded link"
    );
    assert!(
        jump.opens()
            .iter()
            .all(|(host, port)| *host == VPC_V4.to_string() && *port == echo.port()),
        "the jump host is asked for the VPC destination: {:?}",
        jump.opens()
    );
    let data = pattern(300_000);
    for channel in channels {
        assert_eq!(echo_through(channel, &data).await, data);
    }
    let _ = stop.send(true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packed_flows_share_the_lowest_link_and_stay_off_links_with_heavy_flows() {
    let jump = Jump::start().await;
    let echo = echo_server().await;
    let (pool, stop) = start_pool(&jump, 3).await;
    let dst = SocketAddr::new(IpAddr::V4(VPC_V4), echo.port());
    let mut channels = Vec::new();
    let mut open = async |placement| {
        let (link, channel) = pool
            .open(dst, ORIGINATOR, placement, LIMIT, OPEN_CAP)
            .await
            .expect("open");
        channels.push(channel);
        link
    };
    // Short connections go together, on the lowest link.
    let mut slots = Vec::new();
    for _ in 0..4 {
        slots.push(open(Placement::Pack).await.slot);
    }
    assert_eq!(slots, [0, 0, 0, 0], "packed flows share one link");
    // A flow on link 0 turns out to be bulk: packed flows move to the lowest link without.
    let first = open(Placement::Pack).await;
    assert_eq!(first.slot, 0);
    pool.mark_heavy(first);
    assert_eq!(open(Placement::Pack).await.slot, 1);
    assert_eq!(open(Placement::Pack).await.slot, 1);
    // When it ends, link 0 is the place again.
    pool.unmark_heavy(first);
    assert_eq!(open(Placement::Pack).await.slot, 0);
    // Spread still goes to the least loaded link (2: no flows yet).
    assert_eq!(open(Placement::Spread).await.slot, 2);
    let data = pattern(10_000);
    for channel in channels {
        assert_eq!(echo_through(channel, &data).await, data);
    }
    let _ = stop.send(true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_destination_port_is_a_connect_failure_not_a_lost_link() {
    let jump = Jump::start().await;
    let (pool, stop) = start_pool(&jump, 1).await;
    let dst = SocketAddr::new(IpAddr::V4(VPC_V4), closed_port());
    let err = pool
        .open(dst, ORIGINATOR, Placement::Spread, LIMIT, OPEN_CAP)
        .await
        .expect_err("nothing listens there");
    assert_eq!(err, OpenError::ConnectFailed);
    assert_eq!(pool.connected(), 1, "a refused channel leaves the link up");
    let _ = stop.send(true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_link_reconnects_by_itself_and_new_opens_use_the_new_link() {
    let jump = Jump::start().await;
    let echo = echo_server().await;
    let (pool, stop) = start_pool(&jump, 1).await;
    let dst = SocketAddr::new(IpAddr::V4(VPC_V4), echo.port());
    let (old, channel) = pool
        .open(dst, ORIGINATOR, Placement::Spread, LIMIT, OPEN_CAP)
        .await
        .expect("open");
    let mut links = pool.subscribe();
    links.borrow_and_update();

    jump.drop_connections();

    // The flow's channel ends with its connection, and the pool says so.
    let (mut read, _write) = channel.split();
    let ended = tokio::time::timeout(LIMIT, async {
        while let Some(msg) = read.wait().await {
            if matches!(msg, ChannelMsg::Close) {
                break;
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the channel of a dropped link ends");
    tokio::time::timeout(LIMIT, links.wait_for(|l| l[0].is_none()))
        .await
        .expect("the slot is cleared")
        .expect("pool alive");
    assert!(!pool.is_live(old));

    // The supervisor reconnects (first retry after 250 ms) and the slot is filled again.
    tokio::time::timeout(LIMIT, links.wait_for(|l| l[0].is_some()))
        .await
        .expect("reconnected in time")
        .expect("pool alive");
    assert_eq!(jump.accepted(), 2, "one new login");
    let (new, channel) = pool
        .open(dst, ORIGINATOR, Placement::Spread, LIMIT, OPEN_CAP)
        .await
        .expect("open after the reconnect");
    assert_eq!(new.slot, old.slot);
    assert!(
        new.generation > old.generation,
        "a new generation: {new:?} after {old:?}"
    );
    assert!(!pool.is_live(old) && pool.is_live(new));
    let data = pattern(10_000);
    assert_eq!(echo_through(channel, &data).await, data);
    let _ = stop.send(true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_while_no_link_is_up_waits_for_the_reconnect() {
    let jump = Jump::start().await;
    let echo = echo_server().await;
    let (pool, stop) = start_pool(&jump, 1).await;
    let dst = SocketAddr::new(IpAddr::V4(VPC_V4), echo.port());
    jump.drop_connections();
    wait_for(LIMIT, || pool.connected() == 0).await;
    // No link now: the open waits (bounded by its link wait) instead of failing at once.
    let (link, channel) = pool
        .open(dst, ORIGINATOR, Placement::Spread, LIMIT, OPEN_CAP)
        .await
        .expect("open once a link is back");
    assert!(pool.is_live(link));
    let data = pattern(1_000);
    assert_eq!(echo_through(channel, &data).await, data);
    let _ = stop.send(true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_nobody_reads_holds_up_only_itself() {
    // Stock russh stalls the whole connection once one channel's queue is full; the
    // patched one (vendor/russh) pauses only that channel, at its SSH window.
    const BULK: usize = 16 * 1024 * 1024;
    let jump = Jump::start().await;
    let echo = echo_server().await;
    let source = source_server(BULK).await;
    let (pool, stop) = start_pool(&jump, 1).await;
    let (_, stuck) = pool
        .open(
            SocketAddr::new(IpAddr::V4(VPC_V4), source.port()),
            ORIGINATOR,
            Placement::Spread,
            LIMIT,
            OPEN_CAP,
        )
        .await
        .expect("open the bulk channel");
    // Nobody reads `stuck` while the server pushes 16 MiB at it, far beyond its window: wait
    // until the window is full (the channel holds a whole window unread), so the channels
    // below share the connection with a stuck one.
    let window = jump.options().window_size as usize;
    wait_for(LIMIT, || stuck.queued_bytes() >= window).await;
    let dst = SocketAddr::new(IpAddr::V4(VPC_V4), echo.port());
    for _ in 0..3 {
        let (_, channel) = pool
            .open(dst, ORIGINATOR, Placement::Spread, LIMIT, OPEN_CAP)
            .await
            .expect("a new channel on the same connection");
        let data = pattern(100_000);
        assert_eq!(echo_through(channel, &data).await, data);
    }
    // Then the stuck channel is read after all, and every byte is there.
    let (mut read, _write) = stuck.split();
    let mut got = 0;
    let read_all = async {
        while let Some(msg) = read.wait().await {
            match msg {
                ChannelMsg::Data { data } => got += data.len(),
                ChannelMsg::Eof | ChannelMsg::Close => break,
                _ => {}
            }
        }
    };
    tokio::time::timeout(LIMIT, read_all)
        .await
        .expect("the rest in time");
    assert_eq!(got, BULK);
    let _ = stop.send(true);
}

/// On a virtual clock: the reconnect schedule while the jump host stays down (one slot
/// tried, full jitter: at most about a second apart for the first 20 s, then backing off
/// towards 15 s), and the reconnect once it is back.
#[tokio::test(start_paused = true)]
async fn while_the_jump_host_is_down_retries_back_off_and_the_pool_comes_back() {
    let jump = Jump::start().await;
    let (pool, stop) = start_pool(&jump, 2).await;
    jump.set_down(true);
    jump.drop_connections();
    let lost = tokio::time::Instant::now();
    wait_for(LIMIT, || pool.connected() == 0).await;

    tokio::time::sleep(Duration::from_secs(90)).await;
    let tries: Vec<Duration> = jump
        .attempts()
        .into_iter()
        .filter(|t| *t >= lost)
        .map(|t| t - lost)
        .collect();
    let gaps: Vec<(Duration, Duration)> = tries.windows(2).map(|w| (w[0], w[1] - w[0])).collect();
    // The first retry after a random wait below 250 ms (laptops that lost the jump host
    // together do not come back together).
    assert!(
        tries[0] <= Duration::from_millis(260),
        "first retry at {:?}",
        tries[0]
    );
    for (at, gap) in &gaps {
        if *at < Duration::from_secs(19) {
            assert!(
                *gap <= Duration::from_millis(1_010),
                "{gap:?} between retries {at:?} into the outage"
            );
        }
        assert!(
            *gap <= Duration::from_millis(15_010),
            "{gap:?} at {at:?}: over the cap"
        );
    }
    assert!(
        gaps.iter()
            .any(|(at, gap)| *at > Duration::from_secs(25) && *gap > Duration::from_secs(3)),
        "backing off after the first 20 s: {gaps:?}"
    );
    // One slot is tried while none is up: 2 slots do not double the tries.
    assert!(tries.len() < 70, "{} retries in 90 s", tries.len());

    // The jump host is back: the next retry (at most 15 s away) logs in, then the other slot.
    jump.set_down(false);
    wait_for(Duration::from_secs(20), || pool.connected() == 2).await;
    assert_eq!(jump.max_pending(), 1, "one pending connection at a time");
    let _ = stop.send(true);
}

/// On a virtual clock: sshd's MaxStartups drop (the connection reset under the client's
/// banner) at start is retried within the connect timeout, and the pool's other
/// connections follow the first one after it logged in, one at a time.
#[tokio::test(start_paused = true)]
async fn up_retries_connections_reset_under_the_banner_then_the_others_follow_one_at_a_time() {
    let jump = Jump::start().await;
    jump.refuse(4);
    let opts = jump.options();
    let pool = mse_vpn::pool::Pool::new(4);
    let started = tokio::time::Instant::now();
    let sessions = pool
        .connect_initial(&opts)
        .await
        .expect("a refusal that passes is retried");
    let took = started.elapsed();
    assert_eq!(jump.attempts().len(), 5, "4 refused, then in");
    assert!(took < opts.connect_timeout, "{took:?}");
    assert!(sessions[0].is_some());
    assert!(
        sessions[1..].iter().all(Option::is_none),
        "only the first connection is made before `up` goes on"
    );
    // Each retry waited a random time bounded by the doubling backoff (≤ 1 s).
    let attempts = jump.attempts();
    for w in attempts.windows(2) {
        assert!(w[1] - w[0] <= Duration::from_millis(1_010), "{attempts:?}");
    }

    // The others follow, one at a time.
    let (stop, _) = tokio::sync::watch::channel(false);
    let board = mse_vpn::control::Board::new(jump.addr.to_string(), "inproc".into(), vec![]);
    let _fatal = mse_vpn::pool::supervise(
        &pool,
        sessions,
        std::sync::Arc::new(opts),
        board,
        stop.clone(),
    );
    wait_for(LIMIT, || pool.connected() == 4).await;
    assert_eq!(jump.accepted(), 4, "one login per slot");
    assert_eq!(jump.max_pending(), 1, "one pending connection at a time");
    let _ = stop.send(true);
}

/// On a virtual clock: a jump host that keeps resetting every connection under the banner
/// fails `up` only at the connect timeout, with the count of refused tries.
#[tokio::test(start_paused = true)]
async fn up_fails_on_refusals_only_at_the_connect_timeout_and_counts_them() {
    let jump = Jump::start().await;
    jump.refuse(usize::MAX);
    let opts = jump.options();
    let pool = mse_vpn::pool::Pool::new(4);
    let started = tokio::time::Instant::now();
    let err = match pool.connect_initial(&opts).await {
        Ok(_) => panic!("every try was refused"),
        Err(e) => e,
    };
    let took = started.elapsed();
    assert!(
        took >= opts.connect_timeout && took < opts.connect_timeout + Duration::from_secs(1),
        "gave up after {took:?}"
    );
    let tries = jump.attempts().len() as u32;
    assert!(tries > 5, "{tries} tries in {took:?}");
    match &err {
        SshError::RefusedTooLong { tries: t, secs, .. } => {
            assert_eq!(*t, tries);
            assert_eq!(*secs, opts.connect_timeout.as_secs());
        }
        other => panic!("{other}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("{tries} tries")) && msg.contains("MaxStartups"),
        "{msg}"
    );
}

/// On a virtual clock: after an outage, a flow waiting for a link goes out as soon as one
/// connection is back, before the pool's others follow.
#[tokio::test(start_paused = true)]
async fn the_first_flow_after_an_outage_goes_out_on_the_first_link_back() {
    let jump = Jump::start().await;
    let echo = echo_server().await;
    let (pool, stop) = start_pool(&jump, 4).await;
    jump.set_down(true);
    jump.drop_connections();
    wait_for(LIMIT, || pool.connected() == 0).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let dst = SocketAddr::new(IpAddr::V4(VPC_V4), echo.port());
    let waiting = {
        let pool = pool.clone();
        tokio::spawn(async move {
            let r = pool
                .open(dst, ORIGINATOR, Placement::Spread, LIMIT, OPEN_CAP)
                .await;
            (r, pool.connected())
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    jump.set_down(false);
    let back = tokio::time::Instant::now();
    let (opened, up_then) = waiting.await.unwrap();
    let (_, channel) = opened.expect("the waiting flow goes out");
    assert!(
        back.elapsed() <= Duration::from_millis(1_010),
        "{:?}",
        back.elapsed()
    );
    assert_eq!(up_then, 1, "it went out on the first link back");
    let data = pattern(1_000);
    assert_eq!(echo_through(channel, &data).await, data);
    wait_for(LIMIT, || pool.connected() == 4).await;
    let _ = stop.send(true);
}

/// On a virtual clock, to watch a minute for retries that must not come.
#[tokio::test(start_paused = true)]
async fn a_host_key_that_changed_during_a_reconnect_stops_the_pool_for_good() {
    let jump = Jump::start().await;
    let (pool, stop, fatal) = start_pool_fatal(&jump, 1).await;
    let mut stopped = stop.subscribe();
    jump.change_host_key();
    jump.drop_connections();
    // The reconnect meets another host key: no retry can fix that, so the session stops.
    tokio::time::timeout(LIMIT, stopped.wait_for(|s| *s))
        .await
        .expect("the session is stopped")
        .expect("switch alive");
    let err = fatal.lock().unwrap().take().expect("the reason is kept");
    // The message names the known_hosts line that holds the old key.
    let line = std::fs::read_to_string(jump.known_hosts())
        .expect("known_hosts")
        .lines()
        .position(|l| !l.trim().is_empty())
        .expect("the recorded key")
        + 1;
    assert!(
        matches!(err, SshError::HostKeyChanged { line: l, .. } if l == line),
        "{err}"
    );
    assert!(
        err.to_string().contains(&format!("remove line {line} of")),
        "{err}"
    );
    assert_eq!(pool.connected(), 0);
    let accepted = jump.accepted();
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(jump.accepted(), accepted, "no retries after a fatal error");
}
