//! When the pool tries to connect, as plain code: no I/O, no clock and no randomness of its
//! own (time is an argument, the random source is seeded by the caller), so every schedule
//! replays exactly in a test.
//!
//! The rules, for a team of laptops sharing one jump host whose sshd drops unauthenticated
//! connections beyond a few (`MaxStartups 10:30:100` by default):
//! - **One connection at a time.** At most one try is in flight per pool, so a laptop costs
//!   the jump host one pending connection at a time.
//! - **The first alone, the rest after it.** While no link is up, the pool retries one slot
//!   only; once a link is up, the other slots follow one after the other, each after a pause
//!   of 1 to 2 times how long the last successful connect took, and at least 1 to 2 s: the
//!   first flow goes out as soon as one connection is up, and the connections that only add
//!   throughput leave a busy jump host room (a team starting at once, or coming back after a
//!   restart, costs sshd first one connection per laptop; the slower sshd answers, the
//!   later the rest come).
//! - **Full jitter.** Every retry after a failure waits a uniformly random time between 0 and
//!   a bound that doubles with each failure ([`BACKOFF_BASE`], 250 ms, ...), capped at
//!   [`SHORT_CAP`] (1 s) for the first [`SHORT_PHASE`] (20 s) of trouble and at [`LONG_CAP`]
//!   (15 s) after that. The first try after the last link was lost waits a random time
//!   below [`BACKOFF_BASE`] too: laptops that lost the jump host together do not come back
//!   together.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;

/// The bound of the first retry's random wait; each failure doubles it, up to the cap.
pub const BACKOFF_BASE: Duration = Duration::from_millis(250);
/// The cap of the random wait while trouble is recent: a jump host that restarts (an sshd
/// restart, a short network blip) is back within about a second.
pub const SHORT_CAP: Duration = Duration::from_secs(1);
/// How long trouble counts as recent.
pub const SHORT_PHASE: Duration = Duration::from_secs(20);
/// The cap of the random wait in a long outage.
pub const LONG_CAP: Duration = Duration::from_secs(15);
/// The pause between two connects of the pool when the last one succeeded is 1 to 2 times
/// the longer of this and the last connect's time.
pub const PACE_FLOOR: Duration = Duration::from_secs(1);
/// The longest pause between two connects of the pool when the last one succeeded (the last
/// connect's time may include a passphrase typed at the terminal).
pub const PACE_MAX: Duration = Duration::from_secs(15);

/// A uniformly random wait in `[0, min(cap, BACKOFF_BASE · 2^failures)]`: full jitter.
pub fn full_jitter(rng: &mut impl Rng, failures: u32, cap: Duration) -> Duration {
    let bound = BACKOFF_BASE
        .checked_mul(1 << failures.min(16))
        .unwrap_or(cap)
        .min(cap);
    bound.mul_f64(rng.random::<f64>())
}

/// What a slot of the pool is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Slot {
    Up,
    Down,
    Connecting,
}

/// The pool's connect schedule. Feed it what happened ([`Schedule::lost`],
/// [`Schedule::connected`], [`Schedule::failed`]); ask it what to do
/// ([`Schedule::poll_connect`]) and when to ask again ([`Schedule::poll_timeout`]).
#[derive(Debug)]
pub struct Schedule {
    slots: Vec<Slot>,
    rng: StdRng,
    /// Consecutive failed tries since the last success.
    failures: u32,
    /// Since when tries have been needed without success (an outage, or failures while
    /// other links are up), while that lasts: picks the cap.
    trouble_since: Option<Instant>,
    /// The next try starts no earlier than this.
    next_at: Instant,
}

impl Schedule {
    /// A schedule for slots that are up (`true`) or down, with the random source seeded by
    /// `seed`. Slots that are down are connected after the first up one, paced by
    /// `first_took` (how long connecting that one took).
    pub fn new(up: &[bool], seed: u64, now: Instant, first_took: Duration) -> Schedule {
        let mut s = Schedule {
            slots: up
                .iter()
                .map(|u| if *u { Slot::Up } else { Slot::Down })
                .collect(),
            rng: StdRng::seed_from_u64(seed),
            failures: 0,
            trouble_since: None,
            next_at: now,
        };
        if s.up() == 0 {
            s.trouble_since = Some(now);
        } else {
            s.next_at = now + s.pace(first_took);
        }
        s
    }

    /// Slots with a live link.
    pub fn up(&self) -> usize {
        self.slots.iter().filter(|s| **s == Slot::Up).count()
    }

    /// The link of `slot` was lost.
    pub fn lost(&mut self, now: Instant, slot: usize) {
        self.slots[slot] = Slot::Down;
        if self.connecting() {
            // The try in flight decides what comes next.
            return;
        }
        // The first try waits a random time below the base too, so that laptops that lost
        // the jump host together (a restart, a blip) spread out.
        let wait = now + full_jitter(&mut self.rng, 0, SHORT_CAP);
        if self.up() == 0 {
            // The last one: an outage begins, retried from the start of the backoff.
            self.failures = 0;
            self.trouble_since.get_or_insert(now);
            self.next_at = wait;
        } else {
            // Others are up: no sooner than the pace or backoff already set.
            self.next_at = self.next_at.max(wait);
        }
    }

