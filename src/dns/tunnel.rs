//! DNS-over-TCP to the VPC resolver through the tunnel: a few long-lived `direct-tcpip`
//! channels opened from the [`Pool`], each carrying many queries at once (pipelined, each
//! with an ID of its own so answers can come back in any order). A channel that fails is
//! re-opened for the next query; its queries in flight are retried once on a new channel.
//! When no SSH link is up, or the resolver does not answer in time, the query fails at once
//! (the responder answers SERVFAIL), so apps never hang on a dead tunnel.
//!
//! The streams come from a [`Connector`]: in a session, [`PoolConnector`] opens
//! `direct-tcpip` channels on the SSH pool; tests plug in an in-memory resolver.
//!
//! Some resolvers serve one TCP connection at a time (dnsmasq in debug mode, some
//! appliances): the second channel is accepted but never answered. When a channel's queries
//! wait [`STALL_AFTER`] while another channel answered within [`LIVE_WINDOW`], they move to
//! that live channel, and the silent one is closed and passed over for [`STALL_BACKOFF`].
//!
//! Only the responder calls this, and only for names inside the configured domains.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::debug;

use super::wire;
use crate::pool::{Placement, Pool};

/// Queries one channel carries at once; more wait in the worker's queue.
const MAX_IN_FLIGHT: usize = 256;
/// Queries waiting for a worker, per worker.
const QUEUE: usize = 512;
/// After a failed channel open, queries fail at once for this long instead of each waiting
/// for another open (a resolver the jump host cannot reach must not make every query wait).
const OPEN_HOLDOFF: Duration = Duration::from_secs(1);
/// A channel whose oldest query waited this long while another channel answers is stalled.
const STALL_AFTER: Duration = Duration::from_millis(300);
/// A channel that answered within this long is live (its queries can take others').
const LIVE_WINDOW: Duration = Duration::from_secs(10);
/// A stalled channel is passed over for new queries this long.
const STALL_BACKOFF: Duration = Duration::from_secs(30);

/// What the workers know of each other's channels.
#[derive(Clone, Copy, Default)]
struct Health {
    /// When this worker's channel last answered.
    answered: Option<Instant>,
    /// Passed over for new queries until then.
    stalled_until: Option<Instant>,
}

type Board = Arc<std::sync::Mutex<Vec<Health>>>;

/// A byte stream to a resolver's TCP port 53.
pub trait DnsStream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> DnsStream for T {}

/// An open stream, and what to do once it is closed.
pub struct Opened {
    /// The stream (closed when dropped).
    pub stream: Box<dyn DnsStream>,
    /// Called once when the worker is done with the stream.
    pub on_close: Box<dyn FnOnce() + Send>,
}

/// Where the workers get their streams: the pool's `direct-tcpip` channels in a session, an
/// in-memory pipe in tests.
pub trait Connector: Send + Sync + 'static {
    /// True while a stream could be opened (some SSH link is up).
    fn is_up(&self) -> bool;
    /// Opens a stream to `dst`, or `None` after `timeout` or on refusal.
    fn open(&self, dst: SocketAddr, timeout: Duration) -> BoxFuture<'_, Option<Opened>>;
}

/// [`Connector`] over the SSH pool: each stream is a `direct-tcpip` channel.
pub struct PoolConnector {
    /// The pool.
    pub pool: Arc<Pool>,
    /// The originator address told to the jump host.
    pub originator: SocketAddr,
}

impl Connector for PoolConnector {
    fn is_up(&self) -> bool {
        self.pool.connected() > 0
    }

    fn open(&self, dst: SocketAddr, timeout: Duration) -> BoxFuture<'_, Option<Opened>> {
        Box::pin(async move {
            match self
                .pool
                .open(dst, self.originator, Placement::Pack, timeout, timeout)
                .await
            {
                Ok((link, channel)) => {
                    let pool = self.pool.clone();
                    Some(Opened {
                        stream: Box::new(channel.into_stream()),
                        on_close: Box::new(move || pool.release(link)),
                    })
                }
                Err(e) => {
                    debug!(%dst, error = %e, "cannot open a DNS channel");
                    None
                }
            }
        })
    }
}

