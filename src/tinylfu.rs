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
//! - A popularity shift ages the sketch at once: when three samples in a row hit well below the
//!   average of the samples before them (by 15% of it, and by more than three standard errors),
//!   the counts describe traffic that has gone. The keys they hold in main (counted up to 15
//!   each) would keep the new hot keys out until the periodic aging, after `HISTORY` sketch
//!   sizes' worth of requests: 327,680 at 5,000 entries (a sketch of 8,192), later than issue
//!   12's shift stream ends (its row was 1.3 to 3.0 points below the perfect LFU, with the hash
//!   seed; 0.2 to 0.4 now, on 4 seeds). A shorter period costs the Zipf streams instead: 20
//!   shard sizes rather than 40 cost Zipf 0.8 at 200 entries (the CI rows) 3.7 points, 10 sizes
//!   6.1 (the counts of the keys at the boundary of what deserves a place need the long history).
//!   A long one-time scan (a crawl) lowers the hit ratio as much, for as long: a low sample only
//!   counts if recurring keys lost their contests in it (`SHIFT_RECURRING`): keys hit in the
//!   window that lose to main's victim, and misses on keys rejected shortly before (a table of
//!   `REJECTED_SLOTS` hashes). A crawl's keys are neither; aging during a crawl lost 8 to 36 of
//!   100 hot keys in `tests/test_eviction.py`'s crawl.
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

/// Window entries one eviction moves to main at most. A window larger than its size (a shard
/// that filled up, all of it in the window; a window that shrank) then drains over the next
/// inserts, up to this many each, instead of in one insert (moving a 62,500-entry shard's fill
/// took 11 ms, 312,500 entries 77 ms); past them, the window's front faces main's victim. 256
/// moves the hit ratios measured by at most 0.14 points (16 cost the loop 1.8).
pub const MAX_MOVES: usize = 256;

/// Requests in a sample, as a share of the shard's entries.
pub const SAMPLE: f64 = 0.5;

/// What a sample's hit share weighs against the window's share before it (an exponential
/// average: one lucky sample moves the window halfway, not all the way).
pub const WEIGHT: f64 = 0.5;

/// The smallest sample, in requests (a shard of a few entries would otherwise adapt to noise).
pub const MIN_SAMPLE: usize = 64;

/// A sample whose hit ratio is below the average of the samples before it by this share of it
/// (and by `SHIFT_SIGMAS` standard errors) is a low one.
pub const SHIFT_DROP: f64 = 0.15;

/// Standard errors (of a sample's hit ratio, binomial) a low sample must fall by: on a small
/// shard a sample of 64 requests moves by chance more than `SHIFT_DROP`.
pub const SHIFT_SIGMAS: f64 = 3.0;

/// Low samples in a row after which the sketch is aged at once: issue 12's one-time scans (0.4
/// shard sizes each) lower at most two samples, a popularity shift every one until main is
/// turned over.
pub const SHIFT_SAMPLES: u32 = 3;

/// Slots of the table of recently rejected candidates (their hashes, direct-mapped): a miss on a
/// key found there is a recurring key that lost its contest.
pub const REJECTED_SLOTS: usize = 64;

