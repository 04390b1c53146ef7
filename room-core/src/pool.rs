//! A shard's free list of byte buffers.
//!
//! Connections borrow a buffer only while they hold a partial frame or
//! unsent output, and give it back as soon as it drains, so an idle
//! connection owns no buffer at all. Buffers are boxed: a connection's empty
//! buffer slot is then one null pointer (8 bytes) rather than an empty
//! `BytesMut` (32), and every idle connection has two such slots.

use bytes::BytesMut;

/// Buffers of one standard capacity, recycled.
#[derive(Debug)]
pub struct BufferPool {
    #[expect(
        clippy::vec_box,
        reason = "connections hold boxed buffers; keeping the boxes saves an allocation per borrow"
    )]
    free: Vec<Box<BytesMut>>,
    buffer_capacity: usize,
    free_max: usize,
    /// The fewest buffers the free list held since the last `shed_unused`:
    /// that many were not needed even at the period's busiest moment.
    free_low: usize,
}

impl BufferPool {
    /// `free_max` bounds the memory the pool keeps while nobody uses it:
    /// `free_max * buffer_capacity` bytes.
    pub fn new(buffer_capacity: usize, free_max: usize) -> BufferPool {
        assert!(buffer_capacity > 0);
        BufferPool {
            free: Vec::with_capacity(free_max),
            buffer_capacity,
            free_max,
            free_low: 0,
        }
    }

    pub fn take(&mut self) -> Box<BytesMut> {
        let buffer = self
            .free
            .pop()
            .unwrap_or_else(|| Box::new(BytesMut::with_capacity(self.buffer_capacity)));
        self.free_low = self.free_low.min(self.free.len());
        buffer
    }

    /// Frees the buffers that no one took since the last call. The free
    /// list otherwise stays at the high-water mark of every burst so far (a
    /// reconnect round, a broadcast); called every few seconds, it keeps
    /// what the recent bursts used.
    pub fn shed_unused(&mut self) {
        let kept = self.free.len() - self.free_low;
        self.free.truncate(kept);
        self.free_low = kept;
    }

    /// Returns a buffer. One that grew past twice the standard size (a large
    /// frame went through it) is freed instead, so the pool never hoards
    /// large allocations.
    pub fn give(&mut self, mut buffer: Box<BytesMut>) {
        buffer.clear();
        // `reserve` on an emptied, unshared buffer moves its start back to
        // the beginning of the allocation instead of allocating.
        buffer.reserve(self.buffer_capacity);
        if buffer.capacity() <= self.buffer_capacity * 2 && self.free.len() < self.free_max {
            self.free.push(buffer);
        }
    }

    #[cfg(test)]
    fn free_len(&self) -> usize {
        self.free.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_recycled_with_their_capacity_restored() {
        let mut pool = BufferPool::new(1024, 2);
        let mut buffer = pool.take();
        buffer.extend_from_slice(&[7; 1000]);
        let _ = buffer.split_to(600);
        pool.give(buffer);
        assert_eq!(pool.free_len(), 1);
        let again = pool.take();
        assert!(again.is_empty());
        assert!(again.capacity() >= 1024);
    }

    #[test]
    fn buffers_untouched_for_a_period_are_shed() {
        let mut pool = BufferPool::new(64, 8);
        let burst: Vec<_> = (0..6).map(|_| pool.take()).collect();
        for buffer in burst {
            pool.give(buffer);
        }
        assert_eq!(pool.free_len(), 6);
        // The burst's period: the list was empty at its busiest.
        pool.shed_unused();
        assert_eq!(pool.free_len(), 6);
        // A quieter period takes two at most: four were never needed.
        let quiet: Vec<_> = (0..2).map(|_| pool.take()).collect();
        for buffer in quiet {
            pool.give(buffer);
        }
        pool.shed_unused();
        assert_eq!(pool.free_len(), 2);
        // A period with no use at all frees the rest.
        pool.shed_unused();
        assert_eq!(pool.free_len(), 0);
        assert!(pool.take().capacity() >= 64);
    }

    #[test]
    fn grown_buffers_and_overflow_are_freed() {
        let mut pool = BufferPool::new(16, 1);
        let mut big = pool.take();
        big.extend_from_slice(&[0; 100]);
        pool.give(big);
        assert_eq!(pool.free_len(), 0);
        pool.give(Box::new(BytesMut::with_capacity(16)));
        pool.give(Box::new(BytesMut::with_capacity(16)));
        assert_eq!(pool.free_len(), 1);
    }
}
