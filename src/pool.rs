//! A pool of SSH connections to the jump host, kept up by one supervisor task.
//!
//! Every connection has its own cipher state, its own TCP window and its own sshd process on
//! the jump host, so spreading flows over a few connections lets bulk flows use both ends'
//! cores instead of queueing behind one encryption stream. A flow is placed on the connected
//! link that carries the fewest flows.
//!
//! A team shares one jump host, whose sshd drops unauthenticated connections beyond a few
//! (`MaxStartups`). So the pool connects the way [`schedule`] says: one connection at a time,
//! the first alone (at start, [`Pool::connect_initial`]; after losing every link), the others
//! after it, paced; every retry after a full-jitter random wait. A connection the jump host
//! resets during the SSH handshake (MaxStartups, a restarting sshd) is a refusal that passes:
//! at start it is retried within the connect timeout, so `up` fails on it only at the
//! timeout.
//!
//! When a link drops (EOF, keepalive timeout), the supervisor clears the slot, which the
//! driver sees through [`Pool::subscribe`] and answers by resetting exactly the flows that
//! were on that link; then the slot is reconnected, forever, unless a failure is one a retry
//! cannot fix (host key, authentication). New flows wait (bounded by the open timeout) for
//! any link to be up, and go out as soon as one is.
//!
//! What the user reads about it is one line when the pool has no connection left ("lost
//! the connection to the jump host …; reconnecting"), one when the first connection is back
//! ("reconnected … after 18 s"), and, in a long outage, a reminder now and then; each slot's
//! own losses and retries are debug events.
//!
//! The pool knows nothing of who shows its state: every change of the number of connected
//! links is published as a [`LinkEvent`] to a [`LinkObserver`] (the control socket's status
//! board subscribes; the pool does not import it).

pub mod schedule;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Poll, ready};
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use rand::SeedableRng;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::ssh::{Inbound, InboundSender, OpenError, Session, SshError, SshOptions};
use schedule::Schedule;

/// One live connection in a slot. `generation` changes with every reconnect of the slot.
#[derive(Clone)]
pub struct Link {
    /// Which reconnect of the slot this is.
    pub generation: u64,
    /// The connection.
    pub session: Arc<Session>,
}

/// Names the link a flow was opened on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LinkId {
    /// Slot index.
    pub slot: usize,
    /// Generation of the slot's connection.
    pub generation: u64,
}

/// Where a new flow goes among the pool's links.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// The link with the fewest flows (ties rotate): parallel flows use several connections,
    /// so several sshd processes (and cores) carry a bulk transfer.
    Spread,
    /// The lowest link among those carrying the fewest heavy flows ([`Pool::mark_heavy`]):
    /// light flows (short connections, and long ones that move little) share one SSH
    /// connection, where one sshd wake-up serves many of them, and stay off the connections
    /// busy with bulk data.
    Pack,
}

/// Flows packed on one link at most; past it, packed flows go to the next link. OpenSSH
/// ends a whole connection when it would hold more than 16,384 channels (`channels.c`,
/// `CHANNELS_MAX_CHANNELS`: fatal), and light flows that live long (connection pools)
/// accumulate where they are packed.
pub const PACK_MAX_FLOWS: usize = 4096;

/// A live link as [`choose`] sees it.
#[derive(Clone, Copy, Debug)]
struct Candidate {
    slot: usize,
    /// Its flows.
    flows: usize,
    /// Those of them that are bulk.
    heavy: usize,
}

/// The slot for a new flow among the live `links` (in the order ties are broken):
/// [`Placement::Spread`] takes the one with the fewest flows; [`Placement::Pack`] the first
/// with the fewest bulk flows among those with room ([`PACK_MAX_FLOWS`]), or, when none has,
/// the one with the fewest flows.
fn choose(placement: Placement, links: impl Iterator<Item = Candidate>) -> Option<usize> {
    let chosen = match placement {
        Placement::Spread => links.min_by_key(|c| c.flows),
        Placement::Pack => links.min_by_key(|c| {
            let full = c.flows >= PACK_MAX_FLOWS;
            (full, if full { c.flows } else { c.heavy })
        }),
    };
    chosen.map(|c| c.slot)
}

