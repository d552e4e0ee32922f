//! Eviction and expiry: Django's cull, "lru" over shards (`evict_*`), the `MAX_BYTES` reservation,
//! S3-FIFO's insert (`put_s3`, which evicts under its own shard lock) and the reclaiming of expired
//! entries (`reclaim`, `sweep_next`, `purge_expired`).

use crate::sync::atomic::Ordering::Relaxed;

use super::*;

/// Entries an insert into a full store of several shards evicts at most under "lru".
const EVICT_PER_INSERT: usize = 2;

/// W-TinyLFU's sketches take at most 1/`SKETCH_SHARE` of `MAX_BYTES` (each shard's its share).
const SKETCH_SHARE: u64 = 4;

/// Slots of a shard one round of the expiry sweep checks (one entry header read each, a cache
/// miss in a large store: a write sweeps one shard, so 4 misses a write while the sweep has
/// work).
const SWEEP_SLOTS: u32 = 4;

/// Rounds one sweep of a shard may take: another round follows while at least
/// `SWEEP_AGAIN` of the last round's slots held expired entries (a quarter, as Redis's active
/// expiry goes on while more than a quarter of its sample had expired), so a sweep checks at
/// most `SWEEP_SLOTS * SWEEP_ROUNDS` slots and reclaims as many where they are dense.
const SWEEP_ROUNDS: u32 = 8;
const SWEEP_AGAIN: u32 = SWEEP_SLOTS / 4;

/// Slots ahead of the sweep cursor an eviction checks for an expired entry before it evicts a
/// live one.
const EVICT_LOOK: u32 = 16;

/// Times a `MAX_BYTES` reservation looks again for a victim when its scan of the shards found
/// none but entries came in behind it (see `reserve`).
const LOOKS_AGAIN: usize = 100;

impl<V: Weigh> Store<V> {
    /// Moves this shard's expiry sweep on (`Shard::pop_swept`), reclaiming the expired entries
    /// it passes: `SWEEP_SLOTS` slots, and more rounds of as many while a round finds expired
    /// entries dense (at least `SWEEP_AGAIN`), up to `SWEEP_ROUNDS` (the adaptive effort of
    /// Redis's active expiry). Nothing at all while no entry of the shard can have expired.
    #[inline]
    pub(super) fn reclaim(&self, shard: &mut LockedShard<'_, V>, now: u64) {
        if !shard.may_have_expired(now) {
            return;
        }
        for _ in 0..SWEEP_ROUNDS {
            let mut budget = SWEEP_SLOTS;
            let mut found = 0;
            while let Some(e) = shard.pop_swept(now, &mut budget) {
                self.unbook(&e);
                shard.bury(e);
                found += 1;
            }
            Stats::bump(&self.stats.expirations, found as u64);
            if found < SWEEP_AGAIN || budget > 0 {
                break;
            }
        }
    }

    /// Sweeps the next shard in turn, if it is free (each insert and delete calls it once, after
    /// unlocking its own shard): every shard's sweep moves on while the store is written to,
    /// whatever keys are written, so expired entries cannot pile up anywhere (a shard of `n`
    /// slots is swept whole within `n / SWEEP_SLOTS` sweeps of it).
    pub(super) fn sweep_next(&self, now: u64) {
        let idx = self.sweep.fetch_add(1, Relaxed) & (self.shards.len() - 1);
        if let Some(shard) = self.shards[idx].try_write() {
            self.reclaim(&mut Locked::new(shard), now);
        }
    }

    /// Django's cull: first drop what has expired; if the store is still at `max_entries`, remove
    /// `len / cull_frequency` least recently used entries (all of them for a frequency of 0).
    /// Runs on a store of one shard (bounded: at most 65,536 entries), or for a frequency of 0
    /// (the user asked for the whole store to go); with several shards each gives its share
    /// (rounded up) from its own least recently used end.
    pub(super) fn cull(&self, limits: &Limits, now: u64) {
        let mut all = self.lock_all();
        let before = all.dead.len();
        for g in all.guard.iter_mut() {
            g.expire_all(now, &mut all.dead);
        }
        for e in &all.dead[before..] {
            self.unbook(e);
        }
        Stats::bump(&self.stats.expirations, (all.dead.len() - before) as u64);
        let len = self.len();
        if (len as i64) < limits.max_entries || len == 0 {
            return;
        }
        let count = if limits.cull_frequency == 0 {
            len
        } else {
            len / limits.cull_frequency.unsigned_abs() as usize
        };
        let mut culled = 0;
        for g in all.guard.iter_mut() {
            let share = (g.len() * count).div_ceil(len);
            for _ in 0..share {
                let Some(e) = g.pop_oldest() else { break };
                self.unbook(&e);
                all.dead.push(e);
                culled += 1;
            }
        }
        Stats::bump(&self.stats.evictions, culled as u64);
    }

    /// "lru" over several shards, at `max_entries`: instead of Django's cull (a third of the store
    /// in one insert, a pause that grows with the store), evicts one entry (expired first, else the
    /// least recently used of the new key's shard), or two while the store is still at the bound
    /// (an alias with a smaller `MAX_ENTRIES` shares it): every insert does O(1) work.
    pub(super) fn evict_for_entry(&self, limits: &Limits, now: u64, idx: usize) {
        for _ in 0..EVICT_PER_INSERT {
            if (self.len() as i64) < limits.max_entries || !self.evict_one(idx, now) {
                break;
            }
        }
    }

    /// Removes one entry from shard `idx` (or, if it is empty, the next non-empty one): an
    /// expired entry if there is one, else the policy's victim; or, from a shard with no entry
    /// left, its ghost records (see `forget_ghost`). False if there was nothing to free at all.
    pub(super) fn evict_one(&self, idx: usize, now: u64) -> bool {
        let n = self.shards.len();
        for i in 0..n {
            let mut shard = self.write((idx + i) & (n - 1));
            if let Some(e) = self.evict_locked(&mut shard, now) {
                shard.bury(e);
                return true;
            }
            if self.forget_ghost(&mut shard) {
                return true;
            }
        }
        false
    }

    /// Forgets the ghost records of a shard that has no entry left to evict and takes them off
    /// the books; false if it had none. They are charged like entries, and only eviction pushes
    /// them out: without this, records left by entries deleted since would hold bytes that no
    /// eviction could free, and an insert would find the store "full" with nothing in it.
    pub(super) fn forget_ghost(&self, shard: &mut Shard<V>) -> bool {
        let records = shard.ghost.records();
        if records == 0 {
            return false;
        }
        shard.ghost = Ghost::default();
        self.bytes
            .fetch_sub((records * GHOST_RECORD) as u64, Relaxed);
        true
    }

