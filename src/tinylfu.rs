//! Adaptive W-TinyLFU on one shard: Caffeine's policy (Einziger, Friedman and Manes, "TinyLFU: A
//! Highly Efficient Cache Admission Policy", ACM TOS 2017, with the window of its section 4, made
//! adaptive as in Einziger, Eytan, Friedman and Manes, "Adaptive Software Cache Management",
//! Middleware 2018, here by the window's share of the hits), with CLOCK queues in place of LRU
//! lists so that a hit needs no exclusive lock.
//!
//! - A new key enters the window (the `Small` queue). The window is kept at a share of the
//!   shard's entries (1% at first): when it is full, its oldest entry not hit since it was last
//!   looked at (a hit one goes round again, as in CLOCK) is the candidate for the main region
//!   (the `Main` queue). The main region's victim is chosen by CLOCK too (an entry's counter,
//!   which saturates at 3, buys it a round per hit). The frequency sketch (`sketch.rs`, with a
//!   doorkeeper and aging) then decides: the candidate enters main and the victim is evicted if
//!   the candidate was requested more often, else the candidate is evicted. A key requested once
//!   (a scan) never displaces a used one, and a loop over more keys than the shard holds keeps a
//!   fixed set of them (the newcomer never counts more than the keys it would displace), where
//!   LRU and S3-FIFO keep evicting the keys needed next.
//! - Window sizing: every half shard-size's worth of requests, the window's share of the entries
//!   moves halfway towards its share of the sample's hits (at least one entry, at most
//!   `WINDOW_MAX`): the window and the main region end up with about as many hits per entry.
//!   Recency-heavy traffic (keys used in a burst, then forgotten) hits the window and grows it
//!   towards an LRU within a few samples; frequency-heavy traffic hits the main region and keeps
//!   the window at one entry; a loop, whose keys are never hit in the window, keeps it there too.
//!   Caffeine's hill climber (Einziger, Eytan, Friedman and Manes, Middleware 2018) compares the
//!   hit ratios of successive samples: its steps are small next to the noise of samples this
//!   short, and it took a tenth of the stream to open the window on issue 12's recency-heavy
//!   stream (8 to 12 points below LRU), where this rule takes two samples.
//! - A hit (under the shard's read lock) bumps the entry's counter and records the request in the
//!   sketch, with relaxed atomic loads and stores; the sample's counts of hits is kept the same
//!   way. Misses, aging and eviction happen in inserts, under the write lock.

use std::sync::atomic::{AtomicU32, Ordering::Relaxed};

use crate::shard::{Entry, Queue, Shard};
use crate::sketch::Sketch;

/// The window's share of the entries at first (Caffeine's).
pub const WINDOW_START: f64 = 0.01;

/// The largest share of the entries the window takes: the main region keeps a few, so that its
/// hits can call the window back when traffic turns to frequency (a window of every entry would
/// take every hit and keep itself there).
pub const WINDOW_MAX: f64 = 0.98;

/// Requests in a sample, as a share of the shard's entries.
pub const SAMPLE: f64 = 0.5;

/// What a sample's hit share weighs against the window's share before it (an exponential
/// average: one lucky sample moves the window halfway, not all the way).
pub const WEIGHT: f64 = 0.5;

/// The smallest sample, in requests (a shard of a few entries would otherwise adapt to noise).
pub const MIN_SAMPLE: usize = 64;

/// A shard's W-TinyLFU state: the sketch and the window's sample.
pub struct TinyLfu {
    pub(crate) sketch: Sketch,
    /// Hits in the current sample: counted under the read lock with a relaxed load and store,
    /// so racing hits may count as one.
    hits: AtomicU32,
    /// Those of them on entries in the window (counted the same way).
    window_hits: AtomicU32,
    /// Misses (inserts of new keys) in the current sample.
    misses: u32,
    /// The window's share of the entries, 0 to `WINDOW_MAX`.
    window: f64,
    /// Whether the shard has evicted yet (samples start then).
    full: bool,
}

impl Default for TinyLfu {
    fn default() -> Self {
        TinyLfu {
            sketch: Sketch::default(),
            hits: AtomicU32::new(0),
            window_hits: AtomicU32::new(0),
            misses: 0,
            window: WINDOW_START,
            full: false,
        }
    }
}

