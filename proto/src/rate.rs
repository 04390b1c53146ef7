//! A token bucket, pure: time is passed in. The control plane limits API
//! calls per app with it, the gateway's shards accepts per second.

use std::time::{Duration, Instant};

/// A rate and the burst allowed above it. `per_sec` may be below 1 (a
/// broadcast every ten seconds is 0.1).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub per_sec: f64,
    pub burst: u32,
}

/// Tokens refill at `per_sec` up to `burst`. A call goes through while at
/// least one token is left and takes as many as it costs, possibly more
/// than are left (a multicast to many users): the bucket then owes them,
/// and later calls wait until it is back above one.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: Rate,
    tokens: f64,
    counted_at: Instant,
}

impl TokenBucket {
    pub fn new(rate: Rate, now: Instant) -> TokenBucket {
        assert!(
            rate.per_sec > 0.0 && rate.burst >= 1,
            "a rate that admits nothing"
        );
        TokenBucket {
            rate,
            tokens: f64::from(rate.burst),
            counted_at: now,
        }
    }

    pub fn rate(&self) -> Rate {
        self.rate
    }

    /// Takes `cost` tokens, or says how long until a call can go through.
    pub fn take(&mut self, cost: u64, now: Instant) -> Result<(), Duration> {
        let elapsed = now.saturating_duration_since(self.counted_at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate.per_sec).min(f64::from(self.rate.burst));
        self.counted_at = now;
        if self.tokens >= 1.0 {
            self.tokens -= cost as f64;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                (1.0 - self.tokens) / self.rate.per_sec,
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_goes_through_then_the_rate_holds() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(
            Rate {
                per_sec: 10.0,
                burst: 3,
            },
            start,
        );
        for _ in 0..3 {
            bucket.take(1, start).unwrap();
        }
        let wait = bucket.take(1, start).unwrap_err();
        assert_eq!(wait, Duration::from_millis(100));
        bucket.take(1, start + wait).unwrap();
        assert!(bucket.take(1, start + wait).is_err());
    }

    #[test]
    fn a_large_call_goes_through_and_the_next_ones_wait_it_off() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(
            Rate {
                per_sec: 100.0,
                burst: 10,
            },
            start,
        );
        bucket.take(1_000, start).unwrap();
        let wait = bucket.take(1, start).unwrap_err();
        assert!(wait > Duration::from_secs(9), "{wait:?}");
        bucket.take(1, start + Duration::from_secs(10)).unwrap();
    }
}
