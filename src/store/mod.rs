//! The store: shards under read-write locks (`parking_lot`'s, through `crate::sync`), expiry, eviction by entry count and by
//! bytes under the store's policy (see `policy.rs`), tag invalidation, and counters.
//!
//! A store has one shard when its `MAX_ENTRIES` is at most `ONE_SHARD_MAX` (so that the small
//! stores Django's tests and most sites use keep LocMemCache's exact LRU order), else `SHARDS`.
//! Under "lru" each shard keeps its own recency order and Django's cull rule culls each shard's
//! share of least recently used entries (with one shard: exactly Django's). Under S3-FIFO each
//! shard runs its own queues (`s3fifo.rs`): a hit takes only a read lock, and an insert into a
//! full store reserves its place first, evicting one entry at a time from its own shard.
//!
//! Every method takes a shard's write lock as a `Locked` (`Store::write`, `Store::lock_all`), which
//! keeps the entries removed under it (`bury`) and drops them only after releasing the lock, so
//! that a value whose destructor runs code (a Python object's `__del__`) never runs under a lock.
//! The store never calls back into its caller while a lock is held.
//!
//! The files: this one holds the struct, its lock helpers and the lookup every operation shares;
//! `read.rs` the reads, `write.rs` the writes, `evict.rs` eviction and expiry (and S3-FIFO's
//! insert, which evicts as it goes), `account.rs` the byte accounting, `tags.rs` the tag
//! bookkeeping.

use std::ops::{Deref, DerefMut};

use ahash::RandomState;

use crate::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed};
use crate::sync::{random_state, RwLock, RwLockWriteGuard};

use crate::entry::{planned_size, rounded_deadline, Pack};
use crate::flight::Flights;
use crate::ghost::Ghost;
use crate::mem::{malloc_chunk, GHOST_RECORD, TABLE_CELL};
use crate::policy::Policy;
use crate::s3fifo::MAX_FREQ;
use crate::shard::{Entry, Shard, MAX_WEIGHT, SLOT_SIZE};
use crate::stats::Stats;
use crate::stored_key::StoredKey;
use crate::tags::{all_current, EntryRef, Stamps, TagStamp, TagTable};

mod account;
mod evict;
mod fill;
#[cfg(all(test, feature = "shuttle"))]
mod fill_shuttle;
mod read;
mod tags;
#[cfg(test)]
// Under `shuttle` only the models are built, and they use a part of it.
#[cfg_attr(feature = "shuttle", allow(dead_code))]
pub(crate) mod testing;
mod write;

pub use account::entry_overhead;
pub use fill::{placeholder_charge, Begun, Fill, Fills, Lead, FILLS_PER_SHARD, FILL_MAX_AGE};

/// Shards of a store whose `MAX_ENTRIES` is above `ONE_SHARD_MAX`.
pub const SHARDS: usize = 16;

/// The largest `MAX_ENTRIES` for which a store has a single shard (exact LRU across the store).
pub const ONE_SHARD_MAX: i64 = 65_536;

/// The number of shards for a store created with this `MAX_ENTRIES`.
pub fn shards_for(max_entries: i64) -> usize {
    if max_entries <= ONE_SHARD_MAX {
        1
    } else {
        SHARDS
    }
}

/// What a stored value costs in bytes (beyond the per-entry overhead the store adds itself); how
/// it lends itself to the entry's block is `Pack`.
pub trait Weigh: Pack {
    /// Bytes the value holds, not counting its payload.
    fn weight(&self) -> usize;
}

/// Limits read from the calling backend at each operation: aliases with different limits may
/// share one store, as with Django's LocMemCache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// "lru": cull when the store holds this many entries or more before an insert. S3-FIFO: the
    /// capacity (at least 1), never passed.
    pub max_entries: i64,
    /// "lru": cull `len / cull_frequency` least recently used entries; 0 clears the store.
    /// Ignored by S3-FIFO, which evicts one entry at a time.
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
    /// The entry alone is larger than `max_bytes` (or than `MAX_WEIGHT`); nothing was stored.
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

