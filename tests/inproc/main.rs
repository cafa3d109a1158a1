//! The middle test tier: the library's pool, reverse listeners and driver against an
//! in-process SSH server ([`jump`], russh's server side) standing in for the jump host's
//! sshd, with 127.0.0.1 echo servers as the VPC and a smoltcp interface on in-memory queues
//! as the laptop's kernel ([`app`]). No root, no namespaces, no real sshd: the suite runs in
//! seconds. The end-to-end tier (tests/it) proves the same paths with real OpenSSH.
//!
//! Most tests run on the real clock, multi-threaded, and wait with deadline loops that end as
//! soon as their condition holds (the limits only fail a broken build in seconds instead of
//! hanging). Where a timeout or a schedule is the point (the open timeout, reconnect
//! backoff), the test runs on tokio's paused clock (`start_paused`, one thread): time jumps
//! to the next timer only when every task waits, and a loopback write is readable at once,
//! so the SSH traffic between the client and the in-process server is never overtaken by
//! the clock; ten virtual seconds pass in a fraction of a real one.

mod app;
mod driver;
mod jump;
mod pool;
mod reverse;
mod session;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use mse_vpn::control::Board;
use mse_vpn::pool::{self as mpool, Pool};

use jump::Jump;

/// A generous limit for anything that should take milliseconds.
pub const LIMIT: Duration = Duration::from_secs(10);

/// A running pool of `size` connections to `jump`, supervised (reconnects), and the switch
/// that stops it.
pub async fn start_pool(jump: &Jump, size: usize) -> (Arc<Pool>, watch::Sender<bool>) {
    let (pool, stop, _) = start_pool_fatal(jump, size).await;
    (pool, stop)
}

/// [`start_pool`], and where the pool's supervisors leave an error no reconnect can fix
/// (they stop the session through the switch).
pub async fn start_pool_fatal(
    jump: &Jump,
    size: usize,
) -> (Arc<Pool>, watch::Sender<bool>, mpool::Fatal) {
    let opts = jump.options();
    let pool = Pool::new(size);
    let sessions = pool
        .connect_initial(&opts)
        .await
        .expect("connect to the in-process jump host");
    let (stop, _) = watch::channel(false);
    let board = Board::new(
        jump.addr.to_string(),
        "inproc".into(),
        vec!["10.0.0.0/16".into()],
    );
    // The coupling with the status board (src/control) is here only.
    let fatal = mpool::supervise(&pool, sessions, Arc::new(opts), board, stop.clone());
    // The supervisors install the links in a moment.
    wait_for(LIMIT, || pool.connected() == size).await;
    (pool, stop, fatal)
}

/// Polls `cond` every few milliseconds until it holds; panics after `limit`.
pub async fn wait_for(limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