impl TinyLfu {
    /// The window's share of the entries.
    pub fn window(&self) -> f64 {
        self.window
    }

    /// Ends the sample if it is complete (`len`: the shard's entries): moves the window's share
    /// halfway towards the window's share of the sample's hits.
    ///
    /// At the fixed point the window and the main region serve as many hits per entry: while
    /// the window's entries are hit more often than main's (recency pays), it grows; while
    /// main's are (frequency pays), it shrinks. A sample without a hit (a scan) moves nothing.
    fn climb(&mut self, len: usize) {
        let hits = *self.hits.get_mut();
        let requests = u64::from(hits) + u64::from(self.misses);
        if (requests as f64) < (SAMPLE * len as f64).max(MIN_SAMPLE as f64) {
            return;
        }
        // Samples start once the shard has filled (until then nothing is evicted, whatever the
        // window).
        if self.full && hits > 0 {
            let share = f64::from(*self.window_hits.get_mut()) / f64::from(hits);
            self.window = ((1.0 - WEIGHT) * self.window + WEIGHT * share).clamp(0.0, WINDOW_MAX);
        }
        *self.hits.get_mut() = 0;
        *self.window_hits.get_mut() = 0;
        self.misses = 0;
    }
}

impl<V> Shard<V> {
    /// Counts a hit on the entry at `slot` (whose key hashes to `hash`): its CLOCK counter, the
    /// sketch and the window's sample. Needs only shared access.
    #[inline]
    pub fn tiny_hit(&self, slot: u32, hash: u64) {
        let e = self.entry(slot);
        e.hit();
        self.tiny.sketch.record_hit(hash);
        let bump = |n: &AtomicU32| n.store(n.load(Relaxed).saturating_add(1), Relaxed);
        bump(&self.tiny.hits);
        if e.queue() == Queue::Small {
            bump(&self.tiny.window_hits);
        }
    }

    /// A new key (hashing to `hash`) is about to be inserted into this shard: counts the miss
    /// and the request, ages the sketch and moves the window when due. Returns the queue the
    /// key enters (the window).
    pub fn tiny_admit(&mut self, hash: u64) -> Queue {
        let len = self.len() + 1;
        let t = &mut self.tiny;
        t.sketch.record(hash);
        t.sketch.age_if_due();
        t.misses = t.misses.saturating_add(1);
        t.climb(len);
        Queue::Small
    }

    /// Bytes the sketch grows by (`tiny_grow`) before one more entry comes into this shard of
    /// `capacity` entries.
    ///
    /// The sketch is sized for the shard's entries (at most `capacity`), not for its capacity
    /// from the start: a store with a large `MAX_ENTRIES` holding few entries holds a small
    /// sketch. It doubles as the entries do, keeping its counts (`Sketch::ensure`): 12 to 24
    /// bytes per entry, charged to the store's bytes like its entries.
    pub fn tiny_growth(&self, capacity: usize) -> usize {
        self.tiny.sketch.growth(capacity.min(self.len() + 1))
    }

    /// Grows the sketch by `tiny_growth(capacity)` bytes.
    pub fn tiny_grow(&mut self, capacity: usize) {
        let keys = capacity.min(self.len() + 1);
        self.tiny.sketch.ensure(keys);
    }

    /// The window's size now: its share of the entries, at least one.
    fn window_target(&self) -> usize {
        ((self.tiny.window * self.len() as f64) as usize).max(1)
    }