/// What `snapshot` saw of an entry, for `replace_if` to tell whether the entry is still the one
/// read.
///
/// A tagged entry has a generation (`Entry::gen`, from the store's write counter, renewed
/// whenever its value changes). An untagged entry has none (it would cost 4 bytes an entry):
/// `Untagged` is its block's address and its shard's write counter (`Shard::writes`). The address
/// alone is not enough: once the entry is deleted its block is freed, and the allocator may hand
/// the same address to the next entry stored under the key (a delete and a `set` of the same
/// size between the snapshot and `replace_if`). An unchanged counter proves no entry of the shard
/// was stored, removed or changed since the snapshot, so the entry is the same (a block moved by
/// a new deadline, which keeps the value, has another address: a conflict too, conservatively).
/// Any other write to the shard is a conflict as well; the caller reads again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Token {
    Tagged(u32),
    Untagged { block: usize, writes: u64 },
}

impl Token {
    /// The token of the entry at `slot`.
    fn of<V>(shard: &Shard<V>, slot: u32) -> Token {
        let e = shard.entry(slot);
        match e.gen() {
            Some(gen) => Token::Tagged(gen),
            None => Token::Untagged {
                block: e.addr(),
                writes: shard.writes(),
            },
        }
    }

    /// Whether the entry at `slot` is still the one this token was taken of.
    fn matches<V>(self, shard: &Shard<V>, slot: u32) -> bool {
        self == Token::of(shard, slot)
    }
}

pub struct Store<V> {
    shards: Box<[RwLock<Shard<V>>]>,
    policy: Policy,
    hasher: RandomState,
    /// The next generation stamp (32 bits, wrapping).
    gen: AtomicU32,
    sweep: AtomicUsize,
    len: AtomicUsize,
    bytes: AtomicU64,
    pub stats: Stats,
    pub tags: TagTable,
    pub flights: Flights,
    /// Placeholders of fills in progress (`store/fill.rs`).
    pub fills: Fills,
}

/// A write lock (`G`: one shard's guard, or every shard's) together with the entries removed
/// under it (`bury`). Dropping it releases the lock first, then drops those entries, so a value
/// whose destructor runs code (a Python object's `__del__`) never runs under a shard lock: the
/// order is this type's, not each method's (there is no list to declare before the guard).
pub(super) struct Locked<G, V> {
    /// Declared first, so dropped first: fields drop in declaration order.
    guard: G,
    dead: Vec<Entry<V>>,
}

/// One shard under its write lock (`Store::write`).
pub(super) type LockedShard<'a, V> = Locked<RwLockWriteGuard<'a, Shard<V>>, V>;

impl<G, V> Locked<G, V> {
    fn new(guard: G) -> Self {
        Locked {
            guard,
            dead: Vec::new(),
        }
    }

    /// Keeps `e`, removed under the lock, until the lock is released.
    pub(super) fn bury(&mut self, e: Entry<V>) {
        self.dead.push(e);
    }

    /// Entries buried so far.
    pub(super) fn buried(&self) -> usize {
        self.dead.len()
    }

    /// Releases the lock and hands over the entries removed under it, for the caller to drop
    /// where it may.
    pub(super) fn unlock(self) -> Vec<Entry<V>> {
        let Locked { guard, dead } = self;
        drop(guard);
        dead
    }
}

impl<G, V> Deref for Locked<G, V> {
    type Target = G;

    fn deref(&self) -> &G {
        &self.guard
    }
}

impl<G, V> DerefMut for Locked<G, V> {
    fn deref_mut(&mut self) -> &mut G {
        &mut self.guard
    }
}

enum Lookup {
    Live(u32),
    Absent,
}

