//! Split DNS: a small DNS responder on the TUN's own address (UDP and TCP port 53). Queries
//! for names inside the `--dns-domain`s (and PTR queries for the routed CIDRs) go to the
//! VPC's resolver as DNS-over-TCP through the tunnel ([`tunnel`]); every other query goes,
//! byte for byte, to the host's original nameservers over plain UDP/TCP from this host, never
//! into the tunnel. The host's resolver configuration is pointed at the responder by the
//! platform crate (systemd-resolved per-link routing domains, or the resolv.conf fallback).
//!
//! ```text
//!  app ─▶ libc / resolved ─▶ 198.18.0.1:53 (Responder) ─┬─ in a --dns-domain ─▶ Tunnel ─▶ SSH
//!                                                       │    direct-tcpip ─▶ VPC resolver:53
//!                                                       └─ otherwise ─▶ original nameservers
//! ```
//!
//! [`wire`] and [`zones`] are sans-IO (bytes in, decisions out); this file and [`tunnel`] do
//! the I/O. The TUN address is local to the kernel, so packets to the responder never enter
//! the TUN and the engine is not involved.

pub mod tunnel;
pub mod wire;
pub mod zones;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What split DNS a session serves: the domains sent to the VPC (none: DNS is not touched),
/// and the VPC resolvers (none: the jump host's own, read over SSH).
#[derive(Clone, Debug, Default)]
pub struct DnsSettings {
    /// `--dns-domain`s.
    pub domains: Vec<DnsDomain>,
    /// `--dns` resolvers.
    pub servers: Vec<IpAddr>,
}

impl DnsSettings {
    /// True when the session does split DNS.
    pub fn enabled(&self) -> bool {
        !self.domains.is_empty()
    }
}
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{Semaphore, watch};
use tracing::debug;

pub use tunnel::Tunnel;
pub use zones::{DnsDomain, Split};

use wire::{Query, RCODE_REFUSED, RCODE_SERVFAIL};

/// How long an answer may take, through the tunnel or from an original nameserver.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(2);
/// Channels kept open to the VPC resolver.
pub const TUNNEL_CHANNELS: usize = 2;
/// Queries handled at once (UDP and TCP together); beyond it, UDP queries get SERVFAIL.
const MAX_CONCURRENT: usize = 1024;
/// Sockets open at once towards the original nameservers (one per query in flight): a flood
/// of queries while those nameservers are silent must not take every descriptor of the
/// process (reconnecting to the jump host needs some). Beyond it, queries get SERVFAIL.
const MAX_UPSTREAM_SOCKETS: usize = 128;
/// TCP client connections at once. When all are taken, the longest-idle one is closed to
/// make room, so idle connections cannot lock real queries out.
const MAX_TCP_CLIENTS: usize = 64;
/// New TCP connections waiting for an idle one to make room; more are closed at once.
const MAX_TCP_WAITING: usize = 16;
/// How long a new TCP connection waits for room.
const TCP_ROOM_WAIT: Duration = Duration::from_secs(1);
/// An idle TCP client connection is closed after this long.
const TCP_IDLE: Duration = Duration::from_secs(10);
/// An answer to a TCP client must be written within this long, or the connection is closed:
/// a client that stops reading would otherwise hold its slot for good.
const TCP_WRITE: Duration = Duration::from_secs(10);

/// Failures of the DNS responder's setup. Messages say what to do.
#[derive(Debug, Error)]
pub enum DnsError {
    /// The responder's port is taken or the address is not ours.
    #[error(
        "cannot listen for DNS on {addr}: {source}. Another DNS server bound to port 53 of all addresses, or another mse-vpn session with --dns-domain, holds it: stop that one, or bind it to specific addresses"
    )]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// `--dns-domain` without `--dns`, and the jump host's resolver could not be read.
    #[error(
        "--dns-domain needs the VPC's resolver: none was given with --dns and none could be read from the jump host's /etc/resolv.conf ({why}); pass --dns ADDR (e.g. the VPC's .2 address)"
    )]
    NoResolver {
        /// What went wrong.
        why: &'static str,
    },
    /// The host's resolver configuration could not be pointed at the responder.
    #[error(transparent)]
    Host(#[from] mse_vpn_platform::PlatformError),
}

