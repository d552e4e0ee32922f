//! Fill placeholders: a fill from a remote source of truth (NearCache's L1 over Redis) stores its
//! value only if nothing happened to the key since the fill began.
//!
//! The race it closes (redis-doc's client-side caching guide, "Avoiding race conditions"): a GET
//! on a data connection returns the old value, then the invalidation for the key arrives on the
//! listener connection and finds nothing to remove, then the fill stores the old value, which
//! would then be served until its TTL. With placeholders: `fill_begin` puts a placeholder with a
//! new token for the key *before* the GET; every removal of the key (`delete`, `invalidate_key`),
//! every local write of it (`set`, `add`, `update`, `replace_if`) and every flush (`clear`)
//! cancels it; `fill_put` stores only if that exact placeholder is still there, checked under the
//! same hold of the shard's write lock as the insert, and consumes it. A newer `fill_begin` of
//! the same key replaces the placeholder, so only the newest fill may store.
//!
//! Placeholders are not entries (`len` does not count them); each is charged to the store's
//! bytes (its key and table cell) and is bounded: at most `FILLS_PER_SHARD` a shard (the oldest
//! goes first), none older than `FILL_MAX_AGE` (a fill that never finishes, say its GET raised,
//! leaves a placeholder that is dropped when its shard's table is full and never stores).
//!
//! The tables are one per shard, changed only under that shard's write lock (lock order: shard,
//! then its table), so the check in `put` is atomic with the insert. While no placeholder exists
//! anywhere, the hooks cost one relaxed load.

use ahash::RandomState;
use hashbrown::HashMap;

use crate::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use crate::sync::Mutex;

use super::{Entry, Limits, Put, Store, Weigh};
use crate::mem::malloc_chunk;
use crate::stats::Stats;
use crate::tags::TagStamp;

/// Placeholders a shard holds at most; a new one beyond this drops the oldest.
pub const FILLS_PER_SHARD: usize = 1024;

/// A placeholder older than this (clock nanoseconds) no longer lets its fill store: 30 s.
pub const FILL_MAX_AGE: u64 = 30_000_000_000;

/// Bytes a placeholder's table cell takes: its key's fat pointer (16), token, birth and charge
/// (24) and a control byte, over ~1.6 buckets a cell (see `mem::TABLE_CELL`).
const FILL_CELL: usize = (16 + 24 + 1) * 8 / 5;

struct Placeholder {
    token: u64,
    born: u64,
    charge: u64,
}

type Table = HashMap<Box<str>, Placeholder, RandomState>;

/// The placeholders of a store, a table per shard.
pub struct Fills {
    tables: Box<[Mutex<Table>]>,
    /// Placeholders held across the store: the hooks do nothing while it is 0.
    live: AtomicUsize,
    next: AtomicU64,
}

impl Fills {
    pub fn new(shards: usize) -> Self {
        Fills {
            tables: (0..shards).map(|_| Mutex::new(Table::default())).collect(),
            live: AtomicUsize::new(0),
            next: AtomicU64::new(1),
        }
    }

