//! A flow's channel as the driver moves bytes through it: the small trait the SSH channel
//! sits behind ([`FlowChannel`]), its implementation on russh's channel ([`SshChannel`]) with
//! a cloud caller's accept / refuse handle ([`CallReply`]), its implementation on a host TCP
//! connection for the direct path ([`HostStream`], `mse-vpn run`: flows outside the VPC),
//! and the plumbing that lets one task serve every flow without a task per flow
//! ([`Inflight`]): each channel's waker puts its flow on the driver's [`Ready`] list, and
//! each open, connect and write is a future the driver polls among all the others (a write
//! the relay may abort, [`Chan`]). The direct path's UDP sockets are [`crate::udp`]'s.
//!
//! Owns no policy (which flow is read, what is written, opened, accepted or refused, and
//! when, are the relay's) and no flow table (the relay keeps each [`Chan`] as its opaque
//! channel handle).

use std::cell::RefCell;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

use bytes::Bytes;
use futures::future::{AbortHandle, Aborted, BoxFuture};
use futures::stream::FuturesUnordered;
use futures::task::{AtomicWaker, noop_waker_ref};
use futures::{FutureExt, StreamExt};
use russh::client::{ChannelOpenHandle, Msg};
use russh::{ChannelMsg, ChannelOpenFailure, ChannelReadHalf, ChannelWriteHalf};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tracing::{Instrument, debug, info_span};

use crate::engine::FlowId;
use crate::pool::{InboundCall, InboundCalls, LinkId, Pool};
use crate::relay::{
    Call, ChannelOp, Command, ConnectError, ConnectRequest, Fallback, OpenRequest, Received,
    Refusal, UdpEvent, UdpId, WriteOp,
};
use crate::reverse::{self, Forwards};
use crate::ssh::OpenError;

/// What a flow's channel (SSH, or a host connection) offers the driver.
pub trait FlowChannel: Send + 'static {
    /// The next thing the channel received, waking `cx` when there is one;
    /// [`Received::Closed`] once it has ended (and ever after).
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<Received>;
    /// Carries out `op`: resolves to the bytes of data written (0 for EOF), or `None` if the
    /// channel is gone (always `None` for a close).
    fn write(&self, op: WriteOp) -> BoxFuture<'static, Option<usize>>;
    /// Lets go of the receiving side: nothing more is read.
    fn stop_reading(&mut self);
}

/// Flows whose channel has something to read, and UDP sockets of the direct path with a
/// datagram (set by their wakers).
pub struct Ready {
    lists: Mutex<Lists>,
    driver: AtomicWaker,
}

#[derive(Default)]
struct Lists {
    flows: Vec<FlowId>,
    udp: Vec<UdpId>,
}

impl Ready {
    /// An empty list.
    pub fn new() -> Arc<Ready> {
        Arc::new(Ready {
            lists: Mutex::new(Lists::default()),
            driver: AtomicWaker::new(),
        })
    }

    fn lists(&self) -> std::sync::MutexGuard<'_, Lists> {
        self.lists.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Puts a flow on the list and wakes the driver.
    pub fn push(&self, id: FlowId) {
        self.lists().flows.push(id);
        self.driver.wake();
    }

    /// Puts a UDP socket on the list and wakes the driver.
    pub fn push_udp(&self, id: UdpId) {
        self.lists().udp.push(id);
        self.driver.wake();
    }

    /// Takes the list of flows.
    pub fn take(&self) -> Vec<FlowId> {
        std::mem::take(&mut self.lists().flows)
    }

    /// Takes the list of UDP sockets.
    pub fn take_udp(&self) -> Vec<UdpId> {
        std::mem::take(&mut self.lists().udp)
    }

    /// Resolves once a flow or a UDP socket is ready.
    pub fn wait(&self) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(|cx| {
            self.driver.register(cx.waker());
            let lists = self.lists();
            if lists.flows.is_empty() && lists.udp.is_empty() {
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        })
    }
}

/// The waker of one flow's channel: wakes the driver with the flow's id.
struct FlowWaker {
    id: FlowId,
    ready: Arc<Ready>,
}

impl Wake for FlowWaker {
    fn wake(self: Arc<Self>) {
        self.ready.push(self.id);
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.ready.push(self.id);
    }
}

/// A write the driver polls: its flow and what [`FlowChannel::write`] gave (`Err` if the
/// relay aborted it).
type WriteFuture = BoxFuture<'static, Result<(FlowId, Option<usize>), Aborted>>;