/// Query counters, shared between the responder and `status`.
#[derive(Debug, Default)]
pub struct DnsCounters {
    /// Answered by the VPC resolver through the tunnel.
    pub via_tunnel: AtomicU64,
    /// Answered by the host's original nameservers.
    pub via_upstream: AtomicU64,
    /// Answered SERVFAIL (tunnel down, resolver silent, original nameservers silent).
    pub servfail: AtomicU64,
    /// Answered REFUSED (a name outside the domains with no original nameserver to ask).
    pub refused: AtomicU64,
    /// UDP answers cut to the client's size limit with TC set.
    pub truncated: AtomicU64,
}

/// The `dns` object of `status --json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsStatus {
    /// How the host resolver was pointed at the responder: `resolved` or `resolv.conf`.
    pub mode: String,
    /// The responder's address.
    pub listen: String,
    /// The VPC resolvers used through the tunnel.
    pub servers: Vec<String>,
    /// Zones routed to the VPC resolver (domains, then reverse zones).
    pub domains: Vec<String>,
    /// The original nameservers other names go to (empty with resolved).
    pub upstream: Vec<String>,
    /// Queries answered through the tunnel.
    pub via_tunnel: u64,
    /// Queries answered by the original nameservers.
    pub via_upstream: u64,
    /// SERVFAIL answers.
    pub servfail: u64,
    /// REFUSED answers.
    pub refused: u64,
    /// Truncated UDP answers.
    pub truncated: u64,
}

impl DnsStatus {
    /// Fills the counters from `c`.
    pub fn with_counters(mut self, c: &DnsCounters) -> DnsStatus {
        self.via_tunnel = c.via_tunnel.load(Ordering::Relaxed);
        self.via_upstream = c.via_upstream.load(Ordering::Relaxed);
        self.servfail = c.servfail.load(Ordering::Relaxed);
        self.refused = c.refused.load(Ordering::Relaxed);
        self.truncated = c.truncated.load(Ordering::Relaxed);
        self
    }
}

/// Everything the responder needs.
pub struct ResponderConfig {
    /// Where to listen (the TUN's IPv4 address, port 53).
    pub listen: SocketAddr,
    /// Which names go through the tunnel.
    pub split: Split,
    /// The original nameservers for every other name (empty: answer REFUSED).
    pub upstream: Vec<SocketAddr>,
}

/// The bound responder.
pub struct Responder {
    udp: Arc<UdpSocket>,
    tcp: TcpListener,
    ctx: Arc<Ctx>,
}

struct Ctx {
    split: Split,
    upstream: Vec<SocketAddr>,
    tunnel: Arc<Tunnel>,
    counters: Arc<DnsCounters>,
    busy: Semaphore,
    /// Sockets to the original nameservers ([`MAX_UPSTREAM_SOCKETS`]).
    upstream_sockets: Semaphore,
    /// Wakes the longest-idle TCP client so that it closes (room for a new one).
    evict: tokio::sync::Notify,
    /// [`TCP_WRITE`] (shorter in tests).
    tcp_write: Duration,
}

/// With port 0, how many more UDP ports [`Responder::bind`] tries when TCP cannot have the
/// same one.
const PAIR_TRIES: u32 = 32;

impl Responder {
    /// Binds UDP and TCP on `config.listen`.
    pub async fn bind(
        config: ResponderConfig,
        tunnel: Arc<Tunnel>,
        counters: Arc<DnsCounters>,
    ) -> Result<Responder, DnsError> {
        let bind_err = |source| DnsError::Bind {
            addr: config.listen,
            source,
        };
        // Port 0 (`run`, tests): TCP on the port UDP got. That port may be one a TCP socket
        // holds (a connection's local port, one in TIME-WAIT): then another pair is tried.
        let mut tries = 0;
        let (udp, tcp) = loop {
            let udp = UdpSocket::bind(config.listen).await.map_err(bind_err)?;
            let listen = udp.local_addr().map_err(bind_err)?;
            match TcpListener::bind(listen).await {
                Ok(tcp) => break (udp, tcp),
                Err(e)
                    if config.listen.port() == 0
                        && e.kind() == std::io::ErrorKind::AddrInUse
                        && tries < PAIR_TRIES =>
                {
                    tries += 1;
                }
                Err(e) => return Err(bind_err(e)),
            }
        };
        Ok(Responder {
            udp: Arc::new(udp),
            tcp,
            ctx: Arc::new(Ctx {
                split: config.split,
                upstream: config.upstream,
                tunnel,
                counters,
                busy: Semaphore::new(MAX_CONCURRENT),
                upstream_sockets: Semaphore::new(MAX_UPSTREAM_SOCKETS),
                evict: tokio::sync::Notify::new(),
                tcp_write: TCP_WRITE,
            }),
        })
    }

