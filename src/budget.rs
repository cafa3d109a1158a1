//! One memory budget for every flow's buffered bytes (`--memory-budget`, default 64 MiB).
//!
//! What a flow can make mse-vpn hold is, on the download side, its SSH channel's receive
//! window (the jump host may fill it whenever it likes: a window once granted cannot be
//! taken back) plus what the engine holds for it (bytes waiting for the app, the socket's
//! unacknowledged bytes), and on the upload side what the engine has taken from the app and
//! not yet written to the channel. A JVM stopped at a breakpoint stops all of its
//! connections at once: with 4 MiB windows, a few hundred paused downloads would cost
//! gigabytes. So every window grant asks the budget ([`ChannelWindows::grant`], called from
//! russh's `adjust_window` hook as each channel's reader consumes half its window), and the
//! engine sizes what it takes per flow from it ([`allowance`]): while the budget is less
//! than half used, every flow gets its full window; beyond that, new grants shrink in
//! proportion to what is left, down to [`FLOOR`] per flow, so every flow still progresses.
//!
//! ```text
//!   committed windows (ChannelWindows, per SSH connection) ─┐
//!                                                            ├─▶ MemoryBudget::used ─▶ allowance
//!   engine-held bytes (EngineStats::buffered, per turn) ────┘
//! ```
//!
//! The bound that holds: the budget, plus per flow its first window
//! ([`INITIAL_WINDOW`], granted when the channel opens, before any grant) and [`FLOOR`]. A
//! channel's window also grows only as fast as its reader: a grant doubles the channel's
//! target only if half of the previous one was read within [`GROW_WITHIN`], and a channel
//! read slowly falls back towards [`INITIAL_WINDOW`], so idle pooled connections do not
//! hold large windows.
//!
//! Pure: atomics shared between the SSH sessions and the driver, and arithmetic; time is an
//! argument. No I/O.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Default of `--memory-budget`: 64 MiB. What the budget must cover is the throughput of
/// all flows together times the round trip through the jump host (the windows in flight):
/// 64 MiB carries 5 Gbit/s at 100 ms, more than one SSH connection moves, and still gives
/// about eight bulk flows their full 4 MiB windows (full grants while under half the
/// budget). A larger budget only lets paused flows keep windows they no longer need: 50
/// paused downloads (`scripts/bench`'s `paused_50`) held 163–195 MB of RSS with 256 MiB and
/// 107–110 MB with 64, and read their first 8 MiB as fast.
pub const DEFAULT_BUDGET: u64 = 64 << 20;
/// The least any flow is granted, however full the budget: two of sshd's largest data
/// packets (32 KiB), so every flow keeps moving.
pub const FLOOR: u64 = 64 << 10;
/// Each channel's first receive window (russh's `window_size`), granted at open.
pub const INITIAL_WINDOW: u32 = 256 << 10;
/// A grant that comes within this long of the channel's previous one (its reader consumed
/// half its window that fast) doubles the channel's target window.
pub const GROW_WITHIN: Duration = Duration::from_secs(1);
/// A grant that comes this long after the previous one halves the target (down to
/// [`INITIAL_WINDOW`]): the channel is read slowly and needs no large window.
pub const SHRINK_AFTER: Duration = Duration::from_secs(10);

/// How much a flow may have, of at most `max`, when everything else holds `others` of a
/// budget of `limit` bytes: `max` while `others` is at most half the budget; then in
/// proportion to what is left, never more than what is left; never less than `floor`.
pub fn allowance(limit: u64, others: u64, max: u64, floor: u64) -> u64 {
    let free = limit.saturating_sub(others);
    let half = (limit / 2).max(1);
    let share = if others <= limit / 2 {
        max
    } else {
        floor + (max.saturating_sub(floor) as u128 * free as u128 / half as u128) as u64
    };
    share.min(free).min(max).max(floor.min(max))
}

/// The budget, shared by the SSH connections' handlers and the driver.
#[derive(Debug)]
pub struct MemoryBudget {
    limit: u64,
    /// Receive windows committed to channels (see [`ChannelWindows`]).
    windows: AtomicU64,
    /// Bytes the engine holds for flows (set by the driver after each turn).
    engine: AtomicU64,
}

impl MemoryBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: u64) -> Arc<MemoryBudget> {
        Arc::new(MemoryBudget {
            limit,
            windows: AtomicU64::new(0),
            engine: AtomicU64::new(0),
        })
    }

    /// The budget, in bytes.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Receive windows committed to channels right now.
    pub fn windows(&self) -> u64 {
        self.windows.load(Ordering::Relaxed)
    }

    /// Bytes the engine holds (as last reported).
    pub fn engine(&self) -> u64 {
        self.engine.load(Ordering::Relaxed)
    }

    /// Records what the engine holds now.
    pub fn set_engine(&self, bytes: u64) {
        self.engine.store(bytes, Ordering::Relaxed);
    }

    /// Everything counted against the budget.
    pub fn used(&self) -> u64 {
        self.windows() + self.engine()
    }

    fn commit(&self, old: u64, new: u64) {
        if new >= old {
            self.windows.fetch_add(new - old, Ordering::Relaxed);
        } else {
            self.windows.fetch_sub(old - new, Ordering::Relaxed);
        }
    }
}

/// One channel's window, as far as the budget knows it.
#[derive(Clone, Copy, Debug)]
struct Window {
    /// What is committed: the most its peer may have sent and we not yet read.
    committed: u64,
    /// The target of its last grant.
    target: u64,
    /// When it was last granted.
    at: Instant,
}

