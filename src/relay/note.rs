//! What the relay has to say, as values ([`Note`]): warnings about flows that failed,
//! connections refused and TUN faults, rate-limited through [`Repeats`] into one line per
//! kind per window plus a summary; and the debug lines of a flow's life. The driver hands
//! each note to [`Note::log`]; tests read them.
//!
//! Owns the repeat counters and the wording. Never touches a flow, a channel or the clock.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tracing::{debug, info_span, warn};

use crate::engine::{CloseReason, FlowId, FlowKey, InboundError};
use crate::logging::bytes as human_bytes;
use crate::repeats::{Repeats, Summary};

use super::CallRefused;

/// Repeated warnings of one kind are summarized over this window.
pub const WARN_WINDOW: Duration = Duration::from_secs(10);

/// Which TUN operation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TunOp {
    /// Reading a packet.
    Read,
    /// Writing a packet.
    Write,
}

impl std::fmt::Display for TunOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TunOp::Read => "read",
            TunOp::Write => "write",
        })
    }
}

/// One line for the log. See the module documentation.
#[derive(Clone, Debug, PartialEq)]
pub enum Note {
    /// A flow's channel could not be opened, or it was refused locally (warning, the first
    /// of its destination and reason in a window).
    FlowFailed {
        /// The flow.
        id: FlowId,
        /// Its 4-tuple.
        key: FlowKey,
        /// Why.
        reason: CloseReason,
    },
    /// A flow was refused because too many channel opens were pending (warning, the first
    /// in a window).
    OpenLimited {
        /// The flow.
        id: FlowId,
        /// Its 4-tuple.
        key: FlowKey,
    },
    /// A connection was refused before it became a flow (warning, the first of its reason
    /// in a window).
    Refused {
        /// Its 4-tuple.
        key: FlowKey,
        /// Why ([`CloseReason::FlowLimit`]).
        reason: CloseReason,
    },
    /// The jump host forbids TCP forwarding (warning).
    Prohibited,
    /// A TUN read or write failed for a passing reason (warning, the first of its kind in a
    /// window).
    TunFailed {
        /// Which.
        op: TunOp,
        /// The OS error number, if any.
        errno: Option<i32>,
        /// The error's kind (for errors with no number).
        kind: std::io::ErrorKind,
    },
    /// Failures of one TUN operation and `errno` (`None`: of kinds beyond the table) were
    /// not logged over a window (warning).
    TunSummary(Summary<(TunOp, Option<i32>)>),
    /// Flows to one destination failed for one reason (`None`: to other destinations) and
    /// were not logged over a window (warning).
    FailureSummary(Summary<(SocketAddr, CloseReason)>),
    /// Connections refused for one reason were not logged over a window (warning).
    RefusalSummary(Summary<CloseReason>),
    /// The engine could not start a flow for a cloud caller (warning).
    CallerRefused {
        /// The caller.
        caller: SocketAddr,
        /// Where it was going.
        local: SocketAddr,
        /// Why.
        error: InboundError,
    },
    /// A flow ended (debug): how long it lasted and what it moved.
    Closed {
        /// The flow.
        id: FlowId,
        /// Its 4-tuple.
        key: FlowKey,
        /// Why it ended.
        reason: CloseReason,
        /// Seconds since its SYN (or its call).
        secs: f64,
        /// Bytes from the app.
        up: u64,
        /// Bytes to the app.
        down: u64,
    },
    /// A closing flow's flush ran out of time (debug).
    FlushCut {
        /// The flow.
        id: FlowId,
    },
    /// An SSH connection was lost with flows on it, which are reset (debug).
    LinkLost {
        /// How many.
        flows: usize,
    },
    /// A cloud caller was refused before reaching the engine (debug).
    CallRefused {
        /// The exposed port it called.
        port: u16,
        /// Why.
        why: CallRefused,
    },
    /// The host gives no unprivileged ICMP socket: pings outside the VPC are answered
    /// "prohibited" (warning, at most every 30 s).
    EchoDenied,
    /// The direct path's UDP table was full: the association idle longest was dropped to
    /// make room (debug); its app's next datagram makes a new one.
    UdpEvicted {
        /// The dropped association's app socket and destination.
        key: super::UdpKey,
    },
    /// A cloud caller's connection to the local app started (debug).
    Caller {
        /// Its flow.
        id: FlowId,
        /// The caller.
        caller: SocketAddr,
        /// Where it goes.
        local: SocketAddr,
    },
}

impl Note {
    /// True for the notes logged as warnings (the rest are debug lines).
    pub fn is_warning(&self) -> bool {
        !matches!(
            self,
            Note::Closed { .. }
                | Note::FlushCut { .. }
                | Note::LinkLost { .. }
                | Note::CallRefused { .. }
                | Note::UdpEvicted { .. }
                | Note::Caller { .. }
        )
    }

