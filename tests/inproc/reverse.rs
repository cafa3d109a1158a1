//! Reverse listeners (`--expose`) against the in-process jump host: the keeper requests the
//! listener on a live link, a cloud caller's connection arrives as an inbound call stamped
//! with that link, and a lost link's listener is requested again once the pool reconnects.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use mse_vpn::pool::InboundCalls;
use mse_vpn::reverse::{ForwardSpec, ForwardState, Forwards, Target};

use crate::jump::Jump;
use crate::{LIMIT, start_pool, wait_for};

const CALLER: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 7, 9)), 40_022);
const LOCAL_PORT: u16 = 8080;

/// Exposes `remote_port` (0: the jump host picks) for local port [`LOCAL_PORT`]; returns the
/// entry's id once it settled.
async fn expose(forwards: &Forwards, remote_port: u16) -> u64 {
    let spec = ForwardSpec {
        bind: String::new(),
        remote_port,
        local_port: LOCAL_PORT,
    };
    let ids: Vec<u64> = forwards
        .add(&[spec])
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    forwards.settled(&ids, LIMIT).await;
    ids[0]
}

async fn next_call(calls: &mut InboundCalls) -> mse_vpn::pool::InboundCall {
    tokio::time::timeout(LIMIT, calls.recv())
        .await
        .expect("a call in time")
        .expect("the pool's queue is open")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exposed_port_listens_and_a_cloud_caller_arrives_as_an_inbound_call() {
    let jump = Jump::start().await;
    let (pool, stop) = start_pool(&jump, 2).await;
    let mut calls = pool.inbound_calls().expect("the calls, once");
    assert!(pool.inbound_calls().is_none(), "only one taker");
    let forwards = Forwards::new();
    tokio::spawn(Arc::clone(&forwards).keep(pool.clone(), stop.subscribe()));

    let id = expose(&forwards, 0).await;
    let row = forwards.status_of(&[id]).remove(0);
    assert_eq!(row.state, ForwardState::Listening, "{row:?}");
    let port = row.remote_port.expect("the port the jump host picked");
    assert_eq!(jump.forwarded_ports(), [port]);

    // The caller's connection comes through the link that holds the listener (the lowest
    // live slot), with the caller's own address.
    let (holder, _) = pool.first_live().expect("a live link");
    let call = tokio::join!(jump.call(port, CALLER), async {
        let call = next_call(&mut calls).await;
        assert_eq!(call.link, holder);
        assert_eq!(call.listen_port, port);
        assert_eq!(call.caller, Some(CALLER));
        assert_eq!(
            forwards.lookup(call.link, call.listen_port),
            Some(Target {
                id,
                local_port: LOCAL_PORT
            }),
            "the call is routed to the exposed local port"
        );
        call.reply.accept().await;
        call.channel
    });
    let (server_side, client_side) = call;
    let server_side = server_side.expect("the client accepted the channel");
    // The accepted channel carries bytes both ways.
    server_side
        .data_bytes(&b"hello from the cloud"[..])
        .await
        .expect("send");
    let (mut read, write) = client_side.split();
    let got = tokio::time::timeout(LIMIT, async {
        loop {
            match read.wait().await {
                Some(russh::ChannelMsg::Data { data }) => break data.to_vec(),
                Some(_) => continue,
                None => panic!("channel ended"),
            }
        }
    })
    .await
    .expect("data in time");
    assert_eq!(got, b"hello from the cloud");
    write.data_bytes(&b"hi"[..]).await.expect("reply");
    assert_eq!(forwards.status_of(&[id])[0].connections, 1);

    // A call on a port nobody exposed is not routed anywhere.
    assert_eq!(forwards.lookup(holder, port + 1), None);
    let _ = stop.send(true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_inbound_call_is_refused_at_the_jump_host() {
    let jump = Jump::start().await;
    let (pool, stop) = start_pool(&jump, 1).await;
    let mut calls = pool.inbound_calls().expect("calls");
    let forwards = Forwards::new();
    tokio::spawn(Arc::clone(&forwards).keep(pool.clone(), stop.subscribe()));
    let id = expose(&forwards, 0).await;
    let port = forwards.status_of(&[id])[0].remote_port.expect("port");
    let (opened, ()) = tokio::join!(jump.call(port, CALLER), async {
        // Dropping the reply refuses the channel (as the driver does for an unknown port).
        drop(next_call(&mut calls).await);
    });
    assert!(opened.is_none(), "the jump host's open is refused");
    let _ = stop.send(true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_lost_with_its_link_is_requested_again_after_the_reconnect() {
    let jump = Jump::start().await;
    let (pool, stop) = start_pool(&jump, 1).await;
    let mut calls = pool.inbound_calls().expect("calls");
    let forwards = Forwards::new();
    tokio::spawn(Arc::clone(&forwards).keep(pool.clone(), stop.subscribe()));
    let id = expose(&forwards, 20_880).await;
    assert_eq!(forwards.status_of(&[id])[0].state, ForwardState::Listening);
    let (before, _) = pool.first_live().expect("live");

    jump.drop_connections();
    assert!(
        jump.forwarded_ports().is_empty(),
        "the listener went with its connection"
    );

    // The pool reconnects; the keeper asks the new connection for the same port.
    wait_for(LIMIT, || jump.forwarded_ports() == [20_880]).await;
    wait_for(LIMIT, || {
        forwards.status_of(&[id])[0].state == ForwardState::Listening
    })
    .await;
    let (after, _) = pool.first_live().expect("live");
    assert!(after.generation > before.generation);
    let (opened, link) = tokio::join!(jump.call(20_880, CALLER), async {
        let call = next_call(&mut calls).await;
        let link = call.link;
        assert!(forwards.lookup(call.link, call.listen_port).is_some());
        call.reply.accept().await;
        link
    });
    assert!(opened.is_some());
    assert_eq!(link, after, "the call comes through the new link");
    let _ = stop.send(true);
}