/// The tunnel side of the responder. See the module documentation.
pub struct Tunnel {
    workers: Vec<mpsc::Sender<Job>>,
    health: Board,
    next: AtomicUsize,
    connector: Arc<dyn Connector>,
    timeout: Duration,
}

/// One query waiting for its answer.
struct Job {
    query: Vec<u8>,
    reply: oneshot::Sender<Option<Vec<u8>>>,
    retried: bool,
}

impl Tunnel {
    /// Starts `channels` workers over the SSH pool, each keeping one channel to one of
    /// `servers` (port 53 over TCP), rotating to the next server when one fails. A query not
    /// answered within `timeout` fails.
    pub fn spawn(
        pool: Arc<Pool>,
        servers: Vec<SocketAddr>,
        originator: SocketAddr,
        channels: usize,
        timeout: Duration,
    ) -> Arc<Tunnel> {
        Tunnel::with_connector(
            Arc::new(PoolConnector { pool, originator }),
            servers,
            channels,
            timeout,
        )
    }

    /// [`Tunnel::spawn`] over any [`Connector`].
    pub fn with_connector(
        connector: Arc<dyn Connector>,
        servers: Vec<SocketAddr>,
        channels: usize,
        timeout: Duration,
    ) -> Arc<Tunnel> {
        let n = channels.max(1);
        let health: Board = Arc::new(std::sync::Mutex::new(vec![Health::default(); n]));
        let (senders, receivers): (Vec<_>, Vec<_>) = (0..n).map(|_| mpsc::channel(QUEUE)).unzip();
        // Weak: a worker must not keep its peers' queues (or its own) open.
        let peers: Vec<mpsc::WeakSender<Job>> = senders.iter().map(|s| s.downgrade()).collect();
        for (i, rx) in receivers.into_iter().enumerate() {
            let w = Worker {
                index: i,
                health: health.clone(),
                peers: peers.clone(),
                connector: connector.clone(),
                servers: servers.clone(),
                server: i % servers.len().max(1),
                timeout,
                conn: None,
                pending: HashMap::new(),
                next_id: rand::random(),
                failed_open: None,
            };
            tokio::spawn(w.run(rx));
        }
        Arc::new(Tunnel {
            workers: senders,
            health,
            next: AtomicUsize::new(0),
            connector,
            timeout,
        })
    }

    /// Sends `query` to the VPC resolver; `None` when no link is up, the resolver cannot be
    /// reached, or it does not answer in time.
    pub async fn query(&self, query: &[u8]) -> Option<Vec<u8>> {
        if !self.connector.is_up() {
            return None;
        }
        let (tx, rx) = oneshot::channel();
        let mut job = Job {
            query: query.to_vec(),
            reply: tx,
            retried: false,
        };
        let n = self.workers.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        // Stalled channels last, so a live one gets the query while there is one.
        let now = Instant::now();
        let stalled = |i: usize| {
            self.health
                .lock()
                .ok()
                .and_then(|h| h[i].stalled_until)
                .is_some_and(|t| t > now)
        };
        let mut order: Vec<usize> = (0..n).map(|i| (start + i) % n).collect();
        order.sort_by_key(|&i| stalled(i));
        let mut sent = false;
        for i in order {
            match self.workers[i].try_send(job) {
                Ok(()) => {
                    sent = true;
                    break;
                }
                Err(mpsc::error::TrySendError::Full(j) | mpsc::error::TrySendError::Closed(j)) => {
                    job = j
                }
            }
        }
        if !sent {
            debug!("every DNS channel queue is full: failing the query");
            return None;
        }
        // The worker enforces the timeout; this bound covers a channel open on top of it.
        tokio::time::timeout(self.timeout * 2, rx)
            .await
            .ok()
            .and_then(Result::ok)
            .flatten()
    }
}

/// One open stream: its write half, the frames its reader task decoded, and its release.
struct Conn {
    write: WriteHalf<Box<dyn DnsStream>>,
    frames: mpsc::Receiver<Vec<u8>>,
    on_close: Box<dyn FnOnce() + Send>,
    reader: tokio::task::JoinHandle<()>,
}

struct Pending {
    orig_id: u16,
    job: Job,
    /// When it was written to the channel.
    sent: Instant,
    deadline: Instant,
}

