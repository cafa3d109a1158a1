//! What the relay learns per destination: which ones answered a channel open lately (they
//! keep a reserve of open slots, [`Destinations::open_limit`]) and what shape their flows
//! have (short connections are packed on one SSH connection, [`Destinations::placement`]).
//!
//! Pure and bounded: two tables of at most [`ANSWERED_MAX`] and [`SHAPES_MAX`] entries; time
//! is an argument. Knows nothing of flows, channels or links.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::pool::Placement;

/// Destinations whose channel opened within this long keep a reserve of open slots.
pub const ANSWERED_FOR: Duration = Duration::from_secs(600);
/// The most destinations remembered as having answered.
pub const ANSWERED_MAX: usize = 4096;
/// Destinations whose flows' shape is remembered (see [`Destinations::placement`]).
pub const SHAPES_MAX: usize = 4096;

/// See the module documentation.
#[derive(Debug, Default)]
pub struct Destinations {
    /// Destinations whose channel opened lately, with when: opens to them may use a reserve
    /// of `max_opening / 4` slots beyond the bound. Opens to silent destinations (a SYN
    /// flood) stay pending at the jump host until its own connect gives up (two minutes on
    /// Linux), whether or not their app still waits; the reserve keeps the services in use
    /// reachable meanwhile.
    answered: HashMap<SocketAddr, Instant>,
    /// Per destination, how much its recent flows looked like short connections (an average
    /// of 1 for short, 0 for long or bulk, weighting the latest flow by a tenth).
    shapes: HashMap<SocketAddr, f32>,
}

impl Destinations {
    /// How many channel opens may be pending when a new flow to `dst` asks for one:
    /// `max_opening`, plus a quarter of it for a destination that answered lately.
    pub fn open_limit(&self, dst: SocketAddr, now: Instant, max_opening: usize) -> usize {
        let answered = self
            .answered
            .get(&dst)
            .is_some_and(|at| now.saturating_duration_since(*at) < ANSWERED_FOR);
        if answered {
            max_opening + max_opening.div_ceil(4)
        } else {
            max_opening
        }
    }

    /// Remembers that `dst` answered an open at `now` (forgetting the oldest when full).
    pub fn note_answered(&mut self, dst: SocketAddr, now: Instant) {
        if self.answered.len() >= ANSWERED_MAX && !self.answered.contains_key(&dst) {
            self.answered
                .retain(|_, at| now.saturating_duration_since(*at) < ANSWERED_FOR);
            if self.answered.len() >= ANSWERED_MAX
                && let Some(oldest) = self
                    .answered
                    .iter()
                    .min_by_key(|(_, at)| **at)
                    .map(|(d, _)| *d)
            {
                self.answered.remove(&oldest);
            }
        }
        self.answered.insert(dst, now);
    }

    /// Where a new flow to `dst` goes among the SSH connections. A destination whose recent
    /// flows were short connections (a service called with a new connection per request, a
    /// health check, a registry lookup) gets its flows packed on one connection, away from
    /// bulk ones: sshd then serves many of them per wake-up (measured with
    /// `wrk -H 'Connection: close'`: sshd's CPU per request 30 % lower than with the flows
    /// spread over four connections, and throughput up to `ssh -L`'s). Other destinations,
    /// and those not seen yet, get theirs spread, so parallel bulk flows use several sshd
    /// processes.
    pub fn placement(&self, dst: SocketAddr) -> Placement {
        match self.shapes.get(&dst) {
            Some(short) if *short > 0.5 => Placement::Pack,
            _ => Placement::Spread,
        }
    }

    /// Counts one ended flow to `dst` in its destination's shape: `short` if it was not bulk
    /// and ended quickly.
    pub fn note_shape(&mut self, dst: SocketAddr, short: bool) {
        if self.shapes.len() >= SHAPES_MAX && !self.shapes.contains_key(&dst) {
            // A bound, not a cache policy: forgetting only costs the default placement.
            self.shapes.clear();
        }
        let shape = self.shapes.entry(dst).or_insert(0.0);
        *shape = 0.9 * *shape + if short { 0.1 } else { 0.0 };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_destination_is_packed_once_most_of_its_recent_flows_were_short() {
        let mut d = Destinations::default();
        let web: SocketAddr = "10.0.0.10:80".parse().unwrap();
        let bulk: SocketAddr = "10.0.0.10:5201".parse().unwrap();
        let pack = |d: &Destinations, dst| d.placement(dst) == Placement::Pack;
        assert!(!pack(&d, web), "unknown destinations are spread");
        for _ in 0..6 {
            d.note_shape(web, true);
        }
        assert!(!pack(&d, web), "six short flows are not enough yet");
        d.note_shape(web, true);
        assert!(pack(&d, web), "seven are");
        // Long or bulk flows to it move it back to spreading, a few at a time.
        for _ in 0..3 {
            d.note_shape(web, false);
        }
        assert!(!pack(&d, web));
        d.note_shape(bulk, false);
        assert!(!pack(&d, bulk));
        // The table is bounded.
        for i in 0..SHAPES_MAX as u16 + 10 {
            d.note_shape(SocketAddr::from(([10, 1, 0, 1], i)), true);
        }
        assert!(d.shapes.len() <= SHAPES_MAX);
    }

    #[test]
    fn the_answered_table_is_bounded_and_forgets_the_oldest() {
        let t0 = Instant::now();
        let mut d = Destinations::default();
        let dst = |i: usize| SocketAddr::from(([10, 2, (i >> 8) as u8, i as u8], 80));
        for i in 0..ANSWERED_MAX {
            d.note_answered(dst(i), t0 + Duration::from_millis(i as u64));
        }
        let later = t0 + Duration::from_secs(1);
        d.note_answered(dst(ANSWERED_MAX), later);
        assert_eq!(d.answered.len(), ANSWERED_MAX);
        assert_eq!(d.open_limit(dst(0), later, 8), 8, "the oldest is forgotten");
        assert_eq!(d.open_limit(dst(1), later, 8), 10);
        assert_eq!(d.open_limit(dst(ANSWERED_MAX), later, 8), 10);
        // An answer ages out.
        assert_eq!(d.open_limit(dst(1), later + ANSWERED_FOR, 8), 8);
    }
}