/// A change to a link's counters ([`Pool::update`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkChange {
    /// A cloud caller's flow arrived on it ([`Pool::adopt`]).
    Adopt,
    /// A flow on it ended ([`Pool::release`]).
    Release,
    /// A flow on it became bulk ([`Pool::mark_heavy`]).
    Heavy,
    /// A bulk flow on it ended ([`Pool::unmark_heavy`]).
    Light,
}

/// The pool. See the module documentation.
pub struct Pool {
    links: watch::Sender<Vec<Option<Link>>>,
    load: Vec<AtomicUsize>,
    /// Flows per link that moved enough to count as bulk ([`Pool::mark_heavy`]).
    heavy: Vec<AtomicUsize>,
    next: AtomicUsize,
    /// Cloud callers' channels from every connection of the pool (each connection's handler
    /// holds the sender), until [`Pool::inbound_calls`] takes the receiving end.
    inbound: (InboundSender, Mutex<Option<mpsc::Receiver<Inbound>>>),
    /// How long [`Pool::connect_initial`]'s connection took: paces the others.
    first_took: Mutex<Duration>,
}

/// Capacity of the queue of cloud callers' channels waiting for the driver.
pub const INBOUND_QUEUE: usize = 256;

/// A cloud caller's `forwarded-tcpip` channel, and the link of the pool it arrived on.
pub struct InboundCall {
    /// The link: the listener it came through is held by this connection.
    pub link: LinkId,
    /// The jump host port the caller connected to (the listener's port).
    pub listen_port: u16,
    /// The caller's address and port as the jump host reports them (`None` if unparsable).
    pub caller: Option<SocketAddr>,
    /// The channel.
    pub channel: russh::Channel<russh::client::Msg>,
    /// Accepts it, or refuses it (dropping it refuses it too).
    pub reply: russh::client::ChannelOpenHandle,
}

/// The cloud callers of every connection of the pool, as they arrive.
pub struct InboundCalls {
    rx: mpsc::Receiver<Inbound>,
    pool: Arc<Pool>,
}

impl InboundCalls {
    /// The next cloud caller. One that arrived on a connection no longer in the pool is
    /// refused (its listener went with the connection).
    pub async fn recv(&mut self) -> Option<InboundCall> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// [`InboundCalls::recv`] as a poll: `Ready(None)` once no connection can send more.
    pub fn poll_recv(&mut self, cx: &mut std::task::Context<'_>) -> Poll<Option<InboundCall>> {
        loop {
            let Some(call) = ready!(self.rx.poll_recv(cx)) else {
                return Poll::Ready(None);
            };
            if let Some(link) = self.pool.link_of(call.session) {
                return Poll::Ready(Some(InboundCall {
                    link,
                    listen_port: call.listen_port,
                    caller: call.caller,
                    channel: call.channel,
                    reply: call.reply,
                }));
            }
            debug!("a cloud caller on a connection no longer in use: refused");
        }
    }
}

impl Pool {
    /// An empty pool of `size` slots.
    pub fn new(size: usize) -> Arc<Pool> {
        let size = size.max(1);
        let (tx, rx) = mpsc::channel(INBOUND_QUEUE);
        Arc::new(Pool {
            links: watch::channel(vec![None; size]).0,
            load: (0..size).map(|_| AtomicUsize::new(0)).collect(),
            heavy: (0..size).map(|_| AtomicUsize::new(0)).collect(),
            next: AtomicUsize::new(0),
            inbound: (tx, Mutex::new(Some(rx))),
            first_took: Mutex::new(Duration::ZERO),
        })
    }

    /// The cloud callers of all the pool's connections (once: the driver takes them).
    pub fn inbound_calls(self: &Arc<Self>) -> Option<InboundCalls> {
        let rx = self.inbound.1.lock().ok()?.take()?;
        Some(InboundCalls {
            rx,
            pool: self.clone(),
        })
    }