/// The driver's relay handle for a channel: russh's or a host connection, with its waker and
/// write.
pub type FlowChan = Chan<Carrier>;

/// Something the driver waited for besides the TUN ([`Inflight::poll_done`]).
pub enum Done {
    /// The jump host answered [`Inflight::open`].
    Opened(FlowId, Result<(LinkId, FlowChan), OpenError>),
    /// A host connection ([`Inflight::connect`]) is made or failed.
    Connected(FlowId, Result<FlowChan, ConnectError>),
    /// A write finished: the bytes of data written, or `None` (see [`FlowChannel::write`]).
    Written(FlowId, Option<usize>),
    /// A cloud caller arrived, with the exposed port it called.
    Call(Call<FlowChan, CallReply>),
    /// The memory release ([`Inflight::trim`]) finished.
    Trimmed,
}

/// What the driver waits for besides the TUN and its timer: channel opens, host connects
/// and writes in flight, cloud callers, the memory release; the list of flows with something
/// to read; the direct path's UDP sockets.
pub struct Inflight {
    /// Flows whose channel woke (and UDP sockets).
    pub ready: Arc<Ready>,
    /// The direct path's UDP sockets (none unless it is on).
    pub udp: crate::udp::UdpSockets,
    opening: FuturesUnordered<BoxFuture<'static, Done>>,
    writes: FuturesUnordered<WriteFuture>,
    /// Cloud callers' channels (from the pool), and the table of exposed ports.
    inbound: Option<(InboundCalls, Arc<Forwards>)>,
    /// What gives freed memory back ([`mse_vpn_platform::sys::release_free_memory`]).
    release: fn() -> bool,
    /// The release in progress, on tokio's blocking pool (it walks the whole heap).
    trim: Option<JoinHandle<bool>>,
}

impl Default for Inflight {
    fn default() -> Self {
        let ready = Ready::new();
        Inflight {
            udp: crate::udp::UdpSockets::new(ready.clone()),
            ready,
            opening: FuturesUnordered::new(),
            writes: FuturesUnordered::new(),
            inbound: None,
            release: mse_vpn_platform::sys::release_free_memory,
            trim: None,
        }
    }
}

impl Inflight {
    /// Also takes cloud callers from `calls`, for the listeners in `forwards`.
    pub fn with_inbound(&mut self, calls: InboundCalls, forwards: Arc<Forwards>) {
        self.inbound = Some((calls, forwards));
    }

    /// Gives freed memory back with `release` (instead of `malloc_trim`).
    pub fn with_memory_release(&mut self, release: fn() -> bool) {
        self.release = release;
    }

    /// Opens a channel through `pool`, as `open` says, in the flow's span.
    pub fn open(&mut self, pool: &Arc<Pool>, open: OpenRequest) {
        let OpenRequest { id, key, .. } = open;
        let pool = pool.clone();
        let span = info_span!("flow", id = %id, src = %key.src, dst = %key.dst);
        let fut = async move {
            let r = pool
                .open(key.dst, key.src, open.placement, open.link_wait, open.cap)
                .await;
            let ssh = |ch: russh::Channel<Msg>| Chan::new(Carrier::Ssh(ch.into()));
            Done::Opened(id, r.map(|(link, ch)| (link, ssh(ch))))
        };
        self.opening.push(fut.instrument(span).boxed());
    }

    /// Connects a host socket for a flow on the direct path, as `connect` says, in the
    /// flow's span.
    pub fn connect(&mut self, connect: ConnectRequest) {
        let ConnectRequest {
            id,
            key,
            target,
            cap,
        } = connect;
        let span = info_span!("flow", id = %id, src = %key.src, dst = %key.dst);
        let fut = async move {
            let made = tokio::time::timeout(cap, TcpStream::connect(target)).await;
            let r = match made {
                Ok(Ok(stream)) => {
                    // The app's own stack already chose when to send: no second Nagle here.
                    let _ = stream.set_nodelay(true);
                    Ok(Chan::new(Carrier::Host(HostStream::new(stream))))
                }
                Ok(Err(e)) => {
                    debug!(%target, error = %e, "direct connection failed");
                    Err(match e.kind() {
                        std::io::ErrorKind::ConnectionRefused => ConnectError::Refused,
                        _ => ConnectError::Unreachable,
                    })
                }
                Err(_) => Err(ConnectError::Unreachable),
            };
            Done::Connected(id, r)
        };
        self.opening.push(fut.instrument(span).boxed());
    }

