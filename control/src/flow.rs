//! Flow control at the API: a token bucket per app and kind of call, so a
//! business server's burst of sends cannot become a burst of work for the
//! whole fleet. Over the limit the caller is told when to come back.

use std::sync::Mutex;
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
#[derive(Debug)]
pub struct TokenBucket {
    rate: Rate,
    /// Tokens and when they were last counted.
    state: Mutex<(f64, Instant)>,
}

impl TokenBucket {
    pub fn new(rate: Rate, now: Instant) -> TokenBucket {
        assert!(
            rate.per_sec > 0.0 && rate.burst >= 1,
            "a rate that admits nothing"
        );
        TokenBucket {
            rate,
            state: Mutex::new((f64::from(rate.burst), now)),
        }
    }

    /// Takes `cost` tokens, or says how long until a call can go through.
    pub fn take(&self, cost: u64, now: Instant) -> Result<(), Duration> {
        let mut state = self.state.lock().expect("bucket lock");
        let (tokens, counted_at) = &mut *state;
        let elapsed = now.saturating_duration_since(*counted_at).as_secs_f64();
        *tokens = (*tokens + elapsed * self.rate.per_sec).min(f64::from(self.rate.burst));
        *counted_at = now;
        if *tokens >= 1.0 {
            *tokens -= cost as f64;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - *tokens) / self.rate.per_sec))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_goes_through_then_the_rate_holds() {
        let start = Instant::now();
        let bucket = TokenBucket::new(
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
        let bucket = TokenBucket::new(
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