    /// Logs the note through `tracing`, in its flow's span where it has one.
    pub fn log(&self) {
        let flow = |id: &FlowId, key: &FlowKey| info_span!("flow", id = %id, src = %key.src, dst = %key.dst);
        match self {
            Note::FlowFailed { id, key, reason } => {
                let _e = flow(id, key).entered();
                warn!("flow to {} failed: {reason}", key.dst);
            }
            Note::OpenLimited { id, key } => {
                let _e = flow(id, key).entered();
                warn!("connection refused: {}", CloseReason::OpenLimit);
            }
            Note::Refused { key, reason } => {
                warn!(src = %key.src, dst = %key.dst, "connection refused: {reason}")
            }
            Note::Prohibited => warn!(
                "the jump host refused to forward: enable AllowTcpForwarding in its sshd_config"
            ),
            Note::TunFailed { op, errno, kind } => {
                let e = match errno {
                    Some(n) => std::io::Error::from_raw_os_error(*n),
                    None => std::io::Error::from(*kind),
                };
                warn!("TUN {op} failed ({e}); the packet is dropped, the session goes on")
            }
            Note::TunSummary(s) => match &s.kind {
                Some((op, _)) => warn!("TUN {op} failures: {}", s.tail()),
                None => warn!("TUN failures: {}", s.tail()),
            },
            Note::FailureSummary(s) => match &s.kind {
                Some((dst, reason)) => warn!("flow to {dst} failed: {reason}: {}", s.tail()),
                None => warn!("flows to other destinations failed: {}", s.tail()),
            },
            Note::RefusalSummary(s) => match &s.kind {
                Some(reason) => warn!("connections refused: {reason}: {}", s.tail()),
                None => warn!("connections refused: {}", s.tail()),
            },
            Note::CallerRefused {
                caller,
                local,
                error,
            } => warn!(caller = %caller, local = %local, "cloud caller refused: {error}"),
            Note::Closed {
                id,
                key,
                reason,
                secs,
                up,
                down,
            } => {
                let _e = flow(id, key).entered();
                debug!(
                    "closed ({reason}) after {secs:.3} s: {} up, {} down",
                    human_bytes(*up),
                    human_bytes(*down)
                );
            }
            Note::FlushCut { id } => debug!(flow = %id, "closing flow: its flush ran out of time"),
            Note::LinkLost { flows } => {
                debug!(flows, "resetting the flows of a lost SSH connection")
            }
            Note::CallRefused { port, why } => debug!(port, "cloud caller refused: {why}"),
            Note::EchoDenied => warn!(
                "ping outside the VPC is not carried: this host gives this user no ICMP socket; allow the user's group in the sysctl net.ipv4.ping_group_range (e.g. \"0 2147483647\")"
            ),
            Note::UdpEvicted { key } => debug!(
                src = %key.src,
                dst = %key.dst,
                "UDP table full: the association idle longest is dropped"
            ),
            Note::Caller { id, caller, local } => {
                debug!(flow = %id, caller = %caller, local = %local, "cloud caller")
            }
        }
    }
}

/// Failures worth a (rate-limited) warning; every other end of a flow is a debug line.
fn is_failure(reason: CloseReason) -> bool {
    matches!(
        reason,
        CloseReason::OpenRefused
            | CloseReason::OpenProhibited
            | CloseReason::OpenTimedOut
            | CloseReason::OpenLimit
            | CloseReason::FlowLimit
    )
}

/// The repeat counters behind the rate-limited warnings.
#[derive(Debug)]
pub struct Notes {
    /// Flows that failed, by destination and reason.
    failures: Repeats<(SocketAddr, CloseReason)>,
    /// Connections refused (over the opening bound, the flow limit), by reason.
    refusals: Repeats<CloseReason>,
    /// TUN reads and writes that failed for a passing reason, by operation and `errno`.
    tun_faults: Repeats<(TunOp, Option<i32>)>,
}

impl Default for Notes {
    fn default() -> Self {
        Notes {
            failures: Repeats::new(WARN_WINDOW, 64),
            refusals: Repeats::new(WARN_WINDOW, 8),
            tun_faults: Repeats::new(WARN_WINDOW, 8),
        }
    }
}

impl Notes {
    /// The warning for a flow that ended, if it is one to log now.
    pub fn ended(
        &mut self,
        now: Instant,
        id: FlowId,
        key: FlowKey,
        reason: CloseReason,
    ) -> Option<Note> {
        if reason == CloseReason::OpenLimit {
            // A local condition, not the destination's: one line per window for all of them.
            return self
                .refusals
                .hit(now, reason)
                .then_some(Note::OpenLimited { id, key });
        }
        (is_failure(reason) && self.failures.hit(now, (key.dst, reason)))
            .then_some(Note::FlowFailed { id, key, reason })
    }

    /// The warning for a connection refused before it became a flow, if it is one to log.
    pub fn refused(&mut self, now: Instant, key: FlowKey, reason: CloseReason) -> Option<Note> {
        self.refusals
            .hit(now, reason)
            .then_some(Note::Refused { key, reason })
    }

    /// The warning for a TUN fault, if it is one to log.
    pub fn tun_failed(&mut self, now: Instant, op: TunOp, e: &std::io::Error) -> Option<Note> {
        let errno = e.raw_os_error();
        self.tun_faults
            .hit(now, (op, errno))
            .then_some(Note::TunFailed {
                op,
                errno,
                kind: e.kind(),
            })
    }

    /// The summaries of windows that ended by `now`.
    pub fn poll(&mut self, now: Instant) -> impl Iterator<Item = Note> {
        let tun = self.tun_faults.poll(now).into_iter().map(Note::TunSummary);
        let failures = self
            .failures
            .poll(now)
            .into_iter()
            .map(Note::FailureSummary);
        let refusals = self
            .refusals
            .poll(now)
            .into_iter()
            .map(Note::RefusalSummary);
        tun.chain(failures).chain(refusals)
    }

    /// When the next summary is due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        [
            self.failures.poll_timeout(),
            self.refusals.poll_timeout(),
            self.tun_faults.poll_timeout(),
        ]
        .into_iter()
        .flatten()
        .min()
    }
}