/// The store's key hasher: seeded at random per process (a site's visitors choose keys, so a
/// fixed seed would let them aim collisions), unless `RUSTCACHE_HASH_SEED` holds a u64, as
/// `PYTHONHASHSEED` does for Python: then runs are reproducible (hash-dependent choices such as
/// the shard of a key or TinyLFU's sketch counters come out the same), which the hit-ratio guard
/// needs. Read when a store is made.
fn key_hasher() -> RandomState {
    let seed = std::env::var("RUSTCACHE_HASH_SEED")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    match seed {
        Some(seed) => RandomState::with_seeds(
            seed,
            seed ^ 0x9e37_79b9_7f4a_7c15,
            seed.rotate_left(21),
            !seed,
        ),
        None => random_state(),
    }
}

impl<V: Weigh> Store<V> {
    /// A store under the "lru" policy.
    pub fn new(shards: usize) -> Self {
        Self::with_policy(shards, Policy::Lru)
    }

    pub fn with_policy(shards: usize, policy: Policy) -> Self {
        let n = shards.max(1).next_power_of_two();
        let hasher = key_hasher();
        Store {
            shards: (0..n)
                .map(|_| RwLock::new(Shard::with_hasher(hasher.clone())))
                .collect(),
            policy,
            hasher,
            gen: AtomicU32::new(1),
            sweep: AtomicUsize::new(0),
            len: AtomicUsize::new(0),
            bytes: AtomicU64::new(0),
            stats: Stats::default(),
            tags: TagTable::default(),
            flights: Flights::default(),
            fills: Fills::new(n),
        }
    }

    /// Entries held (under S3-FIFO, plus places reserved by inserts in progress).
    pub fn len(&self) -> usize {
        self.len.load(Relaxed)
    }

    pub fn policy(&self) -> Policy {
        self.policy
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes held: entries (and S3-FIFO's ghost records) and the tag table.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Relaxed) + self.tags.bytes()
    }

    /// Whether any shard lock is held right now (for tests that check nothing runs under a lock).
    pub fn is_locked(&self) -> bool {
        self.shards.iter().any(|s| s.is_locked())
    }

    /// fork's prepare step (see `crate::fork` for the lock order): takes the flight table, the
    /// tag table with its cells, then every shard, and keeps them locked.
    #[cfg(not(feature = "shuttle"))]
    pub fn lock_for_fork(&self) {
        self.flights.lock_for_fork();
        self.tags.lock_for_fork();
        for s in self.shards.iter() {
            std::mem::forget(s.write());
        }
    }

    /// Releases what `lock_for_fork` took; in a forked `child`, then forgets every in-flight record.
    ///
    /// # Safety
    /// `lock_for_fork` ran in this thread (or in the thread of the parent that forked this child)
    /// and nothing released its locks since.
    #[cfg(not(feature = "shuttle"))]
    pub unsafe fn unlock_after_fork(&self, child: bool) {
        for s in self.shards.iter().rev() {
            s.force_unlock_write();
        }
        self.tags.unlock_after_fork();
        self.flights.unlock_after_fork();
        if child {
            self.flights.clear();
        }
    }

    #[inline]
    fn next_gen(&self) -> u32 {
        self.gen.fetch_add(1, Relaxed)
    }

    #[inline]
    fn locate(&self, key: &str) -> (u64, usize) {
        let hash = StoredKey::of(key).hash_with(&self.hasher);
        // hashbrown picks the bucket from the low bits and matches the top 7 bits in its control
        // bytes: take the shard from the middle so that neither loses entropy within a shard.
        let idx = (hash >> 32) as usize & (self.shards.len() - 1);
        (hash, idx)
    }

    /// Finds a live entry, removing it if it has expired or one of its tags moved on.
    fn lookup(&self, shard: &mut LockedShard<'_, V>, hash: u64, key: &str, now: u64) -> Lookup {
        let Some(slot) = shard.find(hash, key) else {
            return Lookup::Absent;
        };
        let e = shard.entry(slot);
        if e.is_expired(now) {
            Stats::bump(&self.stats.expirations, 1);
        } else if !all_current(e.tags()) {
            Stats::bump(&self.stats.invalidations, 1);
        } else {
            return Lookup::Live(slot);
        }
        let e = self.detach(shard, slot);
        shard.bury(e);
        Lookup::Absent
    }

    /// Counts a use of `slot` (whose key hashes to `hash`) for the policy: "lru" moves it to the
    /// recent end (needs the write lock); S3-FIFO bumps its counter; W-TinyLFU also records the
    /// request in its sketch.
    #[inline]
    fn used(&self, shard: &mut Shard<V>, slot: u32, hash: u64) {
        match self.policy {
            Policy::Lru => shard.touch(slot),
            Policy::S3Fifo => shard.entry(slot).hit(),
            Policy::TinyLfu => shard.tiny_hit(slot, hash),
        }
    }

    /// Shard `idx` under its write lock, with a place for the entries removed under it.
    fn write(&self, idx: usize) -> LockedShard<'_, V> {
        Locked::new(self.shards[idx].write())
    }