    /// `opts` with this pool's queue for cloud callers.
    fn with_inbound(&self, opts: &SshOptions) -> SshOptions {
        let mut opts = opts.clone();
        opts.inbound = Some(self.inbound.0.clone());
        opts
    }

    /// Connects the pool's first connection, before anything on the host changes: alone, so
    /// the jump host has one pending connection from us; the others follow once
    /// [`supervise`] runs. A connection the jump host resets during the handshake is retried
    /// (full jitter) until the connect timeout has passed since the first try; any other
    /// failure is returned at once. The first slot holds the connection, the others are
    /// empty.
    pub async fn connect_initial(
        &self,
        opts: &SshOptions,
    ) -> Result<Vec<Option<Session>>, SshError> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(rand::random());
        let (first, took) = connect_first(&self.with_inbound(opts), &mut rng).await?;
        *self
            .first_took
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = took;
        let mut sessions: Vec<Option<Session>> = (0..self.size()).map(|_| None).collect();
        sessions[0] = Some(first);
        Ok(sessions)
    }

    /// Number of slots.
    pub fn size(&self) -> usize {
        self.load.len()
    }

    /// Number of slots with a live connection.
    pub fn connected(&self) -> usize {
        self.links.borrow().iter().flatten().count()
    }

    /// Watches the slots: changes whenever a link comes up or goes down.
    pub fn subscribe(&self) -> watch::Receiver<Vec<Option<Link>>> {
        self.links.subscribe()
    }

    /// True while the link `id` is still the slot's current connection.
    pub fn is_live(&self, id: LinkId) -> bool {
        self.links
            .borrow()
            .get(id.slot)
            .and_then(Option::as_ref)
            .is_some_and(|l| l.generation == id.generation && !l.session.is_closed())
    }

    fn set(&self, slot: usize, link: Option<Link>) {
        self.load[slot].store(0, Ordering::Relaxed);
        self.heavy[slot].store(0, Ordering::Relaxed);
        self.links.send_modify(|links| links[slot] = link);
    }

    /// A connected link for a new flow placed as `placement` says.
    fn pick(&self, placement: Placement) -> Option<(LinkId, Arc<Session>)> {
        let links = self.links.borrow();
        let n = links.len();
        let start = match placement {
            Placement::Spread => self.next.fetch_add(1, Ordering::Relaxed),
            Placement::Pack => 0,
        };
        let count = |c: &[AtomicUsize], slot: usize| c[slot].load(Ordering::Relaxed);
        let live = (0..n).map(|i| (start + i) % n).filter_map(|slot| {
            let link = links[slot].as_ref()?;
            (!link.session.is_closed()).then_some(Candidate {
                slot,
                flows: count(&self.load, slot),
                heavy: count(&self.heavy, slot),
            })
        });
        let slot = choose(placement, live)?;
        let link = links[slot].as_ref()?;
        Some((
            LinkId {
                slot,
                generation: link.generation,
            },
            link.session.clone(),
        ))
    }

    /// Opens a `direct-tcpip` channel on the least loaded link, waiting up to `link_wait` for
    /// a link when none is up. A link lost during the open is retried on another one. The open
    /// itself is given up after `cap` (sshd answers every open; its own connect ends first).
    pub async fn open(
        &self,
        dst: SocketAddr,
        originator: SocketAddr,
        placement: Placement,
        link_wait: Duration,
        cap: Duration,
    ) -> Result<(LinkId, russh::Channel<russh::client::Msg>), OpenError> {
        let deadline = Instant::now() + link_wait;
        let mut links = self.links.subscribe();
        loop {
            let Some((id, session)) = self.pick(placement) else {
                // No link: wait for one, bounded.
                match tokio::time::timeout_at(deadline, links.changed()).await {
                    Ok(Ok(())) => continue,
                    Ok(Err(_)) | Err(_) => return Err(OpenError::SessionLost),
                }
            };
            self.load[id.slot].fetch_add(1, Ordering::Relaxed);
            match session.open_direct_tcpip(dst, originator, cap).await {
                Ok(channel) => return Ok((id, channel)),
                Err(OpenError::SessionLost) if Instant::now() < deadline => {
                    self.release(id);
                    continue;
                }
                Err(e) => {
                    self.release(id);
                    return Err(e);
                }
            }
        }
    }

    /// The session of a live link.
    pub fn session(&self, id: LinkId) -> Option<Arc<Session>> {
        self.links
            .borrow()
            .get(id.slot)
            .and_then(Option::as_ref)
            .filter(|l| l.generation == id.generation && !l.session.is_closed())
            .map(|l| l.session.clone())
    }

    /// The live link in the lowest slot (where `--expose` listeners are placed).
    pub fn first_live(&self) -> Option<(LinkId, Arc<Session>)> {
        self.links
            .borrow()
            .iter()
            .enumerate()
            .find_map(|(slot, l)| {
                let l = l.as_ref().filter(|l| !l.session.is_closed())?;
                Some((
                    LinkId {
                        slot,
                        generation: l.generation,
                    },
                    l.session.clone(),
                ))
            })
    }

    /// The live link whose session has [`Session::id`] `session`.
    pub fn link_of(&self, session: u64) -> Option<LinkId> {
        self.links
            .borrow()
            .iter()
            .enumerate()
            .find_map(|(slot, l)| {
                let l = l.as_ref().filter(|l| l.session.id() == session)?;
                Some(LinkId {
                    slot,
                    generation: l.generation,
                })
            })
    }

    /// Counts a flow that arrived on `id` (a cloud caller's channel) in the link's load;
    /// [`Pool::release`] undoes it.
    pub fn adopt(&self, id: LinkId) {
        self.load[id.slot].fetch_add(1, Ordering::Relaxed);
    }

    /// A flow opened on `id` has ended.
    pub fn release(&self, id: LinkId) {
        let current = self.links.borrow().get(id.slot).and_then(|l| {
            l.as_ref()
                .filter(|l| l.generation == id.generation)
                .map(|_| ())
        });
        if current.is_some() {
            let _ = self.load[id.slot].fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                Some(v.saturating_sub(1))
            });
        }
    }

    /// A flow on `id` moved enough to count as bulk: [`Placement::Pack`] avoids the link while
    /// the flow lasts ([`Pool::unmark_heavy`] when it ends).
    pub fn mark_heavy(&self, id: LinkId) {
        if self.is_current(id) {
            self.heavy[id.slot].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A flow [`Pool::mark_heavy`] counted has ended.
    pub fn unmark_heavy(&self, id: LinkId) {
        if self.is_current(id) {
            let _ = self.heavy[id.slot].fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                Some(v.saturating_sub(1))
            });
        }
    }

    /// Updates the counters of link `id` as `change` says.
    pub fn update(&self, id: LinkId, change: LinkChange) {
        match change {
            LinkChange::Adopt => self.adopt(id),
            LinkChange::Release => self.release(id),
            LinkChange::Heavy => self.mark_heavy(id),
            LinkChange::Light => self.unmark_heavy(id),
        }
    }

    /// The slot of `id` still holds that connection (its counters belong to it).
    fn is_current(&self, id: LinkId) -> bool {
        self.links
            .borrow()
            .get(id.slot)
            .and_then(Option::as_ref)
            .is_some_and(|l| l.generation == id.generation)
    }

    /// Politely closes every live connection.
    pub async fn disconnect_all(&self) {
        let sessions: Vec<Arc<Session>> = self
            .links
            .borrow()
            .iter()
            .flatten()
            .map(|l| l.session.clone())
            .collect();
        for s in sessions {
            s.disconnect().await;
        }
    }
}

