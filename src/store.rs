//! The store: shards under `parking_lot` mutexes, one global recency order, expiry, eviction by
//! entry count (Django's cull rule) and by bytes, tag invalidation, and counters.
//!
//! Every method collects the entries it removes and drops them only after the shard locks are
//! released, so that a value whose destructor runs code (a Python object's `__del__`) never runs
//! under a lock. The store never calls back into its caller while a lock is held.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};

use ahash::RandomState;
use parking_lot::{Mutex, MutexGuard};

use crate::flight::Flights;
use crate::shard::{Entry, Shard};
use crate::stats::Stats;
use crate::tags::{all_current, EntryRef, TagStamp, TagTable};

/// What a stored value costs in bytes (beyond the per-entry overhead the store adds itself).
pub trait Weigh {
    fn weight(&self) -> usize;
}

/// Limits read from the calling backend at each operation: aliases with different limits may
/// share one store, as with Django's LocMemCache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Cull when the store holds this many entries or more before an insert.
    pub max_entries: i64,
    /// Cull `len / cull_frequency` least recently used entries; 0 clears the store.
    pub cull_frequency: i64,
    /// Never hold more than this many bytes (keys, values and per-entry overhead).
    pub max_bytes: Option<u64>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_entries: 300,
            cull_frequency: 3,
            max_bytes: None,
        }
    }
}

/// The result of `set` and `add`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Put {
    Stored,
    /// `add` found a live entry under the key and left it alone.
    Exists,
    /// The entry alone is larger than `max_bytes`; nothing was stored.
    TooLarge,
    /// A tag was invalidated after its stamp was taken (the value may be stale); nothing stored.
    Stale,
}

/// The result of `replace_if`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replace {
    Done,
    /// The entry changed since the snapshot: read it again.
    Conflict,
    Missing,
    TooLarge,
}

/// Bytes charged per entry besides key and value: the slot, its hash-table cell, and tag stamps.
pub fn entry_overhead<V>(tags: usize) -> u64 {
    (std::mem::size_of::<Entry<V>>() + 16 + tags * 24) as u64
}

pub struct Store<V> {
    shards: Box<[Mutex<Shard<V>>]>,
    hasher: RandomState,
    tick: AtomicU64,
    sweep: AtomicUsize,
    len: AtomicUsize,
    bytes: AtomicU64,
    pub stats: Stats,
    pub tags: TagTable,
    pub flights: Flights,
}

enum Lookup {
    Live(u32),
    Absent,
}

const RECLAIM_PER_OP: usize = 2;

impl<V: Weigh> Store<V> {
    pub fn new(shards: usize) -> Self {
        let n = shards.max(1).next_power_of_two();
        Store {
            shards: (0..n).map(|_| Mutex::new(Shard::default())).collect(),
            hasher: RandomState::new(),
            tick: AtomicU64::new(1),
            sweep: AtomicUsize::new(0),
            len: AtomicUsize::new(0),
            bytes: AtomicU64::new(0),
            stats: Stats::default(),
            tags: TagTable::default(),
            flights: Flights::default(),
        }
    }