    /// Every shard under its write lock (in order), with a place for the entries removed.
    fn lock_all(&self) -> Locked<Vec<RwLockWriteGuard<'_, Shard<V>>>, V> {
        Locked::new(self.shards.iter().map(|s| s.write()).collect())
    }
}

// Under `shuttle` the store's primitives work only inside a shuttle run: see the models.
#[cfg(all(test, not(feature = "shuttle")))]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::sync::OnceLock;

    use super::*;
    use crate::clock::NEVER;
    use crate::store::testing::*;

    #[test]
    fn one_shard_up_to_65536_entries_then_sixteen() {
        assert_eq!(shards_for(300), 1);
        assert_eq!(shards_for(-1), 1);
        assert_eq!(shards_for(ONE_SHARD_MAX), 1);
        assert_eq!(shards_for(ONE_SHARD_MAX + 1), SHARDS);
    }

    /// A value that checks, when dropped, that no shard lock of `PROBED` is held.
    struct Probe;

    static PROBED: OnceLock<Store<Probe>> = OnceLock::new();

    impl Weigh for Probe {
        fn weight(&self) -> usize {
            10
        }
    }

    impl Pack for Probe {
        fn from_tag(_: u8) -> &'static Self {
            unreachable!("Probe is never tagged")
        }
    }

    impl Drop for Probe {
        fn drop(&mut self) {
            if let Some(store) = PROBED.get() {
                assert!(!store.is_locked(), "a value was dropped under a shard lock");
            }
        }
    }

    /// A value that counts its drops, and those made while a shard lock of `SEEN` was held.
    struct Seen;

    static SEEN: OnceLock<Store<Seen>> = OnceLock::new();
    static DROPS: AtomicUsize = AtomicUsize::new(0);
    static DROPS_UNDER_LOCK: AtomicUsize = AtomicUsize::new(0);

    impl Weigh for Seen {
        fn weight(&self) -> usize {
            0
        }
    }

    impl Pack for Seen {
        fn from_tag(_: u8) -> &'static Self {
            unreachable!("Seen is never tagged")
        }
    }

    impl Drop for Seen {
        fn drop(&mut self) {
            DROPS.fetch_add(1, Relaxed);
            if SEEN.get().is_some_and(|s| s.is_locked()) {
                DROPS_UNDER_LOCK.fetch_add(1, Relaxed);
            }
        }
    }

    #[test]
    fn a_locked_shard_releases_its_lock_before_it_drops_what_it_buried() {
        let store = SEEN.get_or_init(|| Store::new(2));
        let mut shard = store.write(1);
        shard.bury(Entry::new("a", Seen, NEVER, Vec::new()));
        shard.bury(Entry::new("b", Seen, NEVER, Vec::new()));
        assert_eq!(shard.buried(), 2);
        drop(shard);
        assert_eq!(DROPS.load(Relaxed), 2);
        let mut all = store.lock_all();
        all.bury(Entry::new("c", Seen, NEVER, Vec::new()));
        drop(all);
        assert_eq!(DROPS.load(Relaxed), 3);
        // `unlock` hands them over with the lock already released.
        let mut shard = store.write(0);
        shard.bury(Entry::new("d", Seen, NEVER, Vec::new()));
        let dead = shard.unlock();
        assert!(!store.is_locked());
        assert_eq!((dead.len(), DROPS.load(Relaxed)), (1, 3));
        drop(dead);
        assert_eq!(DROPS.load(Relaxed), 4);
        assert_eq!(
            DROPS_UNDER_LOCK.load(Relaxed),
            0,
            "dropped under a shard lock"
        );
    }

    #[test]
    fn s3_drops_evicted_replaced_and_deleted_values_after_unlocking() {
        let store = PROBED.get_or_init(|| Store::with_policy(2, Policy::S3Fifo));
        let lim = Limits {
            max_entries: 20,
            cull_frequency: 3,
            max_bytes: Some(15 * Store::<Probe>::weigh("k00", &Probe, 1, 5 * SEC)),
        };
        // Enough rounds that both evictions and expirations happen whatever the seeded hasher
        // makes of the two shards (200 rounds missed one of them now and then).
        for i in 0..2_000 {
            let stamps = store.tags.stamps(["t"]);
            let expires = if i % 3 == 0 { 5 * SEC } else { NEVER };
            let now = i * SEC / 10;
            store.set(
                &format!("k{:02}", i % 60),
                Probe,
                expires,
                stamps,
                &lim,
                now,
            );
            store.get(&format!("k{:02}", (i * 7) % 60), now, |_| ());
            if i % 10 == 0 {
                store.delete(&format!("k{:02}", (i * 3) % 60), now);
            }
        }
        let s = store.stats.snapshot();
        assert!(s.evictions > 0 && s.expirations > 0);
        store.invalidate_tags(["t"], 300 * SEC);
        store.clear();
    }
}