    /// Takes one entry off `shard` and the books: an expired one if the sweep finds one within
    /// `EVICT_LOOK` slots of its cursor, else the policy's victim (the least recently used under
    /// "lru"; counted as an expiration if it has expired). The caller buries it
    /// (`Locked::bury`).
    pub(super) fn evict_locked(&self, shard: &mut Shard<V>, now: u64) -> Option<Entry<V>> {
        // Ghost records before and after (S3-FIFO's ghost may remember the victim's hash and
        // forget older ones): they are charged like entries, so that MAX_BYTES bounds them too.
        let before = shard.ghost.records();
        let mut budget = EVICT_LOOK;
        let e = if let Some(e) = shard.pop_swept(now, &mut budget) {
            Stats::bump(&self.stats.expirations, 1);
            e
        } else {
            let e = match self.policy {
                Policy::Lru => shard.pop_oldest()?,
                Policy::TinyLfu => shard.evict_tiny()?,
                Policy::S3Fifo => shard.evict_s3()?,
            };
            if e.is_expired(now) {
                Stats::bump(&self.stats.expirations, 1);
            } else {
                Stats::bump(&self.stats.evictions, 1);
            }
            e
        };
        self.len.fetch_sub(1, Relaxed);
        // One change to the books, the victim's charge off and the new records on (fewer bytes:
        // a record is smaller than any entry), so that no reader ever sees them pass the bound.
        let off = Self::charge(&e) + (before * GHOST_RECORD) as u64;
        let on = (shard.ghost.records() * GHOST_RECORD) as u64;
        if on > off {
            self.bytes.fetch_add(on - off, Relaxed);
        } else {
            self.bytes.fetch_sub(off - on, Relaxed);
        }
        Some(e)
    }

    /// Charges `weight` bytes for an entry of shard `idx`, first evicting entries from `idx` on
    /// (expired ones first, then the policy's victims) while `max_bytes` would be passed. False
    /// (nothing charged) if it cannot fit with nothing left to evict: what holds the bytes then
    /// is the tag table (cells held by stamps, the insert's own among them), fill placeholders,
    /// or the reservations of inserts in flight, and charging anyway would pass the bound.
    pub(super) fn reserve(&self, weight: u64, limits: &Limits, now: u64, idx: usize) -> bool {
        let Some(max) = limits.max_bytes else {
            self.bytes.fetch_add(weight, Relaxed);
            return true;
        };
        let mut looks = 0;
        loop {
            let cur = self.bytes.load(Relaxed);
            if cur + self.tags.bytes() + weight <= max {
                if self
                    .bytes
                    .compare_exchange(cur, cur + weight, Relaxed, Relaxed)
                    .is_ok()
                {
                    return true;
                }
                continue;
            }
            if !self.evict_one(idx, now) {
                if !self.is_empty() && looks < LOOKS_AGAIN {
                    // The scan is not atomic across shards: entries (or places of S3-FIFO
                    // inserts in flight) came in behind it. Look again once they have landed
                    // (a bounded number of times, so that nothing here can wait for ever).
                    looks += 1;
                    crate::sync::yield_now();
                    continue;
                }
                return false;
            }
        }
    }

    /// `put` under S3-FIFO, in one hold of the key's shard lock when that shard has entries to
    /// evict. Overwriting a live key passes the old entry's place to the new one (and counts as
    /// a use of it); a new key takes a place in the count first, then its bytes, evicting one
    /// entry at a time (expired ones first) while the store is full. Places and bytes are taken
    /// with compare-and-swap, so concurrent inserts cannot pass the bounds together.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn put_s3(
        &self,
        key: &str,
        mut entry: Entry<V>,
        limits: &Limits,
        now: u64,
        only_new: bool,
        weight: u64,
        fill: Option<u64>,
    ) -> Put {
        let expires = entry.expires();
        let (hash, idx) = self.locate(key);
        let cap = limits.max_entries.max(1) as usize;
        let mut placed = false;
        let mut charged = false;
        let mut replaced = None;
        let mut shard = loop {
            let mut shard = self.write(idx);
            if !self.fill_holds(idx, key, fill, now) {
                drop(shard);
                self.give_back(placed, charged, weight);
                return Put::Stale;
            }
            if let Lookup::Live(slot) = self.lookup(&mut shard, hash, key, now) {
                if only_new {
                    drop(shard);
                    self.give_back(placed, charged, weight);
                    return Put::Exists;
                }
                // The old entry's place passes to the new one.
                let old = shard.remove(slot);
                self.bytes.fetch_sub(Self::charge(&old), Relaxed);
                if placed {
                    self.len.fetch_sub(1, Relaxed);
                }
                placed = true;
                replaced = Some((old.queue(), old.freq().load(Relaxed)));
                shard.bury(old);
            }
            if expires <= now {
                // Django stores an already-expired entry; nobody can ever read it: store nothing
                // (and evict nothing for it).
                break shard;
            }
            let mut stuck = false;
            while !placed && !stuck {
                if self.take_place(cap) {
                    placed = true;
                } else if let Some(e) = self.evict_locked(&mut shard, now) {
                    shard.bury(e);
                } else {
                    stuck = true;
                }
            }
            while !charged && !stuck {
                match limits.max_bytes {
                    None => {
                        self.bytes.fetch_add(weight, Relaxed);
                        charged = true;
                    }
                    Some(max) if self.take_bytes(max, weight) => charged = true,
                    Some(_) => match self.evict_locked(&mut shard, now) {
                        Some(e) => shard.bury(e),
                        None if self.forget_ghost(&mut shard) => {}
                        None => stuck = true,
                    },
                }
            }
            if !stuck {
                break shard;
            }
            // This shard has nothing left to evict: evict from another one, then look again.
            drop(shard);
            if !self.evict_one(idx + 1, now) {
                if placed {
                    // Nothing left anywhere and the bytes do not fit: they are held by the
                    // tag table, fill placeholders or inserts in flight (see `reserve`).
                    // Charging anyway would pass MAX_BYTES: store nothing (an old entry under
                    // the key is gone already, as for any entry too large).
                    self.give_back(placed, charged, weight);
                    if fill.is_none() {
                        // A local write: it cancels any fill of the key, as one stored would.
                        self.delete(key, now);
                    }
                    return Put::TooLarge;
                } else {
                    // Every place is held by an insert in flight, which finishes without
                    // waiting for this one.
                    crate::sync::yield_now();
                }
            }
        };
        // Checked above in this same hold of the lock: consume (or, for a write, cancel) it.
        self.fill_take(idx, key, fill, now);
        Stats::bump(&self.stats.sets, 1);
        if expires <= now {
            drop(shard);
            if placed {
                // The removed old entry's place.
                self.len.fetch_sub(1, Relaxed);
            }
            return Put::Stored;
        }
        let gen = self.next_gen();
        let has_tags = !entry.tags().is_empty();
        // Overwriting a live key counts as a use of it: it keeps its queue, one hit more.
        let (queue, freq) = match replaced {
            Some((queue, freq)) => {
                if self.policy == Policy::TinyLfu {
                    shard.tiny.sketch.record(hash);
                }
                (queue, (freq + 1).min(MAX_FREQ))
            }
            None if self.policy == Policy::TinyLfu => {
                self.grow_sketch(&mut shard, cap.div_ceil(self.shards.len()), limits);
                (shard.tiny_admit(hash), 0)
            }
            None => (shard.admit(hash), 0),
        };
        entry.freq().store(freq, Relaxed);
        entry.set_gen(gen);
        let slot = shard.insert_in(entry, hash, queue);
        self.finish_put(shard, idx, slot, gen, has_tags, limits, now);
        Put::Stored
    }

    /// Grows W-TinyLFU's sketch of `shard` (of `capacity` entries) for the entry coming in,
    /// charging its growth like an entry's bytes. Under `limits.max_bytes` it grows only if the
    /// growth fits and the store's sketches stay within `SKETCH_SHARE` of the bound (a sketch
    /// cannot be evicted: entries keep the rest); if not, the sketch stays as it is (coarser
    /// estimates; nothing is evicted for it). A shard's sketch goes with the shard (`clear`).
    fn grow_sketch(&self, shard: &mut Shard<V>, capacity: usize, limits: &Limits) {
        let growth = shard.tiny_growth(capacity) as u64;
        if growth == 0 {
            return;
        }
        match limits.max_bytes {
            Some(max) => {
                let sketches =
                    (shard.tiny.sketch.bytes() as u64 + growth) * self.shards.len() as u64;
                if sketches > max / SKETCH_SHARE || !self.take_bytes(max, growth) {
                    return;
                }
            }
            None => {
                self.bytes.fetch_add(growth, Relaxed);
            }
        }
        shard.tiny_grow(capacity);
    }

    /// Moves every shard's expiry sweep on by up to `per_shard` slots, removing the expired
    /// entries it passes (bounded work: a shard is swept whole by `len / per_shard` calls);
    /// returns how many.
    pub fn purge_expired(&self, now: u64, per_shard: u32) -> usize {
        let mut n = 0;
        for s in self.shards.iter() {
            let mut shard = Locked::new(s.write());
            let mut budget = per_shard;
            while let Some(e) = shard.pop_swept(now, &mut budget) {
                self.unbook(&e);
                shard.bury(e);
            }
            n += shard.buried();
        }
        Stats::bump(&self.stats.expirations, n as u64);
        n
    }
}