/// The receive windows of one SSH connection's channels, counted in a [`MemoryBudget`].
/// Owned by the connection's handler; what it committed is released when it is dropped.
#[derive(Debug)]
pub struct ChannelWindows {
    budget: Arc<MemoryBudget>,
    /// The most a grant gives a channel (the configured `--window`).
    max: u64,
    channels: HashMap<u32, Window>,
}

impl ChannelWindows {
    /// The windows of a new connection, granting at most `max` bytes per channel.
    pub fn new(budget: Arc<MemoryBudget>, max: u32) -> ChannelWindows {
        ChannelWindows {
            budget,
            max: u64::from(max.max(INITIAL_WINDOW)),
            channels: HashMap::new(),
        }
    }

    /// Data arrived on `channel`: from its first data on, its window ([`INITIAL_WINDOW`] at
    /// first) counts. (Counting from the first data rather than from the open leaves out
    /// channels that are refused or never used, which get no close.)
    pub fn seen(&mut self, channel: u32, now: Instant) {
        if !self.channels.contains_key(&channel) {
            self.open(channel, now);
        }
    }

    /// A channel opened with [`INITIAL_WINDOW`].
    pub fn open(&mut self, channel: u32, now: Instant) {
        let w = Window {
            committed: u64::from(INITIAL_WINDOW),
            target: u64::from(INITIAL_WINDOW),
            at: now,
        };
        let old = self.channels.insert(channel, w).map_or(0, |w| w.committed);
        self.budget.commit(old, w.committed);
    }

    /// The channel's reader consumed half its window: the target for its next grant
    /// (how many bytes may be outstanding on it afterwards).
    pub fn grant(&mut self, channel: u32, now: Instant) -> u32 {
        let w = *self.channels.entry(channel).or_insert(Window {
            committed: u64::from(INITIAL_WINDOW),
            target: u64::from(INITIAL_WINDOW),
            at: now,
        });
        let since = now.saturating_duration_since(w.at);
        let wanted = if since < GROW_WITHIN {
            (w.target * 2).min(self.max)
        } else if since >= SHRINK_AFTER {
            (w.target / 2).max(u64::from(INITIAL_WINDOW))
        } else {
            w.target
        };
        let others = self.budget.used().saturating_sub(w.committed);
        let target = allowance(self.budget.limit(), others, wanted, FLOOR);
        // Half of the last target was read since that grant: at most the other half is
        // outstanding, and the grant tops it up to `target`.
        let committed = target.max(w.target / 2);
        self.budget.commit(w.committed, committed);
        self.channels.insert(
            channel,
            Window {
                committed,
                target,
                at: now,
            },
        );
        u32::try_from(target).unwrap_or(u32::MAX)
    }

    /// The channel is closed: its window no longer counts.
    pub fn close(&mut self, channel: u32) {
        if let Some(w) = self.channels.remove(&channel) {
            self.budget.commit(w.committed, 0);
        }
    }
}

impl Drop for ChannelWindows {
    fn drop(&mut self) {
        let all: u64 = self.channels.values().map(|w| w.committed).sum();
        self.budget.commit(all, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn the_allowance_is_full_below_half_then_shrinks_to_the_floor() {
        let a = |others| allowance(256 * MIB, others, 4 * MIB, FLOOR);
        assert_eq!(a(0), 4 * MIB);
        assert_eq!(a(128 * MIB), 4 * MIB, "half used: still full");
        let mid = a(192 * MIB);
        assert!(mid > FLOOR && mid < 4 * MIB, "{mid}");
        assert_eq!(a(256 * MIB), FLOOR, "full: the floor");
        assert_eq!(
            a(1024 * MIB),
            FLOOR,
            "over: the floor, every flow still moves"
        );
        assert!(a(255 * MIB) <= MIB, "never more than what is left");
        // Monotonic.
        let mut last = u64::MAX;
        for used in (0..=300).map(|m| m * MIB) {
            let now = a(used);
            assert!(now <= last);
            last = now;
        }
    }

    #[test]
    fn windows_grow_with_a_fast_reader_shrink_with_a_slow_one_and_are_released() {
        let budget = MemoryBudget::new(256 * MIB);
        let t0 = Instant::now();
        let mut w = ChannelWindows::new(budget.clone(), 4 * MIB as u32);
        w.open(1, t0);
        assert_eq!(budget.windows(), u64::from(INITIAL_WINDOW));
        // Read fast: doubles up to the configured window.
        let mut t = t0;
        let mut targets = Vec::new();
        for _ in 0..6 {
            t += Duration::from_millis(10);
            targets.push(w.grant(1, t));
        }
        assert_eq!(targets[0], 2 * INITIAL_WINDOW);
        assert_eq!(*targets.last().unwrap(), 4 * MIB as u32);
        assert_eq!(budget.windows(), 4 * MIB);
        // Read slowly: back towards the first window.
        t += SHRINK_AFTER;
        assert_eq!(w.grant(1, t), 2 * MIB as u32);
        // Closed: released; a dropped connection releases the rest.
        w.open(2, t);
        w.close(1);
        assert_eq!(budget.windows(), u64::from(INITIAL_WINDOW));
        drop(w);
        assert_eq!(budget.windows(), 0);
    }

    #[test]
    fn a_full_budget_shrinks_new_grants_to_the_floor_but_never_to_nothing() {
        let budget = MemoryBudget::new(16 * MIB);
        let t0 = Instant::now();
        let mut w = ChannelWindows::new(budget.clone(), 4 * MIB as u32);
        budget.set_engine(16 * MIB);
        w.open(1, t0);
        assert_eq!(w.grant(1, t0), FLOOR as u32);
        budget.set_engine(0);
        assert!(
            w.grant(1, t0 + Duration::from_millis(1)) > FLOOR as u32,
            "room again"
        );
    }
}