    /// Does `op` on flow `id`'s `channel`.
    pub fn channel(&mut self, channel: &mut FlowChan, id: FlowId, op: ChannelOp) {
        match op {
            ChannelOp::Write(op) => self.writes.push(channel.write(id, op)),
            ChannelOp::Abort => channel.abort(),
            ChannelOp::StopReading => channel.stop_reading(),
        }
    }

    /// Carries out a relay command that is only I/O: channel opens and host connects, the
    /// direct path's UDP sockets (what they give at once goes to `udp`), link counters,
    /// reads, a cloud caller's answer, the loopback fallback, the memory release, a log
    /// line. The commands that need a core ([`Command::Engine`], [`Command::Channel`]) are
    /// the driver's.
    pub fn carry_out(
        &mut self,
        pool: &Arc<Pool>,
        command: Command<FlowChan, CallReply>,
        udp: impl FnOnce(UdpId, UdpEvent),
    ) {
        match command {
            Command::Open(open) => self.open(pool, open),
            Command::Connect(connect) => self.connect(connect),
            Command::Udp(op) => self.udp.apply(op, udp),
            Command::Link { link, change } => pool.update(link, change),
            Command::Read { id } => self.ready.push(id),
            Command::Drop { channel } => channel.close(),
            Command::Accept { reply } => reply.accept(),
            Command::Refuse { reply, how } => reply.refuse(how),
            Command::Loopback(fallback) => self.loopback(fallback),
            Command::Trim => self.trim(),
            Command::Note(note) => note.log(),
            Command::Engine(_) | Command::Channel(..) => {}
        }
    }

    /// Gives freed memory back, off the driver's task.
    pub fn trim(&mut self) {
        self.trim = Some(tokio::task::spawn_blocking(self.release));
    }

    /// Spawns the loopback fallback for a cloud caller ([`reverse::loopback_fallback`]), in
    /// its flow's span.
    pub fn loopback(&self, fallback: Fallback<FlowChan, CallReply>) {
        let Fallback {
            id,
            caller,
            channel,
            reply,
            port,
            forward,
        } = fallback;
        let forwards = self.inbound.as_ref().map(|(_, f)| f.clone());
        // Cloud callers always come on SSH channels.
        let Carrier::Ssh(channel) = channel.into_inner() else {
            return reply.refuse(Refusal::ConnectFailed);
        };
        let halves = channel.into_halves();
        let run = reverse::loopback_fallback(
            halves,
            reply.0,
            port,
            forward,
            forwards.unwrap_or_default(),
        );
        tokio::spawn(run.instrument(info_span!("flow", id = %id, dst = %caller)));
    }

    /// The next thing that finished or arrived (an aborted write is skipped); pending while
    /// nothing is (the driver's loop polls again after starting more).
    pub fn poll_done(&mut self, cx: &mut Context<'_>) -> Poll<Done> {
        while let Poll::Ready(Some(written)) = self.writes.poll_next_unpin(cx) {
            if let Ok((id, n)) = written {
                return Poll::Ready(Done::Written(id, n));
            }
        }
        if let Poll::Ready(Some(done)) = self.opening.poll_next_unpin(cx) {
            return Poll::Ready(done);
        }
        if let Some((calls, forwards)) = &mut self.inbound
            && let Poll::Ready(Some(c)) = calls.poll_recv(cx)
        {
            let target = forwards.lookup(c.link, c.listen_port);
            return Poll::Ready(Done::Call(call(c, target)));
        }
        if let Some(trim) = &mut self.trim
            && trim.poll_unpin(cx).is_ready()
        {
            self.trim = None;
            return Poll::Ready(Done::Trimmed);
        }
        Poll::Pending
    }

    /// What has finished or arrived already, if anything.
    pub fn done_now(&mut self) -> Option<Done> {
        match self.poll_done(&mut Context::from_waker(noop_waker_ref())) {
            Poll::Ready(done) => Some(done),
            Poll::Pending => None,
        }
    }
}

/// A cloud caller's channel as the relay takes it, `target` being the exposed port it
/// called ([`Forwards::lookup`]).
fn call(call: InboundCall, target: Option<reverse::Target>) -> Call<FlowChan, CallReply> {
    Call {
        link: call.link,
        listen_port: call.listen_port,
        caller: call.caller,
        target,
        channel: Chan::new(Carrier::Ssh(call.channel.into())),
        reply: CallReply(call.reply),
    }
}

/// A flow's channel with its waker and its write in progress: the relay's channel handle.
pub struct Chan<T> {
    inner: T,
    /// Made on the first read (an inbound call's flow id is known only once it is routed).
    waker: Option<Waker>,
    writing: Option<AbortHandle>,
}