// Under `shuttle` the store's primitives work only inside a shuttle run: see the models.
#[cfg(all(test, not(feature = "shuttle")))]
mod tests {
    use std::sync::Arc;
    use std::thread;

    use super::*;
    use crate::clock::NEVER;
    use crate::store::testing::*;

    #[test]
    fn s3_max_entries_is_a_capacity_never_passed() {
        let store = s3(16);
        let lim = limits(100, None);
        for i in 0..5_000 {
            assert_eq!(set(&store, &format!("k{i}"), 1, &lim, 1), Put::Stored);
            assert!(
                store.len() <= 100,
                "{} entries after insert {i}",
                store.len()
            );
        }
        assert_eq!(store.len(), 100, "evicts just enough, one at a time");
        assert_eq!(held(&store), 100);
        assert_eq!(store.stats.snapshot().evictions, 4_900);
        // CULL_FREQUENCY plays no part: 0 (clear all under "lru") still evicts one.
        let zero = Limits {
            cull_frequency: 0,
            ..lim
        };
        set(&store, "one-more", 1, &zero, 1);
        assert_eq!(store.len(), 100);
        // A lowered capacity (another alias, or a live change) is reached at the next insert.
        set(&store, "smaller", 1, &limits(10, None), 1);
        assert_eq!(store.len(), 10);
        // A capacity below one is taken as one.
        set(&store, "tiny", 1, &limits(-1, None), 1);
        assert_eq!(held(&store), 1);
        assert!(store.contains("tiny", 1));
    }

    #[test]
    fn s3_bytes_bound_and_a_too_large_value_costs_nothing() {
        let store = s3(4);
        let per_entry = Store::<Val>::weigh("k000", &Val(0), 0, NEVER);
        let max = 20 * (per_entry + 100);
        let lim = limits(1_000_000, Some(max));
        for i in 0..500 {
            set(
                &store,
                &format!("k{:03}", i % 200),
                50 + (i * 37) % 100,
                &lim,
                1,
            );
            assert!(store.bytes() <= max, "{} > {max} bytes", store.bytes());
        }
        let before = held(&store);
        let bytes = store.bytes();
        assert_eq!(set(&store, "huge", max as usize, &lim, 1), Put::TooLarge);
        assert_eq!(held(&store), before, "nothing else was lost for it");
        assert_eq!(store.bytes(), bytes);
        assert!(!store.contains("huge", 1));
        // Accounting is exact: the bytes charged are those of the entries and ghost records held.
        let sum: u64 = store
            .shards
            .iter()
            .map(|s| {
                let s = s.read();
                let ghost = (s.ghost.records() * GHOST_RECORD) as u64;
                s.iter().map(Store::charge).sum::<u64>() + ghost
            })
            .sum();
        assert!(store.shards.iter().any(|s| s.read().ghost.records() > 0));
        assert_eq!(sum, store.bytes());
    }

