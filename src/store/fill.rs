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
//!
//! **`Fill`** is the guard every fill goes through (NearCache's L1 fills, `get_or_set`'s miss and
//! early refresh): `Store::fill` begins it (optionally taking the key's single-flight first, see
//! `Lead`), `Fill::put` stores once under the placeholder and the tag stamps taken at the start,
//! and dropping it (put or not) ends its flight, waking the followers, and takes its placeholder
//! away: no path can forget to finish. A fill begun before a fork is inert in the child (its
//! `put` stores nothing, its drop touches nothing): the child has forgotten the flight, and the
//! parent's fill is not the child's to finish.

use ahash::RandomState;
use hashbrown::HashMap;

use crate::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use crate::sync::Mutex;

use super::{Entry, Limits, Put, Store, Weigh};
use crate::flight::{Flight, Role};
use crate::mem::malloc_chunk;
use crate::stats::Stats;
use crate::sync::Arc;
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
        let token = self.fill_token();
        self.fill_begin_as(key, token, limits, now);
        token
    }

    /// A new fill token (never 0, never reused in this process or a child forked from it).
    fn fill_token(&self) -> u64 {
        self.fills.next.fetch_add(1, Relaxed)
    }

    /// `fill_begin` with a token already drawn (`fill_token`).
    fn fill_begin_as(&self, key: &str, token: u64, limits: &Limits, now: u64) {
        let charge = placeholder_charge(key);
        let (_, idx) = self.locate(key);
        if !self.reserve(charge, limits, now, idx) {
            // No room even in an empty store: no placeholder, so the fill will store nothing.
            return;
        }
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
    }

    /// Takes the placeholder `token` of `key` away if it is still there (a fill that ends
    /// without storing).
    fn fill_cancel(&self, key: &str, token: u64) {
        if self.fills.live.load(Relaxed) == 0 {
            return;
        }
        let (_, idx) = self.locate(key);
        let shard = self.shards[idx].write();
        self.fill_take(idx, key, Some(token), 0);
        drop(shard);
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

    /// Stores `value` under `key` (with `only_new`, only if no live entry has it) only if the
    /// placeholder `token` from `fill_begin` is still there (nothing removed, wrote or flushed the
    /// key since, and no newer fill began); consumes it either way. `Put::Stale` when the
    /// placeholder was gone.
    #[allow(clippy::too_many_arguments)]
    pub fn fill_put(
        &self,
        key: &str,
        token: u64,
        value: V,
        expires: u64,
        tags: Vec<TagStamp>,
        only_new: bool,
        limits: &Limits,
        now: u64,
    ) -> Put {
        let put = self.put(
            key,
            value,
            expires,
            tags,
            limits,
            now,
            only_new,
            Some(token),
        );
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

/// How `Store::fill` treats the key's single-flight (`crate::flight`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lead {
    /// None: only the placeholder (NearCache's reads and writes, a fill after a follower's wait).
    Alone,
    /// Join the flight: lead it, or get it back to wait on (`Begun::Follow`).
    Join,
    /// Take the flight only if none is in progress, not even one this thread leads (an early
    /// refresh); `Begun::Busy` otherwise. Never waits.
    Try,
}

/// What `Store::fill` made of the caller.
pub enum Begun<V: Weigh> {
    /// The caller fills the key.
    Lead(Fill<V>),
    /// Another fill leads the key: wait on its flight (bounded), then read again.
    Follow(Arc<Flight>),
    /// `Lead::Try` found a flight in progress.
    Busy,
}

/// A fill in progress: stores at most once (`put`), and ends (its flight finished, its
/// placeholder taken away) when put or dropped, whichever comes first. See the module docs.
pub struct Fill<V: Weigh> {
    store: Arc<Store<V>>,
    key: Box<str>,
    token: u64,
    /// Whether this fill owns the key's flight (it is not the nested fill of a thread that
    /// already leads the key, nor one that takes no flight).
    flight: bool,
    /// The versions of its tags when it began: a tag invalidated since makes `put` store nothing.
    tags: Vec<TagStamp>,
    /// `crate::fork::generation()` when it began.
    generation: u64,
    open: bool,
}

impl<V: Weigh> Store<V> {
    /// Begins a fill of `key`: takes its single-flight as `lead` says, then puts its placeholder.
    /// `tags` are the stamps `put` will store with (taken now, before the value is computed).
    pub fn fill(
        self: &Arc<Self>,
        key: &str,
        lead: Lead,
        tags: Vec<TagStamp>,
        limits: &Limits,
        now: u64,
    ) -> Begun<V> {
        let token = self.fill_token();
        let flight = match lead {
            Lead::Alone => false,
            Lead::Join => match self.flights.begin(key, token) {
                Role::Leader => true,
                Role::Nested => false,
                Role::Follower(f) => return Begun::Follow(f),
            },
            Lead::Try => {
                if !self.flights.try_begin(key, token) {
                    return Begun::Busy;
                }
                true
            }
        };
        // The fill exists (and would end its flight if dropped) before the placeholder goes in.
        let fill = Fill {
            store: self.clone(),
            key: key.into(),
            token,
            flight,
            tags,
            generation: crate::fork::generation(),
            open: true,
        };
        self.fill_begin_as(key, token, limits, now);
        Begun::Lead(fill)
    }
}

impl<V: Weigh> Fill<V> {
    /// The store text of the key being filled.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Whether this fill owns the key's single-flight.
    pub fn leads(&self) -> bool {
        self.flight
    }

    /// Whether `put` may still store: not put or ended yet, and begun in this process.
    pub fn is_open(&self) -> bool {
        self.open && self.generation == crate::fork::generation()
    }

    /// Stores `value` (`only_new`: as `add`, else as `set`) if nothing cancelled the fill since
    /// it began: no removal, invalidation, local write or flush of the key, no newer fill of it,
    /// no invalidation of its tags (checked under the shard's write lock, with the insert). With
    /// a `delta` (nanoseconds the value took to compute) and a deadline, records it for early
    /// refresh. Then ends the fill. A fill already put or ended, or begun before a fork, stores
    /// nothing (`Put::Stale`).
    pub fn put(
        &mut self,
        value: V,
        expires: u64,
        delta: u64,
        only_new: bool,
        limits: &Limits,
        now: u64,
    ) -> Put {
        if !self.is_open() {
            return Put::Stale;
        }
        let tags = std::mem::take(&mut self.tags);
        let store = &self.store;
        let put = store.fill_put(
            &self.key, self.token, value, expires, tags, only_new, limits, now,
        );
        // The placeholder is spent: `end` only finishes the flight.
        self.open = false;
        if put == Put::Stored && expires != crate::clock::NEVER && delta > 0 {
            store.set_delta(&self.key, expires, delta, limits, now);
        }
        self.finish();
        put
    }

    /// Ends the fill without storing (what dropping it does): finishes its flight, waking the
    /// callers waiting for it, and takes its placeholder away. Idempotent; does nothing to a
    /// fill begun before a fork.
    pub fn end(&mut self) {
        if !self.open {
            return;
        }
        self.open = false;
        if self.generation != crate::fork::generation() {
            return;
        }
        self.store.fill_cancel(&self.key, self.token);
        self.finish();
    }

    fn finish(&mut self) {
        if std::mem::take(&mut self.flight) && self.generation == crate::fork::generation() {
            self.store.flights.finish(&self.key, self.token);
        }
    }
}

impl<V: Weigh> Drop for Fill<V> {
    fn drop(&mut self) {
        self.end();
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
        store.fill_put(
            key,
            token,
            Val(w),
            NEVER,
            Vec::new(),
            false,
            &limits(100, None),
            1,
        )
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
        let put = store.fill_put("late", t, Val(1), NEVER, Vec::new(), false, &lim, late);
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

    #[cfg(not(feature = "shuttle"))]
    /// Something that happens to a key while a fill of it runs.
    type Cancel<'a> = dyn Fn(&Store<Val>) + 'a;

    #[cfg(not(feature = "shuttle"))]
    fn lead(store: &Arc<Store<Val>>, key: &str, how: Lead, tags: Vec<TagStamp>) -> Fill<Val> {
        match store.fill(key, how, tags, &limits(100, None), 1) {
            Begun::Lead(f) => f,
            _ => panic!("expected to lead {key}"),
        }
    }

    #[cfg(not(feature = "shuttle"))]
    fn put(f: &mut Fill<Val>, w: usize, only_new: bool) -> Put {
        f.put(Val(w), NEVER, 0, only_new, &limits(100, None), 1)
    }

    // Flights run on shuttle's primitives under that feature, which only work in a shuttle run.
    #[cfg(not(feature = "shuttle"))]
    #[test]
    fn dropping_a_fill_ends_its_flight_wakes_its_followers_and_takes_its_placeholder() {
        for store in stores().into_iter().map(Arc::new) {
            let f = lead(&store, "k", Lead::Join, Vec::new());
            assert!(f.leads());
            assert_eq!((store.flights.len(), store.fills.len()), (1, 1));
            assert_eq!(store.bytes(), placeholder_charge("k"));
            let (tx, rx) = std::sync::mpsc::channel();
            let s = store.clone();
            let follower = thread::spawn(move || {
                match s.fill("k", Lead::Join, Vec::new(), &limits(100, None), 1) {
                    Begun::Follow(flight) => {
                        tx.send(()).unwrap();
                        flight.wait(std::time::Duration::from_secs(60))
                    }
                    _ => panic!("another thread leads k"),
                }
            });
            rx.recv().unwrap();
            drop(f); // no put: its computation raised, say
            assert_eq!(follower.join().unwrap(), crate::flight::Waited::Finished);
            assert_eq!((store.flights.len(), store.fills.len()), (0, 0));
            assert_eq!((store.len(), store.bytes()), (0, 0));
            // A try-lead is busy while a fill leads, free once it ended.
            let f = lead(&store, "k", Lead::Join, Vec::new());
            assert!(matches!(
                store.fill("k", Lead::Try, Vec::new(), &limits(100, None), 1),
                Begun::Busy
            ));
            drop(f);
            let mut f = lead(&store, "k", Lead::Try, Vec::new());
            assert_eq!(put(&mut f, 1, false), Put::Stored);
            assert!(store.flights.is_empty(), "put ends the fill");
            assert_eq!(put(&mut f, 2, false), Put::Stale, "a fill stores once");
            assert_eq!(store.get("k", 1, |v| v.0), Some(1));
        }
    }

    // Flights run on shuttle's primitives under that feature, which only work in a shuttle run.
    #[cfg(not(feature = "shuttle"))]
    #[test]
    fn a_removal_write_flush_or_tag_invalidation_between_begin_and_put_cancels_the_fill() {
        for store in stores().into_iter().map(Arc::new) {
            let lim = limits(100, None);
            let cancels: [(&str, &Cancel); 6] = [
                ("invalidated", &|s| {
                    s.invalidate_key("k");
                }),
                ("deleted", &|s| {
                    s.delete("k", 1);
                }),
                ("flushed", &|s| s.clear()),
                ("written", &|s| {
                    s.set("k", Val(9), NEVER, Vec::new(), &lim, 1);
                }),
                ("added", &|s| {
                    s.add("k", Val(9), NEVER, Vec::new(), &lim, 1);
                }),
                ("tag invalidated", &|s| {
                    s.invalidate_tags(["t"], 1);
                }),
            ];
            for (what, cancel) in cancels {
                store.clear();
                for how in [Lead::Alone, Lead::Join, Lead::Try] {
                    for only_new in [false, true] {
                        store.delete("k", 1);
                        let mut f = lead(&store, "k", how, store.tags.stamps(["t"]));
                        cancel(&store);
                        // An add-fill may find the written entry first: `Exists`, also nothing.
                        let put = put(&mut f, 1, only_new);
                        assert!(matches!(put, Put::Stale | Put::Exists), "{what}: {put:?}");
                        assert!(put == Put::Stale || only_new, "{what}: {put:?}");
                        let held = store.get("k", 1, |v| v.0);
                        assert_ne!(held, Some(1), "{what}: the fill stored");
                        drop(f);
                        assert!(store.flights.is_empty() && store.fills.is_empty(), "{what}");
                    }
                }
            }
            // Nothing in between: the same fill stores, as `add` (only_new) or as `set`.
            store.clear();
            let mut f = lead(&store, "k", Lead::Join, store.tags.stamps(["t"]));
            assert_eq!(put(&mut f, 1, true), Put::Stored);
            let mut f = lead(&store, "k", Lead::Alone, store.tags.stamps(["t"]));
            assert_eq!(
                put(&mut f, 2, true),
                Put::Exists,
                "an add-fill leaves a live entry"
            );
            let mut f = lead(&store, "k", Lead::Alone, Vec::new());
            assert_eq!(put(&mut f, 3, false), Put::Stored);
            assert_eq!(store.get("k", 1, |v| v.0), Some(3));
            assert_eq!(
                store.invalidate_tags(["t"], 1),
                0,
                "the last put carried no tag"
            );
        }
    }

    // Flights run on shuttle's primitives under that feature, which only work in a shuttle run.
    #[cfg(not(feature = "shuttle"))]
    #[test]
    fn of_two_fills_of_one_key_only_the_newest_stores_and_a_nested_one_keeps_the_flight() {
        for store in stores().into_iter().map(Arc::new) {
            let mut old = lead(&store, "k", Lead::Alone, Vec::new());
            let mut new = lead(&store, "k", Lead::Alone, Vec::new());
            assert_eq!(store.fills.len(), 1);
            assert_eq!(put(&mut old, 1, false), Put::Stale);
            assert_eq!(put(&mut new, 2, false), Put::Stored);
            assert_eq!(store.get("k", 1, |v| v.0), Some(2));
            // A computation that fills its own key again (same thread): it does not wait on
            // itself, its value wins, and the flight stays the outer fill's until that ends.
            store.delete("k", 1);
            let mut outer = lead(&store, "k", Lead::Join, Vec::new());
            let mut inner = lead(&store, "k", Lead::Join, Vec::new());
            assert!(outer.leads() && !inner.leads());
            assert_eq!(put(&mut inner, 3, true), Put::Stored);
            assert_eq!(
                store.flights.len(),
                1,
                "the nested fill left the flight alone"
            );
            assert_eq!(
                put(&mut outer, 4, false),
                Put::Stale,
                "the inner fill replaced it"
            );
            assert_eq!(store.get("k", 1, |v| v.0), Some(3));
            assert!(store.flights.is_empty() && store.fills.is_empty());
            // Dropping an older fill leaves the newer one's placeholder in place.
            let old = lead(&store, "j", Lead::Alone, Vec::new());
            let mut new = lead(&store, "j", Lead::Alone, Vec::new());
            drop(old);
            assert_eq!(store.fills.len(), 1);
            assert_eq!(put(&mut new, 5, false), Put::Stored);
        }
    }

    // Flights run on shuttle's primitives under that feature, which only work in a shuttle run.
    #[cfg(not(feature = "shuttle"))]
    #[test]
    fn a_fill_begun_before_a_fork_is_inert_in_the_child() {
        crate::fork::install();
        let _serial = crate::fork::serial();
        let store = Arc::new(Store::<Val>::new(1));
        let mut f = lead(&store, "k", Lead::Join, Vec::new());
        // SAFETY: the child only reads atomics, takes this test's own store's locks (no other
        // thread uses this store) and calls `_exit`.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // The fork handlers bumped the generation: the parent's fill is not the child's.
            let code = if f.is_open() {
                1
            } else if put(&mut f, 1, false) != Put::Stale {
                2
            } else if store.get("k", 1, |v| v.0).is_some() {
                3
            } else {
                drop(f);
                // Its drop touched nothing either (this bare store was not emptied by the
                // handlers, so its records are still there to see).
                if store.fills.len() != 1 || store.flights.len() != 1 {
                    4
                } else {
                    0
                }
            };
            unsafe { libc::_exit(code) };
        }
        assert!(pid > 0, "fork failed");
        let mut status = 0;
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(libc::WIFEXITED(status));
        assert_eq!(libc::WEXITSTATUS(status), 0, "the child's check failed");
        // In the parent the fill is alive and stores.
        assert!(f.is_open());
        assert_eq!(put(&mut f, 2, false), Put::Stored);
        assert!(store.flights.is_empty() && store.fills.is_empty());
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
                let _ = store.fill_put(&key, t, Val(r), NEVER, Vec::new(), false, &lim, 1);
                inv.join().unwrap();
                assert_eq!(store.get(&key, 1, |v| v.0), None, "round {r}");
            }
            assert!(store.fills.is_empty());
            assert_eq!(store.bytes(), 0);
        }
    }
}