impl<T: FlowChannel> Chan<T> {
    /// Wraps a channel.
    pub fn new(inner: T) -> Chan<T> {
        Chan {
            inner,
            waker: None,
            writing: None,
        }
    }

    /// The channel itself (for the loopback fallback).
    pub fn into_inner(self) -> T {
        self.inner
    }

    /// Reads the next message of flow `id`'s channel; when there is none yet, the flow is
    /// put on `ready` once there is.
    pub fn read(&mut self, id: FlowId, ready: &Arc<Ready>) -> Poll<Received> {
        let waker = self.waker.get_or_insert_with(|| {
            Waker::from(Arc::new(FlowWaker {
                id,
                ready: ready.clone(),
            }))
        });
        self.inner.poll_read(&mut Context::from_waker(waker))
    }

    /// Starts `op` on flow `id`'s channel; [`Chan::abort`] gives it up.
    fn write(&mut self, id: FlowId, op: WriteOp) -> WriteFuture {
        let (fut, handle) = futures::future::abortable(self.inner.write(op));
        self.writing = Some(handle);
        fut.map(move |r| r.map(|n| (id, n))).boxed()
    }

    /// Gives up the write in progress.
    fn abort(&mut self) {
        if let Some(w) = self.writing.take() {
            w.abort();
        }
    }

    /// See [`FlowChannel::stop_reading`].
    fn stop_reading(&mut self) {
        self.inner.stop_reading();
    }

    /// Closes the channel, for a flow that no longer wants it (spawned: nothing waits).
    pub fn close(self) {
        tokio::spawn(self.inner.write(WriteOp::Close));
    }
}

/// A flow's SSH channel, split so that one write can be in progress while it is read.
pub struct SshChannel {
    /// The receiving half, until the channel ended or the flow stopped reading.
    read: Option<ChannelReadHalf>,
    write: Arc<ChannelWriteHalf<Msg>>,
}

impl From<russh::Channel<Msg>> for SshChannel {
    fn from(channel: russh::Channel<Msg>) -> SshChannel {
        let (read, write) = channel.split();
        SshChannel {
            read: Some(read),
            write: Arc::new(write),
        }
    }
}

impl SshChannel {
    /// Both halves (the loopback fallback relays them itself); `None` for the receiving one
    /// once it is let go of.
    pub fn into_halves(self) -> (Option<ChannelReadHalf>, Arc<ChannelWriteHalf<Msg>>) {
        (self.read, self.write)
    }
}

impl FlowChannel for SshChannel {
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<Received> {
        let Some(read) = self.read.as_mut() else {
            return Poll::Ready(Received::Closed);
        };
        match read.poll_wait(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(ChannelMsg::Data { data })) => Poll::Ready(Received::Data(data)),
            Poll::Ready(Some(ChannelMsg::Eof)) => Poll::Ready(Received::Eof),
            Poll::Ready(Some(ChannelMsg::Close) | None) => {
                self.read = None;
                Poll::Ready(Received::Closed)
            }
            Poll::Ready(Some(_)) => Poll::Ready(Received::Other),
        }
    }

    fn write(&self, op: WriteOp) -> BoxFuture<'static, Option<usize>> {
        let write = self.write.clone();
        async move {
            match op {
                WriteOp::Data(data) => {
                    let n = data.len();
                    write.data_bytes(data).await.is_ok().then_some(n)
                }
                WriteOp::Eof => write.eof().await.is_ok().then_some(0),
                WriteOp::Close => {
                    let _ = write.close().await;
                    None
                }
            }
        }
        .boxed()
    }

    fn stop_reading(&mut self) {
        self.read = None;
    }
}

/// A flow's channel: an SSH channel, or (the direct path) a host connection.
pub enum Carrier {
    /// Through the jump host.
    Ssh(SshChannel),
    /// Out through this host's own socket.
    Host(HostStream),
}

impl FlowChannel for Carrier {
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<Received> {
        match self {
            Carrier::Ssh(c) => c.poll_read(cx),
            Carrier::Host(c) => c.poll_read(cx),
        }
    }

    fn write(&self, op: WriteOp) -> BoxFuture<'static, Option<usize>> {
        match self {
            Carrier::Ssh(c) => c.write(op),
            Carrier::Host(c) => c.write(op),
        }
    }

    fn stop_reading(&mut self) {
        match self {
            Carrier::Ssh(c) => c.stop_reading(),
            Carrier::Host(c) => c.stop_reading(),
        }
    }
}