/// The store driven at random against a model of what it must hold: keys that differ only
/// around the elided `:1:` prefix (and around the key byte's length limit), deadlines that pass,
/// are changed by `touch` (near, far, past) and are reclaimed by reads, sweeps, purges, Django's
/// cull and evictions; in-place updates and `replace_if` with tokens of every age.
#[cfg(all(test, not(feature = "shuttle")))]
mod model_tests {
    use std::collections::HashMap;

    use super::*;
    use crate::clock::NEVER;
    use crate::store::testing::*;

    /// Keys made of pieces that look like the elided prefix, and a few long ones whose stored
    /// part straddles the header's short-key limit (127 bytes) and a byte's range (255).
    fn key(rng: &mut Rng) -> String {
        const PIECES: [&str; 7] = [":1:", ":1", ":", "1", "a", "é", ":10:"];
        if rng.below(10) == 0 {
            let len = [126, 127, 128, 129, 130, 254, 255, 256, 257, 258][rng.below(10) as usize];
            let head = [":1:", "", ":1"][rng.below(3) as usize];
            return format!("{head}{}", "k".repeat(len - head.len()));
        }
        (0..rng.below(4))
            .map(|_| PIECES[rng.below(PIECES.len() as u64) as usize])
            .collect()
    }

    /// What the model holds of an entry: its value's id (`Val`'s weight), deadline, and the
    /// number of times its value changed (a token taken before a change must not replace it).
    #[derive(Clone, Copy)]
    struct Held {
        id: usize,
        expires: u64,
        version: u64,
    }

    /// Every entry the store's shards hold (expired ones too): key, value id and deadline.
    fn contents(store: &Store<Val>) -> HashMap<String, (usize, u64)> {
        let mut out = HashMap::new();
        for s in store.shards.iter() {
            for e in s.read().iter() {
                let old = out.insert(e.key().to_string(), (e.value().0, e.expires()));
                assert!(old.is_none(), "{} held twice", e.key());
            }
        }
        out
    }

