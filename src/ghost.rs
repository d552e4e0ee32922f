//! S3-FIFO's ghost: the hashes of keys recently evicted from a shard's small queue (see
//! `s3fifo.rs`). A shard owns one; it lives in its own file so that `shard.rs` (which holds it)
//! and `s3fifo.rs` (which drives it) need not import each other.

use std::collections::VecDeque;

use ahash::RandomState;
use hashbrown::HashMap;

/// Hashes of keys recently evicted from the small queue, oldest first, at most as many as the
/// shard holds entries. Stores hashes only: a colliding key may be admitted to main by mistake,
/// which costs hit ratio, never correctness.
pub struct Ghost {
    fifo: VecDeque<(u64, u64)>,
    /// Hash -> sequence number of its newest record in `fifo`; older records are stale.
    live: HashMap<u64, u64, RandomState>,
    seq: u64,
}

impl Default for Ghost {
    fn default() -> Self {
        Ghost {
            fifo: VecDeque::new(),
            live: HashMap::with_hasher(RandomState::new()),
            seq: 0,
        }
    }
}

impl Ghost {
    pub fn contains(&self, hash: u64) -> bool {
        self.live.contains_key(&hash)
    }

    /// Forgets `hash`; true if it was remembered.
    pub fn take(&mut self, hash: u64) -> bool {
        self.live.remove(&hash).is_some()
    }

    /// Remembers `hash`, forgetting the oldest records beyond `cap`.
    pub fn push(&mut self, hash: u64, cap: usize) {
        self.seq += 1;
        self.live.insert(hash, self.seq);
        self.fifo.push_back((hash, self.seq));
        while self.fifo.len() > cap {
            let Some((h, s)) = self.fifo.pop_front() else {
                break;
            };
            if self.live.get(&h) == Some(&s) {
                self.live.remove(&h);
            }
        }
    }

    /// Records held (stale ones included): what the ghost is charged for (`mem::GHOST_RECORD`).
    pub fn records(&self) -> usize {
        self.fifo.len()
    }

    /// Hashes remembered.
    pub fn len(&self) -> usize {
        self.live.len()
    }

    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ghost_is_bounded_and_exact_for_rememebered_hashes() {
        let mut g = Ghost::default();
        for h in 0..100u64 {
            g.push(h, 10);
        }
        assert_eq!(g.len(), 10);
        assert!(g.contains(99) && g.contains(90) && !g.contains(89));
        // Re-pushing and taking leave stale records that never forget a newer one.
        g.push(95, 10);
        assert!(g.take(95));
        assert!(!g.contains(95));
        g.push(95, 10);
        for h in 200..208u64 {
            g.push(h, 10);
        }
        assert!(
            g.contains(95),
            "the newest record of 95 is within the last 10"
        );
        for h in 300..320u64 {
            g.push(h, 10);
        }
        assert!(!g.contains(95));
        assert!(g.len() <= 10);
    }
}
