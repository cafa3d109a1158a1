//! The laptop's side of the TUN, in process: the driver's [`PacketIo`] is a pair of bounded
//! queues, and at their other end a smoltcp interface plays the kernel and its apps. Also the
//! test's "VPC": echo servers on 127.0.0.1.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, AtomicU32, Ordering};
use std::time::Duration;

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{Mutex, mpsc};
use tokio::time::Instant;

use mse_vpn::driver::PacketIo;
use mse_vpn::engine::{QueueDevice, RxPacket};

/// The TUN's (and so the apps') address.
pub const APP_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// A gateway inside the app's network, for its default route (the medium has no neighbours).
const APP_GW: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// A VPC address the apps connect to; the in-process jump host maps every host to 127.0.0.1.
pub const VPC_V4: Ipv4Addr = Ipv4Addr::new(10, 0, 3, 7);
/// The TUN MTU of these tests.
pub const MTU: usize = 1500;
/// Packets queued each way between the driver and the app.
const QUEUE: usize = 4096;

/// The driver's end of the queues.
pub struct Queues {
    from_app: Mutex<mpsc::Receiver<Vec<u8>>>,
    to_app: mpsc::Sender<Vec<u8>>,
    /// Writes still to fail (see [`Queues::fail_sends`]), and with which `errno`.
    failing: AtomicU32,
    errno: AtomicI32,
}

// Used by the errno tests, which only build where libc has those errno values.
#[cfg_attr(not(unix), allow(dead_code))]
impl Queues {
    /// The next `n` writes fail with `errno` (their packets are lost), as a TUN's do when
    /// the kernel is out of buffers (`ENOBUFS`) or the device is gone (`EBADFD`).
    pub fn fail_sends(&self, n: u32, errno: i32) {
        self.errno.store(errno, Ordering::SeqCst);
        self.failing.store(n, Ordering::SeqCst);
    }

    /// Writes still to fail.
    pub fn failing(&self) -> u32 {
        self.failing.load(Ordering::SeqCst)
    }
}

impl PacketIo for Queues {
    async fn recv(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut rx = self.from_app.lock().await;
        match rx.recv().await {
            Some(p) => {
                buf[..p.len()].copy_from_slice(&p);
                Ok(p.len())
            }
            // The app is gone: the test is ending; the driver waits for its stop.
            None => std::future::pending().await,
        }
    }

    async fn send(&self, packet: &[u8]) -> std::io::Result<usize> {
        let fail = self
            .failing
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if fail {
            let errno = self.errno.load(Ordering::SeqCst);
            return Err(std::io::Error::from_raw_os_error(errno));
        }
        // A full queue waits, like a TUN whose kernel side is slow; a gone app drops.
        let _ = self.to_app.send(packet.to_vec()).await;
        Ok(packet.len())
    }
}

/// The kernel and its apps: a smoltcp interface whose device is the other end of [`Queues`].
pub struct App {
    iface: Interface,
    dev: QueueDevice,
    pub sockets: SocketSet<'static>,
    to_driver: mpsc::Sender<Vec<u8>>,
    from_driver: mpsc::Receiver<Vec<u8>>,
    epoch: Instant,
    next_port: u16,
    /// UDP and ICMP packets from the driver (the app's stack has no UDP: tests read them).
    pub datagrams: Vec<Vec<u8>>,
}

impl App {
    /// An app side and the driver's queues to it.
    pub fn new() -> (App, Arc<Queues>) {
        let (to_driver, from_app) = mpsc::channel(QUEUE);
        let (to_app, from_driver) = mpsc::channel(QUEUE);
        let epoch = Instant::now();
        let mut dev = QueueDevice::new(MTU);
        let mut iface = Interface::new(
            Config::new(HardwareAddress::Ip),
            &mut dev,
            smoltcp::time::Instant::ZERO,
        );
        iface.update_ip_addrs(|a| {
            a.push(IpCidr::new(IpAddress::Ipv4(APP_V4), 24)).unwrap();
        });
        iface.routes_mut().add_default_ipv4_route(APP_GW).unwrap();
        let app = App {
            iface,
            dev,
            sockets: SocketSet::new(Vec::new()),
            to_driver,
            from_driver,
            epoch,
            next_port: 40_000,
            datagrams: Vec::new(),
        };
        let queues = Queues {
            from_app: Mutex::new(from_app),
            to_app,
            failing: AtomicU32::new(0),
            errno: AtomicI32::new(0),
        };
        (app, Arc::new(queues))
    }

    fn now(&self) -> smoltcp::time::Instant {
        smoltcp::time::Instant::from_micros(self.epoch.elapsed().as_micros() as i64)
    }