struct Worker {
    /// Its place in `health` and `peers`.
    index: usize,
    health: Board,
    peers: Vec<mpsc::WeakSender<Job>>,
    connector: Arc<dyn Connector>,
    servers: Vec<SocketAddr>,
    server: usize,
    timeout: Duration,
    conn: Option<Conn>,
    pending: HashMap<u16, Pending>,
    next_id: u16,
    /// When the last channel open failed.
    failed_open: Option<Instant>,
}

impl Worker {
    async fn run(mut self, mut jobs: mpsc::Receiver<Job>) {
        loop {
            let next_deadline = self.pending.values().map(|p| p.deadline).min();
            let stall_check = self.pending.values().map(|p| p.sent + STALL_AFTER).min();
            tokio::select! {
                job = jobs.recv(), if self.pending.len() < MAX_IN_FLIGHT => {
                    let Some(job) = job else { break };
                    self.send(job).await;
                }
                frame = recv_frame(&mut self.conn) => match frame {
                    Some(resp) => self.answer(resp),
                    None => self.lost("the resolver closed the channel").await,
                },
                () = sleep_until(next_deadline) => self.expire().await,
                () = sleep_until(stall_check) => self.hand_over_if_stalled(),
            }
        }
        self.close();
    }

    /// Sends one query on the channel, opening one first if needed.
    async fn send(&mut self, job: Job) {
        if job.reply.is_closed() {
            return; // the client gave up waiting
        }
        if self.conn.is_none() {
            let holding_off = self.failed_open.is_some_and(|t| t.elapsed() < OPEN_HOLDOFF);
            if holding_off || !self.connector.is_up() || self.servers.is_empty() {
                let _ = job.reply.send(None);
                return;
            }
            let server = self.servers[self.server];
            match self.connector.open(server, self.timeout).await {
                Some(opened) => {
                    self.failed_open = None;
                    debug!(%server, "DNS channel to the VPC resolver opened");
                    let (read, write) = tokio::io::split(opened.stream);
                    let (tx, frames) = mpsc::channel(64);
                    let reader = tokio::spawn(read_frames(read, tx));
                    self.conn = Some(Conn {
                        write,
                        frames,
                        on_close: opened.on_close,
                        reader,
                    });
                }
                None => {
                    self.failed_open = Some(Instant::now());
                    self.rotate();
                    let _ = job.reply.send(None);
                    return;
                }
            }
        }
        let Some(orig_id) = wire::id(&job.query) else {
            let _ = job.reply.send(None);
            return;
        };
        let mut id = self.next_id;
        while self.pending.contains_key(&id) {
            id = id.wrapping_add(1);
        }
        self.next_id = id.wrapping_add(1);
        let mut framed = Vec::with_capacity(job.query.len() + 2);
        framed.extend_from_slice(&(job.query.len() as u16).to_be_bytes());
        framed.extend_from_slice(&job.query);
        wire::set_id(&mut framed[2..], id);
        let now = Instant::now();
        self.pending.insert(
            id,
            Pending {
                orig_id,
                job,
                sent: now,
                deadline: now + self.timeout,
            },
        );
        let written = match &mut self.conn {
            Some(c) => c.write.write_all(&framed).await.is_ok() && c.write.flush().await.is_ok(),
            None => false,
        };
        if !written {
            Box::pin(self.lost("writing to the channel failed")).await;
        }
    }

    fn answer(&mut self, mut resp: Vec<u8>) {
        let Some(id) = wire::id(&resp) else { return };
        if let Ok(mut h) = self.health.lock() {
            h[self.index].answered = Some(Instant::now());
        }
        if let Some(p) = self.pending.remove(&id) {
            wire::set_id(&mut resp, p.orig_id);
            let _ = p.job.reply.send(Some(resp));
        }
    }

