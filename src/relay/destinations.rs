//! What the relay learns per destination: which ones answered a channel open lately (they
//! keep a reserve of open slots, [`Destinations::open_limit`]) and what shape their flows
//! have (light flows are packed on one SSH connection, bulk ones spread,
//! [`Destinations::placement`]).
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
/// A destination's shape once one of its flows turned bulk: below the line where its flows
/// are spread; three light flows (an iperf3 control connection beside its data streams is
/// one) do not bring it back, four in a row do.
pub const BULK_SHAPE: f32 = 0.3;

/// See the module documentation.
#[derive(Debug, Default)]
pub struct Destinations {
    /// Destinations whose channel opened lately, with when: opens to them may use a reserve
    /// of `max_opening / 4` slots beyond the bound. Opens to silent destinations (a SYN
    /// flood) stay pending at the jump host until its own connect gives up (two minutes on
    /// Linux), whether or not their app still waits; the reserve keeps the services in use
    /// reachable meanwhile.
    answered: HashMap<SocketAddr, Instant>,
    /// Per destination, how light its recent flows were: an average of 1 for each flow that
    /// ended without turning bulk, weighting the latest by a tenth; a flow that turns bulk
    /// takes it to [`BULK_SHAPE`] at most, at once.
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

    /// Where a new flow to `dst` goes among the SSH connections. Light flows (short
    /// connections, and long ones that move little: a connection pool's RPCs, a registry
    /// session, a cache client) are packed on one connection, away from bulk ones: sshd then
    /// serves many of them per wake-up. Measured with `wrk -H 'Connection: close'`: sshd's
    /// CPU per request 30 % lower than with the flows spread over four connections; with
    /// `redis-benchmark -c 50` (50 long connections of small messages) on one connection
    /// 51,800 requests/s, spread over four 41,200, `ssh -L` 53,000 (same 2-core box, 12-07).
    /// A destination whose flows lately turned bulk has its flows spread, so parallel bulk
    /// flows use several sshd processes (and cores). Destinations not seen yet are packed:
    /// most flows are light, and a bulk flow packed still gets a link carrying no other bulk
    /// (and teaches its destination at once).
    pub fn placement(&self, dst: SocketAddr) -> Placement {
        match self.shapes.get(&dst) {
            Some(light) if *light <= 0.5 => Placement::Spread,
            _ => Placement::Pack,
        }
    }

    /// A flow to `dst` ended without turning bulk.
    pub fn note_light(&mut self, dst: SocketAddr) {
        let shape = self.shape(dst);
        *shape = 0.9 * *shape + 0.1;
    }

    /// A flow to `dst` turned bulk.
    pub fn note_bulk(&mut self, dst: SocketAddr) {
        let shape = self.shape(dst);
        *shape = shape.min(BULK_SHAPE);
    }

    /// `dst`'s entry (light, for a destination not seen yet).
    fn shape(&mut self, dst: SocketAddr) -> &mut f32 {
        if self.shapes.len() >= SHAPES_MAX && !self.shapes.contains_key(&dst) {
            // A bound, not a cache policy: forgetting only costs the default placement.
            self.shapes.clear();
        }
        self.shapes.entry(dst).or_insert(1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn light_and_unknown_destinations_are_packed_one_turned_bulk_is_spread_for_a_while() {
        let mut d = Destinations::default();
        let redis: SocketAddr = "10.0.0.11:6379".parse().unwrap();
        let bulk: SocketAddr = "10.0.0.10:5201".parse().unwrap();
        let pack = |d: &Destinations, dst| d.placement(dst) == Placement::Pack;
        assert!(pack(&d, redis), "unknown destinations are packed");
        d.note_light(redis);
        assert!(pack(&d, redis), "a light flow keeps it packed");
        // One flow turning bulk spreads the next ones at once; the light flows of its kind
        // (a control connection) do not bring it back...
        d.note_bulk(bulk);
        assert!(!pack(&d, bulk));
        d.note_light(bulk);
        assert!(!pack(&d, bulk), "one light flow is not enough");
        d.note_bulk(bulk);
        d.note_light(bulk);
        d.note_light(bulk);
        assert!(!pack(&d, bulk), "nor two after another bulk one");
        // ... a run of four does.
        d.note_light(bulk);
        assert!(!pack(&d, bulk), "nor three");
        d.note_light(bulk);
        assert!(pack(&d, bulk));
        // The table is bounded.
        for i in 0..SHAPES_MAX as u16 + 10 {
            d.note_bulk(SocketAddr::from(([10, 1, 0, 1], i)));
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
