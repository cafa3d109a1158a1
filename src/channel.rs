//! A flow's channel as the driver moves bytes through it: the small trait the SSH channel
//! sits behind ([`FlowChannel`]), its implementation on russh's channel ([`SshChannel`]) with
//! a cloud caller's accept / refuse handle ([`CallReply`]), and the plumbing that lets one
//! task serve every flow without a task per flow ([`Inflight`]): each channel's waker puts
//! its flow on the driver's [`Ready`] list, and each open and each write is a future the
//! driver polls among all the others (a write the relay may abort, [`Chan`]).
//!
//! Owns no policy (which flow is read, what is written, opened, accepted or refused, and
//! when, are the relay's) and no flow table (the relay keeps each [`Chan`] as its opaque
//! channel handle).

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

use futures::future::{AbortHandle, Aborted, BoxFuture};
use futures::stream::FuturesUnordered;
use futures::task::{AtomicWaker, noop_waker_ref};
use futures::{FutureExt, StreamExt};
use russh::client::{ChannelOpenHandle, Msg};
use russh::{ChannelMsg, ChannelOpenFailure, ChannelReadHalf, ChannelWriteHalf};
use tokio::task::JoinHandle;
use tracing::{Instrument, info_span};

use crate::engine::FlowId;
use crate::pool::{InboundCall, InboundCalls, LinkId, Pool};
use crate::relay::{Call, ChannelOp, Fallback, OpenRequest, Received, Refusal, WriteOp};
use crate::reverse::{self, Forwards};
use crate::ssh::OpenError;

/// What a flow's SSH channel offers the driver.
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

/// Flows whose channel has something to read (set by their wakers).
pub struct Ready {
    flows: Mutex<Vec<FlowId>>,
    driver: AtomicWaker,
}

impl Ready {
    /// An empty list.
    pub fn new() -> Arc<Ready> {
        Arc::new(Ready {
            flows: Mutex::new(Vec::new()),
            driver: AtomicWaker::new(),
        })
    }

    /// Puts a flow on the list and wakes the driver.
    pub fn push(&self, id: FlowId) {
        self.flows
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(id);
        self.driver.wake();
    }

    /// Takes the list.
    pub fn take(&self) -> Vec<FlowId> {
        std::mem::take(&mut *self.flows.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Resolves once a flow is ready.
    pub fn wait(&self) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(|cx| {
            self.driver.register(cx.waker());
            if self
                .flows
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_empty()
            {
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

/// The driver's relay handle for a channel: russh's, with its waker and write.
pub type SshChan = Chan<SshChannel>;

/// Something the driver waited for besides the TUN ([`Inflight::poll_done`]).
pub enum Done {
    /// The jump host answered [`Inflight::open`].
    Opened(FlowId, Result<(LinkId, SshChan), OpenError>),
    /// A write finished: the bytes of data written, or `None` (see [`FlowChannel::write`]).
    Written(FlowId, Option<usize>),
    /// A cloud caller arrived, with the exposed port it called.
    Call(Call<SshChan, CallReply>),
    /// The memory release ([`Inflight::trim`]) finished.
    Trimmed,
}

/// What the driver waits for besides the TUN and its timer: channel opens and writes in
/// flight, cloud callers, the memory release; and the list of flows with something to read.
pub struct Inflight {
    /// Flows whose channel woke.
    pub ready: Arc<Ready>,
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
        Inflight {
            ready: Ready::new(),
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
            Done::Opened(id, r.map(|(link, ch)| (link, Chan::new(ch.into()))))
        };
        self.opening.push(fut.instrument(span).boxed());
    }

    /// Does `op` on flow `id`'s `channel`.
    pub fn channel(&mut self, channel: &mut SshChan, id: FlowId, op: ChannelOp) {
        match op {
            ChannelOp::Write(op) => self.writes.push(channel.write(id, op)),
            ChannelOp::Abort => channel.abort(),
            ChannelOp::StopReading => channel.stop_reading(),
        }
    }

    /// Gives freed memory back, off the driver's task.
    pub fn trim(&mut self) {
        self.trim = Some(tokio::task::spawn_blocking(self.release));
    }

    /// Spawns the loopback fallback for a cloud caller ([`reverse::loopback_fallback`]), in
    /// its flow's span.
    pub fn loopback(&self, fallback: Fallback<SshChan, CallReply>) {
        let Fallback {
            id,
            caller,
            channel,
            reply,
            port,
            forward,
        } = fallback;
        let forwards = self.inbound.as_ref().map(|(_, f)| f.clone());
        let halves = channel.into_inner().into_halves();
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
fn call(call: InboundCall, target: Option<reverse::Target>) -> Call<SshChan, CallReply> {
    Call {
        link: call.link,
        listen_port: call.listen_port,
        caller: call.caller,
        target,
        channel: Chan::new(call.channel.into()),
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