    #[test]
    fn s3_ghost_records_are_charged_and_bounded_under_max_bytes() {
        // Many distinct keys, each used once: every eviction leaves a ghost record behind.
        let store = s3(1);
        let per_entry = Store::<Val>::weigh("k00000", &Val(10), 0, NEVER);
        let max = 100 * per_entry;
        let lim = limits(1_000_000, Some(max));
        for i in 0..5_000 {
            set(&store, &format!("k{i:05}"), 10, &lim, 1);
            assert!(store.bytes() <= max, "{} > {max} bytes", store.bytes());
        }
        let shard = store.shards[0].read();
        let records = shard.ghost.records();
        assert!(records > 0, "the ghost remembers evicted keys");
        let entries: u64 = shard.iter().map(Store::charge).sum();
        assert_eq!(entries + (records * GHOST_RECORD) as u64, store.bytes());
        // The ghost's share keeps entries out: fewer than 100 fit.
        assert!(shard.len() < 100, "{} entries", shard.len());
        drop(shard);
        store.clear();
        assert_eq!(store.bytes(), 0);
    }

    #[test]
    fn s3_hot_set_survives_a_scan_across_shards() {
        let store = s3(16);
        let lim = limits(1_000, None);
        let hot: Vec<String> = (0..200).map(|i| format!("hot{i}")).collect();
        let access = |k: &str| {
            if store.get(k, 1, |_| ()).is_none() {
                set(&store, k, 1, &lim, 1);
            }
        };
        for _ in 0..3 {
            hot.iter().for_each(|k| access(k));
        }
        // A crawler requests 50 times as many one-time keys as the store holds.
        for i in 0..50_000 {
            access(&format!("scan{i}"));
        }
        let kept = hot.iter().filter(|k| store.contains(k, 1)).count();
        assert_eq!(kept, hot.len(), "the scan evicted hot keys");
        assert_eq!(store.len(), 1_000);

        // The same traffic through Django's LRU cull keeps none of them.
        let lru: Store<Val> = Store::new(16);
        for _ in 0..3 {
            for k in &hot {
                if lru.get(k, 1, |_| ()).is_none() {
                    set(&lru, k, 1, &lim, 1);
                }
            }
        }
        for i in 0..50_000 {
            set(&lru, &format!("scan{i}"), 1, &lim, 1);
        }
        assert!(!hot.iter().any(|k| lru.contains(k, 1)));
    }

    #[test]
    fn s3_expired_entries_are_evicted_first() {
        let store = s3(1);
        let lim = limits(10, None);
        for i in 0..5 {
            store.set(&format!("old{i}"), Val(1), 100 * SEC, Vec::new(), &lim, 1);
            set(&store, &format!("live{i}"), 1, &lim, 1);
            // Hit-free live entries are the policy's first choice, were it not for expiry.
        }
        for i in 0..5 {
            set(&store, &format!("new{i}"), 1, &lim, 200 * SEC);
        }
        let s = store.stats.snapshot();
        assert_eq!((s.evictions, s.expirations), (0, 5));
        assert!((0..5).all(|i| store.contains(&format!("live{i}"), 200 * SEC)));
        set(&store, "one-more", 1, &lim, 200 * SEC);
        assert_eq!(store.stats.snapshot().evictions, 1);
        assert_eq!(store.len(), 10);
    }

    #[test]
    fn writes_to_other_keys_drain_a_store_full_of_expired_entries_in_bounded_steps() {
        const N: usize = 64_000;
        let most = (SWEEP_SLOTS * SWEEP_ROUNDS) as usize + 1; // and the written key's own
        for policy in [Policy::Lru, Policy::S3Fifo, Policy::TinyLfu] {
            let store: Store<Val> = Store::with_policy(16, policy);
            let lim = limits(1_000_000, None);
            for i in 0..N {
                store.set(&format!("k{i}"), Val(10), 10 * SEC, Vec::new(), &lim, 1);
            }
            assert_eq!(store.len(), N);
            // Reads reclaim nothing but the entry they look at.
            assert_eq!(store.get("k0", 20 * SEC, |v| v.0), None);
            assert_eq!(store.get("k1", 20 * SEC, |v| v.0), None);
            assert_eq!(store.len(), N - 2);
            // N / 16 writes to 100 other keys reclaim every expired entry, none more than
            // `most` at a time (no write sweeps a whole shard).
            for i in 0..N / 16 {
                let before = store.len();
                set(&store, &format!("other{}", i % 100), 10, &lim, 20 * SEC);
                assert!(before.saturating_sub(store.len()) <= most, "{policy:?} {i}");
            }
            assert_eq!((store.len(), held(&store)), (100, 100), "{policy:?}");
            assert_eq!(store.stats.snapshot().expirations, N as u64, "{policy:?}");
            assert_eq!(store.bytes(), books(&store), "{policy:?}");
        }
    }

    #[test]
    fn purge_expired_does_bounded_work_and_drains_in_len_over_budget_calls() {
        let store: Store<Val> = Store::with_policy(4, Policy::TinyLfu);
        let lim = limits(1_000_000, None);
        for i in 0..4_000u64 {
            let expires = if i % 2 == 0 { 10 * SEC } else { NEVER };
            store.set(&format!("k{i}"), Val(10), expires, Vec::new(), &lim, 1);
        }
        // Four shards, up to 100 slots each: at most 400 slots, 200 of them expired at most.
        assert_eq!(store.purge_expired(5 * SEC, 100), 0);
        let first = store.purge_expired(20 * SEC, 100);
        assert!(first <= 400, "{first}");
        let mut calls = 1;
        while store.len() > 2_000 {
            store.purge_expired(20 * SEC, 100);
            calls += 1;
            assert!(calls <= 2 * 4_000 / 400, "{calls} calls");
        }
        assert_eq!(store.stats.snapshot().expirations, 2_000);
        assert_eq!(store.bytes(), books(&store));
    }

    #[test]
    fn lru_cull_drops_every_expired_entry_before_any_live_one() {
        let store: Store<Val> = Store::new(1);
        let lim = limits(300, None);
        for i in 0..300u64 {
            // Expired entries spread over the whole slab, far from any sweep cursor.
            let expires = if i % 3 == 0 { 10 * SEC } else { NEVER };
            store.set(&format!("k{i}"), Val(1), expires, Vec::new(), &lim, 1);
        }
        set(&store, "new", 1, &lim, 20 * SEC);
        let s = store.stats.snapshot();
        assert_eq!((s.expirations, s.evictions), (100, 0));
        assert_eq!(store.len(), 201);
        assert!((0..300).all(|i| store.contains(&format!("k{i}"), 20 * SEC) == (i % 3 != 0)));
        assert_eq!(store.bytes(), books(&store));
    }

