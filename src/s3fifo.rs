//! S3-FIFO (Yang et al., "FIFO queues are all you need for cache eviction", SOSP 2023) on one
//! shard: newcomers enter a small FIFO (about 10% of the entries); at its front, an entry hit
//! since it came in moves to the main FIFO, the others are evicted and their key's hash is
//! remembered in a ghost FIFO. A key found in the ghost goes straight to main. At main's front an
//! entry hit since it was last looked at goes round again (one hit less), the others are evicted.
//!
//! One-time keys (a crawler, a scan) therefore pass through the small queue without disturbing
//! main, where the frequently used keys live. A hit is one relaxed atomic bump (`Entry::hit`),
//! which needs only shared access to the shard; eviction is O(1) amortized (each extra step is
//! paid for by an earlier hit, and a counter saturates at `MAX_FREQ`).

use std::sync::atomic::Ordering::Relaxed;

use crate::shard::{Entry, Queue, Shard};

/// Hits an entry's counter remembers; more are not counted (so no entry survives more than this
/// many trips round the main queue without a new hit).
pub const MAX_FREQ: u8 = 3;

/// Hits needed in the small queue to be moved to main rather than evicted.
pub const PROMOTE_AT: u8 = 1;

/// Percentage of a shard's entries the small queue may hold before eviction takes from it.
pub const SMALL_PERCENT: usize = 10;

impl<V> Entry<V> {
    /// Counts a hit: a relaxed load and store, so that a read needs no exclusive access. Two
    /// racing hits may count as one, which only makes the policy a little less precise.
    #[inline]
    pub fn hit(&self) {
        let f = self.freq().load(Relaxed);
        if f < MAX_FREQ {
            self.freq().store(f + 1, Relaxed);
        }
    }
}

impl<V> Shard<V> {
    /// The queue a new key enters: main if it was evicted from small recently (the ghost
    /// remembers it, and forgets it now), else small.
    pub fn admit(&mut self, hash: u64) -> Queue {
        if self.ghost.take(hash) {
            Queue::Main
        } else {
            Queue::Small
        }
    }