    /// Placeholders held now.
    pub fn len(&self) -> usize {
        self.live.load(Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Bytes charged for a placeholder of `key`.
pub fn placeholder_charge(key: &str) -> u64 {
    (malloc_chunk(key.len()) + FILL_CELL) as u64
}

impl<V: Weigh> Store<V> {
    /// Puts a placeholder for `key` (replacing any) and returns its token, for `fill_put`. Its
    /// charge is reserved under `limits.max_bytes` like an entry's (evicting if need be).
    pub fn fill_begin(&self, key: &str, limits: &Limits, now: u64) -> u64 {
        let charge = placeholder_charge(key);
        let (_, idx) = self.locate(key);
        self.reserve(charge, limits, now, idx);
        let token = self.fills.next.fetch_add(1, Relaxed);
        let shard = self.shards[idx].write();
        let mut table = self.fills.tables[idx].lock();
        let mut freed = 0;
        let fresh = Placeholder {
            token,
            born: now,
            charge,
        };
        match table.insert(key.into(), fresh) {
            Some(old) => freed += old.charge,
            None => {
                self.fills.live.fetch_add(1, Relaxed);
            }
        }
        if table.len() > FILLS_PER_SHARD {
            freed += self.trim(&mut table, token, now);
        }
        drop(table);
        drop(shard);
        self.bytes.fetch_sub(freed, Relaxed);
        token
    }

    /// Drops placeholders past `FILL_MAX_AGE`, then the oldest (never `keep`) while the table
    /// is over its bound; returns the bytes they were charged.
    fn trim(&self, table: &mut Table, keep: u64, now: u64) -> u64 {
        let mut freed = 0;
        let before = table.len();
        table.retain(|_, p| {
            let dead = p.token != keep && now.saturating_sub(p.born) >= FILL_MAX_AGE;
            if dead {
                freed += p.charge;
            }
            !dead
        });
        while table.len() > FILLS_PER_SHARD {
            let oldest = table
                .iter()
                .filter(|(_, p)| p.token != keep)
                .min_by_key(|(_, p)| p.token)
                .map(|(k, _)| k.clone());
            match oldest.and_then(|k| table.remove(&k)) {
                Some(p) => freed += p.charge,
                None => break,
            }
        }
        self.fills.live.fetch_sub(before - table.len(), Relaxed);
        freed
    }

    /// Stores `value` under `key` only if the placeholder `token` from `fill_begin` is still
    /// there (nothing removed, wrote or flushed the key since, and no newer fill began); consumes
    /// it either way. `Put::Stale` when the placeholder was gone.
    #[allow(clippy::too_many_arguments)]
    pub fn fill_put(
        &self,
        key: &str,
        token: u64,
        value: V,
        expires: u64,
        tags: Vec<TagStamp>,
        limits: &Limits,
        now: u64,
    ) -> Put {
        let put = self.put(key, value, expires, tags, limits, now, false, Some(token));
        if put != Put::Stored {
            // Paths that store nothing before the check (stale tags, too large) leave it behind.
            let (_, idx) = self.locate(key);
            let shard = self.shards[idx].write();
            self.fill_take(idx, key, Some(token), now);
            drop(shard);
        }
        put
    }

    /// Removes `key`'s entry whatever its state, and cancels its placeholder: an invalidation from
    /// the source of truth. True if an entry was removed.
    pub fn invalidate_key(&self, key: &str) -> bool {
        let mut dead = Vec::new();
        self.invalidate_key_into(key, &mut dead)
    }

    /// `invalidate_key`, handing the removed entry to the caller (to drop where it can, see
    /// `near::Graveyard`) instead of dropping it.
    pub fn invalidate_key_into(&self, key: &str, dead: &mut Vec<Entry<V>>) -> bool {
        let (hash, idx) = self.locate(key);
        let mut shard = self.write(idx);
        self.fill_take(idx, key, None, 0);
        if let Some(slot) = shard.find(hash, key) {
            let e = self.detach(&mut shard, slot);
            shard.bury(e);
        }
        let removed = shard.buried() > 0;
        dead.append(&mut shard.unlock());
        if removed {
            Stats::bump(&self.stats.invalidations, 1);
        }
        removed
    }

    /// Whether a fill with `token` may store under `key` now (`None`: a local write, always).
    /// Under the write lock of `key`'s shard `idx`.
    pub(super) fn fill_holds(&self, idx: usize, key: &str, token: Option<u64>, now: u64) -> bool {
        let Some(token) = token else { return true };
        if self.fills.live.load(Relaxed) == 0 {
            return false;
        }
        let table = self.fills.tables[idx].lock();
        table
            .get(key)
            .is_some_and(|p| p.token == token && now.saturating_sub(p.born) < FILL_MAX_AGE)
    }

    /// Takes `key`'s placeholder away: with `Some(token)`, only that one, and true if it was
    /// there (and not too old: the fill may store); with `None` (a removal or local write of the
    /// key), whichever is there, and true. Under the write lock of `key`'s shard `idx`.
    pub(super) fn fill_take(&self, idx: usize, key: &str, token: Option<u64>, now: u64) -> bool {
        if self.fills.live.load(Relaxed) == 0 {
            return token.is_none();
        }
        let mut table = self.fills.tables[idx].lock();
        let ours = match (table.get(key), token) {
            (None, _) => return token.is_none(),
            (Some(p), Some(t)) if p.token != t => return false,
            (Some(p), Some(_)) => now.saturating_sub(p.born) < FILL_MAX_AGE,
            (Some(_), None) => true,
        };
        if let Some(p) = table.remove(key) {
            self.fills.live.fetch_sub(1, Relaxed);
            self.bytes.fetch_sub(p.charge, Relaxed);
        }
        ours
    }

    /// Drops every placeholder (a flush). Under the write locks of every shard.
    pub(super) fn fill_clear(&self) {
        for t in self.fills.tables.iter() {
            t.lock().clear();
        }
        self.fills.live.store(0, Relaxed);
    }
}

// Under `shuttle` the store's primitives work only inside a shuttle run: see the models.
#[cfg(all(test, not(feature = "shuttle")))]
mod tests {
    use std::sync::{Arc, Barrier};
    use std::thread;

    use super::*;
    use crate::clock::NEVER;
    use crate::policy::Policy;
    use crate::store::testing::{limits, Val};

    fn fill(store: &Store<Val>, key: &str, token: u64, w: usize) -> Put {
        store.fill_put(key, token, Val(w), NEVER, Vec::new(), &limits(100, None), 1)
    }

    fn stores() -> Vec<Store<Val>> {
        vec![
            Store::new(1),
            Store::new(16),
            Store::with_policy(1, Policy::S3Fifo),
            Store::with_policy(16, Policy::S3Fifo),
        ]
    }

    #[test]
    fn a_fill_with_nothing_in_between_stores_and_consumes_its_placeholder() {
        for store in stores() {
            let t = store.fill_begin("k", &limits(100, None), 1);
            assert_eq!(store.fills.len(), 1);
            assert_eq!(store.len(), 0, "a placeholder is not an entry");
            assert_eq!(fill(&store, "k", t, 7), Put::Stored);
            assert_eq!(store.get("k", 1, |v| v.0), Some(7));
            assert!(store.fills.is_empty());
            // The token is spent: a second put with it stores nothing.
            assert_eq!(fill(&store, "k", t, 8), Put::Stale);
            assert_eq!(store.get("k", 1, |v| v.0), Some(7));
        }
    }

    #[test]
    fn get_returns_then_the_invalidation_then_the_put_stores_nothing() {
        for store in stores() {
            let t = store.fill_begin("k", &limits(100, None), 1);
            // ... the GET returned the old value; the invalidation arrives, finding no entry:
            assert!(!store.invalidate_key("k"));
            assert_eq!(fill(&store, "k", t, 1), Put::Stale);
            assert_eq!(store.get("k", 1, |v| v.0), None);
            assert_eq!((store.len(), store.bytes()), (0, 0));
        }
    }

    #[test]
    fn a_local_set_or_delete_during_a_fill_cancels_it() {
        for store in stores() {
            let lim = limits(100, None);
            let t = store.fill_begin("k", &lim, 1);
            store.set("k", Val(2), NEVER, Vec::new(), &lim, 1);
            assert_eq!(fill(&store, "k", t, 1), Put::Stale);
            assert_eq!(store.get("k", 1, |v| v.0), Some(2), "the local write stays");

            let t = store.fill_begin("d", &lim, 1);
            store.delete("d", 1);
            assert_eq!(fill(&store, "d", t, 1), Put::Stale);
            assert!(!store.contains("d", 1));
        }
    }

    #[test]
    fn a_flush_during_a_fill_cancels_it() {
        for store in stores() {
            let lim = limits(100, None);
            let t = store.fill_begin("k", &lim, 1);
            store.clear();
            assert!(store.fills.is_empty());
            assert_eq!(fill(&store, "k", t, 1), Put::Stale);
            assert_eq!((store.len(), store.bytes()), (0, 0));
        }
    }

    #[test]
    fn of_two_fills_of_one_key_only_the_newest_token_stores() {
        for store in stores() {
            let lim = limits(100, None);
            let old = store.fill_begin("k", &lim, 1);
            let new = store.fill_begin("k", &lim, 1);
            assert_ne!(old, new);
            assert_eq!(store.fills.len(), 1);
            assert_eq!(fill(&store, "k", old, 1), Put::Stale);
            assert_eq!(fill(&store, "k", new, 2), Put::Stored);
            assert_eq!(store.get("k", 1, |v| v.0), Some(2));
        }
    }

    #[test]
    fn placeholders_are_charged_and_bounded_and_a_stale_one_never_stores() {
        let store: Store<Val> = Store::new(1);
        let lim = limits(100, None);
        let first = store.fill_begin("k0", &lim, 1);
        assert_eq!(store.bytes(), placeholder_charge("k0"));
        for i in 1..FILLS_PER_SHARD + 10 {
            store.fill_begin(&format!("k{i}"), &lim, 1);
        }
        assert_eq!(store.fills.len(), FILLS_PER_SHARD);
        let sum: u64 = (1..FILLS_PER_SHARD + 10)
            .rev()
            .take(FILLS_PER_SHARD)
            .map(|i| placeholder_charge(&format!("k{i}")))
            .sum();
        assert_eq!(store.bytes(), sum);
        assert_eq!(
            fill(&store, "k0", first, 1),
            Put::Stale,
            "the oldest went first"
        );
        // A placeholder past FILL_MAX_AGE lets nothing store, and a full table drops it first.
        let late = 2 + FILL_MAX_AGE;
        let t = store.fill_begin("late", &lim, 1);
        let put = store.fill_put("late", t, Val(1), NEVER, Vec::new(), &lim, late);
        assert_eq!(put, Put::Stale);
        // The table is one short of full again: the next two fill it past its bound.
        store.fill_begin("new", &lim, late);
        assert_eq!(store.fills.len(), FILLS_PER_SHARD);
        store.fill_begin("newer", &lim, late);
        assert_eq!(
            store.fills.len(),
            2,
            "every placeholder born at 1 is too old"
        );
        let sum = placeholder_charge("new") + placeholder_charge("newer");
        assert_eq!(store.bytes(), sum);
        // Under MAX_BYTES a placeholder evicts like an entry would.
        store.clear();
        let one = Store::<Val>::weigh("e0", &Val(10), 0, NEVER);
        let tight = limits(100, Some(3 * one));
        for i in 0..3 {
            store.set(&format!("e{i}"), Val(10), NEVER, Vec::new(), &tight, 1);
        }
        store.fill_begin("p", &tight, 1);
        assert!(store.bytes() <= 3 * one);
        assert!(store.len() < 3, "nothing was evicted for the placeholder");
    }

    #[test]
    fn concurrent_fills_and_invalidations_never_leave_an_invalidated_value() {
        // Each round: a filler begins, "reads" version r, and puts; an invalidator marks the
        // truth as r + 1 and invalidates. If the invalidation came after fill_begin, the stored
        // value must never be r once both are done.
        for policy in [Policy::Lru, Policy::S3Fifo] {
            let store = Arc::new(Store::<Val>::with_policy(4, policy));
            let lim = limits(1_000, None);
            for r in 0..2_000usize {
                let key = format!("k{}", r % 7);
                let t = store.fill_begin(&key, &lim, 1);
                let barrier = Arc::new(Barrier::new(2));
                let (s, b, k) = (store.clone(), barrier.clone(), key.clone());
                let inv = thread::spawn(move || {
                    b.wait();
                    s.invalidate_key(&k);
                });
                barrier.wait();
                let _ = store.fill_put(&key, t, Val(r), NEVER, Vec::new(), &lim, 1);
                inv.join().unwrap();
                assert_eq!(store.get(&key, 1, |v| v.0), None, "round {r}");
            }
            assert!(store.fills.is_empty());
            assert_eq!(store.bytes(), 0);
        }
    }
}