    #[test]
    fn an_eviction_takes_an_expired_entry_ahead_of_the_sweep_before_a_live_one() {
        for policy in [Policy::S3Fifo, Policy::TinyLfu] {
            let store: Store<Val> = Store::with_policy(1, policy);
            let lim = limits(10, None);
            // Slots 0-7 live, 8-9 expired: the eviction looks 16 slots ahead of the sweep.
            for i in 0..8 {
                set(&store, &format!("live{i}"), 1, &lim, 1);
            }
            for i in 0..2 {
                store.set(&format!("old{i}"), Val(1), 100 * SEC, Vec::new(), &lim, 1);
            }
            set(&store, "new", 1, &lim, 200 * SEC);
            let s = store.stats.snapshot();
            assert_eq!((s.evictions, s.expirations), (0, 2), "{policy:?}");
            assert!((0..8).all(|i| store.contains(&format!("live{i}"), 200 * SEC)));
        }
    }

    #[test]
    fn s3_add_and_expired_sets_give_back_their_place() {
        let store = s3(4);
        let lim = limits(3, None);
        for k in ["a", "b", "c"] {
            assert_eq!(
                store.add(k, Val(1), NEVER, Vec::new(), &lim, 1),
                Put::Stored
            );
        }
        assert_eq!(
            store.add("a", Val(1), NEVER, Vec::new(), &lim, 1),
            Put::Exists
        );
        assert_eq!(store.set("d", Val(1), 0, Vec::new(), &lim, 1), Put::Stored);
        assert!(!store.contains("d", 1));
        assert!(store.len() <= 3);
        assert_eq!(held(&store), store.len());
    }

    #[test]
    fn s3_overwriting_a_live_key_in_a_full_store_evicts_nothing() {
        let store = s3(4);
        let lim = limits(5, None);
        for i in 0..5 {
            set(&store, &format!("k{i}"), 1, &lim, 1);
        }
        for w in 0..20 {
            assert_eq!(set(&store, "k0", w, &lim, 1), Put::Stored);
        }
        assert_eq!(store.stats.snapshot().evictions, 0);
        assert_eq!((store.len(), held(&store)), (5, 5));
        assert_eq!(store.get("k0", 1, |v| v.0), Some(19));
    }

    #[test]
    fn lru_keeps_djangos_cull() {
        let store: Store<Val> = Store::new(shards_for(10));
        let lim = limits(10, None);
        for i in 0..10 {
            set(&store, &format!("k{i}"), 1, &lim, 1);
        }
        store.get("k0", 1, |_| ());
        set(&store, "k10", 1, &lim, 1);
        // 10 // 3 = 3 least recently used entries go at once, then the new one comes in.
        assert_eq!(store.len(), 8);
        assert_eq!(store.stats.snapshot().evictions, 3);
        assert!(store.contains("k0", 1));
        assert!(!["k1", "k2", "k3"].iter().any(|k| store.contains(k, 1)));
    }

    #[test]
    fn lru_over_shards_evicts_one_of_the_new_keys_shards_oldest_per_insert() {
        let store: Store<Val> = Store::new(SHARDS);
        let lim = limits(1_600, None);
        for i in 0..1_600 {
            set(&store, &format!("k{i}"), 1, &lim, 1);
        }
        // The first 800 keys are used again: each shard's least recently used are the others.
        for i in 0..800 {
            store.get(&format!("k{i}"), 1, |_| ());
        }
        // 100 new keys: ~6 a shard against ~50 unused old ones (the hasher is seeded at random, so
        // 400 new keys overran one shard's unused keys in ~2% of runs and evicted a used one).
        for i in 0..100 {
            set(&store, &format!("new{i}"), 1, &lim, 1);
            // The store stays at its bound: no cull of a third, one eviction an insert.
            assert_eq!(store.len(), 1_600);
        }
        assert_eq!(store.stats.snapshot().evictions, 100);
        assert!(
            (0..800).all(|i| store.contains(&format!("k{i}"), 1)),
            "a used key was evicted"
        );
        assert!((0..100).all(|i| store.contains(&format!("new{i}"), 1)));
    }

    #[test]
    fn lru_over_shards_shrinks_two_an_insert_to_a_smaller_bound_and_keeps_cull_frequency_0() {
        let store: Store<Val> = Store::new(SHARDS);
        let big = limits(1_000, None);
        for i in 0..1_000 {
            set(&store, &format!("k{i}"), 1, &big, 1);
        }
        // An alias with a smaller MAX_ENTRIES shares the store: each insert takes two away.
        let small = limits(900, None);
        set(&store, "a", 1, &small, 1);
        assert_eq!(store.len(), 999);
        // CULL_FREQUENCY 0 still empties the store (Django's meaning), whatever it costs.
        let zero = Limits {
            cull_frequency: 0,
            ..big
        };
        for i in 0..2 {
            set(&store, &format!("b{i}"), 1, &big, 1);
        }
        assert_eq!(store.len(), 1_000);
        set(&store, "c", 1, &zero, 1);
        assert_eq!(store.len(), 1);
    }

    #[test]
    fn lru_max_bytes_evicts_from_the_inserting_shard_first() {
        let store: Store<Val> = Store::new(1);
        let per = Store::<Val>::weigh("k00", &Val(10), 0, NEVER);
        let lim = limits(1_000, Some(10 * per));
        for i in 0..10 {
            set(&store, &format!("k{i:02}"), 10, &lim, 1);
        }
        store.get("k00", 1, |_| ());
        set(&store, "k10", 10, &lim, 1);
        assert!(store.contains("k00", 1) && !store.contains("k01", 1));
        assert_eq!(store.bytes(), 10 * per);
    }

    #[test]
    fn s3_ghost_records_left_by_deleted_entries_give_way_to_an_insert() {
        for policy in [Policy::S3Fifo, Policy::TinyLfu] {
            let store: Store<Val> = Store::with_policy(1, policy);
            let per = Store::<Val>::weigh("k00", &Val(100), 0, NEVER);
            let max = 10 * per;
            let lim = limits(1_000, Some(max));
            for i in 0..30 {
                set(&store, &format!("k{i:02}"), 100, &lim, 1);
            }
            for i in 0..30 {
                store.delete(&format!("k{i:02}"), 1);
            }
            assert_eq!(store.len(), 0);
            let records = ghost(&store);
            assert!(policy != Policy::S3Fifo || records > 0, "no ghost records");
            // An entry of the whole bound (but W-TinyLFU's sketch): it fits only once the ghost
            // is forgotten.
            let sketch = store.shards[0].read().tiny.sketch.bytes() as u64;
            let big = max - sketch - Store::<Val>::weigh("big", &Val(0), 0, NEVER);
            assert_eq!(
                Store::<Val>::weigh("big", &Val(big as usize), 0, NEVER),
                max - sketch
            );
            assert_eq!(set(&store, "big", big as usize, &lim, 1), Put::Stored);
            assert!(
                store.bytes() <= max,
                "{policy:?}: {} > {max}",
                store.bytes()
            );
            assert!(store.contains("big", 1));
            assert_eq!(store.bytes(), max);
        }
    }