    /// Answers to TCP clients must be written within `limit` (tests shorten [`TCP_WRITE`]).
    #[cfg(test)]
    fn with_tcp_write(mut self, limit: Duration) -> Responder {
        if let Some(ctx) = Arc::get_mut(&mut self.ctx) {
            ctx.tcp_write = limit;
        }
        self
    }

    /// Its query counters.
    pub fn counters(&self) -> Arc<DnsCounters> {
        self.ctx.counters.clone()
    }

    /// The address it listens on (UDP and TCP).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.udp.local_addr()
    }

    /// Answers queries until `stop` turns true.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let tcp_clients = Arc::new(Semaphore::new(MAX_TCP_CLIENTS));
        let tcp_waiting = Arc::new(Semaphore::new(MAX_TCP_WAITING));
        let mut buf = vec![0u8; 65_535];
        loop {
            // Out of descriptors: pause (the listener stays readable; retrying at once would
            // spin). Outside `select!`, whose other futures are still alive in a branch.
            let mut pause = None;
            tokio::select! {
                _ = stop.wait_for(|s| *s) => break,
                r = self.udp.recv_from(&mut buf) => {
                    let Ok((n, peer)) = r else { continue };
                    self.udp_query(buf[..n].to_vec(), peer);
                }
                r = self.tcp.accept() => match r {
                    Ok((stream, peer)) => self.tcp_start(stream, peer, &tcp_clients, &tcp_waiting),
                    Err(e) => {
                        debug!(error = %e, "DNS-over-TCP accept failed");
                        pause = crate::fds::accept_pause(&e);
                    }
                },
            }
            if let Some(pause) = pause {
                tokio::time::sleep(pause).await;
            }
        }
        debug!("DNS responder stopped");
    }

    /// Serves a new DNS-over-TCP client. When [`MAX_TCP_CLIENTS`] are connected, the
    /// longest-idle one is told to close and the new one waits for its slot (at most
    /// [`MAX_TCP_WAITING`] wait; more are closed at once).
    fn tcp_start(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
        clients: &Arc<Semaphore>,
        waiting: &Arc<Semaphore>,
    ) {
        let permit = match clients.clone().try_acquire_owned() {
            Ok(p) => Ok(p),
            Err(_) => match waiting.clone().try_acquire_owned() {
                Ok(w) => {
                    self.ctx.evict.notify_one();
                    Err(w)
                }
                Err(_) => {
                    debug!(%peer, "too many DNS-over-TCP clients: closing");
                    return;
                }
            },
        };
        let ctx = self.ctx.clone();
        let clients = clients.clone();
        tokio::spawn(async move {
            let _permit = match permit {
                Ok(p) => p,
                Err(_waiting) => {
                    match tokio::time::timeout(TCP_ROOM_WAIT, clients.acquire_owned()).await {
                        Ok(Ok(p)) => p,
                        _ => return,
                    }
                }
            };
            let _ = tcp_client(stream, &ctx).await;
        });
    }

    fn udp_query(&self, raw: Vec<u8>, peer: SocketAddr) {
        let Ok(query) = Query::parse(&raw) else {
            debug!(%peer, "ignoring a malformed DNS query");
            return;
        };
        let sock = self.udp.clone();
        let ctx = self.ctx.clone();
        let Ok(permit) = ctx.busy.try_acquire() else {
            // Busy: answered at once from this loop, without a task per query (a flood
            // would spawn one per datagram); an answer the socket has no room for is
            // dropped, as UDP may.
            let answer = wire::error_answer(&raw, &query, RCODE_SERVFAIL);
            ctx.counters.servfail.fetch_add(1, Ordering::Relaxed);
            let _ = sock.try_send_to(&answer, peer);
            return;
        };
        permit.forget();
        tokio::spawn(async move {
            let answer = ctx.resolve(&raw, &query, false).await;
            ctx.busy.add_permits(1);
            let len = answer.len();
            let answer = wire::truncate_for_udp(answer, query.udp_limit);
            if answer.len() < len {
                ctx.counters.truncated.fetch_add(1, Ordering::Relaxed);
            }
            let _ = sock.send_to(&answer, peer).await;
        });
    }
}