    pub fn len(&self) -> usize {
        self.len.load(Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn bytes(&self) -> u64 {
        self.bytes.load(Relaxed)
    }

    /// Whether any shard lock is held right now (for tests that check nothing runs under a lock).
    pub fn is_locked(&self) -> bool {
        self.shards.iter().any(|s| s.is_locked())
    }

    /// Bytes an entry with this key, value and number of tags is charged.
    pub fn weigh(key: &str, value: &V, tags: usize) -> u64 {
        (key.len() + value.weight()) as u64 + entry_overhead::<V>(tags)
    }

    #[inline]
    fn next_tick(&self) -> u64 {
        self.tick.fetch_add(1, Relaxed)
    }

    #[inline]
    fn locate(&self, key: &str) -> (u64, usize) {
        let hash = self.hasher.hash_one(key);
        // The low bits pick the bucket inside the table; use the high bits for the shard.
        let idx = (hash >> 58) as usize & (self.shards.len() - 1);
        (hash, idx)
    }

    /// Removes `slot` and takes it off the books.
    fn detach(&self, shard: &mut Shard<V>, slot: u32) -> Entry<V> {
        let e = shard.remove(slot);
        self.len.fetch_sub(1, Relaxed);
        self.bytes.fetch_sub(e.weight, Relaxed);
        e
    }

    /// Reclaims a few expired entries of this shard: expiry never needs a scan of the store.
    #[inline]
    fn reclaim(&self, shard: &mut Shard<V>, now: u64, dead: &mut Vec<Entry<V>>) {
        for _ in 0..RECLAIM_PER_OP {
            match shard.pop_expired(now) {
                Some(e) => {
                    self.len.fetch_sub(1, Relaxed);
                    self.bytes.fetch_sub(e.weight, Relaxed);
                    Stats::bump(&self.stats.expirations, 1);
                    dead.push(e);
                }
                None => break,
            }
        }
    }

    /// Reclaims a few expired entries of the next shard in turn, if it is free: with the
    /// reclaiming each operation does in its own shard, expired entries cannot pile up anywhere.
    fn sweep_next(&self, now: u64) {
        let idx = self.sweep.fetch_add(1, Relaxed) & (self.shards.len() - 1);
        let mut dead = Vec::new();
        if let Some(mut shard) = self.shards[idx].try_lock() {
            self.reclaim(&mut shard, now, &mut dead);
        }
    }

    /// Finds a live entry, removing it if it has expired or one of its tags moved on.
    fn lookup(
        &self,
        shard: &mut Shard<V>,
        hash: u64,
        key: &str,
        now: u64,
        dead: &mut Vec<Entry<V>>,
    ) -> Lookup {
        let Some(slot) = shard.find(hash, key) else {
            return Lookup::Absent;
        };
        let e = shard.entry(slot);
        if e.is_expired(now) {
            Stats::bump(&self.stats.expirations, 1);
        } else if !all_current(&e.tags) {
            Stats::bump(&self.stats.invalidations, 1);
        } else {
            return Lookup::Live(slot);
        }
        dead.push(self.detach(shard, slot));
        Lookup::Absent
    }

    /// Calls `read` on the live value under `key` and marks it recently used.
    pub fn get<R>(&self, key: &str, now: u64, read: impl FnOnce(&V) -> R) -> Option<R> {
        let (hash, idx) = self.locate(key);
        let mut dead = Vec::new();
        let mut shard = self.shards[idx].lock();
        self.reclaim(&mut shard, now, &mut dead);
        let out = match self.lookup(&mut shard, hash, key, now, &mut dead) {
            Lookup::Live(slot) => {
                let tick = self.next_tick();
                shard.touch(slot, tick);
                Stats::bump(&self.stats.hits, 1);
                Some(read(&shard.entry(slot).value))
            }
            Lookup::Absent => {
                Stats::bump(&self.stats.misses, 1);
                None
            }
        };
        drop(shard);
        out
    }

    /// Like `get` but also returns the entry's generation, for a later `replace_if`.
    pub fn snapshot<R>(&self, key: &str, now: u64, read: impl FnOnce(&V) -> R) -> Option<(R, u64)> {
        let (hash, idx) = self.locate(key);
        let mut dead = Vec::new();
        let mut shard = self.shards[idx].lock();
        let out = match self.lookup(&mut shard, hash, key, now, &mut dead) {
            Lookup::Live(slot) => {
                let e = shard.entry(slot);
                Some((read(&e.value), e.gen))
            }
            Lookup::Absent => None,
        };
        drop(shard);
        out
    }

    /// Whether a live entry exists; does not change recency (as LocMemCache's `has_key`).
    pub fn contains(&self, key: &str, now: u64) -> bool {
        let (hash, idx) = self.locate(key);
        let mut dead = Vec::new();
        let mut shard = self.shards[idx].lock();
        let out = matches!(
            self.lookup(&mut shard, hash, key, now, &mut dead),
            Lookup::Live(_)
        );
        drop(shard);
        out
    }

    /// Seconds-stamp of the live entry's expiry (`Some(NEVER)` for none), `None` if missing.
    pub fn expiry(&self, key: &str, now: u64) -> Option<u64> {
        let (hash, idx) = self.locate(key);
        let mut dead = Vec::new();
        let mut shard = self.shards[idx].lock();
        let out = match self.lookup(&mut shard, hash, key, now, &mut dead) {
            Lookup::Live(slot) => Some(shard.entry(slot).expires),
            Lookup::Absent => None,
        };
        drop(shard);
        out
    }

    /// Like `get`, but `read` sees the whole live entry (its expiry and recorded compute time, for
    /// early refresh), not only the value.
    pub fn get_entry<R>(
        &self,
        key: &str,
        now: u64,
        read: impl FnOnce(&Entry<V>) -> R,
    ) -> Option<R> {
        let (hash, idx) = self.locate(key);
        let mut dead = Vec::new();
        let mut shard = self.shards[idx].lock();
        self.reclaim(&mut shard, now, &mut dead);
        let out = match self.lookup(&mut shard, hash, key, now, &mut dead) {
            Lookup::Live(slot) => {
                let tick = self.next_tick();
                shard.touch(slot, tick);
                Stats::bump(&self.stats.hits, 1);
                Some(read(shard.entry(slot)))
            }
            Lookup::Absent => {
                Stats::bump(&self.stats.misses, 1);
                None
            }
        };
        drop(shard);
        out
    }

    /// Records that computing the live value under `key` took `delta` nanoseconds, if the entry
    /// is still the one just stored (same expiry stamp); false otherwise.
    pub fn set_delta(&self, key: &str, expires: u64, delta: u64, now: u64) -> bool {
        let (hash, idx) = self.locate(key);
        let mut dead = Vec::new();
        let mut shard = self.shards[idx].lock();
        let out = match self.lookup(&mut shard, hash, key, now, &mut dead) {
            Lookup::Live(slot) if shard.entry(slot).expires == expires => {
                shard.entry_mut(slot).delta = delta;
                true
            }
            _ => false,
        };
        drop(shard);
        out
    }

    /// Removes the entry; true if a live one was there.
    pub fn delete(&self, key: &str, now: u64) -> bool {
        let (hash, idx) = self.locate(key);
        let mut dead = Vec::new();
        let mut shard = self.shards[idx].lock();
        self.reclaim(&mut shard, now, &mut dead);
        let out = match self.lookup(&mut shard, hash, key, now, &mut dead) {
            Lookup::Live(slot) => {
                dead.push(self.detach(&mut shard, slot));
                Stats::bump(&self.stats.deletes, 1);
                true
            }
            Lookup::Absent => false,
        };
        drop(shard);
        out
    }

    /// Gives a live entry a new expiry (a past one removes it); false if missing.
    pub fn touch(&self, key: &str, expires: u64, now: u64) -> bool {
        let (hash, idx) = self.locate(key);
        let mut dead = Vec::new();
        let mut shard = self.shards[idx].lock();
        let out = match self.lookup(&mut shard, hash, key, now, &mut dead) {
            Lookup::Live(slot) => {
                if expires <= now {
                    dead.push(self.detach(&mut shard, slot));
                } else {
                    shard.set_expiry(slot, expires);
                }
                true
            }
            Lookup::Absent => false,
        };
        drop(shard);
        out
    }

    /// Changes the live value in place when `update` can (it returns `Some`), keeping expiry and
    /// tags and marking it recently used. `Err(())` if the key is missing; `Ok(None)` if `update`
    /// declined (the caller then goes through `snapshot` and `replace_if`). The value's weight
    /// must not change.
    #[allow(clippy::result_unit_err)]
    pub fn update<R>(
        &self,
        key: &str,
        now: u64,
        update: impl FnOnce(&mut V) -> Option<R>,
    ) -> Result<Option<R>, ()> {
        let (hash, idx) = self.locate(key);
        let mut dead = Vec::new();
        let mut shard = self.shards[idx].lock();
        let out = match self.lookup(&mut shard, hash, key, now, &mut dead) {
            Lookup::Live(slot) => {
                let r = update(&mut shard.entry_mut(slot).value);
                if r.is_some() {
                    let tick = self.next_tick();
                    shard.touch(slot, tick);
                    shard.entry_mut(slot).gen = tick;
                }
                Ok(r)
            }
            Lookup::Absent => Err(()),
        };
        drop(shard);
        out
    }

    /// Stores `key`, replacing any entry. A deadline already past removes the key instead.
    pub fn set(
        &self,
        key: &str,
        value: V,
        expires: u64,
        tags: Vec<TagStamp>,
        limits: &Limits,
        now: u64,
    ) -> Put {
        self.put(key, value, expires, tags, limits, now, false)
    }

    /// Stores `key` only if no live entry has it.
    pub fn add(
        &self,
        key: &str,
        value: V,
        expires: u64,
        tags: Vec<TagStamp>,
        limits: &Limits,
        now: u64,
    ) -> Put {
        self.put(key, value, expires, tags, limits, now, true)
    }

    #[allow(clippy::too_many_arguments)]
    fn put(
        &self,
        key: &str,
        value: V,
        expires: u64,
        tags: Vec<TagStamp>,
        limits: &Limits,
        now: u64,
        only_new: bool,
    ) -> Put {
        if !all_current(&tags) {
            Stats::bump(&self.stats.invalidations, 1);
            return Put::Stale;
        }
        let weight = Self::weigh(key, &value, tags.len());
        if limits.max_bytes.is_some_and(|max| weight > max) {
            // Too large to ever fit: store nothing, and do not leave an older value behind.
            if !only_new || !self.contains(key, now) {
                self.delete(key, now);
                return Put::TooLarge;
            }
            return Put::Exists;
        }
        let (hash, idx) = self.locate(key);
        if only_new && self.contains(key, now) {
            return Put::Exists;
        }
        if self.len() as i64 >= limits.max_entries {
            self.cull(limits, now);
        }
        self.reserve(weight, limits, now);
        let mut dead = Vec::new();
        let mut shard = self.shards[idx].lock();
        self.reclaim(&mut shard, now, &mut dead);
        if let Lookup::Live(slot) = self.lookup(&mut shard, hash, key, now, &mut dead) {
            if only_new {
                drop(shard);
                self.bytes.fetch_sub(weight, Relaxed);
                return Put::Exists;
            }
            dead.push(self.detach(&mut shard, slot));
        }
        Stats::bump(&self.stats.sets, 1);
        if expires <= now {
            // Django stores an already-expired entry; nobody can ever read it, so store nothing.
            drop(shard);
            self.bytes.fetch_sub(weight, Relaxed);
            return Put::Stored;
        }
        let gen = self.next_tick();
        let has_tags = !tags.is_empty();
        let stamps = tags.into_boxed_slice();
        let mut entry = Entry::new(key.into(), hash, value, expires, weight, stamps);
        entry.gen = gen;
        let slot = shard.insert(entry, gen);
        self.len.fetch_add(1, Relaxed);
        let stamps = has_tags.then(|| shard.entry(slot).tags.clone());
        drop(shard);
        self.sweep_next(now);
        if let Some(stamps) = stamps {
            self.register(
                EntryRef {
                    shard: idx as u32,
                    slot,
                    gen,
                },
                &stamps,
            );
        }
        Put::Stored
    }

    /// Replaces the value of the entry under `key` if it still carries generation `gen`, keeping
    /// its expiry and tags.
    pub fn replace_if(&self, key: &str, gen: u64, value: V, limits: &Limits, now: u64) -> Replace {
        let (hash, idx) = self.locate(key);
        let ntags = {
            let shard = self.shards[idx].lock();
            match shard.find(hash, key) {
                Some(slot) => shard.entry(slot).tags.len(),
                None => return Replace::Missing,
            }
        };
        let weight = Self::weigh(key, &value, ntags);
        if limits.max_bytes.is_some_and(|max| weight > max) {
            return Replace::TooLarge;
        }
        self.reserve(weight, limits, now);
        let mut dead = Vec::new();
        let mut old_value = None;
        let mut shard = self.shards[idx].lock();
        let out = match self.lookup(&mut shard, hash, key, now, &mut dead) {
            Lookup::Live(slot) if shard.entry(slot).gen == gen => {
                let tick = self.next_tick();
                let e = shard.entry_mut(slot);
                let old_weight = std::mem::replace(&mut e.weight, weight);
                old_value = Some(std::mem::replace(&mut e.value, value));
                e.gen = tick;
                shard.touch(slot, tick);
                self.bytes.fetch_sub(old_weight, Relaxed);
                Replace::Done
            }
            Lookup::Live(_) => {
                self.bytes.fetch_sub(weight, Relaxed);
                Replace::Conflict
            }
            Lookup::Absent => {
                self.bytes.fetch_sub(weight, Relaxed);
                Replace::Missing
            }
        };
        drop(shard);
        drop(old_value);
        out
    }

    /// Live keys whose text starts with `prefix` (a scan of the store: for pattern operations).
    pub fn keys_with_prefix(&self, prefix: &str, now: u64) -> Vec<String> {
        let mut out = Vec::new();
        for s in self.shards.iter() {
            let shard = s.lock();
            out.extend(
                shard
                    .iter()
                    .filter(|e| {
                        !e.is_expired(now) && all_current(&e.tags) && e.key.starts_with(prefix)
                    })
                    .map(|e| e.key.to_string()),
            );
        }
        out
    }

    /// Empties the store and forgets every tag.
    pub fn clear(&self) {
        let mut dead = Vec::new();
        {
            let mut guards = self.lock_all();
            for g in guards.iter_mut() {
                dead.extend(g.drain());
            }
            self.len.store(0, Relaxed);
            self.bytes.store(0, Relaxed);
        }
        self.tags.reset();
        drop(dead);
    }

    /// Makes every entry carrying one of `names` a miss and reclaims those entries; returns how
    /// many live entries it removed. Cost: the number of tags plus the entries that carried them.
    pub fn invalidate_tags<'a>(&self, names: impl IntoIterator<Item = &'a str>, now: u64) -> usize {
        let mut refs: Vec<EntryRef> = Vec::new();
        for cell in self.tags.existing(names) {
            cell.bump();
            let mut members = cell.members.lock();
            refs.append(&mut members.refs);
            members.compact_at = 64;
        }
        refs.sort_unstable_by_key(|r| (r.shard, r.slot));
        let mut removed = 0;
        let mut dead = Vec::new();
        for group in refs.chunk_by(|a, b| a.shard == b.shard) {
            let mut shard = self.shards[group[0].shard as usize].lock();
            for r in group {
                if shard.entry_if(r.slot, r.gen).is_some() {
                    let e = self.detach(&mut shard, r.slot);
                    if !e.is_expired(now) {
                        removed += 1;
                    }
                    dead.push(e);
                }
            }
        }
        Stats::bump(&self.stats.invalidations, removed as u64);
        drop(dead);
        removed
    }

    /// Records `at` in the member lists of its tags, compacting a list that filled with stale refs.
    fn register(&self, at: EntryRef, stamps: &[TagStamp]) {
        for stamp in stamps {
            let mut members = stamp.cell.members.lock();
            members.refs.push(at);
            if members.refs.len() >= members.compact_at {
                members.refs.retain(|r| {
                    let shard = self.shards[r.shard as usize].lock();
                    shard.entry_if(r.slot, r.gen).is_some()
                });
                members.compact_at = (members.refs.len() * 2).max(64);
            }
        }
    }

    fn lock_all(&self) -> Vec<MutexGuard<'_, Shard<V>>> {
        self.shards.iter().map(|s| s.lock()).collect()
    }

