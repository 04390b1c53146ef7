//! One hashed timer wheel per shard for every connection deadline.
//!
//! A connection has one entry at a time. Entries are never removed: when one
//! fires, the shard asks the connection for its current deadline and puts it
//! back if that moved later (a ping arrived). A connection that closed leaves
//! an entry with an old generation behind, which the shard ignores. This
//! keeps heartbeat refreshes free: they touch the connection, not the wheel.

use std::time::{Duration, Instant};

/// The wheel's resolution. Deadlines fire up to one tick late, which is
/// nothing next to heartbeat intervals of tens of seconds.
pub const TICK: Duration = Duration::from_millis(250);

/// Slots in the wheel: 1024 ticks of 250 ms cover 256 s per revolution, more
/// than most heartbeat deadlines, so few entries are looked at twice.
pub const SLOTS: usize = 1024;

/// Entries' room a swept slot keeps without shrinking: with deadlines spread
/// evenly, a slot holds connections / SLOTS entries.
const SLOT_CAPACITY_KEPT: usize = 64;

/// A wheel entry: a slab slot and the generation it was inserted for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimerKey {
    pub slot: u32,
    pub generation: u32,
}

#[derive(Debug)]
struct Entry {
    tick: u64,
    key: TimerKey,
}

#[derive(Debug)]
pub struct TimerWheel {
    start: Instant,
    /// The last tick whose slot has been swept.
    swept: u64,
    slots: Vec<Vec<Entry>>,
    len: usize,
}

impl TimerWheel {
    pub fn new(start: Instant) -> TimerWheel {
        TimerWheel {
            start,
            swept: 0,
            slots: (0..SLOTS).map(|_| Vec::new()).collect(),
            len: 0,
        }
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Entries' room held across all slots.
    #[cfg(test)]
    fn capacity(&self) -> usize {
        self.slots.iter().map(Vec::capacity).sum()
    }

    /// The first tick at or after `deadline`: an entry never fires early.
    fn deadline_tick(&self, deadline: Instant) -> u64 {
        let since = deadline.saturating_duration_since(self.start);
        since.as_nanos().div_ceil(TICK.as_nanos()) as u64
    }

    /// The last tick at or before `now`.
    fn now_tick(&self, now: Instant) -> u64 {
        let since = now.saturating_duration_since(self.start);
        (since.as_nanos() / TICK.as_nanos()) as u64
    }

    pub fn insert(&mut self, deadline: Instant, key: TimerKey) {
        let tick = self.deadline_tick(deadline).max(self.swept + 1);
        self.slots[(tick % SLOTS as u64) as usize].push(Entry { tick, key });
        self.len += 1;
    }

    /// Moves every entry due at or before `now` into `expired`.
    pub fn advance(&mut self, now: Instant, expired: &mut Vec<TimerKey>) {
        let now_tick = self.now_tick(now).max(self.swept);
        // After a long stall, one revolution visits every slot once.
        let first = self.swept + 1;
        let last = now_tick.min(self.swept + SLOTS as u64);
        for tick in first..=last {
            let slot = &mut self.slots[(tick % SLOTS as u64) as usize];
            let before = slot.len();
            slot.retain(|entry| {
                if entry.tick <= now_tick {
                    expired.push(entry.key);
                    false
                } else {
                    true
                }
            });
            self.len -= before - slot.len();
            // A connect storm piles thousands of deadlines into a few slots;
            // once they are swept, that capacity is given back rather than
            // kept for good. An emptied slot keeps nothing: as time moves on,
            // deadlines land in ever new slots, and room kept in each would
            // add up to the whole wheel's worth after one revolution.
            if slot.is_empty() {
                *slot = Vec::new();
            } else if slot.capacity() > SLOT_CAPACITY_KEPT && slot.capacity() > 2 * slot.len() {
                slot.shrink_to(slot.len());
            }
        }
        self.swept = now_tick;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(slot: u32) -> TimerKey {
        TimerKey {
            slot,
            generation: 0,
        }
    }

    #[test]
    fn entries_fire_at_or_after_their_deadline_never_before() {
        let start = Instant::now();
        let mut wheel = TimerWheel::new(start);
        wheel.insert(start + Duration::from_millis(1_000), key(1));
        wheel.insert(start + Duration::from_millis(1_100), key(2));
        let mut expired = Vec::new();
        wheel.advance(start + Duration::from_millis(999), &mut expired);
        assert!(expired.is_empty());
        wheel.advance(start + Duration::from_millis(1_100), &mut expired);
        assert_eq!(expired, [key(1)], "1 100 ms is due only from the next tick");
        expired.clear();
        wheel.advance(start + Duration::from_millis(1_249), &mut expired);
        assert!(expired.is_empty());
        wheel.advance(start + Duration::from_millis(1_250), &mut expired);
        assert_eq!(expired, [key(2)]);
        assert!(wheel.is_empty());
    }

    #[test]
    fn deadlines_beyond_one_revolution_wait_their_turn() {
        let start = Instant::now();
        let mut wheel = TimerWheel::new(start);
        let far = TICK * (SLOTS as u32 * 2 + 3);
        wheel.insert(start + far, key(9));
        let mut expired = Vec::new();
        let mut now = start;
        while now < start + far - TICK {
            now += TICK * 7;
            wheel.advance(now.min(start + far - TICK), &mut expired);
        }
        assert!(expired.is_empty());
        wheel.advance(start + far + TICK, &mut expired);
        assert_eq!(expired, [key(9)]);
    }

    #[test]
    fn a_long_stall_fires_everything_due() {
        let start = Instant::now();
        let mut wheel = TimerWheel::new(start);
        for i in 0..100 {
            wheel.insert(start + Duration::from_secs(i), key(i as u32));
        }
        let mut expired = Vec::new();
        wheel.advance(start + Duration::from_secs(10_000), &mut expired);
        assert_eq!(expired.len(), 100);
        assert!(wheel.is_empty());
    }

    #[test]
    fn swept_slots_give_back_their_room() {
        let start = Instant::now();
        let mut wheel = TimerWheel::new(start);
        for i in 0..500 {
            wheel.insert(start + TICK * (1 + i % 40), key(i));
        }
        assert!(wheel.capacity() >= 500);
        let mut expired = Vec::new();
        wheel.advance(start + TICK * 41, &mut expired);
        assert_eq!(expired.len(), 500);
        assert_eq!(wheel.capacity(), 0, "an emptied slot keeps no room");
    }

    #[test]
    fn past_deadlines_fire_on_the_next_advance() {
        let start = Instant::now();
        let mut wheel = TimerWheel::new(start);
        let mut expired = Vec::new();
        wheel.advance(start + Duration::from_secs(5), &mut expired);
        wheel.insert(start, key(3));
        wheel.advance(start + Duration::from_secs(5) + TICK, &mut expired);
        assert_eq!(expired, [key(3)]);
    }
}