    #[test]
    fn s3_threads_hammering_a_small_store_stay_within_bounds() {
        hammer(4, 32);
    }

    #[test]
    fn tinylfu_threads_hammering_a_small_store_stay_within_bounds() {
        hammer_under(Policy::TinyLfu, 4, 32);
        hammer_under(Policy::TinyLfu, 8, 2);
    }

    /// Bytes of the store's entries and of its W-TinyLFU sketches.
    fn entries_and_sketches(store: &Store<Val>) -> (u64, u64) {
        let mut out = (0, 0);
        for s in store.shards.iter() {
            let s = s.read();
            out.0 += s.iter().map(Store::charge).sum::<u64>();
            out.1 += s.tiny.sketch.bytes() as u64;
        }
        out
    }

    #[test]
    fn tinylfu_sketches_are_charged_like_entries_and_bounded_by_max_bytes() {
        // Unbounded: each shard's sketch follows its entries (`Sketch::bytes_for`: 33 bytes a
        // key up to 4,096 keys, 9 from 16,384, keys rounded up to a power of two), and the
        // store's bytes are its entries' and its sketches'.
        let store: Store<Val> = Store::with_policy(2, Policy::TinyLfu);
        let lim = limits(10_000, None);
        for i in 0..1_000 {
            set(&store, &format!("k{i}"), 10, &lim, 1);
        }
        let (entries, sketches) = entries_and_sketches(&store);
        let per_shard: Vec<usize> = store.shards.iter().map(|s| s.read().len()).collect();
        let expected: usize = per_shard
            .iter()
            .map(|&n| crate::sketch::Sketch::bytes_for(n))
            .sum();
        assert_eq!(sketches as usize, expected);
        assert_eq!(store.bytes(), entries + sketches);
        // Evicting keeps the sketch (and its charge); clear gives it back.
        store.delete("k1", 1);
        assert_eq!(store.bytes(), entries_and_sketches(&store).0 + sketches);
        store.clear();
        assert_eq!((store.bytes(), entries_and_sketches(&store)), (0, (0, 0)));

        // Bounded: the sketches take at most a quarter of MAX_BYTES, never pass it with the
        // entries, and are counted in the books.
        let store: Store<Val> = Store::with_policy(2, Policy::TinyLfu);
        let per = Store::<Val>::weigh("k0000", &Val(10), 0, NEVER);
        let max = 400 * per;
        let lim = limits(100_000, Some(max));
        for i in 0..5_000 {
            set(&store, &format!("k{:04}", i % 2_000), 10, &lim, 1);
            let (entries, sketches) = entries_and_sketches(&store);
            assert_eq!(store.bytes(), entries + sketches);
            assert!(store.bytes() <= max, "{} > {max}", store.bytes());
            assert!(sketches <= max / SKETCH_SHARE, "{sketches}");
        }
        assert!(entries_and_sketches(&store).1 > 0);
        // A bound too small for any sketch: the store works without one.
        let store: Store<Val> = Store::with_policy(1, Policy::TinyLfu);
        let lim = limits(100, Some(3 * per));
        for i in 0..50 {
            set(&store, &format!("k{:04}", i % 7), 10, &lim, 1);
            assert!(store.bytes() <= 3 * per);
        }
        assert_eq!(entries_and_sketches(&store).1, 0);
        assert_eq!(store.len(), 3);
    }

    #[test]
    fn tinylfu_max_entries_is_a_capacity_and_a_loop_keeps_hitting_across_shards() {
        let store: Store<Val> = Store::with_policy(16, Policy::TinyLfu);
        let lim = limits(1_600, None);
        let mut hits = 0;
        for pass in 0..20 {
            for i in 0..2_000 {
                let k = format!("loop{i}");
                if store.get(&k, 1, |_| ()).is_some() {
                    hits += usize::from(pass > 0);
                } else {
                    set(&store, &k, 1, &lim, 1);
                }
                assert!(store.len() <= 1_600);
            }
        }
        assert_eq!(held(&store), 1_600);
        // Belady keeps 1,600 of the 2,000 keys (80%); LRU would hit nothing.
        let ratio = hits as f64 / (19.0 * 2_000.0);
        assert!(ratio > 0.7, "hit ratio {ratio:.3}");
    }

    #[test]
    fn s3_threads_on_a_store_of_two_entries_over_eight_shards() {
        // Most shards are empty: inserts must evict from other shards, and often find every
        // place taken by an insert in flight.
        hammer(8, 2);
    }

    fn hammer(shards: usize, cap: i64) {
        hammer_under(Policy::S3Fifo, shards, cap);
    }

