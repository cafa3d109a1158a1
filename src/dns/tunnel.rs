//! DNS-over-TCP to the VPC resolver through the tunnel: a few long-lived `direct-tcpip`
//! channels opened from the [`Pool`], each carrying many queries at once (pipelined, each
//! with an ID of its own so answers can come back in any order). A channel that fails is
//! re-opened for the next query; its queries in flight are retried once on a new channel.
//! When no SSH link is up, or the resolver does not answer in time, the query fails at once
//! (the responder answers SERVFAIL), so apps never hang on a dead tunnel.
//!
//! Only the responder calls this, and only for names inside the configured domains.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use russh::ChannelMsg;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::debug;

use super::wire;
use crate::pool::{LinkId, Pool};

/// Queries one channel carries at once; more wait in the worker's queue.
const MAX_IN_FLIGHT: usize = 256;
/// Queries waiting for a worker, per worker.
const QUEUE: usize = 512;
/// Largest DNS message over TCP.
const MAX_MESSAGE: usize = 65_535;

/// The tunnel side of the responder. See the module documentation.
pub struct Tunnel {
    workers: Vec<mpsc::Sender<Job>>,
    next: AtomicUsize,
    pool: Arc<Pool>,
    timeout: Duration,
}

/// One query waiting for its answer.
struct Job {
    query: Vec<u8>,
    reply: oneshot::Sender<Option<Vec<u8>>>,
    retried: bool,
}

impl Tunnel {
    /// Starts `channels` workers, each keeping one channel to one of `servers` (port 53 over
    /// TCP), rotating to the next server when one fails. A query not answered within
    /// `timeout` fails.
    pub fn spawn(
        pool: Arc<Pool>,
        servers: Vec<SocketAddr>,
        originator: SocketAddr,
        channels: usize,
        timeout: Duration,
    ) -> Arc<Tunnel> {
        let workers = (0..channels.max(1))
            .map(|i| {
                let (tx, rx) = mpsc::channel(QUEUE);
                let w = Worker {
                    pool: pool.clone(),
                    servers: servers.clone(),
                    server: i % servers.len().max(1),
                    originator,
                    timeout,
                    conn: None,
                    pending: HashMap::new(),
                    next_id: rand::random(),
                };
                tokio::spawn(w.run(rx));
                tx
            })
            .collect();
        Arc::new(Tunnel {
            workers,
            next: AtomicUsize::new(0),
            pool,
            timeout,
        })
    }

    /// Sends `query` to the VPC resolver; `None` when no link is up, the resolver cannot be
    /// reached, or it does not answer in time.
    pub async fn query(&self, query: &[u8]) -> Option<Vec<u8>> {
        if self.pool.connected() == 0 {
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
        let mut sent = false;
        for i in 0..n {
            match self.workers[(start + i) % n].try_send(job) {
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

/// One open channel: its write half, the frames its reader task decoded, and its link.
struct Conn {
    write: russh::ChannelWriteHalf<russh::client::Msg>,
    frames: mpsc::Receiver<Vec<u8>>,
    link: LinkId,
    reader: tokio::task::JoinHandle<()>,
}

struct Pending {
    orig_id: u16,
    job: Job,
    deadline: Instant,
}

struct Worker {
    pool: Arc<Pool>,
    servers: Vec<SocketAddr>,
    server: usize,
    originator: SocketAddr,
    timeout: Duration,
    conn: Option<Conn>,
    pending: HashMap<u16, Pending>,
    next_id: u16,
}

impl Worker {
    async fn run(mut self, mut jobs: mpsc::Receiver<Job>) {
        loop {
            let next_deadline = self.pending.values().map(|p| p.deadline).min();
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
            }
        }
        self.close();
    }

    /// Sends one query on the channel, opening one first if needed.
    async fn send(&mut self, job: Job) {
        if self.conn.is_none() {
            if self.pool.connected() == 0 || self.servers.is_empty() {
                let _ = job.reply.send(None);
                return;
            }
            let server = self.servers[self.server];
            match self.pool.open(server, self.originator, self.timeout).await {
                Ok((link, channel)) => {
                    debug!(%server, "DNS channel to the VPC resolver opened");
                    let (read, write) = channel.split();
                    let (tx, frames) = mpsc::channel(64);
                    let reader = tokio::spawn(read_frames(read, tx));
                    self.conn = Some(Conn {
                        write,
                        frames,
                        link,
                        reader,
                    });
                }
                Err(e) => {
                    debug!(%server, error = %e, "cannot open a DNS channel");
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
        self.pending.insert(
            id,
            Pending {
                orig_id,
                job,
                deadline: Instant::now() + self.timeout,
            },
        );
        let written = match &self.conn {
            Some(c) => c.write.data_bytes(framed).await.is_ok(),
            None => false,
        };
        if !written {
            Box::pin(self.lost("writing to the channel failed")).await;
        }
    }

    fn answer(&mut self, mut resp: Vec<u8>) {
        let Some(id) = wire::id(&resp) else { return };
        if let Some(p) = self.pending.remove(&id) {
            wire::set_id(&mut resp, p.orig_id);
            let _ = p.job.reply.send(Some(resp));
        }
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
            self.pool.release(c.link);
            tokio::spawn(async move {
                let _ = c.write.close().await;
            });
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

/// Drains the channel (always, so it never stalls the SSH connection) and decodes
/// length-prefixed DNS messages; ends on EOF, close, or a malformed stream.
async fn read_frames(mut read: russh::ChannelReadHalf, tx: mpsc::Sender<Vec<u8>>) {
    let mut buf = BytesMut::new();
    while let Some(msg) = read.wait().await {
        match msg {
            ChannelMsg::Data { data } => buf.extend_from_slice(&data),
            ChannelMsg::Eof | ChannelMsg::Close => break,
            _ => continue,
        }
        while buf.len() >= 2 {
            let len = u16::from_be_bytes([buf[0], buf[1]]) as usize;
            if buf.len() < 2 + len {
                break;
            }
            buf.advance(2);
            let frame = buf.split_to(len).to_vec();
            if wire::is_response(&frame) && tx.send(frame).await.is_err() {
                return;
            }
        }
        if buf.len() > MAX_MESSAGE + 2 {
            return;
        }
    }
}