    /// The try for `slot` connected; it took `took`.
    pub fn connected(&mut self, now: Instant, slot: usize, took: Duration) {
        self.slots[slot] = Slot::Up;
        self.failures = 0;
        self.trouble_since = None;
        self.next_at = now + self.pace(took);
    }

    /// The try for `slot` failed (with an error a retry may fix).
    pub fn failed(&mut self, now: Instant, slot: usize) {
        self.slots[slot] = Slot::Down;
        self.failures = self.failures.saturating_add(1);
        let since = *self.trouble_since.get_or_insert(now);
        let cap = if now.saturating_duration_since(since) < SHORT_PHASE {
            SHORT_CAP
        } else {
            LONG_CAP
        };
        let wait = full_jitter(&mut self.rng, self.failures, cap);
        self.next_at = now + wait;
    }

    /// The slot to connect now, if any (it is then counted as connecting until
    /// [`Schedule::connected`] or [`Schedule::failed`]).
    pub fn poll_connect(&mut self, now: Instant) -> Option<usize> {
        if self.connecting() || now < self.next_at {
            return None;
        }
        let slot = self.slots.iter().position(|s| *s == Slot::Down)?;
        self.slots[slot] = Slot::Connecting;
        Some(slot)
    }

    /// When to call [`Schedule::poll_connect`] again: `None` while a try is in flight or
    /// every slot is up.
    pub fn poll_timeout(&self) -> Option<Instant> {
        (!self.connecting() && self.slots.contains(&Slot::Down)).then_some(self.next_at)
    }

    fn connecting(&self) -> bool {
        self.slots.contains(&Slot::Connecting)
    }