/// One DNS-over-TCP client: length-prefixed queries, answered in order.
async fn tcp_client(mut stream: TcpStream, ctx: &Ctx) -> std::io::Result<()> {
    loop {
        let mut len = [0u8; 2];
        // Idle: waiting for the next query, first in line to make room for a new client.
        tokio::select! {
            r = tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut len)) => match r {
                Ok(Ok(_)) => {}
                _ => return Ok(()),
            },
            () = ctx.evict.notified() => return Ok(()),
        }
        let mut raw = vec![0u8; u16::from_be_bytes(len) as usize];
        tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut raw))
            .await
            .map_err(|_| std::io::ErrorKind::TimedOut)??;
        let Ok(query) = Query::parse(&raw) else {
            return Ok(());
        };
        let answer = {
            let _permit = ctx.busy.acquire().await;
            ctx.resolve(&raw, &query, true).await
        };
        let mut out = Vec::with_capacity(answer.len() + 2);
        out.extend_from_slice(&(answer.len() as u16).to_be_bytes());
        out.extend_from_slice(&answer);
        tokio::time::timeout(ctx.tcp_write, stream.write_all(&out))
            .await
            .map_err(|_| std::io::ErrorKind::TimedOut)??;
    }
}

impl Ctx {
    /// The answer to one query (never fails: errors become SERVFAIL / REFUSED).
    async fn resolve(&self, raw: &[u8], query: &Query, tcp: bool) -> Vec<u8> {
        let c = &self.counters;
        if self.split.via_tunnel(&query.name) {
            debug!(name = %query.name, qtype = query.qtype, "DNS query through the tunnel");
            return match self.tunnel.query(raw).await {
                Some(a) => {
                    c.via_tunnel.fetch_add(1, Ordering::Relaxed);
                    a
                }
                None => {
                    c.servfail.fetch_add(1, Ordering::Relaxed);
                    wire::error_answer(raw, query, RCODE_SERVFAIL)
                }
            };
        }
        if self.upstream.is_empty() {
            c.refused.fetch_add(1, Ordering::Relaxed);
            return wire::error_answer(raw, query, RCODE_REFUSED);
        }
        // One socket per query in flight: bounded, or a flood takes every descriptor.
        let Ok(_socket) = self.upstream_sockets.try_acquire() else {
            debug!("too many queries to the original nameservers in flight: SERVFAIL");
            c.servfail.fetch_add(1, Ordering::Relaxed);
            return wire::error_answer(raw, query, RCODE_SERVFAIL);
        };
        for server in &self.upstream {
            let answer = if tcp {
                upstream_tcp(*server, raw).await
            } else {
                upstream_udp(*server, raw).await
            };
            match answer {
                Ok(a) => {
                    c.via_upstream.fetch_add(1, Ordering::Relaxed);
                    return a;
                }
                Err(e) => debug!(%server, error = %e, "original nameserver did not answer"),
            }
        }
        c.servfail.fetch_add(1, Ordering::Relaxed);
        wire::error_answer(raw, query, RCODE_SERVFAIL)
    }
}

fn timed_out() -> std::io::Error {
    std::io::ErrorKind::TimedOut.into()
}

/// One query to an original nameserver over UDP (the answer must carry the query's ID).
async fn upstream_udp(server: SocketAddr, raw: &[u8]) -> std::io::Result<Vec<u8>> {
    let local: SocketAddr = match server {
        SocketAddr::V4(_) => (IpAddr::from([0, 0, 0, 0]), 0).into(),
        SocketAddr::V6(_) => (IpAddr::from([0u16; 8]), 0).into(),
    };
    let sock = UdpSocket::bind(local).await?;
    sock.connect(server).await?;
    sock.send(raw).await?;
    let want = wire::id(raw);
    let mut buf = vec![0u8; 65_535];
    let deadline = tokio::time::Instant::now() + QUERY_TIMEOUT;
    loop {
        let n = tokio::time::timeout_at(deadline, sock.recv(&mut buf))
            .await
            .map_err(|_| timed_out())??;
        if wire::is_response(&buf[..n]) && wire::id(&buf[..n]) == want {
            return Ok(buf[..n].to_vec());
        }
    }
}

