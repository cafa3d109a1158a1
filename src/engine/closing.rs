//! Flows that ended in the engine but whose SSH channel is not closed yet.
//!
//! When a flow ends ([`Event::Close`](super::Event::Close)) its socket and table entry go at
//! once (the app may reuse its port), but its channel may still have bytes to write: after a
//! normal end (FIN both ways) the driver writes what it holds for the channel, then closes
//! it. Until the driver reports the close done ([`Engine::handle_close_done`]) the flow is
//! *closing*: it is counted in the status and against the flow limits, since its channel and
//! buffers still cost as much as an open flow's. A flush that does not finish within
//! [`EngineConfig::close_linger`] (a server that stopped reading) is cut short
//! ([`Event::CloseNow`](super::Event::CloseNow)), as the kernel gives up on an orphaned
//! connection; a reset flow is closed at once and discards what it held. An entry whose
//! close is never reported is forgotten [`CLOSE_GRACE`] after the close was asked for, so
//! nothing here can grow without bound.
//!
//! Pure bookkeeping on the engine's clock: no I/O.
//!
//! [`Engine::handle_close_done`]: super::Engine::handle_close_done
//! [`EngineConfig::close_linger`]: super::EngineConfig::close_linger

use std::collections::HashMap;

use smoltcp::time::{Duration, Instant};

use super::flow::FlowId;

/// How long after the driver was asked to close a channel at once (a reset, or a flush that
/// ran out of time) its entry is kept at most. Closing a channel only queues a message for
/// the SSH session, so this is a backstop for a report that never comes, not a wait.
pub const CLOSE_GRACE: Duration = Duration::from_secs(10);

/// What a closing flow's channel is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    /// Writing what it holds, then its close: cut short at the deadline.
    Flushing,
    /// Closed at once (nothing more is written): forgotten at the deadline.
    Closing,
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    inbound: bool,
    stage: Stage,
    deadline: Instant,
}

/// What [`ClosingFlows::expire`] found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Expired {
    /// Flushes that ran out of time: close these channels now, discarding what they hold.
    pub cut: Vec<FlowId>,
    /// Entries whose close was never reported, dropped.
    pub forgotten: usize,
}

/// The closing flows.
#[derive(Debug, Default)]
pub struct ClosingFlows {
    entries: HashMap<FlowId, Entry>,
    inbound: usize,
}

impl ClosingFlows {
    /// A flow ended at `now`: its channel flushes within `linger` (`flush`), or is closed at
    /// once.
    pub fn insert(
        &mut self,
        id: FlowId,
        inbound: bool,
        flush: bool,
        now: Instant,
        linger: Duration,
    ) {
        let (stage, deadline) = if flush {
            (Stage::Flushing, now + linger)
        } else {
            (Stage::Closing, now + CLOSE_GRACE)
        };
        let old = self.entries.insert(
            id,
            Entry {
                inbound,
                stage,
                deadline,
            },
        );
        self.uncount(old);
        if inbound {
            self.inbound += 1;
        }
    }

    /// The flow's channel is closed; false if it was not closing.
    pub fn done(&mut self, id: FlowId) -> bool {
        let old = self.entries.remove(&id);
        self.uncount(old);
        old.is_some()
    }

    fn uncount(&mut self, old: Option<Entry>) {
        if old.is_some_and(|e| e.inbound) {
            self.inbound -= 1;
        }
    }

    /// Cuts short the flushes past their deadline and forgets the closes never reported.
    pub fn expire(&mut self, now: Instant) -> Expired {
        let mut out = Expired::default();
        let mut gone = Vec::new();
        for (id, e) in &mut self.entries {
            if now < e.deadline {
                continue;
            }
            match e.stage {
                Stage::Flushing => {
                    e.stage = Stage::Closing;
                    e.deadline = now + CLOSE_GRACE;
                    out.cut.push(*id);
                }
                Stage::Closing => gone.push(*id),
            }
        }
        out.forgotten = gone.len();
        for id in gone {
            self.done(id);
        }
        out.cut.sort_unstable();
        out
    }

    /// Closing flows, all of them.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Closing flows that were cloud callers (inbound).
    pub fn inbound(&self) -> usize {
        self.inbound
    }

    /// Closing flows that were the laptop's own connections (outbound).
    pub fn outbound(&self) -> usize {
        self.entries.len() - self.inbound
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: Instant = Instant::from_millis_const(100_000);
    const LINGER: Duration = Duration::from_secs(60);

    #[test]
    fn a_flush_is_cut_short_at_the_linger_deadline_and_a_reset_is_forgotten_after_the_grace() {
        let mut c = ClosingFlows::default();
        c.insert(FlowId(1), false, true, T0, LINGER);
        c.insert(FlowId(2), true, false, T0, LINGER);
        assert_eq!((c.len(), c.outbound(), c.inbound()), (2, 1, 1));

        // The reset's close is never reported: forgotten after the grace; the flush goes on.
        let e = c.expire(T0 + CLOSE_GRACE);
        assert_eq!(
            e,
            Expired {
                cut: vec![],
                forgotten: 1
            }
        );
        assert_eq!((c.len(), c.inbound()), (1, 0));

        // The flush runs out of time: cut, then given the grace to close.
        assert_eq!(
            c.expire(T0 + LINGER - Duration::from_millis(1)),
            Expired::default()
        );
        let e = c.expire(T0 + LINGER);
        assert_eq!(e.cut, vec![FlowId(1)]);
        assert_eq!(c.len(), 1, "still closing until its close is reported");
        assert!(c.done(FlowId(1)));
        assert!(!c.done(FlowId(1)), "reported once");
        assert_eq!(c.len(), 0);
    }
}