    /// Index of the shard holding the globally least recently used entry.
    fn oldest(guards: &[MutexGuard<'_, Shard<V>>]) -> Option<usize> {
        guards
            .iter()
            .enumerate()
            .filter_map(|(i, g)| g.oldest_tick().map(|t| (t, i)))
            .min()
            .map(|(_, i)| i)
    }

    /// Django's cull: first drop what has expired; if the store is still at `max_entries`, remove
    /// `len / cull_frequency` least recently used entries (all of them for a frequency of 0).
    fn cull(&self, limits: &Limits, now: u64) {
        let mut dead = Vec::new();
        {
            let mut guards = self.lock_all();
            for g in guards.iter_mut() {
                while let Some(e) = g.pop_expired(now) {
                    self.len.fetch_sub(1, Relaxed);
                    self.bytes.fetch_sub(e.weight, Relaxed);
                    Stats::bump(&self.stats.expirations, 1);
                    dead.push(e);
                }
            }
            let len = self.len();
            if (len as i64) < limits.max_entries {
                return;
            }
            let count = if limits.cull_frequency == 0 {
                len
            } else {
                len / limits.cull_frequency.unsigned_abs() as usize
            };
            for _ in 0..count {
                let Some(i) = Self::oldest(&guards) else {
                    break;
                };
                let e = guards[i].pop_oldest().expect("shard has an oldest entry");
                self.len.fetch_sub(1, Relaxed);
                self.bytes.fetch_sub(e.weight, Relaxed);
                dead.push(e);
            }
            Stats::bump(&self.stats.evictions, count as u64);
        }
        drop(dead);
    }

    /// Charges `weight` bytes, first evicting least recently used entries while `max_bytes`
    /// would be passed.
    fn reserve(&self, weight: u64, limits: &Limits, now: u64) {
        let Some(max) = limits.max_bytes else {
            self.bytes.fetch_add(weight, Relaxed);
            return;
        };
        loop {
            let cur = self.bytes.load(Relaxed);
            if cur + weight <= max {
                if self
                    .bytes
                    .compare_exchange(cur, cur + weight, Relaxed, Relaxed)
                    .is_ok()
                {
                    return;
                }
                continue;
            }
            if !self.evict_bytes(cur + weight - max, now) {
                // Nothing left to evict: the bytes are charged by reservations still in flight.
                self.bytes.fetch_add(weight, Relaxed);
                return;
            }
        }
    }

    /// Evicts expired, then least recently used entries until `need` bytes are freed.
    fn evict_bytes(&self, need: u64, now: u64) -> bool {
        let mut dead = Vec::new();
        let mut freed = 0;
        {
            let mut guards = self.lock_all();
            for g in guards.iter_mut() {
                while freed < need {
                    let Some(e) = g.pop_expired(now) else { break };
                    Stats::bump(&self.stats.expirations, 1);
                    freed += e.weight;
                    self.len.fetch_sub(1, Relaxed);
                    self.bytes.fetch_sub(e.weight, Relaxed);
                    dead.push(e);
                }
            }
            while freed < need {
                let Some(i) = Self::oldest(&guards) else {
                    break;
                };
                let e = guards[i].pop_oldest().expect("shard has an oldest entry");
                Stats::bump(&self.stats.evictions, 1);
                freed += e.weight;
                self.len.fetch_sub(1, Relaxed);
                self.bytes.fetch_sub(e.weight, Relaxed);
                dead.push(e);
            }
        }
        let any = !dead.is_empty();
        drop(dead);
        any
    }

    /// Removes expired entries across the store, a bounded number per shard; returns how many.
    pub fn purge_expired(&self, now: u64, per_shard: usize) -> usize {
        let mut n = 0;
        for s in self.shards.iter() {
            let mut dead = Vec::new();
            let mut shard = s.lock();
            for _ in 0..per_shard {
                match shard.pop_expired(now) {
                    Some(e) => {
                        self.len.fetch_sub(1, Relaxed);
                        self.bytes.fetch_sub(e.weight, Relaxed);
                        dead.push(e);
                    }
                    None => break,
                }
            }
            drop(shard);
            n += dead.len();
        }
        Stats::bump(&self.stats.expirations, n as u64);
        n
    }
}