/// One query to an original nameserver over TCP.
async fn upstream_tcp(server: SocketAddr, raw: &[u8]) -> std::io::Result<Vec<u8>> {
    let work = async {
        let mut s = TcpStream::connect(server).await?;
        let mut out = Vec::with_capacity(raw.len() + 2);
        out.extend_from_slice(&(raw.len() as u16).to_be_bytes());
        out.extend_from_slice(raw);
        s.write_all(&out).await?;
        let mut len = [0u8; 2];
        s.read_exact(&mut len).await?;
        let mut answer = vec![0u8; u16::from_be_bytes(len) as usize];
        s.read_exact(&mut answer).await?;
        if wire::id(&answer) != wire::id(raw) {
            return Err(std::io::ErrorKind::InvalidData.into());
        }
        Ok(answer)
    };
    tokio::time::timeout(QUERY_TIMEOUT, work)
        .await
        .map_err(|_| timed_out())?
}

/// The first nameserver of a jump host's resolv.conf text that is not loopback: a local stub
/// (127.0.0.53) is the jump host's own cache; the address behind it is the VPC resolver.
pub fn pick_discovered(resolv_conf: &str) -> Option<IpAddr> {
    mse_vpn_platform::dns::nameservers(resolv_conf)
        .into_iter()
        .find(|a| !a.is_loopback() && !a.is_unspecified())
}

