//! The direct path's host UDP sockets (`mse-vpn run`), and its ICMP sockets for pings: one
//! connected socket per association of the relay's NAT table ([`crate::relay::UdpNat`]),
//! opened, written and closed as the relay commands ([`UdpOp`]) and read when their wakers
//! put them on the driver's [`Ready`] list. Owns no policy: which datagram goes where, how
//! long an association lives and which one makes room are the relay's; a datagram the
//! socket has no room for is dropped, as UDP may.

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use bytes::Bytes;
use socket2::{Domain, Protocol, Type};
use tokio::io::ReadBuf;
use tokio::net::UdpSocket;
use tracing::debug;

use crate::channel::Ready;
use crate::relay::{UdpEvent, UdpId, UdpOp};

/// Datagrams read from one socket before the driver turns to the next (fairness).
const PER_SOCKET: usize = 16;
/// Datagrams read per turn of the driver, from all sockets (bounds what a turn writes to
/// the TUN).
pub const PER_TURN: usize = 64;
/// The largest datagram read (the largest IPv6 UDP payload fits).
const MAX_DATAGRAM: usize = 65_535;

/// See the module documentation.
pub struct UdpSockets {
    sockets: HashMap<UdpId, Socket>,
    ready: Arc<Ready>,
    /// Read buffer (allocated with the first socket).
    buf: Vec<u8>,
}

struct Socket {
    socket: UdpSocket,
    waker: Waker,
}

/// The waker of one socket: puts it on the driver's list.
struct UdpWaker {
    id: UdpId,
    ready: Arc<Ready>,
}

impl Wake for UdpWaker {
    fn wake(self: Arc<Self>) {
        self.ready.push_udp(self.id);
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.ready.push_udp(self.id);
    }
}

impl UdpSockets {
    /// No sockets; wakers report to `ready`.
    pub fn new(ready: Arc<Ready>) -> UdpSockets {
        UdpSockets {
            sockets: HashMap::new(),
            ready,
            buf: Vec::new(),
        }
    }

    /// Sockets open now.
    pub fn len(&self) -> usize {
        self.sockets.len()
    }

    /// True when none is open.
    pub fn is_empty(&self) -> bool {
        self.sockets.is_empty()
    }

    /// Carries out `op`; what it gives at once (a socket that could not be opened, a
    /// destination that refused) goes to `report`.
    pub fn apply(&mut self, op: UdpOp, report: impl FnOnce(UdpId, UdpEvent)) {
        if let Some((id, event)) = self.carry_out(op) {
            report(id, event);
        }
    }

    fn carry_out(&mut self, op: UdpOp) -> Option<(UdpId, UdpEvent)> {
        match op {
            UdpOp::Open { id, target, echo } => match open(target, echo) {
                Ok(socket) => {
                    let waker = Waker::from(Arc::new(UdpWaker {
                        id,
                        ready: self.ready.clone(),
                    }));
                    self.sockets.insert(id, Socket { socket, waker });
                    // Read once, which registers its waker.
                    self.ready.push_udp(id);
                    None
                }
                Err(e) => {
                    debug!(%target, error = %e, "direct UDP socket could not be opened");
                    Some((id, UdpEvent::Failed))
                }
            },
            UdpOp::Send { id, payload } => {
                let socket = &self.sockets.get(&id)?.socket;
                // Straight to the kernel: tokio's `try_send` says "would block" until the
                // reactor has seen a new socket writable, which would drop its first datagram.
                match socket2::SockRef::from(socket).send(&payload) {
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                        Some((id, UdpEvent::Refused))
                    }
                    // Sent, or no room (dropped, as UDP may).
                    _ => None,
                }
            }
            UdpOp::Close { id } => {
                self.sockets.remove(&id);
                None
            }
        }
    }

    /// Reads the ready sockets, up to [`PER_TURN`] datagrams in all, handing each to `each`;
    /// the sockets not read to the end are put back on the list. Returns the number read.
    pub fn recv(&mut self, mut each: impl FnMut(UdpId, UdpEvent)) -> usize {
        let max = PER_TURN;
        let ids = self.ready.take_udp();
        if ids.is_empty() {
            return 0;
        }
        if self.buf.is_empty() {
            self.buf = vec![0; MAX_DATAGRAM];
        }
        let mut n = 0;
        for (i, id) in ids.iter().enumerate() {
            if n >= max {
                ids[i..].iter().for_each(|id| self.ready.push_udp(*id));
                break;
            }
            let Some(s) = self.sockets.get(id) else {
                continue;
            };
            let mut cx = Context::from_waker(&s.waker);
            let mut more = true;
            for _ in 0..PER_SOCKET {
                let mut buf = ReadBuf::new(&mut self.buf);
                let event = match s.socket.poll_recv(&mut cx, &mut buf) {
                    Poll::Pending => {
                        more = false;
                        break;
                    }
                    Poll::Ready(Ok(())) => UdpEvent::Datagram(Bytes::copy_from_slice(buf.filled())),
                    Poll::Ready(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                        UdpEvent::Refused
                    }
                    Poll::Ready(Err(e)) => {
                        debug!(udp = %id, error = %e, "direct UDP socket failed");
                        more = false;
                        each(*id, UdpEvent::Failed);
                        n += 1;
                        break;
                    }
                };
                each(*id, event);
                n += 1;
            }
            if more {
                self.ready.push_udp(*id);
            }
        }
        n
    }
}

/// A UDP socket of this host connected to `target` (only its datagrams are received); for
/// `echo`, an unprivileged ICMP socket (`SOCK_DGRAM`, `IPPROTO_ICMP`/`ICMPV6`: the kernel
/// sets each request's identifier and delivers only the replies to it), which the host
/// gives only to the groups in `net.ipv4.ping_group_range` (`EACCES` otherwise).
fn open(target: SocketAddr, echo: bool) -> std::io::Result<UdpSocket> {
    let socket = if echo {
        let (domain, protocol) = match target {
            SocketAddr::V4(_) => (Domain::IPV4, Protocol::ICMPV4),
            SocketAddr::V6(_) => (Domain::IPV6, Protocol::ICMPV6),
        };
        let socket = socket2::Socket::new(domain, Type::DGRAM, Some(protocol))?;
        socket.connect(&target.into())?;
        std::net::UdpSocket::from(socket)
    } else {
        let any: SocketAddr = match target {
            SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let socket = std::net::UdpSocket::bind(any)?;
        socket.connect(target)?;
        socket
    };
    socket.set_nonblocking(true)?;
    UdpSocket::from_std(socket)
}