/// Largest read from a host connection into one [`Received::Data`] (as an SSH packet's).
const HOST_READ: usize = 64 * 1024;

thread_local! {
    /// The buffer host connections are read into (then copied out at the length read, so a
    /// small read never holds a large buffer while it waits for the app).
    static HOST_SCRATCH: RefCell<Vec<u8>> = RefCell::new(vec![0; HOST_READ]);
}

/// A flow's host TCP connection on the direct path (`mse-vpn run`: a destination outside the
/// VPC): the same [`FlowChannel`] as an SSH channel, so the relay treats both alike, read only
/// while the engine takes more and written one write at a time. The close semantics map as
/// for a channel: the peer's FIN is [`Received::Eof`] (the connection stays writable: a
/// half-close); a read error (the peer reset) is [`Received::Closed`], which before EOF
/// resets the app; [`WriteOp::Eof`] is `shutdown(SHUT_WR)`; [`WriteOp::Close`] after the
/// app's EOF is an orderly close, and before it (the flow was reset) a reset (`SO_LINGER` 0).
pub struct HostStream {
    stream: Arc<TcpStream>,
    /// Until the peer's EOF, a read error, or [`FlowChannel::stop_reading`].
    reading: bool,
    /// The peer sent FIN: nothing more to read (the flow goes on writing).
    eof: bool,
    /// [`WriteOp::Eof`] was written (shared with the write futures).
    shut: Arc<AtomicBool>,
}

impl HostStream {
    /// Wraps a connected stream.
    pub fn new(stream: TcpStream) -> HostStream {
        HostStream {
            stream: Arc::new(stream),
            reading: true,
            eof: false,
            shut: Arc::new(AtomicBool::new(false)),
        }
    }
}

impl FlowChannel for HostStream {
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<Received> {
        if !self.reading {
            return Poll::Ready(Received::Closed);
        }
        if self.eof {
            return Poll::Pending;
        }
        loop {
            if let Err(_e) = futures::ready!(self.stream.poll_read_ready(cx)) {
                self.reading = false;
                return Poll::Ready(Received::Closed);
            }
            let read = HOST_SCRATCH.with_borrow_mut(|buf| {
                self.stream
                    .try_read(buf)
                    .map(|n| Bytes::copy_from_slice(&buf[..n]))
            });
            match read {
                Ok(data) if data.is_empty() => {
                    self.eof = true;
                    return Poll::Ready(Received::Eof);
                }
                Ok(data) => return Poll::Ready(Received::Data(data)),
                // Readiness was stale: poll again (which registers the waker).
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => {
                    self.reading = false;
                    return Poll::Ready(Received::Closed);
                }
            }
        }
    }

    fn write(&self, op: WriteOp) -> BoxFuture<'static, Option<usize>> {
        let (stream, shut) = (self.stream.clone(), self.shut.clone());
        async move {
            match op {
                WriteOp::Data(data) => {
                    let mut at = 0;
                    while at < data.len() {
                        stream.writable().await.ok()?;
                        match stream.try_write(&data[at..]) {
                            Ok(0) => return None,
                            Ok(n) => at += n,
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                            Err(_) => return None,
                        }
                    }
                    Some(data.len())
                }
                WriteOp::Eof => {
                    shut.store(true, Ordering::Relaxed);
                    let sock = socket2::SockRef::from(&*stream);
                    sock.shutdown(std::net::Shutdown::Write).ok().map(|()| 0)
                }
                WriteOp::Close => {
                    if !shut.load(Ordering::Relaxed) {
                        // A reset flow: the peer gets RST, not an orderly FIN.
                        let _ = stream.set_zero_linger();
                    }
                    // The socket closes as its last handle goes (the flow's, at release).
                    None
                }
            }
        }
        .boxed()
    }

    fn stop_reading(&mut self) {
        self.reading = false;
    }
}

/// A cloud caller's channel-open request, answered once.
pub struct CallReply(pub ChannelOpenHandle);

impl CallReply {
    /// Accepts the channel. Only queues a message for the session loop (never waits).
    pub fn accept(self) {
        let _ = self.0.accept().now_or_never();
    }

    /// Refuses the channel: the jump host closes the caller's connection.
    pub fn refuse(self, how: Refusal) {
        match how {
            // Dropping the handle refuses as "administratively prohibited".
            Refusal::Prohibited => drop(self),
            Refusal::ConnectFailed => {
                let _ = self
                    .0
                    .reject(ChannelOpenFailure::ConnectFailed)
                    .now_or_never();
            }
        }
    }
}
