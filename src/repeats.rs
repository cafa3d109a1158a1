//! Rate-limiting of repeated warnings: the first occurrence of a kind of warning is logged at
//! once; repeats of the same kind within a window are only counted, and one summary line
//! ("… 99 more in the last 10 s") is logged when the window ends. A steady flood (a SYN flood
//! over the flow limit, an app reconnecting to a closed port in a loop) thus costs one line
//! per window instead of one per packet or per connection.
//!
//! Sans-IO, like the engine: no clock and no logging here. Time is an argument; the caller
//! logs what [`Repeats::hit`] and [`Repeats::poll`] tell it to, and wakes up at
//! [`Repeats::poll_timeout`] (or simply polls on its next turn) to log the summaries. Memory
//! is bounded: at most `max_kinds` kinds are tracked at once; occurrences of further kinds
//! while the table is full are counted together and summarized as [`Summary::kind`] `None`.
//!
//! ```
//! use std::time::{Duration, Instant};
//! use mse_vpn::repeats::Repeats;
//!
//! let mut refused = Repeats::new(Duration::from_secs(10), 64);
//! let t0 = Instant::now();
//! for i in 0..100 {
//!     let at = t0 + Duration::from_millis(i);
//!     if refused.hit(at, "10.0.0.10:81") {
//!         // Only the first of the 100: log it in full here.
//!     }
//! }
//! let summaries = refused.poll(t0 + Duration::from_secs(10));
//! assert_eq!(summaries[0].suppressed, 99);
//! // Log: "10.0.0.10:81: 99 more in the last 10 s".
//! ```

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// Counts repeats of warnings by kind `K` (a reason, a destination, or both). See the module
/// documentation.
#[derive(Debug)]
pub struct Repeats<K> {
    /// How long repeats of a kind are counted before they are summarized.
    window: Duration,
    /// The most kinds tracked at once.
    max_kinds: usize,
    /// Kinds seen in their current window.
    kinds: HashMap<K, Window>,
    /// Occurrences of kinds that found the table full, in the current overflow window.
    overflow: Option<Window>,
}

/// One kind's current window.
#[derive(Clone, Copy, Debug)]
struct Window {
    /// When it began (the occurrence that was logged, or the previous summary).
    since: Instant,
    /// Occurrences since then that were not logged.
    suppressed: u64,
}

/// A window that ended with suppressed occurrences: log one line for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Summary<K> {
    /// The kind, or `None` for occurrences of kinds that did not fit in the table.
    pub kind: Option<K>,
    /// How many occurrences were not logged.
    pub suppressed: u64,
    /// How long the window lasted.
    pub over: Duration,
}

impl<K: Eq + Hash + Clone> Repeats<K> {
    /// Repeats are summarized every `window`; at most `max_kinds` (at least 1) kinds are
    /// tracked at once.
    pub fn new(window: Duration, max_kinds: usize) -> Repeats<K> {
        Repeats {
            window,
            max_kinds: max_kinds.max(1),
            kinds: HashMap::new(),
            overflow: None,
        }
    }

    /// Records an occurrence of `kind` at `now`. True if the caller should log it in full
    /// (the first of its kind in a window); false if it was counted for a later summary.
    /// A window that has ended is closed first, as [`Repeats::poll`] would: call `poll`
    /// regularly so that its summary is not lost.
    pub fn hit(&mut self, now: Instant, kind: K) -> bool {
        if let Some(w) = self.kinds.get_mut(&kind) {
            if now.saturating_duration_since(w.since) < self.window {
                w.suppressed += 1;
                return false;
            }
            if w.suppressed == 0 {
                // A quiet window ended: this one starts afresh, and is logged.
                w.since = now;
                return true;
            }
            // The window ended with repeats not yet summarized: keep counting; the next
            // poll reports them.
            w.suppressed += 1;
            return false;
        }
        if self.kinds.len() >= self.max_kinds {
            self.expire(now);
        }
        if self.kinds.len() >= self.max_kinds {
            let w = self.overflow.get_or_insert(Window {
                since: now,
                suppressed: 0,
            });
            w.suppressed += 1;
            return false;
        }
        self.kinds.insert(
            kind,
            Window {
                since: now,
                suppressed: 0,
            },
        );
        true
    }

    /// Drops kinds whose window ended with nothing to report.
    fn expire(&mut self, now: Instant) {
        let window = self.window;
        self.kinds
            .retain(|_, w| w.suppressed > 0 || now.saturating_duration_since(w.since) < window);
    }

