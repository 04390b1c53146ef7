//! Flow control at the API: a token bucket per app and kind of call, so a
//! business server's burst of sends cannot become a burst of work for the
//! whole fleet. Over the limit the caller is told when to come back.

use std::sync::Mutex;
use std::time::{Duration, Instant};

pub use herald_proto::rate::Rate;
use herald_proto::rate::TokenBucket;

/// A token bucket the API's tasks share.
#[derive(Debug)]
pub struct SharedBucket(Mutex<TokenBucket>);

impl SharedBucket {
    pub fn new(rate: Rate, now: Instant) -> SharedBucket {
        SharedBucket(Mutex::new(TokenBucket::new(rate, now)))
    }

    /// Takes `cost` tokens, or says how long until a call can go through.
    pub fn take(&self, cost: u64, now: Instant) -> Result<(), Duration> {
        self.0.lock().expect("bucket lock").take(cost, now)
    }
}