    fn run(policy: Policy, shards: usize, max_entries: i64, seed: u64) {
        let store: Store<Val> = Store::with_policy(shards, policy);
        let lim = limits(max_entries, None);
        let evicting = max_entries < 1_000;
        let mut rng = Rng(seed);
        let mut model: HashMap<String, Held> = HashMap::new();
        let mut tokens: Vec<(String, Token, u64)> = Vec::new();
        let mut now = SEC;
        let mut next_id = 1_000;
        let mut version = 0;
        for step in 0..4_000 {
            let k = key(&mut rng);
            let before = contents(&store);
            let stats = store.stats.snapshot();
            let deadline = match rng.below(6) {
                0 => NEVER,
                1 => now + 60 * 86_400 * SEC, // beyond the header's range: a far deadline
                2 => now.saturating_sub(100_000_000 * rng.below(3)),
                _ => now + 100_000_000 * (1 + rng.below(30)),
            };
            let op = rng.below(20);
            let mut tag_op = false;
            match op {
                0..=5 => {
                    next_id += 1;
                    version += 1;
                    let tags = match rng.below(4) {
                        0 => store.tags.stamps([["t0", "t1"][rng.below(2) as usize]]),
                        _ => Vec::new(),
                    };
                    let put = store.set(&k, Val(next_id), deadline, tags, &lim, now);
                    assert_eq!(put, Put::Stored, "step {step}");
                    if deadline > now {
                        model.insert(
                            k.clone(),
                            Held {
                                id: next_id,
                                expires: deadline,
                                version,
                            },
                        );
                    } else {
                        model.remove(&k);
                    }
                }
                6 => {
                    let live = model.get(&k).is_some_and(|h| h.expires > now);
                    let deleted = store.delete(&k, now);
                    assert!(
                        deleted == live || (evicting && live && !deleted),
                        "step {step}"
                    );
                    model.remove(&k);
                }
                7..=8 => {
                    let live = model.get(&k).is_some_and(|h| h.expires > now);
                    let touched = store.touch(&k, deadline, &lim, now);
                    assert!(
                        touched == live || (evicting && live && !touched),
                        "step {step}"
                    );
                    match model.get_mut(&k) {
                        Some(h) if live && touched && deadline > now => h.expires = deadline,
                        _ => {
                            model.remove(&k);
                        }
                    }
                }
                9..=10 => now += 100_000_000 * rng.below(8),
                11 => {
                    // Bounded sweeps, or a whole pass: then nothing expired may be left.
                    let budget = [1, 4, u32::MAX][rng.below(3) as usize];
                    store.purge_expired(now, budget);
                    if budget == u32::MAX {
                        let stale: Vec<_> = contents(&store)
                            .into_iter()
                            .filter(|(_, (_, e))| *e <= now)
                            .collect();
                        assert!(stale.is_empty(), "step {step}: a pass left {stale:?}");
                    }
                }
                12 => {
                    let prefix = key(&mut rng);
                    let mut got = store.keys_with_prefix(&prefix, now);
                    got.sort();
                    let mut want: Vec<String> = model
                        .iter()
                        .filter(|(k, h)| h.expires > now && k.starts_with(&prefix))
                        .map(|(k, _)| k.clone())
                        .collect();
                    want.sort();
                    if evicting {
                        assert!(
                            got.iter().all(|k| want.contains(k)),
                            "step {step} {prefix:?}"
                        );
                    } else {
                        assert_eq!(got, want, "step {step}: prefix {prefix:?}");
                    }
                }
                13 => {
                    if let Some((_, token)) = store.snapshot(&k, now, |e| e.value().0) {
                        tokens.push((k.clone(), token, model[&k].version));
                    }
                }
                14..=15 if !tokens.is_empty() => {
                    let (k, token, seen) =
                        tokens.swap_remove(rng.below(tokens.len() as u64) as usize);
                    next_id += 1;
                    version += 1;
                    match store.replace_if(&k, token, Val(next_id), &lim, now) {
                        Replace::Done => {
                            let h = model.get_mut(&k).expect("replaced a held key");
                            assert_eq!(h.version, seen, "step {step}: {k:?} changed since");
                            assert!(h.expires > now);
                            (h.id, h.version) = (next_id, version);
                        }
                        Replace::Missing => {
                            assert!(evicting || !model.get(&k).is_some_and(|h| h.expires > now));
                            model.remove(&k);
                        }
                        Replace::Conflict => {}
                        Replace::TooLarge => panic!("no bound on bytes"),
                    }
                }
                16 => {
                    version += 1;
                    let r = store.update(&k, &lim, now, |_| Some(()));
                    match model.get_mut(&k) {
                        Some(h) if h.expires > now && r.is_ok() => h.version = version,
                        _ => {
                            assert!(r.is_err() || evicting, "step {step}");
                            model.remove(&k);
                        }
                    }
                }
                17 => {
                    tag_op = true;
                    store.invalidate_tags([["t0", "t1"][rng.below(2) as usize]], now);
                    let left = contents(&store);
                    model.retain(|k, h| left.get(k).is_some_and(|&(id, _)| id == h.id));
                }
                _ => {
                    let got = store.get(&k, now, |v| v.0);
                    match model.get(&k) {
                        Some(h) if h.expires > now => {
                            assert!(
                                got == Some(h.id) || (evicting && got.is_none()),
                                "step {step}"
                            );
                            if got.is_none() {
                                model.remove(&k);
                            }
                        }
                        _ => assert_eq!(got, None, "step {step}: {k:?}"),
                    }
                }
            }
            // The books add up, and every entry that left after its deadline was counted once
            // as an expiration (whatever took it: a read, a sweep, a cull, an eviction, a tag).
            assert_eq!(store.bytes(), books(&store), "step {step}");
            assert_eq!(held(&store), store.len(), "step {step}");
            let after = contents(&store);
            let expired_out = before
                .iter()
                .filter(|(k, &(id, e))| e <= now && !after.get(*k).is_some_and(|&(i, _)| i == id))
                .count() as u64;
            let s = store.stats.snapshot();
            assert_eq!(
                s.expirations - stats.expirations,
                expired_out,
                "step {step} (tags: {tag_op})"
            );
            if !evicting {
                assert_eq!(s.evictions, 0);
            }
            // Whatever the model holds live, the store holds (unless evicted).
            for (k, h) in &model {
                if h.expires > now && !evicting {
                    assert_eq!(after.get(k).map(|x| x.0), Some(h.id), "step {step}: {k:?}");
                }
            }
            model.retain(|k, h| after.get(k).is_some_and(|&(id, _)| id == h.id));
        }
        // Past every deadline but the far ones, a whole pass of the sweep leaves none expired.
        now += 10 * 86_400 * SEC;
        store.purge_expired(now, u32::MAX);
        assert!(contents(&store).values().all(|&(_, e)| e > now));
        assert_eq!(store.bytes(), books(&store));
    }

    #[test]
    fn lru_of_one_shard_agrees_with_the_model() {
        run(Policy::Lru, 1, 100_000, 0x9E37_79B9_7F4A_7C15);
    }

    #[test]
    fn lru_over_shards_agrees_with_the_model() {
        run(Policy::Lru, 16, 100_000, 0xD1B5_4A32_D192_ED03);
    }

    #[test]
    fn s3fifo_and_tinylfu_agree_with_the_model() {
        run(Policy::S3Fifo, 16, 100_000, 0xA076_1D64_78BD_642F);
        run(Policy::TinyLfu, 4, 100_000, 0xE703_7ED1_A0B4_28DB);
    }

    #[test]
    fn evicting_stores_serve_only_what_the_model_holds() {
        // Django's cull (one shard), "lru" eviction over shards, S3-FIFO and W-TinyLFU.
        run(Policy::Lru, 1, 40, 0x8EBC_6AF0_9C88_C6E3);
        run(Policy::Lru, 16, 40, 0x5896_5EC4_C4F0_A5E9);
        run(Policy::S3Fifo, 4, 40, 0x1D8E_4E27_C47D_124F);
        run(Policy::TinyLfu, 4, 40, 0xC2B2_AE3D_27D4_EB4F);
    }
}