    fn socket() -> tcp::Socket<'static> {
        let mut s = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; 256 * 1024]),
            tcp::SocketBuffer::new(vec![0; 256 * 1024]),
        );
        s.set_ack_delay(None);
        s.set_nagle_enabled(false);
        s
    }

    /// An app connects to `dst` (SYN sent on the next pump).
    pub fn connect(&mut self, dst: SocketAddr) -> SocketHandle {
        let mut s = App::socket();
        let port = self.next_port;
        self.next_port += 1;
        s.connect(self.iface.context(), dst, (IpAddress::Ipv4(APP_V4), port))
            .expect("connect");
        self.sockets.add(s)
    }

    /// An app listens on `port` (of any address the driver sends to).
    pub fn listen(&mut self, port: u16) -> SocketHandle {
        let mut s = App::socket();
        s.listen(port).expect("listen");
        self.sockets.add(s)
    }

    /// The socket `h`.
    pub fn tcp(&mut self, h: SocketHandle) -> &mut tcp::Socket<'static> {
        self.sockets.get_mut::<tcp::Socket>(h)
    }

    /// Runs the interface once, and moves what it emitted to the driver.
    async fn poll_once(&mut self) {
        let now = self.now();
        self.iface.poll(now, &mut self.dev, &mut self.sockets);
        while let Some(p) = self.dev.tx.pop_front() {
            self.to_driver.send(p).await.expect("driver queue");
        }
    }

    /// Moves packets both ways and runs the interface until `done` holds (true) or `limit`
    /// passed (false). Waits for the driver's next packet or the interface's next timer,
    /// polling every few milliseconds at most.
    pub async fn until(&mut self, limit: Duration, mut done: impl FnMut(&mut App) -> bool) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            self.poll_once().await;
            if done(self) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            let wait = self
                .iface
                .poll_delay(self.now(), &self.sockets)
                .map(|d| Duration::from_micros(d.total_micros()))
                .unwrap_or(Duration::from_millis(5))
                .min(Duration::from_millis(5));
            if let Ok(Some(p)) = tokio::time::timeout(wait, self.from_driver.recv()).await {
                self.take(p);
                while let Ok(p) = self.from_driver.try_recv() {
                    self.take(p);
                }
            }
        }
    }

    /// A packet from the driver: UDP and ICMP (IPv4 protocols 17 and 1) for the test, the
    /// rest for the stack.
    fn take(&mut self, p: Vec<u8>) {
        match p.get(9) {
            Some(17 | 1) => self.datagrams.push(p),
            _ => self.dev.rx.push_back(RxPacket::from(p)),
        }
    }

    /// Sends a raw IP packet to the driver (a UDP datagram the test built).
    pub async fn send_raw(&mut self, p: Vec<u8>) {
        self.to_driver.send(p).await.expect("driver queue");
    }

    /// Sends all of `data` on `h` and reads until `want` bytes came back (or the limit).
    pub async fn exchange(
        &mut self,
        h: SocketHandle,
        data: &[u8],
        want: usize,
        limit: Duration,
    ) -> Vec<u8> {
        let mut sent = 0;
        let mut got = Vec::new();
        self.until(limit, |app| {
            let s = app.tcp(h);
            if s.can_send() && sent < data.len() {
                sent += s.send_slice(&data[sent..]).expect("send");
            }
            while s.can_recv() {
                s.recv(|b| {
                    got.extend_from_slice(b);
                    (b.len(), ())
                })
                .expect("recv");
            }
            got.len() >= want
        })
        .await;
        got
    }

    /// Reads what arrives on `h` until the peer's FIN (true) or the limit (false).
    pub async fn read_to_fin(
        &mut self,
        h: SocketHandle,
        into: &mut Vec<u8>,
        limit: Duration,
    ) -> bool {
        self.until(limit, |app| {
            let s = app.tcp(h);
            while s.can_recv() {
                s.recv(|b| {
                    into.extend_from_slice(b);
                    (b.len(), ())
                })
                .expect("recv");
            }
            !s.may_recv()
                && s.state() != tcp::State::SynSent
                && s.state() != tcp::State::SynReceived
        })
        .await
    }
}

/// A "VPC" echo server on 127.0.0.1: echoes every connection until its EOF, then closes.
pub async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// A "VPC" server that reads to EOF, then answers `got N bytes` and closes: proves a
/// half-close (the app's FIN arrives as EOF while the way back stays open).
pub async fn count_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut all = Vec::new();
                let _ = s.read_to_end(&mut all).await;
                let _ = s
                    .write_all(format!("got {} bytes", all.len()).as_bytes())
                    .await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

/// A "VPC" server that sends `n` bytes of [`pattern`] to each connection, then closes.
pub async fn source_server(n: usize) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = s.write_all(&pattern(n)).await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

/// A "VPC" server that reads each connection to its end and reports how it ended: the
/// bytes read, and whether it ended with EOF (`Ok`) or an error (`Err`).
pub async fn watch_server() -> (SocketAddr, mpsc::Receiver<std::io::Result<usize>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut all = Vec::new();
                let end = s.read_to_end(&mut all).await;
                let _ = tx.send(end).await;
            });
        }
    });
    (addr, rx)
}

/// A UDP echo server on 127.0.0.1: sends every datagram back to where it came from.
pub async fn udp_echo_server() -> SocketAddr {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = socket.local_addr().expect("addr");
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            let _ = socket.send_to(&buf[..n], from).await;
        }
    });
    addr
}

/// A port on 127.0.0.1 where nothing listens (bound, then released).
pub fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// `n` bytes of a pattern that shows reordering and loss.
pub fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8).collect()
}