/// Reads the jump host's resolver by running `cat /etc/resolv.conf` on one SSH session.
pub async fn discover(session: &crate::ssh::Session) -> Result<IpAddr, DnsError> {
    let text = session
        .exec("cat /etc/resolv.conf", QUERY_TIMEOUT * 3)
        .await
        .ok_or(DnsError::NoResolver {
            why: "running `cat /etc/resolv.conf` on the jump host failed",
        })?;
    let found = pick_discovered(&text).ok_or(DnsError::NoResolver {
        why: "it lists no non-loopback nameserver",
    })?;
    debug!(resolver = %found, "no --dns given: using the jump host's resolver");
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::Pool;

    /// A query for `name` (type A), with an EDNS0 OPT record of `edns` bytes if given.
    fn query(id: u16, name: &str, edns: Option<u16>) -> Vec<u8> {
        let mut b = id.to_be_bytes().to_vec();
        b.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, u8::from(edns.is_some())]);
        for label in name.split('.') {
            b.push(label.len() as u8);
            b.extend_from_slice(label.as_bytes());
        }
        b.extend_from_slice(&[0, 0, 1, 0, 1]);
        if let Some(size) = edns {
            b.extend_from_slice(&[0, 0, 41]);
            b.extend_from_slice(&size.to_be_bytes());
            b.extend_from_slice(&[0; 6]);
        }
        b
    }

    /// The fake original nameserver's answer: the query as a response plus `extra` bytes of
    /// answer data (one TXT-like record), so sizes are controlled.
    fn fake_answer(q: &[u8], extra: usize) -> Vec<u8> {
        let parsed = Query::parse(q).unwrap();
        let mut a = q[..parsed.question_end].to_vec();
        a[2] |= 0x80;
        a[7] = 1;
        a.extend_from_slice(&[0xc0, 12, 0, 16, 0, 1, 0, 0, 0, 60]);
        a.extend_from_slice(&(extra as u16).to_be_bytes());
        a.extend(std::iter::repeat_n(b'x', extra));
        a
    }

    /// A fake original nameserver (UDP and TCP on one port): names starting with "big"
    /// get a 3000-byte answer, "huge" a 60,000-byte one, others 20 bytes.
    async fn fake_upstream() -> SocketAddr {
        // UDP picks a free port; TCP may already use that number (Wine hit it): pick again.
        let mut tries = 0;
        let (udp, addr, tcp) = loop {
            let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let addr = udp.local_addr().unwrap();
            match TcpListener::bind(addr).await {
                Ok(tcp) => break (udp, addr, tcp),
                Err(e) if tries < 50 => {
                    tries += 1;
                    let _ = e;
                }
                Err(e) => panic!("no port free for both UDP and TCP: {e}"),
            }
        };
        let size = |q: &[u8]| {
            let name = Query::parse(q).unwrap().name;
            if name.starts_with("big") {
                3000
            } else if name.starts_with("huge") {
                60_000
            } else {
                20
            }
        };
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            while let Ok((n, peer)) = udp.recv_from(&mut buf).await {
                let a = fake_answer(&buf[..n], size(&buf[..n]));
                let _ = udp.send_to(&a, peer).await;
            }
        });
        tokio::spawn(async move {
            while let Ok((mut s, _)) = tcp.accept().await {
                let mut len = [0u8; 2];
                s.read_exact(&mut len).await.unwrap();
                let mut q = vec![0u8; u16::from_be_bytes(len) as usize];
                s.read_exact(&mut q).await.unwrap();
                let a = fake_answer(&q, size(&q));
                s.write_all(&(a.len() as u16).to_be_bytes()).await.unwrap();
                s.write_all(&a).await.unwrap();
            }
        });
        addr
    }

    /// A responder with no SSH link up, running until the returned sender is dropped.
    async fn responder(
        upstream: Vec<SocketAddr>,
    ) -> (SocketAddr, Arc<DnsCounters>, watch::Sender<bool>) {
        responder_with(upstream, TCP_WRITE).await
    }

    /// [`responder`] whose TCP answers must be written within `tcp_write`.
    async fn responder_with(
        upstream: Vec<SocketAddr>,
        tcp_write: Duration,
    ) -> (SocketAddr, Arc<DnsCounters>, watch::Sender<bool>) {
        let pool = Pool::new(1); // no SSH link is up
        let tunnel = Tunnel::spawn(
            pool,
            vec![([10, 0, 0, 2], 53).into()],
            ([127, 0, 0, 1], 53).into(),
            1,
            QUERY_TIMEOUT,
        );
        let counters = Arc::new(DnsCounters::default());
        let r = Responder::bind(
            ResponderConfig {
                listen: ([127, 0, 0, 1], 0).into(),
                split: Split::new(vec!["internal".parse().unwrap()], &[]),
                upstream,
            },
            tunnel,
            counters.clone(),
        )
        .await
        .unwrap()
        .with_tcp_write(tcp_write);
        let addr = r.local_addr().unwrap();
        let (tx, rx) = watch::channel(false);
        tokio::spawn(r.run(rx));
        (addr, counters, tx)
    }

    async fn ask_udp(server: SocketAddr, q: &[u8]) -> Vec<u8> {
        let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        s.send_to(q, server).await.unwrap();
        let mut buf = vec![0u8; 65_535];
        let n = tokio::time::timeout(Duration::from_secs(3), s.recv(&mut buf))
            .await
            .expect("an answer")
            .unwrap();
        buf.truncate(n);
        buf
    }

    #[tokio::test]
    async fn split_names_fail_fast_without_a_link_others_are_relayed_and_truncated() {
        let upstream = fake_upstream().await;
        let (addr, counters, _stop) = responder(vec![upstream]).await;

        let t = std::time::Instant::now();
        let a = ask_udp(addr, &query(1, "api.internal", None)).await;
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(a[3] & 0x0f, RCODE_SERVFAIL);
        assert_eq!(wire::id(&a), Some(1));

        let q = query(2, "www.example.org", None);
        assert_eq!(
            ask_udp(addr, &q).await,
            fake_answer(&q, 20),
            "relayed byte for byte"
        );

        // 3000 bytes: too big for a classic (512) or a 1232-byte EDNS client, fine for 4096.
        let big = ask_udp(addr, &query(3, "big.example.org", None)).await;
        assert_eq!(big[2] & 0x02, 0x02, "TC");
        assert!(big.len() <= 512);
        let big = ask_udp(addr, &query(4, "big.example.org", Some(1232))).await;
        assert_eq!(big[2] & 0x02, 0x02, "TC");
        let q = query(5, "big.example.org", Some(4096));
        assert_eq!(ask_udp(addr, &q).await, fake_answer(&q, 3000));

        // Garbage gets no answer and does not disturb the responder.
        let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        s.send_to(&[0xff; 7], addr).await.unwrap();
        s.send_to(&[0x00; 40], addr).await.unwrap();
        let q = query(6, "www.example.org", None);
        assert_eq!(ask_udp(addr, &q).await, fake_answer(&q, 20));

        // TCP: the whole big answer, and several queries on one connection.
        let mut c = TcpStream::connect(addr).await.unwrap();
        for id in [7u16, 8] {
            let q = query(id, "big.example.org", None);
            c.write_all(&(q.len() as u16).to_be_bytes()).await.unwrap();
            c.write_all(&q).await.unwrap();
            let mut len = [0u8; 2];
            c.read_exact(&mut len).await.unwrap();
            let mut a = vec![0u8; u16::from_be_bytes(len) as usize];
            c.read_exact(&mut a).await.unwrap();
            assert_eq!(a, fake_answer(&q, 3000));
        }

        assert_eq!(counters.servfail.load(Ordering::Relaxed), 1);
        assert_eq!(counters.via_upstream.load(Ordering::Relaxed), 7);
        assert_eq!(counters.truncated.load(Ordering::Relaxed), 2);
        assert_eq!(counters.via_tunnel.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn port_0_gets_a_port_free_for_both_udp_and_tcp() {
        // TCP listeners hold 800 ports of the range UDP picks from (about 3 % of Linux's):
        // without trying again, 300 binds would all get a UDP port whose TCP twin is free
        // with a chance of 0.97^300, under 0.1 %.
        let held: Vec<std::net::TcpListener> = (0..800)
            .filter_map(|_| std::net::TcpListener::bind("127.0.0.1:0").ok())
            .collect();
        let taken: std::collections::HashSet<u16> = held
            .iter()
            .map(|l| l.local_addr().unwrap().port())
            .collect();
        let tunnel = Tunnel::spawn(
            Pool::new(1),
            vec![([10, 0, 0, 2], 53).into()],
            ([127, 0, 0, 1], 53).into(),
            1,
            QUERY_TIMEOUT,
        );
        for _ in 0..300 {
            let r = Responder::bind(
                ResponderConfig {
                    listen: ([127, 0, 0, 1], 0).into(),
                    split: Split::new(vec!["internal".parse().unwrap()], &[]),
                    upstream: Vec::new(),
                },
                tunnel.clone(),
                Arc::new(DnsCounters::default()),
            )
            .await
            .expect("a port free for both");
            let port = r.local_addr().unwrap().port();
            assert!(!taken.contains(&port), "{port} is a held TCP port");
            assert_eq!(
                r.tcp.local_addr().unwrap().port(),
                port,
                "one port for both"
            );
        }
    }

    #[tokio::test]
    async fn without_original_nameservers_outside_names_are_refused() {
        let (addr, counters, _stop) = responder(Vec::new()).await;
        let a = ask_udp(addr, &query(9, "www.example.org", None)).await;
        assert_eq!(a[3] & 0x0f, RCODE_REFUSED);
        assert_eq!(counters.refused.load(Ordering::Relaxed), 1);
    }

    /// One query over a new TCP connection; `None` if the responder closed it instead.
    async fn ask_tcp(server: SocketAddr, q: &[u8]) -> Option<Vec<u8>> {
        let mut c = TcpStream::connect(server).await.ok()?;
        c.write_all(&(q.len() as u16).to_be_bytes()).await.ok()?;
        c.write_all(q).await.ok()?;
        let mut len = [0u8; 2];
        c.read_exact(&mut len).await.ok()?;
        let mut a = vec![0u8; u16::from_be_bytes(len) as usize];
        c.read_exact(&mut a).await.ok()?;
        Some(a)
    }

    #[tokio::test]
    async fn idle_tcp_clients_make_room_for_a_real_query() {
        let upstream = fake_upstream().await;
        let (addr, _, _stop) = responder(vec![upstream]).await;
        let mut idle = Vec::new();
        for _ in 0..MAX_TCP_CLIENTS + MAX_TCP_WAITING + 8 {
            idle.push(TcpStream::connect(addr).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let q = query(11, "www.example.org", None);
        let a = tokio::time::timeout(Duration::from_secs(3), ask_tcp(addr, &q))
            .await
            .expect("in time");
        assert_eq!(
            a,
            Some(fake_answer(&q, 20)),
            "answered despite the idle clients"
        );
    }

    /// A DNS-over-TCP client that sends queries and stops reading is closed once an answer
    /// cannot be written within the deadline, instead of holding its slot for good.
    #[tokio::test]
    async fn a_tcp_client_that_stops_reading_is_closed_at_the_write_deadline() {
        // 200 answers of 60 KB: far more than the sockets between them can buffer.
        const QUERIES: u16 = 200;
        let upstream = fake_upstream().await;
        let (addr, _, _stop) = responder_with(vec![upstream], Duration::from_millis(300)).await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        for id in 0..QUERIES {
            let q = query(id, "huge.example.org", None);
            c.write_all(&(q.len() as u16).to_be_bytes()).await.unwrap();
            c.write_all(&q).await.unwrap();
        }
        // The client reads nothing for a while: the responder's writes stall, then it gives
        // up on the client.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let mut got = Vec::new();
        let ended = tokio::time::timeout(TCP_IDLE / 2, c.read_to_end(&mut got)).await;
        assert!(
            ended.is_ok(),
            "the connection was still open after the write deadline ({} bytes read)",
            got.len()
        );
        assert!(
            got.len() < usize::from(QUERIES) * 60_000,
            "every answer was written ({} bytes)",
            got.len()
        );
    }

    /// Queries beyond what the responder handles at once are answered SERVFAIL at once.
    #[tokio::test]
    async fn queries_beyond_the_concurrency_bound_get_servfail_at_once() {
        let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let (addr, counters, _stop) = responder(vec![silent.local_addr().unwrap()]).await;
        let client = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        // To a silent nameserver: each query holds a permit for the query timeout (the
        // descriptor bound answers some at once too).
        for id in 0..MAX_CONCURRENT as u16 + 32 {
            let q = query(id, "www.example.org", None);
            client.send_to(&q, addr).await.unwrap();
        }
        let mut buf = vec![0u8; 512];
        let mut fast = 0;
        while let Ok(Ok(_)) = tokio::time::timeout(QUERY_TIMEOUT / 4, client.recv(&mut buf)).await {
            assert_eq!(buf[3] & 0x0f, RCODE_SERVFAIL);
            fast += 1;
        }
        assert!(fast >= 32, "{fast} fast answers");
        assert!(counters.servfail.load(Ordering::Relaxed) >= 32);
        drop(silent);
    }

    #[tokio::test]
    async fn silent_original_nameservers_cannot_take_every_descriptor() {
        // A nameserver that never answers: each query holds its socket for QUERY_TIMEOUT.
        let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let (addr, counters, _stop) = responder(vec![silent.local_addr().unwrap()]).await;
        let flood = MAX_UPSTREAM_SOCKETS + 64;
        let client = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        for id in 0..flood {
            let q = query(id as u16, "www.example.org", None);
            client.send_to(&q, addr).await.unwrap();
        }
        // Beyond the bound, queries fail at once instead of opening more sockets.
        let mut fast = 0;
        let mut buf = vec![0u8; 512];
        while let Ok(Ok(_)) = tokio::time::timeout(QUERY_TIMEOUT / 4, client.recv(&mut buf)).await {
            assert_eq!(buf[3] & 0x0f, RCODE_SERVFAIL);
            fast += 1;
        }
        assert!(fast >= flood - MAX_UPSTREAM_SOCKETS, "{fast} fast answers");
        assert!(counters.servfail.load(Ordering::Relaxed) >= fast as u64);
        drop(silent);
    }

    #[test]
    fn discovery_skips_loopback_stubs() {
        let conf = "# generated\nnameserver 127.0.0.53\nnameserver ::1\nsearch ec2.internal\nnameserver 10.0.0.2\nnameserver 10.0.0.3\n";
        assert_eq!(pick_discovered(conf), Some("10.0.0.2".parse().unwrap()));
        assert_eq!(pick_discovered("nameserver 127.0.0.1\n"), None);
        assert_eq!(pick_discovered(""), None);
    }
}