    /// The summaries of windows that ended by `now`, one per kind that had repeats. A kind
    /// with repeats starts a new window (so a steady flood gives one summary per window); a
    /// kind without is forgotten (its next occurrence is logged at once).
    pub fn poll(&mut self, now: Instant) -> Vec<Summary<K>> {
        let window = self.window;
        let mut out = Vec::new();
        self.kinds.retain(|kind, w| {
            let over = now.saturating_duration_since(w.since);
            if over < window {
                return true;
            }
            if w.suppressed == 0 {
                return false;
            }
            out.push(Summary {
                kind: Some(kind.clone()),
                suppressed: w.suppressed,
                over,
            });
            *w = Window {
                since: now,
                suppressed: 0,
            };
            true
        });
        if let Some(w) = self.overflow {
            let over = now.saturating_duration_since(w.since);
            if over >= window {
                out.push(Summary {
                    kind: None,
                    suppressed: w.suppressed,
                    over,
                });
                self.overflow = None;
            }
        }
        out
    }

    /// When the next window with repeats ends (when [`Repeats::poll`] has something to
    /// report), if any.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.kinds
            .values()
            .filter(|w| w.suppressed > 0)
            .chain(self.overflow.iter())
            .map(|w| w.since + self.window)
            .min()
    }
}

impl<K> Summary<K> {
    /// "99 more in the last 10 s": the tail of a summary line.
    pub fn tail(&self) -> String {
        format!(
            "{} more in the last {} s",
            self.suppressed,
            self.over.as_secs().max(1)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_secs(10);

    fn at(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    #[test]
    fn the_first_is_logged_and_repeats_are_summarized_once_per_window() {
        let t0 = Instant::now();
        let mut r = Repeats::new(WINDOW, 8);
        let logged = (0..100).filter(|i| r.hit(at(t0, *i), "refused")).count();
        assert_eq!(logged, 1);
        assert_eq!(r.poll_timeout(), Some(t0 + WINDOW));
        assert_eq!(r.poll(at(t0, 9_999)).len(), 0, "the window has not ended");
        let s = r.poll(at(t0, 10_000));
        assert_eq!(
            s,
            [Summary {
                kind: Some("refused"),
                suppressed: 99,
                over: WINDOW
            }]
        );
        assert_eq!(s[0].tail(), "99 more in the last 10 s");
        // The flood goes on: still counted, one summary for the next window.
        assert!(!r.hit(at(t0, 10_500), "refused"));
        assert!(!r.hit(at(t0, 11_000), "refused"));
        let s = r.poll(at(t0, 20_000));
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].suppressed, 2);
        // Then a quiet window: forgotten, and the next occurrence is logged at once.
        assert_eq!(r.poll(at(t0, 30_000)).len(), 0);
        assert_eq!(r.poll_timeout(), None);
        assert!(r.hit(at(t0, 31_000), "refused"));
    }

    #[test]
    fn a_lone_warning_gives_no_summary_and_kinds_are_counted_apart() {
        let t0 = Instant::now();
        let mut r = Repeats::new(WINDOW, 8);
        assert!(r.hit(t0, "a"));
        assert!(r.hit(t0, "b"));
        assert!(!r.hit(at(t0, 1), "b"));
        assert_eq!(r.poll_timeout(), Some(t0 + WINDOW), "only b has repeats");
        let s = r.poll(at(t0, 10_000));
        assert_eq!(s.len(), 1);
        assert_eq!((s[0].kind, s[0].suppressed), (Some("b"), 1));
        // A kind seen again after its quiet window is logged again.
        assert!(r.hit(at(t0, 12_000), "a"));
    }

    #[test]
    fn a_repeat_after_the_window_without_a_poll_is_kept_for_the_summary() {
        let t0 = Instant::now();
        let mut r = Repeats::new(WINDOW, 8);
        assert!(r.hit(t0, 1u8));
        assert!(!r.hit(at(t0, 5_000), 1));
        // Nobody polled at 10 s: the repeat at 12 s is counted, not logged, and the
        // summary reports both.
        assert!(!r.hit(at(t0, 12_000), 1));
        let s = r.poll(at(t0, 12_000));
        assert_eq!(s[0].suppressed, 2);
    }

    #[test]
    fn kinds_beyond_the_table_are_counted_together() {
        let t0 = Instant::now();
        let mut r = Repeats::new(WINDOW, 2);
        assert!(r.hit(t0, 1u16));
        assert!(r.hit(t0, 2));
        // A port scan: every further kind goes to the overflow count.
        for port in 3..103 {
            assert!(!r.hit(at(t0, 1), port));
        }
        let s = r.poll(at(t0, 10_001));
        assert_eq!(
            s,
            [Summary {
                kind: None,
                suppressed: 100,
                over: Duration::from_millis(10_000)
            }]
        );
        // Kinds 1 and 2 had quiet windows: forgotten, so new kinds fit again.
        assert!(r.hit(at(t0, 10_002), 7));
    }

    #[test]
    fn a_full_table_makes_room_by_dropping_quiet_ended_windows() {
        let t0 = Instant::now();
        let mut r = Repeats::new(WINDOW, 1);
        assert!(r.hit(t0, "a"));
        // No poll in between: "a" ended quietly, so "b" takes its place.
        assert!(r.hit(at(t0, 10_000), "b"));
        assert!(!r.hit(at(t0, 10_001), "c"), "b's window is still open");
    }
}