    fn hammer_under(policy: Policy, shards: usize, cap: i64) {
        let store: Arc<Store<Val>> = Arc::new(Store::with_policy(shards, policy));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let store = store.clone();
                thread::spawn(move || {
                    let lim = limits(cap, Some(cap as u64 * 400));
                    for i in 0..20_000u64 {
                        let k = format!("k{}", (i * 7 + t * 13) % 300);
                        match i % 5 {
                            0 => {
                                store.delete(&k, 1);
                            }
                            1 | 2 => {
                                store.get(&k, 1, |v| v.0);
                            }
                            _ => {
                                set(&store, &k, (i % 50) as usize, &lim, 1);
                            }
                        }
                        assert!(store.len() <= cap as usize, "{} entries", store.len());
                        assert!(store.bytes() <= cap as u64 * 400);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(held(&*store), store.len());
    }
}

/// Eviction and the `MAX_BYTES` reservation under shuttle's scheduler (`crate::sync`): threads
/// inserting into a full store in thousands of seeded, replayable interleavings. Run:
/// `cargo test --no-default-features --features shuttle store::evict`.
#[cfg(all(test, feature = "shuttle"))]
mod shuttle_tests {
    use super::*;
    use crate::clock::NEVER;
    use crate::store::testing::model::{books, check, Num, Tally};
    use crate::store::testing::*;
    use crate::sync::atomic::AtomicBool;
    use crate::sync::{scope, yield_now};

    const ITERATIONS: usize = 3_000;

    /// Into a store of `shards` shards holding `cap` entries at most, `cap - 1` already: three
    /// threads inserting two new keys each, and one watching the entry count. The count stays
    /// within `cap + over` at every moment and once they are done; every insert either holds its
    /// entry or counts an eviction; books exact; every value is dropped once (after `clear` too).
    /// Then inserts made alone bring the store back to `cap` within `over` inserts.
    fn inserts(policy: Policy, shards: usize, cap: usize, over: usize) {
        let tally = Tally::default();
        let store: Store<Num> = Store::with_policy(shards, policy);
        let lim = limits(cap as i64, None);
        for i in 0..cap - 1 {
            store.set(
                &format!("p{i}"),
                tally.num(9, 8),
                NEVER,
                Vec::new(),
                &lim,
                1,
            );
        }
        let done = AtomicBool::new(false);
        let within = |len: usize| assert!(len <= cap + over, "{len} entries, bound {cap}");
        scope(|s| {
            let inserters: Vec<_> = (0..3)
                .map(|t| {
                    let (store, tally, lim) = (&store, &tally, &lim);
                    s.spawn(move || {
                        for i in 0..2 {
                            let key = format!("k{t}{i}");
                            let put = store.set(&key, tally.num(t, 8), NEVER, Vec::new(), lim, 1);
                            assert_eq!(put, Put::Stored);
                        }
                    })
                })
                .collect();
            s.spawn(|| {
                while !done.load(Relaxed) {
                    within(store.len());
                    yield_now();
                }
            });
            for t in inserters {
                t.join().unwrap();
            }
            done.store(true, Relaxed);
        });
        let len = store.len();
        within(len);
        assert_eq!(held(&store), len, "the count is not the entries held");
        let s = store.stats.snapshot();
        assert_eq!(
            s.evictions as usize + len,
            cap - 1 + 6,
            "an entry lost or evicted twice"
        );
        assert_eq!(store.bytes(), books(&store));
        assert_eq!(tally.alive(), len, "a value dropped twice, or never");
        for i in 0..over {
            store.set(
                &format!("alone{i}"),
                tally.num(9, 8),
                NEVER,
                Vec::new(),
                &lim,
                1,
            );
        }
        assert!(
            store.len() <= cap,
            "{} entries after inserts alone",
            store.len()
        );
        store.clear();
        assert_eq!((store.len(), store.bytes(), tally.alive()), (0, 0, 0));
    }

    #[test]
    fn s3_inserts_into_a_full_store_never_pass_max_entries() {
        check(ITERATIONS, || inserts(Policy::S3Fifo, 2, 3, 0));
    }

    /// "lru" checks the bound before it inserts (Django's cull rule), not with a reservation: two
    /// inserts at `CAP - 1` both go in. Python threads never race there (a store operation holds
    /// the GIL from start to end); Rust callers and free-threaded Python could, by one entry per
    /// other insert in flight, which the next inserts take back (Django's cull of a third takes
    /// back two only from 9 entries up).
    #[test]
    fn lru_inserts_into_a_full_store_of_one_shard_pass_it_only_by_inserts_in_flight() {
        check(ITERATIONS, || inserts(Policy::Lru, 1, 9, 2));
    }

    #[test]
    fn lru_inserts_into_a_full_store_of_two_shards_pass_it_only_by_inserts_in_flight() {
        check(ITERATIONS, || inserts(Policy::Lru, 2, 3, 2));
    }

    /// Under `MAX_BYTES`, into a store of `shards` shards: three threads storing values of three
    /// sizes (each a new key, then one more, then the first key again, larger), one watching.
    /// The bytes charged never pass `MAX_BYTES` at any moment the watcher looks, nor (in a store
    /// of one shard, which it can read whole under one lock) do the entries really held; at the
    /// end the books are the sum of the entries held. `MAX_BYTES` is three of the largest
    /// entries: every insert finds room (what inserts in flight hold is at most two of them).
    fn reservations(policy: Policy, shards: usize) {
        reservations_under(policy, shards, 3);
    }

    /// `reservations` under a bound of `largest` of the largest entries. Under two, the inserts
    /// in flight may hold more than the bound leaves an insert that has nothing left to evict:
    /// it then stores nothing (`Put::TooLarge`) rather than pass the bound (see `reserve`).
    fn reservations_under(policy: Policy, shards: usize, largest: u64) {
        let tally = Tally::default();
        let store: Store<Num> = Store::with_policy(shards, policy);
        let max = largest * Store::weigh("k00", &tally.num(0, 120), 0, NEVER);
        let roomy = largest >= 3;
        let lim = limits(100, Some(max));
        let done = AtomicBool::new(false);
        scope(|s| {
            let writers: Vec<_> = (0..3u64)
                .map(|t| {
                    let (store, tally, lim) = (&store, &tally, &lim);
                    s.spawn(move || {
                        let weight = 20 + 40 * t as usize;
                        for (key, w) in [("0", weight), ("1", weight), ("0", weight + 20)] {
                            let key = format!("k{t}{key}");
                            let put = store.set(&key, tally.num(t, w), NEVER, Vec::new(), lim, 1);
                            if roomy {
                                assert_eq!(put, Put::Stored);
                            } else {
                                assert!(matches!(put, Put::Stored | Put::TooLarge), "{put:?}");
                            }
                        }
                    })
                })
                .collect();
            s.spawn(|| {
                while !done.load(Relaxed) {
                    let bytes = store.bytes();
                    assert!(bytes <= max, "{bytes} bytes charged, bound {max}");
                    if shards == 1 {
                        let held = books(&store);
                        assert!(held <= max, "{held} bytes held, bound {max}");
                    }
                    yield_now();
                }
            });
            for t in writers {
                t.join().unwrap();
            }
            done.store(true, Relaxed);
        });
        assert!(store.bytes() <= max);
        assert_eq!(
            store.bytes(),
            books(&store),
            "the books are not the entries held"
        );
        assert_eq!(held(&store), store.len());
        assert_eq!(
            tally.alive(),
            store.len(),
            "a value dropped twice, or never"
        );
        store.clear();
        assert_eq!((store.len(), store.bytes(), tally.alive()), (0, 0, 0));
    }

    #[test]
    fn lru_max_bytes_is_never_passed_in_a_store_of_one_shard() {
        check(ITERATIONS, || reservations(Policy::Lru, 1));
    }

    #[test]
    fn lru_max_bytes_is_never_passed_in_a_store_of_two_shards() {
        check(ITERATIONS, || reservations(Policy::Lru, 2));
    }

    #[test]
    fn s3_max_bytes_is_never_passed_in_a_store_of_one_shard() {
        check(ITERATIONS, || reservations(Policy::S3Fifo, 1));
    }

    #[test]
    fn s3_max_bytes_is_never_passed_in_a_store_of_two_shards() {
        check(ITERATIONS, || reservations(Policy::S3Fifo, 2));
    }

    #[test]
    fn lru_max_bytes_below_what_inserts_in_flight_hold_is_never_passed() {
        check(ITERATIONS, || reservations_under(Policy::Lru, 1, 1));
        check(ITERATIONS, || reservations_under(Policy::Lru, 2, 2));
    }

    #[test]
    fn s3_max_bytes_below_what_inserts_in_flight_hold_is_never_passed() {
        check(ITERATIONS, || reservations_under(Policy::S3Fifo, 1, 1));
        check(ITERATIONS, || reservations_under(Policy::S3Fifo, 2, 2));
    }

    /// Three threads storing entries under a tag they share ("t", whose member list grows as
    /// they go) and one of their own, into a store of `shards` shards bounded at three entries'
    /// worth, one watching. The room each insert's ref takes in a member list is charged before
    /// its reservation (`make_room`), so the reservation evicts for it; an insert whose room
    /// another took, and grew the list after the fact, evicts for it (`fit`) before it returns.
    /// The tag table's growth is charged before the eviction that makes room for it, so the
    /// watcher allows the store to be over by that much while inserts are in flight; once they
    /// are done, the bound holds and the books are exact; invalidating "t" reclaims everything.
    fn tagged(policy: Policy, shards: usize) {
        let tally = Tally::default();
        let store: Store<Num> = Store::with_policy(shards, policy);
        let entry = Store::weigh("k00", &tally.num(0, 40), 2, NEVER);
        let max = 3 * entry + 2 * crate::tags::TagCell::cost(3);
        // New cells (one per thread and "t"), and "t"'s list growing from 4 refs to 16.
        let slack = 4 * (crate::tags::TagCell::cost(3) + 64) + (112 - 64) + (208 - 112);
        let lim = limits(100, Some(max));
        let done = AtomicBool::new(false);
        scope(|s| {
            let writers: Vec<_> = (0..3u64)
                .map(|t| {
                    let (store, tally, lim) = (&store, &tally, &lim);
                    s.spawn(move || {
                        let own = format!("u{t}");
                        for i in 0..3 {
                            let stamps = store.tags.stamps(["t", own.as_str()]);
                            let key = format!("k{t}{i}");
                            let put = store.set(&key, tally.num(t, 40), NEVER, stamps, lim, 1);
                            assert!(matches!(put, Put::Stored | Put::TooLarge), "{put:?}");
                        }
                    })
                })
                .collect();
            s.spawn(|| {
                while !done.load(Relaxed) {
                    let bytes = store.bytes();
                    assert!(bytes <= max + slack, "{bytes} bytes, bound {max} + {slack}");
                    yield_now();
                }
            });
            for t in writers {
                t.join().unwrap();
            }
            done.store(true, Relaxed);
        });
        assert!(store.bytes() <= max, "{} bytes, bound {max}", store.bytes());
        assert_eq!(
            store.bytes(),
            books(&store),
            "the books are not what is held"
        );
        assert_eq!(
            tally.alive(),
            store.len(),
            "a value dropped twice, or never"
        );
        let len = store.len();
        assert_eq!(store.invalidate_tags(["t"], 1), len);
        assert_eq!((store.len(), held(&store), tally.alive()), (0, 0, 0));
        store.tags.sweep();
        assert_eq!(store.bytes() - ghost(&store), 0);
    }

    #[test]
    fn lru_inserts_under_shared_tags_end_within_max_bytes() {
        check(ITERATIONS, || tagged(Policy::Lru, 1));
        check(ITERATIONS, || tagged(Policy::Lru, 2));
    }

    #[test]
    fn s3_inserts_under_shared_tags_end_within_max_bytes() {
        check(ITERATIONS, || tagged(Policy::S3Fifo, 1));
        check(ITERATIONS, || tagged(Policy::S3Fifo, 2));
    }

    /// Expired entries reclaimed by concurrent writes (each sweeping its shard and the next),
    /// `purge_expired` and reads of them: a store of two shards with six entries expired at
    /// 10 s and two live ones; one thread writes two new keys, one reads the live and an expired
    /// key, one purges. No expired value is served, a live one always is; every expired entry
    /// leaves once (counted once, dropped once); the books and the count stay exact.
    fn expiry(policy: Policy) {
        let tally = Tally::default();
        let store: Store<Num> = Store::with_policy(2, policy);
        let lim = limits(100, None);
        let now = 10 * SEC;
        for i in 0..6 {
            let v = tally.num(100 + i, 8);
            store.set(&format!("e{i}"), v, 5 * SEC, Vec::new(), &lim, 1);
        }
        for i in 0..2 {
            store.set(
                &format!("live{i}"),
                tally.num(i, 8),
                NEVER,
                Vec::new(),
                &lim,
                1,
            );
        }
        scope(|s| {
            s.spawn(|| {
                for i in 0..2 {
                    let put = store.set(
                        &format!("a{i}"),
                        tally.num(9, 8),
                        NEVER,
                        Vec::new(),
                        &lim,
                        now,
                    );
                    assert_eq!(put, Put::Stored);
                }
            });
            s.spawn(|| {
                assert_eq!(store.get("live0", now, |v| v.n), Some(0));
                assert_eq!(store.get("e0", now, |v| v.n), None);
                assert_eq!(store.get("live1", now, |v| v.n), Some(1));
            });
            s.spawn(|| {
                store.purge_expired(now, 2);
            });
        });
        assert_eq!((held(&store), store.bytes()), (store.len(), books(&store)));
        // Enough sweeps to pass both shards whole: every expired entry is gone, once.
        for _ in 0..8 {
            store.purge_expired(now, 2);
        }
        assert_eq!((store.len(), held(&store)), (4, 4));
        assert_eq!(store.stats.snapshot().expirations, 6);
        assert_eq!(store.bytes(), books(&store));
        assert_eq!(tally.alive(), 4, "an expired value dropped twice, or never");
        store.clear();
        assert_eq!((store.len(), tally.alive()), (0, 0));
    }

    #[test]
    fn expired_entries_leave_once_under_concurrent_sweeps_reads_and_purges() {
        for policy in [Policy::Lru, Policy::S3Fifo, Policy::TinyLfu] {
            check(ITERATIONS / 3, move || expiry(policy));
        }
    }
}