    /// The oldest query waited [`STALL_AFTER`]: if another channel answered lately, this one
    /// is served last or not at all by its resolver. Its queries move to the live channel
    /// (a later answer here would be ignored), and it is closed and passed over for a while.
    fn hand_over_if_stalled(&mut self) {
        let now = Instant::now();
        let Some(oldest) = self.pending.values().map(|p| p.sent).min() else {
            return;
        };
        if oldest + STALL_AFTER > now {
            return;
        }
        let live = self.health.lock().ok().and_then(|mut h| {
            let me = h[self.index];
            let peer = (0..h.len()).find(|&i| {
                i != self.index
                    && h[i].answered.is_some_and(|t| {
                        now.duration_since(t) < LIVE_WINDOW && me.answered.is_none_or(|m| t > m)
                    })
                    && h[i].stalled_until.is_none_or(|t| t <= now)
            })?;
            h[self.index].stalled_until = Some(now + STALL_BACKOFF);
            Some(peer)
        });
        let Some(peer) = live.and_then(|i| self.peers[i].upgrade()) else {
            // No live channel to move to: wait for the answers or the deadline. Looked at
            // again when the next query is written here.
            for p in self.pending.values_mut() {
                p.sent = p.sent.max(p.deadline);
            }
            return;
        };
        debug!(
            queries = self.pending.len(),
            "a DNS channel is silent while another answers: moving its queries"
        );
        for (_, mut p) in self.pending.drain() {
            wire::set_id(&mut p.job.query, p.orig_id);
            if let Err(e) = peer.try_send(p.job) {
                let job = match e {
                    mpsc::error::TrySendError::Full(j) | mpsc::error::TrySendError::Closed(j) => j,
                };
                let _ = job.reply.send(None);
            }
        }
        self.close();
    }

    /// Fails the queries whose time is up; the channel they were on is not trusted any more.
    async fn expire(&mut self) {
        let now = Instant::now();
        let late: Vec<u16> = self
            .pending
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        if late.is_empty() {
            return;
        }
        debug!(
            queries = late.len(),
            "the VPC resolver did not answer in time"
        );
        for id in late {
            if let Some(p) = self.pending.remove(&id) {
                let _ = p.job.reply.send(None);
            }
        }
        self.rotate();
        self.lost("queries timed out").await;
    }

    /// The channel is gone: close it, and retry its queries once on a new one.
    async fn lost(&mut self, why: &str) {
        if self.conn.is_some() {
            debug!(why, "DNS channel closed");
        }
        self.close();
        let retry: Vec<Pending> = self.pending.drain().map(|(_, p)| p).collect();
        for mut p in retry {
            if p.job.retried || Instant::now() >= p.deadline {
                let _ = p.job.reply.send(None);
            } else {
                p.job.retried = true;
                let mut q = p.job.query;
                wire::set_id(&mut q, p.orig_id);
                p.job.query = q;
                Box::pin(self.send(p.job)).await;
            }
        }
    }

    fn close(&mut self) {
        if let Some(c) = self.conn.take() {
            c.reader.abort();
            (c.on_close)();
            // Dropping both halves closes the stream (the SSH channel).
        }
    }

    fn rotate(&mut self) {
        if !self.servers.is_empty() {
            self.server = (self.server + 1) % self.servers.len();
        }
    }
}