    /// The pause after a connect that took `took`: 1 to 2 times as long (at least
    /// [`PACE_FLOOR`] as long), bounded.
    fn pace(&mut self, took: Duration) -> Duration {
        took.max(PACE_FLOOR)
            .mul_f64(1.0 + self.rng.random::<f64>())
            .min(PACE_MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// Runs `s` against a jump host that answers each try after `took` with `outcome(now)`
    /// until `end`; returns when each try started and whether it connected.
    fn drive(
        s: &mut Schedule,
        mut now: Instant,
        end: Instant,
        took: Duration,
        outcome: impl Fn(Instant) -> bool,
    ) -> Vec<(Instant, usize, bool)> {
        let mut tries = Vec::new();
        while now < end {
            if let Some(slot) = s.poll_connect(now) {
                let ok = outcome(now);
                now += took;
                if ok {
                    s.connected(now, slot, took);
                } else {
                    s.failed(now, slot);
                }
                tries.push((now - took, slot, ok));
                continue;
            }
            match s.poll_timeout() {
                Some(at) => now = at.max(now),
                None => break,
            }
        }
        tries
    }

    #[test]
    fn full_jitter_stays_below_its_doubling_bound_and_the_cap() {
        let mut rng = StdRng::seed_from_u64(7);
        for failures in 0..40 {
            let bound = (BACKOFF_BASE * (1 << failures.min(16))).min(SHORT_CAP);
            let waits: Vec<Duration> = (0..200)
                .map(|_| full_jitter(&mut rng, failures, SHORT_CAP))
                .collect();
            assert!(waits.iter().all(|w| *w <= bound), "{failures}: {waits:?}");
            // Spread over the whole range, not clustered at the bound.
            assert!(waits.iter().any(|w| *w < bound / 4), "{failures}");
            assert!(waits.iter().any(|w| *w > bound * 3 / 4), "{failures}");
        }
        assert!(full_jitter(&mut rng, 100, LONG_CAP) <= LONG_CAP);
    }

    #[test]
    fn at_start_the_others_follow_the_first_one_at_a_time_paced_by_its_connect() {
        let t0 = Instant::now();
        let took = 40 * MS;
        let mut s = Schedule::new(&[true, false, false, false], 1, t0, took);
        assert_eq!(s.poll_connect(t0), None, "not at once");
        let tries = drive(&mut s, t0, t0 + Duration::from_secs(10), took, |_| true);
        let slots: Vec<usize> = tries.iter().map(|t| t.1).collect();
        assert_eq!(slots, [1, 2, 3]);
        let mut last_done = t0;
        for (at, _, _) in &tries {
            let gap = *at - last_done;
            assert!(gap >= PACE_FLOOR && gap <= 2 * PACE_FLOOR, "{gap:?}");
            last_done = *at + took;
        }
        assert_eq!(s.up(), 4);
        assert_eq!(s.poll_timeout(), None, "nothing left to do");
        // A slow jump host (connects of 3 s) gets 1 to 2 times that between them.
        let took = Duration::from_secs(3);
        let mut s = Schedule::new(&[true, false, false], 5, t0, took);
        let tries = drive(&mut s, t0, t0 + Duration::from_secs(60), took, |_| true);
        let mut last_done = t0;
        for (at, _, _) in &tries {
            let gap = *at - last_done;
            assert!(gap >= took && gap <= 2 * took, "{gap:?}");
            last_done = *at + took;
        }
        assert_eq!(s.up(), 3);
    }

    #[test]
    fn only_one_try_is_in_flight_at_a_time() {
        let t0 = Instant::now();
        let mut s = Schedule::new(&[false, false, false], 2, t0, Duration::ZERO);
        assert_eq!(s.poll_connect(t0), Some(0));
        for later in [t0, t0 + Duration::from_secs(60)] {
            assert_eq!(s.poll_connect(later), None);
            assert_eq!(s.poll_timeout(), None);
        }
        s.connected(t0 + 10 * MS, 0, 10 * MS);
        assert_eq!(s.poll_connect(t0 + 10 * MS), None, "paced");
        let next = s.poll_timeout().unwrap();
        assert_eq!(s.poll_connect(next), Some(1));
    }

    #[test]
    fn after_losing_every_link_one_slot_retries_with_full_jitter_until_one_is_back() {
        let t0 = Instant::now();
        let mut s = Schedule::new(&[true, true, true, true], 3, t0, 10 * MS);
        for slot in 0..4 {
            s.lost(t0, slot);
        }
        // Down for 90 s, then back.
        let back = t0 + Duration::from_secs(90);
        let tries = drive(&mut s, t0, back + Duration::from_secs(30), 5 * MS, |now| {
            now >= back
        });
        let first_ok = tries.iter().position(|t| t.2).expect("reconnected");
        // During the outage only slot 0 is tried (one pending connection at a time).
        assert!(tries[..first_ok].iter().all(|t| t.1 == 0), "{tries:?}");
        assert!(
            tries[0].0 - t0 <= BACKOFF_BASE,
            "first try {:?}",
            tries[0].0 - t0
        );
        let gaps: Vec<(Duration, Duration)> = tries[..=first_ok]
            .windows(2)
            .map(|w| (w[0].0 - t0, w[1].0 - w[0].0))
            .collect();
        for (at, gap) in &gaps {
            let cap = if *at < SHORT_PHASE {
                SHORT_CAP
            } else {
                LONG_CAP
            };
            assert!(*gap <= cap + 5 * MS, "{gap:?} after a try at {at:?}");
        }
        let late: Vec<Duration> = gaps
            .iter()
            .filter(|(at, _)| *at > SHORT_PHASE + Duration::from_secs(5))
            .map(|g| g.1)
            .collect();
        assert!(
            late.iter().any(|g| *g > 3 * SHORT_CAP),
            "backing off after the first 20 s: {late:?}"
        );
        assert!(first_ok < 60, "{first_ok} tries in 90 s");
        // Back within the long cap of its return, then the rest follow.
        assert!(tries[first_ok].0 - back <= LONG_CAP);
        assert_eq!(s.up(), 4);
        let after: Vec<usize> = tries[first_ok..].iter().map(|t| t.1).collect();
        assert_eq!(after, [0, 1, 2, 3]);
    }

    #[test]
    fn pools_that_lost_the_jump_host_together_do_not_retry_together() {
        // 100 laptops lose the jump host at the same instant; it is back 2 s later. Their
        // first try after its return is spread over the short cap, not one wave.
        let t0 = Instant::now();
        let back = t0 + Duration::from_secs(2);
        let mut returns: Vec<Duration> = (0..100)
            .map(|seed| {
                let mut s = Schedule::new(&[true; 4], seed, t0, 10 * MS);
                for slot in 0..4 {
                    s.lost(t0, slot);
                }
                let tries = drive(&mut s, t0, back + Duration::from_secs(10), 5 * MS, |now| {
                    now >= back
                });
                tries.iter().find(|t| t.2).expect("back").0 - back
            })
            .collect();
        returns.sort();
        assert!(
            returns[99] <= SHORT_CAP,
            "all within the short cap: {returns:?}"
        );
        // Spread: no 100 ms window holds more than a fifth of them.
        for w in returns.windows(20) {
            assert!(w[19] - w[0] > 50 * MS, "a wave: {w:?}");
        }
    }

    #[test]
    fn a_refused_follower_backs_off_while_the_others_stay_up() {
        let t0 = Instant::now();
        let mut s = Schedule::new(&[true, false], 4, t0, 10 * MS);
        let at = s.poll_timeout().unwrap();
        assert_eq!(s.poll_connect(at), Some(1));
        s.failed(at, 1);
        let next = s.poll_timeout().unwrap();
        assert!(next - at <= 2 * BACKOFF_BASE);
        assert_eq!(s.up(), 1);
    }

    #[test]
    fn the_same_seed_gives_the_same_schedule() {
        let t0 = Instant::now();
        let run = |seed| {
            let mut s = Schedule::new(&[false, false], seed, t0, Duration::ZERO);
            drive(&mut s, t0, t0 + Duration::from_secs(30), MS, |now| {
                now > t0 + Duration::from_secs(12)
            })
        };
        assert_eq!(run(9), run(9));
        assert_ne!(run(9), run(10));
    }
}