    /// Evicts one entry by W-TinyLFU and returns it (`None` if the shard is empty). Called
    /// before an insert: the newcomer counts as already in the window.
    pub fn evict_tiny(&mut self) -> Option<Entry<V>> {
        self.tiny.full = true;
        loop {
            let target = self.window_target();
            let window = self.queue_len(Queue::Small);
            if window == 0 || window < target {
                // The window has room for the newcomer: the main region gives the victim.
                return match self.main_victim() {
                    Some(v) => Some(self.remove(v)),
                    None => self.front(Queue::Small).map(|c| self.remove(c)),
                };
            }
            let c = self.front(Queue::Small)?;
            let e = self.entry(c);
            if e.freq().load(Relaxed) > 0 {
                e.freq().store(0, Relaxed);
                // Hit while in the window: if the sketch counts it more often than main's
                // victim, it takes the victim's place (a key hot enough for main does not stay
                // in the window, where its hits would count for recency and hold a large window
                // open); else it goes round again (CLOCK's approximation of LRU).
                if let Some(v) = self.main_victim() {
                    let c_hash = self.hash(self.entry(c).key());
                    let v_hash = self.hash(self.entry(v).key());
                    let sketch = &self.tiny.sketch;
                    if sketch.frequency(c_hash) > sketch.frequency(v_hash) {
                        let out = self.remove_hashed(v, v_hash);
                        self.move_to_back(c, Queue::Main);
                        return Some(out);
                    }
                }
                self.move_to_back(c, Queue::Small);
                continue;
            }
            if window > target {
                // The window is over its size (it shrank, or the shard filled up without
                // evicting): its oldest entries move to main without a contest, as in Caffeine.
                self.move_to_back(c, Queue::Main);
                continue;
            }
            let Some(v) = self.main_victim() else {
                return Some(self.remove(c));
            };
            let c_hash = self.hash(self.entry(c).key());
            let v_hash = self.hash(self.entry(v).key());
            let sketch = &self.tiny.sketch;
            if sketch.frequency(c_hash) > sketch.frequency(v_hash) {
                let out = self.remove_hashed(v, v_hash);
                self.move_to_back(c, Queue::Main);
                return Some(out);
            }
            return Some(self.remove_hashed(c, c_hash));
        }
    }

    /// The main region's CLOCK victim: the first entry from the front whose counter is 0 (each
    /// entry passed over loses one and goes to the back).
    fn main_victim(&mut self) -> Option<u32> {
        loop {
            let slot = self.front(Queue::Main)?;
            let f = self.entry(slot).freq().load(Relaxed);
            if f == 0 {
                return Some(slot);
            }
            self.entry(slot).freq().store(f - 1, Relaxed);
            self.move_to_back(slot, Queue::Main);
        }
    }
}

#[cfg(test)]
mod tests {
    use ahash::RandomState;

    use super::*;
    use crate::clock::NEVER;

    /// A cache of `cap` entries on one shard, as the store drives it under W-TinyLFU.
    struct Cache {
        shard: Shard<u32>,
        cap: usize,
        hits: usize,
    }

    impl Cache {
        fn new(cap: usize) -> Self {
            Cache {
                shard: Shard::with_hasher(RandomState::with_seeds(1, 2, 3, 4)),
                cap,
                hits: 0,
            }
        }

        fn hash(&self, key: &str) -> u64 {
            self.shard.hash(key)
        }

        /// A get that sets on a miss; true on a hit.
        fn access(&mut self, key: &str) -> bool {
            let h = self.hash(key);
            if let Some(slot) = self.shard.find(h, key) {
                self.shard.tiny_hit(slot, h);
                self.hits += 1;
                return true;
            }
            self.shard.tiny_grow(self.cap);
            let q = self.shard.tiny_admit(h);
            while self.shard.len() >= self.cap {
                self.shard.evict_tiny().expect("a full shard has a victim");
            }
            self.shard
                .insert_in(Entry::new(key, 1, NEVER, Vec::new()), h, q);
            false
        }

        fn has(&self, key: &str) -> bool {
            self.shard.find(self.hash(key), key).is_some()
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
            assert!(s.len() <= self.cap);
        }
    }