    /// Evicts one entry by S3-FIFO and returns it (`None` if the shard is empty).
    pub fn evict_s3(&mut self) -> Option<Entry<V>> {
        loop {
            let small = self.queue_len(Queue::Small);
            let from_small = small > 0
                && (small * 100 >= self.len() * SMALL_PERCENT || self.queue_len(Queue::Main) == 0);
            if from_small {
                let slot = self.front(Queue::Small)?;
                let e = self.entry(slot);
                if e.freq().load(Relaxed) >= PROMOTE_AT {
                    e.freq().store(0, Relaxed);
                    self.move_to_back(slot, Queue::Main);
                } else {
                    let hash = self.hash(e.key());
                    let e = self.remove_hashed(slot, hash);
                    let cap = self.len();
                    self.ghost.push(hash, cap);
                    return Some(e);
                }
            } else {
                let slot = self.front(Queue::Main)?;
                let e = self.entry(slot);
                let f = e.freq().load(Relaxed);
                if f > 0 {
                    e.freq().store(f - 1, Relaxed);
                    self.move_to_back(slot, Queue::Main);
                } else {
                    return Some(self.remove(slot));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use ahash::RandomState;

    use super::*;
    use crate::clock::NEVER;

    fn hash(key: &str) -> u64 {
        RandomState::with_seeds(1, 2, 3, 4).hash_one(key)
    }

    fn entry(key: &str, expires: u64) -> Entry<u32> {
        Entry::new(key, 1, expires, Vec::new())
    }

    /// A cache of `cap` entries on one shard, as the store drives it under S3-FIFO.
    struct Cache {
        shard: Shard<u32>,
        cap: usize,
        evicted: Vec<String>,
    }

    impl Cache {
        fn new(cap: usize) -> Self {
            Cache {
                shard: Shard::with_hasher(RandomState::with_seeds(1, 2, 3, 4)),
                cap,
                evicted: Vec::new(),
            }
        }

        /// A get that sets on a miss; true on a hit.
        fn access(&mut self, key: &str) -> bool {
            if let Some(slot) = self.shard.find(hash(key), key) {
                self.shard.entry(slot).hit();
                return true;
            }
            while self.shard.len() >= self.cap {
                let e = self.shard.evict_s3().expect("a full shard has a victim");
                self.evicted.push(e.key().to_string());
            }
            let q = self.shard.admit(hash(key));
            self.shard.insert_in(entry(key, NEVER), hash(key), q);
            false
        }

        fn has(&self, key: &str) -> bool {
            self.shard.find(hash(key), key).is_some()
        }

        fn check_queues(&self) {
            let s = &self.shard;
            assert_eq!(
                s.queue_len(Queue::Small) + s.queue_len(Queue::Main),
                s.len()
            );
            let on = |q| s.iter().filter(|e| e.queue() == q).count();
            assert_eq!(on(Queue::Small), s.queue_len(Queue::Small));
            assert_eq!(on(Queue::Main), s.queue_len(Queue::Main));
            assert!(s.ghost.len() <= self.cap, "the ghost outgrew the capacity");
        }
    }

    #[test]
    fn hot_set_survives_a_scan_larger_than_the_cache() {
        let mut c = Cache::new(100);
        let hot: Vec<String> = (0..50).map(|i| format!("hot{i}")).collect();
        for _ in 0..3 {
            for k in &hot {
                c.access(k);
            }
        }
        for i in 0..10_000 {
            c.access(&format!("scan{i}"));
            if i % 100 == 0 {
                // The hot keys keep being used while the crawler runs, at a lower rate.
                for k in &hot {
                    c.access(k);
                }
            }
        }
        c.check_queues();
        let kept = hot.iter().filter(|k| c.has(k)).count();
        assert_eq!(kept, hot.len(), "a scan evicted hot keys");
        assert!(c.shard.len() <= 100);
    }

    #[test]
    fn plain_lru_would_lose_the_hot_set_to_the_same_scan() {
        // The contrast the policy exists for: one-at-a-time LRU keeps only the last keys scanned.
        let mut order: VecDeque<String> = VecDeque::new();
        for i in 0..50 {
            order.push_back(format!("hot{i}"));
        }
        for i in 0..200 {
            order.push_back(format!("scan{i}"));
            if order.len() > 100 {
                order.pop_front();
            }
        }
        assert!(order.iter().all(|k| k.starts_with("scan")));
    }

    #[test]
    fn one_hit_in_small_promotes_to_main_and_no_hit_evicts_to_the_ghost() {
        let mut c = Cache::new(10);
        c.access("a");
        c.access("a"); // hit while in small
        for i in 0..9 {
            c.access(&format!("b{i}"));
        }
        assert_eq!(c.shard.len(), 10);
        // The cache is full: the next insert evicts. "a" is at the front of small but was hit.
        c.access("new");
        let a = c
            .shard
            .find(hash("a"), "a")
            .expect("a was promoted, not evicted");
        assert_eq!(c.shard.entry(a).queue(), Queue::Main);
        assert_eq!(
            c.shard.entry(a).freq().load(Relaxed),
            0,
            "promotion resets the count"
        );
        assert_eq!(c.evicted, ["b0"]);
        assert!(c.shard.ghost.contains(hash("b0")));
        c.check_queues();
    }

    #[test]
    fn a_ghost_hit_enters_main_directly() {
        let mut c = Cache::new(10);
        for i in 0..11 {
            c.access(&format!("k{i}"));
        }
        assert_eq!(c.evicted, ["k0"]);
        c.access("k0");
        let slot = c.shard.find(hash("k0"), "k0").unwrap();
        assert_eq!(c.shard.entry(slot).queue(), Queue::Main);
        assert!(
            !c.shard.ghost.contains(hash("k0")),
            "a ghost record is used once"
        );
        c.check_queues();
    }

    #[test]
    fn main_gives_a_hit_entry_another_round() {
        let mut c = Cache::new(10);
        // Fill main through the ghost: keys evicted from small recently come back into main
        // (newest first: each eviction pushes the ghost's oldest record out).
        for i in 0..20 {
            c.access(&format!("k{i}"));
        }
        for i in (0..10).rev() {
            c.access(&format!("k{i}"));
        }
        let mains: Vec<String> = c
            .shard
            .iter()
            .filter(|e| e.queue() == Queue::Main)
            .map(|e| e.key().to_string())
            .collect();
        assert!(mains.len() >= 3, "{mains:?}");
        let keep = &mains[0];
        let slot = c.shard.find(hash(keep), keep).unwrap();
        c.shard.entry(slot).hit();
        c.evicted.clear();
        for i in 0..5 {
            c.access(&format!("fresh{i}"));
        }
        assert!(c.has(keep), "a hit main entry went round again");
        c.check_queues();
    }

    #[test]
    fn counter_saturates() {
        let e = entry("x", NEVER);
        for _ in 0..10 {
            e.hit();
        }
        assert_eq!(e.freq().load(Relaxed), MAX_FREQ);
    }

    #[test]
    fn arbitrary_removals_keep_both_queues_consistent() {
        let mut c = Cache::new(20);
        for round in 0..5 {
            for i in 0..30 {
                let k = format!("k{}", (i * 7 + round) % 40);
                c.access(&k);
            }
            // Remove every third entry wherever it is (delete, invalidation, expiry).
            let victims: Vec<String> = c
                .shard
                .iter()
                .step_by(3)
                .map(|e| e.key().to_string())
                .collect();
            for k in victims {
                let slot = c.shard.find(hash(&k), &k).unwrap();
                c.shard.remove(slot);
                c.check_queues();
            }
        }
        while c.shard.evict_s3().is_some() {
            c.check_queues();
        }
        assert!(c.shard.is_empty());
        assert_eq!(c.shard.front(Queue::Small), None);
        assert_eq!(c.shard.front(Queue::Main), None);
    }

    #[test]
    fn expired_entries_leave_through_the_sweep_from_either_queue() {
        let mut s: Shard<u32> = Shard::default();
        const SEC: u64 = 1_000_000_000;
        let small = s.insert_in(entry("s", 10 * SEC), s.hash("s"), Queue::Small);
        s.insert_in(entry("m", 20 * SEC), s.hash("m"), Queue::Main);
        s.insert_in(entry("live", NEVER), s.hash("live"), Queue::Small);
        s.entry(small).hit();
        let mut budget = 3;
        assert_eq!(s.pop_swept(15 * SEC, &mut budget).unwrap().key(), "s");
        assert_eq!(s.pop_swept(25 * SEC, &mut budget).unwrap().key(), "m");
        assert!(s.pop_swept(1000 * SEC, &mut budget).is_none());
        assert_eq!(s.queue_len(Queue::Small), 1);
        assert_eq!(s.queue_len(Queue::Main), 0);
        assert_eq!(s.evict_s3().unwrap().key(), "live");
    }
}