/// A low sample counts towards a shift only if at least this share of its misses were recurring
/// keys losing their contest (a candidate hit in the window that loses to main's victim, or a miss
/// on a key rejected shortly before): in a shift the new keys keep losing to old ones no longer
/// hit (at 5,000 entries 0.6% to 1.5% of the misses in the samples after it); in a one-time scan
/// no rejected key comes back and none is hit in the window (0 in a crawl, at most 0.3% in the
/// low samples of issue 12's scans). The candidates' sketch estimates do not tell a scan apart:
/// measured on a crawl of 40 shard sizes, its one-time keys saturate the doorkeeper and the
/// counters, and most rejected ones end up estimated at 3 or more.
pub const SHIFT_RECURRING: f64 = 0.005;

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
    /// The samples' hit ratio, averaged as the window is (`WEIGHT`); `None` before the first.
    hit_ratio: Option<f64>,
    /// Low samples in a row (see `SHIFT_DROP`), not in the average.
    low: u32,
    /// Hashes of recently rejected candidates, each in slot `hash % REJECTED_SLOTS` (0: none).
    rejected: [u64; REJECTED_SLOTS],
    /// Recurring keys that lost their contest in the current sample (`SHIFT_RECURRING`).
    recurring: u32,
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
            hit_ratio: None,
            low: 0,
            rejected: [0; REJECTED_SLOTS],
            recurring: 0,
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
    ///
    /// Also ages the sketch when `SHIFT_SAMPLES` samples in a row hit well below the average of
    /// those before (`shifted`).
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
        let recurring = f64::from(self.recurring) >= SHIFT_RECURRING * f64::from(self.misses);
        if self.full
            && self.shifted(
                f64::from(hits) / requests as f64,
                requests as f64,
                recurring,
            )
        {
            self.sketch.age();
        }
        *self.hits.get_mut() = 0;
        *self.window_hits.get_mut() = 0;
        self.misses = 0;
        self.recurring = 0;
    }

    /// Notes that the candidate hashing to `hash` lost its contest and was evicted.
    fn reject(&mut self, hash: u64) {
        self.rejected[hash as usize % REJECTED_SLOTS] = hash;
    }

    /// Counts a miss on the key hashing to `hash` as recurring if it was rejected recently.
    fn note_miss(&mut self, hash: u64) {
        let slot = &mut self.rejected[hash as usize % REJECTED_SLOTS];
        if *slot == hash && hash != 0 {
            *slot = 0;
            self.recurring = self.recurring.saturating_add(1);
        }
    }

    /// Takes a complete sample's hit ratio `r` (of `requests`); true if popularity has shifted:
    /// this is the `SHIFT_SAMPLES`th sample in a row that is low (below the average of the
    /// samples before the first of them by `SHIFT_DROP` of it and by `SHIFT_SIGMAS` standard
    /// errors). The average then starts again from `r`.
    fn shifted(&mut self, r: f64, requests: f64, recurring: bool) -> bool {
        let Some(avg) = self.hit_ratio else {
            self.hit_ratio = Some(r);
            return false;
        };
        let noise = SHIFT_SIGMAS * (avg * (1.0 - avg) / requests).sqrt();
        if r < avg - (SHIFT_DROP * avg).max(noise) {
            if !recurring {
                // A drop with (almost) no recurring key losing (a one-time scan): the old counts
                // still describe the traffic; the average is left as it was.
                self.low = 0;
                return false;
            }
            self.low += 1;
            if self.low < SHIFT_SAMPLES {
                return false;
            }
            self.low = 0;
            self.hit_ratio = Some(r);
            return true;
        }
        self.low = 0;
        self.hit_ratio = Some((1.0 - WEIGHT) * avg + WEIGHT * r);
        false
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
        t.note_miss(hash);
        t.climb(len);
        Queue::Small
    }

    /// Bytes the sketch grows by (`tiny_grow`) before one more entry comes into this shard of
    /// `capacity` entries.
    ///
    /// The sketch is sized for the shard's entries (at most `capacity`), not for its capacity
    /// from the start: a store with a large `MAX_ENTRIES` holding few entries holds a small
    /// sketch. It doubles as the entries do, keeping its counts (`Sketch::ensure`): 9 to 18
    /// bytes per entry from 8,192 entries on, up to 66 below (4 counter words a key, at most
    /// 128 KB of them: `Sketch::words_for`), charged to the store's bytes like its entries.
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
        let mut moves = 0;
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
                    // A recurring key (hit in the window) lost: counts towards a shift.
                    self.tiny.recurring = self.tiny.recurring.saturating_add(1);
                }
                self.move_to_back(c, Queue::Small);
                continue;
            }
            if window > target && moves < MAX_MOVES {
                // The window is over its size (it shrank, or the shard filled up without
                // evicting): its oldest entries move to main
                // without a contest, as in Caffeine, at most `MAX_MOVES` per insert; past
                // that, the candidate faces main's victim as when the window is at its size.
                moves += 1;
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
            self.tiny.reject(c_hash);
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
            Cache::with_seed(cap, 1)
        }

        /// The same with the hasher's first seed `seed` (the store's is random per process).
        fn with_seed(cap: usize, seed: u64) -> Self {
            Cache {
                shard: Shard::with_hasher(RandomState::with_seeds(seed, 2, 3, 4)),
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
    fn the_first_eviction_moves_a_few_entries_out_of_the_window() {
        // A shard fills with every entry in its window; the first eviction used to move the
        // whole fill to main in one insert (11 ms for a 62,500-entry shard, 77 ms at 312,500).
        let cap = 5_000;
        let mut c = Cache::new(cap);
        for i in 0..cap {
            c.access(&format!("fill{i}"));
        }
        assert_eq!(c.shard.queue_len(Queue::Small), cap);
        c.access("first-eviction");
        let moved = cap + 1 - c.shard.queue_len(Queue::Small);
        assert!(moved <= MAX_MOVES + 2, "one insert moved {moved} entries");
        c.check_queues();
        for i in 0..cap {
            c.access(&format!("next{i}"));
        }
        assert!(c.shard.queue_len(Queue::Small) <= c.shard.window_target() + 1);
        c.check_queues();
    }

    #[test]
    fn a_window_that_shrank_drains_a_few_entries_per_insert() {
        let cap = 5_000;
        let mut c = Cache::new(cap);
        for i in 0..cap {
            c.access(&format!("fill{i}"));
        }
        c.access("first-eviction");
        // As if recency-heavy traffic had opened the window, then it shrank at once.
        while c.shard.queue_len(Queue::Small) < cap - 10 {
            let m = c.shard.front(Queue::Main).unwrap();
            c.shard.move_to_back(m, Queue::Small);
        }
        let before = c.shard.queue_len(Queue::Small);
        c.access("after-the-shrink");
        let moved = before + 1 - c.shard.queue_len(Queue::Small);
        assert!(moved <= MAX_MOVES + 2, "one insert moved {moved} entries");
        for i in 0..cap {
            c.access(&format!("next{i}"));
        }
        assert!(c.shard.queue_len(Queue::Small) <= c.shard.window_target() + 1);
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

    /// Requests `hot` round-robin `rounds` times with a one-time key after every third, through
    /// `c`; the hits on `hot` in the last round.
    fn hot_rounds(c: &mut Cache, hot: &[String], rounds: usize, tag: &str) -> usize {
        let mut last = 0;
        for round in 0..rounds {
            for (i, k) in hot.iter().enumerate() {
                if c.access(k) && round == rounds - 1 {
                    last += 1;
                }
                if i % 3 == 2 {
                    c.access(&format!("{tag}-once-{round}-{i}"));
                }
            }
        }
        last
    }

    #[test]
    fn after_a_popularity_shift_the_new_hot_keys_get_in_before_the_periodic_aging() {
        // 150 hot keys, each requested 20 times (counted 15, the most a counter holds), then
        // 150 others the same way: the old ones, no longer hit, are main's victims, and a new
        // key counts at most as much. The periodic aging is due after HISTORY * 256 = 10,240
        // requests, later than both phases (8,000): without the shift's aging, the new keys only
        // got the 50 places the old ones left (49 of 150 hit in the last round).
        let mut c = Cache::new(200);
        let old: Vec<String> = (0..150).map(|i| format!("old{i}")).collect();
        let new: Vec<String> = (0..150).map(|i| format!("new{i}")).collect();
        let hits = hot_rounds(&mut c, &old, 20, "a");
        assert!(
            hits >= 145,
            "{hits} of the old hot keys hit before the shift"
        );
        assert!(c.shard.tiny.sketch.frequency(c.hash(&old[0])) >= 15);
        let hits = hot_rounds(&mut c, &new, 20, "b");
        assert!(
            hits >= 140,
            "{hits} of 150 new hot keys hit in the last round"
        );
        let cached = new.iter().filter(|k| c.has(k)).count();
        assert!(cached >= 140, "{cached} of 150 new hot keys cached");
        c.check_queues();
    }

    /// The key whose count the shift tests watch.
    const WATCHED: u64 = 0x1234_5678_9abc_def0;

    /// The W-TinyLFU state of a full shard of `len` entries whose sketch counted `WATCHED`
    /// `requests` times (the first in the doorkeeper), as the shift tests start.
    fn counted(len: usize, requests: usize) -> TinyLfu {
        let mut t = TinyLfu::default();
        t.sketch.ensure(len);
        t.full = true;
        for _ in 0..requests {
            t.sketch.record(WATCHED);
        }
        t
    }

    /// Ends a sample of `requests` requests on a shard of `len` entries: `hits` hits, and
    /// `recurring` of the misses recurring keys that lost their contest.
    fn sample(t: &mut TinyLfu, len: usize, requests: u32, hits: u32, recurring: u32) {
        *t.hits.get_mut() = hits;
        t.misses = requests - hits;
        t.recurring = recurring;
        t.climb(len);
    }

    #[test]
    fn the_sketch_ages_after_three_low_samples_in_a_row_beyond_the_noise() {
        // Samples of 1,000 requests, `hits` of them hits, a tenth of the misses on keys rejected
        // shortly before.
        let mut t = counted(1_000, 9);
        let tenth = |t: &mut TinyLfu, hits: u32| sample(t, 1_000, 1_000, hits, (1_000 - hits) / 10);
        // Steady at 70%, then a scan's two low samples: no aging.
        for _ in 0..5 {
            tenth(&mut t, 700);
        }
        tenth(&mut t, 200);
        tenth(&mut t, 300);
        tenth(&mut t, 700);
        assert_eq!(t.sketch.frequency(WATCHED), 9);
        // Two low samples, a normal one, two low ones: never three in a row.
        for hits in [500, 500, 700, 500, 500, 700] {
            tenth(&mut t, hits);
        }
        assert_eq!(t.sketch.frequency(WATCHED), 9);
        // A drop of less than 15% (14%), however long: no aging.
        for _ in 0..10 {
            tenth(&mut t, 600);
        }
        assert_eq!(t.sketch.frequency(WATCHED), 9);
        // The average is now 60%: three samples at 45% age it (8 counted, halved; the
        // doorkeeper emptied).
        for _ in 0..3 {
            tenth(&mut t, 450);
        }
        assert_eq!(t.sketch.frequency(WATCHED), 4);
        // The average starts again at 45%: staying there ages nothing more.
        for _ in 0..10 {
            tenth(&mut t, 450);
        }
        assert_eq!(t.sketch.frequency(WATCHED), 4);

        // On a small shard (samples of 64 requests), a fall by chance is no shift: 50% on
        // average, three samples at 35% (a fall of 3 tenths, less than 3 standard errors).
        let mut t = counted(100, 5);
        let small = |t: &mut TinyLfu, hits: u32| sample(t, 100, 64, hits, (64 - hits) / 10);
        for _ in 0..5 {
            small(&mut t, 32);
        }
        for _ in 0..3 {
            small(&mut t, 22);
        }
        assert_eq!(t.sketch.frequency(WATCHED), 5);
        // A fall to 9% (the average is 36% by now) is one.
        for _ in 0..3 {
            small(&mut t, 6);
        }
        assert_eq!(t.sketch.frequency(WATCHED), 2);
    }

    #[test]
    fn a_drop_with_no_recurring_key_losing_ages_nothing() {
        // The hit ratio falls from 70% to 20% for ten samples (a long one-time scan): (almost)
        // no recurring key loses its contest, so the counts are kept.
        let mut t = counted(1_000, 9);
        for _ in 0..5 {
            sample(&mut t, 1_000, 1_000, 700, 30);
        }
        // Fewer than 0.5% of the misses recurring (3 of 800): a scan.
        for _ in 0..10 {
            sample(&mut t, 1_000, 1_000, 200, 3);
        }
        assert_eq!(t.sketch.frequency(WATCHED), 9);
        // The same drop with recurring keys losing (4 of 800) ages the sketch.
        for _ in 0..3 {
            sample(&mut t, 1_000, 1_000, 200, 4);
        }
        assert_eq!(t.sketch.frequency(WATCHED), 4);
    }

    #[test]
    fn a_miss_on_a_key_rejected_shortly_before_counts_as_recurring() {
        let mut t = TinyLfu::default();
        t.reject(7);
        t.reject(7 + REJECTED_SLOTS as u64);
        t.note_miss(7);
        assert_eq!(t.recurring, 0, "its slot was taken by a later rejection");
        t.note_miss(7 + REJECTED_SLOTS as u64);
        assert_eq!(t.recurring, 1);
        t.note_miss(7 + REJECTED_SLOTS as u64);
        assert_eq!(t.recurring, 1, "counted once per rejection");
        t.note_miss(0);
        assert_eq!(t.recurring, 1);
    }

    #[test]
    fn a_long_scan_with_the_hot_keys_used_now_and_then_does_not_age_the_sketch() {
        // The store test's crawl (tests/test_eviction.py), on one shard of 500: 100 hot keys,
        // then 20,000 one-time keys with the hot keys used again every 2,000. The hit ratio
        // falls far for many samples, but no recurring key loses: the sketch ages only when
        // due (every HISTORY * 512 = 20,480 requests), never at once, and every hot key stays.
        for seed in 1..=8 {
            let mut c = Cache::with_seed(500, seed);
            let hot: Vec<String> = (0..100).map(|i| format!("hot{i}")).collect();
            let mut agings = 0;
            let mut added = 0;
            let mut step = |c: &mut Cache, key: &str| {
                c.access(key);
                let now = c.shard.tiny.sketch.added();
                if now < added {
                    agings += 1;
                }
                added = now;
            };
            for _ in 0..3 {
                for k in &hot {
                    step(&mut c, k);
                }
            }
            for i in 0..20_000 {
                step(&mut c, &format!("crawl{i}"));
                if i % 2_000 == 1_999 && i < 19_999 {
                    for k in &hot {
                        step(&mut c, k);
                    }
                }
            }
            // 21,200 requests: one aging when due.
            assert_eq!(agings, 1, "seed {seed}: the sketch aged {agings} times");
            let kept = hot.iter().filter(|k| c.has(k)).count();
            assert_eq!(kept, hot.len(), "seed {seed}");
            c.check_queues();
        }
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