async fn recv_frame(conn: &mut Option<Conn>) -> Option<Vec<u8>> {
    match conn {
        Some(c) => c.frames.recv().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Drains the stream (always, so it never stalls the SSH connection) and decodes
/// length-prefixed DNS messages; ends on EOF, an error, or when the worker is gone.
async fn read_frames(mut read: ReadHalf<Box<dyn DnsStream>>, tx: mpsc::Sender<Vec<u8>>) {
    loop {
        let Ok(len) = read.read_u16().await else {
            return;
        };
        let mut frame = vec![0u8; len as usize];
        if read.read_exact(&mut frame).await.is_err() {
            return;
        }
        if wire::is_response(&frame) && tx.send(frame).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::sync::atomic::AtomicBool;

    /// How the fake resolver behind the n-th opened stream behaves.
    #[derive(Clone, Copy)]
    enum Behaviour {
        /// Reads `n` queries, answers them in reverse order, then answers each as it comes.
        Reverse(usize),
        /// Reads one query and closes the stream without answering.
        DropFirst,
        /// Reads queries and never answers.
        Silent,
        /// The open itself fails, after a while.
        Refuse,
    }

    struct Fake {
        up: AtomicBool,
        opens: AtomicUsize,
        plan: Vec<Behaviour>,
        /// Message IDs seen on the wire.
        wire_ids: Arc<Mutex<Vec<u16>>>,
    }

    async fn read_query(s: &mut tokio::io::DuplexStream) -> Option<Vec<u8>> {
        let len = s.read_u16().await.ok()?;
        let mut q = vec![0u8; len as usize];
        s.read_exact(&mut q).await.ok()?;
        Some(q)
    }

    /// The fake answer: the query with QR set.
    async fn answer(s: &mut tokio::io::DuplexStream, mut q: Vec<u8>) {
        q[2] |= 0x80;
        let _ = s.write_u16(q.len() as u16).await;
        let _ = s.write_all(&q).await;
    }

    impl Connector for Fake {
        fn is_up(&self) -> bool {
            self.up.load(Ordering::Relaxed)
        }

        fn open(&self, _: SocketAddr, _: Duration) -> BoxFuture<'_, Option<Opened>> {
            let n = self.opens.fetch_add(1, Ordering::Relaxed);
            let behaviour = self.plan[n.min(self.plan.len() - 1)];
            let ids = self.wire_ids.clone();
            Box::pin(async move {
                if matches!(behaviour, Behaviour::Refuse) {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    return None;
                }
                let (client, mut server) = tokio::io::duplex(64 * 1024);
                tokio::spawn(async move {
                    let mut held = Vec::new();
                    let mut seen = 0;
                    while let Some(q) = read_query(&mut server).await {
                        seen += 1;
                        ids.lock().unwrap().push(wire::id(&q).unwrap());
                        match behaviour {
                            Behaviour::DropFirst | Behaviour::Refuse => return,
                            Behaviour::Silent => held.push(q),
                            Behaviour::Reverse(k) if seen < k => held.push(q),
                            Behaviour::Reverse(_) => {
                                held.push(q);
                                while let Some(q) = held.pop() {
                                    answer(&mut server, q).await;
                                }
                            }
                        }
                    }
                });
                Some(Opened {
                    stream: Box::new(client),
                    on_close: Box::new(|| {}),
                })
            })
        }
    }

    fn fake(plan: Vec<Behaviour>) -> Arc<Fake> {
        Arc::new(Fake {
            up: AtomicBool::new(true),
            opens: AtomicUsize::new(0),
            plan,
            wire_ids: Arc::new(Mutex::new(Vec::new())),
        })
    }

    fn tunnel(f: &Arc<Fake>, timeout: Duration) -> Arc<Tunnel> {
        Tunnel::with_connector(
            f.clone(),
            vec![([10, 0, 0, 2], 53).into(), ([10, 0, 0, 3], 53).into()],
            1,
            timeout,
        )
    }

    fn query(id: u16, name: &str) -> Vec<u8> {
        let mut b = id.to_be_bytes().to_vec();
        b.extend_from_slice(&[1, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
        for l in name.split('.') {
            b.push(l.len() as u8);
            b.extend_from_slice(l.as_bytes());
        }
        b.extend_from_slice(&[0, 0, 1, 0, 1]);
        b
    }

    #[tokio::test]
    async fn queries_share_one_channel_with_their_own_ids_and_answers_may_come_in_any_order() {
        let f = fake(vec![Behaviour::Reverse(3)]);
        let t = tunnel(&f, Duration::from_secs(2));
        // Three clients that all picked ID 7.
        let names = ["a.internal", "b.internal", "c.internal"];
        let answers = futures::future::join_all(names.iter().map(|n| {
            let t = t.clone();
            let q = query(7, n);
            async move { (q.clone(), t.query(&q).await) }
        }))
        .await;
        for (q, a) in answers {
            let a = a.expect("an answer");
            assert_eq!(wire::id(&a), Some(7), "the client's ID is given back");
            assert_eq!(
                &a[2..],
                &{
                    let mut e = q.clone();
                    e[2] |= 0x80;
                    e
                }[2..],
                "each client gets the answer to its own question"
            );
        }
        assert_eq!(f.opens.load(Ordering::Relaxed), 1, "one channel for all");
        let mut ids = f.wire_ids.lock().unwrap().clone();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 3, "distinct IDs on the wire");
        // The channel stays open for the next query.
        assert!(t.query(&query(9, "d.internal")).await.is_some());
        assert_eq!(f.opens.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn a_lost_channel_is_reopened_and_its_query_retried_once() {
        let f = fake(vec![Behaviour::DropFirst, Behaviour::Reverse(1)]);
        let t = tunnel(&f, Duration::from_secs(2));
        let a = t
            .query(&query(5, "x.internal"))
            .await
            .expect("answered on retry");
        assert_eq!(wire::id(&a), Some(5));
        assert_eq!(f.opens.load(Ordering::Relaxed), 2);
        // Twice lost: the query fails instead of looping.
        let f = fake(vec![Behaviour::DropFirst]);
        let t = tunnel(&f, Duration::from_secs(2));
        assert_eq!(t.query(&query(5, "x.internal")).await, None);
        assert_eq!(f.opens.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn a_silent_resolver_fails_the_query_in_time_and_the_channel_is_replaced() {
        let f = fake(vec![Behaviour::Silent, Behaviour::Reverse(1)]);
        let t = tunnel(&f, Duration::from_millis(200));
        let start = std::time::Instant::now();
        assert_eq!(t.query(&query(1, "x.internal")).await, None);
        assert!(
            start.elapsed() < Duration::from_millis(600),
            "{:?}",
            start.elapsed()
        );
        assert!(t.query(&query(2, "y.internal")).await.is_some());
        assert_eq!(
            f.opens.load(Ordering::Relaxed),
            2,
            "a new channel after the timeout"
        );
    }

    #[tokio::test]
    async fn after_a_failed_open_queries_fail_at_once_for_a_while() {
        let f = fake(vec![Behaviour::Refuse, Behaviour::Reverse(1)]);
        let t = tunnel(&f, Duration::from_secs(2));
        assert_eq!(t.query(&query(1, "x.internal")).await, None);
        let start = std::time::Instant::now();
        assert_eq!(t.query(&query(2, "x.internal")).await, None);
        assert!(
            start.elapsed() < Duration::from_millis(100),
            "{:?}",
            start.elapsed()
        );
        assert_eq!(
            f.opens.load(Ordering::Relaxed),
            1,
            "no second open during the hold-off"
        );
        tokio::time::sleep(OPEN_HOLDOFF).await;
        assert!(
            t.query(&query(3, "x.internal")).await.is_some(),
            "tried again after it"
        );
        assert_eq!(f.opens.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn queries_on_a_silent_channel_move_to_the_one_that_answers() {
        // A resolver serving one TCP connection at a time: the first channel is answered,
        // the second accepted and never served.
        let f = fake(vec![Behaviour::Reverse(1), Behaviour::Silent]);
        let t = Tunnel::with_connector(
            f.clone(),
            vec![([10, 0, 0, 2], 53).into()],
            2,
            Duration::from_secs(2),
        );
        assert!(
            t.query(&query(1, "a.internal")).await.is_some(),
            "first channel"
        );
        let start = std::time::Instant::now();
        let a = t.query(&query(2, "aaaa.internal")).await;
        assert_eq!(a.as_ref().and_then(|a| wire::id(a)), Some(2), "answered");
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "moved to the live channel in {:?}, not failed after the timeout",
            start.elapsed()
        );
        // The silent channel is passed over: the next queries go to the live one at once.
        for id in 3..6 {
            let start = std::time::Instant::now();
            assert!(t.query(&query(id, "b.internal")).await.is_some());
            assert!(start.elapsed() < STALL_AFTER, "{:?}", start.elapsed());
        }
        assert_eq!(f.opens.load(Ordering::Relaxed), 2, "no third channel");
    }

    #[tokio::test]
    async fn no_link_fails_at_once_without_opening() {
        let f = fake(vec![Behaviour::Reverse(1)]);
        f.up.store(false, Ordering::Relaxed);
        let t = tunnel(&f, Duration::from_secs(2));
        let start = std::time::Instant::now();
        assert_eq!(t.query(&query(1, "x.internal")).await, None);
        assert!(start.elapsed() < Duration::from_millis(50));
        assert_eq!(f.opens.load(Ordering::Relaxed), 0);
    }
}