/// Connects once with `opts`, retrying a connection the jump host resets during the SSH
/// handshake (see [`Pool::connect_initial`]); also returns how long the successful try took.
async fn connect_first(
    opts: &SshOptions,
    rng: &mut impl rand::Rng,
) -> Result<(Session, Duration), SshError> {
    let started = Instant::now();
    let deadline = started + opts.connect_timeout;
    let mut refused: u32 = 0;
    loop {
        let attempt = Instant::now();
        match Session::connect(opts).await {
            Ok(s) => return Ok((s, attempt.elapsed())),
            Err(e) if e.is_refusal() => {
                refused += 1;
                let now = Instant::now();
                if now >= deadline {
                    return Err(SshError::RefusedTooLong {
                        target: opts.target_label(),
                        tries: refused,
                        secs: (now - started).as_secs_f64().round() as u64,
                    });
                }
                if refused == 1 {
                    warn!(
                        "the jump host {} is refusing new connections for now (MaxStartups?); retrying for up to {} s",
                        opts.target_label(),
                        opts.connect_timeout.as_secs()
                    );
                }
                let wait =
                    schedule::full_jitter(rng, refused, schedule::SHORT_CAP).min(deadline - now);
                debug!(
                    refused,
                    "{}; retrying in {wait:?}",
                    crate::logging::error_line(&e)
                );
                tokio::time::sleep(wait).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// How often, at most, a long outage is reported again.
const OUTAGE_REMINDER: Duration = Duration::from_secs(300);
/// When an outage is first reported again.
const OUTAGE_FIRST_REMINDER: Duration = Duration::from_secs(60);

/// An outage of the whole pool, as the slots' supervisors report it together: one line when
/// the last connection is lost, one when the first is back, a reminder now and then.
#[derive(Default)]
struct Outage {
    /// Since when no connection has been up, while that lasts.
    since: Option<Instant>,
    /// When to remind the user that the outage goes on.
    remind_at: Option<Instant>,
}

impl Outage {
    /// A slot lost its connection; `left` are still up. True if this loss began an outage.
    fn lost(&mut self, now: Instant, left: usize) -> bool {
        if left > 0 || self.since.is_some() {
            return false;
        }
        self.since = Some(now);
        self.remind_at = Some(now + OUTAGE_FIRST_REMINDER);
        true
    }

    /// A reconnect failed: how long the outage has lasted, if the user should be reminded
    /// of it now.
    fn failed(&mut self, now: Instant) -> Option<Duration> {
        match (self.remind_at, self.since) {
            (Some(at), Some(since)) if now >= at => {
                self.remind_at = Some(now + OUTAGE_REMINDER);
                Some(now - since)
            }
            _ => None,
        }
    }

    /// A slot reconnected: how long the outage lasted, if there was one.
    fn back(&mut self, now: Instant) -> Option<Duration> {
        self.remind_at = None;
        self.since.take().map(|since| now - since)
    }
}

/// The pool's links changed: one came up, one went down, or a reconnect failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkEvent {
    /// Links connected right now.
    pub up: usize,
    /// Links in the pool.
    pub total: usize,
    /// Why (a loss, or why a reconnect failed).
    pub detail: Option<String>,
}

/// Follows the pool's [`LinkEvent`]s, in order (the status board).
pub trait LinkObserver: Send + Sync {
    /// Called by the supervisors on every change; must not block.
    fn link_event(&self, event: LinkEvent);
}

/// What ends a running pool for good: an error no reconnect can fix.
pub type Fatal = Arc<Mutex<Option<SshError>>>;

/// Starts the pool's supervisor, which installs `initial` (from [`Pool::connect_initial`]),
/// connects the empty slots as [`schedule`] says, and reports the links to `links`. A fatal
/// connect error is stored in the returned cell and stops the session through `stop`.
pub fn supervise(
    pool: &Arc<Pool>,
    initial: Vec<Option<Session>>,
    opts: Arc<SshOptions>,
    links: Arc<dyn LinkObserver>,
    stop: watch::Sender<bool>,
) -> Fatal {
    let fatal: Fatal = Arc::new(Mutex::new(None));
    // Reconnected links hand their cloud callers to the pool's queue too.
    let opts = Arc::new(pool.with_inbound(&opts));
    // What is connected already (the supervisor installs it in a moment): at least one.
    links.link_event(LinkEvent {
        up: initial.iter().flatten().count(),
        total: pool.size(),
        detail: None,
    });
    let shared = Shared {
        links,
        stop,
        fatal: fatal.clone(),
        outage: Outage::default(),
    };
    tokio::spawn(run(pool.clone(), initial, opts, shared, rand::random()));
    fatal
}

/// What the supervisor reports through.
struct Shared {
    /// Who follows the links' state.
    links: Arc<dyn LinkObserver>,
    stop: watch::Sender<bool>,
    fatal: Fatal,
    outage: Outage,
}

impl Shared {
    /// Publishes the pool's current link count.
    fn publish(&self, pool: &Pool, detail: Option<String>) {
        self.links.link_event(LinkEvent {
            up: pool.connected(),
            total: pool.size(),
            detail,
        });
    }
}

/// A link's end: its slot and generation.
type Closed = std::pin::Pin<Box<dyn Future<Output = (usize, u64)> + Send>>;
/// The try in flight: its slot, when it started, and how it ended.
type Attempt =
    std::pin::Pin<Box<dyn Future<Output = (usize, Instant, Result<Session, SshError>)> + Send>>;

/// The supervisor: one task for the whole pool, so that it tries one connection at a time.
async fn run(
    pool: Arc<Pool>,
    initial: Vec<Option<Session>>,
    opts: Arc<SshOptions>,
    mut shared: Shared,
    seed: u64,
) {
    let mut stop = shared.stop.subscribe();
    let size = pool.size();
    let first_took = *pool
        .first_took
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let up: Vec<bool> = (0..size)
        .map(|i| initial.get(i).is_some_and(Option::is_some))
        .collect();
    let mut schedule = Schedule::new(&up, seed, Instant::now(), first_took);
    let mut generations = vec![0u64; size];
    let mut closed: FuturesUnordered<Closed> = FuturesUnordered::new();
    let install = |generations: &mut [u64],
                   slot: usize,
                   session: Session,
                   closed: &mut FuturesUnordered<Closed>| {
        generations[slot] += 1;
        let generation = generations[slot];
        let session = Arc::new(session);
        // Each connection's sshd sends without Nagle's delay once a command ran on it.
        if opts.bulk_mode {
            tokio::spawn({
                let session = session.clone();
                async move { session.start_bulk_mode().await }
            });
        }
        pool.set(
            slot,
            Some(Link {
                generation,
                session: session.clone(),
            }),
        );
        closed.push(Box::pin(async move {
            session.closed().await;
            (slot, generation)
        }));
    };
    for (slot, session) in initial.into_iter().enumerate().take(size) {
        if let Some(session) = session {
            install(&mut generations, slot, session, &mut closed);
        }
    }
    shared.publish(&pool, None);
    let mut attempt: Option<Attempt> = None;
    loop {
        if attempt.is_none()
            && let Some(slot) = schedule.poll_connect(Instant::now())
        {
            let opts = opts.clone();
            attempt = Some(Box::pin(async move {
                let started = Instant::now();
                (slot, started, Session::connect(&opts).await)
            }));
        }
        let wake = schedule.poll_timeout();
        tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => return,
            Some((slot, generation)) = closed.next(), if !closed.is_empty() => {
                if *shared.stop.borrow() {
                    // Closed because we are shutting down: not a loss.
                    return;
                }
                let current = pool.links.borrow()[slot]
                    .as_ref()
                    .is_some_and(|l| l.generation == generation);
                if !current {
                    continue;
                }
                pool.set(slot, None);
                let now = Instant::now();
                schedule.lost(now, slot);
                let left = pool.connected();
                if shared.outage.lost(now, left) {
                    warn!(
                        "lost the connection to the jump host {}: flows in progress were reset; reconnecting",
                        opts.jump
                    );
                } else {
                    debug!(slot, left, "lost an SSH connection: its flows are reset; reconnecting it");
                }
                shared.publish(&pool, Some(format!("lost the connection to {}", opts.jump)));
            }
            (slot, started, result) = async { attempt.as_mut().expect("guarded").await }, if attempt.is_some() => {
                attempt = None;
                let now = Instant::now();
                match result {
                    Ok(session) => {
                        match shared.outage.back(now) {
                            Some(took) => info!(
                                "reconnected to the jump host {} after {} s",
                                opts.jump,
                                took.as_secs_f64().round()
                            ),
                            None => debug!(slot, "connected"),
                        }
                        schedule.connected(now, slot, now - started);
                        install(&mut generations, slot, session, &mut closed);
                        shared.publish(&pool, None);
                    }
                    Err(e) if e.is_fatal() => {
                        // The session stops and says why, once.
                        debug!(slot, "connect refused for good: {e}");
                        if let Ok(mut f) = shared.fatal.lock() {
                            f.get_or_insert(e);
                        }
                        let _ = shared.stop.send(true);
                        return;
                    }
                    Err(e) => {
                        schedule.failed(now, slot);
                        let why = crate::logging::error_line(&e);
                        let next = schedule
                            .poll_timeout()
                            .map(|at| at.saturating_duration_since(now))
                            .unwrap_or_default();
                        let what = if generations[slot] > 0 { "reconnect" } else { "connect" };
                        debug!(slot, next_try_in = ?next, "{what} failed: {why}");
                        if let Some(lasted) = shared.outage.failed(now) {
                            warn!(
                                "still no connection to the jump host after {} s ({why}); retrying",
                                lasted.as_secs()
                            );
                        }
                        shared.publish(&pool, Some(why));
                    }
                }
            }
            () = sleep_until(wake), if wake.is_some() => {}
        }
    }
}

/// Sleeps until `at` (forever when `None`; the caller guards that branch).
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_flows_fill_the_first_link_without_bulk_up_to_the_bound_then_the_next() {
        let links = |v: &[(usize, usize)]| {
            v.iter()
                .enumerate()
                .map(|(slot, &(flows, heavy))| Candidate { slot, flows, heavy })
                .collect::<Vec<_>>()
                .into_iter()
        };
        let pack = |v: &[(usize, usize)]| choose(Placement::Pack, links(v));
        let spread = |v: &[(usize, usize)]| choose(Placement::Spread, links(v));
        assert_eq!(pack(&[(10, 0), (0, 0), (0, 0)]), Some(0), "together");
        assert_eq!(pack(&[(10, 1), (3, 0), (0, 0)]), Some(1), "off bulk");
        let full = PACK_MAX_FLOWS;
        assert_eq!(
            pack(&[(full, 0), (3, 0), (0, 0)]),
            Some(1),
            "past the bound"
        );
        assert_eq!(pack(&[(full, 0), (3, 1), (0, 0)]), Some(2));
        assert_eq!(
            pack(&[(full + 5, 0), (full, 0), (full + 1, 3)]),
            Some(1),
            "all full: the fewest flows"
        );
        assert_eq!(spread(&[(10, 0), (3, 1), (4, 0)]), Some(1));
        assert_eq!(pack(&[]), None);
    }

    #[test]
    fn an_outage_is_reported_once_when_the_last_connection_goes_and_once_when_one_is_back() {
        let t0 = Instant::now();
        let mut o = Outage::default();
        // Four connections drop one after the other: only the last loss begins the outage.
        assert!(!o.lost(t0, 3));
        assert!(!o.lost(t0, 2));
        assert!(!o.lost(t0, 1));
        assert!(o.lost(t0, 0));
        assert!(!o.lost(t0, 0), "a slot that was already down says nothing");
        // Retries during the first minute stay quiet; then a reminder, then every 5 min.
        assert_eq!(o.failed(t0 + Duration::from_secs(18)), None);
        assert_eq!(
            o.failed(t0 + Duration::from_secs(61)),
            Some(Duration::from_secs(61))
        );
        assert_eq!(o.failed(t0 + Duration::from_secs(120)), None);
        assert!(o.failed(t0 + Duration::from_secs(361)).is_some());
        // The first slot back ends it; the others say nothing.
        assert_eq!(
            o.back(t0 + Duration::from_secs(400)),
            Some(Duration::from_secs(400))
        );
        assert_eq!(o.back(t0 + Duration::from_secs(401)), None);
        assert_eq!(o.failed(t0 + Duration::from_secs(999)), None);
    }
}
