//! A token bucket on the engine's clock: at most `burst` events at once, refilled at `rate`
//! a second. Pure: time is an argument.

use smoltcp::time::{Duration, Instant};

/// See the module documentation.
#[derive(Clone, Debug)]
pub struct Bucket {
    /// Tokens, in millionths (so that a refill of less than one token is not lost).
    micro_tokens: u64,
    burst: u64,
    rate: u64,
    last: Option<Instant>,
}

impl Bucket {
    /// A full bucket of `burst` tokens, refilled at `rate` a second.
    pub fn new(rate: u32, burst: u32) -> Bucket {
        Bucket {
            micro_tokens: u64::from(burst) * 1_000_000,
            burst: u64::from(burst),
            rate: u64::from(rate),
            last: None,
        }
    }

    /// Takes a token at `now`: false when none is left (the event is to be suppressed).
    pub fn take(&mut self, now: Instant) -> bool {
        let elapsed = self.last.map_or(Duration::ZERO, |t| {
            if now > t { now - t } else { Duration::ZERO }
        });
        self.last = Some(now);
        self.micro_tokens =
            (self.micro_tokens + elapsed.total_micros() * self.rate).min(self.burst * 1_000_000);
        if self.micro_tokens < 1_000_000 {
            return false;
        }
        self.micro_tokens -= 1_000_000;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_rate() {
        let t0 = Instant::from_millis_const(1_000);
        let mut b = Bucket::new(1000, 50);
        assert_eq!((0..200).filter(|_| b.take(t0)).count(), 50, "the burst");
        // 10 ms later: 10 more.
        let t1 = t0 + Duration::from_millis(10);
        assert_eq!((0..200).filter(|_| b.take(t1)).count(), 10);
        // Refilled, never beyond the burst.
        let t2 = t1 + Duration::from_secs(60);
        assert_eq!((0..200).filter(|_| b.take(t2)).count(), 50);
    }
}