    #[test]
    fn a_loop_over_more_keys_than_the_shard_holds_keeps_most_of_them() {
        // 1,200 keys in turn through 1,000 places: LRU (and perfect LFU) hit nothing, S3-FIFO
        // about 62% after the first pass, Belady 1,000 of every 1,200 (83%).
        let mut c = Cache::new(1_000);
        let keys: Vec<String> = (0..1_200).map(|i| format!("loop{i}")).collect();
        for k in &keys {
            c.access(k);
        }
        c.hits = 0;
        for _ in 0..29 {
            for k in &keys {
                c.access(k);
                assert!(c.shard.len() <= 1_000);
            }
        }
        let ratio = c.hits as f64 / (29.0 * 1_200.0);
        assert!(ratio > 0.75, "hit ratio {ratio:.3} on the loop");
        c.check_queues();
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
                for k in &hot {
                    c.access(k);
                }
            }
        }
        c.check_queues();
        let kept = hot.iter().filter(|k| c.has(k)).count();
        assert_eq!(kept, hot.len(), "a scan evicted hot keys");
    }

    #[test]
    fn keys_used_while_the_shard_filled_survive_a_crawl() {
        // The counts gathered while the shard fills are kept (a sketch resized as the shard grew
        // forgot them, and the crawl's one-time keys then displaced every hot key).
        let mut c = Cache::new(500);
        let hot: Vec<String> = (0..100).map(|i| format!("hot{i}")).collect();
        for _ in 0..3 {
            for k in &hot {
                c.access(k);
            }
        }
        for i in 0..5_000 {
            c.access(&format!("crawl{i}"));
        }
        let kept = hot.iter().filter(|k| c.has(k)).count();
        assert_eq!(kept, hot.len());
        c.check_queues();
    }

    #[test]
    fn a_newcomer_counted_more_than_the_victim_displaces_it_and_one_counted_less_does_not() {
        let mut c = Cache::new(10);
        for i in 0..10 {
            c.access(&format!("k{i}"));
        }
        // Everything is counted once; "k0" three times more (a doorkeeper bit and two counts).
        for _ in 0..3 {
            c.access("k0");
        }
        // A one-time newcomer: the candidate at the window's front (the oldest unhit entry) is
        // no more frequent than main's victim and is evicted, main keeps its entries.
        c.access("once");
        assert_eq!(c.shard.len(), 10);
        let mains: Vec<String> = c
            .shard
            .iter()
            .filter(|e| e.queue() == Queue::Main)
            .map(|e| e.key().to_string())
            .collect();
        assert_eq!(
            mains.len(),
            9,
            "the filled window spilled into main: {mains:?}"
        );
        assert!(c.has("k0"));
        // A newcomer requested often while in the window beats main's unhit victim.
        let h = c.hash("fresh");
        for _ in 0..5 {
            c.shard.tiny.sketch.record(h);
        }
        c.access("fresh");
        c.access("other");
        assert!(c.has("fresh"), "the frequent candidate was admitted");
        let slot = c.shard.find(h, "fresh").unwrap();
        assert_eq!(c.shard.entry(slot).queue(), Queue::Main);
        c.check_queues();
    }

    #[test]
    fn the_window_stays_small_on_a_loop() {
        let mut c = Cache::new(600);
        let keys: Vec<String> = (0..700).map(|i| format!("loop{i}")).collect();
        for _ in 0..100 {
            for k in &keys {
                c.access(k);
            }
        }
        assert!(c.shard.tiny.full);
        assert!(
            c.shard.tiny.window() < 0.1,
            "window {}",
            c.shard.tiny.window()
        );
    }

    #[test]
    fn the_window_moves_halfway_to_its_share_of_the_hits() {
        let mut t = TinyLfu::default();
        let sample = |t: &mut TinyLfu, hits: u32, window_hits: u32, misses: u32| {
            *t.hits.get_mut() = hits;
            *t.window_hits.get_mut() = window_hits;
            t.misses = misses;
            t.climb(1_000);
        };
        // Before the shard is full, samples are dropped.
        sample(&mut t, 400, 400, 100);
        assert_eq!(t.window, WINDOW_START);
        t.full = true;
        // Too few requests (a sample is half the entries): the sample goes on.
        sample(&mut t, 100, 100, 100);
        assert_eq!((t.window, t.misses), (WINDOW_START, 100));
        // Every hit in the window: halfway to all of them, never past WINDOW_MAX.
        sample(&mut t, 400, 400, 100);
        assert!(
            (t.window - (WINDOW_START + 1.0) / 2.0).abs() < 1e-9,
            "{}",
            t.window
        );
        assert_eq!((*t.hits.get_mut(), t.misses), (0, 0), "a new sample starts");
        for _ in 0..20 {
            sample(&mut t, 400, 400, 100);
            assert!(t.window <= WINDOW_MAX);
        }
        assert_eq!(t.window, WINDOW_MAX);
        // A quarter of the hits: halfway down to a quarter.
        sample(&mut t, 400, 100, 100);
        assert!(
            (t.window - (WINDOW_MAX + 0.25) / 2.0).abs() < 1e-9,
            "{}",
            t.window
        );
        // A sample without a hit (a scan) moves nothing.
        let w = t.window;
        sample(&mut t, 0, 0, 2_000);
        assert_eq!(t.window, w);
        // No hit in the window: it shrinks towards a single entry.
        for _ in 0..60 {
            sample(&mut t, 400, 0, 100);
        }
        assert!(t.window < 1e-9);
    }

    /// A stream where recency predicts reuse (hitratio_optimum.py's recency-heavy stream): 30%
    /// of requests a new key, the rest the key introduced n new keys ago, n exponential with
    /// mean `mean_age` (a xorshift generator: the same stream every run).
    fn recency_heavy(length: usize, mean_age: f64) -> Vec<String> {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut uniform = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 11) as f64 / (1u64 << 53) as f64
        };
        let mut introduced = 0usize;
        (0..length)
            .map(|_| {
                let k = if introduced == 0 || uniform() < 0.3 {
                    introduced += 1;
                    introduced - 1
                } else {
                    let age = (-(1.0 - uniform()).ln() * mean_age) as usize;
                    introduced - 1 - age.min(introduced - 1)
                };
                format!("r{k}")
            })
            .collect()
    }

    /// Hits of an exact LRU of `cap` entries on `keys`.
    fn lru_hits(keys: &[String], cap: usize) -> usize {
        let mut order: std::collections::VecDeque<&str> = std::collections::VecDeque::new();
        let mut hits = 0;
        for k in keys {
            if let Some(i) = order.iter().position(|o| o == k) {
                order.remove(i);
                hits += 1;
            } else if order.len() == cap {
                order.pop_front();
            }
            order.push_back(k);
        }
        hits
    }

    #[test]
    fn recency_heavy_traffic_opens_the_window_and_hits_about_as_often_as_lru() {
        // With the window at 1%, the main region fills with keys counted often while they were
        // young and never used again, and new keys lose to them: the hit ratio was 30 points
        // below LRU's here.
        let keys = recency_heavy(40_000, 100.0);
        let mut c = Cache::new(200);
        for k in &keys {
            c.access(k);
        }
        let lru = lru_hits(&keys, 200) as f64 / keys.len() as f64;
        let ratio = c.hits as f64 / keys.len() as f64;
        assert!(ratio > lru - 0.01, "hit ratio {ratio:.3}, LRU {lru:.3}");
        assert!(c.shard.tiny.window() > 0.9, "{}", c.shard.tiny.window());
        c.check_queues();
        // Traffic turns to frequency (a small hot set, each key requested between every two
        // new ones): main's hits call the window back down.
        let hot: Vec<String> = (0..50).map(|i| format!("hot{i}")).collect();
        for i in 0..40_000 {
            c.access(&hot[i % hot.len()]);
            if i % 50 == 0 {
                c.access(&format!("once{i}"));
            }
        }
        assert!(c.shard.tiny.window() < 0.5, "{}", c.shard.tiny.window());
        c.check_queues();
    }

    #[test]
    fn arbitrary_removals_keep_both_queues_consistent() {
        let mut c = Cache::new(20);
        for round in 0..5 {
            for i in 0..30 {
                let k = format!("k{}", (i * 7 + round) % 40);
                c.access(&k);
            }
            let victims: Vec<String> = c
                .shard
                .iter()
                .step_by(3)
                .map(|e| e.key().to_string())
                .collect();
            for k in victims {
                let slot = c.shard.find(c.hash(&k), &k).unwrap();
                c.shard.remove(slot);
                c.check_queues();
            }
        }
        while c.shard.evict_tiny().is_some() {
            c.check_queues();
        }
        assert!(c.shard.is_empty());
    }
}
